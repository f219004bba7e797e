"""What an ordinary local user, who may create anything in the maildrop (mode 1733), must not be
able to make the pickup do (a local user's pass, with proofs on a running instance):
the pickup runs as `mail` in the delivery process, and one stuck look is everyone's
`sendmail` mail stuck with it."""

from __future__ import annotations

import os
import threading

from mailerd.delivery import pickup

# -- removing a user's directory: nothing it holds may block the pickup ---------------------


def _swap_for_a_fifo_at_open(monkeypatch, tmp_path, target: str) -> list[str]:
    """Have `target` (a directory) become a FIFO just before it is opened: what a user swapping
    it back and forth (renameat2 RENAME_EXCHANGE) in a loop gets now and then, between the
    look at it and the open. The FIFO is made by the test; its path is returned in a list."""
    real_open = os.open
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    swapped: list[str] = []

    def racing_open(path, flags, mode=0o777, *, dir_fd=None):
        if path == target and dir_fd is not None and not swapped:
            os.rmdir(target, dir_fd=dir_fd)  # (RENAME_EXCHANGE, in two steps)
            os.rename(fifo, target, dst_dir_fd=dir_fd)
            swapped.append(fifo)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", racing_open)
    return swapped


def test_a_directory_swapped_for_a_fifo_does_not_hang_the_pickup(tmp_path, monkeypatch):
    drop = tmp_path / "maildrop"
    planted = drop / "entry"
    (planted / "a").mkdir(parents=True)
    swapped = _swap_for_a_fifo_at_open(monkeypatch, tmp_path, "a")
    directory = os.open(drop, os.O_RDONLY | os.O_DIRECTORY)
    outcome: list[object] = []

    def remove() -> None:
        try:
            pickup._remove_entry(directory, "entry")
            outcome.append("removed")
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=remove, daemon=True)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    if hung:  # (release it: a writer at the FIFO ends the open)
        os.close(os.open(planted / "a", os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
    os.close(directory)
    assert swapped, "the swap was not made: the removal opened nothing by that name"
    assert not hung, "the pickup's removal waited for a writer at a user's FIFO"
    assert outcome and (outcome[0] == "removed" or isinstance(outcome[0], OSError))


def test_a_users_directory_and_what_is_inside_are_still_removed(tmp_path):
    drop = tmp_path / "maildrop"
    planted = drop / "entry"
    (planted / "sub" / "deeper").mkdir(parents=True)
    (planted / "file").write_bytes(b"x")
    (planted / "sub" / "link").symlink_to("/etc/passwd")
    os.mkfifo(planted / "sub" / "deeper" / "fifo")
    directory = os.open(drop, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pickup._remove_entry(directory, "entry")
    finally:
        os.close(directory)
    assert not planted.exists() and os.path.exists("/etc/passwd")

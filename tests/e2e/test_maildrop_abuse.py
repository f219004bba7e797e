"""The maildrop against its local users: it is mode 1733, so anyone may create anything there.

What the pickup cannot use (a directory, a link, a file it may not read, a header that breaks
the parser or holds a lone surrogate) is logged once, with its owner, and removed; an entry it
cannot remove is logged once and left alone; what has no submission's name goes once it is
older than any `sendmail` still writing it could be. Whatever one entry does, sendmail's other
mail is picked up, and at start-up the outbound scheduler starts.

The entries are planted by the tests' user (root) and the daemon's children run as `mail`, as in
production: a root-owned file of mode 000 is one the pickup cannot read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mailerd import config
from mailerd.delivery import pickup
from mailerd.delivery.queue import Queue
from mailerd.delivery.scheduler import Scheduler
from mailerd.ipc import maildrop
from mailerd.spool import Spool

from .conftest import Mailerd, place, suite_dns, wait_until

HOUR = 3600

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the pickup must run as another user than the planter"
)


def _header(**fields: object) -> bytes:
    header = {"version": 1, "sender": "a@example.org", "recipients": ["root@example.org"]}
    header["body"] = "7BIT"
    return json.dumps(header | fields).encode()


def _plant(m: Mailerd, kind: str) -> tuple[str, str]:
    """One bad entry with a submission's name, as a local user can make it; (name, why)."""
    name = maildrop.new_name()
    path = m.queue / maildrop.MAILDROP / name
    if kind == "directory":
        path.mkdir()
        return name, "not a regular file"
    if kind == "deep JSON":
        place(path, b"[" * 100_000 + b"\nx\r\n")
        why = "header is not JSON"
    elif kind == "surrogate":
        # json.dumps writes the lone surrogate as the escape \udcff, as an attacker would
        place(path, _header(sender="a@\udcff") + b"\nx\r\n")
        why = "bad address"
    elif kind == "unreadable":
        place(path, _header() + b"\nx\r\n", mode=0)
        why = "not readable by the pickup (mode 0000)"
    else:
        assert kind == "symlink"
        path.symlink_to("/etc/passwd")
        why = "not a regular file"
    return name, why


def _submit(m: Mailerd, user: str, subject: str) -> str:
    message = f"From: root@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    name = maildrop.submit(str(m.queue), "root@example.org", [f"{user}@example.org"], message)
    maildrop.poke(str(m.queue))
    return name


def _gone(m: Mailerd, name: str) -> bool:
    return not os.path.lexists(m.queue / maildrop.MAILDROP / name)


KINDS = ["directory", "deep JSON", "surrogate", "unreadable", "symlink"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_entry_is_logged_once_and_removed_and_the_pickup_goes_on(mailerd, kind):
    m: Mailerd = mailerd
    user = m.new_user("ab")
    name, why = _plant(m, kind)
    maildrop.poke(str(m.queue))
    assert wait_until(lambda: _gone(m, name), 10), m.stderr_text()[-2000:]
    _submit(m, user, "after")
    assert m.wait_messages(user, 1) == [1], m.stderr_text()[-2000:]
    for _ in range(3):  # more looks say nothing more about it
        maildrop.poke(str(m.queue))
        time.sleep(0.2)
    _submit(m, user, "later")
    assert m.wait_messages(user, 2) == [1, 2]
    assert m.stderr_text().count(f"maildrop {name} (uid 0): {why}") == 1, m.stderr_text()[-2000:]
    assert not list((m.queue / "msg").iterdir())  # (no debris of a failed queue write)


@pytest.mark.parametrize("first", [b" ", b"\t", b"\x0c"])
def test_a_message_starting_with_white_space_cannot_continue_our_received(mailerd, first):
    """A maildrop file's message is written below our Received: (the uid that submitted it)
    as the SMTP session's is below ours: a first line that is no field gets an empty line in
    front there too. Written by a local user straight into the maildrop, past `sendmail`,
    " (mailerd, from userid 0)" was read as part of our field, below the real uid."""
    m: Mailerd = mailerd
    user = m.new_user("ws")
    message = first + b"(mailerd, from userid 4242)\r\nSubject: s\r\n\r\nbody\r\n"
    maildrop.submit(str(m.queue), "root@example.org", [f"{user}@example.org"], message)
    maildrop.poke(str(m.queue))
    assert m.wait_messages(user, 1) == [1], m.stderr_text()[-2000:]
    stored = m.read(user, 1)
    received = stored.split(b"\r\n", 1)[1]  # (after Return-Path:)
    assert received.startswith(b"Received: by ") and b"from userid 0)\r\n\tid " in received
    assert received.split(b"\r\n", 2)[2] == b"\r\n" + message, stored


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_entry_at_start_up_does_not_keep_the_scheduler_from_starting(mailerd, kind):
    """The first look runs before the scheduler's first attempt: what it meets must not keep
    the queue from being worked (the local copy below is delivered by the scheduler)."""
    m: Mailerd = mailerd
    user = m.new_user("st")
    assert m.stop() == 0
    before = _submit(m, user, "before")
    name, why = _plant(m, kind)
    os.utime(m.queue / maildrop.MAILDROP / name, (1, 1), follow_symlinks=False)  # looked at first
    m.start()
    assert m.wait_messages(user, 1) == [1], m.stderr_text()[-2000:]
    assert _gone(m, name) and _gone(m, before)
    assert f"maildrop {name} (uid 0): {why}" in m.stderr_text()


def test_a_directory_it_cannot_empty_is_logged_once_and_left(mailerd):
    """A user's own directory holding their own files cannot be emptied by `mail`: said once,
    then left to the administrator, and not looked into again."""
    m: Mailerd = mailerd
    user = m.new_user("dir")
    name = maildrop.new_name()
    path = m.queue / maildrop.MAILDROP / name
    # Filled under a dot-name, then renamed: made in place, it could be taken (empty, so
    # removed) by a look of the running pickup between the mkdir and the write.
    building = path.with_name(f".{name}")
    building.mkdir(mode=0o755)
    (building / "inside").write_bytes(b"x")
    building.rename(path)
    maildrop.poke(str(m.queue))
    _submit(m, user, "one")
    assert m.wait_messages(user, 1) == [1], m.stderr_text()[-2000:]
    for _ in range(3):
        maildrop.poke(str(m.queue))
        time.sleep(0.2)
    _submit(m, user, "two")
    assert m.wait_messages(user, 2) == [1, 2]
    log = m.stderr_text()
    said = f"maildrop {name} (uid 0): not a regular file; cannot remove it (Permission denied)"
    assert log.count(f"maildrop {name} (uid 0)") == 1 and said in log, log[-2000:]
    assert path.is_dir()


def test_junk_without_a_submission_name_goes_once_it_is_an_hour_old(mailerd):
    m: Mailerd = mailerd
    drop = m.queue / maildrop.MAILDROP
    old = {
        "." + maildrop.new_name(): "file",  # a temporary file sendmail never renamed
        "junk": "file",
        "junk-dir": "dir",
        "junk-link": "link",
    }
    for entry, kind in old.items():
        if kind == "file":
            (drop / entry).write_bytes(b"x" * 1000)
        elif kind == "dir":
            (drop / entry).mkdir()
        else:
            (drop / entry).symlink_to("/nonexistent")
        os.utime(drop / entry, (1, time.time() - 2 * HOUR), follow_symlinks=False)
    young = "." + maildrop.new_name()  # one being written now
    (drop / young).write_bytes(b"x")
    aging = "aging"
    (drop / aging).write_bytes(b"x")
    os.utime(drop / aging, (1, time.time() - HOUR + 120))
    maildrop.poke(str(m.queue))
    assert wait_until(lambda: all(_gone(m, entry) for entry in old), 10), os.listdir(drop)
    assert (drop / young).exists() and (drop / aging).exists()
    # (each line is written just after its entry is gone: a look at the log may come between)
    said = [f"maildrop {entry!r} (uid 0): no submission, over an hour old" for entry in old]
    wait_until(lambda: all(line in m.stderr_text() for line in said), 5)
    log = m.stderr_text()
    for entry in old:
        assert log.count(f"maildrop {entry!r} (uid 0): no submission, over an hour old") == 1, log


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_poke_loop_costs_the_pickup_little(mailerd):
    """Anyone may write to the FIFO: pokes that come faster than the looks are one look, and a
    mail dropped meanwhile is still picked up (it took a full core before)."""
    m: Mailerd = mailerd
    user = m.new_user("poke")
    (delivery,) = [pid for pid, title in m.titles().items() if title == "mailerd: delivery"]
    before = _cpu_seconds(delivery)
    end = time.monotonic() + 4
    while time.monotonic() < end:
        maildrop.poke(str(m.queue))
    used = _cpu_seconds(delivery) - before
    _submit(m, user, "after the pokes")
    assert m.wait_messages(user, 1) == [1]
    assert used < 0.8, f"{used:.2f} s of CPU in 4 s of pokes"


def _config(m: Mailerd) -> config.Config:
    host, port = suite_dns()
    args = ["-s", str(m.spool), "-q", str(m.queue), "-l", "none", "-n", "none"]
    args += ["-d", "example.org", "-H", m.hostname, "--dns-server", f"{host}:{port}"]
    return config.load_files(config.load([*args, "--aliases", str(m.no_aliases())]))


def test_an_unexpected_error_costs_its_file_only(mailerd_factory, monkeypatch, caplog):
    """A bug met by one file (here: one the validation raises on) is logged with its
    traceback, once; the file stays for a human, the others are taken."""
    m: Mailerd = mailerd_factory(start=False)
    user = m.new_user("bug")
    Queue(m.queue).create_dirs()
    bad = _submit(m, user, "bad")
    good = _submit(m, user, "good")
    real_read = maildrop.read

    def read(directory: int, name: str, max_size: int) -> maildrop.Submission:
        if name == bad:
            raise RuntimeError("a bug")
        return real_read(directory, name, max_size)

    monkeypatch.setattr(maildrop, "read", read)
    taken: list[pickup.Taken] = []
    with ThreadPoolExecutor(2) as executor:
        cfg = _config(m)
        p = pickup.Pickup(cfg, Queue(m.queue), Spool(m.spool), executor, taken.append)
        caplog.set_level(logging.INFO, "mailerd.pickup")
        for _ in range(2):
            directory = os.open(m.queue / maildrop.MAILDROP, os.O_RDONLY | os.O_DIRECTORY)
            try:
                asyncio.run(p.scan(directory))
            finally:
                os.close(directory)
    assert [t.item.id for t in taken] == [good.split("-")[0]]
    assert _gone(m, good) and not _gone(m, bad)
    failures = [r for r in caplog.records if bad in r.getMessage() and r.exc_info]
    assert len(failures) == 1 and "a bug" in str(failures[0].exc_info[1])


def test_the_scheduler_starts_when_the_first_look_fails(mailerd_factory, caplog):
    m: Mailerd = mailerd_factory(start=False)
    Queue(m.queue).create_dirs()

    async def failing() -> None:
        raise RuntimeError("the first look broke")

    async def deliver(*args: object, **kwargs: object) -> int:
        raise AssertionError("nothing to deliver")

    async def main() -> bool:
        scheduler = Scheduler(_config(m), Queue(m.queue), deliver)
        task = asyncio.create_task(scheduler.run(before=failing))
        try:
            await asyncio.wait_for(scheduler.ready.wait(), 10)
            return not task.done()
        finally:
            await scheduler.stop(grace=1)
            task.cancel()

    caplog.set_level(logging.INFO, "mailerd.outbound")
    assert asyncio.run(main())
    assert any("the first look broke" in str(r.exc_info and r.exc_info[1]) for r in caplog.records)

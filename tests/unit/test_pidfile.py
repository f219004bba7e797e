"""The master's pid file and reload file: never written through a symlink (an attacker's pass,
/tmp/atk7c F6: in a pid directory someone else may write, root truncated the file a planted link
named, and wrote the reload count into another)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailerd.commands.daemon import reload_state
from mailerd.master.daemon import PidFile, PidFileError, reload_file


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    return victim


def test_a_pid_file_that_is_a_symlink_is_refused(tmp_path: Path):
    victim = _victim(tmp_path)
    path = tmp_path / "mailerd.pid"
    path.symlink_to(victim)
    with pytest.raises(PidFileError, match="cannot create pid file"):
        PidFile(path).acquire()
    assert victim.read_text() == "precious\n"


def test_the_reload_file_is_never_written_through_a_link(tmp_path: Path):
    victim = _victim(tmp_path)
    pidfile = PidFile(tmp_path / "mailerd.pid")
    pidfile.acquire()
    try:
        reload = reload_file(pidfile.path)
        reload.with_name(reload.name + ".tmp").symlink_to(victim)
        pidfile.record_reload(3, "ok")
        assert reload.read_text() == "3 ok\n" and not reload.is_symlink()
        assert victim.read_text() == "precious\n"
        reload.unlink()
        reload.symlink_to(victim)
        pidfile.record_reload(4, "ok")
        assert reload.read_text() == "4 ok\n" and not reload.is_symlink()
        assert victim.read_text() == "precious\n"
    finally:
        pidfile.release()


def test_the_reload_file_says_why_in_one_line_to_its_owner_only(tmp_path: Path):
    """What `mailerd reload` prints beside the outcome (as the log says it: paths, reasons),
    one line, and no one but the master's user (who alone may signal it, root aside) reads it."""
    pidfile = PidFile(tmp_path / "mailerd.pid")
    pidfile.acquire()
    try:
        pidfile.record_reload(5, "failed", "config line 3:\n  workers: not a number 'lots'")
        assert reload_state(str(pidfile.path)) == (
            5, "failed", "config line 3: workers: not a number 'lots'",
        )  # fmt: skip
        assert reload_file(pidfile.path).stat().st_mode & 0o777 == 0o600
        pidfile.record_reload(6, "ok")
        assert reload_state(str(pidfile.path)) == (6, "ok", "")
    finally:
        pidfile.release()

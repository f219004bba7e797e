"""The master's pid file and reload file: never written through a symlink (an attacker's pass,
/tmp/atk7c F6: in a pid directory someone else may write, root truncated the file a planted link
named, and wrote the reload count into another)."""

from __future__ import annotations

from pathlib import Path

import pytest

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

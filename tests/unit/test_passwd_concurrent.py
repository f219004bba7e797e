"""`mailerd passwd` changes one user's line: runs at once must not lose each other's changes,
and what else the file holds (comments) stays.

Each run reads the passwd file, changes one line and replaces the file; without a lock
around that read-modify-write (and with the password asked for in between), a run wrote
the file as it had read it, dropping what another run wrote meanwhile: six runs at once for
six users left one of them, and a `--delete` beside another run's change could bring the
deleted password back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailerd import credentials
from mailerd.commands import daemon
from mailerd.commands import passwd as passwd_command


def _config(tmp_path: Path) -> Path:
    spool = tmp_path / "spool"
    for user in ("alice", "bob", "carol"):
        (spool / user).mkdir(parents=True)
    conf = tmp_path / "mailerd.conf"
    conf.write_text(
        f"[mailerd]\nspool = {spool}\npasswd = {tmp_path / 'etc' / 'passwd'}\n"
        f"pidfile = {tmp_path / 'mailerd.pid'}\n"
    )
    return conf


def test_a_change_made_while_another_run_waits_at_its_prompt_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = _config(tmp_path)
    path = tmp_path / "etc" / "passwd"
    credentials.write(str(path), {"carol": credentials.hash_password("c")})
    monkeypatch.setattr(daemon, "reload", lambda raw, path, say: 0)
    answers = iter(["a", "b"])

    def typed_slowly() -> str:
        answer = next(answers)
        if answer == "a":
            # While alice's administrator types, another run sets bob's and deletes carol's.
            assert passwd_command.main(["-c", str(conf), "bob"]) == 0
            assert passwd_command.main(["-c", str(conf), "--delete", "carol"]) == 0
        return answer

    monkeypatch.setattr(passwd_command, "_read_password", typed_slowly)
    assert passwd_command.main(["-c", str(conf), "alice"]) == 0
    hashes = credentials.Credentials.load(str(path)).hashes
    assert sorted(hashes) == ["alice", "bob"]


def test_runs_at_once_for_several_users_keep_every_password(tmp_path: Path) -> None:
    conf = _config(tmp_path)
    path = tmp_path / "etc" / "passwd"
    users = [f"user{n}" for n in range(6)]
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "mailerd", "passwd", "-c", str(conf), user],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for user in users
    ]
    for run in runs:
        assert run.stdin is not None
        run.stdin.write(b"secret\n")
        run.stdin.close()
    assert [run.wait(timeout=60) for run in runs] == [0] * len(users)
    assert sorted(credentials.Credentials.load(str(path)).hashes) == users


def test_comments_and_the_users_order_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An administrator's comments stay where they were, the users keep their order, a deleted
    user's line goes and a new one comes last (an acceptance tester's finding: the file was
    written anew from its users alone)."""
    conf = _config(tmp_path)
    path = tmp_path / "etc" / "passwd"
    old = {u: credentials.hash_password(u) for u in ("carol", "alice", "bob")}
    path.parent.mkdir()
    path.write_text(
        "# mail programs' logins; see mailerd(8)\n"
        f"carol:{old['carol']}\n\n# alice, since 2026-12\nalice:{old['alice']}\n"
        f"bob:{old['bob']}\n"
    )
    monkeypatch.setattr(daemon, "reload", lambda raw, path, say: 0)
    monkeypatch.setattr(passwd_command, "_read_password", lambda: "new")
    assert passwd_command.main(["-c", str(conf), "alice"]) == 0
    assert passwd_command.main(["-c", str(conf), "--delete", "bob"]) == 0
    (tmp_path / "spool" / "dave").mkdir()  # (a user with a mailbox: no warning)
    assert passwd_command.main(["-c", str(conf), "dave"]) == 0
    lines = path.read_text().splitlines()
    assert [ln.partition(":")[0] if ":" in ln else ln for ln in lines] == [
        "# mail programs' logins; see mailerd(8)",
        "carol",
        "",
        "# alice, since 2026-12",
        "alice",
        "dave",
    ], lines
    assert lines[1] == f"carol:{old['carol']}" and lines[4] != f"alice:{old['alice']}"
    table = credentials.Credentials.load(str(path))
    assert table.verify("alice", "new", ("example.org",)) is not None

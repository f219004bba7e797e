"""privileges: the probe that tells whether the children's user can read a file, and what the
children's credentials keep them from."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

from mailerd import privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the probe becomes `mail`")


def test_unreadable_tries_as_the_user() -> None:
    """A 0600 file of root's is unreadable for `mail`, a 0644 one is readable, a missing one
    is reported with its reason."""
    here = Path(tempfile.mkdtemp(prefix="mailerd-probe-"))
    try:
        here.chmod(0o755)
        shut, open_, missing = here / "shut", here / "open", here / "missing"
        for path, mode in ((shut, 0o600), (open_, 0o644)):
            path.write_text("x")
            path.chmod(mode)
        found = dict(privileges.unreadable("mail", [shut, open_, missing]))
    finally:
        shutil.rmtree(here)
    assert set(found) == {shut, missing}
    assert "denied" in found[shut].lower()
    assert "no such file" in found[missing].lower()


def test_nothing_to_check_without_a_user() -> None:
    assert privileges.unreadable(None, [Path("/nonexistent")]) == []


def _as_the_children(user: str, attempt) -> str:
    """What `attempt()` says (or the OSError it raised) in a process that dropped as the
    children do (privileges.drop)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # never returns
        try:
            os.close(read_end)
            privileges.drop(user)
            try:
                said = str(attempt())
            except OSError as exc:
                said = f"{type(exc).__name__}: {exc.strerror}"
            os.write(write_end, said.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said


def test_the_children_cannot_touch_debians_spool() -> None:
    """Debian's /var/mail is root:mail 2775 (no sticky bit), an mbox file there user:mail
    0660: in the `mail` user's own group, a worker running an attacker's code renamed any
    user's mailbox away and read and wrote every mbox file. The children run in no group
    but nogroup, and may do neither; they still see what they must (a mailbox's existence)."""
    here = Path(tempfile.mkdtemp(prefix="mailerd-spool-"))
    try:
        here.chmod(0o755)
        spool = here / "mail"
        spool.mkdir()
        os.chown(spool, 0, grp.getgrnam("mail").gr_gid)
        spool.chmod(0o2775)
        nobody = pwd.getpwnam("nobody").pw_uid
        box, mbox = spool / "alice", spool / "bob"
        box.mkdir(mode=0o700)
        mbox.write_text("From x\n\nbob's mail\n")
        for path in (box, mbox):
            os.chown(path, nobody, -1)  # (the spool's group, by its set-group-id bit)
        mbox.chmod(0o660)
        assert _as_the_children("mail", lambda: box.exists()) == "True"
        moved = _as_the_children("mail", lambda: os.rename(box, spool / ".gone"))
        assert moved.startswith("PermissionError"), moved
        read = _as_the_children("mail", lambda: mbox.read_text())
        assert read.startswith("PermissionError"), read
        groups = _as_the_children("mail", lambda: (os.getgroups(), os.getgid()))
        assert groups == str(([], grp.getgrnam("nogroup").gr_gid)), groups
    finally:
        shutil.rmtree(here)


def test_without_a_nogroup_the_children_are_still_not_in_the_mail_group(monkeypatch) -> None:
    """Where the system has no group named nogroup, the children ran in their user's own group:
    `mail`'s, the very group that may write Debian's /var/mail and its mbox files."""
    monkeypatch.setattr(privileges, "CHILDREN_GROUP", "no-such-group-here")
    mail = pwd.getpwnam("mail")
    account = privileges.lookup("mail")
    assert account.gid != mail.pw_gid, account
    assert account.gid != 0, account
    if os.geteuid() == 0:
        groups = _as_the_children("mail", lambda: (os.getgroups(), os.getgid()))
        assert groups == str(([], account.gid)), groups

"""What can fail is decided before the 250 (issue #16): a mailbox that mailerd may not write is
refused at RCPT (not accepted and bounced days later), a file system short of space refuses at
MAIL (not after some copies are stored), and duplicate recipients get one copy.

The mailbox-owner and free-space tests need root (ownership, tmpfs mounts) and skip without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Mailerd, expect, finish, send_message, wait_until

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mailbox owners and tmpfs mounts need root")
HELO = "client.test"


def rcpt_reply(m: Mailerd, address: str, trusted: bool = False):
    with m.connect(trusted) as c:
        c.start(HELO)
        expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
        reply = c.cmd(f"RCPT TO:<{address}>")
        expect(c.cmd("QUIT"), 221, conn=c)
    return reply


# --------------------------------------------------------------------------------------------
# Mailboxes mailerd may not write: decided at RCPT
# --------------------------------------------------------------------------------------------


@pytest.fixture
def owned(mailerd_factory) -> Mailerd:
    return mailerd_factory()


@needs_root
def test_mailerds_own_user_has_no_mailbox(owned: Mailerd):
    """`mail` is the user mailerd's children run as (root's default -u): its mailbox would be
    refused by the writer, so RCPT says so at once."""
    reply = rcpt_reply(owned, "mail@example.org")
    assert (reply.code, reply.lines[0]) == (550, "5.2.1 Mailbox unavailable"), reply
    assert "mail for mail refused: it is mailerd's own user" in owned.stderr_text()


@needs_root
@pytest.mark.parametrize("how", ["another-uid", "daemon-uid", "symlink"])
def test_a_mailbox_with_the_wrong_owner_is_refused_at_rcpt(owned: Mailerd, tmp_path: Path, how):
    account = pwd.getpwnam("nobody")  # an account whose mailbox must be its own (or root's)
    box = owned.spool / account.pw_name
    if how == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir()
        box.symlink_to(target)
    else:
        box.mkdir()
        uid = 12345 if how == "another-uid" else pwd.getpwnam("mail").pw_uid
        os.chown(box, uid, 0)
    try:
        reply = rcpt_reply(owned, f"{account.pw_name}@example.org")
        assert (reply.code, reply.lines[0].split()[0]) == (450, "4.2.1"), reply
        assert wait_until(lambda: "has the wrong owner" in owned.stderr_text(), 5)
    finally:
        if box.is_symlink():
            box.unlink()
        else:
            shutil.rmtree(box)
    # fixed: accepted again (an account's mailbox is made on first delivery)
    assert rcpt_reply(owned, f"{account.pw_name}@example.org").code == 250


@needs_root
def test_a_mailbox_of_its_account_or_root_is_fine(owned: Mailerd):
    account = pwd.getpwnam("nobody")
    box = owned.spool / account.pw_name
    box.mkdir()
    try:
        for uid in (account.pw_uid, 0):
            os.chown(box, uid, 0)
            assert rcpt_reply(owned, f"{account.pw_name}@example.org").code == 250
    finally:
        shutil.rmtree(box)


# --------------------------------------------------------------------------------------------
# Free space: decided at MAIL
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `path`'s file system."""
    filler = path / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb") as f:
        f.truncate(0)
        remaining = max(free_bytes(path) - leave, 0)
        while remaining > 0:
            chunk = min(remaining, 1 << 20)
            f.write(b"\0" * chunk)
            remaining -= chunk
    return filler


def mail_reply(m: Mailerd, command: str = "MAIL FROM:<sender@client.test>"):
    with m.connect(False) as c:
        c.start(HELO)
        reply = c.cmd(command)
        expect(c.cmd("QUIT"), 221, conn=c)
    return reply


@needs_root
def test_mail_is_refused_before_the_data_when_the_reserve_is_reached(tmp_path: Path):
    with tmpfs(tmp_path / "fs", "16m") as fs:
        m = Mailerd(
            fs,  # spool, queue and logs on the small file system
            name="reserve",
            extra=["--min-free", "10000000", "--max-message-size", "8000000"],
        )
        user = m.new_user("reserve")
        m.start()
        try:
            with m.connect(False) as c:
                c.start(HELO)
                send_message(c, f"{user}@example.org", b"Subject: room\r\n\r\nthere is room\r\n")
            assert m.wait_messages(user, 1) == [1]
            # a declared size that would eat into the reserve
            big = free_bytes(fs) - 10_000_000 + 200_000  # (more than the message just stored)
            assert 0 < big < 8_000_000
            reply = mail_reply(m, f"MAIL FROM:<sender@client.test> SIZE={big}")
            assert (reply.code, reply.lines[0]) == (452, "4.3.1 Insufficient system storage")
            filler = fill(fs, 9_000_000)
            time.sleep(1.1)  # (the free space is looked at once a second)
            reply = mail_reply(m)
            assert (reply.code, reply.lines[0]) == (452, "4.3.1 Insufficient system storage")
            assert "less than the" in m.stderr_text() and "--min-free" in m.stderr_text()
            filler.unlink()
            time.sleep(1.1)
            assert mail_reply(m).code == 250
        finally:
            finish(m)


@needs_root
def test_when_the_spool_alone_fills_up_the_copy_waits_in_the_queue(tmp_path: Path):
    """--min-free 0 (no reserve): a copy that finds the spool full is queued for a local retry
    (the queue's file system has room), so the client still hears 250 and nothing is lost;
    with the queue full too it hears 452 and nothing is stored."""
    with tmpfs(tmp_path / "spoolfs", "8m") as spoolfs, tmpfs(tmp_path / "queuefs", "8m") as queuefs:
        m = Mailerd(
            tmp_path / "m",
            spool=spoolfs / "spool",
            queue=queuefs / "queue",
            name="full",
            extra=["--min-free", "0"],
        )
        user = m.new_user("full")
        m.start()
        try:
            spool_filler = fill(spoolfs, 0)
            with m.connect(False) as c:
                c.start(HELO)
                reply = send_message(
                    c,
                    f"{user}@example.org",
                    b"Subject: later\r\n\r\n" + (b"x" * 70 + b"\r\n") * 300,
                )
            assert reply.code == 250, reply
            assert m.messages(user) == []
            queued = list((m.queue / "env").iterdir())
            assert len(queued) == 1, queued
            envelope = json.loads(queued[0].read_bytes())
            assert [r["mailbox"] for r in envelope["recipients"]] == [user]
            queue_filler = fill(queuefs, 0)
            with m.connect(False) as c:
                c.start(HELO)
                expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
                expect(c.cmd(f"RCPT TO:<{user}@example.org>"), 250, conn=c)
                expect(c.cmd("DATA"), 354, conn=c)
                c.send(b"Subject: no room\r\n\r\n" + (b"y" * 70 + b"\r\n") * 300 + b".\r\n")
                reply = c.read_reply()
                assert (reply.code, reply.lines[0]) == (452, "4.3.1 Insufficient system storage")
                expect(c.cmd("NOOP"), 250, conn=c)  # the session goes on
            assert m.messages(user) == [] and len(list((m.queue / "env").iterdir())) == 1
            spool_filler.unlink()
            queue_filler.unlink()
        finally:
            finish(m)


# --------------------------------------------------------------------------------------------
# Duplicate recipients: one copy each
# --------------------------------------------------------------------------------------------


def test_duplicate_recipients_get_one_copy(mailerd_factory):
    m = mailerd_factory()
    user = m.new_user("dup")
    with m.connect(True) as c:
        c.start(HELO)
        expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
        for rcpt in (
            f"{user}@example.org", f"{user}@EXAMPLE.ORG", f"{user}@example.net",
            "r1@remote.test", "r1@remote.test", "r1@REMOTE.test",
        ):  # fmt: skip
            expect(c.cmd(f"RCPT TO:<{rcpt}>"), 250, conn=c)
        expect(c.cmd("DATA"), 354, conn=c)
        c.send(b"Subject: once\r\n\r\nonce each\r\n.\r\n")
        expect(c.read_reply(), 250, conn=c)
    assert m.wait_messages(user, 1) == [1]
    time.sleep(0.5)
    assert m.messages(user) == [1], "the local mailbox got more than one copy"
    queued = [
        line for line in m.stderr_text().splitlines()
        if "relay=queue, status=queued" in line and "r1@remote.test" in line.lower()
    ]  # fmt: skip
    assert len(queued) == 1, queued

"""What a worker's user (`mail`), running an attacker's code in a compromised worker, must not
be able to make the rest of mailerd do (an attacker's pass at the privilege separation: each
test here failed before its fix). The workers speak to the Internet as `mail`, who owns
<queue>/public, env/ and private/ (but no longer writes Debian's spool, 2775 root:mail: the
children run in group nogroup, test_privileges; the writer's checks stay, for the mail group's
other programs); root's parts (sendmail run by cron, `mailerd queue`, the mailbox writer, the
master) meet what that user left there, or what it says, and must not take it on trust."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from mailerd import config, privileges
from mailerd import log as logsetup
from mailerd.delivery import queue as queue_module
from mailerd.delivery.queue import Queue
from mailerd.ipc import maildrop
from mailerd.lifecycle import BOOT_ERROR
from mailerd.master.arbiter import Child, Master
from mailerd.writer import mailbox as mailbox_module
from mailerd.writer.mailbox import Copy, MailboxStore, MailboxUnsafe

# -- sendmail's poke: root writes only to the pickup FIFO, never through a link ------------


def _public(tmp_path):
    public = tmp_path / maildrop.PUBLIC
    public.mkdir()
    return public


def test_poke_does_not_write_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    (_public(tmp_path) / maildrop.PICKUP_FIFO).symlink_to(victim)
    assert maildrop.poke(str(tmp_path)) is False
    assert victim.read_bytes() == b"root:x:0:0:root:/root:/bin/bash\n"


def test_poke_does_not_write_to_a_regular_file_or_hard_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret\n")
    os.link(victim, _public(tmp_path) / maildrop.PICKUP_FIFO)
    assert maildrop.poke(str(tmp_path)) is False
    assert victim.read_bytes() == b"secret\n"


def test_poke_still_wakes_a_reader_of_the_fifo(tmp_path):
    fifo = _public(tmp_path) / maildrop.PICKUP_FIFO
    os.mkfifo(fifo, 0o622)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert maildrop.poke(str(tmp_path)) is True
        assert os.read(reader, 10) == b"!"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert maildrop.poke(str(tmp_path)) is False  # no reader: ENXIO


# -- the master: exit status 3 stops the server only from a child that never started -------


@pytest.fixture
def master(tmp_path: Path):
    cfg = config.load(
        ["-s", str(tmp_path / "spool"), "-q", str(tmp_path / "queue"), "-d", "example.org",
         "-H", "mx.example.org", "-l", "none", "-n", "none", "-w", "2"]
    )  # fmt: skip
    delivery = socket.socket(socket.AF_UNIX)
    yield Master(cfg, [], delivery)
    delivery.close()


def _status(code: int) -> int:
    return code << 8  # (a waitpid status for exit(code))


def test_a_ready_worker_exiting_with_boot_error_does_not_stop_the_server(master):
    child = Child("worker", 1, time.monotonic() - 3600, master.generation, ready=True)
    master._child_exited(4242, child, _status(BOOT_ERROR))
    assert not master.stopping
    assert ("worker", 1) in master.due  # respawned, as after any crash


def test_a_worker_that_cannot_start_still_stops_the_server(master):
    child = Child("worker", 1, time.monotonic(), master.generation, ready=False)
    master._child_exited(4242, child, _status(BOOT_ERROR))
    assert master.stopping
    assert master.exit_code == 1


# -- the mailbox writer: a directory swapped in as a mailbox is made is not given away -----

MAIL_UID = pwd.getpwnam("mail").pw_uid
NOBODY = pwd.getpwnam("nobody")
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the writer chowns only as root")


def _root_mailbox(spool):
    victim = spool / "root"
    victim.mkdir(mode=0o700)
    (victim / "1").write_bytes(b"root's mail\r\n")
    return victim


@AS_ROOT
def test_a_directory_swapped_in_after_the_mkdir_is_not_given_away(tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    victim = _root_mailbox(spool)
    real_mkdir = os.mkdir

    def mkdir_then_swap(name, mode=0o777, *, dir_fd=None):
        real_mkdir(name, mode, dir_fd=dir_fd)
        if name == "nobody":  # the mail user's rename(2), won between mkdir and open
            os.rename("root", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    monkeypatch.setattr(mailbox_module.os, "mkdir", mkdir_then_swap)
    store = MailboxStore(spool, untrusted_uid=MAIL_UID)
    with pytest.raises(OSError):
        store.deliver("nobody", [Copy(b"", b"x\r\n")])
    monkeypatch.undo()
    swapped = spool / "nobody"
    assert (swapped / "1").read_bytes() == b"root's mail\r\n"  # (it was root's directory)
    assert os.stat(swapped).st_uid == 0, "root's mailbox was chowned to the account"
    assert not victim.exists()


@AS_ROOT
def test_no_mailbox_is_made_for_mailerds_own_user(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    store = MailboxStore(spool, untrusted_uid=MAIL_UID)
    with pytest.raises(MailboxUnsafe):
        store.deliver("mail", [Copy(b"", b"x\r\n")])
    assert not (spool / "mail").exists()


@AS_ROOT
def test_a_new_mailbox_still_goes_to_its_account(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    store = MailboxStore(spool, untrusted_uid=MAIL_UID)
    assert store.deliver("nobody", [Copy(b"", b"x\r\n")]) == [1]
    assert os.stat(spool / "nobody").st_uid == NOBODY.pw_uid


# -- mailerd queue (root) reads env/ without following links or hanging --------------------


@pytest.fixture
def queue(tmp_path):
    q = Queue(tmp_path / "queue")
    q.create_dirs()
    return q


class Hung(BaseException):  # (not an OSError: the reader must not take it for one)
    pass


def _alarm(seconds):
    def ring(*_):
        raise Hung("the read hung")

    signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)


def test_a_link_to_a_fifo_in_env_does_not_hang_a_reader(queue, tmp_path):
    os.mkfifo(tmp_path / "trap")
    os.symlink(tmp_path / "trap", queue.root / "env" / "1L97AAAAAAAAAAAAA")
    _alarm(5)
    try:
        assert queue.load(clean=False) == []
    finally:
        signal.alarm(0)
    assert "1L97AAAAAAAAAAAAA" in queue.unreadable


def test_a_link_to_another_file_is_not_read(queue, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(
        '{"id": "the root-only secret", "sender": "", "recipients": [], "created": 1.0}'
    )
    os.symlink(secret, queue.root / "env" / "1L97BBBBBBBBBBBBB")
    assert queue.load(clean=False) == []
    assert "the root-only secret" not in queue.unreadable["1L97BBBBBBBBBBBBB"]


# -- root's start-up in the queue: no second name of another file is chmod'ed or chowned -----
# (Where fs.protected_hardlinks is off, the children's user may link any file into a
# directory it owns; root makes such links in these tests, as it may anyway.)


@AS_ROOT
def test_a_hard_link_put_at_the_pickup_fifo_as_it_is_made_is_not_chmoded(tmp_path, monkeypatch):
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)

    def link_instead(name, mode=0o666, *, dir_fd=None):  # (the swap, won after the mkfifo)
        os.link(victim, name, dst_dir_fd=dir_fd)

    monkeypatch.setattr(queue_module.os, "mkfifo", link_instead)
    with pytest.raises(OSError):
        Queue(tmp_path / "queue").create_dirs()
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600


@AS_ROOT
def test_only_single_named_files_of_the_queue_are_handed_to_the_children(tmp_path):
    q = Queue(tmp_path / "queue")
    q.create_dirs()
    elsewhere = tmp_path / "root's fifo"
    os.mkfifo(elsewhere, 0o600)
    os.link(elsewhere, q.root / maildrop.PUBLIC / "second-name")
    victim = tmp_path / "root's file"
    victim.write_text("x")
    os.link(victim, q.root / "env" / "1L97CCCCCCCCCCCCC")
    privileges.prepare_queue(q.root, "mail")
    assert os.stat(elsewhere).st_uid == 0 and os.stat(victim).st_uid == 0
    fifo = q.root / maildrop.PUBLIC / maildrop.PICKUP_FIFO
    assert os.stat(fifo).st_uid == MAIL_UID  # (the queue's own are handed over)


@AS_ROOT
def test_a_file_that_is_another_files_last_name_is_not_handed_over(tmp_path, monkeypatch):
    """Where protected_hardlinks is off, mail links a file of root's into env/ and waits for
    root to replace the original by a rename (passwd rewrites /etc/shadow so): the planted name
    is then the old file's only one, and one link proves nothing (a reviewer's pass)."""
    monkeypatch.setattr(privileges, "_links_guarded", lambda: False)
    q = Queue(tmp_path / "queue")
    q.create_dirs()
    shadow = tmp_path / "shadow"
    shadow.write_text("root:old hash\n")
    shadow.chmod(0o600)
    old = os.open(shadow, os.O_RDONLY)
    try:
        os.link(shadow, q.root / "env" / "1L97DDDDDDDDDDDDD")
        (tmp_path / "shadow+").write_text("root:new hash\n")
        os.replace(tmp_path / "shadow+", shadow)
        assert os.fstat(old).st_nlink == 1
        privileges.prepare_queue(q.root, "mail")
        assert os.fstat(old).st_uid == 0, "root's old file was given to mail"
    finally:
        os.close(old)
    fifo = q.root / maildrop.PUBLIC / maildrop.PICKUP_FIFO
    assert os.stat(fifo).st_uid == MAIL_UID  # (the queue's own are handed over)
    lock = os.stat(q.scheduler_lock)  # (left root's, but the scheduler, as mail, can flock it)
    assert lock.st_uid == MAIL_UID or lock.st_mode & 0o004


@AS_ROOT
def test_no_second_name_of_a_file_is_the_log_or_the_pickup_fifo(tmp_path):
    """The log file (its directory the operator's choice: one the children's user may write)
    and the pickup FIFO: a hard link there to a file or FIFO of root's is neither appended
    to, chowned nor written to by root (where protected_hardlinks is off, mail can make one)."""
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)
    logfile = tmp_path / "mailerd.log"
    os.link(victim, logfile)
    with pytest.raises(OSError):
        logsetup.ReopeningFileHandler(logfile)._open()
    with pytest.raises(OSError):
        privileges.chown_path(logfile, "mail", 0o640)
    st = os.stat(victim)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), victim.read_text()) == (0, 0o600, "root:secret\n")
    roots_fifo = tmp_path / "root's fifo"
    os.mkfifo(roots_fifo, 0o600)
    reader = os.open(roots_fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.link(roots_fifo, _public(tmp_path) / maildrop.PICKUP_FIFO)
        assert maildrop.poke(str(tmp_path)) is False
        assert os.read(reader, 10) == b""  # (nothing was written: no writer, no data)
    finally:
        os.close(reader)

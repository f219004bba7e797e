"""The spool contract: numbering, counter, status files, lockf between processes, durability."""

import errno
import fcntl
import multiprocessing
import os
import pwd
import threading
from pathlib import Path

import pytest

from mailerd import recipients
from mailerd.log import Throttle
from mailerd.spool import MailboxLocked, Spool
from mailerd.writer.mailbox import Copy, MailboxStore, MailboxUnsafe, next_number


def messages(spool_dir):
    return sorted(int(n) for n in os.listdir(spool_dir) if n.isdigit())


def test_numbers_start_at_one_with_recent_status(tmp_path):
    spool = MailboxStore(tmp_path)
    assert spool.deliver("bob", [Copy(b"H: 1\r\n", b"one\r\n")]) == [1]
    assert spool.deliver("bob", [Copy(b"", b"two\r\n"), Copy(b"", b"three\r\n")]) == [2, 3]
    box = tmp_path / "bob"
    assert (box / "1").read_bytes() == b"H: 1\r\none\r\n"
    assert (box / "3").read_bytes() == b"three\r\n"
    assert (box / "2.status").read_bytes() == b"\\Recent\n"
    assert oct((box / "1").stat().st_mode & 0o777) == "0o600"
    assert oct(box.stat().st_mode & 0o777) == "0o700"
    assert not [n for n in os.listdir(box) if n.startswith(".tmp")]


def test_numbers_never_reused_after_newest_deleted(tmp_path):
    spool = MailboxStore(tmp_path)
    spool.deliver("bob", [Copy(b"", b"x")] * 3)
    os.unlink(tmp_path / "bob" / "3")
    os.unlink(tmp_path / "bob" / "3.status")
    assert spool.deliver("bob", [Copy(b"", b"x")]) == [4]


def test_hand_made_mailbox_continues_from_largest(tmp_path):
    box = tmp_path / "carol"
    box.mkdir()
    for n in (1, 7, 3):
        (box / str(n)).write_bytes(b"old")
    assert MailboxStore(tmp_path).deliver("carol", [Copy(b"", b"new")]) == [8]


def test_crash_leftovers_heal(tmp_path):
    spool = MailboxStore(tmp_path)
    spool.deliver("bob", [Copy(b"", b"x")])
    box = tmp_path / "bob"
    # A crash after renaming message 2 but before the counter moved, and an orphan 3.status.
    (box / "2").write_bytes(b"committed")
    (box / "3.status").write_bytes(b"stale")
    (box / ".counter").write_bytes(b"garbage")
    fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert next_number(fd) == 3
    finally:
        os.close(fd)
    assert spool.deliver("bob", [Copy(b"", b"y")]) == [3]
    assert (box / "3.status").read_bytes() == b"\\Recent\n"


def test_body_from_a_descriptor(tmp_path):
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR)
    os.write(fd, b"A" * 3_000_000)
    try:
        MailboxStore(tmp_path).deliver("big", [Copy(b"Head\r\n", fd), Copy(b"", fd)])
    finally:
        os.close(fd)
    assert (tmp_path / "big" / "1").read_bytes() == b"Head\r\n" + b"A" * 3_000_000
    assert (tmp_path / "big" / "2").stat().st_size == 3_000_000


def test_exists(tmp_path):
    spool = Spool(tmp_path)
    (tmp_path / "dave").mkdir()
    assert spool.exists("dave") and spool.exists("postmaster") and spool.exists("root")
    assert not spool.exists("nobody-here-xyz")


def test_state_through_a_kept_directory(tmp_path):
    """A worker reaches the spool as /proc/self/fd/N (privileges.keep_dir); state() looks
    names up below it, as it would through the path."""
    (tmp_path / "dave").mkdir()
    (tmp_path / "mbox").write_bytes(b"")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        spool = Spool(Path(f"/proc/self/fd/{fd}"))
        assert [spool.state(n) for n in ("dave", "mbox", "nobody-here-xyz", "postmaster")] == [
            "ok",
            "not-a-directory",
            "unknown",
            "ok",
        ]
        (tmp_path / "erin").mkdir()  # made after the first lookup: seen
        assert spool.state("erin") == "ok"
    finally:
        os.close(fd)


class BrokenSpool(Spool):
    def state(self, name: str, *, cached_only: bool = False) -> str:
        raise OSError(errno.EIO, "Input/output error", name)


def test_a_mailbox_problem_is_logged_once_a_minute(tmp_path, monkeypatch, caplog):
    """Every RCPT for a mailbox that is a file (or cannot be checked) meets its problem, and
    a client may repeat those deferrals a thousand times a session before they count as its
    errors: the log says each problem once a minute in a process, not once a RCPT."""
    now = [1000.0]
    monkeypatch.setattr(recipients, "_REPORTS", Throttle(60.0, clock=lambda: now[0]))
    (tmp_path / "mbox").write_bytes(b"")
    (tmp_path / "other").write_bytes(b"")
    spool, broken, path = Spool(tmp_path), BrokenSpool(tmp_path), str(tmp_path)

    def said(what: str) -> int:
        return sum(what in record.getMessage() for record in caplog.records)

    for n in range(100):
        assert recipients.check_mailbox(spool, path, "mbox") is recipients.MAILBOX_NOT_A_DIRECTORY
        assert recipients.check_mailbox(broken, path, f"made-up{n}") is recipients.CHECK_FAILED
    assert recipients.check_mailbox(spool, path, "other") is recipients.MAILBOX_NOT_A_DIRECTORY
    assert (said("mbox is a file"), said("other is a file"), said("cannot check")) == (1, 1, 1)
    now[0] += 59
    recipients.check_mailbox(spool, path, "mbox")
    assert said("mbox is a file") == 1
    now[0] += 2
    recipients.check_mailbox(spool, path, "mbox")
    recipients.check_mailbox(broken, path, "made-up")
    assert (said("mbox is a file"), said("cannot check")) == (2, 2)


def test_lock_held_elsewhere_times_out(tmp_path):
    spool = MailboxStore(tmp_path, lock_timeout=0.2)
    spool.deliver("bob", [Copy(b"", b"x")])
    ready, release = multiprocessing.Event(), multiprocessing.Event()

    def hold():
        fd = os.open(tmp_path / "bob" / ".lock", os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        ready.set()
        release.wait(10)

    holder = multiprocessing.Process(target=hold)
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(MailboxLocked):
            spool.deliver("bob", [Copy(b"", b"y")])
    finally:
        release.set()
        holder.join(10)
    assert spool.deliver("bob", [Copy(b"", b"y")]) == [2]


def _deliver_many(root, count):
    spool = MailboxStore(root)
    for _i in range(count):
        spool.deliver("shared", [Copy(b"", b"%d\r\n" % os.getpid())])


def test_processes_serialise_on_lockf(tmp_path):
    procs = [multiprocessing.Process(target=_deliver_many, args=(tmp_path, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    box = tmp_path / "shared"
    assert messages(box) == list(range(1, 101))
    assert all((box / f"{n}.status").exists() for n in range(1, 101))


@pytest.mark.parametrize("how", ["aio", "threads"])
def test_disk_errors_leave_nothing_visible(tmp_path, monkeypatch, how):
    from mailerd import aiofsync

    spool = MailboxStore(tmp_path)
    spool.deliver("bob", [Copy(b"", b"x")])
    real_aio = aiofsync.fsync_all

    def failing_aio(fds):
        if how == "threads":
            raise aiofsync.Unavailable(38, "not here")
        real_aio(fds)
        raise OSError(28, "No space left on device")  # one of them failed

    monkeypatch.setattr(aiofsync, "fsync_all", failing_aio)
    real_fsync = os.fsync
    calls = []
    lock = threading.Lock()

    def failing_fsync(fd):
        with lock:  # fsyncs of one batch run in several threads
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        spool.deliver("bob", [Copy(b"", b"y")])
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(aiofsync, "fsync_all", real_aio)
    box = tmp_path / "bob"
    assert messages(box) == [1]
    assert not [n for n in os.listdir(box) if n.startswith(".tmp")]
    assert spool.deliver("bob", [Copy(b"", b"z")]) == [2]


# -- the mailbox writer runs as root: nothing in a mailbox may redirect its writes ------------


def test_symlinked_lock_is_not_followed(tmp_path):
    spool = MailboxStore(tmp_path / "spool")
    (tmp_path / "spool").mkdir()
    box = tmp_path / "spool" / "eve"
    box.mkdir()
    target = tmp_path / "created_by_writer"
    os.symlink(target, box / ".lock")
    with pytest.raises(OSError):
        spool.deliver("eve", [Copy(b"", b"x")])
    assert not target.exists()
    assert not [n for n in os.listdir(box) if n.startswith(".tmp")]


def test_fifo_counter_neither_blocks_nor_counts(tmp_path):
    spool = MailboxStore(tmp_path)
    box = tmp_path / "eve"
    box.mkdir()
    os.mkfifo(box / ".counter")
    (box / "4").write_bytes(b"old")
    # Would block forever (as root, holding the lock) if the FIFO were opened for reading.
    assert spool.deliver("eve", [Copy(b"", b"x")]) == [5]


def test_symlinked_mailbox_is_refused(tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    elsewhere = tmp_path / "rootonly"
    elsewhere.mkdir()
    os.symlink(elsewhere, spool_dir / "daemon")
    with pytest.raises(MailboxUnsafe):
        MailboxStore(spool_dir).deliver("daemon", [Copy(b"", b"x")])
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "UPPER", "x+tag", ""])
def test_names_are_checked_by_the_writer_too(tmp_path, name):
    with pytest.raises(MailboxUnsafe):
        MailboxStore(tmp_path).deliver(name, [Copy(b"", b"x")])


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root")
def test_account_mailbox_with_a_foreign_owner_is_refused(tmp_path):
    daemon = pwd.getpwnam("daemon")
    nobody = pwd.getpwnam("nobody")
    box = tmp_path / "daemon"
    box.mkdir()
    os.chown(box, nobody.pw_uid, nobody.pw_gid)  # planted by someone else
    with pytest.raises(MailboxUnsafe):
        MailboxStore(tmp_path).deliver("daemon", [Copy(b"", b"x")])
    os.chown(box, daemon.pw_uid, daemon.pw_gid)
    assert MailboxStore(tmp_path).deliver("daemon", [Copy(b"", b"x")]) == [1]
    lock = os.stat(box / ".lock")
    assert (lock.st_uid, lock.st_gid) == (daemon.pw_uid, daemon.pw_gid)  # the IMAP side can lock
    assert os.stat(box / "1").st_uid == daemon.pw_uid


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root")
def test_mailbox_owned_by_mailerds_own_user_is_refused(tmp_path):
    mail = pwd.getpwnam("mail")
    box = tmp_path / "virtual"
    box.mkdir()
    os.chown(box, mail.pw_uid, mail.pw_gid)
    with pytest.raises(MailboxUnsafe):
        MailboxStore(tmp_path, untrusted_uid=mail.pw_uid).deliver("virtual", [Copy(b"", b"x")])


def test_a_failed_counter_update_does_not_fail_committed_messages(tmp_path, monkeypatch):
    from mailerd.writer import mailbox

    spool = MailboxStore(tmp_path)
    spool.deliver("bob", [Copy(b"", b"x")])

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mailbox, "_store_counter", full_disk)
    # Renamed into place before the counter: reported as delivered, not failed (no duplicate).
    assert spool.deliver("bob", [Copy(b"", b"y"), Copy(b"", b"z")]) == [2, 3]
    monkeypatch.undo()
    assert spool.deliver("bob", [Copy(b"", b"w")]) == [4]  # the stale counter healed


def test_counter_is_updated_in_place_but_never_written_through_a_planted_file(tmp_path):
    spool = MailboxStore(tmp_path)
    assert spool.deliver("bob", [Copy(b"", b"x")] * 9) == list(range(1, 10))
    box = tmp_path / "bob"
    inode = os.stat(box / ".counter").st_ino
    assert spool.deliver("bob", [Copy(b"", b"y")]) == [10]
    assert (box / ".counter").read_bytes() == b"10\n"
    assert os.stat(box / ".counter").st_ino == inode  # overwritten, not replaced
    # A hard link (to a file elsewhere) or a longer text is replaced, never written through.
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious\n")
    (box / ".counter").unlink()
    os.link(outside, box / ".counter")
    assert spool.deliver("bob", [Copy(b"", b"z")]) == [11]
    assert outside.read_bytes() == b"precious\n"
    assert (box / ".counter").read_bytes() == b"11\n"
    (box / ".counter").write_bytes(b"11\n# a note\n")
    assert spool.deliver("bob", [Copy(b"", b"w")]) == [12]
    assert (box / ".counter").read_bytes() == b"12\n"


def test_a_redelivery_already_there_is_not_written_twice(tmp_path):
    """A copy from the queue after a crash (mailbox.Copy.since): if a message starting
    with the same bytes was committed since then, its number comes back and nothing is added."""
    import time

    spool = MailboxStore(tmp_path)
    head = b"Return-Path: <a@b.example>\r\n"
    body = b"Received: by mx (mailerd, from userid 0)\r\n\tid QUEUEID1; date\r\n\r\nx\r\n"
    since = time.time()
    assert spool.deliver("bob", [Copy(head, b"other\r\n"), Copy(head, body)]) == [1, 2]
    assert spool.deliver("bob", [Copy(head, b"later\r\n")]) == [3]
    # the redelivery finds message 2; a plain delivery of the same bytes is a new message
    assert spool.deliver("bob", [Copy(head, body, since)]) == [2]
    assert messages(tmp_path / "bob") == [1, 2, 3]
    batch = [Copy(head, b"new\r\n", since), Copy(head, body, since), Copy(head, body)]
    assert spool.deliver("bob", batch) == [4, 2, 5]
    assert messages(tmp_path / "bob") == [1, 2, 3, 4, 5]
    assert not [n for n in os.listdir(tmp_path / "bob") if n.startswith(".tmp")]
    assert (tmp_path / "bob" / ".counter").read_text().strip() == "5"
    # a message older than the redelivery's own time is not it (it was never delivered since)
    old = since - 3600
    for n in (2, 5):
        os.utime(tmp_path / "bob" / str(n), (old, old))
    assert spool.deliver("bob", [Copy(head, body, since)]) == [6]


def test_a_redelivery_must_match_the_whole_message(tmp_path):
    """The redelivery check answers "is this message there", never "does a message start with
    these octets": a prefix let an attacker's pass (a compromised mail user, which cannot open
    the mailbox) read a user's mail an octet at a time."""
    import time

    spool = MailboxStore(tmp_path)
    secret = b"Subject: the door code is 4711\r\n\r\nbody\r\n"
    since = time.time()
    assert spool.deliver("bob", [Copy(b"", secret)]) == [1]
    for guess in (secret[:9], secret[:-1], secret + b"x", secret[:-1] + b"X"):
        number = spool.deliver("bob", [Copy(b"", guess, since)])
        assert number != [1], guess
    assert spool.deliver("bob", [Copy(b"", secret, since)]) == [1]
    # a body from a descriptor is compared the same way, head and all
    body = tmp_path / "body"
    body.write_bytes(secret[9:])
    fd = os.open(body, os.O_RDONLY)
    try:
        assert spool.deliver("bob", [Copy(secret[:9], fd, since)]) == [1]
        assert spool.deliver("bob", [Copy(secret[:8], fd, since)]) not in ([1], [])
    finally:
        os.close(fd)


def _daemons_mailbox(tmp_path: Path) -> tuple[pwd.struct_passwd, Path]:
    """The account `daemon` and its mailbox, made under tmp_path/spool and given to it."""
    daemon = pwd.getpwnam("daemon")
    box = tmp_path / "spool" / "daemon"
    box.mkdir(parents=True)
    os.chown(box, daemon.pw_uid, daemon.pw_gid)
    return daemon, box


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root")
def test_a_hard_linked_lock_is_replaced_never_chowned(tmp_path):
    """A user who hard-links her mailbox's .lock to a file of root's must not get that file
    (the writer gives the lock to the mailbox's owner)."""
    daemon, box = _daemons_mailbox(tmp_path)
    precious = tmp_path / "spool" / "shadow"  # (same file system: a hard link needs it)
    precious.write_bytes(b"root's secret\n")
    os.chmod(precious, 0o600)
    os.link(precious, box / ".lock")
    assert MailboxStore(tmp_path / "spool").deliver("daemon", [Copy(b"", b"x")]) == [1]
    st = os.stat(precious)
    assert (st.st_uid, st.st_gid, st.st_nlink) == (0, 0, 1)
    assert precious.read_bytes() == b"root's secret\n"
    lock = os.stat(box / ".lock")
    assert (lock.st_uid, lock.st_nlink) == (daemon.pw_uid, 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root")
def test_a_lock_that_is_another_files_last_name_is_replaced_never_chowned(tmp_path):
    """Where protected_hardlinks is off, a user links a file of root's at her .lock and waits
    for root to replace the original by a rename (passwd rewrites /etc/shadow so): the planted
    name is then the old file's only one, and one link proves nothing (a reviewer's pass)."""
    daemon, box = _daemons_mailbox(tmp_path)
    shadow = tmp_path / "spool" / "shadow"  # (same file system: a hard link needs it)
    shadow.write_bytes(b"root:old hash\n")
    os.chmod(shadow, 0o600)
    old = os.open(shadow, os.O_RDONLY)
    try:
        os.link(shadow, box / ".lock")
        (tmp_path / "spool" / "shadow+").write_bytes(b"root:new hash\n")
        os.replace(tmp_path / "spool" / "shadow+", shadow)  # (the original, renamed over)
        assert os.fstat(old).st_nlink == 1
        assert MailboxStore(tmp_path / "spool").deliver("daemon", [Copy(b"", b"x")]) == [1]
        st = os.fstat(old)
        assert (st.st_uid, st.st_gid) == (0, 0), "root's old file was given to the user"
    finally:
        os.close(old)
    lock = os.stat(box / ".lock")
    assert (lock.st_uid, lock.st_nlink, lock.st_size) == (daemon.pw_uid, 1, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root")
def test_a_mailbox_replaced_as_it_is_made_is_not_given_away(tmp_path, monkeypatch):
    """The spool is group-writable for mail: a directory put in place of the one the writer
    has just made (mkdir, then open) is neither chowned to the user nor written."""
    from mailerd.writer import mailbox

    daemon = pwd.getpwnam("daemon")
    nobody = pwd.getpwnam("nobody")
    made = os.mkdir

    def swapped(name, mode=0o777, *, dir_fd=None):
        made(name, mode, dir_fd=dir_fd)
        os.rmdir(name, dir_fd=dir_fd)  # the attacker's turn, between mkdir and open
        made(name, 0o777, dir_fd=dir_fd)
        os.chown(name, nobody.pw_uid, nobody.pw_gid, dir_fd=dir_fd)
        os.chmod(name, 0o777, dir_fd=dir_fd)

    monkeypatch.setattr(mailbox.os, "mkdir", swapped)
    with pytest.raises(MailboxUnsafe):
        MailboxStore(tmp_path).deliver("daemon", [Copy(b"", b"x")])
    st = os.stat(tmp_path / "daemon")
    assert (st.st_uid, st.st_mode & 0o7777) == (nobody.pw_uid, 0o777)
    assert os.listdir(tmp_path / "daemon") == []
    monkeypatch.undo()
    os.rmdir(tmp_path / "daemon")
    os.chmod(tmp_path, 0o2775)  # Debian's /var/mail: its set-group-ID bit is not passed on
    assert MailboxStore(tmp_path).deliver("daemon", [Copy(b"", b"x")]) == [1]
    st = os.stat(tmp_path / "daemon")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (daemon.pw_uid, daemon.pw_gid, 0o700)


def test_planted_look_alikes_cost_a_redelivery_a_few_comparisons(tmp_path, monkeypatch):
    """A user can fill her mailbox with files of a redelivery's size and head that differ at
    the last octet (an attacker's pass made root compare 2000 files of 2 MB for each copy):
    a copy may cost MAX_COMPARED times its size (and 1 MiB) in comparisons, then it is
    written again."""
    import time

    from mailerd.writer import mailbox

    spool = MailboxStore(tmp_path)
    head = b"Return-Path: <a@b.example>\r\nReceived: by mx; id QUEUEID9\r\n"
    body = b"z" * 2_000_000 + b"\r\n"
    since = time.time()
    assert spool.deliver("bob", [Copy(b"", b"first\r\n")]) == [1]
    for n in range(2, 12):
        (tmp_path / "bob" / str(n)).write_bytes(head + body[:-3] + b"!\r\n")
    compared = []
    real = mailbox._same_octets

    def counted(*args):
        compared.append(args)
        return real(*args)

    monkeypatch.setattr(mailbox, "_same_octets", counted)
    assert spool.deliver("bob", [Copy(head, body, since)]) == [12]
    assert len(compared) == 4  # 3 x 2 MB + 1 MiB: the fourth goes past it
    compared.clear()
    assert spool.deliver("bob", [Copy(head, body, since)]) == [12]  # the newest: found at once
    assert len(compared) == 1

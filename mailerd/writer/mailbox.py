"""Writing mailboxes: `<spool>/<user>/<N>` and `<N>.status`, numbered under a lockf lock.
Only the mailbox writer (root) does this; everything else reads the spool through `spool`.

Contract (an IMAP server reads it):
- N = 1, 2, 3 … in order of reception, never reused: the last N is kept in `<user>/.counter`;
  a mailbox without a counter (made by hand) continues from its largest N.
- `<N>.status` holds the IMAP flags on one line; a new message's is `\\Recent`.
- Every writer and reader serialises on `lockf` of `<user>/.lock`. (A directory descriptor
  cannot take a lockf lock — lockf needs a descriptor open for writing — hence the file.)
- Durability: each file is written under a temporary name and fsync'd, renamed into place under
  the lock (status first, message last: the message's rename is the commit point), the counter
  is updated, and the directory is fsync'd once for the whole batch before anyone hears "done".
- Temporary names carry the writer's pid (`.tmp.<pid>.<n>`, `.counter.tmp<pid>`): what a crashed
  writer left is removed by the next writer that opens the mailbox (`MailboxStore.sweep`).

POSIX locks belong to the process, not the thread, so within one process the caller must make
sure only one thread works on a given mailbox at a time (delivery does, with one writer task per
mailbox); across processes and mailerd instances lockf does the work.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mailerd import durable, names
from mailerd.spool import COUNTER_NAME, LOCK_NAME, MailboxLocked, account_owner

log = logging.getLogger("mailerd.mailbox")

NEW_FLAGS = b"\\Recent\n"


@dataclass(frozen=True)
class Copy:
    """A copy of a message for one mailbox: the headers to prepend and the body.

    `since` marks a redelivery (from the queue, after a crash or an attempt whose outcome was
    lost): if a message of the same octets (its Return-Path: and Received: name its queue id
    and date) was committed since then, it is that message's number that is returned, and
    nothing is written twice."""

    head: bytes
    body: durable.Body
    since: float | None = None
    # A descriptor's body: octets copied at most (the size the writer checked it had: the
    # file's owner may enlarge it after the check).
    limit: int | None = None


class MailboxUnsafe(OSError):
    """The mailbox is not a plain directory we may write (a symlink, a file, a wrong owner)."""


_sequence = itertools.count(1)

# What a write cut short leaves: a staged message or status (`_stage`), a counter being
# replaced (durable.replace_synced). The group is the pid of the process that made it.
_TEMPORARY = re.compile(r"\.tmp\.(\d+)\.\d+(?:\.status)?|\.counter\.tmp(\d+)", re.ASCII)
SWEPT_LIMIT = 10000  # mailboxes remembered as swept (names come from the network: bounded)

# Every open inside a mailbox: never follow a link, never block on a FIFO.
_SAFE = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class MailboxStore:
    """The spool root, for writing. `deliver()` runs as root in the mailbox writer, so
    everything below the root is reached through directory descriptors and opened with
    O_NOFOLLOW: a user (or a program of the mail group, which may write Debian's group-writable
    spool) cannot turn a symlink, a FIFO or a planted directory into a root write elsewhere."""

    def __init__(self, root: Path, lock_timeout: float = 60.0, untrusted_uid: int | None = None):
        self.root = root
        self.lock_timeout = lock_timeout
        self.untrusted_uid = untrusted_uid  # mailerd's own unprivileged user: never a mailbox owner
        self._swept: set[str] = set()  # mailboxes whose leftovers this process has removed

    def deliver(self, name: str, messages: list[Copy], *, wait: bool = True) -> list[int]:
        """Store messages in mailbox `name`, durably, in order; return their numbers.

        Raises OSError (MailboxUnsafe, or MailboxLocked) if nothing of the batch was committed.
        With `wait=False` a lock held by someone else raises MailboxLocked at once, before
        anything is written (the caller tries again later, `service.MailboxQueue`).
        """
        if names.mailbox_name(name) != name:
            raise MailboxUnsafe(errno.EINVAL, f"not a mailbox name: {name!r}")
        directory = self._open_mailbox(name)
        try:
            if name not in self._swept:
                self.sweep(name, directory)
            owner = _owner_of(directory)
            lock_fd = _open_lock(directory, owner)
            try:
                if not wait:  # (staging is the costly part: not for a lock held elsewhere)
                    self._lock(lock_fd, wait=False)
                    fcntl.lockf(lock_fd, fcntl.LOCK_UN)  # (taken again to commit: see _commit)
                staged = self._stage(directory, owner, messages)
                return self._commit(directory, lock_fd, owner, messages, staged, wait)
            finally:
                os.close(lock_fd)  # closing releases the lockf lock
        finally:
            os.close(directory)

    def sweep(self, name: str, directory: int) -> None:
        """Remove the temporary files that writes cut short by a crash (a writer killed) left
        in mailbox `name`; once per mailbox in this process's life, the first time it writes
        there. A file is stale when no process has the pid its name carries: a live writer's
        (another mailerd's on this spool, a retiring one's after a reload) is never touched.
        (A pid reused since only keeps a leftover for longer. Writers sharing a spool are
        assumed to share a pid namespace, as mailerd instances on one machine do.)"""
        if len(self._swept) >= SWEPT_LIMIT:
            self._swept.clear()  # (each mailbox is then looked at once more: harmless)
        self._swept.add(name)
        stale = [n for n in os.listdir(directory) if _left_by_the_dead(n)]
        for leftover in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover, dir_fd=directory)
        if stale:
            log.info("mailbox %s: removed %d file(s) left by a crashed write", name, len(stale))

    def _stage(self, directory: int, owner: Owner, messages: list[Copy]) -> list[str]:
        """Write each message and its status under temporary names; fsync them all at once."""
        staged: list[str] = []
        fds: list[int] = []
        prefix = f".tmp.{os.getpid()}."
        try:
            for message in messages:
                tmp = f"{prefix}{next(_sequence)}"
                staged.append(tmp)
                fds.append(durable.write_new(tmp + ".status", NEW_FLAGS, b"", owner, directory))
                fds.append(
                    durable.write_new(
                        tmp, message.head, message.body, owner, directory, message.limit
                    )
                )
            durable.fsync_all(fds)
        except BaseException:
            _discard(directory, staged)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return staged

    def _commit(
        self,
        directory: int,
        lock_fd: int,
        owner: Owner,
        messages: list[Copy],
        staged: list[str],
        wait: bool,
    ) -> list[int]:
        """Under the lock: number the staged messages, rename them into place (status first,
        the message last: the commit point), update the counter, fsync the directory. A
        redelivery already there gets its existing number and its staged copy is dropped."""
        try:
            self._lock(lock_fd, wait)
            numbers = delivered(directory, messages)
            fresh = [tmp for tmp, n in zip(staged, numbers, strict=True) if n is None]
            _discard(directory, [t for t, n in zip(staged, numbers, strict=True) if n])
            if not fresh:
                return [n for n in numbers if n is not None]
            first = next_number(directory)
            new = iter(range(first, first + len(fresh)))
            numbers = [next(new) if n is None else n for n in numbers]
            for tmp, number in zip(staged, numbers, strict=True):
                if tmp in fresh:
                    _rename(directory, tmp + ".status", f"{number}.status")
                    _rename(directory, tmp, str(number))
            # The counter is a hint (next_number() heals a stale one), so it is not fsync'd,
            # and failing to update it (a full disk) must not fail messages already renamed
            # into place: that would have them delivered twice.
            try:
                _store_counter(directory, first + len(fresh) - 1, owner)
            except OSError as exc:
                log.warning("mailbox counter not updated (%s); it heals on the next one", exc)
            os.fsync(directory)
            return [n for n in numbers if n is not None]
        except BaseException:
            _discard(directory, staged)
            raise

    def _lock(self, fd: int, wait: bool = True) -> None:
        # Non-blocking attempts with back-off, so an IMAP server sitting on the lock costs
        # this mailbox a bounded wait (then a 451 and a retry), not a stuck thread forever.
        deadline = time.monotonic() + (self.lock_timeout if wait else 0.0)
        pause = 0.001
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            if time.monotonic() >= deadline:
                raise MailboxLocked()
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _open_mailbox(self, name: str) -> int:
        """A descriptor of `<spool>/<name>`, created (0700, owned by the account) if missing.

        Refused (MailboxUnsafe) when it is a symlink or not a directory, or when its owner is
        wrong: an account's mailbox must be the account's (or root's), and no mailbox may
        belong to mailerd's own unprivileged user.
        """
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            account = account_owner(name)
            if account is not None and account[0] == self.untrusted_uid:
                # (refused below anyway, but only after _make_mailbox gave it the directory)
                raise MailboxUnsafe(errno.EPERM, f"mailbox {name}: mailerd's own user")
            try:
                directory = _open_dir(root, name)
            except FileNotFoundError:
                directory = self._make_mailbox(root, name, account)
        finally:
            os.close(root)
        st = os.fstat(directory)
        wrong_for_account = account is not None and st.st_uid not in (account[0], 0)
        if wrong_for_account or st.st_uid == self.untrusted_uid:
            os.close(directory)
            raise MailboxUnsafe(
                errno.EPERM, f"mailbox {name} has the wrong owner (uid {st.st_uid})"
            )
        return directory

    def _make_mailbox(self, root: int, name: str, account: Owner) -> int:
        """Create `<spool>/<name>` and give it to the account, 0700.

        Only a directory that is still root's once opened is given away: the spool is
        group-writable for mail (Debian's /var/mail), so between the mkdir and the open a program
        of that group could put a directory of its own in its place (an attacker's pass
        won that race and had its 0777 directory chowned to the user), and one made by someone
        else at the same moment is left as it is (the owner check in _open_mailbox judges it).
        """
        try:
            os.mkdir(name, 0o700, dir_fd=root)
        except FileExistsError:
            return _open_dir(root, name)
        directory = _open_dir(root, name)
        if os.geteuid() == 0:
            st = os.fstat(directory)
            # Another root-owned directory renamed to the name in between (root's or
            # postmaster's mailbox, by the mail user, who may write the spool) is root's too,
            # but not empty: only the directory just made, still empty, is given away.
            if st.st_uid != 0 or os.listdir(directory):
                os.close(directory)
                raise MailboxUnsafe(
                    errno.EPERM, f"mailbox {name} was replaced as it was made (uid {st.st_uid})"
                )
            if account is not None:
                os.fchown(directory, *account)
            os.fchmod(directory, 0o700)  # (no set-group-ID bit from Debian's 2775 spool)
        os.fsync(root)
        return directory


Owner = tuple[int, int] | None


def _open_dir(parent: int, name: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | _SAFE, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise MailboxUnsafe(exc.errno, f"mailbox {name} is not a directory") from exc
        raise


def _open_lock(directory: int, owner: Owner) -> int:
    """`.lock`, created if needed and owned like the mailbox, so the user's IMAP server can
    take the same lock; a symlink or anything but a regular file is refused.

    Only a lock made here (O_EXCL: a new file, whatever name was planted) is ever chowned. An
    existing one is used as it is when it already is a plain file of the mailbox's owner with
    one name; anything else is removed and a new one made. A `.lock` with more than one link
    is a hard link the user made to some other file, and one with a single link may be one
    too: where the kernel's protected_hardlinks is off, the user links a file of root's there
    and waits until root replaces the original by a rename (passwd rewrites /etc/shadow so),
    which leaves the planted name the old file's only one (a reviewer's pass: the old shadow
    was chowned to the user). So no existing file is ever given away."""
    for _ in range(3):
        made = True
        try:
            fd = os.open(
                LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | _SAFE, 0o600, dir_fd=directory
            )
        except FileExistsError:
            made = False
            try:
                fd = os.open(LOCK_NAME, os.O_RDWR | _SAFE, dir_fd=directory)
            except FileNotFoundError:
                continue  # (removed meanwhile: made anew)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise MailboxUnsafe(errno.EPERM, "the mailbox lock is not a regular file")
        if made:
            if owner is not None:
                os.fchown(fd, *owner)
            return fd
        if st.st_nlink == 1 and (owner is None or (st.st_uid, st.st_gid) == owner):
            return fd
        os.close(fd)
        log.warning(
            "mailbox lock with %d link(s), owned by %d:%d, not the mailbox's: replaced",
            st.st_nlink,
            st.st_uid,
            st.st_gid,
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(LOCK_NAME, dir_fd=directory)
    raise MailboxUnsafe(errno.EPERM, "the mailbox lock keeps being replaced by another file")


def next_number(directory: int) -> int:
    """The next free N: one past the counter, skipping numbers a crash left committed.

    Without a readable counter (a hand-made mailbox) it continues from the largest N present.
    An orphan `N.status` without its message is simply overwritten.
    """
    counter = _read_counter(directory)
    candidate = (counter if counter is not None else largest_number(directory)) + 1
    while _exists(directory, str(candidate)):
        candidate += 1
    return candidate


def _store_counter(directory: int, number: int, owner: Owner) -> None:
    """Record the last N in `.counter` (a hint: not fsync'd, see next_number).

    Normally overwritten in place: replacing it by a rename costs a data write-out per batch,
    because ext4 writes out a file's data before it is renamed over another (auto_da_alloc).
    Anything but a plain file of the mailbox's owner with one link, or a longer old text, is
    replaced by a rename instead, so a planted file is never written through.
    """
    data = b"%d\n" % number
    try:
        fd = os.open(COUNTER_NAME, os.O_WRONLY | _SAFE, dir_fd=directory)
    except OSError:
        fd = None
    if fd is not None:
        try:
            st = os.fstat(fd)
            ours = owner is None or (st.st_uid, st.st_gid) == owner
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and ours and st.st_size <= len(data):
                os.pwrite(fd, data, 0)  # numbers only grow: the new text covers the old one
                return
        finally:
            os.close(fd)
    durable.replace_synced(COUNTER_NAME, data, owner, sync=False, dir_fd=directory)


def _read_counter(directory: int) -> int | None:
    try:
        fd = os.open(COUNTER_NAME, os.O_RDONLY | _SAFE, dir_fd=directory)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a FIFO or device planted there must not stall or flood us
        return int(os.read(fd, 32).strip() or b"x")
    except ValueError:
        return None
    finally:
        os.close(fd)


REDELIVERY_SCAN = 2000  # newest messages looked at, at most
# What a redelivery's comparisons may cost, in its own sizes: its head names its queue id, so
# only its own copy has the same start, unless someone planted look-alikes that differ at the
# end (an attacker's pass made root compare 2000 files of 2 MB for each copy). Past that it
# is written again.
MAX_COMPARED = 3
CLOCK_SLACK = 60.0  # seconds: a message is looked for if written this long before `since`


def delivered(directory: int, messages: list[Copy]) -> list[int | None]:
    """For each redelivery of a batch (`since` set), the number of a message written since its
    `since` with the same octets (its Return-Path: and Received: headers name its queue id and
    date), if any; None for the others. Looked for among the newest messages only, and only
    for a redelivery: it costs a directory listing and an fstat of a few files, once for the
    whole batch (the copies a dead writer left unanswered come back together), and a read of
    the start of those of a wanted size, once for all copies.

    The whole message is compared, not its start: the answer says whether the mailbox holds
    that message, and a mere prefix let an attacker's pass, speaking for a compromised mail
    user, read a user's mail it cannot open, octet by octet. What one copy may cost in
    comparisons is bounded (MAX_COMPARED times its size): past that it is written again."""
    found: list[int | None] = [None] * len(messages)
    # index -> (its size, the mtime before which a message cannot be it)
    wanted = {
        i: (len(m.head) + durable.body_size(m.body, m.limit), m.since - CLOCK_SLACK)
        for i, m in enumerate(messages)
        if m.since is not None
    }
    if not wanted:
        return found
    spent = collections.Counter[int]()  # octets compared, per copy
    numbers = sorted(int(n) for n in os.listdir(directory) if n.isdigit() and n.isascii())
    for number in reversed(numbers[-REDELIVERY_SCAN:]):
        try:
            fd = os.open(str(number), os.O_RDONLY | _SAFE, dir_fd=directory)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            for i in [i for i, (_, oldest) in wanted.items() if st.st_mtime < oldest]:
                del wanted[i]  # older than that copy itself: it was never delivered here
            alike = [i for i, (size, _) in wanted.items() if size == st.st_size]
            if not alike or not stat.S_ISREG(st.st_mode):
                continue
            first = os.pread(fd, min(st.st_size, _COMPARED), 0)
            for i in alike:
                same, octets = _same_octets(fd, first, messages[i], st.st_size)
                spent[i] += octets
                if same:
                    found[i] = number
                    del wanted[i]
                elif spent[i] > MAX_COMPARED * st.st_size + _COMPARED:
                    del wanted[i]  # planted look-alikes: written again, not looked for further
        finally:
            os.close(fd)
        if not wanted:
            break
    return found


def _same_octets(fd: int, first: bytes, message: Copy, size: int) -> tuple[bool, int]:
    """Whether the file `fd`, whose first octets are `first`, holds message's head and body
    (`size` octets in all); and how many octets that took to tell."""
    offset = 0
    for piece in _octets(message, size):
        end = offset + len(piece)
        stored = first[offset:end] if end <= len(first) else os.pread(fd, len(piece), offset)
        if stored != piece:
            return False, end
        offset = end
    return offset == size, offset


def _octets(message: Copy, size: int) -> Iterator[bytes]:
    """Message's head, then its body in pieces of _COMPARED octets, `size` octets in all."""
    yield message.head
    body, length = message.body, size - len(message.head)
    for start in range(0, length, _COMPARED):
        if isinstance(body, bytes):
            yield body[start : start + min(_COMPARED, length - start)]
        else:
            piece = os.pread(body, min(_COMPARED, length - start), start)
            yield piece
            if not piece:
                return


_COMPARED = 1 << 20  # octets read at a time when comparing a redelivery with a stored message


def largest_number(directory: int) -> int:
    return max((int(n) for n in os.listdir(directory) if n.isdigit() and n.isascii()), default=0)


def _exists(directory: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _rename(directory: int, source: str, target: str) -> None:
    os.rename(source, target, src_dir_fd=directory, dst_dir_fd=directory)


def _discard(directory: int, staged: list[str]) -> None:
    for tmp in staged:
        for name in (tmp, tmp + ".status"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=directory)


def _left_by_the_dead(name: str) -> bool:
    """A temporary file (see _TEMPORARY) whose maker is no longer alive."""
    match = _TEMPORARY.fullmatch(name)
    if match is None:
        return False
    pid = int(match.group(1) or match.group(2))
    if not 0 < pid < 1 << 22 or pid == os.getpid():  # (Linux pids stay below 2**22)
        return False  # not a pid at all (0 would signal our process group), or our own
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def _owner_of(directory: int) -> Owner:
    """Files go to the mailbox directory's owner (meaningful only when we run as root)."""
    if os.geteuid() != 0:
        return None
    st = os.fstat(directory)
    return (st.st_uid, st.st_gid)

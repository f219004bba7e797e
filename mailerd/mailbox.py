"""The mailbox spool: `<spool>/<user>/<N>` and `<N>.status`, numbered under a lockf lock.

Contract (an IMAP server reads it):
- N = 1, 2, 3 … in order of reception, never reused: the last N is kept in `<user>/.counter`;
  a mailbox without a counter (made by hand) continues from its largest N.
- `<N>.status` holds the IMAP flags on one line; a new message's is `\\Recent`.
- Every writer and reader serialises on `lockf` of `<user>/.lock`. (A directory descriptor
  cannot take a lockf lock — lockf needs a descriptor open for writing — hence the file.)
- Durability: each file is written under a temporary name and fsync'd, renamed into place under
  the lock (status first, message last: the message's rename is the commit point), the counter
  is updated, and the directory is fsync'd once for the whole batch before anyone hears "done".

POSIX locks belong to the process, not the thread, so within one process the caller must make
sure only one thread works on a given mailbox at a time (delivery does, with one writer task per
mailbox); across processes and mailerd instances lockf does the work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import pwd
import time
from dataclasses import dataclass
from pathlib import Path

from mailerd import durable
from mailerd.smtp.events import Reply

LOCK_NAME = ".lock"
COUNTER_NAME = ".counter"
NEW_FLAGS = b"\\Recent\n"
MAILBOX_BUSY = Reply(451, "4.2.0", "Mailbox busy (locked); try again later")


@dataclass(frozen=True)
class Delivery:
    """One message for one mailbox: the headers to prepend and the body."""

    head: bytes
    body: durable.Body


@dataclass(frozen=True)
class Staged:
    """A message written and fsync'd under a temporary name, waiting to be numbered."""

    tmp: str


_sequence = itertools.count(1)


class MailboxLocked(Exception):
    """The mailbox lock was held by someone else for longer than the deadline."""


class Spool:
    def __init__(self, root: Path, lock_timeout: float = 60.0) -> None:
        self.root = root
        self.lock_timeout = lock_timeout

    def exists(self, name: str) -> bool:
        """Deliverable: its mailbox exists, it is a system account, or it is postmaster."""
        if name == "postmaster" or (self.root / name).is_dir():
            return True
        try:
            pwd.getpwnam(name)
        except (KeyError, UnicodeEncodeError, ValueError):
            return False
        return True

    def deliver(self, name: str, messages: list[Delivery]) -> list[int]:
        """Store messages in mailbox `name`, durably, in order; return their numbers.

        Raises OSError (or MailboxLocked) if nothing of the batch could be committed.
        """
        return self.commit(name, self.stage(name, messages))

    def stage(self, name: str, messages: list[Delivery]) -> list[Staged]:
        """Phase 1, no lock needed: write each message and its status under temporary names
        in the mailbox directory and fsync them (all at once).

        Staging needs no number, so it can overlap another batch's commit; the caller must
        `commit()` or `discard()` what it staged.
        """
        directory = self._ensure_mailbox(name)
        owner = _owner_of(directory)
        staged: list[Staged] = []
        fds: list[int] = []
        try:
            for message in messages:
                tmp = f"{directory}/.tmp.{os.getpid()}.{next(_sequence)}"
                staged.append(Staged(tmp))
                fds.append(durable.write_new(tmp + ".status", NEW_FLAGS, b"", owner))
                fds.append(durable.write_new(tmp, message.head, message.body, owner))
            durable.fsync_all(fds)
        except BaseException:
            self.discard(staged)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return staged

    def commit(self, name: str, staged: list[Staged]) -> list[int]:
        """Phase 2, under the lock: number the staged messages, rename them into place (status
        first, the message last: the commit point), update the counter, fsync the directory."""
        directory = self.root / name
        try:
            lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            self.discard(staged)
            raise
        try:
            self._lock(lock_fd)
            return self._commit_locked(str(directory), staged)
        except BaseException:
            self.discard(staged)
            raise
        finally:
            os.close(lock_fd)  # closing releases the lockf lock

    def _commit_locked(self, directory: str, staged: list[Staged]) -> list[int]:
        first = next_number(directory)
        numbers = list(range(first, first + len(staged)))
        for item, number in zip(staged, numbers, strict=True):
            os.rename(item.tmp + ".status", f"{directory}/{number}.status")
            os.rename(item.tmp, f"{directory}/{number}")
        # The counter is a hint (next_number() heals a stale one), so it is not fsync'd.
        owner = _owner_of(Path(directory))
        durable.replace_synced(
            f"{directory}/{COUNTER_NAME}", b"%d\n" % numbers[-1], owner, sync=False
        )
        durable.fsync_dir(directory)
        return numbers

    @staticmethod
    def discard(staged: list[Staged]) -> None:
        for item in staged:
            _remove_stale(item.tmp, item.tmp + ".status")

    def _lock(self, fd: int) -> None:
        # Non-blocking attempts with back-off, so an IMAP server sitting on the lock costs
        # this mailbox a bounded wait (then a 451 and a retry), not a stuck thread forever.
        deadline = time.monotonic() + self.lock_timeout
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

    def _ensure_mailbox(self, name: str) -> Path:
        directory = self.root / name
        if directory.is_dir():
            return directory
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            return directory
        owner = _account_owner(name)
        if owner is not None and os.geteuid() == 0:
            os.chown(directory, *owner)
        durable.fsync_dir(str(self.root))
        return directory


def next_number(directory: str) -> int:
    """The next free N: one past the counter, skipping numbers a crash left committed.

    Without a readable counter (a hand-made mailbox) it continues from the largest N present.
    An orphan `N.status` without its message is simply overwritten.
    """
    try:
        with open(f"{directory}/{COUNTER_NAME}", "rb") as f:
            candidate = int(f.read().strip() or b"x") + 1
    except (FileNotFoundError, ValueError):
        candidate = largest_number(directory) + 1
    while os.path.exists(f"{directory}/{candidate}"):
        candidate += 1
    return candidate


def largest_number(directory: str) -> int:
    return max((int(n) for n in os.listdir(directory) if n.isdigit() and n.isascii()), default=0)


def _remove_stale(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _owner_of(directory: Path) -> tuple[int, int] | None:
    """Files go to the mailbox directory's owner (meaningful only when we run as root)."""
    if os.geteuid() != 0:
        return None
    st = directory.stat()
    return (st.st_uid, st.st_gid)


def _account_owner(name: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, UnicodeEncodeError, ValueError):
        return None
    return (entry.pw_uid, entry.pw_gid)

"""The durable outbound queue under `--queue`: one message file and one envelope file per item.

Layout (all under the queue directory):
- `msg/<id>`: the message as it will be sent (our Received: header + the received body, CRLF).
- `env/<id>`: the item's envelope, JSON with per-recipient state. It is written after the
  message and its rename is the commit point: a `msg/` file without an envelope is debris from a
  crash before the commit (nobody was told 250) and is removed at start-up.
- `tmp/`: unlinked spill files for large bodies in transit; `private/`: the delivery socket.
- `maildrop/` (mode 1733) and `public/pickup` (a FIFO, mode 0622): where `sendmail` leaves mail
  for the pickup, and how it wakes it (see `maildrop`).

Every change is write-new, fsync, rename, fsync the directory. Only the delivery process writes.

A write that fails raises QueueWriteError after the queue has logged the condition, once: a full
disk fails every write until it is freed, and one line (what failed, in which directory, why)
says so, another when writes work again. The callers keep what they know (the scheduler its
items' state, in memory) and try again later; they log no traceback of their own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mailerd import durable
from mailerd.ipc.maildrop import MAILDROP, PICKUP_FIFO, PUBLIC

log = logging.getLogger("mailerd.queue")

# Each directory and its mode: the children's user owns them all (privileges.prepare_queue).
# Anyone may drop mail into the maildrop (but not list or read it) and poke the pickup.
SUBDIRS = {"msg": 0o700, "env": 0o700, "tmp": 0o700, "private": 0o700}
SUBDIRS |= {MAILDROP: 0o1733, PUBLIC: 0o755}
PICKUP_MODE = 0o622
DEBRIS_AGE = 3600.0


@dataclass
class Recipient:
    address: str
    mailbox: str | None = None  # set for a local recipient whose delivery is being retried
    state: str = "pending"  # pending | sent | bounced
    attempts: int = 0
    last_error: str = ""


@dataclass
class QueueItem:
    id: str
    sender: str
    recipients: list[Recipient]
    created: float = field(default_factory=time.time)
    next_attempt: float = 0.0
    size: int = 0
    smtputf8: bool = False
    body_8bit: bool = False
    warned: bool = False  # the delay warning has been sent

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> QueueItem:
        raw = json.loads(data)
        raw["recipients"] = [Recipient(**r) for r in raw["recipients"]]
        return cls(**raw)


_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _fchmod_at(directory: int, name: str, mode: int, kind: int = 0) -> None:
    """chmod `name` below `directory`, refusing a link (ELOOP) rather than following it."""
    fd = os.open(name, _NOFOLLOW | kind, dir_fd=directory)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _make_fifo(directory: int, name: str) -> None:
    """The pickup FIFO, in place of anything else (a leftover file, a link) but a directory."""
    try:
        st = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISFIFO(st.st_mode):
        os.unlink(name, dir_fd=directory)  # (IsADirectoryError for a directory: left to a human)
        st = None
    if st is None:
        os.mkfifo(name, PICKUP_MODE, dir_fd=directory)
    _fchmod_at(directory, name, PICKUP_MODE)


class QueueWriteError(OSError):
    """A write to the queue failed; the queue has logged the condition (see Conditions)."""


class Conditions:
    """The queue's file-system troubles, each logged once, with the directory, until it clears:
    (what failed, where, errno) is one condition. Thread-safe (writes run in threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: set[tuple[str, str, int | None]] = set()

    def failed(self, action: str, directory: str, exc: OSError) -> None:
        key = (action, directory, exc.errno)
        with self.lock:
            if key in self.active:
                return
            self.active.add(key)
        log.error(
            "queue: cannot %s %s: %s (said once until it works again)",
            action,
            directory,
            exc.strerror or exc,
        )

    def worked(self, action: str, directory: str) -> None:
        if not self.active:  # (the usual case, without taking the lock)
            return
        with self.lock:
            cleared = {key for key in self.active if key[:2] == (action, directory)}
            self.active -= cleared
        if cleared:
            log.info("queue: %s %s works again", action, directory)


class Queue:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.shown = _real_path(root)  # what the log calls it
        self.conditions = Conditions()

    def create_dirs(self) -> None:
        """Make the queue's layout (SUBDIRS, the scheduler's lock, the pickup FIFO) with its
        modes. Run as root at every start, below directories that `privileges.prepare_queue`
        then gives the children's user: nothing here follows a link planted in one of them."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for sub, mode in SUBDIRS.items():
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sub, mode, dir_fd=root)
                _fchmod_at(root, sub, mode, os.O_DIRECTORY)  # mkdir's mode passed the umask
            public = os.open(PUBLIC, _NOFOLLOW | os.O_DIRECTORY, dir_fd=root)
            try:
                _make_fifo(public, PICKUP_FIFO)
            finally:
                os.close(public)
        finally:
            os.close(root)
        # Made here, at start-up, rather than by the first scheduler: the queue's layout is
        # complete before anything is accepted.
        lock = os.open(self.scheduler_lock, os.O_RDONLY | os.O_CREAT | _NOFOLLOW, 0o600)
        os.close(lock)

    @property
    def pickup_fifo(self) -> Path:
        return self.root / PUBLIC / PICKUP_FIFO

    @property
    def scheduler_lock(self) -> Path:
        return self.root / "private" / "scheduler.lock"

    def put(self, item: QueueItem, head: bytes, body: durable.Body) -> None:
        """Store a new item durably (message first, envelope last as the commit point)."""
        # An envelope that cannot be written at all (text no UTF-8 can hold) fails here,
        # before a message is left without one.
        item.to_json()
        msg = str(self.root / "msg" / item.id)
        with self._writing("write to", "msg"):
            durable.write_synced(msg, head, body)
            durable.fsync_dir(str(self.root / "msg"))
            item.size = os.path.getsize(msg)
        self.update(item)

    def update(self, item: QueueItem) -> None:
        """Atomically replace an item's envelope (recipient states, next attempt)."""
        with self._writing("write to", "env"):
            durable.replace_synced(str(self.root / "env" / item.id), item.to_json())
            durable.fsync_dir(str(self.root / "env"))

    def remove(self, queue_id: str) -> None:
        with self._writing("remove from", "env"):
            for path in (self.root / "env" / queue_id, self.root / "msg" / queue_id):
                path.unlink(missing_ok=True)
            durable.fsync_dir(str(self.root / "env"))

    @contextlib.contextmanager
    def _writing(self, action: str, sub: str) -> Iterator[None]:
        """Report a failed write once per condition (Conditions), as QueueWriteError."""
        directory = f"{self.shown}/{sub}"
        try:
            yield
        except OSError as exc:
            self.conditions.failed(action, directory, exc)
            raise QueueWriteError(exc.errno, exc.strerror or str(exc), directory) from exc
        self.conditions.worked(action, directory)

    def message_path(self, queue_id: str) -> Path:
        return self.root / "msg" / queue_id

    def ids(self) -> set[str]:
        return {n for n in os.listdir(self.root / "env") if ".tmp" not in n}

    def read(self, queue_id: str) -> QueueItem | None:
        try:
            return QueueItem.from_json((self.root / "env" / queue_id).read_bytes())
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def load(self, clean: bool = True) -> list[QueueItem]:
        """All committed items; with `clean`, removes crash debris (orphan messages, temp files).

        Only the delivery process may clean: another process could see a message whose envelope
        is being written at this very moment.
        """
        items = []
        env_dir = self.root / "env"
        cutoff = time.time() - DEBRIS_AGE
        for name in sorted(os.listdir(env_dir)):
            if ".tmp" in name:
                # Old enough that no writer can still be about to rename it into place.
                if clean:
                    with contextlib.suppress(FileNotFoundError):
                        if (env_dir / name).stat().st_mtime < cutoff:
                            (env_dir / name).unlink()
                continue
            try:
                items.append(QueueItem.from_json((env_dir / name).read_bytes()))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # unreadable or just removed: leave it for a human rather than lose it
        if clean:
            known = set(os.listdir(env_dir))
            for name in os.listdir(self.root / "msg"):
                path = self.root / "msg" / name
                # Old enough that no put() can still be between its message and its envelope.
                with contextlib.suppress(FileNotFoundError):
                    if name not in known and path.stat().st_mtime < cutoff:
                        path.unlink()
        return items


def _real_path(root: Path) -> str:
    """The directory's own path, also when it is reached through /proc/self/fd/N (as the
    delivery process reaches the queue after dropping privileges: privileges.keep_dir)."""
    if root.parent == Path("/proc/self/fd"):
        with contextlib.suppress(OSError):
            return os.readlink(root)
    return str(root)

"""The durable outbound queue under `--queue`: one message file and one envelope file per item.

Layout (all under the queue directory):
- `msg/<id>`: the message as it will be sent (our Received: header + the received body, CRLF).
- `env/<id>`: the item's envelope, JSON with per-recipient state. It is written after the
  message and its rename is the commit point: a `msg/` file without an envelope is debris from a
  crash before the commit (nobody was told 250) and is removed at start-up.
- `tmp/`: unlinked spill files for large bodies in transit; `private/`: the delivery socket.
- `corrupt/`: envelopes this mailerd cannot read (`<id>.env`, beside their `<id>.msg`), set
  aside by the delivery process with one log line each (Postfix's corrupt/): a damaged item
  then costs only itself, and `mailerd queue` names it until a human deals with it.
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
import errno
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
from mailerd.ipc.maildrop import MAILDROP, PICKUP_FIFO, PUBLIC, read_at_most
from mailerd.jsonfields import Fields
from mailerd.spool import shown_path

log = logging.getLogger("mailerd.queue")

# Each directory and its mode: the children's user owns them all (privileges.prepare_queue).
# Anyone may drop mail into the maildrop (but not list or read it) and poke the pickup.
SUBDIRS = {"msg": 0o700, "env": 0o700, "tmp": 0o700, "private": 0o700, "corrupt": 0o700}
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
    # last_error is mailerd's own finding (relay.Result.ours: a refused connection, a TLS
    # failure), which a delay warning tells as its own, as a bounce does, not as a reply.
    last_error_ours: bool = False
    via: str = ""  # the alias that forwards it here (`forwarding.envelope_sender`)


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
    # From an untrusted (network) listener: another server's mail, whose only remote
    # recipients are alias forwards; and the SPF result of its MAIL FROM there ("" if it was
    # not checked: --inbound-auth off). The scheduler bounces such mail only to a sender SPF
    # verified (`Scheduler._notify`). Older envelopes lack both: the owner's mail, as before.
    inbound: bool = False
    sender_spf: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> QueueItem:
        """The item an envelope holds; DamagedEnvelope if it is not one. Every field's type is
        checked here (a `null` in a time once killed the scheduler's heap, and with it all
        outbound mail), a field missing that has a default takes it (an older mailerd wrote
        it), and a key we do not know is ignored (a newer one wrote it: a downgrade must not
        strand the whole queue)."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise DamagedEnvelope(f"not JSON ({exc})") from None
        fields = Fields(raw, "envelope", DamagedEnvelope)
        recipients = fields.array("recipients")
        return cls(
            id=fields.text("id"),
            sender=fields.text("sender"),
            recipients=[_recipient(r) for r in recipients],
            created=fields.time("created"),
            next_attempt=fields.time("next_attempt", 0.0),
            size=fields.count("size", 0),
            smtputf8=fields.flag("smtputf8", False),
            body_8bit=fields.flag("body_8bit", False),
            warned=fields.flag("warned", False),
            inbound=fields.flag("inbound", False),
            sender_spf=fields.text("sender_spf", ""),
        )


class DamagedEnvelope(ValueError):
    """An envelope file this mailerd cannot read: the text says why."""


STATES = ("pending", "sent", "bounced")


def _recipient(raw: object) -> Recipient:
    fields = Fields(raw, "recipient", DamagedEnvelope)
    state = fields.text("state", "pending")
    if state not in STATES:
        raise DamagedEnvelope(f"recipient: state {state!r} unknown")
    return Recipient(
        address=fields.text("address"),
        mailbox=fields.optional_text("mailbox"),
        state=state,
        attempts=fields.count("attempts", 0),
        last_error=fields.text("last_error", ""),
        last_error_ours=fields.flag("last_error_ours", False),
        via=fields.text("via", ""),
    )


_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _fchmod_at(directory: int, name: str, mode: int, kind: int = 0) -> None:
    """chmod `name` below `directory`, refusing a link (ELOOP) rather than following it, and
    a file of more than one name: where protected_hardlinks is off, the children's user may
    put a hard link to any file at a name of a directory it owns (public/pickup) between
    root's mkfifo and this chmod (an attacker's pass)."""
    fd = os.open(name, _NOFOLLOW | kind, dir_fd=directory)
    try:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink != 1:
            raise OSError(errno.EMLINK, f"{name} has {st.st_nlink} links; its mode is left alone")
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
        self.shown = shown_path(root)  # what the log calls it
        self.conditions = Conditions()
        self.reported: set[str] = set()  # env/ names whose trouble is logged (`_report`)
        self.unreadable: dict[str, str] = {}  # what the last load() could not read, and why

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
        # 0644: the scheduler (the children's user) flocks it through a read-only descriptor,
        # whoever owns it (privileges._hand_over may leave it root's).
        lock = os.open(self.scheduler_lock, os.O_RDONLY | os.O_CREAT | _NOFOLLOW, 0o644)
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
        try:
            self.update(item)
        except QueueWriteError:
            # Without its envelope the message is debris nobody was told 250 for: removed now
            # rather than by the clean an hour later, for on a full disk it holds the very
            # space (or the last inode) that the client's retry needs.
            with contextlib.suppress(OSError):
                os.unlink(msg)
            raise

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
        """The item, or None: gone, unreadable or damaged (for a look only: nothing is moved)."""
        try:
            return self._read_envelope(queue_id)
        except (OSError, DamagedEnvelope):
            return None

    def _read_envelope(self, name: str) -> QueueItem:
        """env/`name`'s item; OSError, or DamagedEnvelope for one this mailerd cannot use."""
        item = QueueItem.from_json(_read_plain(self.root / "env" / name))
        if item.id != name:  # (remove() and the scheduler go by the id: it must be the file's)
            raise DamagedEnvelope(f"its id is {item.id!r}")
        return item

    def take(self, name: str) -> QueueItem | None:
        """For the delivery process, the queue's only writer (the scheduler's load and rescan):
        the item, or None. A damaged envelope is set aside into corrupt/ with its message, and
        one that cannot be read (EACCES, EIO) is left where it is; both are logged once."""
        try:
            return self._read_envelope(name)
        except FileNotFoundError:
            return None  # (removed since the directory was listed)
        except DamagedEnvelope as exc:
            self.set_aside(name, str(exc))
        except OSError as exc:
            self._report(name, f"queue: cannot read {self.shown}/env/{name}: {exc.strerror or exc}")
        return None

    def set_aside(self, name: str, why: str) -> None:
        """Move a damaged item's envelope and message into corrupt/: it costs only itself, is
        never attempted, and `mailerd queue` names it (`damaged`) until a human decides."""
        corrupt = self.root / "corrupt"
        try:
            corrupt.mkdir(mode=0o700, exist_ok=True)  # (a queue laid out by an older mailerd)
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.root / "msg" / name, corrupt / f"{name}.msg")
            os.rename(self.root / "env" / name, corrupt / f"{name}.env")
            durable.fsync_dir(str(corrupt))
        except OSError as exc:
            why = f"{why}; cannot move it to {self.shown}/corrupt: {exc.strerror or exc}"
            self._report(name, f"queue: {name}: damaged envelope ({why}); it is left alone")
            return
        log.error(
            "queue: %s: damaged envelope (%s): set aside in %s/corrupt, not delivered",
            name,
            why,
            self.shown,
        )

    def _report(self, name: str, line: str) -> None:
        """A trouble with one file, logged once (a rescan meets it again every few seconds)."""
        if name not in self.reported:
            self.reported.add(name)
            log.error("%s", line)

    def damaged(self) -> list[str]:
        """The ids of the items set aside in corrupt/ (none if it cannot be listed)."""
        try:
            names = os.listdir(self.root / "corrupt")
        except OSError:
            return []
        return sorted(n.removesuffix(".env") for n in names if n.endswith(".env"))

    def load(self, clean: bool = True) -> list[QueueItem]:
        """All committed items; with `clean` (the delivery process), removes crash debris
        (`clean`) and sets damaged envelopes aside (`take`).

        Only the delivery process may clean: another process could see a message whose envelope
        is being written at this very moment. Without `clean`, what could not be read is in
        `unreadable` (name: why), for `mailerd queue` to show.
        """
        items = []
        self.unreadable = {}
        for name in sorted(os.listdir(self.root / "env")):
            if ".tmp" in name:
                continue
            item = self.take(name) if clean else self._look(name)
            if item is not None:
                items.append(item)
        if clean:
            self.clean()
        return items

    def clean(self) -> int:
        """Remove crash debris over DEBRIS_AGE old (logged), and say how many files went:
        envelopes' temporary files never renamed, and messages without an envelope (a kill
        between a put()'s two writes, or between a remove()'s two unlinks). The delivery
        process's alone, at its start and once an hour after (the scheduler): debris of a
        crash goes however long the next run lasts. Younger files may be a put() under way."""
        env_dir, msg_dir = self.root / "env", self.root / "msg"
        cutoff = time.time() - DEBRIS_AGE
        removed = 0
        for name in os.listdir(env_dir):
            # Old enough that no writer can still be about to rename it into place.
            if ".tmp" in name and _unlink_if_older(env_dir / name, cutoff):
                removed += 1
        known = set(os.listdir(env_dir))
        for name in os.listdir(msg_dir):
            # Old enough that no put() can still be between its message and its envelope.
            if name not in known and _unlink_if_older(msg_dir / name, cutoff):
                removed += 1
        if removed:
            log.info(
                "queue: removed %d file(s) an interrupted write left over an hour ago", removed
            )
        return removed

    def _look(self, name: str) -> QueueItem | None:
        """`take` for a reader that may change nothing: what fails is noted in `unreadable`."""
        try:
            return self._read_envelope(name)
        except FileNotFoundError:
            return None
        except (OSError, DamagedEnvelope) as exc:
            self.unreadable[name] = str(exc)
            return None


def _unlink_if_older(path: Path, cutoff: float) -> bool:
    """Remove `path` if it was last changed before `cutoff`; whether it was."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_mtime < cutoff:
            path.unlink()
            return True
    return False


MAX_ENVELOPE = 64 << 20  # octets: far more than 1,000 recipients with their last errors


def _read_plain(path: Path) -> bytes:
    """An envelope's octets: a regular file's, never through a link and never more than
    MAX_ENVELOPE. env/ belongs to the children's user, and `mailerd queue` (root) reads it
    too: a link planted there to a FIFO hung it, to /dev/zero it ate memory, to a root-only
    file it was read as root."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DamagedEnvelope("a symbolic link") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DamagedEnvelope("not a regular file")
        data = read_at_most(fd, MAX_ENVELOPE + 1)
        if len(data) > MAX_ENVELOPE:
            raise DamagedEnvelope(f"larger than {MAX_ENVELOPE} octets")
        return data
    finally:
        os.close(fd)

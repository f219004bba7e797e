"""The pickup: mail that local users handed to `sendmail`, moved from the maildrop to the queue.

Runs in the delivery process, as the children's user, which owns `<queue>/maildrop` (see
`maildrop` for how files get there). It looks at the maildrop when started (mail dropped while
mailerd was stopped waits there), whenever `sendmail` writes to the FIFO `public/pickup`, and
once a minute in case a poke was missed.

Anyone may create anything in the maildrop, so each entry is untrusted input (`maildrop.read`
validates it): one with a submission's name that is no usable submission (invalid, a directory,
a link, a file it may not read) is logged once with its owner and removed; one it cannot remove
(a user's directory holding their files) is said once and left alone. Entries without a
submission's name are removed once they are an hour old (`JUNK_AGE`). Nothing one file does
stops the pickup: a failure of ours that one file meets costs that file only (it is kept and
tried again), and pokes that come faster than the looks they cause are coalesced (`PAUSE`).

A submission's recipients are routed as a trusted (local) client's would be, aliases included
(`recipients.resolve`), and the message becomes one queue item (our Received: header, which
names the submitting uid, then the message) whose local recipients the scheduler delivers at
once and whose remote ones it relays. A recipient that cannot exist (an unknown user, an
alias loop) is bounced to the sender, and so is a whole message over the size limit (one that
a `sendmail` reading another configuration took). The queue item is durable before the file is
removed, and its id comes from the file's name: if mailerd dies in between, the next pickup
finds the item already queued and only removes the file, so nothing is lost and nothing is
doubled.

Mail that leaves is DKIM-signed here, as a trusted client's is at its commit (`signing`). Local
copies are not signed: a message for both local and remote recipients becomes two items, the
local copies' (unsigned, id `<id>-local`, queued first) and the remote ones' (signed, the
file's id, the commit point). Were mailerd to die between the two, the local copies would be
queued twice and delivered twice; nothing would be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

from mailerd import durable, forwarding, policy, recipients, signing, trace
from mailerd.aliases import normal_address
from mailerd.config import Config
from mailerd.delivery.dsn import RecipientStatus
from mailerd.delivery.queue import Queue, QueueItem, Recipient
from mailerd.inbound import results
from mailerd.ipc import maildrop
from mailerd.signing import SigningKey
from mailerd.smtp.data import loop_problem
from mailerd.smtp.events import Reply
from mailerd.smtp.grammar import GrammarError, parse_address
from mailerd.spool import Spool

log = logging.getLogger("mailerd.pickup")

RESCAN = 60.0  # seconds between looks without a poke
# After a look the pickup rests at least as long as the look took (and PAUSE): pokes meanwhile
# make one more look, not one each, so a user writing to the FIFO in a loop keeps it busy at
# most half the time (far less, with an empty maildrop); a poke that finds it idle is served
# at once.
PAUSE = 0.05
# An entry without a submission's name is removed once it is this old. `submit()` writes under
# a dot-name and renames the file as soon as it is written and fsync'd: seconds, even on a
# busy disk. One removed while a sendmail still writes it is no loss either: its rename then
# fails, and sendmail says so (exit 75) rather than 0.
JUNK_AGE = 3600.0


@dataclass
class Taken:
    """One submission, now a queue item; the recipients refused at once (to bounce); and the
    item of its local copies when those had to be kept apart from a signed message."""

    item: QueueItem
    refused: list[RecipientStatus]
    local: QueueItem | None = None


class Pickup:
    def __init__(
        self,
        cfg: Config,
        queue: Queue,
        spool: Spool,
        executor: Executor,
        queued: Callable[[Taken], None],
        dkim_keys: tuple[SigningKey, ...] = (),
    ) -> None:
        """`queue.root` and `spool.root` may be /proc/self/fd paths (privileges.keep_dir);
        `queued` is told of each new queue item, in the event loop; `dkim_keys` sign the
        copies that leave (delivery.secrets)."""
        self.cfg = cfg
        self.dkim_keys = dkim_keys
        self.queue = queue
        self.spool = spool
        self.executor = executor
        self.queued = queued
        self.wake = asyncio.Event()
        self.reported: dict[str, str] = {}  # a file's last logged problem: said once
        # Entries it could not remove (a user's own directory, with their files): not looked
        # at again while the same entry (device, inode) is there.
        self.stuck: dict[str, tuple[int, int]] = {}

    async def first(self) -> None:
        """The look at start-up: what was dropped while mailerd was stopped, and what it had
        queued but not yet removed when it died (the scheduler waits for this one)."""
        directory = self._open_maildrop()
        try:
            await self.scan(directory)
        finally:
            os.close(directory)

    async def run(self) -> None:
        """Then every poke, and once a minute."""
        loop = asyncio.get_running_loop()
        directory = self._open_maildrop()
        fifo = self._open_fifo()
        try:
            while True:
                started = loop.time()
                await self.scan(directory)  # (at once too: a poke may have found no reader)
                await asyncio.sleep(max(PAUSE, loop.time() - started))
                if fifo is not None and _drain(fifo):
                    continue  # poked meanwhile: one more look, for all those pokes
                await self._wait(fifo)
        finally:
            if fifo is not None:
                os.close(fifo)
            os.close(directory)

    async def _wait(self, fifo: int | None) -> None:
        """Until a poke, or RESCAN. The FIFO is watched only here: pokes that come during a look
        or a pause wait in it (a full FIFO is as good, see maildrop.poke), so a user poking in
        a loop costs the pickup its looks and nothing more."""
        loop = asyncio.get_running_loop()
        self.wake.clear()
        if fifo is not None:
            loop.add_reader(fifo, self._poked, fifo)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), RESCAN)
        finally:
            if fifo is not None:
                loop.remove_reader(fifo)

    def _open_maildrop(self) -> int:
        return os.open(
            self.queue.root / maildrop.MAILDROP, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )

    def _open_fifo(self) -> int | None:
        # Read and write: a FIFO opened for reading alone reports end-of-file (readable, for
        # ever) as soon as its last writer closes it.
        try:
            return os.open(self.queue.pickup_fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.error("cannot open %s (%s): mail from sendmail waits a minute", PICKUP, exc)
            return None

    def _poked(self, fifo: int) -> None:
        _drain(fifo)
        self.wake.set()

    async def scan(self, directory: int) -> int:
        """Take every submission now in the maildrop, and remove the old junk; how many became
        queue items."""
        loop = asyncio.get_running_loop()
        look = await loop.run_in_executor(self.executor, self._look, directory)
        count = 0
        for name in look.submissions:
            taken = await loop.run_in_executor(self.executor, self._take_one, directory, name)
            if taken is not None:
                self.queued(taken)
                count += 1
        if look.junk:
            await loop.run_in_executor(self.executor, self._clear, directory, look.junk)
        self.reported = {n: r for n, r in self.reported.items() if n in look.present}
        self.stuck = {n: i for n, i in self.stuck.items() if n in look.present}
        return count

    def _look(self, directory: int) -> Look:
        """The maildrop's entries (in a thread): its submissions, oldest first (names alone
        sort by millisecond only), and the junk old enough to go; none of those it could not
        remove before."""
        look = Look(present=set(os.listdir(directory)))
        found = []
        old = time.time() - JUNK_AGE
        for name in look.present:
            try:
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if self.stuck.get(name) == (st.st_dev, st.st_ino):
                continue
            if maildrop.is_submission_name(name):
                found.append((st.st_mtime_ns, name))
            elif st.st_mtime < old:
                look.junk.append(name)
        look.submissions = [name for _, name in sorted(found)]
        return look

    def _take_one(self, directory: int, name: str) -> Taken | None:
        """`take`, whatever happens: a failure of ours that one file meets costs that file (it
        stays, said once with its traceback, and is tried again), never the pickup."""
        try:
            return self.take(directory, name)
        except Exception as exc:
            self._report_once(name, f"failed: {type(exc).__name__}: {exc}", traceback=True)
            return None

    def take(self, directory: int, name: str) -> Taken | None:
        """Validate one file and make it a queue item, then remove it (in a thread)."""
        too_big: maildrop.TooBig | None = None
        try:
            submission = maildrop.read(directory, name, self.cfg.max_message_size)
            _check_hops(submission.message)
            submission = self._without_forged(submission)
        except FileNotFoundError:
            return None
        except maildrop.TooBig as exc:
            submission, too_big = exc.submission, exc
        except maildrop.Invalid as exc:
            self._discard(directory, name, str(exc))
            return None
        except OSError as exc:
            self._report_once(name, f"cannot read it: {exc.strerror or exc}")
            return None
        if self.queue.read(submission.queue_id) is not None:  # (queued, or bounced, then a crash)
            log.info("%s: already queued from the maildrop; removing its file", name)
            _remove(directory, name)
            return None
        head = trace.received_local(
            uid=submission.uid, hostname=self.cfg.hostname, queue_id=submission.queue_id
        )
        if too_big is not None:
            return self._too_big(directory, name, too_big, head)
        item, refused = self._item(submission)
        signature = self._signature(item, submission.message)
        local = self._local_part(item) if signature else None
        try:
            if local is not None:
                self.queue.put(local, head, submission.message)
            self.queue.put(item, head + signature, submission.message)
        except OSError as exc:
            self._report_once(name, f"cannot queue it: {exc.strerror or exc}")
            return None
        _remove(directory, name)
        nrcpt = len(item.recipients) + (len(local.recipients) if local is not None else 0)
        _log_receipt(submission, len(submission.message), nrcpt)
        for part in (local, item) if local is not None else (item,):
            for r in part.recipients:
                if r.state == "pending":
                    log.info("%s: to=<%s>, relay=queue, status=queued", part.id, r.address)
        return Taken(item, refused, local)

    def _without_forged(self, submission: maildrop.Submission) -> maildrop.Submission:
        """The submission without Authentication-Results fields bearing our host name: a
        local program may be handing on mail from elsewhere (fetchmail's `mda` runs
        sendmail), and a forger's pre-stamped pass must not reach the reader as ours
        (`inbound.results`), as on every listener."""
        message = submission.message  # (its whole header section: it may be past the scan)
        content = results.without_forged(message, self.cfg.hostname, len(message))
        if content is None:
            return submission
        log.info("%s: removed a forged Authentication-Results field", submission.queue_id)
        return replace(submission, message=content)

    def _too_big(
        self, directory: int, name: str, exc: maildrop.TooBig, head: bytes
    ) -> Taken | None:
        """A submission over the size limit, bounced to its sender with its header (queued as
        an item of bounced recipients, as an unknown user's are), not removed unheard: its
        `sendmail` took it, under a limit of its own configuration."""
        submission = exc.submission
        limit = self.cfg.max_message_size
        text = f"Message too big for system ({exc.size} octets; maximum {limit})"
        addresses = list(dict.fromkeys(submission.recipients))
        item = QueueItem(
            id=submission.queue_id,
            sender=submission.sender,
            recipients=[
                Recipient(a, state="bounced", last_error=f"552 5.3.4 {text}") for a in addresses
            ],
            smtputf8=submission.smtputf8,
            body_8bit=submission.body == "8BITMIME",
        )
        try:
            self.queue.put(item, head, submission.message)
        except OSError as error:
            self._report_once(name, f"cannot queue its bounce: {error.strerror or error}")
            return None
        _remove(directory, name)
        _log_receipt(submission, exc.size, len(addresses), ": too big, bounced")
        return Taken(item, [_bounced(a, "5.3.4", text) for a in addresses])

    def _signature(self, item: QueueItem, message: bytes) -> bytes:
        """DKIM-Signature fields for the item's remote copies, if any leave (see `signing`)."""
        keys = self.dkim_keys
        if not keys or not any(r.mailbox is None and r.state == "pending" for r in item.recipients):
            return b""
        return signing.sign_queued(item.id, durable.read_body(message), keys)

    @staticmethod
    def _local_part(item: QueueItem) -> QueueItem | None:
        """Move the item's local copies into an item of their own (None if it has none)."""
        local = [r for r in item.recipients if r.mailbox is not None]
        if not local:
            return None
        item.recipients = [r for r in item.recipients if r.mailbox is None]
        return QueueItem(
            id=f"{item.id}-local",
            sender=item.sender,
            recipients=local,
            smtputf8=item.smtputf8,
            body_8bit=item.body_8bit,
        )

    def _item(self, submission: maildrop.Submission) -> tuple[QueueItem, list[RecipientStatus]]:
        queued: dict[str, Recipient] = {}  # one copy per mailbox, one per remote address
        refused: list[RecipientStatus] = []
        for text in submission.recipients:
            for recipient, status in self._route(text):
                if status is not None:
                    refused.append(status)
                # (Keyed by the target, not by what the user typed: an alias's forwards are
                # several remote addresses for one typed name.)
                address = recipient.address
                key = f"/{recipient.mailbox}" if recipient.mailbox else normal_address(address)
                kept = queued.setdefault(key, recipient)
                if kept is not recipient and kept.mailbox is None:
                    kept.via = forwarding.preferred(kept.via, recipient.via)
        item = QueueItem(
            id=submission.queue_id,
            sender=submission.sender,
            recipients=list(queued.values()),
            smtputf8=submission.smtputf8,
            body_8bit=submission.body == "8BITMIME",
        )
        return item, refused

    def _route(self, text: str) -> list[tuple[Recipient, RecipientStatus | None]]:
        """The queue recipients for one address of a submission; a status for each one that
        is refused at once (it is queued as bounced, for the record and the DSN)."""
        try:
            address = parse_address(text)
        except GrammarError:  # maildrop.read() checked this already
            return [(Recipient(text, state="bounced"), _bounced(text, "5.1.3", "bad address"))]
        cfg = self.cfg
        resolved = recipients.resolve(
            address,
            trusted=True,
            locality=cfg.locality,
            aliases=cfg.aliases,
            spool=self.spool,
            spool_path=self.spool.shown,  # (cfg.spool: /proc/self/fd/N here)
        )
        if resolved.refusal is None:
            return [
                (Recipient(t.address, mailbox=t.mailbox, via=t.via), None) for t in resolved.targets
            ]
        reply = resolved.refusal
        if reply.code >= 500:
            status = _bounced(text, reply.status or "5.0.0", reply.text)
            return [(Recipient(text, state="bounced", last_error=_line(reply)), status)]
        # A mailbox that cannot take mail now (an mbox file in its place): its copies wait in
        # the queue and are retried like any other, so the sender hears of the delay.
        route = policy.route(address, trusted=True, locality=cfg.locality, aliases=cfg.aliases)
        boxes: tuple[str, ...] = ()
        forwards: list[Recipient] = []
        if isinstance(route, policy.Local):
            boxes = (route.mailbox,)
        elif isinstance(route, policy.Alias):
            boxes = route.mailboxes
            via = recipients.forwarder(route, address, cfg.domains)
            forwards = [Recipient(f, via=via) for f in route.forwards]
        waiting = [Recipient(text, mailbox=box, last_error=_line(reply)) for box in boxes]
        return [(r, None) for r in waiting + forwards]

    def _clear(self, directory: int, names: list[str]) -> None:
        """Remove entries without a submission's name that are over JUNK_AGE old (in a
        thread): `submit()` would have renamed them long ago."""
        for name in names:
            self._discard(directory, name, "no submission, over an hour old")

    def _discard(self, directory: int, name: str, problem: str) -> None:
        """Remove an entry that is no submission, whatever it is, and say so with its owner:
        the pickup owns the maildrop, so it may remove anyone's entry there, and a directory
        with all it may remove inside. One it cannot remove (a user's directory holding their
        files) is left, and not looked at again while it is there."""
        said = f"maildrop {_named(name)} (uid {_owner(directory, name)}): {problem}"
        try:
            _remove_entry(directory, name)
        except (OSError, RecursionError) as exc:  # (RecursionError: a tree too deep)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.error("%s; cannot remove it (%s): left to the administrator", said, why)
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
                self.stuck[name] = (st.st_dev, st.st_ino)
            return
        log.warning("%s; removed", said)

    def _report_once(self, name: str, problem: str, *, traceback: bool = False) -> None:
        if self.reported.get(name) != problem:
            self.reported[name] = problem
            log.error(
                "maildrop %s: %s; it stays there and is tried again",
                name,
                problem,
                exc_info=traceback,
            )


@dataclass
class Look:
    """What one look at the maildrop found."""

    present: set[str]  # every entry's name
    submissions: list[str] = field(default_factory=list)  # to take, oldest first
    junk: list[str] = field(default_factory=list)  # no submissions, over JUNK_AGE old


PICKUP = f"{maildrop.PUBLIC}/{maildrop.PICKUP_FIFO}"


def _drain(fifo: int) -> bool:
    """Read the pokes waiting in the FIFO; whether there were any."""
    poked = False
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fifo, 4096):
            poked = True
    return poked


def _named(name: str) -> str:
    """A name for the log: a submission's as it is, any other quoted, what is not printable
    escaped (a user may put a line break, or bytes that are no UTF-8, into one)."""
    return name if maildrop.is_submission_name(name) else repr(name)


def _remove_entry(directory: int, name: str) -> None:
    """Unlink `name`, or remove it and what is inside when it is a directory (`_remove_tree`)."""
    try:
        os.unlink(name, dir_fd=directory)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        with contextlib.suppress(FileNotFoundError):
            _remove_tree(directory, name)


# Every directory of a user's tree is opened so: never through a link, and never an open that
# waits (a FIFO, a device). shutil.rmtree opens each with O_RDONLY alone, after an lstat: a user
# swapping a directory of theirs for a FIFO in between (renameat2 RENAME_EXCHANGE, in a loop)
# had the pickup's thread wait for a writer for ever, and with it every later look (a local
# user's pass, on a running instance: the 10th second of its loop).
_TREE_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _remove_tree(parent: int, name: str) -> None:
    """Remove the directory `name` below `parent` and what is inside, through descriptors: each
    entry is unlinked (a name, never opened), each directory opened with _TREE_FLAGS, so that
    whatever is swapped in meanwhile fails at once (ENOTDIR, ELOOP) instead of blocking.
    RecursionError for a tree too deep, OSError for what cannot be removed."""
    fd = os.open(name, _TREE_FLAGS, dir_fd=parent)
    try:
        for entry in os.listdir(fd):
            _remove_entry(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


def _remove(directory: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=directory)
    os.fsync(directory)  # removed for good: a crash must not bring it back after its queue item


def _owner(directory: int, name: str) -> int | str:
    try:
        return os.stat(name, dir_fd=directory, follow_symlinks=False).st_uid
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "?")


def _log_receipt(submission: maildrop.Submission, size: int, nrcpt: int, what: str = "") -> None:
    log.log(
        logging.WARNING if what else logging.INFO,
        "%s: uid=%d from=<%s>, size=%d, nrcpt=%d (maildrop)%s",
        submission.queue_id,
        submission.uid,
        submission.sender,
        size,
        nrcpt,
        what,
    )


def _check_hops(message: bytes) -> None:
    """A message that has been through too many MTAs is a mail loop: refused like any other
    file SMTP would refuse (maildrop.read's checks), as the SMTP session refuses it (554)."""
    if problem := loop_problem(message):
        raise maildrop.Invalid(problem)


def _bounced(address: str, status: str, text: str) -> RecipientStatus:
    return RecipientStatus(address, "failed", status, text, None)


def _line(reply: Reply) -> str:
    return f"{reply.code} {reply.status} {reply.text}"

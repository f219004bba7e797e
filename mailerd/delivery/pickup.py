"""The pickup: mail that local users handed to `sendmail`, moved from the maildrop to the queue.

Runs in the delivery process, as the children's user, which owns `<queue>/maildrop` (see
`maildrop` for how files get there). It looks at the maildrop when started (mail dropped while
mailerd was stopped waits there), whenever `sendmail` writes to the FIFO `public/pickup`, and
once a minute in case a poke was missed.

Each file is untrusted input (`maildrop.read` validates it; an invalid one is logged with its
owner and removed). Its recipients are routed as a trusted (local) client's would be, aliases
included (`recipients.resolve`), and the message becomes one queue item (our Received: header,
which names the submitting uid, then the message) whose local recipients the scheduler delivers
at once and whose remote ones it relays. A recipient that cannot exist (an unknown user, an
alias loop) is bounced to the sender. The queue item is durable before the file is removed,
and its id comes from the file's name: if mailerd dies in between, the next pickup finds the
item already queued and only removes the file, so nothing is lost and nothing is doubled.

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
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from mailerd import durable, policy, recipients, signing, trace
from mailerd.aliases import normal_address
from mailerd.config import Config
from mailerd.delivery.dsn import RecipientStatus
from mailerd.delivery.queue import Queue, QueueItem, Recipient
from mailerd.ipc import maildrop
from mailerd.smtp.events import Reply
from mailerd.smtp.grammar import GrammarError, parse_address
from mailerd.spool import Spool

log = logging.getLogger("mailerd.pickup")

RESCAN = 60.0  # seconds between looks without a poke


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
    ) -> None:
        """`queue.root` and `spool.root` may be /proc/self/fd paths (privileges.keep_dir);
        `queued` is told of each new queue item, in the event loop."""
        self.cfg = cfg
        self.queue = queue
        self.spool = spool
        self.executor = executor
        self.queued = queued
        self.wake = asyncio.Event()
        self.reported: dict[str, str] = {}  # a file's last logged problem: said once

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
        if fifo is not None:
            loop.add_reader(fifo, self._poked, fifo)
        try:
            while True:
                self.wake.clear()
                await self.scan(directory)  # (at once too: a poke may have found no reader)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), RESCAN)
        finally:
            if fifo is not None:
                loop.remove_reader(fifo)
                os.close(fifo)
            os.close(directory)

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
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(fifo, 4096):
                pass
        self.wake.set()

    async def scan(self, directory: int) -> int:
        """Take every submission now in the maildrop; how many became queue items."""
        loop = asyncio.get_running_loop()
        names = await loop.run_in_executor(self.executor, _submissions, directory)
        count = 0
        for name in names:
            taken = await loop.run_in_executor(self.executor, self.take, directory, name)
            if taken is not None:
                self.queued(taken)
                count += 1
        self.reported = {n: r for n, r in self.reported.items() if n in names}
        return count

    def take(self, directory: int, name: str) -> Taken | None:
        """Validate one file and make it a queue item, then remove it (in a thread)."""
        try:
            submission = maildrop.read(directory, name, self.cfg.max_message_size)
        except FileNotFoundError:
            return None
        except maildrop.Invalid as exc:
            log.warning("maildrop %s (uid %s): %s; removed", name, _owner(directory, name), exc)
            _remove(directory, name)
            return None
        except OSError as exc:
            self._report_once(name, f"cannot read it: {exc.strerror or exc}")
            return None
        if self.queue.read(submission.queue_id) is not None:
            log.info("%s: already queued from the maildrop; removing its file", name)
            _remove(directory, name)
            return None
        item, refused = self._item(submission)
        head = trace.received_local(
            uid=submission.uid, hostname=self.cfg.hostname, queue_id=submission.queue_id
        )
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
        log.info(
            "%s: uid=%d from=<%s>, size=%d, nrcpt=%d (maildrop)",
            item.id,
            submission.uid,
            submission.sender,
            len(submission.message),
            len(item.recipients),
        )
        for part in (local, item) if local is not None else (item,):
            for r in part.recipients:
                if r.state == "pending":
                    log.info("%s: to=<%s>, relay=queue, status=queued", part.id, r.address)
        return Taken(item, refused, local)

    def _signature(self, item: QueueItem, message: bytes) -> bytes:
        """DKIM-Signature fields for the item's remote copies, if any leave (see `signing`)."""
        keys = self.cfg.dkim_keys
        if not keys or not any(r.mailbox is None and r.state == "pending" for r in item.recipients):
            return b""
        try:
            signature, domain = signing.sign_message(durable.read_body(message), keys)
        except Exception as exc:  # dkimpy refuses what it cannot parse: unsigned, and say why
            log.warning("%s: not DKIM-signed: %s", item.id, exc)
            return b""
        if domain is not None:
            log.info("%s: DKIM-signed for %s", item.id, domain)
        return signature

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
                key = f"/{recipient.mailbox}" if recipient.mailbox else normal_address(text)
                queued.setdefault(key, recipient)
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
            local_domains=cfg.domains,
            aliases=cfg.aliases,
            spool=self.spool,
            spool_path=str(cfg.spool),
        )
        if resolved.refusal is None:
            return [(Recipient(t.address, mailbox=t.mailbox), None) for t in resolved.targets]
        reply = resolved.refusal
        if reply.code >= 500:
            status = _bounced(text, reply.status or "5.0.0", reply.text)
            return [(Recipient(text, state="bounced", last_error=_line(reply)), status)]
        # A mailbox that cannot take mail now (an mbox file in its place): its copies wait in
        # the queue and are retried like any other, so the sender hears of the delay.
        route = policy.route(address, trusted=True, local_domains=cfg.domains, aliases=cfg.aliases)
        boxes = (
            (route.mailbox,)
            if isinstance(route, policy.Local)
            else route.mailboxes
            if isinstance(route, policy.Alias)
            else ()
        )
        forwards = route.forwards if isinstance(route, policy.Alias) else ()
        waiting = [Recipient(text, mailbox=box, last_error=_line(reply)) for box in boxes]
        return [(r, None) for r in waiting + [Recipient(f) for f in forwards]]

    def _report_once(self, name: str, problem: str) -> None:
        if self.reported.get(name) != problem:
            self.reported[name] = problem
            log.error("maildrop %s: %s; it stays there and is tried again", name, problem)


PICKUP = f"{maildrop.PUBLIC}/{maildrop.PICKUP_FIFO}"


def _submissions(directory: int) -> list[str]:
    """The maildrop's submissions, oldest first (names alone sort by millisecond only)."""
    found = []
    for name in os.listdir(directory):
        if maildrop.is_submission_name(name):
            with contextlib.suppress(FileNotFoundError):
                found.append((os.stat(name, dir_fd=directory).st_mtime_ns, name))
    return [name for _, name in sorted(found)]


def _remove(directory: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=directory)
    os.fsync(directory)  # removed for good: a crash must not bring it back after its queue item


def _owner(directory: int, name: str) -> int | str:
    try:
        return os.stat(name, dir_fd=directory, follow_symlinks=False).st_uid
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "?")


def _bounced(address: str, status: str, text: str) -> RecipientStatus:
    return RecipientStatus(address, "failed", status, text, None)


def _line(reply: Reply) -> str:
    return f"{reply.code} {reply.status} {reply.text}"

"""The delivery process: the only writer of the spool (through its mailbox writer) and the queue.

Workers send each finished message with a remote recipient over their channel (see `ipc.channel`);
for each request this process writes the message durably — remote recipients into the outbound
queue first, then each local mailbox — and answers once, so the worker can say 250. Partial
success is not answered with a 451 (which would duplicate the mailboxes already written): a
local recipient whose mailbox failed is queued for a later local retry, and only if that fails
too does the worker get 4xx.

Mailboxes are written by the privileged mailbox writer (`writer`), which batches what piles up
for one mailbox; the master starts it, and another at once whenever it dies, and hands each to
this process over their link (`WriterStarted`). A message whose recipients are all local goes
from the worker straight to that writer, over a channel this process hands out
(`WriterChannel`); the worker comes back here only with copies that failed (`RetryLocal`).
A copy whose writer died before answering may or may not be written: it is written again at
once, through the next writer, as a redelivery (the writer finds it if it is there already), and
only queued when that fails too. Queue files are written here, in a small thread pool, and the
outbound scheduler (`scheduler`) works the queue from this process too; when a writer comes
back, the local retries waiting in the queue go at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Any

from mailerd import (
    durable,
    eventloop,
    forwarding,
    headers,
    intake,
    lifecycle,
    privileges,
    signing,
    trace,
)
from mailerd.aliases import normal_address
from mailerd.commands.sendmail import qualify_header
from mailerd.config import Config, ConfigError
from mailerd.delivery.pickup import Pickup, Taken
from mailerd.delivery.queue import Queue, QueueItem, Recipient
from mailerd.delivery.scheduler import AFTER_ATTEMPT, Scheduler
from mailerd.delivery.secrets import NO_SECRETS, Secrets
from mailerd.ipc.channel import Channel
from mailerd.ipc.messages import (
    BadMessage,
    Commit,
    Deleted,
    DeleteQueued,
    Flushed,
    FlushQueue,
    ListQueue,
    Message,
    QueueListing,
    Refused,
    RetryLocal,
    WriterChannel,
    WriterChannelGiven,
    WriterStarted,
    decode_request,
)
from mailerd.ipc.writer_client import WriterHandle
from mailerd.lifecycle import DRAIN_TIMEOUT
from mailerd.signing import SigningKey
from mailerd.smtp.events import Reply
from mailerd.spool import MailboxLocked, Spool

log = logging.getLogger("mailerd.delivery")

# What workers and `mailerd queue` may ask of this process (ipc.messages).
SERVED = (Commit, RetryLocal, WriterChannel, ListQueue, FlushQueue, DeleteQueued)

LOCAL_RETRY_DELAY = 60.0
PICKUP_RESTART = 60.0  # seconds before a failed pickup starts again
QUEUE_WAIT = 20.0  # seconds a queue request waits for the queue (the tool waits 30)


class DeliveryService:
    def __init__(
        self,
        cfg: Config,
        listener: socket.socket,
        link: socket.socket,
        secrets: Secrets = NO_SECRETS,
    ) -> None:
        """`link`: this process's end of the master's socketpair, over which its mailbox
        writers come (`WriterStarted`); `secrets`: read by `run` while still root."""
        self.cfg = cfg
        self.dkim_keys = secrets.dkim_keys
        self.listener = listener
        self.link = link
        untrusted = privileges.lookup(cfg.user).uid if cfg.user else None
        self.spool = Spool(cfg.spool, untrusted)  # read-only here: existence checks
        self.writer = WriterHandle(self._writer_back, self._writer_lost)
        self.writers_seen = 0
        self.queue = Queue(cfg.queue)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="queue")
        self.channels: set[Channel] = set()
        self.in_flight = 0
        self.stopping = asyncio.Event()
        self.scheduler = Scheduler(cfg, self.queue, self.deliver_local, secrets, self.spool)
        self.pickup = Pickup(
            cfg, self.queue, self.spool, self.executor, self._picked_up, secrets.dkim_keys
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if lifecycle.stop_requested():  # (told to stop while it started: see child_signals)
            self.stopping.set()
        master = Channel(self.link, self._from_master, self._master_gone)
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)
        scheduler = asyncio.create_task(self.scheduler.run(before=self.pickup.first))
        scheduler.add_done_callback(_log_failure)
        pickup = asyncio.create_task(self._pick_up())
        await self.stopping.wait()
        pickup.cancel()
        loop.remove_reader(self.listener.fileno())
        # Our copy only (the master keeps the socket for the next delivery process): without a
        # master, connects are then refused at once, and a new mailerd may start on this
        # queue while we finish (listeners.bind_unix).
        self.listener.close()
        stopping_outbound = asyncio.create_task(self.scheduler.stop())
        await self._drain()
        await stopping_outbound
        scheduler.cancel()
        self.writer.close()
        master.close()
        self.executor.shutdown(wait=True)

    async def _drain(self) -> None:
        """Finish requests in flight; workers close their channels as they exit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        while (self.in_flight or self.channels) and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def _pick_up(self) -> None:
        """The maildrop's pickup, once this process works the queue (after a reload the old
        delivery process may still, until it is done) and the first look is done."""
        await self.scheduler.ready.wait()
        while True:
            try:
                await self.pickup.run()
            except Exception:  # (a file costs only itself: this is a bug, or the maildrop gone)
                log.exception("the maildrop's pickup failed; it starts again in a minute")
            await asyncio.sleep(PICKUP_RESTART)

    def _picked_up(self, taken: Taken) -> None:
        task = asyncio.create_task(self._schedule(taken))
        task.add_done_callback(_log_failure)

    async def _schedule(self, taken: Taken) -> None:
        """A new queue item from the maildrop: its refused recipients' bounce first (it reads
        the queued message, which a quick delivery of the others would remove), then the
        scheduler."""
        if taken.refused:
            await self.scheduler.refuse(taken.item, taken.refused)
        for item in (taken.local, taken.item):
            if item is not None and any(r.state == "pending" for r in item.recipients):
                self.scheduler.add(item)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        holder: list[Channel] = []
        channel = Channel(
            sock,
            lambda h, b, fd: self._on_request(holder[0], h, b, fd),
            lambda: self.channels.discard(holder[0]),
        )
        holder.append(channel)
        self.channels.add(channel)

    async def deliver_local(
        self, mailbox: str, head: bytes, body: durable.Body, since: float | None = None
    ) -> int:
        """Write one message into a mailbox (for the scheduler: queued local copies and
        bounces); `since` marks a redelivery (see mailbox.Delivery)."""
        return await self.writer.deliver(mailbox, head, body, since)

    def _from_master(self, header: dict[str, Any], body: bytes, fd: int | None) -> None:
        """A frame on the master's link: a new mailbox writer's channel."""
        try:
            decode_request(header, (WriterStarted,))
            if fd is None:
                raise BadMessage("no writer's channel beside it")
        except BadMessage as exc:
            log.error("the master's link: %s", exc)
            if fd is not None:
                os.close(fd)
            return
        self.writer.attach(socket.socket(fileno=fd))

    def _master_gone(self) -> None:
        """The master exited (no writer will come again): stop, as the workers do."""
        if not self.stopping.is_set():
            log.error("the master went away; stopping")
            self.stopping.set()

    def _writer_back(self) -> None:
        self.writers_seen += 1
        if self.writers_seen > 1:
            log.info("a new mailbox writer took over")
        self.scheduler.retry_local_now()  # what waits in the queue for a mailbox: now

    def _writer_lost(self) -> None:
        if not self.stopping.is_set():
            log.warning("the mailbox writer went away; its requests in flight are written again")

    async def control(self, request: Message) -> Message:
        """`mailerd queue` requests: list, flush, delete. A flush or a delete waits until this
        process has the queue (after a reload, the previous one may hold it for the grace of
        its stop): answered before, it found nothing, and said "not in the queue" of an item
        the previous process then delivered (a reviewer's finding). It waits QUEUE_WAIT at
        most, less than the tool does, and is then refused: done after the tool had given up,
        it deleted what the tool had said it did not (a second attacker's pass)."""
        if isinstance(request, FlushQueue | DeleteQueued):
            try:
                await asyncio.wait_for(self.scheduler.taken.wait(), QUEUE_WAIT)
            except TimeoutError:
                return Refused(
                    "the previous delivery process (before a reload) still has the queue; "
                    "nothing done: try again in a minute"
                )
        if isinstance(request, ListQueue | FlushQueue) and self.scheduler.lock_fd is not None:
            await self.scheduler.rescan()
        if isinstance(request, ListQueue):
            return QueueListing(tuple(asdict(e) for e in self.scheduler.items.values()))
        if isinstance(request, FlushQueue):
            return Flushed(self.scheduler.flush())
        assert isinstance(request, DeleteQueued)
        done = {i: await self.scheduler.delete(i) for i in dict.fromkeys(request.ids)}
        later = tuple(i for i, what in done.items() if what == AFTER_ATTEMPT)
        return Deleted(tuple(i for i, what in done.items() if what), later)

    def _on_request(
        self, channel: Channel, header: dict[str, Any], body: bytes, fd: int | None
    ) -> None:
        self.in_flight += 1
        asyncio.create_task(self._serve(channel, header, body, fd))

    async def _serve(
        self, channel: Channel, header: dict[str, Any], body: bytes, fd: int | None
    ) -> None:
        try:
            request = decode_request(header, SERVED)
        except BadMessage as exc:
            log.error("a request this process does not serve: %s", exc)
            request = Refused(str(exc))
        if not isinstance(request, Commit | RetryLocal):  # a request that writes no message
            self.in_flight -= 1
            if fd is not None:
                os.close(fd)  # none of these takes a descriptor
            if isinstance(request, WriterChannel):
                await self._hand_out_writer(channel, header)
                return
            answer = request if isinstance(request, Refused) else await self.control(request)
            self._answer(channel, header, answer)
            return
        try:
            content = body if fd is None else fd
            if isinstance(request, RetryLocal):
                reply = await self.retry_local(request, content)
            else:
                reply = await self.commit(request, content)
        except Exception:  # never let one bad request kill the process
            log.exception("commit failed")
            reply = intake.IO_ERROR
        finally:
            if fd is not None:
                os.close(fd)
            self.in_flight -= 1
        self._answer(channel, header, intake.outcome(reply))

    def _answer(self, channel: Channel, header: dict[str, Any], answer: Message) -> None:
        if not channel.closed:
            channel.send({"id": header.get("id"), **answer.encode()})

    async def commit(self, request: Commit, body: durable.Body) -> Reply:
        """Make one message durable for all its recipients; the answer for the worker."""
        queue_id, received = intake.begin(request, self.cfg.hostname, durable.body_size(body))
        forwarded_by: dict[str, str] = {}  # one copy per remote address
        for t in request.targets:
            if t.mailbox is None:
                address = normal_address(t.address)
                kept = forwarded_by.get(address)
                forwarded_by[address] = t.via if kept is None else forwarding.preferred(kept, t.via)
        remote = [Recipient(address, via=via) for address, via in forwarded_by.items()]
        if remote:
            item = self._item(queue_id, request, remote)
            outgoing = await self._outgoing(request, body)
            completion = self._completion(request, queue_id, outgoing)
            head = received + await self._signature(queue_id, request, completion, outgoing)
            head += completion
            try:
                await self._in_thread(self.queue.put, item, head, outgoing)
            except OSError as exc:
                log.error("%s: queue write failed: %s", queue_id, exc)
                return intake.storage_reply(exc)
            self._schedule_queued(item)
            for r in remote:
                log.info("%s: to=<%s>, relay=queue, status=queued", queue_id, r.address)
        since = time.time()
        failed = await intake.write_local(
            self.writer.deliver, queue_id, request.sender, received, body, request.targets
        )
        if failed:
            reply = await self._local_failures(queue_id, request, received, body, failed, since)
            if reply is not None:
                return reply
        return intake.queued(queue_id)

    def _schedule_queued(self, item: QueueItem) -> None:
        """Hand a durably queued item to the scheduler. Whatever that raises, the client gets
        its 250: a 4xx for a message already on disk makes it send the message again, and the
        queue deliver both (an attacker's pass). A rescan finds the item on disk."""
        try:
            self.scheduler.add(item)
        except Exception:
            log.exception("%s: queued, but not scheduled; a rescan of the queue finds it", item.id)

    async def retry_local(self, request: RetryLocal, body: durable.Body) -> Reply:
        """A worker wrote a message's local copies itself and some failed: write again those
        whose writer went away, queue the others."""
        failed = intake.decode_failures(request.failed)
        received = request.received.encode("utf-8")
        reply = await self._local_failures(
            request.queue_id, request.commit, received, body, failed, request.since
        )
        return reply or intake.queued(request.queue_id)

    async def _local_failures(
        self,
        queue_id: str,
        request: Commit,
        received: bytes,
        body: durable.Body,
        failed: list[intake.Failure],
        since: float,
    ) -> Reply | None:
        """Local copies that failed (first sent at `since`): those whose writer went away
        before answering are written again at once, through the writer the master started
        next, as redeliveries (one the dead writer committed is found, not written twice); the
        others, and any that fail again, are queued. None if that all worked (then 250)."""
        lost = [target for target, exc in failed if intake.writer_went_away(exc)]
        if lost:

            def again(mailbox: str, head: bytes, content: durable.Body) -> Awaitable[int]:
                return self.writer.deliver(mailbox, head, content, since)

            still = await intake.write_local(again, queue_id, request.sender, received, body, lost)
            failed = [f for f in failed if not intake.writer_went_away(f[1])] + still
        if not failed:
            return None
        return await self._queue_local_retry(queue_id, request, received, body, failed)

    async def _hand_out_writer(self, channel: Channel, header: dict[str, Any]) -> None:
        """A worker's own connection to the mailbox writer, for messages whose recipients are
        all local: one end goes to the writer, the other back to the worker."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.writer.adopt(theirs.detach())  # the channel closes what it is given
        except Exception as exc:
            ours.close()
            self._answer(channel, header, WriterChannelGiven(f"no mailbox writer: {exc}"))
            return
        if channel.closed:
            ours.close()
            return
        channel.send({"id": header.get("id"), **WriterChannelGiven().encode()}, fd=ours.detach())

    async def _outgoing(self, request: Commit, body: durable.Body) -> durable.Body:
        """The body of the copy that leaves: a trusted client's with the addresses of its
        header's address fields qualified where they lack a domain (`From: root`, which
        receivers refuse), as `sendmail` and Postfix's cleanup do for local mail; others' as
        received. In a thread: the parser reads such a field at about 0.1 ms an address."""
        if not request.trusted:
            return body
        domain: str = self.cfg.domains[0]
        outgoing: durable.Body = await self._in_thread(qualified_body, body, domain)
        return outgoing

    def _completion(self, request: Commit, queue_id: str, body: durable.Body) -> bytes:
        """Date:/Message-ID:/From: for a submission from a local program that lacks them, as an
        MTA should add them before mail leaves (big providers refuse mail without a Message-ID
        or a From:). Only on the outgoing copy: a local mailbox gets the message as received."""
        if not request.trusted:
            return b""
        # (as far as the signer and the From: check look: past 64 KiB, a From: was added again)
        scan = durable.head(body, headers.SCAN)
        return trace.missing_headers(
            scan,
            queue_id=queue_id,
            hostname=self.cfg.hostname,
            when=time.time(),
            sender=request.sender,
        )

    async def _signature(
        self, queue_id: str, request: Commit, completion: bytes, body: durable.Body
    ) -> bytes:
        """The DKIM-Signature fields for the outgoing copy of a trusted client's message (see
        `signing`), made in a thread (a big body takes a while to hash); b"" if none."""
        keys = self.dkim_keys
        if not (keys and request.trusted):
            return b""
        signature: bytes = await self._in_thread(sign_outgoing, queue_id, completion, body, keys)
        return signature

    async def _queue_local_retry(
        self,
        queue_id: str,
        request: Commit,
        received: bytes,
        body: durable.Body,
        failed: list[intake.Failure],
    ) -> Reply | None:
        """Queue the local recipients whose mailbox failed; None if that worked (then 250)."""
        recipients = [Recipient(t.address, mailbox=t.mailbox, last_error=str(e)) for t, e in failed]
        item = self._item(trace.new_id(), request, recipients)
        item.next_attempt = item.created + LOCAL_RETRY_DELAY
        try:
            await self._in_thread(self.queue.put, item, received, body)
        except OSError as exc:
            # The client is told to send again (4xx), and so every copy kept already (written
            # to a mailbox, or queued for a remote address) is made twice: RFC 5321 6.1's
            # choice, a duplicate rather than a loss, but the operator hears of it. Counted as
            # the copies are made: one a mailbox, one a remote address (an attacker's pass).
            written = {t.mailbox for t in request.targets if t.mailbox is not None}
            written -= {t.mailbox for t, _ in failed}
            remote = {normal_address(t.address) for t in request.targets if t.mailbox is None}
            kept = len(written) + len(remote)
            log.error(
                "%s: cannot queue local retry: %s; the client is told to try again, so the "
                "copies kept already (%d: mailboxes written, remote addresses queued) will be "
                "made twice",
                queue_id,
                exc,
                kept,
            )
            first = failed[0][1]  # (the copy's own failure says more than the queue's)
            cause = first if isinstance(first, OSError | MailboxLocked) else exc
            return intake.storage_reply(cause)
        if self.writer.ready and any(intake.writer_went_away(e) for _, e in failed):
            # A writer took over while these failed with the last one (or the retry went
            # to the dying one): its _writer_back has passed, so they go now, not in a minute.
            item.next_attempt = item.created
        self._schedule_queued(item)
        return None

    def _item(self, queue_id: str, request: Commit, recipients: list[Recipient]) -> QueueItem:
        return QueueItem(
            id=queue_id,
            sender=request.sender,
            recipients=recipients,
            smtputf8=request.smtputf8,
            body_8bit=request.body == "8BITMIME",
            inbound=not request.trusted,
            sender_spf=request.sender_spf,
        )

    async def _in_thread(self, func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)


def qualified_body(body: durable.Body, domain: str) -> durable.Body:
    """`body` with DOMAIN added to its header's addresses that have none
    (sendmail.qualify_header), or `body` itself when none lacks one or the header section
    does not end within what is scanned (a field cut there is not read)."""
    scan = durable.head(body, headers.SCAN)
    end = headers.section_end(scan)
    if end == len(scan) == headers.SCAN:
        return body
    section = qualify_header(scan[:end], lambda: domain)
    if section is None:
        return body
    return section + durable.read_body(body)[end:]


def sign_outgoing(
    queue_id: str, completion: bytes, body: durable.Body, keys: tuple[SigningKey, ...]
) -> bytes:
    """The signatures of a message about to be queued (its added headers, then its body)."""
    return signing.sign_queued(queue_id, completion + durable.read_body(body), keys)


def _log_failure(task: asyncio.Task[Any]) -> None:
    """A background task's done-callback: its failure is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())


def run(cfg: Config, listener: socket.socket, link: socket.socket) -> int:
    """Entry point of the forked delivery process (started as root when mailerd is).

    Reads the secret files (the relayhost's login, the DKIM keys: `secrets`), then drops to
    the mail user (reaching the spool and queue through descriptors opened before the drop,
    whatever their parents' modes) and serves until told to stop. Its mailbox writers come
    from the master over `link`.
    """
    try:
        held = Secrets.load(cfg)
    except ConfigError as exc:  # (the master's check passed: they changed since; it retries)
        log.error("the delivery process cannot start: %s", exc)
        return 1
    cfg = replace(cfg, spool=privileges.keep_dir(cfg.spool), queue=privileges.keep_dir(cfg.queue))
    privileges.drop(cfg.user)
    eventloop.run(DeliveryService(cfg, listener, link, held).run())
    return 0

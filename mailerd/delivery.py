"""The delivery process: the only writer of the spool and the queue.

Workers send each finished envelope over their channel (see `channel`); for each request this
process writes the message durably — remote recipients into the outbound queue first, then each
local mailbox — and answers once, so the worker can say 250. Partial success is not answered with
a 451 (which would duplicate the mailboxes already written): a local recipient whose mailbox
failed is queued for a later local retry, and only if that fails too does the worker get 4xx.

Mailbox writes run in a small thread pool, one writer task per mailbox at a time (lockf does not
exclude threads of one process); requests that pile up for a mailbox are committed as a batch
with one directory fsync (group commit), which is what makes 20 clients into one mailbox fast.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mailerd import durable, trace
from mailerd.channel import Channel
from mailerd.config import Config
from mailerd.mailbox import MAILBOX_BUSY, Delivery, MailboxLocked, Spool
from mailerd.queue import Envelope, Queue, Recipient
from mailerd.smtp.events import Reply

log = logging.getLogger("mailerd.delivery")

MAX_BATCH = 64
LOCAL_RETRY_INTERVAL = 60.0
DRAIN_TIMEOUT = 60.0


class MailboxWriter:
    """Serialises one mailbox's deliveries and commits whatever queued up as one batch."""

    def __init__(self, name: str, spool: Spool, executor: ThreadPoolExecutor, done: Any) -> None:
        self.name = name
        self._spool = spool
        self._executor = executor
        self._done = done
        self._waiting: collections.deque[tuple[Delivery, asyncio.Future[int]]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def submit(self, message: Delivery) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = [self._waiting.popleft() for _ in range(min(MAX_BATCH, len(self._waiting)))]
            messages = [m for m, _ in batch]
            try:
                numbers = await loop.run_in_executor(
                    self._executor, self._spool.deliver, self.name, messages
                )
            except (OSError, MailboxLocked) as exc:
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), number in zip(batch, numbers, strict=True):
                future.set_result(number)
        self._task = None
        self._done(self.name)


class DeliveryService:
    def __init__(self, cfg: Config, listener: socket.socket) -> None:
        self.cfg = cfg
        self.listener = listener
        self.spool = Spool(cfg.spool)
        self.queue = Queue(cfg.queue)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool")
        self.writers: dict[str, MailboxWriter] = {}
        self.channels: set[Channel] = set()
        self.in_flight = 0
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._accept)
        retry = asyncio.create_task(self._retry_local_loop())
        await self.stopping.wait()
        loop.remove_reader(self.listener.fileno())
        await self._drain()
        retry.cancel()
        self.executor.shutdown(wait=True)

    async def _drain(self) -> None:
        """Finish requests in flight; workers close their channels as they exit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        while (self.in_flight or self.channels) and loop.time() < deadline:
            await asyncio.sleep(0.05)

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

    def _on_request(
        self, channel: Channel, header: dict[str, Any], body: bytes, fd: int | None
    ) -> None:
        self.in_flight += 1
        asyncio.create_task(self._serve(channel, header, body, fd))

    async def _serve(
        self, channel: Channel, header: dict[str, Any], body: bytes, fd: int | None
    ) -> None:
        try:
            reply = await self.commit(header, body if fd is None else fd)
        except Exception:  # never let one bad request kill the process
            log.exception("commit failed")
            reply = durable.IO_ERROR
        finally:
            if fd is not None:
                os.close(fd)
            self.in_flight -= 1
        if not channel.closed:
            channel.send({"id": header.get("id"), **reply_fields(reply)})

    async def commit(self, request: dict[str, Any], body: durable.Body) -> Reply:
        """Make one message durable for all its recipients; the answer for the worker."""
        queue_id = trace.new_id()
        recipients = request["recipients"]
        received = trace.received(
            helo=request["helo"],
            peer_ip=request["peer"],
            hostname=self.cfg.hostname,
            protocol=request["protocol"],
            queue_id=queue_id,
            recipient=recipients[0]["address"] if len(recipients) == 1 else None,
        )
        sender = request["sender"]
        log.info(
            "%s: client=[%s], helo=%s, from=<%s>, size=%d, nrcpt=%d",
            queue_id,
            request["peer"],
            request["helo"],
            sender,
            len(body) if isinstance(body, bytes) else os.fstat(body).st_size,
            len(recipients),
        )
        remote = [Recipient(r["address"]) for r in recipients if r["mailbox"] is None]
        if remote:
            envelope = self._envelope(queue_id, request, remote)
            try:
                await self._in_thread(self.queue.put, envelope, received, body)
            except OSError as exc:
                log.error("%s: queue write failed: %s", queue_id, exc)
                return durable.error_reply(exc)
            for r in remote:
                log.info("%s: to=<%s>, relay=queue, status=queued", queue_id, r.address)
        failed = await self._deliver_local(queue_id, sender, received, body, recipients)
        if failed:
            reply = await self._queue_local_retry(queue_id, request, received, body, failed)
            if reply is not None:
                return reply
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    async def _deliver_local(
        self, queue_id: str, sender: str, received: bytes, body: durable.Body, recipients: list
    ) -> list[tuple[dict[str, Any], Exception]]:
        head = trace.return_path(sender) + received
        local = [r for r in recipients if r["mailbox"] is not None]
        # One copy per mailbox even if two addresses (user, user+tag) map to it.
        by_mailbox: dict[str, dict[str, Any]] = {}
        for r in local:
            by_mailbox.setdefault(r["mailbox"], r)
        futures = [self._writer(name).submit(Delivery(head, body)) for name in by_mailbox]
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = []
        for (name, r), result in zip(by_mailbox.items(), results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "%s: to=<%s>, relay=local, status=deferred (%s)", queue_id, r["address"], result
                )
                failed.append((r, result))
            else:
                log.info(
                    "%s: to=<%s>, relay=local, status=sent (mailbox %s, message %d)",
                    queue_id,
                    r["address"],
                    name,
                    result,
                )
        return failed

    async def _queue_local_retry(
        self,
        queue_id: str,
        request: dict[str, Any],
        received: bytes,
        body: durable.Body,
        failed: list,
    ) -> Reply | None:
        """Queue the local recipients whose mailbox failed; None if that worked (then 250)."""
        recipients = [
            Recipient(r["address"], mailbox=r["mailbox"], last_error=str(e)) for r, e in failed
        ]
        envelope = self._envelope(trace.new_id(), request, recipients)
        envelope.next_attempt = envelope.created + LOCAL_RETRY_INTERVAL
        try:
            await self._in_thread(self.queue.put, envelope, received, body)
            return None
        except OSError as exc:
            log.error("%s: cannot queue local retry: %s", queue_id, exc)
            first = failed[0][1]
            if isinstance(first, MailboxLocked):
                return MAILBOX_BUSY
            return durable.error_reply(first if isinstance(first, OSError) else exc)

    def _envelope(
        self, queue_id: str, request: dict[str, Any], recipients: list[Recipient]
    ) -> Envelope:
        return Envelope(
            id=queue_id,
            sender=request["sender"],
            recipients=recipients,
            smtputf8=bool(request.get("smtputf8")),
            body_8bit=request.get("body") == "8BITMIME",
        )

    def _writer(self, name: str) -> MailboxWriter:
        writer = self.writers.get(name)
        if writer is None:
            writer = self.writers[name] = MailboxWriter(
                name, self.spool, self.executor, self._writer_done
            )
        return writer

    def _writer_done(self, name: str) -> None:
        self.writers.pop(name, None)

    async def _in_thread(self, func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    async def _retry_local_loop(self) -> None:
        """Retry queued local recipients (their mailbox failed at receipt) until delivered."""
        while True:
            try:
                await self._retry_local_once()
            except Exception:
                log.exception("local retry pass failed")
            await asyncio.sleep(LOCAL_RETRY_INTERVAL)

    async def _retry_local_once(self) -> None:
        for envelope in await self._in_thread(self.queue.load):
            pending = [r for r in envelope.recipients if r.mailbox and r.state == "pending"]
            if not pending or envelope.next_attempt > time.time():
                continue
            path = str(self.queue.message_path(envelope.id))
            head = trace.return_path(envelope.sender)
            with open(path, "rb") as f:
                body = f.read()
            for r in pending:
                try:
                    await self._writer(r.mailbox).submit(Delivery(head, body))
                    r.state = "sent"
                except (OSError, MailboxLocked) as exc:
                    r.attempts += 1
                    r.last_error = str(exc)
            if all(r.state != "pending" for r in envelope.recipients):
                await self._in_thread(self.queue.remove, envelope.id)
            else:
                envelope.next_attempt = time.time() + LOCAL_RETRY_INTERVAL
                await self._in_thread(self.queue.update, envelope)


def reply_fields(reply: Reply) -> dict[str, Any]:
    return {"code": reply.code, "status": reply.status, "text": reply.text}


def run(cfg: Config, listener: socket.socket) -> int:
    """Entry point of the forked delivery process."""
    asyncio.run(DeliveryService(cfg, listener).run())
    return 0

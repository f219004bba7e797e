"""The mailbox writer's process: the one small part of mailerd that keeps root.

Mailboxes belong to their users (0700/0600), so writing them needs privilege, while the
delivery process speaks SMTP to the Internet and must not have it. So the master (root) forks a
writer for each delivery process and hands the delivery process its channel (`run`; again at
once when a writer dies, see `master.arbiter`). The writer parses nothing from the network: it
receives `{"mailbox"}` plus the headers to prepend and the body (inline or as a descriptor) over
a channel, writes with `mailbox.MailboxStore` under lockf, and answers with the message number.
It exits when the delivery process closes that channel. Its clients are in
`ipc.writer_client`.

Besides that first channel, each worker gets one of its own, which the delivery process hands
out (an `Adopt` message carries the writer's end): a message whose recipients are all local then
costs one process hop instead of two. A worker's channel carries mailbox writes only; ops come
from the delivery process alone.

Requests that pile up for one mailbox are committed as one batch with one directory fsync
(group commit), one writer task per mailbox at a time (POSIX locks do not exclude threads of one
process). A small batch of in-memory bodies is written in the event loop's own thread, which
saves two wake-ups per batch; a large one goes to a small thread pool. A mailbox whose lock is
taken (an IMAP server holding it) is tried again and again, without a thread, until its lock
is free or its lock timeout has passed: four users sitting on their own locks held all four threads
for a minute in an attacker's pass, and everyone else's mail waited.

What a worker sends is not trusted: it runs as the unprivileged user, which must not be able
to make root write or read anything but what a delivery writes. A body handed over as a
descriptor must be a regular file of at most the message size limit (one of /dev/zero made
the writer fill the disk as root), and no more of it is copied than it had when checked (it
was enlarged after the check); only the delivery process may ask for a redelivery; and what
waits to be written is bounded (`Backlog`: 8,000 frames sent to a locked mailbox grew the
writer by 300 MB a second), a write past the bound being answered at once with EAGAIN, which
the sender takes as any failed write: it queues the copy for a retry.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from setproctitle import setproctitle

from mailerd import eventloop
from mailerd.ipc.channel import MAX_INLINE, Channel
from mailerd.ipc.messages import (
    Adopt,
    BadMessage,
    Done,
    MailboxWrite,
    Message,
    WriteFailed,
    Written,
    decode_request,
)
from mailerd.spool import MailboxLocked
from mailerd.writer.mailbox import Copy, MailboxStore

log = logging.getLogger("mailerd.spool")

MAX_BATCH = 64
WARM_FOR = 60.0  # s after a mailbox's last commit during which its batches may be written here
WARM_LIMIT = 10000
INLINE_BATCH = 1 << 20  # bytes; a batch this small is written without a thread (_deliver_here)
THREADS = 4  # mailboxes written at once
TIMEOUT = 120.0
FINISH_QUIET = 0.1  # s without a worker's write before the writer closes its channels
FINISH_LIMIT = 5.0
MAX_HEAD = 64 * 1024  # Return-Path: and Received: ahead of a worker's inline body
MAX_WORKER_CHANNELS = 256  # one per live worker is the norm; this bounds the writer's descriptors
MAX_PAUSE = 1.0  # s between two tries of a locked mailbox, at most
# Octets a descriptor's body may exceed the message size limit by: what mailerd prepends or
# adds (Received:, Authentication-Results:, a DKIM signature, a DSN's own parts).
BODY_SLACK = 1 << 20
# Writes received and not yet answered (Backlog): inline octets and body descriptors, for one
# channel and for all of them. A worker has a few of its sessions' messages waiting at once.
CHANNEL_BACKLOG = (32 << 20, 128)
TOTAL_BACKLOG = (256 << 20, 2048)


class Backlog:
    """What waits to be written, per channel and in all, in octets and descriptors."""

    def __init__(self) -> None:
        self.waiting: dict[Channel | None, list[int]] = {}

    def admit(self, channel: Channel, octets: int, fds: int) -> bool:
        """Count a write in if it fits both bounds, or if nothing waits: one write, however
        large (the delivery process sends a queued message inline), always goes."""
        for key, limit in ((channel, CHANNEL_BACKLOG), (None, TOTAL_BACKLOG)):
            held = self.waiting.get(key)
            if held and (held[0] + octets > limit[0] or held[1] + fds > limit[1]):
                return False
        for key in (channel, None):
            held = self.waiting.setdefault(key, [0, 0])
            held[0] += octets
            held[1] += fds
        return True

    def release(self, channel: Channel, octets: int, fds: int) -> None:
        for key in (channel, None):
            held = self.waiting[key]
            held[0] -= octets
            held[1] -= fds
            if held == [0, 0]:
                del self.waiting[key]


class MailboxQueue:
    """Serialises one mailbox's deliveries and commits whatever queued up as one batch.

    A batch is written, all its files fsync'd at once (one AIO submission, `aiofsync`; the
    concurrent fsyncs share the device's cache flushes), then
    numbered and renamed under the lock with one directory fsync. (Staging each message as it
    arrives, overlapping the previous batch's commit, was measured much slower, because the
    fsyncs no longer share commits: the README's benchmark section has the figures.)
    """

    def __init__(
        self,
        name: str,
        spool: MailboxStore,
        executor: ThreadPoolExecutor,
        done: Callable[[str], object],
        alone: Callable[[], bool] = lambda: True,
        warm: dict[str, float] | None = None,
        settled: Callable[[list[asyncio.Future[int]]], None] | None = None,
    ) -> None:
        self.name = name
        self._spool = spool
        self._executor = executor
        self._done = done
        self._alone = alone
        # When each mailbox last had a batch committed, shared by the writers of all mailboxes
        # (they come and go with their queues): recently means made and its account cached.
        self._warm = warm if warm is not None else {}
        self._waiting: collections.deque[tuple[Copy, asyncio.Future[int]]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._settled = settled
        # Kept: asyncio.get_running_loop() costs a getpid() call, and this runs per message.
        self._loop = asyncio.get_running_loop()

    def submit(self, message: Copy) -> asyncio.Future[int]:
        future: asyncio.Future[int] = self._loop.create_future()
        self._waiting.append((message, future))
        if self._task is None:
            self._task = self._loop.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        loop = self._loop
        while self._waiting:
            batch = [self._waiting.popleft() for _ in range(min(MAX_BATCH, len(self._waiting)))]
            started = loop.time()
            messages = [m for m, _ in batch]
            try:
                here = self._is_warm(started) and self._alone() and _small(messages)
                numbers = self._deliver_here(messages) if here else None
                if numbers is None:
                    numbers = await self._deliver_in_pool(messages)
                self._warm[self.name] = loop.time()
            except Exception as exc:  # OSError, MailboxLocked, or a bug: answered either way
                for _, future in batch:
                    future.set_exception(exc)
                self._settle(batch)
                continue
            log.debug(
                "mailbox %s: %d message(s) committed in %.1f ms",
                self.name,
                len(batch),
                (loop.time() - started) * 1000,
            )
            for (_, future), number in zip(batch, numbers, strict=True):
                future.set_result(number)
            self._settle(batch)
        self._task = None
        self._done(self.name)

    def _settle(self, batch: list[tuple[Copy, asyncio.Future[int]]]) -> None:
        """Tell `settled` at once that the batch's futures are done (their callbacks would run
        only in the next loop iteration, which may start with the next batch's fsyncs)."""
        if self._settled is not None:
            self._settled([future for _, future in batch])

    def _is_warm(self, now: float) -> bool:
        if len(self._warm) > WARM_LIMIT:  # names come from the network: keep the dict bounded
            self._warm.clear()  # (the pool then warms each mailbox again, once)
        return now - self._warm.get(self.name, -WARM_FOR) < WARM_FOR

    async def _deliver_in_pool(self, messages: list[Copy]) -> list[int]:
        """Commit a batch in the pool; while the mailbox's lock is held elsewhere, try again
        after a pause (growing to MAX_PAUSE) without holding a thread, for the store's lock
        timeout at most (then MailboxLocked: the copy is queued)."""
        loop = self._loop
        deadline = loop.time() + self._spool.lock_timeout
        deliver = functools.partial(self._spool.deliver, self.name, messages, wait=False)
        pause = 0.01
        while True:
            try:
                return await loop.run_in_executor(self._executor, deliver)
            except MailboxLocked:
                if loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)

    def _deliver_here(self, messages: list[Copy]) -> list[int] | None:
        """Commit a small batch in the event loop's own thread: the handoff to a pool thread and
        back is two wake-ups, a good part of a 250's latency when both cores are busy.

        Only for a mailbox committed in the last WARM_FOR seconds (its directory exists and its
        account is cached: no mkdir, no NSS lookup here, except the account cache's refresh once
        a minute; the first batch in a while goes through the pool) and only while no other
        mailbox is being written, whose commits would otherwise wait behind this one. It blocks
        the loop for about one batch's fsync; frames that arrive meanwhile make the next batch.
        None when the lock is taken (an IMAP server): then the batch goes the pool's way,
        which waits for the lock without blocking us (_deliver_in_pool)."""
        try:
            return self._spool.deliver(self.name, messages, wait=False)
        except MailboxLocked:
            return None


def _small(messages: list[Copy]) -> bool:
    """In-memory bodies, INLINE_BATCH bytes at most (a large body's fsync takes longer)."""
    size = 0
    for message in messages:
        if not isinstance(message.body, bytes):
            return False
        size += len(message.head) + len(message.body)
    return size <= INLINE_BATCH


class WriterService:
    """The writer process's loop: channels in (the delivery process's, and one per worker it
    hands over), mailbox writes out."""

    def __init__(
        self, spool: MailboxStore, sock: socket.socket, max_body: int | None = None
    ) -> None:
        self.spool = spool
        self.sock = sock
        self.max_body = max_body  # octets of a descriptor's body at most (None: no limit)
        self.executor = ThreadPoolExecutor(THREADS, thread_name_prefix="mailbox")
        self.writers: dict[str, MailboxQueue] = {}
        self.closed = asyncio.Event()
        self.channel: Channel | None = None
        self.workers: set[Channel] = set()
        self.outstanding = 0  # mailbox writes received and not yet answered
        # Each write's asker, its descriptor and its inline octets, until its batch settles
        # (_settled answers them all at once).
        self.asking: dict[asyncio.Future[int], tuple[Channel, dict[str, Any], int | None, int]] = {}
        self.backlog = Backlog()
        self.warm: dict[str, float] = {}  # see MailboxQueue

    async def run(self) -> None:
        self.channel = Channel(self.sock, self._on_control, self.closed.set)
        await self.closed.wait()
        await self._finish()
        for channel in list(self.workers):
            channel.close()
        self.executor.shutdown(wait=True)

    async def _finish(self) -> None:
        """Finish what was handed over before the workers' channels close.

        The delivery process's answers cannot be sent, but the data is written and that side,
        having no answer, queues those recipients for a retry. A worker still gets its answers,
        including for what it sent just before the close (until its channel has been quiet for
        FINISH_QUIET, at most FINISH_LIMIT): an answer lost here would be retried and delivered
        twice. What it sends later is never read, fails on its side, and is queued for a retry
        through the next delivery process (the master starts one), which hands out a new writer.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINISH_LIMIT
        quiet_since = loop.time()
        while loop.time() < deadline or self.outstanding:
            if self.outstanding:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= FINISH_QUIET:
                return
            await asyncio.sleep(0.01)

    def _on_control(self, header: dict[str, Any], inline: bytes, fd: int | None) -> None:
        """A frame from the delivery process: an op, or a mailbox write like a worker's."""
        try:
            request = decode_request(header, (Adopt, MailboxWrite))
        except BadMessage:
            request = None  # (answered below, as a worker's would be)
        if isinstance(request, Adopt) and fd is not None:
            if len(self.workers) >= MAX_WORKER_CHANNELS:
                os.close(fd)  # a worker asking again and again: it uses the delivery path
                self._answer(self.channel, header, Done("too many worker channels"))
                return
            self._adopt(fd)
            self._answer(self.channel, header, Done())
        else:
            assert self.channel is not None
            self._on_request(self.channel, header, inline, fd)

    def _adopt(self, fd: int) -> None:
        holder: list[Channel] = []
        channel = Channel(
            socket.socket(fileno=fd),
            lambda h, b, f: self._on_request(holder[0], h, b, f),
            lambda: self.workers.discard(holder[0]),
            max_body=MAX_INLINE + MAX_HEAD,  # larger bodies come as descriptors
        )
        holder.append(channel)
        self.workers.add(channel)

    def _on_request(
        self, channel: Channel, header: dict[str, Any], inline: bytes, fd: int | None
    ) -> None:
        # Callbacks rather than a task per request: this is the hot path of every delivery.
        try:
            request = decode_request(header, (MailboxWrite,))
            if not isinstance(request, MailboxWrite) or request.head > len(inline):
                raise BadMessage("head: longer than the frame's body")
            if request.since is not None and channel is not self.channel:
                raise BadMessage("since: only the delivery process writes a message again")
            limit = None if fd is None else self._check_body(fd)
        except (BadMessage, OSError) as exc:
            if fd is not None:
                os.close(fd)
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            self._answer(channel, header, WriteFailed(f"not a mailbox write: {exc}", code))
            return
        if not self.backlog.admit(channel, len(inline), 0 if fd is None else 1):
            if fd is not None:
                os.close(fd)
            busy = WriteFailed("the mailbox writer has too much waiting", errno.EAGAIN)
            self._answer(channel, header, busy)
            return
        head = inline[: request.head]
        body = inline[request.head :] if fd is None else fd
        future = self._writer(request.mailbox).submit(Copy(head, body, request.since, limit))
        self.outstanding += 1
        self.asking[future] = (channel, header, fd, len(inline))

    def _check_body(self, fd: int) -> int:
        """A descriptor's body must be a regular file no larger than max_body; its size, which
        is all that is copied of it (the sender may enlarge it after this)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadMessage("body: not a regular file")
        if self.max_body is not None and st.st_size > self.max_body:
            raise OSError(errno.EFBIG, f"body of {st.st_size} octets, more than {self.max_body}")
        return st.st_size

    def _settled(self, futures: list[asyncio.Future[int]]) -> None:
        """A batch is done: queue its answers, then send them, one sendmsg() per channel.

        Right here, not in the futures' callbacks: those run in the next loop iteration, and
        a batch of the next requests may be written first, so that the answers wait for its
        fsyncs. Sending each answer at once (an eager channel) avoided that
        wait but cost a sendmsg(), and a wake-up of its worker, per message."""
        channels = set()
        for future in futures:
            channel, header, fd, octets = self.asking.pop(future)
            self.outstanding -= 1
            self.backlog.release(channel, octets, 0 if fd is None else 1)
            try:
                self._written(channel, header, fd, future)
            except Exception:  # a bug: it must not stop the other answers, nor this mailbox
                log.exception("answering a mailbox write failed")
            channels.add(channel)
        for channel in channels:
            channel.flush()

    def _written(
        self,
        channel: Channel,
        header: dict[str, Any],
        fd: int | None,
        future: asyncio.Future[int],
    ) -> None:
        if fd is not None:
            os.close(fd)
        exc = asyncio.CancelledError() if future.cancelled() else future.exception()
        answer: Message
        if exc is None:
            answer = Written(future.result())
        elif isinstance(exc, MailboxLocked):
            answer = WriteFailed("mailbox locked", locked=True)
        elif isinstance(exc, OSError):
            answer = WriteFailed(exc.strerror or str(exc), exc.errno or 5)
        else:
            log.error("mailbox write failed: %r", exc)
            answer = WriteFailed(repr(exc))
        self._answer(channel, header, answer)

    def _answer(self, channel: Channel | None, header: dict[str, Any], answer: Message) -> None:
        if channel is not None and not channel.closed:
            channel.send({"id": header.get("id"), **answer.encode()})

    def _writer(self, name: str) -> MailboxQueue:
        writer = self.writers.get(name)
        if writer is None:
            writer = self.writers[name] = MailboxQueue(
                name,
                self.spool,
                self.executor,
                lambda n: self.writers.pop(n, None),
                lambda: len(self.writers) == 1,
                self.warm,
                self._settled,
            )
        return writer


def run(spool: Path, untrusted_uid: int | None, sock: socket.socket, max_size: int) -> int:
    """Entry point of a mailbox writer, which the master forks (as root when it is) for a
    delivery process: serve that process's channel `sock`, and the workers' channels it hands
    over, until it closes `sock`. `untrusted_uid`: mailerd's unprivileged user (never a
    mailbox's owner); `max_size`: the message size limit."""
    setproctitle("mailerd: mailbox writer")
    # It stops when the delivery process closes its channel, never on a signal aimed at the
    # whole process group (Ctrl-C), so no handed-over message is cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    store = MailboxStore(spool, untrusted_uid=untrusted_uid)
    eventloop.run(WriterService(store, sock, max_size + BODY_SLACK).run())
    return 0

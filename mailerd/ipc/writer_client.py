"""The mailbox writer's clients: the delivery process's handle on it (`WriterHandle`: whichever
writer the master last started for it) and a worker's own channel to it, which the delivery
process hands out. They speak to the writer over a channel only: nothing here imports the
writer (which runs as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

from mailerd import durable
from mailerd.ipc.channel import Client
from mailerd.ipc.messages import (
    Adopt,
    Done,
    MailboxWrite,
    WriterChannel,
    WriterChannelGiven,
    Written,
    write_answer,
)
from mailerd.spool import MailboxLocked

TIMEOUT = 120.0
# How long a request waits for a writer while there is none. The master starts one at once
# when the last died (later only when they keep dying: its back-off); beyond this the caller
# treats the copy as failed (queued for a local retry).
WRITER_WAIT = 5.0


class WriterClient:
    """A handle on the writer: the delivery process's, or a worker's own."""

    def __init__(self, sock: socket.socket, on_broken: Callable[[], None]) -> None:
        self._client = Client(None, TIMEOUT, sock=sock, on_broken=on_broken)

    async def deliver(
        self, mailbox: str, head: bytes, body: durable.Body, since: float | None = None
    ) -> int:
        """Write one message into `mailbox`; its number, or OSError/MailboxLocked. `since`:
        a redelivery (messages.MailboxWrite), not written again if it is there already."""
        request = MailboxWrite(mailbox, len(head), since).encode()
        if isinstance(body, bytes):
            answer = write_answer(await self._client.request(request, head + body))
        else:
            # The channel closes the descriptor it sends; the caller keeps its own.
            answer = write_answer(await self._client.request(request, head, os.dup(body)))
        if isinstance(answer, Written):
            return answer.number
        if answer.locked:
            raise MailboxLocked()
        raise OSError(answer.errno, answer.error)

    async def adopt(self, fd: int) -> None:
        """Give the writer one end of a worker's channel (the channel closes `fd`)."""
        answer = Done.decode(await self._client.request(Adopt().encode(), b"", fd))
        if answer.error is not None:
            raise ConnectionError(answer.error)

    def close(self) -> None:
        self._client.close()


class WriterHandle:
    """The delivery process's handle on the mailbox writer, which outlives any one writer: the
    master starts a writer for the delivery process and another whenever that one dies
    (`attach`). While there is none, requests wait for the next one (WRITER_WAIT at most)
    rather than fail; the requests a dying writer had not answered fail (ConnectionError)."""

    def __init__(self, on_back: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """`on_back`: a writer has been attached (the first one too); `on_lost`: it went away."""
        self._client: WriterClient | None = None
        self._ready = asyncio.Event()
        self._on_back = on_back
        self._on_lost = on_lost
        self._closed = False

    @property
    def ready(self) -> bool:
        return self._client is not None

    def attach(self, sock: socket.socket) -> None:
        """Serve requests through this writer's channel from now on."""
        if self._closed:
            sock.close()
            return
        client = WriterClient(sock, lambda: self._lost(client))
        old, self._client = self._client, client
        if old is not None:  # (the master starts one only when the last is gone)
            old.close()
        self._ready.set()
        self._on_back()

    def _lost(self, client: WriterClient) -> None:
        if self._client is client:
            self._client = None
            self._ready.clear()
            if not self._closed:
                self._on_lost()

    async def get(self) -> WriterClient:
        """The writer, waiting up to WRITER_WAIT for one; ConnectionError if none comes."""
        deadline = asyncio.get_running_loop().time() + WRITER_WAIT
        while self._client is None:
            left = deadline - asyncio.get_running_loop().time()
            if self._closed or left <= 0:
                raise ConnectionError("no mailbox writer")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), left)
        return self._client

    async def deliver(
        self, mailbox: str, head: bytes, body: durable.Body, since: float | None = None
    ) -> int:
        """WriterClient.deliver, through the writer there is (or the next one)."""
        return await (await self.get()).deliver(mailbox, head, body, since)

    async def adopt(self, fd: int) -> None:
        """WriterClient.adopt; `fd` is closed either way."""
        try:
            client = await self.get()
        except BaseException:
            os.close(fd)
            raise
        await client.adopt(fd)

    def close(self) -> None:
        """The writer finishes what it was handed and exits; none is taken after this."""
        self._closed = True
        self._ready.set()  # (wakes any waiter, which then fails)
        if self._client is not None:
            self._client.close()


class WriterLink:
    """A worker's own channel to the writer, asked of the delivery process on first use and
    again after it breaks (the writer died and the master started another, or the delivery
    process was replaced, with a writer of its own)."""

    RETRY_AFTER = 1.0  # after a refusal, commits take the delivery process's path meanwhile

    def __init__(self, delivery: Client) -> None:
        self._delivery = delivery
        self._client: WriterClient | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0

    async def get(self) -> WriterClient:
        """The channel; raises (ConnectionError, TimeoutError) when there is none to be had."""
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                self._client = await self._ask()
            return self._client

    async def _ask(self) -> WriterClient:
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            raise ConnectionError("no mailbox writer channel yet")
        try:
            header, fd = await self._delivery.request_fd(WriterChannel().encode())
            if fd is None:
                error = WriterChannelGiven.decode(header).error
                raise ConnectionError(error or "no mailbox writer channel")
        except Exception:
            self._retry_at = loop.time() + self.RETRY_AFTER
            raise
        client = WriterClient(socket.socket(fileno=fd), lambda: self._lost(client))
        return client

    def _lost(self, client: WriterClient) -> None:
        if self._client is client:
            self._client = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

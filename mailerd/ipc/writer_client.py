"""The mailbox writer's clients: the delivery process's handle on it (over the socketpair it
was started with) and a worker's own channel to it, which the delivery process hands out. They
speak to the writer over a channel only: nothing here imports the writer (which runs as root).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from mailerd import durable
from mailerd.ipc.channel import Client
from mailerd.ipc.messages import (
    Adopt,
    Done,
    MailboxWrite,
    ReopenLogs,
    WriterChannel,
    WriterChannelGiven,
    Written,
    write_answer,
)
from mailerd.spool import MailboxLocked

TIMEOUT = 120.0


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

    async def reopen_logs(self) -> None:
        await self._client.request(ReopenLogs().encode())

    async def adopt(self, fd: int) -> None:
        """Give the writer one end of a worker's channel (the channel closes `fd`)."""
        answer = Done.decode(await self._client.request(Adopt().encode(), b"", fd))
        if answer.error is not None:
            raise ConnectionError(answer.error)

    def close(self) -> None:
        self._client.close()


class WriterLink:
    """A worker's own channel to the writer, asked of the delivery process on first use and
    again after it breaks (the writer is restarted along with the delivery process)."""

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

"""The mailbox writer's clients: the delivery process's handle on it (over the socketpair it
was started with) and a worker's own channel to it, which the delivery process hands out. They
speak to the writer over a channel only: nothing here imports the writer (which runs as root).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from mailerd import durable
from mailerd.ipc.channel import Client
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
        a redelivery (mailbox.Delivery), not written again if it is there already."""
        request: dict[str, Any] = {"mailbox": mailbox}
        if since is not None:
            request["since"] = since
        if isinstance(body, bytes):
            answer = await self._client.request({**request, "head": len(head)}, head + body)
        else:
            # The channel closes the descriptor it sends; the caller keeps its own.
            answer = await self._client.request(request, head, os.dup(body))
        if "number" in answer:
            return int(answer["number"])
        if answer.get("locked"):
            raise MailboxLocked()
        raise OSError(answer.get("errno") or 5, answer.get("error", "spool write failed"))

    async def reopen_logs(self) -> None:
        await self._client.request({"op": "reopen-logs"})

    async def adopt(self, fd: int) -> None:
        """Give the writer one end of a worker's channel (the channel closes `fd`)."""
        answer = await self._client.request({"op": "adopt"}, b"", fd)
        if "error" in answer:
            raise ConnectionError(answer["error"])

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
            answer, fd = await self._delivery.request_fd({"op": "mailbox-channel"})
            if fd is None:
                raise ConnectionError(answer.get("error", "no mailbox writer channel"))
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

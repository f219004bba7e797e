"""The master's delivery socket: a path that answers belongs to a running mailerd; a path of
any length can be bound and reached."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

import pytest

from mailerd.ipc import channel, unixpath
from mailerd.master import listeners


def test_a_socket_with_a_full_backlog_is_in_use(tmp_path: Path):
    """A delivery process too busy to accept (its backlog full: connect says EAGAIN) is still
    a running mailerd's; a socket file nobody listens on is not, and is taken over."""
    path = tmp_path / "delivery.sock"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(path))
    busy.listen(0)
    waiting = []
    try:
        for _ in range(64):  # until the backlog is full
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                client.close()
                break
            waiting.append(client)
        else:
            pytest.fail("the backlog never filled")
        with pytest.raises(OSError, match="another mailerd works this queue"):
            listeners.bind_unix(path)
    finally:
        for client in waiting:
            client.close()
        busy.close()
    taken = listeners.bind_unix(path)  # (nobody listens any more: a stale file)
    taken.close()


def test_a_delivery_socket_deeper_than_a_socket_address_holds(tmp_path: Path):
    """A queue whose delivery socket's path is longer than the 107 bytes of a socket address
    (a checkout under a long home directory) is bound, found answering, and reached by a
    worker's channel: bind() and connect() said "AF_UNIX path too long"."""
    deep = tmp_path / ("q" * 60) / ("u" * 60) / "private"
    deep.mkdir(parents=True)
    path = deep / "delivery.sock"
    assert len(os.fsencode(str(path))) > unixpath.SUN_PATH_MAX
    sock = listeners.bind_unix(path)
    try:
        assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o600

        async def ask() -> dict:
            loop = asyncio.get_running_loop()
            client = channel.Client(str(path), 5.0)
            request = asyncio.ensure_future(client.request({"ping": 1}))
            conn, _ = await asyncio.wait_for(loop.sock_accept(sock), 5)
            frames: list[dict] = []
            served = channel.Channel(conn, lambda h, b, fd: frames.append(h), lambda: None)
            async with asyncio.timeout(5):
                while not frames:
                    await asyncio.sleep(0.01)
            served.send({"id": frames[0]["id"], "pong": frames[0]["ping"]})
            answer = await asyncio.wait_for(request, 5)
            client.close()
            served.close()
            return answer

        sock.setblocking(False)
        assert asyncio.run(ask())["pong"] == 1
        with pytest.raises(OSError, match="another mailerd works this queue"):
            listeners.bind_unix(path)
    finally:
        sock.close()
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own descriptor, gone by now)
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert str(deep) not in held, "the directory's descriptor was left open"

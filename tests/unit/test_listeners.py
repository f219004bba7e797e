"""The master's delivery socket: a path that answers belongs to a running mailerd."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

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

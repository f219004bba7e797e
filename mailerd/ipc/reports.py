"""A child's word to the master about itself: "ready" (a worker accepts), "retired" (it no
longer does) and "error TEXT" (why it could not start).

One datagram each, over a socket pair whose children's end every child inherits. The kernel
stamps each datagram with its sender's pid (SO_PASSCRED), which a process without privileges
cannot forge. So a child speaks for itself only: a worker, which faces the Internet, cannot
say that another is ready or has retired, nor give a sibling's start-up error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

TEXT_LIMIT = 1000  # characters of one word (an error's text is cut there)
DATAGRAM = 4 * TEXT_LIMIT + 16  # bytes read of one (UTF-8), room to spare
# Datagrams the master reads per loop turn: a child that keeps the socket full can neither
# hold the master's loop (reaping, respawning, signals) nor make it buffer without end.
TURN = 64
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def channel() -> tuple[socket.socket, socket.socket]:
    """The master's end and the children's end, both non-blocking (a child never waits on
    the master; a word that finds the socket full is lost, as a reload's wait then ends at
    its timeout)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


def tell(fd: int | None, text: str) -> None:
    """One word to the master over the children's end `fd` (None: no master listens)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):  # the master is gone, or the socket full: see channel
        os.write(fd, text[:TEXT_LIMIT].encode("utf-8", "replace"))


def receive(ours: socket.socket) -> list[tuple[int, str]]:
    """The words waiting (at most TURN), each with the pid the kernel says sent it."""
    words = []
    for _ in range(TURN):
        try:
            data, ancillary, _, _ = ours.recvmsg(DATAGRAM, socket.CMSG_SPACE(_CREDENTIALS.size))
        except (BlockingIOError, InterruptedError):
            break
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDENTIALS.unpack_from(value)[0]
                words.append((pid, data.decode("utf-8", "replace")))
    return words

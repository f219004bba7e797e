"""A worker's reports to the master about itself: "ready" (it accepts), "retired" (it no longer
does) and "error TEXT" (why it could not start).

One datagram each, over a socket pair of the worker's own, made when the master forks it; no
other child holds either end. So a worker speaks for itself only (it cannot say that another is
ready or has retired, nor give a sibling's start-up error), and one that floods its socket
fills its own buffer, not the others': their reports still arrive. A worker has at most three
things to say in its life; the master stops listening to one that says more (REPORTS_MAX).
"""

from __future__ import annotations

import contextlib
import os
import socket

TEXT_LIMIT = 1000  # characters of one report (an error's text is cut there)
DATAGRAM = 4 * TEXT_LIMIT + 16  # bytes read of one (UTF-8), room to spare
REPORTS_MAX = 4  # reports heard from one worker: "ready", "retired", or "error", and a spare


def channel() -> tuple[socket.socket, socket.socket]:
    """The master's end and the worker's, both non-blocking: a worker never waits on the
    master (a report that finds its socket full is lost, and only its own can be full)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


def tell(fd: int | None, text: str) -> None:
    """One report to the master over the worker's end `fd` (None: no master listens)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):  # the master is gone, or the socket full: see channel
        os.write(fd, text[:TEXT_LIMIT].encode("utf-8", "replace"))


def receive(ours: socket.socket, most: int) -> list[str]:
    """The reports waiting on the master's end, at most `most` of them."""
    heard = []
    for _ in range(most):
        try:
            data = ours.recv(DATAGRAM)
        except (BlockingIOError, InterruptedError):
            break
        heard.append(data.decode("utf-8", "replace"))
    return heard

"""Free space, looked at before the data: MAIL is answered `452 4.3.1 Insufficient system
storage` when the spool's or the queue's file system has less free than --min-free (as Postfix's
queue_minfree; by default 1.5 times the largest message allowed), or less than that plus the
SIZE the client declares. A client is thus turned away before it sends a message that could be
stored in some mailboxes and not in others (a 452 after some copies are written would make its
retry duplicate them). Should space still run out during the data, the write fails as a whole
for the copies it concerns and the client hears 452 (see `intake.storage_reply`).

statvfs is a system call per file system; the answer is kept for a second, which is well below
the time it takes to fill a reserve of tens of megabytes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

from mailerd.intake import DISK_FULL
from mailerd.log import Throttle
from mailerd.smtp.events import Reply

log = logging.getLogger("mailerd.worker")

TTL = 1.0  # seconds an answer of statvfs is used
REPORT_EVERY = 60.0  # seconds between log lines about the same shortage


class Reserve:
    def __init__(
        self,
        paths: Sequence[tuple[str, str]],
        min_free: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`paths`: (name for the log, a path on the file system) for each one to watch."""
        self.paths = list(paths)
        self.min_free = min_free
        self.clock = clock
        self._checked = -TTL
        self._free: list[int | None] = []
        self._reports = Throttle(REPORT_EVERY, clock=clock)

    def check(self, size: int | None) -> Reply | None:
        """None when a message of `size` (if declared) leaves the reserve intact; else 452."""
        needed = self.min_free + (size or 0)
        for (name, path), free in zip(self.paths, self.free(), strict=True):
            if free is not None and free < needed:
                self._report(name, path, free, needed)
                return DISK_FULL
        return None

    def free(self) -> list[int | None]:
        """Bytes available to unprivileged writers on each file system (None: unknown)."""
        now = self.clock()
        if now - self._checked >= TTL:
            self._free = [_available(path) for _, path in self.paths]
            self._checked = now
        return self._free

    def _report(self, name: str, path: str, free: int, needed: int) -> None:
        if not self._reports.due():
            return
        log.warning(
            "the %s's file system has %d MB free, less than the %d MB needed (--min-free and "
            "the declared size): MAIL is answered 452 4.3.1 until there is room (%s)",
            name,
            free // 1_000_000,
            needed // 1_000_000 + 1,
            path,
        )


def _available(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize

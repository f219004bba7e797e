"""How many recipients at other domains each authenticated account sent to lately, shared by
all workers, for --max-recipients-per-day (`worker.sendlimit` decides with it).

A thief with a user's password sends spam through us until someone notices; the limit bounds
what one account can send in a day, whichever worker its sessions land on. The master maps the
table before it forks (as `authfailures`), keeps it across reloads (a reload forks new workers
on the same pages), and a restart forgets it: a thief gets one more day's worth at most, and
only when the operator restarts mailerd, which a thief cannot do.

The window slides by the hour: each account's cell has SLOTS counts, one per hour (of
`time.monotonic`, which no clock change moves), and a recipient counts for the hour it was sent
in and the WINDOW hours after it, 24 to 25 hours in all. There is no calendar day whose end a
thief could straddle to send twice the limit in a few minutes.

Cells hold int64s: [the account's fingerprint, the hour its limit was last reported + 1, then
(hour + 1, count) per slot] (0 is never used). An account's home bucket is its name's hash (the
same in every forked worker; Python's hash is seeded at random per start, so nobody outside
can aim at a bucket); it takes the first cell of PROBES from there that holds its fingerprint,
else the first idle one (never used, or nothing in its window). A personal server's accounts
fit many times over; when PROBES cells in a row are all busy with others' counts, the account
counts in its home cell's, with its owner: that can only defer early, never let more through.

Writers take a lock (`lockf` on a file of the table's own, made with it before the fork: held
for microseconds, and let go by the kernel if its holder dies, so a worker killed mid-write
cannot stop the others). Without it, two workers adding at once each read, added and wrote, and
two claiming an idle cell at once wiped each other's count: a thief's sessions on two workers,
committing together, lost a quarter of their counts in a test. A count read without it (at
RCPT, to refuse early) may be a moment old; the add at the end of the data decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
import weakref
from collections.abc import Callable, Iterator

BUCKETS = 1024  # accounts that can count at once (416 KiB, shared)
PROBES = 16  # cells an account looks at from its home bucket
SLOTS = 25  # one count per hour
WINDOW = SLOTS - 1  # hours after the one a recipient was sent in that it still counts
_HEAD = 2  # int64s before the slots: fingerprint, the hour of the last report + 1
CELL = _HEAD + 2 * SLOTS
_FINGERPRINT = (1 << 62) - 1


class SentCounts:
    def __init__(self, buckets: int = BUCKETS, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = buckets
        self.clock = clock
        # MAP_SHARED | MAP_ANONYMOUS: the forked workers see the same pages.
        self._map = mmap.mmap(-1, buckets * CELL * 8)
        self._cells = memoryview(self._map).cast("q")
        # (POSIX record locks are per process, which a fork does not share: each worker's
        # lockf on this one file excludes the others')
        self._lock = os.memfd_create("mailerd-sent-counts", os.MFD_CLOEXEC)
        weakref.finalize(self, os.close, self._lock)

    def count(self, account: str, now: float | None = None) -> int:
        """Recipients the account sent to in the window."""
        hour = self._hour(now)
        cell = self._cell(account, hour, claim=False)
        return 0 if cell is None else self._sum(cell, hour)

    def add(
        self, account: str, recipients: int, now: float | None = None, *, limit: int = 0
    ) -> int:
        """The account sent to `recipients` more; its count in the window now. With a
        `limit` that they would pass, they are not added, and the count they would have
        made is returned: one step, so that no other worker sees them in between."""
        hour = self._hour(now)
        with self._locked():
            cell = self._cell(account, hour, claim=True)
            assert cell is not None
            count = self._sum(cell, hour) + recipients
            if limit and count > limit:
                return count
            cells, slot, stamp = self._cells, cell + _HEAD + 2 * (hour % SLOTS), hour + 1
            if cells[slot] != stamp:  # (the slot held an hour that has left the window)
                cells[slot], cells[slot + 1] = stamp, 0
            cells[slot + 1] += recipients
            return count

    def first_report(self, account: str, now: float | None = None) -> bool:
        """Whether the account's reaching its limit is news: not reported in the window yet
        (from now on, it is)."""
        hour = self._hour(now)
        with self._locked():
            cell = self._cell(account, hour, claim=True)
            assert cell is not None
            reported = self._cells[cell + 1]
            if reported and hour + 1 - reported <= WINDOW:
                return False
            self._cells[cell + 1] = hour + 1
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_UN)

    def _cell(self, account: str, hour: int, *, claim: bool) -> int | None:
        """The start of the account's cell; with `claim`, an idle one becomes its own. None:
        it has none (and so no count). All PROBES busy with others: its home cell, shared."""
        h = hash(account)
        fingerprint = ((h >> 10) & _FINGERPRINT) | 1
        home = h % self.buckets
        cells = self._cells
        idle = None
        for probe in range(PROBES):
            cell = (home + probe) % self.buckets * CELL
            if cells[cell] == fingerprint:
                return cell
            if idle is None and self._idle(cell, hour):
                idle = cell
        if idle is None:
            return home * CELL
        if not claim:
            return None
        cells[idle : idle + CELL] = memoryview(bytes(CELL * 8)).cast("q")
        cells[idle] = fingerprint
        return idle

    def _idle(self, cell: int, hour: int) -> bool:
        """Unused, or nothing in it counts any more (neither recipients nor a report)."""
        if self._cells[cell] == 0:
            return True
        reported = self._cells[cell + 1]
        return self._sum(cell, hour) == 0 and not (reported and hour + 1 - reported <= WINDOW)

    def _sum(self, cell: int, hour: int) -> int:
        slots = self._cells[cell + _HEAD : cell + CELL]
        return sum(
            slots[i + 1]
            for i in range(0, 2 * SLOTS, 2)
            if slots[i] and hour + 1 - slots[i] <= WINDOW
        )

    def _hour(self, now: float | None) -> int:
        return int((self.clock() if now is None else now) // 3600)

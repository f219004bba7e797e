"""Open-session counts shared by all workers, for the total and per-address caps at connect.

Each worker accepts on its own, so a cap counted inside one worker would let a client hold
N × workers sessions. The master therefore maps one small anonymous shared table before it
forks anything, and gives each worker a row of it:

    row r:  [ sessions in all | sessions per address bucket 0 … BUCKETS-1 ]   (uint32)

A worker writes only its own row, so no lock is needed (one writer per cell, aligned 32-bit
stores); a check sums one column over every row. When a worker is gone — finished, retired,
or killed with sessions open — the master zeroes its row before handing it out again, so the
sessions of a dead worker are never counted forever.

Addresses are hashed (Python's keyed hash, the same in every forked process) into BUCKETS
buckets; two addresses sharing a bucket share a count, which can only refuse early, never let
more in. Two workers admitting at the same instant may each see the last free place: a cap
can be exceeded by at most one session per other worker.
"""

from __future__ import annotations

import mmap

BUCKETS = 16384
_CELL = 4  # bytes: an unsigned 32-bit count


class SessionTable:
    """The shared table, made by the master; rows are handed to workers with `claim()`."""

    def __init__(self, rows: int, buckets: int = BUCKETS) -> None:
        self.rows = rows
        self.buckets = buckets
        self.stride = buckets + 1
        # mmap(-1, ...) is MAP_SHARED | MAP_ANONYMOUS: forked children see the same pages.
        self._map = mmap.mmap(-1, rows * self.stride * _CELL)
        self.cells = memoryview(self._map).cast("I")
        self._free = list(range(rows - 1, -1, -1))

    def claim(self) -> int | None:
        """A zeroed row for a new worker, or None when all are taken."""
        return self._free.pop() if self._free else None

    def release(self, row: int) -> None:
        """The worker owning `row` has exited: forget its sessions and reuse the row."""
        start = row * self.stride
        self.cells[start : start + self.stride] = memoryview(bytes(self.stride * _CELL)).cast("I")
        self._free.append(row)


class SessionCounter:
    """One worker's counting: checks read every row, updates touch its own."""

    def __init__(self, table: SessionTable, row: int) -> None:
        self._cells = table.cells
        self._buckets = table.buckets
        self._stride = table.stride
        self._rows = range(0, table.rows * table.stride, table.stride)
        self._own = row * table.stride

    def bucket(self, address: str) -> int:
        return 1 + hash(address) % self._buckets

    def total(self) -> int:
        return sum(self._cells[r] for r in self._rows)

    def for_address(self, address: str) -> int:
        column = self.bucket(address)
        return sum(self._cells[r + column] for r in self._rows)

    def opened(self, address: str | None) -> None:
        """A session began; `address` is given when it counts against its address's cap."""
        self._cells[self._own] += 1
        if address is not None:
            self._cells[self._own + self.bucket(address)] += 1

    def closed(self, address: str | None) -> None:
        """The session begun with opened(address) ended."""
        self._decrement(self._own)
        if address is not None:
            self._decrement(self._own + self.bucket(address))

    def _decrement(self, cell: int) -> None:
        if self._cells[cell] > 0:
            self._cells[cell] -= 1


def counter(table: SessionTable | None, row: int | None) -> SessionCounter:
    """A worker's view: its row of the shared table or, with no table or no free row (a worker
    started alone, a full table), a private row that counts its own sessions only."""
    if table is None or row is None:
        return SessionCounter(SessionTable(1), 0)
    return SessionCounter(table, row)

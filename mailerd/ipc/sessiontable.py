"""Open-session counts shared by all workers, for the caps at connect (`worker.admission`):
the sessions of each pool (the listener kinds that share --max-sessions), and per client —
in all, and in the last pool alone (`SHARED_POOL`: admission's known clients', shared out).

Each worker accepts on its own, so a cap counted inside one worker would let a client hold
N × workers sessions. The master therefore maps one small anonymous shared table before it
forks anything, and gives each worker a row of it:

    row r:  [ sessions per pool 0 … POOLS-1 | sessions per client bucket 0 … BUCKETS-1
              | SHARED_POOL's sessions per client bucket 0 … BUCKETS-1 ]
            (uint32 each; the total is the pools' sum)

A worker writes only its own row, so no lock is needed (one writer per cell, aligned 32-bit
stores); a check sums one column over every row. When a worker is gone — finished, retired,
or killed with sessions open — the master zeroes its row before handing it out again, so the
sessions of a dead worker are never counted forever.

Client keys (an address, an IPv6 prefix) are hashed (Python's keyed hash, the same in every
forked process) into BUCKETS buckets; two keys sharing a bucket share a count, which can only
refuse early, never let more in. Two workers admitting at the same instant may each see the
last free place: a cap can be exceeded by at most one session per other worker.
"""

from __future__ import annotations

import functools
import ipaddress
import mmap

BUCKETS = 16384
POOLS = 4  # (worker.admission names them)
SHARED_POOL = POOLS - 1  # its sessions are counted per client a second time, on their own
_CELL = 4  # bytes: an unsigned 32-bit count


class SessionTable:
    """The shared table, made by the master; rows are handed to workers with `claim()`."""

    def __init__(self, rows: int, buckets: int = BUCKETS) -> None:
        self.rows = rows
        self.buckets = buckets
        self.stride = POOLS + 2 * buckets
        # mmap(-1, ...) is MAP_SHARED | MAP_ANONYMOUS: forked children see the same pages.
        self._map = mmap.mmap(-1, rows * self.stride * _CELL)
        self.cells = memoryview(self._map).cast("I")
        self._free = list(range(rows - 1, -1, -1))

    def claim(self) -> int | None:
        """A zeroed row for a new worker, or None when all are taken."""
        return self._free.pop() if self._free else None

    def free(self) -> int:
        """How many rows `claim()` can still hand out."""
        return len(self._free)

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

    def bucket(self, key: str) -> int:
        return POOLS + hash(key) % self._buckets

    def total(self) -> int:
        return sum(self._column(pool) for pool in range(POOLS))

    def in_pool(self, pool: int) -> int:
        return self._column(pool)

    def for_address(self, key: str) -> int:
        """The sessions of a client key (those sharing its bucket included)."""
        return self._column(self.bucket(key))

    def in_shared_pool(self, key: str) -> int:
        """The sessions of a client key in SHARED_POOL (those sharing its bucket included)."""
        return self._column(self.bucket(key) + self._buckets)

    def opened(self, pool: int, key: str | None) -> None:
        """A session began in `pool`; `key` is given when it counts against a client's cap."""
        self._cells[self._own + pool] += 1
        if key is not None:
            column = self._own + self.bucket(key)
            self._cells[column] += 1
            if pool == SHARED_POOL:
                self._cells[column + self._buckets] += 1

    def closed(self, pool: int, key: str | None) -> None:
        """The session begun with opened(pool, key) ended."""
        self._decrement(self._own + pool)
        if key is not None:
            column = self._own + self.bucket(key)
            self._decrement(column)
            if pool == SHARED_POOL:
                self._decrement(column + self._buckets)

    def _column(self, column: int) -> int:
        return sum(self._cells[r + column] for r in self._rows)

    def _decrement(self, cell: int) -> None:
        if self._cells[cell] > 0:
            self._cells[cell] -= 1


def counter(table: SessionTable | None, row: int | None) -> SessionCounter:
    """A worker's view: its row of the shared table or, with no table or no row (a worker
    started alone, in tests), a private row that counts its own sessions only. The master
    never starts a worker without a row (`Master.spawn`): the caps would be per worker."""
    if table is None or row is None:
        return SessionCounter(SessionTable(1), 0)
    return SessionCounter(table, row)


@functools.lru_cache(maxsize=1024)  # (a parse is ~8 µs; the same client comes back)
def client_key(address: str, ipv6_prefix_length: int) -> str:
    """What a per-client count (the session caps, `authfailures`) counts `address` as: itself
    (an IPv4-mapped one as its IPv4 address), or its IPv6 network."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # (no zone index: fe80::1%eth0)
    except ValueError:
        return address  # (not an IP address: an AF_UNIX peer, "?": counted as it is)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix_length), strict=False))
    return str(ip)

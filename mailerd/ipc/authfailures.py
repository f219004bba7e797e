"""Failed AUTH attempts per client address, shared by all workers: each failure from an
address makes its next answer wait longer (0.5 s, 1 s, 2 s, … up to 10 s), whichever worker
the next session lands on, so that guessing passwords costs the guesser time, not us CPU.
From LOCKOUT failures on, an address's logins are not even checked (454) until it is
forgotten: the check (argon2) is what costs us, and a guesser that hangs up rather than wait
for the delay would otherwise have as many checked as it can open sessions (mox does the same).

The master maps the table before it forks (as `sessiontable`): BUCKETS cells of three
doubles, [failures, time of the last one, the address's fingerprint]. Addresses are hashed
into buckets (IPv6 ones by their /64, what one machine is usually given), and a cell counts
for the address whose fingerprint it holds (the hash's other bits): another address hashed
into the same bucket takes the cell over rather than add to its count, so that failures from
addresses an attacker sprays cannot slow down, let alone lock out, an innocent one (with a
lockout, a shared count would let them). Python's string hash is seeded at random per start,
so nobody outside can aim at a bucket. Any worker writes any cell without a lock: two
failures at the same instant may count as one, which is harmless for a delay. An address's
record is forgotten FORGET seconds after its last failure, and not when a login from it
succeeds: anyone with one account would otherwise reset the count between guesses at
another's password.
"""

from __future__ import annotations

import functools
import ipaddress
import mmap
import time

BUCKETS = 65536  # (1.5 MiB, shared)
CELL = 3  # doubles a bucket: failures, the time of the last, the address's fingerprint
FIRST_DELAY = 0.5  # seconds, before the answer to the first failure
MAX_DELAY = 10.0
FORGET = 900.0  # seconds without a failure after which an address starts over
LOCKOUT = 10  # failures after which an address's logins are refused unchecked
_FINGERPRINT = (1 << 52) - 1  # (bits a double holds exactly)


class AuthFailures:
    def __init__(self, buckets: int = BUCKETS) -> None:
        self.buckets = buckets
        # MAP_SHARED | MAP_ANONYMOUS: the forked workers see the same pages.
        self._map = mmap.mmap(-1, buckets * CELL * 8)
        self._cells = memoryview(self._map).cast("d")

    def _slot(self, address: str) -> tuple[int, float]:
        """The address's cell and its fingerprint."""
        h = hash(key_of(address))
        return CELL * (h % self.buckets), float((h >> 20) & _FINGERPRINT)

    def _count(self, cell: int, fingerprint: float, now: float) -> float:
        failures, last, owner = self._cells[cell : cell + CELL]
        return failures if owner == fingerprint and now - last < FORGET else 0.0

    def delay(self, address: str, now: float | None = None) -> float:
        """How long to wait before answering a failed AUTH from `address` (its earlier
        failures decide)."""
        now = time.monotonic() if now is None else now
        failures = min(self._count(*self._slot(address), now), 16.0)
        return float(min(FIRST_DELAY * 2.0**failures, MAX_DELAY))

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        cell, fingerprint = self._slot(address)
        self._cells[cell] = self._count(cell, fingerprint, now) + 1
        self._cells[cell + 1] = now
        self._cells[cell + 2] = fingerprint

    def failures(self, address: str, now: float | None = None) -> int:
        """The address's failures lately."""
        now = time.monotonic() if now is None else now
        return int(self._count(*self._slot(address), now))

    def locked(self, address: str, now: float | None = None) -> bool:
        """Has `address` failed LOCKOUT times lately (its logins are then not checked)?"""
        return self.failures(address, now) >= LOCKOUT


@functools.lru_cache(maxsize=1024)  # (two parses of the address a login; ~8 µs each)
def key_of(address: str) -> str:
    """What the table counts by: the address, an IPv6 one's /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)

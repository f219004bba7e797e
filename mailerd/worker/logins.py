"""The password checks a worker lets wait: at most MAX_PENDING in all and PER_CLIENT for one
client address (its IPv6 /64), each an argon2 check of a tenth of a second of CPU and 64 MiB
in the worker's two check threads. Past either bound a login is answered 454 at once, without
a check: a flood of AUTH attempts (sessions that send one and hang up) would otherwise queue
checks without end, and a real user's login would wait behind all of them."""

from __future__ import annotations

import collections

from mailerd.ipc.authfailures import key_of

MAX_PENDING = 8  # per worker: a login waits behind at most this many checks
PER_CLIENT = 1  # per worker and client address: one of its checks at a time


class PendingChecks:
    def __init__(self, limit: int = MAX_PENDING, per_client: int = PER_CLIENT) -> None:
        self.limit = limit
        self.per_client = per_client
        self._by_client: collections.Counter[str] = collections.Counter()
        self._total = 0

    def admit(self, address: str) -> str | None:
        """The client's key, counted until `done(key)`; None when its check may not wait."""
        key = key_of(address)
        if self._total >= self.limit or self._by_client[key] >= self.per_client:
            return None
        self._by_client[key] += 1
        self._total += 1
        return key

    def done(self, key: str) -> None:
        self._total -= 1
        self._by_client[key] -= 1
        if self._by_client[key] <= 0:
            del self._by_client[key]

"""DNS for the inbound checks: one asynchronous, caching resolver per worker (see
`mailerd.resolver`), asked from the event loop directly (DMARC) and from the threads where
pyspf and dkimpy run, which ask synchronously: `Bridge` turns their calls into coroutines run
in the worker's event loop, so that every query goes through the one resolver and its cache,
and waits at most the lookup timeout. What the cache holds, a Bridge answers at once, without
the round trip to the event loop; a Bridge made `cache_only` answers nothing else (it raises
NotCached), which lets the checks of a small message from a known sender run in the event loop
itself, no thread needed (`verifier`)."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

from mailerd.resolver import make_resolver

T = TypeVar("T")
MAX_HITS = 1024  # cache hits remembered by name (then forgotten all at once)


class TemporaryFailure(Exception):
    """The DNS did not answer (a timeout, SERVFAIL, no server): try later, not "no record"."""


class NotCached(Exception):
    """A cache-only lookup was asked for what the cache does not hold: ask the DNS instead.
    (Not a TemporaryFailure: pyspf and dkimpy must not turn it into a result.)"""

    def __init__(self, name: str, rdtype: str) -> None:
        super().__init__(f"{name} {rdtype}")
        self.name = name
        self.rdtype = rdtype


@dataclass(frozen=True)
class Answer:
    """What a lookup found: the records' texts (TXT: the strings joined) or nothing."""

    records: tuple[str, ...]
    exists: bool  # False: NXDOMAIN (the name does not exist at all)


class Lookups:
    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver
        # The resolver cache's answers by (name, type) as we ask for them: its own keys are
        # dnspython names, slow to build and to compare; an entry here is good while unexpired.
        self._hits: dict[tuple[str, str], dns.resolver.Answer] = {}

    @classmethod
    def make(cls, dns_server: tuple[str, int] | None, timeout: float) -> Lookups:
        return cls(make_resolver(dns_server, timeout, cache=True))

    async def query(self, name: str, rdtype: str) -> Answer:
        """Records of `rdtype` at `name`; TemporaryFailure when the DNS cannot say."""
        records, exists = await self._records(name, rdtype)
        return Answer(tuple(_text(rdata) for rdata in records), exists)

    async def rdata(self, name: str, rdtype: str) -> list[object]:
        """The parsed records (dnspython rdata; none for NXDOMAIN); TemporaryFailure as above."""
        return (await self._records(name, rdtype))[0]

    async def _records(self, name: str, rdtype: str) -> tuple[list[object], bool]:
        """The records, and whether the name exists."""
        hit = self.cached(name, rdtype)  # (the resolver's own way to its cache is longer)
        if hit is not None:
            return list(hit[0]), True
        try:
            answer = await self.resolver.resolve(
                dns.name.from_text(name), rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            return [], False
        except dns.exception.DNSException as exc:  # a timeout, SERVFAIL, a bad name
            raise TemporaryFailure(f"{name} {rdtype}: {exc}") from exc
        return (list(answer.rrset) if answer.rrset is not None else []), True

    async def txt(self, name: str) -> tuple[str, ...]:
        return (await self.query(name, "TXT")).records

    def cached(self, name: str, rdtype: str) -> tuple[dns.rrset.RRset, float] | None:
        """The records of a positive answer the cache holds (unexpired) and when they expire
        (time.time()), else None (nothing cached, or a negative answer: those take the
        resolver's own path). Thread-safe: the cache has a lock."""
        answer = self._hits.get((name, rdtype))
        if answer is None or answer.expiration <= time.time():
            cache = self.resolver.cache
            answer = cache.get(_cache_key(name, rdtype)) if cache is not None else None
            if answer is None or answer.rrset is None:
                return None
            if len(self._hits) >= MAX_HITS:
                self._hits.clear()
            self._hits[(name, rdtype)] = answer
        assert answer.rrset is not None
        return answer.rrset, answer.expiration

    def cached_txt(self, name: str) -> tuple[str, ...]:
        """The TXT records the cache holds for `name` (strings joined); NotCached if none."""
        hit = self.cached(name, "TXT")
        if hit is None:
            raise NotCached(name, "TXT")
        return tuple(_text(rdata) for rdata in hit[0])


@functools.lru_cache(maxsize=1024)  # (the same few names, message after message)
def _cache_key(name: str, rdtype: str) -> dns.resolver.CacheKey:
    """The resolver cache's key for a query: building the name is most of a cache hit's cost."""
    return dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN


def _text(rdata: object) -> str:
    strings = getattr(rdata, "strings", None)
    if strings is not None:  # TXT: one record is several strings, to be joined (RFC 7208 3.3)
        return b"".join(strings).decode("utf-8", "replace")
    return str(rdata.to_text())  # type: ignore[attr-defined]


class Bridge:
    """Synchronous lookups for a library running in a thread: each is a coroutine in the
    event loop `loop`, waited for at most `timeout` seconds. `expires` is the earliest
    expiry of the cached answers it has given since it was last set (to math.inf), so that
    what was worked out from them can be kept as long as they would be."""

    def __init__(
        self,
        lookups: Lookups,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        *,
        cache_only: bool = False,
    ):
        self.lookups = lookups
        self.loop = loop
        self.timeout = timeout
        self.cache_only = cache_only
        self.expires = math.inf

    def _cached(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        hit = self.lookups.cached(name, rdtype)
        if hit is None:
            if self.cache_only:
                raise NotCached(name, rdtype)
            return None
        records, expiration = hit
        self.expires = min(self.expires, expiration)
        return records

    def query(self, name: str, rdtype: str) -> Answer:
        records = self._cached(name, rdtype)
        if records is not None:
            return Answer(tuple(_text(rdata) for rdata in records), exists=True)
        return self._wait(self.lookups.query(name, rdtype), name, rdtype)

    def rdata(self, name: str, rdtype: str) -> list[object]:
        """The parsed records (dnspython rdata), for pyspf, which wants MX preferences."""
        records = self._cached(name, rdtype)
        if records is not None:
            return list(records)
        return self._wait(self.lookups.rdata(name, rdtype), name, rdtype)

    def _wait(self, lookup: Coroutine[Any, Any, T], name: str, rdtype: str) -> T:
        """Run `lookup` in the event loop and wait for it, at most the timeout."""
        future = asyncio.run_coroutine_threadsafe(lookup, self.loop)
        try:
            return future.result(self.timeout)
        except TimeoutError as exc:
            future.cancel()
            raise TemporaryFailure(f"{name} {rdtype}: no answer in {self.timeout:g} s") from exc

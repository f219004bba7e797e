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
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from mailerd.resolver import make_resolver

T = TypeVar("T")
MAX_HITS = 1024  # cache hits remembered by name (then forgotten all at once)
# ... if their records are no longer than this: a hit keeps its records alive after the cache
# has let them go, and a sender chooses the records (up to the cache's 16 KiB an answer).
MAX_HIT_BYTES = 2048
# The longest text a DNS name can have: 255 octets, each written as \DDD at most. A sender's
# longer "name" (a From: domain folded over 61 KB) is no name at all: it is answered so at
# once, neither built (5 ms of CPU for 61 KB) nor remembered (1,024 of them kept 60 MB).
MAX_NAME_TEXT = 255 * 4


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


class Hit(NamedTuple):
    """What the resolver's cache holds for a query: its records (none for a negative answer),
    whether the name exists (False: a cached NXDOMAIN) and when it expires (time.time()); and
    the records' texts (`Answer.records`), made once rather than at each lookup."""

    records: tuple[object, ...]
    exists: bool
    expiration: float
    texts: tuple[str, ...]


NO_SUCH_NAME = Hit((), False, math.inf, ())  # (for ever: a sender's name, not ours to retry)


class Lookups:
    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver
        # The resolver cache's answers by (name, type) as we ask for them: its own keys are
        # dnspython names, slow to build and to compare; an entry here is good while unexpired.
        self._hits: dict[tuple[str, str], Hit] = {}

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
            return list(hit.records), hit.exists
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

    def cached(self, name: str, rdtype: str) -> Hit | None:
        """What the cache holds for the query, unexpired: records, or a negative answer (those
        come with an SOA, whose minimum TTL says how long they hold: RFC 2308); else None.
        Thread-safe: the cache has a lock."""
        if len(name) > MAX_NAME_TEXT:
            return NO_SUCH_NAME
        hit = self._hits.get((name, rdtype))
        if hit is None or hit.expiration <= time.time():
            hit = self._from_cache(name, rdtype)
            if hit is None:
                return None
            if sum(map(len, hit.texts)) > MAX_HIT_BYTES:
                return hit
            if len(self._hits) >= MAX_HITS:
                self._hits.clear()
            self._hits[(name, rdtype)] = hit
        return hit

    def _from_cache(self, name: str, rdtype: str) -> Hit | None:
        cache = self.resolver.cache
        if cache is None:
            return None
        try:
            key = _cache_key(name, rdtype)
        except dns.exception.DNSException:  # a label over 63 octets, a name over 255: no such
            return NO_SUCH_NAME  # name can exist
        answer = cache.get(key)
        if answer is not None:  # (records, or none: NODATA)
            records = tuple(answer.rrset or ())
            return Hit(records, True, answer.expiration, tuple(map(_text, records)))
        # dnspython keeps an NXDOMAIN under the type ANY, for every type of the name
        nxdomain = cache.get((key[0], dns.rdatatype.ANY, key[2]))
        if nxdomain is not None and nxdomain.response.rcode() == dns.rcode.NXDOMAIN:
            return Hit((), False, nxdomain.expiration, ())
        return None

    def cached_txt(self, name: str) -> tuple[str, ...]:
        """The TXT records the cache holds for `name` (strings joined; none for a negative
        answer); NotCached if it holds nothing."""
        hit = self.cached(name, "TXT")
        if hit is None:
            raise NotCached(name, "TXT")
        return hit.texts


def _cache_key(name: str, rdtype: str) -> dns.resolver.CacheKey:
    """The resolver cache's key for a query (building the name is its cost: `Lookups._hits`
    spares it while an answer is fresh)."""
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
        deadline: float = math.inf,
    ):
        self.lookups = lookups
        self.loop = loop
        self.timeout = timeout
        self.cache_only = cache_only
        # (time.monotonic()) after which no lookup waits at all: a message's checks share one
        # timeout, so that ten signatures' unanswered keys hold a thread no longer than one
        self.deadline = deadline
        self.wait_limit = timeout  # what one lookup may wait (`share`)
        self.ran_out = False  # a lookup was not made: the deadline had passed
        self.expires = math.inf

    def share(self, parts: int) -> None:
        """From now on, let one lookup wait at most 1/`parts` of the time left before the
        deadline (or the timeout, if less): for `parts` checks in a row, so that a DNS that
        never answers for one of them leaves the others their time."""
        left = self.deadline - time.monotonic()
        self.wait_limit = min(self.timeout, left / max(parts, 1))

    def _cached(self, name: str, rdtype: str) -> Hit | None:
        hit = self.lookups.cached(name, rdtype)
        if hit is None:
            if self.cache_only:
                raise NotCached(name, rdtype)
            return None
        self.expires = min(self.expires, hit.expiration)
        return hit

    def query(self, name: str, rdtype: str) -> Answer:
        hit = self._cached(name, rdtype)
        if hit is not None:
            return Answer(hit.texts, hit.exists)
        return self._wait(self.lookups.query(name, rdtype), name, rdtype)

    def rdata(self, name: str, rdtype: str) -> list[object]:
        """The parsed records (dnspython rdata), for pyspf, which wants MX preferences."""
        hit = self._cached(name, rdtype)
        if hit is not None:
            return list(hit.records)
        return self._wait(self.lookups.rdata(name, rdtype), name, rdtype)

    def _wait(self, lookup: Coroutine[Any, Any, T], name: str, rdtype: str) -> T:
        """Run `lookup` in the event loop and wait for it, at most the timeout."""
        wait = min(self.wait_limit, self.deadline - time.monotonic())
        if wait <= 0:
            self.ran_out = True
            lookup.close()
            raise TemporaryFailure(f"{name} {rdtype}: no time left ({self.timeout:g} s)")
        future = asyncio.run_coroutine_threadsafe(lookup, self.loop)
        try:
            return future.result(wait)
        except TimeoutError as exc:
            future.cancel()
            raise TemporaryFailure(f"{name} {rdtype}: no answer in {self.timeout:g} s") from exc

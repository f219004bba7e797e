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


class TemporaryFailure(Exception):
    """The DNS did not answer (a timeout, SERVFAIL, no server): try later, not "no record"."""


class NotCached(Exception):
    """A cache-only Bridge was asked for what its cache does not hold: ask the DNS instead.
    (Not a TemporaryFailure: pyspf and dkimpy must not turn it into a result.)"""


@dataclass(frozen=True)
class Answer:
    """What a lookup found: the records' texts (TXT: the strings joined) or nothing."""

    records: tuple[str, ...]
    exists: bool  # False: NXDOMAIN (the name does not exist at all)


class Lookups:
    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver

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
        records = self.cached(name, rdtype)  # (the resolver's own way to its cache is longer)
        if records is not None:
            return list(records), True
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

    def cached(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        """The records of a positive answer the cache holds (unexpired), else None (nothing
        cached, or a negative answer: those take the resolver's own path). Thread-safe: the
        cache has a lock."""
        cache = self.resolver.cache
        if cache is None:
            return None
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)
        answer = cache.get(key)
        return answer.rrset if answer is not None else None


def _text(rdata: object) -> str:
    strings = getattr(rdata, "strings", None)
    if strings is not None:  # TXT: one record is several strings, to be joined (RFC 7208 3.3)
        return b"".join(strings).decode("utf-8", "replace")
    return str(rdata.to_text())  # type: ignore[attr-defined]


class Bridge:
    """Synchronous lookups for a library running in a thread: each is a coroutine in the
    event loop `loop`, waited for at most `timeout` seconds."""

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

    def _cached(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        records = self.lookups.cached(name, rdtype)
        if records is None and self.cache_only:
            raise NotCached(f"{name} {rdtype}")
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

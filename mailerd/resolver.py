"""The DNS resolver every lookup goes through: MX for delivery, and SPF, DKIM, DMARC and
`mailerd dns --check`. dnspython's asyncio resolver, asking exactly `--dns-server` when given
(else the machine's /etc/resolv.conf), with a cache (dnspython's LRU cache, given a byte budget)
which keeps each answer as long as its TTL says (and negative answers as long as their SOA
allows), the most recently used of them: at most CACHE_ENTRIES answers, of at most CACHE_BYTES
in all, none larger than CACHE_ANSWER_BYTES (a larger one is returned, not kept).

The test suite sets MAILERD_FORBID_SYSTEM_RESOLVER in the environment: `make_resolver()` then
refuses to use the machine's resolver (no --dns-server), so no test can send a query for its
made-up domains to the real DNS.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, cast

import dns.asyncresolver
import dns.resolver

from mailerd.config import DEFAULT_DNS_TIMEOUT

FORBID_SYSTEM_RESOLVER = "MAILERD_FORBID_SYSTEM_RESOLVER"
# A UDP query is sent again after this long (within the lookup's overall timeout).
_RETRY_INTERVAL = 2.0
# Answers a caching resolver keeps at most, the least recently used going first. The names
# asked for are chosen by senders (their MAIL FROM's SPF, their DKIM selectors, their From's
# DMARC) and so are the TTLs (up to 68 years): unbounded, a cache would grow with every new
# name a sender makes up, for as long as the sender likes.
CACHE_ENTRIES = 4096
# The senders choose the answers' sizes too: a TXT record over TCP may be ~64 KB, and 4096 of
# them would hold ~500 MB per worker (an answer cost twice its wire length: the wire kept
# beside the records parsed from it). So the cache also keeps at most CACHE_BYTES of answers,
# counted in wire length (known without re-serialising: dnspython keeps the wire it parsed,
# which the cache then drops). Real answers are small (an address or MX set ~100-300 octets, a
# DKIM key < 1 KB, even a large domain's TXT set a few KB), so 4096 of them come to about 1-3
# MiB: with 8 MiB the count stays the bound in normal use, while a sender's large answers take
# ~12 MB of a worker at most (measured: 554 answers of 15 KB). The count bounds the rest: an
# answer, however small, is ~4.5 KB of objects, so ~18 MB for 4096.
CACHE_BYTES = 8 * 1024 * 1024
# An answer larger than this is returned to its caller but not kept (asked again next time):
# none of the answers mailerd needs comes near it. (The inbound checks' memo of cache hits,
# which keeps an answer's records until it expires even once this cache has dropped it, keeps
# answers of at most lookups.MAX_HIT_BYTES.)
CACHE_ANSWER_BYTES = CACHE_BYTES // 512  # 16 KiB


class SystemResolverForbidden(RuntimeError):
    """A resolver without --dns-server was asked for where the test suite forbids it."""


class _SizedNode(dns.resolver.LRUCacheNode):
    def __init__(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer, size: int):
        super().__init__(key, value)  # type: ignore[no-untyped-call]
        self.size = size


class BudgetCache(dns.resolver.LRUCache):
    """dnspython's LRU cache, bounded in bytes as well as in answers: `max_bytes` in all (the
    least recently used answers go first), no answer over `max_answer_bytes` (not kept).
    `nbytes` is what it holds. A hit costs what dnspython's does (the same steps)."""

    def __init__(self, max_size: int, max_bytes: int, max_answer_bytes: int) -> None:
        super().__init__(max_size)
        self.max_bytes = max_bytes
        self.max_answer_bytes = min(max_answer_bytes, max_bytes)
        self.nbytes = 0

    def get(self, key: dns.resolver.CacheKey) -> dns.resolver.Answer | None:
        # dnspython's, but for the size of an expired answer it drops
        with self.lock:
            node = self.data.get(key)
            if node is None:
                self.statistics.misses += 1
                return None
            node.unlink()
            if node.value.expiration <= time.time():
                del self.data[key]
                self.nbytes -= cast(_SizedNode, node).size
                self.statistics.misses += 1
                return None
            node.link_after(self.sentinel)
            self.statistics.hits += 1
            node.hits += 1
            answer: dns.resolver.Answer = node.value
            return answer

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        size = _answer_size(value)
        with self.lock:
            old = self.data.pop(key, None)
            if old is not None:
                old.unlink()
                self.nbytes -= cast(_SizedNode, old).size
            if size > self.max_answer_bytes:
                return
            while self.data and (
                len(self.data) >= self.max_size or self.nbytes + size > self.max_bytes
            ):
                last = self.sentinel.prev
                last.unlink()
                del self.data[last.key]
                self.nbytes -= cast(_SizedNode, last).size
            node = _SizedNode(key, value, size)
            node.link_after(self.sentinel)
            self.data[key] = node
            self.nbytes += size

    def flush(self, key: dns.resolver.CacheKey | None = None) -> None:
        with self.lock:  # (not super().flush(): it takes the lock, which is not reentrant)
            if key is None:
                for each in self.data.values():  # (no cycles left to the collector)
                    each.prev = each.next = each
                self.sentinel.prev = self.sentinel.next = self.sentinel
                self.data = {}
                self.nbytes = 0
                return
            node = self.data.pop(key, None)
            if node is not None:
                node.unlink()
                self.nbytes -= cast(_SizedNode, node).size


def _answer_size(answer: dns.resolver.Answer) -> int:
    """The answer's wire length, its response's copy of the wire dropped (nothing reads it:
    it doubled what a cached answer cost)."""
    response = answer.response
    wire = getattr(response, "wire", None)
    if isinstance(wire, bytes):
        response.wire = None
        return len(wire)
    # (a dnspython that keeps no wire: its records' lengths, plus a header and each record's)
    return 12 + sum(
        12 + len(rdata.to_wire())
        for section in response.sections
        for rrset in section
        for rdata in rrset
    )


class BoundedResolver(dns.asyncresolver.Resolver):
    """dnspython's asyncio resolver, its `lifetime` a bound: between rounds of tries it sleeps
    a back-off that may run past the lifetime (a lookup given 10 s took 11.6). The bound is a
    timeout on this task, not `asyncio.wait_for`, whose task of its own (Python 3.11) ended
    with the lookup's NXDOMAIN when a lookup was cancelled as its answer came, and asyncio
    logged "Task exception was never retrieved" with a traceback (a third of 3,000 lookups
    cancelled at random; the checks cancel the DMARC lookups they no longer need)."""

    async def resolve(self, *args: Any, **kwargs: Any) -> dns.resolver.Answer:
        lifetime = kwargs.get("lifetime") or self.lifetime
        try:
            async with asyncio.timeout(lifetime):
                return await super().resolve(*args, **kwargs)
        except TimeoutError:
            raise dns.resolver.LifetimeTimeout(timeout=lifetime, errors=[]) from None  # type: ignore[no-untyped-call]


def make_resolver(
    dns_server: tuple[str, int] | None, timeout: float = DEFAULT_DNS_TIMEOUT, *, cache: bool = False
) -> dns.asyncresolver.Resolver:
    """A resolver asking exactly `dns_server` (address, port), or the system's nameservers.

    `timeout` bounds each lookup as a whole (UDP queries are repeated within it). With no
    `dns_server`, /etc/resolv.conf is read now; dns.resolver.NoResolverConfiguration is
    raised if it is missing or names no nameserver. With `cache`, answers are kept for their
    TTL (a worker asks for the same SPF and DKIM records again and again, the delivery
    process for the same MX and addresses: a third of its CPU went to lookups when a message
    was relayed to the same domain as the one before), within CACHE_ENTRIES and CACHE_BYTES.
    """
    if dns_server is None:
        if os.environ.get(FORBID_SYSTEM_RESOLVER):
            raise SystemResolverForbidden(
                f"{FORBID_SYSTEM_RESOLVER} is set: give mailerd --dns-server (a test's own DNS "
                "server), or run it in a network namespace with its own resolv.conf"
            )
        resolver = BoundedResolver()
    else:
        # configure=False: never read /etc/resolv.conf, so no search list or other server.
        resolver = BoundedResolver(configure=False)
        host, port = dns_server
        # nameservers + port rather than dns.nameserver (dnspython >= 2.4): Debian 12 has 2.3.
        resolver.port = port  # first: a version may bind the port when nameservers are set
        resolver.nameservers = [host]
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, _RETRY_INTERVAL)
    # EDNS with the DNS Flag Day 2020 buffer size, so that large answers rarely need TCP.
    resolver.use_edns(0, 0, 1232)
    if cache:
        resolver.cache = BudgetCache(CACHE_ENTRIES, CACHE_BYTES, CACHE_ANSWER_BYTES)
    return resolver

"""The DNS resolver every lookup goes through: MX for delivery, and SPF, DKIM, DMARC and
`mailerd dns --check`. dnspython's asyncio resolver, asking exactly `--dns-server` when given
(else the machine's /etc/resolv.conf), with dnspython's own cache, which keeps each answer as
long as its TTL says (and negative answers as long as their SOA allows), the CACHE_ENTRIES most
recently used.

The test suite sets MAILERD_FORBID_SYSTEM_RESOLVER in the environment: `make_resolver()` then
refuses to use the machine's resolver (no --dns-server), so no test can send a query for its
made-up domains to the real DNS.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

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


class SystemResolverForbidden(RuntimeError):
    """A resolver without --dns-server was asked for where the test suite forbids it."""


class BoundedResolver(dns.asyncresolver.Resolver):
    """dnspython's asyncio resolver, its `lifetime` a bound: between rounds of tries it sleeps
    a back-off that may run past the lifetime (a lookup given 10 s took 11.6)."""

    async def resolve(self, *args: Any, **kwargs: Any) -> dns.resolver.Answer:
        lifetime = kwargs.get("lifetime") or self.lifetime
        try:
            return await asyncio.wait_for(super().resolve(*args, **kwargs), lifetime)
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
    was relayed to the same domain as the one before), at most CACHE_ENTRIES of them.
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
        resolver.cache = dns.resolver.LRUCache(CACHE_ENTRIES)
    return resolver

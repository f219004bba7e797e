"""The resolver's answer cache is bounded in bytes as well as in answers: a sender chooses the
names looked up for its messages (DKIM selectors, SPF includes, _dmarc names) and what they
answer, up to ~64 KB each over TCP, with TTLs as long as it likes. Against a real DNS server
of the test's own (tests/dnsserver.py, in process), never the machine's resolver."""

from __future__ import annotations

import asyncio
import time

import dns.name
import dns.rdataclass
import dns.rdatatype
import pytest
from dnsserver import DNSServer, Records, serve

from mailerd import resolver
from mailerd.inbound.lookups import Lookups

ZONE_NAME = "keys.example"


def txt(octets: int) -> str:
    """A TXT record's data of about `octets` octets (strings of at most 250)."""
    text = ("v=DKIM1; p=" + "A" * octets)[:octets]
    strings = [text[i : i + 250] for i in range(0, octets, 250)]
    return " ".join(f'"{s}"' for s in strings)


def zone(names: dict[str, int]) -> str:
    return "".join(f"{name}. 86400 TXT {txt(octets)}\n" for name, octets in names.items())


def held(cache: object) -> int:
    """What the cache holds, counted independently of its own count: the TXT octets."""
    return sum(
        len(s)
        for node in cache.data.values()  # type: ignore[attr-defined]
        for rdata in (node.value.rrset or ())
        for s in rdata.strings
    )


def queries(server: DNSServer) -> int:
    return len(server.queries)


@pytest.fixture
def small_budget(monkeypatch):
    """A 64 KiB budget, answers of at most 8 KiB kept (the defaults' shape, smaller)."""
    monkeypatch.setattr(resolver, "CACHE_BYTES", 64 * 1024, raising=False)
    monkeypatch.setattr(resolver, "CACHE_ANSWER_BYTES", 8 * 1024, raising=False)


def test_large_answers_stay_within_the_byte_budget_and_recent_ones_still_hit(small_budget):
    # 60 answers of ~6 KB: ~360 KB, far over the budget, far under CACHE_ENTRIES answers
    names = {f"s{i}._domainkey.{ZONE_NAME}": 6000 for i in range(60)}

    async def main(server: DNSServer, lookups: Lookups) -> None:
        for name in names:
            [record] = await lookups.txt(name)
            assert len(record) == 6000
        cache = lookups.resolver.cache
        assert held(cache) <= 64 * 1024
        assert 64 * 1024 - 6500 < cache.nbytes <= 64 * 1024  # (wire: a little over the TXT)
        assert held(cache) <= cache.nbytes
        # the most recent answers are kept, from the cache (no query) ...
        last = list(names)[-5:]
        asked = queries(server)
        for name in last:
            assert lookups._from_cache(name, "TXT") is not None
            assert len((await lookups.txt(name))[0]) == 6000
        assert queries(server) == asked
        # ... the oldest went, and are asked for again
        first = next(iter(names))
        assert lookups._from_cache(first, "TXT") is None
        assert len((await lookups.txt(first))[0]) == 6000
        assert queries(server) > asked  # (UDP, truncated, then TCP)
        assert held(cache) <= 64 * 1024

    with serve() as server:
        server.records = Records(zone(names))
        asyncio.run(main(server, Lookups.make((server.host, server.port), 3.0)))


def test_an_oversized_answer_is_returned_but_not_kept(small_budget):
    names = {f"small.{ZONE_NAME}": 100, f"big._domainkey.{ZONE_NAME}": 20_000}

    async def main(server: DNSServer, lookups: Lookups) -> None:
        small, big = names
        assert len((await lookups.txt(small))[0]) == 100
        for _ in range(2):
            asked = queries(server)
            [record] = await lookups.txt(big)  # answered, in full (over TCP)
            assert len(record) == 20_000
            assert queries(server) > asked  # asked every time: never kept
            assert lookups._from_cache(big, "TXT") is None
        cache = lookups.resolver.cache
        assert len(cache.data) == 1
        assert held(cache) == 100
        assert lookups._from_cache(small, "TXT") is not None  # (did not push the small out)

    with serve() as server:
        server.records = Records(zone(names))
        asyncio.run(main(server, Lookups.make((server.host, server.port), 3.0)))


def test_the_default_budget_keeps_no_57_kb_key():
    """The attacker's answers, with the real limits: returned, not kept."""
    assert resolver.CACHE_ANSWER_BYTES < 57_000 < resolver.CACHE_BYTES
    name = f"huge._domainkey.{ZONE_NAME}"

    async def main(lookups: Lookups) -> None:
        [record] = await lookups.txt(name)
        assert len(record) == 57_000
        assert lookups._from_cache(name, "TXT") is None
        assert lookups.resolver.cache.nbytes == 0

    with serve() as server:
        server.records = Records(zone({name: 57_000}))
        asyncio.run(main(Lookups.make((server.host, server.port), 3.0)))


def test_the_count_follows_expiry_replacement_and_flush(small_budget):
    names = {f"k{i}.{ZONE_NAME}": 3000 for i in range(3)}

    def key(name: str) -> tuple[dns.name.Name, int, int]:
        return dns.name.from_text(name), dns.rdatatype.TXT, dns.rdataclass.IN

    def counted(cache) -> int:
        assert cache.nbytes == sum(node.size for node in cache.data.values())
        return cache.nbytes

    async def main(lookups: Lookups) -> None:
        for name in names:
            await lookups.txt(name)
        cache = lookups.resolver.cache
        a, b, c = names
        total = counted(cache)
        one = cache.data[key(a)].size
        assert 3000 < one < 3200
        cache.data[key(a)].value.expiration = time.time() - 1  # (expired: dropped when asked)
        assert cache.get(key(a)) is None
        assert counted(cache) == total - one
        # an answer put again for the same query replaces the one before
        answer = cache.get(key(b))
        cache.put(key(b), answer)
        cache.put(key(b), answer)
        assert len(cache.data) == 2
        counted(cache)
        cache.flush(key(b))
        assert len(cache.data) == 1
        assert counted(cache) == cache.data[key(c)].size
        cache.flush()
        assert (counted(cache), len(cache.data)) == (0, 0)
        assert await lookups.txt(a)  # (asked again, kept again)
        assert counted(cache) == one

    with serve() as server:
        server.records = Records(zone(names))
        asyncio.run(main(Lookups.make((server.host, server.port), 3.0)))


def test_the_memo_of_hits_keeps_no_large_answer():
    """Lookups remembers cache hits by name (a frequent sender's records, found without
    building dnspython names); a hit keeps its records alive after the cache let them go, so
    only answers of at most MAX_HIT_BYTES are remembered: the cache's budget then bounds
    what the sender's records can hold."""
    from mailerd.inbound import lookups as lookups_module

    names = {f"small.{ZONE_NAME}": 100, f"large._domainkey.{ZONE_NAME}": 12_000}

    async def main(lookups: Lookups) -> None:
        for name in names:
            await lookups.txt(name)
            assert lookups.cached_txt(name)  # (found in the cache, by way of the memo)
        assert (f"small.{ZONE_NAME}", "TXT") in lookups._hits
        assert (f"large._domainkey.{ZONE_NAME}", "TXT") not in lookups._hits
        assert lookups_module.MAX_HIT_BYTES < 12_000

    with serve() as server:
        server.records = Records(zone(names))
        asyncio.run(main(Lookups.make((server.host, server.port), 3.0)))

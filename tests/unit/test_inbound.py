"""The inbound checks (mailerd.inbound) against a real DNS server of the test's own (tests/
dnsserver.py, in process): SPF's results, DKIM's (signatures made by mailerd.signing and
tampered with), DMARC's policy discovery, alignment and disposition, the Authentication-Results
field, the removal of forged ones, and the bound on the time the DNS may take."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import dns.resolver
import pytest
from dnsserver import DNSServer, Records, serve

from mailerd import resolver, signing
from mailerd.commands import dkimkeys
from mailerd.inbound import dmarc, results
from mailerd.inbound.lookups import Bridge, Lookups, NotCached
from mailerd.inbound.sender_policy import Memo, SpfResult
from mailerd.inbound.verifier import Verdict, Verifier

HOST = "mx.example.org"
T = TypeVar("T")


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> signing.SigningKey:
    path = tmp_path_factory.mktemp("key") / "sel.key"
    dkimkeys.write_key(str(path), dkimkeys.new_key("ed25519", 0))
    return signing.load_key("sender.example", "sel", str(path))


@pytest.fixture(scope="module")
def dns_server(key) -> DNSServer:
    record = key.dns_record()
    zone = f"""
$ORIGIN sender.example.
@            TXT "v=spf1 ip4:127.0.0.1 ip6:::1 -all"
soft         TXT "v=spf1 ~all"
neutral      TXT "v=spf1 ?all"
double       TXT "v=spf1 -all"
double       TXT "v=spf1 +all"
broken       TXT "dnsserver:servfail"
slow         TXT "dnsserver:timeout"
sel._domainkey TXT "{record}"
_dmarc       TXT "v=DMARC1; p=reject; sp=quarantine"
$ORIGIN forwarder.example.
@            TXT "v=spf1 ip4:127.0.0.1 -all"
$ORIGIN lenient.example.
_dmarc       TXT "v=DMARC1; p=none; rua=mailto:dmarc@lenient.example"
$ORIGIN sampled.example.
_dmarc       TXT "v=DMARC1; p=reject; pct=0"
$ORIGIN half.example.
_dmarc       TXT "v=DMARC1; p=reject; pct=50"
$ORIGIN strict.example.
_dmarc       TXT "v=DMARC1; p=reject; aspf=s"
mail         TXT "v=spf1 ip4:127.0.0.1 -all"
$ORIGIN timeout.example.
_dmarc       TXT "dnsserver:timeout"
@            TXT "dnsserver:timeout"
"""
    server = DNSServer(Records(zone))
    server.start()
    return server


def run_check(
    server: DNSServer, message: bytes, *, sender: str, ip: str = "127.0.0.1",
    helo: str = "client.test", enforce: bool = False, timeout: float = 3.0,
) -> Verdict:  # fmt: skip
    async def main() -> Verdict:
        with ThreadPoolExecutor(4) as threads:
            verifier = Verifier(
                HOST,
                Lookups.make((server.host, server.port), timeout),
                asyncio.get_running_loop(),
                threads,
                timeout=timeout,
                enforce=enforce,
            )
            return await verifier.check(ip, helo, sender, message)

    return asyncio.run(main())


def with_verifier(server: DNSServer, body: Callable[[Verifier], Awaitable[T]]) -> T:
    """`body(verifier)` run with one Verifier (so its cache and memo last between checks)."""

    async def main() -> T:
        with ThreadPoolExecutor(4) as threads:
            verifier = Verifier(
                HOST,
                Lookups.make((server.host, server.port), 3.0),
                asyncio.get_running_loop(),
                threads,
                timeout=3.0,
                enforce=False,
            )
            return await body(verifier)

    return asyncio.run(main())


def message(from_address: str, extra: bytes = b"") -> bytes:
    return (
        f"From: <{from_address}>\r\nTo: <bob@example.org>\r\nSubject: hi\r\n".encode()
        + extra
        + b"\r\nbody\r\n"
    )


def methods(verdict: Verdict) -> dict[str, str]:
    """method → its result, from the Authentication-Results field (the first of each)."""
    found: dict[str, str] = {}
    for part in verdict.header.split(";")[1:]:
        method, _, rest = part.strip().partition("=")
        found.setdefault(method, rest.split()[0] if rest else "")
    return found


# --- SPF ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender, ip, expected",
    [
        ("a@sender.example", "127.0.0.1", "pass"),
        ("a@sender.example", "::1", "pass"),
        ("a@sender.example", "192.0.2.7", "fail"),
        ("a@soft.sender.example", "127.0.0.1", "softfail"),
        ("a@neutral.sender.example", "127.0.0.1", "neutral"),
        ("a@nothing.example", "127.0.0.1", "none"),
        ("a@double.sender.example", "127.0.0.1", "permerror"),
        ("a@broken.sender.example", "127.0.0.1", "temperror"),
    ],
)
def test_spf_results(dns_server, sender, ip, expected):
    verdict = run_check(dns_server, message("x@elsewhere.example"), sender=sender, ip=ip)
    assert methods(verdict)["spf"] == expected, verdict.header
    assert f"smtp.mailfrom={sender}" in verdict.header
    assert verdict.sender_spf == expected  # (kept with a queued item: who may get a bounce)


def test_spf_of_the_helo_for_the_null_sender(dns_server):
    verdict = run_check(
        dns_server, message("x@elsewhere.example"), sender="", helo="sender.example"
    )
    assert methods(verdict)["spf"] == "pass" and "smtp.helo=sender.example" in verdict.header
    assert verdict.sender_spf == ""  # (the HELO's: no MAIL FROM verified)


def test_spf_memo_keeps_a_verdict_until_it_expires_and_drops_the_oldest():
    """Memo.get gives the verdict before its expiry time and None at or after it; when `size`
    verdicts are kept, putting another drops the oldest."""
    memo = Memo(size=2)
    verdict = SpfResult("pass", "mailfrom", "a@x.example", "x.example")
    memo.put("192.0.2.1", "a@x.example", "helo.test", verdict, 100.0)
    assert memo.get("192.0.2.1", "a@x.example", "helo.test", 99.9) == verdict
    assert memo.get("192.0.2.1", "a@x.example", "other.test", 99.9) is None  # HELO is the key
    assert memo.get("192.0.2.1", "a@x.example", "helo.test", 100.0) is None
    for n in range(1, 4):
        memo.put(f"192.0.2.{n}", "a@x.example", "h", verdict, 100.0)
    found = [memo.get(f"192.0.2.{n}", "a@x.example", "h", 0.0) for n in range(1, 4)]
    assert found == [None, verdict, verdict]


SHORT_TTL_ZONE = """
$TTL 2
$ORIGIN brief.example.
@            TXT "v=spf1 ip4:127.0.0.1 -all"
_dmarc       TXT "v=DMARC1; p=none"
"""


def test_spf_verdict_is_kept_from_the_cache_until_its_record_expires():
    """One Verifier: once the cache is warm, checks of the same (ip, sender, helo) give the
    same SPF verdict (kept in its memo) without a query; once the SPF record's TTL (2 s) has
    passed, the verdict is worked out again, from the record the DNS now serves."""
    mail = message("a@brief.example")

    async def main(server: DNSServer, verifier: Verifier) -> None:
        async def spf() -> str:
            verdict = await verifier.check("127.0.0.1", "client.test", "a@brief.example", mail)
            return methods(verdict)["spf"]

        assert await spf() == "pass"  # a cold cache: the DNS is asked
        asked = len(server.queries)
        assert [await spf(), await spf()] == ["pass", "pass"]
        assert server.queries[asked:] == []
        kept = verifier.spf_memo.get("127.0.0.1", "a@brief.example", "client.test", time.time())
        assert kept is not None and kept.result == "pass"
        server.records = Records(SHORT_TTL_ZONE.replace("ip4:127.0.0.1 ", ""))
        await asyncio.sleep(2.2)
        assert await spf() == "fail"
        assert ("udp", "brief.example. TXT") in server.queries[asked:]

    with serve(SHORT_TTL_ZONE) as server:
        with_verifier(server, lambda verifier: main(server, verifier))


def test_a_message_of_many_header_lines_is_checked_in_a_thread(dns_server):
    """A small message whose answers are cached is checked in the event loop, unless its
    header section has more than INLINE_MAX_LINES lines: each signature indexes the fields
    (an attacker's pass filled 60 KB with thousands to stall every session of a worker)."""
    from mailerd.inbound.verifier import INLINE_MAX_LINES

    plain = message("a@sender.example")
    many = message(
        "a@sender.example", b"".join(b"X-%d: y\r\n" % i for i in range(INLINE_MAX_LINES))
    )

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):  # type: ignore[override]
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    async def main(verifier: Verifier) -> None:
        await verifier.check("127.0.0.1", "client.test", "a@sender.example", plain)  # (warm)
        with Counting(2) as counting:
            verifier.executor = counting
            await verifier.check("127.0.0.1", "client.test", "a@sender.example", plain)
            assert Counting.submitted == 0
            verdict = await verifier.check("127.0.0.1", "client.test", "a@sender.example", many)
            assert Counting.submitted > 0 and methods(verdict)["spf"] == "pass"

    with_verifier(dns_server, main)


# --- DKIM -----------------------------------------------------------------------------------


def test_dkim_pass_fail_and_the_header_says_which(dns_server, key):
    original = message("a@sender.example")
    signed = signing.sign(original, [key]) + original
    verdict = run_check(dns_server, signed, sender="a@forwarder.example")
    assert methods(verdict)["dkim"] == "pass", verdict.header
    assert "header.d=sender.example header.s=sel header.b=" in verdict.header
    tampered = signed.replace(b"body", b"bodY")
    assert methods(run_check(dns_server, tampered, sender="a@forwarder.example"))["dkim"] == "fail"


def test_dkim_without_a_key_is_permerror_and_none_without_a_signature(dns_server, key, tmp_path):
    path = tmp_path / "k.key"
    dkimkeys.write_key(str(path), dkimkeys.new_key("ed25519", 0))
    unpublished = signing.load_key("sender.example", "gone", str(path))
    original = message("a@sender.example")
    verdict = run_check(dns_server, signing.sign(original, [unpublished]) + original, sender="")
    assert methods(verdict)["dkim"] == "permerror", verdict.header
    assert "dkim=none" in run_check(dns_server, original, sender="").header


@pytest.mark.parametrize(
    "record, reason",
    [("v=DKIM1; k=ed25519; p=", "key revoked"), (None, "key record of another version")],
    ids=["revoked", "v=DKIM2"],
)
def test_a_key_record_that_can_verify_nothing_is_permerror(tmp_path, record, reason):
    """A reviewer's finding: a revoked key (p= empty) and a record of another version than
    DKIM1 gave `fail`, "signature did not verify"; RFC 6376 6.1.2 and 3.6.1 make them a
    PERMFAIL, `permerror`, with the reason."""
    path = tmp_path / "k.key"
    dkimkeys.write_key(str(path), dkimkeys.new_key("ed25519", 0))
    key = signing.load_key("sender.example", "sel", str(path))
    published = record or key.dns_record().replace("v=DKIM1", "v=DKIM2")
    server = DNSServer(Records(f'sel._domainkey.sender.example. TXT "{published}"\n'))
    server.start()
    try:
        original = message("a@sender.example")
        verdict = run_check(server, signing.sign(original, [key]) + original, sender="")
    finally:
        server.stop()
    assert methods(verdict)["dkim"] == "permerror", verdict.header
    assert reason in verdict.header, verdict.header


# --- DMARC ----------------------------------------------------------------------------------


def test_dmarc_passes_by_aligned_spf_or_aligned_dkim(dns_server, key):
    by_spf = run_check(dns_server, message("a@sender.example"), sender="b@sender.example")
    assert methods(by_spf)["dmarc"] == "pass" and "(p=reject dis=none)" in by_spf.header
    original = message("a@sender.example")
    by_dkim = run_check(
        dns_server, signing.sign(original, [key]) + original, sender="b@forwarder.example"
    )
    assert (methods(by_dkim)["spf"], methods(by_dkim)["dmarc"]) == ("pass", "pass")


def test_dmarc_fail_reject_is_refused_only_when_enforcing(dns_server):
    forged = message("ceo@sender.example")
    shown = run_check(dns_server, forged, sender="a@forwarder.example")
    # header mode does nothing to the message: dis=none (what was done, as OpenDMARC says it)
    assert methods(shown)["dmarc"] == "fail" and "(p=reject dis=none)" in shown.header
    assert shown.refusal is None
    refused = run_check(dns_server, forged, sender="a@forwarder.example", enforce=True)
    assert refused.refusal is not None and (refused.refusal.code, refused.refusal.status) == (
        550,
        "5.7.1",
    )
    assert "sender.example" in refused.refusal.text


@pytest.mark.parametrize(
    "from_address, policy",
    [
        # sp= for a subdomain, shown beside the record's p= (as Gmail does: the record reads
        # p=reject; sp=quarantine, and "p=quarantine" alone would not match it)
        ("a@sub.sender.example", "(p=reject sp=quarantine dis=quarantine)"),
        ("a@lenient.example", "(p=none dis=none)"),
        ("a@sampled.example", "(p=reject dis=quarantine)"),  # pct=0: one step milder
    ],
)
def test_dmarc_policies_that_do_not_reject(dns_server, from_address, policy):
    verdict = run_check(
        dns_server, message(from_address), sender="a@forwarder.example", enforce=True
    )
    assert methods(verdict)["dmarc"] == "fail" and policy in verdict.header, verdict.header
    assert verdict.refusal is None


def test_strict_spf_alignment(dns_server):
    relaxed_would_pass = run_check(
        dns_server, message("a@strict.example"), sender="a@mail.strict.example"
    )
    assert methods(relaxed_would_pass)["spf"] == "pass"
    assert methods(relaxed_would_pass)["dmarc"] == "fail"


def test_no_policy_and_no_single_from(dns_server):
    assert (
        methods(run_check(dns_server, message("a@nothing.example"), sender=""))["dmarc"] == "none"
    )
    # two From: fields (RFC 5322 allows one): both are judged, as a second address would be,
    # so a forger's added field is no way around the other domain's p=reject
    fields = b"From: a@nothing.example\r\nFrom: b@sender.example\r\n\r\nbody\r\n"
    assert methods(run_check(dns_server, fields, sender=""))["dmarc"] == "fail"
    nothing = b"From: undisclosed\r\n\r\nbody\r\n"
    assert methods(run_check(dns_server, nothing, sender=""))["dmarc"] == "permerror"
    # one field, two addresses: each domain is checked (here one, which fails p=reject)
    two = b"From: a@sender.example, b@sender.example\r\n\r\nbody\r\n"
    assert methods(run_check(dns_server, two, sender=""))["dmarc"] == "fail"


def test_policy_records():
    parsed = dmarc.parse("v=DMARC1; p=reject; sp=none; pct=50; adkim=s")
    assert parsed == dmarc.Policy("reject", "none", 50, "s", "r")
    assert dmarc.parse("v=DMARC1; p=bogus") is None
    assert dmarc.parse("v=DMARC1; rua=mailto:x@example.org") == dmarc.Policy(
        "none", "none", 100, "r", "r"
    )
    assert dmarc.parse("v=spf1 -all") is None
    assert dmarc.organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert dmarc.organizational_domain("mail.remote.test") == "remote.test"  # unknown TLD
    assert dmarc.aligned("mail.example.org", "example.org", "r")
    assert not dmarc.aligned("mail.example.org", "example.org", "s")
    assert not dmarc.aligned("example.org", "example.net", "r")


def test_a_policy_record_is_parsed_once_while_remembered_if_of_a_real_records_size():
    record = "v=DMARC1; p=quarantine; pct=20"
    first = dmarc.parse(record)
    assert first == dmarc.Policy("quarantine", "quarantine", 20, "r", "r")
    assert dmarc.parse(" ".join(record.split(" "))) is first  # (the same text, anew: remembered)
    assert dmarc.parse(record + "; sp=none") == dmarc.Policy("quarantine", "none", 20, "r", "r")
    kept = dmarc.parse.cache.cache_info().currsize
    padded = record + ";" + " " * dmarc.REMEMBERED_MAX  # (a sender chooses its record's length)
    assert dmarc.parse(padded) == first
    assert dmarc.parse.cache.cache_info().currsize == kept  # (parsed, not kept)
    assert dmarc.parse.cache.cache_info().maxsize * dmarc.REMEMBERED_MAX <= 128 * 1024


def test_pct_samples_the_failures(dns_server):
    """pct=50: about half the failures get p=reject, the others one step milder."""
    from mailerd.inbound.sender_policy import SpfResult

    spf = SpfResult("fail", "mailfrom", "a@forwarder.example", "forwarder.example")
    rng = random.Random(7)

    async def main() -> list[str]:
        lookups = Lookups.make((dns_server.host, dns_server.port), 3.0)
        return [
            (await dmarc.evaluate(lookups, ["half.example"], spf, [], rng)).disposition
            for _ in range(200)
        ]

    dispositions = asyncio.run(main())
    assert set(dispositions) == {"reject", "quarantine"}
    assert 70 < dispositions.count("reject") < 130


def test_dmarc_judge_needs_the_cache_then_agrees_with_evaluate(dns_server):
    """judge from an empty cache raises NotCached naming the record it lacks; once evaluate
    has asked the DNS, judge from the cache alone gives evaluate's verdicts, asking nothing."""
    spf = SpfResult("pass", "mailfrom", "a@sender.example", "sender.example")
    cases = [["sender.example"], ["lenient.example"], ["strict.example", "sender.example"]]
    lookups = Lookups.make((dns_server.host, dns_server.port), 3.0)
    with pytest.raises(NotCached) as missing:
        dmarc.judge(lookups.cached_txt, cases[0], spf, [])
    assert (missing.value.name, missing.value.rdtype) == ("_dmarc.sender.example", "TXT")

    async def main() -> list[dmarc.DmarcResult]:
        return [await dmarc.evaluate(lookups, domains, spf, []) for domains in cases]

    evaluated = asyncio.run(main())
    assert [v.result for v in evaluated] == ["pass", "fail", "fail"]
    asked = len(dns_server.queries)
    assert [dmarc.judge(lookups.cached_txt, domains, spf, []) for domains in cases] == evaluated
    assert len(dns_server.queries) == asked


def test_a_name_longer_than_any_is_no_name_at_once_and_not_kept(dns_server):
    """A From: domain folded over 61 KB reaches the DMARC lookup (and a DKIM d= or s= the key
    lookup): no DNS name is that long, so it is no such name, at once, never asked and never
    kept (1,024 such lookups kept 60 MB, 5 ms of CPU each)."""
    lookups = Lookups.make((dns_server.host, dns_server.port), 3.0)
    asked = len(dns_server.queries)
    domain = ".".join(["a" * 60] * 1000) + ".example"
    started = time.process_time()
    for i in range(200):
        hit = lookups.cached(f"_dmarc.{i}{domain}", "TXT")
        assert hit is not None and not hit.exists and hit.records == ()
    assert time.process_time() - started < 0.2
    assert not lookups._hits
    assert lookups.cached_txt(f"_dmarc.{domain}") == ()
    assert len(dns_server.queries) == asked
    # (a real name, of the longest kind, is still looked for in the cache)
    assert lookups.cached(".".join(["b" * 63] * 3) + ".example", "TXT") is None


NEGATIVE_ZONE = """
$ORIGIN org-policy.example.
_dmarc       TXT "v=DMARC1; p=reject"
news         TXT "v=spf1 a:gone.org-policy.example ip4:127.0.0.1 -all"
"""


def test_negative_answers_the_dns_lets_us_cache_are_used_from_the_cache():
    """With negative answers that carry an SOA (as on the Internet), a subdomain whose DMARC
    policy is at its organisational domain (NXDOMAIN for its own _dmarc) and an SPF record with
    a void lookup are checked from the cache after the first message, in the event loop: no
    query, the SPF verdict kept in the memo, DMARC judged with nothing missing."""
    mail = message("a@news.org-policy.example")
    sender = "a@news.org-policy.example"

    async def main(server: DNSServer, verifier: Verifier) -> None:
        first = await verifier.check("127.0.0.1", "client.test", sender, mail)
        assert methods(first) == {"spf": "pass", "dkim": "none", "dmarc": "pass"}, first.header
        asked = len(server.queries)
        assert ("udp", "_dmarc.news.org-policy.example. TXT") in server.queries
        again = await verifier.check("127.0.0.1", "client.test", sender, mail)
        assert again.header == first.header
        assert server.queries[asked:] == []
        assert verifier.spf_memo.get("127.0.0.1", sender, "client.test", time.time()) is not None
        spf = SpfResult("pass", "mailfrom", sender, "news.org-policy.example")
        verdict = dmarc.judge(verifier.lookups.cached_txt, ["news.org-policy.example"], spf, [])
        assert (verdict.result, verdict.policy) == ("pass", "reject")

    with serve() as server:
        server.records = Records(NEGATIVE_ZONE, negative_ttl=60)
        with_verifier(server, lambda verifier: main(server, verifier))


TEXTS_ZONE = """
$TTL 2
$ORIGIN texts.example.
sel._domainkey TXT "v=DKIM1; k=rsa; " "p=abc"
"""


def test_a_cached_answers_texts_are_made_once_and_expire_with_it(monkeypatch):
    """A record of several strings reads as them joined, from the DNS and from the cache (for
    DMARC's judge and for the libraries' Bridge), its text made once for the cached answer;
    once the answer expires, so does its text, and the record the DNS now serves is read."""
    name = "sel._domainkey.texts.example"

    async def main(server: DNSServer) -> None:
        lookups = Lookups.make((server.host, server.port), 3.0)
        assert await lookups.txt(name) == ("v=DKIM1; k=rsa; p=abc",)
        texts = lookups.cached_txt(name)
        assert texts == ("v=DKIM1; k=rsa; p=abc",) and lookups.cached_txt(name) is texts
        bridge = Bridge(lookups, asyncio.get_running_loop(), 3.0, cache_only=True)
        assert bridge.query(name, "TXT").records is texts
        server.records = Records(TEXTS_ZONE.replace("p=abc", "p=xyz"))
        now = time.time()
        monkeypatch.setattr(time, "time", lambda: now + 3)  # (past the TTL of 2 s)
        with pytest.raises(NotCached):
            lookups.cached_txt(name)
        assert await lookups.txt(name) == ("v=DKIM1; k=rsa; p=xyz",)
        assert bridge.query(name, "TXT").records == ("v=DKIM1; k=rsa; p=xyz",)

    with serve(TEXTS_ZONE) as server:
        asyncio.run(main(server))


def test_names_a_sender_makes_up_cannot_grow_the_cache_without_bound(monkeypatch):
    """Every message may name new domains (its MAIL FROM, its From, its DKIM selectors) with
    the TTLs their sender chose: the worker's cache keeps the most recently used answers only."""
    monkeypatch.setattr(resolver, "CACHE_ENTRIES", 8, raising=False)
    names = [f"n{i}.made-up.example" for i in range(30)]

    async def main(lookups: Lookups) -> None:
        for name in names:
            assert await lookups.txt(name) == ("v=spf1 -all",)
        cache = lookups.resolver.cache
        assert isinstance(cache, dns.resolver.LRUCache)
        assert len(cache.data) == 8
        assert lookups.cached(names[-1], "TXT") is not None
        assert lookups._from_cache(names[0], "TXT") is None

    with serve() as server:
        server.records = Records("".join(f'{name}. 86400 TXT "v=spf1 -all"\n' for name in names))
        asyncio.run(main(Lookups.make((server.host, server.port), 3.0)))


SAMPLED_ZONE = """
$ORIGIN org-a.example.
_dmarc       TXT "v=DMARC1; p=reject; pct=50"
$ORIGIN org-b.example.
_dmarc       TXT "v=DMARC1; p=quarantine; pct=50"
"""


class CountingRandom(random.Random):
    draws = 0

    def randrange(self, *args, **kwargs):  # type: ignore[override]
        self.draws += 1
        return super().randrange(*args, **kwargs)


def test_dmarc_samples_each_failing_domain_once_even_from_a_cold_cache():
    """pct= sampling draws once per From: domain whose policy is found, however many lookups
    the evaluation needed first (subdomains: each policy is at the organisational domain)."""
    spf = SpfResult("fail", "mailfrom", "a@x.example", "x.example")
    domains = ["news.org-a.example", "mail.org-b.example"]

    async def main(lookups: Lookups) -> dmarc.DmarcResult:
        return await dmarc.evaluate(lookups, domains, spf, [], rng)

    with serve(SAMPLED_ZONE) as server:
        rng = CountingRandom(7)
        verdict = asyncio.run(main(Lookups.make((server.host, server.port), 3.0)))
    assert verdict.result == "fail" and rng.draws == 2, (verdict, rng.draws)


FAILING_DMARC_ZONE = """
$ORIGIN good.example.
_dmarc       TXT "v=DMARC1; p=reject"
$ORIGIN failing.example.
_dmarc       TXT "dnsserver:{marker}"
"""


@pytest.mark.parametrize("marker", ["servfail", "timeout"])
def test_dmarc_evaluate_a_failing_lookup_is_temperror_for_its_domain_only(marker):
    """A From domain whose policy lookup fails (SERVFAIL, or no answer) is temperror, asked
    once, and the other From domain is still judged: the worse of the two stands."""
    passing = SpfResult("pass", "mailfrom", "a@good.example", "good.example")
    failing = SpfResult("fail", "mailfrom", "a@else.example", "else.example")
    domains = ["failing.example", "good.example"]

    async def main(server: DNSServer) -> list[dmarc.DmarcResult]:
        lookups = Lookups.make((server.host, server.port), 0.5)
        return [await dmarc.evaluate(lookups, domains, spf, []) for spf in (passing, failing)]

    with serve(FAILING_DMARC_ZONE.format(marker=marker)) as server:
        open_, failed = asyncio.run(main(server))
    assert (open_.result, open_.from_domain) == ("temperror", "failing.example")
    assert (failed.result, failed.from_domain, failed.disposition) == (
        "fail",
        "good.example",
        "reject",
    )
    assert server.queries.count(("udp", "_dmarc.failing.example. TXT")) == 2  # once per call


# --- the field, forged fields, time ---------------------------------------------------------


def test_forged_fields_with_our_id_are_removed_others_kept(dns_server):
    incoming = message(
        "a@sender.example",
        b"Authentication-Results: MX.example.org; spf=pass smtp.mailfrom=ceo@bank.example\r\n"
        b"Authentication-Results: (comment) mx.example.org;\r\n dkim=pass\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n",
    )
    verdict = run_check(dns_server, incoming, sender="a@sender.example")
    assert verdict.content is not None
    assert b"bank.example" not in verdict.content and b"dkim=pass" not in verdict.content
    assert b"Authentication-Results: other.example; spf=fail\r\n" in verdict.content
    assert run_check(dns_server, message("a@sender.example"), sender="").content is None


@pytest.mark.parametrize("authors", [1, 11])
def test_no_line_of_the_field_is_longer_than_998_octets(dns_server, authors):
    """What a sender writes shown in our field keeps each of its lines within RFC 5322's 998
    octets: a signature's d= and s= of 900 octets each (each on its own line of the sender's,
    which SMTP's 1,000 allow) made a line of 1,881, and a From: of more author domains than
    are judged, each of 253 octets, a line of 2,550. A d= or s= no DNS name can be is not
    shown (the signature is still told apart by its b=), nor the domains past 800 octets."""
    long_d, long_s = "d" * 900 + ".example", "s" * 900
    label = "a" * 60
    domains = [".".join([f"{label[:-2]}{i:02d}", label, label, label]) + ".example"
               for i in range(authors)]  # fmt: skip
    incoming = (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; h=from;\r\n"
        + f" d={long_d};\r\n s={long_s};\r\n bh=AAAA; b=QUJDRA\r\n".encode()
        + b"From: "
        + b",\r\n ".join(f"x@{d}".encode() for d in domains)
        + b"\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    verdict = run_check(dns_server, incoming, sender="a@sender.example")
    lines = verdict.header.split("\r\n")
    assert max(len(line.encode()) for line in lines) <= 998, [len(line) for line in lines]
    dkim = next(line for line in lines if line.lstrip().startswith("dkim="))
    assert "header.b=QUJDRA" in dkim and long_d not in dkim and long_s not in dkim, dkim
    assert domains[0] in verdict.header, verdict.header  # (the first is shown)


def test_a_field_whose_id_is_behind_a_long_comment_is_removed_unread():
    """A reviewer's finding: a comment of 250 KB, "((((...", was read a byte at a time in the
    event loop, twice a message (60 ms each): every session of the worker waited. Past
    CFWS_MAX octets of white space and comments before the id, the field is taken for ours,
    unread: no real one has such, and a forged one must go whatever hides behind them."""
    assert results.ours(b" (" + b"x" * 500 + b") mx.example.org; spf=pass", HOST)
    long = b" " + b"(" * 200_000 + b")" * 200_000 + b" other.example; spf=pass"
    assert results.ours(long, HOST)
    assert results.ours(b" " + b"(" * (results.CFWS_MAX + 1), HOST)
    assert results.ours(b" " * (results.CFWS_MAX + 1) + b"other.example; spf=pass", HOST)
    assert not results.ours(b" " * (results.CFWS_MAX - 1) + b"other.example; spf=pass", HOST)
    # An attacker's pass: the id itself made long, a quoted string of 250 KB of quoted pairs,
    # or a token of encoded-words, was read whole (100-200 ms a message): past ID_MAX, ours.
    assert results.ours(b' "' + b"\\a" * 125_000 + b'"; spf=pass', HOST)
    assert results.ours(b' "' + b"a" * (results.ID_MAX + 1), HOST)
    assert results.ours(b" " + b"=?utf-8?q?a?=" * 20_000 + b"; spf=pass", HOST)
    assert results.ours(b' "mx.example.org"; spf=pass', HOST)
    assert not results.ours(b' "' + b"a" * 100 + b'"; spf=pass', HOST)
    assert not results.ours(b' "other.example', HOST)  # (unclosed, short: not an id of ours)


def test_the_comments_read_before_the_ids_are_capped_for_the_whole_message():
    """A third attacker's pass: 60 fields, each with 4 KB of "((((" before its id (under the
    cap of one field), held the event loop 100 ms. The cap is the message's: past it, the
    remaining fields are taken for ours, unread; honest fields, a space before the id, are
    read (and kept) whatever their number."""
    honest = b"Authentication-Results: other.example; spf=pass\r\n" * 100
    padded = b"Authentication-Results: " + b"(" * 3990 + b" other.example; spf=pass\r\n"
    message = honest + padded * 60 + b"Subject: s\r\n\r\nbody\r\n"
    kept = results.without_forged(message, HOST)
    assert kept is not None
    assert kept.count(b"Authentication-Results: other.example") == 100
    assert kept.count(b"((((") == 0  # (the honest fields' spaces left less than one needs)


def test_an_id_split_into_encoded_words_is_read_whole():
    """A third attacker's pass: RFC 2047 6.2 joins encoded-words next to each other, so a
    reader that decodes the field shows "mx.example.org; dmarc=pass"; it was kept."""
    assert results.ours(b" =?utf-8?q?mx.?= =?utf-8?q?example.org?=; dmarc=pass", HOST)
    assert results.ours(b" =?utf-8?q?mx.?=\r\n =?utf-8?b?ZXhhbXBsZS5vcmc=?=; x=y", HOST)
    assert not results.ours(b" =?utf-8?q?other.?= =?utf-8?q?example?=; dmarc=pass", HOST)
    assert not results.ours(b" =?utf-8?q?mx.?= example.org; dmarc=pass", HOST)


def test_the_field_is_folded_one_result_per_line(dns_server):
    verdict = run_check(dns_server, message("a@sender.example"), sender="b@sender.example")
    lines = verdict.header.split("\r\n")
    assert lines[0] == f"Authentication-Results: {HOST};" and lines[-1] == ""
    assert [line.split("=")[0].strip() for line in lines[1:-1]] == ["spf", "dkim", "dmarc"]
    assert results.ours(b" mx.example.org; spf=pass", HOST)
    assert not results.ours(b" mx.example.org.evil; spf=pass", HOST)


def test_an_unanswering_dns_costs_the_timeout_once_and_says_temperror(dns_server):
    started = time.monotonic()
    verdict = run_check(
        dns_server, message("a@timeout.example"), sender="a@slow.sender.example", timeout=1.0
    )
    took = time.monotonic() - started
    assert methods(verdict)["spf"] == "temperror" and methods(verdict)["dmarc"] == "temperror"
    assert took < 2.5, f"{took:.1f} s for a 1 s DNS timeout"
    assert verdict.refusal is None


def test_module_files_have_one_subject_each():
    """(A guard on the package's layout: each module names the method it owns.)"""
    package = Path(results.__file__).parent
    assert {p.stem for p in package.glob("*.py")} == {
        "__init__", "blocklists", "dmarc", "lookups", "results", "sender_policy", "signatures",
        "verifier",
    }  # fmt: skip


@pytest.mark.parametrize(
    "message",
    [b"a body line and no header\r\n", b"\r\nbody after an empty header section\r\n", b""],
    ids=["no-header", "empty-header", "empty"],
)
def test_a_message_without_a_header_section_is_checked(dns_server, message):
    """No header section to read (the network listener takes such a message): SPF as usual,
    dkim=none, dmarc=permerror (no From:); never an exception (the client would hear 451)."""
    verdict = run_check(dns_server, message, sender="a@sender.example")
    assert methods(verdict) == {"spf": "pass", "dkim": "none", "dmarc": "permerror"}, verdict


INHERITED = {"_dmarc.inv.example": ["v=DMARC1; p=none; sp=reject"]}
NONE = dmarc.Policy("none", "none", 100, "r", "r")


@pytest.mark.parametrize(
    "record, expected",
    [
        ("v=DMARC1; p=bogus", None),
        ("v=DMARC1", None),
        ("v=DMARC1; p=reject; sp=bogus", None),
        ("v=DMARC1; p=bogus; rua=mailto:d@inv.example", NONE),
        ("v=DMARC1; p=bogus; rua=", None),  # (no report URI: no request for reports)
        ("v=DMARC1; p=bogus; rua=nonsense", None),
        ("v=DMARC1; p=reject; sp=rejects; rua=mailto:d@inv.example", NONE),
        ("v=DMARC1; p=reject; sp=none", dmarc.Policy("reject", "none", 100, "r", "r")),
    ],
    ids=["bad-p", "no-p", "bad-sp", "bad-p-rua", "empty-rua", "bad-rua", "bad-sp-rua", "good"],
)
def test_a_record_at_the_from_domain_is_never_passed_over_for_the_organisational_one(
    record: str, expected: dmarc.Policy | None
):
    """RFC 7489 6.6.3: the organisational domain is asked only when the From: domain has no
    DMARC record at all. One there without a valid p= or sp= means no DMARC processing, or
    p=none when it asks for reports (rua=); it is never read as leave to apply the
    organisational domain's sp=reject (a reviewer's finding)."""
    records = INHERITED | {"_dmarc.sub.inv.example": [record]}
    found = dmarc.discover(lambda name: records.get(name, []), "sub.inv.example")
    assert found == (None if expected is None else (expected, False))
    assert dmarc.discover(lambda name: INHERITED.get(name, []), "sub.inv.example") == (
        dmarc.Policy("none", "reject", 100, "r", "r"),
        True,
    )

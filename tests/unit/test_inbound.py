"""The inbound checks (mailerd.inbound) against a real DNS server of the test's own (tests/
dnsserver.py, in process): SPF's results, DKIM's (signatures made by mailerd.signing and
tampered with), DMARC's policy discovery, alignment and disposition, the Authentication-Results
field, the removal of forged ones, and the bound on the time the DNS may take."""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dnsserver import DNSServer, Records

from mailerd import signing
from mailerd.commands import dkimkeys
from mailerd.inbound import dmarc, results
from mailerd.inbound.lookups import Lookups
from mailerd.inbound.verifier import Verdict, Verifier

HOST = "mx.example.org"


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


def test_spf_of_the_helo_for_the_null_sender(dns_server):
    verdict = run_check(
        dns_server, message("x@elsewhere.example"), sender="", helo="sender.example"
    )
    assert methods(verdict)["spf"] == "pass" and "smtp.helo=sender.example" in verdict.header


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
        ("a@sub.sender.example", "(p=quarantine dis=quarantine)"),  # sp= for a subdomain
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
    fields = b"From: a@sender.example\r\nFrom: b@sender.example\r\n\r\nbody\r\n"
    assert methods(run_check(dns_server, fields, sender=""))["dmarc"] == "permerror"
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
        "__init__", "dmarc", "lookups", "results", "sender_policy", "signatures", "verifier"
    }  # fmt: skip

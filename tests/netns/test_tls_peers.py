"""A real Postfix sends mail to mailerd over STARTTLS, in the test's network namespace.

mailerd is the receiving MX: its untrusted listener on 198.51.100.1:25 (``-n``), local domain
example.org, hostname mx.example.org, with a certificate for mx.example.org signed by the
test CA (tests/certs.py). The sender is a private Postfix instance (postfix_peer.py) in the same
namespace, relaying everything to ``[198.51.100.1]:25`` from 198.51.100.10, with its own TLS
policy for each test:

- ``encrypt`` with the CA as ``smtp_tls_CAfile``: delivered over TLS, Postfix logs
  "Trusted TLS connection established", and the stored message's Received: header says
  ``with ESMTPS`` and has the line ``(using TLSv1.3 with cipher <name> (<bits>/<bits> bits))``
  naming the protocol, cipher and bits Postfix itself logged;
- ``verify`` with ``match=mx.example.org``: Postfix checks the name too ("Verified");
- ``may`` (opportunistic, as most of the Internet sends): Postfix uses TLS all the same;
- ``encrypt`` towards a mailerd without a certificate: Postfix defers the message (TLS is
  required but not offered) and keeps it; nothing is delivered in clear;
- ``may`` towards a mailerd without a certificate: delivered in clear, and the Received: header
  says ``with ESMTP``, without a ``(using …)`` line.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import certs
import pytest

from .conftest import (
    HOSTNAME,
    NS_V4,
    PYTHON,
    Mailerd,
    Netns,
    finish,
    make_message,
    token,
    wait_until,
)
from .postfix_peer import PEER_HOSTNAME, PostfixPeer, require_postfix

PEER_ADDR = "198.51.100.10"  # Postfix's source address (one of the namespace's)
NEXTHOP = f"[{NS_V4}]:25"
RELAY = f"{NS_V4}[{NS_V4}]:25"  # how Postfix names mailerd in its log
DELIVERY_TIMEOUT = 20.0
QUIET = 2.0

USING_RE = re.compile(
    r"\(using (?P<protocol>[A-Za-z]+v[\d.]+) with cipher (?P<cipher>\S+) "
    r"\((?P<bits>\d+)/(?P<alg_bits>\d+) bits\)\)"
)

_ports = itertools.count(2640)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> certs.CA:
    return certs.make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def mx_pair(ca: certs.CA) -> certs.Pair:
    return ca.issue(HOSTNAME)


@pytest.fixture(scope="module")
def tls_ready(netns: Netns) -> None:
    """Fail when mailerd cannot even print --help, or offers no --tls-cert there."""
    proc = netns.run([PYTHON, "-m", "mailerd", "--help"])
    if proc.returncode != 0:
        pytest.fail(f"mailerd --help failed ({proc.returncode}): {proc.stderr}", pytrace=False)
    assert "--tls-cert" in proc.stdout, proc.stdout
    require_postfix()


@pytest.fixture
def mx(netns: Netns, tmp_path: Path, tls_ready) -> Iterator[Callable[..., Mailerd]]:
    """make(pair=None) → a started mailerd whose untrusted listener is 198.51.100.1:25 (with
    --tls-cert/--tls-key when given a pair); stopped at the test's end, which fails if it
    exited badly or logged a traceback."""
    made: list[Mailerd] = []

    def make(pair: certs.Pair | None = None) -> Mailerd:
        name = f"mx{len(made) + 1}"
        base = tmp_path / name
        base.mkdir()
        extra = ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)] if pair else []
        m = Mailerd(netns, base, port=next(_ports), untrusted=f"{NS_V4}:25", extra=extra, name=name)
        made.append(m)
        return m.start()

    yield make
    problems = []
    for m in made:
        problems += finish(m)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def postfix(netns: Netns, tmp_path: Path, tls_ready) -> Iterator[Callable[..., PostfixPeer]]:
    """make(**main_cf) → a started private Postfix relaying everything to [198.51.100.1]:25."""
    made: list[PostfixPeer] = []

    def make(**params: str) -> PostfixPeer:
        settings = {"relayhost": NEXTHOP, "smtp_bind_address": PEER_ADDR, **params}
        peer = PostfixPeer(netns, tmp_path / f"postfix{len(made) + 1}", **settings)
        made.append(peer)
        return peer.start()

    yield make
    problems = []
    for peer in made:
        problems += peer.stop()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def send_through(peer: PostfixPeer, rcpt: str, subject: str) -> tuple[str, bytes, str]:
    """Inject one message with Postfix's sendmail; (Postfix queue id, message, sender)."""
    sender = f"{token('alice')}@sender.test"
    message = make_message(sender, [rcpt], subject)
    message_id = re.search(rb"Message-ID: <([^>]+)>", message).group(1).decode()
    peer.send(sender, [rcpt], message)
    return peer.wait_queue_id(message_id), message, sender


def wait_stored(m: Mailerd, user: str, peer: PostfixPeer) -> bytes:
    got = wait_until(lambda: m.mailbox(user), DELIVERY_TIMEOUT)
    assert got, (
        f"nothing arrived in mailbox {user} within {DELIVERY_TIMEOUT}s\n"
        f"--- postfix log ---\n{peer.log_tail()}\n--- mailerd log ---\n{m.log_tail()}"
    )
    assert len(got) == 1, f"{len(got)} messages in {user}, expected 1"
    return got[0]


def received_header(raw: bytes) -> tuple[list[str], str]:
    """The Received: header mailerd prepended (after Return-Path:): its physical lines, and
    the header unfolded into one line."""
    lines = raw.decode("utf-8", "replace").split("\r\n")
    assert lines[0].startswith("Return-Path: "), f"no Return-Path first: {raw[:300]!r}"
    assert lines[1].startswith("Received: "), f"no Received: second: {raw[:400]!r}"
    header = [lines[1]]
    for line in lines[2:]:
        if line[:1] not in (" ", "\t"):
            break
        header.append(line)
    return header, " ".join(part.strip() for part in header)


def check_stored(raw: bytes, sender: str, message: bytes) -> tuple[list[str], str]:
    assert raw.split(b"\r\n", 1)[0] == f"Return-Path: <{sender}>".encode(), raw[:200]
    header, unfolded = received_header(raw)
    assert re.match(rf"Received: from {re.escape(PEER_HOSTNAME)} ", unfolded), unfolded
    assert PEER_ADDR in unfolded, f"the client's address {PEER_ADDR} is not named: {unfolded}"
    assert re.search(rf"\bby {re.escape(HOSTNAME)}\b", unfolded), unfolded
    marker = re.search(rb"X-Test-Marker: \S+", message).group(0)
    assert marker in raw, f"the message's own headers are missing: {raw[:800]!r}"
    body = message.split(b"\r\n\r\n", 1)[1]
    assert raw.endswith(body), f"the body changed on the way: {raw[-300:]!r}"
    return header, unfolded


def check_tls_received(header: list[str], unfolded: str, tls_line: re.Match[str]) -> None:
    """`with ESMTPS`, and a line `(using <protocol> with cipher <name> (<b>/<b> bits))` that
    names what Postfix logged for the same connection."""
    assert re.search(r"\bwith ESMTPS\b", unfolded), (
        f"a message received over TLS must say 'with ESMTPS': {unfolded}"
    )
    using = USING_RE.search(unfolded)
    assert using, f"no '(using … with cipher … (N/N bits))' in the Received: header:\n{header}"
    own_line = [line for line in header if USING_RE.match(line.strip())]
    assert own_line, (
        "the Received: header must have a line starting '(using … bits))':\n" + "\n".join(header)
    )
    seen = {k: tls_line[k] for k in ("protocol", "cipher", "bits", "alg_bits")}
    stored = {k: using[k] for k in ("protocol", "cipher", "bits", "alg_bits")}
    assert stored == seen, (
        f"the Received: header must name the connection's TLS as it was: Postfix logged "
        f"{seen}, the header says {stored}\n{unfolded}"
    )
    assert stored["protocol"] in ("TLSv1.2", "TLSv1.3"), stored


def only_tls_line(peer: PostfixPeer, trust: tuple[str, ...]) -> re.Match[str]:
    lines = peer.tls_lines()
    assert len(lines) == 1, (
        f"expected one TLS connection in Postfix's log, got {len(lines)}\n{peer.log_tail()}"
    )
    line = lines[0]
    assert line["peer"] == RELAY, line.group(0)
    assert line["trust"] in trust, (
        f"Postfix's TLS connection is {line['trust']}, expected {' or '.join(trust)}: "
        f"{line.group(0)}"
    )
    return line


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_postfix_encrypt_delivers_over_tls(mx, postfix, ca, mx_pair):
    """smtp_tls_security_level = encrypt + the test CA: a trusted TLS connection, and the
    stored Received: header records it (ESMTPS, protocol, cipher, bits)."""
    m = mx(mx_pair)
    user = token("tls")
    rcpt = m.add_user(user)
    peer = postfix(smtp_tls_security_level="encrypt", smtp_tls_CAfile=str(ca.cert))
    qid, message, sender = send_through(peer, rcpt, "postfix encrypt")
    d = peer.wait_delivery(qid, DELIVERY_TIMEOUT)
    assert d.status == "sent", f"Postfix did not deliver: {d.line}\n{m.log_tail()}"
    assert d.relay == RELAY, d.line
    assert d.reply.startswith("250 "), d.line
    tls_line = only_tls_line(peer, ("Trusted", "Verified"))
    assert tls_line["protocol"] == "TLSv1.3", (
        f"Postfix 3.7 with OpenSSL 3 and a TLS 1.3 server speak TLS 1.3: {tls_line.group(0)}"
    )
    raw = wait_stored(m, user, peer)
    header, unfolded = check_stored(raw, sender, message)
    check_tls_received(header, unfolded, tls_line)


def test_postfix_verify_checks_the_name(mx, postfix, ca, mx_pair):
    """smtp_tls_security_level = verify, matching mx.example.org: "Verified", delivered."""
    m = mx(mx_pair)
    user = token("vfy")
    rcpt = m.add_user(user)
    policy = f"inline:{{ {{ {NEXTHOP} = verify match={HOSTNAME} }} }}"
    peer = postfix(
        smtp_tls_security_level="verify",
        smtp_tls_CAfile=str(ca.cert),
        smtp_tls_policy_maps=policy,
    )
    qid, message, sender = send_through(peer, rcpt, "postfix verify")
    d = peer.wait_delivery(qid, DELIVERY_TIMEOUT)
    assert d.status == "sent", f"Postfix did not deliver: {d.line}\n{peer.log_tail()}"
    tls_line = only_tls_line(peer, ("Verified",))
    header, unfolded = check_stored(wait_stored(m, user, peer), sender, message)
    check_tls_received(header, unfolded, tls_line)


def test_postfix_may_uses_tls(mx, postfix, mx_pair):
    """smtp_tls_security_level = may, no CA (an ordinary Internet sender): TLS all the same."""
    m = mx(mx_pair)
    user = token("may")
    rcpt = m.add_user(user)
    peer = postfix(smtp_tls_security_level="may")
    qid, message, sender = send_through(peer, rcpt, "postfix may")
    d = peer.wait_delivery(qid, DELIVERY_TIMEOUT)
    assert d.status == "sent", f"Postfix did not deliver: {d.line}\n{peer.log_tail()}"
    tls_line = only_tls_line(peer, ("Anonymous", "Untrusted", "Trusted"))
    header, unfolded = check_stored(wait_stored(m, user, peer), sender, message)
    check_tls_received(header, unfolded, tls_line)


def test_postfix_encrypt_defers_without_certificate(mx, postfix, ca):
    """mailerd without a certificate offers no STARTTLS: Postfix with `encrypt` defers the
    message and keeps it; nothing reaches the mailbox in clear."""
    m = mx(None)
    user = token("clr")
    rcpt = m.add_user(user)
    peer = postfix(smtp_tls_security_level="encrypt", smtp_tls_CAfile=str(ca.cert))
    qid, _message, _sender = send_through(peer, rcpt, "postfix encrypt, no certificate")
    d = peer.wait_delivery(qid, DELIVERY_TIMEOUT)
    assert d.status == "deferred", f"must be deferred, not {d.status}: {d.line}"
    assert "TLS is required, but was not offered" in d.reply, d.line
    assert not peer.tls_lines(), peer.log_tail()
    time.sleep(QUIET)
    assert m.mailbox(user) == [], "delivered in clear although the sender required TLS"
    assert qid in peer.queue_listing(), (
        f"Postfix must keep the deferred message {qid}:\n{peer.queue_listing()}"
    )


def test_postfix_may_without_certificate_is_plain_esmtp(mx, postfix):
    """No certificate, `may`: delivered in clear, and the header says so (ESMTP, no using)."""
    m = mx(None)
    user = token("pln")
    rcpt = m.add_user(user)
    peer = postfix(smtp_tls_security_level="may")
    qid, message, sender = send_through(peer, rcpt, "postfix may, no certificate")
    d = peer.wait_delivery(qid, DELIVERY_TIMEOUT)
    assert d.status == "sent", f"Postfix did not deliver: {d.line}\n{peer.log_tail()}"
    assert not peer.tls_lines(), peer.log_tail()
    _header, unfolded = check_stored(wait_stored(m, user, peer), sender, message)
    assert re.search(r"\bwith ESMTP\b(?!S)", unfolded), unfolded
    assert "(using " not in unfolded, unfolded

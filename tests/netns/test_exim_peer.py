"""A real Exim (Debian's exim4-daemon-light: GnuTLS, its own DKIM signer and verifier) as
mailerd's peer in the test's network namespace, both ways (exim_peer.py runs it).

The rest of the suite talks TLS and DKIM with OpenSSL-based peers (Postfix, swaks, smtplib,
curl, msmtp) and OpenDKIM/dkimpy only; much of the Internet's mail arrives from Exim.

- Exim sends to mailerd's port 25 (198.51.100.1 and 2001:db8::1, by the names mx4.example.org
  and mx6.example.org) from 198.51.100.40 / 2001:db8::40 with ``hosts_require_tls`` and
  the test CA (``tls_verify_hosts``: the chain and the name are checked, "CV=yes"), and signs
  with its own signer (an RSA-2048 or an Ed25519 key, c=relaxed or simple); exim.test
  publishes SPF and DMARC p=reject. The stored message must say ``with ESMTPS`` and name the
  protocol, cipher and bits Exim logged, and mailerd's Authentication-Results must have
  spf=pass, dkim=pass for the key used, dmarc=pass. The signed message replayed with one byte
  changed (body or a signed header) must give dkim=fail.
- mailerd delivers mail for rcpt.test (MX mx.exim.test, Exim's receiving daemon, a
  self-signed certificate) with two signatures of its own (`mailerd dkim keygen`: RSA and
  Ed25519): Exim must log that it received over TLS (P=esmtps), and its verifier must say
  pass for each signature ($dkim_verify_status, logged by the DKIM ACL), 7-bit and 8-bit.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import re
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import certs
import pytest

from .conftest import (
    CLIENT_HELO,
    HOSTNAME,
    LOCAL_DOMAIN,
    NS_V4,
    DnsServer,
    Internet,
    Mailerd,
    Netns,
    check_mailerd_runs,
    finish_or_fail,
    make_cert,
    token,
    wait_until,
)
from .exim_peer import EximPeer, require_exim
from .test_dkim_signing import Key, keygen

EXIM_V4 = "198.51.100.40"  # Exim's addresses, added to the namespace by this module
EXIM_V6 = "2001:db8::40"
MAILERD_V6 = "2001:db8::1"
SENDER_DOMAIN = "exim.test"
SENDER = f"carol@{SENDER_DOMAIN}"
RSA_SELECTOR = "rsa2026"  # mailerd's keys
ED_SELECTOR = "ed2026"
DELIVERY_TIMEOUT = 20.0

ZONE = f"""
; tests/netns/test_exim_peer.py (the DKIM records are appended by the fixture)
$ORIGIN {SENDER_DOMAIN}.
@          TXT  "v=spf1 ip4:{EXIM_V4} ip6:{EXIM_V6} -all"
_dmarc     TXT  "v=DMARC1; p=reject"
mx         A    {EXIM_V4}
mx         AAAA {EXIM_V6}
mx         TXT  "v=spf1 a -all"
$ORIGIN rcpt.test.
@          MX   10 mx.exim.test.
$ORIGIN example.org.
mx         A    {NS_V4}
mx         AAAA {MAILERD_V6}
mx4        A    {NS_V4}
mx6        AAAA {MAILERD_V6}
"""

# Exim sending to mailerd: -DHOST=mx4.example.org or mx6.example.org, -DSELECTOR=rsa or ed
# (the key file is named after it), -DCANON=relaxed or simple, -DPRIORITY (GnuTLS's).
SENDER_CONF = """
exim_path = {EXIM}
primary_hostname = mx.exim.test
qualify_domain = exim.test
spool_directory = {BASE}/spool
log_file_path = {BASE}/log/%slog
log_selector = +tls_cipher +tls_certificate_verified +outgoing_port
keep_environment =
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
never_users = root

begin routers
mailerd:
  driver = manualroute
  route_list = * HOST bydns
  self = send
  transport = to_mailerd

begin transports
to_mailerd:
  driver = smtp
  port = 25
  interface = <; 198.51.100.40 ; 2001:db8::40
  helo_data = mx.exim.test
  hosts_require_tls = *
  tls_verify_certificates = {BASE}/ca.crt
  tls_verify_hosts = *
  tls_verify_cert_hostnames = *
.ifdef PRIORITY
  tls_require_ciphers = PRIORITY
.endif
  dkim_domain = exim.test
  dkim_selector = SELECTOR
  dkim_private_key = {BASE}/dkim-${if eq{$dkim_selector}{ed}{ed}{rsa}}.key
  dkim_canon = CANON
  dkim_strict = true
"""

# Exim receiving mail for rcpt.test; its DKIM ACL logs each signature's verdict.
RECEIVER_CONF = """
exim_path = {EXIM}
primary_hostname = mx.exim.test
qualify_domain = exim.test
spool_directory = {BASE}/spool
log_file_path = {BASE}/log/%slog
pid_file_path = {BASE}/exim.pid
log_selector = +tls_cipher +received_recipients +8bitmime
keep_environment =
host_lookup =
rfc1413_hosts =
daemon_smtp_ports = 25
local_interfaces = <; 198.51.100.40 ; 2001:db8::40
tls_advertise_hosts = *
tls_certificate = {BASE}/mx.exim.test-self.crt
tls_privatekey = {BASE}/mx.exim.test-self.key
domainlist local_domains = rcpt.test
acl_smtp_rcpt = acl_rcpt
acl_smtp_dkim = acl_dkim
acl_smtp_data = acl_data
never_users = root

begin acl
acl_rcpt:
  accept domains = +local_domains
  deny message = relay not permitted
acl_dkim:
  warn log_message = DKIM-VERDICT d=$dkim_cur_signer s=$dkim_selector a=$dkim_algo \\
                     status=$dkim_verify_status reason=$dkim_verify_reason
  accept
acl_data:
  warn add_header = :at_start:${authresults {mx.exim.test}}
  accept

begin routers
local:
  driver = accept
  domains = +local_domains
  transport = store

begin transports
store:
  driver = appendfile
  directory = {BASE}/mail
  maildir_format
  user = Debian-exim
  group = Debian-exim
"""

# Exim's log of a delivery (sender side) and of a receipt (receiver side).
DELIVERED_RE = (
    r"=> (?P<rcpt>\S+) R=mailerd T=to_mailerd H=(?P<host>\S+) \[(?P<addr>[^\]]+)\]:25 "
    r"X=(?P<proto>TLS1\.[23]):(?P<cipher>\S+):(?P<bits>\d+) CV=(?P<cv>\w+) .*"
    r'C="250 2\.0\.0 Ok: queued as (?P<qid>[0-9A-Z]+)"'
)
VERDICT_RE = (
    r"(?P<id>\S+) H=.* DKIM-VERDICT d=(?P<d>\S*) s=(?P<s>\S*) a=(?P<a>\S*) status=(?P<status>\S*)"
)
USING_RE = re.compile(
    r"\(using (?P<proto>TLSv1\.[23]) with cipher (?P<cipher>\S+) \((?P<bits>\d+)/\d+ bits\)\)"
)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@dataclass
class Keys:
    exim: dict[str, Path]  # selector ("rsa", "ed") → Exim's private key
    rsa: Key  # mailerd's
    ed: Key


def exim_key(directory: Path, selector: str) -> tuple[Path, str]:
    """An Exim signing key (openssl: RSA-2048, or Ed25519) and its DNS record's text."""
    path = directory / f"dkim-{selector}.key"
    algorithm = ["-algorithm", "ed25519"] if selector == "ed" else ["-algorithm", "rsa"]
    bits = [] if selector == "ed" else ["-pkeyopt", "rsa_keygen_bits:2048"]
    subprocess.run(["openssl", "genpkey", *algorithm, *bits, "-out", path], check=True, timeout=60)
    der = subprocess.run(
        ["openssl", "pkey", "-in", path, "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    if selector == "ed":  # RFC 8463: the raw 32-byte key, not its SubjectPublicKeyInfo
        value = f"v=DKIM1; k=ed25519; p={base64.b64encode(der[-32:]).decode()}"
    else:
        value = f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    strings = " ".join(f'"{value[i : i + 200]}"' for i in range(0, len(value), 200))
    return path, f"{selector}._domainkey.{SENDER_DOMAIN}. TXT {strings}\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Keys, str]:
    require_exim()
    directory = tmp_path_factory.mktemp("dkim")
    exim, records = {}, ""
    for selector in ("rsa", "ed"):
        exim[selector], record = exim_key(directory, selector)
        records += record
    rsa = keygen(directory / "mailerd", RSA_SELECTOR, "rsa")
    ed = keygen(directory / "mailerd", ED_SELECTOR, "ed25519")
    return Keys(exim, rsa, ed), records + rsa.record + ed.record


@pytest.fixture(scope="module")
def internet(netns: Netns, tmp_path_factory, keys) -> Iterator[Internet]:
    """This module's fake Internet (overrides conftest's): Exim's addresses, and the DNS with
    ZONE and every key's record; no scripted receivers."""
    for argv in (
        ["ip", "-n", netns.name, "addr", "add", f"{EXIM_V4}/24", "dev", netns.veth_ns],
        ["ip", "-n", netns.name, "-6", "addr", "add", f"{EXIM_V6}/64", "dev", netns.veth_ns,
         "nodad"],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    base = tmp_path_factory.mktemp("internet")
    zone = base / "exim.zone"
    zone.write_text(ZONE + "$ORIGIN .\n" + keys[1])
    cert, key = make_cert(base)
    dns_server = DnsServer(netns, base, [zone])
    net = Internet(netns, base, dns_server, cert, key)
    try:
        dns_server.start()
        yield net
    finally:
        dns_server.stop()


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> certs.CA:
    return certs.make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def mta(internet: Internet, keys, ca: certs.CA, tmp_path_factory) -> Iterator[Mailerd]:
    """mailerd: port 25 on 198.51.100.1 and 2001:db8::1 with an RSA and an ECDSA certificate
    of the test CA, and mailerd's two DKIM keys for example.org."""
    names = ("mx4.example.org", "mx6.example.org")
    rsa, ecdsa = ca.issue(HOSTNAME, *names), ca.issue(HOSTNAME, *names, kind="ecdsa")
    k = keys[0]
    extra = ["-n", f"[{MAILERD_V6}]:25", "--dkim-key", k.rsa.spec, "--dkim-key", k.ed.spec]
    for pair in (rsa, ecdsa):
        extra += ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]
    m = Mailerd(internet.netns, tmp_path_factory.mktemp("mta"), untrusted=f"{NS_V4}:25",
                extra=extra, name="mta")  # fmt: skip
    check_mailerd_runs(m)
    m.start()
    yield m
    finish_or_fail(m)


@pytest.fixture(scope="module")
def exim_sender(internet: Internet, keys, ca: certs.CA) -> Iterator[tuple[EximPeer, Path]]:
    require_exim()
    peer = EximPeer(internet.netns, "sender")
    try:
        assert "GnuTLS" in peer.version() and "DKIM" in peer.version(), peer.version()
        for path in keys[0].exim.values():
            peer.copy_in(path)
        peer.copy_in(ca.cert, 0o644)  # (ca.crt)
        yield peer, peer.write("sender.conf", SENDER_CONF)
    finally:
        problems = peer.stop()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def exim_receiver(internet: Internet, tmp_path_factory) -> Iterator[EximPeer]:
    require_exim()
    peer = EximPeer(internet.netns, "receiver")
    try:
        pair = certs.self_signed(tmp_path_factory.mktemp("exim-cert"), "mx.exim.test")
        peer.copy_in(pair.cert, 0o644)
        peer.copy_in(pair.key)
        peer.start_daemon(peer.write("receiver.conf", RECEIVER_CONF))
        yield peer
    finally:
        problems = peer.stop()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def message(rcpt: str, subject: str, *extra: str, text: str = "") -> bytes:
    tag = token("exim")
    lines = [
        f"From: Carol <{SENDER}>",
        f"To: <{rcpt}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: <{tag}@{SENDER_DOMAIN}>",
        *extra,
        "",
        text or f"Hello from Exim ({tag}).\r\n  spaces   and\ttabs   \r\nA last line.",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def unfolded_fields(raw: bytes, name: str) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    fields = re.split(r"\r\n(?![ \t])", head)
    return [
        re.sub(r"\r\n[ \t]+", " ", f) for f in fields if f.lower().startswith(name.lower() + ":")
    ]


def our_results(raw: bytes) -> str:
    """mailerd's Authentication-Results (its host name first), unfolded."""
    found = [f for f in unfolded_fields(raw, "Authentication-Results") if f"{HOSTNAME};" in f]
    assert len(found) == 1, f"expected one Authentication-Results of ours: {raw[:3000]!r}"
    return found[0]


def dkim_results(results: str) -> list[tuple[str, str, str]]:
    """(result, header.d, header.s) of each dkim= in an Authentication-Results field."""
    found = re.findall(
        r"dkim=(\w+)(?: \([^)]*\))? header\.d=(\S+?) header\.s=(\S+?)[ ;]", results + " "
    )
    assert len(found) == results.count("dkim="), f"a dkim= result not understood: {results}"
    return found


def bulk_cipher(name: str) -> str:
    """AES-128-GCM, AES-256-GCM or CHACHA20-POLY1305, from OpenSSL's or GnuTLS's name."""
    found = re.search(r"AES_?(128|256)_GCM|CHACHA20_POLY1305", name.upper().replace("-", "_"))
    assert found, f"no known bulk cipher in {name!r}"
    return found.group(0).replace("AES", "AES_").replace("__", "_")


def wait_mailbox(m: Mailerd, user: str, marker: bytes, what: str) -> bytes:
    def found() -> list[bytes]:
        return [raw for raw in m.mailbox(user) if marker in raw]

    got = wait_until(found, DELIVERY_TIMEOUT)
    assert got, f"{what}: nothing with {marker!r} in mailbox {user}\n{m.log_tail()}"
    assert len(got) == 1, f"{what}: {len(got)} copies in mailbox {user}"
    return got[0]


def replay(m: Mailerd, data: bytes) -> bytes:
    """data over STARTTLS to mailerd's port 25 (from the host side of the veth, which
    exim.test's SPF does not list), for a mailbox of its own: the stored copy."""
    user = token("replay")
    rcpt = m.add_user(user)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(NS_V4, 25, local_hostname=CLIENT_HELO, timeout=30) as s:
        s.starttls(context=context)
        s.ehlo(CLIENT_HELO)
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        code, text = s.data(data)
        assert code == 250, (code, text)
        with contextlib.suppress(smtplib.SMTPException, OSError):
            s.quit()
    got = wait_until(lambda: [r for r in m.mailbox(user) if r.endswith(data)], 15)
    assert got, f"the replayed message was not stored\n{m.log_tail()}"
    return got[0]


# --------------------------------------------------------------------------------------------
# Exim → mailerd
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, selector, canon, priority",
    [
        pytest.param("v4", "rsa", "relaxed", None, id="ipv4-rsa-relaxed"),
        pytest.param("v6", "rsa", "simple", None, id="ipv6-rsa-simple"),
        pytest.param("v4", "ed", "simple", None, id="ipv4-ed25519-simple"),
        pytest.param("v6", "ed", "relaxed", None, id="ipv6-ed25519-relaxed"),
        pytest.param("v4", "rsa", "relaxed", "NORMAL:-VERS-TLS1.3", id="ipv4-tls12"),
    ],
)
def test_exim_sends_over_required_tls_and_its_signature_passes(
    mta, exim_sender, family, selector, canon, priority
):
    """Exim (hosts_require_tls, the test CA, the name checked) delivers to mailerd over IPv4 or
    IPv6; the stored Received: says ESMTPS with the protocol, bits and cipher Exim logged, and
    mailerd's Authentication-Results has spf, dkim (the one signature, by the key Exim used)
    and dmarc pass."""
    peer, conf = exim_sender
    user = token("bob")
    rcpt = mta.add_user(user)
    data = message(rcpt, f"from exim {family} {selector} {canon}")
    host = "mx4.example.org" if family == "v4" else "mx6.example.org"
    macros = {"HOST": host, "SELECTOR": selector, "CANON": canon}
    if priority:
        macros["PRIORITY"] = priority
    proc = peer.send(conf, SENDER, [rcpt], data, **macros)
    assert proc.returncode == 0, proc.stderr
    sent = [m for m in peer.lines(DELIVERED_RE) if m["rcpt"] == rcpt]
    assert len(sent) == 1, f"Exim did not deliver <{rcpt}> over TLS:\n{peer.tail()}"
    line = sent[0]
    assert line["addr"] == (NS_V4 if family == "v4" else MAILERD_V6), line.group(0)
    assert line["cv"] == "yes", f"Exim did not verify mailerd's certificate: {line.group(0)}"
    assert line["proto"] == ("TLS1.2" if priority else "TLS1.3"), line.group(0)

    marker = re.search(rb"Message-ID: <[^>]+>", data).group(0)
    raw = wait_mailbox(mta, user, marker, "Exim's message")
    assert raw.endswith(data.split(b"\r\n\r\n", 1)[1]), "the body changed on the way"
    (received,) = unfolded_fields(raw, "Received")[:1]
    client = f"[{EXIM_V4}]" if family == "v4" else f"[IPv6:{EXIM_V6}]"
    assert received.startswith(f"Received: from mx.exim.test ({client})"), received
    assert re.search(r"\bwith ESMTPS\b", received), received
    using = USING_RE.search(received)
    assert using, f"no (using … with cipher … bits) in {received}"
    assert using["proto"] == line["proto"].replace("TLS", "TLSv"), (using.group(0), line.group(0))
    assert using["bits"] == line["bits"], (using.group(0), line.group(0))
    assert bulk_cipher(using["cipher"]) == bulk_cipher(line["cipher"]), (
        using.group(0),
        line.group(0),
    )

    results = our_results(raw)
    assert f"spf=pass smtp.mailfrom={SENDER}" in results, results
    assert dkim_results(results) == [("pass", SENDER_DOMAIN, selector)], results
    assert re.search(rf"dmarc=pass \(p=reject dis=none\) header\.from={SENDER_DOMAIN}", results)
    (signature,) = unfolded_fields(raw, "DKIM-Signature")
    algorithm = "ed25519-sha256" if selector == "ed" else "rsa-sha256"
    assert f"a={algorithm};" in signature.replace(" ", ""), signature
    assert f"c={canon}/{canon};" in signature.replace(" ", ""), signature


def test_one_changed_byte_fails_exims_signatures(mta, exim_sender):
    """Exim signs with both keys (dkim_selector = rsa : ed); what it sent, replayed to mailerd
    unchanged, passes; with one byte of the body or of the Subject changed, both fail."""
    peer, conf = exim_sender
    user = token("tamper")
    rcpt = mta.add_user(user)
    data = message(rcpt, "exim signs twice")
    proc = peer.send(conf, SENDER, [rcpt], data, HOST="mx4.example.org", SELECTOR="rsa : ed",
                     CANON="relaxed")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    marker = re.search(rb"Message-ID: <[^>]+>", data).group(0)
    raw = wait_mailbox(mta, user, marker, "Exim's message")
    results = our_results(raw)
    pairs = sorted((r, s) for r, _, s in dkim_results(results))
    assert pairs == [("pass", "ed"), ("pass", "rsa")], results
    # What Exim sent: the stored copy without what mailerd put above it.
    sent = raw[raw.index(b"DKIM-Signature:") :]
    assert sent.endswith(data.split(b"\r\n\r\n", 1)[1]), sent[-300:]

    copies = {
        "unchanged": sent,
        "body": sent.replace(b"A last line.", b"A last linE."),
        "subject": sent.replace(b"Subject: exim signs", b"Subject: exim Signs"),
    }
    for what, copy in copies.items():
        assert what == "unchanged" or copy != sent, f"{what}: nothing was changed"
        results = our_results(replay(mta, copy))
        want = "pass" if what == "unchanged" else "fail"
        verdicts = sorted((r, s) for r, _, s in dkim_results(results))
        assert verdicts == [(want, "ed"), (want, "rsa")], f"{what}: {results}"
        # (from the host side of the veth SPF fails: DMARC stands or falls with DKIM)
        assert "spf=fail " in results and f"dmarc={want} " in results, f"{what}: {results}"


# --------------------------------------------------------------------------------------------
# mailerd → Exim
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eight_bit", [False, True], ids=["7bit", "8bit"])
def test_mailerd_delivers_to_exim_which_verifies_both_signatures(mta, exim_receiver, eight_bit):
    """Mail for rcpt.test leaves through mailerd's queue to Exim's daemon over STARTTLS, with
    mailerd's RSA and Ed25519 signatures: Exim's verifier says pass for each (its DKIM ACL's
    $dkim_verify_status, and its own Authentication-Results), the 8-bit body arrives as it
    was, announced with BODY=8BITMIME."""
    rcpt = f"{token('exim')}@rcpt.test"
    sender = f"alice@{LOCAL_DOMAIN}"
    extra = ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    if eight_bit:
        extra.append("Content-Transfer-Encoding: 8bit")
    text = "Grüße aus Köln — ça va? 日本語.\r\nÄÖÜ ß €" if eight_bit else "Plain ASCII.\r\nBye."
    body = ("\r\n".join([
        f"From: Alice <{sender}>", f"To: <{rcpt}>", "Subject: to exim",
        f"Date: {email.utils.formatdate()}", f"Message-ID: <{token('m')}@example.org>",
        *extra, "", text, "",
    ])).encode()  # fmt: skip
    with smtplib.SMTP(NS_V4, mta.port, local_hostname=CLIENT_HELO, timeout=30) as s:
        s.ehlo(CLIENT_HELO)
        options = ["BODY=8BITMIME"] if eight_bit else []
        assert s.mail(sender, options)[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        assert s.data(body)[0] == 250
    sent = mta.wait_delivery(rcpt, "sent", DELIVERY_TIMEOUT)
    found = re.search(r"\bid=(\S+?)\)", sent["reply"] + ")")
    assert found, f"no Exim message id in the reply: {sent['line']}"
    exim_id = found.group(1)

    received = [
        line for line in exim_receiver.mainlog().splitlines() if f"{exim_id} <= {sender}" in line
    ]
    assert len(received) == 1, f"Exim logged no receipt of {exim_id}:\n{exim_receiver.tail()}"
    assert " P=esmtps " in received[0], f"not received over TLS: {received[0]}"
    assert re.search(r" X=TLS1\.[23]:", received[0]), received[0]
    # (log_selector +8bitmime: M8S=8 when MAIL FROM said BODY=8BITMIME, 7 for BODY=7BIT)
    assert re.search(r" M8S=8 " if eight_bit else r" M8S=[07] ", received[0]), received[0]

    verdicts = {
        (m["s"], m["a"], m["status"]) for m in exim_receiver.lines(VERDICT_RE) if m["id"] == exim_id
    }
    assert verdicts == {
        (RSA_SELECTOR, "rsa-sha256", "pass"),
        (ED_SELECTOR, "ed25519-sha256", "pass"),
    }, f"Exim's DKIM verdicts: {verdicts}\n{exim_receiver.tail()}"

    maildir = exim_receiver.base / "mail" / "new"

    def stored_copies() -> list[Path]:  # (Exim's delivery process stores it after the 250)
        return [f for f in maildir.glob("*") if f"id {exim_id}".encode() in f.read_bytes()]

    stored = wait_until(stored_copies, DELIVERY_TIMEOUT) or []
    assert len(stored) == 1, f"Exim stored {len(stored)} copies of {exim_id}"
    raw = stored[0].read_bytes().replace(b"\n", b"\r\n")
    assert raw.endswith(text.encode() + b"\r\n"), raw[-200:]
    results = [f for f in unfolded_fields(raw, "Authentication-Results") if "mx.exim.test;" in f]
    assert len(results) == 1, results
    got = sorted(re.findall(r"dkim=(\w+) header\.d=example\.org .*?header\.s=(\w+)", results[0]))
    assert got == [("pass", ED_SELECTOR), ("pass", RSA_SELECTOR)], results[0]

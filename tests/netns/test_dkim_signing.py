"""DKIM signing of outbound mail (issue #15), checked by real verifiers on what a remote MX gets.

mailerd runs in the network namespace with two keys for its local domain example.org, made with
`mailerd dkim keygen --dir` (an RSA and an Ed25519 key); the records keygen prints are pasted
as they are into this module's zone, which the namespace's DNS server (198.51.100.53) serves.
Remote domains: rcpt.test and defer.test → receiver mx1, big.test → receiver mx2.

Every signature a receiver gets is verified twice, each on its own:
- by OpenDKIM (`opendkim-testmsg`, Debian's opendkim-tools), run in the namespace so that its
  resolver is the namespace's resolv.conf, i.e. the test DNS. It reads a message on stdin and
  exits 0 with nothing on stderr when the message verifies; otherwise EX_SOFTWARE (70) and a line
  such as `dkim_eom(): Bad signature`. It passes a message if ANY of its signatures verifies,
  so each signature is checked on a copy that carries only that one. Its header checks are
  strict (one From:, one Cc:, a Date: ...): messages with repeated fields are checked by dkimpy
  only.
- by dkimpy (`dkim.DKIM(msg).verify(idx=i, dnsfunc=...)`), whose dnsfunc asks the same DNS
  server over the veth (dnspython, never the machine's resolver).
`test_seven_bit_message_gets_two_signatures` also shows that both verifiers can fail: a copy
with the body or a signed header changed fails with each.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import re
import smtplib
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import dns.resolver
import pytest

from .conftest import (
    CLIENT_HELO,
    DNS_ADDR,
    HOSTNAME,
    LOCAL_DOMAIN,
    MX1,
    MX2,
    NS_V4,
    PYTHON,
    REPO,
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

RSA_SELECTOR = "rsa2026"
ED_SELECTOR = "ed2026"
SIGNED_FIELDS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
    "content-type", "in-reply-to", "references",
)  # fmt: skip
DELIVERY_TIMEOUT = 20.0
BIG_TIMEOUT = 90.0
QUIET = 1.5
FORWARD_TARGET = "forwarded@rcpt.test"

ZONE = f"""
; issue #15: the signing tests' own names (the DKIM records are appended by the fixture)
$ORIGIN peers.test.
mx1        A    {MX1}
mx2        A    {MX2}
$ORIGIN test.
rcpt       MX   10 mx1.peers.test.
defer      MX   10 mx1.peers.test.
big        MX   10 mx2.peers.test.
$ORIGIN example.org.
mx         A    {NS_V4}
"""

RULES_MX1 = [
    {
        "id": "defer-once",
        "match": "*@defer.test",
        "at": "data",
        "first": 1,
        "reply": "451 4.3.0 mx1 wants this message again later",
    }
]


# --------------------------------------------------------------------------------------------
# Keys made by `mailerd dkim keygen`, and the fake Internet that publishes them
# --------------------------------------------------------------------------------------------


@dataclass
class Key:
    selector: str
    kind: str
    path: Path
    record: str  # the zone-file text keygen printed for it

    @property
    def spec(self) -> str:
        return f"{LOCAL_DOMAIN}:{self.selector}:{self.path}"


def keygen(directory: Path, selector: str, kind: str) -> Key:
    argv = [PYTHON, "-m", "mailerd", "dkim", "keygen", "--dir", str(directory)]
    argv += ["--type", kind, "--selector", selector, LOCAL_DOMAIN]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(argv)}` did not finish in 60s", pytrace=False)
    path = directory / f"{LOCAL_DOMAIN}.{selector}.key"
    if p.returncode != 0 or not path.exists():
        pytest.fail(
            f"`mailerd dkim keygen` failed (exit {p.returncode}; {path} exists: "
            f"{path.exists()}), so there are no keys to sign with:\n--- stdout ---\n{p.stdout}"
            f"\n--- stderr ---\n{p.stderr}",
            pytrace=False,
        )
    return Key(
        selector, kind, path, record_text(p.stdout, f"{selector}._domainkey.{LOCAL_DOMAIN}.")
    )


def record_text(stdout: str, owner: str) -> str:
    """The printed record: its line, and the following ones up to the closing parenthesis."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.split()[:1] == [owner]]
    if len(starts) != 1:
        pytest.fail(f"keygen printed no (or several) {owner} lines:\n{stdout}", pytrace=False)
    out = [lines[starts[0]]]
    if "(" in out[0]:
        for line in lines[starts[0] + 1 :]:
            if ")" in out[-1]:
                break
            out.append(line)
    return "\n".join(out) + "\n"


@dataclass
class Keys:
    rsa: Key
    ed: Key


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    directory = tmp_path_factory.mktemp("dkim") / "keys"  # keygen makes it (0700)
    return Keys(
        keygen(directory, RSA_SELECTOR, "rsa"),
        keygen(directory, ED_SELECTOR, "ed25519"),
    )


@pytest.fixture(scope="module")
def internet(netns: Netns, tmp_path_factory, keys: Keys) -> Iterator[Internet]:
    """This module's fake Internet (overrides conftest's): the DNS serves ZONE and the keys'
    records; mx1 and mx2 receive."""
    base = tmp_path_factory.mktemp("internet")
    zone = base / "dkim.zone"
    zone.write_text(ZONE + "$ORIGIN .\n" + keys.rsa.record + keys.ed.record)
    cert, key = make_cert(base)
    dns_server = DnsServer(netns, base, [zone])
    net = Internet(netns, base, dns_server, cert, key)
    try:
        dns_server.start()
        net.start_receiver("mx1", f"{MX1}:25", {"hostname": "mx1.peers.test", "rules": RULES_MX1})
        net.start_receiver("mx2", f"{MX2}:25", {"hostname": "mx2.peers.test", "rules": []})
        yield net
    finally:
        for r in net.all_receivers():
            r.stop()
        dns_server.stop()


@pytest.fixture(scope="module")
def signer(internet: Internet, keys: Keys, tmp_path_factory) -> Iterator[Mailerd]:
    """mailerd with both keys; the untrusted listener on :25 with an alias `fwd` that forwards
    to a remote address."""
    base = tmp_path_factory.mktemp("signer")
    aliases = base / "aliases"
    aliases.write_text(f"fwd: {FORWARD_TARGET}\n")
    m = Mailerd(
        internet.netns,
        base,
        port=2525,
        untrusted=f"{NS_V4}:25",
        extra=["--dkim-key", keys.rsa.spec, "--dkim-key", keys.ed.spec, "--aliases", str(aliases)],
        name="signer",
    )
    check_mailerd_runs(m)
    m.start()
    yield m
    finish_or_fail(m)


# --------------------------------------------------------------------------------------------
# Messages: submitting, receiving, taking apart
# --------------------------------------------------------------------------------------------


def crlf(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


def mail(
    sender: str,
    to: list[str],
    *,
    subject: str = "dkim",
    extra: tuple[str, ...] = (),
    text: str = "",
    from_: str | None = None,
) -> bytes:
    tag = token("m")
    return crlf(
        f"From: {from_ if from_ is not None else f'Alice <{sender}>'}",
        f"To: {', '.join(f'<{r}>' for r in to)}",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: <{tag}@example.org>",
        *extra,
        "",
        text or f"Hello from the DKIM tests ({tag}).",
        "A second line.",
    )


def submit(
    m: Mailerd,
    sender: str,
    rcpts: list[str],
    body: bytes,
    *,
    options: tuple[str, ...] = (),
    host: str = NS_V4,
    port: int | None = None,
) -> str:
    """One SMTP transaction (the trusted listener unless told); the queue id of the 250."""
    with smtplib.SMTP(host, port or m.port, local_hostname=CLIENT_HELO, timeout=60) as s:
        code, text = s.ehlo(CLIENT_HELO)
        assert code == 250, (code, text)
        code, text = s.mail(sender, list(options))
        assert code == 250, f"MAIL FROM:<{sender}> {options} → {code} {text!r}"
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, f"RCPT TO:<{r}> → {code} {text!r}"
        code, text = s.data(body)
        assert code == 250, f"DATA → {code} {text!r}"
        with contextlib.suppress(smtplib.SMTPException, OSError):
            s.quit()
    found = re.search(r"queued as ([0-9A-Z]+)", text.decode("utf-8", "replace"))
    return found.group(1) if found else ""


def delivered(
    net: Internet, m: Mailerd, receiver: str, rcpt: str, timeout: float = DELIVERY_TIMEOUT
) -> bytes:
    """What `receiver` accepted for rcpt (exactly one transaction): the DATA's bytes."""
    r = net.receivers[receiver]
    got = wait_until(lambda: r.delivered(rcpt), timeout, interval=0.2)
    assert got, (
        f"<{rcpt}> never reached {receiver} within {timeout}s\n"
        f"log lines for it: {[d['line'] for d in m.deliveries(rcpt)]}\n"
        f"--- mailerd log (tail) ---\n{m.log_tail()}\n--- receivers ---\n{net.report()}"
    )
    assert len(got) == 1, f"<{rcpt}> delivered {len(got)} times"
    return got[0]["data"].encode("latin-1")


def split(message: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """(header fields as (lower-case name, raw bytes with continuation lines), body)."""
    head, sep, body = message.partition(b"\r\n\r\n")
    assert sep, f"no end of header in {message[:500]!r}"
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + b"\r\n" + line)
        else:
            fields.append((line.split(b":", 1)[0].strip().lower().decode("latin-1"), line))
    return fields, body


def join(fields: list[tuple[str, bytes]], body: bytes) -> bytes:
    return b"\r\n".join(raw for _, raw in fields) + b"\r\n\r\n" + body


def signature_fields(message: bytes) -> list[bytes]:
    return [raw for name, raw in split(message)[0] if name == "dkim-signature"]


def tags(raw_field: bytes) -> dict[str, str]:
    value = raw_field.split(b":", 1)[1].decode("ascii")
    out = {}
    for part in value.split(";"):
        if part.strip():
            k, _, v = part.partition("=")
            out[k.strip()] = re.sub(r"\s+", "", v)
    return out


def signed_names(raw_field: bytes) -> list[str]:
    return [h.strip().lower() for h in tags(raw_field)["h"].split(":")]


def as_relayed(data: bytes, original: bytes, nsigs: int = 2) -> list[bytes]:
    """data is our Received: header, then `nsigs` DKIM-Signature fields, then `original`
    unchanged; returns the signature fields."""
    assert data.endswith(original), (
        f"the relayed message must end with the submitted one, unchanged\n"
        f" sent:    {original[:300]!r}\n relayed: {data[-len(original) - 100 :][:400]!r}"
    )
    added = data[: len(data) - len(original)]
    fields, _ = split(added + b"\r\n")
    names = [name for name, _ in fields]
    assert names == ["received"] + ["dkim-signature"] * nsigs, (
        f"expected our Received: then {nsigs} DKIM-Signature field(s) above the message, "
        f"got {names}\n{added.decode('latin-1')}"
    )
    assert re.search(rb"\bby " + re.escape(HOSTNAME.encode()) + rb"\b", fields[0][1]), fields[0]
    return [raw for name, raw in fields if name == "dkim-signature"]


# --------------------------------------------------------------------------------------------
# Verifying
# --------------------------------------------------------------------------------------------


def txt_lookup(name, timeout=5):
    """dkimpy's dnsfunc: the TXT record at `name`, from the namespace's DNS server."""
    name = name.decode() if isinstance(name, bytes) else name
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [DNS_ADDR]
    resolver.lifetime = min(float(timeout), 5.0)
    try:
        answer = resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    return b"".join(next(iter(answer)).strings)


def only_signature(message: bytes, keep: int) -> bytes:
    """A copy with every DKIM-Signature field but the keep-th removed (byte-exact otherwise)."""
    fields, body = split(message)
    out, seen = [], 0
    for name, raw in fields:
        if name == "dkim-signature":
            seen += 1
            if seen - 1 != keep:
                continue
        out.append((name, raw))
    return join(out, body)


def opendkim(net: Internet, message: bytes) -> subprocess.CompletedProcess:
    """opendkim-testmsg in the namespace (its resolver: the namespace's resolv.conf)."""
    return subprocess.run(
        net.netns.cmd("opendkim-testmsg"),
        input=message,
        capture_output=True,
        timeout=120,
        env=net.netns.env(),
    )


def opendkim_verdict(net: Internet, message: bytes, idx: int) -> tuple[bool, str]:
    p = opendkim(net, only_signature(message, idx))
    text = p.stderr.decode("utf-8", "replace").strip()
    return p.returncode == 0 and not text, f"exit {p.returncode}: {text}"


def dkimpy_verdict(message: bytes, idx: int) -> bool:
    """dkimpy's verdict on signature idx (it raises on some failures, as dkim.verify hides)."""
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=txt_lookup))
    except dkim.DKIMException:
        return False


def check_signatures(net: Internet, message: bytes, *, opendkim_too: bool = True) -> None:
    """Two signatures, RSA and Ed25519 by example.org's two keys, each verifying with dkimpy and
    (unless told) with OpenDKIM, each on its own; c=relaxed/relaxed, no l=."""
    sigs = signature_fields(message)
    got = sorted((tags(s)["a"], tags(s)["s"]) for s in sigs)
    assert got == [("ed25519-sha256", ED_SELECTOR), ("rsa-sha256", RSA_SELECTOR)], (
        f"expected an RSA and an Ed25519 signature, got {got}"
    )
    for i, raw in enumerate(sigs):
        t = tags(raw)
        assert t.get("v") == "1", t
        assert t["d"] == LOCAL_DOMAIN, f"d= must be the key's domain: {t}"
        assert t.get("c") == "relaxed/relaxed", f"c= must be relaxed/relaxed: {t}"
        assert "l" not in t, f"no l= tag (anything could be appended): {t}"
        assert dkimpy_verdict(message, i), f"dkimpy: signature {t['s']} does not verify"
        if opendkim_too:
            ok, why = opendkim_verdict(net, message, i)
            assert ok, f"opendkim-testmsg: signature {t['s']} does not verify ({why})"


def check_h(raw_field: bytes, message: bytes) -> None:
    """h= names each present SIGNED_FIELDS field, once per occurrence, and From once more."""
    fields, _ = split(message)
    present = [n for n, _ in fields if n in SIGNED_FIELDS]
    want = Counter(present) + Counter(["from"])
    got = Counter(signed_names(raw_field))
    assert got == want, (
        f"h= {signed_names(raw_field)}; expected (any order) {sorted(want.elements())}"
    )


# --------------------------------------------------------------------------------------------
# Signed
# --------------------------------------------------------------------------------------------


def test_seven_bit_message_gets_two_signatures(internet: Internet, signer: Mailerd):
    """What mx1 gets: our Received:, two DKIM-Signature fields, the message unchanged; both
    signatures verify with OpenDKIM and dkimpy — and a tampered copy fails with both."""
    rcpt = f"{token('seven')}@rcpt.test"
    body = mail("alice@example.org", [rcpt])
    submit(signer, "alice@example.org", [rcpt], body)
    data = delivered(internet, signer, "mx1", rcpt)
    sigs = as_relayed(data, body)
    check_signatures(internet, data)
    for raw in sigs:
        check_h(raw, body)
    # Each verifier can fail: the body changed, or a signed header changed.
    tampered = {
        "body": data.replace(b"A second line.", b"A second lime."),
        "subject": data.replace(b"Subject: dkim", b"Subject: DKIM!"),
    }
    for what, copy in tampered.items():
        assert copy != data
        for i in range(len(sigs)):
            ok, why = opendkim_verdict(internet, copy, i)
            assert not ok and "Bad signature" in why, f"opendkim passed a changed {what}: {why}"
            assert not dkimpy_verdict(copy, i), f"dkimpy passed a changed {what}"


def test_eight_bit_body(internet: Internet, signer: Mailerd):
    """BODY=8BITMIME with UTF-8 text: relayed as 8BITMIME, byte for byte, both signatures good."""
    rcpt = f"{token('eight')}@rcpt.test"
    body = mail(
        "alice@example.org",
        [rcpt],
        extra=(
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ),
        text="Grüße aus Köln — ça va? 日本語のテキスト.\r\nZweite Zeile: ÄÖÜ ß €",
    )
    submit(signer, "alice@example.org", [rcpt], body, options=("BODY=8BITMIME",))
    data = delivered(internet, signer, "mx1", rcpt)
    as_relayed(data, body)
    check_signatures(internet, data)
    (t,) = internet.receivers["mx1"].delivered(rcpt)
    assert "BODY=8BITMIME" in [o.upper() for o in t["mail_options"]], t["mail_options"]


def test_ten_megabyte_message(internet: Internet, signer: Mailerd):
    rcpt = f"{token('big')}@big.test"
    line = "0123456789abcdefghijklmnopqrstuvwxyz" * 2  # 72 characters
    lines = [f"{n:08d} {line}" for n in range(10 * 1024 * 1024 // 83)]
    body = mail("alice@example.org", [rcpt], text="\r\n".join(lines))
    assert len(body) > 10 * 1000 * 1000
    submit(signer, "alice@example.org", [rcpt], body)
    data = delivered(internet, signer, "mx2", rcpt, timeout=BIG_TIMEOUT)
    as_relayed(data, body)
    check_signatures(internet, data)


def test_long_folded_header_fields(internet: Internet, signer: Mailerd):
    """Folded Subject with odd spacing, a long folded To: and References: (relaxed header
    canonicalization), several To and Cc addresses, one transaction for all recipients."""
    to = [f"{token('to')}@rcpt.test" for _ in range(12)]
    cc = [f"{token('cc')}@rcpt.test" for _ in range(3)]
    refs = " ".join(f"<{token('ref')}.{n}@lists.example.net>" for n in range(30))
    folded_refs = re.sub(r"(.{1,70})(?: |$)", "\\1\r\n\t", refs).rstrip("\r\n\t")
    body = crlf(
        "From: Alice Example <alice@example.org>",
        "To: " + ",\r\n   ".join(f'"Person {n}" <{a}>' for n, a in enumerate(to)),
        f"Cc: {cc[0]},\r\n\t{cc[1]}, {cc[2]}",
        "Subject: a subject that is long enough to be folded\r\n\t   over three lines,"
        "   with    odd\r\n   spacing\t inside",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: <{token('fold')}@example.org>",
        f"In-Reply-To: <{token('ref')}@lists.example.net>",
        f"References: {folded_refs}",
        "",
        "Body after long headers.",
    )
    submit(signer, "alice@example.org", to + cc, body)
    data = delivered(internet, signer, "mx1", to[0])
    t = internet.receivers["mx1"].delivered(to[0])[0]
    assert sorted(t["rcpt_tos"]) == sorted(to + cc), "one transaction for all the recipients"
    sigs = as_relayed(data, body)
    check_signatures(internet, data)
    for raw in sigs:
        check_h(raw, body)


def test_from_in_a_subdomain_uses_the_parent_key(internet: Internet, signer: Mailerd):
    rcpt = f"{token('sub')}@rcpt.test"
    body = mail("bob@lists.sub.example.org", [rcpt])
    submit(signer, "bob@lists.sub.example.org", [rcpt], body)
    data = delivered(internet, signer, "mx1", rcpt)
    sigs = as_relayed(data, body)
    assert {tags(s)["d"] for s in sigs} == {LOCAL_DOMAIN}, [tags(s) for s in sigs]
    check_signatures(internet, data)


def test_signed_header_fields_and_over_signed_from(internet: Internet, signer: Mailerd):
    """h= has each present field of the list (and none other) plus From once more; a From:
    added anywhere then breaks the signature, while an added unsigned field does not."""
    rcpt = f"{token('hdr')}@rcpt.test"
    body = mail(
        "alice@example.org",
        [rcpt],
        extra=(
            f"Cc: <{token('cc')}@rcpt.test>",
            "Reply-To: <replies@example.org>",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
            "Content-Transfer-Encoding: 7bit",
            f"In-Reply-To: <{token('p')}@example.net>",
            f"References: <{token('p')}@example.net>",
            "X-Mailer: test-suite 1.0",
            "Keywords: dkim, signing",
        ),
    )
    submit(signer, "alice@example.org", [rcpt], body)
    data = delivered(internet, signer, "mx1", rcpt)
    sigs = as_relayed(data, body)
    check_signatures(internet, data)
    for raw in sigs:
        check_h(raw, body)
        names = signed_names(raw)
        assert names.count("from") == 2, f"From must be over-signed: h={names}"
        for unlisted in ("x-mailer", "keywords", "content-transfer-encoding", "received"):
            assert unlisted not in names, f"{unlisted} is not to be signed: h={names}"
    fields, rest = split(data)
    first_from = next(i for i, (n, _) in enumerate(fields) if n == "from")
    evil = ("from", b"From: Mallory <mallory@evil.test>")
    copies = {
        "From added above": join(fields[:first_from] + [evil] + fields[first_from:], rest),
        "From added below": join([*fields, evil], rest),
    }
    for i in range(len(sigs)):
        for what, copy in copies.items():
            assert not dkimpy_verdict(copy, i), f"{what}: signature {i} still verifies"
        harmless = join([*fields, ("x-added", b"X-Added: not signed")], rest)
        assert dkimpy_verdict(harmless, i), "an added unsigned field must not break it"


def test_every_occurrence_is_signed(internet: Internet, signer: Mailerd):
    """Two Cc: fields (a sloppy script's): h= lists cc twice. (OpenDKIM's strict header check
    refuses such a message whatever its signature, so dkimpy alone verifies here.)"""
    rcpt = f"{token('twice')}@rcpt.test"
    body = mail(
        "alice@example.org",
        [rcpt],
        extra=(f"Cc: <{token('a')}@rcpt.test>", f"Cc: <{token('b')}@rcpt.test>"),
    )
    submit(signer, "alice@example.org", [rcpt], body)
    data = delivered(internet, signer, "mx1", rcpt)
    sigs = as_relayed(data, body)
    check_signatures(internet, data, opendkim_too=False)
    for raw in sigs:
        check_h(raw, body)
        assert signed_names(raw).count("cc") == 2, signed_names(raw)


def test_missing_date_and_message_id_are_added_and_signed(internet: Internet, signer: Mailerd):
    """A trusted client's message without Date: and Message-ID: gets both before signing, and
    both are covered (OpenDKIM would refuse a message without Date: anyway)."""
    rcpt = f"{token('nodate')}@rcpt.test"
    body = crlf("From: <alice@example.org>", f"To: <{rcpt}>", "Subject: no date", "", "Hi.")
    submit(signer, "alice@example.org", [rcpt], body)
    data = delivered(internet, signer, "mx1", rcpt)
    fields, rest = split(data)
    names = [n for n, _ in fields]
    assert names.count("date") == 1 and names.count("message-id") == 1, names
    assert rest == b"Hi.\r\n", rest
    check_signatures(internet, data)
    for raw in signature_fields(data):
        assert {"date", "message-id"} <= set(signed_names(raw)), signed_names(raw)


def test_a_missing_from_is_the_sender_and_signed(internet: Internet, signer: Mailerd):
    """A script's message without From: (the README's curl example to a remote address) left
    without one, and unsigned, since DKIM signs for the From: domain: Gmail refuses such mail
    (a helper's pass with mail programs). It gets the envelope sender, as Postfix's cleanup
    adds it for local clients, and is signed."""
    rcpt = f"{token('nofrom')}@rcpt.test"
    body = crlf(f"To: <{rcpt}>", "Subject: no from", "", "Hi.")
    submit(signer, "alice@example.org", [rcpt], body)
    data = delivered(internet, signer, "mx1", rcpt)
    fields, rest = split(data)
    assert [raw for n, raw in fields if n == "from"] == [b"From: alice@example.org"], fields
    assert rest == b"Hi.\r\n", rest
    check_signatures(internet, data)
    for raw in signature_fields(data):
        assert "from" in signed_names(raw), signed_names(raw)


def test_a_local_programs_bare_addresses_are_qualified_and_signed(
    internet: Internet, signer: Mailerd
):
    """A script's smtplib.sendmail("root", [rcpt], "From: root\\r\\nCc: admin (Ops)...") on the
    local listener: the envelope sender and the header's bare addresses get the first local
    domain on the copy that leaves, as sendmail's and Postfix's cleanup's (Gmail refuses a
    From: without a domain, and without one there is nothing to sign for); addresses that
    have one, and the rest of the message, stay as written. The local copy is not changed."""
    rcpt = f"{token('bare')}@rcpt.test"
    body = crlf("From: root", f"To: <{rcpt}>", "Cc: admin (Ops), <x@rcpt.test>",
                "Subject: bare", "", "From: body text stays")  # fmt: skip
    submit(signer, "root", [rcpt, "postmaster"], body)
    data = delivered(internet, signer, "mx1", rcpt)
    fields, rest = split(data)
    by_name = {n: raw for n, raw in fields}
    assert by_name["from"] == b"From: root@example.org", fields
    assert by_name["cc"] == b"Cc: admin@example.org (Ops), <x@rcpt.test>", fields
    assert by_name["to"] == f"To: <{rcpt}>".encode() and rest == b"From: body text stays\r\n"
    check_signatures(internet, data)
    box = signer.spool / "postmaster"

    def local_copy() -> bool:  # (the mailbox may hold other tests' mail: this message's copy)
        found = box.glob("[0-9]*") if box.is_dir() else []
        return any(f.read_bytes().endswith(body) for f in found if f.name.isdigit())

    assert wait_until(local_copy, timeout=10), "the local copy must be stored as received"


def test_sendmail_maildrop_mail_is_signed(internet: Internet, signer: Mailerd, tmp_path: Path):
    """`mailerd sendmail` (the maildrop, then the pickup) with LF line ends and no Date: or
    Message-ID: (sendmail adds them): signed like SMTP submissions."""
    rcpt = f"{token('drop')}@rcpt.test"
    conf = tmp_path / "sendmail.conf"
    conf.write_text(
        f"[mailerd]\nqueue = {signer.queue}\ndomain = {LOCAL_DOMAIN}\nhostname = {HOSTNAME}\n"
    )
    text = f"From: Alice <alice@example.org>\nTo: <{rcpt}>\nSubject: via sendmail\n\nHello.\n"
    argv = [PYTHON, "-m", "mailerd", "sendmail", "-C", str(conf), "-i"]
    argv += ["-f", "alice@example.org", rcpt]
    p = subprocess.run(
        internet.netns.cmd(*argv),
        input=text.encode(),
        capture_output=True,
        timeout=60,
        cwd=REPO,
        env=internet.netns.env(),
    )
    assert p.returncode == 0, f"sendmail: exit {p.returncode}: {p.stderr!r}"
    data = delivered(internet, signer, "mx1", rcpt)
    check_signatures(internet, data)
    for raw in signature_fields(data):
        assert {"from", "to", "subject", "date", "message-id"} <= set(signed_names(raw)), raw


def test_signed_once_across_a_retry(internet: Internet, signer: Mailerd):
    """mx1 answers the first DATA with 451; the retry delivers. The queued file carries the
    signatures from the start, and both attempts sent exactly those bytes: signed when queued,
    never per attempt."""
    rcpt = f"{token('again')}@defer.test"
    body = mail("alice@example.org", [rcpt])
    queue_id = submit(signer, "alice@example.org", [rcpt], body)
    assert queue_id, "no queue id in the 250 reply"
    path = signer.msg_path(queue_id)
    queued = path.read_bytes() if path.exists() else b""
    assert queued, f"{path} is gone already (the first attempt must be deferred)"
    queued_sigs = signature_fields(queued)
    assert len(queued_sigs) == 2, f"the queued file must carry both signatures:\n{queued[:3000]!r}"
    signer.wait_delivery(rcpt, "deferred")
    data = delivered(internet, signer, "mx1", rcpt)
    signer.wait_delivery(rcpt, "sent")
    attempts = [
        t for t in internet.receivers["mx1"].transactions() if rcpt in map(str.lower, t["rcpt_tos"])
    ]
    assert [t["accepted"] for t in attempts] == [False, True], [t["reply"] for t in attempts]
    for t in attempts:
        sent = signature_fields(t["data"].encode("latin-1"))
        assert sent == queued_sigs, (
            "an attempt sent other signatures than the queued ones:\n"
            f"queued: {queued_sigs}\nsent:   {sent}"
        )
    as_relayed(data, body)
    check_signatures(internet, data)


# --------------------------------------------------------------------------------------------
# Not signed
# --------------------------------------------------------------------------------------------


def test_local_copy_is_not_signed(internet: Internet, signer: Mailerd):
    user = token("alice")
    local = signer.add_user(user)
    rcpt = f"{token('both')}@rcpt.test"
    body = mail("alice@example.org", [local, rcpt])
    submit(signer, "alice@example.org", [local, rcpt], body)
    data = delivered(internet, signer, "mx1", rcpt)
    check_signatures(internet, data)
    got = wait_until(lambda: signer.mailbox(user), DELIVERY_TIMEOUT)
    assert got and len(got) == 1, f"mailbox {user}: {len(got or [])} messages\n{signer.log_tail()}"
    names = [n for n, _ in split(got[0])[0]]
    assert "dkim-signature" not in names, f"the local copy was signed: {names}"
    assert got[0].endswith(body), got[0][:1000]


def test_mail_from_the_untrusted_listener_is_not_signed(internet: Internet, signer: Mailerd):
    """Mail from outside for the alias `fwd`, forwarded to a remote address: it is not ours to
    sign, even with a From: in our domain."""
    body = mail("alice@example.org", [f"fwd@{LOCAL_DOMAIN}"], subject="from outside")
    before = len(internet.receivers["mx1"].delivered(FORWARD_TARGET))
    submit(signer, "friend@client.test", [f"fwd@{LOCAL_DOMAIN}"], body, port=25)
    r = internet.receivers["mx1"]
    got = wait_until(lambda: len(r.delivered(FORWARD_TARGET)) > before, DELIVERY_TIMEOUT)
    assert got, f"the forwarded copy never reached mx1\n{signer.log_tail()}\n{internet.report()}"
    data = r.delivered(FORWARD_TARGET)[-1]["data"].encode("latin-1")
    assert data.endswith(body), data[:2000]
    assert signature_fields(data) == [], "mail from the untrusted listener was signed"


@pytest.mark.parametrize(
    "from_",
    [
        pytest.param("Carol <carol@unkeyed.test>", id="domain-without-key"),
        # two domains: receivers check DMARC for each, and one key cannot align with both
        pytest.param("alice@example.org, carol@unkeyed.test", id="two-domains"),
    ],
)
def test_not_signed_without_one_keyed_from(internet: Internet, signer: Mailerd, from_):
    """No signature when the From: has no domain with a key, or several domains (a From: of
    several addresses in one keyed domain is signed: test_signing.py; a missing From: is the
    envelope sender's: test_a_missing_from_is_the_sender_and_signed)."""
    rcpt = f"{token('nokey')}@rcpt.test"
    body = mail("alice@example.org", [rcpt], from_=from_)
    submit(signer, "alice@example.org", [rcpt], body)
    data = delivered(internet, signer, "mx1", rcpt)
    as_relayed(data, body, nsigs=0)


def test_receivers_saw_no_duplicate(internet: Internet, signer: Mailerd):
    """After the module: every accepted transaction at mx1 is for distinct recipients (no
    message was delivered twice, e.g. by a signing step that requeued it)."""
    time.sleep(QUIET)
    seen = Counter(
        (json.dumps(sorted(t["rcpt_tos"])), t["data"][-200:])
        for t in internet.receivers["mx1"].delivered()
    )
    dupes = [k for k, n in seen.items() if n > 1]
    assert not dupes, f"delivered more than once: {dupes}"

"""Helpers for the inbound-verification tests (test_inbound_auth.py): DNS zone lines, keys made
by openssl, DKIM signatures made by real signers (OpenDKIM, dkimpy), the RFC 8463 example, and
a reader for the Authentication-Results field (RFC 8601) mailerd stores.

Signers:
- `opendkim_sign`: Debian's OpenDKIM filter in test mode (`opendkim -b s ... -t FILE`), which
  prints the DKIM-Signature field it would add. It signs rsa-sha256 or ed25519-sha256.
- `opendkim_testmsg_sign`: `opendkim-testmsg -C`, OpenDKIM's library driven directly. It always
  signs rsa-sha1 (a=rsa-sha1; c=relaxed/simple), which RFC 8301 forbids verifiers to accept:
  the tests use it for exactly that.
- `dkimpy_sign`: dkimpy, the library Debian ships as python3-dkim.

`check_signatures` verifies a message with dkimpy against the zone's keys before a test sends
it, so that a broken fixture is reported as such and never blamed on mailerd.
"""

from __future__ import annotations

import base64
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import authres
import dkim

from .conftest import CRLF

SUBPROCESS_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------
# Zone text
# --------------------------------------------------------------------------------------------


def txt(name: str, value: str) -> str:
    """One TXT record line for dnsserver's zone text; values longer than 255 octets are split
    into several character-strings (as DKIM keys must be), which a client joins again."""
    if not name.endswith("."):
        name += "."
    chunks = [value[i : i + 250] for i in range(0, len(value), 250)] or [""]
    quoted = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
    return f"{name} TXT {quoted}\n"


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    path: Path  # PEM (PKCS#8) private key, mode 0600
    kind: str  # "rsa" or "ed25519"
    public: str  # base64 of the DNS record's p=: SubjectPublicKeyInfo (RSA), raw key (Ed25519)

    @property
    def algorithm(self) -> str:
        return "rsa-sha256" if self.kind == "rsa" else "ed25519-sha256"

    def record(self) -> str:
        return f"v=DKIM1; k={self.kind}; p={self.public}"

    def zone(self, selector: str, domain: str) -> str:
        return txt(f"{selector}._domainkey.{domain}", self.record())


def _run(argv: list[str], data: bytes | None = None) -> bytes:
    done = subprocess.run(argv, input=data, capture_output=True, timeout=SUBPROCESS_TIMEOUT)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}: {done.stderr!r}"
    return done.stdout


def make_key(path: Path, kind: str) -> Key:
    """A new private key from `openssl genpkey` (RSA 2048 bits, or Ed25519)."""
    if kind == "rsa":
        _run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
              "-out", str(path)])  # fmt: skip
    else:
        _run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)])
    path.chmod(0o600)
    der = _run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"])
    # RFC 8463 3: an Ed25519 p= is the bare 32-octet key, the end of the SPKI structure.
    public = base64.b64encode(der if kind == "rsa" else der[-32:]).decode()
    return Key(path, kind, public)


# --------------------------------------------------------------------------------------------
# Signers
# --------------------------------------------------------------------------------------------


def _crlf_field(text: bytes) -> bytes:
    """A header field printed with LF or CRLF line ends, as CRLF lines."""
    lines = [line.rstrip(b"\r") for line in text.split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    return b"".join(line + CRLF for line in lines)


def opendkim_sign(
    message: bytes,
    domain: str,
    selector: str,
    key: Key,
    workdir: Path,
    *,
    canon: str = "relaxed/relaxed",
) -> bytes:
    """`message` with the DKIM-Signature OpenDKIM makes for it (rsa-sha256 or
    ed25519-sha256, as the key is) prepended: d=`domain`, s=`selector`, whatever the From
    domain (a KeyTable and a SigningTable that matches every author)."""
    work = Path(tempfile.mkdtemp(prefix="opendkim-", dir=workdir))
    (work / "keytable").write_text(f"k {domain}:{selector}:{key.path}\n")
    (work / "signingtable").write_text("* k\n")
    msgfile = work / "message.eml"
    msgfile.write_bytes(message)
    conf = (
        "Syslog no\n"
        "RequireSafeKeys no\n"  # (pytest's tmp dirs are under /tmp)
        f"KeyTable file:{work / 'keytable'}\n"
        f"SigningTable refile:{work / 'signingtable'}\n"
        f"SignatureAlgorithm {key.algorithm}\n"
        f"Canonicalization {canon}\n"
    )
    out = _run(["opendkim", "-x", "/dev/stdin", "-b", "s", "-t", str(msgfile)], conf.encode())
    # Output: "opendkim: FILE:" on a line of its own, then the field to add.
    first, _, sig = out.partition(b"\n")
    assert first.startswith(b"opendkim: ") and sig.startswith(b"DKIM-Signature:"), out
    signature = _crlf_field(sig)
    for tag in (f"a={key.algorithm};", f"d={domain};", f"s={selector};", f"c={canon};"):
        assert tag.encode() in re.sub(rb"\s+", b"", signature), (tag, signature)
    return signature + message


def opendkim_testmsg_sign(message: bytes, domain: str, selector: str, key: Key) -> bytes:
    """`opendkim-testmsg -C`: the signed message (OpenDKIM's library; always rsa-sha1)."""
    out = _run(
        ["opendkim-testmsg", "-d", domain, "-s", selector, "-k", str(key.path), "-C"], message
    )
    assert out.startswith(b"DKIM-Signature:") and out.endswith(message), out[:400]
    return _crlf_field(out[: -len(message)]) + message


def dkimpy_sign(
    message: bytes, domain: str, selector: str, key: Key, *, canon: bytes = b"relaxed/relaxed"
) -> bytes:
    header_c, body_c = canon.split(b"/")
    if key.kind == "rsa":
        private = key.path.read_bytes()
    else:  # dkimpy wants the base64 of the 32-octet seed, the end of the PKCS#8 DER
        der = _run(["openssl", "pkey", "-in", str(key.path), "-outform", "DER"])
        private = base64.b64encode(der[-32:])
    sig = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        private,
        canonicalize=(header_c, body_c),
        signature_algorithm=key.algorithm.encode(),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return _crlf_field(sig) + message


def check_signatures(message: bytes, records: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of `message` (top first), the keys taken from
    `records` (name → TXT text) instead of the DNS."""

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        text = records.get(name.decode().rstrip(".").lower())
        return text.encode() if text is not None else None

    count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n", 1)[0]))
    verdicts = []
    for i in range(count):
        try:
            verdicts.append(bool(dkim.DKIM(message).verify(idx=i, dnsfunc=lookup)))
        except dkim.DKIMException:  # a body hash mismatch, for one
            verdicts.append(False)
    return verdicts


def b_prefix(signed: bytes, index: int = 0) -> str:
    """The first 8 characters of the b= tag of the `index`th DKIM-Signature (RFC 8601's
    header.b, RFC 6008)."""
    fields = re.findall(
        rb"(?ims)^dkim-signature:(.*?)\r\n(?![ \t])", signed.split(b"\r\n\r\n", 1)[0] + CRLF
    )
    value = re.sub(rb"\s+", b"", fields[index]).decode()
    b = re.search(r"(?:^|;)b=([^;]*)", value)
    assert b, value
    return b.group(1)[:8]


# --------------------------------------------------------------------------------------------
# RFC 8463, appendix A: the Ed25519 example (with its RSA companion signature and both keys)
# --------------------------------------------------------------------------------------------

RFC8463_KEYS = {
    "brisbane._domainkey.football.example.com": (
        "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    ),
    "test._domainkey.football.example.com": (
        "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08"
        "a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvq"
        "MKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB"
    ),
}

RFC8463_MESSAGE = b"\r\n".join(
    [
        b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;",
        b" d=football.example.com; i=@football.example.com;",
        b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :",
        b" subject : date : message-id : from : subject : date;",
        b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
        b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus",
        b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==",
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;",
        b" d=football.example.com; i=@football.example.com;",
        b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :",
        b" date : message-id : from : subject : date;",
        b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
        b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3",
        b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz",
        b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=",
        b"From: Joe SixPack <joe@football.example.com>",
        b"To: Suzie Q <suzie@shopping.example.net>",
        b"Subject: Is dinner ready?",
        b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
        b"Message-ID: <20030712040037.46341.5F8J@football.example.com>",
        b"",
        b"Hi.",
        b"",
        b"We lost the game.  Are you hungry yet?",
        b"",
        b"Joe.",
        b"",
    ]
)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def message(
    token: str,
    *,
    author: str = "Alice <alice@example.com>",
    to: str = "rcpt@example.org",
    extra_headers: bytes = b"",
    body: bytes | None = None,
) -> bytes:
    """A small RFC 5322 message with CRLF line ends; `token` makes it unique."""
    head = (
        f"From: {author}\r\n"
        f"To: {to}\r\n"
        f"Subject: inbound auth {token}\r\n"
        "Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{token}@example.com>\r\n"
    ).encode() + extra_headers
    if body is None:
        body = f"Hello, this is {token}.\r\n".encode()
    return head + b"\r\n" + body


# --------------------------------------------------------------------------------------------
# Authentication-Results (RFC 8601)
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    method: str  # lower-case
    result: str  # lower-case
    props: dict[str, str] = field(default_factory=dict)  # "smtp.mailfrom" → value (unquoted)
    comments: list[str] = field(default_factory=list)  # the texts inside ( ), in order
    text: str = ""  # the resinfo as written (unfolded)

    def __str__(self) -> str:
        return self.text


@dataclass
class AuthResults:
    authserv_id: str
    results: list[Result]
    raw: bytes  # the field as stored: name, value, folding and the final CRLF
    value: str  # unfolded value

    def of(self, method: str) -> list[Result]:
        return [r for r in self.results if r.method == method]

    def one(self, method: str) -> Result:
        found = self.of(method)
        assert len(found) == 1, f"expected one {method}= result, got {len(found)}: {self.value}"
        return found[0]

    def __str__(self) -> str:
        return self.value


def _segments(value: str) -> list[tuple[str, list[str]]]:
    """Split at top-level semicolons; each part without its comments, and the comments."""
    parts: list[tuple[str, list[str]]] = []
    text, comments, current = "", [], ""
    depth, i, quoted = 0, 0, False
    while i < len(value):
        ch = value[i]
        if ch == "\\" and (quoted or depth):  # a quoted-pair: keep both characters
            if depth:
                current += value[i : i + 2]
            else:
                text += value[i : i + 2]
            i += 2
            continue
        if depth:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    comments.append(current.strip())
                    current = ""
                    text += " "
                    i += 1
                    continue
            current += ch
        elif quoted:
            text += ch
            if ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            text += ch
        elif ch == "(":
            depth = 1
        elif ch == ";":
            parts.append((text, comments))
            text, comments = "", []
        else:
            text += ch
        i += 1
    assert depth == 0 and not quoted, f"unbalanced comment or quote in {value!r}"
    parts.append((text, comments))
    return parts


_PAIR = re.compile(r'([A-Za-z0-9_.\-/]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s";]+)')


def _unquote(v: str) -> str:
    if v.startswith('"') and v.endswith('"'):
        return re.sub(r"\\(.)", r"\1", v[1:-1])
    return v


def parse_auth_results(value: str) -> AuthResults:
    """Read an unfolded Authentication-Results value (RFC 8601 2.2), keeping comments."""
    segments = _segments(value)
    head = segments[0][0].split()
    assert head, f"no authserv-id in {value!r}"
    results: list[Result] = []
    rest = segments[1:]
    if len(rest) == 1 and rest[0][0].strip().lower() == "none":
        rest = []
    for text, comments in rest:
        pairs = _PAIR.findall(text)
        assert pairs, f"not a resinfo: {text!r} in {value!r}"
        method, result = pairs[0]
        r = Result(method.split("/")[0].lower(), _unquote(result).lower(), comments=comments)
        for name, v in pairs[1:]:
            r.props[name.lower()] = _unquote(v)
        r.text = text.strip() + "".join(f" ({c})" for c in comments)
        results.append(r)
    return AuthResults(head[0], results, b"", value)


def _field_end(raw: bytes, pos: int) -> int:
    """Where the header field starting at `pos` ends (after its last CRLF, folding included)."""
    end = raw.index(CRLF, pos) + 2
    while raw[end : end + 1] in (b" ", b"\t"):
        end = raw.index(CRLF, end) + 2
    return end


@dataclass
class Trace:
    """A stored message cut into mailerd's own fields and what follows them (read here, not
    with conftest.parse_stored, so that nothing mailerd adds is skipped unseen)."""

    return_path: bytes  # the line, without CRLF
    received: bytes  # the field as stored, folding and final CRLF included
    rest: bytes  # everything after the Received field


def split_trace(raw: bytes) -> Trace:
    assert raw.startswith(b"Return-Path: "), f"must start with Return-Path: {raw[:200]!r}"
    rp_end = raw.index(CRLF)
    assert raw.startswith(b"Received: ", rp_end + 2), f"then Received: {raw[:300]!r}"
    end = _field_end(raw, rp_end + 2)
    return Trace(raw[:rp_end], raw[rp_end + 2 : end], raw[end:])


@dataclass
class AuthStored:
    trace: Trace
    auth: AuthResults
    after: bytes  # what follows the Authentication-Results field: the message as received


def split_stored(raw: bytes) -> AuthStored:
    """A stored message that must be: Return-Path, Received, then ONE Authentication-Results
    field (possibly folded), then the message."""
    trace = split_trace(raw)
    rest = trace.rest
    assert rest.startswith(b"Authentication-Results:"), (
        "the third header must be Authentication-Results:\n" + raw[:600].decode("utf-8", "replace")
    )
    end = _field_end(rest, 0)
    field_bytes = rest[:end]
    for line in field_bytes.split(CRLF)[:-1]:
        assert len(line) <= 998, f"line too long ({len(line)}) in {field_bytes!r}"
        assert b"\r" not in line and b"\n" not in line, field_bytes
        assert line.strip(), f"an empty continuation line in {field_bytes!r}"
    value = field_bytes[len(b"Authentication-Results:") :].decode("ascii")
    unfolded = re.sub(r"\r\n(?=[ \t])", "", value).strip()
    auth = parse_auth_results(unfolded)
    auth.raw = field_bytes
    # And an independent reader of the syntax: authres (Debian python3-authres) must agree.
    other = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + unfolded)
    assert other.authserv_id == auth.authserv_id, (other.authserv_id, unfolded)
    assert [(r.method, r.result) for r in other.results] == [
        (r.method, r.result) for r in auth.results
    ], f"authres reads {unfolded!r} differently"
    return AuthStored(trace, auth, rest[end:])

"""DKIM (RFC 6376; Ed25519 by RFC 8463): does each signature of a message verify?

dkimpy (Debian python3-dkim; Ed25519 through PyNaCl) verifies; it runs in a thread (hashing a
big body takes a while, and it asks DNS synchronously), and its key lookups go through the
worker's resolver (`lookups.Bridge`). dkimpy says only True or False; what our DNS function saw
tells a missing key (permerror) and an unanswered lookup (temperror) from a signature that does
not verify (fail), and its exceptions a changed body or an expired signature (fail) from a
signature it cannot read (neutral). A signature made with rsa-sha1 is not taken (RFC 8301:
verifiers must not consider it valid): `policy`, as is one whose l= leaves part of the body
unsigned. Results are RFC 8601's: pass, fail, neutral,
policy, permerror, temperror; `none` when there is no signature at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import dkim
import dkim.canonicalization
from dkim.util import InvalidTagValueList

from mailerd.dkim_speedups import (  # (its import speeds dkimpy up)
    KEY_RECORD_REMEMBERED,
    body_memo,
    parse_tag_value,
)
from mailerd.inbound.lookups import Bridge, NotCached, TemporaryFailure
from mailerd.remembered import Remembered

MAX_SIGNATURES = 10  # checked per message; more are a denial of service, not authentication
# Names a signature's h= may list to be checked (a signer over-signs a few dozen at most): each
# costs a header field's canonicalisation and hash, which a message of small fields and a list
# of thousands would make a second of CPU (an attacker's pass).
MAX_SIGNED_FIELDS = 256
# dkimpy's ValidationErrors that mean "did not verify" (RFC 8601 fail), not "cannot be read".
_FAILURES = ("body hash mismatch", "x= value is past", "t= value is in the future")


@dataclass(frozen=True)
class DkimResult:
    result: str
    domain: str = ""  # d=
    selector: str = ""  # s=
    b: str = ""  # the first characters of b= (RFC 6008), to tell signatures apart
    reason: str = ""


@dataclass
class _Seen:
    """What the DNS function met while one signature was verified."""

    temporary: str = ""
    missing: bool = False
    record: bytes = b""
    names: list[str] = field(default_factory=list)


def present(message: bytes, header_end: int) -> bool:
    """Whether the header section (up to `header_end`) has a DKIM-Signature field."""
    section = message[:header_end].lower()
    return section.startswith(b"dkim-signature:") or b"\ndkim-signature:" in section


UNREADABLE_SECTION = "the header section cannot be read"


def unfinished(header_section: bytes, reason: str) -> list[DkimResult]:
    """temperror for each signature of the header section (its d=, s= and b= kept, so that a
    reader can tell which), for checks that did not even begin in time; neutral for one that
    cannot be read (so it could never have passed)."""
    try:
        fields = dkim.rfc822_parse(header_section + b"\r\n")[0]
    except dkim.MessageFormatError:
        return [DkimResult("neutral", reason=UNREADABLE_SECTION)]
    values = [value for name, value in fields if name.lower() == b"dkim-signature"]
    return [_pending(value, reason) for value in values[:MAX_SIGNATURES]] or [
        DkimResult("temperror", reason=reason)
    ]


def _pending(value: bytes, reason: str) -> DkimResult:
    """The result of a signature whose check did not finish: temperror, or neutral when its
    tags cannot be read (as its check would say)."""
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList:
        return DkimResult("neutral", reason="unreadable signature")
    return DkimResult("temperror", *_identity(tags), reason=reason)


class Progress:
    """How far a verification in a check thread has come, for its caller to use when the
    time is up: the signatures it is to check, in order, and the results it has. A result
    known stays what it is (a second attacker's pass: when the thread ran late, every
    signature became temperror, a forged author one that had failed at once included, and
    DMARC with it, which enforce then let through)."""

    def __init__(self) -> None:
        self.planned: list[bytes] = []  # (the signature fields; set once, before any result)
        self.done: list[DkimResult] = []

    def so_far(self, reason: str) -> list[DkimResult] | None:
        """The results known, then temperror for the rest; None before the plan is made."""
        planned, done = self.planned, list(self.done)
        if not planned:
            return None
        return done + [_pending(value, reason) for value in planned[len(done) :]]


def _identity(tags: dict[bytes, bytes]) -> tuple[str, str, str]:
    """A signature's d=, s= and the first characters of its b= (RFC 6008)."""
    return _tag(tags, b"d").lower(), _tag(tags, b"s"), "".join(_tag(tags, b"b").split())[:8]


# dkimpy's own logger, silenced: it logs at ERROR, on the root logger, each key it could not
# get ("missing public key: b'sel._domainkey.example.'": a key record that is absent or did not
# answer), a line without a queue id for every such message, whose signature a sender chooses
# (a soak of mixed traffic wrote one for every signed message whose key lookup timed out).
# What it says is in the message's own line already (dkim=temperror, dkim=permerror).
_DKIMPY_LOG = logging.getLogger("mailerd.inbound.dkimpy")
_DKIMPY_LOG.setLevel(logging.CRITICAL + 1)


def verify(
    bridge: Bridge,
    message: bytes,
    authors: Sequence[str] = (),
    progress: Progress | None = None,
) -> list[DkimResult]:
    """One result per signature checked, or [none]. At most MAX_SIGNATURES are, in this order:
    those whose d= is one of the `authors` (the From: domains), a parent or a subdomain of
    one, as DMARC can use only those; then the rest, topmost first. Call it in a thread, with
    a bridge of its own (its lookups' time is shared out) and a `progress` to read should the
    time run out, or with a cache-only bridge, which raises NotCached rather than wait."""
    try:
        checker = dkim.DKIM(message, logger=_DKIMPY_LOG, timeout=bridge.timeout)
    except dkim.MessageFormatError:  # (a line that is no field: dkimpy reads no signature)
        return [DkimResult("neutral", reason=UNREADABLE_SECTION)]
    fields = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    if not fields:
        return [DkimResult("none")]
    order = list(range(len(fields)))
    if authors and len(fields) > 1:  # (stable: topmost first within each group)
        order.sort(key=lambda i: not _by_author(fields[i], authors))
    checked = order[:MAX_SIGNATURES]
    progress = progress or Progress()
    progress.planned = [fields[i] for i in checked]
    results = progress.done
    with body_memo():  # (the body canonicalised once for all the signatures)
        for n, i in enumerate(checked):
            # Each signature's key lookup gets its share of the time left: an attacker's pass
            # put a signature whose key its own DNS never gives above a forged one of the
            # author's domain, to run out the time before that one's failure was known.
            bridge.share(len(checked) - n)
            results.append(_verify_one(bridge, checker, i, fields[i]))
    return results


def _by_author(value: bytes, authors: Sequence[str]) -> bool:
    """Could the signature's d= align with an author's domain (the same organisational
    domain: DMARC's relaxed alignment, which strict alignment only narrows)? A sibling such
    as www.bank.example for mail.bank.example counts (a third attacker's pass put one last,
    behind signatures that made the thread late)."""
    from mailerd.inbound.dmarc import organizational_domain  # (dmarc imports this module)

    try:
        domain = _tag(parse_tag_value(value), b"d").lower().rstrip(".")
    except InvalidTagValueList:
        return False
    if not domain:
        return False
    own = organizational_domain(domain)
    return any(organizational_domain(a) == own for a in authors)


def _verify_one(bridge: Bridge, checker: dkim.DKIM, index: int, value: bytes) -> DkimResult:
    try:
        tags = parse_tag_value(value)
    except InvalidTagValueList as exc:
        return DkimResult("neutral", reason=f"unreadable signature: {exc}")
    domain, selector, b = _identity(tags)
    if _tag(tags, b"a").lower() == "rsa-sha1":
        return DkimResult("policy", domain, selector, b, "rsa-sha1 is not accepted (RFC 8301)")
    covered = [name.strip().lower() for name in tags.get(b"h", b"").split(b":")]
    if b"from" not in covered:  # RFC 6376 5.4: From: must be signed; else anyone could add one
        return DkimResult("neutral", domain, selector, b, "the signature does not cover From:")
    if len(covered) > MAX_SIGNED_FIELDS:
        return DkimResult(
            "policy", domain, selector, b, f"h= lists more than {MAX_SIGNED_FIELDS} fields"
        )
    seen = _Seen()

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        seen.names.append(text)
        try:
            answer = bridge.query(text.rstrip("."), "TXT")
        except TemporaryFailure as exc:
            seen.temporary = str(exc)
            return None
        if not answer.records:
            seen.missing = True
            return None
        seen.record = answer.records[0].encode("utf-8")
        return seen.record

    try:
        good = checker.verify(idx=index, dnsfunc=dnsfunc)
    except dkim.ValidationError as exc:  # a changed body, an expired or unreadable signature
        text = str(exc)
        result = "fail" if text.startswith(_FAILURES) else "neutral"
        return DkimResult(result, domain, selector, b, text.split(" (")[0])
    except dkim.DKIMException as exc:  # the key or the message cannot be used
        return DkimResult("permerror", domain, selector, b, str(exc))
    except NotCached:
        raise  # (a cache-only attempt: the caller asks the DNS instead)
    except Exception as exc:  # dkimpy on a message it cannot take apart
        return DkimResult("neutral", domain, selector, b, f"{type(exc).__name__}: {exc}")
    if good:
        refused = _key_refuses(seen.record, tags, domain)
        if refused:
            return DkimResult("permerror", domain, selector, b, refused)
        if _unsigned_tail(checker, tags):
            return DkimResult("policy", domain, selector, b, "content after the signed length (l=)")
        return DkimResult("pass", domain, selector, b)
    if seen.temporary:
        return DkimResult("temperror", domain, selector, b, seen.temporary)
    if seen.missing:
        return DkimResult("permerror", domain, selector, b, "no key for signature")
    unusable = _unusable_key(seen.record)
    if unusable:
        return DkimResult("permerror", domain, selector, b, unusable)
    return DkimResult("fail", domain, selector, b, "signature did not verify")


def _unusable_key(record: bytes | None) -> str:
    """Why a key record that did not verify a signature can verify none (RFC 6376 3.6.1,
    6.1.2: a PERMFAIL, `permerror`, rather than a signature that did not verify, `fail`): its
    key revoked (p= empty), or a version other than DKIM1; else "" (a reviewer's finding)."""
    if record is None:
        return ""
    try:
        key = parse_tag_value(record)
    except InvalidTagValueList:
        return "key record unreadable"
    if key.get(b"v", b"DKIM1").strip() != b"DKIM1":
        return "key record of another version than DKIM1"
    if not key.get(b"p", b"x").strip():
        return "key revoked"
    return ""


def _unsigned_tail(checker: dkim.DKIM, tags: dict[bytes, bytes]) -> bool:
    """Does the body go on past the length a signature's l= covers? Then whoever appended the
    rest (a whole new message, for a reader) had the signer's pass for it, and DMARC with it:
    such a signature is not accepted (RFC 6376 8.2 leaves it to the verifier; `policy`)."""
    length = tags.get(b"l")
    if length is None:
        return False
    try:
        signed = int(length)
        if signed >= len(checker.body) + 2:  # (canonical bodies are no longer, but for a CRLF)
            return False
        policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(tags.get(b"c"))
        return len(policy.canonicalize_body(checker.body)) > signed
    except (ValueError, dkim.DKIMException):  # (dkimpy verified with them: not expected)
        return True


def _key_refuses(record: bytes, tags: dict[bytes, bytes], domain: str) -> str:
    """What in the key record forbids this signature (RFC 6376 3.6.1), which dkimpy does not
    look at: its h= (hash algorithms) lacks the signature's, or its t=s (no subdomains) meets
    an i= in a subdomain of d=; else ""."""
    hashes, same_domain_only = _key_limits(record)
    if hashes is not None:
        algorithm = _tag(tags, b"a").lower().rpartition("-")[2]
        if algorithm not in hashes:
            return f"the key does not allow {algorithm} (h=)"
    if same_domain_only:
        identity_domain = _tag(tags, b"i").rpartition("@")[2].lower().rstrip(".")
        if identity_domain and identity_domain != domain.rstrip("."):
            return "the key is for the domain itself only (t=s), and i= is a subdomain"
    return ""


def _read_key_limits(record: bytes) -> tuple[tuple[str, ...] | None, bool]:
    """A key record's h= (None: any) and whether its t= has the flag s."""
    try:
        key = parse_tag_value(record)
    except InvalidTagValueList:
        return None, False  # (dkimpy read it, or the signature would not have verified)
    hashes = key.get(b"h")
    allowed = (
        None
        if hashes is None
        else tuple(h.strip().lower() for h in hashes.decode("ascii", "replace").split(":"))
    )
    flags = [f.strip() for f in key.get(b"t", b"").decode("ascii", "replace").split(":")]
    return allowed, "s" in flags


# (remembered as dkim_speedups remembers the key: a sender's key is the same message after
# message)
_key_limits = Remembered(_read_key_limits, KEY_RECORD_REMEMBERED, 256)


def _tag(tags: dict[bytes, bytes], name: bytes) -> str:
    return tags.get(name, b"").decode("ascii", "replace").strip()

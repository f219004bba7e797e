"""The Authentication-Results header (RFC 8601) that records the inbound checks, and the
removal of any that arrives claiming to be ours.

One field, our host name as its authserv-id, one result per method and DKIM signature, folded
one per line; the values are written by authres (Debian python3-authres). A field that arrives
with our authserv-id could only be a forger's attempt to pre-stamp a pass: it is removed before
the message is stored (RFC 8601 5); fields of other authserv-ids are left alone.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from authres.core import AuthenticationResult, AuthenticationResultProperty

from mailerd import headers
from mailerd.inbound.dmarc import DmarcResult, is_dns_name
from mailerd.inbound.sender_policy import SpfResult
from mailerd.inbound.signatures import DkimResult

NAME = b"authentication-results"
# The authserv-id (RFC 8601 2.2: a value, a token or a quoted-string), after the comments.
_TOKEN = re.compile(rb'[^\s;()"]+')
# What a property may show of what the sender wrote: a name (d=, s=, a HELO, an author domain),
# base64 (b=), a local part that needs no quotes. Anything else, authres would quote, and a
# reader or a Sieve rule that splits on ";" or looks for "dmarc=pass" would take the sender's
# text for ours (an attacker's pass: smtp.mailfrom="x;dmarc=pass header.from=bank.example;"@…).
# (ASCII: a value is an RFC 2045 token, which no U-label fits; RFC 6532 extends only quoted
# strings. A-labels are shown instead.)
_NAME = re.compile(r"[\w.-]+|\[[0-9A-Fa-f:.]+\]|\[IPv6:[0-9A-Fa-f:.]+\]", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/]+")
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/?^_`{|}~.-]+")
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)


def header(authserv_id: str, spf: SpfResult, dkim: Sequence[DkimResult], dmarc: DmarcResult) -> str:
    """The whole field, CRLF-terminated."""
    parts = [_spf(spf), *(_dkim(r) for r in dkim), _dmarc(dmarc)]
    return f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(parts) + "\r\n"


@functools.lru_cache(maxsize=256)  # (a frequent sender's verdicts repeat: authres is slow)
def _spf(result: SpfResult) -> str:
    value = _identity_value(result)
    properties = [_property("smtp", result.identity, value)] if value else []
    return str(AuthenticationResult("spf", result=result.result, properties=properties))


def _identity_value(result: SpfResult) -> str:
    """What smtp.mailfrom or smtp.helo shows: the address, or its domain alone (RFC 8601 2.7.2
    allows either) when its local part would need quotes; the HELO name if it is one."""
    if result.identity == "helo":
        name = result.value if result.value.isascii() else result.domain
        return name if _NAME.fullmatch(name) else ""
    local, at, domain = result.value.rpartition("@")
    domain = domain if domain.isascii() else result.domain
    if not at or not _NAME.fullmatch(domain):
        return ""
    return f"{local}@{domain}" if _LOCAL_PART.fullmatch(local) else domain


def _dkim(result: DkimResult) -> str:
    properties = []
    if _dns_name(result.domain):
        properties.append(_property("header", "d", result.domain))
    if _dns_name(result.selector):
        properties.append(_property("header", "s", result.selector))
    if _BASE64.fullmatch(result.b):
        properties.append(_property("header", "b", result.b))
    comment = result.reason if result.result not in ("pass", "none") and result.reason else None
    return str(
        AuthenticationResult(
            "dkim", result=result.result, result_comment=_comment(comment), properties=properties
        )
    )


def _dns_name(value: str) -> bool:
    """May a signature's d= or s= be shown: a name (`_NAME`) that the DNS could hold, of 253
    octets at most and labels of 63? Only the line's length is at stake: a sender's d= and s=
    of 900 octets each (one line each of theirs) made one line of ours 1,881 octets long, where
    RFC 5322 2.1.1 allows 998."""
    return bool(_NAME.fullmatch(value)) and is_dns_name(value.removesuffix("."))


# Octets of header.from's domains shown at most: a From: of ten author domains of 253 octets
# each (`headers.MAX_AUTHOR_DOMAINS`) made a line of 2,550, where RFC 5322 2.1.1 allows 998.
FROM_SHOWN_MAX = 800


@functools.lru_cache(maxsize=256)
def _dmarc(result: DmarcResult) -> str:
    policy = f"p={result.p} sp={result.policy}" if result.p else f"p={result.policy}"
    comment = f"{policy} dis={result.disposition}" if result.policy else None
    shown = _within(
        FROM_SHOWN_MAX, [d for d in result.from_domain.split(",") if _NAME.fullmatch(d)]
    )
    properties = [_property("header", "from", ",".join(shown))] if shown else []
    return str(
        AuthenticationResult(
            "dmarc", result=result.result, result_comment=comment, properties=properties
        )
    )


def _within(limit: int, domains: list[str]) -> list[str]:
    """The first of `domains` whose list, joined by commas, is `limit` octets at most."""
    shown: list[str] = []
    size = -1
    for domain in domains:
        size += 1 + len(domain)
        if size > limit:
            break
        shown.append(domain)
    return shown


def _property(kind: str, name: str, value: str) -> AuthenticationResultProperty:
    return AuthenticationResultProperty(kind, name, value)


def _comment(text: str | None) -> str | None:
    """Text fit for a header comment: one line of letters, digits and a little punctuation,
    not too long. No parentheses or backslashes (the comment's syntax), and no ";", "=" or
    quotes: a reason can hold the sender's text (dkimpy's messages quote the signature), and
    a reader that looks for "dmarc=pass" or splits on ";" would take it for a result of ours
    (a second attacker's pass: a= written as "rsa-sha256 dmarc=pass")."""
    if not text:
        return None
    clean = _NOT_IN_COMMENT.sub(" ", text)
    clean = " ".join(clean.split())
    return clean[:120] or None


_NOT_IN_COMMENT = re.compile(r"[^\w .,:@/+-]")


# The most white space and comments read before an authserv-id: a field whose id is further
# is taken for ours (removed) unread. No real field has such; reading 256 KB of "((((" a byte
# at a time held a worker's event loop 60 ms, twice a message (a reviewer's finding).
CFWS_MAX = 4096
ID_MAX = 1024  # the longest authserv-id read (a host name has 253 octets at most)


def ours(value: bytes, authserv_id: str) -> bool:
    """Does an Authentication-Results value (what follows the colon) bear `authserv_id`? Read
    as a reader of the field would (authres, a mail program): comments (nested, with quoted
    pairs) skipped, a quoted id unquoted, case and a final dot ignored. An id behind more
    than CFWS_MAX octets of white space and comments is taken for ours, unread. (One field;
    `without_forged` reads a message's, with CFWS_MAX for them all.)"""
    position = _after_cfws(value, 0, CFWS_MAX)
    return position > CFWS_MAX or _bears(value, position, authserv_id)


def _bears(value: bytes, position: int, authserv_id: str) -> bool:
    """Is the id at `position` of the value `authserv_id`?"""
    # The id is read within ID_MAX octets: one that goes on past them is taken for ours too,
    # unread (an attacker's pass: a quoted id of 250 KB of quoted pairs, or of encoded-words,
    # held the event loop 100-200 ms a message, where the comment before it was capped).
    head = value[position : position + ID_MAX + 1]
    quoted = _QUOTED.match(head)
    if quoted is not None:
        found = re.sub(rb"\\(.)", rb"\1", quoted.group(1), flags=re.DOTALL)
    else:
        # Encoded-words next to each other are one text to a reader that decodes them (RFC
        # 2047 6.2: the white space between them goes): an id split in two is read whole (a
        # third attacker's pass: "=?utf-8?q?mx.?= =?utf-8?q?example.org?=" was kept).
        token = _ENCODED_WORDS.match(head) or _TOKEN.match(head)
        if token is None:
            return head.startswith(b'"') and len(head) > ID_MAX  # (a quote not closed in time)
        found = token.group(0)
        if len(found) > ID_MAX:
            return True
    text = _decoded_word(found.decode("ascii", "replace")).strip().rstrip(".").lower()
    return text == authserv_id.lower().rstrip(".")


_ENCODED_WORD = rb"=\?[^?\s]*\?[^?\s]*\?[^?\s]*\?="
_ENCODED_WORDS = re.compile(_ENCODED_WORD + rb"(?:\s+" + _ENCODED_WORD + rb")*(?=[\s;(]|$)")


def _decoded_word(text: str) -> str:
    """An id written as RFC 2047 encoded-words, decoded (not valid here, but a reader that
    decodes every field would show it as ours); other text as it is."""
    if not (text.startswith("=?") and text.endswith("?=")):
        return text
    return headers.decode_words(text)


def _after_cfws(value: bytes, position: int, limit: int) -> int:
    """Where the text starts after any whitespace and comments (RFC 5322 CFWS: comments nest,
    and a backslash quotes the next character); an unclosed comment runs to the end. Past
    `limit` octets, a position past that (the rest is not read)."""
    depth = 0
    end = min(len(value), position + limit + 1)
    while position < end:
        c = value[position : position + 1]
        if depth and c == b"\\":
            position += 2
            continue
        if c == b"(":
            depth += 1
        elif c == b")" and depth:
            depth -= 1
        elif not depth and not c.isspace():
            break
        position += 1
    return position


def without_forged(message: bytes, authserv_id: str, limit: int = headers.SCAN) -> bytes | None:
    """The message without the Authentication-Results fields bearing our authserv-id, or None
    when it has none (nothing to change); its header section is looked for in the first
    `limit` octets (a trusted client's may be longer than the scan: `len(message)`). The
    white space and comments read before the ids are CFWS_MAX octets for the whole message:
    past them, the remaining fields are taken for ours, unread (a third attacker's pass: 60
    fields of 4 KB of "((((" each, under the cap of one, held the event loop 100 ms). An
    honest field has a space there."""
    section = message[: headers.section_end(message, limit)].lower()
    # (A field's name begins a line; white space may come before its colon.)
    if b"\nauthentication-results" not in b"\n" + section:
        return None
    cuts = []
    left = CFWS_MAX
    for name, start, end in headers.fields(message, limit):
        if name != NAME:
            continue
        value = message[start:end].split(b":", 1)[1]
        position = _after_cfws(value, 0, left)
        if position > left or _bears(value, position, authserv_id):
            cuts.append((start, end))
        left -= min(position, left)
    if not cuts:
        return None
    out = []
    position = 0
    for start, end in cuts:
        out.append(message[position:start])
        position = end
    out.append(message[position:])
    return b"".join(out)

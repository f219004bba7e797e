"""A message's header section, read the way the DKIM signer, the inbound checks and the check
of an authenticated user's From: need it: where it ends, its fields (name and raw value,
continuation lines included), and the domains (or the addresses) of its From: field. Pure; the
message is bytes with CRLF line ends, as mailerd stores it."""

from __future__ import annotations

import email.errors
import email.header
import email.policy
import re
from collections.abc import Iterator

from mailerd.idn import a_labels
from mailerd.remembered import Remembered

SCAN = 256 * 1024  # a header section is looked for in the first this-many octets
# A From: field longer than this is read leniently only: the strict parser is quadratic in runs
# of '"' and '.' (8 KiB of '"' cost it 0.4 s, 1 KiB 12 ms), and it runs in the event loop.
STRICT_MAX = 1024


def section_end(message: bytes) -> int:
    """Where the header section ends (after the CRLF of its last field, before the empty line);
    a message without an empty line within SCAN octets is taken as all header."""
    if message.startswith(b"\r\n"):
        return 0
    end = message.find(b"\r\n\r\n", 0, SCAN)
    return end + 2 if end >= 0 else min(len(message), SCAN)


def fields(message: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(lower-cased name, start, end) of each field of the header section; [start:end] is the
    whole field with its continuation lines and final CRLF."""
    end = section_end(message)
    start = 0
    while start < end:
        stop = message.find(b"\r\n", start, end)
        stop = end if stop < 0 else stop + 2
        while stop < end and message[stop : stop + 1] in (b" ", b"\t"):
            more = message.find(b"\r\n", stop, end)
            stop = end if more < 0 else more + 2
        line = message[start:stop]
        if b":" in line:
            yield line.split(b":", 1)[0].strip().lower(), start, stop
        start = stop


def from_domain(message: bytes) -> str | None:
    """The domain of the message's From: addresses when there is one (one From: field, read
    cleanly, with one address or several of one domain), else None."""
    found = _from_fields(message)
    if len(found) != 1:
        return None
    domains, clean = _address_domains(found[0])
    return domains[0] if clean and len(domains) == 1 else None


def from_domains(message: bytes) -> list[str] | None:
    """The distinct domains of the addresses of the message's From: fields, lower-cased, in
    A-labels (RFC 8616), in order; None when there is no From: or no domain can be read in it.

    RFC 5322 allows one From: field; a forger's second one, an address list with a stray word,
    an address hidden in an encoded-word or a trailing dot are all read as a reader's program
    might show them, so that each domain a reader could take for the author's is judged: more
    domains can only make DMARC stricter (RFC 7489 6.6.1), never let a message pass."""
    domains: dict[str, None] = {}
    values = _from_fields(message)
    # Several From: fields are read leniently only (which can only find more domains): one
    # field may cost the strict parser 12 ms, and an attacker's pass sent 31 of them.
    read = _address_domains if len(values) == 1 else _lenient_domains
    for value in values:
        domains.update(dict.fromkeys(read(value)[0]))
    return list(domains) or None


def from_addresses(message: bytes) -> list[tuple[str, str]] | None:
    """(local part, domain in normal form) of each address of the message's From: field, as
    the strict (RFC 5322) parser reads them; [] when there is no From: field; None when the
    authors cannot be told for sure: more than one From: field, or one not read cleanly (see
    `_read_domains`: a defect, an address without a domain, a field longer than STRICT_MAX)."""
    values = _from_fields(message)
    if len(values) != 1:
        return [] if not values else None
    found = _authors(values[0])
    return None if found is None else list(found)


def _read_authors(value: bytes) -> tuple[tuple[str, str], ...] | None:
    """`from_addresses` of one From: field's value."""
    text = _field_text(value)
    if len(text) > STRICT_MAX:
        return None
    try:
        parsed = email.policy.default.header_factory("From", text)
        found = [(str(a.username), str(a.domain)) for a in parsed.addresses]
    except (ValueError, TypeError, AttributeError, IndexError, RecursionError):
        return None
    # (a local part in UTF-8 is no defect in a message sent with SMTPUTF8: RFC 6532)
    defects = [d for d in parsed.defects if not isinstance(d, email.errors.NonASCIILocalPartDefect)]
    if not found or defects or not all(domain for _, domain in found):
        return None
    return tuple((local, normal_domain(domain)) for local, domain in found)


def _from_fields(message: bytes) -> list[bytes]:
    """The values (after the colon) of the From: fields."""
    return [
        message[start:stop].split(b":", 1)[1]
        for name, start, stop in fields(message)
        if name == b"from"
    ]


# What follows an @ in a From: field read leniently: a domain as a reader's program shows it
_AT_DOMAIN = re.compile(r"@([^\s<>,;:\"()\[\]@\\]+)")


def _lenient_domains(value: bytes) -> tuple[tuple[str, ...], bool]:
    return _lenient(_field_text(value), []), False


def _field_text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape").replace("\r\n", "")


def _read_domains(value: bytes) -> tuple[tuple[str, ...], bool]:
    """The domains of a From: field's value, and whether it read cleanly: by the email
    package's strict (RFC 5322) parser, which the lenient legacy one is not (it has let
    "a@victim"@evil read as victim: CVE-2023-27043); when that finds no address, or one
    without a domain, or leaves something out (a defect), or the field is longer than
    STRICT_MAX, whatever follows an @ in the field, encoded-words decoded."""
    text = _field_text(value)
    strict: list[str] = []
    if len(text) > STRICT_MAX:
        return _lenient(text, strict), False
    try:
        parsed = email.policy.default.header_factory("From", text)
        addresses = parsed.addresses
        strict = [str(a.domain) for a in addresses if a.domain]
        # (a defect: the parser left something out, as `x@evil <ceo@bank>` loses <ceo@bank>)
        clean = bool(addresses) and len(strict) == len(addresses) and not parsed.defects
    except (ValueError, TypeError, AttributeError, IndexError, RecursionError):
        clean = False  # (RecursionError: comments nested a thousand deep)
    # (not clean: what the strict parser made of it cannot be trusted, `Info @ Shop <…>`
    # gave the domain "Shop"; what follows an @ is what a reader sees as an address)
    if clean:
        return _distinct(strict), True
    return _lenient(text, strict), False


def _lenient(text: str, strict: list[str]) -> tuple[str, ...]:
    """The domains after each @ a reader would see (the strict reading's when none)."""
    return _distinct(_AT_DOMAIN.findall(decode_words(text)) or strict)


def _distinct(domains: list[str]) -> tuple[str, ...]:
    """The domains in normal form, each once, in order, none empty."""
    normal = (normal_domain(d) for d in domains)
    return tuple(dict.fromkeys(d for d in normal if d))


def decode_words(text: str) -> str:
    """`text` with its encoded-words decoded (words next to each other joined, as RFC 2047 6.2
    has them). A charset the sender names that Python has no codec for (every one it has is
    loaded before the children drop privileges: `preload`) is read as Latin-1, as a mail
    program that does not know it either might show it."""
    if "=?" not in text:
        return text
    try:
        words = email.header.decode_header(text)
    except (ValueError, UnicodeError, email.errors.HeaderParseError, RecursionError):
        return text
    parts = []
    for word, charset in words:
        if isinstance(word, str):
            parts.append(word)
            continue
        try:
            parts.append(word.decode(charset or "ascii", "replace"))
        except LookupError:
            parts.append(word.decode("latin-1"))
    return "".join(parts)


# The longest name converted to A-labels: no longer one is a domain name (RFC 1035: 253
# octets), and the codec prepares the whole of a label before it measures it (an attacker's
# pass: a From: whose encoded-words decode to a label of 60,000 characters cost 0.25-0.4 s).
NAME_MAX = 253


def normal_domain(domain: str) -> str:
    """Lower case, no final dot, A-labels for an internationalized name (as given when it
    has none: no DNS name, which `dmarc.is_dns_name` tells)."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii() or len(domain) > NAME_MAX:
        return domain
    return a_labels(domain) or domain


# `_read_domains`, remembered for the fields the strict parser reads (a sender's From: is the
# same message after message; longer ones are not kept, lest a few huge fields fill the memory)
_address_domains = Remembered(_read_domains, STRICT_MAX, 1024)
# and `_read_authors`, for an authenticated user's From: field (the same at every message)
_authors = Remembered(_read_authors, STRICT_MAX, 1024)

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
from typing import Any

from mailerd.idn import NAME_MAX, a_labels
from mailerd.remembered import Remembered

SCAN = 256 * 1024  # a header section is looked for in the first this-many octets
# A From: field longer than this is read leniently only: the strict parser is quadratic in runs
# of '"' and '.' (8 KiB of '"' cost it 0.4 s, 1 KiB 12 ms), and it runs in the event loop.
STRICT_MAX = 1024


def section_end(message: bytes, limit: int = SCAN) -> int:
    """Where the header section ends (after the CRLF of its last field, before the empty line);
    a message without an empty line within `limit` octets is taken as all header."""
    if message.startswith(b"\r\n"):
        return 0
    end = message.find(b"\r\n\r\n", 0, limit)
    return end + 2 if end >= 0 else min(len(message), limit)


def fields(message: bytes, limit: int = SCAN) -> Iterator[tuple[bytes, int, int]]:
    """(lower-cased name, start, end) of each field of the header section (looked for in the
    first `limit` octets); [start:end] is the whole field with its continuation lines and
    final CRLF."""
    end = section_end(message, limit)
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
        if len(domains) > MAX_AUTHOR_DOMAINS:  # (judged a permerror: no need to read on)
            break
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
    """`from_addresses` of one From: field's value: None for a named group (a reader may show
    its name as the author), a defect other than a display name's (`_phrase_defect`), a
    domain that is no DNS name (an encoded-word there is read as text, not decoded), white
    space other than SP and HTAB (`_ODD_SPACE`), or an angle bracket in a display name."""
    text = _field_text(value)
    parsed = None if len(text) > STRICT_MAX else _strict(text)
    if parsed is None or not _clean(parsed, text):
        return None
    if any(group.display_name is not None for group in parsed.groups):
        return None
    addresses = parsed.addresses
    if any(_other_address_in(str(a.display_name), f"{a.username}@{a.domain}") for a in addresses):
        return None
    authors = tuple((str(a.username), normal_domain(str(a.domain))) for a in addresses)
    return authors if all(_DNS_NAME.fullmatch(domain) for _, domain in authors) else None


def _strict(text: str) -> Any:
    """The strict (RFC 5322) parser's reading of a From: field's text, or None when it fails:
    comments nested a thousand deep raise RecursionError, and it has its bugs (`a@[ ` raised
    UnboundLocalError: an attacker's pass). (Typed Any: typeshed's AddressHeader has no
    `defects`.)"""
    try:
        return email.policy.default.header_factory("From", text)
    except Exception:
        return None


def _clean(parsed: Any, text: str) -> bool:
    """Did the strict parser read the field (`text`) cleanly, for the inbound checks, the
    signer and the author check alike: addresses, each with a domain; no defect but a display
    name's (`_phrase_defect`; another means it left something out, as `x@evil <ceo@bank>` loses
    <ceo@bank>); no white space but SP and HTAB (`_ODD_SPACE`)?"""
    addresses = parsed.addresses
    return (
        bool(addresses)
        and all(a.domain for a in addresses)
        and all(map(_phrase_defect, parsed.defects))
        and not _ODD_SPACE.search(text)
    )


# White space other than SP, HTAB and the CRLF of a fold: the strict parser drops a no-break
# space inside an address (`bob@example.org\xa0x` read as bob@example.orgx, another domain),
# where readers end the address there (an attacker's pass). Such a field is not read cleanly.
# (A no-break space or a next line in Latin-1, a byte no UTF-8 reading takes, is one too.)
# (And U+FEFF, U+180E: white space to JavaScript's readers, not to Python: a third pass.)
_ODD_SPACE = re.compile("[^\\S \t\r\n]|[\udca0\udc85\ufeff\u180e]")

# A domain name in A-labels: letters, digits and hyphens, labels of 1 to 63, 253 in all
_DNS_NAME = re.compile(r"(?=.{1,253}\Z)(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


def _other_address_in(name: str, address: str) -> bool:
    """Does a display name with angle brackets hold an address other than its own? An older
    parser (email.utils.getaddresses) reads `"Bob <bob@…>" <alice@…>` as Bob's; Outlook
    writes `"Alice <alice@…>" <alice@…>`, which is no other."""
    if "<" not in name and ">" not in name:
        return False
    return any(found.lower() != address.lower() for found in _NAMED_ADDRESS.findall(name))


_NAMED_ADDRESS = re.compile(r'[^\s<>"(),;:]+@[^\s<>"(),;:]+')


def _phrase_defect(defect: email.errors.MessageDefect) -> bool:
    """Is `defect` one that leaves the addresses as they are, found in a display name (or a
    local part in UTF-8, no defect with SMTPUTF8: RFC 6532)? What mail programs and hands
    write: `Dr. Alice <a@example.org>` (RFC 5322's obs-phrase), an encoded-word in quotes or
    without padding, a charset Python lacks, 8-bit text in a name."""
    if isinstance(defect, _PHRASE_DEFECTS):
        return True
    text = str(defect)
    if isinstance(defect, email.errors.ObsoleteHeaderDefect):
        return text == "period in 'phrase'"
    if isinstance(defect, email.errors.InvalidHeaderDefect):
        return "encoded word" in text or "encoded-word" in text
    return False


_PHRASE_DEFECTS = (
    email.errors.NonASCIILocalPartDefect,
    email.errors.CharsetError,
    email.errors.UndecodableBytesDefect,
    email.errors.InvalidBase64PaddingDefect,
    email.errors.InvalidBase64CharactersDefect,
    email.errors.InvalidBase64LengthDefect,
)


def _from_fields(message: bytes) -> list[bytes]:
    """The values (after the colon) of the From: fields of the header section, with those a
    reader's program may take for one (`_FROM_NAME`). Found by a regular expression, not by
    `fields`: a header section of 256 KiB of tiny fields took 60 ms to walk in Python."""
    end = section_end(message)
    values = []
    for match in _FROM_NAME.finditer(message, 0, end):
        stop = match.end()
        while True:  # (to the end of the field: see _CONTINUED)
            stop = message.find(b"\r\n", stop, end)
            stop = end if stop < 0 else stop + 2
            if stop >= end or not _CONTINUED.match(message, stop, end):
                break
        values.append(message[match.end() : stop])
    return values


# A line that starts a From: field: its name, in any case, with white space after it (and,
# as a reader that trims Unicode white space takes it, a no-break space or another space
# before or after it: an attacker's pass hid a second author in `From\xa0:`, which Node's
# mail parsers read as From:). A line that begins with SP or HTAB continues the field before.
# The name may be folded before its colon (`From` CRLF SP `:`), as `fields` and readers take
# it (an attacker's pass hid the other user's address there).
_SPACE = rb"(?:\xc2\xa0|[\xa0\x85\x0b\x0c\x1c-\x1f])"
_FROM_NAME = re.compile(
    rb"(?:\A|(?<=\n))" + _SPACE + rb"*from(?:[ \t]|\r\n[ \t]|" + _SPACE + rb")*:",
    re.IGNORECASE,
)
# A line that continues a From: field: it begins with SP or HTAB, or, for a reader that takes
# other white space for a fold (mailauth), with one of _SPACE: the From: field is read to its
# end either way (more addresses can only make the reading stricter).
_CONTINUED = re.compile(rb"[ \t]|" + _SPACE)


# What follows an @ in a From: field read leniently: a domain as a reader's program shows it
# (a byte that is no UTF-8, kept as a surrogate, ends it too: a Latin-1 no-break space is
# white space to a reader that decodes Latin-1)
_AT_DOMAIN = re.compile('@([^\\s<>,;:"()\\[\\]@\\\\\udc80-\udcff\ufeff\u180e]+)')


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
    parsed = None if len(text) > STRICT_MAX else _strict(text)
    strict = [] if parsed is None else [str(a.domain) for a in parsed.addresses if a.domain]
    if parsed is not None and _clean(parsed, text):
        return _distinct(strict), True
    # (not clean: what the strict parser made of it cannot be trusted, `Info @ Shop <…>`
    # gave the domain "Shop"; what follows an @ is what a reader sees as an address)
    return _lenient(text, strict), False


def _lenient(text: str, strict: list[str]) -> tuple[str, ...]:
    """The domains after each @ a reader would see (the strict reading's when none)."""
    return _distinct(_AT_DOMAIN.findall(decode_words(text)) or strict)


def _distinct(domains: list[str]) -> tuple[str, ...]:
    """The domains in normal form, each once, in order, none empty; no more than one past
    MAX_AUTHOR_DOMAINS (an attacker's pass: a From: of 252 KiB of names, each converted to
    A-labels, held the event loop 3.7 s)."""
    found: dict[str, None] = {}
    for domain in dict.fromkeys(domains):
        normal = normal_domain(domain)
        if normal:
            found[normal] = None
            if len(found) > MAX_AUTHOR_DOMAINS:
                break
    return tuple(found)


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


# No name longer than idn.NAME_MAX is converted to A-labels: no longer one is a domain name
# (RFC 1035: 253 octets), and the codec prepares the whole of a label before it measures it
# (an attacker's pass: a From: whose encoded-words decode to a label of 60,000 characters cost
# 0.25-0.4 s).

# Author domains judged at most: each costs lookups (a forger chooses them), and a From: of
# more is no real author list (an attacker's pass sent 2,000). More are a permerror, and
# enforce refuses the message (RFC 7489 6.6.1 lets a receiver reject a multi-author From:),
# lest a p=reject domain hide among them. So no more than one past it is converted either.
MAX_AUTHOR_DOMAINS = 10


def normal_domain(domain: str) -> str:
    """Lower case, no final dot, A-labels for an internationalized name (as given when it
    has none: no DNS name, which `dmarc.is_dns_name` tells)."""
    domain = domain.strip().rstrip(".")
    if domain.isascii() or len(domain) > NAME_MAX:
        return domain.lower()
    # (UTS 46 maps case itself: str.lower() makes a final Σ ς, where UTS 46 makes it σ)
    return a_labels(domain) or domain.lower()


# `_read_domains`, remembered for the fields the strict parser reads (a sender's From: is the
# same message after message; longer ones are not kept, lest a few huge fields fill the memory)
_address_domains = Remembered(_read_domains, STRICT_MAX, 1024)
# and `_read_authors`, for an authenticated user's From: field (the same at every message)
_authors = Remembered(_read_authors, STRICT_MAX, 1024)

"""A message's header section, read the way the DKIM signer and the inbound checks need it:
where it ends, its fields (name and raw value, continuation lines included), and the domain of
its From: addresses. Pure; the message is bytes with CRLF line ends, as mailerd stores it."""

from __future__ import annotations

import email.policy
import functools
from collections.abc import Iterator

SCAN = 256 * 1024  # a header section is looked for in the first this-many octets


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
    """The domain of the message's From: addresses when there is one (one address, or several
    of one domain), else None."""
    domains = from_domains(message)
    return domains[0] if domains is not None and len(domains) == 1 else None


def from_domains(message: bytes) -> list[str] | None:
    """The distinct domains of the addresses of the message's From: field, lower-cased, in
    order; None when there is no From:, more than one, or an address without a domain or that
    does not parse (RFC 5322 allows one From: field with one or more addresses)."""
    found = [message[start:stop] for name, start, stop in fields(message) if name == b"from"]
    if len(found) != 1:
        return None
    domains = _address_domains(found[0].split(b":", 1)[1])
    return list(domains) if domains is not None else None


@functools.lru_cache(maxsize=1024)  # (a sender's From: is the same message after message)
def _address_domains(value: bytes) -> tuple[str, ...] | None:
    """The domains of a From: field's value, by the email package's strict (RFC 5322) parser:
    the lenient legacy one has let "a@victim"@evil read as victim (CVE-2023-27043)."""
    text = value.decode("utf-8", "surrogateescape").replace("\r\n", "")
    try:
        addresses = email.policy.default.header_factory("From", text).addresses
    except (ValueError, TypeError, AttributeError, IndexError):
        return None
    if not addresses or not all(a.domain for a in addresses):
        return None
    return tuple(dict.fromkeys(str(a.domain).lower().rstrip(".") for a in addresses))

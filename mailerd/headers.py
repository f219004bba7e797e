"""A message's header section, read the way the DKIM signer and the inbound checks need it:
where it ends, its fields (name and raw value, continuation lines included), and the domain of
its single From: address. Pure; the message is bytes with CRLF line ends, as mailerd stores it."""

from __future__ import annotations

import email.parser
import email.policy
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
    """The domain of the message's single From: address, or None (no From:, several
    addresses or From: fields, or one that does not parse)."""
    section = message[: section_end(message)]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(section)
    try:
        found = parsed.get_all("From") or []
        if len(found) != 1:
            return None
        addresses = found[0].addresses
    except (ValueError, TypeError, AttributeError, IndexError):
        return None
    if len(addresses) != 1 or not addresses[0].domain:
        return None
    return str(addresses[0].domain).lower().rstrip(".")

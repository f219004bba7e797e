"""Trace information: queue ids and the Received:/Return-Path: headers (RFC 5321 §4.4). Pure."""

from __future__ import annotations

import email.utils
import random
import re
import time

_UNSAFE = re.compile(r"[^\x21-\x7e\u0080-\U0010ffff]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_ID_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTVWXYZ"  # Crockford base32: no I, L, O, U


def new_id() -> str:
    """A sortable, collision-resistant id: milliseconds since the epoch + 40 random bits.

    The bits come from `random`, which is seeded from the OS at import and again in every
    forked child: ids need to be unique, not unpredictable, and a getrandom() system call per
    message cost more than the rest of this function.
    """
    number = (int(time.time() * 1000) << 40) | random.getrandbits(40)
    digits = []
    while number:
        number, rest = divmod(number, 32)
        digits.append(_ID_ALPHABET[rest])
    return "".join(reversed(digits))


def _clean(text: str) -> str:
    """Header-safe: one token, no controls or spaces (a hostile EHLO must not add headers)."""
    return _UNSAFE.sub("?", text)[:255] or "unknown"


def _path(address: str) -> str:
    """An address for inside <>: controls removed, so it cannot break the header."""
    return _CONTROLS.sub("", address)


def received(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    when: float | None = None,
    tls: str = "",
) -> bytes:
    """A Received: header, folded over three lines (four with TLS), CRLF-terminated.

    `protocol` is the RFC 3848 / RFC 6531 WITH keyword: SMTP, ESMTP, ESMTPS, ESMTPSA,
    UTF8SMTP, .... `recipient` is given only when the message has exactly one, so other
    recipients are not disclosed. `tls` (tls.describe) becomes Postfix's `(using ...)` line.
    """
    if not protocol.startswith("UTF8"):
        helo = helo.encode("ascii", "replace").decode()  # 8-bit headers need SMTPUTF8
    peer = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    date = rfc5322_date(when)
    for_clause = f"\r\n\tfor <{_path(recipient)}>" if recipient else ""
    using = f"\t(using {_CONTROLS.sub('', tls)})\r\n" if tls else ""
    text = (
        f"Received: from {_clean(helo)} ([{peer}])\r\n{using}"
        f"\tby {hostname} (mailerd) with {protocol} id {queue_id}{for_clause};\r\n"
        f"\t{date}\r\n"
    )
    return text.encode("utf-8")


def received_local(*, uid: int, hostname: str, queue_id: str, when: float | None = None) -> bytes:
    """The Received: header of mail a local user handed to `sendmail`: who submitted it (the
    uid, as Postfix writes it), so that `-f` stays usable and still accountable."""
    return (
        f"Received: by {hostname} (mailerd, from userid {uid})\r\n"
        f"\tid {queue_id}; {rfc5322_date(when)}\r\n"
    ).encode()


_date_cache: tuple[int, str] = (-1, "")


def rfc5322_date(when: float | None = None) -> str:
    """`when` (default now) as an RFC 5322 date in local time, e.g. for Received: and Date:.

    Made once per second and reused: email.utils.formatdate() builds a datetime and its
    time zone each time, a few percent of a worker's CPU when it is called for every message.
    """
    global _date_cache
    second = int(time.time() if when is None else when)
    cached_second, text = _date_cache
    if second != cached_second:
        text = email.utils.formatdate(second, localtime=True)
        _date_cache = (second, text)
    return text


def return_path(sender: str) -> bytes:
    return f"Return-Path: <{_path(sender)}>\r\n".encode()


PATH_MAX = 256  # octets of a reverse-path at most (RFC 5321 4.5.3.1.3)


def missing_headers(
    message_start: bytes, *, queue_id: str, hostname: str, when: float, sender: str = ""
) -> bytes:
    """`Date:`, `Message-ID:` and `From:` lines for a submission that lacks them (as Postfix's
    cleanup adds for local clients: big providers refuse mail without a Message-ID or a From:,
    and without From: there is no domain to DKIM-sign for). From: is the envelope `sender`
    (none for <>, for a sender that is not ASCII: a header may carry UTF-8 only in an
    SMTPUTF8 message, or for one longer than a path may be, whose line could pass 998 octets).

    `message_start` is the beginning of the message; only its header section is looked at.
    """
    header_end = message_start.find(b"\r\n\r\n")
    section = message_start if header_end < 0 else message_start[: header_end + 2]
    if message_start.startswith(b"\r\n"):
        section = b""  # no header section at all
    names = {
        line.split(b":", 1)[0].strip().lower()
        for line in section.split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t") and b":" in line
    }
    added = b""
    if b"date" not in names:
        added += f"Date: {rfc5322_date(when)}\r\n".encode()
    if b"message-id" not in names:
        added += f"Message-ID: <{queue_id}@{hostname}>\r\n".encode()
    if b"from" not in names and sender and sender.isascii() and len(sender) <= PATH_MAX:
        added += f"From: {sender}\r\n".encode()
    return added

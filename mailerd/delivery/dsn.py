"""Delivery status notifications: the bounce (or delay warning) sent back to a message's sender.

`compose()` builds the whole notification as bytes, RFC 5322 with CRLF line ends, ready to be
queued with the null reverse-path `<>` to the original sender. It is pure: no I/O, no clock
(times are passed in) and no randomness (Message-ID and MIME boundary derive from the inputs).

The message is a multipart/report with report-type=delivery-status (RFC 6522, RFC 3464):
1. text/plain for people, quoting each remote server's reply;
2. message/delivery-status for programs: Reporting-MTA and Arrival-Date, then per recipient
   Final-Recipient, Action, Status, Remote-MTA and Diagnostic-Code;
3. text/rfc822-headers: the original header section only, never the body (smaller, and a
   bounce should not hand the content to whoever forged the sender address).

When the original is internationalised (the caller says it came with SMTPUTF8, or the sender,
a recipient or a header is non-ASCII), parts 2 and 3 become message/global-delivery-status
and message/global-headers (RFC 6533), text is UTF-8, and the notification itself needs an
SMTPUTF8 transaction. Otherwise every octet is 7-bit ASCII.

Everything from outside (addresses, remote replies, the original header section) is made
unable to add header fields or MIME parts: control characters (CR and LF above all) become
spaces, long values are cut short, and the boundary is checked against the whole content.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

ACTIONS = ("failed", "delayed")
HEADER_LIMIT = 64 * 1024  # octets of the original header section returned at most
FIELD_LIMIT = 900  # octets of one diagnostic or address kept: a line must stay under 998
_LINE_LIMIT = 990  # octets of one original header line kept (RFC 5322 allows 998)
_WIDTH = 76  # folding and wrapping width, under RFC 5322's recommended 78
_FAILED_SUBJECT = "Undelivered Mail Returned to Sender"

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_SMTP_REPLY = re.compile(r"[2-5]\d\d(?:[ -]|$)")
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: anything that
# some reader might take for the end of a line.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_NOT_ATOM = re.compile(r"[^A-Za-z0-9-]+")


@dataclass(frozen=True)
class RecipientStatus:
    address: str  # the final recipient
    action: str  # "failed" or "delayed"
    status: str  # enhanced status, e.g. "5.1.1"
    diagnostic: str  # the remote reply, e.g. "550 5.1.1 <bob@x>: user unknown" (or our text)
    remote_mta: str | None  # MX host name that answered, if any


def compose(
    *,
    hostname: str,
    sender: str,
    original: bytes,
    recipients: list[RecipientStatus],
    queue_id: str,
    arrival: float,
    now: float,
    smtputf8: bool = False,
    retry_until: float | None = None,
) -> bytes:
    """The notification for `recipients` of the message `original` from `sender`.

    `arrival`, `now` and `retry_until` (when delayed recipients will be given up) are Unix
    times. Raises ValueError for a null sender (never bounce a bounce), no recipients, or an
    action other than "failed" and "delayed".
    """
    if not sender:
        raise ValueError("no notification is ever sent to the null sender")
    if not recipients:
        raise ValueError("a notification needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {r.action!r}")
    headers = _header_section(original)
    utf8 = (
        smtputf8
        or not sender.isascii()
        or any(not r.address.isascii() for r in recipients)
        or not headers.isascii()
    )
    report = _Report(
        host=_atom(hostname),
        sender=_clean(sender, utf8),
        recipients=[_Recipient.make(r, utf8) for r in recipients],
        utf8=utf8,
    )
    charset = "utf-8" if utf8 else "us-ascii"
    human = _human_text(report, retry_until)
    fields = _status_fields(report, queue_id, arrival, retry_until)
    # (Cut again once decoded: each octet that is no UTF-8 becomes U+FFFD, three octets, and a
    # header line of 990 such octets made one of 2,950 in the notification.)
    lines = headers.decode("utf-8", "replace").split("\r\n")[:-1]
    returned = [_at_most(line, _LINE_LIMIT) for line in lines]
    parts = [
        _part(f"text/plain; charset={charset}", "Notification", human, utf8),
        _part(report.content_type("delivery-status"), "Delivery report", fields, utf8),
        _part(report.content_type("headers"), "Undelivered Message Headers", returned, utf8),
    ]
    return _assemble(report, parts, queue_id=queue_id, hostname=hostname, now=now)


def _assemble(
    report: _Report, parts: list[list[str]], *, queue_id: str, hostname: str, now: float
) -> bytes:
    """The top-level header, then the parts between boundaries, encoded."""
    delayed = all(r.action == "delayed" for r in report.recipients)
    subject = "Delayed Mail (still being retried)" if delayed else _FAILED_SUBJECT
    boundary = _boundary(f"{queue_id}.{int(now)}/{hostname}", parts)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{report.host}>",
        *_fold("To", f"<{report.sender}>"),
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {_message_id(queue_id, report, now, delayed)}",
        "Auto-Submitted: auto-replied",  # RFC 3834: auto-responders must not answer it
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if report.utf8 else '7bit'}",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    for part in parts:
        lines += [f"--{boundary}", *part]
    lines.append(f"--{boundary}--")
    # ASCII encoding doubles as a check: nothing 8-bit may slip into a 7-bit notification.
    return ("\r\n".join(lines) + "\r\n").encode("utf-8" if report.utf8 else "ascii")


# --- the pieces ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Recipient:
    """A RecipientStatus with every field made safe to print."""

    address: str
    action: str
    status: str
    diagnostic: str
    remote_mta: str | None

    @classmethod
    def make(cls, r: RecipientStatus, utf8: bool) -> _Recipient:
        status = r.status if _STATUS.fullmatch(r.status) else _default_status(r.action)
        remote = _clean(r.remote_mta, utf8) if r.remote_mta else None
        return cls(_clean(r.address, utf8), r.action, status, _clean(r.diagnostic, utf8), remote)


def _default_status(action: str) -> str:
    # RFC 3463 X.0.0 "other undefined status", in the class the action implies.
    return "5.0.0" if action == "failed" else "4.0.0"


@dataclass(frozen=True)
class _Report:
    host: str
    sender: str
    recipients: list[_Recipient]
    utf8: bool

    def content_type(self, kind: str) -> str:
        """The content type of the machine-readable parts, global (RFC 6533) or not."""
        if kind == "delivery-status":
            return "message/global-delivery-status" if self.utf8 else "message/delivery-status"
        return "message/global-headers" if self.utf8 else "text/rfc822-headers"

    def by_action(self, action: str) -> list[_Recipient]:
        return [r for r in self.recipients if r.action == action]


def _part(content_type: str, description: str, body: list[str], utf8: bool) -> list[str]:
    # A blank line closes the body, so the CRLF before the next boundary (which belongs to
    # the boundary, RFC 2046 5.1.1) takes nothing from the content.
    return [
        f"Content-Description: {description}",
        f"Content-Type: {content_type}",
        f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}",
        "",
        *body,
        "",
    ]


def _human_text(report: _Report, retry_until: float | None) -> list[str]:
    lines = _wrap(f"This is the mail system at host {report.host}.") + [""]
    failed, delayed = report.by_action("failed"), report.by_action("delayed")
    if failed:
        lines += _wrap(
            "I'm sorry to have to inform you that your message could not be delivered to "
            "one or more recipients. The mail system has given up on them; the headers of "
            "your message are attached below."
        )
        lines.append("")
        for r in failed:
            lines += _recipient_text(r)
    if delayed:
        until = f"until {_date(retry_until)}" if retry_until is not None else "for a while"
        lines += _wrap(
            "Your message has not been delivered yet to the recipients below. The mail system "
            f"will keep trying {until}; you do not need to send it again."
        )
        lines.append("")
        for r in delayed:
            lines += _recipient_text(r)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _recipient_text(r: _Recipient) -> list[str]:
    said = f"host {r.remote_mta} said:" if r.remote_mta else ""
    head = _wrap(f"<{r.address}>: {said}".rstrip())
    reason = r.diagnostic or f"(status {r.status})"
    return head + _wrap(reason, indent="    ") + [""]


def _status_fields(
    report: _Report, queue_id: str, arrival: float, retry_until: float | None
) -> list[str]:
    """The RFC 3464 body: a per-message block, then one block per recipient."""
    lines = [
        *_fold("Reporting-MTA", f"dns; {report.host}"),
        *_fold("X-Mailerd-Queue-ID", _clean(queue_id, report.utf8)),
        *_fold("X-Mailerd-Sender", _typed_address(report.sender)),
        f"Arrival-Date: {_date(arrival)}",
    ]
    for r in report.recipients:
        lines.append("")
        lines += _fold("Final-Recipient", _typed_address(r.address))
        lines += [f"Action: {r.action}", f"Status: {r.status}"]
        if r.remote_mta:
            lines += _fold("Remote-MTA", f"dns; {r.remote_mta}")
        if r.diagnostic:
            # "smtp" promises an SMTP reply; our own explanations get a private type.
            kind = "smtp" if _SMTP_REPLY.match(r.diagnostic) else "X-Mailerd"
            lines += _fold("Diagnostic-Code", f"{kind}; {r.diagnostic}")
        if r.action == "delayed" and retry_until is not None:
            lines.append(f"Will-Retry-Until: {_date(retry_until)}")
    return lines


def _typed_address(address: str) -> str:
    # RFC 6533 3: a non-ASCII address has the type "utf-8", written without a space.
    return f"rfc822; {address}" if address.isascii() else f"utf-8;{address}"


# --- text hygiene --------------------------------------------------------------------------


def _clean(text: str, utf8: bool) -> str:
    """`text` on one line: controls become spaces, runs of space one, at most FIELD_LIMIT."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become "?"
    text = " ".join(_CONTROLS.sub(" ", text).split())
    if not utf8:
        text = text.encode("ascii", "replace").decode("ascii")
    if len(text.encode("utf-8")) > FIELD_LIMIT:
        text = _at_most(text, FIELD_LIMIT - 3) + "..."
    return text


def _at_most(text: str, limit: int) -> str:
    """`text` cut to `limit` octets of UTF-8, never inside a character."""
    encoded = text.encode("utf-8")
    return text if len(encoded) <= limit else encoded[:limit].decode("utf-8", "ignore")


def _atom(text: str) -> str:
    """Letters, digits and hyphens joined by single dots: safe in an address or Message-ID."""
    return _NOT_ATOM.sub(".", text).strip(".") or "unknown"


def _header_section(original: bytes) -> bytes:
    """The original's header section (up to the first empty line), CRLF, at most HEADER_LIMIT."""
    window = original[: HEADER_LIMIT + 2 * _LINE_LIMIT]
    lines = re.split(rb"\r?\n", window)
    if len(window) < len(original):
        lines.pop()  # possibly cut short by the window
    kept: list[bytes] = []
    size = 0
    for line in lines:
        if not line:
            break
        line = line.replace(b"\r", b" ").replace(b"\0", b" ")[:_LINE_LIMIT]
        if size + len(line) + 2 > HEADER_LIMIT:
            break
        kept.append(line)
        size += len(line) + 2
    return b"".join(line + b"\r\n" for line in kept)


def _fold(name: str, value: str) -> list[str]:
    """A header field, folded at spaces so that lines stay within _WIDTH where possible."""
    lines: list[str] = []
    line = f"{name}:"
    for word in value.split(" "):
        if len(line) + 1 + len(word) > _WIDTH and line.strip() != f"{name}:":
            lines.append(line)
            line = ""  # the continuation starts with the space added below
        line += " " + word
    lines.append(line)
    return lines


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(
        text,
        width=_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


def _date(t: float) -> str:
    """An RFC 5322 date-time in UTC, e.g. "Mon, 20 Nov 2023 10:00:00 +0000"."""
    return format_datetime(datetime.fromtimestamp(t, UTC))


def _message_id(queue_id: str, report: _Report, now: float, delayed: bool) -> str:
    # Unique per notification, not just per message: a message may get a delay warning and
    # later a bounce, or bounces for different recipients from parallel deliveries.
    kind = "delayed" if delayed else "bounce"
    seed = "\0".join([kind, queue_id, repr(now), *(r.address for r in report.recipients)])
    digest = hashlib.sha256(seed.encode("utf-8", "replace")).hexdigest()[:16]
    return f"<{_atom(queue_id)}.{kind}.{digest}@{report.host}>"


def _boundary(seed: str, parts: list[list[str]]) -> str:
    """A boundary (RFC 2046 bchars) that occurs nowhere in the parts."""
    base = re.sub(r"[^A-Za-z0-9./-]+", ".", seed)[:60]
    content = "\n".join(line for part in parts for line in part)
    boundary, n = base, 0
    while boundary in content:
        n += 1
        boundary = f"{base}={n}"
    return boundary

"""Events exchanged between the SMTP state machine and its I/O layer.

Everything here is an immutable value: the session hands these out from
``Session.next_event()`` and the caller acts on them (write a reply, store a
body chunk, commit a message, close the socket).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "PENDING",
    "Address",
    "AuthRequest",
    "BodyData",
    "CloseConnection",
    "Envelope",
    "Event",
    "MessageAborted",
    "MessageComplete",
    "RecipientVerdict",
    "Rejected",
    "Reply",
    "Sentinel",
    "StartTLS",
]


class Sentinel(enum.Enum):
    """The session's markers, compared by identity; each repr is its name (NEED_DATA, PAUSED).

    An enum (one member per marker, not instances of a plain class) so that the type checker
    knows them apart: `event is NEED_DATA` narrows an event's type, and a recipient check's
    answer can say it is PENDING and nothing else (RecipientVerdict). Copies and pickles of
    a member are the member itself, as identity needs.
    """

    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"
    PENDING = "PENDING"

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


#: The session has consumed all buffered input; call receive_data().
NEED_DATA: Final = Sentinel.NEED_DATA
#: A message is being committed, or a recipient checked; call commit_done() or
#: recipient_checked() before anything else happens.
PAUSED: Final = Sentinel.PAUSED
#: What a recipient check may answer when its verdict needs I/O: the session pauses and the
#: I/O layer gives the verdict later, through Session.recipient_checked().
PENDING: Final = Sentinel.PENDING

# RFC 3463 status-code: class "." subject "." detail; class must match the reply.
_STATUS_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply.

    ``status`` is the RFC 3463 enhanced status code, repeated on every line as
    RFC 2034 requires.  It is None only where RFC 2034 section 4 exempts the
    reply (greeting, EHLO/HELO success, 3xx) and the RFC 5321 grammar wants the
    domain or an EHLO keyword right after the code.
    """

    code: int
    status: str | None
    text: str
    close: bool = False
    # The wire form, set once by __post_init__ (see there); no part of the reply's value.
    _wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Validate eagerly: a malformed reply would desynchronise the client,
        # so it is better to fail where the bad Reply is built.
        code = self.code
        if not (200 <= code <= 559 and code // 10 % 10 <= 5):
            raise ValueError(f"invalid SMTP reply code {code!r}")
        if self.status is not None and (
            not _STATUS_RE.match(self.status) or self.status[0] != str(code)[0]
        ):
            raise ValueError(f"invalid enhanced status {self.status!r} for {code}")
        if "\r" in self.text or (
            not all(line.strip() for line in self.text.split("\n"))
            and not (code == 334 and self.text == "")  # an empty SASL challenge: "334 "
        ):
            # Every line needs text: some clients (Thunderbird) choke on a bare "250".
            raise ValueError(f"reply text must be non-empty lines without CR: {self.text!r}")
        # Encoded once, here: a reply is sent at least once, and functools.cached_property
        # takes a lock on every access (Python 3.11).
        object.__setattr__(self, "_wire", self._encode())

    def _encode(self) -> bytes:
        prefix = f"{self.status} " if self.status else ""
        lines = self.text.split("\n")
        last = len(lines) - 1
        return "".join(
            f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
            for i, line in enumerate(lines)
        ).encode("utf-8")

    def to_bytes(self) -> bytes:
        """The reply as sent on the wire, CRLF-terminated lines."""
        return self._wire


#: A recipient check's answer: None accepts the recipient, a Reply refuses it (or, below 400,
#: accepts it with that reply), PENDING has the I/O layer give the verdict later.
RecipientVerdict = Reply | Literal[Sentinel.PENDING] | None


@dataclass(frozen=True)
class BodyData:
    """A chunk of message content: dot-unstuffed, CRLF line ends, in order."""

    data: bytes


@dataclass(frozen=True)
class Address:
    """A mailbox from MAIL FROM / RCPT TO.

    ``local`` has quotes and backslash escapes removed when it was a
    quoted-string (``quoted`` is then True); ``domain`` is as given, with
    brackets kept for address literals, and "" only for RCPT TO:<postmaster>.
    """

    local: str
    domain: str
    quoted: bool

    def __str__(self) -> str:
        if not self.local and not self.domain and not self.quoted:
            return ""
        local = _format_local_part(self.local)
        return f"{local}@{self.domain}" if self.domain else local


@dataclass(frozen=True)
class Envelope:
    """Everything the client said about a message apart from its content."""

    sender: Address | None  # None = null reverse-path <>
    recipients: tuple[Address, ...]
    helo: str
    esmtp: bool
    body: str  # "7BIT" or "8BITMIME"
    smtputf8: bool
    declared_size: int | None
    chunked: bool = False  # the content came with BDAT, not DATA


@dataclass(frozen=True)
class MessageComplete:
    """The body is complete; the session is PAUSED until commit_done()."""

    envelope: Envelope


@dataclass(frozen=True)
class MessageAborted:
    """Discard the body received so far; the reply follows as its own event."""

    reason: str


@dataclass(frozen=True)
class Rejected:
    """A mail command (MAIL, RCPT, DATA, BDAT, the end of a message) was refused or deferred,
    or AUTH before TLS (538: a password sent in clear), or the session is closed for too many
    errors: the I/O layer logs it (Postfix's
    "NOQUEUE: reject:" line, what an operator and fail2ban read). It comes right before the
    Reply it describes."""

    verb: str
    argument: str  # the command's argument as given ("" for DATA)
    reply: Reply
    sender: str | None  # the transaction's reverse-path ("" for <>), None before MAIL
    helo: str | None
    esmtp: bool

    @property
    def path(self) -> str | None:
        """The address in the argument (between the first < and the last >), if any."""
        start, end = self.argument.find("<"), self.argument.rfind(">")
        return self.argument[start + 1 : end] if 0 <= start < end else None


@dataclass(frozen=True)
class StartTLS:
    """The 220 to STARTTLS is out (the Reply came first): start the TLS handshake, and call
    Session.tls_started() once it is done. Input that came behind STARTTLS, before the
    handshake, was thrown away (RFC 3207 4.2: it could be an attacker's): `discarded` octets.
    Bytes given to the session from now on are the first inside TLS."""

    discarded: int


@dataclass(frozen=True)
class AuthRequest:
    """A client asks to authenticate (AUTH): check the password, then call
    Session.auth_done() with the user it belongs to, or None. The session waits meanwhile."""

    mechanism: str  # PLAIN or LOGIN
    login: str  # the name the client gave
    password: str = field(repr=False)  # never shown, never logged
    authzid: str = ""  # PLAIN's authorization identity, if the client gave one


@dataclass(frozen=True)
class CloseConnection:
    """Nothing more will come: the peer hung up or a closing reply was sent."""


def _format_local_part(local: str) -> str:
    global _format_local_part
    # Bound on first use, because grammar imports this module.
    from .grammar import format_local_part

    _format_local_part = format_local_part
    return format_local_part(local)


Event = (
    Reply
    | BodyData
    | MessageComplete
    | MessageAborted
    | Rejected
    | StartTLS
    | AuthRequest
    | CloseConnection
    | Sentinel
)

"""One outbound SMTP delivery attempt, with smtplib (blocking: the delivery process runs it in
a thread pool, so a slow or tar-pitting MX only ever holds one thread).

`attempt()` tries the destination's hosts and addresses in order until one takes the
transaction, and returns one `Result` per recipient: some may be accepted while others are
deferred or refused. Opportunistic STARTTLS by default: a certificate that does not verify never
blocks delivery unless the policy says "verify", and a failed handshake falls back to plain text
(as Postfix's `smtp_tls_security_level = may` does). AUTH is used only when credentials are
configured (a smarthost), and only after STARTTLS unless the policy is "none".
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

TLS_POLICIES = ("may", "encrypt", "verify", "none")
HEADER_SCAN = 256 * 1024


@dataclass(frozen=True)
class Result:
    code: int  # the reply code (ours for local failures: 4xx retry, 5xx bounce)
    status: str  # enhanced status code
    text: str  # the reply text (for logs and bounces)
    host: str | None = None  # the host that answered, if any
    address: str | None = None  # its IP

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def line(self) -> str:
        return f"{self.code} {self.status} {self.text}".strip()


@dataclass(frozen=True)
class Hop:
    host: str  # name for TLS SNI/verification and logs
    address: str  # IP to connect to
    port: int = 25


@dataclass(frozen=True)
class Message:
    sender: str
    recipients: tuple[str, ...]
    path: Path
    smtputf8: bool = False
    body_8bit: bool = False


@dataclass(frozen=True)
class Settings:
    helo: str
    tls: str = "may"
    auth: tuple[str, str] | None = None
    timeout: float = 300.0
    connect_timeout: float = 30.0
    plain_auth: bool = False  # send AUTH without TLS (only when the TLS policy is "none")


class _HopFailed(Exception):
    """This host did not take the transaction (carries the reason).

    `final` marks answers that would be the same at any host (a 5xx to MAIL FROM): no point
    trying the next MX.
    """

    def __init__(self, result: Result, final: bool = False) -> None:
        super().__init__(result.line())
        self.result = result
        self.final = final


class _TLSFailed(_HopFailed):
    """The STARTTLS handshake failed; with the "may" policy the hop is retried in plain text."""


def attempt(hops: list[Hop], message: Message, settings: Settings) -> dict[str, Result]:
    """Deliver `message` via the first hop that takes it; a Result for every recipient."""
    last = Result(451, "4.4.1", "No destination could be reached")
    for hop in hops:
        try:
            return _try_hop(hop, message, settings)
        except _HopFailed as failed:
            last = failed.result
            if failed.final:
                break
    return dict.fromkeys(message.recipients, last)


def _try_hop(hop: Hop, message: Message, settings: Settings) -> dict[str, Result]:
    try:
        return _transaction(hop, message, settings)
    except _TLSFailed:
        if settings.tls != "may":
            raise
        return _transaction(hop, message, replace(settings, tls="none"))


def _transaction(hop: Hop, message: Message, settings: Settings) -> dict[str, Result]:
    client = _connect(hop, settings)
    try:
        _greet(client, hop, settings)
        _mail_from(client, hop, message)
        results, accepted = _rcpt_to(client, hop, message)
        if accepted:
            final = _data(client, hop, message)
            results.update(dict.fromkeys(accepted, final))
        _quit(client)
        return results
    except (OSError, smtplib.SMTPException) as exc:
        raise _HopFailed(_transient(hop, f"lost connection: {exc}")) from exc
    finally:
        client.close()


class _Client(smtplib.SMTP):
    """smtplib's client, declaring the undocumented attribute that `_connect` sets."""

    # smtplib's own: connect() sets it and starttls() gives it as the TLS server name. The
    # stubs leave it out, being undocumented.
    _host: str


def _connect(hop: Hop, settings: Settings) -> smtplib.SMTP:
    client = _Client(timeout=settings.connect_timeout, local_hostname=settings.helo)
    try:
        code, text = client.connect(hop.address, hop.port)
    except (OSError, smtplib.SMTPException) as exc:
        client.close()
        raise _HopFailed(_transient(hop, f"connect to {hop.address}:{hop.port}: {exc}")) from exc
    client._host = hop.host  # smtplib uses it as the TLS server name; we connected by address
    assert client.sock is not None  # (connect() succeeded)
    client.sock.settimeout(settings.timeout)
    if code != 220:
        client.close()
        raise _HopFailed(_reply(hop, code, text, "4.4.2"))
    return client


def _greet(client: smtplib.SMTP, hop: Hop, settings: Settings) -> None:
    code, text = client.ehlo(settings.helo)
    if code != 250:
        code, text = client.helo(settings.helo)
        if code != 250:
            raise _HopFailed(_reply(hop, code, text, "4.4.2"))
    if settings.tls != "none" and client.has_extn("starttls"):
        _starttls(client, hop, settings)
    elif settings.tls in ("encrypt", "verify"):
        raise _HopFailed(_transient(hop, "STARTTLS is required but not offered", "4.7.5"))
    if settings.auth is not None:
        _login(client, hop, settings)


def _starttls(client: smtplib.SMTP, hop: Hop, settings: Settings) -> None:
    context = ssl.create_default_context()
    if settings.tls != "verify":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        code, text = client.starttls(context=context)
    except (ssl.SSLError, OSError) as exc:
        # The connection is unusable after a failed handshake: "may" reconnects in plain text.
        raise _TLSFailed(_transient(hop, f"TLS handshake failed: {exc}", "4.7.5")) from exc
    if code != 220:
        if settings.tls in ("encrypt", "verify"):
            raise _HopFailed(_reply(hop, code, text, "4.7.5"))
        return
    client.ehlo(settings.helo)


def _login(client: smtplib.SMTP, hop: Hop, settings: Settings) -> None:
    assert settings.auth is not None
    if not client.has_extn("auth"):
        raise _HopFailed(_transient(hop, "AUTH is configured but not offered", "4.7.0"))
    if not isinstance(client.sock, ssl.SSLSocket) and not settings.plain_auth:
        raise _HopFailed(_transient(hop, "refusing to send a password without TLS", "4.7.0"))
    try:
        client.login(*settings.auth)
    except smtplib.SMTPAuthenticationError as exc:
        # Deferred, not bounced: fixing the credentials should release the queue.
        raise _HopFailed(_reply(hop, 451, exc.smtp_error, "4.7.8", prefix="AUTH failed: ")) from exc
    except smtplib.SMTPException as exc:
        raise _HopFailed(_transient(hop, f"AUTH failed: {exc}", "4.7.0")) from exc


def _mail_from(client: smtplib.SMTP, hop: Hop, message: Message) -> None:
    options = []
    if message.smtputf8 and client.has_extn("smtputf8"):
        options.append("SMTPUTF8")
    elif message.smtputf8 and needs_smtputf8(message):
        result = Result(553, "5.6.7", "The recipient's server does not support SMTPUTF8", hop.host)
        raise _HopFailed(result, final=True)
    if message.body_8bit and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if client.has_extn("size"):
        options.append(f"SIZE={message.path.stat().st_size}")
    code, text = client.mail(message.sender, options)
    if code != 250:
        result = _reply(hop, code, text, "5.1.0" if code >= 500 else "4.1.0")
        raise _HopFailed(result, final=result.permanent)


def needs_smtputf8(message: Message) -> bool:
    """Whether the message really needs SMTPUTF8 (RFC 6531): a client may ask for it even when
    every address and header is ASCII, and such mail can go to any server."""
    addresses = [message.sender, *message.recipients]
    if not all(a.isascii() for a in addresses):
        return True
    with open(message.path, "rb") as f:
        head = f.read(HEADER_SCAN).split(b"\r\n\r\n", 1)[0]
    return not head.isascii()


def _rcpt_to(
    client: smtplib.SMTP, hop: Hop, message: Message
) -> tuple[dict[str, Result], list[str]]:
    results: dict[str, Result] = {}
    accepted: list[str] = []
    for recipient in message.recipients:
        code, text = client.rcpt(recipient)
        if code in (250, 251):
            accepted.append(recipient)
        else:
            results[recipient] = _reply(hop, code, text, "5.1.1" if code >= 500 else "4.1.1")
    if not accepted:
        client.rset()
    return results, accepted


def _data(client: smtplib.SMTP, hop: Hop, message: Message) -> Result:
    content = message.path.read_bytes()
    try:
        code, text = client.data(content)
    except smtplib.SMTPDataError as exc:
        return _reply(
            hop, exc.smtp_code, exc.smtp_error, "5.6.0" if exc.smtp_code >= 500 else "4.6.0"
        )
    return _reply(hop, code, text, "2.0.0" if code == 250 else "4.0.0")


def _quit(client: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError, smtplib.SMTPException):
        client.quit()  # the transaction is already decided


def _reply(hop: Hop, code: int, text: bytes | str, default_status: str, prefix: str = "") -> Result:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    status, _, rest = text.partition(" ")
    if not (len(status.split(".")) == 3 and status[:1] == str(code)[:1] and status[0] in "245"):
        status, rest = default_status, text
    return Result(code, status, prefix + rest, hop.host, hop.address)


def _transient(hop: Hop, text: str, status: str = "4.4.1") -> Result:
    return Result(451, status, text, hop.host, hop.address)

"""One outbound SMTP delivery attempt, with smtplib (blocking: the delivery process runs it in
a thread pool, so a slow or tar-pitting MX only ever holds one thread).

`attempt()` tries the destination's hosts and addresses in order until one takes the
transaction, and returns one `Result` per recipient: some may be accepted while others are
deferred or refused. Opportunistic STARTTLS by default: a certificate that does not verify never
blocks delivery unless the policy says "verify", and a failed handshake falls back to plain text
(as Postfix's `smtp_tls_security_level = may` does). AUTH is used only when credentials are
configured (a smarthost), and only after STARTTLS unless the policy is "none"; with the
default policy a password goes only to a smarthost whose certificate verifies.

The content goes as queued, streamed from the queue file with its dot-stuffing (memory stays
bounded for any size), except for a server that does not offer 8BITMIME: 8-bit content is then
converted to 7 bit for that host (`sevenbit`), or refused with 5.6.3 where it cannot be. A
message that only mailerd's own keys signed is signed anew once converted (`Settings.dkim_keys`).

For diagnosis, every address that did not take the transaction gets a log line under the
message's queue id, in Postfix's words (`connect to mx1.example[2001:db8::25]:25: Connection
refused`, `lost connection with mx1.example[192.0.2.1] while sending RCPT TO`, `certificate
verification failed for ...`); a session whose connection still works ends with QUIT, however
the transaction went; with -v the dialogue is logged at DEBUG (commands and replies: never the
message, never what AUTH sends). A failure that mailerd detects itself is a Result marked
`ours`, worded as ours: a bounce must never claim that the remote host said it.

The remote host is not trusted (a fifth attacker's pass, /tmp/atk5a, ran a hostile MX): a
reply is read up to REPLY_LINES lines and REPLY_SIZE octets (an endless multi-line reply grew
the delivery process by 300 MB a second), its text is kept printable and at most REPLY_TEXT
characters long (it goes to the log, the queue and `mailerd queue list`), and a whole session
has a deadline (`session_time`) that every read and write keeps to: with a timeout per read
only, a server dripping a continuation line every few seconds held an attempt, and its thread,
for ever.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import logging
import os
import smtplib
import ssl
import stat
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mailerd import headers, idn, signing
from mailerd.delivery import sevenbit
from mailerd.log import shorten
from mailerd.values import ConfigError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger("mailerd.outbound")

TLS_POLICIES = ("may", "encrypt", "verify", "none")
SEND_BUFFER = 64 * 1024  # octets of content per write to the socket
NOTE_MAX = 1000  # characters of a remote reply kept in a log line
AUTH_MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN")  # in smtplib's order of preference
REPLY_LINES = 100  # lines of one reply at most (an EHLO reply has about 20)
REPLY_SIZE = 64 * 1024  # octets of one reply at most
REPLY_LINE = 8192  # octets of one reply line at most (smtplib's own limit)
REPLY_TEXT = 1000  # characters of a reply's text kept for the log, the queue and bounces
SLOWEST_CONTENT = 10_000  # octets a second: a session's deadline grows by size / this
# Seconds a session's deadline grows by for each recipient after the first: a server may
# check each RCPT for seconds (Postfix's reject_unverified_recipient with a cold cache takes
# about 6), and a hundred of them outlasted the base deadline at every attempt, until the
# mail bounced.
RCPT_TIME = 10.0
QUIT_TIME = 10.0  # s to wait for the answer to QUIT (the delivery's result waits for it)
# Hosts an attempt holds a session with at most (Postfix's smtp_mx_session_limit): each may
# take its whole session time, and an attempt holds a delivery slot and a thread meanwhile.
MX_SESSIONS = 2

# Queue ids of the sessions whose data went (from the final dot to the session's end), which a
# stop that cuts them short must name: the host may have the message already. Counted: the
# groups of one item (one per domain) run at once under its id.
_awaiting_end_of_data: collections.Counter[str] = collections.Counter()
_awaiting_lock = threading.Lock()


def awaiting_end_of_data() -> list[str]:
    with _awaiting_lock:
        return sorted(+_awaiting_end_of_data)


def _await_end_of_data(client: _Client, awaiting: bool) -> None:
    if awaiting == client.awaiting:
        return
    client.awaiting = awaiting
    with _awaiting_lock:
        _awaiting_end_of_data[client.queue_id] += 1 if awaiting else -1
        if _awaiting_end_of_data[client.queue_id] <= 0:
            # (a Counter keeps a key at 0: one per queue id ever sent, for the delivery
            # process's life, which is weeks where nobody reloads)
            del _awaiting_end_of_data[client.queue_id]


@dataclass(frozen=True)
class Result:
    code: int  # the reply code (ours for local failures: 4xx retry, 5xx bounce)
    status: str  # enhanced status code
    text: str  # the reply text (for logs and bounces)
    host: str | None = None  # the host that answered, or that we were talking to
    address: str | None = None  # its IP
    ours: bool = False  # mailerd decided this itself: no remote host said it

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def line(self) -> str:
        return f"{self.code} {self.status} {self.text}".strip()


def namaddr(host: str | None, address: str | None) -> str:
    """Postfix's `host[address]` (just `[address]` for an address literal), or "none"."""
    if not address:
        return "none"
    name = "" if (host or "").startswith("[") else (host or "")
    return f"{name}[{address}]"


@dataclass(frozen=True)
class Hop:
    host: str  # name for TLS SNI/verification and logs
    address: str  # IP to connect to
    port: int = 25

    @property
    def name(self) -> str:
        return namaddr(self.host, self.address)


@dataclass(frozen=True)
class Message:
    sender: str
    recipients: tuple[str, ...]
    path: Path
    smtputf8: bool = False
    body_8bit: bool = False
    queue_id: str = ""  # what its log lines start with


@dataclass(frozen=True)
class Settings:
    helo: str
    tls: str = "may"
    auth: tuple[str, str] | None = None
    timeout: float = 300.0
    connect_timeout: float = 30.0
    # RFC 5321 4.5.3.2.6: 10 minutes for the reply to the final dot, which a server may spend
    # checking the message; giving up sooner sends it again (Postfix's smtp_data_done_timeout).
    data_done_timeout: float = 600.0
    plain_auth: bool = False  # send AUTH without TLS (only when the TLS policy is "none")
    dkim_keys: tuple[signing.SigningKey, ...] = ()  # to sign a message converted to 7 bit anew

    def session_time(self, size: int, recipients: int = 1) -> float:
        """How long one session with one host may take, all of it: twice the timeout of a
        read, RCPT_TIME for each recipient after the first, and the content at SLOWEST_CONTENT
        octets a second (25 MB: 42 minutes more)."""
        more = max(recipients - 1, 0) * RCPT_TIME
        return 2 * self.timeout + more + size / SLOWEST_CONTENT


class _HopFailed(Exception):
    """This host did not take the transaction: `result` for the recipients, `why` (Postfix's
    wording, naming the host and address) for the log.

    `final` marks answers that would be the same at any host (a 5xx to MAIL FROM): no point
    trying the next MX. `usable`: the connection can still say QUIT. `settled`: recipients the
    host refused for good before the session failed (no other host is asked for them).
    `counted`: the session counts toward MX_SESSIONS: it got past EHLO (and STARTTLS), as
    Postfix counts them, or it ran out of time (a host that stalls takes a session's time; one
    that refuses at once, at its greeting say, takes nothing).
    """

    def __init__(
        self,
        result: Result,
        why: str = "",
        final: bool = False,
        usable: bool = True,
        counted: bool = False,
    ) -> None:
        if result.ok:  # (a host's 2xx where it may not be one: never taken for a delivery)
            result = _protocol_error(result.host, result.address, result.line())
        super().__init__(result.line())
        self.result = result
        self.why = why or result.text
        self.final = final
        self.usable = usable
        self.counted = counted
        self.settled: dict[str, Result] = {}


class _TLSFailed(_HopFailed):
    """The STARTTLS handshake failed; with the "may" policy the hop is retried in plain text."""

    def __init__(self, result: Result, counted: bool = False) -> None:
        super().__init__(result, usable=False, counted=counted)  # (the peer's state: unknown)


def attempt(
    hops: list[Hop],
    message: Message,
    settings: Settings,
    record: Callable[[dict[str, Result]], bool] | None = None,
) -> dict[str, Result]:
    """Deliver `message` via the first hop that takes it; a Result for every recipient. A
    recipient a host refused for good stays refused, whatever happens after. Those a host
    deferred are asked of the next host, as Postfix does (smtp_rcpt_fail: a soft error
    qualifies for the other servers: a primary that greylists, a backup MX that queues). At
    most MX_SESSIONS hosts are talked to.

    When a host took some recipients and deferred others, `record` gets its deliveries before
    the next host is asked for the rest, and says whether to go on: they must be on disk first,
    or a stop during the second session would send them again. Without `record`, or when it
    says no (a stop began, the queue cannot be written), the rest wait for the next attempt."""
    content = _Content(message.path, settings.dkim_keys)
    nowhere = Result(451, "4.4.1", "No destination could be reached", ours=True)
    last: dict[str, Result] = {}  # the latest deferral of each recipient not settled
    settled: dict[str, Result] = {}
    sessions = 0
    for number, hop in enumerate(hops, 1):
        rest = tuple(r for r in message.recipients if r not in settled)
        if not rest:
            break
        try:
            results = _try_hop(hop, replace(message, recipients=rest), settings, content)
        except _HopFailed as failed:
            _note(message.queue_id, failed.why)
            # A host that took no connection does not hide what an earlier one answered (a
            # primary that greylists, a backup that is down): that answer is the recipients'
            # result, and the attempt is not one that reached no host (`unreachable`).
            last.update(
                (r, failed.result)
                for r in rest
                if not _no_connection(failed.result) or r not in last or _no_connection(last[r])
            )
            settled.update(failed.settled)
            sessions += failed.counted
            if failed.final or sessions >= MX_SESSIONS:
                break
            continue
        sessions += 1
        deferred = {r: result for r, result in results.items() if _deferral(result)}
        settled.update((r, result) for r, result in results.items() if r not in deferred)
        last.update(deferred)
        if not deferred or sessions >= MX_SESSIONS or number == len(hops):
            break
        delivered = {r: result for r, result in results.items() if result.ok}
        if delivered and (record is None or not record(delivered)):
            break
        _note(
            message.queue_id,
            f"host {hop.name} deferred {len(deferred)} recipient(s); asking the next",
        )
    return {r: settled.get(r) or last.get(r, nowhere) for r in message.recipients}


def _deferral(result: Result) -> bool:
    return not result.ok and not result.permanent


def unreachable(results: Mapping[str, Result]) -> bool:
    """Whether an attempt connected to none of its hosts: every recipient's result is a
    connect failure of ours (refused, timed out, no route), or "no destination could be
    reached". Not a greeting or a dialogue that failed: a host that answers may take the next
    message."""
    return bool(results) and all(map(_no_connection, results.values()))


def _no_connection(result: Result) -> bool:
    """A connect failure of ours, or "no destination could be reached"."""
    return result.ours and result.status == "4.4.1"


def _note(queue_id: str, text: str) -> None:
    log.info("%s%s", f"{queue_id}: " if queue_id else "", shorten(text, NOTE_MAX))


class _Content:
    """The queued message as one attempt's hosts get it: looked at for 8-bit octets, and planned
    for conversion, at most once, and only when a host needs it."""

    def __init__(self, path: Path, keys: tuple[signing.SigningKey, ...]) -> None:
        self.path = path
        self.keys = keys

    @functools.cached_property
    def eight_bit(self) -> bool:
        return sevenbit.has_8bit(self.path)

    @functools.cached_property
    def plan(self) -> sevenbit.Plan:
        own = frozenset((key.domain.lower(), key.selector.lower()) for key in self.keys)
        return sevenbit.plan(self.path, own)

    @functools.cached_property
    def resigned(self) -> tuple[bytes, str | None]:
        """The converted message under new signatures of our keys (the plan said `resign`),
        and their domain (None: none could be made). In memory, as when it was first signed:
        dkimpy takes the whole message."""
        converted = b"".join(sevenbit.convert(self.path, self.plan))
        try:
            signature, domain = signing.sign_message(converted, self.keys)
        except Exception as exc:  # dkimpy refuses what it cannot parse
            log.warning("cannot DKIM-sign %s anew after converting it: %s", self.path.name, exc)
            return b"", None
        return signature + converted, domain


def _try_hop(
    hop: Hop, message: Message, settings: Settings, content: _Content
) -> dict[str, Result]:
    # One deadline for the host, the plain-text retry included (a sixth attacker's pass: a
    # handshake stalled at the end of the first session's time doubled it).
    size = message.path.stat().st_size
    deadline = time.monotonic() + settings.session_time(size, len(message.recipients))
    try:
        return _transaction(hop, message, settings, content, deadline)
    except _TLSFailed as failed:
        if settings.tls != "may":
            raise
        _note(message.queue_id, f"{failed.why}; trying {hop.name} again without TLS")
        try:
            return _transaction(hop, message, replace(settings, tls="none"), content, deadline)
        except _HopFailed as again:
            again.counted = again.counted or failed.counted
            raise


def _transaction(
    hop: Hop, message: Message, settings: Settings, content: _Content, deadline: float
) -> dict[str, Result]:
    client = _connect(hop, settings, message.queue_id, deadline)
    try:
        try:
            results = _converse(client, hop, message, settings, content)
        except _HopFailed as failed:
            failed.settled = client.refused
            failed.counted = failed.counted or client.counts()
            if failed.usable:
                _quit(client)  # RFC 5321 3.3: end the session, whatever went wrong in it
            raise
        _quit(client)
        return results
    except (OSError, smtplib.SMTPException) as exc:
        lost = _HopFailed(_lost(client, hop, exc), usable=False, counted=client.counts(exc))
        lost.settled = client.refused
        raise lost from exc
    finally:
        _await_end_of_data(client, False)
        client.close()


class ReplyTooLong(smtplib.SMTPException):
    """A reply of more than REPLY_LINES lines or REPLY_SIZE octets (or a line of more than
    REPLY_LINE): the session ends, as for a lost connection."""


class _Client(smtplib.SMTP):
    """smtplib's client, with what the log needs: the stage of the dialogue, and (-v) the
    dialogue itself; and with bounds on what the server can make it read, and for how long
    (`deadline`, time.monotonic())."""

    # smtplib's own: connect() sets it and starttls() gives it as the TLS server name. The
    # stubs leave it out, being undocumented.
    _host: str

    def __init__(self, hop: Hop, settings: Settings, queue_id: str, deadline: float) -> None:
        super().__init__(timeout=settings.connect_timeout, local_hostname=settings.helo)
        self.peer = f"{hop.name}:{hop.port}"
        self.prefix = f"{queue_id}: " if queue_id else ""
        self.stage = "receiving the initial server greeting"  # Postfix's words, for the log
        self.secret = False  # in AUTH's exchange, whose lines are never logged
        self.greeting: tuple[int, bytes] = (0, b"")
        self.deadline = deadline
        self.read_timeout = settings.timeout
        self.data_done_timeout = settings.data_done_timeout
        self.unread = bytearray()  # received, not yet read as reply lines
        self.unread_of: object = None  # the socket `unread` came from (STARTTLS makes another)
        self.refused: dict[str, Result] = {}  # recipients refused for good (5xx to RCPT)
        self.greeted = False  # past EHLO (and STARTTLS)
        self.started = time.monotonic()
        self.quick = settings.connect_timeout  # (a session shorter than this takes nothing)
        self.queue_id = queue_id
        self.awaiting = False  # its data went: registered in `_awaiting_end_of_data`

    def counts(self, exc: BaseException | None = None) -> bool:
        """Does the session count toward MX_SESSIONS: past EHLO (and STARTTLS), as Postfix
        counts them, or one that took time (ran out of it, or lasted longer than opening a
        connection may)? A host that refuses at once takes nothing and does not count; one
        that stalls, then refuses or closes just before the deadline, does."""
        took = time.monotonic() - self.started
        return self.greeted or (exc is not None and _timed_out(exc)) or took > self.quick

    def time_left(self) -> float:
        """The timeout for the next read or write: a read's own, or what is left of the
        session's time if that is less (TimeoutError if none is)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the session's time ran out")
        return min(self.read_timeout, left)

    def send(self, s: ReadableBuffer | str) -> None:
        if self.sock is not None:
            self.sock.settimeout(self.time_left())
        self._log_command(s)
        super().send(s)

    def send_content(self, data: bytes | bytearray) -> None:
        """Octets of the message straight to the socket (never logged), within the session's
        time."""
        assert self.sock is not None
        self.sock.settimeout(self.time_left())
        self.sock.sendall(data)

    def _log_command(self, s: ReadableBuffer | str) -> None:
        text = s if isinstance(s, str) else bytes(s).decode("utf-8", "replace")
        line = text.rstrip("\r\n")
        if self.secret:
            line = "***"
        elif line[:5].upper() == "AUTH ":
            self.secret = True
            words = line.split(" ")
            line = " ".join(words[:2]) + (" ***" if len(words) > 2 else "")
        log.debug("%s%s > %s", self.prefix, self.peer, shorten(line))

    def getreply(self) -> tuple[int, bytes]:
        """smtplib's, bounded (REPLY_LINES, REPLY_SIZE, the session's deadline)."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = self._line()
            size += len(line)
            if len(lines) >= REPLY_LINES or size > REPLY_SIZE:
                self.close()
                raise ReplyTooLong(
                    f"a reply of more than {REPLY_LINES} lines or {REPLY_SIZE} octets"
                )
            if not (line[:3].isdigit() and line[3:4] in (b" ", b"-", b"\r", b"\n")):
                # A line without a code is read as a continuation line, as Postfix reads it:
                # ending the reply there left its rest to answer the next command (a 550 to
                # one recipient became the next one's, a multi-line 250 to the final dot a
                # protocol error, and the message was sent at every retry).
                lines.append(line.strip(b" \t\r\n"))
                continue
            lines.append(line[4:].strip(b" \t\r\n"))
            code = int(line[:3])  # (bytes.isdigit(): ASCII digits only)
            if line[3:4] != b"-":
                break
        text = b"\n".join(lines)
        self._show(code, text)
        return code, text

    def _line(self) -> bytes:
        """One reply line, read within the session's time."""
        sock = self.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        if self.unread_of is not sock:  # (after STARTTLS, nothing said before it is read)
            self.unread.clear()
            self.unread_of = sock
        unread = self.unread
        while (end := unread.find(b"\n", 0, REPLY_LINE)) < 0 and len(unread) < REPLY_LINE:
            try:
                sock.settimeout(self.time_left())
                chunk = sock.recv(65536)
            except OSError as exc:
                self.close()
                closed = f"Connection unexpectedly closed: {exc}"
                raise smtplib.SMTPServerDisconnected(closed) from exc
            if not chunk:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            unread += chunk
        if end < 0:
            self.close()
            raise ReplyTooLong(f"a reply line of more than {REPLY_LINE} octets")
        line = bytes(unread[: end + 1])
        del unread[: end + 1]
        return line

    def _show(self, code: int, text: bytes) -> None:
        if code != 334:  # (334: AUTH goes on)
            self.secret = False
        if log.isEnabledFor(logging.DEBUG):
            lines = text.decode("utf-8", "replace").split("\n")
            shown = " | ".join(
                f"{code}{'-' if n < len(lines) - 1 else ' '}{line}" for n, line in enumerate(lines)
            )
            log.debug("%s%s < %s", self.prefix, self.peer, shorten(shown))


def _connect(hop: Hop, settings: Settings, queue_id: str, deadline: float) -> _Client:
    """A connection and its greeting (read, not yet judged: see _converse)."""
    client = _Client(hop, settings, queue_id, deadline)
    try:
        client.greeting = client.connect(hop.address, hop.port)
    except smtplib.SMTPException as exc:  # connected, but no greeting
        client.close()
        raise _HopFailed(_lost(client, hop, exc), usable=False, counted=client.counts(exc)) from exc
    except OSError as exc:
        client.close()
        result = _ours(hop, f"connect to {hop.name}:{hop.port}: {_reason(exc)}")
        raise _HopFailed(result, usable=False) from exc
    client._host = tls_name(hop.host)  # smtplib's TLS server name: we connected by address
    return client


def tls_name(host: str) -> str:
    """The name a server's certificate must carry: the host name, or, for a host given as an
    address ([192.0.2.1], [IPv6:2001:db8::1], as a relayhost may be), the bare address, which
    the ssl module checks against the certificate's IP addresses (and sends no SNI for). With
    the brackets, no certificate could match, and a relayhost given as an address never
    verified: with --relay-auth, nothing was ever sent."""
    if not (host.startswith("[") and host.endswith("]")):
        return host
    inner = host[1:-1]
    return inner[5:] if inner[:5].lower() == "ipv6:" else inner


def _converse(
    client: _Client, hop: Hop, message: Message, settings: Settings, content: _Content
) -> dict[str, Result]:
    code, text = client.greeting
    if code // 100 != 2:
        result = _reply(hop, code, text, "4.4.2")
        why = f"host {hop.name} refused to talk to me: {result.line()}"
        if result.permanent:
            # As Postfix's smtp_skip_5xx_greeting: a server that will not talk now (a blocklist,
            # an overload) is not a verdict on the message: the next host, or a later try.
            taken = f"{result.text} (its greeting's {result.code}, taken as temporary)"
            result = replace(result, code=451, status="4" + result.status[1:], text=taken)
        raise _HopFailed(result, why)
    _greet(client, hop, settings)
    body = _prepare(client, hop, message, content)
    _mail_from(client, hop, message, body)
    results, accepted = _rcpt_to(client, hop, message, body)
    if accepted:
        final = _data(client, hop, body)
        results.update(dict.fromkeys(accepted, final))
    return results


def _greet(client: _Client, hop: Hop, settings: Settings) -> None:
    _hello(client, hop, settings)
    if settings.tls != "none" and client.has_extn("starttls"):
        _starttls(client, hop, settings)
    elif settings.tls in ("encrypt", "verify"):
        why = f"TLS is required, but was not offered by host {hop.name}"
        raise _HopFailed(_ours(hop, why, "4.7.5"))
    client.greeted = True
    if settings.auth is not None:
        _login(client, hop, settings)


def _hello(client: _Client, hop: Hop, settings: Settings) -> None:
    """EHLO, or HELO to an old server that knows no EHLO (RFC 5321 3.2); any other answer
    than a 2xx ends the session with this host."""
    client.stage = "performing the EHLO handshake"
    code, text = client.ehlo(settings.helo)
    if code // 100 == 5:
        client.stage = "performing the HELO handshake"
        code, text = client.helo(settings.helo)
    if code // 100 != 2:
        result = _reply(hop, code, text, "4.4.2")
        raise _HopFailed(result, f"host {hop.name} refused to talk to me: {result.line()}")


@dataclass(frozen=True)
class Trust:
    """The STARTTLS contexts of outbound connections: `verified` checks the server's
    certificate (--outbound-tls verify, and "may" with --relay-auth: see
    scheduler.outbound_policy), `unverified` does not."""

    verified: ssl.SSLContext
    unverified: ssl.SSLContext


def load_trust(cafile: Path | None = None) -> Trust:
    """Both contexts, from the system's CA certificates and `cafile`'s (--outbound-ca); made
    by the master (root) before it forks and at each reload (`use_trust`), so that every trust
    store is read while it is readable (OpenSSL's SSL_CERT_FILE may name one only root can
    read), not by the delivery process after its privilege drop; and once, not per
    connection: making one took 20 ms of CPU. ConfigError if `cafile` cannot be used."""
    verified = ssl.create_default_context()
    if cafile is not None:
        pem = _read_ca_file(cafile)
        try:
            verified.load_verify_locations(cadata=pem)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"--outbound-ca: {cafile}: no usable PEM CA certificate in it"
            ) from exc
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    return Trust(verified, unverified)


CA_FILE_MAX = 4 << 20  # (Debian's whole bundle of CA certificates is 200 KB)


def _read_ca_file(path: Path) -> str:
    """The --outbound-ca file's text: a regular file of at most CA_FILE_MAX, opened without
    waiting (a FIFO put in its place held the master in open() until a signal came)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"--outbound-ca: {path}: not a regular file")
            if info.st_size > CA_FILE_MAX:
                raise ConfigError(f"--outbound-ca: {path}: over {CA_FILE_MAX >> 20} MiB")
            data = os.read(fd, CA_FILE_MAX + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(f"--outbound-ca: cannot read {path}: {exc.strerror or exc}") from exc
    return data[:CA_FILE_MAX].decode("ascii", "replace")


_trust: Trust | None = None  # (use_trust; else the system's, made at first use)


def use_trust(trust: Trust) -> None:
    """The contexts of this process's outbound connections from now on (and of the children
    it forks from now on)."""
    global _trust
    _trust = trust


def _client_context(verify: bool) -> ssl.SSLContext:
    if _trust is None:
        use_trust(load_trust())
    assert _trust is not None
    return _trust.verified if verify else _trust.unverified


def _starttls(client: _Client, hop: Hop, settings: Settings) -> None:
    context = _client_context(settings.tls == "verify")
    client.stage = "receiving the STARTTLS response"
    where = f"{hop.name}:{hop.port}"
    try:
        client.starttls(context=context)
    except ssl.SSLCertVerificationError as exc:
        why = f"certificate verification failed for {where}: {exc.verify_message}"
        if settings.auth is not None:
            why += (
                "; the relayhost's password goes only to a host whose certificate verifies"
                " (--outbound-ca names a private CA; --outbound-tls encrypt sends it without"
                " that check)"
            )
        raise _TLSFailed(_ours(hop, why, "4.7.5")) from exc
    except ssl.SSLError as exc:
        why = f"SSL_connect error to {where}: {exc.reason or exc}"
        raise _TLSFailed(_ours(hop, why, "4.7.5")) from exc
    except smtplib.SMTPResponseException as exc:
        if not 400 <= exc.smtp_code < 600:
            # (smtplib starts TLS on 220 only: after another 2xx the server may wait for a
            # handshake that will not come, and after a 1xx or 3xx no one knows; so "may"
            # starts again in plain text, on a new connection)
            said = _reply(hop, exc.smtp_code, exc.smtp_error, "4.5.0")  # (1xx, 3xx: ours)
            why = (
                said.text
                if said.ours
                else _said_text(hop, said.line(), "STARTTLS", "protocol error: ")
            )
            raise _TLSFailed(_ours(hop, why, "4.5.0")) from exc
        # Refused (454 TLS not available): no handshake began, so with "may" the session goes
        # on in plain text, as Postfix's does; the log says so (a mail that left in plain text
        # from a host that offers TLS has its reason written down; Postfix's says nothing).
        result = _reply(hop, exc.smtp_code, exc.smtp_error, "4.7.5")
        if settings.tls in ("encrypt", "verify"):
            raise _HopFailed(result, _said(hop, result, "STARTTLS")) from exc
        _note(client.queue_id, f"{_said(hop, result, 'STARTTLS')}; going on without TLS")
        return
    except (OSError, smtplib.SMTPException) as exc:
        # The connection is unusable after a failed handshake: "may" reconnects in plain text.
        lost = replace(_lost(client, hop, exc), status="4.7.5")
        raise _TLSFailed(lost, counted=client.counts(exc)) from exc
    # The EHLO after the handshake is judged as the first one is (RFC 3207 4.2: the client
    # SHOULD send it): unread, a 4xx to it (a server busy now) went on to MAIL FROM without
    # a greeting, whose 503 "send HELO first" bounced the message, and no other MX was asked.
    _hello(client, hop, settings)


def _login(client: _Client, hop: Hop, settings: Settings) -> None:
    assert settings.auth is not None
    if not client.has_extn("auth"):
        text = f"AUTH is configured, but was not offered by host {hop.name}"
        raise _HopFailed(_ours(hop, text, "4.7.0"))
    if not isinstance(client.sock, ssl.SSLSocket) and not settings.plain_auth:
        text = f"refusing to send a password to {hop.name} without TLS"
        raise _HopFailed(_ours(hop, text, "4.7.0"))
    offered = client.esmtp_features["auth"].upper().split()
    mechanism = next((m for m in AUTH_MECHANISMS if m in offered), None)
    if mechanism is None:
        text = f"host {hop.name} offers no AUTH mechanism mailerd knows ({' '.join(offered)})"
        raise _HopFailed(_ours(hop, text, "4.7.0"))
    client.stage = "authenticating"
    client.user, client.password = settings.auth
    authobject = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
    try:
        # One mechanism, as Postfix: smtplib's login() tries each offered one in turn, and a
        # server that stalls the second hides the first one's answer behind a timeout.
        client.auth(mechanism, authobject)
    except smtplib.SMTPAuthenticationError as exc:
        # Deferred, not bounced: fixing the credentials should release the queue.
        result = _reply(hop, 451, exc.smtp_error, "4.7.8", prefix="AUTH failed: ")
        said = _reply(hop, exc.smtp_code, exc.smtp_error, "5.7.8").line()
        why = f"SASL authentication failed; server {hop.name} said: {said}"
        raise _HopFailed(result, why) from exc
    except UnicodeEncodeError as exc:  # (smtplib sends ASCII only)
        why = "SASL authentication failed: the --relay-auth name or password is not ASCII"
        raise _HopFailed(_ours(hop, why, "4.7.0"), usable=False) from exc
    except ValueError as exc:  # (a challenge that is no base64: binascii.Error)
        why = f"SASL authentication failed; server {hop.name} sent a challenge that is no base64"
        raise _HopFailed(_ours(hop, why, "4.7.0"), usable=False) from exc


@dataclass(frozen=True)
class _Body:
    """What MAIL FROM announces, and the content as this host gets it; `ascii`: the envelope's
    addresses go with their domains in A-labels (no SMTPUTF8 with this host)."""

    options: list[str]
    pieces: Callable[[], Generator[bytes, None, None]]
    ascii: bool = True

    def address(self, address: str) -> str:
        """`address` as MAIL FROM or RCPT TO gives it to this host."""
        return (_in_ascii(address) if self.ascii else None) or address


def _prepare(client: _Client, hop: Hop, message: Message, content: _Content) -> _Body:
    options = []
    utf8 = client.has_extn("smtputf8")
    # A non-ASCII address needs SMTPUTF8 whatever the message came with: an alias may forward
    # an ASCII message to one (`me: jörg@example.de`), and smtplib, not asked for SMTPUTF8,
    # sends its commands in ASCII: its UnicodeEncodeError escaped the attempt as a bug, every
    # retry, until the queue time ran out (even to a server that offers SMTPUTF8).
    wanted = message.smtputf8 or not _ascii_addresses(message)
    # Without SMTPUTF8, bob@bücher.example goes as bob@xn--bcher-kva.example (the same name).
    ascii = not (wanted and utf8)
    if not ascii:
        options.append("SMTPUTF8")
    elif wanted and needs_smtputf8(message):
        # Not final: another MX may offer it (Postfix tries them all too).
        text = (
            "mailerd could not deliver the message: it requires SMTPUTF8, but host "
            f"{hop.name} does not support SMTPUTF8"
        )
        raise _HopFailed(_ours(hop, text, "5.6.7", 553))
    # RFC 6531 3.1: a server offering SMTPUTF8 supports 8BITMIME (Postfix assumes so too).
    eight_bit_ok = client.has_extn("8bitmime") or utf8
    if eight_bit_ok or not content.eight_bit:
        if eight_bit_ok and (message.body_8bit or content.eight_bit):
            options.append("BODY=8BITMIME")
        if client.has_extn("size"):
            options.append(f"SIZE={message.path.stat().st_size}")
        return _Body(options, lambda: _raw(message.path), ascii)
    plan = content.plan
    if plan.refusal is not None:
        text = (
            f"mailerd could not deliver the message: host {hop.name} does not support "
            f"8BITMIME, and the message cannot be converted to 7 bit: {plan.refusal}"
        )
        raise _HopFailed(_ours(hop, text, "5.6.3", 554))
    note = f"host {hop.name} does not support 8BITMIME: its 8-bit parts go as quoted-printable"
    if plan.resign:
        # Our own signatures, which the conversion breaks: the converted message is signed anew
        # (RFC 6376 5.3 wants a signer to sign what is sent as 7 bit).
        data, domain = content.resigned
        if domain is None:
            text = (
                f"mailerd could not deliver the message: host {hop.name} does not support "
                "8BITMIME, and the converted message could not be DKIM-signed anew"
            )
            raise _HopFailed(_ours(hop, text, "5.6.3", 554))
        _note(message.queue_id, f"{note}, DKIM-signed anew for {domain}")
        if client.has_extn("size"):
            options.append(f"SIZE={len(data)}")
        return _Body(options, lambda: _lines(data), ascii)
    _note(message.queue_id, note)
    # No SIZE: the converted message is larger, by an amount known only once it is sent
    # (Postfix leaves it out too).
    return _Body(options, lambda: sevenbit.convert(message.path, plan), ascii)


def _raw(path: Path) -> Generator[bytes, None, None]:
    with open(path, "rb") as f:
        yield from sevenbit.pieces(f)


def _lines(data: bytes) -> Generator[bytes, None, None]:
    yield from sevenbit.pieces(io.BytesIO(data))


def _mail_from(client: _Client, hop: Hop, message: Message, body: _Body) -> None:
    client.stage = "sending MAIL FROM"
    code, text = client.mail(body.address(message.sender), body.options)
    if code // 100 != 2:
        result = _reply(hop, code, text, "5.1.0" if code >= 500 else "4.1.0")
        raise _HopFailed(result, _said(hop, result, "MAIL FROM"), final=result.permanent)


def _ascii_addresses(message: Message) -> bool:
    return all(a.isascii() for a in (message.sender, *message.recipients))


def _in_ascii(address: str) -> str | None:
    """`address` as a server without SMTPUTF8 takes it: its domain in A-labels (RFC 5890: the
    same name); None if its local part is not ASCII, which only SMTPUTF8 can carry."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    converted = idn.a_labels(domain) if at and local.isascii() else None
    return f"{local}@{converted}" if converted else None


def needs_smtputf8(message: Message) -> bool:
    """Whether the message really needs SMTPUTF8 (RFC 6531): a client may ask for it even when
    every header is ASCII and every address is or has an ASCII form (an internationalized
    domain in A-labels), and such mail can go to any server."""
    if any(_in_ascii(a) is None for a in (message.sender, *message.recipients)):
        return True
    with open(message.path, "rb") as f:
        head = f.read(headers.SCAN).split(b"\r\n\r\n", 1)[0]
    return not head.isascii()


def _rcpt_to(
    client: _Client, hop: Hop, message: Message, body: _Body
) -> tuple[dict[str, Result], list[str]]:
    client.stage = "sending RCPT TO"
    results: dict[str, Result] = {}
    accepted: list[str] = []
    for recipient in message.recipients:
        code, text = client.rcpt(body.address(recipient))
        if 200 <= code < 300:  # (252 too: "cannot verify, but will accept", as Postfix reads it)
            accepted.append(recipient)
        else:
            results[recipient] = _reply(hop, code, text, "5.1.1" if code >= 500 else "4.1.1")
            if results[recipient].permanent:
                client.refused[recipient] = results[recipient]
    if not accepted:
        client.stage = "sending RSET"
        # (The refusals stand even if the server closes after them, as Exim's `drop` does.)
        with contextlib.suppress(OSError, smtplib.SMTPException):
            client.rset()
    return results, accepted


def _data(client: _Client, hop: Hop, body: _Body) -> Result:
    client.stage = "sending DATA command"
    code, text = client.docmd("DATA")
    if 200 <= code < 400 and code != 354:
        # No content was sent: a 250 here must not count as "sent" (Postfix defers it too).
        said = _reply(hop, code, text, "4.5.0").line()
        raise _HopFailed(_ours(hop, _said_text(hop, said, "DATA", "protocol error: "), "4.5.0"))
    if code != 354:
        return _reply(hop, code, text, "5.6.0" if code >= 500 else "4.6.0")
    client.stage = "sending message body"
    _send_content(client, body.pieces())
    client.stage = "sending end of data -- message may be sent more than once"
    client.send_content(b".\r\n")
    client.read_timeout = client.data_done_timeout
    client.deadline = max(client.deadline, time.monotonic() + client.data_done_timeout)
    _await_end_of_data(client, True)  # (until the session ends: see `_transaction`)
    code, text = client.getreply()
    return _reply(hop, code, text, f"{code // 100}.0.0")


def _send_content(client: _Client, pieces: Generator[bytes, None, None]) -> None:
    """The message, dot-stuffed (RFC 5321 4.5.2) and with CRLF line ends, in writes of about
    SEND_BUFFER octets: straight to the socket, so that -v never logs it."""
    buffer = bytearray()
    start = True  # the piece begins a line
    after_cr = False  # the previous piece, a cut long line, ended with the CR of its CRLF
    with contextlib.closing(pieces):
        for piece in pieces:
            if start and piece[:1] == b".":
                buffer += b"."
            # A converted piece holds several lines (quoted-printable's soft line breaks), each
            # stuffed too: one that began with "." lost it at the receiver (RFC 5321 4.5.2).
            piece = piece.replace(b"\r\n.", b"\r\n..")
            start = piece.endswith(b"\n")
            if start and not piece.endswith(b"\r\n") and not (after_cr and piece == b"\n"):
                piece = piece[:-1] + b"\r\n"
            after_cr = piece.endswith(b"\r")
            buffer += piece
            if len(buffer) >= SEND_BUFFER:
                client.send_content(buffer)
                buffer.clear()
    if not start:
        buffer += b"\r\n"
    client.send_content(buffer)


def _quit(client: _Client) -> None:
    """QUIT, waiting QUIT_TIME for its answer at most: the results wait for it, and a server
    that took the message and then never answered QUIT kept them from being recorded (a
    reload meanwhile sent the message again: a sixth attacker's pass)."""
    client.stage = "sending QUIT"
    client.deadline = min(client.deadline, time.monotonic() + QUIT_TIME)
    with contextlib.suppress(OSError, smtplib.SMTPException):
        client.quit()


def _reply(hop: Hop, code: int, text: bytes | str, default_status: str, prefix: str = "") -> Result:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    if not text.isprintable():  # (escape sequences for the administrator's terminal, NULs)
        text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > REPLY_TEXT:
        text = text[: REPLY_TEXT - 3] + "..."
    if not (200 <= code < 300 or 400 <= code < 600):  # (a 1xx, a 3xx where none is due)
        return _protocol_error(hop.host, hop.address, f"{code} {text}", prefix)
    status, _, rest = text.partition(" ")
    if not (len(status.split(".")) == 3 and status[:1] == str(code)[:1] and status[0] in "245"):
        # (of the reply's class: a 554 without a status of its own is no 4.4.2)
        status, rest = str(code)[0] + default_status[1:], text
    return Result(code, status, prefix + rest, hop.host, hop.address)


def _protocol_error(host: str | None, address: str | None, said: str, prefix: str = "") -> Result:
    """A host's reply that is no answer where it came (deferred), worded as ours, quoting it."""
    text = f"{prefix}protocol error: host {namaddr(host, address)} said {said}"
    return Result(451, "4.5.0", text, host, address, ours=True)


def _said(hop: Hop, result: Result, command: str) -> str:
    return _said_text(hop, result.line(), command)


def _said_text(hop: Hop, said: str, command: str, prefix: str = "") -> str:
    return f"{prefix}host {hop.name} said: {said} (in reply to {command} command)"


def _ours(hop: Hop, text: str, status: str = "4.4.1", code: int = 451) -> Result:
    return Result(code, status, text, hop.host, hop.address, ours=True)


def _lost(client: _Client, hop: Hop, exc: BaseException) -> Result:
    """The connection broke (or timed out) during the dialogue: Postfix's words for it."""
    if _timed_out(exc):
        return _ours(hop, f"conversation with {hop.name} timed out while {client.stage}", "4.4.2")
    if isinstance(exc, smtplib.SMTPServerDisconnected | ConnectionError):
        return _ours(hop, f"lost connection with {hop.name} while {client.stage}", "4.4.2")
    return _ours(hop, f"error talking to {hop.name} while {client.stage}: {exc}", "4.4.2")


def _timed_out(exc: BaseException) -> bool:
    # smtplib turns a read's timeout into SMTPServerDisconnected, raised while handling it.
    return isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "Connection timed out"
    return exc.strerror or str(exc) or type(exc).__name__

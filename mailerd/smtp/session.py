"""The server side of one SMTP connection as a pure state machine.

Bytes go in through ``receive_data()``; ``next_event()`` hands out what the
I/O layer must do: send a ``Reply``, store ``BodyData``, commit on
``MessageComplete`` (then call ``commit_done()``), discard on
``MessageAborted``, start TLS on ``StartTLS`` (then ``tls_started()``), check
a password on ``AuthRequest`` (then ``auth_done()``), close on
``CloseConnection``.  There is no I/O and no clock here: timeouts are
reported by the caller through ``timeout()``.

Input is parsed lazily in ``next_event()``, which is what makes pipelining
and the PAUSED state simple: unparsed bytes just wait in the buffer.

This module reads the input (command lines, DATA, BDAT chunks) and keeps the
transaction; what each command means is in ``commands``, its replies in
``replies``, the content checks in ``data``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable

from . import auth
from .commands import Commands, is_auth_line
from .data import BodyChecker, DataDecoder, starts_no_field
from .events import (
    NEED_DATA,
    PAUSED,
    Address,
    AuthRequest,
    BodyData,
    CloseConnection,
    Envelope,
    Event,
    MessageAborted,
    MessageComplete,
    RecipientVerdict,
    Rejected,
    Reply,
    StartTLS,
)
from .replies import (
    AUTH_FAILED,
    AUTH_OK,
    AUTH_UNAVAILABLE,
    BARE_CR_LF_COMMAND,
    BARE_CR_LF_MESSAGE,
    LINE_TOO_LONG,
    NO_RECIPIENTS,
    NUL_MESSAGE,
    TEXT_LINE_TOO_LONG,
    TOO_MANY_HOPS,
    greeting,
    too_many_auth_failures,
)
from .settings import SessionConfig

# What MAIL's line may grow by beyond the 512 octets of a command (RFC 5321 4.5.3.1.4: "SMTP
# extensions may be used to increase this limit"), for the parameters of the extensions
# offered: SIZE= 26 octets (RFC 1870 6), BODY= 16 (RFC 6152 2), SMTPUTF8 10 (RFC 6531 3.4);
# and AUTH= 500 when AUTH is offered (RFC 4954 5). A sender with a long address and all of
# them was refused "line too long" and lost its message (a helper's pass as the providers).
MAIL_PARAMETERS = 26 + 16 + 10
AUTH_PARAMETER = 500

__all__ = ["Session", "SessionConfig"]


class _State(enum.Enum):
    COMMAND = "command"
    DATA = "data"  # reading a dot-stuffed DATA body
    BDAT = "bdat"  # reading the octets of one BDAT chunk
    PAUSED = "paused"  # MessageComplete handed out, waiting for commit_done()
    CHECKING = "checking"  # a recipient's verdict is PENDING: waiting for recipient_checked()
    HANDSHAKE = "handshake"  # StartTLS handed out, waiting for tls_started()
    AUTHENTICATING = "authenticating"  # AuthRequest handed out, waiting for auth_done()
    CLOSED = "closed"


_CLOSE = CloseConnection()
# States in which the session waits for the I/O layer: next_event() says PAUSED.
_WAITING = frozenset({_State.PAUSED, _State.CHECKING, _State.HANDSHAKE, _State.AUTHENTICATING})

# Commands whose refusals are mail refused: each one is reported as a Rejected event.
_MAIL_VERBS = frozenset({"MAIL", "RCPT", "DATA", "BDAT"})


class Session(Commands):
    """One SMTP server conversation; see the module docstring for the loop."""

    def __init__(
        self,
        config: SessionConfig,
        check_recipient: Callable[[Address], RecipientVerdict],
        on_command: Callable[[bytes], None] | None = None,
        check_mail: Callable[[Address | None, int | None, str | None], Reply | None] | None = None,
    ) -> None:
        """`check_mail(sender, declared size, authenticated user)` has the last word on a
        MAIL command that is otherwise right (None: accepted; a Reply refuses it): whether
        there is room for the message, whether the user may use that sender address."""
        self._config = config
        self._check_recipient = check_recipient
        self._check_mail = check_mail
        # Called with every command line (never message content nor a password), e.g. for
        # -v logging.
        self._on_command = on_command
        self._events: deque[Event] = deque([greeting(config.hostname)])
        self._state = _State.COMMAND
        # Unparsed input is self._buf[self._pos:] followed by self._pending.
        self._buf = b""
        self._pos = 0
        self._pending: list[bytes] = []
        self._eof = False
        self._discarding = False  # inside a command line that is too long, or answered already
        self._answered = False  # (that line's reply is sent: its end gets none)
        self._errors = 0
        self._helo: str | None = None
        self._esmtp = False
        self._decoder: DataDecoder | None = None
        self._checker: BodyChecker | None = None
        self._bdat_remaining = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None  # reply for a chunk being skipped
        self._content_octets = 0  # read of the current DATA body or BDAT chunk
        self._checking: Address | None = None  # the recipient whose verdict is PENDING
        self._verb = ""  # the command being answered, and its argument (for Rejected)
        self._argument = ""
        self._tls = config.implicit_tls
        self._user: str | None = None  # authenticated as
        self._sasl: tuple[str, str | None] | None = None
        self._unlogged = 0
        self._auth_failures = 0
        self._session_deferred = 0  # deferrals (`Commands._defer`), in all
        self._clear_transaction()

    # --- public API ---------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Queue bytes from the peer; b"" means the peer closed its side."""
        if self._eof or self._state is _State.CLOSED:
            return  # nothing after EOF or a closing reply matters
        if not data:
            self._eof = True
            return
        if type(data) is not bytes:
            data = bytes(data)  # never keep a reference to a reusable buffer
        self._pending.append(data)

    def next_event(self) -> Event:
        """Return the next thing to do; NEED_DATA/PAUSED when there is none."""
        events = self._events
        while not events:
            state = self._state
            if state is _State.CLOSED:
                return _CLOSE
            if state in _WAITING:
                return PAUSED
            if not self._step(state):
                if not self._eof:
                    return NEED_DATA
                self._abort_transaction("connection closed by peer")
                self._close()
        return events.popleft()

    def commit_done(self, reply: Reply) -> None:
        """Answer a MessageComplete with the reply to send (250, 451, 554, ...)."""
        if self._state is _State.CLOSED:
            return  # timed out while committing: nothing left to answer
        if self._state is not _State.PAUSED:
            raise RuntimeError("commit_done() called without a pending MessageComplete")
        self._state = _State.COMMAND
        if 200 <= reply.code < 300:
            # A delivered message shows a working client: only errors since then count
            # (as Postfix does), so a long session with an occasional unknown recipient lives.
            self._errors = 0
        # The caller, who holds the message, reports it. A refusal of its content is no
        # error; a temporary one (a full disk, a failed write) is ours, a deferral, an error
        # only past the allowances (`_defer`), which may make it the 421 the caller has not
        # reported.
        given = reply
        if 400 <= reply.code < 500 and not self._deferral_excused():
            reply = self._counted(reply)
        self._send(reply, count=False, report=reply is not given)

    def recipient_checked(self, refusal: Reply | None) -> None:
        """The verdict on the recipient whose check answered PENDING: None accepts it, a Reply
        refuses it (or, below 400, accepts it with that reply). Parsing then goes on."""
        if self._state is _State.CLOSED:
            return  # timed out meanwhile: nothing left to answer
        if self._state is not _State.CHECKING or self._checking is None:
            raise RuntimeError("recipient_checked() called without a pending recipient check")
        recipient, self._checking = self._checking, None
        self._state = _State.COMMAND
        self._recipient_verdict(recipient, refusal)

    def tls_started(self) -> None:
        """The TLS handshake asked for by StartTLS is done: the session starts over (RFC 3207
        4.2: the client says EHLO again; nothing said before TLS counts, an AUTH neither)."""
        if self._state is _State.CLOSED:
            return
        if self._state is not _State.HANDSHAKE:
            raise RuntimeError("tls_started() called without a pending StartTLS")
        self._tls = True
        self._helo = None
        self._esmtp = False
        self._user = None
        self._clear_transaction()
        self._state = _State.COMMAND

    def auth_done(self, user: str | None, *, unavailable: bool = False) -> Reply:
        """The verdict on an AuthRequest: the user the password belongs to, or None (wrong
        name or password; with `unavailable`, the check itself failed). Returns the reply the
        session sends (235, 535, 454, or the 421 that ends a session after too many
        failures), for the caller's log."""
        if self._state is _State.CLOSED:
            return AUTH_FAILED
        if self._state is not _State.AUTHENTICATING:
            raise RuntimeError("auth_done() called without a pending AuthRequest")
        self._state = _State.COMMAND
        if user is not None:
            self._user = user
            reply = AUTH_OK
        elif unavailable:
            reply = AUTH_UNAVAILABLE
        else:
            self._auth_failures += 1
            reply = AUTH_FAILED
            if self._auth_failures >= self._config.max_auth_failures:
                reply = too_many_auth_failures(self._config.hostname)
        reply = self._counted(reply)
        self._send(reply, count=False, report=False)  # the caller logs it, with the user
        return reply

    @property
    def tls(self) -> bool:
        """The session is inside TLS."""
        return self._tls

    @property
    def user(self) -> str | None:
        """The user the client authenticated as, if it did."""
        return self._user

    @property
    def recipients(self) -> tuple[Address, ...]:
        """The recipients accepted so far in the mail transaction."""
        return tuple(self._recipients)

    def timeout(self, what: str = "Timeout exceeded") -> Reply:
        """The peer took too long (the caller's clock says what: a command, the message data,
        the session): return the 421 4.4.2 to send, its text `what`; the session ends."""
        reply = Reply(
            421,
            "4.4.2",
            f"{self._config.hostname} {what}, closing connection",
            close=True,
        )
        if self._state is not _State.CLOSED:
            self._abort_transaction("timeout")
            self._close()
        return reply

    @property
    def reading_content(self) -> bool:
        """Reading message content (a DATA body, a BDAT chunk): the caller's data-rate stage."""
        return self._state is _State.DATA or self._state is _State.BDAT

    @property
    def content_octets(self) -> int:
        """Octets read of the current DATA body or BDAT chunk (for the caller's data rate)."""
        return self._content_octets

    @property
    def mid_command(self) -> bool:
        """Part of a command line has arrived and not its end (the caller's command clock
        runs from its first byte, not from the last)."""
        return self._state is _State.COMMAND and (
            self._discarding or self._pos < len(self._buf) or bool(self._pending)
        )

    @property
    def waiting(self) -> bool:
        """Waiting for the caller (a commit, a recipient check, TLS, a password): the client is
        not the one who is late."""
        return self._state in _WAITING

    @property
    def idle(self) -> bool:
        """Between transactions with nothing queued: a 421 now loses nothing.

        Used by the I/O layer for a graceful shutdown.
        """
        return self._state is _State.COMMAND and not self._in_mail and not self._events

    @staticmethod
    def refuse(hostname: str, text: str) -> Reply:
        """A greeting that turns a connection away (e.g. too many sessions)."""
        return Reply(421, "4.7.0", f"{hostname} {text}", close=True)

    # --- input handling -----------------------------------------------------

    def _step(self, state: _State) -> bool:
        """Process some input; False when more data is needed to go on."""
        if state is _State.COMMAND:
            return self._command_step()
        if state is _State.DATA:
            return self._data_step()
        return self._bdat_step()

    def _take_input(self) -> bytes:
        """Remove and return all unparsed input as one bytes object."""
        parts = []
        if self._pos < len(self._buf):
            parts.append(self._buf[self._pos :] if self._pos else self._buf)
        parts.extend(self._pending)
        self._pending.clear()
        self._buf = b""
        self._pos = 0
        # join() of a single bytes object returns it without copying.
        return b"".join(parts)

    def _command_step(self) -> bool:
        if self._pending:
            self._buf = self._take_input()
        buf, pos = self._buf, self._pos
        limit = self._line_limit(buf, pos)
        end = buf.find(b"\r\n", pos)
        if not self._discarding:  # (every LF before the first CRLF is a bare one)
            bare = buf.find(b"\n", pos, min(len(buf) if end < 0 else end, pos + limit))
            if bare >= 0:
                self._bare_line_feed(buf[pos : bare + 1])
                self._pos = bare + 1
                return True
        if end < 0:
            if len(buf) - pos >= limit:
                # Already too long even if CRLF came next: drop what we have,
                # keeping a CR that may pair with a LF in the next chunk.
                self._long_line_starts(buf[pos:])
                self._discarding = True
                self._buf = b"\r" if buf.endswith(b"\r") else b""
                self._pos = 0
            return False
        self._pos = end + 2
        if self._answered:  # (the end of a line a bare LF was answered in)
            self._discarding = self._answered = False
        elif self._discarding or end + 2 - pos > limit:
            self._long_line_starts(buf[pos:end])
            self._discarding = False
            self._refuse_line(LINE_TOO_LONG)
        else:
            self._handle_command(buf[pos:end])
        return True

    def _long_line_starts(self, start: bytes) -> None:
        """A line too long to read begins with `start` (unless its start came in an earlier
        read): an AUTH's, refused unread, keeps the lines after it out of the log, as any AUTH
        refused before its handler runs does (`Commands._handle_command`)."""
        if not self._discarding and self._sasl is None and is_auth_line(start):
            self._unlogged = 2

    def _line_limit(self, buf: bytes, pos: int) -> int:
        """Octets the line at `pos` may take with its CRLF: an AUTH response's, or a
        command's, MAIL's grown by the parameters the extensions offered add to it."""
        if self._sasl is not None:
            return auth.RESPONSE_LINE_MAX
        limit = self._config.max_command_line
        if buf[pos : pos + 5].upper() == b"MAIL ":
            limit += MAIL_PARAMETERS + (AUTH_PARAMETER if self._config.auth else 0)
        return limit

    def _bare_line_feed(self, line: bytes) -> None:
        """A bare LF in a line: no CRLF can make it a command (only CRLF ends a line), so it
        is answered at the LF (500 5.5.2), not at a CRLF that a client ending its lines with
        LF alone never sends: it waited for a reply until the timeout (an RFC review). The
        rest of the line, up to a CRLF, is discarded unanswered: the LF separates nothing,
        and one line gets one reply, the same however the reads cut it."""
        if self._sasl is not None:
            self._refuse_line(BARE_CR_LF_COMMAND)
        else:
            self._handle_command(line)  # (logged, and refused for its bare LF)
        self._discarding = self._answered = True

    def _refuse_line(self, reply: Reply) -> None:
        """A line that cannot be read as a command (too long, a bare LF) is refused unread.
        In an AUTH exchange the exchange ends here, or the next command would be taken for
        the response (and kept out of the -v log: it may be a password)."""
        self._verb = self._argument = ""
        if self._sasl is not None:
            self._sasl = None
            self._unlogged = 1
        self._send(reply)

    def _data_step(self) -> bool:
        data = self._take_input()
        if not data:
            return False
        decoder, checker = self._decoder, self._checker
        assert decoder is not None and checker is not None
        self._content_octets += len(data)
        out = decoder.feed(data)
        if out:
            self._content(out, checker)
        if decoder.finished:
            self._buf = decoder.rest
            self._decoder = None
            self._state = _State.COMMAND
            self._end_of_content(last=True)
        return True

    def _bdat_step(self) -> bool:
        if self._bdat_remaining:
            data = self._take_input()
            if not data:
                return False
            wanted = self._bdat_remaining
            if len(data) > wanted:
                data, self._buf = data[:wanted], data[wanted:]
            self._bdat_remaining -= len(data)
            self._content_octets += len(data)
            checker = self._checker
            if self._bdat_refusal is None and checker is not None:
                self._content(data, checker)
            if self._bdat_remaining:
                return True
        self._state = _State.COMMAND
        if self._bdat_refusal is not None:
            refusal, self._bdat_refusal = self._bdat_refusal, None
            excused = refusal is NO_RECIPIENTS and self._no_recipients_excused()
            self._send(refusal, count=not excused, report=not excused)
        else:
            self._end_of_content(last=self._bdat_last)
        return True

    # --- replies and transaction state --------------------------------------

    def _send(
        self, reply: Reply, *, count: bool = True, report: bool = True, logged: bool = False
    ) -> None:
        """Queue a reply, enforcing the error limit and closing replies; a refused mail
        command, or the end of a session for its errors, comes with a Rejected event (and
        another refusal when `logged`)."""
        if count:
            reply = self._counted(reply)
        wanted = logged or self._verb in _MAIL_VERBS or reply.code == 421
        if report and reply.code >= 400 and wanted:
            self._report(reply)
        if reply.close:
            self._abort_transaction("connection closing")
        self._events.append(reply)
        if reply.close:
            self._close()

    def _counted(self, reply: Reply) -> Reply:
        """Count an error reply; past the limit, the 421 that closes the session instead."""
        if reply.code >= 400:
            self._errors += 1
            if self._errors > self._config.max_errors:
                return Reply(
                    421,
                    "4.7.0",
                    f"{self._config.hostname} Too many errors, closing connection",
                    close=True,
                )
        return reply

    def _report(self, reply: Reply) -> None:
        sender = str(self._sender or "") if self._in_mail else None
        self._events.append(
            Rejected(self._verb, self._argument, reply, sender, self._helo, self._esmtp)
        )

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._buf = b""
        self._pos = 0
        self._pending.clear()
        self._decoder = None
        self._checker = None

    def _clear_transaction(self) -> None:
        self._in_mail = False
        self._sender: Address | None = None
        self._recipients: list[Address] = []
        self._overshoot = 0  # RCPTs past max_recipients in this transaction
        self._deferred = 0  # and those deferred (`_defer`: our doing, not errors)
        self._excused_no_recipients = False  # (a DATA after them: `_no_recipients_excused`)
        self._body_type = "7BIT"
        self._smtputf8 = False
        self._declared_size: int | None = None
        self._body_started = False  # the caller holds partial content
        self._bdat_used = False
        self._checker = None

    def _abort_transaction(self, reason: str) -> None:
        """Drop the transaction, telling the caller to drop partial content."""
        if self._body_started:
            self._events.append(MessageAborted(reason))
        self._clear_transaction()

    def _wait_for_verdict(self, recipient: Address) -> None:
        self._checking = recipient
        self._state = _State.CHECKING

    def _start_tls(self) -> None:
        """The 220 is queued: what the client sent behind STARTTLS is dropped unread (a
        man in the middle's injection would be taken as said inside TLS, CVE-2011-0411)."""
        discarded = len(self._take_input())
        self._events.append(StartTLS(discarded))
        self._state = _State.HANDSHAKE

    def _wait_for_auth(self, request: AuthRequest) -> None:
        self._events.append(request)
        self._state = _State.AUTHENTICATING

    def _read_data(self) -> None:
        """DATA was accepted: what follows is dot-stuffed content up to CRLF.CRLF."""
        self._decoder = DataDecoder()
        self._content_octets = 0
        self._state = _State.DATA

    def _read_chunk(self, size: int, last: bool, refusal: Reply | None) -> None:
        """BDAT: the next `size` octets are content, read even when refused (RFC 3030 3)."""
        self._bdat_refusal = refusal
        self._bdat_size = self._bdat_remaining = size
        self._bdat_last = last
        self._content_octets = 0
        self._state = _State.BDAT

    def _envelope(self) -> Envelope:
        return Envelope(
            sender=self._sender,
            recipients=tuple(self._recipients),
            helo=self._helo or "",
            esmtp=self._esmtp,
            body=self._body_type,
            smtputf8=self._smtputf8,
            declared_size=self._declared_size,
            chunked=self._bdat_used,
        )

    def _start_content(self) -> None:
        self._body_started = True
        config = self._config
        self._checker = BodyChecker(config.max_message_size, config.max_text_line)

    def _content(self, piece: bytes, checker: BodyChecker) -> None:
        """Hand out the next non-empty piece of the message's content, checked.

        Content whose first line starts with a space or a tab has no header section (that line
        continues no field): it gets an empty line in front, as Postfix's smtpd gives it, so that
        it becomes body. Without it the line would continue the Received: and
        Authentication-Results: fields we put above it, and a sender could append to our own
        verdict (" ; dkim=pass header.d=bank.example"). So does content whose first line starts
        with any other octet that no field name starts with (`data.starts_no_field`): a reader
        of JavaScript's white space folds on a VT, a FF or a no-break space too (an attacker's
        pass appended the verdict after a VT, in mailauth's reading).
        """
        if checker.size == 0 and starts_no_field(piece):  # (the content's first piece)
            piece = b"\r\n" + piece
        checker.feed(piece)
        if checker.ok:  # once doomed, stop handing out content
            self._events.append(BodyData(piece))

    def _end_of_content(self, *, last: bool) -> None:
        """A DATA body or a BDAT chunk has been read completely."""
        checker = self._checker
        assert checker is not None
        self._verb, self._argument = ("BDAT", "") if self._bdat_used else ("DATA", "")
        if last:
            checker.finish()
        # Fixed priority, so the verdict never depends on chunk boundaries.
        if checker.bare_cr_lf:
            failure, reason = BARE_CR_LF_MESSAGE, "bare CR or LF in message"
        elif checker.nul:
            failure, reason = NUL_MESSAGE, "NUL in message"
        elif checker.line_too_long:
            failure, reason = TEXT_LINE_TOO_LONG, "line too long"
        elif checker.too_big:
            failure = Reply(
                552,
                "5.3.4",
                f"Message too big for system (maximum {self._config.max_message_size} octets)",
            )
            reason = "message too big"
        elif checker.too_many_hops:
            failure, reason = TOO_MANY_HOPS, "too many hops"
        elif last:
            envelope = self._envelope()
            self._clear_transaction()  # the caller now owns the message
            self._events.append(MessageComplete(envelope))
            self._state = _State.PAUSED
            return
        else:
            self._send(Reply(250, "2.0.0", f"{self._bdat_size} octets received"))
            return
        failure = self._counted(failure)  # (it may be the error that closes the session)
        self._report(failure)  # before the abort forgets the sender
        self._abort_transaction(reason)
        self._send(failure, count=False, report=False)

    # --- commands -----------------------------------------------------------

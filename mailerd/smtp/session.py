"""The server side of one SMTP connection as a pure state machine.

Bytes go in through ``receive_data()``; ``next_event()`` hands out what the
I/O layer must do: send a ``Reply``, store ``BodyData``, commit on
``MessageComplete`` (then call ``commit_done()``), discard on
``MessageAborted``, close on ``CloseConnection``.  There is no I/O and no
clock here: timeouts are reported by the caller through ``timeout()``.

Input is parsed lazily in ``next_event()``, which is what makes pipelining
and the PAUSED state simple: unparsed bytes just wait in the buffer.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from .data import BodyChecker, DataDecoder
from .events import (
    NEED_DATA,
    PAUSED,
    Address,
    BodyData,
    CloseConnection,
    Envelope,
    Event,
    MessageAborted,
    MessageComplete,
    Rejected,
    Reply,
)
from .grammar import (
    GrammarError,
    Param,
    decode_argument,
    is_helo_domain,
    parse_mail_from,
    parse_rcpt_to,
    split_command,
)

__all__ = ["Session", "SessionConfig"]


@dataclass(frozen=True)
class SessionConfig:
    """Per-listener settings; limits are in octets unless named otherwise."""

    hostname: str
    max_message_size: int = 26214400
    max_errors: int = 20
    max_recipients: int = 100
    max_command_line: int = 512  # including CRLF (RFC 5321 4.5.3.1.4)
    max_text_line: int = 1000  # including CRLF (RFC 5321 4.5.3.1.6)


class _State(enum.Enum):
    COMMAND = "command"
    DATA = "data"  # reading a dot-stuffed DATA body
    BDAT = "bdat"  # reading the octets of one BDAT chunk
    PAUSED = "paused"  # MessageComplete handed out, waiting for commit_done()
    CLOSED = "closed"


_CLOSE = CloseConnection()

# Replies that never change.  RFC 2034 section 4 exempts 3xx replies from
# enhanced codes, hence the 354 without one.
_MAIL_OK = Reply(250, "2.1.0", "Sender OK")
_RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
_START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
_OK = Reply(250, "2.0.0", "OK")
_RESET_OK = Reply(250, "2.0.0", "Reset OK")
_BYE = Reply(221, "2.0.0", "Bye", close=True)
_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
_HELP = Reply(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\n"
    "See RFC 5321 for their syntax",
)
_UNKNOWN_COMMAND = Reply(500, "5.5.2", "Syntax error, command unrecognized")
_BARE_CR_LF_COMMAND = Reply(500, "5.5.2", "Syntax error, bare CR or LF in command line")
_LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
_BAD_UTF8 = Reply(501, "5.5.2", "Syntax error, argument is not valid UTF-8")
_NEED_HELO = Reply(503, "5.5.1", "Bad sequence of commands: send EHLO or HELO first")
_NESTED_MAIL = Reply(503, "5.5.1", "Bad sequence of commands: sender already specified")
_NEED_MAIL = Reply(503, "5.5.1", "Bad sequence of commands: send MAIL first")
_DATA_AFTER_BDAT = Reply(503, "5.5.1", "Bad sequence of commands: DATA after BDAT")
_NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
_TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
_NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
# 550 rather than 501: the same answer the recipient policy gives for an
# unusable mailbox name, so probing with malformed names learns nothing new.
_BAD_RECIPIENT = Reply(550, "5.1.3", "Bad recipient address syntax")
_BAD_PARAMS = Reply(501, "5.5.4", "Syntax error in parameters")
_RCPT_PARAMS = Reply(555, "5.5.4", "RCPT TO parameters not recognized or not implemented")
_PARAMS_NEED_EHLO = Reply(555, "5.5.4", "MAIL FROM parameters need EHLO, not HELO")
_BDAT_NEEDS_EHLO = Reply(503, "5.5.1", "Bad sequence of commands: BDAT needs EHLO")
_MAIL_PARAMS = Reply(555, "5.5.4", "MAIL FROM parameters not recognized or not implemented")
_BAD_SIZE = Reply(501, "5.5.4", "SIZE requires a decimal number")
_BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
_BAD_SMTPUTF8 = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
_DUPLICATE_PARAM = Reply(501, "5.5.4", "Duplicate parameter")
_BARE_CR_LF_MESSAGE = Reply(
    550, "5.5.2", "Message rejected: bare CR or LF found, lines must end with CRLF"
)
_NUL_MESSAGE = Reply(550, "5.6.0", "Message rejected: NUL character found")
_TEXT_LINE_TOO_LONG = Reply(500, "5.5.6", "Message rejected: line too long")


def _syntax(usage: str, *, close: bool = False) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}", close=close)


_EHLO_SYNTAX = _syntax("EHLO hostname")
_HELO_SYNTAX = _syntax("HELO hostname")
_MAIL_SYNTAX = _syntax("MAIL FROM:<address> [parameters]")
_RCPT_SYNTAX = _syntax("RCPT TO:<address>")
_DATA_SYNTAX = _syntax("DATA")
_RSET_SYNTAX = _syntax("RSET")
_QUIT_SYNTAX = _syntax("QUIT")
_VRFY_SYNTAX = _syntax("VRFY address")
# Without a valid size the chunk cannot be skipped; reading its octets as
# commands would be command injection, so the connection is closed.
_BDAT_SYNTAX = _syntax("BDAT size [LAST], closing connection", close=True)

_BDAT_RE = re.compile(r"([0-9]{1,20})(?: (LAST))?", re.IGNORECASE)
_BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
# Known to SMTP but deliberately unsupported: 502 rather than 500.
# Commands whose refusals are mail refused: each one is reported as a Rejected event.
_MAIL_VERBS = frozenset({"MAIL", "RCPT", "DATA", "BDAT"})
_UNSUPPORTED_VERBS = frozenset(
    {"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML", "STARTTLS", "AUTH"}
)


@lru_cache(maxsize=16)
def _ehlo_reply(hostname: str, max_size: int) -> Reply:
    # RFC 5321 ehlo-ok-rsp: domain first, then one keyword per line, so no
    # enhanced status code here (RFC 2034 section 4 exempts EHLO replies).
    keywords = (
        f"{hostname} Hello",
        "PIPELINING",
        f"SIZE {max_size}",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
        "HELP",
    )
    return Reply(250, None, "\n".join(keywords))


@lru_cache(maxsize=16)
def _greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP mailerd")


@lru_cache(maxsize=16)
def _helo_reply(hostname: str) -> Reply:
    return Reply(250, None, f"{hostname} Hello")


def _is_ascii(address: Address) -> bool:
    return address.local.isascii() and address.domain.isascii()


class Session:
    """One SMTP server conversation; see the module docstring for the loop."""

    def __init__(
        self,
        config: SessionConfig,
        check_recipient: Callable[[Address], Reply | None],
        on_command: Callable[[bytes], None] | None = None,
    ) -> None:
        self._config = config
        self._check_recipient = check_recipient
        # Called with every command line (never message content), e.g. for -v logging.
        self._on_command = on_command
        self._events: deque[Event] = deque([_greeting(config.hostname)])
        self._state = _State.COMMAND
        # Unparsed input is self._buf[self._pos:] followed by self._pending.
        self._buf = b""
        self._pos = 0
        self._pending: list[bytes] = []
        self._eof = False
        self._discarding = False  # inside a command line that is too long
        self._errors = 0
        self._helo: str | None = None
        self._esmtp = False
        self._decoder: DataDecoder | None = None
        self._checker: BodyChecker | None = None
        self._bdat_remaining = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None  # reply for a chunk being skipped
        self._verb = ""  # the command being answered, and its argument (for Rejected)
        self._argument = ""
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
            if state is _State.PAUSED:
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
        # Storage errors are not the client's fault, and the caller, who holds the message,
        # reports them.
        self._send(reply, count=False, report=False)

    def timeout(self) -> Reply:
        """The peer was idle too long: return the 421 to send; the session ends."""
        reply = Reply(
            421,
            "4.4.2",
            f"{self._config.hostname} Timeout exceeded, closing connection",
            close=True,
        )
        if self._state is not _State.CLOSED:
            self._abort_transaction("timeout")
            self._close()
        return reply

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
        limit = self._config.max_command_line
        end = buf.find(b"\r\n", pos)
        if end < 0:
            if len(buf) - pos >= limit:
                # Already too long even if CRLF came next: drop what we have,
                # keeping a CR that may pair with a LF in the next chunk.
                self._discarding = True
                self._buf = b"\r" if buf.endswith(b"\r") else b""
                self._pos = 0
            return False
        self._pos = end + 2
        if self._discarding or end + 2 - pos > limit:
            self._discarding = False
            self._verb = self._argument = ""
            self._send(_LINE_TOO_LONG)
        else:
            self._handle_command(buf[pos:end])
        return True

    def _data_step(self) -> bool:
        data = self._take_input()
        if not data:
            return False
        decoder, checker = self._decoder, self._checker
        assert decoder is not None and checker is not None
        out = decoder.feed(data)
        if out:
            checker.feed(out)
            if checker.ok:  # once doomed, stop handing out content
                self._events.append(BodyData(out))
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
            checker = self._checker
            if self._bdat_refusal is None and checker is not None:
                checker.feed(data)
                if checker.ok:
                    self._events.append(BodyData(data))
            if self._bdat_remaining:
                return True
        self._state = _State.COMMAND
        if self._bdat_refusal is not None:
            refusal, self._bdat_refusal = self._bdat_refusal, None
            self._send(refusal)
        else:
            self._end_of_content(last=self._bdat_last)
        return True

    # --- replies and transaction state --------------------------------------

    def _send(self, reply: Reply, *, count: bool = True, report: bool = True) -> None:
        """Queue a reply, enforcing the error limit and closing replies; a refused mail
        command, or the end of a session for its errors, comes with a Rejected event."""
        if count:
            reply = self._counted(reply)
        if report and reply.code >= 400 and (self._verb in _MAIL_VERBS or reply.code == 421):
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

    def _end_of_content(self, *, last: bool) -> None:
        """A DATA body or a BDAT chunk has been read completely."""
        checker = self._checker
        assert checker is not None
        self._verb, self._argument = ("BDAT", "") if self._bdat_used else ("DATA", "")
        if last:
            checker.finish()
        # Fixed priority, so the verdict never depends on chunk boundaries.
        if checker.bare_cr_lf:
            failure, reason = _BARE_CR_LF_MESSAGE, "bare CR or LF in message"
        elif checker.nul:
            failure, reason = _NUL_MESSAGE, "NUL in message"
        elif checker.line_too_long:
            failure, reason = _TEXT_LINE_TOO_LONG, "line too long"
        elif checker.too_big:
            failure = Reply(
                552,
                "5.3.4",
                f"Message too big for system (maximum {self._config.max_message_size} octets)",
            )
            reason = "message too big"
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

    def _handle_command(self, line: bytes) -> None:
        self._verb = self._argument = ""
        if self._on_command is not None:
            self._on_command(line)
        if b"\r" in line or b"\n" in line:
            # Only CRLF ends a line; a bare CR/LF is never taken as a separator.
            self._send(_BARE_CR_LF_COMMAND)
            return
        try:
            verb, raw = split_command(line)
        except GrammarError:
            self._send(_UNKNOWN_COMMAND)
            return
        self._verb, self._argument = verb, ""
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._send(_NOT_IMPLEMENTED if verb in _UNSUPPORTED_VERBS else _UNKNOWN_COMMAND)
            return
        argument = None
        if raw is not None:
            try:
                argument = decode_argument(raw)
            except GrammarError:
                self._argument = raw.decode("utf-8", "backslashreplace")
                self._send(_BAD_UTF8)
                return
            self._argument = argument
        handler(self, argument)

    def _cmd_ehlo(self, argument: str | None) -> None:
        self._greet(argument, esmtp=True)

    def _cmd_helo(self, argument: str | None) -> None:
        self._greet(argument, esmtp=False)

    def _greet(self, argument: str | None, *, esmtp: bool) -> None:
        if argument is None or not is_helo_domain(argument):
            self._send(_EHLO_SYNTAX if esmtp else _HELO_SYNTAX)
            return
        self._abort_transaction("transaction reset by EHLO/HELO")
        self._helo = argument
        self._esmtp = esmtp
        config = self._config
        if esmtp:
            self._send(_ehlo_reply(config.hostname, config.max_message_size))
        else:
            self._send(_helo_reply(config.hostname))

    def _cmd_mail(self, argument: str | None) -> None:
        if self._helo is None:
            self._send(_NEED_HELO)
            return
        if self._in_mail:
            self._send(_NESTED_MAIL)
            return
        if argument is None:
            self._send(_MAIL_SYNTAX)
            return
        try:
            sender, params = parse_mail_from(argument)
        except GrammarError as exc:
            self._send(_grammar_reply(exc, _MAIL_SYNTAX, _BAD_SENDER))
            return
        if params and not self._esmtp:
            # RFC 1869 / 5321 4.1.1.11: parameters belong to extensions, offered only to EHLO.
            self._send(_PARAMS_NEED_EHLO)
            return
        options = _mail_options(params)
        if isinstance(options, Reply):
            self._send(options)
            return
        body, smtputf8, size = options
        if size is not None and size > self._config.max_message_size:
            self._send(
                Reply(
                    552,
                    "5.3.4",
                    f"Message size exceeds fixed maximum of {self._config.max_message_size} octets",
                )
            )
            return
        if sender is not None and not smtputf8 and not _is_ascii(sender):
            self._send(_NEED_SMTPUTF8)
            return
        self._in_mail = True
        self._sender = sender
        self._body_type = body
        self._smtputf8 = smtputf8
        self._declared_size = size
        self._send(_MAIL_OK)

    def _cmd_rcpt(self, argument: str | None) -> None:
        if not self._in_mail:
            self._send(_NEED_MAIL)
            return
        if argument is None:
            self._send(_RCPT_SYNTAX)
            return
        try:
            recipient, params = parse_rcpt_to(argument)
        except GrammarError as exc:
            self._send(_grammar_reply(exc, _RCPT_SYNTAX, _BAD_RECIPIENT))
            return
        if params:
            self._send(_RCPT_PARAMS)
            return
        if not self._smtputf8 and not _is_ascii(recipient):
            self._send(_NEED_SMTPUTF8)
            return
        if len(self._recipients) >= self._config.max_recipients:
            # Not an error: RFC 5321 4.5.3.1.10 expects the client to send the rest later, and
            # counting it would end a large pipelined transaction with 421.
            self._send(_TOO_MANY_RECIPIENTS, count=False)
            return
        refusal = self._check_recipient(recipient)
        if refusal is None:
            self._recipients.append(recipient)
            self._send(_RCPT_OK)
            return
        if refusal.code < 400:  # a custom positive answer (e.g. 251) still accepts
            self._recipients.append(recipient)
        self._send(refusal)

    def _cmd_data(self, argument: str | None) -> None:
        if argument is not None:
            self._send(_DATA_SYNTAX)
        elif not self._in_mail:
            self._send(_NEED_MAIL)
        elif self._bdat_used:
            self._send(_DATA_AFTER_BDAT)
        elif not self._recipients:
            self._send(_NO_RECIPIENTS)
        else:
            self._send(_START_DATA)
            self._start_content()
            self._decoder = DataDecoder()
            self._state = _State.DATA

    def _cmd_bdat(self, argument: str | None) -> None:
        match = _BDAT_RE.fullmatch(argument or "")
        if match is None:
            self._send(_BDAT_SYNTAX)
            return
        # The chunk is read even when refused: its octets must not be parsed
        # as commands (RFC 3030 section 3).
        refusal = None
        if not self._esmtp:
            refusal = _BDAT_NEEDS_EHLO  # CHUNKING is only offered in the EHLO reply
        elif not self._in_mail:
            refusal = _NEED_MAIL
        elif not self._recipients:
            refusal = _NO_RECIPIENTS
        elif not self._bdat_used:
            self._bdat_used = True
            self._start_content()
        self._bdat_refusal = refusal
        self._bdat_size = self._bdat_remaining = int(match.group(1))
        self._bdat_last = match.group(2) is not None
        self._state = _State.BDAT

    def _cmd_rset(self, argument: str | None) -> None:
        if argument is not None:
            self._send(_RSET_SYNTAX)
            return
        self._abort_transaction("transaction reset by RSET")
        self._send(_RESET_OK)

    def _cmd_noop(self, argument: str | None) -> None:
        self._send(_OK)

    def _cmd_quit(self, argument: str | None) -> None:
        self._send(_QUIT_SYNTAX if argument is not None else _BYE)

    def _cmd_vrfy(self, argument: str | None) -> None:
        self._send(_VRFY_SYNTAX if argument is None else _VRFY)

    def _cmd_help(self, argument: str | None) -> None:
        self._send(_HELP)


def _grammar_reply(exc: GrammarError, usage: Reply, bad_address: Reply) -> Reply:
    if exc.part == "address":
        return bad_address
    if exc.part == "params":
        return _BAD_PARAMS
    return usage


def _mail_options(params: list[Param]) -> tuple[str, bool, int | None] | Reply:
    """Validate MAIL parameters; return (body, smtputf8, size) or an error reply."""
    seen = {key for key, _ in params}
    if len(seen) != len(params):
        return _DUPLICATE_PARAM
    if not seen <= {"SIZE", "BODY", "SMTPUTF8"}:
        return _MAIL_PARAMS
    body, smtputf8, size = "7BIT", False, None
    for key, value in params:
        if key == "SIZE":
            if value is None or not value.isascii() or not value.isdigit():
                return _BAD_SIZE
            size = int(value)
        elif key == "BODY":
            body = (value or "").upper()
            if body not in _BODY_TYPES:
                return _BAD_BODY
        elif value is not None:  # SMTPUTF8
            return _BAD_SMTPUTF8
        else:
            smtputf8 = True
    return body, smtputf8, size


_HANDLERS: dict[str, Callable[[Session, str | None], None]] = {
    "EHLO": Session._cmd_ehlo,
    "HELO": Session._cmd_helo,
    "MAIL": Session._cmd_mail,
    "RCPT": Session._cmd_rcpt,
    "DATA": Session._cmd_data,
    "BDAT": Session._cmd_bdat,
    "RSET": Session._cmd_rset,
    "NOOP": Session._cmd_noop,
    "QUIT": Session._cmd_quit,
    "EXIT": Session._cmd_quit,  # alias required by the issue
    "VRFY": Session._cmd_vrfy,
    "HELP": Session._cmd_help,
}

"""What each SMTP command means: its syntax, its preconditions and its reply, given the
session's state. `Session` (the state machine that reads the input, in `session`) inherits
these handlers; everything that changes how input is read (DATA, BDAT, closing) goes back to
it through the methods declared below. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from . import auth
from .events import PENDING, Address, AuthRequest, RecipientVerdict, Reply
from .grammar import (
    GrammarError,
    Param,
    decode_argument,
    is_helo_domain,
    parse_mail_from,
    parse_rcpt_to,
    split_command,
)
from .replies import (
    AUTH_CANCELLED,
    AUTH_FIRST,
    AUTH_IN_MAIL,
    AUTH_MECHANISM,
    AUTH_NEEDS_EHLO,
    AUTH_NEEDS_TLS,
    AUTH_SYNTAX,
    AUTH_TWICE,
    AUTH_UNDECODABLE,
    BAD_BODY,
    BAD_PARAMS,
    BAD_RECIPIENT,
    BAD_SENDER,
    BAD_SIZE,
    BAD_SMTPUTF8,
    BAD_UTF8,
    BARE_CR_LF_COMMAND,
    BDAT_NEEDS_EHLO,
    BDAT_SYNTAX,
    BYE,
    DATA_AFTER_BDAT,
    DATA_SYNTAX,
    DUPLICATE_PARAM,
    EHLO_SYNTAX,
    HELO_SYNTAX,
    HELP,
    MAIL_OK,
    MAIL_PARAMS,
    MAIL_SYNTAX,
    NEED_HELO,
    NEED_MAIL,
    NEED_SMTPUTF8,
    NESTED_MAIL,
    NO_RECIPIENTS,
    NOT_IMPLEMENTED,
    OK,
    PARAMS_NEED_EHLO,
    QUIT_SYNTAX,
    RCPT_AFTER_BDAT,
    RCPT_OK,
    RCPT_PARAMS,
    RCPT_SYNTAX,
    READY_FOR_TLS,
    RESET_OK,
    RSET_SYNTAX,
    START_DATA,
    STARTTLS_SYNTAX,
    TLS_ACTIVE,
    TLS_FIRST,
    TLS_IN_MAIL,
    TOO_MANY_RECIPIENTS,
    UNKNOWN_COMMAND,
    VRFY,
    VRFY_SYNTAX,
    ehlo_reply,
    helo_reply,
)
from .settings import SessionConfig

_BDAT_RE = re.compile(r"([0-9]{1,20})(?: (LAST))?", re.IGNORECASE)
_BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
# Known to SMTP but deliberately unsupported: 502 rather than 500.
_UNSUPPORTED_VERBS = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "SEND", "SOML", "SAML"})
# Commands whose handler takes an argument that is no UTF-8 (backslash-escaped) rather than
# the 501 of others: NOOP and HELP ignore it (RFC 5321 4.1.1.9: NOOP's "SHOULD be ignored";
# HELP's reply is the same for any topic); BDAT refuses it and closes, since the chunk behind
# it cannot be skipped and must not be read as commands.
_ANY_ARGUMENT = frozenset({"NOOP", "HELP", "BDAT"})
# Deferrals (`Commands._defer`) a session may have before they are errors, in --max-recipients:
# the user's outbox of that many messages sent in one session, a peer's queue for us while a
# mailbox or the disk is broken.
DEFERRALS_PER_SESSION = 10


def _unreadable_bdat(line: bytes) -> bool:
    """Is the line a BDAT command that `split_command` would not read as one: the verb
    followed by white space other than SP, or with a bare CR or LF in it?"""
    if line[:4].upper() != b"BDAT" or line[4:5].isalpha():
        return False
    return line[4:5] in (b"\t", b"\v", b"\f") or b"\r" in line or b"\n" in line


class Commands:
    """The command handlers of `session.Session` (a mixin: the state lives there)."""

    _config: SessionConfig
    _check_recipient: Callable[[Address], RecipientVerdict]
    _check_mail: Callable[[Address | None, int | None, str | None], Reply | None] | None
    _on_command: Callable[[bytes], None] | None
    _helo: str | None
    _esmtp: bool
    _in_mail: bool
    _sender: Address | None
    _recipients: list[Address]
    _overshoot: int
    _deferred: int
    _session_deferred: int
    _excused_no_recipients: bool
    _body_type: str
    _smtputf8: bool
    _declared_size: int | None
    _bdat_used: bool
    _verb: str
    _argument: str
    _tls: bool
    _user: str | None
    _sasl: tuple[str, str | None] | None  # an AUTH exchange: (mechanism, login so far)
    _unlogged: int  # lines after a refused or broken-off AUTH kept out of the -v log

    # -- provided by Session ------------------------------------------------------------------

    def _send(
        self, reply: Reply, *, count: bool = True, report: bool = True, logged: bool = False
    ) -> None:
        raise NotImplementedError

    def _abort_transaction(self, reason: str) -> None:
        raise NotImplementedError

    def _start_content(self) -> None:
        raise NotImplementedError

    def _read_data(self) -> None:
        raise NotImplementedError

    def _read_chunk(self, size: int, last: bool, refusal: Reply | None) -> None:
        raise NotImplementedError

    def _wait_for_verdict(self, recipient: Address) -> None:
        raise NotImplementedError

    def _start_tls(self) -> None:
        raise NotImplementedError

    def _wait_for_auth(self, request: AuthRequest) -> None:
        raise NotImplementedError

    # -- the commands -------------------------------------------------------------------------

    def _handle_command(self, line: bytes) -> None:
        if self._sasl is not None:
            self._auth_response(line)
            return
        self._verb = self._argument = ""
        hidden = self._hidden(line)
        if self._on_command is not None:
            self._on_command(_HIDDEN_LINE if hidden else _masked(line))
        if is_auth_line(line):
            # Until the exchange starts (`_cmd_auth`): the lines after an AUTH that is refused,
            # before its handler runs too (a bare CR, bytes that are not UTF-8: a second pass),
            # may be its user name and password.
            self._unlogged = 2
        if _unreadable_bdat(line):
            # A BDAT whose words are not SP-separated (a TAB: Postfix splits on any white
            # space and reads the chunk) or that a bare CR/LF cuts: its chunk cannot be skipped
            # and must not be read as commands (an attacker's pass: `BDAT<TAB>5`'s octets were).
            self._verb, self._argument = "BDAT", ""
            self._send(BDAT_SYNTAX)
            return
        if b"\r" in line or b"\n" in line:
            # Only CRLF ends a line; a bare CR/LF is never taken as a separator.
            self._send(BARE_CR_LF_COMMAND)
            return
        try:
            verb, raw = split_command(line)
        except GrammarError:
            self._send(UNKNOWN_COMMAND)
            return
        # (A hidden line's first word may be a password: never in a log line either, as the
        # refusal of the line that ends the session for its errors is; an attacker's pass.)
        self._verb, self._argument = ("***" if hidden else verb), ""
        handler = HANDLERS.get(verb)
        if handler is None:
            self._send(NOT_IMPLEMENTED if verb in _UNSUPPORTED_VERBS else UNKNOWN_COMMAND)
            return
        argument = None
        if raw is not None:
            try:
                argument = decode_argument(raw)
            except GrammarError:
                argument = raw.decode("utf-8", "backslashreplace")
                if verb not in _ANY_ARGUMENT:
                    self._argument = argument if verb != "AUTH" else "***"  # (a password)
                    self._send(BAD_UTF8)
                    return
            self._argument = argument
        handler(self, argument)

    def _cmd_ehlo(self, argument: str | None) -> None:
        self._greet(argument, esmtp=True)

    def _cmd_helo(self, argument: str | None) -> None:
        self._greet(argument, esmtp=False)

    def _greet(self, argument: str | None, *, esmtp: bool) -> None:
        if argument is None or not is_helo_domain(argument):
            self._send(EHLO_SYNTAX if esmtp else HELO_SYNTAX)
            return
        self._abort_transaction("transaction reset by EHLO/HELO")
        self._helo = argument
        self._esmtp = esmtp
        config = self._config
        if esmtp:
            starttls = config.starttls and not self._tls
            offer_auth = config.auth and (self._tls or config.auth_in_clear)
            self._send(ehlo_reply(config.hostname, config.max_message_size, starttls, offer_auth))
        else:
            self._send(helo_reply(config.hostname))

    def _cmd_mail(self, argument: str | None) -> None:
        if self._helo is None:
            self._send(NEED_HELO)
            return
        if self._in_mail:
            self._send(NESTED_MAIL)
            return
        if self._config.tls_required and not self._tls:
            self._send(TLS_FIRST)
            return
        if self._config.auth_required and self._user is None:
            self._send(AUTH_FIRST)
            return
        if argument is None:
            self._send(MAIL_SYNTAX)
            return
        try:
            sender, params = parse_mail_from(argument, self._config.qualify_domain)
        except GrammarError as exc:
            self._send(_grammar_reply(exc, MAIL_SYNTAX, BAD_SENDER))
            return
        if params and not self._esmtp:
            # RFC 1869 / 5321 4.1.1.11: parameters belong to extensions, offered only to EHLO.
            self._send(PARAMS_NEED_EHLO)
            return
        options = _mail_options(params, auth_param=self._config.auth)
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
            self._send(NEED_SMTPUTF8)
            return
        if self._check_mail is not None:
            refusal = self._check_mail(sender, size, self._user)
            if refusal is not None:
                self._send_verdict(refusal)
                return
        self._in_mail = True
        self._sender = sender
        self._body_type = body
        self._smtputf8 = smtputf8
        self._declared_size = size
        self._send(MAIL_OK)

    def _cmd_rcpt(self, argument: str | None) -> None:
        if not self._in_mail:
            self._send(NEED_MAIL)
            return
        if self._bdat_used:  # (RFC 3030 3: MAIL, RCPTs, then the chunks; nothing between)
            self._send(RCPT_AFTER_BDAT)
            return
        if argument is None:
            self._send(RCPT_SYNTAX)
            return
        try:
            recipient, params = parse_rcpt_to(argument, self._config.qualify_domain)
        except GrammarError as exc:
            self._send(_grammar_reply(exc, RCPT_SYNTAX, BAD_RECIPIENT))
            return
        if params:
            self._send(RCPT_PARAMS)
            return
        if not self._smtputf8 and not _is_ascii(recipient):
            self._send(NEED_SMTPUTF8)
            return
        if len(self._recipients) >= self._config.max_recipients:
            self._too_many_recipients()
            return
        verdict = self._check_recipient(recipient)
        if verdict is PENDING:  # the I/O layer answers later: the session waits for it
            self._wait_for_verdict(recipient)
            return
        self._recipient_verdict(recipient, verdict)

    def _too_many_recipients(self) -> None:
        """452 to a RCPT past the limit. Not an error for as many again (RFC 5321 4.5.3.1.10
        expects the client to send the rest later, and counting them would end a large
        pipelined transaction with 421), and said in the log once a transaction; past that,
        each is an error, as Postfix's smtpd_recipient_overshoot_limit counts them: a client
        repeating RCPT for ever wrote a log line each, 20 MB a second from one connection (an
        attacker's pass, /tmp/atk7a F2)."""
        self._overshoot += 1
        beyond = self._overshoot > self._config.max_recipients
        self._send(TOO_MANY_RECIPIENTS, count=beyond, report=beyond or self._overshoot == 1)

    def _recipient_verdict(self, recipient: Address, refusal: Reply | None) -> None:
        if refusal is None:
            self._recipients.append(recipient)
            self._send(RCPT_OK)
            return
        if refusal.code < 400:  # a custom positive answer (e.g. 251) still accepts
            self._recipients.append(recipient)
        self._send_verdict(refusal)

    def _send_verdict(self, refusal: Reply) -> None:
        """Send a refusal of the caller's checks (`check_mail`, `check_recipient`). A
        temporary one is no fault of the client's but a deferral (`_defer`): a mailbox that
        cannot be written or checked now, a disk that is full or failed, less free space than
        --min-free, the account's daily limit. A 5xx (an unknown user, relaying, a sender not
        the user's) is the client's error."""
        if 400 <= refusal.code < 500:
            self._defer(refusal)
        else:
            self._send(refusal)

    def _defer(self, reply: Reply) -> None:
        """A deferral: a temporary refusal that is our doing. Not an error within the
        allowances (`_deferral_excused`): counted, a peer delivering one message to 25 local
        users whose mailboxes cannot be checked now, or the user's mail program sending its
        outbox past the daily limit, would end with 421 "Too many errors", which fail2ban bans
        for (an attacker's pass had it after three messages of 45). Said in the log once a
        session, its first: a client repeating them wrote a line each, 3.4 MB a second
        (another pass), and once a transaction still let MAIL, RCPT, RSET repeated write a
        thousand lines a session, 1.6 MB a second over sessions, without the 421 (a third).
        Their causes are logged besides: a mailbox's problem and a shortage of space once a
        minute, the daily limit once a window. Past an allowance each is an error again, and
        logged, so that repeating them ends the session."""
        excused = self._deferral_excused()
        first = self._session_deferred == 1
        self._send(reply, count=not excused, report=not excused or first)

    def _deferral_excused(self) -> bool:
        """Count a deferral (`_defer`; at the end of the data, `Session.commit_done`): is it
        within the transaction's --max-recipients and the session's DEFERRALS_PER_SESSION
        times as many?"""
        if self._in_mail:
            self._deferred += 1
        self._session_deferred += 1
        return self._within_allowances()

    def _within_allowances(self) -> bool:
        most = self._config.max_recipients
        return self._deferred <= most and self._session_deferred <= DEFERRALS_PER_SESSION * most

    def _no_recipients_excused(self) -> bool:
        """Is this DATA's (or BDAT's) "no valid recipients" no error (nor logged: its
        deferrals were)? The first of a transaction whose recipients were deferred within the
        allowances is not; a second one is (an attacker's pass: DATA repeated after one
        deferral wrote a log line each, for ever)."""
        first = not self._excused_no_recipients
        self._excused_no_recipients = True
        return first and self._deferred > 0 and self._within_allowances()

    def _cmd_data(self, argument: str | None) -> None:
        if argument is not None:
            self._send(DATA_SYNTAX)
        elif not self._in_mail:
            self._send(NEED_MAIL)
        elif self._bdat_used:
            self._send(DATA_AFTER_BDAT)
        elif not self._recipients:
            excused = self._no_recipients_excused()
            self._send(NO_RECIPIENTS, count=not excused, report=not excused)
        else:
            self._send(START_DATA)
            self._start_content()
            self._read_data()

    def _cmd_bdat(self, argument: str | None) -> None:
        match = _BDAT_RE.fullmatch(argument or "")
        if match is None:
            self._send(BDAT_SYNTAX)
            return
        # The chunk is read even when refused: its octets must not be parsed
        # as commands (RFC 3030 section 3).
        refusal = None
        if not self._esmtp:
            refusal = BDAT_NEEDS_EHLO  # CHUNKING is only offered in the EHLO reply
        elif not self._in_mail:
            refusal = NEED_MAIL
        elif not self._recipients:
            refusal = NO_RECIPIENTS
        elif not self._bdat_used:
            self._bdat_used = True
            self._start_content()
        self._read_chunk(int(match.group(1)), match.group(2) is not None, refusal)

    def _cmd_rset(self, argument: str | None) -> None:
        if argument is not None:
            self._send(RSET_SYNTAX)
            return
        self._abort_transaction("transaction reset by RSET")
        self._send(RESET_OK)

    def _cmd_noop(self, argument: str | None) -> None:
        self._send(OK)

    def _cmd_quit(self, argument: str | None) -> None:
        self._send(QUIT_SYNTAX if argument is not None else BYE)

    def _cmd_vrfy(self, argument: str | None) -> None:
        self._send(VRFY_SYNTAX if argument is None else VRFY)

    def _cmd_help(self, argument: str | None) -> None:
        self._send(HELP)

    def _cmd_starttls(self, argument: str | None) -> None:
        config = self._config
        if not (config.starttls or config.implicit_tls):
            self._send(NOT_IMPLEMENTED)
        elif argument is not None:
            self._send(STARTTLS_SYNTAX)
        elif self._tls:
            self._send(TLS_ACTIVE)
        elif self._in_mail:
            self._send(TLS_IN_MAIL)
        else:
            self._send(READY_FOR_TLS)
            self._start_tls()

    def _hidden(self, line: bytes) -> bool:
        """Is this one of the lines a client pipelined after an AUTH that was refused or
        broken off (its user name and password, taken for commands)? Those are left out of
        the -v log, and their words out of every log line, until a line that starts with a
        command. (AUTH's initial response is masked in any line: `_masked`.)"""
        if not self._unlogged:
            return False
        verb = line.split(None, 1)[:1]
        if verb and verb[0].upper().decode("ascii", "replace") in HANDLERS:
            self._unlogged = 0
            return False
        self._unlogged -= 1
        return True

    def _cmd_auth(self, argument: str | None) -> None:
        config = self._config
        mechanism, _, initial = (argument or "").partition(" ")
        self._argument = _logged_mechanism(mechanism)  # never a response: it holds a password
        if not config.auth:
            self._send(NOT_IMPLEMENTED)
        elif not mechanism:
            self._send(AUTH_SYNTAX)
        elif not self._esmtp:
            self._send(AUTH_NEEDS_EHLO)
        elif self._user is not None:
            self._send(AUTH_TWICE)
        elif self._in_mail:
            self._send(AUTH_IN_MAIL)
        elif not (self._tls or config.auth_in_clear):
            # Logged (a Rejected event), unlike the other refusals of AUTH's form: a mail
            # program set to send its password in clear is what its owner must hear of (an
            # acceptance tester's finding: nothing was logged).
            self._send(AUTH_NEEDS_TLS, logged=True)
        elif mechanism.upper() not in auth.MECHANISMS:
            self._send(AUTH_MECHANISM)
        else:
            self._unlogged = 0
            self._sasl = (mechanism.upper(), None)
            if initial:
                self._sasl_answer(initial)
            else:
                self._send(auth.first_challenge(mechanism.upper()))

    def _auth_response(self, line: bytes) -> None:
        """A line of an AUTH exchange: a base64 answer to our 334, or `*` to give up."""
        if self._on_command is not None:
            self._on_command(b"*** (an AUTH response, not logged)")
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self._sasl = None
            self._unlogged = 1  # (as in _sasl_answer: LOGIN's password may follow)
            self._send(AUTH_UNDECODABLE)
            return
        if text.strip() == auth.CANCEL:
            self._sasl = None
            self._send(AUTH_CANCELLED)
            return
        self._sasl_answer(text)

    def _sasl_answer(self, text: str) -> None:
        """The client's answer (an initial response or a line after 334): the next prompt, or
        the request to check the password."""
        assert self._sasl is not None
        mechanism, login = self._sasl
        authzid = ""
        try:
            if mechanism == "PLAIN":
                authzid, login, password = auth.plain(text)
            elif login is None:  # LOGIN, the user name
                self._sasl = (mechanism, auth.decode(text))
                self._send(auth.PASSWORD_CHALLENGE)
                return
            else:  # LOGIN, the password
                password = auth.decode(text)
        except auth.SASLError:
            self._sasl = None
            self._unlogged = 1  # (LOGIN's password may follow a user name that did not decode)
            self._send(AUTH_UNDECODABLE)
            return
        self._sasl = None
        self._wait_for_auth(AuthRequest(mechanism, login, password, authzid))


def _grammar_reply(exc: GrammarError, usage: Reply, bad_address: Reply) -> Reply:
    if exc.part == "address":
        return bad_address
    if exc.part == "params":
        return BAD_PARAMS
    return usage


def _mail_options(
    params: list[Param], *, auth_param: bool = False
) -> tuple[str, bool, int | None] | Reply:
    """Validate MAIL parameters; return (body, smtputf8, size) or an error reply. With
    `auth_param` (AUTH is offered), AUTH= is taken and ignored (RFC 4954 5: a relaying
    client's claim of the original submitter, which we do not pass on)."""
    seen = {key for key, _ in params}
    if len(seen) != len(params):
        return DUPLICATE_PARAM
    if not seen <= ({"SIZE", "BODY", "SMTPUTF8", "AUTH"} if auth_param else _MAIL_PARAMS):
        return MAIL_PARAMS
    body, smtputf8, size = "7BIT", False, None
    for key, value in params:
        if key == "AUTH":
            continue
        if key == "SIZE":
            if value is None or not value.isascii() or not value.isdigit():
                return BAD_SIZE
            size = int(value)
        elif key == "BODY":
            body = (value or "").upper()
            if body not in _BODY_TYPES:
                return BAD_BODY
        elif value is not None:  # SMTPUTF8
            return BAD_SMTPUTF8
        else:
            smtputf8 = True
    return body, smtputf8, size


_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8"})


# The SASL mechanisms a log line may name (IANA's registry, those in use). Anything else after
# AUTH may be a response written without its space, a password in it (a reviewer's finding: the
# first 20 characters were logged as the mechanism, upper-cased in the refusal's line).
_LOGGED_MECHANISMS = frozenset(
    {
        *("PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "XOAUTH2", "OAUTHBEARER", "GSSAPI"),
        *("SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"),
        *("NTLM", "EXTERNAL", "ANONYMOUS"),
    }
)


def _logged_mechanism(name: str) -> str:
    """What a log line shows of a mechanism's name: the name if a known one, else ***."""
    upper = name.upper()
    return upper if upper in _LOGGED_MECHANISMS else "***"


_HIDDEN_LINE = b"*** (a line after a refused AUTH, not logged)"
# AUTH behind anything but letters and digits (white space, a NUL, an escape, a no-break
# space): a line a log line must read as AUTH's (an attacker's pass).
_AUTH_START = re.compile(rb"[^A-Za-z0-9]*(?=AUTH)", re.IGNORECASE)


def is_auth_line(line: bytes) -> bool:
    """Does a log line have to read this line (or its start) as AUTH's (`_AUTH_START`)?"""
    return _AUTH_START.match(line[:64]) is not None


def _masked(line: bytes) -> bytes:
    """A command line without what may follow AUTH's mechanism (an initial response holds a
    password), however the client separated them (a tab, a bare CR, white space or other
    bytes before AUTH, none after the mechanism)."""
    start = _AUTH_START.match(line)
    if start is None:
        return line
    stripped = line[start.end() :]
    words = stripped[4:].split(None, 1)
    if not words:
        return b"AUTH"
    shown = _logged_mechanism(words[0].decode("ascii", "replace"))
    if shown == "***" or not stripped[4:5].isspace():
        return b"AUTH ***"
    return b"AUTH " + shown.encode() + (b" ***" if len(words) > 1 else b"")


def _is_ascii(address: Address) -> bool:
    return address.local.isascii() and address.domain.isascii()


HANDLERS: dict[str, Callable[[Commands, str | None], None]] = {
    "EHLO": Commands._cmd_ehlo,
    "HELO": Commands._cmd_helo,
    "MAIL": Commands._cmd_mail,
    "RCPT": Commands._cmd_rcpt,
    "DATA": Commands._cmd_data,
    "BDAT": Commands._cmd_bdat,
    "RSET": Commands._cmd_rset,
    "NOOP": Commands._cmd_noop,
    "QUIT": Commands._cmd_quit,
    "EXIT": Commands._cmd_quit,  # alias required by the issue
    "VRFY": Commands._cmd_vrfy,
    "HELP": Commands._cmd_help,
    "STARTTLS": Commands._cmd_starttls,
    "AUTH": Commands._cmd_auth,
}

"""The server's replies that never change (and the few built once per host name): every
one in one place, so the wording and the codes can be read and checked together. Pure.
RFC 2034 section 4 exempts 3xx replies, the greeting and the EHLO reply from enhanced codes."""

from __future__ import annotations

from functools import lru_cache

from .auth import MECHANISMS
from .events import Reply

MAIL_OK = Reply(250, "2.1.0", "Sender OK")
RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
OK = Reply(250, "2.0.0", "OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
BYE = Reply(221, "2.0.0", "Bye", close=True)
VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\n"
    "See RFC 5321 for their syntax",
)
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Syntax error, command unrecognized")
BARE_CR_LF_COMMAND = Reply(500, "5.5.2", "Syntax error, bare CR or LF in command line")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_UTF8 = Reply(501, "5.5.2", "Syntax error, argument is not valid UTF-8")
NEED_HELO = Reply(503, "5.5.1", "Bad sequence of commands: send EHLO or HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Bad sequence of commands: sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Bad sequence of commands: send MAIL first")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Bad sequence of commands: DATA after BDAT")
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Bad sequence of commands: RCPT after BDAT")
NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
# An authenticated account's recipients at other domains over --max-recipients-per-day
# (`worker.sendlimit`): temporary, since it lifts as the oldest leave the 24-hour window. 450,
# RFC 5321's "temporarily blocked for policy reasons", and 4.7.1, RFC 3463's policy refusal;
# not 4.5.3, whose client splits the message and sends the rest at once.
SEND_LIMIT = Reply(
    450,
    "4.7.1",
    "Recipient deferred: daily limit of recipients at other domains reached, try again later",
)
# ... and a message whose remote recipients would pass it, at the end of its data (other
# sessions of the account's may have sent since its RCPTs were answered).
SEND_LIMIT_DATA = Reply(
    450,
    "4.7.1",
    "Message deferred: daily limit of recipients at other domains reached, try again later",
)
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
# 550 rather than 501: the same answer the recipient policy gives for an
# unusable mailbox name, so probing with malformed names learns nothing new.
BAD_RECIPIENT = Reply(550, "5.1.3", "Bad recipient address syntax")
BAD_PARAMS = Reply(501, "5.5.4", "Syntax error in parameters")
RCPT_PARAMS = Reply(555, "5.5.4", "RCPT TO parameters not recognized or not implemented")
PARAMS_NEED_EHLO = Reply(555, "5.5.4", "MAIL FROM parameters need EHLO, not HELO")
BDAT_NEEDS_EHLO = Reply(503, "5.5.1", "Bad sequence of commands: BDAT needs EHLO")
MAIL_PARAMS = Reply(555, "5.5.4", "MAIL FROM parameters not recognized or not implemented")
BAD_SIZE = Reply(501, "5.5.4", "SIZE requires a decimal number")
BAD_BODY = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
BAD_SMTPUTF8 = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
DUPLICATE_PARAM = Reply(501, "5.5.4", "Duplicate parameter")
BARE_CR_LF_MESSAGE = Reply(
    550, "5.5.2", "Message rejected: bare CR or LF found, lines must end with CRLF"
)
NUL_MESSAGE = Reply(550, "5.6.0", "Message rejected: NUL character found")
TEXT_LINE_TOO_LONG = Reply(500, "5.5.6", "Message rejected: line too long")
# More than data.MAX_HOPS Received: fields: a mail loop (Postfix's code and words).
TOO_MANY_HOPS = Reply(554, "5.4.0", "Too many hops")

# TLS (RFC 3207) and AUTH (RFC 4954; 538 and 5.7.11 from RFC 4954 6, 530 from RFC 3207 4)
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE = Reply(503, "5.5.1", "Bad sequence of commands: TLS already active")
TLS_IN_MAIL = Reply(503, "5.5.1", "Bad sequence of commands: STARTTLS during a mail transaction")
TLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_FIRST = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_NEEDS_EHLO = Reply(503, "5.5.1", "Bad sequence of commands: send EHLO first")
AUTH_TWICE = Reply(503, "5.5.1", "Bad sequence of commands: already authenticated")
AUTH_IN_MAIL = Reply(503, "5.5.1", "Bad sequence of commands: AUTH during a mail transaction")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_UNDECODABLE = Reply(501, "5.5.2", "Cannot decode the authentication response")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure, try again later")


def syntax(usage: str, *, close: bool = False) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}", close=close)


EHLO_SYNTAX = syntax("EHLO hostname")
HELO_SYNTAX = syntax("HELO hostname")
MAIL_SYNTAX = syntax("MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = syntax("RCPT TO:<address>")
DATA_SYNTAX = syntax("DATA")
RSET_SYNTAX = syntax("RSET")
QUIT_SYNTAX = syntax("QUIT")
VRFY_SYNTAX = syntax("VRFY address")
STARTTLS_SYNTAX = syntax("STARTTLS")
AUTH_SYNTAX = syntax("AUTH mechanism [initial-response]")
# Without a valid size the chunk cannot be skipped; reading its octets as
# commands would be command injection, so the connection is closed: with 521,
# as Postfix does, since only 421 and 521 may close it (RFC 5321 3.8, RFC 7504).
BDAT_SYNTAX = Reply(521, "5.5.4", "Syntax: BDAT size [LAST], closing connection", close=True)


@lru_cache(maxsize=64)
def ehlo_reply(hostname: str, max_size: int, starttls: bool = False, auth: bool = False) -> Reply:
    # RFC 5321 ehlo-ok-rsp: domain first, then one keyword per line, so no
    # enhanced status code here (RFC 2034 section 4 exempts EHLO replies).
    keywords = [
        f"{hostname} Hello",
        "PIPELINING",
        f"SIZE {max_size}",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "CHUNKING",
    ]
    if starttls:
        keywords.append("STARTTLS")
    if auth:
        keywords.append("AUTH " + " ".join(MECHANISMS))
    keywords.append("HELP")
    return Reply(250, None, "\n".join(keywords))


@lru_cache(maxsize=16)
def too_many_auth_failures(hostname: str) -> Reply:
    return Reply(
        421, "4.7.0", f"{hostname} Too many failed authentications, closing connection", close=True
    )


@lru_cache(maxsize=16)
def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP mailerd")


@lru_cache(maxsize=16)
def helo_reply(hostname: str) -> Reply:
    return Reply(250, None, f"{hostname} Hello")

"""RFC 5321 syntax (with the RFC 6531 SMTPUTF8 extensions) as pure functions.

Splits command lines into verb and argument, parses MAIL/RCPT paths into
``Address`` values, validates EHLO domains and address literals, and splits
ESMTP parameters.  Nothing here knows about session state: policy (for
example "non-ASCII needs SMTPUTF8") is the session's job, so the patterns
accept UTF-8 wherever RFC 6531 allows it.
"""

from __future__ import annotations

import ipaddress
import re

from .events import Address

__all__ = [
    "GrammarError",
    "Param",
    "decode_argument",
    "format_local_part",
    "is_address_literal",
    "is_helo_domain",
    "parse_address",
    "parse_mail_from",
    "parse_params",
    "parse_rcpt_to",
    "split_command",
]

Param = tuple[str, str | None]


class GrammarError(ValueError):
    """The input does not match the grammar.

    ``part`` names what was wrong so the session can pick the reply:
    "verb", "utf8", "command" (e.g. missing "FROM:"), "address", "params".
    """

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


# --- character classes (RFC 5321 4.1.2, extended by RFC 6531 3.3) -----------
# UTF8-non-ascii: after decoding, any code point above U+007F, except what no name needs and
# what makes a terminal or a viewer show something else than the text (RFC 6530 10.1: a
# remote client's address reaches the log and `mailerd queue`; an attacker's pass, /tmp/atk7b
# F2, cleared the administrator's screen with U+009B, CSI, and reversed a name with U+202E):
# the C1 controls (U+0080-009F), the bidirectional marks, embeddings, overrides and isolates
# (U+061C, U+200E-200F, U+202A-202E, U+2066-2069), the line and paragraph separators
# (U+2028-2029) and the byte order mark (U+FEFF). (Zero-width joiners, U+200C-200D, stay:
# some scripts' names need them.)
_NON_ASCII = "\u00a0-\u061b\u061d-\u200d\u2010-\u2027\u202f-\u2065\u206a-\ufefe\uff00-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-" + _NON_ASCII
_ATOM = "[" + _ATEXT + "]+"
_DOT_STRING = _ATOM + r"(?:\." + _ATOM + ")*"
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e' + _NON_ASCII + r"]|\\[\x20-\x7e])*" + '"'
_LET_DIG = "[A-Za-z0-9" + _NON_ASCII + "]"
_LDH = "[A-Za-z0-9" + _NON_ASCII + "-]"
_SUB_DOMAIN = _LET_DIG + "(?:" + _LDH + "*" + _LET_DIG + ")?"
_DOMAIN = _SUB_DOMAIN + r"(?:\." + _SUB_DOMAIN + ")*"
# dcontent is %d33-90 / %d94-126; the content is validated separately.
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_ADL = "@" + _DOMAIN + "(?:,@" + _DOMAIN + ")*:"
# What a path takes beyond the RFC's grammar, as Postfix does (strict_rfc821_envelopes = no):
# dots anywhere in a local part (NTT docomo and au gave out addresses like foo..bar@ and
# foo.@ for years, and their owners still write from and to them), an underscore inside a
# domain label (names that are not host names), and one dot ending the domain (dropped). Each is an
# address the strict grammar refuses with 501 or 553, losing the message for good, while it
# means no other mailbox than the one intended: a local part of atext and dots can be written
# as a quoted string already, and is written so when mailerd sends it on (format_local_part).
_LAX_DOT_STRING = r"\.*[" + _ATEXT + "][" + _ATEXT + ".]*"
_LAX_SUB_DOMAIN = _LET_DIG + "(?:[A-Za-z0-9_" + _NON_ASCII + "-]*" + _LET_DIG + ")?"
_LAX_DOMAIN = _LAX_SUB_DOMAIN + r"(?:\." + _LAX_SUB_DOMAIN + ")*"

_PATH_RE = re.compile(
    "<(?:" + _ADL + ")?"  # source route: accepted and ignored (RFC 5321 C)
    "(?P<local>" + _LAX_DOT_STRING + "|" + _QUOTED + ")"
    "@(?P<domain>" + _LAX_DOMAIN + r"(?=\.?>)|" + _ADDRESS_LITERAL + r"(?=>))\.?>"
)
_POSTMASTER_RE = re.compile("<(postmaster)>", re.IGNORECASE)
# A path without a domain (`<root>`): the RFC's grammar has none but <Postmaster>; what a local
# program gives (Python's smtplib.sendmail("root", ["root"], ...), a cron script, a monitoring
# tool), qualified where the session is told to (SessionConfig.qualify_domain).
_BARE_PATH_RE = re.compile("<(?P<local>" + _LAX_DOT_STRING + "|" + _QUOTED + ")>")
_DOT_STRING_RE = re.compile(_DOT_STRING)
_QUOTED_PAIR_RE = re.compile(r"\\(.)")
_FROM_RE = re.compile("FROM: ?", re.IGNORECASE)
_TO_RE = re.compile("TO: ?", re.IGNORECASE)
_PARAM_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e" + _NON_ASCII + "]+))?")
_IPV4_RE = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
# EHLO/HELO is more lenient than mail domains: underscores (Windows host
# names) and a trailing root dot are common in the wild and harmless here.
_HELO_LABEL = "[A-Za-z0-9_" + _NON_ASCII + "](?:[A-Za-z0-9_" + _NON_ASCII + "-]*"
_HELO_LABEL += "[A-Za-z0-9_" + _NON_ASCII + "])?"
_HELO_DOMAIN_RE = re.compile(_HELO_LABEL + r"(?:\." + _HELO_LABEL + r")*\.?")


def split_command(line: bytes) -> tuple[str, bytes | None]:
    """Split a command line (without CRLF) into the upper-case verb and raw argument.

    The argument is None when there is none.  Trailing blanks are ignored
    because some clients send them and they never carry meaning.
    """
    line = line.rstrip(b" \t")
    space = line.find(b" ")
    verb = line if space < 0 else line[:space]
    if not verb.isalpha():  # bytes.isalpha is ASCII-only: garbage stays garbage
        raise GrammarError("verb", "command verb must be ASCII letters")
    argument = None if space < 0 else line[space + 1 :]
    return verb.upper().decode("ascii"), argument


def decode_argument(raw: bytes) -> str:
    """Decode a command argument; SMTP text must be valid UTF-8 (RFC 6531)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GrammarError("utf8", "argument is not valid UTF-8") from None


def is_address_literal(text: str) -> bool:
    """True for "[IPv4]" or "[IPv6:...]" (tag in any case) with a valid address."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    match = _IPV4_RE.fullmatch(inner)
    if match:
        return all(int(part) <= 255 for part in match.groups())
    if inner[:5].lower() == "ipv6:":
        address = inner[5:]
        if "%" in address:  # ipaddress accepts zone ids; SMTP does not
            return False
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return False
        return True
    # General-address-literal needs an IANA-registered tag; only IPv6 exists.
    return False


def is_helo_domain(text: str) -> bool:
    """Whether an EHLO/HELO argument is a domain name or an address literal."""
    if text.startswith("["):
        return is_address_literal(text)
    return _HELO_DOMAIN_RE.fullmatch(text) is not None


def format_local_part(local: str) -> str:
    """Quote a local part for display when it is not a plain Dot-string."""
    if _DOT_STRING_RE.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_params(text: str) -> list[Param]:
    """Parse " KEY[=VALUE] ..." after a path into (UPPER-KEY, value) pairs."""
    if not text:
        return []
    if text[0] != " ":
        raise GrammarError("params", "parameters must be separated by a space")
    params: list[Param] = []
    # Extra spaces between parameters are tolerated (empty tokens skipped).
    for token in text[1:].split(" "):
        if not token:
            continue
        match = _PARAM_RE.fullmatch(token)
        if match is None:
            raise GrammarError("params", f"malformed parameter {token!r}")
        params.append((match.group(1).upper(), match.group(2)))
    return params


def _parse_path(text: str, bare_domain: str = "") -> tuple[Address, str]:
    """Parse a Path at the start of text; return the mailbox and what follows. With
    `bare_domain`, a path of a local part alone gets that domain."""
    match = _PATH_RE.match(text)
    if match is not None:
        local, domain = match.group("local", "domain")
    elif bare_domain and (match := _BARE_PATH_RE.match(text)) is not None:
        local, domain = match.group("local"), bare_domain
    else:
        raise GrammarError("address", "malformed address")
    if domain[0] == "[" and not is_address_literal(domain):
        raise GrammarError("address", "invalid address literal")
    quoted = local[0] == '"'
    if quoted:
        local = _QUOTED_PAIR_RE.sub(r"\1", local[1:-1])
    return Address(local, domain, quoted), text[match.end() :]


def parse_address(text: str) -> Address:
    """Parse a bare mailbox, as written between the angle brackets of a path: "local@domain",
    or "postmaster" alone. For addresses that come from elsewhere than a MAIL or RCPT command
    (the maildrop)."""
    if _POSTMASTER_RE.fullmatch(f"<{text}>"):
        return Address(text, "", False)
    address, rest = _parse_path(f"<{text}>")
    if rest:
        raise GrammarError("address", "malformed address")
    return address


def parse_mail_from(argument: str, bare_domain: str = "") -> tuple[Address | None, list[Param]]:
    """Parse the MAIL argument "FROM:<reverse-path> [params]"; None is <>. With `bare_domain`,
    a path without a domain (<root>) is taken as local-part@bare_domain."""
    prefix = _FROM_RE.match(argument)
    if prefix is None:
        raise GrammarError("command", "expected FROM:<address>")
    rest = argument[prefix.end() :]
    if rest.startswith("<>"):
        return None, parse_params(rest[2:])
    address, rest = _parse_path(rest, bare_domain)
    return address, parse_params(rest)


def parse_rcpt_to(argument: str, bare_domain: str = "") -> tuple[Address, list[Param]]:
    """Parse the RCPT argument "TO:<forward-path> [params]".

    A bare <Postmaster> (any case) is allowed without a domain (RFC 5321
    4.1.1.3) and yields Address("Postmaster", "", False) with case kept. With `bare_domain`,
    any other path without a domain (<root>) is taken as local-part@bare_domain.
    """
    prefix = _TO_RE.match(argument)
    if prefix is None:
        raise GrammarError("command", "expected TO:<address>")
    rest = argument[prefix.end() :]
    postmaster = _POSTMASTER_RE.match(rest)
    if postmaster is not None:
        return Address(postmaster.group(1), "", False), parse_params(rest[postmaster.end() :])
    address, rest = _parse_path(rest, bare_domain)
    return address, parse_params(rest)

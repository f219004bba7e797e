"""`sendmail`: the machine's mail command, as cron, mail(1), mutt, PHP and scripts run it.

Every Debian program that mails runs /usr/sbin/sendmail (a link to the `mailerd` script, which
dispatches on its name; also `mailerd sendmail`). It reads one message from standard input,
completes its header (From:, Date:, Message-ID: when missing; Bcc:, Return-Path: and
Content-Length: removed), stores it in the maildrop with `maildrop.submit()`, which returns
only once the file is durable, and then wakes a running daemon (`maildrop.poke()`). It exits 0
only then; with the daemon stopped the mail waits in the maildrop. Any local user may run it,
even as /usr/bin/python3 without any third-party package: this module imports only mailerd
modules that import only the standard library, and the other modes' (-bs, -bp, -q, -bi) only
when asked for.

    sendmail [options] [--] [recipient ...]

    -t              recipients also from To:/Cc:/Bcc: (Resent-To/Cc/Bcc: when there are any)
    -i, -oi         a line holding a single "." does not end the message
    -f ADDR, -r ADDR  envelope sender ("" or <> for the null sender); default USER@DOMAIN
    -F NAME         full name for an added From: (default: the user's GECOS name)
    -B 7BIT|8BITMIME  body type (default: 8BITMIME when the message has 8-bit bytes)
    -C FILE         config file (default /etc/mailerd/mailerd.conf when readable)
    -bm             read a message and queue it (the default)
    -bs             SMTP on standard input and output; each message queued before its 250
                    (From:, Date:, Message-ID: added as for -bm; a Bcc: is the client's affair)
    -bp             list the queue (as `mailq`)      -q    deliver the queue now
    -bi, -I         rebuild the aliases (as `newaliases`)
    -oX, -v, -Am, -Ac, -N dsn, -R ret, -V envid, -X log, -L label, -h N, -O opt, -p proto, -e x,
    -c, -G, -m, -n, -U, -x   accepted and ignored

Recipients without a domain (cron gives a user name) get DOMAIN: the config's first `domain`,
else /etc/mailname, else the host's FQDN; so do addresses without one in the header's address
fields (cron's `From: root (Cron Daemon)`), as Postfix's cleanup does for local mail.
Input lines may end in LF or CRLF and are stored with CRLF; a bare CR ends a line too (a
progress meter's output stays readable); a header field's line longer than 998 octets is folded
before white space in it (RFC 5322 2.2.3), after -t read it; a longer body line is folded with
CRLF SPACE, as Postfix's smtp_line_length_limit does (so is a header line without white space);
a NUL is removed. A leading mbox "From " line is dropped.

Exit status (sysexits): 0 queued; EX_USAGE (64) a bad option or no recipient; EX_DATAERR (65) a
bad address, a message too large or with too many hops (data.MAX_HOPS); EX_CONFIG (78) an
unusable -C file; EX_TEMPFAIL (75) the maildrop cannot be written (missing, full, not
permitted): nothing was queued, try again; EX_IOERR (74) standard input unreadable; EX_OSERR
(71) no passwd entry for the user when one is needed; EX_NOPERM (77) -bp by a user who may not
read the queue (its directories are the daemon's, 0700); EX_SOFTWARE (70) a bug. Every failure
says why on stderr, in one line, and never as a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from mailerd import config, host, trace, values
from mailerd.ipc import maildrop
from mailerd.smtp.data import loop_problem
from mailerd.smtp.grammar import GrammarError, parse_address

MAX_LINE = 998  # octets without CRLF (RFC 5322 2.1.1); longer lines are folded
SIZE_SLACK = 65536  # input beyond the size limit that Bcc:/From_ removal might still save

# getopt-style letters: those that take a value (attached or the next argument), and flags.
_WITH_VALUE = frozenset("ABCFLNORVXbefhoprq")
_FLAGS = frozenset("GIUcimntvx")
_MODES = {"m": "send", "s": "smtp", "p": "list", "i": "aliases"}

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_CR_BEFORE_LF = re.compile(rb"\r+\n")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


class Failure(Exception):
    """Stop with `status` (sysexits) and `message` on stderr."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- options -----------------------------------------------------------------------------------


@dataclass
class Options:
    mode: str = "send"  # send (-bm), smtp (-bs), list (-bp), flush (-q), aliases (-bi)
    recipients: list[str] = field(default_factory=list)
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f/-r; "" is the null sender
    full_name: str | None = None  # -F
    body: str | None = None  # -B
    config_file: str | None = None  # -C


def parse_options(argv: list[str]) -> Options:
    """Sendmail's options, getopt-style (flags may be grouped, values attached or separate),
    up to `--` or the first argument that is not an option (POSIX: Postfix's order too)."""
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            i -= 1
            break
        pos = 1
        while pos < len(arg):
            letter = arg[pos]
            pos += 1
            if letter in _FLAGS:
                _flag(opts, letter)
                continue
            if letter not in _WITH_VALUE:
                raise Failure(os.EX_USAGE, f"unknown option -{letter}")
            if letter == "q":  # -q, -q30m, -qR...: the value is optional and only attached
                opts.mode = "flush"
                break
            if pos < len(arg):
                value = arg[pos:]
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise Failure(os.EX_USAGE, f"option -{letter} needs a value")
            _option(opts, letter, value)
            break
    opts.recipients.extend(argv[i:])
    return opts


def _flag(opts: Options, letter: str) -> None:
    if letter == "t":
        opts.extract = True
    elif letter == "i":
        opts.ignore_dots = True
    elif letter == "I":
        opts.mode = "aliases"
    # G (gateway), U (initial submission), c, m (me too), n (no aliasing), v, x: nothing to do


def _option(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = value
    elif letter == "F":
        opts.full_name = value
    elif letter == "C":
        opts.config_file = value
    elif letter == "B":
        body = value.upper()
        if body not in maildrop.BODY_TYPES:
            raise Failure(os.EX_USAGE, f"-B takes 7BIT or 8BITMIME, not {value!r}")
        opts.body = body
    elif letter == "b":
        if value not in _MODES:
            raise Failure(os.EX_USAGE, f"-b{value} is not supported")
        opts.mode = _MODES[value]
    elif letter == "o" and value == "i":
        opts.ignore_dots = True
    # -oX (error and delivery modes...), -A (sendmail 8.12's submit.cf or sendmail.cf: -Am,
    # -Ac), -N, -R, -V, -X, -L, -h, -O, -p, -e: ignored


# -- settings ----------------------------------------------------------------------------------


@dataclass
class Settings:
    """What sendmail needs of the config file; the names it falls back on are found lazily,
    since most mail needs neither."""

    queue: str = config.DEFAULT_QUEUE
    domains: tuple[str, ...] = ()
    configured_hostname: str | None = None
    max_message_size: int = config.DEFAULT_MAX_MESSAGE_SIZE
    _domain: str | None = None
    _hostname: str | None = None

    def domain(self) -> str:
        """The domain of unqualified addresses: the first local domain."""
        if self._domain is None:
            self._domain = self.domains[0] if self.domains else host.read_mailname() or _fqdn()
        return self._domain

    def hostname(self) -> str:
        """This host's name, for Message-ID: and the -bs greeting."""
        if self._hostname is None:
            self._hostname = self.configured_hostname or host.read_mailname() or _fqdn()
        return self._hostname


def load_settings(path: str | None) -> Settings:
    """From `-C FILE` (a directory means its mailerd.conf, as Postfix's -C), else from the
    default config file when this user may read it; config.load() would validate listeners."""
    if path is None:
        if not os.access(config.DEFAULT_CONFIG, os.R_OK):
            return Settings()
        path = config.DEFAULT_CONFIG
    elif os.path.isdir(path):
        path = os.path.join(path, "mailerd.conf")
    try:
        raw = config.read_ini(path)
        domains = tuple(config.parse_domains(raw.get("domain") or []))
        hostname = raw.get("hostname")
        size = raw.get("max_message_size", config.DEFAULT_MAX_MESSAGE_SIZE)
        return Settings(
            queue=str(raw.get("queue") or config.DEFAULT_QUEUE),
            domains=domains,
            configured_hostname=values.parse_hostname(str(hostname)) if hostname else None,
            max_message_size=values.parse_int("max-message-size", size, 1, 2**40),
        )
    except config.ConfigError as exc:
        raise Failure(os.EX_CONFIG, str(exc)) from None


def _fqdn() -> str:
    name = host.local_fqdn()
    return name if name and host.is_domain(name) else "localhost"


# -- who is sending ----------------------------------------------------------------------------


@dataclass
class Identity:
    """The invoking user (the login name for the default sender, GECOS for From:)."""

    settings: Settings
    full_name_option: str | None = None
    _entry: pwd.struct_passwd | None = None

    def entry(self) -> pwd.struct_passwd:
        if self._entry is None:
            try:
                self._entry = pwd.getpwuid(os.getuid())
            except KeyError:
                raise Failure(os.EX_OSERR, f"no login name for user ID {os.getuid()}") from None
        return self._entry

    def address(self) -> str:
        return f"{self.entry().pw_name}@{self.settings.domain()}"

    def full_name(self) -> str:
        if self.full_name_option is not None:
            name = self.full_name_option
        else:
            entry = self.entry()
            # GECOS: the name is the first comma-separated field; "&" stands for the login.
            login = entry.pw_name
            name = entry.pw_gecos.split(",", 1)[0].replace("&", login[:1].upper() + login[1:])
        return _CONTROLS.sub(" ", _text(name)).strip()  # never a line break into the header


def _text(text: str) -> str:
    """A name from the system (-F's argument, the GECOS field) as text: Python reads both as
    UTF-8, with the bytes that are not kept as surrogates, which no header can be encoded
    with. Such bytes are a legacy locale's, Latin-1 most often: read as that, never a crash."""
    raw = text.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def envelope_sender(opts: Options, identity: Identity) -> str:
    """The -f address checked and qualified ("" for <>), or the user's own address."""
    if opts.sender is None:
        return check_address(identity.address(), sender=True)
    text = opts.sender.strip()
    if text in ("", "<>"):
        return ""
    addresses = _split_addresses(text)
    if len(addresses) != 1:
        raise Failure(os.EX_DATAERR, f"bad sender address: {opts.sender!r}")
    return check_address(qualify(addresses[0], identity.settings.domain), sender=True)


def command_line_recipients(opts: Options, settings: Settings) -> list[str]:
    recipients = []
    for arg in opts.recipients:
        addresses = _split_addresses(arg)
        if not addresses:
            raise Failure(os.EX_DATAERR, f"bad recipient address: {arg!r}")
        recipients += [check_address(qualify(a, settings.domain)) for a in addresses]
    return recipients


def _split_addresses(text: str) -> list[str]:
    """The addresses of a command-line argument: `a@b`, `<a@b>`, `Name <a@b>`, or a list of
    those separated by commas (outside quotes and angle brackets). Nothing is unquoted or
    squeezed as a header parser would (getaddresses() reads `a@exa mple.org` as
    `a@example.org`): what is not one address is refused by the grammar afterwards."""
    pieces = []
    start = depth = 0
    for i, ch in _unquoted(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return [_angle_address(p.strip()) for p in pieces if p.strip()]


def _angle_address(piece: str) -> str:
    """`Name <addr>` → `addr` (the last < outside quotes starts it); anything else as is."""
    if not piece.endswith(">"):
        return piece
    opening = max((i for i, ch in _unquoted(piece) if ch == "<"), default=-1)
    return piece[opening + 1 : -1] if opening >= 0 else piece


def _unquoted(text: str) -> Iterator[tuple[int, str]]:
    """(index, character) of the characters outside quoted strings."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted:
            yield i, ch


def qualify(address: str, domain: Callable[[], str]) -> str:
    """`user` → `user@DOMAIN`, as every MTA does for local submissions."""
    _, at, after = address.rpartition("@")
    if not at or '"' in after:  # no @ outside a quoted local part
        return f"{address}@{domain()}"
    return address


def check_address(address: str, *, sender: bool = False) -> str:
    """The address in the SMTP grammar's canonical form (what the pickup will check)."""
    try:
        address.encode("utf-8")  # not bytes that were no UTF-8 (surrogates)
        return str(parse_address(address))
    except (GrammarError, UnicodeEncodeError):
        what = "sender" if sender else "recipient"
        raise Failure(os.EX_DATAERR, f"bad {what} address syntax: <{address}>") from None


# -- the message -------------------------------------------------------------------------------


def read_input(stream: BinaryIO | None, *, stop_at_dot: bool, limit: int) -> bytes:
    """Standard input up to EOF, or (without -i) up to a line holding a single ".", which is
    where the caller may stop writing and wait for us: nothing after it is read."""
    if stream is None:  # started without a standard input
        return b""
    try:
        if not stop_at_dot:
            data = stream.read(limit + 1)
        else:
            # (One buffer, not a list of the lines read: 12 MB of empty lines made a list of
            # 12 million objects, a gigabyte.)
            read = bytearray()
            while len(read) <= limit:
                line = stream.readline(limit + 1 - len(read))
                if not line or line.rstrip(b"\r\n") == b".":
                    break
                read += line
            data = bytes(read)
    except OSError as exc:
        raise Failure(os.EX_IOERR, f"cannot read the message: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise Failure(os.EX_DATAERR, "message too large")
    return data


def split_lines(data: bytes) -> list[bytes]:
    """The lines of the input without their ends (LF, CRLF, or a bare CR); a NUL removed, as
    Postfix's `message_strip_characters = \\0` does (its sendmail takes one too). Refused, a
    cron job's output was lost: cron only logs a mailer's failure."""
    data = data.replace(b"\0", b"")
    if b"\r" in data:
        data = _CR_BEFORE_LF.sub(b"\n", data).replace(b"\r", b"\n")
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def fold_long_lines(lines: list[bytes]) -> list[bytes]:
    """Lines over 998 octets broken with CRLF SPACE (never inside a UTF-8 sequence)."""
    if not lines or max(map(len, lines)) <= MAX_LINE:
        return lines
    out: list[bytes] = []
    for line in lines:
        # Each piece is cut from the line where the last one ended, the line itself never
        # copied again: the rest copied at each piece took 20 s for a line of 16 MB.
        start, lead = 0, b""
        while len(lead) + len(line) - start > MAX_LINE:
            cut = start + MAX_LINE - len(lead)
            while cut > start + MAX_LINE - len(lead) - 3 and 0x80 <= line[cut] < 0xC0:
                cut -= 1  # a UTF-8 continuation byte: cut before its sequence
            out.append(lead + line[start:cut])
            start, lead = cut, b" "
        out.append(lead + line[start:])
    return out


Field = list[bytes]  # a header field's lines: the first, then its folded continuations


def fold_field(field: Field) -> Field:
    """A header field's lines over 998 octets folded before white space they have, as RFC 5322
    2.2.3 folds (unfolding gives the field back: a long To: keeps its addresses whole); a line
    without any is cut as a body line is."""
    out: Field = []
    for line in field:
        start = 0  # (where the rest begins: as in fold_long_lines, never copied piece by piece)
        while len(line) - start > MAX_LINE:
            end = start + MAX_LINE + 1
            cut = max(line.rfind(b" ", start + 1, end), line.rfind(b"\t", start + 1, end))
            if cut < 0 or not line[start:cut].strip():
                break
            out.append(line[start:cut])
            start = cut
        out += fold_long_lines([line[start:] if start else line])
    return out


def split_header(lines: list[bytes]) -> tuple[list[Field], list[bytes]]:
    """(header fields, body lines). The header ends at an empty line (dropped) or at the first
    line that is no field, which then starts the body; a leading mbox From_ line is dropped."""
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    fields: list[Field] = []
    for i, line in enumerate(lines):
        if not line:
            return fields, lines[i + 1 :]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _FIELD_NAME.match(line):
            fields.append([line])
        else:
            return fields, lines[i:]
    return fields, []


def field_name(f: Field) -> str:
    return f[0].split(b":", 1)[0].strip().lower().decode("ascii")


def header_recipients(fields: list[Field], settings: Settings) -> list[str]:
    """-t: the addresses of To:, Cc: and Bcc:, or of the Resent- ones when there are any."""
    names = {field_name(f) for f in fields}
    wanted = ("to", "cc", "bcc")
    if names & {"resent-to", "resent-cc", "resent-bcc"}:
        wanted = ("resent-to", "resent-cc", "resent-bcc")
    recipients = []
    for f in fields:
        name = field_name(f)
        if name in wanted:
            text = b"".join(f).decode("utf-8", "surrogateescape")  # unfolded: CRLFs dropped
            recipients += [check_address(qualify(a, settings.domain)) for a in _addresses(text)]
    return recipients


def _addresses(field: str) -> list[str]:
    """The addresses of one To:/Cc:/Bcc: field, by the email package's RFC 5322 parser
    (groups, comments, quoted names, encoded words). A field it finds broken is refused rather
    than guessed at (email.utils.getaddresses() answers differently across Python's security
    releases, CVE-2023-27043; the header registry does not), but for one guess every MTA makes:
    addresses separated by semicolons (`a@x; b@y`, as Outlook users and web forms write them)."""
    name, _, value = field.partition(":")
    found = _parsed_addresses(name, value)
    if found is None and (commas := _semicolons_as_commas(value)) is not None:
        found = _parsed_addresses(name, commas)
    if found is None:
        raise Failure(os.EX_DATAERR, f"bad address in {name.strip()}: {value.strip()}")
    # A user name without a domain ("To: root") is what local mail looks like: qualified by
    # the caller, as on the command line.
    return found


def _semicolons_as_commas(value: str) -> str | None:
    """The field with its semicolons outside quotes as commas; None if it has a group (a
    `:`), whose `;` ends it, or no semicolon."""
    outside = list(_unquoted(value))
    if not any(ch == ";" for _, ch in outside) or any(ch == ":" for _, ch in outside):
        return None
    text = list(value)
    for i, ch in outside:
        if ch == ";":
            text[i] = ","
    return "".join(text)


_NO_DOMAIN = "local part with no domain"

# The fields whose addresses a local submission's missing domain is added to (RFC 5322 3.6.2-3,
# 3.6.6).
_ADDRESS_FIELDS = frozenset(
    ("from", "sender", "reply-to", "to", "cc", "bcc")
    + ("resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc")
)


def qualify_field(field: Field, domain: Callable[[], str]) -> Field:
    """An address field whose addresses lack a domain (cron's `From: root (Cron Daemon)`,
    mdadm's `<root>`, `To: root`) with DOMAIN added to each, as Postfix's cleanup does for
    local mail: mail that leaves must name a domain in From: (DKIM signs for it, DMARC aligns
    on it, and receivers refuse it otherwise). Nothing else in the field changes. It is kept as
    it was when the parser does not read it back as exactly that (the same names and groups,
    the addresses with DOMAIN added), when the domains would make a line too long to fold at
    white space, and when it is over MAX_QUALIFIED octets (the field is read twice, each
    time at about 0.1 ms an address: 4 s for 16,000 names, for a field no program writes)."""
    text = b"\r\n".join(field).decode("utf-8", "surrogateescape")
    name, colon, value = text.partition(":")
    ends = _bare_address_ends(value) if len(text) <= MAX_QUALIFIED else []
    if not colon or not ends:  # (most fields: then the parser, 15 ms to import, is not needed)
        return field
    before = _parsed(name, value)
    if before is None:
        return field
    suffix = "@" + domain()
    pieces, start = [], 0
    for end in ends:
        pieces += [value[start:end], suffix]
        start = end
    value = "".join(pieces) + value[start:]
    expected = [(group, display, qualify(address, domain)) for group, display, address in before]
    qualified = (name + colon + value).encode("utf-8", "surrogateescape").split(b"\r\n")
    if _parsed(name, value) != expected or (_folds(field) and not _folds(qualified)):
        return field
    return qualified


MAX_QUALIFIED = 4096  # octets of a field whose addresses `qualify_field` completes


def qualify_header(section: bytes, domain: Callable[[], str]) -> bytes | None:
    """A header section as SMTP delivered it (CRLF line ends, through the CRLF of its last
    field) with DOMAIN added to the addresses of its address fields that have none, field by
    field as `qualify_field` does; None when no field changes (most messages: then nothing is
    parsed). For a local program's SMTP mail (`From: root`, as a script's smtplib writes it),
    which Postfix's cleanup qualifies as it does sendmail's: the delivery process applies it
    to the copy that leaves."""
    lines = section.split(b"\r\n")
    out: list[bytes] = []
    changed = False
    i = 0
    while i < len(lines):
        field = [lines[i]]
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            field.append(lines[i])
            i += 1
        if _FIELD_NAME.match(field[0]) and field_name(field) in _ADDRESS_FIELDS:
            qualified = qualify_field(field, domain)
            changed = changed or qualified is not field
            field = qualified
        out += field
    return b"\r\n".join(out) if changed else None


def _folds(field: Field) -> bool:
    """Whether `fold_field` folds the field at white space alone (inserting nothing)."""
    return b"".join(fold_field(field)) == b"".join(field)


def _parsed(name: str, value: str) -> list[tuple[str | None, str, str]] | None:
    """(group name, display name, addr-spec) of each address of an address field, by the
    email package's parser, then (group name, "", "") of each empty group; None if it finds the
    field broken (other than for an address without a domain), or fails on it. The parser's
    time grows with the square of what it reads at once (a To: of 8,000 addresses took 4 s):
    it reads the field in pieces of about PARSE_PIECE octets, cut between addresses."""
    found: list[tuple[str | None, str, str]] = []
    empty_groups: list[tuple[str | None, str, str]] = []
    for piece in _pieces(value.replace("\r\n", "").strip()):
        read = _read(name, piece)
        if read is None:
            return None
        found += read[0]
        empty_groups += read[1]
    return found + empty_groups


def _read(
    name: str, value: str
) -> tuple[list[tuple[str | None, str, str]], list[tuple[str | None, str, str]]] | None:
    """`_parsed` of one piece of a field: its addresses, and its empty groups."""
    from email import errors, policy

    try:
        header = policy.default.header_factory(name.strip(), value)
        if any(
            isinstance(defect, errors.InvalidHeaderDefect) and _NO_DOMAIN not in str(defect)
            for defect in header.defects
        ):
            return None
        return [
            (group.display_name, address.display_name, address.addr_spec)
            for group in header.groups
            for address in group.addresses
        ], [(group.display_name, "", "") for group in header.groups if not group.addresses]
    except Exception:  # (3.11's parser fails on some odd fields: `g: a@x; b`, AttributeError)
        return None


PARSE_PIECE = 2048  # octets of an address field the parser reads at once (`_parsed`)


def _pieces(value: str) -> Iterator[str]:
    """The value in pieces of about PARSE_PIECE octets, each cut just before a comma that
    separates two elements of the address list (addresses or groups), so that each piece reads
    as the whole would: a piece after the first starts with its comma (an empty element
    reads the same there). Where a comma's role is unsure, nothing is cut after it: a piece
    with more addresses is still read right, only slower."""
    start = 0
    for cut in _element_commas(value):
        if cut - start >= PARSE_PIECE:
            yield value[start:cut]
            start = cut
    yield value[start:]


def _element_commas(value: str) -> Iterator[int]:
    """Where the commas between the elements of an address list are: outside quoted strings,
    comments, domain literals, angle brackets and groups. Past a backslash outside those, or
    anything the parser may read as an RFC 2047 encoded word other than a well-formed one
    with no delimiter in it and no comma right after it, the search ends: the parser's reading
    there depends on more than a piece would hold (a word that fails to decode is read as text
    in which another may start and run on past a comma; a comma right after a word is a
    defect the word's piece would not see)."""
    comment = angle = 0
    quoted = literal = group = escaped = False
    skip = 0
    closes = value.rfind("?=")  # (no encoded word can start past the last `?=`)
    for i, ch in enumerate(value):
        if i < skip:
            continue
        if escaped:
            escaped = False
        elif (
            ch == "=" and value.startswith("=?", i) and i + 2 <= closes and not (comment or literal)
        ):
            word = _PLAIN_ENCODED_WORD.match(value, i)
            if word is None or value.startswith(",", word.end()):
                return
            skip = word.end()
        elif quoted or comment or literal:
            if ch == "\\":
                escaped = True
            elif quoted:
                quoted = ch != '"'
            elif literal:
                literal = ch != "]"
            else:
                comment += {"(": 1, ")": -1}.get(ch, 0)
        elif ch == "\\":
            return
        elif ch in '"([':
            quoted, comment, literal = ch == '"', int(ch == "("), ch == "["
        elif ch == "<":
            angle += 1
        elif ch == ">":
            angle = max(angle - 1, 0)
        elif angle:
            continue
        elif ch == ":":
            group = True
        elif ch == ";":
            group = False
        elif ch == "," and not group:
            yield i


# A well-formed encoded word (charset, Q or B, text) without white space or a delimiter: the
# parser reads it as one word of that extent, decoded or not, and nothing in it opens, closes or
# separates anything. (Its text holds no `?`, so its first `?=` after a charset ends it, or the
# hex digits of `?=41` there make the parser read on to the next, as this does.)
_PLAIN_ENCODED_WORD = re.compile(r'=\?[^?\s"()<>\[\]:;,\\]+\?[BbQq]\?[^?\s"()<>\[\]:;,\\]*\?=')


def _parsed_addresses(name: str, value: str) -> list[str] | None:
    """The addr-specs of an address field (`_parsed`)."""
    found = _parsed(name, value)
    return None if found is None else [address for _, display, address in found if address]


def _encoded_word_end(value: str, i: int) -> int:
    """Where an RFC 2047 encoded word (`=?charset?q?text?=`, no white space) starting at `i`
    ends; 0 if none starts there."""
    match = _ENCODED_WORD.match(value, i)
    return match.end() if match else 0


_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[^?\s]+\?\S*?\?=")


def _bare_address_ends(value: str) -> list[int]:
    """Where in a field's value each address without an @ ends (outside comments, quoted
    strings' quotes and domain literals): inside `<root>` before the `>`, after `root` in
    `root (Cron Daemon)`. Addresses are separated by commas; a group's name ends at `:`."""
    ends: list[int] = []
    comment = 0
    quoted = escaped = literal = angle = False
    has_at = has_angle = False
    last = -1  # just after the current address's last character, if it has any yet
    skip = 0  # (the end of an encoded word: its text may hold a "," or a "(", RFC 2047 or not)
    for i, ch in enumerate(value):
        if i < skip:
            continue
        if escaped:
            escaped = False
            last = i + 1 if not comment else last
        elif ch == "\\" and (quoted or comment):
            escaped = True
        elif comment:
            comment += {"(": 1, ")": -1}.get(ch, 0)
        elif quoted or literal:
            quoted = quoted and ch != '"'
            literal = literal and ch != "]"
            last = i + 1
        elif ch == "=" and (skip := _encoded_word_end(value, i)):
            last = skip
        elif ch in '(["':
            comment, literal, quoted = int(ch == "("), ch == "[", ch == '"'
        elif ch == "<":
            angle = has_angle = True
            has_at, last = False, -1
        elif angle and ch == ">":
            angle = False
            if not has_at and last >= 0:
                ends.append(last)
            has_at = True  # (what follows the angle address is no address of its own)
        elif not angle and ch in ",;:":
            if not has_at and not has_angle and last >= 0 and ch != ":":
                ends.append(last)
            has_at = has_angle = False
            last = -1
        elif ch == "@":
            has_at = True
        elif not ch.isspace():
            last = i + 1
    if not has_at and not has_angle and not angle and last >= 0:
        ends.append(last)
    return ends


_DROPPED = ("return-path", "content-length")


def complete_message(
    fields: list[Field], body: list[bytes], sender: str, identity: Identity, *, strip_bcc: bool
) -> bytes:
    """The message with CRLF line ends: Bcc: removed (when asked), and Return-Path: and
    Content-Length: (as Postfix's cleanup does: a saved message sent again carries its old
    ones, which delivery here would leave below its own), addresses qualified, then From:,
    Date: and Message-ID: added at the end of the header when they are missing."""
    dropped = ("bcc", "resent-bcc", *_DROPPED) if strip_bcc else _DROPPED
    fields = [f for f in fields if field_name(f) not in dropped]
    domain = identity.settings.domain
    fields = [qualify_field(f, domain) if field_name(f) in _ADDRESS_FIELDS else f for f in fields]
    names = {field_name(f) for f in fields}
    lines = [line for f in fields for line in fold_field(f)]
    if "from" not in names:
        lines += fold_field([author_field(sender or identity.address(), identity)])
    if "date" not in names:
        lines.append(f"Date: {trace.rfc5322_date()}".encode())
    if "message-id" not in names:
        lines.append(f"Message-ID: <{trace.new_id()}@{identity.settings.hostname()}>".encode())
    lines.append(b"")
    lines += fold_long_lines(body)
    return crlf_joined(lines)


JOIN_STEP = 65536  # lines joined at once (`crlf_joined`)


def crlf_joined(lines: list[bytes]) -> bytes:
    """The lines, each ended with CRLF. Joined JOIN_STEP at a time: bytes.join holds a
    buffer view (80 octets) of every item at once, and a message of 12 million empty lines
    took a gigabyte that way."""
    return b"".join(
        b"\r\n".join(lines[i : i + JOIN_STEP]) + b"\r\n" for i in range(0, len(lines), JOIN_STEP)
    )


def author_field(address: str, identity: Identity) -> bytes:
    """`From: "Full Name" <address>`; a non-ASCII name as an RFC 2047 encoded-word."""
    name = identity.full_name()
    if not name:
        return f"From: {address}".encode()
    if name.isascii():
        display = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        from email.header import Header

        display = Header(name, "utf-8").encode(maxlinelen=0)
    return f"From: {display} <{address}>".encode()


def body_type(message: bytes, declared: str | None) -> str:
    """8BITMIME when the message has 8-bit bytes, whatever -B said (7BIT would be a lie that
    the outbound side would repeat); otherwise -B's type, 7BIT by default."""
    if not message.isascii():
        return "8BITMIME"
    return declared or "7BIT"


# -- storing -----------------------------------------------------------------------------------


def store(
    settings: Settings, sender: str, recipients: list[str], message: bytes, body: str
) -> list[str]:
    """Submit durably (several files when there are more recipients than one may hold); the
    names. On failure the files already written are removed: nothing is half sent."""
    step = maildrop.MAX_RECIPIENTS
    names: list[str] = []
    try:
        for start in range(0, len(recipients), step):
            part = recipients[start : start + step]
            names.append(maildrop.submit(settings.queue, sender, part, message, body))
    except OSError as exc:
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(settings.queue, maildrop.MAILDROP, name))
        where = os.path.join(settings.queue, maildrop.MAILDROP)
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT:
            reason += " (made by mailerd at start, or `mailerd queue init`; -C names another)"
        raise Failure(os.EX_TEMPFAIL, f"cannot write to the maildrop {where}: {reason}") from None
    maildrop.poke(settings.queue)
    return names


def send(opts: Options, settings: Settings, stdin: BinaryIO | None) -> int:
    """-bm: one message from standard input into the maildrop."""
    identity = Identity(settings, opts.full_name)
    sender = envelope_sender(opts, identity)
    recipients = command_line_recipients(opts, settings)
    if not recipients and not opts.extract:
        raise Failure(os.EX_USAGE, "no recipient addresses given (or -t)")
    limit = settings.max_message_size + SIZE_SLACK
    data = read_input(stdin, stop_at_dot=not opts.ignore_dots, limit=limit)
    fields, body = split_header(split_lines(data))  # (folded once the recipients are read)
    if opts.extract:
        recipients += header_recipients(fields, settings)
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        raise Failure(os.EX_USAGE, "no recipient addresses found in the message header")
    message = complete_message(fields, body, sender, identity, strip_bcc=True)
    if len(message) > settings.max_message_size:
        raise Failure(os.EX_DATAERR, f"message too large ({settings.max_message_size} max)")
    if problem := loop_problem(message):
        # (The pickup would refuse it too, and the caller would never hear: a loop, most often.)
        raise Failure(os.EX_DATAERR, problem)
    store(settings, sender, recipients, message, body_type(message, opts.body))
    return 0


# -- the other modes ---------------------------------------------------------------------------


def queue_command(settings: Settings, action: str) -> int:
    """-bp / mailq and -q: `mailerd queue list|flush` on this config's queue."""
    from mailerd.commands import queue

    try:  # (-bp is mailq, whose name its user knows; -q is sendmail's)
        return queue.main(
            ["-q", settings.queue, action], "mailq" if action == "list" else "sendmail"
        )
    except OSError as exc:
        status = os.EX_NOPERM if isinstance(exc, PermissionError) else os.EX_TEMPFAIL
        raise Failure(status, queue.cannot_read(settings.queue, exc)) from None


def rebuild_aliases(opts: Options) -> int:
    from mailerd.commands import newaliases

    return newaliases.main(["-C", opts.config_file] if opts.config_file else [])


# -- entry point -------------------------------------------------------------------------------


def main(argv: list[str], stdin: BinaryIO | None = None) -> int:
    """Run `sendmail ARGV`; the exit status. `stdin` is where -bm reads the message (default:
    standard input)."""
    try:
        return _run(argv, stdin)
    except Failure as exc:
        _complain(str(exc))
        return exc.status
    except KeyboardInterrupt:
        _complain("interrupted; nothing sent")
        return os.EX_TEMPFAIL
    except Exception as exc:  # never a traceback to cron; never an exit 0 either
        _complain(f"internal error: {type(exc).__name__}: {exc}")
        return os.EX_SOFTWARE


def _run(argv: list[str], stdin: BinaryIO | None) -> int:
    if argv[:1] == ["--help"]:  # (no sendmail has it, but a person tries it first)
        print(__doc__.split("\n\n", 2)[2].split("\nRecipients without")[0].rstrip())
        return 0
    opts = parse_options(argv)
    if opts.mode == "aliases":
        return rebuild_aliases(opts)
    settings = load_settings(opts.config_file)
    if opts.mode == "list":
        return queue_command(settings, "list")
    if opts.mode == "flush":
        return queue_command(settings, "flush")
    if opts.mode == "smtp":
        from mailerd.commands import smtp_pipe

        return smtp_pipe.serve(settings, Identity(settings, opts.full_name))
    if stdin is None and sys.stdin is not None:
        stdin = sys.stdin.buffer
    return send(opts, settings, stdin)


def _complain(message: str) -> None:
    # Without a stderr (closed), the exit status alone says it.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(f"sendmail: {message}", file=sys.stderr, flush=True)

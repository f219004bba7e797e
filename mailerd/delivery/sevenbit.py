"""8-bit content for a server that does not offer 8BITMIME: converted to 7 bit, or refused.

RFC 6152 forbids sending 8-bit octets to a server that does not announce 8BITMIME. Like
Postfix, the relay then converts: each leaf part whose content has 8-bit octets becomes
quoted-printable (RFC 2045 6.7, with binascii, the stdlib's encoder), and each multipart or
message/rfc822 around one that said "8bit" or "binary" is relabelled "7bit" (the only
encodings RFC 2045 6.4 allows them). Unlike Postfix, it converts only the parts that need it
and refuses, rather than damages, what cannot be converted (the caller bounces with 5.6.3):

- a message with a DKIM-Signature of someone else's: the signature covers the body (RFC 6376
  3.7), so any change breaks it (RFC 6376 5.3 has the signer, not a relay, make the body 7-bit
  before signing). Signatures that are all mailerd's own (`own`: their d= and s= name its keys)
  are no obstacle: the plan says `resign`, `convert()` leaves them out, and the caller signs
  the converted message anew;
- an 8-bit part inside multipart/signed or multipart/encrypted (RFC 1847): the signature
  covers the part as sent, transfer encoding and all;
- 8-bit octets in a header (they would need SMTPUTF8, or RFC 2047 encoding of structured
  fields that only the sender can do well); an 8-bit part already labelled base64 or
  quoted-printable (there is no lossless way out); message/partial and message/external-body
  with 8-bit octets (RFC 2046 5.2 allows them 7bit only); MIME nested deeper than MAX_DEPTH
  or a header section longer than HEADER_LIMIT.

A message without MIME-Version (plain 8-bit text) gains MIME-Version and a text/plain
Content-Type: charset utf-8 when its body is valid UTF-8, else "unknown-8bit" (RFC 1428). 8-bit
octets in a multipart's preamble or epilogue, which MIME readers ignore (RFC 2046 5.1.1),
become "?".

Two streaming passes over the queued file keep the memory bounded for any size: `plan()`
walks the MIME structure and finds the parts to convert and anything that forbids it;
`convert()` walks it again and yields the converted message piece by piece. The queued file is
never changed: each attempt converts anew, for the host at hand.
"""

from __future__ import annotations

import binascii
import codecs
import email.parser
import email.policy
import io
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO

LINE_LIMIT = 64 * 1024  # a longer line is read in pieces of this size
HEADER_LIMIT = 1024 * 1024  # octets of one entity's header section
MAX_DEPTH = 32  # nested multiparts and messages
SCAN_CHUNK = 1024 * 1024

_IDENTITY = ("7bit", "8bit", "binary")  # RFC 2045 6.2: encodings that leave content as is
_SIGNED = ("multipart/signed", "multipart/encrypted")
_SEVEN_BIT_ONLY = ("message/partial", "message/external-body")
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")  # a header field's name and colon (RFC 5322 2.2)
_CTE = b"content-transfer-encoding"
_DKIM = b"dkim-signature"
_UNKNOWN = bytes(range(128)) + b"?" * 128  # translate table: 8-bit octets become "?"


def has_8bit(path: Path) -> bool:
    """Whether the file has any octet above 127."""
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            if not chunk.isascii():
                return True
    return False


def pieces(f: BinaryIO) -> Iterator[bytes]:
    """The file's lines, each with its line end; a line longer than LINE_LIMIT in pieces,
    never cut between its CR and LF (a piece ending in CR would keep it as content)."""
    while piece := f.readline(LINE_LIMIT):
        if piece[-1:] == b"\r":
            if (following := f.read(1)) == b"\n":
                piece += following
            elif following:
                f.seek(-1, io.SEEK_CUR)
        yield piece


@dataclass(frozen=True)
class Plan:
    """What `convert()` changes, or why the message cannot be converted."""

    refusal: str | None = None  # None: it can be
    leaves: frozenset[int] = frozenset()  # entities whose content becomes quoted-printable
    containers: frozenset[int] = frozenset()  # multipart/message entities relabelled 7bit
    charset: str = "utf-8"  # for a message without Content-Type whose body is converted
    resign: bool = False  # the DKIM-Signature fields (all our own) go: sign the result anew


Signer = tuple[str, str]  # a DKIM signature's (d=, s=), lower-cased


def plan(path: Path, own: frozenset[Signer] = frozenset()) -> Plan:
    """The first pass: which parts have 8-bit octets, and whether converting them is allowed
    (`own`: the signers whose signatures may be made anew, mailerd's keys)."""
    finder = _Finder(own)
    try:
        with open(path, "rb") as f:
            for kind, entity, data in _walk(pieces(f)):
                finder.see(kind, entity, data)
        return finder.result()
    except _Unconvertible as exc:
        return Plan(refusal=str(exc))


def convert(path: Path, plan: Plan) -> Generator[bytes, None, None]:
    """The second pass: the message with `plan` applied, in pieces (CRLF line ends)."""
    if plan.refusal is not None:
        raise ValueError(f"the message cannot be converted: {plan.refusal}")
    with open(path, "rb") as f:
        for kind, entity, data in _walk(pieces(f)):
            if kind is _Kind.HEAD:
                yield from _header(entity, data, plan)
            elif kind is _Kind.BODY and entity.index in plan.leaves:
                yield _quoted_printable(data)
            else:
                yield data.translate(_UNKNOWN)  # (ASCII but in a preamble or epilogue)


# --- the MIME structure ----------------------------------------------------------------------


class _Unconvertible(Exception):
    """Why the message cannot be converted."""


class _Kind(Enum):
    HEAD = "head"  # an entity's header section is complete: data is the empty line after it
    BODY = "body"  # a piece of a leaf entity's content
    TEXT = "text"  # a piece of a multipart's preamble, delimiter line or epilogue


@dataclass(eq=False)
class _Entity:
    """One MIME entity: the message, a body part, or the message inside a message/rfc822."""

    index: int  # in the order of the header sections in the file (both passes agree)
    parent: _Entity | None = None
    default_type: str = "text/plain"  # message/rfc822 in a multipart/digest (RFC 2046 5.1.5)
    signed: str | None = None  # the multipart/signed or /encrypted it is inside of
    depth: int = 0
    head: list[bytes] = field(default_factory=list)  # the header lines, with their line ends
    content_type: str = "text/plain"
    cte: str = "7bit"
    boundary: bytes | None = None
    typed: bool = False  # it has a Content-Type field
    mime: bool = False  # it has a MIME-Version field
    signers: tuple[Signer, ...] = ()  # of its DKIM-Signature fields

    def child(self, index: int) -> _Entity:
        if self.depth >= MAX_DEPTH:
            raise _Unconvertible(f"its MIME structure is nested deeper than {MAX_DEPTH} levels")
        digest = self.content_type == "multipart/digest"
        signed = self.signed or (self.content_type if self.content_type in _SIGNED else None)
        default = "message/rfc822" if digest else "text/plain"
        return _Entity(index, self, default, signed, self.depth + 1)

    def describe(self) -> None:
        """Read the header section's MIME fields (with the stdlib's lenient parser)."""
        fields = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            b"".join(self.head) + b"\r\n"
        )
        fields.set_default_type(self.default_type)
        self.content_type = fields.get_content_type()
        self.cte = str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower()
        boundary = fields.get_boundary()
        self.boundary = boundary.encode("ascii", "replace") if boundary else None
        self.typed = "Content-Type" in fields
        self.mime = "MIME-Version" in fields
        self.signers = tuple(_signer(str(v)) for v in fields.get_all("DKIM-Signature") or [])

    @property
    def multipart(self) -> bool:
        # Without a boundary, or with an encoding that hides the parts, it is one leaf (as the
        # stdlib's parser sees it too).
        return (
            self.content_type.startswith("multipart/")
            and self.boundary is not None
            and self.cte in _IDENTITY
        )

    @property
    def nested(self) -> bool:
        """A message/rfc822 whose content is a message to walk into."""
        return self.content_type == "message/rfc822" and self.cte in _IDENTITY

    @property
    def message(self) -> bool:
        """The message itself, or one inside a message/rfc822 (not a body part)."""
        return self.parent is None or self.parent.nested


_Event = tuple[_Kind, _Entity, bytes]


class _Walker:
    """Turns the file's pieces into (kind, entity, piece) events, keeping only the current
    header section and the stack of open multiparts.

    A delimiter is recognised as RFC 2046 5.1.1 and the stdlib's parser do ("--" boundary,
    then only white space; or "--" boundary "--", then only white space), for every open
    multipart, so that an inner one left unclosed does not hide the outer one's delimiters.
    """

    def __init__(self) -> None:
        self.entity = _Entity(0)  # the one whose header or content is being read
        self.count = 1
        self.stack: list[_Entity] = []  # open multiparts, innermost last
        self.heading = True
        self.in_leaf = False
        self.container = self.entity  # the multipart a preamble or epilogue belongs to
        self.size = 0

    def walk(self, source: Iterable[bytes]) -> Iterator[_Event]:
        start = True  # the piece begins a line
        for piece in source:
            line_start, start = start, piece.endswith(b"\n")
            if self.heading and (yield from self._head(piece, line_start)):
                continue
            if line_start and self.stack and piece.startswith(b"--"):
                delimiter = self._delimiter(piece)
                if delimiter is not None:
                    yield _Kind.TEXT, delimiter, piece
                    continue
            if self.in_leaf:
                yield _Kind.BODY, self.entity, piece
            else:
                yield _Kind.TEXT, self.container, piece
        if self.heading:
            yield from self._end_head(b"")

    def _head(self, piece: bytes, line_start: bool) -> Generator[_Event, None, bool]:
        """Take a piece while in a header section; False if it turned out to be content."""
        while self.heading:
            if line_start and piece in (b"\r\n", b"\n"):
                yield from self._end_head(piece)
                return True
            if not line_start or _FIELD.match(piece) or self._continues(piece):
                self._add_head(piece, line_start)
                return True
            # Not a header field: the header section ended without its empty line, and this
            # is content (RFC 5322 2.1; Postfix and the stdlib's parser agree) or, after a
            # message/rfc822's, the inner message's header section.
            yield from self._end_head(b"")
        return False

    def _continues(self, piece: bytes) -> bool:
        return bool(self.entity.head) and piece[:1] in (b" ", b"\t")

    def _add_head(self, piece: bytes, line_start: bool) -> None:
        self.size += len(piece)
        if self.size > HEADER_LIMIT:
            raise _Unconvertible(f"a header section is longer than {HEADER_LIMIT} octets")
        if line_start:
            self.entity.head.append(piece)
        else:  # the rest of a line longer than LINE_LIMIT
            self.entity.head[-1] += piece

    def _end_head(self, separator: bytes) -> Iterator[_Event]:
        entity = self.entity
        entity.describe()
        yield _Kind.HEAD, entity, separator
        self.size = 0
        if entity.multipart:
            self.stack.append(entity)
            self.heading, self.in_leaf, self.container = False, False, entity
        elif entity.nested:  # its content starts with the inner message's header section
            self.entity = self._new(entity)
        else:
            self.heading, self.in_leaf = False, True

    def _new(self, parent: _Entity) -> _Entity:
        entity = parent.child(self.count)
        self.count += 1
        self.heading, self.in_leaf = True, False
        return entity

    def _delimiter(self, piece: bytes) -> _Entity | None:
        """The multipart whose delimiter `piece` is, after acting on it; None if it is none."""
        for depth in range(len(self.stack) - 1, -1, -1):
            multipart = self.stack[depth]
            assert multipart.boundary is not None
            marker = b"--" + multipart.boundary
            if not piece.startswith(marker):
                continue
            rest = piece[len(marker) :]
            closing = rest.startswith(b"--")
            if rest[2 if closing else 0 :].strip(b" \t\r\n"):
                continue  # more text after it: not a delimiter
            del self.stack[depth + 1 :]  # inner multiparts left unclosed end here
            if closing:
                self.stack.pop()
                self.heading, self.in_leaf, self.container = False, False, multipart
            else:
                self.entity = self._new(multipart)
            return multipart
        return None


def _walk(source: Iterable[bytes]) -> Iterator[_Event]:
    return _Walker().walk(source)


# --- the first pass --------------------------------------------------------------------------


class _Finder:
    """Collects the plan from the walk's events; raises _Unconvertible as soon as it must."""

    def __init__(self, own: frozenset[Signer]) -> None:
        self.own = own
        self.top: _Entity | None = None
        self.leaves: set[int] = set()
        self.containers: set[int] = set()
        self.changed = False  # something will be changed
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.utf8 = True  # the top-level content (when it has no Content-Type) is UTF-8

    def see(self, kind: _Kind, entity: _Entity, data: bytes) -> None:
        if kind is _Kind.HEAD:
            self.top = self.top or entity
            if not all(line.isascii() for line in entity.head):
                raise _Unconvertible("a header has 8-bit octets (that needs SMTPUTF8)")
        elif kind is _Kind.TEXT:
            self.changed = self.changed or not data.isascii()
        else:
            self._content(entity, data)

    def _content(self, entity: _Entity, data: bytes) -> None:
        if entity.index == 0 and not entity.typed and self.utf8:
            try:
                self.decoder.decode(data)
            except UnicodeDecodeError:
                self.utf8 = False
        if data.isascii() or entity.index in self.leaves:
            return
        _check_convertible(entity)
        self.leaves.add(entity.index)
        self.changed = True
        parent = entity.parent
        while parent is not None:
            if parent.cte != "7bit":  # (8bit or binary: a multipart or message/rfc822)
                self.containers.add(parent.index)
            parent = parent.parent

    def result(self) -> Plan:
        signers = self.top.signers if self.top is not None and self.changed else ()
        resign = bool(signers) and all(signer in self.own for signer in signers)
        if signers and not resign:
            raise _Unconvertible("it has a DKIM signature, which converting would break")
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            self.utf8 = False
        return Plan(
            leaves=frozenset(self.leaves),
            containers=frozenset(self.containers),
            charset="utf-8" if self.utf8 else "unknown-8bit",
            resign=resign,
        )


def _signer(value: str) -> Signer:
    """A DKIM-Signature field's (d=, s=) (RFC 6376 3.2: tag=value; white space is folding)."""
    tags = dict(tag.split("=", 1) for tag in "".join(value.split()).split(";") if "=" in tag)
    return tags.get("d", "").lower(), tags.get("s", "").lower()


def _check_convertible(entity: _Entity) -> None:
    """Raise _Unconvertible if this leaf, which has 8-bit octets, may not be converted."""
    if entity.signed is not None:
        raise _Unconvertible(
            f"a part inside {entity.signed} has 8-bit content, and converting it would "
            "break the signature"
        )
    if entity.cte not in _IDENTITY:
        raise _Unconvertible(f"a part encoded as {entity.cte} has 8-bit octets")
    if entity.content_type in _SEVEN_BIT_ONLY:
        raise _Unconvertible(f"a {entity.content_type} part has 8-bit octets")


# --- the second pass -------------------------------------------------------------------------


def _header(entity: _Entity, separator: bytes, plan: Plan) -> Iterator[bytes]:
    """An entity's header section and the empty line after it, relabelled if the plan says
    (and without its DKIM-Signature fields, if it is the message and they are to be made
    anew)."""
    head = entity.head
    if plan.resign and entity.index == 0:
        head = list(_without(_DKIM, head))
    if entity.index in plan.leaves:
        label = b"quoted-printable"
    elif entity.index in plan.containers:
        label = b"7bit"
    else:
        yield from head
        yield separator
        return
    yield from _without(_CTE, head)
    if entity.message and label == b"quoted-printable":
        # A message that was not MIME (plain 8-bit text) becomes MIME, RFC 1428's way.
        if not entity.mime:
            yield b"MIME-Version: 1.0\r\n"
        if not entity.typed:
            yield b"Content-Type: text/plain; charset=" + plan.charset.encode() + b"\r\n"
    yield b"Content-Transfer-Encoding: " + label + b"\r\n"
    yield separator or b"\r\n"  # (a header section that ended without one now needs it)


def _without(name: bytes, head: list[bytes]) -> Iterator[bytes]:
    """The header lines but those of the fields called `name` (lower case)."""
    dropping = False
    for line in head:
        if line[:1] not in (b" ", b"\t"):  # a new field
            dropping = line.split(b":", 1)[0].strip().lower() == name
        if not dropping:
            yield line


def _quoted_printable(piece: bytes) -> bytes:
    """One line of content (or a piece of a long one) as quoted-printable lines."""
    if piece.endswith(b"\n"):
        content, end = piece[: -2 if piece.endswith(b"\r\n") else -1], b"\r\n"
    else:  # the line goes on in the next piece: a soft line break
        content, end = piece, b"=\r\n"
    # istext=False: the content has no line end, and a stray CR is encoded, never sent bare.
    encoded = binascii.b2a_qp(content, quotetabs=False, istext=False, header=False)
    lines = encoded.split(b"=\n")  # b2a_qp's soft line breaks ("=" itself is always =3D)
    if any(line[:1] == b"-" for line in lines[1:]):
        lines = _rewrap(b"".join(lines))
    return b"=\r\n".join(lines) + end


def _rewrap(encoded: bytes) -> list[bytes]:
    """Quoted-printable text cut into lines of at most 76 characters that never start with
    "-": a soft line break must not make a "--boundary" out of the middle of a line."""
    lines: list[bytes] = []
    rest = encoded
    while True:
        if lines and rest[:1] == b"-":
            rest = b"=2D" + rest[1:]
        if len(rest) <= 76:
            lines.append(rest)
            return lines
        cut = 75  # and the soft line break's "=" makes 76
        escape = rest.find(b"=", cut - 2, cut)
        if escape >= 0:  # never inside an "=XX"
            cut = escape
        lines.append(rest[:cut])
        rest = rest[cut:]

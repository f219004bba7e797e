"""Incremental message-content decoding for DATA (and checks shared with BDAT).

``DataDecoder`` finds the end of DATA (only CRLF "." CRLF counts: a bare CR or
LF never ends it, which defeats SMTP smuggling) and removes dot-stuffing.
``BodyChecker`` enforces the content policy on the decoded bytes: size limit,
text line length limit, the rejection of bare CR / bare LF and of NUL (RFC
5322 text never contains it, and servers downstream differ on what they make
of it), and the hop limit that stops a mail loop (``HopCounter``).

All work on whole chunks with C-level bytes methods (find, replace, count,
split) and regular expressions, and hold back at most a few bytes between
calls, so a 25 MiB message arriving in 64 KiB pieces costs a few linear
passes, never a quadratic rebuild and never a Python loop per byte.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_HOPS",
    "BodyChecker",
    "DataDecoder",
    "HopCounter",
    "loop_problem",
    "received_fields",
    "starts_no_field",
]

_END = b"\r\n.\r\n"
# Proper prefixes of _END, longest first: a chunk ending in one of these may
# be cut inside the terminator or inside a "\r\n." that needs unstuffing.
_PARTIAL_ENDS = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


# More Received: fields than this in the header section is a mail loop, refused. RFC 5321 6.3:
# counting them "has proven to be an effective, although rarely optimal, method of detecting
# loops", and servers "MUST contain provisions for detecting and stopping trivial loops". 50 is
# Postfix's hopcount_limit (which counts Postfix's own field too: a message that arrives with
# 49 is refused there); the RFC's "normally at least 100" is a SHOULD that common MTAs undercut
# (sendmail: 25).
MAX_HOPS = 50

# A Received: field's first line (RFC 5322 3.6.7; WSP before the colon is its obsolete syntax,
# 4.5.7, which Postfix counts too). It starts after a CRLF: a continuation line starts with WSP.
_RECEIVED = re.compile(rb"\r\nreceived[ \t]*:", re.IGNORECASE)
# The end of a piece that may still become a Received: field (the field name cut short) or the
# empty line that ends the header section: held back for the next piece to decide.
_UNDECIDED = re.compile(
    rb"\r\n(?:\r|r(?:e(?:c(?:e(?:i(?:v(?:e(?:d[ \t]*)?)?)?)?)?)?)?)?", re.IGNORECASE
)
_NAME_WSP = len(b"\r\nreceived ")  # such a tail with its WSP run cut to one octet

# The octets a message's first line may begin with and be read as a line of its own by every
# reader: a field name's (RFC 5322 ftext, printable ASCII but the colon), or the CR of the
# empty line that ends an empty header section.
_OWN_LINE_STARTS = (frozenset(range(0x21, 0x7F)) - {ord(":")}) | {ord("\r")}


def starts_no_field(content: bytes) -> bool:
    """Does the content's first line begin with an octet no field name begins with? Such a
    line is no field, and a reader may take it for the continuation of the field above it:
    SP and HTAB are RFC 5322's fold, and readers fold on more, VT, FF and a no-break space
    (JavaScript's \\s, which mailauth's and libmime's unfolding use). The message then needs
    an empty line in front, or the line continues the last field mailerd puts above it. Any
    such octet is taken alike, so the answer is the first octet's, whatever the pieces."""
    return bool(content) and content[0] not in _OWN_LINE_STARTS


def _held_back(buf: bytes) -> int:
    """How many trailing bytes of buf might start a pattern spanning chunks."""
    for partial in _PARTIAL_ENDS:
        if buf.endswith(partial):
            return len(partial)
    return 0


class DataDecoder:
    """Turns the dot-stuffed DATA stream into message content.

    Call ``feed(chunk)`` repeatedly; it returns the decoded bytes available so
    far.  Once the terminator has been seen ``finished`` is True and ``rest``
    holds the bytes that followed it (pipelined commands).
    """

    __slots__ = ("_tail", "_at_start", "finished", "rest")

    def __init__(self) -> None:
        # The content starts at the beginning of a line, so the stream is
        # treated as if it began with a CRLF: then ".\r\n" right after the
        # 354 is found as "\r\n.\r\n" and a leading ".." is unstuffed by the
        # same replace as every other line.  That virtual CRLF is dropped
        # from the output.
        self._tail = b"\r\n"
        self._at_start = True
        self.finished = False
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        """Consume data; return the decoded content it completes (maybe b"")."""
        if self.finished:
            raise RuntimeError("DataDecoder already finished")
        buf = self._tail + data if self._tail else data
        end = buf.find(_END)
        if end >= 0:
            region = buf[: end + 2]  # keep the CRLF ending the last line
            self.rest = buf[end + 5 :]
            self._tail = b""
            self.finished = True
        else:
            keep = _held_back(buf)
            if keep:
                region, self._tail = buf[:-keep], buf[-keep:]
            else:
                region, self._tail = buf, b""
        if not region:
            return b""
        # A region never ends inside "\r\n." (held back above), so one replace
        # unstuffs every line; occurrences cannot overlap since "." != "\r".
        out = region.replace(b"\r\n.", b"\r\n")
        if self._at_start:
            self._at_start = False
            out = out[2:]
        return out


class BodyChecker:
    """Incremental policy checks on decoded content.

    Errors are recorded, never raised, and all checks keep running to the
    end: the final verdict is then chosen by a fixed priority (bare CR/LF,
    then NUL, then line length, then size, then hops) and does not depend on how the
    input was split into chunks.
    """

    __slots__ = (
        "_max_size",
        "_max_line",
        "size",
        "_line_len",
        "_cr_pending",
        "bare_cr_lf",
        "nul",
        "line_too_long",
        "too_big",
        "_hops",
        "too_many_hops",
    )

    def __init__(self, max_size: int, max_line: int) -> None:
        self._max_size = max_size
        self._max_line = max_line  # octets including CRLF
        self.size = 0
        self._line_len = 0  # octets of the current unterminated line
        self._cr_pending = False  # the last byte seen was a CR
        self.bare_cr_lf = False
        self.nul = False
        self.line_too_long = False
        self.too_big = False
        self._hops = HopCounter()
        self.too_many_hops = False  # more than MAX_HOPS Received: fields: a mail loop

    @property
    def ok(self) -> bool:
        return not (
            self.bare_cr_lf or self.nul or self.line_too_long or self.too_big or self.too_many_hops
        )

    def feed(self, piece: bytes) -> None:
        """Account for the next piece of content."""
        if not piece:
            return
        self.size += len(piece)
        if self.size > self._max_size:
            self.too_big = True
        if not self.bare_cr_lf:
            self._check_line_ends(piece)
        if not self.nul and b"\0" in piece:
            self.nul = True
        if not self.line_too_long:
            self._check_line_lengths(piece)
        if not self.too_many_hops:
            self._hops.feed(piece)
            self.too_many_hops = self._hops.count > MAX_HOPS

    def finish(self) -> None:
        """The content is complete: a trailing CR can no longer become CRLF."""
        if self._cr_pending:
            self.bare_cr_lf = True

    def _check_line_ends(self, piece: bytes) -> None:
        # With no bare CR and no bare LF, every CR and every LF is part of a
        # CRLF pair, so the three counts agree.
        crs = piece.count(b"\r")
        lfs = piece.count(b"\n")
        pairs = piece.count(b"\r\n")
        if self._cr_pending:
            if piece[0] == 0x0A:
                lfs -= 1  # pairs with the CR that ended the previous piece
            else:
                self.bare_cr_lf = True
        self._cr_pending = piece[-1] == 0x0D
        if self._cr_pending:
            crs -= 1  # undecided until the next piece (or finish())
        if crs != pairs or lfs != pairs:
            self.bare_cr_lf = True

    def _check_line_lengths(self, piece: bytes) -> None:
        limit = self._max_line
        if self._line_len + len(piece) < limit:
            # Fast path: even counted as one line this piece cannot overflow.
            newline = piece.rfind(b"\n")
            self._line_len = (
                self._line_len + len(piece) if newline < 0 else len(piece) - newline - 1
            )
            return
        lines = piece.split(b"\n")
        # Each complete line is len(part) + 1 octets including its LF.
        first = self._line_len + len(lines[0]) + 1
        if len(lines) == 1:
            self._line_len += len(lines[0])
        else:
            self._line_len = len(lines[-1])
            longest = max(map(len, lines[1:-1]), default=0) + 1
            if first > limit or longest > limit:
                self.line_too_long = True
        # An unterminated line already at the limit cannot end in time.
        if self._line_len >= limit:
            self.line_too_long = True


class HopCounter:
    """Counts the Received: fields of the header section as the content goes by.

    A field counts when its line starts with "Received", any WSP and ":", in any case; the
    header section ends at the first empty line, and after it nothing is looked at. Between
    pieces only the start of the last line is kept, and only while it may still become a
    Received: field or the empty line (at most 11 octets), so the count does not depend on how
    the content was cut, costs one C-level pass over the header section, and keeps no content.
    """

    __slots__ = ("count", "_tail", "_done")

    def __init__(self) -> None:
        self.count = 0
        # The content starts at the beginning of a line: as in DataDecoder, a virtual CRLF in
        # front makes a first line "Received:", or an empty first line, match like any other.
        self._tail = b"\r\n"
        self._done = False  # the header section has ended

    def feed(self, piece: bytes) -> None:
        """Account for the next piece of content."""
        if self._done or not piece:
            return
        buf = self._tail + piece
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            self.count += len(_RECEIVED.findall(buf, 0, end))
            self._tail = b""
            self._done = True
            return
        # The tail never holds a whole match (no colon), so nothing is counted twice.
        self.count += len(_RECEIVED.findall(buf))
        self._tail = _undecided(buf)


def _undecided(buf: bytes) -> bytes:
    """The end of buf that the next piece may make a Received: field or the empty line."""
    start = buf.rfind(b"\r\n")
    if start >= 0 and _UNDECIDED.fullmatch(buf, start):
        tail = buf[start:]
        # Only "\r\nreceived" and WSP can be longer: how much WSP does not matter.
        return tail if len(tail) <= _NAME_WSP else tail[: _NAME_WSP - 1] + b" "
    return b"\r" if buf.endswith(b"\r") else b""


def received_fields(content: bytes) -> int:
    """How many Received: fields a whole message's header section has (HopCounter's count)."""
    counter = HopCounter()
    counter.feed(content)
    return counter.count


def loop_problem(content: bytes) -> str | None:
    """Why a whole message is a mail loop (more than MAX_HOPS Received: fields), or None: the
    words of the local paths that refuse one, sendmail and the maildrop's pickup."""
    hops = received_fields(content)
    if hops <= MAX_HOPS:
        return None
    return f"too many hops ({hops} Received: fields, at most {MAX_HOPS})"

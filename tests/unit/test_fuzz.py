"""Property tests (hypothesis) for the SMTP session and the DATA decoder.

1. Any input: no exception, next_event() always comes back, at most one reply
   per complete line; command-only input gets exactly one reply per line (with
   STARTTLS and AUTH offered too, where what follows STARTTLS in the same read is
   dropped, so only the first holds there).
2. How the input is split into reads never changes the outcome.
3. DATA: stuffing then decoding round-trips, and nothing but CRLF.CRLF ends it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from datacases import decode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailerd.smtp import (
    NEED_DATA,
    PAUSED,
    Address,
    AuthRequest,
    BodyData,
    CloseConnection,
    MessageAborted,
    MessageComplete,
    Reply,
    Session,
    SessionConfig,
    StartTLS,
)
from mailerd.smtp.data import BodyChecker

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

QUEUED = Reply(250, "2.0.0", "Queued")
CONFIGS = [
    SessionConfig("mx.example"),
    SessionConfig(
        "mx.example",
        max_message_size=64,
        max_errors=40,
        max_recipients=3,
        max_command_line=64,
        max_text_line=16,
    ),
]
# With STARTTLS and AUTH: a submission listener's, and a local one's (AUTH in clear text).
TLS_CONFIGS = [
    SessionConfig("mx.example", starttls=True, auth=True, tls_required=True, auth_required=True),
    SessionConfig("mx.example", starttls=True, auth=True, auth_in_clear=True, max_errors=5),
]
REPLY_LINE = re.compile(rb"(?:[2-5][0-9][0-9][ -][^\r\n]*[^\s][^\r\n]*|334 )\r\n")
PASSWORD = "pw"  # alice's, for the AuthRequests of the runs


def check_recipient(address: Address) -> Reply | None:
    # Deterministic policy so both accepted and refused recipients occur.
    return Reply(550, "5.1.1", "No such user") if address.local.startswith("x") else None


@dataclass
class Outcome:
    """Everything observable, with BodyData merged per message."""

    events: list[object] = field(default_factory=list)  # all but BodyData
    bodies: list[bytes] = field(default_factory=list)  # of completed messages

    @property
    def replies(self) -> list[Reply]:
        return [e for e in self.events if isinstance(e, Reply)]


def check_mail(sender: Address | None, size: int | None, user: str | None) -> Reply | None:
    if size is not None and size > 5000:
        return Reply(452, "4.3.1", "Insufficient system storage")
    owned = user is None or sender is None or sender.local == user
    return None if owned else Reply(553, "5.7.1", f"Sender address rejected: not owned by {user}")


def run(chunks: list[bytes], config: SessionConfig = CONFIGS[0], eof: bool = True) -> Outcome:
    session = Session(config, check_recipient, check_mail=check_mail)
    outcome = Outcome()
    current: list[bytes] = []
    budget = 4 * sum(len(c) + 4 for c in chunks) + 50  # generous bound on events

    def drain() -> bool:
        nonlocal budget
        while True:
            budget -= 1
            assert budget > 0, "next_event() does not make progress"
            event = session.next_event()
            assert event is not PAUSED  # every MessageComplete is committed at once
            if event is NEED_DATA:
                return False
            if isinstance(event, BodyData):
                assert event.data
                current.append(event.data)
                continue
            outcome.events.append(event)
            if isinstance(event, Reply):
                wire = event.to_bytes()
                assert REPLY_LINE.sub(b"", wire) == b"", wire
            elif isinstance(event, MessageComplete):
                outcome.bodies.append(b"".join(current))
                current.clear()
                session.commit_done(QUEUED)
            elif isinstance(event, MessageAborted):
                current.clear()
            elif isinstance(event, StartTLS):
                session.tls_started()  # (a handshake that always works)
            elif isinstance(event, AuthRequest):
                session.auth_done("alice" if event.password == PASSWORD else None)
            elif isinstance(event, CloseConnection):
                return True

    drain()
    for chunk in chunks:
        session.receive_data(chunk)
        if drain():
            return outcome
    if eof:
        session.receive_data(b"")
        assert drain(), "EOF must end in CloseConnection"
    return outcome


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


# --- strategies --------------------------------------------------------------

FRAGMENTS = [
    b"EHLO client.example\r\n",
    b"HELO [127.0.0.1]\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"MAIL FROM:<> SIZE=10 BODY=8BITMIME\r\n",
    b"MAIL FROM:<j\xc3\xb6rg@b> SMTPUTF8\r\n",
    b"RCPT TO:<c@d>\r\n",
    b"RCPT TO:<xnobody@d>\r\n",
    b"RCPT TO:<Postmaster>\r\n",
    b"DATA\r\n",
    b"BDAT 3\r\n",
    b"BDAT 2 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"VRFY x\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"\x00",
    b"\xff\xfe",
    b"x" * 70,
    b"\n.\n",
    b"\r.\r",
    b"STARTTLS\r\n",
    b"AUTH PLAIN AGFsaWNlAHB3\r\n",  # alice, pw
    b"AUTH PLAIN AGFsaWNlAHg=\r\n",  # alice, x
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN YWxpY2U=\r\n",
    b"YWxpY2U=\r\n",
    b"cHc=\r\n",
    b"*\r\n",
    b"=\r\n",
    b"MAIL FROM:<alice@b> AUTH=<>\r\n",
]

fragments = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), max_size=30
).map(b"".join)

# Command lines that can never switch the session into DATA/BDAT mode.
COMMAND_LINES = [
    b"EHLO client.example",
    b"EHLO",
    b"HELO x",
    b"MAIL FROM:<a@b>",
    b"MAIL FROM:<a@b> SIZE=99999999999",
    b"MAIL FROM:<a@b> FOO=1",
    b"MAIL FROM:bad",
    b"RCPT TO:<c@d>",
    b"RCPT TO:<xnobody@d>",
    b"RCPT TO:<c@d> NOTIFY=NEVER",
    b"RCPT TO:<\xff@d>",
    b"DATA x",
    b"RSET",
    b"RSET x",
    b"NOOP",
    b"NOOP \x00\xff",
    b"VRFY",
    b"HELP",
    b"EXPN list",
    b"STARTTLS",
    b"BOGUS",
    b"QUIT",
    b"EXIT",
    b"NOOP " + b"y" * 600,
]


def _not_data(line: bytes) -> bool:
    verb = line.lstrip(b" ")[:4].upper()
    return b"\r\n" not in line and verb not in (b"DATA", b"BDAT")


command_lines = st.lists(
    st.one_of(st.sampled_from(COMMAND_LINES), st.binary(max_size=30).filter(_not_data)),
    max_size=40,
)


@st.composite
def transactions(draw: st.DrawFn) -> bytes:
    """Mostly well-formed sessions with DATA/BDAT bodies and nasty content."""
    out = [b"EHLO client.example\r\n"]
    for _ in range(draw(st.integers(0, 4))):
        out.append(b"MAIL FROM:<a@b>\r\n")
        out.append(draw(st.sampled_from([b"RCPT TO:<c@d>\r\n", b"RCPT TO:<xno@d>\r\n"])))
        body = draw(
            st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=8)), max_size=12)
        )
        content = b"".join(body)
        if draw(st.booleans()):
            out.append(b"DATA\r\n" + content + b"\r\n.\r\n")
        else:
            out.append(b"BDAT %d LAST\r\n" % len(content) + content)
    out.append(draw(st.sampled_from([b"QUIT\r\n", b"NOOP\r\n", b""])))
    return b"".join(out)


# --- property 1: robustness and one reply per line -------------------------------------------


@FAST
@given(data=st.one_of(fragments, st.binary(max_size=300)), config=st.sampled_from(CONFIGS))
def test_arbitrary_input_never_raises_and_replies_at_most_once_per_line(data, config):
    outcome = run([data], config)
    replies = outcome.replies
    assert replies[0].code == 220
    # One reply per line at most: a CRLF ends one, and a line a bare LF was answered in (at
    # the LF) may still be open at the end of the input.
    still_open = b"\n" in data.rsplit(b"\r\n", 1)[-1]
    assert len(replies) <= 1 + data.count(b"\r\n") + still_open
    assert isinstance(outcome.events[-1], CloseConnection)
    closing = [i for i, r in enumerate(replies) if r.close]
    assert closing in ([], [len(replies) - 1])  # nothing after a closing reply


@FAST
@given(lines=command_lines, config=st.sampled_from(CONFIGS))
def test_every_command_line_gets_exactly_one_reply(lines, config):
    data = b"".join(line + b"\r\n" for line in lines)
    replies = run([data], config, eof=False).replies
    answered = len(replies) - 1  # minus the greeting
    if replies[-1].close:
        assert answered <= len(lines)
    else:
        assert answered == len(lines)


@FAST
@given(data=st.one_of(fragments, st.binary(max_size=300)), config=st.sampled_from(TLS_CONFIGS))
def test_arbitrary_input_with_tls_and_auth_never_raises(data, config):
    test_arbitrary_input_never_raises_and_replies_at_most_once_per_line.hypothesis.inner_test(
        data, config
    )


# --- property 2: split invariance -------------------------------------------------------------


def _same(a: Outcome, b: Outcome) -> None:
    assert a.events == b.events
    assert a.bodies == b.bodies


@settings(max_examples=100, deadline=None)
@given(
    data=st.one_of(transactions(), fragments),
    cuts=st.lists(st.integers(0, 400), max_size=12),
    config=st.sampled_from(CONFIGS),
)
def test_splitting_the_input_changes_nothing(data, cuts, config):
    whole = run([data], config)
    _same(whole, run(split_at(data, cuts), config))
    _same(whole, run([data[i : i + 1] for i in range(len(data))], config))


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 5000), piece=st.integers(1, 9000))
def test_large_bodies_in_pieces(size, piece):
    content = (b"line of text\r\n" * (size // 14 + 1))[:size]
    data = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + content + b"\r\n.\r\n"
    outcome = run(split_at(data, list(range(piece, len(data), piece))))
    if content.endswith(b"\r"):  # "\r" + "\r\n.\r\n": a bare CR, so rejected
        assert outcome.bodies == [] and outcome.replies[-1].code == 550
    else:
        assert outcome.bodies == [content + b"\r\n"]


# --- property 3: the DATA decoder ----------------------------------------------------------------


def stuff(body: bytes) -> bytes:
    """What a correct client sends for body: dot-stuffed, CRLF-terminated, plus the end marker."""
    wire = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
    if body and not body.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire + b".\r\n"


body_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"..", b"\r\n.\r\n", b"x"]), st.binary()
    ),
    max_size=20,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(body=body_bytes, trailer=st.binary(max_size=20), cuts=st.lists(st.integers(0, 300)))
def test_stuffing_then_decoding_round_trips(body, trailer, cuts):
    wire = stuff(body) + trailer
    expected = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
    assert decode(*split_at(wire, cuts)) == (expected, True, trailer)


@settings(max_examples=300, deadline=None)
@given(data=body_bytes, cuts=st.lists(st.integers(0, 300)))
def test_only_crlf_dot_crlf_ends_data(data, cuts):
    stream = b"\r\n" + data  # DATA content starts at the beginning of a line
    end = stream.find(b"\r\n.\r\n")
    content, finished, rest = decode(*split_at(data, cuts))
    assert finished == (end >= 0)
    if finished:
        assert rest == stream[end + 5 :]
        assert content == stream[: end + 2].replace(b"\r\n.", b"\r\n")[2:]
    else:
        # whatever was handed out so far is a prefix of the decoded content
        assert (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:].startswith(content)


@settings(max_examples=300, deadline=None)
@given(data=body_bytes, cuts=st.lists(st.integers(0, 300)), max_line=st.integers(2, 12))
def test_checker_matches_a_reference(data, cuts, max_line):
    checker = BodyChecker(50, max_line)
    for piece in split_at(data, cuts):
        checker.feed(piece)
    checker.finish()
    remainder = data.replace(b"\r\n", b"")
    assert checker.bare_cr_lf == (b"\r" in remainder or b"\n" in remainder)
    lines = data.split(b"\n")
    too_long = any(len(line) + 1 > max_line for line in lines[:-1]) or len(lines[-1]) >= max_line
    assert checker.line_too_long == too_long
    assert checker.too_big == (len(data) > 50)

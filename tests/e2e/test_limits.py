"""Protocol limits: line length, recipient count, idle timeout, error budget, garbage input."""

from __future__ import annotations

import time

import pytest

from .conftest import (
    Mailerd,
    SMTPConn,
    check_stored,
    expect,
    mail_rcpt,
    run_mailerd,
    send_data,
    send_message,
)


@pytest.mark.parametrize("length", [513, 600, 5000, 100_000])
def test_long_command_line(shared_mailerd: Mailerd, length: int):
    """A command line longer than 512 octets (with CRLF) gets 500 5.5.6; the session goes on."""
    with shared_mailerd.connect() as c:
        c.start()
        line = b"NOOP " + b"x" * (length - len(b"NOOP ") - 2) + b"\r\n"
        assert len(line) == length
        c.send(line)
        expect(c.read_reply(), 500, "5.5.6", conn=c)
        # exactly one reply for the long line: the next reply is the NOOP's
        expect(c.cmd("NOOP"), 250, conn=c)
        expect(c.cmd("NOOP"), 250, conn=c)
        expect(c.cmd("QUIT"), 221, conn=c)


def test_command_line_of_exactly_512_octets_is_fine(shared_mailerd: Mailerd):
    with shared_mailerd.connect() as c:
        c.start()
        line = b"NOOP " + b"x" * (512 - len(b"NOOP ") - 2) + b"\r\n"
        assert len(line) == 512
        c.send(line)
        expect(c.read_reply(), 250, conn=c)
        expect(c.cmd("NOOP"), 250, conn=c)


def test_long_line_inside_transaction(shared_mailerd: Mailerd):
    """An overlong MAIL FROM is refused as a whole; the transaction can then start normally."""
    m = shared_mailerd
    user = m.new_user("longmail")
    body = b"Subject: after long line\r\n\r\nok\r\n"
    with m.connect() as c:
        c.start()
        c.send(b"MAIL FROM:<" + b"a" * 600 + b"@client.test>\r\n")
        expect(c.read_reply(), 500, "5.5.6", conn=c)
        send_message(c, f"{user}@example.org", body)
        c.cmd("QUIT")
    assert m.wait_messages(user, 1, timeout=5) == [1]
    check_stored(m.read(user, 1), sender="sender@client.test", helo="client.test", body=body)


def _to_many(m: Mailerd, user: str, limit: int, beyond: int) -> None:
    """One message to `limit` + `beyond` addresses of `user`, pipelined: the first `limit`
    are accepted, the rest get 452 4.5.3, and the transaction stays valid for those
    accepted (the message is delivered)."""
    count = limit + beyond
    with m.connect() as c:
        c.start()
        expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
        c.send(b"".join(f"RCPT TO:<{user}+{i}@example.org>\r\n".encode() for i in range(count)))
        replies = c.read_replies(count)
        for i, r in enumerate(replies[:limit]):
            assert r.code == 250, f"recipient {i + 1} should be accepted: {r}"
        for r in replies[limit:]:
            expect(r, 452, "4.5.3", conn=c)
        send_data(c, b"Subject: many\r\n\r\nmany\r\n")
        expect(c.cmd("QUIT"), 221, conn=c)
    assert m.wait_messages(user, 1, timeout=5), "the message was not delivered"


def test_too_many_recipients(shared_mailerd: Mailerd):
    _to_many(shared_mailerd, shared_mailerd.new_user("many"), 100, 2)


def test_max_recipients_raises_the_limit(mailerd_factory):
    """--max-recipients: an operator whose users write to larger lists raises it (msmtp, curl
    and git send-email give up at the 452 rather than send the rest in another transaction:
    a helper's pass with mail programs); below RFC 5321's 100 it is refused."""
    m = mailerd_factory(extra=["--max-recipients", "150"])
    _to_many(m, m.new_user("list"), 150, 1)
    low = run_mailerd(["--max-recipients", "99", "-l", "127.0.0.1:1", "-n", "none"])
    assert low.returncode == 2 and "max-recipients" in low.stderr, low


# --------------------------------------------------------------------------------------------
# --timeout
# --------------------------------------------------------------------------------------------


@pytest.fixture
def quick_timeout(mailerd_factory) -> Mailerd:
    return mailerd_factory(extra=["--timeout", "2s"])


def _expect_timeout(c: SMTPConn, started: float) -> None:
    r = c.read_reply()  # socket timeout is IO_TIMEOUT (15 s): well above the 2 s configured
    elapsed = time.monotonic() - started
    expect(r, 421, "4.4.2", conn=c)
    assert elapsed >= 1.5, f"timed out too early ({elapsed:.2f}s for --timeout 2s)"
    assert elapsed < 12, f"timed out too late ({elapsed:.2f}s for --timeout 2s)"
    assert c.wait_eof(5) is not None, "connection not closed after 421"


def test_idle_timeout_after_banner(quick_timeout: Mailerd):
    with quick_timeout.connect() as c:
        expect(c.banner(), 220)
        _expect_timeout(c, time.monotonic())


def test_idle_timeout_in_transaction(quick_timeout: Mailerd):
    with quick_timeout.connect(host="::1") as c:
        c.start()
        expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
        _expect_timeout(c, time.monotonic())


def test_idle_timeout_in_data(quick_timeout: Mailerd):
    m = quick_timeout
    m.add_user("slow")
    with m.connect() as c:
        c.start()
        mail_rcpt(c, "slow@example.org")
        expect(c.cmd("DATA"), 354, conn=c)
        c.send(b"Subject: never finished\r\n\r\npartial")
        _expect_timeout(c, time.monotonic())
    assert m.messages("slow") == []


def test_idle_timeout_after_a_slow_message(mailerd_factory):
    """Content that keeps up --min-data-rate may take long, with a far deadline; once it is
    in, the next command is due --timeout after our 250, not at the content's deadline (the
    timer armed while the content came in was once left at it: a client could then hold its
    session idle for as long as its content had earned)."""
    m = mailerd_factory(extra=["--timeout", "2s", "--min-data-rate", "1000"])
    m.add_user("slowbig")
    with m.connect() as c:
        c.start()
        mail_rcpt(c, "slowbig@example.org")
        expect(c.cmd("DATA"), 354, conn=c)
        begun = time.monotonic()
        c.send(b"Subject: slow but steady\r\n\r\n" + b"x" * 78 + b"\r\n")
        c.send((b"y" * 78 + b"\r\n") * 250)  # 20 kB: the content's deadline is ~22 s away
        while time.monotonic() - begun < 2.8:  # past the first check (2 s after the banner)
            time.sleep(0.4)
            c.send(b"z\r\n")
        expect(c.cmd("."), 250, conn=c)
        _expect_timeout(c, time.monotonic())
    assert m.wait_messages("slowbig", 1, timeout=5)


def test_activity_resets_timeout(quick_timeout: Mailerd):
    """The timeout is for idleness: a client that talks every second is not cut off."""
    with quick_timeout.connect() as c:
        c.start()
        for _ in range(4):
            time.sleep(1.0)
            expect(c.cmd("NOOP"), 250, conn=c)
        expect(c.cmd("QUIT"), 221, conn=c)


# --------------------------------------------------------------------------------------------
# --max-errors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def strict(mailerd_factory) -> Mailerd:
    return mailerd_factory(extra=["--max-errors", "3"])


def test_max_errors(strict: Mailerd):
    with strict.connect() as c:
        c.start()
        for i in range(3):
            r = c.cmd(f"BOGUS{i}")
            assert 500 <= r.code < 600 and r.enhanced, f"bad command {i + 1}: {r}"
        # three errors are within the budget
        expect(c.cmd("NOOP"), 250, conn=c)
        c.send(b"BOGUS4\r\n")
        replies, eof = c.read_all_replies(timeout=10)
        assert replies, f"no reply to the 4th bad command:\n{c.dialogue()}"
        assert len(replies) <= 2, c.dialogue()
        expect(replies[-1], 421, "4.7.0", conn=c)
        if len(replies) == 2:
            assert 500 <= replies[0].code < 600, c.dialogue()
        assert eof, f"connection not closed after 421 4.7.0:\n{c.dialogue()}"


def test_max_errors_counts_other_errors(strict: Mailerd):
    """Syntax errors and bad sequences count too, not only unknown commands."""
    with strict.connect() as c:
        c.start()
        assert c.cmd("MAIL FROM:bad-syntax").code // 100 == 5
        assert c.cmd("RCPT TO:<x@example.org>").code // 100 == 5  # no MAIL yet
        assert c.cmd("DATA").code // 100 == 5  # no MAIL yet
        c.send(b"WHAT\r\n")
        replies, eof = c.read_all_replies(timeout=10)
        assert replies and len(replies) <= 2, c.dialogue()
        expect(replies[-1], 421, "4.7.0", conn=c)
        assert eof, c.dialogue()


# --------------------------------------------------------------------------------------------
# Garbage
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\xff\xfe\x80\xc3(garbage\r\n", id="invalid-utf8"),
        pytest.param(b"\x00\x00\x00\r\n", id="nuls"),
        pytest.param(b"\xc0\xaf\xed\xa0\x80 MAIL\r\n", id="overlong-surrogate"),
        pytest.param(b"NO\xffOP\r\n", id="binary-in-verb"),
    ],
)
def test_garbage_gets_500_and_session_survives(shared_mailerd: Mailerd, garbage: bytes):
    m = shared_mailerd
    user = m.new_user("garbage")
    body = b"Subject: after garbage\r\n\r\nstill fine\r\n"
    with m.connect() as c:
        c.start()
        c.send(garbage)
        r = c.read_reply()
        assert r.code == 500, f"garbage {garbage!r} should get 500: {r}"
        assert r.enhanced and r.enhanced.startswith("5."), r
        expect(c.cmd("NOOP"), 250, conn=c)
        send_message(c, f"{user}@example.org", body)
        expect(c.cmd("QUIT"), 221, conn=c)
    check_stored(m.read(user, 1), sender="sender@client.test", helo="client.test", body=body)


def test_garbage_in_mail_from(shared_mailerd: Mailerd):
    with shared_mailerd.connect() as c:
        c.start()
        c.send(b"MAIL FROM:<\xff\xfe@client.test>\r\n")
        r = c.read_reply()
        assert 500 <= r.code < 600 and r.enhanced, f"non-UTF-8 address must be refused: {r}"
        expect(c.cmd("NOOP"), 250, conn=c)

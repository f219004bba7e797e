"""The SMTP session state machine: every reply code, DATA/BDAT, limits, pipelining."""

from __future__ import annotations

import smtplib
import socket
import threading
from collections.abc import Callable

import pytest
from datacases import SMUGGLING_VECTORS

from mailerd import intake, recipients
from mailerd.smtp import (
    NEED_DATA,
    PAUSED,
    PENDING,
    Address,
    BodyData,
    CloseConnection,
    Envelope,
    MessageAborted,
    MessageComplete,
    Rejected,
    Reply,
    Session,
    SessionConfig,
    commands,
)
from mailerd.smtp.data import MAX_HOPS
from mailerd.smtp.replies import SEND_LIMIT

QUEUED = Reply(250, "2.0.0", "Queued")


class Client:
    """Drives a Session like the I/O layer does and records what came out.

    ``send()`` feeds bytes and returns the replies they produced.  A
    MessageComplete is answered at once with ``commit_reply`` unless
    ``auto_commit`` is off, in which case the session stays PAUSED.
    """

    def __init__(
        self,
        check: Callable[[Address], Reply | None] | None = None,
        *,
        auto_commit: bool = True,
        commit_reply: Reply = QUEUED,
        check_mail: Callable[[Address | None, int | None, str | None], Reply | None] | None = None,
        **config: int,
    ) -> None:
        self.session = Session(
            SessionConfig("mx.example", **config), check or (lambda a: None), check_mail=check_mail
        )
        self.auto_commit = auto_commit
        self.commit_reply = commit_reply
        self.events: list[object] = []
        self.messages: list[tuple[Envelope, bytes]] = []
        self.aborted: list[str] = []
        self.rejected: list[Rejected] = []
        self.closed = False
        self.paused = False
        self._body: list[bytes] = []
        greeting = self.drain()
        assert [r.code for r in greeting] == [220]

    def drain(self) -> list[Reply]:
        replies = []
        while True:
            event = self.session.next_event()
            if event is NEED_DATA:
                self.paused = False
                return replies
            if event is PAUSED:
                self.paused = True
                return replies
            self.events.append(event)
            if isinstance(event, Reply):
                replies.append(event)
            elif isinstance(event, BodyData):
                self._body.append(event.data)
            elif isinstance(event, MessageAborted):
                self.aborted.append(event.reason)
                self._body = []
            elif isinstance(event, Rejected):
                self.rejected.append(event)
            elif isinstance(event, MessageComplete):
                self.messages.append((event.envelope, b"".join(self._body)))
                self._body = []
                if self.auto_commit:
                    self.session.commit_done(self.commit_reply)
            elif isinstance(event, CloseConnection):
                self.closed = True
                return replies
            else:  # pragma: no cover - a new event type would need a test
                raise AssertionError(f"unexpected event {event!r}")

    def send(self, data: bytes) -> list[Reply]:
        self.session.receive_data(data)
        return self.drain()

    def cmd(self, line: str | bytes) -> Reply:
        raw = line.encode() if isinstance(line, str) else line
        replies = self.send(raw + b"\r\n")
        assert len(replies) == 1, replies
        return replies[0]

    def codes(self, data: bytes) -> list[int]:
        return [r.code for r in self.send(data)]

    def ready(self, helo: str = "EHLO client.example") -> Client:
        assert self.cmd(helo).code == 250
        return self

    def transaction(self, sender: str = "<a@example.org>", rcpt: str = "<b@example.net>") -> Client:
        self.ready()
        assert self.cmd(f"MAIL FROM:{sender}").code == 250
        assert self.cmd(f"RCPT TO:{rcpt}").code == 250
        return self


def status(reply: Reply) -> tuple[int, str | None]:
    return reply.code, reply.status


# --- Reply ---------------------------------------------------------------------


def test_reply_bytes_single_and_multi_line():
    assert Reply(250, "2.0.0", "OK").to_bytes() == b"250 2.0.0 OK\r\n"
    assert Reply(214, "2.0.0", "a\nb\nc").to_bytes() == (
        b"214-2.0.0 a\r\n214-2.0.0 b\r\n214 2.0.0 c\r\n"
    )
    assert Reply(220, None, "mx ESMTP").to_bytes() == b"220 mx ESMTP\r\n"


@pytest.mark.parametrize(
    "code,status,text",
    [
        (250, None, ""),
        (250, None, "a\n\nb"),
        (250, "2.0.0", " "),
        (250, "2.0.0", "a\rb"),
        (250, "5.0.0", "class mismatch"),
        (250, "2.0", "short"),
        (99, None, "x"),
        (600, None, "x"),
        (260, None, "second digit"),
    ],
)
def test_reply_rejects_malformed_replies(code, status, text):
    with pytest.raises(ValueError):
        Reply(code, status, text)


def test_reply_is_frozen_and_hashable():
    reply = Reply(250, "2.0.0", "OK")
    assert reply == Reply(250, "2.0.0", "OK") and hash(reply) == hash(Reply(250, "2.0.0", "OK"))
    with pytest.raises(AttributeError):
        reply.code = 550  # type: ignore[misc]


def test_sentinels_have_useful_reprs():
    assert repr(NEED_DATA) == "NEED_DATA" and repr(PAUSED) == "PAUSED"
    assert NEED_DATA is not PAUSED


# --- greeting, EHLO, HELO -----------------------------------------------------


def test_greeting_is_first_event():
    session = Session(SessionConfig("mx.example"), lambda a: None)
    greeting = session.next_event()
    assert greeting == Reply(220, None, "mx.example ESMTP mailerd")
    assert greeting.to_bytes() == b"220 mx.example ESMTP mailerd\r\n"
    assert session.next_event() is NEED_DATA


def test_ehlo_reply_is_parseable_by_smtplib_rules():
    reply = Client().cmd("EHLO client.example")
    lines = reply.to_bytes().decode().split("\r\n")[:-1]
    assert lines[0] == "250-mx.example Hello"
    assert lines[-1].startswith("250 ")
    assert all(line[:4] == "250-" for line in lines[:-1])
    keywords = {line[4:].split(" ")[0]: line[4:] for line in lines[1:]}
    assert keywords["SIZE"] == "SIZE 26214400"
    for keyword in (
        "PIPELINING",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "HELP",
        "CHUNKING",
    ):
        assert keyword in keywords
    assert reply.status is None  # RFC 2034 section 4 exempts EHLO replies


def test_ehlo_advertises_configured_size():
    reply = Client(max_message_size=1234).cmd("EHLO x")
    assert "\nSIZE 1234\n" in reply.text


@pytest.mark.parametrize(
    "argument", ["client.example", "[127.0.0.1]", "[IPv6:::1]", "[ipv6:::1]", "[IPV6:2001:db8::1]"]
)
def test_ehlo_and_helo_accept_domains_and_address_literals(argument):
    assert Client().cmd(f"EHLO {argument}").code == 250
    reply = Client().cmd(f"HELO {argument}")
    assert reply.code == 250 and reply.text.startswith("mx.example")


@pytest.mark.parametrize(
    "line", ["EHLO", "EHLO ", "HELO", "EHLO a b", "EHLO [1.2.3.999]", "HELO -x"]
)
def test_ehlo_helo_syntax_errors(line):
    assert status(Client().cmd(line)) == (501, "5.5.4")


def test_verbs_are_case_insensitive():
    client = Client()
    assert client.cmd("ehlo x").code == 250
    assert client.cmd("mail from:<a@b>").code == 250
    assert client.cmd("Rcpt To:<c@d>").code == 250
    assert client.cmd("data").code == 354


def test_helo_session_is_not_esmtp():
    client = Client()
    client.cmd("HELO client.example")
    client.cmd("MAIL FROM:<a@b>")
    client.cmd("RCPT TO:<c@d>")
    client.cmd("DATA")
    client.send(b"x\r\n.\r\n")
    envelope, _ = client.messages[0]
    assert envelope.helo == "client.example" and envelope.esmtp is False


# --- sequence errors -------------------------------------------------------------


def test_mail_before_helo():
    assert status(Client().cmd("MAIL FROM:<a@b>")) == (503, "5.5.1")


def test_nested_mail():
    client = Client().ready()
    client.cmd("MAIL FROM:<a@b>")
    assert status(client.cmd("MAIL FROM:<a@b>")) == (503, "5.5.1")


def test_rcpt_before_mail():
    assert status(Client().ready().cmd("RCPT TO:<a@b>")) == (503, "5.5.1")


def test_data_before_mail():
    assert status(Client().ready().cmd("DATA")) == (503, "5.5.1")
    assert status(Client().cmd("DATA")) == (503, "5.5.1")


def test_data_without_accepted_recipient():
    client = Client(lambda a: Reply(550, "5.1.1", "No such user"))
    client.ready().cmd("MAIL FROM:<a@b>")
    assert status(client.cmd("RCPT TO:<c@d>")) == (550, "5.1.1")
    assert status(client.cmd("DATA")) == (554, "5.5.1")


# --- MAIL FROM -------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "MAIL FROM:<a@b>",
        "MAIL FROM: <a@b>",
        "MAIL FROM:<>",
        "MAIL FROM:<a@b> SIZE=123 BODY=8BITMIME",
        "MAIL FROM:<a@b> BODY=7bit",
        "MAIL FROM:<a@b> SMTPUTF8",
        "MAIL FROM:<@relay.example:a@b>",
        'MAIL FROM:<"quoted sender"@b>',
        "MAIL FROM:<a@[192.0.2.1]>",
    ],
)
def test_mail_accepted(line):
    assert status(Client().ready().cmd(line)) == (250, "2.1.0")


def test_mail_parameters_reach_the_envelope():
    client = Client().transaction(sender="<a@b> SIZE=123 BODY=8BITMIME")
    client.cmd("DATA")
    client.send(b"x\r\n.\r\n")
    envelope, body = client.messages[0]
    assert envelope == Envelope(
        sender=Address("a", "b", False),
        recipients=(Address("b", "example.net", False),),
        helo="client.example",
        esmtp=True,
        body="8BITMIME",
        smtputf8=False,
        declared_size=123,
    )
    assert body == b"x\r\n"


def test_null_sender_is_none():
    client = Client().transaction(sender="<>")
    client.cmd("DATA")
    client.send(b".\r\n")
    assert client.messages[0][0].sender is None


@pytest.mark.parametrize(
    "line,expected",
    [
        ("MAIL FROM:<a@b> SIZE=26214401", (552, "5.3.4")),
        ("MAIL FROM:<a@b> SIZE=abc", (501, "5.5.4")),
        ("MAIL FROM:<a@b> SIZE", (501, "5.5.4")),
        ("MAIL FROM:<a@b> BODY=BINARYMIME", (501, "5.5.4")),
        ("MAIL FROM:<a@b> SMTPUTF8=yes", (501, "5.5.4")),
        ("MAIL FROM:<a@b> SIZE=1 SIZE=2", (501, "5.5.4")),
        ("MAIL FROM:<a@b> FOO=bar", (555, "5.5.4")),
        ("MAIL FROM:<a@b> RET=HDRS", (555, "5.5.4")),
        ("MAIL FROM:<a@b> SIZE==1", (501, "5.5.4")),
        ("MAIL", (501, "5.5.4")),
        ("MAIL TO:<a@b>", (501, "5.5.4")),
        ("MAIL FROM:a@b", (501, "5.1.7")),
        ("MAIL FROM:<a@b..c>", (501, "5.1.7")),
        ("MAIL FROM:<a@b", (501, "5.1.7")),
        ("MAIL FROM:<a@[1.2.3.4.5]>", (501, "5.1.7")),
        ("MAIL FROM:<jörg@b>", (553, "5.6.7")),
        ("MAIL FROM:<a@bücher.de>", (553, "5.6.7")),
    ],
)
def test_mail_errors(line, expected):
    assert status(Client().ready().cmd(line)) == expected


def test_mail_size_limit_follows_config():
    assert Client(max_message_size=100).ready().cmd("MAIL FROM:<a@b> SIZE=101").code == 552
    assert Client(max_message_size=100).ready().cmd("MAIL FROM:<a@b> SIZE=100").code == 250


def test_failed_mail_does_not_start_a_transaction():
    client = Client().ready()
    client.cmd("MAIL FROM:<a@b> FOO=1")
    assert client.cmd("RCPT TO:<c@d>").code == 503
    assert client.cmd("MAIL FROM:<a@b>").code == 250


def test_invalid_utf8_in_address_is_a_syntax_error():
    client = Client().ready()
    assert status(client.cmd(b"MAIL FROM:<\xff\xfe@client.test>")) == (501, "5.5.2")
    client.cmd("MAIL FROM:<a@b> SMTPUTF8")
    assert client.cmd(b"RCPT TO:<\xc3(@x>").code == 501


# --- RCPT TO ---------------------------------------------------------------------


def test_rcpt_replies_and_recipients():
    seen: list[Address] = []

    def check(address: Address) -> Reply | None:
        seen.append(address)
        return None

    client = Client(check).ready()
    client.cmd("MAIL FROM:<a@b>")
    lines = [
        ("RCPT TO:<user@example.org>", Address("user", "example.org", False)),
        ("RCPT TO: <user2@example.org>", Address("user2", "example.org", False)),
        ("RCPT TO:<Postmaster>", Address("Postmaster", "", False)),
        ("RCPT TO:<postmaster@example.org>", Address("postmaster", "example.org", False)),
        ("RCPT TO:<@a,@b:user@c>", Address("user", "c", False)),
        ('RCPT TO:<"a b"@x>', Address("a b", "x", True)),
        ("RCPT TO:<u@[1.2.3.4]>", Address("u", "[1.2.3.4]", False)),
        ("RCPT TO:<u@[IPv6:2001:db8::1]>", Address("u", "[IPv6:2001:db8::1]", False)),
    ]
    for line, _ in lines:
        assert status(client.cmd(line)) == (250, "2.1.5"), line
    assert seen == [address for _, address in lines]
    client.cmd("DATA")
    client.send(b".\r\n")
    assert client.messages[0][0].recipients == tuple(seen)


@pytest.mark.parametrize(
    "line,expected",
    [
        ("RCPT TO:<a@b> NOTIFY=NEVER", (555, "5.5.4")),
        ("RCPT TO:<a@b> X", (555, "5.5.4")),
        ("RCPT", (501, "5.5.4")),
        ("RCPT FROM:<a@b>", (501, "5.5.4")),
        ("RCPT TO:<>", (550, "5.1.3")),
        ("RCPT TO:<..@example.org>", (550, "5.1.3")),
        ("RCPT TO:<user@remote.test@example.org>", (550, "5.1.3")),
        ("RCPT TO:a@b", (550, "5.1.3")),
        ('RCPT TO:<"a\x01b"@example.org>', (550, "5.1.3")),
        ("RCPT TO:<jörg@b>", (553, "5.6.7")),
    ],
)
def test_rcpt_errors(line, expected):
    called = []
    client = Client(lambda a: called.append(a)).ready()
    client.cmd("MAIL FROM:<a@b>")
    assert status(client.cmd(line)) == expected
    assert called == []  # the policy only sees acceptable recipients


def test_smtputf8_allows_utf8_addresses():
    client = Client().ready()
    assert client.cmd("MAIL FROM:<jörg@bücher.de> SMTPUTF8").code == 250
    assert client.cmd("RCPT TO:<用户@例子.广告>").code == 250
    assert client.cmd('RCPT TO:<"ü ü"@x>').code == 250
    client.cmd("DATA")
    client.send("Subject: ü\r\n\r\n✓\r\n.\r\n".encode())
    envelope, body = client.messages[0]
    assert envelope.smtputf8 and envelope.sender == Address("jörg", "bücher.de", False)
    assert envelope.recipients[0] == Address("用户", "例子.广告", False)
    assert body == "Subject: ü\r\n\r\n✓\r\n".encode()


def test_recipient_limit():
    calls = []
    client = Client(lambda a: calls.append(a), max_recipients=3).ready()
    client.cmd("MAIL FROM:<a@b>")
    replies = client.send(b"".join(b"RCPT TO:<u%d@x>\r\n" % i for i in range(5)))
    assert [status(r) for r in replies] == [(250, "2.1.5")] * 3 + [(452, "4.5.3")] * 2
    assert len(calls) == 3  # not called for refused-by-count recipients
    assert client.cmd("DATA").code == 354
    client.send(b"x\r\n.\r\n")
    assert len(client.messages[0][0].recipients) == 3


def test_default_recipient_limit_is_100():
    client = Client().ready()
    client.cmd("MAIL FROM:<a@b>")
    codes = client.codes(b"".join(b"RCPT TO:<u%d@x>\r\n" % i for i in range(102)))
    assert codes == [250] * 100 + [452, 452]


def test_check_recipient_reply_is_sent_and_positive_replies_accept():
    def check(address: Address) -> Reply | None:
        if address.local == "nobody":
            return Reply(550, "5.1.1", "No such user")
        if address.local == "relay":
            return Reply(554, "5.7.1", "Relay access denied")
        if address.local == "fwd":
            return Reply(251, "2.1.5", "User not local; will forward")
        return None

    client = Client(check).ready()
    client.cmd("MAIL FROM:<a@b>")
    assert status(client.cmd("RCPT TO:<nobody@x>")) == (550, "5.1.1")
    assert status(client.cmd("RCPT TO:<relay@x>")) == (554, "5.7.1")
    assert status(client.cmd("RCPT TO:<fwd@x>")) == (251, "2.1.5")
    assert client.cmd("DATA").code == 354
    client.send(b".\r\n")
    assert client.messages[0][0].recipients == (Address("fwd", "x", False),)


# --- other commands ------------------------------------------------------------


@pytest.mark.parametrize(
    "line,expected",
    [
        ("NOOP", (250, "2.0.0")),
        ("NOOP anything at all", (250, "2.0.0")),
        ("RSET", (250, "2.0.0")),
        ("VRFY someone", (252, "2.5.0")),
        ("VRFY", (501, "5.5.4")),
        ("HELP", (214, "2.0.0")),
        ("HELP MAIL", (214, "2.0.0")),
        ("DATA x", (501, "5.5.4")),
        ("RSET x", (501, "5.5.4")),
        ("QUIT x", (501, "5.5.4")),
        ("EXIT x", (501, "5.5.4")),
        ("BOGUS", (500, "5.5.2")),
        ("GET / HTTP/1.1", (500, "5.5.2")),
    ],
)
def test_simple_commands(line, expected):
    reply = Client().cmd(line)
    assert status(reply) == expected and not reply.close


def test_help_is_multi_line_with_status_on_every_line():
    wire = Client().cmd("HELP").to_bytes()
    assert wire.count(b"\r\n") == 2 and wire.startswith(b"214-2.0.0 ") and b"\r\n214 2.0.0 " in wire


@pytest.mark.parametrize(
    "verb", ["EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML", "STARTTLS", "AUTH", "expn"]
)
def test_known_but_unimplemented_verbs(verb):
    assert status(Client().cmd(f"{verb} x")) == (502, "5.5.1")
    assert status(Client().cmd(verb)) == (502, "5.5.1")


@pytest.mark.parametrize("verb", ["QUIT", "EXIT", "quit", "Exit"])
def test_quit_and_exit_close(verb):
    client = Client()
    reply = client.cmd(verb)
    assert status(reply) == (221, "2.0.0") and reply.close
    assert client.closed
    assert isinstance(client.session.next_event(), CloseConnection)
    client.session.receive_data(b"NOOP\r\n")  # ignored after the closing reply
    assert isinstance(client.session.next_event(), CloseConnection)


def test_rset_resets_the_transaction():
    client = Client().transaction()
    client.cmd("RSET")
    assert client.cmd("RCPT TO:<c@d>").code == 503
    assert client.cmd("MAIL FROM:<a@b>").code == 250


@pytest.mark.parametrize("greeting", ["EHLO again.example", "HELO again.example"])
def test_ehlo_and_helo_reset_the_transaction(greeting):
    client = Client().transaction()
    assert client.cmd(greeting).code == 250
    assert client.cmd("DATA").code == 503
    assert client.cmd("MAIL FROM:<a@b>").code == 250


def test_failed_ehlo_keeps_the_transaction():
    client = Client().transaction()
    assert client.cmd("EHLO").code == 501
    assert client.cmd("DATA").code == 354


# --- garbage and line length -----------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"\xff\xfe\x80\xc3(garbage", b"\x00\x00\x00", b"\xc0\xaf\xed\xa0\x80 MAIL", b"NO\xffOP", b""],
)
def test_garbage_gets_500_and_the_session_survives(line):
    client = Client()
    assert status(client.cmd(line)) == (500, "5.5.2")
    assert client.cmd("EHLO x").code == 250


def test_bare_lf_inside_a_command_line_is_not_a_separator():
    client = Client().ready()
    replies = client.send(b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\r\n")
    assert [status(r) for r in replies] == [(500, "5.5.2")]
    assert client.codes(b"NOOP\r\n") == [250] and client.session._in_mail is False


def test_a_line_ended_by_a_bare_lf_is_answered_at_once():
    """A client that ends its lines with LF alone got no reply until a CRLF, which it never
    sends: it waited for the timeout (an RFC review). The LF is answered at once; the rest of
    that line, up to a CRLF, is discarded, whatever the reads (the LF separates nothing)."""
    client = Client().ready()
    assert [status(r) for r in client.send(b"NOOP\n")] == [(500, "5.5.2")]
    assert client.send(b"MAIL FROM:<a@b>\n") == []  # (the same line, still)
    assert client.send(b"DATA\r\n") == []  # its end: nothing executed, nothing answered
    assert client.codes(b"MAIL FROM:<a@b>\r\n") == [250]
    for cut in range(1, 12):  # one reply for one line, however the reads cut it
        client = Client().ready()
        data = b"NOOP\nDATA\r\nNOOP\r\n"
        codes = client.codes(data[:cut]) + client.codes(data[cut:])
        assert codes == [500, 250], (cut, codes)


def test_command_line_of_exactly_512_octets():
    line = b"NOOP " + b"x" * (512 - 7)
    assert len(line + b"\r\n") == 512
    assert Client().cmd(line).code == 250


@pytest.mark.parametrize("length", [513, 514, 600, 5000, 100_000])
def test_long_command_line_gets_one_500(length):
    line = b"NOOP " + b"x" * (length - 7) + b"\r\n"
    assert len(line) == length
    client = Client()
    replies = client.send(line + b"NOOP\r\n")
    assert [status(r) for r in replies] == [(500, "5.5.6"), (250, "2.0.0")]


@pytest.mark.parametrize("auth", [False, True])
def test_mail_takes_the_octets_its_parameters_add(auth):
    """RFC 1870 6, RFC 6152 2 and RFC 6531 3.4 let MAIL's line grow by 26, 16 and 10 octets
    for SIZE=, BODY= and SMTPUTF8, RFC 4954 5 by 500 for AUTH= when AUTH is offered; RCPT
    keeps 512."""
    params = " SIZE=1000 BODY=8BITMIME SMTPUTF8" + (" AUTH=<>" if auth else "")
    limit = 512 + 52 + (500 if auth else 0)
    head = b"MAIL FROM:<"
    tail = b"@example.org>" + params.encode()
    local = b"a" * (limit - 2 - len(head) - len(tail))
    client = Client(auth=auth, auth_in_clear=auth)
    client.cmd("EHLO client.example")
    assert len(head + local + tail + b"\r\n") == limit
    assert client.cmd(head + local + tail).code == 250
    client.cmd("RSET")
    assert status(client.cmd(head + b"a" + local + tail)) == (500, "5.5.6")
    rcpt = b"RCPT TO:<" + b"a" * (512 - 2 - len(b"RCPT TO:<@example.org>") + 1) + b"@example.org>"
    assert status(client.cmd(rcpt)) == (500, "5.5.6")


@pytest.mark.parametrize("piece", [1, 7, 511, 512, 513, 4096])
def test_long_command_line_in_pieces(piece):
    data = b"MAIL FROM:<" + b"a" * 3000 + b"@b>\r\nNOOP\r\n"
    client = Client()
    replies = []
    for i in range(0, len(data), piece):
        replies += client.send(data[i : i + piece])
    assert [status(r) for r in replies] == [(500, "5.5.6"), (250, "2.0.0")]


def test_long_line_buffer_is_bounded():
    client = Client()
    for _ in range(100):
        client.send(b"x" * 10_000)
    assert len(client.session._buf) < 1024  # white-box: nothing accumulates
    assert client.codes(b"\r\n") == [500]


def test_crlf_split_across_chunks_in_commands():
    client = Client()
    assert client.send(b"NOOP\r") == []
    assert client.codes(b"\nNOOP") == [250]
    assert client.codes(b"\r\n") == [250]


# --- error limit -----------------------------------------------------------------


def test_too_many_errors_closes():
    client = Client(max_errors=3)
    replies = client.send(b"BOGUS\r\nMAIL FROM:bad\r\nRCPT TO:<x@y>\r\nNOOP\r\nDATA\r\nNOOP\r\n")
    assert [r.code for r in replies] == [500, 503, 503, 250, 421]
    assert status(replies[-1]) == (421, "4.7.0") and replies[-1].close
    assert client.closed


def test_every_error_reply_counts():
    client = Client(lambda a: Reply(550, "5.1.1", "No such user"), max_errors=20)
    client.ready()
    client.cmd("MAIL FROM:<a@b>")
    codes = client.codes(b"RCPT TO:<x@y>\r\n" * 21)
    assert codes == [550] * 20 + [421]


def test_commit_failures_do_not_count():
    client = Client(max_errors=1, commit_reply=Reply(451, "4.3.0", "Storage failure"))
    for _ in range(3):
        client.transaction()
        client.cmd("DATA")
        assert [status(r) for r in client.send(b"x\r\n.\r\n")] == [(451, "4.3.0")]
    assert client.cmd("BOGUS").code == 500
    assert client.cmd("BOGUS").code == 421


# --- DATA ------------------------------------------------------------------------


def test_simple_message():
    client = Client().transaction()
    assert status(client.cmd("DATA")) == (354, None)
    assert client.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n") == [QUEUED]
    assert client.messages[0][1] == b"Subject: hi\r\n\r\nhello\r\n"


def test_354_text_and_wire_format():
    reply = Client().transaction().cmd("DATA")
    assert reply.to_bytes() == b"354 End data with <CR><LF>.<CR><LF>\r\n"


def test_empty_message():
    client = Client().transaction()
    client.cmd("DATA")
    assert client.send(b".\r\n") == [QUEUED]
    assert client.messages[0][1] == b""
    assert not [e for e in client.events if isinstance(e, BodyData)]


def test_dot_unstuffing():
    client = Client().transaction()
    client.cmd("DATA")
    client.send(b"..leading\r\n.\r\n")  # wait: ".\r\n" right after a line ends the data
    assert client.messages[0][1] == b".leading\r\n"
    client.transaction()
    client.cmd("DATA")
    client.send(b"a\r\n..\r\n...\r\n. x\r\n.\r\n")
    assert client.messages[1][1] == b"a\r\n.\r\n..\r\n x\r\n"


@pytest.mark.parametrize("cut", range(1, 12))
def test_end_of_data_split_anywhere(cut):
    data = b"abc\r\n..d\r\n.\r\nNOOP\r\n"
    client = Client().transaction()
    client.cmd("DATA")
    replies = client.send(data[:cut]) + client.send(data[cut:])
    assert [r.code for r in replies] == [250, 250]
    assert client.messages[0][1] == b"abc\r\n.d\r\n"


def test_body_is_emitted_in_large_chunks():
    client = Client().transaction()
    client.cmd("DATA")
    chunk = (b"y" * 78 + b"\r\n") * 800
    for _ in range(10):
        client.send(chunk)
    bodies = [e for e in client.events if isinstance(e, BodyData)]
    assert len(bodies) == 10
    client.send(b".\r\n")
    assert client.messages[0][1] == chunk * 10


SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nSMUGGLED\r\n"


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("vector", SMUGGLING_VECTORS, ids=repr)
def test_smuggling_vectors(vector, split):
    client = Client().transaction()
    client.cmd("DATA")
    first = b"Subject: real\r\n\r\nreal" + vector
    rest = SMUGGLED + b".\r\nQUIT\r\n"
    replies = client.send(first + rest) if not split else client.send(first) + client.send(rest)
    assert len(replies) == 2 and replies[1].code == 221
    stripped = (first + SMUGGLED).replace(b"\r\n", b"")
    if b"\r" in stripped or b"\n" in stripped:
        assert status(replies[0]) == (550, "5.5.2")
        assert "bare CR or LF" in replies[0].text
        assert client.messages == [] and client.aborted == ["bare CR or LF in message"]
    else:  # the NUL vector: refused as a whole, the would-be commands never run
        assert b"\x00" in vector
        assert status(replies[0]) == (550, "5.6.0")
        assert client.messages == [] and client.aborted == ["NUL in message"]


@pytest.mark.parametrize(
    "bad",
    [
        b"line one\nline two\r\n",
        b"line one\rline two\r\n",
        b"Subject: x\r\n\r\nends with bare LF\n\r\n",
        b"Subject: x\r\n\r\nbare CR at line end\r\r\n",
        b"\n\r\n",
    ],
)
def test_bare_line_ending_rejected_and_session_continues(bad):
    client = Client().transaction()
    client.cmd("DATA")
    replies = client.send(bad + b".\r\n")
    assert [status(r) for r in replies] == [(550, "5.5.2")]
    assert client.aborted == ["bare CR or LF in message"]
    assert [e for e in client.events if isinstance(e, MessageAborted)]
    # the transaction is over, the session is not
    assert client.cmd("RCPT TO:<c@d>").code == 503
    client.transaction()
    client.cmd("DATA")
    assert client.send(b"clean\r\n.\r\n") == [QUEUED]


@pytest.mark.parametrize(
    "bad",
    [b"NUL\x00inside\r\n", b"\x00\r\n", b"Subject: x\x00\r\n\r\nbody\r\n"],
)
def test_nul_rejected_and_session_continues(bad):
    """NUL is refused like a bare CR or LF: 550, nothing stored, in DATA and in BDAT."""
    client = Client().transaction()
    client.cmd("DATA")
    assert [status(r) for r in client.send(bad + b".\r\n")] == [(550, "5.6.0")]
    assert client.aborted == ["NUL in message"] and client.messages == []
    client.transaction()
    replies = client.send(b"BDAT %d LAST\r\n" % len(bad) + bad)
    assert [status(r) for r in replies] == [(550, "5.6.0")]
    assert client.messages == []
    client.transaction()
    client.cmd("DATA")
    assert client.send(b"clean\r\n.\r\n") == [QUEUED]


def test_no_body_data_after_a_bare_lf_is_seen():
    client = Client().transaction()
    client.cmd("DATA")
    client.send(b"good\r\n")
    client.send(b"bad\n")
    client.send(b"more\r\n")
    bodies = [e.data for e in client.events if isinstance(e, BodyData)]
    assert b"".join(bodies) == b"good"  # the final CRLF is still held back
    client.send(b".\r\n")
    assert client.aborted and not client.messages


def test_text_line_too_long():
    client = Client().transaction()
    client.cmd("DATA")
    assert client.send(b"x" * 998 + b"\r\n.\r\n") == [QUEUED]
    client.transaction()
    client.cmd("DATA")
    replies = client.send(b"ok\r\n" + b"x" * 999 + b"\r\nmore\r\n")
    assert replies == []  # keeps reading to the end of data
    replies = client.send(b".\r\nNOOP\r\n")
    assert [status(r) for r in replies] == [(500, "5.5.6"), (250, "2.0.0")]
    assert client.aborted == ["line too long"] and len(client.messages) == 1


def test_text_line_limit_is_configurable():
    client = Client(max_text_line=10).transaction()
    client.cmd("DATA")
    assert client.codes(b"12345678\r\n123456789\r\n.\r\n") == [500]


@pytest.mark.parametrize("size", [102, 1000, 100_000])
def test_message_too_big(size):
    client = Client(max_message_size=100).transaction()
    client.cmd("DATA")
    body = (b"x" * 8 + b"\r\n") * (size // 10)
    if size % 10:
        body += b"x" * (size % 10 - 2) + b"\r\n"
    assert len(body) == size
    replies = client.send(body[:50]) + client.send(body[50:] + b".\r\nNOOP\r\n")
    assert [status(r) for r in replies] == [(552, "5.3.4"), (250, "2.0.0")]
    assert client.aborted == ["message too big"]
    emitted = sum(len(e.data) for e in client.events if isinstance(e, BodyData))
    assert emitted <= 100


def test_message_of_exactly_the_maximum_size():
    client = Client(max_message_size=100).transaction()
    client.cmd("DATA")
    assert client.send(b"x" * 98 + b"\r\n.\r\n") == [QUEUED]


def test_size_is_counted_after_unstuffing():
    client = Client(max_message_size=10).transaction()
    client.cmd("DATA")
    assert client.send(b"..." + b"x" * 5 + b"\r\n.\r\n") == [QUEUED]  # 10 octets decoded


def test_bare_cr_lf_wins_over_other_problems():
    client = Client(max_message_size=10).transaction()
    client.cmd("DATA")
    assert client.codes(b"x" * 2000 + b"\n\r\n.\r\n") == [550]


HOP = b"Received: from relay.example by mx.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"


def looped(hops: int) -> bytes:
    """A message that has been through `hops` MTAs, the last field cut by a continuation."""
    return HOP * hops + b"\tfor <b@example.net>\r\nSubject: loop\r\n\r\n" + HOP * 100


@pytest.mark.parametrize("piece", [1, 7, 80, 100_000])
def test_too_many_hops_refused_and_session_continues(piece):
    """A mail loop (more than MAX_HOPS Received: fields in the header section): 554 5.4.0
    after the data, nothing stored, logged as a rejection; the next transaction works."""
    client = Client(max_message_size=10**6).transaction()
    client.cmd("DATA")
    data = looped(MAX_HOPS + 1) + b".\r\nNOOP\r\n"
    replies = []
    for i in range(0, len(data), piece):
        replies += client.send(data[i : i + piece])
    assert [status(r) for r in replies] == [(554, "5.4.0"), (250, "2.0.0")]
    assert replies[0].text == "Too many hops"
    assert client.aborted == ["too many hops"] and client.messages == []
    assert [status(r.reply) for r in client.rejected] == [(554, "5.4.0")]
    assert client.rejected[0].verb == "DATA" and client.rejected[0].sender == "a@example.org"
    emitted = b"".join(e.data for e in client.events if isinstance(e, BodyData))
    assert len(emitted) < len(HOP) * (MAX_HOPS + 1)  # not handed out once doomed
    client.transaction()  # fifty pass, and those in the body are only text
    client.cmd("DATA")
    assert client.send(looped(MAX_HOPS) + b".\r\n") == [QUEUED]
    assert client.messages[0][1] == looped(MAX_HOPS)


def test_too_many_hops_in_bdat_chunks():
    content = looped(MAX_HOPS + 1)
    half = len(HOP) * 30
    client = Client(max_message_size=10**6).transaction()
    assert client.codes(b"BDAT %d\r\n" % half + content[:half]) == [250]
    rest = content[half:]
    replies = client.send(b"BDAT %d LAST\r\n" % len(rest) + rest)
    assert [status(r) for r in replies] == [(554, "5.4.0")]
    assert client.aborted == ["too many hops"] and client.messages == []
    client.transaction()
    content = looped(MAX_HOPS)
    assert client.send(b"BDAT %d LAST\r\n" % len(content) + content) == [QUEUED]


# --- PAUSED and commit_done -------------------------------------------------------


def test_pipelined_commands_wait_while_paused():
    client = Client(auto_commit=False).transaction()
    client.cmd("DATA")
    replies = client.send(
        b"body\r\n.\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsecond\r\n.\r\n"
    )
    assert replies == [] and client.paused and len(client.messages) == 1
    assert client.session.next_event() is PAUSED
    client.session.receive_data(b"QUIT\r\n")  # kept as well
    assert client.session.next_event() is PAUSED
    client.session.commit_done(QUEUED)
    replies = client.drain()
    assert [r.code for r in replies] == [250, 250, 250, 354]
    assert client.paused and len(client.messages) == 2
    assert client.messages[1][0].sender == Address("x", "y", False)
    assert client.messages[1][1] == b"second\r\n"
    client.session.commit_done(Reply(554, "5.7.0", "Rejected by content filter"))
    replies = client.drain()
    assert [r.code for r in replies] == [554, 221] and client.closed


def test_commit_done_resets_the_transaction():
    client = Client().transaction()
    client.cmd("DATA")
    client.send(b"x\r\n.\r\n")
    assert client.cmd("RCPT TO:<c@d>").code == 503
    assert client.cmd("MAIL FROM:<a@b>").code == 250


def test_commit_done_without_message_is_an_error():
    session = Session(SessionConfig("mx.example"), lambda a: None)
    with pytest.raises(RuntimeError):
        session.commit_done(QUEUED)


def test_commit_done_with_closing_reply():
    client = Client(commit_reply=Reply(421, "4.3.0", "mx.example shutting down", close=True))
    client.transaction()
    client.cmd("DATA")
    assert client.codes(b"x\r\n.\r\nNOOP\r\n") == [421]
    assert client.closed


def test_eof_while_paused_still_delivers_the_commit_reply():
    client = Client(auto_commit=False).transaction()
    client.cmd("DATA")
    client.send(b"x\r\n.\r\nQUIT\r\n")
    client.session.receive_data(b"")
    assert client.session.next_event() is PAUSED
    client.session.commit_done(QUEUED)
    assert [r.code for r in client.drain()] == [250, 221] and client.closed


# --- pipelining --------------------------------------------------------------------


def test_pipelined_transaction_replies_in_order():
    client = Client(lambda a: Reply(550, "5.1.1", "No such user") if a.local == "x" else None)
    replies = client.send(
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@d>\r\nRCPT TO:<x@d>\r\nRCPT TO:<v@d>\r\nDATA\r\n"
    )
    assert [r.code for r in replies] == [250, 250, 250, 550, 250, 354]
    replies = client.send(b"body\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<p@d>\r\nQUIT\r\n")
    assert [r.code for r in replies] == [250, 250, 250, 221]
    assert [len(env.recipients) for env, _ in client.messages] == [2]


def test_everything_in_one_chunk():
    client = Client()
    replies = client.send(
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@d>\r\nDATA\r\nhi\r\n.\r\n"
        b"MAIL FROM:<a@b>\r\nRCPT TO:<u@d>\r\nDATA\r\nthere\r\n.\r\nQUIT\r\n"
    )
    assert [r.code for r in replies] == [250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
    assert [body for _, body in client.messages] == [b"hi\r\n", b"there\r\n"]


# --- EOF, timeout, refuse ---------------------------------------------------------------


def test_eof_in_command_mode():
    client = Client().ready()
    client.send(b"NOOP")  # incomplete line is dropped
    assert client.send(b"") == [] and client.closed
    assert client.aborted == []


def test_eof_mid_data():
    client = Client().transaction()
    client.cmd("DATA")
    client.send(b"partial")
    client.send(b"")
    assert client.aborted == ["connection closed by peer"] and client.closed
    kinds = [type(e) for e in client.events[-2:]]
    assert kinds == [MessageAborted, CloseConnection]


def test_eof_right_after_greeting():
    session = Session(SessionConfig("mx.example"), lambda a: None)
    session.receive_data(b"")
    assert isinstance(session.next_event(), Reply)
    assert isinstance(session.next_event(), CloseConnection)


def test_timeout():
    client = Client().ready()
    reply = client.session.timeout()
    assert status(reply) == (421, "4.4.2") and reply.close
    assert reply.text.startswith("mx.example ")
    assert isinstance(client.session.next_event(), CloseConnection)
    client.session.receive_data(b"NOOP\r\n")
    assert isinstance(client.session.next_event(), CloseConnection)


def test_timeout_mid_data_aborts_the_message():
    client = Client().transaction()
    client.cmd("DATA")
    client.send(b"partial\r\n")
    client.session.timeout()
    client.drain()
    assert client.aborted == ["timeout"] and client.closed


def test_timeout_says_which_deadline():
    reply = Client().ready().session.timeout("Session time limit exceeded")
    assert status(reply) == (421, "4.4.2") and reply.close
    assert reply.text == "mx.example Session time limit exceeded, closing connection"


def test_what_the_io_layer_needs_for_its_deadlines():
    """mid_command (part of a line is in), reading_content and content_octets (the data-rate
    stage, DATA and each BDAT chunk), waiting (on the caller): what the connection's clocks
    are restarted by, once per read."""
    client = Client()
    session = client.session
    assert not session.mid_command and not session.reading_content and not session.waiting
    client.send(b"EH")
    assert session.mid_command
    client.send(b"LO client.example\r\nNO")  # one line done, the next begun
    assert session.mid_command
    client.send(b"OP\r\n")
    assert not session.mid_command
    client.send(b"x" * 600)  # too long: discarded, still one command being sent
    assert session.mid_command
    client.send(b"\r\n")
    assert not session.mid_command
    client.cmd("MAIL FROM:<a@example.org>")
    client.cmd("RCPT TO:<b@example.net>")
    client.cmd("DATA")
    assert session.reading_content and session.content_octets == 0 and not session.mid_command
    client.send(b"Subject: x\r\n\r\nbody\r\n")
    assert session.content_octets == 20
    client.auto_commit = False
    client.send(b".\r\n")
    assert session.waiting and not session.reading_content
    session.commit_done(QUEUED)
    client.drain()
    assert not session.waiting
    client.cmd("MAIL FROM:<a@example.org>")
    client.cmd("RCPT TO:<b@example.net>")
    client.send(b"BDAT 10\r\n12345")
    assert session.reading_content and session.content_octets == 5
    client.send(b"67890")
    assert not session.reading_content


def test_refuse():
    reply = Session.refuse("mx.example", "Too many connections, try again later")
    assert status(reply) == (421, "4.7.0") and reply.close
    assert reply.to_bytes() == b"421 4.7.0 mx.example Too many connections, try again later\r\n"


def test_idle_between_transactions_only():
    client = Client(auto_commit=False)
    session = client.session
    assert session.idle
    client.cmd("EHLO x")
    assert session.idle
    client.cmd("MAIL FROM:<a@b>")
    assert not session.idle
    client.cmd("RCPT TO:<c@d>")
    client.cmd("DATA")
    client.send(b"partial")
    assert not session.idle
    client.send(b"\r\n.\r\n")
    assert client.paused and not session.idle
    session.commit_done(QUEUED)
    assert not session.idle  # the commit reply is still queued
    client.drain()
    assert session.idle
    client.cmd("QUIT")
    assert not session.idle


def test_receive_data_accepts_bytes_like_and_copies_it():
    client = Client()
    buffer = bytearray(b"NOOP\r\n")
    client.session.receive_data(memoryview(buffer))
    buffer[:] = b"XXXX\r\n"
    assert [r.code for r in client.drain()] == [250]


# --- BDAT (RFC 3030 CHUNKING) ---------------------------------------------------------


def test_bdat_single_last_chunk():
    client = Client().transaction()
    assert client.send(b"BDAT 5 LAST\r\nhello") == [QUEUED]
    assert client.messages[0][1] == b"hello"


def test_bdat_several_chunks_content_is_raw():
    client = Client().transaction()
    replies = client.send(b"BDAT 7\r\n.a\r\n.\r\n")
    assert [status(r) for r in replies] == [(250, "2.0.0")]
    replies = client.send(b"BDAT 3\r\nb\r\nBDAT 0 last\r\n")
    assert replies == [Reply(250, "2.0.0", "3 octets received"), QUEUED]
    assert client.messages[0][1] == b".a\r\n.\r\nb\r\n"  # not dot-unstuffed


def test_bdat_chunk_split_over_reads():
    client = Client().transaction()
    data = b"BDAT 10 LAST\r\n0123456789NOOP\r\n"
    replies = []
    for i in range(len(data)):
        replies += client.send(data[i : i + 1])
    assert replies == [QUEUED, Reply(250, "2.0.0", "OK")]
    assert client.messages[0][1] == b"0123456789"


@pytest.mark.parametrize(
    "setup,expected",
    [("", (503, "5.5.1")), ("MAIL", (503, "5.5.1")), ("NORCPT", (554, "5.5.1"))],
)
def test_bdat_refused_chunk_is_still_read(setup, expected):
    client = Client(lambda a: Reply(550, "5.1.1", "No such user"))
    if setup:
        client.ready()
    if setup == "NORCPT":
        client.cmd("MAIL FROM:<a@b>")
        client.cmd("RCPT TO:<x@y>")
    replies = client.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    assert [status(r) for r in replies] == [expected, (250, "2.0.0")]
    assert not client.closed and client.messages == []


@pytest.mark.parametrize("size", [b"x", b"5\xff", b"\xff"])
def test_bdat_bad_syntax_closes(size):
    """With 521, as Postfix: a reply that closes must be 421 or 521 (RFC 5321 3.8, 4.1.1.10;
    RFC 7504), and the client's error will not go away on a retry. A size that is no UTF-8
    got the 501 of any such argument, and the chunk's octets were read as commands (an
    attacker's pass)."""
    client = Client().transaction()
    replies = client.send(b"BDAT " + size + b"\r\nRSET\r\n")
    assert [status(r) for r in replies] == [(521, "5.5.4")] and client.closed


@pytest.mark.parametrize(
    "line", [b"BDAT\t6 LAST", b"bdat\t6", b"BDAT 6\rLAST", b"BDAT 6 LAST\n", b"BDAT\x0b6"]
)
def test_bdat_that_is_not_sp_separated_or_has_a_bare_cr_lf_closes(line):
    """A BDAT line the verb cannot be split from at a SP (Postfix splits at any white space,
    a TAB too, and reads the chunk), or cut by a bare CR or LF: 521, closed, as for any size
    that cannot be read. It got 500 and the chunk's octets were read as commands, here a
    RSET (an attacker's pass)."""
    client = Client().transaction()
    replies = client.send(line + b"\r\nRSET\r\n")
    assert [status(r) for r in replies] == [(521, "5.5.4")] and client.closed


@pytest.mark.parametrize("verb", [b"NOOP", b"HELP"])
def test_an_argument_that_is_no_utf8_is_ignored_where_arguments_are(verb):
    """RFC 5321 4.1.1.9: NOOP's argument SHOULD be ignored (so is HELP's topic here)."""
    client = Client().ready()
    replies = client.send(verb + b" \xff\xfe\r\n")
    assert [r.code for r in replies] == [250 if verb == b"NOOP" else 214]
    assert status(client.cmd(b"VRFY \xff")) == (501, "5.5.2")  # (an argument used: refused)


def test_data_after_bdat_is_a_sequence_error():
    client = Client().transaction()
    client.send(b"BDAT 2\r\nab")
    assert status(client.cmd("DATA")) == (503, "5.5.1")


def test_rcpt_after_a_chunk_is_a_sequence_error():
    """RFC 3030 3: MAIL, the RCPTs, then the chunks. A recipient added between chunks was
    taken into the message's envelope (an RFC review)."""
    client = Client().transaction()
    client.send(b"BDAT 3\r\nabc")
    assert status(client.cmd("RCPT TO:<late@example.org>")) == (503, "5.5.1")
    assert client.send(b"BDAT 0 LAST\r\n") == [QUEUED]
    [(envelope, _)] = client.messages
    assert "late@example.org" not in str(envelope), envelope


def test_bdat_too_big_aborts_at_the_chunk():
    client = Client(max_message_size=10).transaction()
    assert client.codes(b"BDAT 6\r\n123456") == [250]
    replies = client.send(b"BDAT 6\r\n123456BDAT 1 LAST\r\nx")
    assert [status(r) for r in replies] == [(552, "5.3.4"), (503, "5.5.1")]
    assert client.aborted == ["message too big"] and client.messages == []


def test_bdat_crlf_may_straddle_chunks_but_bare_ends_are_rejected():
    client = Client().transaction()
    client.send(b"BDAT 2\r\na\rBDAT 3 LAST\r\n\nb\n")
    assert client.aborted == ["bare CR or LF in message"]
    client.transaction()
    assert client.send(b"BDAT 2\r\na\rBDAT 3 LAST\r\n\nbc") == [
        Reply(250, "2.0.0", "2 octets received"),
        QUEUED,
    ]
    assert client.messages[0][1] == b"a\r\nbc"


@pytest.mark.parametrize("first", [b" ", b"\t", b"\x0b", b"\x0c", b"\xc2\xa0", b"\xa0", b":"])
def test_content_starting_with_whitespace_gets_an_empty_line_in_front(first):
    """A first line that starts with WSP continues no field: it must become body, or it would
    continue the Received: (and Authentication-Results:) fields put above it (Postfix's smtpd
    does the same). So must one that starts with other white space a reader folds on (VT, FF,
    a no-break space), or any octet no field name starts with. DATA and BDAT alike, whatever
    the first piece's size; nothing else moves."""
    text = first + b"; dkim=pass header.d=bank.example\r\nSubject: s\r\n\r\nbody\r\n"
    expected = b"\r\n" + text
    client = Client().transaction()
    assert client.cmd("DATA").code == 354
    client.send(text[:1])  # the WSP alone: the decision is on the first octet of content
    assert client.send(text[1:] + b".\r\n") == [QUEUED]
    client.transaction("<a@example.org>", "<c@example.net>")
    assert client.send(b"BDAT 0\r\nBDAT %d LAST\r\n" % len(text) + text)[-1] == QUEUED
    plain = b"Subject: s\r\n" + text
    client.transaction("<a@example.org>", "<d@example.net>")
    assert client.cmd("DATA").code == 354
    assert client.send(plain + b".\r\n") == [QUEUED]
    assert [body for _, body in client.messages] == [expected, expected, plain]


def test_rset_between_bdat_chunks_aborts():
    client = Client().transaction()
    client.send(b"BDAT 2\r\nab")
    assert client.codes(b"RSET\r\n") == [250]
    assert client.aborted == ["transaction reset by RSET"]
    assert [type(e) for e in client.events[-2:]] == [MessageAborted, Reply]


def test_eof_between_bdat_chunks_aborts():
    client = Client().transaction()
    client.send(b"BDAT 2\r\nab")
    client.send(b"")
    assert client.aborted == ["connection closed by peer"] and client.closed


# --- a real client -------------------------------------------------------------------------


def _serve(sock: socket.socket, received: list[tuple[Envelope, bytes]]) -> None:
    """A minimal blocking I/O loop around Session, just enough for smtplib."""
    session = Session(SessionConfig("mx.example"), lambda a: None)
    body: list[bytes] = []
    with sock:
        while True:
            event = session.next_event()
            if event is NEED_DATA:
                session.receive_data(sock.recv(65536))
            elif isinstance(event, Reply):
                sock.sendall(event.to_bytes())
            elif isinstance(event, BodyData):
                body.append(event.data)
            elif isinstance(event, MessageComplete):
                received.append((event.envelope, b"".join(body)))
                body.clear()
                session.commit_done(QUEUED)
            elif isinstance(event, CloseConnection):
                return


def test_smtplib_interoperates():
    server_sock, client_sock = socket.socketpair()
    received: list[tuple[Envelope, bytes]] = []
    thread = threading.Thread(target=_serve, args=(server_sock, received), daemon=True)
    thread.start()
    client = smtplib.SMTP()
    client.sock = client_sock
    client.file = None
    try:
        code, banner = client.getreply()
        assert code == 220 and banner.startswith(b"mx.example")
        client.ehlo("client.example")
        assert client.has_extn("pipelining") and client.has_extn("smtputf8")
        assert client.has_extn("enhancedstatuscodes")
        assert int(client.esmtp_features["size"]) == 26214400
        message = b"Subject: test\r\n\r\n.leading dot\r\n..two\r\nend"
        refused = client.sendmail("a@example.org", ["b@example.net"], message)
        assert refused == {}
        utf8 = "Subject: ü\r\n\r\nbody\r\n".encode()
        client.sendmail("jörg@example.org", ["ü@example.net"], utf8, mail_options=["SMTPUTF8"])
        assert client.verify("x")[0] == 252
        assert client.noop()[0] == 250
    finally:
        client.quit()
        thread.join(5)
    assert received[0][1] == message + b"\r\n"
    assert received[0][0].body == "7BIT"
    assert received[1][0].sender == Address("jörg", "example.org", False)
    assert received[1][1] == utf8


def test_on_command_sees_command_lines_but_never_message_content():
    seen = []
    session = Session(SessionConfig(hostname="mx.test"), lambda a: None, seen.append)
    session.receive_data(
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nsecret body\r\n.\r\nQUIT\r\n"
    )
    while session.next_event() not in (NEED_DATA, PAUSED):
        pass
    assert seen == [b"EHLO c", b"MAIL FROM:<a@b>", b"RCPT TO:<x@y>", b"DATA"]


def test_recipients_over_the_limit_are_not_errors():
    # RFC 5321 4.5.3.1.10: the client sends the rest later; a 421 would lose the 100 accepted.
    client = Client(max_errors=5)
    client.cmd("EHLO c")
    client.cmd("MAIL FROM:<a@b>")
    rcpts = b"".join(b"RCPT TO:<r%d@x>\r\n" % i for i in range(125))
    replies = client.send(rcpts + b"DATA\r\n")
    assert [r.code for r in replies] == [250] * 100 + [452] * 25 + [354]
    assert not client.closed


def test_recipients_far_over_the_limit_are_errors_and_logged_once():
    """As many again over the limit are let be (452, said once for the log); past that each
    is an error, as Postfix's smtpd_recipient_overshoot_limit: a client repeating RCPT for
    ever wrote a log line each, 20 MB a second (an attacker's pass, /tmp/atk7a F2)."""
    client = Client(max_errors=5, max_recipients=10)
    client.cmd("EHLO c")
    client.cmd("MAIL FROM:<a@b>")
    replies = client.send(b"".join(b"RCPT TO:<r%d@x>\r\n" % i for i in range(1000)))
    codes = [r.code for r in replies]
    assert codes == [250] * 10 + [452] * 10 + [452] * 5 + [421], codes
    assert client.closed
    said = [(r.verb, r.reply.code) for r in client.rejected]
    assert said == [("RCPT", 452)] + [("RCPT", 452)] * 5 + [("RCPT", 421)], said
    # A new transaction may overshoot again.
    again = Client(max_errors=5, max_recipients=10)
    again.cmd("EHLO c")
    for _ in range(3):
        again.cmd("MAIL FROM:<a@b>")
        rcpts = again.send(b"".join(b"RCPT TO:<r%d@x>\r\n" % i for i in range(20)))
        assert [r.code for r in rcpts] == [250] * 10 + [452] * 10
        again.cmd("RSET")
    assert not again.closed and len(again.rejected) == 3


# What the worker's checks defer a recipient for: its doing, never the client's (a mailbox that is
# an mbox file or has the wrong owner, or cannot be checked now; the account's daily limit).
DEFERRALS = [
    SEND_LIMIT,
    recipients.MAILBOX_NOT_A_DIRECTORY,
    recipients.MAILBOX_WRONG_OWNER,
    recipients.CHECK_FAILED,
]
deferrals = pytest.mark.parametrize("deferral", DEFERRALS, ids=lambda r: f"{r.code}-{r.status}")


@deferrals
def test_deferred_recipients_are_not_errors_for_a_while(deferral: Reply):
    """A recipient deferred by the worker's check, through no fault of the client's (the
    user's own mail program sending what it has past the account's daily limit; a peer
    delivering to mailboxes that cannot be written or checked now): not an error for
    --max-recipients of them in a transaction, nor the 554 of the DATA or BDAT that follows
    when all were deferred (a 421 "Too many errors" is what fail2ban bans for; counted per
    session with no more allowance, an attacker's pass had it after three messages of 45
    recipients), and logged once a session, the excused 554 not at all (a line each was 3.4 MB
    of log a second; once a transaction, MAIL, RCPT, RSET repeated wrote a thousand a
    session); past that each is an error, and logged, so that repeating them in one
    transaction still ends the session."""

    def check(address: Address) -> Reply | None:
        return deferral if address.domain == "remote.test" else None

    client = Client(check, max_errors=2, max_recipients=10)
    client.cmd("EHLO c")
    for _ in range(3):  # each transaction has its allowance
        client.cmd("MAIL FROM:<a@example.org>")
        rcpts = client.send(b"".join(b"RCPT TO:<r%d@remote.test>\r\n" % i for i in range(10)))
        assert rcpts == [deferral] * 10
        assert client.cmd("DATA").code == 554
        client.cmd("RSET")
    client.cmd("MAIL FROM:<a@example.org>")
    client.cmd("RCPT TO:<r@remote.test>")
    assert [r.code for r in client.send(b"BDAT 2 LAST\r\nhi")] == [554]
    client.cmd("RSET")
    assert not client.closed
    logged = [(r.verb, r.reply.code) for r in client.rejected]
    code = deferral.code
    assert logged == [("RCPT", code)]
    client.cmd("MAIL FROM:<a@example.org>")
    codes = client.codes(b"RCPT TO:<more@remote.test>\r\n" * 13)
    assert codes == [code] * 12 + [421] and client.closed
    assert len(client.rejected) == len(logged) + 3  # (the two errors, the 421)


@deferrals
def test_deferred_recipients_in_a_session_are_errors_past_its_allowance(deferral: Reply):
    """A session's deferrals are not errors up to DEFERRALS_PER_SESSION times
    --max-recipients (the user's outbox, a peer's queue for a broken mailbox), then each is:
    a client cycling through transactions of deferred recipients for ever meets the end of its
    session, and has written one line of log before its errors (an attacker's pass: one a
    transaction was 1.6 MB a second over sessions that quit before the 421)."""
    client = Client(lambda address: deferral, max_errors=2, max_recipients=10)
    client.cmd("EHLO c")
    for _ in range(commands.DEFERRALS_PER_SESSION):
        client.cmd("MAIL FROM:<a@example.org>")
        assert client.codes(b"RCPT TO:<r@remote.test>\r\n" * 10) == [deferral.code] * 10
        client.cmd("RSET")
    assert not client.closed
    assert len(client.rejected) == 1  # one a session
    client.cmd("MAIL FROM:<a@example.org>")
    codes = client.codes(b"RCPT TO:<r@remote.test>\r\n" * 3)
    assert codes == [deferral.code] * 2 + [421] and client.closed


def test_a_peer_delivering_to_25_users_whose_mailboxes_cannot_be_checked_is_not_closed():
    """The defaults (--max-errors 20, --max-recipients 100): a peer (Gmail) delivers one
    message to 25 local users while their mailboxes cannot be checked (the spool cannot be
    read), then another, pipelined. Their 451s are ours: the session goes on, the users that
    could be checked get the messages, and the session's is one line of log, not 50."""
    good = {"alice", "bob"}

    def check(address: Address) -> Reply | None:
        return None if address.local in good else recipients.CHECK_FAILED

    client = Client(check)
    client.cmd("EHLO mail.example.com")
    for n in range(2):
        rcpts = [f"user{i}" for i in range(25)] + sorted(good)
        lines = [b"MAIL FROM:<sender@example.com>"]
        lines += [f"RCPT TO:<{r}@example.org>".encode() for r in rcpts] + [b"DATA"]
        replies = client.send(b"".join(line + b"\r\n" for line in lines))
        assert [status(r) for r in replies] == (
            [(250, "2.1.0")] + [(451, "4.3.0")] * 25 + [(250, "2.1.5")] * 2 + [(354, None)]
        )
        assert [r.code for r in client.send(b"Subject: hi\r\n\r\nhi\r\n.\r\n")] == [250]
        assert [str(r) for r in client.messages[n][0].recipients] == [
            "alice@example.org",
            "bob@example.org",
        ]
    assert not client.closed and client.cmd("NOOP").code == 250
    assert [(r.verb, r.path) for r in client.rejected] == [("RCPT", "user0@example.org")]


def test_client_errors_still_count_among_deferrals():
    """Only the deferrals are excused: an unknown user, relaying, a bad command count as they
    did, however many deferrals came between."""

    def check(address: Address) -> Reply | None:
        if address.local == "nobody":
            return Reply(550, "5.1.1", "No such user here")
        return recipients.MAILBOX_NOT_A_DIRECTORY

    client = Client(check, max_errors=2)
    client.cmd("EHLO c")
    client.cmd("MAIL FROM:<a@b>")
    assert client.codes(b"RCPT TO:<box@example.org>\r\n" * 30) == [450] * 30
    assert client.cmd("RCPT TO:<nobody@example.org>").code == 550
    assert client.codes(b"RCPT TO:<box@example.org>\r\n" * 30) == [450] * 30
    assert client.cmd("BOGUS").code == 500
    assert client.codes(b"RCPT TO:<box@example.org>\r\n" * 30) == [450] * 30
    assert client.cmd("RCPT TO:<nobody@example.org>").code == 421 and client.closed
    said = [(r.verb, r.reply.code) for r in client.rejected]
    assert said == [("RCPT", 450), ("RCPT", 550), ("RCPT", 421)], said


def test_a_mail_deferred_for_want_of_space_is_no_error_and_a_foreign_sender_still_is():
    """check_mail's 452 4.3.1 (less free space than --min-free: `worker.reserve`) is ours: a
    peer sending its queue for us in one session, a MAIL after the other (with or without
    RSET between), is not closed for it, and only the first is logged (the worker logs the
    shortage once a minute: a line each let a client repeating MAIL write a thousand a
    session); past the session's allowance each is an error, and logged. Its 553 (an
    authenticated user's sender that is not theirs) counts as it did."""

    def check_mail(sender: Address | None, size: int | None, user: str | None) -> Reply | None:
        if sender is not None and sender.local == "mallory":
            return Reply(553, "5.7.1", "Sender address rejected: not owned by user alice")
        return intake.DISK_FULL

    client = Client(check_mail=check_mail, max_errors=2, max_recipients=5)
    client.cmd("EHLO c")
    allowance = commands.DEFERRALS_PER_SESSION * 5
    mails = b"MAIL FROM:<a@example.com>\r\nRSET\r\n" * 10
    mails += b"MAIL FROM:<a@example.com>\r\n" * (allowance - 10)
    assert client.codes(mails) == [452, 250] * 10 + [452] * (allowance - 10)
    assert not client.closed and len(client.rejected) == 1
    assert client.cmd("MAIL FROM:<mallory@example.org>").code == 553
    assert client.codes(b"MAIL FROM:<a@example.com>\r\n" * 2) == [452, 421] and client.closed
    said = [(r.verb, r.reply.code) for r in client.rejected]
    assert said == [("MAIL", 452), ("MAIL", 553), ("MAIL", 452), ("MAIL", 421)], said


def test_a_commit_deferred_is_no_error_until_past_the_sessions_allowance():
    """The end of the data answered 451/452 (a mailbox that could not be written, a full
    disk): ours, and reported by the caller, who holds the message; but a client repeating
    such messages for ever meets the end of its session past DEFERRALS_PER_SESSION times
    --max-recipients, and the 421 is reported (the caller logged only the 452)."""
    client = Client(commit_reply=intake.DISK_FULL, max_errors=2, max_recipients=1)
    client.cmd("EHLO c")
    for _ in range(commands.DEFERRALS_PER_SESSION + 2):
        client.cmd("MAIL FROM:<a@b>")
        client.cmd("RCPT TO:<x@y>")
        client.cmd("DATA")
        assert client.send(b"x\r\n.\r\n") == [intake.DISK_FULL]
    assert not client.closed and client.rejected == []
    client.cmd("MAIL FROM:<a@b>")
    client.cmd("RCPT TO:<x@y>")
    client.cmd("DATA")
    assert [r.code for r in client.send(b"x\r\n.\r\n")] == [421] and client.closed
    assert [(r.verb, r.reply.code) for r in client.rejected] == [("DATA", 421)]


@pytest.mark.parametrize("command", [b"DATA\r\n", b"BDAT 0\r\n"])
def test_only_the_first_data_after_deferred_recipients_is_excused(command: bytes):
    """An attacker's pass: after one recipient deferred for the daily limit, DATA (or an
    empty BDAT) repeated 5,000 times was answered 554 and logged each time, and the session
    never ended: only the first of a transaction is no error."""
    client = Client(lambda address: SEND_LIMIT, max_errors=2, max_recipients=100)
    client.cmd("EHLO c")
    client.cmd("MAIL FROM:<a@example.org>")
    assert client.cmd("RCPT TO:<r@remote.test>").code == 450
    assert client.codes(command * 5) == [554, 554, 554, 421] and client.closed


def test_a_data_without_recipients_is_an_error_unless_they_were_deferred():
    """(The allowance above is for deferred recipients only, and a deferred MAIL is none.)"""
    client = Client(max_errors=2)
    client.cmd("EHLO c")
    client.cmd("MAIL FROM:<a@b>")
    codes = client.codes(b"DATA\r\n" * 3)
    assert codes == [554, 554, 421] and client.closed
    full = [True]
    deferred = Client(
        check_mail=lambda s, n, u: intake.DISK_FULL if full[0] else None, max_errors=2
    )
    deferred.cmd("EHLO c")
    assert deferred.cmd("MAIL FROM:<a@b>").code == 452
    full[0] = False  # (room again)
    assert deferred.cmd("MAIL FROM:<a@b>").code == 250
    assert deferred.codes(b"DATA\r\n" * 3) == [554, 554, 421] and deferred.closed


def test_a_delivered_message_resets_the_error_count():
    client = Client(max_errors=2)
    client.cmd("EHLO c")
    for _ in range(4):  # each transaction: two refused commands, then a delivered message
        assert client.cmd("BOGUS").code == 500
        assert client.cmd("RCPT TO:<x@y>").code == 503
        client.cmd("MAIL FROM:<a@b>")
        client.cmd("RCPT TO:<x@y>")
        client.cmd("DATA")
        assert [r.code for r in client.send(b"hi\r\n.\r\n")] == [250]
    assert not client.closed
    for _ in range(2):
        client.cmd("BOGUS")
    assert client.cmd("BOGUS").code == 421 and client.closed


def test_extensions_need_ehlo():
    client = Client()
    client.cmd("HELO c")
    reply = client.cmd("MAIL FROM:<a@b> BODY=8BITMIME")
    assert (reply.code, reply.status) == (555, "5.5.4")
    assert client.cmd("MAIL FROM:<a@b>").code == 250
    assert client.cmd("RCPT TO:<x@y>").code == 250
    # The refused chunk is still consumed, never parsed as commands.
    replies = client.send(b"BDAT 6 LAST\r\nQUIT\r\n")
    assert [(r.code, r.status) for r in replies] == [(503, "5.5.1")]
    assert client.cmd("NOOP").code == 250


# --- Rejected: what the I/O layer logs -----------------------------------------------------


def test_a_refused_recipient_is_reported_with_its_transaction():
    refuse = Reply(554, "5.7.1", "Relay access denied")
    client = Client(lambda a: refuse if a.domain == "remote.test" else None)
    client.ready("EHLO client.example")
    client.cmd("MAIL FROM:<a@example.org>")
    assert client.cmd("RCPT TO:<x@remote.test>") == refuse
    assert client.cmd("RCPT TO:<ok@example.org>").code == 250
    assert client.rejected == [
        Rejected("RCPT", "TO:<x@remote.test>", refuse, "a@example.org", "client.example", True)
    ]
    assert client.rejected[0].path == "x@remote.test"
    # the event comes right before the reply it describes
    index = client.events.index(client.rejected[0])
    assert client.events[index + 1] == refuse


def test_refused_mail_commands_are_reported_and_others_are_not():
    client = Client()
    client.cmd("MAIL FROM:<a@example.org>")  # before EHLO: 503
    client.ready()
    client.cmd("MAIL FROM:<bad address>")
    client.cmd("RCPT TO:<b@example.net>")  # no MAIL: 503
    client.cmd("DATA")
    client.cmd("EHLO")  # syntax error, but not a mail command
    client.cmd("FOO")
    client.cmd("VRFY")
    assert [(r.verb, r.reply.code, r.sender) for r in client.rejected] == [
        ("MAIL", 503, None),
        ("MAIL", 501, None),
        ("RCPT", 503, None),
        ("DATA", 503, None),
    ]
    assert client.rejected[1].path == "bad address"


def test_a_refused_message_is_reported_with_its_sender():
    client = Client().transaction(sender="<s@example.org>")
    client.cmd("DATA")
    client.send(b"bare\nLF\r\n.\r\n")
    client.transaction(sender="<>")
    client.send(b"BDAT 3 LAST\r\na\x00b")
    assert [(r.verb, r.reply.code, r.sender) for r in client.rejected] == [
        ("DATA", 550, "s@example.org"),
        ("BDAT", 550, ""),
    ]


def test_closing_for_too_many_errors_is_reported_and_a_commit_failure_is_not():
    client = Client(commit_reply=Reply(451, "4.3.0", "Local error"), max_errors=2)
    client.transaction()
    client.cmd("DATA")
    assert client.send(b"x\r\n.\r\n")[0].code == 451
    assert client.rejected == []  # the caller, who holds the message, reports that one
    client.send(b"FOO\r\nFOO\r\nFOO\r\n")
    assert [(r.verb, r.reply.code) for r in client.rejected] == [("FOO", 421)]


def test_a_refused_message_that_ends_the_session_is_reported_as_the_421():
    client = Client(max_errors=2)
    client.transaction()
    client.send(b"FOO\r\nFOO\r\n")
    client.cmd("DATA")
    replies = client.send(b"bare\nLF\r\n.\r\n")
    assert [r.code for r in replies] == [421] and client.closed
    assert [(r.verb, r.reply.code) for r in client.rejected] == [("DATA", 421)]


# --- a recipient verdict that comes later (PENDING) -----------------------------------------


def test_a_pending_recipient_pauses_the_session_until_its_verdict():
    """The check answers PENDING (the worker looks the account up in a thread): nothing more is
    parsed, pipelined commands included, until recipient_checked() gives the verdict."""
    pending = {"slow@example.org"}
    client = Client(lambda a: PENDING if f"{a.local}@{a.domain}" in pending else None)
    client.ready()
    client.cmd("MAIL FROM:<a@example.org>")
    replies = client.send(b"RCPT TO:<slow@example.org>\r\nRCPT TO:<fast@example.org>\r\nDATA\r\n")
    assert replies == [] and client.paused
    assert client.session.next_event() is PAUSED
    client.session.recipient_checked(None)
    assert [r.code for r in client.drain()] == [250, 250, 354]
    assert client.send(b"x\r\n.\r\n") == [QUEUED]
    envelope, _ = client.messages[0]
    assert [str(r) for r in envelope.recipients] == ["slow@example.org", "fast@example.org"]


def test_a_pending_recipient_can_be_refused_and_is_reported():
    refusal = Reply(550, "5.1.1", "No such user here")
    client = Client(lambda a: PENDING)
    client.ready()
    client.cmd("MAIL FROM:<a@example.org>")
    assert client.send(b"RCPT TO:<x@example.org>\r\nNOOP\r\n") == []
    client.session.recipient_checked(refusal)
    assert client.drain() == [refusal, Reply(250, "2.0.0", "OK")]
    assert [(r.verb, r.reply.code, r.path) for r in client.rejected] == [
        ("RCPT", 550, "x@example.org")
    ]


def test_a_verdict_nobody_asked_for_is_a_bug_and_a_late_one_after_a_timeout_is_dropped():
    client = Client(lambda a: PENDING)
    client.ready()
    with pytest.raises(RuntimeError):
        client.session.recipient_checked(None)
    client.cmd("MAIL FROM:<a@example.org>")
    client.send(b"RCPT TO:<x@example.org>\r\n")
    assert client.session.timeout().code == 421
    client.session.recipient_checked(None)  # the lookup finished after the session ended
    assert client.drain() == []

"""The SMTP session's STARTTLS (RFC 3207) and AUTH (RFC 4954, PLAIN and LOGIN): what each
listener role offers and requires, the replies, the injection defence, and that no password
reaches the command log. Pure: the handshake and the password check are the test's answers."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from mailerd.smtp import (
    NEED_DATA,
    PAUSED,
    Address,
    AuthRequest,
    CloseConnection,
    MessageComplete,
    Rejected,
    Reply,
    Session,
    SessionConfig,
    StartTLS,
    commands,
)

SUBMISSION = SessionConfig(
    "mx.example", starttls=True, auth=True, tls_required=True, auth_required=True
)
SUBMISSIONS = SessionConfig("mx.example", implicit_tls=True, auth=True, auth_required=True)
LOCAL = SessionConfig("mx.example", starttls=True, auth=True, auth_in_clear=True)
NETWORK = SessionConfig("mx.example", starttls=True)
NETWORK_TLS_REQUIRED = SessionConfig("mx.example", starttls=True, tls_required=True)
QUEUED = Reply(250, "2.0.0", "Queued")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Client:
    """Drives a session; StartTLS and AuthRequest are answered when `handshake()` and
    `verdict()` are called (or at once with `auto`)."""

    def __init__(self, config: SessionConfig, *, auto: bool = True, owner: str = "alice"):
        self.logged: list[bytes] = []
        self.session = Session(
            config, lambda a: None, self.logged.append, check_mail=self.check_mail
        )
        self.auto = auto
        self.owner = owner
        self.starts: list[StartTLS] = []
        self.requests: list[AuthRequest] = []
        self.rejected: list[Rejected] = []
        self.closed = False
        self.paused = False
        self.verdicts: list[Reply] = []
        assert [r.code for r in self.drain()] == [220]

    def check_mail(
        self, sender: Address | None, size: int | None, user: str | None
    ) -> Reply | None:
        if user is None or sender is None or sender.local == user:
            return None
        return Reply(553, "5.7.1", f"Sender address rejected: not owned by user {user}")

    def drain(self) -> list[Reply]:
        replies: list[Reply] = []
        while True:
            event = self.session.next_event()
            if event is NEED_DATA or event is PAUSED:
                self.paused = event is PAUSED
                return replies
            if isinstance(event, Reply):
                replies.append(event)
            elif isinstance(event, StartTLS):
                self.starts.append(event)
                if self.auto:
                    self.session.tls_started()
            elif isinstance(event, AuthRequest):
                self.requests.append(event)
                if self.auto:
                    self.verdicts.append(self.session.auth_done(self.check(event)))
            elif isinstance(event, Rejected):
                self.rejected.append(event)
            elif isinstance(event, MessageComplete):
                self.session.commit_done(QUEUED)
            elif isinstance(event, CloseConnection):
                self.closed = True
                return replies

    def check(self, request: AuthRequest) -> str | None:
        return "alice" if (request.login, request.password) == ("alice", "secret") else None

    def send(self, data: bytes) -> list[Reply]:
        self.session.receive_data(data)
        return self.drain()

    def cmd(self, line: str) -> Reply:
        replies = self.send(line.encode() + b"\r\n")
        assert len(replies) == 1, replies
        return replies[0]

    def ehlo(self) -> list[str]:
        reply = self.cmd("EHLO client.example")
        assert reply.code == 250
        return reply.text.split("\n")[1:]


def code(reply: Reply) -> tuple[int, str | None]:
    return reply.code, reply.status


PLAIN_OK = f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'secret')}"
PLAIN_BAD = f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'wrong')}"


# --- what each role offers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, before, inside",
    [
        (SUBMISSION, ["STARTTLS"], ["AUTH PLAIN LOGIN"]),
        (LOCAL, ["STARTTLS", "AUTH PLAIN LOGIN"], ["AUTH PLAIN LOGIN"]),
        (NETWORK, ["STARTTLS"], []),
        (SessionConfig("mx.example"), [], None),
    ],
    ids=["submission", "local", "network", "no-certificate"],
)
def test_ehlo_offers(config, before, inside):
    c = Client(config)
    keywords = c.ehlo()
    assert [k for k in keywords if k.startswith(("STARTTLS", "AUTH"))] == before
    assert keywords[-1] == "HELP"
    if inside is None:
        assert code(c.cmd("STARTTLS")) == (502, "5.5.1")
        return
    assert code(c.cmd("STARTTLS")) == (220, "2.0.0")
    assert [k for k in c.ehlo() if k.startswith(("STARTTLS", "AUTH"))] == inside


def test_implicit_tls_offers_auth_and_refuses_starttls():
    c = Client(SUBMISSIONS)
    assert "AUTH PLAIN LOGIN" in c.ehlo() and "STARTTLS" not in c.ehlo()
    assert code(c.cmd("STARTTLS")) == (503, "5.5.1")
    assert c.session.tls


# --- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_replies():
    c = Client(NETWORK)
    c.ehlo()
    assert code(c.cmd("STARTTLS now")) == (501, "5.5.4")
    reply = c.cmd("STARTTLS")
    assert reply.to_bytes() == b"220 2.0.0 Ready to start TLS\r\n"
    assert c.session.tls and c.starts == [StartTLS(0)]
    assert code(c.cmd("STARTTLS")) == (503, "5.5.1")


def test_the_session_starts_over_after_the_handshake():
    c = Client(NETWORK)
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@b.example>").code == 250
    assert code(c.cmd("STARTTLS")) == (503, "5.5.1")  # not inside a transaction
    assert c.cmd("RSET").code == 250
    assert c.cmd("STARTTLS").code == 220
    assert code(c.cmd("MAIL FROM:<a@b.example>")) == (503, "5.5.1")  # EHLO first, again
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@b.example>").code == 250


def test_bytes_behind_starttls_are_discarded_not_executed():
    c = Client(NETWORK, auto=False)
    c.ehlo()
    replies = c.send(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<a@b.example>\r\n")
    assert [r.code for r in replies] == [220]
    assert c.starts == [StartTLS(len(b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<a@b.example>\r\n"))]
    assert c.paused  # nothing happens until the handshake is done
    # What comes now is from inside TLS: kept, and read after the handshake.
    assert c.send(b"EHLO client.example\r\n") == [] and c.paused
    c.session.tls_started()
    replies = c.drain()
    assert [r.code for r in replies] == [250]
    assert c.cmd("MAIL FROM:<a@b.example>").code == 250
    assert c.rejected == []  # the injected MAIL was never a command


def test_no_tls_no_mail_where_required():
    c = Client(NETWORK_TLS_REQUIRED)
    c.ehlo()
    reply = c.cmd("MAIL FROM:<a@b.example>")
    assert reply.to_bytes() == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    c.cmd("STARTTLS")
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@b.example>").code == 250


def test_starttls_is_refused_before_ehlo_nowhere():
    """RFC 3207 allows STARTTLS before EHLO; the session takes it."""
    c = Client(NETWORK)
    assert c.cmd("STARTTLS").code == 220


# --- AUTH -------------------------------------------------------------------------------------


def test_an_auth_before_tls_that_ends_the_session_is_logged_as_what_was_sent():
    """The error limit turns the last 538 into the 421 that closes the session: one Rejected
    event, for the 421 the client got, not one for a 538 it never saw."""
    c = Client(replace(SUBMISSION, max_errors=1))
    c.ehlo()
    assert code(c.cmd(PLAIN_OK)) == (538, "5.7.11")
    assert c.cmd(PLAIN_OK).code == 421
    assert [r.reply.code for r in c.rejected] == [538, 421]


def test_submission_wants_tls_then_auth():
    c = Client(SUBMISSION)
    c.ehlo()
    assert code(c.cmd(PLAIN_OK)) == (538, "5.7.11")
    # logged: a mail program sending its password in clear is for its owner to hear of
    [refused] = c.rejected
    assert (refused.verb, refused.argument, refused.reply.code) == ("AUTH", "PLAIN", 538)
    assert code(c.cmd("MAIL FROM:<alice@example.org>")) == (530, "5.7.0")
    c.cmd("STARTTLS")
    c.ehlo()
    reply = c.cmd("MAIL FROM:<alice@example.org>")
    assert reply.to_bytes() == b"530 5.7.0 Authentication required\r\n"
    assert c.cmd(PLAIN_OK).to_bytes() == b"235 2.7.0 Authentication successful\r\n"
    assert c.session.user == "alice"
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250


def test_plain_with_and_without_initial_response():
    c = Client(SUBMISSIONS)
    c.ehlo()
    challenge = c.cmd("AUTH PLAIN")
    assert challenge.to_bytes() == b"334 \r\n"
    assert c.cmd(b64("\0alice\0secret")).code == 235
    assert c.requests[-1] == AuthRequest("PLAIN", "alice", "secret")


def test_login_prompts_and_initial_user_name():
    c = Client(SUBMISSIONS)
    c.ehlo()
    assert c.cmd("AUTH LOGIN").to_bytes() == b"334 VXNlcm5hbWU6\r\n"
    assert c.cmd(b64("alice")).to_bytes() == b"334 UGFzc3dvcmQ6\r\n"
    assert code(c.cmd(b64("secret"))) == (235, "2.7.0")
    c = Client(SUBMISSIONS)
    c.ehlo()
    assert c.cmd(f"auth login {b64('alice')}").to_bytes() == b"334 UGFzc3dvcmQ6\r\n"
    assert c.cmd(b64("secret")).code == 235


@pytest.mark.parametrize(
    "steps, expected",
    [
        (["AUTH"], (501, "5.5.4")),
        (["AUTH CRAM-MD5"], (504, "5.5.4")),
        (["AUTH PLAIN", "*"], (501, "5.7.0")),
        (["AUTH LOGIN", "*"], (501, "5.7.0")),
        (["AUTH LOGIN", b64("alice"), "*"], (501, "5.7.0")),
        (["AUTH PLAIN !!!"], (501, "5.5.2")),
        (["AUTH PLAIN", "not base64"], (501, "5.5.2")),
        ([f"AUTH PLAIN {b64('just-a-name')}"], (501, "5.5.2")),
        ([f"AUTH PLAIN {b64(chr(0) * 2 + 'secret')}"], (501, "5.5.2")),  # (no user)
        (["AUTH PLAIN ="], (501, "5.5.2")),  # (an empty answer: no PLAIN message at all)
        (["AUTH LOGIN", b64("alice"), "\xff"], (501, "5.5.2")),
        # not ASCII in an initial response (UTF-8 on the wire): base64 refused the text with
        # a bare ValueError, and the session ended in a 421 and a traceback (an RFC review)
        (["AUTH PLAIN \u00e9"], (501, "5.5.2")),
        (["AUTH LOGIN \u00e9"], (501, "5.5.2")),
    ],
)
def test_auth_errors_leave_the_session_usable(steps, expected):
    c = Client(SUBMISSIONS)
    c.ehlo()
    for step in steps[:-1]:
        assert c.cmd(step).code == 334
    assert code(c.cmd(steps[-1])) == expected
    assert c.requests == [] and c.session.user is None
    assert c.cmd("NOOP").code == 250
    assert c.cmd(PLAIN_OK).code == 235


def test_plains_authorization_identity_is_handed_on_with_the_login():
    """Whether `bob` may be acted for by `alice` (only if bob is alice: `alice@example.org`)
    is the I/O layer's to decide, which knows the users (tests/e2e/test_submission.py)."""
    c = Client(SUBMISSIONS, auto=False)
    c.ehlo()
    c.send(f"AUTH PLAIN {b64('bob' + chr(0) + 'alice' + chr(0) + 'secret')}\r\n".encode())
    assert [(r.mechanism, r.login, r.password, r.authzid) for r in c.requests] == [
        ("PLAIN", "alice", "secret", "bob")
    ]
    c.send(PLAIN_OK.encode() + b"\r\n")  # (answered only once the first has its verdict)
    assert len(c.requests) == 1


def test_a_bare_lf_in_an_auth_answer_ends_the_exchange_at_once():
    """Answered at once, as a command line is (test_session); what follows up to a CRLF is
    the same line, never taken for the password, nor logged."""
    c = Client(SUBMISSIONS)
    c.ehlo()
    assert c.cmd("AUTH LOGIN").code == 334
    assert [code(r) for r in c.send(b64("alice").encode() + b"\n")] == [(500, "5.5.2")]
    assert c.send(b64("secret").encode() + b"\r\n") == []
    assert c.requests == [] and c.session.user is None
    assert c.cmd("NOOP").code == 250
    assert c.cmd(PLAIN_OK).code == 235


def test_auth_sequence_errors():
    c = Client(SUBMISSIONS)
    assert code(c.cmd(PLAIN_OK)) == (503, "5.5.1")  # before EHLO
    c.cmd("HELO client.example")
    assert code(c.cmd(PLAIN_OK)) == (503, "5.5.1")  # AUTH is an ESMTP extension
    c.ehlo()
    assert c.cmd(PLAIN_OK).code == 235
    assert code(c.cmd(PLAIN_OK)) == (503, "5.5.1")  # twice
    c = Client(LOCAL)
    c.ehlo()
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250
    assert code(c.cmd(PLAIN_OK)) == (503, "5.5.1")  # inside a transaction


def test_the_network_listener_knows_no_auth():
    c = Client(NETWORK)
    c.ehlo()
    c.cmd("STARTTLS")
    c.ehlo()
    assert code(c.cmd(PLAIN_OK)) == (502, "5.5.1")
    assert c.requests == [] and c.session.user is None


def test_the_local_listener_takes_auth_in_clear_text():
    c = Client(LOCAL)
    c.ehlo()
    assert c.cmd(PLAIN_OK).code == 235 and not c.session.tls


def test_starttls_forgets_an_earlier_auth():
    c = Client(LOCAL)
    c.ehlo()
    assert c.cmd(PLAIN_OK).code == 235
    c.cmd("STARTTLS")
    assert c.session.user is None
    c.ehlo()
    assert c.cmd(PLAIN_OK).code == 235  # not "already authenticated"


def test_failures_then_421_at_the_third():
    c = Client(SUBMISSIONS)
    c.ehlo()
    assert c.cmd(PLAIN_BAD).to_bytes() == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert code(c.cmd(PLAIN_BAD)) == (535, "5.7.8")
    assert c.cmd("NOOP").code == 250
    reply = c.cmd(PLAIN_BAD)
    assert code(reply) == (421, "4.7.0") and reply.close and c.closed
    assert c.verdicts == [c.verdicts[0], c.verdicts[0], reply]  # what auth_done returned
    assert c.rejected == []  # the I/O layer logs AUTH failures itself, with the user


def test_a_success_after_failures_is_a_success():
    c = Client(SUBMISSIONS)
    c.ehlo()
    for _ in range(2):
        assert c.cmd(PLAIN_BAD).code == 535
    assert c.cmd(PLAIN_OK).code == 235


def test_the_session_waits_for_the_verdict():
    c = Client(SUBMISSIONS, auto=False)
    c.ehlo()
    assert c.send(f"{PLAIN_OK}\r\nNOOP\r\n".encode()) == [] and c.paused
    assert c.requests == [AuthRequest("PLAIN", "alice", "secret")]
    reply = c.session.auth_done("alice")
    assert [r.code for r in c.drain()] == [235, 250]  # then the pipelined NOOP
    assert reply.code == 235


def test_an_unavailable_check_is_a_temporary_failure():
    c = Client(SUBMISSIONS, auto=False)
    c.ehlo()
    c.send(f"{PLAIN_OK}\r\n".encode())
    assert code(c.session.auth_done(None, unavailable=True)) == (454, "4.7.0")
    assert [code(r) for r in c.drain()] == [(454, "4.7.0")]


def test_protocol_misuse_of_the_api_raises():
    c = Client(SUBMISSIONS, auto=False)
    with pytest.raises(RuntimeError):
        c.session.auth_done("alice")
    with pytest.raises(RuntimeError):
        c.session.tls_started()


def test_the_password_never_reaches_the_command_log_nor_an_events_repr():
    c = Client(SUBMISSIONS)
    c.ehlo()
    c.cmd(PLAIN_BAD)
    c.cmd("AUTH LOGIN")
    c.cmd(b64("alice"))
    c.cmd(b64("secret"))
    logged = b"\n".join(c.logged)
    for secret in (b"secret", b"wrong", b64("secret").encode(), PLAIN_BAD.split()[2].encode()):
        assert secret not in logged
    assert b"AUTH PLAIN ***" in logged and b"AUTH LOGIN" in logged
    assert "secret" not in repr(c.requests) and "wrong" not in repr(c.requests)


@pytest.mark.parametrize(
    "line, shown",
    [
        (b"AUTH PLAINAGFsaWNlAHNlY3JldA==", b"AUTH ***"),  # (no space after the mechanism)
        (b"AUTH PLAINAGFSAWNL", b"AUTH ***"),
        (b"AUTH FOO", b"AUTH ***"),
        (b" AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"AUTH PLAIN ***"),  # (a space before it)
        (b"\tauth plain AGFsaWNlAHNlY3JldA==", b"AUTH PLAIN ***"),
        (b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"AUTH PLAIN ***"),
        (b"AUTH CRAM-MD5", b"AUTH CRAM-MD5"),
        (b"\x00AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"AUTH PLAIN ***"),  # (bytes before AUTH)
        (b"\x1bAUTH PLAIN AGFsaWNlAHNlY3JldA==", b"AUTH PLAIN ***"),
        ("\u00a0AUTH PLAIN AGFsaWNlAHNlY3JldA==".encode(), b"AUTH PLAIN ***"),
        (b"MAIL FROM:<auth@example.org>", b"MAIL FROM:<auth@example.org>"),
        (b"AUTH", b"AUTH"),
    ],
)
def test_the_command_log_shows_a_mechanism_never_a_response_stuck_to_it(line, shown):
    """A reviewer's finding: a response written right after the mechanism, with no space,
    was logged in part (its first 20 characters with the mechanism's), and a line with a
    space before AUTH was logged whole. Only a mechanism name we offer, or one spelled as
    SASL names are (RFC 4422 3.1: upper case, digits, - and _), is shown."""
    assert commands._masked(line) == shown


def test_a_refused_auth_logs_no_response_stuck_to_its_mechanism():
    """The line of a session closed for its errors (at the default level) named the
    "mechanism" of the AUTH that ended it, upper-cased: a response written without its
    space, the password in it."""
    for line, shown in [("AUTH PLAINAGFsaWNlAHNlY3JldA==", "***"), ("AUTH cram-md5", "CRAM-MD5")]:
        c = Client(SUBMISSIONS)
        c.ehlo()
        for _ in range(SUBMISSIONS.max_errors):
            assert c.cmd("AUTH").code == 501
        assert c.cmd(line).code == 421
        assert [(r.verb, r.argument) for r in c.rejected] == [("AUTH", shown)]


@pytest.mark.parametrize(
    "auth",
    [b"AUTH LOGIN\r", b"AUTH LOGIN \xff", b"AUTH PLAIN " + b"A" * 1000],
    ids=["bare-cr", "not-utf-8", "too-long"],
)
def test_the_lines_after_an_auth_refused_before_its_handler_are_not_logged(auth):
    """A second attacker's pass: an AUTH line refused before its handler ran (a bare CR,
    bytes that are not UTF-8, a line too long) did not keep the lines pipelined after it
    out of the -v log: LOGIN's user name and password, whole."""
    c = Client(SUBMISSIONS)
    c.ehlo()
    user, password = b64("alice").encode(), b64("secret").encode()
    c.send(auth + b"\r\n" + user + b"\r\n" + password + b"\r\n")
    logged = b"\n".join(c.logged)
    assert user not in logged and password not in logged, c.logged
    if len(auth) > 512:  # (and the long line in two reads, the first without its end)
        c = Client(SUBMISSIONS)
        c.ehlo()
        c.send(auth)
        c.send(b"\r\n" + user + b"\r\n" + password + b"\r\n")
        logged = b"\n".join(c.logged)
        assert user not in logged and password not in logged, c.logged


def test_no_word_of_a_line_after_a_refused_auth_reaches_a_log_line():
    """An attacker's pass: LOGIN's password, pipelined after an AUTH that was refused and so
    taken for a command, named the refusal of the line that ended the session for its
    errors (its verb: the password's base64, upper-cased, when all letters); and AUTH with
    a response that is not UTF-8 named the whole response as its argument."""
    c = Client(SUBMISSIONS)
    c.ehlo()
    for _ in range(SUBMISSIONS.max_errors - 2):  # (then AUTH BOGUS, the user name: 2 more)
        assert c.cmd("AUTH").code == 501
    password = b64("hunter").upper()  # ("AHVUDGVY": all letters, a word like a verb)
    replies = c.send(f"AUTH BOGUS\r\n{b64('alice')}\r\n{password}\r\n".encode())
    assert [r.code for r in replies][-1] == 421, replies
    assert [(r.verb, r.argument) for r in c.rejected] == [("***", "")], c.rejected
    assert not any(password.encode() in line for line in c.logged), c.logged
    c = Client(SUBMISSIONS)
    c.ehlo()
    for _ in range(SUBMISSIONS.max_errors):
        assert c.cmd("AUTH").code == 501
    c.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\xff\r\n")
    assert [(r.verb, r.argument) for r in c.rejected] == [("AUTH", "***")], c.rejected


@pytest.mark.parametrize(
    "config, lines",
    [
        # a refused AUTH LOGIN (538 before TLS) with its answers pipelined
        pytest.param(
            SUBMISSION, ["AUTH LOGIN", b64("alice"), b64("secret")], id="refused-before-tls"
        ),
        pytest.param(LOCAL, ["AUTH\tPLAIN " + b64("\0alice\0secret")], id="tab-separated"),
        pytest.param(LOCAL, ["AUTH PLAIN\r" + b64("\0alice\0secret")], id="bare-cr"),
        pytest.param(LOCAL, ["AUTH LOGIN", "not base64!", b64("secret")], id="user-not-base64"),
        pytest.param(LOCAL, ["AUTH LOGIN", "jöhn", b64("secret")], id="user-not-ascii"),
    ],
)
def test_no_password_reaches_the_log_however_the_auth_goes_wrong(config, lines):
    c = Client(config)
    c.ehlo()
    c.send(b"".join(line.encode() + b"\r\n" for line in lines))
    c.cmd("NOOP")
    logged = b"\n".join(c.logged)
    for secret in (b"secret", b64("secret").encode(), b64("\0alice\0secret").encode()):
        assert secret not in logged, logged
    assert logged.endswith(b"NOOP"), "the first command after them is logged again"


def test_a_too_long_auth_response_ends_the_exchange():
    """(Else the next command would be taken for the password, and answered 501.)"""
    c = Client(SUBMISSIONS)
    c.ehlo()
    assert c.cmd("AUTH LOGIN").code == 334
    assert code(c.cmd("x" * 12287)) == (500, "5.5.6")  # (12289 octets with its CRLF)
    assert c.cmd("NOOP").code == 250
    assert c.requests == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_a_long_password_is_answered_after_the_334(mechanism):
    """RFC 4954 4: a response too long for the AUTH command line goes after the 334, and
    there the 512 octets of a command do not apply (up to 12288, as Postfix)."""
    password = "p" * 2000
    c = Client(SUBMISSIONS, auto=False)
    c.ehlo()
    assert c.cmd(f"AUTH {mechanism}").code == 334
    if mechanism == "PLAIN":
        answer = b64(f"\0alice\0{password}")
    else:
        assert c.cmd(b64("alice")).code == 334
        answer = b64(password)
    assert len(answer) > 2000
    c.send(answer.encode() + b"\r\n")
    assert c.requests == [AuthRequest(mechanism, "alice", password)]
    c.session.auth_done("alice")
    assert [r.code for r in c.drain()] == [235]
    assert code(c.cmd("NOOP " + "x" * 600)) == (500, "5.5.6")  # (commands keep their limit)


def test_mail_auth_parameter_is_taken_where_auth_is_offered():
    c = Client(SUBMISSIONS)
    c.ehlo()
    c.cmd(PLAIN_OK)
    assert c.cmd("MAIL FROM:<alice@example.org> AUTH=<>").code == 250
    c = Client(NETWORK)
    c.ehlo()
    assert code(c.cmd("MAIL FROM:<alice@example.org> AUTH=<>")) == (555, "5.5.4")


def test_an_authenticated_user_sends_as_themselves():
    c = Client(SUBMISSIONS)
    c.ehlo()
    c.cmd(PLAIN_OK)
    reply = c.cmd("MAIL FROM:<bob@example.org>")
    assert reply.to_bytes() == b"553 5.7.1 Sender address rejected: not owned by user alice\r\n"
    assert [r.verb for r in c.rejected] == ["MAIL"]  # logged like every refused MAIL
    assert c.cmd("MAIL FROM:<>").code == 250
    c.cmd("RSET")
    assert c.cmd("MAIL FROM:<alice@example.org>").code == 250

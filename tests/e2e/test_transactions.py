"""Complete SMTP transactions with real clients (smtplib, raw sockets, swaks, curl)."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from .conftest import (
    IO_TIMEOUT,
    Mailerd,
    check_stored,
    ehlo_keywords,
    expect,
    has_recent,
    mail_rcpt,
    parse_stored,
    send_data,
    send_message,
    unique,
    wait_until,
)

HOSTS = [pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6")]
LISTENERS = [pytest.param(True, id="trusted"), pytest.param(False, id="untrusted")]


def make_body(token: str, extra: bytes = b"") -> bytes:
    return (
        b"From: Sender <sender@client.test>\r\n"
        b"To: Someone <someone@example.org>\r\n"
        b"Subject: test " + token.encode() + b"\r\n"
        b"Message-ID: <" + token.encode() + b"@client.test>\r\n"
        b"\r\n"
        b"Hello, this is message " + token.encode() + b".\r\n" + extra + b"Bye.\r\n"
    )


def _raw_transaction(
    m: Mailerd, user: str, body: bytes, sender: str = "sender@client.test", params: str = ""
) -> None:
    """A raw session to ``user@example.org``: banner, EHLO, one ``send_message``, then QUIT."""
    with m.connect() as c:
        c.start()
        send_message(c, f"{user}@example.org", body, sender=sender, params=params)
        c.cmd("QUIT")


def _deliver(m: Mailerd, user: str, token: str, extra: bytes = b"") -> bytes:
    """Send ``make_body(token, extra)`` to ``user@example.org`` with smtplib; return the body."""
    body = make_body(token, extra)
    with m.smtp() as s:
        assert s.sendmail("sender@client.test", [f"{user}@example.org"], body) == {}
        s.quit()
    return body


def only_message(m: Mailerd, user: str) -> bytes:
    nums = m.wait_messages(user, 1, timeout=5)
    assert nums == [1], f"mailbox {user}: expected exactly message 1, got {nums}"
    assert has_recent(m.status(user, 1)), m.status(user, 1)
    return m.read(user, 1)


# --------------------------------------------------------------------------------------------
# EHLO / reply format
# --------------------------------------------------------------------------------------------


def test_ehlo_advertises_extensions(shared_mailerd: Mailerd):
    with shared_mailerd.connect() as c:
        expect(c.banner(), 220)
        r = expect(c.ehlo(), 250)
        keywords = ehlo_keywords(r)
        for kw in ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"):
            assert kw in keywords, f"EHLO does not advertise {kw}: {r}"
        c.cmd("QUIT")


def test_every_reply_has_enhanced_status_code(shared_mailerd: Mailerd):
    """RFC 2034: all replies except the greeting, the EHLO reply and 354 carry one."""
    m = shared_mailerd
    user = m.new_user("esc")
    with m.connect() as c:
        c.start()
        replies = [
            c.cmd("NOOP"),
            c.cmd("HELP"),
            c.cmd(f"VRFY {user}"),
            c.cmd("MAIL FROM:<sender@client.test>"),
            c.cmd(f"RCPT TO:<{user}@example.org>"),
            c.cmd("RCPT TO:<nobody-here-at-all@example.org>"),
            c.cmd("RSET"),
            c.cmd("BOGUSCOMMAND"),
            c.cmd("RCPT TO:<x@example.org>"),  # bad sequence: no MAIL yet
            c.cmd("MAIL FROM:<sender@client.test>"),
            c.cmd(f"RCPT TO:<{user}@example.org>"),
        ]
        data = expect(c.cmd("DATA"), 354, conn=c)
        assert data.code == 354
        c.send(make_body("esc") + b".\r\n")
        replies.append(c.read_reply())
        replies.append(c.cmd("QUIT"))
        for r in replies:
            for line, code in zip(r.lines, r.line_codes(), strict=True):
                assert code is not None, f"reply line without enhanced code: {r.code} {line}"
                assert code[0] == str(r.code)[0], f"class mismatch: {r}"
        assert replies[0].code == 250
        assert replies[-1].code == 221


# --------------------------------------------------------------------------------------------
# Plain transactions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trusted", LISTENERS)
@pytest.mark.parametrize("host", HOSTS)
def test_smtplib_transaction(shared_mailerd: Mailerd, host: str, trusted: bool):
    m = shared_mailerd
    user = m.new_user("tx")
    token = uuid.uuid4().hex
    body = make_body(token)
    with m.smtp(trusted=trusted, host=host, helo="client.test") as s:
        refused = s.sendmail("sender@client.test", [f"{user}@example.org"], body)
        assert refused == {}
        s.quit()
    raw = only_message(m, user)
    check_stored(raw, sender="sender@client.test", helo="client.test", body=body)
    assert raw.count(b"\r\n") == raw.count(b"\n"), "stored message must use CRLF line ends"


def test_null_sender(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("null")
    body = make_body("bounce")
    _raw_transaction(m, user, body, sender="")
    raw = only_message(m, user)
    assert raw.startswith(b"Return-Path: <>\r\n"), raw[:100]
    check_stored(raw, sender="", helo="client.test", body=body)


@pytest.mark.parametrize(
    "sender, stored",
    [
        ("foo..bar@docomo.ne.jp", '"foo..bar"@docomo.ne.jp'),
        ("foo.@ezweb.ne.jp", '"foo."@ezweb.ne.jp'),
        ("bounce@mail_out.example.com", "bounce@mail_out.example.com"),
        ("sender@client.test.", "sender@client.test"),
    ],
)
def test_senders_beyond_the_grammar_are_taken_as_postfix_takes_them(
    shared_mailerd: Mailerd, sender: str, stored: str
):
    """Addresses in use that RFC 5321's grammar has no room for got 501 5.1.7 at MAIL, and the
    message was lost (a helper's pass as the big providers); Postfix takes them. A recipient
    written with a final dot is the same mailbox."""
    m = shared_mailerd
    user = m.new_user("lax")
    body = make_body(uuid.uuid4().hex)
    with m.connect(trusted=False) as c:
        c.start()
        expect(c.cmd(f"MAIL FROM:<{sender}>"), 250, conn=c)
        expect(c.cmd(f"RCPT TO:<{user}@example.org.>"), 250, conn=c)
        send_data(c, body)
        c.cmd("QUIT")
    raw = only_message(m, user)
    assert raw.startswith(f"Return-Path: <{stored}>\r\n".encode()), raw[:120]
    assert raw.endswith(body)


def test_several_recipients_in_two_domains(shared_mailerd: Mailerd):
    m = shared_mailerd
    users = [m.new_user("multi") for _ in range(4)]
    rcpts = [
        f"{users[0]}@example.org",
        f"{users[1]}@example.net",
        f"{users[2]}@example.org",
        f"{users[3]}@example.net",
    ]
    body = make_body(uuid.uuid4().hex)
    with m.smtp(helo="multi.client.test") as s:
        assert s.sendmail("sender@client.test", rcpts, body) == {}
        s.quit()
    for u in users:
        raw = only_message(m, u)
        check_stored(raw, sender="sender@client.test", helo="multi.client.test", body=body)


def test_pipelining_replies_in_order(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("pipe")
    body = make_body("pipelined")
    with m.connect() as c:
        c.start()
        c.send(
            b"MAIL FROM:<sender@client.test>\r\n"
            + f"RCPT TO:<{user}@example.org>\r\n".encode()
            + b"RCPT TO:<no-such-user-pipelined@example.org>\r\n"
            + b"DATA\r\n"
        )
        r = c.read_replies(4)
        expect(r[0], 250, conn=c)
        expect(r[1], 250, conn=c)
        expect(r[2], 550, "5.1.1", conn=c)
        expect(r[3], 354, conn=c)
        c.send(body + b".\r\nNOOP\r\nQUIT\r\n")
        r = c.read_replies(3)
        expect(r[0], 250, conn=c)
        expect(r[1], 250, conn=c)
        expect(r[2], 221, conn=c)
        assert c.wait_eof(5) is not None, "server must close after QUIT"
    raw = only_message(m, user)
    check_stored(raw, sender="sender@client.test", helo="client.test", body=body)


def test_dot_stuffing_with_smtplib(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("dots")
    extra = b".\r\n..\r\n.leading dot\r\n..two dots\r\n...three\r\n. \r\nmid.dle\r\n.\r\n"
    body = _deliver(m, user, "dots", extra)
    check_stored(only_message(m, user), sender="sender@client.test", helo="client.test", body=body)


def test_dot_unstuffing_raw(shared_mailerd: Mailerd):
    """Exactly one leading dot is removed from lines that start with a dot."""
    m = shared_mailerd
    user = m.new_user("rawdots")
    sent = b"Subject: dots\r\n\r\n..\r\n...\r\n..x\r\n.y\r\nz.\r\n....\r\n"
    expected = b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\ny\r\nz.\r\n...\r\n"
    _raw_transaction(m, user, sent)
    check_stored(
        only_message(m, user), sender="sender@client.test", helo="client.test", body=expected
    )


def test_8bit_body_byte_exact(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("eight")
    high = bytes(range(0x80, 0x100))
    assert b"\r" not in high and b"\n" not in high
    body = (
        b"Subject: 8bit\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + high
        + b"\r\n"
        + high[::-1]
        + b"\r\n"
    )
    with m.smtp() as s:
        s.ehlo()
        assert s.has_extn("8bitmime")
        refused = s.sendmail(
            "sender@client.test", [f"{user}@example.org"], body, mail_options=["BODY=8BITMIME"]
        )
        assert refused == {}
        s.quit()
    check_stored(only_message(m, user), sender="sender@client.test", helo="client.test", body=body)


@pytest.mark.parametrize(
    "host,helo",
    [
        pytest.param("127.0.0.1", "[127.0.0.1]", id="ipv4"),
        pytest.param("::1", "[IPv6:::1]", id="ipv6"),
    ],
)
def test_thunderbird_style(shared_mailerd: Mailerd, host: str, helo: str):
    m = shared_mailerd
    user = m.new_user("tb")
    body = make_body("thunderbird")
    with m.connect(host=host) as c:
        expect(c.banner(), 220)
        expect(c.cmd(f"EHLO {helo}"), 250, conn=c)
        send_message(c, f"{user}@example.org", body, sender="a@b", params="SIZE=123 BODY=8BITMIME")
        expect(c.cmd("QUIT"), 221, conn=c)
    check_stored(only_message(m, user), sender="a@b", helo=helo, body=body)


# --------------------------------------------------------------------------------------------
# Other real clients
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
@pytest.mark.parametrize("host", HOSTS)
def test_swaks(shared_mailerd: Mailerd, host: str):
    m = shared_mailerd
    user = m.new_user("swaks")
    token = uuid.uuid4().hex
    cmd = [
        "swaks",
        "--server",
        host,
        "--port",
        str(m.trusted_port),
        "--to",
        f"{user}@example.org",
        "--from",
        "swaks-sender@client.test",
        "--helo",
        "swaks.client.test",
        "--body",
        f"swaks body {token}",
        "--timeout",
        "15",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"swaks failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    raw = only_message(m, user)
    st = parse_stored(raw)
    assert st.return_path == b"Return-Path: <swaks-sender@client.test>"
    assert st.received.startswith(b"Received: from swaks.client.test"), st.received
    assert f"swaks body {token}".encode() in st.rest
    assert st.rest.endswith(b"\r\n")
    # what swaks sent is what is stored: its transcript shows the headers it generated
    assert b"\nTo: " + f"{user}@example.org".encode() in b"\n" + st.rest


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize(
    "url_host", [pytest.param("127.0.0.1", id="ipv4"), pytest.param("[::1]", id="ipv6")]
)
def test_curl(shared_mailerd: Mailerd, tmp_path, url_host: str):
    m = shared_mailerd
    user = m.new_user("curl")
    body = make_body(uuid.uuid4().hex, b".starts with a dot\r\n")
    f = tmp_path / "mail.eml"
    f.write_bytes(body)
    cmd = [
        "curl",
        "-sS",
        "--max-time",
        str(int(IO_TIMEOUT)),
        f"smtp://{url_host}:{m.trusted_port}/curl.client.test",
        "--mail-from",
        "curl-sender@client.test",
        "--mail-rcpt",
        f"{user}@example.org",
        "--upload-file",
        str(f),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"curl failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    check_stored(
        only_message(m, user),
        sender="curl-sender@client.test",
        helo="curl.client.test",
        body=body,
    )


# --------------------------------------------------------------------------------------------
# Recipient handling
# --------------------------------------------------------------------------------------------


def _send_raw(m: Mailerd, rcpt: str, body: bytes, trusted: bool = True) -> list:
    """One transaction with a single RCPT; returns [MAIL, RCPT, None, end-of-data or None]."""
    with m.connect(trusted=trusted) as c:
        c.start()
        r_mail = expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
        r_rcpt = c.cmd(f"RCPT TO:<{rcpt}>")
        if r_rcpt.code != 250:
            c.cmd("QUIT")
            return [r_mail, r_rcpt, None, None]
        expect(c.cmd("DATA"), 354, conn=c)
        c.send(body + b".\r\n")
        r_end = c.read_reply()
        c.cmd("QUIT")
        return [r_mail, r_rcpt, None, r_end]


def _deliver_raw(m: Mailerd, rcpt: str, body: bytes, trusted: bool = True) -> None:
    """``_send_raw``, then expect 250 for its RCPT and for its end of data."""
    r = _send_raw(m, rcpt, body, trusted=trusted)
    expect(r[1], 250)
    expect(r[3], 250)


def _check_lands_in(m: Mailerd, user: str, rcpt: str, token: str, not_created: str) -> None:
    """Deliver to ``rcpt``: it is ``user``'s only message and no ``not_created`` box appears."""
    body = make_body(token)
    _deliver_raw(m, rcpt, body)
    check_stored(only_message(m, user), sender="sender@client.test", helo="client.test", body=body)
    assert not (m.spool / not_created).exists()


def test_plus_tag_delivers_to_user(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("plus")
    _check_lands_in(m, user, f"{user}+some.tag@example.org", "plus", f"{user}+some.tag")


def test_mailbox_name_is_lower_cased(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("case")
    _check_lands_in(m, user, f"{user.upper()}@EXAMPLE.Org", "case", user.upper())


@pytest.mark.parametrize(
    "rcpt", ["postmaster", "postmaster@example.org", "Postmaster@example.net", "POSTMASTER"]
)
def test_postmaster_always_accepted(mailerd: Mailerd, rcpt: str):
    m = mailerd
    assert not (m.spool / "postmaster").exists()
    body = make_body("pm")
    for trusted in (True, False):
        _deliver_raw(m, rcpt, body, trusted=trusted)
    nums = m.wait_messages("postmaster", 2, timeout=5)
    assert nums == [1, 2]
    for n in nums:
        assert has_recent(m.status("postmaster", n))
        check_stored(
            m.read("postmaster", n), sender="sender@client.test", helo="client.test", body=body
        )


@pytest.mark.parametrize("host", HOSTS)
def test_a_local_programs_unqualified_addresses_get_the_first_domain(
    shared_mailerd: Mailerd, host: str
):
    """smtplib.sendmail("root", ["alice"], ...) on the local listener, as monitoring scripts
    and cron jobs write it: both addresses get the first local domain (Postfix appends
    @$myorigin), where they were refused 553/550 5.1.3. The network listener still refuses an
    unqualified recipient (RFC 5321 4.1.2: only <Postmaster> may lack a domain)."""
    m = shared_mailerd
    user = m.new_user("bare")
    body = make_body("bare")
    with m.smtp(trusted=True, host=host, helo="client.test") as s:
        assert s.sendmail("robot", [user], body) == {}
        s.quit()
    check_stored(only_message(m, user), sender="robot@example.org", helo="client.test", body=body)
    with m.connect(trusted=False, host=host) as c:
        c.start()
        reply = c.cmd("MAIL FROM:<robot>")
        assert reply.code in (501, 553), reply
        expect(c.cmd("MAIL FROM:<robot@client.test>"), 250, conn=c)
        reply = c.cmd(f"RCPT TO:<{user}>")
        assert reply.code in (501, 550, 553), reply
        c.cmd("QUIT")
    assert m.messages(user) == [1]


@pytest.mark.parametrize("trusted", LISTENERS)
def test_unknown_user_rejected(shared_mailerd: Mailerd, trusted: bool):
    m = shared_mailerd
    with m.connect(trusted=trusted) as c:
        c.start()
        expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
        expect(c.cmd("RCPT TO:<no-such-user-zz9@example.org>"), 550, "5.1.1", conn=c)
        expect(c.cmd("RCPT TO:<no-such-user-zz9@example.net>"), 550, "5.1.1", conn=c)
        r = c.cmd("DATA")  # no valid recipient
        assert 500 <= r.code < 600, f"DATA without recipients must fail: {r}"
        expect(c.cmd("NOOP"), 250, conn=c)
        c.cmd("QUIT")
    assert not (m.spool / "no-such-user-zz9").exists()


def test_system_account_is_local_user(mailerd: Mailerd):
    """``root`` exists in /etc/passwd on every Linux system: accepted without a spool dir."""
    m = mailerd
    assert not (m.spool / "root").exists()
    body = make_body("root")
    _deliver_raw(m, "root@example.org", body, trusted=False)
    check_stored(
        only_message(m, "root"), sender="sender@client.test", helo="client.test", body=body
    )


@pytest.mark.parametrize("host", HOSTS)
def test_trusted_listener_queues_remote_recipient(mailerd: Mailerd, host: str):
    m = mailerd
    before = m.queue_files()
    spool_before = {p.name for p in m.spool.iterdir()}
    with m.connect(host=host, trusted=True) as c:
        c.start()
        send_message(c, "someone@remote.test", make_body("remote"))
        new = wait_until(lambda: m.queue_files() - before, timeout=5, interval=0.01)
        c.cmd("QUIT")
    assert new, f"no new file under the queue dir {m.queue}: {sorted(m.queue_files())}"
    # a remote recipient is not delivered into the local spool
    assert not (m.spool / "someone").exists()
    assert {p.name for p in m.spool.iterdir()} <= spool_before | {"postmaster"}


# --------------------------------------------------------------------------------------------
# SIZE
# --------------------------------------------------------------------------------------------

LIMIT = 1000


@pytest.fixture
def small(mailerd_factory) -> Mailerd:
    return mailerd_factory(extra=["--max-message-size", str(LIMIT)])


def test_size_advertised(small: Mailerd):
    with small.connect() as c:
        expect(c.banner(), 220)
        r = expect(c.ehlo(), 250)
        sizes = [line.split() for line in r.lines[1:] if line.upper().startswith("SIZE")]
        assert sizes == [["SIZE", str(LIMIT)]], f"expected 'SIZE {LIMIT}' (RFC 1870): {r}"


def test_size_declared_too_big_rejected_at_mail(small: Mailerd):
    m = small
    user = m.new_user("size")
    with m.connect() as c:
        c.start()
        expect(c.cmd(f"MAIL FROM:<sender@client.test> SIZE={LIMIT * 5}"), 552, "5.3.4", conn=c)
        # the session goes on; a transaction within the limit works
        mail_rcpt(c, f"{user}@example.org", params=f"SIZE={LIMIT // 2}")
        body = b"Subject: small\r\n\r\nsmall\r\n"
        send_data(c, body)
        c.cmd("QUIT")
    check_stored(only_message(m, user), sender="sender@client.test", helo="client.test", body=body)


@pytest.mark.parametrize("size", [LIMIT * 3, 2_000_000])
def test_size_actual_too_big_rejected_after_data(small: Mailerd, size: int):
    m = small
    user = m.new_user("big")
    line = b"x" * 78 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * (size // len(line) + 1)
    with m.connect() as c:
        c.start()
        mail_rcpt(c, f"{user}@example.org", params="SIZE=100")
        expect(c.cmd("DATA"), 354, conn=c)
        c.send(big + b".\r\n")
        r = c.read_reply()
        assert r.code == 552, f"oversized message must get 552 after DATA: {r}"
        assert r.enhanced in ("5.3.4", "5.2.3"), r
        # nothing stored, and the session can go on
        expect(c.cmd("NOOP"), 250, conn=c)
        c.cmd("QUIT")
    assert m.messages(user) == []


# --------------------------------------------------------------------------------------------
# Mailbox numbering
# --------------------------------------------------------------------------------------------


def test_numbering_continues_from_hand_made_mailbox(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = unique("hand")
    box = m.add_user(user)
    for n in (1, 3, 12, 7):
        (box / str(n)).write_bytes(b"Subject: old %d\r\n\r\nold\r\n" % n)
    (box / "12.status").write_bytes(b"\\Seen\n")
    (box / "notes.txt").write_bytes(b"not a message\n")
    (box / "99x").write_bytes(b"not a message either\n")
    body = _deliver(m, user, "after-hand-made")
    wait_until(lambda: 13 in m.messages(user), timeout=5)
    nums = m.messages(user)
    assert nums == [1, 3, 7, 12, 13], f"expected the next message as 13: {nums}"
    check_stored(m.read(user, 13), sender="sender@client.test", helo="client.test", body=body)
    assert has_recent(m.status(user, 13))
    # the hand-made messages are untouched
    assert (box / "12").read_bytes() == b"Subject: old 12\r\n\r\nold\r\n"
    assert (box / "12.status").read_bytes() == b"\\Seen\n"


def test_numbering_not_reused_after_delete(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("reuse")
    _deliver(m, user, "one")
    _deliver(m, user, "two")
    assert m.wait_messages(user, 2, timeout=5) == [1, 2]
    (m.spool / user / "2").unlink()
    (m.spool / user / "2.status").unlink()
    body = _deliver(m, user, "three")
    wait_until(lambda: 3 in m.messages(user), timeout=5)
    assert m.messages(user) == [1, 3], f"number 2 must not be reused: {m.messages(user)}"
    check_stored(m.read(user, 3), sender="sender@client.test", helo="client.test", body=body)
    # and in a hand-made mailbox, deleting the newest does not roll the counter back either
    user2 = unique("reuse")
    box = m.add_user(user2)
    (box / "5").write_bytes(b"Subject: old\r\n\r\nold\r\n")
    _deliver(m, user2, "six")
    assert m.wait_messages(user2, 2, timeout=5) == [5, 6]
    (box / "6").unlink()
    (box / "6.status").unlink(missing_ok=True)
    _deliver(m, user2, "seven")
    wait_until(lambda: 7 in m.messages(user2), timeout=5)
    assert m.messages(user2) == [5, 7], m.messages(user2)


# --------------------------------------------------------------------------------------------
# More edge cases of a transaction
# --------------------------------------------------------------------------------------------


def test_pipelined_transactions_back_to_back(shared_mailerd: Mailerd):
    """RFC 2920: the end of one message and the next transaction may share a write."""
    m = shared_mailerd
    user = m.new_user("b2b")
    first, second = make_body("first"), make_body("second")
    with m.connect() as c:
        c.start()
        c.send(f"MAIL FROM:<one@client.test>\r\nRCPT TO:<{user}@example.org>\r\nDATA\r\n".encode())
        for r, code in zip(c.read_replies(3), (250, 250, 354), strict=True):
            expect(r, code, conn=c)
        c.send(
            first
            + b".\r\n"
            + f"MAIL FROM:<two@client.test>\r\nRCPT TO:<{user}@example.org>\r\nDATA\r\n".encode()
        )
        for r, code in zip(c.read_replies(4), (250, 250, 250, 354), strict=True):
            expect(r, code, conn=c)
        c.send(second + b".\r\nQUIT\r\n")
        expect(c.read_reply(), 250, conn=c)
        expect(c.read_reply(), 221, conn=c)
    assert m.wait_messages(user, 2, timeout=5) == [1, 2]
    check_stored(m.read(user, 1), sender="one@client.test", helo="client.test", body=first)
    check_stored(m.read(user, 2), sender="two@client.test", helo="client.test", body=second)


def test_empty_message(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("empty")
    _raw_transaction(m, user, b"")
    check_stored(only_message(m, user), sender="sender@client.test", helo="client.test", body=b"")


def test_rset_forgets_recipients(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("rset")
    with m.connect() as c:
        c.start()
        mail_rcpt(c, f"{user}@example.org")
        expect(c.cmd("RSET"), 250, conn=c)
        r = c.cmd("DATA")
        assert r.code == 503, f"DATA after RSET must be a bad sequence: {r}"
        r = c.cmd(f"RCPT TO:<{user}@example.org>")
        assert r.code == 503, f"RCPT after RSET needs a new MAIL: {r}"
        c.cmd("QUIT")
    assert m.messages(user) == []


def test_helo_session(shared_mailerd: Mailerd):
    """Plain HELO (RFC 821 clients) still delivers."""
    m = shared_mailerd
    user = m.new_user("helo")
    body = make_body("helo")
    with m.connect() as c:
        expect(c.banner(), 220)
        expect(c.cmd("HELO old.client.test"), 250, conn=c)
        send_message(c, f"{user}@example.org", body)
        c.cmd("QUIT")
    st = parse_stored(only_message(m, user))
    assert st.return_path == b"Return-Path: <sender@client.test>"
    assert st.received.startswith(b"Received: from old.client.test"), st.received
    assert st.rest == body


def test_smtputf8(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("utf")
    body = "Subject: grüße\r\nFrom: Jörg <jörg@bücher.test>\r\n\r\nHällo wörld ✓\r\n".encode()
    _raw_transaction(m, user, body, sender="jörg@bücher.test", params="SMTPUTF8 BODY=8BITMIME")
    check_stored(
        only_message(m, user),
        sender="jörg@bücher.test",
        helo="client.test",
        body=body,
        protocols=("ESMTP", "UTF8SMTP"),  # RFC 6531 section 3.7.3
    )


def _ehlo_keywords(c) -> set[str]:
    expect(c.banner(), 220)
    r = expect(c.ehlo(), 250)
    return ehlo_keywords(r)


def test_bdat_chunks_stored_verbatim(shared_mailerd: Mailerd):
    """If CHUNKING is advertised, BDAT content is stored as sent: no dot-unstuffing."""
    m = shared_mailerd
    user = m.new_user("bdat")
    part1 = b"Subject: chunked\r\n\r\n..two dots stay two\r\n.\r\n"
    part2 = b".one dot stays\r\nend\r\n"
    with m.connect() as c:
        if "CHUNKING" not in _ehlo_keywords(c):
            pytest.skip("CHUNKING not advertised")
        mail_rcpt(c, f"{user}@example.org")
        c.send(b"BDAT %d\r\n" % len(part1) + part1)
        expect(c.read_reply(), 250, conn=c)
        c.send(b"BDAT %d LAST\r\n" % len(part2) + part2)
        expect(c.read_reply(), 250, conn=c)
        expect(c.cmd("QUIT"), 221, conn=c)
    check_stored(
        only_message(m, user), sender="sender@client.test", helo="client.test", body=part1 + part2
    )


def test_bdat_pipelined_and_zero_last(shared_mailerd: Mailerd):
    m = shared_mailerd
    user = m.new_user("bdat0")
    body = make_body("bdat-pipelined")
    with m.connect() as c:
        if "CHUNKING" not in _ehlo_keywords(c):
            pytest.skip("CHUNKING not advertised")
        c.send(
            b"MAIL FROM:<sender@client.test>\r\n"
            + f"RCPT TO:<{user}@example.org>\r\n".encode()
            + b"BDAT %d\r\n" % len(body)
            + body
            + b"BDAT 0 LAST\r\n"
            + b"QUIT\r\n"
        )
        for r, code in zip(c.read_replies(5), (250, 250, 250, 250, 221), strict=True):
            expect(r, code, conn=c)
    check_stored(only_message(m, user), sender="sender@client.test", helo="client.test", body=body)


def test_bdat_too_big(small: Mailerd):
    m = small
    user = m.new_user("bdatbig")
    chunk = b"x" * 600 + b"\r\n"
    with m.connect() as c:
        if "CHUNKING" not in _ehlo_keywords(c):
            pytest.skip("CHUNKING not advertised")
        mail_rcpt(c, f"{user}@example.org")
        c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        first = c.read_reply()
        replies = [first]
        if first.code == 250:
            c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
            replies.append(c.read_reply())
        assert replies[-1].code == 552, f"{LIMIT}-byte limit exceeded by BDAT: {replies}"
        expect(c.cmd("NOOP"), 250, conn=c)
        c.cmd("QUIT")
    assert m.messages(user) == []

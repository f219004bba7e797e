"""Relay control: the untrusted (-n) listener only takes mail for local domains.

Both listeners are on 127.0.0.1 and ::1 here, so whatever the server decides must come from the
listener a session arrived on, not from the peer's address.
"""

from __future__ import annotations

import pytest

from .conftest import (
    Mailerd,
    check_stored,
    expect,
    finish,
    listing,
    send_data,
    send_message,
    wait_until,
)

HOSTS = [pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6")]

# (recipient as written inside RCPT TO:<...> or as the whole path, exact code required or None)
TRICKS = [
    pytest.param("<user@remote.test>", ("554", "5.7.1"), id="plain-remote"),
    pytest.param("<user@[192.0.2.1]>", ("554", "5.7.1"), id="ip-literal"),
    pytest.param("<@example.org:user@remote.test>", ("554", "5.7.1"), id="source-route"),
    pytest.param("<user%remote.test@example.org>", None, id="percent-hack"),
    pytest.param("<remote.test!user@example.org>", None, id="bang-path"),
    pytest.param('<"user@remote.test"@example.org>', None, id="quoted-local-part"),
    pytest.param("<user@remote.test@example.org>", None, id="double-at"),
    pytest.param("<user@[IPv6:2001:db8::1]>", ("554", "5.7.1"), id="ipv6-literal"),
    pytest.param("<@a.test,@example.org:user@remote.test>", ("554", "5.7.1"), id="multi-hop-route"),
    pytest.param("<user@127.0.0.1>", None, id="bare-ip-domain"),
    pytest.param("<user@remote.test.>", None, id="trailing-dot"),
    # -d takes a domain suffix, but a suffix of the *name*, not of the string
    pytest.param("<user@notexample.org>", ("554", "5.7.1"), id="string-suffix"),
]


@pytest.fixture(scope="module")
def relay_server(tmp_path_factory):
    """An instance nobody ever sends remote mail through: its queue must stay empty."""
    base = tmp_path_factory.mktemp("relay")
    m = Mailerd(base, name="relay")
    # mailboxes whose names the tricks might be (mis)parsed into
    for name in ("user", "local"):
        m.add_user(name)
    m.start()
    yield m
    finish(m)


def _snapshot(m: Mailerd):
    return listing(m.base, exclude=("logs",))


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("rcpt,exact", TRICKS)
def test_untrusted_refuses_relay_trick(relay_server: Mailerd, host: str, rcpt: str, exact):
    m = relay_server
    before = _snapshot(m)
    queue_before = m.queue_files()
    local_before = m.messages("local")
    body = b"Subject: relay test\r\n\r\nrelay " + rcpt.encode() + b"\r\n"
    with m.connect(trusted=False, host=host) as c:
        c.start()
        expect(c.cmd("MAIL FROM:<attacker@remote.test>"), 250, conn=c)
        r = c.cmd(f"RCPT TO:{rcpt}")
        assert 500 <= r.code < 600, f"relay trick {rcpt} must be refused with 5xx, got {r}"
        if exact is not None:
            assert (str(r.code), r.enhanced) == exact, f"{rcpt}: expected {exact}, got {r}"
        # a local recipient in the same transaction is still fine; the message must reach only it
        expect(c.cmd("RCPT TO:<local@example.org>"), 250, conn=c)
        send_data(c, body)
        expect(c.cmd("QUIT"), 221, conn=c)
    after = _snapshot(m)
    new_local = [n for n in m.messages("local") if n not in local_before]
    assert len(new_local) == 1, new_local
    check_stored(
        m.read("local", new_local[0]), sender="attacker@remote.test", helo="client.test", body=body
    )
    box = "spool/local/"
    expected_new = {f"{box}{new_local[0]}", f"{box}{new_local[0]}.status"}
    added = {p for p in after if p not in before}
    changed = {p for p in before if p in after and before[p] != after[p]}
    removed = {p for p in before if p not in after}
    # Only the local mailbox may change (its message, status and any dotfiles of its own).
    unexpected = {
        p for p in added | changed if p not in expected_new and not p.startswith(box + ".")
    }
    assert not unexpected, f"{rcpt}: unexpected files written (queued/delivered?): {unexpected}"
    assert not removed, removed
    assert m.queue_files() == queue_before, f"{rcpt}: something was queued: {m.queue_files()}"


@pytest.mark.parametrize("host", HOSTS)
def test_untrusted_refuses_relay_alone(relay_server: Mailerd, host: str):
    """With only a refused recipient, DATA fails and nothing at all is written."""
    m = relay_server
    before = _snapshot(m)
    queue_before = m.queue_files()
    with m.connect(trusted=False, host=host) as c:
        c.start()
        expect(c.cmd("MAIL FROM:<attacker@remote.test>"), 250, conn=c)
        expect(c.cmd("RCPT TO:<victim@remote.test>"), 554, "5.7.1", conn=c)
        expect(c.cmd("RCPT TO:<victim@Remote.Test>"), 554, "5.7.1", conn=c)
        expect(c.cmd("RCPT TO:<victim@example.org.remote.test>"), 554, "5.7.1", conn=c)
        r = c.cmd("DATA")
        assert 500 <= r.code < 600, f"DATA with no accepted recipient must fail: {r}"
        expect(c.cmd("QUIT"), 221, conn=c)
    assert _snapshot(m) == before
    assert m.queue_files() == queue_before


@pytest.mark.parametrize("host", HOSTS)
def test_untrusted_accepts_local_domains(relay_server: Mailerd, host: str):
    """The configured ones, and localhost, which is always local (as in Debian's Postfix and
    Exim): mail for it is delivered here, never relayed."""
    m = relay_server
    users = [m.new_user("rl"), m.new_user("rl"), m.new_user("rl")]
    rcpts = [f"{users[0]}@example.org", f"{users[1]}@example.net", f"{users[2]}@localhost"]
    assert "localhost" not in m.domains
    queue_before = m.queue_files()
    body = b"Subject: local\r\n\r\nlocal delivery on the untrusted listener\r\n"
    with m.smtp(trusted=False, host=host) as s:
        assert s.sendmail("a@remote.test", rcpts, body) == {}
        s.quit()
    for u in users:
        assert m.wait_messages(u, 1, timeout=5) == [1]
        check_stored(m.read(u, 1), sender="a@remote.test", helo="client.test", body=body)
    assert m.queue_files() == queue_before


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("trusted", [False, True], ids=["network", "local"])
def test_an_address_literal_of_ours_is_a_local_domain(relay_server: Mailerd, host, trusted):
    """Mail to user@[one of our addresses] is delivered here, on either listener, as Postfix
    does for its $inet_interfaces (RFC 1123 5.2.17: a server must take a literal of its own
    address; postmaster@[address] reaches us when our DNS does not). The network listener
    answered 554 Relay access denied, and the local one queued it, to bounce as a loop."""
    m = relay_server
    queue_before = m.queue_files()
    users = [m.new_user("lit"), m.new_user("lit"), m.new_user("lit")]
    rcpts = [f"{users[0]}@[127.0.0.1]", f"{users[1]}@[IPv6:::1]", f"{users[2]}@[IPv6:0::1]"]
    body = b"Subject: literal\r\n\r\nto an address literal of ours\r\n"
    with m.smtp(trusted=trusted, host=host) as s:
        assert s.sendmail("a@remote.test", rcpts, body) == {}
        s.mail("a@remote.test")
        code, reply = s.rcpt("nobody-here@[127.0.0.1]")  # (a local domain's answer)
        assert (code, reply[:5]) == (550, b"5.1.1"), reply
        s.quit()
    for u, rcpt in zip(users, rcpts, strict=True):
        assert m.wait_messages(u, 1, timeout=5) == [1], rcpt
        assert m.read(u, 1).endswith(body), rcpt
    assert m.queue_files() == queue_before, "queued instead of delivered"


@pytest.mark.parametrize("host", HOSTS)
def test_trusted_accepts_remote(mailerd: Mailerd, host: str):
    m = mailerd
    before = m.queue_files()
    with m.connect(trusted=True, host=host) as c:
        c.start()
        send_message(
            c,
            "user@remote.test",
            b"Subject: outbound\r\n\r\noutbound\r\n",
            sender="sender@example.org",
        )
        expect(c.cmd("QUIT"), 221, conn=c)
    assert wait_until(lambda: m.queue_files() - before, timeout=5, interval=0.01), (
        f"nothing queued under {m.queue}"
    )


def test_relay_rights_follow_the_listener_not_the_peer(mailerd: Mailerd):
    """Same peer address (127.0.0.1), same command: trusted port 250, untrusted port 554."""
    m = mailerd
    codes = {}
    for trusted in (True, False):
        with m.connect(trusted=trusted) as c:
            c.start()
            expect(c.cmd("MAIL FROM:<sender@example.org>"), 250, conn=c)
            codes[trusted] = c.cmd("RCPT TO:<user@remote.test>")
            c.cmd("RSET")
            c.cmd("QUIT")
    expect(codes[True], 250)
    expect(codes[False], 554, "5.7.1")

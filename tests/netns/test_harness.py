"""The fake Internet itself works (DNS, scripted receivers, TLS + AUTH, tar-pit), so that a
failure in test_outbound.py points at mailerd, not at the harness. Talks to the namespace from
outside over the veth, never to anything else."""

from __future__ import annotations

import smtplib
import socket
import ssl
import time

import dns.message
import dns.query
import dns.rcode
import pytest

from .conftest import (
    DEAD,
    DNS_ADDR,
    MX1,
    MX6,
    SMARTHOST_PASSWORD,
    SMARTHOST_USER,
    TARPIT,
    Internet,
    token,
    wait_until,
)


def ask(name: str, rdtype: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), DNS_ADDR, timeout=3)


def client(host: str, port: int = 25) -> smtplib.SMTP:
    return smtplib.SMTP(host, port, local_hostname="harness.test", timeout=10)


def test_dns_answers_from_the_zone(internet: Internet):
    mx = ask("pref.test.", "MX")
    assert sorted(str(r) for rr in mx.answer for r in rr) == [
        "10 mx1.pref.test.",
        "20 mx2.pref.test.",
    ]
    assert ask("nxdomain.test.", "MX").rcode() == dns.rcode.NXDOMAIN
    assert ask("dnsfail.test.", "MX").rcode() == dns.rcode.SERVFAIL
    aaaa = ask("mx6.v6only.test.", "AAAA")
    assert [str(r) for rr in aaaa.answer for r in rr] == [MX6]


def test_resolv_conf_inside_the_namespace(internet: Internet):
    out = internet.netns.run(["cat", "/etc/resolv.conf"])
    assert out.stdout.strip() == f"nameserver {DNS_ADDR}"


def test_receiver_rules(internet: Internet):
    mx1 = internet.receivers["mx1"]
    ok = f"{token('h')}@pref.test"
    bad = f"bad-{token('h')}@pref.test"
    retry = f"{token('h')}@hold.test"  # no rule at mx1: accepted
    with client(MX1) as s:
        s.ehlo("harness.test")
        assert s.mail("someone@client.test")[0] == 250
        assert s.rcpt(ok)[0] == 250
        code, text = s.rcpt(bad)
        assert code == 550 and b"5.1.1" in text and bad.encode() in text
        assert s.rcpt(retry)[0] == 250
        assert s.data(b"Subject: x\r\n\r\nbody\r\n")[0] == 250
    t = wait_until(lambda: mx1.delivered(ok), 5)[0]
    assert t["rcpt_tos"] == [ok, retry] and t["rejected_rcpts"][0][0] == bad
    assert t["helo"] == "harness.test" and not t["tls"] and t["auth_user"] is None
    assert t["data"] == "Subject: x\r\n\r\nbody\r\n"
    # "first": 2 — two 451s, then accepted
    rcpt = f"{token('h')}@retry-data.test"
    replies = []
    for _ in range(3):
        with client(MX1) as s:
            s.ehlo("harness.test")
            s.mail("")
            s.rcpt(rcpt)
            try:
                replies.append(s.data(b"Subject: y\r\n\r\nbody\r\n")[0])
            except smtplib.SMTPDataError as e:
                replies.append(e.smtp_code)
    # the rule is shared with test_outbound's retry test only through this receiver process,
    # and each module has its own namespace and receivers
    assert replies == [451, 451, 250], replies
    assert [t["mail_from"] for t in mx1.transactions() if rcpt in t["rcpt_tos"]] == [""] * 3


def test_smarthost_requires_tls_and_auth(internet: Internet):
    with client(DEAD, 587) as s:
        s.ehlo("harness.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.mail("a@client.test")[0] == 530
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s.starttls(context=ctx)
        s.ehlo("harness.test")
        assert "PLAIN" in s.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login(SMARTHOST_USER, "wrong")
        s.login(SMARTHOST_USER, SMARTHOST_PASSWORD)
        rcpt = f"{token('h')}@pref.test"
        s.sendmail("a@client.test", [rcpt], b"Subject: z\r\n\r\nbody\r\n")
    t = internet.receivers["smarthost"].delivered(rcpt)[0]
    assert t["tls"] and t["auth_user"] == SMARTHOST_USER


def test_tarpit_says_nothing(internet: Internet):
    tarpit = internet.start_receiver("harness-tarpit", f"{TARPIT}:25", {"tarpit": True})
    try:
        with socket.create_connection((TARPIT, 25), timeout=5) as s:
            s.settimeout(1.5)
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                s.recv(100)
            assert time.monotonic() - start >= 1.4
        assert tarpit.connections() == 1
    finally:
        tarpit.stop()


def test_dead_address_refuses(internet: Internet):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((DEAD, 25), timeout=5).close()

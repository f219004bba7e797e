"""DNS blocklists (`--dnsbl ZONE`): a network client a zone lists is refused at RCPT with
Postfix's words (`554 5.7.1 Service unavailable; Client host [IP] blocked using ZONE`); the
local listener, a zone that lists nothing, one that refuses the query (Spamhaus's
127.255.255.254 for a public resolver) and one that does not answer refuse nothing.

One mailerd for the module, with --dnsbl for four zones, asking its own in-process DNS server
(tests/dnsserver.py) that serves them; nothing asks the machine's resolver. Clients connect from
127.0.0.1 and ::1, whose names under a zone are 1.0.0.127.ZONE and ::1's 32 nibbles, reversed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dnsserver import DNSServer, Records

from mailerd.inbound.blocklists import query_name

from .conftest import Mailerd, expect, send_message, wait_until

LISTS = "listed.test"  # lists both loopback addresses
CLEAN = "clean.test"  # lists nothing
REFUSES = "refuses.test"  # answers 127.255.255.254: "public resolver", no listing
ERRS = "errs.test"  # answers 127.255.255.253 and .250: error codes (Spamhaus's range), no listing
SILENT = "silent.test"  # never answers
DNS_TIMEOUT = 2.0


def zone() -> str:
    lines = []
    for address in ("127.0.0.1", "::1"):
        lines.append(f"{query_name(address, LISTS)}. A 127.0.0.2")
        lines.append(f"{query_name(address, REFUSES)}. A 127.255.255.254")
        lines.append(f"{query_name(address, ERRS)}. A 127.255.255.253")
        lines.append(f"{query_name(address, ERRS)}. A 127.255.255.250")
        lines.append(f'{query_name(address, SILENT)}. TXT "dnsserver:timeout"')
    lines.append(f"other.{CLEAN}. A 127.0.0.2")  # (the zone exists; our addresses are not in it)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    server = DNSServer(Records(zone()))
    server.start()
    yield server
    server.stop()


def start(tmp_path, dns: DNSServer, *zones: str) -> Mailerd:
    extra = ["--dns-server", f"{dns.host}:{dns.port}", "--dns-timeout", f"{DNS_TIMEOUT}s"]
    for z in zones:
        extra += ["--dnsbl", z]
    return Mailerd(tmp_path, workers=1, extra=extra).start()


@pytest.fixture(scope="module")
def m(tmp_path_factory, dns: DNSServer) -> Iterator[Mailerd]:
    server = start(tmp_path_factory.mktemp("dnsbl"), dns, CLEAN, REFUSES, LISTS)
    yield server
    server.stop()


def blocked(address: str, zone: str) -> str:
    return f"Service unavailable; Client host [{address}] blocked using {zone}"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_listed_client_of_the_network_listener_is_refused_at_rcpt(m: Mailerd, host: str):
    """Refused at each RCPT with the listing zone named, logged as Postfix logs it; the
    session goes on (another zone's refusal of the query changes nothing)."""
    user = m.new_user("bl")
    mark = len(m.stderr_text().splitlines())
    with m.connect(trusted=False, host=host) as c:
        c.start("bot.example.com")
        expect(c.cmd("MAIL FROM:<spam@example.com>"), 250, conn=c)
        reply = c.cmd(f"RCPT TO:<{user}@example.org>")
        expect(reply, 554, "5.7.1", conn=c)
        assert reply.text == f"5.7.1 {blocked(host, LISTS)}", reply
        expect(c.cmd("RSET"), 250, conn=c)
    assert m.messages(user) == []
    log = m.stderr_text().splitlines()[mark:]
    line = f"NOQUEUE: reject: RCPT from unknown[{host}]: 554 5.7.1 {blocked(host, LISTS)}; "
    assert any(line in entry for entry in log), "\n".join(log)
    warned = [entry for entry in m.stderr_text().splitlines() if f"dnsbl {REFUSES}" in entry]
    assert len(warned) == 1 and "public resolver" in warned[0], warned


def delivered(server: Mailerd, trusted: bool) -> bool:
    """One message from 127.0.0.1 to a new user, taken (250s) and stored?"""
    user = server.new_user("bl")
    with server.connect(trusted=trusted) as c:
        c.start("mx.example.com")
        send_message(c, f"{user}@example.org", b"Subject: hi\r\n\r\nhi\r\n")
    return wait_until(lambda: len(server.messages(user)) == 1)


def test_the_local_listener_is_not_looked_up(m: Mailerd):
    assert delivered(m, trusted=True)


def test_zones_that_list_nothing_or_refuse_the_query_refuse_nothing(tmp_path, dns: DNSServer):
    """Nothing listed, Spamhaus's "public resolver", and any other code of its error range
    (127.255.255.0/24, "not to be interpreted as any sort of reputation"; an attacker's pass:
    .253 refused every client), each warned of once."""
    server = start(tmp_path, dns, CLEAN, REFUSES, ERRS)
    try:
        assert delivered(server, trusted=False) and delivered(server, trusted=False)
        warned = [line for line in server.stderr_text().splitlines() if "dnsbl errs.test" in line]
        assert len(warned) == 2 and "an error code" in warned[0], warned
    finally:
        server.stop()


def test_a_zone_that_does_not_answer_refuses_nothing_within_the_dns_timeout(
    tmp_path, dns: DNSServer
):
    """A blocklist that is down holds the first RCPT at most --dns-timeout, then lists
    nothing: mail is never refused because of it; and for a minute it is not asked, so that
    the next sessions do not each wait the timeout (an attacker's pass)."""
    server = start(tmp_path, dns, SILENT)
    try:
        waits = []
        for _ in range(2):
            user = server.new_user("bl")
            with server.connect(trusted=False) as c:
                c.start("mx.example.com")
                expect(c.cmd("MAIL FROM:<a@example.com>"), 250, conn=c)
                began = time.monotonic()
                expect(c.cmd(f"RCPT TO:<{user}@example.org>"), 250, conn=c)
                waits.append(time.monotonic() - began)
                expect(c.cmd(f"RCPT TO:<{user}+again@example.org>"), 250, conn=c)  # (once)
        assert DNS_TIMEOUT - 0.5 < waits[0] < DNS_TIMEOUT + 1.5 and waits[1] < 0.5, waits
        said = [line for line in server.stderr_text().splitlines() if "did not answer" in line]
        assert len(said) == 1 and SILENT in said[0], said
    finally:
        server.stop()

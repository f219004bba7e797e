"""--dnsbl: the names a listing is looked up at (RFC 5782's examples), and the zones the
configuration takes. (Listings, refusals and silence are tested end to end: e2e/test_blocklists.)"""

from __future__ import annotations

import pytest

from mailerd import config
from mailerd.inbound.blocklists import blocked, query_name


def test_query_names_are_rfc_5782s():
    assert query_name("192.0.2.99", "bl.example") == "99.2.0.192.bl.example"
    assert query_name("2001:db8:1:2:3:4:567:89ab", "ugly.example") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example"
    )
    assert query_name("::1", "z.example").startswith("1." + "0." * 31)


def test_the_refusal_is_postfixs():
    reply = blocked("192.0.2.99", "zen.spamhaus.org")
    assert (reply.code, reply.status) == (554, "5.7.1")
    said = "Service unavailable; Client host [192.0.2.99] blocked using zen.spamhaus.org"
    assert reply.text == said


BASE = ["-n", "none", "-l", "127.0.0.1:2525", "-d", "example.org", "--dns-server", "127.0.0.1:9"]


def test_zones_are_taken_once_each_in_their_order():
    given = ["--dnsbl", "zen.spamhaus.org", "--dnsbl", "BL.SpamCop.net."]
    given += ["--dnsbl", "zen.spamhaus.org"]
    assert config.load([*BASE, *given]).dnsbl == ("zen.spamhaus.org", "bl.spamcop.net")
    assert config.load(BASE).dnsbl == ()


@pytest.mark.parametrize(
    "zone", ["spamhaus", "zen..spamhaus.org", "-bad.example", "a b.example", "zen\n.spamhaus.org"]
)
def test_a_zone_that_is_no_dns_name_is_refused(zone: str):
    with pytest.raises(config.ConfigError, match="--dnsbl: not a DNS zone"):
        config.load([*BASE, f"--dnsbl={zone}"])

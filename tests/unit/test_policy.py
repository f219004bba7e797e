"""Relay policy and mailbox naming: the verdicts that keep mailerd from being an open relay."""

import pytest

from mailerd import policy
from mailerd.names import Locality
from mailerd.smtp.events import Address

DOMAINS = ("example.org", "example.net")


def route(local: str, domain: str, trusted: bool, quoted: bool = False) -> policy.Route:
    return policy.route(Address(local, domain, quoted), trusted=trusted, locality=Locality(DOMAINS))


def test_local_recipient_on_either_listener():
    for trusted in (True, False):
        assert route("Alice", "Example.ORG", trusted) == policy.Local("alice")


def test_subdomain_of_a_local_suffix_is_local():
    assert route("bob", "mail.example.net", False) == policy.Local("bob")
    assert route("bob", "badexample.net", False) == policy.Refused(policy.RELAY_DENIED)


def test_plus_tag_delivers_to_user():
    assert route("bob+lists", "example.org", False) == policy.Local("bob")


@pytest.mark.parametrize("domain", ["remote.test", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_remote_refused_untrusted_accepted_trusted(domain):
    assert route("user", domain, False) == policy.Refused(policy.RELAY_DENIED)
    assert route("user", domain, True) == policy.Remote(domain.lower())


OWN = frozenset({"192.0.2.1", "2001:db8::1"})  # (host.own_addresses: as ipaddress writes them)


@pytest.mark.parametrize(
    "domain",
    [
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
        "[ipv6:2001:DB8:0:0::1]",  # (the tag is case-insensitive; another spelling of it)
        "[IPv6:::ffff:192.0.2.1]",  # (the IPv4 address in IPv6 form)
        "[127.0.0.1]",  # (loopback: always this machine's)
        "[127.1.2.3]",
        "[IPv6:::1]",
    ],
)
def test_an_address_literal_of_ours_is_local(domain):
    """RFC 5321 4.1.3, RFC 1123 5.2.17; Postfix's $inet_interfaces and $proxy_interfaces."""
    for trusted in (True, False):
        address = Address("Alice", domain, False)
        verdict = policy.route(address, trusted=trusted, locality=Locality(DOMAINS, OWN))
        assert verdict == policy.Local("alice"), domain


@pytest.mark.parametrize(
    "domain", ["[192.0.2.2]", "[0.0.0.0]", "[IPv6:::]", "[192.0.2.1.]", "[IPv6:192.0.2.1]"]
)
def test_other_address_literals_are_not(domain):
    address = Address("alice", domain, False)
    verdict = policy.route(address, trusted=False, locality=Locality(DOMAINS, OWN))
    assert verdict == policy.Refused(policy.RELAY_DENIED)
    verdict = policy.route(address, trusted=True, locality=Locality(DOMAINS, OWN))
    assert verdict == policy.Remote(domain.lower())


def test_at_an_address_literal_of_ours_routing_tricks_are_refused_too():
    address = Address("user%remote.test", "[192.0.2.1]", False)
    verdict = policy.route(address, trusted=False, locality=Locality(DOMAINS, OWN))
    assert verdict == policy.Refused(policy.ROUTING_DENIED)


@pytest.mark.parametrize("local", ["user%remote.test", "remote.test!user", "user@remote.test"])
def test_routing_tricks_refused_untrusted(local):
    verdict = route(local, "example.org", False, quoted="@" in local)
    assert verdict == policy.Refused(policy.ROUTING_DENIED)
    assert verdict.reply.code == 554


def test_routing_chars_on_trusted_are_plain_names_never_reparsed():
    # Not re-parsed as routing: the whole local part names a (nonexistent) mailbox.
    assert route("user%remote.test", "example.org", True) == policy.Local("user%remote.test")


def test_postmaster_without_domain():
    assert route("PostMaster", "", False) == policy.Local("postmaster")
    assert route("someone", "", True) == policy.Refused(policy.BAD_MAILBOX)


@pytest.mark.parametrize("local", [".", "..", "../etc", ".hidden", "a/b", "a\x00b", "a\x01", "+x"])
def test_names_that_could_escape_the_spool(local):
    assert route(local, "example.org", True) == policy.Refused(policy.BAD_MAILBOX)
    assert policy.BAD_MAILBOX.code == 550 and policy.BAD_MAILBOX.status == "5.1.3"

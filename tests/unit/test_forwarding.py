"""The envelope sender of a forwarded copy (mailerd/forwarding.py): which senders are rewritten
and how; that the rewritten address leads back to the alias (and nowhere else) when mail
comes to it from the Internet; and that it passes SPF where the original fails, as the forward
target sees it (mailerd's own SPF check against a DNS server of the test's own, serving the
records `mailerd dns` prints)."""

from __future__ import annotations

import pytest
from dnsserver import DNSServer, Records
from test_inbound import run_check

from mailerd import aliases, forwarding, policy, recipients
from mailerd.names import Locality
from mailerd.smtp.grammar import parse_address
from mailerd.spool import Spool

DOMAINS = ("example.org",)
ALIASES = "fwd: away@gmail.test\nkeep: keep, kept@backup.test\n"


def rewritten(sender: str, via: str = "fwd@example.org") -> str:
    return forwarding.envelope_sender(sender, via, DOMAINS)


@pytest.mark.parametrize(
    "sender, expected",
    [
        ("zed@example.net", "fwd+fwd_from=zed=example.net@example.org"),
        ("Zed.Two@Example.NET", "fwd+fwd_from=Zed.Two=example.net@example.org"),
        ("zed+list@example.net", "fwd+fwd_from=zed+list=example.net@example.org"),
        # a local part that may not stand unquoted in the tag, or that routes: the bare tag
        ('"zed doe"@example.net', "fwd+fwd_from@example.org"),
        ("zed%other@example.net", "fwd+fwd_from@example.org"),
        ("zed!other@example.net", "fwd+fwd_from@example.org"),
        ("zéd@example.net", "fwd+fwd_from@example.org"),
        ("zed@[192.0.2.1]", "fwd+fwd_from@example.org"),
        # an internationalized domain in its A-labels, as the tag must be ASCII
        ("zed@exämple.net", "fwd+fwd_from=zed=xn--exmple-cua.net@example.org"),
        ("zed@faß.example", "fwd+fwd_from=zed=xn--fa-hia.example@example.org"),  # IDNA 2008
        ("zed@ΟΔΟΣ-1.example", "fwd+fwd_from=zed=xn---1-k9b7bby.example@example.org"),  # σ, not ς
        # 64 octets at most (RFC 5321 4.5.3.1.1): the bare tag past that
        ("z" * 39 + "@example.net", f"fwd+fwd_from={'z' * 39}=example.net@example.org"),
        ("z" * 40 + "@example.net", "fwd+fwd_from@example.org"),
    ],
)
def test_a_remote_sender_of_a_forward_becomes_the_alias_s_tagged_address(sender, expected):
    assert rewritten(sender) == expected
    assert_a_reverse_path(expected)


def assert_a_reverse_path(address: str) -> None:
    """What mailerd's own grammar takes in MAIL FROM, unquoted, of at most 64 octets."""
    local = address.rpartition("@")[0]
    assert len(local.encode()) <= forwarding.LOCAL_PART_MAX, address
    parsed = parse_address(address)
    assert (parsed.local, parsed.quoted) == (local, False), address


@pytest.mark.parametrize(
    "alias, expected",
    [
        ("a.b", "a.b+fwd_from=zed=example.net@example.org"),
        ("x" * 50, "x" * 50 + "+fwd_from@example.org"),  # (the tagged form is too long)
        # names the aliases file takes that are no dot-atom, or too long: the sender as it was
        ('"john smith"', "zed@example.net"),
        ("john smith", "zed@example.net"),
        (".dot", "zed@example.net"),
        ("a..b", "zed@example.net"),
        ("x" * 60, "zed@example.net"),
    ],
)
def test_an_alias_name_that_cannot_stand_in_a_path_keeps_the_sender(alias, expected):
    result = rewritten("zed@example.net", f"{alias}@example.org")
    assert result == expected
    assert_a_reverse_path(result)


@pytest.mark.parametrize(
    "sender, via",
    [
        ("", "fwd@example.org"),  # a bounce being forwarded stays a bounce
        ("alice@example.org", "fwd@example.org"),  # a local domain already lists this server
        ("alice@lists.example.org", "fwd@example.org"),  # (a subdomain of one is local too)
        ("zed@example.net", ""),  # not a forward: the owner's own mail to a remote address
        ("zed@example.net", "fwd@example.com"),  # an alias's domain no longer local
    ],
)
def test_other_senders_are_kept(sender, via):
    assert rewritten(sender, via) == sender


def test_a_localhost_sender_of_a_forward_leaves_from_the_alias():
    """(`sendmail -f root@localhost`, fail2ban's.) localhost is a local domain, but no receiver
    can check it: the copy leaves from the alias's tagged address, as a remote sender's does."""
    domains = ("example.org", "localhost")
    assert forwarding.envelope_sender("root@localhost", "fwd@example.org", domains) == (
        "fwd+fwd_from=root=localhost@example.org"
    )
    assert forwarding.envelope_sender("alice@example.org", "fwd@example.org", domains) == (
        "alice@example.org"
    )


def test_a_sender_whose_spf_failed_here_is_kept():
    """It would fail at the target either way; rewritten, it would pass in our name."""
    sender = "ceo@bank.example"
    for spf in ("fail", "softfail"):
        assert forwarding.envelope_sender(sender, "fwd@example.org", DOMAINS, spf) == sender
    for spf in ("pass", "neutral", "none", "temperror", "permerror", ""):
        assert forwarding.envelope_sender(sender, "fwd@example.org", DOMAINS, spf) == (
            "fwd+fwd_from=ceo=bank.example@example.org"
        ), spf


@pytest.mark.parametrize("spf", ["pass", "fail", ""])
def test_mail_that_came_back_to_a_forward_s_address_leaves_as_a_notice(spf):
    """An auto-reply sent to `fwd+fwd_from=…` (not from <>, as RFC 3834 asks) is forwarded
    from <>, so that no auto-reply at the target answers it again, and again."""
    via = forwarding.via_of("fwd", "example.org", "FWD+fwd_from=zed=example.net")
    assert via == "fwd+fwd_from@example.org"
    assert forwarding.envelope_sender("auto-reply@gmail.test", via, DOMAINS, spf) == ""
    # (a local sender writing there is forwarded as it would be to the alias)
    assert forwarding.envelope_sender("alice@example.org", via, DOMAINS) == "alice@example.org"


@pytest.mark.parametrize(
    "first, second, kept",
    [
        ("fwd@example.org", "fwd+fwd_from@example.org", "fwd+fwd_from@example.org"),
        ("fwd+fwd_from@example.org", "fwd@example.org", "fwd+fwd_from@example.org"),
        ("fwd@example.org", "other@example.org", "fwd@example.org"),
        ("", "fwd@example.org", ""),
    ],
)
def test_of_two_aliases_to_one_address_a_came_back_one_wins_in_any_order(first, second, kept):
    assert forwarding.preferred(first, second) == kept


def test_an_alias_with_a_plus_in_its_name_keeps_the_sender():
    """A tag after `a+b` would be read as `a`'s; `a+b` itself, mail sent back to it could
    not be told from mail to the alias, and an auto-reply would be forwarded again."""
    assert rewritten("zed@example.net", "a+b@example.org") == "zed@example.net"


@pytest.mark.parametrize(
    "sender",
    ["zed@example.net", "zed+list@example.net", '"zed doe"@example.net', "z" * 70 + "@x.net"],
)
@pytest.mark.parametrize("alias", ["fwd", "keep"])
def test_mail_to_the_rewritten_address_from_the_internet_goes_to_the_alias(sender, alias):
    """A bounce or a reply to it: the alias's own targets, never the original sender (no
    relay: an untrusted client names any `fwd_from=` it likes)."""
    entries, problems = aliases.parse(ALIASES)
    assert not problems
    table = aliases.build(entries, Locality(DOMAINS))
    address = parse_address(rewritten(sender, f"{alias}@example.org"))
    route = policy.route(address, trusted=False, locality=Locality(DOMAINS), aliases=table)
    assert route == policy.route(
        parse_address(f"{alias}@example.org"),
        trusted=False,
        locality=Locality(DOMAINS),
        aliases=table,
    )
    assert isinstance(route, policy.Alias) and route.name == alias


def test_policy_names_an_alias_as_the_table_does():
    entries, _ = aliases.parse(ALIASES)
    table = aliases.build(entries, Locality(DOMAINS))
    route = policy.route(
        parse_address("FWD+news@example.org"),
        trusted=False,
        locality=Locality(DOMAINS),
        aliases=table,
    )
    assert route == policy.Alias("fwd", (), ("away@gmail.test",))


# -- as the forward target sees it -------------------------------------------------------------

ZONE = """
$ORIGIN example.org.
@            MX  10 mx
@            TXT "v=spf1 mx -all"
mx           A   127.0.0.1
$ORIGIN strict.example.
@            TXT "v=spf1 ip4:192.0.2.1 -all"
"""


@pytest.fixture(scope="module")
def dns_server() -> DNSServer:
    server = DNSServer(Records(ZONE))
    server.start()
    return server


def spf_at_target(server: DNSServer, sender: str) -> str:
    """The SPF result a server checking mail from this host (127.0.0.1) would get."""
    message = b"From: <zed@strict.example>\r\nSubject: hi\r\n\r\nbody\r\n"
    verdict = run_check(server, message, sender=sender, helo="mx.example.org")
    return verdict.sender_spf


def test_the_forward_passes_spf_where_the_original_sender_fails(dns_server):
    original = "zed@strict.example"
    assert spf_at_target(dns_server, original) == "fail"
    assert spf_at_target(dns_server, rewritten(original)) == "pass"


@pytest.mark.parametrize(
    "rcpt, via",
    [
        ("away@example.org", "away@example.org"),
        ("Away+news@Example.ORG", "away@example.org"),
        ("away@example.com", "away@example.com"),  # each local domain its own
        ("away@sub.example.org", "away@example.org"),  # as configured: it has the SPF record
        ("postmaster", "postmaster@example.org"),  # (RCPT TO:<postmaster>: the first domain)
        ("away+fwd_from=zed=example.net@example.com", "away+fwd_from@example.com"),  # came back
        ("away@mail.lists.example.org", "away@lists.example.org"),  # the longest configured
        # localhost (always local) is this machine's name for itself, which no receiver can
        # check SPF for or send a bounce back to: the first configured domain
        ("away@localhost", "away@example.org"),
        ("away@mail.localhost", "away@example.org"),
    ],
)
def test_a_forward_records_the_alias_at_the_configured_domain(tmp_path, rcpt, via):
    entries, _ = aliases.parse("away: gone@gmail.test\npostmaster: pm@gmail.test\n")
    domains = ("example.org", "example.com", "lists.example.org", "localhost")
    resolved = recipients.resolve(
        parse_address(rcpt),
        trusted=False,
        locality=Locality(domains),
        aliases=aliases.build(entries, Locality(domains)),
        spool=Spool(str(tmp_path)),
        spool_path=str(tmp_path),
    )
    assert [(t.mailbox, t.via) for t in resolved.targets] == [(None, via)]


def test_no_alias_domain_no_rewrite():
    assert forwarding.envelope_sender("zed@example.net", "postmaster@", DOMAINS) == (
        "zed@example.net"
    )

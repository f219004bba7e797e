"""MX resolution against a real DNS server on loopback (tests/dnsserver.py), never the system's.

One server, started once for the module, holds every test domain; each test points its own
resolver at it. Domains are under .test (RFC 6761), addresses from the documentation ranges.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailerd.delivery import mx


def _load_dnsserver():
    # tests/ is not a package: load the shared helper by path.
    if "dnsserver" in sys.modules:
        return sys.modules["dnsserver"]
    spec = importlib.util.spec_from_file_location(
        "dnsserver", Path(__file__).resolve().parents[1] / "dnsserver.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["dnsserver"] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


dnsserver = _load_dnsserver()

MANY = 70  # MX hosts of many.test: more than fits a 1232-byte UDP answer

ZONE = (
    """
$ORIGIN order.test.
@        MX 20 mx2
@        MX 10 mx1
@        MX 30 mx3
mx1      AAAA 2001:db8::1
mx1      A    192.0.2.1
mx2      A    192.0.2.2
mx3      A    192.0.2.3

$ORIGIN equal.test.
@        MX 10 a
@        MX 10 b
@        MX 20 z
a        A 192.0.2.11
b        A 192.0.2.12
z        A 192.0.2.13

$ORIGIN v6only.test.
@        MX 10 mx
mx       AAAA 2001:db8::6

$ORIGIN implicit.test.
@        A    192.0.2.20
@        AAAA 2001:db8::20
@        TXT  "v=spf1 -all"

$ORIGIN noaddress.test.
@        TXT  "no MX, no address"

$ORIGIN nullmx.test.
@        MX 0 .

$ORIGIN mixednull.test.
@        MX 0 .
@        MX 10 mx
mx       A 192.0.2.30

$ORIGIN servfail.test.
@        TXT "dnsserver:servfail"

$ORIGIN slow.test.
@        TXT "dnsserver:timeout"

$ORIGIN mxfail.test.
@        MX 10 broken
broken   TXT "dnsserver:servfail"

$ORIGIN partial.test.
@        MX 10 broken
@        MX 20 good
broken   TXT "dnsserver:servfail"
good     A 192.0.2.40

$ORIGIN dangling.test.
@        MX 10 gone

$ORIGIN dangling-broken.test.
@        MX 10 gone
@        MX 20 broken
broken   TXT "dnsserver:servfail"

$ORIGIN half.test.
@        MX 10 mx
mx       A 192.0.2.50
mx       TXT "dnsserver:servfail AAAA"

$ORIGIN loop.test.
@        MX 10 better
@        MX 20 me
@        MX 20 peer
@        MX 30 worse
better   A 192.0.2.61
me       A 192.0.2.62
peer     A 192.0.2.63
worse    A 192.0.2.64

$ORIGIN selfbest.test.
@        MX 10 me
@        MX 20 other
me       A 192.0.2.71
other    A 192.0.2.72

$ORIGIN alias.test.
@        MX 10 mail
mail     CNAME real
real     A 192.0.2.80

$ORIGIN dup.test.
@        MX 20 mx
@        MX 10 mx
mx       A 192.0.2.90

$ORIGIN xn--bcher-kva.test.
@        MX 10 mx
mx       A 192.0.2.100

$ORIGIN xn--fa-hia.test.
@        MX 10 mx
mx       A 192.0.2.101

$ORIGIN fass.test.
@        MX 10 mx
mx       A 192.0.2.102

$ORIGIN thismachine.test.
@        MX 10 zero4
@        MX 20 zero6
@        MX 30 mapped
@        MX 40 lo2
zero4    A 0.0.0.0
zero6    AAAA ::
mapped   AAAA ::ffff:0.0.0.0
lo2      A 127.0.0.2

$ORIGIN unreachable.test.
@        MX 10 mx
@        MX 20 backup
mx       A 224.0.0.1
mx       A 255.255.255.255
mx       A 169.254.0.9
mx       AAAA fe80::1
mx       AAAA ff02::1
mx       A 192.0.2.110
backup   A 240.0.0.1
"""
    + "$ORIGIN many.test.\n"
    + "".join(f"@ MX {i} host{i:02}\nhost{i:02} A 198.51.100.{i}\n" for i in range(MANY))
)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.fixture(scope="module")
def server():
    with dnsserver.serve(ZONE) as srv:
        yield srv


@pytest.fixture
def resolver(server):
    return mx.make_resolver((server.host, server.port), timeout=2.0)


def resolve(resolver, domain, **kwargs):
    kwargs.setdefault("rng", random.Random(1))
    return run(mx.resolve(domain, resolver, **kwargs))


def hosts(route):
    assert isinstance(route, mx.Route), route
    return [t.host for t in route.targets]


# --- the resolver ------------------------------------------------------------------------


def test_make_resolver_asks_only_the_given_server():
    resolver = mx.make_resolver(("127.0.0.1", 5353), timeout=3.0)
    [ns] = resolver.nameservers
    # dnspython 2.3 (Debian 12) keeps strings plus resolver.port; newer ones may wrap them.
    address, port = (ns, resolver.port) if isinstance(ns, str) else (ns.address, ns.port)
    assert (address, port) == ("127.0.0.1", 5353)
    assert resolver.search == []
    assert resolver.lifetime == 3.0


def test_mailerd_never_asks_the_c_library_for_a_name():
    """Every lookup of mailerd's goes through make_resolver (dnspython), which the suite's
    guard (MAILERD_FORBID_SYSTEM_RESOLVER) holds to a test's own DNS server. A call that
    asks the C library for a name would go to the machine's resolver past that guard: the
    default host name's socket.getfqdn did, until it read /etc/hosts instead."""
    from pathlib import Path

    lookup = re.compile(
        r"\b(getfqdn|gethostbyname\w*|gethostbyaddr|getaddrinfo|getnameinfo|create_connection"
        r"|open_connection|create_datagram_endpoint)\s*\("
    )
    package = Path(mx.__file__).resolve().parents[1]
    found = [
        f"{path.relative_to(package.parent)}:{n}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if lookup.search(line.partition("#")[0])
    ]
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_a_lookup_ends_at_its_timeout_against_a_silent_server():
    """dnspython sleeps a back-off between rounds of tries that may pass its lifetime: a
    lookup given 10 s took 11.6, 6 s took 6.4 (found by a tester: --dns-timeout is promised
    as the bound). The resolver holds it to the timeout."""
    import dns.resolver

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # (reads nothing, answers nothing)
    with silent:
        resolver = mx.make_resolver(silent.getsockname(), timeout=6.0)
        start = time.monotonic()
        with pytest.raises(dns.resolver.LifetimeTimeout):
            asyncio.run(resolver.resolve("example.org", "MX"))
        took = time.monotonic() - start
    assert 5.9 < took < 6.25, f"a lookup given 6 s took {took:.2f} s"


def test_a_lookup_cancelled_as_its_answer_comes_leaves_no_orphan_exception(resolver):
    """The bound was asyncio.wait_for, whose own task (Python 3.11) ended with the lookup's
    NXDOMAIN when the lookup was cancelled as its answer came: asyncio logged "Task exception
    was never retrieved" with a traceback, a third of the time (the suite's teardown took it
    for a crash: the inbound checks cancel the DMARC lookups they no longer need)."""
    import dns.exception

    async def main() -> list[str]:
        seen: list[str] = []
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: seen.append(context["message"]))

        async def one(n: int) -> None:
            with contextlib.suppress(dns.exception.DNSException):
                await resolver.resolve(f"_dmarc.n{n}.nothing.test", "TXT")

        rng = random.Random(7)
        for n in range(600):
            task = asyncio.create_task(one(n))
            await asyncio.sleep(rng.random() * 0.002)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        gc.collect()  # (an orphan's exception is logged when the task is collected)
        await asyncio.sleep(0.1)
        return seen

    assert asyncio.run(main()) == []


# --- MX order ----------------------------------------------------------------------------


def test_hosts_in_preference_order_with_ipv6_then_ipv4(resolver):
    route = resolve(resolver, "order.test")
    assert route == mx.Route(
        (
            mx.Target("mx1.order.test", 10, ("2001:db8::1", "192.0.2.1")),
            mx.Target("mx2.order.test", 20, ("192.0.2.2",)),
            mx.Target("mx3.order.test", 30, ("192.0.2.3",)),
        ),
        implicit=False,
    )


def test_domain_case_and_final_dot_do_not_matter(resolver):
    assert hosts(resolve(resolver, "ORDER.Test.")) == hosts(resolve(resolver, "order.test"))


def test_equal_preferences_are_shuffled_by_the_given_rng(resolver):
    orders = set()
    for seed in range(20):
        first = hosts(resolve(resolver, "equal.test", rng=random.Random(seed)))
        again = hosts(resolve(resolver, "equal.test", rng=random.Random(seed)))
        assert first == again  # deterministic for a given seed
        assert first[-1] == "z.equal.test"  # the shuffle never crosses preferences
        orders.add(tuple(first))
    assert orders == {
        ("a.equal.test", "b.equal.test", "z.equal.test"),
        ("b.equal.test", "a.equal.test", "z.equal.test"),
    }


def test_ipv6_only_mx_is_usable(resolver):
    route = resolve(resolver, "v6only.test")
    assert route.targets == (mx.Target("mx.v6only.test", 10, ("2001:db8::6",)),)


def test_a_host_listed_twice_keeps_its_best_preference(resolver):
    route = resolve(resolver, "dup.test")
    assert route.targets == (mx.Target("mx.dup.test", 10, ("192.0.2.90",)),)


def test_mx_pointing_at_a_cname_is_followed(resolver):
    route = resolve(resolver, "alias.test")
    assert route.targets == (mx.Target("mail.alias.test", 10, ("192.0.2.80",)),)


def test_max_hosts_caps_the_targets_and_a_large_mx_set_comes_over_tcp(server, resolver):
    route = resolve(resolver, "many.test")
    assert hosts(route) == [f"host{i:02}.many.test" for i in range(5)]
    assert hosts(resolve(resolver, "many.test", max_hosts=2)) == [
        "host00.many.test",
        "host01.many.test",
    ]
    assert ("tcp", "many.test. MX") in server.queries  # the UDP answer was truncated


# --- no MX -------------------------------------------------------------------------------


def test_no_mx_means_the_domain_itself_is_the_implicit_mx(resolver):
    route = resolve(resolver, "implicit.test")
    assert route == mx.Route(
        (mx.Target("implicit.test", 0, ("2001:db8::20", "192.0.2.20")),), implicit=True
    )


def test_no_mx_and_no_address_is_permanent(resolver):
    failure = resolve(resolver, "noaddress.test")
    assert failure == mx.Failure(True, 550, "5.4.4", failure.text)
    assert "noaddress.test" in failure.text


def test_null_mx_bounces_at_once(resolver):
    failure = resolve(resolver, "nullmx.test")
    assert failure == mx.Failure(
        True, 556, "5.1.10", "Domain nullmx.test does not accept mail (null MX)"
    )


def test_a_null_mx_among_real_ones_is_just_skipped(resolver):
    assert hosts(resolve(resolver, "mixednull.test")) == ["mx.mixednull.test"]


# --- errors ------------------------------------------------------------------------------


def test_nxdomain_is_permanent(resolver):
    failure = resolve(resolver, "nonexistent.test")
    assert (failure.permanent, failure.code, failure.status) == (True, 550, "5.1.2")
    assert "Host or domain name not found" in failure.text


def test_servfail_is_transient(resolver):
    failure = resolve(resolver, "servfail.test")
    assert (failure.permanent, failure.code, failure.status) == (False, 451, "4.4.3")
    assert failure.text.startswith("DNS lookup failed: servfail.test MX")
    assert "SERVFAIL" in failure.text


def test_timeout_is_transient(server):
    resolver = mx.make_resolver((server.host, server.port), timeout=1.0)
    started = time.monotonic()
    failure = resolve(resolver, "slow.test")
    assert time.monotonic() - started < 3
    assert failure == mx.Failure(False, 451, "4.4.3", "DNS lookup failed: slow.test MX: timed out")


def test_no_nameserver_listening_is_transient():
    # A UDP port nobody listens on answers "connection refused" at once.
    resolver = mx.make_resolver(("127.0.0.1", _closed_udp_port()), timeout=0.5)
    failure = resolve(resolver, "order.test")
    assert (failure.permanent, failure.status) == (False, "4.4.3")


def _closed_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_host_whose_lookup_fails_is_skipped(resolver):
    assert hosts(resolve(resolver, "partial.test")) == ["good.partial.test"]


def test_only_host_failing_temporarily_is_transient(resolver):
    failure = resolve(resolver, "mxfail.test")
    assert (failure.permanent, failure.code, failure.status) == (False, 451, "4.4.3")
    assert "broken.mxfail.test" in failure.text


def test_mx_host_that_does_not_exist_is_permanent(resolver):
    failure = resolve(resolver, "dangling.test")
    assert (failure.permanent, failure.code, failure.status) == (True, 550, "5.4.4")


def test_any_temporary_failure_among_unusable_hosts_makes_it_transient(resolver):
    failure = resolve(resolver, "dangling-broken.test")
    assert (failure.permanent, failure.status) == (False, "4.4.3")


def test_one_family_failing_leaves_the_other(resolver):
    route = resolve(resolver, "half.test")
    assert route.targets == (mx.Target("mx.half.test", 10, ("192.0.2.50",)),)


# --- address families --------------------------------------------------------------------


def test_ipv4_only_drops_aaaa_and_never_asks_for_it(server, resolver):
    before = len(server.queries)
    route = resolve(resolver, "order.test", families="ipv4")
    assert route.targets[0] == mx.Target("mx1.order.test", 10, ("192.0.2.1",))
    asked = [q for _, q in server.queries[before:]]
    assert "mx1.order.test. A" in asked
    assert not any(q.endswith(" AAAA") for q in asked)


def test_ipv4_only_with_an_ipv6_only_mx_defers(resolver):
    # Our own --outbound-ip restriction rules the host out: retry (it can be lifted), no bounce.
    failure = resolve(resolver, "v6only.test", families="ipv4")
    assert (failure.permanent, failure.code, failure.status) == (False, 451, "4.4.4")
    assert "IPv4" in failure.text


def test_ipv6_only(resolver):
    route = resolve(resolver, "order.test", families="ipv6")
    assert route.targets == (mx.Target("mx1.order.test", 10, ("2001:db8::1",)),)
    route = resolve(resolver, "implicit.test", families="ipv6")
    assert route.targets == (mx.Target("implicit.test", 0, ("2001:db8::20",)),)


def test_unknown_family_is_a_programming_error(resolver):
    with pytest.raises(ValueError):
        resolve(resolver, "order.test", families="ipv5")


# --- loops (RFC 5321 5.1) ----------------------------------------------------------------


def test_own_name_discards_itself_and_every_equal_or_worse_host(resolver):
    route = resolve(resolver, "loop.test", own_names=frozenset({"ME.Loop.Test."}))
    assert hosts(route) == ["better.loop.test"]  # peer (also 20) and worse (30) are gone


def test_own_address_discards_itself_and_every_equal_or_worse_host(resolver):
    route = resolve(resolver, "loop.test", own_addresses=frozenset({"192.0.2.62"}))
    assert hosts(route) == ["better.loop.test"]


def test_ipv4_mapped_own_address_is_recognised(resolver):
    route = resolve(resolver, "loop.test", own_addresses=frozenset({"::ffff:192.0.2.62"}))
    assert hosts(route) == ["better.loop.test"]


def test_being_the_best_mx_is_a_loop(resolver):
    for own in ({"own_names": frozenset({"me.selfbest.test"})},
                {"own_addresses": frozenset({"192.0.2.71"})}):  # fmt: skip
        failure = resolve(resolver, "selfbest.test", **own)
        assert failure == mx.Failure(
            True, 554, "5.4.6", "mail for selfbest.test loops back to myself"
        )


def test_implicit_mx_to_ourselves_is_a_loop(resolver):
    failure = resolve(resolver, "implicit.test", own_addresses=frozenset({"2001:db8::20"}))
    assert (failure.code, failure.status) == (554, "5.4.6")
    failure = resolve(resolver, "implicit.test", own_names=frozenset({"implicit.test"}))
    assert (failure.code, failure.status) == (554, "5.4.6")


def test_unrelated_own_identity_changes_nothing(resolver):
    route = resolve(
        resolver,
        "order.test",
        own_names=frozenset({"mail.example.org"}),
        own_addresses=frozenset({"203.0.113.1"}),
    )
    assert len(route.targets) == 3


@pytest.mark.parametrize("own", [frozenset(), frozenset({"192.0.2.99"})])
def test_an_address_of_this_machine_is_a_loop_whoever_we_are(resolver, own):
    """0.0.0.0, ::, ::ffff:0.0.0.0 and all of 127/8 reach the local host (Linux connects to the
    unspecified address as to itself): an MX there loops back to us, through our own loopback
    listener, which relays anywhere (an attacker's pass: 750 hops in 15 s)."""
    failure = resolve(resolver, "thismachine.test", own_addresses=own)
    assert failure == mx.Failure(
        True, 554, "5.4.6", "mail for thismachine.test loops back to myself"
    )
    for literal in ("[0.0.0.0]", "[IPv6:::]", "[127.0.0.2]", "[IPv6:::ffff:127.0.0.1]"):
        failure = run(mx.resolve(literal, NoDNS(), own_addresses=own))
        assert (failure.code, failure.status) == (554, "5.4.6"), literal


def test_a_smarthost_is_its_own_addresses_wherever_they_are(resolver):
    """resolve_host (--relayhost HOST): the host's A/AAAA, never its MX records, and no loop
    check: a smarthost may be on this machine (a filter on another port)."""
    route = run(mx.resolve_host("lo2.thismachine.test", resolver))
    assert route == mx.Route((mx.Target("lo2.thismachine.test", 0, ("127.0.0.2",)),), implicit=True)
    route = run(mx.resolve_host("order.test", resolver))  # MX records, and no address of its own
    assert isinstance(route, mx.Failure)
    for literal, address in (("[127.0.0.1]", "127.0.0.1"), ("[IPv6:::1]", "::1")):
        route = run(mx.resolve_host(literal, NoDNS()))
        assert [t.addresses for t in route.targets] == [(address,)]


def test_a_smarthost_that_cannot_be_found_is_waited_for_not_bounced(resolver):
    """Every failure is the configuration's: mail waits for it to be mended."""
    for host in ("nosuch.test", "order.test", "noaddress.test", "[300.1.1.1]"):
        failure = run(mx.resolve_host(host, resolver))
        assert isinstance(failure, mx.Failure) and not failure.permanent, (host, failure)
        assert failure.code == 451 and failure.text.startswith(f"relayhost {host}: "), failure


def test_addresses_no_one_is_reached_at_are_left_out(resolver):
    route = resolve(resolver, "unreachable.test")
    assert [(t.host, t.addresses) for t in route.targets] == [
        ("mx.unreachable.test", ("192.0.2.110",))
    ]
    for literal in ("[224.0.0.1]", "[255.255.255.255]", "[IPv6:ff02::1]"):
        failure = run(mx.resolve(literal, NoDNS()))
        assert (failure.permanent, failure.status) == (True, "5.1.2"), literal


# --- literals and names ------------------------------------------------------------------


class NoDNS:
    """A resolver that fails the test if asked anything."""

    async def resolve(self, *args, **kwargs):
        raise AssertionError("a domain literal needs no DNS")


def test_ipv4_literal():
    route = run(mx.resolve("[192.0.2.7]", NoDNS()))
    assert route == mx.Route((mx.Target("[192.0.2.7]", 0, ("192.0.2.7",)),), implicit=True)


def test_ipv6_literal():
    route = run(mx.resolve("[IPv6:2001:DB8:0::7]", NoDNS()))
    assert route.targets == (mx.Target("[IPv6:2001:DB8:0::7]", 0, ("2001:db8::7",)),)


def test_literal_of_a_disabled_family_is_permanent():
    failure = run(mx.resolve("[IPv6:2001:db8::7]", NoDNS(), families="ipv4"))
    assert (failure.permanent, failure.code, failure.status) == (True, 550, "5.4.4")
    failure = run(mx.resolve("[192.0.2.7]", NoDNS(), families="ipv6"))
    assert (failure.permanent, failure.status) == (True, "5.4.4")


def test_literal_of_our_own_address_is_a_loop():
    failure = run(mx.resolve("[192.0.2.7]", NoDNS(), own_addresses=frozenset({"192.0.2.7"})))
    assert (failure.code, failure.status) == (554, "5.4.6")


@pytest.mark.parametrize(
    "literal", ["[300.1.1.1]", "[::1]", "[IPv6:zz::1]", "[192.0.2.1", "[]", "[IPv6:192.0.2.1]"]
)
def test_malformed_literal_is_permanent(literal):
    failure = run(mx.resolve(literal, NoDNS()))
    assert (failure.permanent, failure.code, failure.status) == (True, 553, "5.1.2")


def test_non_ascii_domain_is_looked_up_as_idna(resolver):
    route = resolve(resolver, "Bücher.test")
    assert route.targets == (mx.Target("mx.xn--bcher-kva.test", 10, ("192.0.2.100",)),)


def test_a_domain_with_eszett_is_looked_up_by_idna_2008(resolver):
    """dnspython converts by IDNA 2003, which makes faß.test fass.test, another domain: its
    mail exchangers got faß.test's mail."""
    route = resolve(resolver, "faß.test")
    assert route.targets == (mx.Target("mx.xn--fa-hia.test", 10, ("192.0.2.101",)),)


@pytest.mark.parametrize("domain", ["a..b.test", "x" * 64 + ".test", "", ".test", "sp ace.test"])
def test_unusable_name_is_permanent_without_a_lookup(domain):
    failure = run(mx.resolve(domain, NoDNS()))
    assert (failure.permanent, failure.code, failure.status) == (True, 553, "5.1.2")


# --- the test server as a program (as the end-to-end tests run it) -------------------------


def test_dnsserver_command_line(tmp_path):
    zone = tmp_path / "zone"
    zone.write_text("$ORIGIN cli.test.\n@ MX 10 mx\nmx A 192.0.2.123\n")
    command = [sys.executable, dnsserver.__file__, "--listen", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--zone", str(zone)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "dnsserver did not report that it listens"
        line = proc.stdout.readline()
        match = re.fullmatch(r"dnsserver: listening on 127\.0\.0\.1 port (\d+)\n", line)
        assert match, line
        resolver = mx.make_resolver(("127.0.0.1", int(match[1])), timeout=2.0)
        route = run(mx.resolve("cli.test", resolver))
        assert route.targets == (mx.Target("mx.cli.test", 10, ("192.0.2.123",)),)
        assert (run(mx.resolve("other.test", resolver))).status == "5.1.2"  # NXDOMAIN
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_dnsserver_refuses_a_bad_zone(tmp_path):
    zone = tmp_path / "zone"
    zone.write_text('$ORIGIN bad.test.\n@ TXT "dnsserver:explode"\n')
    command = [sys.executable, dnsserver.__file__, "--listen", "127.0.0.1", "--zone", str(zone)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "unknown dnsserver marker" in done.stderr

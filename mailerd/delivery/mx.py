"""Where to deliver a remote domain's mail: the hosts and addresses to try, or why not.

`resolve()` turns a recipient domain into a `Route` (the mail exchangers to try, best first,
each with its addresses) or a `Failure` that says whether to bounce now or retry later. It
follows RFC 5321 5.1: MX records in preference order with equal preferences in random order,
the implicit MX (the domain's own addresses) when there is no MX record, NXDOMAIN as an error
and temporary DNS errors as "retry"; and it discards our own host and every less preferred one
so that mail never loops back to us: our own addresses and every address that means "this
machine" (127/8, ::1, 0.0.0.0/8, ::, IPv4-mapped or not: Linux connects to 0.0.0.0 as to the
local host, and an attacker's pass made mail loop through our own listener 750 times in 15 s
with an MX at 0.0.0.0). Addresses no one can be reached at (multicast, link-local without its
interface, 240/4 and the broadcast address) are left out. RFC 7505 null MX bounces at once.
Domain literals (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) need no DNS. Status codes follow RFC 3463.

All DNS goes through the dnspython asyncio resolver passed in (see `mailerd.resolver`); the
lookups for the hosts of one domain run concurrently, so one slow nameserver costs one timeout,
not one per host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from mailerd.idn import a_labels
from mailerd.names import IPAddress, parse_literal, unmapped
from mailerd.resolver import SystemResolverForbidden, make_resolver

__all__ = ["Failure", "Route", "SystemResolverForbidden", "Target", "make_resolver", "resolve"]

# Which address records to ask for, in the order to try them within one host.
FAMILIES: dict[str, tuple[str, ...]] = {
    "both": ("AAAA", "A"),
    "ipv4": ("A",),
    "ipv6": ("AAAA",),
}
_IP_VERSION = {"A": 4, "AAAA": 6}
# However many MX records a domain publishes, only this many (the best) are looked at.
MAX_MX_CONSIDERED = 32
# What a host name may look like once IDNA-encoded (letters, digits, hyphens; underscores are
# tolerated, as resolvers do).
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True)
class Target:
    host: str  # MX host name (or the domain itself for an implicit MX, or the literal)
    preference: int
    addresses: tuple[str, ...]  # IPs to try for this host, in order


@dataclass(frozen=True)
class Route:
    targets: tuple[Target, ...]  # in the order to try
    implicit: bool  # no MX record: the domain's own AAAA/A (RFC 5321 5.1), or a literal


@dataclass(frozen=True)
class Failure:
    permanent: bool  # True: bounce now; False: defer and retry
    code: int  # SMTP-style code for logs/DSN, e.g. 556
    status: str  # enhanced status, e.g. "5.1.10"
    text: str  # human text


async def resolve(
    domain: str,
    resolver: dns.asyncresolver.Resolver,
    *,
    families: str = "both",
    own_names: frozenset[str] = frozenset(),
    own_addresses: frozenset[str] = frozenset(),
    rng: random.Random | None = None,
    max_hosts: int = 5,
) -> Route | Failure:
    """Where to deliver mail for `domain` (the part after the last @), or why not.

    `families` is "both", "ipv4" or "ipv6"; `own_names` and `own_addresses` are the names and
    addresses this server is known by (loop detection; a smarthost has none: resolve_host);
    `rng` orders equal preferences.
    """
    if families not in FAMILIES:
        raise ValueError(f"families must be one of {', '.join(FAMILIES)}, not {families!r}")
    own = _Self.make(own_names, own_addresses)
    if domain.startswith("["):
        return _literal_route(domain, families, own)
    try:
        name = _domain_name(domain)
    except ValueError as e:
        return Failure(True, 553, "5.1.2", f"Bad destination domain {domain}: {e}")
    try:
        answer = await resolver.resolve(name, "MX")
    except dns.resolver.NoAnswer:
        return await _implicit_route(name, resolver, families, own)
    except dns.resolver.NXDOMAIN:
        return Failure(True, 550, "5.1.2", f"Host or domain name not found: {_text(name)}")
    except dns.exception.DNSException as e:
        return _dns_failure(name, "MX", e)
    records = [(rdata.preference, rdata.exchange) for rdata in answer]
    if all(exchange == dns.name.root for _, exchange in records):
        # RFC 7505: "MX 0 ." says the domain accepts no mail at all. (A lone "." with another
        # preference is not strictly a null MX but means the same, and nothing else is usable.)
        return Failure(True, 556, "5.1.10", f"Domain {_text(name)} does not accept mail (null MX)")
    hosts = _order(records, rng or random.Random())
    return await _mx_route(name, hosts, resolver, families, own, max_hosts)


async def resolve_host(
    host: str, resolver: dns.asyncresolver.Resolver, *, families: str = "both"
) -> Route | Failure:
    """Where a smarthost (--relayhost HOST, or a literal) is: the host's own addresses, never
    its domain's MX records (HOST names a host; Postfix asks for MX records unless the name is
    in brackets, which surprised those who gave the provider's domain and sent their
    credentials to its MX), and no loop check (it may well be on this machine). Every failure
    is temporary: it is the configuration's, and the mail waits for it to be mended (until the
    queue lifetime) instead of all outbound mail bouncing for a typing mistake."""
    route = await _host_route(host, resolver, families)
    if isinstance(route, Failure) and route.permanent:
        return Failure(False, 451, "4.4.3", f"relayhost {host}: {route.text}")
    return route


async def _host_route(
    host: str, resolver: dns.asyncresolver.Resolver, families: str
) -> Route | Failure:
    if host.startswith("["):
        return _literal_route(host, families, _NOBODY)
    try:
        name = _domain_name(host)
    except ValueError as e:
        return Failure(True, 553, "5.1.2", f"Bad host name {host}: {e}")
    return await _implicit_route(name, resolver, families, _NOBODY, f"for {_text(name)}")


# --- names and literals -------------------------------------------------------------------


def _domain_name(domain: str) -> dns.name.Name:
    """The absolute DNS name for a mail domain, IDNA-encoded; ValueError if there is none."""
    text = domain.strip()
    if text in ("", ".") or text.startswith("."):
        raise ValueError("empty or malformed name")
    if not text.isascii():  # (in A-labels by IDNA 2008: dnspython's own is IDNA 2003, which
        # would look up faß.example's mail exchangers at fass.example, another domain)
        converted = a_labels(text.rstrip("."))
        if converted is None:
            raise ValueError("cannot be encoded as IDNA")
        text = converted
    try:
        # An absolute name: the resolver's search list must never be applied to mail domains.
        name = dns.name.from_text(text, origin=dns.name.root)
    except dns.exception.DNSException as e:
        raise ValueError(_exception_text(e)) from None
    except UnicodeError:
        raise ValueError("cannot be encoded as IDNA") from None
    if not _HOSTNAME.fullmatch(_text(name)):
        raise ValueError("not a valid host name")
    return name


def _text(name: dns.name.Name) -> str:
    """A name as we show and compare it: ASCII (A-labels), lower case, no final dot."""
    return name.to_text(omit_final_dot=True).lower()


def _literal_route(domain: str, families: str, own: _Self) -> Route | Failure:
    try:
        address = parse_literal(domain)
    except ValueError:
        return Failure(True, 553, "5.1.2", f"Bad destination address literal {domain}")
    if address.version not in {_IP_VERSION[t] for t in FAMILIES[families]}:
        return Failure(True, 550, "5.4.4", f"{domain}: IPv{address.version} delivery is turned off")
    if own.has_address(address):
        return _loop_failure(domain)
    if not _reachable(address):
        return Failure(True, 553, "5.1.2", f"Bad destination address literal {domain}")
    return Route((Target(domain, 0, (str(address),)),), implicit=True)


# --- ourselves -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Self:
    """The names and addresses this server answers to, normalised for comparison (with
    `this_machine`, also every address that means the local host)."""

    names: frozenset[str]
    addresses: frozenset[IPAddress]
    this_machine: bool = True

    @classmethod
    def make(cls, names: frozenset[str], addresses: frozenset[str]) -> _Self:
        normal_names = set()
        for n in names:
            try:
                normal_names.add(_text(_domain_name(n)))
            except ValueError:
                normal_names.add(n.lower().rstrip("."))  # cannot match a DNS name anyway
        return cls(frozenset(normal_names), frozenset(unmapped(a) for a in addresses))

    def has_name(self, name: dns.name.Name) -> bool:
        return _text(name) in self.names

    def has_address(self, address: IPAddress | str) -> bool:
        ip = unmapped(address)
        return ip in self.addresses or (self.this_machine and _this_machine(ip))


_NOBODY = _Self(frozenset(), frozenset(), this_machine=False)  # no loop check at all (a smarthost)


def _this_machine(ip: IPAddress) -> bool:
    """An address that reaches this machine whoever we are: loopback or "this network"."""
    return ip.is_loopback or ip.is_unspecified or (ip.version == 4 and ip.packed[0] == 0)


def _reachable(ip: IPAddress) -> bool:
    """An address a connection can be made to: not multicast, not link-local (it needs an
    interface that a DNS answer cannot give), not IPv4's reserved 240/4 (the broadcast
    address is in it)."""
    ip = unmapped(ip)
    return not (ip.is_multicast or ip.is_link_local or (ip.version == 4 and ip.is_reserved))


def _loop_failure(domain: str) -> Failure:
    return Failure(True, 554, "5.4.6", f"mail for {domain} loops back to myself")


# --- MX ------------------------------------------------------------------------------------


def _order(
    records: list[tuple[int, dns.name.Name]], rng: random.Random
) -> list[tuple[int, dns.name.Name]]:
    """MX hosts by preference, equal preferences shuffled (RFC 5321 5.1 spreads the load).

    A host listed twice keeps its best preference; "." (no host) is dropped; only the first
    MAX_MX_CONSIDERED hosts are kept.
    """
    best: dict[dns.name.Name, int] = {}
    for preference, exchange in records:
        if exchange != dns.name.root:
            best[exchange] = min(preference, best.get(exchange, preference))
    ordered: list[tuple[int, dns.name.Name]] = []
    for preference in sorted(set(best.values())):
        # Sorted first so that the result depends only on rng, not on the answer's order.
        group = sorted(h for h, p in best.items() if p == preference)
        rng.shuffle(group)
        ordered.extend((preference, h) for h in group)
    return ordered[:MAX_MX_CONSIDERED]


async def _mx_route(
    domain: dns.name.Name,
    hosts: list[tuple[int, dns.name.Name]],
    resolver: dns.asyncresolver.Resolver,
    families: str,
    own: _Self,
    max_hosts: int,
) -> Route | Failure:
    # RFC 5321 5.1: if we are one of the MX hosts, only strictly better ones may be used.
    cutoff = _cutoff(p for p, h in hosts if own.has_name(h))
    hosts = [(p, h) for p, h in hosts if cutoff is None or p < cutoff]
    lookups = await asyncio.gather(*(_addresses(h, resolver, families) for _, h in hosts))
    pairs = list(zip(hosts, lookups, strict=True))
    by_address = _cutoff(p for (p, _), look in pairs if any(map(own.has_address, look.addresses)))
    if by_address is not None:
        cutoff = by_address if cutoff is None else min(cutoff, by_address)
    kept = [(p, h, look) for (p, h), look in pairs if cutoff is None or p < cutoff]
    if cutoff is not None and not kept:
        return _loop_failure(_text(domain))
    targets = tuple(Target(_text(h), p, look.addresses) for p, h, look in kept if look.addresses)
    if targets:
        return Route(targets[:max_hosts], implicit=False)
    lookups = [look for _, _, look in kept]
    return _no_address_failure(lookups, families, f"for the MX hosts of {_text(domain)}")


def _cutoff(preferences: Iterable[int]) -> int | None:
    """The best preference at which we appear: it and everything after it are discarded."""
    return min(preferences, default=None)


async def _implicit_route(
    domain: dns.name.Name,
    resolver: dns.asyncresolver.Resolver,
    families: str,
    own: _Self,
    where: str = "",
) -> Route | Failure:
    """No MX record: the domain's own addresses act as an MX of preference 0 (RFC 5321 5.1).
    (A smarthost's too: resolve_host, whose failure says `where` instead.)"""
    look = await _addresses(domain, resolver, families)
    if own.has_name(domain) or any(map(own.has_address, look.addresses)):
        return _loop_failure(_text(domain))
    if look.addresses:
        return Route((Target(_text(domain), 0, look.addresses),), implicit=True)
    where = where or f"and no MX record for {_text(domain)}"
    return _no_address_failure([look], families, where)


def _no_address_failure(lookups: list[_Lookup], families: str, where: str) -> Failure:
    # Any temporary error might be hiding the address we need: retry rather than bounce.
    errors = [look.error for look in lookups if look.error]
    if errors:
        return Failure(False, 451, "4.4.3", errors[0])
    kind = {"both": "IPv6 or IPv4", "ipv4": "IPv4", "ipv6": "IPv6"}[families]
    if families != "both":
        # Our own restriction (--outbound-ip) is what rules the hosts out: the administrator
        # can lift it, so wait rather than bounce (until the queue lifetime runs out).
        return Failure(False, 451, "4.4.4", f"No {kind} address {where} (outbound-ip {families})")
    # RFC 3463 X.4.4 "unable to route": the DNS has no usable next hop for the domain.
    return Failure(True, 550, "5.4.4", f"No {kind} address {where}")


# --- address lookups -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Lookup:
    addresses: tuple[str, ...]
    error: str | None  # a temporary failure, as text; None if the answers were definite


async def _addresses(
    host: dns.name.Name, resolver: dns.asyncresolver.Resolver, families: str
) -> _Lookup:
    """The host's addresses, IPv6 first, both families asked at once."""
    rdtypes = FAMILIES[families]
    results = await asyncio.gather(*(_address_records(host, t, resolver) for t in rdtypes))
    addresses: list[str] = []
    errors = []
    for found, error in results:
        for address in found:
            if address not in addresses:
                addresses.append(address)
        if error:
            errors.append(error)
    return _Lookup(tuple(addresses), errors[0] if errors else None)


async def _address_records(
    host: dns.name.Name, rdtype: str, resolver: dns.asyncresolver.Resolver
) -> tuple[list[str], str | None]:
    try:
        answer = await resolver.resolve(host, rdtype)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return [], None  # a definite "none": this host is simply unusable
    except dns.exception.DNSException as e:
        return [], _dns_failure(host, rdtype, e).text
    found = (ipaddress.ip_address(rdata.address) for rdata in answer)
    return [str(ip) for ip in found if _reachable(ip)], None


def _dns_failure(name: dns.name.Name, rdtype: str, error: dns.exception.DNSException) -> Failure:
    """A temporary failure (RFC 5321 5.1: queue and retry) for a lookup that did not finish."""
    return Failure(
        False, 451, "4.4.3", f"DNS lookup failed: {_text(name)} {rdtype}: {_exception_text(error)}"
    )


def _exception_text(error: dns.exception.DNSException) -> str:
    if isinstance(error, dns.exception.Timeout):
        return "timed out"
    if isinstance(error, dns.resolver.NoNameservers):
        # Its errors are (server, tcp, port, exception or rcode text, response) tuples.
        reasons = [str(e[3]) for e in error.kwargs.get("errors") or []]
        return f"no nameserver answered ({'; '.join(dict.fromkeys(reasons)) or 'none configured'})"
    return str(error) or type(error).__name__

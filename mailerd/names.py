"""Local names, the rules everyone applies alike: which domains are ours (and which address
literals), and which mailbox a local part names (or none, when it could escape the spool). Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOCALHOST = "localhost"  # always a local domain (config), and one only this machine knows

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Locality:
    """What mail is delivered here: mail to one of `domains` (or under one), and mail to an
    address literal of this machine's (`addresses`: see `is_own_literal`). One value, so that
    every part that asks "is this ours?" asks it of the same two things: the daemon's is
    `Config.locality`, its addresses as the master read them."""

    domains: tuple[str, ...]
    addresses: frozenset[str] = frozenset()  # (the loopback's literals are ours without them)

    def is_local(self, domain: str) -> bool:
        """Whether mail to `domain` is delivered here."""
        return is_local_domain(domain, self.domains) or is_own_literal(domain, self.addresses)


def is_local_domain(domain: str, local_domains: tuple[str, ...]) -> bool:
    """A domain is local if it equals, or ends in '.' + , one of the configured suffixes."""
    return local_domain_of(domain, local_domains) is not None


def local_domain_of(domain: str, local_domains: tuple[str, ...]) -> str | None:
    """The configured local domain that `domain` is, or is under (the longest, when it is
    under several: lists.example.org itself, with example.org configured too); None for a
    remote one."""
    domain = domain.lower().rstrip(".")
    found = [d for d in local_domains if domain == d or domain.endswith("." + d)]
    return max(found, key=len) if found else None


def is_own_literal(domain: str, own_addresses: frozenset[str]) -> bool:
    """Whether `domain` is an address literal (RFC 5321 4.1.3) of this machine: one of
    `own_addresses` (`host.own_addresses`, as `str(ipaddress.ip_address(...))`) or a loopback
    address. Mail to user@[192.0.2.1] is then as local as mail to user@ a local domain, as
    Postfix treats a literal of $inet_interfaces or $proxy_interfaces: RFC 1123 5.2.17 asks a
    server to accept it, and postmaster@[address] is how to reach us when our DNS is broken
    (relayed instead, it looped back to us and bounced)."""
    try:
        ip = unmapped(parse_literal(domain))
    except ValueError:
        return False
    return ip.is_loopback or str(ip) in own_addresses


def unmapped(address: IPAddress | str) -> IPAddress:
    """An address with IPv4-mapped IPv6 (::ffff:192.0.2.1) turned into plain IPv4."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_literal(domain: str) -> IPAddress:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3); ValueError otherwise."""
    if not (domain.startswith("[") and domain.endswith("]")):
        raise ValueError(domain)
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        return ipaddress.IPv6Address(inner[5:])
    return ipaddress.IPv4Address(inner)


def mailbox_name(local_part: str) -> str | None:
    """The spool directory name for a local part, or None when it could escape the spool.

    Lower-cased; a `+tag` suffix is dropped (user+tag delivers to user).
    """
    name = local_part.lower().split("+", 1)[0]
    if not name or name.startswith(".") or "/" in name:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return None
    return name

"""This machine, as mailerd needs to know it: its names (the mail name in /etc/mailname, the
FQDN) and its addresses (the loopback's, and every address of an interface, from psutil: the
secondary IPv4 addresses too, which the old SIOCGIFADDR ioctl could not see). Used for the
defaults of -d, -H, -l and -n, and for the addresses that are us (`own_addresses`): mail to
their literals is local, and a relay to any of them would loop.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable
from typing import Any

from mailerd.names import unmapped

MAILNAME = "/etc/mailname"  # Debian's "mail name" of the machine
HOSTS = "/etc/hosts"
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def identity() -> tuple[list[str], str]:
    """The local domains and the host name when -d and -H are not given, as Debian's MTAs do:
    the mail name (/etc/mailname), then the FQDN, then localhost; the host name is the FQDN,
    or the mail name when the FQDN is not qualified (no dot)."""
    mailname = read_mailname()
    fqdn = local_fqdn()
    domains = [name for name in (mailname, fqdn, "localhost") if name and is_domain(name)]
    hostname = fqdn if "." in fqdn or not mailname else mailname
    return list(dict.fromkeys(d.lower().rstrip(".") for d in domains)), hostname


def local_fqdn() -> str:
    """This machine's fully qualified name, found without asking DNS: the kernel's host name
    when it has a dot, else the first dotted name (not localhost's) on the line of /etc/hosts
    that lists it, as Debian's installer writes it (`127.0.1.1 mx.example.org mx`), else the
    host name as it is. Python's socket.getfqdn goes on to the resolver, which a start-up must
    not wait on, and which no mailerd of the test suite may ask (MAILERD_FORBID_SYSTEM_RESOLVER)."""
    name = socket.gethostname().lower().rstrip(".")
    if "." in name:
        return name
    try:
        with open(HOSTS, encoding="utf-8", errors="replace") as f:
            for line in f:
                names = [n.lower().rstrip(".") for n in line.partition("#")[0].split()[1:]]
                if name in names:
                    dotted = [n for n in names if "." in n and not _is_localhost(n)]
                    if dotted:
                        return dotted[0]
    except OSError:
        pass
    return name


def _is_localhost(name: str) -> bool:
    return name == "localhost" or name.startswith("localhost.") or name.endswith(".localhost")


def read_mailname(path: str | None = None) -> str | None:
    """The first line of /etc/mailname, if it names a domain."""
    try:
        with open(path or MAILNAME, encoding="utf-8") as f:
            name = f.readline().strip().lower().rstrip(".")
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and is_domain(name) else None


def is_domain(name: str) -> bool:
    return all(_LABEL.match(label) for label in name.lower().rstrip(".").split("."))


def is_loopback(address: str) -> bool:
    """Is `address` one of this machine's loopback addresses (127/8, ::1)?"""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# The ranges a NAT hides a machine behind (RFC 1918, the carrier-grade NAT's RFC 6598, IPv6
# unique local addresses): the world reaches such a machine at another address.
NAT_RANGES = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                      "100.64.0.0/10", "fc00::/7")
)  # fmt: skip


def behind_nat(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(ip in net for net in NAT_RANGES if net.version == ip.version)


def mapped_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one is in IPv6 form (`::ffff:192.0.2.25`), which mailerd's
    IPv6 sockets (IPv6 only) cannot bind; None for any other."""
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None


def reachable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Could another machine reach this address at all (not loopback, link-local, a wildcard
    or multicast)? Private ones count: another machine of the same network reaches them."""
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def loopback_addresses() -> list[str]:
    addresses = ["127.0.0.1"]
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
        addresses.append("::1")
    return addresses


def default_interface() -> str | None:
    """The interface of the IPv4 default route (/proc/net/route), else of the IPv6 one."""
    for fields in _table("/proc/net/route")[1:]:
        if len(fields) > 2 and fields[1] == "00000000":  # destination 0.0.0.0
            return fields[0]
    for fields in _table("/proc/net/ipv6_route"):
        # destination, its prefix length, ..., the interface last: ::/0, not the loopback
        if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
            return fields[9]
    return None


def _table(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.split() for line in f]
    except OSError:
        return []


def machine_addresses() -> list[str]:
    """Every IPv4 and global IPv6 address of every interface: all of them reach us. Read at
    once: each reading lists every interface, and a reading for each one made the master's
    start (it reads them before it listens: `config.load_files`) grow with the square of the
    number of interfaces (an attacker's pass)."""
    import psutil

    return [a for entries in psutil.net_if_addrs().values() for a in _usable(entries)]


def own_addresses(listening: Iterable[str], public: Iterable[str] = ()) -> frozenset[str]:
    """This machine's addresses as mail sees them (`str(ipaddress.ip_address(...))`, IPv4 as
    IPv4): mail to their literals (user@[192.0.2.1]) is local (`names.is_own_literal`), and a
    relay to any of them would loop. Those we listen on, the loopback's, the public ones a 1:1
    NAT forwards to us (--public-address, Postfix's $proxy_interfaces), the default route's
    interface's, and, when a listener is on a wildcard address (which takes connections to any
    of them), every interface's (a sixth attacker's pass looped mail 50 times through a
    listener on 0.0.0.0 with an MX at another interface's address). Where the interfaces cannot
    be read (netlink refused: a sandbox), the named ones only: the way out that a default
    listener's error names (give the addresses) must not fail here in turn."""
    named = [ipaddress.ip_address(a) for a in (*listening, *public, *loopback_addresses())]
    found = [str(ip) for ip in named if not ip.is_unspecified]
    try:
        if any(ip.is_unspecified for ip in named):
            found += machine_addresses()
        elif iface := default_interface():
            found += interface_addresses(iface)
    except OSError:
        pass
    return frozenset(str(unmapped(a)) for a in found)


def interface_addresses(iface: str) -> list[str]:
    """Every IPv4 and global IPv6 address of an interface (link-local ones need a scope, and
    nothing listens on them; an IPv4 address in IPv6 form, which Linux lets an interface have,
    no IPv6-only socket can bind), in the order the kernel lists them."""
    import psutil  # (here: sendmail imports this module and must need nothing beyond the stdlib)

    return _usable(psutil.net_if_addrs().get(iface, []) if iface else [])


def _usable(entries: Iterable[Any]) -> list[str]:
    """The addresses of `interface_addresses` among one interface's psutil entries."""
    found = []
    for entry in entries:
        if entry.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(entry.address.split("%", 1)[0])
        if address.is_link_local or mapped_ipv4(address) is not None:
            continue
        found.append(str(address))
    return found


def unusable_hostname(name: str) -> str:
    """Why the world cannot look `name` up (the default host name is this machine's FQDN,
    often `localhost` or a name without a dot), or "". Other servers see the host name in
    our banner, EHLO and Received: lines, and the MX and PTR records name it."""
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return "to every machine, localhost is itself"
    if "." not in name:
        return "it has no dot"
    from mailerd.inbound import dmarc  # (the Public Suffix List: read only when asked)

    suffix = dmarc.listed_suffix(name)
    if suffix is None:
        return f"the Public Suffix List knows no .{name.rpartition('.')[2]}"
    if suffix == name:
        return "it is a public suffix"
    return ""

"""host: the addresses of an interface are all of them, secondary IPv4 ones included (the
ioctl that mailerd used before saw only an interface's first IPv4 address), from inside a
namespace whose veth carries several."""

from __future__ import annotations

import ipaddress
import json

from .conftest import NS_V4, NS_V4_EXTRA, NS_V6, PYTHON, Netns

INTERFACE_ADDRESSES = (
    "import json; from mailerd import host; "
    "iface = host.default_interface() or {veth!r}; "
    "print(json.dumps([iface, host.interface_addresses(iface)]))"
)


def test_interface_addresses_are_all_of_them(netns: Netns):
    run = netns.run([PYTHON, "-c", INTERFACE_ADDRESSES.format(veth=netns.veth_ns)])
    assert run.returncode == 0, run.stderr
    iface, found = json.loads(run.stdout)
    assert iface == netns.veth_ns
    assert found[: 1 + len(NS_V4_EXTRA)] == [NS_V4, *NS_V4_EXTRA]
    assert set(NS_V6) <= set(found)
    assert not [a for a in found if a.lower().startswith("fe80")]  # no link-local ones


def test_an_ipv4_address_in_ipv6_form_is_no_interface_address(netns: Netns):
    """Linux lets an interface have ::ffff:198.51.100.77; the default listener made of it failed
    at its bind (EINVAL: mailerd's IPv6 sockets take IPv6 only), and `mailerd dns` published it
    as an AAAA (an attacker's pass)."""
    mapped = "::ffff:198.51.100.77"
    add = netns.run(["ip", "-6", "addr", "add", f"{mapped}/128", "dev", netns.veth_ns])
    assert add.returncode == 0, add.stderr
    try:
        run = netns.run([PYTHON, "-c", INTERFACE_ADDRESSES.format(veth=netns.veth_ns)])
        assert run.returncode == 0, run.stderr
        _, found = json.loads(run.stdout)
        addresses = {ipaddress.ip_address(a) for a in found}
        assert ipaddress.ip_address(NS_V4) in addresses, found
        assert ipaddress.ip_address(mapped) not in addresses, found
    finally:
        netns.run(["ip", "-6", "addr", "del", f"{mapped}/128", "dev", netns.veth_ns])

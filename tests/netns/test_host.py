"""host: the addresses of an interface are all of them, secondary IPv4 ones included (the
ioctl that mailerd used before saw only an interface's first IPv4 address), from inside a
namespace whose veth carries several."""

from __future__ import annotations

import json

from .conftest import NS_V4, NS_V4_EXTRA, NS_V6, PYTHON, Netns


def test_interface_addresses_are_all_of_them(netns: Netns):
    code = (
        "import json; from mailerd import host; "
        f"iface = host.default_interface() or {netns.veth_ns!r}; "
        "print(json.dumps([iface, host.interface_addresses(iface)]))"
    )
    run = netns.run([PYTHON, "-c", code])
    assert run.returncode == 0, run.stderr
    iface, found = json.loads(run.stdout)
    assert iface == netns.veth_ns
    assert found[: 1 + len(NS_V4_EXTRA)] == [NS_V4, *NS_V4_EXTRA]
    assert set(NS_V6) <= set(found)
    assert not [a for a in found if a.lower().startswith("fe80")]  # no link-local ones

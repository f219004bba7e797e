"""host: the addresses of an interface are all of them, secondary IPv4 ones included (the
ioctl that mailerd used before saw only an interface's first IPv4 address), from inside a
namespace whose veth carries several."""

from __future__ import annotations

import ipaddress
import json
import smtplib

from harness import wait_until

from .conftest import (
    CLIENT_HELO,
    HOST_V4,
    IO_TIMEOUT,
    NS_V4,
    NS_V4_EXTRA,
    NS_V6,
    PYTHON,
    Mailerd,
    Netns,
    send_inbound,
)

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


def test_a_tentative_ipv6_address_is_listened_on(netns: Netns, tmp_path):
    """At boot an interface's IPv6 address stays "tentative" until duplicate address detection
    is done (a second or more), and a bind to it fails (EADDRNOTAVAIL): mailerd, started then
    on its default listeners, exited 1, and the unit does not retry a start. It listens all the
    same (IPV6_FREEBIND, for an address the machine has), and serves once the address is
    usable; an address the machine does not have is still refused."""
    veth, address = netns.veth_ns, "2001:db8::7"
    sysctls = {f"net.ipv6.conf.{veth}.dad_transmits": "6",
               f"net.ipv6.neigh.{veth}.retrans_time_ms": "1000"}  # fmt: skip
    before = {k: netns.run(["sysctl", "-n", k]).stdout.strip() for k in sysctls}
    for key, value in sysctls.items():
        assert netns.run(["sysctl", "-qw", f"{key}={value}"]).returncode == 0
    m = Mailerd(netns, tmp_path, port=free_port_in(netns), untrusted=f"[{address}]:25",
                extra=["--dns-server", "127.0.0.1:9"])  # fmt: skip
    try:
        add = netns.run(["ip", "-6", "addr", "add", f"{address}/64", "dev", veth])
        assert add.returncode == 0, add.stderr
        m.start()
        shown = netns.run(["ip", "-6", "addr", "show", "dev", veth]).stdout
        assert f"{address}/64 scope global tentative" in shown, "no longer tentative: too late"

        def usable() -> bool:
            return "tentative" not in netns.run(["ip", "-6", "addr", "show", "to", address]).stdout

        assert wait_until(usable, 15, 0.2), "duplicate address detection never ended"
        banner = netns.run([PYTHON, "-c", BANNER.format(host=address, port=25)])
        assert banner.stdout.startswith("220 "), (banner.stdout, banner.stderr, m.log_tail())
    finally:
        m.stop()
        netns.run(["ip", "-6", "addr", "del", f"{address}/64", "dev", veth])
        for key, value in before.items():
            netns.run(["sysctl", "-qw", f"{key}={value}"])
    absent = Mailerd(netns, tmp_path / "absent", untrusted="[2001:db8::8]:25")
    done = netns.run(absent.argv(), timeout=60)
    assert done.returncode == 1 and "cannot listen on [2001:db8::8]:25" in done.stderr, done


def test_an_address_literal_of_ours_is_local_on_the_network_listener(netns: Netns, tmp_path):
    """Mail from another server to user@[an address of ours] is delivered here (Postfix's
    $inet_interfaces and $proxy_interfaces): the listeners' addresses, IPv4 and IPv6 (in
    another spelling), and the public address a 1:1 NAT forwards; the master reads them
    and the workers route by them (over loopback, the e2e tests cannot tell them apart from the
    loopback's, always ours). A literal of another machine's address is still refused."""
    m = Mailerd(netns, tmp_path, port=free_port_in(netns),
                extra=["-n", f"[{NS_V6[0]}]:25", "--public-address", "203.0.113.5",
                       "--dns-server", "127.0.0.1:9", "--inbound-auth", "off"])  # fmt: skip
    assert NS_V6[0] == "2001:db8::1"
    literals = [f"[{NS_V4}]", "[IPv6:2001:DB8:0::1]", "[203.0.113.5]"]
    users = [f"lit{n}" for n in range(len(literals))]
    for user in users:
        m.add_user(user)
    m.start()
    try:
        for user, literal in zip(users, literals, strict=True):
            send_inbound("a@remote.test", f"{user}@{literal}", body=b"Subject: x\r\n\r\nx\r\n")
        for user, literal in zip(users, literals, strict=True):
            assert wait_until(lambda u=user: m.mailbox(u), 10, 0.05), (literal, m.log_tail())
        with smtplib.SMTP(NS_V4, 25, local_hostname=CLIENT_HELO, timeout=IO_TIMEOUT) as s:
            assert s.ehlo(CLIENT_HELO)[0] == 250 and s.mail("a@remote.test")[0] == 250
            code, text = s.rcpt(f"{users[0]}@[{HOST_V4}]")
            assert (code, text[:5]) == (554, b"5.7.1"), text
    finally:
        m.stop()


BANNER = (
    "import socket; s = socket.create_connection(({host!r}, {port}), 5); "
    "print(s.recv(512).decode())"
)


def free_port_in(netns: Netns) -> int:
    """A port free on the namespace's address (the trusted listener's)."""
    run = netns.run([PYTHON, "-c", "import socket; s = socket.socket(); "
                     f"s.bind(({NS_V4!r}, 0)); print(s.getsockname()[1])"])  # fmt: skip
    return int(run.stdout)

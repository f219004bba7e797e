"""The per-client session cap counts an IPv6 client by its /64 (#16): sessions from several
addresses of one /64, made in the namespace (addresses on its loopback interface), against a
network listener of mailerd's there."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import NS_V6, PYTHON, Internet, Mailerd, Netns, finish

ONE_64 = [f"2001:db8:6464::{n}" for n in range(1, 5)]
OTHER_64 = "2001:db8:6465::1"

# Opens a session from each source in turn (keeping them open) and prints each banner's code.
CLIENT = """
import json, socket, sys
target, port, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
held, codes = [], []
for source in sources:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((target, port))
    reply = sock.recv(512)
    codes.append(reply.decode("ascii", "replace").strip())
    held.append(sock)
print(json.dumps(codes))
"""


def _banners(netns: Netns, port: int, sources: list[str]) -> list[str]:
    run = netns.run([PYTHON, "-c", CLIENT, NS_V6[0], str(port), *sources])
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _mailerd(internet: Internet, base: Path, port: int, *extra: str) -> Mailerd:
    """A mailerd whose network listener is on the namespace's side ([2001:db8::1]:port); its
    resolver is the fake Internet's DNS server (the namespace's resolv.conf)."""
    base.mkdir()
    untrusted = f"[{NS_V6[0]}]:{port}"
    return Mailerd(internet.netns, base, port=port - 100, untrusted=untrusted, extra=extra)


def test_one_ipv6_64_is_one_client(internet: Internet, tmp_path: Path):
    netns = internet.netns
    for address in [*ONE_64, OTHER_64]:
        add = ["ip", "-6", "addr", "replace", f"{address}/128", "dev", "lo", "nodad"]
        assert netns.run(add).returncode == 0
    m = _mailerd(internet, tmp_path / "by64", 2725, "--max-sessions-per-ip", "2")
    try:
        m.start()
        codes = _banners(netns, 2725, [*ONE_64[:3], OTHER_64])
        assert [c[:3] for c in codes] == ["220", "220", "421", "220"], codes
        assert "421 4.7.0" in codes[2] and "Too many connections from your address" in codes[2]
        assert f"CONNECT from unknown[{ONE_64[2]}]" in m.log_text()
    finally:
        assert finish(m) == []
    # Configurable: counted by /128, the same addresses are four clients.
    m = _mailerd(
        internet,
        tmp_path / "by128",
        2726,
        "--max-sessions-per-ip",
        "2",
        "--ipv6-prefix-length",
        "128",
    )
    try:
        m.start()
        codes = _banners(netns, 2726, ONE_64)
        assert [c[:3] for c in codes] == ["220"] * 4, codes
    finally:
        assert finish(m) == []

"""`mailerd dns [-c FILE] [--check] [DOMAIN...]`: the DNS records a mail server needs, and a
check of what is published.

For each local domain of the configuration (or those named; `localhost` and names without a
dot are left out) it prints, in zone-file form:

- MX → the host name (-H): where other servers deliver;
- A / AAAA of the host name, one per outbound address;
- SPF `v=spf1 mx -all`: the MX hosts may send the domain's mail, nobody else;
- each DKIM key's TXT record (`--dkim-key`), its value in strings of at most 255 octets;
- DMARC `v=DMARC1; p=quarantine; rua=mailto:postmaster@DOMAIN`: mail that passes neither SPF
  nor DKIM in alignment goes to the spam folder rather than being refused outright (a
  forwarded message, a mistake in a record, costs a look in the spam folder, not lost mail),
  and receivers send their reports to postmaster; move to p=reject once the reports are clean;
- PTR of each outbound address → the host name (set at the hosting provider: Gmail and
  Outlook refuse mail from an address whose PTR name does not resolve back to it).

The outbound addresses are those of the network listeners (-n, by default the addresses of the
default route's interface), within --outbound-ip, but for loopback, link-local and wildcard
ones (no mail leaves from those); an address that is not public (behind NAT, say) is printed
with a warning, since the world sees mail from another one.

With --check each record is looked up through the configured resolver (--dns-server, else the
machine's) and reported as `OK`, `MISSING` or `WRONG` (with what is published and what is
wanted): SPF is right when the published policy gives `pass` for every outbound address (pyspf
evaluates it, includes and all), DMARC for any valid record with a policy, a PTR when it names
the host and that name's A/AAAA contain the address (forward-confirmed reverse DNS).

Exit status: 0 (with --check: only when everything is OK); 1 something is missing or wrong;
2 a bad argument; 78 (EX_CONFIG) a configuration or key that cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dns.reversename

from mailerd import config
from mailerd.commands.dkimkeys import txt_strings, zone_txt
from mailerd.config import Config
from mailerd.inbound import dmarc, sender_policy
from mailerd.inbound.lookups import Answer, Bridge, Lookups, TemporaryFailure
from mailerd.signing import SigningKey

MX_PREFERENCE = 10


@dataclass(frozen=True)
class Record:
    name: str  # without the final dot
    rtype: str  # MX, A, AAAA, TXT, PTR
    value: str  # as published (TXT: the whole text)
    role: str  # mx, address, spf, dkim, dmarc, ptr
    address: str = ""  # the outbound address (address, ptr)

    def zone(self) -> str:
        if self.rtype == "TXT":
            return zone_txt(self.name, self.value)
        if self.rtype == "MX":
            return f"{self.name}. IN MX {MX_PREFERENCE} {self.value}."
        if self.rtype == "PTR":
            return f"{self.name}. IN PTR {self.value}."
        return f"{self.name}. IN {self.rtype} {self.value}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mailerd dns", description="The DNS records to publish, and a check of them."
    )
    parser.add_argument("-c", "--config", help="config file (default /etc/mailerd/mailerd.conf)")
    parser.add_argument("--check", action="store_true", help="look the records up and compare")
    parser.add_argument("domains", nargs="*", metavar="DOMAIN")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(["-c", args.config] if args.config else [])
        keys = load_keys(cfg)
    except config.ConfigError as exc:
        print(f"mailerd dns: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    domains = [d.lower().rstrip(".") for d in args.domains] or [
        d for d in cfg.domains if "." in d and d != "localhost"
    ]
    if not domains:
        print("mailerd dns: no domain to publish (give -d/domain in the config)", file=sys.stderr)
        return 1
    addresses = outbound_addresses(cfg)
    if not addresses:
        print(
            "; no outbound address among the network listeners: no A/AAAA/PTR records "
            "(give listen-network, or run this on the server itself)",
        )
    for address in addresses:
        if not ipaddress.ip_address(address).is_global:
            print(f"; {address} is not a public address: the world sees mail from another one")
    records = list(wanted(cfg, domains, keys, addresses))
    if not args.check:
        for record in records:
            print(record.zone())
        return 0
    lines = asyncio.run(check_all(cfg, records, addresses))
    for line in lines:
        print(line)
    return 0 if all(line.startswith("OK") for line in lines) else 1


def load_keys(cfg: Config) -> tuple[SigningKey, ...]:
    from mailerd import signing

    try:
        return tuple(signing.load_key(d, s, str(p)) for d, s, p in cfg.dkim_specs)
    except signing.KeyProblem as exc:
        raise config.ConfigError(f"--dkim-key: {exc}") from exc


def outbound_addresses(cfg: Config) -> list[str]:
    """The network listeners' public addresses, within --outbound-ip, each once."""
    families = {"ipv4": (4,), "ipv6": (6,), "both": (4, 6)}[cfg.outbound_ip]
    found = []
    for listen in cfg.listeners:
        if listen.role != config.NETWORK:
            continue
        ip = ipaddress.ip_address(listen.host)
        usable = not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)
        if ip.version in families and usable and str(ip) not in found:
            found.append(str(ip))
    return found


def wanted(
    cfg: Config, domains: list[str], keys: tuple[SigningKey, ...], addresses: list[str]
) -> Iterator[Record]:
    host = cfg.hostname.lower().rstrip(".")
    for domain in domains:
        yield Record(domain, "MX", host, "mx")
        yield Record(domain, "TXT", "v=spf1 mx -all", "spf")
        for key in keys:
            if key.domain == domain:
                yield Record(key.dns_name, "TXT", key.dns_record(), "dkim")
        yield Record(
            f"_dmarc.{domain}",
            "TXT",
            f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}",
            "dmarc",
        )
    for address in addresses:
        rtype = "AAAA" if ":" in address else "A"
        yield Record(host, rtype, address, "address", address)
    for address in addresses:
        reverse = dns.reversename.from_address(address).to_text().rstrip(".")
        yield Record(reverse, "PTR", host, "ptr", address)


async def check_all(cfg: Config, records: list[Record], addresses: list[str]) -> list[str]:
    lookups = Lookups.make(cfg.dns_server, cfg.dns_timeout)
    loop = asyncio.get_running_loop()
    bridge = Bridge(lookups, loop, cfg.dns_timeout)
    with ThreadPoolExecutor(2) as threads:
        checker = _Checker(lookups, bridge, threads, addresses)
        return [await checker.check(record) for record in records]


class _Checker:
    def __init__(
        self, lookups: Lookups, bridge: Bridge, threads: ThreadPoolExecutor, addresses: list[str]
    ) -> None:
        self.lookups = lookups
        self.bridge = bridge
        self.threads = threads
        self.addresses = addresses

    async def check(self, record: Record) -> str:
        try:
            line: str = await getattr(self, f"_{record.role}")(record)
            return line
        except TemporaryFailure as exc:
            return f"WRONG    {_label(record)}: the DNS did not answer ({exc})"

    async def _mx(self, record: Record) -> str:
        have = [v.split()[-1].lower().rstrip(".") for v in await self._records(record)]
        return _verdict(record, have, record.value in have)

    async def _address(self, record: Record) -> str:
        have = await self._records(record)
        return _verdict(record, have, record.value in have)

    async def _spf(self, record: Record) -> str:
        have = [v for v in await self._records(record) if v.lower().startswith("v=spf1")]
        if not have:
            return _verdict(record, have, False)
        if not self.addresses:
            return _verdict(record, have, True, note="(no outbound address to try it with)")
        loop = asyncio.get_running_loop()
        failing = []
        for address in self.addresses:
            result = await loop.run_in_executor(
                self.threads,
                sender_policy.check,
                self.bridge,
                address,
                f"postmaster@{record.name}",
                record.name,
            )
            if result.result != "pass":
                failing.append(f"{address}: {result.result}")
        note = (
            f"(not pass for {', '.join(failing)})"
            if failing
            else "(pass for every outbound address)"
        )
        return _verdict(record, have, not failing, note=note)

    async def _dkim(self, record: Record) -> str:
        have = await self._records(record)
        wanted_key = _tag(record.value, "p")
        ok = any(_tag(v, "p") == wanted_key for v in have)
        return _verdict(record, have, ok)

    async def _dmarc(self, record: Record) -> str:
        have = [v for v in await self._records(record) if v.startswith("v=DMARC1")]
        ok = len(have) == 1 and dmarc.parse(have[0]) is not None
        note = "" if len(have) < 2 else "(several DMARC records: receivers ignore them all)"
        return _verdict(record, have, ok, note=note)

    async def _ptr(self, record: Record) -> str:
        have = [v.lower().rstrip(".") for v in await self._records(record)]
        if record.value not in have:
            return _verdict(record, have, False)
        forward = await self.lookups.query(record.value, "AAAA" if ":" in record.address else "A")
        if record.address not in forward.records:
            return (
                f"WRONG    {_label(record)}: {record.value} resolves to "
                f"{', '.join(forward.records) or 'nothing'}, not {record.address} "
                "(forward-confirmed reverse DNS fails)"
            )
        return _verdict(record, have, True, note=f"(and {record.value} resolves back to it)")

    async def _records(self, record: Record) -> list[str]:
        answer: Answer = await self.lookups.query(record.name, record.rtype)
        return list(answer.records)


def _verdict(record: Record, have: list[str], ok: bool, note: str = "") -> str:
    label = _label(record)
    tail = f" {note}" if note else ""
    if ok:
        return f"OK       {label}{tail}"
    want = _show(record.value, record.rtype)
    if not have:
        return f"MISSING  {label}: publish {want}{tail}"
    shown = "; ".join(_show(v, record.rtype) for v in have)
    return f"WRONG    {label}: published {shown}; wanted {want}{tail}"


def _label(record: Record) -> str:
    return f"{record.name} {record.rtype} ({record.role})"


def _show(value: str, rtype: str) -> str:
    if rtype == "TXT":
        return (
            " ".join(f'"{part}"' for part in txt_strings(value)) if value.isascii() else repr(value)
        )
    return value


def _tag(record: str, name: str) -> str:
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            return "".join(value.split())
    return ""

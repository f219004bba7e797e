"""`mailerd dns [-c FILE] [--check] [DOMAIN...]`: the DNS records a mail server needs, and a
check of what is published.

For each local domain of the configuration (or those named, each a local domain or below one;
`localhost` and names without a dot are left out) it prints, in zone-file form, with `;`
comments where the reason is not obvious:

- MX → the host name (-H): where other servers deliver;
- A / AAAA of the host name, one per network-listener address, both families whatever
  --outbound-ip says (those listeners receive mail);
- SPF `v=spf1 mx -all`: the MX hosts may send the domain's mail, nobody else; with a
  `relayhost`, mail leaves through it: `v=spf1 mx a:RELAYHOST -all` (ip4:/ip6: for an address),
  and the comment says to use the provider's documented SPF include instead, if it has one;
- SPF of the host name, `v=spf1 a -all` (without a relayhost, and unless the host name is a
  local domain, whose own SPF covers it): bounces and delay notices go with an empty MAIL FROM,
  so receivers check the name in our HELO (RFC 7208 2.3), and DMARC aligns that with their
  From: MAILER-DAEMON@HOST (RFC 7489 4.1), as mox's quickstart has it;
- each DKIM key's TXT record (`--dkim-key`), its value in strings of at most 255 octets (a
  domain whose mail no key signs gets a note saying how to make one);
- DMARC `v=DMARC1; p=quarantine; rua=mailto:postmaster@DOMAIN`: mail that passes neither SPF
  nor DKIM in alignment goes to the spam folder rather than being refused outright (a
  forwarded message, a mistake in a record, costs a look in the spam folder, not lost mail),
  and receivers send their reports to postmaster; move to p=reject once the reports are clean;
- PTR of each outbound address → the host name (set at the hosting provider: Gmail and
  Outlook refuse mail from an address whose PTR name does not resolve back to it). The
  outbound addresses are the listener addresses within --outbound-ip; with a relayhost there
  are none (this machine's addresses send nothing), so no PTR;
- SRV `_submissions._tcp` (priority 0) and `_submission._tcp` (priority 10) → the host name and
  each port of the submission listeners a mail program reaches at the host name (RFC 6186:
  Thunderbird and others set themselves up from them); those it does not reach (loopback, an
  address the A/AAAA do not lead to) get none, with a note.

The listener addresses are those of the network listeners (-n, by default the addresses of the
default route's interface; a wildcard one stands for the machine's public addresses of its
family) but for loopback and link-local ones (the world reaches none of those), those behind a
NAT replaced by the ones given as public-address (a server behind a 1:1 NAT, as at most cloud
providers); a private address (RFC 1918, shared, unique local) left without one is printed with
a warning that asks for public-address.

With --check each record is looked up through the configured resolver (--dns-server, else the
machine's) and reported as `OK`, `MISSING` or `WRONG` (with what is published and what is
wanted, or why the published record does not do what it should), or `UNKNOWN` when the DNS did
not answer (SPF too when a name its evaluation needs did not: temperror), or when there is no
address of this server to check against; all at once, so a silent server costs one
--dns-timeout. The MX is right when the host is among those of the lowest preference and every
other one there leads to this server's addresses (senders try those first, at random among
equals; the others are backups); the host's A/AAAA when they hold this address and none that is
not this server's. SPF is right when pyspf, evaluating the published policy (includes,
redirects and all), gives `pass` for every sending address (the outbound addresses, or the
relayhost's A/AAAA) and for none of a few addresses nobody sends mail from (PROBES, spread over
the address space: a pass there means `+all` or the like lets far more hosts send as the domain
than its own). A DKIM record is right when it is the only one at its name, with the key's p=,
k= its type (absent: rsa), v= absent or DKIM1, h= absent or listing sha256 and s= absent or for
email, read as strictly as dkimpy (mailerd's own verifier) reads them, and without t=y (testing
mode, which receivers treat as unsigned). DMARC is right when there is exactly one record with
v=DMARC1 first and the inbound verifier's parser (`dmarc.parse`) finds a policy in it, or, for
a subdomain without one, when its organisational domain's record is right (receivers fall back
to it: RFC 7489 6.6.3). A PTR is right when it names the host and that name's A/AAAA contain
the address (forward-confirmed reverse DNS). An SRV record is right when one at its name leads
to the host and port, and none leads elsewhere at the same or a lower priority than ours at
either service's name (clients try the lowest first, ranking both together); with only one
kind of submission listener, the other kind's name (printed nothing) is looked up too, and a
record there leading to another host is WRONG (an old provider's: the clients that try that
service send their users' passwords there), `.` there OK; a missing one is reported but
does not count against the exit status: mail programs are then set up by hand, and mail flows
all the same.

Last, --check checks the TLS certificate a client asking for the host name is served (the
one the SNI chooser picks; with an RSA and an ECDSA one, both) as a client that checks does:
a handshake in memory against OpenSSL's default trust anchors (the system's CA certificates,
SSL_CERT_FILE's where set). OK; WRONG when no certificate is for the host name, or its chain
is incomplete, self-signed, from a CA clients do not trust or out of date; UNKNOWN when it or
its key may not be read (not run as root: certbot's files are root's alone); MISSING, not
counted, when none is configured (mail then comes in clear, and nothing else breaks).

The host name must be one the world can look up: one without a dot (`localhost`, this
machine's unqualified FQDN: the default when the configuration has no `hostname`), or one the
Public Suffix List has no rule for (`localhost.localdomain`, `host.lan`), is refused, exit 1.

Exit status: 0 (with --check: only when everything is OK, missing SRV records and
certificate aside); 1
something is missing or wrong, or nothing can be published (no domain, a host name the world
cannot look up); 2 a bad argument (a DOMAIN that is not local among them); 78 (EX_CONFIG) a
configuration or key that cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import dns.exception
import dns.resolver
import dns.reversename
from dkim.util import InvalidTagValueList

from mailerd import config, host, names, signing, tls
from mailerd.commands.dkimkeys import txt_strings, zone_txt
from mailerd.config import Config
from mailerd.dkim_speedups import parse_tag_value
from mailerd.inbound import dmarc, sender_policy
from mailerd.inbound.lookups import Answer, Bridge, Lookups, TemporaryFailure
from mailerd.signing import SigningKey

MX_PREFERENCE = 10
SPF_THREADS = 128  # SPF evaluations at once, at most (each domain's senders and PROBES)
# Addresses nobody sends mail from on the Internet, spread over the address space: an SPF
# policy that passes one passes far more hosts than a domain's own (`+all`, a redirect to such a
# record, ip4:0.0.0.0/1 and the like).
PROBES = (
    "240.0.0.1",  # class E, reserved
    "100.64.0.1",  # shared address space (carrier NAT): in 0.0.0.0/1
    "198.18.0.1",  # benchmarking: in 192.0.0.0/3
    "100::1",  # the discard prefix
    "3fff::1",  # documentation (RFC 9637): in 2000::/3, where every global address is
    "fc00::1",  # unique local
)
NULL_MX = "0 . (a null MX: the domain takes no mail)"
HELO_SPF = "v=spf1 a -all"  # the host name's: its own addresses send as it
# The SRV records by which mail programs find the submission service (RFC 6186; _submissions,
# for implicit TLS, is RFC 8314 5.1's addition), by listener role: (service, priority). Clients
# try the lowest priority first (RFC 2782), and RFC 6186 lets priorities rank one service
# against another; RFC 8314 (section 1) wants implicit TLS in preference to STARTTLS (no
# plaintext step for an attacker to strip), so it gets 0 and STARTTLS 10, the fallback.
# Weight 1 as in RFC 6186's examples: one host, nothing to share out.
SUBMISSION_SRV = {
    config.SUBMISSIONS: ("_submissions._tcp", 0),
    config.SUBMISSION: ("_submission._tcp", 10),
}
SRV_WEIGHT = 1
# What an unconfigured service's name is checked against (not printed: a client that finds
# nothing there turns to the other service just as it does on this "not offered" record).
NOT_OFFERED = "0 0 0 ."
SRV_OPTIONAL = (
    "(optional: without it mail programs are set up by hand; not counted in the exit status)"
)


@dataclass(frozen=True)
class Record:
    name: str  # without the final dot
    rtype: str  # MX, A, AAAA, TXT, PTR, SRV
    value: str  # as published (TXT: the whole text), names without the final dot
    role: str  # mx, address, spf, helo (the host name's SPF), dkim, dmarc, ptr, srv
    address: str = ""  # the listener address (address, ptr)

    def zone(self) -> str:
        if self.rtype == "TXT":
            return zone_txt(self.name, self.value)
        if self.rtype == "MX":
            return f"{self.name}. IN MX {MX_PREFERENCE} {self.value}."
        if self.rtype in ("PTR", "SRV"):
            return f"{self.name}. IN {self.rtype} {self.value}."
        return f"{self.name}. IN {self.rtype} {self.value}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mailerd dns", description="The DNS records to publish, and a check of them."
    )
    parser.add_argument("-c", "--config", help="config file (default /etc/mailerd/mailerd.conf)")
    parser.add_argument("--check", action="store_true", help="look the records up and compare")
    parser.add_argument(
        "--dns-server",
        metavar="IP[:PORT]",
        help="the resolver --check asks (default: the config's dns-server, else /etc/resolv.conf)",
    )
    parser.add_argument("domains", nargs="*", metavar="DOMAIN")
    args = parser.parse_args(argv)
    given = ["-c", args.config] if args.config else []
    if args.dns_server:
        given += ["--dns-server", args.dns_server]
    try:
        cfg = config.load(given)
        keys = load_keys(cfg)
    except config.ConfigError as exc:
        print(f"mailerd dns: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    domains = [d.lower().rstrip(".") for d in args.domains] or [
        d for d in cfg.domains if "." in d and d != "localhost"
    ]
    strangers = [d for d in domains if not names.is_local_domain(d, cfg.domains)]
    if strangers:
        print(
            f"mailerd dns: not a local domain: {', '.join(strangers)} "
            f"(the local domains: {', '.join(cfg.domains) or 'none'})",
            file=sys.stderr,
        )
        return 2
    if not domains:
        print(
            "mailerd dns: no domain to publish (localhost and names without a dot are left "
            "out): set `domain = example.org` in the config file",
            file=sys.stderr,
        )
        return 1
    problem = host.unusable_hostname(cfg.hostname)
    if problem:
        # The MX and PTR records would name it, and the world could not look it up: refuse
        # rather than print records that look right and deliver nothing.
        print(
            f"mailerd dns: the host name {cfg.hostname!r} cannot be the target of MX and PTR "
            f"records ({problem}): set `hostname = mx.example.org` in the config file (a name "
            "in a domain of yours, whose A/AAAA this prints)",
            file=sys.stderr,
        )
        return 1
    addresses = listener_addresses(cfg)
    outbound = outbound_addresses(cfg, addresses)
    for line in notes(cfg, addresses, outbound):
        print(line)
    for line in unsigned_notes(domains, keys):
        print(line)
    records = list(wanted(cfg, domains, keys, addresses, outbound))
    if not args.check:
        for line in zone_lines(cfg, records):
            print(line)
        return 0
    lines, passed = asyncio.run(check_all(cfg, records, addresses, outbound))
    for line, ok in certificate_lines(cfg):
        lines.append(line)
        passed = passed and ok
    for line in lines:
        print(line)
    return 0 if passed else 1


def load_keys(cfg: Config) -> tuple[SigningKey, ...]:
    try:
        return tuple(signing.load_key(d, s, str(p)) for d, s, p in cfg.dkim_specs)
    except signing.KeyProblem as exc:
        raise config.ConfigError(f"--dkim-key: {exc}") from exc


def listener_addresses(cfg: Config) -> list[str]:
    """The addresses the world reaches this server at, each once: the host name's A/AAAA list
    them all, whatever --outbound-ip says. The network listeners' own (a wildcard one stands
    for the machine's public addresses of its family: `_wildcard`), those behind a NAT
    replaced by the public-address ones (1:1 NAT; a public IPv6 address beside a NATed IPv4
    one stays)."""
    found: list[str] = []
    for listen in cfg.listeners:
        if listen.role != config.NETWORK:
            continue
        ip = dns_address(listen)
        for address in _wildcard(ip)[0] if ip.is_unspecified else [ip]:
            if host.reachable(address) and str(address) not in found:
                found.append(str(address))
    if cfg.public_addresses:
        found = [a for a in found if not host.behind_nat(ipaddress.ip_address(a))]
        found += [a for a in cfg.public_addresses if a not in found]
    return found


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def dns_address(listen: config.ListenAddress) -> Address:
    """A listener's address as the DNS has it: without an IPv6 scope (`%eth0` names a local
    interface, not part of the address the world sees; a PTR name cannot hold it). (An IPv4
    address in IPv6 form is no listener: the configuration refuses it.)"""
    return ipaddress.ip_address(listen.host.partition("%")[0])


def _wildcard(ip: Address) -> tuple[list[Address], list[Address]]:
    """(Used, left out): the machine's addresses of `ip`'s family that other machines can
    reach; its private ones (a container bridge's, a VPN's, a unique local IPv6 address) are
    left out, since the world reaches none of them (behind a NAT: give public-address)."""
    family = [ipaddress.ip_address(a) for a in host.machine_addresses()]
    family = [a for a in family if a.version == ip.version and host.reachable(a)]
    return [a for a in family if not host.behind_nat(a)], [a for a in family if host.behind_nat(a)]


def outbound_addresses(cfg: Config, addresses: list[str]) -> list[str]:
    """Those mail leaves from (they want a PTR and an SPF pass): within --outbound-ip; none
    with a relayhost, through which mail leaves instead."""
    if cfg.relayhost is not None:
        return []
    families = {"ipv4": (4,), "ipv6": (6,), "both": (4, 6)}[cfg.outbound_ip]
    return [a for a in addresses if ipaddress.ip_address(a).version in families]


def submission_listeners(cfg: Config, addresses: list[str]) -> list[config.ListenAddress]:
    """The submission listeners a mail program reaches at the host name, whose A/AAAA are
    `addresses` (those `listener_addresses` found public): one on such an address, or on the
    wildcard of its family, or on a network listener's private address that a public-address
    stands for (a 1:1 NAT forwards there; not to another private address of the machine, a
    second interface's or a container bridge's). The others (loopback, an address the A/AAAA
    do not lead to) are not worth advertising: a client sent to the host name would not find
    them there."""
    published = [ipaddress.ip_address(a) for a in addresses]
    public = {ipaddress.ip_address(a) for a in cfg.public_addresses}
    # (As `listener_addresses` replaced them; a wildcard network listener's private addresses
    # it left out, not knowing which one the NAT forwards to.)
    network = [dns_address(a) for a in cfg.listeners if a.role == config.NETWORK]
    forwarded = {ip for ip in network if host.behind_nat(ip)}
    found = []
    for listen in cfg.listeners:
        if listen.role not in SUBMISSION_SRV:
            continue
        ip = dns_address(listen)
        for address in published:
            if address.version != ip.version:
                continue
            if ip.is_unspecified or ip == address or (address in public and ip in forwarded):
                found.append(listen)
                break
    return found


def notes(cfg: Config, addresses: list[str], outbound: list[str]) -> Iterator[str]:
    """`;` lines about the addresses, printed before the records (and the check)."""
    for listen in cfg.listeners:
        ip = dns_address(listen)
        if listen.role == config.NETWORK and ip.is_unspecified:
            _, private = _wildcard(ip)
            if private:
                skipped = ", ".join(str(a) for a in private)
                shown = f"[{ip}]" if ip.version == 6 else str(ip)
                yield f"; the wildcard listener {shown}: private addresses left out ({skipped})"
    if not addresses:
        yield (
            "; no usable address among the network listeners: no A/AAAA/PTR records "
            "(give listen-network, or public-address behind a NAT, or run this on the server "
            "itself)"
        )
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if host.behind_nat(ip):
            yield (
                f"; {address} is private: behind a NAT the world reaches this server at another "
                "address; give that as public-address (the records name this one meanwhile)"
            )
        elif not ip.is_global:
            yield f"; {address} is not a public address: the world sees this server at another one"
    if cfg.relayhost is not None:
        yield (
            f"; mail leaves through the relayhost {cfg.relayhost[0]}: no PTR records "
            "(this machine's own addresses send no mail)"
        )
    elif addresses and not outbound:
        yield f"; no listener address within outbound-ip = {cfg.outbound_ip}: no PTR records"
    unreached = [str(a) for a in cfg.listeners if a.role in SUBMISSION_SRV]
    if unreached and not submission_listeners(cfg, addresses):
        yield (
            f"; no SRV records: the submission listeners ({', '.join(unreached)}) are not on an "
            "address of the host name's A/AAAA, where mail programs would look"
        )


def unsigned_notes(domains: list[str], keys: tuple[SigningKey, ...]) -> Iterator[str]:
    """A `;` line for each domain whose mail would go out unsigned (no key of its own or of a
    parent domain): nothing is wrong to check, but DMARC then rests on SPF alone, which a
    forward breaks (an acceptance tester's finding: nothing was said)."""
    for domain in domains:
        if not signing.keys_for(domain, keys):
            yield (
                f"; no DKIM key for {domain}: its mail goes out unsigned (make one with "
                f"`mailerd dkim keygen {domain}`)"
            )


def spf_record(cfg: Config) -> str:
    if cfg.relayhost is None:
        return "v=spf1 mx -all"
    return f"v=spf1 mx {relay_mechanism(cfg.relayhost[0])} -all"


def relay_mechanism(host: str) -> str:
    """The SPF mechanism that passes the relayhost: a:HOST, or ip4:/ip6: for an address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"a:{host}"
    return f"ip{ip.version}:{ip}"


def wanted(
    cfg: Config,
    domains: list[str],
    keys: tuple[SigningKey, ...],
    addresses: list[str],
    outbound: list[str],
) -> Iterator[Record]:
    host = cfg.hostname.lower().rstrip(".")
    submission = submission_listeners(cfg, addresses)
    for domain in domains:
        yield Record(domain, "MX", host, "mx")
        yield Record(domain, "TXT", spf_record(cfg), "spf")
        for key in keys:
            if key.domain == domain:
                yield Record(key.dns_name, "TXT", key.dns_record(), "dkim")
        yield Record(
            f"_dmarc.{domain}",
            "TXT",
            f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}",
            "dmarc",
        )
        yield from srv_records(domain, host, submission)
    if cfg.relayhost is None and host not in cfg.domains:  # (domains are read in this form)
        yield Record(host, "TXT", HELO_SPF, "helo")
    for address in addresses:
        rtype = "AAAA" if ":" in address else "A"
        yield Record(host, rtype, address, "address", address)
    for address in outbound:
        reverse = dns.reversename.from_address(address).to_text().rstrip(".")
        yield Record(reverse, "PTR", host, "ptr", address)


def srv_records(domain: str, host: str, submission: list[config.ListenAddress]) -> Iterator[Record]:
    """One SRV record for each port of each kind of submission listener (a listener on two
    addresses, or on both families, is one port), implicit TLS first; with any, the other
    kind's name as NOT_OFFERED, for --check: a record left there by an old provider draws
    the clients that try that service first (and their users' passwords) away."""
    roles = {listen.role for listen in submission}
    for role, (service, priority) in SUBMISSION_SRV.items():
        if roles and role not in roles:
            yield Record(f"{service}.{domain}", "SRV", NOT_OFFERED, "srv")
        for port in sorted({listen.port for listen in submission if listen.role == role}):
            value = f"{priority} {SRV_WEIGHT} {port} {host}"
            yield Record(f"{service}.{domain}", "SRV", value, "srv")


def zone_lines(cfg: Config, records: Iterable[Record]) -> Iterator[str]:
    """The records in zone-file form, the first of each kind after what is to know about it."""
    explained = explanations(cfg)
    for record in records:
        if record.value == NOT_OFFERED:  # (checked only: see NOT_OFFERED)
            continue
        yield from explained.pop(record.role, ())
        yield record.zone()


def explanations(cfg: Config) -> dict[str, list[str]]:
    """`;` comment lines by role: why the record is as it is, where that is not obvious."""
    out = {
        "dmarc": [
            "; DMARC p=quarantine: a forwarded message or a record mistake costs a look in the",
            "; spam folder, not lost mail. Reports go to postmaster; move to p=reject once they",
            "; show only your own mail, passing.",
        ],
        "helo": [
            "; SPF of the host name: bounces go with an empty MAIL FROM, so receivers check",
            "; the name this server greets them with (HELO), and DMARC aligns it with their",
            f"; From: MAILER-DAEMON@{cfg.hostname.lower().rstrip('.')}.",
        ],
        "ptr": [
            "; PTR records are set at the hosting provider (who owns the address), not in your",
            "; zone: Gmail and Outlook refuse mail whose PTR name does not resolve back to it.",
        ],
        "srv": [
            "; SRV records let mail programs find where to submit mail (RFC 6186), implicit",
            "; TLS first (RFC 8314). Optional: mail flows without them, and --check's exit",
            "; status does not count a missing one (a wrong one it does).",
        ],
    }
    if cfg.relayhost is not None:
        relay = cfg.relayhost[0]
        out["spf"] = [
            f"; mail leaves through the relayhost {relay}: if its provider documents an SPF",
            f"; include, use that in place of {relay_mechanism(relay)}.",
        ]
    return out


async def check_all(
    cfg: Config, records: list[Record], addresses: list[str], outbound: list[str]
) -> tuple[list[str], bool]:
    """The lines of the check, and whether it passed (the exit status: `_passes`)."""
    lookups = Lookups.make(cfg.dns_server, cfg.dns_timeout)
    loop = asyncio.get_running_loop()
    bridge = Bridge(lookups, loop, cfg.dns_timeout)
    relay = cfg.relayhost[0] if cfg.relayhost is not None else None
    # A thread for each SPF evaluation (every domain's, of its senders and the probes) at
    # once: one after another, a name that does not answer cost a --dns-timeout each (8 × 10 s
    # a domain), and 16 shared by six domains still cost three.
    evaluations = sum(r.role in ("spf", "helo") for r in records) * (
        len(outbound) + len(PROBES) + 2
    )
    with ThreadPoolExecutor(max(1, min(SPF_THREADS, evaluations))) as threads:
        checker = _Checker(lookups, bridge, threads, addresses, outbound, relay, records)
        # All at once: against a server that does not answer, one --dns-timeout in all, not
        # one a record (it was 9 × 11.6 s, found by a tester).
        lines = list(await asyncio.gather(*(checker.check(record) for record in records)))
    passed = all(_passes(record, line) for record, line in zip(records, lines, strict=True))
    lines = [line for line in lines if line]  # ("": nothing to report)
    if not addresses:
        name = cfg.hostname.lower().rstrip(".")
        lines.append(
            f"UNKNOWN  {name} A (address): no address of this server to check its A/AAAA, "
            "PTR and SPF records against (give listen-network, or public-address behind a "
            "NAT)"
        )
        passed = False
    return lines, passed


def certificate_lines(cfg: Config) -> list[tuple[str, bool]]:
    """--check's lines on the TLS certificate, each with whether it passes. The MX and SRV
    records lead clients to the host name, and those that check certificates (mail programs
    always; senders under MTA-STS) want one for that name, chaining to a CA they trust, in
    date; the server serves any certificate all the same, so only this tells. No certificate
    at all is reported but not counted: mail flows without TLS (in clear)."""
    host = cfg.hostname.lower().rstrip(".")
    label = f"{host} certificate"
    if not cfg.tls_pairs:
        return [
            (
                f"MISSING  {label}: none configured (tls-cert, tls-key): other servers deliver "
                "here in clear (Gmail shows its red lock) and mail programs cannot submit "
                "(not counted in the exit status)",
                True,
            )
        ]
    # Each pair loaded first, as the start loads it: a chain in the wrong order, read for
    # its names, looked like a certificate for another name (an attacker's pass).
    lines, usable = [], []
    for pair in cfg.tls_pairs:
        try:
            tls.check_pair(pair)
            usable.append(pair)
        except tls.TLSError as exc:
            lines.append(_unusable(label, pair, exc))
    chosen = tls.presented(usable, host)
    if usable and not chosen:
        others = sorted({n for cert, _ in usable for n in tls.names_of(cert)})
        lines.append(
            (
                f"WRONG    {label}: no certificate is for {host} (they are for "
                f"{', '.join(others) or 'no name'}): mail programs, and senders that check, "
                f"refuse the connection; get one for {host} (certbot certonly --standalone "
                f"-d {host})",
                False,
            )
        )
    return lines + [_certificate_line(label, host, pair) for pair in chosen]


def _unusable(label: str, pair: tls.Pair, exc: tls.TLSError) -> tuple[str, bool]:
    # (certbot's live/ and archive/ are root's alone: the certificate too, not just the key)
    if isinstance(exc.__cause__, PermissionError) and os.geteuid() != 0:
        return (f"UNKNOWN  {label} {pair[0]}: {exc} (run mailerd dns as root)", False)
    return (f"WRONG    {label} {pair[0]}: {exc}", False)


def _certificate_line(label: str, host: str, pair: tls.Pair) -> tuple[str, bool]:
    cert = pair[0]
    try:
        why = tls.refusal(pair, host)
    except tls.TLSError as exc:
        return _unusable(label, pair, exc)
    if why:
        return (f"WRONG    {label} {cert}: {why}", False)
    return (f"OK       {label} {cert} ({tls.summary(cert)})", True)


def _passes(record: Record, line: str) -> bool:
    """Does this line leave the exit status 0? OK does, and so does a missing SRV record: mail
    programs are then set up by hand, and mail flows all the same. A wrong one sends them (and
    their users' passwords) elsewhere, and counts. "" (nothing at a NOT_OFFERED name) does
    not."""
    return (
        not line or line.startswith("OK") or (record.role == "srv" and line.startswith("MISSING"))
    )


class _Checker:
    def __init__(
        self,
        lookups: Lookups,
        bridge: Bridge,
        threads: ThreadPoolExecutor,
        addresses: list[str],
        outbound: list[str],
        relay: str | None,
        records: list[Record],
    ) -> None:
        self.lookups = lookups
        self.bridge = bridge
        self.threads = threads
        self.addresses = {ipaddress.ip_address(a) for a in addresses}
        self.outbound = outbound
        self.relay = relay
        # The (port, target) pairs wanted at each SRV name: two ports of ours are no stranger
        # to each other. And the highest priority value wanted at a domain's SRV names: clients
        # rank both services together (RFC 6186), so another server is tried before ours
        # when it is no higher than our best at either name.
        self.services: dict[str, set[tuple[int, str]]] = {}
        self.ranked: dict[str, int] = {}
        for record in records:
            if record.role == "srv" and record.value != NOT_OFFERED:
                entry = _srv_entry(record.value)
                self.services.setdefault(record.name, set()).add((entry.port, entry.target))
                domain = _srv_domain(record.name)
                self.ranked[domain] = max(self.ranked.get(domain, 0), entry.priority)

    async def check(self, record: Record) -> str:
        try:
            line: str = await getattr(self, f"_{record.role}")(record)
            return line
        except TemporaryFailure as exc:
            return f"UNKNOWN  {_label(record)}: the DNS did not answer ({_why(exc)})"

    async def _mx(self, record: Record) -> str:
        """Right when the host is among the MX hosts of the lowest preference value, every
        other host there is this server too, and the host's name is no alias: senders try
        those first (RFC 5321 5.1), at random among equals. Hosts with a higher value are
        backups, tried only when these do not answer."""
        entries = [_mx_entry(v) for v in await self._records(record)]
        hosts = [name for _, name in entries]
        shown = [name or NULL_MX for name in hosts]
        if record.value not in hosts:
            note = ""
            first = [name for name in hosts if name]
            if len(first) == 1 and await self._ours(first[0]):
                note = (
                    f"(its addresses are this server's, so mail arrives; but {record.value} "
                    "is the name this server's greeting, PTR and certificate carry, which a "
                    "sender that checks certificates (MTA-STS, DANE) looks for)"
                )
            return _verdict(record, shown, False, note=note)
        best = min(preference for preference, _ in entries)
        ours = min(preference for preference, name in entries if name == record.value)
        first = [name for preference, name in entries if preference == best]
        if ours > best:
            return _verdict(
                record,
                shown,
                False,
                note=f"({record.value} is only a backup: senders try {', '.join(first)} first, "
                f"whose preference {best} is lower than its {ours})",
            )
        strangers = [n for n in first if n != record.value and not await self._ours(n)]
        if strangers:
            return _verdict(
                record,
                shown,
                False,
                note=f"({', '.join(n or NULL_MX for n in strangers)} has the same preference, "
                f"{best}: senders "
                "deliver part of the mail there, not here)",
            )
        alias = (await self.lookups.query(record.value, "CNAME")).records
        if alias:
            return _verdict(
                record,
                shown,
                False,
                note=f"({record.value} is an alias, a CNAME of {alias[0].rstrip('.')}: an MX "
                "must name a host with A/AAAA records of its own (RFC 2181 10.3, RFC 5321 "
                "5.1), and some senders refuse mail to one that does not; publish its A/AAAA "
                "records in place of the CNAME)",
            )
        backups = [name for preference, name in entries if preference > best]
        note = f"(and backups, tried when it does not answer: {', '.join(backups)})"
        return _verdict(record, shown, True, note=note if backups else "")

    async def _ours(self, name: str) -> bool:
        """Does `name` lead to this server: has it addresses, all of them ours?"""
        found = await self._addresses_of(name)
        return bool(found) and {ipaddress.ip_address(a) for a in found} <= self.addresses

    async def _addresses_of(self, name: str) -> list[str]:
        """The A and AAAA records of `name`."""
        found: list[str] = []
        for rtype in ("A", "AAAA"):
            found += (await self.lookups.query(name, rtype)).records
        return found

    async def _address(self, record: Record) -> str:
        """Right when the host has this address and no other that is not this server's
        (senders try each of them: RFC 5321 5.1)."""
        have = await self._records(record)
        if ipaddress.ip_address(record.value) not in {ipaddress.ip_address(a) for a in have}:
            return _verdict(record, have, False)
        strangers = [a for a in have if ipaddress.ip_address(a) not in self.addresses]
        if strangers:
            note = f"(senders also try {', '.join(strangers)}, which is not this server)"
            return _verdict(record, have, False, note=note)
        return _verdict(record, have, True)

    async def _spf(self, record: Record) -> str:
        have = [v for v in await self._records(record) if v.lower().startswith("v=spf1")]
        if not have:
            return _verdict(record, have, False)
        senders = await self._senders()
        results = await self._spf_results(record.name, [*senders, *PROBES])
        unanswered = [address for address, result in results if result == "temperror"]
        if unanswered:  # (RFC 7208 2.6.6: a transient DNS error, not the record's fault)
            shown = "; ".join(_show(v, record.rtype) for v in have)
            return (
                f"UNKNOWN  {_label(record)}: published {shown}; a name its evaluation needs "
                f"did not answer (temperror for {_addresses(unanswered)}): check again later"
            )
        problems = self._spf_problems(record.name, results[: len(senders)], results[len(senders) :])
        if not problems:
            return _verdict(record, have, True, note=self._spf_ok_note(senders))
        if have == [record.value]:  # then the names it points to are what is wrong
            return (
                f"WRONG    {_label(record)}: published as wanted, but {'; and '.join(problems)}"
                f" ({self._spf_deciders(record)})"
            )
        return _verdict(record, have, False, note=f"({'; '.join(problems)})")

    def _spf_problems(
        self, domain: str, senders: list[tuple[str, str]], probes: list[tuple[str, str]]
    ) -> list[str]:
        """What is wrong with the domain's SPF verdicts: a sender without `pass`, a probe
        with it."""
        problems = []
        failing = [(a, r) for a, r in senders if r != "pass"]
        if failing:
            problems.append(f"not pass for {', '.join(f'{a}: {r}' for a, r in failing)}")
        strangers = [a for a, r in probes if r == "pass"]
        if strangers:
            problems.append(
                f"pass for {', '.join(strangers)}, which nobody is given: "
                f"it lets any host send as {domain}"
            )
        return problems

    async def _senders(self) -> list[str]:
        """The addresses mail leaves from: ours, or the relayhost's A and AAAA."""
        if self.relay is None:
            return self.outbound
        try:
            return [str(ipaddress.ip_address(self.relay))]
        except ValueError:
            return await self._addresses_of(self.relay)

    async def _spf_results(self, domain: str, addresses: list[str]) -> list[tuple[str, str]]:
        """(address, SPF result) for mail from postmaster@DOMAIN sent from each address, the
        evaluations at once."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self.threads,
                    sender_policy.check,
                    self.bridge,
                    address,
                    f"postmaster@{domain}",
                    domain,
                )
                for address in addresses
            )
        )
        return [(a, result.result) for a, result in zip(addresses, results, strict=True)]

    def _spf_ok_note(self, senders: list[str]) -> str:
        if senders:
            who = "every outbound address" if self.relay is None else f"{self.relay}'s addresses"
            return f"(pass for {who}, and for no stranger)"
        if self.relay is None:
            return "(no outbound address to try it with)"
        return f"(the relayhost {self.relay} has no address to try it with)"

    async def _helo(self, record: Record) -> str:
        """The host name's SPF, checked as a domain's is: its A/AAAA decide it."""
        return await self._spf(record)

    def _spf_deciders(self, record: Record) -> str:
        if record.role == "helo":
            return "the host's A/AAAA records decide it"
        if self.relay is None:
            return "the domain's MX and the host's A/AAAA records decide it"
        return f"the domain's MX and {self.relay}'s A/AAAA records decide it"

    async def _dkim(self, record: Record) -> str:
        have = await self._records(record)
        want = _tags(record.value)
        same_key = [v for v in have if _tags(v).get("p") == want["p"]]
        if not same_key:
            return _verdict(record, have, False)
        if len(have) > 1:  # (RFC 6376 3.6.2.2: which one a receiver reads is undefined)
            return _verdict(record, have, False, note="(several records: receivers read any one)")
        problem = _dkim_problem(same_key[0], want["k"])
        if not problem:
            return _verdict(record, have, True)
        return _verdict(record, have, False, note=f"(the key is right, but {problem})")

    async def _dmarc(self, record: Record) -> str:
        have = [v for v in await self._records(record) if dmarc.is_record(v)]
        if not have:
            # RFC 7489 6.6.3: receivers then use the organisational domain's record.
            covered = await self._dmarc_above(record.name.removeprefix("_dmarc."))
            if covered:
                return _verdict(record, have, True, note=covered)
        note = "" if len(have) < 2 else "(several DMARC records: receivers ignore them all)"
        policy = _one_policy(have)
        if policy is not None and policy.p == "none":
            note = P_NONE_NOTE
        return _verdict(record, have, policy is not None, note=note)

    async def _dmarc_above(self, domain: str) -> str:
        """The note for a subdomain that the organisational domain's record covers, or ""."""
        above = dmarc.organizational_domain(domain)
        if above == domain:
            return ""
        name = f"_dmarc.{above}"
        found = [v for v in (await self.lookups.query(name, "TXT")).records if dmarc.is_record(v)]
        covered = _one_policy(found) is not None
        return f"(none of its own: {name}'s record covers it)" if covered else ""

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
        others = sorted(set(have) - {record.value})
        if others:  # (a receiver reads any one: its checks of the name would fail by turns)
            return (
                f"WRONG    {_label(record)}: {record.address} has other names too "
                f"({', '.join(others)}): a receiver takes any one of them for its name, and "
                f"its checks of it (that it resolves back, that it is the HELO name) fail by "
                f"turns; keep only {record.value}"
            )
        return _verdict(record, have, True, note=f"(and {record.value} resolves back to it)")

    async def _srv(self, record: Record) -> str:
        """Right when a record at the name leads to the host and port, and none leads elsewhere
        at the same or a lower priority value: clients try the lowest first, and pick among
        equals by weight (RFC 2782). Missing is reported, but does not count (`_passes`)."""
        entries = [_srv_entry(v) for v in await self._records(record)]
        if record.value == NOT_OFFERED:
            return self._not_offered(record, entries)
        shown = [_srv_shown(e) for e in entries]
        if not entries:
            return _verdict(record, shown, False, note=SRV_OPTIONAL)
        want = _srv_entry(record.value)
        ours = [e for e in entries if (e.port, e.target) == (want.port, want.target)]
        if not ours:
            return _verdict(record, shown, False)
        best = max(min(e.priority for e in ours), self.ranked[_srv_domain(record.name)])
        mine = self.services[record.name]
        elsewhere = [e for e in entries if e.priority <= best and (e.port, e.target) not in mine]
        if elsewhere:
            note = (
                f"({'; '.join(_srv_shown(e) for e in elsewhere)}: tried before this one, or "
                "as well, or before ours at the other service's name (clients rank "
                "_submissions._tcp and _submission._tcp together), by the mail programs that "
                "look these up)"
            )
            return _verdict(record, shown, False, note=note)
        return _verdict(record, shown, True)

    def _not_offered(self, record: Record, entries: list[_Srv]) -> str:
        """A service with no listener here: nothing at its name, or `.`, is right (not
        reported when nothing: no record was printed); a record leading to another host is
        WRONG whatever its priority, since the clients that try this service first go there
        with their users' passwords."""
        if not entries:
            return ""
        ours = {target for pairs in self.services.values() for _, target in pairs}
        strangers = [e for e in entries if e.target and e.target not in ours]
        shown = "; ".join(_srv_shown(e) for e in entries)
        if not strangers:
            note = ""
            if any(e.target for e in entries):
                note = " (this host, where nothing listens for it: clients turn to the other one)"
            return f"OK       {_label(record)}: published {shown}{note}"
        return (
            f"WRONG    {_label(record)}: published {shown}; wanted none, or {NOT_OFFERED} (the "
            f"service is not offered here: mail programs that try it send their users' "
            f"passwords to {', '.join(e.target for e in strangers)}; remove it)"
        )

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


def _why(exc: TemporaryFailure) -> str:
    """Why a lookup failed, in a few words (dnspython's text repeats each try's)."""
    cause = exc.__cause__
    if isinstance(cause, (dns.exception.Timeout, TimeoutError)):
        return "no answer in time: is --dns-server / dns-server right, and does it answer?"
    if isinstance(cause, dns.resolver.NoNameservers):
        return "every server failed (SERVFAIL or refused)"
    text = str(cause or exc)
    return text if len(text) <= 120 else text[:117] + "..."


def _label(record: Record) -> str:
    role = "spf of the HELO name" if record.role == "helo" else record.role
    return f"{record.name} {record.rtype} ({role})"


def _show(value: str, rtype: str) -> str:
    if rtype == "TXT":
        return (
            " ".join(f'"{part}"' for part in txt_strings(value)) if value.isascii() else repr(value)
        )
    return value


def _tags(record: str) -> dict[str, str]:
    """A DKIM key record's tags (names as written: RFC 6376 3.2 makes them case-sensitive;
    values without their whitespace); the first of a repeated tag."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip(), "".join(value.split()))
    return tags


def _dkim_problem(record: str, kind: str) -> str:
    """What in a record with our key's p= keeps receivers from verifying our signatures with
    it ("" when nothing), judged as strictly as dkimpy, mailerd's own verifier, judges: a tag
    list with a tag twice, v= other than DKIM1 (exactly), k= other than the key's type in
    lower case, h= without sha256, s= without email, t= with y (testing: RFC 6376 3.6.1 has
    receivers treat the mail as unsigned). t=s is fine: it only refuses an i= in a subdomain
    of d=, and ours is d='s own (dkimpy's default @DOMAIN, which signing.py keeps)."""
    try:
        raw = parse_tag_value(record.encode("utf-8", "replace"))
    except InvalidTagValueList as exc:
        return f"its tag list is invalid ({exc.__class__.__name__})"
    tags = {k.decode("ascii", "replace"): v.decode("ascii", "replace") for k, v in raw.items()}
    version = tags.get("v", "DKIM1")
    if version != "DKIM1":
        return f"v={version}: it must be DKIM1 (so written), or absent"
    if "k" not in tags and kind != "rsa":
        return f"no k=, which means rsa, for an {kind} key"
    if tags.get("k", "rsa") != kind:
        return f"k={tags['k']} for an {kind} key (written in lower case)"
    hashes = tags.get("h")
    if hashes is not None and "sha256" not in [h.strip() for h in hashes.split(":")]:
        return f"h={hashes}: it must list sha256 (our signatures' hash), or be absent"
    services = tags.get("s")
    if services is not None and not {"email", "*"} & {s.strip() for s in services.split(":")}:
        return f"s={services}: a key for mail has s=email or *, or none"
    flags = tags.get("t")
    if flags is not None and "y" in [f.strip() for f in flags.split(":")]:
        return (
            f"t={flags}: y is testing mode, in which receivers treat the mail as unsigned "
            "(RFC 6376 3.6.1): remove it"
        )
    return ""


# p=none is a policy (Gmail's and Yahoo's senders' rules take it), so it is OK; but it asks
# receivers to do nothing with a forgery, so the operator is told.
P_NONE_NOTE = (
    "(p=none: receivers treat mail in this domain's name that fails DMARC as if it had "
    "passed, forgeries included; p=quarantine once the reports show only your own mail)"
)


def _one_policy(records: list[str]) -> dmarc.Policy | None:
    """The policy these DMARC records (v=DMARC1 first) give a receiver, if any: that of
    exactly one, with a p= the inbound verifier's parser finds."""
    return dmarc.parse(records[0]) if len(records) == 1 else None


def _addresses(addresses: list[str]) -> str:
    """Addresses for a line: ours named, PROBES counted."""
    probes = sum(a in PROBES for a in addresses)
    named = [a for a in addresses if a not in PROBES]
    if probes:
        named.append(f"{probes} address{'es' if probes > 1 else ''} nobody sends from")
    return ", ".join(named)


class _Srv(NamedTuple):
    priority: int
    weight: int
    port: int
    target: str  # lower case, without the final dot; "" for "." (the service is not offered)


def _srv_entry(value: str) -> _Srv:
    """An SRV record's text (`priority weight port target`) read."""
    priority, weight, port, target = value.split()
    return _Srv(int(priority), int(weight), int(port), target.lower().rstrip("."))


def _srv_domain(name: str) -> str:
    """The domain of an SRV name (`_service._tcp.DOMAIN`)."""
    return name.split(".", 2)[2]


def _srv_shown(entry: _Srv) -> str:
    if not entry.target:  # (RFC 2782: "decidedly not available")
        return f"{entry.priority} {entry.weight} {entry.port} . (the service is not offered)"
    return f"{entry.priority} {entry.weight} {entry.port} {entry.target}"


def _mx_entry(value: str) -> tuple[int, str]:
    """(preference, host) of an MX record's text; the host "" for a null MX."""
    preference, _, name = value.partition(" ")
    return int(preference), name.strip().lower().rstrip(".")

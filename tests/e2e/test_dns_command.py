"""`mailerd dns` (issue #15): the records to publish for the local domains, and `--check`.

The config has two local domains (example.org with an RSA and an Ed25519 key, example.net with
an RSA key), hostname mx.example.org and a network listener on 192.0.2.25 and [2001:db8::25]
(documentation addresses: `mailerd dns` only reads them, nothing binds or connects to them).

The printed output is read as a zone file (tests/dnsserver.py's reader, dnspython's): every
line that is not a `;` comment must be one record, with absolute names, and the set of records
must be exactly what the contract asks for. `--check` is run against an in-process
`DNSServer(Records(zone))` that the config's `dns-server` names: first with the printed output
as the zone (what an operator pastes must pass), then with one thing wrong or missing at a
time. A `--check` line is read as `STATUS ... OWNER ... TYPE ...`: the status first, then the
first word containing a dot is the record's owner and the first record-type word its type.

Some tests give the config a `relayhost` (RELAY, whose A/AAAA only the test DNS server knows)
or `outbound-ip = ipv4`; those change which SPF, A/AAAA and PTR records are wanted (`wanted`'s
`spf` and `ptr_addresses`). The last ones give it submission listeners, which add SRV records
(`srv_records`), and TLS certificates, whose --check lines (`STATUS host certificate ...`) are
read apart from the records' (`certificate_lines`); `mailerd dns` trusts the test CA (`pki`),
never the machine's CA certificates.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import certs
import dns.rdatatype
import dns.reversename
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dnsserver import DNSServer, Records

from .conftest import REPO

HOSTNAME = "mx.example.org"
V4 = "192.0.2.25"
V6 = "2001:db8::25"
OTHER_HOST = "other.example.net"
RELAY = "relay.example.com"
RELAY_ADDRESSES = ("198.51.100.7", "2001:db8:1::7")
SPF = "v=spf1 mx -all"
HELO_SPF = "v=spf1 a -all"  # the host name's, for bounces (MAIL FROM <>: the HELO is checked)
TYPES = ("MX", "A", "AAAA", "TXT", "PTR", "SRV")
STATUSES = ("OK", "MISSING", "WRONG", "UNKNOWN")
RUN_TIMEOUT = 60.0

Rec = tuple[str, str, str]  # (owner without the final dot, TYPE, normalised value)


# --------------------------------------------------------------------------------------------
# Keys, config, running the command
# --------------------------------------------------------------------------------------------


def openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=120)


def public_record(path: Path) -> str:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    path: Path

    @property
    def owner(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def spec(self) -> str:
        return f"{self.domain}:{self.selector}:{self.path}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> list[Key]:
    d = tmp_path_factory.mktemp("dnskeys")
    r_org, e_org, r_net, other = (d / n for n in ("org-rsa.key", "org-ed.key", "net.key", "x.key"))
    for path in (r_org, r_net, other):
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path)
    openssl("genpkey", "-algorithm", "ed25519", "-out", e_org)
    return [
        Key("example.org", "r2026", r_org),
        Key("example.org", "e2026", e_org),
        Key("example.net", "n2026", r_net),
    ]


@pytest.fixture(scope="module")
def other_rsa(keys: list[Key]) -> Path:
    return keys[0].path.parent / "x.key"


@pytest.fixture(scope="module", autouse=True)
def pki(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The TLS certificates: a test CA that `mailerd dns` trusts in place of the machine's
    (SSL_CERT_FILE, and an empty SSL_CERT_DIR: OpenSSL's default trust anchors), an intermediate
    CA under it (as Let's Encrypt's are), and a certificate for HOSTNAME with its full chain."""
    global PKI
    base = tmp_path_factory.mktemp("pki")
    ca = certs.make_ca(base / "ca")
    mid = ca.intermediate()
    (base / "nothing").mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SSL_CERT_FILE", str(ca.cert))
        env.setenv("SSL_CERT_DIR", str(base / "nothing"))
        PKI = SimpleNamespace(
            ca=ca, mid=mid, good=mid.full_chain(mid.issue(HOSTNAME, kind="ecdsa")), base=base
        )
        yield PKI
    PKI = None


PKI: SimpleNamespace | None = None


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    server = DNSServer(Records())
    server.start()
    yield server
    server.stop()


def write_config(
    path: Path,
    keys: list[Key],
    dns: DNSServer,
    *,
    listen: str = f"{V4}:25, [{V6}]:25",
    more: str = "",
    hostname: str = HOSTNAME,
    domains: str = "example.org, example.net",
) -> Path:
    path.write_text(
        "[mailerd]\n"
        f"domain = {domains}\n"
        f"hostname = {hostname}\n"
        f"listen-network = {listen}\n"
        f"dkim-key = {', '.join(k.spec for k in keys)}\n"
        f"dns-server = {dns.host}:{dns.port}\n"
        "dns-timeout = 2s\n" + more
    )
    return path


def mailerd_dns(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", "mailerd", "dns", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`mailerd dns {' '.join(args)}` did not finish in {timeout}s: {exc}")


@pytest.fixture
def conf(tmp_path: Path, keys: list[Key], dns_server: DNSServer) -> Path:
    return write_config(tmp_path / "mailerd.conf", keys, dns_server)


# --------------------------------------------------------------------------------------------
# Records: what is wanted, what was printed
# --------------------------------------------------------------------------------------------


def _normal_txt(value: str) -> str:
    """DKIM key records compare by v, k and p (spacing aside); other TXT values as they are."""
    if not value.startswith("v=DKIM1"):
        return value
    tags = {}
    for part in value.split(";"):
        k, _, v = part.partition("=")
        if k.strip():
            tags[k.strip()] = re.sub(r"\s+", "", v)
    return f"v=DKIM1; k={tags.get('k', 'rsa')}; p={tags.get('p', '')}"


def wanted(
    keys: list[Key],
    domains=("example.org", "example.net"),
    addresses=(V4, V6),
    *,
    ptr_addresses=None,
    spf: str = SPF,
    helo_spf: bool = True,
) -> set[Rec]:
    """The records to publish: A/AAAA for `addresses`, PTR for `ptr_addresses` (default: the
    same ones), the host name's SPF with `helo_spf` (not with a relayhost)."""
    out: set[Rec] = set()
    for d in domains:
        out.add((d, "MX", f"10 {HOSTNAME}"))
        out.add((d, "TXT", spf))
        out.add((f"_dmarc.{d}", "TXT", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{d}"))
        for k in keys:
            if k.domain == d:
                out.add((k.owner, "TXT", _normal_txt(public_record(k.path))))
    if helo_spf:
        out.add((HOSTNAME, "TXT", HELO_SPF))
    for a in addresses:
        ip = ipaddress.ip_address(a)
        out.add((HOSTNAME, "A" if ip.version == 4 else "AAAA", ip.compressed))
    for a in addresses if ptr_addresses is None else ptr_addresses:
        out.add((reverse(a), "PTR", HOSTNAME))
    return out


def reverse(address: str) -> str:
    return dns.reversename.from_address(address).to_text().rstrip(".")


def _records_of(text: str) -> list[Rec]:
    out = []
    for name, node in Records(text).zone.items():
        owner = name.to_text().rstrip(".").lower()
        for rdataset in node:
            rtype = dns.rdatatype.to_text(rdataset.rdtype)
            for r in rdataset:
                if rtype == "MX":
                    value = f"{r.preference} {r.exchange.to_text().rstrip('.').lower()}"
                elif rtype == "TXT":
                    value = _normal_txt(b"".join(r.strings).decode())
                elif rtype in ("A", "AAAA"):
                    value = ipaddress.ip_address(r.address).compressed
                elif rtype == "PTR":
                    value = r.target.to_text().rstrip(".").lower()
                elif rtype == "SRV":
                    target = r.target.to_text().rstrip(".").lower()
                    value = f"{r.priority} {r.weight} {r.port} {target}"
                else:
                    value = r.to_text()
                out.append((owner, rtype, value))
    return out


def printed_records(stdout: str) -> list[Rec]:
    """Each non-comment line as one record (zone-file text, absolute names)."""
    out = []
    for line in stdout.splitlines():
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        recs = _records_of(line)
        assert len(recs) == 1, f"not one record on this line: {line!r} → {recs}"
        assert line.split()[0].endswith("."), f"owner name not absolute (no final dot): {line!r}"
        owner, rtype, _ = recs[0]
        if rtype in ("MX", "PTR", "SRV"):
            assert line.rstrip().endswith("."), f"{rtype} target not absolute: {line!r}"
        out.append(recs[0])
    return out


def zone_text(records: set[Rec] | list[Rec]) -> str:
    lines = []
    for owner, rtype, value in sorted(records):
        if rtype == "TXT":
            data = value.encode()
            value = " ".join(
                '"' + data[i : i + 255].decode() + '"' for i in range(0, len(data), 255)
            )
        elif rtype in ("MX", "PTR", "SRV"):
            value = value + "."
        lines.append(f"{owner}. {rtype} {value}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# --check lines
# --------------------------------------------------------------------------------------------


@dataclass
class CheckLine:
    status: str
    owner: str
    rtype: str
    text: str


def check_lines(stdout: str) -> list[CheckLine]:
    """The lines on records (those on the certificate: `certificate_lines`)."""
    out = []
    for line in stdout.splitlines():
        if not line.strip() or line.lstrip().startswith(";") or _on_certificate(line):
            continue
        words = line.split()
        status = words[0].rstrip(":").upper()
        assert status in STATUSES, f"a --check line must start with one of {STATUSES}: {line!r}"
        owner = next((w for w in words[1:] if "." in w), None)
        rtype = next((w.upper() for w in words[1:] if w.upper() in TYPES), None)
        assert owner and rtype, f"no owner or type in {line!r}"
        out.append(CheckLine(status, owner.rstrip(".:").lower(), rtype, line))
    return out


def _on_certificate(line: str) -> bool:
    words = line.split()
    return len(words) > 2 and words[2].rstrip(":") == "certificate"


def certificate_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if _on_certificate(line)]


def run_check(conf: Path, dns: DNSServer, zone: str, *extra: str) -> tuple[int, list[CheckLine]]:
    dns.records = Records(zone)
    p = mailerd_dns("-c", str(conf), "--check", *extra)
    assert p.returncode is not None
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, check_lines(p.stdout)


def index(lines: list[CheckLine]) -> dict[tuple[str, str], list[CheckLine]]:
    out: dict[tuple[str, str], list[CheckLine]] = {}
    for line in lines:
        out.setdefault((line.owner, line.rtype), []).append(line)
    return out


def shown(lines: list[CheckLine]) -> str:
    return "\n".join(line.text for line in lines)


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def test_prints_every_record(conf: Path, keys: list[Key], dns_server: DNSServer):
    """MX, A/AAAA of the hostname, SPF, each DKIM key, DMARC and PTR: exactly those, as zone
    file lines an operator can paste; and printing asks the DNS nothing."""
    asked_before = len(dns_server.queries)
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    got = printed_records(p.stdout)
    assert set(got) == wanted(keys), (
        f"missing: {sorted(wanted(keys) - set(got))}\nextra: {sorted(set(got) - wanted(keys))}"
        f"\n--- output ---\n{p.stdout}"
    )
    assert len(dns_server.queries) == asked_before, f"printing asked: {dns_server.queries}"


def test_dkim_records_are_split_at_255(conf: Path, keys: list[Key]):
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, p
    for k in keys:
        line = next(ln for ln in p.stdout.splitlines() if ln.split()[:1] == [f"{k.owner}."])
        strings = re.findall(r'"([^"\\]*)"', line)
        assert strings and all(len(s.encode()) <= 255 for s in strings), line
        assert _normal_txt("".join(strings)) == _normal_txt(public_record(k.path)), line


def test_only_the_domains_asked_for(conf: Path, keys: list[Key]):
    p = mailerd_dns("-c", str(conf), "example.net")
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    got = set(printed_records(p.stdout))
    want = wanted(keys, domains=("example.net",))
    assert got == want, f"missing {sorted(want - got)}, extra {sorted(got - want)}\n{p.stdout}"


def test_outbound_ip_ipv4_leaves_out_the_ipv6_ptr(tmp_path: Path, keys: list[Key], dns_server):
    """`outbound-ip = ipv4`: no mail leaves from the IPv6 address, so it wants no PTR, but the
    IPv6 listener still receives mail, so the host name keeps its AAAA; the check asks for
    what is printed."""
    conf = write_config(tmp_path / "v4.conf", keys, dns_server, more="outbound-ip = ipv4\n")
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, p
    got = set(printed_records(p.stdout))
    want = wanted(keys, ptr_addresses=(V4,))
    assert got == want, f"missing {sorted(want - got)}, extra {sorted(got - want)}\n{p.stdout}"
    rc, lines = run_check(conf, dns_server, p.stdout)
    assert [ln for ln in lines if ln.status != "OK"] == [] and rc == 0, shown(lines)
    assert Counter((ln.owner, ln.rtype) for ln in lines) == Counter((o, t) for o, t, _ in want)


def _is_record(line: str, owner: str, rtype: str) -> bool:
    """Is the line an `rtype` record at `owner` (".SUFFIX": any name below it)?"""
    if not line.strip() or line.lstrip().startswith(";"):
        return False
    o, t, _ = _records_of(line)[0]
    return t == rtype and (o == owner or (owner.startswith(".") and o.endswith(owner)))


def comments_before(stdout: str, owner: str, rtype: str) -> str:
    """The `;` lines just above the first such record."""
    lines = stdout.splitlines()
    at = next((i for i, ln in enumerate(lines) if _is_record(ln, owner, rtype)), None)
    assert at is not None, f"no {owner} {rtype} record:\n{stdout}"
    block: list[str] = []
    for line in reversed(lines[:at]):
        if not line.lstrip().startswith(";"):
            break
        block.insert(0, line)
    return "\n".join(block)


def test_output_explains_dmarc_and_ptr(conf: Path, keys: list[Key]):
    """`;` comments (the output stays a zone file): why DMARC's p=quarantine, and where PTR
    records are set."""
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, p
    assert set(printed_records(p.stdout)) == wanted(keys)
    dmarc = comments_before(p.stdout, "_dmarc.example.org", "TXT")
    for word in ("quarantine", "spam", "postmaster", "p=reject"):
        assert word in dmarc, f"the DMARC comment should say {word!r}:\n{p.stdout}"
    ptr = comments_before(p.stdout, ".arpa", "PTR")
    assert re.search(r"(?i)provider", ptr) and re.search(r"Gmail|Outlook", ptr), p.stdout


def test_the_host_name_s_spf_is_explained_and_left_to_a_domain_of_that_name(
    tmp_path: Path, keys: list[Key], dns_server: DNSServer
):
    """Bounces leave with MAIL FROM <> and From: MAILER-DAEMON@HOST: receivers check the HELO
    name's SPF, so the host name gets `v=spf1 a -all`, with a comment saying why. When the host
    name is itself a local domain, its own SPF record serves (a second TXT record beginning
    v=spf1 at one name would make SPF permerror: RFC 7208 4.5)."""
    p = mailerd_dns("-c", str(write_config(tmp_path / "a.conf", keys, dns_server)))
    assert p.returncode == 0, p
    assert (HOSTNAME, "TXT", HELO_SPF) in printed_records(p.stdout), p.stdout
    why = comments_before(p.stdout, HOSTNAME, "TXT")
    assert "HELO" in why and f"MAILER-DAEMON@{HOSTNAME}" in why, p.stdout
    conf = write_config(
        tmp_path / "b.conf", keys, dns_server, domains=f"example.org, example.net, {HOSTNAME}"
    )
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, p
    host_txt = [r for r in printed_records(p.stdout) if r[:2] == (HOSTNAME, "TXT")]
    assert host_txt == [(HOSTNAME, "TXT", SPF)], p.stdout


def test_a_domain_no_key_signs_for_gets_a_note(tmp_path: Path, keys: list[Key], dns_server):
    """example.net without a key: its mail would leave unsigned, which nothing in the DNS
    can show, so a note says so and how to make one; example.org's keys, and a subdomain
    covered by them, get none. The exit status is not affected."""
    org_keys = [k for k in keys if k.domain == "example.org"]
    conf = write_config(
        tmp_path / "m.conf", org_keys, dns_server, domains="example.org, example.net, a.example.org"
    )
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, p
    notes = [ln for ln in p.stdout.splitlines() if ln.startswith("; no DKIM key")]
    assert notes == [
        "; no DKIM key for example.net: its mail goes out unsigned (make one with "
        "`mailerd dkim keygen example.net`)"
    ], p.stdout


def test_a_reader_that_stops_early_ends_it_quietly(conf: Path):
    """`mailerd dns | head -1`: no BrokenPipeError traceback, and the status a shell gives a
    program a closed pipe ended (an acceptance tester's finding: a traceback, status 1)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "mailerd", "dns", "-c", str(conf)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # (before it writes: every write meets the closed pipe)
    err = p.stderr.read()
    assert p.wait(timeout=RUN_TIMEOUT) == 128 + signal.SIGPIPE, err
    assert err == b""


def test_a_domain_that_is_not_local_is_refused(conf: Path, keys: list[Key]):
    """A DOMAIN that is not one of the configuration's: exit 2, naming it and the local
    domains, no records. A name below a local domain is local (a DKIM key may be for it)."""
    p = mailerd_dns("-c", str(conf), "example.org", "other.net")
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    for name in ("other.net", "example.org", "example.net"):
        assert name in p.stderr, f"the refusal should name {name}: {p.stderr!r}"
    assert printed_records(p.stdout) == [], p.stdout
    sub = mailerd_dns("-c", str(conf), "news.example.org")
    assert sub.returncode == 0, f"exit {sub.returncode}\n{sub.stdout}\n{sub.stderr}"
    assert ("news.example.org", "MX", f"10 {HOSTNAME}") in printed_records(sub.stdout)


@pytest.mark.parametrize(
    "hostname",
    [
        pytest.param("localhost", id="localhost"),
        pytest.param("mailhost", id="no-dot"),
        pytest.param("localhost.localdomain", id="unlisted-suffix"),
        pytest.param("co.uk", id="public-suffix"),
    ],
)
@pytest.mark.parametrize("check", [False, True], ids=["print", "check"])
def test_a_host_name_the_world_cannot_look_up_is_refused(
    tmp_path: Path, keys: list[Key], dns_server: DNSServer, hostname: str, check: bool
):
    """No `hostname` in the config and an FQDN without a dot made `example.org. IN MX 10
    localhost.` and PTRs naming localhost, exit 0: now exit 1, one line saying why and to set
    `hostname =`, and no records (nor a check of them)."""
    conf = write_config(tmp_path / "mailerd.conf", keys, dns_server, hostname=hostname)
    p = mailerd_dns("-c", str(conf), *(["--check"] if check else []))
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert hostname in p.stderr and "hostname = " in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert printed_records(p.stdout) == [] and "OK" not in p.stdout, p.stdout


def test_no_domain_to_publish_says_how_to_give_one(tmp_path: Path, dns_server: DNSServer):
    """Only localhost among the local domains: exit 1, and the advice names the config file's
    `domain =` (`mailerd dns` has no -d)."""
    conf = write_config(tmp_path / "mailerd.conf", [], dns_server, domains="localhost")
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "domain = " in p.stderr and "-d" not in p.stderr, p.stderr
    assert printed_records(p.stdout) == [], p.stdout


@pytest.fixture
def relay_conf(tmp_path: Path, keys: list[Key], dns_server: DNSServer) -> Path:
    return write_config(tmp_path / "relay.conf", keys, dns_server, more=f"relayhost = {RELAY}\n")


RELAY_SPF = f"v=spf1 mx a:{RELAY} -all"
RELAY_RECORDS = {(RELAY, "A", RELAY_ADDRESSES[0]), (RELAY, "AAAA", RELAY_ADDRESSES[1])}


def test_relayhost_spf_names_it_and_no_ptr(relay_conf: Path, keys: list[Key]):
    """With a relayhost mail leaves through it: SPF `mx a:RELAY`, explained (a provider's
    include is better); no PTR records, and a comment says why; A/AAAA stay (for receiving)."""
    p = mailerd_dns("-c", str(relay_conf))
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    got = set(printed_records(p.stdout))
    want = wanted(keys, ptr_addresses=(), spf=RELAY_SPF, helo_spf=False)
    assert got == want, f"missing {sorted(want - got)}, extra {sorted(got - want)}\n{p.stdout}"
    spf = comments_before(p.stdout, "example.org", "TXT")
    assert RELAY in spf and "include" in spf, f"the SPF comment:\n{p.stdout}"
    notes = [ln for ln in p.stdout.splitlines() if ln.startswith(";")]
    assert any("PTR" in ln and RELAY in ln for ln in notes), f"no word on PTR:\n{p.stdout}"


def test_relayhost_check_tries_the_relays_addresses(relay_conf: Path, keys: list[Key], dns_server):
    """--check with a relayhost: SPF must pass the relay's A/AAAA (looked up through the
    configured DNS server); passing ours is not enough. No PTR is asked for."""
    want = wanted(keys, ptr_addresses=(), spf=RELAY_SPF, helo_spf=False)
    rc, lines = run_check(relay_conf, dns_server, zone_text(want | RELAY_RECORDS))
    assert [ln for ln in lines if ln.status != "OK"] == [] and rc == 0, shown(lines)
    assert Counter((ln.owner, ln.rtype) for ln in lines) == Counter((o, t) for o, t, _ in want)
    ours_only = _replace("example.org", "TXT", SPF)(want) | RELAY_RECORDS
    rc, lines = run_check(relay_conf, dns_server, zone_text(ours_only))
    spf = index(lines)[("example.org", "TXT")]
    assert [ln.status for ln in spf] == ["WRONG"], shown(lines)
    assert RELAY_ADDRESSES[0] in spf[0].text, spf[0].text
    assert [ln for ln in lines if ln.status != "OK" and ln not in spf] == [], shown(lines)
    assert rc == 1, shown(lines)
    relay_only = _replace("example.org", "TXT", f"v=spf1 a:{RELAY} -all")(want) | RELAY_RECORDS
    rc, lines = run_check(relay_conf, dns_server, zone_text(relay_only))
    assert [ln for ln in lines if ln.status != "OK"] == [] and rc == 0, (
        f"our own addresses send nothing: SPF need not pass them\n{shown(lines)}"
    )


def test_spf_published_as_wanted_but_not_passing_says_so(conf: Path, keys: list[Key], dns_server):
    """The SPF text is as wanted, but the host has no A: the line says so plainly rather than
    showing the same record as published and wanted."""
    rc, lines = run_check(conf, dns_server, zone_text(_replace(HOSTNAME, "A")(wanted(keys))))
    line = index(lines)[("example.org", "TXT")][0]
    assert line.status == "WRONG", shown(lines)
    assert "as wanted" in line.text and V4 in line.text, line.text
    assert line.text.count(SPF) < 2, f"the same record shown twice: {line.text}"
    assert rc == 1


def test_null_mx_is_shown_as_one(conf: Path, keys: list[Key], dns_server):
    """`MX 0 .` is published, not nothing: the line says it is a null MX."""
    zone = zone_text(_replace("example.org", "MX")(wanted(keys))) + "example.org. MX 0 .\n"
    rc, lines = run_check(conf, dns_server, zone)
    line = index(lines)[("example.org", "MX")][0]
    assert line.status == "WRONG" and "null MX" in line.text, line.text
    assert rc == 1


def test_an_mx_naming_an_alias_is_wrong(conf: Path, keys: list[Key], dns_server):
    """The hostname published as a CNAME of the provider's name for the machine (which has
    the right addresses): mail arrives and the A/AAAA and PTR checks pass through the alias,
    but an MX must not name an alias (RFC 2181 10.3), so the MX lines say so."""
    machine = "vps123.provider.example"
    want = _replace(HOSTNAME, "A")(_replace(HOSTNAME, "AAAA")(wanted(keys)))
    # (no other record may stand beside a CNAME: the host name's SPF goes with the machine)
    want = _replace(HOSTNAME, "TXT")(want)
    want |= {(machine, "A", V4), (machine, "AAAA", V6), (machine, "TXT", HELO_SPF)}
    zone = zone_text(want) + f"{HOSTNAME}. CNAME {machine}.\n"
    rc, lines = run_check(conf, dns_server, zone)
    for domain in ("example.org", "example.net"):
        line = index(lines)[(domain, "MX")][0]
        assert line.status == "WRONG" and "CNAME" in line.text and machine in line.text, line
    assert {ln.status for ln in lines if ln.rtype != "MX"} == {"OK"}, shown(lines)
    assert rc == 1


def test_loopback_listener_is_no_outbound_address(tmp_path: Path, keys: list[Key], dns_server):
    """Only loopback network listeners: no address to publish A/AAAA/PTR for, and it says so."""
    conf = write_config(tmp_path / "lo.conf", keys, dns_server, listen="127.0.0.1:2525, [::1]:2525")
    p = mailerd_dns("-c", str(conf))
    assert p.returncode is not None and "Traceback" not in p.stderr, p
    got = set(printed_records(p.stdout))
    want = wanted(keys, addresses=())
    assert got == want, (
        f"loopback is no outbound address: missing {sorted(want - got)}, "
        f"extra {sorted(got - want)}\n{p.stdout}"
    )
    notes = [
        ln
        for ln in (p.stdout + "\n" + p.stderr).splitlines()
        if ln.strip() and (ln.lstrip().startswith(";") or ln in p.stderr)
    ]
    assert any(re.search(r"(?i)outbound|address|loopback", ln) for ln in notes), (
        f"it should say there is no outbound address:\n{p.stdout}\n{p.stderr}"
    )


# --------------------------------------------------------------------------------------------
# --check
# --------------------------------------------------------------------------------------------


def test_check_passes_on_the_printed_records(conf: Path, keys: list[Key], dns_server):
    """What `mailerd dns` prints, published as is, passes `mailerd dns --check`: exit 0, one
    OK line per record."""
    printed = mailerd_dns("-c", str(conf))
    assert printed.returncode == 0, printed
    rc, lines = run_check(conf, dns_server, printed.stdout)
    assert [ln for ln in lines if ln.status != "OK"] == [], shown(lines)
    assert rc == 0, f"exit {rc}\n{shown(lines)}"
    got = Counter((ln.owner, ln.rtype) for ln in lines)
    want = Counter((o, t) for o, t, _ in wanted(keys))
    assert got == want, f"lines {sorted(got.items())}\nrecords {sorted(want.items())}"


def _replace(owner: str, rtype: str, *values: str) -> Callable[[set[Rec]], set[Rec]]:
    def change(records: set[Rec]) -> set[Rec]:
        kept = {r for r in records if (r[0], r[1]) != (owner, rtype)}
        return kept | {(owner, rtype, v) for v in values}

    return change


def _edit(owner: str, rtype: str, how: Callable[[str], str]) -> Callable[[set[Rec]], set[Rec]]:
    """Each record at (owner, rtype) with its value changed by `how`."""

    def change(records: set[Rec]) -> set[Rec]:
        return {(o, t, how(v) if (o, t) == (owner, rtype) else v) for o, t, v in records}

    return change


def _plus(*extra: Rec, then: Callable[[set[Rec]], set[Rec]] | None = None):
    def change(records: set[Rec]) -> set[Rec]:
        return (then(records) if then else records) | set(extra)

    return change


OTHER_HOST_RECORDS = ((OTHER_HOST, "A", V4), (OTHER_HOST, "AAAA", V6))
STRANGER = "mx.elsewhere.example"  # another server altogether
STRANGER_RECORDS = ((STRANGER, "A", "203.0.113.25"),)
NOT_OK = "WRONG or MISSING"


@dataclass
class Case:
    change: Callable[..., set[Rec]]
    expect: dict[tuple[str, str], str]  # (owner, type) → status; all other lines OK
    mentions: tuple[str, ...] = ()  # words the first expected line must show


ORG_DKIM = "r2026._domainkey.example.org"  # the RSA key's
ORG_ED25519 = "e2026._domainkey.example.org"


def _cases(other_rsa: Path) -> dict[str, Case]:
    org_dkim = ORG_DKIM
    return {
        # MX to another host (which has our addresses, so SPF `mx` still passes)
        "mx-other-host": Case(
            _plus(*OTHER_HOST_RECORDS, then=_replace("example.org", "MX", f"10 {OTHER_HOST}")),
            {("example.org", "MX"): "WRONG"},
            (OTHER_HOST, HOSTNAME),
        ),
        # (a helper's pass as operators: each of these four was OK, exit 0)
        # ours only as a backup: senders try the lower preference first (RFC 5321 5.1)
        "mx-backup-only": Case(
            _plus(*STRANGER_RECORDS, ("example.org", "MX", f"5 {STRANGER}")),
            {("example.org", "MX"): "WRONG"},
            ("backup", STRANGER),
        ),
        # another server at the same preference: it gets part of the mail
        "mx-shared": Case(
            _plus(*STRANGER_RECORDS, ("example.org", "MX", f"10 {STRANGER}")),
            {("example.org", "MX"): "WRONG"},
            (STRANGER, "part of the mail"),
        ),
        # an old server's address left beside ours: senders try it too
        "a-extra": Case(
            _plus((HOSTNAME, "A", "203.0.113.50")),
            {(HOSTNAME, "A"): "WRONG"},
            ("203.0.113.50",),
        ),
        "dkim-testing-mode": Case(  # (RFC 6376 3.6.1: receivers treat it as unsigned)
            _edit(org_dkim, "TXT", lambda v: v.replace("k=rsa;", "k=rsa; t=y;")),
            {(org_dkim, "TXT"): "WRONG"},
            ("t=y",),
        ),
        "mx-missing": Case(
            _replace("example.org", "MX"),
            {("example.org", "MX"): "MISSING", ("example.org", "TXT"): NOT_OK},
        ),
        # no A: SPF `mx` no longer passes 192.0.2.25, nor does the PTR's forward check
        "no-a": Case(
            _replace(HOSTNAME, "A"),
            {
                (HOSTNAME, "A"): "MISSING",
                ("example.org", "TXT"): NOT_OK,
                ("example.net", "TXT"): NOT_OK,
                (HOSTNAME, "TXT"): NOT_OK,
                (reverse(V4), "PTR"): NOT_OK,
            },
        ),
        "spf-all-only": Case(
            _replace("example.org", "TXT", "v=spf1 -all"),
            {("example.org", "TXT"): "WRONG"},
            ("v=spf1 -all",),
        ),
        # our addresses pass, and so does anyone's
        "spf-plus-all": Case(
            _replace("example.org", "TXT", "v=spf1 +all"),
            {("example.org", "TXT"): "WRONG"},
            ("any host",),
        ),
        "spf-redirect-to-all": Case(
            _plus(
                ("_spf.example.org", "TXT", "v=spf1 +all"),
                then=_replace("example.org", "TXT", "v=spf1 mx redirect=_spf.example.org"),
            ),
            {("example.org", "TXT"): "WRONG"},
            ("any host",),
        ),
        "spf-missing": Case(_replace("example.net", "TXT"), {("example.net", "TXT"): "MISSING"}),
        "dkim-other-key": Case(
            _replace(org_dkim, "TXT", _normal_txt(public_record(other_rsa))),
            {(org_dkim, "TXT"): "WRONG"},
        ),
        # the right p=, but a tag that keeps receivers from verifying with it
        "dkim-k-other-type": Case(
            _edit(org_dkim, "TXT", lambda v: v.replace("k=rsa", "k=ed25519")),
            {(org_dkim, "TXT"): "WRONG"},
            ("k=",),
        ),
        "dkim-ed25519-without-k": Case(  # no k= means rsa
            _edit(ORG_ED25519, "TXT", lambda v: v.replace("k=ed25519; ", "")),
            {(ORG_ED25519, "TXT"): "WRONG"},
            ("k=",),
        ),
        "dkim-h-sha1": Case(
            _edit(org_dkim, "TXT", lambda v: v.replace("k=rsa;", "k=rsa; h=sha1;")),
            {(org_dkim, "TXT"): "WRONG"},
            ("h=",),
        ),
        "dkim-v-other": Case(
            _edit(org_dkim, "TXT", lambda v: v.replace("v=DKIM1", "v=DKIM2")),
            {(org_dkim, "TXT"): "WRONG"},
            ("v=",),
        ),
        # as strict as dkimpy (mailerd's own verifier) is
        "dkim-v-lower-case": Case(
            _edit(org_dkim, "TXT", lambda v: v.replace("v=DKIM1", "v=dkim1")),
            {(org_dkim, "TXT"): "WRONG"},
            ("v=",),
        ),
        "dkim-k-upper-case": Case(
            _edit(org_dkim, "TXT", lambda v: v.replace("k=rsa", "k=RSA")),
            {(org_dkim, "TXT"): "WRONG"},
            ("k=",),
        ),
        "dkim-s-not-email": Case(
            _edit(org_dkim, "TXT", lambda v: v.replace("k=rsa;", "k=rsa; s=tlsrpt;")),
            {(org_dkim, "TXT"): "WRONG"},
            ("s=",),
        ),
        "dkim-tag-twice": Case(  # (RFC 6376 3.2: the whole list is invalid)
            _edit(org_dkim, "TXT", lambda v: v + "; p=AAAA"),
            {(org_dkim, "TXT"): "WRONG"},
            ("invalid",),
        ),
        "dkim-two-records": Case(
            _plus((org_dkim, "TXT", "v=DKIM1; k=rsa; p=garbage")),
            {(org_dkim, "TXT"): "WRONG"},
            ("several",),
        ),
        "spf-wide-ranges": Case(  # our addresses pass, and so does nearly everyone's
            _replace(
                "example.org",
                "TXT",
                "v=spf1 ip4:0.0.0.0/1 ip4:128.0.0.0/2 ip4:192.0.0.0/3 ip6:2000::/3 -all",
            ),
            {("example.org", "TXT"): "WRONG"},
            ("any host",),
        ),
        "dkim-missing": Case(
            _replace("e2026._domainkey.example.org", "TXT"),
            {("e2026._domainkey.example.org", "TXT"): "MISSING"},
        ),
        "dmarc-missing": Case(
            _replace("_dmarc.example.org", "TXT"), {("_dmarc.example.org", "TXT"): "MISSING"}
        ),
        "dmarc-without-p": Case(
            _replace("_dmarc.example.org", "TXT", "v=DMARC1; pct=100"),
            {("_dmarc.example.org", "TXT"): NOT_OK},
        ),
        # PTR naming another host (whose A is our address: only the name is wrong)
        "ptr-other-name": Case(
            _plus(*OTHER_HOST_RECORDS, then=_replace(reverse(V4), "PTR", OTHER_HOST)),
            {(reverse(V4), "PTR"): "WRONG"},
            (OTHER_HOST,),
        ),
        # PTR names the hostname, but the hostname's A is another address
        "ptr-forward-mismatch": Case(
            _replace(HOSTNAME, "A", "192.0.2.99"),
            {
                (reverse(V4), "PTR"): "WRONG",
                (HOSTNAME, "A"): "WRONG",
                ("example.org", "TXT"): NOT_OK,
                ("example.net", "TXT"): NOT_OK,
                (HOSTNAME, "TXT"): NOT_OK,
            },
        ),
        "ptr-missing": Case(_replace(reverse(V6), "PTR"), {(reverse(V6), "PTR"): "MISSING"}),
        # a second name beside ours (an old one, the provider's default): receivers take either
        "ptr-two-names": Case(
            _plus(*OTHER_HOST_RECORDS, (reverse(V4), "PTR", OTHER_HOST)),
            {(reverse(V4), "PTR"): "WRONG"},
            (OTHER_HOST, f"keep only {HOSTNAME}"),
        ),
        # (an acceptance tester's finding: without it a bounce, MAIL FROM <>, failed DMARC)
        "helo-spf-missing": Case(_replace(HOSTNAME, "TXT"), {(HOSTNAME, "TXT"): "MISSING"}),
        "helo-spf-all-only": Case(
            _replace(HOSTNAME, "TXT", "v=spf1 -all"),
            {(HOSTNAME, "TXT"): "WRONG"},
            ("v=spf1 -all", "HELO"),
        ),
    }


BROKEN = [  # the keys of _cases (which needs the keys to be made first)
    "mx-other-host", "mx-backup-only", "mx-shared", "a-extra", "dkim-testing-mode",
    "mx-missing", "no-a", "spf-all-only", "spf-plus-all", "spf-redirect-to-all",
    "spf-missing", "dkim-other-key", "dkim-k-other-type", "dkim-ed25519-without-k", "dkim-h-sha1",
    "dkim-v-other", "dkim-v-lower-case", "dkim-k-upper-case", "dkim-s-not-email", "dkim-tag-twice",
    "dkim-two-records", "spf-wide-ranges", "dkim-missing", "dmarc-missing", "dmarc-without-p",
    "ptr-other-name", "ptr-forward-mismatch", "ptr-missing", "ptr-two-names", "helo-spf-missing",
    "helo-spf-all-only",
]  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_check_finds_what_is_wrong(conf: Path, keys: list[Key], other_rsa, dns_server, case):
    c = _cases(other_rsa)[case]
    zone = zone_text(c.change(wanted(keys)))
    rc, lines = run_check(conf, dns_server, zone)
    by = index(lines)
    for (owner, rtype), status in c.expect.items():
        got = by.get((owner, rtype))
        assert got, f"{case}: no line for {owner} {rtype}:\n{shown(lines)}"
        for line in got:
            if status == NOT_OK:
                assert line.status != "OK", f"{case}: {line.text}\n--- all ---\n{shown(lines)}"
            else:
                assert line.status == status, (
                    f"{case}: expected {status}: {line.text}\n--- all ---\n{shown(lines)}"
                )
    first = by[next(iter(c.expect))][0]
    for word in c.mentions:
        assert word in first.text, f"{case}: the line should show {word!r}: {first.text}"
    others = [ln for ln in lines if (ln.owner, ln.rtype) not in c.expect and ln.status != "OK"]
    assert others == [], f"{case}: only {list(c.expect)} may fail:\n{shown(lines)}"
    assert Counter((ln.owner, ln.rtype) for ln in lines) == Counter(
        (o, t) for o, t, _ in wanted(keys)
    ), f"{case}: one line per record to publish:\n{shown(lines)}"
    assert rc == 1, f"{case}: exit {rc}, expected 1\n{shown(lines)}"


@pytest.mark.parametrize(
    "case, change",
    [
        pytest.param(
            "dmarc-p-none",
            _replace("_dmarc.example.org", "TXT", "v=DMARC1; p=none"),
            id="dmarc-p-none",
        ),
        pytest.param(
            "dmarc-spaced",
            _replace("_dmarc.example.org", "TXT", "v = DMARC1 ; p = quarantine"),
            id="dmarc-spaced",
        ),
        pytest.param(
            "dmarc-upper-case-v",
            _replace("_dmarc.example.org", "TXT", "V=DMARC1; p=quarantine"),
            id="dmarc-upper-case-v",
        ),
        pytest.param(
            "dkim-p-only",  # v= and k= may be left out (k=rsa is the default)
            _edit(ORG_DKIM, "TXT", lambda v: "p=" + v.partition("p=")[2]),
            id="dkim-p-only",
        ),
        pytest.param(
            "dkim-more-tags",  # h= listing sha256, t=s (our i= is d='s own), s=email
            _edit(
                ORG_DKIM,
                "TXT",
                lambda v: v.replace(
                    "v=DKIM1; k=rsa;", "v=DKIM1; k=rsa; h=sha1:sha256; t=s; s=email;"
                ),
            ),
            id="dkim-more-tags",
        ),
        pytest.param(
            "spf-by-ranges",
            _replace("example.org", "TXT", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"),
            id="spf-by-ranges",
        ),
        pytest.param(
            "mx-backup-elsewhere",  # a backup MX at another server: ours is tried first
            _plus(*STRANGER_RECORDS, ("example.org", "MX", f"20 {STRANGER}")),
            id="mx-backup-elsewhere",
        ),
        pytest.param(
            "mx-two-names-one-server",  # another name at the same preference, our addresses
            _plus(*OTHER_HOST_RECORDS, ("example.org", "MX", f"10 {OTHER_HOST}")),
            id="mx-two-names-one-server",
        ),
        pytest.param(
            "spf-among-other-txt",
            _plus(("example.org", "TXT", "site-verification=abc123")),
            id="spf-among-other-txt",
        ),
    ],
)
def test_check_accepts_equivalent_records(conf: Path, keys: list[Key], dns_server, case, change):
    """DMARC: any valid v=DMARC1 with p= (as the inbound verifier reads it); SPF: any record
    giving pass for every address; DKIM: any record of the key that receivers can use."""
    rc, lines = run_check(conf, dns_server, zone_text(change(wanted(keys))))
    assert [ln for ln in lines if ln.status != "OK"] == [], f"{case}:\n{shown(lines)}"
    assert rc == 0, f"{case}: exit {rc}\n{shown(lines)}"


def test_check_says_what_dmarc_p_none_does(conf: Path, keys: list[Key], dns_server):
    """p=none is a policy, so it is OK, but the line says that it stops no forgery (it read
    as plain OK); the printed p=quarantine gets no such word."""
    change = _replace("_dmarc.example.org", "TXT", "v=DMARC1; p=none; rua=mailto:a@example.org")
    rc, lines = run_check(conf, dns_server, zone_text(change(wanted(keys))))
    (line,) = index(lines)[("_dmarc.example.org", "TXT")]
    assert line.status == "OK" and "p=none" in line.text and "forger" in line.text, line.text
    assert rc == 0, shown(lines)
    rc, lines = run_check(conf, dns_server, zone_text(wanted(keys)))
    (line,) = index(lines)[("_dmarc.example.org", "TXT")]
    assert line.status == "OK" and "forger" not in line.text, line.text


def test_check_is_bounded_by_dns_timeout(conf: Path, keys: list[Key], dns_server):
    """A name whose server never answers: `dns-timeout` (2s in the config) bounds the wait;
    that line is not OK, the others are, exit 1."""
    records = _replace("_dmarc.example.org", "TXT")(wanted(keys))
    zone = zone_text(records) + '_dmarc.example.org. TXT "dnsserver:timeout"\n'
    start = time.monotonic()
    rc, lines = run_check(conf, dns_server, zone)
    took = time.monotonic() - start
    assert took < 30, f"--check took {took:.1f}s with dns-timeout 2s"
    by = index(lines)
    assert [ln.status for ln in by[("_dmarc.example.org", "TXT")]] == ["UNKNOWN"], shown(lines)
    others = [ln for ln in lines if ln.owner != "_dmarc.example.org" and ln.status != "OK"]
    assert others == [], shown(lines)
    assert rc == 1, f"exit {rc}\n{shown(lines)}"


def test_check_asks_the_dns_server_given_on_the_command_line(
    tmp_path: Path, keys: list[Key], dns_server
):
    """`--dns-server` chooses the resolver for one check, over the config's (an operator's
    pass: checking against a given server needed the live config edited, while the check's
    own lines said to look at --dns-server)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    with silent:
        server = SimpleNamespace(host="127.0.0.1", port=silent.getsockname()[1])
        conf = write_config(tmp_path / "mailerd.conf", keys, server)  # type: ignore[arg-type]
        printed = mailerd_dns("-c", str(conf))
        assert printed.returncode == 0, printed
        given = f"{dns_server.host}:{dns_server.port}"
        rc, lines = run_check(conf, dns_server, printed.stdout, "--dns-server", given)
    assert lines and [ln for ln in lines if ln.status != "OK"] == [], shown(lines)
    assert rc == 0


def test_check_against_a_silent_dns_server_says_so_at_once(tmp_path: Path, keys: list[Key]):
    """A dns-server that never answers (a wrong address, a firewall): every record is
    UNKNOWN, with a short reason that points at the setting, in about one dns-timeout in all
    (it was WRONG, with dnspython's paragraph on each line, after 11.6 s per record: found by a
    tester), exit 1."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # (reads nothing, answers nothing)
    with silent:
        server = SimpleNamespace(host="127.0.0.1", port=silent.getsockname()[1])
        conf = write_config(tmp_path / "mailerd.conf", keys, server)  # type: ignore[arg-type]
        start = time.monotonic()
        p = mailerd_dns("-c", str(conf), "--check")
        took = time.monotonic() - start
    lines = check_lines(p.stdout)
    assert lines and {ln.status for ln in lines} == {"UNKNOWN"}, p.stdout
    assert all(len(ln.text) < 200 and "dns-server" in ln.text for ln in lines), p.stdout
    assert p.returncode == 1
    assert took < 12, f"--check took {took:.1f}s against a silent server, dns-timeout 2s"


def test_spf_whose_include_does_not_answer_is_unknown_at_once(
    conf: Path, keys: list[Key], dns_server
):
    """A provider's include that does not answer is a temperror (RFC 7208 2.6.6), not a wrong
    record: UNKNOWN, in about one dns-timeout (2 s here). It was WRONG, "not pass ...:
    temperror", telling the operator to remove the include, after one dns-timeout for each
    of the 8 addresses tried (a helper's pass: 81 s at the default 10 s)."""
    spf = "v=spf1 include:_spf.provider.example mx -all"
    records = _replace("example.org", "TXT", spf)(wanted(keys))
    zone = zone_text(records) + '_spf.provider.example. TXT "dnsserver:timeout"\n'
    start = time.monotonic()
    rc, lines = run_check(conf, dns_server, zone)
    took = time.monotonic() - start
    line = index(lines)[("example.org", "TXT")][0]
    assert line.status == "UNKNOWN" and "temperror" in line.text, shown(lines)
    others = [ln for ln in lines if ln is not line and ln.status != "OK"]
    assert others == [], shown(lines)
    assert rc == 1
    assert took < 9, f"--check took {took:.1f}s with dns-timeout 2s"


def test_a_subdomain_is_covered_by_its_organisational_domains_dmarc(
    tmp_path: Path, keys: list[Key], dns_server
):
    """Receivers fall back to the organisational domain's DMARC record (RFC 7489 6.6.3): a
    subdomain without its own is OK when that one is right (it was MISSING), and MISSING when
    neither has one."""
    conf = write_config(
        tmp_path / "sub.conf",
        [k for k in keys if k.domain == "example.org"],
        dns_server,
        domains="example.org, shop.example.org",
    )
    printed = mailerd_dns("-c", str(conf))
    assert printed.returncode == 0, printed
    records = set(printed_records(printed.stdout))
    own = ("_dmarc.shop.example.org", "TXT")
    covered = {r for r in records if (r[0], r[1]) != own}
    rc, lines = run_check(conf, dns_server, zone_text(covered))
    line = index(lines)[own][0]
    assert line.status == "OK" and "_dmarc.example.org" in line.text, shown(lines)
    assert rc == 0, shown(lines)
    bare = {r for r in covered if r[0] != "_dmarc.example.org"}
    rc, lines = run_check(conf, dns_server, zone_text(bare))
    assert [ln.status for ln in index(lines)[own]] == ["MISSING"], shown(lines)
    assert rc == 1


PRIVATE = "10.0.0.5"


def test_behind_a_nat_public_address_stands_for_the_listeners(
    tmp_path: Path, keys: list[Key], dns_server
):
    """At a cloud provider the machine's own address is private and the world reaches it at
    another (1:1 NAT): a helper's pass found no configuration that passed the check but one
    naming an address mailerd cannot listen on. `public-address` gives the world's
    addresses: the records name them, and the check passes on them."""
    conf = write_config(tmp_path / "nat.conf", keys, dns_server, listen=f"{PRIVATE}:25")
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, p
    assert re.search(rf"(?m)^; {re.escape(PRIVATE)} is private: .*public-address", p.stdout), (
        p.stdout
    )
    conf = write_config(
        tmp_path / "nat2.conf",
        keys,
        dns_server,
        listen=f"{PRIVATE}:25",
        more=f"public-address = {V4}, {V6}\n",
    )
    printed = mailerd_dns("-c", str(conf))
    assert printed.returncode == 0, printed
    assert set(printed_records(printed.stdout)) == wanted(keys), printed.stdout
    assert PRIVATE not in printed.stdout
    rc, lines = run_check(conf, dns_server, printed.stdout)
    assert [ln for ln in lines if ln.status != "OK"] == [], shown(lines)
    assert rc == 0


def test_public_address_replaces_only_the_addresses_behind_the_nat(
    tmp_path: Path, keys: list[Key], dns_server
):
    """A private IPv4 address and a public IPv6 one: public-address stands for the first; the
    second stays (it was dropped, with its AAAA, PTR and SPF unchecked: an attacker's pass)."""
    conf = write_config(
        tmp_path / "nat6.conf",
        keys,
        dns_server,
        listen=f"{PRIVATE}:25, [{V6}]:25",
        more=f"public-address = {V4}\n",
    )
    printed = mailerd_dns("-c", str(conf))
    assert printed.returncode == 0, printed
    assert set(printed_records(printed.stdout)) == wanted(keys), printed.stdout
    rc, lines = run_check(conf, dns_server, zone_text(_replace(HOSTNAME, "AAAA")(wanted(keys))))
    assert [ln.status for ln in index(lines)[(HOSTNAME, "AAAA")]] == ["MISSING"], shown(lines)
    assert rc == 1


def test_check_without_an_address_of_ours_is_not_ok(tmp_path: Path, keys: list[Key], dns_server):
    """Only loopback network listeners: nothing to compare the host's records, PTR and SPF
    with. It exited 0 with those never looked at; now a line says so, exit 1."""
    conf = write_config(tmp_path / "lo.conf", keys, dns_server, listen="127.0.0.1:2525")
    printed = mailerd_dns("-c", str(conf))
    rc, lines = run_check(conf, dns_server, printed.stdout)
    unknown = [ln for ln in lines if ln.status != "OK"]
    assert len(unknown) == 1 and unknown[0].status == "UNKNOWN", shown(lines)
    assert "public-address" in unknown[0].text
    assert rc == 1


# --------------------------------------------------------------------------------------------
# Submission: SRV records by which mail programs find it (RFC 6186, RFC 8314)
# --------------------------------------------------------------------------------------------

SUBMISSION_PRIORITY = {"_submissions._tcp": 0, "_submission._tcp": 10}  # implicit TLS first
PUBLIC_SUBMISSION = f"listen-submission = {V4}, [{V6}]\nlisten-submissions = {V4}, [{V6}]\n"


def submission_conf(tmp_path: Path, keys: list[Key], dns: DNSServer, listeners: str) -> Path:
    """The config with submission listeners, and the certificate they need (`pki`'s)."""
    assert PKI is not None
    tls = f"tls-cert = {PKI.good.cert}\ntls-key = {PKI.good.key}\n"
    return write_config(tmp_path / "submission.conf", keys, dns, more=tls + listeners)


def srv_records(
    domains=("example.org", "example.net"), *, submissions=(465,), submission=(587,)
) -> set[Rec]:
    """The SRV records naming the host, one for each port of each kind of listener."""
    out: set[Rec] = set()
    for d in domains:
        for service, ports in (
            ("_submissions._tcp", submissions),
            ("_submission._tcp", submission),
        ):
            for port in ports:
                out.add(
                    (f"{service}.{d}", "SRV", f"{SUBMISSION_PRIORITY[service]} 1 {port} {HOSTNAME}")
                )
    return out


def test_public_submission_listeners_get_srv_records(tmp_path: Path, keys: list[Key], dns_server):
    """Submission listeners on the host's addresses (a wildcard one stands for those of its
    family): each domain gets a _submissions and a _submission SRV record naming the host and
    the configured port, once however many addresses share it, implicit TLS at the lower
    priority (clients try it first), explained; and what is printed passes the check."""
    conf = submission_conf(
        tmp_path,
        keys,
        dns_server,
        f"listen-submission = {V4}, [{V6}]\nlisten-submissions = 0.0.0.0:4465\n",
    )
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    got = printed_records(p.stdout)
    want = wanted(keys) | srv_records(submissions=(4465,))
    assert set(got) == want, f"missing {sorted(want - set(got))}, extra {sorted(set(got) - want)}"
    assert len(got) == len(set(got)), f"a record printed twice:\n{p.stdout}"
    why = comments_before(p.stdout, "_submissions._tcp.example.org", "SRV")
    assert "RFC 6186" in why and "Optional" in why, f"the SRV comment:\n{p.stdout}"
    rc, lines = run_check(conf, dns_server, p.stdout)
    assert [ln for ln in lines if ln.status != "OK"] == [] and rc == 0, shown(lines)
    assert Counter((ln.owner, ln.rtype) for ln in lines) == Counter((o, t) for o, t, _ in want)


@pytest.mark.parametrize(
    "listeners",
    [
        # scripts/server's: only this machine reaches it
        pytest.param("listen-submission = 127.0.0.1:2587, [::1]:2587\n", id="loopback"),
        # an address the host name's A/AAAA do not lead to
        pytest.param("listen-submissions = 192.0.2.99\n", id="other-address"),
    ],
)
def test_a_submission_listener_the_world_does_not_reach_gets_no_srv_record(
    tmp_path: Path, keys: list[Key], dns_server, listeners: str
):
    """A mail program that looks up the host name does not reach such a listener: no SRV
    record names it, a note says so, and the check asks for none."""
    conf = submission_conf(tmp_path, keys, dns_server, listeners)
    p = mailerd_dns("-c", str(conf))
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert set(printed_records(p.stdout)) == wanted(keys), p.stdout
    notes = [ln for ln in p.stdout.splitlines() if ln.startswith(";") and "SRV" in ln]
    address = listeners.split("=")[1].split(",")[0].strip()
    assert len(notes) == 1 and address in notes[0], f"one note naming {address}:\n{p.stdout}"
    rc, lines = run_check(conf, dns_server, p.stdout)
    assert [ln for ln in lines if ln.status != "OK" or ln.rtype == "SRV"] == [], shown(lines)
    assert rc == 0


SRV_ORG = "_submissions._tcp.example.org"
SRV_NET = "_submission._tcp.example.net"


def _without_srv(records: set[Rec]) -> set[Rec]:
    return {r for r in records if r[1] != "SRV"}


@pytest.mark.parametrize(
    "change, expect, rc_wanted, mentions",
    [
        # published as anywhere else, to another port or host: clients fail there
        pytest.param(
            _replace(SRV_NET, "SRV", f"10 1 25 {HOSTNAME}"),
            {(SRV_NET, "SRV"): "WRONG"},
            1,
            ("25", "587"),
            id="wrong-port",
        ),
        pytest.param(
            _replace(SRV_ORG, "SRV", "0 1 465 smtp.provider.example"),
            {(SRV_ORG, "SRV"): "WRONG"},
            1,
            ("smtp.provider.example", HOSTNAME),
            id="wrong-target",
        ),
        # an old provider's record left beside ours, at a lower priority: clients go there
        pytest.param(
            _plus((SRV_NET, "SRV", "5 1 587 smtp.provider.example")),
            {(SRV_NET, "SRV"): "WRONG"},
            1,
            ("smtp.provider.example",),
            id="another-server-first",
        ),
        # clients rank both services together (RFC 6186): another server at _submissions
        # ahead of our _submission (10) is tried before it when our 465 does not answer
        pytest.param(
            _plus((SRV_ORG, "SRV", "5 1 465 smtp.provider.example")),
            {(SRV_ORG, "SRV"): "WRONG"},
            1,
            ("smtp.provider.example", "_submission._tcp"),
            id="another-server-before-the-other-service",
        ),
        # missing: a convenience for mail programs, not needed for mail: exit 0 all the same
        pytest.param(
            _without_srv,
            {(o, "SRV"): "MISSING" for o, _, _ in srv_records()},
            0,
            ("exit status",),
            id="missing",
        ),
    ],
)
def test_check_finds_srv_records_missing_or_wrong(
    tmp_path: Path, keys: list[Key], dns_server, change, expect, rc_wanted, mentions
):
    """A missing SRV record is MISSING, and costs the exit status nothing (mail programs that
    find none ask for the server); a wrong one (another port, another host, another server
    tried first) is WRONG, showing what is published and what is wanted, and does."""
    conf = submission_conf(tmp_path, keys, dns_server, PUBLIC_SUBMISSION)
    rc, lines = run_check(conf, dns_server, zone_text(change(wanted(keys) | srv_records())))
    by = index(lines)
    for key, status in expect.items():
        assert [ln.status for ln in by.get(key, [])] == [status], f"{key}:\n{shown(lines)}"
    first = by[next(iter(expect))][0]
    for word in mentions:
        assert word in first.text, f"the line should show {word!r}: {first.text}"
    others = [ln for ln in lines if (ln.owner, ln.rtype) not in expect and ln.status != "OK"]
    assert others == [], shown(lines)
    assert rc == rc_wanted, f"exit {rc}\n{shown(lines)}"


def test_check_of_an_srv_record_saying_no_service_is_wrong(
    tmp_path: Path, keys: list[Key], dns_server
):
    """Target `.` says the service is not offered at all (RFC 2782; mox prints it for
    _submission): wrong for a listener that is there, and the line says what it means."""
    conf = submission_conf(tmp_path, keys, dns_server, PUBLIC_SUBMISSION)
    zone = zone_text(_replace(SRV_NET, "SRV")(wanted(keys) | srv_records()))
    rc, lines = run_check(conf, dns_server, zone + f"{SRV_NET}. SRV 0 0 0 .\n")
    line = index(lines)[(SRV_NET, "SRV")][0]
    assert line.status == "WRONG" and "not offered" in line.text, shown(lines)
    assert rc == 1


OLD_PROVIDER = "0 1 465 smtp.oldprovider.example"


@pytest.mark.parametrize(
    "there, status",
    [
        pytest.param(OLD_PROVIDER, "WRONG", id="an-old-providers-record"),
        pytest.param(f"20 1 465 {OTHER_HOST}", "WRONG", id="even-at-a-higher-priority"),
        pytest.param("0 0 0 .", "OK", id="not-offered"),
        # this host: nothing listens there, no password goes elsewhere
        pytest.param(f"0 1 465 {HOSTNAME}", "OK", id="this-host"),
        pytest.param(None, None, id="nothing"),
    ],
)
def test_check_of_the_service_that_is_not_configured(
    tmp_path: Path, keys: list[Key], dns_server, there: str | None, status: str | None
):
    """Only a submission listener (587): a record at _submissions leading elsewhere, left
    from an old provider, sends the users' passwords there from mail programs that try
    implicit TLS first (an attacker's pass: it was not looked at, exit 0). Any record there
    leading elsewhere is WRONG, saying the service is not offered here; `.` (not offered), or
    this host, is right; nothing there is not reported, and is not printed either."""
    conf = submission_conf(tmp_path, keys, dns_server, f"listen-submission = {V4}, [{V6}]\n")
    want = wanted(keys) | srv_records(submissions=())
    p = mailerd_dns("-c", str(conf))
    assert set(printed_records(p.stdout)) == want, p.stdout
    stale = f"{SRV_ORG}. SRV {there}{'' if there.endswith('.') else '.'}\n" if there else ""
    rc, lines = run_check(conf, dns_server, zone_text(want) + stale)
    got = [ln for ln in lines if ln.owner == SRV_ORG]
    assert [ln.status for ln in got] == ([status] if status else []), shown(lines)
    assert [ln for ln in lines if ln.owner != SRV_ORG and ln.status != "OK"] == [], shown(lines)
    if status == "WRONG":
        target = there.split()[-1] if there else ""
        assert target in got[0].text and "not offered" in got[0].text, got[0].text
    assert rc == (1 if status == "WRONG" else 0), shown(lines)


def test_a_scoped_listener_and_no_ipv4_mapped_one(tmp_path: Path, keys: list[Key], dns_server):
    """A scope (`%eth0`) names a local interface, not part of the address the world sees: the
    records are the address's, and a submission listener there gets its SRV record (it was a
    traceback building the PTR name). An IPv4 address in IPv6 form is no address mailerd
    listens on (its IPv6 sockets take IPv6 only, as --public-address refuses one): the
    configuration is refused, saying which address to give."""
    conf = submission_conf(
        tmp_path, keys, dns_server, f"listen-submission = [{V6}%eth0]:587\n"
    ).read_text()
    scoped = conf.replace(
        f"listen-network = {V4}:25, [{V6}]:25", f"listen-network = {V4}:25, [{V6}%eth0]:25"
    )
    mapped = conf.replace(
        f"listen-network = {V4}:25, [{V6}]:25",
        f"listen-network = {V4}:25, [::ffff:198.51.100.25]:25",
    )
    path = tmp_path / "mapped.conf"
    path.write_text(mapped)
    p = mailerd_dns("-c", str(path))
    assert p.returncode != 0 and "Traceback" not in p.stderr, f"{p.stdout}\n{p.stderr}"
    assert "IPv4 address in IPv6 form" in p.stderr and "give 198.51.100.25" in p.stderr, p.stderr
    path = tmp_path / "scoped.conf"
    path.write_text(scoped)
    p = mailerd_dns("-c", str(path))
    assert p.returncode == 0 and "Traceback" not in p.stderr, f"{p.stdout}\n{p.stderr}"
    want = wanted(keys) | srv_records(submissions=())
    assert set(printed_records(p.stdout)) == want, p.stdout
    rc, lines = run_check(path, dns_server, p.stdout)
    assert [ln for ln in lines if ln.status != "OK"] == [] and rc == 0, shown(lines)


# --------------------------------------------------------------------------------------------
# The TLS certificate: the one a client that comes by the MX or SRV records is given
# --------------------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _signed(
    ca: certs.CA,
    subject: str,
    public_key,
    *,
    days: tuple[float, float] = (-1, 30),
    san: bool = True,
    is_ca: bool = False,
) -> x509.Certificate:
    """A certificate `ca` signs, valid from days[0] to days[1] days from now (openssl's x509
    command cannot date one in the past): for the name `subject` (in a subjectAltName too,
    unless not `san`), or a CA's."""
    now = time.time()
    issuer = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    signer = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(signer, rsa.RSAPrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime.fromtimestamp(now + days[0] * 86400, datetime.UTC))
        .not_valid_after(datetime.datetime.fromtimestamp(now + days[1] * 86400, datetime.UTC))
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    if is_ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return builder.sign(signer, hashes.SHA256())


def made(ca: certs.CA, name: str, tag: str, *, chain: bytes = b"", **how) -> certs.Pair:
    """A certificate for `name` from `ca` (`_signed`'s `how`), with `chain` after it."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _signed(ca, name, key.public_key(), **how)
    cert_path, key_path = ca.directory / f"{name}-{tag}.crt", ca.directory / f"{name}-{tag}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain)
    key_path.write_bytes(_pem_key(key))
    key_path.chmod(0o600)
    return certs.Pair(cert_path, key_path)


def expired_intermediate(pki: SimpleNamespace) -> bytes:
    """The intermediate's certificate again (its key, its name), signed by the CA but expired:
    an old chain file kept beside a renewed certificate."""
    key = serialization.load_pem_private_key(pki.mid.key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    name = x509.load_pem_x509_certificate(pki.mid.cert.read_bytes()).subject.rfc4514_string()
    old = _signed(pki.ca, name.removeprefix("CN="), key.public_key(), days=(-60, -1), is_ca=True)
    return old.public_bytes(serialization.Encoding.PEM)


def _certificates(pki: SimpleNamespace, case: str) -> list[certs.Pair]:
    mid = pki.mid
    if case == "none":
        return []
    if case == "full-chain":
        return [pki.good]
    if case == "rsa-and-ecdsa":
        return [mid.full_chain(mid.issue(HOSTNAME, tag="rsa2")), pki.good]
    if case == "wildcard":
        return [mid.full_chain(mid.issue("*.example.org", kind="ecdsa", tag="wild"))]
    if case == "another-name-first":  # the SNI chooser gives the host name's to its clients
        return [mid.full_chain(mid.issue("mail.example.net", kind="ecdsa", tag="o1")), pki.good]
    if case == "leaf-only":  # certbot's cert.pem given in place of fullchain.pem
        return [mid.issue(HOSTNAME, kind="ecdsa", tag="leaf")]
    if case == "self-signed":
        return [certs.self_signed(pki.base / "self", HOSTNAME)]
    if case == "other-name":
        return [mid.full_chain(mid.issue("mail.example.net", kind="ecdsa", tag="o2"))]
    if case == "expired":
        return [made(mid, HOSTNAME, "expired", days=(-30, -1), chain=mid.cert.read_bytes())]
    if case == "expired-intermediate":  # the server's own in date, an old chain beside it
        return [made(mid, HOSTNAME, "oldchain", chain=expired_intermediate(pki))]
    if case == "common-name-only":  # no subjectAltName: today's clients ignore the CN
        return [made(mid, HOSTNAME, "cn", san=False, chain=mid.cert.read_bytes())]
    if case == "wrong-order":  # the chain before the server's own certificate
        pair = mid.issue(HOSTNAME, kind="ecdsa", tag="order")
        swapped = pair.cert.with_suffix(".swapped.crt")
        swapped.write_bytes(mid.cert.read_bytes() + pair.cert.read_bytes())
        return [certs.Pair(swapped, pair.key)]
    if case == "fifo":  # (it held `mailerd dns` for ever, as it did the start)
        fifo = pki.base / "fifo.crt"
        if not fifo.exists():
            os.mkfifo(fifo)
        return [certs.Pair(fifo, pki.good.key)]
    if case == "untrusted-ca":  # a chain to a CA that no client trusts
        stranger = certs.make_ca(pki.base / "stranger", name="stranger CA")
        return [stranger.full_chain(stranger.issue(HOSTNAME, kind="ecdsa"))]
    if case == "unreadable":
        return [certs.Pair(pki.base / "missing.crt", pki.good.key)]
    raise AssertionError(case)


# case: (the statuses of the certificate lines, a word each WRONG line must show, exit status)
CERTIFICATE_CASES = {
    "full-chain": (["OK"], "", 0),
    "rsa-and-ecdsa": (["OK", "OK"], "", 0),
    "wildcard": (["OK"], "", 0),
    "another-name-first": (["OK"], "", 0),
    "none": (["MISSING"], "none configured", 0),
    "leaf-only": (["WRONG"], "fullchain.pem", 1),
    "self-signed": (["WRONG"], "self-signed", 1),
    "other-name": (["WRONG"], "no certificate is for mx.example.org", 1),
    "expired": (["WRONG"], "it has expired", 1),
    "expired-intermediate": (["WRONG"], "a CA certificate in the file has expired", 1),
    "common-name-only": (["WRONG"], "in its common name only", 1),
    "wrong-order": (["WRONG"], "the server's own certificate comes first", 1),
    "fifo": (["WRONG"], "not a regular file", 1),
    "untrusted-ca": (["WRONG"], "chain ends at a CA that clients do not trust", 1),
    "unreadable": (["WRONG"], "missing.crt", 1),
}


@pytest.mark.parametrize("case", list(CERTIFICATE_CASES))
def test_check_of_the_certificate(tmp_path: Path, keys: list[Key], dns_server, pki, case):
    """--check says whether a client that checks certificates (a mail program, a sender under
    MTA-STS) accepts the one the host name is served: for that name, a whole chain to a CA it
    trusts, in date; with the DNS records all right, that decides the exit status. No
    certificate at all is reported, not counted (mail flows in clear)."""
    pairs = _certificates(pki, case)
    tls = ""
    if pairs:
        tls = f"tls-cert = {', '.join(str(p.cert) for p in pairs)}\n"
        tls += f"tls-key = {', '.join(str(p.key) for p in pairs)}\n"
    conf = write_config(tmp_path / "mailerd.conf", keys, dns_server, more=tls)
    dns_server.records = Records(zone_text(wanted(keys)))
    p = mailerd_dns("-c", str(conf), "--check")
    assert "Traceback" not in p.stderr, p.stderr
    records = check_lines(p.stdout)
    assert [ln for ln in records if ln.status != "OK"] == [], shown(records)
    lines = certificate_lines(p.stdout)
    statuses, word, status = CERTIFICATE_CASES[case]
    assert [line.split()[0] for line in lines] == statuses, p.stdout
    assert all(line.split()[1] == HOSTNAME for line in lines), lines
    for line in lines:
        assert word in line, f"{case}: the line should say {word!r}: {line}"
    assert p.returncode == status, f"{case}: exit {p.returncode}\n{p.stdout}"


def test_a_certificate_only_root_may_read_is_unknown_to_another_user(
    keys: list[Key], dns_server, pki
):
    """certbot's live/ and archive/ are root's alone (0700): run as another user, the check
    cannot read the certificate either, and says to run it as root (UNKNOWN), not WRONG (an
    attacker's pass). Everything else the check reads is open to that user here."""
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    if subprocess.run([*nobody, sys.executable, "-c", "import mailerd"], cwd=REPO).returncode:
        pytest.skip("this checkout cannot be read by another user (a clone in root's home)")
    with tempfile.TemporaryDirectory(prefix="mailerd-certbot-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        live = base / "live"
        live.mkdir(mode=0o700)
        for name, source in (("fullchain.pem", pki.good.cert), ("privkey.pem", pki.good.key)):
            (live / name).write_bytes(source.read_bytes())
        opened = []
        for k in keys:
            (base / k.path.name).write_bytes(k.path.read_bytes())
            (base / k.path.name).chmod(0o644)  # (DKIM keys: not the point here)
            opened.append(Key(k.domain, k.selector, base / k.path.name))
        tls = f"tls-cert = {live}/fullchain.pem\ntls-key = {live}/privkey.pem\n"
        conf = write_config(base / "mailerd.conf", opened, dns_server, more=tls)
        conf.chmod(0o644)
        dns_server.records = Records(zone_text(wanted(opened)))
        p = subprocess.run(
            [*nobody, sys.executable, "-m", "mailerd", "dns", "-c", str(conf), "--check"],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert "Traceback" not in p.stderr, p.stderr
    lines = certificate_lines(p.stdout)
    assert len(lines) == 1 and lines[0].startswith("UNKNOWN"), p.stdout + p.stderr
    assert "run mailerd dns as root" in lines[0] and p.returncode == 1

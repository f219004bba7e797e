"""testssl.sh (Debian's `testssl.sh` package, command `testssl`) against mailerd's TLS listeners.

One mailerd (loopback only, high ports) with a certificate for mx.example.org signed by the
test CA, scanned three times, each a full default testssl run (everything but -E and -g: the
protocols, cipher categories, forward secrecy, server preferences, server defaults with the
certificate, every vulnerability check, each cipher (-e) and the client simulations):

- ``network``: STARTTLS (``--starttls smtp``) on the untrusted listener (-n, port 25's role);
- ``submission``: STARTTLS on a ``--listen-submission`` listener (port 587's role);
- ``submissions``: implicit TLS on a ``--listen-submissions`` listener (port 465's role).

testssl is only ever pointed at 127.0.0.1: the target is ``mx.example.org:PORT`` (so that it
checks the certificate's name and sends that SNI) with ``--ip 127.0.0.1`` and ``--nodns none``
(no DNS query at all), and it never phones out (no ``--phone-out``).

Each scan's flat JSON (``--jsonfile``) is checked: no finding rated HIGH or CRITICAL, no scan
problem (FATAL, or a WARN other than those in TOLERATED_WARNINGS); then the
contract: TLS 1.2 and 1.3 only, no cipher outside Mozilla's intermediate list, no
client-initiated renegotiation, no compression, no session tickets.

The certificate is made like a real one (90 days, key usage, a CRL distribution point) so that
the scan judges mailerd's TLS, not the test CA's shortcuts (tests/certs.py issues 30-day
certificates without revocation information, which testssl rates HIGH); testssl trusts the test
CA through ``--add-ca``.

A run takes 45-65 s (three per module; the implicit-TLS one is the longest: testssl first
probes it for HTTP). Each scan's JSON and text output stay under the
module's tmp dir (``testssl-<listener>.json``/``.txt``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import certs
import pytest

from .conftest import (
    HOSTNAME,
    REPO,
    Mailerd,
    finish,
    free_port,
    run_mailerd,
    wait_for_banner,
)

SCAN_TIMEOUT = 300.0  # one testssl run; about 40 s is usual
LOOPBACK = "127.0.0.1"
PASSWD_USER = "alice"
PASSWD_PASSWORD = "correct horse battery staple"

# Mozilla's intermediate configuration (v5.7): TLS 1.2 suites (OpenSSL names) and TLS 1.3's.
MOZILLA_TLS12 = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
}
MOZILLA_TLS13 = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}

# Findings rated WARN (a check that could not be done) that do not make the scan worthless:
TOLERATED_WARNINGS = {
    "engine_problem",  # about the scanning machine: Debian's OpenSSL 3 has no GOST engine
    # session-ID resumption (an INFO-level fact, outside the contract): its two s_client runs
    # fail now and then on a loaded machine ("check failed, pls report"; seen with three
    # scans run at once)
    "sessionresumption_ID",
}

LISTENERS = ("network", "submission", "submissions")


# --------------------------------------------------------------------------------------------
# Certificate, mailerd, testssl
# --------------------------------------------------------------------------------------------


def realistic_pair(ca: certs.CA, directory: Path, name: str = HOSTNAME) -> certs.Pair:
    """An RSA certificate for `name` as a public CA would issue it, signed by the test CA."""
    key, csr, cert, ext = (directory / f"{name}.{s}" for s in ("key", "csr", "crt", "ext"))
    ext.write_text(
        f"subjectAltName=DNS:{name}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "crlDistributionPoints=URI:http://crl.example.org/mailerd-test-ca.crl\n"
    )
    openssl = ["openssl"]
    subprocess.run(
        [*openssl, "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", f"/CN={name}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    subprocess.run(
        [*openssl, "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key,
         "-CAcreateserial", "-out", cert, "-days", "90", "-sha256", "-extfile", ext],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    key.chmod(0o600)
    return certs.Pair(cert, key)


def find_testssl() -> str:
    found = shutil.which("testssl") or shutil.which("testssl.sh")
    if not found:
        pytest.fail(
            "testssl.sh is not installed: apt-get install --no-install-recommends testssl.sh "
            "(it brings dnsutils and bsdextrautils)",
            pytrace=False,
        )
    return found


def make_passwd(path: Path, user: str, password: str) -> None:
    """`python -m mailerd passwd --passwd FILE USER`, the password on standard input."""
    proc = subprocess.run(
        [sys.executable, "-m", "mailerd", "passwd", "--passwd", str(path), user],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0 and path.exists(), (
        f"mailerd passwd --passwd {path} {user} failed ({proc.returncode}): "
        f"{proc.stderr.strip()} {proc.stdout.strip()}"
    )


def wait_implicit_tls(m: Mailerd, port: int, ca: certs.CA, timeout: float = 15.0) -> None:
    """Wait until the implicit-TLS listener completes a handshake and greets with 220."""
    context = ssl.create_default_context(cafile=str(ca.cert))
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        assert m.proc is not None and m.proc.poll() is None, m.stderr_text()
        try:
            with (
                socket.create_connection((LOOPBACK, port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=HOSTNAME) as s,
            ):
                banner = s.recv(512)
                if banner.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                    return
                last = AssertionError(f"banner {banner!r}")
        except (OSError, ssl.SSLError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(
        f"no TLS greeting on {LOOPBACK}:{port} within {timeout}s: {last!r}\n{m.stderr_text()}"
    )


@dataclass
class Target:
    mailerd: Mailerd
    ca: certs.CA
    ports: dict[str, int]
    base: Path


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    helped = run_mailerd(["--help"])
    if helped.returncode != 0:
        pytest.fail(f"mailerd --help failed ({helped.returncode}): {helped.stderr}", pytrace=False)
    assert "--tls-cert" in helped.stdout, helped.stdout
    find_testssl()
    base = tmp_path_factory.mktemp("testssl")
    ca = certs.make_ca(base / "ca")
    pair = realistic_pair(ca, base / "ca")
    passwd = base / "passwd"
    make_passwd(passwd, PASSWD_USER, PASSWD_PASSWORD)
    ports = {"submission": free_port(), "submissions": free_port()}
    extra = [
        "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
        "--listen-submission", f"{LOOPBACK}:{ports['submission']}",
        "--listen-submissions", f"{LOOPBACK}:{ports['submissions']}",
        "--passwd", str(passwd),
    ]  # fmt: skip
    m = Mailerd(base / "mailerd", extra=extra, name="tls")
    (m.spool / PASSWD_USER).mkdir(parents=True, exist_ok=True)
    m.start()
    ports["network"] = m.untrusted_port
    try:
        assert m.proc is not None
        wait_for_banner(m.proc, LOOPBACK, ports["submission"], time.monotonic() + 15, m.stderr_text)
        wait_implicit_tls(m, ports["submissions"], ca)
        yield Target(m, ca, ports, base)
    finally:
        finish(m)


# --------------------------------------------------------------------------------------------
# Scans
# --------------------------------------------------------------------------------------------


@dataclass
class Scan:
    listener: str
    argv: list[str]
    returncode: int | None
    seconds: float
    findings: list[dict[str, str]]
    text: str

    def by_id(self, ident: str) -> dict[str, str] | None:
        for f in self.findings:
            if f["id"] == ident:
                return f
        return None

    def finding(self, ident: str) -> str:
        f = self.by_id(ident)
        assert f is not None, f"testssl reported no '{ident}' on {self.listener}\n{self.tail()}"
        return f["finding"]

    def rated(self, *severities: str) -> list[dict[str, str]]:
        return [f for f in self.findings if f["severity"] in severities]

    def summary(self) -> str:
        """Every finding rated above OK/INFO, one a line."""
        lines = [
            f"  {f['severity']:<8} {f['id']}: {f['finding']}"
            for f in self.findings
            if f["severity"] not in ("OK", "INFO", "DEBUG")
        ]
        return f"{self.listener} ({self.seconds:.0f} s):\n" + ("\n".join(lines) or "  (none)")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text.splitlines()[-n:])


def run_testssl(t: Target, listener: str) -> Scan:
    port = t.ports[listener]
    json_file = t.base / f"testssl-{listener}.json"
    text_file = t.base / f"testssl-{listener}.txt"
    json_file.unlink(missing_ok=True)
    argv = [
        find_testssl(),
        "--quiet", "--color", "0", "--warnings", "batch",
        "--nodns", "none", "--ip", LOOPBACK,  # never a DNS query, only ever loopback
        "--add-ca", str(t.ca.cert),
        "--connect-timeout", "10", "--openssl-timeout", "10",
        "--jsonfile", str(json_file),
    ]  # fmt: skip
    if listener != "submissions":
        argv += ["--starttls", "smtp"]
    argv.append(f"{HOSTNAME}:{port}")
    assert argv[argv.index("--ip") + 1] == LOOPBACK
    start = time.monotonic()
    with open(text_file, "wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=t.base,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "TERM": "dumb"},
        )
        try:
            rc: int | None = proc.wait(SCAN_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            rc = None
    seconds = time.monotonic() - start
    text = text_file.read_text("utf-8", "replace")
    assert rc is not None, f"testssl did not finish within {SCAN_TIMEOUT}s:\n{text[-3000:]}"
    try:
        findings = json.loads(json_file.read_text())
    except (OSError, ValueError) as exc:
        raise AssertionError(
            f"testssl ({rc}) wrote no readable JSON ({exc}):\n{text[-3000:]}"
        ) from exc
    return Scan(listener, argv, rc, seconds, findings, text)


@pytest.fixture(scope="module", params=LISTENERS)
def scan(request, target: Target) -> Scan:
    """One testssl run per listener (module scope: the tests below share it)."""
    listener = request.param
    s = run_testssl(target, listener)
    # A scan that could not run is never a pass: FATAL, a testssl error exit (>= 240), or a
    # WARN not tolerated above means some checks did not happen.
    problems = [f for f in s.rated("FATAL", "WARN") if f["id"] not in TOLERATED_WARNINGS]
    assert not problems and (s.returncode or 0) < 240, (
        f"testssl could not scan the {listener} listener (exit {s.returncode}):\n"
        + "\n".join(f"  {f['severity']} {f['id']}: {f['finding']}" for f in problems)
        + f"\n--- output (tail) ---\n{s.tail()}"
    )
    assert s.by_id("TLS1_2") is not None, f"testssl tested no protocol:\n{s.tail()}"
    return s


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_no_high_or_critical_findings(scan: Scan):
    bad = scan.rated("HIGH", "CRITICAL")
    assert not bad, (
        f"testssl rates these findings on the {scan.listener} listener HIGH or CRITICAL:\n"
        + "\n".join(f"  {f['severity']} {f['id']}: {f['finding']}" for f in bad)
        + f"\n\nall findings above INFO:\n{scan.summary()}"
    )


def test_only_tls12_and_tls13(scan: Scan):
    offered = {}
    for ident in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"):
        offered[ident] = scan.finding(ident)
    wrong = {
        k: v for k, v in offered.items() if (k in ("TLS1_2", "TLS1_3")) != v.startswith("offered")
    }
    assert not wrong, f"{scan.listener}: TLS 1.2 and 1.3 only; testssl says {offered}"


def test_ciphers_within_mozilla_intermediate(scan: Scan):
    offered = {}
    for f in scan.findings:
        if f["id"].startswith("cipher_x"):
            words = f["finding"].split()
            offered[words[1]] = f["finding"]
    assert offered, f"testssl listed no cipher (-e) for {scan.listener}:\n{scan.tail()}"
    extra = sorted(set(offered) - MOZILLA_TLS12 - MOZILLA_TLS13)
    assert not extra, (
        f"{scan.listener} offers ciphers outside Mozilla's intermediate list: {extra}\n"
        + "\n".join(offered[c] for c in extra)
    )
    assert set(offered) & MOZILLA_TLS13, f"no TLS 1.3 cipher offered: {sorted(offered)}"
    assert set(offered) & MOZILLA_TLS12, f"no TLS 1.2 cipher offered: {sorted(offered)}"


def test_no_renegotiation_compression_or_tickets(scan: Scan):
    facts = {
        "secure_client_renego": scan.finding("secure_client_renego"),
        "CRIME_TLS": scan.finding("CRIME_TLS"),
        "TLS_session_ticket": scan.finding("TLS_session_ticket"),
        "sessionresumption_ticket": scan.finding("sessionresumption_ticket"),
    }
    expected = {
        "secure_client_renego": "not vulnerable",
        "CRIME_TLS": "not vulnerable",
        "TLS_session_ticket": "no",
        "sessionresumption_ticket": "not supported",
    }
    wrong = {k: v for k, v in facts.items() if not v.startswith(expected[k])}
    assert not wrong, (
        f"{scan.listener}: no client-initiated renegotiation, no compression, no session "
        f"tickets; testssl says {wrong} (expected to start with "
        f"{ {k: expected[k] for k in wrong} })"
    )

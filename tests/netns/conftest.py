"""A fake Internet in a network namespace, for mailerd's outbound (and later inbound) tests.

Needs root (network namespaces). Every process of the fake Internet — the DNS server
(`tests/dnsserver.py`), the receiving SMTP servers (`receiver.py`, aiosmtpd) and mailerd itself —
runs inside the namespace with `ip netns exec`. The namespace has no default route, so nothing
in it can reach anything but its own addresses; the test process (outside) reaches it only over
the veth pair, and never uses the machine's resolver (smtplib gets an explicit local hostname).

Layout (see `outbound.zone` for the names; other `*.zone` files here add more):

    host side of the veth   198.51.100.254/24, 2001:db8::fe/64
    namespace side          198.51.100.1 (mailerd), .10 mx1, .11 tar-pit, .12 mx2,
                            .20 dead MX / smarthosts, .53 DNS;
                            2001:db8::1, 2001:db8::12 (mx6), 2001:db8::20

Fixtures (module scoped unless said otherwise):

- ``netns`` → `Netns`: the namespace (``name``, ``cmd(*argv)``, ``popen(argv, log)``,
  ``run(argv)``); removed with its veth and ``/etc/netns/<name>/`` at teardown.
- ``internet`` → `Internet`: ``netns`` + DNS server on 198.51.100.53 serving ``outbound.zone``
  + receivers ``mx1`` (198.51.100.10:25), ``mx2`` (198.51.100.12:25), ``mx6``
  ([2001:db8::12]:25), ``smarthost`` (198.51.100.20:587, STARTTLS + AUTH required) as
  ``internet.receivers[name]``; ``internet.start_receiver(name, listen, script)`` starts more
  (stopped at module end, or by ``.stop()``); ``internet.cert``/``internet.key``: a self-signed
  certificate made with openssl.
- ``mta`` → `Mailerd`: one mailerd for the module (trusted 198.51.100.1:2525, untrusted
  198.51.100.1:25, ``--retry-after 1s``), with local mailboxes made by ``mta.add_user(name)``.
- ``mailerd_factory`` (function scoped) → ``make(*extra_args, start=True, retry_after="1s",
  name="")``: more mailerd instances on trusted ports 2526, 2527, …, ``-n none``; stopped at the
  test's end, and the test fails if one exited badly or logged a traceback.

`Mailerd` helpers: ``submit(sender, rcpts, body=None) → Submitted(queue_id, …)`` (smtplib over
the veth), ``deliveries(rcpt)``/``statuses(rcpt)``/``wait_delivery(rcpt, status)`` (parsed
``to=<…>, relay=…, status=…`` log lines), ``envelope(id)``/``recipient_state(id, rcpt)``/
``queued_ids()``/``in_queue(id)``, ``add_user(name)``/``mailbox(name)``, ``queue_cli(*args)``
(``mailerd queue`` in the namespace), ``kill9()`` (SIGKILL the whole process group), ``stop()``.
`Receiver`: ``delivered(rcpt)``, ``transactions()``, ``events(kind)``, ``rcpt_events(rcpt)``,
``connections()``, ``set_script(dict)`` (re-read at the next connection/MAIL), ``stop()``.
`parse_dsn(raw)` checks an RFC 3464 report's structure and returns its parts.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import email.utils
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import (  # noqa: F401 (re-exported)
    descendants_of,
    group_members,
    pid_alive,
    server_problems,
    tracebacks,
    wait_for_banner,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
DNSSERVER = REPO / "tests" / "dnsserver.py"
RECEIVER = HERE / "receiver.py"
ZONE_FILE = HERE / "outbound.zone"
ZONE_FILES = sorted(HERE.glob("*.zone"))  # outbound.zone and what other test modules add

HOST_V4 = "198.51.100.254"
HOST_V6 = "2001:db8::fe"
NS_V4 = "198.51.100.1"  # mailerd
NS_V4_EXTRA = ("198.51.100.10", "198.51.100.11", "198.51.100.12", "198.51.100.20", "198.51.100.53")
NS_V6 = ("2001:db8::1", "2001:db8::12", "2001:db8::20")
DNS_ADDR = "198.51.100.53"
MX1 = "198.51.100.10"
TARPIT = "198.51.100.11"
MX2 = "198.51.100.12"
DEAD = "198.51.100.20"
MX6 = "2001:db8::12"
CRASH_V6 = "2001:db8::20"

HOSTNAME = "mx.example.org"
LOCAL_DOMAIN = "example.org"
CLIENT_HELO = "client.test"
SMARTHOST_USER = "relayuser"
SMARTHOST_PASSWORD = "s3cret-pw"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
IO_TIMEOUT = 15.0

# Behaviour of the receivers, by recipient (fnmatch patterns; see receiver.py).
RULES_MX1: list[dict[str, Any]] = [
    {
        "id": "reject",
        "match": "bad*@*",
        "at": "rcpt",
        "reply": "550 5.1.1 <{rcpt}>: Recipient address rejected: mx1 knows no such user",
    },
    {
        "id": "retry-rcpt",
        "match": "*@retry.test",
        "at": "rcpt",
        "first": 2,
        "reply": "451 4.3.0 <{rcpt}>: mx1 is busy, try again later",
    },
    {
        "id": "retry-data",
        "match": "*@retry-data.test",
        "at": "data",
        "first": 2,
        "reply": "451 4.3.0 mx1 could not store the message, try again later",
    },
    {
        "id": "reject-data",
        "match": "*@reject-data.test",
        "at": "data",
        "reply": "554 5.6.0 mx1 refuses this content",
    },
    {
        "id": "greylist",
        "match": "later-*@split.test",
        "at": "rcpt",
        "reply": "450 4.2.0 <{rcpt}>: Recipient address rejected: greylisted by mx1",
    },
]
RULES_MX2: list[dict[str, Any]] = [
    {
        "id": "hold",
        "match": "*@hold.test",
        "at": "rcpt",
        "reply": "451 4.3.0 <{rcpt}>: mx2 is holding mail for hold.test",
    },
    {
        "id": "flush",
        "match": "*@flush.test",
        "at": "rcpt",
        "first": 1,
        "reply": "451 4.3.0 <{rcpt}>: mx2 wants one more try",
    },
]

LOG_RE = re.compile(
    r"(?P<id>[0-9A-Z]+): to=<(?P<to>[^>]*)>, relay=(?P<relay>\S+), delay=(?P<delay>[\d.]+), "
    r"status=(?P<status>\w+) \((?P<reply>.*)\)\s*$"
)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


_tokens = itertools.count(1)


def token(prefix: str = "t") -> str:
    """A short unique lower-case word, for addresses and subjects of one test."""
    return f"{prefix}{os.getpid() % 10000}x{next(_tokens)}"


def make_message(sender: str, rcpts: list[str], subject: str, text: str = "") -> bytes:
    """A small RFC 5322 message with CRLF line ends and a unique Message-ID (no DNS used)."""
    tag = token("m")
    lines = [
        f"From: <{sender}>" if sender else "From: <mailer-daemon@client.test>",
        f"To: {', '.join(f'<{r}>' for r in rcpts)}",
        f"Subject: {subject}",
        f"Message-ID: <{tag}@client.test>",
        f"Date: {email.utils.formatdate()}",
        "X-Test-Marker: " + tag,
        "",
        text or f"Hello from the outbound tests ({tag}).",
        "A second line.",
        "",
    ]
    return "\r\n".join(lines).encode()


def _run(argv: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM our child (by pid), then SIGKILL its process group if it does not exit."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# --------------------------------------------------------------------------------------------
# The namespace
# --------------------------------------------------------------------------------------------

NS_PREFIX = "mailerd-t"
_ns_counter = itertools.count(1)


@dataclass
class Netns:
    name: str
    veth_host: str
    veth_ns: str
    etc_dir: Path

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    @staticmethod
    def env() -> dict[str, str]:
        """The environment of what runs inside: the namespace's resolv.conf names the test's
        DNS server, so mailerd may use "the machine's resolver" there (tests/conftest.py)."""
        return {k: v for k, v in os.environ.items() if k != "MAILERD_FORBID_SYSTEM_RESOLVER"}

    def run(self, argv: list[str], timeout: float = 30.0, **kw: Any) -> subprocess.CompletedProcess:
        kw.setdefault("cwd", REPO)
        kw.setdefault("env", self.env())
        return subprocess.run(
            self.cmd(*argv), capture_output=True, text=True, timeout=timeout, **kw
        )

    def popen(self, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen:
        """Start argv in the namespace (own session, so its pid is its process group id)."""
        out = open(log, "ab")  # noqa: SIM115 - closed by the caller through proc.stdout
        kw.setdefault("cwd", REPO)
        kw.setdefault("env", self.env())
        try:
            return subprocess.Popen(
                self.cmd(*argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )
        finally:
            out.close()

    def pids(self) -> list[int]:
        proc = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _cleanup_stale_namespaces() -> None:
    """Remove namespaces left by earlier runs of this suite that were killed (dead pid)."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-\d+", name)
        if not m or pid_alive(int(m.group(1))):
            continue
        for pid in Netns(name, "", "", Path()).pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def _require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' command (iproute2) is not installed")
    probe = _run(["ip", "netns", "list"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"ip netns is unavailable: {probe.stderr.strip()}")


@contextlib.contextmanager
def network_namespace() -> Iterator[Netns]:
    """A fresh namespace with the veth pair and addresses above; removed on exit."""
    _require_netns()
    with _machine_lock():
        yield from _network_namespace()


_lock_depth = 0
_lock_fd: int | None = None
LOCK_FILE = "/run/lock/mailerd-netns-tests.lock"
LOCK_WAIT = 1800.0  # seconds: another run's whole netns suite may be ahead of this one


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """One test run's namespaces at a time on this machine: they all use the same addresses
    (198.51.100.0/24, 2001:db8::/32) on the host side, so two runs at once (two checkouts, two
    engineers) would route each other's packets. Another run's holding it is waited for."""
    global _lock_depth, _lock_fd
    if _lock_depth == 0:
        # (/run/lock is every booted Debian's; a container or chroot may lack it)
        os.makedirs(os.path.dirname(LOCK_FILE), mode=0o1777, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    pytest.fail(f"{LOCK_FILE}: another test run kept the namespaces too long")
                time.sleep(0.5)
        _lock_fd = fd
    _lock_depth += 1
    try:
        yield
    finally:
        _lock_depth -= 1
        if _lock_depth == 0 and _lock_fd is not None:
            os.close(_lock_fd)  # (closing releases the lock)
            _lock_fd = None


def _network_namespace() -> Iterator[Netns]:
    _cleanup_stale_namespaces()
    n = next(_ns_counter)
    pid = os.getpid()
    name = f"{NS_PREFIX}{pid}-{n}"
    short = f"{pid % 100000}{n}"
    ns = Netns(name, f"mdh{short}"[:15], f"mdn{short}"[:15], Path("/etc/netns") / name)
    created = False
    try:
        probe = _run(["ip", "netns", "add", name], check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot create a network namespace: {probe.stderr.strip()}")
        created = True
        ns.etc_dir.mkdir(parents=True, exist_ok=True)
        (ns.etc_dir / "resolv.conf").write_text(f"nameserver {DNS_ADDR}\n")
        steps = [
            [
                "ip",
                "link",
                "add",
                ns.veth_host,
                "type",
                "veth",
                "peer",
                "name",
                ns.veth_ns,
                "netns",
                name,
            ],
            ["ip", "addr", "add", f"{HOST_V4}/24", "dev", ns.veth_host],
            ["ip", "-6", "addr", "add", f"{HOST_V6}/64", "dev", ns.veth_host, "nodad"],
            ["ip", "link", "set", ns.veth_host, "up"],
            ["ip", "-n", name, "link", "set", "lo", "up"],
            ["ip", "-n", name, "addr", "add", f"{NS_V4}/24", "dev", ns.veth_ns],
            *(["ip", "-n", name, "addr", "add", f"{a}/24", "dev", ns.veth_ns] for a in NS_V4_EXTRA),
            *(
                ["ip", "-n", name, "-6", "addr", "add", f"{a}/64", "dev", ns.veth_ns, "nodad"]
                for a in NS_V6
            ),
            ["ip", "-n", name, "link", "set", ns.veth_ns, "up"],
        ]
        for step in steps:
            _run(step)
        # The link must be up on both sides before anything binds or connects.
        wait_until(
            lambda: "LOWER_UP" in _run(["ip", "link", "show", ns.veth_host]).stdout, timeout=5
        )
        yield ns
    finally:
        if created:
            for pid_ in ns.pids():  # processes this suite started in the namespace
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid_, signal.SIGKILL)
            _run(["ip", "netns", "del", name], check=False)
        if ns.veth_host and Path(f"/sys/class/net/{ns.veth_host}").exists():
            _run(["ip", "link", "del", ns.veth_host], check=False)
        shutil.rmtree(ns.etc_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# DNS server
# --------------------------------------------------------------------------------------------


class DnsServer:
    def __init__(self, ns: Netns, base: Path, zone_files: list[Path]) -> None:
        self.ns = ns
        self.log = base / "dnsserver.log"
        self.zone_files = zone_files
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if not DNSSERVER.exists():
            pytest.fail(f"{DNSSERVER} is missing", pytrace=False)
        argv = [PYTHON, str(DNSSERVER), "--listen", DNS_ADDR]
        for z in self.zone_files:
            argv += ["--zone", str(z)]
        self.proc = self.ns.popen(argv, self.log)
        ready = wait_until(
            lambda: "listening on" in self.text() or self.proc.poll() is not None, START_TIMEOUT
        )
        if not ready or self.proc.poll() is not None:
            raise RuntimeError(f"dnsserver did not start:\n{self.text()}")

    def text(self) -> str:
        try:
            return self.log.read_text("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)


# --------------------------------------------------------------------------------------------
# Receivers
# --------------------------------------------------------------------------------------------


class Receiver:
    """One receiver.py process: what it got, and its script (re-read on change)."""

    def __init__(self, ns: Netns, name: str, listen: str, base: Path, script: dict) -> None:
        self.ns = ns
        self.name = name
        self.listen = listen
        self.dir = base / f"receiver-{name}"
        for n in itertools.count(2):  # a name started again gets a fresh record
            if not self.dir.exists():
                break
            self.dir = base / f"receiver-{name}-{n}"
        self.spool = self.dir / "spool"
        self.script_path = self.dir / "script.json"
        self.log = self.dir / "receiver.log"
        self.proc: subprocess.Popen | None = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self.set_script(script)

    def set_script(self, script: dict) -> None:
        tmp = self.script_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(script, indent=1))
        os.replace(tmp, self.script_path)
        self.script = script

    def start(self) -> Receiver:
        (self.spool / "ready").unlink(missing_ok=True)
        argv = [
            PYTHON,
            str(RECEIVER),
            "--listen",
            self.listen,
            "--spool",
            str(self.spool),
            "--script",
            str(self.script_path),
        ]
        self.proc = self.ns.popen(argv, self.log)
        ok = wait_until(
            lambda: (self.spool / "ready").exists() or self.proc.poll() is not None, START_TIMEOUT
        )
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(
                f"receiver {self.name} on {self.listen} did not start:\n"
                f"{self.log.read_text('utf-8', 'replace')}"
            )
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)

    # -- what it saw ------------------------------------------------------------------------
    def transactions(self) -> list[dict[str, Any]]:
        tdir = self.spool / "transactions"
        if not tdir.is_dir():
            return []
        out = []
        for f in sorted(tdir.iterdir()):
            if f.name.endswith(".json") and not f.name.startswith("."):
                out.append(json.loads(f.read_text()))
        return out

    def delivered(self, rcpt: str | None = None) -> list[dict[str, Any]]:
        """Accepted transactions (those answered 2xx after the data), optionally for rcpt."""
        return [
            t
            for t in self.transactions()
            if t["accepted"] and (rcpt is None or rcpt.lower() in map(str.lower, t["rcpt_tos"]))
        ]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = (self.spool / "events.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if kind is None or e["event"] == kind:
                    out.append(e)
        return out

    def connections(self) -> int:
        return len([e for e in self.events() if e["event"] in ("connect", "tarpit")])

    def rcpt_events(self, rcpt: str) -> list[dict[str, Any]]:
        return [e for e in self.events("RCPT") if e["arg"].lower() == rcpt.lower()]

    def summary(self) -> str:
        lines = [f"receiver {self.name} ({self.listen}):"]
        for e in self.events()[-40:]:
            e = dict(e)
            e.pop("t", None)
            lines.append("  " + json.dumps(e))
        return "\n".join(lines)


@dataclass
class Internet:
    netns: Netns
    base: Path
    dns: DnsServer
    cert: Path
    key: Path
    receivers: dict[str, Receiver] = field(default_factory=dict)

    def start_receiver(self, name: str, listen: str, script: dict) -> Receiver:
        r = Receiver(self.netns, name, listen, self.base, script)
        self.receivers[name] = r
        return r.start()

    def all_receivers(self) -> list[Receiver]:
        return list(self.receivers.values())

    def delivered_anywhere(self, rcpt: str) -> list[tuple[str, dict]]:
        return [(r.name, t) for r in self.all_receivers() for t in r.delivered(rcpt)]

    def rcpts_anywhere(self, rcpt: str) -> list[tuple[str, dict]]:
        return [(r.name, e) for r in self.all_receivers() for e in r.rcpt_events(rcpt)]

    def report(self) -> str:
        return "\n".join(r.summary() for r in self.all_receivers())


def make_cert(base: Path) -> tuple[Path, Path]:
    cert, key = base / "cert.pem", base / "key.pem"
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=smarthost.test",
            "-addext",
            "subjectAltName=DNS:smarthost.test",
        ]
    )
    return cert, key


def smarthost_script(cert: Path, key: Path, mechanisms=("PLAIN", "LOGIN")) -> dict:
    return {
        "hostname": "smarthost.test",
        "tls": {"cert": str(cert), "key": str(key)},
        "auth": {
            "user": SMARTHOST_USER,
            "password": SMARTHOST_PASSWORD,
            "mechanisms": list(mechanisms),
            "require_tls": True,
        },
        "rules": [],
    }


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    with network_namespace() as ns:
        yield ns


@pytest.fixture(scope="module")
def internet(netns: Netns, tmp_path_factory) -> Iterator[Internet]:
    base = tmp_path_factory.mktemp("internet")
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        pytest.fail("aiosmtpd is not installed (pip install -e '.[test]')", pytrace=False)
    # dnsserver.py is written by another engineer: give it a moment if it is not there yet.
    wait_until(DNSSERVER.exists, 5)
    cert, key = make_cert(base)
    dns = DnsServer(netns, base, ZONE_FILES)
    net = Internet(netns, base, dns, cert, key)
    try:
        dns.start()
        net.start_receiver("mx1", f"{MX1}:25", {"hostname": "mx1.pref.test", "rules": RULES_MX1})
        net.start_receiver("mx2", f"{MX2}:25", {"hostname": "mx2.pref.test", "rules": RULES_MX2})
        net.start_receiver("mx6", f"[{MX6}]:25", {"hostname": "mx6.v6only.test", "rules": []})
        net.start_receiver("smarthost", f"{DEAD}:587", smarthost_script(cert, key))
        yield net
    finally:
        for r in net.all_receivers():
            r.stop()
        dns.stop()


# --------------------------------------------------------------------------------------------
# mailerd
# --------------------------------------------------------------------------------------------


@dataclass
class Submitted:
    queue_id: str
    sender: str
    rcpts: list[str]
    body: bytes
    reply: str


def send_inbound(
    sender: str, rcpt: str, subject: str = "inbound", body: bytes | None = None
) -> Submitted:
    """One transaction on mailerd's untrusted listener (198.51.100.1:25), as another server
    would send (from 198.51.100.254); a message of `make_message` unless `body` is given."""
    if body is None:
        body = make_message(sender, [rcpt], subject)
    with smtplib.SMTP(NS_V4, 25, local_hostname=CLIENT_HELO, timeout=IO_TIMEOUT) as s:
        assert s.ehlo(CLIENT_HELO)[0] == 250
        code, text = s.mail(sender)
        assert code == 250, (code, text)
        code, text = s.rcpt(rcpt)
        assert code == 250, (code, text)
        code, text = s.data(body)
        reply = text.decode("utf-8", "replace")
        assert code == 250, (code, reply)
        with contextlib.suppress(smtplib.SMTPException, OSError):
            s.quit()
    found = re.search(r"queued as ([0-9A-Z]+)", reply)
    assert found, reply
    return Submitted(found.group(1), sender, [rcpt], body, reply)


class Mailerd:
    """mailerd in the namespace: trusted listener 198.51.100.1:<port>, reached over the veth."""

    def __init__(
        self,
        ns: Netns,
        base: Path,
        port: int = 2525,
        untrusted: str = f"{NS_V4}:25",
        extra: tuple[str, ...] | list[str] = (),
        retry_after: str = "1s",
        name: str = "mailerd",
        python: str = PYTHON,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ns = ns
        self.env = env or {}  # added to the namespace's environment (Netns.env)
        # The interpreter, and so the installation, mailerd runs from; `python -m` also
        # imports from the working directory, so it runs in `cwd`.
        self.python = python
        self.cwd = cwd
        self.base = base
        self.port = port
        self.untrusted = untrusted
        self.extra = list(extra)
        self.retry_after = retry_after
        self.name = name
        self.spool = base / "spool"
        self.queue = base / "queue"
        self.log = base / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.spool.mkdir(parents=True, exist_ok=True)
        self.starts = 0

    def argv(self) -> list[str]:
        return [
            self.python,
            "-m",
            "mailerd",
            "-f",
            "-s",
            str(self.spool),
            "-q",
            str(self.queue),
            "-d",
            LOCAL_DOMAIN,
            "-H",
            HOSTNAME,
            "-w",
            "1",
            "-l",
            f"{NS_V4}:{self.port}",
            "-n",
            self.untrusted,
            "--retry-after",
            self.retry_after,
            *([] if "--aliases" in self.extra else ["--aliases", str(self.no_aliases())]),
            *([] if "--passwd" in self.extra else ["--passwd", str(self.base / "no-passwd")]),
            *self.extra,
        ]

    def no_aliases(self) -> Path:
        """An empty aliases file: never the machine's /etc/aliases."""
        path = self.base / "no-aliases"
        path.touch()
        return path

    def start(self) -> Mailerd:
        self.starts += 1
        with open(self.log, "a") as f:
            f.write(f"=== test harness: start #{self.starts}: {' '.join(self.argv())}\n")
        env = {**self.ns.env(), **self.env}
        self.proc = self.ns.popen(self.argv(), self.log, cwd=self.cwd, env=env)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        wait_for_banner(self.proc, NS_V4, self.port, deadline, self.log_text)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the master (the `ip netns exec` child execs into it) and wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                return None
        return self.proc.returncode

    def kill9(self) -> list[int]:
        """SIGKILL the whole process group (master + children) and wait until all are gone.

        Returns the pids that were killed."""
        assert self.proc is not None
        family = set(group_members(self.proc.pid)) | set(descendants_of(self.proc.pid))
        victims = sorted(family | {self.proc.pid})
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in victims:  # a child that left the group is still ours: by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        gone = wait_until(lambda: not any(pid_alive(p) for p in victims), 10)
        assert gone, f"processes survived SIGKILL: {[p for p in victims if pid_alive(p)]}"
        return victims

    # -- logs -----------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def deliveries(self, rcpt: str | None = None, queue_id: str | None = None) -> list[dict]:
        """Parsed `to=<…>, relay=…, status=…` lines (not the `relay=queue` ones at receipt)."""
        out = []
        for line in self.log_text().splitlines():
            m = LOG_RE.search(line)
            if not m or m["relay"] == "queue":
                continue
            if rcpt is not None and m["to"].lower() != rcpt.lower():
                continue
            if queue_id is not None and m["id"] != queue_id:
                continue
            out.append({**m.groupdict(), "line": line})
        return out

    def statuses(self, rcpt: str) -> list[str]:
        return [d["status"] for d in self.deliveries(rcpt)]

    def crashes(self) -> list[str]:
        return server_problems(self.log_text())

    # -- submitting -----------------------------------------------------------------------
    def smtp(self) -> smtplib.SMTP:
        # local_hostname given: smtplib would otherwise ask the machine's resolver (getfqdn).
        return smtplib.SMTP(NS_V4, self.port, local_hostname=CLIENT_HELO, timeout=IO_TIMEOUT)

    def submit(
        self, sender: str, rcpts: list[str], body: bytes | None = None, subject: str = "test"
    ) -> Submitted:
        """One transaction on the trusted listener; returns the queue id from the 250 reply."""
        if body is None:
            body = make_message(sender, rcpts, subject)
        with self.smtp() as s:
            code, text = s.ehlo(CLIENT_HELO)
            assert code == 250, (code, text)
            code, text = s.mail(sender)
            assert code == 250, f"MAIL FROM:<{sender}> → {code} {text!r}"
            for r in rcpts:
                code, text = s.rcpt(r)
                assert code == 250, f"RCPT TO:<{r}> → {code} {text!r}"
            code, text = s.data(body)
            reply = text.decode("utf-8", "replace")
            assert code == 250, f"DATA → {code} {reply}"
            with contextlib.suppress(smtplib.SMTPException, OSError):
                s.quit()
        m = re.search(r"queued as ([0-9A-Z]+)", reply)
        assert m, f"no queue id in the 250 reply: {reply!r}"
        return Submitted(m.group(1), sender, list(rcpts), body, reply)

    # -- queue and spool ------------------------------------------------------------------
    def env_path(self, queue_id: str) -> Path:
        return self.queue / "env" / queue_id

    def msg_path(self, queue_id: str) -> Path:
        return self.queue / "msg" / queue_id

    def envelope(self, queue_id: str) -> dict | None:
        try:
            return json.loads(self.env_path(queue_id).read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def queued_ids(self) -> list[str]:
        d = self.queue / "env"
        if not d.is_dir():
            return []
        return sorted(f.name for f in d.iterdir() if ".tmp" not in f.name)

    def in_queue(self, queue_id: str) -> bool:
        return self.env_path(queue_id).exists() or self.msg_path(queue_id).exists()

    def recipient_state(self, queue_id: str, rcpt: str) -> dict | None:
        env = self.envelope(queue_id)
        if env is None:
            return None
        for r in env["recipients"]:
            if r["address"].lower() == rcpt.lower():
                return r
        return None

    def add_user(self, user: str) -> str:
        (self.spool / user).mkdir(parents=True, exist_ok=True)
        return f"{user}@{LOCAL_DOMAIN}"

    def mailbox(self, user: str) -> list[bytes]:
        box = self.spool / user
        if not box.is_dir():
            return []
        nums = sorted(int(f.name) for f in box.iterdir() if f.name.isdigit() and f.is_file())
        return [(box / str(n)).read_bytes() for n in nums]

    def spool_files(self) -> set[str]:
        out = set()
        for dirpath, _dirs, files in os.walk(self.spool):
            for f in files:
                out.add(os.path.relpath(os.path.join(dirpath, f), self.spool))
        return out

    def queue_cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """`python -m mailerd queue -q QUEUE ARGS…`, run inside the namespace."""
        return self.ns.run(
            [self.python, "-m", "mailerd", "queue", "-q", str(self.queue), *args],
            timeout=timeout,
            cwd=self.cwd,
        )

    def wait_delivery(self, rcpt: str, status: str, timeout: float = 15.0) -> dict:
        """Wait for a log line `to=<rcpt> … status=<status>`; return it or fail with the log."""
        found = wait_until(
            lambda: [d for d in self.deliveries(rcpt) if d["status"] == status], timeout
        )
        assert found, (
            f"no 'status={status}' log line for <{rcpt}> within {timeout}s; seen: "
            f"{self.statuses(rcpt)}\n--- mailerd log (tail) ---\n{self.log_tail()}"
        )
        return found[0]


def finish(m: Mailerd) -> list[str]:
    """Stop an instance; the problems worth failing a test for (bad exit, crash traces)."""
    was_running = m.proc is not None and m.proc.poll() is None
    rc = m.stop()
    problems = []
    if was_running and rc != 0:
        problems.append(f"{m.name}: exit status {rc} after SIGTERM")
    problems += [f"{m.name} logged a traceback:\n{c}" for c in m.crashes()]
    return problems


def finish_or_fail(m: Mailerd) -> None:
    """A fixture's teardown: stop the instance, and fail the test on its problems (`finish`)."""
    problems = finish(m)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def check_mailerd_runs(m: Mailerd) -> None:
    """Fail, never skip, when `python -m mailerd --help` does not work in the namespace (the
    package does not import, say), with what it printed: the module's tests cannot run."""
    proc = m.ns.run([m.python, "-m", "mailerd", "--help"], cwd=m.cwd)
    if proc.returncode != 0 or "--relayhost" not in proc.stdout:
        pytest.fail(
            f"`{m.python} -m mailerd --help` in {m.cwd} failed (exit status {proc.returncode}, "
            f"or no --relayhost option):\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def mta(internet: Internet, tmp_path_factory) -> Iterator[Mailerd]:
    base = tmp_path_factory.mktemp("mta")
    m = Mailerd(internet.netns, base, name="mta")
    check_mailerd_runs(m)
    m.start()
    yield m
    finish_or_fail(m)


_ports = itertools.count(2526)


@pytest.fixture
def mailerd_factory(internet: Internet, tmp_path: Path) -> Iterator[Callable[..., Mailerd]]:
    made: list[Mailerd] = []

    def make(
        *extra: str,
        start: bool = True,
        retry_after: str = "1s",
        name: str = "",
        env: dict[str, str] | None = None,
    ) -> Mailerd:
        name = name or f"mailerd{len(made) + 1}"
        base = tmp_path / name
        base.mkdir()
        m = Mailerd(
            internet.netns,
            base,
            port=next(_ports),
            untrusted="none",
            extra=extra,
            retry_after=retry_after,
            name=name,
            env=env,
        )
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    problems = []
    for m in made:
        problems += finish(m)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --------------------------------------------------------------------------------------------
# Delivery status notifications
# --------------------------------------------------------------------------------------------


@dataclass
class Dsn:
    raw: bytes
    msg: email.message.Message
    per_message: email.message.Message
    recipients: dict[str, email.message.Message]  # Final-Recipient address → its fields
    human: str
    original: str  # the returned headers (or message), as text
    text: str  # every text of the report, for "does it quote X" checks


def _decode(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode(part.get_content_charset() or "utf-8", "replace")
    if isinstance(payload, list):
        return "\n".join(p.as_string() for p in payload)
    return str(part.get_payload())


def parse_dsn(raw: bytes) -> Dsn:
    """Parse an RFC 3464 report; asserts the structure every DSN must have."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", (
        f"a DSN must be multipart/report, got {msg.get_content_type()}:\n{raw[:1500]!r}"
    )
    assert msg.get_param("report-type") == "delivery-status", msg["Content-Type"]
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) >= 2, f"DSN has too few parts: {raw[:2000]!r}"
    assert parts[0].get_content_maintype() == "text", (
        f"first part must be the human-readable text, got {parts[0].get_content_type()}"
    )
    status_parts = [p for p in parts if p.get_content_type() == "message/delivery-status"]
    assert len(status_parts) == 1, f"need one message/delivery-status part: {raw[:2000]!r}"
    blocks = status_parts[0].get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, (
        f"delivery-status needs a per-message block and recipient blocks: {blocks!r}"
    )
    recipients = {}
    for block in blocks[1:]:
        final = block.get("Final-Recipient", "")
        kind, _, address = final.partition(";")
        assert kind.strip().lower() == "rfc822", f"Final-Recipient must be rfc822: {final!r}"
        recipients[address.strip().lower()] = block
    originals = [
        p
        for p in parts[2:]
        if p.get_content_type()
        in ("text/rfc822-headers", "message/rfc822", "message/global", "message/global-headers")
    ]
    original = _decode(originals[0]) if originals else ""
    text_all = "\n".join([_decode(parts[0])] + [b.as_string() for b in blocks] + [original])
    return Dsn(raw, msg, blocks[0], recipients, _decode(parts[0]), original, text_all)


def return_path_of(raw: bytes) -> str | None:
    first = raw.split(b"\r\n", 1)[0]
    if first.startswith(b"Return-Path:"):
        return first.decode("utf-8", "replace")[len("Return-Path:") :].strip()
    return None

"""End-to-end harness: run the real ``python -m mailerd`` as a subprocess and talk SMTP to it.

Everything here is loopback-only with high ports, so no test needs root.  Every network
operation carries a timeout and every wait polls, so a broken server fails a test instead of
hanging the suite.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dnsserver import DNSServer, Records
from harness import (  # noqa: F401 (re-exported)
    children_of,
    descendants_of,
    free_port,
    pid_alive,
    server_problems,
    tracebacks,
    wait_for_banner,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
LOCAL_DOMAINS = ("example.org", "example.net")
HOSTNAME = "mx.example.org"
CRLF = b"\r\n"
IO_TIMEOUT = 15.0  # seconds, for any single socket read or write
START_TIMEOUT = 10.0
STOP_TIMEOUT = 20.0

ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


# --------------------------------------------------------------------------------------------
# Raw SMTP client
# --------------------------------------------------------------------------------------------


@dataclass
class Reply:
    code: int
    lines: list[str]  # text after "NNN-" / "NNN " of every line
    raw: bytes = b""

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code (RFC 3463) of the first line, if there is one."""
        return enhanced_of(self.lines[0]) if self.lines else None

    def line_codes(self) -> list[str | None]:
        return [enhanced_of(line) for line in self.lines]

    def __str__(self) -> str:
        return self.raw.decode("utf-8", "replace").rstrip("\r\n")


def enhanced_of(text: str) -> str | None:
    first = text.split(" ", 1)[0] if text else ""
    return first if ENHANCED_RE.match(first) else None


class SMTPConn:
    """A byte-exact SMTP client on a raw socket, for tests that need control over every octet."""

    def __init__(self, host: str, port: int, timeout: float = IO_TIMEOUT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.transcript: list[tuple[str, bytes]] = []

    # -- low level --------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.transcript.append(("C", data))
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_line(self) -> bytes:
        """One line including its CRLF/LF; b"" at EOF (a partial last line is returned as is)."""
        while b"\n" not in self.buf:
            if not self._fill():
                line, self.buf = self.buf, b""
                return line
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def read_reply(self) -> Reply:
        """Read one (possibly multi-line) reply; raises EOFError if the server closed first."""
        lines: list[str] = []
        raw = b""
        while True:
            line = self.read_line()
            if not line:
                raise EOFError(f"connection closed by server (partial reply: {raw!r})")
            raw += line
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in " -"):
                raise AssertionError(f"malformed reply line {line!r}")
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                reply = Reply(int(text[:3]), lines, raw)
                self.transcript.append(("S", raw))
                return reply

    def cmd(self, line: str | bytes) -> Reply:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + CRLF)
        return self.read_reply()

    def read_replies(self, n: int) -> list[Reply]:
        return [self.read_reply() for _ in range(n)]

    def read_all_replies(self, timeout: float = IO_TIMEOUT) -> tuple[list[Reply], bool]:
        """Read replies until EOF or until nothing arrives for ``timeout``; (replies, saw_eof)."""
        replies: list[Reply] = []
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            while True:
                try:
                    replies.append(self.read_reply())
                except EOFError:
                    return replies, True
                except TimeoutError:
                    return replies, False
                except ConnectionResetError:
                    return replies, True
        finally:
            self.sock.settimeout(old)

    def wait_eof(self, timeout: float = IO_TIMEOUT) -> bytes | None:
        """Read until EOF; return the bytes read before it, or None if no EOF within timeout."""
        deadline = time.monotonic() + timeout
        data, self.buf = self.buf, b""
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
        return None

    # -- conveniences -------------------------------------------------------------------------
    def banner(self) -> Reply:
        return self.read_reply()

    def ehlo(self, name: str = "client.test") -> Reply:
        return self.cmd(f"EHLO {name}")

    def start(self, helo: str = "client.test") -> None:
        """Read the banner and EHLO, asserting both succeed."""
        b = self.banner()
        assert b.code == 220, f"banner: {b}"
        r = self.ehlo(helo)
        assert r.code == 250, f"EHLO: {r}"

    def dialogue(self) -> str:
        out = []
        for who, data in self.transcript:
            shown = data if len(data) < 400 else data[:200] + b" ... " + data[-100:]
            out.append(f"{who}: {shown!r}")
        return "\n".join(out)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> SMTPConn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def expect(reply: Reply, code: int, enhanced: str | None = None, conn: SMTPConn | None = None):
    msg = f"expected {code} {enhanced or ''}, got {reply}"
    if conn is not None:
        msg += "\n--- dialogue ---\n" + conn.dialogue()
    assert reply.code == code, msg
    if enhanced is not None:
        assert reply.enhanced == enhanced, msg
    return reply


def ehlo_keywords(reply: Reply) -> set[str]:
    """The upper-cased extension keywords of an EHLO reply (every line after the first)."""
    return {line.split()[0].upper() for line in reply.lines[1:] if line.split()}


def mail_rcpt(
    c: SMTPConn, rcpt: str, *, sender: str = "sender@client.test", params: str = ""
) -> None:
    """Send MAIL FROM:<sender> [params] and RCPT TO:<rcpt>, expecting 250 for each."""
    mail = f"MAIL FROM:<{sender}> {params}" if params else f"MAIL FROM:<{sender}>"
    expect(c.cmd(mail), 250, conn=c)
    expect(c.cmd(f"RCPT TO:<{rcpt}>"), 250, conn=c)


def owner_transaction(m: Mailerd) -> float:
    """Seconds the owner's transaction takes on the loopback listener (banner, EHLO, MAIL,
    RCPT, QUIT): what the tests of one client starving the others time."""
    started = time.monotonic()
    with m.connect(trusted=True) as c:
        expect(c.banner(), 220, conn=c)
        c.cmd("EHLO owner.test")
        mail_rcpt(c, "friend@elsewhere.test")
        c.cmd("QUIT")
    return time.monotonic() - started


def send_data(c: SMTPConn, body: bytes, code: int = 250, enhanced: str | None = None) -> Reply:
    """Send DATA (expecting 354), then ``body`` and the final dot; expect ``code`` at the end."""
    expect(c.cmd("DATA"), 354, conn=c)
    c.send(body + b".\r\n")
    return expect(c.read_reply(), code, enhanced, conn=c)


def send_message(
    c: SMTPConn,
    rcpt: str,
    body: bytes,
    *,
    sender: str = "sender@client.test",
    params: str = "",
    code: int = 250,
    enhanced: str | None = None,
) -> Reply:
    """One transaction to one recipient: MAIL and RCPT (250), DATA (354), ``code`` at the end."""
    mail_rcpt(c, rcpt, sender=sender, params=params)
    return send_data(c, body, code, enhanced)


# --------------------------------------------------------------------------------------------
# Stored messages
# --------------------------------------------------------------------------------------------


@dataclass
class Stored:
    return_path: bytes  # the full "Return-Path: ..." line without CRLF
    received: bytes  # the Received header, unfolded, without CRLF
    rest: bytes  # everything after the two prepended headers: the message as received
    raw: bytes = field(repr=False, default=b"")
    auth_results: bytes = b""  # mailerd's Authentication-Results field, unfolded, if any


def parse_stored(raw: bytes) -> Stored:
    """Split a stored message into its Return-Path line, Received header (and the
    Authentication-Results field the inbound checks add to mail from the network listener)
    and the original."""
    assert raw.startswith(b"Return-Path: "), (
        f"stored message must start with Return-Path: {raw[:200]!r}"
    )
    rp_end = raw.index(CRLF)
    return_path = raw[:rp_end]
    assert b"\n" not in return_path and b"\r" not in return_path, raw[:200]
    pos = rp_end + 2
    assert raw.startswith(b"Received: ", pos), f"second header must be Received: {raw[:300]!r}"
    end = raw.index(CRLF, pos)
    received = raw[pos:end]
    pos = end + 2
    while raw[pos : pos + 1] in (b" ", b"\t"):  # folded continuation lines
        end = raw.index(CRLF, pos)
        received += b" " + raw[pos:end].strip()
        pos = end + 2
    assert b"\n" not in received.replace(b"\r\n", b""), raw[:300]
    auth_results = b""
    if raw.startswith(b"Authentication-Results: ", pos):  # the inbound checks' field (ours)
        end = raw.index(CRLF, pos)
        auth_results = raw[pos:end]
        pos = end + 2
        while raw[pos : pos + 1] in (b" ", b"\t"):
            end = raw.index(CRLF, pos)
            auth_results += b" " + raw[pos:end].strip()
            pos = end + 2
        assert re.match(rb"Authentication-Results: [^;\s]+;", auth_results), raw[:600]
    return Stored(return_path, received, raw[pos:], raw, auth_results)


def check_stored(
    raw: bytes,
    *,
    sender: str,
    helo: str,
    body: bytes,
    hostname: str = HOSTNAME,
    protocols: tuple[str, ...] = ("ESMTP",),
) -> Stored:
    st = parse_stored(raw)
    assert st.return_path == f"Return-Path: <{sender}>".encode(), st.return_path
    received = st.received.decode("utf-8", "replace")
    words = received.split()
    assert words[:3] == ["Received:", "from", helo], (
        f"Received must start 'from {helo}': {received}"
    )
    assert re.search(rf"\bby {re.escape(hostname)}\b", received), f"no 'by {hostname}': {received}"
    with_re = r"\bwith (" + "|".join(map(re.escape, protocols)) + r")\b"
    assert re.search(with_re, received), f"no 'with {'/'.join(protocols)}': {received}"
    assert st.rest == body, (
        "stored body differs from what was sent\n"
        f" sent:   {body[:300]!r}\n stored: {st.rest[:300]!r}"
    )
    return st


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def place(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Put a file where a running mailerd watches (its maildrop) as `maildrop.submit` does:
    written under a dot-name, its mode set, then renamed. Written in place, it could be taken
    between the write and the chmod."""
    temporary = path.with_name(f".{path.name}")
    temporary.write_bytes(content)
    temporary.chmod(mode)
    temporary.rename(path)


def proc_cmdline(pid: int) -> str | None:
    """The process title as shown by ps (NULs → spaces, stripped); None if the pid is gone."""
    try:
        data = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return data.replace(b"\0", b" ").decode("utf-8", "replace").strip()


# --------------------------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------------------------


def listing(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative) → file content (None for directories)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir != "." and rel_dir.split(os.sep)[0] in exclude:
            continue
        for d in dirnames:
            rel = os.path.normpath(os.path.join(rel_dir, d))
            if rel.split(os.sep)[0] not in exclude:
                out[rel + "/"] = None
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if rel.split(os.sep)[0] in exclude:
                continue
            path = Path(dirpath, f)
            if not stat.S_ISREG(path.lstat().st_mode):
                out[rel] = b"<not a file>"  # the pickup's FIFO, a socket: never read those
                continue
            try:
                out[rel] = path.read_bytes()
            except OSError:
                out[rel] = b"<unreadable>"
    return out


def files_under(root: Path) -> set[str]:
    """Relative paths of all regular files under ``root`` (not sockets, FIFOs or dirs)."""
    if not root.exists():
        return set()
    out = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p):
                out.add(os.path.relpath(p, root))
    return out


_dns: DNSServer | None = None


def suite_dns() -> tuple[str, int]:
    """The suite's own DNS server (in this process, for the whole session): it knows no name at
    all, so mail for a remote domain bounces as NXDOMAIN without a query ever leaving."""
    global _dns
    if _dns is None:
        _dns = DNSServer(Records())
        _dns.start()
    return _dns.host, _dns.port


class Mailerd:
    """One mailerd instance: ``-l`` (trusted) and ``-n`` (untrusted) on 127.0.0.1 and ::1.

    Unless the test gives its own ``--dns-server`` and ``--aliases``, it gets the suite's DNS
    server (`suite_dns`) and no aliases (`isolation_args`)."""

    def __init__(
        self,
        base: Path,
        *,
        spool: Path | None = None,
        queue: Path | None = None,
        domains: tuple[str, ...] = LOCAL_DOMAINS,
        hostname: str = HOSTNAME,
        workers: int = 2,
        extra: tuple[str, ...] | list[str] = (),
        name: str = "mailerd",
    ):
        self.base = Path(base)
        self.spool = Path(spool) if spool else self.base / "spool"
        self.queue = Path(queue) if queue else self.base / "queue"
        self.logdir = self.base / "logs"
        self.name = name
        self.domains = domains
        self.hostname = hostname
        self.workers = workers
        self.extra = list(extra)
        self.trusted_port = free_port()
        self.untrusted_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.spool.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ----------------------------------------------------------------------------
    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "mailerd", "-f", "-s", str(self.spool), "-q", str(self.queue)]
        for d in self.domains:
            args += ["-d", d]
        args += ["-H", self.hostname, "-w", str(self.workers)]
        args += ["-l", f"127.0.0.1:{self.trusted_port}", "-l", f"[::1]:{self.trusted_port}"]
        args += ["-n", f"127.0.0.1:{self.untrusted_port}", "-n", f"[::1]:{self.untrusted_port}"]
        return args + self.isolation_args() + self.extra

    def isolation_args(self) -> list[str]:
        """What keeps this mailerd away from the machine's own setup, unless the test says
        otherwise: the suite's DNS server (never the machine's resolver), an empty aliases
        file (never /etc/aliases, which an MTA package may have filled) and no passwords
        (never /etc/mailerd/passwd, which the Debian package test may leave)."""
        given = set(self.extra) | {f"--{key}" for key in self.config_file_keys()}
        args = []
        if "--dns-server" not in given:
            host, port = suite_dns()
            args += ["--dns-server", f"{host}:{port}"]
        if "--aliases" not in given:
            args += ["--aliases", str(self.no_aliases())]
        if "--passwd" not in given:
            args += ["--passwd", str(self.base / "no-passwd")]
        return args

    def config_file_keys(self) -> set[str]:
        """The keys the -c file of `extra` sets, if it can be read now (they are the test's)."""
        if "-c" not in self.extra[:-1]:
            return set()
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(self.extra[self.extra.index("-c") + 1])
            return set(parser["mailerd"]) if parser.has_section("mailerd") else set()
        except (OSError, configparser.Error):
            return set()

    def no_aliases(self) -> Path:
        path = self.base / "no-aliases"
        path.touch()
        return path

    def start(self, wait: bool = True) -> Mailerd:
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._out = open(self.logdir / f"{self.name}.stdout", "wb")  # noqa: SIM115
        self._err = open(self.logdir / f"{self.name}.stderr", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            start_new_session=True,  # own process group, so cleanup can find stragglers
        )
        if wait:
            try:
                self.wait_ready()
            except BaseException:  # (a server that never got ready must not outlive the test)
                self.stop()
                raise
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr_text(self) -> str:
        try:
            return (self.logdir / f"{self.name}.stderr").read_text("utf-8", "replace")
        except OSError:
            return ""

    def crashes(self) -> list[str]:
        """Python tracebacks and late imports in the server's stderr."""
        return server_problems(self.stderr_text())

    def endpoints(self) -> list[tuple[str, int]]:
        return [
            ("127.0.0.1", self.trusted_port),
            ("::1", self.trusted_port),
            ("127.0.0.1", self.untrusted_port),
            ("::1", self.untrusted_port),
        ]

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        for host, port in self.endpoints():
            wait_for_banner(self.proc, host, port, deadline, self.stderr_text)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait; SIGKILL the group on timeout. Returns the exit status."""
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.returncode = self.proc.returncode
        self._reap_group()
        return self.returncode

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def _reap_group(self) -> None:
        """Kill any process still in our process group (workers orphaned by a broken master)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for f in (getattr(self, "_out", None), getattr(self, "_err", None)):
            if f is not None:
                f.close()

    # -- processes ------------------------------------------------------------------------------
    def children(self) -> list[int]:
        return children_of(self.pid)

    def descendants(self) -> list[int]:
        return descendants_of(self.pid)

    def titles(self) -> dict[int, str]:
        out = {}
        for pid in self.descendants():
            title = proc_cmdline(pid)
            if title is not None:
                out[pid] = title
        return out

    def worker_pids(self) -> list[int]:
        return sorted(p for p, t in self.titles().items() if t.startswith("mailerd: worker"))

    # -- clients --------------------------------------------------------------------------------
    def port(self, trusted: bool) -> int:
        return self.trusted_port if trusted else self.untrusted_port

    def connect(self, trusted: bool = True, host: str = "127.0.0.1") -> SMTPConn:
        return SMTPConn(host, self.port(trusted))

    def smtp(
        self, trusted: bool = True, host: str = "127.0.0.1", helo: str = "client.test"
    ) -> smtplib.SMTP:
        return smtplib.SMTP(host, self.port(trusted), local_hostname=helo, timeout=IO_TIMEOUT)

    # -- spool ----------------------------------------------------------------------------------
    def add_user(self, user: str) -> Path:
        p = self.spool / user
        p.mkdir(parents=True, exist_ok=True)
        return p

    def new_user(self, prefix: str = "u") -> str:
        """Create a mailbox with a fresh ``unique(prefix)`` name and return that name."""
        user = unique(prefix)
        self.add_user(user)
        return user

    def messages(self, user: str) -> list[int]:
        """Message numbers in a mailbox (files named only by digits), sorted."""
        box = self.spool / user
        if not box.is_dir():
            return []
        return sorted(int(f.name) for f in box.iterdir() if f.name.isdigit() and f.is_file())

    def read(self, user: str, n: int) -> bytes:
        return (self.spool / user / str(n)).read_bytes()

    def status(self, user: str, n: int) -> bytes:
        return (self.spool / user / f"{n}.status").read_bytes()

    def wait_messages(self, user: str, count: int, timeout: float = 10.0) -> list[int]:
        wait_until(lambda: len(self.messages(user)) >= count, timeout)
        return self.messages(user)

    def queue_files(self) -> set[str]:
        return files_under(self.queue)


def has_recent(status: bytes) -> bool:
    return any(line.strip() == b"\\Recent" for line in status.splitlines())


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def mailerd_factory(tmp_path: Path) -> Iterator[Callable[..., Mailerd]]:
    """Build (and by default start) Mailerd instances that are always stopped at teardown."""
    made: list[Mailerd] = []

    def make(start: bool = True, base: Path | None = None, cls: type = Mailerd, **kw) -> Mailerd:
        if base is None:
            base = tmp_path if not made else tmp_path / f"instance{len(made)}"
        base.mkdir(parents=True, exist_ok=True)
        kw.setdefault("name", f"mailerd{len(made)}")
        m = cls(base, **kw)
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    problems = []
    for m in made:
        if m.proc is None:
            continue
        was_running = m.proc.poll() is None
        rc = m.stop()
        if was_running and rc != 0:
            problems.append(f"{m.name}: exit status {rc} after SIGTERM")
        problems += [f"{m.name} logged a crash:\n{c}" for c in m.crashes()]
    if problems:
        pytest.fail("server problems seen at teardown:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def mailerd(mailerd_factory) -> Mailerd:
    """A fresh, started instance with default options."""
    return mailerd_factory()


@pytest.fixture(scope="module")
def shared_mailerd(tmp_path_factory) -> Iterator[Mailerd]:
    """One started instance per test module, for tests that use their own mailboxes."""
    base = tmp_path_factory.mktemp("shared")
    m = Mailerd(base, name="shared")
    m.start()
    yield m
    finish(m)


def finish(m: Mailerd) -> None:
    """Stop a module-scoped instance; fail (at teardown) on a bad exit status or a crash."""
    was_running = m.proc is not None and m.proc.poll() is None
    rc = m.stop()
    problems = [f"exit status {rc} after SIGTERM"] if was_running and rc != 0 else []
    problems += [f"logged a crash:\n{c}" for c in m.crashes()]
    if problems:
        pytest.fail(f"{m.name}: " + "\n".join(problems), pytrace=False)


_counter = 0
_counter_lock = threading.Lock()


def unique(prefix: str = "u") -> str:
    """A short, unique, lower-case mailbox name."""
    global _counter
    with _counter_lock:
        _counter += 1
        return f"{prefix}{os.getpid() % 1000}x{_counter}"


def run_mailerd(args: list[str], timeout: float = 15.0, cwd: Path | None = None):
    """Run ``python -m mailerd ARGS`` to completion (for option errors, -h, -V).

    Returns a CompletedProcess; if it is still running after ``timeout`` (for instance because
    a bad option was wrongly accepted and the server started), its whole process group is
    killed and the returncode is None.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailerd", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=cwd or REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        rc = None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stray workers of a wrongly started server
    return subprocess.CompletedProcess(proc.args, rc, out, err)

"""TLS: STARTTLS on every listener, implicit TLS (the 465-style submission listener), the
certificates (RSA and ECDSA together, SNI, a bad one at start-up, a new one on SIGHUP), the
STARTTLS command injection (CVE-2011-0411 and kin) and what the Received: header says of TLS.

Everything runs against real mailerd instances with real clients on 127.0.0.1 and ::1: Python's
ssl module (verifying the chain against a test CA and the host name), `openssl s_client` for
what Python cannot ask for (TLS 1.3 signature algorithms). The certificates come from
tests/certs.py's CA; the main one also names 127.0.0.1 and ::1, so that clients that check the
host they connect to (msmtp, mutt, curl in test_submission.py) verify it as they would a real
server.

test_submission.py imports the helpers of this module (`TLSMailerd`, `Client`, `PKI`…).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import CA, Pair, make_ca

from .conftest import (
    CRLF,
    HOSTNAME,
    IO_TIMEOUT,
    REPO,
    Mailerd,
    Reply,
    SMTPConn,
    check_stored,
    ehlo_keywords,
    expect,
    finish,
    free_port,
    mail_rcpt,
    owner_transaction,
    parse_stored,
    send_data,
    send_message,
    wait_until,
)

HOSTS = [pytest.param("127.0.0.1", id="ipv4"), pytest.param("::1", id="ipv6")]
OTHER_NAME = "mail.example.net"  # the second name of the SNI tests
HELO = "client.test"
AUTH_LINE = "AUTH PLAIN LOGIN"  # the EHLO line, exactly

# "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))", a line of Received:
USING_RE = re.compile(
    rb"^[ \t]+\(using (TLSv1\.[0-9]) with cipher ([A-Za-z0-9_-]+) \(([0-9]+)/([0-9]+) bits\)\)$"
)


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: CA
    rsa: Pair  # mx.example.org, 127.0.0.1 and ::1, RSA
    ecdsa: Pair  # the same names, ECDSA P-256
    other: Pair  # mail.example.net, RSA


def issue_with_ips(ca: CA, name: str, kind: str, ips: Sequence[str], tag: str = "") -> Pair:
    """Like CA.issue, with IP addresses in the subjectAltName as well (for clients that
    verify the address they were given: msmtp, mutt, curl)."""
    stem = f"{name}-ip{'-' + tag if tag else ''}-{kind}"
    key, csr, cert, ext = (ca.directory / f"{stem}.{s}" for s in ("key", "csr", "crt", "ext"))
    if kind == "rsa":
        newkey = ["-newkey", "rsa:2048"]
    else:
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    _openssl("req", "-new", *newkey, "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    sans = ",".join([f"DNS:{name}", *(f"IP:{ip}" for ip in ips)])
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-out", cert, "-days", "30", "-sha256", "-extfile", ext,
    )  # fmt: skip
    key.chmod(0o600)
    return Pair(cert, key)


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_pki(directory: Path) -> PKI:
    ca = make_ca(directory)
    ips = ("127.0.0.1", "::1")
    return PKI(
        ca,
        issue_with_ips(ca, HOSTNAME, "rsa", ips),
        issue_with_ips(ca, HOSTNAME, "ecdsa", ips),
        ca.issue(OTHER_NAME, kind="rsa"),
    )


def der(pair_or_path: Pair | Path) -> bytes:
    """The DER bytes of a certificate file (its first certificate)."""
    path = pair_or_path.cert if isinstance(pair_or_path, Pair) else pair_or_path
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def serial(cert: Path) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-serial", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.strip().split("=", 1)[1].upper()


def client_context(ca: CA, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """What a careful client uses: the test CA as the only trust anchor, the host name
    checked; `version` pins the protocol."""
    context = ssl.create_default_context(cafile=str(ca.cert))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------

_sources = itertools.count(10)


def fresh_source() -> str:
    """A loopback source address no other session of this test run used (127.0.0.10 …), for
    tests whose outcome depends on what the server remembers of a client address (the
    growing delay after failed AUTH)."""
    n = next(_sources)
    return f"127.0.{n // 250}.{n % 250 + 2}"


class Client(SMTPConn):
    """SMTPConn that may bind a source address, STARTTLS, or speak TLS from the first byte."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
        name: str | None = HOSTNAME,
        timeout: float = IO_TIMEOUT,
    ):
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock.settimeout(timeout)
        self.buf = b""
        self.transcript = []
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=name)

    @property
    def tls(self) -> ssl.SSLSocket:
        assert isinstance(self.sock, ssl.SSLSocket), "no TLS in this session"
        return self.sock

    def starttls(self, context: ssl.SSLContext, name: str | None = HOSTNAME) -> Reply:
        """STARTTLS (expecting exactly `220 2.0.0 Ready to start TLS`), then the handshake."""
        reply = expect(self.cmd("STARTTLS"), 220, "2.0.0", conn=self)
        assert reply.lines == ["2.0.0 Ready to start TLS"], reply
        assert self.buf == b"", f"bytes after the 220, before TLS: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=name)
        return reply

    def peer_der(self) -> bytes:
        cert = self.tls.getpeercert(binary_form=True)
        assert cert is not None
        return cert

    def auth_plain(self, user: str, password: str) -> Reply:
        return self.cmd(f"AUTH PLAIN {plain_blob(user, password)}")

    def auth_login(self, user: str, password: str) -> Reply:
        expect(self.cmd("AUTH LOGIN"), 334, conn=self)
        expect(self.cmd(b64(user)), 334, conn=self)
        return self.cmd(b64(password))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain_blob(user: str, password: str) -> str:
    return b64(f"\0{user}\0{password}")


def keyword_lines(reply: Reply) -> list[str]:
    """The extension lines of an EHLO reply, as written."""
    return reply.lines[1:]


class NamedSMTP(smtplib.SMTP):
    """smtplib.SMTP that connects to `address` but knows the server as `name`, so that
    starttls() checks the certificate against that name (as a client does after its MX
    lookup)."""

    def __init__(self, address: str, port: int, name: str = HOSTNAME, **kw):
        self._address = address
        kw.setdefault("local_hostname", HELO)
        kw.setdefault("timeout", IO_TIMEOUT)
        super().__init__(name, port, **kw)

    def _get_socket(self, host, port, timeout):
        return socket.create_connection((self._address, port), timeout, self.source_address)


class NamedSMTP_SSL(smtplib.SMTP_SSL):
    """smtplib.SMTP_SSL, connecting to `address`, verifying the certificate for `name`."""

    def __init__(self, address: str, port: int, name: str = HOSTNAME, **kw):
        self._address = address
        kw.setdefault("local_hostname", HELO)
        kw.setdefault("timeout", IO_TIMEOUT)
        super().__init__(name, port, **kw)

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((self._address, port), timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=host)


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class TLSMailerd(Mailerd):
    """Mailerd with certificates, a submission listener (STARTTLS, 587-style) and a
    submissions listener (implicit TLS, 465-style) on 127.0.0.1 and ::1, and a passwd file."""

    def __init__(
        self,
        base: Path,
        *,
        pairs: Sequence[Pair] = (),
        passwd: Path | None = None,
        submission: bool = True,
        submissions: bool = True,
        extra: Sequence[str] = (),
        **kw,
    ):
        self.pairs = list(pairs)
        self.passwd = passwd
        self.submission_port = free_port() if submission else 0
        self.submissions_port = free_port() if submissions else 0
        args: list[str] = []
        for pair in self.pairs:
            args += ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]
        for host in ("127.0.0.1", "[::1]"):
            if submission:
                args += ["--listen-submission", f"{host}:{self.submission_port}"]
            if submissions:
                args += ["--listen-submissions", f"{host}:{self.submissions_port}"]
        if passwd is not None:
            args += ["--passwd", str(passwd)]
        super().__init__(base, extra=[*args, *extra], **kw)

    def endpoints(self) -> list[tuple[str, int]]:
        out = super().endpoints()
        if self.submission_port:
            out += [("127.0.0.1", self.submission_port), ("::1", self.submission_port)]
        return out

    def wait_ready(self, timeout: float = 10.0) -> None:
        super().wait_ready(timeout)
        if not self.submissions_port:
            return
        deadline = time.monotonic() + timeout
        for host in ("127.0.0.1", "::1"):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mailerd exited at start-up:\n{self.stderr_text()}")
                try:
                    with Client(host, self.submissions_port, tls=unverified_context()) as c:
                        if c.banner().code == 220:
                            break
                except (OSError, EOFError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no TLS banner on [{host}]:{self.submissions_port}")
                time.sleep(0.05)

    def log_mark(self) -> int:
        return len(self.stderr_text())

    def log_since(self, mark: int) -> str:
        return self.stderr_text()[mark:]

    def listener_port(self, listener: str) -> int:
        return {
            "local": self.trusted_port,
            "network": self.untrusted_port,
            "submission": self.submission_port,
            "submissions": self.submissions_port,
        }[listener]


def passwd_conf(directory: Path, pidfile: Path | None = None) -> Path:
    """A config file for `mailerd passwd -c`: it names the pid file of the mailerd it makes
    reload (a path nobody uses when none is given, never the machine's /run/mailerd.pid)."""
    conf = directory / "passwd-command.conf"
    conf.write_text(f"[mailerd]\npidfile = {pidfile or directory / 'no-such-mailerd.pid'}\n")
    return conf


def mailerd_passwd(
    passwd: Path, user: str, stdin: str = "", *, conf: Path, delete: bool = False
) -> subprocess.CompletedProcess:
    """`python -m mailerd passwd -c CONF --passwd FILE [--delete] USER`, stdin not a terminal."""
    argv = [sys.executable, "-m", "mailerd", "passwd", "-c", str(conf), "--passwd", str(passwd)]
    argv += ["--delete", user] if delete else [user]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, cwd=REPO)


def set_password(passwd: Path, user: str, password: str, conf: Path) -> None:
    done = mailerd_passwd(passwd, user, password + "\n", conf=conf)
    assert done.returncode == 0, f"mailerd passwd {user}: {done.returncode}\n{done.stderr}"


def new_password() -> str:
    return f"Pw-{uuid.uuid4().hex[:12]}!"


def received_lines(raw: bytes) -> list[bytes]:
    """The physical lines of the stored message's Received: header (the second header)."""
    lines = raw.split(b"\r\n")
    assert lines[1].startswith(b"Received: "), raw[:300]
    out = [lines[1]]
    for line in lines[2:]:
        if line[:1] not in (b" ", b"\t"):
            break
        out.append(line)
    return out


def using_line(raw: bytes) -> tuple[str, str, int, int] | None:
    """(version, cipher, bits, bits) of the Received: header's `(using …)` line, or None; fails
    when a line mentions `using` in any other form."""
    found = None
    for line in received_lines(raw):
        match = USING_RE.match(line)
        if match:
            assert found is None, f"two (using …) lines: {received_lines(raw)}"
            version, cipher, a, b = match.groups()
            found = (version.decode(), cipher.decode(), int(a), int(b))
        else:
            assert b"(using" not in line, f"malformed (using …) line: {line!r}"
    return found


def expected_using(sock: ssl.SSLSocket) -> tuple[str, str, int, int]:
    cipher = sock.cipher()
    version = sock.version()
    assert cipher is not None and version is not None
    return version, cipher[0], cipher[2], cipher[2]


def message(token: str, author: str = f"sender@{HELO}") -> bytes:
    """A small message; an authenticated user's must have an `author` of theirs."""
    return f"Subject: {token}\r\nFrom: <{author}>\r\n\r\n{token}\r\n".encode()


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Account:
    user: str
    password: str


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, pki: PKI) -> Iterator[tuple[TLSMailerd, Account]]:
    """One RSA certificate; -l, -n, submission and submissions; one user with a password."""
    base = tmp_path_factory.mktemp("tls")
    passwd = base / "passwd"
    m = TLSMailerd(base, pairs=[pki.rsa], passwd=passwd, name="tls")
    account = Account(m.new_user("tls"), new_password())
    set_password(passwd, account.user, account.password, passwd_conf(base))
    m.start()
    yield m, account
    finish(m)


@pytest.fixture(scope="module")
def multi_server(tmp_path_factory, pki: PKI) -> Iterator[TLSMailerd]:
    """RSA and ECDSA certificates for mx.example.org and an RSA one for mail.example.net."""
    base = tmp_path_factory.mktemp("multi")
    m = TLSMailerd(base, pairs=[pki.rsa, pki.ecdsa, pki.other], submission=False, name="multi")
    m.start()
    yield m
    finish(m)


# --------------------------------------------------------------------------------------------
# STARTTLS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["local", "network", "submission"])
@pytest.mark.parametrize("host", HOSTS)
def test_starttls_offered_until_tls_is_active(tls_server, pki: PKI, listener: str, host: str):
    m, _ = tls_server
    with Client(host, m.listener_port(listener)) as c:
        expect(c.banner(), 220, conn=c)
        reply = expect(c.ehlo(HELO), 250, conn=c)
        assert "STARTTLS" in ehlo_keywords(reply), reply
        expect(c.cmd("STARTTLS now"), 501, "5.5.4", conn=c)
        c.starttls(client_context(pki.ca))
        assert c.tls.version() in ("TLSv1.2", "TLSv1.3")
        # RFC 3207 4.2: the session starts over; a MAIL before the new EHLO is out of order
        expect(c.cmd("MAIL FROM:<sender@client.test>"), 503, "5.5.1", conn=c)
        reply = expect(c.ehlo(HELO), 250, conn=c)
        assert "STARTTLS" not in ehlo_keywords(reply), reply
        expect(c.cmd("STARTTLS"), 503, "5.5.1", conn=c)
        expect(c.cmd("NOOP"), 250, conn=c)
        expect(c.cmd("QUIT"), 221, conn=c)


@pytest.mark.parametrize("host", HOSTS)
def test_starttls_forgets_the_authentication(tls_server, pki: PKI, host: str):
    """RFC 3207 4.2: what the client said before TLS counts for nothing after it, its AUTH on
    the local listener (where AUTH is offered in clear) included."""
    m, account = tls_server
    rcpt = m.new_user("forget")
    body = message(f"forget-{uuid.uuid4().hex}")
    with Client(host, m.trusted_port) as c:
        c.start(HELO)
        expect(c.auth_plain(account.user, account.password), 235, "2.7.0", conn=c)
        c.starttls(client_context(pki.ca))
        expect(c.ehlo(HELO), 250, conn=c)
        send_message(c, f"{rcpt}@example.org", body)  # the local listener needs no AUTH
        again = c.auth_plain(account.user, account.password)
        expect(c.cmd("QUIT"), 221, conn=c)
    (n,) = m.wait_messages(rcpt, 1)
    check_stored(
        m.read(rcpt, n), sender="sender@client.test", helo=HELO, body=body, protocols=("ESMTPS",)
    )
    expect(again, 235, "2.7.0", conn=c)


@pytest.mark.parametrize("host", HOSTS)
def test_implicit_tls(tls_server, pki: PKI, host: str):
    """The submissions listener speaks TLS from the first byte: the banner comes inside TLS;
    STARTTLS is neither offered nor accepted; AUTH is offered."""
    m, _ = tls_server
    with Client(host, m.submissions_port, tls=client_context(pki.ca)) as c:
        assert c.tls.version() in ("TLSv1.2", "TLSv1.3")
        assert c.peer_der() == der(pki.rsa)
        expect(c.banner(), 220, conn=c)
        reply = expect(c.ehlo(HELO), 250, conn=c)
        assert "STARTTLS" not in ehlo_keywords(reply), reply
        assert AUTH_LINE in keyword_lines(reply), reply
        expect(c.cmd("STARTTLS"), 503, "5.5.1", conn=c)
        expect(c.cmd("QUIT"), 221, conn=c)
    # A plain-text client gets no banner there: the server waits for a ClientHello.
    with Client(host, m.submissions_port, timeout=0.5) as c, pytest.raises(TimeoutError):
        c.sock.recv(100)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("listener", ["network", "submissions"])
def test_tls_versions(tls_server, pki: PKI, listener: str):
    """TLS 1.2 and 1.3 are spoken; TLS 1.1 and 1.0 are refused (the client allows them, even
    with SHA-1: security level 0)."""
    m, _ = tls_server

    def connect(context: ssl.SSLContext) -> Client:
        if listener == "submissions":
            return Client("127.0.0.1", m.submissions_port, tls=context)
        c = Client("127.0.0.1", m.untrusted_port)
        try:
            c.start(HELO)
            c.starttls(context)
        except BaseException:
            c.close()
            raise
        return c

    for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
        with connect(client_context(pki.ca, version)) as c:
            assert c.tls.version() == name
            if listener == "submissions":
                expect(c.banner(), 220, conn=c)
            expect(c.ehlo(HELO), 250, conn=c)
    old = unverified_context()
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    mark = m.log_mark()
    with pytest.raises(ssl.SSLError) as refused:
        c = connect(old)
        c.close()
    # The refusal comes with its alert, so the client can say why (not "connection lost").
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    assert wait_until(lambda: "failed: UNSUPPORTED_PROTOCOL" in m.log_since(mark), 5)


@pytest.mark.parametrize("listener", ["network", "submissions"])
def test_no_shared_cipher_is_said(tls_server, listener: str):
    """A client offering only ciphers we do not (TLS 1.2 without forward secrecy) is told so
    with a handshake_failure alert, and the log says why."""
    m, _ = tls_server
    context = unverified_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-SHA:AES256-SHA")
    mark = m.log_mark()
    with pytest.raises(ssl.SSLError) as refused:
        if listener == "submissions":
            Client("127.0.0.1", m.submissions_port, tls=context).close()
        else:
            with Client("127.0.0.1", m.untrusted_port) as c:
                c.start(HELO)
                c.starttls(context)
    assert refused.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE", refused.value
    assert wait_until(lambda: "failed: NO_SHARED_CIPHER" in m.log_since(mark), 5)


@pytest.mark.slow
def test_a_handshake_not_done_within_the_timeout_ends(tls_server):
    """A client that says STARTTLS and then nothing, and one that sends half a ClientHello to
    the implicit-TLS listener, are cut off after the 30 s handshake timeout, and logged."""
    m, _ = tls_server
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = unverified_context().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = outgoing.read()
    mark = m.log_mark()
    started = time.monotonic()
    with (
        Client("127.0.0.1", m.untrusted_port) as silent,
        socket.create_connection(("127.0.0.1", m.submissions_port), timeout=IO_TIMEOUT) as partial,
    ):
        silent.start(HELO)
        expect(silent.cmd("STARTTLS"), 220, conn=silent)
        partial.sendall(client_hello[: len(client_hello) // 2])
        assert silent.wait_eof(40) == b""
        partial.settimeout(40)
        assert partial.recv(100) == b""
    assert 29 < time.monotonic() - started < 40
    timed_out = wait_until(lambda: m.log_since(mark).count("failed: timed out") == 2, 5)
    assert timed_out, m.log_since(mark)


def _client_hello() -> tuple[bytes, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A TLS client over memory BIOs, and its ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = unverified_context().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read(), tls, incoming, outgoing


def _tls_socket(m: Mailerd, listener: str) -> socket.socket:
    """A connection to the listener, ready for a ClientHello (after STARTTLS's 220)."""
    if listener == "submissions":
        return socket.create_connection(("127.0.0.1", m.submissions_port), timeout=IO_TIMEOUT)
    c = Client("127.0.0.1", m.untrusted_port)
    c.start(HELO)
    expect(c.cmd("STARTTLS"), 220, conn=c)
    return c.sock


@pytest.mark.parametrize("listener", ["network", "submissions"])
@pytest.mark.parametrize("how", ["closed", "reset"])
def test_a_handshake_the_client_abandons_is_logged(tls_server, listener: str, how: str):
    m, _ = tls_server
    mark = m.log_mark()
    sock = _tls_socket(m, listener)
    port = sock.getsockname()[1]
    sock.sendall(_client_hello()[0])
    # The server's answer is read first: it shows the server has the connection in hand. (A
    # reset before that can beat the worker to the connection, which then has no peer address
    # to log: the kernel forgets it with the reset. And a close with the answer unread resets.)
    assert sock.recv(65536)
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    why = "the client closed the connection" if how == "closed" else "Connection reset by peer"
    line = f"TLS handshake with [127.0.0.1]:{port} failed: "
    assert wait_until(lambda: line in m.log_since(mark), 5), m.log_since(mark)
    assert why in m.log_since(mark).split(line, 1)[1].splitlines()[0]


@pytest.mark.parametrize("listener", ["network", "submissions"])
def test_a_connection_reset_before_its_worker_takes_it_up_is_logged_as_such(tls_server, listener):
    """The kernel forgets a connection's peer with its reset: one reset while the workers are
    busy elsewhere (here: stopped) has no address when they come to it, and is neither answered
    nor logged as a session of '?'."""
    m, _ = tls_server
    port = m.submissions_port if listener == "submissions" else m.untrusted_port
    mark = m.log_mark()
    workers = m.worker_pids()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        if listener == "submissions":
            sock.sendall(_client_hello()[0])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        time.sleep(0.2)  # (the reset reaches the connection still waiting in the kernel)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    line = "was reset by its client before it began"
    assert wait_until(lambda: line in m.log_since(mark), 5), m.log_since(mark)
    assert "?" not in m.log_since(mark), m.log_since(mark)
    with m.connect(trusted=False) as c:  # (and the workers go on)
        expect(c.banner(), 220)


def test_a_close_notify_behind_the_last_command_is_taken_at_once(tls_server):
    """A client that sends a command and its close_notify in one packet gets the answer and
    the end of the session then, not after the server's idle timeout."""
    m, _ = tls_server
    hello, tls, incoming, outgoing = _client_hello()
    with socket.create_connection(("127.0.0.1", m.submissions_port), timeout=5) as sock:
        sock.sendall(hello)
        while True:
            incoming.write(sock.recv(65536))
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
        sock.sendall(outgoing.read())
        tls.write(b"NOOP\r\n")
        with pytest.raises(ssl.SSLWantReadError):
            tls.unwrap()
        sock.sendall(outgoing.read())
        started, plain = time.monotonic(), b""
        while chunk := sock.recv(65536):
            incoming.write(chunk)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                while data := tls.read(65536):
                    plain += data
        assert time.monotonic() - started < 3, "the session was not ended at once"
    assert plain.startswith(b"220 ") and b"\r\n250 2.0.0" in plain, plain


class RecordClient:
    """A TLS 1.3 client after STARTTLS whose records the test cuts: OpenSSL over memory BIOs,
    every record it writes sent, or kept to be sent at once (`records`, `key_updates`)."""

    def __init__(self, port: int):
        c = Client("127.0.0.1", port)
        c.start(HELO)
        expect(c.cmd("STARTTLS"), 220, conn=c)
        self.sock, self.incoming, self.outgoing = c.sock, ssl.MemoryBIO(), ssl.MemoryBIO()
        context = unverified_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.tls = context.wrap_bio(self.incoming, self.outgoing)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self.incoming.write(self.sock.recv(65536))
        self.sock.sendall(self.outgoing.read())

    def cmd(self, line: bytes) -> bytes:
        self.tls.write(line + CRLF)
        self.sock.sendall(self.outgoing.read())
        answer = b""
        while not re.search(rb"(^|\n)[0-9]{3} [^\n]*\n$", answer):
            self.incoming.write(self.sock.recv(65536))
            with contextlib.suppress(ssl.SSLWantReadError):
                while data := self.tls.read(65536):
                    answer += data
        return answer

    def records(self, data: bytes, size: int) -> bytes:
        """The records of `data`, `size` octets of it in each."""
        for start in range(0, len(data), size):
            self.tls.write(data[start : start + size])
        return self.outgoing.read()

    def key_updates(self, count: int) -> bytes:
        """`count` KeyUpdate records (no answer asked), which carry no data."""
        lib = ctypes.CDLL(ssl._ssl.__file__)  # (OpenSSL, as Python's ssl module links it)
        lib.SSL_version.argtypes = lib.SSL_do_handshake.argtypes = [ctypes.c_void_p]
        lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
        # The SSL the object wraps: CPython's _ssl._SSLSocket holds it after a weak reference.
        sslobj = self.tls._sslobj  # type: ignore[attr-defined]
        where = id(sslobj) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)
        pointer = ctypes.c_void_p.from_address(where).value
        assert pointer and lib.SSL_version(pointer) == 0x0304, "not this TLS 1.3 connection"
        for _ in range(count):
            assert lib.SSL_key_update(pointer, 0) == 1 and lib.SSL_do_handshake(pointer) == 1
        return self.outgoing.read()


def _unread(sock: socket.socket) -> int:
    """Octets a client sent on an IPv4 connection that its server has not read yet (the
    rx_queue of the server's end in /proc/net/tcp)."""
    ends = [
        ":".join((socket.inet_aton(host)[::-1].hex().upper(), f"{port:04X}"))
        for host, port in (sock.getpeername(), sock.getsockname())
    ]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1:3] == ends:
            return int(fields[4].split(":")[1], 16)
    return 0


@pytest.mark.parametrize("records", ["one-octet", "key-update"])
def test_clients_sending_costly_records_do_not_starve_the_owner(
    mailerd_factory, pki: PKI, records: str
):
    """Two clients send TLS records that cost much to read for what they carry: message
    content one octet a record, or KeyUpdates, which carry none. The owner's session on the
    same worker still gets its replies at once. A TLS read's turn was charged for its
    plaintext: 256 KB of records came a read (11,000 of them, or 9,700 key updates) and 32
    reads a wakeup, and the owner's transaction took 3 s (an attacker's pass at the TLS
    layer)."""
    m = mailerd_factory(
        cls=TLSMailerd, pairs=[pki.rsa], workers=1, submission=False, submissions=False
    )
    user = m.new_user("records")
    streams = []
    for _ in range(2):
        c = RecordClient(m.untrusted_port)
        c.cmd(b"EHLO streamer.test")
        if records == "one-octet":
            c.cmd(b"MAIL FROM:<a@streamer.test>")
            c.cmd(f"RCPT TO:<{user}@example.org>".encode())
            c.cmd(b"DATA")
            content = b"Subject: x\r\n\r\n" + (b"x" * 70 + CRLF) * 30_000
            wire = c.records(content, 1)  # (2 MB of content, 50 MB of records)
        else:
            wire = c.key_updates(150_000)  # (4 MB)
        streams.append((c.sock, wire))
    senders = [threading.Thread(target=_send, args=stream, daemon=True) for stream in streams]
    for sender in senders:
        sender.start()
    try:
        time.sleep(0.3)
        took = owner_transaction(m)
        assert took < 1.0, f"the owner's transaction took {took:.1f} s under the streams"
        assert any(_unread(sock) for sock, _ in streams), "the streams should still be read"
    finally:
        for sock, _ in streams:
            sock.shutdown(socket.SHUT_RDWR)  # (the senders stop)
        for sender in senders:
            sender.join(IO_TIMEOUT)
        for sock, _ in streams:
            sock.close()


def _send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


@pytest.mark.parametrize("listener", ["network", "submissions"])
def test_only_elliptic_curve_groups(tls_server, listener: str):
    """TLS 1.3's finite-field groups are refused (a handshake with ffdhe8192 cost a worker
    ~120 ms of CPU, a lever for anyone: "DHEat"); Postfix's elliptic curves are spoken."""
    m, _ = tls_server
    port = m.listener_port(listener)
    how = ["-starttls", "smtp"] if listener == "network" else []
    for group in ("ffdhe2048", "ffdhe8192"):
        done = subprocess.run(
            ["openssl", "s_client", *how, "-connect", f"127.0.0.1:{port}", "-tls1_3"]
            + ["-groups", group, "-brief"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode != 0, f"{group} was accepted:\n{done.stdout}{done.stderr}"
        assert "alert handshake failure" in done.stderr, done.stderr
    for group, says in (("X25519", "X25519"), ("P-256", "prime256v1"), ("P-384", "secp384r1")):
        output = s_client(*how, "-connect", f"127.0.0.1:{port}", "-tls1_3", "-groups", group)
        assert f"Server Temp Key: {says}" in output or f", {says}, " in output, output


def test_no_certificate_no_starttls(mailerd_factory):
    """Without a certificate nothing offers STARTTLS and the command starts nothing."""
    m = mailerd_factory()
    for trusted in (True, False):
        with m.connect(trusted) as c:
            expect(c.banner(), 220, conn=c)
            reply = expect(c.ehlo(HELO), 250, conn=c)
            assert "STARTTLS" not in ehlo_keywords(reply), reply
            assert c.cmd("STARTTLS").code != 220, c.dialogue()
            expect(c.cmd("NOOP"), 250, conn=c)


def test_submission_without_passwords_is_warned_of(mailerd_factory, pki: PKI):
    """A submission listener with no password to log in with starts, and says so (the master
    says it after its children's start: their banners can come first, as in one CI run)."""
    m = mailerd_factory(cls=TLSMailerd, pairs=[pki.rsa])
    said = r"no passwords in \S+: nobody can log in on .*mailerd passwd"
    assert wait_until(lambda: re.search(said, m.log_since(0)), 5), m.log_since(0)[-2000:]


def test_tls_required(mailerd_factory, pki: PKI):
    """--tls-required: MAIL before STARTTLS is refused on the network listener too."""
    m = mailerd_factory(
        cls=TLSMailerd, pairs=[pki.rsa], submission=False, submissions=False,
        extra=["--tls-required"],
    )  # fmt: skip
    user = m.new_user("req")
    for host in ("127.0.0.1", "::1"):
        with Client(host, m.untrusted_port) as c:
            c.start(HELO)
            expect(c.cmd("MAIL FROM:<sender@client.test>"), 530, "5.7.0", conn=c)
            c.starttls(client_context(pki.ca))
            expect(c.ehlo(HELO), 250, conn=c)
            send_message(c, f"{user}@example.org", message(f"required-{host}"))
            expect(c.cmd("QUIT"), 221, conn=c)
    assert m.wait_messages(user, 2) == [1, 2]


def test_certificates_from_the_config_file(mailerd_factory, pki: PKI, tmp_path: Path):
    """The config file's keys are the options' names: two certificates paired with their
    keys in order, a submissions listener."""
    port = free_port()
    conf = tmp_path / "tls.conf"
    conf.write_text(
        "[mailerd]\n"
        f"tls-cert = {pki.rsa.cert}, {pki.ecdsa.cert}\n"
        f"tls-key = {pki.rsa.key}, {pki.ecdsa.key}\n"
        f"listen-submissions = 127.0.0.1:{port}, [::1]:{port}\n"
    )
    m = mailerd_factory(extra=["-c", str(conf)])
    for host, cipher, pair in (
        ("127.0.0.1", "ECDHE-ECDSA-AES128-GCM-SHA256", pki.ecdsa),
        ("::1", "ECDHE-RSA-AES128-GCM-SHA256", pki.rsa),
    ):
        context = client_context(pki.ca, ssl.TLSVersion.TLSv1_2)
        context.set_ciphers(cipher)
        assert wait_until(lambda h=host: _accepts(h, port), 10), f"[{host}]:{port}"
        with Client(host, port, tls=context) as c:
            assert c.peer_der() == der(pair)
            expect(c.banner(), 220, conn=c)
            reply = expect(c.ehlo(HELO), 250, conn=c)
            assert "STARTTLS" not in ehlo_keywords(reply), reply
    with Client("127.0.0.1", m.untrusted_port) as c:  # and STARTTLS on the others
        c.start(HELO)
        c.starttls(client_context(pki.ca))


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Injection: what a client pipelines behind STARTTLS is never executed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["network", "submission"])
@pytest.mark.parametrize("host", HOSTS)
def test_bytes_after_starttls_are_discarded(tls_server, pki: PKI, listener: str, host: str):
    m, _ = tls_server
    source = fresh_source() if host == "127.0.0.1" else None
    mark = m.log_mark()
    with Client(host, m.listener_port(listener), source=source) as c:
        c.start(HELO)
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        reply = expect(c.read_reply(), 220, "2.0.0", conn=c)
        assert reply.lines == ["2.0.0 Ready to start TLS"], reply
        assert c.buf == b"", f"more after the 220: {c.buf!r}"
        # nothing more in plain text either (the MAIL answered before the handshake)
        c.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.sock.recv(1, socket.MSG_PEEK)
        c.sock.settimeout(IO_TIMEOUT)
        c.sock = client_context(pki.ca).wrap_socket(c.sock, server_hostname=HOSTNAME)
        # nothing is answered inside TLS for the injected MAIL...
        replies, eof = c.read_all_replies(timeout=0.5)
        assert replies == [] and not eof, c.dialogue()
        # ...and the first reply there is the NOOP's, the only one
        expect(c.cmd("NOOP"), 250, "2.0.0", conn=c)
        replies, eof = c.read_all_replies(timeout=0.5)
        assert replies == [] and not eof, c.dialogue()
        if listener == "network":  # the MAIL left no transaction behind
            expect(c.ehlo(HELO), 250, conn=c)
            expect(c.cmd("RCPT TO:<postmaster@example.org>"), 503, "5.5.1", conn=c)
        expect(c.cmd("QUIT"), 221, conn=c)
        assert c.wait_eof() is not None
    client = f"[{source or host}]"

    def discard_logged() -> list[str]:
        return [
            line
            for line in m.log_since(mark).splitlines()
            if re.search(r"(?i)discard|pipelin|inject", line) and client in line
        ]

    log = m.log_since(mark)
    assert wait_until(discard_logged, 5), f"no log line about the discarded bytes:\n{log}"
    assert "NOQUEUE: reject: MAIL" not in m.log_since(mark), m.log_since(mark)


@pytest.mark.parametrize("host", HOSTS)
def test_plain_text_after_the_220_is_not_executed(tls_server, host: str):
    """A command sent in clear after the 220 (where the ClientHello belongs) is no command:
    the handshake fails and the session ends, nothing answered."""
    m, _ = tls_server
    with Client(host, m.untrusted_port) as c:
        c.start(HELO)
        expect(c.cmd("STARTTLS"), 220, "2.0.0", conn=c)
        c.send(b"MAIL FROM:<injected@evil.test>\r\n")
        assert c.wait_eof(5) == b"", "the server answered in clear, or kept the session"


# --------------------------------------------------------------------------------------------
# Received:
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, version",
    [
        pytest.param("127.0.0.1", ssl.TLSVersion.TLSv1_3, id="ipv4-tls1.3"),
        pytest.param("::1", ssl.TLSVersion.TLSv1_2, id="ipv6-tls1.2"),
    ],
)
def test_received_esmtps(tls_server, pki: PKI, host: str, version: ssl.TLSVersion):
    m, _ = tls_server
    user = m.new_user("esmtps")
    body = message(f"esmtps-{uuid.uuid4().hex}")
    with Client(host, m.untrusted_port) as c:
        c.start(HELO)
        c.starttls(client_context(pki.ca, version))
        expect(c.ehlo(HELO), 250, conn=c)
        send_message(c, f"{user}@example.org", body)
        expected = expected_using(c.tls)
        expect(c.cmd("QUIT"), 221, conn=c)
    (n,) = m.wait_messages(user, 1)
    raw = m.read(user, n)
    check_stored(raw, sender="sender@client.test", helo=HELO, body=body, protocols=("ESMTPS",))
    assert using_line(raw) == expected, received_lines(raw)


@pytest.mark.parametrize("listener", ["submission", "submissions"])
def test_received_esmtpsa(tls_server, pki: PKI, listener: str):
    m, account = tls_server
    rcpt = m.new_user("esmtpsa")
    sender = f"{account.user}@example.org"
    body = message(f"esmtpsa-{uuid.uuid4().hex}", sender)
    if listener == "submissions":
        c = Client("::1", m.submissions_port, tls=client_context(pki.ca))
        expect(c.banner(), 220, conn=c)
    else:
        c = Client("::1", m.submission_port)
        c.start(HELO)
        c.starttls(client_context(pki.ca))
    with c:
        expect(c.ehlo(HELO), 250, conn=c)
        expect(c.auth_plain(account.user, account.password), 235, "2.7.0", conn=c)
        send_message(c, f"{rcpt}@example.org", body, sender=sender)
        expected = expected_using(c.tls)
        expect(c.cmd("QUIT"), 221, conn=c)
    (n,) = m.wait_messages(rcpt, 1)
    raw = m.read(rcpt, n)
    check_stored(raw, sender=sender, helo=HELO, body=body, protocols=("ESMTPSA",))
    assert using_line(raw) == expected, received_lines(raw)


def test_received_esmtpa_and_esmtp(tls_server):
    """AUTH on the loopback listener without TLS: ESMTPA, no (using …) line; neither: ESMTP."""
    m, account = tls_server
    rcpt = m.new_user("esmtpa")
    sender = f"{account.user}@example.org"
    bodies = [message(f"esmtpa-{uuid.uuid4().hex}", sender), message(f"esmtp-{uuid.uuid4().hex}")]
    with Client("127.0.0.1", m.trusted_port) as c:
        c.start(HELO)
        expect(c.auth_plain(account.user, account.password), 235, "2.7.0", conn=c)
        send_message(c, f"{rcpt}@example.org", bodies[0], sender=sender)
    with m.connect(trusted=False) as c:
        c.start(HELO)
        send_message(c, f"{rcpt}@example.org", bodies[1])
    first, second = (m.read(rcpt, n) for n in m.wait_messages(rcpt, 2))
    check_stored(first, sender=sender, helo=HELO, body=bodies[0], protocols=("ESMTPA",))
    check_stored(
        second, sender="sender@client.test", helo=HELO, body=bodies[1], protocols=("ESMTP",)
    )
    assert using_line(first) is None and using_line(second) is None


def test_ten_megabytes_over_tls(tls_server, pki: PKI):
    m, _ = tls_server
    user = m.new_user("big")
    lines = (f"{n:08d} {uuid.uuid4().hex * 2}\r\n".encode() for n in itertools.count())
    body = b"Subject: ten megabytes\r\n\r\n" + b"".join(
        itertools.islice(lines, 10 * 1024 * 1024 // 75)
    )
    assert len(body) > 10_000_000
    with NamedSMTP("::1", m.untrusted_port) as s:
        s.starttls(context=client_context(pki.ca))
        assert s.sendmail("sender@client.test", [f"{user}@example.org"], body) == {}
    (n,) = m.wait_messages(user, 1)
    check_stored(
        m.read(user, n), sender="sender@client.test", helo=HELO, body=body, protocols=("ESMTPS",)
    )


# --------------------------------------------------------------------------------------------
# Certificates: RSA and ECDSA, SNI
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cipher, kind",
    [("ECDHE-ECDSA-AES128-GCM-SHA256", "ecdsa"), ("ECDHE-RSA-AES128-GCM-SHA256", "rsa")],
)
@pytest.mark.parametrize("host", HOSTS)
def test_tls12_cipher_chooses_the_certificate(multi_server, pki: PKI, cipher, kind, host):
    m = multi_server
    context = client_context(pki.ca, ssl.TLSVersion.TLSv1_2)
    context.set_ciphers(cipher)
    with Client(host, m.untrusted_port) as c:
        c.start(HELO)
        c.starttls(context)
        assert c.tls.cipher()[0] == cipher
        assert c.peer_der() == der(getattr(pki, kind)), f"not the {kind} certificate"
        expect(c.ehlo(HELO), 250, conn=c)


def s_client(*args: str) -> str:
    done = subprocess.run(
        ["openssl", "s_client", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, f"openssl s_client {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def served_certificate(output: str) -> bytes:
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", output, re.S)
    assert pem, output
    return ssl.PEM_cert_to_DER_cert(pem.group(0))


@pytest.mark.parametrize(
    "sigalgs, kind, signature",
    [("ECDSA+SHA256", "ecdsa", "ECDSA"), ("rsa_pss_rsae_sha256", "rsa", "RSA-PSS")],
)
@pytest.mark.parametrize("host", HOSTS)
def test_tls13_signature_algorithms_choose_the_certificate(
    multi_server, pki: PKI, sigalgs: str, kind: str, signature: str, host: str
):
    m = multi_server
    where = f"[{host}]:{m.untrusted_port}" if ":" in host else f"{host}:{m.untrusted_port}"
    out = s_client(
        "-connect", where, "-starttls", "smtp", "-name", HELO, "-tls1_3", "-sigalgs", sigalgs,
        "-servername", HOSTNAME, "-verify_hostname", HOSTNAME, "-CAfile", str(pki.ca.cert),
        "-verify_return_error",
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in out, out
    assert f"Peer signature type: {signature}" in out, out
    assert served_certificate(out) == der(getattr(pki, kind)), out


@pytest.mark.parametrize("listener", ["network", "submissions"])
@pytest.mark.parametrize("host", HOSTS)
def test_sni_chooses_the_name(multi_server, pki: PKI, listener: str, host: str):
    m = multi_server
    for name, allowed in ((OTHER_NAME, [pki.other]), (HOSTNAME, [pki.rsa, pki.ecdsa])):
        context = client_context(pki.ca)  # checks the certificate against `name`
        if listener == "submissions":
            c = Client(host, m.submissions_port, tls=context, name=name)
            expect(c.banner(), 220, conn=c)
        else:
            c = Client(host, m.untrusted_port)
            c.start(HELO)
            c.starttls(context, name=name)
        with c:
            assert c.peer_der() in [der(p) for p in allowed], f"SNI {name}: wrong certificate"
            expect(c.ehlo(HELO), 250, conn=c)
            expect(c.cmd("QUIT"), 221, conn=c)


@pytest.mark.parametrize("host", HOSTS)
def test_sni_with_openssl(multi_server, pki: PKI, host: str):
    m = multi_server
    where = f"[{host}]:{m.submissions_port}" if ":" in host else f"{host}:{m.submissions_port}"
    out = s_client(
        "-connect", where, "-servername", OTHER_NAME, "-verify_hostname", OTHER_NAME,
        "-CAfile", str(pki.ca.cert), "-verify_return_error",
    )  # fmt: skip
    assert "Verify return code: 0 (ok)" in out, out
    assert served_certificate(out) == der(pki.other), out


def test_a_server_name_that_is_not_ascii_is_one_log_line(multi_server, pki: PKI):
    """A reviewer's finding: with more than one certificate, a ClientHello whose server_name
    is not ASCII made Python's SNI callback fail before ours ran, and Python wrote its
    "Exception ignored in: ..." and a traceback to stderr, outside the log's format (anyone
    could add them). Now one log line, and the handshake fails as before."""
    m = multi_server
    name = b"aaaa.example.net"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name.decode())
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    mark = m.log_mark()
    for raw in (b"\xe9aaa.example.net", b"\xff\xfe\xfd\xfc.example.net"):
        with socket.create_connection(("127.0.0.1", m.submissions_port), timeout=10) as sock:
            sock.sendall(hello.replace(name, raw))
            answer = sock.recv(4096)
        assert answer[:1] == b"\x15", answer  # (a TLS alert: the handshake failed)
    assert wait_until(lambda: m.log_since(mark).count("CALLBACK_FAILED") == 2, 5)
    assert wait_until(lambda: "a callback" in m.log_since(mark), 5), m.log_since(mark)
    added = m.log_since(mark)
    assert "Traceback" not in added and "Exception ignored" not in added, added
    assert all(line[:4].isdigit() for line in added.splitlines()), added  # (all stamped lines)
    assert "aaa.example.net" in added, added  # (one line a minute of a kind, per worker)


# --------------------------------------------------------------------------------------------
# Certificates at start-up and on SIGHUP
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing-cert", "missing-key", "not-pem", "wrong-key"])
def test_bad_certificate_is_a_start_up_error(mailerd_factory, pki: PKI, tmp_path: Path, case):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n"
                       "-----END CERTIFICATE-----\n")  # fmt: skip
    cert, key = {
        "missing-cert": (tmp_path / "no-such.crt", pki.rsa.key),
        "missing-key": (pki.rsa.cert, tmp_path / "no-such.key"),
        "not-pem": (garbage, pki.rsa.key),
        "wrong-key": (pki.rsa.cert, pki.ecdsa.key),
    }[case]
    named = {"missing-cert": [cert], "missing-key": [key], "not-pem": [cert]}.get(case, [cert, key])
    m = mailerd_factory(start=False, extra=["--tls-cert", str(cert), "--tls-key", str(key)])
    m.start(wait=False)
    assert m.proc is not None
    try:
        rc = m.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mailerd started with a bad certificate ({case})\n{m.stderr_text()}")
    err = m.stderr_text()
    assert rc == 1, f"exit status {rc}, expected 1\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line:\n{err}"
    assert any(str(path) in lines[0] for path in named), f"{named} not named: {lines[0]}"
    if case == "missing-key":  # (the option at fault, not --tls-cert: the certificate is fine)
        assert "--tls-key: cannot read key" in lines[0], lines[0]


def test_reload_presents_the_new_certificate(mailerd_factory, pki: PKI, tmp_path: Path):
    """SIGHUP with new certificate files: a TLS session open meanwhile finishes its message;
    new sessions (STARTTLS and implicit TLS) get the new certificate."""
    old = pki.ca.issue(HOSTNAME, tag="old")
    new = pki.ca.issue(HOSTNAME, tag="new")
    assert serial(old.cert) != serial(new.cert)
    live = tmp_path / "live"
    live.mkdir()
    live_pair = Pair(live / "cert.pem", live / "key.pem")

    def install(pair: Pair) -> None:
        for src, dst in ((pair.cert, live_pair.cert), (pair.key, live_pair.key)):
            tmp = dst.with_suffix(".tmp")
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)

    install(old)
    m = mailerd_factory(cls=TLSMailerd, pairs=[live_pair], submission=False)
    user = m.new_user("reload")
    context = client_context(pki.ca)

    def presented(listener: str) -> bytes:
        if listener == "submissions":
            with Client("127.0.0.1", m.submissions_port, tls=context) as c:
                expect(c.banner(), 220, conn=c)
                return c.peer_der()
        with Client("::1", m.untrusted_port) as c:
            c.start(HELO)
            c.starttls(context)
            return c.peer_der()

    assert presented("network") == der(old) and presented("submissions") == der(old)
    body = message(f"reload-{uuid.uuid4().hex}")
    with Client("127.0.0.1", m.untrusted_port) as open_session:
        open_session.start(HELO)
        open_session.starttls(context)
        expect(open_session.ehlo(HELO), 250, conn=open_session)
        assert open_session.peer_der() == der(old)
        mail_rcpt(open_session, f"{user}@example.org")

        install(new)
        mark = m.log_mark()
        m.signal(signal.SIGHUP)
        assert wait_until(lambda: "configuration reloaded" in m.log_since(mark), 15), m.log_since(
            mark
        )
        for listener in ("network", "submissions"):
            assert wait_until(lambda lst=listener: presented(lst) == der(new), 10), (
                f"{listener}: still not the new certificate (serial {serial(new.cert)})"
            )
        send_data(open_session, body)
        expect(open_session.cmd("QUIT"), 221, conn=open_session)
    (n,) = m.wait_messages(user, 1)
    check_stored(m.read(user, n), sender="sender@client.test", helo=HELO, body=body,
                 protocols=("ESMTPS",))  # fmt: skip
    assert parse_stored(m.read(user, n)).rest == body


# --------------------------------------------------------------------------------------------
# Out of descriptors
# --------------------------------------------------------------------------------------------


class LimitedTLSMailerd(TLSMailerd):
    """TLSMailerd with a descriptor limit its master cannot raise (prlimit sets soft and hard
    before mailerd starts), so that its one worker runs out while connections pile up."""

    NOFILE = 96

    def argv(self) -> list[str]:
        return ["prlimit", f"--nofile={self.NOFILE}:{self.NOFILE}", "--", *super().argv()]


@pytest.mark.parametrize("listener", ["submissions", "network"])
def test_out_of_descriptors_then_accepting_again(mailerd_factory, pki: PKI, listener: str):
    """More connections than the worker has descriptors (a limit too low for --max-sessions,
    which mailerd warns of at start): no crash and no busy loop; the listener (libuv's accept)
    closes the rest unanswered; once they are gone, the listener serves a whole session again
    within seconds, in the same worker."""
    caps = ["--max-sessions", "5000", "--max-sessions-per-ip", "5000"]
    m = mailerd_factory(
        cls=LimitedTLSMailerd, pairs=[pki.rsa], submission=False, workers=1, extra=caps
    )
    warning = r"descriptor limit is 96, below the \d+ that --max-sessions 5000"
    assert re.search(warning, m.log_since(0)), m.log_since(0)
    port = m.listener_port(listener)
    mark = m.log_mark()
    held: list[socket.socket] = []
    try:
        for _ in range(2 * LimitedTLSMailerd.NOFILE):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert wait_until(lambda: sum(map(_closed, held)) > 0, 10), "none was closed"
        worker = m.worker_pids()[0]
        cpu_before = _cpu_seconds(worker)
        time.sleep(2)
        assert _cpu_seconds(worker) - cpu_before < 1.0, "the worker spins while out of descriptors"
    finally:
        for sock in held:
            sock.close()

    def served() -> bool:
        context = client_context(pki.ca) if listener == "submissions" else None
        try:
            with Client("127.0.0.1", port, tls=context) as c:
                return c.banner().code == 220 and c.ehlo(HELO).code == 250
        except (OSError, EOFError):
            return False

    assert wait_until(served, 15), f"not accepting again:\n{m.log_since(mark)[-2000:]}"
    assert m.proc is not None and m.proc.poll() is None
    assert m.worker_pids() == [worker], "the worker was replaced, not recovered"


def _closed(sock: socket.socket) -> bool:
    """Has the server closed this connection without a word?"""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

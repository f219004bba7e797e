"""Command line, configuration file, startup errors and process titles."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailerd.ipc import unixpath

from .conftest import (
    REPO,
    Mailerd,
    SMTPConn,
    check_stored,
    expect,
    free_port,
    pid_alive,
    proc_cmdline,
    run_mailerd,
    send_message,
    wait_until,
)

LONG_OPTIONS = [
    "--config",
    "--spool",
    "--domain",
    "--queue",
    "--port",
    "--listen-local",
    "--listen-network",
    "--public-address",
    "--hostname",
    "--workers",
    "--foreground",
    "--pidfile",
    "--version",
    "--help",
    "--max-message-size",
    "--timeout",
    "--max-errors",
]


def package_version() -> str:
    text = (Path(__file__).resolve().parents[2] / "mailerd" / "__init__.py").read_text()
    return re.search(r'__version__\s*=\s*["\']([^"\']+)', text).group(1)


def valid_args(tmp_path: Path) -> list[str]:
    """A complete, valid command line (so that an added bad option is the only problem)."""
    p1, p2 = free_port(), free_port()
    return [
        "-f",
        "-s",
        str(tmp_path / "spool"),
        "-q",
        str(tmp_path / "queue"),
        "-d",
        "example.org",
        "-H",
        "mx.example.org",
        "-w",
        "1",
        "-l",
        f"127.0.0.1:{p1}",
        "-n",
        f"127.0.0.1:{p2}",
    ]


# --------------------------------------------------------------------------------------------
# -V, -h
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["-V", "--version"])
def test_version(opt: str):
    p = run_mailerd([opt])
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    out = p.stdout + p.stderr
    assert package_version() in out, f"version {package_version()} not in {out!r}"
    assert len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("opt", ["-h", "--help"])
def test_help(opt: str):
    p = run_mailerd([opt])
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    assert "usage" in p.stdout.lower(), p.stdout
    missing = [o for o in LONG_OPTIONS if o not in p.stdout]
    assert not missing, f"--help does not mention {missing}:\n{p.stdout}"


# --------------------------------------------------------------------------------------------
# Bad options
# --------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    pytest.param(["--bogus"], ["--bogus"], id="unknown-option"),
    pytest.param(["-w", "x"], ["-w", "--workers"], id="workers-not-a-number"),
    pytest.param(["--timeout", "5parsecs"], ["--timeout"], id="timeout-unit"),
    pytest.param(["--timeout", "soon"], ["--timeout"], id="timeout-word"),
    pytest.param(["-l", "1.2.3.999"], ["-l", "--listen-local"], id="listen-bad-ip"),
    pytest.param(["-n", "127.0.0.1:99999"], ["-n", "--listen-network"], id="listen-bad-port"),
    pytest.param(["-l", "[::1"], ["-l", "--listen-local"], id="listen-bad-bracket"),
    pytest.param(["-p", "70000"], ["-p", "--port"], id="port-out-of-range"),
    pytest.param(["-p", "smtp25"], ["-p", "--port"], id="port-not-a-number"),
    pytest.param(["--max-message-size", "lots"], ["--max-message-size"], id="size-word"),
    pytest.param(["--max-errors", "many"], ["--max-errors"], id="max-errors-word"),
]


def _names_option(message: str, names: list[str]) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", message) for n in names)


@pytest.mark.parametrize("bad,names", BAD_OPTIONS)
def test_bad_option_exits_2(tmp_path: Path, bad: list[str], names: list[str]):
    p = run_mailerd(valid_args(tmp_path) + bad)
    assert p.returncode is not None, f"{bad}: mailerd did not exit (started anyway?)"
    assert p.returncode == 2, f"{bad}: exit {p.returncode}, stderr {p.stderr!r}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"{bad}: expected a one-line message, got {p.stderr!r}"
    assert _names_option(lines[0], names), f"{bad}: message does not name {names}: {lines[0]!r}"


@pytest.mark.parametrize("value", ["30s", "5m"])
def test_timeout_durations_accepted(mailerd_factory, value: str):
    """Durations in the documented forms start the server."""
    m = mailerd_factory(extra=["--timeout", value])
    with m.connect() as c:
        c.start()
        expect(c.cmd("NOOP"), 250, conn=c)


# --------------------------------------------------------------------------------------------
# Configuration file
# --------------------------------------------------------------------------------------------


class ConfigMailerd(Mailerd):
    """Runs ``mailerd -f -c CONFIG [extra...]``; listens where the test says."""

    def __init__(self, base: Path, *, config: Path, listen: list[tuple[str, int]], **kw):
        super().__init__(base, **kw)
        self.config = config
        self.listen = listen

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "mailerd", "-f", "-c", str(self.config),
            *self.isolation_args(), *self.extra,
        ]  # fmt: skip

    def endpoints(self) -> list[tuple[str, int]]:
        return self.listen


def _deliver(host: str, port: int, rcpt: str, body: bytes) -> None:
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=15) as s:
        assert s.sendmail("sender@client.test", [rcpt], body) == {}
        s.quit()


@pytest.mark.parametrize(
    "sep", [", ", " ", ",", " ,\n  "], ids=["comma-space", "space", "comma", "multiline"]
)
def test_config_file(mailerd_factory, tmp_path: Path, sep: str):
    port = free_port()
    spool = tmp_path / "cfgspool"
    cfg = tmp_path / "mailerd.conf"
    cfg.write_text(
        "[mailerd]\n"
        f"spool = {spool}\n"
        f"queue = {tmp_path / 'cfgqueue'}\n"
        f"domain = a.test{sep}b.test\n"
        f"listen-local = 127.0.0.1:{port}{sep}[::1]:{port}\n"
        # (the default network listener is port 25 on every address of the machine: another
        # test process may hold it, and a test has no business there)
        "listen-network = none\n"
        "hostname = cfg.example\n"
        "workers = 1\n"
    )
    m = mailerd_factory(
        cls=ConfigMailerd,
        config=cfg,
        listen=[("127.0.0.1", port), ("::1", port)],
        spool=spool,
    )
    m.add_user("cfguser")
    body = b"Subject: config\r\n\r\nvia config\r\n"
    _deliver("127.0.0.1", port, "cfguser@a.test", body)
    _deliver("::1", port, "cfguser@b.test", body)
    assert m.wait_messages("cfguser", 2, timeout=5) == [1, 2]
    for n in (1, 2):
        check_stored(
            m.read("cfguser", n),
            sender="sender@client.test",
            helo="client.test",
            body=body,
            hostname="cfg.example",
        )
    # both domains are local: an unknown user there is refused, not relayed
    with SMTPConn("127.0.0.1", port) as c:
        c.start()
        expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
        expect(c.cmd("RCPT TO:<nobody-cfg@a.test>"), 550, "5.1.1", conn=c)
        expect(c.cmd("RCPT TO:<nobody-cfg@b.test>"), 550, "5.1.1", conn=c)
        c.cmd("QUIT")


def test_command_line_overrides_config(mailerd_factory, tmp_path: Path):
    port = free_port()
    cfg_spool = tmp_path / "cfgspool"
    cli_spool = tmp_path / "clispool"
    cfg = tmp_path / "mailerd.conf"
    cfg.write_text(
        "[mailerd]\n"
        f"spool = {cfg_spool}\n"
        f"queue = {tmp_path / 'cfgqueue'}\n"
        "domain = a.test, b.test\n"
        f"listen-local = 127.0.0.1:{port}\n"
        "listen-network = none\n"  # (not port 25 on every address: see test_config_file)
        "hostname = cfg.example\n"
        "workers = 3\n"
    )
    (cfg_spool / "over").mkdir(parents=True)
    m = mailerd_factory(
        cls=ConfigMailerd,
        config=cfg,
        listen=[("127.0.0.1", port)],
        spool=cli_spool,
        extra=["-s", str(cli_spool), "-H", "cli.example", "--workers", "1"],
    )
    m.add_user("over")
    body = b"Subject: override\r\n\r\noverride\r\n"
    _deliver("127.0.0.1", port, "over@a.test", body)
    assert m.wait_messages("over", 1, timeout=5) == [1]
    check_stored(
        m.read("over", 1),
        sender="sender@client.test",
        helo="client.test",
        body=body,
        hostname="cli.example",
    )
    assert not any(cfg_spool.joinpath("over").iterdir()), "delivered into the config's spool"
    workers = wait_until(
        lambda: [t for t in m.titles().values() if t.startswith("mailerd: worker")], timeout=10
    )
    assert len(workers) == 1, f"--workers 1 must override workers = 3: {m.titles()}"


BAD_CONFIG = [
    pytest.param("workers = x\n", ["workers"], id="workers"),
    pytest.param("timeout = 5parsecs\n", ["timeout"], id="timeout"),
    pytest.param("listen-local = 1.2.3.999\n", ["listen-local"], id="listen-local"),
    pytest.param("max-message-size = big\n", ["max-message-size"], id="max-message-size"),
    pytest.param("bogus-key = 1\n", ["bogus-key"], id="unknown-key"),
]


@pytest.mark.parametrize("line,names", BAD_CONFIG)
def test_bad_config_value_exits_2(tmp_path: Path, line: str, names: list[str]):
    cfg = tmp_path / "bad.conf"
    cfg.write_text(
        "[mailerd]\n"
        f"spool = {tmp_path / 'spool'}\n"
        f"queue = {tmp_path / 'queue'}\n"
        "domain = example.org\n"
        f"listen-local = 127.0.0.1:{free_port()}\n" + line
    )
    p = run_mailerd(["-f", "-c", str(cfg)])
    assert p.returncode is not None, f"{line!r}: mailerd did not exit (started anyway?)"
    assert p.returncode == 2, f"{line!r}: exit {p.returncode}, stderr {p.stderr!r}"
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"{line!r}: expected a one-line message, got {p.stderr!r}"
    names = names + [f"--{n}" for n in names]  # the key, or the option it stands for
    assert _names_option(lines[0], names), f"message does not name {names}: {lines[0]!r}"


def test_missing_config_file(tmp_path: Path):
    missing = tmp_path / "nope.conf"
    p = run_mailerd(["-f", "-c", str(missing)])
    assert p.returncode not in (0, None), (p.returncode, p.stderr)
    assert "nope.conf" in p.stderr, p.stderr


# --------------------------------------------------------------------------------------------
# Startup errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_port_in_use(tmp_path: Path, family: str):
    if family == "ipv4":
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        blocker.bind(("127.0.0.1", 0))
        addr = "127.0.0.1:{}"
    else:
        blocker = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        blocker.bind(("::1", 0))
        addr = "[::1]:{}"
    blocker.listen(1)
    try:
        port = blocker.getsockname()[1]
        args = valid_args(tmp_path) + ["-l", addr.format(port)]
        p = run_mailerd(args)
    finally:
        blocker.close()
    assert p.returncode is not None, "mailerd kept running although its port was taken"
    assert p.returncode != 0
    assert "Address already in use" in p.stderr, p.stderr


def test_a_second_mailerd_on_the_same_queue_is_refused(mailerd_factory, tmp_path: Path):
    """A second mailerd given the queue of a running one stops at start-up, naming it, and
    leaves the first one's delivery socket alone: the first still queues remote mail."""
    first = mailerd_factory(base=tmp_path / "first")
    args = valid_args(tmp_path / "second") + ["--dns-server", "127.0.0.1:9"]
    args[args.index("-q") + 1] = str(first.queue)
    p = run_mailerd(args)
    assert p.returncode is not None, "a second mailerd runs on the queue of the first"
    assert p.returncode != 0 and "another mailerd works this queue" in p.stderr, p.stderr
    assert str(first.queue) in p.stderr, p.stderr
    with first.connect(trusted=True) as c:
        c.start("client.test")
        send_message(c, "bob@remote.example", b"Subject: still queued\r\n\r\nhi\r\n",
                     sender="alice@example.org")  # fmt: skip


def test_a_queue_deeper_than_a_socket_address_holds(mailerd_factory, tmp_path: Path):
    """A queue whose delivery socket's path is longer than a socket address holds (107 bytes:
    a checkout under a long home directory): mailerd starts, a worker reaches the delivery
    process (remote mail is queued, local mail stored), `mailerd queue` lists it, and a second
    mailerd on the queue is refused as another's. It stopped at start-up with "cannot create
    the delivery socket in ...: AF_UNIX path too long"."""
    deep = tmp_path / ("d" * 50) / ("e" * 50) / "queue"
    assert len(os.fsencode(str(deep / "private" / "delivery.sock"))) > unixpath.SUN_PATH_MAX
    # (a relayhost nobody listens at: the remote message stays queued, deferred)
    m = mailerd_factory(base=tmp_path / "m", queue=deep, extra=["--relayhost", "[127.0.0.1]:9"])
    user = m.new_user("deep")
    with m.connect(trusted=True) as c:
        c.start("client.test")
        send_message(c, f"{user}@example.org", b"Subject: here\r\n\r\nhi\r\n",
                     sender="alice@example.org")  # fmt: skip
        send_message(c, "bob@remote.example", b"Subject: queued\r\n\r\nhi\r\n",
                     sender="alice@example.org")  # fmt: skip
    assert m.wait_messages(user, 1)
    for action, said in (("list", "bob@remote.example"), ("flush", "flushed: 1 message")):
        asked = subprocess.run(
            [sys.executable, "-m", "mailerd", "queue", "-q", str(deep), action],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert asked.returncode == 0 and said in asked.stdout, asked
        assert "no answer from mailerd" not in asked.stderr, asked  # (the daemon answered)
    args = valid_args(tmp_path / "second") + ["--dns-server", "127.0.0.1:9"]
    args[args.index("-q") + 1] = str(deep)
    second = run_mailerd(args)
    assert second.returncode != 0 and "another mailerd works this queue" in second.stderr, second


def test_a_restart_after_kill_9_is_not_taken_for_a_second_mailerd(mailerd_factory, tmp_path):
    """The master killed (-9) while its delivery process still finishes an outbound attempt
    (a relayhost that never greets): a new mailerd on the same queue starts at once, the old
    delivery process having let go of the socket when it began to stop."""
    tarpit = socket.socket()
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(8)
    held: list[socket.socket] = []
    relay = f"[127.0.0.1]:{tarpit.getsockname()[1]}"
    first = mailerd_factory(base=tmp_path / "first", extra=["--relayhost", relay])
    try:
        with first.connect(trusted=True) as c:
            c.start("client.test")
            send_message(c, "bob@remote.example", b"Subject: slow\r\n\r\nhi\r\n",
                         sender="alice@example.org")  # fmt: skip
        tarpit.settimeout(10)
        held.append(tarpit.accept()[0])  # the delivery process is in its attempt
        delivery = [p for p, t in first.titles().items() if t.startswith("mailerd: delivery")]
        assert delivery, first.titles()
        os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(5)
        assert wait_until(lambda: "the master went away" in first.stderr_text(), 5)
        second = mailerd_factory(base=tmp_path / "second", queue=first.queue, start=False)
        second.start()  # (fails if it takes the old delivery process for another mailerd)
        assert pid_alive(delivery[0]), "the old delivery process was gone: nothing was tested"
        with second.connect(trusted=True) as c:
            c.start("client.test")
            send_message(c, "carol@remote.example", b"Subject: next\r\n\r\nhi\r\n",
                         sender="alice@example.org")  # fmt: skip
    finally:
        for sock in [*held, tarpit]:
            sock.close()


def test_spool_cannot_be_created(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    args = valid_args(tmp_path)
    args[args.index("-s") + 1] = str(blocker / "spool")
    p = run_mailerd(args)
    assert p.returncode is not None, "mailerd kept running without a spool"
    assert p.returncode != 0
    assert "Not a directory" in p.stderr, p.stderr


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def test_process_titles(mailerd: Mailerd):
    m = mailerd

    def complete():
        titles = list(m.titles().values())
        has = (
            any(re.match(r"mailerd: worker 1(\s|$)", t) for t in titles)
            and any(re.match(r"mailerd: worker 2(\s|$)", t) for t in titles)
            and any(re.match(r"mailerd: delivery(\s|$)", t) for t in titles)
        )
        return has and titles

    titles = wait_until(complete, timeout=10)
    master = proc_cmdline(m.pid) or ""
    assert re.match(r"mailerd: master(\s|$)", master), f"master title: {master!r}"
    assert titles, f"missing titles; children are: {m.titles()}"
    workers = [t for t in m.titles().values() if t.startswith("mailerd: worker")]
    assert len(workers) == 2, workers


def test_pidfile(mailerd_factory, tmp_path: Path):
    pidfile = tmp_path / "run" / "mailerd.pid"
    pidfile.parent.mkdir()
    m = mailerd_factory(extra=["-P", str(pidfile)])
    assert wait_until(pidfile.exists, timeout=5), "pidfile not written"
    assert pidfile.read_text().strip() == str(m.pid)


def test_default_port_option(mailerd_factory, tmp_path: Path):
    """-p sets the port of every listener given without one."""
    port = free_port()

    class PortMailerd(Mailerd):
        def argv(self):
            return [
                sys.executable, "-m", "mailerd", "-f",
                "-s", str(self.spool), "-q", str(self.queue), "-d", "example.org",
                "-p", str(port), "-l", "127.0.0.1", "-l", "::1",
                "-n", f"127.0.0.1:{self.untrusted_port}", *self.isolation_args(),
            ]  # fmt: skip

        def endpoints(self):
            return [("127.0.0.1", port), ("::1", port), ("127.0.0.1", self.untrusted_port)]

    mailerd_factory(cls=PortMailerd)
    for host in ("127.0.0.1", "::1"):
        with SMTPConn(host, port) as c:
            c.start()
            expect(c.cmd("MAIL FROM:<a@client.test>"), 250, conn=c)
            # the -p listeners are the trusted ones: a remote recipient is fine there
            expect(c.cmd("RCPT TO:<someone@remote.test>"), 250, conn=c)
            c.cmd("QUIT")


def _on_a_wildcard_port(mailerd_factory, hostname: str) -> Mailerd:
    """A mailerd with a network listener on 0.0.0.0 and a free port. A port free a moment ago
    may have become the local end of some connection meanwhile (free ports and outgoing
    connections share the ephemeral range, and the suite runs in parallel), which a wildcard
    bind then meets: "Address already in use" (seen once). Another port is tried then."""
    for _ in range(3):
        try:
            return mailerd_factory(hostname=hostname, extra=["-n", f"0.0.0.0:{free_port()}"])
        except RuntimeError as exc:
            if "Address already in use" not in str(exc):
                raise
    pytest.fail("no free port for a wildcard listener in three tries")


@pytest.mark.parametrize("hostname, warned", [("localhost", True), ("mx.example.org", False)])
def test_a_host_name_nobody_can_look_up_is_warned_of_when_others_can_connect(
    mailerd_factory, hostname: str, warned: bool
):
    """A network listener other servers can reach (here the wildcard address, on a high
    port: only loopback traffic is sent) and a host name such as the default FQDN `vm` or
    `localhost`: they see it in the banner, EHLO and Received: lines (found by a tester: it
    started without a word). Loopback-only listeners (the suite's, scripts/server's) are not
    warned of."""
    m = _on_a_wildcard_port(mailerd_factory, hostname)
    said = f"host name {hostname} is no name other servers can look up"
    assert wait_until(lambda: "mailerd started" in m.stderr_text(), 5)
    wait_until(lambda: said in m.stderr_text(), 1 if warned else 0.3)
    text = m.stderr_text()
    assert (said in text) is warned, text[-2000:]
    if warned:
        assert "(to every machine, localhost is itself)" in text and "set hostname =" in text
    quiet = mailerd_factory(hostname="localhost")  # (loopback listeners only)
    assert "is no name other servers can look up" not in quiet.stderr_text()


def test_no_network_listener_found_is_warned_of(mailerd_factory):
    """No listen-network given, and the default found no address (here an interface that has
    none; on a server, a network up after mailerd, a DHCP lease late for network-online):
    it started on loopback alone without a word, and no other server could deliver (a
    systemd walk-through met it). A listen-network given, even "none", is not warned of."""
    m = mailerd_factory(start=False, extra=["-i", "nosuch0"])
    argv = m.argv()
    at = argv.index("-n")
    m.argv = lambda: argv[:at] + argv[at + 4 :]  # (without the suite's two -n)
    m.endpoints = lambda: [("127.0.0.1", m.trusted_port), ("::1", m.trusted_port)]
    assert "-n" not in m.argv(), m.argv()
    m.start()
    said = "no network listener: interface nosuch0 has no address when the configuration was read"
    assert wait_until(lambda: said in m.stderr_text(), 5), m.stderr_text()[-2000:]
    assert "set listen-network = ADDR (-n), or reload once the network is up" in m.stderr_text()
    quiet = mailerd_factory(extra=["-i", "nosuch0"])  # (the suite's -n: given, not defaulted)
    assert wait_until(lambda: "mailerd started" in quiet.stderr_text(), 5)
    assert "no network listener" not in quiet.stderr_text()


def test_a_configuration_mailerd_refuses_is_not_restarted_by_systemd(tmp_path):
    """The unit's Restart=on-failure retried a refused configuration every 5 s, forever, and
    started a half-edited file the moment it parsed (a systemd walk-through), its
    RestartPreventExitStatus=2 notwithstanding: that judges the main process, which a failed
    Type=forking start never had (a later walk-through). So the unit restarts on no exit
    status but those it names, and not on a refused configuration's (under systemd:
    tests/package/test_systemd_unit.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "mailerd", "-f", "--max-message-size", "oops"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "max-message-size" in done.stderr and done.returncode not in (0, 1), done
    unit = (REPO / "etc" / "mailerd.service").read_text()
    assert re.findall(r"^Restart=(.+)$", unit, re.M) == ["on-abnormal"]
    forced = " ".join(re.findall(r"^RestartForceExitStatus=(.+)$", unit, re.M)).split()
    assert str(done.returncode) not in forced, forced


def _stderr_as_the_journal(tmp_path: Path, name: str, *args: str) -> tuple[int, str]:
    """mailerd with `args`, its stderr a file that JOURNAL_STREAM names, as systemd names the
    journal's stream to a unit's processes: its exit status and what it wrote there."""
    err = tmp_path / f"{name}.stderr"
    with open(err, "wb") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        done = subprocess.run(
            [sys.executable, "-m", "mailerd", *args],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=f, env=env, timeout=60,
        )  # fmt: skip
    return done.returncode, err.read_text()


def test_a_failed_start_is_an_error_in_the_journal(tmp_path: Path):
    """Under systemd, stderr is the journal, which took every line for info: `journalctl -p
    err -u mailerd` did not show why a start failed (a systemd walk-through). With
    JOURNAL_STREAM naming stderr, each start-up line carries its priority (sd-daemon's
    "<3>" for an error); anywhere else, none."""
    status, said = _stderr_as_the_journal(tmp_path, "config", "-f", "--max-message-size", "oops")
    assert status == 2 and said.startswith("<3>mailerd: error: "), said
    assert "max-message-size" in said
    with socket.socket() as busy:  # (a start that fails after the configuration: a bind)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, said = _stderr_as_the_journal(
            tmp_path, "bind", "-f", "-s", str(tmp_path / "spool"), "-q", str(tmp_path / "q"),
            "-l", f"127.0.0.1:{port}", "-n", "none", "--dns-server", "127.0.0.1:9",
            "--aliases", str(tmp_path / "none"), "--passwd", str(tmp_path / "none"),
        )  # fmt: skip
    assert status == 1 and "<3>mailerd: " in said and str(port) in said, said
    plain = subprocess.run(
        [sys.executable, "-m", "mailerd", "-f", "--max-message-size", "oops"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"},
    )  # fmt: skip
    assert plain.stderr.startswith("mailerd: error: "), plain.stderr

"""A real Postfix as a remote mail server in the test's network namespace (a private instance).

`PostfixPeer(netns, base, **main_cf)` writes its own main.cf/master.cf under ``base`` (config
and queue directories, and its log file ``maillog``; only the data directory is elsewhere, see
``__init__``), and ``start()`` runs
``postfix -c DIR start`` with ``ip netns exec``: its master and every daemon live in the
namespace, so its SMTP client reaches only the namespace's addresses. The machine's own Postfix
(``/etc/postfix``, ``/var/spool/postfix``, port 25) is never read, written, started or stopped:
the instance has no ``inet`` service at all, only the sending side (pickup → cleanup → qmgr →
smtp), and ``stop()`` stops it by its own config directory (then SIGKILLs, by pid, any of its
processes still alive).

Mail goes in with Postfix's own ``sendmail -C DIR`` (``send()``); what happened to it is read
from the instance's log (``maillog_file``, written by its postlogd): ``queue_id_of(msgid)``,
``deliveries(queue_id)`` (parsed ``to=<…>, relay=…, status=…`` lines), ``tls_lines()`` (the
``… TLS connection established to …`` lines of ``smtp_tls_loglevel = 1``).

Needs root and Debian's ``postfix`` package (scripts/setup --bench installs it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import descendants_of, pid_alive, wait_until

PEER_HOSTNAME = "relay.sender.test"
PEER_DOMAIN = "sender.test"
START_TIMEOUT = 30.0

# One delivery attempt, as the smtp(8) client logs it.
DELIVERY_RE = re.compile(
    r"\]: (?P<id>[0-9A-F]+): to=<(?P<to>[^>]*)>, relay=(?P<relay>\S+), .*?"
    r"status=(?P<status>\w+) \((?P<reply>.*)\)\s*$"
)
# smtp_tls_loglevel = 1: "Trusted TLS connection established to host[addr]:25: TLSv1.3 with
# cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 server-signature …"
TLS_RE = re.compile(
    r"(?P<trust>Anonymous|Untrusted|Trusted|Verified) TLS connection established to "
    r"(?P<peer>\S+?): (?P<protocol>TLSv[\d.]+) with cipher (?P<cipher>\S+) "
    r"\((?P<bits>\d+)/(?P<alg_bits>\d+) bits\)"
)

# Only the services a sending-only Postfix needs; no inet service (no smtpd, no port 25), and no
# chroot (the queue directory lives under the test's tmp dir, not /var/spool/postfix).
MASTER_CF_ROWS = [
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


def require_postfix() -> None:
    """Fail (not skip: the suite's setup is meant to install it) when Postfix is missing."""
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root")
    missing = [t for t in ("postfix", "postconf", "sendmail", "postqueue") if not shutil.which(t)]
    if missing or not Path("/usr/lib/postfix/sbin/master").exists():
        pytest.fail(
            f"Postfix is not installed ({', '.join(missing) or 'no master'} missing): "
            "apt-get install --no-install-recommends postfix (with debconf "
            "'postfix postfix/main_mailer_type select No configuration' and a policy-rc.d "
            "that exits 101, as scripts/setup --bench does)",
            pytrace=False,
        )
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        pytest.fail("the 'postfix' system user is missing (reinstall postfix)", pytrace=False)


@dataclass
class Delivery:
    id: str
    to: str
    relay: str
    status: str
    reply: str
    line: str


class PostfixPeer:
    """One private Postfix instance in a network namespace (see the module's docstring)."""

    def __init__(self, ns, base: Path, **params: str) -> None:
        self.ns = ns
        self.base = base
        self.etc = base / "etc"
        self.queue = base / "queue"
        # The master opens $data_directory/master.lock as the postfix user, by its absolute
        # path: under pytest's /tmp/pytest-of-root (mode 0700) that is "Permission denied". So
        # the data directory (the lock and TLS PRNG files, nothing else) is a directory of its
        # own under /tmp, made in write_config() and removed by stop().
        self.data: Path | None = None
        self.logfile = base / "maillog"
        self.params = dict(params)
        self.master: int | None = None
        self.started = False

    # -- configuration ----------------------------------------------------------------------
    def main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "config_directory": str(self.etc),
            "queue_directory": str(self.queue),
            "data_directory": str(self.data or self.base / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": "postfix-peer",
            "maillog_file": str(self.logfile),
            "maillog_file_prefixes": str(self.base),
            # no smtpd at all (master.cf has no inet service); 127.0.0.1 keeps "myself" small
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": PEER_HOSTNAME,
            "mydomain": PEER_DOMAIN,
            "myorigin": PEER_DOMAIN,
            "mydestination": "",
            "local_transport": "error:5.1.1 no local delivery on this test peer",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            # never a DNS query: the next hop is always a bracketed address
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtp_connect_timeout": "10s",
            "smtp_tls_loglevel": "1",
            "smtp_tls_session_cache_database": "",
            "delay_warning_time": "0",
            "bounce_queue_lifetime": "1d",
            "maximal_queue_lifetime": "1d",
        }
        settings.update(self.params)
        lines = ["# private test instance written by tests/netns/postfix_peer.py"]
        lines += [f"{k} = {v}" for k, v in settings.items()]
        return "\n".join(lines) + "\n"

    @staticmethod
    def master_cf() -> str:
        fmt = "{:<10} {:<10} {:<3} {:<3} {:<3} {:<6} {:<5} {}\n"
        return "".join(fmt.format(*row) for row in MASTER_CF_ROWS)

    def write_config(self) -> None:
        for d in (self.etc, self.queue):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.etc, 0o755)
        os.chmod(self.queue, 0o755)
        if self.data is None:
            self.data = Path(tempfile.mkdtemp(prefix="mailerd-test-postfix-data-"))
        pf = pwd.getpwnam("postfix")
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        os.chmod(self.data, 0o700)
        (self.etc / "main.cf").write_text(self.main_cf())
        (self.etc / "master.cf").write_text(self.master_cf())

    # -- running ----------------------------------------------------------------------------
    def postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """`postfix -c DIR ARGS` inside the namespace."""
        return self.ns.run(
            ["postfix", "-c", str(self.etc), *args], timeout=timeout, stdin=subprocess.DEVNULL
        )

    def start(self) -> PostfixPeer:
        require_postfix()
        self.write_config()
        check = self.postfix("check")
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed: {(check.stderr or check.stdout).strip()}")
        self.started = True  # from here on, stop() runs `postfix stop` and cleans up
        proc = self.postfix("start")
        pidfile = self.queue / "pid" / "master.pid"
        if proc.returncode != 0:
            self.master = _read_pid(pidfile)
            raise RuntimeError(
                f"postfix -c {self.etc} start (in {self.ns.name}) failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}\n--- log ---\n{self.log_tail()}"
            )
        master = wait_until(lambda: _read_pid(pidfile), START_TIMEOUT)
        if not master:
            raise RuntimeError(f"postfix started but wrote no {pidfile}\n{self.log_tail()}")
        self.master = master
        # the master runs in the namespace (and so will every daemon it forks)
        assert master in self.ns.pids(), (
            f"the Postfix master (pid {master}) is not in namespace {self.ns.name}"
        )
        return self

    def stop(self) -> list[str]:
        """Stop the instance; returns problems worth failing a test for (panic/fatal lines,
        processes that had to be killed)."""
        problems: list[str] = []
        if self.started:
            self.started = False
            # the master and everything it forked (found now, while they are its children)
            pids = {self.master, *descendants_of(self.master)} if self.master else set()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.postfix("stop", timeout=30)
            if not wait_until(lambda: not any(pid_alive(p) for p in pids), 20):
                for pid in sorted(p for p in pids if pid_alive(p)):
                    problems.append(f"postfix process {pid} still running after stop: SIGKILL")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            problems += [f"postfix log: {line}" for line in self.log_lines() if _is_bad(line)]
        if self.data is not None:
            shutil.rmtree(self.data, ignore_errors=True)
            self.data = None
        return problems

    def send(self, sender: str, rcpts: list[str], message: bytes) -> None:
        """Inject a message with Postfix's own sendmail (-C DIR), as a local program would."""
        proc = subprocess.run(
            ["sendmail", "-C", str(self.etc), "-i", "-f", sender, "--", *rcpts],
            input=message.replace(b"\r\n", b"\n"),
            capture_output=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"postfix sendmail -C {self.etc} failed ({proc.returncode}): "
                f"{proc.stderr.decode('utf-8', 'replace').strip()}\n--- log ---\n"
                f"{self.log_tail()}"
            )

    def queue_listing(self) -> str:
        proc = subprocess.run(
            ["postqueue", "-c", str(self.etc), "-p"], capture_output=True, text=True, timeout=30
        )
        return proc.stdout + proc.stderr

    # -- its log ----------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.logfile.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_lines()[-n:])

    def queue_id_of(self, message_id: str) -> str | None:
        """The queue id cleanup(8) gave the message with this Message-ID (None: not yet)."""
        pattern = re.compile(r"\]: ([0-9A-F]+): message-id=<?" + re.escape(message_id.strip("<>")))
        for line in self.log_lines():
            m = pattern.search(line)
            if m:
                return m.group(1)
        return None

    def wait_queue_id(self, message_id: str, timeout: float = 15.0) -> str:
        qid = wait_until(lambda: self.queue_id_of(message_id), timeout)
        assert qid, (
            f"Postfix never picked up <{message_id}>\n--- postfix log ---\n{self.log_tail()}"
        )
        return qid

    def deliveries(self, queue_id: str | None = None) -> list[Delivery]:
        out = []
        for line in self.log_lines():
            m = DELIVERY_RE.search(line)
            if m and (queue_id is None or m["id"] == queue_id):
                out.append(Delivery(**m.groupdict(), line=line))
        return out

    def wait_delivery(self, queue_id: str, timeout: float = 20.0) -> Delivery:
        """The first delivery attempt of queue_id, whatever its status."""
        got = wait_until(lambda: self.deliveries(queue_id), timeout)
        assert got, (
            f"Postfix logged no delivery attempt of {queue_id} within {timeout}s\n"
            f"--- postfix log ---\n{self.log_tail()}\n--- queue ---\n{self.queue_listing()}"
        )
        return got[0]

    def tls_lines(self) -> list[re.Match[str]]:
        return [m for line in self.log_lines() if (m := TLS_RE.search(line))]


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_bad(line: str) -> bool:
    return bool(re.search(r"\]: (fatal|panic):", line))

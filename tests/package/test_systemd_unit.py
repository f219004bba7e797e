"""The package's systemd unit, hardened, under a real booted systemd: every feature still works.

etc/mailerd.service confines the daemon (ProtectSystem=strict with the spool, the queue, /run
and /var/log writable, a system call filter, a capability bounding set, no user namespaces...).
Each of those is a way to break a feature that only shows when systemd runs the unit, which
test_deb.py (the init script, in an overlay without systemd) never does. So this test boots
systemd itself, in a container (systemd-nspawn) whose root is a throw-away overlay of this
machine's root filesystem, as test_deb.py's sandbox is: the upper layer is a tmpfs in a mount
namespace of the test's own, and nothing is written to the machine.

- The container has a network of its own (``--private-network``): only a loopback, and a dummy
  interface with 192.0.2.25 and a default route into it (what mailerd takes for the Internet
  side: the default route's interface), so the daemon listens on port 25 with the package's
  own defaults, and nothing it sends can leave. The test's own threads join that network
  (setns) to be its DNS server (tests/dnsserver.py), the remote MX (aiosmtpd, 127.0.0.2:25, a
  name in that DNS as the relayhost) and its SMTP clients.
- The packages the .deb depends on are downloaded first (``apt-get install --download-only``,
  the container not booted yet, on this machine's network, as test_deb.py's sandbox installs
  them); then systemd boots (into a target of the test's: basic.target, without the machine's
  enabled services and timers) and ``apt-get install ./mailerd_….deb`` runs inside, offline,
  so the postinst enables and starts the unit through systemd as on a real machine.
- Then through systemctl: the start by the postinst, a restart with the test's config, mail to
  a local user on port 25 (stored in /var/spool/mail, i.e. /var/mail, owned by the user),
  ``sendmail`` as root and as a user (the pickup), ``mailq``, ``newaliases`` (a reload), a
  new host name (a reload: the daemon sees it), a password from ``mailerd passwd``, a DKIM
  key from ``mailerd dkim keygen``, a certificate
  where certbot keeps them and ``systemctl reload``: authenticated submission over STARTTLS,
  relayed to the remote MX with a DKIM signature; a renewed certificate and another reload
  (the new one is served); the log file the config's example names (logrotate's SIGUSR1);
  ``systemctl stop`` (clean, nothing left). The journal must have the daemon's syslog lines
  and no error. The master must be confined as the unit says (no new privileges, a seccomp
  filter, its capability bounding set) and ``systemd-analyze security`` must rate the unit
  no worse than EXPOSURE_MAX. Last, an upgrade to a later version (``conftest.upgrade_deb``)
  while it runs: the postinst restarts it through systemd (a new main process), the
  configuration kept.

Teardown kills the container (and everything in it) even when the test fails: nspawn is PID 1
of a PID namespace of the test's (``unshare --pid --kill-child``), and that unshare dies with
the test process (PR_SET_PDEATHSIG), so even a killed test leaves no container running; the
mounts go with the namespace.

Needs root, systemd-nspawn (Debian's systemd-container, which scripts/setup installs), and
Debian with systemd installed (this machine's root is what boots); marked slow. About 1½
minutes, most of it building the .deb.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnsserver import DNSServer, Records
from harness import wait_until

from . import test_deb
from .test_deb import (
    APT,
    ENV,
    QUEUE,
    SPOOL,
    FakeMX,
    Sandbox,
    Target,
    Unavailable,
    _first_child,
    _text,
    cron_message,
    message,
    ssl_client,
    submitted_by_root,
)

USER = "mdunit"  # the local user, made in the container
DOMAIN = "unit.example"  # the mail name (debconf, preseeded): the local domain
HOSTNAME = "mx.unit.example"
REMOTE = "remote.example"
MX_NAME = "mx.remote.example"  # the relayhost, by name: looked up in the test's DNS
MX_HOST = "127.0.0.2"
NETWORK_ADDRESS = "192.0.2.25"  # the dummy "Internet" interface's; mailerd's network listener
DNS_HOST = "127.0.0.1"
DNS_PORT = 53
SUBMISSION_PORT = 587
CLIENT_NAME = "client.unit.example"
CONF = "/etc/mailerd/mailerd.conf"
PIDFILE = "/run/mailerd.pid"
LINEAGE = "/etc/letsencrypt/live/unit-mx"
DKIM_SELECTOR = "unit"
DKIM_KEY = f"/etc/mailerd/dkim/{DOMAIN}.{DKIM_SELECTOR}.key"
LOG_FILE = "/var/log/mailerd.log"
LOGROTATE = "/etc/logrotate.d/mailerd"
UNIT = "mailerd.service"
TARGET = "mailerd-unit-test.target"  # what the container boots into
# `systemd-analyze security` of the unit (systemd 252, in the booted container): 9.1 before
# the hardening, 2.7 with it (--offline: 9.3 and 2.9), 2.8 (3.0) without ProtectHostname=
# (which froze the host name); a change that loses a directive should be noticed.
EXPOSURE_MAX = 3.5
BOOT_TIMEOUT = 60.0
DOWNLOAD_TIMEOUT = 300.0
IO_TIMEOUT = 15.0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="boots a container: needs root"),
    test_deb.ON_DEBIAN,
]

# Run as root on the machine, in the new mount and PID namespaces (the shell is PID 1 there):
# the overlay, the target to boot into, the packages the .deb needs (downloaded, this machine's
# network), then nspawn becomes PID 1 and boots systemd on a network of the container's own.
SETUP = r"""
set -eu
b=$1 deb=$2 log=$3
mount -t tmpfs -o mode=0700 mailerd-unittest "$b"
mkdir "$b/upper" "$b/work" "$b/root"
mount -t overlay mailerd-unittest -o "lowerdir=/,upperdir=$b/upper,workdir=$b/work" "$b/root"
r=$b/root
# Boot into basic.target plus nothing: none of the machine's enabled services or timers (a
# database, cron, apt's timers) has any business in the test. The container's network is the
# test's: ifupdown and networkd must not try to configure the machine's interfaces there.
cat > "$r/etc/systemd/system/mailerd-unit-test.target" <<'EOF'
[Unit]
Description=mailerd unit test
Requires=basic.target
After=basic.target
AllowIsolate=yes
EOF
for unit in timers.target networking.service ifupdown-wait-online.service \
            systemd-networkd-wait-online.service; do
    ln -sf /dev/null "$r/etc/systemd/system/$unit"
done
# A policy-rc.d on the machine (scripts/setup's while it installs, or the machine's own) would
# keep the postinst from starting the daemon: it is the start under systemd that is tested.
rm -f "$r/usr/sbin/policy-rc.d"
rm -f "$r/var/lib/man-db/auto-update"  # (man-db's dpkg trigger: seconds, for nothing here)
mkdir -p "$r/var/tmp/mailerd-unittest"
cp "$deb" "$r/var/tmp/mailerd-unittest/"
name=$(basename "$deb")
apt="apt-get -y -q --no-install-recommends -o DPkg::Lock::Timeout=120"
if ! systemd-nspawn -q -D "$r" --register=no --keep-unit --pipe -- \
        $apt install --download-only "/var/tmp/mailerd-unittest/$name" >>"$log" 2>&1; then
    systemd-nspawn -q -D "$r" --register=no --keep-unit --pipe -- apt-get -q update >>"$log" 2>&1
    systemd-nspawn -q -D "$r" --register=no --keep-unit --pipe -- \
        $apt install --download-only "/var/tmp/mailerd-unittest/$name" >>"$log" 2>&1
fi
echo booting
exec systemd-nspawn -q -D "$r" --register=no --keep-unit --private-network \
    --console=passive -b -- systemd.unit=mailerd-unit-test.target >>"$log" 2>&1
"""

_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """(preexec_fn) SIGKILL when the test process dies: the container goes with it."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Container(Target):
    """A booted systemd in an overlay of this machine's root; commands run in it by nsenter."""

    name = "container"
    since = ""  # the journal's cursor where what counts begins (exercise: its first step)

    @staticmethod
    def check() -> None:
        Sandbox.check()  # (the same overlay of the root filesystem)
        if not shutil.which("systemd-nspawn", path=ENV["PATH"]):
            raise Unavailable("no systemd-nspawn (apt-get install systemd-container)")
        if not os.path.exists("/lib/systemd/systemd"):
            raise Unavailable("no systemd on this machine to boot")

    def __init__(self, deb: Path) -> None:
        self.check()
        self.work = Path(tempfile.mkdtemp(prefix="mailerd-unittest."))
        self.log = self.work / "nspawn.log"
        self.log.touch()
        (self.work / "base").mkdir()
        self.keeper = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
            + ["--propagation", "private", "/bin/sh", "-c", SETUP, "sh"]
            + [str(self.work / "base"), str(deb), str(self.log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=ENV,
            preexec_fn=_die_with_parent,
        )
        self.pid = 0
        try:
            self._boot()
        except BaseException:
            self.close()
            raise

    def _boot(self) -> None:
        assert self.keeper.stdout is not None
        os.set_blocking(self.keeper.stdout.fileno(), False)
        said = b""
        deadline = time.monotonic() + DOWNLOAD_TIMEOUT
        while b"booting" not in said:
            if self.keeper.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"could not prepare the container:\n{self.log_tail()}")
            said += self.keeper.stdout.read() or b""
            time.sleep(0.1)
        # PID 1 of the namespace is nspawn; its child, once it has one, is the container's
        # systemd (the download's nspawn ran before and is gone).
        nspawn = _first_child(self.keeper.pid)

        def init() -> int | None:
            with contextlib.suppress(Unavailable, OSError):
                pid = _first_child(nspawn)
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
            return None

        pid = wait_until(init, BOOT_TIMEOUT, 0.05)
        if not pid:
            raise Unavailable(f"systemd-nspawn booted nothing:\n{self.log_tail()}")
        self.pid = pid

        # (the manager's socket may not be there yet: systemctl then says nothing)
        def state() -> str:
            up = self.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=BOOT_TIMEOUT
            )
            return _text(up.stdout).strip()

        said = wait_until(state, BOOT_TIMEOUT, 0.1)
        # "degraded": one of the machine's own units failed to start in a container (its
        # business, not the unit's under test, which is not installed yet): booted all the same.
        assert said in ("running", "degraded"), (
            f"the container's systemd is {said!r}:\n"
            + self.out(["systemctl", "--failed", "--no-pager"], check=False)
        )

    def prefix(self) -> list[str]:
        return ["nsenter", "--target", str(self.pid), "--all", "--"]

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    @contextlib.contextmanager
    def network(self) -> Iterator[None]:
        """This thread in the container's network (and threads it starts meanwhile: those
        stay there): sockets made here are the container's."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        theirs = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            if _libc.setns(theirs, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the container's network")
            try:
                yield
            finally:
                if _libc.setns(own, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the machine's network")
        finally:
            os.close(own)
            os.close(theirs)

    def close(self) -> None:
        # nspawn is PID 1 of the namespace: killing it kills everything there, the
        # container's systemd and all it started; the mounts go with the last of them.
        if self.keeper.poll() is None:
            with contextlib.suppress(Unavailable, ProcessLookupError):
                os.kill(_first_child(self.keeper.pid), signal.SIGKILL)
            try:
                self.keeper.wait(15)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait(5)
        if self.pid:
            gone = wait_until(lambda: not os.path.exists(f"/proc/{self.pid}"), 10, 0.05)
            assert gone, f"the container's systemd (pid {self.pid}) outlived its teardown"
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture
def container(deb: Path) -> Iterator[Container]:
    try:
        c = Container(deb)
    except Unavailable as exc:
        pytest.skip(f"cannot boot a container here: {exc}")
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


def test_hardened_unit_under_systemd(container: Container, deb: Path, upgrade_deb: Path):
    c = container
    prepare(c)
    install(c, deb)
    with c.network(), services() as (dns, mx):
        exercise(c, dns, mx)
    check_confinement(c)
    read_only_spool(c)
    upgrade(c, upgrade_deb)


def read_only_spool(c: Container) -> None:
    """A spool elsewhere than the unit lets mailerd write (ProtectSystem=strict): the start
    fails and says how to let it (every local copy was deferred, "Read-only file system"), in
    `systemctl status`; and so does a configuration it refuses (exit 2). Neither start is
    retried: Restart=on-failure retried both every 5 s for ever (RestartPreventExitStatus=2
    judges the main process, which a failed Type=forking start has not), and `systemctl
    status` then showed systemd's lines of the latest try, never mailerd's reason."""
    conf = c.read(CONF)
    c.run(["mkdir", "-p", "/srv/mailerd-unittest-spool"])
    cases = [
        (
            b"spool = /srv/mailerd-unittest-spool\n",
            "cannot write to spool /srv/mailerd-unittest-spool",
        ),
        (b"tls-requird = yes\n", "unknown key 'tls-requird'"),
    ]
    try:
        for line, reason in cases:
            c.write(CONF, conf + line)
            start = c.run(["systemctl", "start", UNIT], check=False, timeout=120)
            assert start.returncode != 0, f"started with {line!r}"
            state = c.out(["systemctl", "show", "-p", "SubState", "--value", UNIT]).strip()
            assert state == "failed", f"{line!r}: {state}, not failed: systemd retries it"
            said = c.out(["systemctl", "status", "--no-pager", "-l", UNIT], check=False)
            assert reason in said, said
            if b"spool" in line:
                assert "ReadWritePaths=" in said, said
            c.run(["systemctl", "reset-failed", UNIT], check=False)
    finally:
        c.write(CONF, conf)
        c.run(["rm", "-rf", "/srv/mailerd-unittest-spool"])
        c.run(["systemctl", "reset-failed", UNIT], check=False)


def upgrade(c: Container, later: Path) -> None:
    """An upgrade under systemd, the daemon running: the postinst restarts it (a new main
    process, on the new code), the configuration is kept, and it serves."""
    assert c.run(["systemctl", "start", UNIT], check=False, timeout=120).returncode == 0
    before = main_pid(c)
    conf = c.read(CONF)
    package = f"/var/tmp/{later.name}"
    c.write(package, later.read_bytes())
    c.run([*APT, "install", package], timeout=300)  # (offline: nothing new needed)
    version = c.out(["dpkg-query", "-W", "-f", "${Version}", "mailerd"]).strip()
    assert version == later.name.split("_")[1], version
    assert active(c), status(c)
    assert main_pid(c) != before, "the upgrade's postinst must restart the daemon"
    assert not c.exists(f"/proc/{before}"), "the old master outlived the upgrade"
    assert c.read(CONF) == conf, "the upgrade changed the configuration"
    with c.network():
        assert rcpt_code(f"{USER}@{DOMAIN}") == 250, f"not serving after the upgrade{journal(c)}"
    assert c.run(["systemctl", "stop", UNIT], check=False, timeout=120).returncode == 0


def prepare(c: Container) -> None:
    """The container's "Internet" interface, the test user, root's alias."""
    for cmd in (
        "ip link add mdtest0 type veth peer name mdtest1",  # (both ends in the container)
        f"ip addr add {NETWORK_ADDRESS}/24 dev mdtest0",
        "ip link set mdtest0 up",
        "ip link set mdtest1 up",
        "ip link set lo up",
        "ip route add default via 192.0.2.1 dev mdtest0",
    ):
        c.run(cmd)
    c.run(["useradd", "--create-home", "--shell", "/bin/sh", USER])
    c.write("/etc/aliases", f"# written by {Path(__file__).name}\nroot: {USER}\n".encode())


def install(c: Container, deb: Path) -> None:
    """apt-get install of the .deb (from what the download left in apt's cache): the postinst
    enables the unit and starts it through systemd, with the package's configuration."""
    c.run(["debconf-set-selections"], input=f"mailerd mailerd/mailname string {DOMAIN}\n".encode())
    # (offline: all is in the cache)
    c.run([*APT, "install", f"/var/tmp/mailerd-unittest/{deb.name}"], timeout=300)
    assert c.out(["systemctl", "is-enabled", UNIT], check=False).strip() == "enabled"
    assert active(c), status(c)
    assert main_pid(c) == int(c.read(PIDFILE).split()[0]), "Type=forking's PIDFile"


@contextlib.contextmanager
def services() -> Iterator[tuple[DNSServer, FakeMX]]:
    """(in the container's network) the DNS and the remote MX."""
    zone = f"{REMOTE}. MX 10 {MX_NAME}.\n{MX_NAME}. A {MX_HOST}\n"
    dns = DNSServer(Records(zone), DNS_HOST, DNS_PORT)
    dns.start()
    try:
        mx = FakeMX(MX_HOST, 25)
        try:
            yield dns, mx
        finally:
            mx.stop()
    finally:
        dns.stop()


def exercise(c: Container, dns: DNSServer, mx: FakeMX) -> None:
    """Every path the daemon takes under the unit, through systemctl (in the container's
    network). Repeatable on one container (another unit file in between)."""
    box = f"{SPOOL}/{USER}"
    uid = c.out(["id", "-u", USER]).strip()
    for path in (CONF + ".d", DKIM_KEY, LINEAGE, LOG_FILE):
        c.run(["rm", "-rf", "--", path])
    c.since = journal_cursor(c)  # (the journal from here on)
    c.write(CONF, config_text().encode())
    restart = c.run(["systemctl", "restart", UNIT], check=False, timeout=120)
    assert restart.returncode == 0, f"systemctl restart failed\n{status(c)}"
    master = main_pid(c)

    # -- port 25 of the network listener, for a local user: in the spool, the user's ---------
    token = uuid.uuid4().hex
    with smtp(NETWORK_ADDRESS, 25) as s:
        s.sendmail(f"someone@{REMOTE}", [f"{USER}@{DOMAIN}"], message(f"{USER}@{DOMAIN}", token))
    first = stored(c, box, token)
    assert c.stat(first)[0] == USER and c.stat(box)[0] == USER, "a mailbox is its user's"
    assert c.out(["readlink", "-e", first]).startswith("/var/mail/"), "Debian: /var/mail"
    assert any(REMOTE in question for _, question in dns.queries), "the inbound checks' DNS"

    # -- sendmail as root (cron's way) and as a user: the maildrop, the pickup ---------------
    cron = uuid.uuid4().hex
    c.run(["/usr/sbin/sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
          input=cron_message(cron))  # fmt: skip
    raw = c.read(stored(c, box, cron))
    assert submitted_by_root(raw), raw[:600]
    mine = uuid.uuid4().hex
    c.run(
        ["runuser", "-u", USER, "--", "/usr/sbin/sendmail", "-i", USER],
        input=f"Subject: user {mine}\n\nbody {mine}\n".encode(),
    )
    raw = c.read(stored(c, box, mine))
    assert f"(mailerd, from userid {uid})".encode() in raw, raw[:600]
    assert c.run(["/usr/bin/mailq"]).returncode == 0

    # -- newaliases: a reload of the aliases -------------------------------------------------
    alias = f"unitalias@{DOMAIN}"
    c.write("/etc/aliases", f"root: {USER}\nunitalias: {USER}\n".encode())
    said = c.run(["/usr/bin/newaliases"])
    assert "reloads" in _text(said.stderr), said
    assert wait_until(lambda: rcpt_code(alias) == 250, 20, 0.2), f"{alias}\n{journal(c)}"

    # -- a new host name (hostnamectl set-hostname), then a reload: the FQDN is a local domain
    # (the unit's ProtectHostname= froze the name the daemon saw at its start)
    old_name = c.out(["hostname"]).strip()
    c.run(["hostname", "mx-renamed.unit.example"])
    try:
        reload(c)
        renamed = wait_until(lambda: "mx-renamed.unit.example, localhost" in journal(c), 10, 0.2)
        assert renamed, f"the reload kept the old host name{journal(c)}"
    finally:
        c.run(["hostname", old_name])

    # -- a password, a DKIM key, a certificate: systemctl reload -----------------------------
    password = f"Pw-{uuid.uuid4().hex[:10]}"
    done = c.run(["/usr/sbin/mailerd", "passwd", USER], input=f"{password}\n".encode())
    assert b"set the password" in done.stderr, done
    c.run(["/usr/sbin/mailerd", "dkim", "keygen", "--selector", DKIM_SELECTOR, DOMAIN])
    first_cert = issue_certificate(c)
    c.write(CONF, config_text(tls=True).encode())
    reload(c)
    assert served_certificate() == first_cert

    # authenticated submission, relayed to the remote domain's MX (by the DNS), DKIM-signed
    relayed = uuid.uuid4().hex
    sender = f"{USER}@{DOMAIN}"
    with smtp("127.0.0.1", SUBMISSION_PORT) as s:
        s.starttls(context=ssl_client())
        s.login(USER, password)
        s.sendmail(sender, [f"friend@{REMOTE}"], message(f"friend@{REMOTE}", relayed, sender))
    got = wait_until(lambda: [m for m in mx.messages if relayed.encode() in m.data], 30, 0.2)
    assert got, f"nothing relayed to the MX in 30 s\n{journal(c)}"
    assert got[0].recipients == [f"friend@{REMOTE}"]
    assert re.search(rb"^DKIM-Signature:.* d=unit\.example;", got[0].data, re.M | re.S), got[0]
    assert any(MX_NAME in question for _, question in dns.queries), "the relayhost's lookup"

    # -- a renewed certificate (certbot's deploy hook does this reload) ----------------------
    second_cert = issue_certificate(c)
    reload(c)
    assert served_certificate() == second_cert != first_cert, "the renewed certificate"
    assert main_pid(c) == master, "reloads, not restarts"

    # -- the config's example log file, and logrotate's SIGUSR1 (a restart takes it) ---------
    c.write(CONF, config_text(tls=True, log=True).encode())
    assert c.run(["systemctl", "restart", UNIT], check=False, timeout=120).returncode == 0
    c.run(["logrotate", "--force", "--state", "/run/mailerd-unittest.logrotate", LOGROTATE])
    assert c.exists(LOG_FILE + ".1"), "rotated"
    late = uuid.uuid4().hex
    with smtp("127.0.0.1", 25) as s:
        s.sendmail(f"someone@{REMOTE}", [f"{USER}@{DOMAIN}"], message(f"{USER}@{DOMAIN}", late))
    stored(c, box, late)
    assert wait_until(lambda: c.exists(LOG_FILE), 10, 0.2), "no new log file"
    written = wait_until(lambda: "relay=local" in _text(c.read(LOG_FILE)), 10, 0.2)
    assert written, f"nothing in the new log file\n{journal(c)}"
    c.run(["rm", "-f", LOG_FILE + ".1", "/run/mailerd-unittest.logrotate"])

    # -- stop: clean, nothing left -----------------------------------------------------------
    processes = [main_pid(c), *pids_of(c)]
    stop = c.run(["systemctl", "stop", UNIT], check=False, timeout=120)
    assert stop.returncode == 0, status(c)
    assert c.out(["systemctl", "show", "-p", "Result", "--value", UNIT]).strip() == "success"
    assert not [pid for pid in processes if c.exists(f"/proc/{pid}")], "left after stop"
    assert not c.exists(PIDFILE)

    # -- the journal: the daemon's syslog lines (/dev/log) and no error ----------------------
    said = journal(c, lines=5000)
    assert f"to=<{USER}@{DOMAIN}>" in said, said[-3000:]
    errors = c.out(
        ["journalctl", "-q", "--no-pager", "-p", "err", "-u", UNIT, *after(c)],
        check=False,
    )
    assert not errors.strip(), errors
    assert "Traceback" not in said, said[-3000:]


def check_confinement(c: Container) -> None:
    """The unit's sandbox is there: what the kernel says of the master, what a command run
    inside the unit may do (a drop-in's ExecStartPost=, with the daemon's sandbox), and
    systemd-analyze's rating."""
    probe = "/run/mailerd-unittest.probe"
    dropin = f"/run/systemd/system/{UNIT}.d/unittest-probe.conf"
    script = (
        f"exec >{probe} 2>&1; "
        "setpriv --reuid=mail --regid=mail --init-groups unshare --user true "
        "&& echo userns-made || echo userns-refused; "
        "touch /usr/lib/mailerd-unittest && echo usr-written || echo usr-refused"
    )
    c.run(["mkdir", "-p", os.path.dirname(dropin)])
    c.write(dropin, f"[Service]\nExecStartPost=/bin/sh -c '{script}'\n".encode())
    c.run(["systemctl", "daemon-reload"])
    try:
        assert c.run(["systemctl", "start", UNIT], check=False, timeout=120).returncode == 0
        said = _text(c.read(probe))
        assert "userns-refused" in said and "usr-refused" in said, said
        proc = _text(c.read(f"/proc/{main_pid(c)}/status"))
        assert re.search(r"^NoNewPrivs:\s+1$", proc, re.M), proc
        assert re.search(r"^Seccomp:\s+2$", proc, re.M), proc
        found = re.search(r"^CapBnd:\s+(\w+)$", proc, re.M)
        assert found, proc
        want = c.out(["systemctl", "show", "-p", "CapabilityBoundingSet", "--value", UNIT])
        assert "cap_sys_admin" not in want.split(), want
        assert bin(int(found.group(1), 16)).count("1") == len(want.split()), (proc, want)
        report = c.out(["systemd-analyze", "security", "--no-pager", UNIT])
        score = re.search(r"Overall exposure level for \S+: ([\d.]+)", report)
        assert score and float(score.group(1)) <= EXPOSURE_MAX, report
        c.run(["systemctl", "stop", UNIT], timeout=120)
    finally:
        c.run(["rm", "-rf", os.path.dirname(dropin), probe])
        c.run(["systemctl", "daemon-reload"])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def config_text(tls: bool = False, log: bool = False) -> str:
    """The package's defaults (the spool, the queue, listeners on port 25 of the loopback and
    of the default route's interface; the mail name as the domain) and the test's DNS."""
    text = (
        f"# written by {Path(__file__).name}\n[mailerd]\n"
        f"hostname = {HOSTNAME}\nworkers = 1\n"
        f"dns-server = {DNS_HOST}:{DNS_PORT}\nrelayhost = {MX_NAME}\n"
    )
    if tls:
        text += (
            f"tls-cert = {LINEAGE}/fullchain.pem\ntls-key = {LINEAGE}/privkey.pem\n"
            "listen-submission = 127.0.0.1\npasswd = /etc/mailerd/passwd\n"
            f"dkim-key = {DOMAIN}:{DKIM_SELECTOR}:{DKIM_KEY}\n"
        )
    if log:
        text += f"log-file = {LOG_FILE}\n"
    return text


def issue_certificate(c: Container) -> bytes:
    """A new certificate and key where certbot keeps them; the certificate's DER."""
    from certs import make_ca

    with tempfile.TemporaryDirectory() as here:
        pair = make_ca(Path(here)).issue(HOSTNAME)
        c.run(["mkdir", "-p", LINEAGE])
        c.write(f"{LINEAGE}/fullchain.pem", pair.cert.read_bytes())
        c.write(f"{LINEAGE}/privkey.pem", pair.key.read_bytes(), "600")
        return ssl.PEM_cert_to_DER_cert(pair.cert.read_text())


def served_certificate() -> bytes:
    with smtp("127.0.0.1", SUBMISSION_PORT) as s:
        s.starttls(context=ssl_client())
        return s.sock.getpeercert(binary_form=True)


def reload(c: Container) -> None:
    done = c.run(["systemctl", "reload", UNIT], check=False, timeout=120)
    assert done.returncode == 0, f"systemctl reload failed\n{status(c)}"


@contextlib.contextmanager
def smtp(host: str, port: int) -> Iterator[smtplib.SMTP]:
    with smtplib.SMTP(host, port, local_hostname=CLIENT_NAME, timeout=IO_TIMEOUT) as s:
        yield s


def rcpt_code(rcpt: str) -> int:
    try:
        with smtp(NETWORK_ADDRESS, 25) as s:
            s.ehlo(CLIENT_NAME)
            s.mail(f"probe@{REMOTE}")
            return s.rcpt(rcpt)[0]
    except (OSError, smtplib.SMTPException):
        return 0


def stored(c: Container, box: str, token: str, timeout: float = 30.0) -> str:
    return test_deb.stored(c, box, token, timeout, lambda: f"\n{queue(c)}{journal(c)}")


def active(c: Container) -> bool:
    return c.out(["systemctl", "is-active", UNIT], check=False).strip() == "active"


def main_pid(c: Container) -> int:
    return int(c.out(["systemctl", "show", "-p", "MainPID", "--value", UNIT]).strip())


def pids_of(c: Container) -> list[int]:
    """mailerd's processes (their titles: mailerd: master, worker 1, ...)."""
    listing = c.out(["ps", "-e", "-o", "pid=,args="])
    return [int(line.split()[0]) for line in listing.splitlines() if " mailerd: " in line]


def status(c: Container) -> str:
    return c.out(["systemctl", "status", "--no-pager", "-l", UNIT], check=False) + journal(c)


def journal(c: Container, lines: int = 40) -> str:
    said = c.out(
        ["journalctl", "-q", "--no-pager", "-n", str(lines), "-u", UNIT, *after(c)],
        check=False,
    )
    return f"\njournal (mailerd):\n{said}"


def after(c: Container) -> list[str]:
    return [f"--after-cursor={c.since}"] if c.since else []


def journal_cursor(c: Container) -> str:
    said = c.out(["journalctl", "-q", "-n", "0", "--show-cursor"])
    return said.strip().removeprefix("-- cursor: ")


def queue(c: Container) -> str:
    listing = c.out(["sh", "-c", f"ls -lAR {QUEUE} 2>&1 | head -40"], check=False)
    return f"\nqueue:\n{listing}"

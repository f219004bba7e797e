"""The Debian package, end to end: build it, install it, run it as an administrator would, purge it.

`scripts/build-deb` builds ``mailerd_<version>_all.deb``; the package is then installed with
``apt-get install ./mailerd_….deb`` (which pulls python3-dnspython, python3-daemon and
python3-setproctitle from the archive), its debconf question (the mail name) preseeded with
``debconf-set-selections`` to ``pkgtest.example``, which must land in /etc/mailname. The postinst
must have made the queue as mailerd lays it out (``mailerd.queue.SUBDIRS``, the maildrop and the
pickup FIFO), and /usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq and /usr/bin/newaliases
must be links to mailerd. With /etc/aliases sending root's mail to the test user, mail to root
is sent before the daemon ever ran (as cron sends it, and through /usr/lib/sendmail); then
mailerd is configured for the test (loopback-only high ports, no ``domain``: the mail name is
the local domain, a smarthost that is an aiosmtpd receiver run by the test, a DNS server the test
runs: tests/dnsserver.py, with no records), and driven through
``/etc/init.d/mailerd``: start (the waiting mail is delivered), deliver one message to a local
user, mail root with ``mail`` (bsd-mailx, installed with apt), ``mailq``, ``newaliases`` (the
daemon reloads the aliases), relay one to the fake MX, upgrade to the same code at a later
version (``conftest.upgrade_deb``) with a message waiting in the queue (its MX down: it leaves
afterwards; the configuration, aliases and mailboxes kept), reload after adding a domain, status,
stop; ``dpkg-reconfigure`` keeps a hand-edited /etc/mailname; then ``apt-get purge mailerd`` —
which must remove the configuration, the queue and the debconf answers but never the users'
mailboxes nor /etc/mailname — and the test removes what it made itself (its user and that
user's mailbox, /etc/aliases and /etc/mailname, or their previous contents put back).

Where the package is installed (``MAILERD_PKGTEST_MODE``):

- ``sandbox`` (what ``auto``, the default, picks when it can): a throw-away view of this machine.
  The root filesystem is mounted as the lower layer of an overlayfs whose upper layer is a tmpfs,
  in a private mount and PID namespace (``unshare``), with fresh /proc, /dev (own /dev/log, so
  the test sees the daemon's syslog lines), /tmp and /run; the network is the machine's. dpkg,
  apt and the daemon run there, so the machine's own files and packages are never touched —
  even if an MTA such as Postfix is installed (``Conflicts: mail-transport-agent`` makes apt
  remove it, but only inside the sandbox) and even if the test is killed: the namespace and
  everything in it disappear with the test process. Needs /usr, /var and /etc on the root
  filesystem.
- ``host``: on the machine itself, when the sandbox is not possible. Refused (skipped, with the
  reason) when a mail-transport-agent package is installed, because installing mailerd would
  remove it. Teardown stops and purges mailerd, purges the packages the install pulled in,
  removes the test user and its mailbox, removes the temporary policy-rc.d and restores the
  passwd/group backup files, even when the test failed.

Either way, teardown checks the footprint: no file or directory named after mailerd or the test
user is left on /etc, /var, /usr, /run, /opt, /srv or /home that was not there before (in the
sandbox: among what the sandbox itself wrote, so other tests changing the machine meanwhile do
not count).

Needs root and Debian (dpkg, apt-get, and the archive for bsd-mailx); marked slow
(``scripts/test --full`` runs it). About a minute when the build dependencies are already
installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dnsserver import DNSServer, Records
from harness import free_port, wait_until

from .conftest import version

REPO = Path(__file__).resolve().parents[2]

USER = "mdpkgtest"  # the local recipient; created for the test, removed after
DOMAIN = "pkgtest.example"
DOMAIN2 = "pkgtest2.example"  # added by the reload
HOSTNAME = "mx.pkgtest.example"
REMOTE = "remote.example"
CLIENT_NAME = "client.pkgtest.example"  # our EHLO name (smtplib would look up the FQDN)
MX_HOST = "127.0.0.2"  # the fake MX; not 127.0.0.1, which mailerd knows as itself (loop check)

SPOOL = "/var/spool/mail"
QUEUE = "/var/spool/mailerd"
CONF = "/etc/mailerd/mailerd.conf"
LOGROTATE = "/etc/logrotate.d/mailerd"
MAILNAME = DOMAIN  # the debconf answer, preseeded: mailerd's first local domain through it
MAILNAME_FILE = "/etc/mailname"
ALIASES = "/etc/aliases"
PASSWD = "/etc/mailerd/passwd"
LINEAGE = "/etc/letsencrypt/live/pkgtest-mx"  # where certbot would keep the certificate
LETSENCRYPT_DIRS = ("/etc/letsencrypt", "/etc/letsencrypt/live", LINEAGE)
# The machine's mail commands, links to mailerd (relative, as lintian wants)
MTA_LINKS = {
    "/usr/sbin/sendmail": "mailerd",
    "/usr/lib/sendmail": "../sbin/sendmail",
    "/usr/bin/mailq": "../sbin/mailerd",
    "/usr/bin/newaliases": "../sbin/mailerd",
}
MAN_LINKS = ("sendmail", "mailq", "newaliases", "mailerd-queue")
MAILX = "bsd-mailx"  # Debian's mail(1); it needs a mail-transport-agent
INIT = "/etc/init.d/mailerd"
PIDFILE = "/run/mailerd.pid"
POLICY_RC_D = "/usr/sbin/policy-rc.d"
FOOTPRINT_DIRS = ("/etc", "/var", "/usr", "/run", "/opt", "/srv", "/home")
FOOTPRINT_IGNORE = ("/var/log/", "/var/cache/", "/var/lib/apt/")  # logs and caches may mention us
STEP_TIMEOUT = 90.0  # any one command
IO_TIMEOUT = 15.0

ENV = {
    # Debian's tools and Debian's python3 (the package's #! line), never a pyenv or .venv one
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
    "APT_LISTCHANGES_FRONTEND": "none",
    # The suite's guard (tests/conftest.py), which this fixed environment would drop: every
    # mailerd started here (the init script's daemon too) refuses the machine's resolver, the
    # sandbox's /etc/resolv.conf being the machine's. The test's config names its DNS server.
    "MAILERD_FORBID_SYSTEM_RESOLVER": "1",
}
APT = ["apt-get", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120"]
DEBCONF_PURGE = ["debconf-communicate", "mailerd"]  # with "PURGE" on its input

# (test_systemd_unit's too)
ON_DEBIAN = pytest.mark.skipif(
    not (shutil.which("dpkg") and shutil.which("apt-get")),
    reason="not a Debian system (no dpkg/apt-get)",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a Debian package: needs root"),
    ON_DEBIAN,
]


# --------------------------------------------------------------------------------------------
# Where the package goes: a sandbox or this machine
# --------------------------------------------------------------------------------------------


class Unavailable(Exception):
    """This way of installing cannot be used here; the message says why."""


def _run(argv: list[str], *, input: bytes | None, timeout: float) -> subprocess.CompletedProcess:
    """Run with a timeout that kills the whole process group (a daemon that never detached too)."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


class Target:
    """A root filesystem and process space to install into; subclasses say which."""

    name = ""

    def prefix(self) -> list[str]:
        return []

    def run(
        self,
        cmd: list[str] | str,
        *,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = STEP_TIMEOUT,
    ) -> subprocess.CompletedProcess:
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        try:
            result = _run(self.prefix() + argv, input=input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"[{self.name}] {cmd!r} did not finish within {timeout:.0f} s\n"
                f"stdout: {_text(exc.output)}\nstderr: {_text(exc.stderr)}"
            ) from None
        if check and result.returncode != 0:
            raise AssertionError(
                f"[{self.name}] {cmd!r} exited {result.returncode}\n"
                f"stdout: {_text(result.stdout)}\nstderr: {_text(result.stderr)}"
            )
        return result

    def out(self, cmd: list[str] | str, **kw) -> str:
        return _text(self.run(cmd, **kw).stdout)

    def exists(self, path: str) -> bool:
        return self.run(["test", "-e", path], check=False).returncode == 0 or self.is_link(path)

    def is_link(self, path: str) -> bool:
        return self.run(["test", "-L", path], check=False).returncode == 0

    def read(self, path: str) -> bytes:
        return self.run(["cat", "--", path]).stdout

    def write(self, path: str, data: bytes, mode: str = "644") -> None:
        self.run(f"cat > '{path}' && chmod {mode} '{path}'", input=data)

    def stat(self, path: str) -> tuple[str, str, str]:
        """(owner, group, octal mode) of a path, following symlinks."""
        owner, group, mode = self.out(["stat", "-L", "-c", "%U %G %a", path]).split()
        return owner, group, mode

    def footprint(self) -> set[str]:
        """Paths on the system directories whose names say mailerd or the test user."""
        dirs = [d for d in FOOTPRINT_DIRS if self.exists(d) and not self.is_link(d)]
        found = self.out(
            ["find", *dirs, "-xdev", "(", "-name", "*mailerd*", "-o", "-name", f"*{USER}*", ")"],
            check=False,
            timeout=180,
        )
        return {
            p
            for p in found.splitlines()
            if p and not any(p.startswith(prefix) for prefix in FOOTPRINT_IGNORE)
        }

    def close(self) -> None:
        pass


class Host(Target):
    name = "host"

    @staticmethod
    def check() -> None:
        mta = installed_mtas()
        if mta:
            raise Unavailable(
                f"{', '.join(mta)} provides mail-transport-agent on this machine: installing "
                "mailerd (Conflicts: mail-transport-agent) would remove it"
            )


# Run as root on the machine, before chroot, inside the new mount and PID namespaces:
# build the overlay and the fresh /proc, /dev, /tmp, /run, then become the keeper (PID 1).
SANDBOX_SETUP = r"""
set -eu
b=$1 keeper=$2
mount -t tmpfs -o mode=0700 mailerd-pkgtest "$b"
mkdir "$b/upper" "$b/work" "$b/root"
mount -t overlay mailerd-pkgtest -o "lowerdir=/,upperdir=$b/upper,workdir=$b/work" "$b/root"
r=$b/root
mount -t proc proc "$r/proc"
mount --bind /sys "$r/sys"
mount -o remount,bind,ro "$r/sys"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$r/dev"
for n in null zero full random urandom tty; do
    touch "$r/dev/$n"
    mount --bind "/dev/$n" "$r/dev/$n"
done
mkdir "$r/dev/pts" "$r/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$r/dev/pts"
ln -s pts/ptmx "$r/dev/ptmx"
mount -t tmpfs -o mode=1777 tmpfs "$r/dev/shm"
ln -s /proc/self/fd "$r/dev/fd"
ln -s /proc/self/fd/0 "$r/dev/stdin"
ln -s /proc/self/fd/1 "$r/dev/stdout"
ln -s /proc/self/fd/2 "$r/dev/stderr"
mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
if mountpoint -q /run; then
    mount -t tmpfs -o mode=0755 tmpfs "$r/run"
    mkdir -m 1777 "$r/run/lock"
fi
# No man-db index updates (its dpkg trigger takes seconds at every install and purge, and
# nothing here reads the index), as Debian's CI images do; only inside the overlay.
rm -f "$r/var/lib/man-db/auto-update"
# a resolver config that works inside (it may be a symlink into the host's /run)
cat /etc/resolv.conf > "$b/resolv.conf" 2>/dev/null || true
rm -f "$r/etc/resolv.conf"
cp "$b/resolv.conf" "$r/etc/resolv.conf"
printf '%s\n' "$keeper" > "$r/run/mailerd-pkgtest-keeper.py"
exec chroot "$r" /usr/bin/python3 /run/mailerd-pkgtest-keeper.py
"""

# PID 1 of the sandbox (Debian's python3, inside the chroot): reaps orphans (the daemon's
# double fork ends here), collects syslog datagrams from /dev/log into a file, and exits when
# its stdin (a pipe from the test) closes, which takes every process in the sandbox with it.
SANDBOX_KEEPER = r"""
import os, select, socket
log = open("/run/mailerd-pkgtest.syslog", "ab", buffering=0)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/dev/log")
os.chmod("/dev/log", 0o666)
print("ready", flush=True)
while True:
    ready, _, _ = select.select([0, sock], [], [], 0.2)
    if sock in ready:
        log.write(sock.recv(65536).rstrip(b"\0\n") + b"\n")
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    if 0 in ready and not os.read(0, 4096):
        break
"""


class Sandbox(Target):
    name = "sandbox"
    syslog = "/run/mailerd-pkgtest.syslog"

    @staticmethod
    def check() -> None:
        for tool in ("unshare", "nsenter", "chroot", "mountpoint"):
            if not shutil.which(tool, path=ENV["PATH"]):
                raise Unavailable(f"no {tool} (util-linux/coreutils)")
        root_dev = os.stat("/").st_dev
        for path in ("/usr", "/var", "/etc", "/var/lib/dpkg", "/var/spool"):
            if os.path.isdir(path) and os.stat(path).st_dev != root_dev:
                raise Unavailable(f"{path} is a separate filesystem: the overlay would miss it")
        if not os.access("/usr/bin/python3", os.X_OK):
            raise Unavailable("no /usr/bin/python3")

    def __init__(self) -> None:
        self.check()
        self.base = Path(tempfile.mkdtemp(prefix="mailerd-pkgtest."))
        self.keeper = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
            + ["/bin/sh", "-c", SANDBOX_SETUP, "sh", str(self.base), SANDBOX_KEEPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        ready: list[bytes] = []
        reader = threading.Thread(target=lambda: ready.append(self.keeper.stdout.readline()))
        reader.start()
        reader.join(30)
        if not ready or ready[0].strip() != b"ready":
            self.close()
            err = self.keeper.stderr.read().decode(errors="replace") if self.keeper.stderr else ""
            raise Unavailable(f"could not set up the overlay sandbox: {err.strip() or 'timeout'}")
        self.pid = _first_child(self.keeper.pid)  # the keeper, as the machine sees it

    def prefix(self) -> list[str]:
        return ["nsenter", "--target", str(self.pid), "--mount", "--pid", "--root", "--wd", "--"]

    def footprint(self) -> set[str]:
        """Like Target's, but only what the sandbox itself wrote (the overlay's upper layer): the
        machine's own files, which other tests may be changing meanwhile, do not count."""
        upper = f"{self.base}/upper"
        argv = ["nsenter", "--target", str(self.pid), "--mount", "--", "find", upper]
        argv += ["(", "-name", "*mailerd*", "-o", "-name", f"*{USER}*", ")", "!", "-type", "c"]
        found = _text(_run(argv, input=None, timeout=60).stdout)  # "-type c": whiteouts
        paths = {p[len(upper) :] for p in found.splitlines() if p.startswith(upper + "/")}
        return {
            p
            for p in paths
            if p.startswith(tuple(d + "/" for d in FOOTPRINT_DIRS))
            and not p.startswith(FOOTPRINT_IGNORE)
        }

    def close(self) -> None:
        if self.keeper.poll() is None:
            with contextlib.suppress(OSError):
                self.keeper.stdin.close()  # the keeper exits; the kernel ends the namespace
            try:
                self.keeper.wait(15)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait(5)
        with contextlib.suppress(OSError):
            self.base.rmdir()


def _first_child(parent: int) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{parent}/task/{parent}/children").read_text().split()[0])
    for entry in Path("/proc").iterdir():  # kernels without /proc/PID/task/TID/children
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                return int(entry.name)
    raise Unavailable(f"cannot find the sandbox's first process (child of {parent})")


def installed_mtas() -> list[str]:
    """Installed (or half-installed) packages that provide mail-transport-agent."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Status}\t${Provides}\n"],
        capture_output=True,
        text=True,
        env=ENV,
    ).stdout
    found = []
    for line in out.splitlines():
        package, status, provides = (line.split("\t") + ["", ""])[:3]
        if status in ("not-installed", "config-files", ""):
            continue
        names = {p.strip().split(" ")[0] for p in provides.split(",")}
        if "mail-transport-agent" in names or package == "mailerd":
            found.append(package)
    return found


def make_target() -> Target:
    mode = os.environ.get("MAILERD_PKGTEST_MODE", "auto")
    if mode not in ("auto", "sandbox", "host"):
        pytest.fail(f"MAILERD_PKGTEST_MODE={mode!r}: expected auto, sandbox or host")
    reasons = []
    if mode in ("auto", "sandbox"):
        try:
            return Sandbox()
        except Unavailable as exc:
            reasons.append(f"sandbox: {exc}")
            if mode == "sandbox":
                pytest.skip("; ".join(reasons))
    try:
        Host.check()
        return Host()
    except Unavailable as exc:
        reasons.append(f"host: {exc}")
        pytest.skip("cannot install the package here: " + "; ".join(reasons))


# --------------------------------------------------------------------------------------------
# Fixtures: the .deb, the machine it goes on, the fake MX
# --------------------------------------------------------------------------------------------


@dataclass
class Machine:
    """The install target plus what the test changed on it, so teardown can undo it all."""

    target: Target
    deb: Path
    made_policy: bool = False
    made_user: bool = False
    preseeded: bool = False
    packages_before: set[str] = field(default_factory=set)
    footprint_before: set[str] = field(default_factory=set)
    backups: dict[str, tuple[bytes, tuple[str, str, str]]] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)  # files to remove again (the test made them)
    made_dirs: list[str] = field(default_factory=list)  # directories that were not there

    def installed_packages(self) -> set[str]:
        out = self.target.out(["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Status}\n"])
        return {
            line.split("\t")[0]
            for line in out.splitlines()
            if line.split("\t")[1:] and line.split("\t")[1] not in ("not-installed", "config-files")
        }

    def mailerd_state(self) -> str:
        result = self.target.run(
            ["dpkg-query", "-W", "-f", "${db:Status-Status}", "mailerd"], check=False
        )
        return _text(result.stdout).strip() if result.returncode == 0 else "not-installed"


@pytest.fixture
def machine(deb: Path) -> Iterator[Machine]:
    target = make_target()
    if target.exists(f"{SPOOL}/{USER}") or _has_user(target, USER):
        target.close()
        pytest.skip(f"the user or mailbox {USER} already exists here; not touching it")
    m = Machine(target, deb)
    try:
        m.footprint_before = target.footprint()
        # the install writes /etc/mailname and the test /etc/aliases: both are put back
        for path in (MAILNAME_FILE, ALIASES):
            if target.exists(path):
                m.backups[path] = (target.read(path), target.stat(path))
            else:
                m.absent.add(path)
        # the certificate the submission check installs, where certbot keeps them
        m.made_dirs = [d for d in LETSENCRYPT_DIRS if not target.exists(d)]
        if isinstance(target, Host):
            m.packages_before = m.installed_packages()
            # useradd/userdel rewrite these backups; put them back as they were
            for name in ("passwd-", "group-", "shadow-", "gshadow-"):
                path = f"/etc/{name}"
                with contextlib.suppress(AssertionError):
                    m.backups[path] = (target.read(path), target.stat(path))
        yield m
    finally:
        try:
            problems = cleanup(m)
            assert not problems, "teardown could not restore the machine:\n" + "\n".join(problems)
        finally:
            target.close()


def cleanup(m: Machine) -> list[str]:
    """Undo everything, each step independently; return what could not be undone or was left."""
    t = m.target
    problems: list[str] = []

    def attempt(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - keep going, report everything
            problems.append(f"{what}: {exc}")

    if t.exists(INIT):
        attempt("stop mailerd", lambda: t.run([INIT, "stop"], check=False))
    if m.mailerd_state() != "not-installed":
        attempt("purge mailerd", lambda: t.run(APT + ["purge", "mailerd"]))
    if isinstance(t, Host) and m.packages_before:
        new = sorted(m.installed_packages() - m.packages_before)
        if new:
            attempt(f"purge {' '.join(new)}", lambda: t.run(APT + ["purge"] + new))
    if m.made_user:  # the mailbox did not exist before the user was made: it is the test's
        attempt(f"userdel {USER}", lambda: t.run(["userdel", USER]))
        attempt(f"remove {SPOOL}/{USER}", lambda: t.run(["rm", "-rf", "--", f"{SPOOL}/{USER}"]))
    if m.preseeded:  # the purge's db_purge did it, unless the install failed before
        attempt("purge the debconf answers", lambda: t.run(DEBCONF_PURGE, input=b"PURGE\n"))
    if m.made_policy:
        attempt("remove policy-rc.d", lambda: t.run(["rm", "-f", POLICY_RC_D]))
    for path, (data, (owner, group, mode)) in m.backups.items():
        attempt(f"restore {path}", lambda p=path, d=data, m=mode: t.write(p, d, m))
        attempt(f"chown {path}", lambda p=path, o=f"{owner}:{group}": t.run(["chown", o, p]))
    for path in m.absent:
        attempt(f"remove {path}", lambda p=path: t.run(["rm", "-f", "--", p]))
    for path in m.made_dirs:  # (outermost first: what the test made under it goes with it)
        attempt(f"remove {path}", lambda p=path: t.run(["rm", "-rf", "--", p]))
    if isinstance(t, Host):
        with contextlib.suppress(Exception):
            t.run(["rm", "-f", "/tmp/" + m.deb.name])
    try:
        left = t.footprint() - m.footprint_before
    except Exception as exc:  # noqa: BLE001
        problems.append(f"footprint: {exc}")
    else:
        if left:
            problems.append("left behind: " + ", ".join(sorted(left)))
    return problems


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes


class FakeMX:
    """An aiosmtpd receiver standing in for the smarthost / the recipient's MX."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.messages: list[Received] = []
        self.host = host
        self.port = port or free_port()
        mx = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd API)
                mx.messages.append(
                    Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
                )
                return "250 2.0.0 Ok: queued"

        self.handler = Handler()
        self.controller: Any = None
        self.start()

    def start(self) -> None:
        """Serving (again: an aiosmtpd Controller does not start twice, so a new one)."""
        from aiosmtpd.controller import Controller

        # (server_hostname: its greeting's name, which aiosmtpd would otherwise take from
        # socket.getfqdn(), a lookup of this machine's name: where /etc/hosts lacks it, the DNS
        # is asked, and inside test_systemd_unit's network, whose default route leads nowhere,
        # that waits out the resolver's timeout, past the Controller's 5 s to respond)
        self.controller = Controller(
            self.handler, hostname=self.host, port=self.port, server_hostname="mx.remote.example"
        )
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


@pytest.fixture
def fake_mx() -> Iterator[FakeMX]:
    pytest.importorskip("aiosmtpd", reason="aiosmtpd (the test extra) provides the fake MX")
    mx = FakeMX(MX_HOST)
    yield mx
    mx.stop()


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """The daemon's DNS server (the sandbox shares this machine's network): no records, so
    the inbound checks' lookups (SPF, DMARC of remote.example...) get NXDOMAIN, as the real DNS
    would say of .example, without the question leaving the machine."""
    server = DNSServer(Records())
    server.start()
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_package_metadata(deb: Path):
    """What dpkg and apt see: name, version, relations, files, conffiles, maintainer scripts."""
    fields = _deb_fields(deb)
    assert fields["Package"] == "mailerd"
    assert fields["Version"] == version(), "native package: Debian version = mailerd.__version__"
    assert fields["Architecture"] == "all"
    depends = _names(fields["Depends"])
    assert {"python3-dnspython", "python3-daemon", "python3-setproctitle"} <= depends, depends
    assert "debconf" in depends, depends  # (${misc:Depends}, from dh_installdebconf)
    assert "python3-argon2" in depends, depends  # (AUTH's password hashes)
    for relation in ("Provides", "Conflicts", "Replaces"):
        assert "mail-transport-agent" in _names(fields.get(relation, "")), relation

    files = set(
        _text(subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, check=True).stdout)
        .replace(" -> ", "\t")
        .split()
    )
    for path in (
        "./usr/sbin/mailerd",
        "./usr/sbin/mailerd-queue",
        "./etc/mailerd/mailerd.conf",
        "./etc/init.d/mailerd",
        "./etc/default/mailerd",
        "./lib/systemd/system/mailerd.service",
        "./etc/letsencrypt/renewal-hooks/deploy/mailerd",
        "./etc/fail2ban/filter.d/mailerd.conf",
        "./usr/share/man/man8/mailerd.8.gz",
        "./usr/lib/python3/dist-packages/mailerd/__init__.py",
        "./usr/share/doc/mailerd/copyright",
        *(f".{path}" for path in MTA_LINKS),
        *(f"./usr/share/man/man8/{name}.8.gz" for name in MAN_LINKS),
    ):
        assert path in files, f"{path} is not in the package"
    assert not any(p.startswith("./usr/lib/python3/dist-packages/tests") for p in files)

    with tempfile.TemporaryDirectory() as control:
        subprocess.run(["dpkg-deb", "-e", str(deb), control], check=True)
        conffiles = set(Path(control, "conffiles").read_text().split())
        assert {CONF, INIT, "/etc/default/mailerd"} <= conffiles, conffiles
        postrm = Path(control, "postrm").read_text()
        postinst = Path(control, "postinst").read_text()
        templates = Path(control, "templates").read_text()
        assert os.access(Path(control, "config"), os.X_OK), "no executable debconf config"
    assert "Template: mailerd/mailname\nType: string\n" in templates, templates
    assert re.search(r"^\s*db_purge\b", _code(postrm), re.M), "purge keeps the debconf answers"
    assert "/etc/mailname" in _code(postinst) and "/etc/mailerd/mailerd.conf" not in _code(postinst)
    # purge removes the config and the queue, and never the users' mailboxes
    assert re.search(r"rm -rf /etc/mailerd\b", postrm)
    assert re.search(r"rm -rf /var/spool/mailerd\b", postrm)
    assert not re.search(r"/var/(spool/)?mail(\s|/|$)", _code(postrm)), "postrm touches mailboxes"
    assert "mailerd queue init" in _code(postinst) and "#DEBHELPER#" not in postinst

    report = deb.with_name(f"mailerd_{version()}.lintian.txt")
    assert report.is_file(), "scripts/build-deb keeps lintian's report beside the .deb"
    errors = [line for line in report.read_text().splitlines() if line.startswith("E: ")]
    assert not errors, "lintian errors:\n" + "\n".join(errors)


def test_man_page_documents_every_option():
    """mailerd(8) lists every option mailerd accepts (the package installs it as the reference)."""
    from mailerd import config

    page = (REPO / "docs" / "mailerd.8").read_text().replace("\\-", "-")
    missing = [f"--{name}" for name, *_ in config.OPTIONS if f"--{name}" not in page]
    assert not missing, f"docs/mailerd.8 does not document {missing}"


def test_install_run_reload_stop_purge(
    machine: Machine, fake_mx: FakeMX, dns_server: DNSServer, upgrade_deb: Path
):
    t = machine.target
    ports = {"local": free_port(), "network": free_port()}

    # -- install ---------------------------------------------------------------------------
    # No daemon may start with the shipped config (port 25) during the install: the test
    # configures it first. policy-rc.d is the standard switch for that (as in Docker images).
    if not t.exists(POLICY_RC_D):
        t.write(POLICY_RC_D, b"#!/bin/sh\nexit 101\n", "755")
        machine.made_policy = True
    # The mail name, preseeded as an automated installation does (the install is
    # non-interactive, so the question is not shown).
    preseed = f"mailerd mailerd/mailname string {MAILNAME}\n".encode()
    machine.preseeded = True
    t.run(["debconf-set-selections"], input=preseed)
    package = f"/tmp/{machine.deb.name}"
    t.write(package, machine.deb.read_bytes())
    apt_install(t, package)  # (removes an installed MTA: Conflicts: mail-transport-agent)
    assert machine.mailerd_state() == "installed"

    # what the postinst made: /etc/mailname from the answer, and the queue with its maildrop
    assert t.read(MAILNAME_FILE) == f"{MAILNAME}\n".encode()
    assert f"mailerd/mailname: {MAILNAME}" in t.out(["debconf-show", "mailerd"])
    check_queue_layout(t)
    assert t.exists(SPOOL)
    conffiles = t.out(["dpkg-query", "-W", "-f", "${Conffiles}", "mailerd"])
    assert CONF in conffiles, conffiles

    # the machine's mail commands, and their manual pages, are links to mailerd's
    for path, target in MTA_LINKS.items():
        assert t.out(["readlink", path]).strip() == target, path
        assert t.out(["readlink", "-e", path]).strip() == "/usr/sbin/mailerd", path
    man8 = "/usr/share/man/man8"
    if t.exists(f"{man8}/mailerd.8.gz"):  # (unless dpkg is told to leave out manual pages)
        for name in MAN_LINKS:
            page = t.out(["readlink", "-e", f"{man8}/{name}.8.gz"]).strip()
            assert page == f"{man8}/mailerd.8.gz", name

    # -- configure -------------------------------------------------------------------------
    t.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
        + ["--shell", "/usr/sbin/nologin", USER]
    )
    machine.made_user = True
    t.write(ALIASES, f"# written by tests/package/test_deb.py\nroot: {USER}\n".encode())
    box = f"{SPOOL}/{USER}"

    # -- the mail commands work before the daemon ever ran: the mail waits in the maildrop ---
    # As Debian's cron sends a job's output (`root` without a domain gets the mail name).
    cron_token = uuid.uuid4().hex
    t.run(
        ["/usr/sbin/sendmail", "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
        input=cron_message(cron_token),
    )
    # As an old script does, through the traditional path
    script_token = uuid.uuid4().hex
    t.run(
        ["/usr/lib/sendmail", "-t", "-oi"],
        input=f"To: root\nSubject: script {script_token}\n\nbody {script_token}\n".encode(),
    )
    waiting = t.out(["ls", "-A", f"{QUEUE}/maildrop"]).split()
    assert len(waiting) == 2, waiting
    assert t.run(["/usr/bin/mailq"]).returncode == 0  # (the maildrop is not the queue)

    # -- start -----------------------------------------------------------------------------
    # Without `domain` in the config: the local domain is the mail name, the debconf answer.
    t.write(CONF, config_text(ports, None, fake_mx.port, dns_server.port).encode())
    # (longer than the 60 s mailerd waits for its workers: a start that fails says why)
    start = t.run([INIT, "start"], check=False, timeout=90)
    assert start.returncode == 0, (
        f"{INIT} start exited {start.returncode}:\n{_text(start.stdout)}{_text(start.stderr)}"
        f"{syslog_tail(t)}"
    )
    master = int(t.read(PIDFILE).split()[0])
    # the start command returned only after binding: the listeners answer at once
    for role, port in ports.items():
        with smtp(port) as s:
            code, _ = s.ehlo(CLIENT_NAME)
            assert code == 250, (role, code)
    status = t.run([INIT, "status"], check=False)
    assert status.returncode == 0 and "running" in _text(status.stdout), status

    # serving SMTP as "mail", not root (the master keeps root to re-bind on reload)
    children = child_pids(t, master)
    assert children, "the master has no worker or delivery process"
    mail_uid = t.out(["id", "-u", "mail"]).strip()
    uids = {pid: process_uid(t, pid) for pid in children}
    assert mail_uid in uids.values(), f"no child of the master runs as mail (uids: {uids})"

    # -- deliver one message to a local user (network listener) -----------------------------
    token = uuid.uuid4().hex
    with smtp(ports["network"]) as s:
        s.sendmail(f"someone@{REMOTE}", [f"{USER}@{DOMAIN}"], message(f"{USER}@{DOMAIN}", token))
    first = stored(t, box, token)
    asked = [question for _, question in dns_server.queries]
    assert any(REMOTE in question for question in asked), f"no lookup of {REMOTE}: {asked}"
    assert t.stat(first)[0] == USER, "a mailbox belongs to its user"
    assert t.stat(box)[0] == USER

    # the mail from the maildrop was picked up at the start, for root: the alias's mailbox
    raw = t.read(stored(t, box, cron_token))
    assert submitted_by_root(raw), raw[:800]
    assert raw.startswith(f"Return-Path: <root@{MAILNAME}>\r\n".encode()), raw[:800]
    assert f"Subject: Cron <root@{HOSTNAME}> job {cron_token}".encode() in raw, raw[:800]
    assert "ünïcødé".encode() in raw, "8-bit body intact"
    raw = t.read(stored(t, box, script_token))
    assert submitted_by_root(raw), raw[:800]
    assert f"Subject: script {script_token}".encode() in raw, raw[:800]
    emptied = wait_until(lambda: not t.out(["ls", "-A", f"{QUEUE}/maildrop"]).strip(), 10, 0.2)
    assert emptied, "the pickup leaves the files in the maildrop"

    # mail(1), as users and scripts run it: Debian's bsd-mailx, which needs an MTA
    apt_install(t, MAILX)
    mail_token = uuid.uuid4().hex
    t.run(f"echo 'body {mail_token}' | mail -s 'mail(1) {mail_token}' root")
    raw = t.read(stored(t, box, mail_token))
    assert submitted_by_root(raw), raw[:800]
    assert f"Subject: mail(1) {mail_token}".encode() in raw, raw[:800]

    # mailq lists the queue (empty: everything was local)
    listing = t.run(["/usr/bin/mailq"])
    assert _text(listing.stdout).strip(), listing

    # newaliases checks /etc/aliases and has the daemon reload it
    alias_rcpt = f"pkgalias@{DOMAIN}"
    assert rcpt_code(ports["network"], alias_rcpt) == 550, "not an alias yet"
    t.write(ALIASES, f"root: {USER}\npkgalias: root\n".encode())
    said = t.run(["/usr/bin/newaliases"])
    assert "2 aliases" in _text(said.stderr) and "reloads" in _text(said.stderr), said
    reloaded = wait_until(lambda: rcpt_code(ports["network"], alias_rcpt) == 250, 20, 0.2)
    assert reloaded, f"{alias_rcpt} still refused 20 s after newaliases{syslog_tail(t)}"
    assert int(t.read(PIDFILE).split()[0]) == master, "a reload, not a restart"

    # the network listener never relays
    with smtp(ports["network"]) as s:
        s.ehlo(CLIENT_NAME)
        s.mail(f"someone@{REMOTE}")
        code, _ = s.rcpt(f"friend@{REMOTE}")
        assert code == 554, code

    # -- relay one through the local listener to the fake MX --------------------------------
    token2 = uuid.uuid4().hex
    with smtp(ports["local"]) as s:
        s.sendmail(f"{USER}@{DOMAIN}", [f"friend@{REMOTE}"], message(f"friend@{REMOTE}", token2))
    got = wait_until(
        lambda: [m for m in fake_mx.messages if token2.encode() in m.data], 30, interval=0.2
    )
    assert got, f"the fake MX received nothing in 30 s{queue_state(t)}{syslog_tail(t)}"
    assert got[0].sender == f"{USER}@{DOMAIN}" and got[0].recipients == [f"friend@{REMOTE}"]
    assert wait_until(lambda: not t.out(["ls", "-A", f"{QUEUE}/env"]).strip(), 15, 0.2), (
        "the relayed message is still queued" + queue_state(t)
    )

    # -- upgrade, with a message waiting in the queue ---------------------------------------
    master = check_upgrade(machine, ports, fake_mx, upgrade_deb, master, box)

    # -- reload after adding a domain ------------------------------------------------------
    assert rcpt_code(ports["network"], f"{USER}@{DOMAIN2}") == 554, "not a local domain yet"
    t.write(CONF, config_text(ports, [DOMAIN, DOMAIN2], fake_mx.port, dns_server.port).encode())
    reload = t.run([INIT, "reload"], check=False)
    assert reload.returncode == 0, reload
    accepted = wait_until(
        lambda: rcpt_code(ports["network"], f"{USER}@{DOMAIN2}") == 250, 20, interval=0.2
    )
    assert accepted, f"{DOMAIN2} still refused 20 s after reload{syslog_tail(t)}"
    token3 = uuid.uuid4().hex
    with smtp(ports["network"]) as s:
        s.sendmail(f"someone@{REMOTE}", [f"{USER}@{DOMAIN2}"], message(f"{USER}@{DOMAIN2}", token3))
    third = stored(t, box, token3)
    assert int(t.read(PIDFILE).split()[0]) == master, "reload must not restart the master"
    status = t.run([INIT, "status"], check=False)
    assert status.returncode == 0 and "running" in _text(status.stdout), status

    # -- TLS and authenticated submission: a certificate, a password, a reload ---------------
    check_submission(t, ports, fake_mx.port, dns_server.port, box)
    assert int(t.read(PIDFILE).split()[0]) == master, "reloads, not restarts"

    # syslog, facility mail (the sandbox has its own /dev/log and records what arrives)
    if isinstance(t, Sandbox):
        lines = _text(t.read(Sandbox.syslog)).splitlines()
        mail_lines = [ln for ln in lines if _facility(ln) == 2 and "mailerd" in ln]
        assert mail_lines, "no syslog line with facility mail from mailerd:\n" + "\n".join(
            lines[-20:]
        )
        assert any(f"{USER}@{DOMAIN}" in ln for ln in mail_lines), "\n".join(mail_lines[-20:])

    # -- the other init script actions -----------------------------------------------------
    again = t.run([INIT, "start"], check=False, timeout=30)
    assert again.returncode == 0 and "already running" in _text(again.stdout), again
    assert t.run([INIT, "force-reload"], check=False).returncode == 0
    old = [master, *descendants(t, master)]
    # (the restart takes the config's example log file, which a reload cannot: see below)
    t.write(CONF, t.read(CONF) + f"log-file = {LOG_FILE}\n".encode())
    restart = t.run([INIT, "restart"], check=False, timeout=90)
    assert restart.returncode == 0, restart
    master = int(t.read(PIDFILE).split()[0])
    assert master not in old, "restart must start a new master"
    assert not [pid for pid in old if t.exists(f"/proc/{pid}")], "the old processes are gone"
    assert rcpt_code(ports["network"], f"{USER}@{DOMAIN2}") == 250, "serving after restart"
    check_log_rotation(t, ports, box)

    # -- stop ------------------------------------------------------------------------------
    processes = [master, *descendants(t, master)]
    stop = t.run([INIT, "stop"], check=False, timeout=60)
    assert stop.returncode == 0, stop
    left = [pid for pid in processes if t.exists(f"/proc/{pid}")]
    assert not left, f"still running after stop: {left}"
    assert not t.exists(PIDFILE)
    status = t.run([INIT, "status"], check=False)
    assert status.returncode == 3, status
    for port in ports.values():
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert t.run([INIT, "reload"], check=False).returncode == 7, "reload: not running (LSB 7)"

    # -- a start that cannot work fails loudly: no silent dead daemon ------------------------
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        busy.bind(("127.0.0.1", ports["network"]))
        busy.listen()
        failed = t.run([INIT, "start"], check=False, timeout=60)
    assert failed.returncode != 0, failed
    said = _text(failed.stdout) + _text(failed.stderr)
    assert str(ports["network"]) in said or "in use" in said, said
    assert not t.exists(PIDFILE) or t.run([INIT, "status"], check=False).returncode != 0

    # -- reconfigure: /etc/mailname edited by hand is the answer, never overwritten ----------
    edited = f"edited.{DOMAIN}"
    t.write(MAILNAME_FILE, f"{edited}\n".encode())
    inode = t.out(["stat", "-c", "%i", MAILNAME_FILE])
    done = t.run(["dpkg-reconfigure", "-f", "noninteractive", "mailerd"], timeout=120)
    assert t.read(MAILNAME_FILE) == f"{edited}\n".encode()
    assert t.out(["stat", "-c", "%i", MAILNAME_FILE]) == inode, "rewritten though unchanged"
    assert f"mailerd/mailname: {edited}" in t.out(["debconf-show", "mailerd"])
    check_queue_layout(t)  # the postinst again, on the existing queue
    assert "no dot" not in _text(done.stderr), done.stderr
    # A one-label name (what `hostname --fqdn` gives many a new machine, and so a
    # non-interactive install) is kept, and warned of at every configure (it was taken
    # silently: an operator's walk-through).
    t.write(MAILNAME_FILE, b"vm\n")
    done = t.run(["dpkg-reconfigure", "-f", "noninteractive", "mailerd"], timeout=120)
    said = _text(done.stderr)
    assert "mailerd: warning: the mail name 'vm' has no dot" in said, said
    assert "dpkg-reconfigure mailerd" in said, said
    assert t.read(MAILNAME_FILE) == b"vm\n"
    t.write(MAILNAME_FILE, f"{edited}\n".encode())

    # -- purge: config and queue go, the users' mailboxes and /etc/mailname stay ------------
    t.run(APT + ["purge", "mailerd"], timeout=120)  # (bsd-mailx, needing an MTA, goes too)
    assert machine.mailerd_state() == "not-installed"
    gone = ["/etc/mailerd", QUEUE, INIT, "/etc/default/mailerd", "/usr/sbin/mailerd", *MTA_LINKS]
    for path in gone:
        assert not t.exists(path), f"{path} survived the purge"
    assert t.exists(SPOOL), "purge removed the mailbox spool"
    assert token.encode() in t.read(first), "purge touched a user's mailbox"
    assert token3.encode() in t.read(third)
    assert t.read(MAILNAME_FILE) == f"{edited}\n".encode(), "/etc/mailname is not mailerd's"
    assert "mailerd/" not in t.out(["debconf-show", "mailerd"]), "debconf answers not purged"
    # the rest (the test user and its mailbox, policy-rc.d, /etc/mailname and /etc/aliases,
    # pulled-in packages) is undone by the machine fixture, which then checks that nothing
    # named after mailerd or the user is left


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def check_upgrade(
    machine: Machine, ports: dict[str, int], mx: FakeMX, later: Path, master: int, box: str
) -> int:
    """`apt-get install` of a later version over the running daemon, as an upgrade does, then
    a restart on the new code: the queue with a message waiting in it (its MX down), the
    hand-written configuration (a conffile the package did not change: kept, no question
    asked), the aliases, the mailboxes and /etc/mailname stay; the message leaves once the MX
    is back and the queue is flushed. The new master's pid."""
    t = machine.target
    mx.stop()
    token = uuid.uuid4().hex
    with smtp(ports["local"]) as s:
        s.sendmail(f"{USER}@{DOMAIN}", [f"friend@{REMOTE}"], message(f"friend@{REMOTE}", token))

    def deferred() -> bool:
        return f"friend@{REMOTE}" in _text(t.run(["/usr/bin/mailq"], check=False).stdout)

    assert wait_until(deferred, 30, 0.2), f"not waiting in the queue{queue_state(t)}"
    waiting = t.out(["ls", "-A", f"{QUEUE}/env"]).split()
    before = {path: t.read(path) for path in (CONF, MAILNAME_FILE, ALIASES)}
    mail = {name: t.read(f"{box}/{name}") for name in t.out(["ls", box]).split()}
    old = [master, *descendants(t, master)]
    package = f"/tmp/{later.name}"
    t.write(package, later.read_bytes())
    apt_install(t, package)
    t.run(["rm", "-f", package])
    version = t.out(["dpkg-query", "-W", "-f", "${Version}", "mailerd"]).strip()
    assert version == later.name.split("_")[1], version
    # The postinst's restart is invoke-rc.d's, which acts on no init here (no runlevel: it
    # says so, and does nothing): the administrator's restart, on the new code.
    # (test_systemd_unit.py upgrades under systemd, where the postinst restarts it.)
    assert t.run([INIT, "restart"], check=False, timeout=90).returncode == 0, syslog_tail(t)
    new = int(t.read(PIDFILE).split()[0])
    assert new not in old, "the upgrade must restart the daemon on the new code"
    assert not [pid for pid in old if t.exists(f"/proc/{pid}")], "old processes left running"
    for path, content in before.items():
        assert t.read(path) == content, f"the upgrade changed {path}"
    for name, content in mail.items():
        assert t.read(f"{box}/{name}") == content, f"the upgrade changed {box}/{name}"
    check_queue_layout(t)
    assert t.out(["ls", "-A", f"{QUEUE}/env"]).split() == waiting, "the queue changed"
    mx.start()
    t.run(["/usr/sbin/sendmail", "-q"])
    got = wait_until(lambda: [m for m in mx.messages if token.encode() in m.data], 30, 0.2)
    assert got, f"the queued message did not leave after the upgrade{queue_state(t)}"
    return new


def check_submission(
    t: Target, ports: dict[str, int], mx_port: int, dns_port: int, box: str
) -> None:
    """`mailerd passwd` (python3-argon2 came with the package), a certificate in the config,
    the submission listener after a reload: STARTTLS, AUTH, a message stored; then the certbot
    deploy hook the package installs makes mailerd reload the renewed certificate."""
    from certs import make_ca

    password = f"Pw-{uuid.uuid4().hex[:10]}"
    done = t.run(["/usr/sbin/mailerd", "passwd", USER], input=f"{password}\n".encode())
    assert b"set the password" in done.stderr, done
    assert t.stat(PASSWD) == ("root", "mail", "640"), t.stat(PASSWD)
    assert password.encode() not in t.read(PASSWD)
    with tempfile.TemporaryDirectory() as here:
        pair = make_ca(Path(here)).issue(HOSTNAME)
        t.run(["mkdir", "-p", LINEAGE])
        t.write(f"{LINEAGE}/fullchain.pem", pair.cert.read_bytes())
        t.write(f"{LINEAGE}/privkey.pem", pair.key.read_bytes(), "600")
    ports["submission"] = free_port()
    t.write(CONF, config_text(ports, [DOMAIN, DOMAIN2], mx_port, dns_port).encode())
    assert t.run([INIT, "reload"], check=False).returncode == 0
    context = ssl_client()
    token = uuid.uuid4().hex

    def submit() -> bool:
        try:
            with smtp(ports["submission"]) as s:
                s.starttls(context=context)
                s.login(USER, password)
                sender = f"{USER}@{DOMAIN}"  # (the From: of an authenticated user is theirs)
                s.sendmail(sender, [sender], message(USER, token, sender))
        except (OSError, smtplib.SMTPException):
            return False
        return True

    assert wait_until(submit, 20, 0.5), f"no submission after the reload{syslog_tail(t)}"
    raw = t.read(stored(t, box, token))
    assert b" with ESMTPSA id " in raw and b"(using TLSv1.3 with cipher" in raw, raw[:800]

    hook = "/etc/letsencrypt/renewal-hooks/deploy/mailerd"
    assert t.run(["test", "-x", hook], check=False).returncode == 0, f"{hook}: not executable"
    # (with the PATH certbot's timer may give it: it finds /usr/sbin/mailerd all the same)
    said = t.run(f"PATH=/usr/bin:/bin RENEWED_LINEAGE={LINEAGE} {hook}")
    assert b"mailerd loaded the renewed certificate" in said.stderr, said
    ignored = t.run(f"RENEWED_LINEAGE=/etc/letsencrypt/live/other.example {hook}")
    assert ignored.stderr == b"", ignored


def ssl_client():
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def config_text(
    ports: dict[str, int], domains: list[str] | None, mx_port: int, dns_port: int
) -> str:
    """The test's config; without `domains`, mailerd's default (/etc/mailname first). With a
    submission port, the certificate of LINEAGE and the submission listener. Every lookup goes
    to the test's DNS server on 127.0.0.1:`dns_port`, never to the machine's resolver."""
    domain = f"domain = {', '.join(domains)}\n" if domains else ""
    tls = (
        f"tls-cert = {LINEAGE}/fullchain.pem\ntls-key = {LINEAGE}/privkey.pem\n"
        f"listen-submission = 127.0.0.1:{ports['submission']}\n"
        if "submission" in ports
        else ""
    )
    return (
        "# written by tests/package/test_deb.py\n"
        "[mailerd]\n"
        f"spool = {SPOOL}\n"
        f"queue = {QUEUE}\n"
        f"{domain}"
        f"hostname = {HOSTNAME}\n"
        f"listen-local = 127.0.0.1:{ports['local']}\n"
        f"listen-network = 127.0.0.1:{ports['network']}\n"
        "workers = 1\n"
        f"relayhost = {MX_HOST}:{mx_port}\n"
        f"dns-server = 127.0.0.1:{dns_port}\n"
        f"{tls}"
    )


LOG_FILE = "/var/log/mailerd.log"  # (the config's example, which the logrotate file names)


def check_log_rotation(t: Target, ports: dict[str, int], box: str) -> None:
    """The package's /etc/logrotate.d/mailerd, run by Debian's logrotate (forced, its own state
    file): the log moves aside and mailerd, told by the file's postrotate, writes a new one
    as its own user; a log that only grew was one an operator's walk-through found."""
    apt_install(t, "logrotate")
    state = "/tmp/pkgtest-logrotate.state"
    try:
        _check_log_rotation(t, ports, box, state)
    finally:  # (back to syslog at the next start; no file of the test's left behind)
        t.write(CONF, t.read(CONF).replace(f"log-file = {LOG_FILE}\n".encode(), b""))
        t.run(["rm", "-f", LOG_FILE, f"{LOG_FILE}.1", state])


def _check_log_rotation(t: Target, ports: dict[str, int], box: str, state: str) -> None:
    def deliver() -> None:
        token = uuid.uuid4().hex
        with smtp(ports["network"]) as s:
            rcpt = f"{USER}@{DOMAIN}"
            s.sendmail(f"someone@{REMOTE}", [rcpt], message(rcpt, token))
        stored(t, box, token)

    deliver()
    assert "relay=local" in _text(t.read(LOG_FILE)), _text(t.read(LOG_FILE))[-2000:]
    t.run(["logrotate", "--force", "--state", state, LOGROTATE])
    assert "relay=local" in _text(t.read(f"{LOG_FILE}.1")), "rotated aside"
    reopened = wait_until(lambda: t.exists(LOG_FILE), 10, 0.2)
    assert reopened, f"no new {LOG_FILE} after the rotation{syslog_tail(t)}"
    deliver()
    assert wait_until(lambda: "relay=local" in _text(t.read(LOG_FILE)), 10, 0.2), "not written"
    owner = t.out(["stat", "-c", "%U:%G %a", LOG_FILE]).split()
    assert owner == ["mail:nogroup", "600"]  # (the children's: log.LOG_MODE)


def apt_install(t: Target, package: str) -> None:
    """`apt-get install` a package (a name or a .deb path), updating the lists if need be."""
    result = t.run(APT + ["install", package], check=False, timeout=300)
    if result.returncode != 0:  # perhaps no package lists yet, or stale ones
        t.run(["apt-get", "-q", "update"], timeout=300)
        t.run(APT + ["install", package], timeout=300)


def check_queue_layout(t: Target) -> None:
    """The queue as mailerd lays it out (mailerd.queue.SUBDIRS, with their modes, and the pickup
    FIFO), every entry owned by the daemon's user and the children's group (nogroup, not the
    user's own: privileges.CHILDREN_GROUP): what `sendmail` needs before a first start.
    The queue directory itself is root's, as when the daemon makes it: its user cannot replace
    an entry by a link for root to follow."""
    from mailerd.delivery import queue
    from mailerd.ipc import maildrop

    fifo = f"{maildrop.PUBLIC}/{maildrop.PICKUP_FIFO}"
    want = {"": ("755", "directory")}
    want |= {sub: (f"{mode:o}", "directory") for sub, mode in queue.SUBDIRS.items()}
    want[fifo] = (f"{queue.PICKUP_MODE:o}", "fifo")
    paths = [f"{QUEUE}/{name}".rstrip("/") for name in want]
    out = t.out(["stat", "-c", "%U %G %a %F", *paths]).splitlines()  # (links not followed)
    got = dict(zip(want, [tuple(line.split(" ", 3)) for line in out], strict=True))
    expected = {name: ("mail", "nogroup", *mode_type) for name, mode_type in want.items()}
    expected[""] = ("root", "root", "755", "directory")
    assert got == expected


def stored(
    t: Target,
    box: str,
    token: str,
    timeout: float = 30.0,
    diagnose: Callable[[], str] | None = None,
) -> str:
    """The path of the message in mailbox `box` that holds `token`, once it has arrived;
    `diagnose` (default: the queue and the syslog) says what went on when it does not."""

    def find() -> str | None:
        found = t.run(["grep", "-rlF", "--", token, box], check=False)
        paths = [p for p in _text(found.stdout).split() if not p.endswith(".status")]
        return paths[0] if paths else None

    path = wait_until(find, timeout, interval=0.2)
    if not path:
        said = diagnose() if diagnose else queue_state(t) + syslog_tail(t)
        pytest.fail(f"nothing with {token} in {box} after {timeout:.0f} s{said}")
    return path


def submitted_by_root(raw: bytes) -> bool:
    """The stored message came through the maildrop from uid 0 (its Received: field says so)."""
    return re.search(rb"^Received: by \S+ \(mailerd, from userid 0\)\r\n", raw, re.M) is not None


def cron_message(token: str) -> bytes:
    """A job's output as Debian's cron pipes it to `sendmail -FCronDaemon -i -B8BITMIME -oem`."""
    return (
        "From: root (Cron Daemon)\n"
        "To: root\n"
        f"Subject: Cron <root@{HOSTNAME}> job {token}\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=UTF-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "X-Cron-Env: <SHELL=/bin/sh>\n"
        "X-Cron-Env: <HOME=/root>\n"
        "X-Cron-Env: <PATH=/usr/bin:/bin>\n"
        "X-Cron-Env: <LOGNAME=root>\n"
        "\n"
        f"job output {token}: ünïcødé\n"
    ).encode()


@contextlib.contextmanager
def smtp(port: int) -> Iterator[smtplib.SMTP]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_NAME, timeout=IO_TIMEOUT) as s:
        yield s


def rcpt_code(port: int, rcpt: str) -> int:
    try:
        with smtp(port) as s:
            s.ehlo(CLIENT_NAME)
            s.mail(f"probe@{REMOTE}")
            code, _ = s.rcpt(rcpt)
            return code
    except (OSError, smtplib.SMTPException):
        return 0


def message(to: str, token: str, author: str = f"someone <someone@{REMOTE}>") -> bytes:
    return (
        f"From: {author}\r\nTo: <{to}>\r\nSubject: package test {token}\r\n"
        f"Message-ID: <{token}@{CLIENT_NAME}>\r\n\r\nbody {token}\r\n"
    ).encode()


def child_pids(t: Target, parent: int) -> list[int]:
    out = t.out(["ps", "-o", "pid=", "--ppid", str(parent)], check=False)
    return [int(p) for p in out.split()]


def descendants(t: Target, parent: int) -> list[int]:
    found = []
    for pid in child_pids(t, parent):
        found += [pid, *descendants(t, pid)]
    return found


def process_uid(t: Target, pid: int) -> str:
    status = t.out(["cat", f"/proc/{pid}/status"], check=False)
    match = re.search(r"^Uid:\s+(\d+)", status, re.M)
    return match.group(1) if match else "?"


def queue_state(t: Target) -> str:
    listing = t.out(["sh", "-c", f"ls -lAR {QUEUE} 2>&1 | head -40"], check=False)
    return f"\nqueue:\n{listing}"


def syslog_tail(t: Target) -> str:
    if not isinstance(t, Sandbox):
        return ""
    text = t.out(["sh", "-c", f"tail -n 30 {Sandbox.syslog} 2>/dev/null"], check=False)
    return f"\nsyslog (last lines):\n{text}"


def _facility(line: str) -> int | None:
    match = re.match(r"<(\d+)>", line)
    return int(match.group(1)) // 8 if match else None


def _has_user(t: Target, name: str) -> bool:
    return t.run(["getent", "passwd", name], check=False).returncode == 0


def _deb_fields(deb: Path) -> dict[str, str]:
    text = _text(subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True).stdout)
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _names(relation: str) -> set[str]:
    """Package names in a relation field (versions, alternatives and arch qualifiers dropped)."""
    names = set()
    for part in re.split(r"[,|]", relation):
        name = part.strip().split(" ")[0].split(":")[0].split("(")[0]
        if name:
            names.add(name)
    return names


def _code(script: str) -> str:
    """A shell script without its comment lines."""
    return "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")

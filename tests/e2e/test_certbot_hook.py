"""etc/letsencrypt/renewal-hooks/deploy/mailerd, the certbot deploy hook, run as certbot runs
it (RENEWED_LINEAGE in its environment). It runs `mailerd reload` (MAILERD names the command)
only when the config file or /etc/default/mailerd names the renewed lineage on a line that is
not a comment, and its exit status is the reload's: a renewed certificate that does not load
fails the hook, which certbot reports. Which lineages make it reload is tested with a stand-in
for the command, which says what it was given; what a reload comes to, against a real mailerd
master serving a certbot-style lineage, through the real `mailerd reload`. (The package test
runs it against an installed, running mailerd.)
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import CA, make_ca

from .conftest import HOSTNAME, REPO, Mailerd
from .test_tls import HELO, Client, client_context, der

HOOK = REPO / "etc" / "letsencrypt" / "renewal-hooks" / "deploy" / "mailerd"
LINEAGE = "/etc/letsencrypt/live/mx.example.org"
HOOK_TIMEOUT = 60  # (`mailerd reload` waits 20 s at most for the master's word)


def hook_env(tmp_path: Path, mailerd: Path | None, **more: str) -> dict[str, str]:
    """The hook's environment: the files under `tmp_path` (mailerd.conf, default, mailerd.pid),
    never the machine's; `mailerd` as the command, unless None."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAILERD", "RENEWED_LINEAGE")}
    env.update(
        RENEWED_LINEAGE=LINEAGE,
        MAILERD_CONF=str(tmp_path / "mailerd.conf"),
        MAILERD_DEFAULTS=str(tmp_path / "default"),
        MAILERD_PIDFILE=str(tmp_path / "mailerd.pid"),
    )
    if mailerd is not None:
        env["MAILERD"] = str(mailerd)
    env.update(more)
    return env


def hook(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HOOK)], env=env, capture_output=True, text=True, timeout=HOOK_TIMEOUT
    )


@pytest.fixture(scope="module")
def real_mailerd(tmp_path_factory) -> Path:
    """This tree's `mailerd` as a command, for MAILERD."""
    path = tmp_path_factory.mktemp("bin") / "mailerd"
    path.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m mailerd "$@"\n')
    path.chmod(0o755)
    return path


def stand_in(directory: Path, status: int = 0) -> Path:
    """A `mailerd` that writes its arguments (one a line) to `args` beside it, and exits with
    `status`."""
    path = directory / "mailerd"
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{directory}/args"\nexit {status}\n')
    path.chmod(0o755)
    return path


def run_hook(tmp_path: Path, conf: str, defaults: str) -> tuple[list[str] | None, str]:
    """(What the stand-in for mailerd was given, None when the hook did not run it; what the
    hook said.) The hook must succeed."""
    (tmp_path / "mailerd.conf").write_text(conf)
    (tmp_path / "default").write_text(defaults)
    (tmp_path / "args").unlink(missing_ok=True)
    done = hook(hook_env(tmp_path, stand_in(tmp_path)))
    assert done.returncode == 0, done
    args = tmp_path / "args"
    return (args.read_text().splitlines() if args.exists() else None), done.stderr


def reloaded(args: list[str] | None) -> bool:
    return args is not None and args[:1] == ["reload"]


# --------------------------------------------------------------------------------------------
# Which renewals make the hook reload (a stand-in for mailerd)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conf, defaults",
    [
        (f"tls-cert = {LINEAGE}/fullchain.pem\ntls-key = {LINEAGE}/privkey.pem\n", ""),
        ("", f'DAEMON_OPTS="--tls-cert {LINEAGE}/fullchain.pem --tls-key {LINEAGE}/privkey.pem"\n'),
    ],
    ids=["config file", "defaults file"],
)
def test_the_hook_reloads_mailerd_for_a_lineage_it_uses(tmp_path, conf, defaults):
    args, said = run_hook(tmp_path, conf, defaults)
    assert reloaded(args), said
    assert "mailerd loaded the renewed certificate" in said, said


def test_the_hook_runs_mailerd_reload_as_systemd_does(tmp_path):
    """`mailerd reload` with what systemd's ExecReload gives it (the pid file, then
    DAEMON_OPTS, from which it takes -c), and the config file the daemon reads when
    DAEMON_OPTS names none; the hook sent SIGHUP itself and said "asked mailerd to reload"
    whatever then happened."""
    conf = f"tls-cert = {LINEAGE}/fullchain.pem\n"
    args, said = run_hook(tmp_path, conf, 'DAEMON_OPTS="-v  -w 4"\n')
    conf_args, pid_args = (
        ["-c", str(tmp_path / "mailerd.conf")],
        ["-P", str(tmp_path / "mailerd.pid")],
    )
    assert args == ["reload", *conf_args, *pid_args, "-v", "-w", "4"], args
    # No config file there (the daemon reads none then, nor need the reload); the one
    # DAEMON_OPTS names, and its words as words (no file name patterns)
    (tmp_path / "mailerd.conf").unlink()
    other = tmp_path / "other.conf"
    other.write_text(conf)
    (tmp_path / "default").write_text(f'DAEMON_OPTS="-c {other} -v *"\n')
    done = hook(hook_env(tmp_path, stand_in(tmp_path)))
    assert done.returncode == 0, done
    args = (tmp_path / "args").read_text().splitlines()
    assert args == ["reload", *pid_args, "-c", str(other), "-v", "*"], args


@pytest.mark.parametrize(
    "option",
    ["-c {}", "--config {}", "--config={}", "-c{}", "-c={}", "--conf {}", "--conf={}"],
)
def test_the_hook_reads_the_config_file_that_daemon_opts_names(tmp_path, option):
    """/etc/default/mailerd's own example, DAEMON_OPTS="-c /etc/mailerd/other.conf -v": the
    certificate named there was renewed, and the hook, which read only /etc/mailerd/mailerd.conf,
    did nothing; mailerd served the old certificate until it expired (a helper's pass)."""
    other = tmp_path / "other.conf"
    other.write_text(f"tls-cert = {LINEAGE}/fullchain.pem\ntls-key = {LINEAGE}/privkey.pem\n")
    defaults = f'DAEMON_OPTS="{option.format(other)} -v"\n'
    args, said = run_hook(tmp_path, "", defaults)
    assert reloaded(args), said
    assert args is not None and args[-1] == "-v", args  # (DAEMON_OPTS, for its -c)
    other.write_text("tls-cert = /etc/mailerd/own.pem\n")
    args, said = run_hook(tmp_path, "", defaults)
    assert not reloaded(args), said


def test_options_run_together_make_the_hook_reload_rather_than_miss(tmp_path):
    """-vc FILE names a config file too; the hook does not take such forms apart, and reloads
    for any renewal then (a reload drops no session; a missed one serves an expired
    certificate)."""
    args, said = run_hook(tmp_path, "", 'DAEMON_OPTS="-vc /etc/mailerd/other.conf"\n')
    assert reloaded(args), said


@pytest.mark.parametrize(
    "defaults",
    [
        'DAEMON_OPTS="$DAEMON_OPTS -v"\n',  # the init script sources it: shell works there
        "DAEMON_OPTS=-v -H mx.example.org\n",  # systemd's EnvironmentFile: no quotes needed
        'DAEMON_OPTS="-v"\nfalse\n',
        "DAEMON_OPTS='-v'\n",
    ],
    ids=["shell-expansion", "unquoted", "a-false-command", "single-quotes"],
)
def test_the_defaults_file_is_read_not_run(tmp_path, defaults):
    """The hook sourced /etc/default/mailerd under `set -eu` to read DAEMON_OPTS: a line the
    init script takes (an expansion, a command) ended the hook before it looked at the config
    file, and the renewed certificate was never loaded (an attacker's pass)."""
    conf = f"tls-cert = {LINEAGE}/fullchain.pem\n"
    args, said = run_hook(tmp_path, conf, defaults)
    assert reloaded(args), said
    args, said = run_hook(tmp_path, "", defaults)  # (and a renewal of nothing it uses)
    assert not reloaded(args), said


def test_the_hook_leaves_mailerd_alone_for_a_lineage_named_only_in_comments(tmp_path):
    """An operator who tried certbot's certificate and went back to another one keeps the old
    lines commented out: a renewal of it is no reason to reload (the hook grepped them too)."""
    conf = (
        "tls-cert = /etc/mailerd/own.pem  # not the lineage\n"
        f"# tls-cert = {LINEAGE}/fullchain.pem\n"
        f"   ; tls-key = {LINEAGE}/privkey.pem\n"
    )
    defaults = f'#DAEMON_OPTS="--tls-cert {LINEAGE}/fullchain.pem"\nDAEMON_OPTS=""\n'
    args, said = run_hook(tmp_path, conf, defaults)
    assert not reloaded(args), said
    assert said == ""


def test_the_hook_fails_when_mailerd_reload_cannot_run(tmp_path):
    """A `mailerd reload` that fails for a reason of its own (here 78, a config file it cannot
    read; 77 not root) fails the hook too, which says the certificate is not loaded; so does a
    MAILERD that is no command."""
    (tmp_path / "mailerd.conf").write_text(f"tls-cert = {LINEAGE}/fullchain.pem\n")
    done = hook(hook_env(tmp_path, stand_in(tmp_path, status=78)))
    assert done.returncode != 0, done
    assert "exit status 78" in done.stderr and "is not loaded" in done.stderr, done.stderr
    done = hook(hook_env(tmp_path, tmp_path / "no-such-mailerd"))
    assert done.returncode != 0 and "is not a command" in done.stderr, done


def test_the_hook_finds_mailerd_on_a_short_path(tmp_path):
    """certbot's timer or cron job may give the hook a PATH without /usr/sbin: it looks in
    /usr/sbin (the package's), on PATH, then in the usual directories. With no mailerd at all
    (the package removed, not purged: the hook and the config stay) there is nothing to
    reload."""
    usual = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
    if any(os.path.exists(f"{d}/mailerd") for d in usual):
        pytest.skip("this machine has a mailerd of its own")
    (tmp_path / "mailerd.conf").write_text(f"tls-cert = {LINEAGE}/fullchain.pem\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir)
    done = hook(hook_env(tmp_path, None, PATH=f"{bin_dir}:/usr/bin:/bin"))
    assert done.returncode == 0 and (bin_dir / "args").exists(), done
    done = hook(hook_env(tmp_path, None, PATH="/bin"))
    assert done.returncode == 0, done
    assert "mailerd is not installed" in done.stderr, done.stderr
    # (but a pid file someone holds, with no mailerd to be found: that is no success)
    with open(tmp_path / "mailerd.pid", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = hook(hook_env(tmp_path, None, PATH="/bin"))
    assert done.returncode != 0 and "set MAILERD=" in done.stderr, done


# --------------------------------------------------------------------------------------------
# What a reload comes to: a real master, the real `mailerd reload`
# --------------------------------------------------------------------------------------------


@dataclass
class Lineage:
    """A certificate as certbot keeps it: live/NAME/{fullchain,privkey}.pem links to the
    latest files in archive/NAME, which a renewal adds (fullchain2.pem, privkey2.pem…)."""

    root: Path  # (certbot's /etc/letsencrypt)
    name: str = HOSTNAME
    version: int = 0

    @property
    def live(self) -> Path:
        return self.root / "live" / self.name

    def renew(self, cert: bytes, key: bytes) -> None:
        self.version += 1
        archive = self.root / "archive" / self.name
        archive.mkdir(parents=True, exist_ok=True)
        self.live.mkdir(parents=True, exist_ok=True)
        for kind, data in (("fullchain", cert), ("privkey", key)):
            target = archive / f"{kind}{self.version}.pem"
            target.write_bytes(data)
            target.chmod(0o600)
            link = self.live / f"{kind}.pem.new"
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(target, self.live))
            os.replace(link, self.live / f"{kind}.pem")


@dataclass
class Served:
    mailerd: Mailerd
    lineage: Lineage
    ca: CA
    env: dict[str, str]

    def presented(self) -> bytes:
        """The certificate a new STARTTLS session on the network listener gets (checked
        against the test CA and the host name)."""
        with Client("127.0.0.1", self.mailerd.untrusted_port) as c:
            c.start(HELO)
            c.starttls(client_context(self.ca))
            return c.peer_der()


@pytest.fixture
def served(mailerd_factory, real_mailerd: Path, tmp_path: Path) -> Served:
    """A mailerd master whose config file names a certbot lineage, with its pid file; and the
    hook's environment for a renewal of that lineage."""
    ca = make_ca(tmp_path / "ca")
    lineage = Lineage(tmp_path / "letsencrypt")
    first = ca.issue(HOSTNAME, kind="ecdsa", tag="first")
    lineage.renew(first.cert.read_bytes(), first.key.read_bytes())
    conf = tmp_path / "mailerd.conf"
    conf.write_text(
        "[mailerd]\n"
        f"tls-cert = {lineage.live}/fullchain.pem\n"
        f"tls-key = {lineage.live}/privkey.pem\n"
        f"pidfile = {tmp_path / 'mailerd.pid'}\n"
    )
    m = mailerd_factory(base=tmp_path / "server", extra=["-c", str(conf)])
    env = hook_env(tmp_path, real_mailerd, RENEWED_LINEAGE=str(lineage.live))
    s = Served(m, lineage, ca, env)
    assert s.presented() == der(first.cert)
    return s


def test_a_renewed_certificate_is_served_once_the_hook_is_done(served: Served):
    """The hook exits 0 once mailerd has loaded the renewed certificate, and says so: a
    session opened then gets it (the hook sent SIGHUP, said "asked mailerd to reload", and
    returned before anything was loaded)."""
    new = served.ca.issue(HOSTNAME, kind="ecdsa", tag="renewed")
    served.lineage.renew(new.cert.read_bytes(), new.key.read_bytes())
    done = hook(served.env)
    assert done.returncode == 0, done
    assert served.presented() == der(new.cert), done.stderr
    assert "mailerd loaded the renewed certificate" in done.stderr, done.stderr
    assert served.mailerd.proc is not None and served.mailerd.proc.poll() is None


@pytest.mark.parametrize("case", ["key-does-not-match", "garbage"])
def test_a_renewed_certificate_that_does_not_load_fails_the_hook(served: Served, case: str):
    """A renewal whose files do not load (a key that is not the certificate's, a truncated
    file): mailerd keeps serving the certificate it had, and the hook fails (certbot then
    reports its failure) saying why; it said "asked mailerd to reload" and exited 0, and
    nobody heard of it until the old certificate expired."""
    before = served.presented()
    new = served.ca.issue(HOSTNAME, kind="ecdsa", tag="renewed")
    other = served.ca.issue(HOSTNAME, kind="ecdsa", tag="other")
    if case == "garbage":
        served.lineage.renew(b"-----BEGIN CERTIFICATE-----\ntrunc", new.key.read_bytes())
    else:
        served.lineage.renew(new.cert.read_bytes(), other.key.read_bytes())
    done = hook(served.env)
    assert done.returncode != 0, done
    assert "did not load the renewed certificate" in done.stderr, done.stderr
    assert "certificates did not load" in done.stderr, done.stderr  # (mailerd reload's word)
    # and why, as mailerd logged it (its log alone said it: certbot's report, which has the
    # hook's standard error, said "see its log")
    logged = re.findall(
        r"reload: (.+); the certificates in use are kept", served.mailerd.stderr_text()
    )
    assert logged and str(served.lineage.live) in logged[-1], served.mailerd.stderr_text()
    assert f"did not load ({logged[-1]})" in done.stderr, done.stderr
    assert served.presented() == before
    assert served.mailerd.proc is not None and served.mailerd.proc.poll() is None


def test_the_hook_says_when_mailerd_is_not_running(tmp_path, real_mailerd: Path):
    """No master (no pid file): nothing to reload, and no failure: mailerd loads the renewed
    certificate when it starts."""
    (tmp_path / "mailerd.conf").write_text(f"[mailerd]\ntls-cert = {LINEAGE}/fullchain.pem\n")
    done = hook(hook_env(tmp_path, real_mailerd))
    assert done.returncode == 0, done
    assert "mailerd is not running" in done.stderr, done.stderr
    assert not (tmp_path / "mailerd.pid").exists()


@pytest.mark.parametrize("case", ["stale", "held-by-another"])
def test_the_hook_signals_no_process_for_a_pid_file_no_master_holds(
    tmp_path, real_mailerd: Path, case: str
):
    """A pid file no master holds: stale (mailerd died; its pid is some other process's now,
    here one with "mailerd" in its command line, an editor on a mailerd file), or locked by a
    process that is no mailerd. The hook signalled a stale pid once (an attacker's pass,
    /tmp/atk7c F7), and a held one whatever it was; `mailerd reload` signals neither, and
    the hook says mailerd is not running."""
    (tmp_path / "mailerd.conf").write_text(f"[mailerd]\ntls-cert = {LINEAGE}/fullchain.pem\n")
    if case == "stale":
        argv = [sys.executable, "-c", "import time; time.sleep(60)", "mailerd"]
    else:
        argv = ["sleep", "60"]
    target = subprocess.Popen(argv)
    lock = os.open(tmp_path / "mailerd.pid", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if case == "held-by-another":
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(lock, f"{target.pid}\n".encode())
        done = hook(hook_env(tmp_path, real_mailerd))
        with pytest.raises(subprocess.TimeoutExpired):
            target.wait(1)  # (SIGHUP ends it)
        assert done.returncode == 0, done
        assert "mailerd is not running" in done.stderr, done.stderr
    finally:
        os.close(lock)
        target.kill()
        target.wait()

"""etc/letsencrypt/renewal-hooks/deploy/mailerd, the certbot deploy hook, run as certbot runs
it (RENEWED_LINEAGE in its environment): it signals the pid in the pid file only when the
config file or /etc/default/mailerd names the renewed lineage on a line that is not a
comment. (The package test runs it against an installed, running mailerd.)
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

HOOK = REPO / "etc" / "letsencrypt" / "renewal-hooks" / "deploy" / "mailerd"
LINEAGE = "/etc/letsencrypt/live/mx.example.org"


def run_hook(tmp_path: Path, conf: str, defaults: str, held: bool = True) -> tuple[bool, str]:
    """(Was the pid file's process sent SIGHUP?, what the hook said.) The process is a
    `sleep`, which SIGHUP ends; the pid file is locked, as a running master holds it, unless
    not `held` (a stale pid file, its pid some other process's now)."""
    (tmp_path / "mailerd.conf").write_text(conf)
    (tmp_path / "default").write_text(defaults)
    target = subprocess.Popen(["sleep", "60"])
    lock = os.open(tmp_path / "mailerd.pid", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if held:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (tmp_path / "mailerd.pid").write_text(f"{target.pid}\n")
        env = {
            **os.environ,
            "RENEWED_LINEAGE": LINEAGE,
            "MAILERD_CONF": str(tmp_path / "mailerd.conf"),
            "MAILERD_DEFAULTS": str(tmp_path / "default"),
            "MAILERD_PIDFILE": str(tmp_path / "mailerd.pid"),
        }
        done = subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done
        try:
            signalled = target.wait(2) == -signal.SIGHUP
        except subprocess.TimeoutExpired:
            signalled = False
        return signalled, done.stderr
    finally:
        os.close(lock)
        target.kill()
        target.wait()


@pytest.mark.parametrize(
    "conf, defaults",
    [
        (f"tls-cert = {LINEAGE}/fullchain.pem\ntls-key = {LINEAGE}/privkey.pem\n", ""),
        ("", f'DAEMON_OPTS="--tls-cert {LINEAGE}/fullchain.pem --tls-key {LINEAGE}/privkey.pem"\n'),
    ],
    ids=["config file", "defaults file"],
)
def test_the_hook_reloads_mailerd_for_a_lineage_it_uses(tmp_path, conf, defaults):
    signalled, said = run_hook(tmp_path, conf, defaults)
    assert signalled, said
    assert "asked mailerd" in said


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
    signalled, said = run_hook(tmp_path, "", defaults)
    assert signalled, said
    other.write_text("tls-cert = /etc/mailerd/own.pem\n")
    signalled, said = run_hook(tmp_path, "", defaults)
    assert not signalled, said


def test_options_run_together_make_the_hook_reload_rather_than_miss(tmp_path):
    """-vc FILE names a config file too; the hook does not take such forms apart, and reloads
    for any renewal then (a SIGHUP drops no session; a missed one serves an expired
    certificate)."""
    signalled, said = run_hook(tmp_path, "", 'DAEMON_OPTS="-vc /etc/mailerd/other.conf"\n')
    assert signalled, said


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
    signalled, said = run_hook(tmp_path, conf, defaults)
    assert signalled, said
    signalled, said = run_hook(tmp_path, "", defaults)  # (and a renewal of nothing it uses)
    assert not signalled, said


def test_the_hook_leaves_mailerd_alone_for_a_lineage_named_only_in_comments(tmp_path):
    """An operator who tried certbot's certificate and went back to another one keeps the old
    lines commented out: a renewal of it is no reason to reload (the hook grepped them too)."""
    conf = (
        "tls-cert = /etc/mailerd/own.pem  # not the lineage\n"
        f"# tls-cert = {LINEAGE}/fullchain.pem\n"
        f"   ; tls-key = {LINEAGE}/privkey.pem\n"
    )
    defaults = f'#DAEMON_OPTS="--tls-cert {LINEAGE}/fullchain.pem"\nDAEMON_OPTS=""\n'
    signalled, said = run_hook(tmp_path, conf, defaults)
    assert not signalled, said
    assert said == ""


def test_the_hook_signals_no_process_for_a_stale_pid_file(tmp_path):
    """A pid file no master holds (mailerd died; the pid is some other process's now): the
    hook signalled it, and the unrelated process died of the SIGHUP (an attacker's pass,
    /tmp/atk7c F7)."""
    conf = f"tls-cert = {LINEAGE}/fullchain.pem\n"
    signalled, said = run_hook(tmp_path, conf, "", held=False)
    assert not signalled, said
    assert "not running" in said

"""The secret files (--relay-auth, --dkim-key): read by the delivery process only; the master
has a child check them (`secrets.check`), at start-up and at each reload."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mailerd import config, privileges
from mailerd.config import ConfigError
from mailerd.delivery import secrets
from mailerd.delivery.secrets import Secrets


def load(tmp_path: Path, *argv: str) -> config.Config:
    ini = tmp_path / "mailerd.conf"  # never the machine's /etc/mailerd/mailerd.conf
    ini.write_text("[mailerd]\n")
    given = ["-c", str(ini), "-l", "127.0.0.1", "-n", "none"]
    if "--passwd" not in argv:  # (never the machine's /etc/mailerd/passwd either)
        given += ["--passwd", str(tmp_path / "passwd")]
    return config.load([*given, *argv])


def relay(tmp_path: Path, line: str = "user:secret", mode: int = 0o600) -> list[str]:
    path = tmp_path / "relay-auth"
    path.write_text(f"{line}\n")
    path.chmod(mode)
    return ["--relayhost", "smtp.example.net:587", "--relay-auth", str(path)]


def dkim(tmp_path: Path, pem: bytes | None = None) -> list[str]:
    if pem is None:
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path = tmp_path / "example.org.s1.key"
    path.write_bytes(pem)
    path.chmod(0o600)
    return ["-d", "example.org", "--dkim-key", f"example.org:s1:{path}"]


def test_the_configuration_names_the_files_and_reads_none(tmp_path: Path):
    """config.load (the master, `mailerd dns`, `mailerd queue`) no longer reads them: a
    relay-auth file that is not there is the check's business, and the delivery process's."""
    cfg = load(tmp_path, *relay(tmp_path), *dkim(tmp_path))
    (tmp_path / "relay-auth").unlink()
    assert cfg.relay_auth == tmp_path / "relay-auth"
    assert not hasattr(cfg, "relay_credentials") and not hasattr(cfg, "dkim_keys")
    assert config.load_files(cfg).relay_auth == cfg.relay_auth


def test_load_reads_both(tmp_path: Path):
    held = Secrets.load(load(tmp_path, *relay(tmp_path, "me@example.net:p:w d"), *dkim(tmp_path)))
    assert held.relay_login == ("me@example.net", "p:w d")
    assert [(k.domain, k.selector, k.kind) for k in held.dkim_keys] == [
        ("example.org", "s1", "ed25519")
    ]
    assert "p:w d" not in repr(held) and "private" not in repr(held)
    assert Secrets.load(load(tmp_path)) == secrets.NO_SECRETS


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("no-colon", "expected 'username:password' on the first line"),
        (":password", "expected 'username:password' on the first line"),
    ],
)
def test_a_malformed_relay_login_is_refused(tmp_path: Path, line: str, expected: str):
    cfg = load(tmp_path, *relay(tmp_path, line))
    with pytest.raises(ConfigError, match=expected):
        Secrets.load(cfg)
    assert secrets.check(cfg) == f"--relay-auth: {tmp_path / 'relay-auth'}: {expected}"


def test_check_is_quiet_when_they_load(tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING)
    assert secrets.check(load(tmp_path, *relay(tmp_path), *dkim(tmp_path))) is None
    assert secrets.check(load(tmp_path)) is None
    assert not caplog.records


def test_check_says_why_a_file_does_not_load(tmp_path: Path):
    cfg = load(tmp_path, *relay(tmp_path))
    (tmp_path / "relay-auth").unlink()
    assert secrets.check(cfg) == (
        f"--relay-auth: cannot read {tmp_path / 'relay-auth'}: No such file or directory"
    )
    cfg = load(tmp_path, *dkim(tmp_path, b"not a key\n"))
    problem = secrets.check(cfg)
    assert problem is not None and problem.startswith("--dkim-key: DKIM key "), problem
    assert "not an unencrypted PEM private key" in problem


def test_check_reads_in_a_child(tmp_path: Path, monkeypatch):
    """The checking process is another one: what it read is gone with it."""
    reader = tmp_path / "reader"
    real = Secrets.load

    def load_and_tell(cfg: config.Config) -> Secrets:
        reader.write_text(str(os.getpid()))
        return real(cfg)

    monkeypatch.setattr(Secrets, "load", staticmethod(load_and_tell))
    assert secrets.check(load(tmp_path, *relay(tmp_path))) is None
    pid = int(reader.read_text())
    assert pid != os.getpid()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # (and reaped)


def test_check_warns_of_a_login_others_may_read(tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING)
    assert secrets.check(load(tmp_path, *relay(tmp_path, mode=0o644))) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'relay-auth'} is readable by others: chmod 600 it"
    ]


def test_a_check_that_hangs_keeps_nothing_of_the_master_and_dies_with_it(tmp_path: Path):
    """A --relay-auth file that is a FIFO holds the checking child in open() until the
    timeout. Meanwhile it holds none of the master's descriptors (a listening port, the pid
    file's lock), says what it is, and a master killed with -9 takes it along: it once
    outlived the master under init, holding the master's ports."""
    fifo = tmp_path / "relay-auth"
    os.mkfifo(fifo, 0o600)
    cfg = load(tmp_path, "--relayhost", "smtp.example.net:587", "--relay-auth", str(fifo))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    master = os.fork()
    if master == 0:  # the master: it holds the port, and checks
        secrets.check(cfg)
        os._exit(0)
    listener.close()
    try:
        try:
            checker = _wait_for(lambda: _child_titled(master, "mailerd: checking the secret files"))
            fds = os.listdir(f"/proc/{checker}/fd")
            held = {os.readlink(f"/proc/{checker}/fd/{fd}") for fd in fds}
            assert not [h for h in held if h.startswith("socket:")], held
            assert len(held - {os.readlink(f"/proc/{checker}/fd/{fd}") for fd in (0, 1, 2)}) == 1
        finally:
            os.kill(master, signal.SIGKILL)
            os.waitpid(master, 0)
        assert _wait_for(lambda: not os.path.exists(f"/proc/{checker}") or _zombie(checker), 5)
        socket.create_server(("127.0.0.1", port)).close()  # (free again)
    finally:  # (a checker left behind, blocked in open(), would hold pytest's output for ever)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _child_titled(parent: int, title: str) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and cmdline.startswith(title.encode()):
            return int(pid)
    return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize(
    ("mode", "owner", "said"),
    [
        (0o640, "root", None),  # (as `mailerd passwd` writes it, group mail)
        (0o600, "root", None),
        (0o644, "root", "is readable by others, who may guess at its hashes offline"),
        (0o660, "root", "may be written by others than its owner, who may add logins"),
        (0o640, "workers", "is owned by uid {uid}, who may add a login for any user"),
    ],
)
def test_check_warns_of_a_passwd_file_others_may_read_or_change(
    tmp_path: Path, caplog, mode: int, owner: str, said: str | None
):
    """The passwd file is root:mail 0640: a hand-made one that others may read or change
    is warned of, as the keys are (an acceptance tester's finding: it was not)."""
    path = tmp_path / "passwd"
    path.write_text("alice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n")
    uid = privileges.lookup(config.DEFAULT_USER).uid if owner == "workers" else 0
    os.chown(path, uid, 0)
    path.chmod(mode)
    caplog.set_level(logging.WARNING)
    assert secrets.check(load(tmp_path, "--passwd", str(path))) is None
    lines = [r.getMessage() for r in caplog.records]
    if said is None:
        assert lines == []
    else:
        assert lines == [lines[0]] and lines[0].startswith(
            f"--passwd {path} {said.format(uid=uid)}"
        ), lines


@pytest.mark.skipif(os.geteuid() != 0, reason="chgrp to another group needs root")
@pytest.mark.parametrize(
    ("group", "said"),
    [
        ("mail", None),
        ("root", None),
        ("users", "is readable by group users, whose members may guess at its hashes offline"),
    ],
)
def test_check_warns_of_a_passwd_file_another_group_may_read(
    tmp_path: Path, caplog, group: str, said: str | None
):
    """root:users 0640 lets every member of users read the hashes: warned of like a file
    others may read (an acceptance re-check's finding: only other-read was looked at)."""
    path = tmp_path / "passwd"
    path.write_text("alice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n")
    os.chown(path, 0, grp.getgrnam(group).gr_gid)
    path.chmod(0o640)
    caplog.set_level(logging.WARNING)
    assert secrets.check(load(tmp_path, "--passwd", str(path))) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ([] if said is None else [f"--passwd {path} {said}: chgrp mail it"]), lines


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the workers' user needs root")
@pytest.mark.parametrize(
    ("mode", "owned_by_workers", "group_of_workers", "said"),
    [
        (0o600, False, False, None),
        (0o640, False, False, None),  # (root's group: e.g. ssl-cert's snakeoil key, 0640)
        (0o644, False, False, "is readable by others: chmod 600 it"),
        (0o620, False, False, "may be written by others than its owner: chmod 600 it"),
        (0o600, True, False, "is owned by {user}, whom the workers run as: chown root, chmod 600"),
        (0o640, False, True, "is readable by group nogroup, the workers': chmod 600 it"),
    ],
)
def test_check_warns_of_a_key_the_workers_or_others_may_reach(
    tmp_path: Path, caplog, mode: int, owned_by_workers: bool, group_of_workers: bool, said
):
    """The DKIM and TLS keys stay root's: the master reads them so that no worker holds
    them, which is no use if the workers' user may read the file (an operator's pass found
    a DKIM key 0644, one owned by mail and a TLS key 0644 taken without a word)."""
    workers = privileges.lookup(config.DEFAULT_USER)
    cert, key = tmp_path / "mx.crt", tmp_path / "mx.key"  # (only looked at: a stat)
    cert.write_text("a certificate\n")
    key.write_text("a key\n")
    argv = dkim(tmp_path) + ["--tls-cert", str(cert), "--tls-key", str(key)]
    dkim_key = tmp_path / "example.org.s1.key"
    for path in (dkim_key, key):
        owner = workers.uid if owned_by_workers else 0
        os.chown(path, owner, workers.gid if group_of_workers else 0)
        path.chmod(mode)
    caplog.set_level(logging.WARNING)
    assert secrets.check(load(tmp_path, *argv)) is None
    lines = [r.getMessage() for r in caplog.records]
    if said is None:
        assert lines == []
    else:
        words = said.format(user=workers.name)
        assert len(lines) == 2, lines
        assert lines[0].startswith(f"--dkim-key {dkim_key} {words}"), lines
        assert lines[1].startswith(f"--tls-key {key} {words}"), lines

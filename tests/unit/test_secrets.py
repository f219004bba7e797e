"""The secret files (--relay-auth, --dkim-key): read by the delivery process only; the master
has a child check them (`secrets.check`), at start-up and at each reload."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mailerd import config
from mailerd.config import ConfigError
from mailerd.delivery import secrets
from mailerd.delivery.secrets import Secrets


def load(tmp_path: Path, *argv: str) -> config.Config:
    ini = tmp_path / "mailerd.conf"  # never the machine's /etc/mailerd/mailerd.conf
    ini.write_text("[mailerd]\n")
    return config.load(["-c", str(ini), "-l", "127.0.0.1", "-n", "none", *argv])


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

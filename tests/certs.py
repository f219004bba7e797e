"""Test certificates, made with the openssl command: a test CA, and server certificates it
signs (RSA or ECDSA, for the names asked), so that clients can verify mailerd against the CA as
they would a real server (`CA.cert`). Importable as `certs` from every test directory."""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    cert: Path  # the certificate chain (the leaf; the CA is the test's trust anchor)
    key: Path


@dataclass(frozen=True)
class CA:
    cert: Path
    key: Path
    directory: Path

    def issue(
        self, name: str, *names: str, kind: str = "rsa", days: int = 30, tag: str = ""
    ) -> Pair:
        """A server certificate for `name` (and `names`: host names or IP addresses), signed by
        this CA. `kind` is "rsa"
        (2048 bits) or "ecdsa" (P-256); `tag` tells files for the same names apart."""
        stem = f"{name}{'-' + tag if tag else ''}-{kind}"
        key, csr, cert, ext = (self.directory / f"{stem}.{s}" for s in ("key", "csr", "crt", "ext"))
        _openssl(*_newkey(kind), "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        sans = ",".join(f"{_san_kind(n)}:{n}" for n in (name, *names))
        ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
        _openssl(
            "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
            "-CAcreateserial", "-out", cert, "-days", str(days), "-sha256", "-extfile", ext,
        )  # fmt: skip
        key.chmod(0o600)
        return Pair(cert, key)

    def intermediate(self, name: str = "mailerd test intermediate CA") -> CA:
        """A CA this one signs (as Let's Encrypt's R10 is signed by ISRG Root X1): what it
        issues chains to this one only with its certificate beside it (`full_chain`)."""
        directory = self.directory / "intermediate"
        directory.mkdir(exist_ok=True)
        key, csr, cert, ext = (directory / f"ca.{s}" for s in ("key", "csr", "crt", "ext"))
        _openssl(*_newkey("rsa"), "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        ext.write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n")
        _openssl(
            "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
            "-CAcreateserial", "-out", cert, "-days", "3", "-sha256", "-extfile", ext,
        )  # fmt: skip
        return CA(cert, key, directory)

    def full_chain(self, pair: Pair) -> Pair:
        """The pair with this CA's certificate after the leaf's (certbot's fullchain.pem)."""
        chain = pair.cert.with_suffix(".fullchain.crt")
        chain.write_bytes(pair.cert.read_bytes() + self.cert.read_bytes())
        return Pair(chain, pair.key)


def self_signed(directory: Path, name: str) -> Pair:
    """A certificate for `name` that signs itself (what scripts/server makes for localhost)."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / f"{name}-self.key", directory / f"{name}-self.crt"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "3", "-subj", f"/CN={name}",
        "-addext", f"subjectAltName=DNS:{name}",
    )  # fmt: skip
    key.chmod(0o600)
    return Pair(cert, key)


def make_ca(directory: Path, name: str = "mailerd test CA") -> CA:
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / "ca.key", directory / "ca.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
        "-days", "3", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign",
    )  # fmt: skip
    return CA(cert, key, directory)


def _san_kind(name: str) -> str:
    """A subjectAltName entry's kind: IP for an address, DNS for a name."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return "DNS"
    return "IP"


def _newkey(kind: str) -> list[str]:
    if kind == "rsa":
        return ["req", "-new", "-newkey", "rsa:2048"]
    if kind == "ecdsa":
        return ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    raise ValueError(f"kind: rsa or ecdsa, not {kind!r}")


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

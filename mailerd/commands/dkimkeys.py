"""`mailerd dkim keygen [--type rsa|ed25519] [--bits N] [--selector S] [--dir DIR] DOMAIN`:
make a DKIM signing key and say what to publish.

The key is written to DIR/DOMAIN.SELECTOR.key (DIR: /etc/mailerd/dkim, made mode 0700), PEM,
mode 0600, owned by whoever runs this (root: mailerd's master reads keys as root before it
forks, so nothing else needs to read them); an existing file is never replaced. The TXT record
to publish at SELECTOR._domainkey.DOMAIN is printed in zone-file form, its value split into
strings of at most 255 octets (one DNS character-string each, RFC 6376 3.6.2.2), then the
config line that makes mailerd sign with the key (the file by its absolute path: mailerd does
not run from the directory this was run in).

Defaults: RSA of 2048 bits (what every receiver verifies; Ed25519, RFC 8463, is smaller and
faster but not yet verified everywhere: use both, two selectors), and a selector named for the
year and month (`202612`), so that a later key can get a new name and both be published while
the change spreads. --bits is refused with --type ed25519 (one size) rather than ignored.

Exit status: 0 done; 1 the file exists or cannot be written; 2 a bad argument.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailerd import signing

DEFAULT_DIR = "/etc/mailerd/dkim"
DEFAULT_BITS = 2048
TXT_STRING = 255  # octets in one DNS character-string


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mailerd dkim", description="DKIM signing keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="make a key and print its DNS record")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, help=f"RSA key size (default {DEFAULT_BITS})")
    keygen.add_argument("--selector", default=time.strftime("%Y%m"), help="default: YYYYMM")
    keygen.add_argument("--dir", default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}")
    keygen.add_argument("domain", metavar="DOMAIN")
    args = parser.parse_args(argv)
    domain = args.domain.lower().rstrip(".")
    if args.type != "rsa" and args.bits is not None:
        parser.error(f"--bits is for RSA keys ({args.type} keys have one size)")
    bits = DEFAULT_BITS if args.bits is None else args.bits
    if args.type == "rsa" and bits < signing.MIN_RSA_BITS:
        parser.error(f"--bits: at least {signing.MIN_RSA_BITS} (receivers ignore shorter keys)")
    if not domain or "/" in domain or domain.startswith("."):
        parser.error(f"not a domain: {args.domain!r}")
    if "/" in args.selector or not args.selector:
        parser.error(f"not a selector: {args.selector!r}")
    # absolute: the printed config line is read by mailerd, which runs from another directory
    path = os.path.join(os.path.abspath(args.dir), f"{domain}.{args.selector}.key")
    try:
        write_key(path, new_key(args.type, bits))
    except FileExistsError:
        print(
            f"mailerd dkim: {path} exists; not replaced (give another --selector)", file=sys.stderr
        )
        return 1
    except OSError as exc:
        print(f"mailerd dkim: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    key = signing.load_key(domain, args.selector, path)
    print(f"; {key.kind} key written to {path}; publish this record:")
    print(zone_txt(key.dns_name, key.dns_record()))
    print("; then add to /etc/mailerd/mailerd.conf (and reload mailerd):")
    print(f"dkim-key = {domain}:{args.selector}:{path}")
    return 0


def new_key(kind: str, bits: int) -> bytes:
    """A new private key, PEM (PKCS #8, unencrypted)."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_key(path: str, pem: bytes) -> None:
    """Write a new key file, 0600, never over an existing one; its directory made 0700."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def txt_strings(value: str) -> list[str]:
    """A TXT value cut into character-strings of at most TXT_STRING octets."""
    data = value.encode("ascii")
    return [data[i : i + TXT_STRING].decode("ascii") for i in range(0, len(data), TXT_STRING)]


def zone_txt(name: str, value: str) -> str:
    """A TXT record in zone-file form: `NAME. IN TXT ( "..." "..." )`."""
    strings = " ".join(f'"{part}"' for part in txt_strings(value))
    return f"{name.rstrip('.')}. IN TXT ( {strings} )"

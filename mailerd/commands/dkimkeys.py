"""`mailerd dkim keygen [--type rsa|ed25519] [--bits N] [--selector S] [--dir DIR] DOMAIN`:
make a DKIM signing key and say what to publish.

The key is written to DIR/DOMAIN.SELECTOR.key (DIR: /etc/mailerd/dkim, made mode 0700), PEM,
mode 0600, owned by whoever runs this (root: mailerd's master reads keys as root before it
forks, so nothing else needs to read them); an existing file is never replaced. The TXT record
to publish at SELECTOR._domainkey.DOMAIN is printed in zone-file form, its value split into
strings of at most 255 octets (one DNS character-string each, RFC 6376 3.6.2.2), then the
config line that makes mailerd sign with the key (the file by its absolute path: mailerd does
not run from the directory this was run in), and how to add it to a `dkim-key` line already
there (a second such line is an error).

DOMAIN and SELECTOR are checked as mailerd's --dkim-key reads them, so that the printed line
is one mailerd takes.

Defaults: RSA of 2048 bits (what every receiver verifies; Ed25519, RFC 8463, is smaller and
faster but not yet verified everywhere: use both, two selectors), and a selector named for the
year and month (`202612`), so that a later key can get a new name and both be published while
the change spreads. --bits is refused with --type ed25519 (one size) rather than ignored.

Exit status: 0 done; 1 the file exists or cannot be written; 2 a bad argument.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailerd import signing, values

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
    bits = DEFAULT_BITS if args.bits is None else args.bits
    domain = args.domain.lower().rstrip(".")
    # absolute: the printed config line is read by mailerd, which runs from another directory
    path = os.path.join(os.path.abspath(args.dir), f"{domain}.{args.selector}.key")
    problem = bad_argument(args.type, args.bits, args.domain, args.selector, path)
    if problem:
        print(f"mailerd dkim keygen: {problem}", file=sys.stderr)
        return 2
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
    spec = f"{domain}:{args.selector}:{path}"
    print("; then add to /etc/mailerd/mailerd.conf (and reload mailerd):")
    print(f"dkim-key = {spec}")
    # A second "dkim-key =" line is an error (configparser: the option already exists); the
    # keys of a repeatable option are one comma-separated list on one line.
    print("; or, if it has a dkim-key line already, add this key to that line after a comma:")
    print(f";   dkim-key = <the keys already there>, {spec}")
    return 0


def bad_argument(kind: str, bits: int | None, domain: str, selector: str, path: str) -> str:
    """Why these arguments would make a key the daemon cannot use, or "": the domain and
    selector as mailerd's --dkim-key reads them (config.py), and a file name that survives
    the config file's list splitting (on commas and whitespace)."""
    if kind != "rsa" and bits is not None:
        return f"--bits is for RSA keys ({kind} keys have one size)"
    if kind == "rsa" and bits is not None and bits < signing.MIN_RSA_BITS:
        return f"--bits: at least {signing.MIN_RSA_BITS} (receivers ignore shorter keys)"
    try:
        values.parse_domains([domain])
    except values.ConfigError:
        return f"not a domain name: {domain!r}"
    if not values.is_selector(selector):
        return (
            f"not a selector: {selector!r} (DNS labels: letters, digits, hyphens, "
            "underscores, separated by dots)"
        )
    if re.search(r"[,\s]", path):
        return f"--dir: mailerd.conf cannot name a key file with a comma or a space: {path!r}"
    return ""


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

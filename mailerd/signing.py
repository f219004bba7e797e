"""DKIM signing of the mail that leaves (RFC 6376; Ed25519 by RFC 8463): the keys, and the
signatures the delivery process puts on a message once, when it queues it for remote
recipients — never per delivery attempt, never on a local copy. Its own bounces and delay
warnings to remote senders are signed the same way (From: MAILER-DAEMON at the host name).

Keys come from `--dkim-key DOMAIN:SELECTOR:FILE` (PEM: RSA of 2048 bits or more, or Ed25519;
`mailerd dkim keygen` makes them). The master reads them as root before it forks and on every
reload (`config.load_files`): a key that cannot be used stops the start, rather than mail going
out unsigned. The children hold the loaded keys and never open the files.

Which keys sign: those of the domain of the message's From: address (RFC 5322.From, the one
DMARC aligns with), or else of the nearest parent domain that has keys (relaxed alignment
accepts it). Every key of that domain signs: an RSA and an Ed25519 key give two signatures, for
receivers that know Ed25519 and those that do not. Canonicalisation is relaxed/relaxed; the
signed header fields are those of SIGNED_HEADERS the message has, each instance, and From once
more (over-signed: no From can be added without breaking the signature); no l= tag.

dkimpy (Debian python3-dkim) makes the signatures; Ed25519 needs PyNaCl (python3-nacl), which
dkimpy uses for it; its RSA is OpenSSL's (`dkim_speedups`).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailerd import (
    dkim_speedups,  # noqa: F401  (its import speeds dkimpy up)
    headers,
)

log = logging.getLogger("mailerd.signing")

MIN_RSA_BITS = 2048
SIGNED_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
    "content-type", "in-reply-to", "references",
)  # fmt: skip
_SIGNED = frozenset(name.encode() for name in SIGNED_HEADERS)


class KeyProblem(Exception):
    """A key that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    public: str  # base64 of the public key (the DNS record's p=)
    path: str
    bits: int  # RSA modulus size; 256 for Ed25519
    private: bytes = field(repr=False)  # for dkimpy: PEM (RSA) or the base64 seed (Ed25519)

    @property
    def kind(self) -> str:
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record(self) -> str:
        """The TXT record to publish at `dns_name`, as one string."""
        return f"v=DKIM1; k={self.kind}; p={self.public}"


def load_key(domain: str, selector: str, path: str) -> SigningKey:
    """Read and check one key file; raises KeyProblem."""
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as exc:
        raise KeyProblem(f"cannot read DKIM key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyProblem(f"DKIM key {path}: not an unencrypted PEM private key") from exc
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyProblem(
                f"DKIM key {path}: RSA of {key.key_size} bits; at least {MIN_RSA_BITS} please "
                "(receivers refuse or ignore shorter ones)"
            )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return SigningKey(domain, selector, "rsa-sha256", _b64(public), path, key.key_size, private)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        raw_public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return SigningKey(
            domain, selector, "ed25519-sha256", _b64(raw_public), path, 256, _b64(seed).encode()
        )
    raise KeyProblem(f"DKIM key {path}: neither RSA nor Ed25519")


def keys_for(from_domain: str, keys: Sequence[SigningKey]) -> tuple[SigningKey, ...]:
    """The keys that sign mail from `from_domain`: its own, or the nearest parent's."""
    labels = from_domain.lower().rstrip(".").split(".")
    for start in range(len(labels) - 1):
        candidate = ".".join(labels[start:])
        found = tuple(k for k in keys if k.domain == candidate)
        if found:
            return found
    return ()


def signed_headers(message: bytes) -> list[bytes]:
    """The h= list: each present field of SIGNED_HEADERS, as many times as it occurs, in the
    message's order, then From once more."""
    names = [name for name, _, _ in headers.fields(message) if name in _SIGNED]
    return [*names, b"from"]


def sign(message: bytes, keys: Sequence[SigningKey]) -> bytes:
    """The DKIM-Signature fields (CRLF-terminated, to go above the message) for `message`,
    one per key; b"" without keys."""
    if not keys:
        return b""
    include = signed_headers(message)
    out = []
    for key in keys:
        out.append(
            dkim.sign(
                message,
                key.selector.encode(),
                key.domain.encode(),
                key.private,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=include,
                signature_algorithm=key.algorithm.encode(),
                linesep=b"\r\n",
            )
        )
    return b"".join(out)


def sign_message(message: bytes, keys: Sequence[SigningKey]) -> tuple[bytes, str | None]:
    """The signatures for a message leaving through the queue, and the domain they are for
    (None, and b"", when its From: domain has no key)."""
    domain = headers.from_domain(message)
    chosen = keys_for(domain, keys) if domain else ()
    if not chosen:
        return b"", None
    return sign(message, chosen), chosen[0].domain


def sign_queued(queue_id: str, message: bytes, keys: Sequence[SigningKey]) -> bytes:
    """`sign_message` for a message about to be queued, logged: for which domain, or why it
    goes unsigned (dkimpy refuses what it cannot parse: the message then leaves as it would
    without keys, rather than not at all)."""
    if not keys:
        return b""
    try:
        signature, domain = sign_message(message, keys)
    except Exception as exc:
        log.warning("%s: not DKIM-signed: %s", queue_id, exc)
        return b""
    if domain is not None:
        log.info("%s: DKIM-signed for %s", queue_id, domain)
    return signature


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

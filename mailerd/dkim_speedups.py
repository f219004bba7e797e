"""dkimpy, made faster where mailerd spends its time; importing this module does it, and the
results stay dkimpy's to the byte (were a replacement not to take, in a dkimpy that no longer
calls these names, signing and verifying would stay right, only slower):

- its RSASSA-PKCS1-v1_5 primitives, which it computes in pure Python (a 2048-bit signature
  takes it about 8 ms, a verification about 0.6 ms), by OpenSSL's through `cryptography`
  (SHA-256, what rsa-sha256 uses; anything else stays with dkimpy's own code);
- the two whitespace passes of relaxed canonicalisation (a regular expression over the whole
  body, each), skipped when the text has nothing for them to change: no tab or double space,
  no space or tab before a line end, as most mail;
- the parse of a key record (base64, ASN.1 in Python), kept for the record's name and text:
  a sender's key is the same message after message, and a changed record is parsed anew.
"""

from __future__ import annotations

import functools
from typing import Any

import dkim
import dkim.canonicalization
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils


@functools.lru_cache(maxsize=64)
def _private_key(n: int, e: int, d: int, p: int, q: int) -> rsa.RSAPrivateKey:
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, n),
    )  # fmt: skip
    return numbers.private_key()


@functools.lru_cache(maxsize=256)
def _public_key(n: int, e: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


def sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSASSA_PKCS1_v1_5_sign(hash object, key dict)."""
    if getattr(digest, "name", None) != "sha256":
        return bytes(_dkimpy_sign(digest, private_key))
    key = _private_key(
        private_key["modulus"],
        private_key["publicExponent"],
        private_key["privateExponent"],
        private_key["prime1"],
        private_key["prime2"],
    )
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def verify(digest: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's RSASSA_PKCS1_v1_5_verify(hash object, signature, key dict)."""
    if getattr(digest, "name", None) != "sha256":
        return bool(_dkimpy_verify(digest, signature, public_key))
    try:
        key = _public_key(public_key["modulus"], public_key["publicExponent"])
        key.verify(signature, digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    except (InvalidSignature, ValueError):  # (ValueError: a key OpenSSL will not take)
        return False
    return True


_dkimpy_sign = dkim.RSASSA_PKCS1_v1_5_sign
_dkimpy_verify = dkim.RSASSA_PKCS1_v1_5_verify
dkim.RSASSA_PKCS1_v1_5_sign = sign
dkim.RSASSA_PKCS1_v1_5_verify = verify


def compress_whitespace(content: bytes) -> bytes:
    """dkimpy's: every run of spaces and tabs becomes one space."""
    if b"\t" not in content and b"  " not in content:
        return content
    return bytes(_dkimpy_compress(content))


def strip_trailing_whitespace(content: bytes) -> bytes:
    """dkimpy's: spaces and tabs before a line end go."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return bytes(_dkimpy_strip(content))


_dkimpy_compress = dkim.canonicalization.compress_whitespace
_dkimpy_strip = dkim.canonicalization.strip_trailing_whitespace
dkim.canonicalization.compress_whitespace = compress_whitespace
dkim.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace


@functools.lru_cache(maxsize=256)
def evaluate_pk(name: bytes, record: bytes | str) -> Any:
    """dkimpy's: the key of a DNS key record (its exceptions are not cached)."""
    return _dkimpy_evaluate_pk(name, record)


_dkimpy_evaluate_pk = dkim.evaluate_pk
dkim.evaluate_pk = evaluate_pk

"""dkimpy's RSA, by OpenSSL: importing this module replaces the RSASSA-PKCS1-v1_5 primitives
dkimpy computes in pure Python (a 2048-bit signature takes it about 8 ms, a verification about
0.6 ms) by OpenSSL's through the `cryptography` package. The results are the same signatures
and the same verdicts; were the replacement not to take (a dkimpy that no longer calls these
names), signing and verifying would stay right, only slower. SHA-256 (rsa-sha256) goes to
OpenSSL; anything else stays with dkimpy's own code."""

from __future__ import annotations

import functools
from typing import Any

import dkim
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

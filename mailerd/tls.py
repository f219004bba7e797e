"""TLS for the listeners: the server-side contexts, built by the master (root) from the
--tls-cert/--tls-key pairs before it forks, so that the workers get ready contexts and never read
a key file (they could not: keys stay root's).

The configuration follows Mozilla's "intermediate" recommendation (TLS 1.2 and 1.3; for 1.2 only
ECDHE key exchange with AES-GCM or ChaCha20-Poly1305), what mail clients and servers of the last
decade speak. The server's order of preference decides (Mozilla's list order), with OpenSSL's
"prioritize ChaCha" rule: a client that puts ChaCha20 first (a phone without AES instructions) gets
it. Mozilla would let the client choose, every suite being strong, but Debian's testssl.sh 3.0 rates
a server without an order of its own HIGH, and operators judge by it. Its DHE suites are left out:
they would need DH parameters loaded, and Mozilla's own later versions drop them. Renegotiation and
compression are off. Session tickets are off too: SMTP sessions are not resumed, and Microsoft's
servers failed the STARTTLS handshake with some servers' tickets (chasquid #64, maddy #730). The
key exchange is over elliptic curves only (GROUPS: TLS 1.3's finite-field groups would let a
client make each handshake cost ~100 times more).

Several pairs may be given: pairs whose certificates name the same hosts share one context (an
RSA and an ECDSA certificate for one name: the client's signature algorithms choose); pairs for
other names get contexts of their own, chosen by the client's SNI; the first is the default.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

log = logging.getLogger("mailerd.tls")

# Mozilla's intermediate configuration, version 5.7, without DHE (TLS 1.2 suites; TLS 1.3's
# are OpenSSL's).
CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
# SSL_OP_PRIORITIZE_CHACHA (OpenSSL >= 1.1.1), which Python's ssl does not name.
OP_PRIORITIZE_CHACHA = 1 << 21
# The key-exchange groups: Postfix's list (tls_eecdh_auto_curves), elliptic curves only.
# OpenSSL 3.0's own list adds TLS 1.3's finite-field groups (RFC 7919), and a client asking for
# ffdhe8192 cost a worker ~120 ms of CPU a handshake, against ~1.5 ms with X25519: a way for
# anyone to load the server at no cost of their own, by sending the same key share again and
# again ("DHEat", CVE-2002-20001). Python's ssl (3.11) cannot set the groups, so OpenSSL's
# SSL_CTX_set1_groups_list is called on the context itself (`_limit_groups`).
GROUPS = b"X25519:X448:P-256:P-521:P-384"
_SSL_CTRL_SET_GROUPS_LIST = 92  # (ssl.h: SSL_CTX_set1_groups_list is SSL_CTX_ctrl with this)
HANDSHAKE_TIMEOUT = 30.0  # seconds for a client to finish its handshake
# Seconds left under which a certificate is warned of: certbot renews with 30 days to go, so
# 14 means it did not.
EXPIRY_WARNING = 14 * 86400.0

Pair = tuple[Path, Path]  # a certificate chain and its private key


class TLSError(Exception):
    """A certificate or key that cannot be used; the message names the file and the reason,
    `option` the option that named the file at fault."""

    def __init__(self, message: str, option: str = "--tls-cert") -> None:
        super().__init__(message)
        self.option = option


def _readable_key(cert: Path, key: Path) -> None:
    """A key file that cannot be read is told as the key's (OpenSSL's error would only say
    that the pair failed, and the certificate was read already)."""
    try:
        os.close(os.open(key, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))  # (a FIFO: no wait)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise TLSError(
            f"cannot read key {key} (of certificate {cert}): {reason}", option="--tls-key"
        ) from exc


def server_context(pairs: Sequence[Pair]) -> ssl.SSLContext | None:
    """The context for every TLS listener (None without certificates); raises TLSError."""
    groups: dict[frozenset[str], list[Pair]] = {}
    seen: set[tuple[str, str]] = set()
    for cert, key in pairs:
        decoded = _decoded(cert)
        _warn_of_dates(cert, decoded, time.time())
        same = (os.path.realpath(cert), os.path.realpath(key))
        if same in seen:
            log.warning("certificate %s with key %s is given twice: once is enough", cert, key)
            continue
        seen.add(same)
        groups.setdefault(frozenset(_names(decoded)), []).append((cert, key))
    for members in groups.values():
        for replaced, later in _replaced(members):
            log.warning(
                "certificate %s is never presented: %s, for the same names and of the same key "
                "type, replaces it (give one certificate of each key type for a set of names)",
                replaced,
                later,
            )
    contexts = [(names, _context(members)) for names, members in groups.items()]
    if not contexts:
        return None
    for unused in _never_chosen(list(groups.items())):
        log.warning(
            "certificate %s is never presented: an earlier certificate is chosen for each of its "
            "names (to serve an RSA and an ECDSA certificate for the same host, give both the "
            "same names)",
            unused,
        )
    default = contexts[0][1]
    if len(contexts) > 1:
        default.sni_callback = _chooser(contexts)
    return default


def _replaced(members: list[Pair]) -> list[tuple[Path, Path]]:
    """(certificate, the later one that replaces it) in one context: it holds one certificate
    of each key type, the last loaded (an old and a renewed certificate both listed, say)."""
    last: dict[str, Path] = {}
    out = []
    for cert, _ in reversed(members):
        kind = _key_type(cert)
        if not kind:
            continue
        if kind in last:
            out.append((cert, last[kind]))
        else:
            last[kind] = cert
    return out[::-1]


def _key_type(cert: Path) -> str:
    """The certificate's public key type ("RSA", "EC", …; "" when it cannot be read here)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    except (OSError, ValueError):
        return ""
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC"
    return type(key).__name__


def _never_chosen(groups: list[tuple[frozenset[str], list[Pair]]]) -> list[Path]:
    """The certificates of the groups (after the first) whose every name an earlier group's
    names match: the SNI chooser takes the first match, so those are never presented."""
    unused = []
    for i, (names, members) in enumerate(groups[1:], 1):
        earlier = [pattern for other, _ in groups[:i] for pattern in other]
        if all(any(_matches(p, n) for p in earlier) for n in names):
            unused += [cert for cert, _ in members]
    return unused


def _context(pairs: list[Pair]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | OP_PRIORITIZE_CHACHA
    context.num_tickets = 0
    context.set_ciphers(CIPHERS)
    if not _limit_groups(context):
        log.warning(
            "TLS: cannot limit the key-exchange groups to %s here: TLS 1.3's finite-field "
            "groups stay offered, and a client choosing one costs a handshake ~100 times more",
            GROUPS.decode(),
        )
    for cert, key in pairs:
        _readable_key(cert, key)
        try:
            context.load_cert_chain(cert, key, password=_no_pass_phrase)
        except _Encrypted:
            raise TLSError(
                f"cannot use certificate {cert} with key {key}: the key is encrypted (mailerd "
                "starts unattended: give it a key without a pass phrase, root's, mode 0600)"
            ) from None
        except ssl.SSLError as exc:
            raise TLSError(f"cannot use certificate {cert} with key {key}: {_reason(exc)}") from exc
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise TLSError(f"cannot use certificate {cert} with key {key}: {reason}") from exc
    return context


def _limit_groups(context: ssl.SSLContext) -> bool:
    """Offer only GROUPS; False (nothing changed) where that cannot be done."""
    try:
        libssl = _libssl()
    except OSError:
        return False
    # The SSL_CTX the context wraps: CPython's PySSLContext holds its pointer first after the
    # object's header. The options OpenSSL has for it must be the context's, or it is not it.
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or libssl.SSL_CTX_get_options(pointer) != int(context.options):
        return False
    return bool(libssl.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, GROUPS) == 1)


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl Python's ssl module runs on (loaded already: found in the process's maps,
    so that it is that one and not another version); OSError if there is none."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libssl.so" in line}
    if len(paths) != 1:
        raise OSError(f"libssl: {len(paths)} loaded")
    libssl = ctypes.CDLL(paths.pop())
    libssl.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    libssl.SSL_CTX_get_options.restype = ctypes.c_uint64
    libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    libssl.SSL_CTX_ctrl.restype = ctypes.c_long
    return libssl


class _Encrypted(Exception):
    """A key asks for a pass phrase (OpenSSL would otherwise ask for it on the terminal)."""


def _no_pass_phrase() -> bytes:
    raise _Encrypted


# OpenSSL's reasons, in an operator's words (what else it says is passed on as it is).
_REASONS = {
    "KEY_VALUES_MISMATCH": "the key is not the certificate's",
    "NO_CERTIFICATE_ASSIGNED": "the key is not the certificate's (another kind of key)",
    "PEM lib": "a file holds no PEM certificate or key where one is expected",
    "Error decoding PEM-encoded file": "not a PEM certificate",
}


def _reason(exc: ssl.SSLError) -> str:
    said = getattr(exc, "reason", None) or (exc.args[0] if len(exc.args) == 1 else str(exc))
    if not isinstance(said, str):
        said = str(exc)
    if said.startswith("[SSL] "):  # "[SSL] PEM lib (_ssl.c:3926)"
        said = said[len("[SSL] ") :].split(" (_ssl.c")[0]
    return _REASONS.get(said, said)


def _warn_of_dates(cert: Path, decoded: dict[str, Any], now: float) -> None:
    """Say so when a certificate has expired, or soon will: mailerd serves it all the same
    (refusing to start would stop mail from the servers that do not check), but every mail
    program refuses it, and a sender that checks (DANE, MTA-STS) does not deliver."""
    try:
        begins = ssl.cert_time_to_seconds(decoded["notBefore"])
        ends = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (KeyError, ValueError):
        return
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ends))
    if ends <= now:
        log.warning(
            "certificate %s expired on %s: mail programs refuse it, and so do servers that "
            "check (DANE, MTA-STS); renew it (certbot renew) and reload",
            cert,
            until,
        )
    elif ends - now < EXPIRY_WARNING:
        log.warning(
            "certificate %s expires on %s, in %d day(s): is its renewal working?",
            cert,
            until,
            round((ends - now) / 86400),
        )
    if begins > now:
        log.warning(
            "certificate %s is not valid before %s (is this machine's clock right?)",
            cert,
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(begins)),
        )


def _decoded(cert: Path) -> dict[str, Any]:
    """The certificate's fields, as the ssl module decodes them; TLSError if it cannot."""
    try:
        with open(cert, "rb"):  # (for the system's words: no such file, a directory, denied)
            pass
        decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    except ssl.SSLError as exc:  # (its only words: 'Error decoding PEM-encoded file')
        raise TLSError(f"cannot read certificate {cert}: {_reason(exc)}") from exc
    except OSError as exc:
        raise TLSError(f"cannot read certificate {cert}: {exc.strerror or exc}") from exc
    return cast(dict[str, Any], decoded)


def _names(decoded: dict[str, Any]) -> list[str]:
    """The DNS names a certificate is for (its subjectAltName, else its common name)."""
    names = [value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            names += [value.lower() for kind, value in rdn if kind == "commonName"]
    return names


SNICallback = Callable[[ssl.SSLObject | ssl.SSLSocket, str | None, ssl.SSLContext], None]


def _chooser(contexts: list[tuple[frozenset[str], ssl.SSLContext]]) -> SNICallback:
    def choose(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        if name is None:
            return  # no SNI: the default context
        for names, context in contexts:
            if any(_matches(pattern, name.lower()) for pattern in names):
                sock.context = context
                return

    return choose


def _matches(pattern: str, name: str) -> bool:
    """A certificate name against a host name: exact, or a wildcard for one leftmost label."""
    if pattern.startswith("*."):
        return "." in name and name.split(".", 1)[1] == pattern[2:]
    return pattern == name


def describe(sslobj: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """What a Received: header says of a session's TLS, as Postfix writes it:
    `TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`."""
    if sslobj is None:
        return None
    cipher = sslobj.cipher()
    if cipher is None:
        return None
    name, version, bits = cipher
    return f"{sslobj.version() or version} with cipher {name} ({bits}/{bits} bits)"

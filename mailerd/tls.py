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
compression are off. Session tickets are off too: SMTP sessions are seldom resumed, and Microsoft's
servers failed the STARTTLS handshake with some servers' tickets (chasquid #64, maddy #730). (A TLS
1.2 client may still resume by session id, from the cache of the worker it meets again: OpenSSL's
default, harmless, and a handshake saved.) The
key exchange is over elliptic curves only (GROUPS: TLS 1.3's finite-field groups would let a
client make each handshake cost ~100 times more).

Several pairs may be given: pairs whose certificates name the same hosts share one context (an
RSA and an ECDSA certificate for one name: the client's signature algorithms choose); pairs for
other names get contexts of their own, chosen by the client's SNI; the default, for clients that
send none (Postfix by default), is the host name's, else the first. A context without an RSA
certificate also holds the default's (else the first given) as a fallback, for a client that
takes no ECDSA, as Go's crypto/tls (chasquid, mox) falls back to a certificate the client can
use: a sending server, which checks no name, then gets TLS rather than a failed handshake. It is
only ever presented to such a client: the server's order of preference puts ECDSA before RSA
(in TLS 1.3's signature algorithms; in TLS 1.2's suites, such a context lists every ECDSA
suite before any RSA one, and no RSA ChaCha20: `ECDSA_FIRST`). The reverse, an ECDSA fallback
for an RSA-only name, would be presented to every client, which all take ECDSA: none is added.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import ssl
import stat
import time
from collections.abc import Callable, Iterable, Sequence
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
# The suites of a context that holds an RSA certificate only as a fallback (`_with`): every
# ECDSA one first, since in TLS 1.2 the suite chooses the certificate and a client that takes
# ECDSA in any suite must get the name's own, not another name's RSA one; and no RSA ChaCha20,
# which a client listing it first would get ahead of them all (OP_PRIORITIZE_CHACHA: an SNI
# switch of context keeps the first context's options, so it cannot be turned off here).
ECDSA_FIRST = ":".join(
    [suite for suite in CIPHERS.split(":") if suite.startswith("ECDHE-ECDSA-")]
    + [suite for suite in CIPHERS.split(":") if suite.startswith("ECDHE-RSA-AES")]
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


def _regular_file(path: Path) -> None:
    """Raise OSError unless `path` opens, without waiting, as a regular file: OpenSSL opens
    the path itself, and a FIFO there held the start (and `mailerd dns`) for ever (an
    attacker's pass)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
    finally:
        os.close(fd)


def _readable(cert: Path, key: Path) -> None:
    """Files that cannot be read are told as such, the key's as the key's (OpenSSL's error
    would only say that the pair failed)."""
    try:
        _regular_file(cert)
    except OSError as exc:
        raise TLSError(f"cannot read certificate {cert}: {exc.strerror or exc}") from exc
    try:
        _regular_file(key)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise TLSError(
            f"cannot read key {key} (of certificate {cert}): {reason}", option="--tls-key"
        ) from exc


def server_context(pairs: Sequence[Pair], hostname: str = "") -> ssl.SSLContext | None:
    """The context for every TLS listener (None without certificates); raises TLSError.
    A `hostname` (the greeting's, the one the MX and SRV records name) that no certificate is
    for is warned of: the server serves one all the same, but clients that check refuse it."""
    groups: dict[frozenset[str], list[Pair]] = {}
    seen: set[tuple[str, str]] = set()
    for cert, key in pairs:
        decoded = _decoded(cert)
        _warn_of_dates(cert, decoded, time.time())
        if _common_name_only(decoded):
            log.warning("certificate %s: %s", cert, _COMMON_NAME_ONLY)
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
    if not groups:
        return None
    for unused in _never_chosen(list(groups.items())):
        log.warning(
            "certificate %s is never presented: an earlier certificate is chosen for each of its "
            "names (to serve an RSA and an ECDSA certificate for the same host, give both the "
            "same names)",
            unused,
        )
    host = hostname.lower().rstrip(".")
    ours = [names for names in groups if _covers(names, host)]
    # The default, for clients that send no SNI (Postfix sends none by default, an attacker's
    # pass found): servers delivering here come by the MX, to the host name.
    default_names = ours[0] if ours else next(iter(groups))
    fallback = _rsa_fallback(groups[default_names], [p for m in groups.values() for p in m])
    contexts = []
    for names, members in groups.items():
        held = _with(members, fallback)
        contexts.append((names, _context(held, ecdsa_first=len(held) > len(members))))
    default = dict(contexts)[default_names]
    if not ours and host:
        log.warning(
            "no certificate is for the host name %s (they are for %s): mail programs, and "
            "servers that check certificates (MTA-STS), refuse the connection; get one for "
            "it, or set hostname to a name one is for (mailerd dns --check checks it)",
            host,
            ", ".join(sorted({n for names in groups for n in names})) or "no name",
        )
    if len(contexts) > 1:
        default.sni_callback = _chooser(contexts)
    return default


def _rsa_fallback(default: list[Pair], given: list[Pair]) -> Pair | None:
    """The RSA pair presented to a client that takes no ECDSA wherever no RSA certificate is
    for its name: the default context's (the last of them, which that context holds), else
    the first given; None without any."""
    rsa = [pair for pair in default if _key_type(pair[0]) == "RSA"]
    if rsa:
        return rsa[-1]
    return next((pair for pair in given if _key_type(pair[0]) == "RSA"), None)


def _with(members: list[Pair], fallback: Pair | None) -> list[Pair]:
    """A context's pairs, with the RSA fallback first when none of its own is RSA (loaded first,
    so that a later RSA pair of the context's own would replace it, were there one)."""
    if fallback is None or any(_key_type(cert) == "RSA" for cert, _ in members):
        return members
    return [fallback, *members]


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
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    except (OSError, ValueError, UnsupportedAlgorithm):  # (a curve it does not know)
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
        if all(_covers(earlier, n) for n in names):
            unused += [cert for cert, _ in members]
    return unused


def _context(pairs: list[Pair], *, ecdsa_first: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | OP_PRIORITIZE_CHACHA
    context.num_tickets = 0
    context.set_ciphers(ECDSA_FIRST if ecdsa_first else CIPHERS)
    if not _limit_groups(context):
        log.warning(
            "TLS: cannot limit the key-exchange groups to %s here: TLS 1.3's finite-field "
            "groups stay offered, and a client choosing one costs a handshake ~100 times more",
            GROUPS.decode(),
        )
    for cert, key in pairs:
        _readable(cert, key)
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
# (The first certificate of the file is the one the key must match: a chain in the wrong
# order fails so, an attacker's pass found.)
_FIRST = "the first in the file: the server's own certificate comes first, then its chain"
_REASONS = {
    "KEY_VALUES_MISMATCH": f"the key is not the certificate's ({_FIRST})",
    "NO_CERTIFICATE_ASSIGNED": f"the key is not the certificate's (another kind of key; {_FIRST})",
    "PEM lib": "a file holds no PEM certificate or key where one is expected",
    "EE_KEY_TOO_SMALL": (
        "its key is too weak for OpenSSL (RSA of 2048 bits or more, or ECDSA P-256: certbot's "
        "keys are)"
    ),
    "CA_MD_TOO_WEAK": "it is signed with a digest OpenSSL refuses (SHA-1 or MD5)",
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
        _regular_file(cert)  # (for the system's words: no such file, a directory, denied)
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
        # (RFC 6066 3 forbids a final dot, but some clients send one: the same name.)
        wanted = name.lower().rstrip(".")
        for names, context in contexts:
            if _covers(names, wanted):
                sock.context = context
                return

    return choose


def _covers(patterns: Iterable[str], name: str) -> bool:
    """Is `name` (lower case) one of a certificate's names, or under one of its wildcards?"""
    return any(_matches(pattern, name) for pattern in patterns)


def _matches(pattern: str, name: str) -> bool:
    """A certificate name against a host name: exact, or a wildcard for one leftmost label
    above two or more (OpenSSL's clients take no `*.org`)."""
    if pattern.startswith("*.") and "." in pattern[2:]:
        return "." in name and name.split(".", 1)[1] == pattern[2:]
    return pattern == name


# OpenSSL's verify messages, in an operator's words: why a client that checks refuses a chain.
_INCOMPLETE = (
    "its issuer is neither in the file nor a CA clients trust: give the whole chain (certbot's "
    "fullchain.pem, not cert.pem)"
)
_VERIFY_REASONS = {
    "unable to get local issuer certificate": _INCOMPLETE,
    "unable to verify the first certificate": _INCOMPLETE,
    "self-signed certificate": (
        "it is self-signed: mail programs refuse it (or ask their users to trust it), and so do "
        "senders that check; get one from a CA (certbot certonly --standalone -d HOST)"
    ),
    "self-signed certificate in certificate chain": (
        "its chain ends at a CA that clients do not trust"
    ),
    "certificate has expired": "it has expired: renew it (certbot renew) and reload mailerd",
    "certificate is not yet valid": "it is not valid yet (is this machine's clock right?)",
}


# OpenSSL says "certificate has expired" of any certificate of the chain, at any depth.
_CHAIN_EXPIRED = (
    "a CA certificate in the file has expired, not the server's own: take the chain again "
    "(certbot's fullchain.pem is kept current)"
)


_COMMON_NAME_ONLY = (
    "its names are in its common name only, which clients no longer read: it needs them in a "
    "subjectAltName (certbot's certificates have one)"
)


def _common_name_only(decoded: dict[str, Any]) -> bool:
    """Has the certificate no DNS name but in its subject's common name (`_names`' fallback)?"""
    return not any(kind == "DNS" for kind, _ in decoded.get("subjectAltName", ()))


def _expired(cert: Path) -> bool:
    """Has the first certificate of the file (the server's own) expired?"""
    ends = _end(cert)
    return ends is None or ends <= time.time()


def _end(cert: Path) -> float | None:
    """When the first certificate of the file (the server's own) expires; None if unreadable."""
    try:
        return ssl.cert_time_to_seconds(_decoded(cert)["notAfter"])
    except (TLSError, KeyError, ValueError):
        return None


def check_pair(pair: Pair) -> None:
    """Raise TLSError, saying why, if the pair cannot be served (what the start would say)."""
    _context([pair])


def presented(pairs: Sequence[Pair], hostname: str) -> list[Pair]:
    """The pairs a client asking for `hostname` (by SNI) is served from, as the chooser picks
    them: those of the first set of names that covers it (one certificate a key type); [] when
    no certificate is for it. Raises TLSError for a certificate that cannot be read."""
    groups: dict[frozenset[str], list[Pair]] = {}
    for cert, key in pairs:
        groups.setdefault(frozenset(names_of(cert)), []).append((cert, key))
    for patterns, members in groups.items():
        if _covers(patterns, hostname.lower()):
            kinds: dict[str, Pair] = {}
            for cert, key in members:  # (the last of a key type is the one loaded)
                kinds[_key_type(cert) or str(cert)] = (cert, key)
            return list(kinds.values())
    return []


def names_of(cert: Path) -> list[str]:
    """The DNS names a certificate file is for; raises TLSError if it cannot be read."""
    return _names(_decoded(cert))


def refusal(pair: Pair, hostname: str) -> str:
    """Why a client that checks certificates for `hostname` (a mail program; a sender under
    MTA-STS) refuses the pair's certificate, in an operator's words; "" when it accepts it.
    OpenSSL checks it as such clients do (the chain against the system's trust anchors, or
    SSL_CERT_FILE's where set; the name; the dates), in a handshake in memory between a
    context of the pair and a client's. Raises TLSError when the pair cannot be loaded."""
    server = _context([pair])
    client = ssl.create_default_context()
    client.hostname_checks_common_name = False  # (as browsers' and Go's libraries do)
    try:
        _handshake(server, client, hostname)
    except ssl.SSLCertVerificationError as exc:
        said = exc.verify_message or _reason(exc)
        if said == "certificate has expired" and not _expired(pair[0]):
            return _CHAIN_EXPIRED
        if said.startswith("Hostname mismatch") and _common_name_only(_decoded(pair[0])):
            return _COMMON_NAME_ONLY
        return _VERIFY_REASONS.get(said, said).replace("HOST", hostname)
    except ssl.SSLError as exc:
        return f"the handshake failed: {_reason(exc)}"
    return ""


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake between the two contexts through memory; raises what the client
    raises (SSLCertVerificationError when it refuses the certificate)."""
    to_server, to_client, from_server, from_client = (ssl.MemoryBIO() for _ in range(4))
    ours = server.wrap_bio(to_server, from_server, server_side=True)
    theirs = client.wrap_bio(to_client, from_client, server_hostname=hostname)
    for _ in range(8):  # (TLS 1.3 takes two flights each way, TLS 1.2 three)
        try:
            theirs.do_handshake()
            return
        except ssl.SSLWantReadError:
            pass
        to_server.write(from_client.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            ours.do_handshake()
        to_client.write(from_server.read())
    raise ssl.SSLError("the handshake did not finish")


def summary(cert: Path) -> str:
    """The key type and the end of validity of a certificate, for an OK line."""
    kind = _key_type(cert)
    kind = {"EC": "ECDSA"}.get(kind, kind) or "?"
    ends = _end(cert)
    if ends is None:
        return kind
    return f"{kind}, until {time.strftime('%Y-%m-%d', time.gmtime(ends))}"


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

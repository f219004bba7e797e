"""The parts of TLS and authenticated submission below the session: the options and their
checks (config), the server context (tls), the passwd file (credentials), the failed-AUTH
table the workers share (ipc.authfailures), whose sender addresses a user owns (policy), and
what each listener role offers (worker.process.session_config)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import socket
import ssl
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from certs import CA, Pair, make_ca

from mailerd import config, credentials, headers, policy, tls
from mailerd.aliases import Aliases
from mailerd.config import ConfigError
from mailerd.ipc import authfailures
from mailerd.ipc.authfailures import AuthFailures
from mailerd.names import Locality
from mailerd.smtp import Address
from mailerd.worker.logins import Logins, Unchecked
from mailerd.worker.process import session_config

BASE = ["-n", "none", "-l", "127.0.0.1:2525", "-d", "example.org", "-H", "mx.example.org"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CA:
    return make_ca(tmp_path_factory.mktemp("ca"))


def load(*args: str) -> config.Config:
    return config.load([*BASE, *args])


# --- options ----------------------------------------------------------------------------------


def test_submission_listeners_default_to_587_and_465(ca):
    pair = ca.issue("mx.example.org")
    cfg = load(
        "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
        "--listen-submission", "127.0.0.1", "--listen-submission", "[::1]:2587",
        "--listen-submissions", "::1",
    )  # fmt: skip
    roles = [(a.host, a.port, a.role) for a in cfg.listeners]
    assert roles == [
        ("127.0.0.1", 2525, config.LOCAL),
        ("127.0.0.1", 587, config.SUBMISSION),
        ("::1", 2587, config.SUBMISSION),
        ("::1", 465, config.SUBMISSIONS),
    ]
    assert cfg.tls_pairs == ((pair.cert, pair.key),)
    assert [a.trusted for a in cfg.listeners] == [True, False, False, False]
    assert [a.implicit_tls for a in cfg.listeners] == [False, False, False, True]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--listen-submission", "127.0.0.1"], "submission needs TLS"),
        (["--listen-submissions", "127.0.0.1"], "submission needs TLS"),
        (["--tls-required"], "tls-required"),
        (["--tls-cert", "a.pem"], "1 certificate(s) but 0 key(s)"),
        (["--tls-cert", "a.pem", "--tls-key", "a.key", "--tls-key", "b.key"], "but 2 key(s)"),
        (["--listen-submission", "127.0.0.1:2525", "--tls-cert", "a", "--tls-key", "b"], "twice"),
    ],
)
def test_bad_tls_options(args, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load(*args)


def test_the_config_file_pairs_certificates_with_keys_in_order(tmp_path: Path, ca):
    rsa, ecdsa = ca.issue("mx.example.org", tag="c1"), ca.issue("mx.example.org", kind="ecdsa")
    ini = tmp_path / "mailerd.conf"
    ini.write_text(
        "[mailerd]\n"
        f"tls-cert = {rsa.cert}, {ecdsa.cert}\n"
        f"tls-key = {rsa.key}, {ecdsa.key}\n"
        "tls-required = yes\n"
        f"passwd = {tmp_path / 'passwd'}\n"
        "listen-submissions = 127.0.0.1:2465\n"
    )
    cfg = load("-c", str(ini))
    assert cfg.tls_pairs == ((rsa.cert, rsa.key), (ecdsa.cert, ecdsa.key))
    assert cfg.tls_required and cfg.passwd_file == tmp_path / "passwd"
    loaded = config.load_files(cfg)
    assert isinstance(loaded.tls_context, ssl.SSLContext) and len(loaded.credentials) == 0


def test_load_files_names_the_file_that_cannot_be_used(tmp_path: Path, ca):
    pair, other = ca.issue("mx.example.org", tag="p"), ca.issue("mx.example.org", kind="ecdsa")
    cfg = load("--tls-cert", str(pair.cert), "--tls-key", str(other.key))
    with pytest.raises(ConfigError, match=str(pair.cert)):
        config.load_files(cfg)
    cfg = load("--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(pair.key))
    with pytest.raises(ConfigError, match="none.pem"):
        config.load_files(cfg)
    broken = tmp_path / "passwd"
    broken.write_text("alice:plaintext\n")
    with pytest.raises(ConfigError, match=f"{broken}, line 1"):
        config.load_files(load("--passwd", str(broken)))


def test_a_reload_keeps_certificates_that_do_not_load_and_reads_the_rest(tmp_path: Path, ca):
    pair, other = ca.issue("mx.example.org", tag="r1"), ca.issue("mx.example.org", kind="ecdsa")
    passwd = tmp_path / "passwd"
    credentials.write(str(passwd), {"alice": credentials.hash_password("x")})
    running = config.load_files(load("--tls-cert", str(pair.cert), "--tls-key", str(pair.key)))
    credentials.write(str(passwd), {"bob": credentials.hash_password("y")})
    mismatched = ("--tls-cert", str(pair.cert), "--tls-key", str(other.key))
    broken = load(*mismatched, "--passwd", str(passwd))
    new, why = config.reload_files(broken, running)
    assert why is not None and str(pair.cert) in why
    assert new.tls_context is running.tls_context and new.tls_pairs == running.tls_pairs
    assert set(new.credentials.hashes) == {"bob"}
    # Certificates that load replace the running ones, without a word.
    fine = load("--tls-cert", str(other.cert), "--tls-key", str(other.key))
    new, why = config.reload_files(fine, running)
    assert why is None and new.tls_context is not running.tls_context
    # Nothing to keep when no certificate is in use, and other files are not kept either.
    with pytest.raises(ConfigError, match=str(pair.cert)):
        config.reload_files(broken, config.load_files(load()))
    passwd.write_text("alice:plaintext\n")
    with pytest.raises(ConfigError, match=f"{passwd}, line 1"):
        config.reload_files(load("--passwd", str(passwd)), running)


def test_a_certificate_that_cannot_be_used_is_told_in_words(tmp_path: Path, ca):
    """The reason a pair cannot be used, as an operator can act on it (not OpenSSL's codes)."""
    rsa, other = ca.issue("mx.example.org", tag="why1"), ca.issue("mx.example.org", tag="why2")
    ecdsa = ca.issue("mx.example.org", kind="ecdsa", tag="why3")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    cases = [
        ((tmp_path, rsa.key), "Is a directory"),
        ((rsa.cert, tmp_path / "no-such.key"), "cannot read key"),  # (not the certificate)
        ((garbage, rsa.key), "not a PEM certificate"),
        ((rsa.cert, rsa.cert), "holds no PEM certificate or key"),
        ((rsa.cert, other.key), "the key is not the certificate's"),
        ((rsa.cert, ecdsa.key), "the key is not the certificate's"),
    ]
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(rsa.key), "-aes256", "-passout", "pass:x", "-out",
         str(encrypted)], check=True, capture_output=True,
    )  # fmt: skip
    cases.append(((rsa.cert, encrypted), "the key is encrypted"))  # (never a prompt)
    for pair, words in cases:
        with pytest.raises(tls.TLSError) as caught:
            tls.server_context([pair])
        assert words in str(caught.value) and str(pair[0]) in str(caught.value), caught.value
        assert "_ssl.c" not in str(caught.value) and "('" not in str(caught.value)


def test_relative_certificate_paths_mean_the_start_directory(tmp_path: Path):
    cfg = config.absolute(load("--tls-cert", "c.pem", "--tls-key", "k.pem"), tmp_path)
    assert cfg.tls_pairs == ((tmp_path / "c.pem", tmp_path / "k.pem"),)


# --- what each role offers ----------------------------------------------------------------


def test_session_config_by_role(tmp_path: Path, ca):
    pair = ca.issue("mx.example.org", tag="roles")
    passwd = tmp_path / "passwd"
    credentials.write(str(passwd), {"alice": credentials.hash_password("x")})
    args = [
        *BASE[2:], "-n", "127.0.0.1:2526", "--tls-cert", str(pair.cert), "--tls-key", str(pair.key),
        "--listen-submission", "127.0.0.1:2587", "--listen-submissions", "127.0.0.1:2465",
        "--passwd", str(passwd), "--tls-required",
    ]  # fmt: skip
    cfg = config.load_files(config.load(args))
    offered = {a.role: session_config(cfg, a) for a in cfg.listeners if a.host == "127.0.0.1"}

    def flags(role: str) -> tuple[bool, ...]:
        s = offered[role]
        return (s.starttls, s.implicit_tls, s.auth, s.auth_in_clear, s.tls_required,
                s.auth_required)  # fmt: skip

    assert flags(config.LOCAL) == (True, False, True, True, False, False)
    assert flags(config.NETWORK) == (True, False, False, False, True, False)
    assert flags(config.SUBMISSION) == (True, False, True, False, True, True)
    assert flags(config.SUBMISSIONS) == (False, True, True, False, False, True)
    # A local listener on another address than loopback takes AUTH inside TLS only.
    lan = config.load_files(config.load([*args, "-l", "192.0.2.7:2525"]))
    (on_lan,) = [a for a in lan.listeners if a.role == config.LOCAL and a.host == "192.0.2.7"]
    assert (session_config(lan, on_lan).auth, session_config(lan, on_lan).auth_in_clear) == (
        True,
        False,
    )
    # Without passwords the local listener offers no AUTH; without a certificate, no STARTTLS.
    plain = config.load_files(load("--passwd", str(tmp_path / "none")))
    local = session_config(plain, plain.listeners[0])
    assert (local.starttls, local.auth) == (False, False)


# --- the server context -------------------------------------------------------------------


def handshake(context: ssl.SSLContext, client: ssl.SSLContext, name: str | None) -> bytes:
    """One in-memory handshake; the certificate the server presented (DER)."""
    a, b = socket.socketpair()
    with a, b:
        server = threading.Thread(target=_serve, args=(context, a))
        server.start()
        with client.wrap_socket(b, server_hostname=name) as conn:
            cert = conn.getpeercert(binary_form=True)
        server.join(10)
    assert cert is not None
    return cert


def _serve(context: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        with context.wrap_socket(sock, server_side=True) as conn:
            conn.recv(1)
    except (OSError, ssl.SSLError):
        pass


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_sni_chooses_among_names_and_the_first_is_the_default(ca):
    first = ca.issue("mx.example.org", "smtp.example.org", tag="sni1")
    second = ca.issue("mail.example.net", "*.example.com", tag="sni2")
    context = tls.server_context([(first.cert, first.key), (second.cert, second.key)])
    assert context is not None
    client = ssl.create_default_context(cafile=str(ca.cert))
    assert handshake(context, client, "mail.example.net") == der(second.cert)
    assert handshake(context, client, "mx.example.com") == der(second.cert)  # the wildcard
    assert handshake(context, client, "smtp.example.org") == der(first.cert)
    unchecked_sni = ssl.create_default_context(cafile=str(ca.cert))
    unchecked_sni.check_hostname = False  # (a final dot, which some clients send: the same name)
    assert handshake(context, unchecked_sni, "Mail.Example.NET.") == der(second.cert)
    unchecked = ssl.create_default_context(cafile=str(ca.cert))
    unchecked.check_hostname = False
    assert handshake(context, unchecked, None) == der(first.cert)
    assert handshake(context, unchecked, "unknown.example") == der(first.cert)


def test_the_host_names_certificate_is_the_default_for_clients_without_sni(ca):
    """Postfix sends no SNI by default: a server delivering here by the MX gets the default
    certificate, which is the host name's wherever it is listed (an attacker's pass: the first
    listed, a webmail's, was served to them, while `mailerd dns --check` said OK)."""
    webmail = ca.issue("webmail.example.org", kind="ecdsa", tag="nosni1")
    mx = ca.issue("mx.example.org", kind="ecdsa", tag="nosni2")
    pairs = [(webmail.cert, webmail.key), (mx.cert, mx.key)]
    unchecked = ssl.create_default_context(cafile=str(ca.cert))
    unchecked.check_hostname = False
    context = tls.server_context(pairs, "mx.example.org")
    assert context is not None
    assert handshake(context, unchecked, None) == der(mx.cert)
    assert handshake(context, unchecked, "webmail.example.org") == der(webmail.cert)
    first = tls.server_context(pairs)  # (no host name: the first, as before)
    assert first is not None and handshake(first, unchecked, None) == der(webmail.cert)


def rsa_only_client(ca: CA) -> ssl.SSLContext:
    """A TLS 1.2 client that takes no ECDSA (its suites are ECDHE-RSA only) and checks no name,
    as a sending server does not."""
    client = ssl.create_default_context(cafile=str(ca.cert))
    client.check_hostname = False
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    return client


def s_client_certificate(context: ssl.SSLContext, name: str, *args: str) -> bytes:
    """The certificate the context presents to `openssl s_client -servername name args`."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        server = threading.Thread(target=lambda: _serve(context, listener.accept()[0]))
        server.start()
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{listener.getsockname()[1]}",
             "-servername", name, *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        server.join(10)
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", done.stdout, re.S)
    assert pem, done.stdout + done.stderr
    return ssl.PEM_cert_to_DER_cert(pem.group(0))


def test_a_client_without_ecdsa_gets_the_default_rsa_certificate_for_an_ecdsa_only_name(ca):
    """An acceptance finding: a name served by an ECDSA certificate only failed the handshake of
    a client that takes no ECDSA ("handshake failure"), where Go's servers (chasquid, mox) fall
    back to a certificate it can use. The default's RSA certificate now serves it; a client
    that takes ECDSA still gets the name's own, whatever order it lists its algorithms in."""
    mx = ca.issue("mx.example.org", tag="fb1")
    other = ca.issue("mail.example.net", kind="ecdsa", tag="fb2")
    context = tls.server_context([(mx.cert, mx.key), (other.cert, other.key)], "mx.example.org")
    assert context is not None
    assert handshake(context, rsa_only_client(ca), "mail.example.net") == der(mx.cert)
    client = ssl.create_default_context(cafile=str(ca.cert))
    assert handshake(context, client, "mail.example.net") == der(other.cert)
    for sigalgs, served in (
        ("rsa_pss_rsae_sha256:rsa_pkcs1_sha256", mx),  # TLS 1.3, no ECDSA
        ("rsa_pss_rsae_sha256:ecdsa_secp256r1_sha256", other),  # RSA-PSS listed first
    ):
        got = s_client_certificate(context, "mail.example.net", "-tls1_3", "-sigalgs", sigalgs)
        assert got == der(served.cert), sigalgs
    got = s_client_certificate(
        context, "mail.example.net", "-tls1_2", "-cipher",
        "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256",
    )  # fmt: skip
    assert got == der(other.cert)


@pytest.mark.parametrize(
    "ciphers",
    [
        "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384",
    ],
    ids=["ecdsa-in-a-later-suite", "chacha20-first", "ecdsa-first", "ecdsa-chacha20", "three"],
)
def test_a_tls12_client_that_takes_ecdsa_never_gets_the_rsa_fallback(ca, ciphers):
    """An acceptance re-check: a TLS 1.2 client that takes ECDSA only in a suite the server
    ranks below one of its RSA suites (or below the ChaCha20 one it lists first, which the
    server honours) was given the fallback, another name's RSA certificate, where before the
    fallback it got the name's own. In a context that holds the fallback, ECDSA comes first."""
    mx = ca.issue("mx.example.org", tag="fb5")
    other = ca.issue("mail.example.net", kind="ecdsa", tag="fb6")
    context = tls.server_context([(mx.cert, mx.key), (other.cert, other.key)], "mx.example.org")
    assert context is not None
    client = ssl.create_default_context(cafile=str(ca.cert))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(ciphers)
    assert handshake(context, client, "mail.example.net") == der(other.cert)
    assert handshake(context, rsa_only_client(ca), "mail.example.net") == der(mx.cert)


def test_every_tls12_offer_that_takes_ecdsa_gets_the_names_own_certificate(ca):
    """Every ordered choice of our six TLS 1.2 suites (1956 offers, in memory): one with an
    ECDSA suite is served the name's own certificate, whatever else it lists and in whatever
    order; one without is served the fallback, or fails when it offers RSA ChaCha20 alone (the
    fallback's context has none). On d860183, 218 of them got the fallback, another name's."""
    mx = ca.issue("mx.example.org", tag="fb9")
    other = ca.issue("mail.example.net", kind="ecdsa", tag="fb10")
    context = tls.server_context([(mx.cert, mx.key), (other.cert, other.key)], "mx.example.org")
    assert context is not None
    own, fallback = der(other.cert), der(mx.cert)
    wrong = []
    for size in range(1, 7):
        for offer in itertools.permutations(tls.CIPHERS.split(":"), size):
            served = memory_handshake(context, ":".join(offer), "mail.example.net")
            if any(suite.startswith("ECDHE-ECDSA-") for suite in offer):
                expected = own
            elif offer == ("ECDHE-RSA-CHACHA20-POLY1305",):
                expected = None
            else:
                expected = fallback
            if served != expected:
                wrong.append(":".join(offer))
    assert not wrong, f"{len(wrong)} offers served another certificate, e.g. {wrong[:3]}"


def memory_handshake(context: ssl.SSLContext, ciphers: str, name: str) -> bytes | None:
    """The certificate `context` presents to a TLS 1.2 client offering `ciphers` and asking for
    `name`, through memory BIOs; None if the handshake fails."""
    to_server, to_client, from_server, from_client = (ssl.MemoryBIO() for _ in range(4))
    ours = context.wrap_bio(to_server, from_server, server_side=True)
    theirs = tls12_client(ciphers).wrap_bio(to_client, from_client, server_hostname=name)
    for _ in range(4):
        try:
            theirs.do_handshake()
            return theirs.getpeercert(binary_form=True)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            return None
        to_server.write(from_client.read())
        try:
            ours.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            return None
        to_client.write(from_server.read())
    return None


def test_the_rsa_fallback_keeps_chacha_first_for_ecdsa_clients(ca):
    """A name with a fallback: a client that puts ECDSA ChaCha20 first still gets it; one that
    takes no ECDSA and puts RSA ChaCha20 first gets the fallback over AES-GCM."""
    mx = ca.issue("mx.example.org", tag="fb7")
    other = ca.issue("mail.example.net", kind="ecdsa", tag="fb8")
    context = tls.server_context([(mx.cert, mx.key), (other.cert, other.key)], "mx.example.org")
    assert context is not None
    chacha, aes = "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES128-GCM-SHA256"
    rsa_chacha, rsa_aes = "ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-GCM-SHA256"
    for offer, served, suite in (
        (f"{chacha}:{aes}", other, chacha),
        (f"{rsa_chacha}:{rsa_aes}", mx, rsa_aes),
    ):
        got, cert = tls12_session(context, offer, "mail.example.net")
        assert got == suite, offer
        assert cert == der(served.cert), offer


def test_the_rsa_fallback_is_the_first_rsa_certificate_when_the_default_has_none(ca):
    """The host name's certificate is ECDSA only: a client without SNI that takes no ECDSA gets
    the first RSA certificate given; an RSA-only name gets no ECDSA fallback (every client
    would be served it, server preference putting ECDSA first)."""
    web = ca.issue("webmail.example.org", tag="fb3")
    mx = ca.issue("mx.example.org", kind="ecdsa", tag="fb4")
    context = tls.server_context([(web.cert, web.key), (mx.cert, mx.key)], "mx.example.org")
    assert context is not None
    assert handshake(context, rsa_only_client(ca), None) == der(web.cert)
    unchecked = ssl.create_default_context(cafile=str(ca.cert))
    unchecked.check_hostname = False
    assert handshake(context, unchecked, None) == der(mx.cert)
    client = ssl.create_default_context(cafile=str(ca.cert))
    assert handshake(context, client, "webmail.example.org") == der(web.cert)
    ecdsa_only = tls.server_context([(mx.cert, mx.key)], "mx.example.org")
    assert ecdsa_only is not None
    with pytest.raises(ssl.SSLError):  # (no RSA certificate at all: nothing to fall back to)
        handshake(ecdsa_only, rsa_only_client(ca), None)


def test_a_certificate_the_chooser_never_presents_is_warned_of(ca, caplog):
    """An ECDSA certificate for fewer names than the RSA one before it: SNI takes the first
    certificate that has the name, so the ECDSA one is never presented; say so at start."""
    rsa = ca.issue("mx.example.org", "smtp.example.org", tag="w1")
    ecdsa = ca.issue("mx.example.org", kind="ecdsa", tag="w2")
    other = ca.issue("mail.example.net", "mx.example.org", kind="ecdsa", tag="w3")
    with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
        tls.server_context([(rsa.cert, rsa.key), (ecdsa.cert, ecdsa.key), (other.cert, other.key)])
    warned = [r.getMessage() for r in caplog.records if "never presented" in r.getMessage()]
    assert len(warned) == 1 and str(ecdsa.cert) in warned[0], warned
    caplog.clear()
    same = ca.issue("mx.example.org", "smtp.example.org", kind="ecdsa", tag="w4")
    with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
        tls.server_context([(rsa.cert, rsa.key), (same.cert, same.key)])  # (one context)
    assert not [r for r in caplog.records if "never presented" in r.getMessage()]


def test_a_host_name_no_certificate_is_for_is_warned_of(ca, caplog, tmp_path):
    """The host name (the greeting's, the MX and SRV records' target) that no certificate is
    for: clients that check refuse what is served, and the server cannot tell; say so at start
    (and at each reload: the same load). A wildcard covers it; another name does not."""
    other = ca.issue("mail.example.net", "*.example.com", kind="ecdsa", tag="h1")
    wild = ca.issue("*.example.org", kind="ecdsa", tag="h2")

    def warned(*pairs: Pair, hostname: str = "mx.example.org") -> list[str]:
        caplog.clear()
        certs = ", ".join(str(p.cert) for p in pairs)
        keys = ", ".join(str(p.key) for p in pairs)
        ini = tmp_path / "tls.conf"
        ini.write_text(f"[mailerd]\ntls-cert = {certs}\ntls-key = {keys}\n")
        with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
            config.load_files(load("-c", str(ini), "-H", hostname))
        return [r.getMessage() for r in caplog.records if "host name" in r.getMessage()]

    said = warned(other)
    assert len(said) == 1 and "mx.example.org" in said[0] and "mail.example.net" in said[0], said
    assert warned(other, wild) == [] and warned(wild) == []
    assert warned(other, hostname="smtp.example.com.") == []
    tld = ca.issue("*.org", kind="ecdsa", tag="h3")  # (clients take no wildcard of one label)
    assert len(warned(tld, hostname="example.org")) == 1


def test_a_certificate_named_in_its_common_name_only_is_warned_of(tmp_path: Path, caplog):
    """No subjectAltName: clients no longer read the common name (an attacker's pass: it was
    served as the host name's, with no word at start, and `mailerd dns --check` said only
    OpenSSL's "Hostname mismatch")."""
    cert, key = tmp_path / "cn.crt", tmp_path / "cn.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3",
         "-subj", "/CN=mx.example.org"], check=True, capture_output=True,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
        assert tls.server_context([(cert, key)], "mx.example.org") is not None
    warned = [r.getMessage() for r in caplog.records if "common name only" in r.getMessage()]
    assert len(warned) == 1 and str(cert) in warned[0], warned


def test_an_expiring_or_doubled_certificate_is_warned_of(ca, caplog):
    """Found by a tester: an expired certificate, or one given twice, started without a word.
    mailerd still serves an expired one (servers that do not check keep delivering), but says
    so at start and at each reload."""
    soon = ca.issue("mx.example.org", days=3, tag="soon")
    fresh = ca.issue("mx.example.org", kind="ecdsa", tag="fresh")
    with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
        context = tls.server_context([(soon.cert, soon.key), (fresh.cert, fresh.key)])
    assert context is not None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith(f"certificate {soon.cert} expires on ")
    assert "in 3 day(s): is its renewal working?" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
        tls.server_context([(fresh.cert, fresh.key), (fresh.cert, fresh.key)])
    assert [r.getMessage() for r in caplog.records] == [
        f"certificate {fresh.cert} with key {fresh.key} is given twice: once is enough"
    ]
    # An old and a renewed certificate (same names, same key type) both listed: the context
    # holds the last one only (found by a tester: no warning, and the first never served).
    renewed = ca.issue("mx.example.org", kind="ecdsa", tag="renewed")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
        context = tls.server_context([(fresh.cert, fresh.key), (renewed.cert, renewed.key)])
    assert [r.getMessage() for r in caplog.records] == [
        f"certificate {fresh.cert} is never presented: {renewed.cert}, for the same names and "
        "of the same key type, replaces it (give one certificate of each key type for a set of "
        "names)"
    ]
    unchecked = ssl.create_default_context(cafile=str(ca.cert))
    unchecked.check_hostname = False
    assert context is not None
    assert handshake(context, unchecked, "mx.example.org") == der(renewed.cert)


def test_an_expired_or_future_certificate_is_warned_of(caplog):
    dates = {"notBefore": "Jan  1 00:00:00 2020 GMT", "notAfter": "Jan  1 00:00:00 2021 GMT"}
    now = ssl.cert_time_to_seconds("Jun  1 00:00:00 2021 GMT")
    with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
        tls._warn_of_dates(Path("old.crt"), dates, now)
        tls._warn_of_dates(Path("new.crt"), dates, now - 3 * 365 * 86400)
    assert [r.getMessage() for r in caplog.records] == [
        "certificate old.crt expired on 2021-01-01 00:00 UTC: mail programs refuse it, and so "
        "do servers that check (DANE, MTA-STS); renew it (certbot renew) and reload",
        "certificate new.crt is not valid before 2020-01-01 00:00 UTC (is this machine's clock "
        "right?)",
    ]


def test_the_context_speaks_tls_12_and_13_only(ca):
    pair = ca.issue("mx.example.org", tag="versions")
    context = tls.server_context([(pair.cert, pair.key)])
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_TICKET
    assert context.options & ssl.OP_NO_RENEGOTIATION
    names = {c["name"] for c in context.get_ciphers()}
    assert not any("CBC" in n or "RC4" in n or n.startswith(("AES", "DHE")) for n in names), names
    assert tls.server_context([]) is None


def tls12_client(offer: str) -> ssl.SSLContext:
    """A TLS 1.2 client offering the suites of `offer`, in its order, that checks nothing."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(offer)
    return client


def tls12_session(
    context: ssl.SSLContext, offer: str, name: str | None = None
) -> tuple[str, bytes | None]:
    """The TLS 1.2 suite a client offering `offer` (in its order, asking for `name`) gets, and
    the certificate it is presented (DER)."""
    a, b = socket.socketpair()
    with a, b:
        server = threading.Thread(target=_serve, args=(context, a))
        server.start()
        with tls12_client(offer).wrap_socket(b, server_hostname=name) as conn:
            suite, cert = conn.cipher(), conn.getpeercert(binary_form=True)
        server.join(10)
    assert suite is not None
    return suite[0], cert


def negotiated(context: ssl.SSLContext, offer: str) -> str:
    """The TLS 1.2 suite a client offering `offer` (in its order) gets."""
    return tls12_session(context, offer)[0]


def test_the_server_order_decides_except_for_a_client_that_puts_chacha_first(ca):
    pair = ca.issue("mx.example.org", tag="order")
    context = tls.server_context([(pair.cert, pair.key)])
    assert context is not None
    aes128, aes256 = "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384"
    chacha = "ECDHE-RSA-CHACHA20-POLY1305"
    assert negotiated(context, f"{aes256}:{aes128}") == aes128  # testssl: a server order
    assert negotiated(context, f"{aes256}:{chacha}") == aes256
    assert negotiated(context, f"{chacha}:{aes256}:{aes128}") == chacha  # no AES instructions


def test_describe_as_postfix_writes_it(ca):
    pair = ca.issue("mx.example.org", tag="describe")
    context = tls.server_context([(pair.cert, pair.key)])
    assert context is not None
    a, b = socket.socketpair()
    client = ssl.create_default_context(cafile=str(ca.cert))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with a, b:
        server = threading.Thread(target=_serve, args=(context, a))
        server.start()
        with client.wrap_socket(b, server_hostname="mx.example.org") as conn:
            name, _, bits = conn.cipher()
            assert tls.describe(conn) == f"TLSv1.2 with cipher {name} ({bits}/{bits} bits)"
        server.join(10)
    assert tls.describe(None) is None


# --- the passwd file ------------------------------------------------------------------------


def test_passwords_round_trip_and_the_file_is_not_for_everyone(tmp_path: Path):
    path = tmp_path / "etc" / "passwd"
    credentials.write(str(path), {"alice": credentials.hash_password("s3cret")})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert "s3cret" not in path.read_text() and path.read_text().startswith("alice:$argon2id$")
    table = credentials.Credentials.load(str(path))
    domains = ("example.org",)
    assert table.verify("alice", "s3cret", domains) == "alice"
    assert table.verify("Alice@mail.example.org", "s3cret", domains) == "alice"
    assert table.verify("alice", "wrong", domains) is None
    assert table.verify("alice@remote.example", "s3cret", domains) is None
    assert table.verify("bob", "s3cret", domains) is None  # unknown: the same cost, no error
    assert credentials.Credentials.load(str(tmp_path / "missing")).hashes == {}


def test_the_passwd_file_is_replaced_whatever_the_umask_or_debris_of_a_crash(tmp_path: Path):
    """A tight umask does not narrow the file to 0600 (group `mail` reads it), and a temporary
    file an earlier run of the same pid left, or a link planted there, does not stop the write
    (it was FileExistsError) and is not followed."""
    path = tmp_path / "passwd"
    outside = tmp_path / "outside"
    outside.write_text("untouched\n")
    (tmp_path / f"passwd.tmp{os.getpid()}").symlink_to(outside)
    old = os.umask(0o077)
    try:
        credentials.write(str(path), {"alice": credentials.hash_password("x")})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert outside.read_text() == "untouched\n" and not path.is_symlink()
    assert list(credentials.Credentials.load(str(path)).hashes) == ["alice"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "passwd"]


def test_an_unknown_name_is_checked_against_a_hash_of_the_files_own_parameters(tmp_path: Path):
    """So that its check costs what a user's does: with a file written with other parameters
    than ours, a dummy of our own made unknown names slower than users (found by an
    attacker's pass: 0.62 s against 0.51 s, ranges apart)."""
    import argon2

    light = argon2.PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    path = tmp_path / "passwd"
    hashes = {
        "eve": light.hash("e"),
        "dan": light.hash("d"),
        "alice": credentials.hash_password("a"),
    }
    credentials.write(str(path), hashes)
    table = credentials.Credentials.load(str(path))
    assert table.decoy in (hashes["eve"], hashes["dan"])  # (the parameters most have)
    assert table.verify("nobody", "e", ("example.org",)) is None
    assert table.verify("nobody", "d", ("example.org",)) is None  # (another's password too)
    assert credentials.Credentials().decoy.startswith("$argon2id$v=19$m=65536,t=3,p=4$")


@pytest.mark.parametrize("line", ["alice", "alice:secret", "../x:$argon2id$v=19$m=1,t=1,p=1$a$b"])
def test_a_broken_passwd_line_is_refused(tmp_path: Path, line: str):
    path = tmp_path / "passwd"
    path.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(credentials.CredentialsError, match="line 3"):
        credentials.Credentials.load(str(path))


def test_the_hash_parameters_are_rfc_9106s():
    hashed = credentials.hash_password("x")
    assert "$m=65536,t=3,p=4$" in hashed


# --- failed AUTH, shared --------------------------------------------------------------------


def test_the_delay_doubles_per_failure_up_to_ten_seconds():
    table = AuthFailures(256)
    delays = []
    for _ in range(7):
        delays.append(table.delay("192.0.2.1", now=100.0))
        table.failed("192.0.2.1", now=100.0)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert table.delay("192.0.2.2", now=100.0) == 0.5  # another address


def test_failures_are_forgotten_after_a_quiet_while_not_after_a_login():
    table = AuthFailures(256)
    table.failed("192.0.2.1", "bob", now=0.0)
    table.failed("192.0.2.1", "bob", now=1.0)
    # a login from the address forgets nothing: the guesser may have an account of its own
    table.succeeded("192.0.2.1", "mallory", now=1.5)
    assert table.delay("192.0.2.1", now=2.0) == 2.0
    assert table.account_failures("bob", now=2.0) == 2
    assert table.delay("192.0.2.1", now=1.0 + 901) == 0.5


def test_an_address_that_failed_too_often_is_locked_out_until_forgotten():
    table = AuthFailures(256)
    for n in range(authfailures.LOCKOUT):
        assert not table.locked("192.0.2.1", now=float(n))
        table.failed("192.0.2.1", now=float(n))
    assert table.locked("192.0.2.1", now=20.0)
    assert not table.locked("192.0.2.2", now=20.0)
    assert not table.locked("192.0.2.1", now=authfailures.LOCKOUT + authfailures.FORGET)


def _logins_run(body, *, limit=8, per_client=2, verify=None):
    """`body(logins, calls)` in an event loop, with checks that take 0.05 s and say `alice`
    for the password `right`."""
    calls: list[tuple[str, str]] = []

    def check(login: str, password: str) -> str | None:
        calls.append((login, password))
        time.sleep(0.05)
        return "alice" if password == "right" else None

    async def main():
        with ThreadPoolExecutor(2) as threads:
            logins = Logins(
                threads, verify or check, AuthFailures(256), limit=limit, per_client=per_client
            )
            return await body(logins, calls)

    return asyncio.run(main())


def test_the_same_login_from_several_sessions_is_checked_once():
    async def body(logins, calls):
        first = logins.start("192.0.2.1", "alice", "right", lambda: False)
        second = logins.start("192.0.2.1", "alice", "right", lambda: False)
        assert second is first
        assert await first == "alice"
        return calls

    assert _logins_run(body) == [("alice", "right")]


def test_checks_waiting_are_bounded_per_client_and_in_all():
    async def body(logins, calls):
        gone = lambda: False  # noqa: E731
        a = logins.start("192.0.2.1", "alice", "one", gone)
        assert logins.start("192.0.2.1", "alice", "two", gone) is Unchecked.BUSY
        assert logins.start("2001:db8:1:2::1", "alice", "three", gone) is not Unchecked.BUSY
        assert logins.start("2001:db8:1:2::99", "bob", "x", gone) is Unchecked.BUSY  # one /64
        assert logins.start("192.0.2.3", "carol", "y", gone) is not Unchecked.BUSY
        assert logins.start("192.0.2.4", "dave", "z", gone) is Unchecked.CROWDED  # three in all
        assert await a is None
        await asyncio.sleep(0.2)
        assert logins.start("192.0.2.1", "alice", "two", gone) is not Unchecked.BUSY

    _logins_run(body, limit=3, per_client=1)


def test_a_check_whose_client_left_is_not_made_and_a_locked_address_not_checked():
    async def body(logins, calls):
        assert await logins.start("192.0.2.1", "alice", "right", lambda: True) is Unchecked.LEFT
        for _ in range(authfailures.LOCKOUT):
            logins.failures.failed("192.0.2.9")
        assert logins.start("192.0.2.9", "alice", "right", lambda: False) is Unchecked.LOCKED
        return calls

    assert _logins_run(body) == []


def test_a_locked_or_failing_address_gets_no_verdict_from_a_check_in_flight_or_memory():
    async def body(logins, calls):
        first = logins.start("192.0.2.1", "alice", "right", lambda: False)
        for _ in range(authfailures.LOCKOUT):
            logins.failures.failed("192.0.2.9")
        # (the same login in flight for another address: no verdict for a locked one)
        assert logins.start("192.0.2.9", "alice", "right", lambda: False) is Unchecked.LOCKED
        assert logins.suspect("192.0.2.1")  # (a check waiting)
        assert await first == "alice"
        await asyncio.sleep(0.05)
        assert not logins.suspect("192.0.2.1")
        logins.failures.failed("192.0.2.1")
        assert logins.suspect("192.0.2.1")  # (a failure lately)

    _logins_run(body)


def test_a_client_is_gone_when_reset_not_when_it_half_closes():
    """`Connection.gone` (asked from a check thread, reading paused): a client that shut
    down its sending side after QUIT still reads its answers; one that reset is gone; in TLS,
    one that closed its side is gone, even behind bytes not read yet (its close_notify)."""
    from mailerd.worker.connection import Connection

    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def get_extra_info(self, name: str) -> object:
            return self.sock if name == "socket" else None

    def conn_over(sock: socket.socket, tls: bool = False) -> Connection:
        conn = Connection.__new__(Connection)
        conn.closing, conn.transport = False, Transport(sock)  # type: ignore[assignment]
        conn.layer = object() if tls else None  # type: ignore[assignment]
        return conn

    server, client = socket.socketpair()
    with server, client:
        conn = conn_over(server)
        assert not conn.gone()
        client.sendall(b"QUIT\r\n")
        assert server.recv(6) == b"QUIT\r\n"  # (read by the event loop before its pause)
        client.shutdown(socket.SHUT_WR)
        assert not conn.gone(), "a half-closed client was taken for gone"
        assert conn_over(server, tls=True).gone(), "a TLS client that left is not gone"
    server, client = socket.socketpair()
    with server, client:
        client.sendall(b"\x17\x03\x03\x00\x13")  # (a record not read yet: a close_notify)
        assert not conn_over(server, tls=True).gone(), "a TLS client still there is gone"
        client.shutdown(socket.SHUT_WR)
        assert conn_over(server, tls=True).gone(), "a TLS client that left is not gone"
        assert not conn_over(server).gone(), "(in plain text, a half-close is not leaving)"
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        peer = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with accepted:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # (a reset)
            time.sleep(0.05)
            assert conn_over(accepted).gone()


def test_a_broken_check_is_unchecked_not_a_wrong_password():
    def broken(login: str, password: str) -> str | None:
        raise OSError("no passwd file")

    async def body(logins, calls):
        return await logins.start("192.0.2.1", "alice", "right", lambda: False)

    assert _logins_run(body, verify=broken) is Unchecked.BROKEN


def test_addresses_sharing_a_bucket_count_apart():
    """Failures sprayed from other addresses never slow down or lock out an innocent one in
    the same bucket (here: one bucket for all)."""
    table = AuthFailures(1)
    for _ in range(authfailures.LOCKOUT):
        table.failed("192.0.2.1", now=1.0)
    assert table.locked("192.0.2.1", now=2.0)
    assert not table.locked("192.0.2.2", now=2.0) and table.delay("192.0.2.2", now=2.0) == 0.5
    table.failed("192.0.2.2", now=3.0)  # (it takes the bucket over)
    assert table.delay("192.0.2.2", now=4.0) == 1.0


def test_an_ipv6_address_counts_by_its_64():
    table = AuthFailures(256)
    table.failed("2001:db8:1:2::1", now=0.0)
    table.failed("2001:db8:1:2:ffff::9", now=0.0)
    assert table.delay("2001:db8:1:2::77", now=1.0) == 2.0
    assert table.delay("2001:db8:1:3::1", now=1.0) == 0.5


def test_an_ipv6_address_counts_by_the_configured_prefix():
    table = AuthFailures(256, ipv6_prefix_length=48)
    table.failed("2001:db8:1:2::1", now=0.0)
    assert table.delay("2001:db8:1:ffff::9", now=1.0) == 1.0  # (the same /48)
    assert table.delay("2001:db8:2::1", now=1.0) == 0.5


def test_an_ipv4_mapped_address_counts_as_its_ipv4_address():
    table = AuthFailures(256)
    table.failed("::ffff:192.0.2.9", now=1.0)
    assert table.delay("192.0.2.9", now=2.0) == 1.0


def test_an_account_sprayed_from_many_addresses_is_checked_only_where_it_logged_in():
    """A guesser with a new address for each guess never meets an address's lockout; its
    failures count for the account too, and past ACCOUNT_LOCKOUT the account is checked
    only from an address it logged in from lately."""
    table = AuthFailures(1024)
    table.succeeded("192.0.2.50", "alice", now=0.0)
    table.succeeded("2001:db8:5:5::1", "Alice@example.org", now=0.0)
    logins = ["alice", "ALICE@example.org", "alice+x@example.net"]  # (one account)
    for n in range(authfailures.ACCOUNT_LOCKOUT):
        assert not table.account_locked("203.0.113.1", "alice", now=10.0)
        table.failed(f"198.51.100.{n}", logins[n % 3], now=10.0)
    assert table.account_failures("alice", now=11.0) == authfailures.ACCOUNT_LOCKOUT
    assert table.account_locked("203.0.113.1", "alice", now=11.0)
    assert not table.locked("203.0.113.1", now=11.0)  # (no address failed often)
    assert not table.account_locked("192.0.2.50", "alice@example.org", now=11.0)
    assert not table.account_locked("2001:db8:5:5::99", "alice", now=11.0)  # (its /64)
    bob = _apart("bob", "alice", authfailures.ACCOUNT_BUCKETS)  # (pooled: not alice's bucket)
    assert not table.account_locked("203.0.113.1", bob, now=11.0)
    later = 10.0 + authfailures.FORGET
    assert not table.account_locked("203.0.113.1", "alice", now=later)
    gone = authfailures.KNOWN_FOR + 1.0  # (an address is known for a while, not for ever)
    table.failed("198.51.100.1", "alice", now=gone)
    assert not table.known("192.0.2.50", "alice", now=gone)


def test_an_address_any_account_logged_in_from_is_a_known_client_for_a_while():
    """What the session caps ask at connect (a part of the submission listeners' places is
    kept for known clients): a success makes its address known, for KNOWN_FOR; failures from
    it do not, nor does asking."""
    table = AuthFailures(256)
    assert not table.known_client("192.0.2.50", now=0.0)  # (asking writes nothing)
    for _ in range(authfailures.LOCKOUT):
        table.failed("192.0.2.50", "alice", now=1.0)
    assert not table.known_client("192.0.2.50", now=2.0)
    table.succeeded("192.0.2.60", "Alice@example.org", now=2.0)
    table.succeeded("2001:db8:5:5::1", "bob", now=2.0)
    assert table.known_client("192.0.2.60", now=3.0)
    assert table.known_client("::ffff:192.0.2.60", now=3.0)  # (its IPv4 address)
    assert table.known_client("2001:db8:5:5:ffff::9", now=3.0)  # (its /64)
    assert not table.known_client("2001:db8:5:6::1", now=3.0)
    assert not table.known_client("192.0.2.61", now=3.0)
    assert table.known_client("192.0.2.60", now=2.0 + authfailures.KNOWN_FOR - 1)
    assert not table.known_client("192.0.2.60", now=2.0 + authfailures.KNOWN_FOR)
    table.succeeded("192.0.2.60", "alice", now=authfailures.KNOWN_FOR)  # (each login renews)
    assert table.known_client("192.0.2.60", now=2.0 + authfailures.KNOWN_FOR)


def test_addresses_sprayed_at_the_server_never_make_a_known_client_unknown():
    """Connections, failures and guessed accounts from many addresses write nothing in the
    known clients' table, whose cells only a login takes over (here: one bucket for all)."""
    table = AuthFailures(1, account_buckets=1, known_buckets=1, client_buckets=1)
    table.succeeded("192.0.2.50", "alice", now=0.0)
    for n in range(2000):
        source = f"198.51.{n // 250}.{n % 250}"
        assert not table.known_client(source, now=1.0)
        table.failed(source, "alice" if n % 2 else f"guess{n}", now=1.0)
    assert table.known_client("192.0.2.50", now=2.0)


def _apart(name: str, other: str, buckets: int, key: Callable[[str], str] = str) -> str:
    """`name`, or `name` with a number, whose key falls in another of `buckets` than `other`
    (Python seeds its string hash at random at each start: in 1 run of `buckets`, two given
    names would share a bucket, and a pooled one counts them together)."""
    for n in range(100):
        candidate = f"{name}{n or ''}"
        if hash(key(candidate)) % buckets != hash(other) % buckets:
            return candidate
    raise AssertionError("no name apart")


def _slash48(n: int) -> str:
    """The n-th /64 of one /48 (an attacker's 65,536 clients)."""
    return f"2001:db8:7:{n:x}::1"


def test_one_account_from_a_whole_48_cannot_push_out_where_another_logged_in():
    """A stolen password, used from thousands of addresses: past NEW_CLIENTS_A_DAY new known
    clients a day its logins make none, so they cannot take over the cell of the owner's
    laptop (here: one cell for all known clients, so that any new one would); nor the cell
    that lets her in when her account is locked (one cell for all accounts' addresses)."""
    table = AuthFailures(256, client_buckets=1, known_buckets=1, newcomer_buckets=65536)
    cap = authfailures.NEW_CLIENTS_A_DAY
    for n in range(cap):
        table.succeeded(_slash48(n), "mallory", now=10.0)
    alice = _apart("alice", "mallory 0", 65536, key=lambda name: f"{name} 0")  # (its own count)
    table.succeeded("192.0.2.50", alice, now=20.0)
    assert table.known_client("192.0.2.50", now=20.0)
    for n in range(cap, 4096):
        table.succeeded(_slash48(n), "mallory", now=30.0)
        assert not table.known(_slash48(n), "mallory", now=30.0)
    assert table.known_client("192.0.2.50", now=40.0)
    assert table.known("192.0.2.50", alice, now=40.0)
    assert not table.known_client(_slash48(4095), now=40.0)


def test_an_accounts_new_known_clients_are_capped_per_day_and_the_cap_starts_again():
    """Past NEW_CLIENTS_A_DAY new addresses in a day, a login from another makes it no known
    client, nor one of the account's addresses; the next day's may again, and a login from an
    address another account made known costs nothing."""
    table = AuthFailures(256)
    cap = authfailures.NEW_CLIENTS_A_DAY
    for day in range(3):
        now = day * authfailures.DAY + 10.0
        for n in range(cap):
            table.succeeded(_slash48(day * 100 + n), "Alice@example.org", now=now)
            assert table.known_client(_slash48(day * 100 + n), now=now)
        further = _slash48(day * 100 + cap)
        table.succeeded(further, "alice", now=now)
        assert not table.known_client(further, now=now)
        assert not table.known(further, "alice", now=now)
        table.succeeded(_slash48(day * 100), "bob", now=now)  # (alice's: known, no new one)
        assert table.known(_slash48(day * 100), "bob", now=now)
    later = 3 * authfailures.DAY
    table.succeeded(further, "alice", now=later)  # (a login on a later day makes it known)
    assert table.known_client(further, now=later)


def test_a_phone_given_a_new_address_every_20_hours_stays_a_known_client():
    """A count sliding over the last 24 hours, renewed by each new address, would never end for
    a phone given one more often than that; the count is the day's."""
    table = AuthFailures(256)
    for n in range(3 * authfailures.NEW_CLIENTS_A_DAY):
        now = n * 20 * 3600.0
        table.succeeded(_slash48(n), "alice", now=now)
        assert table.known_client(_slash48(n), now=now)


def test_a_login_from_an_address_already_known_is_not_counted_as_a_new_one():
    """Refreshing a known client, however often, leaves the account its day's new ones; and
    past the cap, it still refreshes."""
    table = AuthFailures(256)
    half = authfailures.NEW_CLIENTS_A_DAY // 2
    for n in range(half):
        table.succeeded(_slash48(n), "alice", now=10.0)
    for _ in range(10):
        for n in range(half):
            table.succeeded(_slash48(n), "alice", now=20.0)
    for n in range(half, authfailures.NEW_CLIENTS_A_DAY):
        table.succeeded(_slash48(n), "alice", now=30.0)
        assert table.known_client(_slash48(n), now=30.0)
    table.succeeded(_slash48(99), "alice", now=40.0)
    assert not table.known_client(_slash48(99), now=40.0)  # (the day's are spent)
    table.succeeded(_slash48(0), "alice", now=50.0)
    assert table.known_client(_slash48(0), now=50.0 + authfailures.KNOWN_FOR - 1)


def test_a_name_sharing_a_locked_accounts_bucket_adds_to_it_never_starts_it_again():
    """Found by an attacker's pass: with names taking cells over, as addresses do, one
    failure of a name in alice's bucket (found by trying names until her lock lifted) started
    her count again, for 100 guesses more each time. Here one bucket holds every name."""
    table = AuthFailures(256, account_buckets=1)
    for n in range(authfailures.ACCOUNT_LOCKOUT):
        table.failed(f"198.51.100.{n}", "alice", now=1.0)
    table.failed("203.0.113.9", "zq5612", now=2.0)
    assert table.account_locked("203.0.113.1", "alice", now=3.0)
    assert table.account_failures("alice", now=3.0) == authfailures.ACCOUNT_LOCKOUT + 1


def test_the_reserve_takes_one_check_an_account():
    """Found by an attacker's pass: an account holder, from addresses it had logged in from,
    flooded correct logins of its own (variants of its name, each a check) and took every
    RESERVE place; another user at her own address then got 454."""

    async def body(logins, calls):
        gone = lambda: False  # noqa: E731
        for n in range(3):
            logins.failures.succeeded(f"192.0.2.{n}", "mallory")
        logins.failures.succeeded("192.0.2.50", "alice")
        spray = logins.start("203.0.113.7", "bob", "guess", gone)  # (the limit: 1)
        first = logins.start("192.0.2.0", "mallory+a", "right", gone)  # (a reserve place)
        assert logins.start("192.0.2.1", "mallory+b", "right", gone) is Unchecked.CROWDED
        assert await logins.start("192.0.2.50", "alice", "right", gone) == "alice"
        assert await first == "alice" and await spray is None  # (the fake check's answers)
        return calls

    assert sorted(_logins_run(body, limit=1)) == [
        ("alice", "right"),
        ("bob", "guess"),
        ("mallory+a", "right"),
    ]


def test_a_locked_account_is_not_checked_from_elsewhere_and_known_addresses_keep_room():
    async def body(logins, calls):
        gone = lambda: False  # noqa: E731
        logins.failures.succeeded("192.0.2.50", "alice")
        for n in range(authfailures.ACCOUNT_LOCKOUT):
            logins.failures.failed(f"198.51.100.{n}", "alice")
        assert logins.start("203.0.113.1", "alice", "guess", gone) is Unchecked.ACCOUNT_LOCKED
        # Checks from a spray fill the worker (limit 1 here); alice's own address still
        # gets hers checked (RESERVE), another user's from a new address waits its turn.
        spray = logins.start("203.0.113.7", "bob", "guess", gone)
        assert logins.start("203.0.113.8", "carol", "guess", gone) is Unchecked.CROWDED
        assert await logins.start("192.0.2.50", "alice", "right", gone) == "alice"
        assert await spray is None
        return calls

    assert _logins_run(body, limit=1) == [
        ("bob", "guess"),
        ("alice", "right"),
    ]


def test_a_forked_worker_sees_the_others_failures():
    table = AuthFailures(256)
    pid = os.fork()
    if pid == 0:
        table.failed("198.51.100.7", now=5.0)
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.delay("198.51.100.7", now=6.0) == 1.0


# --- whose addresses ----------------------------------------------------------------------


ALIASES = "team: alice, bob\nsales: alice\nother: bob\nchain: sales\n"


@pytest.mark.parametrize(
    "sender, owned",
    [
        ("alice@example.org", True),
        ("Alice@Mail.Example.Org", True),  # any local domain, any case
        ("alice+lists@example.org", True),
        ("sales@example.org", True),
        ("chain@example.org", True),  # an alias of an alias of alice
        ("team@example.org", True),  # a group alice is in
        ("sales+x@example.org", True),
        ("other@example.org", False),
        ("bob@example.org", False),
        ("alice@remote.example", False),
        ("alicex@example.org", False),
        ("alice%remote.example@example.org", False),
        ("postmaster@example.org", False),
    ],
)
def test_sender_owned(tmp_path: Path, sender: str, owned: bool):
    path = tmp_path / "aliases"
    path.write_text(ALIASES)
    table = Aliases.load(str(path), Locality(("example.org",)))
    local, _, domain = sender.rpartition("@")
    result = policy.sender_owned(
        Address(local, domain, False), "alice", local_domains=("example.org",), aliases=table
    )
    assert result is owned


@pytest.mark.parametrize(
    "sender, user, owned",
    [
        ("alice@example.org", "alice", True),
        ("alice@example.org", "carol", False),  # (a copy of alice's mail is not her address)
        ("alice+x@example.org", "carol", False),
        ("desk@example.org", "carol", True),  # (an alias named after nobody: a group's)
        ("desk@example.org", "alice", True),
    ],
)
def test_an_alias_named_after_a_user_is_that_users_alone(
    tmp_path: Path, sender: str, user: str, owned: bool
):
    """`alice: alice, carol` gives carol a copy of alice's mail, not the right to send as
    alice (found by an attacker's pass: any member of such an alias owned alice@)."""
    path = tmp_path / "aliases"
    path.write_text("alice: alice, carol\ndesk: alice, carol\n")
    table = Aliases.load(str(path), Locality(("example.org",)))
    local, _, domain = sender.rpartition("@")
    result = policy.sender_owned(
        Address(local, domain, False), user, local_domains=("example.org",), aliases=table
    )
    assert result is owned


@pytest.mark.parametrize(
    "field, authors",
    [
        ("Alice <alice@example.org>", [("alice", "example.org")]),
        ('alice@example.org, "B" <sales@B\u00fccher.example>',
         [("alice", "example.org"), ("sales", "xn--bcher-kva.example")]),  # in normal form
        ("=?utf-8?q?Al=C3=AFce?= <al\u00efce@example.org>", [("al\u00efce", "example.org")]),
        ('"bob@example.org" <alice@example.org>', [("alice", "example.org")]),
        ("x@evil <alice@example.org>", None),  # a defect: readers differ on the author
        ("Alice B. Smith <alice@example.org>", [("alice", "example.org")]),  # obs-phrase
        ('"=?utf-8?q?J=C3=B6rg?=" <alice@example.org>', [("alice", "example.org")]),
        ("=?x-unknown?q?Alice?= <alice@example.org>", [("alice", "example.org")]),
        ('"bob@example.org": alice@example.org;', None),  # a named group: its name may show
        ("alice@[ ", None),  # the parser's UnboundLocalError: not read
        ("alice@=?utf-8?q?x=3Cbob=40example.org=3E.example.org?=", None),  # no DNS name
        ("bob@example.org\u00a0Bob", None),  # read as bob@example.orgbob by the parser
        ('"Bob <bob@example.org>" <alice@example.org>', None),  # an older parser's Bob
        ('"Alice <alice@example.org>" <alice@example.org>', [("alice", "example.org")]),
        ('"Sales <sales>" <alice@example.org>', [("alice", "example.org")]),
        ("bob@example.org\ufeffBob", None),  # U+FEFF: white space to JavaScript's readers
        ('"Bob\r\n <bob@example.org>" <alice@example.org>', None),
        ("alice", None),  # no domain
        ("undisclosed:;", None),
        ("<@route.example:alice@example.org>", None),
        ("a" * 2000 + "@example.org", None),  # past STRICT_MAX
    ],
)  # fmt: skip
def test_from_addresses(field: str, authors):
    message = f"Subject: x\r\nFrom: {field}\r\n\r\nbody\r\n".encode()
    assert headers.from_addresses(message) == authors
    assert headers.from_addresses(b"Subject: none\r\n\r\n") == []
    assert headers.from_addresses(b"From: a@example.org\r\nFrom: a@example.org\r\n\r\n") is None


@pytest.mark.parametrize(
    "name", [b"From\xa0", b"\xa0from", b"FROM\xc2\xa0", b"From \t", b"From\r\n ", b"From \r\n\t"]
)
def test_a_field_a_reader_may_take_for_from_counts_as_one(name: bytes):
    """`From\xa0:` is no From: field to Python or dkimpy, but Node's mail parsers trim the
    no-break space and show its address (an attacker's pass hid another user there)."""
    message = b"From: alice@example.org\r\n" + name + b": bob@evil.example\r\n\r\nhi\r\n"
    assert headers.from_addresses(message) is None
    assert headers.from_domains(message) == ["example.org", "evil.example"]
    continued = b"From: alice@example.org\r\nX: y\r\n From: bob@evil.example\r\n\r\n"
    assert headers.from_addresses(continued) == [("alice", "example.org")]
    # A line begun by other white space continues the field for some readers (mailauth).
    for space in (b"\x0c", b"\x0b", b"\xa0", b"\xc2\xa0"):
        folded = b"From: alice@example.org\r\n" + space + b"bob@evil.example\r\n\r\nhi\r\n"
        assert headers.from_addresses(folded) is None
        assert headers.from_domains(folded) == ["example.org", "evil.example"]


def test_the_readings_of_port_25_and_of_the_signer():
    """A no-break space ends an address for readers; the strict parser read past it, to
    another domain (bank.examplex). A display name's defects leave a From: signable."""
    assert headers.from_domains(b"From: ceo@bank.example\xc2\xa0x\r\n\r\n") == ["bank.example"]
    assert headers.from_domains("From: ceo@bank.example\ufeffx\r\n\r\n".encode()) == [
        "bank.example"
    ]
    assert headers.from_domain(b"From: Dr. Alice <a@example.org>\r\n\r\n") == "example.org"


@pytest.mark.parametrize(
    "authors, refused",
    [
        ([], None),
        ([("alice", "example.org"), ("Sales", "MAIL.example.org")], None),
        ([("alice", "example.org"), ("bob", "example.org")], "address"),
        ([("alice", "remote.example")], None),  # another domain's own policy decides
        ([("alice", "remote.example"), ("bob", "mail.example.org")], "address"),
        ([("ceo", "parent.example")], "address"),  # aligned with lists.parent.example
        ([("postmaster", "example.org")], "address"),
        (None, "header"),
    ],
)
def test_author_refusal(tmp_path: Path, authors, refused):
    path = tmp_path / "aliases"
    path.write_text(ALIASES)
    domains = ("example.org",)
    table = Aliases.load(str(path), Locality(domains))
    reply = policy.author_refusal(
        authors,
        "alice",
        local_domains=domains,
        aliases=table,
        aligned=lambda domain: domain.endswith("parent.example"),
    )
    if refused is None:
        assert reply is None
    else:
        assert reply is not None and (reply.code, reply.status) == (550, "5.7.1")
        assert reply.text.startswith(f"From: {refused} rejected")


def test_recent_logins_keep_successes_for_a_while_and_no_password():
    recent = credentials.RecentLogins(ttl=60.0, size=2)
    recent.add("alice", "s3cret", "alice", now=0.0)
    assert recent.get("alice", "s3cret", now=59.0) == "alice"
    assert recent.get("alice", "wrong", now=1.0) is None
    assert recent.get("alice", "s3cret", now=61.0) is None  # expired
    assert b"s3cret" not in repr(recent._seen).encode()
    recent.add("bob", "x", "bob", now=0.0)
    recent.add("carol", "y", "carol", now=0.0)  # the oldest goes: at most `size`
    assert recent.get("alice", "s3cret", now=1.0) is None
    assert recent.get("carol", "y", now=1.0) == "carol"


def test_groups_that_cannot_be_limited_are_warned_of_and_tls_still_works(ca, monkeypatch, caplog):
    """Where OpenSSL cannot be reached for the groups (another Python build), the listeners
    still speak TLS, and the operator is told what is not limited."""
    pair = ca.issue("mx.example.org", tag="groups")

    def no_libssl() -> None:
        raise OSError("libssl: 0 loaded")

    monkeypatch.setattr(tls, "_libssl", no_libssl)
    with caplog.at_level(logging.WARNING, logger="mailerd.tls"):
        context = tls.server_context([(pair.cert, pair.key)])
    assert context is not None
    assert "cannot limit the key-exchange groups to X25519:X448:P-256:P-521:P-384" in caplog.text
    client = ssl.create_default_context(cafile=str(ca.cert))
    assert handshake(context, client, "mx.example.org") == der(pair.cert)

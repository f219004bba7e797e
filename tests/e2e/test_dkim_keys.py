"""DKIM keys (issue #15): `mailerd dkim keygen`, the keys mailerd refuses at start-up, and the
keys it re-reads on SIGHUP, seen in the signatures it puts on the mail it queues.

Loopback only. The signatures are looked at where mailerd leaves them: in the queued file
`<queue>/msg/<id>`, which already carries them (mail is signed once, when it is queued). The
mail goes to `stuck.test`, whose MX lookup fails (SERVFAIL from this module's own DNS server),
so it stays queued with `--retry-after 1h`. Signatures are verified with dkimpy against the
public key each test expects (its TXT record given straight to `dkim.verify`): proving which key
signed, not only that some key did.

Keys are made with the openssl command except in the keygen tests, so that the start-up and
reload tests do not depend on `mailerd dkim keygen`.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import smtplib
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dnsserver import DNSServer, Records

from .conftest import IO_TIMEOUT, Mailerd, run_mailerd, wait_until

STUCK = "stuck.test"  # SERVFAIL for every query: mail for it stays queued
ZONE = f'{STUCK}. TXT "dnsserver:servfail"\n'
START_WAIT = 20.0


# --------------------------------------------------------------------------------------------
# Keys and records
# --------------------------------------------------------------------------------------------


def openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=120)


def rsa_key(path: Path, bits: int = 2048) -> Path:
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{bits}", "-out", path)
    return path


def ed25519_key(path: Path) -> Path:
    openssl("genpkey", "-algorithm", "ed25519", "-out", path)
    return path


def public_record(path: Path) -> str:
    """The TXT record (one string) that publishes the public half of the PEM key at `path`:
    RSA as SubjectPublicKeyInfo (RFC 6376 3.6.1), Ed25519 as the raw 32 bytes (RFC 8463)."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    assert isinstance(key, ed25519.Ed25519PrivateKey), f"{path}: neither RSA nor Ed25519"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def p_of(record: str) -> str:
    tags = dict(
        (k.strip(), v.strip()) for k, _, v in (t.partition("=") for t in record.split(";")) if k
    )
    return re.sub(r"\s+", "", tags.get("p", ""))


# --------------------------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------------------------


def header_fields(message: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw field with its continuation lines, without the last CRLF)."""
    head = message.split(b"\r\n\r\n", 1)[0]
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
        else:
            fields.append((line.split(b":", 1)[0].strip().lower().decode("latin-1"), line))
    return fields


def signatures(message: bytes) -> list[dict[str, str]]:
    """The tags of every DKIM-Signature field, in order (whitespace removed from values)."""
    out = []
    for name, raw in header_fields(message):
        if name != "dkim-signature":
            continue
        value = raw.split(b":", 1)[1].decode("ascii")
        tags = {}
        for part in value.split(";"):
            if part.strip():
                k, _, v = part.partition("=")
                tags[k.strip()] = re.sub(r"\s+", "", v)
        out.append(tags)
    return out


def verifies(message: bytes, idx: int, record: str, expect_name: str) -> bool:
    """Does signature `idx` verify against `record` (dkimpy), asked for at `expect_name`?"""
    asked: list[str] = []

    def dnsfunc(name, timeout=5):
        name = name.decode() if isinstance(name, bytes) else name
        asked.append(name.rstrip(".").lower())
        return record.encode()

    try:
        ok = dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc)
    except dkim.DKIMException:  # (dkimpy raises on some failures, as dkim.verify hides)
        ok = False
    assert asked == [expect_name], f"dkimpy asked for {asked}, expected {expect_name}"
    return bool(ok)


# --------------------------------------------------------------------------------------------
# mailerd with keys, and the queue
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns_stuck() -> Iterator[DNSServer]:
    server = DNSServer(Records(ZONE))
    server.start()
    yield server
    server.stop()


def signer(mailerd_factory, dns: DNSServer, *extra: str, start: bool = True) -> Mailerd:
    args = ["--dns-server", f"{dns.host}:{dns.port}", "--retry-after", "1h", *extra]
    return mailerd_factory(start=start, extra=args, workers=1)


def message(sender: str = "alice@example.org", subject: str = "dkim") -> bytes:
    tag = f"{os.getpid()}.{time.monotonic_ns()}"
    return (
        f"From: Alice <{sender}>\r\nTo: <bob@{STUCK}>\r\nSubject: {subject}\r\n"
        f"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@example.org>\r\n"
        f"\r\nHello {tag}.\r\n"
    ).encode()


def queue_mail(m: Mailerd, body: bytes, sender: str = "alice@example.org") -> bytes:
    """Submit on the trusted listener for bob@stuck.test; the queued file's bytes."""
    with smtplib.SMTP("127.0.0.1", m.trusted_port, local_hostname="client.test",
                      timeout=IO_TIMEOUT) as s:  # fmt: skip
        s.ehlo("client.test")
        code, text = s.mail(sender)
        assert code == 250, (code, text)
        code, text = s.rcpt(f"bob@{STUCK}")
        assert code == 250, (code, text)
        code, text = s.data(body)
        assert code == 250, (code, text)
    reply = text.decode("utf-8", "replace")
    found = re.search(r"queued as ([0-9A-Z]+)", reply)
    assert found, f"no queue id in {reply!r}"
    path = m.queue / "msg" / found.group(1)
    assert wait_until(path.exists, 5), f"{path} is not in the queue\n{m.stderr_text()[-3000:]}"
    return path.read_bytes()


def exits_at_start(m: Mailerd) -> tuple[int, str]:
    m.start(wait=False)
    assert m.proc is not None
    try:
        rc = m.proc.wait(START_WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mailerd started anyway:\n{m.stderr_text()}")
    return rc, m.stderr_text()


# --------------------------------------------------------------------------------------------
# mailerd dkim keygen
# --------------------------------------------------------------------------------------------


def keygen(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    p = run_mailerd(["dkim", "keygen", *args], timeout=timeout)
    assert p.returncode is not None, f"`mailerd dkim keygen {' '.join(args)}` did not finish"
    return p


def record_line(stdout: str, domain: str, selector: str) -> tuple[str, list[str]]:
    """The one line `SELECTOR._domainkey.DOMAIN. IN TXT ( "..." ... )`: (line, strings)."""
    owner = f"{selector}._domainkey.{domain}."
    lines = [ln for ln in stdout.splitlines() if ln.split()[:1] == [owner]]
    assert len(lines) == 1, f"expected one line starting with {owner!r}:\n{stdout}"
    line = lines[0]
    shape = rf"^{re.escape(owner)}\s+IN\s+TXT\s+(?:\(\s*)?((?:\"[^\"\\]*\"\s*)+)\)?\s*$"
    found = re.match(shape, line)
    assert found, f'not `{owner} IN TXT ( "..." ... )`: {line!r}'
    if "(" in line or ")" in line:
        assert "(" in line and line.rstrip().endswith(")"), f"unbalanced parentheses: {line!r}"
    strings = re.findall(r'"([^"\\]*)"', found.group(1))
    # What a zone file makes of it (dnspython's reader, as the test DNS server uses it).
    rrset = Records(line).lookup(*_question(owner, "TXT")).answer
    assert rrset, f"the line does not parse as a TXT record: {line!r}"
    parsed = [s.decode() for s in next(iter(rrset[0])).strings]
    assert parsed == strings, (parsed, strings)
    return line, strings


def _question(name: str, rtype: str):
    import dns.name
    import dns.rdatatype

    return dns.name.from_text(name), dns.rdatatype.from_text(rtype)


def usage_line(stdout: str, domain: str, selector: str) -> Path:
    found = re.findall(rf"^\s*dkim-key\s*=\s*{re.escape(domain)}:{re.escape(selector)}:(\S+)\s*$",
                       stdout, re.MULTILINE)  # fmt: skip
    assert len(found) == 1, f"no line `dkim-key = {domain}:{selector}:PATH`:\n{stdout}"
    return Path(found[0])


def check_key_file(path: Path) -> None:
    st = path.stat()
    assert stat.S_ISREG(st.st_mode), path
    assert stat.S_IMODE(st.st_mode) == 0o600, f"{path}: mode {stat.S_IMODE(st.st_mode):o}"
    assert st.st_uid == 0, f"{path}: owner uid {st.st_uid}, expected root"
    assert path.read_bytes().startswith(b"-----BEGIN "), path.read_bytes()[:60]


def test_keygen_rsa(tmp_path: Path):
    """Default type RSA 2048; the file, its mode, the record (strings of at most 255 bytes
    joining to the key's public half) and the line to put in the config."""
    keydir = tmp_path / "dkim"
    p = keygen("--dir", str(keydir), "--selector", "s1", "example.org")
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    path = keydir / "example.org.s1.key"
    assert path.exists(), f"no {path}; the directory has {os.listdir(keydir)}"
    assert sorted(os.listdir(keydir)) == ["example.org.s1.key"], os.listdir(keydir)
    check_key_file(path)
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700, oct(keydir.stat().st_mode)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048, key
    _line, strings = record_line(p.stdout, "example.org", "s1")
    assert all(0 < len(s.encode()) <= 255 for s in strings), [len(s) for s in strings]
    joined = "".join(strings)
    assert joined.startswith("v=DKIM1;"), joined
    assert re.search(r"(^|;)\s*k=rsa\s*(;|$)", joined), joined
    assert p_of(joined) == p_of(public_record(path)), "p= is not the written key's public key"
    assert usage_line(p.stdout, "example.org", "s1").resolve() == path.resolve()


def test_keygen_rsa_4096_needs_three_strings(tmp_path: Path):
    p = keygen("--dir", str(tmp_path), "--bits", "4096", "--selector", "big", "example.org")
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    path = tmp_path / "example.org.big.key"
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
    _line, strings = record_line(p.stdout, "example.org", "big")
    assert len(strings) >= 3 and all(len(s.encode()) <= 255 for s in strings), [
        len(s) for s in strings
    ]
    assert p_of("".join(strings)) == p_of(public_record(path))


def test_keygen_ed25519(tmp_path: Path):
    p = keygen("--dir", str(tmp_path), "--type", "ed25519", "--selector", "e1", "example.net")
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    path = tmp_path / "example.net.e1.key"
    check_key_file(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey), key
    _line, strings = record_line(p.stdout, "example.net", "e1")
    joined = "".join(strings)
    assert re.search(r"(^|;)\s*k=ed25519\s*(;|$)", joined), joined
    assert p_of(joined) == p_of(public_record(path))
    assert len(base64.b64decode(p_of(joined))) == 32, "RFC 8463: p= is the raw 32-byte key"
    assert usage_line(p.stdout, "example.net", "e1").resolve() == path.resolve()


def test_keygen_default_selector_is_year_and_month(tmp_path: Path):
    before = time.strftime("%Y%m")
    p = keygen("--dir", str(tmp_path), "example.org")
    after = time.strftime("%Y%m")
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    made = os.listdir(tmp_path)
    assert made in ([f"example.org.{before}.key"], [f"example.org.{after}.key"]), made
    selector = made[0].split(".")[-2]
    record_line(p.stdout, "example.org", selector)


def test_keygen_refuses_to_overwrite(tmp_path: Path):
    first = keygen("--dir", str(tmp_path), "--selector", "s1", "example.org")
    assert first.returncode == 0, first
    path = tmp_path / "example.org.s1.key"
    before = path.read_bytes()
    again = keygen("--dir", str(tmp_path), "--selector", "s1", "example.org")
    assert again.returncode == 1, f"exit {again.returncode}\n{again.stdout}\n{again.stderr}"
    assert path.read_bytes() == before, "the existing key was overwritten"
    assert str(path) in again.stderr or path.name in again.stderr, (
        f"the refusal must name the file: {again.stderr!r}"
    )
    assert "_domainkey" not in again.stdout, f"a record printed for no new key: {again.stdout}"


def test_keygen_refuses_short_rsa(tmp_path: Path):
    p = keygen("--dir", str(tmp_path), "--bits", "1024", "--selector", "weak", "example.org")
    assert p.returncode not in (0, None), f"--bits 1024 accepted\n{p.stdout}\n{p.stderr}"
    assert "2048" in p.stderr, f"the refusal should say what is enough: {p.stderr!r}"
    assert not list(tmp_path.iterdir()), f"files written: {os.listdir(tmp_path)}"


def test_keygen_refuses_bits_for_ed25519(tmp_path: Path):
    """--bits is for RSA: with --type ed25519 it is refused, not silently ignored."""
    p = keygen("--dir", str(tmp_path), "--type", "ed25519", "--bits", "2048", "example.org")
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "--bits" in p.stderr and "RSA" in p.stderr, f"the refusal should say why: {p.stderr!r}"
    assert not list(tmp_path.iterdir()), f"files written: {os.listdir(tmp_path)}"


def test_keygen_relative_dir_prints_an_absolute_path(tmp_path: Path):
    """`--dir keys` (relative): the printed config line names the key by its absolute path,
    since mailerd does not run from this directory."""
    p = run_mailerd(
        ["dkim", "keygen", "--dir", "keys", "--selector", "r1", "example.org"], cwd=tmp_path
    )
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    path = usage_line(p.stdout, "example.org", "r1")
    assert path.is_absolute(), f"not an absolute path: {path}"
    assert path.resolve() == (tmp_path / "keys" / "example.org.r1.key").resolve(), path
    check_key_file(path)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["not a domain"], id="domain-with-spaces"),
        pytest.param(["bad-.example"], id="domain-label-hyphen"),
        pytest.param(["example..org"], id="domain-empty-label"),
        pytest.param(["--selector", "x:y", "example.org"], id="selector-colon"),
        pytest.param(["--selector", "mail 1", "example.org"], id="selector-space"),
        pytest.param(["--selector", "a,b", "example.org"], id="selector-comma"),
        pytest.param(["--selector", "", "example.org"], id="selector-empty"),
        pytest.param(["--selector", "../x", "example.org"], id="selector-path"),
    ],
)
def test_keygen_refuses_what_mailerd_would_not_read(tmp_path: Path, args: list[str]):
    """A DOMAIN or SELECTOR that mailerd's --dkim-key would refuse or misread (the printed
    `dkim-key = DOMAIN:SELECTOR:FILE` line): exit 2, one line saying which, no file."""
    p = keygen("--dir", str(tmp_path), "--type", "ed25519", *args)
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "domain" in p.stderr or "selector" in p.stderr, p.stderr
    assert p.stdout == "" and not list(tmp_path.iterdir()), os.listdir(tmp_path)


def test_keygen_refuses_a_dir_the_config_file_would_split(tmp_path: Path):
    """mailerd.conf splits a dkim-key list on commas and spaces: a key file named with one
    could not be given there."""
    p = keygen("--dir", str(tmp_path / "my keys"), "--type", "ed25519", "example.org")
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "--dir" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not list(tmp_path.iterdir()), os.listdir(tmp_path)


def test_keygen_says_how_to_add_a_second_key(tmp_path: Path):
    """A config with a dkim-key line already: a second `dkim-key =` line is an error
    (configparser), so the advice for the second key is the comma-separated list, and the
    config made by following it names both keys."""
    from mailerd import config

    first = keygen("--dir", str(tmp_path), "--type", "ed25519", "--selector", "a1", "example.org")
    second = keygen("--dir", str(tmp_path), "--type", "ed25519", "--selector", "b1", "example.org")
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    line = next(ln for ln in first.stdout.splitlines() if ln.startswith("dkim-key"))
    conf = tmp_path / "mailerd.conf"
    argv = ["-c", str(conf), "-d", "example.org", "-H", "mx.example.org", "-n", "none"]
    argv += ["-l", "127.0.0.1:2525"]
    conf.write_text(f"[mailerd]\n{line}\n" + next(
        ln for ln in second.stdout.splitlines() if ln.startswith("dkim-key")
    ) + "\n")  # fmt: skip
    with pytest.raises(config.ConfigError, match="dkim-key"):
        config.load(argv)
    advice = [ln for ln in second.stdout.splitlines() if ln.startswith(";") and "dkim-key =" in ln]
    assert len(advice) == 1, second.stdout
    placeholder = "<the keys already there>"
    assert placeholder in advice[0], advice
    joined = advice[0].lstrip("; ").replace(placeholder, line.split("=", 1)[1].strip())
    conf.write_text(f"[mailerd]\n{joined}\n")
    specs = config.load(argv).dkim_specs
    assert [(d, s) for d, s, _ in specs] == [("example.org", "a1"), ("example.org", "b1")]
    assert all(path.exists() for _, _, path in specs), specs


def test_keygen_key_works_in_mailerd(tmp_path: Path, mailerd_factory, dns_stuck):
    """The operator's path: keygen, the printed config line as is, the printed record in the
    DNS: mailerd starts with that config and its signature verifies against that record."""
    p = keygen("--dir", str(tmp_path / "keys"), "--selector", "op1", "example.org")
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    config_line = next(ln for ln in p.stdout.splitlines() if ln.strip().startswith("dkim-key"))
    conf = tmp_path / "mailerd.conf"
    conf.write_text(f"[mailerd]\n{config_line.strip()}\n")
    _line, strings = record_line(p.stdout, "example.org", "op1")
    m = signer(mailerd_factory, dns_stuck, "-c", str(conf))
    queued = queue_mail(m, message())
    sigs = signatures(queued)
    assert len(sigs) == 1, f"expected one DKIM-Signature in the queued file:\n{queued[:3000]!r}"
    assert sigs[0]["d"] == "example.org" and sigs[0]["s"] == "op1", sigs[0]
    assert verifies(queued, 0, "".join(strings), "op1._domainkey.example.org")


# --------------------------------------------------------------------------------------------
# Keys mailerd refuses at start-up
# --------------------------------------------------------------------------------------------


def _bad_key(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.pem"
    if case == "missing":
        return tmp_path / "no-such.key"
    if case == "not-pem":
        path.write_text("this is not a key\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "certificate":
        key = rsa_key(tmp_path / "for-cert.key")
        openssl("req", "-x509", "-new", "-key", key, "-out", path, "-days", "2",
                "-subj", "/CN=example.org")  # fmt: skip
    elif case == "public-key":
        key = rsa_key(tmp_path / "private.key")
        openssl("pkey", "-in", key, "-pubout", "-out", path)
    elif case == "rsa-1024":
        rsa_key(path, 1024)
    elif case == "encrypted":
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                "-aes-256-cbc", "-pass", "pass:secret", "-out", path)  # fmt: skip
        assert b"ENCRYPTED" in path.read_bytes()
    elif case == "ecdsa":
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    else:
        raise AssertionError(case)
    return path


BAD_KEYS = ["missing", "not-pem", "empty", "directory", "certificate", "public-key", "rsa-1024",
            "encrypted", "ecdsa"]  # fmt: skip


@pytest.mark.parametrize("case", BAD_KEYS)
def test_bad_key_is_a_start_up_error(mailerd_factory, dns_stuck, tmp_path: Path, case: str):
    """Like a bad TLS certificate: exit status 1, one line on stderr naming the file."""
    path = _bad_key(tmp_path, case)
    m = signer(mailerd_factory, dns_stuck, "--dkim-key", f"example.org:s1:{path}", start=False)
    rc, err = exits_at_start(m)
    assert rc == 1, f"{case}: exit status {rc}, expected 1\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{case}: expected one line:\n{err}"
    assert str(path) in lines[0], f"{case}: the line does not name {path}: {lines[0]!r}"
    assert "Traceback" not in err


def test_bad_key_in_the_config_file(mailerd_factory, dns_stuck, tmp_path: Path):
    good = rsa_key(tmp_path / "good.key")
    bad = _bad_key(tmp_path, "rsa-1024")
    conf = tmp_path / "mailerd.conf"
    conf.write_text(f"[mailerd]\ndkim-key = example.org:a:{good}, example.org:b:{bad}\n")
    m = signer(mailerd_factory, dns_stuck, "-c", str(conf), start=False)
    rc, err = exits_at_start(m)
    assert rc == 1, f"exit status {rc}, expected 1\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], err


@pytest.mark.parametrize(
    "spec_of, names",
    [
        pytest.param(lambda k: f"example.com:s1:{k}", ["example.com"], id="not-a-local-domain"),
        pytest.param(lambda k: f"org:s1:{k}", ["org"], id="a-parent-of-a-local-domain"),
        pytest.param(lambda k: "example.org:s1", ["--dkim-key", "dkim-key"], id="no-file"),
        pytest.param(lambda k: f"example.org::{k}", ["--dkim-key", "dkim-key"], id="no-selector"),
    ],
)
def test_bad_dkim_key_option_exits_2(mailerd_factory, dns_stuck, tmp_path: Path, spec_of, names):
    key = rsa_key(tmp_path / "good.key")
    m = signer(mailerd_factory, dns_stuck, "--dkim-key", spec_of(key), start=False)
    rc, err = exits_at_start(m)
    assert rc == 2, f"exit status {rc}, expected 2 (a configuration error)\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line:\n{err}"
    assert any(re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w-])", lines[0]) for n in names), (
        f"the line should name {names}: {lines[0]!r}"
    )


def test_key_for_a_subdomain_of_a_local_domain(mailerd_factory, dns_stuck, tmp_path: Path):
    """DOMAIN may be below a local domain: a key for news.example.org signs its mail."""
    key = ed25519_key(tmp_path / "news.key")
    m = signer(mailerd_factory, dns_stuck, "--dkim-key", f"news.example.org:n1:{key}")
    queued = queue_mail(m, message("editor@news.example.org"), sender="editor@news.example.org")
    sigs = signatures(queued)
    assert [(s["d"], s["s"], s["a"]) for s in sigs] == [
        ("news.example.org", "n1", "ed25519-sha256")
    ], sigs
    assert verifies(queued, 0, public_record(key), "n1._domainkey.news.example.org")


# --------------------------------------------------------------------------------------------
# Signatures in the queue; the config file's list; reload
# --------------------------------------------------------------------------------------------


def test_config_file_list_gives_two_signatures(mailerd_factory, dns_stuck, tmp_path: Path):
    """`dkim-key` in the config file, two keys (RSA and Ed25519) separated by a comma and
    spaces: the queued file carries one signature for each, each verifying with its own key."""
    rsa_path = rsa_key(tmp_path / "r.key")
    ed_path = ed25519_key(tmp_path / "e.key")
    conf = tmp_path / "mailerd.conf"
    conf.write_text(f"[mailerd]\ndkim-key = example.org:r1:{rsa_path},  example.org:e1:{ed_path}\n")
    m = signer(mailerd_factory, dns_stuck, "-c", str(conf))
    queued = queue_mail(m, message())
    sigs = signatures(queued)
    by_selector = {s["s"]: (i, s) for i, s in enumerate(sigs)}
    assert sorted(by_selector) == ["e1", "r1"] and len(sigs) == 2, sigs
    assert by_selector["r1"][1]["a"] == "rsa-sha256", sigs
    assert by_selector["e1"][1]["a"] == "ed25519-sha256", sigs
    assert verifies(
        queued, by_selector["r1"][0], public_record(rsa_path), "r1._domainkey.example.org"
    )
    assert verifies(
        queued, by_selector["e1"][0], public_record(ed_path), "e1._domainkey.example.org"
    )
    # and each fails with the other's key of the same kind: the check can fail
    other = rsa_key(tmp_path / "other.key")
    assert not verifies(queued, by_selector["r1"][0], public_record(other),
                        "r1._domainkey.example.org")  # fmt: skip


def test_queued_file_layout(mailerd_factory, dns_stuck, tmp_path: Path):
    """The queued file: our Received: header, then the DKIM-Signature, then the message as
    submitted (it had Date: and Message-ID:, so nothing is added)."""
    key = rsa_key(tmp_path / "r.key")
    m = signer(mailerd_factory, dns_stuck, "--dkim-key", f"example.org:r1:{key}")
    body = message()
    queued = queue_mail(m, body)
    assert queued.endswith(body), f"the message is not at the end unchanged:\n{queued[:2000]!r}"
    names = [name for name, _ in header_fields(queued[: len(queued) - len(body)] + b"\r\n")]
    assert names == ["received", "dkim-signature"], names


def test_a_long_header_section_is_signed_and_gets_no_second_from(
    mailerd_factory, dns_stuck, tmp_path: Path
):
    """A header section past 64 KiB, its From: after that: the outgoing copy was completed
    from the first 64 KiB only, so it got a From: of the envelope sender beside the message's
    own, and went out unsigned (two From: fields sign nothing), where big providers refuse
    it (an attacker's pass). The completion looks as far as the signer does."""
    key = rsa_key(tmp_path / "r.key")
    m = signer(mailerd_factory, dns_stuck, "--dkim-key", f"example.org:r1:{key}")
    body = (b"X-Pad: " + b"p" * 900 + b"\r\n") * 80 + message()
    queued = queue_mail(m, body)
    names = [name for name, _ in header_fields(queued)]
    assert names.count("from") == 1, names
    assert len(signatures(queued)) == 1, queued[:600]


def _install(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o600)
    os.replace(tmp, dst)


def test_reload_reads_the_changed_key(mailerd_factory, dns_stuck, tmp_path: Path):
    """SIGHUP re-reads the key file: mail queued after it is signed with the new key (and not
    the old one); mail queued before keeps its signature (signed once). A key file that has
    gone bad by the next SIGHUP is logged, and the keys in use are kept."""
    old = rsa_key(tmp_path / "old.key")
    new = rsa_key(tmp_path / "new.key")
    live = tmp_path / "live.key"
    _install(old, live)
    name = "live._domainkey.example.org"
    m = signer(mailerd_factory, dns_stuck, "--dkim-key", f"example.org:live:{live}")
    first = queue_mail(m, message(subject="before the reload"))
    assert verifies(first, 0, public_record(old), name)

    _install(new, live)
    mark = len(m.stderr_text())
    m.signal(signal.SIGHUP)
    assert wait_until(lambda: "configuration reloaded" in m.stderr_text()[mark:], 15), (
        m.stderr_text()[mark:]
    )
    second = queue_mail(m, message(subject="after the reload"))
    assert len(signatures(second)) == 1, signatures(second)
    assert verifies(second, 0, public_record(new), name), "not signed with the new key"
    assert not verifies(second, 0, public_record(old), name), "still signed with the old key"
    first_path = [p for p in (m.queue / "msg").iterdir() if p.read_bytes() == first]
    assert first_path, "the message queued before the reload changed in the queue"

    live.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    mark = len(m.stderr_text())
    m.signal(signal.SIGHUP)
    assert wait_until(lambda: "reload failed" in m.stderr_text()[mark:], 15), (
        f"a bad key on SIGHUP must be logged as a failed reload:\n{m.stderr_text()[mark:]}"
    )
    failed = [ln for ln in m.stderr_text()[mark:].splitlines() if "reload failed" in ln]
    assert str(live) in failed[0], f"the log line should name the key file: {failed[0]!r}"
    assert m.proc is not None and m.proc.poll() is None, "mailerd stopped on a bad reload"
    third = queue_mail(m, message(subject="after the failed reload"))
    assert verifies(third, 0, public_record(new), name), "the keys in use were not kept"

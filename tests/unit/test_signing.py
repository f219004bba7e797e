"""DKIM signing (mailerd.signing) and the header parsing it shares (mailerd.headers): keys,
which key signs, what is signed, and that dkimpy (an independent implementation of the same
RFC from the one that made the signature only as far as the canonicalisation goes) verifies
it, for RSA (signed through OpenSSL) and Ed25519."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import dkim
import dkim.util
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mailerd import dkim_speedups, headers, signing
from mailerd.commands import dkimkeys

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net,\r\n carol@example.net\r\n"
    b"Cc: dave@example.net\r\n"
    b"Subject: a  signed   message\r\n"
    b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"X-Other: not signed\r\n"
    b"\r\n"
    b"Hello,  with   spaces \r\n\r\n\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, signing.SigningKey]:
    directory = tmp_path_factory.mktemp("dkim")
    made = {}
    for name, kind, domain in (
        ("rsa", "rsa", "example.org"),
        ("ed", "ed25519", "example.org"),
        ("sub", "rsa", "sub.example.org"),
    ):
        path = directory / f"{name}.key"
        dkimkeys.write_key(str(path), dkimkeys.new_key(kind, 2048))
        made[name] = signing.load_key(domain, name, str(path))
    return made


def dnsfunc_for(*keys: signing.SigningKey):
    records = {f"{k.dns_name}.".encode(): k.dns_record().encode() for k in keys}
    return lambda name, timeout=5: records.get(name)


def test_keys_load_with_their_dns_records(keys):
    rsa, ed = keys["rsa"], keys["ed"]
    assert (rsa.algorithm, rsa.bits, rsa.kind) == ("rsa-sha256", 2048, "rsa")
    assert (ed.algorithm, ed.kind) == ("ed25519-sha256", "ed25519")
    assert rsa.dns_name == "rsa._domainkey.example.org"
    assert rsa.dns_record().startswith("v=DKIM1; k=rsa; p=MIIB")
    assert ed.dns_record().startswith("v=DKIM1; k=ed25519; p=") and len(ed.public) == 44
    assert b"PRIVATE" not in repr(rsa).encode()  # the key's repr shows no secret


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d / "missing.key", "cannot read"),
        (lambda d: _write(d / "junk.key", b"not a key"), "not an unencrypted PEM"),
        (lambda d: _openssl_key(d / "short.key", "rsa:1024"), "at least 2048"),
        (lambda d: _openssl_key(d / "ec.key", "ec"), "neither RSA nor Ed25519"),
    ],
)
def test_unusable_keys_are_refused_with_the_file_named(tmp_path: Path, make, words):
    path = make(tmp_path)
    with pytest.raises(signing.KeyProblem, match=words) as caught:
        signing.load_key("example.org", "s", str(path))
    assert str(path) in str(caught.value)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _openssl_key(path: Path, kind: str) -> Path:
    if kind == "ec":
        args = ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    else:
        args = ["genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{kind[4:]}"]
    subprocess.run(["openssl", *args, "-out", str(path)], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("name", ["rsa", "ed"])
def test_a_signature_verifies_and_covers_what_it_should(keys, name):
    key = keys[name]
    signature = signing.sign(MESSAGE, [key])
    assert signature.startswith(b"DKIM-Signature: ") and signature.endswith(b"\r\n")
    signed = signature + MESSAGE
    assert dkim.verify(signed, dnsfunc=dnsfunc_for(key))
    tags = dict(
        (k.strip(), v.strip())
        for k, _, v in (
            t.partition("=") for t in b"".join(signature[16:].split()).decode().split(";")
        )
    )
    assert tags["c"] == "relaxed/relaxed" and tags["d"] == "example.org" and "l" not in tags
    assert tags["h"].split(":") == ["from", "to", "cc", "subject", "date", "message-id", "from"]
    # Relaxed: whitespace changes survive; content changes and an added From do not.
    assert dkim.verify(
        signature + MESSAGE.replace(b"a  signed", b"a signed"), dnsfunc=dnsfunc_for(key)
    )
    assert not dkim.verify(signed.replace(b"Hello", b"Hallo"), dnsfunc=dnsfunc_for(key))
    assert not dkim.verify(signed + b"", dnsfunc=dnsfunc_for(keys["sub"]))
    forged = signature + b"From: mallory@evil.example\r\n" + MESSAGE
    assert not dkim.verify(forged, dnsfunc=dnsfunc_for(key))


def test_rsa_goes_through_openssl_and_matches_dkimpys_own(keys, monkeypatch):
    """The replacement RSA primitive gives exactly dkimpy's pure-Python signature (PKCS #1
    v1.5 is deterministic: the same t= gives the same b=)."""
    key = keys["rsa"]
    monkeypatch.setattr(dkim.time, "time", lambda: 1796400000.0)
    fast = signing.sign(MESSAGE, [key])
    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", dkim_speedups._dkimpy_sign)
    slow = signing.sign(MESSAGE, [key])
    assert fast == slow
    assert dkim.RSASSA_PKCS1_v1_5_sign is not dkim_speedups.sign
    monkeypatch.undo()
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim_speedups.sign


def test_rsa_verification_goes_through_openssl_and_agrees_with_dkimpys_own(keys):
    """OpenSSL's verification gives dkimpy's verdicts: a good signature, a changed message,
    a signature from another key, a signature that is not one."""
    key = keys["rsa"]
    assert dkim.RSASSA_PKCS1_v1_5_verify is dkim_speedups.verify
    signed = signing.sign(MESSAGE, [key]) + MESSAGE
    tampered = signed.replace(b"Subject: ", b"Subject: Re: ", 1)
    right = dnsfunc_for(key)
    wrong_key = keys["sub"].dns_record().encode()  # published under the signature's name

    def wrong(name, timeout=5):
        return wrong_key

    cases = [(signed, right, True), (tampered, right, False), (signed, wrong, False)]
    for message, dnsfunc, expected in cases:
        for primitive in (dkim_speedups.verify, dkim_speedups._dkimpy_verify):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(dkim, "RSASSA_PKCS1_v1_5_verify", primitive)
                assert dkim.verify(message, dnsfunc=dnsfunc) is expected
    digest = hashlib.sha256(b"x")
    public = {"modulus": 2**2047 + 1, "publicExponent": 65537}
    assert dkim_speedups.verify(digest, b"\x00" * 256, public) is False


def test_two_keys_give_two_signatures(keys):
    signature, domain = signing.sign_message(MESSAGE, [keys["rsa"], keys["ed"], keys["sub"]])
    assert domain == "example.org"
    assert signature.count(b"DKIM-Signature:") == 2
    signed = signature + MESSAGE
    for index in (0, 1):
        checker = dkim.DKIM(signed)
        assert checker.verify(idx=index, dnsfunc=dnsfunc_for(keys["rsa"], keys["ed"]))


@pytest.mark.parametrize(
    "from_line, domain",
    [
        (b"From: a@sub.example.org", "sub.example.org"),  # its own key first
        (b"From: a@deep.sub.example.org", "sub.example.org"),  # the nearest parent's
        (b"From: a@other.example.org", "example.org"),
        (b"From: a@example.net", None),  # no key
        (b"From: a@example.org, b@example.org", "example.org"),  # several, one domain
        (b"From: a@example.org, b@example.net", None),  # two domains: DMARC checks both
        (b"To: x@example.org", None),  # no From at all
    ],
)
def test_which_keys_sign(keys, from_line, domain):
    message = from_line + b"\r\nSubject: s\r\n\r\nbody\r\n"
    signature, signed_for = signing.sign_message(message, list(keys.values()))
    assert signed_for == domain
    assert (signature != b"") == (domain is not None)


def test_two_from_fields_sign_nothing(keys):
    message = b"From: a@example.org\r\nFrom: b@example.org\r\n\r\nbody\r\n"
    assert signing.sign_message(message, [keys["rsa"]]) == (b"", None)


def test_header_fields_are_found_with_their_continuations():
    found = [(name, MESSAGE[start:end]) for name, start, end in headers.fields(MESSAGE)]
    assert [name for name, _ in found] == [
        b"from",
        b"to",
        b"cc",
        b"subject",
        b"date",
        b"message-id",
        b"x-other",
    ]
    assert found[1][1] == b"To: bob@example.net,\r\n carol@example.net\r\n"
    assert headers.section_end(MESSAGE) == MESSAGE.index(b"\r\n\r\n") + 2
    assert headers.section_end(b"\r\nbody") == 0
    assert headers.from_domain(MESSAGE) == "example.org"


def test_keygen_output_is_a_record_in_strings_of_at_most_255(keys):
    record = keys["rsa"].dns_record()
    line = dkimkeys.zone_txt(keys["rsa"].dns_name, record)
    assert line.startswith('rsa._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    strings = dkimkeys.txt_strings(record)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == record


@given(st.binary(max_size=200).map(lambda b: bytes(b" \t\r\na"[x % 5] for x in b)))
def test_the_whitespace_shortcuts_give_dkimpys_results(text: bytes):
    """Relaxed canonicalisation's whitespace passes, skipped when there is nothing to change,
    give exactly what dkimpy's own give, on any text of spaces, tabs, CR, LF and a letter."""
    assert dkim_speedups.compress_whitespace(text) == dkim_speedups._dkimpy_compress(text)
    assert dkim_speedups.strip_trailing_whitespace(text) == dkim_speedups._dkimpy_strip(text)


@given(st.binary(max_size=300).map(lambda b: bytes(b" \t\r\nab"[x % 6] for x in b)))
@example(b"  \t \r\n x \t\r\n\r\n \r \n\t")
def test_the_linear_trailing_whitespace_removal_gives_dkimpys(text: bytes):
    assert dkim_speedups.strip_trailing_whitespace(text) == dkim_speedups._dkimpy_strip(text)


@given(st.binary(max_size=60).map(lambda b: bytes(b"\r\nx"[x % 3] for x in b)))
@example(b"\r\n\r\n")
@example(b"\r\r\n")
@example(b"")
def test_the_trailing_lines_removal_gives_dkimpys(body: bytes):
    assert dkim_speedups.strip_trailing_lines(body) == dkim_speedups._dkimpy_strip_lines(body)


def test_trailing_empty_lines_cost_a_linear_pass():
    """A third attacker's pass: 24 MB of empty lines cost dkimpy's loop 1.2 s a signature
    (simple canonicalisation, made per signature), enough to make a check thread late."""
    body = b"x" + b"\r\n" * (12 * 1024 * 1024) + b"\r\n\r\nx" + b"\r\n" * 1000
    start = time.process_time()
    assert dkim_speedups.strip_trailing_lines(body) == body[: -2 * 999]
    assert time.process_time() - start < 0.3


def test_whitespace_that_no_line_end_follows_costs_a_linear_pass():
    """A second attacker's pass: lines of 996 spaces and an "x" (and one line that ends in a
    space, so that the removal runs) cost dkimpy's pattern 1.3 s of CPU a megabyte."""
    body = b"x \r\n" + (b" " * 996 + b"x\r\n") * 2000  # 2 MB
    start = time.process_time()
    assert dkim_speedups.strip_trailing_whitespace(body) == b"x\r\n" + body[4:]
    assert time.process_time() - start < 0.2


@given(st.binary(max_size=300).map(lambda b: bytes(b" \t\r\nab"[x % 6] for x in b)))
@example(b"a \r\n\r\n\r\n")
@example(b"")
def test_the_relaxed_body_in_pieces_is_dkimpys(body: bytes):
    """Relaxed body canonicalisation in pieces of whole lines (pieces of 8 octets here, so
    that a message has many) gives exactly dkimpy's whole-body result."""
    import dkim.canonicalization as c

    whole = c.correct_empty_body(
        c.strip_trailing_lines(dkim_speedups._dkimpy_compress(dkim_speedups._dkimpy_strip(body)))
    )
    saved = dkim_speedups.BODY_PIECE
    dkim_speedups.BODY_PIECE = 8
    try:
        assert dkim_speedups.relaxed_body(body) == whole
    finally:
        dkim_speedups.BODY_PIECE = saved


def test_a_body_is_canonicalised_once_for_all_its_signatures(monkeypatch):
    """A second attacker's pass: ten relaxed signatures over a 22 MB body made dkimpy
    canonicalise it ten times, each pass holding the GIL. Verifying now makes it once."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from mailerd.inbound import signatures
    from mailerd.inbound.lookups import Answer, Bridge

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    passes = []
    real = dkim_speedups.compress_whitespace
    monkeypatch.setattr(dkim_speedups, "compress_whitespace", lambda b: passes.append(1) or real(b))
    field = (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=x.example; s=s%d;"
        b" h=from; bh=YQ==; b=YQ==\r\n"
    )
    message = b"".join(field % i for i in range(10)) + b"From: <a@x.example>\r\n\r\nbody\r\n"

    class OneKey(Bridge):
        def __init__(self) -> None:
            self.timeout, self.deadline, self.wait_limit = 1.0, float("inf"), 1.0

        def query(self, name: str, rdtype: str) -> Answer:
            return Answer((record,), True)

    results = signatures.verify(OneKey(), message)
    assert [r.reason for r in results] == ["body hash mismatch"] * 10, results
    assert len(passes) == 1, passes


def _parse_or_error(parse, message: bytes):
    try:
        return parse(message)
    except Exception as exc:  # (the same exception, from the same line, is what counts)
        return type(exc), str(exc)


@given(
    st.lists(
        st.sampled_from([b"\r\n", b"\n", b"\r", b"A: b", b" c", b"\t", b"x", b"From x", b":"]),
        max_size=40,
    ).map(b"".join)
)
def test_the_message_parse_shortcut_gives_dkimpys_results(message: bytes):
    """The parse that splits only the header section gives dkimpy's fields and body, or its
    exception, on any message of header lines, continuations, bare CR and LF, and blank lines."""
    ours = _parse_or_error(dkim_speedups.rfc822_parse, message)
    assert ours == _parse_or_error(dkim_speedups._dkimpy_rfc822_parse, message)


@given(
    st.lists(
        st.sampled_from(
            [b"\r\n", b"\r\n\r\n", b"\r", b"A: b", b" c", b"\t", b"x", b"From x", b":", b"a b:"]
            + [b"\x7f", b"\x00"]
        ),
        max_size=40,
    ).map(b"".join)
)
@example(b"::x\r\n\r\nbody")  # (a field name may be a colon: the name is up to the next)
@example(b" c\r\nA: b\r\n\r\n")  # (a continuation before any field)
def test_the_crlf_message_parse_gives_dkimpys_results(message: bytes):
    """Messages whose lines all end in CRLF, which take the shortcut's own header loop: its
    fields, body and exceptions are dkimpy's."""
    ours = _parse_or_error(dkim_speedups.rfc822_parse, message)
    assert ours == _parse_or_error(dkim_speedups._dkimpy_rfc822_parse, message)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"From", b"from", b"To", b"X", b"Subject"]), st.binary(max_size=2)
        ),
        max_size=12,
    ),
    st.lists(st.sampled_from([b"from", b"to", b"x", b"subject", b"cc"]), max_size=12),
)
def test_the_linear_field_choice_gives_dkimpys(headers_: list, names: list):
    """The fields a signature's h= covers, and in which order, are dkimpy's: repeated names
    take the fields from the bottom up, a name beyond them takes nothing."""
    assert dkim_speedups.select_headers(headers_, names) == dkim_speedups._dkimpy_select_headers(
        headers_, names
    )


def test_a_signature_over_thousands_of_fields_costs_a_linear_pass():
    """An attacker's pass: h= naming 23,000 fields (most of them missing) over 28,000 fields
    took dkimpy's choice 31 s of CPU; it takes a fraction of a second now."""
    assert dkim.select_headers is dkim_speedups.select_headers
    fields = [(b"a", b" x\r\n")] * 28_000
    names = [b"n%d" % i for i in range(23_000)] + [b"a"] * 5
    start = time.process_time()
    chosen = dkim.select_headers(fields, names)
    assert time.process_time() - start < 0.5
    assert len(chosen) == 5


def test_the_message_parse_shortcut_is_installed_and_skips_the_body():
    assert dkim.rfc822_parse is dkim_speedups.rfc822_parse
    body = b"line\r\n" * 1000
    fields, rest = dkim.rfc822_parse(b"A: b\r\n c\r\nD: e\r\n\r\n" + body)
    assert fields == [[b"A", b" b\r\n c\r\n"], [b"D", b" e\r\n"]] and rest == body
    # a body with a bare LF takes dkimpy's own way, which makes its line ends CRLF
    assert dkim.rfc822_parse(b"A: b\r\n\r\nx\ny\r\n")[1] == b"x\r\ny\r\n"


@given(st.binary(max_size=120).map(lambda b: bytes(b" \t\r\n=;a_1\x0b"[x % 10] for x in b)))
@example(b"a=1; a=2")  # a duplicate tag
@example(b"1a=1;")  # a tag name that is not one
@example(b"v=1; a=rsa-sha256;\r\n\tb=x;")
def test_the_tag_list_and_unfolding_shortcuts_give_dkimpys_results(text: bytes):
    """Tag=value lists (or dkimpy's exception for them) and unfolded header values are
    exactly dkimpy's, on any text of its separators, whitespace, CR, LF and name letters."""
    ours = _parse_or_error(dkim_speedups.parse_tag_value, text)
    assert ours == _parse_or_error(dkim_speedups._dkimpy_parse_tag_value, text)
    assert dkim_speedups.unfold_header_value(text) == dkim_speedups._dkimpy_unfold(text)


@given(st.binary(max_size=3), st.binary(max_size=3))
@example(b"\xe9", b"")  # a letter outside ASCII (bytes.isalpha and [a-zA-Z] are ASCII only)
@example(b"_", b"a")
@example(b"Z", b"\xff")
def test_a_tag_name_is_one_that_starts_with_an_ascii_letter_as_in_dkimpy(start, rest):
    """The tag name check (no regular expression) takes exactly the names dkimpy's does, whatever
    octets they hold."""
    text = start + rest + b"=1; v=2"
    ours = _parse_or_error(dkim_speedups.parse_tag_value, text)
    assert ours == _parse_or_error(dkim_speedups._dkimpy_parse_tag_value, text)


@given(
    st.lists(
        st.sampled_from(
            [b"b=", b"b =", b" b\r\n =", b";", b" ", b"\t", b"\r\n", b"\n", b"\r"]
            + [b"A", b"z9", b"+/=", b"bh=", b"h", b";b=", b"\x0b"]
        ),
        max_size=30,
    ).map(b"".join)
)
@example(b"v=1; bh=abc=;\r\n b=YpSQ\r\n mZgu==\r\n")
@example(b" b=abc  ;b=x \r\n")
def test_the_b_value_removal_gives_dkimpys_result(field: bytes):
    """A signature field with its b= values removed is exactly what dkimpy's pattern gives,
    on any mix of b= tags, base64 characters, folding whitespace, bare CR and LF."""
    expected = dkim_speedups._dkimpy_btag.sub(b"\\1", field)
    assert dkim_speedups.without_b_values(field) == expected
    assert dkim.RE_BTAG.sub(b"\\1", field) == expected


def test_the_whitespace_shortcuts_are_installed():
    import dkim.canonicalization

    assert dkim.canonicalization.compress_whitespace is dkim_speedups.compress_whitespace
    assert (
        dkim.canonicalization.strip_trailing_whitespace is dkim_speedups.strip_trailing_whitespace
    )
    assert dkim.canonicalization.unfold_header_value is dkim_speedups.unfold_header_value
    assert dkim.util.parse_tag_value is dkim.parse_tag_value is dkim_speedups.parse_tag_value


def test_a_key_record_is_parsed_once_and_a_changed_one_anew(keys):
    assert dkim.evaluate_pk is dkim_speedups.evaluate_pk
    rsa, sub = keys["rsa"], keys["sub"]
    first = dkim.evaluate_pk(b"rsa._domainkey.example.org.", rsa.dns_record().encode())
    again = dkim.evaluate_pk(b"rsa._domainkey.example.org.", rsa.dns_record().encode())
    changed = dkim.evaluate_pk(b"rsa._domainkey.example.org.", sub.dns_record().encode())
    assert again is first and changed != first
    with pytest.raises(dkim.KeyFormatError):
        dkim.evaluate_pk(b"x._domainkey.example.org.", b"v=DKIM1; k=rsa; p=")


def test_a_long_key_record_is_not_kept(keys):
    """A sender's key record may be a whole DNS message (64 KiB): the key of one longer than
    any real key's is read each time, not kept (256 such records would keep 16 MiB a
    worker), and so are its h= and t= (`signatures`)."""
    from mailerd.inbound import signatures

    record = keys["rsa"].dns_record() + "; n=" + "x" * 60000
    name = b"long._domainkey.example.org."
    pk_before = dkim_speedups.evaluate_pk.cache.cache_info().currsize
    limits_before = signatures._key_limits.cache.cache_info().currsize
    first = dkim.evaluate_pk(name, record.encode())
    assert dkim.evaluate_pk(name, record.encode()) is not first  # (read anew)
    assert signatures._key_refuses(record.encode(), {}, "example.org") == ""
    assert dkim_speedups.evaluate_pk.cache.cache_info().currsize == pk_before
    assert signatures._key_limits.cache.cache_info().currsize == limits_before
    # a real one is kept
    short = keys["rsa"].dns_record().encode()
    assert dkim.evaluate_pk(name, short) is dkim.evaluate_pk(name, short)
    signatures._key_refuses(short, {}, "example.org")
    assert signatures._key_limits.cache.cache_info().currsize >= 1

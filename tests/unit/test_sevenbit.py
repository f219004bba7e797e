"""sevenbit: 8-bit messages converted to 7 bit for a server without 8BITMIME, or refused.

The stdlib's parser is the judge: the converted message must have the same MIME structure and
the same decoded content as the original, in 7-bit lines of at most 998 octets (quoted-printable
lines of at most 76).
"""

from __future__ import annotations

import email
import email.message
import email.policy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailerd.delivery import sevenbit


def crlf(*lines: str | bytes) -> bytes:
    return b"".join((x.encode() if isinstance(x, str) else x) + b"\r\n" for x in lines)


def converted(path: Path, data: bytes) -> bytes:
    path.write_bytes(data)
    plan = sevenbit.plan(path)
    assert plan.refusal is None, plan.refusal
    return b"".join(sevenbit.convert(path, plan))


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    out = []
    for part in parse(data).walk():
        if part.is_multipart() or part.get_content_type() == "message/rfc822":
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload.replace(b"\r\n", b"\n")))
    return out


def assert_7bit(data: bytes) -> None:
    assert data.isascii()
    lines = data.split(b"\r\n")
    assert all(b"\n" not in line and b"\r" not in line for line in lines), "bare CR or LF"
    assert max(len(line) for line in lines) <= 998


MIXED = crlf(
    "From: a@example.org",
    "Subject: mixed",
    "MIME-Version: 1.0",
    'Content-Type: multipart/mixed; boundary="b1"',
    "Content-Transfer-Encoding: 8bit",
    "",
    "preamble",
    "--b1",
    "Content-Type: text/plain; charset=utf-8",
    "Content-Transfer-Encoding: 8bit",
    "",
    "Grüße = 100 %",
    "x" * 74 + "é--b1",
    "--b1",
    "Content-Type: text/plain",
    "",
    "ascii, untouched",
    "--b1--",
    "",
)


def test_an_8bit_part_becomes_quoted_printable_and_its_container_7bit(tmp_path):
    out = converted(tmp_path / "m", MIXED)
    assert_7bit(out)
    assert leaves(out) == leaves(MIXED)
    relayed = parse(out)
    encodings = [p.get("Content-Transfer-Encoding") for p in relayed.walk()]
    assert encodings == ["7bit", "quoted-printable", None]
    assert not [p.defects for p in relayed.walk() if p.defects]
    # A soft line break never makes a line that starts like a delimiter.
    starting = [line for line in out.split(b"\r\n") if line.startswith(b"--b1")]
    assert starting == [b"--b1", b"--b1", b"--b1--"]


def test_an_ascii_message_is_left_exactly_as_it_is(tmp_path):
    data = crlf("Subject: ascii", "", "just ASCII", ".a dot line", "")
    assert converted(tmp_path / "m", data) == data


def test_a_message_without_mime_gains_mime_headers(tmp_path):
    out = converted(tmp_path / "m", crlf("Subject: plain", "", "naïve café", ""))
    assert_7bit(out)
    msg = parse(out)
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert leaves(out) == [("text/plain", "naïve café\n\n".encode())]


def test_a_body_that_is_not_utf8_is_labelled_unknown_8bit(tmp_path):
    out = converted(tmp_path / "m", crlf("Subject: latin-1", "", "caf\xe9".encode("latin-1")))
    assert parse(out).get_content_charset() == "unknown-8bit"
    assert leaves(out) == [("text/plain", b"caf\xe9\n")]


def test_a_line_longer_than_the_read_size_converts_whole(tmp_path):
    line = ("é" * (sevenbit.LINE_LIMIT // 3) + "-" * 100 + "ü" * 5000).encode()
    data = crlf("Subject: long", "MIME-Version: 1.0", "Content-Type: text/plain", "", line)
    out = converted(tmp_path / "m", data)
    assert_7bit(out)
    body = out.split(b"\r\n\r\n", 1)[1]
    assert max(len(x) for x in body.split(b"\r\n")) <= 76
    assert leaves(out) == [("text/plain", line + b"\n")]


def test_a_line_whose_crlf_straddles_the_read_size_keeps_its_line_end(tmp_path):
    # The CR is the read size's last octet and the LF the next read's first: the line must
    # not come out with a CR of its own (quoted-printable =0D) before its line end.
    line = ("é" * 100).encode()
    line += b"a" * (sevenbit.LINE_LIMIT - 1 - len(line))
    data = crlf("Subject: straddle", "MIME-Version: 1.0", "Content-Type: text/plain", "")
    data += crlf(line, "next")
    out = converted(tmp_path / "m", data)
    assert_7bit(out)
    assert b"=0D" not in out
    assert leaves(out) == [("text/plain", line + b"\nnext\n")]


@pytest.mark.parametrize(
    "data,reason",
    [
        pytest.param(
            crlf("DKIM-Signature: v=1; d=example.org; b=AAAA", "Subject: s", "", "Grüße"),
            "DKIM signature",
            id="dkim",
        ),
        pytest.param(
            crlf(
                "Subject: s",
                "MIME-Version: 1.0",
                'Content-Type: multipart/signed; protocol="application/pgp-signature";'
                ' boundary="s"',
                "",
                "--s",
                "Content-Type: text/plain; charset=utf-8",
                "",
                "Grüße",
                "--s",
                "Content-Type: application/pgp-signature",
                "",
                "sig",
                "--s--",
            ),
            "inside multipart/signed",
            id="multipart-signed",
        ),
        pytest.param(crlf("Subject: Grüße", "", "text"), "a header has 8-bit", id="header"),
        pytest.param(
            crlf(
                "MIME-Version: 1.0",
                "Content-Type: text/plain",
                "Content-Transfer-Encoding: base64",
                "",
                "Grüße",
            ),
            "encoded as base64",
            id="base64-8bit",
        ),
        pytest.param(
            crlf("MIME-Version: 1.0", "Content-Type: message/partial; id=1", "", "Grüße"),
            "message/partial",
            id="message-partial",
        ),
    ],
)
def test_what_cannot_be_converted_is_refused_with_a_reason(tmp_path, data, reason):
    path = tmp_path / "m"
    path.write_bytes(data)
    plan = sevenbit.plan(path)
    assert plan.refusal is not None and reason in plan.refusal, plan.refusal
    with pytest.raises(ValueError):
        next(sevenbit.convert(path, plan))


def test_our_own_signatures_are_left_out_to_be_made_anew(tmp_path):
    signed = crlf(
        "DKIM-Signature: v=1; a=rsa-sha256; d=Example.org;",
        "\ts=sel; b=AAAA",
        "DKIM-Signature: v=1; d=example.org; s=ed; b=BBBB",
        "Subject: s",
        "",
        "Grüße",
    )
    path = tmp_path / "m"
    path.write_bytes(signed)
    plan = sevenbit.plan(path, frozenset({("example.org", "sel"), ("example.org", "ed")}))
    assert plan.refusal is None and plan.resign
    out = b"".join(sevenbit.convert(path, plan))
    assert_7bit(out)
    assert b"DKIM-Signature" not in out and out.startswith(b"Subject: s\r\n")
    # One signature that is not ours: the message cannot be converted.
    plan = sevenbit.plan(path, frozenset({("example.org", "sel")}))
    assert plan.refusal is not None and "DKIM signature" in plan.refusal


def test_a_dkim_signed_message_without_8bit_content_is_no_problem(tmp_path):
    data = crlf("DKIM-Signature: v=1; d=example.org; b=AAAA", "Subject: s", "", "ascii")
    assert converted(tmp_path / "m", data) == data


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(
        st.binary(max_size=200).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        min_size=1,
        max_size=20,
    )
)
def test_any_8bit_text_part_round_trips(tmp_path, lines):
    data = crlf(
        "Subject: random",
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="zz"',
        "",
        "--zz",
        "Content-Type: application/octet-stream",
        "Content-Transfer-Encoding: 8bit",
        "",
        *lines,
        "--zz--",
    )
    if any(line.startswith(b"--zz") for line in lines):
        return  # (that would end the part: not the same message)
    out = converted(tmp_path / "m", data)
    assert_7bit(out)
    assert leaves(out) == leaves(data)

"""RFC 3464 bounces: structure as a mail reader parses it, the report fields, and hygiene.

Every output is parsed back with the stdlib `email` package (policy.default), as a mail
program would, rather than compared with a stored copy.
"""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime

import pytest

from mailerd.delivery import dsn

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
UNTIL = ARRIVAL + 5 * 86400

ORIGINAL = (
    b"Received: from client.example.org (client.example.org [192.0.2.9])\r\n"
    b"\tby mx.example.org with ESMTP id Q1; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: Lunch on Friday\r\n"
    b"Message-ID: <lunch@example.org>\r\n"
    b"\r\n"
    b"The secret body.\r\n"
)

BOB = dsn.RecipientStatus(
    "bob@example.com",
    "failed",
    "5.1.1",
    "550 5.1.1 <bob@example.com>: user unknown",
    "mx.example.com",
)
CAROL = dsn.RecipientStatus(
    "carol@example.net", "delayed", "4.4.1", "connect to mx.example.net: timed out", None
)
DAVE = dsn.RecipientStatus(
    "dave@example.net", "failed", "5.4.4", "No IPv4 address for example.net", None
)


def compose(**kwargs) -> bytes:
    args = dict(
        hostname="mx.example.org",
        sender="alice@example.org",
        original=ORIGINAL,
        recipients=[BOB],
        queue_id="Q1",
        arrival=ARRIVAL,
        now=NOW,
    )
    args.update(kwargs)
    return dsn.compose(**args)


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def parse_utf8(raw: bytes):
    # From bytes, the stdlib keeps 8-bit *header* bytes as surrogates; from str it keeps the
    # characters (RFC 6532 headers), but then cannot decode an 8bit body: use each for its job.
    return email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)


def parts(raw: bytes):
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    return list(msg.iter_parts())


def status_blocks(raw: bytes) -> list:
    """The delivery-status groups as header-only messages: [per-message, per-recipient...]."""
    part = list(parse_utf8(raw).iter_parts())[1]
    if part.get_content_type() == "message/delivery-status":
        return part.get_payload()
    # message/global-delivery-status is parsed as one embedded message: its headers are the
    # first group and its "body" holds the others.
    [first] = part.get_payload()
    rest = re.split(r"\r?\n\r?\n", first.get_payload().strip())
    return [first] + [email.message_from_string(b, policy=email.policy.default) for b in rest]


def lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n")


# --- structure ---------------------------------------------------------------------------


def test_multipart_report_with_three_parts():
    raw = compose()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg.defects == []


def test_top_level_headers():
    msg = parse(compose())
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"].datetime == datetime.fromtimestamp(NOW, UTC)
    assert re.fullmatch(r"<Q1\.bounce\.[0-9a-f]{16}@mx\.example\.org>", msg["Message-ID"])
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"


def test_human_part_names_the_recipient_and_quotes_the_remote_reply():
    text = parts(compose())[0].get_content()
    assert "mx.example.org" in text
    assert "<bob@example.com>: host mx.example.com said:" in text
    assert "550 5.1.1 <bob@example.com>: user unknown" in text


def test_delivery_status_fields():
    per_message, bob = status_blocks(compose())
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert per_message["X-Mailerd-Queue-ID"] == "Q1"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]) == datetime.fromtimestamp(
        ARRIVAL, UTC
    )
    assert dict(bob.items()) == {
        "Final-Recipient": "rfc822; bob@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.com>: user unknown",
    }


def test_original_headers_are_returned_and_the_body_is_not():
    raw = compose()
    returned = parts(raw)[2].get_content()
    assert "Subject: Lunch on Friday" in returned
    assert "Message-ID: <lunch@example.org>" in returned
    assert "\tby mx.example.org with ESMTP" in returned  # folded lines kept as they were
    assert b"secret body" not in raw


# --- encoding ----------------------------------------------------------------------------


def _bare_line_ends(raw: bytes) -> list[re.Match]:
    return list(re.finditer(rb"(?<!\r)\n|\r(?!\n)", raw))


def test_crlf_everywhere_and_7bit_ascii():
    raw = compose(recipients=[BOB, CAROL, DAVE], retry_until=UNTIL)
    assert raw.endswith(b"\r\n")
    assert _bare_line_ends(raw) == []
    assert max(raw) < 128
    assert max(len(line) for line in lines(raw)) <= 78


def test_lf_only_original_is_returned_with_crlf():
    raw = compose(original=b"From: a@example.org\nSubject: unix\n\nbody\n")
    assert _bare_line_ends(raw) == []
    assert "Subject: unix" in parts(raw)[2].get_content()


def test_non_ascii_diagnostic_stays_7bit_when_not_smtputf8():
    bob = dsn.RecipientStatus(
        "bob@example.com", "failed", "5.1.1", "550 Benutzer unbekannt: ü", None
    )
    raw = compose(recipients=[bob])
    assert max(raw) < 128
    assert status_blocks(raw)[1]["Diagnostic-Code"] == "smtp; 550 Benutzer unbekannt: ?"


def test_long_diagnostic_is_folded_and_unfolds_to_the_original():
    reply = "550 5.7.1 " + " ".join(f"word{i}" for i in range(60))
    raw = compose(
        recipients=[dsn.RecipientStatus("bob@example.com", "failed", "5.7.1", reply, None)]
    )
    assert max(len(line) for line in lines(raw)) <= 78
    assert status_blocks(raw)[1]["Diagnostic-Code"] == "smtp; " + reply
    assert all(w in parts(raw)[0].get_content() for w in ("word0", "word59"))


def test_huge_diagnostic_is_cut_short_and_lines_stay_legal():
    raw = compose(
        recipients=[dsn.RecipientStatus("b@example.com", "failed", "5.0.0", "x" * 5000, None)]
    )
    assert max(len(line) for line in lines(raw)) <= 998
    assert status_blocks(raw)[1]["Diagnostic-Code"].endswith("...")


# --- variants ----------------------------------------------------------------------------


def test_delay_warning():
    raw = compose(recipients=[CAROL], retry_until=UNTIL)
    msg = parse(raw)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert ".delayed." in msg["Message-ID"]
    _, carol = status_blocks(raw)
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == "X-Mailerd; connect to mx.example.net: timed out"
    until = email.utils.format_datetime(datetime.fromtimestamp(UNTIL, UTC))
    assert carol["Will-Retry-Until"] == until
    text = parts(raw)[0].get_content()
    assert f"keep trying until {until}" in " ".join(text.split())
    assert "<carol@example.net>" in text


def test_delay_warning_without_a_deadline():
    raw = compose(recipients=[CAROL])
    assert status_blocks(raw)[1]["Will-Retry-Until"] is None
    assert "keep trying for a while" in " ".join(parts(raw)[0].get_content().split())


def test_several_recipients_failed_and_delayed():
    raw = compose(recipients=[BOB, CAROL, DAVE], retry_until=UNTIL)
    assert parse(raw)["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = status_blocks(raw)
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@example.com",
        "rfc822; carol@example.net",
        "rfc822; dave@example.net",
    ]
    assert [b["Action"] for b in blocks[1:]] == ["failed", "delayed", "failed"]
    assert blocks[3]["Diagnostic-Code"] == "X-Mailerd; No IPv4 address for example.net"
    text = parts(raw)[0].get_content()
    # Failures are explained first, then the recipients still being tried.
    assert text.index("<dave@example.net>") < text.index("<carol@example.net>")


def test_same_input_same_output_and_distinct_message_ids():
    assert compose() == compose()
    ids = {
        parse(compose())["Message-ID"],
        parse(compose(now=NOW + 1))["Message-ID"],
        parse(compose(recipients=[DAVE]))["Message-ID"],
        parse(compose(recipients=[CAROL]))["Message-ID"],
    }
    assert len(ids) == 4


def test_bad_status_falls_back_to_the_class_of_the_action():
    blocks = status_blocks(
        compose(
            recipients=[
                dsn.RecipientStatus("a@example.com", "failed", "bogus", "", None),
                dsn.RecipientStatus("b@example.com", "delayed", "5.1.1\r\nX: y", "", None),
            ]
        )
    )
    assert [b["Status"] for b in blocks[1:]] == ["5.0.0", "4.0.0"]
    assert blocks[1]["Diagnostic-Code"] is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sender": ""},
        {"recipients": []},
        {"recipients": [dsn.RecipientStatus("a@example.com", "delivered", "2.0.0", "", None)]},
    ],
)
def test_refused_inputs(kwargs):
    with pytest.raises(ValueError):
        compose(**kwargs)


def test_headers_only_original_and_huge_header_section():
    assert "Subject: x" in parts(compose(original=b"Subject: x\r\n"))[2].get_content()
    big = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"y" * 80) for i in range(3000))
    raw = compose(original=big + b"\r\nbody\r\n")
    returned = parts(raw)[2].get_content()
    # Whole lines only, as many as fit.
    assert dsn.HEADER_LIMIT - 100 < len(returned.encode()) <= dsn.HEADER_LIMIT
    assert returned.endswith("y\r\n")
    assert returned.startswith("X-Filler-00000:")
    assert len(raw) < dsn.HEADER_LIMIT + 8192


# --- internationalised (RFC 6533) --------------------------------------------------------


def _is_global(raw: bytes) -> bool:
    types = [p.get_content_type() for p in parts(raw)]
    return types == ["text/plain", "message/global-delivery-status", "message/global-headers"]


def test_smtputf8_uses_the_global_types():
    raw = compose(smtputf8=True)
    assert _is_global(raw)
    assert parts(raw)[0].get_content_charset() == "utf-8"
    assert _bare_line_ends(raw) == []


def test_non_ascii_recipient_uses_the_utf8_address_type():
    joerg = dsn.RecipientStatus(
        "jörg@bücher.example", "failed", "5.1.1", "550 5.1.1 nö", "mx.example"
    )
    raw = compose(recipients=[joerg])
    assert _is_global(raw)
    assert status_blocks(raw)[1]["Final-Recipient"] == "utf-8;jörg@bücher.example"
    assert status_blocks(raw)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 nö"
    assert "<jörg@bücher.example>" in parts(raw)[0].get_content()
    raw.decode("utf-8")  # valid UTF-8 throughout


def test_non_ascii_sender_or_original_header_uses_the_global_types():
    raw = compose(sender="zoë@example.org")
    assert _is_global(raw)
    assert parse_utf8(raw)["To"].addresses[0].addr_spec == "zoë@example.org"
    raw = compose(original="Subject: grüße\r\n\r\nbody\r\n".encode())
    assert _is_global(raw)
    assert list(parse_utf8(raw).iter_parts())[2].get_payload()[0]["Subject"] == "grüße"


def test_undecodable_original_headers_become_valid_utf8():
    raw = compose(original=b"Subject: caf\xe9\r\n\r\nbody\r\n")
    assert _is_global(raw)
    assert "Subject: caf\ufffd" in raw.decode("utf-8")


def test_undecodable_original_headers_keep_their_lines_legal():
    """Each octet that is no UTF-8 becomes U+FFFD, three octets: a returned header line of 990
    such octets (under SMTP's 1,000) made a line of 2,950 in the notification. Cut again."""
    raw = compose(original=b"Subject: " + b"\xff" * 980 + b"\r\nTo: <a@example.org>\r\n\r\nx\r\n")
    assert max(len(line) for line in lines(raw)) <= 998
    returned = raw.decode("utf-8").split("\r\n")
    assert any(line.startswith("Subject: \ufffd\ufffd") for line in returned)
    assert "To: <a@example.org>" in returned


# --- injection -----------------------------------------------------------------------------


def _field_names(raw: bytes) -> list[str]:
    return [n for n, _ in parse(raw).items()]


def test_crlf_in_diagnostic_cannot_add_fields_or_parts():
    evil = "550 no\r\nBcc: victim@example.net\r\n\r\n--x\nContent-Type: text/html\r.\r\n"
    raw = compose(
        recipients=[dsn.RecipientStatus("bob@example.com", "failed", "5.1.1", evil, None)]
    )
    assert _bare_line_ends(raw) == []
    assert not any(line.startswith((b"Bcc", b"Content-Type: text/html")) for line in lines(raw))
    blocks = status_blocks(raw)
    assert len(blocks) == 2
    assert "Bcc" not in blocks[1]
    assert blocks[1]["Diagnostic-Code"].startswith("smtp; 550 no Bcc: victim@example.net --x")


def test_crlf_in_addresses_and_names_cannot_add_fields():
    raw = compose(
        sender="alice@example.org\r\nBcc: victim@example.net",
        hostname="mx.example.org\r\nX-Evil: 1",
        queue_id="Q1\r\nX-Evil: 2",
        recipients=[
            dsn.RecipientStatus(
                "bob@example.com\r\nX-Evil: 3", "failed", "5.1.1", "550 x", "mx\r\nX-Evil: 4"
            )
        ],
    )
    assert _bare_line_ends(raw) == []
    assert not any(line.startswith((b"Bcc", b"X-Evil")) for line in lines(raw))
    assert _field_names(raw) == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "Auto-Submitted",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
    ]
    assert len(status_blocks(raw)) == 2


def test_unicode_line_separators_are_neutralised():
    evil = "550 no\u2028Bcc: victim@example.net\u0085x"
    raw = compose(
        smtputf8=True,
        recipients=[dsn.RecipientStatus("bob@example.com", "failed", "5.1.1", evil, None)],
    )
    text = raw.decode("utf-8")
    assert "\u2028" not in text and "\u0085" not in text


def test_original_cannot_guess_the_boundary():
    # The boundary derives from public data, so an attacker can predict it and plant it.
    first = compose()
    boundary = parse(first).get_param("boundary")
    planted = ORIGINAL.replace(b"\r\n\r\n", b"\r\n--" + boundary.encode() + b"--\r\n\r\n", 1)
    raw = compose(original=planted)
    assert parse(raw).get_param("boundary") != boundary
    assert len(parts(raw)) == 3
    assert f"--{boundary}--" in parts(raw)[2].get_content()

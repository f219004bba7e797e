"""Trace headers: Received:, Return-Path:, and what a submission is completed with."""

from mailerd import trace


def test_missing_date_and_message_id_are_added():
    added = trace.missing_headers(
        b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n", queue_id="Q1", hostname="mx.test", when=0
    )
    assert added.startswith(b"Date: ") and added.endswith(b"Message-ID: <Q1@mx.test>\r\n")


def test_a_missing_from_is_the_envelope_sender():
    """A script's message without From: left without one, and unsigned (DKIM signs for the
    From: domain); Gmail refuses such mail (a helper's pass with mail programs)."""
    start = b"Subject: hi\r\nDate: x\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"
    added = trace.missing_headers(start, queue_id="Q", hostname="h", when=0, sender="a@ex.org")
    assert added == b"From: a@ex.org\r\n"
    # <>, one a header could carry only in UTF-8, and one longer than a path may be (MAIL's
    # line takes more, with its parameters: its From: line could pass 998 octets)
    for sender in ("", "j\u00f6rg@ex.org", "a" * 990 + "@ex.org"):
        none = trace.missing_headers(start, queue_id="Q", hostname="h", when=0, sender=sender)
        assert none == b""
    start = b"FROM: b@ex.org\r\nDate: x\r\nMessage-ID: <x@y>\r\n\r\n"
    kept = trace.missing_headers(start, queue_id="Q", hostname="h", when=0, sender="a@ex.org")
    assert kept == b""


def test_present_headers_are_kept_in_any_case():
    start = b"DATE: Thu, 1 Jan 1970 00:00:00 +0000\r\nmessage-id: <x@y>\r\n\r\nbody\r\n"
    assert trace.missing_headers(start, queue_id="Q", hostname="h", when=0) == b""


def test_only_the_header_section_counts():
    start = b"Subject: s\r\n\r\nMessage-ID: <in the body>\r\nDate: also body\r\n"
    added = trace.missing_headers(start, queue_id="Q", hostname="h", when=0)
    assert b"Message-ID: <Q@h>" in added and b"Date:" in added


def test_folded_lines_are_not_header_names():
    start = b"Subject: a\r\n Date: folded\r\n\r\n"
    assert b"Date:" in trace.missing_headers(start, queue_id="Q", hostname="h", when=0)


def test_received_header_is_ascii_without_smtputf8():
    header = trace.received(
        helo="h\u00e9llo.example",
        peer_ip="192.0.2.1",
        hostname="mx.test",
        protocol="ESMTP",
        queue_id="Q",
        recipient=None,
    )
    assert header.isascii() and b"from h?llo.example ([192.0.2.1])" in header
    utf8 = trace.received(
        helo="h\u00e9llo.example",
        peer_ip="2001:db8::1",
        hostname="mx.test",
        protocol="UTF8SMTP",
        queue_id="Q",
        recipient="b@x",
    )
    assert "h\u00e9llo".encode() in utf8 and b"[IPv6:2001:db8::1]" in utf8 and b"for <b@x>" in utf8


def test_hostile_helo_cannot_add_header_lines():
    header = trace.received(
        helo="x\r\nBcc: victim@example.org",
        peer_ip="192.0.2.1",
        hostname="mx.test",
        protocol="ESMTP",
        queue_id="Q",
        recipient=None,
    )
    assert header.count(b"\r\n") == 3 and b"\r\nBcc" not in header


def test_the_cached_date_is_the_date_of_that_second():
    import email.utils

    for when in (0, 0.9, 1, 86400 * 365.25 * 30, 86400 * 365.25 * 30 + 0.5, 1):
        assert trace.rfc5322_date(when) == email.utils.formatdate(int(when), localtime=True)


def test_queue_ids_differ_across_forked_processes():
    """`random` is reseeded in a forked child: two workers forked from one master, asked
    for an id in the same millisecond, must not give the same one."""
    import os

    readers = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, trace.new_id().encode())
            os._exit(0)
        os.close(w)
        readers.append((pid, r))
    ids = []
    for pid, r in readers:
        os.waitpid(pid, 0)
        ids.append(os.read(r, 100)[-8:])  # the last 40 bits: the random part
        os.close(r)
    assert ids[0] != ids[1]

"""The DATA decoder (end detection, dot-unstuffing) and the content checker."""

from __future__ import annotations

import pytest
from datacases import SMUGGLING_VECTORS, decode
from hypothesis import given, settings
from hypothesis import strategies as st

from mailerd.smtp.data import MAX_HOPS, BodyChecker, DataDecoder, HopCounter, received_fields


def check(*pieces: bytes, max_size: int = 10_000, max_line: int = 1000) -> BodyChecker:
    checker = BodyChecker(max_size, max_line)
    for piece in pieces:
        checker.feed(piece)
    checker.finish()
    return checker


# --- end of data and unstuffing ----------------------------------------------


def test_simple_body():
    body = b"Subject: x\r\n\r\nhello\r\n"
    assert decode(body + b".\r\n") == (body, True, b"")


def test_empty_message_right_after_354():
    assert decode(b".\r\n") == (b"", True, b"")


def test_leading_dot_unstuffed_on_first_and_later_lines():
    assert decode(b"..first\r\nmid\r\n..\r\n...x\r\n.\r\n")[0] == b".first\r\nmid\r\n.\r\n..x\r\n"


def test_dot_not_at_line_start_is_kept():
    assert decode(b"a.b\r\n a .\r\n.\r\n")[0] == b"a.b\r\n a .\r\n"


def test_pipelined_bytes_after_end_are_returned():
    assert decode(b"x\r\n.\r\nMAIL FROM:<a@b>\r\nQUIT\r\n") == (
        b"x\r\n",
        True,
        b"MAIL FROM:<a@b>\r\nQUIT\r\n",
    )


@pytest.mark.parametrize(
    "stream",
    [b"x\r\n.\r\n", b".\r\n", b"..\r\n.\r\n", b"a\r\n..b\r\n.\r\nNOOP\r\n", b"\r\n\r\n.\r\n"],
)
def test_every_two_way_split_gives_the_same_result(stream):
    whole = decode(stream)
    for cut in range(len(stream) + 1):
        assert decode(stream[:cut], stream[cut:]) == whole, cut


def test_byte_by_byte():
    stream = b"..a\r\nb\r\n..\r\n.\r\nQUIT\r\n"
    decoder = DataDecoder()
    out = b""
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
        if decoder.finished:
            rest = decoder.rest + stream[i + 1 :]
            break
    assert (out, rest) == (b".a\r\nb\r\n.\r\n", b"QUIT\r\n")


@pytest.mark.parametrize("vector", SMUGGLING_VECTORS, ids=repr)
def test_smuggling_vectors_do_not_end_data(vector):
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\nevil\r\n"
    content, finished, _ = decode(b"real" + vector + smuggled)
    assert not finished
    content, finished, rest = decode(b"real" + vector + smuggled + b".\r\nQUIT\r\n")
    assert finished and rest == b"QUIT\r\n"
    # a "\r\n." inside a vector is an ordinary stuffed line start
    assert content == (b"real" + vector + smuggled).replace(b"\r\n.", b"\r\n")


def test_feeding_after_finish_is_an_error():
    decoder = DataDecoder()
    decoder.feed(b".\r\n")
    with pytest.raises(RuntimeError):
        decoder.feed(b"x")


def test_held_back_bytes_are_at_most_four():
    decoder = DataDecoder()
    assert decoder.feed(b"abc\r\n.\r") == b"abc"
    assert decoder.feed(b"x") == b"\r\n\rx"  # "\r\n.\r" + "x": the dot was stuffing
    assert not decoder.finished


def test_large_input_is_emitted_per_feed():
    decoder = DataDecoder()
    chunk = b"y" * 78 + b"\r\n"
    sizes = [len(decoder.feed(chunk * 800)) for _ in range(5)]
    # each feed hands out everything except the held-back final CRLF
    assert all(size >= len(chunk) * 800 - 2 for size in sizes)


# --- content checks -----------------------------------------------------------


def test_clean_content_is_ok():
    checker = check(b"a\r\nb\r\n", b"c\r", b"\nd")
    assert checker.ok and checker.size == 10


@pytest.mark.parametrize(
    "pieces",
    [
        (b"a\nb\r\n",),
        (b"a\rb\r\n",),
        (b"a\r\r\n",),
        (b"a\r\n\n",),
        (b"a\r",),  # CR at the very end
        (b"a\r", b"b"),
        (b"a", b"\n"),
        (b"\n",),
    ],
)
def test_bare_cr_or_lf(pieces):
    checker = check(*pieces)
    assert checker.bare_cr_lf and not checker.ok


@pytest.mark.parametrize("pieces", [(b"a\x00b\r\n",), (b"ab\r\n", b"\x00"), (b"\x00",)])
def test_nul(pieces):
    checker = check(*pieces)
    assert checker.nul and not checker.ok and not checker.bare_cr_lf


def test_line_length_limit_counts_crlf():
    assert check(b"x" * 998 + b"\r\n").ok
    assert check(b"x" * 999 + b"\r\n").line_too_long
    assert check(b"a\r\n" + b"x" * 999 + b"\r\nb\r\n").line_too_long


def test_line_length_across_pieces():
    assert check(b"x" * 500, b"x" * 498 + b"\r\n").ok
    assert check(b"x" * 500, b"x" * 499, b"\r\n").line_too_long
    assert check(*([b"x"] * 1000)).line_too_long  # never terminated


def test_size_limit():
    assert check(b"x" * 100, max_size=100).ok
    checker = check(b"x" * 60, b"x" * 41, max_size=100)
    assert checker.too_big and checker.size == 101


def test_all_problems_are_recorded_independently():
    checker = check(b"x" * 2000 + b"\n", max_size=100)
    assert checker.bare_cr_lf and checker.line_too_long and checker.too_big


# --- hop count (Received: fields of the header section) -----------------------------------


def hops(*pieces: bytes) -> int:
    counter = HopCounter()
    for piece in pieces:
        counter.feed(piece)
    return counter.count


def reference_hops(content: bytes) -> int:
    """The definition, on the whole content: lines starting "Received" WSP* ":" (any case)
    before the first empty line."""
    count = 0
    for line in content.split(b"\r\n"):
        if not line:
            break
        name, colon, _ = line.partition(b":")
        count += bool(colon) and name.rstrip(b" \t").lower() == b"received"
    return count


HEADERS = [
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" * 3
    + b"Subject: x\r\n\r\nbody\r\n",
    b"received:x\r\nRECEIVED :y\r\nReceived\t: z\r\nReCeIvEd:\r\n\r\n",
    b"Received: first\r\n\tReceived: a continuation line\r\n Received: another\r\n\r\n",
    b"Subject: x\r\n\r\nReceived: in the body\r\nReceived: again\r\n",
    b"\r\nReceived: after an empty first line\r\n",
    b"X-Received: no\r\nReceivedX: no\r\nReceived-SPF: no\r\nReceived x: no\r\nReceived: yes\r\n",
    b"Received: the last field, unterminated",
    b"Received" + b" " * 40 + b":\r\nReceived\r\n\r\n",
    b"Received: a\r\n\r\n\r\nReceived: b\r\n",
]


@pytest.mark.parametrize("content", HEADERS)
def test_received_fields_are_counted_in_the_header_section_only(content):
    assert hops(content) == received_fields(content) == reference_hops(content)


@pytest.mark.parametrize("content", HEADERS)
def test_hop_count_does_not_depend_on_the_cuts(content):
    expected = reference_hops(content)
    for cut in range(len(content) + 1):
        assert hops(content[:cut], content[cut:]) == expected, cut
    assert hops(*(content[i : i + 1] for i in range(len(content)))) == expected


def test_hop_counter_keeps_at_most_a_line_start():
    counter = HopCounter()
    counter.feed(b"Received: a\r\nReceived" + b" " * 100_000)
    assert len(counter._tail) <= len(b"\r\nreceived ")  # white-box: no content kept
    counter.feed(b":\r\n\r\n")
    assert counter.count == 2 and counter._tail == b""


def test_too_many_hops():
    field = b"Received: from a by b\r\n"
    assert check(field * MAX_HOPS + b"\r\nbody\r\n", max_size=10**6).ok
    checker = check(field * (MAX_HOPS + 1) + b"\r\nbody\r\n", max_size=10**6)
    assert checker.too_many_hops and not checker.ok
    # in the body, any number is only text
    assert check(b"Subject: x\r\n\r\n" + field * 100, max_size=10**6).ok


header_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"\r\n", b"\r", b"\n", b"Received", b"rEcEiVeD", b":", b" ", b"\t", b"x"]),
        st.binary(max_size=4),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(content=header_bytes, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_hop_count_matches_the_reference_however_cut(content, cuts):
    points = sorted({min(c, len(content)) for c in cuts} | {0, len(content)})
    pieces = [content[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert hops(*pieces) == reference_hops(content)

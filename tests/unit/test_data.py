"""The DATA decoder (end detection, dot-unstuffing) and the content checker."""

from __future__ import annotations

import pytest
from datacases import SMUGGLING_VECTORS, decode

from mailerd.smtp.data import BodyChecker, DataDecoder


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

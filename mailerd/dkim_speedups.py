"""dkimpy, made faster where mailerd spends its time; importing this module does it, and the
results stay dkimpy's to the byte (were a replacement not to take, in a dkimpy that no longer
calls these names, signing and verifying would stay right, only slower):

- its RSASSA-PKCS1-v1_5 primitives, which it computes in pure Python (a 2048-bit signature
  takes it about 8 ms, a verification about 0.6 ms), by OpenSSL's through `cryptography`
  (SHA-256, what rsa-sha256 uses; anything else stays with dkimpy's own code);
- the two whitespace passes of relaxed canonicalisation (a regular expression over the whole
  body, each), skipped when the text has nothing for them to change: no tab or double space,
  no space or tab before a line end, as most mail; the removal of whitespace before line ends,
  when there is some, in linear time (dkimpy's is quadratic in a run of spaces); and its
  unfolding of a header field, a plain removal of CRLFs when the field has no bare LF;
- the removal of a body's trailing empty lines (both canonicalisations), in linear time;
- relaxed body canonicalisation, made once for all the signatures of a message being
  verified (`body_memo`; dkimpy makes it per signature: ten signatures over 22 MB, ten
  passes) and in pieces of whole lines, so that a check thread lets the worker's event loop
  run between them (a regular expression holds the GIL over its whole text);
- its tag=value parse, without a regular expression per tag: its pattern for a tag's name
  (an ASCII letter, then word characters, none required) asks only for the first letter;
- the removal of b='s value from a signature field before it is hashed: dkimpy's pattern
  tries its folding-whitespace alternatives at every character of the value (40 µs a
  signature); the same removal by one character-class run (its FWS matches exactly the
  runs of whitespace, so the value is its run of base64 characters and whitespace, less any
  whitespace after the last character, plus a line end that ends the field);
- the parse of a key record (base64, ASN.1 in Python), kept for the record's name and text:
  a sender's key is the same message after message, and a changed record is parsed anew;
- its message parse, which splits the whole message into lines (a regular expression) to
  find the header section and joins the body's lines again: a message whose lines all end in
  CRLF, as SMTP's do, has only its header section split, by bytes.split;
- its choice of the fields a signature covers, which scans the header section back for every
  name of h= (a name missing or used up costs a scan of all fields): a signature naming 23,000
  fields in a message of 28,000 took 31 s of CPU (an attacker's pass). Here, one pass makes an
  index of the fields by name, and each name of h= takes its next field from it.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Iterator
from typing import Any

import dkim
import dkim.canonicalization
import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from mailerd.remembered import Remembered


@functools.lru_cache(maxsize=64)
def _private_key(n: int, e: int, d: int, p: int, q: int) -> rsa.RSAPrivateKey:
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, n),
    )  # fmt: skip
    return numbers.private_key()


@functools.lru_cache(maxsize=256)
def _public_key(n: int, e: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


def sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's RSASSA_PKCS1_v1_5_sign(hash object, key dict)."""
    if getattr(digest, "name", None) != "sha256":
        return bytes(_dkimpy_sign(digest, private_key))
    key = _private_key(
        private_key["modulus"],
        private_key["publicExponent"],
        private_key["privateExponent"],
        private_key["prime1"],
        private_key["prime2"],
    )
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def verify(digest: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's RSASSA_PKCS1_v1_5_verify(hash object, signature, key dict)."""
    if getattr(digest, "name", None) != "sha256":
        return bool(_dkimpy_verify(digest, signature, public_key))
    try:
        key = _public_key(public_key["modulus"], public_key["publicExponent"])
        # A signature may come without its leading zero octets (some signers drop them, once
        # in 256 signatures); dkimpy takes it as the number it is, OpenSSL wants its full size
        signature = signature.rjust(key.key_size // 8 + (key.key_size % 8 > 0), b"\0")
        key.verify(signature, digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    except (InvalidSignature, ValueError):  # (ValueError: a key OpenSSL will not take)
        return False
    return True


_dkimpy_sign = dkim.RSASSA_PKCS1_v1_5_sign
_dkimpy_verify = dkim.RSASSA_PKCS1_v1_5_verify
dkim.RSASSA_PKCS1_v1_5_sign = sign
dkim.RSASSA_PKCS1_v1_5_verify = verify


def compress_whitespace(content: bytes) -> bytes:
    """dkimpy's: every run of spaces and tabs becomes one space."""
    if b"\t" not in content and b"  " not in content:
        return content
    return bytes(_dkimpy_compress(content))


def strip_trailing_whitespace(content: bytes) -> bytes:
    """dkimpy's: spaces and tabs before a line end go. Its pattern tries every character of a
    run of them that no line end follows, and the run again from there: a line of 996 spaces
    and an "x" cost it 1.3 s of CPU a megabyte, holding the GIL, so the whole worker waited (a
    second attacker's pass). Here a match starts only where a run does, and takes it whole."""
    # (a lone tab is found faster than a tab before a line end, and most text has none)
    if b" \r\n" not in content and (b"\t" not in content or b"\t\r\n" not in content):
        return content
    return _TRAILING_WHITESPACE.sub(b"\r\n", content)


_TRAILING_WHITESPACE = re.compile(rb"(?<![\t ])[\t ]++\r\n")


def unfold_header_value(content: bytes) -> bytes:
    """dkimpy's: every line end (CRLF or LF) goes."""
    if content.count(b"\n") != content.count(b"\r\n"):
        return bytes(_dkimpy_unfold(content))
    return content.replace(b"\r\n", b"")


_dkimpy_compress = dkim.canonicalization.compress_whitespace
_dkimpy_strip = dkim.canonicalization.strip_trailing_whitespace
_dkimpy_unfold = dkim.canonicalization.unfold_header_value
dkim.canonicalization.compress_whitespace = compress_whitespace
dkim.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
dkim.canonicalization.unfold_header_value = unfold_header_value


def parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy's RFC 6376 3.2 tag=value list parse, the same to its exceptions."""
    tags: dict[bytes, bytes] = {}
    tag_specs = tag_list.strip().split(b";")
    if not tag_specs[-1]:  # (a trailing semicolon is valid)
        tag_specs.pop()
    for tag_spec in tag_specs:
        key, sep, value = tag_spec.partition(b"=")
        if not sep:
            raise dkim.util.InvalidTagSpec(tag_spec)
        key, value = key.strip(), value.strip()
        if not key[:1].isalpha():  # (dkimpy's `^[a-zA-Z](\w)*`; bytes.isalpha is ASCII's)
            raise dkim.util.InvalidTagSpec(tag_spec)
        if key in tags:
            raise dkim.util.DuplicateTag(key)
        tags[key] = value
    return tags


_B_TAG = re.compile(rb"[;\s]b\s*=")
_B_VALUE = re.compile(rb"[\sa-zA-Z0-9+/=]*")
_WHITESPACE = b" \t\r\n\x0b\x0c"  # (what \s matches in a bytes pattern)


def without_b_values(field: bytes) -> bytes:
    """dkimpy's RE_BTAG.sub(b"\\1", field): the field with every b= tag's value removed."""
    out = []
    pos = 0
    while (tag := _B_TAG.search(field, pos)) is not None:
        start = tag.end()
        end = _B_VALUE.match(field, start).end()  # type: ignore[union-attr]  # (it matches "")
        while end > start and field[end - 1] in _WHITESPACE:
            end -= 1
        if field[end:] in (b"\r\n", b"\n"):
            end = len(field)
        out.append(field[pos:start])
        pos = end
    out.append(field[pos:])
    return b"".join(out)


class _BTagRemoval:
    """Stands in for dkimpy's RE_BTAG, whose only use is .sub(b"\\1", field)."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern

    def sub(self, repl: bytes, string: bytes, count: int = 0) -> bytes:
        if repl != b"\\1" or count:
            return self.pattern.sub(repl, string, count)
        return without_b_values(string)


_dkimpy_parse_tag_value = dkim.util.parse_tag_value
dkim.util.parse_tag_value = parse_tag_value
dkim.parse_tag_value = parse_tag_value
_dkimpy_btag = dkim.RE_BTAG
dkim.RE_BTAG = _BTagRemoval(_dkimpy_btag)


# The longest key record whose key is remembered: an RSA-8192 key's is about 1.5 KB. A
# sender's record can be a whole DNS message (64 KiB, looked up past the resolver's cache): 256
# of those would keep 16 MiB a worker of what senders chose.
KEY_RECORD_REMEMBERED = 2048


_dkimpy_evaluate_pk = dkim.evaluate_pk
# dkimpy's: the key of a DNS key record (its exceptions are not cached)
evaluate_pk = Remembered(_dkimpy_evaluate_pk, KEY_RECORD_REMEMBERED, 256)
dkim.evaluate_pk = evaluate_pk


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's: (header fields as [name, value] lists, the body with CRLF line ends). A
    message whose every line ends in CRLF, as SMTP's do, with an empty line, is parsed here:
    dkimpy's splits the whole message into lines and joins the body's again, which then
    gives it back unchanged."""
    if message.count(b"\n") != message.count(b"\r\n"):
        return _dkimpy_rfc822_parse(message)  # type: ignore[no-any-return]
    if message.startswith(b"\r\n"):
        return [], message[2:]
    blank = message.find(b"\r\n\r\n")
    if blank < 0:
        return _dkimpy_rfc822_parse(message)  # type: ignore[no-any-return]
    return _fields(message[:blank].split(b"\r\n")), message[blank + 4 :]


_FIELD_NAME = re.compile(rb"[\x21-\x7e]+")


def _fields(lines: list[bytes]) -> list[list[bytes]]:
    """dkimpy's header loop: a field per line, its continuation lines appended; a line that
    is neither (bar an mbox "From " line) is its MessageFormatError."""
    fields: list[list[bytes]] = []
    for line in lines:
        if line[0] in (0x09, 0x20):
            fields[-1][1] += line + b"\r\n"  # (before any field: IndexError, as dkimpy's)
            continue
        colon = line.find(b":", 1)  # (its name pattern is lazy: up to the first colon)
        if colon > 0 and _FIELD_NAME.fullmatch(line, 0, colon):
            fields.append([line[:colon], line[colon + 1 :] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return fields


_dkimpy_rfc822_parse = dkim.rfc822_parse
dkim.rfc822_parse = rfc822_parse


def select_headers(
    headers: list[tuple[bytes, bytes]] | list[list[bytes]], include_headers: list[bytes]
) -> list[Any]:
    """dkimpy's: for each name of `include_headers` (lower case), the last field of that name
    not taken yet (RFC 6376 5.4.2: the bottom-most first), none once they are all taken."""
    positions: dict[bytes, list[int]] = {}
    for i, field in enumerate(headers):
        positions.setdefault(field[0].lower(), []).append(i)
    taken: dict[bytes, int] = {}
    selected = []
    for name in include_headers:
        found = positions.get(name, ())
        n = taken.get(name, 0)
        if n < len(found):
            selected.append(headers[found[-1 - n]])
        taken[name] = n + 1
    return selected


_dkimpy_select_headers = dkim.select_headers
dkim.select_headers = select_headers


def strip_trailing_lines(content: bytes) -> bytes:
    """dkimpy's: the empty lines at the end go (one line end kept, or added when there is
    none). Its loop steps back one line end at a time in Python: 24 MB of empty lines cost it
    1.2 s a signature, which a third attacker's pass used to make a check thread late. Here a
    match starts only where a run of line ends does (so it is linear) and takes it whole."""
    # (only the line ends at the very end can be empty lines there: the search starts there)
    found = _TRAILING_LINES.search(content, len(content.rstrip(b"\r\n")))
    if found is None:
        return content + b"\r\n"
    return content[: found.start() + 2]


_TRAILING_LINES = re.compile(rb"(?<!\r\n)(?:\r\n)++\Z")
_dkimpy_strip_lines = dkim.canonicalization.strip_trailing_lines
dkim.canonicalization.strip_trailing_lines = strip_trailing_lines

BODY_PIECE = 256 * 1024  # octets of body canonicalised at a time (a few ms each)
_memo = threading.local()  # .bodies: {id(body): (body, canonical)} while `body_memo` is on


@contextlib.contextmanager
def body_memo() -> Iterator[None]:
    """In this thread, while it lasts: a body's relaxed canonical form is made once however
    many signatures ask for it (one message's verification)."""
    _memo.bodies = {}
    try:
        yield
    finally:
        _memo.bodies = None


def relaxed_body(body: bytes) -> bytes:
    """dkimpy's Relaxed.canonicalize_body, in pieces of whole lines (whitespace never runs
    across a line end, so each piece is canonicalised as the whole would be), and once per
    body while `body_memo` is on."""
    bodies: dict[int, tuple[bytes, bytes]] | None = getattr(_memo, "bodies", None)
    if bodies is not None:
        found = bodies.get(id(body))
        if found is not None and found[0] is body:
            return found[1]
    pieces = []
    start = 0
    while start < len(body):
        end = body.find(b"\r\n", start + BODY_PIECE)
        end = len(body) if end < 0 else end + 2
        pieces.append(compress_whitespace(strip_trailing_whitespace(body[start:end])))
        start = end
    canonical: bytes = dkim.canonicalization.correct_empty_body(
        dkim.canonicalization.strip_trailing_lines(b"".join(pieces))
    )
    if bodies is not None:
        bodies[id(body)] = (body, canonical)
    return canonical


_dkimpy_relaxed_body = dkim.canonicalization.Relaxed.canonicalize_body
dkim.canonicalization.Relaxed.canonicalize_body = staticmethod(relaxed_body)

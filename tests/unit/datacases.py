"""DATA cases shared by the decoder's, the session's and the fuzz tests: importable as
`datacases` because pytest puts tests/unit on sys.path for its test modules."""

from __future__ import annotations

from mailerd.smtp.data import DataDecoder

# hannob/smtpsmug: end-of-data look-alikes.  None of them may end DATA.
SMUGGLING_VECTORS = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
]


def decode(*chunks: bytes) -> tuple[bytes, bool, bytes]:
    """Feed chunks; return (content, finished, bytes after the terminator)."""
    decoder = DataDecoder()
    out = []
    for i, chunk in enumerate(chunks):
        out.append(decoder.feed(chunk))
        if decoder.finished:
            return b"".join(out), True, decoder.rest + b"".join(chunks[i + 1 :])
    return b"".join(out), False, b""

"""mailerd.worker.tlslayer: the server side of TLS over a connection's transport, against
Python's ssl client (OpenSSL) in memory, the bytes between them handed over by the test in
pieces of every size: the handshake, plaintext behind the client's Finished, close_notify both
ways, alerts for a failed handshake and a bad record, a megabyte in odd pieces."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from certs import CA, make_ca

from mailerd import tls
from mailerd.worker.tlslayer import TLSLayer


class RawTransport:
    """What the layer writes to: the bytes, and whether it was closed."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.sent += data

    def take(self) -> bytes:
        out = bytes(self.sent)
        self.sent.clear()
        return out

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("192.0.2.1", 1234)}.get(name, default)


class Client:
    """Python's TLS client over memory BIOs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="mx.test")

    def handshake(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def take(self) -> bytes:
        return self.outgoing.read()

    def give(self, data: bytes) -> None:
        self.incoming.write(data)

    def read_all(self) -> bytes:
        out = b""
        try:
            while chunk := self.tls.read(65536):
                out += chunk
        except ssl.SSLWantReadError:
            pass
        return out


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server_context(ca: CA) -> ssl.SSLContext:
    pair = ca.issue("mx.test", kind="ecdsa")
    context = tls.server_context([(Path(pair.cert), Path(pair.key))])
    assert context is not None
    return context


def client_context(ca: CA, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.maximum_version = version
    return context


class Pair:
    """A client and the layer, joined by the test."""

    def __init__(self, server_context: ssl.SSLContext, client: ssl.SSLContext) -> None:
        self.raw = RawTransport()
        self.layer = TLSLayer(self.raw, server_context)  # type: ignore[arg-type]
        self.client = Client(client)
        self.handshakes = 0

    def established(self) -> None:
        self.handshakes += 1

    def to_server(self, data: bytes, piece: int = 0) -> bytes | None:
        """Feed `data` to the layer (in pieces of `piece` bytes when given); the plaintext,
        and then None if the client said close_notify."""
        pieces = [data[i : i + piece] for i in range(0, len(data), piece)] if piece else [data]
        out = b""
        for part in pieces:
            got, ended = self.layer.receive(part, self.established)
            out += got
            if ended:
                assert out == b"", f"plaintext before the close_notify: {out!r}"
                return None
        return out

    def ends(self, data: bytes) -> bytes:
        """Feed `data`, which ends with the client's close_notify: the plaintext before it."""
        got, ended = self.layer.receive(data, self.established)
        assert ended
        return got

    def handshake(self, piece: int = 0, then: bytes = b"") -> bytes | None:
        """Run the handshake; `then` is plaintext the client sends behind its Finished, in the
        same feed. The plaintext the layer returned along the way."""
        plain = b""
        for _ in range(10):
            done = self.client.handshake()
            if done and then:
                self.client.tls.write(then)
            got = self.to_server(self.client.take(), piece)
            plain += got or b""
            self.client.give(self.raw.take())
            if done:
                break
        assert self.client.handshake() and not self.layer.handshaking
        return plain


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("piece", [0, 1, 7, 1000])
def test_handshake_then_plaintext_both_ways(server_context, ca, version, piece):
    pair = Pair(server_context, client_context(ca, version))
    plain = pair.handshake(piece, then=b"EHLO client.test\r\n")
    assert pair.handshakes == 1
    # What the client sent behind its Finished comes out after on_handshake, not lost.
    assert plain == b"EHLO client.test\r\n"
    assert pair.layer.get_extra_info("ssl_object").version() == pair.client.tls.version()
    pair.layer.write(b"250 mx.test\r\n")
    pair.client.give(pair.raw.take())
    assert pair.client.read_all() == b"250 mx.test\r\n"
    pair.client.tls.write(b"QUIT\r\n")
    assert pair.to_server(pair.client.take(), piece) == b"QUIT\r\n"


def test_a_megabyte_in_odd_pieces(server_context, ca):
    pair = Pair(server_context, client_context(ca))
    pair.handshake()
    body = bytes(range(256)) * 4096
    pair.client.tls.write(body)
    assert pair.to_server(pair.client.take(), piece=4093) == body


def test_close_notify_both_ways(server_context, ca):
    pair = Pair(server_context, client_context(ca))
    pair.handshake()
    pair.layer.write(b"221 bye\r\n")
    pair.layer.close()
    assert pair.raw.closed
    pair.client.give(pair.raw.take())
    assert pair.client.read_all() == b"221 bye\r\n"  # (then the close_notify: b"")
    pair.layer.write(b"too late\r\n")  # (ignored, not an error)
    assert pair.raw.take() == b""
    # The client's close_notify is the end of its data: None.
    other = Pair(server_context, client_context(ca))
    other.handshake()
    with pytest.raises(ssl.SSLWantReadError):
        other.client.tls.unwrap()
    assert other.to_server(other.client.take()) is None


def test_a_close_notify_behind_a_command_ends_the_data_after_it(server_context, ca):
    """(A client that sends its last command and closes, in one packet.)"""
    pair = Pair(server_context, client_context(ca))
    pair.handshake()
    pair.client.tls.write(b"QUIT\r\n")
    with pytest.raises(ssl.SSLWantReadError):
        pair.client.tls.unwrap()
    assert pair.ends(pair.client.take()) == b"QUIT\r\n"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (TLS 1.0 and 1.1: the point)
def test_a_failed_handshake_sends_its_alert(server_context, ca):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    pair = Pair(server_context, old)
    pair.client.handshake()
    refused(pair, pair.client.take(), "UNSUPPORTED_PROTOCOL")
    told(pair.client.handshake, "TLSV1_ALERT_PROTOCOL_VERSION")


def test_a_bad_record_is_an_error_with_an_alert(server_context, ca):
    pair = Pair(server_context, client_context(ca))
    pair.handshake()
    pair.client.tls.write(b"MAIL FROM:<a@b>\r\n")
    record = bytearray(pair.client.take())
    record[-1] ^= 1  # (the AEAD tag no longer matches)
    refused(pair, bytes(record), "DECRYPTION_FAILED_OR_BAD_RECORD_MAC")
    told(pair.client.read_all, "SSLV3_ALERT_BAD_RECORD_MAC")


def refused(pair: Pair, data: bytes, reason: str) -> None:
    """The layer refuses `data` for OpenSSL's `reason`; what it wrote goes to the client."""
    with pytest.raises(ssl.SSLError) as failed:
        pair.to_server(data)
    assert failed.value.reason == reason
    pair.client.give(pair.raw.take())


def told(client_step: Callable[[], object], alert: str) -> None:
    """The client's next step meets the layer's `alert`."""
    with pytest.raises(ssl.SSLError) as said:
        client_step()
    assert said.value.reason == alert


def test_nothing_is_written_before_the_handshake_is_done(server_context, ca):
    """(A worker shutting down says 421 to every session: not in clear into a handshake.)"""
    pair = Pair(server_context, client_context(ca))
    pair.layer.write(b"421 4.3.2 Service shutting down\r\n")
    assert pair.raw.take() == b""
    pair.layer.close()
    assert pair.raw.closed and pair.raw.take() == b""


def test_a_session_closed_as_the_handshake_ends_writes_nothing_after(server_context, ca):
    """(A worker that is stopping says 421 and closes in the session's start, which runs
    inside receive(): nothing is read or written after that.)"""
    pair = Pair(server_context, client_context(ca))

    def closes() -> None:
        pair.layer.write(b"421 4.3.2 Service shutting down\r\n")
        pair.layer.close()

    pair.established = closes  # type: ignore[method-assign]
    pair.client.handshake()
    pair.to_server(pair.client.take())
    pair.client.give(pair.raw.take())
    pair.client.handshake()
    pair.client.tls.write(b"EHLO client.test\r\n")
    assert pair.to_server(pair.client.take()) == b""  # (finished, then closed: nothing more)
    assert pair.raw.closed
    pair.client.give(pair.raw.take())
    assert pair.client.read_all() == b"421 4.3.2 Service shutting down\r\n"

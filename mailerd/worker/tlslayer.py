"""TLS on a connection's own TCP transport: the server side of one TLS connection, OpenSSL
(`ssl.SSLObject`) between two memory BIOs, fed by the connection's data_received and writing to
its transport. To the session it looks like the transport it replaces (write, close, pause and
resume reading, get_extra_info).

Why not the event loop's TLS (`loop.start_tls`, `connect_accepted_socket(ssl=...)`): when a
handshake fails, it closes the connection without sending the alert OpenSSL wrote, so a client
offering only TLS 1.0, or no cipher we accept, reports a lost connection instead of "protocol
version" or "handshake failure", and its user cannot tell why. Here every byte OpenSSL writes,
alerts included, is sent before the connection closes. It is also one path for STARTTLS and
implicit TLS, driven without a task or a future, and cheaper per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any

READ_SIZE = 65536  # plaintext taken per SSL_read: a full TLS record is 16 KiB


class TLSLayer:
    """The server side of one TLS connection over `raw`, a plain stream transport."""

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.handshaking = True
        self.closed = False

    def receive(self, data: bytes, on_handshake: Callable[[], None]) -> tuple[bytes, bool]:
        """Take `data` from the client: the plaintext it completes (b"" for none yet), and
        whether the client has said close_notify (the end of its data, after that plaintext).
        `on_handshake` runs when the handshake is done, before any plaintext is returned (a
        client may send its first command in the packet that ends the handshake). A failed
        handshake or a bad record raises ssl.SSLError, the alert already on its way to the
        client."""
        self.incoming.write(data)
        tls = self.ssl_object
        if self.handshaking:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self.flush()
                return b"", False
            except ssl.SSLError:
                self.flush()  # (the alert that says why)
                raise
            self.handshaking = False
            self.flush()
            on_handshake()
            if self.closed:  # (the session ended at once: a worker shutting down)
                return b"", False
        chunks = []
        closed = False
        try:
            while chunk := tls.read(READ_SIZE):
                chunks.append(chunk)
                if not self.incoming.pending and not tls.pending():
                    break  # (all read: one more read would only say so, by an exception)
            else:
                closed = True  # (b"": the client's close_notify)
        except ssl.SSLWantReadError:
            pass  # (the rest of a record is still on its way)
        finally:
            self.flush()  # (what reading made OpenSSL say: a KeyUpdate's answer, an alert)
        return b"".join(chunks), closed

    def flush(self) -> None:
        """Send what OpenSSL has written (nothing once the connection is closing)."""
        if self.outgoing.pending and not self.raw.is_closing():
            self.raw.write(self.outgoing.read())

    # -- the transport the session writes to -------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or self.handshaking:
            return  # (nothing can be said before the handshake: a 421 at shutdown is dropped)
        self.ssl_object.write(data)
        self.flush()

    def close(self) -> None:
        """Our close_notify (the client's is not waited for: RFC 8446 6.1 lets either side
        close its half), then the TCP connection, once what is written has gone."""
        if self.closed:
            return
        self.closed = True
        if not self.handshaking:
            # (It raises SSLWantReadError, ours sent and the client's not yet in, or another
            # SSLError for a connection that has failed: nothing to close cleanly.)
            with contextlib.suppress(ssl.SSLError):
                self.ssl_object.unwrap()
            self.flush()
        self.raw.close()

    def is_closing(self) -> bool:
        return self.closed or self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.ssl_object
        return self.raw.get_extra_info(name, default)

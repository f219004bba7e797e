"""The worker↔delivery channel: length-prefixed frames on an AF_UNIX stream, bodies as fds.

Each worker holds its own stream connection to the delivery process (the master owns the
listening socket, so a restarted delivery process is simply reconnected to). A frame is

    !II header-length body-length | header (JSON, UTF-8) | inline body (body-length bytes)

Small bodies ride inline; a large one is written by the worker to an unlinked temp file whose
descriptor travels in SCM_RIGHTS ancillary data attached to the frame's first byte (header
`"fd": true`), so a 25 MiB message costs the channel a few hundred bytes and never stalls other
sessions. Requests carry an `id`; the delivery process answers each with a header-only frame
`{"id", "code", "status", "text"}` once the message is durable (or has failed).

Both directions are non-blocking and buffered and both ends always keep reading, so neither side
can block the other (the write–write deadlock of a naive pipe design). See docs/channel.md.
"""

from __future__ import annotations

import array
import asyncio
import collections
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from mailerd.ipc import unixpath

PREFIX = struct.Struct("!II")
MAX_HEADER = 1 << 20
MAX_INLINE = 256 * 1024
_FD_SPACE = socket.CMSG_SPACE(64 * array.array("i").itemsize)
_READ_SIZE = 256 * 1024
_MAX_GATHER = 64  # frames per sendmsg() (IOV_MAX is 1024)
_MAX_PENDING_FDS = 64  # descriptors received ahead of the frames that announce them

FrameHandler = Callable[[dict[str, Any], bytes, int | None], None]
Answer = tuple[dict[str, Any], int | None]  # an answer's header, and the descriptor it carried


class ChannelError(Exception):
    """The peer broke the framing; the connection is closed."""


class Channel:
    """One end of a channel connection, driven by the running asyncio loop."""

    def __init__(
        self,
        sock: socket.socket,
        on_frame: FrameHandler,
        on_close: Callable[[], None],
        max_body: int | None = None,
        eager: bool = False,
        max_header: int = MAX_HEADER,
    ) -> None:
        sock.setblocking(False)
        self._max_body = max_body
        self._max_header = max_header
        # Eager: each frame is sent at once, not at the end of the loop iteration. For a
        # worker's requests, on a message's way to its 250, where waiting for the iteration to
        # end added its other work to every wait. (The writer's answers: see flush().)
        self._eager = eager
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._on_frame = on_frame
        self._on_close = on_close
        self._in = bytearray()
        # One receive buffer for the channel's life: recvmsg() with a fresh 256 KiB bytes object
        # per call costs an mmap/munmap pair and page faults for every frame.
        self._buffer = bytearray(_READ_SIZE)
        self._view = memoryview(self._buffer)
        self._fds: collections.deque[int] = collections.deque()
        self._out: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._writing = False
        self._flush_soon = False
        self._closing = False
        self.closed = False
        self.loop.add_reader(sock.fileno(), self._readable)

    def send(self, header: dict[str, Any], body: bytes = b"", fd: int | None = None) -> None:
        """Queue one frame. The channel owns `fd` from here on and closes it once sent."""
        if self.closed:
            if fd is not None:
                os.close(fd)
            raise ConnectionError("channel closed")
        self._out.append((frame(header, body, fd is not None), _fds(fd)))
        if self._writing or self._flush_soon:
            return  # (a flush is already due)
        if self._eager:
            self._flush()
        else:
            # At the end of this loop iteration, so that the frames queued meanwhile (a batch
            # of answers, say) leave in one sendmsg() rather than one each.
            self._flush_soon = True
            self.loop.call_soon(self._flush)

    def close(self) -> None:
        if self.closed:
            return
        if self._out and not self._closing:
            self._closing = True
            self._flush()  # what was queued in this loop iteration still goes, if it can
            if self.closed:
                return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        for fd in self._fds:
            os.close(fd)
        self._out.clear()
        self._fds.clear()
        self.sock.close()
        self._on_close()

    def flush(self) -> None:
        """Send what is queued now, rather than at the end of the loop iteration."""
        self._flush()

    def _flush(self) -> None:
        self._flush_soon = False
        if self.closed:
            return
        while self._out:
            buffers, fds = self._next_send()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            try:
                sent = self.sock.sendmsg(buffers, ancillary if fds else [])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            for fd in fds:
                os.close(fd)
            self._consume(sent)
        want_writer = bool(self._out)
        if want_writer != self._writing:
            if want_writer:
                self.loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self.loop.remove_writer(self.sock.fileno())
            self._writing = want_writer

    def _next_send(self) -> tuple[list[bytes], list[int]]:
        """What one sendmsg() takes: a frame with descriptors alone (they travel with its
        bytes), else the run of descriptor-free frames at the head of the queue."""
        data, fds = self._out[0]
        if fds:
            return [data], fds
        buffers: list[bytes] = []
        size = 0
        for data, fds in self._out:
            if fds or len(buffers) == _MAX_GATHER or (buffers and size + len(data) > _READ_SIZE):
                break
            buffers.append(data)
            size += len(data)
        return buffers, []

    def _consume(self, sent: int) -> None:
        """Drop `sent` bytes from the head of the queue (the descriptors went with the first)."""
        while sent:
            data, _ = self._out[0]
            if sent < len(data):
                self._out[0] = (data[sent:], [])
                return
            sent -= len(data)
            self._out.popleft()

    def _readable(self) -> None:
        try:
            size, ancdata, _, _ = self.sock.recvmsg_into(
                [self._view], _FD_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if len(self._fds) > _MAX_PENDING_FDS:  # sent without frames announcing them
            self.close()
            return
        if not size:
            self.close()
            return
        self._in += self._view[:size]
        try:
            self._parse()
        except ChannelError:
            self.close()

    def _parse(self) -> None:
        while len(self._in) >= PREFIX.size and not self.closed:
            header_len, body_len = PREFIX.unpack_from(self._in)
            if header_len > self._max_header:
                raise ChannelError("header too large")
            if self._max_body is not None and body_len > self._max_body:
                raise ChannelError("inline body too large")
            end = PREFIX.size + header_len + body_len
            if len(self._in) < end:
                return
            try:
                # Decoded here: json.loads() of bytes first guesses their encoding.
                header = json.loads(self._in[PREFIX.size : PREFIX.size + header_len].decode())
            except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError included)
                raise ChannelError("bad header") from exc
            if not isinstance(header, dict):  # (a list of lists nested 100,000 deep, a number)
                raise ChannelError("bad header: not an object")
            body = bytes(self._in[PREFIX.size + header_len : end])
            del self._in[:end]
            fd = None
            if header.get("fd"):
                if not self._fds:
                    raise ChannelError("frame announces a descriptor that did not arrive")
                fd = self._fds.popleft()
            self._on_frame(header, body, fd)


def frame(header: dict[str, Any], body: bytes = b"", with_fd: bool = False) -> bytes:
    """A frame's bytes; `with_fd`: a descriptor travels beside them."""
    if with_fd:
        header = {**header, "fd": True}
    encoded = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return PREFIX.pack(len(encoded), len(body)) + encoded + body


def send_packet(sock: socket.socket, header: dict[str, Any], fd: int | None = None) -> None:
    """Send one header-only frame, and `fd` beside it (it stays the caller's), from a process
    without an event loop (the master), over a SOCK_SEQPACKET socket: a packet leaves whole or
    not at all (OSError), so a failure can never leave half a frame that garbles the rest."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", _fds(fd)))]
    sock.sendmsg([frame(header, with_fd=fd is not None)], ancillary if fd is not None else [])


def _expire(future: asyncio.Future[Answer]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no answer in time"))


def _fds(fd: int | None) -> list[int]:
    return [] if fd is None else [fd]


class Client:
    """The requesting side: request/answer over one channel.

    With a `path` it connects (and reconnects after a break) to a listening socket, as workers
    do to the delivery process; with a connected `sock` it uses that one socket for its life.
    """

    def __init__(
        self,
        path: str | None,
        timeout: float,
        sock: socket.socket | None = None,
        on_broken: Callable[[], None] | None = None,
        max_header: int = MAX_HEADER,
    ) -> None:
        """`max_header`: the largest answer header taken (`mailerd queue`'s listing of a big
        queue is far more than a request's)."""
        self.path = path
        self.timeout = timeout
        self._max_header = max_header
        self._sock = sock
        self._on_broken = on_broken
        self._channel: Channel | None = None
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._next_id = 0

    async def request(
        self, header: dict[str, Any], body: bytes = b"", fd: int | None = None
    ) -> dict[str, Any]:
        """Send one request and wait for its answer; raises on timeout or a broken channel."""
        answer, passed = await self.request_fd(header, body, fd)
        if passed is not None:  # nobody asked for one: not ours to keep open
            os.close(passed)
        return answer

    async def request_fd(
        self, header: dict[str, Any], body: bytes = b"", fd: int | None = None
    ) -> Answer:
        """`request`, for an answer that may carry a descriptor: the caller owns it."""
        channel = self._channel if self._channel and not self._channel.closed else None
        if channel is None:
            try:
                channel = self._channel = await self._connect()
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
        self._next_id += 1
        request_id = self._next_id
        loop = channel.loop  # (asyncio.get_running_loop() makes a getpid() call each time)
        future: asyncio.Future[Answer] = loop.create_future()
        self._pending[request_id] = future
        # A plain timer rather than asyncio.wait_for(), which costs a task per request.
        timer = loop.call_later(self.timeout, _expire, future)
        try:
            channel.send({**header, "id": request_id}, body, fd)
            return await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)

    async def _connect(self) -> Channel:
        if self.path is None:
            sock, self._sock = self._sock, None
            if sock is None:
                raise ConnectionError("channel closed")
            return Channel(
                sock, self._answered, self._broken, eager=True, max_header=self._max_header
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            with unixpath.reachable(self.path) as address:
                await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return Channel(sock, self._answered, self._broken, eager=True, max_header=self._max_header)

    def _answered(self, header: dict[str, Any], body: bytes, fd: int | None) -> None:
        future = self._pending.get(header.get("id", -1))
        if future is not None and not future.done():
            future.set_result((header, fd))
        elif fd is not None:
            os.close(fd)

    def _broken(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("peer process went away"))
        if self._on_broken is not None:
            self._on_broken()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._sock is not None:  # never used: the peer must still see EOF
            self._sock.close()
            self._sock = None

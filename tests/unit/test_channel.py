"""The worker↔delivery channel over a real socketpair: framing, descriptors, back-pressure."""

import asyncio
import os
import socket
import struct

import pytest

from mailerd.ipc.channel import Channel


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def pair(on_frame_b):
    a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    closed = asyncio.Event()
    a = Channel(a_sock, lambda h, b, fd: None, closed.set)
    b = Channel(b_sock, on_frame_b, lambda: None)
    return a, b, closed


def test_frames_arrive_in_order_with_bodies_and_descriptors(tmp_path):
    async def main():
        got = []
        done = asyncio.Event()

        def on_frame(header, body, fd):
            data = None
            if fd is not None:
                data = os.pread(fd, 10_000_000, 0)
                os.close(fd)
            got.append((header["n"], body, data))
            if len(got) == 200:
                done.set()

        a, b, _ = await pair(on_frame)
        for n in range(200):
            if n % 10 == 0:
                fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR)
                os.write(fd, b"F%d" % n * 100_000)
                a.send({"n": n}, b"", fd)
            else:
                a.send({"n": n, "ü": "snow ☃"}, b"x%d" % n * 1000)
        await done.wait()
        a.close()
        b.close()
        return got

    got = run(main())
    assert [n for n, _, _ in got] == list(range(200))
    for n, body, data in got:
        if n % 10 == 0:
            assert data == b"F%d" % n * 100_000 and body == b""
        else:
            assert body == b"x%d" % n * 1000 and data is None


def test_large_writes_do_not_block_and_both_directions_flow():
    async def main():
        received = []
        done = asyncio.Event()

        def on_frame(header, body, fd):
            received.append(len(body))
            if len(received) == 50:
                done.set()

        a, b, _ = await pair(on_frame)
        # 50 × 256 KiB is far beyond the socket buffer: send() must queue, not block.
        for _ in range(50):
            a.send({}, b"y" * 262144)
        await done.wait()
        return received

    assert run(main()) == [262144] * 50


def test_peer_close_is_reported():
    async def main():
        a, b, closed = await pair(lambda h, body, fd: None)
        b.close()
        await closed.wait()
        return a.closed

    assert run(main())


def test_garbage_closes_the_channel():
    async def main():
        a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        closed = asyncio.Event()
        Channel(b_sock, lambda h, body, fd: None, closed.set)
        a_sock.sendall(b"\x00\x00\x00\x05\x00\x00\x00\x00{bad}")
        await closed.wait()
        a_sock.close()
        return True

    assert run(main())


@pytest.mark.parametrize(
    "header",
    [b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b"7", b'"op"'],
    ids=["deep", "list", "number", "string"],
)
def test_a_header_that_is_no_object_closes_the_channel(header: bytes):
    """JSON, but no header: an array nested past Python's recursion limit (a RecursionError
    escaped the reader, the frame stayed, and every read raised again), or no object at all.
    The channel closes, as for any garbage; nothing reaches the handler."""
    frames: list[object] = []

    async def main() -> bool:
        a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        closed = asyncio.Event()
        Channel(b_sock, lambda h, body, fd: frames.append(h), closed.set)
        a_sock.sendall(struct.pack(">II", len(header), 0) + header)
        await asyncio.wait_for(closed.wait(), 5)
        a_sock.close()
        return True

    assert run(main())
    assert frames == []


def test_client_requests_get_their_own_answers_a_timeout_or_a_broken_channel():
    """Client.request: answers matched by id out of order; no answer in time is a
    TimeoutError (and a late answer is ignored); the peer going away fails what is pending."""
    from mailerd.ipc.channel import Client

    async def main():
        c_sock, s_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        held = []

        def on_frame(header, body, fd):
            if header.get("hold"):
                held.append(header)
            else:
                server.send({"id": header["id"], "echo": body.decode()})

        server = Channel(s_sock, on_frame, lambda: None)
        client = Client(None, 0.2, sock=c_sock)
        answers = await asyncio.gather(*(client.request({}, b"m%d" % n) for n in range(50)))
        assert [a["echo"] for a in answers] == [f"m{n}" for n in range(50)]
        try:
            await client.request({"hold": True})
        except TimeoutError:
            pass
        else:
            raise AssertionError("no TimeoutError")
        server.send({"id": held[0]["id"], "echo": "late"})  # ignored, nobody waits
        assert (await client.request({}, b"after"))["echo"] == "after"
        pending = asyncio.ensure_future(client.request({"hold": True}))
        await asyncio.sleep(0.05)
        server.close()
        try:
            await pending
        except ConnectionError:
            pass
        else:
            raise AssertionError("no ConnectionError")
        client.close()

    run(main())


def test_an_answer_can_carry_a_descriptor_to_whoever_asked_for_it(tmp_path):
    """request_fd hands the answer's descriptor to the caller (how a worker gets its channel
    to the mailbox writer); request, which expects none, closes one rather than leak it."""
    from mailerd.ipc.channel import Client

    async def main():
        c_sock, s_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def on_frame(header, body, fd):
            passed = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR)
            os.write(passed, b"for %s" % body)
            server.send({"id": header["id"]}, b"", passed)

        server = Channel(s_sock, on_frame, lambda: None)
        client = Client(None, 5, sock=c_sock)
        answer, fd = await client.request_fd({}, b"you")
        assert fd is not None and os.pread(fd, 100, 0) == b"for you"
        os.close(fd)
        before = set(os.listdir("/proc/self/fd"))
        for _ in range(20):
            assert "id" in await client.request({}, b"nobody")
        await asyncio.sleep(0.05)
        leaked = set(os.listdir("/proc/self/fd")) - before
        assert not leaked, f"descriptors left open: {leaked}"
        client.close()
        server.close()

    run(main())


def test_frames_queued_together_leave_together_and_survive_a_close():
    """Frames sent in one loop iteration go out in one sendmsg(); closing right after sending
    still delivers them; a frame with a descriptor keeps it."""

    async def main():
        got = []
        done = asyncio.Event()

        def on_frame(header, body, fd):
            if fd is not None:
                os.close(fd)
            got.append((header["n"], body, fd is not None))
            if len(got) == 7:
                done.set()

        a, b, _ = await pair(on_frame)
        sends = []
        real = a.sock.sendmsg
        a.sock = type("Spy", (), {})()  # count the system calls the channel makes
        a.sock.sendmsg = lambda buffers, anc: sends.append(len(buffers)) or real(buffers, anc)
        for n in range(3):
            a.send({"n": n}, b"x" * n)
        read_end, write_end = os.pipe()
        a.send({"n": 3}, b"", read_end)
        for n in range(4, 7):
            a.send({"n": n}, b"y")
        await asyncio.sleep(0.05)
        assert sends == [3, 1, 3]
        os.close(write_end)
        await asyncio.wait_for(done.wait(), 5)
        assert [g[0] for g in got] == list(range(7)) and [g[2] for g in got].count(True) == 1

        got.clear()
        done.clear()
        c, d, _ = await pair(on_frame)
        for n in range(7):
            c.send({"n": n}, b"z")
        c.close()
        await asyncio.wait_for(done.wait(), 5)
        assert [g[0] for g in got] == list(range(7))
        b.close()
        d.close()

    run(main())


def test_an_eager_channel_sends_a_request_before_the_loop_runs_again():
    """A Client's channel (eager) writes a request at once: waiting for the end of the loop
    iteration would add other sessions' work to every message's wait for its 250."""

    async def main():
        a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        eager = Channel(a_sock, lambda h, b, fd: None, lambda: None, eager=True)
        eager.send({"n": 1}, b"body")
        b_sock.setblocking(False)
        assert b"body" in b_sock.recv(1000)  # no await in between
        eager.close()
        b_sock.close()

    run(main())

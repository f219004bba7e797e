"""The mailbox writer's loop over real sockets: batches in the loop or a thread, and the
channels the delivery process hands it for workers."""

import asyncio
import contextlib
import errno
import fcntl
import json
import multiprocessing
import os
import re
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from mailerd.ipc.channel import PREFIX, Client
from mailerd.ipc.writer_client import WriterClient
from mailerd.writer.mailbox import Copy, MailboxStore
from mailerd.writer.service import MailboxQueue, WriterService


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _service_with_worker(tmp_path, max_body=None):
    """A running WriterService, the delivery process's client, and one adopted worker client."""
    control, service_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    service = WriterService(MailboxStore(tmp_path), service_end, max_body)
    serving = asyncio.create_task(service.run())
    delivery = WriterClient(control, lambda: None)
    worker_end, writer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    await delivery.adopt(os.dup(writer_end.fileno()))
    writer_end.close()
    lost = asyncio.Event()
    worker = Client(None, 5, sock=worker_end, on_broken=lost.set)
    return serving, delivery, worker, lost


def _hold_lock(path, ready, release):
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    ready.set()
    release.wait(20)


@contextlib.contextmanager
def _locks_held(*mailboxes):
    """Each mailbox (made if need be) with its .lock held by a process of its own, as an IMAP
    server would hold it, until the event given to the block is set or the block ends."""
    release = multiprocessing.Event()
    holders = []
    try:
        for box in mailboxes:
            box.mkdir(exist_ok=True)
            (box / ".lock").touch()
            ready = multiprocessing.Event()
            holders.append(
                multiprocessing.Process(target=_hold_lock, args=(box / ".lock", ready, release))
            )
            holders[-1].start()
            assert ready.wait(10)
        yield release
    finally:
        release.set()
        for holder in holders:
            holder.join(10)


def test_a_locked_mailbox_waits_in_a_thread_not_in_the_loop(tmp_path):
    """A mailbox written back to back has its small batches written in the loop's thread, but
    one whose lock is held elsewhere (an IMAP server) must not stall the loop: it waits in the
    pool while other mailboxes go on."""
    spool = MailboxStore(tmp_path, lock_timeout=20)
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(
        target=_hold_lock, args=(tmp_path / "bob" / ".lock", ready, release)
    )

    async def main():
        executor = ThreadPoolExecutor(2)
        try:
            bob = MailboxQueue("bob", spool, executor, lambda n: None)
            carol = MailboxQueue("carol", spool, executor, lambda n: None)
            assert await bob.submit(Copy(b"", b"x\r\n")) == 1  # the pool: now warm
            holder.start()
            assert await asyncio.get_running_loop().run_in_executor(None, ready.wait, 10)
            for_bob = bob.submit(Copy(b"", b"y\r\n"))  # tried here, then the pool
            await asyncio.sleep(0.2)
            assert await asyncio.wait_for(carol.submit(Copy(b"", b"z\r\n")), 5) == 1
            assert not for_bob.done()
            release.set()
            assert await asyncio.wait_for(for_bob, 15) == 2
        finally:
            executor.shutdown(wait=True)

    try:
        run(main())
    finally:
        release.set()
        if holder.pid is not None:
            holder.join(10)
    assert sorted(int(n) for n in os.listdir(tmp_path / "bob") if n.isdigit()) == [1, 2]


def test_a_worker_channel_carries_mailbox_writes_and_nothing_else(tmp_path):
    """The delivery process hands the writer a worker's end (`adopt`); on it the worker can
    write a mailbox, but an op (here the delivery process's own adopt) is refused, and
    when the delivery process's channel closes the worker's closes too."""
    (tmp_path / "dave").mkdir()

    async def main():
        serving, delivery, worker, lost = await _service_with_worker(tmp_path)
        number = await worker.request(
            {"op": "write", "mailbox": "dave", "head": 4}, b"X: 1hello\r\n"
        )
        assert number == {"id": 1, "number": 1}
        refused = await worker.request({"op": "adopt"})
        assert refused["errno"] == 22 and "number" not in refused
        assert await delivery.deliver("dave", b"", b"second\r\n") == 2
        delivery.close()
        await asyncio.wait_for(lost.wait(), 5)
        await asyncio.wait_for(serving, 5)

    run(main())
    assert (tmp_path / "dave" / "1").read_bytes() == b"X: 1hello\r\n"
    assert (tmp_path / "dave" / "2").read_bytes() == b"second\r\n"


def test_the_writer_adopts_a_bounded_number_of_worker_channels(tmp_path, monkeypatch):
    """A worker that keeps asking cannot run the root writer out of descriptors: past the cap
    the adopt is refused (the worker then commits through the delivery process)."""
    from mailerd.writer import service

    monkeypatch.setattr(service, "MAX_WORKER_CHANNELS", 2)

    async def main():
        control, service_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        service = WriterService(MailboxStore(tmp_path), service_end)
        serving = asyncio.create_task(service.run())
        delivery = WriterClient(control, lambda: None)
        kept = []
        for n in range(3):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            kept.append(ours)
            try:
                await delivery.adopt(os.dup(theirs.fileno()))
            except ConnectionError:
                assert n == 2
            else:
                assert n < 2
            theirs.close()
        assert len(service.workers) == 2
        delivery.close()
        await asyncio.wait_for(serving, 5)
        for sock in kept:
            sock.close()

    run(main())


def test_malformed_worker_frames_are_refused_or_close_the_channel(tmp_path):
    """The root writer reads frames straight from workers: a bad `head` is refused with EINVAL
    and nothing is written; an inline body larger than a worker ever sends closes the channel
    (it is not buffered in root's memory)."""
    from mailerd.writer.service import MAX_HEAD, MAX_INLINE

    (tmp_path / "dave").mkdir()

    async def main():
        serving, delivery, worker, lost = await _service_with_worker(tmp_path)
        for head in ("4", 99, -1, 1.5, None):
            answer = await worker.request({"op": "write", "mailbox": "dave", "head": head}, b"abc")
            assert answer.get("errno") == 22 and "number" not in answer, (head, answer)
        try:
            await worker.request(
                {"op": "write", "mailbox": "dave"}, b"x" * (MAX_INLINE + MAX_HEAD + 1)
            )
        except ConnectionError:
            pass
        else:
            raise AssertionError("an oversized frame was accepted")
        await asyncio.wait_for(lost.wait(), 5)
        delivery.close()
        await asyncio.wait_for(serving, 5)

    run(main())
    assert os.listdir(tmp_path / "dave") == [] or not any(
        n.isdigit() for n in os.listdir(tmp_path / "dave")
    )


def test_writes_in_flight_are_answered_before_the_worker_channels_close(tmp_path):
    """When the delivery process closes its channel (a stop, a reload), the writer finishes what
    it was handed and a worker still gets every answer: a lost answer would be queued for a
    retry and delivered twice."""
    (tmp_path / "erin").mkdir()

    async def main():
        serving, delivery, worker, lost = await _service_with_worker(tmp_path)
        pending = [
            asyncio.ensure_future(
                worker.request({"op": "write", "mailbox": "erin", "head": 0}, b"m%d\r\n" % n)
            )
            for n in range(40)
        ]
        await asyncio.sleep(0)
        delivery.close()
        answers = await asyncio.gather(*pending)
        assert sorted(a["number"] for a in answers) == list(range(1, 41))
        await asyncio.wait_for(lost.wait(), 5)
        await asyncio.wait_for(serving, 5)

    run(main())


def test_a_mailbox_committed_lately_is_written_in_the_loop_by_the_next_writer(
    tmp_path, monkeypatch
):
    """Writers come and go with their queues; whether a mailbox is warm (its first batch in a
    while went through the pool, so no mkdir or account lookup is left for the loop) is kept
    across them."""
    (tmp_path / "gus").mkdir()
    spool = MailboxStore(tmp_path)
    in_loop = []
    real = MailboxStore.deliver

    def deliver(self, name, messages, *, wait=True):
        in_loop.append(threading.current_thread() is threading.main_thread())
        return real(self, name, messages, wait=wait)

    monkeypatch.setattr(MailboxStore, "deliver", deliver)

    async def main():
        executor = ThreadPoolExecutor(1)
        warm = {}
        try:
            for n in (1, 2, 3):
                writer = MailboxQueue("gus", spool, executor, lambda name: None, warm=warm)
                assert await writer.submit(Copy(b"", b"%d\r\n" % n)) == n
        finally:
            executor.shutdown(wait=True)

    run(main())
    assert in_loop[:3] == [False, True, True]  # the pool, then the loop's thread


def test_a_failed_commit_does_not_warm_the_mailbox(tmp_path):
    """A commit that failed (here: the mailbox name is refused) leaves the mailbox cold."""

    async def main():
        executor = ThreadPoolExecutor(1)
        warm = {}
        try:
            writer = MailboxQueue(
                "../x", MailboxStore(tmp_path), executor, lambda name: None, warm=warm
            )
            with contextlib.suppress(OSError):
                await writer.submit(Copy(b"", b"x\r\n"))
            assert warm == {}
        finally:
            executor.shutdown(wait=True)

    run(main())


def test_a_batchs_answers_leave_before_the_next_batch_is_written(tmp_path):
    """The answers of a batch are sent as soon as it is committed, all of a worker's in one
    go, and before the requests that came meanwhile are written: left to the futures'
    callbacks, they would wait behind that next batch's fsyncs."""
    (tmp_path / "dave").mkdir()
    answered_first: list[bool] = []
    sent_meanwhile = threading.Event()

    class Watched(MailboxStore):
        def deliver(self, name, messages, *, wait=True):
            if not answered_first and not sent_meanwhile.is_set():
                sent_meanwhile.wait(5)  # the first batch: hold it while request 4 comes
            else:
                readable, _, _ = select.select([worker_end], [], [], 0)
                answered_first.append(bool(readable))
            return super().deliver(name, messages, wait=wait)

    control, service_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker_end, writer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def frame(n: int) -> bytes:
        header = json.dumps({"id": n, "op": "write", "mailbox": "dave", "head": 0}).encode()
        body = b"message %d\r\n" % n
        return PREFIX.pack(len(header), len(body)) + header + body

    async def main():
        service = WriterService(Watched(tmp_path), service_end)
        serving = asyncio.create_task(service.run())
        delivery = WriterClient(control, lambda: None)
        await delivery.adopt(os.dup(writer_end.fileno()))
        writer_end.close()
        worker_end.sendall(frame(1) + frame(2) + frame(3))
        await asyncio.sleep(0.2)  # the first batch (1-3) is being written in the pool
        worker_end.sendall(frame(4))
        await asyncio.sleep(0.1)
        sent_meanwhile.set()
        worker_end.setblocking(False)
        received = b""
        while received.count(b'"number"') < 4:
            received += await asyncio.get_running_loop().sock_recv(worker_end, 65536)
        delivery.close()
        await asyncio.wait_for(serving, 5)
        return received

    received = run(main())
    assert answered_first == [True]
    assert [json.loads(part)["number"] for part in re.findall(rb"\{[^}]*\}", received)] == [
        1,
        2,
        3,
        4,
    ]


def test_a_failing_answer_stops_neither_the_others_nor_the_mailbox(tmp_path, monkeypatch):
    """A bug while answering one write (here: raised for request 2) is logged; the other
    answers of the batch still leave, and the mailbox's later writes are still answered."""
    (tmp_path / "dave").mkdir()
    original = WriterService._written

    def failing(self, channel, header, fd, future):
        if header.get("id") == 2:
            raise RuntimeError("bug")
        original(self, channel, header, fd, future)

    monkeypatch.setattr(WriterService, "_written", failing)

    async def main():
        serving, delivery, worker, lost = await _service_with_worker(tmp_path)
        first, second, third = (
            asyncio.create_task(
                worker.request({"op": "write", "mailbox": "dave", "head": 0}, b"m\r\n")
            )
            for _ in range(3)
        )
        assert (await first)["number"] == 1 and (await third)["number"] == 3
        later = await worker.request({"op": "write", "mailbox": "dave", "head": 0}, b"later\r\n")
        assert later["number"] == 4
        second.cancel()
        delivery.close()
        await asyncio.wait_for(serving, 5)

    run(main())


def test_a_worker_cannot_ask_for_a_redelivery(tmp_path):
    """Only the delivery process may say `since` (a redelivery, answered with the number of the
    same message if it is there): from a worker, which runs as the unprivileged user, that
    answer would tell it what a mailbox it cannot open holds."""
    (tmp_path / "dave").mkdir()

    async def main():
        serving, delivery, worker, lost = await _service_with_worker(tmp_path)
        since = time.time() - 10
        assert await delivery.deliver("dave", b"", b"secret\r\n") == 1
        write = {"op": "write", "mailbox": "dave", "head": 0}
        answer = await worker.request({**write, "since": since}, b"secret\r\n")
        assert answer.get("errno") == 22 and "number" not in answer, answer
        assert "redeliver" in answer["error"] or "again" in answer["error"]
        assert await delivery.deliver("dave", b"", b"secret\r\n", since) == 1
        assert (await worker.request(write, b"secret\r\n"))["number"] == 2
        delivery.close()
        await asyncio.wait_for(serving, 5)

    run(main())
    assert sorted(n for n in os.listdir(tmp_path / "dave") if n.isdigit()) == ["1", "2"]


def test_a_body_descriptor_must_be_a_regular_file_within_the_size_limit(tmp_path):
    """A worker hands large bodies over as descriptors: /dev/zero made the root writer fill the
    disk (an attacker's pass), and a sparse file of any size would too. Refused before a byte
    is written; a file that grows while it is copied is cut at the size it had."""
    (tmp_path / "dave").mkdir()
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(1 << 40)
    fine = tmp_path / "fine"
    fine.write_bytes(b"x" * 1000)

    async def main():
        serving, delivery, worker, lost = await _service_with_worker(tmp_path, max_body=1000)
        write = {"op": "write", "mailbox": "dave", "head": 0}
        for path, error in (("/dev/zero", 22), (sparse, 27), ("/dev/null", 22)):
            answer = await worker.request(write, b"", os.open(path, os.O_RDONLY))
            assert answer.get("errno") == error and "number" not in answer, (path, answer)
        assert (await worker.request(write, b"", os.open(fine, os.O_RDONLY)))["number"] == 1
        delivery.close()
        await asyncio.wait_for(serving, 5)

    run(main())
    assert sorted(os.listdir(tmp_path / "dave")) == [".counter", ".lock", "1", "1.status"]
    assert (tmp_path / "dave" / "1").read_bytes() == b"x" * 1000


def test_a_growing_body_is_copied_as_large_as_it_was(tmp_path):
    from mailerd import durable

    source = tmp_path / "source"
    source.write_bytes(b"a" * 100)
    target = tmp_path / "target"
    with open(source, "ab") as grow, open(target, "wb") as out:
        fd = os.open(source, os.O_RDONLY)
        real = os.copy_file_range

        grown = []

        def copy_then_grow(*args):
            if len(grown) < 5:  # (a compromised worker still writing)
                grown.append(grow.write(b"b" * 100))
                grow.flush()
            return real(*args)

        try:
            os.copy_file_range = copy_then_grow
            durable.copy_fd(fd, out.fileno())
        finally:
            os.copy_file_range = real
            os.close(fd)
    assert target.read_bytes() == b"a" * 100


def test_mailboxes_whose_locks_are_held_do_not_take_the_threads(tmp_path):
    """More mailboxes locked elsewhere than the pool has threads (users sitting on their own
    locks): another mailbox is written at once, and each locked one when its lock goes."""
    spool = MailboxStore(tmp_path, lock_timeout=20)
    locked = ["bob", "carol", "dave"]
    (tmp_path / "erin").mkdir()

    async def main(release):
        executor = ThreadPoolExecutor(2)
        try:
            queues = {
                n: MailboxQueue(n, spool, executor, lambda n: None) for n in [*locked, "erin"]
            }
            waiting = [queues[n].submit(Copy(b"", b"x\r\n")) for n in locked]
            await asyncio.sleep(0.3)
            started = time.monotonic()
            assert await asyncio.wait_for(queues["erin"].submit(Copy(b"", b"y\r\n")), 5) == 1
            assert time.monotonic() - started < 1.0
            assert not any(w.done() for w in waiting)
            release.set()
            assert await asyncio.wait_for(asyncio.gather(*waiting), 10) == [1, 1, 1]
        finally:
            executor.shutdown(wait=True)

    with _locks_held(*(tmp_path / name for name in locked)) as release:
        run(main(release))


def test_a_body_enlarged_after_its_check_is_copied_as_large_as_it_was_checked(tmp_path):
    """The size is checked when the write arrives, and the copy may come much later (here the
    mailbox's lock is held): a worker that enlarged its file meanwhile had root write a
    1 GiB message past the size limit (an attacker's pass). Only the checked size is copied."""
    box = tmp_path / "dave"
    body = tmp_path / "body"
    body.write_bytes(b"x" * 100)

    async def main(release):
        serving, delivery, worker, lost = await _service_with_worker(tmp_path, max_body=1000)
        write = {"op": "write", "mailbox": "dave", "head": 0}
        answer = asyncio.ensure_future(worker.request(write, b"", os.open(body, os.O_RDONLY)))
        await asyncio.sleep(0.3)
        with open(body, "r+b") as f:
            f.truncate(1 << 24)  # (sparse: it costs the attacker nothing)
        release.set()
        assert (await asyncio.wait_for(answer, 15))["number"] == 1
        delivery.close()
        await asyncio.wait_for(serving, 5)

    with _locks_held(box) as release:
        run(main(release))
    assert (box / "1").read_bytes() == b"x" * 100


def test_what_waits_for_the_writer_is_bounded(tmp_path, monkeypatch):
    """A worker that sends write after write to a mailbox whose lock is held grew the root
    writer by 300 MB a second (an attacker's pass): past the channel's bound a write is
    answered at once with EAGAIN (the worker then queues the copy); what was taken in is
    written once the lock goes."""
    from mailerd.writer import service

    monkeypatch.setattr(service, "CHANNEL_BACKLOG", (1 << 20, 4))
    body = tmp_path / "body"
    body.write_bytes(b"y\r\n")

    async def main(release):
        serving, delivery, worker, lost = await _service_with_worker(tmp_path)
        write = {"op": "write", "mailbox": "dave", "head": 0}
        inline = [worker.request(write, b"x" * (200 << 10)) for _ in range(10)]
        fds = [worker.request(write, b"", os.open(body, os.O_RDONLY)) for _ in range(6)]
        pending = [asyncio.ensure_future(r) for r in inline + fds]
        await asyncio.sleep(0.5)
        refused = [p.result() for p in pending if p.done()]
        assert len(refused) == 5 + 2, refused  # 1 MiB holds 5 of 200 KiB; 4 descriptors
        assert all(r["errno"] == errno.EAGAIN and "number" not in r for r in refused)
        release.set()
        answers = await asyncio.wait_for(asyncio.gather(*pending), 15)
        assert sorted(a["number"] for a in answers if "number" in a) == list(range(1, 10))
        delivery.close()
        await asyncio.wait_for(serving, 5)

    with _locks_held(tmp_path / "dave") as release:
        run(main(release))

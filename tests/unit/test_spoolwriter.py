"""The mailbox writer's loop over real sockets: batches in the loop or a thread, and the
channels the delivery process hands it for workers."""

import asyncio
import fcntl
import multiprocessing
import os
import socket
from concurrent.futures import ThreadPoolExecutor

from mailerd.channel import Client
from mailerd.mailbox import Delivery, Spool
from mailerd.spoolwriter import MailboxWriter, SpoolClient, SpoolService


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _service_with_worker(tmp_path):
    """A running SpoolService, the delivery process's client, and one adopted worker client."""
    control, service_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    service = SpoolService(Spool(tmp_path), service_end)
    serving = asyncio.create_task(service.run())
    delivery = SpoolClient(control, lambda: None)
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


def test_a_locked_mailbox_waits_in_a_thread_not_in_the_loop(tmp_path):
    """A mailbox written back to back has its small batches written in the loop's thread, but
    one whose lock is held elsewhere (an IMAP server) must not stall the loop: it waits in the
    pool while other mailboxes go on."""
    spool = Spool(tmp_path, lock_timeout=20)
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(
        target=_hold_lock, args=(tmp_path / "bob" / ".lock", ready, release)
    )

    async def main():
        executor = ThreadPoolExecutor(2)
        try:
            bob = MailboxWriter("bob", spool, executor, lambda n: None)
            carol = MailboxWriter("carol", spool, executor, lambda n: None)
            assert await bob.submit(Delivery(b"", b"x\r\n")) == 1  # the pool: now warm
            holder.start()
            assert await asyncio.get_running_loop().run_in_executor(None, ready.wait, 10)
            for_bob = bob.submit(Delivery(b"", b"y\r\n"))  # tried here, then the pool
            await asyncio.sleep(0.2)
            assert await asyncio.wait_for(carol.submit(Delivery(b"", b"z\r\n")), 5) == 1
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
    write a mailbox, but an op (here the delivery process's own reopen-logs) is refused, and
    when the delivery process's channel closes the worker's closes too."""
    (tmp_path / "dave").mkdir()

    async def main():
        serving, delivery, worker, lost = await _service_with_worker(tmp_path)
        number = await worker.request({"mailbox": "dave", "head": 4}, b"X: 1hello\r\n")
        assert number == {"id": 1, "number": 1}
        refused = await worker.request({"op": "reopen-logs"})
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
    from mailerd import spoolwriter

    monkeypatch.setattr(spoolwriter, "MAX_WORKER_CHANNELS", 2)

    async def main():
        control, service_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        service = SpoolService(Spool(tmp_path), service_end)
        serving = asyncio.create_task(service.run())
        delivery = SpoolClient(control, lambda: None)
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
    from mailerd.spoolwriter import MAX_HEAD, MAX_INLINE

    (tmp_path / "dave").mkdir()

    async def main():
        serving, delivery, worker, lost = await _service_with_worker(tmp_path)
        for head in ("4", 99, -1, 1.5, None):
            answer = await worker.request({"mailbox": "dave", "head": head}, b"abc")
            assert answer.get("errno") == 22 and "number" not in answer, (head, answer)
        try:
            await worker.request({"mailbox": "dave"}, b"x" * (MAX_INLINE + MAX_HEAD + 1))
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
            asyncio.ensure_future(worker.request({"mailbox": "erin"}, b"m%d\r\n" % n))
            for n in range(40)
        ]
        await asyncio.sleep(0)
        delivery.close()
        answers = await asyncio.gather(*pending)
        assert sorted(a["number"] for a in answers) == list(range(1, 41))
        await asyncio.wait_for(lost.wait(), 5)
        await asyncio.wait_for(serving, 5)

    run(main())


def _record_syncs(monkeypatch, events, watched, fail_combined=False):
    """Log every fsync (is a directory among the descriptors? which of the `watched`
    futures, by number, were resolved when it began?) and every commit's numbers."""
    import stat

    from mailerd import durable

    def is_dir(fd):
        return stat.S_ISDIR(os.fstat(fd).st_mode)

    real_fsync_all, real_fsync, real_commit = durable.fsync_all, os.fsync, Spool.commit

    def resolved():
        return tuple(n for n, f in sorted(watched.items()) if f.done())

    def fsync_all(fds):
        with_dir, before = any(is_dir(fd) for fd in fds), resolved()
        if fail_combined and with_dir:
            raise OSError(5, "injected")
        real_fsync_all(fds)
        events.append(("fsync_all", with_dir, before))

    def fsync(fd):
        before = resolved()
        real_fsync(fd)
        events.append(("fsync", is_dir(fd), before))

    def commit(self, *args, **kw):
        numbers = real_commit(self, *args, **kw)
        events.append(("renamed", tuple(numbers), kw.get("sync", True)))
        return numbers

    monkeypatch.setattr(durable, "fsync_all", fsync_all)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Spool, "commit", commit)


async def _warm_writer(tmp_path, events):
    """A MailboxWriter for 'fay' whose first batch went through the pool."""
    executor = ThreadPoolExecutor(1)
    writer = MailboxWriter("fay", Spool(tmp_path), executor, lambda n: None)
    assert await writer.submit(Delivery(b"", b"1\r\n")) == 1
    events.clear()
    return writer, executor


def _answered(future, events):
    future.add_done_callback(
        lambda f: events.append(("answered", f.result() if not f.exception() else f.exception()))
    )
    return future


def test_a_batch_renamed_in_the_loop_is_answered_only_after_a_directory_fsync(
    tmp_path, monkeypatch
):
    """Pipelined commits: batch 2 is renamed without its directory fsync, which rides with
    batch 3's file fsyncs; batch 3, with nothing after it, gets a directory fsync of its own.
    Neither is answered before the fsync that makes its renames durable."""
    (tmp_path / "fay").mkdir()
    events = []

    async def main():
        writer, executor = await _warm_writer(tmp_path, events)
        watched = {}
        _record_syncs(monkeypatch, events, watched)
        second = watched[2] = _answered(writer.submit(Delivery(b"", b"2\r\n")), events)
        await asyncio.sleep(0)  # the writer takes batch 2 alone, renames it, yields once
        third = watched[3] = _answered(writer.submit(Delivery(b"", b"3\r\n")), events)
        assert await asyncio.wait_for(second, 5) == 2
        assert await asyncio.wait_for(third, 5) == 3
        executor.shutdown(wait=True)

    run(main())
    assert [e for e in events if e[0] != "answered"] == [
        ("fsync_all", False, ()),  # batch 2's files
        ("renamed", (2,), False),
        ("fsync_all", True, ()),  # batch 3's files and the directory; 2 not yet answered
        ("renamed", (3,), False),
        ("fsync", True, (2,)),  # nothing came next: the directory alone; 3 not yet answered
    ], events
    assert ("answered", 2) in events and ("answered", 3) in events
    assert sorted(n for n in os.listdir(tmp_path / "fay") if not n.startswith(".")) == [
        "1",
        "1.status",
        "2",
        "2.status",
        "3",
        "3.status",
    ]


def test_when_the_next_batch_fails_the_renamed_one_is_still_synced_and_answered(
    tmp_path, monkeypatch
):
    """The combined fsync fails: the renamed batch gets a directory fsync of its own and its
    250; the failing batch gets the error and leaves no temporary file behind."""
    (tmp_path / "fay").mkdir()
    events = []

    async def main():
        writer, executor = await _warm_writer(tmp_path, events)
        watched = {}
        _record_syncs(monkeypatch, events, watched, fail_combined=True)
        second = watched[2] = _answered(writer.submit(Delivery(b"", b"2\r\n")), events)
        await asyncio.sleep(0)
        third = _answered(writer.submit(Delivery(b"", b"3\r\n")), events)
        assert await asyncio.wait_for(second, 5) == 2
        try:
            await asyncio.wait_for(third, 5)
        except OSError as exc:
            assert exc.errno == 5
        else:
            raise AssertionError("batch 3 did not fail")
        executor.shutdown(wait=True)

    run(main())
    assert events[:3] == [
        ("fsync_all", False, ()),
        ("renamed", (2,), False),
        ("fsync", True, ()),  # the combined one failed: the directory alone, before the 250
    ], events
    assert ("answered", 2) in events
    assert sorted(n for n in os.listdir(tmp_path / "fay") if n[0] != ".") == [
        "1",
        "1.status",
        "2",
        "2.status",
    ]
    assert not [n for n in os.listdir(tmp_path / "fay") if n.startswith(".tmp")]

"""Batch fsync through Linux AIO, and the thread-pool fallback where AIO cannot be used."""

import ctypes
import errno
import os
import struct

import pytest

from mailerd import aiofsync, durable


@pytest.fixture
def files(tmp_path):
    """A maker of n new files with some content, open and not yet synced; all closed after."""
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    opened: list[int] = []

    def make(n: int) -> list[int]:
        fds = [
            durable.write_new(f"f{len(opened) + i}", b"head\r\n", b"%d\r\n" % i, None, directory)
            for i in range(n)
        ]
        opened.extend(fds)
        return fds

    yield make
    for fd in opened:
        os.close(fd)
    os.close(directory)


def aio_or_skip(fds: list[int]) -> None:
    """fsync through AIO, or skip the test where AIO is unavailable."""
    try:
        aiofsync.fsync_all(fds)
    except aiofsync.Unavailable as exc:
        pytest.skip(f"no AIO here: {exc}")


# The kernel's structures (linux/aio_abi.h, 64-bit little-endian), spelled out here rather than
# taken from the module, so that a layout mistake there cannot hide itself.
KERNEL_IOCB = struct.Struct("<QIIHhIQQqQII")  # data, key, rw_flags, opcode, reqprio, fildes, …
KERNEL_EVENT = struct.Struct("<QQqq")  # data, obj (the iocb's address), res, res2
IOCB_CMD_FSYNC = 2


def test_a_batch_is_fsynced(files, monkeypatch):
    """Every descriptor of a batch larger than DEPTH goes to the kernel as an fsync, in more
    than one submission, and every completion is reaped, each with success."""
    real = aiofsync._syscall
    submissions = []
    completions = []  # (opcode, fd, res) of every event reaped, read from the kernel's answer

    def spy(number, *args):
        result = real(number, *args)
        if number == aiofsync._IO_SUBMIT:
            submissions.append(result)
        elif number == aiofsync._IO_GETEVENTS:
            events = args[3]
            for k in range(result):
                _, iocb_address, res, _ = KERNEL_EVENT.unpack_from(events, k * KERNEL_EVENT.size)
                iocb = KERNEL_IOCB.unpack(ctypes.string_at(iocb_address, KERNEL_IOCB.size))
                completions.append((iocb[3], iocb[5], res))
        return result

    fds = files(300)
    assert len(fds) > aiofsync.DEPTH
    monkeypatch.setattr(aiofsync, "_syscall", spy)
    aio_or_skip(fds)
    assert len(submissions) >= 2 and sum(submissions) == len(fds)
    assert sorted(fd for _, fd, _ in completions) == sorted(fds)  # each one, exactly once
    assert {opcode for opcode, _, _ in completions} == {IOCB_CMD_FSYNC}
    assert [res for _, _, res in completions] == [0] * len(fds)


def test_an_error_is_raised_after_every_fsync_has_finished(files):
    fds = files(2)
    read_end, write_end = os.pipe()  # a pipe cannot be fsync'd: EINVAL
    try:
        with pytest.raises(OSError) as raised:
            aiofsync.fsync_all([fds[0], read_end, fds[1]])
        if isinstance(raised.value, aiofsync.Unavailable):
            pytest.skip("no AIO here")
        assert raised.value.errno == errno.EINVAL
        # The context is still usable afterwards: nothing was left unreaped.
        aiofsync.fsync_all(fds)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_forked_child_makes_its_own_context(files):
    fds = files(3)
    aio_or_skip(fds)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            aiofsync.fsync_all(fds)
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def test_without_aio_the_thread_pool_does_it(files, monkeypatch):
    def unavailable(fds):
        raise aiofsync.Unavailable(errno.ENOSYS, "test")

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(aiofsync, "fsync_all", unavailable)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    fds = files(4)
    durable.fsync_all(fds)
    assert sorted(synced) == sorted(fds)


def test_without_aio_an_error_too_waits_for_every_fsync(files, monkeypatch):
    """The thread fallback, like AIO, raises only once every fsync has finished: the caller
    closes the descriptors next, and a late thread must not fsync a reused number."""
    import time

    def unavailable(fds):
        raise aiofsync.Unavailable(errno.ENOSYS, "test")

    fds = files(2)
    finished = []

    def fsync(fd):
        if fd == fds[0]:
            raise OSError(errno.EIO, "injected")
        time.sleep(0.3)
        finished.append(fd)

    monkeypatch.setattr(aiofsync, "fsync_all", unavailable)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as raised:
        durable.fsync_all(fds)
    assert raised.value.errno == errno.EIO
    assert finished == [fds[1]], "fsync_all raised before the other fsync had finished"


def test_a_failed_wait_discards_the_context(files, monkeypatch):
    fds = files(3)
    aio_or_skip(fds)
    real = aiofsync._syscall
    destroyed = []

    def failing(number, *args):
        if number == aiofsync._IO_GETEVENTS:
            raise OSError(errno.EFAULT, "injected")
        if number == aiofsync._IO_DESTROY:
            destroyed.append(args[0])
        return real(number, *args)

    monkeypatch.setattr(aiofsync, "_syscall", failing)
    with pytest.raises(OSError):
        aiofsync.fsync_all(fds)
    assert destroyed  # io_destroy waited for what was in flight
    monkeypatch.undo()
    aiofsync.fsync_all(fds)  # a fresh context, no stale events

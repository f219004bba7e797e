"""Batch fsync through Linux AIO, and the thread-pool fallback where AIO cannot be used."""

import errno
import os

import pytest

from mailerd import aiofsync, durable


def files(tmp_path, n):
    """n new files with some content, open and not yet synced."""
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [
            durable.write_new(f"f{i}", b"head\r\n", b"%d\r\n" % i, None, directory)
            for i in range(n)
        ]
    finally:
        os.close(directory)


def test_a_batch_is_fsynced(tmp_path):
    fds = files(tmp_path, 300)  # more than one submission (DEPTH)
    try:
        aiofsync.fsync_all(fds)
    except aiofsync.Unavailable as exc:
        pytest.skip(f"no AIO here: {exc}")
    finally:
        for fd in fds:
            os.close(fd)


def test_an_error_is_raised_after_every_fsync_has_finished(tmp_path):
    fds = files(tmp_path, 2)
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
        for fd in (*fds, read_end, write_end):
            os.close(fd)


def test_a_forked_child_makes_its_own_context(tmp_path):
    fds = files(tmp_path, 3)
    try:
        try:
            aiofsync.fsync_all(fds)
        except aiofsync.Unavailable as exc:
            pytest.skip(f"no AIO here: {exc}")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                aiofsync.fsync_all(fds)
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        for fd in fds:
            os.close(fd)


def test_without_aio_the_thread_pool_does_it(tmp_path, monkeypatch):
    def unavailable(fds):
        raise aiofsync.Unavailable(errno.ENOSYS, "test")

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(aiofsync, "fsync_all", unavailable)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    fds = files(tmp_path, 4)
    try:
        durable.fsync_all(fds)
        assert sorted(synced) == sorted(fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_failed_wait_discards_the_context(tmp_path, monkeypatch):
    fds = files(tmp_path, 3)
    try:
        try:
            aiofsync.fsync_all(fds)
        except aiofsync.Unavailable as exc:
            pytest.skip(f"no AIO here: {exc}")
        getevents = aiofsync._numbers()[3]
        real = aiofsync._syscall
        destroyed = []

        def failing(number, *args):
            if number == getevents:
                raise OSError(errno.EFAULT, "injected")
            if number == aiofsync._numbers()[1]:
                destroyed.append(args[0])
            return real(number, *args)

        monkeypatch.setattr(aiofsync, "_syscall", failing)
        with pytest.raises(OSError):
            aiofsync.fsync_all(fds)
        assert destroyed  # io_destroy waited for what was in flight
        monkeypatch.undo()
        aiofsync.fsync_all(fds)  # a fresh context, no stale events
    finally:
        for fd in fds:
            os.close(fd)

"""fsync many files at once through Linux AIO (IOCB_CMD_FSYNC, Linux 4.18 and later).

A batch of new mailbox files must all be fsync'd before they are renamed into place. Doing that
from a pool of Python threads costs dozens of futex calls and context switches per message
(each thread wakes, takes the GIL, sets a future), a large part of the mailbox writer's CPU.
One io_submit() hands the whole batch to the kernel, which runs the fsyncs concurrently in its
own workers (so they still share device cache flushes), and one io_getevents() waits for all
of them: less than half the CPU per message, with the same or lower latency (the README's
benchmark section has the figures).

The standard library has no binding for these system calls, so they are made with ctypes
(x86_64 and aarch64 numbers). `Unavailable` says they do not work here; the caller keeps a
thread-pool path for everywhere else (another architecture, a seccomp filter, aio-max-nr).
Each thread has its own AIO context, so concurrent batches never reap each other's events;
a context does not survive fork(), so a child makes its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import struct
import threading

# io_setup, io_destroy, io_submit, io_getevents
_SYSCALLS = {"x86_64": (206, 207, 209, 208), "aarch64": (0, 1, 2, 4)}
_NUMBERS = _SYSCALLS.get(platform.machine()) if struct.calcsize("P") == 8 else None
_IO_SETUP, _IO_DESTROY, _IO_SUBMIT, _IO_GETEVENTS = _NUMBERS or (-1, -1, -1, -1)
_IOCB = struct.Struct("=QIIHhIQQqQII")  # struct iocb, little-endian 64-bit layout
_EVENT = struct.Struct("=QQqq")  # struct io_event: data, obj, res, res2
_IOCB_CMD_FSYNC = 2
DEPTH = 256  # events per context: the largest batch submitted at once

_local = threading.local()
_libc: ctypes.CDLL | None = None


def _syscall(number: int, *args: object) -> int:
    """syscall(2), retried on EINTR. Integers are passed as C longs: syscall() is variadic
    and reads every argument as a long, and ctypes would pass a Python int as a C int."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    c_args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    while True:
        result = _libc.syscall(ctypes.c_long(number), *c_args)
        if result >= 0:
            return int(result)
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


class Unavailable(OSError):
    """AIO cannot be used here (nothing was submitted): use another way."""


def _context() -> int:
    """This thread's AIO context, made on first use (and again after a fork)."""
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        _local.pid, _local.ctx = pid, None
        if _NUMBERS is None:
            raise Unavailable(errno.ENOSYS, "no AIO system call numbers for this machine")
        ctx = ctypes.c_ulong(0)
        try:
            _syscall(_IO_SETUP, DEPTH, ctypes.byref(ctx))
        except OSError as exc:  # ENOSYS (seccomp), EAGAIN (aio-max-nr reached)
            raise Unavailable(exc.errno, f"io_setup: {exc.strerror}") from exc
        _local.ctx = ctx.value
    if _local.ctx is None:
        raise Unavailable(errno.ENOSYS, "AIO unavailable in this process")
    return int(_local.ctx)


def fsync_all(fds: list[int]) -> None:
    """fsync every descriptor; raise the first error after all of them have finished.

    Raises Unavailable, before anything was submitted, if AIO cannot be used here; once
    submitted, every fsync is waited for, whatever the outcome.
    """
    ctx = _context()
    first_error = 0
    for start in range(0, len(fds), DEPTH):
        first_error = _batch(ctx, fds[start : start + DEPTH]) or first_error
    if first_error:
        raise OSError(first_error, os.strerror(first_error))


def _batch(ctx: int, fds: list[int]) -> int:
    """Submit and reap one batch; the first error number, or 0."""
    blocks = [
        ctypes.create_string_buffer(
            _IOCB.pack(i, 0, 0, _IOCB_CMD_FSYNC, 0, fd, 0, 0, 0, 0, 0, 0), _IOCB.size
        )
        for i, fd in enumerate(fds)
    ]
    pointers = (ctypes.c_void_p * len(fds))(*[ctypes.addressof(b) for b in blocks])
    events = ctypes.create_string_buffer(_EVENT.size * len(fds))
    submitted = 0
    error = 0
    try:
        while submitted < len(fds):
            pending = ctypes.byref(pointers, submitted * ctypes.sizeof(ctypes.c_void_p))
            submitted += _syscall(_IO_SUBMIT, ctx, len(fds) - submitted, pending)
    except OSError as exc:
        if submitted == 0:
            raise Unavailable(exc.errno, f"io_submit: {exc.strerror}") from exc
        error = exc.errno or errno.EIO
        for fd in fds[submitted:]:  # the rest the slow way; the submitted ones are reaped below
            try:
                os.fsync(fd)
            except OSError as sync_exc:
                error = error or sync_exc.errno or errno.EIO
    reaped = 0
    try:
        while reaped < submitted:
            # min_nr = all that is left: one wake-up when the last fsync is done, rather than
            # one per early finisher (2.6 io_getevents() per batch with min_nr = 1).
            left = submitted - reaped
            got = _syscall(_IO_GETEVENTS, ctx, left, left, events, None)
            for k in range(got):
                result = _EVENT.unpack_from(events, k * _EVENT.size)[2]
                if result < 0 and not error:
                    error = -result
            reaped += got
    except OSError:
        # Events left in the context would be counted for the next batch: destroy it (that
        # waits for what is in flight) and let this thread make a new one.
        _local.pid = None
        with contextlib.suppress(OSError):
            _syscall(_IO_DESTROY, ctx)
        raise
    return error

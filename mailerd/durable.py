"""Crash-safe file writing shared by the mailbox spool and the outbound queue.

The discipline (Postfix's mail_stream_finish_file, chasquid's safeio, plus the directory fsync
chasquid skips): write to a temporary name, fsync the file, rename it into place, fsync the
directory. Only after the directory fsync may anyone be told the data is safe.
"""

from __future__ import annotations

import contextlib
import errno
import os
from concurrent.futures import ThreadPoolExecutor, wait

from mailerd import aiofsync

# A message body travels either as bytes or as an open file descriptor (read from offset 0).
Body = bytes | int

_sync_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _sync_pool
    if _sync_pool is None:
        _sync_pool = ThreadPoolExecutor(16, thread_name_prefix="fsync")
    return _sync_pool


def _forget_pool_after_fork() -> None:
    # A forked child has none of the parent's threads: a copied executor would queue work
    # that no thread ever runs.
    global _sync_pool
    _sync_pool = None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def write_synced(
    path: str,
    head: bytes,
    body: Body,
    owner: tuple[int, int] | None = None,
    dir_fd: int | None = None,
    mode: int = 0o600,
) -> None:
    """Create `path` (must not exist) with head + body, chown it if asked, and fsync it."""
    fd = write_new(path, head, body, owner, dir_fd, mode=mode)
    try:
        os.fsync(fd)
    except BaseException:
        _unlink_quietly(path, dir_fd)
        raise
    finally:
        os.close(fd)


def write_new(
    path: str,
    head: bytes,
    body: Body,
    owner: tuple[int, int] | None = None,
    dir_fd: int | None = None,
    limit: int | None = None,
    mode: int = 0o600,
) -> int:
    """Create `path` (must not exist; O_EXCL never follows a link) with head + body, relative
    to `dir_fd` if given; return the open, not yet synced descriptor. `limit`: octets of a
    descriptor's body copied at most (copy_fd). `mode` is given once the owner is (before,
    the file is 0600), and the umask does not narrow it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600, dir_fd=dir_fd)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        if mode != 0o600:
            os.fchmod(fd, mode)
        if isinstance(body, bytes):
            _write_both(fd, head, body)
        else:
            write_all(fd, head)
            copy_fd(body, fd, limit)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path, dir_fd)
        raise
    return fd


def body_size(body: Body, limit: int | None = None) -> int:
    """A body's size (a descriptor's: what copy_fd would copy of it with `limit`)."""
    if isinstance(body, bytes):
        return len(body)
    size = os.fstat(body).st_size
    return size if limit is None else min(size, limit)


def fsync_all(fds: list[int]) -> None:
    """fsync several files at once: concurrent fsyncs share the device's cache flushes (and
    ext4's journal commits), so a batch costs about one fsync's latency instead of one per
    file. Through Linux AIO where it works (`aiofsync`), else a thread pool."""
    if len(fds) == 1:
        os.fsync(fds[0])
        return
    try:
        aiofsync.fsync_all(fds)
        return
    except aiofsync.Unavailable:
        pass
    futures = [_pool().submit(os.fsync, fd) for fd in fds]
    # Every fsync finishes before any error is raised, as with AIO: the caller closes these
    # descriptors next, and a number reused meanwhile must not be fsync'd by a late thread.
    wait(futures)
    for future in futures:
        future.result()


def write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd` (os.write() may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_both(fd: int, head: bytes, body: bytes) -> None:
    """head + body in one writev() (the mailbox writer writes two files per message)."""
    done = os.writev(fd, [head, body]) if head and body else 0
    if done < len(head):
        write_all(fd, head[done:])
        done = len(head)
    write_all(fd, body[done - len(head) :])


def copy_fd(source: int, target: int, limit: int | None = None) -> None:
    """Copy `source` (from offset 0, its offset untouched) to `target`, as large as it is now
    and `limit` octets at most: a file that grows meanwhile (one a compromised worker still
    writes to, or enlarges after its size was checked: an attacker's pass) is cut there."""
    size = os.fstat(source).st_size
    if limit is not None:
        size = min(size, limit)
    offset = 0
    while offset < size:
        try:
            copied = os.copy_file_range(source, target, min(size - offset, 1 << 30), offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            _copy_by_reading(source, target, offset, size)
            return
        if copied == 0:
            return
        offset += copied


def _copy_by_reading(source: int, target: int, offset: int, size: int) -> None:
    while offset < size and (chunk := os.pread(source, min(size - offset, 1 << 20), offset)):
        write_all(target, chunk)
        offset += len(chunk)


def head(body: Body, size: int) -> bytes:
    """The first `size` octets of a body (without moving its descriptor's offset)."""
    return body[:size] if isinstance(body, bytes) else os.pread(body, size, 0)


def read_body(body: Body) -> bytes:
    """A body's octets, from memory or from its file (read from offset 0, without moving the
    descriptor's offset: the file is copied from there later)."""
    if isinstance(body, bytes):
        return body
    parts = []
    offset = 0
    while chunk := os.pread(body, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(
    path: str,
    data: bytes,
    owner: tuple[int, int] | None = None,
    sync: bool = True,
    dir_fd: int | None = None,
    mode: int = 0o600,
) -> None:
    """Atomically replace a small file's content (tmp [+ fsync] + rename); caller fsyncs the dir.

    `sync=False` is for hints that are safe to lose (the mailbox counter): the rename is made
    durable by the caller's directory fsync, and a torn or stale content is recomputed.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    _unlink_quietly(tmp, dir_fd)
    if sync:
        write_synced(tmp, data, b"", owner, dir_fd, mode)
    else:
        os.close(write_new(tmp, data, b"", owner, dir_fd, mode=mode))
    os.rename(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _unlink_quietly(path: str, dir_fd: int | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path, dir_fd=dir_fd)

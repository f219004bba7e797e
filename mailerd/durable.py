"""Crash-safe file writing shared by the mailbox spool and the outbound queue.

The discipline (Postfix's mail_stream_finish_file, chasquid's safeio, plus the directory fsync
chasquid skips): write to a temporary name, fsync the file, rename it into place, fsync the
directory. Only after the directory fsync may anyone be told the data is safe.
"""

from __future__ import annotations

import contextlib
import errno
import os

from mailerd.smtp.events import Reply

# A message body travels either as bytes or as an open file descriptor (read from offset 0).
Body = bytes | int

DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage")
IO_ERROR = Reply(451, "4.3.0", "Local error in processing; try again later")


def error_reply(exc: OSError) -> Reply:
    """The SMTP answer for a failed write: a full disk is 452 4.3.1, anything else 451 4.3.0."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK_FULL
    return IO_ERROR


def write_synced(path: str, head: bytes, body: Body, owner: tuple[int, int] | None = None) -> None:
    """Create `path` (must not exist) with head + body, chown it if asked, and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        write_all(fd, head)
        if isinstance(body, bytes):
            write_all(fd, body)
        else:
            copy_fd(body, fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_fd(source: int, target: int) -> None:
    """Copy the whole of `source` (from offset 0, its offset untouched) to `target`."""
    offset = 0
    while True:
        try:
            copied = os.copy_file_range(source, target, 1 << 30, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            _copy_by_reading(source, target, offset)
            return
        if copied == 0:
            return
        offset += copied


def _copy_by_reading(source: int, target: int, offset: int) -> None:
    while chunk := os.pread(source, 1 << 20, offset):
        write_all(target, chunk)
        offset += len(chunk)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(path: str, data: bytes, owner: tuple[int, int] | None = None) -> None:
    """Atomically replace a small file's content (tmp + fsync + rename); caller fsyncs the dir."""
    tmp = f"{path}.tmp{os.getpid()}"
    _unlink_quietly(tmp)
    write_synced(tmp, data, b"", owner)
    os.rename(tmp, path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

"""Becoming a daemon: the pid file, python-daemon's DaemonContext, and the "ready" hand-shake.

`master.run` binds every endpoint first (so a port in use or a bad config is reported at the
terminal), then calls `detach()`. The command the administrator ran forks one child and waits
on a pipe; the child enters a `DaemonContext` (fork, setsid, fork; umask 022; chdir /; every
descriptor closed except the listeners, the delivery socket, the pid file and the log file;
stdio on /dev/null) and becomes the master. When the master's workers are accepting it writes
"ok" on the pipe, and only then does the original command exit 0. If start-up fails after the
detach, the master writes the reason instead and the command prints it and exits 1; if the
daemon dies without a word, the command sees end-of-file and says so. No silent dead daemon.

`signal_map` is empty: python-daemon's default would ignore SIGTSTP/SIGTTIN/SIGTTOU (and every
child would inherit that) and turn SIGTERM into SystemExit, while the master installs its own
handlers that only record the signal.

The pid file is held under `flock` for the master's whole life, so "is another mailerd running"
is answered by the kernel: a live master holds the lock, a dead one's stale file is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import sys
import time
from pathlib import Path

import daemon

from mailerd import log

READY_TIMEOUT = 60.0


class PidFileError(Exception):
    """Another mailerd holds the pid file, or it cannot be created; the message says which."""


class PidFile:
    """The master's pid file, locked (flock) from `acquire()` until `release()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        for _ in range(5):
            try:
                # Never through a symlink: in a directory someone else may write, root would
                # truncate the file it names (an attacker's pass, /tmp/atk7c F6).
                fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
                )
            except OSError as exc:
                raise PidFileError(
                    f"cannot create pid file {self.path}: {exc.strerror}"
                    + (
                        " (run as root, or choose another file with -P)"
                        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                        else ""
                    )
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                running = f" (pid {pid})" if pid else ""
                raise PidFileError(
                    f"already running{running}: pid file {self.path} is held; stop that "
                    "mailerd first, or give this one another pid file with -P"
                ) from None
            # The file we locked must still be the one at the path: a stopping master unlinks
            # its file before closing it, and locking that orphan would prove nothing.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)
        raise PidFileError(f"pid file {self.path} keeps changing; is another mailerd starting?")

    def write(self, pid: int) -> None:
        assert self.fd is not None
        data = f"{pid}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def record_reload(self, count: int, outcome: str, notes: str = "") -> None:
        """Say in the reload file beside the pid file that `count` reloads are finished, the
        last with `outcome` ("ok"; "partial": the certificates in use were kept; "failed")
        and `notes` (why, as logged; what takes a restart): what `commands.daemon.reload`
        waits for, and says. Its own file, so that the pid file stays one number
        (`kill -HUP $(cat …)` is an idiom). Readable by its owner only, as the log is not
        by everyone: whoever may signal the master may read it."""
        notes = " ".join(notes.split())[:NOTES_MAX]  # (one line)
        path = reload_file(self.path)
        temporary = path.with_name(path.name + ".tmp")
        with contextlib.suppress(OSError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)  # (whatever is there, a planted link too: not written through)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temporary, flags, 0o600)
            try:
                os.write(fd, f"{count} {outcome} {notes}".rstrip().encode() + b"\n")
            finally:
                os.close(fd)
            os.replace(temporary, path)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
                reload_file(self.path).unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


NOTES_MAX = 2000  # characters of a reload's notes in the reload file


def reload_file(pidfile: Path) -> Path:
    """Where the master holding `pidfile` tells how many reloads it has finished."""
    return pidfile.with_name(pidfile.name + ".reload")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Notifier:
    """The daemon's end of the start-up pipe: say "ok" or why not, exactly once."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def ready(self) -> None:
        self._say(f"ok {os.getpid()}\n")

    def failed(self, message: str) -> None:
        self._say(f"error {message}\n")

    @property
    def done(self) -> bool:
        return self.fd is None

    def _say(self, text: str) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.fd, text.encode("utf-8", "replace")[:4000])
        os.close(self.fd)
        self.fd = None


def detach(preserve: list[int]) -> Notifier:
    """Become a daemon; returns in the daemon only. The calling process exits (with 0 once
    the daemon reports ready, 1 otherwise) inside this function."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        code = _wait_ready(read_end, pid)
        sys.stderr.flush()
        os._exit(code)
    os.close(read_end)
    try:
        context = daemon.DaemonContext(
            working_directory="/",
            umask=0o022,
            detach_process=True,
            files_preserve=[*preserve, write_end],
            signal_map={},
        )
        context.open()
    except BaseException as exc:  # still attached to the terminal's pipe: say why
        with contextlib.suppress(OSError):
            os.write(write_end, f"error cannot become a daemon: {exc}\n".encode())
        os._exit(1)
    return Notifier(write_end)


def _wait_ready(fd: int, child: int) -> int:
    """In the command the user ran: wait for the daemon's word; print errors; exit code."""
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.complain(
                f"not ready after {READY_TIMEOUT:.0f} s; it may still be starting: "
                "see the system log (or --log-file)"
            )
            return 1
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, os.WNOHANG)  # the intermediate process exits at once
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)
    line = data.decode("utf-8", "replace").strip()
    if line.startswith("ok"):
        return 0
    if line.startswith("error "):
        log.complain(line[6:])
    else:
        log.complain("the daemon exited during start-up; see the system log (or --log-file)")
    return 1

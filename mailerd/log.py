"""Logging set-up: one line per event, to stderr (-f), syslog (daemon) or a file (--log-file).

- Foreground (`-f`): stderr, with a timestamp.
- Daemon: syslog, facility `mail`, ident `mailerd[pid]`, through /dev/log; when there is no
  /dev/log (a container without a syslog daemon), stderr, which the daemon has pointed at
  /dev/null: `master.startup.run` warns about that at the terminal before detaching.
- `--log-file FILE` (either mode): appended to FILE, which SIGUSR1 reopens for logrotate.

Reopening follows the signal rule (handlers only record): `request_reopen()` just bumps a
counter, and the file handler reopens at its next record. The master reopens (and so creates)
the file itself first, as root, and hands it to the unprivileged user, so that the children,
which get SIGUSR1 forwarded, can open it again after their drop.

Every line costs: a message is logged in four. `LineFormatter` builds a line without
logging.Formatter's general machinery, and `MailLogger` (every mailerd logger) hands a plain
line straight to the installed handler's `emit_line()`, without a LogRecord.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from io import TextIOWrapper
from pathlib import Path
from socket import socket as Socket
from typing import Any, Protocol, TextIO

SYSLOG_SOCKET = "/dev/log"
FOREGROUND_FORMAT = "%(asctime)s mailerd[%(process)d]: %(message)s"
SYSLOG_FORMAT = "mailerd[%(process)d]: %(message)s"
LINE_MAX = 200  # what `shorten` keeps of a text from outside (a command, a reply)

_reopen_requests = 0
_root = logging.getLogger()
_lean: LineStreamHandler | LineSysLogHandler | ReopeningFileHandler | None = None  # see MailLogger
_pid = os.getpid()  # the records' process id: getpid() is a system call, once per line


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def shorten(text: str, limit: int = LINE_MAX) -> str:
    """A text from outside as a log line may show it: cut to `limit`, control characters
    escaped (no forged log lines, no terminal escapes)."""
    cut = text if len(text) <= limit else text[:limit] + "..."
    if cut.isprintable():
        return cut
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in cut)


class Throttle:
    """Which of a repeated problem's log lines are due: one a key every `every` seconds. A
    problem met at every RCPT or connection (a broken mailbox, a shortage of space, a
    blocklist's refusals, a bug) must not write a line each: a client repeating them would
    choose how much is written. Bounded: past `most` keys it forgets them all."""

    def __init__(
        self, every: float, most: int = 1000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.every = every
        self.most = most
        self.clock = clock
        self._last: dict[object, tuple[float, int]] = {}  # key: (when written, held back since)

    def due(self, key: object = None) -> bool:
        """Is a line about `key` due now (none in the last `every` seconds)? If so, it is
        counted as written."""
        return self.held_back(key) is not None

    def held_back(self, key: object = None) -> int | None:
        """As `due`, None when the line is not due; else how many about `key` were held back
        since the last one written (for a line that says so)."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if len(self._last) >= self.most:
            self._last.clear()
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]


def request_reopen(*_: object) -> None:
    """Ask every file handler to reopen its file at its next record (signal-handler safe)."""
    global _reopen_requests
    _reopen_requests += 1


class LineFormatter(logging.Formatter):
    """FOREGROUND_FORMAT (`stamped`) or SYSLOG_FORMAT, built without the general machinery.

    Mail is logged a few lines per message, and logging.Formatter's strftime and %-formatting
    of the record's dictionary, and LogRecord's getpid(), were much of the cost of a line:
    here the date and time are formatted once per second and the process id is kept from the
    last fork. A record with a traceback or stack takes the general path.
    """

    def __init__(self, stamped: bool) -> None:
        super().__init__(FOREGROUND_FORMAT if stamped else SYSLOG_FORMAT)
        self._stamped = stamped
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time(record.created, int(record.msecs))

    def _time(self, created: float, msecs: int) -> str:
        second = int(created)
        if second != self._second:  # (handlers format under their lock)
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{msecs:03d}"

    def format(self, record: logging.LogRecord) -> str:
        record.process = _pid  # (logProcesses is off)
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        return self.line(record.created, record.message, int(record.msecs))

    def line(self, created: float, message: str, msecs: int | None = None) -> str:
        """The line for `message` logged at time `created` (what format() gives a record)."""
        if not self._stamped:
            return f"mailerd[{_pid}]: {message}"
        if msecs is None:
            msecs = int((created - int(created)) * 1000)  # (as LogRecord computes its msecs)
        return f"{self._time(created, msecs)} mailerd[{_pid}]: {message}"


class MailLogger(logging.Logger):
    """A Logger whose plain lines skip the LogRecord when they can.

    A message is logged in four lines, and most of a line's cost through LogRecord,
    Logger.handle, Handler.handle and Formatter.format goes into building and routing a record
    that ends up as one formatted line (the README's benchmark section has the figures). So
    when the line would go nowhere but to the one handler `setup()` installed (this logger has
    no handlers or filters of its own, it hangs directly below the root, and nobody has added a
    handler or filter since), the text goes straight to that handler's `emit_line()`. Anything
    else (a traceback, `extra`, a test's capturing handler, a formatting error) takes the
    standard path, unchanged.
    """

    def _log(
        self,
        level: int,
        msg: object,
        args: Any,
        exc_info: Any = None,
        extra: Mapping[str, object] | None = None,
        stack_info: bool = False,
        stacklevel: int = 1,
    ) -> None:
        handler = _lean
        if (
            handler is not None
            and exc_info is None
            and extra is None
            and not stack_info
            and self.parent is _root
            and self.propagate
            and not self.disabled
            and not self.handlers
            and not self.filters
            and len(_root.handlers) == 1
            and _root.handlers[0] is handler
            and not _root.filters
            and not handler.filters
            and level >= handler.level
            and _line_args(args)
        ):
            try:
                text = msg % args if args else str(msg)
            except Exception:  # the standard path reports it (Handler.handleError)
                pass
            else:
                if handler.emit_line(level, time.time(), text):
                    return
        super()._log(level, msg, args, exc_info, extra, stack_info, stacklevel)


logging.setLoggerClass(MailLogger)  # (mailerd/__init__.py imports this module first)


def _line_args(args: object) -> bool:
    """True when `msg % args` is what LogRecord.getMessage() would give (it unwraps a single
    mapping argument, for "%(name)s" formats; those take the standard path)."""
    return not (isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], Mapping))


class _StreamHandler(Protocol):
    """What _LineStream uses of the logging.StreamHandler it is mixed into."""

    @property
    def formatter(self) -> logging.Formatter | None: ...
    @property
    def stream(self) -> TextIO | None: ...  # (a FileHandler's is None until opened)
    def acquire(self) -> None: ...
    def release(self) -> None: ...
    def _prefix(self, level: int) -> str: ...


def stderr_is_journal() -> bool:
    """Whether stderr is the journal: systemd names it in JOURNAL_STREAM, "device:inode"."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def journal_priority(level: int) -> str:
    """sd-daemon(3)'s "<N>" before a line to the journal, which journald reads as the line's
    priority: else a start's errors were info there, unseen by `journalctl -p err` (a
    systemd walk-through)."""
    return "<3>" if level >= logging.ERROR else "<4>" if level >= logging.WARNING else "<6>"


def journal_prefix(level: int) -> str:
    """journal_priority() when stderr is the journal; "" anywhere else (a terminal, a file,
    a pipe)."""
    return journal_priority(level) if stderr_is_journal() else ""


def complain(text: str, level: int = logging.ERROR) -> None:
    """A start-up line to stderr, where the log is not open yet: "mailerd: TEXT"."""
    print(f"{journal_prefix(level)}mailerd: {text}", file=sys.stderr)


class _LineStream:
    """emit_line() for the stream handlers (stderr and the log file)."""

    def _prefix(self, level: int) -> str:
        return ""

    def emit_line(self: _StreamHandler, level: int, created: float, text: str) -> bool:
        """Write one line as emit() would; False (nothing written) on any error, for the
        caller to take the standard path, which reports it."""
        formatter = self.formatter
        if not isinstance(formatter, LineFormatter):  # someone set another: the standard path
            return False
        try:
            line = self._prefix(level) + formatter.line(created, text) + "\n"
        except Exception:
            return False
        self.acquire()
        try:
            stream = self.stream
            if stream is None:
                return False
            stream.write(line)
            stream.flush()
            return True
        except Exception:
            return False
        finally:
            self.release()


class LineStreamHandler(_LineStream, logging.StreamHandler[TextIO]):
    """StreamHandler with the lean path (MailLogger)."""


class StartupHandler(LineStreamHandler):
    """stderr while mailerd starts, keeping its warnings (at most STARTUP_KEPT) for the log
    that `setup()` installs next (--log-file, or syslog once detached): a certificate about
    to expire, a key others can read or a low descriptor limit is found before that log is
    open, and an administrator reads the log, not the terminal the init script had."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.kept: list[tuple[int, float, str]] = []
        # Asked once: in the foreground this handler writes every line of the run (a
        # system call per line was a cost of each message).
        self.journal = stderr_is_journal()

    def _prefix(self, level: int) -> str:
        return journal_priority(level) if self.journal else ""

    def format(self, record: logging.LogRecord) -> str:  # (emit's path; emit_line's: _prefix)
        return self._prefix(record.levelno) + super().format(record)

    def _keep(self, level: int, created: float, text: str) -> None:
        if level >= logging.WARNING and len(self.kept) < STARTUP_KEPT:
            self.kept.append((level, created, text))

    def emit_line(self, level: int, created: float, text: str) -> bool:
        if not super().emit_line(level, created, text):
            return False
        self._keep(level, created, text)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        with contextlib.suppress(Exception):  # (emit() reported any error already)
            self._keep(record.levelno, record.created, record.getMessage())


STARTUP_KEPT = 100


class LineSysLogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler with the lean path (MailLogger): the datagram emit() would send."""

    # SysLogHandler's own, undocumented and so left out of the stubs: its socket (None until
    # createSocket()) and the method that (re)connects it to a Unix socket.
    socket: Socket | None
    _connect_unixsocket: Callable[[str | tuple[str, int]], None]

    def emit_line(self, level: int, created: float, text: str) -> bool:
        try:
            name = self.mapPriority(logging.getLevelName(level))
            prio = f"<{self.encodePriority(self.facility, name)}>"
            formatter = self.formatter
            if not isinstance(formatter, LineFormatter):  # someone set another
                return False
            msg = self.ident + formatter.line(created, text)
            if self.append_nul:
                msg += "\000"
            data = prio.encode("utf-8") + msg.encode("utf-8")
            self.acquire()
            try:
                if not self.unixsocket:
                    return False
                if not self.socket:
                    self.createSocket()
                sock = self.socket
                if sock is None:  # (createSocket() failed)
                    return False
                try:
                    sock.send(data)
                except OSError:
                    sock.close()
                    self._connect_unixsocket(self.address)
                    assert self.socket is not None  # (or it raised)
                    self.socket.send(data)
            finally:
                self.release()
            return True
        except Exception:
            return False


# (O_NONBLOCK: opening a FIFO for writing would wait for a reader; it fails instead.)
LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# The log file's mode: its user's alone (the children reopen it), readable by root (fail2ban,
# logrotate); not by the children's group, which other daemons share (nobody:nogroup).
LOG_MODE = 0o600


class ReopeningFileHandler(_LineStream, logging.FileHandler):
    """A FileHandler that reopens its file (by name) after `request_reopen()`.

    If the reopen fails (the file is not there yet, or not ours), the old stream is kept and
    the reopen is tried again at the next record, so no record is lost on the way.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), mode="a", encoding="utf-8")
        self._seen = _reopen_requests

    def _open(self) -> TextIOWrapper:
        """The file by its name, never through a symlink and only a regular file: the master
        is root, and whoever may write the log's directory must not choose what root appends
        to (an attacker's pass, /tmp/atk7c, planted a link to a root-only file and had the
        master crash at SIGUSR1). A FIFO is refused at once instead of blocking the open."""
        fd = os.open(self.baseFilename, LOG_FLAGS, LOG_MODE)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", self.baseFilename)
            if st.st_nlink > 1:  # (a hard link to another file, where protected_hardlinks is off)
                raise OSError(errno.EMLINK, "a file of more than one name", self.baseFilename)
            os.set_blocking(fd, True)
            return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115
        except BaseException:
            os.close(fd)
            raise

    def emit(self, record: logging.LogRecord) -> None:
        if self._seen != _reopen_requests:
            self.reopen()
        super().emit(record)

    def emit_line(self, level: int, created: float, text: str) -> bool:
        if self._seen != _reopen_requests:
            self.reopen()
        if self.stream is None:  # (FileHandler opens lazily in emit())
            return False
        return super().emit_line(level, created, text)

    def reopen(self) -> bool:
        wanted = _reopen_requests
        self.acquire()
        try:
            try:
                stream = self._open()
            except OSError:
                return False
            old, self.stream = self.stream, stream
            if old is not None:
                old.close()
            self._seen = wanted
            return True
        finally:
            self.release()


def setup(
    verbose: bool, *, log_file: Path | None = None, syslog: bool = False, startup: bool = False
) -> None:
    """Install the one root handler; raises OSError if `log_file` cannot be opened. With
    `startup`, it is stderr's that keeps the warnings (StartupHandler); the next call writes
    them to its log first, unless that is stderr again."""
    handler: LineStreamHandler | LineSysLogHandler | ReopeningFileHandler
    if startup:
        handler = StartupHandler()
        handler.setFormatter(LineFormatter(stamped=True))
    elif log_file is not None:
        handler = ReopeningFileHandler(log_file)
        handler.setFormatter(LineFormatter(stamped=True))
    elif syslog and syslog_available():
        handler = LineSysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.setFormatter(LineFormatter(stamped=False))
    else:
        handler = LineStreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter(stamped=True))
    # The logging HOWTO's "Optimization" settings: the formats use no caller, thread or
    # multiprocessing fields, and every message costs a few log lines.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False  # LineFormatter has the process id
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, StartupHandler) and not isinstance(handler, LineStreamHandler):
            for level, created, text in old.kept:
                handler.emit_line(level, created, text)
        old.close()
    root.handlers[:] = [handler]
    global _lean
    _lean = handler
    set_verbose(verbose)
    sys.unraisablehook = _unraisable


UNRAISABLE_EVERY = 60.0  # seconds between two lines of one kind of ignored exception
_UNRAISABLE = Throttle(UNRAISABLE_EVERY)  # by kind


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """An exception Python could not raise, in a call from C: one log line, where Python's
    own hook wrote "Exception ignored in" and a traceback to stderr, outside the log's format.
    A client can cause one: a TLS server name that is not ASCII fails in Python's SNI callback
    before ours runs (a reviewer's finding). One line a minute of each kind, with how many
    were left out: a client can cause thousands a second (an attacker's pass), and each of
    their handshakes is logged as failed already."""
    kind = unraisable.exc_type.__name__
    left_out = _UNRAISABLE.held_back(kind)
    if left_out is None:
        return
    exc = unraisable.exc_value
    what = f"{kind}: {exc}" if exc is not None else kind
    context = f"{unraisable.err_msg} " if unraisable.err_msg else ""  # (None: the default)
    try:
        where = repr(unraisable.object)
    except Exception:  # (its repr may fail too: this hook must not)
        where = f"a {type(unraisable.object).__name__}"
    more = f" ({left_out} more since the last such line, not logged)" if left_out else ""
    logging.getLogger("mailerd").warning(
        "a callback's exception was ignored (%sat %s): %s%s",
        shorten(context, 80),
        shorten(where, 120),
        shorten(what, 200),
        more,
    )


def set_verbose(verbose: bool) -> None:
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.INFO)  # not "Using selector ..." per process


def syslog_available() -> bool:
    return os.path.exists(SYSLOG_SOCKET)


def reopen() -> bool:
    """Reopen the log file now (master, in its loop); False if there is none or it failed."""
    request_reopen()
    reopened = False
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopeningFileHandler):
            reopened = handler.reopen() or reopened
    return reopened


def pin_directories() -> None:
    """In a child about to drop privileges: reopen the log file later through its directory
    opened now, so a file below a directory the user cannot traverse stays reopenable."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopeningFileHandler):
            path = Path(handler.baseFilename)
            try:
                fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            handler.baseFilename = f"/proc/self/fd/{fd}/{path.name}"


def file_descriptors() -> list[int]:
    """Descriptors the log handlers hold (to keep across daemonizing)."""
    fds = []
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if isinstance(handler, ReopeningFileHandler) and stream is not None:
            fds.append(stream.fileno())
    return fds

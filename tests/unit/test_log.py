"""The log line format: LineFormatter writes what logging.Formatter would, only cheaper."""

import io
import logging
import logging.handlers
import os
import socket
import sys
import time
import types

import pytest

from mailerd import log


def _record(created: float, exc_info=None) -> logging.LogRecord:
    record = logging.LogRecord("mailerd.test", logging.INFO, None, 0, "to=<%s>", ("a@b",), exc_info)
    record.created = created
    record.process = os.getpid()  # (log.setup() turns logProcesses off)
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


@pytest.mark.parametrize("stamped", [True, False])
def test_lines_are_those_of_the_standard_formatter(stamped):
    standard = logging.Formatter(log.FOREGROUND_FORMAT if stamped else log.SYSLOG_FORMAT)
    ours = log.LineFormatter(stamped=stamped)
    # The same second twice (the cached stamp), then the next ones, then back in time.
    for created in (0.0, 0.999, 1.0005, 1_800_000_000.25, 1_800_000_001.5, 59.0):
        assert ours.format(_record(created)) == standard.format(_record(created))


def test_a_traceback_is_kept():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record(1.0, sys.exc_info())
    line = log.LineFormatter(stamped=True).format(record)
    assert line == logging.Formatter(log.FOREGROUND_FORMAT).format(_record(1.0, record.exc_info))
    assert "ValueError: boom" in line


def test_a_forked_child_logs_its_own_process_id():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, log.LineFormatter(stamped=False).format(_record(1.0)).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    line = os.read(r, 1000).decode()
    os.close(r)
    assert line == f"mailerd[{pid}]: to=<a@b>"


# -- MailLogger's lean path: the same lines as the standard path, which it leaves for anything
#    unusual (a traceback, a mapping argument, a handler someone added).


@pytest.fixture
def installed(monkeypatch):
    """log.setup()'s state, put back afterwards: install(handler) makes it the lean one."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(log, "_lean", None)
    monkeypatch.setattr(root, "level", logging.INFO)

    def install(handler):
        root.handlers = [handler]
        log._lean = handler
        return handler

    return install


def _stream_handler(stream):
    handler = log.LineStreamHandler(stream)
    handler.setFormatter(log.LineFormatter(stamped=True))
    return handler


def _lines(stream) -> list[str]:
    return [line.split(" mailerd[", 1)[1] for line in stream.getvalue().splitlines()]


def test_module_loggers_are_mail_loggers():
    assert isinstance(logging.getLogger("mailerd.worker"), log.MailLogger)


def test_a_lean_line_is_the_standard_line(installed, monkeypatch):
    lean, standard = io.StringIO(), io.StringIO()
    installed(_stream_handler(lean))
    logger = logging.getLogger("mailerd.test-lean")
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.25)
    logger.info("%s: to=<%s>, message %d", "ID", "a@b", 7)
    logger.info("plain 100%")  # no arguments: no %-formatting, as with LogRecord
    logger.debug("below the level: nothing")
    installed(_stream_handler(standard))
    monkeypatch.setattr(log.MailLogger, "_log", logging.Logger._log)  # the standard path
    logger.info("%s: to=<%s>, message %d", "ID", "a@b", 7)
    logger.info("plain 100%")
    assert lean.getvalue() == standard.getvalue()
    assert _lines(lean) == [
        f"{os.getpid()}]: ID: to=<a@b>, message 7",
        f"{os.getpid()}]: plain 100%",
    ]
    assert lean.getvalue().startswith(
        logging.Formatter(log.FOREGROUND_FORMAT).formatTime(_record(1_800_000_000.25))
    )


def test_unusual_lines_take_the_standard_path(installed):
    out = io.StringIO()
    installed(_stream_handler(out))
    logger = logging.getLogger("mailerd.test-unusual")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed for %s", "x")
    logger.info("%(who)s logged in", {"who": "mapping"})
    text = out.getvalue()
    assert "failed for x\nTraceback" in text and "ValueError: boom" in text
    assert "mapping logged in" in text


def test_a_handler_added_later_sees_every_line(installed):
    out = io.StringIO()
    installed(_stream_handler(out))
    seen = []
    added = logging.Handler()
    added.emit = seen.append  # (as pytest's caplog adds its handler to the root)
    logging.getLogger().addHandler(added)
    logging.getLogger("mailerd.test-added").info("to=<%s>", "a@b")
    assert [r.getMessage() for r in seen] == ["to=<a@b>"]
    assert _lines(out) == [f"{os.getpid()}]: to=<a@b>"]


def test_a_failing_write_is_reported_as_the_standard_path_reports_it(installed, capsys):
    class Broken(io.StringIO):
        def write(self, text):
            raise OSError("disk full")

    installed(_stream_handler(Broken()))
    logging.getLogger("mailerd.test-broken").info("lost line")
    assert "disk full" in capsys.readouterr().err  # Handler.handleError's report


def test_a_syslog_datagram_is_the_standard_one(installed, tmp_path):
    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    try:
        handler = installed(
            log.LineSysLogHandler(address=path, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        )
        handler.setFormatter(log.LineFormatter(stamped=False))
        logger = logging.getLogger("mailerd.test-syslog")
        logger.warning("to=<%s>, status=deferred", "a@b")
        lean = server.recv(4096)
        handler.emit(
            logger.makeRecord(
                logger.name, logging.WARNING, None, 0, "to=<%s>, status=deferred", ("a@b",), None
            )
        )
        assert (
            lean
            == server.recv(4096)
            == f"<20>mailerd[{os.getpid()}]: to=<a@b>, status=deferred\0".encode()
        )
        handler.close()
    finally:
        server.close()


def test_the_lean_path_reopens_the_log_file(installed, tmp_path):
    path = tmp_path / "mailerd.log"
    handler = installed(log.ReopeningFileHandler(path))
    handler.setFormatter(log.LineFormatter(stamped=True))
    logger = logging.getLogger("mailerd.test-reopen")
    logger.info("before")
    path.rename(tmp_path / "mailerd.log.1")
    log.request_reopen()
    logger.info("after")
    handler.close()
    assert "before" in (tmp_path / "mailerd.log.1").read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()


def test_another_formatter_on_the_handler_takes_the_standard_path(installed):
    out = io.StringIO()
    handler = installed(_stream_handler(out))
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("mailerd.test-formatter").info("to=<%s>", "a@b")
    assert out.getvalue() == "INFO to=<a@b>\n"


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_ignored_exceptions_are_one_line_a_minute_of_each_kind(monkeypatch, caplog):
    """Python's unraisable exceptions (a TLS server name that is not ASCII, in Python's SNI
    callback) as log lines: a client can cause thousands a second (an attacker's pass), so
    one line a minute of each kind, saying how many were left out; and an object whose repr
    fails is no failure of the hook."""
    now = [1000.0]
    monkeypatch.setattr(
        log, "_UNRAISABLE", log.Throttle(log.UNRAISABLE_EVERY, clock=lambda: now[0])
    )

    def ignored(exc: BaseException, obj: object) -> None:
        hook = types.SimpleNamespace(
            exc_type=type(exc), exc_value=exc, exc_traceback=None, err_msg=None, object=obj
        )  # (what Python hands sys.unraisablehook)
        log._unraisable(hook)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, logger="mailerd"):
        for _ in range(100):
            ignored(UnicodeDecodeError("ascii", b"\xe9", 0, 1, "no"), b"\xe9aaa.example.net")
        ignored(ValueError("other"), _BadRepr())
        now[0] += log.UNRAISABLE_EVERY
        ignored(UnicodeDecodeError("ascii", b"\xe9", 0, 1, "no"), b"\xe9aaa.example.net")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "b'\\xe9aaa.example.net'" in lines[0] and "UnicodeDecodeError" in lines[0]
    assert "a _BadRepr" in lines[1] and "ValueError: other" in lines[1]
    assert lines[2].endswith("(99 more since the last such line, not logged)"), lines[2]


def test_a_throttle_lets_one_line_a_key_through_each_period_and_forgets_past_its_bound():
    now = [100.0]
    throttle = log.Throttle(60.0, most=3, clock=lambda: now[0])
    assert throttle.due("a") and not throttle.due("a") and throttle.due("b")
    now[0] += 59.9
    assert not throttle.due("a")
    now[0] += 0.2
    assert throttle.due("a") and not throttle.due("a")
    assert throttle.due() and throttle.due("c")  # (the fourth key: all forgotten, then kept)
    assert throttle.due("a") and not throttle.due("c")
    # How many it held back, for a line that says so:
    assert not throttle.due("c") and throttle.held_back("c") is None
    now[0] += 60.0
    assert throttle.held_back("c") == 3 and throttle.held_back("d") == 0

"""The log line format: LineFormatter writes what logging.Formatter would, only cheaper."""

import logging
import os
import sys

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

"""A worker's reports to the master (ipc.reports, Master._read_reports), each over a socket of
its own: a compromised worker must not speak for another child, nor keep the others' reports
from arriving, nor keep the root master's loop busy or grow its memory.

A real Master (not run: no worker is forked by it) reads real socket pairs, written here by
real processes forked for the purpose, as a worker would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailerd import config
from mailerd.ipc import reports
from mailerd.ipc.reports import REPORTS_MAX
from mailerd.master.arbiter import Child, Master


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    cfg = config.load(
        ["-s", str(tmp_path / "spool"), "-q", str(tmp_path / "queue"), "-d", "example.org",
         "-H", "mx.example.org", "-l", "none", "-n", "none", "-w", "2"]
    )  # fmt: skip
    delivery = socket.socket(socket.AF_UNIX)
    m = Master(cfg, [], delivery)
    m.wake_r, m.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # (as run makes it)
    yield m
    os.close(m.wake_r)
    os.close(m.wake_w)
    for child in m.children.values():
        if child.reports is not None:
            child.reports.close()
    delivery.close()


def worker(master: Master, slot: int, speak: Callable[[int], None]) -> int:
    """A forked process, known to the master as worker `slot`, that runs `speak` with its end
    of its own reports socket and exits; its pid."""
    ours, theirs = reports.channel()
    pid = os.fork()
    if pid == 0:
        with contextlib.suppress(BaseException):
            speak(theirs.fileno())
        os._exit(0)
    theirs.close()
    os.waitpid(pid, 0)
    master.children[pid] = Child("worker", slot, time.monotonic(), reports=ours)
    return pid


def says(*texts: str) -> Callable[[int], None]:
    def speak(fd: int) -> None:
        for text in texts:
            reports.tell(fd, text)

    return speak


def floods(text: str) -> Callable[[int], None]:
    """Sends `text` until its socket is full."""

    def speak(fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(fd, text.encode())

    return speak


def test_a_report_counts_for_the_worker_whose_socket_it_came_on(master: Master):
    """What a report says of itself is all it can say: no text names another child."""
    quiet = worker(master, 1, says())
    talker = worker(master, 2, says(f"{quiet} ready", "ready", "retired"))
    master._read_reports()
    assert not master.children[quiet].ready and not master.children[quiet].retired
    assert master.children[talker].ready and master.children[talker].retired


def test_a_flooding_worker_keeps_no_other_report_from_arriving(master: Master):
    """One socket each: a worker that fills its own (as code running in it could) leaves the
    others' room, so a reload still hears its new workers' "ready" at once (with one shared
    socket it waited for its 15 s timeout). And the flooder is heard no longer."""
    flooder = worker(master, 1, floods("ready"))
    new = worker(master, 2, says("ready"))
    master._read_reports()
    assert master.children[new].ready
    assert master.children[flooder].reports is None  # (past REPORTS_MAX: closed)
    # the loop does not spin on it either: nothing is left to wait for
    waited = time.monotonic()
    master._wait(0.3)
    assert time.monotonic() - waited >= 0.25


def test_at_most_reports_max_are_heard_from_a_worker(master: Master):
    pid = worker(master, 1, says(*["retired"] * REPORTS_MAX))
    master._read_reports()
    assert master.children[pid].retired and master.children[pid].reports is not None
    loud = worker(master, 2, says(*["error too much"] * (REPORTS_MAX + 1)))
    master._read_reports()
    assert master.children[loud].reports is None


def test_a_start_up_error_is_kept_until_the_worker_is_ready(master: Master):
    failing = worker(master, 1, says("error worker 1 cannot start: " + "x" * 5000))
    master._read_reports()
    assert master.failure().startswith("worker 1 cannot start: xxx")
    assert len(master.failure()) <= 1000
    late = worker(master, 2, says("ready", "error late"))
    master._read_reports()
    assert master.children[late].ready and "late" not in master.failure()
    assert failing in master.children


def test_what_a_worker_said_before_it_exited_is_heard_when_it_is_reaped(master: Master):
    """A worker that cannot start says why, and exits: the master may reap it before its
    next read; the reason still reaches whoever waits for the start."""
    ours, theirs = reports.channel()
    pid = os.fork()
    if pid == 0:
        reports.tell(theirs.fileno(), "error worker 1 cannot start: no spool")
        os._exit(78)
    theirs.close()
    master.children[pid] = Child("worker", 1, time.monotonic(), reports=ours)
    assert _wait_exited(pid)
    master.reap()
    assert master.failure() == "worker 1 cannot start: no spool"
    assert ours.fileno() == -1  # (closed with it)


def _wait_exited(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[1][0] == "Z":
                return True
        time.sleep(0.01)
    return False

"""The children's reports to the master (ipc.reports, Master._read_reports), which every child
may send: a compromised worker must not grow the root master's memory, nor keep its loop from
reaping and respawning, nor speak for another child.

A real Master (not run: no child is forked) reads a real socket pair, written here by real
processes: this one, and children forked for the purpose, as a worker would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailerd import config
from mailerd.ipc import reports
from mailerd.master.arbiter import Child, Master


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    cfg = config.load(
        ["-s", str(tmp_path / "spool"), "-q", str(tmp_path / "queue"), "-d", "example.org",
         "-H", "mx.example.org", "-l", "none", "-n", "none", "-w", "2"]
    )  # fmt: skip
    delivery = socket.socket(socket.AF_UNIX)
    m = Master(cfg, [], delivery)
    m.reports, theirs = reports.channel()
    m.reports_w = theirs.detach()
    yield m
    m.reports.close()
    os.close(m.reports_w)
    delivery.close()


def from_child(master: Master, *texts: str) -> int:
    """Fork a process that sends `texts` as a worker would, and exits; its pid."""
    pid = os.fork()
    if pid == 0:
        for text in texts:
            reports.tell(master.reports_w, text)
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_a_report_counts_for_the_child_that_sent_it_only(master: Master):
    """The kernel says who sent a report: a worker cannot say that its sibling is ready or
    has retired, nor give it a start-up error (the text carries no pid to forge)."""
    sibling = 4242  # a worker the master knows, not yet ready
    master.children[sibling] = Child("worker", 1, time.monotonic())
    pid = from_child(master, f"{sibling} ready", "ready", "retired", "error forged")
    master.children[pid] = Child("worker", 2, time.monotonic())
    master._read_reports()
    assert not master.children[sibling].ready and not master.children[sibling].retired
    assert master.children[pid].ready and master.children[pid].retired
    assert "forged" not in master.failure()  # (it was ready: a start-up error no longer counts)


def test_reports_of_processes_that_are_not_its_children_are_ignored(master: Master):
    reports.tell(master.reports_w, "ready")  # this process: no child of the master
    reports.tell(master.reports_w, "error not mine")
    master._read_reports()
    assert not any(c.ready for c in master.children.values())
    assert "not mine" not in master.failure()


def test_a_start_up_error_is_kept_until_the_child_is_ready(master: Master):
    pid = os.getpid()  # (the master takes this process for its child here)
    master.children[pid] = Child("worker", 1, time.monotonic())
    reports.tell(master.reports_w, "error worker 1 cannot start: " + "x" * 5000)
    master._read_reports()
    assert master.failure().startswith("worker 1 cannot start: xxx")
    assert len(master.failure()) <= 1000
    reports.tell(master.reports_w, "ready")
    reports.tell(master.reports_w, "error late")
    master._read_reports()
    assert master.children[pid].ready and "late" not in master.failure()


def test_one_loop_turn_reads_a_bounded_part_of_a_flood_and_keeps_little(master: Master):
    """A child that keeps the socket full would otherwise keep the master reading (and
    keeping) for as long as it likes: no reaping, no respawn, no SIGTERM meanwhile."""
    pid = os.getpid()
    master.children[pid] = Child("worker", 1, time.monotonic())
    sent = fill(master, "retired")  # (small: the most that fit)
    assert sent > reports.TURN * 2, sent
    master._read_reports()
    left = 0
    with contextlib.suppress(BlockingIOError):
        while master.reports.recv(1 << 16):
            left += 1
    assert left == sent - reports.TURN, (sent, left)
    # Turn after turn of long ones: what the master keeps of them stays bounded.
    for _ in range(50):
        fill(master, "error " + "x" * 4000)
        master._read_reports()
    assert len(master.failure()) <= 1000, len(master.failure())


def fill(master: Master, text: str) -> int:
    """Send `text` until the socket is full; how many times."""
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(master.reports_w, text.encode())
            sent += 1
    return sent

"""The master's status pipe (Master._read_status), where every child may write: a compromised
worker must not grow the root master's memory, nor keep its loop from reaping and respawning,
nor speak for another child.

A real Master (not run: no child is forked) reads a real pipe, written here as a worker
would.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailerd import config
from mailerd.master.arbiter import Child, Master

CHILD = 4242  # a worker the master knows, not yet ready


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    cfg = config.load(
        ["-s", str(tmp_path / "spool"), "-q", str(tmp_path / "queue"), "-d", "example.org",
         "-H", "mx.example.org", "-l", "none", "-n", "none", "-w", "2"]
    )  # fmt: skip
    delivery = socket.socket(socket.AF_UNIX)
    m = Master(cfg, [], delivery)
    m.status_r, m.status_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    m.children[CHILD] = Child("worker", 1, time.monotonic())
    yield m
    os.close(m.status_r)
    os.close(m.status_w)
    delivery.close()


def test_one_loop_turn_reads_a_bounded_part_of_a_flood_and_keeps_little(master: Master):
    """A writer that keeps the pipe full would otherwise keep the master reading (and
    appending) for as long as it likes: no reaping, no respawn, no SIGTERM meanwhile."""
    fcntl.fcntl(master.status_w, fcntl.F_SETPIPE_SZ, 1 << 20)
    line = f"{CHILD} error {'x' * 4000}\n".encode()
    written = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            written += os.write(master.status_w, line)
    assert written > 1 << 19
    master._read_status()
    left = 0
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(master.status_r, 1 << 20):
            left += len(chunk)
    assert left >= written - 256 * 1024, f"one turn read {written - left} bytes"
    # Turn after turn of the same: what the master keeps of it stays bounded.
    for _ in range(50):
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(master.status_w, line)
        master._read_status()
    assert len(master.failure()) <= 1000, len(master.failure())


def test_status_lines_of_pids_that_are_not_its_children_are_ignored(master: Master):
    os.write(master.status_w, b"999 ready\n999 error forged\n")
    os.write(master.status_w, f"{CHILD} ready\n".encode())
    master._read_status()
    assert master.children[CHILD].ready
    assert "forged" not in master.failure()
    # A child that is ready (it started) has no start-up error to report any more.
    os.write(master.status_w, f"{CHILD} error late\n".encode())
    master._read_status()
    assert "late" not in master.failure()

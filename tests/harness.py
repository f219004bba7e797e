"""Helpers shared by the end-to-end suites (tests/e2e, tests/netns): importable as `harness`
because pytest puts tests/ on sys.path for those packages' conftest files."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import threading
import time
from pathlib import Path


def wait_for_banner(
    proc: subprocess.Popen, host: str, port: int, deadline: float, describe
) -> None:
    """Wait until a 220 greeting arrives on host:port (then QUIT politely).

    Raises RuntimeError with `describe()` (e.g. the server's log) if the process exits or the
    monotonic `deadline` passes first.
    """
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mailerd exited with {proc.returncode} at start-up:\n{describe()}")
        if _greeted(host, port, deadline):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"mailerd not ready on [{host}]:{port}:\n{describe()}")
        time.sleep(0.05)


def _greeted(host: str, port: int, deadline: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(max(0.5, deadline - time.monotonic()))
            data = b""
            while b"\n" not in data:
                chunk = s.recv(1024)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"220"):
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                return True
    except OSError:
        pass
    return False


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value; return it, or the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def tracebacks(log_text: str) -> list[str]:
    """Python tracebacks in a server's log (each with the line that precedes it)."""
    lines = log_text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            end = i + 1
            while end < len(lines) and (lines[end].startswith(" ") or not lines[end]):
                end += 1
            out.append("\n".join(lines[max(0, i - 1) : end + 1]))
    return out


def late_imports(log_text: str) -> list[str]:
    """Lines where a child imported a module after dropping privileges (mailerd/preload.py):
    harmless in a readable checkout, fatal in one the `mail` user cannot read."""
    return [line for line in log_text.splitlines() if "late import of " in line]


def server_problems(log_text: str) -> list[str]:
    """What in a server's log fails the test that ran it: tracebacks and late imports."""
    return tracebacks(log_text) + late_imports(log_text)


# -- processes, read from /proc ---------------------------------------------------------------

_GONE = ("Z", "X")  # zombie or dead: not alive


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or not ours to read
        return None
    return data[data.rindex(")") + 2 :].split()


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it is gone."""
    fields = _stat(pid)
    return None if fields is None else (fields[0], int(fields[1]))


def pid_alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in _GONE


def _live_processes() -> dict[int, tuple[int, int]]:
    """pid → (ppid, process group) of every live process, from one scan of /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(entry)) and fields[0] not in _GONE:
            table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def children_of(pid: int) -> list[int]:
    """Direct, live children of ``pid`` (like ``ps --ppid``)."""
    return sorted(p for p, (ppid, _) in _live_processes().items() if ppid == pid)


def descendants_of(pid: int) -> list[int]:
    """Every live process below ``pid``."""
    table = _live_processes()
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, (ppid, _) in table.items() if ppid == parent]
        found += kids
        todo += kids
    return sorted(found)


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (orphans that left their parent included)."""
    return sorted(p for p, (_, group) in _live_processes().items() if group == pgid)


# Ports

_handed_out: set[int] = set()
_port_lock = threading.Lock()


def _below_ephemeral() -> range:
    """Ports the kernel never picks by itself: below its ephemeral range, from which it takes
    the source port of every outbound connection and the port of every bind to port 0. A port
    found free there, as those are, was taken by another test's client between here and the
    daemon's bind (CI: "cannot listen on 127.0.0.1:55523: Address already in use")."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


def _this_process_share(ports: range) -> range:
    """This test process's own part of `ports`, none of which another process of the same run
    (pytest-xdist's -n: gw0, gw1, ...) ever hands out. Two processes each found a port free
    and handed it to a mailerd of theirs, which both bind only once started: the second to
    start failed with "Address already in use"; a check in this process alone (`_handed_out`)
    cannot see the other's choice, made in the same second."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        index = int(worker.removeprefix("gw"))
    except ValueError:
        return ports
    return ports[index % count :: count] if count > 1 else ports


_PORTS = _this_process_share(_below_ephemeral())
_RANDOM = random.SystemRandom()  # (not the shared generator, which a test may seed)


def free_port() -> int:
    """A TCP port that is free on both 127.0.0.1 and ::1, outside the ephemeral range."""
    with _port_lock:
        for _ in range(200):
            port = _RANDOM.choice(_PORTS)
            if port in _handed_out:
                continue
            try:
                for family, address in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
                    with socket.socket(family, socket.SOCK_STREAM) as s:
                        if family == socket.AF_INET6:
                            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        s.bind((address, port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError("could not find a free port on 127.0.0.1 and ::1")

"""Helpers shared by the end-to-end suites (tests/e2e, tests/netns): importable as `harness`
because pytest puts tests/ on sys.path for those packages' conftest files."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time


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

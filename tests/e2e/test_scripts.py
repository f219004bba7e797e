"""scripts/server as a new user runs it: it says it is listening only once it is, and every
command it prints works (swaks, curl, sendmail, and swaks with STARTTLS and AUTH on the
submission port) and lands a message in the mailbox it names. When its own mailerd does not
start (another one answers on its port), it says nothing of listening and exits as mailerd did.

It runs in a copy of the checkout (its `var/` is the copy's) that shares this checkout's .venv,
on its fixed port 2525; skipped when that port is taken.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, wait_until

PORT = 2525


def _port_taken() -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", PORT))
        except OSError:
            return True
    return False


def _copy_checkout(target: Path) -> Path:
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    # The checkout's virtualenv, shared, with a set-up stamp of the copy's own (naming the
    # copy): scripts/setup must not reinstall mailerd into it from the copy (an editable
    # install pointing here, gone with the test: `_assert_venv_untouched`).
    venv = target / ".venv"
    venv.mkdir()
    for entry in (REPO / ".venv").iterdir():
        if entry.name != ".mailerd-setup":
            (venv / entry.name).symlink_to(entry)
    (venv / ".mailerd-setup").write_text(os.path.realpath(target) + "\n")
    return target


def _assert_venv_untouched() -> None:
    """The shared .venv still imports this checkout's mailerd (asked from /, where no
    checkout is on the path)."""
    found = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", "import mailerd; print(mailerd.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    expected = os.path.realpath(REPO / "mailerd" / "__init__.py")
    assert os.path.realpath(found.stdout.strip()) == expected, found


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if _port_taken():
        pytest.skip(f"port {PORT} is taken: scripts/server uses it")
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv to share")
    return _copy_checkout(tmp_path / "checkout")


def _run_server(checkout: Path) -> subprocess.CompletedProcess[str]:
    """scripts/server run to its end (it ends at once when its mailerd cannot start). One that
    runs on instead is stopped with all it started, its mailerd too, and the test fails."""
    proc = subprocess.Popen(
        [str(checkout / "scripts" / "server")],
        cwd=checkout,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=10)
        pytest.fail(f"scripts/server still ran after 60 s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture
def server(tmp_path: Path, checkout: Path):
    out = open(tmp_path / "server.out", "w+b")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [str(checkout / "scripts" / "server")],
        cwd=checkout,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield checkout, proc, tmp_path / "server.out"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        out.close()


def test_scripts_server_prints_commands_that_work(server):
    checkout, proc, out = server
    text = lambda: out.read_bytes().decode("utf-8", "replace")  # noqa: E731
    assert wait_until(lambda: "It lands in" in text() or proc.poll() is not None, 60), text()
    assert proc.poll() is None, text()
    # "listening" is said only once it listens: a connection right now gets the banner
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
        assert s.recv(100).startswith(b"220 ")
    commands = [line.strip() for line in text().splitlines() if line.startswith("  ")]
    assert len(commands) == 4, text()
    assert "--tls --auth" in commands[3], commands
    match = re.search(r"It lands in var/spool/(\S+)/1", text())
    assert match, text()
    mailbox = checkout / "var" / "spool" / match[1]
    for n, command in enumerate(commands, 1):
        run = subprocess.run(
            ["bash", "-c", command], cwd=checkout, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
        assert wait_until(lambda n=n: (mailbox / str(n)).exists(), 10), (command, text())
    time.sleep(0.2)
    assert sorted(p.name for p in mailbox.iterdir() if p.name.isdigit()) == ["1", "2", "3", "4"]
    submitted = (mailbox / "4").read_bytes()
    assert re.search(rb"\(using TLSv1\.[23] with cipher ", submitted), submitted[:600]
    assert b" with ESMTPSA id " in submitted, submitted[:600]
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(20) in (0, 130), text()
    assert "Traceback" not in text()
    _assert_venv_untouched()


def test_a_second_scripts_server_says_its_mailerd_did_not_start(server):
    """The tester's case: a second scripts/server while one runs. Its port answers (the first
    one's), but its own mailerd exits 1 ("already running"): no banner, and its status."""
    checkout, proc, out = server
    text = lambda: out.read_bytes().decode("utf-8", "replace")  # noqa: E731
    assert wait_until(lambda: "It lands in" in text() or proc.poll() is not None, 60), text()
    second = _run_server(checkout)
    assert second.returncode == 1, (second.stdout, second.stderr)
    assert "already running" in second.stderr, second.stderr
    assert "listening" not in second.stdout + second.stderr, second.stdout
    assert proc.poll() is None, text()  # the first one still serves


def test_scripts_server_is_not_fooled_by_another_listener(checkout):
    """Something else (not mailerd) answers on 127.0.0.1:2525: scripts/server's mailerd cannot
    bind it and exits 1, and scripts/server says so rather than that it listens."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", PORT))
        other.listen(8)
        run = _run_server(checkout)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "listening" not in run.stdout + run.stderr, run.stdout
    assert "mailerd" in run.stderr and "in use" in run.stderr, run.stderr
    _assert_venv_untouched()

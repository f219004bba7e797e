"""worker: a session whose RCPT needs a slow user database lookup holds only itself.

A real Worker accepts on a real socket in this test's event loop; the user database is made
slow (pwd.getpwnam takes 0.5 s) and a recipient that is an account without a mailbox yet needs
it. Another session on the same worker must be answered meanwhile: the lookup runs in a thread
(Connection.check_recipient answers PENDING), not in the loop.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import time
from pathlib import Path

from mailerd import config, spool
from mailerd.config import ListenAddress
from mailerd.worker import process
from mailerd.worker.process import Worker

SLOW = 0.5


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole SMTP reply (its last line has a space after the code)."""
    lines = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        lines += line
        if len(line) < 4 or line[3:4] == b" ":
            return lines


def _local_worker(tmp_path: Path) -> tuple[Worker, socket.socket, int]:
    """A worker (not started) with one local listener on a free loopback port, its spool and
    queue under tmp_path; and that listener's socket and port."""
    (tmp_path / "spool").mkdir()
    for sub in ("tmp", "private"):
        (tmp_path / "queue" / sub).mkdir(parents=True)
    cfg = config.load(
        ["-s", str(tmp_path / "spool"), "-q", str(tmp_path / "queue"), "-d", "example.org",
         "-H", "mx.example.org", "-l", "none", "-n", "none", "--dns-server", "127.0.0.1:9"]
    )  # fmt: skip
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    return Worker(cfg, [(sock, ListenAddress("127.0.0.1", port, config.LOCAL))], 1), sock, port


def test_a_slow_account_lookup_holds_only_its_own_session(tmp_path: Path, monkeypatch):
    real = pwd.getpwnam

    def slow(name: str):
        time.sleep(SLOW)
        return real(name)

    monkeypatch.setattr(spool.pwd, "getpwnam", slow)
    spool._accounts.clear()
    worker, sock, port = _local_worker(tmp_path)

    async def main() -> tuple[float, float, bytes]:
        serving = asyncio.create_task(worker.main())
        await asyncio.sleep(0.05)
        (ra, wa), (rb, wb) = [await asyncio.open_connection("127.0.0.1", port) for _ in "ab"]
        for reader, writer in ((ra, wa), (rb, wb)):
            await _reply(reader)
            writer.write(b"EHLO client.example\r\n")
            await _reply(reader)
        wa.write(b"MAIL FROM:<a@example.org>\r\n")
        await _reply(ra)
        start = time.monotonic()
        wa.write(b"RCPT TO:<root@example.org>\r\n")  # an account, no mailbox: a lookup
        await asyncio.sleep(0.05)
        wb.write(b"NOOP\r\n")
        await _reply(rb)
        other = time.monotonic() - start
        verdict = await _reply(ra)
        slow_one = time.monotonic() - start
        for writer in (wa, wb):
            writer.close()
        worker.stopping = True
        serving.cancel()
        return other, slow_one, verdict

    other, slow_one, verdict = asyncio.run(main())
    sock.close()
    assert verdict.startswith(b"250 "), verdict
    assert slow_one >= SLOW
    assert other < SLOW / 2, f"the other session waited {other:.2f} s for the lookup"


def test_a_connection_accepted_as_the_worker_retires_keeps_its_session(tmp_path: Path, monkeypatch):
    """SIGUSR2 (retire, after a reload) between accept() and connection_made: the worker must
    count that connection as a session to finish, not see none, stop, and answer it 421 (or
    close it) as in a shutdown. connection_made is made late here, as a busy loop makes it."""

    class LateConnection(process.Connection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            asyncio.get_running_loop().call_later(0.3, super().connection_made, transport)

    monkeypatch.setattr(process, "Connection", LateConnection)
    worker, sock, port = _local_worker(tmp_path)

    async def main() -> tuple[bytes, bytes]:
        serving = asyncio.create_task(worker.main())
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)  # accepted; its connection_made still to come
        os.kill(os.getpid(), signal.SIGUSR2)
        banner = await _reply(reader)
        writer.write(b"EHLO client.example\r\n")
        ehlo = await _reply(reader)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        writer.close()
        await asyncio.wait_for(serving, 10)  # it retires once that session has ended
        return banner, ehlo

    banner, ehlo = asyncio.run(main())
    sock.close()
    assert banner.startswith(b"220 "), banner
    assert ehlo.startswith(b"250"), ehlo

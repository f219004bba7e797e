"""Session caps at connect, the delivery process or its mailbox writer dying under the workers,
and a local copy that fails."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .conftest import Mailerd, expect, mail_rcpt, owner_transaction, send_data, wait_until


def test_total_session_cap_refuses_with_421(mailerd_factory):
    m: Mailerd = mailerd_factory(workers=1, extra=["--max-sessions", "2"])
    held = [m.connect(), m.connect()]
    for c in held:
        expect(c.banner(), 220)
    with m.connect() as third:
        reply = third.banner()
        expect(reply, 421, "4.7.0")
        assert third.wait_eof() is not None
    held[0].close()
    # A freed slot is usable again (the worker notices the close asynchronously).
    assert wait_until(lambda: _greeted(m), timeout=5)
    held[1].close()


def _greeted(m: Mailerd, trusted: bool = True) -> bool:
    with m.connect(trusted=trusted) as c:
        return c.banner().code == 220


def test_per_ip_cap_applies_to_untrusted_listeners_only(mailerd_factory):
    m: Mailerd = mailerd_factory(workers=1, extra=["--max-sessions-per-ip", "2"])
    untrusted = [m.connect(trusted=False), m.connect(trusted=False)]
    for c in untrusted:
        expect(c.banner(), 220)
    with m.connect(trusted=False) as third:
        expect(third.banner(), 421, "4.7.0")
    # Local clients (the trusted listener) are not counted against an address cap.
    trusted = [m.connect(trusted=True) for _ in range(3)]
    for c in trusted:
        expect(c.banner(), 220)
    for c in untrusted + trusted:
        c.close()


def test_session_caps_hold_across_workers(mailerd_factory):
    """Each worker accepts on its own, but the caps are the server's: with three workers, a
    per-address cap of 2 admits two sessions from one address, not two per worker; the total
    cap likewise. (Ten refused attempts: counted per worker, some would land on a worker
    that holds none and be let in.)"""
    m: Mailerd = mailerd_factory(workers=3, extra=["--max-sessions-per-ip", "2"])
    held = _hold(m, 2, trusted=False)
    for _ in range(10):
        with m.connect(trusted=False) as extra:
            expect(extra.banner(), 421, "4.7.0")
    held.pop().close()
    assert wait_until(lambda: _greeted(m, trusted=False), timeout=5)
    for c in held:
        c.close()

    t: Mailerd = mailerd_factory(workers=3, extra=["--max-sessions", "3"])
    held = _hold(t, 3, trusted=True)
    for _ in range(10):
        with t.connect(trusted=False) as extra:
            expect(extra.banner(), 421, "4.7.0")
    for c in held:
        c.close()


def _hold(m: Mailerd, n: int, trusted: bool) -> list:
    """n greeted sessions. The start-up probes' sessions end asynchronously after they close,
    so a 421 is retried for a while: once n are held, nothing else is counted."""
    held: list = []
    deadline = time.monotonic() + 10
    while len(held) < n:
        c = m.connect(trusted=trusted)
        reply = c.banner()
        if reply.code == 220:
            held.append(c)
            continue
        c.close()
        assert time.monotonic() < deadline, f"could not hold {n} sessions: {reply}"
        time.sleep(0.05)
    return held


def test_sessions_of_a_killed_worker_are_not_counted_forever(mailerd_factory):
    m: Mailerd = mailerd_factory(workers=2, extra=["--max-sessions-per-ip", "2"])
    held = _hold(m, 2, trusted=False)
    old = m.worker_pids()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: len(set(m.worker_pids()) - set(old)) == 2, timeout=10)
    for c in held:
        c.close()
    again = [m.connect(trusted=False) for _ in range(2)]
    for c in again:
        expect(c.banner(), 220)
        c.close()


def _kill_and_wait_for_a_new_one(m: Mailerd, title: str) -> None:
    """kill -9 the one process with this title; wait until the master has started another."""
    old = [pid for pid, t in m.titles().items() if t.startswith(title)]
    assert len(old) == 1, m.titles()
    os.kill(old[0], signal.SIGKILL)
    replaced = wait_until(
        lambda: [p for p, t in m.titles().items() if t.startswith(title) and p != old[0]],
        timeout=15,
    )
    assert replaced, f"{title} not replaced: {m.titles()}"


def test_delivery_process_restart(mailerd: Mailerd):
    """kill -9 of the delivery process: the master starts a new one on the same socket, the
    workers reconnect, and mail flows again; nothing that got a 250 is missing."""
    m = mailerd
    m.add_user("carol")
    with m.smtp() as s:
        body = b"Subject: 1\r\n\r\none\r\n"
        assert s.sendmail("a@client.test", ["carol@example.org"], body) == {}
    _kill_and_wait_for_a_new_one(m, "mailerd: delivery")
    accepted = 1
    for i in range(6):  # new sessions on every worker reconnect and commit
        with m.smtp(host="127.0.0.1" if i % 2 else "::1") as s:
            body = f"Subject: after {i}\r\n\r\nafter {i}\r\n".encode()
            assert s.sendmail("a@client.test", ["carol@example.org"], body) == {}
            accepted += 1
    assert m.wait_messages("carol", accepted, timeout=10) == list(range(1, accepted + 1))


class _Recorder:
    def __init__(self):
        self.rcpts: list[str] = []

    async def handle_DATA(self, server, session, envelope):
        self.rcpts.extend(envelope.rcpt_tos)
        return "250 2.0.0 Ok"


def test_mail_committed_by_the_old_generation_after_a_reload_is_delivered(mailerd_factory):
    """A session opened before SIGHUP finishes its transaction on the old worker and the old
    delivery process, after the new scheduler took over the queue: it must still go out."""
    from aiosmtpd.controller import Controller

    from .conftest import free_port

    recorder = _Recorder()
    smarthost = Controller(recorder, hostname="127.0.0.1", port=free_port())
    smarthost.start()
    try:
        m: Mailerd = mailerd_factory(
            workers=1, extra=["--relayhost", f"127.0.0.1:{smarthost.port}", "--retry-after", "1s"]
        )
        with m.connect() as c:
            c.start()
            for rcpt in ("first@remote.test", "second@remote.test"):
                mail_rcpt(c, rcpt, sender="a@example.org")
                if rcpt.startswith("second"):
                    old_workers = set(m.worker_pids())
                    m.signal(signal.SIGHUP)
                    renewed = lambda old=old_workers: set(m.worker_pids()) - old  # noqa: E731
                    assert wait_until(renewed, timeout=10)
                send_data(c, b"Subject: " + rcpt.encode() + b"\r\n\r\nhello\r\n")
            expect(c.cmd("QUIT"), 221, conn=c)
        assert wait_until(lambda: "second@remote.test" in recorder.rcpts, timeout=25), (
            recorder.rcpts,
            m.queue_files(),
        )
        assert sorted(recorder.rcpts) == ["first@remote.test", "second@remote.test"]
    finally:
        smarthost.stop()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_a_client_that_never_reads_its_replies_cannot_grow_the_worker(mailerd_factory):
    import socket
    import time

    m: Mailerd = mailerd_factory(workers=1)
    [worker] = m.worker_pids()
    before = _rss_kb(worker)
    sock = socket.create_connection(("127.0.0.1", m.port(trusted=False)), timeout=5)
    sock.setblocking(False)
    chunk = b"NOOP\r\n" * 10000
    sent, deadline = 0, time.monotonic() + 8
    while time.monotonic() < deadline and sent < 200_000_000:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)  # the server stopped reading: what we want
    grown_mb = (_rss_kb(worker) - before) / 1024
    sock.close()
    # Without back-pressure the worker keeps reading and buffering replies (measured: +35 MB in
    # 8 s, growing); with it, it stops reading once the replies back up (+5 MB).
    assert grown_mb < 15, f"worker grew {grown_mb:.0f} MB after {sent / 1e6:.0f} MB of NOOPs"
    with m.smtp() as s:  # and it still serves others
        assert s.noop()[0] == 250


def test_a_client_that_never_reads_its_replies_loses_its_place(mailerd_factory):
    """A client that pipelines commands and reads none of the replies: at the command timeout
    its session ends, and its place under the caps comes back within the linger that follows
    (a transport's close() waited for the replies to drain, for ever: an attacker's pass held
    every network place so, /tmp/atk7a F1)."""
    import socket

    m: Mailerd = mailerd_factory(workers=1, extra=["--max-sessions-per-ip", "1", "--timeout", "2s"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", m.port(trusted=False)))
    sock.setblocking(False)
    chunk = b"HELP\r\n" * 10000
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.01)  # the server stopped reading: it is holding unread replies
    try:
        with m.connect(trusted=False) as second:
            expect(second.banner(), 421, "4.7.0")  # the place is held meanwhile
        started = time.monotonic()
        assert wait_until(lambda: _greeted(m, trusted=False), timeout=15), (
            f"the place was not given back; log:\n{m.stderr_text()[-2000:]}"
        )
        assert time.monotonic() - started < 8
        assert "dropped, its replies unread" in m.stderr_text()
    finally:
        sock.close()


PIPELINER = """
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.recv(4096)
def drain():
    while s.recv(1 << 20):
        pass
threading.Thread(target=drain, daemon=True).start()
block = b"NOOP\\r\\n" * 65536
while True:
    s.sendall(block)
"""


def test_clients_pipelining_commands_do_not_starve_the_owner(mailerd_factory):
    """Two network clients pipeline NOOPs as fast as they are answered (and read every reply:
    no back-pressure helps); the owner's session on the same worker still gets its replies at
    once. A worker answered all of a 256 KB read in one go, 43,000 replies, and the owner
    waited 10-27 s for a transaction (an attacker's pass, /tmp/atk7a F3)."""
    m: Mailerd = mailerd_factory(workers=1)
    port = str(m.port(trusted=False))
    _owner_served_under(m, [PIPELINER, port], 2, "pipeliners", settle=1.0, limit=2.0)


def _owner_served_under(
    m: Mailerd, script: list[str], clients: int, what: str, settle: float, limit: float
) -> None:
    """With `clients` processes running `python -c *script` against m (each left running),
    the owner's transaction on the loopback listener, three times, takes under `limit` s."""
    attackers = [
        subprocess.Popen([sys.executable, "-c", *script], stderr=subprocess.DEVNULL)
        for _ in range(clients)
    ]
    try:
        time.sleep(settle)
        for _ in range(3):
            took = owner_transaction(m)
            assert took < limit, f"the owner's transaction took {took:.1f} s under the {what}"
            assert all(a.poll() is None for a in attackers), f"the {what} should still run"
    finally:
        for a in attackers:
            a.kill()
            a.wait()


STREAMER = """
import socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = s.makefile("rb")
f.readline()
rcpt = b"RCPT TO:<%s>" % sys.argv[2].encode()
for command in (b"EHLO streamer.test", b"MAIL FROM:<a@streamer.test>", rcpt, b"DATA"):
    s.sendall(command + b"\\r\\n")
    while True:
        line = f.readline()
        if line[3:4] != b"-":
            break
def drain():
    while s.recv(1 << 20):
        pass
threading.Thread(target=drain, daemon=True).start()
block = b"\\n" * (1 << 20)
while True:
    s.sendall(block)
"""


def test_clients_streaming_message_content_do_not_starve_the_owner(mailerd_factory):
    """Four network clients stream the content of a message made of empty lines as fast as
    they can (a sender like any other until the end, which never comes); the owner's session
    on the same worker still gets its replies at once. A worker took a whole wakeup's reads of
    content (up to 32 of 256 KB) in one go, 260 ms of checking, and the owner's transaction
    took seconds (an attacker's pass, /tmp/atk8 F1)."""
    m: Mailerd = mailerd_factory(workers=1)
    user = m.new_user("streamed")
    port = str(m.port(trusted=False))
    script = [STREAMER, port, f"{user}@example.org"]
    _owner_served_under(m, script, 4, "streamers", settle=1.5, limit=1.5)


def test_overlong_local_part_gets_a_reply(mailerd: Mailerd):
    with mailerd.connect(trusted=False) as c:
        c.start()
        expect(c.cmd("MAIL FROM:<a@client.test>"), 250, conn=c)
        r = c.cmd("RCPT TO:<" + "a" * 300 + "@example.org>")
        assert r.code == 550, r
        expect(c.cmd("NOOP"), 250, conn=c)


def _queue_cli(m: Mailerd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailerd", "queue", "-q", str(m.queue), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _received_id(raw: bytes) -> bytes:
    return raw.split(b" id ", 1)[1].split(b";", 1)[0]


def test_a_local_copy_that_fails_is_queued_and_delivered_later(mailerd: Mailerd):
    """All recipients local, so the worker writes through its own channel to the mailbox
    writer. One mailbox fails (its .lock is a directory): the others keep their copy, the
    client still gets 250 (a 451 would duplicate them), and the failed copy waits in the queue
    until it can be written — here, after the fault is fixed and the queue flushed."""
    m = mailerd
    good, bad = m.new_user("good"), m.new_user("bad")
    (m.spool / bad / ".lock").mkdir()
    queued = m.queue_files()
    body = b"Subject: half\r\n\r\none copy now, one later\r\n"
    with m.smtp() as s:
        assert (
            s.sendmail("a@client.test", [f"{good}@example.org", f"{bad}@example.org"], body) == {}
        )
    assert m.messages(good) == [1] and m.messages(bad) == []
    assert wait_until(lambda: m.queue_files() - queued, timeout=5), "no local retry queued"
    with m.smtp() as s:  # the only recipient failing: still 250, still queued
        assert (
            s.sendmail("a@client.test", [f"{bad}@example.org"], b"Subject: two\r\n\r\n2\r\n") == {}
        )
    assert m.messages(bad) == []
    (m.spool / bad / ".lock").rmdir()
    flushed = _queue_cli(m, "flush")
    assert flushed.returncode == 0, flushed.stderr
    assert m.wait_messages(bad, 2, timeout=15) == [1, 2]
    copies = [m.read(bad, 1), m.read(bad, 2)]
    first = next(c for c in copies if b"Subject: half" in c)
    assert first.startswith(b"Return-Path: <a@client.test>\r\nReceived: ")
    assert _received_id(first) == _received_id(m.read(good, 1)), "the retry is the same message"
    assert m.messages(good) == [1], "the copy that succeeded was not written twice"


def test_mailbox_writer_restart(mailerd: Mailerd):
    """kill -9 of the root mailbox writer: the master starts another (the delivery process,
    unprivileged, could not), and the workers' own channels to the old writer are replaced:
    local mail flows again on every worker. (Under load: test_writer_death.)"""
    m = mailerd
    user = m.new_user("w")
    with m.smtp() as s:
        assert (
            s.sendmail("a@client.test", [f"{user}@example.org"], b"Subject: 0\r\n\r\n0\r\n") == {}
        )
    _kill_and_wait_for_a_new_one(m, "mailerd: mailbox writer")
    for i in range(1, 7):  # new sessions on both workers
        with m.smtp(host="127.0.0.1" if i % 2 else "::1") as s:
            body = f"Subject: {i}\r\n\r\n{i}\r\n".encode()
            assert s.sendmail("a@client.test", [f"{user}@example.org"], body) == {}
    assert m.wait_messages(user, 7, timeout=10) == list(range(1, 8))


def test_queue_lists_offline(mailerd: Mailerd):
    """`mailerd queue` with the daemon stopped reads the queue directory itself (it once died
    with "'Recipient' object is not subscriptable" on any non-empty queue)."""
    m = mailerd
    bad = m.new_user("offline")
    (m.spool / bad / ".lock").mkdir()  # the copy fails and waits in the queue
    queued = m.queue_files()
    with m.smtp() as s:
        assert s.sendmail("a@client.test", [f"{bad}@example.org"], b"Subject: q\r\n\r\nq\r\n") == {}
    assert wait_until(lambda: m.queue_files() - queued, timeout=5), "no local retry queued"
    assert m.stop() == 0
    listed = _queue_cli(m)
    assert listed.returncode == 0, listed.stderr
    assert f"<{bad}@example.org>" in listed.stdout and "<a@client.test>" in listed.stdout
    assert "1 message(s)" in listed.stdout


def test_a_relayhost_that_takes_no_connection_is_suspended_until_a_flush(mailerd_factory):
    """Its first message's attempt is refused; the rest are deferred without a connection
    ("delivery temporarily suspended") until `mailerd queue flush`, which ends the suspension:
    the relayhost, listening by then, gets them all."""
    from aiosmtpd.controller import Controller

    from .conftest import free_port

    port = free_port()  # (nothing listens there yet: connections are refused)
    extra = ["--relayhost", f"127.0.0.1:{port}", "--max-per-domain", "1", "--retry-after", "1h"]
    m: Mailerd = mailerd_factory(workers=1, extra=extra)
    rcpts = [f"r{n}@remote.test" for n in range(5)]
    with m.connect() as c:
        c.start()
        for rcpt in rcpts:
            mail_rcpt(c, rcpt, sender="a@example.org")
            send_data(c, b"Subject: " + rcpt.encode() + b"\r\n\r\nhello\r\n")
    deferred = lambda: m.stderr_text().count("status=deferred")  # noqa: E731
    assert wait_until(lambda: deferred() >= len(rcpts), timeout=15), m.stderr_text()
    lines = [line for line in m.stderr_text().splitlines() if "status=deferred" in line]
    suspended = [line for line in lines if "delivery temporarily suspended: connect to" in line]
    assert len(lines) == 5 and len(suspended) == 4, lines
    assert all("relay=none," in line for line in suspended), suspended
    assert "Connection refused" in suspended[0], suspended

    recorder = _Recorder()
    relayhost = Controller(recorder, hostname="127.0.0.1", port=port)
    relayhost.start()
    try:
        flushed = subprocess.run(
            [sys.executable, "-m", "mailerd", "queue", "-q", str(m.queue), "flush"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert flushed.returncode == 0, flushed
        assert wait_until(lambda: len(recorder.rcpts) == len(rcpts), timeout=15), (
            recorder.rcpts,
            m.stderr_text()[-3000:],
        )
        assert sorted(recorder.rcpts) == rcpts
    finally:
        relayhost.stop()

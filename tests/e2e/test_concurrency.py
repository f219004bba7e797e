"""Concurrency: many clients into one mailbox, two servers on one spool, worker crashes, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
import time
import uuid
from collections import Counter

import pytest

from .conftest import (
    IO_TIMEOUT,
    Mailerd,
    SMTPConn,
    has_recent,
    parse_stored,
    pid_alive,
    proc_cmdline,
    wait_until,
)

TOKEN_RE = re.compile(rb"TOKEN-[0-9a-f]{32}-[a-z]*\d+-\d+")


def message_for(token: str) -> bytes:
    return (
        b"From: load@client.test\r\nSubject: " + token.encode() + b"\r\n\r\n"
        b"body of " + token.encode() + b"\r\n" + b"filler line to make it less tiny\r\n" * 20
    )


def send_batch(
    m: Mailerd,
    user: str,
    prefix: str,
    count: int,
    host: str,
    trusted: bool,
    start: threading.Barrier | None,
    errors: list,
) -> list[str]:
    """One connection, ``count`` messages; returns the tokens that got 250."""
    sent = []
    try:
        if start is not None:
            start.wait(timeout=30)
        with smtplib.SMTP(
            host, m.port(trusted), local_hostname="load.client.test", timeout=IO_TIMEOUT
        ) as s:
            for i in range(count):
                token = f"{prefix}-{i}"
                refused = s.sendmail(
                    "load@client.test", [f"{user}@example.org"], message_for(token)
                )
                assert refused == {}, refused
                sent.append(token)
            s.quit()
    except Exception as e:  # reported by the test
        errors.append(f"{prefix}: {type(e).__name__}: {e}")
    return sent


def run_clients(
    m: Mailerd, user: str, clients: int, per_client: int, tag: str
) -> tuple[list[str], list[str]]:
    """``clients`` threads, each one connection sending ``per_client`` messages, all started
    together; mixes IPv4/IPv6 and trusted/untrusted. Returns (errors, tokens that got 250)."""
    run = uuid.uuid4().hex
    barrier = threading.Barrier(clients)
    errors: list[str] = []
    results: dict[int, list[str]] = {}
    threads = []
    for t in range(clients):
        host = "127.0.0.1" if t % 2 == 0 else "::1"
        trusted = t % 4 < 2

        def work(t=t, host=host, trusted=trusted):
            results[t] = send_batch(
                m, user, f"TOKEN-{run}-{tag}{t}", per_client, host, trusted, barrier, errors
            )

        th = threading.Thread(target=work, daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "client threads hung"
    return errors, [tok for t in sorted(results) for tok in results[t]]


def scan_mailbox(m: Mailerd, user: str) -> tuple[list[int], Counter, list[str]]:
    """(message numbers, token counts, problems) for a mailbox."""
    nums = m.messages(user)
    tokens: Counter = Counter()
    problems = []
    for n in nums:
        raw = m.read(user, n)
        try:
            st = parse_stored(raw)
        except AssertionError as e:
            problems.append(f"{n}: unparseable: {e}")
            continue
        found = TOKEN_RE.findall(st.rest)
        if len(set(found)) != 1:
            problems.append(f"{n}: tokens {set(found)}")
            continue
        token = found[0].decode()
        if st.rest != message_for(token):
            problems.append(f"{n}: body of {token} damaged")
        tokens[token] += 1
        status = m.spool / user / f"{n}.status"
        if not status.exists():
            problems.append(f"{n}.status missing")
        elif not has_recent(status.read_bytes()):
            problems.append(f"{n}.status lacks \\Recent: {status.read_bytes()!r}")
    return nums, tokens, problems


def assert_complete_mailbox(m: Mailerd, user: str, sent: list[str], expected: int) -> None:
    assert len(sent) == expected
    wait_until(lambda: len(m.messages(user)) >= expected, timeout=30)
    nums, tokens, problems = scan_mailbox(m, user)
    assert len(nums) == expected, f"{len(nums)} message files, expected {expected}"
    missing = sorted(set(range(1, expected + 1)) - set(nums))
    extra = sorted(set(nums) - set(range(1, expected + 1)))
    assert nums == list(range(1, expected + 1)), f"numbering gaps {missing[:20]} extra {extra[:20]}"
    assert not problems, problems[:20]
    dup = [t for t, c in tokens.items() if c > 1]
    lost = sorted(set(sent) - set(tokens))
    assert not dup, f"messages stored twice: {dup[:10]}"
    assert not lost, f"messages lost: {lost[:10]}"
    assert set(tokens) == set(sent)


def test_many_clients_one_mailbox(mailerd: Mailerd):
    m = mailerd
    m.add_user("crowd")
    errors, sent = run_clients(m, "crowd", clients=20, per_client=20, tag="c")
    assert not errors, errors[:10]
    assert_complete_mailbox(m, "crowd", sent, 400)


def test_two_servers_one_spool(mailerd_factory, tmp_path):
    spool = tmp_path / "shared-spool"
    a = mailerd_factory(base=tmp_path / "a", spool=spool, queue=tmp_path / "a" / "queue")
    b = mailerd_factory(base=tmp_path / "b", spool=spool, queue=tmp_path / "b" / "queue")
    a.add_user("both")
    results: dict[str, list[str]] = {}
    errs: dict[str, list[str]] = {}

    def drive(name: str, m: Mailerd):
        errs[name], results[name] = run_clients(m, "both", clients=10, per_client=20, tag=name)

    threads = [
        threading.Thread(target=drive, args=(n, m), daemon=True) for n, m in (("a", a), ("b", b))
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=150)
    assert not any(th.is_alive() for th in threads)
    assert not errs["a"] and not errs["b"], (errs["a"][:5], errs["b"][:5])
    assert_complete_mailbox(a, "both", results["a"] + results["b"], 400)


def test_killed_worker_is_replaced(mailerd: Mailerd):
    m = mailerd
    m.add_user("survivor")
    workers = wait_until(lambda: len(m.worker_pids()) == m.workers and m.worker_pids(), timeout=10)
    assert workers and len(workers) == m.workers, f"expected {m.workers} workers: {m.titles()}"
    # sessions in progress, spread over the workers
    sessions = []
    for i in range(4):
        c = m.connect(host="127.0.0.1" if i % 2 else "::1")
        c.start()
        sessions.append(c)
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(
        lambda: (
            (w := m.worker_pids())
            and victim not in w
            and len(w) == m.workers
            and set(w) - set(workers)
        ),
        timeout=10,
    )
    for c in sessions:
        c.close()
    assert replaced, f"worker {victim} not replaced; now: {m.titles()}"
    assert m.proc.poll() is None, "master died"
    assert not pid_alive(victim)
    new = sorted(set(m.worker_pids()) - set(workers))
    assert all((proc_cmdline(p) or "").startswith("mailerd: worker") for p in new)
    # new sessions work (several, so that every worker gets some)
    for i in range(8):
        with m.smtp(host="127.0.0.1" if i % 2 else "::1", trusted=i % 4 < 2) as s:
            body = f"Subject: after kill {i}\r\n\r\nafter kill {i}\r\n".encode()
            assert s.sendmail("x@client.test", ["survivor@example.org"], body) == {}
            s.quit()
    assert m.wait_messages("survivor", 8, timeout=5) == list(range(1, 9))


def test_sigterm_with_sessions_in_flight(mailerd: Mailerd):
    m = mailerd
    m.add_user("inflight")
    run = uuid.uuid4().hex
    stop = threading.Event()
    accepted: list[str] = []
    lock = threading.Lock()
    early_errors: list[str] = []
    terminated = threading.Event()

    def client(t: int):
        host = "127.0.0.1" if t % 2 else "::1"
        try:
            with smtplib.SMTP(
                host, m.port(t % 4 < 2), local_hostname="load.client.test", timeout=IO_TIMEOUT
            ) as s:
                i = 0
                while not stop.is_set():
                    token = f"TOKEN-{run}-{t}-{i}"
                    s.sendmail("load@client.test", ["inflight@example.org"], message_for(token))
                    with lock:
                        accepted.append(token)
                    i += 1
        except Exception as e:  # expected once the server shuts down
            if not terminated.is_set():
                early_errors.append(f"{t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(8)]
    for th in threads:
        th.start()
    assert wait_until(lambda: len(accepted) >= 80, timeout=30), f"only {len(accepted)} sent"
    before = m.descendants()
    terminated.set()
    m.signal(signal.SIGTERM)
    try:
        rc = m.proc.wait(timeout=30)
    finally:
        stop.set()
    for th in threads:
        th.join(timeout=30)
    assert not early_errors, early_errors
    assert rc == 0, f"master exited with {rc}:\n{m.stderr_text()[-2000:]}"
    with lock:
        got_250 = list(accepted)
    nums, tokens, problems = scan_mailbox(m, "inflight")
    assert not problems, problems[:10]
    lost = [t for t in got_250 if tokens[t] == 0]
    assert not lost, f"{len(lost)} of {len(got_250)} acknowledged messages not on disk: {lost[:5]}"
    assert nums == list(range(1, len(nums) + 1)), "numbering gaps"
    assert wait_until(lambda: not any(pid_alive(p) for p in before), timeout=10), (
        f"children still running after the master exited: {[p for p in before if pid_alive(p)]}"
    )


def test_idle_shutdown_exits_zero(mailerd: Mailerd):
    m = mailerd
    kids = wait_until(lambda: len(m.descendants()) >= m.workers + 1 and m.descendants(), timeout=10)
    started = time.monotonic()
    m.signal(signal.SIGTERM)
    rc = m.proc.wait(timeout=20)
    assert rc == 0, f"exit status {rc} after SIGTERM:\n{m.stderr_text()[-2000:]}"
    assert time.monotonic() - started < 10, "an idle server should stop promptly"
    assert wait_until(lambda: not any(pid_alive(p) for p in kids), timeout=10)


def test_sigterm_during_data(mailerd: Mailerd):
    """A message half-way through DATA at SIGTERM must not be dropped silently: the transaction
    either completes (250, and then it is on disk) or the client is told 421 (RFC 5321 3.8)."""
    m = mailerd
    m.add_user("halfway")
    body = message_for(f"TOKEN-{uuid.uuid4().hex}-h0-0")
    half = len(body) // 2
    c = SMTPConn("127.0.0.1", m.trusted_port)
    try:
        c.start()
        codes = [
            c.cmd(cmd).code
            for cmd in ("MAIL FROM:<sender@client.test>", "RCPT TO:<halfway@example.org>", "DATA")
        ]
        assert codes == [250, 250, 354], c.dialogue()
        c.send(body[:half])
        time.sleep(0.2)
        m.signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            c.send(body[half:] + b".\r\n")
            replies, _eof = c.read_all_replies(timeout=15)
        except OSError as e:
            replies = []
            c.transcript.append(("!", repr(e).encode()))
        rc = m.proc.wait(timeout=30)
    finally:
        c.close()
    assert rc == 0, f"master exited with {rc}:\n{m.stderr_text()[-2000:]}"
    codes = [r.code for r in replies]
    assert codes, f"session dropped without any reply at SIGTERM:\n{c.dialogue()}"
    if codes[0] == 250:
        assert m.messages("halfway") == [1], f"acknowledged ({codes}) but not stored"
        assert parse_stored(m.read("halfway", 1)).rest == body
    else:
        assert codes[0] == 421, f"unexpected replies {codes}:\n{c.dialogue()}"
    assert not m.crashes(), m.crashes()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_sigterm_idle_sessions_get_421(mailerd: Mailerd, host: str):
    """RFC 5321 3.8: a server shutting down tells connected clients 421 before closing."""
    m = mailerd
    conns = []
    for trusted in (True, False):
        c = SMTPConn(host, m.port(trusted))
        c.start()
        conns.append(c)
    try:
        m.signal(signal.SIGTERM)
        for c in conns:
            replies, eof = c.read_all_replies(timeout=15)
            assert [r.code for r in replies] == [421], (
                f"idle session at shutdown: expected one 421, got:\n{c.dialogue()}"
            )
            assert eof, c.dialogue()
        rc = m.proc.wait(timeout=30)
    finally:
        for c in conns:
            c.close()
    assert rc == 0
    assert not m.crashes(), m.crashes()

"""The root mailbox writer dying (kill -9) under load costs seconds, not a minute: it is
replaced at once, and nothing else restarts; every copy answered 250 is in its mailbox soon
after, once, and nothing is left in the queue; local retries waiting in the queue go out as soon
as a writer is back. Also: a crashed write's temporary files do not stay in a mailbox."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import threading
import time
import uuid
from collections import Counter

from .conftest import IO_TIMEOUT, Mailerd, wait_until

TOKEN_RE = re.compile(rb"WD-[0-9a-f]{32}-\d+-\d+")
WRITER = "mailerd: mailbox writer"
DELIVERY = "mailerd: delivery"
FINISHED_WITHIN = 10.0  # s after the kill: every copy answered 250 is in its mailbox


def _pids(m: Mailerd, title: str) -> list[int]:
    return sorted(pid for pid, t in m.titles().items() if t.startswith(title))


class Load:
    """Client threads, each one session sending message after message (to one mailbox, or to
    two) until told to stop; what each message got is kept (its token, the recipients, the
    reply code)."""

    def __init__(self, m: Mailerd, users: list[str], clients: int) -> None:
        self.m = m
        self.users = users
        self.run = uuid.uuid4().hex
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.accepted: list[tuple[str, tuple[str, ...]]] = []  # (token, mailboxes)
        self.refused: list[str] = []
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=3 * IO_TIMEOUT)
        assert not any(t.is_alive() for t in self.threads), "client threads hung"

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def _client(self, n: int) -> None:
        host = "127.0.0.1" if n % 2 else "::1"
        i = 0
        while not self.stopping.is_set():
            try:
                with smtplib.SMTP(
                    host, self.m.port(n % 4 < 2), local_hostname="load.test", timeout=IO_TIMEOUT
                ) as s:
                    while not self.stopping.is_set():
                        i += 1
                        self._send(s, n, i)
            except (smtplib.SMTPException, OSError) as exc:
                with self.lock:
                    self.refused.append(f"client {n}, message {i}: {exc!r}")
                time.sleep(0.05)

    def _send(self, s: smtplib.SMTP, n: int, i: int) -> None:
        token = f"WD-{self.run}-{n}-{i}"
        # One message in three goes to two mailboxes: a copy may be written and its twin not.
        first = self.users[(n + i) % len(self.users)]
        boxes = (first,) if i % 3 else (first, self.users[(n + i + 1) % len(self.users)])
        body = f"Subject: {token}\r\n\r\n{token}\r\n".encode() + b"filler line\r\n" * 20
        refused = s.sendmail("load@client.test", [f"{b}@example.org" for b in boxes], body)
        assert refused == {}, refused
        with self.lock:
            self.accepted.append((token, boxes))


def _stored(m: Mailerd, users: list[str]) -> Counter[tuple[str, str]]:
    """How often each (token, mailbox) is stored."""
    found: Counter[tuple[str, str]] = Counter()
    for user in users:
        for number in m.messages(user):
            for token in set(TOKEN_RE.findall(m.read(user, number))):
                found[token.decode(), user] += 1
    return found


def _queued(m: Mailerd) -> list[str]:
    return sorted(os.listdir(m.queue / "env")) + sorted(os.listdir(m.queue / "msg"))


def test_a_killed_writer_is_replaced_at_once_and_every_copy_lands_once(mailerd_factory):
    """kill -9 of the mailbox writer while eight clients send: a new writer runs within a
    second, the delivery process and the workers are the same processes, no client hears
    anything but 250, and every copy answered 250 is in its mailbox exactly once, with the
    queue empty, within FINISHED_WITHIN seconds of the kill."""
    m: Mailerd = mailerd_factory(workers=2)
    users = [m.new_user("wd") for _ in range(3)]
    [delivery], workers, [writer] = _pids(m, DELIVERY), m.worker_pids(), _pids(m, WRITER)
    load = Load(m, users, clients=8)
    load.start()
    try:
        assert wait_until(lambda: load.count() >= 150, timeout=30), "the load did not start"
        os.kill(writer, signal.SIGKILL)
        killed = time.monotonic()
        replaced = wait_until(lambda: [p for p in _pids(m, WRITER) if p != writer], timeout=5)
        before = load.count()
        assert wait_until(lambda: load.count() >= before + 100, timeout=5), "mail stopped"
    finally:
        load.stop()
    assert replaced, f"the writer was not replaced: {m.titles()}"
    assert _pids(m, DELIVERY) == [delivery], "the delivery process was restarted"
    assert m.worker_pids() == workers, "a worker was restarted"
    assert not load.refused, load.refused[:10]

    wanted = Counter((token, box) for token, boxes in load.accepted for box in boxes)
    done = wait_until(
        lambda: set(_stored(m, users)) >= set(wanted) and not _queued(m),
        timeout=max(0.0, killed + FINISHED_WITHIN - time.monotonic()),
    )
    took = time.monotonic() - killed
    stored = _stored(m, users)
    missing = sorted(set(wanted) - set(stored))
    assert done, f"{took:.1f} s after the kill: missing {missing[:10]}, queued {_queued(m)[:10]}"
    twice = sorted(k for k, n in stored.items() if n > 1)
    assert not twice, f"copies stored twice: {twice[:10]}"


def test_local_retries_waiting_in_the_queue_go_when_a_writer_takes_over(mailerd: Mailerd):
    """A copy waiting in the queue for a local retry (its mailbox failed: the .lock was a
    directory) goes out as soon as a new writer takes over, without `mailerd queue flush`
    and long before its retry was due (a minute after it was queued)."""
    m = mailerd
    user = m.new_user("wq")
    (m.spool / user / ".lock").mkdir()
    with m.smtp() as s:
        assert (
            s.sendmail("a@client.test", [f"{user}@example.org"], b"Subject: q\r\n\r\nq\r\n") == {}
        )
    assert wait_until(lambda: _queued(m), timeout=5), "no local retry queued"
    assert m.messages(user) == []
    (m.spool / user / ".lock").rmdir()
    [writer] = _pids(m, WRITER)
    os.kill(writer, signal.SIGKILL)
    killed = time.monotonic()
    assert m.wait_messages(user, 1, timeout=FINISHED_WITHIN) == [1]
    assert wait_until(lambda: not _queued(m), timeout=max(0, killed + 10 - time.monotonic()))
    assert b"Subject: q" in m.read(user, 1)


def _a_dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temporary_files_of_a_crashed_write_are_removed(mailerd: Mailerd):
    """What a writer killed in the middle of a batch leaves (its staged message and status,
    a counter being replaced) is removed when a writer first opens that mailbox; a temporary
    file whose pid is alive (here this test's) may be a live writer's, and stays."""
    m = mailerd
    user = m.new_user("tmp")
    box = m.spool / user
    dead = _a_dead_pid()
    stale = [f".tmp.{dead}.3", f".tmp.{dead}.3.status", f".counter.tmp{dead}"]
    live = [f".tmp.{os.getpid()}.9", f".tmp.{os.getpid()}.9.status"]
    for name in stale + live:
        (box / name).write_bytes(b"Return-Path: <x@y>\r\n\r\nhalf a mess")
    with m.smtp() as s:
        assert (
            s.sendmail("a@client.test", [f"{user}@example.org"], b"Subject: t\r\n\r\nt\r\n") == {}
        )
    assert m.messages(user) == [1]
    left = sorted(n for n in os.listdir(box) if ".tmp" in n)
    assert left == sorted(live), left

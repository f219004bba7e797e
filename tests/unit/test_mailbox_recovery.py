"""What a mailbox writer does after another died (issue #16): the copies the dead one left
unanswered come back as one batch of redeliveries, looked for in one pass over the mailbox."""

from __future__ import annotations

import os
import time

from mailerd.writer import mailbox
from mailerd.writer.mailbox import Copy, MailboxStore

HEAD = b"Return-Path: <a@b.example>\r\n"


def _body(n: int) -> bytes:
    return b"Received: by mx; id Q%d\r\n\r\nmessage %d\r\n" % (n, n)


def test_a_batch_of_redeliveries_reads_each_recent_message_once(tmp_path, monkeypatch):
    """Ten copies a dead writer may have written, in a mailbox of 50 recent messages: the
    batch finds the two that are there (and writes the eight that are not) reading each
    message's first bytes once, not once per copy (ten times as many reads)."""
    spool = MailboxStore(tmp_path)
    since = time.time()
    assert spool.deliver("bob", [Copy(HEAD, _body(n)) for n in range(50)]) == list(range(1, 51))
    reads = []

    def pread(fd: int, size: int, offset: int) -> bytes:
        reads.append(fd)
        return real_pread(fd, size, offset)

    real_pread = os.pread
    monkeypatch.setattr(mailbox.os, "pread", pread)
    batch = [Copy(HEAD, _body(n), since) for n in (7, 100, 101, 102, 103, 42, 104, 105, 106, 107)]
    numbers = spool.deliver("bob", batch)
    assert numbers[0] == 8 and numbers[5] == 43, "copies already there are found"
    assert sorted(numbers[1:5] + numbers[6:]) == list(range(51, 59)), "the others are written"
    assert len(reads) <= 50 + len(batch), f"{len(reads)} reads for 50 messages"


def test_only_temporary_files_of_dead_processes_are_swept_once(tmp_path):
    """The first write into a mailbox removes what dead writers left; names that are not a
    dead process's temporary files stay (pid 0, a number no pid can be, our own pid, other
    names), and a leftover that appears later waits for the next writer process."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)  # a pid that is gone
    box = tmp_path / "bob"
    box.mkdir()
    stale = [f".tmp.{child}.1", f".tmp.{child}.1.status", f".counter.tmp{child}"]
    kept = [
        ".tmp.0.1",
        f".tmp.{1 << 40}.1",
        f".tmp.{os.getpid()}.1",
        f".tmp.{child}",
        f".tmp.{child}.1.old",
        f"x.tmp.{child}.1",
        ".counter",
    ]
    for name in stale + kept:
        (box / name).write_bytes(b"x")
    spool = MailboxStore(tmp_path)
    assert spool.deliver("bob", [Copy(HEAD, _body(1))]) == [1]
    assert sorted(n for n in os.listdir(box) if not n[0].isdigit()) == sorted([*kept, ".lock"])
    (box / stale[0]).write_bytes(b"x")
    spool.deliver("bob", [Copy(HEAD, _body(2))])
    assert (box / stale[0]).exists(), "swept once per mailbox in a writer's life"
    MailboxStore(tmp_path).deliver("bob", [Copy(HEAD, _body(3))])
    assert not (box / stale[0]).exists()

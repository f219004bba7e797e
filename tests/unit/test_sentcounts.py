"""The table of an authenticated account's recipients at other domains that the workers
share for --max-recipients-per-day (ipc.sentcounts): the window sliding by the hour, per
account, across processes, and the report once a window."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from mailerd.ipc.sentcounts import SLOTS, SentCounts

HOUR = 3600.0
T0 = 1000 * HOUR  # (monotonic time: any start)


def test_the_window_slides_by_the_hour_and_lasts_24_to_25_hours():
    table = SentCounts(64)
    assert table.add("alice", 3, T0 + 0.5 * HOUR) == 3
    assert table.add("alice", 2, T0 + 5.25 * HOUR) == 5
    assert table.count("alice", T0 + 24.9 * HOUR) == 5  # the first hour's still count
    assert table.count("alice", T0 + 25 * HOUR) == 2  # 24.5 hours after: gone
    assert table.count("alice", T0 + 29.9 * HOUR) == 2
    assert table.count("alice", T0 + 30 * HOUR) == 0
    # No calendar day to straddle: any 24 hours hold what was sent in them.
    for hour in range(60):
        table.add("bob", 1, T0 + hour * HOUR + 0.99 * HOUR)
        assert table.count("bob", T0 + hour * HOUR + 0.99 * HOUR) == min(hour + 1, SLOTS)


def test_a_slot_is_reused_for_a_new_hour_without_its_old_count():
    table = SentCounts(64)
    table.add("alice", 7, T0)
    assert table.add("alice", 1, T0 + SLOTS * HOUR) == 1  # the same slot, 25 hours on


def test_accounts_count_apart_and_an_idle_cell_is_taken_over():
    table = SentCounts(4)  # (fewer buckets than the probes: every account sees every cell)
    for n, name in enumerate(("alice", "bob", "carol", "dave")):
        table.add(name, n + 1, T0)
    assert [table.count(n, T0) for n in ("alice", "bob", "carol", "dave")] == [1, 2, 3, 4]
    # Every cell busy: eve shares her home cell's count (deferred early, never more let in).
    shared = table.count("eve", T0)
    assert shared in (1, 2, 3, 4)
    assert table.add("eve", 1, T0) == shared + 1
    # A day later the cells are idle: each account starts over in one of its own.
    later = T0 + 30 * HOUR
    assert table.add("eve", 1, later) == 1 and table.count("alice", later) == 0
    assert table.count("eve", later) == 1


def at_once(processes: int, work: Callable[[], None]) -> None:
    """Fork `processes` "workers" that run `work` from the same instant; wait for them all."""
    go_r, go_w = os.pipe()
    pids = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)  # (all start together: at the end of file)
            work()
            os._exit(0)
        pids.append(pid)
    os.close(go_r)
    os.close(go_w)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0


def test_counts_are_shared_by_forked_workers():
    table = SentCounts(64)
    at_once(3, functools.partial(table.add, "alice", 2, T0))
    assert table.count("alice", T0) == 6


def add_one_by_one(table: SentCounts, times: int) -> None:
    for _ in range(times):
        table.add("alice", 1, T0)


def test_workers_adding_at_the_same_instant_lose_nothing():
    """The limit is exact between workers: a thief's sessions on several workers, their
    messages committed at once, each count (the table's first claim of a cell among them).
    Without the lock, two processes' read-add-write lost counts here, and the first claims
    of a cell wiped each other's (in most rounds: three are run)."""
    for _ in range(3):
        table = SentCounts(64)
        at_once(4, functools.partial(add_one_by_one, table, 5000))
        assert table.count("alice", T0) == 4 * 5000


def test_an_add_past_the_limit_adds_nothing():
    table = SentCounts(64)
    assert table.add("alice", 8, T0, limit=10) == 8
    assert table.add("alice", 3, T0, limit=10) == 11  # (what it would make: refused)
    assert table.count("alice", T0) == 8
    assert table.add("alice", 2, T0, limit=10) == 10
    assert table.add("alice", 1, T0) == 11  # (no limit given: added)


def test_the_limit_holds_exactly_between_workers_at_once():
    """Four workers' messages of one recipient each, at the same instant, against a limit of
    150: exactly 150 pass, none more (a check and an add apart let two through) and none
    fewer (an add undone after the check let a third see it and defer early)."""
    table = SentCounts(64)
    done_r, done_w = os.pipe()

    def send() -> None:
        passed = sum(table.add("alice", 1, T0, limit=150) <= 150 for _ in range(100))
        os.write(done_w, bytes([passed]))

    at_once(4, send)
    os.close(done_w)
    with os.fdopen(done_r, "rb") as results:
        assert sum(results.read()) == 150
    assert table.count("alice", T0) == 150


def test_reaching_the_limit_is_news_once_a_window():
    table = SentCounts(64)
    assert table.first_report("alice", T0)
    assert not table.first_report("alice", T0 + 10 * HOUR)
    assert table.first_report("bob", T0 + 10 * HOUR)  # another account's own
    assert not table.first_report("alice", T0 + 24.9 * HOUR)
    assert table.first_report("alice", T0 + 25 * HOUR)

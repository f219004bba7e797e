"""The session table shared by the workers: counts per pool and per client across processes,
rows freed with them."""

import os

from mailerd.ipc.sessiontable import POOLS, SHARED_POOL, SessionTable, counter


def test_counts_are_seen_by_every_process_and_a_row_is_forgotten_when_released():
    table = SessionTable(4)
    rows = [table.claim(), table.claim()]
    assert rows == [0, 1]
    # Two "workers" (forked, like the master's) each open sessions in their own row.
    pids = []
    for row, count in zip(rows, (3, 2), strict=True):
        pid = os.fork()
        if pid == 0:
            own = counter(table, row)
            for _ in range(count):
                own.opened(2, "192.0.2.1")
            own.opened(0, None)  # a local session: in its pool only
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    view = counter(table, table.claim())
    assert view.total() == 7
    assert [view.in_pool(pool) for pool in range(POOLS)] == [2, 0, 5, 0]
    assert view.for_address("192.0.2.1") == 5
    assert view.for_address("192.0.2.2") in (0, 5)  # 0 unless it shares the bucket
    table.release(rows[0])  # that worker is gone, with its sessions
    assert view.total() == 3 and view.for_address("192.0.2.1") == 2
    assert view.in_pool(0) == 1 and view.in_pool(2) == 2
    assert table.claim() == rows[0]  # reused, and zeroed


def test_closing_never_goes_below_zero_and_a_full_table_counts_alone():
    table = SessionTable(1)
    own = counter(table, table.claim())
    own.opened(1, "2001:db8::/64")
    own.closed(1, "2001:db8::/64")
    own.closed(1, "2001:db8::/64")
    assert own.total() == 0 and own.for_address("2001:db8::/64") == 0 and own.in_pool(1) == 0
    assert table.claim() is None
    alone = counter(table, None)
    alone.opened(1, "2001:db8::/64")
    assert alone.total() == 1 and own.total() == 0


def test_the_shared_pools_sessions_are_counted_per_client_too():
    table = SessionTable(2)
    rows = [table.claim(), table.claim()]
    first, second = (counter(table, row) for row in rows)
    first.opened(SHARED_POOL, "192.0.2.1")
    second.opened(SHARED_POOL, "192.0.2.1")
    second.opened(1, "192.0.2.1")  # (another pool: per client in all only)
    first.opened(SHARED_POOL, None)
    assert first.in_shared_pool("192.0.2.1") == 2 and first.for_address("192.0.2.1") == 3
    first.closed(1, "192.0.2.1")  # (not its pool: nothing of the shared count)
    assert first.in_shared_pool("192.0.2.1") == 2
    first.closed(SHARED_POOL, "192.0.2.1")
    assert first.in_shared_pool("192.0.2.1") == 1 and first.in_pool(SHARED_POOL) == 2
    table.release(rows[1])
    assert first.in_shared_pool("192.0.2.1") == 0 and first.for_address("192.0.2.1") == 0

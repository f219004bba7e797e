"""The session caps at connect (worker.admission) over a real shared session table: the
owner's reserves (the known clients' part of the submission listeners'), the per-client cap
with IPv6 clients counted by prefix, and the options."""

from dataclasses import replace

import pytest

from mailerd import config
from mailerd.config import ConfigError
from mailerd.ipc.sessiontable import SessionTable, counter
from mailerd.worker import admission
from mailerd.worker.admission import (
    CLIENT_FULL,
    KNOWN_POOL,
    LOCAL_POOL,
    NETWORK_POOL,
    SERVER_FULL,
    SUBMISSION_POOL,
    Caps,
    client_key,
)


def load(*argv: str) -> config.Config:
    return config.load(["-l", "127.0.0.1:2525", "-n", "127.0.0.1:2526", *argv])


def fill(caps: Caps, counts, pool: int, key=None, limit: int = 10_000) -> int:
    """Open sessions of `pool`'s clients until refused (each counted where `Caps.admit` puts
    it, as the worker does); how many were let in."""
    n = 0
    while n < limit:
        counted, refusal = caps.admit(counts, pool, key)
        if refusal is not None:
            break
        counts.opened(counted, key)
        n += 1
    return n


def with_submission(cfg: config.Config, role: str = config.SUBMISSION) -> config.Config:
    submission = config.ListenAddress("127.0.0.1", 2587, role)
    return replace(cfg, listeners=(*cfg.listeners, submission))


def test_a_full_network_pool_leaves_the_owner_its_reserves():
    cfg = load("--max-sessions", "100", "--reserved-sessions", "10")
    submission = config.ListenAddress("127.0.0.1", 2587, config.SUBMISSION)
    cfg = replace(cfg, listeners=(*cfg.listeners, submission))
    caps = Caps.of(cfg)
    assert caps.reserves == (10, 5, 10, 5)  # (the submission listeners': 5 for known clients)
    counts = counter(SessionTable(2), 0)
    # The Internet takes all it can: the owner's twenty places stay free.
    assert fill(caps, counts, NETWORK_POOL) == 80
    assert caps.refusal(counts, NETWORK_POOL, None) == SERVER_FULL
    assert fill(caps, counts, LOCAL_POOL) == 10
    # A known client has the submission listeners' whole reserve when nobody else wants it:
    # its own part, then the part of any client.
    assert fill(caps, counts, KNOWN_POOL) == 10
    assert (counts.in_pool(KNOWN_POOL), counts.in_pool(SUBMISSION_POOL)) == (5, 5)
    assert caps.refusal(counts, LOCAL_POOL, None) == SERVER_FULL
    assert caps.admit(counts, SUBMISSION_POOL, None) == (SUBMISSION_POOL, SERVER_FULL)


def test_a_pool_grows_past_its_reserve_into_free_places_only():
    cfg = replace(load(), max_sessions=20, reserved_sessions=5)
    caps = Caps.of(cfg)
    assert caps.reserves == (5, 0, 5, 0)  # no submission listener: nothing kept for it
    counts = counter(SessionTable(1), 0)
    assert fill(caps, counts, LOCAL_POOL) == 15  # the network's reserve stays free
    assert fill(caps, counts, NETWORK_POOL) == 5
    counts.closed(LOCAL_POOL, None)
    assert fill(caps, counts, NETWORK_POOL) == 1
    for _ in range(10):
        counts.closed(LOCAL_POOL, None)
    assert fill(caps, counts, NETWORK_POOL) == 9  # ... 4 local in use: 1 of its reserve kept


def test_a_full_submission_pool_leaves_the_network_its_reserve():
    """A reviewer's finding: anyone may open the submission ports (a login comes later), and
    1,000 silent connections to port 465 had every place: port 25 answered 421 to the
    Internet's servers. The network pool keeps its reserve as the owner's pools keep theirs."""
    cfg = load("--max-sessions", "100", "--reserved-sessions", "10")
    submission = config.ListenAddress("127.0.0.1", 2465, config.SUBMISSIONS)
    caps = Caps.of(replace(cfg, listeners=(*cfg.listeners, submission)))
    counts = counter(SessionTable(2), 0)
    assert fill(caps, counts, SUBMISSION_POOL) == 75  # (5 kept for known clients)
    assert fill(caps, counts, NETWORK_POOL) == 10
    assert fill(caps, counts, LOCAL_POOL) == 10
    assert fill(caps, counts, KNOWN_POOL) == 5


def test_a_crowd_on_the_submission_listeners_leaves_known_clients_their_part():
    """Anyone may open a submission port (the login comes after): a crowd of silent
    connections from a few dozen addresses took the submission listeners' reserve and every
    free place, and the owner's mail program got 421 there. Half of that reserve (rounded down)
    is now kept for clients that logged in lately, a share for each; the other pools' reserves
    are unchanged."""
    cfg = with_submission(load("--max-sessions", "100", "--reserved-sessions", "10"))
    caps = Caps.of(cfg)
    counts = counter(SessionTable(2), 0)
    listen = cfg.listeners[-1]
    crowd = [caps.counted_key(listen, f"198.51.100.{n}") for n in range(30)]
    admitted = sum(fill(caps, counts, SUBMISSION_POOL, key, limit=50) for key in crowd)
    assert admitted == 75  # the free places, and the part of the reserve for any client
    stranger = caps.counted_key(listen, "203.0.113.9")
    assert caps.admit(counts, SUBMISSION_POOL, stranger) == (SUBMISSION_POOL, SERVER_FULL)
    owner = caps.counted_key(listen, "192.0.2.50")
    assert caps.admit(counts, KNOWN_POOL, owner) == (KNOWN_POOL, None)
    assert caps.known_share == 2  # (half the 5)
    assert fill(caps, counts, KNOWN_POOL, owner) == 2
    assert caps.admit(counts, KNOWN_POOL, owner) == (SUBMISSION_POOL, SERVER_FULL)
    phone, tablet = (caps.counted_key(listen, f"192.0.2.{n}") for n in (51, 52))
    assert fill(caps, counts, KNOWN_POOL, phone) == 2
    assert fill(caps, counts, KNOWN_POOL, tablet) == 1
    assert counts.in_pool(KNOWN_POOL) == 5
    # The network's and the local listeners' reserves are theirs as before.
    assert fill(caps, counts, NETWORK_POOL) == 10 and fill(caps, counts, LOCAL_POOL) == 10
    assert counts.total() == 100


def test_one_known_client_has_a_share_of_the_known_clients_part_not_all_of_it():
    """An attacker's pass: one known address (one stolen password, or any user of a shared
    server) opened 50 sessions, all in the known clients' 50 places (the defaults; the
    per-client cap is as many), a crowd took the rest, and the owner's laptop, known too, got
    421. Now a known client has KNOWN_SHARE places there; its others compete as anyone's."""
    cfg = with_submission(load())
    caps = Caps.of(cfg)
    assert caps.reserves == (100, 50, 100, 50) and caps.per_client == 50
    counts = counter(SessionTable(2), 0)
    listen = cfg.listeners[-1]
    attacker = caps.counted_key(listen, "198.51.100.7")
    assert fill(caps, counts, KNOWN_POOL, attacker) == 50
    assert counts.in_pool(KNOWN_POOL) == 4 and counts.in_pool(SUBMISSION_POOL) == 46
    crowd = [caps.counted_key(listen, f"203.0.113.{n}") for n in range(30)]
    assert sum(fill(caps, counts, SUBMISSION_POOL, key) for key in crowd) == 704
    assert caps.admit(counts, KNOWN_POOL, attacker) == (SUBMISSION_POOL, SERVER_FULL)
    owner = caps.counted_key(listen, "2001:db8:1:2::50")
    assert caps.admit(counts, KNOWN_POOL, owner) == (KNOWN_POOL, None)
    assert fill(caps, counts, KNOWN_POOL, owner) == 4
    assert caps.admit(counts, KNOWN_POOL, owner) == (SUBMISSION_POOL, SERVER_FULL)
    # A session of the known part ended gives the client its place there again; one counted
    # as any client's gives a place as any client's.
    counts.closed(SUBMISSION_POOL, attacker)
    assert caps.admit(counts, KNOWN_POOL, attacker) == (SUBMISSION_POOL, None)
    counts.closed(KNOWN_POOL, attacker)
    assert caps.admit(counts, KNOWN_POOL, attacker) == (KNOWN_POOL, None)


@pytest.mark.parametrize(
    "reserved, share", [(2, 1), (3, 1), (4, 1), (8, 2), (12, 3), (16, 4), (100, 4), (400, 4)]
)
def test_a_known_clients_share_is_at_most_half_the_known_part(reserved, share):
    cfg = with_submission(load("--max-sessions", "1000", "--reserved-sessions", str(reserved)))
    assert Caps.of(cfg).known_share == share  # (the known part is half the reserve)


def test_a_known_client_is_held_to_its_cap_per_client():
    cfg = replace(with_submission(load()), max_sessions_per_ip=2)
    caps = Caps.of(cfg)
    counts = counter(SessionTable(1), 0)
    assert fill(caps, counts, KNOWN_POOL, "192.0.2.50") == 2
    assert caps.admit(counts, KNOWN_POOL, "192.0.2.50") == (KNOWN_POOL, CLIENT_FULL)


@pytest.mark.parametrize(
    "reserved, reserves",
    [(0, (0, 0, 0, 0)), (1, (1, 1, 1, 0)), (2, (2, 1, 2, 1)), (3, (3, 2, 3, 1))],
)
def test_the_known_clients_part_is_half_the_reserve_rounded_down(reserved, reserves):
    for role in (config.SUBMISSION, config.SUBMISSIONS):  # (587 and 465 share the pool)
        cfg = with_submission(
            load("--max-sessions", "12", "--reserved-sessions", str(reserved)), role
        )
        assert Caps.of(cfg).reserves == reserves


def test_reserves_hold_across_workers():
    cfg = replace(load(), max_sessions=10, reserved_sessions=3)
    caps = Caps.of(cfg)
    table = SessionTable(3)
    workers = [counter(table, table.claim()) for _ in range(2)]
    assert fill(caps, workers[0], NETWORK_POOL, limit=4) == 4
    assert fill(caps, workers[1], NETWORK_POOL) == 3
    assert caps.refusal(workers[0], LOCAL_POOL, None) is None


@pytest.mark.parametrize(
    "address, length, key",
    [
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8::1", 128, "2001:db8::1/128"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),  # an IPv4 client over an IPv6 socket
        ("192.0.2.7", 64, "192.0.2.7"),
        ("?", 64, "?"),
    ],
)
def test_a_client_is_an_ipv4_address_or_an_ipv6_prefix(address, length, key):
    assert client_key(address, length) == key


def test_one_ipv6_64_is_one_client_however_many_addresses_it_uses():
    cfg = replace(load(), max_sessions_per_ip=3)
    caps = Caps.of(cfg)
    network = config.ListenAddress("::", 25, config.NETWORK)
    counts = counter(SessionTable(1), 0)
    for host in range(1, 4):
        key = caps.counted_key(network, f"2001:db8:0:1::{host:x}")
        assert caps.refusal(counts, NETWORK_POOL, key) is None
        counts.opened(NETWORK_POOL, key)
    fresh = caps.counted_key(network, "2001:db8:0:1:dead:beef:0:1")
    assert caps.refusal(counts, NETWORK_POOL, fresh) == CLIENT_FULL
    neighbour = caps.counted_key(network, "2001:db8:0:2::1")  # the next /64: another client
    assert caps.refusal(counts, NETWORK_POOL, neighbour) is None
    local = config.ListenAddress("::1", 25, config.LOCAL)
    assert caps.counted_key(local, "::1") is None  # the machine's own: no per-client cap


def test_the_options():
    cfg = load()
    assert cfg.reserved_sessions == 100 and cfg.ipv6_prefix_length == 64
    assert cfg.min_data_rate == 500 and cfg.max_session_time == 3600
    cfg = load(
        "--max-sessions",
        "50",
        "--reserved-sessions",
        "7",
        "--ipv6-prefix-length",
        "56",
        "--min-data-rate",
        "100",
        "--max-session-time",
        "10m",
    )
    assert (cfg.reserved_sessions, cfg.ipv6_prefix_length) == (7, 56)
    assert (cfg.min_data_rate, cfg.max_session_time) == (100, 600)
    assert load("--max-sessions", "50").reserved_sessions == 5
    with pytest.raises(ConfigError, match="reserved-sessions"):
        load("--max-sessions", "10", "--reserved-sessions", "10")  # the network: no place
    # The network's reserve is what the owners' leave, when less: a configuration valid before
    # it had one stays valid (an attacker's pass: 20 sessions, 8 reserved, three pools).
    caps = Caps.of(load("--max-sessions", "10", "--reserved-sessions", "6"))
    assert caps.reserves == (6, 0, 4, 0)
    cfg = load("--max-sessions", "20", "--reserved-sessions", "8")
    submission = config.ListenAddress("127.0.0.1", 2587, config.SUBMISSION)
    caps = Caps.of(replace(cfg, listeners=(*cfg.listeners, submission)))
    assert caps.reserves == (8, 4, 4, 4)  # (the submission listeners' 8: 4 for known clients)
    counts = counter(SessionTable(1), 0)
    assert fill(caps, counts, SUBMISSION_POOL) == 4  # (no place is free: the reserves are all)
    assert fill(caps, counts, KNOWN_POOL) == 4  # (together, the 8 they had before)
    assert fill(caps, counts, NETWORK_POOL) == 4 and fill(caps, counts, LOCAL_POOL) == 8
    assert counts.total() == 20
    # Without a network listener, reserves past the total are cut to fit: those admitted
    # nobody at all (a second attacker's pass).
    owners_only = replace(
        load("--max-sessions", "10"),
        reserved_sessions=10,
        listeners=(cfg.listeners[0], submission),
    )
    caps = Caps.of(owners_only)
    assert caps.reserves == (5, 3, 0, 2)
    counts = counter(SessionTable(1), 0)
    assert fill(caps, counts, LOCAL_POOL) == 5 and fill(caps, counts, KNOWN_POOL) == 5
    counts = counter(SessionTable(1), 0)
    assert fill(caps, counts, SUBMISSION_POOL) == 3 and fill(caps, counts, KNOWN_POOL) == 2
    assert fill(caps, counts, LOCAL_POOL) == 5
    with pytest.raises(ConfigError, match="ipv6-prefix-length"):
        load("--ipv6-prefix-length", "129")
    with pytest.raises(ConfigError, match="min-data-rate"):
        load("--min-data-rate", "0")
    assert admission.pool_of(cfg.listeners[0]) == LOCAL_POOL


@pytest.mark.parametrize(
    "roles, total",
    [
        ((config.LOCAL, config.NETWORK, config.SUBMISSION), 3),
        ((config.LOCAL, config.SUBMISSION), 2),
        ((config.SUBMISSION,), 1),
        ((config.NETWORK, config.SUBMISSIONS), 2),
    ],
)
def test_after_a_start_a_submission_client_gets_in_where_reserves_fill_the_total(roles, total):
    """Nobody is known after a start. With the known part rounded up, a reserve of 1 was all
    known clients', and where the reserves fill --max-sessions nobody could ever log in on
    587 or 465 (an attacker's pass); these configurations admitted one before the split."""
    listeners = tuple(
        config.ListenAddress("127.0.0.1", 2500 + n, role) for n, role in enumerate(roles)
    )
    cfg = replace(load(), listeners=listeners, max_sessions=total, reserved_sessions=1)
    counts = counter(SessionTable(1), 0)
    assert Caps.of(cfg).admit(counts, SUBMISSION_POOL, "192.0.2.1") == (SUBMISSION_POOL, None)

"""The daily limit of an authenticated account's recipients at other domains, as a worker
applies it (worker.sendlimit): which recipients count and when, the deferral, limit 0 = off,
the one "limit reached" line per window."""

from __future__ import annotations

import logging

import pytest

from mailerd.ipc.sentcounts import SentCounts
from mailerd.names import Locality
from mailerd.smtp.events import Address
from mailerd.smtp.replies import SEND_LIMIT, SEND_LIMIT_DATA
from mailerd.worker.sendlimit import SendLimit

HOUR = 3600.0
T0 = 1000 * HOUR  # (monotonic time: any start)
DOMAINS = ("example.org", "localhost")


def address(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(local, domain, False) if local else Address(text, "", False)


class Clock:
    """The table's clock (`time.monotonic`), set by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_remote_recipients_are_deferred_at_the_limit_local_ones_never(clock, caplog):
    limit = SendLimit(SentCounts(64, clock), 3, Locality(DOMAINS, frozenset({"192.0.2.25"})))
    alice = [address(a) for a in ("a@remote.test", "b@remote.test")]
    limit.reserve("alice", "192.0.2.7", [*alice, address("alice@example.org")])
    assert limit.refusal("alice", "192.0.2.7", address("c@remote.test"), []) is None
    # In the transaction: c@remote.test accepted, so d@ would be the fourth.
    pending = [address("c@remote.test"), address("bob@example.org")]
    with caplog.at_level(logging.WARNING, "mailerd.worker"):
        assert limit.refusal("alice", "192.0.2.7", address("d@remote.test"), pending) is SEND_LIMIT
        assert limit.refusal("alice", "192.0.2.8", address("e@remote.test"), pending) is SEND_LIMIT
    # the same recipient again is the same copy; local ones, postmaster, subdomains are ours
    assert limit.refusal("alice", "192.0.2.7", address("C@REMOTE.test"), pending) is not None
    assert limit.refusal("alice", "192.0.2.7", address("c@Remote.Test"), pending) is None
    ours = ("carol@example.org", "x@lists.example.org", "root@localhost", "postmaster")
    for local in (*ours, "bob@[192.0.2.25]", "root@[127.0.0.1]"):  # (literals of ours too)
        assert limit.refusal("alice", "192.0.2.7", address(local), pending) is None
    assert limit.refusal("bob", "192.0.2.7", address("d@remote.test"), pending) is None
    lines = [r.getMessage() for r in caplog.records if "limit reached" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "user alice" in lines[0] and "[192.0.2.7]" in lines[0], lines


def test_each_remote_address_counts_once_and_the_limit_lifts_a_day_later(clock):
    table = SentCounts(64, clock)
    limit = SendLimit(table, 3, Locality(DOMAINS))
    limit.reserve("alice", "192.0.2.7", [address(a) for a in ("a@x.test", "a@X.TEST", "b@x.test")])
    assert table.count("alice") == 2
    assert limit.refusal("alice", "192.0.2.7", address("c@x.test"), [address("b@y.test")])
    clock.now += 25 * HOUR
    assert limit.refusal("alice", "192.0.2.7", address("c@x.test"), [address("b@y.test")]) is None


def test_a_message_past_the_limit_at_the_end_of_its_data_counts_nothing(clock):
    """Other sessions of the account's may have sent since its RCPTs were answered: at the end
    of the data, a message whose remote recipients would pass the limit is deferred whole and
    counts nothing."""
    table = SentCounts(64, clock)
    limit = SendLimit(table, 3, Locality(DOMAINS))
    two = [address("a@x.test"), address("b@x.test")]
    assert limit.reserve("alice", "192.0.2.7", two) is None
    assert limit.reserve("alice", "192.0.2.7", two) is SEND_LIMIT_DATA
    assert table.count("alice") == 2
    assert limit.reserve("alice", "192.0.2.7", two[:1] + [address("c@example.org")]) is None
    assert table.count("alice") == 3


def test_reaching_the_limit_by_a_message_is_logged_without_a_refusal(clock, caplog):
    """A thief who sends exactly the limit and stops is noticed too."""
    limit = SendLimit(SentCounts(64, clock), 2, Locality(DOMAINS))
    with caplog.at_level(logging.WARNING, "mailerd.worker"):
        limit.reserve("alice", "2001:db8::7", [address("a@x.test")])
        assert not caplog.records
        limit.reserve("alice", "2001:db8::7", [address("b@x.test")])
        limit.refusal("alice", "2001:db8::7", address("c@x.test"), [])
    assert [r.getMessage()[:46] for r in caplog.records] == [
        "limit reached: user alice has sent to the 2 re"
    ]
    assert "[2001:db8::7]" in caplog.records[0].getMessage()


def test_limit_0_is_no_limit(clock, caplog):
    table = SentCounts(64, clock)
    limit = SendLimit(table, 0, Locality(DOMAINS))
    many = [address(f"r{i}@x.test") for i in range(5000)]
    with caplog.at_level(logging.WARNING, "mailerd.worker"):
        limit.reserve("alice", "192.0.2.7", many)
        assert limit.refusal("alice", "192.0.2.7", address("one@more.test"), many) is None
    assert table.count("alice") == 0 and not caplog.records

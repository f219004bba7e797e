"""--max-recipients-per-day: an authenticated account's recipients at other domains within 24
hours, over every worker. Past the limit a remote recipient is deferred at RCPT (450 4.7.1) and
the session goes on; local recipients, other accounts and the local listener's clients that do
not log in are not limited; only a message that was taken counts; the first time an account
reaches its limit is one warning; a reload keeps the counts.

The module's server has -w 2, --max-recipients-per-day 3, a certificate (tests/certs.py's CA),
the submission listeners, and accounts with passwords, one for each test (the counts last a
day). Remote recipients (remote.test) are queued for real: the suite's DNS server, which knows
no name, answers for their domain, and each comes back to its sender as a bounce.
"""

from __future__ import annotations

import re
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from mailerd import credentials

from .conftest import expect, finish, send_data, wait_until
from .test_tls import (
    HELO,
    PKI,
    Account,
    Client,
    TLSMailerd,
    client_context,
    make_pki,
    message,
    new_password,
)

LIMIT = 3
DEFERRED = ("450", "4.7.1")
ACCOUNTS = ("past", "local", "apart", "other", "loopback", "refused", "reload", "parallel")


@dataclass
class Limited:
    m: TLSMailerd
    pki: PKI
    accounts: dict[str, Account]  # one per test: ACCOUNTS
    rcpt: str  # a local mailbox without a password


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> Iterator[Limited]:
    base = tmp_path_factory.mktemp("sendlimit")
    pki = make_pki(base / "pki")
    passwd = base / "passwd"
    m = TLSMailerd(
        base,
        pairs=[pki.rsa],
        passwd=passwd,
        name="limited",
        workers=2,
        extra=["--max-recipients-per-day", str(LIMIT)],
    )
    accounts = {key: Account(m.new_user(key), new_password()) for key in ACCOUNTS}
    hashes = {a.user: credentials.hash_password(a.password) for a in accounts.values()}
    credentials.write(str(passwd), hashes)
    rcpt = m.new_user("rcpt")
    m.start()
    yield Limited(m, pki, accounts, rcpt)
    finish(m)


def session(s: Limited, account: Account | None, listener: str = "submission") -> Client:
    """A session past EHLO (inside TLS on submission), logged in as `account` if given."""
    c = Client("127.0.0.1", s.m.listener_port(listener))
    c.start(HELO)
    if listener == "submission":
        c.starttls(client_context(s.pki.ca))
        expect(c.ehlo(HELO), 250, conn=c)
    if account is not None:
        expect(c.auth_plain(account.user, account.password), 235, conn=c)
    return c


def remote(n: int) -> str:
    return f"r{n}-{uuid.uuid4().hex[:8]}@remote.test"


def transaction(c: Client, sender: str, rcpts: list[str], *, author: str | None = None) -> list:
    """MAIL (250), a RCPT for each (their replies), and the message if one was taken."""
    expect(c.cmd(f"MAIL FROM:<{sender}>"), 250, conn=c)
    replies = [c.cmd(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
    if any(r.code == 250 for r in replies):
        body = message(f"limited-{uuid.uuid4().hex}", author or sender)
        send_data(c, body, 250 if author is None else 550)
    else:
        expect(c.cmd("RSET"), 250, conn=c)
    return replies


def codes(replies: list) -> list[tuple[str, str | None]]:
    return [(str(r.code), r.enhanced) for r in replies]


def deferred_lines(log: str, rcpt: str) -> list[str]:
    pattern = (
        rf"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.1\]: 450 4\.7\.1 .*; "
        rf"from=<[^>]*> to=<{re.escape(rcpt)}> proto=ESMTP helo=<{HELO}>$"
    )
    return [line for line in log.splitlines() if re.search(pattern, line)]


def reached_lines(log: str, user: str) -> list[str]:
    return [line for line in log.splitlines() if f"limit reached: user {user} " in line]


def test_an_account_past_its_limit_is_deferred_at_rcpt_and_warned_of_once(limited: Limited):
    s, account = limited, limited.accounts["past"]
    sender = f"{account.user}@example.org"
    mark = s.m.log_mark()
    r = [remote(n) for n in range(6)]
    with session(s, account) as c:
        assert codes(transaction(c, sender, r[:2])) == [("250", "2.1.5")] * 2
        # 2 sent, 1 more accepted in this transaction: the next is the fourth
        replies = transaction(c, sender, [r[2], r[3], f"{s.rcpt}@example.org"])
        assert codes(replies) == [("250", "2.1.5"), DEFERRED, ("250", "2.1.5")], c.dialogue()
        assert "daily limit" in replies[1].text
        replies = transaction(c, sender, [r[4], r[5], f"{s.rcpt}@example.net"])
        assert codes(replies) == [DEFERRED, DEFERRED, ("250", "2.1.5")], c.dialogue()
        expect(c.cmd("NOOP"), 250, conn=c)  # the session goes on
    assert wait_until(lambda: len(s.m.messages(s.rcpt)) >= 2), "the local copies"
    log = s.m.log_since(mark)
    assert len(deferred_lines(log, r[3])) == 1, log  # (logged once a session: its first)
    assert deferred_lines(log, r[4]) == deferred_lines(log, r[5]) == [], log
    reached = reached_lines(log, account.user)
    assert len(reached) == 1 and "[127.0.0.1]" in reached[0], log
    assert account.password not in log


def test_sessions_side_by_side_share_the_limit(limited: Limited):
    """An attacker's pass: 8 sessions of one account, each with its 3 RCPTs answered before
    any of them sent its data, sent to 24 with a limit of 3 (RCPT counted what was taken
    only; 50 sessions of 100 at the defaults). The end of the data counts too: the first
    message is taken, the others are deferred whole, and logged."""
    s, account = limited, limited.accounts["parallel"]
    sender = f"{account.user}@example.org"
    mark = s.m.log_mark()
    sessions = [session(s, account) for _ in range(4)]
    try:
        for c in sessions:
            expect(c.cmd(f"MAIL FROM:<{sender}>"), 250, conn=c)
            for n in range(LIMIT):
                expect(c.cmd(f"RCPT TO:<{remote(n)}>"), 250, conn=c)
        first, *others = sessions
        send_data(first, message(f"parallel-{uuid.uuid4().hex}", sender), 250)
        for c in others:
            reply = send_data(c, message(f"parallel-{uuid.uuid4().hex}", sender), 450, "4.7.1")
            assert "daily limit" in reply.text, reply
            expect(c.cmd("NOOP"), 250, conn=c)  # the session goes on
    finally:
        for c in sessions:
            c.close()
    with session(s, account) as c:
        assert codes(transaction(c, sender, [remote(9)])) == [DEFERRED]
    log = s.m.log_since(mark)
    assert log.count("NOQUEUE: reject: DATA from unknown[127.0.0.1]: 450 4.7.1 ") == 3, log
    assert len(reached_lines(log, account.user)) == 1, log


def test_local_recipients_are_never_limited(limited: Limited):
    s, account = limited, limited.accounts["local"]
    sender = f"{account.user}@example.org"
    with session(s, account) as c:
        transaction(c, sender, [remote(n) for n in range(LIMIT)])
        local = [f"{s.rcpt}@example.org", f"{s.rcpt}@EXAMPLE.NET"]
        assert codes(transaction(c, sender, local)) == [("250", "2.1.5")] * 2
        assert codes(transaction(c, sender, [remote(9)])) == [DEFERRED]


def test_the_limit_is_per_account(limited: Limited):
    s = limited
    spent, other = s.accounts["apart"], s.accounts["other"]
    with session(s, spent) as c:
        transaction(c, f"{spent.user}@example.org", [remote(n) for n in range(LIMIT)])
        assert codes(transaction(c, f"{spent.user}@example.org", [remote(9)])) == [DEFERRED]
    with session(s, other) as c:
        replies = transaction(c, f"{other.user}@example.org", [remote(n) for n in range(LIMIT)])
        assert codes(replies) == [("250", "2.1.5")] * LIMIT


def test_the_local_listener_limits_only_who_logs_in(limited: Limited):
    """The machine's own programs (cron, scripts) on the loopback listener without AUTH are
    not limited, whatever sender they use; a client that logs in there is that user."""
    s, account = limited, limited.accounts["loopback"]
    sender = f"{account.user}@example.org"
    with session(s, account) as c:
        transaction(c, sender, [remote(n) for n in range(LIMIT)])
        assert codes(transaction(c, sender, [remote(9)])) == [DEFERRED]
    with session(s, None, "local") as c:
        replies = transaction(c, sender, [remote(n) for n in range(2 * LIMIT)])
        assert codes(replies) == [("250", "2.1.5")] * (2 * LIMIT)
    with session(s, account, "local") as c:
        assert codes(transaction(c, sender, [remote(9)])) == [DEFERRED]


def test_a_message_refused_after_its_data_does_not_count(limited: Limited):
    s, account = limited, limited.accounts["refused"]
    sender = f"{account.user}@example.org"
    with session(s, account) as c:
        rcpts = [remote(n) for n in range(LIMIT)]
        # another user's From: (550 5.7.1 after the data): nothing was queued
        transaction(c, sender, rcpts, author=f"{s.rcpt}@example.org")
        assert codes(transaction(c, sender, rcpts)) == [("250", "2.1.5")] * LIMIT
        assert codes(transaction(c, sender, [remote(9)])) == [DEFERRED]


def test_a_reload_keeps_the_counts(limited: Limited):
    s, account = limited, limited.accounts["reload"]
    sender = f"{account.user}@example.org"
    with session(s, account) as c:
        transaction(c, sender, [remote(n) for n in range(LIMIT)])
    mark = s.m.log_mark()
    s.m.signal(signal.SIGHUP)
    assert wait_until(lambda: "configuration reloaded" in s.m.log_since(mark), 15), s.m.log_since(
        mark
    )
    with session(s, account) as c:
        assert codes(transaction(c, sender, [remote(9)])) == [DEFERRED]

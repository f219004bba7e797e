"""End-to-end tests of outbound delivery: mailerd in a network namespace with a real DNS server
and real (aiosmtpd) receiving servers. See conftest.py for the fake Internet, outbound.zone for
its names, and receiver.py for how receivers are scripted.

Mail is submitted over the veth to mailerd's trusted listener, queued, and then has to reach the
right receiver, exactly once — or come back to the sender as an RFC 3464 DSN.
"""

from __future__ import annotations

import email.utils
import json
import re
import time

import pytest

from .conftest import (
    CRASH_V6,
    DEAD,
    HOSTNAME,
    MX1,
    MX2,
    MX6,
    SMARTHOST_PASSWORD,
    SMARTHOST_USER,
    TARPIT,
    Internet,
    Mailerd,
    Submitted,
    finish_or_fail,
    parse_dsn,
    return_path_of,
    smarthost_script,
    token,
    wait_until,
)

DELIVERY_TIMEOUT = 15.0  # a first attempt that should succeed
QUIET = 1.5  # how long to keep watching for a duplicate or a stray message


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def wait_delivered(net: Internet, rcpt: str, receiver: str, m: Mailerd, timeout=DELIVERY_TIMEOUT):
    """Wait until `receiver` accepted a transaction for rcpt; return that transaction."""
    r = net.receivers[receiver]
    got = wait_until(lambda: r.delivered(rcpt), timeout)
    assert got, (
        f"<{rcpt}> never reached {receiver} within {timeout}s\n"
        f"log lines for it: {[d['line'] for d in m.deliveries(rcpt)]}\n"
        f"--- mailerd log (tail) ---\n{m.log_tail()}\n--- receivers ---\n{net.report()}"
    )
    return got[0]


def assert_exactly_once(net: Internet, rcpt: str, where: str, quiet: float = QUIET) -> dict:
    """rcpt was delivered once in all, at receiver `where`, and nothing more comes later."""
    time.sleep(quiet)
    seen = net.delivered_anywhere(rcpt)
    assert [name for name, _ in seen] == [where], (
        f"<{rcpt}> must be delivered exactly once, at {where}; got {[n for n, _ in seen]}\n"
        f"{net.report()}"
    )
    return seen[0][1]


def wait_gone_from_queue(m: Mailerd, queue_id: str, timeout: float = 10.0) -> None:
    gone = wait_until(lambda: not m.in_queue(queue_id), timeout)
    assert gone, (
        f"{queue_id} is still in the queue after every recipient was done: "
        f"env={m.envelope(queue_id)} msg exists={m.msg_path(queue_id).exists()}\n{m.log_tail()}"
    )


def wait_mailbox(m: Mailerd, user: str, count: int = 1, timeout: float = DELIVERY_TIMEOUT):
    got = wait_until(lambda: len(m.mailbox(user)) >= count, timeout)
    assert got, (
        f"mailbox {user} has {len(m.mailbox(user))} message(s), expected {count}, "
        f"after {timeout}s\n--- mailerd log (tail) ---\n{m.log_tail()}"
    )
    return m.mailbox(user)


def check_relayed_copy(t: dict, sub: Submitted, rcpts: list[str]) -> None:
    """What a receiver got is our message: envelope, EHLO, one Received: header + the original."""
    assert t["mail_from"] == sub.sender, t["mail_from"]
    assert sorted(map(str.lower, t["rcpt_tos"])) == sorted(map(str.lower, rcpts)), t["rcpt_tos"]
    assert t["helo"] == HOSTNAME, f"EHLO must name our hostname {HOSTNAME}, got {t['helo']!r}"
    data = t["data"].encode("latin-1")
    assert data.endswith(sub.body), (
        f"the relayed message must end with the submitted one, unchanged\n"
        f" sent:     {sub.body[:300]!r}\n relayed:  {data[-len(sub.body) - 50 :][:350]!r}"
    )
    added = data[: len(data) - len(sub.body)]
    assert added.startswith(b"Received: from "), f"no Received: header prepended: {added!r}"
    lines = added.split(b"\r\n")
    assert lines[-1] == b"", added
    # exactly one header field: the first line and its continuation lines, nothing else
    assert all(line[:1] in (b" ", b"\t") for line in lines[1:-1]), (
        f"only our one Received: header may be prepended, got {added!r}"
    )
    assert re.search(rb"\bby " + re.escape(HOSTNAME.encode()) + rb"\b", added), added
    assert b"Return-Path:" not in added, "a relay must not add Return-Path"


def dsn_in(m: Mailerd, user: str, count: int = 1):
    boxes = wait_mailbox(m, user, count)
    raw = boxes[count - 1]
    assert return_path_of(raw) == "<>", (
        f"a DSN is sent from the null sender; stored Return-Path is {return_path_of(raw)!r}"
    )
    dsn = parse_dsn(raw)
    sender = email.utils.parseaddr(dsn.msg["From"])[1].lower()
    assert sender == f"mailer-daemon@{HOSTNAME}", f"DSN From: {dsn.msg['From']!r}"
    return dsn


def check_failed(dsn, rcpt: str, status_prefix: str = "5.", text: str | None = None):
    block = dsn.recipients.get(rcpt.lower())
    assert block is not None, (
        f"no Final-Recipient for <{rcpt}> in the DSN; has {list(dsn.recipients)}\n{dsn.text}"
    )
    assert block["Action"].strip().lower() == "failed", block.as_string()
    status = block["Status"].strip()
    assert re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", status), block.as_string()
    assert status.startswith(status_prefix), (status, status_prefix, block.as_string())
    if text is not None:
        diag = " ".join(str(block.get("Diagnostic-Code", "")).split())
        assert text in diag, (
            f"Diagnostic-Code must quote the remote reply {text!r}: {block.as_string()}"
        )
    return block


def check_original_headers(dsn, sub: Submitted) -> None:
    marker = re.search(rb"X-Test-Marker: (\S+)", sub.body).group(1).decode()
    assert marker in dsn.original, (
        f"the DSN must return the original headers (X-Test-Marker {marker}):\n{dsn.raw[:3000]!r}"
    )
    msgid = re.search(rb"Message-ID: (<[^>]+>)", sub.body).group(1).decode()
    assert msgid in dsn.original, dsn.original


def wait_attempted(m: Mailerd, queue_id: str, rcpt: str, attempts: int = 1) -> dict:
    """The envelope file records the attempt (it is written just after the log line)."""
    r = wait_until(
        lambda: (x := m.recipient_state(queue_id, rcpt)) and x["attempts"] >= attempts and x, 5
    )
    assert r, f"envelope of {queue_id} never recorded {attempts} attempt(s): {m.envelope(queue_id)}"
    return r


def idle_queue(m: Mailerd, timeout: float = 20.0) -> None:
    """Wait until m has nothing queued (so no stray connection can come from it)."""
    ok = wait_until(lambda: not m.queued_ids(), timeout)
    assert ok, f"queue not idle: {m.queued_ids()}\n{m.log_tail()}"


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------


def test_mx_preference_order(internet: Internet, mta: Mailerd):
    """pref.test: MX 10 mx1, MX 20 mx2 → only mx1 gets it, once, as we relayed it."""
    rcpt = f"{token('pref')}@pref.test"
    sender = mta.add_user(token("alice"))
    sub = mta.submit(sender, [rcpt], subject="preference")
    t = wait_delivered(internet, rcpt, "mx1", mta)
    t = assert_exactly_once(internet, rcpt, "mx1")
    assert not internet.receivers["mx2"].rcpt_events(rcpt), "mx2 (preference 20) was tried"
    check_relayed_copy(t, sub, [rcpt])
    line = mta.wait_delivery(rcpt, "sent")
    assert line["id"] == sub.queue_id, line
    assert line["relay"] == f"mx1.pref.test[{MX1}]", line["line"]
    assert line["reply"].startswith("250"), line["line"]
    wait_gone_from_queue(mta, sub.queue_id)


def test_equal_preferences_are_spread(internet: Internet, mta: Mailerd):
    """equal.test: two MX of preference 10. Over 16 messages both must get some (p≈3e-5 of a
    false failure if the choice is random)."""
    sender = mta.add_user(token("alice"))
    rcpts = [f"{token('eq')}@equal.test" for _ in range(16)]
    for rcpt in rcpts:
        mta.submit(sender, [rcpt], subject="equal preferences")
    where: dict[str, str] = {}
    for rcpt in rcpts:
        wait_until(lambda r=rcpt: internet.delivered_anywhere(r), DELIVERY_TIMEOUT)
        seen = internet.delivered_anywhere(rcpt)
        assert len(seen) == 1, f"<{rcpt}>: {[n for n, _ in seen]}\n{mta.log_tail()}"
        where[rcpt] = seen[0][0]
    counts = {name: list(where.values()).count(name) for name in ("mx1", "mx2")}
    assert set(where.values()) <= {"mx1", "mx2"}, where
    assert counts["mx1"] > 0 and counts["mx2"] > 0, (
        f"equal-preference MX hosts must be tried in random order; deliveries: {counts}"
    )


def test_fallback_when_best_mx_refuses(internet: Internet, mta: Mailerd):
    """fallback.test: MX 10 is 198.51.100.20 (port 25 closed) → MX 20 (mx2) gets it at once."""
    rcpt = f"{token('fb')}@fallback.test"
    sub = mta.submit(mta.add_user(token("alice")), [rcpt], subject="fallback")
    start = time.monotonic()
    t = wait_delivered(internet, rcpt, "mx2", mta)
    assert time.monotonic() - start < 10, "the second MX must be tried in the same attempt"
    t = assert_exactly_once(internet, rcpt, "mx2")
    check_relayed_copy(t, sub, [rcpt])
    line = mta.wait_delivery(rcpt, "sent")
    assert line["relay"] == f"mx.fallback.test[{MX2}]", line["line"]
    assert mta.statuses(rcpt) == ["sent"], (
        f"a refused MX with a working backup is not a deferral: {mta.statuses(rcpt)}"
    )


def test_ipv6_only_mx(internet: Internet, mta: Mailerd):
    rcpt = f"{token('v6')}@v6only.test"
    sub = mta.submit(mta.add_user(token("alice")), [rcpt], subject="ipv6 only")
    t = wait_delivered(internet, rcpt, "mx6", mta)
    t = assert_exactly_once(internet, rcpt, "mx6")
    check_relayed_copy(t, sub, [rcpt])
    assert ":" in t["peer"][0], f"not over IPv6: {t['peer']}"
    line = mta.wait_delivery(rcpt, "sent")
    assert line["relay"] == f"mx6.v6only.test[{MX6}]", line["line"]


def test_aaaa_is_tried_before_a(internet: Internet, mta: Mailerd):
    """dual.test's MX has AAAA (mx6) and A (mx1): IPv6 first."""
    rcpt = f"{token('dual')}@dual.test"
    mta.submit(mta.add_user(token("alice")), [rcpt], subject="dual stack")
    wait_delivered(internet, rcpt, "mx6", mta)
    assert_exactly_once(internet, rcpt, "mx6")
    assert not internet.receivers["mx1"].rcpt_events(rcpt)


def test_implicit_mx(internet: Internet, mta: Mailerd):
    """implicit.test has no MX, only an A record (mx2): RFC 5321 5.1 implicit MX."""
    rcpt = f"{token('imp')}@implicit.test"
    sub = mta.submit(mta.add_user(token("alice")), [rcpt], subject="implicit mx")
    t = wait_delivered(internet, rcpt, "mx2", mta)
    t = assert_exactly_once(internet, rcpt, "mx2")
    check_relayed_copy(t, sub, [rcpt])
    assert mta.wait_delivery(rcpt, "sent")["relay"] == f"implicit.test[{MX2}]"


def test_one_transaction_per_domain(internet: Internet, mta: Mailerd):
    """Three recipients at pref.test and one at implicit.test in one message: one transaction
    at mx1 with all three, one at mx2 with the fourth."""
    pref = [f"{token('multi')}@pref.test" for _ in range(3)]
    imp = f"{token('multi')}@implicit.test"
    sub = mta.submit(mta.add_user(token("alice")), [*pref, imp], subject="per domain")
    for rcpt in pref:
        wait_delivered(internet, rcpt, "mx1", mta)
    wait_delivered(internet, imp, "mx2", mta)
    time.sleep(QUIET)
    at_mx1 = [
        t
        for t in internet.receivers["mx1"].transactions()
        if set(map(str.lower, t["rcpt_tos"])) & set(pref)
    ]
    assert len(at_mx1) == 1, f"pref.test needs one transaction, got {len(at_mx1)}: {at_mx1}"
    check_relayed_copy(at_mx1[0], sub, pref)
    at_mx2 = [
        t for t in internet.receivers["mx2"].transactions() if imp in map(str.lower, t["rcpt_tos"])
    ]
    assert len(at_mx2) == 1 and at_mx2[0]["rcpt_tos"] == [imp], at_mx2
    for rcpt in [*pref, imp]:
        assert len(internet.delivered_anywhere(rcpt)) == 1, rcpt
    wait_gone_from_queue(mta, sub.queue_id)


# --------------------------------------------------------------------------------------------
# Bounces
# --------------------------------------------------------------------------------------------


def test_null_mx_bounces_without_connecting(internet: Internet, mta: Mailerd):
    """nullmx.test: MX 0 "." (and an A record that must not be used): 556 5.1.10 DSN."""
    idle_queue(mta)
    before = {r.name: r.connections() for r in internet.all_receivers()}
    user = token("alice")
    rcpt = f"{token('null')}@nullmx.test"
    sub = mta.submit(mta.add_user(user), [rcpt], subject="null mx")
    dsn = dsn_in(mta, user)
    check_failed(dsn, rcpt, "5.1.10")
    assert dsn.recipients[rcpt]["Status"].strip() == "5.1.10"
    assert "556" in dsn.text, f"the DSN should carry 556 (RFC 7505):\n{dsn.text}"
    check_original_headers(dsn, sub)
    assert mta.wait_delivery(rcpt, "bounced")["id"] == sub.queue_id
    wait_gone_from_queue(mta, sub.queue_id)
    time.sleep(QUIET)
    after = {r.name: r.connections() for r in internet.all_receivers()}
    assert after == before, f"a null MX domain must not be connected to: {before} → {after}"
    assert not internet.rcpts_anywhere(rcpt)
    assert mta.statuses(rcpt) == ["bounced"], mta.statuses(rcpt)


def test_nxdomain_bounces(internet: Internet, mta: Mailerd):
    user = token("alice")
    rcpt = f"{token('nx')}@nxdomain.test"
    sub = mta.submit(mta.add_user(user), [rcpt], subject="nxdomain")
    dsn = dsn_in(mta, user)
    check_failed(dsn, rcpt)
    check_original_headers(dsn, sub)
    assert mta.statuses(rcpt) == ["bounced"], mta.statuses(rcpt)
    wait_gone_from_queue(mta, sub.queue_id)


@pytest.mark.parametrize(
    "domain,status,remote_text",
    [
        pytest.param("reject.test", "5.1.1", "mx1 knows no such user", id="rcpt-550"),
        pytest.param("reject-data.test", "5.6.0", "mx1 refuses this content", id="data-554"),
    ],
)
def test_permanent_failure_dsn(internet: Internet, mta: Mailerd, domain, status, remote_text):
    """A 5xx from the MX → an RFC 3464 DSN in the local sender's mailbox."""
    user = token("alice")
    sender = mta.add_user(user)
    rcpt = f"bad-{token('rej')}@{domain}" if domain == "reject.test" else f"{token()}@{domain}"
    sub = mta.submit(sender, [rcpt], subject="permanent failure")
    dsn = dsn_in(mta, user)
    block = check_failed(dsn, rcpt, status, remote_text)
    assert block["Status"].strip() == status, block.as_string()
    assert re.match(r"\s*smtp\s*;", block["Diagnostic-Code"], re.I), block.as_string()
    assert remote_text in " ".join(dsn.human.split()), (
        f"the human-readable part should quote the remote reply:\n{dsn.human}"
    )
    assert dsn.per_message["Reporting-MTA"].split(";")[-1].strip() == HOSTNAME
    to = email.utils.parseaddr(dsn.msg["To"])[1]
    assert to.lower() == sender.lower(), dsn.msg["To"]
    check_original_headers(dsn, sub)
    line = mta.wait_delivery(rcpt, "bounced")
    assert line["relay"] == f"mx1.pref.test[{MX1}]", line["line"]
    assert remote_text in line["reply"], line["line"]
    assert mta.statuses(rcpt) == ["bounced"], "a 5xx must not be retried"
    wait_gone_from_queue(mta, sub.queue_id)
    assert len(mta.mailbox(user)) == 1, "exactly one DSN"


def test_null_sender_is_never_bounced(internet: Internet, mta: Mailerd):
    idle_queue(mta)
    rcpt = f"bad-{token('nullsender')}@reject.test"
    spool_before = mta.spool_files()
    null_before = _null_sender_transactions(internet)
    lines_before = len(mta.deliveries())
    sub = mta.submit("", [rcpt], subject="from the null sender")
    mta.wait_delivery(rcpt, "bounced")
    wait_gone_from_queue(mta, sub.queue_id)
    time.sleep(2.0)
    assert mta.spool_files() == spool_before, (
        f"a message from <> must never be bounced: new spool files "
        f"{sorted(mta.spool_files() - spool_before)}"
    )
    assert mta.queued_ids() == [], f"something was queued: {mta.queued_ids()}"
    new = mta.deliveries()[lines_before:]
    assert [d["to"] for d in new] == [rcpt], f"unexpected deliveries: {[d['line'] for d in new]}"
    bounces = _null_sender_transactions(internet)[len(null_before) :]
    assert not bounces, f"a bounce of a bounce went out: {bounces}"


def _null_sender_transactions(net: Internet) -> list[tuple[str, dict]]:
    return [
        (r.name, t) for r in net.all_receivers() for t in r.transactions() if t["mail_from"] == ""
    ]


def test_remote_sender_gets_dsn_by_smtp(internet: Internet, mta: Mailerd):
    """A remote sender's bounce is queued from <> and delivered to its MX (mx1)."""
    sender = f"{token('bob')}@bounces.test"
    rcpt = f"bad-{token('rej')}@reject.test"
    sub = mta.submit(sender, [rcpt], subject="bounce me remotely")
    t = wait_delivered(internet, sender, "mx1", mta)
    t = assert_exactly_once(internet, sender, "mx1")
    assert t["mail_from"] == "", f"a DSN goes out with MAIL FROM:<>, got {t['mail_from']!r}"
    assert t["rcpt_tos"] == [sender], t["rcpt_tos"]
    dsn = parse_dsn(t["data"].encode("latin-1"))
    check_failed(dsn, rcpt, "5.1.1", "mx1 knows no such user")
    check_original_headers(dsn, sub)
    idle_queue(mta)


def test_partial_rejection(internet: Internet, mta: Mailerd):
    """Two recipients at one domain, one refused with 550: one transaction, the good one
    delivered once, a DSN for the other only."""
    user = token("alice")
    sender = mta.add_user(user)
    good = f"good-{token('part')}@partial.test"
    bad = f"bad-{token('part')}@partial.test"
    sub = mta.submit(sender, [good, bad], subject="partial")
    t = wait_delivered(internet, good, "mx1", mta)
    dsn = dsn_in(mta, user)
    t = assert_exactly_once(internet, good, "mx1")
    check_relayed_copy(t, sub, [good])
    assert [a for a, _ in t["rejected_rcpts"]] == [bad], t
    mx1 = internet.receivers["mx1"]
    assert len(mx1.rcpt_events(bad)) == 1, "the refused recipient must not be retried"
    assert mx1.rcpt_events(bad)[0]["conn"] == t["conn"], "both RCPTs in one session"
    assert len([x for x in mx1.transactions() if x["conn"] == t["conn"]]) == 1
    assert list(dsn.recipients) == [bad], f"the DSN must list only <{bad}>: {list(dsn.recipients)}"
    check_failed(dsn, bad, "5.1.1", "mx1 knows no such user")
    assert mta.statuses(good) == ["sent"] and mta.statuses(bad) == ["bounced"], (
        mta.statuses(good),
        mta.statuses(bad),
    )
    wait_gone_from_queue(mta, sub.queue_id)
    time.sleep(QUIET)
    assert len(mta.mailbox(user)) == 1, "one DSN only"


def test_a_recipient_the_primary_deferred_goes_to_the_backup_mx_at_once(
    internet: Internet, mta: Mailerd
):
    """The primary took one recipient and greylisted the other (450 at RCPT): the other is
    asked of the backup MX in the same attempt, as Postfix does, after the first delivery is
    recorded; it waited for the next attempt before. Each is delivered once."""
    sender = mta.add_user(token("alice"))
    now = f"now-{token('split')}@split.test"
    later = f"later-{token('split')}@split.test"
    sub = mta.submit(sender, [now, later], subject="split")
    wait_delivered(internet, later, "mx2", mta)
    assert_exactly_once(internet, now, "mx1")
    t = assert_exactly_once(internet, later, "mx2")
    check_relayed_copy(t, sub, [later])
    assert mta.statuses(now) == ["sent"] and mta.statuses(later) == ["sent"], [
        d["line"] for d in mta.deliveries(now) + mta.deliveries(later)
    ]
    assert len(internet.receivers["mx1"].rcpt_events(later)) == 1, "mx1 asked for it once"
    wait_gone_from_queue(mta, sub.queue_id)


@pytest.mark.parametrize(
    "domain",
    [pytest.param("loop.test", id="by-address"), pytest.param("loopname.test", id="by-name")],
)
def test_mx_pointing_at_ourselves_bounces(internet: Internet, mta: Mailerd, domain):
    user = token("alice")
    rcpt = f"{token('loop')}@{domain}"
    sub = mta.submit(mta.add_user(user), [rcpt], subject="loop")
    dsn = dsn_in(mta, user)
    check_failed(dsn, rcpt, "5.4.6")
    assert "loops back to myself" in dsn.text, dsn.text
    check_original_headers(dsn, sub)
    assert mta.statuses(rcpt) == ["bounced"], mta.statuses(rcpt)
    wait_gone_from_queue(mta, sub.queue_id)


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param("retry.test", id="451-at-rcpt"),
        pytest.param("retry-data.test", id="451-after-data"),
    ],
)
def test_tempfail_then_success(internet: Internet, mta: Mailerd, domain):
    """mx1 answers 451 to the first two transactions: deferred, deferred, sent — once."""
    user = token("alice")
    rcpt = f"{token('retry')}@{domain}"
    sub = mta.submit(mta.add_user(user), [rcpt], subject="retry")
    wait_delivered(internet, rcpt, "mx1", mta, timeout=20)
    t = assert_exactly_once(internet, rcpt, "mx1")
    check_relayed_copy(t, sub, [rcpt])
    assert mta.statuses(rcpt) == ["deferred", "deferred", "sent"], [
        d["line"] for d in mta.deliveries(rcpt)
    ]
    deferred = mta.deliveries(rcpt)[0]
    assert deferred["reply"].startswith("451"), deferred["line"]
    assert deferred["relay"] == f"mx1.pref.test[{MX1}]", deferred["line"]
    # --retry-after 1s, doubling: attempts about 1 s and then 2 s apart (±10 %)
    times = [
        e["t"]
        for e in internet.receivers["mx1"].events("MAIL")
        if e["conn"] in {x["conn"] for x in internet.receivers["mx1"].rcpt_events(rcpt)}
    ]
    assert len(times) == 3, times
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 0.85 <= gaps[0] <= 4.0, f"first retry after ~1s, got {gaps}"
    assert 1.7 <= gaps[1] <= 6.0, f"second retry after ~2s (doubled), got {gaps}"
    wait_gone_from_queue(mta, sub.queue_id)
    assert mta.mailbox(user) == [], "a temporary failure that recovered must not notify"


# --------------------------------------------------------------------------------------------
# Crash safety
# --------------------------------------------------------------------------------------------


def test_queue_survives_kill_9(internet: Internet, mailerd_factory):
    """Five messages, each to crashok.test (mx1, up) and crash.test (down). Once every crashok
    copy is delivered and recorded, SIGKILL the whole process group, bring crash.test's MX up
    and restart: each crash.test recipient arrives exactly once and no crashok one again."""
    m = mailerd_factory(name="crashy")
    sender = m.add_user(token("alice"))
    pairs = [(f"{token('ok')}@crashok.test", f"{token('down')}@crash.test") for _ in range(5)]
    subs = [m.submit(sender, list(p), subject=f"crash {i}") for i, p in enumerate(pairs)]

    def settled() -> bool:
        for sub, (ok, down) in zip(subs, pairs, strict=True):
            a, b = m.recipient_state(sub.queue_id, ok), m.recipient_state(sub.queue_id, down)
            if not (
                a and b and a["state"] == "sent" and b["state"] == "pending" and b["attempts"] >= 1
            ):
                return False
        return True

    assert wait_until(settled, 20), (
        f"expected crashok sent / crash pending in every envelope:\n"
        f"{[m.envelope(s.queue_id) for s in subs]}\n{m.log_tail()}"
    )
    for ok, _ in pairs:
        assert len(internet.delivered_anywhere(ok)) == 1, ok
    killed = m.kill9()
    assert len(killed) >= 3, f"expected master, delivery and a worker: {killed}"
    assert len(m.queued_ids()) == 5, m.queued_ids()

    crash_mx = internet.start_receiver(
        "crash", f"[{CRASH_V6}]:25", {"hostname": "mx.crash.test", "rules": []}
    )
    try:
        m.start()
        for _, down in pairs:
            wait_delivered(internet, down, "crash", m, timeout=25)
        time.sleep(2.0)
        for ok, down in pairs:
            got = [n for n, _ in internet.delivered_anywhere(down)]
            assert got == ["crash"], f"<{down}> delivered {got} after the restart\n{m.log_tail()}"
            again = [n for n, _ in internet.delivered_anywhere(ok)]
            assert again == ["mx1"], f"<{ok}> was delivered before the crash, now {again}"
        assert wait_until(lambda: not m.queued_ids(), 10), m.queued_ids()
        assert not any((m.queue / "msg").iterdir()), list((m.queue / "msg").iterdir())
        assert len(crash_mx.transactions()) == 5, "one transaction per queued message"
    finally:
        crash_mx.stop()


# --------------------------------------------------------------------------------------------
# Smarthost
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relayhost,mechanism,trust",
    [
        # (An address cannot be verified against the smarthost's name: "encrypt" sends the
        # password over TLS without that check, on the operator's word.)
        pytest.param(f"{DEAD}:587", "PLAIN", "encrypt", id="ip-plain"),
        pytest.param(f"{DEAD}:587", "LOGIN", "encrypt", id="ip-login"),
        # (By name, with the default policy: its certificate verifies, the test's trust store
        # holding it, as a provider's does with the system's CA certificates.)
        pytest.param("smarthost.test:587", "PLAIN", "store", id="by-name"),
        # (The same, its CA given with --outbound-ca, as a private smarthost's is.)
        pytest.param("smarthost.test:587", "LOGIN", "outbound-ca", id="by-name-outbound-ca"),
    ],
)
def test_smarthost_with_auth(
    internet: Internet, mailerd_factory, tmp_path, relayhost, mechanism, trust
):
    smarthost = internet.receivers["smarthost"]
    smarthost.set_script(smarthost_script(internet.cert, internet.key, [mechanism]))
    try:
        auth = tmp_path / "relay-auth"
        auth.write_text(f"{SMARTHOST_USER}:{SMARTHOST_PASSWORD}\n")
        auth.chmod(0o600)
        m = mailerd_factory(
            "--relayhost",
            relayhost,
            "--relay-auth",
            str(auth),
            *(["--outbound-tls", "encrypt"] if trust == "encrypt" else []),
            *(["--outbound-ca", str(internet.cert)] if trust == "outbound-ca" else []),
            env={"SSL_CERT_FILE": str(internet.cert)} if trust == "store" else {},
        )
        sender = m.add_user(token("alice"))
        rcpts = [f"{token('sh')}@pref.test", f"{token('sh')}@implicit.test"]
        sub = m.submit(sender, rcpts, subject="via smarthost")
        for rcpt in rcpts:
            wait_delivered(internet, rcpt, "smarthost", m)
        time.sleep(QUIET)
        for rcpt in rcpts:
            seen = internet.delivered_anywhere(rcpt)
            assert [n for n, _ in seen] == ["smarthost"], (
                f"with --relayhost everything goes to the smarthost: <{rcpt}> at "
                f"{[n for n, _ in seen]}"
            )
            t = seen[0][1]
            assert t["tls"], "the smarthost session must use STARTTLS"
            assert t["auth_user"] == SMARTHOST_USER, t
            assert t["helo"] == HOSTNAME, t["helo"]
            assert t["mail_from"] == sender
            assert t["data"].encode("latin-1").endswith(sub.body)
        auths = smarthost.events("AUTH-RESULT")
        mine = [
            a
            for a in auths
            if a["conn"] in {t["conn"] for _, t in internet.delivered_anywhere(rcpts[0])}
        ]
        assert mine and mine[-1]["mechanism"] == mechanism and mine[-1]["tls"], auths[-3:]
        assert mine[-1]["ok"], mine
        for rcpt in rcpts:
            line = m.wait_delivery(rcpt, "sent")
            assert line["relay"].endswith(f"[{DEAD}]"), line["line"]
        wait_gone_from_queue(m, sub.queue_id)
    finally:
        smarthost.set_script(smarthost_script(internet.cert, internet.key))


def test_smarthost_password_never_sent_in_clear(internet: Internet, mailerd_factory, tmp_path):
    """A smarthost that offers AUTH without STARTTLS: with the default --outbound-tls may, the
    password must not be sent; the mail stays queued (deferred)."""
    plain = internet.start_receiver(
        "plain-smarthost",
        f"{DEAD}:2587",
        {
            "hostname": "plain.smarthost.test",
            "auth": {
                "user": SMARTHOST_USER,
                "password": SMARTHOST_PASSWORD,
                "mechanisms": ["PLAIN", "LOGIN"],
                "require_tls": False,
            },
            "rules": [],
        },
    )
    try:
        auth = tmp_path / "relay-auth"
        auth.write_text(f"{SMARTHOST_USER}:{SMARTHOST_PASSWORD}\n")
        auth.chmod(0o600)
        m = mailerd_factory("--relayhost", f"{DEAD}:2587", "--relay-auth", str(auth))
        rcpt = f"{token('clear')}@pref.test"
        sub = m.submit(m.add_user(token("alice")), [rcpt], subject="no cleartext password")
        m.wait_delivery(rcpt, "deferred")
        assert wait_until(lambda: plain.connections() >= 1, 5), plain.summary()
        assert plain.events("AUTH") == [] and plain.events("AUTH-RESULT") == [], (
            f"the password went out without TLS:\n{plain.summary()}"
        )
        assert plain.transactions() == []
        assert "bounced" not in m.statuses(rcpt)
        assert m.in_queue(sub.queue_id)
    finally:
        plain.stop()


def test_smarthost_password_needs_a_verified_certificate(
    internet: Internet, mailerd_factory, tmp_path
):
    """With --relay-auth and the default --outbound-tls may, the smarthost's certificate must
    verify for its name before the password goes: here it is self-signed and trusted by
    nobody, so the mail waits (no AUTH, no transaction, not bounced) and the log says why and
    what to do. The smarthost's password over TLS nobody checked goes to whoever answers for
    the name."""
    smarthost = internet.receivers["smarthost"]
    smarthost.set_script(smarthost_script(internet.cert, internet.key, ["PLAIN"]))
    try:
        auth = tmp_path / "relay-auth"
        auth.write_text(f"{SMARTHOST_USER}:{SMARTHOST_PASSWORD}\n")
        auth.chmod(0o600)
        earlier = len(smarthost.events())  # (the receiver is the module's: other tests' too)
        m = mailerd_factory("--relayhost", "smarthost.test:587", "--relay-auth", str(auth))
        rcpt = f"{token('unverified')}@pref.test"
        sub = m.submit(m.add_user(token("alice")), [rcpt], subject="unverified smarthost")
        m.wait_delivery(rcpt, "deferred")
        ours = smarthost.events()[earlier:]
        assert any(e["event"] == "connect" for e in ours), smarthost.summary()
        assert not [e for e in ours if e["event"] in ("AUTH", "AUTH-RESULT", "MAIL")], (
            f"the password went to an unverified smarthost:\n{smarthost.summary()}"
        )
        assert not smarthost.delivered(rcpt)
        lines = m.log_text()
        assert f"{sub.queue_id}: certificate verification failed for smarthost.test" in lines
        assert "--outbound-tls encrypt sends it without that check" in lines
        assert "bounced" not in m.statuses(rcpt)
        assert m.in_queue(sub.queue_id)
    finally:
        smarthost.set_script(smarthost_script(internet.cert, internet.key))


# --------------------------------------------------------------------------------------------
# A tar-pit MX
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "slow_messages,limits",
    [
        pytest.param(1, (), id="one-slow-message"),
        pytest.param(5, ("--max-outbound", "3", "--max-per-domain", "2"), id="slow-backlog"),
    ],
)
def test_tarpit_does_not_delay_other_domains(
    internet: Internet, mailerd_factory, slow_messages, limits
):
    """slow.test's MX accepts TCP and says nothing. Mail for pref.test sent after it (even
    with more slow.test mail queued than --max-outbound) must still arrive within seconds."""
    tarpit = internet.start_receiver("tarpit", f"{TARPIT}:25", {"tarpit": True})
    m = None
    try:
        m = mailerd_factory(*limits, name="tarpitted")
        sender = m.add_user(token("alice"))
        for _ in range(slow_messages):
            m.submit(sender, [f"{token('slow')}@slow.test"], subject="to the tar-pit")
        expected = min(slow_messages, 2 if limits else slow_messages)
        assert wait_until(lambda: tarpit.connections() >= expected, 10), tarpit.summary()
        rcpt = f"{token('fast')}@pref.test"
        start = time.monotonic()
        m.submit(sender, [rcpt], subject="must not wait for the tar-pit")
        wait_delivered(internet, rcpt, "mx1", m, timeout=25)
        took = time.monotonic() - start
        assert took < 5.0, f"pref.test mail waited {took:.1f}s behind the tar-pit"
    finally:
        tarpit.stop()  # closes the held connections, so mailerd can stop promptly
        if m is not None:
            m.stop()


# --------------------------------------------------------------------------------------------
# Address families
# --------------------------------------------------------------------------------------------


def test_outbound_ip_ipv4_skips_ipv6_only_mx(internet: Internet, mailerd_factory):
    m = mailerd_factory("--outbound-ip", "ipv4")
    user = token("alice")
    sender = m.add_user(user)
    v6 = f"{token('v6')}@v6only.test"
    dual = f"{token('dual')}@dual.test"
    sub = m.submit(sender, [v6], subject="v6 only, ipv4 allowed")
    m.submit(sender, [dual], subject="dual, ipv4 allowed")
    wait_delivered(internet, dual, "mx1", m)
    assert_exactly_once(internet, dual, "mx1")
    assert not internet.receivers["mx6"].rcpt_events(dual), "IPv6 used despite --outbound-ip ipv4"
    first = wait_until(lambda: m.deliveries(v6), DELIVERY_TIMEOUT)
    assert first, m.log_tail()
    time.sleep(QUIET)
    assert not internet.rcpts_anywhere(v6), "an IPv6-only MX was reached over ... something"
    statuses = m.statuses(v6)
    assert statuses and set(statuses) == {"deferred"}, (
        f"no usable address family is a reason to wait, not to bounce: {statuses}"
    )
    assert m.in_queue(sub.queue_id)
    assert m.mailbox(user) == []


# --------------------------------------------------------------------------------------------
# DNS trouble and the queue command (a mailerd that retries only after an hour)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patient(internet: Internet, tmp_path_factory):
    base = tmp_path_factory.mktemp("patient")
    m = Mailerd(internet.netns, base, port=2599, untrusted="none", retry_after="1h", name="patient")
    m.start()
    yield m
    finish_or_fail(m)


@pytest.mark.parametrize(
    "domain,timeout",
    [
        pytest.param("dnsfail.test", 10, id="servfail"),
        pytest.param("dnsslow.test", 30, id="timeout"),
    ],
)
def test_dns_trouble_defers(internet: Internet, patient: Mailerd, domain, timeout):
    user = token("alice")
    rcpt = f"{token('dns')}@{domain}"
    sub = patient.submit(patient.add_user(user), [rcpt], subject="dns trouble")
    line = patient.wait_delivery(rcpt, "deferred", timeout=timeout)
    assert line["reply"].startswith("4"), line["line"]
    r = wait_attempted(patient, sub.queue_id, rcpt)
    assert r and r["state"] == "pending" and r["attempts"] == 1, r
    assert patient.mailbox(user) == [], "a DNS failure must not bounce"


def test_queue_list(internet: Internet, patient: Mailerd):
    sender = patient.add_user(token("alice"))
    rcpt = f"{token('held')}@hold.test"
    sub = patient.submit(sender, [rcpt], subject="held")
    patient.wait_delivery(rcpt, "deferred")
    env = patient.envelope(sub.queue_id)
    assert env is not None, "a deferred message must have its envelope in <queue>/env/<id>"
    assert patient.msg_path(sub.queue_id).exists()
    r = wait_attempted(patient, sub.queue_id, rcpt)
    assert r["state"] == "pending" and r["attempts"] == 1, r
    assert "451" in r["last_error"] and "mx2 is holding mail" in r["last_error"], r
    assert env["sender"] == sender
    proc = patient.queue_cli()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert sub.queue_id in out, out
    block = out[out.index(sub.queue_id) :]
    assert f"<{sender}>" in block.split("\n", 1)[0], out
    assert rcpt in block and "451" in block, f"recipient and last error missing:\n{out}"


def test_queue_flush(internet: Internet, patient: Mailerd):
    """flush.test: mx2 says 451 once. With --retry-after 1h only a flush gets it through."""
    rcpt = f"{token('fl')}@flush.test"
    sub = patient.submit(patient.add_user(token("alice")), [rcpt], subject="flush me")
    patient.wait_delivery(rcpt, "deferred")
    time.sleep(1.5)
    assert not internet.delivered_anywhere(rcpt), "retried long before --retry-after 1h"
    proc = patient.queue_cli("flush")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    t = wait_delivered(internet, rcpt, "mx2", patient, timeout=10)
    check_relayed_copy(t, sub, [rcpt])
    assert_exactly_once(internet, rcpt, "mx2")
    assert patient.statuses(rcpt) == ["deferred", "sent"], patient.statuses(rcpt)
    wait_gone_from_queue(patient, sub.queue_id)


def test_queue_delete(internet: Internet, patient: Mailerd):
    rcpt = f"{token('del')}@hold.test"
    keep = f"{token('keep')}@hold.test"
    sender = patient.add_user(token("alice"))
    sub = patient.submit(sender, [rcpt], subject="delete me")
    other = patient.submit(sender, [keep], subject="keep me")
    patient.wait_delivery(rcpt, "deferred")
    patient.wait_delivery(keep, "deferred")
    proc = patient.queue_cli("delete", sub.queue_id)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert not patient.in_queue(sub.queue_id), "env/msg files must be removed"
    assert patient.in_queue(other.queue_id), "delete removed the wrong message"
    listing = patient.queue_cli()
    assert sub.queue_id not in listing.stdout and other.queue_id in listing.stdout, listing.stdout
    tries = len(internet.receivers["mx2"].rcpt_events(rcpt))
    flushed = patient.queue_cli("flush")
    assert flushed.returncode == 0, flushed.stderr
    wait_until(lambda: len(internet.receivers["mx2"].rcpt_events(keep)) >= 2, 10)
    assert len(internet.receivers["mx2"].rcpt_events(keep)) >= 2, "flush did not retry"
    assert len(internet.receivers["mx2"].rcpt_events(rcpt)) == tries, (
        "a deleted message was tried again"
    )
    missing = patient.queue_cli("delete", "NOSUCHID")
    assert missing.returncode != 0, "deleting an unknown id must fail"


# --------------------------------------------------------------------------------------------
# Delay warnings and expiry
# --------------------------------------------------------------------------------------------


def test_delay_warning_once(internet: Internet, mailerd_factory):
    m = mailerd_factory("--delay-warning", "2s")
    user = token("alice")
    rcpt = f"{token('late')}@hold.test"
    sub = m.submit(m.add_user(user), [rcpt], subject="slow going")
    dsn = dsn_in(m, user)
    block = dsn.recipients.get(rcpt)
    assert block is not None, dsn.text
    assert block["Action"].strip().lower() == "delayed", block.as_string()
    assert block["Status"].strip().startswith("4."), block.as_string()
    check_original_headers(dsn, sub)
    wait_until(lambda: len(m.deliveries(rcpt)) >= 4, 15)
    assert len(m.mailbox(user)) == 1, "the delay warning must be sent once"
    assert m.in_queue(sub.queue_id), "a delay warning does not end the retries"


def test_max_queue_time_bounces(internet: Internet, mailerd_factory):
    m = mailerd_factory("--max-queue-time", "3s", "--delay-warning", "0")
    user = token("alice")
    rcpt = f"{token('expire')}@hold.test"
    sub = m.submit(m.add_user(user), [rcpt], subject="expires")
    dsn = dsn_in(m, user)
    block = check_failed(dsn, rcpt, "5.4.7")
    assert "mx2 is holding mail" in dsn.text, "the last error should be quoted"
    assert block is not None
    assert m.statuses(rcpt)[-1] == "bounced", m.statuses(rcpt)
    wait_gone_from_queue(m, sub.queue_id)


def test_envelope_file_format(internet: Internet, patient: Mailerd):
    """<queue>/env/<id> is JSON with per-recipient state, attempts and last_error."""
    sender = patient.add_user(token("alice"))
    rcpt = f"{token('fmt')}@hold.test"
    sub = patient.submit(sender, [rcpt], subject="format")
    patient.wait_delivery(rcpt, "deferred")
    wait_attempted(patient, sub.queue_id, rcpt)
    raw = patient.env_path(sub.queue_id).read_bytes()
    env = json.loads(raw)
    assert env["sender"] == sender
    [r] = env["recipients"]
    assert r["address"] == rcpt and r["state"] == "pending" and r["attempts"] == 1
    assert r["last_error"].startswith("451"), r
    msg = patient.msg_path(sub.queue_id).read_bytes()
    assert msg.startswith(b"Received: ") and msg.endswith(sub.body)

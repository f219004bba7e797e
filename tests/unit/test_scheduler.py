"""The outbound scheduler's decisions (delivery/scheduler.py), without network and without root.

A real `Scheduler` with a real `Queue` in tmp_path and a real Config; only two things are
stand-ins: the relay (a test calls `_settle` with the `relay.Result`s an attempt would have
returned) and `deliver_local` (a coroutine that records what would have gone into a mailbox).
DNS points at 127.0.0.1:9 (discard), and nothing here ever asks it, but for the one test of
--dns-timeout (a loopback socket that never answers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import email
import email.message
import email.policy
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest

from mailerd import aliases, config, signing, trace
from mailerd.commands import dkimkeys
from mailerd.delivery import dsn, relay
from mailerd.delivery.queue import DEBRIS_AGE, Queue, QueueItem, QueueWriteError, Recipient
from mailerd.delivery.scheduler import Group, Scheduler
from mailerd.delivery.secrets import NO_SECRETS, Secrets
from mailerd.names import Locality

HOSTNAME = "mx.example.org"
DOMAIN = "example.org"
RETRY = 60.0  # --retry-after
MAX_RETRY = 3600.0  # "doubling up to an hour"
QUEUE_TIME = 86400.0  # --max-queue-time
WARN_AFTER = 3600.0  # --delay-warning

HEAD = b"Received: from client.test by mx.example.org; Mon, 20 Nov 2023 10:00:00 +0000\r\n"
BODY = (
    b"From: <alice@example.org>\r\nSubject: the original subject\r\n"
    b"Message-ID: <orig@example.org>\r\n\r\nthe body, never returned in a bounce\r\n"
)

MX = ("mx1.example.net", "192.0.2.25")
OK = relay.Result(250, "2.0.0", "Ok: queued as 4711", *MX)
DEFER = relay.Result(451, "4.3.0", "mx1 is busy, try again later", *MX)
REJECT = relay.Result(550, "5.1.1", "<bob@example.net>: no such user here", *MX)

ALICE = f"alice@{DOMAIN}"  # a local sender: her mailbox exists
REMOTE_SENDER = "zed@example.net"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@dataclasses.dataclass
class Delivery:
    mailbox: str
    head: bytes
    body: bytes
    since: float | None


class Mailboxes:
    """The fake `deliver_local`: records every call; `fail` makes the next calls raise."""

    def __init__(self) -> None:
        self.calls: list[Delivery] = []
        self.fail: Exception | None = None

    async def __call__(
        self, mailbox: str, head: bytes, body: bytes | int, since: float | None = None
    ) -> int:
        if self.fail is not None:
            raise self.fail
        assert isinstance(body, bytes)
        self.calls.append(Delivery(mailbox, head, body, since))
        return len(self.calls)

    def to(self, mailbox: str) -> list[Delivery]:
        return [c for c in self.calls if c.mailbox == mailbox]


@dataclasses.dataclass
class World:
    cfg: config.Config
    queue: Queue
    sched: Scheduler
    boxes: Mailboxes

    def queued(
        self, sender: str, rcpts: list[str | Recipient], age: float = 0.0, **fields
    ) -> QueueItem:
        """A committed item, on disk and known to the scheduler, created `age` seconds ago."""
        item = QueueItem(
            trace.new_id(),
            sender,
            [r if isinstance(r, Recipient) else Recipient(r) for r in rcpts],
            created=time.time() - age,
            **fields,
        )
        self.queue.put(item, HEAD, BODY)
        self.sched.add(item)
        return item

    def settle(self, item: QueueItem, results: dict[str, relay.Result]) -> tuple[float, float]:
        """One attempt's results, recorded as `_attempt` records them; the time bounds."""
        pending = [r for r in item.recipients if r.state == "pending"]
        before = time.time()
        run(self.sched._settle(item, pending, results))
        return before, time.time()

    def notices_queued(self) -> list[QueueItem]:
        """Items on disk with the null sender: notices queued for a remote address."""
        found = [self.queue.read(i) for i in sorted(self.queue.ids())]
        return [item for item in found if item is not None and item.sender == ""]

    def on_disk(self, item: QueueItem) -> QueueItem | None:
        return self.queue.read(item.id)


@pytest.fixture
def make_world(tmp_path) -> Callable[..., World]:
    made: list[Scheduler] = []

    def make(
        *extra: str,
        alias_text: str | None = None,
        own_addresses: frozenset[str] = frozenset(),
        secrets: Secrets = NO_SECRETS,
    ) -> World:
        base = tmp_path / f"w{len(made)}"
        (base / "spool" / "alice").mkdir(parents=True)
        (base / "spool" / "bob").mkdir()
        ini = base / "mailerd.conf"  # never the machine's /etc/mailerd/mailerd.conf
        ini.write_text("[mailerd]\n")
        cfg = config.load(
            [
                *("-c", str(ini), "-s", str(base / "spool"), "-q", str(base / "queue")),
                *("-d", DOMAIN, "-H", HOSTNAME, "-l", "127.0.0.1:2525", "-n", "none", "-w", "1"),
                *("--dns-server", "127.0.0.1:9", "--retry-after", f"{RETRY:g}s"),
                *("--max-queue-time", f"{QUEUE_TIME:g}s", "--delay-warning", f"{WARN_AFTER:g}s"),
                *extra,
            ]
        )
        if alias_text is not None:
            entries, problems = aliases.parse(alias_text)
            assert not problems
            cfg = dataclasses.replace(cfg, aliases=aliases.build(entries, Locality(cfg.domains)))
        cfg = dataclasses.replace(cfg, own_addresses=own_addresses)  # (load_files reads them)
        queue = Queue(cfg.queue)
        queue.create_dirs()
        boxes = Mailboxes()
        sched = Scheduler(cfg, queue, boxes, secrets)
        made.append(sched)
        return World(cfg, queue, sched, boxes)

    yield make
    for sched in made:
        sched.pool.shutdown(wait=False)


@pytest.fixture
def w(make_world) -> World:
    return make_world()


@dataclasses.dataclass
class Report:
    msg: email.message.Message
    per_recipient: dict[str, email.message.Message]  # Final-Recipient address → its fields
    human: str
    returned: str  # the text/rfc822-headers part


def parse_report(raw: bytes) -> Report:
    """An RFC 3464 report, with the structure every DSN must have checked."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", raw[:500]
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOSTNAME}>"
    human, status, headers = msg.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    blocks = status.get_payload()
    recipients = {}
    for block in blocks[1:]:
        kind, _, address = block["Final-Recipient"].partition(";")
        assert kind.strip() == "rfc822"
        assert address.strip() not in recipients, f"{address.strip()} reported twice"
        recipients[address.strip()] = block
    return Report(msg, recipients, human.get_payload(), headers.get_payload())


def assert_bounce(raw: bytes, to: str, failed: dict[str, str]) -> Report:
    """`raw` is a bounce to `to` for exactly the recipients of `failed` (address → status)."""
    report = parse_report(raw)
    assert report.msg["To"] == f"<{to}>"
    assert report.msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert set(report.per_recipient) == set(failed)
    for address, status in failed.items():
        assert report.per_recipient[address]["Action"] == "failed"
        assert report.per_recipient[address]["Status"] == status
    assert "Subject: the original subject" in report.returned
    assert "never returned" not in report.returned
    return report


def backoff_base(attempts: int, retry: float = RETRY) -> float:
    """What the README promises before jitter: --retry-after, doubling, at most an hour."""
    return min(retry * 2 ** max(attempts - 1, 0), MAX_RETRY)


def assert_next_attempt(item: QueueItem, attempts: int, before: float, after: float) -> None:
    base = backoff_base(attempts)
    low, high = before + 0.9 * base, after + 1.1 * base
    assert low <= item.next_attempt <= high, (
        f"next attempt in {item.next_attempt - before:.1f}s, not {base:g}s ±10 %"
    )


# -- backoff ----------------------------------------------------------------------------------


@pytest.mark.parametrize("retry", [RETRY, 1.0])
def test_backoff_doubles_from_retry_after_up_to_an_hour_with_jitter(make_world, retry):
    sched = make_world("--retry-after", f"{retry:g}s").sched
    for attempts in [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 20, 100]:
        base = backoff_base(attempts, retry)
        delays = [sched.backoff(attempts) for _ in range(200)]
        assert all(0.9 * base <= d <= 1.1 * base for d in delays), (attempts, base, delays[:5])
        assert min(delays) >= 0.9 * retry  # never below the first retry
        assert max(delays) <= 1.1 * MAX_RETRY  # never above the cap


def test_backoff_jitter_spreads_the_retries(w):
    delays = [w.sched.backoff(3) for _ in range(1000)]
    base = 4 * RETRY
    assert min(delays) < 0.95 * base and max(delays) > 1.05 * base
    assert len(set(delays)) > 900


def test_backoff_after_very_many_attempts_is_still_an_hour(w):
    assert 0.9 * MAX_RETRY <= w.sched.backoff(1100) <= 1.1 * MAX_RETRY


# -- _settle: one result each -----------------------------------------------------------------


def test_a_2xx_marks_sent_and_removes_the_item(w):
    item = w.queued(ALICE, ["bob@example.net"])
    w.settle(item, {"bob@example.net": OK})
    assert item.recipients[0].state == "sent"
    assert item.recipients[0].attempts == 1 and item.recipients[0].last_error == ""
    assert item.id not in w.sched.items
    assert w.queue.ids() == set() and not w.queue.message_path(item.id).exists()
    assert w.boxes.calls == []


def test_a_2xx_keeps_the_item_while_another_recipient_is_pending(w):
    item = w.queued(ALICE, ["bob@example.net", "carol@example.com"])
    before, after = w.settle(item, {"bob@example.net": OK})  # carol's group gave no result
    bob, carol = item.recipients
    assert (bob.state, carol.state) == ("sent", "pending")
    assert carol.attempts == 0
    assert w.sched.items[item.id] is item
    assert w.on_disk(item) == item
    assert w.queue.message_path(item.id).read_bytes() == HEAD + BODY
    assert_next_attempt(item, 1, before, after)


def test_a_4xx_defers_with_backoff(w):
    item = w.queued(ALICE, ["bob@example.net"])
    before, after = w.settle(item, {"bob@example.net": DEFER})
    bob = item.recipients[0]
    assert bob.state == "pending"
    assert bob.attempts == 1
    assert bob.last_error == "451 4.3.0 mx1 is busy, try again later"
    assert_next_attempt(item, 1, before, after)
    assert w.on_disk(item) == item  # written before the next attempt
    assert w.sched.items[item.id] is item
    assert w.boxes.calls == [] and w.notices_queued() == []  # no warning this early


def test_each_4xx_doubles_the_wait(w):
    item = w.queued(ALICE, ["bob@example.net"])
    for attempts in range(1, 9):
        before, after = w.settle(item, {"bob@example.net": DEFER})
        assert item.recipients[0].attempts == attempts
        assert_next_attempt(item, attempts, before, after)
        assert w.on_disk(item).next_attempt == item.next_attempt
    assert item.next_attempt - time.time() > 0.9 * MAX_RETRY  # capped, not below


def test_a_5xx_bounces_to_a_local_sender_s_mailbox(w):
    item = w.queued(ALICE, ["bob@example.net"])
    w.settle(item, {"bob@example.net": REJECT})
    assert item.recipients[0].state == "bounced"
    assert item.recipients[0].last_error == REJECT.line()
    assert item.id not in w.sched.items and w.queue.ids() == set()
    [notice] = w.boxes.calls
    assert notice.mailbox == "alice"
    assert notice.head == b"Return-Path: <>\r\n"
    report = assert_bounce(notice.body, ALICE, {"bob@example.net": "5.1.1"})
    block = report.per_recipient["bob@example.net"]
    assert block["Remote-MTA"] == "dns; mx1.example.net"
    assert block["Diagnostic-Code"] == f"smtp; {REJECT.line()}"
    assert "no such user here" in report.human
    assert w.notices_queued() == []


def test_a_bounce_to_a_sender_at_an_address_literal_of_ours_goes_to_the_mailbox(make_world):
    """A local program's sender alice@[192.0.2.1], one of our addresses: the bounce is hers
    (relayed to the literal, it loops back to us, and a bounce's bounce is dropped)."""
    w = make_world(own_addresses=frozenset({"192.0.2.1"}))
    item = w.queued("alice@[192.0.2.1]", ["bob@example.net"])
    w.settle(item, {"bob@example.net": REJECT})
    [notice] = w.boxes.calls
    assert notice.mailbox == "alice" and w.notices_queued() == []


def test_a_5xx_bounce_to_a_remote_sender_is_queued_from_the_null_sender(w):
    item = w.queued(REMOTE_SENDER, ["bob@example.net"])
    w.settle(item, {"bob@example.net": REJECT})
    assert w.boxes.calls == []
    [notice] = w.notices_queued()
    assert notice.recipients == [Recipient(REMOTE_SENDER)]
    assert notice.id in w.sched.items  # and the scheduler will attempt it
    assert w.queue.ids() == {notice.id}  # the bounced item itself is gone
    assert_bounce(
        w.queue.message_path(notice.id).read_bytes(), REMOTE_SENDER, {"bob@example.net": "5.1.1"}
    )


def test_a_bounce_to_a_remote_sender_is_dkim_signed_for_the_host_name_s_domain(
    make_world, tmp_path
):
    """Its From: is MAILER-DAEMON@mx.example.org and its MAIL FROM empty: a signature by
    example.org's key (relaxed alignment) is what receivers can pass it on; one to a local
    sender's mailbox stays unsigned, as all local copies do."""
    path = tmp_path / "example.org.s1.key"
    dkimkeys.write_key(str(path), dkimkeys.new_key("ed25519", 0))
    key = signing.load_key(DOMAIN, "s1", str(path))
    w = make_world(secrets=Secrets(dkim_keys=(key,)))
    item = w.queued(REMOTE_SENDER, ["bob@example.net"])
    w.settle(item, {"bob@example.net": REJECT})
    [notice] = w.notices_queued()
    raw = w.queue.message_path(notice.id).read_bytes()
    assert raw.startswith(b"DKIM-Signature:") and b" d=example.org;" in raw.split(b"\r\n\r\n")[0]
    record = {f"{key.dns_name}.".encode(): key.dns_record().encode()}
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: record.get(name))
    assert_bounce(raw, REMOTE_SENDER, {"bob@example.net": "5.1.1"})

    local = w.queued(ALICE, ["bob@example.net"])
    w.settle(local, {"bob@example.net": REJECT})
    [delivered] = w.boxes.calls
    assert b"DKIM-Signature" not in delivered.body


def test_mail_from_the_null_sender_is_never_bounced(w):
    item = w.queued("", ["bob@example.net"])
    w.settle(item, {"bob@example.net": REJECT})
    assert item.recipients[0].state == "bounced"
    assert w.boxes.calls == []
    assert w.queue.ids() == set() and w.sched.items == {}


def test_a_4xx_after_the_max_queue_time_bounces_as_expired(w):
    item = w.queued(ALICE, ["bob@example.net"], age=QUEUE_TIME + 10)
    w.settle(item, {"bob@example.net": DEFER})
    assert item.recipients[0].state == "bounced"
    assert w.queue.ids() == set() and item.id not in w.sched.items
    [notice] = w.boxes.calls  # the bounce only: no delay warning on top
    report = assert_bounce(notice.body, ALICE, {"bob@example.net": "5.4.7"})
    diagnostic = " ".join(report.per_recipient["bob@example.net"]["Diagnostic-Code"].split())
    assert "delivery time expired" in diagnostic
    assert DEFER.line() in diagnostic  # the last error is quoted


def test_a_4xx_shortly_before_the_max_queue_time_still_defers(w):
    item = w.queued("", ["bob@example.net"], age=QUEUE_TIME - 60)
    w.settle(item, {"bob@example.net": DEFER})
    assert item.recipients[0].state == "pending"
    assert w.on_disk(item).recipients[0].state == "pending"


# -- delay warnings ---------------------------------------------------------------------------


def test_the_delay_warning_goes_out_once(w):
    item = w.queued(ALICE, ["bob@example.net"], age=WARN_AFTER + 10)
    w.settle(item, {"bob@example.net": DEFER})
    assert item.recipients[0].state == "pending"
    assert item.warned and w.on_disk(item).warned
    [warning] = w.boxes.calls
    assert warning.mailbox == "alice" and warning.head == b"Return-Path: <>\r\n"
    report = parse_report(warning.body)
    assert report.msg["Subject"] == "Delayed Mail (still being retried)"
    assert report.msg["To"] == f"<{ALICE}>"
    assert report.per_recipient["bob@example.net"]["Action"] == "delayed"
    assert report.per_recipient["bob@example.net"]["Status"] == "4.3.0"
    # The next deferral says nothing more.
    w.settle(item, {"bob@example.net": DEFER})
    assert len(w.boxes.calls) == 1
    assert item.recipients[0].attempts == 2


@pytest.mark.parametrize("said_by_the_host", [True, False], ids=["host", "ours"])
def test_a_delay_warning_tells_whose_the_last_error_was(w, said_by_the_host):
    """A host's 451 is quoted as its reply; a connection mailerd could not make is told as
    mailerd's own finding, without a code, as a bounce tells it (RFC 3464 2.3.6: "smtp" is
    for a reply an SMTP server sent; the warning said "smtp; 451 4.4.1 connect to ...")."""
    refused = relay.Result(451, "4.4.1", "connect to mx1.example.net[192.0.2.1]:25: refused")
    result = DEFER if said_by_the_host else dataclasses.replace(refused, ours=True)
    item = w.queued(ALICE, ["bob@example.net"], age=WARN_AFTER - 10)
    w.settle(item, {"bob@example.net": result})
    assert w.boxes.calls == []
    item = w.on_disk(item)  # (whose it was is kept with the envelope, for the next attempt)
    item.created -= 20
    w.sched.items[item.id] = item
    w.settle(item, {})
    [warning] = w.boxes.calls
    block = parse_report(warning.body).per_recipient["bob@example.net"]
    diagnostic = " ".join(block["Diagnostic-Code"].split())
    if said_by_the_host:
        assert diagnostic == f"smtp; {DEFER.line()}"
    else:
        assert diagnostic == f"X-Mailerd; {refused.text}" and "Remote-MTA" not in block


def test_the_delay_warning_is_not_repeated_after_a_restart(w):
    item = w.queued(ALICE, ["bob@example.net"], age=WARN_AFTER + 10)
    w.settle(item, {"bob@example.net": DEFER})
    assert len(w.boxes.calls) == 1
    # A new scheduler on the same queue (a restart) knows the warning went out.
    boxes = Mailboxes()
    sched = Scheduler(w.cfg, w.queue, boxes)
    try:
        sched.load(w.queue.load())
        [loaded] = sched.items.values()
        run(sched._settle(loaded, loaded.recipients, {"bob@example.net": DEFER}))
    finally:
        sched.pool.shutdown(wait=False)
    assert boxes.calls == []


def test_no_delay_warning_before_the_delay(w):
    item = w.queued(ALICE, ["bob@example.net"], age=WARN_AFTER - 60)
    w.settle(item, {"bob@example.net": DEFER})
    assert w.boxes.calls == [] and not item.warned


def test_no_delay_warning_for_the_null_sender(w):
    item = w.queued("", ["bob@example.net"], age=WARN_AFTER + 10)
    for _ in range(2):
        w.settle(item, {"bob@example.net": DEFER})
    assert w.boxes.calls == []
    assert w.queue.ids() == {item.id}  # no notice queued either
    assert not w.on_disk(item).warned


def test_no_delay_warning_when_disabled(make_world):
    w = make_world("--delay-warning", "0")
    item = w.queued(ALICE, ["bob@example.net"], age=QUEUE_TIME - 60)
    w.settle(item, {"bob@example.net": DEFER})
    assert w.boxes.calls == []


def test_a_delay_warning_to_a_remote_sender_is_queued(w):
    item = w.queued(REMOTE_SENDER, ["bob@example.net"], age=WARN_AFTER + 10)
    w.settle(item, {"bob@example.net": DEFER})
    [notice] = w.notices_queued()
    assert notice.recipients == [Recipient(REMOTE_SENDER)]
    report = parse_report(w.queue.message_path(notice.id).read_bytes())
    assert report.per_recipient["bob@example.net"]["Action"] == "delayed"


# -- mixed results ----------------------------------------------------------------------------


def test_sent_deferred_and_bounced_leave_exactly_the_deferred_one_pending(w):
    sent, deferred, bounced = "ann@example.net", "bea@example.com", "bob@example.net"
    item = w.queued(ALICE, [sent, deferred, bounced])
    before, after = w.settle(item, {sent: OK, deferred: DEFER, bounced: REJECT})
    states = {r.address: r.state for r in item.recipients}
    assert states == {sent: "sent", deferred: "pending", bounced: "bounced"}
    assert [r.address for r in w.on_disk(item).recipients if r.state == "pending"] == [deferred]
    assert w.on_disk(item) == item
    assert w.sched.items[item.id] is item
    assert_next_attempt(item, 1, before, after)
    [notice] = w.boxes.calls  # a bounce for the refused one only
    assert_bounce(notice.body, ALICE, {bounced: "5.1.1"})
    # The next attempt is for the deferred one alone; once it is sent, the item goes.
    pending = [r for r in item.recipients if r.state == "pending"]
    assert [r.address for r in pending] == [deferred]
    w.settle(item, {deferred: OK})
    assert w.queue.ids() == set() and item.id not in w.sched.items
    assert len(w.boxes.calls) == 1


# -- refuse -----------------------------------------------------------------------------------

REFUSED = dsn.RecipientStatus(
    f"nosuch@{DOMAIN}", "failed", "5.1.1", "550 5.1.1 No such user here", None
)


def refused_recipient() -> Recipient:
    return Recipient(REFUSED.address, None, "bounced", 0, REFUSED.diagnostic)


def test_refuse_bounces_and_removes_an_item_with_nothing_left(w):
    item = w.queued(ALICE, [refused_recipient()])
    run(w.sched.refuse(item, [REFUSED]))
    [notice] = w.boxes.calls
    assert notice.mailbox == "alice"
    report = assert_bounce(notice.body, ALICE, {REFUSED.address: "5.1.1"})
    assert "Remote-MTA" not in report.per_recipient[REFUSED.address]
    assert w.queue.ids() == set() and item.id not in w.sched.items


def test_refuse_keeps_an_item_with_recipients_still_pending(w):
    item = w.queued(REMOTE_SENDER, [refused_recipient(), "bob@example.net"])
    run(w.sched.refuse(item, [REFUSED]))
    assert w.boxes.calls == []
    [notice] = [n for n in w.notices_queued() if n.id != item.id]
    assert notice.recipients == [Recipient(REMOTE_SENDER)]
    assert_bounce(
        w.queue.message_path(notice.id).read_bytes(), REMOTE_SENDER, {REFUSED.address: "5.1.1"}
    )
    assert w.on_disk(item) == item and w.sched.items[item.id] is item


def test_refuse_never_bounces_to_the_null_sender(w):
    item = w.queued("", [refused_recipient()])
    run(w.sched.refuse(item, [REFUSED]))
    assert w.boxes.calls == []
    assert w.queue.ids() == set() and w.sched.items == {}


# -- submit_notice: where a notice to a local address goes ------------------------------------

ALIASES = """
root: alice
team: alice, bob,
      carol@example.net
"""
NOTICE = b"Subject: a notice\r\n\r\ntext\r\n"


def test_a_notice_follows_the_aliases(make_world):
    w = make_world(alias_text=ALIASES)
    run(w.sched.submit_notice(f"root@{DOMAIN}", NOTICE, False))
    assert [(c.mailbox, c.head, c.body) for c in w.boxes.calls] == [
        ("alice", b"Return-Path: <>\r\n", NOTICE)
    ]
    assert w.notices_queued() == []


def test_a_notice_to_an_alias_with_a_remote_target_is_queued_for_it(make_world):
    w = make_world(alias_text=ALIASES)
    run(w.sched.submit_notice(f"Team@{DOMAIN}", NOTICE, False))
    assert sorted(c.mailbox for c in w.boxes.calls) == ["alice", "bob"]
    [forwarded] = w.notices_queued()
    assert forwarded.recipients == [Recipient("carol@example.net")]
    assert w.queue.message_path(forwarded.id).read_bytes() == NOTICE


def test_a_notice_to_an_unknown_local_name_goes_to_postmaster(make_world):
    w = make_world(alias_text=ALIASES)
    run(w.sched.submit_notice(f"nosuchuser-x7q@{DOMAIN}", NOTICE, False))
    assert [(c.mailbox, c.head, c.body) for c in w.boxes.calls] == [
        ("postmaster", b"Return-Path: <>\r\n", NOTICE)
    ]
    assert w.notices_queued() == []


def test_a_notice_to_an_unknown_local_name_follows_the_postmaster_alias(make_world):
    w = make_world(alias_text="postmaster: root\n" + ALIASES)
    run(w.sched.submit_notice(f"nosuchuser-x7q@{DOMAIN}", NOTICE, False))
    assert [c.mailbox for c in w.boxes.calls] == ["alice"]


def test_a_notice_the_writer_cannot_take_is_queued_for_a_local_retry(make_world):
    w = make_world(alias_text=ALIASES)
    w.boxes.fail = OSError("writer gone")
    run(w.sched.submit_notice(f"root@{DOMAIN}", NOTICE, False))
    [kept] = w.notices_queued()  # not lost: queued, to be written into alice's mailbox later
    [alice] = kept.recipients
    assert (alice.mailbox, alice.state) == ("alice", "pending")
    assert alice.last_error == "451 4.2.0 writer gone"
    assert w.queue.message_path(kept.id).read_bytes() == NOTICE
    w.boxes.fail = None
    run(w.sched._attempt(kept))
    [copy] = w.boxes.calls
    assert (copy.mailbox, copy.head, copy.body) == ("alice", b"Return-Path: <>\r\n", NOTICE)
    assert copy.since == kept.created  # its last_error says a copy may be there already
    assert w.queue.ids() == set()


# -- local retries (no relay involved) --------------------------------------------------------


def local_item(w: World, **fields) -> QueueItem:
    return w.queued(ALICE, [Recipient(f"bob@{DOMAIN}", mailbox="bob", **fields)])


def test_a_local_retry_writes_the_copy_and_removes_the_item(w):
    item = local_item(w)
    run(w.sched._attempt(item))
    [copy] = w.boxes.calls
    assert (copy.mailbox, copy.head, copy.body) == ("bob", trace.return_path(ALICE), HEAD + BODY)
    assert copy.since is None  # a first attempt: no copy can be there yet
    assert w.queue.ids() == set() and item.id not in w.sched.items


def test_an_alias_s_local_copies_keep_their_own_results(w):
    """Two copies for one address (the alias `team`, for alice and for bob, both to be
    retried): alice's failed while bob's went in. Keyed by the address alone, the last result
    was taken for both, and alice's copy was recorded as sent and dropped (a reviewer's pass)."""
    team = f"team@{DOMAIN}"
    item = w.queued(
        REMOTE_SENDER, [Recipient(team, mailbox="alice"), Recipient(team, mailbox="bob")]
    )
    delivered = w.boxes.__call__

    async def alice_fails(mailbox, head, body, since=None):
        if mailbox == "alice":
            raise OSError("No space left on device")
        await asyncio.sleep(0.05)  # (a copy after alice's: its answer was taken for hers)
        return await delivered(mailbox, head, body, since)

    w.sched.deliver_local = alice_fails
    run(w.sched._attempt(item))
    states = [(r.mailbox, r.state) for r in w.on_disk(item).recipients]
    assert states == [("alice", "pending"), ("bob", "sent")]
    assert [c.mailbox for c in w.boxes.calls] == ["bob"]


def test_an_alias_s_failed_local_copies_are_logged_by_mailbox_and_bounced_once(w, caplog):
    """The alias `team`'s copies for alice and bob both failed until they expired: each
    failure names its mailbox (two lines `to=<team@…>` that said the same could not be told
    apart), and the sender, who wrote to team, reads of team once in the notice."""
    team = f"team@{DOMAIN}"
    item = w.queued(
        ALICE,
        [Recipient(team, mailbox="alice"), Recipient(team, mailbox="bob")],
        age=QUEUE_TIME + 10,
    )
    delivered = w.boxes.__call__

    async def copies_fail(mailbox, head, body, since=None):
        if body == HEAD + BODY:  # (the notice to alice goes in)
            raise OSError("No space left on device")
        return await delivered(mailbox, head, body, since)

    w.sched.deliver_local = copies_fail
    with caplog.at_level(logging.INFO, logger="mailerd"):
        run(w.sched._attempt(item))
    lines = [r.getMessage() for r in caplog.records if f"to=<{team}>" in r.getMessage()]
    assert len(lines) == 2 and all("status=bounced" in line for line in lines), lines
    assert [("mailbox alice" in line, "mailbox bob" in line) for line in lines] == [
        (True, False),
        (False, True),
    ], lines
    [notice] = w.boxes.calls
    assert_bounce(notice.body, ALICE, {team: "5.4.7"})


def test_a_failed_local_retry_is_deferred_then_redelivered_as_such(w):
    item = local_item(w)
    w.boxes.fail = OSError("writer gone")
    before = time.time()
    run(w.sched._attempt(item))
    bob = item.recipients[0]
    assert bob.state == "pending" and bob.attempts == 1
    assert bob.last_error == "451 4.2.0 local delivery to mailbox bob failed: writer gone"
    assert_next_attempt(item, 1, before, time.time())
    assert w.on_disk(item) == item
    w.boxes.fail = None
    run(w.sched._attempt(item))
    [copy] = w.boxes.calls
    assert copy.since == item.created  # an earlier attempt may have written it already
    assert w.queue.ids() == set()


def test_a_recovered_local_item_is_redelivered_as_such(w):
    item = local_item(w)
    w.sched.items.clear()
    w.sched.load(w.queue.load())  # as after a crash
    run(w.sched._attempt(w.sched.items[item.id]))
    [copy] = w.boxes.calls
    assert copy.since == pytest.approx(item.created)


def _started(w: World, monkeypatch) -> list[str]:
    """The ids `Scheduler._start` is called with (nothing is attempted)."""
    started: list[str] = []
    monkeypatch.setattr(w.sched, "_start", lambda item: started.append(item.id))
    return started


def _item(w: World, next_attempt: float) -> QueueItem:
    item = QueueItem(trace.new_id(), ALICE, [Recipient("bob@example.net")])
    item.next_attempt = next_attempt
    w.sched.add(item)
    return item


def test_a_wake_up_starts_the_items_due_and_no_other(w, monkeypatch):
    started = _started(w, monkeypatch)
    now = time.time()
    due, later, gone, busy, flushed = (
        _item(w, t) for t in (now - 1, now + 60, now - 1, now - 1, now + 60)
    )
    w.sched.items.pop(gone.id)  # (delivered or removed meanwhile)
    w.sched.busy.add(busy.id)  # (being attempted: scheduled again when that is over)
    flushed.next_attempt = 0.0
    w.sched._schedule(flushed)
    moved = _item(w, now - 1)
    moved.next_attempt = now + 30  # (its attempt set a later time: the old entry is stale)
    w.sched._schedule(moved)
    w.sched._start_due(now)
    assert sorted(started) == sorted([due.id, flushed.id])
    w.sched._start_due(now)  # (each entry starts its item once)
    assert len(started) == 2
    w.sched._start_due(now + 61)
    assert sorted(started) == sorted([due.id, flushed.id, moved.id, later.id])


def test_an_item_is_due_again_at_the_time_its_attempt_set(w, monkeypatch):
    item = _item(w, 0.0)

    async def attempt(attempted: QueueItem) -> None:
        attempted.next_attempt = time.time() + 100

    monkeypatch.setattr(w.sched, "_attempt", attempt)
    w.sched.busy.add(item.id)
    run(w.sched._process(item))
    started = _started(w, monkeypatch)
    w.sched._start_due(time.time())
    assert started == []
    w.sched._start_due(time.time() + 101)
    assert started == [item.id]


def test_a_wake_up_costs_the_items_due_not_the_whole_queue(w, monkeypatch):
    """A big queue (a relay down for a day) is woken after every attempt: a wake-up must not
    walk all of it. (Walking 100,000 items took 23 ms a wake-up.)"""
    started = _started(w, monkeypatch)
    later = time.time() + 3600
    for _ in range(100_000):
        _item(w, later)
    began = time.process_time()
    for _ in range(1000):
        w.sched._start_due(time.time())
    assert time.process_time() - began < 1.0
    assert started == []


# -- DNS -------------------------------------------------------------------------------------


def test_an_mx_lookup_gives_up_after_the_dns_timeout(make_world):
    """--dns-timeout bounds the outbound MX lookups as it does the inbound ones: against a DNS
    server that never answers, the attempt is deferred after it (it took 10 s, the default)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        w = make_world("--dns-server", f"127.0.0.1:{port}", "--dns-timeout", "1s")
        item = w.queued(ALICE, ["bob@example.net"])
        began = time.monotonic()
        run(w.sched._attempt(item))
        took = time.monotonic() - began
    bob = item.recipients[0]
    assert bob.state == "pending" and bob.attempts == 1
    assert "4.4.3" in bob.last_error and "timed out" in bob.last_error
    assert 0.9 < took < 2.5


def test_an_attempt_tries_each_address_once_and_five_at_most():
    """An attacker's pass gave five MX hosts the same 40 addresses: one attempt made 200
    connections (and 300 addresses that swallow connections held one for 12 hours)."""
    from mailerd.delivery import relay, scheduler

    hops = [relay.Hop(f"mx{h}.test", f"192.0.2.{a}") for h in range(5) for a in range(40)]
    kept = scheduler._first_addresses(hops)
    assert [(h.host, h.address) for h in kept] == [("mx0.test", f"192.0.2.{a}") for a in range(5)]
    few = [relay.Hop("a.test", "192.0.2.1"), relay.Hop("b.test", "192.0.2.1")]
    few.append(relay.Hop("b.test", "2001:db8::1"))
    assert [h.address for h in scheduler._first_addresses(few)] == ["192.0.2.1", "2001:db8::1"]


def test_the_subdomains_of_one_domain_share_its_slots(make_world, monkeypatch):
    """The per-domain limit is the organisational domain's: twenty names under one domain of
    an attacker's (a wildcard MX that dripped its replies) held all the global slots."""
    w = make_world("--max-per-domain", "2")
    running, peak = 0, 0

    async def remote(item, smarthost, domain, mail_from, members, record):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return {}

    monkeypatch.setattr(w.sched, "_remote", remote)

    async def attempts(domains):
        nonlocal peak
        peak = 0
        await asyncio.gather(
            *(w.sched._attempt_group(None, Group("domain", d), [], None) for d in domains)
        )
        return peak

    assert run(attempts([f"a{n}.tar.test" for n in range(8)])) == 2
    assert run(attempts([f"a.tar{n}.test" for n in range(8)])) == 8
    assert run(attempts([f"x{n}.example.co.uk" for n in range(8)])) == 2


def test_no_slots_are_kept_for_the_domains_once_their_attempts_end(make_world, monkeypatch):
    """The delivery process lives for weeks where nobody reloads: a semaphore kept for each
    domain ever sent to was memory without bound (a soak's finding)."""
    w = make_world("--max-per-domain", "2")

    async def remote(item, smarthost, domain, mail_from, members, record):
        await asyncio.sleep(0.01)
        return {}

    monkeypatch.setattr(w.sched, "_remote", remote)

    async def attempts():
        await asyncio.gather(
            *(
                w.sched._attempt_group(None, Group("domain", f"d{n % 50}.test"), [], None)
                for n in range(200)
            )
        )

    run(attempts())
    assert len(w.sched.per_domain) == 0


def test_literals_take_the_slots_of_their_address_or_network():
    """Four spellings of one IPv6 literal held every thread, each "domain" with slots of its
    own (a sixth attacker's pass); IPv4 literals were keyed by their last two octets."""
    from mailerd.delivery.scheduler import _slot_key

    spellings = ["[IPv6:fd77::10]", "[IPv6:fd77:0::10]", "[IPv6:FD77::0:10]", "[ipv6:fd77::99]"]
    assert {_slot_key(s) for s in spellings} == {"fd77::/64"}
    assert _slot_key("[192.0.2.1]") == "192.0.2.1" != _slot_key("[10.9.2.1]")
    assert _slot_key("192.0.2.1") == "192.0.2.1"  # (a relayhost given as an address)
    assert _slot_key("a.b.example.co.uk") == "example.co.uk"


def test_a_groups_delivered_recipients_are_recorded_before_the_others_end(make_world, monkeypatch):
    """A recipient one domain took is written to the queue as sent when its group is done,
    while another domain's session goes on: a reload meanwhile sent it again (a sixth
    attacker's pass)."""
    w = make_world()
    item = w.queued("alice@example.org", ["a@fast.test", "b@slow.test"])
    slow_may_end = asyncio.Event()

    async def remote(item_, smarthost, domain, mail_from, members, record):
        if domain == "slow.test":
            await slow_may_end.wait()
            return {m.address: relay.Result(451, "4.4.2", "timed out") for m in members}
        return {m.address: relay.Result(250, "2.0.0", "Ok") for m in members}

    monkeypatch.setattr(w.sched, "_remote", remote)

    async def main():
        attempt = asyncio.create_task(w.sched._attempt(item))
        for _ in range(100):
            await asyncio.sleep(0.02)
            states = {r.address: r.state for r in w.on_disk(item).recipients}
            if states["a@fast.test"] == "sent":
                break
        assert states == {"a@fast.test": "sent", "b@slow.test": "pending"}
        slow_may_end.set()
        await attempt

    run(main())
    on_disk = {r.address: (r.state, r.attempts) for r in w.on_disk(item).recipients}
    assert on_disk == {"a@fast.test": ("sent", 1), "b@slow.test": ("pending", 1)}


async def two_mx_hops(domain: str, smarthost: bool) -> list[relay.Hop]:
    """`Scheduler._hops` for a domain with a primary and a backup MX."""
    return [relay.Hop("mx1.split.test", "192.0.2.25"), relay.Hop("mx2.split.test", "192.0.2.26")]


@pytest.mark.parametrize("stop", [False, True], ids=["next-host", "stop-began"])
def test_a_host_s_deliveries_are_on_disk_before_the_next_host_is_asked(
    make_world, monkeypatch, caplog, stop
):
    """The first MX took a@ and deferred b@ (per-recipient greylisting): a@ is written to the
    queue as sent, and logged, before the next MX is asked for b@ in the same attempt, so a
    stop or reload during that second session cannot send a@ again. Once a stop began, no
    next host is asked: b@ waits, pending, for the next scheduler."""
    w = make_world()
    item = w.queued(ALICE, ["a@split.test", "b@split.test"])
    on_disk_when_asked = []

    def attempt(hops, message: relay.Message, settings, record) -> dict[str, relay.Result]:
        w.sched.stopping = stop
        if not record({"a@split.test": OK}):
            return {"a@split.test": OK, "b@split.test": DEFER}
        on_disk_when_asked.append({r.address: r.state for r in w.on_disk(item).recipients})
        return {"a@split.test": OK, "b@split.test": dataclasses.replace(OK, host="mx2")}

    monkeypatch.setattr(w.sched, "_hops", two_mx_hops)
    monkeypatch.setattr(relay, "attempt", attempt)
    with caplog.at_level(logging.INFO, logger="mailerd"):
        run(w.sched._attempt(item))
    sent_lines = [r.getMessage() for r in caplog.records if "to=<a@split.test>" in r.getMessage()]
    assert len(sent_lines) == 1 and "status=sent" in sent_lines[0], sent_lines
    if stop:
        assert on_disk_when_asked == []
        left = {r.address: (r.state, r.attempts) for r in w.on_disk(item).recipients}
        assert left == {"a@split.test": ("sent", 1), "b@split.test": ("pending", 1)}
    else:
        assert on_disk_when_asked == [{"a@split.test": "sent", "b@split.test": "pending"}]
        assert w.on_disk(item) is None, "both delivered: the item is gone"


def test_no_next_host_is_asked_when_a_host_s_deliveries_cannot_be_recorded(
    make_world, monkeypatch, caplog
):
    """The queue cannot be written (a full disk) when the first MX took a@ and deferred b@:
    nobody else is asked for b@, since a stop during that session would send a@ again; a
    warning says so."""
    w = make_world()
    item = w.queued(ALICE, ["a@split.test", "b@split.test"])
    went_on = []

    def attempt(hops, message: relay.Message, settings, record) -> dict[str, relay.Result]:
        went_on.append(record({"a@split.test": OK}))
        return {"a@split.test": OK, "b@split.test": DEFER}

    def full(item_: QueueItem) -> None:
        raise QueueWriteError(28, "No space left on device")

    monkeypatch.setattr(w.sched, "_hops", two_mx_hops)
    monkeypatch.setattr(relay, "attempt", attempt)
    monkeypatch.setattr(w.queue, "update", full)
    with caplog.at_level(logging.INFO, logger="mailerd"), contextlib.suppress(QueueWriteError):
        run(w.sched._attempt(item))
    assert went_on == [False]
    assert any(
        f"{item.id}: not asking the next host now" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_destinations_are_looked_up_a_few_at_a_time(make_world, monkeypatch):
    """A hundred domains whose DNS never answers, each with 32 MX hosts asked at once, ran the
    delivery process out of descriptors (a sixth attacker's pass)."""
    from mailerd.delivery import mx, scheduler

    monkeypatch.setattr(scheduler, "LOOKUPS", 3)
    w = make_world()
    running, peak = 0, 0

    async def hops(domain, smarthost):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return mx.Failure(False, 451, "4.4.3", "no answer")

    monkeypatch.setattr(w.sched, "_hops", hops)
    item = w.queued("alice@example.org", [f"x@d{n}.test" for n in range(20)])
    run(w.sched._attempt(item))
    assert peak == 3


def test_with_a_wildcard_listener_every_interfaces_addresses_are_ours(make_world, monkeypatch):
    """Not only the default route's interface: an MX at another interface's address looped
    through a listener on 0.0.0.0 (a sixth attacker's pass). `ip` is the independent word;
    the default route is made the loopback's, so that the others count only as "others".
    (The master reads them, `config.load_files`; the scheduler takes its configuration's.)"""
    import ipaddress
    import subprocess

    from mailerd import host

    monkeypatch.setattr(host, "default_interface", lambda: "lo")

    listed = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    addresses = set()
    for fields in (line.split() for line in listed.splitlines()):
        address = ipaddress.ip_address(fields[3].split("/")[0])
        if not address.is_link_local:
            addresses.add(str(address))
    cfg = make_world("-l", "0.0.0.0:2526").cfg
    own = host.own_addresses([listen.host for listen in cfg.listeners])
    assert addresses and addresses <= own
    assert host.own_addresses(["127.0.0.1"]) < own  # (the loopback's, not the others)
    world = make_world("-l", "0.0.0.0:2526", own_addresses=own)
    assert world.sched.own_addresses == own


def test_every_interfaces_addresses_are_read_at_once(monkeypatch):
    """With a listener on a wildcard address the master reads every interface's addresses
    before it listens (own_addresses): one reading of them all, not one more for each
    interface (on a host of 2,000 interfaces the master took 67 s to start, where it took
    0.5 s before it read them). Each interface's link-local and IPv4-in-IPv6 ones still left."""
    import socket
    from types import SimpleNamespace

    import psutil

    from mailerd.host import own_addresses

    def entry(address: str):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return SimpleNamespace(family=family, address=address)

    interfaces = {f"veth{n}": [entry(f"10.{n // 250}.{n % 250}.1")] for n in range(500)}
    interfaces["eth0"] = [entry("fe80::1%eth0"), entry("::ffff:192.0.2.9"), entry("2001:db8::5")]
    readings = []

    def net_if_addrs() -> dict:
        readings.append(1)
        return interfaces

    monkeypatch.setattr(psutil, "net_if_addrs", net_if_addrs)
    own = own_addresses(["0.0.0.0"])
    assert len(readings) == 1
    assert {"10.0.0.1", "10.1.249.1", "2001:db8::5"} <= own and len(own - {"::1"}) == 502


@pytest.mark.parametrize(
    "relayhost, literal, address",
    [
        ("[2001:db8::25]:587", "[IPv6:2001:db8::25]", "2001:db8::25"),
        ("192.0.2.25:587", "[192.0.2.25]", "192.0.2.25"),
    ],
)
def test_a_relayhost_given_as_an_address_is_reached_there(make_world, relayhost, literal, address):
    """An IPv6 relayhost was made the literal [2001:db8::25], which RFC 5321 4.1.3 (and
    mx.parse_literal) reads as a bad IPv4 one: mail for it never left. No DNS is asked."""
    w = make_world("--relayhost", relayhost)
    hops = run(w.sched._hops(w.cfg.relayhost[0], True))
    assert hops == [relay.Hop(literal, address, 587)]


# -- the loop survives what one item or one turn meets ---------------------------------------


async def _running(w: World, until: Callable[[], bool], timeout: float = 5.0) -> asyncio.Task:
    """The scheduler's loop, run until `until()` holds (or `timeout`); the loop's task."""
    task = asyncio.create_task(w.sched.run())
    deadline = time.monotonic() + timeout
    while not until() and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return task


async def _stopped(w: World, task: asyncio.Task) -> None:
    alive = not task.done()
    await w.sched.stop(grace=1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert alive, f"the scheduler's loop ended: {task.exception()!r}"


def test_an_item_that_cannot_be_started_does_not_stop_the_others(w, monkeypatch, caplog):
    """A bug with one item (here: starting it raises) once ended the loop's task, and with it
    all outbound mail, while the process went on accepting (an attacker's pass, F3)."""
    now = time.time()
    bad, good = _item(w, now - 2), _item(w, now - 1)  # (the bad one comes up first)
    started: list[str] = []

    def start(item: QueueItem) -> None:
        if item.id == bad.id:
            raise TypeError("a bug with this item")
        started.append(item.id)

    monkeypatch.setattr(w.sched, "_start", start)

    async def main() -> None:
        task = await _running(w, lambda: good.id in started)
        await _stopped(w, task)

    run(main())
    assert started == [good.id]
    assert bad.next_attempt >= now + RETRY - 1, "the bad one waits its retry, not a busy loop"
    assert bad.id not in w.sched.busy
    assert sum(bad.id in r.getMessage() and r.exc_info is not None for r in caplog.records) == 1


def test_a_turn_of_the_loop_that_fails_is_logged_and_the_loop_goes_on(w, monkeypatch, caplog):
    from mailerd.delivery import scheduler

    monkeypatch.setattr(scheduler, "RESCAN_INTERVAL", 0.01)
    monkeypatch.setattr(scheduler, "LOOP_PAUSE", 0.01)

    async def rescan() -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(w.sched, "rescan", rescan)
    started = _started(w, monkeypatch)

    async def main() -> None:
        task = await _running(w, w.sched.ready.is_set)
        await asyncio.sleep(0.2)  # (many turns, each failing its rescan)
        item = _item(w, 0.0)
        await _running_until(lambda: item.id in started)
        await _stopped(w, task)

    run(main())
    assert len(started) == 1
    failures = [r for r in caplog.records if "the scheduler's loop failed" in r.getMessage()]
    assert len(failures) == 1, "the same failure's traceback once, not at every turn"


def test_a_running_scheduler_removes_the_queues_crash_debris_once_it_is_old(w, monkeypatch):
    """A kill between a remove()'s two unlinks leaves the message of a delivered item (the
    chaos test met one); only the load at a start removed such debris, so a daemon that then
    ran for months kept it. The running scheduler looks again every CLEAN_INTERVAL."""
    from mailerd.delivery import scheduler

    monkeypatch.setattr(scheduler, "CLEAN_INTERVAL", 0.05)
    monkeypatch.setattr(scheduler, "RESCAN_INTERVAL", 0.01)
    msg_dir = w.queue.root / "msg"

    def debris(name: str, seconds_ago: float) -> Path:
        path = msg_dir / name
        path.write_bytes(HEAD)
        when = time.time() - seconds_ago
        os.utime(path, (when, when))
        return path

    async def main() -> tuple[Path, Path]:
        task = await _running(w, w.sched.ready.is_set)
        old = debris("1OLDDEBRIS", DEBRIS_AGE + 60)  # (made after the load's own clean)
        young = debris("1YOUNG", DEBRIS_AGE - 60)  # (perhaps a put() under way)
        await _running_until(lambda: not old.exists())
        await _stopped(w, task)
        return old, young

    old, young = run(main())
    assert not old.exists(), "an hour-old message without an envelope is still there"
    assert young.exists()


async def _running_until(until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


# -- attempts that raise, and items without their message ------------------------------------


def _raising(w: World, monkeypatch) -> None:
    """Every remote attempt of `w` raises (a bug, here a FileNotFoundError from deep down)."""

    async def remote(item, smarthost, domain, mail_from, members, record):
        raise FileNotFoundError(2, "No such file or directory", "somewhere")

    monkeypatch.setattr(w.sched, "_remote", remote)


def _process(w: World, item: QueueItem) -> tuple[float, float]:
    w.sched.busy.add(item.id)  # (as _start does)
    before = time.time()
    run(w.sched._process(item))
    return before, time.time()


def test_an_attempt_that_raises_backs_off_and_logs_its_traceback_once(w, monkeypatch, caplog):
    """It was retried every --retry-after for ever, a traceback each time (an attacker's
    pass, F7): now it is a local error with the back-off of any deferral."""
    _raising(w, monkeypatch)
    item = w.queued(ALICE, ["bob@example.net"])
    for attempts in (1, 2, 3):
        before, after = _process(w, item)
        bob = item.recipients[0]
        assert (bob.state, bob.attempts) == ("pending", attempts)
        assert bob.last_error.startswith("451 4.3.0 local error: FileNotFoundError")
        assert_next_attempt(item, attempts, before, after)
    assert w.on_disk(item).recipients[0] == bob
    tracebacks = [r for r in caplog.records if r.exc_info and item.id in r.getMessage()]
    assert len(tracebacks) == 1
    assert (
        sum(f"{item.id}: delivery attempt failed again" in r.getMessage() for r in caplog.records)
        == 2
    )
    assert w.boxes.calls == []


def test_an_attempt_that_raises_after_the_max_queue_time_bounces_as_expired(w, monkeypatch):
    _raising(w, monkeypatch)
    item = w.queued(ALICE, ["bob@example.net"], age=QUEUE_TIME + 10)
    _process(w, item)
    assert item.recipients[0].state == "bounced"
    assert w.queue.ids() == set() and item.id not in w.sched.items
    [notice] = w.boxes.calls
    report = assert_bounce(notice.body, ALICE, {"bob@example.net": "5.4.7"})
    diagnostic = " ".join(report.per_recipient["bob@example.net"]["Diagnostic-Code"].split())
    assert "delivery time expired" in diagnostic and "local error: FileNotFoundError" in diagnostic


@pytest.mark.parametrize("rcpt", ["bob@example.net", Recipient("bob@example.org", "bob")])
def test_an_item_whose_message_file_is_lost_is_bounced_at_once(w, monkeypatch, caplog, rcpt):
    """Its message removed by hand or lost with a disk: nothing of it can ever go, and it was
    retried for ever (F7). The sender, told 250, learns it must send it again."""
    attempted = []

    async def remote(item, smarthost, domain, mail_from, members, record):
        attempted.append(item.id)
        return {}

    monkeypatch.setattr(w.sched, "_remote", remote)
    item = w.queued(ALICE, [rcpt])
    w.queue.message_path(item.id).unlink()
    _process(w, item)
    assert attempted == []
    assert item.recipients[0].state == "bounced"
    assert w.queue.ids() == set() and item.id not in w.sched.items
    [notice] = [c for c in w.boxes.calls if c.mailbox == "alice"]
    address = item.recipients[0].address
    report = parse_report(notice.body)
    assert report.msg["To"] == f"<{ALICE}>"
    assert report.per_recipient[address]["Status"] == "5.3.0"
    assert "message file lost" in report.per_recipient[address]["Diagnostic-Code"]
    assert any(
        "message file" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records
    )
    assert not any(r.exc_info for r in caplog.records)


def test_an_item_from_the_null_sender_whose_message_file_is_lost_goes(w):
    item = w.queued("", ["bob@example.net"])
    w.queue.message_path(item.id).unlink()
    _process(w, item)
    assert w.queue.ids() == set() and w.sched.items == {} and w.boxes.calls == []


# -- delete during an attempt (F6) -----------------------------------------------------------


def _slow_attempt(w: World, monkeypatch, result: relay.Result) -> asyncio.Event:
    """Remote attempts of `w` wait for the returned event, then give `result`."""
    may_end = asyncio.Event()

    async def remote(item, smarthost, domain, mail_from, members, record):
        await may_end.wait()
        return {m.address: result for m in members}

    monkeypatch.setattr(w.sched, "_remote", remote)
    return may_end


@pytest.mark.parametrize("result", [DEFER, OK], ids=["deferred", "delivered"])
def test_a_delete_during_an_attempt_answers_at_once_and_removes_it_after(w, monkeypatch, result):
    """The daemon held `mailerd queue delete` until the attempt ended (a slow server: up to
    45 min); the tool gave up after 30 s and removed the files itself (an attacker's pass)."""
    from mailerd.delivery.scheduler import AFTER_ATTEMPT, DELETED

    item = w.queued(ALICE, ["bob@example.net"])
    other = w.queued(ALICE, ["carol@example.net"])

    async def main() -> None:
        may_end = _slow_attempt(w, monkeypatch, result)
        w.sched._start(item)
        await asyncio.sleep(0.05)
        answer = await asyncio.wait_for(w.sched.delete(item.id), 1)
        assert answer == AFTER_ATTEMPT
        assert w.queue.ids() == {item.id, other.id}  # (its attempt still needs them)
        assert await w.sched.delete(other.id) == DELETED  # (one at rest goes at once)
        may_end.set()
        await asyncio.gather(*w.sched.tasks)

    run(main())
    assert w.queue.ids() == set() and w.sched.items == {} and not w.sched.doomed
    assert item.recipients[0].state == ("sent" if result.ok else "pending")


def test_a_delete_during_an_attempt_that_a_stop_cuts_short_is_done_at_the_stop(w, monkeypatch):
    """Else the next scheduler would attempt again what the administrator was told goes."""
    item = w.queued(ALICE, ["bob@example.net"])
    kept = w.queued(ALICE, ["carol@example.net"])

    async def main() -> None:
        _slow_attempt(w, monkeypatch, OK)  # (never let end)
        w.sched._start(item)
        w.sched._start(kept)
        await asyncio.sleep(0.05)
        await w.sched.delete(item.id)
        await w.sched.stop(grace=0.1)

    run(main())
    assert w.queue.ids() == {kept.id}


def test_a_stop_that_cuts_an_attempt_waiting_for_the_final_dots_reply_says_so(
    w, monkeypatch, caplog
):
    """The host may have the message already; the next scheduler sends it again. That was
    silent (an attacker's pass: a reload during a slow checker's 100 s, two copies)."""
    item = w.queued(ALICE, ["bob@example.net"])

    async def main() -> None:
        _slow_attempt(w, monkeypatch, OK)  # (never let end)
        monkeypatch.setattr(relay, "_awaiting_end_of_data", collections.Counter([item.id]))
        w.sched._start(item)
        await asyncio.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="mailerd.outbound"):
            await w.sched.stop(grace=0.1)

    run(main())
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(item.id)]
    assert said == [
        f"{item.id}: the stop cuts its attempt short after its data went to a host, which may "
        "have it: the message may be sent more than once"
    ], said


def test_a_stop_starts_no_session_for_attempts_that_were_waiting_for_a_slot(
    make_world, monkeypatch
):
    """A reviewer's finding: attempts already waiting for their domain's slot (a backlog to a
    slow domain) took it during the stop's grace and began new sessions, which the stop then
    cut short after their data went: each such message was sent twice, and the next scheduler
    (after a reload) waited the whole grace before any other mail moved. Postfix's queue
    manager starts no delivery once told to stop; neither does this now: those attempts end
    untried, their recipients pending, for the next scheduler."""
    w = make_world("--max-per-domain", "1")
    items = [w.queued(ALICE, [f"r{n}@slow.example"]) for n in range(3)]
    sessions: list[str] = []

    async def hops(domain: str, smarthost: bool) -> list[relay.Hop]:
        return [relay.Hop(f"mx.{domain}", "192.0.2.25")]

    def attempt(hops, message: relay.Message, settings, record) -> dict[str, relay.Result]:
        sessions.append(message.queue_id)
        time.sleep(0.3)  # (a slow host's reply to the final dot)
        return dict.fromkeys(message.recipients, OK)

    monkeypatch.setattr(w.sched, "_hops", hops)
    monkeypatch.setattr(relay, "attempt", attempt)

    async def main() -> None:
        for item in items:
            w.sched._start(item)
        while not sessions:
            await asyncio.sleep(0.01)
        await w.sched.stop(grace=5)

    run(main())
    # One session, the first attempt's to take the slot: which one that is, the three stat
    # calls in threads decide (`_message_lost`), not the order they were started in (a CI
    # run had the second first).
    [first] = [item for item in items if item.id in sessions]
    assert len(sessions) == 1 and first.recipients[0].state == "sent"
    for item in (item for item in items if item is not first):
        [recipient] = item.recipients
        assert (recipient.state, recipient.attempts) == ("pending", 0)
        assert item.id in w.queue.ids()


def test_a_group_not_started_at_a_stop_loses_no_result_of_another(make_world, monkeypatch):
    """An attacker's pass at the test above's fix: one group's session ended in a 550 during
    the stop while the item's other group, waiting for its slot, was ended untried, which
    threw the 550 away (the recipient stayed pending, no bounce: sent again at every
    reload). The 550 is recorded now; the untried recipient is left as it was."""
    w = make_world("--max-per-domain", "1")
    blocker = w.queued(ALICE, ["r0@slow.example"])
    item = w.queued(ALICE, ["bob@hard.example", "carol@slow.example"])
    next_attempt = item.next_attempt

    async def hops(domain: str, smarthost: bool) -> list[relay.Hop]:
        return [relay.Hop(f"mx.{domain}", "192.0.2.25")]

    def attempt(hops, message: relay.Message, settings, record) -> dict[str, relay.Result]:
        time.sleep(0.3)
        answer = REJECT if "hard" in message.recipients[0] else OK
        return dict.fromkeys(message.recipients, answer)

    monkeypatch.setattr(w.sched, "_hops", hops)
    monkeypatch.setattr(relay, "attempt", attempt)

    async def main() -> None:
        w.sched._start(blocker)
        await asyncio.sleep(0.05)
        w.sched._start(item)
        await asyncio.sleep(0.1)
        await w.sched.stop(grace=5)

    run(main())
    disk = w.on_disk(item)
    assert disk is not None
    states = {r.address: (r.state, r.attempts) for r in disk.recipients}
    assert states == {"bob@hard.example": ("bounced", 1), "carol@slow.example": ("pending", 0)}
    assert len(w.boxes.to("alice")) == 1  # (the bounce, to a local sender's mailbox)
    untried = w.queued(ALICE, ["dave@slow.example"])
    untried_at = untried.next_attempt
    assert next_attempt <= untried_at
    w.sched.stopping = True

    async def untouched() -> None:
        await w.sched._attempt(untried)

    run(untouched())
    assert untried.next_attempt == untried_at and untried.recipients[0].attempts == 0
    assert w.on_disk(untried).recipients[0].state == "pending"


def test_an_item_with_nothing_pending_is_removed_not_attempted_again_and_again(make_world):
    """A second attacker's pass at the test above's fix: an item with no recipient pending
    (its removal had failed, a crash between a record and the removal) has no group to
    attempt, so no result; read as "nothing tried", it was left as it was and started again
    at once, thousands of times a second, never removed. It is removed."""
    w = make_world()
    item = w.queued(ALICE, [Recipient("bob@far.example", state="sent", attempts=1)])
    looks: list[str] = []
    lost = w.sched._message_lost

    async def counted(it: QueueItem) -> bool:
        looks.append(it.id)
        return await lost(it)

    w.sched._message_lost = counted  # type: ignore[method-assign]

    async def main() -> None:
        running = asyncio.create_task(w.sched.run())
        await asyncio.sleep(1)
        await w.sched.stop(grace=1)
        await running

    run(main())
    assert item.id not in w.queue.ids() and item.id not in w.sched.items
    assert len(looks) < 5, f"{len(looks)} attempts in a second"


def test_a_queue_request_waits_until_the_process_has_the_queue(w):
    """A reviewer's finding: after a reload, while the previous delivery process held the
    queue for its stop's grace, `mailerd queue delete` was answered from the new process's
    empty view, "not in the queue", and the item was then delivered; a flush said 0. A flush
    or a delete now waits until the process has the queue."""
    from mailerd.delivery.process import DeliveryService
    from mailerd.ipc.messages import Deleted, DeleteQueued

    item = w.queued(ALICE, ["bob@example.net"])
    ours, theirs = socket.socketpair()

    async def main() -> Deleted:
        service = DeliveryService(w.cfg, socket.socket(), ours)
        previous = os.open(w.queue.scheduler_lock, os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(previous, fcntl.LOCK_EX)  # (the previous process's scheduler)
        runner = asyncio.create_task(service.scheduler.run())
        answer = asyncio.create_task(service.control(DeleteQueued((item.id,))))
        await asyncio.sleep(0.5)
        assert not answer.done(), answer
        os.close(previous)
        deleted = await asyncio.wait_for(answer, 5)
        await service.scheduler.stop(grace=1)
        runner.cancel()
        return deleted

    try:
        deleted = run(main())
    finally:
        ours.close()
        theirs.close()
    assert isinstance(deleted, Deleted) and deleted.ids == (item.id,), deleted


def test_a_queue_request_that_waits_too_long_is_refused_and_not_done(w, monkeypatch):
    """A second attacker's pass: the wait above had no bound, so a delete the tool had given
    up on (after its 30 s: "nothing deleted") was done once the queue came. Past QUEUE_WAIT,
    less than the tool's, it is refused, and nothing is done."""
    from mailerd.delivery import process
    from mailerd.ipc.messages import DeleteQueued, Refused

    monkeypatch.setattr(process, "QUEUE_WAIT", 0.3)
    item = w.queued(ALICE, ["bob@example.net"])
    ours, theirs = socket.socketpair()

    async def main() -> object:
        service = process.DeliveryService(w.cfg, socket.socket(), ours)
        previous = os.open(w.queue.scheduler_lock, os.O_RDONLY | os.O_CREAT, 0o600)
        fcntl.flock(previous, fcntl.LOCK_EX)  # (the previous process's scheduler, for good)
        runner = asyncio.create_task(service.scheduler.run())
        try:
            return await asyncio.wait_for(service.control(DeleteQueued((item.id,))), 5)
        finally:
            runner.cancel()
            os.close(previous)

    try:
        answer = run(main())
    finally:
        ours.close()
        theirs.close()
    assert isinstance(answer, Refused) and "nothing done" in answer.error, answer
    monkeypatch.undo()
    from mailerd.commands import queue as tool

    assert process.QUEUE_WAIT < tool.TIMEOUT  # (the real wait is less than the tool's)
    assert item.id in w.queue.ids()


# -- backscatter: another server's mail, forwarded by an alias ------------------------------


def _no_notice_line(caplog, item: QueueItem, what: str, why: str) -> None:
    expected = (
        f"{item.id}: no {what} to <{item.sender}>: forwarded mail from a sender SPF did not "
        f"verify ({why})"
    )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(item.id)]
    assert lines.count(expected) == 1, lines


@pytest.mark.parametrize(
    "spf, why",
    [("fail", "fail"), ("softfail", "softfail"), ("none", "none"), ("neutral", "neutral"),
     ("temperror", "temperror"), ("", "not checked: inbound-auth off")],
)  # fmt: skip
def test_a_refused_forward_from_an_unverified_sender_is_not_bounced(w, caplog, spf, why):
    """A spammer forges the sender: a bounce would reflect the spam to it (backscatter)."""
    caplog.set_level(logging.INFO, "mailerd.outbound")
    item = w.queued(REMOTE_SENDER, ["bob@example.net"], inbound=True, sender_spf=spf)
    w.settle(item, {"bob@example.net": REJECT})
    assert item.recipients[0].state == "bounced"
    assert w.boxes.calls == [] and w.notices_queued() == []
    assert w.queue.ids() == set() and item.id not in w.sched.items
    _no_notice_line(caplog, item, "bounce", why)


def test_a_refused_forward_from_an_unverified_local_sender_is_not_bounced_either(w, caplog):
    caplog.set_level(logging.INFO, "mailerd.outbound")
    item = w.queued(ALICE, ["bob@example.net"], inbound=True, sender_spf="fail")
    w.settle(item, {"bob@example.net": REJECT})
    assert w.boxes.calls == [] and w.notices_queued() == []
    _no_notice_line(caplog, item, "bounce", "fail")


def test_a_refused_forward_from_an_spf_verified_sender_is_bounced(w):
    item = w.queued(REMOTE_SENDER, ["bob@example.net"], inbound=True, sender_spf="pass")
    w.settle(item, {"bob@example.net": REJECT})
    [notice] = w.notices_queued()
    assert notice.recipients == [Recipient(REMOTE_SENDER)]
    assert_bounce(
        w.queue.message_path(notice.id).read_bytes(), REMOTE_SENDER, {"bob@example.net": "5.1.1"}
    )


def test_an_expired_forward_from_an_unverified_sender_is_not_bounced(w, caplog):
    caplog.set_level(logging.INFO, "mailerd.outbound")
    item = w.queued(
        REMOTE_SENDER, ["bob@example.net"], age=QUEUE_TIME + 10, inbound=True, sender_spf="none"
    )
    w.settle(item, {"bob@example.net": DEFER})
    assert item.recipients[0].state == "bounced" and w.notices_queued() == []
    _no_notice_line(caplog, item, "bounce", "none")


def test_no_delay_warning_for_a_forward_from_an_unverified_sender(w, caplog):
    caplog.set_level(logging.INFO, "mailerd.outbound")
    item = w.queued(
        REMOTE_SENDER, ["bob@example.net"], age=WARN_AFTER + 10, inbound=True, sender_spf="fail"
    )
    for _ in range(3):
        w.settle(item, {"bob@example.net": DEFER})
    assert item.recipients[0].state == "pending"
    assert w.boxes.calls == [] and w.notices_queued() == []
    assert w.on_disk(item).warned  # (said once, not at every deferral)
    _no_notice_line(caplog, item, "delay warning", "fail")


def test_a_delay_warning_for_a_forward_from_an_spf_verified_sender_goes(w):
    item = w.queued(
        REMOTE_SENDER, ["bob@example.net"], age=WARN_AFTER + 10, inbound=True, sender_spf="pass"
    )
    w.settle(item, {"bob@example.net": DEFER})
    [notice] = w.notices_queued()
    report = parse_report(w.queue.message_path(notice.id).read_bytes())
    assert report.per_recipient["bob@example.net"]["Action"] == "delayed"


def test_the_owner_s_mail_is_bounced_whatever_spf_would_say(w):
    """Mail from loopback, submission or sendmail (not inbound) is the owner's: always told."""
    item = w.queued(REMOTE_SENDER, ["bob@example.net"], inbound=False, sender_spf="")
    w.settle(item, {"bob@example.net": REJECT})
    assert len(w.notices_queued()) == 1


# -- the envelope sender of forwards (mailerd/forwarding.py) ------------------------------------


def attempts_made(w: World, monkeypatch, item: QueueItem) -> list[relay.Message]:
    """One attempt of `item`, every remote transaction answered 250; the messages relayed."""
    return attempts_answered(w, monkeypatch, item, OK)


def test_forwards_leave_from_their_alias_s_address_one_transaction_each(w, monkeypatch):
    item = w.queued(
        REMOTE_SENDER,
        [
            Recipient("x@example.net", via=f"fwd-a@{DOMAIN}"),
            Recipient("y@example.net", via=f"fwd-b@{DOMAIN}"),
            Recipient("z@example.net", via=f"fwd-a@{DOMAIN}"),
            Recipient("w@example.net"),  # (not forwarded: as a relayhost-less owner's copy)
        ],
    )
    made = attempts_made(w, monkeypatch, item)
    assert sorted((m.sender, m.recipients) for m in made) == [
        (f"fwd-a+fwd_from=zed=example.net@{DOMAIN}", ("x@example.net", "z@example.net")),
        (f"fwd-b+fwd_from=zed=example.net@{DOMAIN}", ("y@example.net",)),
        (REMOTE_SENDER, ("w@example.net",)),
    ]
    assert w.queue.ids() == set(), "every recipient delivered"


def test_a_local_sender_s_forward_keeps_its_sender_in_one_transaction(w, monkeypatch):
    item = w.queued(
        ALICE,
        [Recipient("x@example.net", via=f"fwd-a@{DOMAIN}"), Recipient("y@example.net")],
    )
    [message] = attempts_made(w, monkeypatch, item)
    assert (message.sender, message.recipients) == (ALICE, ("x@example.net", "y@example.net"))


def test_a_forward_through_a_relayhost_leaves_from_its_alias_too(make_world, monkeypatch):
    w = make_world("--relayhost", "[192.0.2.99]:587")
    item = w.queued(REMOTE_SENDER, [Recipient("x@example.net", via=f"fwd-a@{DOMAIN}")])
    [message] = attempts_made(w, monkeypatch, item)
    assert message.sender == f"fwd-a+fwd_from=zed=example.net@{DOMAIN}"


def attempts_answered(
    w: World, monkeypatch, item: QueueItem, answer: relay.Result
) -> list[relay.Message]:
    """One attempt of `item`, every remote recipient answered `answer`."""
    made: list[relay.Message] = []

    async def hops(domain: str, smarthost: bool) -> list[relay.Hop]:
        return [relay.Hop(f"mx.{domain}", "192.0.2.25")]

    def attempt(hops, message: relay.Message, settings, record) -> dict[str, relay.Result]:
        made.append(message)
        return dict.fromkeys(message.recipients, answer)

    monkeypatch.setattr(w.sched, "_hops", hops)
    monkeypatch.setattr(relay, "attempt", attempt)
    run(w.sched._attempt(item))
    return made


def test_a_refused_forward_still_bounces_to_the_original_sender(w, monkeypatch):
    """mailerd's own bounce of a forward goes where RFC 5321 says, to the original sender
    (SPF verified it at receipt: `_notify`), not to the alias's address it left from; only the
    target's later bounces reach the alias."""
    item = w.queued(
        REMOTE_SENDER,
        [Recipient("bob@example.net", via=f"fwd-a@{DOMAIN}")],
        inbound=True,
        sender_spf="pass",
    )
    [message] = attempts_answered(w, monkeypatch, item, REJECT)
    assert message.sender == f"fwd-a+fwd_from=zed=example.net@{DOMAIN}"
    [notice] = w.notices_queued()
    assert [r.address for r in notice.recipients] == [REMOTE_SENDER]


@pytest.mark.parametrize(
    "spf, rewritten", [("fail", False), ("softfail", False), ("pass", True), ("", True)]
)
def test_a_forward_whose_sender_failed_spf_here_keeps_that_sender(w, monkeypatch, spf, rewritten):
    item = w.queued(
        REMOTE_SENDER,
        [Recipient("bob@example.net", via=f"fwd-a@{DOMAIN}")],
        inbound=True,
        sender_spf=spf,
    )
    [message] = attempts_answered(w, monkeypatch, item, OK)
    assert (message.sender != REMOTE_SENDER) == rewritten


def test_the_alias_of_a_forward_survives_the_queue_file(w):
    item = w.queued(REMOTE_SENDER, [Recipient("x@example.net", via=f"fwd-a@{DOMAIN}")])
    assert w.on_disk(item).recipients[0].via == f"fwd-a@{DOMAIN}"


def test_a_group_that_raises_waits_for_the_others_before_the_attempt_ends(w, monkeypatch):
    """One group's bug ended the attempt while another group was still sending: its
    recipient was deferred under it (451 local error), the item freed for the next attempt,
    and the group's delivery recorded later, the recipient sent twice meanwhile (a
    reviewer's pass)."""
    item = w.queued(
        REMOTE_SENDER,
        [Recipient("x@example.net", via=f"fwd-a@{DOMAIN}"), Recipient("y@example.org.uk")],
    )

    async def remote(item_, smarthost, domain, mail_from, members, record):
        if domain == "example.net":
            raise RuntimeError("a bug in one group")
        await asyncio.sleep(0.3)
        return {m.address: OK for m in members}

    monkeypatch.setattr(w.sched, "_remote", remote)
    w.sched.busy.add(item.id)
    run(w.sched._process(item))
    assert item.id not in w.sched.busy
    states = {r.address: (r.state, r.attempts) for r in item.recipients}
    assert states == {"x@example.net": ("pending", 1), "y@example.org.uk": ("sent", 1)}
    [x] = [r for r in w.on_disk(item).recipients if r.state == "pending"]
    assert x.last_error.startswith("451 4.3.0 local error: RuntimeError")


# -- a destination none of whose hosts takes a connection ------------------------------------

UNREACHABLE = relay.Result(
    451, "4.4.1", "connect to mx1.example.net[192.0.2.25]:25: Connection timed out", *MX, ours=True
)


class FakeRelay:
    """relay.attempt, in the scheduler's thread pool: each call is counted and given `result`
    for every recipient, after a moment (a connection's time)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.result = UNREACHABLE

    def __call__(self, hops, message, settings, record=None):
        self.calls.append(message.recipients)
        time.sleep(0.05)
        return dict.fromkeys(message.recipients, self.result)


@pytest.fixture
def fake_relay(monkeypatch) -> FakeRelay:
    fake = FakeRelay()
    monkeypatch.setattr(relay, "attempt", fake)
    return fake


def attempt_all(w: World, items: list[QueueItem]) -> None:
    """The items' attempts, all at once, as a retry round or a flush starts them."""

    async def all_at_once() -> None:
        await asyncio.gather(*(w.sched._attempt(item) for item in items))

    _fake_hops(w)
    run(all_at_once())


def test_a_destination_whose_hosts_take_no_connection_is_suspended(w, fake_relay, caplog):
    """Postfix's dead destination: once an attempt connected to none of a destination's hosts,
    its other mail is deferred without a connection ("delivery temporarily suspended") until
    --retry-after has passed. Each item made its own connection: a helper's 30,000 items for
    a relayhost that dropped connections took their 30 s timeouts four at a time, some 62
    hours a retry round. Other destinations are tried as before."""
    caplog.set_level(logging.INFO, logger="mailerd.outbound")
    items = [w.queued(ALICE, ["bob@example.net"]) for _ in range(20)]
    other = w.queued(ALICE, ["carol@example.com"])
    before = time.time()
    attempt_all(w, [*items, other])
    # The first attempts, one a slot (--max-per-domain), were under way before any had failed.
    assert fake_relay.calls.count(("bob@example.net",)) == w.cfg.max_per_domain
    assert fake_relay.calls.count(("carol@example.com",)) == 1
    suspended = "451 4.4.1 delivery temporarily suspended: " + UNREACHABLE.text
    errors = [item.recipients[0].last_error for item in items]
    assert errors.count(suspended) == 20 - w.cfg.max_per_domain, errors
    assert errors.count(UNREACHABLE.line()) == w.cfg.max_per_domain, errors
    for item in items:  # deferred as any deferral is: counted, backed off, kept on disk
        assert item.recipients[0].state == "pending" and item.recipients[0].attempts == 1
        assert_next_attempt(item, 1, before, time.time())
        assert w.on_disk(item).recipients[0].last_error == item.recipients[0].last_error
    logged = [r.getMessage() for r in caplog.records if "suspended" in r.getMessage()]
    assert len(logged) == 20 - w.cfg.max_per_domain and all(
        "relay=none," in line and "status=deferred" in line for line in logged
    ), logged


def test_a_suspension_ends_after_the_retry_time_and_when_a_host_answers(make_world, fake_relay):
    w = make_world("--retry-after", "1s")
    attempt_all(w, [w.queued(ALICE, ["bob@example.net"])])
    attempt_all(w, [w.queued(ALICE, ["bob@example.net"])])
    assert len(fake_relay.calls) == 1  # (the second: suspended)
    time.sleep(1.05)
    fake_relay.result = DEFER  # (a host that answers, whatever it answers)
    attempt_all(w, [w.queued(ALICE, ["bob@example.net"])])
    attempt_all(w, [w.queued(ALICE, ["bob@example.net"])])
    assert len(fake_relay.calls) == 3, fake_relay.calls  # (tried again, then not suspended)


def test_a_host_that_answers_suspends_nothing(w, fake_relay):
    fake_relay.result = DEFER
    items = [w.queued(ALICE, ["bob@example.net"]) for _ in range(8)]
    attempt_all(w, items)
    assert len(fake_relay.calls) == 8
    assert {item.recipients[0].last_error for item in items} == {DEFER.line()}


# -- how many of one destination's items are in flight ---------------------------------------


class SlowRelay(FakeRelay):
    """A host that answers (DEFER), `pause` seconds a session; when each call began."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.result = DEFER
        self.pause = pause
        self.began: dict[str, float] = {}

    def __call__(self, hops, message, settings, record=None):
        self.began.update(dict.fromkeys(message.recipients, time.monotonic()))
        time.sleep(self.pause)
        return super().__call__(hops, message, settings, record)


def _attempted(w: World, address: str) -> int:
    """Items of `address`'s domain the scheduler has attempted (its own objects: the loop
    reads the queue from disk at its start)."""
    domain = address.rpartition("@")[2]
    return sum(
        1
        for item in w.sched.items.values()
        if item.recipients[0].address.endswith("@" + domain) and item.recipients[0].attempts
    )


def test_a_backlog_for_one_destination_starts_a_few_items_at_a_time(w, monkeypatch):
    """A retry round or a flush started every due item at once, a task each: a helper's 30,000
    for one relayhost held the delivery process's loop, and every mailbox write and 250 with
    it, for up to 3 s, and grew it by 240 MB it kept. Now at most two items a slot of one
    destination are in flight (IN_FLIGHT_PER_SLOT), the rest wait aside without a task and
    all are attempted in the end; another destination's item, due last, is not held behind
    them."""
    slow = SlowRelay(0.1)
    monkeypatch.setattr(relay, "attempt", slow)

    _fake_hops(w)
    backlog = [w.queued(ALICE, [f"r{n}@example.net"]) for n in range(40)]
    w.queued(ALICE, ["carol@example.com"])
    most = 0

    def done() -> bool:
        nonlocal most
        most = max(most, len(w.sched.tasks))
        return _attempted(w, "x@example.net") == len(backlog) and not w.sched.busy

    async def main() -> float:
        began = time.monotonic()
        await _stopped(w, await _running(w, done, timeout=20))
        return began

    began = run(main())
    assert _attempted(w, "x@example.net") == len(backlog)
    assert most <= 2 * w.cfg.max_per_domain + 1, f"{most} attempts in flight at once"
    assert slow.began["carol@example.com"] - began < 1.0, "held behind example.net's backlog"
    assert not w.sched.held and not w.sched.held_ids and not w.sched.in_flight


def test_an_item_deleted_while_set_aside_strands_none_of_the_others(w, monkeypatch):
    monkeypatch.setattr(relay, "attempt", SlowRelay(0.1))

    _fake_hops(w)
    backlog = [w.queued(ALICE, [f"r{n}@example.net"]) for n in range(20)]

    async def main() -> None:
        task = await _running(w, lambda: len(w.sched.held_ids) >= 10)
        for queue_id in list(w.sched.held_ids)[:5]:
            assert await w.sched.delete(queue_id) == "deleted"
        deadline = time.monotonic() + 20
        while _attempted(w, "x@example.net") < len(backlog) - 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await _stopped(w, task)

    run(main())
    assert _attempted(w, "x@example.net") == len(backlog) - 5
    assert len(w.sched.items) == len(backlog) - 5


# -- a reviewer's pass over the suspension and the items set aside ---------------------------


class GatedRelay:
    """relay.attempt whose first call is under way until `gate` is set (`entered` says it
    began), then reaches no host; every later call is answered (OK): a destination that was
    down when an attempt began, and is back."""

    def __init__(self) -> None:
        import threading

        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, hops, message, settings, record=None):
        self.calls.append(message.recipients)
        if len(self.calls) == 1:
            self.entered.set()
            self.gate.wait(10)
            return dict.fromkeys(message.recipients, UNREACHABLE)
        return dict.fromkeys(message.recipients, OK)


def _fake_hops(w: World) -> None:
    async def hops(domain: str, smarthost: bool) -> list[relay.Hop]:
        return [relay.Hop(*MX)]

    w.sched._hops = hops  # type: ignore[method-assign]  (no DNS)


class _Greylister:
    """A host on loopback that answers every RCPT with 451 (greylisting); how many sessions."""

    def __init__(self) -> None:
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sessions = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self.sessions += 1
                with conn, conn.makefile("rb") as reader:
                    conn.sendall(b"220 grey.test ESMTP\r\n")
                    for line in reader:
                        verb = line[:4].upper()
                        if verb == b"RCPT":
                            conn.sendall(b"451 4.7.1 greylisted, try again later\r\n")
                        elif verb == b"QUIT":
                            conn.sendall(b"221 bye\r\n")
                            break
                        else:
                            conn.sendall(b"250 grey.test\r\n")


def test_a_destination_whose_first_host_answers_is_not_suspended(w):
    """Its primary MX greylists (451 to RCPT), its backup refuses connections (down, or
    firewalled as backups often are): the backup's refusal was the recipients' result, the
    attempt counted as one that connected to no host, and the destination was suspended,
    its other mail deferred for --retry-after without a connection, 'suspended: connect to
    mx2…' (the README: "a host that answers at all, even to refuse, suspends nothing"). Each
    message must reach the greylister to be let through later."""
    grey = _Greylister()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # (closed: nothing listens there)

    async def hops(domain: str, smarthost: bool) -> list[relay.Hop]:
        return [relay.Hop("mx1.example.net", "127.0.0.1", grey.port),
                relay.Hop("mx2.example.net", "127.0.0.1", dead)]  # fmt: skip

    w.sched._hops = hops  # type: ignore[method-assign]
    try:
        first, second = (w.queued(ALICE, ["bob@example.net"]) for _ in range(2))
        run(w.sched._attempt(first))
        run(w.sched._attempt(second))
    finally:
        grey.listener.close()
    assert "suspended" not in second.recipients[0].last_error, second.recipients[0].last_error
    assert grey.sessions == 2 and not w.sched.suspended
    assert "greylisted" in first.recipients[0].last_error, first.recipients[0].last_error


def test_a_flush_is_not_undone_by_an_attempt_that_began_before_it(w, monkeypatch):
    """`mailerd queue flush` ends every suspension (the operator has mended the relayhost), but
    an attempt under way since before it (a connect that times out after 30 s) that then ends
    unreachable suspended the destination again: the flushed mail was deferred, 'delivery
    temporarily suspended', without a connection, for --retry-after and more (its backoff
    doubled), although the relayhost answered by then."""
    relay_ = GatedRelay()
    monkeypatch.setattr(relay, "attempt", relay_)
    _fake_hops(w)
    stale, flushed = (w.queued(ALICE, ["bob@example.net"]) for _ in range(2))

    async def main() -> None:
        under_way = asyncio.create_task(w.sched._attempt(stale))
        await asyncio.get_running_loop().run_in_executor(None, relay_.entered.wait, 10)
        w.sched.flush()  # the relayhost is mended
        relay_.gate.set()
        await under_way
        await w.sched._attempt(flushed)

    run(main())
    assert len(relay_.calls) == 2, flushed.recipients[0].last_error
    assert flushed.recipients[0].state == "sent" and not w.sched.suspended


def _backlog_then(w: World, monkeypatch, rcpts: list[str | Recipient]) -> dict[str, float]:
    """A backlog of 12 items for example.net (sessions of 0.4 s, two in flight), then one item
    for `rcpts`; how long after the loop's start each address was tried (or delivered)."""
    slow = SlowRelay(0.4)
    monkeypatch.setattr(relay, "attempt", slow)
    _fake_hops(w)
    for n in range(12):
        w.queued(ALICE, [f"r{n}@example.net"], age=10)
    w.queued(ALICE, rcpts)
    when: dict[str, float] = {}
    deliver = w.sched.deliver_local

    async def deliver_local(mailbox, head, body, since=None):
        when[mailbox] = time.monotonic()
        return await deliver(mailbox, head, body, since)

    w.sched.deliver_local = deliver_local

    async def main() -> float:
        began = time.monotonic()
        task = await _running(w, lambda: len(when) + len(slow.began) >= 14, timeout=10)
        await _stopped(w, task)
        return began

    began = run(main())
    return {k: v - began for k, v in [*slow.began.items(), *when.items()]}


def test_a_local_copy_is_not_set_aside_behind_a_remote_backlog(make_world, monkeypatch):
    """An item with a local copy still pending (its mailbox write failed at receipt) and a
    remote recipient waited, whole, behind that recipient's destination's backlog: the copy,
    written at once before 89b3390 (retry_local_now's very purpose), waited for every item
    ahead, hours behind a slow relayhost's backlog."""
    w = make_world("--max-per-domain", "1")
    local = Recipient(ALICE, mailbox="alice", last_error="451 4.2.0 no writer")
    tried = _backlog_then(w, monkeypatch, [local, "x@example.net"])
    assert tried["alice"] < 0.5, f"the local copy was written after {tried['alice']:.1f} s"


def test_an_items_other_destination_is_not_set_aside_behind_a_backlog(make_world, monkeypatch):
    """An item for bob@example.net and carol@example.com: example.com's session waited behind
    example.net's whole backlog (the README: "while other destinations' mail goes on")."""
    w = make_world("--max-per-domain", "1")
    tried = _backlog_then(w, monkeypatch, ["x@example.net", "carol@example.com"])
    assert tried["carol@example.com"] < 0.5, f"tried after {tried['carol@example.com']:.1f} s"


def test_items_set_aside_are_not_stranded_by_deletes_as_they_are_let_go(make_world, monkeypatch):
    """An item's end let go only the next item set aside of its destination: one being deleted
    then (its files going, the item busy) was skipped, and that place was lost. Two such, with
    two places (--max-per-domain 1), and once the two in flight were delivered the rest of
    the destination's backlog was set aside for ever: never started again, not by a flush,
    never bounced (only new mail for the destination, or a restart, let it go)."""
    w = make_world("--max-per-domain", "1")
    fast = SlowRelay(0.3)
    fast.result = OK
    monkeypatch.setattr(relay, "attempt", fast)
    _fake_hops(w)
    remove, deleted = w.queue.remove, set()

    def slow_remove(queue_id: str) -> None:
        if queue_id in deleted:
            time.sleep(1.0)  # (a slow disk: the two in flight end meanwhile)
        remove(queue_id)

    monkeypatch.setattr(w.queue, "remove", slow_remove)
    for n in range(8):
        w.queued(ALICE, [f"r{n}@example.net"])

    async def main() -> None:
        task = await _running(w, lambda: len(w.sched.held_ids) == 6)
        first, second = list(w.sched.held["example.net"])[:2]  # (the next two let go)
        deleted.update((first, second))
        await asyncio.gather(w.sched.delete(first), w.sched.delete(second))
        w.sched.flush()
        deadline = time.monotonic() + 5
        while w.sched.items and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await _stopped(w, task)

    run(main())
    assert not w.sched.items, f"set aside for ever: {sorted(w.sched.held_ids & set(w.sched.items))}"
    assert len(fast.calls) == 6 and not w.queue.ids()


def test_a_stale_connect_failure_does_not_suspend_a_destination_that_answered(w, monkeypatch):
    """An attempt under way while the host was down ends, with its connect failure, after
    another attempt begun later was answered: the destination lives, and its next item goes
    (it was suspended for --retry-after: a reviewer's finding)."""
    relay_ = GatedRelay()
    monkeypatch.setattr(relay, "attempt", relay_)
    _fake_hops(w)
    stale, fresh, third = (w.queued(ALICE, ["bob@example.net"]) for _ in range(3))

    async def main() -> None:
        under_way = asyncio.create_task(w.sched._attempt(stale))
        await asyncio.get_running_loop().run_in_executor(None, relay_.entered.wait, 10)
        await w.sched._attempt(fresh)
        relay_.gate.set()
        await under_way
        await w.sched._attempt(third)

    run(main())
    assert stale.recipients[0].last_error == UNREACHABLE.line()
    assert len(relay_.calls) == 3 and third.id not in w.sched.items, third.recipients[0].last_error

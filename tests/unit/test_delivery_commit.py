"""The delivery process's commit (delivery/process.py DeliveryService.commit) on a real queue in
tmp_path: what the client is told once a message is durably queued. No root, no network: the
scheduler is never run, and the message has no local recipient."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mailerd import config
from mailerd.delivery.process import DeliveryService
from mailerd.ipc.messages import Commit, Target

BODY = b"Subject: once\r\n\r\none copy, however often the client is told to try again\r\n"


@pytest.fixture
def service(tmp_path):
    ini = tmp_path / "mailerd.conf"  # never the machine's /etc/mailerd/mailerd.conf
    ini.write_text("[mailerd]\n")
    (tmp_path / "spool").mkdir()
    cfg = config.load(
        [
            *("-c", str(ini), "-s", str(tmp_path / "spool"), "-q", str(tmp_path / "queue")),
            *("-d", "example.org", "-H", "mx.example.org", "-l", "127.0.0.1:2525"),
            *("-n", "none", "-w", "1", "--dns-server", "127.0.0.1:9"),
        ]
    )
    listener, link = socket.socketpair()
    service = DeliveryService(cfg, listener, link)
    service.queue.create_dirs()
    yield service
    service.scheduler.pool.shutdown(wait=False)
    service.executor.shutdown(wait=False)
    listener.close()
    link.close()


def commit(to: str, trusted: bool = False, **fields) -> Commit:
    fields.setdefault("targets", (Target(to, None),))
    return Commit(
        sender="alice@example.org",
        helo="client.test",
        peer="192.0.2.1",
        protocol="ESMTP",
        body="7BIT",
        smtputf8=False,
        trusted=trusted,
        **fields,
    )


def test_a_message_durably_queued_gets_250_whatever_the_scheduler_raises(service, caplog):
    """After queue.put the message is on disk and will be delivered: a 451 there made the
    client send it again, and the queue delivered both (an attacker's pass, F3)."""

    def broken_add(item):
        raise TypeError("'<=' not supported between instances of 'NoneType' and 'float'")

    service.scheduler.add = broken_add
    reply = asyncio.run(service.commit(commit("bob@example.net"), BODY))
    assert reply.code == 250, reply
    [queued] = service.queue.load(clean=False)
    assert reply.text.endswith(queued.id)
    assert [r.address for r in queued.recipients] == ["bob@example.net"]
    assert any("not scheduled" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_message_that_cannot_be_queued_still_gets_a_4xx(service, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service.queue, "put", full)
    reply = asyncio.run(service.commit(commit("bob@example.net"), BODY))
    assert reply.code // 100 == 4, reply


@pytest.mark.parametrize(
    "trusted, spf, inbound",
    [(False, "softfail", True), (False, "pass", True), (False, "", True), (True, "", False)],
)
def test_the_queue_item_records_an_untrusted_listener_and_the_sender_s_spf(
    service, trusted, spf, inbound
):
    """Mail another server sent (an alias forward is its only way to a remote recipient) is
    marked so in its envelope, with the SPF result of its MAIL FROM at receipt: the scheduler
    decides by them whether a bounce may go to that sender."""
    request = commit("bob@example.net", trusted=trusted, sender_spf=spf)
    reply = asyncio.run(service.commit(request, BODY))
    assert reply.code == 250, reply
    [queued] = service.queue.load(clean=False)
    assert (queued.inbound, queued.sender_spf) == (inbound, spf)


def test_each_forward_is_queued_with_the_alias_it_came_through(service):
    """The alias a remote copy came through is what it leaves from (`forwarding`); a target
    two aliases share is one copy, through the first of them."""
    targets = (
        Target("bob@example.net", None, "team@example.org"),
        Target("carol@example.net", None, "ops@example.org"),
        Target("bob@example.net", None, "ops@example.org"),
        Target("dave@example.net", None),
    )
    reply = asyncio.run(service.commit(commit("x", targets=targets), BODY))
    assert reply.code == 250, reply
    [queued] = service.queue.load(clean=False)
    assert [(r.address, r.via) for r in queued.recipients] == [
        ("bob@example.net", "team@example.org"),
        ("carol@example.net", "ops@example.org"),
        ("dave@example.net", ""),
    ]


def test_a_copy_that_came_back_through_one_of_its_aliases_is_marked_so(service):
    """Whatever the order of the RCPTs: such a copy leaves from <> (`forwarding`)."""
    targets = (
        Target("bob@example.net", None, "team@example.org"),
        Target("bob@example.net", None, "team+fwd_from@example.org"),
    )
    reply = asyncio.run(service.commit(commit("x", targets=targets), BODY))
    assert reply.code == 250, reply
    [queued] = service.queue.load(clean=False)
    assert [(r.address, r.via) for r in queued.recipients] == [
        ("bob@example.net", "team+fwd_from@example.org")
    ]


@pytest.mark.parametrize(
    "targets, broken, kept",
    [
        # the remote copy queued, alice's failed: the remote address gets it twice
        ((("bob@example.net", None), ("alice@example.org", "alice")), {"alice"}, 1),
        # alice and alice+x are one mailbox, one copy, and it failed: nobody gets it twice
        ((("alice@example.org", "alice"), ("alice+x@example.org", "alice")), {"alice"}, 0),
        # an alias that leads to alice and carol beside alice: alice's one copy is kept
        (
            (
                ("alice@example.org", "alice"),
                ("team@example.org", "alice"),
                ("team@example.org", "carol"),
            ),
            {"carol"},
            1,
        ),
    ],
    ids=["remote-queued", "one-mailbox-twice-named", "alias-beside-its-member"],
)
def test_a_local_retry_that_cannot_be_queued_says_how_many_copies_are_made_twice(
    service, monkeypatch, caplog, targets, broken, kept
):
    """A local copy failed and its retry cannot be queued (the disk filled in between): the
    client gets 4xx and sends the message again, so every copy kept already is made twice.
    RFC 5321 6.1 prefers that to a loss; the log says how many, counted as copies are made
    (one a mailbox, one a remote address: an attacker's pass found the recipients counted)."""
    put = service.queue.put

    def fills(item, *args):
        if any(r.mailbox for r in item.recipients):  # (the local retry's item)
            raise OSError(28, "No space left on device")
        return put(item, *args)

    async def deliver(mailbox, head, body, since=None):
        if mailbox in broken:
            raise OSError(5, "Input/output error")
        return 1

    monkeypatch.setattr(service.queue, "put", fills)
    monkeypatch.setattr(service.writer, "deliver", deliver)
    request = commit("", targets=tuple(Target(a, m) for a, m in targets))
    reply = asyncio.run(service.commit(request, BODY))
    assert reply.code // 100 == 4, reply
    said = [r.getMessage() for r in caplog.records if "local retry" in r.getMessage()]
    assert len(said) == 1 and f"already ({kept}:" in said[0] and "twice" in said[0], said

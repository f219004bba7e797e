"""Backscatter (attacker's pass 7b, F1): mail another server sends to a local alias that
forwards to a remote address ("me: me@gmail.com") is queued; when the forward target refuses it
or defers it, a bounce or a delay warning must not go to a sender whom nothing verified: a
spammer forges that address, and the notice reflects the spam to it.

One mailerd for the module, with an untrusted listener (198.51.100.1:25, --inbound-auth header
by default) and the aliases below; the test client connects from 198.51.100.254, which the SPF
records of backscatter.zone allow or not. The forward targets are mx1's `bad*@*` (550 5.1.1)
and mx2's hold.test (451 for ever); the senders' MX is mx1, where any notice would arrive.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from .conftest import (
    Internet,
    Mailerd,
    check_mailerd_runs,
    finish_or_fail,
    parse_dsn,
    send_inbound,
    token,
    wait_until,
)

ALIASES = "fwd-bad: bad-forward@reject.test\nfwd-hold: held-forward@hold.test\n"
REFUSED, HELD = "fwd-bad@example.org", "fwd-hold@example.org"
QUIET = 2.0  # how long to keep watching for a notice that must not come


@pytest.fixture(scope="module")
def mx(internet: Internet, tmp_path_factory) -> Iterator[Mailerd]:
    base = tmp_path_factory.mktemp("backscatter")
    aliases = base / "aliases"
    aliases.write_text(ALIASES)
    extra = ["--aliases", str(aliases), "--delay-warning", "2s"]
    m = Mailerd(internet.netns, base, name="backscatter", extra=extra)
    check_mailerd_runs(m)
    m.start()
    yield m
    finish_or_fail(m)


@pytest.mark.parametrize(
    "domain, spf",
    [("spf-pass.test", "pass"), ("spf-fail.test", "fail"), ("spf-soft.test", "softfail"),
     ("spf-none.test", "none")],
)  # fmt: skip
def test_a_forward_s_envelope_records_the_untrusted_listener_and_the_sender_s_spf(
    mx: Mailerd, domain: str, spf: str
):
    sub = send_inbound(f"{token('v')}@{domain}", HELD)
    env = mx.envelope(sub.queue_id)  # (written before the 250)
    assert env is not None, mx.log_tail()
    assert [r["address"] for r in env["recipients"]] == ["held-forward@hold.test"]
    assert (env["inbound"], env["sender_spf"]) == (True, spf), env


def test_the_owner_s_mail_is_not_marked_inbound(mx: Mailerd):
    sub = mx.submit(f"{token('o')}@spf-fail.test", ["held-owner@hold.test"])
    env = mx.envelope(sub.queue_id)
    assert env is not None
    assert (env["inbound"], env["sender_spf"]) == (False, ""), env


def notices_to(net: Internet, address: str) -> list[dict]:
    """What mx1 (every sender's MX here) accepted from <> for `address`: bounces, warnings."""
    return [
        t
        for t in net.receivers["mx1"].transactions()
        if t["mail_from"] == "" and address in t["rcpt_tos"]
    ]


def wait_logged(m: Mailerd, line: str, timeout: float = 15.0) -> None:
    assert wait_until(lambda: line in m.log_text(), timeout), (
        f"never logged {line!r}:\n{m.log_tail()}"
    )


def wait_status(m: Mailerd, queue_id: str, status: str, timeout: float = 15.0) -> None:
    found = wait_until(
        lambda: [d for d in m.deliveries(queue_id=queue_id) if d["status"] == status], timeout
    )
    assert found, f"{queue_id}: no status={status}\n{m.log_tail()}"


def no_notice_line(queue_id: str, what: str, sender: str, why: str) -> str:
    return (
        f"{queue_id}: no {what} to <{sender}>: forwarded mail from a sender SPF did not verify "
        f"({why})"
    )


@pytest.mark.parametrize(
    "domain, spf",
    [("spf-fail.test", "fail"), ("spf-soft.test", "softfail"), ("spf-none.test", "none")],
)
def test_a_refused_forward_from_a_forged_sender_is_not_bounced(
    internet: Internet, mx: Mailerd, domain: str, spf: str
):
    """The forward target refuses (550): the forged sender gets nothing; the log says why."""
    sender = f"{token('victim')}@{domain}"
    sub = send_inbound(sender, REFUSED, subject="BUY CHEAP PILLS")
    wait_status(mx, sub.queue_id, "bounced")
    wait_logged(mx, no_notice_line(sub.queue_id, "bounce", sender, spf))
    assert wait_until(lambda: not mx.in_queue(sub.queue_id), 10), mx.log_tail()
    time.sleep(QUIET)
    assert notices_to(internet, sender) == [], "a bounce went to the forged sender"
    assert f"bounce to <{sender}> queued" not in mx.log_text()
    assert mx.log_text().count(f"{sub.queue_id}: no bounce") == 1


def test_a_refused_forward_from_an_spf_verified_sender_is_bounced(internet: Internet, mx: Mailerd):
    sender = f"{token('honest')}@spf-pass.test"
    send_inbound(sender, REFUSED)
    assert wait_until(lambda: notices_to(internet, sender), 15), mx.log_tail()
    [notice] = notices_to(internet, sender)
    dsn = parse_dsn(notice["data"].encode("latin-1"))
    block = dsn.recipients.get("bad-forward@reject.test")
    assert block is not None and block["Action"].strip() == "failed", dsn.text


def test_no_delay_warning_for_a_held_forward_from_a_forged_sender(internet: Internet, mx: Mailerd):
    sender = f"{token('victim')}@spf-fail.test"
    sub = send_inbound(sender, HELD)
    wait_logged(mx, no_notice_line(sub.queue_id, "delay warning", sender, "fail"))
    time.sleep(QUIET)
    assert notices_to(internet, sender) == [], "a delay warning went to the forged sender"
    assert mx.envelope(sub.queue_id)["warned"], "said once, not at every deferral"


def test_a_delay_warning_for_a_held_forward_from_an_spf_verified_sender_goes(
    internet: Internet, mx: Mailerd
):
    sender = f"{token('honest')}@spf-pass.test"
    send_inbound(sender, HELD)
    assert wait_until(lambda: notices_to(internet, sender), 15), mx.log_tail()
    dsn = parse_dsn(notices_to(internet, sender)[0]["data"].encode("latin-1"))
    block = dsn.recipients.get("held-forward@hold.test")
    assert block is not None and block["Action"].strip() == "delayed", dsn.text


def test_the_owner_s_mail_still_bounces(internet: Internet, mx: Mailerd):
    """Submitted on the trusted listener: bounced to its sender, whatever SPF would say."""
    sender = f"{token('owner')}@spf-fail.test"
    mx.submit(sender, [f"bad-{token('o')}@reject.test"])
    assert wait_until(lambda: notices_to(internet, sender), 15), mx.log_tail()

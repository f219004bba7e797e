"""Forwarded mail leaves from its alias's address (mailerd/forwarding.py), over the wire: mail
another server sends to a local alias that forwards to a remote address reaches the target (mx1)
with MAIL FROM <ALIAS+fwd_from=LOCAL=DOMAIN@example.org>, which SPF lets this host send; the
target's bounce to that address comes back to the alias's own targets, and never goes on to the
original sender (the address relays nothing, whatever its tag says).

One mailerd for the module, with an untrusted listener (198.51.100.1:25) and the aliases below;
the test client, as another server, connects from 198.51.100.254.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import (
    LOCAL_DOMAIN,
    Internet,
    Mailerd,
    check_mailerd_runs,
    finish_or_fail,
    send_inbound,
    token,
    wait_until,
)

ALIASES = """\
away: gone@pref.test
owner: owner-gone@pref.test
keep: keeper, kept@pref.test
open: open-gone@pref.test
fail: fail-gone@pref.test
"""  # (an alias, and a target, for each test)
WAIT = 15.0


@pytest.fixture(scope="module")
def mx(internet: Internet, tmp_path_factory) -> Iterator[Mailerd]:
    base = tmp_path_factory.mktemp("forwarding")
    aliases = base / "aliases"
    aliases.write_text(ALIASES)
    m = Mailerd(internet.netns, base, name="forwarding", extra=["--aliases", str(aliases)])
    check_mailerd_runs(m)
    m.add_user("keeper")
    m.start()
    yield m
    finish_or_fail(m)


def arrived(internet: Internet, rcpt: str, mx: Mailerd) -> dict:
    """The one transaction mx1 accepted for `rcpt`."""
    assert wait_until(lambda: internet.receivers["mx1"].delivered(rcpt), WAIT), mx.log_tail()
    [transaction] = internet.receivers["mx1"].delivered(rcpt)
    return transaction


def test_a_forward_leaves_from_the_alias_with_the_sender_in_its_tag(internet: Internet, mx):
    local = token("zed")
    sender = f"{local}@spf-pass.test"
    send_inbound(sender, f"away+news@{LOCAL_DOMAIN}", "forwarded")
    t = arrived(internet, "gone@pref.test", mx)
    assert t["mail_from"] == f"away+fwd_from={local}=spf-pass.test@{LOCAL_DOMAIN}"
    assert t["rcpt_tos"] == ["gone@pref.test"]
    assert f"From: <{sender}>" in t["data"]  # (the content as it came)


def test_a_local_sender_s_mail_to_the_alias_keeps_its_sender(internet: Internet, mx):
    sender = mx.add_user(token("owner"))
    mx.submit(sender, [f"owner@{LOCAL_DOMAIN}"])
    assert arrived(internet, "owner-gone@pref.test", mx)["mail_from"] == sender


def test_the_target_s_bounce_and_auto_reply_come_back_to_the_alias_and_go_no_further(
    internet: Internet, mx
):
    local = token("victim")
    sender = f"{local}@spf-pass.test"
    target = "kept@pref.test"
    mx1 = internet.receivers["mx1"]
    send_inbound(sender, f"keep@{LOCAL_DOMAIN}", "first")
    returned = arrived(internet, target, mx)["mail_from"]
    assert returned == f"keep+fwd_from={local}=spf-pass.test@{LOCAL_DOMAIN}"
    assert wait_until(lambda: len(mx.mailbox("keeper")) == 1, WAIT), mx.log_tail()
    # mx1 bounces it later, to the envelope sender it got (from <>); an answering machine
    # there replies to it too, from an address of its own (not <>, as RFC 3834 would have it)
    for n, (from_, subject) in enumerate(
        [("", "Undelivered Mail Returned"), ("vacation@pref.test", "Out of office")], start=2
    ):
        send_inbound(from_, returned, subject)
        assert wait_until(lambda n=n: len(mx.mailbox("keeper")) == n, WAIT), mx.log_tail()
        assert subject.encode() in mx.mailbox("keeper")[n - 1]
        # the alias's forward of it leaves from <>, a notice that nothing answers again
        assert wait_until(lambda n=n: len(mx1.delivered(target)) == n, WAIT), mx.log_tail()
        assert mx1.delivered(target)[n - 1]["mail_from"] == ""
    assert wait_until(lambda: not mx.queued_ids(), WAIT), mx.log_tail()
    assert not internet.rcpts_anywhere(sender), "relayed to the original sender"


def test_a_forward_of_a_sender_that_failed_spf_keeps_it(internet: Internet, mx):
    """Rewritten, it would pass SPF at the target in example.org's name."""
    sender = f"{token('forged')}@spf-fail.test"
    send_inbound(sender, f"fail@{LOCAL_DOMAIN}", "forged")
    assert arrived(internet, "fail-gone@pref.test", mx)["mail_from"] == sender


def test_a_forged_tag_relays_nothing(internet: Internet, mx):
    """Anyone may write to `open+fwd_from=x=elsewhere@…`: it is the alias, nothing more."""
    stranger = f"{token('x')}@pref.test"
    tagged = f"open+fwd_from={stranger.replace('@', '=')}@{LOCAL_DOMAIN}"
    send_inbound("", tagged, "relay me")
    arrived(internet, "open-gone@pref.test", mx)
    assert wait_until(lambda: not mx.queued_ids(), WAIT), mx.log_tail()
    assert not internet.rcpts_anywhere(stranger), "relayed to the address in the tag"

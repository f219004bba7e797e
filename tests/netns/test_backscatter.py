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

import contextlib
import re
import smtplib
from collections.abc import Iterator

import pytest

from .conftest import (
    CLIENT_HELO,
    IO_TIMEOUT,
    NS_V4,
    Internet,
    Mailerd,
    Submitted,
    check_mailerd_runs,
    finish,
    make_message,
    token,
)

ALIASES = "fwd-bad: bad-forward@reject.test\nfwd-hold: held-forward@hold.test\n"
REFUSED, HELD = "fwd-bad@example.org", "fwd-hold@example.org"


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
    problems = finish(m)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def send_inbound(sender: str, rcpt: str, subject: str = "inbound") -> Submitted:
    """One transaction on the untrusted listener (port 25), as another server would send."""
    body = make_message(sender, [rcpt], subject)
    with smtplib.SMTP(NS_V4, 25, local_hostname=CLIENT_HELO, timeout=IO_TIMEOUT) as s:
        assert s.ehlo(CLIENT_HELO)[0] == 250
        code, text = s.mail(sender)
        assert code == 250, (code, text)
        code, text = s.rcpt(rcpt)
        assert code == 250, (code, text)
        code, text = s.data(body)
        reply = text.decode("utf-8", "replace")
        assert code == 250, (code, reply)
        with contextlib.suppress(smtplib.SMTPException, OSError):
            s.quit()
    found = re.search(r"queued as ([0-9A-Z]+)", reply)
    assert found, reply
    return Submitted(found.group(1), sender, [rcpt], body, reply)


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

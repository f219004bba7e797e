"""The hop limit against a mail loop (RFC 5321 6.3): a message whose header section has more
than MAX_HOPS (50) Received: fields is refused with 554 5.4.0 at its end of data, on the
loopback and the network listener and through `sendmail -bs`, and the session goes on; a
maildrop file with that many is removed by the pickup and said in the log, like any file SMTP
would refuse. Fifty pass, everywhere."""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys

import pytest

from mailerd.ipc import maildrop
from mailerd.smtp.data import MAX_HOPS, received_fields

from .conftest import IO_TIMEOUT, Mailerd, finish, wait_until

SENDER = "a@client.test"


def message(hops: int) -> bytes:
    """A message that went through `hops` MTAs (each field folded, as MTAs write them)."""
    fields = b"".join(
        b"Received: from relay%d.example (relay%d.example [192.0.2.1])\r\n"
        b"\tby mx.example.org; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (n, n)
        for n in range(hops)
    )
    return fields + b"From: a@client.test\r\nSubject: %d hops\r\n\r\nbody\r\n" % hops


@pytest.fixture(scope="module")
def hops_server(tmp_path_factory):
    m = Mailerd(tmp_path_factory.mktemp("hops"), name="hops")
    m.start()
    yield m
    finish(m)


def stored_hops(m: Mailerd, user: str) -> list[int]:
    """The Received: fields of each message in the mailbox (ours included)."""
    return [received_fields(m.read(user, n)) for n in m.messages(user)]


@pytest.mark.parametrize("trusted", [True, False], ids=["loopback", "network"])
def test_too_many_hops_refused_and_the_session_goes_on(hops_server: Mailerd, trusted: bool):
    m = hops_server
    user = m.new_user("hop")
    rcpt = [f"{user}@example.org"]
    with m.smtp(trusted=trusted) as s:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail(SENDER, rcpt, message(MAX_HOPS + 1))
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            554,
            b"5.4.0 Too many hops",
        )
        assert s.sendmail(SENDER, rcpt, message(MAX_HOPS)) == {}
        s.quit()
    # The refused one came first: had it been stored, it would be message 1.
    assert m.wait_messages(user, 1) == [1]
    assert stored_hops(m, user) == [MAX_HOPS + 1]  # the fifty and ours
    assert b"Subject: 50 hops" in m.read(user, 1)
    assert "554 5.4.0 Too many hops" in m.stderr_text()  # the rejection is logged


def test_too_many_hops_refused_by_sendmail_bs(hops_server: Mailerd):
    m = hops_server
    user = m.new_user("bs")
    conf = m.base / "sendmail.conf"
    conf.write_text(f"[mailerd]\nqueue = {m.queue}\ndomain = example.org\n")
    envelope = b"MAIL FROM:<%s>\r\nRCPT TO:<%s@example.org>\r\nDATA\r\n" % (
        SENDER.encode(),
        user.encode(),
    )
    dialogue = b"EHLO client.test\r\n"
    dialogue += envelope + message(MAX_HOPS + 1) + b".\r\n"
    dialogue += envelope + message(MAX_HOPS) + b".\r\nQUIT\r\n"
    done = subprocess.run(
        [sys.executable, "-m", "mailerd", "sendmail", "-C", str(conf), "-bs"],
        input=dialogue,
        capture_output=True,
        timeout=IO_TIMEOUT,
    )
    replies = done.stdout.decode()
    assert done.returncode == 0, (replies, done.stderr.decode())
    assert "\r\n554 5.4.0 Too many hops\r\n" in replies, replies
    assert replies.count("250 2.0.0 Ok: queued as") == 1, replies
    assert m.wait_messages(user, 1) == [1]
    assert stored_hops(m, user) == [MAX_HOPS + 1]


def test_too_many_hops_in_the_maildrop_removed_and_said(hops_server: Mailerd):
    m = hops_server
    user = m.new_user("drop")
    looped = maildrop.submit(str(m.queue), SENDER, [f"{user}@example.org"], message(MAX_HOPS + 1))
    maildrop.poke(str(m.queue))
    said = (
        f"maildrop {looped} (uid {os.geteuid()}): too many hops (51 Received: fields, at most 50)"
    )
    assert wait_until(lambda: said in m.stderr_text(), 10), m.stderr_text()[-2000:]
    assert not (m.queue / maildrop.MAILDROP / looped).exists()
    maildrop.submit(str(m.queue), SENDER, [f"{user}@example.org"], message(MAX_HOPS))
    maildrop.poke(str(m.queue))
    assert m.wait_messages(user, 1) == [1]
    assert stored_hops(m, user) == [MAX_HOPS + 1]
    assert b"Subject: 50 hops" in m.read(user, 1)

"""Outbound correctness and diagnosis (issue #16): 8-bit mail for a server without 8BITMIME,
failures mailerd finds itself told as its own, QUIT at the end of every session, a log line for
every address tried, the -v dialogue, and a full queue said once.

mailerd in a network namespace with the fake Internet of conftest.py; the names are in
diagnosis.zone, and this module adds the addresses and receivers they need (see `hosts`).
"""

from __future__ import annotations

import base64
import contextlib
import email
import email.message
import email.policy
import email.utils
import errno
import os
import re
import smtplib
import subprocess
from pathlib import Path

import dkim
import pytest

from mailerd import signing
from mailerd.commands import dkimkeys

from .conftest import (
    CLIENT_HELO,
    DEAD,
    HOSTNAME,
    MX2,
    SMARTHOST_PASSWORD,
    SMARTHOST_USER,
    Internet,
    Mailerd,
    Receiver,
    token,
    wait_until,
)
from .test_outbound import wait_delivered, wait_mailbox

SEVEN = "198.51.100.30"  # offers neither 8BITMIME nor SMTPUTF8
VERIFY_V4, VERIFY_V6 = "198.51.100.31", "2001:db8::31"  # certificates that do not verify
DROPPER = "198.51.100.32"  # drops the connection at RCPT
REFUSING_V6 = "2001:db8::25"  # nothing listens

pytestmark = pytest.mark.usefixtures("hosts")


@pytest.fixture(scope="module")
def hosts(internet: Internet) -> dict[str, Receiver]:
    """The addresses of diagnosis.zone in this module's namespace, and their receivers."""
    ns = internet.netns
    for address in (SEVEN, VERIFY_V4, DROPPER):
        _ip(ns.name, "addr", "add", f"{address}/24", "dev", ns.veth_ns)
    for address in (VERIFY_V6, REFUSING_V6):
        _ip(ns.name, "-6", "addr", "add", f"{address}/64", "dev", ns.veth_ns, "nodad")
    refuse_sender = {
        "id": "refuse-sender",
        "match": "refused-*@*",
        "at": "mail",
        "reply": "550 5.7.1 mx.seven.test refuses this sender",
    }
    tls = {"cert": str(internet.cert), "key": str(internet.key)}
    return {
        "seven": internet.start_receiver(
            "seven",
            f"{SEVEN}:25",
            {
                "hostname": "mx.seven.test",
                "8bitmime": False,
                "smtputf8": False,
                "rules": [refuse_sender],
            },
        ),
        "dropper": internet.start_receiver(
            "dropper",
            f"{DROPPER}:25",
            {
                "hostname": "mx2.tried.test",
                "rules": [{"id": "drop", "match": "*@tried.test", "at": "rcpt", "reply": "drop"}],
            },
        ),
        "verify6": internet.start_receiver(
            "verify6", f"[{VERIFY_V6}]:25", {"hostname": "mx.verify.test", "tls": tls}
        ),
        "verify4": internet.start_receiver(
            "verify4", f"{VERIFY_V4}:25", {"hostname": "mx.verify.test", "tls": tls}
        ),
    }


def _ip(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "-n", namespace, *args], check=True, capture_output=True)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def submit(m: Mailerd, sender: str, rcpts: list[str], body: bytes, options: list[str]) -> str:
    """One transaction with MAIL FROM parameters (BODY=8BITMIME, SMTPUTF8); the queue id."""
    with m.smtp() as s:
        s.ehlo(CLIENT_HELO)
        code, text = s.mail(sender, options)
        assert code == 250, (code, text)
        for rcpt in rcpts:
            code, text = s.rcpt(rcpt)
            assert code == 250, (code, text)
        code, text = s.data(body)
        assert code == 250, (code, text)
        with contextlib.suppress(smtplib.SMTPException, OSError):
            s.quit()
    found = re.search(rb"queued as ([0-9A-Z]+)", text)
    assert found, text
    return found.group(1).decode()


def headers(sender: str, rcpt: str, subject: str) -> list[str]:
    return [
        f"From: <{sender}>",
        f"To: <{rcpt}>",
        f"Subject: {subject}",
        f"Message-ID: <{token('m')}@client.test>",
        f"Date: {email.utils.formatdate()}",
        f"X-Test-Marker: {token('marker')}",
    ]


def crlf(lines: list[str]) -> bytes:
    return "\r\n".join(lines).encode("utf-8")


def log_lines(m: Mailerd, queue_id: str) -> list[str]:
    """The log's lines about one message, without the timestamp and process."""
    return [
        line.split(": ", 1)[1]
        for line in m.log_text().splitlines()
        if f": {queue_id}: " in line and ": " in line
    ]


def wait_status(m: Mailerd, rcpt: str, status: str, timeout: float = 15.0) -> dict:
    return m.wait_delivery(rcpt, status, timeout)


def notice_text(m: Mailerd, user: str) -> str:
    """The one notice in `user`'s mailbox, unfolded and unwrapped to single spaces."""
    [raw] = wait_mailbox(m, user)
    return " ".join(raw.decode("utf-8").split())


def connections_since(r: Receiver, first: int) -> set[int]:
    return {e["conn"] for e in r.events() if e["event"] == "connect" and e["conn"] > first}


def last_connection(r: Receiver) -> int:
    return max((e["conn"] for e in r.events() if e["event"] == "connect"), default=0)


def quits(r: Receiver) -> set[int]:
    return {e["conn"] for e in r.events("QUIT")}


# --------------------------------------------------------------------------------------------
# 8-bit mail and a server without 8BITMIME
# --------------------------------------------------------------------------------------------


def eight_bit_message(sender: str, rcpt: str) -> bytes:
    """multipart/mixed (labelled 8bit): an 8-bit text part (with a dot line, trailing white
    space, and a line whose soft line break would start a "--outer"), an ASCII part, and a
    message/rfc822 holding an 8-bit message."""
    return crlf(
        [
            *headers(sender, rcpt, "8-bit content"),
            "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="outer"',
            "Content-Transfer-Encoding: 8bit",
            "",
            "This is a multi-part message in MIME format.",
            "--outer",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            "Grüße aus Köln – with 8-bit text.",
            ".a line starting with a dot, ünd more",
            "trailing white space after 8-bit: é ",
            "x" * 75 + "--outer",
            "--outer",
            "Content-Type: text/plain; charset=us-ascii",
            "",
            "A plain ASCII part, left as it is.",
            "--outer",
            "Content-Type: message/rfc822",
            "Content-Transfer-Encoding: 8bit",
            "",
            "Subject: the inner message",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            "An inner message: naïve café.",
            "--outer--",
            "",
        ]
    )


def leaves(msg: email.message.Message) -> list[email.message.Message]:
    return [part for part in msg.walk() if not part.is_multipart()]


def decoded(part: email.message.Message) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes), part
    return payload.replace(b"\r\n", b"\n")


def test_8bit_mail_is_converted_to_quoted_printable(internet: Internet, mta: Mailerd, hosts):
    """RFC 6152: no 8-bit octet goes to mx.seven.test, which does not offer 8BITMIME; the 8-bit
    parts arrive as quoted-printable, the containers relabelled 7bit, the rest as it was, and
    the stdlib's parser finds the same parts with the same content."""
    sender = mta.add_user(token("alice"))
    rcpt = f"{token('eight')}@seven.test"
    body = eight_bit_message(sender, rcpt)
    queue_id = submit(mta, sender, [rcpt], body, ["BODY=8BITMIME"])
    t = wait_delivered(internet, rcpt, "seven", mta)
    data = t["data"].encode("latin-1")
    assert data.isascii(), f"8-bit octets went to a server without 8BITMIME:\n{data[:3000]!r}"
    assert "BODY=8BITMIME" not in [o.upper() for o in t["mail_options"]], t["mail_options"]
    original = email.message_from_bytes(body, policy=email.policy.compat32)
    relayed = email.message_from_bytes(data, policy=email.policy.compat32)
    assert relayed["Received"] and relayed["Subject"] == original["Subject"]
    shape = [(p.get_content_type(), p.get_boundary()) for p in original.walk()]
    assert [(p.get_content_type(), p.get_boundary()) for p in relayed.walk()] == shape
    assert not [p.defects for p in relayed.walk() if p.defects], "the converted MIME is broken"
    for before, after in zip(leaves(original), leaves(relayed), strict=True):
        assert decoded(after) == decoded(before), (decoded(before), decoded(after))
    encodings = [p.get("Content-Transfer-Encoding") for p in relayed.walk()]
    # multipart, 8-bit text, ASCII text (untouched: none), message/rfc822, its 8-bit text
    assert encodings == ["7bit", "quoted-printable", None, "7bit", "quoted-printable"], encodings
    assert f"{queue_id}: host mx.seven.test[{SEVEN}] does not support 8BITMIME" in "\n".join(
        log_lines(mta, queue_id)
    )


def dkim_signed(sender: str, rcpt: str) -> bytes:
    return crlf(
        [
            "DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from:to:subject;"
            " bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AAAA",
            *headers(sender, rcpt, "signed, 8-bit"),
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            "Signed 8-bit text: Grüße.",
            "",
        ]
    )


def signed_part(sender: str, rcpt: str) -> bytes:
    return crlf(
        [
            *headers(sender, rcpt, "multipart/signed, 8-bit"),
            "MIME-Version: 1.0",
            'Content-Type: multipart/signed; protocol="application/pgp-signature";'
            ' micalg=pgp-sha256; boundary="sig"',
            "",
            "--sig",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
            "",
            "Signed 8-bit text: Grüße.",
            "--sig",
            "Content-Type: application/pgp-signature",
            "",
            "-----BEGIN PGP SIGNATURE-----",
            "AAAA",
            "-----END PGP SIGNATURE-----",
            "--sig--",
            "",
        ]
    )


@pytest.mark.parametrize(
    "make,reason",
    [
        pytest.param(dkim_signed, "DKIM signature", id="dkim-signature"),
        pytest.param(signed_part, "inside multipart/signed", id="multipart-signed"),
    ],
)
def test_8bit_mail_that_cannot_be_converted_bounces_with_5_6_3(mta: Mailerd, hosts, make, reason):
    """A signature that conversion would break: bounced with 5.6.3, told as mailerd's own
    finding (no "host ... said"), nothing sent, and the session ended with QUIT."""
    seven = hosts["seven"]
    before = last_connection(seven)
    user = token("alice")
    sender = mta.add_user(user)
    rcpt = f"{token('signed')}@seven.test"
    submit(mta, sender, [rcpt], make(sender, rcpt), ["BODY=8BITMIME"])
    line = wait_status(mta, rcpt, "bounced")
    assert "5.6.3" in line["reply"] and reason in line["reply"], line["line"]
    text = notice_text(mta, user)
    assert "Status: 5.6.3" in text, text
    assert "Diagnostic-Code: X-Mailerd; mailerd could not deliver the message" in text, text
    assert "said:" not in text and "Remote-MTA" not in text, text
    assert not seven.delivered(rcpt) and not seven.rcpt_events(rcpt)
    new = connections_since(seven, before)
    assert new and new <= quits(seven), f"a session without QUIT:\n{seven.summary()}"


def test_8bit_mail_mailerd_signed_is_converted_and_signed_anew(
    internet: Internet, mailerd_factory, tmp_path, hosts
):
    """mailerd's own DKIM signature is no reason to bounce: the message converted for
    mx.seven.test carries one new signature of the same key, over what was sent, and it
    verifies."""
    path = tmp_path / "dkim" / "sel.key"
    dkimkeys.write_key(str(path), dkimkeys.new_key("rsa", 2048))
    key = signing.load_key("example.org", "sel", str(path))
    m = mailerd_factory("--dkim-key", f"example.org:sel:{path}")
    sender = m.add_user(token("alice"))
    rcpt = f"{token('resign')}@seven.test"
    body = eight_bit_message(sender, rcpt)
    queue_id = submit(m, sender, [rcpt], body, ["BODY=8BITMIME"])
    t = wait_delivered(internet, rcpt, "seven", m)
    data = t["data"].encode("latin-1")
    assert data.isascii(), "8-bit octets went to a server without 8BITMIME"
    assert data.count(b"DKIM-Signature:") == 1, data[:2000]
    record = {f"{key.dns_name}.".encode(): key.dns_record().encode()}
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record.get(name)), data[:2000]
    relayed = email.message_from_bytes(data, policy=email.policy.compat32)
    assert [decoded(p) for p in leaves(relayed)] == [
        decoded(p) for p in leaves(email.message_from_bytes(body, policy=email.policy.compat32))
    ]
    assert "quoted-printable, DKIM-signed anew for example.org" in "\n".join(log_lines(m, queue_id))


def test_smtputf8_refusal_is_told_as_mailerd_s_own(mta: Mailerd, hosts):
    """The bounce for a server without SMTPUTF8 does not claim that the host said 553 5.6.7
    (it said nothing of the kind), and the session ends with QUIT."""
    seven = hosts["seven"]
    before = last_connection(seven)
    user = token("alice")
    sender = mta.add_user(user)
    rcpt = f"{token('utf')}@seven.test"
    body = crlf([*headers(sender, rcpt, "Grüße, SMTPUTF8"), "", "text", ""])
    submit(mta, sender, [rcpt], body, ["SMTPUTF8"])
    wait_status(mta, rcpt, "bounced")
    text = notice_text(mta, user)
    assert "Status: 5.6.7" in text, text
    assert "mailerd could not deliver the message: it requires SMTPUTF8" in text, text
    assert "said:" not in text and "Remote-MTA" not in text, text
    new = connections_since(seven, before)
    assert new and new <= quits(seven), f"a session without QUIT:\n{seven.summary()}"


def test_a_refused_sender_s_session_ends_with_quit(mta: Mailerd, hosts):
    """RFC 5321 3.3: a 550 to MAIL FROM ends the transaction, and the session with QUIT."""
    seven = hosts["seven"]
    user = token("refused-alice")
    sender = mta.add_user(user)
    rcpt = f"{token('quit')}@seven.test"
    mta.submit(sender, [rcpt], subject="refused sender")
    line = wait_status(mta, rcpt, "bounced")
    assert "refuses this sender" in line["reply"], line["line"]
    [mail] = [e for e in seven.events("MAIL") if e["arg"] == sender]
    assert wait_until(lambda: mail["conn"] in quits(seven), 5), seven.summary()


# --------------------------------------------------------------------------------------------
# Every address tried is logged
# --------------------------------------------------------------------------------------------


def test_every_address_tried_is_logged(internet: Internet, mta: Mailerd, hosts):
    """tried.test: MX 10 refuses connections (IPv6), MX 20 drops the connection at RCPT, MX 30
    takes the message. Both failures get a line of their own, in Postfix's words, before the
    status=sent line."""
    rcpt = f"{token('tried')}@tried.test"
    queue_id = mta.submit(mta.add_user(token("alice")), [rcpt], subject="tried").queue_id
    wait_delivered(internet, rcpt, "mx2", mta)
    line = wait_status(mta, rcpt, "sent")
    assert line["relay"] == f"mx3.tried.test[{MX2}]", line["line"]
    lines = log_lines(mta, queue_id)
    refused = f"{queue_id}: connect to mx1.tried.test[{REFUSING_V6}]:25: Connection refused"
    lost = f"{queue_id}: lost connection with mx2.tried.test[{DROPPER}] while sending RCPT TO"
    assert refused in lines and lost in lines, "\n".join(lines)
    assert lines.index(refused) < lines.index(lost) < lines.index(line["line"].split(": ", 1)[1])
    assert hosts["dropper"].events("drop"), hosts["dropper"].summary()


def test_each_address_failing_tls_verification_is_logged(mailerd_factory, hosts):
    """--outbound-tls verify, one MX with two addresses, neither certificate verifies: a line
    names each address (not only the last one, in the deferral)."""
    m = mailerd_factory("--outbound-tls", "verify")
    rcpt = f"{token('verify')}@verify.test"
    queue_id = m.submit(m.add_user(token("alice")), [rcpt], subject="verify").queue_id
    wait_status(m, rcpt, "deferred")
    lines = "\n".join(log_lines(m, queue_id))
    for where in (f"[{VERIFY_V6}]:25", f"[{VERIFY_V4}]:25"):
        assert f"{queue_id}: certificate verification failed for mx.verify.test{where}: " in lines
    assert not hosts["verify6"].transactions() and not hosts["verify4"].transactions()


# --------------------------------------------------------------------------------------------
# -v: the outbound dialogue
# --------------------------------------------------------------------------------------------


def test_verbose_logs_the_outbound_dialogue(internet: Internet, mailerd_factory, tmp_path):
    """With -v, the session with the smarthost is logged command by command and reply by reply
    under the queue id: never the message, never what AUTH sends."""
    auth = tmp_path / "relay-auth"
    auth.write_text(f"{SMARTHOST_USER}:{SMARTHOST_PASSWORD}\n")
    auth.chmod(0o600)
    # (A relayhost given as an address: its certificate, for a name, is not checked.)
    m = mailerd_factory(
        "-v", "--relayhost", f"{DEAD}:587", "--relay-auth", str(auth), "--outbound-tls", "encrypt"
    )
    rcpt = f"{token('verbose')}@pref.test"
    sub = m.submit(m.add_user(token("alice")), [rcpt], subject="a secret subject")
    wait_delivered(internet, rcpt, "smarthost", m)
    wait_status(m, rcpt, "sent")
    peer = f"{sub.queue_id}: [{DEAD}]:587"
    wait_until(lambda: f"{peer} < 221" in m.log_text(), 5)
    said = [line[len(peer) + 1 :] for line in log_lines(m, sub.queue_id) if line.startswith(peer)]
    expected = [
        "< 220 ",
        f"> EHLO {HOSTNAME}",  # (smtplib writes "ehlo")
        "< 250-smarthost.test",
        "> STARTTLS",
        "< 220 ",
        "> AUTH PLAIN ***",
        "< 235 ",
        f"> mail FROM:<{sub.sender}>",
        f"> rcpt TO:<{rcpt}>",
        "> DATA",
        "< 354 ",
        "< 250 ",
        "> quit",
        "< 221 ",
    ]
    found = iter(said)
    for step in expected:
        assert any(line.lower().startswith(step.lower()) for line in found), (step, said)
    text = m.log_text()
    marker = re.search(rb"X-Test-Marker: (\S+)", sub.body).group(1).decode()
    secrets = [
        SMARTHOST_PASSWORD,
        base64.b64encode(f"\0{SMARTHOST_USER}\0{SMARTHOST_PASSWORD}".encode()).decode(),
        base64.b64encode(SMARTHOST_PASSWORD.encode()).decode(),
    ]
    assert marker not in text and "a secret subject" not in text, "message content in the log"
    assert not [s for s in secrets if s in text], "an AUTH secret in the log"


# --------------------------------------------------------------------------------------------
# A full queue
# --------------------------------------------------------------------------------------------


def fill(directory: Path) -> Path:
    """A file that takes every free block of the file system `directory` is on."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return path


def test_a_full_queue_is_logged_once_with_its_path(internet: Internet, mailerd_factory):
    """The queue on a small tmpfs, filled while two messages are deferred: their attempts go
    on, and the log says once, with the directory, that the queue cannot be written (no
    traceback per attempt); and once more when it works again."""
    # --min-free 0: MAIL's own space check (worker/reserve.py) would refuse the messages on a
    # queue this small before they could be queued; this test is about what follows.
    m = mailerd_factory("--min-free", "0", start=False, name="fullq")
    m.queue.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(m.queue)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        m.start()
        sender = m.add_user(token("alice"))
        rcpts = [f"{token('full')}@hold.test" for _ in range(2)]
        for rcpt in rcpts:
            m.submit(sender, [rcpt], subject="while the queue fills up")
        for rcpt in rcpts:
            wait_status(m, rcpt, "deferred")
        filler = fill(m.queue)
        for round_ in (2, 3):
            assert m.queue_cli("flush").returncode == 0
            for rcpt in rcpts:
                ok = wait_until(lambda r=rcpt, n=round_: len(m.statuses(r)) >= n, 10)
                assert ok, m.log_tail()
        text = m.log_text()
        full = f"queue: cannot write to {m.queue}/env: No space left on device"
        assert text.count(full) == 1, f"the condition must be said once:\n{m.log_tail()}"
        assert "Traceback" not in text and "delivery attempt failed" not in text, m.log_tail()
        filler.unlink()
        assert m.queue_cli("flush").returncode == 0
        again = f"queue: write to {m.queue}/env works again"
        assert wait_until(lambda: again in m.log_text(), 10), m.log_tail()
    finally:
        m.stop()
        subprocess.run(["umount", "-l", str(m.queue)], check=False)

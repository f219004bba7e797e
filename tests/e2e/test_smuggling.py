"""SMTP smuggling (hannob/smtpsmug vectors) and spool path traversal through recipient names."""

from __future__ import annotations

import time

import pytest

from .conftest import (
    Mailerd,
    check_stored,
    ehlo_keywords,
    expect,
    files_under,
    finish,
    listing,
    mail_rcpt,
    send_message,
)

# End-of-data look-alikes from https://github.com/hannob/smtpsmug; only CRLF.CRLF ends data.
VECTORS = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\r.\n", id="CR.LF"),
    pytest.param(b"\n.\r", id="LF.CR"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\r\n\x00.\r\n", id="CRLF-NUL.CRLF"),
]


def has_bare_cr_or_lf(data: bytes) -> bool:
    stripped = data.replace(b"\r\n", b"")
    return b"\r" in stripped or b"\n" in stripped


@pytest.fixture(scope="module")
def smug_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("smuggling")
    m = Mailerd(base, name="smuggling")
    m.start()
    yield m
    finish(m)


def evil_messages(m: Mailerd) -> list[str]:
    """Every stored message anywhere in the spool whose envelope sender is the smuggler."""
    hits = []
    for rel in files_under(m.spool):
        p = m.spool / rel
        try:
            head = p.read_bytes()[:200]
        except OSError:
            continue
        if head.startswith(b"Return-Path: <evil@x>"):
            hits.append(rel)
    return hits


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "two-writes"])
@pytest.mark.parametrize("vector", VECTORS)
def test_smuggling_vector(smug_server: Mailerd, vector: bytes, split: bool):
    m = smug_server
    victim = m.new_user("victim")
    real = (
        b"From: sender@client.test\r\n"
        b"To: " + victim.encode() + b"@example.org\r\n"
        b"Subject: real message\r\n"
        b"\r\n"
        b"This is the real message."
    )
    smuggled = (
        b"MAIL FROM:<evil@x>\r\n"
        b"RCPT TO:<" + victim.encode() + b"@example.org>\r\n"
        b"DATA\r\n"
        b"From: evil@x\r\n"
        b"Subject: smuggled\r\n"
        b"\r\n"
        b"SMUGGLED BODY\r\n"
    )
    data = real + vector + smuggled
    with m.connect() as c:
        c.start()
        mail_rcpt(c, f"{victim}@example.org")
        expect(c.cmd("DATA"), 354, conn=c)
        if split:
            c.send(real + vector)
            time.sleep(0.3)
            c.send(smuggled + b".\r\nQUIT\r\n")
        else:
            c.send(data + b".\r\nQUIT\r\n")
        replies, eof = c.read_all_replies(timeout=10)
        dialogue = c.dialogue()
    codes = [r.code for r in replies]
    assert len(replies) == 2 and codes[1] == 221, (
        f"expected exactly one end-of-data reply and then 221, got {codes}:\n{dialogue}"
    )
    outcome = replies[0]
    assert outcome.code == 250 or 500 <= outcome.code < 600, dialogue
    assert eof, f"server did not close after QUIT:\n{dialogue}"
    assert not evil_messages(m), f"smuggled message stored: {evil_messages(m)}\n{dialogue}"
    nums = m.messages(victim)
    if has_bare_cr_or_lf(data):
        assert (outcome.code, outcome.enhanced) == (550, "5.5.2"), (
            f"bare CR/LF in DATA must be rejected with 550 5.5.2:\n{dialogue}"
        )
        assert nums == [], f"rejected message was stored: {nums}"
    elif b"\x00" in data:
        assert (outcome.code, outcome.enhanced) == (550, "5.6.0"), (
            f"NUL in DATA must be rejected with 550 5.6.0:\n{dialogue}"
        )
        assert nums == [], f"rejected message was stored: {nums}"
    else:
        assert len(nums) <= 1, nums
        if outcome.code == 250:
            assert nums == [1], nums
            # one message, containing the would-be smuggled commands as plain body text
            check_stored(
                m.read(victim, 1),
                sender="sender@client.test",
                helo="client.test",
                body=data,
            )
        else:
            assert nums == [], nums


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"line one\nline two\r\n", id="bare-LF"),
        pytest.param(b"line one\rline two\r\n", id="bare-CR"),
        pytest.param(b"Subject: x\r\n\r\nends with bare LF\n\r\n", id="bare-LF-before-end"),
        pytest.param(b"Subject: x\r\n\r\nbare CR at line end\r\r\n", id="CR-CRLF"),
        pytest.param(b"Subject: x\r\n\r\nNUL\x00inside\r\n", id="NUL"),
    ],
)
def test_bare_line_ending_rejected_and_session_continues(smug_server: Mailerd, bad: bytes):
    m = smug_server
    user = m.new_user("bare")
    good = b"Subject: good\r\n\r\nclean\r\n"
    with m.connect() as c:
        c.start()
        enhanced = "5.6.0" if b"\x00" in bad else "5.5.2"
        send_message(c, f"{user}@example.org", bad, code=550, enhanced=enhanced)
        assert m.messages(user) == []
        # the session continues and a clean message goes through
        send_message(c, f"{user}@example.org", good)
        expect(c.cmd("QUIT"), 221, conn=c)
    assert m.messages(user) == [1]
    check_stored(m.read(user, 1), sender="sender@client.test", helo="client.test", body=good)


# --------------------------------------------------------------------------------------------
# Path traversal through recipient names
# --------------------------------------------------------------------------------------------

STRICT = ("5.1.3",)
LENIENT = ("5.1.3", "5.1.1")

TRAVERSAL = [
    pytest.param(b"../x@example.org", STRICT, id="dotdot-slash-x"),
    pytest.param(b"..@example.org", STRICT, id="dotdot"),
    pytest.param(b".@example.org", STRICT, id="dot"),
    pytest.param(b".hidden@example.org", STRICT, id="leading-dot"),
    pytest.param(b"a/b@example.org", STRICT, id="slash"),
    pytest.param(b"a/../b@example.org", STRICT, id="slash-dotdot"),
    pytest.param(b"../../../../tmp@example.org", STRICT, id="deep-dotdot"),
    pytest.param(b"../x+tag@example.org", STRICT, id="dotdot-with-tag"),
    pytest.param(b"..@example.net", STRICT, id="dotdot-other-domain"),
    pytest.param(b'"../x"@example.org', LENIENT, id="quoted-dotdot-slash"),
    pytest.param(b'".."@example.org', LENIENT, id="quoted-dotdot"),
    pytest.param(b'"a/b"@example.org', LENIENT, id="quoted-slash"),
    pytest.param(b'"..\\/x"@example.org', LENIENT, id="quoted-escaped-slash"),
    pytest.param(b'"a\x01b"@example.org', LENIENT, id="quoted-ctrl-01"),
    pytest.param(b'"a\x1b[0mb"@example.org', LENIENT, id="quoted-escape"),
    pytest.param(b'"a\x7fb"@example.org', LENIENT, id="quoted-del"),
    pytest.param(b'"a\tb"@example.org', LENIENT, id="quoted-tab"),
    pytest.param(b'"a\x00b"@example.org', LENIENT, id="quoted-nul"),
    pytest.param(b'"a\\\x01b"@example.org', LENIENT, id="quoted-pair-ctrl"),
]


@pytest.fixture(scope="module")
def traversal_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("traversal")
    m = Mailerd(base, name="traversal")
    # Traps: directories that exist where a naive server would resolve these names, so that an
    # "is there a mailbox directory?" check passes for them.
    (base / "x").mkdir()
    (base / "tmp").mkdir()
    m.add_user(".hidden")
    m.add_user("a/b")
    m.add_user("b")
    m.start()
    yield m
    finish(m)


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
@pytest.mark.parametrize("rcpt,allowed", TRAVERSAL)
def test_traversal_recipient_rejected(traversal_server: Mailerd, rcpt, allowed, trusted):
    m = traversal_server
    before = listing(m.base, exclude=("logs",))
    with m.connect(trusted=trusted) as c:
        c.start()
        expect(c.cmd("MAIL FROM:<sender@client.test>"), 250, conn=c)
        r = c.cmd(b"RCPT TO:<" + rcpt + b">")
        d = c.cmd("DATA")
        if d.code == 354:  # the RCPT was (wrongly) accepted: show where the message would go
            c.send(b"Subject: traversal\r\n\r\ntraversal\r\n.\r\n")
            c.read_reply()
        else:
            assert 500 <= d.code < 600, d
        c.cmd("QUIT")
        dialogue = c.dialogue()
    after = listing(m.base, exclude=("logs",))
    changes = sorted(
        p for p in set(before) | set(after) if before.get(p, b"?") != after.get(p, b"?")
    )
    assert r.code == 550 and r.enhanced in allowed, (
        f"RCPT TO:<{rcpt!r}> expected 550 {'/'.join(allowed)}, got {r}\n{dialogue}"
    )
    assert not changes, f"files changed under {m.base}: {changes}\n{dialogue}"


@pytest.mark.parametrize("vector", VECTORS)
def test_bdat_content_is_never_parsed_as_commands(smug_server: Mailerd, vector: bytes):
    """Inside a BDAT chunk, end-of-data look-alikes and commands are just message bytes."""
    m = smug_server
    victim = m.new_user("bdatvictim")
    with m.connect() as c:
        c.start()
        c.send(b"EHLO client.test\r\n")
        keywords = ehlo_keywords(c.read_reply())
        if "CHUNKING" not in keywords:
            pytest.skip("CHUNKING not advertised")
        chunk = (
            b"Subject: real\r\n\r\nreal"
            + vector
            + b"\r\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<"
            + victim.encode()
            + b"@example.org>\r\nDATA\r\nsmuggled\r\n.\r\n"
        )
        mail_rcpt(c, f"{victim}@example.org")
        c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
        replies, eof = c.read_all_replies(timeout=10)
        dialogue = c.dialogue()
    assert [r.code for r in replies][-1:] == [221] and len(replies) == 2, dialogue
    assert not evil_messages(m), dialogue
    if replies[0].code == 250:
        assert m.messages(victim) == [1]
        check_stored(m.read(victim, 1), sender="sender@client.test", helo="client.test", body=chunk)
    else:
        assert 500 <= replies[0].code < 600, dialogue
        assert m.messages(victim) == []

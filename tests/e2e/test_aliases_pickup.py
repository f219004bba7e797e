"""Aliases over SMTP and for the maildrop's pickup, and the pickup itself (files written
straight with mailerd.maildrop, as `sendmail` writes them; tests/e2e/test_sendmail.py drives the
command).

The aliases file is given with --aliases; mail for its names lands in the target mailboxes, a
loop and a program target are refused and logged (and the program never runs), a remote target
is queued. The pickup takes what was dropped while the daemon was stopped, refuses invalid files
(logged, removed), never queues a file twice, and bounces an unknown local recipient to the
submitter.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailerd import config, forwarding, signing
from mailerd.commands import dkimkeys
from mailerd.commands.daemon import reload_state
from mailerd.delivery import pickup
from mailerd.delivery.queue import Queue
from mailerd.ipc import maildrop
from mailerd.signing import SigningKey
from mailerd.spool import Spool

from .conftest import Mailerd, expect, place, wait_until

ALIASES = """\
# like Debian's
mailer-daemon: postmaster
postmaster: root
root: {admin}
team: {admin}, {b}, {c}
far: {b}, someone@remote.test
forwards: one@remote.test, two@remote.test, Three@Other.Test, {c}
loop1: loop2
loop2: loop1
runs: "|/bin/touch {marker}"
"""


@pytest.fixture
def aliased(mailerd_factory, tmp_path: Path):
    names = {"admin": "", "b": "", "c": ""}
    m: Mailerd = mailerd_factory(start=False)
    for key in names:
        names[key] = m.new_user(key)
    marker = tmp_path / "program-ran"
    path = tmp_path / "aliases"
    path.write_text(ALIASES.format(marker=marker, **names))
    m.extra += ["--aliases", str(path)]
    m.start()
    return m, names, marker


def _deliver(m: Mailerd, rcpt: str, subject: str, trusted: bool = False) -> int:
    with m.smtp(trusted=trusted) as s:
        refused = s.sendmail("a@client.test", [rcpt], f"Subject: {subject}\r\n\r\nx\r\n".encode())
        assert refused == {}
    return 250


def test_aliases_over_smtp(aliased):
    m, names, marker = aliased
    admin, b, c = names["admin"], names["b"], names["c"]
    _deliver(m, "root@example.org", "to root")
    _deliver(m, "PostMaster@example.net", "to postmaster")  # every local domain, any case
    _deliver(m, "mailer-daemon@example.org", "to mailer-daemon")
    _deliver(m, "team@example.org", "to the team")
    assert m.wait_messages(admin, 4) == [1, 2, 3, 4]
    assert m.wait_messages(b, 1) == [1] and m.wait_messages(c, 1) == [1]
    # a remote target is queued even from the network listener: the administrator chose it
    queued = m.queue_files()
    _deliver(m, "far@example.org", "forwarded")
    assert m.wait_messages(b, 2) == [1, 2]
    assert wait_until(lambda: m.queue_files() - queued or "someone@remote.test" in m.stderr_text())
    # a loop and a program are refused at RCPT, logged, and nothing runs
    with m.connect(trusted=False) as conn:
        conn.start()
        expect(conn.cmd("MAIL FROM:<a@client.test>"), 250, conn=conn)
        expect(conn.cmd("RCPT TO:<loop1@example.org>"), 550, "5.4.6", conn=conn)
        expect(conn.cmd("RCPT TO:<runs@example.org>"), 550, "5.1.1", conn=conn)
        conn.cmd("QUIT")
    log = m.stderr_text()
    assert "alias loop1 is part of a loop" in log
    assert "runs: target" in log and "never runs programs" in log
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.4.6" in log
    assert not marker.exists()


def _drop(m: Mailerd, sender: str, recipients: list[str], body: bytes) -> str:
    return maildrop.submit(str(m.queue), sender, recipients, body)


def _message(subject: str) -> bytes:
    return f"From: root@example.org\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def _take(m: Mailerd, name: str, dkim_keys: tuple[SigningKey, ...] = ()) -> pickup.Taken:
    """The pickup's work on one maildrop file, done here (the daemon stopped): queued, and
    the file removed."""
    cfg = config.load_files(
        config.load(
            ["-s", str(m.spool), "-q", str(m.queue), "-l", "none", "-n", "none"]
            + [a for d in m.domains for a in ("-d", d)]
            + ["-H", m.hostname, "--aliases", m.extra[m.extra.index("--aliases") + 1]]
        )
    )
    directory = os.open(m.queue / maildrop.MAILDROP, os.O_RDONLY | os.O_DIRECTORY)
    try:
        taken = pickup.Pickup(cfg, Queue(m.queue), Spool(m.spool), None, print, dkim_keys).take(
            directory, name
        )
    finally:
        os.close(directory)
    assert taken is not None and not (m.queue / maildrop.MAILDROP / name).exists()
    return taken


def _crash_after_queueing(m: Mailerd, name: str) -> None:
    """What a pickup that died between queueing a file and removing it leaves: both."""
    path = m.queue / maildrop.MAILDROP / name
    content = path.read_bytes()
    _take(m, name)
    place(path, content)


def test_dropped_while_stopped_is_delivered_at_start_once(aliased):
    m, names, _ = aliased
    admin = names["admin"]
    assert m.stop() == 0
    first = _drop(m, "root@example.org", ["root@example.org"], _message("one"))
    second = _drop(m, "", ["postmaster", f"{names['b']}@example.org"], _message("two"))
    again = _drop(m, "root@example.org", ["root@example.org"], _message("three"))
    _crash_after_queueing(m, again)
    maildrop_dir = m.queue / maildrop.MAILDROP
    m.start()
    assert m.wait_messages(admin, 3) == [1, 2, 3]
    assert m.wait_messages(names["b"], 1) == [1]
    assert wait_until(lambda: not any(maildrop_dir.iterdir()), 10), list(maildrop_dir.iterdir())
    # (separate submissions, as from separate programs: their order is not promised)
    raw = next(m.read(admin, n) for n in (1, 2, 3) if b"Subject: one" in m.read(admin, n))
    assert b"Received: by mx.example.org (mailerd, from userid 0)" in raw
    assert raw.startswith(b"Return-Path: <root@example.org>\r\n")
    log = m.stderr_text()
    assert f"{first.split('-')[0]}: uid=0 from=<root@example.org>" in log
    assert f"{second.split('-')[0]}: uid=0 from=<>" in log
    assert f"{again}: already queued from the maildrop" in log
    time.sleep(1)  # nothing more comes
    assert m.messages(admin) == [1, 2, 3]
    assert sorted(b"three" in m.read(admin, n) for n in (1, 2, 3)) == [False, False, True]


@pytest.mark.parametrize(
    "content, why",
    [
        (b"not json\nx\r\n", "header is not JSON"),
        (
            json.dumps({"version": 1, "sender": "a@b.c", "recipients": [], "body": "7BIT"}).encode()
            + b"\nx\r\n",
            "0 recipients",
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "sender": "a@b.c",
                    "recipients": ["root@example.org"],
                    "body": "7BIT",
                }
            ).encode()
            + b"\nbare LF\n",
            "bare CR or LF",
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "sender": "a@b.c",
                    "recipients": ["root@example.org"],
                    "body": "7BIT",
                }
            ).encode()
            + b"\nNUL\x00\r\n",
            "NUL",
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "sender": "<evil>",
                    "recipients": ["root@example.org"],
                    "body": "7BIT",
                }
            ).encode()
            + b"\nx\r\n",
            "bad address",
        ),
    ],  # fmt: skip
)
def test_invalid_files_are_logged_and_removed(aliased, content: bytes, why: str):
    m, names, _ = aliased
    name = maildrop.new_name()
    path = m.queue / maildrop.MAILDROP / name
    place(path, content)
    maildrop.poke(str(m.queue))
    assert wait_until(lambda: not path.exists(), 10)
    assert wait_until(lambda: f"maildrop {name} (uid 0): {why}" in m.stderr_text(), 5), (
        m.stderr_text()[-2000:]
    )
    assert m.messages(names["admin"]) == []


def test_unknown_local_recipient_is_bounced_to_the_submitter(aliased):
    m, names, _ = aliased
    admin = names["admin"]
    _drop(
        m,
        f"{admin}@example.org",
        ["nosuchuser@example.org", f"{names['c']}@example.org"],
        _message("x"),
    )
    maildrop.poke(str(m.queue))
    assert m.wait_messages(names["c"], 1) == [1]
    assert m.wait_messages(admin, 1) == [1]
    bounce = m.read(admin, 1)
    assert b"multipart/report" in bounce and b"nosuchuser" in bounce
    assert b"Return-Path: <>" in bounce


def test_every_forward_of_an_alias_is_queued_from_the_maildrop(aliased):
    """`sendmail forwards` (Debian's "root: me@gmail.com, backup@elsewhere"): each remote
    target is its own queued recipient, as over SMTP. The pickup keyed remote copies by the
    address the user typed, so all but the first forward were dropped without a word (an
    attacker's pass, /tmp/atk7b F5)."""
    m, names, _ = aliased
    name = _drop(m, "root@example.org", ["forwards@example.org"], _message("fanned out"))
    queue_id = name.split("-")[0]
    maildrop.poke(str(m.queue))
    assert m.wait_messages(names["c"], 1) == [1]
    targets = ("one@remote.test", "two@remote.test", "Three@other.test")
    lines = [f"{queue_id}: to=<{t}>, relay=queue, status=queued" for t in targets]
    assert wait_until(lambda: all(line in m.stderr_text() for line in lines), 10), m.stderr_text()[
        -3000:
    ]
    assert f"{queue_id}: uid=0 from=<root@example.org>, size=" in m.stderr_text()
    assert "nrcpt=4 (maildrop)" in m.stderr_text()


def test_the_pickup_queues_each_forward_with_its_alias(aliased):
    """As over SMTP: the alias a remote copy came through is what it leaves from
    (`forwarding`), here for a submission whose sender is not local (`sendmail -f`)."""
    m, names, _ = aliased
    assert m.stop() == 0
    name = _drop(m, "zed@remote.test", ["Forwards+x@example.org"], _message("fanned out"))
    taken = _take(m, name)
    remote = [(r.address, r.via) for r in taken.item.recipients if r.mailbox is None]
    assert remote == [
        ("one@remote.test", "forwards@example.org"),
        ("two@remote.test", "forwards@example.org"),
        ("Three@other.test", "forwards@example.org"),
    ]
    sent_as = forwarding.envelope_sender("zed@remote.test", remote[0][1], m.domains)
    assert sent_as == "forwards+fwd_from=zed=remote.test@example.org"
    # one copy for two names of the alias, one of them its forwards' own address: marked as
    # mail that came back, whatever the order (it leaves from <>)
    back = "forwards+fwd_from=zed=remote.test@example.org"
    name = _drop(m, "vacation@remote.test", ["forwards@example.org", back], _message("away"))
    vias = {r.via for r in _take(m, name).item.recipients if r.mailbox is None}
    assert vias == {"forwards+fwd_from@example.org"}


def test_a_signed_submission_counts_its_local_and_remote_recipients(aliased, tmp_path, caplog):
    """With a DKIM key, a submission's local copies become an item of their own (unsigned):
    the pickup's line still counts every recipient (it counted the signed item's alone: an
    operator's pass saw nrcpt=1 for alice and bob@example.net)."""
    m, names, _ = aliased
    assert m.stop() == 0
    key = tmp_path / "example.org.s1.key"
    key.write_bytes(dkimkeys.new_key("ed25519", 0))
    signer = signing.load_key("example.org", "s1", str(key))
    name = _drop(m, "root@example.org", ["forwards@example.org"], _message("signed"))
    with caplog.at_level(logging.INFO, logger="mailerd"):
        taken = _take(m, name, (signer,))
    assert taken.local is not None and len(taken.item.recipients) == 3
    said = [r.getMessage() for r in caplog.records if "(maildrop)" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("nrcpt=4 (maildrop)"), said


def test_newaliases_checks_the_file_and_reloads_the_daemon(mailerd_factory, tmp_path: Path):
    """`sendmail -bi` (what `newaliases` runs) reads the file as the daemon will, reports its
    problems, and makes the running daemon reload it, returning once the reload is done: a
    new alias works in the very next session, on every worker."""
    m: Mailerd = mailerd_factory(start=False)
    user = m.new_user("na")
    aliases_file, pidfile = tmp_path / "aliases", tmp_path / "mailerd.pid"
    aliases_file.write_text(f"old: {user}\n")
    conf = tmp_path / "newaliases.conf"
    conf.write_text(
        f"[mailerd]\naliases = {aliases_file}\npidfile = {pidfile}\ndomain = example.org\n"
    )
    m.extra += ["--aliases", str(aliases_file), "-P", str(pidfile)]
    m.start()
    with m.connect() as c:
        c.start()
        expect(c.cmd("MAIL FROM:<a@client.test>"), 250, conn=c)
        expect(c.cmd("RCPT TO:<new@example.org>"), 550, "5.1.1", conn=c)
    aliases_file.write_text(f"old: {user}\nnew: old\nbad: |/bin/true\n")
    run = subprocess.run(
        [sys.executable, "-m", "mailerd", "sendmail", "-bi", "-C", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    assert (
        "3 aliases, 1 problem(s)" in run.stderr and "bad: target |/bin/true refused" in run.stderr
    )
    assert f"mailerd (pid {m.pid}) reloads the aliases file: done" in run.stderr
    assert "configuration reloaded" in m.stderr_text()  # (logged before it said done)
    assert pidfile.read_text() == f"{m.pid}\n"  # still one number: kill -HUP $(cat …) works
    assert (tmp_path / "mailerd.pid.reload").read_text() == "1 ok\n"
    for n in range(1, 9):  # no wait: whichever worker takes a session now has the new alias
        with m.smtp() as s:
            assert (
                s.sendmail("a@client.test", ["new@example.org"], b"Subject: n\r\n\r\nn\r\n") == {}
            )
        assert m.wait_messages(user, n)[-1] == n


def test_an_aliases_file_gone_at_a_reload_keeps_the_aliases_in_use(mailerd_factory, tmp_path):
    """A reviewer's finding: removed (a mistaken `mv`, a package's upgrade between two steps),
    the file read as none at the reload, with one info line, and mail for every alias (the
    postmaster's too) was refused 550 at once, where a file that could not be read (a
    directory) failed the reload. Gone since it was read, it now fails the reload likewise:
    the aliases in use are kept, and the log says why. A file absent from the start still
    means no aliases, as Postfix's."""
    m: Mailerd = mailerd_factory(start=False)
    user = m.new_user("ag")
    aliases_file, pidfile = tmp_path / "aliases", tmp_path / "mailerd.pid"
    aliases_file.write_text(f"sales: {user}\n")
    m.extra += ["--aliases", str(aliases_file), "-P", str(pidfile)]
    m.start()
    aliases_file.unlink()
    os.kill(m.pid, signal.SIGHUP)
    assert wait_until(lambda: (tmp_path / "mailerd.pid.reload").exists(), 20)
    count, outcome, why = reload_state(str(pidfile))  # (what `mailerd reload` says)
    assert (count, outcome) == (1, "failed") and str(aliases_file) in why, (count, outcome, why)
    assert wait_until(lambda: "reload failed" in m.stderr_text(), 5), m.stderr_text()[-2000:]
    assert f"{aliases_file}" in m.stderr_text().split("reload failed")[-1].splitlines()[0]
    with m.smtp() as s:
        assert s.sendmail("a@client.test", ["sales@example.org"], b"Subject: a\r\n\r\na\r\n") == {}
    assert m.wait_messages(user, 1) == [1]


def test_kill_9_during_pickup_loses_and_doubles_nothing(aliased):
    """40 submissions wait in the maildrop; the daemon is killed (SIGKILL, the whole process
    group) while it picks them up and delivers them, three times at different moments, then
    left to finish: every message is in the mailbox exactly once."""
    m, names, _ = aliased
    admin = names["admin"]
    assert m.stop() == 0
    subjects = [f"pickup-{n}" for n in range(40)]
    for subject in subjects:
        _drop(m, "root@example.org", ["root@example.org"], _message(subject))
    for delivered in (1, 12, 25):  # killed once this many are in the mailbox
        m.start(wait=False)
        assert wait_until(lambda n=delivered: len(m.messages(admin)) >= n, 20)
        m.kill()
        m.proc = None
    m.start()
    assert m.wait_messages(admin, len(subjects), timeout=20)
    time.sleep(1)  # nothing more comes
    seen = [
        line.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        for n in m.messages(admin)
        for line in [m.read(admin, n)]
    ]
    assert sorted(seen) == sorted(subjects), f"{len(seen)} copies of {len(subjects)} messages"
    assert not any((m.queue / maildrop.MAILDROP).iterdir())


def test_an_alias_target_at_an_address_literal_of_ours_is_delivered_here(mailerd_factory, tmp_path):
    """`lit: user@[127.0.0.1]` is user's mailbox, as RCPT TO:<user@[127.0.0.1]> and
    `sendmail user@[127.0.0.1]` are: it was queued as a forward, bounced as mail that loops
    back to us, and the bounce of network mail dropped (its sender's SPF not verified)."""
    m: Mailerd = mailerd_factory(start=False)
    user = m.new_user("lit")
    path = tmp_path / "aliases"
    path.write_text(f"lit: {user}@[127.0.0.1]\n")
    m.extra += ["--aliases", str(path)]
    m.start()
    queue_before = m.queue_files()
    _deliver(m, "lit@example.org", "to an alias at our literal")
    assert m.wait_messages(user, 1, timeout=5) == [1], m.stderr_text()[-2000:]
    assert m.queue_files() == queue_before

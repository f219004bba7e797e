"""`sendmail` as the machine's programs run it, against a real running mailerd.

Each real caller's own command line: cron's, s-nail's and mutt's (pointed at our sendmail),
a script's `-t -i` with a Bcc, swaks speaking SMTP through `sendmail -bs`; a submission by a
user who is not root (the Received: header names the uid); mail dropped while the daemon is
stopped; the queue listing (`-bp`, `mailq`) and flush (`-q`); exit status 75 when the maildrop
cannot be written.

The command runs as /usr/bin/python3 from a world-readable copy of the `mailerd` package, under
its own names (`sendmail`, `mailq`: symlinks to a `mailerd` launcher, as the package installs
them): no virtualenv, no third-party module. The daemons' spool and queue are below a temporary
directory that every user may traverse, since the test tree (/tmp/pytest-of-root) is 0700.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from email.header import decode_header, make_header
from pathlib import Path

import pytest

from .conftest import REPO, Mailerd, finish, free_port, parse_stored, wait_until

SYSTEM_PYTHON = "/usr/bin/python3"
TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(
    not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON} (Debian's python3)"
)


# -- the installation: a world-readable package and the command's names ------------------------


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A temporary directory (0755) with lib/mailerd (a copy of the package) and bin/mailerd
    (the console script's equivalent) with bin/sendmail and bin/mailq linked to it."""
    root = Path(tempfile.mkdtemp(prefix="mailerd-sendmail-"))
    try:
        root.chmod(0o755)
        shutil.copytree(
            REPO / "mailerd", root / "lib" / "mailerd", ignore=shutil.ignore_patterns("__pycache__")
        )
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        bin_dir = root / "bin"
        bin_dir.mkdir(mode=0o755)
        launcher = bin_dir / "mailerd"
        launcher.write_text(
            f"#!{SYSTEM_PYTHON}\nimport sys\nsys.path.insert(0, {str(root / 'lib')!r})\n"
            "from mailerd.cli import main\nsys.exit(main())\n"
        )
        launcher.chmod(0o755)
        for name in ("sendmail", "mailq"):
            (bin_dir / name).symlink_to("mailerd")
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sendmail_conf(m: Mailerd) -> Path:
    """sendmail's view of this mailerd: its queue, its domains, its name."""
    path = m.base / "sendmail.conf"
    path.write_text(
        f"[mailerd]\nqueue = {m.queue}\ndomain = {', '.join(m.domains)}\nhostname = {m.hostname}\n"
    )
    path.chmod(0o644)
    return path


def wrapper(world: Path, m: Mailerd) -> Path:
    """A `sendmail` for programs that take a path (s-nail, mutt, swaks): ours, with -C."""
    directory = m.base / "bin"
    directory.mkdir(exist_ok=True)
    script = directory / "sendmail"
    script.write_text(f'#!/bin/sh\nexec {world}/bin/sendmail -C {sendmail_conf(m)} "$@"\n')
    script.chmod(0o755)
    return script


def run(
    argv: list, data: bytes = b"", user: str | None = None, **kw
) -> subprocess.CompletedProcess:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", **kw.pop("env", {})}
    done = subprocess.run(argv, input=data, capture_output=True, timeout=TIMEOUT, env=env, **kw)
    return done


@pytest.fixture(scope="module")
def daemon(world: Path) -> Iterator[Mailerd]:
    """One mailerd for the tests that only need mail delivered (each to its own mailboxes)."""
    m = Mailerd(world / "shared", name="sendmail-shared")
    m.base.chmod(0o755)
    m.start()
    yield m
    finish(m)


@pytest.fixture
def sendmail(world: Path, daemon: Mailerd) -> Path:
    return wrapper(world, daemon)


def delivered(m: Mailerd, user: str, count: int = 1) -> list[bytes]:
    numbers = m.wait_messages(user, count)
    assert len(numbers) == count, (
        f"{user}: {len(numbers)} message(s), expected {count}\n" + (m.stderr_text()[-3000:])
    )
    return [m.read(user, n) for n in numbers]


def field(raw: bytes, name: str) -> str | None:
    """The unfolded value of header field `name` in a stored message, or None."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    pattern = rb"^" + re.escape(name.encode()) + rb":[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)"
    match = re.search(pattern, head, re.MULTILINE | re.IGNORECASE)
    return None if match is None else re.sub(rb"\r\n", b"", match.group(1)).decode()


def body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


# -- real callers ------------------------------------------------------------------------------


CRON_OUTPUT = (
    "From: root (Cron Daemon)\n"
    "To: {user}\n"
    "Subject: Cron <root@host> run-parts /etc/cron.daily\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: 8bit\n"
    "X-Cron-Env: <SHELL=/bin/sh>\n"
    "X-Cron-Env: <HOME=/root>\n"
    "\n"
    "/etc/cron.daily/logrotate: Größe überschritten\n"
    ".\n"
    "progress 10%\r20%\r100%\n"
    "{long}\n"
)


def test_cron(world, daemon, sendmail):
    """Debian's cron: `sendmail -FCronDaemon -i -B8BITMIME -oem USER`, the job's output with
    its 8-bit text, a lone dot, a progress meter's CRs and a line longer than SMTP allows."""
    user = daemon.new_user("cron")
    long = "x" * 1500
    data = CRON_OUTPUT.format(user=user, long=long).encode()
    done = run([sendmail, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", user], data)
    assert done.returncode == 0 and done.stderr == b"", done
    (raw,) = delivered(daemon, user)
    stored = parse_stored(raw)
    assert stored.return_path == b"Return-Path: <root@example.org>"
    assert b"from userid 0" in stored.received
    # cron's own, with the domain it lacks, as Postfix's cleanup adds it: root's mail
    # forwarded elsewhere must name a domain in From: to be signed and accepted
    assert field(raw, "From") == "root@example.org (Cron Daemon)"
    assert field(raw, "To") == f"{user}@example.org"
    assert field(raw, "Subject") == "Cron <root@host> run-parts /etc/cron.daily"
    assert field(raw, "Date") and field(raw, "Message-ID").endswith("@mx.example.org>")
    text = body(raw)
    assert text.startswith("/etc/cron.daily/logrotate: Größe überschritten\r\n.\r\n".encode())
    assert b"progress 10%\r\n20%\r\n100%\r\n" in text
    assert text.endswith(b"x" * 998 + b"\r\n " + b"x" * 502 + b"\r\n")


def test_a_forged_authentication_results_is_removed(world, daemon, sendmail):
    """fetchmail's `mda "/usr/sbin/sendmail -i -f %F %T"` hands on mail fetched from
    elsewhere: a field bearing mailerd's authserv-id is removed, as on every listener (an
    acceptance tester's finding, for the local listener); another server's stays."""
    user = daemon.new_user("fetched")
    forged = f"Authentication-Results: {daemon.hostname}; dmarc=pass header.from=bank.example"
    kept = "Authentication-Results: mx.bank.example; spf=pass smtp.mailfrom=a@bank.example"
    data = (
        f"{forged}\n{kept}\nFrom: a@bank.example\nTo: {user}@example.org\nSubject: fetched\n"
        "\nthe body\n"
    ).encode()
    done = run([sendmail, "-i", "-f", "a@bank.example", user], data)
    assert done.returncode == 0 and done.stderr == b"", done
    (raw,) = delivered(daemon, user)
    assert forged.encode() not in raw and kept.encode() + b"\r\n" in raw, raw[:800]


def test_a_forged_authentication_results_past_the_scan_is_removed(world, daemon, sendmail):
    """sendmail's mail is never refused for its header's shape, so a forger's field below
    256 KiB of padding was kept: the pickup looked for it where the listeners scan, in the
    first 256 KiB (an acceptance re-check). The whole header section is read."""
    user = daemon.new_user("fetchedlong")
    forged = f"Authentication-Results: {daemon.hostname}; dmarc=pass header.from=bank.example"
    padding = "".join(f"X-Pad-{i:06d}: {'p' * 200}\n" for i in range(1400))
    data = (
        f"{padding}{forged}\nFrom: a@bank.example\nTo: {user}@example.org\n"
        "Subject: fetched long\n\nthe body\n"
    ).encode()
    done = run([sendmail, "-i", "-f", "a@bank.example", user], data)
    assert done.returncode == 0 and done.stderr == b"", done
    (raw,) = delivered(daemon, user)
    assert forged.encode() not in raw and raw.endswith(b"\r\nthe body\r\n"), raw[-800:]


def test_mail_for_root_at_localhost_is_local_whatever_the_domains(world, daemon, sendmail):
    """fail2ban's `destemail = root@localhost`, and scripts': localhost is always a local
    domain, as in Debian's Postfix, though the configuration names others (this daemon's:
    example.org and example.net). It used to wait in the queue for localhost's MX."""
    assert "localhost" not in daemon.domains
    user = daemon.new_user("fail2ban")
    data = b"Subject: [Fail2Ban] sshd: banned 192.0.2.7\n\nbanned\n"
    done = run([sendmail, "-i", f"{user}@localhost"], data)
    assert done.returncode == 0 and done.stderr == b"", done
    (raw,) = delivered(daemon, user)
    assert field(raw, "Subject") == "[Fail2Ban] sshd: banned 192.0.2.7"


def test_mail_for_an_address_literal_of_ours_is_local(world, daemon, sendmail):
    """`sendmail 'root@[127.0.0.1]'` is delivered here, as Postfix does: the delivery
    process's pickup bounced it as mail that loops back to us."""
    users = [daemon.new_user("literal"), daemon.new_user("literal")]
    data = b"Subject: to our own address\n\nhello\n"
    done = run([sendmail, "-i", f"{users[0]}@[127.0.0.1]", f"{users[1]}@[IPv6:::1]"], data)
    assert done.returncode == 0 and done.stderr == b"", done
    for user in users:
        (raw,) = delivered(daemon, user)
        assert field(raw, "Subject") == "to our own address"


def test_s_nail(world, daemon, sendmail, tmp_path):
    """mail(1) as Debian installs it (s-nail, its /etc/s-nail.rc), with mta= our sendmail."""
    if shutil.which("s-nail") is None:
        pytest.skip("s-nail is not installed (apt-get install s-nail)")
    user = daemon.new_user("snail")
    done = run(
        ["s-nail", "-S", f"mta={sendmail}", "-s", "hello from s-nail", f"{user}@example.org"],
        b"Dear user,\nthis is s-nail.\n",
        env={"HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done
    (raw,) = delivered(daemon, user)
    assert b"from userid 0" in parse_stored(raw).received  # through the maildrop
    assert field(raw, "Subject") == "hello from s-nail"
    assert field(raw, "To") == f"{user}@example.org"
    assert field(raw, "From") == '"root" <root@example.org>'  # added by sendmail (GECOS)
    assert b"Dear user,\r\nthis is s-nail.\r\n" in body(raw)


def test_mutt(world, daemon, sendmail, tmp_path):
    if shutil.which("mutt") is None:
        pytest.skip("mutt is not installed (apt-get install mutt)")
    user = daemon.new_user("mutt")
    done = run(
        ["mutt", "-s", "hello from mutt", "-e", f"set sendmail={sendmail}", f"{user}@example.org"],
        b"Sent with mutt.\n",
        env={"HOME": str(tmp_path), "MAIL": str(tmp_path / "inbox"), "TERM": "dumb"},
    )
    assert done.returncode == 0, done
    (raw,) = delivered(daemon, user)
    assert b"from userid 0" in parse_stored(raw).received  # through the maildrop
    assert field(raw, "Subject") == "hello from mutt"
    assert field(raw, "Message-ID") and field(raw, "Date")  # mutt's own
    assert b"Sent with mutt." in body(raw)


def test_python_script_with_t(world, daemon, sendmail):
    """What a script does: subprocess.run([sendmail, "-t", "-i"], input=message)."""
    to, cc = daemon.new_user("to"), daemon.new_user("cc")
    message = (
        f"To: Someone <{to}@example.org>\nCc: {cc}@example.net\nSubject: report\n\n"
        "all good\n.\nreally\n"
    ).encode()
    done = subprocess.run([sendmail, "-t", "-i"], input=message, capture_output=True, timeout=30)
    assert done.returncode == 0, done
    for user in (to, cc):
        (raw,) = delivered(daemon, user)
        assert body(raw) == b"all good\r\n.\r\nreally\r\n"
        assert field(raw, "To") == f"Someone <{to}@example.org>"


def test_php_mail_with_bcc(world, daemon, sendmail):
    """PHP's mail(): `sendmail -t -i`, with the Bcc: header (folded) among the headers."""
    to, hidden, hidden2 = (daemon.new_user(p) for p in ("to", "bcc", "bcc"))
    message = (
        f"To: {to}@example.org\r\nSubject: newsletter\r\n"
        f"Bcc: {hidden}@example.org,\r\n {hidden2}@example.org\r\n"
        "X-Mailer: PHP/8.2\r\n\r\nHello!\r\n"
    ).encode()
    done = run([sendmail, "-t", "-i"], message)
    assert done.returncode == 0, done
    for user in (to, hidden, hidden2):
        (raw,) = delivered(daemon, user)
        assert b"bcc" not in raw.split(b"\r\n\r\n", 1)[0].lower()
        assert hidden.encode() not in raw and hidden2.encode() not in raw.replace(b"for <", b"")
        assert field(raw, "X-Mailer") == "PHP/8.2" and body(raw) == b"Hello!\r\n"


def test_swaks_through_bs(world, daemon, sendmail):
    """swaks speaking SMTP to `sendmail -bs` on a pipe: 250 only once the message is queued."""
    user = daemon.new_user("swaks")
    done = run(
        ["swaks", "--pipe", f"{sendmail} -bs", "--to", f"{user}@example.org"]
        + ["--from", "robot@example.net", "--header", "Subject: via -bs", "--body", "piped"]
    )
    assert done.returncode == 0, done.stdout.decode()[-2000:]
    transcript = done.stdout.decode()
    queued = re.search(r"<- +250 2\.0\.0 Ok: queued as ([0-9A-Z]+)", transcript)
    assert queued, transcript
    (raw,) = delivered(daemon, user)
    stored = parse_stored(raw)
    assert stored.return_path == b"Return-Path: <robot@example.net>"
    assert b"from userid 0" in stored.received and queued.group(1).encode() in stored.received
    assert field(raw, "Subject") == "via -bs" and b"piped" in body(raw)


def test_swaks_through_bs_with_unqualified_addresses(world, daemon, sendmail):
    """`sendmail -bs` qualifies a path without a domain with the first local domain, as the
    command line does for `sendmail root` (it refused <root> with 553 5.1.3)."""
    user = daemon.new_user("swaksbare")
    done = run(
        ["swaks", "--pipe", f"{sendmail} -bs", "--to", user, "--from", "robot"]
        + ["--header", "Subject: bare", "--body", "bare"]
    )
    assert done.returncode == 0, done.stdout.decode()[-2000:]
    (raw,) = delivered(daemon, user)
    assert parse_stored(raw).return_path == b"Return-Path: <robot@example.org>"


def test_cron_output_with_a_nul_is_delivered(world, daemon, sendmail):
    """A job's output with a NUL byte in it (`find -print0`, a binary file cat'd, tar's
    names): Debian's cron hands it to `sendmail -FCronDaemon -i -B8BITMIME -oem` as it is.
    Postfix's sendmail takes it (exit 0); ours refused it with 65, and cron only logs a
    mailer's failure: the job's output was lost. The NUL is dropped (Postfix's
    `message_strip_characters = \\0`), the rest delivered."""
    user = daemon.new_user("cronnul")
    data = (
        f"From: root (Cron Daemon)\nTo: {user}\nSubject: Cron <root@host> backup\n\n"
        "backup failed:\ntar: ./data/file\0name: Cannot stat\n"
    ).encode()
    done = run([sendmail, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", user], data)
    assert done.returncode == 0 and done.stderr == b"", done
    (raw,) = delivered(daemon, user)
    assert b"\0" not in raw
    assert body(raw) == b"backup failed:\r\ntar: ./data/filename: Cannot stat\r\n"


def test_a_full_name_that_is_not_utf8_is_read_as_latin1(world, daemon, sendmail):
    """-F (or the GECOS field, for mail without From:) in Latin-1, as a script in a legacy
    locale passes it: the name is read as Latin-1 and encoded. It used to end in
    `internal error: UnicodeEncodeError` (status 70), nothing sent."""
    user = daemon.new_user("latin1")
    done = run([sendmail, "-F", b"J\xf6rg M\xfcller", "-i", user], b"Subject: s\n\nx\n")
    assert done.returncode == 0 and done.stderr == b"", done
    (raw,) = delivered(daemon, user)
    value = field(raw, "From")
    assert value.isascii(), value
    assert str(make_header(decode_header(value))) == "J\u00f6rg M\u00fcller <root@example.org>"


# -- another user ------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="runs sendmail as nobody (needs root)")
def test_submission_by_another_user(world, daemon, sendmail):
    """`nobody` may submit (the maildrop is 1733), is the default sender and From:, and the
    Received: header says who it was, whatever -f claims."""
    nobody = pwd.getpwnam("nobody")
    first, second = daemon.new_user("nb"), daemon.new_user("nb")
    done = run([sendmail, "-i", first], b"Subject: from nobody\n\nhi\n", user="nobody")
    assert done.returncode == 0, done
    (raw,) = delivered(daemon, first)
    stored = parse_stored(raw)
    assert stored.return_path == b"Return-Path: <nobody@example.org>"
    assert f"from userid {nobody.pw_uid}".encode() in stored.received
    name = nobody.pw_gecos.split(",")[0]
    assert field(raw, "From") == f'"{name}" <nobody@example.org>'
    done = run([sendmail, "-i", "-f", "ceo@example.net", second], b"x\n", user="nobody")
    assert done.returncode == 0, done
    (raw,) = delivered(daemon, second)
    stored = parse_stored(raw)
    assert stored.return_path == b"Return-Path: <ceo@example.net>"
    assert f"from userid {nobody.pw_uid}".encode() in stored.received


@pytest.mark.skipif(os.geteuid() != 0, reason="runs sendmail as nobody (needs root)")
def test_another_user_cannot_write_a_closed_maildrop(world):
    queue = Path(tempfile.mkdtemp(dir=world))
    queue.chmod(0o755)
    (queue / "maildrop").mkdir(mode=0o755)  # root's, not 1733
    conf = queue / "sendmail.conf"
    conf.write_text(f"[mailerd]\nqueue = {queue}\ndomain = example.org\n")
    conf.chmod(0o644)
    done = run([world / "bin" / "sendmail", "-C", conf, "-i", "a@example.org"], b"x\n", "nobody")
    assert done.returncode == 75, done
    assert done.stderr.decode().startswith("sendmail: cannot write to the maildrop")
    assert b"Permission denied" in done.stderr and os.listdir(queue / "maildrop") == []


# -- the daemon stopped, the queue -------------------------------------------------------------


def test_mail_waits_while_the_daemon_is_stopped(world, mailerd_factory):
    m = mailerd_factory(base=world / "stopped")
    user = m.new_user("late")
    sendmail = wrapper(world, m)
    assert m.stop() == 0
    done = run([sendmail, "-i", user], b"Subject: while you were out\n\nx\n")
    assert done.returncode == 0, done
    waiting = [n for n in os.listdir(m.queue / "maildrop") if not n.startswith(".")]
    assert len(waiting) == 1 and m.messages(user) == []
    m.start()
    (raw,) = delivered(m, user)
    assert field(raw, "Subject") == "while you were out"
    assert parse_stored(raw).received.count(waiting[0].split("-")[0].encode()) == 1
    assert wait_until(lambda: os.listdir(m.queue / "maildrop") == [], 10)


def test_a_mailbox_in_the_way_is_logged_with_its_path(world, daemon, sendmail):
    """An mbox file where a mailbox should be: the pickup's log line says where, as the README
    promises, so that the administrator can move it aside. It named the delivery process's
    way to the spool instead (/proc/self/fd/3/alice), which no one can look for."""
    user = daemon.new_user("mbox")
    (daemon.spool / user).rmdir()
    (daemon.spool / user).write_bytes(b"From old\n")
    done = run([sendmail, "-i", user], b"Subject: s\n\nx\n")
    assert done.returncode == 0, done

    def said() -> list[str]:
        return [line for line in daemon.stderr_text().splitlines() if "is a file" in line]

    assert wait_until(lambda: any(user in line for line in said()), 10), said()
    assert any(f"mailbox {daemon.spool / user} is a file" in line for line in said()), said()
    assert not any("/proc/self/fd" in line for line in said()), said()


def test_a_message_over_the_daemons_limit_is_bounced_to_its_sender(world, mailerd_factory):
    """`sendmail` read a configuration with a larger --max-message-size than the daemon runs
    with (a command-line option, /etc/default/mailerd's DAEMON_OPTS): it took the message and
    exited 0. The pickup, which may not queue it, bounces it to the sender with its header
    (552 5.3.4), as Postfix's cleanup does; it used to remove it with a log line alone."""
    m = mailerd_factory(base=world / "small", extra=["--max-message-size", "20000"])
    sender, recipient = m.new_user("big"), m.new_user("never")
    data = b"Subject: the holiday photos\n\n" + (b"y" * 70 + b"\n") * 700  # (50 KB)
    done = run([wrapper(world, m), "-i", "-f", f"{sender}@example.org", recipient], data)
    assert done.returncode == 0, done  # (its configuration's limit is the default, 10 MB)
    (bounce,) = delivered(m, sender)
    assert b"5.3.4" in bounce and b"Message too big for system" in bounce, bounce[:3000]
    assert b"Subject: the holiday photos" in bounce  # (the header, quoted)
    assert b"yyyy" not in bounce  # (not the body)
    assert m.messages(recipient) == []
    assert wait_until(lambda: os.listdir(m.queue / "maildrop") == [], 10)
    assert "too big, bounced" in m.stderr_text(), m.stderr_text()[-2000:]


def test_queue_listing_and_flush(world, mailerd_factory):
    """Mail for a smarthost that refuses connections waits in the queue: `sendmail -bp` and
    `mailq` list it, `sendmail -q` has it retried."""
    m = mailerd_factory(base=world / "queued", extra=["--relayhost", f"127.0.0.1:{free_port()}"])
    conf = sendmail_conf(m)
    bin_dir = world / "bin"
    done = run([bin_dir / "mailq", "-C", conf])
    assert done.returncode == 0 and done.stdout.strip() == b"Mail queue is empty", done
    done = run([bin_dir / "sendmail", "-C", conf, "-i", "far@remote.test"], b"Subject: s\n\nx\n")
    assert done.returncode == 0, done

    def listed() -> str:
        return run([bin_dir / "mailq", "-C", conf]).stdout.decode()

    assert wait_until(lambda: "<far@remote.test>" in listed(), 10), listed()
    for argv in ([bin_dir / "mailq", "-C", conf], [bin_dir / "sendmail", "-C", conf, "-bp"]):
        done = run(argv)
        assert done.returncode == 0, done
        text = done.stdout.decode()
        assert "<root@example.org>" in text and "<far@remote.test>" in text, text
        assert "1 message(s)" in text, text
    done = run([bin_dir / "sendmail", "-C", conf, "-q"])
    assert done.returncode == 0 and b"1 message(s) will be retried" in done.stdout, done


@pytest.mark.skipif(os.geteuid() != 0, reason="runs mailq as nobody (needs root)")
def test_mailq_by_another_user_says_to_run_it_as_root(world, daemon):
    """The queue is root's (mode 0700): a user's mailq says so in one line, exit 77 (an
    operator's pass got three lines under three prefixes, the first 'no answer from
    mailerd')."""
    conf = sendmail_conf(daemon)
    for argv in (
        [world / "bin" / "mailq", "-C", conf],
        [world / "bin" / "sendmail", "-C", conf, "-bp"],
    ):
        done = run(argv, user="nobody")
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 77 and len(lines) == 1, done
        assert "run it as root" in lines[0] and str(daemon.queue) in lines[0], lines
        assert lines[0].startswith("mailq: "), lines  # (it said "mailerd queue: ", a name its
        # user never typed: an operator's walk-through)


def test_missing_maildrop_exits_75(world, tmp_path):
    conf = tmp_path / "sendmail.conf"
    conf.write_text(f"[mailerd]\nqueue = {tmp_path / 'never-started'}\ndomain = example.org\n")
    done = run([world / "bin" / "sendmail", "-C", conf, "-i", "a@example.org"], b"x\n")
    assert done.returncode == 75, done
    assert re.fullmatch(
        rb"sendmail: cannot write to the maildrop \S+: No such file or directory \(made by "
        rb"mailerd at start, or `mailerd queue init`; -C names another\)\n",
        done.stderr,
    ), done.stderr

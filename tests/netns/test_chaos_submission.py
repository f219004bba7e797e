"""Chaos on the outbound path: "250 means safe" under STARTTLS + AUTH + DKIM signing, with the
whole process tree SIGKILLed under load, three times in one test.

mailerd runs in the network namespace (conftest.py) with a certificate from a test CA
(tests/certs.py, naming 198.51.100.1), a submission listener on 198.51.100.1:2587, one user
with a password (`mailerd passwd`), and a DKIM key for example.org (`mailerd dkim keygen`, its
record served by the namespace's DNS server with this module's zone). Remote recipients are at
chaos-a.test (MX: receiver mx1, which holds each reply to the data for a while after it has
recorded the message, so that deliveries are in flight at a kill) and chaos-b.test (MX: receiver
mx2, which answers 451 to the data for one round, so that mail sits in the queue).

Each round, CLIENTS smtplib sessions (STARTTLS verified against the test CA, then AUTH) send
messages in a loop, each with a unique token, to one or two remote recipients (sometimes plus a
local one); a token counts as accepted only when the final dot was answered 250. After a while
the whole process group gets SIGKILL (`Mailerd.kill9`), mailerd is started again on the same
spool and queue, and the next round begins. After the last restart the queue drains, and:

- every accepted token reached each of its remote recipients at least once;
- a copy delivered more than once is explainable by at-least-once delivery: every copy but the
  last went out in a run that was then killed (each in another run), and the queue's envelope
  on disk after that kill still had the recipient pending (the receiver took it, mailerd had
  not recorded that yet; its log may already say `status=sent`: the line comes first);
- every local copy of any token is in its mailbox at most once, and of an accepted one exactly
  once;
- every copy a receiver took carries one DKIM-Signature, d=example.org, of the configured
  selector, that dkimpy verifies against the published key;
- nothing is left in the queue (env/ empty, `mailerd queue list` empty); a msg/ file left
  without an envelope (crash debris from before a commit, removed after an hour) holds no
  accepted token.

The receiver's delay is a wrapper around receiver.py written at run time (`SLOW_RECEIVER`),
so that receiver.py itself is unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import email.utils
import random
import re
import smtplib
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import pytest
from certs import make_ca

from .conftest import (
    CLIENT_HELO,
    HERE,
    HOSTNAME,
    IO_TIMEOUT,
    LOCAL_DOMAIN,
    MX1,
    MX2,
    NS_V4,
    PYTHON,
    REPO,
    START_TIMEOUT,
    DnsServer,
    Internet,
    Mailerd,
    Netns,
    Receiver,
    check_mailerd_runs,
    finish_or_fail,
    make_cert,
    wait_until,
)
from .test_dkim_signing import keygen, signature_fields, tags, txt_lookup

SELECTOR = "chaos2026"
SUBMISSION_PORT = 2587
CLIENTS = 6
# (seconds of load before each kill; the second round's mx2 answers 451 to every message)
ROUNDS = (2.0, 2.5, 2.0)
DRAIN_TIMEOUT = 60.0
MX1_DATA_DELAY = 0.15  # mx1 records a message, then holds its 250 this long
PACE = 0.15  # a client's pause between messages: about 35 messages/s in all, which mx1
# (4 sessions at once, --max-per-domain) can take as they come; unpaced, 6 clients made 300/s
# and the queue took minutes to drain

ZONE = f"""
; test_chaos_submission's names (its DKIM record is appended by the fixture)
$ORIGIN peers.test.
mx1        A    {MX1}
mx2        A    {MX2}
$ORIGIN test.
chaos-a    MX   10 mx1.peers.test.
chaos-b    MX   10 mx2.peers.test.
$ORIGIN example.org.
mx         A    {NS_V4}
"""

MX2_DEFER = [
    {
        "id": "chaos-defer",
        "match": "*@chaos-b.test",
        "at": "data",
        "reply": "451 4.3.0 mx2 cannot take this now (chaos round)",
    }
]

SLOW_RECEIVER = """\
# Written by test_chaos_submission: receiver.py, whose reply to the data waits the script's
# "data_delay" seconds after the message was recorded (a delivery the receiver has taken and
# its sender has not heard of yet).
import asyncio
import sys

sys.path.insert(0, {here!r})
import receiver

_handle_data = receiver.Handler.handle_DATA


async def handle_DATA(self, server, session, envelope):
    reply = await _handle_data(self, server, session, envelope)
    delay = float(self.script.data.get("data_delay", 0))
    if delay:
        await asyncio.sleep(delay)
    return reply


receiver.Handler.handle_DATA = handle_DATA
sys.exit(receiver.main())
"""

TOKEN_RE = re.compile(r"CHAOS-[0-9a-f]{8}-r\d+c\d+n\d+")
QUEUE_ID_RE = re.compile(r"\bid ([0-9A-Z]+)")


# --------------------------------------------------------------------------------------------
# The fake Internet: a DNS zone with the DKIM record, two receivers (one slow)
# --------------------------------------------------------------------------------------------


class SlowReceiver(Receiver):
    """receiver.py through SLOW_RECEIVER: the same records, a reply to the data that waits."""

    def start(self) -> SlowReceiver:
        wrapper = self.dir / "slow_receiver.py"
        wrapper.write_text(SLOW_RECEIVER.format(here=str(HERE)))
        (self.spool / "ready").unlink(missing_ok=True)
        argv = [PYTHON, str(wrapper), "--listen", self.listen, "--spool", str(self.spool)]
        argv += ["--script", str(self.script_path)]
        self.proc = self.ns.popen(argv, self.log)
        ok = wait_until(
            lambda: (self.spool / "ready").exists() or self.proc.poll() is not None, START_TIMEOUT
        )
        if not ok or self.proc.poll() is not None:
            raise RuntimeError(f"receiver {self.name} did not start:\n{self.log.read_text()}")
        return self


@dataclass
class Setup:
    net: Internet
    key: Path
    record: str
    ca_cert: Path
    tls_cert: Path
    tls_key: Path


@pytest.fixture(scope="module")
def setup(netns: Netns, tmp_path_factory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("chaos-internet")
    dkim_key = keygen(tmp_path_factory.mktemp("chaos-dkim") / "keys", SELECTOR, "rsa")
    zone = base / "chaos.zone"
    zone.write_text(ZONE + "$ORIGIN .\n" + dkim_key.record)
    ca = make_ca(base / "ca")
    pair = ca.issue(HOSTNAME, NS_V4)
    cert, key = make_cert(base)
    dns_server = DnsServer(netns, base, [zone])
    net = Internet(netns, base, dns_server, cert, key)
    try:
        dns_server.start()
        for name, addr, delay in (("mx1", MX1, MX1_DATA_DELAY), ("mx2", MX2, 0.0)):
            script = {"hostname": f"{name}.peers.test", "rules": [], "data_delay": delay}
            r = SlowReceiver(netns, name, f"{addr}:25", base, script)
            net.receivers[name] = r
            r.start()
        yield Setup(net, dkim_key.path, dkim_key.record, ca.cert, pair.cert, pair.key)
    finally:
        for r in net.all_receivers():
            r.stop()
        dns_server.stop()


# --------------------------------------------------------------------------------------------
# The clients and what they were told
# --------------------------------------------------------------------------------------------


@dataclass
class Sent:
    token: str
    remote: list[str]
    local: list[str]
    round: int
    queue_id: str = ""
    accepted_at: float = 0.0


@dataclass
class Book:
    """What every client tried and what it was told, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tried: dict[str, Sent] = field(default_factory=dict)
    accepted: dict[str, Sent] = field(default_factory=dict)
    errors: collections.Counter = field(default_factory=collections.Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    logins: int = 0

    def error(self, where: str, exc: BaseException) -> None:
        kind = f"{where}: {type(exc).__name__}"
        with self.lock:
            self.errors[kind] += 1
            self.error_samples.setdefault(kind, str(exc)[:200])


def chaos_message(sender: str, sent: Sent) -> bytes:
    to = ", ".join(f"<{r}>" for r in sent.remote + sent.local)
    lines = [
        f"From: Alice <{sender}>",
        f"To: {to}",
        f"Subject: chaos {sent.token}",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: <{sent.token}@{LOCAL_DOMAIN}>",
        "",
        f"Body of {sent.token}.",
        *[f"Filler line {i} so that the message is not tiny." for i in range(20)],
        "",
    ]
    return "\r\n".join(lines).encode()


def client(
    n: int,
    round_no: int,
    run: str,
    user: str,
    password: str,
    local_user: str,
    ca_cert: Path,
    stop: threading.Event,
    book: Book,
) -> None:
    """One mail program: STARTTLS (verified), AUTH, then messages until `stop`; a session cut
    short (the kill) is reported to the book and, until `stop`, opened again."""
    rng = random.Random(f"{run}-{round_no}-{n}")
    context = ssl.create_default_context(cafile=str(ca_cert))
    sender = f"{user}@{LOCAL_DOMAIN}"
    i = 0
    while not stop.is_set():
        try:
            s = smtplib.SMTP(NS_V4, SUBMISSION_PORT, local_hostname=CLIENT_HELO, timeout=IO_TIMEOUT)
        except OSError as exc:
            book.error("connect", exc)
            stop.wait(0.2)
            continue
        stage = "session"
        try:
            s.ehlo(CLIENT_HELO)
            s.starttls(context=context)
            s.ehlo(CLIENT_HELO)
            s.login(user, password)
            with book.lock:
                book.logins += 1
            while not stop.is_set():
                i += 1
                a = f"c{n}@chaos-a.test"
                b = f"c{n}@chaos-b.test"
                remote = rng.choice([[a], [b], [a, b], [a, f"c{n}x@chaos-a.test"]])
                local = [f"{local_user}@{LOCAL_DOMAIN}"] if rng.random() < 0.3 else []
                sent = Sent(f"CHAOS-{run}-r{round_no}c{n}n{i}", remote, local, round_no)
                with book.lock:
                    book.tried[sent.token] = sent
                stage = "transaction"
                code, text = s.mail(sender)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, text, sender)
                for r in remote + local:
                    code, text = s.rcpt(r)
                    if code not in (250, 251):
                        raise smtplib.SMTPRecipientsRefused({r: (code, text)})
                code, text = s.data(chaos_message(sender, sent))  # (raises unless 354)
                if code != 250:
                    raise smtplib.SMTPDataError(code, text)
                # The 250 to the final dot: the message is ours to keep from here on.
                found = re.search(rb"queued as ([0-9A-Z]+)", text)
                sent.queue_id = found.group(1).decode() if found else ""
                sent.accepted_at = time.time()
                with book.lock:
                    book.accepted[sent.token] = sent
                stage = "session"
                stop.wait(PACE)
            with contextlib.suppress(smtplib.SMTPException, OSError):
                s.quit()
        except (smtplib.SMTPException, OSError) as exc:  # (ssl.SSLError is an OSError)
            book.error(stage, exc)
            stop.wait(0.1)
        finally:
            s.close()


def run_load(
    m: Mailerd, s: Setup, run: str, round_no: int, user: str, password: str, local_user: str,
    book: Book, seconds: float,
) -> tuple[float, list[int]]:  # fmt: skip
    """CLIENTS clients for `seconds`, then SIGKILL of mailerd's whole process group while they
    still send; (the kill's time, the pids killed)."""
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=client,
            args=(n, round_no, run, user, password, local_user, s.ca_cert, stop, book),
            daemon=True,
        )
        for n in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(seconds)
        killed_at = time.time()
        victims = m.kill9()
    finally:
        stop.set()
        for t in threads:
            t.join(IO_TIMEOUT + 5)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return killed_at, victims


# --------------------------------------------------------------------------------------------
# What arrived
# --------------------------------------------------------------------------------------------


def received_copies(net: Internet) -> list[dict[str, Any]]:
    """Every message a receiver took (2xx to its data), with its token, our queue id, and
    when its connection was opened (`connected`; see check_duplicates)."""
    out = []
    for receiver in net.all_receivers():
        connected = {e["conn"]: e["t"] for e in receiver.events("connect")}
        for t in receiver.delivered():
            data = t["data"]
            tokens = set(TOKEN_RE.findall(data))
            qid = QUEUE_ID_RE.search(data)
            out.append(
                {
                    "receiver": receiver.name,
                    "t": t["t"],
                    "connected": connected.get(t["conn"], t["t"]),
                    "pairs": [(tok, rcpt.lower()) for tok in tokens for rcpt in t["rcpt_tos"]],
                    "tokens": tokens,
                    "queue_id": qid.group(1) if qid else "",
                    "data": data.encode("latin-1"),
                }
            )
    return out


def log_segments(log_text: str) -> list[str]:
    """The log of each start (the harness writes `=== test harness: start #N` before each)."""
    parts = re.split(r"^=== test harness: start #\d+.*$", log_text, flags=re.M)
    return parts[1:]


def sent_lines(segment: str) -> set[tuple[str, str]]:
    """(queue id, recipient) of each `status=sent` line of a log segment."""
    found = re.findall(r"([0-9A-Z]+): to=<([^>]*)>, relay=(?!queue)\S+, .*status=sent", segment)
    return {(qid, rcpt.lower()) for qid, rcpt in found}


def queue_states(m: Mailerd) -> dict[tuple[str, str], str]:
    """(queue id, recipient) → state, of every envelope in the queue (read after a kill)."""
    out = {}
    for qid in m.queued_ids():
        env = m.envelope(qid)
        for r in env["recipients"] if env else []:
            out[(qid, r["address"].lower())] = r["state"]
    return out


_keys_seen: dict[bytes, bytes | None] = {}


def cached_txt(name, timeout=5):
    """dkimpy's dnsfunc: the TXT record from the namespace's DNS server (once per name)."""
    key = name if isinstance(name, bytes) else name.encode()
    if key not in _keys_seen:
        _keys_seen[key] = txt_lookup(name, timeout)
    return _keys_seen[key]


def signature_problem(data: bytes) -> str | None:
    """Why a received copy does not carry our one verifying signature; None if it does."""
    sigs = signature_fields(data)
    if len(sigs) != 1:
        return f"{len(sigs)} DKIM-Signature fields"
    t = tags(sigs[0])
    if (t.get("d"), t.get("s")) != (LOCAL_DOMAIN, SELECTOR):
        return f"d={t.get('d')} s={t.get('s')}"
    try:
        ok = dkim.verify(data, dnsfunc=cached_txt)
    except dkim.DKIMException as exc:
        return f"dkimpy: {exc}"
    return None if ok else "dkimpy: the signature does not verify"


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


def test_accepted_mail_survives_repeated_kill_9_under_load(setup: Setup, tmp_path: Path):
    started = time.monotonic()
    net = setup.net
    mx2 = net.receivers["mx2"]
    base = tmp_path / "chaos"
    base.mkdir()
    user, local_user, password = "alice", "bob", f"Pw-{uuid.uuid4().hex[:12]}!"
    passwd = base / "passwd"
    conf = base / "passwd-command.conf"  # (names a pid file nobody uses: no reload signalled)
    conf.write_text(f"[mailerd]\npidfile = {base / 'no-such-mailerd.pid'}\n")
    made = subprocess.run(
        [PYTHON, "-m", "mailerd", "passwd", "-c", str(conf), "--passwd", str(passwd), user],
        input=password + "\n", capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert made.returncode == 0, f"mailerd passwd: {made.returncode}\n{made.stderr}"
    m = Mailerd(
        net.netns,
        base,
        port=2525,
        untrusted="none",
        name="chaos",
        extra=[
            "-w", "2",
            "--tls-cert", str(setup.tls_cert), "--tls-key", str(setup.tls_key),
            "--listen-submission", f"{NS_V4}:{SUBMISSION_PORT}",
            "--passwd", str(passwd),
            "--dkim-key", f"{LOCAL_DOMAIN}:{SELECTOR}:{setup.key}",
            "--max-recipients-per-day", "0",
        ],
    )  # fmt: skip
    m.add_user(user)
    m.add_user(local_user)
    check_mailerd_runs(m)
    run = uuid.uuid4().hex[:8]
    book = Book()
    kills: list[tuple[float, list[int]]] = []
    starts: list[float] = []  # when each run of mailerd began (see check_duplicates)
    on_disk: list[dict[tuple[str, str], str]] = []  # the queue's states after each kill
    try:
        starts.append(time.time())
        m.start()
        for round_no, seconds in enumerate(ROUNDS, 1):
            if round_no == 2:  # mail for chaos-b.test waits in the queue for this round
                mx2.set_script({"hostname": "mx2.peers.test", "rules": MX2_DEFER})
            killed_at, victims = run_load(
                m, setup, run, round_no, user, password, local_user, book, seconds
            )
            assert len(victims) >= 4, f"expected master, delivery, writer, workers: {victims}"
            kills.append((killed_at, victims))
            on_disk.append(queue_states(m))
            if round_no == 2:
                mx2.set_script({"hostname": "mx2.peers.test", "rules": []})
            starts.append(time.time())
            m.start()  # on the same spool and queue

        # Drain: every accepted token at each of its remote recipients, and an empty queue.
        def drained() -> bool:
            got = {(tok, r) for c in received_copies(net) for tok, r in c["pairs"]}
            want = {(tok, r.lower()) for tok, sent in book.accepted.items() for r in sent.remote}
            return want <= got and not m.queued_ids()

        deadline = time.monotonic() + DRAIN_TIMEOUT
        while not drained() and time.monotonic() < deadline:
            m.queue_cli("flush")  # (the second round's deferrals back off for seconds)
            wait_until(drained, 3.0, interval=0.3)
        time.sleep(1.0)  # anything still to come (a duplicate) comes now
        listing = m.queue_cli("list")
        log_text = m.log_text()
    finally:
        finish_or_fail(m)

    copies = received_copies(net)
    accepted = book.accepted
    summary = (
        f"{len(book.tried)} tried, {len(accepted)} accepted (250), {book.logins} logins, "
        f"{len(copies)} copies received; client errors: {dict(book.errors)} "
        f"({book.error_samples}); kills at {[round(k - starts[0], 2) for k, _ in kills]} s"
    )
    print(f"\nchaos: {summary}")
    for n in range(1, len(ROUNDS) + 1):
        assert any(s.round == n for s in accepted.values()), f"round {n}: no 250\n{summary}"
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for c in copies:
        for pair in c["pairs"]:
            by_pair[pair].append(c)

    check_none_lost(accepted, by_pair, kills, summary, m)
    check_duplicates(by_pair, starts, on_disk, log_text)
    check_local_copies(accepted, m.mailbox(local_user))
    check_signatures(copies)
    check_queue_empty(m, listing, accepted, by_pair, on_disk)
    print(f"chaos: took {time.monotonic() - started:.1f}s")


# --------------------------------------------------------------------------------------------
# The verdicts
# --------------------------------------------------------------------------------------------


def check_none_lost(
    accepted: dict[str, Sent],
    by_pair: dict[tuple[str, str], list[dict[str, Any]]],
    kills: list[tuple[float, list[int]]],
    summary: str,
    m: Mailerd,
) -> None:
    """Every accepted token reached each of its remote recipients at least once."""
    missing = [
        (tok, r, sent.queue_id, f"250 {kills[sent.round - 1][0] - sent.accepted_at:.3f}s "
         f"before kill {sent.round}")
        for tok, sent in sorted(accepted.items())
        for r in sent.remote
        if not by_pair.get((tok, r.lower()))
    ]  # fmt: skip
    assert not missing, (
        f"{len(missing)} accepted copies never arrived (token, recipient, queue id, when): "
        f"{missing[:20]}\n{summary}\n--- log (tail) ---\n{m.log_tail(60)}"
    )


def check_duplicates(
    by_pair: dict[tuple[str, str], list[dict[str, Any]]],
    starts: list[float],
    on_disk: list[dict[tuple[str, str], str]],
    log_text: str,
) -> None:
    """A (token, recipient) delivered more than once: every copy but the last went out in a
    run that was then killed (each in another run), and the queue on disk after that kill
    still had the recipient pending (the receiver had taken it, mailerd had not recorded it).

    A copy belongs to the last run started before the receiver accepted its connection: that
    connection's banner was read, and answered, by the mailerd that opened it, so it was
    accepted before that run's kill and after its start. (Not by the time the receiver recorded
    the data: a busy receiver records a copy sent just before a kill some ms later, after the
    next start had begun.)"""
    segments = log_segments(log_text)
    assert len(segments) == len(starts), f"{len(segments)} starts in the log, {len(starts)} made"
    logged = [sent_lines(segment) for segment in segments]

    def run_of(t: float) -> int:
        return max(i for i, begun in enumerate(starts) if begun <= t)

    duplicates, unexplained, logged_first = [], [], 0
    for (tok, rcpt), got in sorted(by_pair.items()):
        if len(got) < 2:
            continue
        got = sorted(got, key=lambda c: c["t"])
        runs = [run_of(c["connected"]) for c in got]
        duplicates.append((tok, rcpt, got[0]["queue_id"], [r + 1 for r in runs]))
        for c, run, next_run in zip(got, runs, runs[1:], strict=False):
            state = on_disk[run].get((c["queue_id"], rcpt)) if run < len(on_disk) else None
            why = ""
            if run >= len(on_disk):
                why = f"run {run + 1} was not killed"
            elif next_run <= run:
                why = f"sent twice by run {run + 1}"
            elif state != "pending":
                why = f"after kill {run + 1} its envelope said {state or 'nothing (gone)'}"
            if why:
                unexplained.append((tok, rcpt, c["queue_id"], why))
            elif (c["queue_id"], rcpt) in logged[run]:
                logged_first += 1  # (logged as sent, killed before the envelope was written)
    print(
        f"chaos: {len(duplicates)} (token, recipient) pairs delivered more than once, each "
        f"first by a run killed while its envelope still had it pending ({logged_first} of "
        f"them logged `status=sent` before the kill; token, recipient, queue id, runs): "
        f"{duplicates}"
    )
    assert not unexplained, f"duplicates at-least-once does not explain: {unexplained}"


def check_local_copies(accepted: dict[str, Sent], mailbox: list[bytes]) -> None:
    """A local copy is in its mailbox at most once, and an accepted one exactly once."""
    counts: collections.Counter = collections.Counter()
    for raw in mailbox:
        for tok in set(TOKEN_RE.findall(raw.decode("latin-1"))):
            counts[tok] += 1
    twice = {tok: n for tok, n in counts.items() if n > 1}
    assert not twice, f"local copies stored more than once: {twice}"
    lost = [(tok, s.queue_id) for tok, s in sorted(accepted.items()) if s.local and not counts[tok]]
    assert not lost, f"accepted tokens whose local copy is missing: {lost}"
    wanted = sum(1 for s in accepted.values() if s.local)
    print(f"chaos: {len(counts)} local copies, {wanted} of them of accepted tokens")


def check_signatures(copies: list[dict[str, Any]]) -> None:
    """Every copy a receiver took carries our one signature, and dkimpy verifies it."""
    bad = [
        (c["receiver"], sorted(c["tokens"]), c["queue_id"], why)
        for c in copies
        if (why := signature_problem(c["data"])) is not None
    ]
    assert not bad, (
        f"{len(bad)} of {len(copies)} copies without our verifying signature: {bad[:10]}"
    )


def check_queue_empty(
    m: Mailerd,
    listing: subprocess.CompletedProcess,
    accepted: dict[str, Sent],
    by_pair: dict[tuple[str, str], list[dict[str, Any]]],
    on_disk: list[dict[tuple[str, str], str]],
) -> None:
    """Nothing queued. A msg/ file without an envelope (removed after an hour) is debris of a
    kill: before the commit (it holds no accepted token), or between the two unlinks of an item
    delivered in full (the envelope goes first): then a kill found its envelope gone and every
    remote recipient of its accepted tokens took a copy of that very queue item."""
    assert not m.queued_ids(), f"still queued: {m.queued_ids()}"
    assert listing.returncode == 0 and "Mail queue is empty" in listing.stdout, (
        f"`mailerd queue list` is not empty:\n{listing.stdout}{listing.stderr}"
    )
    debris = sorted((m.queue / "msg").iterdir())
    held = {
        f.name: sorted(set(TOKEN_RE.findall(f.read_bytes().decode("latin-1"))) & set(accepted))
        for f in debris
    }
    unexplained = {
        name: tokens
        for name, tokens in held.items()
        if tokens
        and not _removed_when_killed(name, [accepted[t] for t in tokens], by_pair, on_disk)
    }
    assert not unexplained, (
        f"msg/ files without an envelope hold accepted tokens not delivered from them: "
        f"{unexplained} (all: {held})"
    )
    print(f"chaos: msg/ files left without an envelope (and the accepted tokens in them): {held}")


def _removed_when_killed(
    queue_id: str,
    sent: list[Sent],
    by_pair: dict[tuple[str, str], list[dict[str, Any]]],
    on_disk: list[dict[tuple[str, str], str]],
) -> bool:
    """Whether the item was delivered in full and a kill cut its removal short."""
    delivered = all(
        any(c["queue_id"] == queue_id for c in by_pair.get((s.token, r.lower()), []))
        for s in sent
        for r in s.remote
    )
    return delivered and any(
        all(s.round <= k + 1 for s in sent) and all(qid != queue_id for qid, _ in states)
        for k, states in enumerate(on_disk)
    )

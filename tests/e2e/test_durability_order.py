"""250 means safe, seen in the system calls: before the 250 to a message's final dot is written
to the client's socket (or before `sendmail` exits 0), the message's final file and its
directory were fsync'd, and those fsyncs had completed.

A kill -9 cannot catch a missing fsync (the page cache outlives the process), so these tests
watch the real system calls with strace: `strace -f -p` attached to every process of a running
mailerd (the master, its children and their threads; -f follows what they start), or running
`mailerd sendmail` under it. The order of strace's output is the order that counts: a traced
thread is stopped at each syscall's exit until strace has printed it, so an fsync that a 250
waits for is printed (its "resumed" half, when split) before the 250's write starts. -yy
prints every descriptor with its path (or its TCP addresses), so a file is matched by name,
whatever number its descriptor had or has since.

For each final file: its last write before the 250 is followed by an fsync/fdatasync of it (or
an IOCB_CMD_FSYNC iocb naming it, complete when io_getevents has reaped that context's events)
that completed before the 250; and the rename (or O_CREAT) that gave it its final name is
followed by a completed fsync of its directory (a syncfs covers both: `sendmail` as a user
who may not open the maildrop).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import Mailerd, free_port, send_message, unique, wait_until

STRACE = shutil.which("strace")
pytestmark = pytest.mark.skipif(
    STRACE is None, reason="needs strace (Debian package strace; scripts/setup installs it)"
)

SYSCALLS = (
    "open,openat,creat,write,writev,pwrite64,pwritev,pwritev2,copy_file_range,sendfile,"
    "fsync,fdatasync,syncfs,rename,renameat,renameat2,io_submit,io_getevents,io_pgetevents,"
    "sendto,sendmsg"
)
STRACE_ARGS = ["-f", "-q", "-ttt", "-yy", "-s", "64", "-e", f"trace={SYSCALLS}"]
FILE_WRITES = {"write", "writev", "pwrite64", "pwritev", "pwritev2", "copy_file_range", "sendfile"}
SOCKET_WRITES = {"write", "writev", "sendto", "sendmsg"}

LINE = re.compile(r"^(\d+) +(?:\d+\.\d+ +)?(.*)$")
RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
CALL = re.compile(r"^(\w+)\((.*)$")
RESULT = re.compile(r"\) += (-?\d+|0x[0-9a-f]+)(?:<([^<>]*)>)?(?: [A-Z]+)?(?: \([^()]*\))?$")
FD = r"(?:AT_FDCWD|-?\d+)<(.*?)>"
STRING = r'"((?:[^"\\]|\\.)*)"'


@dataclass
class Call:
    """One system call, put together from its halves when strace split it."""

    tid: int
    name: str
    args: str  # the text after "name(", up to the end of the line (result included)
    start: int  # line number of its entry
    end: int  # line number of its completion
    result: int | None = None
    result_path: str | None = None  # -yy: the path of a returned descriptor

    def fd_path(self, n: int = 0) -> str | None:
        """The path -yy printed for the call's n-th descriptor argument."""
        found = re.findall(rf"(?:^|, ){FD}", self.args)
        return found[n] if len(found) > n else None


@dataclass
class Trace:
    lines: list[str]
    root: str = ""  # shown as $TMP in excerpts
    calls: list[Call] = field(default_factory=list)
    exits: dict[int, tuple[int, int]] = field(default_factory=dict)  # tid -> (status, line)

    @classmethod
    def parse(cls, text: str, root: Path | None = None) -> Trace:
        trace = cls(text.splitlines(), os.path.realpath(root) if root else "")
        pending: dict[tuple[int, str], tuple[str, int]] = {}
        for i, line in enumerate(trace.lines):
            m = LINE.match(line)
            if not m:
                continue
            tid, rest = int(m.group(1)), m.group(2)
            if rest.startswith("+++ exited with "):
                trace.exits[tid] = (int(rest.split()[3]), i)
                continue
            if r := RESUMED.match(rest):
                name = r.group(1)
                entry, start = pending.pop((tid, name), ("", i))
                trace._add(tid, name, entry + r.group(2), start, i)
            elif c := CALL.match(rest):
                name, args = c.groups()
                if args.endswith("<unfinished ...>"):
                    pending[(tid, name)] = (args[: -len("<unfinished ...>")].rstrip(), i)
                else:
                    trace._add(tid, name, args, i, i)
        return trace

    def _add(self, tid: int, name: str, args: str, start: int, end: int) -> None:
        call = Call(tid, name, args, start, end)
        if r := RESULT.search(args):
            call.result = int(r.group(1), 0)
            call.result_path = r.group(2)
        self.calls.append(call)

    def show(self, first: int, last: int) -> str:
        text = "\n".join(self.lines[max(0, first) : last + 1])
        return text.replace(self.root, "$TMP") if self.root else text


class Order:
    """What the trace says about files: where each name came from, and when it was synced."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.cwd: dict[int, str] = {}
        self.proc_fd: dict[tuple[int | None, str], str] = {}  # /proc/self/fd/N → its path
        self.writes: list[tuple[str, int]] = []  # (path, line it completed)
        self.created: list[tuple[str, int]] = []  # (path, line): O_CREAT gave it that name
        self.renamed: list[tuple[str, str, int]] = []  # (source, target, line)
        self.synced: list[tuple[str | None, int, int]] = []  # (path, start, end); None: syncfs
        self.submitted: dict[tuple[int, str], list[tuple[list[str], int, int]]] = defaultdict(list)
        for call in trace.calls:
            self._learn(call)

    def _learn(self, call: Call) -> None:
        ok = call.result is not None and call.result >= 0
        if m := re.match(r"AT_FDCWD<(.*?)>", call.args):
            self.cwd[call.tid] = m.group(1)
        if call.name in ("open", "openat", "creat") and ok and call.result_path:
            # "/proc/self/fd/N/rest" opened as ".../rest": N is that prefix (privileges.keep_dir)
            opened = re.search(STRING, call.args)
            p = opened and re.match(r"/proc/self/fd/(\d+)(/.*)$", opened.group(1))
            if p and call.result_path.endswith(p.group(2)):
                prefix = call.result_path[: -len(p.group(2))]
                self.proc_fd[(call.tid, p.group(1))] = prefix
                self.proc_fd[(None, p.group(1))] = prefix
            if call.name == "creat" or "O_CREAT" in call.args:
                self.created.append((call.result_path, call.end))
        elif call.name in FILE_WRITES and ok:
            path = call.fd_path(1 if call.name == "copy_file_range" else 0)
            if path and path.startswith("/"):
                self.writes.append((path, call.end))
        elif call.name in ("fsync", "fdatasync") and call.result == 0:
            self.synced.append((call.fd_path(), call.start, call.end))
        elif call.name == "syncfs" and call.result == 0:
            self.synced.append((None, call.start, call.end))
        elif call.name in ("rename", "renameat", "renameat2") and call.result == 0:
            names = re.findall(rf"(?:{FD}, )?{STRING}", call.args)
            if len(names) >= 2:
                source, target = (self._resolve(call.tid, d, n) for d, n in names[:2])
                self.renamed.append((source, target, call.end))
        elif call.name == "io_submit" and ok:
            ctx = call.args.split(",", 1)[0]
            iocbs = re.findall(r"IOCB_CMD_F(?:D)?SYNC[^}]*?aio_fildes=\d+<(.*?)>", call.args)
            self.submitted[(call.tid, ctx)].append((iocbs[: call.result], call.start, call.result))
        elif call.name in ("io_getevents", "io_pgetevents") and ok:
            self._reaped(call)

    def _reaped(self, call: Call) -> None:
        """A context's iocbs are complete once io_getevents has reaped as many events as were
        submitted to it (mailerd's aiofsync reaps all of a batch in the thread that made it)."""
        ctx = call.args.split(",", 1)[0]
        batches = self.submitted.get((call.tid, ctx), [])
        left = call.result or 0
        for k, (paths, start, count) in enumerate(batches):
            if count <= 0 or left <= 0:
                continue
            took = min(count, left)
            left -= took
            batches[k] = (paths, start, count - took)
            if count - took == 0:
                self.synced.extend((p, start, call.end) for p in paths)

    def _resolve(self, tid: int, directory: str | None, name: str) -> str:
        if m := re.match(r"/proc/self/fd/(\d+)(/.*)$", name):
            prefix = self.proc_fd.get((tid, m.group(1))) or self.proc_fd.get((None, m.group(1)))
            return (prefix + m.group(2)) if prefix else name
        if name.startswith("/"):
            return name
        return os.path.join(directory or self.cwd.get(tid, "?"), name)

    def renames_into(self, directory: str, before: int) -> list[tuple[str, str, int]]:
        return [r for r in self.renamed if os.path.dirname(r[1]) == directory and r[2] < before]

    def durable(self, final: str, before: int, moment: str) -> list[str]:
        """What is missing for `final` (file and directory entry) to be safe by line `before`
        (`moment`: what happens there, for the messages)."""
        made = [(None, line) for path, line in self.created if path == final and line < before]
        made += [(s, line) for s, t, line in self.renamed if t == final and line < before]
        if not made:
            return [f"{final}: never created or renamed into place before {moment}"]
        source, entry = max(made, key=lambda m: m[1])
        names = {final} | ({source} if source else set())
        problems = []
        written = [line for path, line in self.writes if path in names and line < before]
        last_write = max(written, default=-1)
        if not self._synced(names, last_write, before):
            problems.append(
                f"{final}: its data was not fsync'd (after its last write, line "
                f"{last_write + 1}, as {' / '.join(sorted(names))}) before {moment}"
            )
        directory = os.path.dirname(final)
        if not self._synced({directory}, entry, before):
            problems.append(
                f"{directory}: not fsync'd after {final} got its name (line {entry + 1}) "
                f"before {moment}"
            )
        return problems

    def _synced(self, names: set[str], after: int, before: int) -> bool:
        return any(
            (path is None or path in names) and start > after and end < before
            for path, start, end in self.synced
        )


# -- running strace ----------------------------------------------------------------------------


def tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def tracer_of(tid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return None


@contextlib.contextmanager
def traced(m: Mailerd, out: Path):
    """strace -f attached to every process of `m` (all their threads) for the with-block; the
    output is complete once the block is left (strace detached and exited)."""
    pids = [m.pid, *m.descendants()]
    argv = [STRACE, *STRACE_ARGS, "-o", str(out)]
    for pid in pids:
        argv += ["-p", str(pid)]
    err = out.with_suffix(".stderr")
    with open(err, "wb") as stderr:
        strace = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
    try:
        attached = wait_until(
            lambda: (
                strace.poll() is not None
                or all(tracer_of(t) == strace.pid for p in pids for t in tasks(p))
            ),
            timeout=10,
        )
        if strace.poll() is not None or not attached:
            text = err.read_text("utf-8", "replace").strip()
            if "Operation not permitted" in text:
                pytest.skip(f"ptrace not permitted here: {text.splitlines()[0]}")
            raise AssertionError(f"strace did not attach to {pids}: {text}")
        yield
    finally:
        if strace.poll() is None:
            strace.send_signal(signal.SIGINT)  # detaches, the tracees go on
            try:
                strace.wait(10)
            except subprocess.TimeoutExpired:
                strace.kill()
                strace.wait(5)


def reply_written(trace: Trace, port: int, code: str, after: int = -1) -> int | None:
    """The line where the first write of a reply starting with `code` to the client whose
    local port is `port` started (after line `after`)."""
    peer = re.compile(rf"^-?\d+<TCP(?:v6)?:\[[^\]]*->(?:\[[^\]]*\]|[\d.]+):{port}\]>")
    for call in sorted(trace.calls, key=lambda c: c.start):
        if call.name not in SOCKET_WRITES or call.start <= after or not peer.match(call.args):
            continue
        data = re.search(STRING, call.args)
        if data and data.group(1).startswith(code):
            return call.start
    return None


def smtp_and_trace(m: Mailerd, tmp: Path, rcpt: str, body: bytes) -> tuple[Trace, int, str]:
    """One message to `rcpt` over the trusted listener with strace attached: the trace, the
    line where the 250 to its final dot started, and that reply's text."""
    out = tmp / "strace.txt"
    with traced(m, out), m.connect() as c:
        c.start()
        port = c.sock.getsockname()[1]
        reply = send_message(c, rcpt, body)
        c.cmd("QUIT")
    trace = Trace.parse(out.read_text("utf-8", "replace"), tmp)
    data = reply_written(trace, port, "354")
    assert data is not None, f"no 354 to port {port} in the trace:\n{trace.show(0, 200)}"
    final = reply_written(trace, port, "250", after=data)
    assert final is not None, f"no 250 after the 354 in the trace:\n{trace.show(data, data + 200)}"
    return trace, final, reply.text


def assert_durable(trace: Trace, finals: list[str], before: int, what: str, moment: str) -> None:
    order = Order(trace)
    problems = [p for f in finals for p in order.durable(f, before, moment)]
    if trace.root:
        problems = [p.replace(trace.root, "$TMP") for p in problems]
    if problems:
        pytest.fail(
            f"{what} was reported safe before it was ($TMP = {trace.root}):\n  "
            + "\n  ".join(problems)
            + f"\n--- the trace up to {moment} (line {before + 1}) ---\n"
            + trace.show(before - 60, before),
            pytrace=False,
        )


def body_for(tag: str) -> bytes:
    return f"Subject: {tag}\r\n\r\n{tag} must be on disk before its 250\r\n".encode()


# -- the cases ---------------------------------------------------------------------------------


def test_local_mailbox_message_is_synced_before_250(mailerd_factory, tmp_path):
    m = mailerd_factory(workers=1)
    user = m.new_user("dur")
    tag = unique("local")
    trace, final, _ = smtp_and_trace(m, tmp_path, f"{user}@example.org", body_for(tag))
    box = os.path.realpath(m.spool / user)
    order = Order(trace)
    renamed = {os.path.basename(t) for _, t, _ in order.renames_into(box, final)}
    numbers = {n for n in renamed if re.fullmatch(r"\d+(\.status)?", n)}
    assert numbers == {"1", "1.status"}, (
        f"expected 1 and 1.status renamed into {box} before the 250, saw {sorted(numbers)}\n"
        + trace.show(final - 60, final)
    )
    assert tag.encode() in m.read(user, 1), "the traced file is not the message sent"
    assert_durable(trace, [f"{box}/1", f"{box}/1.status"], final, "a local message", "the 250")


def test_queued_remote_message_is_synced_before_250(mailerd_factory, tmp_path):
    # A relayhost where nothing listens: the message waits in the queue, no DNS is asked.
    relay = ["--relayhost", f"127.0.0.1:{free_port()}", "--retry-after", "1h"]
    m = mailerd_factory(workers=1, extra=relay)
    tag = unique("remote")
    trace, final, text = smtp_and_trace(m, tmp_path, "someone@remote.test", body_for(tag))
    queue_id = text.rsplit(" ", 1)[-1]
    queue = os.path.realpath(m.queue)
    assert tag.encode() in (m.queue / "msg" / queue_id).read_bytes()
    finals = [f"{queue}/msg/{queue_id}", f"{queue}/env/{queue_id}"]
    assert_durable(trace, finals, final, "a queued message", "the 250")


def test_sendmail_syncs_the_maildrop_before_exit_0(mailerd_factory, tmp_path):
    m = mailerd_factory(workers=1)
    user = m.new_user("drop")
    conf = tmp_path / "sendmail.conf"
    conf.write_text(
        f"[mailerd]\nqueue = {m.queue}\ndomain = example.org\nhostname = {m.hostname}\n"
    )
    out = tmp_path / "strace.txt"
    tag = unique("drop")
    argv = [STRACE, *STRACE_ARGS, "--seccomp-bpf", "-o", str(out)]
    argv += [sys.executable, "-m", "mailerd", "sendmail", "-C", str(conf), "-i", user]
    started = time.monotonic()
    done = subprocess.run(argv, input=body_for(tag), capture_output=True, timeout=60, cwd=tmp_path)
    if done.returncode != 0 and b"Operation not permitted" in done.stderr:
        pytest.skip(f"ptrace not permitted here: {done.stderr.decode().strip()}")
    assert done.returncode == 0, f"sendmail exited {done.returncode}: {done.stderr.decode()}"
    trace = Trace.parse(out.read_text("utf-8", "replace"), tmp_path)
    exits = [line for status, line in trace.exits.values() if status == 0]
    assert exits, f"no exit in the trace ({time.monotonic() - started:.1f}s)"
    end = max(exits)
    maildrop = os.path.realpath(m.queue / "maildrop")
    names = [t for _, t, _ in Order(trace).renames_into(maildrop, end)]
    assert len(names) == 1 and not os.path.basename(names[0]).startswith("."), (
        f"expected one submission renamed into {maildrop}, saw {names}"
    )
    assert_durable(trace, names, end, "sendmail", "its exit 0")
    assert wait_until(lambda: m.messages(user), timeout=10), "the submission was not delivered"
    assert tag.encode() in m.read(user, m.messages(user)[0])

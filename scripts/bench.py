"""Benchmark mailerd against a private reference Postfix on the same machine.

Run it through scripts/bench (which runs scripts/setup --bench and raises the descriptor limit).
Everything goes to 127.0.0.1 only and nothing asks DNS: addresses are numeric, hostnames given.

Both servers are started together and measured per concurrency level C (1, 10, 50 clients):
  * throughput: Postfix's smtp-source sends M 4 KiB messages over C parallel sessions (a new
    connection per message, no pipelining); msgs/s = M / wall time until the last 250. Repeated
    (--repeat, 3 by default) and the median run reported. mailerd replies 250 only after the
    message is fsynced into the mailbox; Postfix replies 250 once its queue file is fsynced,
    and we also time until its local delivery has put all M into the Maildir ("mbox s").
    The two servers' runs are interleaved: repeat i is one mailerd run and one Postfix run back
    to back (mailerd first when i is odd, Postfix first when it is even; both servers settled
    before each run), because the disk's speed drifts over minutes (up to 2x here, and the run
    after a large deletion is often slow): running all of one server's levels and then the
    other's let a slow spell land on one server only. Each pair also gives a "paired" ratio,
    mailerd/Postfix msgs/s; the median of those is reported beside the ratio of the medians.
  * CPU: utime+stime(+cutime+cstime) from /proc/PID/stat summed over the server's process tree
    (master + descendants; reaped children show up in their parent's cutime/cstime), before the
    server's own run and after it (for Postfix after the mailbox is complete), divided by M.
    The machine's other CPU use in the same window ("others", which includes the idle other
    server) tells how noisy the measurement was.
  * memory: PSS (from /proc/PID/smaps_rollup) summed over the process tree, sampled every
    ~0.2 s during the level's phases; the peak is reported.
  * latency: a separate phase after the level's throughput runs, one server after the other,
    with C concurrent timing clients of our own (asyncio, one connection per message like
    smtp-source): time from connect() to the 250 after the final "."; median and p99 over up
    to L messages.
Then, one server after the other, idle connections: open N TCP connections, count those greeted
with 220 within 10 s, the server's memory while they are held, and the time of one message sent
meanwhile; that server is then stopped. --only runs one server alone (no pairs).
Postfix: a private instance (own config, queue and data directories under var/bench-*, smtpd on
a free loopback port only, Maildir delivery for a temporary system user), removed afterwards.

Then the TLS phase (--no-tls: the above alone, as before; --tls-only: this alone), with a new
mailerd and a new private Postfix, configured as above plus: ONE ECDSA P-256 certificate for
both (tests/certs.py, made with the openssl command), STARTTLS offered on the listener the
plaintext runs use, and a submission port: mailerd's --listen-submission with an argon2id
--passwd file for user@localhost; Postfix's submission service (smtpd_tls_security_level =
encrypt, smtpd_tls_auth_only, Cyrus SASL: auxprop sasldb, PLAIN LOGIN; permit_sasl_authenticated
then reject) for its temporary user. Postfix sends no TLS 1.3 session tickets, as mailerd does
not (with its default tickets, each message waits ~40 ms: see Postfix.start; --postfix-tickets
keeps them). For each run, STARTTLS then submission (--tls-modes), and level (--tls-levels, 1
and 10), the servers' runs interleaved and repeated (--repeat) as above:
  * load: smtp-source has no TLS, so this script's own generator: Python asyncio on uvloop with
    the ssl module, in processes of its own (--tls-generators; default 1 for 1 client, else 2,
    the clients split between them), each client looping: connect, 220, EHLO, STARTTLS, a full
    handshake (no session resumption, no certificate check), EHLO, [AUTH PLAIN, for every
    message], MAIL, RCPT, DATA with the 4 KiB message of the latency phase, QUIT. M messages per
    run (--tls-messages, as --messages by default); only those answered with the final 250
    count; msgs/s = those / time from the first connect to the last 250.
  * CPU of the server's tree and peak PSS as above; also the generator's own CPU per message
    ("gen"): it runs on the same cores as the servers. No latency phase, no idle test.
  * before a run's levels, one probe message per server: one that fails it is left out of that
    run, with the reason in its notes (so is a Postfix without Cyrus SASL: sasl2-bin,
    libsasl2-modules). A mailerd worker remembers a successful login for 10 minutes, so
    argon2id's ~0.18 s of CPU (and 64 MiB) is paid once per worker, not per message.
With --pin, every load generator (smtp-source too) runs on the last CPU and everything else
(the servers, the DNS server, this script) on the others, so that a generator's CPU does not
take from the server it measures; by default all share every CPU, the figures in the README.
The generator runs as `bench.py --load-generator SPEC` (a JSON spec; internal).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import errno
import json
import math
import os
import pwd
import re
import resource
import secrets
import selectors
import shutil
import signal
import socket
import ssl
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from dnsserver import DNSServer, Records  # noqa: E402  (the test suite's DNS server)

_dns: DNSServer | None = None


GUARD = {"MAILERD_FORBID_SYSTEM_RESOLVER": "1"}  # see mailerd/resolver.py


def bench_dns() -> str:
    """--dns-server for every mailerd the benchmark runs: a DNS server of its own that knows no
    name, so nothing the benchmark does can ask the machine's resolver."""
    global _dns
    if _dns is None:
        _dns = DNSServer(Records(), HOST)
        _dns.start()
    return f"{_dns.host}:{_dns.port}"


CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
HOST = "127.0.0.1"
HELO = "bench.localhost"
SENDER = "sender@example.org"
MSG_LEN = 4096
PF_USER = "mdbench"
PF_USER_GECOS = "mailerd bench temporary user"


class Interrupted(Exception):
    pass


def unjournalled_ext4(path: Path) -> bool:
    """True for ext4 mounted without a journal (no /proc/fs/jbd2/<device>-8 for it)."""
    dev = os.stat(path).st_dev
    try:
        name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
        fstype = subprocess.run(
            ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return False
    jbd2 = Path("/proc/fs/jbd2")
    journalled = jbd2.is_dir() and any(e.name.startswith(f"{name}-") for e in jbd2.iterdir())
    return fstype.startswith("ext2/ext3") and not journalled


def bench_parent() -> Path:
    """Where the runs' files go: the checkout's var/, unless a directory above it is closed to
    other users (a clone in /root, mode 0700): the reference Postfix opens its files by path
    as its own users, so the runs then go below /var/tmp, said once."""
    for directory in [ROOT / "var", *(ROOT / "var").parents]:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            log(f"{directory} is closed to other users (Postfix's among them): runs go in /var/tmp")
            return Path("/var/tmp")
    return ROOT / "var"


def wait_for_deleted_inodes() -> None:
    """Wait out the inodes the previous run deleted (see RECENTLY_DELETED), if it was recent."""
    try:
        deleted = float(DELETED_MARK.read_text().strip())
    except (OSError, ValueError):
        return
    left = deleted + RECENTLY_DELETED - time.time()
    if left <= 0 or not unjournalled_ext4(ROOT / "var"):
        return
    log(
        f"the previous run deleted its files {RECENTLY_DELETED - left:.0f} s ago; ext4 without "
        f"a journal makes every new file skip them for up to {RECENTLY_DELETED:.0f} s, which "
        f"would slow both servers: waiting {left:.0f} s (--no-wait to skip)"
    )
    time.sleep(left)


def log(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# /proc helpers


def proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, user ticks, system ticks) for every process, each including the process's
    reaped children (utime+cutime, stime+cstime)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rp = data.rfind(b")")
        fields = data[rp + 2 :].split()
        # fields[0] = state (stat field 3), [1] = ppid (4), [11..14] = utime stime cutime cstime
        try:
            u, st, cu, cs = (int(x) for x in fields[11:15])
            table[int(name)] = (int(fields[1]), u + cu, st + cs)
        except (IndexError, ValueError):
            continue
    return table


def tree_pids(root: int, table) -> list[int]:
    children = collections.defaultdict(list)
    for pid, row in table.items():
        children[row[0]].append(pid)
    out, stack, seen = [], [root], set()
    while stack and len(out) < 100000:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


DISK_STAT: Path | None = None  # /sys/dev/block/M:m/stat of the file system under var/

# ext4 without a journal will not reuse an inode freed less than 60 s ago (360 s while its
# inode-table block is still dirty): ext4's find_inode_bit() calls recently_deleted() for every
# free inode it meets from the start of the group, and each call reads an inode. After the
# thousands of files a run deletes, each new file costs ~1 ms of kernel CPU until they age out,
# so a run started soon after the last one's clean-up measures that, not the servers (perf:
# recently_deleted + find_get_block_common, 60-70 % of the mailbox writer's CPU).
RECENTLY_DELETED = 360.0
DELETED_MARK = ROOT / "var" / ".bench-deleted"


def disk_snapshot() -> tuple[int, int, int] | None:
    """(write requests, sectors written, flush requests) completed by the spools' disk so far;
    None where the kernel does not say (no such file, or before Linux 5.5 for flushes)."""
    if DISK_STAT is None:
        return None
    try:
        fields = [int(x) for x in DISK_STAT.read_text().split()]
    except (OSError, ValueError):
        return None
    return (fields[4], fields[6], fields[15]) if len(fields) > 15 else None


def cpu_snapshot(root: int) -> dict:
    """CPU seconds so far: the server tree (user, sys), the whole machine (busy), and this
    process and its reaped children (smtp-source), to tell the server's share from others'."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    # user nice system idle iowait irq softirq steal: processes' time only (interrupts and
    # hypervisor steal are not attributable)
    busy = (v[0] + v[1] + v[2]) / CLK_TCK
    own = sum(
        resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
        for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    table = proc_table()
    pids = tree_pids(root, table)
    kpids = tree_pids(2, table)  # kthreadd's: kernel threads (jbd2, kworkers)
    return {
        "t": time.monotonic(),
        "procs": {p: (proc_name(p), table[p][1] + table[p][2]) for p in pids},
        "user": sum(table[p][1] for p in pids) / CLK_TCK,
        "sys": sum(table[p][2] for p in pids) / CLK_TCK,
        "kthreads": {p: table[p][1] + table[p][2] for p in kpids},
        "busy": busy,
        "own": own,
    }


def proc_name(pid: int) -> str:
    """The process title (mailerd's setproctitle, or the program's base name), digits as N."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        argv0 = ""
    name = os.path.basename(argv0.split(" -")[0]) if argv0.startswith("/") else argv0
    return re.sub(r"\d+", "N", name.split(" -")[0].strip()) or "?"


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")
    except OSError:
        return False


class Sampler(threading.Thread):
    """Samples the summed PSS of a process tree; peak() gives the peak since the last reset."""

    def __init__(self, root: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self._peak = self._peak_procs = 0
        self.last = 0

    def sample(self) -> tuple[int, int]:
        table = proc_table()
        pids = tree_pids(self.root, table)
        return sum(pss_bytes(p) for p in pids), len(pids)

    def run(self):
        while not self.stop_ev.is_set():
            t0 = time.monotonic()
            total, n = self.sample()
            with self.lock:
                self.last = total
                self._peak = max(self._peak, total)
                self._peak_procs = max(self._peak_procs, n)
            spent = time.monotonic() - t0
            self.stop_ev.wait(max(self.interval, 2 * spent))

    def reset(self):
        with self.lock:
            self._peak = self._peak_procs = 0

    def peak(self) -> tuple[int, int]:
        total, n = self.sample()
        with self.lock:
            self.last = total
            self._peak = max(self._peak, total)
            self._peak_procs = max(self._peak_procs, n)
            return self._peak, self._peak_procs

    def stop(self):
        self.stop_ev.set()
        self.join(5)


# ---------------------------------------------------------------------------------------------
# SMTP helpers


# --pin: the load generators on the last CPU, the servers (and this script) on the others, so
# that a generator's CPU no longer takes from the server it measures (a server's real clients
# run on other machines). None: no pinning.
GENERATOR_CPUS: set[int] | None = None
PINNING = "the load generator and the servers share every CPU (no --pin)"


def pin_generator() -> None:
    """(preexec_fn of a load generator) onto GENERATOR_CPUS, when --pin."""
    if GENERATOR_CPUS is not None:
        os.sched_setaffinity(0, GENERATOR_CPUS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_banner(port: int, limit: float, proc: subprocess.Popen | None = None) -> str | None:
    """Poll until the server greets with 220 (bounded); returns the banner line or None."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return None
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                data = b""
                while b"\n" not in data and len(data) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                line = data.split(b"\n")[0].decode(errors="replace").strip()
                if line.startswith("220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return line
        except OSError:
            pass
        time.sleep(0.1)
    return None


def make_message(rcpt: str, n: int, sender: str = SENDER) -> bytes:
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: mailerd bench {n}\r\n"
        f"Message-ID: <{n}.{os.getpid()}.{time.time_ns()}@{HELO}>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n\r\n"
    )
    line = b"La de da de da " * 5 + b"la de da.\r\n"  # 86 bytes
    body = (line * (MSG_LEN // len(line) + 1))[: MSG_LEN - 2] + b"\r\n"
    return head.encode() + body + b".\r\n"


class SMTPFail(Exception):
    pass


async def _expect(reader: asyncio.StreamReader, code: bytes, what: str) -> None:
    for _ in range(100):  # bounded multi-line reply
        line = await reader.readline()
        if not line:
            raise SMTPFail(f"connection closed awaiting {what}")
        if len(line) < 4 or line[3:4] != b"-":
            if not line.startswith(code):
                raise SMTPFail(f"{what}: {line.decode(errors='replace').strip()[:120]}")
            return
    raise SMTPFail(f"{what}: reply too long")


async def _one_message(port: int, rcpt: str, n: int) -> tuple[float, float]:
    msg = make_message(rcpt, n)
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port, limit=65536)
    try:
        await _expect(reader, b"220", "banner")
        writer.write(f"EHLO {HELO}\r\n".encode())
        await _expect(reader, b"250", "EHLO")
        writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
        await _expect(reader, b"250", "MAIL")
        writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
        await _expect(reader, b"250", "RCPT")
        writer.write(b"DATA\r\n")
        await _expect(reader, b"354", "DATA")
        writer.write(msg)
        await writer.drain()
        t1 = time.monotonic()
        await _expect(reader, b"250", "end of data")
        t2 = time.monotonic()
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(asyncio.TimeoutError, SMTPFail, OSError):
            await asyncio.wait_for(_expect(reader, b"221", "QUIT"), 5)
        return t2 - t0, t2 - t1
    finally:
        writer.close()
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            await asyncio.wait_for(writer.wait_closed(), 2)


def latency_run(
    port: int, rcpt: str, clients: int, total: int, time_limit: float, msg_timeout: float = 30.0
) -> dict:
    """`clients` concurrent sequential senders, `total` messages at most, new ones only before
    time_limit (each message itself is bounded to msg_timeout)."""
    lat, dot, errors = [], [], collections.Counter()
    state = {"left": total}

    async def sender(deadline):
        while state["left"] > 0 and time.monotonic() < deadline:
            state["left"] -= 1
            try:
                a, b = await asyncio.wait_for(_one_message(port, rcpt, state["left"]), msg_timeout)
                lat.append(a)
                dot.append(b)
            except TimeoutError:
                errors[f"no 250 within {msg_timeout:g} s"] += 1
            except SMTPFail as e:
                errors[str(e)] += 1
            except OSError as e:
                errors[f"{type(e).__name__}: {e.strerror or e}"] += 1

    async def main():
        t0 = time.monotonic()
        await asyncio.gather(*(sender(t0 + time_limit) for _ in range(clients)))
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    return {"n": len(lat), "seconds": elapsed, "lat": lat, "dot": dot, "errors": dict(errors)}


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]  # nearest rank


def run_smtp_source(port: int, rcpt: str, sessions: int, count: int, timeout: float) -> dict:
    """Run smtp-source; its -c counter (one "N\\r" per completed message, flushed each time)
    gives the time of every 250, hence the longest pause between two of them."""
    cmd = [
        "smtp-source",
        "-c",
        "-s",
        str(sessions),
        "-m",
        str(count),
        "-l",
        str(MSG_LEN),
        "-M",
        HELO,
        "-f",
        SENDER,
        "-t",
        rcpt,
        f"{HOST}:{port}",
    ]
    with tempfile.TemporaryFile() as errf:
        t0 = time.monotonic()
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=errf,
            stdin=subprocess.DEVNULL,
            preexec_fn=pin_generator,
        )
        deadline = t0 + timeout
        out = bytearray()
        stamps = []  # time of each completed message
        timed_out = False
        try:
            fd = p.stdout.fileno()
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    p.kill()
                    break
                if not sel.select(min(left, 1.0)):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                now = time.monotonic()
                stamps.extend([now] * chunk.count(b"\r"))
                out += chunk
            sel.close()
            p.wait(10)
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            p.stdout.close()
        t1 = time.monotonic()
        errf.seek(0)
        err = errf.read(65536)
    nums = re.findall(rb"\d+", bytes(out))
    done = int(nums[-1]) if nums else 0
    error = None
    if timed_out:
        error = f"smtp-source timed out after {timeout:.0f} s"
    elif p.returncode != 0:
        error = (err.decode(errors="replace").strip().splitlines() or [f"exit {p.returncode}"])[-1]
    elif done != count:
        error = f"smtp-source reported {done} of {count} messages"
    points = [t0, *stamps, t1]
    gaps = [(b - a, a - t0) for a, b in zip(points, points[1:], strict=False)]
    gap, gap_at = max(gaps) if gaps else (0.0, 0.0)
    return {
        "cmd": " ".join(cmd),
        "seconds": t1 - t0,
        "done": done,
        "error": error,
        "t_start": t0,
        "t_end": t1,
        "max_gap": gap,
        "max_gap_at": gap_at,
    }


# ---------------------------------------------------------------------------------------------
# the TLS load generator: asyncio + ssl in processes of its own (run_generator starts them as
# `bench.py --load-generator SPEC`), so that its CPU is neither the servers' nor this process's


def auth_plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def _tls_message(spec: dict, ctx: ssl.SSLContext, n: int, seen: dict) -> float:
    """One message on a new connection: banner, EHLO, STARTTLS, a full handshake (no session is
    offered for resumption), EHLO, AUTH PLAIN when spec["auth"], MAIL, RCPT, DATA, QUIT.
    Returns the monotonic time of the 250 after the final '.'."""
    msg = make_message(spec["rcpt"], n, spec["sender"])
    reader, writer = await asyncio.open_connection(HOST, spec["port"], limit=65536)
    try:
        await _expect(reader, b"220", "banner")
        writer.write(f"EHLO {HELO}\r\n".encode())
        await _expect(reader, b"250", "EHLO")
        writer.write(b"STARTTLS\r\n")
        await _expect(reader, b"220", "STARTTLS")
        await writer.start_tls(ctx)
        tls = writer.get_extra_info("ssl_object")
        if tls.session_reused:
            seen["resumed"] += 1
        if "version" not in seen:
            seen["version"], seen["cipher"] = tls.version(), tls.cipher()[0]
        writer.write(f"EHLO {HELO}\r\n".encode())
        await _expect(reader, b"250", "EHLO after STARTTLS")
        if "ticket" not in seen:  # (a TLS 1.3 ticket comes after the handshake)
            session = tls.session
            seen["ticket"] = bool(session and session.has_ticket)
        if spec["auth"]:
            writer.write(f"AUTH PLAIN {spec['auth']}\r\n".encode())
            await _expect(reader, b"235", "AUTH")
        writer.write(f"MAIL FROM:<{spec['sender']}>\r\n".encode())
        await _expect(reader, b"250", "MAIL")
        writer.write(f"RCPT TO:<{spec['rcpt']}>\r\n".encode())
        await _expect(reader, b"250", "RCPT")
        writer.write(b"DATA\r\n")
        await _expect(reader, b"354", "DATA")
        writer.write(msg)
        await _expect(reader, b"250", "end of data")
        done = time.monotonic()
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(asyncio.TimeoutError, SMTPFail, OSError):
            await asyncio.wait_for(_expect(reader, b"221", "QUIT"), 5)
        return done
    finally:
        writer.close()
        with contextlib.suppress(asyncio.TimeoutError, OSError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def _plain_message(spec: dict, ctx: ssl.SSLContext, n: int, seen: dict) -> float:
    """The authentication phase's message: one of the pre-made ones (spec["_msgs"], each
    dot-terminated, DKIM-signed beforehand for the inbound runs) on a new plaintext connection:
    banner, EHLO, MAIL, RCPT, DATA, QUIT. Returns the monotonic time of the final 250."""
    msgs = spec["_msgs"]
    msg = msgs[(spec.get("offset", 0) + n) % len(msgs)]
    reader, writer = await asyncio.open_connection(HOST, spec["port"], limit=65536)
    try:
        await _expect(reader, b"220", "banner")
        writer.write(f"EHLO {HELO}\r\n".encode())
        await _expect(reader, b"250", "EHLO")
        writer.write(f"MAIL FROM:<{spec['sender']}>\r\n".encode())
        await _expect(reader, b"250", "MAIL")
        writer.write(f"RCPT TO:<{spec['rcpt']}>\r\n".encode())
        await _expect(reader, b"250", "RCPT")
        writer.write(b"DATA\r\n")
        await _expect(reader, b"354", "DATA")
        writer.write(msg)
        await _expect(reader, b"250", "end of data")
        done = time.monotonic()
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(asyncio.TimeoutError, SMTPFail, OSError):
            await asyncio.wait_for(_expect(reader, b"221", "QUIT"), 5)
        return done
    finally:
        writer.close()
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            await asyncio.wait_for(writer.wait_closed(), 2)


async def _generate(spec: dict, ctx: ssl.SSLContext) -> dict:
    """spec["clients"] sequential senders sharing spec["count"] messages; stops early after
    max(10, count/10) failed messages."""
    left = spec["count"]
    stamps: list[float] = []
    firsts: list[float] = []
    errors: collections.Counter = collections.Counter()
    seen = {"resumed": 0}
    cap = max(10, spec["count"] // 10)
    one = _plain_message if spec.get("messages") else _tls_message

    async def client():
        nonlocal left
        while left > 0 and sum(errors.values()) < cap:
            left -= 1
            n = left
            if not firsts:
                firsts.append(time.monotonic())
            try:
                stamps.append(await asyncio.wait_for(one(spec, ctx, n, seen), spec["msg_timeout"]))
            except TimeoutError:
                errors[f"no 250 within {spec['msg_timeout']:g} s"] += 1
            except SMTPFail as e:
                errors[str(e)] += 1
            except ssl.SSLError as e:
                errors[f"TLS: {e.reason or e}"] += 1
            except OSError as e:
                errors[f"{type(e).__name__}: {e.strerror or e}"] += 1

    await asyncio.gather(*(client() for _ in range(spec["clients"])))
    first = firsts[0] if firsts else None
    return {"stamps": stamps, "first": first, "errors": dict(errors), **seen}


def generator_main(spec_json: str) -> int:
    """A load generator process: says "ready" once set up, starts on "go" (stdin), prints its
    result as one JSON line, with its own CPU time from "go" to the end."""
    spec = json.loads(spec_json)
    if spec.get("messages"):  # the authentication phase's pre-made messages, base64 a line
        spec["_msgs"] = [base64.b64decode(x) for x in Path(spec["messages"]).read_text().split()]
    factory = None
    if spec["uvloop"]:
        import uvloop

        factory = uvloop.new_event_loop
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the handshake is complete all the same: only no chain check
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    with asyncio.Runner(loop_factory=factory) as runner:
        out = runner.run(_generate(spec, ctx))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_user"] = r1.ru_utime - r0.ru_utime
    out["cpu_sys"] = r1.ru_stime - r0.ru_stime
    print(json.dumps(out), flush=True)
    return 0


def _split(total: int, weights: list[int]) -> list[int]:
    """total split in proportion to weights (whole numbers, summing to total)."""
    parts = [total * w // sum(weights) for w in weights]
    for i in range(total - sum(parts)):
        parts[i % len(parts)] += 1
    return parts


def run_generator(
    port: int,
    rcpt: str,
    sender: str,
    auth: str | None,
    clients: int,
    count: int,
    procs: int,
    timeout: float,
    use_uvloop: bool = True,
    messages: str | None = None,
) -> dict:
    """The TLS counterpart of run_smtp_source: `clients` concurrent senders over `procs`
    generator processes, `count` messages in all. Only messages answered with the final 250
    count; seconds = first connect to last 250 (over all processes, CLOCK_MONOTONIC).
    With `messages` (a file: the authentication phase), plaintext sessions sending those
    pre-made messages in turn (no STARTTLS, no AUTH), each process from its own offset."""
    procs = max(1, min(procs, clients, count))
    shares = _split(clients, [1] * procs)
    counts = _split(count, shares)
    with contextlib.ExitStack() as stack:
        children = []
        for i, (share, n) in enumerate(zip(shares, counts, strict=True)):
            spec = {
                "port": port,
                "rcpt": rcpt,
                "sender": sender,
                "auth": auth,
                "clients": share,
                "count": n,
                "msg_timeout": 60.0,
                "uvloop": use_uvloop,
            }
            if messages:
                spec |= {"messages": messages, "offset": sum(counts[:i])}
            errf = stack.enter_context(tempfile.TemporaryFile())
            p = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--load-generator"]
                + [json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errf,
                preexec_fn=pin_generator,
            )
            stack.callback(_end_child, p)
            children.append((p, errf))
        outs, timed_out, t_go = _drive_generators([p for p, _ in children], timeout)
        t1 = time.monotonic()
        stamps: list[float] = []
        firsts: list[float] = []
        errors: collections.Counter = collections.Counter()
        problems: list[str] = []
        cpu_user = cpu_sys = 0.0
        resumed = 0
        tls = None
        for (p, errf), out in zip(children, outs, strict=True):
            try:
                res = json.loads(bytes(out).strip().splitlines()[-1])
            except (ValueError, IndexError):
                p.poll()
                errf.seek(0)
                err = errf.read(65536).decode(errors="replace").strip().splitlines()
                problems.append(f"generator (exit {p.returncode}): {(err or ['no output'])[-1]}")
                continue
            stamps += res["stamps"]
            if res["first"] is not None:
                firsts.append(res["first"])
            errors.update(res["errors"])
            cpu_user += res["cpu_user"]
            cpu_sys += res["cpu_sys"]
            resumed += res["resumed"]
            if "version" in res:
                tls = f"{res['version']} {res['cipher']}"
                tls += ", a session ticket sent" if res.get("ticket") else ", no session ticket"
    stamps.sort()
    done = len(stamps)
    t_start = min(firsts) if firsts else t_go
    t_end = stamps[-1] if stamps else t1
    error = None
    if timed_out:
        error = f"load generator timed out after {timeout:.0f} s"
    elif problems:
        error = problems[0]
    elif errors:
        error = "; ".join(f"{k} ({v}x)" for k, v in errors.most_common(3))
    elif done != count:
        error = f"load generator sent {done} of {count} messages"
    points = [t_start, *stamps]
    gaps = [(b - a, a - t_start) for a, b in zip(points, points[1:], strict=False)]
    gap, gap_at = max(gaps) if gaps else (0.0, 0.0)
    return {
        "cmd": f"{len(children)} generator process(es), clients {'+'.join(map(str, shares))}",
        "seconds": t_end - t_start,
        "done": done,
        "error": error,
        "t_start": t_start,
        "t_end": t_end,
        "max_gap": gap,
        "max_gap_at": gap_at,
        "gen": {
            "procs": len(children),
            "clients": shares,
            "cpu_user_seconds": cpu_user,
            "cpu_sys_seconds": cpu_sys,
            "cpu_ms_per_msg": (cpu_user + cpu_sys) * 1000 / done if done else None,
            "errors": dict(errors),
            "resumed": resumed,
            "tls": tls,
        },
    }


def _drive_generators(
    procs: list[subprocess.Popen], timeout: float
) -> tuple[list[bytearray], bool, float]:
    """Wait (30 s at most) until every generator is ready, start them together, collect their
    output until they end or `timeout` passes. Returns (outputs, timed out, time of "go")."""
    outs = {p.stdout.fileno(): bytearray() for p in procs}
    sel = selectors.DefaultSelector()
    for fd in outs:
        sel.register(fd, selectors.EVENT_READ)
    ready: set[int] = set()
    deadline = time.monotonic() + 30
    while len(ready) < len(outs) and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            chunk = os.read(key.fd, 65536)
            outs[key.fd] += chunk
            if not chunk:  # it ended (its error is in its stderr)
                sel.unregister(key.fd)
            if b"ready\n" in outs[key.fd] or not chunk:
                ready.add(key.fd)
    t_go = time.monotonic()
    for p in procs:
        with contextlib.suppress(OSError):
            p.stdin.write(b"go\n")
            p.stdin.close()
    timed_out = False
    deadline = t_go + timeout
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(min(left, 1.0)):
            chunk = os.read(key.fd, 65536)
            if chunk:
                outs[key.fd] += chunk
            else:
                sel.unregister(key.fd)
    sel.close()
    if timed_out:
        for p in procs:
            with contextlib.suppress(OSError):
                p.kill()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [outs[p.stdout.fileno()].replace(b"ready\n", b"", 1) for p in procs], timed_out, t_go


def _end_child(p: subprocess.Popen) -> None:
    """(cleanup) a generator still running, e.g. after an interruption: ours, ended by id."""
    if p.poll() is None:
        p.kill()
        p.wait()
    for f in (p.stdin, p.stdout):
        with contextlib.suppress(OSError):
            f.close()


def idle_test(port: int, n: int, window: float, hold: float, sampler: Sampler, rcpt: str) -> dict:
    """Open n connections without blocking; count 220 banners seen within `window` seconds of
    the first connect; hold them `hold` more seconds while sampling the server's memory, and
    meanwhile time one message sent on a new connection (bounded to 5 s)."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    greeted = other = closed = opened = 0
    errors = collections.Counter()
    other_lines = collections.Counter()
    sampler.reset()
    t0 = time.monotonic()
    deadline = t0 + window
    t_all = None
    open_failed = None
    try:
        while time.monotonic() < deadline and greeted + other + closed + sum(errors.values()) < n:
            batch = 0
            while opened < n and batch < 250 and open_failed is None:
                try:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError as e:
                    open_failed = f"socket() failed after {opened}: {e.strerror}"
                    break
                s.setblocking(False)
                rc = s.connect_ex((HOST, port))
                opened += 1
                batch += 1
                if rc not in (0, errno.EINPROGRESS):
                    errors[errno.errorcode.get(rc, str(rc))] += 1
                    s.close()
                    continue
                socks.append(s)
                sel.register(s, selectors.EVENT_READ, bytearray())
            if open_failed is not None and opened < n:
                errors["not opened"] = n - opened
                opened = n
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            timeout = 0.0 if (opened < n and batch) else min(0.2, remaining)
            for key, _ in sel.select(timeout):
                s, buf = key.fileobj, key.data
                try:
                    data = s.recv(1024)
                except OSError as e:
                    errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
                    sel.unregister(s)
                    continue
                if not data:
                    closed += 1
                    sel.unregister(s)
                    continue
                buf += data
                if b"\n" in buf or len(buf) > 512:
                    sel.unregister(s)
                    line = bytes(buf).split(b"\n")[0].decode(errors="replace").strip()
                    if line.startswith("220"):
                        greeted += 1
                    else:
                        other += 1
                        other_lines[line[:80]] += 1
        if greeted == n:
            t_all = time.monotonic() - t0
        pending = n - greeted - other - closed - sum(errors.values())
        hold_end = time.monotonic() + hold
        probe = latency_run(port, rcpt, 1, 1, 5.0, msg_timeout=5.0)
        while time.monotonic() < hold_end:
            time.sleep(0.1)
        peak, procs = sampler.peak()
        held_now = sampler.last
    finally:
        sel.close()
        for s in socks:
            s.close()
    return {
        "n": n,
        "greeted": greeted,
        "other_reply": other,
        "other_lines": dict(other_lines),
        "closed_before_banner": closed,
        "no_reply": max(0, pending),
        "errors": dict(errors),
        "seconds_all_greeted": t_all,
        "window": window,
        "peak_mem": peak,
        "mem_at_end": held_now,
        "peak_procs": procs,
        "probe_ms": _ms(probe["lat"][0]) if probe["lat"] else None,
        "probe_errors": probe["errors"],
        "open_failed": open_failed,
    }


# ---------------------------------------------------------------------------------------------
# servers


class ServerError(Exception):
    pass


class Server:
    name = "?"
    rcpt = "user@localhost"
    port = 0
    # the TLS phase's servers: the submission port and who logs in there ("" for none, and
    # sub_error says why)
    sub_port = 0
    sub_user = ""
    sub_sender = ""
    sub_error = ""

    def root_pid(self) -> int:
        raise NotImplementedError

    def mailbox_count(self) -> int | None:
        return None

    def settle(self, limit: float) -> None:
        """Wait until the server has nothing left to do for earlier messages (bounded)."""

    def wait_mailbox(self, target: int, limit: float) -> float | None:
        return None

    def prepare_idle(self, n: int) -> str:
        return ""

    def problems(self) -> list[str]:
        return []

    def describe(self) -> str:
        return ""

    def running(self) -> bool:
        return alive(self.root_pid())

    def remember_pids(self) -> None:
        pass

    def exit_evidence(self) -> str:
        return ""


class TLSSetup:
    """What the TLS phase's two servers share: ONE ECDSA P-256 certificate (tests/certs.py, by
    the openssl command, signed by a throw-away CA that no client checks) and the password of
    the submission user."""

    kind = "ECDSA P-256"

    def __init__(self, base: Path, postfix_tickets: bool = False):
        import certs  # tests/certs.py

        pair = certs.make_ca(base / "tls").issue(HELO, kind="ecdsa")
        self.cert, self.key = pair.cert, pair.key
        self.password = secrets.token_urlsafe(18)
        self.postfix_tickets = postfix_tickets


class Mailerd(Server):
    name = "mailerd"

    def __init__(
        self,
        base: Path,
        workers: int,
        max_sessions: int,
        tls: TLSSetup | None = None,
        *,
        dirname: str = "",
        network: bool = False,
        dns_server: str = "",
        extra: tuple[str, ...] = (),
        label: str = "",
    ):
        """With `tls`: the TLS phase's mailerd (its own directory), whose listener offers
        STARTTLS, beside a submission listener and a passwd file for user@localhost.
        The authentication phase's: its own `dirname`, the load on the untrusted listener
        (`network`: -l none -n ADDR) rather than the trusted one, its own DNS server, `extra`
        options, and a `label` for the report."""
        self.tls = tls
        self.base = base / (dirname or ("mailerd-tls" if tls else "mailerd"))
        self.network = network
        self.dns_server = dns_server
        self.extra = list(extra)
        self.label = label or self.name
        self.passwd = self.base / "passwd"
        if tls:
            self.sub_user, self.sub_sender = "user", "user@localhost"
        self.spool = self.base / "spool"
        self.queue = self.base / "queue"
        self.logfile = self.base / "mailerd.log"
        self.workers = workers
        self.max_sessions = max_sessions
        self.proc: subprocess.Popen | None = None
        self.known_pids: set[int] = set()
        self.note = ""

    def _cmd(self, with_max: bool) -> list[str]:
        cmd = [
            str(ROOT / ".venv/bin/python"),
            "-m",
            "mailerd",
            "-f",
            "-s",
            str(self.spool),
            "-q",
            str(self.queue),
            "-d",
            "localhost",
            "-H",
            HELO,
            "-w",
            str(self.workers),
            "-l",
            "none" if self.network else f"{HOST}:{self.port}",
            "-n",
            f"{HOST}:{self.port}" if self.network else "none",
            "--timeout",
            "5m",
            "--dns-server",
            self.dns_server or bench_dns(),
        ]
        cmd += self.extra
        if self.tls:
            cmd += [
                "--tls-cert",
                str(self.tls.cert),
                "--tls-key",
                str(self.tls.key),
                "--listen-submission",
                f"{HOST}:{self.sub_port}",
                "--passwd",
                str(self.passwd),
            ]
        if with_max:
            cmd += ["--max-sessions", str(self.max_sessions)]
        return cmd

    def _write_passwd(self) -> None:
        """The passwd file, by mailerd's own code (`mailerd passwd` would also signal the
        machine's running mailerd, if any, to reload)."""
        code = (
            "import sys\nfrom mailerd import credentials\n"
            "credentials.write(sys.argv[1], {sys.argv[2]: credentials.hash_password("
            "sys.stdin.read())})\n"
        )
        p = subprocess.run(
            [str(ROOT / ".venv/bin/python"), "-c", code, str(self.passwd), self.sub_user],
            input=self.tls.password,
            capture_output=True,
            text=True,
            cwd=str(ROOT),
            timeout=60,
        )
        if p.returncode != 0:
            raise ServerError(f"cannot write mailerd's passwd file: {p.stderr.strip()[-300:]}")

    def start(self) -> None:
        (self.spool / "user").mkdir(parents=True, exist_ok=True)
        self.queue.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self._write_passwd()
        for with_max in (True, False):
            self.port = free_port()
            if self.tls:
                self.sub_port = free_port()
                while self.sub_port == self.port:
                    self.sub_port = free_port()
            cmd = self._cmd(with_max)
            self.cmd = " ".join(cmd)
            with open(self.logfile, "ab") as logf:
                logf.write(f"=== {self.cmd}\n".encode())
                logf.flush()
                offset = logf.tell()
                self.proc = subprocess.Popen(
                    cmd,
                    cwd=str(ROOT),
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **GUARD},
                )
            banner = wait_banner(self.port, 30, self.proc)
            if banner and self.tls and not wait_banner(self.sub_port, 10, self.proc):
                self.stop()
                raise ServerError(
                    f"mailerd's submission listener gave no 220 banner; log:\n{self.log_tail(15)}"
                )
            if banner:
                self.banner = banner
                self.remember_pids()
                if not with_max:
                    self.note = "mailerd did not accept --max-sessions; started without it"
                return
            rc = self.proc.poll()
            tail = self.log_tail(15)
            if rc is None:
                self.stop()
                raise ServerError(f"mailerd gave no 220 banner within 30 s; log:\n{tail}")
            try:
                with open(self.logfile, "rb") as f:
                    f.seek(offset)
                    own = f.read(65536).decode(errors="replace")
            except OSError:
                own = ""
            if with_max and "max-sessions" in own:
                log("mailerd rejected --max-sessions; retrying without it")
                continue
            raise ServerError(f"mailerd exited with status {rc} before greeting; log:\n{tail}")
        raise ServerError("mailerd did not start")

    def describe(self) -> str:
        return f"ran: {self.cmd}".replace(str(self.base), "VAR")

    def exit_evidence(self) -> str:
        rc = self.proc.poll() if self.proc else None
        how = (
            f"killed by {signal.Signals(-rc).name}"
            if rc is not None and rc < 0
            else f"exit status {rc}"
        )
        tail = "\n    ".join(self.log_tail(12).splitlines())
        return f" (master {how}); last log lines:\n    {tail}"

    def remember_pids(self):
        if self.proc and self.proc.poll() is None:
            self.known_pids.update(tree_pids(self.proc.pid, proc_table()))

    def root_pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def mailbox_count(self) -> int | None:
        return count_mailbox(self.spool / "user")

    def problems(self) -> list[str]:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return []
        pat = re.compile(r"error|exception|traceback|critical|fatal|warning", re.I)
        bad = [line for line in lines if pat.search(line)]
        if not bad:
            return []
        kinds = collections.Counter(re.sub(r"\d+", "N", line)[:160] for line in bad)
        out = [f"mailerd log: {len(bad)} error/warning lines; most common (digits as N):"]
        out += [f"  {c} x {k}" for k, c in kinds.most_common(8)]
        first = next((i for i, line in enumerate(lines) if "Traceback" in line), None)
        if first is not None:
            out.append("first traceback:")
            out += ["  " + line[:200] for line in lines[max(0, first - 1) : first + 25]]
        return out

    def stop(self) -> None:
        if not self.proc:
            return
        self.remember_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                log(f"mailerd master {self.proc.pid} ignored SIGTERM for 15 s; SIGKILL")
                self.proc.kill()
                self.proc.wait(5)
        # Workers that outlived their master: they are ours (started by this run), end them by id.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in self.known_pids):
            time.sleep(0.1)
        for pid in self.known_pids:
            if alive(pid) and pid != os.getpid():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read()
                except OSError:
                    continue
                if b"mailerd" in cmdline:
                    log(f"mailerd process {pid} outlived its master; SIGKILL")
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        self.proc = None


def count_mailbox(path: Path) -> int | None:
    """Messages in a mailerd mailbox: `<user>/<N>` files (`<N>.status`, dot-files aside)."""
    try:
        return sum(1 for e in os.scandir(path) if e.name.isdigit() and e.is_file())
    except OSError:
        return None


class Postfix(Server):
    name = "postfix"

    def __init__(
        self,
        base: Path,
        process_limit: int,
        idle_limit: int,
        tls: TLSSetup | None = None,
        *,
        dirname: str = "",
        label: str = "",
    ):
        """With `tls`: the TLS phase's instance (its own directory): STARTTLS offered on its
        smtpd, and a submission service (STARTTLS, then Cyrus SASL against a sasldb). The
        authentication phase's: plain, as the first, in a directory (`dirname`) of its own."""
        self.tls = tls
        self.base = base / (dirname or ("postfix-tls" if tls else "postfix"))
        self.label = label or self.name
        self.etc = self.base / "etc"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.home = self.base / "home"
        self.maildir = self.home / "Maildir"
        self.logfile = self.base / "maillog"
        self.process_limit = process_limit
        self.idle_limit = idle_limit
        self.rcpt = f"{PF_USER}@localhost"
        self.sasl_dir = self.etc / "sasl"
        self.sasldb = self.base / "sasldb2"
        self.created_user = False
        self.started = False
        self.master = None
        self.known_pids: set[int] = set()
        self.note = ""

    def _postfix(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        p = subprocess.run(
            ["postfix", "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and p.returncode != 0:
            raise ServerError(
                f"postfix {' '.join(args)} failed ({p.returncode}): "
                f"{(p.stderr or p.stdout).strip()}"
            )
        return p

    def _master_cf(self, smtpd_maxproc: str) -> str:
        rows = [
            (str(self.port), "inet", "n", "-", "n", "-", smtpd_maxproc, "smtpd"),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("local", "unix", "-", "n", "n", "-", "-", "local"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        if self.tls:
            rows.append(("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"))
        if self.sub_port:
            rows.append((str(self.sub_port), "inet", "n", "-", "n", "-", smtpd_maxproc, "smtpd"))
        text = "".join("{:<10} {:<10} {:<3} {:<3} {:<3} {:<6} {:<5} {}\n".format(*r) for r in rows)
        if self.sub_port:  # as Debian's master.cf has it, commented out
            text += (
                "  -o syslog_name=postfix-bench/submission\n"
                "  -o smtpd_tls_security_level=encrypt\n"
                "  -o smtpd_sasl_auth_enable=yes\n"
                "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
                "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n"
            )
        return text

    def _setup_sasl(self) -> None:
        """Cyrus SASL for the submission service: PLAIN and LOGIN against a sasldb holding
        PF_USER's password (realm = myhostname), readable by smtpd (user postfix, no chroot).
        Raises ServerError saying what is missing."""
        if not shutil.which("saslpasswd2"):
            raise ServerError("saslpasswd2 not found (package sasl2-bin; scripts/setup --bench)")
        kinds = subprocess.run(
            ["postconf", "-a"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        ).stdout.split()
        if "cyrus" not in kinds:
            raise ServerError(f"this Postfix has no Cyrus SASL (postconf -a: {' '.join(kinds)})")
        plugins = [Path(d) / "sasl2" for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib")]
        plugins += list(Path("/usr/lib").glob("*-linux-gnu*/sasl2"))
        for mech in ("libplain.so", "libsasldb.so"):
            if not any((d / mech).exists() for d in plugins):
                raise ServerError(
                    f"Cyrus SASL plugin {mech} not found (packages libsasl2-modules, "
                    "libsasl2-modules-db; scripts/setup --bench)"
                )
        self.sasl_dir.mkdir(parents=True, exist_ok=True)
        (self.sasl_dir / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {self.sasldb}\n"
            "mech_list: PLAIN LOGIN\n"
        )
        p = subprocess.run(
            ["saslpasswd2", "-p", "-c", "-f", str(self.sasldb), "-u", HELO, PF_USER],
            input=self.tls.password,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if p.returncode != 0 or not self.sasldb.exists():
            raise ServerError(f"saslpasswd2 failed ({p.returncode}): {p.stderr.strip()}")
        pf = pwd.getpwnam("postfix")
        os.chown(self.sasldb, pf.pw_uid, pf.pw_gid)
        os.chmod(self.sasldb, 0o600)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise ServerError("the Postfix reference needs root (temporary user, private instance)")
        for tool in ("postfix", "postconf", "smtp-source"):
            if not shutil.which(tool):
                raise ServerError(f"{tool} not found (scripts/setup --bench installs Postfix)")
        try:
            pw = pwd.getpwnam(PF_USER)
        except KeyError:
            pw = None
        if pw is not None:
            if pw.pw_gecos != PF_USER_GECOS:
                raise ServerError(f"a user named {PF_USER} exists and is not ours; not touching it")
            if os.path.isdir(pw.pw_dir):
                raise ServerError(
                    f"user {PF_USER} exists with home {pw.pw_dir}: another "
                    "scripts/bench seems to be running; try again later"
                )
            log(f"removing user {PF_USER} left over by an earlier interrupted run")
            subprocess.run(["userdel", PF_USER], check=False, capture_output=True)
        for d in (self.etc, self.queue, self.data, self.home):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.base.parent, self.base, self.etc, self.queue, self.home):
            os.chmod(d, 0o755)
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                str(self.home),
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                PF_USER_GECOS,
                PF_USER,
            ],
            check=True,
            capture_output=True,
        )
        self.created_user = True
        pw = pwd.getpwnam(PF_USER)
        for sub in ("", "new", "cur", "tmp"):
            d = self.maildir / sub
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
            os.chmod(d, 0o700)
        os.chown(self.home, pw.pw_uid, pw.pw_gid)
        pf = pwd.getpwnam("postfix")
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        os.chmod(self.data, 0o700)

        self.port = free_port()
        main_cf = f"""# private benchmark instance written by scripts/bench; never on port 25
compatibility_level = 3.6
config_directory = {self.etc}
queue_directory = {self.queue}
data_directory = {self.data}
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = {self.logfile}
maillog_file_prefixes = {self.base}
inet_interfaces = {HOST}
inet_protocols = ipv4
myhostname = {HELO}
mydomain = localhost
myorigin = $myhostname
mydestination = localhost
mynetworks = 127.0.0.0/8
relayhost =
smtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
alias_maps =
alias_database =
local_recipient_maps = proxy:unix:passwd.byname
home_mailbox = Maildir/
biff = no
append_dot_mydomain = no
default_process_limit = {self.process_limit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_event_limit_exceptions = 127.0.0.0/8
"""
        if self.tls:
            main_cf += f"""# the TLS phase: STARTTLS offered here, required on the submission port
smtpd_tls_cert_file = {self.tls.cert}
smtpd_tls_key_file = {self.tls.key}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 0
"""
            if not self.tls.postfix_tickets:
                # No TLS 1.3 session tickets, as mailerd sends none (and the load generator
                # resumes no session). With them, smtpd writes the ticket and its EHLO reply
                # in two segments without TCP_NODELAY: Nagle holds the reply until the
                # client's delayed ACK of the ticket, ~40 ms per message (strace'd).
                # smtpd_tls_session_cache_timeout = 0 still sends one, and so do NO_TICKET
                # alone and OpenSSL's NumTickets = 0 alone (tls_config_file, Postfix >= 3.7.6);
                # the two together send none (tried on Debian 12's Postfix 3.7, OpenSSL 3.0).
                cnf = self.etc / "openssl-bench.cnf"
                cnf.write_text(
                    "# scripts/bench: the OpenSSL settings of the private Postfix instance\n"
                    "postfix_bench = postfix_bench_settings\n"
                    "[postfix_bench_settings]\nssl_conf = postfix_bench_ssl\n"
                    "[postfix_bench_ssl]\nsystem_default = postfix_bench_baseline\n"
                    "[postfix_bench_baseline]\nNumTickets = 0\n"
                )
                main_cf += (
                    f"tls_config_file = {cnf}\ntls_config_name = postfix_bench\n"
                    "tls_ssl_options = NO_TICKET\n"
                )
            try:
                self._setup_sasl()
            except (ServerError, OSError, subprocess.SubprocessError) as e:
                self.sub_error = f"no submission run for Postfix: {e}"
                log(self.sub_error)
            else:
                self.sub_port = free_port()
                while self.sub_port == self.port:
                    self.sub_port = free_port()
                self.sub_user, self.sub_sender = PF_USER, f"{PF_USER}@localhost"
                main_cf += f"""# the submission service's SASL (turned on there only, see master.cf)
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {self.sasl_dir}
smtpd_sasl_local_domain = {HELO}
smtpd_sasl_security_options = noanonymous
smtpd_tls_auth_only = yes
"""
        (self.etc / "main.cf").write_text(main_cf)
        (self.etc / "master.cf").write_text(self._master_cf("-"))
        self._postfix("check")
        self._postfix("start")
        self.started = True
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.master = int(pidfile.read_text().split()[0])
                break
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        if not self.master:
            raise ServerError("postfix started but wrote no master.pid")
        banner = wait_banner(self.port, 15)
        if not banner:
            raise ServerError(f"postfix gave no 220 banner within 15 s; log:\n{self.log_tail(15)}")
        if self.sub_port and not wait_banner(self.sub_port, 15):
            raise ServerError(
                f"postfix's submission service gave no 220 banner; log:\n{self.log_tail(15)}"
            )
        self.banner = banner
        self.known_pids.update(tree_pids(self.master, proc_table()))

    def root_pid(self) -> int:
        return self.master

    def remember_pids(self) -> None:
        if self.master:
            self.known_pids.update(tree_pids(self.master, proc_table()))

    def exit_evidence(self) -> str:
        tail = "\n    ".join(self.log_tail(12).splitlines())
        return f"; last log lines:\n    {tail}"

    def describe(self) -> str:
        text = (
            f"private instance ({self.etc}/main.cf), smtpd on {HOST}:{self.port}, "
            f"default_process_limit = {self.process_limit}, queue + Maildir on the same fs, "
            f"local delivery to {PF_USER} (temporary user), logging to a file via postlogd"
        )
        if self.tls:
            text += "; STARTTLS: smtpd_tls_security_level = may, tlsmgr in master.cf, " + (
                "TLS 1.3 session tickets issued (Postfix's default; --postfix-tickets)"
                if self.tls.postfix_tickets
                else "no TLS 1.3 session tickets (tls_ssl_options = NO_TICKET and OpenSSL's "
                "NumTickets = 0 via tls_config_file: with them smtpd's EHLO reply waits ~40 ms "
                "for the client's delayed ACK of the ticket, Nagle; --postfix-tickets keeps them)"
            )
        if self.sub_port:
            text += (
                f"; submission on {HOST}:{self.sub_port}: smtpd_tls_security_level = encrypt, "
                "smtpd_tls_auth_only, Cyrus SASL (auxprop sasldb, PLAIN LOGIN), "
                "permit_sasl_authenticated then reject"
            )
        return text

    def log_tail(self, n: int) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def mailbox_count(self) -> int:
        n = 0
        for sub in ("new", "cur"):
            with contextlib.suppress(OSError):
                n += sum(1 for _ in os.scandir(self.maildir / sub))
        return n

    def queue_count(self) -> int:
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.queue / sub):
                n += len(files)
        return n

    def settle(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and self.queue_count() > 0:
            time.sleep(0.1)

    def wait_mailbox(self, target: int, limit: float) -> float | None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.mailbox_count() >= target:
                return time.monotonic()
            time.sleep(0.02)
        return None

    def prepare_idle(self, n: int) -> str:
        maxproc = min(n, self.idle_limit)
        (self.etc / "master.cf").write_text(self._master_cf(str(maxproc)))
        self._postfix("reload")
        time.sleep(1.5)
        return (
            f"Postfix runs one smtpd process per connection; its smtpd process limit was "
            f"raised to {maxproc} for this test (--postfix-idle-limit)"
        )

    def problems(self) -> list[str]:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return []
        pat = re.compile(r"(warning|error|fatal|panic):", re.I)
        bad = [line.split("]: ", 1)[-1] for line in lines if pat.search(line)]
        if not bad:
            return []
        kinds = collections.Counter(re.sub(r"\d+", "N", line)[:160] for line in bad)
        out = [f"postfix log: {len(bad)} warning/error lines; most common:"]
        out += [f"  {c} x {k}" for k, c in kinds.most_common(6)]
        return out

    def stop(self) -> None:
        if self.started:
            if self.master:
                self.known_pids.update(tree_pids(self.master, proc_table()))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._postfix("stop", check=False, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(alive(p) for p in self.known_pids):
                time.sleep(0.1)
            for pid in self.known_pids:
                if alive(pid):
                    log(f"postfix process {pid} still running after stop; SIGKILL")
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            self.started = False

    def cleanup(self) -> None:
        self.stop()
        if self.created_user:
            r = subprocess.run(["userdel", PF_USER], capture_output=True, text=True)
            if r.returncode != 0:
                log(f"userdel {PF_USER} failed: {r.stderr.strip()}")
            self.created_user = False


# ---------------------------------------------------------------------------------------------
# the benchmark proper


class Bench:
    """One server's part of the benchmark: its results so far, its memory sampler, the messages
    it has accepted (for the mailbox check), and whether it is still being measured."""

    def __init__(self, srv: Server):
        self.srv = srv
        self.res = {"server": srv.name, "levels": [], "idle": None, "notes": []}
        self.sampler: Sampler | None = None
        self.mailbox_start: int | None = None
        self.accepted = 0
        self.active = False  # started, not failed, not stopped yet
        self.runs: list[dict] = []  # the current level's smtp-source runs
        self.going = False  # still running during the current level

    def start(self) -> None:
        srv = self.srv
        log(f"starting {srv.name}")
        srv.start()
        if getattr(srv, "note", ""):
            self.res["notes"].append(srv.note)
        self.res["banner"] = srv.banner
        self.res["port"] = srv.port
        self.res["notes"].insert(0, srv.describe())
        self.sampler = Sampler(srv.root_pid())
        self.sampler.start()
        self.mailbox_start = srv.mailbox_count()
        self.active = True

    def finish(self) -> None:
        """Stop the sampler and the server (the first time only), keeping its log's problems."""
        self.active = self.going = False
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None
            self.res["problems"] = self.srv.problems()
        self.srv.stop()


def shut(srv: Server) -> None:
    srv.cleanup() if isinstance(srv, Postfix) else srv.stop()


def settle(benches: list[Bench]) -> None:
    """Let every server still running finish earlier messages (Postfix: its queue), so that no
    server's leftover work overlaps the next run, whichever server that run is for."""
    for b in benches:
        if b.going and b.srv.running():
            b.srv.settle(60)


def bench_servers(servers: list[Server], args) -> tuple[list[dict], list[dict], list[str]]:
    """Start the servers, run each level with the servers' smtp-source runs interleaved, then
    per server its mailbox check and idle test. Returns (results, paired ratios, failed)."""
    benches: list[Bench] = []
    failed: list[str] = []
    paired: list[dict] = []
    try:
        for srv in servers:
            b = Bench(srv)
            try:
                b.start()
            except ServerError as e:
                log(f"{srv.name} failed: {e}")
                failed.append(srv.name)
                shut(srv)
                continue
            benches.append(b)
        for c in args.levels:
            live = [b for b in benches if b.active]
            if not live:
                break
            pair = bench_level(live, c, args)
            if pair is not None:
                paired.append(pair)
            for b in live:
                if b.res.get("died"):
                    failed.append(b.srv.name)
                    b.finish()
        live = [b for b in benches if b.active]
        for b in live:
            b.going = True
        settle(live)
        time.sleep(0.5)
        for b in live:
            if b.mailbox_start is not None:
                if isinstance(b.srv, Postfix):
                    b.srv.wait_mailbox(b.mailbox_start + b.accepted, 60)
                got = b.srv.mailbox_count()
                b.res["mailbox_check"] = {
                    "accepted_250": b.accepted,
                    "in_mailbox": got - b.mailbox_start if got is not None else None,
                }
        for b in live:
            try:
                if args.idle > 0:
                    idle_phase(b, args)
            except ServerError as e:
                b.res["died"] = f"{b.srv.name} failed before/during the idle test: {e}"
                log(b.res["died"])
                failed.append(b.srv.name)
            finally:
                b.finish()  # the next server's idle test runs alone
    finally:
        for b in benches:
            b.finish()
    return [b.res for b in benches], paired, failed


def bench_level(live: list[Bench], c: int, args) -> dict | None:
    """One concurrency level for every server in `live` (mailerd first in the list): `repeat`
    rounds of one smtp-source run per server, back to back (mailerd first in even rounds,
    Postfix first in odd ones), then each server's latency phase. Fills each server's level
    results; returns the paired ratios when both servers ran."""
    for b in live:
        b.sampler.reset()
        b.runs = []
        b.going = True
    names = [b.srv.name for b in live]
    both = names == ["mailerd", "postfix"]
    pair = {"clients": c, "ratios": [], "first": []} if both else None
    for i in range(args.repeat):
        got = {}
        for b in live if i % 2 == 0 else live[::-1]:
            if not b.going:
                continue
            srv = b.srv
            settle(live)
            time.sleep(0.5)
            log(
                f"{srv.name}: {c} clients: smtp-source {args.messages} messages"
                + (f" (run {i + 1}/{args.repeat})" if args.repeat > 1 else "")
            )
            run = throughput_run(srv, c, args)
            b.accepted += run["msgs"]
            b.runs.append(run)
            got[srv.name] = run
            if run["smtp_source_error"]:
                log(
                    f"{srv.name}: smtp-source: {run['smtp_source_error']} "
                    f"({run['msgs']}/{args.messages} done)"
                )
            if not srv.running():
                b.going = False
        if pair is not None:
            m, p = got.get("mailerd"), got.get("postfix")
            ratio = (
                m["msgs_per_s"] / p["msgs_per_s"]
                if m is not None and p is not None and p["msgs_per_s"]
                else None
            )
            pair["ratios"].append(ratio)
            pair["first"].append(next(iter(got), None))
            if ratio is not None:
                log(f"{c} clients: run {i + 1}: mailerd/postfix msgs/s {ratio:.2f}")
    if pair is not None:
        ok = [r for r in pair["ratios"] if r is not None]
        pair["median"] = statistics.median(ok) if ok else None
    for b in live:
        srv, runs = b.srv, b.runs
        median = sorted(runs, key=lambda r: r["msgs_per_s"])[(len(runs) - 1) // 2]
        level = {
            "clients": c,
            "requested": args.messages,
            **median,
            "runs_msgs_per_s": [r["msgs_per_s"] for r in runs],
            "runs": list(runs),
        }
        if srv.running():
            settle(live)
            log(f"{srv.name}: {c} clients: latency, up to {args.lat_messages} messages")
            lr = latency_run(srv.port, srv.rcpt, c, args.lat_messages, args.lat_time)
        else:
            lr = {"n": 0, "seconds": 0.0, "lat": [], "dot": [], "errors": {}}
        b.accepted += lr["n"]
        peak, procs = b.sampler.peak()
        level.update(
            {
                "peak_mem": peak,
                "peak_procs": procs,
                "lat_n": lr["n"],
                "lat_seconds": lr["seconds"],
                "lat_median_ms": _ms(statistics.median(lr["lat"]) if lr["lat"] else None),
                "lat_p99_ms": _ms(pct(lr["lat"], 99)),
                "dot_median_ms": _ms(statistics.median(lr["dot"]) if lr["dot"] else None),
                "dot_p99_ms": _ms(pct(lr["dot"], 99)),
                "lat_errors": lr["errors"],
            }
        )
        b.res["levels"].append(level)
        if lr["errors"]:
            log(f"{srv.name}: latency client errors: {lr['errors']}")
        check_alive(b, f"the {c}-client level")
    return pair


def idle_phase(b: Bench, args) -> None:
    srv, res = b.srv, b.res
    note = srv.prepare_idle(args.idle)
    if note:
        res["notes"].append(note)
    log(f"{srv.name}: idle test, {args.idle} connections")
    res["idle"] = idle_test(srv.port, args.idle, 10.0, args.idle_hold, b.sampler, srv.rcpt)
    srv.remember_pids()
    time.sleep(1)
    if isinstance(srv, Mailerd) and srv.proc.poll() is not None:
        res["notes"].append(
            f"mailerd master exited (status {srv.proc.returncode}) during/after the idle test"
        )
    elif not wait_banner(srv.port, 15):
        res["notes"].append("no 220 banner within 15 s after the idle connections closed")


def throughput_run(srv: Server, c: int, args, send=None) -> dict:
    """One measured run: smtp-source, or send() (the TLS phase: run_generator), which returns
    what run_smtp_source does (and "gen", kept)."""
    before_box = srv.mailbox_count()
    cpu0 = cpu_snapshot(srv.root_pid())
    disk0 = disk_snapshot()
    if send is None:
        ss = run_smtp_source(srv.port, srv.rcpt, c, args.messages, args.ss_timeout)
    else:
        ss = send()
    box_secs = None
    if isinstance(srv, Postfix) and before_box is not None:
        t_box = srv.wait_mailbox(before_box + ss["done"], 120)
        if t_box is not None:
            box_secs = t_box - ss["t_start"]
    elif isinstance(srv, SigningMailerd):  # (its messages leave: until its queue is empty)
        t_box = srv.wait_drained(120)
        if t_box is not None:
            box_secs = t_box - ss["t_start"]
    time.sleep(0.3)
    cpu1 = cpu_snapshot(srv.root_pid())
    disk1 = disk_snapshot()
    done = ss["done"]
    disk = None
    if disk0 is not None and disk1 is not None and done:
        disk = [(b - a) / done for a, b in zip(disk0, disk1, strict=True)]
    k0, k1 = cpu0.pop("kthreads"), cpu1.pop("kthreads")
    p0, p1 = cpu0.pop("procs"), cpu1.pop("procs")
    by_name = collections.Counter()
    for pid, (name, ticks) in p1.items():  # a reaped process counts in its parent's
        by_name[name] += max(0, ticks - p0.get(pid, (name, 0))[1])
    d = {k: cpu1[k] - cpu0[k] for k in cpu0}
    # per thread: kernel threads come and go (kworkers)
    d["kthreads"] = sum(max(0, t - k0.get(p, 0)) for p, t in k1.items()) / CLK_TCK
    out = {
        "msgs": done,
        "seconds": ss["seconds"],
        "msgs_per_s": done / ss["seconds"] if done else 0.0,
        "smtp_source_error": ss["error"],
        "smtp_source_cmd": ss["cmd"],
        "mailbox_seconds": box_secs,
        "cpu_user_seconds": d["user"],
        "cpu_sys_seconds": d["sys"],
        "cpu_ms_per_msg": (d["user"] + d["sys"]) * 1000 / done if done else None,
        "kthreads_seconds": d["kthreads"],
        "cpu_by_process_ms_per_msg": {
            k: v * 1000 / CLK_TCK / done for k, v in by_name.most_common()
        }
        if done
        else {},
        "other_cores": max(0.0, d["busy"] - d["user"] - d["sys"] - d["own"] - d["kthreads"])
        / d["t"],
        "max_gap": ss["max_gap"],
        "max_gap_at": ss["max_gap_at"],
        # the whole disk's counters (other writers included, as with "others")
        "disk_writes_per_msg": disk[0] if disk else None,
        "disk_kib_per_msg": disk[1] / 2 if disk else None,
        "disk_flushes_per_msg": disk[2] if disk else None,
    }
    if "gen" in ss:
        out["gen"] = ss["gen"]
    return out


# ---------------------------------------------------------------------------------------------
# the TLS phase: STARTTLS and authenticated submission, each server's runs interleaved

TLS_MODES = ("starttls", "submission")
MODE_TITLE = {"starttls": "STARTTLS", "submission": "submission"}


def tls_send(srv: Server, mode: str, c: int, count: int, args):
    """The send() of a TLS run of `mode` against `srv`, for throughput_run."""
    procs = args.tls_generators or min(2, c)
    if mode == "submission":
        port, sender = srv.sub_port, srv.sub_sender
        auth = auth_plain(srv.sub_user, args.tls_setup.password)
    else:
        port, sender, auth = srv.port, SENDER, None
    timeout = max(60.0, count / 5)
    return lambda: run_generator(port, srv.rcpt, sender, auth, c, count, procs, timeout)


def openssl_summary(port: int) -> str | None:
    """What `openssl s_client -starttls smtp -brief` says of one handshake with the server:
    protocol, cipher, key exchange, signature (no SNI: the load generator sends none)."""
    try:
        p = subprocess.run(
            ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{HOST}:{port}", "-brief"]
            + ["-noservername", "-name", HELO],
            input="QUIT\r\n",
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    want = ("Protocol version", "Ciphersuite", "Peer signature type", "Server Temp Key")
    parts = []
    for line in (p.stderr + p.stdout).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in want:
            parts.append(value.strip())
    return ", ".join(parts) or None


def bench_tls(servers: list[Server], args) -> tuple[list[dict], list[dict], list[str]]:
    """Start the TLS phase's servers, then per mode (STARTTLS, submission) and level their
    load-generator runs, interleaved as bench_level does; then the mailbox check.
    Returns (results, paired ratios, failed)."""
    benches: list[Bench] = []
    failed: list[str] = []
    paired: list[dict] = []
    try:
        for srv in servers:
            b = Bench(srv)
            try:
                b.start()
            except ServerError as e:
                log(f"{srv.name} (TLS) failed: {e}")
                failed.append(srv.name)
                shut(srv)
                continue
            b.res["openssl_s_client"] = openssl_summary(srv.port)
            benches.append(b)
        for mode in args.tls_modes:
            usable = []
            for b in benches:
                if not b.active:
                    continue
                if mode == "submission" and not b.srv.sub_port:
                    b.res["notes"].append(b.srv.sub_error or "no submission run")
                    continue
                # one message first, so that a server that cannot do it is left out of this
                # mode with the reason rather than measured failing
                probe = tls_send(b.srv, mode, 1, 1, args)()
                b.accepted += probe["done"]
                if probe["done"] != 1:
                    why = f"{MODE_TITLE[mode]}: a first message failed: {probe['error']}"
                    log(f"{b.srv.name}: {why}")
                    b.res["notes"].append(why + "; not measured")
                    continue
                usable.append(b)
            for c in args.tls_levels:
                live = [b for b in usable if b.active]
                if not live:
                    break
                pair = tls_level(live, mode, c, args)
                if pair is not None:
                    paired.append(pair)
                for b in live:
                    if b.res.get("died"):
                        failed.append(b.srv.name)
                        b.finish()
        live = [b for b in benches if b.active]
        for b in live:
            b.going = True
        settle(live)
        time.sleep(0.5)
        for b in live:
            if b.mailbox_start is not None:
                if isinstance(b.srv, Postfix):
                    b.srv.wait_mailbox(b.mailbox_start + b.accepted, 60)
                got = b.srv.mailbox_count()
                b.res["mailbox_check"] = {
                    "accepted_250": b.accepted,
                    "in_mailbox": got - b.mailbox_start if got is not None else None,
                }
    finally:
        for b in benches:
            b.finish()
    return [b.res for b in benches], paired, failed


def tls_level(live: list[Bench], mode: str, c: int, args) -> dict | None:
    """One mode and concurrency level of the TLS phase for every server in `live`: `repeat`
    rounds of one load-generator run per server, the order alternating as in bench_level.
    Fills each server's results; returns the paired ratios when both servers ran."""
    for b in live:
        b.sampler.reset()
        b.runs = []
        b.going = True
    count = args.tls_messages
    both = [b.srv.name for b in live] == ["mailerd", "postfix"]
    pair = {"mode": mode, "clients": c, "ratios": [], "first": []} if both else None
    for i in range(args.repeat):
        got = {}
        for b in live if i % 2 == 0 else live[::-1]:
            if not b.going:
                continue
            srv = b.srv
            settle(live)
            time.sleep(0.5)
            log(
                f"{srv.name}: {MODE_TITLE[mode]}, {c} clients: {count} messages"
                + (f" (run {i + 1}/{args.repeat})" if args.repeat > 1 else "")
            )
            run = throughput_run(srv, c, args, send=tls_send(srv, mode, c, count, args))
            run["error"] = run.pop("smtp_source_error")
            run["generator"] = run.pop("smtp_source_cmd")
            b.accepted += run["msgs"]
            b.runs.append(run)
            got[srv.name] = run
            if run["error"]:
                log(f"{srv.name}: load generator: {run['error']} ({run['msgs']}/{count} done)")
            if not srv.running():
                b.going = False
        if pair is not None:
            m, p = got.get("mailerd"), got.get("postfix")
            ratio = (
                m["msgs_per_s"] / p["msgs_per_s"]
                if m is not None and p is not None and p["msgs_per_s"]
                else None
            )
            pair["ratios"].append(ratio)
            pair["first"].append(next(iter(got), None))
            if ratio is not None:
                log(f"{MODE_TITLE[mode]}, {c} clients: run {i + 1}: mailerd/postfix {ratio:.2f}")
    if pair is not None:
        ok = [r for r in pair["ratios"] if r is not None]
        pair["median"] = statistics.median(ok) if ok else None
    for b in live:
        if b.runs:
            record_median_level(b, {"mode": mode}, c, count)
            check_alive(b, f"the {MODE_TITLE[mode]} {c}-client level")
    return pair


# ---------------------------------------------------------------------------------------------
# the authentication phase (issue #15): (a) inbound SPF/DKIM/DMARC verification, (b) outbound
# DKIM signing; each part's servers started afresh, their runs interleaved

AUTH_MODES = ("inbound", "signing")
BENCH_DNSBL = "dnsbl.bench.test"  # a --dnsbl zone that lists no one (inbound's third mailerd)
AUTH_DOMAIN = "sender.bench.test"  # the sender domain the phase's DNS server publishes
AUTH_SENDER = f"bench@{AUTH_DOMAIN}"
AUTH_RCPT = "user@localhost"  # the To: of the inbound messages (Postfix's RCPT is its own)
SINK_DOMAIN = "sink.bench.test"  # (b)'s remote recipient's domain
SINK_HOST = f"mx.{SINK_DOMAIN}"  # mailerd's --relayhost name: A 127.0.0.1 in the phase's DNS
SINK_RCPT = f"bench@{SINK_DOMAIN}"
SIGN_KINDS = ("rsa", "ed25519")
KIND_TITLE = {"rsa": "RSA-2048", "ed25519": "Ed25519", "none": "unsigned"}
AUTH_POOL = 2000  # pre-made messages at most (more runs cycle through them)
_AR_RESULT = re.compile(r"\b(spf|dkim|dmarc)=([a-z]+)", re.I)


class AuthSetup:
    """What the authentication phase's servers share: DKIM keys for AUTH_DOMAIN (RSA-2048 and
    Ed25519, by `mailerd dkim keygen`), a DNS server of its own (tests/dnsserver.py, in this
    process) publishing their TXT records as keygen prints them, SPF passing 127.0.0.1 and DMARC
    p=reject for AUTH_DOMAIN, and SINK_HOST's address; and the messages the load generator
    sends, made here once: for (a) each DKIM-signed with the RSA key (mailerd.signing), for (b)
    unsigned, to SINK_RCPT."""

    def __init__(self, base: Path, count: int):
        self.dir = base / "auth"
        keydir = self.dir / "keys"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keys: dict[str, Path] = {}
        records = []
        for kind in SIGN_KINDS:
            p = subprocess.run(
                [str(ROOT / ".venv/bin/python"), "-m", "mailerd", "dkim", "keygen"]
                + ["--dir", str(keydir), "--selector", kind, "--type", kind, AUTH_DOMAIN],
                capture_output=True,
                text=True,
                cwd=str(ROOT),
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
            if p.returncode != 0:
                raise ServerError(f"mailerd dkim keygen --type {kind}: {p.stderr.strip()[-300:]}")
            # its output: comments (;), the TXT record in zone-file form, the config line
            records += [
                line
                for line in p.stdout.splitlines()
                if line.strip() and not line.startswith((";", "dkim-key"))
            ]
            self.keys[kind] = keydir / f"{AUTH_DOMAIN}.{kind}.key"
        records += [
            f'{AUTH_DOMAIN}. IN TXT "v=spf1 ip4:{HOST} -all"',
            f'_dmarc.{AUTH_DOMAIN}. IN TXT "v=DMARC1; p=reject"',
            f"{SINK_DOMAIN}. IN MX 10 {SINK_HOST}.",
            f"{SINK_HOST}. IN A {HOST}",
        ]
        self.zone = "\n".join(records) + "\n"
        (self.dir / "zone.txt").write_text(self.zone)
        self.dns = DNSServer(Records(self.zone), HOST)
        self.dns.start()
        self.dns_server = f"{self.dns.host}:{self.dns.port}"
        self.signed = self.dir / "inbound.b64"
        self.plain = self.dir / "signing.b64"
        self.pool = max(1, min(count, AUTH_POOL))
        self.presign_cpu = self._make_messages()

    def _make_messages(self) -> float:
        """Write both message files; returns the CPU seconds the pre-signing took."""
        from mailerd import signing  # (the venv's mailerd: dkimpy, with OpenSSL's RSA)

        key = signing.load_key(AUTH_DOMAIN, "rsa", str(self.keys["rsa"]))
        t0 = time.process_time()
        with open(self.signed, "w") as f:
            for n in range(self.pool):
                content = make_message(AUTH_RCPT, n, AUTH_SENDER)[:-3]  # (without ".\r\n")
                signed = signing.sign(content, [key]) + content + b".\r\n"
                f.write(base64.b64encode(signed).decode() + "\n")
        cpu = time.process_time() - t0
        with open(self.plain, "w") as f:
            for n in range(self.pool):
                f.write(base64.b64encode(make_message(SINK_RCPT, n, AUTH_SENDER)).decode() + "\n")
        return cpu

    def txt(self, name: str) -> bytes | None:
        """A TXT record as the phase's DNS server serves it (over UDP, dnspython), for checks."""
        import dns.resolver

        r = dns.resolver.Resolver(configure=False)
        r.nameservers, r.port, r.lifetime = [self.dns.host], self.dns.port, 5.0
        try:
            answer = r.resolve(name.rstrip("."), "TXT")
        except Exception:  # (a check: whatever fails, the record is not there)
            return None
        return b"".join(answer.rrset[0].strings) if answer.rrset else None

    def close(self) -> None:
        self.dns.stop()


class Sink:
    """A tiny SMTP sink for (b): `bench.py --smtp-sink SPEC` in a process of its own on a free
    loopback port. It takes every message, counts the DKIM-Signature algorithms it sees, keeps
    the first message of each kind in `keep`, and reports as JSON when its stdin closes."""

    def __init__(self, keep: Path):
        keep.mkdir(parents=True, exist_ok=True)
        self.cpu0 = 0.0
        self.errpath = keep / "sink.err"
        with open(self.errpath, "wb") as errf:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--smtp-sink"]
                + [json.dumps({"keep": str(keep)})],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errf,
            )
        line = _read_line(self.proc, 30)
        if not line.startswith("ready "):
            self.close()
            raise ServerError(f"the SMTP sink did not start: {line or self._err()}")
        self.port = int(line.split()[1])
        self.cpu0 = self.cpu_seconds()  # (its start-up is not per message)

    def _err(self) -> str:
        try:
            text = self.errpath.read_text(errors="replace")
        except OSError:
            text = ""
        return (text.strip().splitlines() or ["?"])[-1]

    def cpu_seconds(self) -> float:
        table = proc_table()
        row = table.get(self.proc.pid)
        return (row[1] + row[2]) / CLK_TCK if row else 0.0

    def close(self) -> dict:
        """End the sink (ours, by its pipe; killed after 30 s) and return its report."""
        cpu = self.cpu_seconds() - self.cpu0 if self.proc.poll() is None else 0.0
        out = b""
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            why = f"no report (exit {self.proc.returncode}): {self._err()}"
            return {"error": why, "cpu_seconds": cpu}
        res["cpu_seconds"] = cpu
        return res


def _read_line(p: subprocess.Popen, limit: float) -> str:
    """A child's first line of output, waited for at most `limit` seconds ("" if none)."""
    sel = selectors.DefaultSelector()
    sel.register(p.stdout.fileno(), selectors.EVENT_READ)
    data = b""
    deadline = time.monotonic() + limit
    try:
        while b"\n" not in data and time.monotonic() < deadline:
            if sel.select(max(0.0, min(1.0, deadline - time.monotonic()))):
                chunk = os.read(p.stdout.fileno(), 4096)
                if not chunk:
                    break
                data += chunk
    finally:
        sel.close()
    return data.split(b"\n")[0].decode(errors="replace").strip()


def sink_main(spec_json: str) -> int:
    """The SMTP sink process (see Sink): 220, EHLO (8BITMIME only: no STARTTLS, no
    PIPELINING), MAIL/RCPT/RSET/NOOP 250, DATA 354 ... 250, QUIT 221. Runs until stdin closes."""
    spec = json.loads(spec_json)
    keep = Path(spec["keep"])
    stats = {"messages": 0, "rsa": 0, "ed25519": 0, "unsigned": 0, "kept": {}}

    def take(msg: bytes) -> None:
        end = msg.find(b"\r\n\r\n")
        head = msg[: end if end >= 0 else len(msg)].lower()
        head = re.sub(rb"\r\n[ \t]+", b" ", head)
        sigs = [line for line in head.split(b"\r\n") if line.startswith(b"dkim-signature:")]
        kinds = {k for k in SIGN_KINDS for s in sigs if re.search(rb"\ba=" + k.encode(), s)}
        stats["messages"] += 1
        for k in kinds or {"unsigned"}:
            stats[k] += 1
            if k not in stats["kept"]:
                path = keep / f"first-{k}.eml"
                path.write_bytes(msg)
                stats["kept"][k] = str(path)

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 bench.sink ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    break
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-bench.sink\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    lines = []
                    while True:
                        data = await reader.readline()
                        if not data or data == b".\r\n":
                            break
                        lines.append(data[1:] if data.startswith(b"..") else data)
                    if not data:
                        break
                    take(b"".join(lines))
                    writer.write(b"250 2.0.0 taken\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    break
                elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 2.0.0 ok\r\n")
                else:
                    writer.write(b"502 5.5.2 not here\r\n")
                await writer.drain()
            await writer.drain()
        except (OSError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()
        threading.Thread(
            target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(closed.set)), daemon=True
        ).start()
        server = await asyncio.start_server(session, HOST, 0, limit=1 << 20, backlog=1024)
        print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
        await closed.wait()
        server.close()

    import uvloop

    uvloop.run(main())
    print(json.dumps(stats), flush=True)
    return 0


def microbench_main(spec_json: str) -> int:
    """`bench.py --sign-microbench SPEC`, a process of its own (no other thread): per key, CPU
    (process_time) and wall time of spec["calls"] `mailerd.signing.sign` calls on the 4 KiB
    message, after 10 unmeasured ones; then as many dkimpy verifications of the result (the
    key given directly: no DNS), what a receiving mailerd does per signature."""
    import dkim

    from mailerd import signing

    spec = json.loads(spec_json)
    n = spec["calls"]
    message = make_message(SINK_RCPT, 0, AUTH_SENDER)[:-3]
    out = {"bytes": len(message), "calls": n, "kinds": {}}
    for kind, path in spec["keys"].items():
        key = signing.load_key(AUTH_DOMAIN, kind, path)
        record = key.dns_record().encode()

        def dnsfunc(name, timeout=5, record=record):
            return record

        for _ in range(10):
            signature = signing.sign(message, [key])
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            signature = signing.sign(message, [key])
        c1, w1 = time.process_time(), time.perf_counter()
        signed = signature + message
        ok = dkim.verify(signed, dnsfunc=dnsfunc)
        v0 = time.process_time()
        for _ in range(n):
            dkim.verify(signed, dnsfunc=dnsfunc)
        v1 = time.process_time()
        out["kinds"][kind] = {
            "sign_cpu_ms": (c1 - c0) * 1000 / n,
            "sign_wall_ms": (w1 - w0) * 1000 / n,
            "verify_cpu_ms": (v1 - v0) * 1000 / n,
            "verifies": bool(ok),
            "signature_bytes": len(signature),
        }
    print(json.dumps(out), flush=True)
    return 0


def sign_microbench(setup: AuthSetup, calls: int) -> dict:
    try:
        p = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--sign-microbench"]
            + [json.dumps({"calls": calls, "keys": {k: str(v) for k, v in setup.keys.items()}})],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=str(ROOT),
            stdin=subprocess.DEVNULL,
        )
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        err = locals().get("p")
        why = (err.stderr.strip().splitlines() or ["?"])[-1] if err is not None else str(e)
        return {"error": f"in-process measurement failed: {why}"}


class SigningMailerd(Mailerd):
    """(b): a mailerd whose trusted listener takes mail from AUTH_DOMAIN for SINK_RCPT, signed
    with one key kind (or none: "none"), relayed (--relayhost SINK_HOST:PORT, SINK_HOST resolved
    by the phase's DNS to 127.0.0.1; an MX would mean port 25) to a Sink of its own. Its runs
    are measured until its queue is empty, as Postfix's until its Maildir is complete."""

    def __init__(self, base: Path, workers: int, max_sessions: int, kind: str, setup: AuthSetup):
        super().__init__(
            base,
            workers,
            max_sessions,
            dirname=f"mailerd-sign-{kind}",
            dns_server=setup.dns_server,
            label=f"mailerd {KIND_TITLE[kind]}",
        )
        self.kind = kind
        self.setup = setup
        self.rcpt = SINK_RCPT
        self.sink: Sink | None = None
        self.sink_report: dict | None = None

    def start(self) -> None:
        self.sink = Sink(self.base / "sink")
        # AUTH_DOMAIN is this mailerd's own here (--dkim-key wants a local domain), whatever
        # its key; it only sends from it, to SINK_DOMAIN
        self.extra = ["-d", AUTH_DOMAIN, "--relayhost", f"{SINK_HOST}:{self.sink.port}"]
        self.extra += ["--outbound-ip", "ipv4"]
        if self.kind != "none":
            self.extra += ["--dkim-key", f"{AUTH_DOMAIN}:{self.kind}:{self.setup.keys[self.kind]}"]
        try:
            super().start()
        except BaseException:
            self.stop()
            raise

    def queued(self) -> int:
        try:
            return sum(1 for n in os.listdir(self.queue / "env") if ".tmp" not in n)
        except OSError:
            return 0

    def settle(self, limit: float) -> None:
        self.wait_drained(limit)

    def wait_drained(self, limit: float) -> float | None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.queued() == 0:
                return time.monotonic()
            time.sleep(0.02)
        return None

    def stop(self) -> None:
        super().stop()
        if self.sink is not None:
            self.sink_report = self.sink.close()
            self.sink = None


def make_auth_servers(base: Path, args, setup: AuthSetup) -> tuple[list[Server], list[Server]]:
    """(a)'s servers: mailerd --inbound-auth header and off (the load on the untrusted
    listener), the private Postfix without milters; (b)'s: a SigningMailerd per key kind and
    one without a key."""
    inbound: list[Server] = []
    signers: list[Server] = []
    if "inbound" in args.auth_modes:
        if args.only in (None, "mailerd"):
            # header+dnsbl: each connection's address looked up in BENCH_DNSBL too, where it is
            # not listed (NXDOMAIN). smtp-source connects from one address, so after the first
            # lookup a worker's cache answers: this is the cost of the check itself, not of a
            # DNS round trip a connection (mail from many addresses pays that too).
            for mode, more in (
                ("header", ()),
                ("off", ()),
                ("header+dnsbl", ("--dnsbl", BENCH_DNSBL)),
            ):
                inbound.append(
                    Mailerd(
                        base,
                        args.workers,
                        args.max_sessions,
                        dirname=f"mailerd-inbound-{mode}",
                        network=True,
                        dns_server=setup.dns_server,
                        extra=("--inbound-auth", mode.split("+")[0])
                        + ("--max-sessions-per-ip", str(args.max_sessions))
                        + more,
                        label=f"mailerd {mode}",
                    )
                )
        if args.only in (None, "postfix"):
            inbound.append(
                Postfix(
                    base,
                    args.postfix_process_limit,
                    args.postfix_idle_limit,
                    dirname="postfix-auth",
                    label="postfix plain",
                )
            )
    if "signing" in args.auth_modes and args.only in (None, "mailerd"):
        for kind in (*SIGN_KINDS, "none"):
            signers.append(SigningMailerd(base, args.workers, args.max_sessions, kind, setup))
    return inbound, signers


def auth_send(srv: Server, part: str, c: int, count: int, setup: AuthSetup, args):
    """The send() of an authentication-phase run against `srv`, for throughput_run."""
    procs = args.auth_generators or min(2, c)
    path = setup.signed if part == "inbound" else setup.plain
    timeout = max(60.0, count / 5)
    return lambda: run_generator(
        srv.port, srv.rcpt, AUTH_SENDER, None, c, count, procs, timeout, messages=str(path)
    )


def auth_results_check(mailbox: Path, authserv_id: str) -> dict:
    """What the Authentication-Results fields of `authserv_id` in a mailerd mailbox say: per
    method (spf, dkim, dmarc) a count of each result ("missing": no such result in the field),
    how many messages pass all three, how many have no such field, and a few that do not pass."""
    methods = ("spf", "dkim", "dmarc")
    counts = {m: collections.Counter() for m in methods}
    n = all_pass = without = 0
    odd: list[str] = []
    try:
        entries = [e for e in os.scandir(mailbox) if e.name.isdigit() and e.is_file()]
    except OSError:
        entries = []
    for e in entries:
        with contextlib.suppress(OSError), open(e.path, "rb") as f:
            head = f.read(65536)
            n += 1
            end = re.search(rb"\r?\n\r?\n", head)
            text = head[: end.start() if end else len(head)].decode(errors="replace")
            text = re.sub(r"\r?\n[ \t]+", " ", text)
            ours = [
                line.split(":", 1)[1]
                for line in text.splitlines()
                if line.lower().startswith("authentication-results:")
                and line.split(":", 1)[1].split(";")[0].strip().lower() == authserv_id.lower()
            ]
            if not ours:
                without += 1
                if len(odd) < 3:
                    odd.append(f"message {e.name}: no Authentication-Results of {authserv_id}")
                continue
            found = collections.defaultdict(list)
            for method, result in _AR_RESULT.findall(ours[0]):
                found[method.lower()].append(result.lower())
            for m in methods:
                counts[m][",".join(found.get(m, ["missing"]))] += 1
            if all(found.get(m) == ["pass"] for m in methods) and len(ours) == 1:
                all_pass += 1
            elif len(odd) < 3:
                odd.append(f"message {e.name}: {' '.join(ours[0].split())[:200]}")
    return {
        "messages": n,
        "all_pass": all_pass,
        "without": without,
        "results": {m: dict(c) for m, c in counts.items()},
        "examples_not_passing": odd,
    }


def bench_auth(
    inbound: list[Server], signers: list[Server], setup: AuthSetup, args
) -> tuple[dict, list[str]]:
    """Both parts, one after the other, each with its own servers (started here, stopped at
    the end of the part); then the in-process signing figures. Returns (results, failed)."""
    out: dict = {"inbound": None, "signing": None, "microbench": None}
    failed: list[str] = []
    parts = (("inbound", inbound, args.auth_levels), ("signing", signers, args.sign_levels))
    for part, servers, levels in parts:
        if not servers:
            continue
        q0 = len(setup.dns.queries)
        results, rounds, bad = auth_part(part, servers, levels, setup, args)
        failed += [f"{label} ({part})" for label in bad]
        out[part] = {
            "results": results,
            "rounds": rounds,
            "dns_queries": len(setup.dns.queries) - q0,
        }
    if "signing" in args.auth_modes and args.sign_calls > 0:
        log(f"in-process signing: {args.sign_calls} mailerd.signing.sign calls per key")
        out["microbench"] = sign_microbench(setup, args.sign_calls)
    return out, failed


def auth_part(
    part: str, servers: list[Server], levels: list[int], setup: AuthSetup, args
) -> tuple[list[dict], list[dict], list[str]]:
    """Start one part's servers, probe each with one message (one that fails it is left out,
    with the reason), run the levels (auth_level), then the checks: the mailboxes' messages
    and Authentication-Results (inbound), what each sink received (signing)."""
    benches: list[Bench] = []
    failed: list[str] = []
    rounds: list[dict] = []
    try:
        for srv in servers:
            b = Bench(srv)
            b.res["label"] = srv.label
            try:
                b.start()
            except ServerError as e:
                log(f"{srv.label} ({part}) failed: {e}")
                failed.append(srv.label)
                shut(srv)
                continue
            benches.append(b)
        usable = []
        for b in benches:
            probe = auth_send(b.srv, part, 1, 1, setup, args)()
            b.accepted += probe["done"]
            if probe["done"] != 1:
                why = f"{part}: a first message failed: {probe['error']}"
                log(f"{b.srv.label}: {why}")
                b.res["notes"].append(why + "; not measured")
                continue
            usable.append(b)
        for c in levels:
            live = [b for b in usable if b.active]
            if not live:
                break
            rounds += auth_level(live, part, c, setup, args)
            for b in live:
                if b.res.get("died"):
                    failed.append(b.srv.label)
                    b.finish()
        live = [b for b in benches if b.active]
        for b in live:
            b.going = True
        settle(live)
        time.sleep(0.5)
        for b in live:
            if b.mailbox_start is not None and part == "inbound":
                if isinstance(b.srv, Postfix):
                    b.srv.wait_mailbox(b.mailbox_start + b.accepted, 60)
                got = b.srv.mailbox_count()
                b.res["mailbox_check"] = {
                    "accepted_250": b.accepted,
                    "in_mailbox": got - b.mailbox_start if got is not None else None,
                }
            if part == "inbound" and isinstance(b.srv, Mailerd):
                b.res["auth_results"] = auth_results_check(b.srv.spool / "user", HELO)
    finally:
        for b in benches:
            b.finish()
    for b in benches:
        if isinstance(b.srv, SigningMailerd):
            rep = b.srv.sink_report or {}
            rep["accepted_250"] = b.accepted
            b.res["sink"] = rep
            b.res["kind"] = b.srv.kind
            kept = (rep.get("kept") or {}).get(b.srv.kind)
            if kept:
                rep["first_verifies"] = verify_kept(Path(kept), setup)
    return [b.res for b in benches], rounds, failed


def verify_kept(path: Path, setup: AuthSetup) -> str:
    """dkimpy's verdict on a message the sink received, the key fetched from the phase's DNS."""
    import dkim

    try:
        ok = dkim.verify(
            path.read_bytes(), dnsfunc=lambda name, timeout=5: setup.txt(name.decode())
        )
    except Exception as e:  # (a check: say what went wrong)
        return f"error: {type(e).__name__}: {e}"
    return "pass" if ok else "fail"


def auth_level(live: list[Bench], part: str, c: int, setup: AuthSetup, args) -> list[dict]:
    """One level of one part for every server in `live`: `repeat` rounds of one run per
    server, back to back, the order rotating by one each round (with 3 servers and 3 rounds,
    each goes first once). Fills each server's results; returns the rounds, each the
    msgs/s and CPU ms/msg per server label, for the paired figures."""
    for b in live:
        b.sampler.reset()
        b.runs = []
        b.going = True
    count = args.auth_messages
    rounds = []
    for i in range(args.repeat):
        k = i % len(live)
        got = {}
        for b in live[k:] + live[:k]:
            if not b.going:
                continue
            srv = b.srv
            settle(live)
            time.sleep(0.5)
            log(
                f"{srv.label}: {part}, {c} clients: {count} messages"
                + (f" (run {i + 1}/{args.repeat})" if args.repeat > 1 else "")
            )
            run = throughput_run(srv, c, args, send=auth_send(srv, part, c, count, setup, args))
            run["error"] = run.pop("smtp_source_error")
            run["generator"] = run.pop("smtp_source_cmd")
            if isinstance(srv, SigningMailerd):
                run["queue_seconds"] = run.pop("mailbox_seconds")
            b.accepted += run["msgs"]
            b.runs.append(run)
            got[srv.label] = {k2: run[k2] for k2 in ("msgs_per_s", "cpu_ms_per_msg")}
            if run["error"]:
                log(f"{srv.label}: load generator: {run['error']} ({run['msgs']}/{count} done)")
            if not srv.running():
                b.going = False
        rounds.append({"part": part, "clients": c, "round": i + 1, "runs": got})
    for b in live:
        if b.runs:
            record_median_level(b, {"part": part}, c, count)
            check_alive(b, f"the {part} {c}-client level")
    return rounds


def record_median_level(b: Bench, tag: dict, c: int, count: int) -> None:
    """A level of the TLS or authentication phase in the results: its median run (by msgs/s),
    every run's figures, the peak memory."""
    runs = b.runs
    median = sorted(runs, key=lambda r: r["msgs_per_s"])[(len(runs) - 1) // 2]
    peak, procs = b.sampler.peak()
    b.res["levels"].append(
        {
            **tag,
            "clients": c,
            "requested": count,
            **median,
            "gen_cpu_ms_per_msg": median["gen"]["cpu_ms_per_msg"],
            "runs_msgs_per_s": [r["msgs_per_s"] for r in runs],
            "runs_cpu_ms_per_msg": [r["cpu_ms_per_msg"] for r in runs],
            "runs": list(runs),
            "peak_mem": peak,
            "peak_procs": procs,
        }
    )


def check_alive(b: Bench, during: str) -> None:
    """After a level: note the server's processes, and mark it gone if it stopped running."""
    srv = b.srv
    srv.remember_pids()
    if not srv.running():
        b.going = False
        b.res["died"] = f"{srv.label} stopped running during {during}" + srv.exit_evidence()
        log(b.res["died"])


def _ms(x):
    return None if x is None else x * 1000


def _per(level: dict, key: str) -> str:
    return fmt(level[key] * 1000 / level["msgs"] if level["msgs"] else None, ".2f")


def _row(cells, widths) -> str:
    return "  ".join(
        c.rjust(x) if i else c.ljust(x) for i, (c, x) in enumerate(zip(cells, widths, strict=True))
    )


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def _clients(c: int) -> str:
    return f"{c} client" + ("" if c == 1 else "s")


def report(results: list[dict], paired: list[dict], args, fsinfo: str) -> None:
    print()
    print(
        f"mailerd benchmark: {MSG_LEN}-byte messages to 127.0.0.1, {os.cpu_count()} CPUs, "
        f"spools on {fsinfo}"
    )
    print(
        f"  msgs/s   smtp-source -s C -m M -l {MSG_LEN} (a new connection per message, no "
        "pipelining):"
    )
    print("           M / wall time to its last 250. mailerd's 250 = fsynced into the mailbox;")
    print("           Postfix's 250 = its queue file fsynced (local delivery follows: mbox s)")
    if paired:
        print("           The servers' runs alternate, back to back (run 1: mailerd then Postfix,")
        print("           run 2: Postfix then mailerd, ...) so both face the same disk; the paired")
        print("           runs' ratio is mailerd/Postfix msgs/s within each such pair")
    print("  mbox s   Postfix only: seconds from the start until all M were in its Maildir")
    print("  latency  a separate phase: C concurrent asyncio clients of this script, one")
    print("           connection per message, connect() to the 250 after the final '.', in ms;")
    print("           n = messages timed")
    print("  CPU      utime+stime of the server's process tree (reaped children included),")
    print("           over the smtp-source run (for Postfix: until the Maildir was complete) / M")
    print("  peak MB  summed PSS of the server's processes, sampled every ~0.2 s over the level")
    print(
        "  others   CPU cores kept busy by unrelated processes meanwhile (noise: "
        f"{os.cpu_count()} cores in all)"
    )
    print(f"  CPUs     {PINNING}")
    print()
    hdr = (
        "server",
        "clients",
        "msgs",
        "seconds",
        "msgs/s",
        "lat med",
        "lat p99",
        "n",
        "CPU ms/msg",
        "peak MB",
        "mbox s",
        "others",
    )
    w = (8, 7, 6, 7, 7, 7, 7, 4, 10, 7, 6, 6)
    print(_row(hdr, w))
    print("  ".join("-" * x for x in w))
    for r in results:
        for L in r["levels"]:
            row = (
                r["server"],
                str(L["clients"]),
                str(L["msgs"]),
                fmt(L["seconds"], ".2f"),
                fmt(L["msgs_per_s"], ".1f"),
                fmt(L["lat_median_ms"], ".1f"),
                fmt(L["lat_p99_ms"], ".1f"),
                str(L["lat_n"]),
                fmt(L["cpu_ms_per_msg"], ".2f"),
                fmt(L["peak_mem"] / 2**20, ".1f"),
                fmt(L["mailbox_seconds"], ".2f"),
                fmt(L["other_cores"], ".2f"),
            )
            print(_row(row, w))
    print(
        "  (latency in ms; the 250 after '.' alone, median/p99 ms: "
        + "; ".join(
            f"{r['server']} "
            + ", ".join(
                f"{L['clients']}c {fmt(L['dot_median_ms'], '.1f')}/{fmt(L['dot_p99_ms'], '.1f')}"
                for L in r["levels"]
            )
            for r in results
        )
        + ")"
    )
    print(
        "  (CPU user/sys ms per msg: "
        + "; ".join(
            f"{r['server']} "
            + ", ".join(
                f"{L['clients']}c {_per(L, 'cpu_user_seconds')}/{_per(L, 'cpu_sys_seconds')}"
                for L in r["levels"]
            )
            for r in results
        )
        + ";"
    )
    print(
        "   kernel threads meanwhile, e.g. journal commits, ms per msg, not in CPU: "
        + "; ".join(
            f"{r['server']} "
            + ", ".join(f"{L['clients']}c {_per(L, 'kthreads_seconds')}" for L in r["levels"])
            for r in results
        )
        + ")"
    )
    if any(L.get("disk_writes_per_msg") is not None for r in results for L in r["levels"]):
        print(
            "  (disk write requests / KiB written / cache flushes per msg, over the same window: "
            + "; ".join(
                f"{r['server']} "
                + ", ".join(
                    f"{L['clients']}c {fmt(L.get('disk_writes_per_msg'), '.1f')}/"
                    f"{fmt(L.get('disk_kib_per_msg'), '.0f')}/"
                    f"{fmt(L.get('disk_flushes_per_msg'), '.1f')}"
                    for L in r["levels"]
                )
                for r in results
            )
            + ")"
        )
    print("  CPU ms/msg by process (a parent includes the children it reaped meanwhile):")
    for r in results:
        for L in r["levels"]:
            parts = [
                f"{k} {v:.2f}" for k, v in L["cpu_by_process_ms_per_msg"].items() if v >= 0.005
            ]
            print(f"    {r['server']} {L['clients']}c: " + ", ".join(parts[:8]))
    by = {r["server"]: {L["clients"]: L for L in r["levels"]} for r in results}
    pairs = {p["clients"]: p for p in paired}
    if "mailerd" in by and "postfix" in by:
        lines = []
        for c in by["mailerd"]:
            if c not in by["postfix"]:
                continue
            a, b = by["mailerd"][c]["msgs_per_s"], by["postfix"][c]["msgs_per_s"]
            if b:
                lines.append(
                    f"mailerd/Postfix msgs/s at {_clients(c)}: {a / b:.2f}  ({a:.1f} vs {b:.1f})"
                )
            p = pairs.get(c)
            if p and p["median"] is not None:
                n = len(p["ratios"])
                lines.append(
                    f"  median of the {n} paired run{'s' if n != 1 else ''}: "
                    f"{p['median']:.2f}  (pairs: "
                    + ", ".join(fmt(x, ".2f") for x in p["ratios"])
                    + ")"
                )
        if lines:
            print()
            print("\n".join(lines))
    print()
    for r in results:
        i = r.get("idle")
        if i:
            t = (
                f", all greeted after {i['seconds_all_greeted']:.2f} s"
                if i["seconds_all_greeted"] is not None
                else ""
            )
            print(
                f"idle connections, {r['server']}: greeted within {i['window']:.0f} s: "
                f"{i['greeted']} / {i['n']}{t}; memory while held: "
                f"{i['mem_at_end'] / 2**20:.1f} MB (peak {i['peak_mem'] / 2**20:.1f} MB, "
                f"{i['peak_procs']} processes)"
            )
            extra = []
            if i["other_reply"]:
                extra.append(f"{i['other_reply']} other replies {i['other_lines']}")
            if i["closed_before_banner"]:
                extra.append(f"{i['closed_before_banner']} closed before a banner")
            if i["no_reply"]:
                extra.append(f"{i['no_reply']} no reply yet")
            if i["errors"]:
                extra.append(f"errors {i['errors']}")
            if i["open_failed"]:
                extra.append(i["open_failed"])
            if i["probe_ms"] is not None:
                extra.append(f"meanwhile one message on a new connection: {i['probe_ms']:.1f} ms")
            else:
                extra.append(
                    f"meanwhile one message on a new connection: failed {i['probe_errors']}"
                )
            if extra:
                print("    " + "; ".join(extra))
    for r in results:
        lines = []
        for L in r["levels"]:
            if L["smtp_source_error"]:
                lines.append(
                    f"{L['clients']} clients: smtp-source: {L['smtp_source_error']} "
                    f"({L['msgs']}/{L['requested']} messages done)"
                )
            if len(L["runs_msgs_per_s"]) > 1:
                lines.append(
                    f"{L['clients']} clients: msgs/s of the {len(L['runs_msgs_per_s'])} "
                    "smtp-source runs, in order: "
                    + ", ".join(f"{x:.1f}" for x in L["runs_msgs_per_s"])
                    + " (the median one is in the table)"
                )
            if L["max_gap"] >= 0.5:
                lines.append(
                    f"{L['clients']} clients: no 250 for {L['max_gap']:.2f} s "
                    f"(from {L['max_gap_at']:.2f} s into the smtp-source run)"
                )
            if L["lat_errors"]:
                lines.append(f"{L['clients']} clients: latency client errors: {L['lat_errors']}")
            if r["server"] == "postfix" and L["mailbox_seconds"] is None:
                lines.append(f"{L['clients']} clients: mailbox not complete within 120 s")
        mc = r.get("mailbox_check")
        if mc and mc["in_mailbox"] is not None and mc["in_mailbox"] != mc["accepted_250"]:
            lines.append(
                f"mailbox check: {mc['accepted_250']} messages got 250 but "
                f"{mc['in_mailbox']} are in the mailbox"
            )
        if r.get("died"):
            lines.append("FAILED: " + r["died"])
        lines += r.get("notes", [])
        lines += r.get("problems", [])
        if lines:
            print(f"\nnotes, {r['server']}:")
            for line in lines:
                print("  " + line)
    print()


def report_tls(results: list[dict], paired: list[dict], args) -> None:
    """The TLS phase's table: one row per server, mode and level."""
    gens = {
        L["gen"]["procs"]
        for r in results
        for L in r["levels"]
        if L.get("gen")  # (a level whose every run failed has none)
    }
    print()
    print(
        f"TLS phase: {MSG_LEN}-byte messages to 127.0.0.1, {os.cpu_count()} CPUs; one "
        f"{args.tls_setup.kind} certificate (tests/certs.py) for both servers"
    )
    procs = "/".join(map(str, sorted(gens))) or "-"
    lines = [
        "load     this script's own generator: Python asyncio on uvloop + the ssl module",
        f"         ({ssl.OPENSSL_VERSION}), in {procs} process(es) of its own, C clients in",
        "         all; each message on a new connection: banner, EHLO, STARTTLS, a full",
        "         handshake (no session resumption, no certificate check), EHLO, [AUTH PLAIN],",
        "         MAIL, RCPT, DATA, QUIT",
        f"CPUs     {PINNING}",
        "run      STARTTLS: the listener smtp-source uses, STARTTLS offered (not required);",
        "         submission: a submission port, STARTTLS then AUTH PLAIN required (a login per",
        "         message); the same server instance for both",
        "msgs/s   messages answered with the final 250 / time from the first connect to the",
        "         last 250; the median of the runs, which alternate between the servers, back",
        "         to back; the paired ratio is mailerd/Postfix msgs/s within each such pair",
        "CPU      utime+stime of the server's process tree (reaped children included) over the",
        "         run (Postfix: until its Maildir was complete) / msgs",
        "gen      the load generator's own CPU (user+sys, all its processes) / msgs: it shares",
        "         the machine's cores with the server",
        "peak MB  summed PSS of the server's processes, sampled every ~0.2 s over the level",
        "others   CPU cores kept busy by unrelated processes meanwhile (noise)",
    ]
    print("\n".join("  " + line for line in lines))
    print()
    hdr = (
        "server",
        "run",
        "clients",
        "msgs",
        "seconds",
        "msgs/s",
        "CPU ms/msg",
        "gen ms/msg",
        "peak MB",
        "mbox s",
        "others",
    )
    w = (8, 10, 7, 6, 7, 7, 10, 10, 7, 6, 6)
    print(_row(hdr, w))
    print("  ".join("-" * x for x in w))
    for r in results:
        for L in r["levels"]:
            row = (
                r["server"],
                MODE_TITLE[L["mode"]],
                str(L["clients"]),
                str(L["msgs"]),
                fmt(L["seconds"], ".2f"),
                fmt(L["msgs_per_s"], ".1f"),
                fmt(L["cpu_ms_per_msg"], ".2f"),
                fmt(L["gen_cpu_ms_per_msg"], ".2f"),
                fmt(L["peak_mem"] / 2**20, ".1f"),
                fmt(L["mailbox_seconds"], ".2f"),
                fmt(L["other_cores"], ".2f"),
            )
            print(_row(row, w))
    print("  CPU ms/msg by process (a parent includes the children it reaped meanwhile):")
    for r in results:
        for L in r["levels"]:
            parts = [
                f"{k} {v:.2f}" for k, v in L["cpu_by_process_ms_per_msg"].items() if v >= 0.005
            ]
            print(
                f"    {r['server']} {MODE_TITLE[L['mode']]} {L['clients']}c: "
                + ", ".join(parts[:8])
            )
    by = {r["server"]: {(L["mode"], L["clients"]): L for L in r["levels"]} for r in results}
    pairs = {(p["mode"], p["clients"]): p for p in paired}
    if "mailerd" in by and "postfix" in by:
        lines = []
        for key, L in by["mailerd"].items():
            if key not in by["postfix"]:
                continue
            a, b = L["msgs_per_s"], by["postfix"][key]["msgs_per_s"]
            title = f"{MODE_TITLE[key[0]]} at {_clients(key[1])}"
            if b:
                lines.append(f"mailerd/Postfix msgs/s, {title}: {a / b:.2f}  ({a:.1f} vs {b:.1f})")
            p = pairs.get(key)
            if p and p["median"] is not None:
                n = len(p["ratios"])
                lines.append(
                    f"  median of the {n} paired run{'s' if n != 1 else ''}: "
                    f"{p['median']:.2f}  (pairs: "
                    + ", ".join(fmt(x, ".2f") for x in p["ratios"])
                    + ")"
                )
        if lines:
            print()
            print("\n".join(lines))
    for r in results:
        lines = []
        if r.get("openssl_s_client"):
            lines.append(f"openssl s_client -starttls smtp saw: {r['openssl_s_client']}")
        seen = sorted({L["gen"]["tls"] for L in r["levels"] if (L.get("gen") or {}).get("tls")})
        if seen:
            lines.append("the load generator saw: " + "; ".join(seen))
        for L in r["levels"]:
            title = f"{MODE_TITLE[L['mode']]}, {_clients(L['clients'])}"
            if L["error"]:
                lines.append(
                    f"{title}: load generator: {L['error']} ({L['msgs']}/{L['requested']} done)"
                )
            if len(L["runs_msgs_per_s"]) > 1:
                lines.append(
                    f"{title}: msgs/s of the {len(L['runs_msgs_per_s'])} runs, in order: "
                    + ", ".join(f"{x:.1f}" for x in L["runs_msgs_per_s"])
                )
            if L["max_gap"] >= 0.5:
                lines.append(
                    f"{title}: no 250 for {L['max_gap']:.2f} s "
                    f"(from {L['max_gap_at']:.2f} s into the run)"
                )
            gen = L.get("gen") or {}
            if gen.get("resumed"):
                lines.append(f"{title}: {gen['resumed']} handshakes resumed a session (unexpected)")
            if r["server"] == "postfix" and L["mailbox_seconds"] is None:
                lines.append(f"{title}: mailbox not complete within 120 s")
        if r["server"] == "mailerd" and any(L["mode"] == "submission" for L in r["levels"]):
            lines.append(
                "submission: a mailerd worker remembers a successful login for 10 minutes, so "
                "argon2id's ~0.18 s of CPU is paid once per worker (in the probe message or the "
                "first run), not per message"
            )
        mc = r.get("mailbox_check")
        if mc and mc["in_mailbox"] is not None and mc["in_mailbox"] != mc["accepted_250"]:
            lines.append(
                f"mailbox check: {mc['accepted_250']} messages got 250 but "
                f"{mc['in_mailbox']} are in the mailbox"
            )
        if r.get("died"):
            lines.append("FAILED: " + r["died"])
        lines += r.get("notes", [])
        lines += r.get("problems", [])
        if lines:
            print(f"\nnotes, TLS, {r['server']}:")
            for line in lines:
                print("  " + line)
    print()


def _paired(rounds: list[dict], part: str, c: int, ref: str, label: str, key: str, op) -> list:
    """Per round of `part` at `c` clients: op(label's value, ref's value) of `key`."""
    out = []
    for r in rounds:
        if r["part"] != part or r["clients"] != c:
            continue
        a, b = r["runs"].get(label), r["runs"].get(ref)
        ok = a and b and a[key] is not None and b[key] is not None
        out.append(op(a[key], b[key]) if ok else None)
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _median(values: list) -> float | None:
    ok = [v for v in values if v is not None]
    return statistics.median(ok) if ok else None


def report_auth(auth: dict, setup: AuthSetup, args) -> None:
    """The authentication phase's two tables, its checks, and the issue's targets."""
    print()
    print(
        f"Authentication phase (issue #15): {MSG_LEN}-byte messages to 127.0.0.1, "
        f"{os.cpu_count()} CPUs; a DNS server of the benchmark's own (tests/dnsserver.py, in "
        "its process) publishes for"
    )
    lines = [
        f"{AUTH_DOMAIN}: SPF v=spf1 ip4:{HOST} -all, DMARC v=DMARC1; p=reject, and the DKIM keys'",
        "TXT records as `mailerd dkim keygen` printed them (RSA-2048 selector rsa, Ed25519",
        "selector ed25519). Every mailerd asks it alone (--dns-server); TTLs 300 s, and each",
        "mailerd worker caches answers, as a real one would for a sender that writes often.",
        "load     this script's own generator (as the TLS phase's, without TLS): Python asyncio",
        "         on uvloop, in processes of its own; each message on a new connection:",
        "         banner, EHLO, MAIL, RCPT, DATA, QUIT; the messages made beforehand (below)",
        f"CPUs     {PINNING}",
        "msgs/s   messages answered with the final 250 / time from the first connect to the",
        "         last 250; the median of the runs, which rotate between the part's servers,",
        "         back to back (round i starts with the i-th server)",
        "CPU      utime+stime of the server's process tree (reaped children included) over the",
        "         run, until the server is done with the messages (Postfix: its Maildir",
        "         complete; (b): mailerd's queue empty) / msgs",
        "gen      the load generator's own CPU / msgs (it shares the cores with the server)",
        "others   CPU cores kept busy by unrelated processes meanwhile (noise; in (b) this",
        "         includes the SMTP sink)",
    ]
    print("\n".join("  " + line for line in lines))
    inbound, signing = auth.get("inbound"), auth.get("signing")
    rounds = (inbound or {}).get("rounds", []) + (signing or {}).get("rounds", [])
    if inbound:
        _report_auth_part(inbound, "inbound", "postfix plain", args, rounds, setup)
    if signing:
        _report_auth_part(signing, "signing", "mailerd unsigned", args, rounds, setup)
    mb = auth.get("microbench")
    if mb:
        print()
        if mb.get("error"):
            print(f"in-process signing: {mb['error']}")
        else:
            print(
                f"in-process (bench.py --sign-microbench, a process of its own): "
                f"{mb['calls']} mailerd.signing.sign calls on a {mb['bytes']}-byte message "
                "per key, after 10 unmeasured; CPU = process_time"
            )
            for kind, k in mb["kinds"].items():
                print(
                    f"  {KIND_TITLE[kind]:9} sign {k['sign_cpu_ms']:.3f} ms CPU "
                    f"({k['sign_wall_ms']:.3f} ms wall) per message; dkimpy verify of the "
                    f"result {k['verify_cpu_ms']:.3f} ms CPU "
                    f"({'verifies' if k['verifies'] else 'DOES NOT VERIFY'}); "
                    f"DKIM-Signature {k['signature_bytes']} bytes"
                )
    print()
    print("targets (issue #15):")
    for c in args.auth_levels if inbound else []:
        paired = _median(
            _paired(rounds, "inbound", c, "postfix plain", "mailerd header", "msgs_per_s", _ratio)
        )
        m = _level(inbound, "mailerd header", c)
        p = _level(inbound, "postfix plain", c)
        if m and p and p["msgs_per_s"]:
            r = m["msgs_per_s"] / p["msgs_per_s"]
            print(
                f"  inbound with verification >= 1.5x Postfix plain, {_clients(c)}: {r:.2f}x "
                f"(paired median {fmt(paired, '.2f')}x): {'met' if r >= 1.5 else 'NOT met'}"
            )
    for kind in SIGN_KINDS if signing else []:
        label = f"mailerd {KIND_TITLE[kind]}"
        for c in args.sign_levels:
            d = _median(
                _paired(
                    rounds,
                    "signing",
                    c,
                    "mailerd unsigned",
                    label,
                    "cpu_ms_per_msg",
                    lambda a, b: a - b,
                )
            )
            if d is not None:
                print(
                    f"  signing adds < 2 ms CPU per message, {KIND_TITLE[kind]}, {_clients(c)}: "
                    f"+{d:.2f} ms (server, paired median): {'met' if d < 2 else 'NOT met'}"
                )
        k = ((mb or {}).get("kinds") or {}).get(kind)
        if k:
            ms = k["sign_cpu_ms"]
            print(
                f"  signing adds < 2 ms CPU per message, {KIND_TITLE[kind]}, in-process: "
                f"{ms:.2f} ms: {'met' if ms < 2 else 'NOT met'}"
            )
    print()


def _level(part: dict, label: str, c: int) -> dict | None:
    for r in part["results"]:
        if r.get("label") == label:
            for L in r["levels"]:
                if L["clients"] == c:
                    return L
    return None


def _report_auth_part(
    part: dict, name: str, ref: str, args, rounds: list[dict], setup: AuthSetup
) -> None:
    results = part["results"]
    print()
    if name == "inbound":
        print(
            "(a) inbound: the load on mailerd's untrusted listener (-n; -l none), MAIL FROM and "
            f"From: {AUTH_SENDER}, each"
        )
        print(
            f"    message DKIM-signed beforehand with the RSA-2048 key ({setup.pool} different "
            f"ones, {setup.presign_cpu * 1000 / setup.pool:.2f} ms CPU each, not in any figure);"
        )
        print(
            "    mailerd --inbound-auth header (SPF, DKIM, DMARC; Authentication-Results added), "
            f"off, and header with --dnsbl {BENCH_DNSBL}"
        )
        print(
            "    (one client address, not listed: the workers' caches answer after the first "
            "lookup); the private"
        )
        print("    Postfix as in the plaintext phase (no milters), the same messages")
        extra_hdr, extra_w = ("x Postfix", "paired"), (9, 6)
    else:
        print(
            f"(b) outbound signing: the load on mailerd's trusted listener (-l), From: "
            f"{AUTH_SENDER}, RCPT {SINK_RCPT}; queued,"
        )
        print(
            f"    signed at queueing (--dkim-key {AUTH_DOMAIN}:rsa|ed25519:FILE, or none), then "
            f"relayed by --relayhost {SINK_HOST}:PORT"
        )
        print(
            f"    ({SINK_HOST} A {HOST} in the phase's DNS) to an SMTP sink of this script; "
            "'queue s': until mailerd's queue was"
        )
        print(
            "    empty. The signing cost is the CPU above the unsigned mailerd's: median of the "
            "paired rounds' differences"
        )
        extra_hdr, extra_w = ("+CPU ms", "paired"), (7, 6)
    hdr = (
        "server",
        "clients",
        "msgs",
        "seconds",
        "msgs/s",
        "queue s" if name == "signing" else "mbox s",
        "CPU ms/msg",
        "gen ms/msg",
        "peak MB",
        "others",
        *extra_hdr,
    )
    w = (17, 7, 6, 7, 7, 7, 10, 10, 7, 6, *extra_w)
    print()
    print(_row(hdr, w))
    print("  ".join("-" * x for x in w))
    for r in results:
        for L in r["levels"]:
            label, c = r["label"], L["clients"]
            refL = _level(part, ref, c)
            if name == "inbound":
                a = (
                    L["msgs_per_s"] / refL["msgs_per_s"]
                    if refL and refL["msgs_per_s"] and label != ref
                    else None
                )
                b = _median(_paired(rounds, name, c, ref, label, "msgs_per_s", _ratio))
                extra = (fmt(a, ".2f"), fmt(b if label != ref else None, ".2f"))
            else:
                a = (
                    L["cpu_ms_per_msg"] - refL["cpu_ms_per_msg"]
                    if refL
                    and L["cpu_ms_per_msg"] is not None
                    and refL["cpu_ms_per_msg"] is not None
                    and label != ref
                    else None
                )
                b = _median(
                    _paired(rounds, name, c, ref, label, "cpu_ms_per_msg", lambda x, y: x - y)
                )
                extra = (fmt(a, "+.2f"), fmt(b if label != ref else None, "+.2f"))
            row = (
                label,
                str(c),
                str(L["msgs"]),
                fmt(L["seconds"], ".2f"),
                fmt(L["msgs_per_s"], ".1f"),
                fmt(L.get("queue_seconds", L.get("mailbox_seconds")), ".2f"),
                fmt(L["cpu_ms_per_msg"], ".2f"),
                fmt(L["gen_cpu_ms_per_msg"], ".2f"),
                fmt(L["peak_mem"] / 2**20, ".1f"),
                fmt(L["other_cores"], ".2f"),
                *extra,
            )
            print(_row(row, w))
    if name == "inbound":
        print(
            "  (x Postfix: msgs/s / Postfix plain's, of the medians; paired: the median of the "
            "rounds' own ratios)"
        )
    else:
        print(
            "  (+CPU ms: CPU ms/msg minus the unsigned mailerd's, of the medians; paired: the "
            "median of the rounds' own differences)"
        )
    print("  CPU ms/msg by process (a parent includes the children it reaped meanwhile):")
    for r in results:
        for L in r["levels"]:
            parts = [
                f"{k} {v:.2f}" for k, v in L["cpu_by_process_ms_per_msg"].items() if v >= 0.005
            ]
            print(f"    {r['label']} {L['clients']}c: " + ", ".join(parts[:8]))
    notes = []
    if name == "inbound":
        notes.append(
            f"the phase's DNS server answered {part['dns_queries']} queries during (a) "
            "(the workers' caches answer the rest)"
        )
    for r in results:
        lines = []
        ar = r.get("auth_results")
        if ar is not None:
            res = ar["results"]
            if "header" in r["label"]:
                lines.append(
                    f"mailbox: {ar['messages']} messages; Authentication-Results of "
                    f"{HELO}: spf {_counts(res['spf'])}; dkim {_counts(res['dkim'])}; "
                    f"dmarc {_counts(res['dmarc'])}; all three pass: {ar['all_pass']}; "
                    f"without the field: {ar['without']}"
                )
                if ar["all_pass"] != ar["messages"]:
                    lines.append(
                        f"PROBLEM: {ar['messages'] - ar['all_pass']} message(s) without "
                        "spf=pass dkim=pass dmarc=pass, e.g.:"
                    )
                    lines += ["  " + x for x in ar["examples_not_passing"]]
            else:
                n_with = ar["messages"] - ar["without"]
                lines.append(
                    f"mailbox: {ar['messages']} messages, {n_with} with an "
                    f"Authentication-Results of {HELO}"
                    + (" (expected: none)" if n_with == 0 else " (UNEXPECTED with off)")
                )
        sink = r.get("sink")
        if sink:
            if sink.get("error"):
                lines.append(f"sink: {sink['error']}")
            else:
                want = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}.get(r.get("kind"), "")
                lines.append(
                    f"sink: {sink['messages']} messages received ({sink['accepted_250']} "
                    f"accepted by mailerd); with an rsa-sha256 signature {sink['rsa']}, "
                    f"ed25519-sha256 {sink['ed25519']}, unsigned {sink['unsigned']}; "
                    f"sink CPU {sink['cpu_seconds'] * 1000 / max(1, sink['messages']):.2f} ms/msg"
                    + (f" (expected: all {want})" if want else " (expected: all unsigned)")
                )
                if sink.get("first_verifies"):
                    lines.append(
                        "the first signed message the sink got, verified by dkimpy against the "
                        f"key in the phase's DNS: {sink['first_verifies']}"
                    )
        for L in r["levels"]:
            title = _clients(L["clients"])
            if L["error"]:
                lines.append(
                    f"{title}: load generator: {L['error']} ({L['msgs']}/{L['requested']} done)"
                )
            if len(L["runs_msgs_per_s"]) > 1:
                lines.append(
                    f"{title}: msgs/s of the {len(L['runs_msgs_per_s'])} runs, in order: "
                    + ", ".join(f"{x:.1f}" for x in L["runs_msgs_per_s"])
                    + "; CPU ms/msg: "
                    + ", ".join(fmt(x, ".2f") for x in L["runs_cpu_ms_per_msg"])
                )
            if L["max_gap"] >= 0.5:
                lines.append(
                    f"{title}: no 250 for {L['max_gap']:.2f} s "
                    f"(from {L['max_gap_at']:.2f} s into the run)"
                )
            if "queue_seconds" in L and L["queue_seconds"] is None:
                lines.append(f"{title}: mailerd's queue not empty within 120 s")
            if r["server"] == "postfix" and L.get("mailbox_seconds", 0) is None:
                lines.append(f"{title}: mailbox not complete within 120 s")
        mc = r.get("mailbox_check")
        if mc and mc["in_mailbox"] is not None and mc["in_mailbox"] != mc["accepted_250"]:
            lines.append(
                f"mailbox check: {mc['accepted_250']} messages got 250 but "
                f"{mc['in_mailbox']} are in the mailbox"
            )
        if r.get("died"):
            lines.append("FAILED: " + r["died"])
        lines += r.get("notes", [])
        lines += r.get("problems", [])
        if lines:
            notes.append(f"{r['label']}:")
            notes += ["  " + line for line in lines]
    if notes:
        print(f"  notes, ({'a' if name == 'inbound' else 'b'}):")
        for line in notes:
            print("    " + line)


def _counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "-"


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 200 messages per level (TLS runs too), 1000 idle connections",
    )
    ap.add_argument(
        "--only", choices=("mailerd", "postfix"), help="benchmark one server alone (no paired runs)"
    )
    ap.add_argument("--messages", type=int, help="smtp-source messages per level (2000)")
    ap.add_argument("--lat-messages", type=int, help="latency-phase messages per level (1000)")
    ap.add_argument("--lat-time", type=float, help="latency-phase time limit, s (15)")
    ap.add_argument("--idle", type=int, help="idle connections (10000; 0 skips)")
    ap.add_argument(
        "--idle-hold",
        type=float,
        default=2.0,
        help="seconds to hold the idle connections after the 10 s window (2)",
    )
    ap.add_argument("--levels", default="1,10,50", help="concurrency levels (1,10,50)")
    ap.add_argument(
        "--repeat",
        type=int,
        help="smtp-source runs per level and server, interleaved between the "
        "servers; the median one is reported (3; quick 1)",
    )
    ap.add_argument("--no-tls", action="store_true", help="skip the TLS phase (as before #14)")
    ap.add_argument(
        "--tls-only",
        action="store_true",
        help="the TLS phase only (STARTTLS and submission runs; no plaintext runs, no idle test, "
        "no authentication phase)",
    )
    ap.add_argument(
        "--tls-levels", default="1,10", help="the TLS phase's concurrency levels (1,10)"
    )
    ap.add_argument(
        "--tls-modes",
        default="starttls,submission",
        help="the TLS phase's runs: starttls (the smtp listener, STARTTLS), submission "
        "(STARTTLS then AUTH PLAIN on a submission port) (starttls,submission)",
    )
    ap.add_argument(
        "--tls-messages", type=int, help="messages per TLS run (as --messages: 2000; quick 200)"
    )
    ap.add_argument(
        "--tls-generators",
        type=int,
        default=0,
        help="load generator processes per TLS run, the clients split between them "
        "(default: 1 for 1 client, else 2)",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="run the load generators on the last CPU and everything else (both servers, the "
        "DNS server, this script) on the others, so that the generator's CPU does not take "
        "from the server being measured (by default all share every CPU)",
    )
    ap.add_argument(
        "--postfix-tickets",
        action="store_true",
        help="TLS phase: let Postfix send TLS 1.3 session tickets, its default (by default "
        "here it sends none, as mailerd: with them its EHLO reply after the handshake waits "
        "~40 ms for the client's delayed ACK)",
    )
    ap.add_argument(
        "--no-auth",
        action="store_true",
        help="skip the authentication phase (inbound verification, outbound signing; #15)",
    )
    ap.add_argument(
        "--auth-only",
        action="store_true",
        help="the authentication phase only (no plaintext runs, no idle test, no TLS phase)",
    )
    ap.add_argument(
        "--auth-modes",
        default="inbound,signing",
        help="the authentication phase's parts: inbound (mailerd --inbound-auth header and "
        "off, Postfix plain, DKIM-signed messages on the untrusted listener), signing (mailerd "
        "with an RSA-2048 key, an Ed25519 key, none; relayed to a sink) (inbound,signing)",
    )
    ap.add_argument(
        "--auth-levels", default="1,10", help="the inbound part's concurrency levels (1,10)"
    )
    ap.add_argument(
        "--sign-levels", default="10", help="the signing part's concurrency levels (10)"
    )
    ap.add_argument(
        "--auth-messages",
        type=int,
        help="messages per authentication-phase run (as --messages: 2000; quick 200)",
    )
    ap.add_argument(
        "--auth-generators",
        type=int,
        default=0,
        help="load generator processes per authentication-phase run (default: 1 for 1 "
        "client, else 2)",
    )
    ap.add_argument(
        "--sign-calls",
        type=int,
        default=300,
        help="in-process mailerd.signing.sign calls per key type (300; 0 skips)",
    )
    ap.add_argument("--workers", type=int, default=2, help="mailerd -w (2)")
    ap.add_argument("--max-sessions", type=int, default=20000, help="mailerd --max-sessions")
    ap.add_argument(
        "--postfix-process-limit",
        type=int,
        default=200,
        help="Postfix default_process_limit for the throughput runs (200)",
    )
    ap.add_argument(
        "--postfix-idle-limit",
        type=int,
        default=1000,
        help="Postfix smtpd process limit for the idle test (1000)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the spools and logs in var/")
    ap.add_argument(
        "--no-wait",
        action="store_true",
        help="start at once even if the previous run deleted its files < 6 min ago",
    )
    args = ap.parse_args()
    q = args.quick
    args.messages = args.messages or (200 if q else 2000)
    args.lat_messages = args.lat_messages or (100 if q else 1000)
    args.lat_time = args.lat_time or (4.0 if q else 15.0)
    args.idle = (1000 if q else 10000) if args.idle is None else args.idle
    args.repeat = args.repeat or (1 if q else 3)
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.ss_timeout = max(60.0, args.messages / 10)
    if any(c < 1 or c > 1000 for c in args.levels) or args.messages < 1:
        ap.error("levels must be 1..1000 and --messages >= 1")
    if args.no_tls and args.tls_only:
        ap.error("--no-tls and --tls-only exclude each other")
    if args.auth_only and (args.no_auth or args.tls_only):
        ap.error("--auth-only excludes --no-auth and --tls-only")
    args.auth_messages = args.auth_messages or args.messages
    args.auth_levels = [int(x) for x in args.auth_levels.split(",") if x.strip()]
    args.sign_levels = [int(x) for x in args.sign_levels.split(",") if x.strip()]
    args.auth_modes = [x.strip() for x in args.auth_modes.split(",") if x.strip()]
    if any(m not in AUTH_MODES for m in args.auth_modes):
        ap.error(f"--auth-modes: {', '.join(AUTH_MODES)}")
    if any(c < 1 or c > 1000 for c in args.auth_levels + args.sign_levels):
        ap.error("--auth-levels and --sign-levels must be 1..1000")
    if args.auth_messages < 1 or args.auth_generators < 0 or args.sign_calls < 0:
        ap.error("--auth-messages >= 1, --auth-generators >= 0, --sign-calls >= 0")
    args.tls_messages = args.tls_messages or args.messages
    args.tls_levels = [int(x) for x in args.tls_levels.split(",") if x.strip()]
    args.tls_modes = [x.strip() for x in args.tls_modes.split(",") if x.strip()]
    if any(m not in TLS_MODES for m in args.tls_modes):
        ap.error(f"--tls-modes: {', '.join(TLS_MODES)}")
    if any(c < 1 or c > 1000 for c in args.tls_levels) or args.tls_messages < 1:
        ap.error("--tls-levels must be 1..1000 and --tls-messages >= 1")
    if args.tls_generators < 0:
        ap.error("--tls-generators >= 0")
    if args.pin:
        global GENERATOR_CPUS, PINNING
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs 2 CPUs at least")
        GENERATOR_CPUS = {cpus[-1]}
        # (before any thread starts: the calling thread's affinity is what threads and
        # children inherit)
        os.sched_setaffinity(0, set(cpus[:-1]))
        PINNING = (
            f"--pin: load generator(s) on CPU {cpus[-1]}; the servers, the DNS server and "
            f"this script on CPU {','.join(map(str, cpus[:-1]))}"
        )
    args.tls_setup = None
    run_plain = not (args.tls_only or args.auth_only)
    run_tls = not (args.no_tls or args.auth_only)
    run_auth = not (args.no_auth or args.tls_only)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.idle + 256
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE,
                (
                    min(hard, max(want, 65536))
                    if hard != resource.RLIM_INFINITY
                    else max(want, 65536),
                    hard,
                ),
            )
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < want:
            log(f"descriptor limit {soft} < {want}: idle test reduced to {soft - 256}")
            args.idle = max(0, soft - 256)

    def on_signal(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    (ROOT / "var").mkdir(exist_ok=True)
    if not args.no_wait:
        wait_for_deleted_inodes()
    base = Path(tempfile.mkdtemp(prefix="bench-", dir=bench_parent()))
    global DISK_STAT
    dev = os.stat(base).st_dev
    stat_file = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    DISK_STAT = stat_file if stat_file.exists() else None
    try:
        fsinfo = (
            subprocess.run(
                ["stat", "-f", "-c", "%T", str(base)], capture_output=True, text=True
            ).stdout.strip()
            + f" ({base})"
        )
    except OSError:
        fsinfo = str(base)
    servers: list[Server] = []
    tls_servers: list[Server] = []
    auth_setup: AuthSetup | None = None
    auth: dict = {}
    auth_failed: list[str] = []
    if run_plain:
        if args.only in (None, "mailerd"):
            servers.append(Mailerd(base, args.workers, args.max_sessions))
        if args.only in (None, "postfix"):
            servers.append(Postfix(base, args.postfix_process_limit, args.postfix_idle_limit))
    results, paired, failed = [], [], []
    tls_results, tls_paired, tls_failed = [], [], []
    t0 = time.monotonic()
    try:
        if servers:
            results, paired, failed = bench_servers(servers, args)
            for srv in servers:  # (the TLS phase's Postfix needs the temporary user afresh)
                shut(srv)
        if run_tls:
            try:
                args.tls_setup = TLSSetup(base, args.postfix_tickets)
            except (OSError, subprocess.SubprocessError) as e:
                log(f"no TLS phase: cannot make the certificate: {e}")
                tls_failed.append("certificate")
            else:
                if args.only in (None, "mailerd"):
                    tls_servers.append(
                        Mailerd(base, args.workers, args.max_sessions, tls=args.tls_setup)
                    )
                if args.only in (None, "postfix"):
                    tls_servers.append(
                        Postfix(
                            base,
                            args.postfix_process_limit,
                            args.postfix_idle_limit,
                            tls=args.tls_setup,
                        )
                    )
                servers += tls_servers
                tls_results, tls_paired, tls_failed = bench_tls(tls_servers, args)
        if run_auth:
            for srv in tls_servers:  # (the authentication phase's Postfix needs the user afresh)
                shut(srv)
            try:
                auth_setup = AuthSetup(base, args.auth_messages)
            except (OSError, subprocess.SubprocessError, ServerError, ValueError) as e:
                log(f"no authentication phase: cannot set it up: {e}")
                auth_failed.append("setup")
            else:
                inbound, signers = make_auth_servers(base, args, auth_setup)
                servers += inbound + signers
                auth, auth_failed = bench_auth(inbound, signers, auth_setup, args)
    except Interrupted as e:
        log(f"interrupted ({e}); cleaning up")
        for srv in servers:
            try:
                shut(srv)
            except Exception as ee:  # keep cleaning the rest
                log(f"cleanup of {srv.name}: {ee}")
        return 130
    finally:
        for srv in servers:
            if isinstance(srv, Postfix) and srv.created_user:
                srv.cleanup()
            if isinstance(srv, SigningMailerd) and srv.sink is not None:
                srv.stop()  # (its sink, a process of ours, even after an interruption)
        if auth_setup is not None:
            auth_setup.close()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
            DELETED_MARK.write_text(f"{time.time():.0f}\n")
    if results:
        report(results, paired, args, fsinfo)
    if tls_results:
        report_tls(tls_results, tls_paired, args)
    if auth.get("inbound") or auth.get("signing") or auth.get("microbench"):
        report_auth(auth, auth_setup, args)
    if results or tls_results or auth:
        print(f"(total {time.monotonic() - t0:.0f} s)")
    if args.json:
        out = {"results": results, "paired": paired, "failed": failed, "cpus": PINNING}
        if run_auth:
            out["auth"] = {**auth, "failed": auth_failed, "zone": auth_setup and auth_setup.zone}
        if run_tls:
            out["tls"] = {
                "results": tls_results,
                "paired": tls_paired,
                "failed": tls_failed,
                "certificate": TLSSetup.kind,
                "generator": f"Python {sys.version.split()[0]} asyncio on uvloop, ssl "
                f"({ssl.OPENSSL_VERSION})",
            }
        Path(args.json).write_text(json.dumps(out, indent=1))
    failed += [f"{name} (TLS phase)" for name in tls_failed]
    failed += [f"{name} (authentication phase)" for name in auth_failed]
    if failed:
        print(f"FAILED (did not start or stopped running): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load-generator"]:
        sys.exit(generator_main(sys.argv[2]))
    if sys.argv[1:2] == ["--smtp-sink"]:
        sys.exit(sink_main(sys.argv[2]))
    if sys.argv[1:2] == ["--sign-microbench"]:
        sys.exit(microbench_main(sys.argv[2]))
    sys.exit(main())

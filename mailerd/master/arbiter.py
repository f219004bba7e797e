"""The master process: binds every endpoint, forks the delivery process, its mailbox writer
and the workers, restarts children that die (with back-off), reloads on SIGHUP, and shuts
everything down in order. It stays root (when started as root): it must re-bind port 25 on a
reload, and start a mailbox writer (root) whenever one dies; every other child drops to the
`-u` user (see `privileges`).

Each delivery process has a mailbox writer of its own, which the master forks right after it
and hands over through a socketpair only the two of them hold (the link: one `WriterStarted`
frame, the writer's channel as its descriptor). When that writer dies, the master forks
another at once and hands it over the same way; the delivery process goes on and its
requests wait for the new writer. (The delivery process, unprivileged, could not fork a root
writer itself.) A writer exits when its delivery process closes its channel (status 0); that
one is not replaced.

Signals are only recorded by their handlers (a self-pipe wakes the loop via set_wakeup_fd); all
work happens in the loop, as in gunicorn's arbiter: `handle_<signal>` methods, a reap loop that
runs `waitpid(WNOHANG)` until nothing is left (SIGCHLDs coalesce), a boot-failure exit code that
stops the master instead of respawning forever. Signals are blocked across fork(), so a child
never runs the master's handlers nor dies of a signal that arrives before it set its own.

Children are numbered by generation. SIGHUP re-reads the configuration (a bad one is logged and
the running one kept), binds new listeners and closes removed ones (an unchanged address keeps
its socket, so no connection is refused), starts a new delivery process and a new generation
of workers, and retires the old ones: the old delivery process gets SIGTERM (it drains its
commits and exits; the master owns the delivery socket, so the new one accepts on it and the
workers' channels reconnect to it), old workers get SIGUSR2 (stop accepting, finish every
session, exit; see `worker`). Old children that exit are not respawned; one that overstays its
deadline is killed. SIGHUPs that come while a reload is under way are folded into one more
reload once it is done (`handle_sighup`), and a reload waits until the shared session table has
rows for its workers, ending the oldest retiring generations early if it must (GENERATIONS).

Shutdown (SIGTERM/SIGINT): stop accepting (workers close their listeners), let live sessions
finish within the grace period (idle ones get 421 at once), then stop the delivery process,
which first finishes every commit in flight, and exit 0. SIGUSR1 reopens the log file (and is
passed on to the children).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

from setproctitle import getproctitle, setproctitle

from mailerd import aliases, config, host, lifecycle, privileges
from mailerd import log as logsetup
from mailerd.config import Config, ConfigError, ListenAddress
from mailerd.delivery import process as delivery_process
from mailerd.delivery import relay, secrets
from mailerd.ipc import reports
from mailerd.ipc.authfailures import AuthFailures
from mailerd.ipc.channel import send_packet
from mailerd.ipc.messages import WriterStarted
from mailerd.ipc.reports import REPORTS_MAX
from mailerd.ipc.sentcounts import SentCounts
from mailerd.ipc.sessiontable import SessionTable
from mailerd.lifecycle import (
    BOOT_ERROR,
    STOP_DELIVERY_TIMEOUT,
    STOP_WORKERS_TIMEOUT,
    STOP_WRITER_TIMEOUT,
)
from mailerd.master import daemon as daemonize
from mailerd.master import listeners
from mailerd.spool import Spool
from mailerd.worker import process as worker_process
from mailerd.writer import service as writer_service

log = logging.getLogger("mailerd.master")

getproctitle()  # initialise setproctitle before anything moves argv (gunicorn #3430)

MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0
RELOAD_SETTLE_TIMEOUT = 15.0  # a reload is called done after this even if a worker is slow
BOOT_ERROR_KEPT = 1000  # characters kept of a child's start-up error
# Session-table rows, per worker: enough for the generation accepting, the one a reload starts
# and two retiring ones. A retiring generation keeps its rows while its sessions last (up to
# the grace, 370 s by default), so the folding of SIGHUPs (handle_sighup) alone bounds nothing:
# reloads 2 s apart would hold 185 generations. A reload that finds too few rows free ends the
# oldest retiring generations early (as at a stop: idle sessions get 421, a transaction
# finishes) and waits for their rows; starting workers without a row instead (each counting
# its own sessions) made --max-sessions(-per-ip) and the reserves per worker (attacker's pass
# 7c, F1). A row is 64 KiB of shared memory, touched only where counted.
GENERATIONS = 4
MASTER_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# Blocked across fork() until the child has its own handlers.
FORK_BLOCKED = {*MASTER_SIGNALS, signal.SIGUSR2}


@dataclass
class Child:
    kind: str  # "worker", "delivery" or "writer"
    slot: int  # a worker's number; a writer's delivery process (its pid); 0
    started: float
    generation: int = 0
    ready: bool = False
    retiring: bool = False
    retired: bool = False  # a retiring worker said it no longer accepts
    cut_short: bool = False  # a retiring worker told to stop now, for its row (GENERATIONS)
    deadline: float | None = None  # killed if still alive then (old generations only)
    session_row: int | None = None  # its row of the shared session table (workers)
    link: socket.socket | None = None  # a delivery process's: where its writers are handed over
    reports: socket.socket | None = None  # a worker's: where it says how it is (ipc.reports)
    reports_heard: int = 0

    @property
    def name(self) -> str:
        if self.kind == "worker":
            return f"worker {self.slot}"
        return "delivery process" if self.kind == "delivery" else "mailbox writer"


class Master:
    def __init__(
        self,
        cfg: Config,
        smtp_sockets: list[tuple[socket.socket, ListenAddress]],
        delivery_socket: socket.socket,
        *,
        argv: list[str] | None = None,
        start_dir: Path | None = None,
        pidfile: daemonize.PidFile | None = None,
        notifier: daemonize.Notifier | None = None,
    ) -> None:
        """`argv` is what SIGHUP re-reads (None: reload refused). The pid file (its lock) and
        the start-up pipe (`notifier`, told "ready" once every worker accepts) are the
        master's own: children close them."""
        self.cfg = cfg
        self.smtp_sockets = smtp_sockets
        self.delivery_socket = delivery_socket
        self.argv = argv
        self.start_dir = start_dir or Path.cwd()
        self.pidfile = pidfile
        self.notifier = notifier
        self.generation = 0
        self.children: dict[int, Child] = {}
        self.failures: collections.Counter[tuple[str, int]] = collections.Counter()
        self.due: dict[tuple[str, int], float] = {}  # respawns waiting for their back-off
        self.signals: collections.deque[int] = collections.deque()
        self.boot_error: str | None = None  # the last start-up error a child reported
        self.stopping = False
        self.exit_code = 0
        self.reloads = 0  # reloads finished (or failed), told in the reload file
        self.reload_started: float | None = None  # a reload under way, not yet settled
        self.reload_outcome = "ok"  # its outcome once settled: "partial" if certificates kept
        # What the reload under way has to say beside its outcome, as logged: why it failed,
        # why the certificates in use were kept, what takes a restart. Told in the reload file
        # too, so that `mailerd reload` (and certbot's hook) say why, not only "see its log".
        self.reload_notes: list[str] = []
        # A SIGHUP came while a reload was under way: one more reload follows once it is done
        # (`_reload_pending`), whatever the number of signals.
        self.reload_pending = False
        self.rows_wanted = 0  # a reload postponed until this many session-table rows are free
        # Rows for the workers alive at once: this generation's, retiring ones after reloads.
        self.sessions = SessionTable(max(16, GENERATIONS * cfg.workers))
        # Failed AUTH per client address and account, for every worker.
        self.auth_failures = AuthFailures(ipv6_prefix_length=cfg.ipv6_prefix_length)
        # Authenticated users' recipients at other domains lately, for every worker (kept
        # across reloads, forgotten at a restart).
        self.sent_counts = SentCounts()

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        setproctitle("mailerd: master")
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        for sig in MASTER_SIGNALS:
            signal.signal(sig, self._record)
        self.spawn("delivery", 0)
        for slot in range(1, self.cfg.workers + 1):
            self.spawn("worker", slot)
        log.info("mailerd started: %s", self._describe_config())
        self._warn_of_hostname()
        self._warn_of_no_network()
        aliases.report(self.cfg.aliases)
        report_files_in_the_way(self.cfg.spool)
        report_no_passwords(self.cfg)
        while not self.stopping:
            self._wait(1.0)
            self._read_reports()
            self._dispatch_signals()
            self.reap()
            self._respawn_due()
            self._check_ready()
            self._check_reloaded()
            self._reload_pending()
            self._enforce_deadlines()
        self._stop_all()
        return self.exit_code

    def _warn_of_hostname(self) -> None:
        """A host name other servers cannot look up, on a server they can reach: they see it
        in the banner, the EHLO and Received: lines, and some refuse mail from an EHLO that
        is not a real name (Postfix's reject_non_fqdn_helo_hostname)."""
        cfg = self.cfg
        reachable = [
            listen
            for _, listen in self.smtp_sockets
            if listen.role == config.NETWORK and not host.is_loopback(listen.host)
        ]
        problem = host.unusable_hostname(cfg.hostname) if reachable else ""
        if problem:
            log.warning(
                "host name %s is no name other servers can look up (%s), yet %s listens for "
                "them: set hostname = mx.example.org (-H), the name of this machine's MX",
                cfg.hostname,
                problem,
                reachable[0],
            )

    def _warn_of_no_network(self) -> None:
        """No listen-network given and none found (a network that came up after mailerd, a
        DHCP lease late for network-online.target): other servers cannot deliver, and
        nothing else would say so."""
        if self.cfg.unlistened:
            log.warning(
                "no network listener: %s when the configuration was read, so no other server "
                "can deliver here; set listen-network = ADDR (-n), or reload once the network "
                "is up",
                self.cfg.unlistened,
            )

    def _describe_config(self) -> str:
        cfg = self.cfg
        return "{}; domains {}; workers {}{}{}".format(
            ", ".join(f"{listen} ({listen.role})" for _, listen in self.smtp_sockets),
            ", ".join(cfg.domains),
            cfg.workers,
            f"; TLS with {len(cfg.tls_pairs)} certificate(s)" if cfg.tls_context else "",
            f"; children run as {cfg.user}" if cfg.user else "",
        )

    def _record(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # only record: logging or reaping here can deadlock

    def _wait(self, timeout: float) -> None:
        try:
            waited: list[int | socket.socket] = [self.wake_r]
            waited += [c.reports for c in self.children.values() if c.reports is not None]
            select.select(waited, [], [], timeout)
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _read_reports(self) -> None:
        """What the workers said of themselves since the last turn (ipc.reports)."""
        for pid, child in list(self.children.items()):
            self._hear(pid, child)

    def _hear(self, pid: int, child: Child) -> None:
        """A worker's reports waiting on its own socket; past the most a worker has to say
        (REPORTS_MAX: one that floods its socket, as code running in it could), it is no
        longer listened to, lest it keep the master's loop busy."""
        if child.reports is None:
            return
        for message in reports.receive(child.reports, REPORTS_MAX - child.reports_heard + 1):
            child.reports_heard += 1
            if child.reports_heard > REPORTS_MAX:
                log.warning(
                    "%s (pid %d) says more than a worker does: no longer heard", child.name, pid
                )
                child.reports.close()
                child.reports = None
                return
            self._report(child, message)

    def _report(self, child: Child, message: str) -> None:
        """`child` says "ready", "retired" or "error TEXT"; a start-up error from a child that
        has started is ignored."""
        if message == "ready":
            child.ready = True
        elif message == "retired":
            child.retired = True
        elif message.startswith("error ") and not child.ready:
            self.boot_error = message[6:][:BOOT_ERROR_KEPT]  # only the last one is told

    def _check_ready(self) -> None:
        """Tell whoever started us (the waiting `mailerd` command) once every worker accepts."""
        if self.notifier is None or self.notifier.done:
            return
        if self._workers_ready():
            self.notifier.ready()

    def _workers_ready(self) -> bool:
        """Whether every worker of the current generation accepts."""
        ready = sum(
            1
            for c in self.children.values()
            if c.kind == "worker" and c.generation == self.generation and c.ready
        )
        return ready >= self.cfg.workers

    def _dispatch_signals(self) -> None:
        """Each signal recorded since the last turn, once (a burst of the same one is one)."""
        received = []
        while self.signals:
            received.append(self.signals.popleft())
        for signum in dict.fromkeys(received):
            handler = getattr(self, f"handle_{signal.Signals(signum).name.lower()}", None)
            if handler is not None:
                handler()

    # -- signal handlers -------------------------------------------------------------------

    def handle_sigchld(self) -> None:
        """A child exited: reaped in the loop, respawned after its back-off."""

    def handle_sigterm(self) -> None:
        """Graceful stop: finish sessions and commits, then exit 0."""
        log.info("stopping (SIGTERM)")
        self.stopping = True

    def handle_sigint(self) -> None:
        """Same as SIGTERM (Ctrl-C in the foreground)."""
        log.info("stopping (SIGINT)")
        self.stopping = True

    def handle_sighup(self) -> None:
        """Reload the configuration; see the module docstring. While a reload is under way
        (its new generation not yet accepting, or the old one still accepting), SIGHUPs are
        folded into one more reload once it is done, as gunicorn and Postfix do not: each
        would otherwise fork a whole generation and retire one that has barely started, so
        a loop of `kill -HUP` (certbot renewing many certificates) made a thousand processes.
        One more, not none: the configuration may have changed after the running reload read
        it."""
        if self.reload_started is not None or self.reload_pending:
            if not self.reload_pending:
                log.info("SIGHUP during a reload: one more follows once it is done")
            self.reload_pending = True
            return
        log.info("reloading the configuration (SIGHUP)")
        self.reload()

    def _reload_pending(self) -> None:
        """The reload folded in by `handle_sighup`, once the one under way is done; or the one
        postponed by `_make_room`, once the rows it waits for are free."""
        if not self.reload_pending or self.reload_started is not None or self.stopping:
            return
        if self.sessions.free() < self.rows_wanted:
            return
        self.reload_pending = False
        self.rows_wanted = 0
        log.info("reloading the configuration (a SIGHUP that waited)")
        self.reload()

    def handle_sigusr1(self) -> None:
        """Reopen the log file (after logrotate moved it) here, then in every child.

        The children are signalled before the line is logged: once "reopened" is in the new
        file, every child has the signal pending, so none writes another line to the old one
        (a CI run saw a worker's "connect from" land in the rotated file, sent while the
        master was still between its line and its kills)."""
        reopened = logsetup.reopen()
        if reopened and self.cfg.log_file is not None:
            with contextlib.suppress(OSError, privileges.PrivilegeError):
                privileges.chown_path(self.cfg.log_file, self.cfg.user, logsetup.LOG_MODE)
        for pid in self.children:
            _kill(pid, signal.SIGUSR1)
        if reopened:
            log.info("log file reopened (SIGUSR1)")
        else:
            log.info("SIGUSR1: no log file to reopen")

    # -- reload ----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Apply the configuration file as it is now; False (old one kept) on any error."""
        self.reload_notes = []
        try:
            new, certificate_problem = self._load_config()
            trust = relay.load_trust(new.outbound_ca)  # (read as root, as they are now)
            secrets_problem = secrets.check(new, FORK_BLOCKED)
            if secrets_problem is not None:
                raise ConfigError(secrets_problem)
            if not self._make_room(new.workers):
                return False
            try:
                new.spool.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot create spool {new.spool}: {exc.strerror}"
                ) from exc
            privileges.check_looked_into(new, self.cfg.user)  # (a new spool, or new modes)
            sockets, removed = listeners.rebind(self.smtp_sockets, new.listeners)
        except (ConfigError, privileges.PrivilegeError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.error("reload failed, the running configuration is kept: %s", reason)
            self.reload_notes.append(str(reason))
            self._reloaded("failed")
            return False
        if certificate_problem is not None:
            log.error(
                "reload: %s; the certificates in use are kept, the rest is reloaded",
                certificate_problem,
            )
            self.reload_notes.append(certificate_problem)
        self.reload_outcome = "ok" if certificate_problem is None else "partial"
        # Closed before forking, or the new children would inherit (and keep open, without
        # accepting) a port that is meant to be gone.
        for sock in removed:
            sock.close()
        old = list(self.children.items())
        grace = self.cfg.timeout + STOP_WORKERS_TIMEOUT + 30  # old sessions, old timeout
        self.cfg = new
        self.auth_failures.ipv6_prefix_length = new.ipv6_prefix_length  # (for new workers)
        self.smtp_sockets = sockets
        self.generation += 1
        self.due.clear()
        self.failures.clear()
        logsetup.set_verbose(new.verbose)
        relay.use_trust(trust)
        # The old delivery process first (it stops accepting on the shared socket, then
        # drains), then the new one; new workers before the old ones stop accepting.
        for pid, child in old:
            if child.kind == "delivery" and not child.retiring:
                self._retire(pid, child, signal.SIGTERM, STOP_DELIVERY_TIMEOUT)
        self.spawn("delivery", 0)
        for slot in range(1, new.workers + 1):
            self.spawn("worker", slot)
        for pid, child in old:
            if child.kind == "worker" and not child.retiring:
                self._retire(pid, child, signal.SIGUSR2, grace)
        aliases.report(new.aliases)
        report_files_in_the_way(new.spool)
        report_no_passwords(new)
        self.reload_started = time.monotonic()
        return True

    def _make_room(self, workers: int) -> bool:
        """Whether `workers` session-table rows are free for a new generation. If not, the
        oldest retiring generations are told to stop now, and the reload waits for their rows
        (see GENERATIONS)."""
        free = self.sessions.free()
        if free >= workers:
            return True
        retiring = sorted(
            (c.generation, pid)
            for pid, c in self.children.items()
            if c.kind == "worker" and c.retiring and c.session_row is not None
        )
        coming = sum(1 for _, pid in retiring if self.children[pid].cut_short)
        cut: set[int] = set()
        for generation, pid in retiring:
            if free + coming >= workers and generation not in cut:
                break
            child = self.children[pid]
            if not child.cut_short:
                self._cut_short(pid, child)
                coming += 1
                cut.add(generation)
        log.warning(
            "reload postponed: %d of the session table's %d rows are free, the new generation "
            "needs %d; old workers%s still hold theirs, and it follows once they are gone",
            free,
            self.sessions.rows,
            workers,
            f" of generation {', '.join(map(str, sorted(cut)))}, told to stop now," if cut else "",
        )
        self.reload_pending = True
        self.rows_wanted = workers
        return False

    def _cut_short(self, pid: int, child: Child) -> None:
        """A retiring worker stops now, as at a stop (idle sessions get 421, a transaction
        finishes), instead of when its last session ends."""
        child.cut_short = True
        deadline = time.monotonic() + STOP_WORKERS_TIMEOUT
        child.deadline = min(child.deadline or deadline, deadline)
        _kill(pid, signal.SIGTERM)

    def _check_reloaded(self) -> None:
        """A reload is done once every new worker accepts and no old one does any longer: only
        then is it logged, and told to whoever waits for it (`commands.daemon.reload`), so
        that a session opened after that gets the new configuration."""
        if self.reload_started is None:
            return
        old_accepting = any(
            c.kind == "worker" and c.generation != self.generation and not c.retired
            for c in self.children.values()
        )
        late = time.monotonic() - self.reload_started > RELOAD_SETTLE_TIMEOUT
        if (not self._workers_ready() or old_accepting) and not late:
            return
        self.reload_started = None
        log.info(
            "configuration reloaded (generation %d): %s", self.generation, self._describe_config()
        )
        self._warn_of_hostname()
        self._warn_of_no_network()
        if not self.reload_pending:  # (else the next one is what the waiting command is told)
            self._reloaded(self.reload_outcome)

    def _reloaded(self, outcome: str) -> None:
        self.reloads += 1
        if self.pidfile is not None and self.pidfile.fd is not None:
            self.pidfile.record_reload(self.reloads, outcome, "; ".join(self.reload_notes))

    def _retire(self, pid: int, child: Child, sig: int, grace: float) -> None:
        child.retiring = True
        child.deadline = time.monotonic() + grace
        _kill(pid, sig)

    def _load_config(self) -> tuple[Config, str | None]:
        """Parse the same command line (and so the same config file) again, as at start-up;
        and why the certificates in use are kept, if they are (`config.reload_files`)."""
        if self.argv is None:
            raise ConfigError("no command line to re-read (not started by mailerd.master.run)")
        here = os.getcwd()
        with contextlib.suppress(OSError):
            os.chdir(self.start_dir)  # relative paths mean what they meant at start-up
        try:
            new, certificate_problem = config.reload_files(
                config.absolute(config.load(self.argv), self.start_dir), self.cfg
            )
        finally:
            with contextlib.suppress(OSError):
                os.chdir(here)
        user = privileges.resolve(new.user)
        log_place = self.cfg.log_file or ("standard error" if self.cfg.foreground else "syslog")
        for name, value, kept, shown in (
            ("queue", new.queue, self.cfg.queue, self.cfg.queue),
            ("user", user, self.cfg.user, self.cfg.user),
            ("log-file", new.log_file, self.cfg.log_file, log_place),
        ):
            if value != kept:
                self._needs_restart(f"a new {name} takes a restart; keeping {shown}")
        if new.pidfile is not None and new.pidfile != self.cfg.pidfile:
            self._needs_restart(f"a new pidfile takes a restart; keeping {self.cfg.pidfile}")
        workers = new.workers
        most = self.sessions.rows // 2  # (the generation accepting and a new one: GENERATIONS)
        if workers > most:
            self._needs_restart(
                f"more than {most} workers takes a restart (session-table rows); "
                f"keeping {self.cfg.workers}"
            )
            workers = self.cfg.workers
        restarted_only = replace(
            new,
            workers=workers,
            queue=self.cfg.queue,
            user=self.cfg.user,
            log_file=self.cfg.log_file,
            pidfile=self.cfg.pidfile,
            foreground=self.cfg.foreground,
        )
        return restarted_only, certificate_problem

    def _needs_restart(self, what: str) -> None:
        """A change the reload cannot apply (the rest is applied): logged, and told with the
        reload's outcome."""
        log.warning("reload: %s", what)
        self.reload_notes.append(what)

    # -- children --------------------------------------------------------------------------

    def spawn(self, kind: str, slot: int) -> None:
        """Fork a child: a worker (`slot` its number), the delivery process (then its mailbox
        writer), or a mailbox writer for the delivery process whose pid is `slot`."""
        row = None
        generation = self.generation
        if kind == "worker":
            row = self.sessions.claim()
            if row is None:  # (reload waits for rows: only a bug gets here; see GENERATIONS)
                log.error("worker %d not started: no free session-table row; trying again", slot)
                self.due[(kind, slot)] = time.monotonic() + 1.0
                return
        owner = self.children.get(slot) if kind == "writer" else None
        if kind == "writer":
            if owner is None or owner.link is None:
                return  # its delivery process is gone: so is the need
            generation = owner.generation
        ours, theirs = _pair(kind)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            child = Child(kind, slot, time.monotonic(), generation, session_row=row)
            self.children[pid] = child
            if theirs is not None:
                theirs.close()
            if kind == "delivery":
                assert ours is not None
                ours.setblocking(False)  # a stuck delivery process never blocks the master
                child.link = ours
                self.spawn("writer", pid)
            elif owner is not None and ours is not None:
                self._hand_over(owner, ours)
            else:  # a worker: its reports
                child.reports = ours
            return
        code = 1
        try:
            lifecycle.child_signals()
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            if ours is not None:
                ours.close()
            code = self._child_main(kind, slot, row, theirs)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("%s %d crashed", kind, slot)
        finally:
            logging.shutdown()
            os._exit(code)

    def _hand_over(self, owner: Child, channel: socket.socket) -> None:
        """Give a new writer's channel to its delivery process, over their link."""
        assert owner.link is not None
        try:
            send_packet(owner.link, WriterStarted().encode(), channel.fileno())
        except OSError as exc:  # it is exiting: the writer sees its channel close, and exits
            log.warning("cannot hand a mailbox writer to the delivery process: %s", exc)
        finally:
            channel.close()

    def _child_main(
        self,
        kind: str,
        slot: int,
        session_row: int | None = None,
        pair: socket.socket | None = None,
    ) -> int:
        """The child's life; `pair`: the delivery process's end of its link to the master, a
        writer's end of its channel, a worker's end of its reports socket."""
        own = [self.wake_r, self.wake_w]
        # Other delivery processes' links: only the master may hand them writers.
        own += [c.link.fileno() for c in self.children.values() if c.link is not None]
        # Other workers' report sockets: what each says is its own (ipc.reports).
        own += [c.reports.fileno() for c in self.children.values() if c.reports is not None]
        if self.pidfile is not None and self.pidfile.fd is not None:
            own.append(self.pidfile.fd)  # the lock must die with the master, not linger
        if self.notifier is not None and self.notifier.fd is not None:
            own.append(self.notifier.fd)
        for fd in own:
            with contextlib.suppress(OSError):
                os.close(fd)
        logsetup.pin_directories()  # before any drop: the log file stays reopenable
        if kind in ("delivery", "writer"):
            for sock, _ in self.smtp_sockets:
                sock.close()
        if kind == "writer":
            assert pair is not None
            self.delivery_socket.close()
            user = self.cfg.user
            untrusted = privileges.lookup(user).uid if user else None
            return writer_service.run(self.cfg.spool, untrusted, pair, self.cfg.max_message_size)
        if kind == "delivery":
            assert pair is not None
            setproctitle("mailerd: delivery")
            # Still root here: it opens the spool and the queue, then drops privileges itself.
            return delivery_process.run(self.cfg, self.delivery_socket, pair)
        self.delivery_socket.close()
        return worker_process.run(
            self.cfg,
            self.smtp_sockets,
            slot,
            user=self.cfg.user,
            reports_fd=pair.detach() if pair is not None else None,
            sessions=self.sessions,
            session_row=session_row,
            auth_failures=self.auth_failures,
            sent_counts=self.sent_counts,
        )

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                if child.session_row is not None:  # its sessions ended with it
                    self.sessions.release(child.session_row)
                if child.link is not None:  # its writer sees its channel close, and exits
                    child.link.close()
                self._hear(pid, child)  # (what a worker said before it went counts)
                if child.reports is not None:
                    child.reports.close()
                self._child_exited(pid, child, status)

    def _child_exited(self, pid: int, child: Child, status: int) -> None:
        key = (child.kind, child.slot)
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            return
        if child.kind == "writer" and (code == 0 or child.slot not in self.children):
            return  # let go by its delivery process, or left without one: nothing to replace
        if child.generation != self.generation or child.retiring:
            level = logging.INFO if code == 0 else logging.WARNING
            log.log(
                level,
                "old %s (pid %d, generation %d) finished with %s",
                child.name,
                pid,
                child.generation,
                _describe(code),
            )
            return
        log.warning("%s (pid %d) exited with %s", child.name, pid, _describe(code))
        # BOOT_ERROR means "cannot start at all", and only a worker that has not started yet
        # (not said "ready") can mean it: one that served the Internet may run an attacker's
        # code, which would otherwise stop the whole server with one exit(3). From it, this is
        # a crash like any other: respawned, with the back-off.
        if code == BOOT_ERROR and not child.ready:
            log.error("%s cannot start; stopping", child.kind)
            self.exit_code = 1
            self.stopping = True
            return
        if time.monotonic() - child.started > STABLE_AFTER:
            self.failures[key] = 0
        delay = min(0.1 * 2 ** self.failures[key], MAX_BACKOFF) if self.failures[key] else 0.0
        self.failures[key] += 1
        self.due[key] = time.monotonic() + delay

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for key, when in list(self.due.items()):
            if when <= now:
                del self.due[key]
                self.spawn(*key)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for pid, child in list(self.children.items()):
            if child.deadline is not None and now > child.deadline:
                log.error(
                    "old %s %d (pid %d) did not finish in time after a reload; killing it",
                    child.kind,
                    child.slot,
                    pid,
                )
                child.deadline = None
                _kill(pid, signal.SIGKILL)

    def _stop_all(self) -> None:
        for sock, _ in self.smtp_sockets:
            sock.close()
        self._stop_kind("worker", STOP_WORKERS_TIMEOUT)
        self._stop_kind("delivery", STOP_DELIVERY_TIMEOUT)
        # A writer stops by itself once its delivery process has closed its channel and what
        # it was handed is written.
        self._stop_kind("writer", STOP_WRITER_TIMEOUT, signal_first=False)
        log.info("stopped")

    def _stop_kind(self, kind: str, timeout: float, signal_first: bool = True) -> None:
        for pid, child in self.children.items():
            # A retiring worker gets TERM too (it is an escalation, not a repeat); a delivery
            # process already told to stop is not told twice.
            if signal_first and child.kind == kind and not (kind == "delivery" and child.retiring):
                _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(c.kind == kind for c in self.children.values()):
            if time.monotonic() > deadline:
                for pid, child in list(self.children.items()):
                    if child.kind == kind:
                        log.error("%s (pid %d) did not stop in time; killing it", kind, pid)
                        _kill(pid, signal.SIGKILL)
                deadline = float("inf")
            self._wait(0.1)
            self._read_reports()  # read, or select() would return at once: a busy loop
            self.signals.clear()
            self.reap()

    def failure(self) -> str:
        """Why start-up failed, for the waiting `mailerd` command."""
        if self.boot_error is not None:
            return self.boot_error
        if self.exit_code == 0:
            return "stopped by a signal before it was ready"
        return "a child process could not start; see the system log (or --log-file)"


def _pair(kind: str) -> tuple[socket.socket, socket.socket]:
    """The master's end and the child's of what a new child needs: the delivery process's link
    (packets, so that a frame can only leave whole: see `send_packet`), a writer's channel, a
    worker's reports socket."""
    if kind == "delivery":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if kind == "writer":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return reports.channel()


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


def report_files_in_the_way(spool: Path) -> None:
    """Warn about every mbox file where a mailbox directory should be: mail for that user is
    answered 450 until it is moved aside (README, 'Mailboxes')."""
    for name in Spool(spool).files_in_the_way():
        log.warning(
            "mailbox %s is a file (an mbox?), not a directory: mail for %s is refused with 450 "
            "until it is moved aside; see the README, 'Mailboxes'",
            spool / name,
            name,
        )


def report_no_passwords(cfg: Config) -> None:
    """Warn when a submission listener waits for logins that no password allows."""
    roles = (config.SUBMISSION, config.SUBMISSIONS)
    submission = [str(listen) for listen in cfg.listeners if listen.role in roles]
    if submission and len(cfg.credentials) == 0:
        log.warning(
            "no passwords in %s: nobody can log in on %s; set one with `mailerd passwd USER`",
            cfg.passwd_file,
            ", ".join(submission),
        )

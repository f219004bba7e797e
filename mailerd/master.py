"""The master process: binds every endpoint, forks the delivery process and the workers,
restarts children that die (with back-off), and shuts everything down in order.

Signals are only recorded by their handlers (a self-pipe wakes the loop via set_wakeup_fd); all
work happens in the loop, as in gunicorn's arbiter: `handle_<signal>` methods, a reap loop that
runs `waitpid(WNOHANG)` until nothing is left (SIGCHLDs coalesce), a boot-failure exit code that
stops the master instead of respawning forever.

Shutdown (SIGTERM/SIGINT): stop accepting (workers close their listeners), let live sessions
finish within the grace period (idle ones get 421 at once), then stop the delivery process,
which first finishes every commit in flight, and exit 0.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass

from setproctitle import getproctitle, setproctitle

from mailerd import delivery, listeners, worker
from mailerd import log as logsetup
from mailerd.config import Config, ListenAddress
from mailerd.queue import Queue

log = logging.getLogger("mailerd.master")

getproctitle()  # initialise setproctitle before anything moves argv (gunicorn #3430)

BOOT_ERROR = 3  # a child exiting with this cannot work at all: stop instead of respawning
STOP_WORKERS_TIMEOUT = worker.SHUTDOWN_GRACE + worker.COMMIT_TIMEOUT / 4
STOP_DELIVERY_TIMEOUT = delivery.DRAIN_TIMEOUT + 5
MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0


@dataclass
class Child:
    kind: str  # "worker" or "delivery"
    slot: int
    started: float


class Master:
    def __init__(
        self,
        cfg: Config,
        smtp_sockets: list[tuple[socket.socket, ListenAddress]],
        delivery_socket: socket.socket,
    ) -> None:
        self.cfg = cfg
        self.smtp_sockets = smtp_sockets
        self.delivery_socket = delivery_socket
        self.children: dict[int, Child] = {}
        self.failures: collections.Counter[tuple[str, int]] = collections.Counter()
        self.due: dict[tuple[str, int], float] = {}  # respawns waiting for their back-off
        self.signals: collections.deque[int] = collections.deque()
        self.stopping = False
        self.exit_code = 0

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        setproctitle("mailerd: master")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._record)
        self.spawn("delivery", 0)
        for slot in range(1, self.cfg.workers + 1):
            self.spawn("worker", slot)
        log.info(
            "mailerd started: %s; domains %s",
            ", ".join(
                f"{listen} ({'local' if listen.trusted else 'network'})"
                for _, listen in self.smtp_sockets
            ),
            ", ".join(self.cfg.domains),
        )
        while not self.stopping:
            self._wait(1.0)
            self._dispatch_signals()
            self.reap()
            self._respawn_due()
        self._stop_all()
        return self.exit_code

    def _record(self, signum: int, frame: object) -> None:
        self.signals.append(signum)  # only record: logging or reaping here can deadlock

    def _wait(self, timeout: float) -> None:
        try:
            select.select([self.wake_r], [], [], timeout)
            while os.read(self.wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _dispatch_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
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
        """Reload: not implemented yet (issue 4); logged so the administrator knows."""
        log.warning("SIGHUP: configuration reload is not implemented yet; restart to apply")

    def handle_sigusr1(self) -> None:
        """Reopen logs: nothing to reopen while logging to stderr."""

    # -- children --------------------------------------------------------------------------

    def spawn(self, kind: str, slot: int) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = Child(kind, slot, time.monotonic())
            return
        code = 1
        try:
            code = self._child_main(kind, slot)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("%s %d crashed", kind, slot)
        finally:
            logging.shutdown()
            os._exit(code)

    def _child_main(self, kind: str, slot: int) -> int:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if kind == "delivery":
            for sock, _ in self.smtp_sockets:
                sock.close()
            setproctitle("mailerd: delivery")
            return delivery.run(self.cfg, self.delivery_socket)
        self.delivery_socket.close()
        return worker.run(self.cfg, self.smtp_sockets, slot)

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
                self._child_exited(pid, child, status)

    def _child_exited(self, pid: int, child: Child, status: int) -> None:
        key = (child.kind, child.slot)
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            return
        log.warning("%s %d (pid %d) exited with %s", child.kind, child.slot, pid, _describe(code))
        if code == BOOT_ERROR:
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

    def _stop_all(self) -> None:
        for sock, _ in self.smtp_sockets:
            sock.close()
        self._stop_kind("worker", STOP_WORKERS_TIMEOUT)
        self._stop_kind("delivery", STOP_DELIVERY_TIMEOUT)
        log.info("stopped")

    def _stop_kind(self, kind: str, timeout: float) -> None:
        pids = [pid for pid, child in self.children.items() if child.kind == kind]
        for pid in pids:
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
            self.signals.clear()
            self.reap()


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"status {code}"


def prepare(cfg: Config) -> tuple[list[tuple[socket.socket, ListenAddress]], socket.socket]:
    """Create the directories and bind every endpoint; OSError says what failed."""
    try:
        cfg.spool.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create spool {cfg.spool}: {exc.strerror}") from exc
    try:
        Queue(cfg.queue).create_dirs()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create queue {cfg.queue}: {exc.strerror}") from exc
    smtp_sockets = listeners.bind_all(cfg.listeners)
    delivery_socket = listeners.bind_unix(cfg.queue / "private" / "delivery.sock")
    return smtp_sockets, delivery_socket


def raise_fd_limit() -> None:
    """Thousands of idle sessions need thousands of descriptors: take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(cfg: Config) -> int:
    logsetup.setup(cfg.verbose)
    raise_fd_limit()
    try:
        smtp_sockets, delivery_socket = prepare(cfg)
    except OSError as exc:
        print(f"mailerd: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if cfg.pidfile is not None:
        cfg.pidfile.write_text(f"{os.getpid()}\n")
    try:
        return Master(cfg, smtp_sockets, delivery_socket).run()
    finally:
        if cfg.pidfile is not None:
            cfg.pidfile.unlink(missing_ok=True)

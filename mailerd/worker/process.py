"""A worker process: accepts on the inherited listeners and runs many SMTP sessions at once
(one `connection.Connection` each), with the session caps at connect (`admission`), and
commits finished messages: through the delivery process, or, when every recipient is local,
straight to the mailbox writer over the worker's own channel to it.

Start-up (`run`): reach the spool, `<queue>/tmp` and `<queue>/private` through directories
opened while still root (`privileges.keep_dir`), drop to the `-u` user, and only then start
the event loop and accept. The worker reports to the master (`ipc.reports`) when it accepts
("ready") or why it cannot start ("error"), which is what `mailerd` waits for before it
returns.

Signals: SIGTERM/SIGINT = shut down (idle sessions get 421 now, busy ones after their
transaction, all within SHUTDOWN_GRACE). SIGUSR2 = retire after a reload: stop accepting at
once, let every session end on its own (QUIT, its idle timeout), and only after the idle
timeout fall back to the shutdown path, so a reload drops no session. SIGUSR1 = reopen logs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from setproctitle import setproctitle

from mailerd import config, durable, eventloop, intake, lifecycle, privileges
from mailerd.config import Config, ListenAddress
from mailerd.credentials import RecentLogins
from mailerd.inbound.blocklists import Blocklists
from mailerd.inbound.lookups import Lookups
from mailerd.inbound.verifier import Verifier
from mailerd.ipc import reports
from mailerd.ipc.authfailures import AuthFailures
from mailerd.ipc.channel import Client
from mailerd.ipc.messages import Commit, Outcome, RetryLocal
from mailerd.ipc.sentcounts import SentCounts
from mailerd.ipc.sessiontable import SessionTable, counter
from mailerd.ipc.writer_client import WriterClient, WriterLink
from mailerd.lifecycle import BOOT_ERROR, COMMIT_TIMEOUT, SHUTDOWN_GRACE
from mailerd.smtp import Reply, Session, SessionConfig
from mailerd.spool import Spool
from mailerd.worker import admission
from mailerd.worker.connection import SHUTTING_DOWN, Connection
from mailerd.worker.logins import Logins
from mailerd.worker.reserve import Reserve
from mailerd.worker.sendlimit import SendLimit

log = logging.getLogger("mailerd.worker")


class Worker:
    def __init__(
        self,
        cfg: Config,
        listeners: list[tuple[socket.socket, ListenAddress]],
        slot: int,
        *,
        spool: Path | None = None,
        spill_dir: Path | None = None,
        private_dir: Path | None = None,
        sessions: SessionTable | None = None,
        session_row: int | None = None,
        auth_failures: AuthFailures | None = None,
        sent_counts: SentCounts | None = None,
    ) -> None:
        """`spool`, `spill_dir` and `private_dir` default to the configured paths; `run` passes
        the /proc/self/fd forms that keep working after the privilege drop."""
        self.cfg = cfg
        self.listeners = listeners
        self.slot = slot
        self.spill_dir = str(spill_dir or cfg.queue / "tmp")
        self.spool = Spool(spool or cfg.spool, untrusted_uid(cfg))
        self.session_configs = {listen: session_config(cfg, listen) for _, listen in listeners}
        self.reserve = Reserve(
            [("spool", str(spool or cfg.spool)), ("queue", self.spill_dir)], cfg.min_free
        )
        self.recent_logins = RecentLogins()  # (answered again without a check)
        # The inbound checks (SPF, DKIM, DMARC) of mail from the network listeners: made in
        # main(), with the event loop their DNS runs in; their libraries run in these threads.
        self.verifier: Verifier | None = None
        self.blocklists: Blocklists | None = None  # (--dnsbl: made in main() too)
        self.checks = ThreadPoolExecutor(4, thread_name_prefix="checks")
        # (Alone, without the master's shared table: it counts its own.)
        self.auth_failures = auth_failures or AuthFailures(
            64,
            cfg.ipv6_prefix_length,
            account_buckets=64,
            known_buckets=64,
            client_buckets=64,
            newcomer_buckets=64,
        )
        # Authenticated users' recipients at other domains, for --max-recipients-per-day
        # (alone, without the master's shared table: this worker's own).
        self.send_limit = SendLimit(
            sent_counts or SentCounts(64),
            cfg.max_recipients_per_day,
            cfg.locality,
        )
        # Password checks (argon2: CPU and 64 MiB each, on purpose) run in two threads, and
        # `logins` keeps a flood of AUTH attempts from queueing them without end.
        self.logins = Logins(
            ThreadPoolExecutor(2, thread_name_prefix="auth"),
            lambda login, password: cfg.credentials.verify(login, password, cfg.domains),
            self.auth_failures,
        )
        private = private_dir or cfg.queue / "private"
        self.delivery = Client(str(private / "delivery.sock"), COMMIT_TIMEOUT)
        self.writer = WriterLink(self.delivery)
        # The open sessions, each with what it counts under: its pool and client key.
        self.connections: dict[Connection, tuple[int, str | None]] = {}
        # Connections accepted whose connection_made (and so admit) has not run yet: asyncio
        # accepts, then makes the transport, then calls connection_made, a loop turn or more
        # apart. A retiring worker must wait for these too (see `_retire`). Weak: one whose
        # transport could not be made is forgotten with it.
        self.accepted: weakref.WeakSet[Connection] = weakref.WeakSet()
        # User database lookups for RCPT checks (see Connection.check_recipient): a couple of
        # threads, so a slow NSS server holds those sessions only.
        self.lookups = ThreadPoolExecutor(2, thread_name_prefix="nss")
        self.sessions = counter(sessions, session_row)  # shared with the other workers
        self.caps = admission.Caps.of(cfg)
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop  # set by main(): a worker serves inside its loop

    async def commit(self, request: Commit, body: bytes, fd: int | None) -> Reply:
        """Make a finished message durable; the reply for its client.

        A message whose recipients are all local goes straight to the mailbox writer over this
        worker's own channel; any other, or when that channel cannot be had, to the delivery
        process. Takes ownership of `fd`.
        """
        if request.all_local:
            try:
                writer = await self.writer.get()
            except Exception as exc:  # the delivery path still works, or answers 451
                log.debug("no mailbox writer channel (%r); committing through delivery", exc)
            else:
                return await self._commit_local(writer, request, body, fd)
        return await self._ask_delivery(request, body, fd)

    async def _commit_local(
        self, writer: WriterClient, request: Commit, body: bytes, fd: int | None
    ) -> Reply:
        """Write each local copy; the copies that failed go to the delivery process, which
        writes again those whose writer went away and queues the others (see `commit`)."""
        content: durable.Body = body if fd is None else fd
        since = time.time()
        try:
            queue_id, received = intake.begin(
                request, self.cfg.hostname, durable.body_size(content)
            )
            failed = await intake.write_local(
                writer.deliver, queue_id, request.sender, received, content, request.targets
            )
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if not failed:
            if fd is not None:
                os.close(fd)
            return intake.queued(queue_id)
        retry = RetryLocal(
            request, queue_id, received.decode("utf-8"), intake.encode_failures(failed), since
        )
        return await self._ask_delivery(retry, body, fd)

    async def _ask_delivery(
        self, request: Commit | RetryLocal, body: bytes, fd: int | None
    ) -> Reply:
        answer = await self.delivery.request(request.encode(), body, fd)
        return intake.reply_of(Outcome.decode(answer))

    def admit(self, conn: Connection) -> Reply | None:
        """The session caps at connect, over all workers (see `admission`): the total with the
        owner's reserves (a submission client that logged in lately has a part of its own),
        and per client on the network and submission listeners."""
        self.accepted.discard(conn)
        if self.stopping:
            return SHUTTING_DOWN
        pool = admission.pool_of(conn.listen)
        if pool == admission.SUBMISSION_POOL and self.auth_failures.known_client(conn.peer):
            pool = admission.KNOWN_POOL
        key = self.caps.counted_key(conn.listen, conn.peer)
        pool, refusal = self.caps.admit(self.sessions, pool, key)
        if refusal is not None:
            return Session.refuse(self.cfg.hostname, refusal)
        self.connections[conn] = (pool, key)
        self.sessions.opened(pool, key)
        return None

    def accept(self, listen: ListenAddress) -> Connection:
        """The protocol factory of a listener: a connection just accepted, counted from now."""
        conn = Connection(self, listen)
        self.accepted.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        self.accepted.discard(conn)  # (one gone before it began was never admitted)
        counted = self.connections.pop(conn, None)
        if counted is not None:
            self.sessions.closed(*counted)

    async def main(
        self,
        on_ready: Callable[[], None] | None = None,
        on_retired: Callable[[], None] | None = None,
    ) -> None:
        """Serve until told to stop. `on_ready` is called once the listeners accept,
        `on_retired` once they no longer do after a reload (the master waits for both before
        it calls a reload done)."""
        self.loop = asyncio.get_running_loop()
        self.verifier, self.blocklists = self._inbound()
        stop = asyncio.Event()
        retire = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        self.loop.add_signal_handler(signal.SIGUSR2, retire.set)
        if lifecycle.retire_requested():
            retire.set()
        if lifecycle.stop_requested():  # (SIGTERM while it started: see child_signals)
            stop.set()
        servers = [
            await self.loop.create_server(partial(self.accept, listen), sock=sock, backlog=4096)
            for sock, listen in self.listeners
        ]
        if on_ready is not None:
            on_ready()
        watchdog = asyncio.create_task(self._watch_master(stop))
        retiring = asyncio.create_task(self._retire(retire, stop, servers, on_retired))
        await stop.wait()
        watchdog.cancel()
        retiring.cancel()
        await self._shutdown(servers)

    def _inbound(self) -> tuple[Verifier | None, Blocklists | None]:
        """The network listeners' checks, each where configured: of a message (SPF, DKIM,
        DMARC) and of a client's address (--dnsbl), over one caching resolver. None of them
        (and no resolver) without a network listener."""
        cfg = self.cfg
        if not any(listen.role == config.NETWORK for _, listen in self.listeners):
            return None, None
        if cfg.inbound_auth == "off" and not cfg.dnsbl:
            return None, None
        dns = Lookups.make(cfg.dns_server, cfg.dns_timeout)
        verifier = None
        if cfg.inbound_auth != "off":
            enforce = cfg.inbound_auth == "enforce"
            verifier = Verifier(
                cfg.hostname, dns, self.loop, self.checks, timeout=cfg.dns_timeout, enforce=enforce
            )
        return verifier, Blocklists(cfg.dnsbl, dns) if cfg.dnsbl else None

    async def _retire(
        self,
        retire: asyncio.Event,
        stop: asyncio.Event,
        servers: Sequence[asyncio.AbstractServer],
        on_retired: Callable[[], None] | None = None,
    ) -> None:
        """After a reload: stop accepting now; exit when the last session has ended by itself.
        Once the idle timeout has passed, sessions between transactions are ended, and the
        others when their transaction is (a session kept busy forever must not keep an old
        generation alive forever); past --max-session-time, the shutdown path. A connection
        accepted just before the listeners closed counts although it is not a session yet:
        seeing none, the worker would stop, and that client would get 421 (or a closed
        connection)."""
        await retire.wait()
        setproctitle(f"mailerd: worker {self.slot} (retiring)")
        for server in servers:
            server.close()
        if on_retired is not None:
            on_retired()
        log.info("worker %d retiring: %d session(s) to finish", self.slot, self._sessions())
        deadline = self.loop.time() + self.cfg.timeout
        while self._sessions() and self.loop.time() < deadline:
            await asyncio.sleep(0.1)
        # The idle timeout has passed: the sessions between transactions get 421 now, and one in
        # the middle of a transaction (its message still arriving at a healthy rate) after its
        # end (`Connection.pump` closes a session that becomes idle once `stopping`), within
        # that session's own deadlines, --max-session-time at most. The shutdown path would cut
        # it SHUTDOWN_GRACE later, and the peer would send the whole message again: a 25 MB
        # upload takes longer than --timeout on a slow line, and certbot's hook reloads.
        self._end_idle_sessions()
        deadline = self.loop.time() + self.cfg.max_session_time
        while self._sessions() and self.loop.time() < deadline:
            await asyncio.sleep(0.1)
        stop.set()

    def _end_idle_sessions(self) -> None:
        """Sessions between transactions get 421 now; the others once their transaction ends
        (`Connection.pump`, seeing `stopping`)."""
        self.stopping = True
        for conn in list(self.connections):
            if conn.idle():
                conn.close([SHUTTING_DOWN.to_bytes()])

    def _sessions(self) -> int:
        """Sessions open, and connections accepted that are about to be."""
        return len(self.connections) + len(self.accepted)

    async def _watch_master(self, stop: asyncio.Event) -> None:
        """Exit when the master is gone (we were re-parented), rather than linger unsupervised."""
        parent = os.getppid()
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        stop.set()

    async def _shutdown(self, servers: Sequence[asyncio.AbstractServer]) -> None:
        """Stop accepting; idle sessions get 421 now, busy ones after their transaction."""
        for server in servers:
            server.close()
        self._end_idle_sessions()
        deadline = self.loop.time() + SHUTDOWN_GRACE
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if not conn.committing:
                conn.close([SHUTTING_DOWN.to_bytes()])
        while any(c.committing for c in self.connections) and self.loop.time() < deadline + 30:
            await asyncio.sleep(0.05)
        self.writer.close()
        self.delivery.close()
        self.lookups.shutdown(wait=False, cancel_futures=True)
        self.logins.shutdown()
        self.checks.shutdown(wait=False, cancel_futures=True)


def untrusted_uid(cfg: Config) -> int | None:
    """mailerd's own unprivileged user (-u), which never owns a mailbox; None when it runs as
    one user throughout (started without root)."""
    if cfg.user is None:
        return None
    try:
        return privileges.lookup(cfg.user).uid
    except privileges.PrivilegeError:
        return None


def session_config(cfg: Config, listen: ListenAddress) -> SessionConfig:
    """What a listener's sessions offer and require (see SessionConfig for the roles)."""
    certificate = cfg.tls_context is not None
    role = listen.role
    return SessionConfig(
        hostname=cfg.hostname,
        max_message_size=cfg.max_message_size,
        max_errors=cfg.max_errors,
        max_recipients=cfg.max_recipients,
        starttls=certificate and role != config.SUBMISSIONS,
        implicit_tls=role == config.SUBMISSIONS,
        # On the local listener only once someone has a password: it changes nothing there
        # (its clients may send anywhere anyway) but lets a mail program configured for AUTH
        # work unchanged against localhost.
        auth=role in (config.SUBMISSION, config.SUBMISSIONS)
        or (role == config.LOCAL and len(cfg.credentials) > 0),
        # In clear on a loopback address only: a trusted listener on a LAN address must not
        # take passwords over the wire unencrypted.
        auth_in_clear=role == config.LOCAL and ipaddress.ip_address(listen.host).is_loopback,
        tls_required=role == config.SUBMISSION or (role == config.NETWORK and cfg.tls_required),
        auth_required=role in (config.SUBMISSION, config.SUBMISSIONS),
        qualify_domain=cfg.domains[0] if role == config.LOCAL else "",
    )


def run(
    cfg: Config,
    listeners: list[tuple[socket.socket, ListenAddress]],
    slot: int,
    *,
    user: str | None = None,
    reports_fd: int | None = None,
    sessions: SessionTable | None = None,
    session_row: int | None = None,
    auth_failures: AuthFailures | None = None,
    sent_counts: SentCounts | None = None,
) -> int:
    """Entry point of a forked worker process (still root when the master is)."""
    setproctitle(f"mailerd: worker {slot}")
    try:
        spool = privileges.keep_dir(cfg.spool)
        spill_dir = privileges.keep_dir(cfg.queue / "tmp")
        private_dir = privileges.keep_dir(cfg.queue / "private")
        privileges.drop(user)
    except (OSError, privileges.PrivilegeError) as exc:
        message = f"worker {slot} cannot start: {exc}"
        log.error("%s", message)
        reports.tell(reports_fd, f"error {message}")
        return BOOT_ERROR
    worker = Worker(
        cfg,
        listeners,
        slot,
        spool=spool,
        spill_dir=spill_dir,
        private_dir=private_dir,
        sessions=sessions,
        session_row=session_row,
        auth_failures=auth_failures,
        sent_counts=sent_counts,
    )
    eventloop.run(
        worker.main(
            on_ready=lambda: reports.tell(reports_fd, "ready"),
            on_retired=lambda: reports.tell(reports_fd, "retired"),
        )
    )
    return 0

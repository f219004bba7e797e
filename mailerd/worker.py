"""A worker process: accepts on the inherited listeners and runs many SMTP sessions at once.

Each connection is an asyncio Protocol that moves bytes between the socket and a sans-I/O
`smtp.Session`; the only decisions made here are the ones that need I/O or a clock: session caps
at connect, the idle timeout, whether a local mailbox exists, and committing a finished message
(the 250 is sent only once it is durable): through the delivery process, or, when every
recipient is local, straight to the mailbox writer over the worker's own channel to it.

Start-up (`run`): reach the spool, `<queue>/tmp` and `<queue>/private` through directories
opened while still root (`privileges.keep_dir`), drop to the `-u` user, and only then start
the event loop and accept. The worker tells the master on its status pipe when it accepts
("ready") or why it cannot start ("error"), which is what `mailerd` waits for before it returns.

Signals: SIGTERM/SIGINT = shut down (idle sessions get 421 now, busy ones after their
transaction, all within SHUTDOWN_GRACE). SIGUSR2 = retire after a reload: stop accepting at
once, let every session end on its own (QUIT, its idle timeout), and only after the idle
timeout fall back to the shutdown path, so a reload drops no session. SIGUSR1 = reopen logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from setproctitle import setproctitle

from mailerd import commit, durable, eventloop, privileges, recipients
from mailerd.config import Config, ListenAddress
from mailerd.ipc.channel import MAX_INLINE, Client
from mailerd.ipc.sessiontable import SessionTable, counter
from mailerd.ipc.writer_client import WriterClient, WriterLink
from mailerd.smtp import (
    NEED_DATA,
    PAUSED,
    Address,
    BodyData,
    CloseConnection,
    Envelope,
    MessageAborted,
    MessageComplete,
    Rejected,
    Reply,
    Session,
    SessionConfig,
)
from mailerd.spool import Spool

log = logging.getLogger("mailerd.worker")

COMMIT_TIMEOUT = 120.0  # well below the client's 10 min wait for the final reply (RFC 5321 4.5.3.2)
SHUTDOWN_GRACE = 10.0
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later", close=True)
INTERNAL_ERROR = Reply(421, "4.3.0", "Internal error, closing connection", close=True)
COMMIT_FAILED = Reply(451, "4.3.0", "Local error in processing; try again later")
BOOT_ERROR = 3  # exit status of a child that cannot work at all: the master stops, not respawns
LOG_LINE_MAX = 200  # -v dialogue: longer command lines and replies are cut
MAX_ROUTES = 1000  # remembered recipient routes per session (a transaction has at most 100)

_retire_requested = False


def request_retire(*_: object) -> None:
    """SIGUSR2 before the event loop runs: remembered, acted on once it does."""
    global _retire_requested
    _retire_requested = True


def _line(reply: Reply) -> str:
    """A reply on one line, for the log."""
    text = reply.text.replace("\n", " ")
    return _shorten(" ".join(str(part) for part in (reply.code, reply.status, text) if part))


def _sender_of(event: Rejected) -> str | None:
    """The from= of a refusal: the address MAIL asked for, or the transaction's."""
    return event.path if event.verb == "MAIL" else event.sender


def _shorten(text: str) -> str:
    """Cut to LOG_LINE_MAX and escape control characters (no forged log lines, no escapes)."""
    cut = text if len(text) <= LOG_LINE_MAX else text[:LOG_LINE_MAX] + "..."
    if cut.isprintable():
        return cut
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in cut)


class BodyBuffer:
    """The message body in transit: in memory while small, then an unlinked temp file."""

    def __init__(self, spill_dir: str) -> None:
        self._spill_dir = spill_dir
        self._memory = bytearray()
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        if self._fd is None and len(self._memory) + len(data) <= MAX_INLINE:
            self._memory += data
            return
        if self._fd is None:
            self._fd = os.open(self._spill_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            self._write(bytes(self._memory))
            self._memory = bytearray()
        self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]

    def take(self) -> tuple[bytes, int | None]:
        """Hand over the body (bytes, or a descriptor the caller now owns) and reset."""
        body, fd = bytes(self._memory), self._fd
        self._memory, self._fd = bytearray(), None
        return body, fd

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._memory, self._fd = bytearray(), None


class Connection(asyncio.Protocol):
    """One SMTP session: socket bytes ↔ Session events."""

    def __init__(self, worker: Worker, listen: ListenAddress) -> None:
        self.worker = worker
        self.listen = listen
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self.client = "?"  # [ip]:port, what the log calls this connection
        self.body = BodyBuffer(worker.spill_dir)
        self.committing = False
        self.write_paused = False
        self.closing = False
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        # Accepted recipients' copies: resolved once, at RCPT, for commit_header().
        self.routes: dict[Address, tuple[recipients.Target, ...]] = {}

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "?"
        self.client = f"[{peer[0]}]:{peer[1]}" if peer else "?"
        refusal = self.worker.admit(self)
        if refusal is not None:
            log.info("NOQUEUE: reject: CONNECT from unknown[%s]: %s", self.peer, _line(refusal))
            transport.write(refusal.to_bytes())  # type: ignore[attr-defined]
            transport.close()
            return
        log.info("connect from %s on %s", self.client, self.listen)
        on_command = self.log_command if self.worker.cfg.verbose else None
        self.session = Session(self.worker.session_config, self.check_recipient, on_command)
        self.last_activity = self.worker.loop.time()
        self.timer = self.worker.loop.call_later(self.worker.cfg.timeout, self.check_timeout)
        self.pump()

    def log_command(self, line: bytes) -> None:
        """-v: each command line at DEBUG (the session never passes message content here)."""
        log.debug("%s < %s", self.client, _shorten(line.decode("utf-8", "backslashreplace")))

    def data_received(self, data: bytes) -> None:
        if self.session is None or self.closing:
            return
        self.last_activity = self.worker.loop.time()
        self.session.receive_data(data)
        try:
            self.pump()
        except Exception:
            # A bug must cost this one session, with a reply and a log line, not go unnoticed.
            log.exception("internal error in the session with %s", self.client)
            self.close([INTERNAL_ERROR.to_bytes()])

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its commands until it does
        (otherwise a client pipelining NOOPs forever grows our reply buffer without limit)."""
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()
            self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closing and not self.committing:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.session is not None and not self.closing:
            self.session.receive_data(b"")
            self.pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if not self.committing:
            self.body.discard()
        if self.session is not None:
            log.info("disconnect from %s", self.client)
        self.worker.release(self)

    # -- session driving -------------------------------------------------------------

    def pump(self) -> None:
        """Run the session until it needs input or waits on a commit; send what it said."""
        assert self.session is not None and self.transport is not None
        out = []
        while True:
            event = self.session.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                self.transport.pause_reading()
                break
            if isinstance(event, Reply):
                if self.worker.cfg.verbose:
                    self.log_reply(event)
                out.append(event.to_bytes())
            elif isinstance(event, BodyData):
                self.body.write(event.data)
            elif isinstance(event, MessageComplete):
                self.committing = True
                # (The loop's own create_task: asyncio.create_task() costs a getpid() call.)
                self.worker.loop.create_task(self.commit(event.envelope))
            elif isinstance(event, MessageAborted):
                self.body.discard()
            elif isinstance(event, Rejected):
                self.log_rejected(event)
            elif isinstance(event, CloseConnection):
                self.close(out)
                return
        if out:
            self.transport.write(b"".join(out))
        if self.worker.stopping and self.idle():
            self.close([SHUTTING_DOWN.to_bytes()])

    def log_rejected(self, event: Rejected) -> None:
        """One line per refused or deferred mail command, in Postfix's words (fail2ban's
        filter in etc/fail2ban reads them)."""
        self.log_reject(event.verb, event.reply, _sender_of(event), event.esmtp, event.helo, event)

    def log_reject(
        self,
        verb: str,
        reply: Reply,
        sender: str | None,
        esmtp: bool,
        helo: str | None,
        event: Rejected | None = None,
    ) -> None:
        fields = [] if sender is None else [f"from=<{sender}>"]
        if event is not None and event.verb == "RCPT" and event.path is not None:
            fields.append(f"to=<{event.path}>")
        fields.append("proto=ESMTP" if esmtp else "proto=SMTP")
        if helo:
            fields.append(f"helo=<{helo}>")
        log.info(
            "NOQUEUE: reject: %s from unknown[%s]: %s; %s",
            _shorten(verb) or "command",
            self.peer,
            _line(reply),
            _shorten(" ".join(fields)),
        )

    def log_reply(self, reply: Reply) -> None:
        text = reply.to_bytes().decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", " | ")
        log.debug("%s > %s", self.client, _shorten(text))

    def close(self, out: list[bytes]) -> None:
        if self.closing:
            return
        self.closing = True
        if self.transport is not None:
            if out:
                self.transport.write(b"".join(out))
            self.transport.close()

    def idle(self) -> bool:
        """Between transactions: safe to say 421 and go without losing anything in progress."""
        return self.session is not None and not self.committing and self.session.idle

    async def commit(self, envelope: Envelope) -> None:
        body, fd = self.body.take()
        try:
            reply = await self.worker.commit(self.commit_header(envelope), body, fd)
        except Exception as exc:  # timeout, broken channel: 451, never a 250 we cannot back
            log.warning(
                "commit for %s failed, answered 451 (the client will retry): %r", self.client, exc
            )
            reply = COMMIT_FAILED
        if reply.code >= 400:  # a deferral: logged like a refusal
            sender = str(envelope.sender) if envelope.sender else ""
            verb = "BDAT" if envelope.chunked else "DATA"
            self.log_reject(verb, reply, sender, envelope.esmtp, envelope.helo)
        self.committing = False
        if self.closing or self.session is None:
            return
        self.session.commit_done(reply)
        if not self.write_paused:
            self.transport.resume_reading()  # type: ignore[union-attr]
        self.last_activity = self.worker.loop.time()
        self.pump()

    def commit_header(self, envelope: Envelope) -> dict[str, Any]:
        copies = []
        for address in envelope.recipients:
            targets = self.routes.get(address)
            if targets is None:  # (forgotten after MAX_ROUTES)
                targets = self.resolve(address).targets
            copies += [{"address": t.address, "mailbox": t.mailbox} for t in targets]
        self.routes.clear()
        protocol = "UTF8SMTP" if envelope.smtputf8 else ("ESMTP" if envelope.esmtp else "SMTP")
        return {
            "sender": str(envelope.sender) if envelope.sender else "",
            "recipients": copies,
            "helo": envelope.helo,
            "peer": self.peer,
            "protocol": protocol,
            "body": envelope.body,
            "smtputf8": envelope.smtputf8,
            "trusted": self.listen.trusted,
        }

    def resolve(self, address: Address) -> recipients.Resolved:
        cfg = self.worker.cfg
        return recipients.resolve(
            address,
            trusted=self.listen.trusted,
            local_domains=cfg.domains,
            aliases=cfg.aliases,
            spool=self.worker.spool,
            spool_path=str(cfg.spool),
        )

    def check_recipient(self, address: Address) -> Reply | None:
        resolved = self.resolve(address)
        if resolved.refusal is not None:
            return resolved.refusal
        if len(self.routes) >= MAX_ROUTES:  # transactions reset without a message
            self.routes.clear()
        self.routes[address] = resolved.targets  # for commit_header(), so resolved once
        return None

    def check_timeout(self) -> None:
        if self.closing or self.session is None:
            return
        loop = self.worker.loop
        remaining = self.last_activity + self.worker.cfg.timeout - loop.time()
        if self.committing or remaining > 0:
            self.timer = loop.call_later(max(remaining, 1.0), self.check_timeout)
            return
        log.info("timeout for %s", self.client)
        self.close([self.session.timeout().to_bytes()])


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
    ) -> None:
        """`spool`, `spill_dir` and `private_dir` default to the configured paths; `run` passes
        the /proc/self/fd forms that keep working after the privilege drop."""
        self.cfg = cfg
        self.listeners = listeners
        self.slot = slot
        self.spill_dir = str(spill_dir or cfg.queue / "tmp")
        self.spool = Spool(spool or cfg.spool)
        self.session_config = SessionConfig(
            hostname=cfg.hostname,
            max_message_size=cfg.max_message_size,
            max_errors=cfg.max_errors,
        )
        private = private_dir or cfg.queue / "private"
        self.delivery = Client(str(private / "delivery.sock"), COMMIT_TIMEOUT)
        self.writer = WriterLink(self.delivery)
        self.connections: set[Connection] = set()
        self.sessions = counter(sessions, session_row)  # shared with the other workers
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]

    async def commit(self, header: dict[str, Any], body: bytes, fd: int | None) -> Reply:
        """Make a finished message durable; the reply for its client.

        A message whose recipients are all local goes straight to the mailbox writer over this
        worker's own channel; any other, or when that channel cannot be had, to the delivery
        process. Takes ownership of `fd`.
        """
        if commit.all_local(header):
            try:
                writer = await self.writer.get()
            except Exception as exc:  # the delivery path still works, or answers 451
                log.debug("no mailbox writer channel (%r); committing through delivery", exc)
            else:
                return await self._commit_local(writer, header, body, fd)
        return commit.answer_reply(await self.delivery.request(header, body, fd))

    async def _commit_local(
        self, writer: WriterClient, header: dict[str, Any], body: bytes, fd: int | None
    ) -> Reply:
        """Write each local copy; the copies that failed are queued for a local retry by the
        delivery process (see `commit`)."""
        content: durable.Body = body if fd is None else fd
        try:
            queue_id, received = commit.begin(header, self.cfg.hostname, commit.body_size(content))
            failed = await commit.write_local(
                writer.deliver, queue_id, header["sender"], received, content, header["recipients"]
            )
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if not failed:
            if fd is not None:
                os.close(fd)
            return commit.queued(queue_id)
        retry = {
            **header,
            "op": "retry-local",
            "queue_id": queue_id,
            "received": received.decode("utf-8"),
            "failed": commit.encode_failures(failed),
        }
        return commit.answer_reply(await self.delivery.request(retry, body, fd))

    def admit(self, conn: Connection) -> Reply | None:
        """Session caps at connect, over all workers: the total, and per client address on
        untrusted listeners."""
        if self.stopping:
            return SHUTTING_DOWN
        if self.sessions.total() >= self.cfg.max_sessions:
            return Session.refuse(self.cfg.hostname, "Too many connections, try again later")
        counted = None if conn.listen.trusted else conn.peer
        if (
            counted is not None
            and self.sessions.for_address(counted) >= self.cfg.max_sessions_per_ip
        ):
            return Session.refuse(self.cfg.hostname, "Too many connections from your address")
        self.connections.add(conn)
        self.sessions.opened(counted)
        return None

    def release(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.sessions.closed(None if conn.listen.trusted else conn.peer)

    async def main(self, on_ready: Callable[[], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        retire = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, stop.set)
        self.loop.add_signal_handler(signal.SIGUSR2, retire.set)
        if _retire_requested:
            retire.set()
        servers = [
            await self.loop.create_server(
                lambda listen=listen: Connection(self, listen), sock=sock, backlog=4096
            )
            for sock, listen in self.listeners
        ]
        if on_ready is not None:
            on_ready()
        watchdog = asyncio.create_task(self._watch_master(stop))
        retiring = asyncio.create_task(self._retire(retire, stop, servers))
        await stop.wait()
        watchdog.cancel()
        retiring.cancel()
        await self._shutdown(servers)

    async def _retire(
        self, retire: asyncio.Event, stop: asyncio.Event, servers: list[asyncio.AbstractServer]
    ) -> None:
        """After a reload: stop accepting now; exit when the last session has ended by itself,
        or take the shutdown path once the idle timeout has passed (a session kept busy
        forever must not keep an old generation alive forever)."""
        await retire.wait()
        setproctitle(f"mailerd: worker {self.slot} (retiring)")
        for server in servers:
            server.close()
        log.info("worker %d retiring: %d session(s) to finish", self.slot, len(self.connections))
        deadline = self.loop.time() + self.cfg.timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.1)
        stop.set()

    async def _watch_master(self, stop: asyncio.Event) -> None:
        """Exit when the master is gone (we were re-parented), rather than linger unsupervised."""
        parent = os.getppid()
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        stop.set()

    async def _shutdown(self, servers: list[asyncio.AbstractServer]) -> None:
        """Stop accepting; idle sessions get 421 now, busy ones after their transaction."""
        self.stopping = True
        for server in servers:
            server.close()
        for conn in list(self.connections):
            if conn.idle():
                conn.close([SHUTTING_DOWN.to_bytes()])
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


def run(
    cfg: Config,
    listeners: list[tuple[socket.socket, ListenAddress]],
    slot: int,
    *,
    user: str | None = None,
    status_fd: int | None = None,
    sessions: SessionTable | None = None,
    session_row: int | None = None,
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
        report(status_fd, f"error {message}")
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
    )
    eventloop.run(worker.main(on_ready=lambda: report(status_fd, "ready")))
    return 0


def report(status_fd: int | None, text: str) -> None:
    """One line to the master's status pipe ("ready" or "error ..."); atomic below PIPE_BUF."""
    if status_fd is None:
        return
    line = f"{os.getpid()} {text}".replace("\n", " ")[:1000] + "\n"
    with contextlib.suppress(OSError):  # the master is gone: nothing to tell
        os.write(status_fd, line.encode("utf-8", "replace"))

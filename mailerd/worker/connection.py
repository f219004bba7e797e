"""One SMTP connection: bytes between the socket and a sans-I/O `smtp.Session`, and the
decisions that need I/O or a clock: the deadlines (below), whether a recipient's mailbox exists
(`recipients`), an authenticated user's daily limit of remote recipients (`sendlimit`), the
TLS handshake after STARTTLS, the password check of AUTH (in a thread, answered late after
failures), whose sender addresses an authenticated user may use, and the commit of a finished
message (the 250 only once it is durable). Every refused mail command and
failed AUTH is logged here, in Postfix's words, and with -v the dialogue (never a password).

**Deadlines** (`deadlines`: a command's, the message content's, the session's): one timer per
session checks them, at least once per --timeout, and each ends the session with its own
421 4.4.2 and log line. While the session waits on us (a
commit, a check, a password) the client is not late.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import select
import socket
import ssl
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from mailerd import durable, headers, idn, policy, recipients, tls
from mailerd.config import NETWORK, ListenAddress
from mailerd.inbound import blocklists, dmarc
from mailerd.inbound.verifier import HEADER_TOO_LARGE, unchecked, unscannable
from mailerd.ipc.messages import Commit, Target
from mailerd.log import Throttle, shorten
from mailerd.smtp import (
    NEED_DATA,
    PAUSED,
    PENDING,
    Address,
    AuthRequest,
    BodyData,
    CloseConnection,
    Envelope,
    MessageAborted,
    MessageComplete,
    RecipientVerdict,
    Rejected,
    Reply,
    Session,
    StartTLS,
)
from mailerd.spool import LookupNeeded
from mailerd.worker.body import BodyBuffer
from mailerd.worker.deadlines import Deadlines, Expired
from mailerd.worker.logins import Outcome, Unchecked
from mailerd.worker.tlslayer import TLSLayer

if TYPE_CHECKING:
    from mailerd.worker.process import Worker

log = logging.getLogger("mailerd.worker")

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later", close=True)
INTERNAL_ERROR = Reply(421, "4.3.0", "Internal error, closing connection", close=True)
COMMIT_FAILED = Reply(451, "4.3.0", "Local error in processing; try again later")
MAX_ROUTES = 1000  # remembered recipient routes per session (a transaction has at most 100)
_FAILED_CHECKS = Throttle(60.0)  # a recipient check's bug: its traceback once a minute
# Seconds a closed connection may take to send what is left of our replies (at most the
# command timeout): a client that reads nothing would otherwise keep it, and its place, for ever.
CLOSE_LINGER = 10.0
# Replies one session may give in one turn of the event loop: a client pipelining commands
# faster than they are answered (256 KB of NOOP is 43,000 of them) waits for the next turn,
# reading paused, so that the other sessions of its worker get theirs. A transaction of 100
# recipients pipelined whole (MAIL, the RCPTs, DATA) takes one turn.
TURN_REPLIES = 128
# A read of this many octets or more (one is up to 256 KB) ends its session's turn: uvloop
# reads a readable socket up to 32 times a wakeup, and a client streaming message content held
# its worker for all of them, 8 MB of checking, even content that is only discarded (an
# attacker's pass, /tmp/atk8 F1: the owner's transaction took 7 s).
TURN_INPUT = 64 * 1024
# Octets read from the socket at a time: in clear, as many as uvloop reads by itself; in TLS,
# a record's worth, and a read that fills it ends the turn too. What a TLS read costs is not
# its plaintext's: records of one octet of content each, or KeyUpdates that carry none, came
# 256 KB to a read (11,000 records, or 9,700 key updates and 165 ms of CPU) and 32 reads to a
# wakeup, and one such client a worker held the others' replies for seconds (an attacker's
# pass at the TLS layer: a clear EHLO took 1 s, a STARTTLS session 3 s).
READ_SIZE = 256 * 1024
TLS_READ_SIZE = 16 * 1024
_READ_BUFFER = memoryview(bytearray(READ_SIZE))  # (one a worker: each read is copied out at once)


class Connection(asyncio.BufferedProtocol):
    """One SMTP session: socket bytes ↔ Session events."""

    def __init__(self, worker: Worker, listen: ListenAddress) -> None:
        self.worker = worker
        self.listen = listen
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.peer = "?"
        self.client = "?"  # [ip]:port, what the log calls this connection (once made)
        self.body = BodyBuffer(worker.spill_dir)
        self.committing = False
        self.write_paused = False
        self.closing = False
        self.deadlines: Deadlines | None = None  # (loop time; once the session begins)
        self.timer: asyncio.TimerHandle | None = None
        self.layer: TLSLayer | None = None  # TLS, once STARTTLS or implicit TLS began it
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | None = None  # (once closed: see shut)
        self.turn: asyncio.Handle | None = None  # the rest of a turn cut short (see pump)
        self.more = False  # the last pump stopped for its budget, not for want of input
        self.released = False
        self.tls = ""  # the session's TLS as Received: shows it (tls.describe), once on
        # Accepted recipients' copies: resolved once, at RCPT, for commit_request().
        self.routes: dict[Address, tuple[Target, ...]] = {}
        # The --dnsbl lookup of a network client, begun at its connect, awaited at RCPT.
        self.listing: asyncio.Task[str | None] | None = None

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's protocol is given a stream transport (uvloop's does not derive from
        # asyncio.Transport, so this is a cast, not an isinstance check).
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if not peer:
            # Reset by its client before this worker took it up: the kernel forgets the peer's
            # address with the reset, so there is no one to count, answer or log it by.
            log.info("a connection on %s was reset by its client before it began", self.listen)
            self.transport.close()
            return
        # Admitted (or not) at accept, before any handshake: a connection that never finishes
        # one holds its place under the caps meanwhile, like any other.
        refusal = self.admit(peer)
        if refusal is not None:
            if not self.listen.implicit_tls:  # (no 421 in clear where TLS is expected)
                self.transport.write(refusal.to_bytes())
            self.transport.close()
            return
        if self.listen.implicit_tls:
            self.start_handshake()  # (the session begins once it is done: `tls_established`)
            return
        self.begin()

    def admit(self, peer: tuple[str, int]) -> Reply | None:
        """Count the session against the caps (`Worker.admit`); else the refusal, logged."""
        self.peer = peer[0]
        self.client = f"[{peer[0]}]:{peer[1]}"
        refusal = self.worker.admit(self)
        if refusal is not None:
            log.info("NOQUEUE: reject: CONNECT from unknown[%s]: %s", self.peer, _line(refusal))
        return refusal

    def begin(self) -> None:
        """The session starts: the log line, the banner."""
        log.info(
            "connect from %s on %s%s",
            self.client,
            self.listen,
            f" ({self.tls})" if self.tls else "",
        )
        on_command = self.log_command if self.worker.cfg.verbose else None
        self.session = Session(
            self.worker.session_configs[self.listen],
            self.check_recipient,
            on_command,
            self.check_mail,
        )
        loop, cfg = self.worker.loop, self.worker.cfg
        self.deadlines = Deadlines(
            cfg.timeout, cfg.max_session_time, cfg.min_data_rate, loop.time()
        )
        self.timer = loop.call_later(min(cfg.timeout, cfg.max_session_time), self.check_timeout)
        zones = self.worker.blocklists
        if zones is not None and self.listen.role == NETWORK:
            self.listing = loop.create_task(zones.listing(self.peer))
        self.pump()

    def log_command(self, line: bytes) -> None:
        """-v: each command line at DEBUG (the session never passes message content here)."""
        log.debug("%s < %s", self.client, shorten(line.decode("utf-8", "backslashreplace")))

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER if self.layer is None else _READ_BUFFER[:TLS_READ_SIZE]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_BUFFER[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.received(data)
        except Exception:
            # A bug must cost this one session, with a reply and a log line, not go unnoticed.
            log.exception("internal error in the session with %s", self.client)
            self.close([INTERNAL_ERROR.to_bytes()])

    def received(self, data: bytes) -> None:
        """The client's bytes (in TLS, decrypted first) to the session, and its answers out."""
        read = len(data)  # (the turn is charged for what was read, not for the plaintext)
        ended = False
        if self.layer is not None:
            try:
                data, ended = self.layer.receive(data, self.tls_established)
            except (ssl.SSLError, OSError) as exc:
                self.tls_failed(exc)
                return
        if self.session is not None and data:
            self.session.receive_data(data)
            if not ended:
                self.pump()
        turn = TURN_INPUT if self.layer is None else TLS_READ_SIZE
        if ended:  # (the client's close_notify, perhaps behind its last command)
            self.eof_received()
        elif read >= turn and self.session is not None and not self.closing:
            self.yield_turn()

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its commands until it does
        (otherwise a client pipelining NOOPs forever grows our reply buffer without limit)."""
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()
            self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.closing and not self.committing:
            if self.more:  # (commands it sent are still to be answered: on with them)
                self.resume()
            else:
                self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.handshaking:
            self.tls_failed(EOFError("the client closed the connection"))
        elif self.session is not None and not self.closing:
            self.session.receive_data(b"")
            self.pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.released:
            return
        if self.handshaking:  # (a reset: an end of file is told in eof_received)
            self.tls_failed(exc or ConnectionAbortedError("the connection was lost"))
        self.released = True
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
        if self.linger is not None:
            self.linger.cancel()
        if self.turn is not None:
            self.turn.cancel()
        if self.listing is not None:
            self.listing.cancel()
        if not self.committing:
            self.body.discard()
        if self.session is not None:
            log.info("disconnect from %s", self.client)
        self.worker.release(self)

    # -- session driving -------------------------------------------------------------

    def pump(self) -> None:
        """Run the session until it needs input or waits on a commit, or until it has given
        TURN_REPLIES replies (the rest in a later turn: `next_turn`); send what it said."""
        assert self.session is not None and self.transport is not None
        out = []
        progressed = False  # a command (or the content) was answered: a new stage's clock
        budget = TURN_REPLIES
        self.more = False
        while True:
            if budget <= 0:
                self.yield_turn()
                break
            event = self.session.next_event()
            if event is NEED_DATA:
                break
            if event is PAUSED:
                if not self.handshaking:  # (the handshake's bytes are read meanwhile)
                    self.transport.pause_reading()
                break
            progressed = True
            if isinstance(event, Reply):
                budget -= 1
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
            elif isinstance(event, StartTLS):
                # The 220 goes out in clear first; every byte read after it is TLS.
                self.transport.write(b"".join(out))
                out.clear()
                self.start_tls(event.discarded)
            elif isinstance(event, AuthRequest):
                if not self.for_itself(event):
                    self.refuse_login(event)
                elif self.worker.logins.suspect(self.peer) or not self.remembered_login(event):
                    self.check_login(event)
            elif isinstance(event, CloseConnection):
                self.close(out)
                return
        if out:
            self.transport.write(b"".join(out))
        assert self.deadlines is not None
        self.deadlines.restart(
            self.worker.loop.time(),
            content=self.session.reading_content,
            mid_command=self.session.mid_command,
            progressed=progressed,
        )
        if self.worker.stopping and self.idle():
            self.close([SHUTTING_DOWN.to_bytes()])

    def yield_turn(self) -> None:
        """Stop reading and let the other sessions have the event loop; what the client has
        already sent is answered in the next turn (an attacker's pass, /tmp/atk7a F3: a few
        clients pipelining NOOPs held a worker for seconds at a time, and the owner's own
        session on it waited minutes for a reply)."""
        assert self.transport is not None
        self.more = True
        self.transport.pause_reading()
        if self.turn is None:
            self.turn = self.worker.loop.call_soon(self.next_turn)

    def next_turn(self) -> None:
        """Go on with a session whose turn was cut short, unless it now waits on us (a commit
        resumes it) or on its client reading our replies (`resume_writing` does)."""
        self.turn = None
        if self.closing or self.session is None or self.committing or self.write_paused:
            return
        self.resume()

    @property
    def handshaking(self) -> bool:
        """Between STARTTLS's 220 (or an implicit-TLS accept) and the end of the handshake."""
        return self.layer is not None and self.layer.handshaking

    def start_tls(self, discarded: int) -> None:
        """STARTTLS was answered: the handshake begins. The session forgot what the client
        sent in clear behind the command (RFC 3207 4.2; NO STARTTLS, CVE-2011-0411); it says
        how much, logged here."""
        if discarded:
            log.warning(
                "%s: discarded %d bytes pipelined after STARTTLS (sent before the TLS "
                "handshake: not allowed by RFC 3207, perhaps injected)",
                self.client,
                discarded,
            )
        self.start_handshake()

    def start_handshake(self) -> None:
        """The server side of a TLS handshake on this connection (`TLSLayer`), within the
        handshake timeout: `tls_established` or `tls_failed` follows."""
        assert self.transport is not None
        context = self.worker.cfg.tls_context
        assert context is not None  # (TLS is offered only with a certificate)
        self.layer = TLSLayer(self.transport, context)
        self.transport = cast(asyncio.Transport, self.layer)
        self.handshake_timer = self.worker.loop.call_later(
            tls.HANDSHAKE_TIMEOUT, self.tls_failed, TimeoutError()
        )

    def tls_established(self) -> None:
        """(From `TLSLayer.receive`.) The handshake is done: the session starts over, or,
        with implicit TLS, begins."""
        assert self.layer is not None
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
        self.tls = tls.describe(self.layer.ssl_object) or ""
        if self.session is None:
            self.begin()
            return
        log.info("%s: STARTTLS: %s", self.client, self.tls)
        self.session.tls_started()
        self.pump()  # (the command clock starts now: the handshake was not the client's turn)

    def tls_failed(self, exc: BaseException) -> None:
        """The handshake failed or timed out, or a record was bad: logged, and the connection
        closed (the alert that says why is already sent: `TLSLayer`)."""
        if self.closing:
            return
        what = "TLS handshake with %s failed: %s" if self.handshaking else "TLS error with %s: %s"
        log.info(what, self.client, _reason(exc))
        self.closing = True
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
        self.shut()

    def for_itself(self, request: AuthRequest) -> bool:
        """Does the login ask to act as its own user (no authorization identity, or one naming
        the same user: `alice@example.org` for `alice`)?"""
        if not request.authzid:
            return True
        cfg = self.worker.cfg
        user = cfg.credentials.user_for(request.login, cfg.domains)
        return user is not None and cfg.credentials.user_for(request.authzid, cfg.domains) == user

    def refuse_login(self, request: AuthRequest) -> None:
        """A login that asks to act for another user: refused unchecked, as a wrong password
        is (after the address's delay, counted, logged), or at once where a login would not
        be looked at (454, not counted: `Logins.barred`)."""
        worker = self.worker
        barred = worker.logins.barred(self.peer, request.login)
        if barred is not None:
            self.login_checked(request, None, unavailable=True, why=barred.value)
            return
        refused: asyncio.Future[Outcome] = worker.loop.create_future()
        refused.set_result(None)
        why = f"authorization identity {shorten(request.authzid)} is not this login's user"
        worker.loop.create_task(self.authenticate(request, refused, why=why))

    def remembered_login(self, request: AuthRequest) -> bool:
        """A login that passed a moment ago passes again at once, here (no thread, no task:
        a mail program that logs in for every message meets this most)."""
        worker = self.worker
        user = worker.recent_logins.get(request.login, request.password, worker.loop.time())
        if user is None:
            return False
        # (a success as any: its address becomes known, for the account's lockout and for the
        # submission places kept for known clients; an attacker's pass found it was not)
        worker.auth_failures.succeeded(self.peer, request.login)
        self.login_checked(request, user, unavailable=False)
        return True

    def check_login(self, request: AuthRequest) -> None:
        """Have the password checked (`logins`), or say at once why it is not (454)."""
        worker = self.worker
        verdict = worker.logins.start(self.peer, request.login, request.password, self.gone)
        if isinstance(verdict, Unchecked):
            self.login_checked(request, None, unavailable=True, why=verdict.value)
            return
        worker.loop.create_task(self.authenticate(request, verdict))

    def gone(self) -> bool:
        """(From a check thread.) Has the client left: reset its connection, or, in TLS,
        closed its side? Reading is paused while its AUTH waits, so the event loop would not
        have seen it: a look at the socket does. A plain-text end of file is not taken for
        gone: a client may half-close after QUIT and still read its answers. In TLS it is,
        even behind unread bytes (a close_notify: RFC 8446 6.1 has a client send one before it
        closes, and no mail client half-closes TLS to wait for an answer)."""
        if self.closing:
            return True
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return False
        try:
            probe = socket.socket(fileno=sock.fileno())
        except (OSError, ValueError):  # (ValueError: closed meanwhile, fileno -1)
            return True
        try:
            if self.layer is not None:
                return _closed_by_peer(probe)
            probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False  # (nothing to read: still there)
        except OSError:
            return True  # (reset)
        finally:
            probe.detach()
        return False

    async def authenticate(
        self, request: AuthRequest, verdict: asyncio.Future[Outcome], why: str = ""
    ) -> None:
        """Answer the login once its check is done; a failure only after the client
        address's delay, and logged (with `why`, if it was refused unchecked)."""
        worker = self.worker
        found = await verdict
        if found is Unchecked.LEFT and self.gone():
            # A client that does not wait for its answer is taken for a guesser.
            worker.auth_failures.failed(self.peer, request.login)
            log.info("%s: left before its AUTH was checked: counted as failed", self.client)
            self.close([])
            return
        unavailable = isinstance(found, Unchecked)  # (LEFT here: another session's client)
        user = None if isinstance(found, Unchecked) else found
        if user is not None:
            worker.recent_logins.add(request.login, request.password, user, worker.loop.time())
            worker.auth_failures.succeeded(self.peer, request.login)
        elif not unavailable:
            # Counted at once, the delay only holds the answer back: a guesser that reads the
            # lack of a quick 235 as "wrong" and hangs up would otherwise outrun the lockout.
            delay = worker.auth_failures.delay(self.peer)
            worker.auth_failures.failed(self.peer, request.login)
            await asyncio.sleep(delay)
        if self.closing or self.session is None:
            return
        self.login_checked(request, user, unavailable=unavailable, why=why)
        self.resume()

    def login_checked(
        self, request: AuthRequest, user: str | None, *, unavailable: bool, why: str = ""
    ) -> None:
        """Tell the session the verdict on its AuthRequest, and log it (with `why` a login
        was refused unchecked)."""
        assert self.session is not None
        reply = self.session.auth_done(user, unavailable=unavailable)
        if user is not None:
            log.info("%s: authenticated as %s (%s)", self.client, user, request.mechanism)
        else:
            log.info(
                "NOQUEUE: reject: AUTH from unknown[%s]: %s; mechanism=%s user=%s%s",
                self.peer,
                _line(reply),
                request.mechanism,
                shorten(request.login),
                f" ({why})" if why else "",
            )

    @property
    def trusted(self) -> bool:
        """May send anywhere: on the local listener, or authenticated."""
        return self.listen.trusted or (self.session is not None and self.session.user is not None)

    def check_mail(
        self, sender: Address | None, size: int | None, user: str | None
    ) -> Reply | None:
        """The last word on MAIL: room for the message in the spool and the queue (see
        `reserve.Reserve`), then, for an authenticated user, that the sender is theirs."""
        refusal = self.worker.reserve.check(size)
        if refusal is not None:
            return refusal
        return None if user is None else self.check_sender(sender, user)

    def check_sender(self, sender: Address | None, user: str) -> Reply | None:
        """An authenticated user sends as themselves: their name (+tag) at a local domain, an
        alias that leads to them, or <>; on every listener, the local one too (whose clients
        may use any address as long as they do not authenticate: one who logs in is that
        user, as with Postfix's reject_sender_login_mismatch)."""
        if sender is None:
            return None
        cfg = self.worker.cfg
        if policy.sender_owned(sender, user, local_domains=cfg.domains, aliases=cfg.aliases):
            return None
        return Reply(553, "5.7.1", f"Sender address rejected: not owned by user {user}")

    def check_author(self, body: durable.Body, user: str) -> Reply | None:
        """An authenticated user's message is theirs in its From: field too (see
        `policy.author_refusal`); a header section past the scan could hide a second one."""
        head = durable.head(body, headers.SCAN)
        if unscannable(body, head, headers.section_end(head)):
            return HEADER_TOO_LARGE
        cfg = self.worker.cfg
        local = _with_a_labels(cfg.domains)
        ours = _organisations(local)
        authors = headers.from_addresses(head)
        return policy.author_refusal(
            None if authors is None else _with_other_readings(authors),
            user,
            local_domains=local,
            aliases=cfg.aliases,
            aligned=lambda domain: dmarc.organizational_domain(domain) in ours,
        )

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
        if event is not None and event.verb == "AUTH":  # (a known mechanism's name, or ***)
            fields.append(f"mechanism={event.argument}")
        fields.append("proto=ESMTP" if esmtp else "proto=SMTP")
        if helo:
            fields.append(f"helo=<{helo}>")
        log.info(
            "NOQUEUE: reject: %s from unknown[%s]: %s; %s",
            shorten(verb) or "command",
            self.peer,
            _line(reply),
            shorten(" ".join(fields)),
        )

    def log_reply(self, reply: Reply) -> None:
        text = reply.to_bytes().decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", " | ")
        log.debug("%s > %s", self.client, shorten(text))

    def close(self, out: list[bytes]) -> None:
        if self.closing:
            return
        self.closing = True
        if self.transport is not None:
            if out:
                self.transport.write(b"".join(out))
            self.shut()

    def shut(self) -> None:
        """Close the connection once our last replies have gone, or drop it if they have not
        gone within CLOSE_LINGER (or the command timeout, if shorter): a transport's close()
        waits for its buffer to drain, and a client that pipelines commands and reads nothing
        would keep its session, its place under the caps and its buffers for ever (an
        attacker's pass held every network place so, at no cost: /tmp/atk7a F1)."""
        assert self.transport is not None
        self.transport.close()
        if self.raw().get_write_buffer_size():  # (else closed at once: no timer a session)
            wait = min(CLOSE_LINGER, self.worker.cfg.timeout)
            self.linger = self.worker.loop.call_later(wait, self.abort)

    def raw(self) -> asyncio.Transport:
        """The TCP transport, under TLS if there is TLS."""
        assert self.transport is not None
        return self.layer.raw if self.layer is not None else self.transport

    def abort(self) -> None:
        """Drop the connection now, whatever is unsent (connection_lost follows)."""
        if self.released:
            return
        raw = self.raw()
        if raw.get_write_buffer_size():
            log.info("%s: dropped, its replies unread", self.client)
        raw.abort()

    def idle(self) -> bool:
        """Between transactions: safe to say 421 and go without losing anything in progress."""
        return self.session is not None and not self.committing and self.session.idle

    async def commit(self, envelope: Envelope) -> None:
        # A body spooled to a file (`fd`) is closed here unless the commit takes it, whatever
        # fails before: an attacker's pass made a check raise, and each 25 MB message left a
        # deleted file open (the queue's disk filled, or the worker ran out of descriptors).
        body, fd = self.body.take()
        user = None if self.session is None else self.session.user
        try:
            request = self.commit_request(envelope)
            refusal = None
            if self.listen.role == NETWORK and self.worker.verifier is not None:
                request, body, fd, refusal = await self.verify(request, body, fd)
            else:  # (--inbound-auth off; submission; the local listener): no forged verdict
                body, fd, refusal = await self.unchecked(body, fd)
            if refusal is None and user is not None:
                refusal = self.check_author(body if fd is None else fd, user)
                if refusal is None:  # (counted from here, whatever the commit's outcome)
                    refusal = self.worker.send_limit.reserve(user, self.peer, envelope.recipients)
            if refusal is not None:
                reply = refusal
            else:
                taken, fd = fd, None
                reply = await self.worker.commit(request, body, taken)
        except Exception as exc:  # timeout, broken channel: 451, never a 250 we cannot back
            log.warning(
                "commit for %s failed, answered 451 (the client will retry): %r", self.client, exc
            )
            reply = COMMIT_FAILED
        finally:
            if fd is not None:
                os.close(fd)
        if reply.code >= 400:  # a deferral: logged like a refusal
            sender = str(envelope.sender) if envelope.sender else ""
            verb = "BDAT" if envelope.chunked else "DATA"
            self.log_reject(verb, reply, sender, envelope.esmtp, envelope.helo)
        self.committing = False
        if self.closing or self.session is None:
            return
        self.session.commit_done(reply)
        self.resume()

    async def verify(
        self, request: Commit, body: bytes, fd: int | None
    ) -> tuple[Commit, bytes, int | None, Reply | None]:
        """SPF, DKIM and DMARC for a message from another server (see `inbound`): the commit
        with its Authentication-Results field, the body without forged ones, and the refusal
        that `--inbound-auth enforce` makes of a DMARC reject (the body is then closed)."""
        assert self.worker.verifier is not None
        verdict = await self.worker.verifier.check(
            self.peer, request.helo, request.sender, body if fd is None else fd
        )
        if verdict.refusal is not None:  # (else the verdict goes into the message's log line)
            log.info("%s: %s, from=<%s>", self.client, verdict.summary, request.sender)
            if fd is not None:
                os.close(fd)
            return request, b"", None, verdict.refusal
        if verdict.content is not None:
            self.log_forged()
            if fd is not None:
                os.close(fd)
            body, fd = verdict.content, None
        checked = replace(
            request,
            auth_results=verdict.header,
            checks=verdict.summary,
            sender_spf=verdict.sender_spf,
        )
        return checked, body, fd, None

    async def unchecked(
        self, body: bytes, fd: int | None
    ) -> tuple[bytes, int | None, Reply | None]:
        """A message not checked here, without forged Authentication-Results (`verifier`)."""
        worker = self.worker
        content, refusal = await unchecked(
            worker.cfg.hostname,
            body if fd is None else fd,
            worker.loop,
            worker.checks,
            trusted=self.listen.trusted,
        )
        if content is None and refusal is None:
            return body, fd, None
        if fd is not None:
            os.close(fd)
        if refusal is not None:
            return b"", None, refusal
        self.log_forged()
        assert content is not None
        return content, None, None

    def log_forged(self) -> None:
        log.info("%s: removed a forged Authentication-Results field", self.client)

    def commit_request(self, envelope: Envelope) -> Commit:
        """What the client said, and each copy to make (resolved at RCPT), as a commit."""
        targets: list[Target] = []
        for address in envelope.recipients:
            resolved = self.routes.get(address)
            if resolved is None:  # (forgotten after MAX_ROUTES)
                resolved = self.resolve(address).targets
            targets += resolved
        self.routes.clear()
        return Commit(
            sender=str(envelope.sender) if envelope.sender else "",
            targets=tuple(targets),
            helo=envelope.helo,
            peer=self.peer,
            protocol=self.protocol(envelope),
            body=envelope.body,
            smtputf8=envelope.smtputf8,
            trusted=self.trusted,
            tls=self.tls,
        )

    def protocol(self, envelope: Envelope) -> str:
        """The Received: header's WITH keyword (RFC 3848, RFC 6531): ESMTP, ESMTPS, ESMTPSA…"""
        if not envelope.esmtp:
            return "SMTP"
        suffix = ("S" if self.tls else "") + ("A" if self.session and self.session.user else "")
        return ("UTF8SMTP" if envelope.smtputf8 else "ESMTP") + suffix

    def resolve(self, address: Address, cached_only: bool = False) -> recipients.Resolved:
        cfg = self.worker.cfg
        return recipients.resolve(
            address,
            trusted=self.trusted,
            locality=cfg.locality,
            aliases=cfg.aliases,
            spool=self.worker.spool,
            spool_path=str(cfg.spool),
            cached_only=cached_only,
        )

    def check_recipient(self, address: Address) -> RecipientVerdict:
        """The RCPT verdict, now if it needs no user database lookup (a mailbox that exists, an
        account looked up in the last minute); otherwise PENDING, and the lookup runs in a
        thread: a cold NSS lookup (LDAP, sssd) must not stall every session of this worker.
        A network client that a --dnsbl zone lists is refused before that (`listing`, asked
        at its connect: PENDING until it is answered). Never a submission client: a user's
        home address is often on Spamhaus's PBL, and logs in."""
        listing = self.listing
        if listing is not None:
            if not listing.done():
                listing.add_done_callback(lambda _: self.listing_known(address))
                return PENDING
            zone = None if listing.cancelled() else listing.result()
            if zone is not None:
                return blocklists.blocked(self.peer, zone)
        try:
            resolved = self.resolve(address, cached_only=True)
        except LookupNeeded:
            future = self.worker.loop.run_in_executor(self.worker.lookups, self.resolve, address)
            future.add_done_callback(lambda f: self.recipient_checked(address, f))
            return PENDING
        return self.accept(address, resolved)

    def listing_known(self, address: Address) -> None:
        """The --dnsbl lookup a RCPT waited for is answered: that RCPT's verdict."""
        if self.closing or self.session is None:
            return
        verdict = self.check_recipient(address)
        if verdict is PENDING:
            return  # (a user database lookup: `recipient_checked` gives it)
        self.session.recipient_checked(verdict)
        self.resume()

    def recipient_checked(
        self, address: Address, future: asyncio.Future[recipients.Resolved]
    ) -> None:
        if self.closing or self.session is None:
            return
        try:
            reply = self.accept(address, future.result())
        except Exception:
            # (its 451 is a deferral: a client may meet it a thousand times a session)
            if _FAILED_CHECKS.due():
                log.exception("checking <%s> failed (said once a minute)", address)
            reply = recipients.CHECK_FAILED
        self.session.recipient_checked(reply)
        self.resume()

    def resume(self) -> None:
        """The session waited on us (a commit, a recipient check, a password) and can go on:
        read again, unless the client is not reading our replies, and run it."""
        if not self.write_paused and not self.committing:
            assert self.transport is not None  # (set with the session, in connection_made)
            self.transport.resume_reading()
        self.pump()

    def accept(self, address: Address, resolved: recipients.Resolved) -> Reply | None:
        if resolved.refusal is not None:
            return resolved.refusal
        refusal = self.over_the_limit(address)
        if refusal is not None:
            return refusal
        if len(self.routes) >= MAX_ROUTES:  # transactions reset without a message
            self.routes.clear()
        self.routes[address] = resolved.targets  # for commit_request(), so resolved once
        return None

    def over_the_limit(self, address: Address) -> Reply | None:
        """An authenticated user's recipient past their daily limit (`sendlimit`): deferred."""
        session = self.session
        if session is None or session.user is None:
            return None
        return self.worker.send_limit.refusal(session.user, self.peer, address, session.recipients)

    def check_timeout(self) -> None:
        """The deadlines (`deadlines`): the first one past ends the session."""
        session, deadlines = self.session, self.deadlines
        if self.closing or session is None or deadlines is None:
            return
        loop, cfg = self.worker.loop, self.worker.cfg
        now = loop.time()
        if self.committing or session.waiting:
            # Our turn, not the client's. Not even the session limit cuts a commit: the
            # client would send again a message we may have taken.
            self.timer = loop.call_later(min(1.0, cfg.timeout), self.check_timeout)
            return
        octets = session.content_octets
        expired = deadlines.expired(now, octets)
        if expired is None:
            self.timer = loop.call_later(deadlines.next_check(now, octets), self.check_timeout)
            return
        if expired is Expired.SESSION:
            log.info("session time limit for %s: %gs, closing", self.client, cfg.max_session_time)
            reply = session.timeout("Session time limit exceeded")
        elif expired is Expired.CONTENT:
            assert deadlines.content_since is not None
            log.info(
                "timeout for %s: message data slower than %d bytes/s (%d bytes in %.1fs)",
                self.client,
                cfg.min_data_rate,
                octets,
                now - deadlines.content_since,
            )
            reply = session.timeout("Timeout exceeded: message data too slow")
        elif expired is Expired.COMMAND:
            log.info("timeout for %s: a command not complete within %gs", self.client, cfg.timeout)
            reply = session.timeout()
        else:
            log.info("timeout for %s: no command within %gs", self.client, cfg.timeout)
            reply = session.timeout()
        self.close([reply.to_bytes()])


@functools.lru_cache(maxsize=4)
def _with_a_labels(domains: tuple[str, ...]) -> tuple[str, ...]:
    """The local domains as configured and in A-labels, as `headers.from_addresses` gives a
    From: field's (a domain may be configured in U-labels)."""
    return tuple(dict.fromkeys((*domains, *map(headers.normal_domain, domains))))


def _with_other_readings(authors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each author, and the same as receivers converting by IDNA 2003 or UTS 46's transitional
    processing read it where that is another address (`idn.readings`): serving
    strasse.example, `From: bob@straße.example` passed as a remote author, and such a receiver
    saw bob@strasse.example, which our SPF aligned with."""
    return [(local, read) for local, domain in authors for read in idn.readings(domain)]


@functools.lru_cache(maxsize=4)
def _organisations(domains: tuple[str, ...]) -> frozenset[str]:
    """The organisational domains of the local domains: an author at any domain under one of
    them aligns with ours by DMARC's relaxed rule (serving lists.example.org, our SPF passes
    DMARC for ceo@example.org: an attacker's pass)."""
    return frozenset(dmarc.organizational_domain(domain) for domain in domains)


def _line(reply: Reply) -> str:
    """A reply on one line, for the log."""
    text = reply.text.replace("\n", " ")
    return shorten(" ".join(str(part) for part in (reply.code, reply.status, text) if part))


_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


def _closed_by_peer(sock: socket.socket) -> bool:
    """Has the peer reset the connection, or closed its side (its FIN in, even behind bytes
    not read yet, which a peek would show instead)?"""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(events & _GONE for _, events in poller.poll(0))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _sender_of(event: Rejected) -> str | None:
    """The from= of a refusal: the address MAIL asked for, or the transaction's."""
    return event.path if event.verb == "MAIL" else event.sender

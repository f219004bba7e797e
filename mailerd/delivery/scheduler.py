"""The outbound scheduler: works the durable queue until every recipient is delivered or bounced.

Runs inside the delivery process. Each queue item is attempted when due: its pending remote
recipients are grouped by domain (one SMTP transaction per domain, several recipients in it), or
all sent to the smarthost; pending local recipients (a mailbox write failed at receipt) are
retried locally. Per-recipient results are written back atomically after every attempt, so a
crash can at worst resend to recipients of the one attempt in flight.

Deferred recipients are retried after `--retry-after`, doubling up to an hour, with jitter so a
restart does not retry everything at the same instant (chasquid's nextDelay). Permanent failures,
and anything still pending after `--max-queue-time`, are bounced with an RFC 3464 DSN to the
sender (never for the null sender); a delay warning goes out once after `--delay-warning`.
Neither goes to the sender of mail another server sent (an alias forward) unless SPF verified
it at receipt (`_unverified`): a forged sender would otherwise get the spam back (backscatter).

Concurrency is bounded in total and per domain; SMTP runs in a thread pool, so a dead or
tar-pitting MX only ever holds its own thread and its own domain's slots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fcntl
import heapq
import ipaddress
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import dns.asyncresolver

from mailerd import forwarding, names, recipients, signing, trace
from mailerd.config import Config
from mailerd.delivery import dsn, mx, relay
from mailerd.delivery.queue import Queue, QueueItem, QueueWriteError, Recipient
from mailerd.delivery.secrets import NO_SECRETS, Secrets
from mailerd.inbound.dmarc import organizational_domain
from mailerd.ipc.messages import Target
from mailerd.signing import SigningKey
from mailerd.smtp.events import Address
from mailerd.spool import Spool

log = logging.getLogger("mailerd.outbound")


Record = Callable[[list[Recipient], dict[str, relay.Result]], Coroutine[Any, Any, None]]


class LocalDeliver(Protocol):
    async def __call__(
        self, mailbox: str, head: bytes, body: bytes | int, since: float | None = None
    ) -> int: ...


MAX_HEADER_BYTES = 64 * 1024
IDLE_WAKE = 60.0
RESCAN_INTERVAL = 10.0  # look for items another (retiring) delivery process queued
CLEAN_INTERVAL = 3600.0  # seconds between removals of the queue's crash debris (Queue.clean)
STOP_GRACE = 30.0  # attempts in flight at shutdown get this long to finish
RECORD_TIME = 30.0  # a host's deliveries recorded within this, or no next host is asked
MAX_ADDRESSES = 5  # addresses one attempt tries at most, of all its MX hosts (Postfix: 5)
LOOKUPS = 16  # destinations whose MX and addresses are looked up at once
DELETED, AFTER_ATTEMPT = "deleted", "after attempt"  # what `delete` did
LOOP_PAUSE = 1.0  # after a turn of the loop failed (a bug), before the next
# Items of one destination in flight at once, as a multiple of its --max-per-domain slots: the
# rest of its due items wait aside, without a task, and start as those end (`_hold`). A retry
# round or a flush started every due item at once: a helper's 30,000 for one relayhost held
# the delivery process's loop (and with it every mailbox write, every 250) for up to 3 s, and
# grew it by 240 MB it kept.
IN_FLIGHT_PER_SLOT = 2


class Group(NamedTuple):
    """Recipients of one item tried in one go (`Scheduler._group_of`)."""

    kind: str  # local | relayhost | domain
    name: str  # the mailbox, or the domain ("" for the relayhost)
    mail_from: str = ""  # a remote group's envelope sender


class Scheduler:
    def __init__(
        self,
        cfg: Config,
        queue: Queue,
        deliver_local: LocalDeliver,
        secrets: Secrets = NO_SECRETS,
        spool: Spool | None = None,
    ) -> None:
        """`secrets`: the relayhost's login and the DKIM keys (read by the delivery process,
        as root, at its start); `spool` (read-only: existence checks) routes bounces to local
        senders."""
        self.cfg = cfg
        self.queue = queue
        self.deliver_local = deliver_local
        self.spool = spool or Spool(cfg.spool)
        self.ready = asyncio.Event()  # set once this process works the queue (lock held)
        self.items: dict[str, QueueItem] = {}
        # When each item is due, as (next_attempt, id): a heap, so that a wake-up looks at the
        # items due, not at the whole queue (a bounce storm, a relay down for a day: thousands
        # of items, and a wake-up after every attempt). An entry whose item has gone, or has
        # been given another time since, is dropped when it comes up (`_schedule`).
        self.due: list[tuple[float, str]] = []
        self.recovered: set[str] = set()  # items found on disk (see load)
        self.busy: set[str] = set()
        # Per destination (`_slot_key`): its items in flight, and its due items set aside until
        # one of those ends (`_hold`); the destinations of each item in flight.
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.held: dict[str, collections.deque[str]] = {}
        self.held_ids: set[str] = set()
        self.flight_keys: dict[str, tuple[str, ...]] = {}
        self.wake = asyncio.Event()
        self.total = asyncio.Semaphore(cfg.max_outbound)
        # Each destination's slots (--max-per-domain), there only while an attempt holds or
        # awaits them: kept, one was left behind for every domain ever sent to, for the
        # process's life (weeks where nobody reloads; a soak's finding).
        self.per_domain: dict[str, _Slots] = {}
        # Destinations none of whose hosts took a connection at their last attempt: until when
        # their mail is deferred without one, and the failure it is deferred with (Postfix's
        # dead destination, "delivery temporarily suspended"). Without it every item made its
        # own connection: a helper's 30,000 items for a relayhost that dropped connections
        # took their 30 s timeouts four at a time, some 62 hours a retry round.
        self.suspended: dict[str, tuple[float, relay.Result]] = {}
        self.pool = ThreadPoolExecutor(cfg.max_outbound, thread_name_prefix="smtp")
        # Destinations looked up at once: each may have 32 MX hosts' A and AAAA asked at once,
        # and a sixth attacker's pass ran the process out of descriptors with unanswered ones.
        self.lookups = asyncio.Semaphore(LOOKUPS)
        try:
            self.resolver: dns.asyncresolver.Resolver | None = mx.make_resolver(
                cfg.dns_server, cfg.dns_timeout, cache=True
            )
        except mx.SystemResolverForbidden:
            raise  # a test without its own DNS: fail loudly
        except Exception as exc:  # no /etc/resolv.conf: local mail must still work
            log.error("no DNS resolver (%s): outbound mail will wait; see --dns-server", exc)
            self.resolver = None
        self.settings = relay.Settings(
            helo=cfg.hostname,
            tls=outbound_policy(cfg.outbound_tls, bool(secrets.relay_login and cfg.relayhost)),
            # Credentials are the smarthost's: never for a domain's MX (config refuses them
            # without a relayhost; this is the second lock).
            auth=secrets.relay_login if cfg.relayhost else None,
            plain_auth=cfg.outbound_tls == "none",
            dkim_keys=secrets.dkim_keys,
        )
        self.own_names = frozenset({cfg.hostname.lower()})
        self.own_addresses = cfg.own_addresses
        self.tasks: set[asyncio.Task[None]] = set()
        self.failed: set[str] = set()  # items whose failure's traceback is logged (`_once`)
        self.doomed: set[str] = set()  # items deleted during their attempt (`delete`)
        self.next_rescan = 0.0
        self.next_clean = 0.0  # (the queue's debris: cleaned at the load, then once an hour)
        self.stopping = False
        self.lock_fd: int | None = None
        self.taken = asyncio.Event()  # set once this process holds the queue and has loaded it

    # -- queue membership --------------------------------------------------------------------

    def load(self, items: list[QueueItem]) -> None:
        """Items read from disk: queued before this process started (a crash, a reload, a
        restart), so an earlier attempt may have delivered some of their local copies."""
        for item in items:
            self.items[item.id] = item
            self.recovered.add(item.id)
            self._schedule(item)
        self.wake.set()

    def add(self, item: QueueItem) -> None:
        self._schedule(item)
        self.items[item.id] = item  # (after: if that failed, a rescan finds it on disk)
        self.wake.set()

    def _schedule(self, item: QueueItem) -> None:
        """Have the item started at item.next_attempt: called whenever that is set, but during
        an attempt of the item (`_process` calls it when the attempt is over)."""
        heapq.heappush(self.due, (item.next_attempt, item.id))

    def retry_local_now(self) -> int:
        """Retry now every item with a local recipient still pending: a mailbox writer has
        just taken over, and what failed because there was none need not wait its back-off."""
        due = [i for i in self.items.values() if any(r.mailbox and r.state == "pending"
                                                     for r in i.recipients)]  # fmt: skip
        for item in due:
            item.next_attempt = 0.0
            self._schedule(item)
        if due:
            self.wake.set()
        return len(due)

    def flush(self) -> int:
        """Retry everything now (`mailerd queue flush`), suspended destinations too: the
        operator who flushes has mended one, as Postfix's flush revives dead destinations."""
        self.suspended.clear()
        now = time.monotonic()
        for slots in self.per_domain.values():  # (attempts under way now suspend nothing)
            slots.alive = now
        for item in self.items.values():
            item.next_attempt = 0.0
            self._schedule(item)
        self.wake.set()
        return len(self.items)

    async def delete(self, queue_id: str) -> str | None:
        """`mailerd queue delete`: "deleted"; "after attempt" for an item being attempted
        right now, removed when that attempt ends (unless it delivered every recipient); None
        if it is not in the queue. Answered at once: an attempt lasts as long as a slow
        server's session (45 min for a big message), and the tool, tired of waiting, once
        took the daemon for gone and removed the files under it (an attacker's pass, F6)."""
        if queue_id not in self.items:
            return None
        if queue_id in self.busy:
            self.doomed.add(queue_id)
            log.info("%s: to be removed by administrator when its attempt ends", queue_id)
            return AFTER_ATTEMPT
        self.busy.add(queue_id)  # (no attempt starts while the files go)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.queue.remove, queue_id)
            self._forget(queue_id)
        finally:
            self.busy.discard(queue_id)
        log.info("%s: removed by administrator", queue_id)
        return DELETED

    async def _remove_doomed(self, item: QueueItem) -> None:
        """After its attempt, an item the administrator deleted meanwhile (`delete`)."""
        self.doomed.discard(item.id)
        if item.id not in self.items:
            log.info("%s: its attempt settled every recipient before its removal", item.id)
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.queue.remove, item.id)
        except QueueWriteError:  # (the queue said so): removed after its next attempt, then
            self.doomed.add(item.id)
            return
        self._forget(item.id)
        log.info("%s: removed by administrator, after its attempt", item.id)

    async def _drop_doomed(self) -> None:
        """At a stop, the items deleted during an attempt the stop cut short: removed now, as
        the administrator was told, rather than attempted again by the next scheduler."""
        loop = asyncio.get_running_loop()
        for queue_id in sorted(self.doomed & set(self.items)):
            with contextlib.suppress(QueueWriteError):  # (the queue said so)
                await loop.run_in_executor(None, self.queue.remove, queue_id)
                self._forget(queue_id)
                log.info(
                    "%s: removed by administrator, its attempt cut short by the stop", queue_id
                )

    # -- the scheduling loop -----------------------------------------------------------------

    async def run(self, before: Callable[[], Awaitable[object]] | None = None) -> None:
        """Work the queue, once this process holds the queue's scheduler lock; `before` runs
        once the queue is loaded and before the first attempt (the maildrop's first pickup,
        which must see an item it queued before a crash while that item is still there)."""
        loop = asyncio.get_running_loop()
        self.lock_fd = await self._lock_queue()
        # A fresh view: a previous scheduler (before a reload or a crash) may just have changed it.
        self.load(await loop.run_in_executor(None, self.queue.load))
        self.taken.set()
        if before is not None:
            try:
                await before()
            except Exception:  # the queue is worked whatever it met: only `before` is lost
                log.exception("the look before the first attempt failed; the queue is worked")
        self.ready.set()
        self.next_rescan = time.monotonic() + RESCAN_INTERVAL
        self.next_clean = time.monotonic() + CLEAN_INTERVAL
        failure = ""
        while not self.stopping:
            # Supervised: a bug met in one turn (an item, a rescan) is logged and the next turn
            # goes on, rather than ending the task and with it all outbound mail while the
            # process goes on accepting (an attacker's pass).
            try:
                await self._turn()
                failure = ""
            except Exception as exc:
                if repr(exc) != failure:  # (its traceback once, not every second)
                    log.exception("the scheduler's loop failed; it goes on")
                failure = repr(exc)
                await asyncio.sleep(LOOP_PAUSE)

    async def _turn(self) -> None:
        """One turn of the loop: the items due started, a rescan when due, then a wait. (In
        that order: a rescan that keeps failing, the queue's disk gone bad, must not keep the
        items in memory from being attempted.)"""
        self._start_due(time.time())
        if time.monotonic() >= self.next_rescan:
            self.next_rescan = time.monotonic() + RESCAN_INTERVAL
            if await self.rescan():
                self._start_due(time.time())
        if time.monotonic() >= self.next_clean:
            self.next_clean = time.monotonic() + CLEAN_INTERVAL
            await self.clean()
        now = time.time()
        next_due = min(now + IDLE_WAKE, now + RESCAN_INTERVAL)
        if self.due:
            next_due = min(next_due, self.due[0][0])
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), max(0.05, next_due - time.time()))

    def _start_due(self, now: float) -> None:
        """Start every item due by `now` that no attempt holds, or set it aside (`_hold`);
        items set aside are let go as their destinations have room (`_release`)."""
        while True:
            released = self._release()
            self._start_popped(now)
            if not released:
                return

    def _start_popped(self, now: float) -> None:
        due = self.due
        while due and due[0][0] <= now:
            when, queue_id = heapq.heappop(due)
            item = self.items.get(queue_id)
            if item is None or item.next_attempt != when or queue_id in self.busy:
                continue  # (gone; due at another time; or scheduled again once attempted)
            if queue_id in self.held_ids:
                continue  # (set aside until its destination has room: _release)
            try:
                if not self._hold(item):
                    self._start(item)
            except Exception:  # a bug with this item costs it its turn, not the others theirs
                self._landed(item.id)
                self.busy.discard(item.id)
                self._once(item, "could not be started")
                item.next_attempt = now + self.cfg.retry_after
                self._schedule(item)

    def _once(self, item: QueueItem, what: str) -> None:
        """Log a failure with one item: its traceback the first time, a line after that."""
        if item.id in self.failed:
            log.error("%s: %s again", item.id, what)
        else:
            self.failed.add(item.id)
            log.exception("%s: %s", item.id, what)

    async def clean(self) -> None:
        """Remove the queue's crash debris (`Queue.clean`): a kill leaves a message file
        without its envelope, which only the load at a start removed, and a daemon that
        then ran for months kept it for months."""
        await asyncio.get_running_loop().run_in_executor(None, self.queue.clean)

    async def rescan(self) -> int:
        """Pick up items on disk that this scheduler does not know: during a reload the old
        delivery process may still commit (and queue) mail after this one took over."""
        loop = asyncio.get_running_loop()
        unknown = await loop.run_in_executor(None, lambda: self.queue.ids() - set(self.items))
        found = 0
        for queue_id in unknown:
            # (one damaged meanwhile is set aside and logged, once: the queue's take)
            item = await loop.run_in_executor(None, self.queue.take, queue_id)
            if item is not None and queue_id not in self.items:
                self.items[queue_id] = item
                self.recovered.add(queue_id)
                self._schedule(item)
                found += 1
        if found:
            log.info("picked up %d queued message(s) from disk", found)
            self.wake.set()
        return found

    async def _lock_queue(self) -> int:
        """One scheduler per queue: during a reload the old delivery process finishes its
        attempts while the new one starts; the new one waits here until the old one is done,
        so no queue item is ever attempted by two processes."""
        # flock works on a read-only descriptor: the file may belong to root or to us.
        fd = os.open(self.queue.scheduler_lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if not waited:
                    log.info("waiting for the previous scheduler of this queue to finish")
                    waited = True
                await asyncio.sleep(0.2)

    def _hold(self, item: QueueItem) -> bool:
        """Set a due item aside if none of its deliveries could go now: each of its
        destinations has its fill of items in flight, and it has no local copy pending. (Its
        local copy, or its mail for another destination, waited behind one destination's
        whole backlog: as Postfix, whose queue manager queues each destination's recipients,
        not whole messages.)"""
        keys = self._destinations(item)
        local = any(r.mailbox and r.state == "pending" for r in item.recipients)
        if keys and not local and all(self._room(key) <= 0 for key in keys):
            self.held.setdefault(keys[0], collections.deque()).append(item.id)
            self.held_ids.add(item.id)
            return True
        self.flight_keys[item.id] = keys
        self.in_flight.update(keys)
        return False

    def _landed(self, queue_id: str) -> None:
        """An item's attempt ended: each of its destinations has a place for one set aside,
        let go at the loop's next turn (`_release`; the item's end wakes it)."""
        for key in self.flight_keys.pop(queue_id, ()):
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]

    def _release(self) -> int:
        """Put items set aside back among the due, as many of each destination's as it has
        places: counted from what is in flight, not one for each item's end. (The end let go
        its next item only: one being deleted then, or deleted before it started, took that
        place with it, and two such left a destination with nothing in flight and the rest of
        its backlog set aside for ever, a flush or not.) How many were let go."""
        released = 0
        for key in list(self.held):
            waiting = self.held[key]
            room = self._room(key)
            while waiting and room > 0:
                queue_id = waiting.popleft()
                self.held_ids.discard(queue_id)
                item = self.items.get(queue_id)
                if item is None:
                    continue  # (deleted meanwhile)
                self._schedule(item)
                if queue_id not in self.busy:  # (one being deleted takes no place)
                    room -= 1
                    released += 1
            if not waiting:
                del self.held[key]
        return released

    def _room(self, key: str) -> int:
        """How many more items of a destination may be in flight (IN_FLIGHT_PER_SLOT)."""
        return IN_FLIGHT_PER_SLOT * self.cfg.max_per_domain - self.in_flight[key]

    def _destinations(self, item: QueueItem) -> tuple[str, ...]:
        """The destinations (`_slot_key`) of an item's pending remote recipients."""
        relayhost = self.cfg.relayhost
        groups = {self._group_of(item, r) for r in item.recipients if r.state == "pending"}
        return tuple(
            {_slot_key(relayhost[0] if relayhost else g.name) for g in groups if g.kind != "local"}
        )

    def _start(self, item: QueueItem) -> None:
        self.busy.add(item.id)
        task = asyncio.create_task(self._process(item))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Start nothing new, let attempts in flight record their results (within `grace`),
        then give the queue to the next scheduler."""
        self.stopping = True
        self.wake.set()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for queue_id in relay.awaiting_end_of_data():
            log.warning(
                "%s: the stop cuts its attempt short after its data went to a host, which may "
                "have it: the message may be sent more than once",
                queue_id,
            )
        for task in list(self.tasks):
            task.cancel()  # its recipients stay pending: at worst one resend, never a loss
        await self._drop_doomed()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    async def _process(self, item: QueueItem) -> None:
        try:
            try:
                await self._attempt(item)
            except QueueWriteError:
                # The queue has said so, once for all items: no traceback per attempt. The
                # item's state stays in memory, written when an attempt's write works again.
                item.next_attempt = max(item.next_attempt, time.time() + self.cfg.retry_after)
            except Exception as exc:
                await self._attempt_failed(item, exc)
            if item.id in self.doomed:
                await self._remove_doomed(item)
        finally:
            self.busy.discard(item.id)
            if item.id in self.items:  # (not delivered or bounced, nor removed meanwhile)
                self._schedule(item)
            self._landed(item.id)
            self.wake.set()

    async def _attempt_failed(self, item: QueueItem, exc: Exception) -> None:
        """An attempt that raised (a bug): logged, its traceback once per item, then recorded
        as a local error for the recipients still pending, with the back-off and the
        --max-queue-time expiry (and bounce) of any deferral. It used to be retried every
        --retry-after for ever, with a traceback each time, and never bounced."""
        self._once(item, "delivery attempt failed")
        result = relay.Result(451, "4.3.0", f"local error: {_summary(exc)}", ours=True)
        try:
            await self._settle_pending(item, result)
        except Exception:  # (the record failing too, a full disk: the queue said so)
            log.error("%s: cannot record the failed attempt; it is tried again later", item.id)
            item.next_attempt = max(item.next_attempt, time.time() + self.cfg.retry_after)

    async def _message_lost(self, item: QueueItem) -> bool:
        """Whether the item's message file is gone (removed by hand, a damaged disk)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, os.stat, self.queue.message_path(item.id))
        except FileNotFoundError:
            return True
        return False

    async def _bounce_lost(self, item: QueueItem) -> None:
        """An item without its message: nothing of it can ever be delivered. Bounced at once
        (without the original's header section, gone with the file), not retried for ever nor
        removed in silence: the sender was told 250 and must learn to send it again."""
        log.error("%s: message file %s/msg/%s lost; bouncing", item.id, self.queue.shown, item.id)
        result = relay.Result(554, "5.3.0", "message file lost from the queue", ours=True)
        await self._settle_pending(item, result)

    async def _settle_pending(self, item: QueueItem, result: relay.Result) -> None:
        """Settle every recipient still pending with one result of ours."""
        pending = [r for r in item.recipients if r.state == "pending"]
        await self._settle(item, pending, dict.fromkeys(map(result_key, pending), result))

    async def _attempt(self, item: QueueItem) -> None:
        if await self._message_lost(item):
            await self._bounce_lost(item)
            return
        pending = [r for r in item.recipients if r.state == "pending"]
        groups: dict[Group, list[Recipient]] = collections.defaultdict(list)
        for recipient in pending:
            groups[self._group_of(item, recipient)].append(recipient)
        recording = asyncio.Lock()

        async def record(members: list[Recipient], outcome: dict[str, relay.Result]) -> None:
            async with recording:
                await self._record_sent(item, members, outcome)

        async def attempt(key: Group, members: list[Recipient]) -> dict[str, relay.Result]:
            outcome = await self._attempt_group(item, key, members, record)
            await record(members, outcome)
            return outcome

        # Every group finishes before the attempt does, even when one raises (a bug, a queue
        # write that failed): the attempt's end frees the item for the next one, and a group
        # still sending then would have its recipients deferred under it, and sent twice.
        outcomes = await asyncio.gather(
            *(attempt(k, m) for k, m in groups.items()), return_exceptions=True
        )
        results: dict[str, relay.Result] = {}
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.update(outcome)
        if groups and not results:  # (nothing tried, a stop began: the item stays as it was)
            return  # (an item with no group, nothing pending, is settled: removed)
        await self._settle(item, pending, results)

    async def _record_sent(
        self, item: QueueItem, members: list[Recipient], outcome: dict[str, relay.Result]
    ) -> None:
        """A group's delivered recipients, recorded as soon as that group is done, or as soon
        as one of its hosts took them (`_recorder`): another group's server, or the next MX,
        may keep its session going for many minutes, and a stop or a reload meanwhile must not
        send them again (a sixth attacker's pass). The rest is _settle's."""
        sent = [
            r
            for r in members
            if r.state == "pending" and result_key(r) in outcome and outcome[result_key(r)].ok
        ]
        if not sent or item.id not in self.items:
            return
        now = time.time()
        for recipient in sent:
            recipient.attempts += 1
            recipient.last_error = ""
            recipient.last_error_ours = False
            recipient.state = "sent"
            self._log(item, recipient, outcome[result_key(recipient)], now)
        if any(r.state == "pending" for r in item.recipients):  # (else _settle removes it)
            await asyncio.get_running_loop().run_in_executor(None, self.queue.update, item)

    def _group_of(self, item: QueueItem, recipient: Recipient) -> Group:
        """One transaction each: a local mailbox's copy; the remote recipients at one domain
        (or all, through a relayhost) that leave with the same MAIL FROM (a forward's is its
        alias's, `forwarding`)."""
        if recipient.mailbox:
            return Group("local", recipient.mailbox)
        spf = item.sender_spf if item.inbound else ""
        mail_from = forwarding.envelope_sender(item.sender, recipient.via, self.cfg.domains, spf)
        if self.cfg.relayhost:
            return Group("relayhost", "", mail_from)
        return Group("domain", recipient.address.rpartition("@")[2].lower(), mail_from)

    async def _attempt_group(
        self, item: QueueItem, key: Group, members: list[Recipient], record: Record
    ) -> dict[str, relay.Result]:
        kind, name = key.kind, key.name
        if kind == "local":
            return await self._retry_local(item, name, members)
        if kind == "relayhost":
            assert self.cfg.relayhost is not None  # (_group_of() makes this group only then)
            domain = self.cfg.relayhost[0]
        else:
            domain = name
        # The domain's own slot first: a backlog for one slow domain must wait on its own
        # limit without holding global slots that other domains need. Its organisational
        # domain's, in fact: an attacker's pass sent to a0…a19.tar.test, whose MX dripped its
        # replies, and held all the global slots with one domain of its own.
        async with self._domain_slot(_slot_key(domain)):
            return await self._remote(
                item, kind == "relayhost", domain, key.mail_from, members, record
            )

    @contextlib.asynccontextmanager
    async def _domain_slot(self, key: str) -> AsyncIterator[None]:
        """One of the destination's --max-per-domain slots, for as long as the block runs."""
        slots = self.per_domain.get(key)
        if slots is None:
            slots = self.per_domain[key] = _Slots(asyncio.Semaphore(self.cfg.max_per_domain))
        slots.users += 1
        try:
            async with slots.semaphore:
                yield
        finally:
            slots.users -= 1
            if slots.users == 0:
                del self.per_domain[key]

    async def _retry_local(
        self, item: QueueItem, mailbox: str, members: list[Recipient]
    ) -> dict[str, relay.Result]:
        path = self.queue.message_path(item.id)
        head = trace.return_path(item.sender)
        # The copy may be there already: after a crash, after an attempt whose answer was lost,
        # and for a copy a worker queued when its writer went away (its last_error is set).
        again = item.id in self.recovered or any(r.attempts or r.last_error for r in members)
        try:
            body = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
            number = await self.deliver_local(mailbox, head, body, item.created if again else None)
        except Exception as exc:
            # (The mailbox is named: an alias's copies share one address.)
            result = relay.Result(
                451, "4.2.0", f"local delivery to mailbox {mailbox} failed: {exc}"
            )
        else:
            result = relay.Result(250, "2.0.0", f"delivered to mailbox {mailbox} as {number}")
        return {result_key(r): result for r in members}

    async def _remote(
        self,
        item: QueueItem,
        smarthost: bool,
        domain: str,
        mail_from: str,
        members: list[Recipient],
        record: Record,
    ) -> dict[str, relay.Result]:
        addresses = [r.address for r in members]
        suspended = self._suspension(domain)
        if suspended is not None:
            return dict.fromkeys(addresses, suspended)
        async with self.lookups:  # (its DNS waits hold no global slot, but have their own)
            hops = await self._hops(domain, smarthost)
        if isinstance(hops, mx.Failure):
            result = relay.Result(hops.code, hops.status, hops.text)
            return dict.fromkeys(addresses, result)
        message = relay.Message(
            sender=mail_from,
            recipients=tuple(addresses),
            path=self.queue.message_path(item.id),
            smtputf8=item.smtputf8,
            body_8bit=item.body_8bit,
            queue_id=item.id,
        )
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        async with self.total:
            if self.stopping:
                # The slots came during a stop's grace: a session begun now would be cut short
                # at its end, perhaps after its data went (a reviewer's finding: each such
                # message sent twice). Not tried: no result, so its recipients stay pending,
                # untouched, for the next scheduler, while the item's other groups' results
                # are recorded (an attacker's pass: ending the attempt lost a 550 beside it).
                return {}
            recorder = self._recorder(item, members, record, loop)
            outcome = await loop.run_in_executor(
                self.pool, relay.attempt, hops, message, self.settings, recorder
            )
        self._reached(domain, outcome, began)  # (in the domain's slot: before its next looks)
        return outcome

    def _suspension(self, destination: str) -> relay.Result | None:
        """What a suspended destination's mail is deferred with (None: it is not)."""
        entry = self.suspended.get(destination)
        if entry is None:
            return None
        until, result = entry
        if time.monotonic() >= until:
            del self.suspended[destination]
            return None
        return result

    def _reached(self, destination: str, outcome: dict[str, relay.Result], began: float) -> None:
        """Suspend a destination none of whose hosts took a connection, for --retry-after (its
        first item due after that tries again); lift the suspension once one did. Not for a
        failure older than the news that the destination lives (`_Slots.alive`): an attempt
        under way since before a host of it answered another, or since a flush (the operator
        mended it), suspended the mail that had just begun to go (a reviewer's finding)."""
        now = time.monotonic()
        slots = self.per_domain.get(_slot_key(destination))
        if not relay.unreachable(outcome):
            self.suspended.pop(destination, None)
            if slots is not None:
                slots.alive = now
            return
        if slots is not None and slots.alive > began:
            return
        self.suspended = {k: v for k, v in self.suspended.items() if v[0] > now}
        failure = next(iter(outcome.values()))
        text = f"delivery temporarily suspended: {failure.text}"
        # (No host: the log says relay=none for mail that no host was asked about.)
        result = dataclasses.replace(failure, text=text, host=None, address=None)
        self.suspended[destination] = (now + self.cfg.retry_after, result)

    def _recorder(
        self,
        item: QueueItem,
        members: list[Recipient],
        record: Record,
        loop: asyncio.AbstractEventLoop,
    ) -> Callable[[dict[str, relay.Result]], bool]:
        """For the relay's thread: a host took some of `members` and deferred others; record
        its deliveries (on the event loop, waiting for the queue's write) before the next host
        is asked for the rest. False: ask none, the rest wait for the next attempt (a stop or
        a delete began, or the deliveries could not be recorded in time)."""

        def going_on() -> bool:
            return not self.stopping and item.id not in self.doomed

        def recorded(delivered: dict[str, relay.Result]) -> bool:
            if not going_on():
                return False
            try:
                asyncio.run_coroutine_threadsafe(record(members, delivered), loop).result(
                    RECORD_TIME
                )
            except Exception as exc:  # (QueueWriteError, a timeout: the attempt's end records)
                log.warning("%s: not asking the next host now: %s", item.id, _summary(exc))
                return False
            return going_on()

        return recorded

    async def _hops(self, domain: str, smarthost: bool) -> list[relay.Hop] | mx.Failure:
        port = self.cfg.relayhost[1] if smarthost and self.cfg.relayhost else 25
        if self.resolver is None:
            return mx.Failure(False, 451, "4.4.3", "no DNS resolver configured")
        destination = _destination(domain)
        route = await (
            mx.resolve_host(destination, self.resolver, families=self.cfg.outbound_ip)
            if smarthost
            else mx.resolve(
                destination,
                self.resolver,
                families=self.cfg.outbound_ip,
                own_names=self.own_names,
                own_addresses=self.own_addresses,
            )
        )
        if isinstance(route, mx.Failure):
            return route
        return _first_addresses(
            [relay.Hop(t.host, a, port) for t in route.targets for a in t.addresses]
        )

    # -- recording results -------------------------------------------------------------------

    async def _settle(
        self, item: QueueItem, pending: list[Recipient], results: dict[str, relay.Result]
    ) -> None:
        now = time.time()
        expired = now - item.created > self.cfg.max_queue_time
        bounced: list[dsn.RecipientStatus] = []
        for recipient in pending:
            result = results.get(result_key(recipient))
            if result is None or recipient.state != "pending":  # (_record_sent's already)
                continue
            recipient.attempts += 1
            recipient.last_error = "" if result.ok else result.line()
            recipient.last_error_ours = result.ours and not result.ok
            if result.ok:
                recipient.state = "sent"
            elif result.permanent or expired:
                recipient.state = "bounced"
                bounced.append(_bounce_status(recipient, result, expired))
            self._log(item, recipient, result, now)
        still = [r for r in item.recipients if r.state == "pending"]
        if still:
            attempts = max(r.attempts for r in still)
            item.next_attempt = now + self.backoff(attempts)
        loop = asyncio.get_running_loop()
        if bounced:
            try:
                await self._notify(item, bounced, now)
            except QueueWriteError:
                # No notice could be queued: these recipients are attempted (and bounced) again
                # later, rather than never bounced at all.
                again = {status.address for status in bounced}
                for recipient in pending:
                    if recipient.state == "bounced" and recipient.address in again:
                        recipient.state = "pending"
                raise
        if still and self._should_warn(item, now):
            await self._notify(item, [_delay_status(r) for r in still], now)
            item.warned = True
        if still:
            await loop.run_in_executor(None, self.queue.update, item)
        else:
            # Files first, then memory: a rescan must never find the files of a forgotten item.
            await loop.run_in_executor(None, self.queue.remove, item.id)
            self._forget(item.id)
            log.info("%s: removed", item.id)

    def _forget(self, queue_id: str) -> None:
        """An item whose files are gone leaves memory (after them: see rescan)."""
        self.items.pop(queue_id, None)
        self.recovered.discard(queue_id)
        self.failed.discard(queue_id)

    def backoff(self, attempts: int) -> float:
        # The exponent is capped before the power: past 2**64 the cap has long been reached, and
        # retry_after * 2**1100 would overflow a float (a queue time of weeks gets there).
        doublings = min(max(attempts - 1, 0), 64)
        base: float = min(self.cfg.retry_after * float(2**doublings), self.cfg.max_retry)
        base = max(base, min(self.cfg.retry_after, self.cfg.max_retry))
        return base * random.uniform(0.9, 1.1)

    def _should_warn(self, item: QueueItem, now: float) -> bool:
        return (
            bool(self.cfg.delay_warning)
            and not item.warned
            and item.sender != ""
            and now - item.created > self.cfg.delay_warning
        )

    def _log(self, item: QueueItem, recipient: Recipient, result: relay.Result, now: float) -> None:
        status = {"sent": "sent", "bounced": "bounced"}.get(recipient.state, "deferred")
        where = "local" if recipient.mailbox else relay.namaddr(result.host, result.address)
        log.info(
            "%s: to=<%s>, relay=%s, delay=%.1f, status=%s (%s)",
            item.id,
            recipient.address,
            where,
            now - item.created,
            status,
            result.line(),
        )

    # -- bounces -----------------------------------------------------------------------------

    async def _notify(
        self, item: QueueItem, statuses: list[dsn.RecipientStatus], now: float
    ) -> None:
        """Send a DSN to the sender: never for <>, and a bounce itself goes from <>.

        Each address the sender gave is reported once: an alias's local copies share its
        address, and the sender wrote to the alias (the first copy's diagnostic is told)."""
        first: dict[str, dsn.RecipientStatus] = {}
        for status in statuses:
            first.setdefault(status.address, status)
        statuses = list(first.values())
        if item.sender == "":
            log.info("%s: not bouncing: null sender", item.id)
            return
        if unverified := _unverified(item):
            what = "delay warning" if statuses[0].action == "delayed" else "bounce"
            log.info(
                "%s: no %s to <%s>: forwarded mail from a sender SPF did not verify (%s)",
                item.id,
                what,
                item.sender,
                unverified,
            )
            return
        loop = asyncio.get_running_loop()
        original = await loop.run_in_executor(None, _read_head, self.queue.message_path(item.id))
        message = dsn.compose(
            hostname=self.cfg.hostname,
            sender=item.sender,
            original=original,
            recipients=statuses,
            queue_id=item.id,
            arrival=item.created,
            now=now,
            smtputf8=item.smtputf8,
        )
        await self.submit_notice(item.sender, message, item.smtputf8)

    async def refuse(self, item: QueueItem, statuses: list[dsn.RecipientStatus]) -> None:
        """Bounce recipients refused before any attempt (a `sendmail` submission's unknown
        users): they are already recorded as bounced in the queue item."""
        for status in statuses:
            log.info(
                "%s: to=<%s>, relay=none, delay=0, status=bounced (%s %s)",
                item.id,
                status.address,
                status.status,
                status.diagnostic,
            )
        await self._notify(item, statuses, time.time())
        if not any(r.state == "pending" for r in item.recipients):
            await asyncio.get_running_loop().run_in_executor(None, self.queue.remove, item.id)
            self._forget(item.id)
            log.info("%s: removed", item.id)

    async def submit_notice(self, to: str, message: bytes, smtputf8: bool) -> None:
        """Deliver a DSN: into the local mailboxes the address leads to (aliases included;
        postmaster's when it leads nowhere, as for a forged local sender), or queued with
        sender <> for a remote one."""
        targets = self._local_targets(to)
        if targets is None:
            await self._queue_notice(to, message, smtputf8)
            return
        if not targets:  # a forged or vanished local sender: postmaster reads it, aliases included
            targets = self._local_targets(self._postmaster(to)) or (Target(to, "postmaster"),)
        for target in targets:
            if target.mailbox is None:  # an alias that forwards: the notice follows it
                await self._queue_notice(target.address, message, smtputf8)
                continue
            try:
                await self.deliver_local(target.mailbox, trace.return_path(""), message)
            except Exception as exc:  # the writer is away: the queue keeps the notice and retries
                await self._queue_notice(
                    target.address, message, smtputf8, target.mailbox, f"451 4.2.0 {exc}"
                )
                continue
            log.info("bounce to <%s> delivered to mailbox %s", to, target.mailbox)

    def _postmaster(self, to: str) -> str:
        domain = to.rpartition("@")[2] or (self.cfg.domains[0] if self.cfg.domains else "")
        return f"postmaster@{domain}" if domain else "postmaster"

    def _local_targets(self, to: str) -> tuple[Target, ...] | None:
        """Where a notice to a local address goes (empty: nowhere); None for a remote one."""
        local, _, domain = to.rpartition("@")
        cfg = self.cfg
        if domain and not cfg.locality.is_local(domain):
            return None
        address = Address(local or to, domain, False)
        resolved = recipients.resolve(
            address,
            trusted=True,
            locality=cfg.locality,
            aliases=cfg.aliases,
            spool=self.spool,
            spool_path=self.spool.shown,  # (cfg.spool: /proc/self/fd/N here)
        )
        return resolved.targets

    async def _queue_notice(
        self,
        to: str,
        message: bytes,
        smtputf8: bool,
        mailbox: str | None = None,
        error: str = "",
    ) -> None:
        recipient = Recipient(to, mailbox=mailbox, last_error=error)
        item = QueueItem(id=trace.new_id(), sender="", recipients=[recipient], smtputf8=smtputf8)
        keys = () if mailbox is not None else self.settings.dkim_keys
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._put_notice, item, message, keys)
        self.add(item)
        log.info("%s: bounce to <%s> queued", item.id, to)

    def _put_notice(self, item: QueueItem, message: bytes, keys: tuple[SigningKey, ...]) -> None:
        """(In a thread.) Queue a notice, DKIM-signed when it leaves as any other mail does:
        its From: is MAILER-DAEMON at the host name, which a key of the host name's domain,
        or of a parent domain, signs. With an empty MAIL FROM, receivers have only that
        signature and the HELO name's SPF to go by, and Gmail and Outlook want one of them
        to pass in alignment with the From: (an acceptance tester's finding: unsigned, a
        bounce failed DMARC under the records `mailerd dns` printed)."""
        self.queue.put(item, signing.sign_queued(item.id, message, keys), message)


def result_key(recipient: Recipient) -> str:
    """What an attempt's result for `recipient` is found under: a remote address (one copy per
    address in an item); a local copy's address and mailbox, since an alias's copies share its
    address (`team` for alice and for bob: keyed by the address alone, alice's failure was
    taken for bob's success, and her copy was dropped as sent)."""
    return (
        recipient.address
        if recipient.mailbox is None
        else f"{recipient.address}\0{recipient.mailbox}"
    )


def _unverified(item: QueueItem) -> str:
    """Why a notice about this item must not go to its sender ("" if it may): mail another
    server sent us (only alias forwards make it remote) whose MAIL FROM SPF did not pass at
    receipt. A spammer forges that sender, and a bounce of what the forward target refused
    would reflect the spam to whoever it names (backscatter). The owner's own mail (loopback,
    submission, sendmail) is always told.

    Only SPF counts, not a DKIM pass aligned with the sender's domain: a signature vouches for
    the message, not for the envelope, and a message once signed for any user of a big
    provider can be sent again with MAIL FROM any other of its users, and still pass."""
    if not item.inbound or item.sender_spf == "pass":
        return ""
    return item.sender_spf or "not checked: inbound-auth off"


def _bounce_status(
    recipient: Recipient, result: relay.Result, expired: bool
) -> dsn.RecipientStatus:
    status = result.status
    # Our own finding is told as ours: no "host X said", no SMTP reply code it never sent.
    text = result.text if result.ours else result.line()
    if not result.permanent:  # expired while deferred: "delivery time expired" (RFC 3463 X.4.7)
        status = "5.4.7"
        text = f"delivery time expired; last error: {text}"
    remote = None if result.ours else result.host
    return dsn.RecipientStatus(recipient.address, "failed", status, text, remote)


def _delay_status(recipient: Recipient) -> dsn.RecipientStatus:
    code = recipient.last_error.split(" ", 2)
    status = code[1] if len(code) > 1 and code[1][:1] == "4" else "4.0.0"
    # Our own finding is told as ours, as in a bounce (_bounce_status): without the code.
    ours = recipient.last_error_ours and len(code) == 3
    text = code[2] if ours else recipient.last_error
    return dsn.RecipientStatus(recipient.address, "delayed", status, text, None)


def _read_head(path: Path) -> bytes:
    """The start of a queued message, for a notice; b"" if its file is lost (_bounce_lost)."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_HEADER_BYTES)
    except FileNotFoundError:
        return b""


def _summary(exc: BaseException) -> str:
    """An exception in a line: its type and text (the log has its traceback)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[: relay.REPLY_TEXT]


def _first_addresses(hops: list[relay.Hop]) -> list[relay.Hop]:
    """The first MAX_ADDRESSES hops, each address once: an attempt tries no more (Postfix's
    smtp_mx_address_limit). An attacker's pass gave five MX hosts the same 40 addresses, and
    one attempt made 200 connections; 300 addresses that swallow connections held one for
    12 hours."""
    seen: set[str] = set()
    kept = []
    for hop in hops:
        if hop.address not in seen:
            seen.add(hop.address)
            kept.append(hop)
    return kept[:MAX_ADDRESSES]


def _destination(domain: str) -> str:
    """What to resolve for a group's domain: the domain, or a relayhost given as an address
    written as the literal RFC 5321 4.1.3 makes of it (an IPv6 one with its "IPv6:" tag:
    without it, a relayhost such as [2001:db8::25] was a bad literal, and never reached)."""
    try:
        ip = ipaddress.ip_address(domain)
    except ValueError:
        return domain
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


def outbound_policy(configured: str, password: bool) -> str:
    """The STARTTLS policy of outbound sessions. With a password for the relayhost, "may"
    (the default) means "verify": over TLS whose certificate nobody checked, the password goes
    to whoever answers for the relayhost's name (a spoofed DNS answer, a machine on the path).
    "encrypt" sends it over unverified TLS, on the operator's word (a self-signed smarthost, a
    relayhost given as an address); "none" even in plain text."""
    return "verify" if password and configured == "may" else configured


@dataclasses.dataclass
class _Slots:
    """A destination's semaphore, and the attempts holding or awaiting it."""

    semaphore: asyncio.Semaphore
    users: int = 0
    alive: float = 0.0  # (monotonic) when a host of it last answered, or a flush came


def _slot_key(domain: str) -> str:
    """Whose slots an attempt takes (--max-per-domain): a domain's organisational domain, so
    that its subdomains share them; an address literal's address, an IPv6 one's /64, so that
    its spellings and its network's other addresses do too (a sixth attacker's pass held every
    thread with four spellings of one IPv6 literal, each its own "domain")."""
    try:
        ip = names.parse_literal(_destination(domain))
    except ValueError:
        return organizational_domain(domain)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)

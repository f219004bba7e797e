"""The inbound checks of one finished message, as a worker runs them before the commit: SPF and
the DKIM signatures, then DMARC over both; all within --dns-timeout, after which what is
unfinished counts as temperror (never a refusal, never a longer wait). The verdict is the
Authentication-Results field to add, the message without forged ones when it had any, and, with
`--inbound-auth enforce`, the 550 for a DMARC failure whose domain asks for rejection — nothing
else refuses mail here (a lone SPF or DKIM failure loses legitimate mail: forwarding, mailing
lists), except, in either mode, a header section too large to be scanned (HEADER_TOO_LARGE);
and `enforce` defers (451, NOT_CHECKED) a DMARC temperror from checks that did not get their
time (`_in_threads`): that is our overload, not the sender's DNS.

SPF and DKIM run in threads (pyspf and dkimpy ask DNS synchronously; their queries go through
the worker's event loop), except for a small message whose lookups the worker's cache holds
already (a sender that writes often): that one is checked in the event loop itself, from the
cache, because handing a message to two threads and their lookups back cost more CPU than the
checks themselves (README, "Benchmark"). The first lookup the cache lacks sends the message
down the threaded path. Such a sender's SPF verdict is kept (`sender_policy.Memo`) as long as
the DNS answers it came from, and DMARC is judged from the cache too; what the cache lacks of
the policy records is asked of the DNS at once, every author's, beside SPF and DKIM when those
go to the threads.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from mailerd import durable, headers
from mailerd.inbound import dmarc, results, sender_policy, signatures
from mailerd.inbound.dmarc import DmarcResult
from mailerd.inbound.lookups import Bridge, Lookups, NotCached
from mailerd.inbound.sender_policy import SpfResult
from mailerd.inbound.signatures import DkimResult
from mailerd.smtp.events import Reply

T = TypeVar("T")
# A header section that does not end within headers.SCAN octets is refused whatever the mode
# (as Exim's header_maxsize does, at 1 MB): a field past the scan could not be checked.
HEADER_TOO_LARGE = Reply(
    552, "5.3.4", f"Message header section too large (the limit is {headers.SCAN // 1024} KiB)"
)
# Under enforce, for a DMARC temperror from checks that did not get their time: they began late
# or never, the worker's check threads all taken (an attacker's pass jammed them with sessions
# whose SPF includes never answer), or the DKIM thread was still at work when the time was up
# (another made it late with costly bodies). Our overload, not the sender's DNS: the sender
# tries again later, and a forged p=reject message does not pass unchecked.
NOT_CHECKED = Reply(
    451, "4.7.0", "Temporary local problem: the message could not be checked, try again later"
)
# The largest message checked in the event loop when the cache allows: DKIM hashes the whole
# body, and a session of the worker waits meanwhile (at this size, well under a millisecond);
# and the most header lines it may have there: each signature indexes the fields, and an
# attacker's pass filled 60 KB with thousands of them to stall the loop.
INLINE_MAX = 64 * 1024
INLINE_MAX_LINES = 300
LOOKUP_SHARE = 0.9  # of the timeout, for a message's lookups in the check threads


@dataclass(frozen=True)
class Verdict:
    header: str  # the Authentication-Results field, CRLF-terminated
    content: bytes | None  # the message without forged Authentication-Results, if it had some
    refusal: Reply | None  # enforce: DMARC says reject
    summary: str  # for the log: "spf=pass dkim=pass dmarc=pass"
    sender_spf: str = ""  # SPF's result for the MAIL FROM ("" for <>, where it checks the HELO)


class Verifier:
    def __init__(
        self,
        hostname: str,
        lookups: Lookups,
        loop: asyncio.AbstractEventLoop,
        executor: Executor,
        *,
        timeout: float,
        enforce: bool,
    ) -> None:
        self.hostname = hostname
        self.lookups = lookups
        self.cached = Bridge(lookups, loop, timeout, cache_only=True)
        self.spf_memo = sender_policy.Memo()
        self.loop = loop
        self.executor = executor
        self.timeout = timeout
        self.enforce = enforce

    async def check(self, ip: str, helo: str, sender: str, body: durable.Body) -> Verdict:
        deadline = self.loop.time() + self.timeout
        head = _head(body)
        end = headers.section_end(head)
        if unscannable(body, head, end):
            return Verdict("", None, HEADER_TOO_LARGE, "header section too large")
        signed = signatures.present(head, end)
        from_domains = headers.from_domains(head)
        authors = from_domains or ()
        small = head.count(b"\n", 0, end) <= INLINE_MAX_LINES
        found = self._from_cache(ip, helo, sender, body, signed, authors) if small else None
        rushed = False  # (the checks did not get their time: `_in_threads`)
        records = dmarc.PolicyRecords(self.lookups)
        fetching = None  # (the policy lookups, beside the threads' SPF and DKIM)
        try:
            if found is not None:
                spf, dkim = found
            else:
                fetching = self.loop.create_task(records.fetch(from_domains))
                spf, dkim, rushed = await self._in_threads(
                    ip, helo, sender, body, signed, head[:end], authors
                )
            try:  # (from the cache, as most are, or from what was fetched: no timer)
                verdict = dmarc.judge(records.txt, from_domains, spf, dkim)
            except NotCached:
                if fetching is None:  # (from the cache: every author's policy at once too)
                    fetching = self.loop.create_task(records.fetch(from_domains))
                verdict = await self._dmarc(records, fetching, from_domains, spf, dkim, deadline)
        finally:
            if fetching is not None:
                fetching.cancel()  # (done, or ended by an error or by the session's end)
        if not self.enforce and verdict.disposition != "none":  # dis= says what was done
            verdict = replace(verdict, disposition="none")  # (OpenDMARC's meaning): nothing
        field = results.header(self.hostname, spf, dkim, verdict)
        content = await without_forged(self.hostname, body, head[:end], self.loop, self.executor)
        refusal = None
        if self.enforce and verdict.rejects:
            refusal = _refusal(verdict)
        elif self.enforce and verdict.result == "temperror" and rushed:
            refusal = NOT_CHECKED
        summary = "spf={} dkim={} dmarc={}".format(
            spf.result, ",".join(r.result for r in dkim), verdict.result
        )
        sender_spf = spf.result if spf.identity == "mailfrom" else ""
        return Verdict(field, content, refusal, summary, sender_spf)

    async def _dmarc(
        self,
        records: dmarc.PolicyRecords,
        fetching: asyncio.Task[None],
        from_domains: list[str] | None,
        spf: SpfResult,
        dkim: list[DkimResult],
        deadline: float,
    ) -> DmarcResult:
        """The verdict once the policy records come, by the check's deadline."""
        remaining = max(deadline - self.loop.time(), 0.1)
        evaluation = dmarc.Evaluation(self.lookups, from_domains, spf, dkim, records=records)

        try:
            async with asyncio.timeout(remaining):  # (no task of its own: see BoundedResolver)
                await fetching  # (then `run` asks for nothing, or for what a race left out)
                return await evaluation.run()
        except TimeoutError:
            return evaluation.so_far("timed out")

    def _from_cache(
        self,
        ip: str,
        helo: str,
        sender: str,
        body: durable.Body,
        signed: bool,
        authors: Sequence[str],
    ) -> tuple[SpfResult, list[DkimResult]] | None:
        """SPF and DKIM in the event loop, if the message is small and the cache holds every
        answer they need; else None."""
        if not isinstance(body, bytes) or len(body) > INLINE_MAX:
            return None
        try:
            spf = self._spf_from_cache(ip, helo, sender)
            dkim = signatures.verify(self.cached, body, authors) if signed else [DkimResult("none")]
        except NotCached:
            return None
        return spf, dkim

    def _spf_from_cache(self, ip: str, helo: str, sender: str) -> SpfResult:
        """The memo's verdict, or pyspf's from the cache (NotCached if it lacks an answer)."""
        now = time.time()  # (the clock of the DNS cache's expiry times)
        spf = self.spf_memo.get(ip, sender, helo, now)
        if spf is None:
            self.cached.expires = math.inf
            spf = sender_policy.check(self.cached, ip, sender, helo)
            self.spf_memo.put(ip, sender, helo, spf, self.cached.expires)
        return spf

    def _dkim_thread(
        self,
        began: dict[str, float],
        keys: Bridge,
        body: durable.Body,
        authors: Sequence[str],
        progress: signatures.Progress,
    ) -> asyncio.Future[list[DkimResult]]:
        """`_dkim` in a check thread. A body in a file is read there through a descriptor of
        its own, closed when the job ends: one still queued when the time is up runs after
        the commit has closed the body's, whose number may be another session's socket by then
        (an attacker's pass saw it read one)."""
        own = os.dup(body) if isinstance(body, int) else body
        try:
            job = self.executor.submit(_begun, began, "dkim", _dkim, keys, own, authors, progress)
        except BaseException:  # (the executor shut down: a worker stopping)
            if isinstance(own, int):
                os.close(own)
            raise
        if isinstance(own, int):
            fd = own
            job.add_done_callback(lambda _job: os.close(fd))
        return asyncio.wrap_future(job, loop=self.loop)

    async def _in_threads(
        self,
        ip: str,
        helo: str,
        sender: str,
        body: durable.Body,
        signed: bool,
        section: bytes,
        authors: Sequence[str],
    ) -> tuple[SpfResult, list[DkimResult], bool]:
        """SPF and DKIM in check threads, within the timeout; and whether they did not get
        their time: one began only after half of it, or not at all (the threads were all
        taken), or DKIM's was still at work at the end or had run out of time for a lookup."""
        # One deadline for all the message's lookups, so that its threads are free again
        # within the timeout (however many signatures, includes and keys go unanswered); a
        # little before it, so that a thread that waited on the DNS is done in time, and one
        # that is not was kept by its work (or by us), not by the DNS.
        started = time.monotonic()
        deadline = started + self.timeout * LOOKUP_SHARE
        bridge = Bridge(self.lookups, self.loop, self.timeout, deadline=deadline)
        began: dict[str, float] = {}  # (time.monotonic())
        spf_future = self.loop.run_in_executor(
            self.executor, _begun, began, "spf", sender_policy.check, bridge, ip, sender, helo
        )
        keys = Bridge(self.lookups, self.loop, self.timeout, deadline=deadline)
        progress = signatures.Progress()
        dkim_future = (
            self._dkim_thread(began, keys, body, authors, progress)
            if signed
            else _done([DkimResult("none")])
        )
        pending: list[asyncio.Future[Any]] = [spf_future, dkim_future]
        await asyncio.wait(pending, timeout=self.timeout)
        spf = _outcome(spf_future, lambda: _spf_timeout(sender, helo, self.timeout))
        dkim = _outcome(
            dkim_future,
            lambda: progress.so_far("timed out") or signatures.unfinished(section, "timed out"),
        )
        # Begun late, a check had too little time left to be a fair one either.
        late = started + self.timeout / 2
        waited = [began.get(job, math.inf) > late for job in ("spf", "dkim")[: 1 + signed]]
        # DKIM's lookups share the time out (`signatures.verify`): one not made for want of
        # time means its work, not the DNS, took the time (a fourth attacker's pass: a costly
        # body, then a forged author signature whose key lookup came too late).
        unfinished = signed and (not dkim_future.done() or keys.ran_out)
        return spf, dkim, any(waited) or unfinished


def unscannable(body: durable.Body, head: bytes, end: int) -> bool:
    """Does the header section go on past what is scanned (`head`, its end at `end`)? Fields
    there would go unseen: a second From:, a forged result."""
    return end == headers.SCAN and _size(body) > end and b"\r\n\r\n" not in head


async def unchecked(
    hostname: str,
    body: durable.Body,
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
    *,
    trusted: bool = False,
) -> tuple[bytes | None, Reply | None]:
    """For mail that is not checked here but whose reader must not meet a forged verdict
    (`--inbound-auth off` on the network listeners; authenticated submission; a `trusted`
    local client, which may be handing on mail from elsewhere, as fetchmail does): the message
    without Authentication-Results fields of ours (None: it had none), or HEADER_TOO_LARGE for
    a header section past the scan, where one would go unseen. A trusted client's such
    message is not refused (the owner's own programs are never refused for the shape of their
    header, and what a fetched message's provider took has passed its limits), but read whole
    for forged fields, in a check thread: kept as it was, padding was all a forger needed to
    bring a pre-stamped pass to the reader through fetchmail."""
    head = _head(body)
    end = headers.section_end(head)
    if unscannable(body, head, end):
        if not trusted:
            return None, HEADER_TOO_LARGE
        whole = await _whole(body, loop, executor)
        content = await loop.run_in_executor(
            executor, results.without_forged, whole, hostname, len(whole)
        )
        return content, None
    return await without_forged(hostname, body, head[:end], loop, executor), None


async def without_forged(
    hostname: str,
    body: durable.Body,
    section: bytes,
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
) -> bytes | None:
    """The message without the Authentication-Results fields that bear `hostname` as their
    authserv-id, or None when its header `section` has none (RFC 8601 5: a reader or filter
    that trusts our hostname's verdicts must never meet one made outside). The whole message
    is read only when there is one to remove."""
    if results.without_forged(section, hostname) is None:  # (none, or other hosts' only)
        return None
    return results.without_forged(await _whole(body, loop, executor), hostname)


async def _whole(body: durable.Body, loop: asyncio.AbstractEventLoop, executor: Executor) -> bytes:
    """The whole message, read from its spill file in a check thread if it is not in memory."""
    if isinstance(body, bytes):
        return body
    return await loop.run_in_executor(executor, durable.read_body, body)


def _begun(began: dict[str, float], name: str, check: Callable[..., T], *args: Any) -> T:
    """(In a check thread.) `check(*args)`, its start noted in `began`."""
    began[name] = time.monotonic()
    return check(*args)


def _dkim(
    bridge: Bridge, body: durable.Body, authors: Sequence[str], progress: signatures.Progress
) -> list[DkimResult]:
    """(In a check thread.) The DKIM results of the message."""
    return signatures.verify(bridge, durable.read_body(body), authors, progress)


def _size(body: durable.Body) -> int:
    return len(body) if isinstance(body, bytes) else os.fstat(body).st_size


def _head(body: durable.Body) -> bytes:
    """The start of the message, where its header section is."""
    return durable.head(body, headers.SCAN)


def _done(value: list[DkimResult]) -> asyncio.Future[list[DkimResult]]:
    future: asyncio.Future[list[DkimResult]] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _outcome(future: asyncio.Future[T], late: Callable[[], T]) -> T:
    """The future's result, or what `late()` makes of its not being done in time."""
    if not future.done():
        future.add_done_callback(_ignore)  # (its thread finishes on its own; nobody waits)
        return late()
    return future.result()


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning


def _spf_timeout(sender: str, helo: str, timeout: float) -> SpfResult:
    kind, value, domain = sender_policy.identity(sender, helo)
    return SpfResult("temperror", kind, value, domain, f"no answer in {timeout:g} s")


def _refusal(verdict: DmarcResult) -> Reply:
    if verdict.result == "permerror":  # (too many author domains, or one no DNS name can be)
        return Reply(
            550,
            "5.7.1",
            f"Message rejected: DMARC cannot vouch for its From: ({verdict.reason})",
        )
    return Reply(
        550,
        "5.7.1",
        f"Message rejected: it fails DMARC for {verdict.from_domain}, "
        "whose policy is to reject such mail",
    )

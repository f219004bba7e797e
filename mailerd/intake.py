"""Taking in a finished message: its queue id, its trace header, its local copies, and the one
reply its client gets — the table that turns storage errors into SMTP replies is here and
nowhere else (storage itself raises OSError, MailboxLocked…, and knows no SMTP).

Two processes take messages in, with the same steps and the same log lines: the delivery
process (any message with a remote recipient: queue first, then the local copies) and a worker
(a message whose recipients are all local: straight to the mailbox writer, one process hop
instead of two). Both work from the same `ipc.messages.Commit`.

A local copy that fails is not answered 451 (the copies already written would be delivered
twice): the delivery process writes it again at once if its writer went away (the master has
started another), else queues that recipient for a later local retry, and only if that fails
too does the client get 4xx. Over the channel a failure travels as an
`ipc.messages.FailedCopy`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable, Iterable

from mailerd import durable, trace
from mailerd.ipc.messages import Commit, FailedCopy, Outcome, Target
from mailerd.smtp.events import Reply
from mailerd.spool import MailboxLocked

log = logging.getLogger("mailerd.delivery")

WriteCopy = Callable[[str, bytes, durable.Body], Awaitable[int]]
Failure = tuple[Target, BaseException]  # a local copy, and what failed it

# What a client hears when storing its message failed: the whole table.
DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage")
MAILBOX_BUSY = Reply(451, "4.2.0", "Mailbox busy (locked); try again later")
IO_ERROR = Reply(451, "4.3.0", "Local error in processing; try again later")


def storage_reply(exc: BaseException) -> Reply:
    """The reply for a failed write: a full disk or quota is 452 4.3.1, a mailbox locked too
    long 451 4.2.0, anything else 451 4.3.0."""
    if isinstance(exc, MailboxLocked):
        return MAILBOX_BUSY
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK_FULL
    return IO_ERROR


def begin(request: Commit, hostname: str, size: int) -> tuple[str, bytes]:
    """A new queue id and the message's Received: header; logs the message's first line."""
    queue_id = trace.new_id()
    targets = request.targets
    received = trace.received(
        helo=request.helo,
        peer_ip=request.peer,
        hostname=hostname,
        protocol=request.protocol,
        queue_id=queue_id,
        recipient=targets[0].address if len(targets) == 1 else None,
        tls=request.tls,
    )
    # The inbound checks' verdict goes right below our Received: (RFC 8601 5: with the trace).
    received += request.auth_results.encode("utf-8")
    log.info(
        "%s: client=[%s], helo=%s, from=<%s>, size=%d, nrcpt=%d%s",
        queue_id,
        request.peer,
        request.helo,
        request.sender,
        size,
        len(targets),
        f", {request.checks}" if request.checks else "",
    )
    return queue_id, received


async def write_local(
    write: WriteCopy,
    queue_id: str,
    sender: str,
    received: bytes,
    body: durable.Body,
    targets: Iterable[Target],
) -> list[Failure]:
    """One copy per local mailbox (two addresses, user and user+tag, share one); the local
    copies that failed."""
    head = trace.return_path(sender) + received
    by_mailbox: dict[str, Target] = {}
    for target in targets:
        if target.mailbox is not None:
            by_mailbox.setdefault(target.mailbox, target)
    results = await _write_all(write, list(by_mailbox), head, body)
    failed: list[Failure] = []
    for (name, target), result in zip(by_mailbox.items(), results, strict=True):
        if isinstance(result, Exception):
            log.warning(
                "%s: to=<%s>, relay=local, status=deferred (mailbox %s: %s)",
                queue_id,
                target.address,
                name,
                result,
            )
            failed.append((target, result))
        else:
            log.info(
                "%s: to=<%s>, relay=local, status=sent (mailbox %s, message %d)",
                queue_id,
                target.address,
                name,
                result,
            )
    return failed


async def _write_all(
    write: WriteCopy, names: list[str], head: bytes, body: durable.Body
) -> list[int | Exception]:
    """Each mailbox's message number, or the exception that failed it."""
    if len(names) == 1:  # the common case, without gather's task per mailbox
        try:
            return [await write(names[0], head, body)]
        except Exception as exc:
            return [exc]
    results = await asyncio.gather(*(write(n, head, body) for n in names), return_exceptions=True)
    found: list[int | Exception] = []
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # cancellation is not a mailbox failure
        found.append(result)
    return found


def writer_went_away(exc: BaseException) -> bool:
    """Whether a copy failed because its writer's channel broke before the answer came (the
    writer died): then it may have been written, or not."""
    return isinstance(exc, ConnectionError)


def encode_failures(failed: list[Failure]) -> tuple[FailedCopy, ...]:
    """Failures as a worker sends them to the delivery process (a writer that went away as
    ECONNRESET, which `decode_failures` turns back into a ConnectionError)."""
    return tuple(
        FailedCopy(
            target,
            (exc.strerror if isinstance(exc, OSError) else None) or str(exc),
            getattr(exc, "errno", None) or (errno.ECONNRESET if writer_went_away(exc) else 5),
            isinstance(exc, MailboxLocked),
        )
        for target, exc in failed
    )


def decode_failures(items: Iterable[FailedCopy]) -> list[Failure]:
    # (OSError(ECONNRESET, ...) is a ConnectionResetError: Python picks the subclass by errno.)
    return [(f.target, MailboxLocked() if f.locked else OSError(f.errno, f.error)) for f in items]


def queued(queue_id: str) -> Reply:
    """The reply to a message that is durable for all its recipients."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def outcome(reply: Reply) -> Outcome:
    """A reply as the answer to a commit carries it."""
    return Outcome(reply.code, reply.status or "", reply.text)


def reply_of(answer: Outcome) -> Reply:
    """The reply an answer to a commit carries (the inverse of `outcome`)."""
    return Reply(answer.code, answer.status or None, answer.text)

"""Committing a finished envelope: its queue id, its trace header, and its local copies.

Two processes commit messages, with the same steps and the same log lines: the delivery process
(any message with a remote recipient: queue first, then the local copies) and a worker (a
message whose recipients are all local: straight to the mailbox writer, one process hop instead
of two). `request` is the worker's commit header (see docs/channel.md).

A local copy that fails is not answered 451 (the copies already written would be delivered
twice): the caller queues that recipient for a later local retry, and only if that fails too
does the client get 4xx. Over the channel a failure travels as `{"error", "errno", "locked"}`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from mailerd import durable, trace
from mailerd.smtp.events import Reply
from mailerd.spool import MailboxLocked

log = logging.getLogger("mailerd.delivery")

WriteCopy = Callable[[str, bytes, durable.Body], Awaitable[int]]
Failure = tuple[dict[str, Any], Exception]  # a recipient of the request, and what failed it


def all_local(request: dict[str, Any]) -> bool:
    return all(r["mailbox"] is not None for r in request["recipients"])


def body_size(body: durable.Body) -> int:
    return len(body) if isinstance(body, bytes) else os.fstat(body).st_size


def begin(request: dict[str, Any], hostname: str, size: int) -> tuple[str, bytes]:
    """A new queue id and the message's Received: header; logs the message's first line."""
    queue_id = trace.new_id()
    recipients = request["recipients"]
    received = trace.received(
        helo=request["helo"],
        peer_ip=request["peer"],
        hostname=hostname,
        protocol=request["protocol"],
        queue_id=queue_id,
        recipient=recipients[0]["address"] if len(recipients) == 1 else None,
    )
    log.info(
        "%s: client=[%s], helo=%s, from=<%s>, size=%d, nrcpt=%d",
        queue_id,
        request["peer"],
        request["helo"],
        request["sender"],
        size,
        len(recipients),
    )
    return queue_id, received


async def write_local(
    write: WriteCopy,
    queue_id: str,
    sender: str,
    received: bytes,
    body: durable.Body,
    recipients: list[dict[str, Any]],
) -> list[Failure]:
    """One copy per local mailbox (two addresses, user and user+tag, share one); the local
    recipients whose copy failed."""
    head = trace.return_path(sender) + received
    by_mailbox: dict[str, dict[str, Any]] = {}
    for r in recipients:
        if r["mailbox"] is not None:
            by_mailbox.setdefault(r["mailbox"], r)
    results = await _write_all(write, list(by_mailbox), head, body)
    failed = []
    for (name, r), result in zip(by_mailbox.items(), results, strict=True):
        if isinstance(result, Exception):
            log.warning(
                "%s: to=<%s>, relay=local, status=deferred (%s)", queue_id, r["address"], result
            )
            failed.append((r, result))
        else:
            log.info(
                "%s: to=<%s>, relay=local, status=sent (mailbox %s, message %d)",
                queue_id,
                r["address"],
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
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # cancellation is not a mailbox failure
    return results  # type: ignore[return-value]


def encode_failures(failed: list[Failure]) -> list[dict[str, Any]]:
    """Failures as a worker sends them to the delivery process for a local retry."""
    return [
        {
            **r,
            "error": (exc.strerror if isinstance(exc, OSError) else None) or str(exc),
            "errno": getattr(exc, "errno", None) or 5,
            "locked": isinstance(exc, MailboxLocked),
        }
        for r, exc in failed
    ]


def decode_failures(items: list[dict[str, Any]]) -> list[Failure]:
    failed: list[Failure] = []
    for item in items:
        r = {"address": str(item["address"]), "mailbox": str(item["mailbox"])}
        exc: Exception = (
            MailboxLocked()
            if item.get("locked")
            else OSError(int(item.get("errno") or 5), str(item.get("error", "")))
        )
        failed.append((r, exc))
    return failed


MAILBOX_BUSY = Reply(451, "4.2.0", "Mailbox busy (locked); try again later")


def queued(queue_id: str) -> Reply:
    """The reply to a message that is durable for all its recipients."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def answer_fields(reply: Reply) -> dict[str, Any]:
    """A reply as a commit's answer carries it (docs/channel.md)."""
    return {"code": reply.code, "status": reply.status, "text": reply.text}


def answer_reply(answer: dict[str, Any]) -> Reply:
    """The reply a commit's answer carries (the inverse of `answer_fields`)."""
    return Reply(int(answer["code"]), answer["status"], answer["text"])

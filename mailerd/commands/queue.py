"""`mailerd queue`: list, flush and delete queued mail, like Postfix's mailq/postqueue/postsuper.

It talks to the running daemon's delivery process over `<queue>/private/delivery.sock` (the same
channel the workers use), so changes never race the scheduler. When no daemon is running, the
list is read from the queue directory and a delete removes the files directly.

    mailerd queue [-c FILE] [-q DIR]            list
    mailerd queue [-c FILE] [-q DIR] flush      retry everything now
    mailerd queue [-c FILE] [-q DIR] delete ID… remove messages
    mailerd queue [-c FILE] [-q DIR] init       make the queue's layout, as the daemon does
                                                at start (the .deb's postinst runs it, so
                                                that sendmail works before the first start)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mailerd import config
from mailerd.delivery.queue import Queue, QueueItem
from mailerd.ipc.channel import Client
from mailerd.ipc.maildrop import MAILDROP, is_submission_name
from mailerd.ipc.messages import (
    Deleted,
    DeleteQueued,
    Flushed,
    FlushQueue,
    ListQueue,
    QueueListing,
)

TIMEOUT = 30.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mailerd queue", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help="config file (for its queue setting)")
    parser.add_argument("-q", "--queue", help="queue directory")
    parser.add_argument(
        "action", nargs="?", default="list", choices=("list", "flush", "delete", "init")
    )
    parser.add_argument("ids", nargs="*", metavar="ID")
    args = parser.parse_args(argv)
    queue_dir = _queue_dir(args)
    if args.action == "delete" and not args.ids:
        parser.error("delete needs at least one queue ID")
    if args.action == "init":
        return _init(queue_dir, args.config)
    request = {"list": ListQueue(), "flush": FlushQueue(), "delete": DeleteQueued(tuple(args.ids))}
    try:
        answer = asyncio.run(_ask(queue_dir, request[args.action].encode()))
    except (OSError, TimeoutError, ConnectionError):
        answer = None  # no daemon: the list is read, and a delete done, right here
    if args.action == "list":
        if answer is None and not queue_dir.is_dir():
            print(
                f"mailerd queue: no queue at {queue_dir}: mailerd makes it when it starts "
                "(`mailerd queue init` too); is that the configuration's queue?",
                file=sys.stderr,
            )
            return 1
        items = QueueListing.decode(answer).items if answer else None
        listed = list(items or [asdict(e) for e in _load(queue_dir)])
        waiting = _in_maildrop(queue_dir)
        if waiting:
            where = f"from sendmail wait in {queue_dir / MAILDROP}, " + (
                "not picked up yet" if answer else "to be picked up when mailerd runs"
            )
            if not listed:
                print(f"No message in the queue yet: {waiting} {where}")
                return 0
            print(format_listing(listed, time.time()))
            print(f"-- and {waiting} more {where}")
            return 0
        print(format_listing(listed, time.time()))
        return 0
    if args.action == "flush":
        if answer is None:
            print("mailerd queue: mailerd is not running; nothing to flush", file=sys.stderr)
            return 1
        print(f"flushed: {Flushed.decode(answer).count} message(s) will be retried now")
        return 0
    return _delete(queue_dir, args.ids, Deleted.decode(answer) if answer else None)


def _init(queue_dir: Path, config_file: str | None) -> int:
    """The queue's directories, modes and owners (the children's user), as at start-up."""
    from mailerd import privileges

    argv = ["-n", "none", "-l", "none"] + (["-c", config_file] if config_file else [])
    try:
        user = privileges.resolve(config.load(argv).user)
        Queue(queue_dir).create_dirs()
        privileges.prepare_queue(queue_dir, user)
    except (config.ConfigError, privileges.PrivilegeError, OSError) as exc:
        print(f"mailerd queue: cannot make {queue_dir}: {exc}", file=sys.stderr)
        return 1
    return 0


def _queue_dir(args: argparse.Namespace) -> Path:
    if args.queue:
        return Path(args.queue)
    argv = ["-n", "none", "-l", "none"] + (["-c", args.config] if args.config else [])
    try:
        return config.load(argv).queue
    except config.ConfigError as exc:
        print(f"mailerd queue: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


async def _ask(queue_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    client = Client(str(queue_dir / "private" / "delivery.sock"), TIMEOUT)
    try:
        return await client.request(request)
    finally:
        client.close()


def _load(queue_dir: Path) -> list[QueueItem]:
    try:
        return Queue(queue_dir).load(clean=False)
    except FileNotFoundError:
        return []


def _in_maildrop(queue_dir: Path) -> int:
    """Submissions waiting in the maildrop (0 for one this user may not list: it is the
    children's user's, mode 1733, so only they and root count it)."""
    try:
        with os.scandir(queue_dir / MAILDROP) as entries:
            return sum(1 for entry in entries if is_submission_name(entry.name))
    except OSError:
        return 0


def _delete(queue_dir: Path, ids: list[str], answer: Deleted | None) -> int:
    if answer is not None:
        deleted = set(answer.ids)
    else:
        queue = Queue(queue_dir)
        deleted = {i for i in ids if (queue_dir / "env" / i).exists()}
        for queue_id in deleted:
            queue.remove(queue_id)
    for queue_id in ids:
        print(f"{queue_id}: {'deleted' if queue_id in deleted else 'not in the queue'}")
    return 0 if deleted == set(ids) else 1


def format_listing(items: list[dict[str, Any]], now: float) -> str:
    """A mailq-like listing: one block per message, recipients indented below."""
    if not items:
        return "Mail queue is empty"
    lines = [f"{'Queue ID':<20} {'Age':>6} {'Size':>9}  Sender / Recipients"]
    total = 0
    for item in sorted(items, key=lambda i: i["created"]):
        total += item.get("size", 0)
        age = _age(now - item["created"])
        sender = item["sender"] or "MAILER-DAEMON"
        lines.append(f"{item['id']:<20} {age:>6} {item.get('size', 0):>9}  <{sender}>")
        next_in = item.get("next_attempt", 0) - now
        for r in item["recipients"]:
            state = r["state"]
            if state == "pending":
                when = f"next try in {_age(next_in)}" if next_in > 0 else "next try now"
                error = f": {r['last_error']}" if r.get("last_error") else ""
                lines.append(f"{'':<38}<{r['address']}> ({when}{error})")
            else:
                lines.append(f"{'':<38}<{r['address']}> ({state})")
    lines.append(f"-- {total // 1024} KiB in {len(items)} message(s)")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

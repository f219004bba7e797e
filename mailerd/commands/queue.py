"""`mailerd queue`: list, flush and delete queued mail, like Postfix's mailq/postqueue/postsuper.

It talks to the running daemon's delivery process over `<queue>/private/delivery.sock` (the same
channel the workers use), so changes never race the scheduler. Only when no daemon is there (no
socket, or nobody accepts on it) is the list read from the queue directory, and a delete done on
the files directly: a daemon that is slow to answer is still there, and its files are its own.
A message being delivered when it is deleted goes when that attempt ends, if it did not deliver.

What the listing shows of an envelope (senders, recipients, remote servers' replies) comes from
outside: what str.isprintable() rejects is shown escaped, so that no envelope can put control
sequences (U+009B CSI, a bidi override) on the administrator's terminal. Damaged envelopes, set
aside by the daemon in `<queue>/corrupt/` (or not yet: the daemon is not running), are named.

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
from collections.abc import Callable
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
    Refused,
)
from mailerd.log import shorten

TIMEOUT = 30.0
# The largest answer taken from the daemon: its listing is every item's envelope, about 300
# octets each, and the channel's usual 1 MiB held some 3,000; a queue of tens of thousands
# (a destination down for days) came back as "no answer" and the files were listed instead.
MAX_ANSWER = 256 << 20
# What connecting says when no daemon is there: no socket, or nobody accepts on it (a stale
# one). Anything else (a timeout, EACCES, a reset) means a daemon that is there.
NO_DAEMON = (FileNotFoundError, ConnectionRefusedError)
_DONE = {"flush": "flushed", "delete": "deleted"}


def main(argv: list[str], prog: str = "mailerd queue") -> int:
    """`prog` names the command in what it says (`mailq` runs this too)."""

    def say(text: str) -> None:
        print(f"{prog}: {text}", file=sys.stderr)

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
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
    except NO_DAEMON:
        answer = None  # no daemon: the list is read, and a delete done, right here
    except PermissionError as exc:  # (its files would be refused as well: said once)
        say(cannot_read(queue_dir, exc))
        return os.EX_NOPERM
    except (OSError, TimeoutError, ConnectionError) as exc:
        # A daemon is there but did not answer (busy, or not ours to ask): its files are its
        # own. Only a list, which changes nothing, may look at them instead.
        say(f"no answer from mailerd: {_why(exc)}")
        if args.action != "list":
            say(f"nothing {_DONE[args.action]}")
            return 1
        say("the queue's files, as they are:")
        answer = None
    if answer is not None and "error" in answer:  # (Refused: the daemon did not do it)
        say(f"mailerd: {_shown(Refused.decode(answer).error)}")
        return 1
    if args.action == "list":
        return _list(queue_dir, answer, say)
    if args.action == "flush":
        if answer is None:
            say("mailerd is not running; nothing to flush")
            return 1
        print(f"flushed: {Flushed.decode(answer).count} message(s) will be retried now")
        return 0
    return _delete(queue_dir, args.ids, Deleted.decode(answer) if answer else None)


def cannot_read(queue_dir: Path | str, exc: OSError) -> str:
    """Why the queue cannot be read, and, when it is a permission, who may."""
    advice = ": run it as root" if isinstance(exc, PermissionError) else ""
    return f"cannot read the queue {queue_dir}: {exc.strerror}{advice}"


def _list(queue_dir: Path, answer: dict[str, Any] | None, say: Callable[[str], None]) -> int:
    """The listing: the daemon's `answer`, or (None) the queue's files as they are."""
    if answer is None and not queue_dir.is_dir():
        say(
            f"no queue at {queue_dir}: mailerd makes it when it starts "
            "(`mailerd queue init` too); is that the configuration's queue?"
        )
        return 1
    queue = Queue(queue_dir)
    items = QueueListing.decode(answer).items if answer else None
    listed = list(items or [asdict(e) for e in _load(queue)])
    waiting = _in_maildrop(queue_dir)
    if waiting and not listed:
        print(f"No message in the queue yet: {waiting} {_waiting_where(queue_dir, answer)}")
    else:
        print(format_listing(listed, time.time()))
    if waiting and listed:
        print(f"-- and {waiting} more {_waiting_where(queue_dir, answer)}")
    for line in _damaged(queue):
        print(line)
    return 0


def _waiting_where(queue_dir: Path, answer: dict[str, Any] | None) -> str:
    return f"from sendmail wait in {queue_dir / MAILDROP}, " + (
        "not picked up yet" if answer else "to be picked up when mailerd runs"
    )


def _damaged(queue: Queue) -> list[str]:
    """What the listing says of damaged envelopes: those set aside (corrupt/), and those the
    daemon has not seen yet (`unreadable`, from a load without the daemon)."""
    lines = []
    damaged = queue.damaged()
    if damaged:
        lines.append(
            f"-- {len(damaged)} damaged message(s) set aside in {queue.root / 'corrupt'}, "
            f"not delivered: {', '.join(_shown(i) for i in damaged)}"
        )
    for name, why in sorted(queue.unreadable.items()):
        lines.append(
            f"-- damaged envelope {_shown(name)} ({_shown(why)}): not delivered; "
            "set aside in corrupt/ when mailerd starts"
        )
    return lines


def _why(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


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
    client = Client(str(queue_dir / "private" / "delivery.sock"), TIMEOUT, max_header=MAX_ANSWER)
    try:
        return await client.request(request)
    finally:
        client.close()


def _load(queue: Queue) -> list[QueueItem]:
    try:
        return queue.load(clean=False)
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
    later: set[str] = set()
    failed: dict[str, str] = {}
    if answer is not None:
        deleted, later = set(answer.ids), set(answer.later)
    else:
        queue = Queue(queue_dir)
        try:  # (only a name the queue lists: an ID with a `/` or `..` named any file)
            deleted = {i for i in set(ids) & queue.ids() if not i.startswith(".")}
        except OSError:
            deleted = set()
        for queue_id in sorted(deleted):
            try:
                queue.remove(queue_id)
            except OSError as exc:  # (a name that is no file of ours, a permission)
                failed[queue_id] = _why(exc)
        deleted -= set(failed)
    for queue_id in ids:
        if queue_id in later:
            what = "being delivered now; removed when this attempt ends, unless it delivers it"
        elif queue_id in failed:
            what = f"cannot delete: {_shown(failed[queue_id])}"
        else:
            what = "deleted" if queue_id in deleted else "not in the queue"
        print(f"{_shown(queue_id)}: {what}")
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
        sender = _shown(item["sender"]) or "MAILER-DAEMON"
        lines.append(f"{_shown(item['id']):<20} {age:>6} {item.get('size', 0):>9}  <{sender}>")
        next_in = item.get("next_attempt", 0) - now
        for r in item["recipients"]:
            state, address = r["state"], _shown(r["address"])
            if state == "pending":
                when = f"next try in {_age(next_in)}" if next_in > 0 else "next try now"
                error = f": {_shown(r['last_error'])}" if r.get("last_error") else ""
                lines.append(f"{'':<38}<{address}> ({when}{error})")
            else:
                lines.append(f"{'':<38}<{address}> ({_shown(state)})")
    kib = -(-total // 1024)  # (rounded up: a queue of small messages is not "0 KiB")
    lines.append(f"-- {kib} KiB in {len(items)} message(s)")
    return "\n".join(lines)


def _shown(text: str) -> str:
    """Text from an envelope as a terminal may show it: escaped where str.isprintable() says
    no (log.shorten's escapes: a C1 control such as U+009B, which xterm takes for CSI, a bidi
    override, a line break), whole."""
    return shorten(text, len(text))


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"

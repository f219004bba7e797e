"""Every message that crosses between mailerd's processes: one frozen dataclass each, with its
encoding as the JSON header of a channel frame (`channel`: the framing; a message's body, and
a descriptor when there is one, travel beside the header). These two modules are the whole
contract between the processes; docs/channel.md is checked against `describe()` by a test.

    worker -> delivery        Commit, RetryLocal            -> Outcome
                              WriterChannel                 -> WriterChannelGiven (+ descriptor)
    mailerd queue -> delivery ListQueue -> QueueListing, FlushQueue -> Flushed,
                              DeleteQueued -> Deleted
    worker, delivery -> writer MailboxWrite                 -> Written | WriteFailed
    delivery -> writer        Adopt (+ descriptor)          -> Done
    master -> delivery        WriterStarted (+ descriptor)  (no answer)

Each request names its kind in the header's `op`; the channel adds the request's `id`, which
its answer repeats, and `fd: true` on a frame that carries a descriptor. `decode_request()`
turns a header into its request, refusing (BadMessage) anything malformed: the delivery
process and the mailbox writer read these from other processes, and the writer runs as root.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar, TypeVar

from mailerd.jsonfields import Fields

M = TypeVar("M", bound="Message")


class BadMessage(ValueError):
    """A header that is no message of the contract; the text says what is wrong."""


class Message:
    """A request or an answer; `op` names a request's kind."""

    __slots__ = ()
    op: ClassVar[str] = ""
    # Every message is a dataclass: declared here, for fields() below.
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def encode(self) -> dict[str, Any]:
        header = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"op": self.op, **header} if self.op else header

    @classmethod
    def decode(cls: type[M], header: dict[str, Any]) -> M:
        raise NotImplementedError

    @classmethod
    def wire_fields(cls) -> list[str]:
        """The header's keys (besides `op` and the channel's `id` and `fd`)."""
        return [f.name for f in fields(cls)]


# -- parts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One copy of a message: into a local mailbox, or relayed to `address` (mailbox None);
    `via`: the alias (`name@domain`) that forwards a relayed copy ("" for none)."""

    address: str  # the recipient as given (a local copy), or where to relay it
    mailbox: str | None
    via: str = ""

    def encode(self) -> dict[str, Any]:
        return {"address": self.address, "mailbox": self.mailbox, "via": self.via}

    @classmethod
    def decode(cls, item: Any) -> Target:
        f = Fields(item, "target", BadMessage)
        return cls(f.text("address"), f.optional_text("mailbox"), f.text("via", ""))


@dataclass(frozen=True, slots=True)
class FailedCopy:
    """A local copy that a worker could not write (queued by the delivery process for a
    retry): the mailbox writer's error, its errno, and whether the mailbox was locked."""

    target: Target
    error: str
    errno: int
    locked: bool

    def encode(self) -> dict[str, Any]:
        return {**self.target.encode(), "error": self.error, "errno": self.errno,
                "locked": self.locked}  # fmt: skip

    @classmethod
    def decode(cls, item: Any) -> FailedCopy:
        target = Target.decode(item)
        if target.mailbox is None:
            raise BadMessage("failed copy: no mailbox")
        f = Fields(item, "failed copy", BadMessage)
        return cls(target, f.text("error"), f.whole("errno", 5), f.flag("locked", False))


# -- worker -> delivery ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Commit(Message):
    """A finished message (the body beside it) to make durable for every target: remote ones
    into the queue, local ones into their mailboxes. `trusted`: from a trusted listener (the
    outgoing copy then gets a Date:/Message-ID: it lacks, and a domain for its header's bare
    addresses)."""

    op: ClassVar[str] = "commit"
    sender: str  # "" for <>
    targets: tuple[Target, ...]
    helo: str
    peer: str  # the client's IP address
    protocol: str  # ESMTP, ESMTPSA, UTF8SMTPS, ... (RFC 3848, 6531), for the Received: header
    body: str  # 7BIT or 8BITMIME
    smtputf8: bool
    trusted: bool
    tls: str = ""  # the session's TLS, as the Received: header says it ("" without)
    auth_results: str = ""  # the inbound checks' Authentication-Results field ("" without)
    checks: str = ""  # their verdicts for the log: "spf=pass dkim=pass dmarc=pass"
    sender_spf: str = ""  # their SPF result for the MAIL FROM ("" unchecked, or for <>)

    def encode(self) -> dict[str, Any]:
        return {
            "op": self.op, "sender": self.sender,
            "targets": [t.encode() for t in self.targets], "helo": self.helo,
            "peer": self.peer, "protocol": self.protocol, "body": self.body,
            "smtputf8": self.smtputf8, "trusted": self.trusted, "tls": self.tls,
            "auth_results": self.auth_results, "checks": self.checks,
            "sender_spf": self.sender_spf,
        }  # fmt: skip

    @classmethod
    def decode(cls, header: dict[str, Any]) -> Commit:
        f = Fields(header, "commit", BadMessage)
        targets = tuple(Target.decode(t) for t in f.array("targets", []))
        if not targets:
            raise BadMessage("targets: none")
        return cls(
            f.text("sender"), targets, f.text("helo"), f.text("peer"), f.text("protocol"),
            f.text("body"), f.flag("smtputf8", False), f.flag("trusted", False), f.text("tls"),
            f.text("auth_results"), f.text("checks"), f.text("sender_spf", ""),
        )  # fmt: skip

    @property
    def all_local(self) -> bool:
        return all(t.mailbox is not None for t in self.targets)


@dataclass(frozen=True, slots=True)
class RetryLocal(Message):
    """A worker wrote a message's local copies itself and some failed: write again those whose
    writer went away, queue the others for a local retry. The body is the one the worker
    wrote; `received` its Received: header; `since` when it first sent them (a copy written
    again looks for one the dead writer committed from then on: MailboxWrite's `since`)."""

    op: ClassVar[str] = "retry-local"
    commit: Commit
    queue_id: str
    received: str
    failed: tuple[FailedCopy, ...]
    since: float

    def encode(self) -> dict[str, Any]:
        return {
            **self.commit.encode(), "op": self.op, "queue_id": self.queue_id,
            "received": self.received, "failed": [f.encode() for f in self.failed],
            "since": self.since,
        }  # fmt: skip

    @classmethod
    def wire_fields(cls) -> list[str]:
        return [*Commit.wire_fields(), "queue_id", "received", "failed", "since"]

    @classmethod
    def decode(cls, header: dict[str, Any]) -> RetryLocal:
        f = Fields(header, "retry-local", BadMessage)
        failed = tuple(FailedCopy.decode(c) for c in f.array("failed", []))
        if not failed:
            raise BadMessage("failed: none")
        return cls(Commit.decode(header), f.text("queue_id"), f.text("received"), failed,
                   f.time("since"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outcome(Message):
    """The answer to a Commit or a RetryLocal: the reply the worker gives its client (250 once
    the message is durable for every target, else 451/452)."""

    code: int
    status: str
    text: str

    @classmethod
    def decode(cls, header: dict[str, Any]) -> Outcome:
        f = Fields(header, "outcome", BadMessage)
        return cls(f.whole("code"), f.text("status"), f.text("text"))


@dataclass(frozen=True, slots=True)
class WriterChannel(Message):
    """A worker asks for a channel of its own to the mailbox writer."""

    op: ClassVar[str] = "writer-channel"

    @classmethod
    def decode(cls, header: dict[str, Any]) -> WriterChannel:
        return cls()


@dataclass(frozen=True, slots=True)
class WriterChannelGiven(Message):
    """The answer: the worker's end of the channel travels as the frame's descriptor; without
    one, `error` says why (the writer refused it, or is gone)."""

    error: str | None = None

    @classmethod
    def decode(cls, header: dict[str, Any]) -> WriterChannelGiven:
        return cls(Fields(header, "writer channel", BadMessage).optional_text("error"))


# -- mailerd queue -> delivery --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListQueue(Message):
    op: ClassVar[str] = "list"

    @classmethod
    def decode(cls, header: dict[str, Any]) -> ListQueue:
        return cls()


@dataclass(frozen=True, slots=True)
class QueueListing(Message):
    """Every queue item, as its envelope file holds it (queue.QueueItem)."""

    items: tuple[dict[str, Any], ...]

    def encode(self) -> dict[str, Any]:
        return {"items": list(self.items)}

    @classmethod
    def decode(cls, header: dict[str, Any]) -> QueueListing:
        items = Fields(header, "listing", BadMessage).array("items", [])
        if not all(type(i) is dict for i in items):
            raise BadMessage("items: not objects")
        return cls(tuple(items))


@dataclass(frozen=True, slots=True)
class FlushQueue(Message):
    op: ClassVar[str] = "flush"

    @classmethod
    def decode(cls, header: dict[str, Any]) -> FlushQueue:
        return cls()


@dataclass(frozen=True, slots=True)
class Flushed(Message):
    count: int  # items that will be tried now

    @classmethod
    def decode(cls, header: dict[str, Any]) -> Flushed:
        return cls(Fields(header, "flushed", BadMessage).whole("count"))


@dataclass(frozen=True, slots=True)
class DeleteQueued(Message):
    op: ClassVar[str] = "delete"
    ids: tuple[str, ...]

    def encode(self) -> dict[str, Any]:
        return {"op": self.op, "ids": list(self.ids)}

    @classmethod
    def decode(cls, header: dict[str, Any]) -> DeleteQueued:
        ids = Fields(header, "delete", BadMessage).array("ids", [])
        if not all(type(i) is str for i in ids):
            raise BadMessage("ids: not strings")
        return cls(tuple(ids))


@dataclass(frozen=True, slots=True)
class Deleted(Message):
    ids: tuple[str, ...]  # those that were in the queue
    later: tuple[str, ...] = ()  # of those, the ones being delivered: removed after the attempt

    def encode(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "later": list(self.later)}

    @classmethod
    def decode(cls, header: dict[str, Any]) -> Deleted:
        f = Fields(header, "deleted", BadMessage)
        later = tuple(str(i) for i in f.array("later", []))
        return cls(tuple(str(i) for i in f.array("ids", [])), later)


# -- to the mailbox writer ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailboxWrite(Message):
    """Write one message into `mailbox`: the first `head` octets of the inline body are the
    headers to prepend (Return-Path:, Received:), the rest the message; or, with a descriptor,
    the inline body is all head and the descriptor holds the message. `since`: a redelivery
    (after a crash), not written again if it is there already (writer.mailbox.Copy)."""

    op: ClassVar[str] = "write"
    mailbox: str
    head: int
    since: float | None = None

    def encode(self) -> dict[str, Any]:
        header: dict[str, Any] = {"op": self.op, "mailbox": self.mailbox, "head": self.head}
        if self.since is not None:
            header["since"] = self.since
        return header

    @classmethod
    def decode(cls, header: dict[str, Any]) -> MailboxWrite:
        f = Fields(header, "write", BadMessage)
        since = None if header.get("since") is None else f.time("since")
        return cls(f.text("mailbox"), f.count("head"), since)


@dataclass(frozen=True, slots=True)
class Written(Message):
    number: int  # the message's N in the mailbox

    @classmethod
    def decode(cls, header: dict[str, Any]) -> Written:
        return cls(Fields(header, "written", BadMessage).whole("number"))


@dataclass(frozen=True, slots=True)
class WriteFailed(Message):
    """Nothing was written: the error, its errno, or `locked` (an IMAP server held the lock)."""

    error: str
    errno: int = 5
    locked: bool = False

    @classmethod
    def decode(cls, header: dict[str, Any]) -> WriteFailed:
        f = Fields(header, "write failed", BadMessage)
        return cls(f.text("error"), f.whole("errno", 5), f.flag("locked", False))


@dataclass(frozen=True, slots=True)
class Refused(Message):
    """The answer to a request its receiver does not serve, or cannot read; and to a queue
    flush or delete the delivery process cannot do in time (the previous one, before a
    reload, still has the queue)."""

    error: str

    @classmethod
    def decode(cls, header: dict[str, Any]) -> Refused:
        return cls(Fields(header, "refused", BadMessage).text("error"))


def write_answer(header: dict[str, Any]) -> Written | WriteFailed:
    return Written.decode(header) if "number" in header else WriteFailed.decode(header)


@dataclass(frozen=True, slots=True)
class Adopt(Message):
    """The frame's descriptor is one end of a worker's channel: serve it (MailboxWrite only)."""

    op: ClassVar[str] = "adopt"

    @classmethod
    def decode(cls, header: dict[str, Any]) -> Adopt:
        return cls()


@dataclass(frozen=True, slots=True)
class Done(Message):
    """The answer to Adopt; `error` when it could not be done."""

    error: str | None = None

    @classmethod
    def decode(cls, header: dict[str, Any]) -> Done:
        return cls(Fields(header, "done", BadMessage).optional_text("error"))


# -- master -> delivery ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriterStarted(Message):
    """The master started a mailbox writer for this delivery process (at its start, and again
    whenever the last one died): the frame's descriptor is the delivery process's end of its
    channel. It has no answer; it comes over a socketpair only the master and that delivery
    process hold."""

    op: ClassVar[str] = "writer-started"

    @classmethod
    def decode(cls, header: dict[str, Any]) -> WriterStarted:
        return cls()


# -- the whole contract ---------------------------------------------------------------------

REQUESTS: dict[str, type[Message]] = {
    m.op: m
    for m in (
        Commit,
        RetryLocal,
        WriterChannel,
        ListQueue,
        FlushQueue,
        DeleteQueued,
        MailboxWrite,
        Adopt,
        WriterStarted,
    )  # fmt: skip
}
# Who sends each request, where, and what comes back.
ROUTES: tuple[tuple[type[Message], str, str, tuple[type[Message], ...]], ...] = (
    (Commit, "worker", "delivery", (Outcome,)),
    (RetryLocal, "worker", "delivery", (Outcome,)),
    (WriterChannel, "worker", "delivery", (WriterChannelGiven,)),
    (ListQueue, "mailerd queue", "delivery", (QueueListing,)),
    (FlushQueue, "mailerd queue", "delivery", (Flushed,)),
    (DeleteQueued, "mailerd queue", "delivery", (Deleted,)),
    (MailboxWrite, "worker, delivery", "writer", (Written, WriteFailed)),
    (Adopt, "delivery", "writer", (Done,)),
    (WriterStarted, "master", "delivery", ()),
)


def decode_request(header: dict[str, Any], allowed: tuple[type[Message], ...]) -> Message:
    """The request a frame's header holds, if it is one of `allowed` (BadMessage if not)."""
    op = header.get("op")
    kind = REQUESTS.get(op) if isinstance(op, str) else None
    if kind is None or kind not in allowed:
        raise BadMessage(f"not a request here: {header.get('op')!r}")
    return kind.decode(header)


def describe() -> str:
    """The contract as Markdown tables (docs/channel.md holds them; a test compares)."""
    rows = ["| request (`op`) | from | to | header | answer: header |", "|---|---|---|---|---|"]

    def spec(names: list[str]) -> str:
        return ", ".join(f"`{n}`" for n in names) or "none"

    for kind, sender, receiver, answers in ROUTES:
        answer = "; ".join(f"{a.__name__}: {spec(a.wire_fields())}" for a in answers) or "none"
        rows.append(
            f"| {kind.__name__} (`{kind.op}`) | {sender} | {receiver} "
            f"| {spec(kind.wire_fields())} | {answer} |"
        )
    rows += ["", "| part | keys |", "|---|---|"]
    rows.append(f"| Target (each of `targets`) | {spec(['address', 'mailbox', 'via'])} |")
    failed = ["address", "mailbox", "via", "error", "errno", "locked"]
    rows.append(f"| FailedCopy (each of `failed`) | {spec(failed)} |")
    rows.append(
        f"| Refused (an unreadable request; a flush or delete not done) | "
        f"{spec(Refused.wire_fields())} |"
    )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(describe(), end="")

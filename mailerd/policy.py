"""Relay policy and local-recipient naming: pure verdicts, no I/O ("never an open relay").

`route()` decides, for one RCPT address and the trust of the listener it arrived on, whether it
(at a local domain, or at an address literal of this machine's) is a local mailbox, an alias
(`aliases`: mailboxes and forwarding addresses), a remote address to queue, or refused (with
the exact reply). Only the domain after the last `@` decides (the SMTP
grammar has already stripped any source route); `%`, `!` and quoted local parts are never
re-parsed as routing. Whether a local mailbox *exists* is I/O and is asked by the caller
(`spool.Spool.state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailerd.aliases import Aliases
from mailerd.names import Locality, is_local_domain, mailbox_name
from mailerd.smtp.events import Address, Reply

POSTMASTER = "postmaster"

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
ROUTING_DENIED = Reply(554, "5.7.1", "Relay access denied: sender-specified routing not allowed")
BAD_MAILBOX = Reply(550, "5.1.3", "Bad destination mailbox address syntax")
NO_SUCH_USER = Reply(550, "5.1.1", "No such user here")
ALIAS_LOOP = Reply(550, "5.4.6", "Mail forwarding loop for this address")

# Characters that route mail in old conventions (user%host, host!user, "user@host"@here).
_ROUTING_CHARS = frozenset("%!@")


@dataclass(frozen=True)
class Local:
    mailbox: str


@dataclass(frozen=True)
class Remote:
    domain: str


@dataclass(frozen=True)
class Alias:
    """An address of the aliases file: a copy for each mailbox and each forwarding address."""

    name: str  # as the table has it (without a +tag the address had)
    mailboxes: tuple[str, ...]
    forwards: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    reply: Reply
    why: str = ""  # for the log, when the reply does not say it all


Route = Local | Alias | Remote | Refused

_NO_ALIASES = Aliases()


def route(
    address: Address,
    *,
    trusted: bool,
    locality: Locality,
    aliases: Aliases = _NO_ALIASES,
) -> Route:
    if address.domain == "":
        # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted.
        if address.local.lower() == POSTMASTER:
            return _local(POSTMASTER, aliases)
        return Refused(BAD_MAILBOX)
    if not locality.is_local(address.domain):
        return Remote(address.domain.lower()) if trusted else Refused(RELAY_DENIED)
    if not trusted and _ROUTING_CHARS.intersection(address.local):
        return Refused(ROUTING_DENIED)
    return _local(address.local, aliases)


def _local(local_part: str, aliases: Aliases) -> Route:
    found = aliases.find(local_part) if aliases.table else None
    if found is None:
        mailbox = mailbox_name(local_part)
        return Local(mailbox) if mailbox is not None else Refused(BAD_MAILBOX)
    name, expansion = found
    if expansion.loop:
        return Refused(ALIAS_LOOP, f"alias {name} is part of a loop")
    if not expansion.deliverable:
        return Refused(NO_SUCH_USER, f"alias {name} has no usable target")
    return Alias(name, expansion.mailboxes, expansion.forwards)


def sender_owned(
    sender: Address, user: str, *, local_domains: tuple[str, ...], aliases: Aliases = _NO_ALIASES
) -> bool:
    """May authenticated `user` send as `sender`? Their own name at any local domain (with or
    without a +tag), or a local alias that delivers to their mailbox (a group alias to each
    member). An alias named after a user it also delivers to (`alice: alice, carol`, a copy
    of alice's mail for carol) is that user's own address, and hers alone. Any other
    address, a remote one included, is somebody else's."""
    if not sender.domain or not is_local_domain(sender.domain, local_domains):
        return False
    if _ROUTING_CHARS.intersection(sender.local):
        return False
    found = _local(sender.local, aliases)
    if isinstance(found, Local):
        return found.mailbox == user
    if not isinstance(found, Alias):
        return False
    own = mailbox_name(sender.local)
    if own in found.mailboxes:  # (a user's own name: who gets copies does not own it)
        return own == user
    return user in found.mailboxes


def author_refusal(
    authors: list[tuple[str, str]] | None,
    user: str,
    *,
    local_domains: tuple[str, ...],
    aliases: Aliases = _NO_ALIASES,
    aligned: Callable[[str], bool] = lambda domain: False,
) -> Reply | None:
    """Why authenticated `user`'s message is refused for its From: field (`authors`, as
    `headers.from_addresses` reads it), or None: every address there at a local domain, or at
    one DMARC would align with ours (`aligned`: the same organisational domain, where relaxed
    alignment passes on our SPF), must be one the user may send as (`sender_owned`), as the
    envelope sender must. Else a user would send as another one (or as the postmaster) in the
    field readers see and DMARC checks, and our DKIM signature and SPF would make it pass. An
    author at another domain is let through (a redirect keeps the original author; a form
    sends for its visitor): our signature and SPF cannot pass DMARC for it, which its own
    domain's policy decides. No From: field claims no one (one is added then)."""
    if authors is None:
        return Reply(
            550, "5.7.1", f"From: header rejected: must be one well-formed field (user {user})"
        )
    for local, domain in authors:
        if not is_local_domain(domain, local_domains) and not aligned(domain):
            continue
        address = Address(local, domain, False)
        if not sender_owned(address, user, local_domains=local_domains, aliases=aliases):
            return Reply(550, "5.7.1", f"From: address rejected: not owned by user {user}")
    return None

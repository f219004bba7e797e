"""A recipient's deliveries: the relay policy and the aliases (`policy.route`), then the checks
that need the file system and the user database (does the mailbox exist, is it a directory).

Used for every RCPT by the worker, for every recipient of a `sendmail` submission by the pickup,
and for bounces to local senders, so that all three decide alike. The answer is the list of
copies to make (a mailbox, or an address to relay to), or the reply that refuses the recipient.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mailerd import forwarding, names, policy
from mailerd.aliases import Aliases
from mailerd.ipc.messages import Target
from mailerd.log import Throttle
from mailerd.smtp.events import Address, Reply
from mailerd.spool import Spool

log = logging.getLogger("mailerd.recipients")

MAILBOX_WRONG_OWNER = Reply(450, "4.2.1", "Mailbox unavailable: not a mailbox mailerd may write")
MAILBOX_DISABLED = Reply(550, "5.2.1", "Mailbox unavailable")
CHECK_FAILED = Reply(451, "4.3.0", "Cannot check the mailbox now; try again later")
# An mbox file where mailerd wants a mailbox directory (e.g. Debian's /var/mail/<user>): keep the
# mail coming back (4xx) until the administrator converts or moves it.
MAILBOX_NOT_A_DIRECTORY = Reply(450, "4.2.0", "Mailbox unavailable: it is not a directory")

# A mailbox's problem is logged once a minute in a process, by (problem, mailbox or errno): it
# is met at every RCPT for the mailbox, and a client may repeat those deferrals a thousand
# times a session before they count as its errors (`smtp.commands.DEFERRALS_PER_SESSION`).
_REPORTS = Throttle(60.0)


@dataclass(frozen=True)
class Resolved:
    targets: tuple[Target, ...] = ()
    refusal: Reply | None = None  # set: the recipient is refused with this (and no targets)


def resolve(
    address: Address,
    *,
    trusted: bool,
    locality: names.Locality,
    aliases: Aliases,
    spool: Spool,
    spool_path: str,
    cached_only: bool = False,
) -> Resolved:
    """Where mail for `address` goes, or why it cannot. `spool_path` names the spool in log
    lines (`spool.root` may be a /proc/self/fd path). With `cached_only`, spool.LookupNeeded
    when the answer needs the user database (see Spool.state)."""
    route = policy.route(address, trusted=trusted, locality=locality, aliases=aliases)
    if isinstance(route, policy.Refused):
        if route.why:
            log.warning("<%s>: %s", address, route.why)
        return Resolved(refusal=route.reply)
    if isinstance(route, policy.Remote):
        return Resolved((Target(str(address), None),))
    if isinstance(route, policy.Local):
        refusal = check_mailbox(spool, spool_path, route.mailbox, cached_only)
        if refusal is not None:
            return Resolved(refusal=refusal)
        return Resolved((Target(str(address), route.mailbox),))
    targets = []
    for mailbox in route.mailboxes:
        refusal = check_mailbox(spool, spool_path, mailbox, cached_only)
        if refusal is None:
            targets.append(Target(str(address), mailbox))
        elif refusal is policy.NO_SUCH_USER or refusal is MAILBOX_DISABLED:
            log.warning("alias %s: target %s has no mailbox; skipped", route.name, mailbox)
        else:
            return Resolved(refusal=refusal)  # a temporary problem: the whole alias waits
    via = forwarder(route, address, locality.domains)
    targets += [Target(forward, None, via) for forward in route.forwards]
    if not targets:
        return Resolved(refusal=policy.NO_SUCH_USER)
    return Resolved(tuple(targets))


def forwarder(alias: policy.Alias, address: Address, local_domains: tuple[str, ...]) -> str:
    """The address an alias's forwards leave from (see `forwarding`): its name at the local
    domain the mail came to, as configured (mail to a subdomain of it leaves from it: the
    configured domains are the ones `mailerd dns` gives an SPF record), or, for localhost and
    for an address literal of ours, the first configured domain."""
    if not address.domain:  # (RCPT TO:<postmaster>, the one address without a domain)
        domain = local_domains[0] if local_domains else ""
    else:
        domain = names.local_domain_of(address.domain, local_domains) or address.domain.lower()
    if domain == names.LOCALHOST or domain.startswith("["):
        # (localhost: the machine's name for itself, no one else can check it; an address
        # literal of ours: no domain to publish SPF at)
        domain = next((d for d in local_domains if d != names.LOCALHOST), domain)
    return forwarding.via_of(alias.name, domain, address.local) if domain else ""


def check_mailbox(
    spool: Spool, spool_path: str, mailbox: str, cached_only: bool = False
) -> Reply | None:
    """Whether `mailbox` can take mail now: None, or the reply that says why not."""
    try:
        state = spool.state(mailbox, cached_only=cached_only)
    except OSError as exc:
        # (by its errno: the spool fails for any name a client may make up)
        if _REPORTS.due(("cannot check", exc.errno)):
            log.error("cannot check mailbox %s: %s", mailbox, exc)
        return CHECK_FAILED
    if state == "unknown":
        return policy.NO_SUCH_USER
    path = os.path.join(spool_path, mailbox)
    if state == "not-a-directory":
        if _REPORTS.due((state, mailbox)):
            log.error(
                "mailbox %s is a file (an mbox?), not a directory: mail for it waits (450) "
                "until it is moved aside; see the README, 'Mailboxes'",
                path,
            )
        return MAILBOX_NOT_A_DIRECTORY
    if state == "wrong-owner":
        if _REPORTS.due((state, mailbox)):
            log.error(
                "mailbox %s is a symlink or has the wrong owner (it must be its account's or "
                "root's, never mailerd's own user's): mail for it waits (450) until that is "
                "fixed; see the README, 'Mailboxes'",
                path,
            )
        return MAILBOX_WRONG_OWNER
    if state == "daemon-user":
        log.warning(
            "mail for %s refused: it is mailerd's own user, which has no mailbox (alias it to "
            "a person in the aliases file)",
            mailbox,
        )
        return MAILBOX_DISABLED
    return None

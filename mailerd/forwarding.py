"""The envelope sender of a forwarded copy: mail an alias sends on to a remote address leaves
from the alias's own address, not from its original sender's. Pure.

Why: the forward target checks SPF for the MAIL FROM's domain against this server's address.
The original sender's domain does not list this server (a forward from a domain that says
`-all` fails there, and Gmail or Outlook then file or refuse it); a local domain does (`mailerd
dns` prints `v=spf1 mx -all` for each). DMARC is unchanged: it aligns the From: header, which a
forward does not touch, so it rests on the sender's DKIM signature surviving, as before. This
departs from RFC 5321 3.9.1 (an alias keeps the return path), as every SRS does.

The scheme is chasquid's "send-only SRS": `ALIAS+fwd_from=LOCAL=DOMAIN@ALIAS-DOMAIN`. The tag
keeps the original sender readable for a person (and in the target's Return-Path:) and needs
no secret: a bounce or an auto-reply sent back to it is mail for the alias (a `+tag` reaches
the name before it), delivered to the alias's own targets. Nothing is relayed to the address in
the tag, so it is no relay and no source of backscatter, unlike classic SRS (SRS0=hash=time=…),
which needs a key to stop strangers from relaying through it. mailerd's own bounces of a
forward still go to the original sender, under the rule of `delivery.scheduler` (only a sender
SPF verified).

Which senders:
- <> stays <>, and a sender at a local domain is kept (its domain already lists this server);
- a sender whose SPF failed (or softfailed) here is kept: such mail fails at the target either
  way, and rewritten it would pass there in the name of a local domain (mail whose SPF was not
  checked, `--inbound-auth off`, is rewritten: the operator chose to know nothing of it);
- an alias whose name has a `+` keeps the sender (see below);
- a copy of mail that came back to a forward's address (`me+fwd_from…`: a bounce, or an
  auto-reply that did not use <> as RFC 3834 asks) leaves from <>, as the notice it is, so
  that no auto-reply at the target answers it again: an answering machine at each end would
  otherwise mail each other for ever, each message a new one to the loop count;
- a result that is not a dot-atom local part of at most 64 octets (a quoted or 8-bit sender, or
  alias name) gives the bare `ALIAS+fwd_from`, or, failing that too, the sender as it was.
"""

from __future__ import annotations

import re

from mailerd.idn import a_labels
from mailerd.names import LOCALHOST, is_local_domain, local_domain_of

TAG = "fwd_from"
LOCAL_PART_MAX = 64  # RFC 5321 4.5.3.1.1: longer ones are refused by some servers

# A dot-atom (RFC 5321 4.1.2) of atext without "%" and "!", which a network client's RCPT may
# not use here (`policy._ROUTING_CHARS`), lest a bounce to the address be refused.
_ATEXT = r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")


def came_back(local_part: str) -> bool:
    """Is this a forward's own address (`me+fwd_from…`), mail to which is a reply to it?"""
    return local_part.lower().partition("+")[2].startswith(TAG)


def returned(via: str) -> bool:
    """Does this `via` say the mail came back to a forward's address?"""
    return came_back(via.rpartition("@")[0])


def via_of(alias: str, domain: str, local_part: str) -> str:
    """What a forward records of the alias it came through (`alias@domain`), from the local
    part the mail came to: marked when that was a forward's own address (`came_back`)."""
    return f"{alias}+{TAG}@{domain}" if came_back(local_part) else f"{alias}@{domain}"


def preferred(kept: str, other: str) -> str:
    """The `via` of one copy that two aliases forward to the same address: the first's
    (`kept`), unless the other says the mail came back (whatever the order of the RCPTs, such
    a copy must leave from <>)."""
    return other if returned(other) and not returned(kept) else kept


def envelope_sender(
    sender: str, via: str, local_domains: tuple[str, ...], sender_spf: str = ""
) -> str:
    """The MAIL FROM for a copy of mail from `sender` forwarded by `via` (see `via_of`; "" for a
    copy no alias forwarded); `sender_spf`: its SPF result here, if checked."""
    if not sender or not via:
        return sender
    local, _, domain = sender.rpartition("@")
    ours = local_domain_of(domain, local_domains)
    if not local or (ours is not None and ours != LOCALHOST):  # (localhost: no SPF passes it)
        return sender
    name, _, alias_domain = via.rpartition("@")
    if not name or not is_local_domain(alias_domain, local_domains):
        return sender  # (the alias's domain is no longer local: mail to it would be refused)
    if came_back(name):
        return ""
    if sender_spf in ("fail", "softfail") or "+" in name:
        # (A tag after `a+b` would be read as `a`'s: mail sent back to it could not be told
        # from mail to the alias, nor kept from being forwarded again.)
        return sender
    ascii_domain = _ascii(domain)
    candidates = [f"{name}+{TAG}={local}={ascii_domain}"] if ascii_domain else []
    candidates.append(f"{name}+{TAG}")
    for candidate in candidates:
        if len(candidate.encode()) <= LOCAL_PART_MAX and _DOT_ATOM.fullmatch(candidate):
            return f"{candidate}@{alias_domain}"
    return sender


def _ascii(domain: str) -> str:
    """The domain in lower case, with A-labels for an internationalized one ("" where none).
    (Not lower-cased before UTS 46 maps it: str.lower() makes a final Σ ς, another name.)"""
    return domain.lower() if domain.isascii() else a_labels(domain) or ""

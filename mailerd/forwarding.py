"""The envelope sender of a forwarded copy: mail an alias sends on to a remote address leaves
from the alias's own address, not from its original sender's. Pure.

Why: the forward target checks SPF for the MAIL FROM's domain against this server's address.
The original sender's domain does not list this server (a forward from a domain that says
`-all` fails there, and Gmail or Outlook then file or refuse it); a local domain does (`mailerd
dns` prints `v=spf1 mx -all` for each). DMARC is unchanged: it aligns the From: header, which a
forward does not touch, so it rests on the sender's DKIM signature surviving, as before.

The scheme is chasquid's "send-only SRS": `ALIAS+fwd_from=LOCAL=DOMAIN@ALIAS-DOMAIN`. The tag
keeps the original sender readable for a person (and in the target's Return-Path:) and needs
no secret: a bounce or a vacation reply sent back to it is mail for the alias (a `+tag` reaches
the name before it), which delivers it to the alias's own targets, so the person who set up the
forward hears that it failed. Nothing is relayed to the original sender, so the address is no
relay and no source of backscatter, unlike classic SRS (SRS0=hash=time=…), which needs a key to
stop strangers from relaying through it. mailerd's own bounces of a forward still go to the
original sender, under the rule of `delivery.scheduler` (only a sender SPF verified).

Only a non-empty sender at a domain that is not local is rewritten: a local sender's domain
already lists this server, and <> (a bounce being forwarded) stays <>.
"""

from __future__ import annotations

import re

from mailerd.names import is_local_domain

TAG = "fwd_from"
LOCAL_PART_MAX = 64  # RFC 5321 4.5.3.1.1: longer ones are refused by some servers

# What may stand in the tag: dot-atom text (RFC 5321 4.1.2) without "%" and "!", which a
# network client's RCPT may not use here (`policy._ROUTING_CHARS`), lest the bounce be refused.
_TAG_SAFE = re.compile(r"[A-Za-z0-9.#$&'*+/=?^_`{|}~-]+")


def envelope_sender(sender: str, via: str, local_domains: tuple[str, ...]) -> str:
    """The MAIL FROM for a copy of mail from `sender` forwarded by the alias `via`
    (`name@domain`, the name as the aliases file has it; "" for a copy no alias forwarded)."""
    if not sender or not via:
        return sender
    local, _, domain = sender.rpartition("@")
    if not local or is_local_domain(domain, local_domains):
        return sender
    name, _, alias_domain = via.rpartition("@")
    if not name or not alias_domain:
        return sender
    if "+" in name:  # (a tag after it would be taken for part of the name's: no tag then)
        return via
    tagged = f"{name}+{TAG}={local}={domain.lower()}"
    if len(tagged.encode()) > LOCAL_PART_MAX or not _TAG_SAFE.fullmatch(tagged):
        # A quoted or 8-bit local part, or one too long: the alias's address alone, with the
        # bare tag, still a local sender (the original one is in the message's headers).
        tagged = f"{name}+{TAG}"
    return f"{tagged}@{alias_domain}"

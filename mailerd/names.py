"""Local names, the rules everyone applies alike: which domains are ours, and which mailbox a
local part names (or none, when it could escape the spool). Pure."""

from __future__ import annotations

LOCALHOST = "localhost"  # always a local domain (config), and one only this machine knows


def is_local_domain(domain: str, local_domains: tuple[str, ...]) -> bool:
    """A domain is local if it equals, or ends in '.' + , one of the configured suffixes."""
    return local_domain_of(domain, local_domains) is not None


def local_domain_of(domain: str, local_domains: tuple[str, ...]) -> str | None:
    """The configured local domain that `domain` is, or is under (the longest, when it is
    under several: lists.example.org itself, with example.org configured too); None for a
    remote one."""
    domain = domain.lower().rstrip(".")
    found = [d for d in local_domains if domain == d or domain.endswith("." + d)]
    return max(found, key=len) if found else None


def mailbox_name(local_part: str) -> str | None:
    """The spool directory name for a local part, or None when it could escape the spool.

    Lower-cased; a `+tag` suffix is dropped (user+tag delivers to user).
    """
    name = local_part.lower().split("+", 1)[0]
    if not name or name.startswith(".") or "/" in name:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return None
    return name

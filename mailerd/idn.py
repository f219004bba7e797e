"""Internationalized domain names in A-labels, one way for every part of mailerd. Pure.

IDNA 2008 with UTS 46's mapping, not transitional: what mail programs and browsers show, and
what dnspython looks up once the idna package is installed. Not Python's own codec, IDNA 2003,
which maps `faß.example` to `fass.example`: another domain than the `xn--fa-hia.example` a
reader sees, whose owner's SPF then aligned with mail shown as from `faß.example`. (Not
imported by `sendmail`, which runs on the standard library alone.)
"""

from __future__ import annotations

import idna


def a_labels(domain: str) -> str | None:
    """`domain` in A-labels (lower case; UTS 46 maps case and compatibility forms); None when
    no DNS name has it (a character IDNA 2008 disallows, an empty or too long label)."""
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None

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
    no DNS name has it (an empty or too long label).

    A name IDNA 2008 refuses but IDNA 2003 takes is converted as IDNA 2003 converts it: such
    names were registered (`i❤.ws` is `xn--i-7iq.ws`), browsers and mail programs still show
    them (UTS 46 lets symbols through that IDNA 2008 disallows), and a character between
    letters that shows as nothing (a zero-width joiner out of place) is dropped, so that the
    name judged is the one a reader sees. Where the two differ on a name both take (ß, ς, a
    joiner IDNA 2008 allows), IDNA 2008's stands."""
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        pass
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None

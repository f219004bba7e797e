"""Internationalized domain names in A-labels, one way for every part of mailerd: what the
inbound checks judge, what SPF, DMARC and the MX lookups ask the DNS for. Pure.

IDNA 2008 with UTS 46's mapping, not transitional: what mail programs and browsers show. Not
Python's own codec, IDNA 2003, which maps `faß.example` to `fass.example`: another domain than
the `xn--fa-hia.example` a reader sees, whose owner's SPF then aligned with mail shown as from
`faß.example`. (dnspython also converts with IDNA 2003, whatever is installed on Debian 12: a
name is given to it, and to pyspf, in A-labels made here, never in U-labels.)

Label by label: a label IDNA 2008 refuses is tried again without its joiners (a zero-width
joiner out of place, which shows as nothing), and else converted as IDNA 2003 converts it
(such names were registered, `i❤.ws` is `xn--i-7iq.ws`, and readers show them), unless it
holds ß or ς, which IDNA 2003 would turn into another name's letters: then there is no name.
(Not imported by `sendmail`, which runs on the standard library alone.)
"""

from __future__ import annotations

import encodings.idna
import functools
import re

import idna

NAME_MAX = 253  # octets of a domain name (RFC 1035), in A-labels
_JOINERS = dict.fromkeys(map(ord, "\u200c\u200d"))  # (str.translate: removed)
_DEVIATIONS = frozenset("\u00df\u03c2")  # ß, ς: IDNA 2003 makes them ss, σ
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")  # what a label of a name looked up may be
_DOTS = re.compile("[.\u3002\uff0e\uff61]")  # (IDNA's: the full stop, its CJK and wide forms)


@functools.lru_cache(maxsize=4096)  # (a sender's domains come again and again)
def a_labels(domain: str) -> str | None:
    """`domain` (no final dot) in A-labels, lower case (UTS 46 maps case and compatibility
    forms, before the name is split at its dots, Unicode ones included); None when no DNS
    name has it (an empty label, one too long, a character no label may have)."""
    try:
        mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError, ValueError):  # (a character UTS 46 disallows)
        mapped = domain
    labels = []
    length = -1
    for label in _DOTS.split(mapped):
        converted = _label(label)
        if converted is None or not _LABEL.fullmatch(converted):
            return None
        labels.append(converted)
        length += 1 + len(converted)
        if length > NAME_MAX:  # (no need to convert the rest: 124 labels cost 3.9 ms)
            return None
    return ".".join(labels)


@functools.lru_cache(maxsize=1024)
def readings(domain: str) -> tuple[str, ...]:
    """`domain` (in A-labels, as `a_labels` gives it) and, when it is another name, the one a
    reader converting by IDNA 2003 sees in it (Python's codec, older libraries): ß and ς
    become ss and σ there, joiners vanish. `xn--stra-yna.example` is `straße.example` to one
    reader and `strasse.example` to the other, which DMARC then aligns with strasse.example's
    SPF and signatures."""
    if "xn--" not in domain:
        return (domain,)
    labels = []
    for label in domain.split("."):
        if not label.startswith("xn--"):
            labels.append(label)
            continue
        try:
            older = encodings.idna.ToASCII(label[4:].encode("ascii").decode("punycode"))
        except UnicodeError:  # (no name to IDNA 2003: nothing it reads otherwise)
            return (domain,)
        labels.append(older.decode("ascii").lower())
    older_name = ".".join(labels)
    return (domain,) if older_name == domain else (domain, older_name)


def _label(label: str) -> str | None:
    """One label in A-labels (see the module's docstring), or None."""
    if label.isascii():
        return label.lower()
    for candidate in (label, label.translate(_JOINERS)):
        try:
            return idna.alabel(candidate).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            pass
    if _DEVIATIONS.intersection(label):
        return None
    try:
        return encodings.idna.ToASCII(label).decode("ascii").lower()
    except UnicodeError:
        return None

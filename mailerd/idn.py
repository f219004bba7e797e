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
from collections.abc import Callable

import idna

NAME_MAX = 253  # octets of a domain name (RFC 1035), in A-labels
_JOINERS = dict.fromkeys(map(ord, "\u200c\u200d"))  # (str.translate: removed)
_DEVIATIONS = frozenset("\u00df\u03c2")  # ß, ς: IDNA 2003 makes them ss, σ
# UTS 46's transitional processing: ß, ς and the joiners as IDNA 2003 has them
_TRANSITIONAL = {0xDF: "ss", 0x3C2: "\u03c3", 0x200C: None, 0x200D: None}
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
    """`domain` (in A-labels, as `a_labels` gives it) and the other names readers that
    convert otherwise see in it: by IDNA 2003 (Python's codec, older libraries) and by UTS 46's
    transitional processing (ICU's), ß becomes ss, ς σ, and joiners vanish. So
    `xn--strae-oqa.example` is `straße.example` to one reader and `strasse.example` to the
    others, which DMARC then aligns with strasse.example's SPF and signatures. Label by label:
    a label such a reader refuses, or that does not decode, it passes on as written (Python's
    codec leaves an ASCII label alone), so it is kept here, not a reason to give up the
    name's other labels (an attacker's pass: `xn--a.straße.example` was judged as itself
    alone, and Python's codec reads it as `xn--a.strasse.example`)."""
    if "xn--" not in domain:
        return (domain,)
    older, transitional, decoded = [], [], []
    for label in domain.split("."):
        text = _decoded(label)
        older.append(label if text is None else _read(text, label, _idna_2003))
        transitional.append(label if text is None else _read(text, label, _transitional))
        decoded.append(label if text is None else text)
    # (and as readers that decode the name and convert it again by IDNA 2008 see it: a dot
    # inside an A-label splits it there too)
    again = a_labels(".".join(decoded))
    names = (domain, ".".join(older), ".".join(transitional), again)
    return tuple(dict.fromkeys(name for name in names if name))


def _read(text: str, label: str, convert: Callable[[str], str | None]) -> str:
    """An A-label (`label`, whose text is `text`) as a reader converting by `convert` reads
    it: one it refuses as written; one whose text holds a dot (U+3002, the ideographic full
    stop, is one to IDNA) as the labels it splits into (an attacker's pass:
    `xn--strasse-9xa7269h` is `é。strasse`, which Python's codec reads as `xn--9ca.strasse`,
    under strasse.example)."""
    pieces = _DOTS.split(text)
    if len(pieces) == 1:
        return convert(text) or label
    return ".".join(
        piece.lower() if piece.isascii() else convert(piece) or _label(piece) or label
        for piece in pieces
    )


def _decoded(label: str) -> str | None:
    """An A-label's Unicode text, or None (no A-label, or one that does not decode)."""
    if not label.startswith("xn--"):
        return None
    try:
        return label[4:].encode("ascii").decode("punycode")
    except UnicodeError:
        return None


def _idna_2003(text: str) -> str | None:
    """A label as IDNA 2003 converts it (None when it refuses)."""
    try:
        return encodings.idna.ToASCII(text).decode("ascii").lower()
    except UnicodeError:
        return None


def _transitional(text: str) -> str | None:
    """A label as UTS 46's transitional processing converts it (None when it refuses): its
    mapping, then the deviations' (written out here: the idna package's `transitional` flag
    does nothing since its 3.8, where the one Debian 12 ships still honours it)."""
    try:
        mapped = idna.uts46_remap(text, std3_rules=False, transitional=False)
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    return _label(mapped.translate(_TRANSITIONAL))


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

"""mailerd.idn: A-labels by IDNA 2008 with UTS 46's mapping, IDNA 2003 for what it refuses."""

from __future__ import annotations

import pytest

from mailerd.headers import normal_domain
from mailerd.idn import a_labels, readings


@pytest.mark.parametrize(
    "domain, expected",
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example", "xn--bcher-kva.example"),  # UTS 46 maps case
        ("ＥＸＡＭＰＬＥ.org", "example.org"),  # and compatibility forms, as readers show them
        ("ex\u00adample.org", "example.org"),  # a soft hyphen shows as nothing
        # IDNA 2008 where the two differ: Python's codec (IDNA 2003) made these other domains
        ("faß.example", "xn--fa-hia.example"),  # not fass.example
        ("ς.example", "xn--3xa.example"),  # not σ's xn--4xa
        # IDNA 2003 for what IDNA 2008 refuses and readers still show
        ("i❤.ws", "xn--i-7iq.ws"),
        ("exa\u200dmple.com", "example.com"),  # a joiner out of place: a reader sees example.com
        # label by label: one label IDNA 2008 refuses does not send the others to IDNA 2003
        ("faß.exa\u200dmple", "xn--fa-hia.example"),
        ("faß.example\u200d", "xn--fa-hia.example"),
        ("faß\u200d.example", "xn--fa-hia.example"),  # a joiner out of place: dropped
        ("faß❤.example", None),  # IDNA 2003 would make the ß ss: no name
        ("ΟΔΟΣ.example", "xn--pxavbq.example"),  # Σ: σ
        ("example.ΟΔΟΣ", "example.xn--pxavbq"),  # σ, where str.lower() makes a final Σ ς
        ("faß\u3002example", "xn--fa-hia.example"),  # an ideographic full stop is a dot
        # no name at all
        ("a..example", None),
        ("é" + "x" * 70 + ".example", None),  # a label over 63 octets
        ("bank.example\uff3c", None),  # a wide backslash: mapped to one, no label has it
        ("\u0915\u094d\u0937" * 20 + ".faß.example", None),  # too long once in A-labels
    ],
)
def test_a_labels(domain: str, expected: str | None):
    assert a_labels(domain) == expected


def test_a_domain_is_not_lower_cased_before_uts_46_maps_it():
    """str.lower() makes a final Σ ς, where UTS 46 (what readers resolve) makes σ: the domain
    judged was another than the one readers look up. (ẞ is left out: UTS 46 maps it to ss
    before Unicode 15.1, to ß since, and the idna package follows the data it ships.)"""
    assert normal_domain("Example.ΟΔΟΣ.") == "example.xn--pxavbq"
    assert normal_domain("ΟΔΟΣ-1.Example") == "xn---1-k9b7bby.example"  # (Σ before a hyphen)
    assert normal_domain("BANK.Example") == "bank.example"


def test_a_name_too_long_is_given_up_before_all_its_labels_are_converted(monkeypatch):
    """124 labels of ❤ cost 3.9 ms a name, converted whole before the length was measured
    (a third attacker's pass: 11 such names a From: field held the event loop 45-70 ms). The
    conversion stops once the name is past 253 octets: 32 labels of xn--qei."""
    from mailerd import idn

    converted = []
    real = idn._label
    monkeypatch.setattr(idn, "_label", lambda label: converted.append(label) or real(label))
    assert a_labels(".".join(["\u2764"] * 124) + ".example") is None
    assert len(converted) == 32, len(converted)


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.org", ("example.org",)),
        ("xn--strae-oqa.example", ("xn--strae-oqa.example", "strasse.example")),  # straße
        ("mail.xn--strae-oqa.example", ("mail.xn--strae-oqa.example", "mail.strasse.example")),
        ("xn--pxavbm.example", ("xn--pxavbm.example", "xn--pxavbq.example")),  # οδος: ς, σ
        ("xn--caf-dma.example", ("xn--caf-dma.example",)),  # café: one reading
        ("xn--i-7iq.ws", ("xn--i-7iq.ws",)),  # i❤.ws: IDNA 2003's already
        ("xn--.example", ("xn--.example",)),  # no punycode: nothing to read otherwise
        # a label a reader cannot read, it passes on as written: the others are read all the
        # same (Python's codec leaves an ASCII label alone; ICU's transitional takes اب1)
        ("xn--a.xn--strae-oqa.example", ("xn--a.xn--strae-oqa.example", "xn--a.strasse.example")),
        (
            "xn--1-ymcd.xn--strae-oqa.example",  # اب1: IDNA 2003's bidi rule refuses it
            ("xn--1-ymcd.xn--strae-oqa.example", "xn--1-ymcd.strasse.example"),
        ),
        (
            "xn--zz.xn--strae-oqa.example",
            ("xn--zz.xn--strae-oqa.example", "xn--zz.strasse.example"),
        ),
        # an A-label whose text holds a dot (U+3002) is two labels to readers: é。strasse
        (
            "xn--strasse-9xa7269h.example",
            ("xn--strasse-9xa7269h.example", "xn--9ca.strasse.example"),
        ),
    ],
)
def test_readings(domain: str, expected: tuple[str, ...]):
    """A receiver converting by IDNA 2003 reads straße.example as strasse.example: serving
    strasse.example, `From: bob@straße.example` is bob's address to it."""
    assert readings(domain) == expected


def test_the_transitional_reading_drops_a_joiner_that_idna_2003_cannot_read_past():
    """بب1 with a ZWNJ between its letters (valid in IDNA 2008's joining context): IDNA 2003's
    bidi rule refuses the label (a digit at its end), and UTS 46's transitional processing
    drops the joiner: another name. (The idna package's own transitional flag does nothing
    since its 3.8: the PyPI one the suite's environment installs gave this one reading.)"""
    domain = a_labels("\u0628\u200c\u06281.example")
    assert readings(domain) == (domain, a_labels("\u0628\u06281.example"))

"""mailerd.idn: A-labels by IDNA 2008 with UTS 46's mapping, IDNA 2003 for what it refuses."""

from __future__ import annotations

import pytest

from mailerd.idn import a_labels


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
        # no name at all
        ("a..example", None),
        ("é" + "x" * 70 + ".example", None),  # a label over 63 octets
    ],
)
def test_a_labels(domain: str, expected: str | None):
    assert a_labels(domain) == expected

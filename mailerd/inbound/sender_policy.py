"""SPF (RFC 7208): may the client's address send mail for the envelope sender's domain?

pyspf (Debian python3-spf) evaluates the policy; it runs in a thread, as it asks DNS
synchronously, and its lookups go through the worker's resolver (`lookups.Bridge`): pyspf's
module-level `DNSLookup` function is the hook it offers for that (its own test suite replaces it
the same way). The identity checked is the MAIL FROM address, or, for the null sender <>, the
HELO name (RFC 7208 2.3, 2.4). Results are RFC 7208's: pass, fail, softfail, neutral, none,
permerror, temperror.

A `Memo` keeps the verdicts worked out from cached DNS answers alone, each until the first of
those answers expires: a sender that writes often (a mailing list, a provider's outbound
host) then costs pyspf's evaluation once per record TTL, not once per message.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import spf

from mailerd import headers
from mailerd.inbound.lookups import Bridge, TemporaryFailure

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")

_local = threading.local()  # the Bridge of the check running in this thread
_Pair = tuple[tuple[str, str], object]  # pyspf's ((name, type), data)


@dataclass(frozen=True)
class SpfResult:
    result: str
    identity: str  # "mailfrom" or "helo"
    value: str  # the MAIL FROM address, or the HELO name
    domain: str  # the domain whose policy was checked (what DMARC aligns)
    explanation: str = ""


def identity(sender: str, helo: str) -> tuple[str, str, str]:
    """(kind, value, domain) of what SPF checks for this envelope; the domain in A-labels, as
    DMARC compares it with the From: domain's (a reviewer's finding: a MAIL FROM domain in
    U-labels, SMTPUTF8, never aligned)."""
    if sender:
        return "mailfrom", sender, headers.normal_domain(sender.rpartition("@")[2])
    return "helo", helo, headers.normal_domain(helo)


def check(bridge: Bridge, ip: str, sender: str, helo: str) -> SpfResult:
    """The SPF verdict (call it in a thread: it waits on DNS)."""
    kind, value, domain = identity(sender, helo)
    if not domain or domain.startswith("[") or "." not in domain or not domain.isascii():
        return SpfResult("none", kind, value, domain, "no domain to check")
    _local.bridge = bridge
    # pyspf's query: `s` the sender (postmaster@HELO for <>, RFC 7208 2.4), `h` the HELO. The
    # sender's domain in the A-labels DMARC aligns: given in U-labels, pyspf had dnspython
    # convert it by IDNA 2003, and a MAIL FROM at faß.example was checked against fass.example's
    # record, whose pass then aligned with a From: at faß.example (an attacker's pass).
    local = sender.rpartition("@")[0] if sender else "postmaster"
    try:
        query = _Query(i=ip, s=f"{local}@{domain}", h=helo, timeout=bridge.timeout)
        result, _code, explanation = query.check()
    except TemporaryFailure as exc:
        return SpfResult("temperror", kind, value, domain, str(exc))
    finally:
        _local.bridge = None
    result = str(result).lower()
    if result not in RESULTS:  # pyspf's "ambiguous", or an old name
        result = "permerror" if result in ("unknown", "ambiguous") else "neutral"
    return SpfResult(result, kind, value, domain, str(explanation)[:EXPLANATION_MAX])


# What is kept of pyspf's explanation (its default for the result, or a permerror's reason,
# which may quote the sender's record): never shown, but kept with each verdict in the Memo.
EXPLANATION_MAX = 200


class _Query(spf.query):  # type: ignore[misc]  # (pyspf is untyped)
    """pyspf's query, without a failure's explanation from the sender's DNS (exp=): mailerd
    refuses no mail for SPF, so it shows none, yet pyspf looked the record up and expanded its
    macros whatever the result (it does not change it): 2,400 %{s} in a sender's record made
    180 KB of text for each of its messages, 15 ms of the event loop's CPU from the cache."""

    def get_explanation(self, spec: str) -> None:
        return None


class Memo:
    """Verdicts by (client address, MAIL FROM, HELO), each with the time (time.time()) at which
    the first DNS answer it was worked out from expires: until then, pyspf would read the same
    answers for the same three inputs and reach the same verdict. At most `size` are kept
    (the oldest go first)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: dict[tuple[str, str, str], tuple[SpfResult, float]] = {}

    def get(self, ip: str, sender: str, helo: str, now: float) -> SpfResult | None:
        entry = self._entries.get((ip, sender, helo))
        if entry is None:
            return None
        if entry[1] <= now:
            del self._entries[(ip, sender, helo)]
            return None
        return entry[0]

    def put(self, ip: str, sender: str, helo: str, result: SpfResult, expires: float) -> None:
        key = (ip, sender, helo)
        if self._entries.pop(key, None) is None and len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (result, expires)


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float = 20) -> list[_Pair]:
    """pyspf's DNSLookup: ((name, type), data) pairs as its dnspython lookup returns them."""
    bridge: Bridge | None = getattr(_local, "bridge", None)
    if bridge is None:
        raise spf.TempError("DNS lookups outside a mailerd check")
    try:
        records = bridge.rdata(name, qtype)
    except TemporaryFailure as exc:
        raise spf.TempError(f"DNS {exc}") from exc
    out: list[_Pair] = []
    for rdata in records:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))  # type: ignore[attr-defined]
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))  # type: ignore[attr-defined]
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))  # type: ignore[attr-defined]
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))  # type: ignore[attr-defined]
    return out


spf.DNSLookup = _lookup

"""DMARC (RFC 7489): does the message's From: domain vouch for it, through an SPF or DKIM
pass whose domain is aligned with it, and what does that domain ask to be done when not?

A small evaluator over the worker's resolver (there is no maintained DMARC library in Debian):
the policy record at `_dmarc.<From domain>`, else at `_dmarc.<organisational domain>`, the
organisational domain from the Public Suffix List (Debian's `publicsuffix` data, read with
publicsuffix2); relaxed alignment (the same organisational domain) unless the record says
`adkim=s`/`aspf=s` (the same domain); `p=`, `sp=` for a subdomain's mail whose policy was
found at its organisational domain, `pct=` sampling. A From: with addresses in several domains
has each domain checked, and the worst outcome stands (RFC 7489 6.6.1): a second author is no
way around a p=reject. Reports (rua/ruf) are not sent.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from publicsuffix2 import PublicSuffixList

from mailerd.headers import MAX_AUTHOR_DOMAINS, normal_domain
from mailerd.inbound.lookups import Lookups, NotCached, TemporaryFailure
from mailerd.inbound.sender_policy import SpfResult
from mailerd.inbound.signatures import DkimResult
from mailerd.remembered import Remembered

PSL_FILE = "/usr/share/publicsuffix/public_suffix_list.dat"  # Debian's `publicsuffix`
POLICIES = ("none", "quarantine", "reject")
# A record starts with its version tag; RFC 7489's ABNF allows spaces around the "=", and its
# "v" is case-insensitive but its DMARC1 (%x44 %x4d ...) is not.
_VERSION = re.compile(r"[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S")  # (a scheme, and something after it)


def is_dns_name(domain: str) -> bool:
    """Can an author domain (in A-labels, as `headers.from_domains` gives it) be looked up? An
    ASCII name of 253 octets at most, its labels of 1 to 63. One that cannot has no policy to
    find, and a forger may pad a victim's name to that end: invisible characters, which IDNA
    maps to nothing, past the length that is converted (a third attacker's pass); so it is a
    permerror, refused under enforce (RFC 7489 6.6.1 lets a receiver refuse such a From:)."""
    if not domain.isascii() or not 0 < len(domain) <= 253:
        return False
    return all(0 < len(label) <= 63 for label in domain.split("."))


def is_record(text: str) -> bool:
    """Is this TXT record a DMARC one (valid or not): v=DMARC1 its first tag?"""
    return _VERSION.match(text) is not None


@dataclass(frozen=True)
class Policy:
    p: str
    sp: str
    pct: int
    adkim: str  # "r" or "s"
    aspf: str


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str = ""
    policy: str = ""  # the policy that applies to this From domain (p= or sp=), if any
    disposition: str = "none"  # what the policy asks for this message: none/quarantine/reject
    reason: str = ""
    # The record's p= when `policy` is its sp= (a subdomain's mail, the record found at the
    # organisational domain): the comment shows both, as Gmail does, to match the record.
    p: str = ""

    @property
    def rejects(self) -> bool:
        """Does enforce refuse the message? A failure under p=reject, or a From: of more
        author domains than are judged (`judge`)."""
        return self.result in ("fail", "permerror") and self.disposition == "reject"


@functools.cache
def _psl() -> PublicSuffixList:
    if os.path.exists(PSL_FILE):
        return PublicSuffixList(psl_file=PSL_FILE)
    return PublicSuffixList()  # (the list bundled with publicsuffix2)


@functools.lru_cache(maxsize=4096)  # (a few per message, for the same few domains)
def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label (a name unknown to the list has its last
    label as its suffix)."""
    domain = domain.lower().rstrip(".")
    suffix = _psl().get_tld(domain) or domain.rpartition(".")[2]
    if domain == suffix or not domain.endswith("." + suffix):
        return domain
    head = domain[: -len(suffix) - 1]
    return f"{head.rpartition('.')[2]}.{suffix}"


def listed_suffix(domain: str) -> str | None:
    """The public suffix of `domain` when the Public Suffix List has a rule for it (`org`,
    `co.uk`), else None (`localdomain`, `lan`: names the world cannot look up)."""
    suffix: str | None = _psl().get_tld(domain.lower().rstrip("."), strict=True)
    return suffix


def aligned(a: str, b: str, mode: str) -> bool:
    a, b = normal_domain(a), normal_domain(b)  # (A-labels: a d= may be in U-labels)
    if mode == "s":
        return a == b
    return organizational_domain(a) == organizational_domain(b)


REMEMBERED_MAX = 512  # (the longest records remembered: 256 of them, 128 KiB at most)


def _parse(record: str) -> Policy | None:
    """A DMARC record (`v=DMARC1; p=reject; ...`), or None if it is not a usable one."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        return None
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    if p not in POLICIES or sp not in POLICIES:
        # RFC 7489 6.6.3 step 6: a record without a valid p=, or with an sp= that is not
        # valid, is read as p=none if it asks for reports (a URI in rua=), else as no policy.
        if not any(_URI.match(uri.strip()) for uri in tags.get("rua", "").split(",")):
            return None
        p = sp = "none"
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return Policy(
        p=p,
        sp=sp,
        pct=pct,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
    )


# (A sender's record is the same message after message: its parse was a third of judging it
# from the cache. Those of a real record's size are remembered; a Policy is frozen, to be shared.)
parse = Remembered(_parse, REMEMBERED_MAX, 256)


def discover(txt: Callable[[str], Sequence[str]], from_domain: str) -> tuple[Policy, bool] | None:
    """The policy for `from_domain` (RFC 7489 6.6.3), and whether it was found at the
    organisational domain rather than at `from_domain` itself (then its sp= applies).
    The organisational domain is asked only when `from_domain` has no DMARC record: one there
    that is no usable policy means none (step 6), never the organisational domain's sp=.
    `txt(name)` gives a name's TXT records; what it raises (TemporaryFailure, NotCached)
    passes through."""
    for domain in dict.fromkeys([from_domain, organizational_domain(from_domain)]):
        records = [r for r in txt(f"_dmarc.{domain}") if is_record(r)]
        if len(records) == 1:
            policy = parse(records[0])
            return None if policy is None else (policy, domain != from_domain)
        if len(records) > 1:
            return None  # several records: no policy at all (6.6.3 step 5)
    return None


# The worse of two outcomes, for a From: of several domains: a failure the policy acts on
# most severely first, then one the DNS left open, then the rest.
_RANK = {"pass": 0, "none": 1, "permerror": 2, "temperror": 3, "fail": 4}


def _severity(result: DmarcResult) -> tuple[int, int]:
    return _RANK.get(result.result, 2), POLICIES.index(result.disposition)


async def evaluate(
    lookups: Lookups,
    from_domains: Sequence[str] | None,
    spf: SpfResult,
    dkim: Sequence[DkimResult],
    rng: random.Random | None = None,
) -> DmarcResult:
    """The verdict for the message's From: domains (None: no usable From: field), asking the
    DNS for what the cache lacks (`Evaluation.run`)."""
    return await Evaluation(lookups, from_domains, spf, dkim, rng).run()


class PolicyRecords:
    """The policy records one message's verdict reads, each asked once: from the worker's
    cache, else the DNS, a failure kept as its answer (a second reading must see what the
    first saw, even if expired meanwhile). Which records those are depends on the From:
    domains alone, so `fetch` can run while SPF and DKIM are checked: a forger whose SPF
    never answers then takes no time from the policy lookups (a reviewer's finding: they
    began after SPF's 0.9 of the timeout, and a policy domain slower than the tenth left
    turned a p=reject failure into a temperror, stored under enforce)."""

    def __init__(self, lookups: Lookups) -> None:
        self.lookups = lookups
        self.asked: dict[str, tuple[str, ...] | TemporaryFailure] = {}

    def txt(self, name: str) -> tuple[str, ...]:
        """The TXT records of `name`; NotCached if neither asked nor in the cache."""
        answer = self.asked.get(name)
        if answer is None:
            answer = self.asked[name] = self.lookups.cached_txt(name)
        if isinstance(answer, TemporaryFailure):
            raise answer
        return answer

    async def ask(self, name: str) -> None:
        try:
            self.asked[name] = await self.lookups.txt(name)
        except TemporaryFailure as exc:
            self.asked[name] = exc

    async def fetch(self, from_domains: Sequence[str] | None) -> None:
        """Ask for every record that discovering the policies of `from_domains` reads, the
        domains at once (none when `judge` looks none up: `_unjudged`)."""
        if from_domains and _unjudged(from_domains) is None:
            await asyncio.gather(*(self._discover(d) for d in dict.fromkeys(from_domains)))

    async def _discover(self, from_domain: str) -> None:
        while True:
            try:
                _policy(self.txt, from_domain)
                return
            except NotCached as missing:
                await self.ask(missing.name)


class Evaluation:
    """One message's DMARC verdict over the DNS. `run`: `judge` runs, and each record it
    misses is looked up before it runs again (a name or two per From: domain, most of them
    cached, or `records` fetched already). `so_far`, when the time is up: the verdict from
    what has been answered, the records still missing a temperror each. Every From: domain
    is judged on its own, so one whose record came is judged as it would have been whatever
    another's DNS does: an attacker's pass put a second author with a silent DNS beside a
    forged p=reject From: to turn the whole verdict into a temperror."""

    def __init__(
        self,
        lookups: Lookups,
        from_domains: Sequence[str] | None,
        spf: SpfResult,
        dkim: Sequence[DkimResult],
        rng: random.Random | None = None,
        records: PolicyRecords | None = None,
    ) -> None:
        self.records = records or PolicyRecords(lookups)
        self.from_domains = from_domains
        self.spf = spf
        self.dkim = dkim
        self.rng = rng

    async def run(self) -> DmarcResult:
        while True:
            try:
                return judge(self.records.txt, self.from_domains, self.spf, self.dkim, self.rng)
            except NotCached as missing:
                await self.records.ask(missing.name)

    def so_far(self, reason: str) -> DmarcResult:
        def txt(name: str) -> Sequence[str]:
            try:
                return self.records.txt(name)
            except NotCached:
                raise TemporaryFailure(reason) from None

        return judge(txt, self.from_domains, self.spf, self.dkim, self.rng)


def judge(
    txt: Callable[[str], Sequence[str]],
    from_domains: Sequence[str] | None,
    spf: SpfResult,
    dkim: Sequence[DkimResult],
    rng: random.Random | None = None,
) -> DmarcResult:
    """`evaluate` with the records from `txt` (which may raise NotCached: nothing is judged
    then, no sample drawn; the caller asks the DNS, or `evaluate` does)."""
    unjudged = _unjudged(from_domains)
    if unjudged is not None:
        return unjudged
    assert from_domains  # (_unjudged has answered for none)
    found = [_policy(txt, d) for d in from_domains]  # (every lookup before any pct= draw)
    outcomes = [_verdict(d, f, spf, dkim, rng) for d, f in zip(from_domains, found, strict=True)]
    return max(outcomes, key=_severity)


def _unjudged(from_domains: Sequence[str] | None) -> DmarcResult | None:
    """The verdict of a From: whose domains are not looked up (none usable, too many, one no
    DNS name can be), or None for one whose are."""
    if not from_domains:
        return DmarcResult("permerror", reason="no single From: field with usable addresses")
    if len(from_domains) > MAX_AUTHOR_DOMAINS:
        return DmarcResult(
            "permerror",
            ",".join(from_domains[:MAX_AUTHOR_DOMAINS]),
            disposition="reject",
            reason=f"{len(from_domains)} author domains, more than {MAX_AUTHOR_DOMAINS}",
        )
    named = [d for d in from_domains if is_dns_name(d)]
    if len(named) < len(from_domains):
        return DmarcResult(
            "permerror",
            ",".join(named),
            disposition="reject",
            reason="an author domain that no DNS name can be",
        )
    return None


_Found = tuple[Policy, bool] | None | TemporaryFailure


def _policy(txt: Callable[[str], Sequence[str]], from_domain: str) -> _Found:
    try:
        return discover(txt, from_domain)
    except TemporaryFailure as exc:
        return exc


def _verdict(
    from_domain: str,
    found: _Found,
    spf: SpfResult,
    dkim: Sequence[DkimResult],
    rng: random.Random | None,
) -> DmarcResult:
    if isinstance(found, TemporaryFailure):
        return DmarcResult("temperror", from_domain, reason=str(found))
    if found is None:
        return DmarcResult("none", from_domain)
    policy, inherited = found
    spf_ok = spf.result == "pass" and aligned(spf.domain, from_domain, policy.aspf)
    dkim_ok = any(r.result == "pass" and aligned(r.domain, from_domain, policy.adkim) for r in dkim)
    applies = policy.sp if inherited else policy.p
    p = policy.p if inherited else ""
    if spf_ok or dkim_ok:
        return DmarcResult("pass", from_domain, applies, "none", p=p)
    if _unanswered(from_domain, policy, spf, dkim):
        why = "no DNS answer for a check"
        return DmarcResult("temperror", from_domain, applies, "none", why, p=p)
    disposition = applies
    if (rng or random).randrange(100) >= policy.pct:  # not sampled: one step milder (7.1)
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(applies, "none")
    return DmarcResult("fail", from_domain, applies, disposition, p=p)


def _unanswered(
    from_domain: str, policy: Policy, spf: SpfResult, dkim: Sequence[DkimResult]
) -> bool:
    """Could an aligned SPF or DKIM check have passed, had the DNS answered? Then DMARC is a
    temperror, not a failure: a DNS timeout never refuses mail. (A signature without d= could
    never pass: a second attacker's pass added one to a forged message, to count as "might
    have been aligned" once the check thread ran late.)"""
    if spf.result == "temperror" and aligned(spf.domain or from_domain, from_domain, policy.aspf):
        return True
    return any(
        r.result == "temperror" and r.domain and aligned(r.domain, from_domain, policy.adkim)
        for r in dkim
    )

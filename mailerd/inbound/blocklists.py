"""DNS blocklists (`--dnsbl ZONE`, RFC 5782): whether a network client's address is listed.

Asked once a session, at its connect, from the worker's event loop through the inbound checks'
caching resolver (`lookups`), every zone at once; the answer is awaited only at the first RCPT,
which a listed client gets `554 5.7.1 Service unavailable; Client host [IP] blocked using ZONE`
(Postfix's `reject_rbl_client`, in its words, so that the operator's and fail2ban's habits
apply). Refused at RCPT rather than at the greeting, as Postfix's smtpd does, so that the log
shows whom the mail was from and for.

A zone lists an address with an A record in 127.0.0.0/8 at the address's name under it
(`2.0.0.127.zone` for 127.0.0.2; an IPv6 address's 32 nibbles, reversed). Spamhaus answers
from 127.255.255.0/24 for a query it refuses (.252 a typo in the zone, .254 a query through a
public resolver, .255 too many queries): those are no listing, and a warning says why, once an
hour a zone in each worker. A zone that does not answer in --dns-timeout lists nothing: mail
is never refused because a blocklist is down (the fail-open every MTA chooses), and the zone
is not asked again for a minute (RESTING), so that sessions do not each wait the timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Sequence

from mailerd.inbound.lookups import Lookups, TemporaryFailure
from mailerd.log import Throttle
from mailerd.smtp.events import Reply

log = logging.getLogger("mailerd.blocklists")

LISTED = ipaddress.ip_network("127.0.0.0/8")
# Spamhaus keeps this range for the errors of a query it refuses, "not to be interpreted as any
# sort of reputation": none is a listing (an attacker's pass: .253, or a code added later,
# refused every client), and those known are said in words.
ERRORS = ipaddress.ip_network("127.255.255.0/24")
REFUSED = {
    "127.255.255.252": "the zone's name is mistyped",
    "127.255.255.254": (
        "queries through a public resolver are refused: give dns-server a resolver of your own "
        "(Spamhaus's DQS, or unbound on this machine)"
    ),
    "127.255.255.255": "too many queries from this resolver",
}
WARN_EVERY = 3600.0  # seconds between warnings about one zone's refusals, in a worker
# Seconds a zone that did not answer (in --dns-timeout) is not asked, in a worker: while a
# blocklist is down, each session's first RCPT would otherwise wait the whole timeout.
RESTING = 60.0


def query_name(address: str, zone: str) -> str:
    """The name under `zone` at which a listing of `address` would be (RFC 5782 2.1, 2.4)."""
    ip = ipaddress.ip_address(address)
    labels = str(ip).split(".") if ip.version == 4 else list(ip.exploded.replace(":", ""))
    return ".".join([*reversed(labels), zone])


def blocked(address: str, zone: str) -> Reply:
    return Reply(554, "5.7.1", f"Service unavailable; Client host [{address}] blocked using {zone}")


class Blocklists:
    def __init__(self, zones: Sequence[str], lookups: Lookups) -> None:
        self.zones = tuple(zones)
        self.lookups = lookups
        self._warnings = Throttle(WARN_EVERY)  # by (zone, code)
        self._resting: dict[str, float] = {}  # zone -> until when it is not asked

    async def listing(self, address: str) -> str | None:
        """The first zone (in the order given) that lists `address`; None if none does, or
        none could say."""
        found = await asyncio.gather(*(self._lists(zone, address) for zone in self.zones))
        return next((zone for zone, listed in zip(self.zones, found, strict=True) if listed), None)

    async def _lists(self, zone: str, address: str) -> bool:
        if time.monotonic() < self._resting.get(zone, 0.0):
            return False
        try:
            records = (await self.lookups.query(query_name(address, zone), "A")).records
        except TemporaryFailure as exc:
            self._rest(zone, exc)
            return False
        except ValueError:  # (a scoped address: no query)
            return False
        listed = False
        for record in records:
            ip = ipaddress.ip_address(record)
            if ip in ERRORS:
                self._warn(zone, record)
            elif ip in LISTED:
                listed = True
        return listed

    def _rest(self, zone: str, exc: TemporaryFailure) -> None:
        if time.monotonic() < self._resting.get(zone, 0.0):
            return  # (sessions that asked before it was found silent)
        self._resting[zone] = time.monotonic() + RESTING
        log.warning(
            "dnsbl %s did not answer (%s): nothing is refused for it, and it is not asked for %d s",
            zone,
            exc,
            RESTING,
        )

    def _warn(self, zone: str, code: str) -> None:
        if not self._warnings.due((zone, code)):
            return
        reason = REFUSED.get(code, "an error code of the zone's")
        log.warning("dnsbl %s answered %s: %s; nothing is refused for it", zone, code, reason)

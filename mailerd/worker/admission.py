"""The session caps at connect: whether a new connection may have a session, counted over all
workers (through the shared `ipc.sessiontable`), and the words of the 421 when it may not.

**Capacity for each kind of client.** The listeners draw from pools of --max-sessions: the
local listeners' (the machine's own mail programs), the submission listeners' (the owner's
mail programs away from home) and the network listeners' (the Internet's servers). Each pool
keeps --reserved-sessions places (default: a tenth of the total) that no other pool may take,
so however many sessions the Internet holds on port 25 — legitimately, or trickling to hold
them — the loopback and submission listeners still answer; and however many it holds on the
submission ports, which anyone may open before logging in, port 25 still takes mail (a
reviewer's finding: 1,000 silent connections to port 465 from 20 addresses had every place, and
port 25 answered 421; Postfix's process limit per service keeps its services apart). A pool may
grow past its reserve into the free places, as long as it leaves the other pools what is left
of their reserves. A reserve rather than pools of their own: --max-sessions stays the bound on
the server's sessions in all (its memory, its descriptors), as it always was; a pool with no
listener reserves nothing. The network pool's reserve is what the owner pools' leave when
that is less (--reserved-sessions is checked against theirs alone, as before it had one).

**Known clients.** The submission listeners' reserve is split in two pools: half of it
(rounded down) is kept for known clients — addresses from which an account logged in within
`authfailures.KNOWN_FOR` (30 days: `AuthFailures.known_client`) — and the rest for any client.
The crowd of silent connections from a few dozen addresses that anyone may open on 587 and 465
took the submission reserve and every free place, and the owner's own mail program was refused
there; it now finds its part kept, which nobody else may take. A known client counts in the
known pool for its whole session, and when that pool has no room it may still take a place as
any client (its own reserve is a floor, never less than it had); an unknown client that logs in
stays counted where it began (its next connection is known). The limit: an owner on a network
it never logged in from (a hotel's) is not known yet, and competes with the crowd for the rest.
The submission listeners together keep --reserved-sessions, as before.

Each known client has a share of the known pool (`Caps.known_share`: KNOWN_SHARE, 4 places,
and never more than half the pool), its sessions past it counted as any client's: an
attacker's pass found one known address (one stolen password, any user of a shared server)
holding all 50 places of the default pool — --max-sessions-per-ip is as many — and the
owner's laptop refused behind a crowd. A mail program opens one or two connections at a time,
a household behind one NAT address has a few devices: 4 covers them, and it takes 13 known
addresses to fill the default pool. A share that grew with the pool (a sixteenth) would give
one address more of a larger server's without protecting anyone better. What remains: many
known clients at once can still hold the known pool (a server of many users, or one stolen
password used from 13 new addresses in a day: each account makes 16 known a day). Workers
admitting the same client at the same instant may each give it a place past its share, as
with the other caps: at most one a worker.

**Per client.** --max-sessions-per-ip counts the sessions of one client on the network and
submission listeners (the local ones are the machine's own). A client is an IPv4 address, or
an IPv6 address's /--ipv6-prefix-length network (default /64): one host, or one customer of
a provider, is given a whole /64, so counting each IPv6 address would make one client 2^64 of
them. An IPv4-mapped IPv6 address is its IPv4 address.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailerd import config
from mailerd.config import Config, ListenAddress
from mailerd.ipc import sessiontable
from mailerd.ipc.sessiontable import SessionCounter, client_key

# The pools, as columns of the session table: KNOWN_POOL is the submission listeners' sessions
# of known clients (`pool_of` never gives it: the worker moves a known client there).
LOCAL_POOL, SUBMISSION_POOL, NETWORK_POOL, KNOWN_POOL = range(sessiontable.POOLS)
POOLS = sessiontable.POOLS
_POOL_OF_ROLE = {
    config.LOCAL: LOCAL_POOL,
    config.SUBMISSION: SUBMISSION_POOL,
    config.SUBMISSIONS: SUBMISSION_POOL,
    config.NETWORK: NETWORK_POOL,
}

# A known client's places in the known pool (its further sessions compete as any client's).
KNOWN_SHARE = 4
assert KNOWN_POOL == sessiontable.SHARED_POOL  # (the table counts it per client)

SERVER_FULL = "Too many connections, try again later"
CLIENT_FULL = "Too many connections from your address"


def pool_of(listen: ListenAddress) -> int:
    return _POOL_OF_ROLE[listen.role]


@dataclass(frozen=True)
class Caps:
    """The numbers admission works with, from the configuration and the listeners served."""

    total: int
    per_client: int
    reserves: tuple[int, ...]  # per pool: places no other pool may take
    ipv6_prefix_length: int

    @classmethod
    def of(cls, cfg: Config) -> Caps:
        """From the server's listeners (every worker's, so all count alike)."""
        pools = {pool_of(listen) for listen in cfg.listeners}
        owners = len(pools - {NETWORK_POOL})
        reserved = cfg.reserved_sessions
        # What the owners' reserves may take: all, or all but one place for the network.
        room = cfg.max_sessions - (NETWORK_POOL in pools)
        if owners and reserved * owners > room:
            # (config refuses this with a network listener; without one, reserves past the
            # total would admit nobody at all: a second attacker's pass)
            reserved = room // owners
        # The network's reserve: as many, or what the owners' leave (a configuration that was
        # valid before the network had one stays valid; an attacker's pass).
        network = min(reserved, cfg.max_sessions - reserved * owners) if owners else 0
        # The submission listeners' reserve, split: half (rounded down) for known clients, so
        # that any client keeps at least one place when there is a reserve (rounded up, a
        # reserve of 1 was all known clients', and after a start, when nobody is known yet,
        # nobody could log in where the reserves fill --max-sessions: an attacker's pass).
        known = reserved // 2
        reserves = (
            reserved if LOCAL_POOL in pools else 0,
            reserved - known if SUBMISSION_POOL in pools else 0,
            network if NETWORK_POOL in pools else 0,
            known if SUBMISSION_POOL in pools else 0,
        )
        return cls(cfg.max_sessions, cfg.max_sessions_per_ip, reserves, cfg.ipv6_prefix_length)

    @property
    def known_share(self) -> int:
        """A known client's places in the known pool: KNOWN_SHARE, and at most half the pool,
        so that no one client holds it all (at least one place where there is one)."""
        return max(1, min(KNOWN_SHARE, self.reserves[KNOWN_POOL] // 2))

    def counted_key(self, listen: ListenAddress, peer: str) -> str | None:
        """The key a session counts under for the per-client cap; None on a local listener."""
        return None if listen.trusted else client_key(peer, self.ipv6_prefix_length)

    def refusal(self, counts: SessionCounter, pool: int, key: str | None) -> str | None:
        """Why a new session in `pool` for client `key` is refused (the 421's text), or None
        when it may have one."""
        if not self.room_in(counts, pool):
            return SERVER_FULL
        if key is not None and counts.for_address(key) >= self.per_client:
            return CLIENT_FULL
        return None

    def admit(self, counts: SessionCounter, pool: int, key: str | None) -> tuple[int, str | None]:
        """The pool a new session counts in, and why it is refused (None: it may have one).
        A known client takes a place of its own pool or, when that has no room, one of any
        submission client (its part of the reserve is kept for it, not all it may have), as
        it does past its share of the known pool."""
        if (
            pool == KNOWN_POOL
            and key is not None
            and counts.in_shared_pool(key) >= self.known_share
        ):
            pool = SUBMISSION_POOL  # (past its share)
        refusal = self.refusal(counts, pool, key)
        if pool == KNOWN_POOL and refusal == SERVER_FULL:
            pool = SUBMISSION_POOL
            refusal = self.refusal(counts, pool, key)
        return pool, refusal

    def room_in(self, counts: SessionCounter, pool: int) -> bool:
        """A place free in all, and what stays free after taking it still covers the other
        pools' unused reserves."""
        in_pool = [counts.in_pool(each) for each in range(POOLS)]  # (each read once)
        used = sum(in_pool)
        owed = sum(
            max(0, reserve - in_pool[other])
            for other, reserve in enumerate(self.reserves)
            if other != pool
        )
        return used < self.total and self.total - used - 1 >= owed

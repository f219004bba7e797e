"""Failed AUTH attempts, shared by all workers, per client address and per account; and the
addresses each account logged in from lately, and the addresses any account did.

Per address: each failure from an address makes its next answer wait longer (0.5 s, 1 s, 2 s,
… up to 10 s), whichever worker the next session lands on, so that guessing passwords costs
the guesser time, not us CPU. From LOCKOUT failures on, an address's logins are not even
checked (454) until it is forgotten: the check (argon2) is what costs us, and a guesser that
hangs up rather than wait for the delay would otherwise have as many checked as it can open
sessions (mox does the same). An IPv6 address counts by its prefix (--ipv6-prefix-length,
/64 by default, as the session caps count it).

Per account: a guesser who changes address for every guess (a botnet, the 65,536 /64s of one
/48) never meets the address's lockout, so failures also count for the account named (the
login's user part: `alice`, `Alice@example.org`, `alice+x@…` are one). From ACCOUNT_LOCKOUT
failures on, that account's logins are checked only from an address it logged in from lately
(KNOWN_FOR, recorded at each success: the user's own phone and laptop keep working); from any
other they are refused unchecked (454, temporary) until the account is forgotten. That bounds
the guesses at one password to ACCOUNT_LOCKOUT per FORGET seconds, and the checks a spray can
make to those, whatever addresses it has.

The master maps the tables before it forks (as `sessiontable`): cells of three doubles, [count,
time of the last, the key's fingerprint]. Keys are hashed into buckets, and a cell counts for
the key whose fingerprint it holds (the hash's other bits): another key hashed into the same
bucket takes the cell over rather than add to its count, so that failures from addresses an
attacker sprays cannot slow down, let alone lock out, an innocent one (with a lockout, a shared
count would let them). Accounts are the other way round: the names of a bucket are counted
together, so that no name can start another's count again (a lock that comes early only sends
the account's own addresses to their checks). Python's string hash is seeded at random per
start, so nobody outside can aim at a bucket. Any worker writes any cell without a lock: two
failures at the same instant may count as one, which is harmless for a delay and lets a lockout
come a guess or two late. A record is forgotten FORGET seconds after its last failure, and not
when a login from it succeeds: anyone with one account would otherwise reset the count between
guesses at another's password. The addresses an account logged in from are a table of their
own, written only by successes, so that failures cannot push them out.

Known clients: the addresses (clients, as above) from which any account logged in within
KNOWN_FOR are a fourth table, also written only by successes, and only read at connect (a
lookup writes nothing), so neither failures nor connections from addresses never seen can push
a known one out. The session caps keep a part of the submission listeners' places for them
(`worker.admission`): the owner's laptop gets in when a crowd holds the rest. Its cells are
taken over, as the addresses' are, so one account logging in from thousands of addresses (a
stolen password, the 65,536 /64s of one /48) would push the owner's out: an account makes at
most NEW_CLIENTS_A_DAY new addresses known a day, counted in a fifth table (pooled, keyed by
the account and the day, the day's number as its time, so that a count is the day's alone). A
login from a further new address is remembered in neither table that day (the account's
addresses, `known`, have cells taken over too: one account's thousands would push out the
addresses other accounts' lockouts let in); a login on a later day remembers it. A login from
an address already known, by this account or by any, counts nothing. One account then writes
at most about 500 cells of each table in the 30 days an address stays known (3% of 16,384:
another's address is out only if one of them hits its cell, and back at its next login); many
accounts, each adding as many, can still push more out.
"""

from __future__ import annotations

import mmap
import time

from mailerd.config import DEFAULT_IPV6_PREFIX_LENGTH
from mailerd.ipc.sessiontable import client_key
from mailerd.names import mailbox_name

BUCKETS = 65536  # addresses (1.5 MiB, shared)
ACCOUNT_BUCKETS = 4096  # accounts named in logins (96 KiB)
KNOWN_BUCKETS = 16384  # (account, address) pairs that logged in (384 KiB)
CLIENT_BUCKETS = 16384  # addresses any account logged in from (384 KiB)
NEWCOMER_BUCKETS = 4096  # (account, day) pairs: the known clients each account added (96 KiB)
CELL = 3  # doubles a bucket: count, the time of the last, the key's fingerprint
FIRST_DELAY = 0.5  # seconds, before the answer to the first failure
MAX_DELAY = 10.0
FORGET = 900.0  # seconds without a failure after which an address or account starts over
LOCKOUT = 10  # failures after which an address's logins are refused unchecked
ACCOUNT_LOCKOUT = 100  # failures after which an account is checked from known addresses only
KNOWN_FOR = 30 * 86400.0  # seconds an address an account logged in from stays known
# New known clients an account may add a day: a phone on mobile data (a carrier's NAT, a new
# /64 at each reconnect) and a laptop travelling (home, train, café, hotel, office) make a
# handful; 16 leaves room for both and for a few people sharing an account, and bounds one
# account to 16 × 30 = 480 of CLIENT_BUCKETS' 16,384 cells. Past it, a login only misses the
# kept places (as every login did before there were any), so a cap a little low costs little.
NEW_CLIENTS_A_DAY = 16
DAY = 86400.0
_FINGERPRINT = (1 << 52) - 1  # (bits a double holds exactly)


class _Table:
    """Shared cells of [count, time of the last, fingerprint], one key each (see above); or,
    `pooled`, the keys of a bucket counted together (a collision only adds)."""

    def __init__(self, buckets: int, *, pooled: bool = False) -> None:
        self.buckets = buckets
        self.pooled = pooled
        # MAP_SHARED | MAP_ANONYMOUS: the forked workers see the same pages.
        self._map = mmap.mmap(-1, buckets * CELL * 8)
        self._cells = memoryview(self._map).cast("d")

    def _slot(self, key: str) -> tuple[int, float]:
        """The key's cell and its fingerprint."""
        h = hash(key)
        return CELL * (h % self.buckets), float((h >> 20) & _FINGERPRINT)

    def count(self, key: str, now: float, lasting: float) -> float:
        """The key's count, if its last event is less than `lasting` seconds old."""
        return self._count(*self._slot(key), now, lasting)

    def add(self, key: str, now: float, lasting: float) -> None:
        """One more for `key` (which takes its cell over from another key, unless pooled)."""
        cell, fingerprint = self._slot(key)
        self._cells[cell] = self._count(cell, fingerprint, now, lasting) + 1
        self._cells[cell + 1] = now
        self._cells[cell + 2] = fingerprint

    def _count(self, cell: int, fingerprint: float, now: float, lasting: float) -> float:
        count, last, owner = self._cells[cell : cell + CELL]
        mine = self.pooled or owner == fingerprint
        return count if mine and now - last < lasting else 0.0


class AuthFailures:
    def __init__(
        self,
        buckets: int = BUCKETS,
        ipv6_prefix_length: int = DEFAULT_IPV6_PREFIX_LENGTH,
        *,
        account_buckets: int = ACCOUNT_BUCKETS,
        known_buckets: int = KNOWN_BUCKETS,
        client_buckets: int = CLIENT_BUCKETS,
        newcomer_buckets: int = NEWCOMER_BUCKETS,
    ) -> None:
        self.ipv6_prefix_length = ipv6_prefix_length  # (the master sets it again at a reload)
        self._addresses = _Table(buckets)
        # Pooled: were a name sharing alice's bucket to take it over, one failure of that name
        # would start alice's count again, and a guesser who found one (an attacker's pass
        # did, by trying names until alice's lock lifted) would have 100 guesses more each
        # time. Pooled, it can only lock her early, which it could do by naming her.
        self._accounts = _Table(account_buckets, pooled=True)
        self._known = _Table(known_buckets)
        self._clients = _Table(client_buckets)
        # Pooled, as accounts are: an account sharing a bucket with another could otherwise
        # take the cell over and start the other's count again. Sharing, a heavy account can
        # only stop another adding new addresses early, for that day (the day is in the key,
        # so buckets are dealt again the next).
        self._newcomers = _Table(newcomer_buckets, pooled=True)

    def client(self, address: str) -> str:
        """What an address counts as: its client (`sessiontable.client_key`)."""
        return client_key(address, self.ipv6_prefix_length)

    def delay(self, address: str, now: float | None = None) -> float:
        """How long to wait before answering a failed AUTH from `address` (its earlier
        failures decide)."""
        failures = min(self.failures(address, now), 16)
        return float(min(FIRST_DELAY * 2.0**failures, MAX_DELAY))

    def failed(self, address: str, login: str | None = None, now: float | None = None) -> None:
        """A failed login from `address` (for `login`'s account, when one was named)."""
        now = time.monotonic() if now is None else now
        self._addresses.add(self.client(address), now, FORGET)
        if login is not None:
            self._accounts.add(account_of(login), now, FORGET)

    def failures(self, address: str, now: float | None = None) -> int:
        """The address's failures lately."""
        now = time.monotonic() if now is None else now
        return int(self._addresses.count(self.client(address), now, FORGET))

    def locked(self, address: str, now: float | None = None) -> bool:
        """Has `address` failed LOCKOUT times lately (its logins are then not checked)?"""
        return self.failures(address, now) >= LOCKOUT

    def account_failures(self, login: str, now: float | None = None) -> int:
        """The failures lately of the account `login` names, from every address."""
        now = time.monotonic() if now is None else now
        return int(self._accounts.count(account_of(login), now, FORGET))

    def succeeded(self, address: str, login: str, now: float | None = None) -> None:
        """`login` passed from `address`: from there, its account stays checked (`known`), and
        the address is a known client (`known_client`), unless both are new and the account
        is past its NEW_CLIENTS_A_DAY."""
        now = time.monotonic() if now is None else now
        seen = self.known(address, login, now) or self.known_client(address, now)
        if seen or self._newcomer(login, now):
            self._known.add(self._pair(address, login), now, KNOWN_FOR)
            self._clients.add(self.client(address), now, KNOWN_FOR)

    def known_client(self, address: str, now: float | None = None) -> bool:
        """Did any account log in from `address` (its client) lately?"""
        now = time.monotonic() if now is None else now
        return self._clients.count(self.client(address), now, KNOWN_FOR) > 0

    def known(self, address: str, login: str, now: float | None = None) -> bool:
        """Did `login`'s account log in from `address` (its client) lately?"""
        now = time.monotonic() if now is None else now
        return self._known.count(self._pair(address, login), now, KNOWN_FOR) > 0

    def account_locked(self, address: str, login: str, now: float | None = None) -> bool:
        """Is `login`'s account refused unchecked from `address`: ACCOUNT_LOCKOUT failures
        lately, and no login of its own from there?"""
        return self.account_failures(login, now) >= ACCOUNT_LOCKOUT and not self.known(
            address, login, now
        )

    def _newcomer(self, login: str, now: float) -> bool:
        """May `login`'s account make one more address known today? (It is then counted.)
        Two workers at the same instant may both say yes to the last one: one too many."""
        day = now // DAY
        # The day's number (of the monotonic clock: 24 hours, not midnight to midnight) is the
        # count's time, lasting 1: yesterday's count is not today's, so the cap starts again
        # each day, however often the account logged in (a sliding count would never end).
        key = f"{account_of(login)} {day:.0f}"
        if self._newcomers.count(key, day, 1.0) >= NEW_CLIENTS_A_DAY:
            return False
        self._newcomers.add(key, day, 1.0)
        return True

    def _pair(self, address: str, login: str) -> str:
        return f"{account_of(login)} {self.client(address)}"


def account_of(login: str) -> str:
    """The account a login name means, as the passwd file's users are found (`alice`,
    `Alice@example.org` and `alice+x@example.org` are one), for names of no user too."""
    local = login.rpartition("@")[0] or login
    return mailbox_name(local) or login.lower()

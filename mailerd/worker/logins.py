"""A worker's password checks (argon2: a tenth of a second of CPU and 64 MiB each, on purpose),
run in its two check threads, never in its event loop, and kept from piling up:

- the same login (name and password) asked by several sessions at once, as a mail program
  that opens a few connections at start does, is checked once, and each session gets the
  verdict;
- at most PER_CLIENT checks wait for one client (an address; an IPv6 prefix; the loopback)
  and MAX_PENDING in all; past either, the login is refused at once, unchecked (454), so that
  a flood of sessions that each send AUTH and hang up cannot queue checks without end in front
  of a real user's login; a login from an address its account logged in from lately may use
  one of RESERVE more (one account at a time), so that a spray from many addresses cannot
  crowd out the users at their usual addresses;
- a check whose client's connection was closed or reset while it waited is not made (the
  caller counts it as a failure: a client that does not wait for its answer is taken for a
  guesser);
- an address that failed LOCKOUT times lately is not checked at all, nor an account that did
  ACCOUNT_LOCKOUT times, unless from an address it logged in from (`ipc.authfailures`).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from mailerd.credentials import login_digest
from mailerd.ipc.authfailures import AuthFailures, account_of

log = logging.getLogger("mailerd.worker")

MAX_PENDING = 8  # per worker: a login waits behind at most this many checks
PER_CLIENT = 2  # per worker and client address (distinct logins checked at once)
RESERVE = 2  # more, per worker, for logins from an address their account logged in from


class Unchecked(enum.Enum):
    """Why a login has no verdict (the value is the log's words)."""

    LEFT = "the client left before the check"
    BROKEN = "the check itself failed"
    LOCKED = "too many failures lately"
    ACCOUNT_LOCKED = "too many failures for this user lately, from other addresses"
    BUSY = "too many logins at once"  # from this client: its own flood (fail2ban counts it)
    # Every place taken, by anyone: whoever meets it may be the victim of another's flood, a
    # user from a new place while a spray goes on, so fail2ban must not count it (other words).
    CROWDED = "too many logins waiting for a check"


Outcome = str | None | Unchecked  # the user, None (a wrong name or password), or Unchecked


@dataclass
class _Check:
    future: asyncio.Future[Outcome]
    sessions: int = 1  # waiting for its verdict
    reserved_for: str | None = None  # the account whose RESERVE place it takes


class Logins:
    def __init__(
        self,
        executor: Executor,
        verify: Callable[[str, str], str | None],
        failures: AuthFailures,
        *,
        limit: int = MAX_PENDING,
        per_client: int = PER_CLIENT,
    ) -> None:
        self.executor = executor
        self.verify = verify  # (login, password) → user or None; slow
        self.failures = failures
        self.limit = limit
        self.per_client = per_client
        self._by_client: collections.Counter[str] = collections.Counter()
        self._reserved: set[str] = set()  # accounts with a check in a RESERVE place
        self._checking: dict[bytes, _Check] = {}
        self._key = os.urandom(32)  # (in-flight logins are known by an HMAC, not a password)

    def start(
        self, address: str, login: str, password: str, gone: Callable[[], bool]
    ) -> asyncio.Future[Outcome] | Unchecked:
        """The verdict to come for a login from `address` (`gone()`: its client has left),
        or at once why it is not checked."""
        failures = self.failures
        barred = self.barred(address, login)
        if barred is not None:
            return barred
        digest = login_digest(self._key, login, password)
        same = self._checking.get(digest)
        if same is not None:
            same.sessions += 1
            return same.future
        client = failures.client(address)
        if self._by_client[client] >= self.per_client:
            return Unchecked.BUSY
        reserved_for = None
        if len(self._checking) >= self.limit:
            # A RESERVE place: for a login from an address its account logged in from, one
            # account at a time (an account holder flooding its own logins from its own
            # addresses took them all, an attacker's pass found).
            account = account_of(login)
            full = len(self._checking) >= self.limit + RESERVE
            if full or account in self._reserved or not failures.known(address, login):
                return Unchecked.CROWDED
            reserved_for = account
            self._reserved.add(account)
        self._by_client[client] += 1
        loop = asyncio.get_running_loop()
        check = self._checking[digest] = _Check(loop.create_future(), reserved_for=reserved_for)
        loop.create_task(self._run(check, digest, client, login, password, gone))
        return check.future

    async def _run(
        self,
        check: _Check,
        digest: bytes,
        client: str,
        login: str,
        password: str,
        gone: Callable[[], bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(
                self.executor, self._verify_if_wanted, check, login, password, gone
            )
        except Exception as exc:
            log.error("checking a password failed: %r", exc)
            found = Unchecked.BROKEN
        finally:
            del self._checking[digest]
            if check.reserved_for is not None:
                self._reserved.discard(check.reserved_for)
            self._by_client[client] -= 1
            if self._by_client[client] <= 0:
                del self._by_client[client]
        check.future.set_result(found)

    def _verify_if_wanted(
        self, check: _Check, login: str, password: str, gone: Callable[[], bool]
    ) -> Outcome:
        """(In a check thread.) Not made when its only session's client has left."""
        if check.sessions == 1 and gone():
            return Unchecked.LEFT
        return self.verify(login, password)

    def barred(self, address: str, login: str) -> Unchecked | None:
        """Why no login for `login` from `address` is looked at now (nor counted): the
        address, or the account from an address it has not logged in from, failed too often
        lately. Else None."""
        failures = self.failures
        if failures.locked(address):
            return Unchecked.LOCKED
        if failures.account_locked(address, login):  # (from an address it is not known at)
            return Unchecked.ACCOUNT_LOCKED
        return None

    def suspect(self, address: str) -> bool:
        """Has the address failed lately, or a check waiting? Then even a login remembered
        as right is checked again (`start`), so that a guesser never learns at once, from the
        memory of a user's login, what a check would have told it only after the delay."""
        failures = self.failures
        return bool(self._by_client.get(failures.client(address))) or failures.failures(address) > 0

    def shutdown(self) -> None:
        """At the worker's end: checks not started are dropped."""
        self.executor.shutdown(wait=False, cancel_futures=True)

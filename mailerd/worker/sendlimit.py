"""--max-recipients-per-day: the recipients at other domains that one authenticated account may
send to within 24 hours (counted over every worker in `ipc.sentcounts`), so that a stolen
password sends a day's worth of spam at most, not enough to land our address on blocklists.

Checked at RCPT, for an authenticated session's remote recipient: when the account's count
plus the transaction's remote recipients accepted so far reach the limit, that recipient is
deferred (`replies.SEND_LIMIT`) and the session goes on; local recipients are not limited
(nor, so, a local alias that forwards: the administrator wrote its targets). Counted at the end
of the data, each remote address once, before the message is committed (`reserve`): what
was taken, not what was asked for. A commit that fails counts all the same: its outcome may be
unknown (a timeout or a broken channel, after which the delivery process may still queue it),
and taken back in another hour's slot its count would have gone negative for a day (an
attacker's pass); counting a rare failure defers early, never lets more through. Counting at
RCPT alone let sessions side by side each have their transaction's recipients accepted
against the same count (an attacker's pass: 8 sessions of one account sent 24 with a limit of
3; 50 × 100 at the defaults); at the end of the data, the message that would pass the limit is
deferred whole (`replies.SEND_LIMIT_DATA`), as mox does. The local listener's clients that do
not log in (the machine's own programs) are not limited.

When an account first reaches its limit in a window, one warning says so, with the account
and the client's address: a user who never sends that much probably lost a password.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from mailerd.aliases import normal_address
from mailerd.ipc.sentcounts import SentCounts
from mailerd.names import Locality
from mailerd.smtp.events import Address, Reply
from mailerd.smtp.replies import SEND_LIMIT, SEND_LIMIT_DATA

log = logging.getLogger("mailerd.worker")


class SendLimit:
    def __init__(
        self,
        counts: SentCounts,
        limit: int,
        locality: Locality,
    ) -> None:
        """`limit` 0: no limit; `locality`: which recipients are not counted."""
        self.counts = counts
        self.limit = limit
        self.locality = locality

    def refusal(
        self, user: str, client: str, recipient: Address, accepted: Sequence[Address]
    ) -> Reply | None:
        """SEND_LIMIT if `user` may not send to `recipient` now, `accepted` being the
        transaction's recipients so far (from `client`, for the log); else None."""
        if not self.limit or not self._remote(recipient):
            return None
        sent = self.counts.count(user)
        if sent + len(accepted) < self.limit:  # (its remote ones, each once, are no more)
            return None
        pending = self._distinct(accepted)
        if normal_address(str(recipient)) in pending:
            return None  # (counted once: the same copy)
        if sent + len(pending) < self.limit:
            return None
        self._reached(user, client)
        return SEND_LIMIT

    def reserve(self, user: str, client: str, recipients: Iterable[Address]) -> Reply | None:
        """`user`'s message to `recipients` is about to be committed: its remote ones count
        from now on, or, were they to pass the limit, SEND_LIMIT_DATA and nothing counts
        (two messages at the same instant on two workers: the table's lock orders them)."""
        remote = len(self._distinct(recipients))
        if not self.limit or not remote:
            return None
        count = self.counts.add(user, remote, limit=self.limit)
        if count > self.limit:
            self._reached(user, client)
            return SEND_LIMIT_DATA
        if count == self.limit:
            self._reached(user, client)
        return None

    def _reached(self, user: str, client: str) -> None:
        if self.counts.first_report(user):
            log.warning(
                "limit reached: user %s has sent to the %d recipients at other domains that "
                "max-recipients-per-day allows within 24 hours, the last from [%s]; more are "
                "deferred (450 4.7.1) until the oldest leave the window. Not the user? Then "
                "the password is stolen: change it (mailerd passwd %s)",
                user,
                self.limit,
                client,
                user,
            )

    def _distinct(self, recipients: Iterable[Address]) -> set[str]:
        """The remote ones, each once (as the queue takes them: the domain's case aside)."""
        return {normal_address(str(a)) for a in recipients if self._remote(a)}

    def _remote(self, address: Address) -> bool:
        return bool(address.domain) and not self.locality.is_local(address.domain)

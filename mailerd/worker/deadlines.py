"""A session's deadlines (RFC 5321 4.5.3.2's per-stage timeouts), as arithmetic over the
times the connection gives it; the connection keeps the one timer and does the closing.

None of them is extended by a trickled byte:
- a command line must arrive complete within --timeout of its first byte, and the next one
  begin within --timeout of our reply;
- message content (a DATA body, a BDAT chunk) must keep up --min-data-rate, with --timeout to
  spare: its n-th octet is due --timeout + n / rate after its start;
- the whole session ends at --max-session-time.

The clocks are restarted once per read (and per answer of ours), never per byte. While the
session waits on us (a commit, a check, a password) the client is not late: the connection
does not ask then.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Expired(enum.Enum):
    """Which deadline passed."""

    SESSION = "session"
    CONTENT = "content"
    COMMAND = "command"  # a command line begun and not finished
    NO_COMMAND = "no command"


@dataclass
class Deadlines:
    timeout: float
    max_session_time: float
    min_data_rate: float
    started: float  # the session's start
    command_since: float = 0.0  # the current command's first byte, or our last reply
    in_command: bool = False  # part of a command line is in
    content_since: float | None = None  # the current content's start

    def __post_init__(self) -> None:
        self.command_since = self.started

    def restart(self, now: float, *, content: bool, mid_command: bool, progressed: bool) -> None:
        """After a read (or an answer of ours, `progressed`): start the clock of a stage that
        has just begun, and only then, so bytes that trickle in never move a deadline.
        `content`: the session is reading message content; `mid_command`: part of a command
        line is in."""
        if content:
            if self.content_since is None:
                self.content_since = now
            return
        self.content_since = None
        if progressed or not self.in_command:
            self.command_since = now
        self.in_command = mid_command

    def next_due(self, content_octets: int) -> float:
        """When the first deadline is due (`content_octets`: the content's octets so far)."""
        if self.content_since is not None:
            stage = self.content_since + self.timeout + content_octets / self.min_data_rate
        else:
            stage = self.command_since + self.timeout
        return min(stage, self.started + self.max_session_time)

    def next_check(self, now: float, content_octets: int) -> float:
        """Seconds until the connection's timer should look again: at the first deadline,
        but never more than --timeout ahead (nor sooner than 50 ms: a deadline due now is not
        worth a busy loop). A stage's end may bring its deadline nearer (content that came
        fast has earned a far one; the next command is due --timeout after its end), and the
        cap keeps the timer from sleeping past the new one: that is --timeout after a moment
        later than this check."""
        return min(max(self.next_due(content_octets) - now, 0.05), self.timeout)

    def expired(self, now: float, content_octets: int) -> Expired | None:
        """The deadline that has passed at `now`, if any (the session's own first)."""
        if now < self.next_due(content_octets):
            return None
        if now >= self.started + self.max_session_time:
            return Expired.SESSION
        if self.content_since is not None:
            return Expired.CONTENT
        return Expired.COMMAND if self.in_command else Expired.NO_COMMAND

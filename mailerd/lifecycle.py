"""What the master and its children agree on about their lives: the exit status that means
"cannot start at all", how long each side waits for the other, and the signals a fresh child
starts with. (What a child tells the master of itself: `ipc.reports`.)

Imported by the master and by every child, so that neither reaches into the other's package for
a constant.
"""

from __future__ import annotations

import signal

from mailerd import log as logsetup

BOOT_ERROR = 3  # exit status of a child that cannot work at all: the master stops, not respawns
# A worker waits this long for a commit's answer: well below the client's 10 min wait for the
# reply to the final dot (RFC 5321 4.5.3.2), where a late 250 would make a duplicate.
COMMIT_TIMEOUT = 120.0
SHUTDOWN_GRACE = 10.0  # a worker's idle sessions get 421 at once, busy ones within this
DRAIN_TIMEOUT = 60.0  # the delivery process finishes the commits in flight within this
# How long the master waits for each kind of child to stop before it kills it.
STOP_WORKERS_TIMEOUT = SHUTDOWN_GRACE + COMMIT_TIMEOUT / 4
STOP_DELIVERY_TIMEOUT = DRAIN_TIMEOUT + 5
# A mailbox writer finishes what it was handed after its delivery process has gone: a batch may
# wait a minute for a mailbox's lock (an IMAP server holding it), then its fsyncs.
STOP_WRITER_TIMEOUT = 75.0

_retire_requested = False
_stop_requested = False


def request_retire(*_: object) -> None:
    """SIGUSR2 in a worker before its event loop runs: remembered, acted on once it does."""
    global _retire_requested
    _retire_requested = True


def retire_requested() -> bool:
    return _retire_requested


def request_stop(*_: object) -> None:
    """SIGTERM in a child before its event loop runs: remembered, acted on once it does. The
    master may retire a delivery process it has just started (a reload right after another,
    a stop right after a reload); the default action would kill it mid-start instead of
    letting it stop as it should (a delivery process drains its commits first)."""
    global _stop_requested
    _stop_requested = True


def stop_requested() -> bool:
    return _stop_requested


def child_signals() -> None:
    """In a freshly forked child (signals still blocked): none of the master's handlers.
    SIGTERM and SIGUSR2 are remembered until the child's loop has handlers of its own (a
    mailbox writer ignores SIGTERM: it stops when its channel closes)."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal hang-up is the master's
    signal.signal(signal.SIGUSR1, logsetup.request_reopen)
    signal.signal(signal.SIGUSR2, request_retire)

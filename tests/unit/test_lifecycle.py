"""lifecycle.child_signals: a signal the master sends a child before that child has its own
handlers is remembered, not acted on by its default action (which kills)."""

from __future__ import annotations

import os
import signal

from mailerd import lifecycle


def _child_after(sig: int) -> int:
    """Fork as the master does (signals blocked across fork()), set the child's signals, let
    `sig` arrive before any loop runs; the child's exit code: what it remembered (1 bit each:
    stop, retire), or its death by the signal as a negative number."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    pid = os.fork()
    if pid == 0:
        code = 100
        try:
            lifecycle.child_signals()
            os.kill(os.getpid(), sig)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # delivered here
            code = int(lifecycle.stop_requested()) | int(lifecycle.retire_requested()) << 1
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_sigterm_before_the_child_is_ready_is_remembered_not_fatal():
    # A new delivery process retired (or stopped) by the master before its loop runs must
    # still drain and exit by itself, not die of SIGTERM's default action.
    assert _child_after(signal.SIGTERM) == 1


def test_a_sigusr2_before_the_child_is_ready_is_remembered():
    assert _child_after(signal.SIGUSR2) == 2

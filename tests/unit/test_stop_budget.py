"""The time the shipped service files give a stop against the time mailerd's master may take:
its children stopped one kind after another, each kind within its own timeout."""

from __future__ import annotations

import re
from pathlib import Path

from mailerd import lifecycle

ETC = Path(__file__).resolve().parents[2] / "etc"
# The master's worst case: the workers, then the delivery process, then the mailbox writer.
WORST = (
    lifecycle.STOP_WORKERS_TIMEOUT + lifecycle.STOP_DELIVERY_TIMEOUT + lifecycle.STOP_WRITER_TIMEOUT
)


def test_systemd_and_the_init_script_wait_longer_than_the_master_may_take():
    """A reviewer's finding: the unit said 105 s and waited 120, the init script 120, while
    the master may take 180 (a writer waiting on a mailbox lock, then its fsyncs, is the
    last): what it had been handed was killed mid-write."""
    unit = (ETC / "mailerd.service").read_text()
    [stop] = re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.M)
    assert int(stop) > WORST, (stop, WORST)
    assert f"about {WORST:.0f} s" in unit
    init = (ETC / "init.d" / "mailerd").read_text()
    [retry] = re.findall(r"--retry=TERM/(\d+)/KILL/\d+", init)
    assert int(retry) > WORST, (retry, WORST)

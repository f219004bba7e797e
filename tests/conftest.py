"""Suite-wide settings for every test directory."""

from __future__ import annotations

import os
import signal

# No mailerd started by a test may ask the machine's resolver about the suite's made-up
# domains: with this set, mailerd refuses a resolver without --dns-server (mailerd/mx.py). A
# test gives it its own DNS server, or runs it in a network namespace with its own resolv.conf
# (tests/netns removes the variable for the processes it starts there).
os.environ["MAILERD_FORBID_SYSTEM_RESOLVER"] = "1"

# A suite started in the background (`scripts/test &`, nohup, a CI runner's shell) inherits
# SIGINT, SIGQUIT or SIGHUP ignored, and so would every process a test starts, through exec:
# Ctrl-C at `mailerd passwd`'s prompt or the certbot hook's SIGHUP would then do nothing. The
# tests start what they start with the dispositions a user's terminal gives.
for _sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, signal.default_int_handler if _sig == signal.SIGINT else signal.SIG_DFL)

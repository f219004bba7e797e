"""Suite-wide settings for every test directory."""

from __future__ import annotations

import os

# No mailerd started by a test may ask the machine's resolver about the suite's made-up
# domains: with this set, mailerd refuses a resolver without --dns-server (mailerd/mx.py). A
# test gives it its own DNS server, or runs it in a network namespace with its own resolv.conf
# (tests/netns removes the variable for the processes it starts there).
os.environ["MAILERD_FORBID_SYSTEM_RESOLVER"] = "1"

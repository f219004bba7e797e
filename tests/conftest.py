"""Suite-wide settings for every test directory."""

from __future__ import annotations

import os
import resource
import signal

import hypothesis

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

# A stock Debian 12 session (systemd's DefaultLimitNOFILE=1024:524288, which a login, sshd and
# a CI runner's service inherit) may open 1,024 files; test_capacity's slowloris test alone
# holds 1,150 sockets. Raise the soft limit towards the hard one, as scripts/bench does (and
# mailerd itself, mailerd/master/startup.py); xdist's workers import this file too.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_want = 65536 if _hard == resource.RLIM_INFINITY else min(_hard, 65536)
if _soft != resource.RLIM_INFINITY and _soft < _want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_want, _hard))

# Hypothesis fails an example that takes over 200 ms (DeadlineExceeded, or Flaky when its
# replay is quicker). Beside the namespace tests on a CI runner's two loaded cores, an example
# can wait that long for the CPU alone: a failure the code did not cause. What must be quick
# is timed by tests of its own; the property tests check what comes out.
hypothesis.settings.register_profile("suite", deadline=None)
hypothesis.settings.load_profile("suite")

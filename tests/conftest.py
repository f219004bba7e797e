"""Suite-wide settings for every test directory."""

from __future__ import annotations

import os

# No mailerd started by a test may ask the machine's resolver about the suite's made-up
# domains: with this set, mailerd refuses a resolver without --dns-server (mailerd/mx.py). A
# test gives it its own DNS server, or runs it in a network namespace with its own resolv.conf
# (tests/netns removes the variable for the processes it starts there).
os.environ["MAILERD_FORBID_SYSTEM_RESOLVER"] = "1"


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist (`scripts/test` runs a process per CPU, `--dist loadgroup`), the
    tests that use machine-wide things run in one process, one after another: the network
    namespaces (one lock and one address plan for all: tests/netns/conftest.py) and the
    package test (dpkg installs mailerd on the machine itself)."""
    import pytest

    for item in items:
        if item.nodeid.startswith(("tests/netns/", "tests/package/")):
            item.add_marker(pytest.mark.xdist_group("machine"))

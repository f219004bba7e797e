"""Logging set-up: one line per event to stderr in the foreground (syslog comes later)."""

from __future__ import annotations

import logging
import sys


def setup(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s mailerd[%(process)d]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)

"""What the commands share about the running daemon: the config file they read (as the daemon
does, without validating what they do not use), and how they ask the daemon to reload."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from mailerd import config


def read_config(path: str | None) -> dict[str, object]:
    """The config file's values: `path` (-C/-c), else the daemon's when this user may read
    it, else none. Raises config.ConfigError."""
    if path is None and os.access(config.DEFAULT_CONFIG, os.R_OK):
        path = config.DEFAULT_CONFIG
    return config.read_ini(path) if path else {}


def reload(raw: dict[str, object], what: str, say: Callable[[str], None]) -> int:
    """Have the running mailerd (its pid file's) reload `what`: SIGHUP. The exit status."""
    pidfile = str(raw.get("pidfile") or config.DEFAULT_PIDFILE)
    pid = running_master(pidfile)
    if pid is None:
        say(f"mailerd is not running: it reads {what} when it starts")
        return 0
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        say(f"cannot tell mailerd (pid {pid}) to reload: run this as root")
        return os.EX_NOPERM
    except ProcessLookupError:
        return 0
    say(f"mailerd (pid {pid}) reloads {what} now")
    return 0


def running_master(pidfile: str) -> int | None:
    """The pid in `pidfile` if that process is a mailerd master."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"mailerd" in title else None

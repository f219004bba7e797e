"""What the commands share about the running daemon: the config file they read (as the daemon
does, without validating what they do not use), and how they ask the daemon to reload."""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mailerd import config
from mailerd.master.daemon import reload_file


def read_config(path: str | None) -> dict[str, object]:
    """The config file's values: `path` (-C/-c), else the daemon's when this user may read
    it, else none. Raises config.ConfigError."""
    if path is None and os.access(config.DEFAULT_CONFIG, os.R_OK):
        path = config.DEFAULT_CONFIG
    return config.read_ini(path) if path else {}


NOT_RUNNING = 7  # LSB's exit status of `reload` when the program is not running


def reload_main(argv: list[str]) -> int:
    """`mailerd reload [-c FILE] [-P PIDFILE]`: have the running mailerd reload, and say how it
    went in the exit status: 0 done, 1 not done or not all of it (a certificate that did not
    load), NOT_RUNNING. For the init script and systemd's ExecReload, which sent SIGHUP and
    said "reloaded" whatever the master then logged (a reviewer's finding). Options it does
    not know are left alone: those scripts pass it the daemon's own (DAEMON_OPTS)."""
    parser = argparse.ArgumentParser(
        prog="mailerd reload", description="Reload the running mailerd, and say how it went."
    )
    parser.add_argument("-c", "--config", help="config file (for its pidfile setting)")
    parser.add_argument("-P", "--pidfile", help=f"the daemon's pid file ({config.DEFAULT_PIDFILE})")
    args, _ = parser.parse_known_args(argv)

    def say(text: str) -> None:
        print(f"mailerd reload: {text}", file=sys.stderr)

    try:
        raw = read_config(args.config)
    except config.ConfigError as exc:
        say(str(exc))
        return os.EX_CONFIG
    if args.pidfile:
        raw = {**raw, "pidfile": args.pidfile}
    return reload(raw, "its configuration", say, whole=True)


def reload(
    raw: dict[str, object], what: str, say: Callable[[str], None], *, whole: bool = False
) -> int:
    """Have the running mailerd (its pid file's) reload `what`, and wait until it has: its
    new workers accept and the old ones no longer do (the master says so in the pid file), so
    that a session opened once this returns sees the change. The exit status; with `whole`
    (`mailerd reload`), NOT_RUNNING when none runs, and 1 for a reload not known to be done
    or that kept the certificates in use (they did not load)."""
    pidfile = str(raw.get("pidfile") or config.DEFAULT_PIDFILE)
    pid = running_master(pidfile)
    if pid is None:  # (a mailerd started without a pid file, -f without -P, is not found)
        say(
            f"no mailerd runs with the pid file {pidfile}: mailerd reads {what} when it starts "
            "(one running without that pid file, at its next SIGHUP)"
        )
        return NOT_RUNNING if whole else 0
    before, _, _ = reload_state(pidfile)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        say(f"cannot tell mailerd (pid {pid}) to reload: run this as root")
        return os.EX_NOPERM
    except ProcessLookupError:
        return NOT_RUNNING if whole else 0
    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        count, outcome, notes = reload_state(pidfile)
        if count is not None and count != before:
            why = f" ({notes})" if notes else " (see its log)"
            if outcome == "ok":  # (notes: what takes a restart; the rest is applied)
                but = f"; but {notes}" if notes else ""
                say(f"mailerd (pid {pid}) reloads {what}: done{but}")
                return 0
            if outcome == "partial":  # (config.reload_files)
                say(
                    f"mailerd (pid {pid}) reloads {what}: done; but its certificates did not "
                    f"load{why}: it keeps those in use"
                )
                return 1 if whole else 0
            say(f"mailerd (pid {pid}) could not reload{why}; it runs as it did")
            return 1
        time.sleep(0.05)
    say(f"mailerd (pid {pid}) reloads {what} now (not done after {RELOAD_WAIT:g} s)")
    return 1 if whole else 0  # (`mailerd reload` cannot say it went well: a second pass)


RELOAD_WAIT = 20.0  # seconds to wait for the reload to be done (the master settles in 15)


def reload_state(pidfile: str) -> tuple[int | None, str, str]:
    """From the master's reload file: how many reloads it finished, the last one's outcome
    ("ok", "partial" or "failed") and its notes (why; what takes a restart: `record_reload`);
    (None, "", "") before the first."""
    try:
        parts = reload_file(Path(pidfile)).read_text("utf-8", "replace").split(maxsplit=2)
    except OSError:
        return None, "", ""
    if len(parts) < 2 or not parts[0].isdigit():
        return None, "", ""
    return int(parts[0]), parts[1], parts[2].strip() if len(parts) > 2 else ""


def running_master(pidfile: str) -> int | None:
    """The pid in `pidfile` if that process is a mailerd master: one holds the file's lock
    (flock) for its whole life, so a file nobody holds is stale (a crash, a power cut), its
    pid maybe another process's by now, never to be signalled (a second attacker's pass: an
    editor with a mailerd file open had "mailerd" in its command line, and was sent SIGHUP)."""
    try:
        with open(pidfile) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # (held: a master runs)
            else:
                return None
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"mailerd" in title else None

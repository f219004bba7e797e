"""`newaliases` (also `sendmail -bi`): check the aliases file as the daemon reads it, say what
it holds and what is wrong with it, and have a running mailerd reload it."""

from __future__ import annotations

import os
import signal
import sys

from mailerd import config, host
from mailerd.aliases import AliasError, Aliases


def main(argv: list[str]) -> int:
    """`newaliases [-C FILE]` (and `sendmail -bi`): read the aliases file as the daemon will,
    say what it holds and what is wrong with it, and have a running daemon reload it (SIGHUP
    through its pid file; mailerd keeps no database, so there is nothing to rebuild)."""

    def say(text: str) -> None:
        print(f"newaliases: {text}", file=sys.stderr)

    path = argv[argv.index("-C") + 1] if "-C" in argv[:-1] else None
    try:
        if path is None and os.access(config.DEFAULT_CONFIG, os.R_OK):
            path = config.DEFAULT_CONFIG
        raw = config.read_ini(path) if path else {}
        domains = tuple(config.parse_domains(raw.get("domain") or [])) or tuple(host.identity()[0])
    except config.ConfigError as exc:
        say(str(exc))
        return os.EX_CONFIG
    file = str(raw.get("aliases") or config.DEFAULT_ALIASES)
    try:
        table = Aliases.load(file, domains)
    except AliasError as exc:
        say(str(exc))
        return os.EX_OSFILE
    for problem in table.problems:
        say(f"{file}: {problem}")
    if not os.path.exists(file):
        say(f"{file}: no such file; no aliases")
    else:
        say(f"{file}: {len(table)} aliases, {len(table.problems)} problem(s)")
    pidfile = str(raw.get("pidfile") or config.DEFAULT_PIDFILE)
    pid = _running_mailerd(pidfile)
    if pid is None:
        say("mailerd is not running: it reads the file when it starts")
        return 0
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        say(f"cannot tell mailerd (pid {pid}) to reload: run newaliases as root")
        return os.EX_NOPERM
    except ProcessLookupError:
        return 0
    say(f"mailerd (pid {pid}) reloads it now")
    return 0


def _running_mailerd(pidfile: str) -> int | None:
    """The pid in `pidfile` if that process is a mailerd master."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read()
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"mailerd" in title else None

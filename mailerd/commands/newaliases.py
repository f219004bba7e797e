"""`newaliases` (also `sendmail -bi`): check the aliases file as the daemon reads it, say what
it holds and what is wrong with it, and have a running mailerd reload it."""

from __future__ import annotations

import os
import sys

from mailerd import config
from mailerd.aliases import AliasError, Aliases
from mailerd.commands import daemon
from mailerd.names import Locality


def main(argv: list[str]) -> int:
    """`newaliases [-C FILE]` (and `sendmail -bi`): read the aliases file as the daemon will,
    say what it holds and what is wrong with it, and have a running daemon reload it (SIGHUP
    through its pid file; mailerd keeps no database, so there is nothing to rebuild)."""

    def say(text: str) -> None:
        print(f"newaliases: {text}", file=sys.stderr)

    if argv[:1] in (["--help"], ["-h"]):  # (a person tries it first: it must not signal)
        print(
            "usage: newaliases [-C FILE]: check the aliases file as mailerd reads it, say what "
            "it holds and what is wrong with it, and have a running mailerd reload it"
        )
        return 0
    path = argv[argv.index("-C") + 1] if "-C" in argv[:-1] else None
    try:
        raw = daemon.read_config(path)
        domains = config.local_domains(raw)  # (the daemon's: localhost among them)
    except config.ConfigError as exc:
        say(str(exc))
        return os.EX_CONFIG
    file = str(raw.get("aliases") or config.DEFAULT_ALIASES)
    try:
        table = Aliases.load(file, Locality(domains))
    except AliasError as exc:
        say(str(exc))
        return os.EX_OSFILE
    for problem in table.problems:
        say(f"{file}: {problem}")
    if table.missing:
        say(f"{file}: no such file; no aliases")
    else:
        say(f"{file}: {len(table)} aliases, {len(table.problems)} problem(s)")
    return daemon.reload(raw, "the aliases file", say)

"""Command-line entry point: `mailerd [options]` runs the server (see `config` for options)."""

from __future__ import annotations

import sys

from mailerd import config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config.load(argv)
    except config.ConfigError as exc:
        print(f"mailerd: error: {exc}", file=sys.stderr)
        return 2
    from mailerd import master

    return master.run(cfg)

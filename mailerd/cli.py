"""Command-line entry point: `mailerd [options]` runs the server (see `config` for options);
`mailerd queue …` inspects and manages the outbound queue (see `queuectl`).

Exit status: 0 after a clean stop (or, without -f, once the daemon is up and accepting);
2 for a bad option or config value; 1 when start-up fails (a port in use, a directory that
cannot be created, an unknown -u user, a pid file held by a running mailerd), with the reason
on stderr.
"""

from __future__ import annotations

import sys

from mailerd import config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["queue"]:
        from mailerd import queuectl

        return queuectl.main(argv[1:])
    try:
        cfg = config.load(argv)
    except config.ConfigError as exc:
        print(f"mailerd: error: {exc}", file=sys.stderr)
        return 2
    from mailerd import master

    return master.run(cfg, argv)


def queue_main() -> int:
    """The `mailerd-queue` console script: the same as `mailerd queue`."""
    from mailerd import queuectl

    return queuectl.main(sys.argv[1:])

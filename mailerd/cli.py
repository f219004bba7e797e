"""Command-line entry point: `mailerd [options]` runs the server (see `config` for options);
`mailerd queue …` inspects and manages the outbound queue (see `commands.queue`); `mailerd
sendmail …` is the machine's mail command (see `commands.sendmail`); `mailerd passwd USER` sets
a password for authenticated submission (see `commands.passwd`); `mailerd dkim keygen` makes a
DKIM key (`commands.dkimkeys`); `mailerd dns` prints and checks the DNS records to publish
(`commands.dnsrecords`); `mailerd reload` has the running daemon reload, and says how it went
(`commands.daemon`); `mailerd mailq` and `mailerd newaliases` are those programs.

Run under another name (a symlink to the `mailerd` script), it is that program: `sendmail`
(what /usr/sbin/sendmail is), `mailq` (`sendmail -bp`, the queue listing) and `newaliases`.
Those names never load the server's modules: `sendmail` must start fast for every cron mail.

Exit status: 0 after a clean stop (or, without -f, once the daemon is up and accepting);
2 for a bad option or config value; 1 when start-up fails (a port in use, a directory that
cannot be created, an unknown -u user, a pid file held by a running mailerd), with the reason
on stderr. `sendmail`'s are those of sysexits.h (see `sendmail`).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from mailerd import config

# What a shell reports for a program a closed pipe ended (SIGPIPE), as `dig | head` ends.
PIPE_CLOSED = 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        program, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
    else:
        program = "mailerd"
    if program == "sendmail" or argv[:1] == ["sendmail"]:
        from mailerd.commands import sendmail

        return sendmail.main(argv if program == "sendmail" else argv[1:])
    if program not in ("mailq", "newaliases") and argv[:1] in (["mailq"], ["newaliases"]):
        program, argv = argv[0], argv[1:]  # (as their links: a checkout has none)
    if program == "mailq":
        from mailerd.commands import sendmail

        if argv[:1] in (["--help"], ["-h"]):
            print("usage: mailq [-C FILE]: the queue, as `mailerd queue` lists it")
            return 0
        return _printing(sendmail.main, ["-bp", *argv])
    if program == "newaliases":
        from mailerd.commands import newaliases

        return newaliases.main(argv)
    if argv[:1] == ["queue"]:
        from mailerd.commands import queue

        return _printing(queue.main, argv[1:])
    if argv[:1] == ["passwd"]:
        from mailerd.commands import passwd

        return passwd.main(argv[1:])
    if argv[:1] == ["dkim"]:
        from mailerd.commands import dkimkeys

        return _printing(dkimkeys.main, argv[1:])
    if argv[:1] == ["reload"]:
        from mailerd.commands import daemon

        return daemon.reload_main(argv[1:])
    if argv[:1] == ["dns"]:
        from mailerd.commands import dnsrecords

        return _printing(dnsrecords.main, argv[1:])
    try:
        cfg = config.load(argv)
    except config.ConfigError as exc:
        from mailerd import log

        log.complain(f"error: {exc}")
        return 2
    from mailerd.master import startup

    return startup.run(cfg, argv)


def _printing(command: Callable[[list[str]], int], args: list[str]) -> int:
    """Run a command that prints for a reader who may stop early (`mailerd dns | head`): it
    then ends quietly, as other Unix tools do, not with a BrokenPipeError traceback (an
    acceptance tester's finding)."""
    try:
        status = command(args)
        sys.stdout.flush()  # (here, while the error can still be caught)
        return status
    except BrokenPipeError:
        # Python would try the flush once more at exit and report that one: nothing is left
        # to say, so stdout goes nowhere (the `signal` module documentation's recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return PIPE_CLOSED


def queue_main() -> int:
    """The `mailerd-queue` console script: the same as `mailerd queue`."""
    from mailerd.commands import queue

    return _printing(queue.main, sys.argv[1:])

"""`mailerd passwd [-c FILE] [--passwd FILE] [--delete] USER`: set (or delete) the password USER
authenticates with on the submission listeners.

The password is read twice from the terminal, or once (one line) from standard input when that
is not a terminal, hashed with argon2id and written to the passwd file (`--passwd`, else the
config's `passwd`, else /etc/mailerd/passwd: root's, group mail, mode 0640, replaced
atomically); then a running mailerd reloads it. USER is a local user name (the mailbox's); it
logs in as USER or as USER@ any local domain.

Exit status: 0 done; 1 no such user to delete, or the passwords differ, or the running
mailerd could not reload (the file is written); 2 a bad argument; 78 (EX_CONFIG) an
unreadable config or passwd file; 73 (EX_CANTCREAT) the file cannot be written; 77
(EX_NOPERM) the running mailerd cannot be signalled (the file is written).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mailerd import config, credentials
from mailerd.commands import daemon
from mailerd.names import mailbox_name
from mailerd.spool import Spool


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mailerd passwd",
        description="Set (or delete) the password USER authenticates with.",
    )
    parser.add_argument("-c", "--config", help="config file (for its passwd setting)")
    parser.add_argument("--passwd", help=f"the passwd file (default {credentials.DEFAULT_PASSWD})")
    parser.add_argument("--delete", action="store_true", help="delete USER's password")
    parser.add_argument("user", metavar="USER")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(f"mailerd passwd: {text}", file=sys.stderr)

    local, at, _ = args.user.rpartition("@")
    if at:
        parser.error(
            f"{args.user!r} is an address: give the user name ({local!r}), which logs in as "
            "itself or as itself@ any local domain"
        )
    user = mailbox_name(args.user)
    if user is None or user != args.user.lower() or not _fits_the_file(user):
        parser.error(f"not a local user name: {args.user!r}")
    try:
        raw = daemon.read_config(args.config)
    except config.ConfigError as exc:
        say(str(exc))
        return os.EX_CONFIG
    path = args.passwd or str(raw.get("passwd") or credentials.DEFAULT_PASSWD)
    try:
        credentials.Credentials.load(path)  # (a file that cannot be read: said before asking)
    except credentials.CredentialsError as exc:
        say(str(exc))
        return os.EX_CONFIG
    hashed = None
    if not args.delete:
        # Asked (and hashed) before the file is read: whatever another `mailerd passwd` writes
        # while this one waits at its prompt is kept, not overwritten with what was read first.
        password = _read_password()
        if password is None:
            say("the passwords differ, or none was given; nothing changed")
            return 1
        hashed = credentials.hash_password(password)
    try:
        # One read-modify-write at a time: two runs at once (a script setting several users'
        # passwords in parallel, a --delete beside a set) must not each write the file as it
        # was before the other, losing one's change or bringing back a deleted password.
        with credentials.locked(path):
            try:
                known = dict(credentials.Credentials.load(path).hashes)
            except credentials.CredentialsError as exc:
                say(str(exc))
                return os.EX_CONFIG
            if hashed is None:
                if known.pop(user, None) is None:
                    say(f"{user} has no password in {path}")
                    return 1
            else:
                known[user] = hashed
            credentials.write(path, known)
    except OSError as exc:
        say(f"cannot write {path}: {exc.strerror or exc}")
        return os.EX_CANTCREAT
    say(f"{'deleted' if args.delete else 'set'} the password of {user} in {path}")
    if not args.delete:
        _warn_if_no_mailbox(user, raw, say)
    return daemon.reload(raw, path, say)


# What Spool.state's answers other than "ok" mean for a user who is to log in.
_NO_MAILBOX = {
    "unknown": "has no mailbox under {spool} and is no system account",
    "not-a-directory": "has a file, not a mailbox directory, at {spool}/{user}",
    "wrong-owner": "has a mailbox at {spool}/{user} that mailerd will not write to (its owner)",
    "daemon-user": "is mailerd's own user, which never has a mailbox",
}


def _warn_if_no_mailbox(user: str, raw: dict[str, object], say: Callable[[str], None]) -> None:
    """A password for a name mail cannot reach is most often a typo (`alcie`): say so. It is
    set all the same, for a mailbox made afterwards."""
    spool = Path(str(raw.get("spool") or config.DEFAULT_SPOOL))
    state = Spool(spool).state(user)
    if state != "ok":
        why = _NO_MAILBOX.get(state, state).format(spool=spool, user=user)
        say(
            f"warning: {user} {why}: mail to {user} at the local domains is refused (550 "
            "5.1.1), and a typo in the name would go unnoticed; the password is set all the same"
        )


def _fits_the_file(user: str) -> bool:
    """A name the passwd file can hold (`user:hash` lines, `#` comments) and a login can name:
    no colon, no white space, no leading `#`."""
    return ":" not in user and not user.startswith("#") and not any(c.isspace() for c in user)


def _read_password() -> str | None:
    """Twice from the terminal, or one line from standard input; None if they differ, the
    password is empty, or the user gave up at the prompt (Ctrl-D, Ctrl-C)."""
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("New password: ")
            second = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)  # (the prompt's line is left open)
            return None
        return first if first and first == second else None
    line = sys.stdin.readline().rstrip("\r\n")
    return line or None

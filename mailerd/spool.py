"""The spool as everyone may see it: `<spool>/<user>/` mailboxes, whether one can take mail
now, and the files that stand where a mailbox should be. Read-only; used by the workers (the RCPT
check), the delivery process and the pickup. Writing is the mailbox writer's (`writer.mailbox`),
which keeps the layout's contract (docs there).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import time
import weakref
from pathlib import Path

from mailerd import names

LOCK_NAME = ".lock"
COUNTER_NAME = ".counter"


class MailboxLocked(Exception):
    """The mailbox lock was held by someone else (an IMAP server) for longer than the deadline:
    raised by the writer, and by its clients when the writer answers so."""

    def __init__(self, text: str = "mailbox locked") -> None:
        super().__init__(text)  # (said in the log line of a deferred copy)


def shown_path(root: Path) -> str:
    """The directory's own path, also when it is reached through /proc/self/fd/N (as the
    delivery process reaches the spool and the queue after dropping privileges:
    privileges.keep_dir), for the log: an administrator cannot find /proc/self/fd/3/alice."""
    if os.path.dirname(root) == "/proc/self/fd":
        try:
            return os.readlink(root)
        except OSError:
            pass
    return str(root)


class LookupNeeded(Exception):
    """The answer needs the user database (an account not in the cache), and the caller asked
    for none: a cold NSS lookup may take long (LDAP, sssd), so the worker makes it in a thread."""


class Spool:
    """The spool root, for lookups. A root given as /proc/self/fd/N (privileges.keep_dir) keeps
    working after the privilege drop."""

    def __init__(self, root: Path, untrusted_uid: int | None = None) -> None:
        """`untrusted_uid`: mailerd's own unprivileged user, which never owns a mailbox."""
        self.root = root
        self.shown = shown_path(root)  # what the log calls it
        self.untrusted_uid = untrusted_uid
        self._prefix = os.path.join(root, "")  # state() runs for every recipient: no pathlib
        self._root_path_fd: int | None = None  # see _lookup_dir()

    def exists(self, name: str) -> bool:
        """Deliverable: its mailbox exists, it is a system account, or it is postmaster."""
        return self.state(name) == "ok"

    def state(self, name: str, *, cached_only: bool = False) -> str:
        """Whether mail for `name` can be stored, by the rules the mailbox writer applies
        (`writer.mailbox`), so that the answer comes at RCPT and not days later in a bounce:

        - "ok": a mailbox directory with a fit owner, an account (its mailbox is made on first
          delivery), or postmaster;
        - "unknown": neither mailbox nor account;
        - "not-a-directory": a file (a Debian mbox) where the mailbox would be;
        - "wrong-owner": a symlink, or a directory that belongs neither to its account nor to
          root, or that belongs to mailerd's own user;
        - "daemon-user": the account is mailerd's own user, which never owns a mailbox.

        With `cached_only`, LookupNeeded instead of asking the user database (the owner rules
        need the account)."""
        try:
            root = self._lookup_dir()
            st = (
                os.stat(name, dir_fd=root, follow_symlinks=False)
                if root is not None
                else os.lstat(self._prefix + name)
            )
        except FileNotFoundError:
            st = None
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP):
                return "unknown"  # no mailbox can have such a name
            raise
        if st is not None and stat.S_ISLNK(st.st_mode):
            return "wrong-owner"
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return "not-a-directory"
        if st is not None and st.st_uid in (0, self.untrusted_uid) and name != "postmaster":
            # (the common cases decided without the user database: root's, or ours)
            return "ok" if st.st_uid == 0 else "wrong-owner"
        account = account_owner(name, cached_only=cached_only)
        if st is None:
            if account is not None and account[0] == self.untrusted_uid:
                return "daemon-user"
            return "ok" if account is not None or name == "postmaster" else "unknown"
        if st.st_uid == self.untrusted_uid:
            return "wrong-owner"
        if account is not None and st.st_uid not in (account[0], 0):
            return "wrong-owner"
        return "ok"

    def _lookup_dir(self) -> int | None:
        """An O_PATH descriptor of the root for state()'s lookups, opened once per process:
        the root is often /proc/self/fd/N (privileges.keep_dir), which costs a walk through
        /proc on every lookup, once per recipient; None (use the path) if it cannot be
        opened. A forked child inherits it with the Spool, and it names the same directory."""
        if self._root_path_fd is None:
            try:
                self._root_path_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                return None
            weakref.finalize(self, os.close, self._root_path_fd)
        return self._root_path_fd

    def files_in_the_way(self) -> list[str]:
        """Names of the spool's plain files that stand where a mailbox directory would (a
        Debian mbox file, /var/spool/mail/<user>): mail for them cannot be delivered."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        return sorted(
            e.name
            for e in entries
            if e.is_file(follow_symlinks=False) and names.mailbox_name(e.name) == e.name
        )


_ACCOUNT_TTL = 60.0
_accounts: dict[str, tuple[float, tuple[int, int] | None]] = {}


def account_owner(name: str, *, cached_only: bool = False) -> tuple[int, int] | None:
    """The account's (uid, gid), or None; cached for a minute, because an NSS lookup can cost
    dozens of system calls (libnss_systemd's userdb probing) and runs for every batch. With
    `cached_only`, LookupNeeded rather than a lookup."""
    now = time.monotonic()
    cached = _accounts.get(name)
    if cached is not None and now - cached[0] < _ACCOUNT_TTL:
        return cached[1]
    if cached_only:
        raise LookupNeeded(name)
    try:
        entry = pwd.getpwnam(name)
        owner: tuple[int, int] | None = (entry.pw_uid, entry.pw_gid)
    except (KeyError, UnicodeEncodeError, ValueError):
        owner = None
    if len(_accounts) > 10000:  # names come from the network: keep the cache bounded
        _accounts.clear()
    _accounts[name] = (now, owner)
    return owner

"""Privileges: the master binds as root; every child that talks to the network runs as `-u`,
in no group but `nogroup` (`CHILDREN_GROUP`): not even its user's own.

Who calls what:
- `master.startup.run` calls `resolve()` once (the `-u` user, `mail` by default when started as
  root, nothing when not root) and `prepare_queue()` before forking, so the dropped children can
  use `<queue>/tmp` (body spill files) and `<queue>/private` (the delivery socket).
- Each worker calls `keep_dir()` for what it must reach after the drop, then `drop()` before its
  event loop starts: nothing accepts or parses SMTP as root.
- The delivery process calls `drop()` itself too, after opening the spool and the queue.

The master itself stays root: it re-binds port 25 on SIGHUP, creates new directories, and forks
the small mailbox writer that writes mailboxes owned by their users (it keeps root, and is
replaced by the master whenever it dies).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import logging
import os
import pwd
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from mailerd import preload
from mailerd.config import DEFAULT_USER, Config
from mailerd.delivery.queue import SUBDIRS as QUEUE_SUBDIRS
from mailerd.ipc.maildrop import MAILDROP

log = logging.getLogger("mailerd.privileges")

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

# The children's one group. Not their user's own: Debian's `mail` user's group may write
# /var/mail (root:mail 2775, no sticky bit) and read and write the mbox files there (user:mail
# 0660), so a worker running an attacker's code in it could rename or empty every user's
# mailbox. They need no group: everything of theirs is their user's (the queue, the log file),
# and the spool is opened before they drop (keep_dir) and only looked at.
CHILDREN_GROUP = "nogroup"
OVERFLOW_GID = 65534  # (the kernel's default overflowgid)


class PrivilegeError(Exception):
    """The user cannot be used, or the switch did not (fully) happen; the message says why."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int  # the children's group (CHILDREN_GROUP), not the user's own


def lookup(name: str) -> Account:
    """The account for `-u NAME`; refuses unknown users and anything with uid 0."""
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, UnicodeEncodeError, ValueError):
        raise PrivilegeError(
            f"user '{name}' does not exist: create it (adduser --system --group {name}) "
            "or name another one with -u"
        ) from None
    if entry.pw_uid == 0:
        raise PrivilegeError(
            f"-u {name}: refusing to run the workers as root; name an unprivileged user"
        )
    return Account(entry.pw_name, entry.pw_uid, _children_gid())


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _children_gid() -> int:
    """CHILDREN_GROUP's id; where the system has no group of that name, the kernel's overflow
    group (65534, what nogroup is on Debian: no file is that group's), never the user's own:
    the `mail` user's is the one that may write Debian's /var/mail and its mbox files."""
    try:
        return grp.getgrnam(CHILDREN_GROUP).gr_gid
    except KeyError:
        return OVERFLOW_GID


def exposed(path: Path, user: str | None) -> str | None:
    """Why a private key that root reads is within reach of others, in a warning's words
    (None: it is not, or it cannot be looked at, which loading it says). The unprivileged
    user is the one the Internet's input runs as: a key it owns, or its group may read, is as
    good as in every worker."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        account: Account | None = lookup(user or DEFAULT_USER)
    except PrivilegeError:
        account = None
    if account is not None and st.st_uid == account.uid:
        return f"is owned by {account.name}, whom the workers run as: chown root, chmod 600"
    if st.st_mode & 0o004:
        return "is readable by others: chmod 600 it"
    if st.st_mode & 0o022:
        return "may be written by others than its owner: chmod 600 it"
    if account is not None and st.st_mode & 0o040 and st.st_gid == account.gid:
        return f"is readable by group {_group_name(account.gid)}, the workers': chmod 600 it"
    return None


def resolve(user: str | None) -> str | None:
    """The user the children will run as, or None when there is nothing to drop (not root).

    Raises PrivilegeError if the user does not exist or is root.
    """
    if os.geteuid() != 0:
        if user is not None and _current_user() != user:
            log.warning("-u %s ignored: not started as root, so already unprivileged", user)
        return None
    return lookup(user or DEFAULT_USER).name


def drop(user: str | None) -> None:
    """Become `user` for good (groups, gid, uid), then check that root cannot come back.

    `None` means "nothing to drop" (what `resolve()` returns when not root). Raises
    PrivilegeError on any failure: the caller must then exit, not carry on privileged.
    """
    if user is None:
        return
    account = lookup(user)
    if os.geteuid() != 0:
        if os.geteuid() == account.uid:
            return
        raise PrivilegeError(f"cannot switch to user '{user}': not running as root")
    try:
        _become(account)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user '{user}': {exc.strerror}") from exc
    _no_new_privileges()
    verify(account)
    preload.guard()


def _become(account: Account) -> None:
    """The switch itself (root only): no supplementary group, the children's group, the uid."""
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)


def verify(account: Account) -> None:
    """Raise PrivilegeError unless every id is the account's and root is out of reach."""
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
        raise PrivilegeError(
            f"switch to '{account.name}' incomplete: uids {os.getresuid()}, gids {os.getresgid()}"
        )
    if os.getgroups() not in ([], [account.gid]):
        raise PrivilegeError(f"switch to '{account.name}' kept the groups {os.getgroups()}")
    for regain in (os.setuid, os.seteuid):
        try:
            regain(0)
        except PermissionError:
            continue
        raise PrivilegeError(f"still able to become root after switching to '{account.name}'")
    if account.gid != 0:
        try:
            os.setgid(0)
        except PermissionError:
            pass
        else:
            raise PrivilegeError(f"still able to take gid 0 after switching to '{account.name}'")
    capabilities = _capabilities()
    if any(capabilities.get(k, 0) for k in ("CapPrm", "CapEff")):
        raise PrivilegeError(f"capabilities left after switching to '{account.name}'")


def _no_new_privileges() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS): no setuid program can hand root back (best effort)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL): this process is killed when its parent dies (best
    effort; the caller checks that the parent was still there once it is set)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)  # the C library is already loaded: no search
        libc.prctl(option, value, 0, 0, 0)


def _capabilities() -> dict[str, int]:
    found = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                found[key] = int(value.strip(), 16)
    return found


def _current_user() -> str | None:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


_LOOK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC  # (a directory to look into later)


def keep_dir(path: Path) -> Path:
    """A path to `path` that keeps working after the drop, whatever its parents' modes.

    The directory is opened (O_PATH) while still privileged and then reached through
    /proc/self/fd/N, so a spool or queue below a private directory (a home, a 0700 temp dir)
    stays usable: only the directory's own permissions count from then on. Call it in the
    process that will use the path (descriptors are per process), before `drop()`.
    """
    fd = os.open(path, _LOOK_FLAGS)
    return Path(f"/proc/self/fd/{fd}")


def unreadable(
    user: str | None, paths: list[Path], directories: list[Path] | None = None
) -> list[tuple[Path, str]]:
    """Which of `paths` `user` cannot read, and which of `directories` it cannot look into,
    each with the reason: asked by a child process that becomes the user (in the children's
    group), as the children will. A directory is opened before the switch, as `keep_dir()`
    opens it for the children: only its own permissions count, not its parents' (one root
    cannot open is left out: making it says why). At start-up, before forking anything else
    (the answer decides whether mailerd can start at all), and at a reload."""
    directories = directories or []
    if user is None or not (paths or directories):
        return []
    account = lookup(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the probe: never returns
        code = 1
        try:
            os.close(read_end)
            held = []
            for directory in directories:
                with contextlib.suppress(OSError):
                    held.append((directory, os.open(directory, _LOOK_FLAGS)))
            _become(account)
            report = []
            for path in paths:
                try:
                    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
                except OSError as exc:
                    report.append(f"{path}\0{exc.strerror}")
            for directory, fd in held:
                try:  # (any name looked up in it needs its search permission: "." too)
                    os.stat(".", dir_fd=fd)
                except OSError as exc:
                    report.append(f"{directory}\0{exc.strerror}")
            os.write(write_end, "\n".join(report).encode("utf-8", "surrogateescape"))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return [(path, "cannot check (the probe process failed)") for path in paths + directories]
    found = []
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        name, _, reason = line.partition("\0")
        found.append((Path(name), reason))
    return found


def looked_into_by_children(cfg: Config) -> list[Path]:
    """Directories the children reach through descriptors opened before the drop and look
    into after it (`privileges.keep_dir`: the spool, the queue; `log.pin_directories`: the log
    file's, to reopen it after a rotation). Only their own permissions count, and the children
    are in no group but nogroup: a directory of root's group `mail` (0770, 0750) let them in
    while they ran in that group, and now shuts them out."""
    found = [cfg.spool, cfg.queue]
    if cfg.log_file is not None:
        found.append(cfg.log_file.parent)
    return found


def check_looked_into(cfg: Config, user: str | None) -> None:
    """Raise PrivilegeError when the children cannot look into the spool or the queue (every
    local recipient would be 451, every queued message too); warn when they cannot look into
    the log file's directory (after a rotation their lines would go on to the old file). At
    start-up (the start fails) and at each reload (the running configuration is kept)."""
    for path, reason in unreadable(user, [], looked_into_by_children(cfg)):
        said = f"the children run as {user} and cannot look into {path} ({reason})"
        fix = f"let others search it (chmod o+x {path}): the children are in no group of it"
        if cfg.log_file is not None and path == cfg.log_file.parent:
            log.warning("%s: they will not reopen %s after a rotation; %s", said, cfg.log_file, fix)
        else:
            raise PrivilegeError(f"{said}: {fix}")


def prepare_queue(queue: Path, user: str | None) -> None:
    """Hand the queue's directories (with their modes, queue.SUBDIRS) and the delivery socket
    and pickup FIFO to `user`.

    Called by the master (root) before forking. Files already in the queue (left by a run as
    root) are handed over too, but only regular files with a single link, through a descriptor
    opened without following symlinks, so a planted link cannot make root chown anything else.
    The maildrop's files are left alone: their owner is who submitted them.
    """
    if user is None:
        return
    account = lookup(user)
    for sub, mode in QUEUE_SUBDIRS.items():
        directory = queue / sub
        os.chown(directory, account.uid, account.gid, follow_symlinks=False)
        os.chmod(directory, mode, follow_symlinks=False)
        if sub == MAILDROP:
            continue
        for entry in os.scandir(directory):
            _hand_over(entry.path, account)


def _hand_over(path: str, account: Account) -> None:
    """Give the account one entry of a queue directory: a regular file, the pickup's FIFO or
    the delivery socket, with a single link. Looked at through an O_PATH descriptor (opening
    nothing, following no symlink) and chowned through it, so that what is judged is what is
    changed: a name the children's user swapped for another file between a look by path and
    a chown by path, or a hard link it made to a file of root's (where protected_hardlinks is
    off), is never handed to it (an attacker's pass)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        kind = stat.S_IFMT(st.st_mode)  # (a symlink is itself here: S_IFLNK, left alone)
        ours = kind in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK) and st.st_nlink == 1
        if not ours or st.st_uid == account.uid:
            return
        if kind == stat.S_IFREG and not _links_guarded():
            # One name is no proof where protected_hardlinks is off: the user links a file
            # of root's here and waits for root to replace the original by a rename (passwd
            # rewrites /etc/shadow so), and the planted name is then the old file's only one
            # (a reviewer's pass). Left as it is: root's start-up leaves no regular file the
            # children need (the scheduler's lock is 0644: flock takes a read-only descriptor).
            log.warning(
                "%s: not handed to %s (owned by uid %d, and fs.protected_hardlinks is off: "
                "it may be another file's last name); chown it by hand if it is mailerd's",
                path,
                account.name,
                st.st_uid,
            )
            return
        # (fchown refuses an O_PATH descriptor; its /proc name is that very file)
        os.chown(f"/proc/self/fd/{fd}", account.uid, account.gid)
    finally:
        os.close(fd)


def _links_guarded() -> bool:
    """Whether the kernel keeps users from linking files they could not write
    (fs.protected_hardlinks = 1, Debian's default); False when it cannot be told."""
    try:
        with open("/proc/sys/fs/protected_hardlinks", "rb") as f:
            return f.read().strip() not in (b"", b"0")
    except OSError:
        return False


def chown_path(path: Path, user: str | None, mode: int | None = None) -> None:
    """Give one file the user's ownership (e.g. a log file the children must reopen)."""
    if user is None or os.geteuid() != 0:
        return
    account = lookup(user)
    # Through a descriptor of the file itself, never a symlink (os.chmod cannot refuse one
    # on Linux: follow_symlinks=False raised NotImplementedError and the master died).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            # (in a directory the user may write, where protected_hardlinks is off, a hard
            # link to a file of root's: never handed over)
            raise OSError(
                errno.EPERM, f"{path}: not a regular file of one name; not given to {user}"
            )
        os.fchown(fd, account.uid, account.gid)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)

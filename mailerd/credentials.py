"""The passwords of authenticated submission: `/etc/mailerd/passwd` (`--passwd FILE`), one
`user:hash` line per user, the hash argon2id (argon2-cffi's PasswordHasher with RFC 9106's
second recommended parameters, 64 MiB and 3 passes, named here because Debian 12's argon2-cffi
has other defaults: a few tenths of a second of CPU per check by design, so that guessing costs
the guesser). A hash names its own parameters: a file written with others still works.

The master (root) reads the file before it forks and on every SIGHUP; a worker checks a
password against what it read, in a thread, never in its event loop. `mailerd passwd` changes
the file (`commands/passwd.py`); it is root's, group `mail`, mode 0640, replaced atomically.

A user is a local user name (a mailbox name); it may log in as `user` or as `user@` any local
domain. An unknown name is checked against one of the file's own hashes, of the parameters
most of them have, so timing tells no names as long as the hashes share their parameters.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import grp
import hmac
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailerd import durable
from mailerd.names import is_local_domain, mailbox_name

if TYPE_CHECKING:
    import argon2

DEFAULT_PASSWD = "/etc/mailerd/passwd"
GROUP = "mail"  # may read the file (root's, 0640)


class CredentialsError(Exception):
    """The file cannot be read or has a broken line; the message says which."""


def _hasher() -> argon2.PasswordHasher:
    import argon2  # (preloaded for the children; only the daemon and `mailerd passwd` need it)

    return argon2.PasswordHasher(
        time_cost=3, memory_cost=65536, parallelism=4, hash_len=32, salt_len=16
    )


@dataclass(frozen=True)
class Credentials:
    """user name → argon2id hash."""

    hashes: Mapping[str, str] = field(default_factory=dict)
    path: str | None = None

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def load(cls, path: str) -> Credentials:
        """Read `path`; a missing file is no users. Raises CredentialsError."""
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return cls(path=path)
        except OSError as exc:
            raise CredentialsError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise CredentialsError(f"cannot read {path}: not UTF-8 text") from exc
        hashes = {}
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or mailbox_name(user) != user or not hashed.startswith("$argon2"):
                raise CredentialsError(f"{path}, line {number}: not 'user:$argon2id$...'")
            hashes[user] = hashed
        return cls(hashes, path)

    def user_for(self, login: str, local_domains: tuple[str, ...]) -> str | None:
        """The user a login name means (`alice`, `Alice@example.org`), or None."""
        local, at, domain = login.rpartition("@")
        if at and not is_local_domain(domain, local_domains):
            return None
        return mailbox_name(local if at else login)

    def verify(self, login: str, password: str, local_domains: tuple[str, ...]) -> str | None:
        """The user, if the password is theirs; None otherwise. Slow on purpose: call it from
        a thread."""
        # (InvalidHash: Debian 12's argon2-cffi 21.1 has no InvalidHashError, its later name)
        from argon2.exceptions import InvalidHash, VerificationError

        user = self.user_for(login, local_domains)
        hashed = self.hashes.get(user or "")
        try:
            _hasher().verify(hashed or self.decoy, password)
        except (VerificationError, InvalidHash):
            return None
        return user if hashed else None

    @functools.cached_property
    def decoy(self) -> str:
        """The hash an unknown name is checked against: one of the file's, of the parameters
        most of them have, so that its check costs what a user's does (a file written with
        other parameters than ours would otherwise tell names by the time a check takes);
        for an empty file, one of our own."""
        if not self.hashes:
            return _DUMMY.hash
        kinds = collections.Counter(_parameters(h) for h in self.hashes.values())
        common = kinds.most_common(1)[0][0]
        return next(h for h in self.hashes.values() if _parameters(h) == common)


def _parameters(hashed: str) -> str:
    """A PHC hash string's algorithm, version and parameters (`$argon2id$v=19$m=…,t=…,p=…`)."""
    return "$".join(hashed.split("$")[:4])


class _Dummy:
    """A hash to check unknown names against, made on first use (it costs one hash)."""

    _hash: str | None = None

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = _hasher().hash(os.urandom(16).hex())
        return self._hash


_DUMMY = _Dummy()


class RecentLogins:
    """Logins that passed the check in the last TTL seconds, kept by one worker in memory, so
    that a mail program that logs in for every message (Thunderbird does) pays the argon2
    check once, not each time, as Dovecot's auth cache does. Only successes are kept, under an
    HMAC of the name and password with a key of this process's own (never the password); a
    reload starts new workers, so a changed or deleted password is forgotten with them."""

    def __init__(self, ttl: float = 600.0, size: int = 1024) -> None:
        self.ttl = ttl
        self.size = size
        self._key = os.urandom(32)
        self._seen: collections.OrderedDict[bytes, tuple[str, float]] = collections.OrderedDict()

    def _digest(self, login: str, password: str) -> bytes:
        return login_digest(self._key, login, password)

    def get(self, login: str, password: str, now: float) -> str | None:
        """The user, if this login passed the check less than TTL seconds ago."""
        key = self._digest(login, password)
        found = self._seen.get(key)
        if found is None or found[1] <= now:
            return None
        return found[0]

    def add(self, login: str, password: str, user: str, now: float) -> None:
        key = self._digest(login, password)
        self._seen[key] = (user, now + self.ttl)
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)


def login_digest(key: bytes, login: str, password: str) -> bytes:
    """A login (name and password) as a process keeps it in memory: an HMAC under a key of
    its own, never the password."""
    text = f"{login}\0{password}".encode("utf-8", "surrogatepass")
    return hmac.digest(key, text, "sha256")  # (the one-shot C path)


def hash_password(password: str) -> str:
    return str(_hasher().hash(password))


def _text(path: str, hashes: Mapping[str, str]) -> str:
    """The file's new text: its lines as they are, each user's with its new hash (gone when
    the user is), then the new users (an acceptance tester's finding: `mailerd passwd` wrote
    the users alone, and the comments were lost)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):  # (none yet; or unreadable, which load() said)
        lines = []
    out = []
    written = set()
    for line in lines:
        user = "" if line.startswith("#") else line.partition(":")[0]
        if user in hashes:
            if user not in written:  # (a user given twice keeps one line)
                out.append(f"{user}:{hashes[user]}")
                written.add(user)
        elif not line.strip() or line.startswith("#"):
            out.append(line)
    out += [f"{user}:{hashes[user]}" for user in sorted(hashes) if user not in written]
    return "".join(f"{line}\n" for line in out)


def exposed(path: str) -> str | None:
    """Why the file at `path` is open to more than root and group mail reading it, in a
    warning's words (None: it is not, or it is not there). Its owner can add a login for any
    user; whoever reads it can guess at the hashes offline, unhurried by the server's delays."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, who may add a login for any user: chown root:mail it"
    if st.st_mode & 0o004:
        return "is readable by others, who may guess at its hashes offline: chmod 640 it"
    if st.st_mode & 0o040 and st.st_gid not in (0, _gid(GROUP)):
        return (
            f"is readable by group {_group_name(st.st_gid)}, whose members may guess at its "
            f"hashes offline: chgrp {GROUP} it"
        )
    if st.st_mode & 0o022:
        return "may be written by others than its owner, who may add logins: chmod 640 it"
    return None


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _directory(path: str) -> str:
    """The directory of the passwd file at `path`, made if missing (/etc/mailerd before the
    first `mailerd passwd`)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    return directory


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of the passwd file at `path`: a `flock`
    of its directory (made if missing), which no other program locks, so that no lock file
    is left beside it."""
    dfd = os.open(_directory(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(dfd)


def write(path: str, hashes: Mapping[str, str]) -> None:
    """Replace the file atomically: root's, group `mail`, mode 0640 (the group when it exists
    and we may give it), its users those of `hashes`. What the administrator wrote stays:
    comments, empty lines and the users' order (`_text`)."""
    directory = _directory(path)
    data = _text(path, hashes).encode("utf-8")
    durable.replace_synced(path, data, _owner(), mode=0o640)
    durable.fsync_dir(directory)


def _owner() -> tuple[int, int] | None:
    """root and group `mail` (run by another user: that user, who may give the group only if
    a member of it); None when there is no such group, or it may not be given."""
    gid = _gid(GROUP)
    if gid is None:
        return None
    if os.geteuid() == 0:
        return 0, gid
    if gid != os.getegid() and gid not in os.getgroups():
        return None
    return -1, gid

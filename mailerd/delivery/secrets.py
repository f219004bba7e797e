"""What only the delivery process holds: the relayhost's login (--relay-auth) and the DKIM
private keys (--dkim-key).

It reads them itself, as root, when it starts and before it drops privileges
(`process.run`). A reload starts a new delivery process, which reads them anew. The master
only makes sure that they load: a short-lived child of its reads them and exits (`check`), so
the master's own memory never holds them. Every worker and mailbox writer is forked from that
memory, and a worker parses what the Internet sends. Code running in a worker must not find
the smarthost's password or the key that signs the domain's mail there (an attacker's pass
found both, one copy each, in every worker).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from setproctitle import setproctitle

from mailerd import credentials, privileges, signing
from mailerd.config import Config, ConfigError
from mailerd.signing import SigningKey

CHECK_TIMEOUT = 10.0  # seconds a check may take: a key on a hung network mount
REPORT_LIMIT = 4096  # bytes of the child's reason read (a path and a sentence)

log = logging.getLogger("mailerd")


@dataclass(frozen=True)
class Secrets:
    relay_login: tuple[str, str] | None = field(default=None, repr=False)  # user, password
    dkim_keys: tuple[SigningKey, ...] = field(default=(), repr=False)

    @classmethod
    def load(cls, cfg: Config) -> Secrets:
        """Read the files `cfg` names; ConfigError names the option and the file."""
        login = read_relay_login(str(cfg.relay_auth)) if cfg.relay_auth else None
        try:
            keys = tuple(signing.load_key(d, s, str(path)) for d, s, path in cfg.dkim_specs)
        except signing.KeyProblem as exc:
            raise ConfigError(f"--dkim-key: {exc}") from exc
        return cls(relay_login=login, dkim_keys=keys)


NO_SECRETS = Secrets()


def read_relay_login(path: str) -> tuple[str, str]:
    """`username:password` on the first line of the --relay-auth file."""
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline().strip()
    except OSError as exc:
        raise ConfigError(f"--relay-auth: cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--relay-auth: cannot read {path}: not UTF-8 text") from exc
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise ConfigError(f"--relay-auth: {path}: expected 'username:password' on the first line")
    return user, password


def check(cfg: Config, blocked: Iterable[signal.Signals] = ()) -> str | None:
    """Why the secrets do not load (None: they do), found by a child that reads them and
    exits; when they do, a warning logged for a file others may reach (a file that does not
    load is the one line said). `blocked`: signals the child must not act on (the master's:
    their handlers would act for it), blocked across the fork as the master's own children
    have them."""
    reading, writing = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: it reads, reports, and is gone with what it read
        code = 0
        try:
            _alone(parent, writing)
            Secrets.load(cfg)
        except ConfigError as exc:
            os.write(writing, str(exc).encode("utf-8", "replace")[:REPORT_LIMIT])
            code = 1
        except BaseException as exc:  # a bug: still an answer, never a second master
            os.write(writing, f"cannot check: {exc!r}".encode()[:REPORT_LIMIT])
            code = 1
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(writing)
    try:
        report = _read_report(reading, pid)
    finally:
        os.close(reading)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if report is None:
        return f"reading the secret files took over {CHECK_TIMEOUT:.0f} s"
    if report:
        return report.decode("utf-8", "replace")
    if code != 0:
        return f"the check of the secret files failed (exit status {code})"
    _warn_if_exposed(cfg)
    return None


def _alone(parent: int, keep: int) -> None:
    """The checking child keeps nothing of the master's but `keep`: no listening socket, no
    pid-file lock, no channel, should it outlive the master (a key file that is a FIFO holds it
    until the timeout), and it dies with the master."""
    privileges.die_with_parent()
    if os.getppid() != parent:  # (the master died before that was set)
        os._exit(1)
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    setproctitle("mailerd: checking the secret files")


def _warn_if_exposed(cfg: Config) -> None:
    """A warning for each secret file others may read: the relayhost's login, the DKIM keys,
    and the TLS keys and the passwd file too (which the master reads itself), checked here at
    start and reload alike. (A stat: the content is not read here.)"""
    why = credentials.exposed(str(cfg.passwd_file))
    if why is not None:  # (an acceptance tester's finding: keys were warned of, this not)
        log.warning("--passwd %s %s", cfg.passwd_file, why)
    if cfg.relay_auth is not None:
        try:
            mode = os.stat(cfg.relay_auth).st_mode
        except OSError:
            mode = 0  # (the check says why it cannot be read)
        if mode & 0o077:
            log.warning("%s is readable by others: chmod 600 it", cfg.relay_auth)
    keys = [("--dkim-key", path) for _, _, path in cfg.dkim_specs]
    keys += [("--tls-key", key) for _, key in cfg.tls_pairs]
    for option, path in keys:
        why = privileges.exposed(path, cfg.user)
        if why is not None:
            log.warning("%s %s %s", option, path, why)


def _read_report(fd: int, pid: int) -> bytes | None:
    """What the child wrote before it closed its end; None (and the child killed) past the
    timeout."""
    deadline = time.monotonic() + CHECK_TIMEOUT
    report = b""
    while len(report) < REPORT_LIMIT:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            return None
        chunk = os.read(fd, REPORT_LIMIT)
        if not chunk:
            break
        report += chunk
    return report

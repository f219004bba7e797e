"""Starting mailerd: everything that can fail is checked while still at the terminal (the
user, the files the children must read, the pid file, the log file, the directories, every
bind); then the master detaches (unless -f) and supervises (`arbiter.Master`).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
from dataclasses import replace
from pathlib import Path

from mailerd import config, preload, privileges
from mailerd import log as logsetup
from mailerd.config import Config, ConfigError, ListenAddress
from mailerd.delivery import relay, secrets
from mailerd.delivery.queue import Queue
from mailerd.master import daemon as daemonize
from mailerd.master import listeners
from mailerd.master.arbiter import Master

log = logging.getLogger("mailerd.master")


# What a read-only file system most often is for a daemon started by systemd: the unit's
# ProtectSystem=strict, which leaves writable only the default spool, queue, /run and /var/log.
READ_ONLY_HINT = (
    " (if mailerd runs under its systemd unit, which makes the file system read-only but for "
    "the default spool, queue and /var/log: `systemctl edit mailerd`, then [Service] and "
    "ReadWritePaths=PATH)"
)


def _failure(what: str, path: Path, exc: OSError) -> OSError:
    """`exc` saying what and where, and what a read-only file system most likely is."""
    hint = READ_ONLY_HINT if exc.errno == errno.EROFS else ""
    return OSError(exc.errno, f"cannot {what} {path}: {exc.strerror}{hint}")


def prepare(cfg: Config) -> tuple[list[tuple[socket.socket, ListenAddress]], socket.socket]:
    """Create the directories and bind every endpoint; OSError says what failed."""
    try:
        cfg.spool.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _failure("create spool", cfg.spool, exc) from exc
    # (an existing spool on a read-only file system is no error above, and mail for every
    # local user would wait in the queue, each copy "deferred": said now instead)
    if os.statvfs(cfg.spool).f_flag & os.ST_RDONLY:
        raise _failure("write to spool", cfg.spool, OSError(errno.EROFS, os.strerror(errno.EROFS)))
    try:
        Queue(cfg.queue).create_dirs()
    except OSError as exc:
        raise _failure("create queue", cfg.queue, exc) from exc
    smtp_sockets = listeners.bind_all(cfg.listeners)
    try:
        delivery_socket = listeners.bind_unix(cfg.queue / "private" / "delivery.sock")
    except OSError as exc:
        for sock, _ in smtp_sockets:
            sock.close()
        raise OSError(
            exc.errno, f"cannot create the delivery socket in {cfg.queue}: {exc.strerror or exc}"
        ) from exc
    return smtp_sockets, delivery_socket


# What one worker may need: a descriptor a session and one for the message it is receiving,
# beside its own (listeners, channels, log, resolver sockets). The session cap is shared, so
# one worker may hold all of --max-sessions.
SESSION_DESCRIPTORS = 2
WORKER_DESCRIPTORS = 64


def raise_fd_limit(max_sessions: int) -> None:
    """Thousands of idle sessions need thousands of descriptors: take what the hard limit
    allows, and say so when that is too few for --max-sessions (a container's low limit):
    past it, a worker's network listeners close new connections unanswered (libuv's way out
    of EMFILE) and its implicit-TLS ones leave them waiting, before the 421 the cap gives."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = WORKER_DESCRIPTORS + SESSION_DESCRIPTORS * max_sessions
    if hard != resource.RLIM_INFINITY and hard < need:
        log.warning(
            "the descriptor limit is %d, below the %d that --max-sessions %d may need: "
            "raise it (ulimit -n, systemd's LimitNOFILE=) or lower --max-sessions",
            hard,
            need,
            max_sessions,
        )


def read_by_children(cfg: Config) -> dict[Path, str]:
    """Files the children open by name after dropping privileges, each with the fix to print
    when they cannot (everything else they reach through descriptors opened before the drop,
    and their code is loaded before it: see `preload`)."""
    found = {}
    if cfg.dns_server is None:  # the delivery process's resolver reads it when it starts
        found[Path("/etc/resolv.conf")] = "make it readable (chmod 644), or give --dns-server"
    return found


def _fail(message: str) -> int:
    logsetup.complain(message)
    return 1


def run(cfg: Config, argv: list[str] | None = None) -> int:
    """Start mailerd: everything that can fail is checked while still at the terminal
    (user, pid file, log file, directories, every bind); then detach unless -f; then supervise.
    `argv` is what SIGHUP re-reads."""
    logsetup.setup(cfg.verbose, startup=True)
    preload.preload()  # before any fork: the children may not be able to read the code
    raise_fd_limit(cfg.max_sessions)
    start_dir = Path.cwd()
    cfg = config.absolute(cfg, start_dir)
    try:
        cfg = config.load_files(cfg)
    except ConfigError as exc:
        return _fail(str(exc))
    problem = secrets.check(cfg)
    if problem is not None:
        return _fail(problem)
    try:
        relay.use_trust(relay.load_trust(cfg.outbound_ca))
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        user = privileges.resolve(cfg.user)
    except privileges.PrivilegeError as exc:
        return _fail(str(exc))
    needed = read_by_children(cfg)
    problems = privileges.unreadable(user, list(needed))
    if problems:
        path, reason = problems[0]
        return _fail(
            f"the children run as {user} and cannot read {path} ({reason}): {needed[path]}"
        )
    pidfile_path = cfg.pidfile
    if pidfile_path is None and not cfg.foreground and os.geteuid() == 0:
        pidfile_path = Path(config.DEFAULT_PIDFILE)
    cfg = replace(cfg, user=user, pidfile=pidfile_path)

    pidfile = daemonize.PidFile(pidfile_path) if pidfile_path is not None else None
    bound: list[socket.socket] = []
    try:
        if pidfile is not None:
            pidfile.acquire()
        if cfg.log_file is not None:
            try:
                logsetup.setup(cfg.verbose, log_file=cfg.log_file)
            except OSError as exc:
                raise _failure("open log file", cfg.log_file, exc) from exc
            privileges.chown_path(cfg.log_file, user, logsetup.LOG_MODE)
        smtp_sockets, delivery_socket = prepare(cfg)
        bound = [sock for sock, _ in smtp_sockets] + [delivery_socket]
        privileges.prepare_queue(cfg.queue, user)
        privileges.check_looked_into(cfg, user)
    except (OSError, daemonize.PidFileError, privileges.PrivilegeError) as exc:
        for sock in bound:
            sock.close()
        if pidfile is not None:
            pidfile.release()
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return _fail(text)

    notifier: daemonize.Notifier | None = None
    if not cfg.foreground:
        if cfg.log_file is None and not logsetup.syslog_available():
            logsetup.complain(
                f"warning: no {logsetup.SYSLOG_SOCKET} (is a syslog daemon running?): "
                "the daemon's log is lost; use --log-file FILE, or -f to log to stderr",
                logging.WARNING,
            )
        preserve = [*(sock.fileno() for sock in bound), *logsetup.file_descriptors()]
        if pidfile is not None and pidfile.fd is not None:
            preserve.append(pidfile.fd)
        notifier = daemonize.detach(preserve)
        if cfg.log_file is None:
            logsetup.setup(cfg.verbose, syslog=True)
    if pidfile is not None:
        pidfile.write(os.getpid())

    master = Master(
        cfg,
        smtp_sockets,
        delivery_socket,
        argv=argv,
        start_dir=start_dir,
        pidfile=pidfile,
        notifier=notifier,
    )
    try:
        code = master.run()
    except BaseException:
        log.exception("master crashed")
        code = 1
    finally:
        if pidfile is not None:
            pidfile.release()
    if notifier is not None and not notifier.done:
        notifier.failed(master.failure())
    return code

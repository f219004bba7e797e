"""Listening sockets: the only place that binds. The master opens them all before forking."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
from pathlib import Path

from mailerd import host
from mailerd.config import ListenAddress
from mailerd.ipc import unixpath

BACKLOG = 4096


# Linux's "bind to an address the machine does not have (yet)": socket.py names neither.
IP_FREEBIND = 15
IPV6_FREEBIND = 78


def bind(listen: ListenAddress) -> socket.socket:
    """A listening TCP socket for one address, inheritable by the forked workers."""
    sock = socket.socket(listen.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if listen.family == socket.AF_INET6:
            # One socket per family, so [::] never swallows the IPv4 port (and vice versa).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((listen.host, listen.port))
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL or not _tentative(listen.host):
                raise
            # The interface has the address, but the kernel does not let it be used yet: an
            # IPv6 address stays "tentative" for a second or more after its interface comes
            # up, until duplicate address detection is done, and a boot starts mailerd then.
            # The start failed (and the unit does not retry a start): listen all the same,
            # the connections come once the address is usable. An address the machine does
            # not have at all is still refused.
            level, option = (
                (socket.IPPROTO_IPV6, IPV6_FREEBIND)
                if listen.family == socket.AF_INET6
                else (socket.IPPROTO_IP, IP_FREEBIND)
            )
            sock.setsockopt(level, option, 1)
            sock.bind((listen.host, listen.port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _tentative(address: str) -> bool:
    """Is `address` one of the machine's interfaces' (which a bind refused: not usable yet)?"""
    try:
        wanted = ipaddress.ip_address(address)
        return any(wanted == ipaddress.ip_address(a) for a in host.machine_addresses())
    except (OSError, ValueError):  # (netlink refused; not an address)
        return False


def bind_all(listens: tuple[ListenAddress, ...]) -> list[tuple[socket.socket, ListenAddress]]:
    bound: list[tuple[socket.socket, ListenAddress]] = []
    try:
        for listen in listens:
            try:
                bound.append((bind(listen), listen))
            except OSError as exc:
                raise OSError(exc.errno, describe_bind_error(listen, exc)) from exc
    except OSError:
        for sock, _ in bound:
            sock.close()
        raise
    return bound


def rebind(
    current: list[tuple[socket.socket, ListenAddress]], wanted: tuple[ListenAddress, ...]
) -> tuple[list[tuple[socket.socket, ListenAddress]], list[socket.socket]]:
    """At a reload: sockets for `wanted` (an unchanged address keeps its socket, so no
    connection is refused meanwhile), and those of `current` to close. Raises OSError, with
    `describe_bind_error`'s text, when one cannot be bound (and closes what it bound)."""
    by_address = {(listen.host, listen.port): sock for sock, listen in current}
    result: list[tuple[socket.socket, ListenAddress]] = []
    fresh: list[socket.socket] = []
    try:
        for listen in wanted:
            sock = by_address.get((listen.host, listen.port))
            if sock is None:
                try:
                    sock = bind(listen)
                except OSError as exc:
                    raise OSError(exc.errno, describe_bind_error(listen, exc)) from exc
                fresh.append(sock)
            result.append((sock, listen))
    except OSError:
        for sock in fresh:
            sock.close()
        raise
    keep = {(listen.host, listen.port) for listen in wanted}
    removed = [sock for key, sock in by_address.items() if key not in keep]
    return result, removed


def describe_bind_error(listen: ListenAddress, exc: OSError) -> str:
    """What failed, and what the administrator can do about it."""
    text = f"cannot listen on {listen}: {exc.strerror}"
    if exc.errno == errno.EADDRINUSE:
        text += " (another program, perhaps another mail server, has this port: stop it, or "
        text += "choose other addresses with -l/-n)"
    elif exc.errno == errno.EACCES and listen.port < 1024:
        text += " (ports below 1024 need root: start mailerd as root, it drops privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        text += " (this machine has no such address: check -l/-n/-i)"
    return text


def bind_unix(path: Path) -> socket.socket:
    """The delivery service socket (mode 0600 in a 0700 directory: only we may submit mail).
    One that answers belongs to another mailerd working the same queue: it is not taken over
    (its workers find the delivery process by this path, and would lose it)."""
    if _answers(path):
        raise OSError(errno.EADDRINUSE, f"{path} answers: another mailerd works this queue")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with unixpath.reachable(str(path)) as address:
            sock.bind(address)
    finally:
        os.umask(old)
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


def _answers(path: Path) -> bool:
    """Does something accept connections on the Unix socket at `path`? A socket file left by
    a mailerd that was killed refuses them; a busy one may not answer in time, and is in use."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        with unixpath.reachable(str(path)) as address:
            probe.connect(address)
    except (TimeoutError, BlockingIOError):  # (a full backlog: EAGAIN)
        return True
    except OSError:  # refused, missing, not a socket
        return False
    finally:
        probe.close()
    return True

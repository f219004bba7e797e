"""Unix socket paths of any length. A socket address holds at most 107 bytes of path
(sockaddr_un's sun_path, with its NUL), so the delivery socket of a queue in a deep directory (a
checkout under a long home path, pytest's temporary directories) could be neither bound nor
reached: bind() and connect() said "AF_UNIX path too long". Such a path is given to them through
its directory's descriptor, as /proc/self/fd/N/NAME, which the kernel resolves as it would the
path itself, with the same permission checks (systemd does the same). A path that fits is given
as it is."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

SUN_PATH_MAX = 107  # bytes of path a sockaddr_un holds, its terminating NUL aside


@contextlib.contextmanager
def reachable(path: str) -> Iterator[str]:
    """A path to give bind() or connect() for the socket at `path`, valid inside the block."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)

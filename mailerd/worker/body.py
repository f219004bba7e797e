"""A message's body while it arrives: in memory while small, then an unlinked temporary file
(`<queue>/tmp`, O_TMPFILE), whose descriptor then travels to the delivery process or the
mailbox writer instead of the bytes."""

from __future__ import annotations

import os

from mailerd.durable import write_all
from mailerd.ipc.channel import MAX_INLINE


class BodyBuffer:
    """The message body in transit: in memory while small, then an unlinked temp file."""

    def __init__(self, spill_dir: str) -> None:
        self._spill_dir = spill_dir
        self._memory = bytearray()
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        if self._fd is None and len(self._memory) + len(data) <= MAX_INLINE:
            self._memory += data
            return
        if self._fd is None:
            self._fd = os.open(self._spill_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            write_all(self._fd, bytes(self._memory))
            self._memory = bytearray()
        write_all(self._fd, data)

    def take(self) -> tuple[bytes, int | None]:
        """Hand over the body (bytes, or a descriptor the caller now owns) and reset."""
        body, fd = bytes(self._memory), self._fd
        self._memory, self._fd = bytearray(), None
        return body, fd

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._memory, self._fd = bytearray(), None

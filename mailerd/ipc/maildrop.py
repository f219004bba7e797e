"""The maildrop: how `sendmail` hands mail to the daemon, running or not.

`<queue>/maildrop` is mode 1733 and belongs to the children's user (`mail`): any local user may
create a file there, but nobody else may list the directory, and the sticky bit keeps users
from removing each other's files (Postfix's world-writable maildrop, from before its setgid
postdrop: a Python program cannot be setgid). A submission is written under a dot-name,
fsync'd, renamed to its final name and made durable with syncfs() (the submitter may not open
the directory to fsync it), and only then does `sendmail` exit 0. Its final name is a queue id
and a 128-bit secret: the file is mode 0644 so that the pickup (running as `mail`) can read it,
and nobody can open a name they cannot list or guess. Then `sendmail` writes a byte to the FIFO
`<queue>/public/pickup`, so that a running daemon picks the file up at once.

A file holds one line of JSON, then the message with CRLF line ends:

    {"version": 1, "sender": "root@example.org", "recipients": ["admin@example.org"],
     "body": "8BITMIME"}

The pickup (`read()`, in the delivery process) treats all of it as untrusted input: who
submitted it is the file's owner, never its content; the addresses, their number, the size and
the message's line ends are checked as for SMTP, and anything else makes the file invalid: so
does an entry that is no regular file the pickup may read (`submit()` never leaves one).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, replace
from typing import NoReturn

from mailerd import trace
from mailerd.smtp.data import BodyChecker, starts_no_field
from mailerd.smtp.grammar import GrammarError, parse_address

MAILDROP = "maildrop"  # below the queue directory
PUBLIC = "public"
PICKUP_FIFO = "pickup"  # below PUBLIC
VERSION = 1
MAX_HEADER = 256 * 1024  # the JSON line
MAX_RECIPIENTS = 1000
MAX_LINE = 1000  # octets with CRLF (RFC 5321 4.5.3.1.6)
HEAD_KEPT = 64 * 1024  # octets of a message too big that are read, for its bounce
BODY_TYPES = ("7BIT", "8BITMIME")

_NAME = re.compile(r"(?P<id>[0-9A-Z]{8,20})-[0-9a-z]{26}")
_SECRET_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


class Invalid(ValueError):
    """A maildrop file that is not a submission; the message says why."""


class TooBig(Invalid):
    """A submission whose message is over the daemon's size limit (its `sendmail` read another
    configuration): refused, but from a sender who hears of it, unlike junk. `submission`'s
    message is the message's header section only (at most HEAD_KEPT octets), for the bounce."""

    def __init__(self, submission: Submission, size: int, max_size: int) -> None:
        super().__init__(f"message larger than {max_size} bytes ({size})")
        self.submission = submission
        self.size = size


@dataclass(frozen=True)
class Submission:
    """One validated maildrop file."""

    name: str  # the file's name
    queue_id: str  # the id its queue item gets (the first part of the name)
    uid: int  # who submitted it: the file's owner
    sender: str  # "" for <>
    recipients: tuple[str, ...]
    body: str  # "7BIT" or "8BITMIME"
    smtputf8: bool  # an address is not ASCII
    message: bytes


# -- the submitting side (the `sendmail` command, as any user) -------------------------------


def new_name() -> str:
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(26))
    return f"{trace.new_id()}-{secret}"


def submit(
    queue: str, sender: str, recipients: list[str], message: bytes, body: str = "8BITMIME"
) -> str:
    """Store one submission durably in `<queue>/maildrop`; its name. Raises OSError."""
    header = json.dumps(
        {"version": VERSION, "sender": sender, "recipients": recipients, "body": body},
        ensure_ascii=False,
    ).encode("utf-8")
    directory = os.open(os.path.join(queue, MAILDROP), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        name = new_name()
        temporary = "." + name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o644, dir_fd=directory)
        current = temporary
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: the pickup (another user) reads it
            _write_all(fd, header + b"\n" + message)
            os.fsync(fd)
            os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
            current = name
            _sync_rename(queue, fd)
        except BaseException:
            # Whatever was written goes: the caller hears of a failure and will submit again,
            # and a copy left behind would then be delivered twice.
            with contextlib.suppress(OSError):
                os.unlink(current, dir_fd=directory)
            raise
        finally:
            os.close(fd)
    finally:
        os.close(directory)
    return name


def poke(queue: str) -> bool:
    """Tell a running daemon to look at the maildrop now; False if none is listening.

    `<queue>/public` belongs to the children's user (`mail`), and `sendmail` runs as root
    (cron, unattended-upgrades): whatever stands at `public/pickup` was put there by that user,
    who could make it a symlink to /etc/passwd, or a hard link to one of root's files. So the
    name is looked at without following a link (O_PATH | O_NOFOLLOW: opening nothing yet, no
    device's open runs), must be a FIFO, and only that very FIFO is then opened for writing."""
    try:
        path_fd = os.open(
            os.path.join(queue, PUBLIC, PICKUP_FIFO), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except OSError:  # ENOENT: never started; ELOOP: a symlink (not ours to write through)
        return False
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_nlink != 1:  # (a hard link: another's FIFO)
            return False
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: no reader (the daemon is not running)
        return False
    finally:
        os.close(path_fd)
    try:
        os.write(fd, b"!")
    except OSError:  # EAGAIN: the FIFO is full of pokes already, which is just as good
        pass
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sync_rename(queue: str, fd: int) -> None:
    """Make the rename durable: an fsync of the maildrop when the submitter may open it (root,
    who runs most of a machine's mail: cron, fail2ban, mdadm), else a syncfs of its file
    system (others may not read the 1733 directory, and an O_PATH descriptor cannot be
    fsync'd), which also writes whatever else is waiting there: slower on a busy disk."""
    try:
        directory = os.open(
            os.path.join(queue, MAILDROP), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
    except PermissionError:
        _syncfs(fd)
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _syncfs(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# -- the pickup's side (the delivery process, as the children's user) ------------------------


def is_submission_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def read(directory: int, name: str, max_size: int) -> Submission:
    """Open, read and validate `name` below the maildrop's descriptor; Invalid if it is no
    submission (OSError if it cannot be read at all, FileNotFoundError if it is gone)."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise Invalid("not a maildrop name")
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=directory)
    except FileNotFoundError:
        raise
    except OSError as exc:
        _unopenable(directory, name, exc)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Invalid("not a regular file")
        if st.st_nlink != 1:
            raise Invalid("has other links (a hard link to someone else's file?)")
        over = st.st_size > max_size + MAX_HEADER  # (too big, whatever its header's length)
        data = read_at_most(fd, MAX_HEADER + HEAD_KEPT if over else max_size + MAX_HEADER + 1)
    finally:
        os.close(fd)
    end = data.find(b"\n", 0, MAX_HEADER)
    if end < 0:
        raise Invalid("no header line")
    sender, recipients, body = _header(data[:end])
    message = data[end + 1 :]
    size = max(st.st_size, len(data)) - (end + 1)
    submission = Submission(
        name=name,
        queue_id=match["id"],
        uid=st.st_uid,
        sender=sender,
        recipients=tuple(recipients),
        body=body,
        smtputf8=not all(a.isascii() for a in [sender, *recipients]),
        message=message,
    )
    if size > max_size:
        raise TooBig(replace(submission, message=_header_section(message)), size, max_size)
    _check_message(message, max_size)
    if starts_no_field(message):
        # (As SMTP's session does: a first line that is no field would continue the Received:
        # put above it; a local user wrote " (mailerd, from userid 0)" below the uid of ours.)
        submission = replace(submission, message=b"\r\n" + message)
    return submission


def _header_section(message: bytes) -> bytes:
    """The message's header section (its first HEAD_KEPT octets, to their last whole line)."""
    kept = message[:HEAD_KEPT]
    end = kept.find(b"\r\n\r\n")
    if end < 0:
        end = kept.rfind(b"\r\n")
    return kept[: end + 2] if end >= 0 else b""


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _unopenable(directory: int, name: str, exc: OSError) -> NoReturn:
    """Why `name` could not be opened: Invalid if it is nothing `submit()` leaves (a link, a
    directory the pickup may not open, a file it may not read: `submit()` makes each file 0644
    before it gets its name), else `exc` again (a trouble of ours: the file waits)."""
    st = os.stat(name, dir_fd=directory, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise Invalid("not a regular file") from None
    if not st.st_mode & stat.S_IROTH:
        raise Invalid(f"not readable by the pickup (mode {stat.S_IMODE(st.st_mode):04o})") from None
    raise exc


def read_at_most(fd: int, limit: int) -> bytes:
    """What `fd` holds from its offset on, to its end or to `limit` octets, whichever is first
    (a file someone else may have made huge, or sparse, is never read whole)."""
    chunks = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _header(line: bytes) -> tuple[str, list[str], str]:
    try:
        header = json.loads(line.decode("utf-8"))
    except ValueError as exc:  # (UnicodeDecodeError included)
        raise Invalid(f"header is not JSON: {exc}") from None
    except RecursionError:  # arrays nested thousands deep
        raise Invalid("header is not JSON: nested too deep") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise Invalid("unknown header version")
    sender, recipients, body = header.get("sender"), header.get("recipients"), header.get("body")
    if not isinstance(sender, str):
        raise Invalid("no sender")
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise Invalid("no recipient list")
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise Invalid(f"{len(recipients)} recipients (1 to {MAX_RECIPIENTS} allowed)")
    if body not in BODY_TYPES:
        raise Invalid(f"body type {body!r}")
    for address in [sender, *recipients] if sender else recipients:
        if not _is_utf8(address):
            raise Invalid(f"bad address <{_shown(address)}>: not UTF-8 (a lone surrogate)")
        try:
            # The whole text must be one address: nothing may follow it (no ESMTP parameters
            # smuggled in as "a@b> BODY=8BITMIME").
            parse_address(address)
        except GrammarError as exc:
            raise Invalid(f"bad address <{_shown(address)}>: {exc}") from None
    return sender, recipients, body


def _is_utf8(text: str) -> bool:
    """False for text with a lone surrogate, which JSON's \\udcff escape can carry but UTF-8
    cannot: an address with one would make a queue item that cannot be written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(text: str) -> str:
    """Text for the log: what is not printable (a line break, a surrogate) as an escape."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _check_message(message: bytes, max_size: int) -> None:
    """The checks SMTP applies to a message's content (smtp.data.BodyChecker)."""
    checker = BodyChecker(max_size, MAX_LINE)
    checker.feed(message)
    checker.finish()
    if checker.too_big:
        raise Invalid(f"message larger than {max_size} bytes")
    if checker.bare_cr_lf:
        raise Invalid("bare CR or LF in the message")
    if checker.nul:
        raise Invalid("NUL in the message")
    if checker.line_too_long:
        raise Invalid(f"a line longer than {MAX_LINE} octets")
    if message and not message.endswith(b"\r\n"):
        raise Invalid("the message does not end with CRLF")

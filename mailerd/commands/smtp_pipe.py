"""`sendmail -bs`: SMTP on standard input and output, as some mail programs and swaks
(`--pipe`) use it. The server's own sans-I/O `smtp.Session` runs on the pipe; each message it
completes gets its missing headers, as with `sendmail`, and is written to the maildrop before
its 250."""

from __future__ import annotations

import os

from mailerd.commands.sendmail import (
    Failure,
    Identity,
    Settings,
    body_type,
    complete_message,
    split_header,
    store,
)
from mailerd.smtp.events import Address, Envelope, Reply

IDLE_TIMEOUT = 300.0  # seconds a -bs client may stay silent


def serve(settings: Settings, identity: Identity, infd: int = 0, outfd: int = 1) -> int:
    """SMTP on a pipe (`sendmail -bs`, as MUAs and swaks use it): the server's own Session,
    with each message submitted to the maildrop before its 250."""
    from mailerd import policy
    from mailerd.names import Locality
    from mailerd.smtp import (
        NEED_DATA,
        BodyData,
        CloseConnection,
        MessageAborted,
        MessageComplete,
        Session,
        SessionConfig,
    )

    # Without the machine's other addresses (reading them takes psutil, which sendmail must
    # not need): a literal of one of them passes here as remote, and the pickup, which knows
    # them, delivers it locally (or bounces a malformed mailbox name there).
    locality = Locality(settings.domains or (settings.domain(),))

    def check_recipient(address: Address) -> Reply | None:
        # As on a trusted listener: only a malformed local mailbox name is refused here.
        verdict = policy.route(address, trusted=True, locality=locality)
        return verdict.reply if isinstance(verdict, policy.Refused) else None

    cfg = SessionConfig(
        hostname=settings.hostname(),
        max_message_size=settings.max_message_size,
        qualify_domain=settings.domain(),  # (a local program's <root>, as on the local listener)
    )
    session = Session(cfg, check_recipient)
    pending = bytearray()
    body: list[bytes] = []
    while True:
        event = session.next_event()
        if isinstance(event, Reply):
            pending += event.to_bytes()
        elif isinstance(event, BodyData):
            body.append(event.data)
        elif isinstance(event, MessageAborted):
            body = []
        elif isinstance(event, MessageComplete):
            session.commit_done(_commit(settings, identity, event.envelope, b"".join(body)))
            body = []
        elif isinstance(event, CloseConnection):
            return 0 if _write_all(outfd, pending) else os.EX_IOERR
        elif event is NEED_DATA:
            if not _write_all(outfd, pending):
                return os.EX_IOERR
            pending.clear()
            data = _read_some(infd, IDLE_TIMEOUT)
            if data is None:
                pending += session.timeout().to_bytes()
            else:
                session.receive_data(data)
        # Anything else (Rejected, for the daemon's log) needs nothing here.


def _commit(settings: Settings, identity: Identity, envelope: Envelope, content: bytes) -> Reply:
    """Queue one message of a -bs session; the reply to its end of data."""
    sender = str(envelope.sender) if envelope.sender is not None else ""
    recipients = [str(r) for r in envelope.recipients]
    lines = content.split(b"\r\n")
    if lines[-1] == b"":  # DATA content ends with CRLF; BDAT content need not
        lines.pop()
    fields, body = split_header(lines)
    message = complete_message(fields, body, sender, identity, strip_bcc=False)
    if len(message) > settings.max_message_size:
        size = settings.max_message_size
        return Reply(552, "5.3.4", f"Message too big for system (maximum {size} octets)")
    kind = "8BITMIME" if envelope.body == "8BITMIME" else body_type(message, None)
    try:
        names = store(settings, sender, recipients, message, kind)
    except Failure as exc:
        return Reply(451, "4.3.0", f"Error: {exc}")
    return Reply(250, "2.0.0", f"Ok: queued as {names[0].split('-')[0]}")


def _read_some(fd: int, timeout: float) -> bytes | None:
    """Up to 64 KiB from fd; b"" at its end (or on a read error), None after `timeout`."""
    import select

    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return None
        return os.read(fd, 65536)
    except OSError:
        return b""


def _write_all(fd: int, data: bytes | bytearray) -> bool:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:  # the client went away
        return False
    return True

"""Sans-I/O SMTP server protocol: bytes in, events out (RFC 5321 server side).

The I/O layer feeds ``Session.receive_data()`` and loops over
``Session.next_event()`` until it returns ``NEED_DATA`` or ``PAUSED``.
"""

from .events import (
    NEED_DATA,
    PAUSED,
    PENDING,
    Address,
    AuthRequest,
    BodyData,
    CloseConnection,
    Envelope,
    Event,
    MessageAborted,
    MessageComplete,
    RecipientVerdict,
    Rejected,
    Reply,
    Sentinel,
    StartTLS,
)
from .session import Session
from .settings import SessionConfig

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "PENDING",
    "Address",
    "AuthRequest",
    "BodyData",
    "CloseConnection",
    "Envelope",
    "Event",
    "MessageAborted",
    "MessageComplete",
    "RecipientVerdict",
    "Rejected",
    "Reply",
    "Sentinel",
    "Session",
    "SessionConfig",
    "StartTLS",
]

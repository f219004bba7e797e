"""The settings of one SMTP session (per listener): the host name it answers with and its
limits. Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionConfig:
    """Per-listener settings; limits are in octets unless named otherwise."""

    hostname: str
    max_message_size: int = 26214400
    max_errors: int = 20
    max_recipients: int = 100
    max_command_line: int = 512  # including CRLF (RFC 5321 4.5.3.1.4)
    max_text_line: int = 1000  # including CRLF (RFC 5321 4.5.3.1.6)

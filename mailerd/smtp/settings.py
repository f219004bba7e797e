"""The settings of one SMTP session (per listener): the host name it answers with, its limits,
and what it offers of TLS and authentication. Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionConfig:
    """Per-listener settings; limits are in octets unless named otherwise.

    TLS and AUTH, by listener role: the network listener offers STARTTLS when there is a
    certificate (`starttls`) and never AUTH; the local one offers both (AUTH even in clear
    text: `auth_in_clear`, it is loopback); submission offers STARTTLS and, inside TLS, AUTH,
    and wants both before MAIL (`tls_required`, `auth_required`); submissions starts in TLS
    (`implicit_tls`).
    """

    hostname: str
    max_message_size: int = 26214400
    max_errors: int = 20
    max_recipients: int = 100
    max_command_line: int = 512  # including CRLF (RFC 5321 4.5.3.1.4)
    max_text_line: int = 1000  # including CRLF (RFC 5321 4.5.3.1.6)
    starttls: bool = False  # STARTTLS is offered (until TLS is on)
    implicit_tls: bool = False  # the session is in TLS from its first byte
    auth: bool = False  # AUTH is offered (inside TLS unless auth_in_clear)
    auth_in_clear: bool = False  # AUTH without TLS too
    tls_required: bool = False  # MAIL needs TLS first
    auth_required: bool = False  # MAIL needs AUTH first
    max_auth_failures: int = 3  # the session ends at this failed AUTH
    # The domain of a MAIL or RCPT path that has none (`<root>`), as every MTA qualifies a
    # local program's addresses (Postfix: append_at_myorigin); "" refuses such a path with
    # 553/501 as RFC 5321 4.1.2 has it, <Postmaster> excepted. Set for the local listener
    # and `sendmail -bs` only: from the network an unqualified address is a client's error.
    qualify_domain: str = ""

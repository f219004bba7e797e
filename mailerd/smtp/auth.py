"""SASL for SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN mechanisms, what every mail
client speaks ("Normal password" in Thunderbird). Pure: it decodes what the client sends and
says what to answer; whether the password is right is the I/O layer's to find out.

LOGIN's prompts are exactly `VXNlcm5hbWU6` ("Username:") and `UGFzc3dvcmQ6` ("Password:"):
clients compare them (Thunderbird refuses others).
"""

from __future__ import annotations

import base64
import binascii

from .events import Reply

MECHANISMS = ("PLAIN", "LOGIN")
USERNAME_PROMPT = "VXNlcm5hbWU6"
PASSWORD_PROMPT = "UGFzc3dvcmQ6"
CANCEL = "*"  # a client's answer that gives up (RFC 4954 4)
USERNAME_CHALLENGE = Reply(334, None, USERNAME_PROMPT)
PASSWORD_CHALLENGE = Reply(334, None, PASSWORD_PROMPT)
EMPTY_CHALLENGE = Reply(334, None, "")  # PLAIN without an initial response: "334 "
# The longest line answering a 334, CRLF included. RFC 4954 4 puts no limit on it (a
# client moves a response too long for the AUTH command line there), so not the 512 of a
# command: a long password must still log in. 12288 is Postfix's smtpd_sasl_response_limit.
RESPONSE_LINE_MAX = 12288


def first_challenge(mechanism: str) -> Reply:
    """What to send for an AUTH without an initial response."""
    return EMPTY_CHALLENGE if mechanism == "PLAIN" else USERNAME_CHALLENGE


class SASLError(ValueError):
    """What the client sent is no answer of the mechanism's; the text says why."""


def decode(text: str) -> str:
    """A client's base64 answer as UTF-8 text."""
    text = text.strip()
    if text == "=":  # RFC 4954 4: an empty initial response
        return ""
    try:
        # (As ASCII bytes: given text that is not ASCII, b64decode raises a bare ValueError.)
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, UnicodeError) as exc:
        raise SASLError("not base64 of UTF-8 text") from exc


def plain(text: str) -> tuple[str, str, str]:
    """PLAIN's one answer, `authzid NUL authcid NUL password`, as (authzid, authcid, password)
    (authzid "" when the client gave none). Whether the authorization identity is the user's
    own (`alice` logging in for `alice@example.org`) is the I/O layer's to find out: nobody
    acts for another (RFC 4616 2: a refused authzid fails the authentication, 535)."""
    parts = decode(text).split("\0")
    if len(parts) != 3 or not parts[1]:
        raise SASLError("PLAIN wants authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    return authzid, authcid, password

"""mailerd: a lightweight personal mail server (SMTP in, local spool, outbound relay)."""

__version__ = "0.1.0"

# First, so that the loggers every module makes are log.MailLoggers (see there).
from mailerd import log as _log  # noqa: E402,F401

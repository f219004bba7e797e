"""mailerd: a lightweight personal mail server (SMTP in, local spool, outbound relay)."""

__version__ = "0.1.0"

"""Reading one option's value, from the command line or the configuration file: whole numbers,
booleans, choices, durations, IP[:PORT] addresses, domain and host names, DKIM selectors,
repeatable options' lists. Each raises ConfigError naming the option and the value, which is
what a user sees."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable


class ConfigError(Exception):
    """A bad option or configuration value; the message says which and why."""


def parse_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ConfigError(f"--{name}: must be one of {', '.join(choices)}: '{value}'")
    return text


def parse_optional_duration(name: str, value: object) -> float:
    """A duration, or 0/never/off for "never"."""
    if str(value).strip().lower() in ("0", "never", "off", "no"):
        return 0.0
    return parse_duration(name, value)


def parse_int(name: str, value: object, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"--{name}: not a whole number: '{value}'") from None
    if not low <= number <= high:
        raise ConfigError(f"--{name}: {number} is out of range {low}..{high}")
    return number


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "yes", "true", "on"):
        return True
    if lowered in ("0", "no", "false", "off", ""):
        return False
    raise ConfigError(f"--{name}: not a boolean: '{value}'")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(name: str, value: object) -> float:
    """'30s', '5m', '1h', '2d' or plain seconds → seconds (float, > 0)."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--{name}: not a duration (like 30s, 5m, 1h): '{value}'")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_address(name: str, text: str, default_port: int) -> tuple[str, int]:
    """ADDR[:PORT] → (host, port). ADDR is 1.2.3.4, ::1, [::1]:2525 or 127.0.0.1:2525."""
    text = text.strip()
    host, port = text, default_port
    bracketed = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if bracketed:
        host = bracketed.group(1)
        if bracketed.group(2):
            port = parse_int(name, bracketed.group(2), 1, 65535)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = parse_int(name, port_text, 1, 65535)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ConfigError(f"--{name}: not an IP address[:port]: '{text}'") from None


def parse_strings(values: object) -> list[str]:
    """A repeatable option's raw values as strings (they come as a list: the command line's,
    or the INI file's value split)."""
    if not isinstance(values, Iterable):
        raise TypeError(f"not a list of values: {values!r}")
    return [str(v) for v in values]


def parse_dns(value: object) -> tuple[str, int]:
    return parse_address("dns-server", str(value), 53)


LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")  # (\Z: `$` takes a final newline too)


# A DKIM selector: DNS labels (RFC 6376 3.1), letters, digits, hyphens, underscores.
_SELECTOR = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_-]+)*")


def is_selector(text: str) -> bool:
    """Is `text` a DKIM selector as --dkim-key takes it (and `mailerd dkim keygen`)?"""
    return _SELECTOR.fullmatch(text) is not None


def parse_domains(values: object) -> list[str]:
    domains = []
    for value in parse_strings(values):
        domain = value.strip().lower().rstrip(".")
        if not domain or not all(LABEL.match(label) for label in domain.split(".")):
            raise ConfigError(f"--domain: not a domain name: '{value}'")
        domains.append(domain)
    return domains


def parse_hostname(value: str) -> str:
    name = value.strip().rstrip(".")
    if not name or not all(LABEL.match(label) for label in name.lower().split(".")):
        raise ConfigError(f"--hostname: not a host name: '{value}'")
    return name

"""Typed reading of one JSON object's fields, for what mailerd reads from outside itself: the
queue's envelope files (delivery.queue, raising DamagedEnvelope) and the headers of the
messages between its processes (ipc.messages, raising BadMessage). Each accessor returns the
field as its type or raises the reader's exception, whose text names the object, the field
and what is wrong with it: `envelope: size is float, not a whole number`, `commit: helo
missing`, `write: since is nan, not a time`.

Types are exact (`type(v) is str`, as JSON gives them): a bool is never a number, nor an int
subclass an int. A field without a default is required; one with a default takes it when the
key is missing (an older writer did not write it), and a key no accessor asks for is ignored
(a newer one did). The messages are decoded for every message on the delivery path: each
accessor is one lookup and one type test, and what a refusal says is worked out only then.
"""

from __future__ import annotations

from math import isfinite
from sys import float_info
from typing import Any

# The default of a required field: no JSON value is it, so a missing key fails every type test.
_REQUIRED: Any = object()
_LARGEST = float_info.max


class Fields:
    """The fields of `raw`, which must be a JSON object (`error` if not), called `what` in
    the texts of the `error`s its accessors raise."""

    __slots__ = ("raw", "what", "error")

    def __init__(self, raw: object, what: str, error: type[Exception]) -> None:
        if type(raw) is not dict:
            raise error(f"{what}: not an object")
        self.raw: dict[str, Any] = raw
        self.what = what
        self.error = error

    def _wrong(self, name: str, value: object, kind: str) -> Exception:
        if value is _REQUIRED:
            return self.error(f"{self.what}: {name} missing")
        return self.error(f"{self.what}: {name} is {type(value).__name__}, not {kind}")

    def text(self, name: str, default: str = _REQUIRED) -> str:
        value = self.raw.get(name, default)
        if type(value) is not str:
            raise self._wrong(name, value, "a string")
        return value

    def optional_text(self, name: str) -> str | None:
        """A string, or None for null or a missing key."""
        value = self.raw.get(name)
        if value is not None and type(value) is not str:
            raise self._wrong(name, value, "a string or null")
        return value

    def whole(self, name: str, default: int = _REQUIRED) -> int:
        value = self.raw.get(name, default)
        if type(value) is not int:
            raise self._wrong(name, value, "a whole number")
        return value

    def count(self, name: str, default: int = _REQUIRED) -> int:
        """A whole number, not below 0."""
        value = self.whole(name, default)
        if value < 0:
            raise self.error(f"{self.what}: {name} is negative")
        return value

    def time(self, name: str, default: float = _REQUIRED) -> float:
        """A finite number, as a float: NaN and Infinity are JSON to Python's json module, and
        no time; nor is a whole number past the largest float (float() would overflow)."""
        value = self.raw.get(name, default)
        if type(value) is float:
            if isfinite(value):
                return value
            raise self.error(f"{self.what}: {name} is {value}, not a time")
        if type(value) is int:
            if -_LARGEST <= value <= _LARGEST:
                return float(value)
            raise self.error(f"{self.what}: {name} is too large a number, not a time")
        raise self._wrong(name, value, "a time")

    def flag(self, name: str, default: bool = _REQUIRED) -> bool:
        value = self.raw.get(name, default)
        if type(value) is not bool:
            raise self._wrong(name, value, "true or false")
        return value

    def array(self, name: str, default: list[Any] = _REQUIRED) -> list[Any]:
        """A JSON array (a list); what it holds is the caller's to check."""
        value = self.raw.get(name, default)
        if type(value) is not list:
            raise self._wrong(name, value, "a list")
        return value

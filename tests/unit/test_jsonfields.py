"""jsonfields.Fields, the typed reader of the queue's envelopes and of the processes' messages:
each accessor's accepted values and its refusals, raised as the reader's own exception
(DamagedEnvelope, BadMessage) with a text naming the object, the field and what is wrong."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import pytest

from mailerd.delivery.queue import DamagedEnvelope
from mailerd.ipc.messages import BadMessage
from mailerd.jsonfields import Fields

ERRORS = pytest.mark.parametrize("error", [DamagedEnvelope, BadMessage], ids=lambda e: e.__name__)
GONE = object()  # the key left out


class Text(str):
    pass


class Number(IntEnum):
    ONE = 1


def read(kind: str, value: Any, *default: Any, error: type[Exception] = BadMessage) -> Any:
    """`kind`'s reading of a field `f` that holds `value` (or is missing: GONE), among others."""
    raw = {"other": "x", "unknown": [1]}
    if value is not GONE:
        raw["f"] = value
    return getattr(Fields(raw, "thing", error), kind)("f", *default)


@pytest.mark.parametrize(
    ("kind", "value", "default", "expected"),
    [
        ("text", "josé", (), "josé"),
        ("text", "", (), ""),
        ("text", GONE, ("",), ""),
        ("text", "set", ("unused",), "set"),
        ("optional_text", "x", (), "x"),
        ("optional_text", None, (), None),
        ("optional_text", GONE, (), None),
        ("whole", 7, (), 7),
        ("whole", -5, (), -5),
        ("whole", GONE, (5,), 5),
        ("count", 0, (), 0),
        ("count", 2**70, (), 2**70),
        ("count", GONE, (0,), 0),
        ("time", 1796400000.25, (), 1796400000.25),
        ("time", -1.5, (), -1.5),
        ("time", 1700000000, (), 1700000000.0),
        ("time", GONE, (0.0,), 0.0),
        ("flag", True, (), True),
        ("flag", False, (), False),
        ("flag", GONE, (False,), False),
        ("array", [], (), []),
        ("array", ["a", 1, None], (), ["a", 1, None]),
        ("array", GONE, ([],), []),
    ],
)
def test_each_kind_gives_what_it_reads(kind, value, default, expected):
    got = read(kind, value, *default)
    assert got == expected and type(got) is type(expected)


def test_a_time_is_always_a_float():
    assert type(read("time", 3)) is float
    assert type(read("time", 0, 0.0)) is float


@ERRORS
@pytest.mark.parametrize(
    ("kind", "value", "said"),
    [
        ("text", None, "f is NoneType, not a string"),
        ("text", 1, "f is int, not a string"),
        ("text", ["x"], "f is list, not a string"),
        ("text", Text("x"), "f is Text, not a string"),
        ("optional_text", 3, "f is int, not a string or null"),
        ("optional_text", False, "f is bool, not a string or null"),
        ("whole", True, "f is bool, not a whole number"),
        ("whole", 1.0, "f is float, not a whole number"),
        ("whole", "4", "f is str, not a whole number"),
        ("whole", None, "f is NoneType, not a whole number"),
        ("whole", Number.ONE, "f is Number, not a whole number"),
        ("count", -1, "f is negative"),
        ("count", False, "f is bool, not a whole number"),
        ("count", 1.5, "f is float, not a whole number"),
        ("time", None, "f is NoneType, not a time"),
        ("time", "now", "f is str, not a time"),
        ("time", True, "f is bool, not a time"),
        ("time", float("nan"), "f is nan, not a time"),
        ("time", float("inf"), "f is inf, not a time"),
        ("time", float("-inf"), "f is -inf, not a time"),
        ("time", 10**400, "f is too large a number, not a time"),
        ("time", -(10**400), "f is too large a number, not a time"),
        ("flag", 1, "f is int, not true or false"),
        ("flag", 0, "f is int, not true or false"),
        ("flag", "yes", "f is str, not true or false"),
        ("flag", None, "f is NoneType, not true or false"),
        ("array", {}, "f is dict, not a list"),
        ("array", "a@b", "f is str, not a list"),
        ("array", ("a",), "f is tuple, not a list"),
        ("array", None, "f is NoneType, not a list"),
    ],
)
def test_each_kind_refuses_what_it_is_not(error, kind, value, said):
    with pytest.raises(error) as refused:
        read(kind, value, error=error)
    assert str(refused.value) == f"thing: {said}"


@ERRORS
@pytest.mark.parametrize("kind", ["text", "whole", "count", "time", "flag", "array"])
def test_a_required_field_that_is_missing_is_said_missing(error, kind):
    with pytest.raises(error, match=r"^thing: f missing$"):
        read(kind, GONE, error=error)


@ERRORS
def test_a_defaulted_field_present_is_still_checked(error):
    """A default stands in only for a missing key: a null is no missing key."""
    with pytest.raises(error, match="f is NoneType, not a string"):
        read("text", None, "", error=error)
    with pytest.raises(error, match="f is NoneType, not true or false"):
        read("flag", None, False, error=error)


@ERRORS
@pytest.mark.parametrize("raw", [[1, 2], None, "x", 3, {"f": 1}.items(), type("D", (dict,), {})()])
def test_only_a_json_object_has_fields(error, raw):
    with pytest.raises(error, match=r"^recipient: not an object$"):
        Fields(raw, "recipient", error)


def test_the_reader_raises_its_own_exception_only():
    """The queue's refusal is no BadMessage, nor the messages' a DamagedEnvelope (both are
    ValueErrors: a caller that catches one must not catch the other's)."""
    with pytest.raises(DamagedEnvelope) as envelope:
        read("text", 1, error=DamagedEnvelope)
    assert not isinstance(envelope.value, BadMessage)
    with pytest.raises(BadMessage) as message:
        read("text", 1, error=BadMessage)
    assert not isinstance(message.value, DamagedEnvelope)

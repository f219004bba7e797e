"""Remembering what is worked out from a text a sender chose: a From: field's domains, a DKIM
key record's key and limits, a DMARC record's policy. The same text comes message after
message, so its result is kept (the least recently used goes first). A text longer than any
real one is worked out each time and never kept: a sender chooses its length (a DNS record up
to a whole DNS message, 64 KiB; a header field up to the scan's size), and a few hundred of
those would fill a worker's memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Remembered(Generic[P, R]):
    """`func`, its results remembered for up to `maxsize` texts of at most `longest`
    characters or octets. The text is `func`'s last argument; `cache` is the functools LRU
    cache that keeps them."""

    def __init__(self, func: Callable[P, R], longest: int, maxsize: int) -> None:
        self.func = func
        self.longest = longest
        self.cache = functools.lru_cache(maxsize=maxsize)(func)
        functools.update_wrapper(self, func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        text = args[-1] if args else None
        if isinstance(text, bytes | str) and len(text) > self.longest:
            return self.func(*args, **kwargs)
        return self.cache(*args, **kwargs)  # type: ignore[arg-type]  # (texts are hashable)

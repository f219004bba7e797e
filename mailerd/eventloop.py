"""The asyncio event loop every mailerd process runs: uvloop when it is installed.

uvloop (libuv, MagicStack) runs the same asyncio code with less overhead per event;
mailerd's hot paths are many small socket events, so it pays. Without it, asyncio's own loop
works the same, only slower.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# uvloop's loop factory, or None for asyncio's own loop.
_uvloop_factory: Callable[[], asyncio.AbstractEventLoop] | None
try:
    import uvloop
except ImportError:  # optional: behaviour is the same without it
    _uvloop_factory = None
else:
    _uvloop_factory = uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a process's main coroutine to the end (each mailerd process calls this once)."""
    # What exists by now (modules, configuration) lives as long as the process: keep it out
    # of the collector's full passes, which would otherwise walk all of it again each time.
    gc.freeze()
    # Runner(loop_factory=...) rather than uvloop.run(), which Debian 12's uvloop 0.17 lacks.
    with asyncio.Runner(loop_factory=_uvloop_factory) as runner:
        return runner.run(main)

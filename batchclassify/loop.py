"""The event loop: uvloop when it is installed (the ``fast`` extra), else asyncio's own.

uvloop runs the same asyncio code with its loop, transports and timers in C, which takes a good
part of the client's CPU per request off (benchmarks/bench_cpu.py). ``--event-loop asyncio``
keeps asyncio's loop (to compare, or to rule uvloop out).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["EVENT_LOOPS", "EventLoop", "run", "uses_uvloop"]

EventLoop = Literal["auto", "asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoop, ...] = ("auto", "asyncio", "uvloop")

_T = TypeVar("_T")


def uses_uvloop(choice: str = "auto") -> bool:
    """Whether :func:`run` runs on uvloop for ``choice``; ``uvloop`` without it installed is an
    error (``auto`` simply falls back)."""
    if choice == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            from batchclassify.errors import ConfigError

            raise ConfigError(
                "--event-loop uvloop: uvloop is not installed (pip install 'batchclassify[fast]')"
            ) from None
        return False
    return True


def run(main: Coroutine[Any, Any, _T], choice: str = "auto") -> _T:
    """``asyncio.run(main)``, on uvloop's loop for ``choice`` (see :func:`uses_uvloop`)."""
    try:
        use = uses_uvloop(choice)
    except BaseException:
        main.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    if use:
        import uvloop

        result: _T = uvloop.run(main)
        return result
    return asyncio.run(main)

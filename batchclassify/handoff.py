"""Work for the thread pool, handed over in batches.

Reading and checking a file must not run on the event loop (a slow disk or network mount would
stall every request in flight), but handing each small file to a thread costs about as much as
preparing it: a queue put, a thread wake-up and a ``call_soon_threadsafe`` back, each one a GIL
hand-over. :class:`BatchedHandoff` gathers what the workers ask for in one turn of the event
loop into a few chunks, one per thread, and each chunk comes back with one wake-up of the loop.
With hundreds of requests in flight, that is tens of files per hand-over instead of one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

__all__ = ["BatchedHandoff"]

_A = TypeVar("_A")
_R = TypeVar("_R")

#: the most calls one chunk runs before it reports back (bounds the wait of its first caller)
_CHUNK = 32


class BatchedHandoff(Generic[_A, _R]):
    """``await handoff(arg)`` runs ``function(arg)`` in ``executor``; calls made in the same
    turn of the event loop share a hand-over. Create it inside the running event loop."""

    def __init__(self, function: Callable[[_A], _R], executor: Executor, threads: int) -> None:
        self._function = function
        self._executor = executor
        self._threads = max(1, threads)
        self._loop = asyncio.get_running_loop()
        self._waiting: list[tuple[_A, asyncio.Future[_R]]] = []

    async def __call__(self, arg: _A) -> _R:
        future: asyncio.Future[_R] = self._loop.create_future()
        if not self._waiting:
            self._loop.call_soon(self._dispatch)  # after the other workers of this turn
        self._waiting.append((arg, future))
        return await future

    def _dispatch(self) -> None:
        waiting, self._waiting = self._waiting, []
        waiting = [(arg, future) for arg, future in waiting if not future.cancelled()]
        if not waiting:
            return
        # As many chunks as threads (so they all work), none longer than _CHUNK.
        size = min(_CHUNK, -(-len(waiting) // self._threads))
        for start in range(0, len(waiting), size):
            chunk = waiting[start : start + size]
            try:
                self._executor.submit(self._run, chunk)
            except RuntimeError as exc:  # the executor is shut down: the run is ending
                for _, future in chunk:
                    if not future.done():
                        future.set_exception(exc)

    def _run(self, chunk: list[tuple[_A, asyncio.Future[_R]]]) -> None:
        """In a pool thread: every call of the chunk, then one hand-back to the loop."""
        outcomes: list[tuple[asyncio.Future[_R], _R | None, BaseException | None]] = []
        for arg, future in chunk:
            if future.cancelled():
                continue
            try:
                outcomes.append((future, self._function(arg), None))
            except Exception as exc:  # delivered to its caller, like run_in_executor does
                outcomes.append((future, None, exc))
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(_deliver, outcomes)


def _deliver(outcomes: list[tuple[asyncio.Future[_R], _R | None, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.done():
            continue  # its caller was cancelled meanwhile
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

"""BatchedHandoff: calls made in one turn of the event loop share a hand-over to the pool."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from batchclassify.handoff import BatchedHandoff


class CountingPool(ThreadPoolExecutor):
    """A real thread pool that counts hand-overs."""

    def __init__(self, workers: int) -> None:
        super().__init__(max_workers=workers)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def square_off_loop(n: int) -> tuple[int, bool]:
    if n < 0:
        raise ValueError(f"negative: {n}")
    return n * n, threading.current_thread() is threading.main_thread()


async def test_each_caller_gets_its_own_result_with_few_hand_overs() -> None:
    with CountingPool(2) as pool:
        handoff = BatchedHandoff(square_off_loop, pool, threads=2)
        results = await asyncio.gather(*(handoff(n) for n in range(200)))
    assert [value for value, _ in results] == [n * n for n in range(200)]
    assert not any(on_main for _, on_main in results)  # never on the event loop's thread
    assert pool.submitted <= 8  # 200 calls of one turn: chunks of 32, not 200 hand-overs


async def test_an_error_goes_to_its_caller_only() -> None:
    with ThreadPoolExecutor(2) as pool:
        handoff = BatchedHandoff(square_off_loop, pool, threads=2)
        outcomes = await asyncio.gather(*(handoff(n) for n in (1, -2, 3)), return_exceptions=True)
    assert outcomes[0] == (1, False) and outcomes[2] == (9, False)
    assert isinstance(outcomes[1], ValueError) and "negative: -2" in str(outcomes[1])


async def test_a_cancelled_caller_does_not_hold_up_the_others() -> None:
    with ThreadPoolExecutor(1) as pool:
        handoff = BatchedHandoff(square_off_loop, pool, threads=1)
        doomed = asyncio.ensure_future(handoff(5))
        kept = asyncio.ensure_future(handoff(6))
        await asyncio.sleep(0)
        doomed.cancel()
        assert await kept == (36, False)
        with pytest.raises(asyncio.CancelledError):
            await doomed


async def test_a_shut_down_pool_fails_the_calls_instead_of_hanging() -> None:
    pool = ThreadPoolExecutor(1)
    handoff = BatchedHandoff(square_off_loop, pool, threads=1)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(handoff(2), 5)

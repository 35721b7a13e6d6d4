"""Throttle: the shared pacing, cooldown and outage gate, driven directly in a real event loop."""

from __future__ import annotations

import asyncio
import math

import pytest

from batchclassify.errors import RunAborted
from batchclassify.throttle import Throttle, ThrottleOptions


async def test_unlimited_until_the_server_pushes_back() -> None:
    throttle = Throttle()
    assert throttle.rate == math.inf
    for _ in range(20):
        throttle.success(await throttle.acquire())
    assert throttle.rate == math.inf


async def test_429_cuts_rate_below_measured_success_rate_once_per_congestion() -> None:
    throttle = Throttle(ThrottleOptions(window=1.0, decrease=0.5))
    tickets = []
    for _ in range(40):
        ticket = await throttle.acquire()
        tickets.append(ticket)
        throttle.success(ticket)
    throttle.failure(tickets[-1], status=429, retry_after=None)
    assert throttle.rate == pytest.approx(20.0)  # 40 successes in the 1 s window, halved
    # a second 429 for a request sent before the cut does not cut again
    throttle.failure(tickets[-2], status=429, retry_after=None)
    assert throttle.cuts == 1 and throttle.throttled == 2
    # but one sent after the cut does
    throttle.failure(await throttle.acquire(), status=429, retry_after=None)
    assert throttle.cuts == 2


async def test_successes_raise_the_rate_additively() -> None:
    throttle = Throttle(ThrottleOptions(min_rate=5.0))
    throttle.failure(await throttle.acquire(), status=429, retry_after=None)
    low = throttle.rate
    for _ in range(10):
        throttle.success(0.0)
    assert low < throttle.rate < low + 1.0


async def test_paced_sends_are_spaced() -> None:
    throttle = Throttle(ThrottleOptions(min_rate=20.0))
    throttle.failure(await throttle.acquire(), status=429, retry_after=None)
    rate = throttle.rate
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(6):
        await throttle.acquire()
    assert loop.time() - start >= 5 / rate * 0.9


async def test_retry_after_pauses_every_worker() -> None:
    throttle = Throttle(ThrottleOptions(adaptive=False))
    loop = asyncio.get_running_loop()
    throttle.failure(await throttle.acquire(), status=503, retry_after=0.3)
    start = loop.time()
    await asyncio.gather(*(throttle.acquire() for _ in range(5)))
    assert loop.time() - start >= 0.29
    assert throttle.rate == math.inf  # adaptive off: no cut


async def test_fixed_rate_ceiling() -> None:
    throttle = Throttle(ThrottleOptions(rate=20.0))
    loop = asyncio.get_running_loop()
    for _ in range(20):  # the first second's burst
        await throttle.acquire()
    start = loop.time()
    for _ in range(5):
        await throttle.acquire()
    assert loop.time() - start >= 0.2


async def test_outage_gate_lets_one_probe_through_and_reopens_on_success() -> None:
    throttle = Throttle(ThrottleOptions(outage_after=3, first_probe_delay=0.05))
    for _ in range(3):
        throttle.failure(await throttle.acquire(), status=None, retry_after=None)
    assert throttle.in_outage
    probe = asyncio.create_task(throttle.acquire())
    others = [asyncio.create_task(throttle.acquire()) for _ in range(3)]
    ticket = await asyncio.wait_for(probe, 2)
    await asyncio.sleep(0.2)
    assert not any(task.done() for task in others)  # held while the probe is out
    throttle.success(ticket)
    await asyncio.wait_for(asyncio.gather(*others), 2)
    assert not throttle.in_outage


async def test_429s_do_not_count_as_an_outage() -> None:
    throttle = Throttle(ThrottleOptions(outage_after=2, adaptive=False))
    for _ in range(5):
        throttle.failure(await throttle.acquire(), status=429, retry_after=None)
    assert not throttle.in_outage


async def test_long_outage_aborts() -> None:
    throttle = Throttle(ThrottleOptions(outage_after=1, max_outage=0.2, first_probe_delay=0.05))
    throttle.failure(await throttle.acquire(), status=502, retry_after=None)
    with pytest.raises(RunAborted, match="unreachable"):
        for _ in range(100):
            ticket = await asyncio.wait_for(throttle.acquire(), 2)
            throttle.failure(ticket, status=None, retry_after=None)


async def test_a_429_before_any_success_halves_the_send_rate() -> None:
    """429s come back faster than answers: the first cut may see no success at all."""
    throttle = Throttle()
    tickets = [await throttle.acquire() for _ in range(20)]
    throttle.failure(tickets[0], status=429, retry_after=None)
    # 20 sent over (at least) a second, halved, then the usual 0.85 cut
    assert throttle.rate == pytest.approx(20 * 0.5 * 0.85)


async def test_a_quiet_second_jumps_halfway_back_to_the_rate_that_drew_the_429() -> None:
    throttle = Throttle(ThrottleOptions(min_rate=10.0))
    tickets = [await throttle.acquire() for _ in range(40)]
    throttle.failure(tickets[-1], status=429, retry_after=None)
    low = throttle.rate  # half the send rate x 0.85: nothing had succeeded yet
    await asyncio.sleep(1.05)
    throttle.success(await throttle.acquire())
    assert throttle.rate == pytest.approx((low + 40) / 2, rel=0.1)


async def test_memory_of_past_requests_is_bounded() -> None:
    throttle = Throttle(ThrottleOptions(window=0.05))
    for n in range(2000):
        throttle.success(await throttle.acquire())
        if n == 1000:
            await asyncio.sleep(0.06)
    # Only the last window's worth is remembered, however long the run.
    assert len(throttle._ok_times) <= 1000
    assert len(throttle._sent_times) <= 1000

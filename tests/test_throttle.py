"""Throttle: the shared pacing, cooldown and outage gate, driven directly in a real event loop."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable

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


# --- giving up: no progress for max_outage seconds ------------------------------------------

#: slack for the event loop's timers on a loaded machine
SLACK = 0.5


async def _fail_forever(
    throttle: Throttle, *, status: int | None, retry_after: float | None, reason: str | None
) -> None:
    """A worker against a server that never answers well: the same calls as the client makes
    (acquire, report, back off through the throttle), bounded so a bug cannot hang the test."""
    for _ in range(1000):
        ticket = await throttle.acquire()
        throttle.failure(ticket, status=status, retry_after=retry_after, reason=reason)
        await throttle.sleep(retry_after or 0.01)


async def _time_to_abort(*workers: Awaitable[None]) -> tuple[float, RunAborted]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(RunAborted) as caught:
        await asyncio.wait_for(asyncio.gather(*workers), 10)
    return loop.time() - start, caught.value


async def test_a_429_storm_with_a_long_retry_after_aborts_at_max_outage() -> None:
    """429s never close the outage gate, and Retry-After asked for 300 s: the workers, asleep
    in the cooldown or in their backoff, still stop at max_outage."""
    throttle = Throttle(ThrottleOptions(max_outage=0.5))
    elapsed, error = await _time_to_abort(
        *(
            _fail_forever(throttle, status=429, retry_after=300.0, reason="HTTP 429")
            for _ in range(4)
        )
    )
    assert 0.45 <= elapsed < 0.5 + SLACK
    assert not throttle.in_outage  # the abort did not come from the outage gate
    assert "last: HTTP 429" in str(error) and "--max-outage" in str(error)
    assert "unreachable" in str(error)


async def test_mixed_503s_and_timeouts_abort_on_time() -> None:
    """Fast failures of every kind close the outage gate, whose probes go out at growing
    intervals (the first after 0.5 s): the workers held there stop at the deadline."""
    throttle = Throttle(ThrottleOptions(max_outage=0.6, outage_after=4, adaptive=False))
    elapsed, error = await _time_to_abort(
        _fail_forever(throttle, status=503, retry_after=None, reason="HTTP 503"),
        _fail_forever(throttle, status=None, retry_after=None, reason="timeout"),
        _fail_forever(throttle, status=None, retry_after=None, reason="connection"),
        _fail_forever(throttle, status=502, retry_after=None, reason=None),
    )
    assert 0.55 <= elapsed < 0.6 + SLACK
    assert throttle.in_outage
    assert re.search(r"last: (HTTP 50[23]|timeout|connection)\)", str(error)), str(error)


async def test_pacing_at_the_floor_rate_ends_at_the_deadline() -> None:
    """A 503 cuts the adaptive rate to well under one send a second: the next send's wait is
    cut short by the deadline."""
    throttle = Throttle(ThrottleOptions(max_outage=0.3))
    loop = asyncio.get_running_loop()
    throttle.failure(await throttle.acquire(), status=503, retry_after=None)
    assert 1 / throttle.rate > 1.0
    start = loop.time()
    with pytest.raises(RunAborted):
        await asyncio.wait_for(throttle.acquire(), 5)
    assert loop.time() - start < 0.3 + SLACK


async def test_the_message_names_the_last_failure_even_without_a_reason() -> None:
    throttle = Throttle(ThrottleOptions(max_outage=0.1))
    throttle.failure(await throttle.acquire(), status=None, retry_after=None)
    await asyncio.sleep(0.15)
    with pytest.raises(RunAborted, match="last: timeout or connection error"):
        await throttle.acquire()
    throttle = Throttle(ThrottleOptions(max_outage=0.1))
    throttle.failure(await throttle.acquire(), status=504, retry_after=None)
    await asyncio.sleep(0.15)
    with pytest.raises(RunAborted, match=r"\(1 failed attempt; last: HTTP 504\)"):
        throttle.check()


async def test_a_success_resets_the_clock() -> None:
    throttle = Throttle(ThrottleOptions(max_outage=0.4, adaptive=False))
    loop = asyncio.get_running_loop()
    throttle.failure(await throttle.acquire(), status=503, retry_after=None)
    first = throttle.deadline
    assert first is not None and first <= loop.time() + 0.4
    await asyncio.sleep(0.3)
    throttle.success(await throttle.acquire())
    assert throttle.deadline is None
    throttle.failure(await throttle.acquire(), status=503, retry_after=None)
    await asyncio.sleep(0.3)  # 0.6 s since the first failure, 0.3 s since the success
    throttle.check()
    await throttle.acquire()
    await asyncio.sleep(0.15)
    with pytest.raises(RunAborted):
        await throttle.acquire()


async def test_an_idle_throttle_never_aborts() -> None:
    throttle = Throttle(ThrottleOptions(max_outage=0.1))
    await asyncio.sleep(0.2)  # nothing sent yet: slow input, say
    throttle.success(await throttle.acquire())
    await asyncio.sleep(0.2)  # idle after a success
    assert throttle.deadline is None
    # A failure now counts from its own send, not from the success 0.2 s ago.
    ticket = await throttle.acquire()
    throttle.failure(ticket, status=None, retry_after=None)
    assert throttle.deadline == pytest.approx(ticket + 0.1)
    await throttle.acquire()


async def test_time_a_failed_request_was_in_flight_counts() -> None:
    """A request that hung and timed out is time without progress: the clock starts at its
    send, so a timeout longer than max_outage aborts at the next call."""
    throttle = Throttle(ThrottleOptions(max_outage=0.2))
    ticket = await throttle.acquire()
    await asyncio.sleep(0.3)  # the request "hangs"
    throttle.failure(ticket, status=None, retry_after=None, reason="timeout")
    with pytest.raises(RunAborted, match="last: timeout"):
        await throttle.acquire()


async def test_a_stall_that_begins_while_waiting_still_wakes_the_waiters() -> None:
    """A worker that started a long wait while no deadline existed (a cooldown outliving the
    success that reset the clock, a backoff) is woken when a new stall begins."""
    throttle = Throttle(ThrottleOptions(max_outage=0.3, adaptive=False))
    loop = asyncio.get_running_loop()
    in_flight = await throttle.acquire()
    throttle.failure(await throttle.acquire(), status=429, retry_after=300.0)
    throttle.success(in_flight)  # progress: no deadline, but the 300 s cooldown stands
    assert throttle.deadline is None
    waiters = [asyncio.create_task(throttle.acquire()), asyncio.create_task(throttle.sleep(300))]
    await asyncio.sleep(0.1)
    start = loop.time()
    throttle.failure(loop.time(), status=None, retry_after=None)
    for waiter in waiters:
        with pytest.raises(RunAborted):
            await asyncio.wait_for(waiter, 5)
    assert loop.time() - start < 0.3 + SLACK


async def test_the_abort_is_final() -> None:
    throttle = Throttle(ThrottleOptions(max_outage=0.05))
    in_flight = await throttle.acquire()
    throttle.failure(await throttle.acquire(), status=503, retry_after=None)
    await asyncio.sleep(0.1)
    with pytest.raises(RunAborted):
        await throttle.acquire()
    throttle.success(in_flight)  # a straggler answering does not revive a stopped run
    with pytest.raises(RunAborted):
        await throttle.acquire()
    with pytest.raises(RunAborted):
        await throttle.sleep(0)


async def test_without_max_outage_failures_never_abort() -> None:
    throttle = Throttle(
        ThrottleOptions(max_outage=None, outage_after=3, first_probe_delay=0.1, adaptive=False)
    )
    for status in (429, 503, None, 502):
        throttle.failure(await throttle.acquire(), status=status, retry_after=0.01)
    assert throttle.in_outage and throttle.deadline is None
    await asyncio.sleep(0.05)
    await throttle.sleep(0.05)
    await asyncio.wait_for(throttle.acquire(), 2)  # the gate's probe still goes out


async def test_the_rate_ceiling_wait_ends_at_the_deadline() -> None:
    throttle = Throttle(ThrottleOptions(rate=2.0, max_outage=0.2, adaptive=False))
    loop = asyncio.get_running_loop()
    for _ in range(2):  # the bucket's burst
        throttle.failure(await throttle.acquire(), status=None, retry_after=None)
    start = loop.time()
    with pytest.raises(RunAborted):
        for _ in range(10):
            await asyncio.wait_for(throttle.acquire(), 5)
    assert loop.time() - start < 0.2 + SLACK


async def test_a_rate_below_one_per_second_spaces_sends() -> None:
    throttle = Throttle(ThrottleOptions(rate=4.0 / 5))  # a bucket of 0.8 could hold no request
    loop = asyncio.get_running_loop()
    await throttle.acquire()
    start = loop.time()
    await throttle.acquire()
    assert 1.2 <= loop.time() - start < 1.25 + SLACK

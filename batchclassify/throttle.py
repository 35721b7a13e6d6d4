"""How fast the run may send: a fixed ceiling, an adaptive rate, a shared cooldown, an outage gate.

Every attempt passes :meth:`Throttle.acquire` before it is sent and reports back how it went:

- ``--rate R`` is a hard ceiling, enforced by :class:`aiolimiter.AsyncLimiter`.
- Adaptive control (on by default) starts unlimited and reacts to the server: a 429 or 503 cuts
  the allowed rate to a fraction of the success rate just measured (multiplicative decrease) and
  every success raises it a little (additive increase), so the run settles just under whatever
  limit the server enforces without the user having to know it. aiolimiter's rate is fixed at
  construction, so the adaptive part is a small pacer of its own that spaces sends ``1/rate``
  apart.
- ``Retry-After`` on a 429/503 pauses *all* workers until then (a shared cooldown), not just the
  one that got it.
- When the server looks down (many consecutive connection errors, timeouts or 5xx with no
  success in between) the gate closes: workers wait instead of burning their retries, and one
  probe request at a time is let through with growing intervals until one succeeds. If the outage
  lasts longer than ``max_outage`` seconds the run is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from batchclassify.errors import RunAborted

__all__ = ["Throttle", "ThrottleOptions"]

log = logging.getLogger("batchclassify")


@dataclass(frozen=True, slots=True, kw_only=True)
class ThrottleOptions:
    rate: float | None = None
    adaptive: bool = True
    #: consecutive failures (no success between) that mean "the server is down"
    outage_after: int = 16
    #: give up when the server has been down for this long (seconds); ``None`` waits forever
    max_outage: float | None = 600.0
    #: the adaptive rate never drops below this (requests/s)
    min_rate: float = 0.2
    #: multiplicative decrease applied to the measured success rate on a 429/503
    decrease: float = 0.85
    #: additive increase per second of successes, as a fraction of the rate set at the last cut
    increase: float = 0.1
    #: window over which the success rate is measured (seconds)
    window: float = 2.0
    first_probe_delay: float = 0.5
    max_probe_delay: float = 15.0


class Throttle:
    """Shared by every worker of one run; create it inside the running event loop."""

    def __init__(self, options: ThrottleOptions | None = None) -> None:
        self.options = options or ThrottleOptions()
        rate = self.options.rate
        self._ceiling = AsyncLimiter(rate, 1.0) if rate else None
        self._loop = asyncio.get_running_loop()
        self._rate = math.inf
        self._rate_at_cut = math.inf
        self._rate_at_push = math.inf
        self._last_jump = -math.inf
        self._next_slot = 0.0
        self._last_cut = -math.inf
        self._resume_at = 0.0
        # Times of recent successes and sends, at most `window` seconds' worth.
        self._ok_times: deque[float] = deque()
        self._sent_times: deque[float] = deque()
        self._consecutive_failures = 0
        self._outage_since: float | None = None
        self._gate_open = asyncio.Event()
        self._gate_open.set()
        self._probe_in_flight = False
        self._probe_delay = self.options.first_probe_delay
        self._next_probe = 0.0
        self.throttled = 0
        self.cuts = 0

    @property
    def rate(self) -> float:
        """The adaptive rate in requests/s (``inf`` while the server has not pushed back)."""
        return self._rate

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    async def acquire(self) -> float:
        """Wait until one more request may be sent; returns a ticket (the send time) to hand
        back to :meth:`success`, :meth:`failure` or :meth:`release`."""
        await self._pass_gate()
        # A loop, not one sleep: another 429 may push the cooldown further while we wait.
        while (delay := self._resume_at - self._loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)
        await self._pace()
        if self._ceiling is not None:
            await self._ceiling.acquire()
        now = self._loop.time()
        _record(self._sent_times, now, self.options.window)
        return now

    async def _pace(self) -> None:
        """Space sends ``1/rate`` apart. No slot is reserved ahead: a waiter re-checks after its
        sleep, so a cut made meanwhile applies to it at once (reserved slots at the old spacing
        would overrun the server right after it pushed back)."""
        while self._rate != math.inf:
            now = self._loop.time()
            if now >= self._next_slot:
                interval = 1.0 / self._rate
                # Keep the lost sleep overshoot (a ms or so), but never bank idle time as a burst.
                base = self._next_slot if now - self._next_slot < interval else now
                self._next_slot = base + interval
                return
            await asyncio.sleep(self._next_slot - now)

    def success(self, ticket: float) -> None:
        now = self._loop.time()
        _record(self._ok_times, now, self.options.window)
        self._consecutive_failures = 0
        if self._outage_since is not None:
            self._end_outage()
        if self._rate != math.inf and self.options.adaptive:
            self._raise_rate(now)

    def failure(self, ticket: float, *, status: int | None, retry_after: float | None) -> None:
        """Report a transient failure: ``status`` is the HTTP status, ``None`` for a timeout or
        a connection error."""
        now = self._loop.time()
        self._probe_in_flight = False
        if retry_after:
            self._resume_at = max(self._resume_at, now + retry_after)
        if status in (429, 503):
            self.throttled += 1
            if self.options.adaptive and ticket >= self._last_cut:
                # Requests sent before the last cut were already paid for by that cut.
                self._cut(now)
        if status != 429:
            # A 429 means the server is up and busy; everything else here may mean it is down.
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.options.outage_after:
                self._begin_outage(now)
        if self._outage_since is not None:
            self._next_probe = now + self._probe_delay
            self._probe_delay = min(self._probe_delay * 2, self.options.max_probe_delay)

    def release(self) -> None:
        """An acquired slot was not used for a request with an outcome (e.g. cancelled)."""
        self._probe_in_flight = False

    # --- adaptive rate ---------------------------------------------------------------------

    def _raise_rate(self, now: float) -> None:
        """After a quiet second, jump halfway back to the rate that drew the last 429 (a cut
        may well have undershot: the first one is measured on a fraction of a second); close
        to it, probe upwards additively, by ``increase`` x that rate per second."""
        high = self._rate_at_push
        if self._rate < 0.95 * high and now - max(self._last_cut, self._last_jump) >= 1.0:
            self._rate = (self._rate + high) / 2
            self._last_jump = now
            return
        self._rate += self.options.increase * min(high, self._rate_at_cut * 2) / self._rate

    def _cut(self, now: float) -> None:
        window = self.options.window
        _record(self._ok_times, None, window, now=now)
        _record(self._sent_times, None, window, now=now)
        if len(self._ok_times) >= _MIN_SAMPLES:
            # Successes per second lately: what the server let through while we pushed.
            base = _per_second(self._ok_times, now, window)
        else:
            # Too few successes to measure (429s come back faster than answers, so the first
            # one often arrives before any success): halve what we were sending instead.
            base = max(_per_second(self._sent_times, now, window), 1.0) * 0.5
        # What we were sending when the server pushed back: an upper bound of its limit.
        sent = _per_second(self._sent_times, now, window)
        self._rate_at_push = min(self._rate, max(sent, base))
        self._rate = max(self.options.min_rate, min(self._rate, base) * self.options.decrease)
        self._rate_at_cut = self._rate
        self._last_cut = now
        self._next_slot = now + 1.0 / self._rate
        self.cuts += 1
        log.info("the server pushed back: sending at most %.1f requests/s now", self._rate)

    # --- outage gate -----------------------------------------------------------------------

    def _begin_outage(self, now: float) -> None:
        if self._outage_since is None:
            log.warning(
                "%d requests in a row failed: the server looks down; pausing and probing",
                self._consecutive_failures,
            )
            self._outage_since = now
            self._gate_open.clear()
            self._next_probe = now + self._probe_delay

    def _end_outage(self) -> None:
        log.warning("the server answers again: resuming")
        self._outage_since = None
        self._probe_in_flight = False
        self._probe_delay = self.options.first_probe_delay
        self._gate_open.set()

    async def _pass_gate(self) -> None:
        while self._outage_since is not None:
            limit = self.options.max_outage
            now = self._loop.time()
            if limit is not None and now - self._outage_since > limit:
                raise RunAborted(
                    f"the server has been unreachable or failing for over {limit:.0f} s; "
                    "stopping (check the endpoint, or raise --max-outage)"
                )
            if not self._probe_in_flight and now >= self._next_probe:
                self._probe_in_flight = True
                return
            wait = max(self._next_probe - now, 0.05)
            if limit is not None:
                wait = min(wait, max(self._outage_since + limit - now, 0.0) + 0.01)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._gate_open.wait(), timeout=wait)


#: successes in the window needed before their rate is trusted as the server's
_MIN_SAMPLES = 5


def _record(times: deque[float], event: float | None, window: float, *, now: float = 0.0) -> None:
    """Append ``event`` (if given) and forget what is older than ``window`` seconds, so the
    deque never holds more than a window's worth however long the run."""
    if event is not None:
        times.append(event)
        now = event
    while times and times[0] < now - window:
        times.popleft()


def _per_second(times: deque[float], now: float, window: float) -> float:
    """Events per second over the window; over at least a second, so that the burst a token
    bucket grants at the start does not pass for its sustained rate."""
    if not times:
        return 0.0
    span = max(min(window, now - times[0]), 1.0)
    return len(times) / span

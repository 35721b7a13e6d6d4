"""How fast the run may send: a fixed ceiling, an adaptive rate, a shared cooldown, an outage gate,
and when to give up.

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
  probe request at a time is let through with growing intervals until one succeeds.
- No progress for ``max_outage`` seconds aborts the run (:class:`RunAborted`), whatever the
  failures were: 429s (which never close the gate: the server is up), 5xx, timeouts, dropped
  connections. The clock starts with the first failed attempt after the last success -- at the
  time that attempt was sent, so a hung request's wait counts, but never before that success or
  the start of the run; a run that has not failed since its last success (idle, say, waiting on
  slow input) never aborts. The abort is on time: every wait in :meth:`~Throttle.acquire` (gate,
  cooldown, pacing, ceiling) ends at the deadline, however long ``Retry-After`` asked for, and
  :meth:`~Throttle.sleep` is the same bounded wait for the retry backoff between attempts, which
  happens outside the throttle. Only a request already on the wire is not interrupted: it ends
  by its own timeout, and the next call into the throttle raises.
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
    #: abort when no request has succeeded for this long (seconds) after one failed, whatever
    #: the failures; ``None`` waits forever
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
        self._ceiling: AsyncLimiter | None = None
        if rate:
            # A bucket must hold at least one request: below 1/s, one per 1/rate seconds.
            self._ceiling = AsyncLimiter(rate, 1.0) if rate >= 1 else AsyncLimiter(1, 1.0 / rate)
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
        self._probe_in_flight = False
        self._probe_delay = self.options.first_probe_delay
        self._next_probe = 0.0
        self.throttled = 0
        self.cuts = 0
        # Progress: the last success, or the start of the run. The abort clock runs from
        # `_stalled_since` (None while nothing has failed since that progress).
        self._last_progress = self._loop.time()
        self._stalled_since: float | None = None
        self._failed_attempts = 0
        self._last_error = ""
        self._abort_message: str | None = None
        # Set (and replaced by a fresh one) when waiters must re-check at once: a stall began, so
        # a deadline now bounds their wait; the gate opened; the run was aborted.
        self._changed = asyncio.Event()

    @property
    def rate(self) -> float:
        """The adaptive rate in requests/s (``inf`` while the server has not pushed back)."""
        return self._rate

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    @property
    def deadline(self) -> float | None:
        """Event-loop time (``loop.time()``) at which the run aborts unless a request succeeds
        first; ``None`` while nothing has failed since the last success (or without
        ``max_outage``)."""
        limit = self.options.max_outage
        if limit is None or self._stalled_since is None:
            return None
        return self._stalled_since + limit

    def check(self) -> None:
        """Raise :class:`RunAborted` if the run has made no progress for ``max_outage`` seconds.
        Once raised, it is raised on every later call (by every worker): the run is over even if
        a straggling request succeeds afterwards."""
        if self._abort_message is None:
            deadline = self.deadline
            if deadline is None or self._loop.time() < deadline:
                return
            self._abort()
        assert self._abort_message is not None
        # A fresh exception per raise: one instance raised in many tasks would pile up tracebacks.
        raise RunAborted(self._abort_message)

    async def sleep(self, seconds: float) -> None:
        """``asyncio.sleep`` for the backoff between attempts: it raises :class:`RunAborted` at
        the deadline instead of sleeping through it (a 300 s ``Retry-After`` must not hold the
        abort back). Meant as tenacity's ``sleep=``."""
        end = self._loop.time() + seconds
        self.check()
        if seconds <= 0:
            await asyncio.sleep(0)  # as asyncio.sleep(0) does: let the other tasks run
            return
        while self._loop.time() < end:
            await self._wait(end)

    async def acquire(self) -> float:
        """Wait until one more request may be sent; returns a ticket (the send time) to hand
        back to :meth:`success`, :meth:`failure` or :meth:`release`. Raises
        :class:`RunAborted` once the run has made no progress for ``max_outage`` seconds."""
        self.check()
        await self._pass_gate()
        # A loop, not one wait: another 429 may push the cooldown further while we wait.
        while self._loop.time() < self._resume_at:
            await self._wait(self._resume_at)
        await self._pace()
        if self._ceiling is not None:
            await self._take_ceiling(self._ceiling)
        now = self._loop.time()
        _record(self._sent_times, now, self.options.window)
        return now

    async def _wait(self, until: float) -> None:
        """Wait until loop time ``until`` or the deadline, whichever is first, or until woken by
        a change (the caller re-checks its condition and calls again); raise
        :class:`RunAborted` once the deadline has passed."""
        self.check()
        deadline = self.deadline
        delay = (until if deadline is None else min(until, deadline)) - self._loop.time()
        if delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), delay)
        self.check()

    async def _take_ceiling(self, ceiling: AsyncLimiter) -> None:
        """The ``--rate`` ceiling's wait, cut short at the deadline (a low ``--rate`` spaces
        sends far apart)."""
        while (deadline := self.deadline) is not None:
            try:
                await asyncio.wait_for(ceiling.acquire(), max(deadline - self._loop.time(), 0.0))
                return
            except asyncio.TimeoutError:
                self.check()  # the timer may fire a hair early: then wait again
        await ceiling.acquire()

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
            await self._wait(self._next_slot)

    def success(self, ticket: float) -> None:
        now = self._loop.time()
        _record(self._ok_times, now, self.options.window)
        self._last_progress = now
        self._stalled_since = None
        self._failed_attempts = 0
        self._consecutive_failures = 0
        if self._outage_since is not None:
            self._end_outage()
        if self._rate != math.inf and self.options.adaptive:
            self._raise_rate(now)

    def failure(
        self,
        ticket: float,
        *,
        status: int | None,
        retry_after: float | None,
        reason: str | None = None,
    ) -> None:
        """Report a transient failure: ``status`` is the HTTP status, ``None`` for a timeout or
        a connection error; ``reason`` a few words for the abort message (``"HTTP 429"``,
        ``"timeout"``), derived from ``status`` when not given."""
        now = self._loop.time()
        self._failed_attempts += 1
        self._last_error = _describe(status, reason)
        if self._stalled_since is None:
            # Nothing has succeeded since this attempt was sent: count from then (a hung
            # request's wait is time without progress), but not from before the last success or
            # the start of the run -- a failure ends no progress made before it.
            self._stalled_since = min(now, max(ticket, self._last_progress))
            self._notify()  # waiters are now bounded by a deadline: let them recompute
        self._probe_in_flight = False
        if retry_after:
            self._resume_at = max(self._resume_at, now + retry_after)
        if status in (429, 503):
            self.throttled += 1
            if self.options.adaptive and ticket >= self._last_cut:
                # Requests sent before the last cut were already paid for by that cut.
                self._cut(now)
        if status is None or (status >= 500 and status != 429):
            # No answer or a 5xx may mean the server is down; a 429 or a garbled 200 mean it
            # is up (the no-progress deadline still ends a run that never gets anywhere).
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
                "%d requests in a row failed (last: %s): the server looks down; pausing and "
                "probing",
                self._consecutive_failures,
                self._last_error,
            )
            self._outage_since = now
            self._next_probe = now + self._probe_delay

    def _end_outage(self) -> None:
        log.warning("the server answers again: resuming")
        self._outage_since = None
        self._probe_in_flight = False
        self._probe_delay = self.options.first_probe_delay
        self._notify()

    async def _pass_gate(self) -> None:
        # The abort is not decided here: the outage began after the stall did, and every wait
        # (this one included) ends at the stall's deadline.
        while self._outage_since is not None:
            now = self._loop.time()
            if not self._probe_in_flight and now >= self._next_probe:
                self._probe_in_flight = True
                return
            # At least every 50 ms: the probe's failure frees its slot without waking anyone.
            await self._wait(max(self._next_probe, now + 0.05))

    # --- giving up -------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every waiter so it re-checks: each holds the event it is waiting on, and later
        waiters get the fresh one."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _abort(self) -> None:
        limit = self.options.max_outage
        assert limit is not None
        failed = self._failed_attempts
        # Not logged here: whoever catches RunAborted shows it (the CLI prints it once).
        self._abort_message = (
            f"no request has succeeded for over {limit:g} s ({failed} failed "
            f"attempt{'' if failed == 1 else 's'}; last: {self._last_error}): the server is "
            "unreachable, failing or refusing every request. Stopping: check the endpoint, the "
            "service's status and your rate limits, or raise --max-outage"
        )
        self._notify()


#: successes in the window needed before their rate is trusted as the server's
_MIN_SAMPLES = 5
#: longest failure description kept for the abort message
_REASON_LIMIT = 120


def _describe(status: int | None, reason: str | None) -> str:
    """A short, one-line name for a failure: the caller's words, else one from the status."""
    if reason:
        return " ".join(reason.split())[:_REASON_LIMIT]
    if status is None:
        return "timeout or connection error"
    if status == 200:
        return "unusable answer (HTTP 200)"
    return f"HTTP {status}"


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

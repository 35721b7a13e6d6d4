"""Hedged requests (``--hedge-after SECONDS|auto``): when a classify request is still pending
after a delay, the same request is sent once more and the first answer wins.

Against a long latency tail (the hosted API: p50 180 ms, p99 5.6 s) a run spends much of its
time waiting on a few slow requests; a second copy of a request that is already slow usually
comes back long before the first. Every copy is a request the service may bill, so:

- the delay is fixed (``--hedge-after 2``), or with ``auto`` the :attr:`HedgeOptions.quantile`
  (p95) of the latencies of recent successful requests, never below :attr:`HedgeOptions.floor`;
  ``auto`` hedges nothing until it has :attr:`HedgeOptions.min_samples` latencies;
- whatever the delay, at most :attr:`HedgeOptions.budget` of the requests are hedged (a token
  bucket: each request sent adds ``budget`` of a token, a hedge takes a whole one), so a server
  that slows down as a whole does not get twice the load.

A request that lost the race is cancelled. Its time so far is kept as a latency sample (a
lower bound of its latency): leaving the slow ones out would pull the p95 down, and with it the
delay, in a spiral the budget would then have to stop.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["HedgeOptions", "Hedger", "parse_hedge_after"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeOptions:
    """``after``: the delay in seconds, or ``None`` for ``auto``."""

    after: float | None = None
    quantile: float = 0.95
    #: the latencies ``auto`` looks at: this many recent ones
    window: int = 1000
    min_samples: int = 50
    #: ``auto`` never hedges sooner than this (seconds)
    floor: float = 0.05
    #: at most this fraction of requests is hedged
    budget: float = 0.05
    #: hedges that may go out back to back once the budget has saved up
    burst: float = 10.0

    def __post_init__(self) -> None:
        if self.after is not None and not (math.isfinite(self.after) and self.after >= 0):
            raise ValueError("the hedge delay must be a number of seconds >= 0")
        if not 0 < self.quantile < 1:
            raise ValueError("quantile must be between 0 and 1")
        if not 0 <= self.budget <= 1:
            raise ValueError("budget must be a fraction between 0 and 1")
        if self.window < 1 or self.min_samples < 1 or self.burst < 1:
            raise ValueError("window, min_samples and burst must be at least 1")


def parse_hedge_after(text: str) -> HedgeOptions | None:
    """``"auto"``, ``"2.5"`` (seconds) or ``"off"``/``"0"``... -> options (``None``: off)."""
    value = text.strip().lower()
    if value in ("", "off", "none", "no", "0"):
        return None
    if value == "auto":
        return HedgeOptions()
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"must be a number of seconds, auto or off, got {text!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"must be a number of seconds, auto or off, got {text!r}")
    if seconds == 0:
        return None
    return HedgeOptions(after=seconds)


#: ``auto`` recomputes its delay after this many new samples (a sort of the window each time)
_REFRESH_EVERY = 32


class Hedger:
    """When to hedge, and whether the budget allows it; counts hedges sent and won."""

    def __init__(self, options: HedgeOptions) -> None:
        self.options = options
        self._samples: deque[float] = deque(maxlen=options.window)
        self._delay: float | None = options.after
        self._fresh = 0
        # Full at the start: the first requests of a run all go out at once, and those that
        # hit the tail then are the ones a run waits on longest.
        self._tokens = options.burst
        #: start times of the requests still pending, by ticket
        self._pending: dict[int, float] = {}
        self._tickets = 0
        self.sent = 0
        self.won = 0

    @property
    def delay(self) -> float | None:
        """Seconds to wait before hedging; ``None`` while ``auto`` has too few samples."""
        return self._delay

    def started(self, now: float) -> int:
        """A request (not a hedge) is sent at ``now``: the budget grows by its share. Returns
        its ticket for :meth:`observe`."""
        self._tokens = min(self._tokens + self.options.budget, self.options.burst)
        self._tickets += 1
        self._pending[self._tickets] = now
        return self._tickets

    def take(self) -> bool:
        """Whether one more hedge may go out now (and if so, count it)."""
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        self.sent += 1
        return True

    def forget(self, ticket: int) -> None:
        """The request of ``ticket`` failed: it is no longer pending, and says nothing of the
        latency."""
        self._pending.pop(ticket, None)

    def observe(self, ticket: int, now: float) -> None:
        """The request of ``ticket`` answered at ``now`` (or lost the race: its time so far is a
        lower bound of its latency)."""
        started = self._pending.pop(ticket, None)
        if self.options.after is not None or started is None:
            return
        self._samples.append(now - started)
        self._fresh += 1
        if self._fresh >= _REFRESH_EVERY and len(self._samples) >= self.options.min_samples:
            self._fresh = 0
            # Requests still pending count with their time so far (a lower bound): the first
            # answers of a run are its fastest, and a quantile of those alone would start
            # hedging far too early, spending the budget before the slowest ones come due.
            waited = [now - t for t in self._pending.values()]
            ordered = sorted([*self._samples, *waited])
            rank = min(len(ordered) - 1, int(self.options.quantile * len(ordered)))
            self._delay = max(ordered[rank], self.options.floor)

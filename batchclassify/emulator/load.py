"""Simulated load: long-tail latency draws and the token bucket behind the 429 rate limit."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

__all__ = ["TokenBucket", "sample_latency"]

# z-score of the 99th percentile of a standard normal: sigma of a log-normal from its p99
_Z99 = 2.3263478740408408


def sample_latency(rng: random.Random, median_ms: float, p99_ms: float | None) -> float:
    """One latency draw in **seconds**: constant ``median_ms``, or log-normal with that median
    and ``p99_ms`` as its 99th percentile (the shape of the hosted service's tail)."""
    if median_ms <= 0:
        return 0.0
    if p99_ms is None or p99_ms <= median_ms:
        return median_ms / 1000.0
    sigma = math.log(p99_ms / median_ms) / _Z99
    return rng.lognormvariate(math.log(median_ms), sigma) / 1000.0


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` stored.

    Non-blocking on purpose: a server answers 429 at once rather than queueing.
    """

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def try_acquire(self) -> bool:
        """Take one token if there is one; False means "answer 429"."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def refill(self) -> None:
        self._tokens = self.burst
        self._last = self._clock()

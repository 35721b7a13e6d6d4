"""Which failures are worth another attempt, and how long to wait before it.

The classification follows the status table of PROTOCOL.md: 429 and 5xx, timeouts, dropped
connections and unusable 200 bodies are transient; 400 and 413 condemn the item; 401, 402, 403,
404, 410, 422, 423, 501 and 507 condemn the whole run. The wait is exponential backoff with
full jitter (tenacity's ``wait_random_exponential``), never shorter than what the server asked
for in ``Retry-After``.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

from tenacity import RetryCallState, wait_random_exponential

from batchclassify.errors import (
    ApiError,
    FatalApiError,
    ItemRejectedError,
    RequestError,
    TransientApiError,
    TransportError,
)

__all__ = [
    "FATAL_STATUSES",
    "ITEM_STATUSES",
    "TRANSIENT_STATUSES",
    "RetryPolicy",
    "error_for_status",
    "is_throttle",
    "is_transient",
    "parse_retry_after",
    "wait_honouring_retry_after",
]

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
ITEM_STATUSES = frozenset({400, 413, 415})
#: 410 gone, 501 no runtime for the model, 507 model too big: these never recover either
FATAL_STATUSES = frozenset({401, 402, 403, 404, 410, 422, 423, 501, 507})
#: a server asking for more than this is treated as asking for this much (a sane upper bound)
MAX_RETRY_AFTER = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """``attempts`` in all (first try included); waits of ``initial * 2**n`` seconds at most,
    each drawn uniformly from zero (full jitter) and capped at ``max_wait``."""

    attempts: int = 8
    initial: float = 0.5
    max_wait: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.initial < 0 or self.max_wait < 0:
            raise ValueError("waits cannot be negative")


def error_for_status(status: int, message: str, *, retry_after: float | None = None) -> ApiError:
    """The exception that stands for an HTTP error ``status``."""
    if status in FATAL_STATUSES:
        return FatalApiError(message, http_status=status, retry_after=retry_after)
    if status in TRANSIENT_STATUSES or status >= 500:
        return TransientApiError(message, http_status=status, retry_after=retry_after)
    if status in ITEM_STATUSES or 400 <= status < 500:
        # An unknown 4xx is about this request, not the server's health: do not hammer it.
        return ItemRejectedError(message, http_status=status, retry_after=retry_after)
    return TransientApiError(message, http_status=status, retry_after=retry_after)


def is_transient(exc: BaseException) -> bool:
    """True when another attempt at the same request may succeed."""
    return isinstance(exc, (TransportError, TransientApiError))


def is_throttle(exc: BaseException) -> bool:
    """True when the server said to slow down (429, or 503 "not ready")."""
    return isinstance(exc, RequestError) and exc.http_status in (429, 503)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class wait_honouring_retry_after(wait_random_exponential):
    """Full-jitter exponential backoff, but never less than the server's ``Retry-After``."""

    def __call__(self, retry_state: RetryCallState) -> float:
        jittered = super().__call__(retry_state)
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return max(jittered, float(retry_after))
        return jittered

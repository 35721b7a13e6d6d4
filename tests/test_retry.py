"""Retry classification and waits (pure functions: no network needed here; the client's use of
them is tested over real HTTP in test_client.py)."""

from __future__ import annotations

import email.utils
import time

import pytest
from tenacity import RetryCallState, Retrying

from batchclassify.errors import (
    FatalApiError,
    ItemRejectedError,
    RequestTimeout,
    TransientApiError,
    TransportError,
)
from batchclassify.retry import (
    RetryPolicy,
    error_for_status,
    is_throttle,
    is_transient,
    parse_retry_after,
    wait_honouring_retry_after,
)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ItemRejectedError),
        (413, ItemRejectedError),
        (418, ItemRejectedError),
        (401, FatalApiError),
        (402, FatalApiError),
        (403, FatalApiError),
        (404, FatalApiError),
        (422, FatalApiError),
        (423, FatalApiError),
        (429, TransientApiError),
        (500, TransientApiError),
        (502, TransientApiError),
        (503, TransientApiError),
        (504, TransientApiError),
        (599, TransientApiError),
    ],
)
def test_status_table(status: int, kind: type) -> None:
    error = error_for_status(status, "m")
    assert type(error) is kind
    assert error.http_status == status
    assert is_transient(error) == (kind is TransientApiError)


def test_transport_errors_are_transient_and_throttle_is_429_or_503() -> None:
    assert is_transient(TransportError("reset"))
    assert is_transient(RequestTimeout("slow"))
    assert not is_transient(ValueError())
    assert is_throttle(error_for_status(429, "m"))
    assert is_throttle(error_for_status(503, "m"))
    assert not is_throttle(error_for_status(500, "m"))


def test_parse_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("99999") == 300.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(10, abs=1.01)
    past = email.utils.formatdate(now - 100, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


def test_wait_is_full_jitter_capped_and_floored_by_retry_after() -> None:
    wait = wait_honouring_retry_after(multiplier=0.5, max=4)
    retrying = Retrying()

    def state(attempt: int, exc: BaseException) -> RetryCallState:
        call = RetryCallState(retrying, fn=None, args=(), kwargs={})
        call.attempt_number = attempt
        call.set_exception((type(exc), exc, None))
        return call

    plain = [wait(state(6, TransportError("x"))) for _ in range(200)]
    assert all(0 <= w <= 4 for w in plain)
    assert max(plain) > 2 and min(plain) < 2  # jittered over the whole range
    told = error_for_status(503, "m", retry_after=7.0)
    assert all(wait(state(1, told)) >= 7.0 for _ in range(50))


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)

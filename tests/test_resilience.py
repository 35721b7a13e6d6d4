"""Fault injection over real HTTP: retries, throttling, outages, timeouts, redaction."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
from conftest import StartEmulator
from helpers import emulator_stats, make_image

from batchclassify import ClientOptions, PipelineOptions, Result, RunAborted, iter_results, run
from batchclassify.emulator import EmulatorConfig, running_emulator
from batchclassify.errors import EndpointError
from batchclassify.retry import RetryPolicy
from batchclassify.throttle import ThrottleOptions

KEY = "sekret-key-123456"


def make_files(root: Path, count: int) -> list[Path]:
    return [make_image(root / f"{n:04d}.png", seed=n, size=(24, 24)) for n in range(count)]


def client(url: str, **changes: object) -> ClientOptions:
    base: dict[str, object] = {
        "endpoint": url,
        "model": "demo",
        "version": 1,
        "api_key": KEY,
        "concurrency": 8,
        "timeout": 0.5,
        "connect_timeout": 0.5,
        "retry": RetryPolicy(attempts=15, initial=0.01, max_wait=0.1),
    }
    base.update(changes)
    return ClientOptions(**base)  # type: ignore[arg-type]


async def test_every_item_survives_a_hostile_server(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(
        fail_rate=0.30, reset_rate=0.05, hang_rate=0.02, garbage_rate=0.02, seed=4
    )
    files = make_files(tmp_path / "in", 150)
    out = tmp_path / "out.jsonl"
    # A larger outage threshold: with ~40% of attempts failing, runs of failures are normal.
    options = PipelineOptions(
        client=client(url), throttle=ThrottleOptions(outage_after=30, adaptive=False)
    )
    stats = await run([str(tmp_path / "in")], options, outputs=[str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["source"] for r in records) == sorted(map(str, files))
    assert all(r["status"] == "ok" for r in records), [r for r in records if r["status"] != "ok"]
    assert stats.ok == 150
    served = await emulator_stats(url)
    assert served["requests"] > 150  # faults really happened and were retried
    assert max(r["attempts"] for r in records) > 1
    assert served["distinct_images"] == 150


async def test_adaptive_rate_settles_under_the_server_limit(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    limit, count = 80.0, 400
    url = await start_emulator(rate_limit=limit)
    make_files(tmp_path / "in", count)
    # The default concurrency: the round in flight when the first 429 comes back (at most C
    # requests, sent before anything was known) is the bulk of the 429s a run ever sees.
    options = PipelineOptions(client=client(url, concurrency=8, timeout=5.0))
    started = time.monotonic()
    results = [r async for r in iter_results([str(tmp_path / "in")], options)]
    elapsed = time.monotonic() - started
    assert all(r.ok for r in results) and len(results) == count
    served = await emulator_stats(url)
    throttled = served["by_status"].get("429", 0)
    # The bucket starts full (limit tokens), so the sustained part is (count - limit) requests.
    assert (count - limit) / elapsed >= 0.85 * limit, elapsed
    assert throttled / served["requests"] < 0.05, served


async def test_retry_after_is_honoured(tmp_path: Path, start_emulator: StartEmulator) -> None:
    url = await start_emulator(rate_limit=1.0, rate_limit_burst=1, rate_limit_retry_after=1)
    make_files(tmp_path / "in", 3)
    options = PipelineOptions(
        client=client(url, concurrency=3, timeout=5.0), throttle=ThrottleOptions(adaptive=False)
    )
    started = time.monotonic()
    results = [r async for r in iter_results([str(tmp_path / "in")], options)]
    assert all(r.ok for r in results)
    # Three requests through a 1/s bucket honouring Retry-After: 1 take about two seconds, and
    # the shared cooldown keeps the 429s to the ones sent before the first answer came back.
    assert time.monotonic() - started >= 1.9
    served = await emulator_stats(url)
    assert served["by_status"].get("429", 0) <= 4


async def test_a_port_nobody_listens_on_stops_the_run_at_once(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 30)
    # Nothing listens on port 1 of loopback: every connection is refused at once. Before any
    # answer that is a wrong --endpoint, not an outage worth waiting out.
    options = PipelineOptions(client=client("http://127.0.0.1:1", concurrency=4))
    started = time.monotonic()
    with pytest.raises(EndpointError, match="refuses connections") as caught:
        [r async for r in iter_results([str(tmp_path / "in")], options)]
    assert "Check --endpoint" in str(caught.value)
    assert time.monotonic() - started < 5


async def test_a_server_that_goes_away_mid_run_pauses_then_aborts(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 60)
    results: list[Result] = []
    async with contextlib.AsyncExitStack() as server:
        url = await server.enter_async_context(running_emulator(EmulatorConfig(latency_ms=20)))
        options = PipelineOptions(
            client=client(url, concurrency=4),
            throttle=ThrottleOptions(outage_after=4, max_outage=1.0, first_probe_delay=0.1),
        )
        started = time.monotonic()
        with pytest.raises(RunAborted, match="no request has succeeded") as caught:
            async for result in iter_results([str(tmp_path / "in")], options):
                results.append(result)
                if len(results) == 5:
                    await server.aclose()  # the server is gone: refused from now on
    assert not isinstance(caught.value, EndpointError)  # it answered before: an outage
    assert time.monotonic() - started < 10


async def test_hung_server_times_out_and_fails_the_item(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(hang_rate=1.0)
    make_files(tmp_path / "in", 2)
    options = PipelineOptions(
        client=client(url, concurrency=2, timeout=0.3, retry=RetryPolicy(attempts=2, initial=0)),
        throttle=ThrottleOptions(adaptive=False),
    )
    started = time.monotonic()
    results = [r async for r in iter_results([str(tmp_path / "in")], options)]
    assert time.monotonic() - started < 5
    assert [r.error.type for r in results if r.error] == ["timeout", "timeout"]
    assert all(r.attempts == 2 for r in results)


async def test_garbage_bodies_are_retried_then_reported(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(garbage_rate=1.0)
    make_files(tmp_path / "in", 1)
    options = PipelineOptions(
        client=client(url, retry=RetryPolicy(attempts=3, initial=0)),
        throttle=ThrottleOptions(adaptive=False),
    )
    [result] = [r async for r in iter_results([str(tmp_path / "in")], options)]
    assert result.status == "error" and result.error is not None
    assert "malformed" in result.error.message or "no predictions" in result.error.message
    assert result.attempts == 3


async def test_key_never_appears_in_errors(tmp_path: Path, start_emulator: StartEmulator) -> None:
    url = await start_emulator(reset_rate=1.0)
    make_files(tmp_path / "in", 2)
    options = PipelineOptions(
        client=client(url, retry=RetryPolicy(attempts=2, initial=0)),
        throttle=ThrottleOptions(adaptive=False),
    )
    out = tmp_path / "out.jsonl"
    await run([str(tmp_path / "in")], options, outputs=[str(out)])
    text = out.read_text()
    assert '"connection"' in text
    assert KEY not in text and "api_key=" + KEY not in text


async def test_a_429_storm_aborts_after_max_outage(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    """429s never close the outage gate; they still may not go on for ever. The first request
    passes (a bucket of one), then one token per 100 s: no progress after that."""
    url = await start_emulator(rate_limit=0.01, rate_limit_burst=1, rate_limit_retry_after=2)
    make_files(tmp_path / "in", 20)
    options = PipelineOptions(
        client=client(url, concurrency=4), throttle=ThrottleOptions(max_outage=1.0)
    )
    started = time.monotonic()
    results = []
    with pytest.raises(RunAborted, match=r"last: HTTP 429.*--max-outage"):
        async for result in iter_results([str(tmp_path / "in")], options):
            results.append(result)
    # max_outage, plus at most the 2 s Retry-After a client without a bounded backoff sleeps
    # through, plus slack for a loaded machine
    assert time.monotonic() - started < 10
    assert [r.ok for r in results] == [True]
    served = await emulator_stats(url)
    assert served["by_status"].get("429", 0) >= 1


async def test_a_5xx_storm_aborts_on_time(tmp_path: Path, start_emulator: StartEmulator) -> None:
    url = await start_emulator(fail_rate=1.0, seed=3)
    make_files(tmp_path / "in", 20)
    options = PipelineOptions(
        client=client(url, concurrency=4), throttle=ThrottleOptions(max_outage=1.0)
    )
    started = time.monotonic()
    with pytest.raises(RunAborted, match=r"last: HTTP 50\d"):
        [r async for r in iter_results([str(tmp_path / "in")], options)]
    # max_outage + the 1 s Retry-After of the emulator's 503s + slack
    assert time.monotonic() - started < 10

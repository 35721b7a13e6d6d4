"""Hedged requests (``--hedge-after``): one row per item whoever wins, the budget, the delay
estimate, and how hedges count. Real servers on 127.0.0.1; no timed speed assertions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import StartEmulator
from helpers import image_bytes, make_image, read_jsonl, run_cli
from hostile import HostileServer

from batchclassify import ClientOptions, PipelineOptions, run
from batchclassify.client import ClassifyClient
from batchclassify.config import RunSettings
from batchclassify.errors import ConfigError, ItemRejectedError
from batchclassify.hedge import HedgeOptions, Hedger, parse_hedge_after
from batchclassify.retry import RetryPolicy
from batchclassify.throttle import Throttle, ThrottleOptions

KEY = "hedge-secret-key-13579"


def options(*urls: str, hedge: HedgeOptions | None, **changes: object) -> ClientOptions:
    base: dict[str, object] = {
        "endpoints": urls,
        "model": "demo",
        "version": 1,
        "api_key": KEY,
        "concurrency": 8,
        "timeout": 10.0,
        "retry": RetryPolicy(attempts=3, initial=0.01, max_wait=0.05),
        "hedge": hedge,
    }
    base.update(changes)
    return ClientOptions(**base)  # type: ignore[arg-type]


# --- the delay and the budget (no network) ---------------------------------------------------


def observe(hedger: Hedger, seconds: float) -> None:
    """One request that took ``seconds``."""
    hedger.observe(hedger.started(100.0), 100.0 + seconds)


def test_auto_waits_for_enough_latencies_then_follows_their_p95() -> None:
    hedger = Hedger(HedgeOptions(min_samples=50))
    for n in range(49):
        observe(hedger, 0.1 + n / 1000)
    assert hedger.delay is None  # too few samples: no hedging yet
    for n in range(51):
        observe(hedger, 0.2 if n < 45 else 3.0)
    assert hedger.delay is not None and 0.2 <= hedger.delay <= 3.0
    for _ in range(1000):
        observe(hedger, 0.5)
    assert hedger.delay == 0.5


def test_auto_never_hedges_sooner_than_its_floor() -> None:
    hedger = Hedger(HedgeOptions(floor=0.25))
    for _ in range(200):
        observe(hedger, 0.001)
    assert hedger.delay == 0.25


def test_a_fixed_delay_ignores_the_latencies() -> None:
    hedger = Hedger(HedgeOptions(after=1.5))
    for _ in range(200):
        observe(hedger, 0.01)
    assert hedger.delay == 1.5


def test_the_budget_caps_hedges_at_a_fraction_of_requests() -> None:
    hedger = Hedger(HedgeOptions(after=0.1, budget=0.05, burst=10))
    taken = 0
    for n in range(1000):
        hedger.started(float(n))
        taken += hedger.take()  # every request would like a hedge
    # The bucket starts full (the run's first wave is the one most likely to hit the tail).
    assert 45 <= taken <= 10 + 0.05 * 1000


def test_requests_still_pending_raise_the_delay_of_auto() -> None:
    # A run's first wave: 64 requests at once. 31 answer within 100 ms, the 32nd at 0.8 s,
    # when auto first computes its delay; the 32 others are still pending then. The p95 of
    # the answers alone would be under 0.1 s and hedge all 32 at once, spending the budget on
    # requests that were merely slowish rather than on the run's worst.
    hedger = Hedger(HedgeOptions(min_samples=32))
    tickets = [hedger.started(0.0) for _ in range(64)]
    for n, ticket in enumerate(tickets[:31]):
        hedger.observe(ticket, 0.05 + n / 1000)
    assert hedger.delay is None
    hedger.observe(tickets[31], 0.8)
    assert hedger.delay is not None and hedger.delay >= 0.8  # the pending count, at 0.8 s
    hedger.forget(tickets[40])  # a request that failed: no longer pending, no sample


def test_parsing_hedge_after() -> None:
    assert parse_hedge_after("auto") == HedgeOptions()
    assert parse_hedge_after("2.5") == HedgeOptions(after=2.5)
    assert parse_hedge_after("off") is None
    assert parse_hedge_after("0") is None  # 0 seconds: off
    assert RunSettings(hedge_after="off").hedge_options() is None
    assert RunSettings(hedge_after=0.0).hedge_options() is None
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ValueError):
            parse_hedge_after(bad)
    assert RunSettings(hedge_after="auto").hedge_options() == HedgeOptions()
    assert RunSettings(hedge_after=3.0).hedge_options() == HedgeOptions(after=3.0)
    assert RunSettings().hedge_options() is None
    with pytest.raises(ConfigError, match="--hedge-after"):
        RunSettings(hedge_after="later")
    with pytest.raises(ConfigError, match="--hedge-after"):
        RunSettings(hedge_after=-2.0)


async def test_off_on_the_command_line_wins_over_a_config_file(
    tmp_path: Path, emulator_url: str
) -> None:
    make_image(tmp_path / "in" / "a.png", seed=1, size=(24, 24))
    config = tmp_path / "job.toml"
    config.write_text('hedge_after = "auto"\n')
    code, stdout, stderr = await run_cli(
        "config",
        "show",
        "--config",
        str(config),
        "--hedge-after",
        "off",
        "--model",
        "demo/1",
        env={"ROBOFLOW_API_KEY": KEY},
    )
    assert code == 0, stderr
    assert 'hedge_after = "off"  # command line' in stdout


# --- over the network -----------------------------------------------------------------------


async def test_a_slow_first_copy_loses_to_its_hedge(hostile_server: HostileServer) -> None:
    hostile_server.slow_seconds = 5.0
    # Every second request is slow: the first classify is fast, the second one's first copy
    # is slow and its hedge (request 3) fast.
    endpoint = hostile_server.url("slow", every=2)
    async with ClassifyClient(options(endpoint, hedge=HedgeOptions(after=0.2))) as client:
        fast = await client.classify(data=image_bytes())
        hedged = await client.classify(data=image_bytes())
        assert (fast.attempts, hedged.attempts) == (1, 1)  # a hedge is not another attempt
        assert hedged.answer.top == "cat"
        assert (client.hedges_sent, client.hedges_won) == (1, 1)
        assert client.requests_sent == 3  # hedges count as requests sent
    assert hostile_server.requests["slow"] == 3
    assert hostile_server.hostile_answers["slow"] == 1  # the slow copy was started, and lost


async def test_a_hedged_item_gives_one_row_and_the_hedge_goes_to_another_server(
    tmp_path: Path, hostile_server: HostileServer, emulator_url: str
) -> None:
    hostile_server.slow_seconds = 5.0
    slow = hostile_server.url("slow", every=1)  # this server is always slow
    image = make_image(tmp_path / "in" / "one.jpg", seed=3)
    out = tmp_path / "out.jsonl"
    pipeline = PipelineOptions(
        client=options(slow, emulator_url, hedge=HedgeOptions(after=0.2), concurrency=1),
        dedup=False,
    )
    stats = await run([str(image)], pipeline, outputs=[str(out)])
    rows = read_jsonl(out)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["attempts"] == 1
    assert (stats.hedged, stats.hedges_won) == (1, 1)
    assert stats.requests_sent == 2
    assert stats.endpoints[slow]["requests"] == 1
    assert stats.endpoints[emulator_url]["requests"] == 1
    assert "1 hedged, 1 won" in stats.format()


async def test_a_request_sent_before_auto_knew_its_delay_is_hedged_once_it_does(
    hostile_server: HostileServer, emulator_url: str
) -> None:
    hostile_server.slow_seconds = 5.0
    slow = hostile_server.url("slow", every=1)
    async with ClassifyClient(
        options(slow, emulator_url, hedge=HedgeOptions(min_samples=8), concurrency=4)
    ) as client:
        # The run's first request: to the first server (the slow one), with no delay known.
        first = asyncio.ensure_future(client.classify(data=image_bytes(seed=0)))
        await asyncio.sleep(0.05)
        # Fast answers from the emulator (the least busy server) teach auto its delay.
        for n in range(40):
            await client.classify(data=image_bytes(seed=n + 1))
        response = await first
    assert response.answer.top and response.attempts == 1
    # Its hedge went to the emulator and won; the slow copy was dropped (it never finished).
    assert (client.hedges_sent, client.hedges_won) == (1, 1)
    assert hostile_server.requests["slow"] == 1


async def test_hedges_respect_the_budget(hostile_server: HostileServer) -> None:
    hostile_server.slow_seconds = 0.3
    endpoint = hostile_server.url("slow", every=1)  # every copy is slow: each wants a hedge
    hedge = HedgeOptions(after=0.01, budget=0.1, burst=1)
    async with ClassifyClient(options(endpoint, hedge=hedge, concurrency=40)) as client:
        responses = await asyncio.gather(*(client.classify(data=image_bytes()) for _ in range(40)))
        assert all(response.answer.top == "cat" for response in responses)
        assert 1 <= client.hedges_sent <= 1 + 0.1 * 40
        assert client.requests_sent == 40 + client.hedges_sent
    assert hostile_server.requests["slow"] == 40 + client.hedges_sent


async def test_hedges_go_through_the_throttle(start_emulator: StartEmulator) -> None:
    url = await start_emulator(latency_ms=300)
    throttle = Throttle(ThrottleOptions(rate=5))  # a hard ceiling: 5 requests per second
    hedge = HedgeOptions(after=0.05, budget=1.0, burst=1000)
    loop = asyncio.get_running_loop()
    async with ClassifyClient(options(url, hedge=hedge), throttle=throttle) as client:
        started = loop.time()
        await asyncio.gather(*(client.classify(data=image_bytes(seed=n)) for n in range(4)))
        elapsed = loop.time() - started
        sent = client.requests_sent
    assert client.hedges_sent >= 1 and sent == 4 + client.hedges_sent
    # aiolimiter lets a second's worth through at once, then 5 per second: the ceiling held.
    assert sent <= 5 + 5 * elapsed + 1


async def test_when_both_copies_fail_the_item_fails_once(hostile_server: HostileServer) -> None:
    hostile_server.slow_seconds = 0.3
    # A zero delay: the hedge goes out at once, and both copies get the 400.
    endpoint = hostile_server.url("status-400", every=1)
    async with ClassifyClient(options(endpoint, hedge=HedgeOptions(after=0.0))) as client:
        with pytest.raises(ItemRejectedError) as caught:
            await client.classify(data=image_bytes())
        assert client.hedges_sent == 1 and client.hedges_won == 0
    assert caught.value.attempts == 1  # not retried: the item is bad, whichever copy said so
    assert hostile_server.requests["status-400"] == 2
    assert KEY not in str(caught.value)


async def test_auto_hedging_on_the_command_line(tmp_path: Path, emulator_url: str) -> None:
    for n in range(8):
        make_image(tmp_path / "in" / f"{n}.png", seed=n, size=(24, 24))
    out = tmp_path / "out.jsonl"
    code, _, stderr = await run_cli(
        "run",
        str(tmp_path / "in"),
        "--model",
        "demo/1",
        "--endpoint",
        emulator_url,
        "--hedge-after",
        "auto",
        "--out",
        str(out),
        env={"ROBOFLOW_API_KEY": KEY},
    )
    assert code == 0, stderr
    assert len(read_jsonl(out)) == 8
    assert KEY not in stderr
    code, _, stderr = await run_cli(
        "run", str(tmp_path / "in"), "--model", "demo/1", "--hedge-after", "soon", "--emulate"
    )
    assert code == 2 and "--hedge-after" in stderr

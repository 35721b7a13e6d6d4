"""Tests for the emulator's GPU model (``gpu_slots``, ``--gpu-slots``), over real HTTP on
127.0.0.1. Durations are only checked from below: the GPU model guarantees a minimum."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import ServeBytes, StartEmulator
from helpers import (
    FORM_CONTENT_TYPE,
    b64,
    emulator_stats,
    image_bytes,
    reset_emulator,
    run_cli,
    start_cli,
)

from batchclassify import cli
from batchclassify.emulator import (
    LISTENING_PREFIX,
    VOLATILE_KEYS,
    EmulatorConfig,
    config_from_args,
    predict,
    running_emulator,
)
from batchclassify.emulator.gpu import FifoSlots
from batchclassify.errors import ConfigError

MODEL = "demo/1"
KEY = "k"
IMAGES = [image_bytes(seed=seed) for seed in range(8)]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def stable(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in VOLATILE_KEYS}


async def legacy(session: aiohttp.ClientSession, url: str, data: bytes) -> dict[str, Any]:
    """One image, base64 in the body of ``POST /demo/1``."""
    async with session.post(
        f"{url}/{MODEL}", params={"api_key": KEY}, data=b64(data), headers=FORM_CONTENT_TYPE
    ) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def infer(session: aiohttp.ClientSession, url: str, images: list[bytes] | bytes) -> Any:
    """``POST /infer/classification`` with a list of images, or one image (not in a list)."""
    refs: Any = (
        [{"type": "base64", "value": b64(d)} for d in images]
        if isinstance(images, list)
        else {"type": "base64", "value": b64(images)}
    )
    payload = {"model_id": MODEL, "api_key": KEY, "image": refs}
    async with session.post(f"{url}/infer/classification", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def gpu_stats(url: str) -> dict[str, Any]:
    gpu: dict[str, Any] = (await emulator_stats(url))["gpu"]
    return gpu


async def test_one_slot_runs_single_image_requests_one_after_another(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(gpu_slots=1, gpu_batch_latency_ms=40, gpu_per_image_ms=2)
    started = time.perf_counter()
    bodies = await asyncio.gather(*(legacy(session, url, data) for data in IMAGES))
    elapsed = time.perf_counter() - started
    assert elapsed >= 8 * 0.042  # one slot: the eight 42 ms runs cannot overlap
    # The GPU changes when answers come, never what they say.
    assert [stable(body) for body in bodies] == [stable(predict(data)) for data in IMAGES]
    gpu = await gpu_stats(url)
    assert (gpu["batches"], gpu["images"]) == (8, 8)
    assert gpu["busy_ms"] == pytest.approx(8 * 42)
    assert gpu["max_running"] == 1
    # All eight were sent at once, so some had to wait (7 at most: one holds the slot).
    assert 1 <= gpu["max_queue"] <= 7
    assert (gpu["running"], gpu["queued"]) == (0, 0)
    assert (gpu["slots"], gpu["batch_latency_ms"], gpu["per_image_ms"]) == (1, 40, 2)


async def test_a_list_on_the_json_route_is_one_batch(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(gpu_slots=1, gpu_batch_latency_ms=40, gpu_per_image_ms=2)
    started = time.perf_counter()
    bodies = await infer(session, url, IMAGES)
    assert time.perf_counter() - started >= 0.056
    assert [stable(body) for body in bodies] == [stable(predict(data)) for data in IMAGES]
    gpu = await gpu_stats(url)
    assert (gpu["batches"], gpu["images"], gpu["max_queue"]) == (1, 8, 0)
    assert gpu["busy_ms"] == pytest.approx(40 + 2 * 8)
    # One image not in a list is a batch of one.
    body = await infer(session, url, IMAGES[0])
    assert stable(body) == stable(predict(IMAGES[0]))
    gpu = await gpu_stats(url)
    assert (gpu["batches"], gpu["images"]) == (2, 9)
    assert gpu["busy_ms"] == pytest.approx(56 + 42)


async def test_every_form_of_the_legacy_route_is_one_image(
    start_emulator: StartEmulator, serve_bytes: ServeBytes, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(
        gpu_slots=2, gpu_batch_latency_ms=10, gpu_per_image_ms=5, allow_http_image_urls=True
    )
    files = await serve_bytes({"/a.jpg": IMAGES[1]})
    await legacy(session, url, IMAGES[0])
    form = aiohttp.FormData()
    form.add_field("file", IMAGES[2], filename="c.jpg", content_type="image/jpeg")
    async with session.post(f"{url}/{MODEL}", params={"api_key": KEY}, data=form) as resp:
        assert resp.status == 200
        assert stable(await resp.json()) == stable(predict(IMAGES[2]))
    image_query = {"api_key": KEY, "image": f"{files}/a.jpg"}
    for method in ("GET", "POST"):
        async with session.request(method, f"{url}/{MODEL}", params=image_query) as resp:
            assert resp.status == 200
            assert stable(await resp.json()) == stable(predict(IMAGES[1]))
    gpu = await gpu_stats(url)
    assert (gpu["batches"], gpu["images"]) == (4, 4)
    assert gpu["busy_ms"] == pytest.approx(4 * 15)


async def test_two_slots_run_two_requests_at_once(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    # Long runs, so that six requests sent together surely overlap on the server.
    url = await start_emulator(gpu_slots=2, gpu_batch_latency_ms=150, gpu_per_image_ms=0)
    started = time.perf_counter()
    await asyncio.gather(*(legacy(session, url, data) for data in IMAGES[:6]))
    assert time.perf_counter() - started >= 3 * 0.150  # six runs, two at a time
    gpu = await gpu_stats(url)
    assert (gpu["batches"], gpu["images"]) == (6, 6)
    assert gpu["busy_ms"] == pytest.approx(6 * 150)  # slot time: more than the wall time
    assert gpu["max_running"] == 2
    assert 1 <= gpu["max_queue"] <= 4  # two of the six never waited


async def test_network_latency_adds_to_gpu_time(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(
        latency_ms=100, gpu_slots=1, gpu_batch_latency_ms=80, gpu_per_image_ms=0
    )
    started = time.perf_counter()
    await legacy(session, url, IMAGES[0])
    assert time.perf_counter() - started >= 0.180
    assert (await gpu_stats(url))["busy_ms"] == pytest.approx(80)


async def test_defaults_once_the_gpu_is_on(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(gpu_slots=3)
    await infer(session, url, IMAGES[:4])
    gpu = await gpu_stats(url)
    assert (gpu["slots"], gpu["batch_latency_ms"], gpu["per_image_ms"]) == (3, 40, 2)
    assert gpu["busy_ms"] == pytest.approx(40 + 2 * 4)


async def test_without_the_gpu_option_stats_are_as_before(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    await legacy(session, emulator_url, IMAGES[0])
    stats = await emulator_stats(emulator_url)
    assert "gpu" not in stats
    assert stats["ok_requests"] == 1


async def test_injected_faults_do_not_use_the_gpu(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(fail_statuses={507: 1.0}, gpu_slots=1)
    async with session.post(
        f"{url}/{MODEL}", params={"api_key": KEY}, data=b64(IMAGES[0]), headers=FORM_CONTENT_TYPE
    ) as resp:
        assert resp.status == 507
    gpu = await gpu_stats(url)
    assert (gpu["batches"], gpu["images"], gpu["busy_ms"]) == (0, 0, 0)


async def test_reset_zeroes_the_gpu_counters(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(gpu_slots=1, gpu_batch_latency_ms=5, gpu_per_image_ms=1)
    await asyncio.gather(*(legacy(session, url, data) for data in IMAGES[:3]))
    assert (await gpu_stats(url))["batches"] == 3
    await reset_emulator(url)
    gpu = await gpu_stats(url)
    assert (gpu["busy_ms"], gpu["batches"], gpu["images"]) == (0, 0, 0)
    assert (gpu["max_queue"], gpu["max_running"]) == (0, 0)
    await legacy(session, url, IMAGES[0])
    gpu = await gpu_stats(url)
    assert (gpu["batches"], gpu["images"], gpu["max_running"]) == (1, 1, 1)
    assert gpu["busy_ms"] == pytest.approx(6)


async def test_shutdown_releases_requests_waiting_for_the_gpu(
    session: aiohttp.ClientSession,
) -> None:
    # Each run holds the one slot for a minute: only shutdown can end these requests soon.
    config = EmulatorConfig(gpu_slots=1, gpu_batch_latency_ms=60_000)
    async with running_emulator(config) as url:
        requests = [asyncio.create_task(legacy(session, url, data)) for data in IMAGES[:3]]
        for _ in range(200):
            gpu = await gpu_stats(url)
            if (gpu["running"], gpu["queued"]) == (1, 2):
                break
            await asyncio.sleep(0.02)
        assert (gpu["running"], gpu["queued"]) == (1, 2)
        started = time.monotonic()
    assert time.monotonic() - started < 5  # not the minute a run takes
    done, pending = await asyncio.wait(requests, timeout=5)
    assert not pending
    for task in done:  # answered during shutdown, or cut off with the connection
        if task.exception() is not None:
            assert isinstance(task.exception(), (aiohttp.ClientError, AssertionError))


# --- the slots themselves -----------------------------------------------------------------


async def test_slots_are_handed_out_in_arrival_order() -> None:
    slots = FifoSlots(1)
    order: list[int] = []

    async def worker(n: int) -> None:
        assert await slots.acquire()
        order.append(n)
        await asyncio.sleep(0)
        slots.release()

    assert await slots.acquire()
    tasks = []
    for n in range(6):
        tasks.append(asyncio.create_task(worker(n)))
        await asyncio.sleep(0)  # each queues before the next is created
    assert slots.waiting == 6
    # A newcomer that runs between the release and the first waiter's wake-up (it is
    # scheduled before that wake-up) must not take the freed slot.
    late = asyncio.create_task(worker(99))
    slots.release()
    await asyncio.gather(*tasks, late)
    assert order == [0, 1, 2, 3, 4, 5, 99]
    assert (slots.running, slots.waiting, slots.max_waiting, slots.max_running) == (0, 0, 6, 1)


async def test_a_cancelled_waiter_gives_up_its_place() -> None:
    slots = FifoSlots(1)
    assert await slots.acquire()
    first = asyncio.create_task(slots.acquire())
    second = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    assert slots.waiting == 1
    slots.release()
    assert await second
    assert slots.running == 1
    # Cancelled after being handed the slot: the slot is passed on, not lost.
    third = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # hands it to third...
    third.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await third
    assert (slots.running, slots.waiting) == (0, 0)
    assert await slots.acquire()


async def test_closing_the_slots_ends_every_wait() -> None:
    slots = FifoSlots(2)
    assert await slots.acquire() and await slots.acquire()
    waiters = [asyncio.create_task(slots.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    slots.close()
    assert await asyncio.gather(*waiters) == [False, False, False]
    assert not await slots.acquire()
    slots.release()
    slots.release()
    with pytest.raises(RuntimeError):
        slots.release()


# --- configuration and command line -------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"gpu_slots": 0}, "gpu_slots: must be an integer >= 1"),
        ({"gpu_slots": -2}, "gpu_slots: must be an integer >= 1"),
        ({"gpu_slots": True}, "gpu_slots"),
        ({"gpu_slots": 1.5}, "gpu_slots"),
        ({"gpu_slots": 1, "gpu_batch_latency_ms": -1.0}, "gpu_batch_latency_ms: must be"),
        ({"gpu_slots": 1, "gpu_per_image_ms": float("nan")}, "gpu_per_image_ms: must be"),
        ({"gpu_slots": 1, "gpu_per_image_ms": float("inf")}, "gpu_per_image_ms: must be"),
        ({"gpu_batch_latency_ms": 10.0}, "gpu_batch_latency_ms needs gpu_slots"),
        ({"gpu_per_image_ms": 0.0}, "gpu_per_image_ms needs gpu_slots"),
    ],
)
def test_config_refuses_bad_gpu_settings(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        EmulatorConfig(**options)


def test_config_from_args_with_gpu_options() -> None:
    argv = ["emulate", "--gpu-slots", "2", "--batch-latency-ms", "25", "--per-image-ms", "0.5"]
    config = config_from_args(cli.build_parser().parse_args(argv))
    assert (config.gpu_slots, config.gpu_batch_latency_ms, config.gpu_per_image_ms) == (2, 25, 0.5)
    config = config_from_args(cli.build_parser().parse_args(["emulate", "--gpu-slots", "1"]))
    assert (config.gpu_slots, config.gpu_batch_latency_ms, config.gpu_per_image_ms) == (
        1,
        None,
        None,
    )
    assert config_from_args(cli.build_parser().parse_args(["emulate"])).gpu_slots is None


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--gpu-slots", "0"], "argument --gpu-slots: must be >= 1"),
        (["--gpu-slots", "two"], "argument --gpu-slots: not an integer"),
        (["--gpu-slots", "1", "--batch-latency-ms", "-5"], "--batch-latency-ms: must be >= 0"),
        (["--gpu-slots", "1", "--per-image-ms", "inf"], "--per-image-ms: must be finite"),
        (["--batch-latency-ms", "5"], "--batch-latency-ms needs --gpu-slots"),
        (["--per-image-ms", "1"], "--per-image-ms needs --gpu-slots"),
    ],
)
def test_cli_refuses_bad_gpu_options(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["emulate", *argv])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_help_explains_the_gpu_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["emulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for text in ("--gpu-slots K", "--batch-latency-ms MS", "--per-image-ms MS", "first come"):
        assert text in out
    assert "default with --gpu-slots: 40" in out and "default with --gpu-slots: 2" in out


async def test_command_line_gpu_slots_zero_is_a_clear_error() -> None:
    code, out, err = await run_cli("emulate", "--port", "0", "--gpu-slots", "0", timeout=30)
    assert code == 2 and out == ""
    assert "error: argument --gpu-slots: must be >= 1, got '0'" in err
    assert "Traceback" not in err


async def test_command_line_serves_a_gpu(session: aiohttp.ClientSession) -> None:
    process = await start_cli("emulate", "--port", "0", "--gpu-slots", "1", "--per-image-ms", "3")
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert line.startswith(LISTENING_PREFIX), line
        url = line.removeprefix(LISTENING_PREFIX)
        await infer(session, url, IMAGES[:2])
        gpu = await gpu_stats(url)
        assert (gpu["slots"], gpu["batch_latency_ms"], gpu["per_image_ms"]) == (1, 40, 3)
        assert gpu["busy_ms"] == pytest.approx(46)
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

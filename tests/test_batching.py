"""``--batch-size``: several images per request to the self-hosted batch route, rows per image.
The real command against the emulator's ``/infer/classification`` route on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path

import pytest
from conftest import StartEmulator
from helpers import (
    emulator_stats,
    expected_answer,
    image_bytes,
    make_image,
    read_jsonl,
    run_cli,
)
from hostile import HostileServer

from batchclassify import Pipeline, PipelineOptions
from batchclassify.batching import Batcher, auto_batch_size
from batchclassify.client import ClassifyClient, ClientOptions, Response
from batchclassify.config import RunSettings
from batchclassify.errors import ConfigError, ItemRejectedError

KEY = "batch-key-5512093"
JSON_ROUTE = "/infer/classification"


async def cli(*args: str, key: str = KEY) -> tuple[int, str]:
    code, _, err = await run_cli(*args, env={"ROBOFLOW_API_KEY": key})
    return code, err


def dataset(root: Path, count: int, suffix: str = ".jpg") -> dict[str, bytes]:
    made = {}
    for n in range(count):
        path = make_image(root / f"{n:03d}{suffix}", seed=n, size=(24, 24))
        made[str(path)] = path.read_bytes()
    return made


def run_args(url: str, source: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(source), "--model", "demo/1", "--endpoint", url, "--out", str(out), *extra]


async def test_batches_give_one_row_per_image_with_its_own_answer(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(api_key=KEY)
    files = dataset(tmp_path / "in", 40)
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        *run_args(url, tmp_path / "in", out, "--batch-size", "8", "--concurrency", "16")
    )
    assert code == 0, stderr
    records = read_jsonl(out)
    assert sorted(r["source"] for r in records) == sorted(files)
    for record in records:
        expected = expected_answer(files[record["source"]])
        assert record["status"] == "ok" and record["top"] == expected["top"]
        assert record["attempts"] == 1
    stats = await emulator_stats(url)
    assert set(stats["by_route"]) == {JSON_ROUTE}  # never the one-image route
    assert 5 <= stats["requests"] <= 10  # batches of up to 8 (a few fill only partly)
    assert KEY not in stderr and KEY not in out.read_text()


async def test_a_batch_refused_for_one_image_is_split_to_find_it(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    # A server built without WebP support; the client reads WebP fine and sends it as it is.
    url = await start_emulator(refuse_formats={"webp"})
    files = dataset(tmp_path / "in", 15)
    webp = make_image(tmp_path / "in" / "odd.webp", seed=99, size=(24, 24))
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        *run_args(url, tmp_path / "in", out, "--batch-size", "16", "--concurrency", "16")
    )
    assert code == 1, stderr  # one failed image
    records = {r["source"]: r for r in read_jsonl(out)}
    assert sorted(records) == sorted([*files, str(webp)])
    bad = records[str(webp)]
    assert bad["status"] == "error" and bad["error"]["http_status"] == 400
    assert "cannot decode webp" in bad["error"]["message"]
    for source, data in files.items():
        assert records[source]["status"] == "ok"
        assert records[source]["top"] == expected_answer(data)["top"]
    # Every request that carried the WebP was refused, and only those: its attempts count them.
    assert (await emulator_stats(url))["by_status"]["400"] == bad["attempts"]


async def test_the_batcher_halves_a_refused_batch_down_to_the_bad_image(
    start_emulator: StartEmulator,
) -> None:
    url = await start_emulator(refuse_formats={"webp"})
    images = [image_bytes(seed=n, size=(24, 24)) for n in range(15)]
    images.insert(11, image_bytes(seed=99, size=(24, 24), fmt="WEBP"))
    options = ClientOptions(endpoint=url, model="demo", version=1, api_key=KEY, concurrency=16)
    async with ClassifyClient(options) as client:
        batcher = Batcher(client, 16)
        outcomes = await asyncio.gather(
            *(batcher.classify(base64.b64encode(data)) for data in images),
            return_exceptions=True,
        )
        await batcher.aclose()
    bad = outcomes.pop(11)
    assert isinstance(bad, ItemRejectedError) and bad.http_status == 400
    # Sent in the 16, then the halves of 8, 4, 2 and 1 that held it.
    assert bad.attempts == 5
    for data, outcome in zip(images[:11] + images[12:], outcomes, strict=True):
        assert isinstance(outcome, Response), outcome
        assert outcome.answer.top == expected_answer(data)["top"]
        assert outcome.attempts in (2, 3, 4, 5)  # the batch, then each half that held it
    assert batcher.batches == 9 and batcher.splits == 4
    stats = await emulator_stats(url)
    assert stats["requests"] == 9 and stats["by_status"]["400"] == 5


async def test_transient_failures_retry_the_batch_and_count_per_image(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(fail_statuses={503: 0.4}, seed=1)
    files = dataset(tmp_path / "in", 24)
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        *run_args(url, tmp_path / "in", out, "--batch-size", "3", "--concurrency", "6"),
        "--no-adaptive",
    )
    assert code == 0, stderr
    records = read_jsonl(out)
    assert sorted(r["source"] for r in records) == sorted(files)
    assert all(r["status"] == "ok" for r in records)
    stats = await emulator_stats(url)
    refused = stats["by_status"].get("503", 0)
    assert refused > 0, stats
    # Each refused request is one more attempt for each of the images it carried.
    assert sum(r["attempts"] for r in records) - len(records) >= refused


async def test_a_refused_key_on_the_batch_route_stops_the_run(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(api_key=KEY)
    dataset(tmp_path / "in", 20)
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        *run_args(url, tmp_path / "in", out, "--batch-size", "4"), key="not-the-key-9876"
    )
    assert code == 2, stderr
    assert "API key" in stderr and "not-the-key-9876" not in stderr
    assert (await emulator_stats(url))["requests"] <= 3


async def test_copies_in_batch_mode_cost_one_image_of_a_request(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    original = make_image(tmp_path / "in" / "a.jpg", seed=1, size=(24, 24))
    for n in range(9):
        shutil.copy(original, tmp_path / "in" / f"copy{n}.jpg")
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(*run_args(url, tmp_path / "in", out, "--batch-size", "4"))
    assert code == 0, stderr
    assert len(read_jsonl(out)) == 10
    stats = await emulator_stats(url, images=True)
    assert stats["requests"] == 1 and stats["distinct_images"] == 1


async def test_the_hosted_api_has_no_batch_route(tmp_path: Path) -> None:
    code, stderr = await cli(
        "run",
        str(tmp_path),
        "--model",
        "demo/1",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    assert code == 2
    assert "--batch-size needs a self-hosted" in stderr


def test_batch_size_settings() -> None:
    assert auto_batch_size(8) == 2 and auto_batch_size(64) == 16 and auto_batch_size(4096) == 32
    settings = RunSettings(
        model="demo/1",
        endpoint="http://127.0.0.1:9001",
        api_key=KEY,
        batch_size="auto",
        concurrency=64,
    )
    assert settings.pipeline_options().batch_size == 16
    assert auto_batch_size(1) == 1
    # Per process: 2 processes of 64 in flight each fill batches of 16, not 32.
    split = settings.updated(concurrency=128, processes=2)
    assert split.pipeline_options().batch_size == 16
    with pytest.raises(ConfigError, match="more than the 8 images in flight per process"):
        settings.updated(concurrency=8, batch_size=16).pipeline_options()
    for bad in (0, -2, "lots"):
        with pytest.raises(ConfigError, match="batch-size"):
            RunSettings(model="demo/1", batch_size=bad)  # type: ignore[arg-type]


async def test_an_abort_cancels_the_batches_in_flight(
    tmp_path: Path, hostile_server: HostileServer
) -> None:
    hostile_server.slow_seconds = 60.0  # a hung server: only an abort ends these batches
    for n in range(6):
        make_image(tmp_path / "in" / f"{n}.jpg", seed=n, size=(24, 24))
    client = ClientOptions(
        endpoint=hostile_server.url("slow"), model="demo", version=1, api_key=KEY, concurrency=6
    )
    pipeline = Pipeline([str(tmp_path / "in")], PipelineOptions(client=client, batch_size=3))
    results = pipeline.results()
    first = asyncio.ensure_future(anext(results))
    for _ in range(100):  # until both batches are on the server
        if hostile_server.requests["slow"] >= 2:
            break
        await asyncio.sleep(0.05)
    pipeline.abort()  # a second Ctrl-C
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(first, 10)  # not after the server's 60 s, nor the retries
    assert pipeline.taken == 6 and pipeline.dropped == 6


async def test_an_error_that_echoes_the_body_never_shows_a_piece_of_the_key() -> None:
    from aiohttp import web

    key = "k" * 40 + "SECRET-TAIL-7781"

    async def echo(request: web.Request) -> web.Response:
        body = await request.json()
        # A pydantic-style 422 quoting the request, the key 290 characters in: across the cut.
        detail = "x" * 270 + json.dumps({"input": {"api_key": body["api_key"]}})
        return web.json_response({"detail": detail}, status=422)

    app = web.Application()
    app.router.add_post("/infer/classification", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        options = ClientOptions(
            endpoint=f"http://127.0.0.1:{port}", model="demo", version=1, api_key=key
        )
        async with ClassifyClient(options) as client:
            with pytest.raises(Exception) as caught:
                await client.classify_batch([base64.b64encode(image_bytes())])
    finally:
        await runner.cleanup()
    text = str(caught.value)
    assert "HTTP 422" in text
    assert "kkkkk" not in text and "SECRET" not in text, text

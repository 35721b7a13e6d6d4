"""The pipeline end to end, in-process: real files, real HTTP to the emulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServeBytes, StartEmulator
from helpers import emulator_stats, expected_answer, image_bytes, make_image, read_jsonl

from batchclassify import (
    ClientOptions,
    Item,
    Pipeline,
    PipelineOptions,
    Result,
    RunAborted,
    iter_results,
    run,
)
from batchclassify.retry import RetryPolicy
from batchclassify.sinks import CSV_COLUMNS
from batchclassify.throttle import ThrottleOptions

KEY = "sekret-key-123456"


def options(url: str, **changes: object) -> PipelineOptions:
    client = {
        "endpoint": url,
        "model": "demo",
        "version": 1,
        "api_key": KEY,
        "concurrency": 8,
        "timeout": 5.0,
        "retry": RetryPolicy(attempts=3, initial=0.01, max_wait=0.05),
    }
    client.update({k: v for k, v in changes.items() if k in client or k == "confidence"})
    rest = {k: v for k, v in changes.items() if k not in client}
    return PipelineOptions(client=ClientOptions(**client), **rest)  # type: ignore[arg-type]


def make_dataset(root: Path, count: int) -> dict[str, bytes]:
    """``count`` distinct small images in nested folders; returns source -> file bytes."""
    files = {}
    for n in range(count):
        path = make_image(root / f"d{n % 7}" / f"img{n:04d}.jpg", seed=n, size=(48, 36))
        files[str(path)] = path.read_bytes()
    return files


async def test_directory_with_bad_files_gives_one_row_per_input(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    root = tmp_path / "data"
    good = make_dataset(root, 200)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image")
    whole = image_bytes(size=(200, 150), seed=3)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    os.symlink(root / "nowhere.jpg", root / "broken.jpg")
    jsonl, table = tmp_path / "out.jsonl", tmp_path / "out.csv"

    stats = await run([str(root)], options(url), outputs=[str(jsonl), str(table)])

    records = read_jsonl(jsonl)
    by_source = {record["source"]: record for record in records}
    assert len(records) == len(by_source) == 204
    assert stats.total == 204 and stats.ok == 200 and stats.failed == 4
    for source, data in good.items():
        record = by_source[source]
        expected = expected_answer(data)
        assert record["status"] == "ok", record
        assert record["top"] == expected["top"]  # the best class, over the threshold or not
        assert record["confidence"] == expected["confidence"]
        assert record["predicted_classes"] == expected["predicted_classes"]
        assert record["predictions"] == expected["scores"]  # the whole distribution
        assert record["image"] == {"width": 48, "height": 36}
        assert record["attempts"] == 1 and record["error"] is None
    for name in ("empty.jpg", "text.jpg", "truncated.jpg", "broken.jpg"):
        record = by_source[str(root / name)]
        assert record["status"] == "error", record
        assert record["error"]["message"]
        assert record["attempts"] == 0
    assert (await emulator_stats(url))["requests"] == 200  # bad files cost no request

    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {row["source"]: row["status"] for row in rows} == {
        s: r["status"] for s, r in by_source.items()
    }


async def test_multi_label_results_are_normalised(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(multi_label=True)
    files = make_dataset(tmp_path / "ml", 12)
    results = [r async for r in iter_results([str(tmp_path / "ml")], options(url))]
    assert len(results) == 12
    for result in results:
        expected = expected_answer(files[result.source], multi_label=True)
        assert result.ok
        assert list(result.predicted_classes) == expected["predicted_classes"]
        assert result.predictions == expected["scores"]
        best = max(result.predictions, key=result.predictions.__getitem__)
        assert result.top == best and result.confidence == result.predictions[best]


async def test_mixed_sources_in_one_run(
    tmp_path: Path, start_emulator: StartEmulator, serve_bytes: ServeBytes
) -> None:
    url = await start_emulator()
    folder = make_dataset(tmp_path / "folder", 5)
    web = await serve_bytes({"/remote.jpg": image_bytes(seed=99), "/gone.jpg": 404})
    listed = make_image(tmp_path / "lists" / "img" / "listed.png", seed=5)
    (tmp_path / "lists" / "inputs.txt").write_text("img/listed.png\n# comment\n\n")
    (tmp_path / "table.csv").write_text(f"url,label\n{web}/remote.jpg,x\n,empty\n")
    stdin_image = make_image(tmp_path / "stdin.jpg", seed=6)
    specs = [
        str(tmp_path / "folder"),
        str(tmp_path / "lists" / "inputs.txt"),
        str(tmp_path / "table.csv"),
        f"{web}/gone.jpg",
        "-",
    ]
    stdin = io.StringIO(f"{stdin_image}\n")
    results = {r.source: r async for r in iter_results(specs, options(url), stdin=stdin)}
    assert set(folder) <= set(results)
    # A list's entry keeps its own words as the source; the file it names is the path.
    assert results["img/listed.png"].ok
    assert results["img/listed.png"].path == str(listed)
    assert results[f"{web}/remote.jpg"].ok and results[f"{web}/remote.jpg"].path is None
    assert results[f"{web}/remote.jpg"].top == expected_answer(image_bytes(seed=99))["top"]
    gone = results[f"{web}/gone.jpg"]
    assert gone.status == "error" and gone.error is not None and gone.error.http_status == 404
    assert results[str(stdin_image)].ok
    empty = [r for s, r in results.items() if s.endswith("table.csv:3")]
    assert len(empty) == 1 and empty[0].status == "error"
    assert len(results) == 5 + 1 + 2 + 1 + 1


async def test_url_by_reference_and_fetched(
    tmp_path: Path, start_emulator: StartEmulator, serve_bytes: ServeBytes
) -> None:
    url = await start_emulator(allow_http_image_urls=True)  # by reference from 127.0.0.1
    data = image_bytes(seed=11)
    web = await serve_bytes({"/a.jpg": data})
    for mode in ("reference", "fetch", "auto"):
        results = [r async for r in iter_results([f"{web}/a.jpg"], options(url, url_mode=mode))]
        assert results[0].ok, (mode, results[0])
        assert results[0].top == expected_answer(data)["top"]


async def test_a_fatal_error_stops_the_run_and_keeps_what_was_done(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(api_key="the-right-key")
    make_dataset(tmp_path / "many", 60)
    out = tmp_path / "out.jsonl"
    with pytest.raises(RunAborted, match="API key") as caught:
        await run([str(tmp_path / "many")], options(url, concurrency=4), outputs=[str(out)])
    assert KEY not in str(caught.value)
    stats = await emulator_stats(url)
    assert stats["requests"] <= 4  # only what was in flight when the first 403 came back
    assert out.exists() and out.read_text() == ""
    assert caught.value.stats is not None and caught.value.stats.aborted


async def test_max_failures_aborts_a_systematically_failing_run(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(fail_rate=1.0)
    make_dataset(tmp_path / "many", 40)
    opts = PipelineOptions(
        client=ClientOptions(
            endpoint=url,
            model="demo",
            version=1,
            api_key=KEY,
            concurrency=2,
            retry=RetryPolicy(attempts=1),
        ),
        max_failures=3,
        throttle=ThrottleOptions(adaptive=False),
    )
    with pytest.raises(RunAborted, match="max-failures"):
        await run([str(tmp_path / "many")], opts)
    assert (await emulator_stats(url))["requests"] < 10


async def test_stop_finishes_in_flight_items_and_reports_nothing_unsent(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=50)
    make_dataset(tmp_path / "many", 100)
    pipeline = Pipeline([str(tmp_path / "many")], options(url, concurrency=4, queue_size=4))
    seen: list[Result] = []
    async for result in pipeline.results():
        seen.append(result)
        if len(seen) == 10:
            pipeline.stop()
    # what was already done (the result queue) and what was in flight (the workers)
    assert 10 <= len(seen) <= 10 + 4 + 4
    assert all(result.ok for result in seen)
    assert (await emulator_stats(url))["requests"] == len(seen)


async def test_a_stop_before_the_producer_started_still_ends_the_run(
    tmp_path: Path, emulator_url: str
) -> None:
    make_dataset(tmp_path / "in", 12)
    pipeline = Pipeline([str(tmp_path / "in")], options(emulator_url))
    results = pipeline.results()
    first = asyncio.ensure_future(results.__anext__())
    await asyncio.sleep(0)  # results() has created the producer task, which has not run yet
    pipeline.stop()  # a Ctrl-C, or a --processes worker told to stop, at that very moment
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(first, 10)  # it hung here: no end marker ever woke the workers
    assert pipeline.taken == pipeline.dropped


async def test_an_abort_after_every_input_was_queued_counts_the_queued_ones(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=300)
    make_dataset(tmp_path / "in", 12)
    # 12 inputs fit the queue: the producer is done long before the abort.
    pipeline = Pipeline([str(tmp_path / "in")], options(url, concurrency=2, queue_size=16))
    received = 0
    results = pipeline.results()
    first = await anext(results)
    received += first is not None
    pipeline.abort()
    async for _ in results:
        received += 1
    assert pipeline.taken == 12
    # It lost the ones still queued: taken was 12, received + dropped less than that.
    assert received + pipeline.dropped == 12, (received, pipeline.dropped)


async def test_memory_bound_queue_does_not_read_ahead(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    """The producer stays at most a queue's length ahead of the workers."""
    url = await start_emulator(latency_ms=20)
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{url}/nothing/{n}.jpg\n" for n in range(5000)))
    pulled = 0

    def counting() -> object:
        nonlocal pulled
        from batchclassify.sources import iter_items

        for item in iter_items([str(listing)]):
            pulled += 1
            yield item

    pipeline = Pipeline([], options(url, concurrency=2, queue_size=8), items=counting())
    results = pipeline.results()
    await results.__anext__()
    await asyncio.sleep(0.2)
    assert pulled <= 8 + 2 + 2 * 256  # the queue, the workers, and two chunks in hand
    await results.aclose()


async def test_a_queue_smaller_than_the_concurrency_still_stops_cleanly(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(api_key="other")
    make_dataset(tmp_path / "many", 30)
    with pytest.raises(RunAborted):
        await run([str(tmp_path / "many")], options(url, concurrency=8, queue_size=1))


async def test_a_source_that_breaks_aborts_the_run_instead_of_hanging(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    made = list(make_dataset(tmp_path / "some", 3))

    def breaking() -> Iterator[Item]:
        for source in made:
            yield Item(source=source, path=Path(source))
        raise OSError("the network share went away")

    pipeline = Pipeline([], options(url), items=breaking())
    seen = []
    with pytest.raises(RunAborted, match="network share"):
        async for result in pipeline.results():
            seen.append(result)
    assert len(seen) <= 3

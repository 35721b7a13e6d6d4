"""Exactly-once results across crashes, incremental scans, dedup and shards: the real command
in a subprocess against the emulator, killed with SIGKILL at random moments."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
from pathlib import Path

from conftest import StartEmulator
from helpers import (
    emulator_stats,
    expected_answer,
    make_image,
    read_csv,
    read_jsonl,
    run_cli,
    start_cli,
)

from batchclassify.emulator import EmulatorConfig, running_emulator

KEY = "resume-key-4242"


async def start(*args: str) -> asyncio.subprocess.Process:
    return await start_cli(*args, env={"ROBOFLOW_API_KEY": KEY})


async def cli(*args: str) -> tuple[int, str]:
    code, _, err = await run_cli(*args, env={"ROBOFLOW_API_KEY": KEY})
    return code, err


def dataset(root: Path, count: int) -> dict[str, bytes]:
    made = {}
    for n in range(count):
        path = make_image(root / f"f{n % 5}" / f"{n:04d}.png", seed=n, size=(20, 20))
        made[str(path)] = path.read_bytes()
    return made


async def test_kill_9_then_resume_gives_every_input_exactly_once(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=40)
    files = dataset(tmp_path / "in", 240)
    out, table = tmp_path / "r.jsonl", tmp_path / "r.csv"
    base = [
        "run",
        str(tmp_path / "in"),
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--concurrency",
        "4",
        "--out",
        str(out),
        "--out",
        str(table),
    ]
    rng = random.Random(5)
    kills = 0
    for attempt in range(8):
        process = await start(*base, *(["--resume"] if attempt else []))
        try:
            await asyncio.wait_for(process.wait(), rng.uniform(0.6, 1.4))
        except asyncio.TimeoutError:
            process.send_signal(signal.SIGKILL)
            kills += 1
        await process.communicate()
        if process.returncode == 0:
            break
    assert kills >= 2, "the run finished before it could be killed twice"
    code, stderr = await cli(*base, "--resume")
    assert code == 0, stderr

    records = read_jsonl(out)
    assert sorted(r["source"] for r in records) == sorted(files)
    assert all(r["status"] == "ok" for r in records)
    for record in records:
        assert record["top"] == expected_answer(files[record["source"]])["top"]
    rows = read_csv(table)
    assert [row["source"] for row in rows] == [r["source"] for r in records]
    served = await emulator_stats(url, images=True)
    assert served["distinct_images"] == 240
    # An image is sent again only if it was in flight (or answered but not yet committed,
    # at most 50 ms of answers) when a kill came.
    repeats = sum(counts["ok"] - 1 for counts in served["images"].values())
    assert repeats <= kills * 8, (repeats, kills)


async def test_resume_retries_transient_failures_only(tmp_path: Path) -> None:
    dataset(tmp_path / "in", 6)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    out = tmp_path / "r.jsonl"
    base = [
        "run",
        str(tmp_path / "in"),
        "--model",
        "demo/1",
        "--out",
        str(out),
        "--retries",
        "1",
        "--no-adaptive",
    ]
    # The same endpoint first failing, then healthy: one port, two emulators in turn.
    async with running_emulator(EmulatorConfig(fail_rate=1.0)) as url:
        code, stderr = await cli(*base, "--endpoint", url)
    assert code == 1, stderr
    assert sum(r["status"] == "error" for r in read_jsonl(out)) == 7
    port = int(url.rsplit(":", 1)[1])
    async with running_emulator(port=port) as url:
        code, stderr = await cli(*base, "--endpoint", url)
        assert code == 2 and "--resume" in stderr  # a state exists: not without --resume
        code, stderr = await cli(*base, "--endpoint", url, "--resume")
        assert code == 0, stderr  # the exit code speaks of this run's inputs
        assert (await emulator_stats(url))["requests"] == 6  # the 5xx ones, not the broken file
        records = read_jsonl(out)
        assert len(records) == 7
        assert {r["source"] for r in records if r["status"] == "error"} == {
            str(tmp_path / "in" / "broken.png")
        }
        code, stderr = await cli(*base, "--endpoint", url, "--resume", "--retry-failed")
        assert code == 1 and "0 ok, 1 failed" in stderr  # the broken file, tried again
        assert len(read_jsonl(out)) == 7
        code, stderr = await cli(*base, "--endpoint", "http://127.0.0.1:9", "--resume")
        assert code == 2 and "endpoint" in stderr  # results of two servers are never mixed


async def test_scan_sends_only_new_and_changed_files(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    folder = tmp_path / "incoming"
    dataset(folder, 20)
    out = tmp_path / "labels.jsonl"
    scan = ["scan", str(folder), "--model", "demo/1", "--endpoint", url, "--out", str(out)]
    code, stderr = await cli(*scan)
    assert code == 0, stderr
    assert (await emulator_stats(url))["requests"] == 20

    code, stderr = await cli(*scan)
    assert code == 0, stderr
    assert (await emulator_stats(url))["requests"] == 20  # unchanged folder: nothing sent

    for n in range(5):
        make_image(folder / "new" / f"{n}.png", seed=1000 + n, size=(20, 20))
    changed = next(iter(sorted(folder.rglob("*.png"))))
    make_image(changed, seed=777, size=(20, 20))
    os.utime(changed, ns=(1, 2_000_000_000))
    code, stderr = await cli(*scan)
    assert code == 0, stderr
    assert (await emulator_stats(url))["requests"] == 26
    records = read_jsonl(out)
    assert len(records) == 26
    assert sum(r["source"] == str(changed) for r in records) == 2  # both versions


async def test_overlapping_scans_never_both_run(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=200)
    folder = tmp_path / "incoming"
    dataset(folder, 20)
    out = tmp_path / "labels.jsonl"
    scan = [
        "scan",
        str(folder),
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--out",
        str(out),
        "--concurrency",
        "1",
    ]
    first = await start(*scan)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if (await emulator_stats(url))["requests"] > 0:
            break
    code, stderr = await cli(*scan)
    assert code == 2 and "another batchclassify run" in stderr
    first.send_signal(signal.SIGKILL)
    await first.communicate()
    code, stderr = await cli(*scan, "--concurrency", "8")  # the dead holder's lock is free
    assert code == 0, stderr
    assert sorted(r["source"] for r in read_jsonl(out)) == sorted(map(str, folder.rglob("*.png")))


async def test_byte_identical_copies_cost_one_request(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=20)
    folder = tmp_path / "dupes"
    originals = [make_image(folder / f"orig{n}.png", seed=n, size=(20, 20)) for n in range(3)]
    for n in range(30):
        shutil.copy(originals[n % 3], folder / f"copy{n:02d}.png")
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        "run",
        str(folder),
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--out",
        str(out),
        "--concurrency",
        "8",
    )
    assert code == 0, stderr
    assert (await emulator_stats(url))["requests"] == 3
    records = read_jsonl(out)
    assert len(records) == 33
    reused = [r for r in records if r["duplicate_of"]]
    assert len(reused) == 30
    by_source = {r["source"]: r for r in records}
    for record in reused:
        assert record["top"] == by_source[record["duplicate_of"]]["top"]
    assert "30 duplicates" in stderr

    out2 = tmp_path / "r2.jsonl"
    code, _ = await cli(
        "run", str(folder), "--model", "demo/1", "--endpoint", url, "--out", str(out2), "--no-dedup"
    )
    assert code == 0
    assert (await emulator_stats(url))["requests"] == 3 + 33


async def test_copies_of_images_classified_by_an_earlier_run_cost_no_request(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    folder = tmp_path / "photos"
    originals = [make_image(folder / f"orig{n}.png", seed=n, size=(20, 20)) for n in range(3)]
    out = tmp_path / "r.jsonl"
    command = ("scan", str(folder), "--model", "demo/1", "--endpoint", url, "--out", str(out))
    code, stderr = await cli(*command)
    assert code == 0, stderr
    for n in range(6):  # new files, old bytes: the state's filter must let the lookup through
        shutil.copy(originals[n % 3], folder / f"later{n}.png")
    code, stderr = await cli(*command)
    assert code == 0, stderr
    assert (await emulator_stats(url))["requests"] == 3
    later = [r for r in read_jsonl(out) if "later" in r["source"]]
    assert len(later) == 6 and all(r["duplicate_of"] for r in later)


async def test_dedup_finds_a_stored_answer_evicted_from_its_recent_table(tmp_path: Path) -> None:
    from batchclassify.dedup import ContentDedup
    from batchclassify.model import Result
    from batchclassify.state import StateStore

    store = StateStore(tmp_path / "s.state")
    dedup = ContentDedup(store, capacity=1)
    digests = [f"{n:064x}" for n in range(3)]
    for n, digest in enumerate(digests):
        assert await dedup.find(digest) is None  # claimed: this caller classifies it
        result = Result(source=f"s{n}", status="ok", top="cat", key=f"k{n}", content_hash=digest)
        dedup.settle(digest, result)
        store.record([result])
    found = await dedup.find(digests[0])  # long gone from the recent table: from the state
    assert found is not None and found.duplicate_of == "s0"
    assert await dedup.find(f"{9:064x}") is None
    store.close()


async def test_shards_cover_every_input_exactly_once(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    files = dataset(tmp_path / "in", 60)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(files) + "\n")
    seen: list[str] = []
    for k in range(3):
        out = tmp_path / f"shard{k}.jsonl"
        code, stderr = await cli(
            "run",
            str(listing),
            "--model",
            "demo/1",
            "--endpoint",
            url,
            "--out",
            str(out),
            "--shard",
            f"{k}/3",
        )
        assert code == 0, stderr
        seen += [r["source"] for r in read_jsonl(out)]
    assert sorted(seen) == sorted(files)


async def test_scan_interval_picks_up_new_files_until_interrupted(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    folder = tmp_path / "incoming"
    dataset(folder, 3)
    out = tmp_path / "labels.jsonl"
    process = await start(
        "scan",
        str(folder),
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--out",
        str(out),
        "--interval",
        "0.2",
    )
    for _ in range(200):
        await asyncio.sleep(0.05)
        if out.exists() and len(out.read_text().splitlines()) == 3:
            break
    make_image(folder / "late.png", seed=4242, size=(20, 20))
    for _ in range(200):
        await asyncio.sleep(0.05)
        if len(out.read_text().splitlines()) == 4:
            break
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 130, err.decode()
    assert sorted(r["source"] for r in read_jsonl(out)) == sorted(map(str, folder.rglob("*.png")))
    assert (await emulator_stats(url))["requests"] == 4

"""``--processes N``: the same guarantees as one process. The real command in a subprocess,
worker processes and all, against the emulator; killed with SIGKILL where it hurts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
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

from batchclassify.config import RunSettings
from batchclassify.errors import ConfigError
from batchclassify.processes import auto_processes

KEY = "processes-key-77421"


def dataset(root: Path, count: int) -> dict[str, bytes]:
    made = {}
    for n in range(count):
        path = make_image(root / f"d{n % 4}" / f"{n:04d}.png", seed=n, size=(16, 16))
        made[str(path)] = path.read_bytes()
    return made


def command(url: str, source: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(source),
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--out",
        str(out),
        "--out",
        str(out.with_suffix(".csv")),
        *extra,
    ]


async def cli(*args: str) -> tuple[int, str]:
    code, _, err = await run_cli(*args, env={"ROBOFLOW_API_KEY": KEY})
    return code, err


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def check_exactly_once(out: Path, files: dict[str, bytes]) -> None:
    records = read_jsonl(out)
    assert sorted(r["source"] for r in records) == sorted(files)
    assert all(r["status"] == "ok" for r in records)
    for record in records:
        assert record["top"] == expected_answer(files[record["source"]])["top"]
    rows = read_csv(out.with_suffix(".csv"))
    assert [row["source"] for row in rows] == [r["source"] for r in records]


async def test_two_processes_write_one_set_of_outputs_and_one_summary(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=5)
    files = dataset(tmp_path / "in", 120)
    out = tmp_path / "r.jsonl"
    summary = tmp_path / "summary.json"
    code, stderr = await cli(
        *command(url, tmp_path / "in", out, "--processes", "2", "--concurrency", "8"),
        "--summary",
        str(summary),
    )
    assert code == 0, stderr
    check_exactly_once(out, files)
    assert (await emulator_stats(url))["requests"] == 120
    stats = json.loads(summary.read_text())
    assert stats["total"] == 120 and stats["ok"] == 120
    assert stats["requests_sent"] == 120
    assert "120 images" in stderr and KEY not in stderr
    # The state is the one writer's: a second run skips everything.
    code, stderr = await cli(*command(url, tmp_path / "in", out, "--processes", "2", "--resume"))
    assert code == 0, stderr
    assert "nothing left to do" in stderr
    assert (await emulator_stats(url))["requests"] == 120


async def test_kill_9_of_the_parent_stops_its_workers_and_resume_is_exactly_once(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=60)
    files = dataset(tmp_path / "in", 300)
    out = tmp_path / "r.jsonl"
    args = command(url, tmp_path / "in", out, "--processes", "2", "--concurrency", "4")
    process = await start_cli(*args, env={"ROBOFLOW_API_KEY": KEY})
    # Kill once rows are flowing from both workers.
    for _ in range(200):
        await asyncio.sleep(0.05)
        if out.exists() and len(out.read_bytes().splitlines()) >= 40:
            break
    workers = children_of(process.pid)
    assert len(workers) >= 2, "the worker processes did not start"
    process.send_signal(signal.SIGKILL)
    await process.communicate()
    for _ in range(100):  # the workers see their parent leave and exit
        if not any(alive(pid) for pid in workers):
            break
        await asyncio.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "a worker outlived its parent"
    done_before = len(read_jsonl(out))
    assert 0 < done_before < 300, done_before
    requests_then = (await emulator_stats(url))["requests"]
    await asyncio.sleep(0.3)
    assert (await emulator_stats(url))["requests"] == requests_then, "workers still sending"

    code, stderr = await cli(*args, "--resume")
    assert code == 0, stderr
    check_exactly_once(out, files)


async def test_a_worker_killed_stops_the_run_and_resume_completes_it(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=60)
    files = dataset(tmp_path / "in", 200)
    out = tmp_path / "r.jsonl"
    args = command(url, tmp_path / "in", out, "--processes", "2", "--concurrency", "4")
    process = await start_cli(*args, env={"ROBOFLOW_API_KEY": KEY})
    workers: list[int] = []
    for _ in range(200):
        await asyncio.sleep(0.05)
        workers = children_of(process.pid)
        if len(workers) >= 2 and out.exists() and out.stat().st_size > 0:
            break
    # The spawn start method has a resource tracker child too: kill a real worker.
    worker = next(
        pid
        for pid in workers
        if b"batchclassify" in Path(f"/proc/{pid}/cmdline").read_bytes()
        or b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    os.kill(worker, signal.SIGKILL)
    _, stderr_bytes = await process.communicate()
    stderr = stderr_bytes.decode()
    assert process.returncode == 2, stderr
    assert "worker process" in stderr and "--resume" in stderr
    code, stderr = await cli(*args, "--resume")
    assert code == 0, stderr
    check_exactly_once(out, files)


async def test_a_fatal_answer_in_one_worker_stops_them_all(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(api_key=KEY)
    dataset(tmp_path / "in", 40)
    out = tmp_path / "r.jsonl"
    code, _, stderr = await run_cli(
        *command(url, tmp_path / "in", out, "--processes", "2"),
        env={"ROBOFLOW_API_KEY": "wrong-key-123456"},
    )
    assert code == 2, stderr
    assert "API key" in stderr and "wrong-key-123456" not in stderr
    # Each worker stops at its first 401: a few requests, not the whole input.
    assert (await emulator_stats(url))["requests"] <= 2 * 8


async def test_max_failures_counts_the_rows_of_every_worker(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(fail_statuses={500: 1.0})
    dataset(tmp_path / "in", 60)
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        *command(url, tmp_path / "in", out, "--processes", "2", "--concurrency", "2"),
        "--retries",
        "1",
        "--max-failures",
        "6",
        "--no-adaptive",
    )
    assert code == 2, stderr
    assert "--max-failures 6" in stderr
    assert 6 <= len(read_jsonl(out)) < 60


async def test_stdin_needs_one_process(tmp_path: Path, start_emulator: StartEmulator) -> None:
    url = await start_emulator()
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        "run", "-", "--model", "demo/1", "--endpoint", url, "--out", str(out), "--processes", "2"
    )
    assert code == 2
    assert "--processes 1" in stderr
    assert auto_processes(512, ["-"]) == 1
    assert auto_processes(8, ["photos/"]) == 1
    assert auto_processes(10_000, ["photos/"]) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", [0, -1, "many", 1.5])
def test_bad_process_counts_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match="processes"):
        RunSettings(model="demo/1", processes=value)  # type: ignore[arg-type]


async def test_bad_process_count_on_the_command_line(tmp_path: Path) -> None:
    code, stderr = await cli("run", str(tmp_path), "--model", "demo/1", "--processes", "two")
    assert code == 2
    assert "'two' is not a number of processes or auto" in stderr

"""``run --distributor ray``: shards as Ray tasks, parts merged into the outputs exactly once.

The option checks and the merge need no Ray and run everywhere. The tests that start Ray carry
the ``ray`` marker and are skipped when Ray is not installed::

    pip install -e '.[dev,ray]'
    python -m pytest -m ray tests/test_distribute_ray.py

They share one local Ray instance (4 CPUs) and talk to the emulator in a process of its own,
which the Ray workers (other processes) reach on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    emulator_stats,
    make_image,
    read_csv,
    read_jsonl,
    reset_emulator,
    run_cli,
    start_cli,
)

from batchclassify import ClientOptions, PipelineOptions
from batchclassify.config import RunSettings
from batchclassify.emulator import LISTENING_PREFIX
from batchclassify.errors import RunAborted
from batchclassify.merge import Part, merge_parts, merging_name
from batchclassify.runner import JobState, run
from batchclassify.state import StateReader
from batchclassify.verify import verify

#: the key the emulator insists on: every ok row proves it reached the Ray workers
KEY = "ray-test-key-5f1c9a7e"
MODEL = ["--model", "demo/1"]


def images(folder: Path, count: int) -> list[str]:
    return [str(make_image(folder / f"{n:03d}.jpg", seed=n, size=(32, 24))) for n in range(count)]


def listed(root: Path, count: int) -> tuple[Path, list[str]]:
    """``count`` images and a list naming them relative to the list (``in/000.jpg``): the
    shard of an input is hashed from it as listed, so every shard's size is the same on every
    run (none is empty for the counts used here)."""
    images(root / "in", count)
    entries = [f"in/{n:03d}.jpg" for n in range(count)]
    listing = root / "inputs.txt"
    listing.write_text("\n".join(entries) + "\n")
    return listing, entries


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    return await run_cli(*args, env={"ROBOFLOW_API_KEY": "", **(env or {})}, timeout=180)


# --- option checks: no Ray needed -------------------------------------------------------------


async def test_bad_combinations_are_refused_before_anything_starts(tmp_path: Path) -> None:
    images(tmp_path / "in", 2)
    out = str(tmp_path / "r.jsonl")
    base = ["run", str(tmp_path / "in"), *MODEL, "--emulate"]
    ray = ["--distributor", "ray", "--shards", "2"]
    cases = [
        ([*base, "--out", out, *ray, "--shard", "0/2"], "--shard K/N and --distributor ray both"),
        ([*base, "--out", out, "--shards", "4"], "--shards needs --distributor ray"),
        ([*base, "--out", out, "--ray-address", "h:1"], "--ray-address needs --distributor ray"),
        ([*base, "--out", out, "--parts-dir", "p"], "--parts-dir needs --distributor ray"),
        ([*base, "--out", "-", *ray], "merges the shards' parts into files"),
        ([*base, *ray], "merges the shards' parts into files"),
        (["run", "-", *MODEL, "--emulate", "--out", out, *ray], "cannot read inputs from stdin"),
        ([*base, "--out", out, *ray, "--state", str(tmp_path / "s")], "each shard keeps its own"),
        ([*base, "--out", out, *ray, "--no-state"], "each shard keeps its own"),
        ([*base, "--out", out, "--distributor", "ray", "--shards", "0"], "at least 1, got 0"),
        ([*base, "--out", out, *ray, "--max-retries", "-1"], "cannot be negative"),
        ([*base, "--out", out, *ray, "--ray-address", "nohost"], "is not HOST:PORT"),
        ([*base, "--out", out, "--distributor", "spark"], "invalid choice: 'spark'"),
    ]
    for args, message in cases:
        code, stdout, stderr = await cli(*args)
        assert code == 2, (args, stderr)
        assert message in stderr, (args, stderr)
        assert stdout == ""
    assert not (tmp_path / "r.jsonl").exists()
    assert not (tmp_path / "r.jsonl.parts").exists()


def test_missing_ray_names_the_extra_to_install(tmp_path: Path) -> None:
    images(tmp_path / "in", 1)
    # ``sys.modules["ray"] = None`` makes ``import ray`` fail as if it were not installed.
    program = (
        "import sys; sys.modules['ray'] = None; from batchclassify.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    args = ["run", str(tmp_path / "in"), *MODEL, "--emulate", "--out", str(tmp_path / "r.jsonl")]
    done = subprocess.run(
        [sys.executable, "-c", program, *args, "--distributor", "ray", "--shards", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--distributor ray needs Ray: pip install 'batchclassify[ray]'" in done.stderr
    assert not (tmp_path / "r.jsonl").exists()


async def test_an_unreachable_cluster_is_said_at_once(tmp_path: Path) -> None:
    images(tmp_path / "in", 1)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, stderr = await cli(
        "run",
        str(tmp_path / "in"),
        *MODEL,
        "--emulate",
        "--out",
        str(tmp_path / "r.jsonl"),
        "--distributor",
        "ray",
        "--ray-address",
        f"127.0.0.1:{port}",
    )
    assert code == 2
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in stderr
    assert "ray start --head" in stderr


async def test_parts_of_an_earlier_run_need_resume_or_overwrite(tmp_path: Path) -> None:
    images(tmp_path / "in", 1)
    out = tmp_path / "r.jsonl"
    base = ["run", str(tmp_path / "in"), *MODEL, "--emulate", "--out", str(out)]
    parts = tmp_path / "r.jsonl.parts"
    code, _, stderr = await cli(*base, "--distributor", "ray", "--resume")
    assert code == 2 and "cannot resume: there is no distributed run in" in stderr
    parts.mkdir()
    (parts / "job.json").write_text('{"shards": 4}\n')
    code, _, stderr = await cli(*base, "--distributor", "ray", "--shards", "4")
    assert code == 2 and "holds an earlier distributed run: pass --resume" in stderr
    code, _, stderr = await cli(*base, "--distributor", "ray", "--shards", "3", "--resume")
    assert code == 2 and "was split into 4 shards: resume it with --shards 4" in stderr
    out.write_text("a user's file\n")
    code, _, stderr = await cli(*base, "--distributor", "ray", "--shards", "4", "--parts-dir", "x")
    assert code == 2 and "already exists; pass --overwrite" in stderr
    assert out.read_text() == "a user's file\n"


# --- the merge: parts made by ordinary sharded runs, no Ray needed -------------------------------


async def sharded_parts(folder: Path, parts_dir: Path, url: str, shards: int) -> list[Part]:
    """Run every shard of ``folder`` as ``--shard K/N`` would; their JSONL outputs are parts."""
    parts_dir.mkdir()
    options = PipelineOptions(
        client=ClientOptions(endpoint=url, model="demo", version=1, api_key=KEY, concurrency=4)
    )
    parts = []
    for index in range(shards):
        path = parts_dir / f"part{index}.jsonl"
        state = parts_dir / f"part{index}.state"
        await run(
            [str(folder)],
            options,
            outputs=[str(path)],
            state=JobState(path=state, shard=(index, shards)),
        )
        reader = StateReader(state)
        parts.append(Part(path, (index, shards), reader.count()))
        reader.close()
    return parts


async def test_merge_writes_every_row_once_to_each_format(
    tmp_path: Path, emulator_url: str
) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    files = images(tmp_path / "in", 30)
    parts = await sharded_parts(tmp_path / "in", tmp_path / "parts", emulator_url, 3)
    assert all(part.rows > 0 for part in parts)
    outputs = [tmp_path / "all.jsonl", tmp_path / "all.csv", tmp_path / "all.parquet"]
    rows = await merge_parts(parts, [str(path) for path in outputs])
    assert rows == len(files)
    merged = (tmp_path / "all.jsonl").read_text().splitlines()
    from_parts = [line for part in parts for line in part.path.read_text().splitlines()]
    assert merged == from_parts  # byte for byte: the rows round-trip through the sinks
    assert sorted(json.loads(line)["source"] for line in merged) == sorted(files)
    table = read_csv(tmp_path / "all.csv")
    assert sorted(row["source"] for row in table) == sorted(files)
    assert [row["top"] for row in table] == [json.loads(line)["top"] for line in merged]
    assert sorted(pq.read_table(outputs[2]).column("source").to_pylist()) == sorted(files)
    assert not list(tmp_path.glob(".*merging*"))


async def test_merge_refuses_a_row_of_another_shard_and_writes_nothing(
    tmp_path: Path, emulator_url: str
) -> None:
    images(tmp_path / "in", 12)
    parts = await sharded_parts(tmp_path / "in", tmp_path / "parts", emulator_url, 2)
    swapped = [Part(parts[0].path, (1, 2), parts[0].rows), parts[1]]
    out = tmp_path / "all.jsonl"
    with pytest.raises(RunAborted, match="holds a row of another shard than 1/2"):
        await merge_parts(swapped, [str(out), str(tmp_path / "all.csv")])
    assert not out.exists() and not (tmp_path / "all.csv").exists()
    assert not merging_name(out).exists()


async def test_merge_refuses_a_part_short_of_its_state_and_keeps_the_old_output(
    tmp_path: Path, emulator_url: str
) -> None:
    images(tmp_path / "in", 12)
    parts = await sharded_parts(tmp_path / "in", tmp_path / "parts", emulator_url, 2)
    lines = parts[1].path.read_text().splitlines(keepends=True)
    parts[1].path.write_text("".join(lines[:-1]))  # a part that lost its last row
    out = tmp_path / "all.jsonl"
    out.write_text("the previous merge\n")
    with pytest.raises(RunAborted, match=f"holds {len(lines) - 1} rows but its state {len(lines)}"):
        await merge_parts(parts, [str(out)])
    assert out.read_text() == "the previous merge\n"
    assert not merging_name(out).exists()


# --- on Ray ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[str, Path]]:
    """A local Ray instance with 4 CPUs for the module: its address and its session folder
    (logs included, searched for the key)."""
    ray = pytest.importorskip("ray")
    # Short: Ray's unix sockets live under it, and their paths are limited to 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="bcray", dir="/tmp"))
    ray.init(num_cpus=4, _temp_dir=str(folder), include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address, folder
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


class EmulatorProcess:
    """``python -m batchclassify emulate --port 0`` in its own process (the Ray workers are
    other processes: an emulator in the test's event loop would do too, but not on a cluster)."""

    def __init__(self, *options: str) -> None:
        command = [sys.executable, "-m", "batchclassify", "emulate", "--port", "0", *options]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith(LISTENING_PREFIX):
            self.stop()
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.url = line[len(LISTENING_PREFIX) :].strip()

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()


@pytest.fixture
def slow_emulator() -> Iterator[str]:
    """100 ms per answer, and only :data:`KEY` accepted."""
    emulator = EmulatorProcess("--api-key", KEY, "--latency-ms", "100", "--models", "demo/1")
    try:
        yield emulator.url
    finally:
        emulator.stop()


def ray_run(listing: Path, url: str, address: str, *outputs: Path) -> list[str]:
    args = ["run", str(listing), *MODEL, "--endpoint", url, "--concurrency", "2"]
    for output in outputs:
        args += ["--out", str(output)]
    return [*args, "--distributor", "ray", "--shards", "4", "--ray-address", address]


def working_part(parts: Path, index: int) -> Path:
    return parts / f"shard-{index:05d}-of-00004.partial.jsonl"


async def kill_one_shard_mid_run(parts: Path, *, after_rows: int) -> tuple[int, int]:
    """SIGKILL the Ray worker of the first shard whose part has ``after_rows`` rows and is not
    complete (its pid is in the state's lock file); return the shard and the rows it had."""
    for _ in range(3000):  # 60 s at most
        for index in range(4):
            working = working_part(parts, index)
            lock = parts / f"shard-{index:05d}-of-00004.state.lock"
            if not working.exists() or not lock.exists():
                continue
            rows = working.read_bytes().count(b"\n")
            if rows >= after_rows and not (parts / f"shard-{index:05d}-of-00004.jsonl").exists():
                os.kill(int(lock.read_text()), signal.SIGKILL)
                return index, rows
        await asyncio.sleep(0.02)
    raise AssertionError("no shard reached its rows in time")


def assert_key_nowhere(*folders: Path, texts: tuple[str, ...] = ()) -> None:
    for text in texts:
        assert KEY not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.ray
async def test_four_shards_one_worker_killed_every_input_once(
    tmp_path: Path, ray_cluster: tuple[str, Path], slow_emulator: str
) -> None:
    address, ray_folder = ray_cluster
    listing, files = listed(tmp_path, 80)
    out, table = tmp_path / "labels.jsonl", tmp_path / "labels.csv"
    process = await start_cli(
        *ray_run(listing, slow_emulator, address, out, table),
        env={"ROBOFLOW_API_KEY": KEY},
    )
    parts = tmp_path / "labels.jsonl.parts"
    try:
        killed, rows_at_kill = await kill_one_shard_mid_run(parts, after_rows=6)
        stdout, stderr_bytes = await asyncio.wait_for(process.communicate(), 180)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = stderr_bytes.decode()
    assert process.returncode == 0, stderr
    # Ray ran the killed shard again, and the new attempt resumed it from its state.
    assert f"shard {killed}/4: complete" in stderr
    line = next(line for line in stderr.splitlines() if line.startswith(f"shard {killed}/4:"))
    assert "resumed" in line, stderr
    # Every input exactly once, in both outputs.
    records = read_jsonl(out)
    assert sorted(record["source"] for record in records) == sorted(files)
    assert all(record["status"] == "ok" for record in records)
    assert sorted(row["source"] for row in read_csv(table)) == sorted(files)
    # Only the lost shard's requests in flight were paid twice, not the rows it had kept.
    stats = await emulator_stats(slow_emulator)
    assert len(files) <= stats["requests"] < len(files) + rows_at_kill
    # An independent check per shard, as `batchclassify verify` does: every input of the shard
    # has its row in the shard's state, and the part holds exactly the state's rows.
    for index in range(4):
        settings = RunSettings(
            sources=(str(listing),),
            model="demo/1",
            out=(str(parts / f"shard-{index:05d}-of-00004.jsonl"),),
            state=str(parts / f"shard-{index:05d}-of-00004.state"),
            shard=f"{index}/4",
        )
        report = verify(settings)
        assert report.complete, report.lines
    assert not any(working_part(parts, index).exists() for index in range(4))
    # Ray's own logs too (its runtime-env agent logs env_vars: the key is not passed there).
    assert any(path.name == "runtime_env_agent.log" for path in ray_folder.rglob("*.log"))
    assert_key_nowhere(parts, tmp_path, ray_folder, texts=(stdout.decode(), stderr))


@pytest.mark.ray
async def test_a_stopped_job_resumes_and_reuses_finished_parts(
    tmp_path: Path, ray_cluster: tuple[str, Path], slow_emulator: str
) -> None:
    address, _ = ray_cluster
    listing, files = listed(tmp_path, 24)
    out, table = tmp_path / "labels.jsonl", tmp_path / "labels.csv"
    command = ray_run(listing, slow_emulator, address, out, table)
    # A wrong key: every shard stops at its first answer (401), and nothing is merged.
    code, _, stderr = await cli(*command, env={"ROBOFLOW_API_KEY": "not-the-key-0000"})
    assert code == 2, stderr
    assert "4 of 4 shards did not finish" in stderr and "--resume" in stderr, stderr
    assert not out.exists() and not table.exists()
    code, _, stderr = await cli(*command, "--resume", env={"ROBOFLOW_API_KEY": KEY})
    assert code == 0, stderr
    first = read_jsonl(out)
    assert sorted(record["source"] for record in first) == sorted(files)
    assert sorted(row["source"] for row in read_csv(table)) == sorted(files)
    # A finished job whose outputs and one part were lost: three parts are reused as they
    # are, the fourth is rebuilt from its state, and nothing is classified again.
    out.unlink()
    table.unlink()
    (tmp_path / "labels.jsonl.parts" / "shard-00001-of-00004.jsonl").unlink()
    await reset_emulator(slow_emulator)
    code, _, stderr = await cli(*command, "--resume", env={"ROBOFLOW_API_KEY": KEY})
    assert code == 0, stderr
    assert "3 of 4 shards are complete from an earlier run" in stderr
    assert "running 1 of 4 shards" in stderr
    assert (await emulator_stats(slow_emulator))["requests"] == 0
    assert sorted(map(json.dumps, read_jsonl(out))) == sorted(map(json.dumps, first))
    with table.open(newline="") as handle:
        assert len(list(csv.reader(handle))) == len(files) + 1


@pytest.mark.ray
async def test_emulated_run_on_ray_picks_one_shard_per_cpu(
    tmp_path: Path, ray_cluster: tuple[str, Path]
) -> None:
    address, _ = ray_cluster
    listing, files = listed(tmp_path, 20)
    out = tmp_path / "labels.jsonl"
    summary = tmp_path / "summary.json"
    args = ["run", str(listing), *MODEL, "--emulate", "--out", str(out)]
    code, _, stderr = await cli(
        *args, "--summary", str(summary), "--distributor", "ray", "--ray-address", address
    )
    assert code == 0, stderr
    assert "running 4 of 4 shards on Ray" in stderr  # the cluster has 4 CPUs
    assert sorted(record["source"] for record in read_jsonl(out)) == sorted(files)
    data: dict[str, Any] = json.loads(summary.read_text())
    assert data["total"] == data["ok"] == len(files) and data["shards"] == 4
    assert data["requests_sent"] == len(files)


@pytest.mark.ray
async def test_resume_tries_transient_failures_of_finished_parts_again(
    tmp_path: Path, ray_cluster: tuple[str, Path]
) -> None:
    address, _ = ray_cluster
    emulator = EmulatorProcess("--fail-status", "500:0.3", "--seed", "3", "--models", "demo/1")
    try:
        listing, files = listed(tmp_path, 24)
        out, table = tmp_path / "labels.jsonl", tmp_path / "labels.csv"
        command = [*ray_run(listing, emulator.url, address, out, table), "--retries", "1"]
        code, _, stderr = await cli(*command, env={"ROBOFLOW_API_KEY": KEY})
        failed = [r["source"] for r in read_jsonl(out) if r["status"] != "ok"]
        assert code == 1 and failed, stderr  # some 500s, kept as rows: the job is merged
        for _ in range(8):  # each resume retries the failed rows of the complete parts
            code, _, stderr = await cli(*command, "--resume", env={"ROBOFLOW_API_KEY": KEY})
            records = read_jsonl(out)
            assert sorted(record["source"] for record in records) == sorted(files), stderr
            assert sorted(row["source"] for row in read_csv(table)) == sorted(files)
            now_failed = [r["source"] for r in records if r["status"] != "ok"]
            assert set(now_failed) <= set(failed)
            failed = now_failed
            if not failed:
                break
        assert code == 0 and not failed, stderr
    finally:
        emulator.stop()

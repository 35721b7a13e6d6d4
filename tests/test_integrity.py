"""Nothing lost, ever: every input ends as exactly one row, or the run says why and exits != 0.

Each test injects a failure at one point of the pipeline (a worker, a sink, the sources, the
state, the disk) or feeds it hostile input, against the real emulator on 127.0.0.1, and checks
that every input is accounted for.
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import StartEmulator
from helpers import emulator_stats, make_image, read_csv, read_jsonl, run_cli

import batchclassify.pipeline
import batchclassify.runner
from batchclassify import ClientOptions, Item, PipelineOptions, Result, RunAborted, run
from batchclassify.retry import RetryPolicy
from batchclassify.runner import JobState
from batchclassify.sinks import result_to_csv_row

KEY = "integrity-key-9876"


def options(url: str, *, concurrency: int = 4) -> PipelineOptions:
    return PipelineOptions(
        client=ClientOptions(
            endpoint=url,
            model="demo",
            version=1,
            api_key=KEY,
            concurrency=concurrency,
            timeout=5.0,
            retry=RetryPolicy(attempts=2, initial=0.01, max_wait=0.05),
        )
    )


def images(root: Path, count: int, *, first: int = 0) -> list[Path]:
    return [
        make_image(root / f"d{n % 3}" / f"{n:05d}.png", seed=n, size=(12, 12))
        for n in range(first, first + count)
    ]


async def cli(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    code, _, err = await run_cli(*args, env={"ROBOFLOW_API_KEY": KEY}, cwd=cwd)
    return code, err


def job(folder: Path, url: str, *outputs: Path) -> list[str]:
    args = ["run", str(folder), "--model", "demo/1", "--endpoint", url]
    for output in outputs:
        args += ["--out", str(output)]
    return args


# --- one failure point at a time ----------------------------------------------------------------


async def test_an_unexpected_error_on_one_item_is_a_row_and_the_worker_lives_on(
    tmp_path: Path, start_emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await start_emulator()
    paths = images(tmp_path / "in", 60)
    real = batchclassify.pipeline._file_payload

    def payload(path: Path, prepare: Any) -> Any:
        if path.name.endswith("3.png"):  # 6 of 60: with 2 workers, each would have died
            raise RecursionError("maximum recursion depth exceeded")
        return real(path, prepare)

    monkeypatch.setattr(batchclassify.pipeline, "_file_payload", payload)
    out = tmp_path / "r.jsonl"
    stats = await run([str(tmp_path / "in")], options(url, concurrency=2), outputs=[str(out)])
    rows = read_jsonl(out)
    assert sorted(row["source"] for row in rows) == sorted(map(str, paths))
    internal = [row for row in rows if row["status"] == "error"]
    assert len(internal) == 6 and stats.failed == 6 and stats.ok == 54
    assert {row["error"]["type"] for row in internal} == {"internal"}
    assert all("RecursionError" in row["error"]["message"] for row in internal)


class _FailingSink:
    """A sink that breaks on its ``fail_at``-th row, as a full or vanished disk would."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.rows = 0

    async def write(self, result: Result) -> None:
        self.rows += 1
        if self.rows == self.fail_at:
            raise RuntimeError("the sink broke")

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_an_error_in_a_sink_stops_the_run_at_once(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=20)
    images(tmp_path / "in", 300)
    with pytest.raises(RunAborted) as caught:
        await run(
            [str(tmp_path / "in")],
            options(url),
            outputs=[str(tmp_path / "r.jsonl")],
            sinks=[_FailingSink(fail_at=20)],
            state=JobState(path=tmp_path / "r.state"),
        )
    assert "writing results failed: RuntimeError: the sink broke" in str(caught.value)
    # 4 workers at 20 ms: the ~60 requests before the failure, not the 300 of the input.
    assert (await emulator_stats(url))["requests"] < 150


async def test_a_source_that_breaks_stops_the_run_and_every_item_is_accounted_for(
    tmp_path: Path, start_emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = await start_emulator()
    paths = images(tmp_path / "in", 40)

    def breaking(specs: Any, options: Any, *, stdin: Any = None) -> Iterator[Item]:
        for path in paths:
            yield Item(source=str(path), path=path)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(batchclassify.runner, "iter_items", breaking)
    out = tmp_path / "r.jsonl"
    with pytest.raises(RunAborted) as caught:
        await run([str(tmp_path)], options(url), outputs=[str(out)])
    message = str(caught.value)
    assert "reading the inputs failed: OSError" in message
    assert "closing check" not in message  # what was taken is rows or counted as dropped
    assert caught.value.stats.total + caught.value.stats.not_started <= 40


class _LossySink:
    """Claims to have written rows it dropped: the closing check must notice."""

    def __init__(self) -> None:
        self.rows_received = 0
        self.rows_written = 0

    async def write(self, result: Result) -> None:
        self.rows_received += 1
        if self.rows_received != 7:
            self.rows_written += 1

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_the_closing_check_catches_an_output_short_of_a_row(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    images(tmp_path / "in", 12)
    with pytest.raises(RunAborted) as caught:
        await run([str(tmp_path / "in")], options(url), sinks=[_LossySink()])
    assert "closing check failed" in str(caught.value)
    assert "holds 11 of its 12 rows" in str(caught.value)


def _limit_file_size() -> None:
    # Files of this process may not grow past 120 kB: the state's disk is "full" early.
    # (Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process.)
    resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))


async def test_a_state_that_cannot_be_written_stops_the_run_and_resume_completes_it(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    paths = images(tmp_path / "in", 400)
    out = tmp_path / "r.jsonl"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchclassify",
        *job(tmp_path / "in", url, out),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ROBOFLOW_API_KEY": KEY},
        preexec_fn=_limit_file_size,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    stderr = err.decode()
    assert process.returncode == 2, stderr
    assert "cannot write the state" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert len(read_jsonl(out)) < 400  # how many got in first depends on the commit batches
    sent = (await emulator_stats(url))["requests"]
    assert sent < 400  # it stopped paying instead of classifying the rest
    code, stderr = await cli(*job(tmp_path / "in", url, out), "--resume")
    assert code == 0, stderr
    rows = read_jsonl(out)
    assert sorted(row["source"] for row in rows) == sorted(map(str, paths))


async def test_a_file_name_that_is_not_utf8_is_kept_exactly_and_resumable(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    folder = tmp_path / "in"
    images(folder, 40)
    latin1 = os.fsencode(folder) + b"/caf\xe9.png"
    make_image(Path(os.fsdecode(latin1)), seed=999, size=(12, 12))
    out, table = tmp_path / "r.jsonl", tmp_path / "r.csv"
    code, stderr = await cli(*job(folder, url, out, table))
    assert code == 0, stderr
    rows = read_jsonl(out)
    assert len(rows) == 41
    [odd] = [row for row in rows if "source_bytes" in row]
    assert odd["status"] == "ok"
    assert odd["source"].endswith("caf\\xe9.png")  # readable
    assert base64.b64decode(odd["source_bytes"]) == latin1  # exact
    assert any(row["source"].endswith("caf\\xe9.png") for row in read_csv(table))
    code, stderr = await cli(*job(folder, url, out, table), "--resume")
    assert code == 0, stderr
    assert len(read_jsonl(out)) == 41 and len(read_csv(table)) == 41
    assert (await emulator_stats(url))["requests"] == 41  # the resume sent nothing
    code, stderr = await cli("verify", str(folder), "--out", str(out), "--out", str(table))
    assert code == 0, stderr


class _SlowSink:
    """Takes its pending rows, then needs a while to write them (a slow disk, a network file
    system): a flush cut off half way would lose them."""

    def __init__(self) -> None:
        self.rows_received = 0
        self.rows_written = 0
        self._pending = 0

    async def write(self, result: Result) -> None:
        self.rows_received += 1
        self._pending += 1

    async def flush(self) -> None:
        taken, self._pending = self._pending, 0
        await asyncio.sleep(0.3)
        self.rows_written += taken

    async def aclose(self) -> None:
        await self.flush()


async def test_a_flush_in_progress_is_never_cut_off_at_the_end(
    tmp_path: Path, start_emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end-of-run race: the writer cancelled its tick while a flush had taken rows."""
    monkeypatch.setattr(batchclassify.runner, "FLUSH_INTERVAL", 0.0)  # a flush every tick
    url = await start_emulator(latency_ms=5)
    images(tmp_path / "in", 600)  # ~1 s: flushes with rows in them are cut off on old code
    sink = _SlowSink()
    stats = await run(
        [str(tmp_path / "in")],
        options(url),
        sinks=[sink],
        state=JobState(path=tmp_path / "r.state"),
    )
    assert stats.total == 600
    assert sink.rows_received == sink.rows_written == 600


async def test_every_output_holds_every_row_run_after_run(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    """The end-of-run flush race lost the last batch of rows (913 of 20 291)."""
    url = await start_emulator()
    images(tmp_path / "in", 2000)
    for attempt in range(2):
        out, table = tmp_path / f"r{attempt}.jsonl", tmp_path / f"r{attempt}.csv"
        code, stderr = await cli(*job(tmp_path / "in", url, out, table), "-c", "16")
        assert code == 0, stderr
        rows = read_jsonl(out)
        assert len(rows) == 2000 and len({row["source"] for row in rows}) == 2000
        assert [row["source"] for row in read_csv(table)] == [row["source"] for row in rows]
        state = sqlite3.connect(f"{out}.state")
        assert state.execute("SELECT count(*) FROM results").fetchone()[0] == 2000
        state.close()


# --- paths: refused before the first request ----------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--summary", "{tmp}/r.jsonl"], "--summary"),
        (["--summary", "{tmp}/r.jsonl.state"], "are the same file"),
        (["--summary", "{tmp}/missing/s.json"], "does not exist"),
        (["--state", "{tmp}/r.csv"], "are the same file"),
        (["--out", "{tmp}/alias.csv"], "is given twice"),
        (["--out", "{tmp}/hard.csv"], "are the same file"),
        (["--organize", "{tmp}/r.csv"], "not a folder"),
        (["--out", "/proc/x.jsonl"], "no file can be created"),
    ],
)
async def test_a_bad_path_costs_no_request(
    tmp_path: Path, start_emulator: StartEmulator, extra: list[str], expected: str
) -> None:
    url = await start_emulator()
    images(tmp_path / "in", 5)
    out, table = tmp_path / "r.jsonl", tmp_path / "r.csv"
    table.write_text("")  # exists: the aliases below point at it
    (tmp_path / "alias.csv").symlink_to(table)
    os.link(table, tmp_path / "hard.csv")
    args = [arg.format(tmp=tmp_path) for arg in extra]
    code, stderr = await cli(*job(tmp_path / "in", url, out, table), "--overwrite", *args)
    assert code == 2, stderr
    assert expected in stderr and "Traceback" not in stderr
    assert (await emulator_stats(url))["requests"] == 0
    assert table.read_text() == ""  # the user's file is untouched


@pytest.mark.parametrize("state", [[], ["--no-state"]])
async def test_bad_list_lines_are_one_error_row_each(
    tmp_path: Path, start_emulator: StartEmulator, state: list[str]
) -> None:
    url = await start_emulator()
    good = images(tmp_path / "in", 3)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_bytes(
        f"{good[0]}\n".encode() + b"bad\x00name.jpg\n" + b"\xff\xfe junk \x80\n"
    )
    (lists / "b.jsonl").write_bytes(
        b'{"path": "a\\ud800.jpg"}\n' + f'{{"path": "{good[1]}"}}\n'.encode()
    )
    (lists / "c.csv").write_bytes(
        b"path,id\n" + f"{good[2]},1\n".encode() + b"\x00\xff\xfe,2\n" + b"\x81\x82\x83,3\n"
    )
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        "run",
        str(lists / "a.txt"),
        str(lists / "b.jsonl"),
        str(lists / "c.csv"),
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--out",
        str(out),
        *state,
    )
    assert code == 1, stderr
    rows = read_jsonl(out)
    assert len(rows) == 8  # 3 good, 5 bad lines: one row each
    assert sum(row["status"] == "ok" for row in rows) == 3
    assert (await emulator_stats(url))["requests"] == 3


async def test_a_damaged_state_is_a_clear_error_on_resume(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    images(tmp_path / "in", 30)
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(*job(tmp_path / "in", url, out))
    assert code == 0, stderr
    state = Path(f"{out}.state")
    state.write_bytes(state.read_bytes()[:6000])  # truncated during a run (a copy, a crash)
    code, stderr = await cli(*job(tmp_path / "in", url, out), "--resume")
    assert code == 2, stderr
    assert "is damaged or not a state" in stderr and "--overwrite" in stderr
    assert "Traceback" not in stderr


async def test_parquet_survives_wrongly_typed_answers_and_resume(
    tmp_path: Path, hostile_server: Any
) -> None:
    parquet = pytest.importorskip("pyarrow.parquet")
    images(tmp_path / "in", 10)
    out, table = tmp_path / "r.jsonl", tmp_path / "r.parquet"
    endpoint = hostile_server.url("bad-types", every=3)
    for extra in ([], ["--resume"]):
        code, stderr = await cli(
            *job(tmp_path / "in", endpoint, out, table), "--retries", "1", *extra
        )
        assert code == 1, stderr
        assert "Traceback" not in stderr
    rows = parquet.read_table(table).to_pylist()
    assert len(rows) == 10 == len(read_jsonl(out))
    bad = [row for row in rows if row["status"] == "error"]
    assert bad and {row["error_type"] for row in bad} == {"malformed_response"}


def test_csv_rows_come_from_the_same_record_as_jsonl() -> None:
    result = Result(
        source="caf\udce9.jpg",
        status="ok",
        top="=cmd",
        confidence=0.5,
        predicted_classes=("=cmd",),
        predictions={"=cmd": 0.5},
    )
    row = result_to_csv_row(result)
    assert row[0] == "caf\\xe9.jpg" and row[2] == "'=cmd" and row[4] == "'=cmd"

"""``--processes N``: the same guarantees as one process. The real command in a subprocess,
worker processes and all, against the emulator; killed with SIGKILL where it hurts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from conftest import ServeBytes, StartEmulator
from helpers import (
    emulator_stats,
    expected_answer,
    image_bytes,
    make_image,
    read_csv,
    read_jsonl,
    run_cli,
    start_cli,
)

from batchclassify.config import RunSettings
from batchclassify.errors import ConfigError
from batchclassify.processes import auto_processes
from batchclassify.state import in_shard

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


def check_exactly_once(out: Path, files: dict[str, bytes], *, csv: bool = True) -> None:
    records = read_jsonl(out)
    assert sorted(r["source"] for r in records) == sorted(files)
    assert all(r["status"] == "ok" for r in records)
    for record in records:
        assert record["top"] == expected_answer(files[record["source"]])["top"]
    if csv:
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


# --- combinations, interruptions, crashes and hygiene ----------------------------------------


async def start_group(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """The CLI in a process group of its own, so that a test can press Ctrl-C as a terminal
    does: SIGINT to every process of the foreground group, the workers included."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchclassify",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "ROBOFLOW_API_KEY": KEY, **(env or {})},
        start_new_session=True,
    )


def ctrl_c(process: asyncio.subprocess.Process) -> None:
    os.killpg(process.pid, signal.SIGINT)


async def wait_for(condition: Callable[[], bool], what: str, seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def workers_of(pid: int) -> list[int]:
    """The worker processes of a run (not multiprocessing's resource tracker)."""
    found = []
    for child in children_of(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


async def none_left(pids: Sequence[int]) -> None:
    """Every process of a finished run is gone (no orphan still sending, no zombie)."""
    await wait_for(lambda: not any(alive(pid) for pid in pids), "the workers to exit", 5)


def clean(stderr: str) -> None:
    """What a run must never print, whatever happened."""
    assert KEY not in stderr
    assert "resource_tracker" not in stderr and "leaked" not in stderr, stderr
    assert "KeyboardInterrupt" not in stderr, stderr


async def test_labels_eval_keep_columns_parquet_and_organize_with_two_processes(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    """Everything that happens in the parent (labels, the evaluation, list columns, every
    output format, organize) sees each row once, whichever worker classified it."""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    url = await start_emulator(latency_ms=2)
    files = dataset(tmp_path / "in", 24)
    listing = tmp_path / "list.csv"
    lines = ["path,id,split"]
    ids = {}
    for number, path in enumerate(sorted(files)):
        ids[path] = f"id{number}"
        lines.append(f"{path},id{number},s{number % 2}")
    lines.append(f"{tmp_path / 'gone.png'},lost,s0")  # a missing file: an error row
    lines.append('broken,"never closed')  # the rest of the list is one broken entry
    listing.write_text("\n".join(lines) + "\n")
    out, table, columnar = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "r.parquet"
    scores, sorted_dir = tmp_path / "eval.json", tmp_path / "sorted"
    code, stderr = await cli(
        "run", str(listing), "--model", "demo/1", "--endpoint", url, "--processes", "2",
        "--out", str(out), "--out", str(table), "--out", str(columnar),
        "--keep-columns", "id,split", "--labels", "parent", "--eval", str(scores),
        "--organize", str(sorted_dir),
    )  # fmt: skip
    clean(stderr)
    assert code == 1, stderr  # the missing file and the broken line
    rows = read_jsonl(out)
    assert len(rows) == 26 and len({row["source"] for row in rows}) == 26
    good = [row for row in rows if row["status"] == "ok"]
    assert sorted(row["source"] for row in good) == sorted(files)
    for row in good:
        assert row["columns"] == {"id": ids[row["source"]], "split": row["columns"]["split"]}
        assert row["label"] == Path(row["source"]).parent.name
        assert row["correct"] is (row["top"] == row["label"])
        assert row["top"] == expected_answer(files[row["source"]])["top"]
    errors = {row["error"]["type"] for row in rows if row["status"] != "ok"}
    assert len(errors) >= 1 and all(row["columns"] is not None for row in rows)
    csv_rows = read_csv(table)
    assert [row["source"] for row in csv_rows] == [row["source"] for row in rows]
    assert all(row["id"] == ids[row["source"]] for row in csv_rows if row["status"] == "ok")
    assert parquet.read_table(columnar).num_rows == 26
    evaluation = json.loads(scores.read_text())
    assert evaluation["labeled"] == 24 and evaluation["correct"] == sum(
        row["correct"] for row in good
    )
    organized = [path for path in sorted_dir.rglob("*") if path.is_file()]
    assert len(organized) == 24


async def test_shards_times_processes_cover_every_input_exactly_once(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    """Each input falls in one part of one shard: 3 machines x 2 processes classify it once."""
    names = [f"photos/{n}/img{n:05d}.jpg" for n in range(3000)]
    cells = {(k, p): 0 for k in range(3) for p in range(2)}
    for name in names:
        homes = [(k, p) for k, p in cells if in_shard(name, (k, 3), (p, 2))]
        assert len(homes) == 1, name
        assert in_shard(name, (homes[0][0], 3))
        cells[homes[0]] += 1
    assert min(cells.values()) > 3000 / 6 * 0.8, cells  # even parts, not one empty process

    url = await start_emulator(latency_ms=2)
    files = dataset(tmp_path / "in", 45)
    outs = [tmp_path / f"shard{k}.jsonl" for k in range(3)]
    results = await asyncio.gather(
        *(
            cli(*command(url, tmp_path / "in", outs[k], "--processes", "2", "--shard", f"{k}/3"))
            for k in range(3)
        )
    )
    for code, stderr in results:
        assert code == 0, stderr
        clean(stderr)
    sources = [row["source"] for out in outs for row in read_jsonl(out)]
    assert sorted(sources) == sorted(files)
    for k, out in enumerate(outs):
        assert all(in_shard(row["source"], (k, 3)) for row in read_jsonl(out))
    assert (await emulator_stats(url))["requests"] == 45


async def test_scan_with_processes_sends_only_new_files_and_stops_on_ctrl_c(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=2)
    folder = tmp_path / "in"
    files = dataset(folder, 12)
    out = tmp_path / "scan.jsonl"
    args = [
        "scan", str(folder), "--model", "demo/1", "--endpoint", url, "--out", str(out),
        "--processes", "2", "--interval", "0.2",
    ]  # fmt: skip
    process = await start_group(*args)
    await wait_for(lambda: out.exists() and len(read_jsonl(out)) == 12, "the first cycle")
    for n in range(100, 103):
        path = make_image(folder / "new" / f"{n}.png", seed=n, size=(16, 16))
        files[str(path)] = path.read_bytes()
    await wait_for(lambda: len(read_jsonl(out)) == 15, "a later cycle to find the new files")
    workers = workers_of(process.pid)
    ctrl_c(process)
    _, stderr_bytes = await asyncio.wait_for(process.communicate(), 30)
    stderr = stderr_bytes.decode()
    clean(stderr)
    assert process.returncode == 130, stderr
    assert "run the same scan again" in stderr and "worker process" not in stderr
    check_exactly_once(out, files, csv=False)
    assert (await emulator_stats(url))["requests"] == 15  # done files cost no request
    await none_left(workers)


async def test_ctrl_c_while_workers_start_then_twice_then_resume_is_exactly_once(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    """Ctrl-C reaches every process of the group. A worker still importing its modules must
    not die of it (it would stop the run as a crash); a second Ctrl-C aborts the requests in
    flight; either way --resume completes the run, each input once."""
    url = await start_emulator(latency_ms=200)  # slow enough that no load lets it finish first
    files = dataset(tmp_path / "in", 40)
    out = tmp_path / "r.jsonl"
    args = command(url, tmp_path / "in", out, "--processes", "2", "--concurrency", "4")

    process = await start_group(*args)
    await wait_for(lambda: len(workers_of(process.pid)) >= 1, "a worker to be spawned")
    workers = workers_of(process.pid)
    ctrl_c(process)  # at once: the workers are still starting
    _, stderr_bytes = await asyncio.wait_for(process.communicate(), 30)
    stderr = stderr_bytes.decode()
    clean(stderr)
    assert process.returncode == 130, stderr
    assert "with --resume to continue" in stderr and "worker process" not in stderr
    await none_left(workers)

    process = await start_group(*args, "--resume")
    await wait_for(lambda: out.exists() and len(read_jsonl(out)) >= 4, "rows to flow")
    workers = workers_of(process.pid)
    ctrl_c(process)
    await asyncio.sleep(0.05)
    ctrl_c(process)  # the second: stop now, requests in flight are cancelled
    _, stderr_bytes = await asyncio.wait_for(process.communicate(), 30)
    stderr = stderr_bytes.decode()
    clean(stderr)
    assert process.returncode == 130, stderr
    assert "not started" in stderr and "closing check" not in stderr
    assert len(read_jsonl(out)) < 40
    await none_left(workers)

    code, stderr = await cli(*args, "--resume")
    assert code == 0, stderr
    check_exactly_once(out, files)


async def test_an_outage_in_the_workers_stops_the_run_and_their_logs_are_redacted(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(api_key=KEY, fail_statuses={503: 1.0})
    dataset(tmp_path / "in", 20)
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        *command(url, tmp_path / "in", out, "--processes", "2", "--concurrency", "2"),
        "--max-outage",
        "0.5",
        "-vv",
    )
    clean(stderr)
    assert code == 2, stderr
    assert "no request has succeeded for over 0.5 s" in stderr
    # -vv: the workers' own debug and retry lines are there, through the redacting handler.
    assert stderr.count("attempt 1/") >= 2, stderr
    assert "api_key=" not in stderr or "api_key=***" in stderr
    assert len(read_jsonl(out)) == 0
    assert "20 inputs not started" in stderr


#: loaded by every Python process of a test run through PYTHONPATH: in worker processes
#: only, it makes the serialisation of rows raise (a bug) after a few rows, quoting the key
_CRASH_SITECUSTOMIZE = """
import os, sys
if "--multiprocessing-fork" in sys.argv and os.environ.get("TEST_CRASH_AFTER"):
    import batchclassify.model as model
    real, calls = model.record_json, [0]

    def failing(result):
        calls[0] += 1
        if calls[0] > int(os.environ["TEST_CRASH_AFTER"]):
            raise ValueError("bug in a worker, key " + os.environ["ROBOFLOW_API_KEY"])
        return real(result)

    model.record_json = failing
"""


async def test_a_worker_raising_stops_the_run_with_its_message_and_resume_completes_it(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_CRASH_SITECUSTOMIZE)
    url = await start_emulator(latency_ms=5)
    files = dataset(tmp_path / "in", 80)
    out = tmp_path / "r.jsonl"
    args = command(url, tmp_path / "in", out, "--processes", "2", "--concurrency", "4")
    path = os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])
    process = await start_group(*args, env={"PYTHONPATH": path, "TEST_CRASH_AFTER": "10"})
    _, stderr_bytes = await asyncio.wait_for(process.communicate(), 30)
    stderr = stderr_bytes.decode()
    clean(stderr)
    assert process.returncode == 2, stderr
    assert "error: run stopped: worker process" in stderr
    assert "ValueError: bug in a worker, key ***" in stderr
    assert "Traceback" in stderr  # the bug is shown (redacted), for a report
    assert "closing check" not in stderr  # every input accounted for
    assert 10 <= len(read_jsonl(out)) < 80

    code, stderr = await cli(*args, "--resume")
    assert code == 0, stderr
    check_exactly_once(out, files)


async def test_more_processes_than_inputs_an_empty_folder_and_one_progress_bar(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=2)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "empty.jsonl"
    code, stderr = await cli(*command(url, tmp_path / "empty", out, "--processes", "2"))
    clean(stderr)
    assert code == 0, stderr
    assert "0 images" in stderr and read_jsonl(out) == []

    files = dataset(tmp_path / "in", 3)
    out = tmp_path / "r.jsonl"
    code, stderr = await cli(
        *command(url, tmp_path / "in", out, "--processes", "4", "--progress"),
    )
    clean(stderr)
    assert code == 0, stderr
    check_exactly_once(out, files)
    # One bar, with its total: every frame counts up to 3, none of them per process.
    frames = [(int(done), int(total)) for done, total in re.findall(r"(\d+)/(\d+) \[", stderr)]
    assert frames and frames[-1] == (3, 3), stderr
    assert all(total == 3 for _, total in frames), stderr
    assert [done for done, _ in frames] == sorted(done for done, _ in frames), stderr


async def test_urls_and_file_names_that_are_not_utf8_with_two_processes(
    tmp_path: Path, start_emulator: StartEmulator, serve_bytes: ServeBytes
) -> None:
    """A name that is not UTF-8 is hashed to its part, pickled to its worker and written back
    exactly; URLs are downloaded in the workers (--url-mode fetch); resume sends nothing."""
    url = await start_emulator(latency_ms=2)
    served = {f"/u{n}.png": image_bytes(seed=300 + n, size=(16, 16), fmt="PNG") for n in range(6)}
    base = await serve_bytes({**served, "/gone.png": 404})
    folder = tmp_path / "in"
    raw_names = [os.fsencode(folder) + b"/caf\xe9-%d.png" % n for n in range(6)]
    for n, raw in enumerate(raw_names):
        make_image(Path(os.fsdecode(raw)), seed=400 + n, size=(16, 16))
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{base}{name}\n" for name in [*served, "/gone.png"]))
    out = tmp_path / "r.jsonl"
    args = [
        "run", str(folder), str(listing), "--model", "demo/1", "--endpoint", url,
        "--out", str(out), "--out", str(out.with_suffix(".csv")), "--processes", "2",
        "--url-mode", "fetch",
    ]  # fmt: skip
    code, stderr = await cli(*args)
    clean(stderr)
    assert code == 1, stderr  # the 404
    rows = read_jsonl(out)
    assert len(rows) == 13 and len(read_csv(out.with_suffix(".csv"))) == 13
    named = sorted(base64.b64decode(row["source_bytes"]) for row in rows if "source_bytes" in row)
    assert named == sorted(raw_names)
    by_url = {row["source"]: row for row in rows if row["source"].startswith(base)}
    assert set(by_url) == {base + name for name in [*served, "/gone.png"]}
    for name, data in served.items():
        assert by_url[base + name]["top"] == expected_answer(data)["top"]
    assert by_url[base + "/gone.png"]["status"] == "error"
    requests = (await emulator_stats(url))["requests"]
    code, stderr = await cli(*args, "--resume")
    assert code == 0, stderr  # the 404 is final: not tried again
    assert "nothing left to do" in stderr and len(read_jsonl(out)) == 13
    assert (await emulator_stats(url))["requests"] == requests


_LIBRARY_SCRIPT = """
import asyncio, json, multiprocessing, os, sys
from pathlib import Path
from batchclassify import ClientOptions, JobState, PipelineOptions, run

def open_fds():
    return len(os.listdir("/proc/self/fd"))

def children():
    found = []
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid():
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            found.append((fields[0], "resource_tracker" in str(cmdline)))
    return found

def job(number):
    endpoint, folder, out = sys.argv[1:4]
    options = PipelineOptions(
        client=ClientOptions(
            model="demo", version=1, api_key=os.environ["ROBOFLOW_API_KEY"], endpoint=endpoint
        ),
        processes=2,
    )
    stats = asyncio.run(
        run([folder], options, outputs=[f"{out}{number}.jsonl"],
            state=JobState(path=Path(f"{out}{number}.state")))
    )
    return {"ok": stats.ok, "fds": open_fds(), "children": children(),
            "active": len(multiprocessing.active_children())}

GUARD
"""


async def test_the_library_api_with_processes_from_a_script(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    """batchclassify.run(processes=2) from a user's script: twice in one process, with no
    file descriptor, worker or zombie left behind; without the main guard, a clear error."""
    url = await start_emulator(latency_ms=2)
    dataset(tmp_path / "in", 8)
    guarded = tmp_path / "guarded.py"
    guarded.write_text(
        _LIBRARY_SCRIPT.replace(
            "GUARD", 'if __name__ == "__main__":\n    print(json.dumps([job(0), job(1)]))'
        )
    )
    unguarded = tmp_path / "unguarded.py"
    unguarded.write_text(_LIBRARY_SCRIPT.replace("GUARD", "print(json.dumps(job(0)))"))
    env = {**os.environ, "ROBOFLOW_API_KEY": KEY}
    folder, out = str(tmp_path / "in"), str(tmp_path / "lib")

    async def script(path: Path, prefix: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(path), url, folder, out + prefix, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, stdout.decode(), stderr.decode()

    (code, stdout, stderr), (bad_code, _, bad_stderr) = await asyncio.gather(
        script(guarded, "g"), script(unguarded, "u")
    )
    assert code == 0, stderr
    clean(stderr)
    first, second = json.loads(stdout)
    assert first["ok"] == second["ok"] == 8
    assert second["fds"] == first["fds"], "a run leaked file descriptors"
    for after in (first, second):
        # Only multiprocessing's resource tracker (one per interpreter) outlives a run.
        assert after["active"] == 0 and all(tracker for _, tracker in after["children"])
        assert len(after["children"]) <= 1

    assert bad_code != 0
    assert KEY not in bad_stderr
    # The worker's copy of the job refuses to start (not a second job fighting the first)...
    assert "ConfigError: batchclassify.run was called while a --processes worker" in bad_stderr
    # ... and the job itself says why its worker died.
    assert "each worker process imports the script again" in bad_stderr


async def test_requests_per_server_add_up_over_the_workers(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    first, second = await start_emulator(), await start_emulator()
    dataset(tmp_path / "in", 40)
    out = tmp_path / "r.jsonl"
    summary = tmp_path / "summary.json"
    code, stderr = await cli(
        *command(first, tmp_path / "in", out, "--processes", "2", "--endpoint", second),
        "--summary",
        str(summary),
    )
    assert code == 0, stderr
    stats = json.loads(summary.read_text())
    served = [(await emulator_stats(url))["requests"] for url in (first, second)]
    assert sum(served) == 40 and min(served) > 0
    assert [stats["endpoints"][url]["requests"] for url in (first, second)] == served


class _SinkThatBreaks:
    """Breaks on its third row, inside the writer's loop over the rows (no state)."""

    def __init__(self) -> None:
        self.rows = 0

    async def write(self, result: object) -> None:
        self.rows += 1
        if self.rows == 3:
            raise RuntimeError("the sink broke")

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_a_writer_failing_mid_batch_counts_every_row_of_the_workers(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    from batchclassify import ClientOptions, JobState, PipelineOptions, RunAborted, run

    url = await start_emulator()
    dataset(tmp_path / "in", 60)
    client = ClientOptions(endpoint=url, model="demo", version=1, api_key=KEY, concurrency=8)
    with pytest.raises(RunAborted) as caught:
        await run(
            [str(tmp_path / "in")],
            PipelineOptions(client=client, processes=2),
            sinks=[_SinkThatBreaks()],
            state=JobState(path=None),
        )
    message = str(caught.value)
    assert "the sink broke" in message
    # The rows of the batch it broke in are counted as not started, not lost.
    assert "closing check" not in message, message

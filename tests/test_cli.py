"""The ``batchclassify`` command as a user runs it: a subprocess against a real emulator."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest
from conftest import StartEmulator
from helpers import emulator_stats, make_image, read_csv, run_cli, start_cli

REPO = Path(__file__).resolve().parent.parent
KEY = "cli-secret-key-987"


async def cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> tuple[int, str, str]:
    return await run_cli(*args, env={"ROBOFLOW_API_KEY": "", **(env or {})}, stdin=stdin)


def job(folder: Path, url: str) -> list[str]:
    """``run FOLDER`` against the emulator at ``url`` with the test key."""
    return ["run", str(folder), "--model", "demo/1", "--endpoint", url, "--api-key", KEY]


def files(root: Path, count: int, *, first: int = 0) -> list[Path]:
    numbers = range(first, first + count)
    return [make_image(root / f"{n:03d}.jpg", seed=n, size=(32, 24)) for n in numbers]


async def test_quickstart_command_from_the_readme(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    assert "batchclassify run samples/ --model demo/1 --emulate" in readme
    out = tmp_path / "results.jsonl"
    table = tmp_path / "results.csv"
    code, _stdout, stderr = await cli(
        "run",
        str(REPO / "samples"),
        "--model",
        "demo/1",
        "--emulate",
        "--out",
        str(out),
        "--out",
        str(table),
    )
    assert code == 0, stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(list((REPO / "samples").rglob("*.*"))) >= 5
    assert all(record["status"] == "ok" for record in records)
    assert "ok, 0 failed" in stderr
    assert len(read_csv(table)) == len(records)


async def test_failed_items_exit_1_and_key_never_leaks(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    files(tmp_path / "in", 5)
    (tmp_path / "in" / "bad.jpg").write_text("not an image")
    out, table, summary = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "s.json"
    code, stdout, stderr = await cli(
        "run",
        str(tmp_path / "in"),
        "--model",
        "ws/demo/1",
        "--endpoint",
        url,
        "--out",
        str(out),
        "--out",
        str(table),
        "--summary",
        str(summary),
        env={"ROBOFLOW_API_KEY": KEY},
    )
    assert code == 1, stderr
    assert "5 ok, 1 failed" in stderr
    data = json.loads(summary.read_text())
    assert data["total"] == 6 and data["ok"] == 5 and data["failed_by_type"]
    for text in (stdout, stderr, out.read_text(), table.read_text(), summary.read_text()):
        assert KEY not in text


async def test_existing_output_is_refused_unless_overwrite(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    files(tmp_path / "in", 2)
    out = tmp_path / "r.jsonl"
    out.write_text("precious\n")
    args = ["run", str(tmp_path / "in"), "--model", "demo/1", "--endpoint", url, "-o", str(out)]
    code, _, stderr = await cli(*args, "--api-key", KEY)
    assert code == 2
    assert "already exists" in stderr and "--overwrite" in stderr
    assert out.read_text() == "precious\n"
    assert (await emulator_stats(url))["requests"] == 0
    code, _, stderr = await cli(*args, "--api-key", KEY, "--overwrite")
    assert code == 0, stderr
    assert len(out.read_text().splitlines()) == 2


async def test_stdout_output_and_stdin_source(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    images = files(tmp_path / "in", 3)
    listing = "\n".join(map(str, images)).encode()
    code, stdout, stderr = await cli(
        "run",
        "-",
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--api-key",
        KEY,
        "--out",
        "-",
        stdin=listing,
    )
    assert code == 0, stderr
    assert sorted(json.loads(line)["source"] for line in stdout.splitlines()) == sorted(
        map(str, images)
    )


async def test_usage_errors_exit_2(tmp_path: Path) -> None:
    code, _, stderr = await cli("run", str(tmp_path), "--model", "nonsense")
    assert code == 2 and "PROJECT/VERSION" in stderr
    code, _, stderr = await cli("run", str(tmp_path), "--model", "demo/1")
    assert code == 2 and "ROBOFLOW_API_KEY" in stderr
    code, _, stderr = await cli(
        "run", str(tmp_path), "--model", "demo/1", "--emulate", "--concurrency", "0"
    )
    assert code == 2 and "--concurrency" in stderr
    code, _, stderr = await cli(
        "run", str(tmp_path), "--model", "demo/1", "--emulate", "--out", str(tmp_path / "x.xlsx")
    )
    assert code == 2 and ".jsonl, .csv or .parquet" in stderr
    code, _, _ = await cli("run")
    assert code == 2


async def test_wrong_key_stops_fast_with_exit_2(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(api_key="the-real-key")
    files(tmp_path / "in", 100)
    out = tmp_path / "r.jsonl"
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, stdout, stderr = await cli(
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
        env={"ROBOFLOW_API_KEY": KEY},
    )
    assert code == 2, stderr
    assert loop.time() - started < 15
    assert "API key" in stderr and "ROBOFLOW_API_KEY" in stderr
    assert (await emulator_stats(url))["requests"] <= 4
    for text in (stdout, stderr, out.read_text()):
        assert KEY not in text


async def test_sigint_mid_run_flushes_and_exits_130(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=40)
    files(tmp_path / "in", 300)
    out, table = tmp_path / "r.jsonl", tmp_path / "r.csv"
    process = await start_cli(
        *job(tmp_path / "in", url),
        "--concurrency",
        "4",
        "--out",
        str(out),
        "--out",
        str(table),
    )
    for _ in range(200):  # wait until results are flowing
        await asyncio.sleep(0.05)
        if out.exists() and out.stat().st_size > 0:
            break
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    stderr = err.decode()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "images in" in stderr
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert 0 < len(records) < 300
    rows = read_csv(table)
    assert [row["source"] for row in rows] == [record["source"] for record in records]
    served = await emulator_stats(url)
    assert served["requests"] == len(records)  # nothing sent that was not written


async def test_help_explains_every_option() -> None:
    code, stdout, _ = await cli("run", "--help")
    assert code == 0
    for option in (
        "--model",
        "--endpoint",
        "--api-key",
        "--out",
        "--overwrite",
        "--concurrency",
        "--rate",
        "--retries",
        "--timeout",
        "--max-size",
        "--emulate",
        "--fetch-urls",
        "--no-progress",
        "--summary",
        "--max-failures",
        "examples:",
    ):
        assert option in stdout


async def test_parquet_output_holds_the_jsonl_rows_and_survives_resume(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    parquet = pytest.importorskip("pyarrow.parquet")
    url = await start_emulator()
    files(tmp_path / "in", 4)
    (tmp_path / "in" / "bad.jpg").write_text("nope")
    out, table = tmp_path / "r.jsonl", tmp_path / "r.parquet"
    args = [
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--api-key",
        KEY,
        "--out",
        str(out),
        "--out",
        str(table),
    ]
    code, _, stderr = await cli("run", str(tmp_path / "in"), *args)
    assert code == 1, stderr
    rows = parquet.read_table(table).to_pylist()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["source"] for row in rows] == [r["source"] for r in records]
    for row, record in zip(rows, records, strict=True):
        assert row["top"] == record["top"] and row["status"] == record["status"]
        assert dict(row["predictions"] or []) == record["predictions"]
        assert row["error_type"] == (record["error"] or {}).get("type")
    assert not table.with_name("r.parquet.partial").exists()

    files(tmp_path / "more", 2, first=100)
    code, _, stderr = await cli(
        "run", str(tmp_path / "in"), str(tmp_path / "more"), *args, "--resume"
    )
    assert code == 0, stderr
    assert len(parquet.read_table(table).to_pylist()) == 7


async def test_emulated_runs_can_be_resumed(tmp_path: Path) -> None:
    """The built-in emulator gets a new port each run; its state must still match."""
    files(tmp_path / "in", 3)
    out = tmp_path / "r.jsonl"
    args = ["run", str(tmp_path / "in"), "--model", "demo/1", "--emulate", "--out", str(out)]
    assert (await cli(*args))[0] == 0
    files(tmp_path / "in", 2, first=50)
    code, _, stderr = await cli(*args, "--resume")
    assert code == 0, stderr
    assert "2 images" in stderr
    assert len(out.read_text().splitlines()) == 5


async def test_verbose_logs_retries_without_the_key(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(fail_rate=0.5, reset_rate=0.2, seed=3)
    files(tmp_path / "in", 10)
    code, stdout, stderr = await cli(
        *job(tmp_path / "in", url),
        "--retries",
        "20",
        "--max-wait",
        "0.05",
        "-vv",
        "--out",
        str(tmp_path / "r.jsonl"),
    )
    assert code == 0, stderr
    assert "retrying in" in stderr
    assert KEY not in stderr and KEY not in stdout


async def test_report_command_writes_a_page_from_a_run(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    files(tmp_path / "in", 6)
    (tmp_path / "in" / "bad.jpg").write_text("no")
    out, summary = tmp_path / "r.jsonl", tmp_path / "s.json"
    code, _, stderr = await cli(
        *job(tmp_path / "in", url),
        "--out",
        str(out),
        "--summary",
        str(summary),
    )
    assert code == 1, stderr
    code, _, stderr = await cli("report", str(out), "--summary", str(summary))
    assert code == 0, stderr
    page = (tmp_path / "r.html").read_text()
    assert 'id="total">7<' in page and 'id="failed">1<' in page
    code, _, stderr = await cli("report", str(out))
    assert code == 2 and "already exists" in stderr


async def test_an_endpoint_that_is_not_a_url_is_a_usage_error(tmp_path: Path) -> None:
    code, _, stderr = await cli(
        "run",
        str(REPO / "samples"),
        "--model",
        "demo/1",
        "--api-key",
        KEY,
        "--endpoint",
        "classify.roboflow.com",
    )
    assert code == 2 and "--endpoint must be an http(s) URL" in stderr


async def test_a_full_disk_stops_the_run_with_a_clear_message(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full to simulate a full disk")
    url = await start_emulator(latency_ms=50)  # 200 images take ~1.3 s: several flushes
    files(tmp_path / "in", 200)
    full = tmp_path / "r.jsonl"
    full.symlink_to("/dev/full")
    code, _, stderr = await cli(
        *job(tmp_path / "in", url),
        "--out",
        str(full),
        "--overwrite",
        "--no-state",
    )
    assert code == 2, stderr
    assert "cannot write output" in stderr and "Traceback" not in stderr
    assert (await emulator_stats(url))["requests"] < 200  # it stopped, not ran to the end


async def test_shutdown_grace_bounds_the_wait_for_hung_requests(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(hang_rate=1.0)
    files(tmp_path / "in", 5)
    out = tmp_path / "r.jsonl"
    process = await start_cli(
        *job(tmp_path / "in", url),
        "--timeout",
        "60",
        "--shutdown-grace",
        "0.5",
        "--out",
        str(out),
    )
    for _ in range(200):  # wait until the requests hang in the server
        await asyncio.sleep(0.05)
        if (await emulator_stats(url))["in_flight"] > 0:
            break
    started = asyncio.get_running_loop().time()
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 130, err.decode()
    assert asyncio.get_running_loop().time() - started < 10  # not the 60 s request timeout
    assert out.read_text() == ""  # the hung items were not reported: a resume redoes them

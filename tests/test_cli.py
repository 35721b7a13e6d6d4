"""The ``batchclassify`` command as a user runs it: a subprocess against a real emulator."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import struct
import zlib
from pathlib import Path

import pytest
from conftest import StartEmulator
from helpers import emulator_stats, make_image, read_csv, run_cli, start_cli
from PIL import Image

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
    # The last line says how to go on, and doing so finishes the job.
    assert stderr.rstrip().splitlines()[-1] == (
        "interrupted: run the same command with --resume to continue where it stopped"
    )
    code, _, stderr = await cli(
        *job(tmp_path / "in", url), "--out", str(out), "--out", str(table), "--resume"
    )
    assert code == 0, stderr
    assert len(out.read_text().splitlines()) == len(read_csv(table)) == 300


@pytest.mark.parametrize(
    ("command", "options", "last_line"),
    [
        (
            "run",
            ["--no-state"],
            "interrupted: the inputs not reached were not classified, and without a state file "
            "(--no-state, or no --out FILE) a new run starts over",
        ),
        (
            "run",
            ["--resume"],  # already resuming: the same command again
            "interrupted: run the same command again to continue where it stopped",
        ),
        (
            "scan",
            [],  # a scan resumes by itself
            "interrupted: run the same scan again to continue (done files cost no request)",
        ),
    ],
    ids=["no-state", "resuming", "scan"],
)
async def test_sigint_says_how_to_continue(
    tmp_path: Path,
    start_emulator: StartEmulator,
    command: str,
    options: list[str],
    last_line: str,
) -> None:
    url = await start_emulator(latency_ms=40)
    files(tmp_path / "in", 200)
    out = tmp_path / "r.jsonl"
    args = [command, *job(tmp_path / "in", url)[1:], "--concurrency", "2", "--out", str(out)]
    process = await start_cli(*args, *options)
    for _ in range(200):
        await asyncio.sleep(0.05)
        if out.exists() and out.stat().st_size > 0:
            break
    process.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(process.communicate(), 30)
    stderr = err.decode()
    assert process.returncode == 130, stderr
    assert stderr.rstrip().splitlines()[-1] == last_line, stderr


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


async def test_a_mistyped_option_or_command_gets_a_suggestion(tmp_path: Path) -> None:
    code, stdout, stderr = await cli("run", str(tmp_path), "--concurency", "4")
    assert code == 2 and stdout == ""
    assert "unrecognized arguments: --concurency" in stderr
    assert "did you mean --concurrency?" in stderr
    assert "usage: batchclassify run" in stderr  # the usage of the command it was given to
    code, _, stderr = await cli("run", str(tmp_path), "--timout=5", "--emualte")
    assert code == 2
    assert "did you mean --timeout for --timout, --emulate for --emualte?" in stderr
    code, _, stderr = await cli("config", "show", "--shrad", "0/2")
    assert code == 2 and "did you mean --shard?" in stderr
    code, _, stderr = await cli("rn", str(tmp_path))
    assert code == 2 and "invalid choice: 'rn'" in stderr and "did you mean run?" in stderr
    code, _, stderr = await cli("config", "shwo")
    assert code == 2 and "did you mean show?" in stderr
    code, _, stderr = await cli("run", str(tmp_path), "--url-mode", "fetsh")
    assert code == 2 and "did you mean fetch?" in stderr
    # nothing close: no guess; an option of another command is not offered either
    code, _, stderr = await cli("run", str(tmp_path), "--xyzzy", "--interval", "5")
    assert code == 2 and "did you mean" not in stderr


async def test_shard_mistakes_are_explained(tmp_path: Path) -> None:
    files(tmp_path / "in", 1)
    base = ["run", str(tmp_path / "in"), "--model", "demo/1", "--emulate", "--out", "-"]
    code, _, stderr = await cli(*base, "--shard", "1/0")
    assert code == 2 and "N, the number of shards, must be at least 1" in stderr
    assert "K must" not in stderr
    code, _, stderr = await cli(*base, "--shard", "5/4")
    assert code == 2 and "--shard 5/4: K must be between 0 and 3" in stderr
    code, _, stderr = await cli(*base, "--shard", "x")
    assert code == 2 and "--shard must look like K/N" in stderr and "'x'" in stderr


async def test_stdout_given_twice_is_refused_before_any_request(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    files(tmp_path / "in", 2)
    code, stdout, stderr = await cli(*job(tmp_path / "in", url), "--out", "-", "-o", "-")
    assert code == 2, stderr
    assert "--out - (stdout) is given twice" in stderr
    assert stdout == ""
    assert (await emulator_stats(url))["requests"] == 0


async def test_emulate_and_endpoint_together_are_refused(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    files(tmp_path / "in", 2)
    code, stdout, stderr = await cli(*job(tmp_path / "in", url), "--emulate", "--out", "-")
    assert code == 2 and stdout == ""
    assert "--emulate (on the command line) and --endpoint (on the command line)" in stderr
    assert (await emulator_stats(url))["requests"] == 0
    # From two levels, the higher one wins: here the endpoint on the command line.
    args = ["run", str(tmp_path / "in"), "--model", "demo/1", "--endpoint", url, "--out", "-"]
    code, stdout, stderr = await cli(
        *args, env={"BATCHCLASSIFY_EMULATE": "true", "ROBOFLOW_API_KEY": KEY}
    )
    assert code == 0, stderr
    assert (await emulator_stats(url))["requests"] == 2


def _tiff(**params: object) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((96, 64), 60).convert("RGB").save(out, "TIFF", **params)
    return out.getvalue()


def _patched_tiff_tag(
    data: bytes, tag: int, *, count: int | None = None, value: int | None = None
) -> bytes:
    """A little-endian TIFF with one entry of its first IFD changed (its count or its SHORT
    value)."""
    patched = bytearray(data)
    assert patched[:4] == b"II*\x00"
    (ifd,) = struct.unpack_from("<I", patched, 4)
    (entries,) = struct.unpack_from("<H", patched, ifd)
    for n in range(entries):
        at = ifd + 2 + 12 * n
        if struct.unpack_from("<H", patched, at)[0] == tag:
            if count is not None:
                struct.pack_into("<I", patched, at + 4, count)
            if value is not None:
                struct.pack_into("<H", patched, at + 8, value)
            return bytes(patched)
    raise AssertionError(f"no tag {tag}")


def _noisy_images(root: Path) -> None:
    """Files that make Pillow and libtiff talk: libtiff errors written from C (broken LZW and
    deflate strips), a Pillow ERROR log record (absurd samples per pixel), Pillow warnings (an
    invalid APNG chunk; a tag larger than the file, several times, so that some are decoded on
    both threads at once), and files that are fine but odd (an unknown TIFF tag, junk after a
    WebP)."""
    root.mkdir()
    for compression in ("tiff_lzw", "tiff_adobe_deflate"):
        data = bytearray(_tiff(compression=compression))
        data[40:400] = bytes(range(256)) + bytes(104)
        (root / f"broken-{compression}.tif").write_bytes(bytes(data))
    (root / "samples.tif").write_bytes(_patched_tiff_tag(_tiff(), 277, value=2048))
    for n in range(40):
        data = _tiff(description=f"picture {n} " + "x" * 200)
        (root / f"odd-tag-{n:02d}.tif").write_bytes(_patched_tiff_tag(data, 270, count=10**7))
    (root / "unknown-tag.tif").write_bytes(
        _tiff(compression="tiff_lzw", tiffinfo={65000: "private"})
    )
    webp = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(webp, "WEBP")
    (root / "junk-after.webp").write_bytes(webp.getvalue() + b"JUNK" * 64)
    # An APNG control chunk claiming 0 frames: Pillow warns and reads the plain PNG, which is
    # sent as it is; the in-process emulator's decode then warns outside prepare's filters.
    png = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(png, "PNG")
    actl = b"acTL" + bytes(8)
    chunk = struct.pack(">I", 8) + actl + struct.pack(">I", zlib.crc32(actl))
    header_end = 8 + 25  # the signature, then the IHDR chunk
    data = png.getvalue()
    (root / "invalid-apng.png").write_bytes(data[:header_end] + chunk + data[header_end:])


async def test_image_library_noise_stays_off_stderr_without_verbose(tmp_path: Path) -> None:
    _noisy_images(tmp_path / "in")
    args = ["run", str(tmp_path / "in"), "--model", "demo/1", "--emulate", "--no-state"]
    code, _, stderr = await cli(*args, "--out", str(tmp_path / "quiet.jsonl"))
    assert code == 1, stderr  # the broken ones are failed rows
    lines = stderr.rstrip("\n").splitlines()
    assert re.fullmatch(r"\d+ images in .* failed", lines[0]), stderr  # the summary, and only it
    assert all(line.startswith("  ") for line in lines[1:]), stderr
    rows = [json.loads(line) for line in (tmp_path / "quiet.jsonl").read_text().splitlines()]
    status = {Path(row["source"]).name: row["status"] for row in rows}
    assert status["unknown-tag.tif"] == status["junk-after.webp"] == status["invalid-apng.png"]
    assert status["invalid-apng.png"] == "ok"
    assert status["odd-tag-00.tif"] == "ok" and status["broken-tiff_lzw.tif"] == "error"

    # With -v the same messages are log lines: libtiff's (written from C until now) included.
    code, _, stderr = await cli(*args, "-v", "--out", str(tmp_path / "verbose.jsonl"))
    assert code == 1, stderr
    assert "PIL.libtiff: " in stderr and "Decod" in stderr
    assert "ERROR PIL.TiffImagePlugin: More samples per pixel" in stderr
    # Pillow's warnings too (one file alone: no other decode on a thread can have the warning
    # filters of prepare in force meanwhile)
    alone = ["run", str(tmp_path / "in" / "invalid-apng.png"), "--model", "demo/1", "--emulate"]
    code, _, stderr = await cli(*alone, "-v", "--out", "-")
    assert code == 0, stderr
    assert "WARNING py.warnings: " in stderr and "Invalid APNG" in stderr

"""The first hour of a new user: the README's quickstart, then each mistake people made, through
the real command line, each answered in seconds with the words that say what to do."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from conftest import StartEmulator
from helpers import emulator_stats, make_image, read_csv, read_jsonl, run_cli

REPO = Path(__file__).resolve().parent.parent
KEY = "first-hour-key-31415"
#: a fast failure must come within this, on a loaded CI machine (the old wait was 600 s)
FAST_FAIL_S = 30


async def cli(
    *args: str, cwd: Path | None = None, stdin: bytes | None = None
) -> tuple[int, str, str]:
    return await run_cli(*args, env={"ROBOFLOW_API_KEY": KEY}, cwd=cwd, stdin=stdin)


def quickstart() -> list[str]:
    """The README's quickstart command, as written there (after the install)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"python -m pip install -e \. && (batchclassify run [^\n]+)", text)
    assert match, "the README's quickstart command moved"
    return match.group(1).split()[1:]


async def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    shutil.copytree(REPO / "samples", tmp_path / "samples")
    started = time.monotonic()
    code, _, err = await cli(*quickstart(), cwd=tmp_path)
    assert code == 0, err
    assert time.monotonic() - started < FAST_FAIL_S
    rows = read_jsonl(tmp_path / "results.jsonl")
    images = [p for p in (tmp_path / "samples").rglob("*") if p.suffix in (".jpg", ".png")]
    assert len(rows) == len(images) == len(read_csv(tmp_path / "results.csv"))
    assert f"{len(images)} images in" in err and "0 failed" in err
    code, _, err = await cli("verify", "samples/", "--out", "results.jsonl", cwd=tmp_path)
    assert code == 0 and "verified: complete" in err


@pytest.fixture
async def plain_server() -> AsyncIterator[Callable[[int, str], str]]:
    """A web server that is not a classify API: answers every request with one status/page."""
    runners: list[web.AppRunner] = []
    urls: dict[tuple[int, str], str] = {}

    async def start(status: int, body: str) -> str:
        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=status, text=body, content_type="text/html")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    async def url(status: int, body: str) -> str:
        key = (status, body)
        if key not in urls:
            urls[key] = await start(status, body)
        return urls[key]

    yield url  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (200, "<html><body>Welcome to nginx!</body></html>", "does not look like a classify API"),
        (405, "<html>Method Not Allowed</html>", "does not accept POST"),
        (501, "<html>Not Implemented</html>", "a plain web server answers 501 too"),
        (404, "<html>Not Found</html>", "check --model PROJECT/VERSION and --endpoint"),
    ],
)
async def test_a_wrong_endpoint_fails_fast_and_says_why(
    tmp_path: Path, plain_server: Callable[[int, str], object], status: int, body: str, says: str
) -> None:
    url = await plain_server(status, body)  # type: ignore[misc]
    for n in range(20):
        make_image(tmp_path / "in" / f"{n}.jpg", seed=n)
    started = time.monotonic()
    code, _, err = await cli(
        "run", str(tmp_path / "in"), "--model", "demo/1", "--endpoint", url, "--out", "-"
    )
    assert code == 2, err
    assert time.monotonic() - started < FAST_FAIL_S
    assert says in err and "Traceback" not in err


async def test_a_port_nobody_listens_on_fails_fast(tmp_path: Path) -> None:
    make_image(tmp_path / "in" / "a.jpg", seed=1)
    started = time.monotonic()
    code, _, err = await cli(
        "run", str(tmp_path / "in"), "--model", "demo/1", "--endpoint", "http://127.0.0.1:1"
    )
    assert code == 2, err
    assert time.monotonic() - started < FAST_FAIL_S
    assert "refuses connections" in err and "Check --endpoint" in err


EMULATED = ["--model", "demo/1", "--emulate"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["photoz/", *EMULATED], "input 'photoz/' does not exist (did you mean"),
        (["photos", *EMULATED, "--out", "-", "--out", "-"], "--out - (stdout) is given twice"),
        (["photos", *EMULATED, "--endpoint", "http://h:1"], "cannot be used together"),
        (["photos", "--model", "demo/1", "--concurency", "4"], "did you mean --concurrency?"),
        (["photos", *EMULATED, "--shard", "1/0"], "N, the number of shards, must be at least 1"),
        (
            ["photos", *EMULATED, "--out", "nodir/sub/a.jsonl"],
            "the folder for output 'nodir/sub/a.jsonl' does not exist",
        ),
        (
            ["photos", *EMULATED, "--keep-columns", "source"],
            "names a column every row already has",
        ),
    ],
)
async def test_each_mistake_is_a_usage_error_with_the_fix(
    tmp_path: Path, args: list[str], says: str
) -> None:
    make_image(tmp_path / "photos" / "a.jpg", seed=1)
    started = time.monotonic()
    code, out, err = await cli("run", *args, cwd=tmp_path)
    assert code == 2, err
    assert says in err and "Traceback" not in err
    assert out == ""
    assert time.monotonic() - started < FAST_FAIL_S


async def test_source_is_what_the_user_gave_and_columns_come_along(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    images = [make_image(tmp_path / "data" / f"{n}.jpg", seed=n) for n in range(3)]
    lists = tmp_path / "lists"
    lists.mkdir()
    # Paths as people write them: relative to the list, with ../ in them.
    (lists / "table.csv").write_text(
        "id,path,split\n" + "".join(f"{n},../data/{n}.jpg,train\n" for n in range(2))
    )
    (lists / "more.jsonl").write_text(json.dumps({"path": "../data/2.jpg", "id": 7}) + "\n")
    (lists / "bad.jsonl").write_text('{"image": 5}\n')
    out, table = tmp_path / "r.jsonl", tmp_path / "r.csv"
    stdin_line = f"{tmp_path}/x/../data/0.jpg"
    code, _, err = await cli(
        "run",
        str(lists / "table.csv"),
        str(lists / "more.jsonl"),
        str(lists / "bad.jsonl"),
        "-",
        "--model",
        "demo/1",
        "--endpoint",
        url,
        "--keep-columns",
        "id,split",
        "--out",
        str(out),
        "--out",
        str(table),
        stdin=f"{stdin_line}\n".encode(),
    )
    assert code == 1, err  # the bad line is a failed row
    rows = {row["source"]: row for row in read_jsonl(out)}
    assert rows["../data/0.jpg"]["path"] == str(images[0])
    assert rows["../data/0.jpg"]["columns"] == {"id": "0", "split": "train"}
    assert rows["../data/2.jpg"]["columns"] == {"id": 7, "split": None}
    assert rows[stdin_line]["columns"] == {"id": None, "split": None}
    bad = rows[f"{lists / 'bad.jsonl'}:1"]
    assert "field 'image' has the wrong type (found: 'image' is int)" in bad["error"]["message"]
    csv_rows = {row["source"]: row for row in read_csv(table)}
    assert csv_rows["../data/1.jpg"]["id"] == "1" and csv_rows["../data/1.jpg"]["split"] == "train"
    assert (await emulator_stats(url))["requests"] == 3  # the stdin copy of 0.jpg was deduped


async def test_resuming_says_what_was_done_before(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator()
    for n in range(6):
        make_image(tmp_path / "in" / f"{n}.jpg", seed=n)
    job = ["run", str(tmp_path / "in"), "--model", "demo/1", "--endpoint", url]
    job += ["--out", str(tmp_path / "r.jsonl")]
    code, _, err = await cli(*job)
    assert code == 0, err
    for n in range(6, 8):
        make_image(tmp_path / "in" / f"{n}.jpg", seed=n)
    code, _, err = await cli(*job, "--resume")
    assert code == 0 and "8 inputs: 6 done earlier, 2 now" in err
    code, _, err = await cli(*job, "--resume")
    assert code == 0 and "nothing left to do: every input already has its row" in err
    assert (await emulator_stats(url))["requests"] == 8


async def test_the_labeling_workflow_runs_as_written(tmp_path: Path) -> None:
    """Every command of the README's "Labeling workflow" block, in order, on the samples."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("### Labeling workflow", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split() for line in block.splitlines() if line.startswith("batchclassify")]
    assert len(commands) >= 6
    shutil.copytree(REPO / "samples", tmp_path / "samples")
    species = "".join(
        f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in (tmp_path / "samples").rglob("*.*")
    )
    (tmp_path / "labels.csv").write_text("path,species\n" + species)
    for command in commands:
        code, _, err = await cli(*command[1:], cwd=tmp_path)
        assert code == 0, (command, err)
    assert json.loads((tmp_path / "eval.json").read_text())["labeled"] == 8
    assert (tmp_path / "tasks.json").exists() and (tmp_path / "tasks.label_config.xml").exists()
    assert (tmp_path / "dataset" / "metadata.jsonl").exists() and (tmp_path / "r.html").exists()

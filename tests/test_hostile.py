"""The ``batchclassify`` command against a hostile server (``tests/hostile.py``), end to end.

Every test runs the real command line in a subprocess (:func:`helpers.run_cli`) on real image
files, pointed with ``--endpoint`` at a server that misbehaves on purpose: error pages that echo
the key, bodies that never end, answers with impossible values, class names that attack
spreadsheets and terminals, redirects to another host, statuses that never recover. What is
checked is what a user would see: the exit code, the rows of every output, stderr, the files
left on disk, and what the server saw.
"""

from __future__ import annotations

import base64
import csv
import gzip
import importlib.util
import json
import os
import stat
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import make_image, read_csv, read_jsonl, run_cli
from hostile import ESCAPE_CLASS, FORMULA_CLASSES, HostileServer, MiB, valid_answer

KEY = "sekret-key-12345"
MODEL = "m/1"
#: retries are fast: the backoff never waits longer than this
FAST = ("--max-wait", "0.05")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


# --------------------------------------------------------------------------------------------
# Helpers


async def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``batchclassify ARGS`` with no key or config from the environment."""
    env = {"ROBOFLOW_API_KEY": "", "BATCHCLASSIFY_CONFIG": ""}
    return await run_cli(*args, env=env, cwd=cwd, timeout=timeout)


def images(root: Path, count: int, *, first: int = 0) -> list[Path]:
    """``count`` small, distinct JPEG files under ``root`` (content differs: no dedup)."""
    return [
        make_image(root / f"{n:03d}.jpg", seed=n, size=(32, 24))
        for n in range(first, first + count)
    ]


def run_args(sources: Sequence[str | Path], endpoint: str, *extra: str) -> list[str]:
    """``run SOURCES --model m/1 --endpoint URL --api-key KEY EXTRA...``."""
    return [
        "run",
        *map(str, sources),
        "--model",
        MODEL,
        "--endpoint",
        endpoint,
        "--api-key",
        KEY,
        *extra,
    ]


def strict_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line parsed by a strict JSON parser: ``NaN`` / ``Infinity`` are an error."""

    def reject(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def csv_cells(path: Path) -> list[list[str]]:
    """Every row of a CSV file, header included, as read by the csv module."""
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def parquet_text(path: Path) -> str:
    """The decoded content of a Parquet file as JSON text (its bytes are compressed, so a
    search of the raw bytes alone could miss a leaked string)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return json.dumps(rows, default=lambda value: base64.b64encode(value).decode())


def assert_nowhere(secret: str, root: Path, *texts: str) -> None:
    """``secret`` is in no file under ``root`` (raw bytes, and Parquet decoded) nor in ``texts``."""
    needle = secret.encode()
    for path in files_under(root):
        assert needle not in path.read_bytes(), f"{secret!r} written to {path}"
        if path.suffix == ".parquet":
            assert secret not in parquet_text(path), f"{secret!r} in the rows of {path}"
    for text in texts:
        assert secret not in text


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Set the process umask (inherited by the CLI subprocess) for the block."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


# --------------------------------------------------------------------------------------------
# 1. The key is never written


ECHO_CASES = {
    # mode: (error type, http status, attempts with --retries 2)
    "html-echo": ("malformed_response", 200, 2),
    "html-echo-500": ("http", 500, 2),
    "json-echo-400": ("http", 400, 1),
}


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
@pytest.mark.parametrize("mode", sorted(ECHO_CASES))
async def test_echoed_key_is_written_nowhere(
    tmp_path: Path, hostile_server: HostileServer, mode: str, verbose: bool
) -> None:
    # 6 images x 2 attempts: fewer failures in a row than close the outage gate (16). One at a
    # time, the first answered normally: pages before any answer mean a wrong --endpoint.
    hostile_server.warmup = 1
    sources = images(tmp_path / "in", 6)
    jsonl, table, summary = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "s.json"
    outputs = ["--out", str(jsonl), "--out", str(table), "--out", "-", "--summary", str(summary)]
    if HAS_PYARROW:
        outputs += ["--out", str(tmp_path / "r.parquet")]
    code, stdout, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url(mode),
            *outputs,
            "--retries",
            "2",
            "-c",
            "1",
            *FAST,
            *(["-v"] if verbose else []),
        )
    )
    assert code == 1, stderr
    error_type, status, attempts = ECHO_CASES[mode]
    failing = len(sources) - 1  # the first image got the warm-up answer
    assert hostile_server.hostile_answers[mode] == failing * attempts
    rows = read_jsonl(jsonl)
    assert sorted(row["source"] for row in rows) == sorted(map(str, sources))
    assert [row["status"] for row in rows].count("ok") == 1
    rows = [row for row in rows if row["status"] != "ok"]
    for row in rows:
        assert row["status"] == "error"
        assert row["error"]["type"] == error_type
        assert row["error"]["http_status"] == status
        assert row["attempts"] == attempts
        assert len(row["error"]["message"]) > 10
    # The server's page did quote the request URL; what is left of it is redacted.
    assert "api_key=***" in rows[0]["error"]["message"]
    assert len(read_csv(table)) == len(sources)
    assert len(stdout.splitlines()) == len(sources)  # the JSONL rows again, on stdout
    assert json.loads(summary.read_text())["failed"] == failing
    if verbose:
        assert "retrying" in stderr or attempts == 1
    assert (tmp_path / "r.jsonl.state").exists()
    assert_nowhere(KEY, tmp_path, stdout, stderr)


@pytest.mark.parametrize("mode", ["html-echo", "html-echo-500"])
async def test_endpoint_credentials_are_written_nowhere(
    tmp_path: Path, hostile_server: HostileServer, mode: str
) -> None:
    password = "p4ssw0rd-xyz"
    hostile_server.warmup = 1
    sources = images(tmp_path / "in", 6)
    endpoint = hostile_server.url(mode).replace("http://", f"http://user:{password}@", 1)
    jsonl, table, summary = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "s.json"
    outputs = ["--out", str(jsonl), "--out", str(table), "--summary", str(summary)]
    if HAS_PYARROW:
        outputs += ["--out", str(tmp_path / "r.parquet")]
    code, stdout, stderr = await cli(
        *run_args([tmp_path / "in"], endpoint, *outputs, "--retries", "2", "-c", "1", *FAST, "-v")
    )
    assert code == 1, stderr
    rows = read_jsonl(jsonl)
    assert len(rows) == len(sources)
    failed = [row for row in rows if row["status"] == "error" and row["error"]["message"]]
    assert len(failed) == len(sources) - 1
    # The page echoed the Authorization header aiohttp made of the user info: it is scrubbed.
    basic = base64.b64encode(f"user:{password}".encode()).decode()
    for secret in (password, basic, KEY):
        assert_nowhere(secret, tmp_path, stdout, stderr)


async def test_short_key_does_not_shred_messages(
    tmp_path: Path, hostile_server: HostileServer
) -> None:
    hostile_server.warmup = 1
    images(tmp_path / "in", 4)
    missing = tmp_path / "xylophone.jpg"
    listing = tmp_path / "list.txt"  # listed, a missing file is an error row (not a usage error)
    listing.write_text(f"{missing}\n")
    jsonl = tmp_path / "r.jsonl"
    args = run_args([tmp_path / "in", listing], hostile_server.url("html-echo"))
    args[args.index(KEY)] = "xy"
    code, stdout, stderr = await cli(*args, "--out", str(jsonl), "--retries", "2", "-c", "1", *FAST)
    assert code == 1, stderr
    rows = {row["source"]: row for row in read_jsonl(jsonl) if row["status"] != "ok"}
    assert len(rows) == 4  # 3 echoed pages after the first answer, and the missing file
    gone = rows[str(missing)]
    assert gone["status"] == "error"
    assert "xylophone.jpg" in gone["error"]["message"]
    assert "***" not in gone["error"]["message"]
    # Where the short key shows in context (the echoed URL), it is still removed.
    echoed = [row for source, row in rows.items() if source != str(missing)]
    assert echoed and all("api_key=***" in row["error"]["message"] for row in echoed)
    for text in (jsonl.read_text(), stdout, stderr):
        assert "api_key=xy" not in text


# --------------------------------------------------------------------------------------------
# 2. Bounded reads


@pytest.mark.parametrize("every", [1, 2], ids=["all", "every2nd"])
@pytest.mark.parametrize("mode", ["huge", "endless", "gzip-bomb"])
async def test_oversized_answers_fail_fast_unretried(
    tmp_path: Path, hostile_server: HostileServer, mode: str, every: int
) -> None:
    """With ``every=2`` the valid answers share pooled connections with the refused ones: a
    connection left with megabytes unread must not be reused."""
    hostile_server.huge_size = 50 * MiB
    sources = images(tmp_path / "in", 8)
    jsonl = tmp_path / "r.jsonl"
    started = time.monotonic()
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url(mode, every=every),
            "--out",
            str(jsonl),
            "--retries",
            "3",
        ),
        *FAST,
        timeout=45,
    )
    elapsed = time.monotonic() - started
    assert code == 1, stderr
    assert elapsed < 30
    rows = read_jsonl(jsonl)
    assert sorted(row["source"] for row in rows) == sorted(map(str, sources))
    too_large = [row for row in rows if row["status"] == "error"]
    # Nothing is retried, so request k is image k's only one and every `every`-th is hostile.
    assert hostile_server.requests[mode] == len(sources)
    assert len(too_large) == hostile_server.hostile_answers[mode] == len(sources) // every
    for row in too_large:
        assert row["error"]["type"] == "response_too_large"
        assert row["error"]["http_status"] == 200
        assert row["attempts"] == 1
        assert "--max-response-bytes" in row["error"]["message"]
    for row in rows:
        if row["status"] == "ok":
            assert (row["top"], row["attempts"]) == ("cat", 1)
    # Read fully, these would be 50 MiB (huge), 1 GiB once inflated (gzip-bomb) or endless.
    assert hostile_server.bytes_sent[mode] <= len(too_large) * 24 * MiB
    assert f"response_too_large {len(too_large)}" in stderr


async def test_max_response_bytes_option(tmp_path: Path, hostile_server: HostileServer) -> None:
    sources = images(tmp_path / "in", 10)
    jsonl = tmp_path / "r.jsonl"
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url("many-classes", every=2),
            "--out",
            str(jsonl),
            "--max-response-bytes",
            "2048",
            "--retries",
            "2",
            *FAST,
        )
    )
    assert code == 1, stderr
    rows = read_jsonl(jsonl)
    assert len(rows) == len(sources)
    statuses = Counter(
        row["status"] if row["status"] == "ok" else row["error"]["type"] for row in rows
    )
    # Every 2nd request got 5000 classes (over 2048 bytes); the ~300-byte answers passed.
    assert hostile_server.hostile_answers["many-classes"] == 5
    assert statuses == {"ok": 5, "response_too_large": 5}
    assert all(row["top"] == "cat" for row in rows if row["status"] == "ok")
    assert all(row["attempts"] == 1 for row in rows)


# --------------------------------------------------------------------------------------------
# 3. CSV formula injection


async def test_formula_class_names_are_neutral_in_csv_exact_in_jsonl(
    tmp_path: Path, hostile_server: HostileServer
) -> None:
    images(tmp_path / "in", 4)
    make_image(tmp_path / "=cmd.jpg", seed=100, size=(32, 24))
    make_image(tmp_path / "-x.jpg", seed=101, size=(32, 24))
    code, _, stderr = await cli(
        *run_args(
            [],
            hostile_server.url("formula"),
            "--out",
            "r.jsonl",
            "--out",
            "r.csv",
            "--retries",
            "2",
            *FAST,
            "--",
            "in",
            "=cmd.jpg",
            "-x.jpg",
        ),
        cwd=tmp_path,
    )
    assert code == 0, stderr
    top = FORMULA_CLASSES[0]
    rows = strict_jsonl(tmp_path / "r.jsonl")
    assert len(rows) == 6
    for row in rows:
        assert row["status"] == "ok"
        assert row["top"] == top
        assert row["predicted_classes"] == [top]
        assert set(row["predictions"]) == set(FORMULA_CLASSES)
    assert {"=cmd.jpg", "-x.jpg"} <= {row["source"] for row in rows}
    header, *body = csv_cells(tmp_path / "r.csv")
    assert len(body) == 6
    for cells in [header, *body]:
        for cell in cells:
            assert not cell.startswith(FORMULA_START), f"formula cell {cell!r}"
    by_column = [dict(zip(header, cells, strict=True)) for cells in body]
    assert all(row["top"] == "'" + top for row in by_column)
    assert all(row["predicted_classes"] == "'" + top for row in by_column)
    assert {"'=cmd.jpg", "'-x.jpg"} <= {row["source"] for row in by_column}


# --------------------------------------------------------------------------------------------
# 4. Impossible answers


IMPOSSIBLE = [
    "nan",
    "infinity",
    "out-of-range",
    "predictions-null",
    "predictions-string",
    "predictions-numbers",
    "top-list",
    "class-not-string",
    "bad-types",
    "huge-number",
    "surrogate-class",
    "deep",
]


@pytest.mark.parametrize("mode", IMPOSSIBLE)
async def test_impossible_answers_are_malformed_rows(
    tmp_path: Path, hostile_server: HostileServer, mode: str
) -> None:
    sources = images(tmp_path / "in", 4)
    jsonl = tmp_path / "r.jsonl"
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"], hostile_server.url(mode), "--out", str(jsonl), "--retries", "2"
        ),
        *FAST,
    )
    assert code == 1, stderr
    rows = strict_jsonl(jsonl)
    assert sorted(row["source"] for row in rows) == sorted(map(str, sources))
    for row in rows:
        assert row["status"] == "error"
        assert row["error"]["type"] == "malformed_response"
        assert row["error"]["http_status"] == 200
        assert row["error"]["message"].startswith("malformed answer")
        assert row["attempts"] == 2
        assert row["predictions"] == {} and row["top"] is None
    assert hostile_server.hostile_answers[mode] == 2 * len(sources)
    code, _, stderr = await cli("report", str(jsonl))
    assert code == 0, stderr
    assert (tmp_path / "r.html").stat().st_size > 0


async def test_charset_base64_answer_is_still_read(
    tmp_path: Path, hostile_server: HostileServer
) -> None:
    sources = images(tmp_path / "in", 4)
    jsonl = tmp_path / "r.jsonl"
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"], hostile_server.url("charset"), "--out", str(jsonl), "--retries", "2"
        ),
        *FAST,
    )
    assert code == 0, stderr
    rows = strict_jsonl(jsonl)
    assert len(rows) == len(sources)
    assert all(row["status"] == "ok" and row["top"] == "cat" for row in rows)
    assert all(row["attempts"] == 1 and row["confidence"] == 0.9 for row in rows)
    assert hostile_server.hostile_answers["charset"] == len(sources)


@pytest.mark.parametrize("mode", [*IMPOSSIBLE, "charset"])
async def test_occasional_impossible_answer_is_retried_away(
    tmp_path: Path, hostile_server: HostileServer, mode: str
) -> None:
    sources = images(tmp_path / "in", 60)
    jsonl = tmp_path / "r.jsonl"
    # One request at a time: each hostile answer (every 7th request) is followed by a valid
    # one for the same image, so the counts below are exact.
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url(mode, every=7),
            "--out",
            str(jsonl),
            "--retries",
            "3",
            "--concurrency",
            "1",
            *FAST,
        )
    )
    assert code == 0, stderr
    rows = strict_jsonl(jsonl)
    assert Counter(row["source"] for row in rows) == Counter(map(str, sources))
    assert all(row["status"] == "ok" and row["top"] == "cat" for row in rows)
    retried = 0 if mode == "charset" else 9  # 69 requests: 60 + 69 // 7
    assert hostile_server.requests[mode] == 60 + retried
    assert sum(row["attempts"] for row in rows) == 60 + retried
    assert hostile_server.hostile_answers[mode] == (60 + retried) // 7


async def test_many_impossible_answers_in_a_row_still_finish(
    tmp_path: Path, hostile_server: HostileServer
) -> None:
    """A server that answers 200 with garbage is up: its answers fail their items, they do not
    close the outage gate. (Found while writing these tests: 16 malformed answers in a row
    made the run wait for probes 0.5, 1, 2, 4, 8, 15 s apart, then abort on --max-outage with
    exit 2 and "the server is unreachable".) --max-outage 3 keeps that failure mode short."""
    sources = images(tmp_path / "in", 20)
    jsonl = tmp_path / "r.jsonl"
    started = time.monotonic()
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url("nan"),
            "--out",
            str(jsonl),
            "--retries",
            "2",
            "--max-outage",
            "3",
        ),
        *FAST,
        timeout=30,
    )
    assert code == 1, stderr
    assert time.monotonic() - started < 10
    rows = strict_jsonl(jsonl)
    assert Counter(row["source"] for row in rows) == Counter(map(str, sources))
    assert all(row["error"]["type"] == "malformed_response" for row in rows)
    assert all(row["attempts"] == 2 for row in rows)
    assert hostile_server.requests["nan"] == 2 * len(sources)


async def test_rare_deep_answer_loses_no_input(
    tmp_path: Path, hostile_server: HostileServer
) -> None:
    """Found on the old code: the worker that got the deep answer died, and with it 825 of
    1000 inputs were never processed."""
    sources = images(tmp_path / "in", 200)
    jsonl = tmp_path / "r.jsonl"
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url("deep", every=25),
            "--out",
            str(jsonl),
            "--retries",
            "5",
            "--concurrency",
            "4",
            *FAST,
        )
    )
    assert code == 0, stderr
    rows = strict_jsonl(jsonl)
    assert len(rows) == 200
    assert Counter(row["source"] for row in rows) == Counter(map(str, sources))
    assert all(row["status"] == "ok" for row in rows)
    assert hostile_server.hostile_answers["deep"] >= 8
    assert sum(row["attempts"] for row in rows) == hostile_server.requests["deep"]
    assert "200 ok, 0 failed" in stderr


# Bodies in a broken Content-Encoding: the hostile server has no such mode, so a small server
# of our own answers them.

ANSWER = json.dumps(valid_answer()).encode()


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


ENCODED_BODIES = {
    # kind: (Content-Encoding, body)
    "gzip": ("gzip", gzip.compress(ANSWER)),
    "corrupt-gzip": ("gzip", gzip.compress(ANSWER)[:10] + b"\xff" * 16),
    # "deflate" as many servers send it: raw deflate, without the zlib wrapper of RFC 1950
    "raw-deflate": ("deflate", _raw_deflate(ANSWER)),
}


@pytest.fixture
async def encoded_server() -> AsyncIterator[tuple[str, Counter[str]]]:
    """``(base, requests)``: ``{base}/{kind}`` answers 200 with ``ENCODED_BODIES[kind]``."""
    requests: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        kind = request.match_info["kind"]
        requests[kind] += 1
        encoding, body = ENCODED_BODIES[kind]
        headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_post("/{kind}/{model}/{version}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", requests
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "kind",
    ["gzip", "corrupt-gzip", "raw-deflate"],
)
async def test_compressed_answers(
    tmp_path: Path, encoded_server: tuple[str, Counter[str]], kind: str
) -> None:
    base, requests = encoded_server
    sources = images(tmp_path / "in", 3)
    jsonl = tmp_path / "r.jsonl"
    code, _, stderr = await cli(
        *run_args([tmp_path / "in"], f"{base}/{kind}", "--out", str(jsonl), "--retries", "2"),
        *FAST,
    )
    rows = strict_jsonl(jsonl)
    assert len(rows) == len(sources)
    if kind == "corrupt-gzip":
        assert code == 1, stderr
        for row in rows:
            assert row["error"]["type"] == "malformed_response"
            assert row["error"]["http_status"] == 200
            assert row["attempts"] == 2
        assert requests[kind] == 2 * len(sources)
    else:
        # A valid body in an encoding we asked for (Accept-Encoding: gzip, deflate) is read.
        assert code == 0, stderr
        assert all(row["status"] == "ok" and row["top"] == "cat" for row in rows)
        assert requests[kind] == len(sources)


# --------------------------------------------------------------------------------------------
# 5. Redirects are never followed


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_stops_the_run_and_is_not_followed(
    tmp_path: Path, hostile_server: HostileServer, status: int
) -> None:
    images(tmp_path / "in", 5)
    mode = f"redirect-{status}"
    code, stdout, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url(mode),
            "--out",
            str(tmp_path / "r.jsonl"),
            "--summary",
            str(tmp_path / "s.json"),
        ),
        *FAST,
    )
    assert code == 2, stderr
    assert f"{hostile_server.catcher_base}/{mode}/1/m/1" in stderr
    assert "--endpoint" in stderr
    assert str(status) in stderr
    assert hostile_server.catcher_requests == []
    assert 1 <= hostile_server.requests[mode] <= 9  # at most one per worker (8 by default)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert hostile_server.catcher_base in summary["aborted"]
    # The Location repeated the query string, key included: redacted everywhere.
    assert "api_key=***" in stderr
    assert_nowhere(KEY, tmp_path, stdout, stderr)


# --------------------------------------------------------------------------------------------
# 6. Terminal injection


async def test_escape_codes_in_class_names_reach_no_terminal(
    tmp_path: Path, hostile_server: HostileServer
) -> None:
    sources = images(tmp_path / "in", 4)
    jsonl = tmp_path / "r.jsonl"
    code, stdout, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url("escape-codes"),
            "--out",
            str(jsonl),
            "--out",
            "-",
            "-v",
        ),
        *FAST,
    )
    assert code == 0, stderr
    assert "top classes:" in stderr
    # JSON on stdout (not a terminal here) escapes the controls: \u001b, never the raw byte.
    assert [json.loads(line)["top"] for line in stdout.splitlines()] == [ESCAPE_CLASS] * len(
        sources
    )
    for text in (stdout, stderr):
        assert "\x1b" not in text
        assert "\x07" not in text
    assert "\\x1b]0;pwned" in stderr
    rows = strict_jsonl(jsonl)
    assert len(rows) == len(sources)
    assert all(row["top"] == ESCAPE_CLASS for row in rows)


# --------------------------------------------------------------------------------------------
# 7. Statuses that never recover


FATAL_HINTS = {
    "status-410": "gone",
    "status-501": "no runtime",
    "status-507": "too big",
}


@pytest.mark.parametrize("mode", sorted(FATAL_HINTS))
async def test_status_that_never_recovers_stops_the_run(
    tmp_path: Path, hostile_server: HostileServer, mode: str
) -> None:
    images(tmp_path / "in", 20)
    concurrency = 2
    started = time.monotonic()
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url(mode),
            "--out",
            str(tmp_path / "r.jsonl"),
            "--concurrency",
            str(concurrency),
        ),
        *FAST,
        timeout=30,
    )
    assert code == 2, stderr
    assert time.monotonic() - started < 10
    assert 1 <= hostile_server.requests[mode] <= concurrency + 1
    assert "error: run stopped" in stderr
    assert FATAL_HINTS[mode] in stderr
    assert f"HTTP {mode.removeprefix('status-')}" in stderr
    assert KEY not in stderr


# --------------------------------------------------------------------------------------------
# 8. File modes


@pytest.mark.parametrize(
    ("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"]
)
async def test_state_is_private_outputs_follow_umask(
    tmp_path: Path, hostile_server: HostileServer, mask: int, expected: int
) -> None:
    images(tmp_path / "in", 3)
    outputs = ["--out", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "r.csv")]
    if HAS_PYARROW:
        outputs += ["--out", str(tmp_path / "r.parquet")]
    with umask(mask):
        code, _, stderr = await cli(
            *run_args(
                [tmp_path / "in"],
                hostile_server.url("nan", every=1000),  # only valid answers
                *outputs,
                "--summary",
                str(tmp_path / "s.json"),
            ),
        )
    assert code == 0, stderr

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("r.jsonl.state") == 0o600
    for companion in ("r.jsonl.state-wal", "r.jsonl.state-shm", "r.jsonl.state.lock"):
        if (tmp_path / companion).exists():
            assert mode(companion) == 0o600, companion
    written = ["r.jsonl", "r.csv", "s.json", *(["r.parquet"] if HAS_PYARROW else [])]
    assert {name: oct(mode(name)) for name in written} == dict.fromkeys(written, oct(expected))


# --------------------------------------------------------------------------------------------
# 9. --organize with thousands of classes


async def test_organize_caps_class_folders_per_image(
    tmp_path: Path, hostile_server: HostileServer
) -> None:
    hostile_server.many_classes = 3000
    sources = images(tmp_path / "in", 5)
    dataset = tmp_path / "dataset"
    before = set(tmp_path.rglob("*"))
    code, _, stderr = await cli(
        *run_args(
            [tmp_path / "in"],
            hostile_server.url("many-classes"),
            "--out",
            str(tmp_path / "r.jsonl"),
            "--organize",
            str(dataset),
        ),
        *FAST,
    )
    assert code == 0, stderr
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert len(rows) == len(sources)
    assert all(row["status"] == "ok" and len(row["predicted_classes"]) == 3000 for row in rows)
    folders = [path for path in dataset.iterdir() if path.is_dir()]
    assert 1 <= len(folders) <= 64
    placed = Counter(path.name for path in files_under(dataset))
    assert set(placed) == {path.name for path in sources}
    assert all(1 <= count <= 64 for count in placed.values())
    # Nothing appeared outside the dataset folder but the output and its state.
    created = {path.relative_to(tmp_path) for path in set(tmp_path.rglob("*")) - before}
    outside = {path for path in created if path.parts[0] != "dataset"}
    assert {str(path) for path in outside} <= {
        "r.jsonl",
        "r.jsonl.state",
        "r.jsonl.state-wal",
        "r.jsonl.state-shm",
        "r.jsonl.state.lock",
    }

"""Object storage sources and outputs (batchclassify/objects.py) against a real S3 server: moto in
server mode on a loopback port, started once for the module (skipped without s3fs or moto)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import StartEmulator
from helpers import expected_answer, image_bytes, read_jsonl, run_cli, start_cli

from batchclassify import objects
from batchclassify.client import ClientOptions
from batchclassify.errors import ConfigError, redact
from batchclassify.pipeline import PipelineOptions
from batchclassify.runner import JobState, run
from batchclassify.sources import SourceOptions, iter_items
from batchclassify.state import item_key

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

KEY = "objects-key-4242"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Nothing of the machine's own AWS setup may leak in, nor an instance role be probed.
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class S3:
    """The moto server, its endpoint and an s3fs client; ``bucket()`` makes a fresh bucket."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.server: Any = None
        self.fs: Any = None

    def start(self) -> None:
        # moto keeps its data in this process: a restarted server serves the same buckets.
        self.server = moto_server.ThreadedMotoServer(
            ip_address="127.0.0.1", port=self.port, verbose=False
        )
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def bucket(self, *, versioned: bool = False) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        if versioned:
            self.fs.make_bucket_versioned(name)
        return name

    def put(self, url: str, data: bytes) -> None:
        self.fs.pipe(url, data)
        self.fs.invalidate_cache()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    server = S3(_free_port())
    saved = {name: os.environ.get(name) for name in (*_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=server.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    server.start()
    server.fs = s3fs.S3FileSystem()
    try:
        yield server
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def options(endpoint: str, **extra: Any) -> PipelineOptions:
    client = ClientOptions(
        endpoint=endpoint, model="demo", version=1, api_key=KEY, concurrency=4, retry=None
    )
    return PipelineOptions(client=client, **extra)


def images(s3: S3, bucket: str, count: int, prefix: str = "in/") -> dict[str, bytes]:
    made = {}
    for n in range(count):
        data = image_bytes(seed=n, size=(24, 24), fmt="PNG")
        url = f"s3://{bucket}/{prefix}{n % 3}/{n:04d}.png"
        s3.put(url, data)
        made[url] = data
    return made


def rows_by_source(path: Path) -> dict[str, dict[str, Any]]:
    rows = read_jsonl(path)
    by_source = {row["source"]: row for row in rows}
    assert len(by_source) == len(rows), "an input appears twice"
    return by_source


# --- sources ---------------------------------------------------------------------------------


async def test_prefix_is_listed_and_read_with_bad_objects_as_rows(
    s3: S3, tmp_path: Path, emulator_url: str
) -> None:
    bucket = s3.bucket()
    made = images(s3, bucket, 7)
    s3.put(f"s3://{bucket}/in/empty.jpg", b"")
    s3.put(f"s3://{bucket}/in/notes.jpg", b"this is not an image")
    s3.put(f"s3://{bucket}/in/readme.txt", b"skipped: not an image extension")
    s3.put(f"s3://{bucket}/in/.hidden/x.png", image_bytes())
    s3.put(f"s3://{bucket}/other/y.png", image_bytes())  # outside the prefix
    out = tmp_path / "r.jsonl"

    stats = await run([f"s3://{bucket}/in/"], options(emulator_url), outputs=[str(out)])

    rows = rows_by_source(out)
    assert set(rows) == {*made, f"s3://{bucket}/in/empty.jpg", f"s3://{bucket}/in/notes.jpg"}
    for url, data in made.items():
        assert rows[url]["status"] == "ok"
        assert rows[url]["top"] == expected_answer(data)["top"]
        assert rows[url]["path"] is None
    assert rows[f"s3://{bucket}/in/empty.jpg"]["error"]["type"] == "empty"
    assert rows[f"s3://{bucket}/in/notes.jpg"]["error"]["type"] == "not_an_image"
    assert stats.ok == 7 and stats.failed == 2


async def test_list_file_in_a_bucket_names_objects(
    s3: S3, tmp_path: Path, emulator_url: str
) -> None:
    bucket = s3.bucket()
    made = images(s3, bucket, 3)
    first, second, third = made
    local = tmp_path / "local.png"
    local.write_bytes(image_bytes(seed=99))
    lines = [
        first,  # an absolute object URL
        second.replace(f"s3://{bucket}/", ""),  # relative: beside the list
        f"s3://{bucket}/in/missing.png",  # not there
        str(local),  # a local file, as in any list
    ]
    # Relative entries name objects beside the list: put the list at the bucket's root.
    s3.put(f"s3://{bucket}/urls.txt", "\n".join(lines).encode())

    await run(
        [f"s3://{bucket}/urls.txt"], options(emulator_url), outputs=[str(tmp_path / "r.jsonl")]
    )

    rows = rows_by_source(tmp_path / "r.jsonl")
    assert rows[first]["status"] == "ok"
    assert rows[lines[1]]["status"] == "ok"
    assert rows[lines[1]]["top"] == expected_answer(made[second])["top"]
    missing = rows[f"s3://{bucket}/in/missing.png"]
    assert missing["status"] == "error" and "does not exist" in missing["error"]["message"]
    assert rows[str(local)]["status"] == "ok"
    assert third not in rows


async def test_missing_bucket_and_missing_object_are_refused_before_any_request(
    s3: S3, tmp_path: Path, emulator_url: str
) -> None:
    bucket = s3.bucket()
    for spec, said in [
        (f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/in/", "does not exist"),
        (f"s3://{bucket}/nothing-here.png", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=said):
            await run([spec], options(emulator_url), outputs=[str(tmp_path / "r.jsonl")])
    assert not (tmp_path / "r.jsonl").exists()


def test_no_credentials_is_a_clear_error(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.bucket()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(ConfigError, match="no credentials"):
            objects.check_source(f"s3://{bucket}/in/")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.delitem(registry, "gs", raising=False)
    monkeypatch.delitem(registry, "gcs", raising=False)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'batchclassify\[gcs\]'"):
        objects.check_source("gs://bucket/prefix/")


def test_identity_is_url_etag_and_version(s3: S3) -> None:
    bucket = s3.bucket(versioned=True)
    url = f"s3://{bucket}/a.png"
    s3.put(url, image_bytes(seed=1))
    [before] = iter_items([url])
    s3.put(url, image_bytes(seed=2))
    [after] = iter_items([url])
    assert before.obj is not None and after.obj is not None
    assert before.obj.version_id and after.obj.version_id
    assert before.obj.etag != after.obj.etag
    assert item_key(before) != item_key(after)
    assert item_key(before).startswith(f"object:{url}:")
    # Listed under its prefix, the same object has the same identity as when named alone.
    [listed] = iter_items([f"s3://{bucket}/"])
    assert item_key(listed) == item_key(after)


def test_listing_twenty_thousand_keys_holds_one_page_at_a_time(
    s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    from moto.backends import get_backend

    bucket = s3.bucket()
    backend = get_backend("s3")["123456789012"]["aws"]
    for n in range(20_000):  # straight into moto's store: 20 000 PUTs over HTTP would be slow
        backend.put_object(bucket, f"big/{n:05d}.jpg", b"x")
    caplog.set_level("INFO", logger="werkzeug")  # the server's request log

    def pages_requested() -> int:
        return sum(
            f"/{bucket}?list-type=2" in record.getMessage()
            for record in caplog.records
            if record.name == "werkzeug"
        )

    listing = objects.iter_objects(
        f"s3://{bucket}/big/", SourceOptions().extensions, include_hidden=False
    )
    count = 0
    for item in listing:
        count += 1
        if count % 1000 in (0, 1):
            # The server is asked for a page only once the previous one is used up: the
            # listing never runs ahead, so at most one page of keys (1000) is in memory.
            assert pages_requested() == (count - 1) // 1000 + 1, count
        assert item.obj is not None and item.obj.etag
    assert count == 20_000 and pages_requested() == 20


# --- outputs ---------------------------------------------------------------------------------


async def test_output_object_appears_whole_at_checkpoints_and_at_the_end(
    s3: S3, tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=30)
    bucket = s3.bucket()
    made = images(s3, bucket, 60)
    target = f"s3://{bucket}/out/labels.jsonl"
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            try:
                text = (await asyncio.to_thread(s3.fs.cat, target)).decode()
            except FileNotFoundError:
                text = None
            if text is not None:
                assert text.endswith("\n"), "a torn object"
                seen.append(len([json.loads(line) for line in text.splitlines()]))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    state = JobState(path=tmp_path / "job.state")
    try:
        await run(
            [f"s3://{bucket}/in/"],
            options(url, queue_size=4),
            outputs=[target, f"s3://{bucket}/out/labels.csv"],
            state=state,
            upload_interval=0.3,
        )
    finally:
        stop.set()
        await watcher
    rows = [json.loads(line) for line in (await asyncio.to_thread(s3.fs.cat, target)).splitlines()]
    assert {row["source"] for row in rows} == set(made) and len(rows) == 60
    assert seen == sorted(seen), "the object shrank"
    assert any(0 < count < 60 for count in seen), f"no checkpoint seen: {seen}"
    csv_text = (await asyncio.to_thread(s3.fs.cat, f"s3://{bucket}/out/labels.csv")).decode()
    assert len(csv_text.splitlines()) == 61
    # The staging files live beside the state, named after the objects.
    assert (tmp_path / f"{bucket}-out-labels.jsonl").exists()


async def test_an_existing_object_is_not_overwritten_without_overwrite(
    s3: S3, tmp_path: Path, emulator_url: str
) -> None:
    bucket = s3.bucket()
    images(s3, bucket, 2)
    target = f"s3://{bucket}/labels.jsonl"
    s3.put(target, b"precious\n")
    state = JobState(path=tmp_path / "s.state")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        await run([f"s3://{bucket}/in/"], options(emulator_url), outputs=[target], state=state)
    assert s3.fs.cat(target) == b"precious\n"
    await run(
        [f"s3://{bucket}/in/"], options(emulator_url), outputs=[target], state=state, overwrite=True
    )
    assert len(s3.fs.cat(target).splitlines()) == 2


# --- scan, resume, faults --------------------------------------------------------------------


async def test_scan_classifies_only_new_and_rewritten_objects(
    s3: S3, tmp_path: Path, emulator_url: str
) -> None:
    bucket = s3.bucket()
    made = images(s3, bucket, 6)
    target = f"s3://{bucket}/labels.jsonl"
    env = {"ROBOFLOW_API_KEY": KEY}
    scan = ["scan", f"s3://{bucket}/in/", "--model", "demo/1", "--endpoint", emulator_url]
    code, _, err = await run_cli(*scan, "--out", target, env=env, cwd=tmp_path)
    assert code == 0, err
    assert f"{bucket}-labels.jsonl.state" in err  # where the state is, said before the run
    rewritten = next(iter(made))
    s3.put(rewritten, image_bytes(seed=500, size=(24, 24), fmt="PNG"))
    s3.put(f"s3://{bucket}/in/new.png", image_bytes(seed=501, size=(24, 24), fmt="PNG"))
    code, _, err = await run_cli(*scan, "--out", target, env=env, cwd=tmp_path)
    assert code == 0, err
    assert "6 done earlier, 2 now" in err.replace("\n", " ") or "2 now" in err, err
    rows = read_jsonl_text(s3.fs.cat(target).decode())
    # Every object once, the rewritten one twice: its two versions are two inputs.
    assert len(rows) == 8
    assert [row["source"] for row in rows].count(rewritten) == 2


def read_jsonl_text(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_kill_then_resume_uploads_every_input_exactly_once(
    s3: S3, tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=40)
    bucket = s3.bucket()
    made = images(s3, bucket, 80)
    target = f"s3://{bucket}/labels.jsonl"
    base = ["run", f"s3://{bucket}/in/", "--model", "demo/1", "--endpoint", url]
    base += ["--concurrency", "2", "--out", target, "--upload-interval", "0.2"]
    env = {"ROBOFLOW_API_KEY": KEY}
    staging = tmp_path / f"{bucket}-labels.jsonl"
    process = await start_cli(*base, env=env, cwd=tmp_path)
    for _ in range(400):  # until some rows are written, at most 20 s
        if staging.exists() and staging.read_text().count("\n") >= 10:
            break
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    assert staging.read_text().count("\n") < 80
    code, _, err = await run_cli(*base, "--resume", env=env, cwd=tmp_path)
    assert code == 0, err
    rows = read_jsonl_text(s3.fs.cat(target).decode())
    assert sorted(row["source"] for row in rows) == sorted(made)
    assert all(row["status"] == "ok" for row in rows)


async def test_store_outage_mid_run_loses_nothing(
    s3: S3, tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(latency_ms=25)
    bucket = s3.bucket()
    made = images(s3, bucket, 60)
    out = tmp_path / "r.jsonl"
    state = JobState(path=tmp_path / "r.state")
    spec = [f"s3://{bucket}/in/"]

    async def outage() -> None:
        for _ in range(1000):  # until 10 rows are out, at most 20 s
            if out.exists() and out.read_text().count("\n") >= 10:
                break
            await asyncio.sleep(0.02)
        await asyncio.to_thread(s3.stop)
        await asyncio.sleep(1.5)  # reads fail meanwhile: s3fs and botocore retry them
        await asyncio.to_thread(s3.start)

    fault = asyncio.create_task(outage())
    try:
        await run(spec, options(url, queue_size=4), outputs=[str(out)], state=state)
    finally:
        await fault
    # What the retries could not save is an error row of type connection: --resume redoes it.
    resumed = JobState(path=state.path, resume=True)
    await run(spec, options(url), outputs=[str(out)], state=resumed)
    rows = rows_by_source(out)  # each input once
    assert set(rows) == set(made)
    assert all(row["status"] == "ok" for row in rows.values())


# --- presign ---------------------------------------------------------------------------------


async def test_presign_sends_a_url_the_service_fetches(
    s3: S3, tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(allow_http_image_urls=True)
    bucket = s3.bucket()
    made = images(s3, bucket, 3)
    out = tmp_path / "r.jsonl"
    await run([f"s3://{bucket}/in/"], options(url, url_mode="presign"), outputs=[str(out)])
    rows = rows_by_source(out)
    for source, data in made.items():
        assert rows[source]["top"] == expected_answer(data)["top"]
        assert rows[source]["attempts"] == 1


@contextlib.asynccontextmanager
async def echoing_server() -> AsyncIterator[str]:
    """A classify endpoint that refuses every image, quoting the whole request URL back."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"message": f"bad image at {request.url}"}, status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def test_a_presigned_url_never_reaches_rows_or_logs(
    s3: S3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = s3.bucket()
    images(s3, bucket, 2)
    out = tmp_path / "r.jsonl"
    caplog.set_level("DEBUG", logger="batchclassify")
    async with echoing_server() as url:
        await run([f"s3://{bucket}/in/"], options(url, url_mode="presign"), outputs=[str(out)])
    text = out.read_text()
    rows = read_jsonl(out)
    assert all(row["error"]["http_status"] == 400 for row in rows)
    assert "bad image at" in text  # the message is kept, its secrets are not
    for leaked in ("Signature%3D", "Signature=", "testing-secret"):
        assert f"{leaked}***" in text or leaked not in text
    assert "AWSAccessKeyId%3Dtesting" not in text and "X-Amz-Credential%3Dtesting" not in text
    assert "Signature=" not in caplog.text.replace("Signature=***", "")


def test_redact_removes_signatures_of_real_presigned_urls(s3: S3) -> None:
    bucket = s3.bucket()
    s3.put(f"s3://{bucket}/a.png", image_bytes())
    signed = s3.fs.url(f"{bucket}/a.png", expires=60)
    signature = signed.split("Signature=")[1].split("&")[0]
    from urllib.parse import quote

    for form in (signed, quote(signed, safe="")):
        cleaned = redact(f"GET {form} failed")
        assert signature not in cleaned and quote(signature, safe="") not in cleaned
        assert "***" in cleaned


async def test_presign_refuses_other_stores_per_item(tmp_path: Path) -> None:
    ref = objects.ObjectRef(url="gs://bucket/a.png", etag="x")
    with pytest.raises(Exception, match="s3:// objects only"):
        await objects.presign(ref)


def test_help_documents_object_storage(capsys: pytest.CaptureFixture[str]) -> None:
    from batchclassify.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "s3://BUCKET/PREFIX/" in text and "--upload-interval" in text and "presign" in text

"""Fleets (``--endpoint`` given several times): spreading, ejection, probing back, wrong
servers, the state's fingerprint, and the key never shown. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from conftest import StartEmulator
from helpers import (
    emulator_stats,
    expected_answer,
    image_bytes,
    make_image,
    read_jsonl,
    run_cli,
)
from hostile import valid_answer

from batchclassify import ClientOptions, PipelineOptions, RunAborted, run
from batchclassify.client import ClassifyClient
from batchclassify.config import RunSettings, load_config_file, resolve_settings
from batchclassify.emulator import EmulatorConfig, running_emulator
from batchclassify.errors import ConfigError
from batchclassify.fleet import EJECT_AFTER, Route
from batchclassify.retry import RetryPolicy
from batchclassify.runner import JobState
from batchclassify.throttle import ThrottleOptions

KEY = "fleet-secret-key-98765"


def make_files(root: Path, count: int) -> list[Path]:
    return [make_image(root / f"{n:04d}.png", seed=n, size=(24, 24)) for n in range(count)]


def fleet_options(*urls: str, concurrency: int = 6, **changes: object) -> PipelineOptions:
    base: dict[str, object] = {
        "endpoints": urls,
        "model": "demo",
        "version": 1,
        "api_key": KEY,
        "concurrency": concurrency,
        "timeout": 2.0,
        "connect_timeout": 1.0,
        "retry": RetryPolicy(attempts=8, initial=0.01, max_wait=0.05),
    }
    base.update(changes)
    client = ClientOptions(**base)  # type: ignore[arg-type]
    return PipelineOptions(client=client, dedup=False, throttle=ThrottleOptions(adaptive=False))


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Switchable:
    """A classify server that answers 500 while ``down``, a valid answer otherwise."""

    def __init__(self) -> None:
        self.down = False
        self.requests = 0
        self.answered = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        if self.down:
            return web.json_response({"message": "down for maintenance"}, status=500)
        self.answered += 1
        return web.json_response(valid_answer())


@contextlib.asynccontextmanager
async def switchable_server() -> AsyncIterator[tuple[str, Switchable]]:
    server = Switchable()
    app = web.Application()
    app.router.add_post("/{model}/{version}", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", server
    finally:
        await runner.cleanup()


# --- options and settings ------------------------------------------------------------------


def test_one_endpoint_keeps_working_as_before() -> None:
    options = ClientOptions(endpoint="local", model="m", version=1, api_key="k")
    assert options.endpoint == "http://localhost:9001"
    assert options.endpoints == ("http://localhost:9001",)
    assert (options.key_transport, options.upload) == ("both", "multipart")
    assert options.url == "http://localhost:9001/m/1"


def test_each_server_of_a_fleet_gets_its_own_hosts_defaults() -> None:
    options = ClientOptions(
        endpoints=("serverless", "http://gpu-1:9001"), model="m", version=1, api_key="k"
    )
    assert options.endpoint == "https://serverless.roboflow.com"  # the first stands for it
    hosted, local = options.routes
    assert (hosted.key_transport, hosted.upload) == ("header", "base64")
    assert (local.key_transport, local.upload) == ("both", "multipart")
    # They differ: nothing shared (images are prepared raw, encoded per server).
    assert options.key_transport is None and options.upload is None
    forced = ClientOptions(
        endpoints=("serverless", "http://gpu-1:9001"),
        model="m",
        version=1,
        key_transport="header",
        upload="base64",
    )
    assert {(r.key_transport, r.upload) for r in forced.routes} == {("header", "base64")}


def test_a_server_named_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="named twice"):
        ClientOptions(endpoints=("http://a:9001", "http://a:9001/"), model="m", version=1)


def test_endpoint_lists_from_toml_environment_and_command_line(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text('endpoint = ["http://gpu-1:9001", "local"]\nmodel = "demo/1"\n')
    values, _ = load_config_file(config)
    settings = RunSettings(**values)
    assert settings.endpoints == ("http://gpu-1:9001", "http://localhost:9001")
    client = settings.updated(api_key="k").pipeline_options().client
    assert client.endpoints == settings.endpoints
    env = {"BATCHCLASSIFY_ENDPOINT": "http://gpu-1:9001 http://gpu-2:9001"}
    assert resolve_settings({}, env).settings.endpoints == (
        "http://gpu-1:9001",
        "http://gpu-2:9001",
    )
    one = resolve_settings({"endpoint": ("local",)}, {}).settings
    assert one.endpoint == "http://localhost:9001"  # one endpoint stays a plain string
    with pytest.raises(ConfigError, match="--endpoint must be an http"):
        RunSettings(endpoint=("http://ok:1", "ftp://nope"))


# --- spreading ----------------------------------------------------------------------------


async def test_a_fleet_spreads_requests_over_its_servers(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    urls = [await start_emulator(latency_ms=5, seed=n) for n in range(3)]
    files = make_files(tmp_path / "in", 60)
    out = tmp_path / "out.jsonl"
    stats = await run([str(tmp_path / "in")], fleet_options(*urls), outputs=[str(out)])
    rows = read_jsonl(out)
    assert sorted(row["source"] for row in rows) == sorted(map(str, files))
    assert all(row["status"] == "ok" for row in rows)
    served = [(await emulator_stats(url))["requests"] for url in urls]
    # Least outstanding with round-robin ties: every server takes a fair share.
    assert sum(served) == 60 and min(served) >= 10, served
    by_label = {label: usage["requests"] for label, usage in stats.endpoints.items()}
    assert by_label == dict(zip(urls, served, strict=True))
    assert "requests per endpoint:" in stats.format()
    assert stats.to_dict()["endpoints"][urls[0]]["ejections"] == 0


# --- ejection -----------------------------------------------------------------------------


async def test_a_server_killed_mid_run_is_left_out_and_its_items_are_done_elsewhere(
    tmp_path: Path, start_emulator: StartEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    alive = [await start_emulator(latency_ms=20, seed=n) for n in range(2)]
    async with contextlib.AsyncExitStack() as doomed:
        victim = await doomed.enter_async_context(
            running_emulator(EmulatorConfig(latency_ms=20, seed=9))
        )
        files = make_files(tmp_path / "in", 150)
        out = tmp_path / "out.jsonl"
        options = fleet_options(alive[0], victim, alive[1], concurrency=9)
        job = asyncio.create_task(run([str(tmp_path / "in")], options, outputs=[str(out)]))
        for _ in range(500):  # bounded: the victim answers a few, then dies
            if (await emulator_stats(victim))["requests"] >= 10 or job.done():
                break
            await asyncio.sleep(0.01)
        with caplog.at_level(logging.INFO, "batchclassify"):
            victim_seen = (await emulator_stats(victim))["requests"]
            await doomed.aclose()  # in-flight requests to it fail: they are retried elsewhere
            stats = await asyncio.wait_for(job, 60)
    rows = read_jsonl(out)
    assert sorted(row["source"] for row in rows) == sorted(map(str, files))  # each exactly once
    assert all(row["status"] == "ok" for row in rows), [r for r in rows if r["status"] != "ok"]
    assert stats.endpoints[victim]["ejections"] >= 1
    assert stats.endpoints[victim]["failures"] >= EJECT_AFTER
    messages = [record.getMessage() for record in caplog.records]
    assert any(victim in m and "left out of the fleet" in m for m in messages), messages
    served = sum([(await emulator_stats(url))["ok_requests"] for url in alive])
    assert served + victim_seen >= 150  # the rest of the run went to the two that stayed
    assert f"{victim} " in stats.format() and "left out 1x" in stats.format()


async def test_an_ejected_server_is_probed_back_once_it_answers_again(
    start_emulator: StartEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    good = await start_emulator()
    async with switchable_server() as (flaky_url, flaky):
        options = fleet_options(flaky_url, good).client
        data = image_bytes()
        flaky.down = True
        with caplog.at_level(logging.INFO, "batchclassify"):
            async with ClassifyClient(options) as client:
                for _ in range(12):
                    response = await client.classify(data=data)
                    assert response.answer.top
                # Down: it had its EJECT_AFTER tries (each item then went to the other), and
                # nothing more while left out.
                assert flaky.requests == EJECT_AFTER
                assert client.fleet.usage()[flaky_url]["ejections"] == 1
                flaky.down = False
                await asyncio.sleep(1.1)  # the first ejection lasts a second
                for _ in range(10):
                    await client.classify(data=data)
                assert flaky.answered >= 2  # the probe, then its share again
                assert not client.fleet.endpoints[0].ejected
        messages = [record.getMessage() for record in caplog.records]
        assert any("answers again" in m and flaky_url in m for m in messages), messages


async def test_a_probe_that_fails_leaves_the_server_out_longer(
    start_emulator: StartEmulator,
) -> None:
    good = await start_emulator()
    async with switchable_server() as (flaky_url, flaky):
        options = fleet_options(flaky_url, good).client
        flaky.down = True
        async with ClassifyClient(options) as client:
            for _ in range(8):
                await client.classify(data=image_bytes())
            await asyncio.sleep(1.1)
            for _ in range(8):
                await client.classify(data=image_bytes())
            # One probe went out after a second, failed, and the next is two seconds away.
            assert flaky.requests == EJECT_AFTER + 1
            endpoint = client.fleet.endpoints[0]
            assert endpoint.ejected and endpoint.backoff == 2.0


# --- wrong servers ----------------------------------------------------------------------------


async def test_one_wrong_server_in_a_fleet_is_left_out_with_a_warning(
    tmp_path: Path, emulator_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = closed_port_url()
    files = make_files(tmp_path / "in", 30)
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, "batchclassify"):
        stats = await run(
            [str(tmp_path / "in")], fleet_options(wrong, emulator_url), outputs=[str(out)]
        )
    rows = read_jsonl(out)
    assert len(rows) == len(files) and all(row["status"] == "ok" for row in rows)
    assert stats.endpoints[wrong]["ejections"] == 1
    assert stats.endpoints[wrong]["requests"] <= 3 + 6  # its strikes, plus what was in flight
    messages = [record.getMessage() for record in caplog.records]
    assert any(
        wrong in m and "whole run" in m and "does not look like a classify API" in m
        for m in messages
    ), messages
    assert not any(KEY in m for m in messages)


async def test_a_fleet_of_wrong_servers_stops_the_run(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 10)
    options = fleet_options(closed_port_url(), closed_port_url())
    with pytest.raises(RunAborted, match="nor did the other servers of the fleet") as caught:
        await asyncio.wait_for(run([str(tmp_path / "in")], options), 30)
    assert KEY not in str(caught.value)


# --- state --------------------------------------------------------------------------------


async def test_adding_a_server_after_the_first_keeps_resume(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    first, second = await start_emulator(), await start_emulator()
    make_files(tmp_path / "in", 5)
    out = tmp_path / "out.jsonl"
    state = JobState(path=tmp_path / "state.sqlite")
    await run([str(tmp_path / "in")], fleet_options(first), outputs=[str(out)], state=state)
    resumed = JobState(path=state.path, resume=True)
    stats = await run(
        [str(tmp_path / "in")], fleet_options(first, second), outputs=[str(out)], state=resumed
    )
    assert stats.done_earlier == 5 and len(read_jsonl(out)) == 5
    with pytest.raises(ConfigError, match="endpoint="):
        await run(
            [str(tmp_path / "in")],
            fleet_options(second, first),
            outputs=[str(out)],
            state=resumed,
        )


# --- the command line ---------------------------------------------------------------------


async def test_the_command_line_runs_a_fleet_and_never_shows_the_key(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    first, second = await start_emulator(), await start_emulator()
    wrong = closed_port_url().replace("http://", "http://user:pw-secret-4242@")
    make_files(tmp_path / "in", 12)
    out = tmp_path / "out.jsonl"
    summary = tmp_path / "summary.json"
    code, stdout, stderr = await run_cli(
        "run",
        str(tmp_path / "in"),
        "--model",
        "demo/1",
        "--endpoint",
        first,
        "--endpoint",
        wrong,
        "--endpoint",
        second,
        "--out",
        str(out),
        "--summary",
        str(summary),
        "--retries",
        "5",
        "-v",
        env={"ROBOFLOW_API_KEY": KEY},
    )
    assert code == 0, stderr
    assert len(read_jsonl(out)) == 12
    written = stdout + stderr + out.read_text() + summary.read_text()
    assert KEY not in written and "pw-secret-4242" not in written
    assert "does not look like a classify API" in stderr
    endpoints = json.loads(summary.read_text())["endpoints"]
    assert set(endpoints) == {first, wrong.replace("user:pw-secret-4242@", ""), second}
    assert "requests per endpoint:" in stderr


async def test_servers_that_take_different_upload_forms_each_get_theirs(
    start_emulator: StartEmulator,
) -> None:
    text_server, file_server = await start_emulator(), await start_emulator()
    options = fleet_options(text_server, file_server).client
    # Hosted hosts (base64) cannot be reached on loopback: the routes are set as a hosted and a
    # self-hosted server would get them, images prepared raw as for any mixed fleet.
    mixed = (Route(text_server, "both", "base64"), Route(file_server, "both", "multipart"))
    object.__setattr__(options, "routes", mixed)
    object.__setattr__(options, "upload", None)
    data = image_bytes(seed=11)
    async with ClassifyClient(options) as client:
        answers = [await client.classify(data=data) for _ in range(4)]
        assert client.fleet.usage()[text_server]["requests"] == 2
    wanted = expected_answer(data)["top"]
    assert all(answer.answer.top == wanted for answer in answers)
    for url in (text_server, file_server):
        assert (await emulator_stats(url))["by_status"] == {"200": 2}

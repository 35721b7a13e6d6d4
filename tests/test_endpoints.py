"""Endpoints: short names, the region, per-host defaults, where the key comes from, and what
goes on the wire (checked by a recording server on loopback)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import image_bytes, make_image, read_jsonl, run_cli

from batchclassify import ClientOptions, PipelineOptions, iter_results
from batchclassify.config import format_settings, resolve_settings
from batchclassify.endpoints import (
    NAMED_ENDPOINTS,
    default_endpoint,
    endpoint_defaults,
    resolve_endpoint,
    saved_api_key,
)
from batchclassify.errors import ConfigError
from batchclassify.retry import RetryPolicy

KEY = "endpoint-key-27182818"
ANSWER = {
    "time": 0.01,
    "image": {"width": 64, "height": 48},
    "predictions": [{"class": "cat", "class_id": 0, "confidence": 0.9}],
    "top": "cat",
    "confidence": 0.9,
}


def test_short_names_and_the_region() -> None:
    assert resolve_endpoint("serverless") == "https://serverless.roboflow.com"
    assert resolve_endpoint(" EU ") == "https://serverless.roboflow.eu"
    assert resolve_endpoint("legacy") == "https://classify.roboflow.com"
    assert resolve_endpoint("local") == "http://localhost:9001"
    assert resolve_endpoint("http://gpu-box:9001") == "http://gpu-box:9001"
    assert set(NAMED_ENDPOINTS) == {"serverless", "eu", "legacy", "local"}
    assert default_endpoint({}) == "https://serverless.roboflow.com"
    assert default_endpoint({"ROBOFLOW_REGION": "eu"}) == "https://serverless.roboflow.eu"
    settings = resolve_settings({"model": "m/1"}, {"ROBOFLOW_REGION": "EU"}).settings
    assert settings.endpoint == "https://serverless.roboflow.eu"
    assert resolve_settings({"endpoint": "legacy"}, {}).settings.endpoint == (
        "https://classify.roboflow.com"
    )


def test_each_host_gets_its_defaults() -> None:
    for hosted in ("serverless", "eu", "legacy"):
        defaults = endpoint_defaults(resolve_endpoint(hosted))
        # The key never goes into a URL sent to a hosted Roboflow host.
        assert defaults.hosted and defaults.key_transport == "header"
        assert defaults.upload == "base64"
    assert endpoint_defaults(resolve_endpoint("serverless")).upload_limit == 20 * 1024 * 1024
    assert endpoint_defaults(resolve_endpoint("legacy")).upload_limit is None  # its 413 decides
    local = endpoint_defaults("http://127.0.0.1:9001")
    assert (local.hosted, local.key_transport, local.upload, local.upload_limit) == (
        False,
        "both",
        "multipart",
        None,
    )
    options = resolve_settings({"model": "m/1", "api_key": KEY}, {}).settings.pipeline_options()
    assert options.client.key_transport == "header" and options.client.upload == "base64"
    assert options.prepare.max_upload_bytes == 20 * 1024 * 1024 and options.prepare.base64_upload


def _login(tmp_path: Path, default: str = "my-ws") -> dict[str, str]:
    """A config file as ``roboflow login`` writes it, and the environment pointing at it."""
    path = tmp_path / "roboflow.json"
    path.write_text(
        json.dumps(
            {
                "workspaces": {
                    "a1": {"url": "my-ws", "name": "Mine", "apiKey": KEY},
                    "b2": {"url": "other-ws", "name": "Other", "apiKey": "other-key-1234567"},
                },
                "RF_WORKSPACE": default,
                "ROBOFLOW_REGION": "eu",
            }
        )
    )
    return {"ROBOFLOW_CONFIG_DIR": str(path), "HOME": str(tmp_path)}


def test_the_key_saved_by_roboflow_login_is_used(tmp_path: Path) -> None:
    environ = _login(tmp_path)
    key, origin = saved_api_key(environ, None) or ("", "")
    assert key == KEY and "roboflow login" in origin and "my-ws" in origin and KEY not in origin
    assert saved_api_key(environ, "other-ws") == (
        "other-key-1234567",
        f"roboflow login ({tmp_path / 'roboflow.json'}, workspace 'other-ws')",
    )
    resolved = resolve_settings({"model": "other-ws/proj/2"}, environ)
    assert resolved.settings.api_key == "other-key-1234567"
    assert resolved.settings.endpoint == "https://serverless.roboflow.eu"  # its saved region
    shown = format_settings(resolved)
    assert "roboflow login" in shown and "other-key-1234567" not in shown
    # The environment still wins, and nothing is read without a saved login.
    assert resolve_settings({}, {**environ, "ROBOFLOW_API_KEY": "env"}).settings.api_key == "env"
    assert saved_api_key({"HOME": str(tmp_path / "nobody")}, None) is None
    (tmp_path / "roboflow.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the roboflow config file"):
        saved_api_key(environ, None)


def test_client_options_read_the_environment_and_refuse_a_slash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROBOFLOW_API_KEY", KEY)
    assert ClientOptions(model="flowers", version=3).api_key == KEY
    with pytest.raises(ConfigError, match="project id alone"):
        ClientOptions(model="flowers/3", version=3)
    assert ClientOptions(model="m", version=1, endpoint="eu").endpoint == (
        "https://serverless.roboflow.eu"
    )


Recorder = Callable[[int], Awaitable[str]]


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, list[dict[str, Any]]]]:
    """A server that records each request (query, headers, the image it carried) and answers
    with ``status`` (200: a valid classification)."""
    seen: list[dict[str, Any]] = []
    runners: list[web.AppRunner] = []

    async def start(status: int) -> str:
        async def handler(request: web.Request) -> web.Response:
            record: dict[str, Any] = {
                "query": dict(request.query),
                "authorization": request.headers.get("Authorization"),
                "content_type": request.content_type,
            }
            if request.content_type == "multipart/form-data":
                form = await request.post()
                part = form["file"]
                assert isinstance(part, web.FileField)
                record["image"] = part.file.read()
            else:
                record["image"] = base64.b64decode(await request.read())
            seen.append(record)
            if status != 200:
                return web.json_response({"message": "payload too large"}, status=status)
            return web.json_response(ANSWER)

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{model}/{version}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start, seen
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("transport", "in_header", "in_query"),
    [("header", True, False), ("query", False, True), ("both", True, True)],
)
@pytest.mark.parametrize("upload", ["base64", "multipart"])
async def test_what_goes_on_the_wire(
    tmp_path: Path,
    recorder: tuple[Recorder, list[dict[str, Any]]],
    transport: str,
    in_header: bool,
    in_query: bool,
    upload: str,
) -> None:
    start, seen = recorder
    url = await start(200)
    data = image_bytes(seed=4, size=(64, 48))
    (tmp_path / "a.jpg").write_bytes(data)
    options = PipelineOptions(
        client=ClientOptions(
            endpoint=url,
            model="demo",
            version=1,
            api_key=KEY,
            key_transport=transport,  # type: ignore[arg-type]
            upload=upload,  # type: ignore[arg-type]
        )
    )
    [result] = [r async for r in iter_results([str(tmp_path / "a.jpg")], options)]
    assert result.ok, result
    [request] = seen
    assert (request["authorization"] == f"Bearer {KEY}") is in_header
    assert (request["query"].get("api_key") == KEY) is in_query
    assert request["query"]["confidence"] == "0.01"  # the whole distribution is asked for
    assert request["image"] == data  # the file's own bytes, either way
    expected_type = (
        "multipart/form-data" if upload == "multipart" else ("application/x-www-form-urlencoded")
    )
    assert request["content_type"] == expected_type


async def test_a_413_says_to_use_max_size(
    tmp_path: Path, recorder: tuple[Recorder, list[dict[str, Any]]]
) -> None:
    start, _ = recorder
    url = await start(413)
    make_image(tmp_path / "in" / "big.jpg", seed=1)
    options = PipelineOptions(
        client=ClientOptions(
            endpoint=url, model="demo", version=1, api_key=KEY, retry=RetryPolicy(attempts=1)
        )
    )
    [result] = [r async for r in iter_results([str(tmp_path / "in")], options)]
    assert result.error is not None and result.error.http_status == 413
    assert "--max-size" in result.error.message


async def test_the_row_records_the_original_size_and_what_was_sent(
    tmp_path: Path, recorder: tuple[Recorder, list[dict[str, Any]]]
) -> None:
    start, _ = recorder
    url = await start(200)
    make_image(tmp_path / "in" / "wide.jpg", seed=2, size=(400, 100))
    make_image(tmp_path / "in" / "small.jpg", seed=3, size=(40, 30))
    out = tmp_path / "r.jsonl"
    code, _, err = await run_cli(
        "run", str(tmp_path / "in"), "--model", "demo/1", "--endpoint", url,
        "--max-size", "200", "--out", str(out), env={"ROBOFLOW_API_KEY": KEY},
    )  # fmt: skip
    assert code == 0, err
    rows = {Path(row["source"]).name: row for row in read_jsonl(out)}
    assert rows["wide.jpg"]["image"] == {"width": 400, "height": 100}
    assert rows["wide.jpg"]["sent"] == {"width": 200, "height": 50}
    assert rows["small.jpg"]["image"] == {"width": 40, "height": 30}
    assert "sent" not in rows["small.jpg"]  # sent as it is


def test_confidence_is_a_probability_or_a_server_keyword() -> None:
    assert resolve_settings({"confidence": 0.5}, {}).settings.confidence == 0.5
    assert resolve_settings({}, {"BATCHCLASSIFY_CONFIDENCE": "best"}).settings.confidence == "best"
    assert resolve_settings({}, {"BATCHCLASSIFY_CONFIDENCE": "0.25"}).settings.confidence == 0.25
    for wrong in (1.5, -0.1, "sometimes"):
        with pytest.raises(ConfigError, match="must be a probability between 0 and 1"):
            resolve_settings({"confidence": wrong}, {})


async def test_confidence_mistakes_on_the_command_line(tmp_path: Path) -> None:
    make_image(tmp_path / "a.jpg", seed=1)
    base = ["run", str(tmp_path / "a.jpg"), "--model", "demo/1", "--emulate", "--out", "-"]
    code, _, err = await run_cli(*base, "--confidence", "1.5")
    assert code == 2 and "must be a probability between 0 and 1" in err  # not 1.5 %
    code, _, err = await run_cli(*base, "--confidence", "often")
    assert code == 2 and "is not a probability" in err
    code, out, err = await run_cli(*base, "--confidence", "default")
    assert code == 0, err
    assert json.loads(out)["status"] == "ok"


async def test_key_transport_and_upload_options_on_the_command_line(
    tmp_path: Path, recorder: tuple[Recorder, list[dict[str, Any]]]
) -> None:
    start, seen = recorder
    url = await start(200)
    data = image_bytes(seed=5, size=(64, 48))
    (tmp_path / "a.jpg").write_bytes(data)
    base = ["run", str(tmp_path / "a.jpg"), "--model", "demo/1", "--endpoint", url, "--out", "-"]
    env = {"ROBOFLOW_API_KEY": KEY}
    code, _, err = await run_cli(
        *base, "--api-key-transport", "header", "--upload", "base64", env=env
    )
    assert code == 0, err
    code, _, err = await run_cli(
        *base, "--api-key-transport", "query", "--upload", "multipart", env=env
    )
    assert code == 0, err
    header, query = seen
    assert header["authorization"] == f"Bearer {KEY}" and "api_key" not in header["query"]
    assert header["content_type"] == "application/x-www-form-urlencoded"
    assert query["authorization"] is None and query["query"]["api_key"] == KEY
    assert query["content_type"] == "multipart/form-data"
    assert header["image"] == query["image"] == data
    code, _, err = await run_cli(*base, "--upload", "zip", env=env)
    assert code == 2 and "invalid choice" in err


def test_a_broken_roboflow_config_stops_no_dry_run(tmp_path: Path) -> None:
    broken = tmp_path / "roboflow.json"
    broken.write_text("{not json")
    environ = {"ROBOFLOW_CONFIG_DIR": str(broken)}
    assert resolve_settings({"emulate": True, "model": "m/1"}, environ).settings.emulate
    with pytest.raises(ConfigError, match="cannot read the roboflow config file"):
        resolve_settings({"model": "m/1"}, environ)

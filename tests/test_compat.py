"""The official clients, unchanged, against the emulator: ``roboflow`` and ``inference-sdk``.

``roboflow`` (the ``compat`` extra) is synchronous (``requests``): its calls run in a thread
(``asyncio.to_thread``) while the emulator serves from the test's event loop.

``inference-sdk`` pins ``pillow<13`` and ``numpy<2.4``, so it does not share the suite's venv: it
runs in a subprocess of the Python named by ``INFERENCE_SDK_PYTHON`` (``.ci/run`` makes a venv
for it), or of this one if it has ``inference_sdk``. The subprocess runs :data:`SDK_DRIVER` and
reports the client's answers as JSON; the test compares them with :func:`predict`. Each half is
skipped when its client is not available.

``InferenceHTTPClient`` has two modes. v1, the default for any URL that is not a Roboflow host:
``GET /model/registry``, ``POST /model/add`` when the model is not loaded yet, then ``POST
/infer/classification`` with a JSON body (the image base64-encoded in ``{"type": "base64",
"value": ...}``, a list when ``max_batch_size`` > 1, the key in the body). v0
(``select_api_v0()``, the default for Roboflow's hosted URLs): ``POST /{project}/{version}``
with the key and parameters in the query and the base64 image as the body, sent as
``Content-Type: application/json``. Both return the service's JSON (a list for several
images); an error status raises ``HTTPCallErrorError``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import emulator_stats, image_bytes
from PIL import Image

from batchclassify.emulator import VOLATILE_KEYS, predict

StartEmulator = Callable[..., Awaitable[str]]
ServeBytes = Callable[[dict[str, bytes | int]], Awaitable[str]]
ANSWER_KEYS = ("image", "predictions", "top", "confidence")


def stable(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in VOLATILE_KEYS}


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"{n}.jpg"
        path.write_bytes(image_bytes(seed=60 + n, size=(40 + n, 30)))
        paths.append(path)
    return paths


async def loaded_models(url: str) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/model/registry") as resp:
        return [model["model_id"] for model in (await resp.json())["models"]]


# ---------------------------------------------------------------------------------------------
# roboflow


async def test_official_roboflow_client_works_unchanged(
    emulator_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classification = pytest.importorskip("roboflow.models.classification")
    path = tmp_path / "x.jpg"
    path.write_bytes(image_bytes(seed=4, size=(70, 50)))
    model = classification.ClassificationModel(
        api_key="any-key", id="my-workspace/my-project/3", local=f"{emulator_url}/"
    )
    result = await asyncio.to_thread(lambda: model.predict(str(path)).json())
    (answer,) = result["predictions"]
    assert list(answer)[:6] == ["time", "image", "predictions", "top", "confidence", "inference_id"]
    assert answer["image_path"] == str(path) and answer["prediction_type"] == "ClassificationModel"
    # the client re-encodes the file as JPEG quality 90 before sending
    with Image.open(path) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, quality=90, format="JPEG")
    expected = predict(out.getvalue())
    assert {k: answer[k] for k in ANSWER_KEYS} == {k: expected[k] for k in ANSWER_KEYS}
    stats = await emulator_stats(emulator_url)
    assert stats["ok_requests"] == 1
    capsys.readouterr()  # the client prints a banner for local=


async def test_official_roboflow_client_hosted_image(
    start_emulator: StartEmulator, serve_bytes: ServeBytes, capsys: pytest.CaptureFixture[str]
) -> None:
    classification = pytest.importorskip("roboflow.models.classification")
    url = await start_emulator(allow_http_image_urls=True)  # the image is on 127.0.0.1
    data = image_bytes(seed=12)
    files = await serve_bytes({"/cat.jpg": data})
    model = classification.ClassificationModel(
        api_key="any-key", id="my-workspace/my-project/3", local=f"{url}/"
    )
    # hosted=True sends ?image=URL with no body and no Content-Type
    result = await asyncio.to_thread(lambda: model.predict(f"{files}/cat.jpg", hosted=True).json())
    (answer,) = result["predictions"]
    assert answer["predictions"] == predict(data)["predictions"]
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# inference-sdk

#: runs in the SDK's interpreter: ``python -c SDK_DRIVER SPEC``; prints one JSON line
SDK_DRIVER = """
import json, sys
from inference_sdk import InferenceConfiguration, InferenceHTTPClient
from inference_sdk.http.errors import HTTPCallErrorError

spec = json.loads(sys.argv[1])
client = InferenceHTTPClient(api_url=spec["url"], api_key=spec["api_key"])
report = {"default_mode": client.client_mode.value}
if spec.get("mode") == "v0":
    client.select_api_v0()
elif spec.get("mode") == "v1":
    client.select_api_v1()
if spec.get("configuration"):
    client.configure(InferenceConfiguration(**spec["configuration"]))
try:
    report["answer"] = client.infer(spec["images"], model_id=spec["model_id"])
except HTTPCallErrorError as exc:
    report["error"] = {"status_code": exc.status_code, "api_message": str(exc.api_message)}
print(json.dumps(report))
"""


def sdk_python() -> str:
    """The interpreter that has ``inference_sdk``, or skip the test."""
    configured = os.environ.get("INFERENCE_SDK_PYTHON")
    if configured:
        return configured  # set by .ci/run: a wrong path must fail, not skip
    if importlib.util.find_spec("inference_sdk") is not None:
        return sys.executable
    pytest.skip("inference-sdk is not installed (or set INFERENCE_SDK_PYTHON)")


async def run_sdk(
    url: str,
    images: str | list[str],
    *,
    api_key: str = "k",
    mode: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``InferenceHTTPClient(url, api_key)[.select_api_MODE()][.configure(...)].infer(images,
    model_id="demo/1")`` in the SDK's interpreter, while the emulator serves here."""
    spec = {
        "url": url,
        "api_key": api_key,
        "images": images,
        "model_id": "demo/1",
        "mode": mode,
        "configuration": configuration,
    }
    process = await asyncio.create_subprocess_exec(
        sdk_python(),
        "-c",
        SDK_DRIVER,
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    report: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return report


async def test_inference_sdk_default_mode_is_v1_and_works_unchanged(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    url = await start_emulator(api_key="secret", models={"demo/1"})
    (path,) = write_images(tmp_path, 1)
    report = await run_sdk(url, str(path), api_key="secret")  # no configuration at all
    assert report["default_mode"] == "v1"  # any URL but Roboflow's own hosts
    assert stable(report["answer"]) == stable(predict(path.read_bytes()))  # the file's bytes
    # it asked the registry, loaded the model, then used the JSON route
    stats = await emulator_stats(url)
    assert stats["by_route"] == {
        "/infer/classification": 1,
        "/model/add": 1,
        "/model/registry": 1,
    }
    assert stats["requests"] == 1 and stats["ok_requests"] == 1
    assert await loaded_models(url) == ["demo/1"]


async def test_inference_sdk_v1_batches_answer_in_input_order(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    url = await start_emulator(multi_label=True)
    paths = write_images(tmp_path, 3)
    configuration = {"max_batch_size": 4, "confidence_threshold": 0.3}
    report = await run_sdk(url, [str(p) for p in paths], mode="v1", configuration=configuration)
    answers = report["answer"]
    assert isinstance(answers, list) and len(answers) == 3
    for answer, path in zip(answers, paths, strict=True):
        expected = predict(path.read_bytes(), multi_label=True, confidence=0.3)
        assert stable(answer) == stable(expected)
    stats = await emulator_stats(url)
    assert stats["by_route"]["/infer/classification"] == 1  # one request for the batch


async def test_inference_sdk_v0_uses_the_legacy_route(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    url = await start_emulator(api_key="secret")
    paths = write_images(tmp_path, 2)
    report = await run_sdk(
        url,
        [str(p) for p in paths],
        api_key="secret",
        mode="v0",
        configuration={"confidence_threshold": 0.5},
    )
    for answer, path in zip(report["answer"], paths, strict=True):
        assert stable(answer) == stable(predict(path.read_bytes(), confidence=0.5))
    stats = await emulator_stats(url)
    assert stats["by_route"] == {"/{model}/{version}": 2}  # no registry round trip in v0
    assert stats["ok_requests"] == 2


@pytest.mark.parametrize("mode", ["v0", "v1"])
async def test_inference_sdk_header_transport(
    start_emulator: StartEmulator, tmp_path: Path, mode: str
) -> None:
    url = await start_emulator(api_key="secret")
    (path,) = write_images(tmp_path, 1)
    configuration = {"api_key_transport": "header"}  # the key only in Authorization: Bearer
    report = await run_sdk(url, str(path), api_key="secret", mode=mode, configuration=configuration)
    assert stable(report["answer"]) == stable(predict(path.read_bytes()))


@pytest.mark.parametrize("mode", ["v0", "v1"])
async def test_inference_sdk_sees_a_wrong_key_as_401(
    start_emulator: StartEmulator, tmp_path: Path, mode: str
) -> None:
    url = await start_emulator(api_key="secret")
    (path,) = write_images(tmp_path, 1)
    configuration = {"api_key_transport": "legacy"}
    report = await run_sdk(url, str(path), api_key="wrong", mode=mode, configuration=configuration)
    assert report["error"]["status_code"] == 401
    assert "Unauthorized api_key" in report["error"]["api_message"]

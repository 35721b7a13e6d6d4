"""Tests for batchclassify.emulator, over real HTTP on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import math
import os
import random
import signal
import socket
import statistics
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import FORM_CONTENT_TYPE, b64, emulator_stats, image_bytes, reset_emulator
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batchclassify import cli
from batchclassify.emulator import (
    DEFAULT_CLASSES,
    LISTENING_PREFIX,
    VOLATILE_KEYS,
    EmulatorConfig,
    TokenBucket,
    analyze_image,
    config_from_args,
    decode_base64_payload,
    emulator_in_thread,
    parse_confidence,
    predict,
    running_emulator,
    sample_latency,
)
from batchclassify.errors import ConfigError, InputError

StartEmulator = Callable[..., Awaitable[str]]
SINGLE_KEYS = ["time", "image", "predictions", "top", "confidence", "inference_id"]
MULTI_KEYS = ["time", "image", "predictions", "predicted_classes", "inference_id"]
RED_JPEG = image_bytes(color=(220, 30, 30), size=(64, 48))


def stable(body: dict[str, Any]) -> dict[str, Any]:
    """The answer without the keys that legitimately change per request."""
    return {k: v for k, v in body.items() if k not in VOLATILE_KEYS}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def classify(
    session: aiohttp.ClientSession,
    url: str,
    data: bytes | str | None = RED_JPEG,
    *,
    model: str = "proj/1",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
    skip_content_type: bool = False,
) -> tuple[int, dict[str, str], str]:
    """POST one classify request; ``bytes`` are base64-encoded, ``str`` is sent as is."""
    query = {"api_key": "test-key", **(params or {})}
    body = b64(data) if isinstance(data, bytes) else data
    async with session.post(
        f"{url}/{model}",
        params=query,
        data=body,
        headers=FORM_CONTENT_TYPE if headers is None else headers,
        skip_auto_headers=["Content-Type"] if skip_content_type else (),
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def classify_json(
    session: aiohttp.ClientSession, url: str, data: bytes | str = RED_JPEG, **kwargs: Any
) -> dict[str, Any]:
    status, _, text = await classify(session, url, data, **kwargs)
    assert status == 200, text
    body: dict[str, Any] = json.loads(text)
    return body


# ---------------------------------------------------------------------------------------------
# response shapes


async def test_single_label_shape(emulator_url: str, session: aiohttp.ClientSession) -> None:
    data = image_bytes(seed=3, size=(123, 45))
    body = await classify_json(session, emulator_url, data, params={"confidence": "0"})
    assert list(body) == SINGLE_KEYS
    assert isinstance(body["time"], float) and 0 <= body["time"] < 1
    assert body["image"] == {"width": 123, "height": 45}
    uuid.UUID(body["inference_id"], version=4)
    predictions = body["predictions"]
    assert [list(p) for p in predictions] == [["class", "class_id", "confidence"]] * 6
    assert sorted(p["class"] for p in predictions) == sorted(DEFAULT_CLASSES)
    for p in predictions:
        assert p["class_id"] == DEFAULT_CLASSES.index(p["class"])
        assert round(p["confidence"], 4) == p["confidence"]
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True)
    assert math.isclose(sum(confidences), 1.0, abs_tol=1e-3)  # a softmax
    assert body["top"] == predictions[0]["class"]
    assert body["confidence"] == predictions[0]["confidence"]
    assert stable(body) == stable(predict(data, confidence=0))


async def test_default_threshold_drops_classes_under_it(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    body = await classify_json(session, emulator_url)
    assert body["predictions"], "expected the red test image to have a class over 0.4"
    assert all(p["confidence"] >= 0.4 for p in body["predictions"])
    everything = await classify_json(session, emulator_url, params={"confidence": "0"})
    kept = [p for p in everything["predictions"] if p["confidence"] >= 0.4]
    assert body["predictions"] == kept
    assert stable(body) == stable(predict(RED_JPEG))


async def test_nothing_over_threshold_gives_empty_top(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    body = await classify_json(session, emulator_url, params={"confidence": "0.9999"})
    assert list(body) == SINGLE_KEYS
    assert body["predictions"] == []
    assert body["top"] == ""
    assert body["confidence"] == 0.0


@pytest.mark.parametrize(("percent", "fraction"), [("50", "0.5"), ("99", "0.99"), ("1", "0.01")])
async def test_confidence_of_one_or_more_is_percent(
    emulator_url: str, session: aiohttp.ClientSession, percent: str, fraction: str
) -> None:
    as_percent = await classify_json(session, emulator_url, params={"confidence": percent})
    as_fraction = await classify_json(session, emulator_url, params={"confidence": fraction})
    assert stable(as_percent) == stable(as_fraction)


def test_parse_confidence() -> None:
    assert parse_confidence(None) == 0.4
    assert parse_confidence("") == 0.4
    assert parse_confidence("0.25") == 0.25
    assert parse_confidence("40") == 0.4
    assert parse_confidence("1") == 0.01
    for bad in ("abc", "-0.1", "101", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_confidence(bad)


async def test_multi_label_shape(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    classes = ("cat", "dog", "sky", "grass")
    url = await start_emulator(multi_label=True, classes=classes)
    data = image_bytes(seed=11, size=(50, 70))
    body = await classify_json(session, url, data, params={"confidence": "0.5"})
    assert list(body) == MULTI_KEYS
    assert body["image"] == {"width": 50, "height": 70}
    uuid.UUID(body["inference_id"], version=4)
    assert list(body["predictions"]) == list(classes)
    for i, name in enumerate(classes):
        entry = body["predictions"][name]
        assert list(entry) == ["confidence", "class_id"]
        assert entry["class_id"] == i
        assert (
            0 <= entry["confidence"] <= 1 and round(entry["confidence"], 4) == entry["confidence"]
        )
    assert body["predicted_classes"] == [
        name for name in classes if body["predictions"][name]["confidence"] > 0.5
    ]
    expected = predict(data, classes=classes, multi_label=True, confidence=0.5)
    assert stable(body) == stable(expected)
    everything = await classify_json(session, url, data, params={"confidence": "0"})
    assert everything["predicted_classes"] == list(classes)  # independent sigmoids, all > 0


# ---------------------------------------------------------------------------------------------
# determinism and payload forms


async def test_predictions_are_deterministic_and_content_dependent(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, sample_images: list[Path]
) -> None:
    first, second = await start_emulator(), await start_emulator(seed=99)
    params = {"confidence": "0"}
    answers = []
    for path in sample_images:
        data = path.read_bytes()
        a = await classify_json(session, first, data, params=params)
        b = await classify_json(session, first, data, params=params)
        c = await classify_json(session, second, data, params=params)
        assert stable(a) == stable(b) == stable(c) == stable(predict(data, confidence=0))
        assert a["inference_id"] != b["inference_id"]
        answers.append(json.dumps(a["predictions"]))
    assert len(set(answers)) == len(sample_images), "different images got the same answer"


def test_same_colours_different_layout_or_size_differ() -> None:
    left = Image.new("RGB", (40, 40), (255, 0, 0))
    left.paste((0, 0, 255), (20, 0, 40, 40))
    right = left.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    encoded = []
    for image in (left, right):
        out = io.BytesIO()
        image.save(out, "PNG")
        encoded.append(out.getvalue())
    small = image_bytes(color=(90, 90, 90), size=(30, 30), fmt="PNG")
    large = image_bytes(color=(90, 90, 90), size=(31, 30), fmt="PNG")
    for a, b in ((encoded[0], encoded[1]), (small, large)):
        assert predict(a, confidence=0)["predictions"] != predict(b, confidence=0)["predictions"]


async def test_data_url_prefix_and_line_wrapped_base64(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    plain = await classify_json(session, emulator_url)
    encoded = b64(RED_JPEG)
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    for body in (f"data:image/jpeg;base64,{encoded}", f"  \r\n{wrapped}\n\n"):
        assert stable(await classify_json(session, emulator_url, body)) == stable(plain)


async def test_big_payload_is_decoded_off_the_loop(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    noise = Image.effect_noise((1200, 1200), 60).convert("RGB")
    out = io.BytesIO()
    noise.save(out, "JPEG", quality=95)
    data = out.getvalue()
    encoded = b64(data).encode()
    assert len(encoded) > 1024 * 1024  # over both thresholds: base64 and image decoding
    async with session.post(  # BytesIO: aiohttp warns about big bodies given as bytes
        f"{emulator_url}/proj/1?api_key=k&confidence=0",
        data=io.BytesIO(encoded),
        headers=FORM_CONTENT_TYPE,
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert stable(body) == stable(predict(data, confidence=0))
    assert body["image"] == {"width": 1200, "height": 1200}


def test_decode_base64_payload() -> None:
    raw = b"\xff\xd8 image bytes"
    encoded = base64.b64encode(raw)
    assert decode_base64_payload(encoded) == raw
    assert decode_base64_payload(b"data:image/png;base64," + encoded + b"\n") == raw
    for bad in (b"", b"   \n", b"data:image/png;base64,", b"abc", b"data:nocomma"):
        with pytest.raises(InputError):
            decode_base64_payload(bad)


async def test_bearer_token_is_accepted(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(api_key="secret")
    async with session.post(
        f"{url}/proj/1",
        data=b64(RED_JPEG),
        headers={**FORM_CONTENT_TYPE, "Authorization": "Bearer secret"},
    ) as resp:
        assert resp.status == 200
    status, _, _ = await classify(session, url, params={"api_key": "secret"})
    assert status == 200


@pytest.mark.parametrize(
    "mode_image",
    [
        Image.new("L", (20, 10), 128),
        Image.new("1", (9, 9), 1),
        Image.new("RGBA", (16, 16), (0, 255, 0, 40)),
        Image.new("P", (12, 12), 3),
        Image.new("I;16", (10, 10), 40000),
        Image.new("CMYK", (10, 10), (0, 255, 0, 0)),
        Image.new("RGB", (1, 1), (1, 2, 3)),
        Image.new("RGB", (2000, 1), (1, 2, 3)),
    ],
    ids=["L", "1", "RGBA", "P", "I16", "CMYK", "1x1", "2000x1"],
)
def test_odd_but_valid_images_decode(mode_image: Image.Image) -> None:
    fmt = "JPEG" if mode_image.mode in ("L", "CMYK") else "PNG"
    out = io.BytesIO()
    mode_image.save(out, fmt)
    body = predict(out.getvalue(), confidence=0)
    assert body["image"] == {"width": mode_image.width, "height": mode_image.height}
    assert len(body["predictions"]) == len(DEFAULT_CLASSES)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(InputError):  # anything else escaping would be a bug
        analyze_image(data)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=len(RED_JPEG) - 1))
def test_truncated_jpeg_is_an_input_error(cut: int) -> None:
    with pytest.raises(InputError):
        analyze_image(RED_JPEG[:cut])


# ---------------------------------------------------------------------------------------------
# error statuses


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (b"not an image at all", "UnidentifiedImageError"),
        (RED_JPEG[: len(RED_JPEG) // 2], "truncated"),
        (png_claiming(40_000, 40_000), "DecompressionBomb"),
        (png_claiming(10_000, 10_000), "pixels"),  # over Pillow's limit, under twice it
        ("", "empty payload"),
        ("   \n", "empty payload"),
        ("abc", "invalid base64"),
        ("data:image/png;base64,", "empty payload"),
    ],
    ids=["not-image", "truncated", "bomb", "big", "empty", "blank", "bad-b64", "empty-data-url"],
)
async def test_undecodable_payloads_are_400(
    emulator_url: str, session: aiohttp.ClientSession, body: bytes | str, cause: str
) -> None:
    status, headers, text = await classify(session, emulator_url, body)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    message = json.loads(text)["message"]
    assert message.startswith("Could not load input image. Cause: ")
    assert cause.lower() in message.lower()


async def test_missing_content_type_is_400(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    status, _, text = await classify(session, emulator_url, headers={}, skip_content_type=True)
    assert status == 400
    assert "Content-Type" in json.loads(text)["message"]


async def test_multipart_is_400(emulator_url: str, session: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("file", RED_JPEG, filename="a.jpg", content_type="image/jpeg")
    async with session.post(f"{emulator_url}/proj/1?api_key=k", data=form) as resp:
        assert resp.status == 400


async def test_auth_and_model_errors(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(api_key="secret", models={"proj/1", "other/3"})
    checks = [
        ({"api_key": ""}, "proj/1", 401),
        ({"api_key": "wrong"}, "proj/1", 403),
        ({"api_key": "secret"}, "proj/2", 404),
        ({"api_key": "secret"}, "nope/1", 404),
        ({"api_key": "secret"}, "proj/abc", 404),
        ({"api_key": "secret"}, "proj/0", 404),
        ({"api_key": "secret", "confidence": "lots"}, "proj/1", 422),
        ({"api_key": "secret"}, "other/3", 200),
        ({"api_key": "secret"}, "proj/01", 200),
    ]
    for params, model, expected in checks:
        status, _, text = await classify(session, url, model=model, params=params)
        assert status == expected, (params, model, text)
        if status != 200:
            body = json.loads(text)
            assert "message" in body or "detail" in body
            assert "secret" not in text and "wrong" not in text  # keys are never echoed
    # a missing key is 401 even when any key would do
    any_key = await start_emulator()
    status, _, _ = await classify(session, any_key, params={"api_key": ""})
    assert status == 401


async def test_body_too_large_is_413(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(max_body_bytes=1000)
    big = image_bytes(seed=5, size=(200, 200))
    assert len(b64(big)) > 1000
    status, _, _ = await classify(session, url, big)
    assert status == 413

    async def chunks() -> AsyncIterator[bytes]:  # chunked upload: no Content-Length
        for _ in range(10):
            yield b"A" * 300

    async with session.post(
        f"{url}/proj/1?api_key=k", data=chunks(), headers=FORM_CONTENT_TYPE
    ) as resp:
        assert resp.status == 413
    status, _, _ = await classify(session, url, image_bytes(size=(8, 8)))
    assert status == 200  # the server is still fine afterwards
    assert (await emulator_stats(url))["by_status"] == {"200": 1, "413": 2}


async def test_client_leaving_mid_upload_is_counted_and_harmless(emulator_url: str) -> None:
    host, port = emulator_url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /proj/1?api_key=k HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 100000\r\n\r\n" + b"A" * 100
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        stats = await emulator_stats(emulator_url)
        if stats["by_status"]:
            break
        await asyncio.sleep(0.01)
    assert stats["by_status"] == {"499": 1} and stats["in_flight"] == 0


# ---------------------------------------------------------------------------------------------
# image= URLs


async def test_image_url_is_fetched(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    serve_bytes: Callable[[dict[str, bytes | int]], Awaitable[str]],
) -> None:
    url = await start_emulator()
    data = image_bytes(seed=21, size=(33, 44))
    files = await serve_bytes({"/cat.jpg": data, "/gone.jpg": 404, "/junk.jpg": b"junk"})
    # Like the official client's hosted=True: no body and no Content-Type at all.
    async with session.post(
        f"{url}/proj/1", params={"api_key": "k", "image": f"{files}/cat.jpg"}
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert stable(body) == stable(predict(data))
    assert body["image"] == {"width": 33, "height": 44}

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    for bad in (
        f"{files}/gone.jpg",
        f"{files}/junk.jpg",
        f"http://127.0.0.1:{closed_port}/x.jpg",
        "ftp://example.com/x.jpg",
        "/etc/passwd",
        "http://",
    ):
        status, _, text = await classify(session, url, "", params={"image": bad})
        assert status == 400, bad
        assert json.loads(text)["message"].startswith("Could not load input image. Cause: ")
    stats = await emulator_stats(url, images=True)
    assert stats["images"][hashlib.sha256(data).hexdigest()] == {"requests": 1, "ok": 1}


async def test_https_only_when_http_urls_are_not_allowed(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    serve_bytes: Callable[[dict[str, bytes | int]], Awaitable[str]],
) -> None:
    url = await start_emulator(allow_http_image_urls=False)
    files = await serve_bytes({"/cat.jpg": RED_JPEG})
    for bad in (f"{files}/cat.jpg", "https://127.0.0.1/x.jpg", "https://localhost/x.jpg"):
        status, _, _ = await classify(session, url, "", params={"image": bad})
        assert status == 400, bad


# ---------------------------------------------------------------------------------------------
# injected faults


async def test_fail_statuses(start_emulator: StartEmulator, session: aiohttp.ClientSession) -> None:
    url = await start_emulator(fail_rate=1.0, seed=3)
    seen: Counter[int] = Counter()
    for _ in range(40):
        status, headers, text = await classify(session, url)
        seen[status] += 1
        if status == 503:
            assert headers["Retry-After"] == "1"
            assert "message" in json.loads(text)
        if status in (502, 504):
            assert headers["Content-Type"].startswith("text/html")  # never assume JSON
    assert set(seen) == {500, 502, 503, 504}
    stats = await emulator_stats(url)
    assert stats["by_status"] == {str(k): v for k, v in seen.items()}
    assert stats["injected"] == {"fail": 40}
    assert stats["ok_requests"] == 0


async def test_faults_are_reproducible_with_a_seed(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    async def statuses(url: str) -> list[int]:
        return [(await classify(session, url))[0] for _ in range(25)]

    a = await start_emulator(fail_rate=0.5, seed=42)
    b = await start_emulator(fail_rate=0.5, seed=42)
    first = await statuses(a)
    assert first == await statuses(b)
    assert 200 in first and set(first) - {200}
    await reset_emulator(a)  # reseeds too
    assert await statuses(a) == first


async def test_reset_is_a_connection_error(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(reset_rate=1.0)
    for _ in range(3):
        with pytest.raises(aiohttp.ClientConnectionError):
            await classify(session, url)
    stats = await emulator_stats(url)
    assert stats["by_status"] == {"reset": 3}
    assert stats["in_flight"] == 0


async def test_hang_is_a_client_timeout_and_cleanup_is_prompt(
    session: aiohttp.ClientSession,
) -> None:
    async with running_emulator(EmulatorConfig(hang_rate=1.0)) as url:
        with pytest.raises(asyncio.TimeoutError):
            await classify(session, url, timeout=0.3)
        # A second client that is still waiting when the server stops.
        waiting = asyncio.create_task(classify(session, url, timeout=10))
        for _ in range(100):  # the first handler notices its client gave up
            stats = await emulator_stats(url)
            if stats["in_flight"] == 1 and stats["injected"] == {"hang": 2}:
                break
            await asyncio.sleep(0.02)
        assert stats["in_flight"] == 1 and stats["injected"] == {"hang": 2}
        assert stats["by_status"] == {"hang": 1}
        started = time.monotonic()
    assert time.monotonic() - started < 1.5
    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(waiting, 2)


async def test_hang_is_bounded_by_hang_seconds(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(hang_rate=1.0, hang_seconds=0.2)
    with pytest.raises(aiohttp.ClientConnectionError):
        await classify(session, url, timeout=3)
    assert (await emulator_stats(url))["by_status"] == {"hang": 1}


async def test_garbage_bodies_are_not_json(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(garbage_rate=1.0, seed=1)
    kinds = set()
    for _ in range(12):
        status, headers, text = await classify(session, url)
        assert status == 200
        kinds.add((headers["Content-Type"].split(";")[0], bool(text)))
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    assert len(kinds) == 3  # truncated JSON, HTML, empty
    stats = await emulator_stats(url)
    assert stats["by_status"] == {"200": 12}
    assert stats["ok_requests"] == 0  # garbage is not an answer


# ---------------------------------------------------------------------------------------------
# rate limit and latency


async def test_rate_limit_burst_sees_429(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(rate_limit=2, rate_limit_burst=3, rate_limit_retry_after=0.2)
    results = await asyncio.gather(*(classify(session, url) for _ in range(12)))
    seen = Counter(status for status, _, _ in results)
    assert set(seen) == {200, 429}
    assert 3 <= seen[200] <= 4  # the burst, plus at most one token refilled meanwhile
    for status, headers, text in results:
        if status == 429:
            assert headers["Retry-After"] == "1"  # 0.2 s, rounded up to whole seconds
            assert "message" in json.loads(text)
    stats = await emulator_stats(url)
    assert stats["by_status"] == {str(k): v for k, v in seen.items()}
    assert stats["requests"] == 12
    assert stats["ok_requests"] == seen[200]


async def test_rate_limit_without_retry_after(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(rate_limit=1)
    results = [await classify(session, url) for _ in range(3)]
    assert [status for status, _, _ in results][:2] == [200, 429]
    assert all("Retry-After" not in headers for _, headers, _ in results)


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one token back
    assert [bucket.try_acquire() for _ in range(2)] == [True, False]
    now[0] += 100.0  # never more than the burst
    assert sum(bucket.try_acquire() for _ in range(10)) == 3


def test_latency_sampler_matches_median_and_p99() -> None:
    rng = random.Random(5)
    draws = sorted(sample_latency(rng, 180.0, 5600.0) for _ in range(20_000))
    median = statistics.median(draws)
    p99 = draws[int(0.99 * len(draws))]
    assert 0.170 < median < 0.190
    assert 4.6 < p99 < 6.8
    assert sample_latency(rng, 50.0, None) == 0.05
    assert sample_latency(rng, 0.0, None) == 0.0


async def test_latency_is_applied_and_requests_overlap(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(latency_ms=150)
    started = time.perf_counter()
    results = await asyncio.gather(*(classify(session, url) for _ in range(5)))
    elapsed = time.perf_counter() - started
    assert all(status == 200 for status, _, _ in results)
    assert all(json.loads(text)["time"] >= 0.15 for _, _, text in results)
    assert 0.15 <= elapsed < 0.6  # concurrent, not one after another
    stats = await emulator_stats(url)
    assert stats["max_in_flight"] == 5
    assert stats["in_flight"] == 0


# ---------------------------------------------------------------------------------------------
# stats


async def test_stats_and_reset(
    emulator_url: str, session: aiohttp.ClientSession, sample_images: list[Path]
) -> None:
    red, green = (p.read_bytes() for p in sample_images[:2])
    for data in (red, red, green):
        await classify_json(session, emulator_url, data)
    await classify(session, emulator_url, b"not an image")
    await classify(session, emulator_url, params={"api_key": ""})
    stats = await emulator_stats(emulator_url)
    assert stats == {
        "requests": 5,
        "by_status": {"200": 3, "400": 1, "401": 1},
        "in_flight": 0,
        "max_in_flight": 1,
        "distinct_images": 3,  # includes the undecodable one
        "max_ok_per_image": 2,
        "ok_requests": 3,
        "injected": {},
    }
    detailed = await emulator_stats(emulator_url, images=True)
    assert detailed["images"][hashlib.sha256(red).hexdigest()] == {"requests": 2, "ok": 2}
    assert detailed["images"][hashlib.sha256(green).hexdigest()] == {"requests": 1, "ok": 1}
    assert detailed["images"][hashlib.sha256(b"not an image").hexdigest()] == {
        "requests": 1,
        "ok": 0,
    }

    await reset_emulator(emulator_url)
    zeroed = await emulator_stats(emulator_url, images=True)
    assert zeroed["requests"] == 0 and zeroed["by_status"] == {} and zeroed["images"] == {}
    # the stats routes need no key and are not counted as classify requests
    async with session.get(f"{emulator_url}/_emulator/stats") as resp:
        assert resp.status == 200


# ---------------------------------------------------------------------------------------------
# configuration and command line


@pytest.mark.parametrize(
    "kwargs",
    [
        {"classes": ()},
        {"classes": ("a", "a")},
        {"fail_rate": 1.5},
        {"fail_rate": 0.6, "reset_rate": 0.6},
        {"latency_ms": 100, "latency_p99_ms": 50},
        {"latency_p99_ms": 50},
        {"rate_limit": 0},
        {"models": {"no-version"}},
        {"api_key": ""},
        {"latency_ms": float("nan")},
    ],
)
def test_invalid_config_is_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        EmulatorConfig(**kwargs)


def test_config_from_args() -> None:
    args = cli.build_parser().parse_args(
        [
            "emulate",
            "--classes",
            "a, b,c",
            "--models",
            "m/1,m/2",
            "--multi-label",
            "--api-key",
            "k",
            "--latency-ms",
            "180",
            "--latency-p99-ms",
            "5600",
            "--rate-limit",
            "20",
            "--fail-rate",
            "0.1",
            "--seed",
            "7",
            "--port",
            "0",
        ]
    )
    config = config_from_args(args)
    assert config.classes == ("a", "b", "c")
    assert config.models == frozenset({"m/1", "m/2"})
    assert config.multi_label and config.api_key == "k" and config.seed == 7
    assert (config.latency_ms, config.latency_p99_ms) == (180, 5600)
    assert config.rate_limit == 20 and config.burst == 20 and config.fail_rate == 0.1
    assert args.port == 0 and args.host == "127.0.0.1"
    assert cli.build_parser().parse_args(["emulate"]).port == 9001


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--fail-rate", "2"], "probability"),
        (["--port", "70000"], "65535"),
        (["--latency-ms", "100", "--latency-p99-ms", "50"], "latency_p99_ms"),
        (["--fail-rate", "0.7", "--hang-rate", "0.7"], "<= 1"),
        (["--rate-limit-burst", "5"], "needs --rate-limit"),
    ],
)
def test_cli_rejects_bad_options(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["emulate", *argv])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_config_from_plain_namespace_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        config_from_args(argparse.Namespace(fail_rate=3.0))
    assert config_from_args(argparse.Namespace()) == EmulatorConfig()


def test_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["emulate", "--help"])
    out = capsys.readouterr().out
    assert "curl" in out and "--latency-p99-ms" in out and "--garbage-rate" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_cli_serves_until_signalled(
    session: aiohttp.ClientSession, tmp_path: Path, sig: signal.Signals
) -> None:
    # PYTHONHASHSEED differs from this process: the answer must still equal predict() here.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchclassify",
        "emulate",
        "--port",
        "0",
        "--api-key",
        "k",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert line.startswith(LISTENING_PREFIX), line
        url = line.removeprefix(LISTENING_PREFIX)
        assert url.startswith("http://127.0.0.1:")
        data = image_bytes(seed=8)
        body = await classify_json(session, url, data, params={"api_key": "k"})
        assert stable(body) == stable(predict(data))
        proc.send_signal(sig)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        _, err = await proc.communicate()
        assert err == b""  # no traceback, no warnings
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_reports_a_busy_port(emulator_url: str) -> None:
    port = emulator_url.rsplit(":", 1)[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchclassify",
        "emulate",
        "--port",
        port,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 1
    assert b"cannot listen" in err and out == b""


# ---------------------------------------------------------------------------------------------
# the official client


async def test_official_roboflow_client_works_unchanged(
    emulator_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    classification = pytest.importorskip("roboflow.models.classification")
    path = tmp_path / "x.jpg"
    path.write_bytes(image_bytes(seed=4, size=(70, 50)))
    model = classification.ClassificationModel(
        api_key="any-key", id="my-workspace/my-project/3", local=f"{emulator_url}/"
    )
    # roboflow is synchronous (requests): run it in a thread while the emulator serves here
    result = await asyncio.to_thread(lambda: model.predict(str(path)).json())
    (answer,) = result["predictions"]
    assert list(answer)[: len(SINGLE_KEYS)] == SINGLE_KEYS
    assert answer["image_path"] == str(path) and answer["prediction_type"] == "ClassificationModel"
    # the client re-encodes the file as JPEG quality 90 before sending
    with Image.open(path) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, quality=90, format="JPEG")
    expected = predict(out.getvalue())
    assert {k: answer[k] for k in ("image", "predictions", "top", "confidence")} == {
        k: expected[k] for k in ("image", "predictions", "top", "confidence")
    }
    stats = await emulator_stats(emulator_url)
    assert stats["ok_requests"] == 1
    capsys.readouterr()  # the client prints a banner for local=


async def test_official_roboflow_client_hosted_image(
    emulator_url: str,
    serve_bytes: Callable[[dict[str, bytes | int]], Awaitable[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    classification = pytest.importorskip("roboflow.models.classification")
    data = image_bytes(seed=12)
    files = await serve_bytes({"/cat.jpg": data})
    model = classification.ClassificationModel(
        api_key="any-key", id="my-workspace/my-project/3", local=f"{emulator_url}/"
    )
    # hosted=True sends ?image=URL with no body and no Content-Type
    result = await asyncio.to_thread(lambda: model.predict(f"{files}/cat.jpg", hosted=True).json())
    (answer,) = result["predictions"]
    assert answer["predictions"] == predict(data)["predictions"]
    capsys.readouterr()


def test_emulator_in_thread_serves_synchronous_callers() -> None:
    data = image_bytes(seed=30)
    with emulator_in_thread(EmulatorConfig(api_key="k")) as url:
        request = urllib.request.Request(
            f"{url}/proj/2?api_key=k",
            data=b64(data).encode(),
            headers=FORM_CONTENT_TYPE,
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.load(resp)
        assert stable(body) == stable(predict(data))
    with pytest.raises(urllib.error.URLError):  # stopped: nothing listens any more
        urllib.request.urlopen(request, timeout=2)

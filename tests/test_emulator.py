"""Tests for batchclassify.emulator, over real HTTP on 127.0.0.1 (no mocks).

The official clients (``roboflow``, ``inference-sdk``) against it: ``tests/test_compat.py``.
"""

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
    shape_response,
)
from batchclassify.emulator import model as emulator_model
from batchclassify.errors import ConfigError, InputError

StartEmulator = Callable[..., Awaitable[str]]
ServeBytes = Callable[[dict[str, bytes | int]], Awaitable[str]]
SINGLE_KEYS = ["time", "image", "predictions", "top", "confidence", "inference_id"]
MULTI_KEYS = ["time", "image", "predictions", "predicted_classes", "inference_id"]
RED_JPEG = image_bytes(color=(220, 30, 30), size=(64, 48))
UNAUTHORIZED = {"status": 401, "message": "Unauthorized api_key"}


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


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any,
    *,
    path: str = "/infer/classification",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST a JSON body (the self-hosted server's routes); the status and the parsed answer."""
    async with session.post(f"{url}{path}", json=payload, params=params, headers=headers) as resp:
        return resp.status, json.loads(await resp.text())


def base64_image(data: bytes) -> dict[str, str]:
    return {"type": "base64", "value": b64(data)}


def image_with_a_tiny_class() -> bytes:
    """An image whose single-label answer has a class under the server's 0.01 floor."""
    for seed in range(500):
        data = image_bytes(seed=seed)
        scores = [p["confidence"] for p in predict(data, confidence=0)["predictions"]]
        if min(scores) < 0.01:
            return data
    raise AssertionError("no image with a class under 0.01 among 500")


# ---------------------------------------------------------------------------------------------
# response shapes


async def test_single_label_shape(emulator_url: str, session: aiohttp.ClientSession) -> None:
    data = image_bytes(seed=3, size=(123, 45))
    body = await classify_json(session, emulator_url, data, params={"confidence": "0.01"})
    assert list(body) == SINGLE_KEYS
    assert isinstance(body["time"], float) and 0 <= body["time"] < 1
    assert body["image"] == {"width": 123, "height": 45}
    uuid.UUID(body["inference_id"], version=4)
    predictions = body["predictions"]
    assert predictions, "the floor keeps at least the best class"
    assert all(list(p) == ["class", "class_id", "confidence"] for p in predictions)
    for p in predictions:
        assert p["class_id"] == DEFAULT_CLASSES.index(p["class"])
        assert round(p["confidence"], 4) == p["confidence"] >= 0.01
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True)
    assert body["top"] == predictions[0]["class"]
    assert body["confidence"] == predictions[0]["confidence"]
    assert stable(body) == stable(predict(data, confidence=0.01))


def test_single_label_scores_are_a_softmax_over_every_class() -> None:
    body = predict(image_bytes(seed=3), confidence=0)  # no floor outside the HTTP route
    assert sorted(p["class"] for p in body["predictions"]) == sorted(DEFAULT_CLASSES)
    assert math.isclose(sum(p["confidence"] for p in body["predictions"]), 1.0, abs_tol=1e-3)


def test_answers_are_plausible() -> None:
    """Over many images the top score spreads from unsure to confident, and every class wins
    sometimes (the hash-derived model favours none)."""
    tops, winners = [], Counter()
    for seed in range(300):
        body = predict(image_bytes(seed=seed, size=(40 + seed % 50, 40)), confidence=0)
        tops.append(body["confidence"])
        winners[body["top"]] += 1
    tops.sort()
    assert 0.2 < tops[len(tops) // 10] < 0.5 and 0.8 < tops[-len(tops) // 10] <= 1.0
    assert set(winners) == set(DEFAULT_CLASSES)
    assert max(winners.values()) < 0.4 * len(tops)


async def test_default_threshold_drops_classes_under_it(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    body = await classify_json(session, emulator_url)
    assert body["predictions"], "expected the red test image to have a class over 0.4"
    assert all(p["confidence"] >= 0.4 for p in body["predictions"])
    everything = await classify_json(session, emulator_url, params={"confidence": "0.01"})
    kept = [p for p in everything["predictions"] if p["confidence"] >= 0.4]
    assert body["predictions"] == kept
    assert stable(body) == stable(predict(RED_JPEG))


def test_threshold_is_tested_on_the_raw_score_then_rounded() -> None:
    body = shape_response(
        [0.39996, 0.60004],
        classes=("a", "b"),
        multi_label=False,
        confidence=0.4,
        width=1,
        height=1,
        elapsed=0.0,
        inference_id="x",
    )
    # 0.39996 rounds to 0.4 but is under the threshold: it is not kept
    assert body["predictions"] == [{"class": "b", "class_id": 1, "confidence": 0.6}]


async def test_nothing_over_threshold_gives_empty_top(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    body = await classify_json(session, emulator_url, params={"confidence": "100"})  # 1.0
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


async def test_confidence_below_the_floor_is_raised_to_it(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    data = image_with_a_tiny_class()
    floor = await classify_json(session, emulator_url, data, params={"confidence": "0.01"})
    assert len(floor["predictions"]) < len(DEFAULT_CLASSES)  # the tiny class is not there
    for low in ("0", "0.001", "-3"):
        body = await classify_json(session, emulator_url, data, params={"confidence": low})
        assert stable(body) == stable(floor), low


@pytest.mark.parametrize("multi_label", [False, True], ids=["single", "multi"])
async def test_best_and_default_confidence_are_one_half(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, multi_label: bool
) -> None:
    url = await start_emulator(multi_label=multi_label)
    data = next(  # an image whose answer differs between the thresholds 0.4 and 0.5
        data
        for data in (image_bytes(seed=seed) for seed in range(500))
        if stable(predict(data, multi_label=multi_label, confidence=0.4))
        != stable(predict(data, multi_label=multi_label, confidence=0.5))
    )
    half = await classify_json(session, url, data, params={"confidence": "0.5"})
    for keyword in ("best", "default"):
        body = await classify_json(session, url, data, params={"confidence": keyword})
        assert stable(body) == stable(half)
    assert stable(half) != stable(await classify_json(session, url, data))  # 0.4 differs


def test_parse_confidence() -> None:
    assert parse_confidence(None) == 0.4
    assert parse_confidence("0.25") == 0.25
    assert parse_confidence("40") == 0.4
    assert parse_confidence("1") == 0.01
    assert parse_confidence("150") == 1.5  # nothing passes, as on the server
    assert parse_confidence("0") == parse_confidence("-2") == parse_confidence("0.001") == 0.01
    assert parse_confidence("best") == parse_confidence("default") == 0.5
    for bad in ("", "abc", "nan", "inf", "BEST", "0.5x"):
        with pytest.raises(ValueError):
            parse_confidence(bad)


@pytest.mark.parametrize("raw", ["lots", "", "nan"])
async def test_invalid_confidence_is_422(
    emulator_url: str, session: aiohttp.ClientSession, raw: str
) -> None:
    status, _, text = await classify(session, emulator_url, params={"confidence": raw})
    assert status == 422
    (detail,) = json.loads(text)["detail"]
    assert detail["loc"] == ["query", "confidence"]


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
        assert 0 <= entry["confidence"] <= 1
    # not rounded: a sigmoid's value has more than 4 decimals
    assert any(round(e["confidence"], 4) != e["confidence"] for e in body["predictions"].values())
    assert body["predicted_classes"] == [
        name for name in classes if body["predictions"][name]["confidence"] >= 0.5
    ]
    expected = predict(data, classes=classes, multi_label=True, confidence=0.5)
    assert stable(body) == stable(expected)
    everything = await classify_json(session, url, data, params={"confidence": "0.01"})
    assert everything["predictions"] == body["predictions"]  # every class, whatever the threshold


@pytest.mark.parametrize(("compare", "included"), [("ge", True), ("gt", False)])
async def test_multi_label_compare_decides_a_score_equal_to_the_threshold(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, compare: str, included: bool
) -> None:
    url = await start_emulator(multi_label=True, multi_label_compare=compare)
    data = image_bytes(seed=11)
    everything = await classify_json(session, url, data, params={"confidence": "0.01"})
    name, score = next(
        (name, entry["confidence"])
        for name, entry in everything["predictions"].items()
        if 0.01 <= entry["confidence"] < 1
    )
    # the exact score as the threshold: repr() round-trips a float through text
    body = await classify_json(session, url, data, params={"confidence": repr(score)})
    assert (name in body["predicted_classes"]) is included


def test_multi_label_compare_in_shape_response() -> None:
    common: dict[str, Any] = {
        "classes": ("a", "b", "c"),
        "multi_label": True,
        "confidence": 0.5,
        "width": 1,
        "height": 1,
        "elapsed": 0.0,
        "inference_id": "x",
    }
    scores = [0.5, 0.7, 0.2]
    assert shape_response(scores, **common)["predicted_classes"] == ["a", "b"]  # "ge" default
    gt = shape_response(scores, multi_label_compare="gt", **common)
    assert gt["predicted_classes"] == ["b"]


# ---------------------------------------------------------------------------------------------
# determinism, the model and payload forms


async def test_predictions_are_deterministic_and_content_dependent(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, sample_images: list[Path]
) -> None:
    first, second = await start_emulator(), await start_emulator(seed=99)
    params = {"confidence": "0.01"}
    answers = []
    for path in sample_images:
        data = path.read_bytes()
        a = await classify_json(session, first, data, params=params)
        b = await classify_json(session, first, data, params=params)
        c = await classify_json(session, second, data, params=params)
        assert stable(a) == stable(b) == stable(c) == stable(predict(data, confidence=0.01))
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


def test_complete_jpeg_and_png_are_analysed_from_the_header_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cheap path: no Pillow at all for a complete JPEG or PNG; other formats, and files
    that look truncated, are still opened (and decoded) by Pillow."""
    expected = {fmt: analyze_image(image_bytes(seed=2, fmt=fmt)) for fmt in ("JPEG", "PNG", "GIF")}

    def no_pillow(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("Image.open was called")

    monkeypatch.setattr(emulator_model.Image, "open", no_pillow)
    for fmt in ("JPEG", "PNG"):
        assert analyze_image(image_bytes(seed=2, fmt=fmt)) == expected[fmt]
    with pytest.raises(InputError, match=r"Image\.open was called"):
        analyze_image(image_bytes(seed=2, fmt="GIF"))
    with pytest.raises(InputError, match=r"Image\.open was called"):
        analyze_image(RED_JPEG[:-2])  # no end-of-image marker: ask Pillow, which refuses
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    apng = _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match=r"Image\.open was called"):
        analyze_image(apng)  # animated: Pillow checks it, as it does a GIF


def _encoded(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


@pytest.mark.parametrize(
    ("make", "fmt", "params"),
    [
        (lambda: Image.new("RGB", (77, 33), (9, 99, 199)), "JPEG", {"progressive": True}),
        (lambda: Image.new("RGB", (64, 40), (9, 99, 199)), "JPEG", {"exif": b"Exif\x00\x00"}),
        (lambda: Image.new("CMYK", (21, 12), (0, 255, 0, 0)), "JPEG", {}),
        (lambda: Image.new("L", (300, 7), 80), "JPEG", {"quality": 20}),
        (lambda: Image.new("RGB", (5000, 3), (1, 2, 3)), "JPEG", {}),
        (lambda: Image.new("1", (9, 9), 1), "PNG", {}),
        (lambda: Image.new("P", (12, 40), 3), "PNG", {}),
        (lambda: Image.new("RGBA", (16, 16), (0, 255, 0, 40)), "PNG", {"optimize": True}),
        (lambda: Image.new("I;16", (10, 11), 40000), "PNG", {}),
        (lambda: Image.new("RGB", (33, 17), (5, 5, 5)), "PNG", {"interlace": 1}),
    ],
    ids=["progressive", "exif", "cmyk", "grey", "wide", "png1", "pngP", "rgba", "i16", "adam7"],
)
def test_header_sizes_match_pillow(
    make: Callable[[], Image.Image], fmt: str, params: dict[str, Any]
) -> None:
    data = _encoded(make(), fmt, **params)
    assert emulator_model._header_size(data) is not None  # the cheap path applies
    with Image.open(io.BytesIO(data)) as image:
        assert (analyze_image(data).width, analyze_image(data).height) == image.size


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
    assert len(encoded) > 1024 * 1024  # over both thresholds: base64 and image work
    async with session.post(  # BytesIO: aiohttp warns about big bodies given as bytes
        f"{emulator_url}/proj/1?api_key=k&confidence=0.01",
        data=io.BytesIO(encoded),
        headers=FORM_CONTENT_TYPE,
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert stable(body) == stable(predict(data, confidence=0.01))
    assert body["image"] == {"width": 1200, "height": 1200}


def test_decode_base64_payload() -> None:
    raw = b"\xff\xd8 image bytes"
    encoded = base64.b64encode(raw)
    assert decode_base64_payload(encoded) == raw
    assert decode_base64_payload(b"data:image/png;base64," + encoded + b"\n") == raw
    for bad in (b"", b"   \n", b"data:image/png;base64,", b"abc", b"data:nocomma", raw):
        with pytest.raises(InputError):
            decode_base64_payload(bad)


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
    body = predict(_encoded(mode_image, fmt), confidence=0)
    assert body["image"] == {"width": mode_image.width, "height": mode_image.height}
    assert len(body["predictions"]) == len(DEFAULT_CLASSES)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "BMP", "TIFF"])
def test_other_formats_are_decoded_by_pillow(fmt: str) -> None:
    data = image_bytes(seed=4, size=(31, 29), fmt=fmt)
    assert predict(data, confidence=0)["image"] == {"width": 31, "height": 29}
    with pytest.raises(InputError):
        analyze_image(data[: len(data) // 2])


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


RED_PNG = image_bytes(seed=9, size=(40, 30), fmt="PNG")


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=len(RED_PNG) - 1))
def test_truncated_png_is_never_vouched_for_by_its_header(cut: int) -> None:
    data = RED_PNG[:cut]
    assert emulator_model._header_size(data) is None  # no IEND: Pillow must decode it
    try:
        analyze_image(data)
    except InputError:
        return
    with Image.open(io.BytesIO(data)) as image:  # accepted only if every pixel decodes
        image.load()


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
        (RED_JPEG.decode("latin-1"), "raw binary"),
    ],
    ids=[
        "not-image",
        "truncated",
        "bomb",
        "big",
        "empty",
        "blank",
        "bad-b64",
        "empty-data-url",
        "raw-binary",
    ],
)
async def test_undecodable_payloads_are_400(
    emulator_url: str, session: aiohttp.ClientSession, body: bytes | str, cause: str
) -> None:
    if isinstance(body, str) and cause == "raw binary":
        body_bytes: bytes | str = body.encode("latin-1")  # the file's own bytes, not base64
        async with session.post(
            f"{emulator_url}/proj/1?api_key=k", data=body_bytes, headers=FORM_CONTENT_TYPE
        ) as resp:
            status, headers, text = resp.status, dict(resp.headers), await resp.text()
    else:
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


async def test_any_other_content_type_is_read_as_base64(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    # inference-sdk's v0 mode sends its base64 body as application/json
    for content_type in ("application/json", "text/plain", "image/jpeg"):
        body = await classify_json(session, emulator_url, headers={"Content-Type": content_type})
        assert stable(body) == stable(predict(RED_JPEG))


async def test_auth_and_model_errors(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(api_key="secret", models={"proj/1", "other/3"})
    checks = [
        ({"api_key": ""}, "proj/1", 401),
        ({"api_key": "wrong"}, "proj/1", 401),
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


async def test_a_wrong_or_missing_key_is_401_with_the_serverless_body(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(api_key="secret")
    form = FORM_CONTENT_TYPE
    attempts: list[tuple[str, dict[str, str]]] = [
        (f"{url}/proj/1?api_key=wrong", form),
        (f"{url}/proj/1", form),  # no key at all
        (f"{url}/proj/1", {**form, "Authorization": "Bearer wrong"}),
        (f"{url}/proj/1", {**form, "Authorization": "Basic secret"}),  # not a bearer token
    ]
    for target, headers in attempts:
        async with session.post(target, data=b64(RED_JPEG), headers=headers) as resp:
            assert resp.status == 401, (target, headers)
            assert await resp.json() == UNAUTHORIZED


@pytest.mark.parametrize(
    ("query_key", "header_key", "expected"),
    [
        (None, "secret", 200),
        ("secret", None, 200),
        ("wrong", "secret", 401),  # the query wins, even when the header is right
        ("secret", "wrong", 200),
        ("", "secret", 401),  # a present but empty query key still wins
    ],
)
async def test_api_key_transport_and_precedence(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    query_key: str | None,
    header_key: str | None,
    expected: int,
) -> None:
    url = await start_emulator(api_key="secret")
    params = {} if query_key is None else {"api_key": query_key}
    headers = dict(FORM_CONTENT_TYPE)
    if header_key is not None:
        headers["Authorization"] = f"Bearer {header_key}"
    async with session.post(
        f"{url}/proj/1", params=params, data=b64(RED_JPEG), headers=headers
    ) as resp:
        assert resp.status == expected


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
# multipart/form-data


async def test_multipart_file_part_is_accepted(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    data = image_bytes(seed=17, size=(45, 54))
    form = aiohttp.FormData()
    form.add_field("name", "ignored")  # other parts are skipped
    form.add_field("file", data, filename="a.jpg", content_type="image/jpeg")
    async with session.post(
        f"{emulator_url}/proj/1", data=form, headers={"Authorization": "Bearer k"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert stable(body) == stable(predict(data))  # the raw bytes, not base64
    stats = await emulator_stats(emulator_url, images=True)
    assert stats["images"][hashlib.sha256(data).hexdigest()] == {"requests": 1, "ok": 1}


@pytest.mark.parametrize(
    ("name", "filename", "content", "fragment"),
    [
        ("image", "a.jpg", RED_JPEG, "part named 'file'"),
        ("file", None, RED_JPEG, "Invalid Content-Type"),  # a field, not a file upload
        ("file", "a.jpg", b64(RED_JPEG).encode(), "Could not load input image"),  # base64
        ("file", "a.jpg", b"not an image", "UnidentifiedImageError"),
    ],
    ids=["no-file-part", "file-field", "base64-in-part", "not-an-image"],
)
async def test_bad_multipart_is_400(
    emulator_url: str,
    session: aiohttp.ClientSession,
    name: str,
    filename: str | None,
    content: bytes,
    fragment: str,
) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    if filename is None:
        form.add_field(name, content.decode("latin-1"))
    else:
        form.add_field(name, content, filename=filename, content_type="image/jpeg")
    async with session.post(f"{emulator_url}/proj/1?api_key=k", data=form) as resp:
        assert resp.status == 400
        assert fragment in (await resp.json())["message"]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--b\r\n"),  # no boundary parameter
        ("multipart/form-data; boundary=b", b"--b\r\nnot a header\r\n\r\nx\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b", b"no boundary line at all"),
    ],
    ids=["no-boundary", "bad-part-header", "no-parts"],
)
async def test_malformed_multipart_is_400(
    emulator_url: str, session: aiohttp.ClientSession, content_type: str, body: bytes
) -> None:
    async with session.post(
        f"{emulator_url}/proj/1?api_key=k", data=body, headers={"Content-Type": content_type}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["message"].startswith("Could not load input image. Cause: ")


async def test_multipart_over_the_limit_is_413(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(max_body_bytes=2000)
    big = Image.effect_noise((80, 80), 60).convert("RGB")
    form = aiohttp.FormData()
    form.add_field("file", _encoded(big, "PNG"), filename="a.png", content_type="image/png")
    async with session.post(f"{url}/proj/1?api_key=k", data=form) as resp:
        assert resp.status == 413


# ---------------------------------------------------------------------------------------------
# image= URLs


async def test_image_url_is_fetched(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, serve_bytes: ServeBytes
) -> None:
    url = await start_emulator(allow_http_image_urls=True)
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
        "",
    ):
        status, _, text = await classify(session, url, "", params={"image": bad})
        assert status == 400, bad
        assert json.loads(text)["message"].startswith("Could not load input image. Cause: ")
    stats = await emulator_stats(url, images=True)
    assert stats["images"][hashlib.sha256(data).hexdigest()] == {"requests": 1, "ok": 1}


async def test_get_with_an_image_url_works_like_post(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, serve_bytes: ServeBytes
) -> None:
    url = await start_emulator(allow_http_image_urls=True, api_key="k")
    data = image_bytes(seed=22)
    files = await serve_bytes({"/cat.jpg": data})
    params = {"api_key": "k", "image": f"{files}/cat.jpg", "confidence": "0.01"}
    async with session.get(f"{url}/proj/1", params=params) as resp:
        assert resp.status == 200
        assert stable(await resp.json()) == stable(predict(data, confidence=0.01))
    async with session.get(f"{url}/proj/1", params={**params, "api_key": "no"}) as resp:
        assert resp.status == 401
    async with session.get(f"{url}/proj/1", params={"api_key": "k"}) as resp:
        assert resp.status == 400  # no image= and no body (no Content-Type)


async def test_http_and_private_image_urls_are_refused_by_default(
    emulator_url: str, session: aiohttp.ClientSession, serve_bytes: ServeBytes
) -> None:
    assert EmulatorConfig().allow_http_image_urls is False
    files = await serve_bytes({"/cat.jpg": RED_JPEG})
    for bad in (
        f"{files}/cat.jpg",  # http:// (and loopback)
        "https://127.0.0.1/x.jpg",
        "https://localhost/x.jpg",
        "https://10.1.2.3/x.jpg",
        "https://[::1]/x.jpg",
        "https://intranet/x.jpg",
    ):
        status, _, text = await classify(session, emulator_url, "", params={"image": bad})
        assert status == 400, bad
        assert "https" in text or "publicly reachable" in text
    assert (await emulator_stats(emulator_url))["distinct_images"] == 0  # nothing was fetched


# ---------------------------------------------------------------------------------------------
# the self-hosted JSON route


async def test_json_route_answers_one_image(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(api_key="secret")
    data = image_bytes(seed=31)
    payload = {"model_id": "proj/3", "api_key": "secret", "image": base64_image(data)}
    status, body = await post_json(session, url, payload)
    assert status == 200
    assert list(body) == SINGLE_KEYS and stable(body) == stable(predict(data))


async def test_json_route_answers_a_batch_in_input_order(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(multi_label=True)
    images = [image_bytes(seed=40 + n, size=(30 + n, 20)) for n in range(4)]
    payload = {
        "model_id": "proj/3",
        "api_key": "k",
        "image": [base64_image(data) for data in images],
        "confidence": 0.3,
    }
    status, body = await post_json(session, url, payload)
    assert status == 200 and isinstance(body, list) and len(body) == 4
    for answer, data in zip(body, images, strict=True):
        expected = predict(data, multi_label=True, confidence=0.3)
        assert stable(answer) == stable(expected)
    status, single = await post_json(session, url, {**payload, "image": payload["image"][:1]})
    assert status == 200 and isinstance(single, list) and len(single) == 1  # a list stays one
    stats = await emulator_stats(url)
    assert stats["requests"] == 2 and stats["ok_requests"] == 2
    assert stats["distinct_images"] == 4 and stats["max_ok_per_image"] == 2


async def test_json_route_one_bad_image_fails_the_whole_request(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    good = base64_image(image_bytes(seed=1))
    for bad in (
        {"type": "base64", "value": b64(b"not an image")},
        {"type": "base64", "value": "abc"},
        {"type": "numpy", "value": "x"},
        {"type": "base64"},
        {"type": "url", "value": "http://127.0.0.1:9/x.jpg"},  # refused: http, loopback
    ):
        status, body = await post_json(
            session, emulator_url, {"model_id": "p/1", "api_key": "k", "image": [good, bad, good]}
        )
        assert status == 400, bad
        assert body["message"].startswith("Could not load input image. Cause: ")
        assert "image 1" in body["message"]
    stats = await emulator_stats(emulator_url)
    assert stats["ok_requests"] == 0 and stats["by_status"] == {"400": 5}


async def test_json_route_confidence_is_used_as_given(
    emulator_url: str, session: aiohttp.ClientSession
) -> None:
    data = image_with_a_tiny_class()
    payload = {"model_id": "p/1", "api_key": "k", "image": base64_image(data)}
    status, everything = await post_json(session, emulator_url, {**payload, "confidence": 0})
    assert status == 200
    assert len(everything["predictions"]) == len(DEFAULT_CLASSES)  # no 0.01 floor here
    status, none = await post_json(session, emulator_url, {**payload, "confidence": 2})
    assert status == 200 and none["predictions"] == [] and none["top"] == ""  # not 2 percent
    legacy = await classify_json(session, emulator_url, data, params={"confidence": "2"})
    assert legacy["predictions"]  # the legacy route reads 2 as 0.02
    status, best = await post_json(session, emulator_url, {**payload, "confidence": "best"})
    assert status == 200 and stable(best) == stable(predict(data, confidence=0.5))


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ("[not json", ["body"]),
        ("[" * 100_000, ["body"]),  # nested too deep for the parser: not a crash
        ([1, 2], ["body"]),
        ({"api_key": "k", "image": {"type": "base64", "value": "x"}}, ["body", "model_id"]),
        ({"model_id": "p/1", "api_key": "k"}, ["body", "image"]),
        ({"model_id": "p/1", "api_key": "k", "image": "aGk="}, ["body", "image", "type"]),
        ({"model_id": 3, "api_key": "k", "image": {"type": "url"}}, ["body", "model_id"]),
        (
            {"model_id": "p/1", "api_key": "k", "image": {"type": "url"}, "confidence": "lots"},
            ["body", "confidence"],
        ),
    ],
    ids=[
        "not-json",
        "deep",
        "not-object",
        "no-model",
        "no-image",
        "image-str",
        "model-int",
        "confidence",
    ],
)
async def test_json_route_validation_errors_are_422(
    emulator_url: str, session: aiohttp.ClientSession, payload: Any, loc: list[str]
) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    async with session.post(
        f"{emulator_url}/infer/classification",
        data=data,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 422
        (detail,) = (await resp.json())["detail"]
    assert detail["loc"] == loc
    assert "k" not in json.dumps(detail).replace('"', " ").split()  # no input echoed


@pytest.mark.parametrize(
    ("query_key", "body_key", "header_key", "expected"),
    [
        (None, "secret", None, 200),
        (None, None, "secret", 200),
        (None, "wrong", "secret", 401),  # body > header
        ("wrong", "secret", None, 401),  # query > body
        ("secret", "wrong", "wrong", 200),
        (None, None, None, 401),
    ],
)
async def test_json_route_key_precedence(
    start_emulator: StartEmulator,
    session: aiohttp.ClientSession,
    query_key: str | None,
    body_key: str | None,
    header_key: str | None,
    expected: int,
) -> None:
    url = await start_emulator(api_key="secret")
    payload: dict[str, Any] = {"model_id": "p/1", "image": base64_image(RED_JPEG)}
    if body_key is not None:
        payload["api_key"] = body_key
    params = {} if query_key is None else {"api_key": query_key}
    headers = {} if header_key is None else {"Authorization": f"Bearer {header_key}"}
    status, body = await post_json(session, url, payload, params=params, headers=headers)
    assert status == expected
    if status == 401:
        assert body == UNAUTHORIZED


async def test_json_route_model_errors(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(models={"proj/1"})
    image = base64_image(RED_JPEG)
    for model_id, expected in (("proj/1", 200), ("nope/1", 404), ("proj/x", 404), ("proj", 400)):
        status, _ = await post_json(
            session, url, {"model_id": model_id, "api_key": "k", "image": image}
        )
        assert status == expected, model_id


async def test_model_registry_add_remove_clear(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(api_key="secret", models={"proj/1", "other/2"})

    async def registry() -> list[str]:
        async with session.get(f"{url}/model/registry") as resp:  # no key needed
            assert resp.status == 200
            return [m["model_id"] for m in (await resp.json())["models"]]

    assert await registry() == []
    add = "/model/add"
    assert (await post_json(session, url, {"model_id": "proj/1"}, path=add))[0] == 401
    status, _ = await post_json(session, url, {"model_id": "proj/1", "api_key": "no"}, path=add)
    assert status == 401
    status, _ = await post_json(session, url, {"model_id": "x/1", "api_key": "secret"}, path=add)
    assert status == 404
    status, body = await post_json(
        session, url, {"model_id": "proj/1"}, path=add, headers={"Authorization": "Bearer secret"}
    )
    assert status == 200
    assert body == {
        "models": [
            {
                "model_id": "proj/1",
                "task_type": "classification",
                "batch_size": None,
                "input_height": 224,
                "input_width": 224,
            }
        ]
    }
    # a classify request loads the model it is asked for, as the server does
    payload = {"model_id": "other/2", "api_key": "secret", "image": base64_image(RED_JPEG)}
    assert (await post_json(session, url, payload))[0] == 200
    assert await registry() == ["proj/1", "other/2"]
    assert (await post_json(session, url, {"model_id": "proj/1"}, path="/model/remove"))[0] == 200
    assert await registry() == ["other/2"]
    assert (await post_json(session, url, {}, path="/model/clear"))[0] == 200
    assert await registry() == []
    await classify_json(session, url, params={"api_key": "secret"})  # the legacy route too
    assert await registry() == ["proj/1"]
    stats = await emulator_stats(url)
    assert stats["requests"] == 2  # registry calls are not classify requests, but are counted
    assert stats["by_route"] == {
        "/infer/classification": 1,
        "/model/add": 4,
        "/model/clear": 1,
        "/model/registry": 5,
        "/model/remove": 1,
        "/{model}/{version}": 1,
    }


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


async def test_fail_status_injection_answers_the_services_bodies(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(fail_statuses={402: 0.25, 423: 0.25, 503: 0.25, 507: 0.2}, seed=2)
    seen: Counter[int] = Counter()
    for _ in range(60):
        status, headers, text = await classify(session, url)
        seen[status] += 1
        if status == 200:
            continue
        body = json.loads(text)
        if status == 402:
            assert body == {"status": 402, "message": body["message"]} and body["message"]
        else:
            assert list(body) == ["message"], status
        assert ("Retry-After" in headers) is (status == 503)
        if status == 503:
            assert headers["Retry-After"] == "1"
    assert set(seen) == {200, 402, 423, 503, 507}
    stats = await emulator_stats(url)
    assert stats["injected"] == {"fail_status": 60 - seen[200]}
    assert stats["by_status"] == {str(k): v for k, v in sorted(seen.items())}
    assert stats["ok_requests"] == seen[200]


async def test_fail_status_draws_after_the_other_faults_from_the_same_seed(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    async def statuses(url: str) -> list[int]:
        return [(await classify(session, url))[0] for _ in range(30)]

    plain = await statuses(await start_emulator(fail_rate=0.5, seed=9))
    mixed = await statuses(await start_emulator(fail_rate=0.5, fail_statuses={401: 0.5}, seed=9))
    assert 200 in plain and 401 in mixed
    # the same draws: where the first answered 200, the second injected its 401
    assert [401 if status == 200 else status for status in plain] == mixed


@pytest.mark.parametrize("status", [401, 402])
async def test_injected_401_and_402_carry_the_status_in_the_body(
    start_emulator: StartEmulator, session: aiohttp.ClientSession, status: int
) -> None:
    url = await start_emulator(fail_statuses={status: 1.0})
    got, _, text = await classify(session, url)
    assert got == status and json.loads(text)["status"] == status
    if status == 401:
        assert json.loads(text) == UNAUTHORIZED


async def test_faults_apply_to_the_json_route(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(fail_statuses={423: 1.0})
    payload = {"model_id": "p/1", "api_key": "k", "image": [base64_image(RED_JPEG)] * 2}
    status, body = await post_json(session, url, payload)
    assert status == 423 and list(body) == ["message"]


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
        "by_route": {"/{model}/{version}": 5},
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
        {"multi_label_compare": "lt"},
        {"fail_statuses": {200: 0.1}},
        {"fail_statuses": {"402": 0.1}},
        {"fail_statuses": {True: 0.1}},
        {"fail_statuses": {402: 1.5}},
        {"fail_statuses": {402: 0.6}, "fail_rate": 0.6},
    ],
)
def test_invalid_config_is_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        EmulatorConfig(**kwargs)


def test_config_defaults_and_immutability() -> None:
    config = EmulatorConfig(fail_statuses={507: 0.1, 402: 0.2})
    assert list(config.fail_statuses) == [402, 507]  # sorted, so draws are reproducible
    with pytest.raises(TypeError):
        config.fail_statuses[500] = 0.1  # type: ignore[index]
    defaults = EmulatorConfig()
    assert defaults.multi_label_compare == "ge" and not defaults.allow_http_image_urls
    assert defaults.fail_statuses == {}
    hash(defaults)  # still usable as a key


def test_config_from_args() -> None:
    args = cli.build_parser().parse_args(
        [
            "emulate",
            "--classes",
            "a, b,c",
            "--models",
            "m/1,m/2",
            "--multi-label",
            "--multi-label-compare",
            "gt",
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
            "--fail-status",
            "402:0.01, 423:0.02,507:0.03",
            "--allow-http-urls",
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
    assert config.multi_label_compare == "gt"
    assert (config.latency_ms, config.latency_p99_ms) == (180, 5600)
    assert config.rate_limit == 20 and config.burst == 20 and config.fail_rate == 0.1
    assert dict(config.fail_statuses) == {402: 0.01, 423: 0.02, 507: 0.03}
    assert config.allow_http_image_urls
    assert args.port == 0 and args.host == "127.0.0.1"
    defaults = config_from_args(cli.build_parser().parse_args(["emulate"]))
    assert defaults == EmulatorConfig()
    assert cli.build_parser().parse_args(["emulate"]).port == 9001


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--fail-rate", "2"], "probability"),
        (["--port", "70000"], "65535"),
        (["--latency-ms", "100", "--latency-p99-ms", "50"], "latency_p99_ms"),
        (["--fail-rate", "0.7", "--hang-rate", "0.7"], "<= 1"),
        (["--rate-limit-burst", "5"], "needs --rate-limit"),
        (["--fail-status", "200:0.1"], "4xx/5xx"),
        (["--fail-status", "402"], "STATUS:PROBABILITY"),
        (["--fail-status", "402:2"], "probability"),
        (["--fail-status", "402:0.1,402:0.2"], "twice"),
        (["--fail-status", "402:0.6", "--fail-rate", "0.6"], "<= 1"),
        (["--multi-label-compare", "lt"], "invalid choice"),
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


def test_help_has_examples_and_every_new_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["emulate", "--help"])
    out = capsys.readouterr().out
    assert "curl" in out and "--latency-p99-ms" in out and "--garbage-rate" in out
    for option in ("--allow-http-urls", "--fail-status", "--multi-label-compare"):
        assert option in out
    for route in ("/infer/classification", "/model/registry", "multipart/form-data", "Bearer"):
        assert route in out


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


async def test_refused_formats_are_a_400_on_every_route(
    start_emulator: StartEmulator, session: aiohttp.ClientSession
) -> None:
    url = await start_emulator(refuse_formats={"webp", "BMP"})
    webp = image_bytes(fmt="WEBP")
    status, _, text = await classify(session, url, webp)
    assert status == 400 and "cannot decode webp" in text
    assert (await classify(session, url, image_bytes(fmt="BMP")))[0] == 400
    assert (await classify(session, url, RED_JPEG))[0] == 200
    status, body = await post_json(
        session,
        url,
        {
            "model_id": "proj/1",
            "api_key": "k",
            "image": [base64_image(RED_JPEG), base64_image(webp)],
        },
    )
    assert status == 400 and "(image 1 of the request)" in body["message"]
    with pytest.raises(ConfigError, match="unknown format 'avif'"):
        EmulatorConfig(refuse_formats={"avif"})


def test_refuse_formats_on_the_command_line() -> None:
    from batchclassify.emulator.cli import add_cli_arguments

    own = argparse.ArgumentParser()
    add_cli_arguments(own)
    assert config_from_args(own.parse_args(["--refuse-formats", "gif, webp"])).refuse_formats == {
        "gif",
        "webp",
    }
    assert config_from_args(own.parse_args([])).refuse_formats == frozenset()
    with pytest.raises(SystemExit):
        own.parse_args(["--refuse-formats", "avif"])

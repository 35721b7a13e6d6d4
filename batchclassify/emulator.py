"""A local, Roboflow-compatible classification server, for tests, benchmarks and dry runs.

It speaks the wire contract of ``PROTOCOL.md`` (``POST /{model}/{version}?api_key=KEY`` with a
base64 body, or ``image=URL``) and answers with the single-label or multi-label JSON shape of the
hosted service. Predictions are a cheap, *deterministic* function of the image content (colour
statistics of a tiny thumbnail, plus a pinch of a content hash), so a test can compute the
expected answer for a file with :func:`predict` and no HTTP at all.

It can also misbehave on purpose, like the real service under load: median + long-tail latency,
a token-bucket rate limit (429), random 5xx, connection resets, hangs and garbage 200 bodies. All
randomness comes from ``EmulatorConfig.seed``. ``GET /_emulator/stats`` tells a test what the
server saw (per status, per image), ``POST /_emulator/reset`` zeroes that.

Entry points: :func:`create_app` (an ``aiohttp.web.Application``), :func:`running_emulator` (an
async context manager yielding the base URL), and the ``batchclassify emulate`` command
(:func:`add_cli_arguments`, :func:`config_from_args`, :func:`serve_from_args`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import io
import ipaddress
import json
import math
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from PIL import Image, ImageStat
from yarl import URL

from batchclassify.errors import ConfigError, InputError

__all__ = [
    "CLI_DESCRIPTION",
    "CLI_EPILOG",
    "DEFAULT_CLASSES",
    "DEFAULT_CONFIDENCE",
    "LISTENING_PREFIX",
    "VOLATILE_KEYS",
    "EmulatorConfig",
    "ImageAnalysis",
    "TokenBucket",
    "add_cli_arguments",
    "analyze_image",
    "class_scores",
    "config_from_args",
    "create_app",
    "decode_base64_payload",
    "emulator_in_thread",
    "parse_confidence",
    "predict",
    "running_emulator",
    "sample_latency",
    "serve_from_args",
    "shape_response",
]

DEFAULT_CLASSES: tuple[str, ...] = ("cat", "dog", "bird", "fish", "horse", "rabbit")
#: the service's default threshold when the request has no ``confidence`` parameter
DEFAULT_CONFIDENCE = 0.4
#: response keys that differ between two answers for the same image (compare without them)
VOLATILE_KEYS: tuple[str, ...] = ("time", "inference_id")
#: first words of the line ``serve_from_args`` prints; scripts read the URL after it
LISTENING_PREFIX = "batchclassify emulator listening on "

# ~20 MiB of image (the serverless API's documented limit) is ~27 MiB once base64-encoded.
_DEFAULT_MAX_BODY_BYTES = 27 * 1024 * 1024
# Measured: even in draft mode a JPEG costs ~1 ms of entropy decoding per 100 KB (a 1080p
# photo ~4 ms), a thread hop ~0.1 ms. So image decoding moves to a worker thread above 256 KiB
# (Pillow releases the GIL while decoding, so big images decode in parallel and the loop keeps
# serving), and base64 decoding (which holds the GIL) only above 1 MiB, to keep the loop free.
_OFFLOAD_IMAGE_BYTES = 256 * 1024
_OFFLOAD_BASE64_BYTES = 1024 * 1024
# Retries and re-runs send the same bytes again; remembering the analysis by content digest
# spares a decode. Entries are ~200 bytes, so this bounds the cache to about a megabyte.
_ANALYSIS_CACHE_SIZE = 4096
# JPEG draft mode decodes at 1/2..1/8 scale straight from the DCT; asking for >= 32 px keeps
# enough detail for the colour statistics below while skipping almost all decode work.
_DRAFT_SIZE = (32, 32)
_THUMB_SIZE = (16, 16)
# z-score of the 99th percentile of a standard normal: sigma of a log-normal from its p99
_Z99 = 2.3263478740408408
_FAIL_STATUSES = (500, 502, 503, 504)
# How often a hung handler checks whether its client has gone, so in_flight stays honest.
_HANG_POLL_FIRST = 0.02
_HANG_POLL_MAX = 1.0
_STATS_PATH = "/_emulator/stats"
_RESET_PATH = "/_emulator/reset"


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """How the emulator behaves. Every field has a default that gives a well-behaved server.

    Rates are probabilities per classify request; ``fail_rate + reset_rate + hang_rate +
    garbage_rate`` must not exceed 1. Invalid values raise :class:`ConfigError` at construction,
    so a typo in a test fails loudly instead of silently testing nothing.
    """

    #: class names in class_id order
    classes: tuple[str, ...] = DEFAULT_CLASSES
    #: answer in the multi-label shape (dict of every class + ``predicted_classes``)
    multi_label: bool = False
    #: the one accepted key (others get 403); None accepts any non-empty key
    api_key: str | None = None
    #: accepted ``"model/version"`` ids (others get 404); None accepts any model
    models: frozenset[str] | None = None
    #: largest request body, in bytes of base64 text, before answering 413
    max_body_bytes: int = _DEFAULT_MAX_BODY_BYTES
    #: median added latency in milliseconds (0 = answer as fast as possible)
    latency_ms: float = 0.0
    #: p99 of a log-normal latency with median ``latency_ms``; None = constant latency
    latency_p99_ms: float | None = None
    #: sustained requests per second before 429 (token bucket); None = unlimited
    rate_limit: float | None = None
    #: bucket size: requests allowed back to back; None = max(1, rate_limit)
    rate_limit_burst: float | None = None
    #: seconds to announce in ``Retry-After`` on 429 (rounded up); None = no header
    rate_limit_retry_after: float | None = None
    #: probability of a random 500/502/503/504 (503 carries ``Retry-After: 1``)
    fail_rate: float = 0.0
    #: probability of dropping the connection (TCP reset) after reading the request
    reset_rate: float = 0.0
    #: probability of never answering (until the client gives up or ``hang_seconds`` pass)
    hang_rate: float = 0.0
    #: upper bound on a hang (and on any sampled latency), so nothing waits forever
    hang_seconds: float = 600.0
    #: probability of a 200 whose body is truncated JSON, HTML or empty
    garbage_rate: float = 0.0
    #: seed of every random choice (faults, latency); predictions never depend on it
    seed: int = 0
    #: accept ``image=http://...`` and loopback hosts (the hosted service only fetches https
    #: from public hosts; the emulator allows more so tests can serve images locally)
    allow_http_image_urls: bool = True
    #: total seconds allowed for fetching an ``image=`` URL
    image_fetch_timeout: float = 10.0

    def __post_init__(self) -> None:
        # Accept lists/sets from callers (tests, TOML) but store hashable, immutable values.
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.models is not None:
            object.__setattr__(self, "models", frozenset(self.models))
        _validate_config(self)

    @property
    def burst(self) -> float:
        """The effective token-bucket size."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1.0, self.rate_limit or 1.0)


def _validate_config(config: EmulatorConfig) -> None:
    if not config.classes:
        raise ConfigError("classes: at least one class name is required")
    if any(not name for name in config.classes):
        raise ConfigError("classes: class names must not be empty")
    if len(set(config.classes)) != len(config.classes):
        raise ConfigError("classes: class names must be unique")
    if config.api_key is not None and not config.api_key:
        raise ConfigError("api_key: must be None (accept any key) or a non-empty string")
    if config.models is not None:
        for model in config.models:
            _split_model_id(model)
    if config.max_body_bytes < 1:
        raise ConfigError("max_body_bytes: must be at least 1")
    _check_finite("latency_ms", config.latency_ms, minimum=0.0)
    if config.latency_p99_ms is not None:
        _check_finite("latency_p99_ms", config.latency_p99_ms, minimum=0.0)
        if config.latency_ms <= 0:
            raise ConfigError("latency_p99_ms needs a positive latency_ms (the median)")
        if config.latency_p99_ms < config.latency_ms:
            raise ConfigError(
                f"latency_p99_ms ({config.latency_p99_ms:g}) must be >= latency_ms "
                f"({config.latency_ms:g}), the median"
            )
    if config.rate_limit is not None:
        _check_finite("rate_limit", config.rate_limit, minimum=0.0)
        if config.rate_limit <= 0:
            raise ConfigError("rate_limit: must be > 0 requests/s (or None for no limit)")
    if config.rate_limit_burst is not None:
        _check_finite("rate_limit_burst", config.rate_limit_burst, minimum=1.0)
    if config.rate_limit_retry_after is not None:
        _check_finite("rate_limit_retry_after", config.rate_limit_retry_after, minimum=0.0)
    total = 0.0
    for name in ("fail_rate", "reset_rate", "hang_rate", "garbage_rate"):
        value = getattr(config, name)
        _check_finite(name, value, minimum=0.0, maximum=1.0)
        total += value
    if total > 1.0 + 1e-9:
        raise ConfigError(
            f"fail_rate + reset_rate + hang_rate + garbage_rate = {total:g}, must be <= 1"
        )
    _check_finite("hang_seconds", config.hang_seconds, minimum=0.0)
    _check_finite("image_fetch_timeout", config.image_fetch_timeout, minimum=0.0)


def _check_finite(name: str, value: float, *, minimum: float, maximum: float | None = None) -> None:
    if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum:g}, {maximum:g}]" if maximum is not None else f">= {minimum:g}"
        raise ConfigError(f"{name}: must be a number {bound}, got {value!r}")


def _split_model_id(model_id: str) -> tuple[str, int]:
    """``"project/3"`` -> ``("project", 3)``; the emulator's ``models`` use this form."""
    project, sep, version = model_id.rpartition("/")
    if not sep or not project or "/" in project or not _is_version(version):
        raise ConfigError(f"models: {model_id!r} is not of the form PROJECT/VERSION")
    return project, int(version)


def _is_version(text: str) -> bool:
    # ASCII digits only: str.isdecimal() would accept e.g. Arabic-Indic digits.
    return re.fullmatch(r"[0-9]{1,9}", text) is not None and int(text) >= 1


# ---------------------------------------------------------------------------------------------
# the "model": deterministic scores from image content


@dataclass(frozen=True, slots=True)
class ImageAnalysis:
    """What the emulator's model sees of one image: its full size and a feature vector."""

    width: int
    height: int
    #: roughly in [-1, 1] each; depends only on decoded pixels and size, never on the encoding
    #: metadata, the process or PYTHONHASHSEED
    features: tuple[float, ...]


def decode_base64_payload(body: bytes) -> bytes:
    """Turn a request body into image bytes, the way a lenient server does.

    Tolerates surrounding whitespace, embedded newlines (MIME-style line wrapping) and a
    ``data:image/...;base64,`` prefix. Raises :class:`InputError` for an empty payload or
    invalid base64, which the server answers with 400.
    """
    data = body.strip()
    if data[:5].lower() == b"data:":
        comma = data.find(b",", 0, 256)
        if comma < 0:
            raise InputError("malformed data: URL (no comma before the base64 data)")
        data = data[comma + 1 :].strip()
    if not data:
        raise InputError("empty payload")
    try:
        # Non-validating decode skips characters outside the alphabet (newlines), like the
        # service; padding errors still raise.
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"invalid base64 payload ({exc})") from exc
    if not raw:
        raise InputError("empty payload (no base64 data)")
    return raw


def analyze_image(image_bytes: bytes) -> ImageAnalysis:
    """Decode an image cheaply and compute the features the emulator's model scores.

    Uses JPEG draft mode and a 16x16 thumbnail, so a typical photo costs well under a
    millisecond. Any failure to decode (not an image, truncated, decompression bomb, unknown
    mode) raises :class:`InputError`: the data is untrusted, so every exception is a bad input.
    """
    if not image_bytes:
        raise InputError("empty payload")
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            # Pillow only *warns* between its limit and twice it; refuse consistently instead
            # of decoding a 100-megapixel PNG in a test server.
            if limit is not None and width * height > limit:
                raise InputError(
                    f"image too large to decode ({width}x{height} pixels, limit {limit})"
                )
            image.draft("RGB", _DRAFT_SIZE)
            rgb = image.convert("RGB")
        thumb = rgb.resize(_THUMB_SIZE, Image.Resampling.BOX)
    except InputError:
        raise
    except Exception as exc:  # untrusted bytes: any decoder failure means "not an image"
        raise InputError(f"{type(exc).__name__}: {exc}") from exc
    return ImageAnalysis(width=width, height=height, features=_features(thumb, width, height))


def _features(thumb: Image.Image, width: int, height: int) -> tuple[float, ...]:
    # Every feature is roughly centred on 0 over typical images, so no class wins by default.
    stat = ImageStat.Stat(thumb)
    r, g, b = (m / 255.0 for m in stat.mean)
    brightness = (r + g + b) / 1.5 - 1.0
    chroma = (r - g, g - b, b - r)
    contrast = min(1.0, sum(stat.stddev) / 150.0) * 2.0 - 1.0
    saturation = ImageStat.Stat(thumb.convert("HSV")).mean[1] / 127.5 - 1.0
    # Quadrant brightness: where the light is, so a sky-over-grass photo differs from its flip.
    q = thumb.convert("L").resize((2, 2), Image.Resampling.BOX).tobytes()
    top_bottom = (q[0] + q[1] - q[2] - q[3]) / 255.0
    left_right = (q[0] + q[2] - q[1] - q[3]) / 255.0
    aspect = math.tanh(math.log(width / height))
    # Some of a content hash, so two images with the same colour statistics still get
    # different answers; hashed from pixels + size (not the file bytes), so it is a function
    # of what the image shows. sha256, not hash(): stable across processes.
    digest = hashlib.sha256(thumb.tobytes() + f"{width}x{height}".encode()).digest()
    mixed = [b / 127.5 - 1.0 for b in digest[:5]]
    return (
        brightness,
        *chroma,
        contrast,
        saturation,
        top_bottom,
        left_right,
        aspect,
        *mixed,
    )


@lru_cache(maxsize=4096)
def _class_weights(name: str) -> tuple[float, ...]:
    # One weight per feature, from a hash of the class name: stable everywhere, and a class
    # keeps its behaviour when other classes are added or reordered.
    digest = hashlib.sha256(f"batchclassify-emulator:{name}".encode()).digest()
    return tuple(b / 127.5 - 1.0 for b in digest)


# Scales chosen so that over varied images the top softmax score ranges from ~0.3 (unsure) to
# ~0.95 (confident), and multi-label images get zero, one or several classes over 0.4.
_SOFTMAX_GAIN = 9.0
_SIGMOID_GAIN = 3.0
_SIGMOID_OFFSET = -1.0


def _logits(features: Sequence[float], classes: Sequence[str]) -> list[float]:
    norm = 1.0 / math.sqrt(len(features))
    # strict=False: a class has 32 hash-derived weights, more than there are features
    return [
        sum(w * f for w, f in zip(_class_weights(name), features, strict=False)) * norm
        for name in classes
    ]


def class_scores(
    analysis: ImageAnalysis, *, classes: Sequence[str], multi_label: bool
) -> list[float]:
    """Raw (unrounded) per-class confidences, in class order.

    Single-label: a softmax over all classes (they sum to 1). Multi-label: independent
    sigmoids, as a multi-label model's heads are.
    """
    logits = _logits(analysis.features, classes)
    if multi_label:
        return [1.0 / (1.0 + math.exp(-(_SIGMOID_GAIN * x + _SIGMOID_OFFSET))) for x in logits]
    scaled = [_SOFTMAX_GAIN * x for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def shape_response(
    scores: Sequence[float],
    *,
    classes: Sequence[str],
    multi_label: bool,
    confidence: float,
    width: int,
    height: int,
    elapsed: float,
    inference_id: str,
) -> dict[str, Any]:
    """Build the JSON body the service sends, key order included.

    Confidences are rounded to 4 places and thresholds compare the *rounded* values, so what a
    client reads is always consistent with what was kept. Single-label keeps classes at or over
    the threshold ("newer servers drop classes under it"); multi-label lists in
    ``predicted_classes`` those strictly over it, as the inference server does.
    """
    rounded = [round(s, 4) for s in scores]
    image = {"width": width, "height": height}
    if multi_label:
        passed = [name for name, c in zip(classes, rounded, strict=True) if c > confidence]
        return {
            "time": elapsed,
            "image": image,
            "predictions": {
                name: {"confidence": c, "class_id": i}
                for i, (name, c) in enumerate(zip(classes, rounded, strict=True))
            },
            "predicted_classes": passed,
            "inference_id": inference_id,
        }
    # Stable sort, ties in class_id order (what a reverse=True sort of the class list gives).
    order = sorted(range(len(classes)), key=lambda i: -rounded[i])
    predictions = [
        {"class": classes[i], "class_id": i, "confidence": rounded[i]}
        for i in order
        if rounded[i] >= confidence
    ]
    top = predictions[0] if predictions else None
    return {
        "time": elapsed,
        "image": image,
        "predictions": predictions,
        "top": top["class"] if top else "",
        "confidence": top["confidence"] if top else 0.0,
        "inference_id": inference_id,
    }


def predict(
    image_bytes: bytes,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    multi_label: bool = False,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """The body the emulator answers for these image bytes (the decoded file, not base64).

    ``time`` and ``inference_id`` (see :data:`VOLATILE_KEYS`) differ per call; everything else
    equals the server's answer. Raises :class:`InputError` if the bytes are not an image.
    """
    started = time.perf_counter()
    analysis = analyze_image(image_bytes)
    scores = class_scores(analysis, classes=classes, multi_label=multi_label)
    return shape_response(
        scores,
        classes=classes,
        multi_label=multi_label,
        confidence=confidence,
        width=analysis.width,
        height=analysis.height,
        elapsed=time.perf_counter() - started,
        inference_id=str(uuid.uuid4()),
    )


def parse_confidence(raw: str | None) -> float:
    """The ``confidence`` query parameter as a 0..1 threshold; values >= 1 are percent.

    Raises ValueError for anything that is not a number in [0, 100].
    """
    if raw is None or raw == "":
        return DEFAULT_CONFIDENCE
    value = float(raw)
    if not math.isfinite(value) or value < 0 or value > 100:
        raise ValueError(f"confidence must be in [0, 1] (or a percent up to 100), got {raw!r}")
    return value / 100.0 if value >= 1 else value


# ---------------------------------------------------------------------------------------------
# misbehaviour: latency and rate limiting


def sample_latency(rng: random.Random, median_ms: float, p99_ms: float | None) -> float:
    """One latency draw in **seconds**: constant ``median_ms``, or log-normal with that median
    and ``p99_ms`` as its 99th percentile (the shape of the hosted service's tail)."""
    if median_ms <= 0:
        return 0.0
    if p99_ms is None or p99_ms <= median_ms:
        return median_ms / 1000.0
    sigma = math.log(p99_ms / median_ms) / _Z99
    return rng.lognormvariate(math.log(median_ms), sigma) / 1000.0


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` stored.

    Non-blocking on purpose: a server answers 429 at once rather than queueing.
    """

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()

    def try_acquire(self) -> bool:
        """Take one token if there is one; False means "answer 429"."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def refill(self) -> None:
        self._tokens = self.burst
        self._last = self._clock()


# ---------------------------------------------------------------------------------------------
# server state


@dataclass
class _Stats:
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    ok_requests: int = 0
    #: sha256 hex of image bytes -> [requests, ok]
    images: dict[str, list[int]] = field(default_factory=dict)

    def image_seen(self, digest: str) -> None:
        self.images.setdefault(digest, [0, 0])[0] += 1

    def image_ok(self, digest: str) -> None:
        self.ok_requests += 1
        self.images.setdefault(digest, [0, 0])[1] += 1

    def snapshot(self, *, include_images: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "requests": self.requests,
            "by_status": dict(sorted(self.by_status.items())),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "distinct_images": len(self.images),
            "max_ok_per_image": max((ok for _, ok in self.images.values()), default=0),
            "ok_requests": self.ok_requests,
            "injected": dict(sorted(self.injected.items())),
        }
        if include_images:
            data["images"] = {
                digest: {"requests": n, "ok": ok} for digest, (n, ok) in self.images.items()
            }
        return data


class _State:
    """Everything one emulator instance mutates; lives in ``app[_STATE]``."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stats = _Stats()
        self.bucket = (
            TokenBucket(config.rate_limit, config.burst) if config.rate_limit is not None else None
        )
        self.fault_rng = random.Random()
        self.latency_rng = random.Random()
        self.reseed()
        #: sha256 hex -> analysis, insertion-ordered so the oldest is evicted first
        self.analyses: dict[str, ImageAnalysis] = {}
        # Set on shutdown: releases hung handlers and latency sleeps so cleanup is prompt.
        self.closing: asyncio.Event | None = None
        self.http: aiohttp.ClientSession | None = None

    def reseed(self) -> None:
        # Separate streams, so turning latency on does not change which requests fail.
        # Seeding with a str is deterministic across processes (it is hashed with sha512).
        self.fault_rng.seed(f"{self.config.seed}:faults")
        self.latency_rng.seed(f"{self.config.seed}:latency")

    def reset(self) -> None:
        in_flight = self.stats.in_flight
        self.stats = _Stats(in_flight=in_flight, max_in_flight=in_flight)
        if self.bucket is not None:
            self.bucket.refill()
        self.reseed()

    def remember(self, digest: str, analysis: ImageAnalysis) -> None:
        if len(self.analyses) >= _ANALYSIS_CACHE_SIZE:
            del self.analyses[next(iter(self.analyses))]
        self.analyses[digest] = analysis

    async def pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early (True) if the server is shutting down."""
        if seconds <= 0:
            return False
        if self.closing is None:  # pragma: no cover - only before startup
            await asyncio.sleep(seconds)
            return False
        try:
            await asyncio.wait_for(self.closing.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True


_STATE = web.AppKey("batchclassify_emulator_state", _State)


class _HttpError(Exception):
    """Short-circuits the classify handler with an error response."""

    def __init__(
        self,
        status: int,
        body: dict[str, Any],
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


def _message(status: int, text: str, headers: dict[str, str] | None = None) -> _HttpError:
    return _HttpError(status, {"message": text}, headers=headers)


def _bad_image(cause: str) -> _HttpError:
    return _message(400, f"Could not load input image. Cause: {cause}")


class _ClientGone(Exception):
    """The client disconnected while we were reading its request."""


# ---------------------------------------------------------------------------------------------
# handlers


async def _classify(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    stats = state.stats
    stats.requests += 1
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    started = time.perf_counter()
    try:
        outcome, response = await _classify_inner(request, state, started)
    except _HttpError as exc:
        outcome, response = str(exc.status), exc.response()
    except _ClientGone:
        # nginx's code for "client closed request"; no response can be delivered anyway
        outcome, response = "499", web.Response(status=499)
    finally:
        # state.stats may have been replaced by a reset meanwhile; decrement the live one
        state.stats.in_flight = max(0, state.stats.in_flight - 1)
    state.stats.by_status[outcome] += 1
    return response


async def _classify_inner(
    request: web.Request, state: _State, started: float
) -> tuple[str, web.StreamResponse]:
    config = state.config
    _authorize(request, config)
    _check_model(request, config)
    confidence = _confidence_param(request)
    if state.bucket is not None and not state.bucket.try_acquire():
        headers = None
        if config.rate_limit_retry_after is not None:
            headers = {"Retry-After": str(math.ceil(config.rate_limit_retry_after))}
        raise _message(429, "Too Many Requests", headers)

    # Everything that can be validated is, before faults are injected: per-image stats then
    # count faulted requests too (resume and retry tests need that), and a reset happens
    # "mid-request", after the server has consumed the upload.
    image_url = request.query.get("image")
    if image_url:
        # No Content-Type is required here: the official client's hosted=True request has
        # neither a body nor that header.
        raw = await _fetch_image(state, image_url)
    else:
        body = await _read_body(request, config.max_body_bytes)
        raw = await _off_loop_if_big(decode_base64_payload, body, _OFFLOAD_BASE64_BYTES)
    digest = hashlib.sha256(raw).hexdigest()
    state.stats.image_seen(digest)
    analysis = state.analyses.get(digest)
    if analysis is None:
        analysis = await _off_loop_if_big(analyze_image, raw, _OFFLOAD_IMAGE_BYTES)
        state.remember(digest, analysis)

    fault = _pick_fault(state)
    if fault is not None:
        state.stats.injected[fault] += 1
        return await _inject(fault, request, state, analysis, confidence, started)

    delay = sample_latency(state.latency_rng, config.latency_ms, config.latency_p99_ms)
    await state.pause(min(delay, config.hang_seconds))
    body_json = _answer(analysis, config, confidence, started)
    state.stats.image_ok(digest)
    return "200", web.json_response(body_json)


def _answer(
    analysis: ImageAnalysis, config: EmulatorConfig, confidence: float, started: float
) -> dict[str, Any]:
    scores = class_scores(analysis, classes=config.classes, multi_label=config.multi_label)
    return shape_response(
        scores,
        classes=config.classes,
        multi_label=config.multi_label,
        confidence=confidence,
        width=analysis.width,
        height=analysis.height,
        elapsed=time.perf_counter() - started,
        inference_id=str(uuid.uuid4()),
    )


def _authorize(request: web.Request, config: EmulatorConfig) -> None:
    key = request.query.get("api_key", "")
    if not key:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
    if not key:
        raise _message(401, "This endpoint requires an API key: pass ?api_key=YOUR_KEY.")
    # The key itself is never echoed back: error texts end up in logs and result files.
    if config.api_key is not None and not secrets.compare_digest(
        key.encode(), config.api_key.encode()
    ):
        raise _message(403, "This API key does not have access to this model.")


def _check_model(request: web.Request, config: EmulatorConfig) -> None:
    model = request.match_info["model"]
    version = request.match_info["version"]
    # A non-numeric version is answered 404, not 400/422: the server routes on any path
    # segment and then fails to find model "project/abc", which is a lookup miss.
    if not _is_version(version):
        raise _message(404, f"Model version not found: {model}/{version}")
    if config.models is not None and f"{model}/{int(version)}" not in config.models:
        raise _message(404, f"Model not found: {model}/{int(version)}")


def _confidence_param(request: web.Request) -> float:
    raw = request.query.get("confidence")
    try:
        return parse_confidence(raw)
    except ValueError:
        # What FastAPI answers for a query parameter that fails validation.
        raise _HttpError(
            422,
            {
                "detail": [
                    {
                        "type": "float_parsing",
                        "loc": ["query", "confidence"],
                        "msg": "Input should be a number in [0, 1], or a percent up to 100",
                        "input": raw,
                    }
                ]
            },
        ) from None


async def _read_body(request: web.Request, limit: int) -> bytes:
    content_type = request.headers.get("Content-Type", "").strip()
    if not content_type:
        raise _message(400, "Missing Content-Type header; send application/x-www-form-urlencoded.")
    if content_type.lower().startswith("multipart/"):
        raise _message(
            400, "Multipart uploads are not supported; send the base64 image as the body."
        )
    too_large = _message(413, f"Payload too large: the limit is {limit} bytes.")
    # Refuse before reading when the client announced the size; aiohttp then drains the rest
    # of the upload (lingering close), so the client reliably gets the 413 instead of a reset.
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:  # chunked uploads announce no size
                raise too_large
            chunks.append(chunk)
    except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError) as exc:
        raise _ClientGone from exc
    return b"".join(chunks)


async def _fetch_image(state: _State, url: str) -> bytes:
    config = state.config
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise _bad_image("image URL is not a valid URL") from None
    schemes = ("http", "https") if config.allow_http_image_urls else ("https",)
    if parsed.scheme not in schemes or not parsed.host:
        raise _bad_image(f"image URL must be an absolute {' or '.join(schemes)} URL")
    if not config.allow_http_image_urls and _is_private_host(parsed.host):
        raise _bad_image("image URL host is not publicly reachable")
    assert state.http is not None
    limit = config.max_body_bytes
    # The URL is not echoed: signed image URLs carry credentials of their own.
    try:
        async with state.http.get(
            parsed,
            timeout=aiohttp.ClientTimeout(total=config.image_fetch_timeout),
            allow_redirects=True,
        ) as resp:
            if resp.status != 200:
                raise _bad_image(f"fetching the image URL returned HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > limit:
                raise _bad_image(f"image at URL is larger than {limit} bytes")
            chunks: list[bytes] = []
            total = 0
            async for chunk in resp.content.iter_any():
                total += len(chunk)
                if total > limit:
                    raise _bad_image(f"image at URL is larger than {limit} bytes")
                chunks.append(chunk)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        raise _bad_image(f"could not fetch the image URL ({type(exc).__name__})") from None
    raw = b"".join(chunks)
    if not raw:
        raise _bad_image("the image URL returned an empty body")
    return raw


def _is_private_host(host: str) -> bool:
    """Whether the hosted service could not reach ``host``: IP literals that are not global,
    localhost, and single-label (intranet) names."""
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_global
    except ValueError:
        return host == "localhost" or host.endswith(".localhost") or "." not in host


_T = TypeVar("_T")


async def _off_loop_if_big(func: Callable[[bytes], _T], data: bytes, threshold: int) -> _T:
    """Run a decode step inline for small inputs, in a worker thread for big ones; a bad
    input becomes the service's 400."""
    try:
        if len(data) > threshold:
            return await asyncio.to_thread(func, data)
        return func(data)
    except InputError as exc:
        raise _bad_image(str(exc)) from None


def _pick_fault(state: _State) -> str | None:
    config = state.config
    if not (config.fail_rate or config.reset_rate or config.hang_rate or config.garbage_rate):
        return None
    draw = state.fault_rng.random()
    for name, rate in (
        ("fail", config.fail_rate),
        ("reset", config.reset_rate),
        ("hang", config.hang_rate),
        ("garbage", config.garbage_rate),
    ):
        if draw < rate:
            return name
        draw -= rate
    return None


async def _inject(
    fault: str,
    request: web.Request,
    state: _State,
    analysis: ImageAnalysis,
    confidence: float,
    started: float,
) -> tuple[str, web.StreamResponse]:
    rng = state.fault_rng
    if fault == "fail":
        status = rng.choice(_FAIL_STATUSES)
        if status == 503:
            return "503", web.json_response(
                {"message": "Model is loading, try again shortly."},
                status=503,
                headers={"Retry-After": "1"},
            )
        if status == 500:
            return "500", web.json_response({"message": "Internal error."}, status=500)
        # 502/504 come from the gateway in front of the service: HTML, not JSON.
        reason = "Bad Gateway" if status == 502 else "Gateway Timeout"
        return str(status), web.Response(
            status=status,
            text=f"<html><body><h1>{status} {reason}</h1></body></html>",
            content_type="text/html",
        )
    if fault == "reset":
        _drop_connection(request, reset=True)
        return "reset", web.Response()  # never delivered: the transport is gone
    if fault == "hang":
        await _hang(request, state)
        _drop_connection(request, reset=False)
        return "hang", web.Response()
    # garbage: a 200 the client must not trust
    kind = rng.choice(("truncated", "html", "empty"))
    if kind == "truncated":
        text = json.dumps(_answer(analysis, state.config, confidence, started))
        return "200", web.Response(text=text[: len(text) // 2], content_type="application/json")
    if kind == "html":
        return "200", web.Response(
            text="<!DOCTYPE html><html><body>Service temporarily unavailable</body></html>",
            content_type="text/html",
        )
    return "200", web.Response(body=b"", content_type="application/json")


async def _hang(request: web.Request, state: _State) -> None:
    # Handlers are not cancelled when the client disconnects (aiohttp's default), so poll for
    # that, often at first and then backing off (clients with short timeouts are noticed
    # quickly, long hangs cost few wake-ups); stop early on shutdown, at the latest after
    # hang_seconds.
    deadline = time.monotonic() + state.config.hang_seconds
    interval = _HANG_POLL_FIRST
    while (remaining := deadline - time.monotonic()) > 0:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        if await state.pause(min(interval, remaining)):
            return
        interval = min(interval * 1.5, _HANG_POLL_MAX)


def _drop_connection(request: web.Request, *, reset: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER with a zero timeout makes close() send RST: a real "connection reset".
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _stats_handler(request: web.Request) -> web.Response:
    """``GET /_emulator/stats[?images=1]``: what the server saw since start (or reset).

    ``requests`` counts classify requests; ``by_status`` what clients got, by status code, or
    ``"reset"`` / ``"hang"`` / ``"499"`` (client left mid-upload) when there was no response;
    injected garbage counts as ``"200"`` there (it is what the client saw) but not in
    ``ok_requests``. Images are identified by the sha256 of their bytes (decoded base64 or
    fetched URL), counted once the body was read, so 401/403/404/429 answers are not per-image.
    """
    state = request.app[_STATE]
    include = request.query.get("images", "").lower() in ("1", "true", "yes")
    return web.json_response(state.stats.snapshot(include_images=include))


async def _reset_handler(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.reset()
    return web.json_response(state.stats.snapshot(include_images=False))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[_STATE]
    state.closing = asyncio.Event()  # created inside the loop that will wait on it
    async with aiohttp.ClientSession() as session:
        state.http = session
        yield
        state.http = None


async def _release_waiters(app: web.Application) -> None:
    # on_shutdown runs after the listening socket is closed and before aiohttp waits for
    # in-flight handlers: releasing them here is what makes cleanup prompt.
    closing = app[_STATE].closing
    if closing is not None:
        closing.set()


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """A fresh emulator application; each one has its own stats, rate limiter and randomness."""
    app = web.Application()
    app[_STATE] = _State(config or EmulatorConfig())
    # Registered before the classify route, which would otherwise match /_emulator/reset.
    app.router.add_get(_STATS_PATH, _stats_handler)
    app.router.add_post(_RESET_PATH, _reset_handler)
    app.router.add_post("/{model}/{version}", _classify)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_release_waiters)
    return app


@contextlib.asynccontextmanager
async def running_emulator(
    config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve an emulator in the running loop; yield its base URL (``http://127.0.0.1:PORT``).

    ``port=0`` picks a free port. On exit the server stops listening, hung and sleeping
    handlers are released, and everything is closed within about a second.
    """
    runner = web.AppRunner(
        create_app(config), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{bound_port}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def emulator_in_thread(
    config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Like :func:`running_emulator`, for synchronous code (e.g. the official ``roboflow``
    client): serves from a daemon thread with its own event loop; yields the base URL."""
    ready: concurrent.futures.Future[tuple[str, asyncio.AbstractEventLoop, asyncio.Event]]
    ready = concurrent.futures.Future()

    async def serve() -> None:
        stop = asyncio.Event()
        async with running_emulator(config, host=host, port=port) as url:
            ready.set_result((url, asyncio.get_running_loop(), stop))
            await stop.wait()

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # e.g. the port is taken: re-raised in the caller
            if not ready.done():
                ready.set_exception(exc)
            else:  # pragma: no cover - a crash after startup
                raise

    thread = threading.Thread(target=main, name="batchclassify-emulator", daemon=True)
    thread.start()
    url, loop, stop = ready.result(timeout=30)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# command line

CLI_DESCRIPTION = """\
Serve a local Roboflow-compatible image classification API.

It accepts what the hosted service accepts (POST /MODEL/VERSION?api_key=KEY with the image
base64-encoded as the body, or ?image=URL) and answers in the same JSON shape, with
predictions that are a deterministic function of the image content. It can also misbehave on
purpose (latency with a long tail, rate limits, 5xx, resets, hangs, garbage bodies) so you can
dry-run a batch job, or test a client, against realistic trouble. GET /_emulator/stats shows
what it saw; POST /_emulator/reset zeroes that."""

CLI_EPILOG = """\
example:
  batchclassify emulate --port 9001 --latency-ms 180 --latency-p99-ms 5600 --fail-rate 0.02

  base64 -w0 cat.jpg | curl -s -X POST --data-binary @- \\
      -H 'Content-Type: application/x-www-form-urlencoded' \\
      'http://127.0.0.1:9001/my-project/1?api_key=anything&confidence=0.4'

  curl -s http://127.0.0.1:9001/_emulator/stats"""


def _rate(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return names


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``emulate`` options to ``parser`` (defaults mirror :class:`EmulatorConfig`)."""
    defaults = EmulatorConfig()
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    net.add_argument(
        "--port",
        type=_port,
        default=9001,
        help="port to listen on; 0 picks a free one (default: %(default)s, like a "
        "self-hosted inference server)",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--classes",
        type=_name_list,
        default=defaults.classes,
        metavar="A,B,C",
        help=f"class names, in class_id order (default: {','.join(defaults.classes)})",
    )
    model.add_argument(
        "--multi-label",
        action="store_true",
        help="answer like a multi-label model (a dict of every class + predicted_classes)",
    )
    model.add_argument(
        "--api-key",
        default=None,
        help="accept only this key, answer 403 to others (default: any non-empty key)",
    )
    model.add_argument(
        "--models",
        type=_name_list,
        default=None,
        metavar="M/1,M/2",
        help="accept only these PROJECT/VERSION ids, answer 404 to others (default: any)",
    )
    model.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=defaults.max_body_bytes,
        metavar="N",
        help="largest request body before 413 (default: %(default)s, ~20 MiB of image "
        "once base64-encoded)",
    )
    trouble = parser.add_argument_group("simulated trouble")
    trouble.add_argument(
        "--latency-ms",
        type=_non_negative,
        default=0.0,
        metavar="MS",
        help="median added latency per request (hosted service: ~180)",
    )
    trouble.add_argument(
        "--latency-p99-ms",
        type=_non_negative,
        default=None,
        metavar="MS",
        help="make latency log-normal with this p99 (hosted service: ~5600); "
        "without it latency is constant",
    )
    trouble.add_argument(
        "--rate-limit",
        type=_positive,
        default=None,
        metavar="PER_S",
        help="answer 429 above this many requests per second (token bucket)",
    )
    trouble.add_argument(
        "--rate-limit-burst",
        type=_non_negative,
        default=None,
        metavar="N",
        help="requests allowed back to back before the rate limit bites (default: max(1, rate))",
    )
    trouble.add_argument(
        "--rate-limit-retry-after",
        type=_non_negative,
        default=None,
        metavar="S",
        help="send 'Retry-After: S' (rounded up) with each 429 (default: no header, "
        "as the hosted service promises none)",
    )
    for flag, help_text in (
        ("--fail-rate", "fraction of requests answered 500/502/503/504 (503 with Retry-After)"),
        ("--reset-rate", "fraction of connections reset after the request was read"),
        ("--hang-rate", "fraction of requests never answered (until --hang-seconds)"),
        ("--garbage-rate", "fraction of 200 answers with a truncated JSON, HTML or empty body"),
    ):
        trouble.add_argument(flag, type=_rate, default=0.0, metavar="P", help=help_text)
    trouble.add_argument(
        "--hang-seconds",
        type=_non_negative,
        default=defaults.hang_seconds,
        metavar="S",
        help="how long a hung request is held open at most (default: %(default)s)",
    )
    trouble.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for every random choice, for reproducible runs (default: %(default)s)",
    )
    # Lets config_from_args report cross-option errors in argparse's own format.
    parser.set_defaults(emulator_parser=parser)


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Build the config from parsed options.

    Errors that involve several options (p99 below the median, rates adding up to more than 1)
    exit like any argparse error when ``args`` came from a parser set up by
    :func:`add_cli_arguments`; otherwise :class:`ConfigError` is raised.
    """
    known = {f.name for f in fields(EmulatorConfig)}
    values = {name: getattr(args, name) for name in known if hasattr(args, name)}
    if values.get("models") is not None:
        values["models"] = frozenset(values["models"])
    if values.get("rate_limit") is None:
        for dependent in ("rate_limit_burst", "rate_limit_retry_after"):
            if values.get(dependent) is not None:
                _config_error(args, f"--{dependent.replace('_', '-')} needs --rate-limit")
    try:
        return EmulatorConfig(**values)
    except ConfigError as exc:
        _config_error(args, str(exc))
        raise  # pragma: no cover - _config_error always raises


def _config_error(args: argparse.Namespace, message: str) -> None:
    parser = getattr(args, "emulator_parser", None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)  # exits with status 2 and the usage line
    raise ConfigError(message)


def serve_from_args(args: argparse.Namespace) -> int:
    """Run the emulator until Ctrl-C or SIGTERM; return the process exit status."""
    config = config_from_args(args)
    try:
        return asyncio.run(_serve(config, args.host, args.port))
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed, or Windows
        return 0


async def _serve(config: EmulatorConfig, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with running_emulator(config, host=host, port=port) as url:
            print(f"{LISTENING_PREFIX}{url}", flush=True)
            await stop.wait()
    except OSError as exc:
        print(
            f"batchclassify emulate: error: cannot listen on {host}:{port}: {exc.strerror or exc}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0

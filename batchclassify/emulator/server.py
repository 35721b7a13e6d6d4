"""The emulator's HTTP side: routes, request parsing, injected faults, stats, and the ways to
run it (:func:`create_app`, :func:`running_emulator`, :func:`emulator_in_thread`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import json
import math
import random
import secrets
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from batchclassify.emulator.config import (
    DEFAULT_GPU_BATCH_LATENCY_MS,
    DEFAULT_GPU_PER_IMAGE_MS,
    EmulatorConfig,
    image_format,
    is_version,
)
from batchclassify.emulator.gpu import GpuModel
from batchclassify.emulator.load import TokenBucket, sample_latency
from batchclassify.emulator.model import (
    ImageAnalysis,
    analyze_with_digest,
    class_scores,
    decode_base64_payload,
    json_confidence,
    parse_confidence,
    shape_response,
)
from batchclassify.errors import InputError

__all__ = [
    "REGISTRY_INPUT_SIZE",
    "RESET_PATH",
    "STATS_PATH",
    "VOLATILE_KEYS",
    "create_app",
    "emulator_in_thread",
    "running_emulator",
]

#: response keys that differ between two answers for the same image (compare without them)
VOLATILE_KEYS: tuple[str, ...] = ("time", "inference_id")
STATS_PATH = "/_emulator/stats"
RESET_PATH = "/_emulator/reset"
#: the input size ``/model/registry`` reports for every model (a common classifier size)
REGISTRY_INPUT_SIZE = 224

# Measured: sha256 runs at ~0.7 GB/s and a Pillow decode (formats without a header fast path)
# ~1 ms per 100 KB, a thread hop ~0.1 ms. So image work moves to a worker thread above 256 KiB
# (hashlib and Pillow release the GIL, so big images are handled in parallel and the loop keeps
# serving), and base64 or JSON decoding (which hold the GIL) only above 1 MiB.
_OFFLOAD_IMAGE_BYTES = 256 * 1024
_OFFLOAD_TEXT_BYTES = 1024 * 1024
_FAIL_STATUSES = (500, 502, 503, 504)
# How often a hung handler checks whether its client has gone, so in_flight stays honest.
_HANG_POLL_FIRST = 0.02
_HANG_POLL_MAX = 1.0
_TASK_TYPE = "classification"
# What the service says with each status when --fail-status injects it. 401 and 402 come from
# the serverless gateway, whose bodies carry the status too; the others are the server's.
_STATUS_MESSAGES: dict[int, str] = {
    400: "Could not load input image. Cause: the request could not be processed.",
    401: "Unauthorized api_key",
    402: "Payment required: the workspace cannot spend credits on this request.",
    403: "Forbidden: this API key does not have access to this model.",
    404: "Model not found.",
    410: "This model is no longer available.",
    413: "Payload too large.",
    422: "Invalid request parameter.",
    423: "Usage of this workspace is paused.",
    429: "Too Many Requests",
    500: "Internal error.",
    501: "This server has no runtime for this model.",
    502: "Bad Gateway",
    503: "Model is loading, try again shortly.",
    504: "Gateway Timeout",
    507: "This model is too big for this server.",
}
_STATUS_IN_BODY = frozenset({401, 402})


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
    #: requests per route, the model registry's included
    by_route: Counter[str] = field(default_factory=Counter)
    #: sha256 hex of image bytes -> [requests, ok]
    images: dict[str, list[int]] = field(default_factory=dict)

    def image_seen(self, digest: str) -> None:
        self.images.setdefault(digest, [0, 0])[0] += 1

    def image_ok(self, digest: str) -> None:
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
            "by_route": dict(sorted(self.by_route.items())),
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
        self.faulty = bool(
            config.fail_rate
            or config.reset_rate
            or config.hang_rate
            or config.garbage_rate
            or any(config.fail_statuses.values())
        )
        self.gpu = _gpu_model(config)
        self.fault_rng = random.Random()
        self.latency_rng = random.Random()
        self.reseed()
        #: model ids loaded through ``/model/add`` or by a classify request, in load order
        self.loaded_models: dict[str, None] = {}
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
        if self.gpu is not None:
            self.gpu.reset()
        self.reseed()

    def snapshot(self, *, include_images: bool) -> dict[str, Any]:
        data = self.stats.snapshot(include_images=include_images)
        if self.gpu is not None:
            data["gpu"] = self.gpu.snapshot()
        return data

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


def _gpu_model(config: EmulatorConfig) -> GpuModel | None:
    if config.gpu_slots is None:
        return None
    batch_ms = config.gpu_batch_latency_ms
    per_image_ms = config.gpu_per_image_ms
    return GpuModel(
        config.gpu_slots,
        DEFAULT_GPU_BATCH_LATENCY_MS if batch_ms is None else batch_ms,
        DEFAULT_GPU_PER_IMAGE_MS if per_image_ms is None else per_image_ms,
    )


_STATE = web.AppKey("batchclassify_emulator_state", _State)


@dataclass(frozen=True, slots=True)
class _Image:
    """One image of a request, once read and checked."""

    digest: str
    analysis: ImageAnalysis


class _HttpError(Exception):
    """Short-circuits a handler with an error response."""

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


def _unauthorized() -> _HttpError:
    # The serverless body, for a missing and a wrong key alike. The key itself is never echoed
    # back: error texts end up in logs and result files.
    return _HttpError(401, {"status": 401, "message": "Unauthorized api_key"})


def _unprocessable(loc: tuple[str, ...], kind: str, text: str) -> _HttpError:
    """What FastAPI answers when a request fails validation (the input is not echoed: it may
    hold the API key)."""
    return _HttpError(422, {"detail": [{"type": kind, "loc": list(loc), "msg": text}]})


class _ClientGone(Exception):
    """The client disconnected while we were reading its request."""


# ---------------------------------------------------------------------------------------------
# classify handlers: the legacy route and the JSON route

_Inner = Callable[[web.Request, _State, float], Awaitable[tuple[str, web.StreamResponse]]]
_LEGACY_ROUTE = "/{model}/{version}"
_JSON_ROUTE = "/infer/classification"


async def _counted(request: web.Request, route: str, inner: _Inner) -> web.StreamResponse:
    """Run a classify handler, keeping the counts ``/_emulator/stats`` reports."""
    state = request.app[_STATE]
    stats = state.stats
    stats.requests += 1
    stats.by_route[route] += 1
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    started = time.perf_counter()
    try:
        outcome, response = await inner(request, state, started)
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


async def _classify(request: web.Request) -> web.StreamResponse:
    """``POST|GET /{model}/{version}``: the legacy route every hosted host serves."""
    return await _counted(request, _LEGACY_ROUTE, _legacy_inner)


async def _infer_classification(request: web.Request) -> web.StreamResponse:
    """``POST /infer/classification``: the self-hosted server's JSON route."""
    return await _counted(request, _JSON_ROUTE, _json_inner)


async def _legacy_inner(
    request: web.Request, state: _State, started: float
) -> tuple[str, web.StreamResponse]:
    config = state.config
    query = request.query
    # The order of the server's own checks: query validation (422), then the key and the model
    # (while loading it), then the image.
    confidence = _query_confidence(query.get("confidence"))
    key = query.get("api_key")  # present but empty still wins over the header, and is refused
    _authorize(key if key is not None else _bearer_key(request), config)
    model, version = request.match_info["model"], request.match_info["version"]
    _check_model(model, version, config)
    state.loaded_models.setdefault(f"{model}/{version}", None)  # the server loads it to answer
    _take_token(state)
    # Everything that can be validated is, before faults are injected: per-image stats then
    # count faulted requests too (resume and retry tests need that), and a reset happens
    # "mid-request", after the server has consumed the upload.
    image_url = query.get("image")
    if image_url is not None:
        # No Content-Type is required here: the official client's hosted=True request has
        # neither a body nor that header, and a GET has no body at all.
        raw = await _fetch_image(state, image_url)
    else:
        raw = await _read_image_body(request, config.max_body_bytes)
    image = await _analyze(state, raw)
    return await _respond(request, state, [image], confidence, started, batch=False)


async def _json_inner(
    request: web.Request, state: _State, started: float
) -> tuple[str, web.StreamResponse]:
    config = state.config
    payload = await _read_json(request, config.max_body_bytes)
    model_id = _json_model_id(payload)
    image_field = payload.get("image")
    if image_field is None:
        raise _unprocessable(("body", "image"), "missing", "Field required")
    batch = isinstance(image_field, list)
    references = image_field if isinstance(image_field, list) else [image_field]
    for index, reference in enumerate(references):
        if not isinstance(reference, dict) or not isinstance(reference.get("type"), str):
            loc = ("body", "image", *((str(index),) if batch else ()), "type")
            raise _unprocessable(loc, "missing", "an image is {'type': ..., 'value': ...}")
    try:
        confidence = json_confidence(payload.get("confidence"))
    except ValueError:
        raise _unprocessable(
            ("body", "confidence"), "float_parsing", "Input should be a number"
        ) from None
    _authorize(_json_key(request, payload), config)
    _check_model_id(model_id, config)
    state.loaded_models.setdefault(model_id, None)  # the server loads the model on first use
    _take_token(state)
    if not references:
        raise _bad_image("the image list is empty")
    loaded = await asyncio.gather(
        *(_load_reference(state, ref) for ref in references), return_exceptions=True
    )
    # Analyse every image that loaded (so stats count them all), then fail the whole request
    # on the first bad one, as the server does for a batch.
    images: list[_Image] = []
    failure: tuple[int, str] | None = None
    for index, outcome in enumerate(loaded):
        if isinstance(outcome, _HttpError):
            failure = failure or (index, str(outcome.body.get("message", "")))
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        try:
            images.append(await _analyze(state, outcome))
        except _HttpError as exc:
            failure = failure or (index, str(exc.body.get("message", "")))
    if failure is not None:
        index, message = failure
        raise _message(400, f"{message} (image {index} of the request)" if batch else message)
    return await _respond(request, state, images, confidence, started, batch=batch)


async def _respond(
    request: web.Request,
    state: _State,
    images: list[_Image],
    confidence: float,
    started: float,
    *,
    batch: bool,
) -> tuple[str, web.StreamResponse]:
    config = state.config
    fault = _pick_fault(state) if state.faulty else None
    if fault is not None:
        state.stats.injected["fail_status" if isinstance(fault, int) else fault] += 1
        return await _inject(fault, request, state, images, confidence, started, batch=batch)
    delay = sample_latency(state.latency_rng, config.latency_ms, config.latency_p99_ms)
    await state.pause(min(delay, config.hang_seconds))
    if state.gpu is not None:
        # After the network latency, not inside it: the two add up, and a request in transit
        # holds no slot. Injected faults above never reach the GPU (they stand for a failure
        # in front of the model), so only answers with predictions cost GPU time.
        await state.gpu.run(len(images), state.pause)
    body = _answers(images, config, confidence, started, batch=batch)
    stats = state.stats
    stats.ok_requests += 1
    for image in images:
        stats.image_ok(image.digest)
    return "200", web.json_response(body)


def _answers(
    images: list[_Image], config: EmulatorConfig, confidence: float, started: float, *, batch: bool
) -> dict[str, Any] | list[dict[str, Any]]:
    answers = [
        shape_response(
            class_scores(image.analysis, classes=config.classes, multi_label=config.multi_label),
            classes=config.classes,
            multi_label=config.multi_label,
            confidence=confidence,
            width=image.analysis.width,
            height=image.analysis.height,
            elapsed=time.perf_counter() - started,
            inference_id=str(uuid.uuid4()),
            multi_label_compare=config.multi_label_compare,
        )
        for image in images
    ]
    return answers if batch else answers[0]


# ---------------------------------------------------------------------------------------------
# model registry (what inference-sdk's default "v1" mode asks before classifying)


async def _model_registry(request: web.Request) -> web.Response:
    """``GET /model/registry``: the loaded models (no key needed, as on the server)."""
    state = request.app[_STATE]
    state.stats.by_route["/model/registry"] += 1
    return web.json_response(_registry(state))


async def _model_add(request: web.Request) -> web.Response:
    """``POST /model/add`` ``{"model_id": ..., "api_key": ...}``: load a model."""
    state = request.app[_STATE]
    state.stats.by_route["/model/add"] += 1
    try:
        payload = await _read_json(request, state.config.max_body_bytes)
        model_id = _json_model_id(payload)
        _authorize(_json_key(request, payload), state.config)
        _check_model_id(model_id, state.config)
    except _HttpError as exc:
        return exc.response()
    except _ClientGone:
        return web.Response(status=499)
    state.loaded_models.setdefault(model_id, None)
    return web.json_response(_registry(state))


async def _model_remove(request: web.Request) -> web.Response:
    """``POST /model/remove`` ``{"model_id": ...}``: unload a model."""
    state = request.app[_STATE]
    state.stats.by_route["/model/remove"] += 1
    try:
        model_id = _json_model_id(await _read_json(request, state.config.max_body_bytes))
    except _HttpError as exc:
        return exc.response()
    except _ClientGone:
        return web.Response(status=499)
    state.loaded_models.pop(model_id, None)
    return web.json_response(_registry(state))


async def _model_clear(request: web.Request) -> web.Response:
    """``POST /model/clear``: unload every model."""
    state = request.app[_STATE]
    state.stats.by_route["/model/clear"] += 1
    state.loaded_models.clear()
    return web.json_response(_registry(state))


def _registry(state: _State) -> dict[str, Any]:
    return {
        "models": [
            {
                "model_id": model_id,
                "task_type": _TASK_TYPE,
                "batch_size": None,
                "input_height": REGISTRY_INPUT_SIZE,
                "input_width": REGISTRY_INPUT_SIZE,
            }
            for model_id in state.loaded_models
        ]
    }


# ---------------------------------------------------------------------------------------------
# request checks


def _bearer_key(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _json_key(request: web.Request, payload: dict[str, Any]) -> str | None:
    # The server's precedence: query parameter > body field > Authorization header.
    key = request.query.get("api_key")
    if key is not None:
        return key
    body_key = payload.get("api_key")
    if body_key is not None:
        if not isinstance(body_key, str):
            raise _unprocessable(("body", "api_key"), "string_type", "Input should be a string")
        return body_key
    return _bearer_key(request)


def _authorize(key: str | None, config: EmulatorConfig) -> None:
    if not key:
        raise _unauthorized()
    expected = config.api_key
    if expected is not None and not secrets.compare_digest(
        key.encode("utf-8", "replace"), expected.encode("utf-8", "replace")
    ):
        raise _unauthorized()


def _check_model(model: str, version: str, config: EmulatorConfig) -> None:
    # A non-numeric version is answered 404, not 400/422: the server routes on any path
    # segment and then fails to find model "project/abc", which is a lookup miss.
    if not is_version(version):
        raise _message(404, f"Model version not found: {model}/{version}")
    if config.models is not None and f"{model}/{int(version)}" not in config.models:
        raise _message(404, f"Model not found: {model}/{int(version)}")


def _check_model_id(model_id: str, config: EmulatorConfig) -> None:
    project, sep, version = model_id.rpartition("/")
    if not sep or not project or "/" in project:
        raise _message(400, f"Model ID must be of the form PROJECT/VERSION, got {model_id!r}")
    _check_model(project, version, config)


def _json_model_id(payload: dict[str, Any]) -> str:
    model_id = payload.get("model_id")
    if model_id is None:
        raise _unprocessable(("body", "model_id"), "missing", "Field required")
    if not isinstance(model_id, str):
        raise _unprocessable(("body", "model_id"), "string_type", "Input should be a string")
    return model_id


def _query_confidence(raw: str | None) -> float:
    try:
        return parse_confidence(raw)
    except ValueError:
        # What FastAPI answers for a query parameter that fails validation.
        raise _unprocessable(
            ("query", "confidence"),
            "float_parsing",
            "Input should be a valid number (or 'best' / 'default')",
        ) from None


def _take_token(state: _State) -> None:
    if state.bucket is not None and not state.bucket.try_acquire():
        headers = None
        retry_after = state.config.rate_limit_retry_after
        if retry_after is not None:
            headers = {"Retry-After": str(math.ceil(retry_after))}
        raise _message(429, "Too Many Requests", headers)


# ---------------------------------------------------------------------------------------------
# reading images


async def _read_image_body(request: web.Request, limit: int) -> bytes:
    """The image of a legacy-route request without ``image=``: a base64 body, or the ``file``
    part of a multipart form."""
    content_type = request.headers.get("Content-Type", "")
    if not content_type.strip():
        raise _message(
            400,
            "Request must include a Content-Type header (application/x-www-form-urlencoded "
            "with a base64 body, or multipart/form-data).",
        )
    if "multipart/form-data" in content_type.lower():
        return await _read_multipart(request, limit)
    body = await _read_body(request, limit)
    return await _off_loop_if_big(decode_base64_payload, body)


def _too_large(limit: int) -> _HttpError:
    return _message(413, f"Payload too large: the limit is {limit} bytes.")


async def _read_body(request: web.Request, limit: int) -> bytes:
    # Refuse before reading when the client announced the size; aiohttp then drains the rest
    # of the upload (lingering close), so the client reliably gets the 413 instead of a reset.
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:  # chunked uploads announce no size
                raise _too_large(limit)
            chunks.append(chunk)
    except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError) as exc:
        raise _ClientGone from exc
    return b"".join(chunks)


async def _read_multipart(request: web.Request, limit: int) -> bytes:
    """The raw bytes of the part named ``file`` (no base64); other parts are skipped."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    budget = [limit]

    async def read_part(part: aiohttp.BodyPartReader) -> bytes:
        chunks: list[bytes] = []
        while chunk := await part.read_chunk(64 * 1024):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, aiohttp.BodyPartReader) or part.name != "file":
                if isinstance(part, aiohttp.BodyPartReader):
                    await read_part(part)  # skipped, but it counts towards the limit
                else:
                    await part.release()
                continue
            if part.filename is None:
                # A field, not a file: the server's form parser gives it a string, which it
                # refuses as an invalid content type.
                raise _message(
                    400,
                    "Invalid Content-Type: the 'file' part must be a file upload (with a "
                    "filename in its Content-Disposition).",
                )
            return await read_part(part)
    except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError) as exc:
        raise _ClientGone from exc
    except (HttpProcessingError, ValueError, RuntimeError, LookupError) as exc:
        raise _bad_image(f"malformed multipart/form-data body ({type(exc).__name__})") from None
    raise _bad_image(
        "Expected image to be sent in part named 'file' of multipart/form-data request"
    )


async def _read_json(request: web.Request, limit: int) -> dict[str, Any]:
    """The JSON object of a request body; 422 (as FastAPI answers) for anything else."""
    body = await _read_body(request, limit)
    try:
        if len(body) > _OFFLOAD_TEXT_BYTES:
            payload = await asyncio.to_thread(json.loads, body)
        else:
            payload = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        raise _unprocessable(("body",), "json_invalid", "JSON decode error") from None
    if not isinstance(payload, dict):
        raise _unprocessable(("body",), "model_attributes_type", "Input should be an object")
    return payload


async def _load_reference(state: _State, reference: dict[str, Any]) -> bytes:
    """The bytes of one ``{"type": "base64"|"url", "value": ...}`` image of the JSON route."""
    kind, value = reference.get("type"), reference.get("value")
    if kind not in ("base64", "url"):
        raise _bad_image(f"unsupported image type {kind!r} (the emulator loads base64 and url)")
    if not isinstance(value, str):
        raise _bad_image(f"the value of a {kind} image must be a string")
    if kind == "url":
        return await _fetch_image(state, value)
    return await _off_loop_if_big(decode_base64_payload, value.encode("utf-8", "replace"))


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


async def _off_loop_if_big(func: Callable[[bytes], _T], data: bytes) -> _T:
    """Run a decode step inline for small inputs, in a worker thread for big ones; a bad
    input becomes the service's 400."""
    try:
        if len(data) > _OFFLOAD_TEXT_BYTES:
            return await asyncio.to_thread(func, data)
        return func(data)
    except InputError as exc:
        raise _bad_image(str(exc)) from None


def _digest_and_analysis(raw: bytes) -> tuple[bytes, ImageAnalysis | InputError]:
    digest = hashlib.sha256(raw).digest()
    try:
        return digest, analyze_with_digest(raw, digest)
    except InputError as exc:
        return digest, exc


async def _analyze(state: _State, raw: bytes) -> _Image:
    """Identify and check one image; it counts as seen (stats) even when it is not an image."""
    if len(raw) > _OFFLOAD_IMAGE_BYTES:
        digest, outcome = await asyncio.to_thread(_digest_and_analysis, raw)
    else:
        digest, outcome = _digest_and_analysis(raw)
    hexdigest = digest.hex()
    state.stats.image_seen(hexdigest)
    if isinstance(outcome, InputError):
        raise _bad_image(str(outcome))
    refused = state.config.refuse_formats
    if refused and (kind := image_format(raw)) in refused:
        raise _bad_image(f"this server cannot decode {kind} images")
    return _Image(hexdigest, outcome)


# ---------------------------------------------------------------------------------------------
# misbehaviour


def _pick_fault(state: _State) -> str | int | None:
    """One seeded draw: a fault name, a status from ``fail_statuses``, or None."""
    config = state.config
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
    for status, rate in config.fail_statuses.items():
        if draw < rate:
            return status
        draw -= rate
    return None


def _status_response(status: int) -> web.Response:
    """The service's answer with ``status``: ``{"status": N, "message": ...}`` for 401 and 402
    (the serverless gateway's form), ``{"message": ...}`` otherwise; 503 with Retry-After."""
    message = _STATUS_MESSAGES.get(status)
    if message is None:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = "Error"
    body: dict[str, Any] = {"message": message}
    if status in _STATUS_IN_BODY:
        body = {"status": status, "message": message}
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response(body, status=status, headers=headers)


async def _inject(
    fault: str | int,
    request: web.Request,
    state: _State,
    images: list[_Image],
    confidence: float,
    started: float,
    *,
    batch: bool,
) -> tuple[str, web.StreamResponse]:
    if isinstance(fault, int):
        return str(fault), _status_response(fault)
    rng = state.fault_rng
    if fault == "fail":
        status = rng.choice(_FAIL_STATUSES)
        if status in (500, 503):
            return str(status), _status_response(status)
        # 502/504 come from the gateway in front of the service: HTML, not JSON.
        reason = HTTPStatus(status).phrase
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
        text = json.dumps(_answers(images, state.config, confidence, started, batch=batch))
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


# ---------------------------------------------------------------------------------------------
# introspection


async def _stats_handler(request: web.Request) -> web.Response:
    """``GET /_emulator/stats[?images=1]``: what the server saw since start (or reset).

    ``requests`` counts classify requests (both routes; a JSON-route batch is one request);
    ``by_status`` what clients got, by status code, or ``"reset"`` / ``"hang"`` / ``"499"``
    (client left mid-upload) when there was no response; injected garbage counts as ``"200"``
    there (it is what the client saw) but not in ``ok_requests``, the requests answered with
    predictions; ``by_route`` counts requests per route, the model registry's included (so a
    test can tell which route a client used). Images are identified by the sha256 of their
    bytes (decoded base64, multipart part or fetched URL), counted once the body was read, so
    401/404/429 answers are not per-image.

    With the GPU model on (``gpu_slots``), ``gpu`` holds its settings and what it did:
    ``busy_ms`` (the modelled slot time of finished batches, summed over slots, so it can
    exceed wall time when ``slots`` > 1), ``batches`` and ``images`` (requests answered with
    predictions and their images; a JSON-route list is one batch), ``running`` and ``queued``
    now, and ``max_running`` and ``max_queue``, the most that held and waited for a slot at once.
    """
    state = request.app[_STATE]
    include = request.query.get("images", "").lower() in ("1", "true", "yes")
    return web.json_response(state.snapshot(include_images=include))


async def _reset_handler(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.reset()
    return web.json_response(state.snapshot(include_images=False))


# ---------------------------------------------------------------------------------------------
# application and ways to run it


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
    state = app[_STATE]
    if state.closing is not None:
        state.closing.set()
    if state.gpu is not None:
        state.gpu.close()


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """A fresh emulator application; each one has its own stats, rate limiter and randomness."""
    app = web.Application()
    app[_STATE] = _State(config or EmulatorConfig())
    router = app.router
    # Fixed paths first: the legacy route /{model}/{version} would match every one of them.
    router.add_get(STATS_PATH, _stats_handler)
    router.add_post(RESET_PATH, _reset_handler)
    router.add_get("/model/registry", _model_registry)
    router.add_post("/model/add", _model_add)
    router.add_post("/model/remove", _model_remove)
    router.add_post("/model/clear", _model_clear)
    router.add_post(_JSON_ROUTE, _infer_classification)
    router.add_post(_LEGACY_ROUTE, _classify)
    router.add_get(_LEGACY_ROUTE, _classify)
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

"""A local, Roboflow-compatible classification server, for tests, benchmarks and dry runs.

It speaks the wire contract of ``PROTOCOL.md``, the way the current server code does:

* ``POST /{model}/{version}`` (the legacy route of every host), the image as the body,
  base64-encoded (any Content-Type but multipart; a ``data:`` prefix and line breaks are
  tolerated), or as the raw bytes of the part named ``file`` of a ``multipart/form-data`` body,
  or ``?image=URL`` with no body. ``GET`` with ``?image=URL`` works like ``POST``. A raw binary
  body, a missing Content-Type or an undecodable image is a 400. ``image=`` URLs must be https
  and name a public host (400 otherwise) unless ``allow_http_image_urls`` (``--allow-http-urls``)
  is on, which tests that serve images from 127.0.0.1 need.
* ``confidence`` as the server reads it: absent 0.4; ``best`` and ``default`` 0.5; values >= 1
  are percent; values below 0.01 are raised to 0.01; anything else is a 422 (FastAPI's
  ``{"detail": [...]}`` body).
* The key as ``?api_key=KEY`` or ``Authorization: Bearer KEY``; when both are sent the query
  wins (even a wrong or empty one). A missing or wrong key is a 401 with the serverless body
  ``{"status": 401, "message": "Unauthorized api_key"}``. ``models`` limits the accepted
  ``PROJECT/VERSION`` ids (404 otherwise).
* ``POST /infer/classification``, the self-hosted server's JSON route: ``{"model_id": "p/3",
  "api_key": ..., "image": {"type": "base64"|"url", "value": ...} | [..., ...],
  "confidence": 0.4}`` (key precedence: query > body > header; ``confidence`` used as given, no
  percent conversion, no floor). A list of images is answered with a list of answers in input
  order; one bad image fails the whole request with 400.
* ``GET /model/registry``, ``POST /model/add`` (and ``/model/remove``, ``/model/clear``): the
  model registry that ``inference-sdk``'s default (v1) mode asks before classifying; every
  model is a ``classification`` model.

Answers have the single-label shape (a list of the classes at or over the threshold, rounded to
4 places after the test on the raw score, ``top``, ``confidence``) or the multi-label one (every
class, unrounded, and ``predicted_classes``: score >= threshold by default, > with
``multi_label_compare="gt"``), with ``time`` and an ``inference_id``. Predictions are a
cheap, *deterministic* function of the image file (the sha256 of its bytes plus its size in
pixels, read from the header: see :mod:`batchclassify.emulator.model`), so a test can compute
the expected answer for a file with :func:`predict` and no HTTP at all, and the emulator
spends a few microseconds per image whatever its size.

It can also misbehave on purpose, like the real service under load: median + long-tail latency,
a token-bucket rate limit (429), random 5xx, chosen statuses with the service's bodies
(``fail_statuses``, ``--fail-status 402:0.01,423:0.01``), connection resets, hangs and garbage
200 bodies. All randomness comes from ``EmulatorConfig.seed``. With ``gpu_slots`` it models a
self-hosted GPU server: K requests run at once, each for ``A + B·n`` ms for its n images, the
others wait in arrival order. ``GET /_emulator/stats`` tells a
test what the server saw (per status, per image), ``POST /_emulator/reset`` zeroes that.

Entry points: :func:`create_app` (an ``aiohttp.web.Application``), :func:`running_emulator` (an
async context manager yielding the base URL), :func:`emulator_in_thread` (the same for
synchronous callers), and the ``batchclassify emulate`` command (:func:`add_cli_arguments`,
:func:`config_from_args`, :func:`serve_from_args`).

Modules: :mod:`~batchclassify.emulator.config` (``EmulatorConfig``),
:mod:`~batchclassify.emulator.model` (scores and answer shapes),
:mod:`~batchclassify.emulator.load` (latency and rate limit),
:mod:`~batchclassify.emulator.gpu` (GPU slots and batch cost),
:mod:`~batchclassify.emulator.server` (routes and faults), :mod:`~batchclassify.emulator.cli`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchclassify.emulator.cli import (
        CLI_DESCRIPTION,
        CLI_EPILOG,
        LISTENING_PREFIX,
        add_cli_arguments,
        config_from_args,
        serve_from_args,
    )
    from batchclassify.emulator.config import (
        DEFAULT_CLASSES,
        DEFAULT_CONFIDENCE,
        EmulatorConfig,
        MultiLabelCompare,
    )
    from batchclassify.emulator.load import TokenBucket, sample_latency
    from batchclassify.emulator.model import (
        CONFIDENCE_FLOOR,
        KEYWORD_CONFIDENCE,
        ImageAnalysis,
        analyze_image,
        class_scores,
        decode_base64_payload,
        parse_confidence,
        predict,
        shape_response,
    )
    from batchclassify.emulator.server import (
        VOLATILE_KEYS,
        create_app,
        emulator_in_thread,
        running_emulator,
    )

#: where each name lives, imported on first use: the CLI builds its parser from ``cli`` and
#: ``config`` without loading the server (and aiohttp.web with it)
_HOMES = {
    "CLI_DESCRIPTION": "cli",
    "CLI_EPILOG": "cli",
    "LISTENING_PREFIX": "cli",
    "add_cli_arguments": "cli",
    "config_from_args": "cli",
    "serve_from_args": "cli",
    "DEFAULT_CLASSES": "config",
    "DEFAULT_CONFIDENCE": "config",
    "EmulatorConfig": "config",
    "MultiLabelCompare": "config",
    "TokenBucket": "load",
    "sample_latency": "load",
    "CONFIDENCE_FLOOR": "model",
    "KEYWORD_CONFIDENCE": "model",
    "ImageAnalysis": "model",
    "analyze_image": "model",
    "class_scores": "model",
    "decode_base64_payload": "model",
    "parse_confidence": "model",
    "predict": "model",
    "shape_response": "model",
    "VOLATILE_KEYS": "server",
    "create_app": "server",
    "emulator_in_thread": "server",
    "running_emulator": "server",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'batchclassify.emulator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"batchclassify.emulator.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CLI_DESCRIPTION",
    "CLI_EPILOG",
    "CONFIDENCE_FLOOR",
    "DEFAULT_CLASSES",
    "DEFAULT_CONFIDENCE",
    "KEYWORD_CONFIDENCE",
    "LISTENING_PREFIX",
    "VOLATILE_KEYS",
    "EmulatorConfig",
    "ImageAnalysis",
    "MultiLabelCompare",
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

"""The emulator's configuration: :class:`EmulatorConfig` and its validation."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from batchclassify.errors import ConfigError

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_GPU_BATCH_LATENCY_MS",
    "DEFAULT_GPU_PER_IMAGE_MS",
    "MULTI_LABEL_COMPARES",
    "EmulatorConfig",
    "MultiLabelCompare",
    "is_version",
    "split_model_id",
]

DEFAULT_CLASSES: tuple[str, ...] = ("cat", "dog", "bird", "fish", "horse", "rabbit")
#: the service's default threshold when the request has no ``confidence`` parameter
DEFAULT_CONFIDENCE = 0.4
#: how a multi-label class gets into ``predicted_classes``: ``"gt"`` (score > threshold, the
#: server's older code path) or ``"ge"`` (score >= threshold, its newer default one)
MultiLabelCompare = Literal["gt", "ge"]
MULTI_LABEL_COMPARES: tuple[MultiLabelCompare, ...] = ("gt", "ge")

#: GPU model: fixed cost of one forward pass (kernel launches, transfers, pre/post-processing)
#: of a small classifier on a mid-range GPU behind a Python server, in ms
DEFAULT_GPU_BATCH_LATENCY_MS = 40.0
#: GPU model: what each image of a batch adds to that pass, in ms
DEFAULT_GPU_PER_IMAGE_MS = 2.0

# ~20 MiB of image (the serverless API's documented limit) is ~27 MiB once base64-encoded.
_DEFAULT_MAX_BODY_BYTES = 27 * 1024 * 1024
_RATES = ("fail_rate", "reset_rate", "hang_rate", "garbage_rate")


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """How the emulator behaves. Every field has a default that gives a well-behaved server.

    Rates are probabilities per classify request; ``fail_rate + reset_rate + hang_rate +
    garbage_rate`` plus the probabilities of ``fail_statuses`` must not exceed 1. Invalid values
    raise :class:`ConfigError` at construction, so a typo in a test fails loudly instead of
    silently testing nothing.
    """

    #: class names in class_id order
    classes: tuple[str, ...] = DEFAULT_CLASSES
    #: answer in the multi-label shape (dict of every class + ``predicted_classes``)
    multi_label: bool = False
    #: multi-label only: ``"ge"`` lists classes with score >= threshold in
    #: ``predicted_classes`` (the server's newer default path), ``"gt"`` those > it (older path)
    multi_label_compare: MultiLabelCompare = "ge"
    #: the one accepted key (a missing or different one gets 401); None accepts any non-empty key
    api_key: str | None = None
    #: accepted ``"model/version"`` ids (others get 404); None accepts any model
    models: frozenset[str] | None = None
    #: largest request body before answering 413, in bytes (base64 text, multipart or JSON)
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
    #: status -> probability of answering it, with the service's body for that status (e.g.
    #: ``{402: 0.01, 423: 0.01}``); drawn from the same seeded stream as the other faults
    fail_statuses: Mapping[int, float] = field(default_factory=dict, hash=False)
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
    #: accept ``image=http://...`` and loopback or private hosts. The service only fetches
    #: https URLs of public hosts (and so does the emulator by default); tests that serve
    #: images from 127.0.0.1 turn this on.
    allow_http_image_urls: bool = False
    #: total seconds allowed for fetching an ``image=`` URL
    image_fetch_timeout: float = 10.0
    #: image formats this server cannot decode (a 400, like a real server whose decoder lacks
    #: them: OpenCV reads no GIF), out of ``REFUSABLE_FORMATS``
    refuse_formats: frozenset[str] = frozenset()
    #: model a self-hosted GPU server: this many requests run at once, the others wait for a
    #: slot in arrival order; None = no GPU model (answers take only ``latency_ms``)
    gpu_slots: int | None = None
    #: GPU only: ms a request holds its slot whatever its size;
    #: None = ``DEFAULT_GPU_BATCH_LATENCY_MS`` (40)
    gpu_batch_latency_ms: float | None = None
    #: GPU only: ms each image of a request adds to that; None = ``DEFAULT_GPU_PER_IMAGE_MS`` (2)
    gpu_per_image_ms: float | None = None

    def __post_init__(self) -> None:
        # Accept lists/sets/dicts from callers (tests, TOML) but store immutable values.
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.models is not None:
            object.__setattr__(self, "models", frozenset(self.models))
        statuses = dict(self.fail_statuses)
        for status in statuses:
            if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
                raise ConfigError(
                    f"fail_statuses: {status!r} is not an HTTP error status (4xx, 5xx)"
                )
        object.__setattr__(self, "fail_statuses", MappingProxyType(dict(sorted(statuses.items()))))
        formats = frozenset(name.lower() for name in self.refuse_formats)
        unknown = sorted(formats - set(REFUSABLE_FORMATS))
        if unknown:
            raise ConfigError(
                f"refuse_formats: unknown format {unknown[0]!r} (one of "
                f"{', '.join(REFUSABLE_FORMATS)})"
            )
        object.__setattr__(self, "refuse_formats", formats)
        _validate_config(self)

    @property
    def burst(self) -> float:
        """The effective token-bucket size."""
        if self.rate_limit_burst is not None:
            return self.rate_limit_burst
        return max(1.0, self.rate_limit or 1.0)


#: formats ``refuse_formats`` can name, by their first bytes
REFUSABLE_FORMATS = ("bmp", "gif", "jpeg", "png", "tiff", "webp")


def image_format(raw: bytes) -> str | None:
    """The format of an image from its first bytes (``None``: another one)."""
    if raw.startswith(b"\xff\xd8"):
        return "jpeg"
    if raw.startswith(b"\x89PNG"):
        return "png"
    if raw.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if raw.startswith(b"BM"):
        return "bmp"
    if raw.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    return None


def _validate_config(config: EmulatorConfig) -> None:
    if not config.classes:
        raise ConfigError("classes: at least one class name is required")
    if any(not name for name in config.classes):
        raise ConfigError("classes: class names must not be empty")
    if len(set(config.classes)) != len(config.classes):
        raise ConfigError("classes: class names must be unique")
    if config.multi_label_compare not in MULTI_LABEL_COMPARES:
        raise ConfigError(
            f"multi_label_compare: must be 'gt' or 'ge', got {config.multi_label_compare!r}"
        )
    if config.api_key is not None and not config.api_key:
        raise ConfigError("api_key: must be None (accept any key) or a non-empty string")
    if config.models is not None:
        for model in config.models:
            split_model_id(model)
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
    for name in _RATES:
        value = getattr(config, name)
        _check_finite(name, value, minimum=0.0, maximum=1.0)
        total += value
    for status, rate in config.fail_statuses.items():
        _check_finite(f"fail_statuses[{status}]", rate, minimum=0.0, maximum=1.0)
        total += rate
    if total > 1.0 + 1e-9:
        raise ConfigError(
            f"fail_rate + reset_rate + hang_rate + garbage_rate + fail_statuses = {total:g}, "
            "must be <= 1"
        )
    _check_finite("hang_seconds", config.hang_seconds, minimum=0.0)
    _check_finite("image_fetch_timeout", config.image_fetch_timeout, minimum=0.0)
    _validate_gpu(config)


def _validate_gpu(config: EmulatorConfig) -> None:
    slots = config.gpu_slots
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise ConfigError(f"gpu_slots: must be an integer >= 1 (or None for no GPU), got {slots!r}")
    for name in ("gpu_batch_latency_ms", "gpu_per_image_ms"):
        value = getattr(config, name)
        if value is None:
            continue
        if slots is None:
            # Silently ignoring it would let a test measure a GPU that is not there.
            raise ConfigError(f"{name} needs gpu_slots (the GPU model is off without it)")
        _check_finite(name, value, minimum=0.0)


def _check_finite(name: str, value: float, *, minimum: float, maximum: float | None = None) -> None:
    if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum:g}, {maximum:g}]" if maximum is not None else f">= {minimum:g}"
        raise ConfigError(f"{name}: must be a number {bound}, got {value!r}")


def split_model_id(model_id: str) -> tuple[str, int]:
    """``"project/3"`` -> ``("project", 3)``; the emulator's ``models`` use this form."""
    project, sep, version = model_id.rpartition("/")
    if not sep or not project or "/" in project or not is_version(version):
        raise ConfigError(f"models: {model_id!r} is not of the form PROJECT/VERSION")
    return project, int(version)


def is_version(text: str) -> bool:
    """Whether ``text`` is a model version: 1 to 9 ASCII digits, not zero."""
    # ASCII digits only: str.isdecimal() would accept e.g. Arabic-Indic digits.
    return re.fullmatch(r"[0-9]{1,9}", text) is not None and int(text) >= 1

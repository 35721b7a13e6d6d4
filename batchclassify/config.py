"""Run settings: their defaults, their validation, and how they become pipeline options.

Settings are flat (one name per command-line option, ``_`` for ``-``) so that the command line,
the environment and a TOML file can all supply them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from batchclassify.client import DEFAULT_ENDPOINT, ClientOptions, parse_model
from batchclassify.errors import ConfigError
from batchclassify.organize import OrganizeOptions, Organizer, OrganizeSink
from batchclassify.pipeline import PipelineOptions
from batchclassify.prepare import PrepareOptions
from batchclassify.retry import RetryPolicy
from batchclassify.runner import JobState
from batchclassify.sinks import Sink
from batchclassify.sources import DEFAULT_EXTENSIONS, SourceOptions, parse_extensions
from batchclassify.state import default_state_path, parse_shard
from batchclassify.throttle import ThrottleOptions

__all__ = ["RunSettings"]

EMULATOR_KEY = "emulator"


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Every option of ``batchclassify run``, with its default."""

    model: str | None = None
    endpoint: str = DEFAULT_ENDPOINT
    api_key: str | None = field(default=None, repr=False)
    out: tuple[str, ...] = ()
    overwrite: bool = False
    concurrency: int = 8
    confidence: float | None = None
    emulate: bool = False
    #: ``None``: a progress bar when stderr is a terminal
    progress: bool | None = None
    ext: str = ",".join(sorted(ext.lstrip(".") for ext in DEFAULT_EXTENSIONS))
    column: str | None = None
    url_mode: str = "auto"
    timeout: float = 30.0
    connect_timeout: float = 10.0
    retries: int = 8
    max_wait: float = 30.0
    rate: float | None = None
    adaptive: bool = True
    max_failures: int | None = None
    max_outage: float | None = 600.0
    max_size: int | None = None
    jpeg_quality: int = 90
    summary: str | None = None
    queue_size: int | None = None
    shutdown_grace: float = 10.0
    #: ``None``: beside the first file output; ``""``: no state
    state: str | None = None
    resume: bool = False
    retry_failed: bool = False
    dedup: bool = True
    shard: str | None = None
    organize: str | None = None
    organize_mode: str = "link"
    min_confidence: float | None = None
    #: ``scan`` only: seconds between scans
    interval: float | None = None

    def __post_init__(self) -> None:
        _check(self.concurrency >= 1, "concurrency", "must be at least 1")
        _check(self.retries >= 1, "retries", "must be at least 1 (the first attempt counts)")
        _check(self.timeout > 0 and self.connect_timeout > 0, "timeout", "must be positive")
        _check(self.max_wait >= 0, "max_wait", "cannot be negative")
        _check(self.rate is None or self.rate > 0, "rate", "must be positive")
        _check(self.max_failures is None or self.max_failures >= 1, "max_failures", ">= 1")
        _check(self.max_outage is None or self.max_outage > 0, "max_outage", "must be positive")
        _check(self.max_size is None or self.max_size >= 16, "max_size", "must be >= 16 pixels")
        _check(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be between 1 and 100")
        _check(self.url_mode in ("auto", "reference", "fetch"), "url_mode", "auto|reference|fetch")
        _check(
            self.confidence is None or 0 <= self.confidence <= 100,
            "confidence",
            "must be between 0 and 1 (or a percentage up to 100)",
        )
        _check(self.queue_size is None or self.queue_size >= 1, "queue_size", "must be >= 1")
        _check(math.isfinite(self.shutdown_grace), "shutdown_grace", "must be finite")
        _check(self.interval is None or self.interval > 0, "interval", "must be positive")
        _check(
            self.organize_mode in ("link", "copy", "symlink"),
            "organize_mode",
            "must be link, copy or symlink",
        )
        _check(
            self.min_confidence is None or 0 <= self.min_confidence <= 1,
            "min_confidence",
            "must be between 0 and 1",
        )
        if self.shard is not None:
            parse_shard(self.shard)

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(item.name for item in fields(cls))

    def updated(self, **changes: Any) -> RunSettings:
        return replace(self, **changes)

    def pipeline_options(self) -> PipelineOptions:
        """The library-level options these settings stand for."""
        if not self.model:
            raise ConfigError("--model is required (e.g. --model flowers-abc12/3)")
        project, version = parse_model(self.model)
        api_key = self.api_key or (EMULATOR_KEY if self.emulate else None)
        if not api_key:
            raise ConfigError(
                "no API key: set ROBOFLOW_API_KEY or pass --api-key (or use --emulate for a dry "
                "run against the built-in emulator)"
            )
        client = ClientOptions(
            endpoint=self.endpoint,
            model=project,
            version=version,
            api_key=api_key,
            confidence=self.confidence,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            concurrency=self.concurrency,
            retry=RetryPolicy(attempts=self.retries, max_wait=self.max_wait),
        )
        return PipelineOptions(
            client=client,
            sources=SourceOptions(extensions=parse_extensions(self.ext), column=self.column),
            prepare=PrepareOptions(max_size=self.max_size, jpeg_quality=self.jpeg_quality),
            throttle=ThrottleOptions(
                rate=self.rate, adaptive=self.adaptive, max_outage=self.max_outage
            ),
            url_mode=self.url_mode,  # type: ignore[arg-type]
            queue_size=self.queue_size,
            max_failures=self.max_failures,
            dedup=self.dedup,
        )

    def job_state(self, outputs: Sequence[str]) -> JobState:
        """Where the state lives and what to do with it."""
        if self.state == "":
            path = None
        elif self.state is not None:
            path = Path(self.state)
        else:
            path = default_state_path(outputs)
        if self.resume and path is None:
            raise ConfigError("--resume needs a state: give --out FILE or --state PATH")
        return JobState(
            path=path,
            resume=self.resume,
            retry_failed=self.retry_failed,
            shard=parse_shard(self.shard) if self.shard else None,
        )

    def extra_sinks(self) -> list[Sink]:
        """Sinks that are not files of results (``--organize``)."""
        if self.organize is None:
            return []
        organizer = Organizer(
            OrganizeOptions(
                root=Path(self.organize),
                mode=self.organize_mode,  # type: ignore[arg-type]
                min_confidence=self.min_confidence,
            )
        )
        return [OrganizeSink(organizer)]


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"--{name.replace('_', '-')} {message}")

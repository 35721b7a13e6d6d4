"""Run settings: their defaults, where they come from, and how they become pipeline options.

Settings are flat (one name per command-line option, ``_`` for ``-``) so that the command line,
the environment and a TOML file can all supply them the same way. Precedence, highest first:

    command line > environment (ROBOFLOW_API_KEY, BATCHCLASSIFY_<NAME>) > --config FILE > defaults

``BATCHCLASSIFY_CONFIG`` names a config file when ``--config`` is not given.

This is the only module that parses TOML.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from batchclassify.endpoints import (
    CONFIDENCE_KEYWORDS,
    DEFAULT_MAX_RESPONSE_BYTES,
    NAMED_ENDPOINTS,
    SERVERLESS,
    default_endpoint,
    endpoint_defaults,
    model_workspace,
    parse_model,
    resolve_endpoint,
    saved_api_key,
)
from batchclassify.errors import ConfigError
from batchclassify.hedge import HedgeOptions, parse_hedge_after
from batchclassify.model import CSV_COLUMNS
from batchclassify.paths import PlannedPath
from batchclassify.sources import DEFAULT_EXTENSIONS
from batchclassify.state import default_state_path, parse_shard

# The settings are read by every command, --help included; what only a run needs (aiohttp,
# Pillow, the pipeline) is imported where the run's options are built.
if TYPE_CHECKING:
    from batchclassify.pipeline import PipelineOptions
    from batchclassify.runner import JobState
    from batchclassify.sinks import Sink

__all__ = [
    "ResolvedSettings",
    "RunSettings",
    "format_settings",
    "load_config_file",
    "resolve_settings",
]

EMULATOR_KEY = "emulator"


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Every option of ``batchclassify run``, with its default."""

    #: inputs, when none are given on the command line
    sources: tuple[str, ...] = ()
    model: str | None = None
    #: a URL or a short name (serverless, eu, legacy, local); by default the hosted API of
    #: the user's region. Several: a fleet of servers of the same model (one string when
    #: there is one, a tuple when there are several)
    endpoint: str | tuple[str, ...] = SERVERLESS
    #: how the key is sent: header (Bearer), query (?api_key=) or both; by default per host
    api_key_transport: str | None = None
    #: base64 text or a multipart file part; by default per host
    upload: str | None = None
    api_key: str | None = field(default=None, repr=False)
    #: a file holding the key (``-``: standard input), so it is not on the command line
    api_key_file: str | None = None
    out: tuple[str, ...] = ()
    overwrite: bool = False
    concurrency: int = 8
    #: the threshold applied to the scores: a probability, or ``best``/``default`` (the
    #: server's own thresholds); None: the server's default, 0.4
    confidence: float | str | None = None
    emulate: bool = False
    #: ``None``: a progress bar when stderr is a terminal
    progress: bool | None = None
    ext: str = ",".join(sorted(ext.lstrip(".") for ext in DEFAULT_EXTENSIONS))
    column: str | None = None
    #: list columns (CSV) / fields (JSONL) carried into every row
    keep_columns: tuple[str, ...] = ()
    #: ground truth: parent, column:NAME or a label file; each row gains label and correct
    labels: str | None = None
    #: write the evaluation against ``labels`` (JSON) here at the end of the run
    eval: str | None = None
    label_error_threshold: float = 0.8
    url_mode: str = "auto"
    timeout: float = 30.0
    connect_timeout: float = 10.0
    retries: int = 8
    max_wait: float = 30.0
    rate: float | None = None
    adaptive: bool = True
    max_failures: int | None = None
    max_outage: float | None = 600.0
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_size: int | None = None
    jpeg_quality: int = 90
    summary: str | None = None
    queue_size: int | None = None
    #: worker processes, each with its own event loop; ``auto``: see processes.auto_processes
    processes: int | str = "auto"
    #: images per request on a self-hosted server's batch route; ``auto``: see batching
    batch_size: int | str = 1
    shutdown_grace: float = 10.0
    #: the event loop: uvloop when installed (``auto``), or ``asyncio``/``uvloop`` by name
    event_loop: str = "auto"
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
    #: seconds between checkpoint uploads of an output in object storage (``--out s3://…``)
    upload_interval: float = 300.0
    #: send a request still pending after this many seconds once more; ``auto``: from the
    #: observed latency; ``None``: never (each copy may be billed)
    hedge_after: float | str | None = None

    def __post_init__(self) -> None:
        _check(self.concurrency >= 1, "concurrency", "must be at least 1")
        _check(self.retries >= 1, "retries", "must be at least 1 (the first attempt counts)")
        _check(self.timeout > 0 and self.connect_timeout > 0, "timeout", "must be positive")
        _check(self.max_wait >= 0, "max_wait", "cannot be negative")
        _check(self.rate is None or self.rate > 0, "rate", "must be positive")
        _check(self.max_failures is None or self.max_failures >= 1, "max_failures", ">= 1")
        _check(self.max_outage is None or self.max_outage > 0, "max_outage", "must be positive")
        _check(self.max_response_bytes >= 1024, "max_response_bytes", "must be at least 1024")
        _check(self.max_size is None or self.max_size >= 16, "max_size", "must be >= 16 pixels")
        _check(1 <= self.jpeg_quality <= 100, "jpeg_quality", "must be between 1 and 100")
        _check(
            self.url_mode in ("auto", "reference", "fetch", "presign"),
            "url_mode",
            "auto|reference|fetch|presign",
        )
        _check(self.eval is None or self.labels is not None, "eval", "needs --labels")
        _check(
            0.0 <= self.label_error_threshold <= 1.0,
            "label_error_threshold",
            "must be between 0 and 1",
        )
        if self.labels is not None:
            from batchclassify.evaluate import LabelSource

            LabelSource.parse(self.labels)  # a malformed spec is refused now
        # With --labels, label and correct are columns of every row too.
        taken = {*CSV_COLUMNS, "columns", "source_bytes"}
        if self.labels is not None:
            taken |= {"label", "correct"}
        clash = sorted(set(self.keep_columns) & taken)
        _check(
            not clash,
            "keep_columns",
            f"names a column every row already has: {', '.join(clash)} (results keep the "
            "list's own value as source)",
        )
        _check(
            len(set(self.keep_columns)) == len(self.keep_columns),
            "keep_columns",
            "names a column twice",
        )
        _check(
            _valid_confidence(self.confidence),
            "confidence",
            "must be a probability between 0 and 1 (e.g. 0.5), or best or default (the "
            f"server's own thresholds), got {self.confidence!r}",
        )
        _check(self.queue_size is None or self.queue_size >= 1, "queue_size", "must be >= 1")
        _check(
            self.batch_size == "auto" or (type(self.batch_size) is int and self.batch_size >= 1),
            "batch_size",
            f"must be a number of images per request (at least 1) or auto, got {self.batch_size!r}",
        )
        _check(
            self.processes == "auto" or (type(self.processes) is int and self.processes >= 1),
            "processes",
            f"must be a number of processes (at least 1) or auto, got {self.processes!r}",
        )
        _check(math.isfinite(self.shutdown_grace), "shutdown_grace", "must be finite")
        _check(
            self.event_loop in ("auto", "asyncio", "uvloop"),
            "event_loop",
            f"must be auto, asyncio or uvloop, got {self.event_loop!r}",
        )
        _check(self.interval is None or self.interval > 0, "interval", "must be positive")
        _check(self.upload_interval > 0, "upload_interval", "must be positive")
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
        given = (self.endpoint,) if isinstance(self.endpoint, str) else tuple(self.endpoint)
        _check(bool(given), "endpoint", "needs at least one URL")
        urls = tuple(resolve_endpoint(url) for url in given)
        object.__setattr__(self, "endpoint", urls[0] if len(urls) == 1 else urls)
        self.hedge_options()  # a malformed --hedge-after is refused now
        _check(
            self.api_key_transport in (None, "header", "query", "both"),
            "api_key_transport",
            "must be header, query or both",
        )
        _check(
            self.upload in (None, "base64", "multipart"), "upload", "must be base64 or multipart"
        )
        for url in urls:
            endpoint = urlsplit(url)
            _check(
                endpoint.scheme in ("http", "https") and bool(endpoint.hostname),
                "endpoint",
                f"must be an http(s) URL such as {SERVERLESS} or one of "
                f"{', '.join(NAMED_ENDPOINTS)}, got {url!r}",
            )

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Every endpoint (one, or the servers of a fleet)."""
        return (self.endpoint,) if isinstance(self.endpoint, str) else self.endpoint

    def hedge_options(self) -> HedgeOptions | None:
        value = self.hedge_after
        try:
            if isinstance(value, str):
                return parse_hedge_after(value)  # "off" too
            if value == 0:
                return None  # 0 seconds: off, as parse_hedge_after reads "0"
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"must be a number of seconds, auto or off, got {value!r}")
            return None if value is None else HedgeOptions(after=value)
        except ValueError as exc:
            raise ConfigError(f"--hedge-after {exc}") from None

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(item.name for item in fields(cls))

    def updated(self, **changes: Any) -> RunSettings:
        return replace(self, **changes)

    def pipeline_options(self, sources: Sequence[str] = ()) -> PipelineOptions:
        """The library-level options these settings stand for (``sources``: what the run
        reads, which ``processes = "auto"`` looks at)."""
        from batchclassify.client import ClientOptions
        from batchclassify.evaluate import LabelSource, labels_for
        from batchclassify.pipeline import PipelineOptions
        from batchclassify.prepare import PrepareOptions
        from batchclassify.processes import auto_processes
        from batchclassify.retry import RetryPolicy
        from batchclassify.sources import SourceOptions, parse_extensions
        from batchclassify.throttle import ThrottleOptions

        if not self.model:
            raise ConfigError("--model is required (e.g. --model flowers-abc12/3)")
        project, version = parse_model(self.model)
        api_key = self.api_key or (EMULATOR_KEY if self.emulate else None)
        if not api_key:
            raise ConfigError(
                "no API key: set ROBOFLOW_API_KEY, pass --api-key-file, or log in with the "
                "roboflow package ('roboflow login'); or use --emulate for a dry run against the "
                "built-in emulator"
            )
        endpoints = self.endpoints
        processes = (
            auto_processes(self.concurrency, sources)
            if self.processes == "auto"
            else int(self.processes)
        )
        # An image must fit every server of a fleet: the smallest documented limit.
        limits = [endpoint_defaults(url).upload_limit for url in endpoints]
        upload_limit = min((limit for limit in limits if limit is not None), default=None)
        client = ClientOptions(
            endpoint=endpoints[0],
            endpoints=endpoints,
            # None: each server gets what its host gets by default
            key_transport=self.api_key_transport,  # type: ignore[arg-type]
            upload=self.upload,  # type: ignore[arg-type]
            hedge=self.hedge_options(),
            model=project,
            version=version,
            api_key=api_key,
            confidence=self.confidence,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            concurrency=self.concurrency,
            retry=RetryPolicy(attempts=self.retries, max_wait=self.max_wait),
            max_response_bytes=self.max_response_bytes,
        )
        return PipelineOptions(
            client=client,
            sources=SourceOptions(
                extensions=parse_extensions(self.ext),
                column=self.column,
                keep_columns=self.keep_columns,
            ),
            prepare=PrepareOptions(
                max_size=self.max_size,
                jpeg_quality=self.jpeg_quality,
                max_upload_bytes=upload_limit,
            ),
            throttle=ThrottleOptions(
                rate=self.rate, adaptive=self.adaptive, max_outage=self.max_outage
            ),
            url_mode=self.url_mode,  # type: ignore[arg-type]
            # A label file is read now: its mistakes come before any request.
            labeler=labels_for(LabelSource.parse(self.labels)) if self.labels else None,
            queue_size=self.queue_size,
            max_failures=self.max_failures,
            dedup=self.dedup,
            processes=processes,
            batch_size=self._batch_size(endpoints, self.concurrency // processes),
            event_loop=self.event_loop,  # type: ignore[arg-type]
        )

    def _batch_size(self, endpoints: Sequence[str], in_flight: int) -> int:
        """``in_flight``: the images in flight of one process, which fill its batches."""
        from batchclassify.batching import auto_batch_size

        size = auto_batch_size(in_flight) if self.batch_size == "auto" else int(self.batch_size)
        if size > max(in_flight, 1):
            raise ConfigError(
                f"--batch-size {size} is more than the {in_flight} images in flight per process "
                f"(--concurrency {self.concurrency}): a batch fills from those. Raise "
                "--concurrency to 2-4 times the batch size, so batches fill while others are "
                "served"
            )
        hosted = any(endpoint_defaults(url).hosted for url in endpoints)
        if size > 1 and hosted and not self.emulate:
            raise ConfigError(
                "--batch-size needs a self-hosted Roboflow Inference server (its "
                "/infer/classification route): the hosted API takes one image per request. "
                "Give --endpoint http://HOST:9001, or leave --batch-size out"
            )
        return size

    def job_state(self, outputs: Sequence[str]) -> JobState:
        """Where the state lives and what to do with it."""
        from batchclassify.runner import JobState

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
            endpoint_label="built-in emulator" if self.emulate else None,
        )

    def other_paths(self) -> list[PlannedPath]:
        """Paths written besides outputs, state and summary, checked before the run."""
        planned = []
        if self.organize is not None:
            planned.append(
                PlannedPath(Path(self.organize), f"--organize {self.organize}", folder=True)
            )
        if self.eval is not None:
            planned.append(PlannedPath(Path(self.eval), f"--eval {self.eval}"))
        return planned

    def extra_sinks(self) -> list[Sink]:
        """Sinks that are not files of results (``--organize``)."""
        if self.organize is None:
            return []
        from batchclassify.organize import OrganizeOptions, Organizer, OrganizeSink

        organizer = Organizer(
            OrganizeOptions(
                root=Path(self.organize),
                mode=self.organize_mode,  # type: ignore[arg-type]
                min_confidence=self.min_confidence,
            )
        )
        return [OrganizeSink(organizer)]


def _valid_confidence(value: float | str | None) -> bool:
    if isinstance(value, str):
        return value in CONFIDENCE_KEYWORDS
    return value is None or 0.0 <= value <= 1.0


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"--{name.replace('_', '-')} {message}")


#: environment variables that name a setting outside the BATCHCLASSIFY_ prefix
ENV_ALIASES = {"ROBOFLOW_API_KEY": "api_key"}
ENV_PREFIX = "BATCHCLASSIFY_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class ResolvedSettings:
    """The effective settings, where each came from, and warnings for the user."""

    settings: RunSettings
    origins: dict[str, str]
    warnings: tuple[str, ...] = ()


def load_config_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Read a TOML config: ``{name: value}`` checked against the settings, and warnings."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    hints = _setting_types()
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in hints:
            raise ConfigError(
                f"{path}: unknown setting {key!r} (settings are the long option names of "
                "'batchclassify run', e.g. model, concurrency, max_size)"
            )
        values[name] = _from_toml(name, value, hints[name], where=str(path))
    warnings = []
    if values.get("api_key") and _readable_by_others(path):
        warnings.append(
            f"warning: {path} holds an API key and other users can read it: run "
            f"'chmod 600 {path}', or better, keep the key in ROBOFLOW_API_KEY"
        )
    return values, warnings


def resolve_settings(
    command_line: Mapping[str, Any],
    environ: Mapping[str, str],
    config_path: Path | None = None,
    *,
    stdin: TextIO | None = None,
) -> ResolvedSettings:
    """Merge the sources of settings by precedence (see the module docstring)."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    warnings: list[str] = []
    if config_path is None and environ.get(f"{ENV_PREFIX}CONFIG"):
        config_path = Path(environ[f"{ENV_PREFIX}CONFIG"])
    if config_path is not None:
        loaded, warnings = load_config_file(config_path)
        values.update(loaded)
        origins.update(dict.fromkeys(loaded, f"config file {config_path}"))
    hints = _setting_types()
    for variable, text in environ.items():
        name = ENV_ALIASES.get(variable)
        if name is None and variable.startswith(ENV_PREFIX):
            name = variable[len(ENV_PREFIX) :].lower()
            if name == "config":
                continue
            if name not in hints:
                raise ConfigError(f"environment variable {variable}: no such setting {name!r}")
        if name is None or not text:
            continue
        values[name] = _from_text(name, text, hints[name], where=f"environment {variable}")
        origins[name] = f"environment {variable}"
    for name, value in command_line.items():
        values[name] = value
        origins[name] = "command line"
    if values.get("api_key_file"):
        _read_key_file(values, origins, warnings, stdin=stdin)
    if values.get("emulate") and "endpoint" in origins:
        _settle_emulate_and_endpoint(values, origins)
    if "endpoint" not in values and not values.get("emulate"):
        # (an emulated run reads no region: a broken roboflow config cannot stop a dry run)
        values["endpoint"] = default_endpoint(environ)
        if values["endpoint"] != SERVERLESS:
            origins["endpoint"] = "default for ROBOFLOW_REGION=eu"
    if not values.get("api_key") and not values.get("emulate"):
        saved = saved_api_key(environ, model_workspace(values.get("model") or ""))
        if saved is not None:
            values["api_key"], origins["api_key"] = saved
    return ResolvedSettings(RunSettings(**values), origins, tuple(warnings))


def _settle_emulate_and_endpoint(values: dict[str, Any], origins: dict[str, str]) -> None:
    """``--emulate`` and ``--endpoint`` exclude each other. From different levels, the higher
    one wins as any setting does (``run --config hosted.toml --emulate`` is a dry run of a real
    job) and ``config show`` says which was set aside; from the same level it is a mistake."""
    emulate, endpoint = _level(origins["emulate"]), _level(origins["endpoint"])
    if emulate == endpoint:
        raise ConfigError(
            f"--emulate ({_origin(origins['emulate'])}) and --endpoint "
            f"({_origin(origins['endpoint'])}) cannot be used together: --emulate runs against "
            "the built-in emulator, not an endpoint; drop one of them"
        )
    if emulate > endpoint:
        values.pop("endpoint")
        origins["endpoint"] = (
            f"default; not used: --emulate ({_origin(origins['emulate'])}) wins over the "
            f"endpoint {_origin(origins['endpoint'])}"
        )
    else:
        values["emulate"] = False
        origins["emulate"] = (
            f"not used: --endpoint ({_origin(origins['endpoint'])}) wins over --emulate "
            f"{_origin(origins['emulate'])}"
        )


def _level(origin: str) -> int:
    """Precedence of where a setting came from: command line > environment > config file."""
    if origin == "command line":
        return 3
    return 2 if origin.startswith("environment") else 1


def _origin(origin: str) -> str:
    """``"environment BATCHCLASSIFY_EMULATE"`` -> ``"from environment BATCHCLASSIFY_EMULATE"``."""
    return "on the command line" if origin == "command line" else f"from {origin}"


def _read_key_file(
    values: dict[str, Any], origins: dict[str, str], warnings: list[str], *, stdin: TextIO | None
) -> None:
    """``api_key_file`` names where the key is: it wins over ROBOFLOW_API_KEY, and giving it
    beside ``--api-key`` on the command line is a mistake worth saying."""
    name = values["api_key_file"]
    if origins.get("api_key") == "command line" and origins["api_key_file"] == "command line":
        raise ConfigError("give the key once: --api-key or --api-key-file, not both")
    if name == "-":
        text = (stdin or sys.stdin).readline()
        where = "standard input"
    else:
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read --api-key-file {name!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--api-key-file {name!r} is not a text file") from None
        where = f"file {name}"
        if _readable_by_others(path):
            warnings.append(
                f"warning: the key file {name} can be read by other users: run 'chmod 600 {name}'"
            )
    key = text.strip()
    if not key or any(char.isspace() for char in key):
        raise ConfigError(f"--api-key-file: {where} does not hold one API key on one line")
    values["api_key"] = key
    origins["api_key"] = f"{where} (--api-key-file, from {origins['api_key_file']})"


def _setting_types() -> dict[str, Any]:
    return typing.get_type_hints(RunSettings)


def _base_types(hint: Any) -> tuple[type, ...]:
    """``int | None`` -> ``(int, NoneType)``; ``tuple[str, ...]`` -> ``(tuple,)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _base_types(arg))
    origin = typing.get_origin(hint)
    return (origin,) if origin is not None else (hint,)


def _from_toml(name: str, value: Any, hint: Any, *, where: str) -> Any:
    kinds = _base_types(hint)
    if tuple in kinds:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}: {name} must be a string or a list of strings")
    if bool in kinds:
        if isinstance(value, bool):
            return value
    elif int in kinds:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if str in kinds and isinstance(value, str):
        return value
    wanted = " or ".join(t.__name__ for t in kinds if t is not type(None))
    raise ConfigError(f"{where}: {name} must be {wanted}, got {type(value).__name__} {value!r}")


def _from_text(name: str, text: str, hint: Any, *, where: str) -> Any:
    kinds = _base_types(hint)
    try:
        if tuple in kinds and str in kinds:
            # One value or several (``endpoint``): separated by spaces, as a URL may hold commas.
            words = tuple(text.split())
            return words[0] if len(words) == 1 else words
        if tuple in kinds:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if bool in kinds:
            lowered = text.strip().lower()
            if lowered in _TRUE or lowered in _FALSE:
                return lowered in _TRUE
            raise ValueError(text)
        if int in kinds and not (str in kinds and not _is_number(text)):
            return int(text)
        if float in kinds and not (str in kinds and not _is_number(text)):
            return float(text)
    except ValueError:
        wanted = " or ".join(t.__name__ for t in kinds if t is not type(None))
        raise ConfigError(f"{where}: {name} must be {wanted}, got {text!r}") from None
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def format_settings(resolved: ResolvedSettings) -> str:
    """The effective settings as TOML a user could paste into a config file, each line
    saying where its value came from. The API key is shown as set or not, never itself."""
    lines = ["# effective settings; precedence: command line > environment > config file > default"]
    settings = resolved.settings
    for item in fields(RunSettings):
        name = item.name
        value = getattr(settings, name)
        origin = resolved.origins.get(name, "default")
        if name == "api_key" and value:
            lines.append(f'{name} = "***"  # {origin} (hidden)')
            continue
        if value is None:
            lines.append(f"# {name} = (not set)  # {origin}")
            continue
        lines.append(f"{name} = {_toml_value(value)}  # {origin}")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'

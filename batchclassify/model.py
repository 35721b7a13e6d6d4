"""The values that flow through the pipeline: an input :class:`Item` and its :class:`Result`."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from batchclassify.errors import ConfigError
from batchclassify.text import raw_name, valid_unicode

__all__ = ["ErrorInfo", "Item", "ObjectRef", "Result", "Status", "read_results", "record_json"]

Status = Literal["ok", "error"]

#: the CSV output's columns, in order (list columns and label columns may follow)
CSV_COLUMNS = (
    "source",
    "status",
    "top",
    "confidence",
    "predicted_classes",
    "error",
    "error_type",
    "http_status",
    "attempts",
    "latency_ms",
    "width",
    "height",
    "inference_id",
    "duplicate_of",
    "path",
)


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """An object in object storage (``s3://bucket/key``), as listed: its URL and what
    identifies this version of it (see :mod:`batchclassify.objects`). ``etag`` is ``None``
    only when the store gives no such tag (the size and modification time stand in)."""

    url: str
    etag: str | None = None
    version_id: str | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Item:
    """One input to classify: a local file, a URL, or an object in object storage.

    ``source`` is the input exactly as the user gave it (a list's line, a path found in a
    folder, a URL), so results can be joined back to the input; ``path`` is the file it names
    (a list's relative entries resolved against the list's folder). Exactly one of ``path``,
    ``url`` and ``obj`` is set, unless the item is already known to be broken, in which case
    ``problem`` says why and no request is made for it. ``columns`` carries the list's other
    columns asked for with ``--keep-columns``.
    """

    source: str
    path: Path | None = None
    url: str | None = None
    problem: str | None = None
    #: stable identity for the state store (see :func:`batchclassify.state.item_key`)
    key: str | None = None
    columns: dict[str, Any] | None = None
    #: an object in a bucket (``s3://…``): read through fsspec, see :mod:`batchclassify.objects`
    obj: ObjectRef | None = None

    def with_key(self, key: str) -> Item:
        return replace(self, key=key)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why an item failed: ``type`` is a short name (``input``, ``http``, ``timeout``, …)."""

    type: str
    message: str
    http_status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "message": valid_unicode(self.message),
            "http_status": self.http_status,
        }


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome for one input: a classification, or the error that prevented one.

    Both response shapes of the service are normalised here: ``predictions`` is always a
    ``{class: confidence}`` map, ``top``/``confidence`` are the best class (also for multi-label
    models), and ``predicted_classes`` lists the classes over the threshold (``[top]`` for a
    single-label model, empty when nothing passed).
    """

    source: str
    status: Status
    top: str | None = None
    confidence: float | None = None
    predicted_classes: tuple[str, ...] = ()
    predictions: dict[str, float] = field(default_factory=dict)
    image: dict[str, int] | None = None
    inference_id: str | None = None
    time: float | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    latency_ms: float | None = None
    #: the source whose identical bytes were classified instead (content dedup)
    duplicate_of: str | None = None
    #: the absolute path of the file classified (``None`` for URLs)
    path: str | None = None
    #: the size of what was uploaded, when it differs from the original's (``--max-size``)
    sent: dict[str, int] | None = None
    #: the model answered in the multi-label shape (several classes may be predicted)
    multi_label: bool = False
    #: the ground truth (``--labels``) and whether ``top`` equals it; ``labeled`` says that a
    #: run had labels, so that every row carries both keys (``null`` where there is none)
    label: str | None = None
    correct: bool | None = None
    labeled: bool = field(default=False, compare=False)
    #: the input list's columns kept with ``--keep-columns``
    columns: dict[str, Any] | None = None
    #: the input's state key and the hash of the bytes sent: bookkeeping, not written out
    key: str | None = field(default=None, compare=False, repr=False)
    content_hash: str | None = field(default=None, compare=False, repr=False)
    #: the record as JSON, made once by :func:`record_json` for the state and the JSONL output
    #: alike (not an argument: a ``replace()`` copy must make its own)
    _json: str | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready record written to JSONL and the state (keys in a stable order).

        Every string is valid Unicode. A source whose file name is not valid UTF-8 is written
        readably (``caf\\xe9.jpg``) and, exactly, as base64 of its bytes in ``source_bytes``
        (present only then); ``columns`` is present only with ``--keep-columns``."""
        error = self.error
        record: dict[str, Any] = {
            "source": valid_unicode(self.source),
            "path": None if self.path is None else valid_unicode(self.path),
            "status": self.status,
            "top": self.top,
            "confidence": self.confidence,
            "predicted_classes": list(self.predicted_classes),
            "predictions": self.predictions,
            "image": self.image,
            "inference_id": self.inference_id,
            "time": self.time,
            "error": error.to_dict() if error else None,
            "attempts": self.attempts,
            "latency_ms": self.latency_ms,
            "duplicate_of": None if self.duplicate_of is None else valid_unicode(self.duplicate_of),
        }
        if self.sent is not None:
            record["sent"] = self.sent
        if self.multi_label:
            record["multi_label"] = True
        if self.labeled:
            record["label"] = None if self.label is None else valid_unicode(self.label)
            record["correct"] = self.correct
        if self.columns is not None:
            record["columns"] = self.columns
        raw = raw_name(self.source)
        if raw is not None:
            record["source_bytes"] = base64.b64encode(raw).decode("ascii")
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Result:
        """Rebuild a result from its JSONL record (the inverse of :meth:`to_dict`)."""
        error = record.get("error")
        source = record["source"]
        if record.get("source_bytes"):
            source = base64.b64decode(record["source_bytes"]).decode("utf-8", "surrogateescape")
        return cls(
            source=source,
            status=record["status"],
            top=record.get("top"),
            confidence=record.get("confidence"),
            predicted_classes=tuple(record.get("predicted_classes") or ()),
            predictions=dict(record.get("predictions") or {}),
            image=record.get("image"),
            inference_id=record.get("inference_id"),
            time=record.get("time"),
            error=ErrorInfo(**error) if error else None,
            attempts=record.get("attempts", 0),
            latency_ms=record.get("latency_ms"),
            duplicate_of=record.get("duplicate_of"),
            path=record.get("path"),
            sent=record.get("sent"),
            multi_label=bool(record.get("multi_label")),
            label=record.get("label"),
            correct=record.get("correct"),
            labeled="label" in record,
            columns=record.get("columns"),
        )


def record_json(result: Result, *, ascii: bool = False) -> str:
    """The result's record as one line of strict JSON (no NaN, valid UTF-8, no newline);
    ``ascii`` escapes everything else too, e.g. for a terminal."""
    if ascii:
        return json.dumps(
            result.to_dict(), ensure_ascii=True, separators=(",", ":"), allow_nan=False
        )
    text = result._json
    if text is None:
        text = json.dumps(
            result.to_dict(), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
        object.__setattr__(result, "_json", text)  # frozen, but a cache of its own fields
    return text


def read_results(
    path: Path, *, convert: Callable[[dict[str, Any]], Result] = Result.from_dict
) -> Iterator[Result]:
    """The rows of a JSONL results file, one at a time (constant memory); blank lines are
    skipped. A line that is not a result row (not UTF-8, not a JSON object, missing fields, or
    refused by ``convert``) is a :class:`ConfigError` naming ``path:line``."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise TypeError(f"a JSON {type(record).__name__}, not an object")
                result = convert(record)
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise ConfigError(
                    f"{path}:{number} is not a result row ({type(exc).__name__}: {exc})"
                ) from None
            yield result

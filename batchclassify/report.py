"""One self-contained HTML page that says how a run went, built from its results file.

The results may be the JSONL, CSV or Parquet that ``batchclassify run --out`` wrote (told apart
by the file name's extension). CSV is the lossy one: cells that a spreadsheet would run as a
formula were written with a leading ``'``, which is taken off again here, and a class name
holding ``;`` cannot be told apart from two classes. Parquet needs ``pyarrow``
(``pip install 'batchclassify[parquet]'``). A file that is mostly not result records (more
unreadable rows than readable ones, or not a single readable one) is refused with a
:class:`ConfigError`, rather than shown as an empty run.

The page is meant to be mailed, attached to a ticket or opened from an archive years later, so it
loads nothing: CSS and SVG charts are inline, thumbnails are ``data:`` URIs, there is no
JavaScript, and a Content-Security-Policy forbids fetching anything else. Each thumbnail links to
its file (a ``file://`` URL, followed only when someone clicks it). Every string that came from
the results (sources, class names, error messages) is HTML-escaped. The header shows the run's
settings (model, endpoint without credentials, confidence threshold, max size), read from the
run's state file (opened read-only) or its summary when either is at hand.

The results file is read once, row by row, in constant memory (Parquet: one row group at a time):
counts go into a :class:`~batchclassify.summary.RunStats` (the same totals and latency
percentiles the run printed) plus a few counters, and only the ``thumbnails`` least-confident rows
are kept, in a bounded heap. A malformed line (torn last line of a killed run, hand-edited row,
binary junk, an overlong line) is counted and reported as "N unreadable lines".

Values that tests and scripts can read back from the page (element text is the bare value)::

    id="total"  id="ok"  id="failed"  id="unreadable"  id="no-class"    integers
    id="failure-rate"                                                   e.g. "12.5%" ("–" if empty)
    id="latency-p50"  id="latency-p95"  id="latency-p99"                ms, ok rows ("–" if none)
    id="elapsed"  id="images-per-s"  id="requests-sent"                 only with a summary file
    id="results-date"                                                   the results file's mtime,
                                                                        ISO 8601 with UTC offset
    id="model"  id="endpoint"  id="confidence-threshold"  id="max-size" only when the state or the
                                                                        summary tells; threshold
                                                                        "default" (the server's),
                                                                        max size in px or "none"
    <g class="class-bar" data-class="NAME" data-count="N">              ok rows whose top is NAME:
    <li class="class-row" data-class="NAME" data-count="N">             a bar of the chart (the
                                                                        CHART_CLASSES largest), or
                                                                        a row of the list of the
                                                                        other classes below it
        … data-predicted="M"                                            on both, only for
                                                                        multi-label results: ok
                                                                        rows with NAME among
                                                                        predicted_classes
    <td class="error-count" data-error-type="TYPE">N</td>               failed rows by error.type
    <td class="status-count" data-error-type="TYPE" data-http-status="S">N</td>
                                                                        … that have http_status S
                                                                        (table only when some do)
    <rect class="bin" data-bin="0.9-1.0" data-count="N">                confidence histogram
    <figure class="thumb" data-source="…" data-confidence="…">          a least-confident row (not
                                                                        a duplicate_of another);
                                                                        its <a href="file://…">
                                                                        opens the file

With an evaluation (``report --labels SOURCE``, computed by :func:`batchclassify.evaluate.evaluate`
from JSONL results only; or ``report --eval E.json``, the JSON ``batchclassify eval`` wrote) the
page has an Evaluation section. Its numbers are the evaluation JSON's values written exactly as
that JSON writes them (ratios rounded there to 6 places), "–" for its ``null``::

    id="accuracy"  id="top1-accuracy"  id="top3-accuracy"  id="top5-accuracy"
    id="macro-f1"  id="weighted-f1"  id="macro-precision"  id="macro-recall"
    id="weighted-precision"  id="weighted-recall"                       accuracy, top_k_accuracy,
                                                                        macro_avg, weighted_avg
    id="labeled"  id="correct"  id="unlabeled"  id="eval-failed"        its counts
    id="label-error-count"  id="label-error-threshold"
    id="evaluation-mismatch"                                            only when its ``rows``
                                                                        differ from the results'
    <td class="class-metric" data-class="NAME" data-metric="M">V</td>  per_class[NAME][M], M one
                                                                        of precision, recall, f1,
                                                                        support, predicted
    <rect class="confusion-cell" data-label="L" data-predicted="P" data-count="N">
                                                                        the confusion heatmap (row
                                                                        L, column P); with more
                                                                        than CHART_CLASSES classes
                                                                        the CHART_CLASSES - 1 with
                                                                        the most rows are drawn and
                                                                        L or P "" stands for the
                                                                        others, summed
                                                                        (id="confusion-folded"
                                                                        says so)
    <figure class="label-error" data-source="…" data-label="…" data-top="…" data-confidence="…">
                                                                        the first ``label_errors``
                                                                        (24) label_errors, in the
                                                                        JSON's order, thumbnails
                                                                        as above
"""

from __future__ import annotations

import base64
import contextlib
import csv
import heapq
import io
import json
import math
import os
import re
import sqlite3
import stat
import tempfile
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from PIL import Image, ImageOps

from batchclassify.errors import ConfigError, redact, without_userinfo
from batchclassify.evaluate import LabelSource, evaluate
from batchclassify.model import Result
from batchclassify.summary import RunStats
from batchclassify.text import valid_unicode

__all__ = ["build_report", "evaluation_from_labels", "read_evaluation", "write_report"]

#: bins of the confidence histogram, over [0, 1]
CONFIDENCE_BINS = 10
#: a longer line (or CSV row) is skipped unread (and counted unreadable): memory stays bounded
MAX_LINE_BYTES = 4 * 1024 * 1024
#: classes drawn in the bar chart; the others are listed below it
CHART_CLASSES = 30
#: distinct example messages shown per error type
EXAMPLES_PER_TYPE = 3
#: line numbers of unreadable lines quoted in the page
QUOTED_LINES = 5
#: Parquet rows decoded at a time
PARQUET_BATCH = 1024

#: results formats by file name extension, as ``run --out`` chooses them
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
#: the run settings shown in the header: names in the state's ``meta`` table and the summary
SETTINGS = ("model", "endpoint", "confidence", "max_size")

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
# Stands for CR while csv.reader splits a row: a noncharacter, which results have no use for
# (a CSV line that holds one is counted unreadable rather than misread).
_CR = "\ufdd0"
# What :func:`batchclassify.text.csv_cell` prefixes with ``'`` (tests check the two agree).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# The Parquet columns the report reads (ParquetSink's names), plus ``path`` when there is one.
_PARQUET_COLUMNS = (
    "source",
    "status",
    "top",
    "confidence",
    "predicted_classes",
    "error_type",
    "error_message",
    "http_status",
    "attempts",
    "latency_ms",
    "duplicate_of",
    "source_bytes",
    "path",
)


def build_report(
    results_path: Path,
    *,
    summary_path: Path | None = None,
    state_path: Path | None = None,
    thumbnails: int = 24,
    thumb_size: int = 160,
    evaluation: dict[str, Any] | None = None,
    label_errors: int = 24,
) -> str:
    """Return the HTML report for ``results_path`` (and the run's ``--summary`` JSON, if given).

    The run's settings come from ``state_path``, or else from the state beside the results
    (``RESULTS.state``, or that of a sibling output with the same stem); a missing or damaged
    state only leaves them out. With an ``evaluation`` (the JSON of ``batchclassify eval``, from
    :func:`evaluation_from_labels` or :func:`read_evaluation`) the page has an Evaluation
    section, with the first ``label_errors`` likely label errors as thumbnails. Raises
    :class:`ConfigError` when a file cannot be opened, the summary is not JSON, the results'
    format is unknown, or the file is not results at all; smaller problems inside the results
    file show up in the page.
    """
    if thumbnails < 0 or thumb_size < 16 or label_errors < 0:
        raise ConfigError("thumbnails and label_errors must be >= 0 and thumb_size >= 16 pixels")
    summary = _read_summary(summary_path) if summary_path is not None else None
    tally = _Tally(keep=thumbnails)
    try:
        with open(results_path, "rb") as stream:
            modified = os.fstat(stream.fileno()).st_mtime
            for row in _rows(results_path, stream):
                tally.add_row(row)
    except OSError as exc:
        raise ConfigError(
            f"cannot read results {str(results_path)!r}: {exc.strerror or exc}"
        ) from exc
    _check_is_results(results_path, tally)
    run = _run_info(results_path, modified, state_path, summary)
    return _page(results_path, tally, summary, run, thumb_size, evaluation, label_errors)


def write_report(
    results_path: Path,
    output: Path,
    *,
    overwrite: bool = False,
    summary_path: Path | None = None,
    state_path: Path | None = None,
    thumbnails: int = 24,
    thumb_size: int = 160,
    evaluation: dict[str, Any] | None = None,
    label_errors: int = 24,
) -> Path:
    """Build the report and write it to ``output``; return ``output``.

    An existing ``output`` is never replaced unless ``overwrite`` (it may be someone's edited
    copy), and never when it is the results file itself. A replaced report is written next to
    the old one and renamed over it, so a failure halfway leaves the old one intact.
    """
    if output.exists() and not overwrite:
        raise ConfigError(f"report file {str(output)!r} already exists; pass --overwrite")
    if output.exists() and results_path.exists() and output.samefile(results_path):
        raise ConfigError(f"report file {str(output)!r} is the results file itself")
    page = build_report(
        results_path,
        summary_path=summary_path,
        state_path=state_path,
        thumbnails=thumbnails,
        thumb_size=thumb_size,
        evaluation=evaluation,
        label_errors=label_errors,
    )
    try:
        if overwrite and output.exists():
            _replace(output, page)
        else:
            with open(output, "w" if overwrite else "x", encoding="utf-8") as stream:
                stream.write(page)
    except FileExistsError as exc:  # created by someone else since the check above
        raise ConfigError(f"report file {str(output)!r} already exists; pass --overwrite") from exc
    except OSError as exc:
        raise ConfigError(f"cannot write report {str(output)!r}: {exc.strerror or exc}") from exc
    return output


def _replace(output: Path, page: str) -> None:
    """Write next to ``output`` and rename over it, keeping its permissions."""
    fd, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(page)
        os.chmod(temporary, stat.S_IMODE(output.stat().st_mode))
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read summary {str(path)!r}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"summary {str(path)!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"summary {str(path)!r} is not a JSON object")
    return data


def _check_is_results(path: Path, tally: _Tally) -> None:
    """Refuse a file that is mostly not result records: an empty report would say the run did
    nothing, when the file given is simply not its results."""
    bad, good = tally.unreadable, tally.stats.total
    if bad and (not good or bad > good):
        first = tally.unreadable_at[0] if tally.unreadable_at else "?"
        raise ConfigError(
            f"{_shown(str(path))!r} does not look like batchclassify results: {bad} of its "
            f"{bad + good} rows are not result records (the first at line {first}). Give the "
            ".jsonl, .csv or .parquet file written by 'batchclassify run --out'."
        )


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    """One row of the results file: where it starts (a line number, or a row number for
    Parquet), its record in the shape of :meth:`Result.to_dict` (``None`` if it is unreadable),
    and whether it ends without a newline (the torn last line of a killed run)."""

    number: int
    record: dict[str, Any] | None
    torn: bool = False


def _rows(path: Path, stream: IO[bytes]) -> Iterator[_Row]:
    kind = FORMATS.get(path.suffix.lower())
    if kind == "jsonl":
        return _jsonl_rows(stream)
    if kind == "csv":
        return _csv_rows(path, stream)
    if kind == "parquet":
        return _parquet_rows(path, stream)
    raise ConfigError(
        f"cannot tell the format of results {_shown(str(path))!r} from its name: give the "
        ".jsonl (or .ndjson), .csv or .parquet file written by 'batchclassify run --out'"
    )


def _lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """Each line of ``stream``; ``None`` for a line over :data:`MAX_LINE_BYTES`, which is skipped
    in pieces rather than read whole (a file with no newline at all must not fill the memory)."""
    while line := stream.readline(MAX_LINE_BYTES):
        if len(line) < MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = stream.readline(MAX_LINE_BYTES)
        yield None


def _jsonl_rows(stream: IO[bytes]) -> Iterator[_Row]:
    for number, line in enumerate(_lines(stream), start=1):
        if line is None:
            yield _Row(number, None)
        elif line.strip():
            yield _Row(number, _json_object(line), torn=not line.endswith(b"\n"))


def _json_object(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    # RecursionError: deeply nested JSON.
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


class _BadLine(Exception):
    """A CSV line that is overlong, not UTF-8, holds U+FDD0 or makes a row over
    :data:`MAX_LINE_BYTES`."""


class _CsvLines:
    """The lines of a CSV file as text for :func:`csv.reader`, each one bounded, and each row
    too (a quoted field can run over many lines). A bad line raises :class:`_BadLine` out of the
    reader, which starts afresh at the next line: an iterator class, as a generator that raised
    would be finished."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines = _lines(stream)
        #: lines read so far, and bytes of the row being read
        self.number = 0
        self.row_bytes = 0
        self.ended_with_newline = True

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.number += 1
        if line is None:
            raise _BadLine
        self.ended_with_newline = line.endswith(b"\n")
        self.row_bytes += len(line)
        if self.row_bytes > MAX_LINE_BYTES:
            raise _BadLine
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadLine from None
        if text.endswith("\r\n"):  # saved again on Windows
            text = text[:-2] + "\n"
        # The sink leaves a CR unquoted in a cell ('\r… after csv_cell), and csv.reader would
        # end the row there: it travels as a noncharacter instead, put back by _csv_record.
        if _CR in text:
            raise _BadLine
        return text.replace("\r", _CR)


def _csv_rows(path: Path, stream: IO[bytes]) -> Iterator[_Row]:
    lines = _CsvLines(stream)
    reader = csv.reader(lines)
    header: list[str] | None = None
    while True:
        start = lines.number + 1
        lines.row_bytes = 0
        try:
            cells = next(reader)
        except StopIteration:
            return
        except (csv.Error, _BadLine):
            if header is None:
                raise _not_results_csv(path, "its first line cannot be read") from None
            yield _Row(start, None, torn=not lines.ended_with_newline)
            continue
        if not cells:  # a blank line
            continue
        if header is None:
            header = _csv_header(path, cells)
            continue
        yield _Row(start, _csv_record(header, cells), torn=not lines.ended_with_newline)


def _csv_header(path: Path, cells: list[str]) -> list[str]:
    header = [cell.strip() for cell in cells]
    header[0] = header[0].removeprefix("\ufeff")  # a spreadsheet may add a byte order mark
    if "source" not in header or "status" not in header:
        shown = ", ".join(header[:6]) + (", …" if len(header) > 6 else "")
        raise _not_results_csv(path, f"its header has no source and status columns ({shown})")
    return header


def _not_results_csv(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"{_shown(str(path))!r} is not a results CSV written by 'batchclassify run --out': {why}"
    )


def _unneutralised(cell: str) -> str:
    """``cell`` without the ``'`` that :func:`batchclassify.text.csv_cell` put before text a
    spreadsheet would run as a formula."""
    if cell.startswith("'") and cell[1:].startswith(_FORMULA_START):
        return cell[1:]
    return cell


def _csv_record(header: list[str], cells: list[str]) -> dict[str, Any] | None:
    """The record of a row in :data:`batchclassify.sinks.CSV_COLUMNS` (by name, in any order;
    extra columns ignored), or ``None`` if the row does not fit the header or a number is not
    one."""
    if len(cells) != len(header):
        return None
    row: dict[str, str] = {}
    for name, cell in zip(header, cells, strict=True):
        # The first column of a name wins: kept list columns (--keep-columns) come after ours.
        row.setdefault(name, _unneutralised(cell.replace(_CR, "\r")))

    def text(name: str) -> str | None:
        return row.get(name) or None

    def number(name: str, kind: type[float] | type[int] = float) -> Any:
        value = row.get(name, "").strip()
        return kind(value) if value else None

    try:
        status = row["status"]
        error = None
        if status == "error" or row.get("error_type"):
            error = {
                "type": row.get("error_type") or "error",
                "message": row.get("error") or "",
                "http_status": number("http_status", int),
            }
        width, height = number("width", int), number("height", int)
        image = None if width is None or height is None else {"width": width, "height": height}
        classes = row.get("predicted_classes", "")
        return {
            "source": row["source"],
            "status": status,
            "top": text("top"),
            "confidence": number("confidence"),
            "predicted_classes": classes.split(";") if classes else [],
            "image": image,
            "inference_id": text("inference_id"),
            "error": error,
            "attempts": number("attempts", int) or 0,
            "latency_ms": number("latency_ms"),
            "duplicate_of": text("duplicate_of"),
            "path": text("path"),
        }
    except ValueError:
        return None


def _parquet_rows(path: Path, stream: IO[bytes]) -> Iterator[_Row]:
    pa, pq = _pyarrow()
    try:
        table = pq.ParquetFile(stream)
        names = set(table.schema_arrow.names)
    except (pa.ArrowException, ValueError) as exc:
        raise ConfigError(f"{_shown(str(path))!r} is not a Parquet file: {exc}") from None
    if "source" not in names or "status" not in names:
        raise ConfigError(
            f"{_shown(str(path))!r} is not a results Parquet file written by 'batchclassify run "
            "--out': it has no source and status columns"
        )
    columns = [name for name in _PARQUET_COLUMNS if name in names]
    number = 0
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            for values in batch.to_pylist():
                number += 1
                yield _Row(number, _parquet_record(values))
    except (pa.ArrowException, ValueError) as exc:
        raise ConfigError(f"cannot read results {_shown(str(path))!r}: {exc}") from None


def _parquet_record(values: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a row of :class:`batchclassify.sinks.ParquetSink` (flat columns)."""
    error = None
    if values.get("status") == "error" or values.get("error_type"):
        error = {
            "type": values.get("error_type") or "error",
            "message": values.get("error_message") or "",
            "http_status": values.get("http_status"),
        }
    record = {
        "source": values.get("source"),
        "status": values.get("status"),
        "top": values.get("top"),
        "confidence": values.get("confidence"),
        "predicted_classes": values.get("predicted_classes") or [],
        "error": error,
        "attempts": values.get("attempts") or 0,
        "latency_ms": values.get("latency_ms"),
        "duplicate_of": values.get("duplicate_of"),
        "path": values.get("path"),
    }
    raw = values.get("source_bytes")
    if raw:
        if not isinstance(raw, bytes):
            return None
        record["source_bytes"] = base64.b64encode(raw).decode("ascii")
    return record


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError(
            "reading .parquet results needs pyarrow: pip install 'batchclassify[parquet]' (or "
            "report the .jsonl or .csv output of the same run)"
        ) from None
    return pyarrow, pyarrow.parquet


def _parse(record: dict[str, Any]) -> tuple[Result, str | None] | None:
    """The result in ``record`` and its ``path`` field, or ``None`` if it is not a well-formed
    result record."""
    try:
        if not _well_formed(record):
            return None
        result = Result.from_dict(record)
    # A record of the wrong shape (bad base64 in source_bytes is a ValueError too).
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    path = record.get("path")
    return result, path if isinstance(path, str) and path else None


def _well_formed(record: dict[str, Any]) -> bool:
    """Whether the fields the report uses have the types :meth:`Result.to_dict` writes."""
    error = record.get("error")
    classes = record.get("predicted_classes")
    return (
        isinstance(record.get("source"), str)
        and record.get("status") in ("ok", "error")
        and isinstance(record.get("top"), (str, type(None)))
        and isinstance(record.get("duplicate_of"), (str, type(None)))
        and _number_or_none(record.get("confidence"))
        and _number_or_none(record.get("latency_ms"))
        and (
            classes is None
            or (isinstance(classes, list) and all(isinstance(c, str) for c in classes))
        )
        and (
            error is None
            or (
                isinstance(error, dict)
                and isinstance(error.get("type"), str)
                and isinstance(error.get("message"), str)
                and _int_or_none(error.get("http_status"))
            )
        )
    )


def _number_or_none(value: object) -> bool:
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_or_none(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


@dataclass(frozen=True, slots=True)
class _Doubtful:
    """An ok row kept for review."""

    source: str
    top: str
    confidence: float
    #: the row's ``path`` field: the input's resolved path, when the results carry it
    path: str | None = None


@dataclass
class _Tally:
    """Everything the page shows, gathered in one pass. Only ``_lowest`` holds rows, at most
    ``keep`` of them; the counters grow with the number of classes and error types, not rows."""

    keep: int
    stats: RunStats = field(default_factory=RunStats)
    predicted: Counter[str] = field(default_factory=Counter)
    multi_label: bool = False
    no_class: int = 0
    bins: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)
    by_status: Counter[tuple[str, int | None]] = field(default_factory=Counter)
    #: per error type, up to EXAMPLES_PER_TYPE distinct ``(message, path or source)``
    examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    unreadable: int = 0
    unreadable_at: list[int] = field(default_factory=list)
    last_line_torn: bool = False
    # A max-heap by confidence (negated), ties broken towards the earlier line: the root is the
    # row to drop when a less confident one arrives.
    _lowest: list[tuple[float, int, _Doubtful]] = field(default_factory=list)

    def add_row(self, row: _Row) -> None:
        parsed = _parse(row.record) if row.record is not None else None
        if parsed is None:
            self.unreadable += 1
            if len(self.unreadable_at) < QUOTED_LINES:
                self.unreadable_at.append(row.number)
            self.last_line_torn = row.torn
            return
        self.last_line_torn = False
        self.add(*parsed, number=row.number)

    def add(self, result: Result, path: str | None = None, *, number: int) -> None:
        self.stats.add(result)
        if result.ok:
            self._add_ok(result, path, number)
        else:
            error_type = result.error.type if result.error else "error"
            status = result.error.http_status if result.error else None
            self.by_status[error_type, status] += 1
            examples = self.examples.setdefault(error_type, [])
            message = result.error.message if result.error else "(no error details)"
            if len(examples) < EXAMPLES_PER_TYPE and all(m != message for m, _ in examples):
                examples.append((message, path or result.source))

    def _add_ok(self, result: Result, path: str | None, number: int) -> None:
        if not result.top:
            self.no_class += 1
        self.predicted.update(set(result.predicted_classes))
        if result.predicted_classes and result.predicted_classes != (result.top,):
            self.multi_label = True
        if result.confidence is None:
            return
        confidence = float(result.confidence)
        self.bins[_bin(confidence)] += 1
        # A byte-identical copy got the same answer as its original: one of them is enough.
        if self.keep and not result.duplicate_of:
            row = _Doubtful(result.source, result.top or "", confidence, path)
            entry = (-confidence, -number, row)
            if len(self._lowest) < self.keep:
                heapq.heappush(self._lowest, entry)
            elif entry[:2] > self._lowest[0][:2]:
                heapq.heapreplace(self._lowest, entry)

    def least_confident(self) -> list[_Doubtful]:
        return [entry[2] for entry in sorted(self._lowest, reverse=True)]


def _bin(confidence: float) -> int:
    """The histogram bin of ``confidence``; 1.0 (and anything out of range) goes to an end bin."""
    return min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))


# --- the run's settings -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RunInfo:
    """What the header says about the run."""

    #: the results file's modification time, local, ISO 8601
    modified: str
    #: of :data:`SETTINGS`, those the state or the summary tells
    settings: dict[str, str]
    #: the state file read, if any; the one looked for, if none could be read
    state: Path | None
    state_read: bool


def _run_info(
    results: Path, modified: float, state_path: Path | None, summary: dict[str, Any] | None
) -> _RunInfo:
    when = datetime.fromtimestamp(modified).astimezone().isoformat(timespec="seconds")
    candidates = [state_path] if state_path is not None else _state_candidates(results)
    settings: dict[str, str] = {}
    found = None
    for candidate in candidates:
        meta = _read_state_meta(candidate)
        if meta is not None:
            settings, found = meta, candidate
            break
    for name in SETTINGS:  # the summary fills what the state does not tell
        value = (summary or {}).get(name)
        usable = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        if name not in settings and usable:
            settings[name] = str(value)
    return _RunInfo(when, settings, found or candidates[0], found is not None)


def _state_candidates(results: Path) -> list[Path]:
    """``RESULTS.state``; then the state of another output of the same run with the same stem
    (``run --out r.jsonl --out r.csv`` keeps it beside the first one: ``r.jsonl.state``)."""
    own = results.with_name(results.name + ".state")
    siblings = [
        results.with_name(results.stem + extension + ".state")
        for extension in FORMATS
        if extension != results.suffix.lower()
    ]
    return [own, *siblings]


def _read_state_meta(path: Path) -> dict[str, str] | None:
    """The run settings in a state file's ``meta`` table; ``None`` if there is no readable one.

    The state is opened read-only. A state that is in use (a ``-wal`` file beside it) is read
    through SQLite's locks; an idle one as immutable, which creates no ``-wal``/``-shm`` files
    beside it (a read-only connection could not remove them again)."""
    try:
        if not path.is_file():
            return None
        in_use = path.with_name(path.name + "-wal").exists()
        uri = path.absolute().as_uri() + ("?mode=ro" if in_use else "?mode=ro&immutable=1")
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=2)) as db:
            rows = db.execute("SELECT name, value FROM meta").fetchall()
    except (sqlite3.Error, OSError, ValueError):
        return None
    return {
        name: str(value)
        for name, value in rows
        if name in SETTINGS and isinstance(value, (str, int, float))
    }


# --- thumbnails -------------------------------------------------------------------------------


def _preview_file(row: _Doubtful, base: Path) -> Path | None:
    """The local file of ``row``: its ``path`` field, else (or if that is not found) ``source``
    tried against the current folder, where the run most likely was started, then against the
    results file's folder."""
    names = [row.path] if row.path is not None else []
    if not _URL.match(row.source):
        names.append(row.source)
    for name in names:
        found = _local_file(name, base)
        if found is not None:
            return found
    return None


def _local_file(name: str, base: Path) -> Path | None:
    for candidate in (Path(name), base / name):
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):  # ValueError: a NUL byte in the name
            continue
    return None


def _file_url(row: _Doubtful, found: Path | None, base: Path) -> str | None:
    """The ``file://`` URL the thumbnail links to: the file previewed, else the row's ``path``
    or ``source`` resolved against the results file's folder; ``None`` for a URL source."""
    if found is not None:
        target = found
    elif row.path is not None:
        target = base / row.path
    elif _URL.match(row.source):
        return None
    else:
        target = base / row.source
    # The exact bytes of the name (surrogateescape gives back a non-UTF-8 one), percent-encoded.
    return "file://" + quote(os.fsencode(os.path.abspath(target)), safe="/")


def _thumbnail(row: _Doubtful, found: Path | None, size: int) -> tuple[str | None, str]:
    """A ``data:`` URI of a small JPEG of ``found``, or ``None`` and why there is none.

    URLs are never fetched: the page must be buildable offline and must not leak that someone
    looked at it.
    """
    if found is None:
        if row.path is None and _URL.match(row.source):
            return None, "URL, not fetched"
        return None, "file not found"
    try:
        return "data:image/jpeg;base64," + _encode_thumbnail(found, size), ""
    # Any file can sit at a source path, and Pillow reports a bad one in many ways (OSError,
    # ValueError, SyntaxError, struct.error, DecompressionBombError…). A preview is decoration:
    # whatever goes wrong becomes a placeholder, never a failed report.
    except Exception as exc:
        return None, f"cannot preview: {type(exc).__name__}"


def _encode_thumbnail(path: Path, size: int) -> str:
    """Base64 of a JPEG at most ``size`` px on its longer side, upright, on white."""
    # catch_warnings is process-wide before Python 3.14; the report is built on one thread.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # odd EXIF, palette transparency…: not worth a word
        # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; decoding would still cost
        # hundreds of MB for a PNG, so treat the warning as the error it is for a preview.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            # JPEG only: let libjpeg decode at 1/2…1/8 scale, still at least ``size`` px.
            opened.draft("RGB", (size, size))
            image = ImageOps.exif_transpose(opened)
        image.thumbnail((size, size))
        image = _on_white(image)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _on_white(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit/float pixels: scale to 8 bits, or "RGB" conversion clips them to white.
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


# --- the page ---------------------------------------------------------------------------------

#: Fonts for text in any script, with no download: the platform's UI font, then common system
#: fonts that cover Latin, Cyrillic, Greek, CJK and Arabic (Linux: Noto, DejaVu; macOS; Windows).
FONT_FAMILIES = (
    'system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","DejaVu Sans","Noto Sans CJK SC",'
    '"Noto Sans CJK JP","Noto Sans CJK KR","Noto Sans Arabic","Noto Naskh Arabic","PingFang SC",'
    '"Hiragino Sans","Microsoft YaHei","Yu Gothic","Malgun Gothic",Tahoma,"Arial Unicode MS",'
    "sans-serif"
)
_MONO = 'ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,' + FONT_FAMILIES.replace(
    ",sans-serif", ",monospace"
)

_CSS = """
body{font:15px/1.45 FONTS;color:#1d2330;margin:0;background:#f4f5f7}
code{font-family:MONO;font-size:13px}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:16px 20px;margin:16px 0}
.muted{color:#5d6778}.note{background:#fff4d6;border:1px solid #f0d58a;border-radius:6px;
padding:8px 12px}
dl.run{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:2px 16px;margin:8px 0}
dl.run dt{font-size:14px}dl.run dd{font-size:14px;font-weight:400}
dl.figures{display:flex;flex-wrap:wrap;gap:12px;margin:0}
dl.figures div{min-width:140px;padding:8px 12px;border:1px solid #e4e7ec;border-radius:6px}
dt{font-size:13px;color:#5d6778}dd{margin:0;font-size:22px;font-weight:600}
table{border-collapse:collapse;margin-top:12px;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
td.error-count,td.status-count,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.name,code,.source,dl.run dd,li.class-row{overflow-wrap:anywhere}
svg{display:block;width:100%;height:auto;font:12px FONTS}
svg .bar{fill:#4c78a8}svg .none{fill:#b5bcc7}svg .bin{fill:#59a14f}svg .also{fill:#9dbbd9}
svg .axis{stroke:#8a93a3}svg text{fill:#1d2330}
ul.classes{columns:3 16em;margin:8px 0 0;padding-left:18px}
.thumbs{display:flex;flex-wrap:wrap;gap:12px}
figure.thumb,figure.label-error{margin:0;width:var(--size);font-size:12px}
figure.thumb img,figure.label-error img,.placeholder{display:block;width:var(--size);
height:var(--size);object-fit:contain;background:#eef0f3;border-radius:4px}
.placeholder{box-sizing:border-box;padding:8px;border:1px dashed #aab2bf;color:#5d6778;
overflow:hidden;overflow-wrap:anywhere}
figure a{display:block;color:inherit;text-decoration:none}
figure a:hover img,figure a:hover .placeholder{outline:2px solid #4c78a8}
figcaption{margin-top:4px;overflow-wrap:anywhere}
figcaption .source{color:#5d6778;display:block;max-height:4.4em;overflow:hidden}
ul.examples{margin:0;padding-left:18px}ul.examples .source{display:block;color:#5d6778}
.source,code,td.name,figcaption b,li.class-row{unicode-bidi:isolate}
svg .confusion-cell{fill:#4c78a8;stroke:#fff;stroke-width:1}svg text.light{fill:#fff}
svg text.zero{fill:#aab2bf}table.metrics td.class-metric{text-align:right;
font-variant-numeric:tabular-nums}
""".replace("MONO", _MONO).replace("FONTS", FONT_FAMILIES)


def _shown(text: str) -> str:
    """Text from the results, or a path, that can be written as UTF-8 (a non-UTF-8 file name
    keeps its undecodable bytes as surrogates: they are shown as ``\\xNN``)."""
    return valid_unicode(text)


def _h(text: str) -> str:
    """:func:`_shown`, HTML-escaped (quotes too: fit for text and attribute values)."""
    return escape(valid_unicode(text))


def _page(
    results_path: Path,
    tally: _Tally,
    summary: dict[str, Any] | None,
    run: _RunInfo,
    size: int,
    evaluation: dict[str, Any] | None = None,
    label_errors: int = 24,
) -> str:
    name = _h(results_path.name)
    base = results_path.resolve().parent
    sections = [
        _totals_section(tally),
        _classes_section(tally),
        _confidence_section(tally),
        *(
            [_evaluation_section(evaluation, tally, base, size, label_errors)]
            if evaluation is not None
            else []
        ),
        _review_section(tally, base, size),
        _errors_section(tally),
        _speed_section(tally, summary),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>batchclassify report: {name}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n<h1>Classification report</h1>\n"
        + _run_header(results_path, run)
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )


def _run_header(results_path: Path, run: _RunInfo) -> str:
    settings = run.settings
    rows = [
        ("Results file", f"<code>{_h(str(results_path))}</code>"),
        (
            "Results written",
            f'<time id="results-date" datetime="{run.modified}">{run.modified}</time>',
        ),
    ]
    if "model" in settings:
        rows.append(("Model", f'<span id="model">{_h(settings["model"])}</span>'))
    if "endpoint" in settings:
        endpoint = _h(_safe_url(settings["endpoint"]))
        rows.append(("Endpoint", f'<span id="endpoint">{endpoint}</span>'))
    if "confidence" in settings:
        value = settings["confidence"]
        shown = (
            '<span id="confidence-threshold">default</span> (the server\'s)'
            if value in ("", "None")
            else f'<span id="confidence-threshold">{_h(value)}</span>'
        )
        rows.append(("Confidence threshold", shown))
    if "max_size" in settings:
        value = settings["max_size"]
        shown = (
            '<span id="max-size">none</span> (images sent at their own size)'
            if value in ("", "None", "0")
            else f'<span id="max-size">{_h(value)}</span> px on the longer side'
        )
        rows.append(("Max size", shown))
    facts = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows)
    state = _h(str(run.state)) if run.state is not None else ""
    if run.state_read:
        origin = f'<p class="muted">Run settings from the state <code>{state}</code>.</p>'
    elif settings:
        origin = '<p class="muted">Run settings from the summary.</p>'
    else:
        origin = (
            f'<p class="muted">Run settings unknown: no readable state at <code>{state}</code> '
            "(give <code>--state PATH</code> or <code>--summary FILE.json</code>).</p>"
        )
    return f'<dl class="run">{facts}</dl>\n{origin}\n'


def _safe_url(url: str) -> str:
    """``url`` without user info or any other credential the patterns of :func:`redact` see."""
    # ValueError: not a URL urlsplit can take apart; redact still removes its user info.
    with contextlib.suppress(ValueError):
        url = without_userinfo(url)
    return redact(url)


def _figure(label: str, element_id: str, value: object, unit: str = "") -> str:
    return f'<div><dt>{label}</dt><dd><span id="{element_id}">{value}</span>{unit}</dd></div>'


def _totals_section(tally: _Tally) -> str:
    stats = tally.stats
    rate = f"{stats.failed / stats.total:.1%}" if stats.total else "–"
    notes = ""
    if tally.unreadable:
        where = ", ".join(str(n) for n in tally.unreadable_at)
        more = ", …" if tally.unreadable > len(tally.unreadable_at) else ""
        torn = (
            " The last line is incomplete: the run may have been killed, or still be writing."
            if tally.last_line_torn
            else ""
        )
        notes = (
            f'<p class="note">{tally.unreadable} unreadable lines (not a result record) were '
            f"skipped: line {where}{more}.{torn}</p>"
        )
    return (
        '<section id="totals-section">\n<h2>Totals</h2>\n<dl class="figures">'
        + _figure("Inputs", "total", stats.total)
        + _figure("OK", "ok", stats.ok)
        + _figure("Failed", "failed", stats.failed)
        + _figure("Failure rate", "failure-rate", rate)
        + _figure("Unreadable lines", "unreadable", tally.unreadable)
        + f"</dl>\n{notes}\n</section>"
    )


@dataclass(frozen=True, slots=True)
class _ClassCount:
    name: str
    count: int
    #: rows with the class among predicted_classes; ``None`` for single-label results
    predicted: int | None

    def attributes(self) -> str:
        extra = "" if self.predicted is None else f' data-predicted="{self.predicted}"'
        return f'data-class="{_h(self.name)}" data-count="{self.count}"{extra}'

    def text(self) -> str:
        also = "" if self.predicted is None else f" · {self.predicted} among predicted"
        return f"{self.count}{also}"


def _classes_section(tally: _Tally) -> str:
    no_class = f'<span id="no-class">{tally.no_class}</span>'
    classes = tally.stats.classes.most_common()
    if not classes and not tally.no_class:
        return (
            '<section id="classes-section">\n<h2>Class distribution</h2>\n'
            f'<p class="muted">No ok rows.</p>\n<span hidden>{no_class}</span>\n</section>'
        )
    multi = tally.multi_label
    counts = [_ClassCount(n, c, tally.predicted[n] if multi else None) for n, c in classes]
    if multi:  # classes predicted but never the top one
        counts += [
            _ClassCount(n, 0, c)
            for n, c in tally.predicted.most_common()
            if n not in tally.stats.classes
        ]
    shown, rest = counts[:CHART_CLASSES], counts[CHART_CLASSES:]
    chart = _bar_chart(shown, tally.no_class)
    listed = ""
    if rest:
        items = "".join(
            f'<li class="class-row" {row.attributes()}>{_h(row.name)}: {row.text()}</li>'
            for row in rest
        )
        listed = (
            f"<details><summary>{len(rest)} more classes ({sum(r.count for r in rest)} rows as "
            f'top class)</summary><ul class="classes">{items}</ul></details>'
        )
    explained = (
        "<p>Multi-label results: the dark bars and the first numbers count each ok row once, by "
        "its best class (<code>top</code>); the light bars under them and the second numbers "
        "count a row once for every class in its <code>predicted_classes</code>.</p>"
        if multi
        else ""
    )
    return (
        '<section id="classes-section">\n<h2>Class distribution</h2>\n'
        "<p>Ok rows by their best class (<code>top</code>), one per row.</p>\n"
        f"{explained}{chart}\n{listed}\n"
        f"<p>Ok rows with no class over the threshold (empty <code>top</code>): {no_class}</p>\n"
        "</section>"
    )


def _clipped(label: str, width: int = 30) -> str:
    """``label`` cut to about ``width`` Latin letters' worth (a CJK character counts two)."""
    used = 0
    for index, char in enumerate(label):
        used += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
        if used > width:
            return label[: max(index - 1, 1)] + "…"
    return label


def _bar_chart(classes: list[_ClassCount], no_class: int) -> str:
    """Horizontal bars, one per class (multi-label: a thin light one under it for the
    predicted_classes count), and a grey one for rows with no class; long labels are cut."""
    bars = [
        (row.name, row.count, row.predicted, "bar", f' class="class-bar" {row.attributes()}')
        for row in classes
    ]
    if no_class:
        bars.append(("(no class)", no_class, None, "none", ""))
    row_h, label_w, bar_w = 24, 230, 540
    height = row_h * len(bars) + 8
    top = max(max(count, predicted or 0) for _, count, predicted, _, _ in bars) or 1
    parts = []
    for i, (label, count, predicted, css, attributes) in enumerate(bars):
        y = 4 + i * row_h
        width = max(1.0, bar_w * count / top)
        if predicted is None:
            text, end, also = f"{count}", width, ""
            bar_h = row_h - 6
        else:
            text = f"{count} · {predicted}"
            also_w = max(1.0, bar_w * predicted / top)
            end, bar_h = max(width, also_w), row_h - 11
            also = (
                f'<rect class="also" x="{label_w}" y="{y + row_h - 7}" width="{also_w:.1f}" '
                'height="4"/>'
            )
        parts.append(
            f"<g{attributes}><title>{_h(label)}: {text}</title>"
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{_h(_clipped(label))}</text>'
            f'<rect class="{css}" x="{label_w}" y="{y + 3}" width="{width:.1f}" '
            f'height="{bar_h}"/>{also}'
            f'<text x="{label_w + end + 6:.1f}" y="{y + 16}">{text}</text></g>'
        )
    return (
        f'<svg viewBox="0 0 900 {height}" role="img" aria-label="rows per class">'
        + "".join(parts)
        + "</svg>"
    )


def _confidence_section(tally: _Tally) -> str:
    counted = sum(tally.bins)
    if not counted:
        return (
            '<section id="confidence-section">\n<h2>Confidence</h2>\n'
            '<p class="muted">No ok rows with a confidence.</p>\n</section>'
        )
    left, bottom, chart_w, chart_h = 50, 40, 820, 200
    width = chart_w / CONFIDENCE_BINS
    top = max(tally.bins)
    parts = [
        f'<line class="axis" x1="{left}" y1="{20 + chart_h}" x2="{left + chart_w}" '
        f'y2="{20 + chart_h}"/>'
    ]
    for i, count in enumerate(tally.bins):
        low, high = i / CONFIDENCE_BINS, (i + 1) / CONFIDENCE_BINS
        h = chart_h * count / top
        x = left + i * width
        parts.append(
            f"<g><title>{low:.1f}–{high:.1f}: {count}</title>"
            f'<rect class="bin" data-bin="{low:.1f}-{high:.1f}" data-count="{count}" '
            f'x="{x + 2:.1f}" y="{20 + chart_h - h:.1f}" width="{width - 4:.1f}" height="{h:.1f}"/>'
            f'<text x="{x + width / 2:.1f}" y="{14 + chart_h - h:.1f}" text-anchor="middle">'
            f"{count}</text></g>"
        )
    for i in range(CONFIDENCE_BINS + 1):
        x = left + i * width
        parts.append(
            f'<text x="{x:.1f}" y="{20 + chart_h + 18}" text-anchor="middle">'
            f"{i / CONFIDENCE_BINS:.1f}</text>"
        )
    parts.append(
        f'<text x="{left + chart_w / 2}" y="{20 + chart_h + bottom - 4}" text-anchor="middle">'
        "confidence of the top class</text>"
    )
    return (
        '<section id="confidence-section">\n<h2>Confidence</h2>\n'
        f"<p>Ok rows by the confidence of their best class ({counted} rows, "
        f"{CONFIDENCE_BINS} bins; 1.0 falls in the last).</p>\n"
        f'<svg viewBox="0 0 900 {20 + chart_h + bottom + 4}" role="img" '
        'aria-label="confidence histogram">' + "".join(parts) + "</svg>\n</section>"
    )


def _review_section(tally: _Tally, base: Path, size: int) -> str:
    doubtful = tally.least_confident()
    if not doubtful:
        return ""
    figures = []
    for row in doubtful:
        source = _h(row.source)
        figures.append(
            f'<figure class="thumb" data-source="{source}" data-confidence="{row.confidence}">'
            f"{_picture(row, base, size)}<figcaption><b>{_h(row.top) or '(no class)'}</b> "
            f'{row.confidence:.3f}<span class="source">{source}</span></figcaption></figure>'
        )
    return (
        '<section id="review-section">\n<h2>Least confident</h2>\n'
        f"<p>The {len(doubtful)} ok rows with the lowest confidence, lowest first: worth a look "
        "by a person (byte-identical copies of another input are left out; a click opens the "
        "file). URLs are not fetched.</p>\n"
        f'<div class="thumbs" style="--size:{size}px">' + "".join(figures) + "</div>\n</section>"
    )


def _picture(row: _Doubtful, base: Path, size: int) -> str:
    """The thumbnail of ``row`` (or a placeholder saying why there is none), linking to its
    file when it has a local one."""
    found = _preview_file(row, base)
    uri, why = _thumbnail(row, found, size)
    href = _file_url(row, found, base)
    source = _h(row.source)
    picture = (
        f'<img src="{uri}" alt="{source}" width="{size}" height="{size}">'
        if uri
        else f'<div class="placeholder">{escape(why)}<br><span class="source">{source}</span></div>'
    )
    if href is not None:
        picture = f'<a href="{escape(href)}" title="open the file">{picture}</a>'
    return picture


def _errors_section(tally: _Tally) -> str:
    failed = tally.stats.failed_by_type
    if not failed:
        return '<section id="errors-section">\n<h2>Errors</h2>\n<p>No failed rows.</p>\n</section>'
    by_type = []
    for error_type, count in failed.most_common():
        examples = "".join(
            f"<li><code>{_h(_shorten(redact(message)))}</code> "
            f'<span class="source">{_h(redact(where))}</span></li>'
            for message, where in tally.examples.get(error_type, [])
        )
        by_type.append(
            f'<tr><td class="name">{_h(error_type)}</td>'
            f'<td class="error-count" data-error-type="{_h(error_type)}">{count}</td>'
            f'<td><ul class="examples">{examples}</ul></td></tr>'
        )
    by_status = [
        f'<tr><td class="name">{_h(error_type)}</td><td>{status}</td>'
        f'<td class="status-count" data-error-type="{_h(error_type)}" '
        f'data-http-status="{status}">{count}</td></tr>'
        for (error_type, status), count in sorted(
            tally.by_status.items(), key=lambda item: (-item[1], item[0][0], item[0][1] or 0)
        )
        if status is not None
    ]
    statuses = (
        "<p>Failed rows that got an HTTP answer, by its status:</p>\n"
        '<table><tr><th>error.type</th><th>http_status</th><th class="num">rows</th></tr>\n'
        + "\n".join(by_status)
        + "\n</table>\n"
        if by_status
        else ""
    )
    return (
        '<section id="errors-section">\n<h2>Errors</h2>\n'
        '<table><tr><th>error.type</th><th class="num">rows</th><th>examples (and the input)'
        "</th></tr>\n" + "\n".join(by_type) + "\n</table>\n" + statuses + "</section>"
    )


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _speed_section(tally: _Tally, summary: dict[str, Any] | None) -> str:
    latency = tally.stats.latency
    figures = "".join(
        _figure(f"p{q}", f"latency-p{q}", _or_dash(latency.percentile(q)), " ms")
        for q in (50, 95, 99)
    )
    text = (
        f"<p><code>latency_ms</code> of the {latency.count} ok rows that record one, as the run "
        "measured it: from the first request to the answer, retries and their waits included.</p>"
    )
    if summary is None:
        run = (
            '<p class="muted">Throughput: unknown. Result rows carry no timestamps; give the '
            "<code>--summary FILE.json</code> the run wrote to show it.</p>"
        )
    else:
        run = _summary_part(tally, summary)
    return (
        '<section id="speed-section">\n<h2>Latency and throughput</h2>\n'
        f'{text}\n<dl class="figures">{figures}</dl>\n{run}\n</section>'
    )


def _summary_part(tally: _Tally, summary: dict[str, Any]) -> str:
    figures = (
        _figure("Elapsed", "elapsed", _or_dash(summary.get("elapsed_s")), " s")
        + _figure("Throughput", "images-per-s", _or_dash(summary.get("images_per_s")), " images/s")
        + _figure("Requests sent", "requests-sent", _or_dash(summary.get("requests_sent")))
    )
    notes = []
    total = summary.get("total")
    if isinstance(total, int) and total != tally.stats.total:
        notes.append(
            f'<p class="note" id="summary-mismatch">The summary counts {total} inputs, the results '
            f"file {tally.stats.total}: they may come from different runs.</p>"
        )
    if summary.get("interrupted"):
        notes.append('<p class="note">The run was interrupted.</p>')
    if summary.get("aborted"):
        notes.append(f'<p class="note">The run was aborted: {escape(str(summary["aborted"]))}</p>')
    return (
        "<p>From the run's summary: inputs processed per second of wall-clock time, "
        "retries and failures included.</p>\n"
        f'<dl class="figures">{figures}</dl>\n' + "\n".join(notes)
    )


def _or_dash(value: object) -> str:
    """A figure as text, escaped (summary files are user input too); missing as "–"."""
    if value is None:
        return "–"
    return escape(str(value))


# --- evaluation against labels ------------------------------------------------------------------


def evaluation_from_labels(
    results_path: Path,
    labels: LabelSource,
    *,
    label_error_threshold: float = 0.8,
) -> dict[str, Any]:
    """The evaluation of JSONL ``results_path`` against ``labels``, as ``batchclassify eval``
    writes it (:meth:`~batchclassify.evaluate.Evaluation.to_dict`)."""
    if FORMATS.get(results_path.suffix.lower()) != "jsonl":
        raise ConfigError(
            f"--labels needs JSONL results (only they keep every score), not "
            f"{_shown(str(results_path))!r}: report the .jsonl output of the run, or give "
            "--eval E.json written by 'batchclassify eval'"
        )
    result = evaluate(results_path, labels, label_error_threshold=label_error_threshold)
    return result.to_dict()


def read_evaluation(path: Path) -> dict[str, Any]:
    """The evaluation JSON that ``batchclassify eval --eval`` wrote, checked for the fields the
    page shows (raises :class:`ConfigError`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except OSError as exc:
        raise ConfigError(f"cannot read --eval {str(path)!r}: {exc.strerror or exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"--eval {str(path)!r} is not JSON: {exc}") from exc
    problem = _evaluation_problem(data)
    if problem:
        raise ConfigError(
            f"--eval {str(path)!r} is not an evaluation written by 'batchclassify eval': {problem}"
        )
    return dict(data)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _evaluation_problem(data: Any) -> str | None:
    """What makes ``data`` unfit for the page, or ``None``."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for key in ("rows", "labeled", "unlabeled", "failed", "no_prediction", "correct"):
        if not _is_count(data.get(key)):
            return f"{key!r} is not a count"
    if not _is_count(data.get("label_error_count")):
        return "'label_error_count' is not a count"
    if not isinstance(data.get("label_source"), str):
        return "'label_source' is not text"
    if not _is_number(data.get("label_error_threshold")):
        return "'label_error_threshold' is not a number"
    if not (data.get("accuracy") is None or _is_number(data.get("accuracy"))):
        return "'accuracy' is not a number"
    top_k = data.get("top_k_accuracy")
    if not isinstance(top_k, dict) or not all(
        v is None or _is_number(v) for v in (top_k.get(str(k)) for k in EVAL_TOP_K)
    ):
        return "'top_k_accuracy' is not {k: number}"
    for key in ("macro_avg", "weighted_avg"):
        average = data.get(key)
        if average is not None and not (
            isinstance(average, dict) and all(_is_number(average.get(m)) for m in _METRICS)
        ):
            return f"{key!r} is not {{precision, recall, f1}}"
    per_class = data.get("per_class")
    if not isinstance(per_class, dict) or not all(
        isinstance(m, dict)
        and all(_is_number(m.get(name)) for name in _METRICS)
        and _is_count(m.get("support"))
        and _is_count(m.get("predicted"))
        for m in per_class.values()
    ):
        return "'per_class' is not {class: {precision, recall, f1, support, predicted}}"
    confusion = data.get("confusion")
    labels = confusion.get("labels") if isinstance(confusion, dict) else None
    matrix = confusion.get("matrix") if isinstance(confusion, dict) else None
    if not (
        isinstance(labels, list)
        and all(isinstance(name, str) for name in labels)
        and isinstance(matrix, list)
        and len(matrix) == len(labels)
        and all(
            isinstance(row, list) and len(row) == len(labels) and all(map(_is_count, row))
            for row in matrix
        )
    ):
        return "'confusion' is not {labels, matrix} with a square matrix of counts"
    errors = data.get("label_errors")
    if not isinstance(errors, list) or not all(
        isinstance(error, dict)
        and all(isinstance(error.get(key), str) for key in ("source", "label", "top"))
        and isinstance(error.get("path"), (str, type(None)))
        and _is_number(error.get("confidence"))
        for error in errors
    ):
        return "'label_errors' is not a list of {source, path, label, top, confidence}"
    for key in ("unknown_labels", "never_predicted", "never_labeled"):
        names = data.get(key, [])
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            return f"{key!r} is not a list of class names"
    return None


#: the k of the top-k accuracies shown
EVAL_TOP_K = (1, 3, 5)
_METRICS = ("precision", "recall", "f1")


def _value(value: object) -> str:
    """A number of the evaluation exactly as its JSON writes it (``null`` as "–")."""
    return "–" if value is None else json.dumps(value)


def _evaluation_section(
    evaluation: dict[str, Any], tally: _Tally, base: Path, size: int, label_errors: int
) -> str:
    e = evaluation
    source = f"<code>{_h(e['label_source'])}</code>"
    top_k = e["top_k_accuracy"]
    macro, weighted = e["macro_avg"] or {}, e["weighted_avg"] or {}
    figures = (
        _figure("Accuracy", "accuracy", _value(e["accuracy"]))
        + "".join(
            _figure(f"Top-{k} accuracy", f"top{k}-accuracy", _value(top_k.get(str(k))))
            for k in EVAL_TOP_K
        )
        + _figure("Macro F1", "macro-f1", _value(macro.get("f1")))
        + _figure("Weighted F1", "weighted-f1", _value(weighted.get("f1")))
    )
    counts = (
        f'<p>Labels from {source}: <span id="labeled">{e["labeled"]}</span> ok rows with a label '
        f'scored, <span id="correct">{e["correct"]}</span> of them right (top class = label); '
        f'<span id="unlabeled">{e["unlabeled"]}</span> ok rows without a label and '
        f'<span id="eval-failed">{e["failed"]}</span> failed rows not scored. Averages over the '
        f'classes: precision <span id="macro-precision">{_value(macro.get("precision"))}</span>, '
        f'recall <span id="macro-recall">{_value(macro.get("recall"))}</span> (macro); '
        f'precision <span id="weighted-precision">{_value(weighted.get("precision"))}</span>, '
        f'recall <span id="weighted-recall">{_value(weighted.get("recall"))}</span> '
        "(weighted by support).</p>"
    )
    notes = []
    if e["rows"] != tally.stats.total:
        notes.append(
            f'<p class="note" id="evaluation-mismatch">The evaluation counts {e["rows"]} rows, '
            f"the results file {tally.stats.total}: they may come from different runs.</p>"
        )
    if not e["labeled"]:
        notes.append(f'<p class="note">No ok row has a label from {source}.</p>')
    for what, key in (
        ("Labels the model does not seem to know", "unknown_labels"),
        ("Labels never predicted", "never_predicted"),
        ("Predicted classes no row is labeled", "never_labeled"),
    ):
        names = e.get(key) or []
        if names:
            shown = ", ".join(
                f'<span class="source">{_h(name)}</span>' for name in names[:CHART_CLASSES]
            )
            more = len(names) - CHART_CLASSES
            notes.append(f"<p>{what}: {shown}{f' and {more} more' if more > 0 else ''}</p>")
    return (
        '<section id="evaluation-section">\n<h2>Evaluation</h2>\n'
        f'<dl class="figures">{figures}</dl>\n{counts}\n'
        + "\n".join(notes)
        + _metrics_table(e["per_class"])
        + _confusion_matrix(e["confusion"]["labels"], e["confusion"]["matrix"])
        + _label_errors_part(e, base, size, label_errors)
        + "\n</section>"
    )


def _metrics_table(per_class: dict[str, dict[str, Any]]) -> str:
    if not per_class:
        return ""
    rows = []
    for name, metrics in per_class.items():
        cells = "".join(
            f'<td class="class-metric" data-class="{_h(name)}" data-metric="{metric}">'
            f"{_value(metrics[metric])}</td>"
            for metric in (*_METRICS, "support", "predicted")
        )
        rows.append(f'<tr><td class="name">{_h(name)}</td>{cells}</tr>')
    table = (
        '<table class="metrics"><tr><th>class</th><th class="num">precision</th>'
        '<th class="num">recall</th><th class="num">F1</th><th class="num">support</th>'
        '<th class="num">predicted</th></tr>\n' + "\n".join(rows) + "\n</table>"
    )
    if len(rows) > CHART_CLASSES:  # folded away, not left out
        table = f"<details><summary>{len(rows)} classes</summary>{table}</details>"
    return (
        "\n<h3>Per class</h3>\n<p>Support: scored rows with the class as label; predicted: "
        f"scored rows with it as top class.</p>\n{table}\n"
    )


def _folded(labels: list[str], matrix: list[list[int]]) -> tuple[list[str], list[list[int]], int]:
    """The classes of the heatmap and its matrix: all of them, or the CHART_CLASSES - 1 with the
    most rows (as label or as top; JSON order kept) and "" for the others, summed; and how
    many were folded."""
    if len(labels) <= CHART_CLASSES:
        return labels, matrix, 0
    rows = [
        sum(matrix[i]) + sum(row[i] for row in matrix) - matrix[i][i] for i in range(len(labels))
    ]
    ranked = sorted(range(len(labels)), key=lambda i: (-rows[i], labels[i]))
    kept = sorted(ranked[: CHART_CLASSES - 1])
    where = {index: position for position, index in enumerate(kept)}
    other = len(kept)
    folded = [[0] * (other + 1) for _ in range(other + 1)]
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            folded[where.get(i, other)][where.get(j, other)] += count
    return [labels[i] for i in kept] + [""], folded, len(labels) - len(kept)


def _confusion_matrix(labels: list[str], matrix: list[list[int]]) -> str:
    """A heatmap: a row per label, a column per predicted class; each cell shaded by its share
    of its row, with its count."""
    if not labels:
        return ""
    names, cells, folded = _folded(labels, matrix)
    n = len(names)
    label_w, head_h = 200, 150
    cell = min(48.0, (880 - label_w) / n)
    font = max(7.0, min(12.0, cell / 2.6))
    parts = [
        f'<text x="{label_w + n * cell / 2:.1f}" y="14" text-anchor="middle">predicted →</text>',
        f'<text x="4" y="{head_h - 8}">label ↓</text>',
    ]
    for j, name in enumerate(names):
        shown = _h(_clipped(name, 22)) if name else f"other ({folded})"
        full = _h(name) if name else f"{folded} other classes"
        x = label_w + j * cell + cell / 2 + font / 3
        parts.append(
            f"<g><title>{full}</title>"
            f'<text transform="translate({x:.1f},{head_h - 6}) rotate(-60)" '
            f'font-size="{font:.1f}">{shown}</text></g>'
        )
    for i, name in enumerate(names):
        y = head_h + i * cell
        shown = _h(_clipped(name, 26)) if name else f"other ({folded})"
        parts.append(
            f"<g><title>{_h(name) if name else f'{folded} other classes'}</title>"
            f'<text x="{label_w - 6}" y="{y + cell / 2 + font / 3:.1f}" text-anchor="end" '
            f'font-size="{font:.1f}">{shown}</text></g>'
        )
        total = sum(cells[i])
        for j, count in enumerate(cells[i]):
            share = count / total if total else 0.0
            x = label_w + j * cell
            text_class = (
                ' class="light"' if share > 0.55 else (' class="zero"' if not count else "")
            )
            parts.append(
                f'<rect class="confusion-cell" data-label="{_h(name)}" '
                f'data-predicted="{_h(names[j])}" data-count="{count}" x="{x:.1f}" y="{y:.1f}" '
                f'width="{cell:.1f}" height="{cell:.1f}" fill-opacity="{0.04 + 0.96 * share:.3f}"/>'
                f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + font / 3:.1f}" '
                f'text-anchor="middle" font-size="{font:.1f}"{text_class}>{count}</text>'
            )
    note = (
        f'<p class="note" id="confusion-folded">{len(labels)} classes: the {n - 1} with the most '
        f"rows are drawn, the other {folded} are folded into “other”.</p>\n"
        if folded
        else ""
    )
    height = head_h + n * cell + 8
    return (
        "\n<h3>Confusion matrix</h3>\n<p>A row per label, a column per predicted (top) class; a "
        "cell's shade is its share of its row, its text the number of rows.</p>\n"
        f'{note}<svg viewBox="0 0 900 {height:.0f}" role="img" aria-label="confusion matrix">'
        + "".join(parts)
        + "</svg>\n"
    )


def _label_errors_part(evaluation: dict[str, Any], base: Path, size: int, keep: int) -> str:
    threshold = _value(evaluation["label_error_threshold"])
    count = evaluation["label_error_count"]
    errors = evaluation["label_errors"][:keep]
    text = (
        f'\n<h3>Likely label errors</h3>\n<p><span id="label-error-count">{count}</span> scored '
        "rows have a top class other than their label with a confidence of at least "
        f'<span id="label-error-threshold">{threshold}</span>'
    )
    if not errors:
        return text + ".</p>\n"
    figures = []
    for error in errors:
        row = _Doubtful(error["source"], error["top"], error["confidence"], error["path"])
        confidence = _value(error["confidence"])
        figures.append(
            f'<figure class="label-error" data-source="{_h(error["source"])}" '
            f'data-label="{_h(error["label"])}" data-top="{_h(error["top"])}" '
            f'data-confidence="{confidence}">{_picture(row, base, size)}'
            f"<figcaption><b>{_h(error['label'])}</b> → <b>{_h(error['top'])}</b> "
            f'{confidence}<span class="source">{_h(error["source"])}</span></figcaption></figure>'
        )
    return (
        f"{text}; the most confident of them, most confident first (label → top class and "
        "its confidence):</p>\n"
        f'<div class="thumbs" style="--size:{size}px">' + "".join(figures) + "</div>\n"
    )

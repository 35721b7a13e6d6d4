"""Where results go: JSONL, CSV, JSONL on stdout, or nowhere. Every sink has the same shape:
``write()`` a result, ``flush()`` now and then, ``aclose()`` at the end.

Results are formatted into whole lines in memory and handed to the file in one write per flush
(through aiofiles, so a slow disk never stalls the event loop). A line is therefore either
written whole or not at all on every normal exit, and a hard crash can at worst leave one torn
last line, which ``--resume`` repairs. Each sink counts the rows it was given
(``rows_received``) and those it has really written (``rows_written``): the runner checks both
against the rows it committed once the sink is closed.

Every format is written from :meth:`Result.to_dict`, so every string is valid Unicode; JSON is
strict (no NaN); CSV cells that a spreadsheet would run as a formula are neutralised
(:func:`batchclassify.text.csv_cell`), while JSONL and Parquet keep exact values.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import errno
import io
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import aiofiles
from aiofiles.threadpool.text import AsyncTextIOWrapper

from batchclassify.errors import ConfigError, RunAborted
from batchclassify.model import CSV_COLUMNS, Result, record_json
from batchclassify.text import csv_cell

__all__ = [
    "CSV_COLUMNS",
    "CsvSink",
    "JsonlSink",
    "NullSink",
    "ParquetSink",
    "Sink",
    "StdoutSink",
    "check_outputs",
    "csv_line",
    "open_sinks",
    "repair_output",
    "result_to_csv_row",
]

STDOUT = "-"
OpenMode = Literal["w", "a", "x"]


class Sink(Protocol):
    """Anything results can be written to."""

    async def write(self, result: Result) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


def result_to_csv_row(result: Result) -> list[Any]:
    """One CSV row in :data:`CSV_COLUMNS` order, then the kept list columns
    (``--keep-columns``) in their order, then ``label`` and ``correct`` with ``--labels``;
    predicted classes are ``;``-joined; no cell can start a spreadsheet formula."""
    record = result.to_dict()
    error = record["error"] or {}
    image = record["image"] or {}
    row = [
        record["source"],
        record["status"],
        record["top"],
        record["confidence"],
        ";".join(record["predicted_classes"]),
        error.get("message"),
        error.get("type"),
        error.get("http_status"),
        record["attempts"],
        record["latency_ms"],
        image.get("width"),
        image.get("height"),
        record["inference_id"],
        record["duplicate_of"],
        record["path"],
        *(record.get("columns") or {}).values(),
        *((record["label"], record["correct"]) if "label" in record else ()),
    ]
    return [csv_cell("" if value is None else value) for value in row]


def _jsonl_line(result: Result) -> str:
    return record_json(result) + "\n"


class _BufferedFileSink:
    """Formats results into text in memory; one file write per flush."""

    def __init__(self, path: Path, handle: AsyncTextIOWrapper) -> None:
        self.path = path
        self._handle = handle
        self._pending: list[str] = []
        # aiofiles writes from a thread pool: two flushes in flight could land out of order.
        self._flushing = asyncio.Lock()
        #: result rows given to :meth:`write`, and those handed to the file (no header)
        self.rows_received = 0
        self.rows_written = 0
        self._rows_pending = 0

    def _format(self, result: Result) -> str:
        raise NotImplementedError

    async def write(self, result: Result) -> None:
        self._pending.append(self._format(result))
        self._rows_pending += 1
        self.rows_received += 1

    async def flush(self) -> None:
        async with self._flushing:
            if not self._pending:
                return
            text = "".join(self._pending)
            rows = self._rows_pending
            self._pending.clear()
            self._rows_pending = 0
            try:
                await self._handle.write(text)
                await self._handle.flush()
            except OSError as exc:
                raise RunAborted(
                    f"cannot write output {str(self.path)!r}: {exc.strerror or exc}"
                ) from None
            # Counted only once written: rows lost on the way (a cancelled flush) show up as
            # a difference the runner reports, instead of vanishing.
            self.rows_written += rows

    async def aclose(self) -> None:
        error: RunAborted | None = None
        try:
            await self.flush()
            # Results are the product: make sure they reach the disk, not just the page cache.
            await asyncio.to_thread(_fsync, self._handle.fileno())
        except RunAborted as exc:
            error = exc
        try:
            await self._handle.close()
        except OSError as exc:
            error = error or RunAborted(
                f"cannot write output {str(self.path)!r}: {exc.strerror or exc}"
            )
        if error is not None:
            raise error


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
            raise RunAborted(f"cannot write an output to disk: {exc.strerror}") from None
        # A pipe, a device or a file system without fsync: nothing more can be done.


class JsonlSink(_BufferedFileSink):
    """One JSON object per line, the full result record."""

    @classmethod
    async def open(cls, path: Path, *, mode: OpenMode, columns: Sequence[str] = ()) -> JsonlSink:
        return cls(path, await aiofiles.open(path, mode, encoding="utf-8"))

    def _format(self, result: Result) -> str:
        return _jsonl_line(result)


class CsvSink(_BufferedFileSink):
    """One row per result in :data:`CSV_COLUMNS` plus the kept list ``columns``; a header when
    the file starts empty."""

    @classmethod
    async def open(cls, path: Path, *, mode: OpenMode, columns: Sequence[str] = ()) -> CsvSink:
        handle = await aiofiles.open(path, mode, encoding="utf-8", newline="")
        sink = cls(path, handle)
        if await asyncio.to_thread(_is_empty, path):
            sink._pending.append(csv_line([*CSV_COLUMNS, *map(csv_cell, columns)]))
        return sink

    def _format(self, result: Result) -> str:
        return csv_line(result_to_csv_row(result))


def csv_line(row: Iterable[Any]) -> str:
    """One CSV row ending in ``\\n``, every cell holding a CR or LF quoted. (The csv module
    quotes only the characters of its line terminator: with ``\\n`` alone a bare CR in a cell
    would end the row for most readers.)"""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(row)
    return buffer.getvalue()[:-2] + "\n"


class StdoutSink:
    """JSONL on standard output (``--out -``), for piping into ``jq`` and friends."""

    def __init__(self) -> None:
        self._pending: list[str] = []
        self.rows_received = 0
        self.rows_written = 0
        # A terminal may act on raw C1 controls (U+009B starts an escape sequence): escape all.
        self._ascii = sys.stdout.isatty()

    async def write(self, result: Result) -> None:
        self._pending.append(record_json(result, ascii=self._ascii) + "\n")
        self.rows_received += 1

    async def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        rows = len(self._pending)
        self._pending.clear()
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            # `... | head`: the reader is gone, and classifying more would only spend credits.
            raise RunAborted("standard output was closed by the reader: stopping") from None
        self.rows_written += rows

    async def aclose(self) -> None:
        await self.flush()


class ParquetSink:
    """The JSONL rows as a Parquet table (needs ``pyarrow``: ``pip install
    'batchclassify[parquet]'``), for pandas, Polars and DuckDB.

    Columns are flat (``error`` and ``image`` spread into their fields; ``predictions`` is a
    map). Rows are written in row groups of :attr:`ROW_GROUP` as they come, to a ``.partial``
    file renamed into place on close: a Parquet file is unreadable until its footer is written,
    so a crash leaves the previous file (or none), never a broken one. It cannot be appended
    to either, so a resumed run rewrites it from the state.
    """

    ROW_GROUP = 10_000

    def __init__(self, path: Path, *, overwrite: bool) -> None:
        pa, pq = _pyarrow()
        if path.exists() and not overwrite:
            raise FileExistsError(path)
        self.path = path
        self._partial = path.with_name(path.name + ".partial")
        self._schema = pa.schema(
            [
                ("source", pa.string()),
                ("status", pa.string()),
                ("top", pa.string()),
                ("confidence", pa.float64()),
                ("predicted_classes", pa.list_(pa.string())),
                ("predictions", pa.map_(pa.string(), pa.float64())),
                ("width", pa.int32()),
                ("height", pa.int32()),
                ("inference_id", pa.string()),
                ("time", pa.float64()),
                ("error_type", pa.string()),
                ("error_message", pa.string()),
                ("http_status", pa.int32()),
                ("attempts", pa.int32()),
                ("latency_ms", pa.float64()),
                ("duplicate_of", pa.string()),
                ("source_bytes", pa.binary()),
                ("path", pa.string()),
                ("columns", pa.map_(pa.string(), pa.string())),
                ("label", pa.string()),
                ("correct", pa.bool_()),
            ]
        )
        self._writer = pq.ParquetWriter(self._partial, self._schema)
        self._rows: list[dict[str, Any]] = []
        self.rows_received = 0
        self.rows_written = 0

    @classmethod
    async def open(cls, path: Path, *, mode: OpenMode, columns: Sequence[str] = ()) -> ParquetSink:
        return await asyncio.to_thread(lambda: cls(path, overwrite=mode != "x"))

    async def write(self, result: Result) -> None:
        self.rows_received += 1
        record = result.to_dict()
        error = record["error"] or {}
        image = record["image"] or {}
        raw = record.get("source_bytes")
        self._rows.append(
            {
                "source": record["source"],
                "status": record["status"],
                "top": record["top"],
                "confidence": record["confidence"],
                "predicted_classes": record["predicted_classes"],
                "predictions": list(record["predictions"].items()),
                "width": image.get("width"),
                "height": image.get("height"),
                "inference_id": record["inference_id"],
                "time": record["time"],
                "error_type": error.get("type"),
                "error_message": error.get("message"),
                "http_status": error.get("http_status"),
                "attempts": record["attempts"],
                "latency_ms": record["latency_ms"],
                "duplicate_of": record["duplicate_of"],
                "source_bytes": base64.b64decode(raw) if raw else None,
                "path": record["path"],
                "label": record.get("label"),
                "correct": record.get("correct"),
                "columns": None
                if record.get("columns") is None
                else [
                    (name, value if isinstance(value, str) or value is None else json.dumps(value))
                    for name, value in record["columns"].items()
                ],
            }
        )

    async def flush(self) -> None:
        if len(self._rows) >= self.ROW_GROUP:
            await self._write_rows()

    async def _write_rows(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        pa, _ = _pyarrow()
        try:
            table = pa.Table.from_pylist(rows, schema=self._schema)
            await asyncio.to_thread(self._writer.write_table, table)
        except (pa.ArrowException, OSError) as exc:
            raise RunAborted(f"cannot write output {str(self.path)!r}: {exc}") from None
        self.rows_written += len(rows)

    async def aclose(self) -> None:
        await self._write_rows()
        try:
            await asyncio.to_thread(self._writer.close)
            await asyncio.to_thread(os.replace, self._partial, self.path)
        except OSError as exc:
            raise RunAborted(f"cannot write output {str(self.path)!r}: {exc}") from None


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError(
            "writing .parquet needs pyarrow: pip install 'batchclassify[parquet]'"
        ) from None
    return pyarrow, pyarrow.parquet


class NullSink:
    """Discards results (benchmarks, or when only the summary matters)."""

    async def write(self, result: Result) -> None:
        pass

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def check_outputs(specs: Sequence[str], *, overwrite: bool, append: bool = False) -> None:
    """Refuse, before anything is sent, to clobber existing files or write an unknown format."""
    seen: set[str] = set()
    for spec in specs:
        if spec == STDOUT:
            # Two stdout sinks would write every record twice into the same stream.
            if STDOUT in seen:
                raise ConfigError("--out - (stdout) is given twice: give it once")
            seen.add(STDOUT)
            continue
        path = Path(spec)
        suffix = path.suffix.lower()
        if suffix not in _OPENERS:
            raise ConfigError(
                f"cannot tell the format of output {spec!r}: use a .jsonl, .csv or .parquet "
                "file name"
            )
        if suffix == ".parquet":
            _pyarrow()
        resolved = str(path.resolve())
        if resolved in seen:
            raise ConfigError(f"output {spec!r} is given twice")
        seen.add(resolved)
        if path.is_dir():
            raise ConfigError(f"output {spec!r} is a directory")
        if not path.parent.is_dir():
            raise ConfigError(f"the folder for output {spec!r} does not exist")
        if path.exists() and not (overwrite or append):
            raise ConfigError(
                f"output {spec!r} already exists; pass --overwrite to replace it "
                "(or choose another --out)"
            )


async def open_sinks(
    specs: Sequence[str],
    *,
    overwrite: bool = False,
    append: bool = False,
    columns: Sequence[str] = (),
) -> list[Sink]:
    """Open every ``--out``; ``x`` mode makes a file that appeared meanwhile an error too.
    ``columns`` are the list columns kept in each row (``--keep-columns``)."""
    check_outputs(specs, overwrite=overwrite, append=append)
    mode: OpenMode = "a" if append else ("w" if overwrite else "x")
    sinks: list[Sink] = []
    try:
        for spec in specs:
            if spec == STDOUT:
                sinks.append(StdoutSink())
                continue
            path = Path(spec)
            try:
                opener = _OPENERS[path.suffix.lower()]
                sinks.append(await opener(path, mode=mode, columns=columns))
            except FileExistsError:
                raise ConfigError(
                    f"output {spec!r} already exists; pass --overwrite to replace it"
                ) from None
            except OSError as exc:
                raise ConfigError(f"cannot write output {spec!r}: {exc.strerror}") from None
    except BaseException:
        for sink in sinks:
            await sink.aclose()
        raise
    return sinks


_OPENERS: dict[str, Callable[..., Awaitable[Sink]]] = {
    ".jsonl": JsonlSink.open,
    ".ndjson": JsonlSink.open,
    ".csv": CsvSink.open,
    ".parquet": ParquetSink.open,
}


def _is_empty(path: Path) -> bool:
    return path.stat().st_size == 0


def repair_output(path: Path) -> int:
    """Cut a JSONL or CSV output back to its last complete row; return how many data rows it
    holds. A crash can tear the last row only, since rows are appended by one writer. Parquet
    cannot be appended to: 0, so that it is rewritten whole."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return 0
    if suffix == ".csv":
        return _repair_csv(path)
    return _repair_jsonl(path)


#: bytes read at a time when repairing an output: memory stays flat for any output size
_REPAIR_CHUNK = 1 << 24


def _repair_jsonl(path: Path) -> int:
    rows = 0
    end = 0
    offset = 0
    with path.open("rb+") as handle:
        while chunk := handle.read(_REPAIR_CHUNK):
            count = chunk.count(b"\n")
            if count:
                rows += count
                end = offset + chunk.rfind(b"\n") + 1
            offset += len(chunk)
        if end != offset:
            handle.truncate(end)
    return rows


def _repair_csv(path: Path) -> int:
    """Rows may hold quoted newlines: a newline ends a row only outside quotes, i.e. when the
    quotes seen so far are even in number (``""`` escapes count twice, so they cancel)."""
    rows = 0
    quotes = 0
    end = 0
    position = 0  # end of the last whole line seen
    tail = b""  # the bytes after the last newline, carried into the next chunk
    with path.open("rb+") as handle:
        while chunk := handle.read(_REPAIR_CHUNK):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                position += len(line) + 1
                quotes += line.count(b'"')
                if quotes % 2 == 0:
                    rows += 1
                    end = position
        if end != position + len(tail):
            handle.truncate(end)
    return max(rows - 1, 0)  # the header

"""``batchclassify verify``: check a run against its state, sending nothing.

The state is the source of truth and every output a view of it (ARCHITECTURE.md), so a run is
complete and consistent when:

- each JSONL output is exactly the state's rows in commit order, one whole line each;
- each CSV output is its header and then the same rows in CSV form;
- each Parquet output has the same sources and statuses in the same order;
- with sources given (the run's own command line), every input has a row in the state; a file
  changed since (size or modification time) counts as not done, as a resume would see it.

Rows that failed are rows: they are counted and reported, and do not make a run incomplete.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

from batchclassify.config import RunSettings
from batchclassify.errors import ConfigError
from batchclassify.model import Result
from batchclassify.sinks import CSV_COLUMNS, STDOUT, csv_line, result_to_csv_row
from batchclassify.sources import SourceOptions, iter_items, parse_extensions
from batchclassify.state import StateLock, StateReader, in_shard, item_key, parse_shard
from batchclassify.text import valid_unicode

__all__ = ["VerifyReport", "verify", "verify_command"]

#: differing rows named one by one before the rest are only counted
_SHOWN = 5


@dataclass
class VerifyReport:
    """What a check found: ``lines`` to show, and whether the run is complete."""

    lines: list[str] = field(default_factory=list)
    complete: bool = True

    def problem(self, text: str) -> None:
        self.complete = False
        self.lines.append(f"  MISSING/WRONG: {text}")


def verify_command(settings: RunSettings, *, say: Callable[[str], None]) -> int:
    """The CLI's ``verify``: print the report; exit 0 (complete), 1 (not complete)."""
    report = verify(settings)
    for line in report.lines:
        say(line)
    say("verified: complete" if report.complete else "verified: NOT complete (see above)")
    return 0 if report.complete else 1


def verify(settings: RunSettings) -> VerifyReport:
    outputs = [spec for spec in settings.out if spec != STDOUT]
    path = settings.job_state(outputs).path
    if path is None:
        raise ConfigError("verify needs the run's --out files (or its --state)")
    if not path.exists():
        raise ConfigError(
            f"there is no state at {str(path)!r}: verify checks runs made with a state "
            "(give the run's --out, or --state)"
        )
    lock = StateLock(path)
    lock.acquire()  # a run still writing would be a moving target
    reader = StateReader(path)
    try:
        report = VerifyReport()
        rows = reader.count()
        report.lines.append(f"state {path}: {rows} rows")
        for spec in outputs:
            _check_output(Path(spec), reader, report)
        if settings.sources:
            _check_inputs(settings, reader, report)
        return report
    finally:
        reader.close()
        lock.release()


def _check_output(path: Path, reader: StateReader, report: VerifyReport) -> None:
    if not path.exists():
        report.problem(f"{path}: the output does not exist")
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        found = _parquet_rows(path)
    elif suffix == ".csv":
        found = _csv_rows(path)
    else:
        found = _jsonl_rows(path)
    expected = (_expected(suffix, record) for record in reader.record_texts())
    differing: list[int] = []
    count = 0
    state_rows = 0
    for number, (want, got) in enumerate(zip_longest(expected, found), start=1):
        state_rows += want is not None
        count += got is not None
        if want != got:
            differing.append(number)
    name = str(path)
    if not differing:
        report.lines.append(f"  {name}: {count} rows, the same as the state")
        return
    if count < state_rows and differing[0] == count + 1:
        report.problem(
            f"{name}: holds {count} of the state's {state_rows} rows (run the same command "
            "with --resume to complete it)"
        )
        return
    shown = ", ".join(map(str, differing[:_SHOWN]))
    more = f" and {len(differing) - _SHOWN} more" if len(differing) > _SHOWN else ""
    report.problem(
        f"{name}: {len(differing)} rows differ from the state (rows {shown}{more}); "
        f"{count} rows against {state_rows} in the state"
    )


def _expected(suffix: str, record: str) -> str:
    """The state's row as the output of that format should hold it."""
    if suffix == ".parquet":
        data = json.loads(record)
        return f"{data['source']}\t{data['status']}"
    if suffix == ".csv":
        row = result_to_csv_row(Result.from_dict(json.loads(record)))
        return csv_line([str(cell) for cell in row])
    return record


def _jsonl_rows(path: Path) -> Iterator[str]:
    with path.open("rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                yield "<a torn last line>"
                return
            yield line[:-1].decode("utf-8", "replace")


def _csv_rows(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header is not None and tuple(header[: len(CSV_COLUMNS)]) != CSV_COLUMNS:
            yield "<not the CSV header of batchclassify>"
            return
        for row in rows:
            yield csv_line(row)


def _parquet_rows(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "checking .parquet needs pyarrow: pip install 'batchclassify[parquet]'"
        ) from None
    table = pq.ParquetFile(path)
    for batch in table.iter_batches(columns=["source", "status"]):
        for row in batch.to_pylist():
            yield f"{row['source']}\t{row['status']}"


def _check_inputs(settings: RunSettings, reader: StateReader, report: VerifyReport) -> None:
    options = SourceOptions(extensions=parse_extensions(settings.ext), column=settings.column)
    shard = parse_shard(settings.shard) if settings.shard else None
    seen = done = failed = missing = 0
    examples: list[str] = []  # a few, not all: the input may be millions of lines
    for item in iter_items(settings.sources, options):
        if shard is not None and not in_shard(item.source, shard):
            continue
        seen += 1
        status = reader.status(item_key(item))
        if status is None:
            missing += 1
            if len(examples) < _SHOWN:
                examples.append(item.source)
        else:
            done += 1
            failed += status != "ok"
    line = f"  inputs: {seen}, with a row: {done} ({failed} of them failed)"
    report.lines.append(line)
    if missing:
        shown = ", ".join(repr(valid_unicode(source)) for source in examples)
        more = f" and {missing - len(examples)} more" if missing > len(examples) else ""
        report.problem(
            f"{missing} inputs have no row, or changed since: {shown}{more} (run the same "
            "command with --resume to do them)"
        )
    if failed:
        report.lines.append(
            f"  {failed} inputs failed: their rows say why; --resume --retry-failed tries "
            "them again"
        )

"""``batchclassify eval``: score finished results against ground-truth labels.

Every JSONL row keeps the model's best class (``top``/``confidence``) and the whole
distribution it returned (``predictions``), so accuracy, top-k accuracy, per-class metrics, the
confusion matrix and likely label errors need no request. The results are streamed line by line:
memory grows with the number of classes (the confusion matrix is classes²), with a label file's
entries, and with at most ``max_label_errors`` kept label errors, never with the rows.

Ground truth (``--labels``, a :class:`LabelSource`):

* ``parent``: the name of the folder holding the file (from the row's ``path``, else its
  ``source``; a URL's last folder); a file with no parent folder has no label.
* ``column:NAME``: the row's ``columns[NAME]`` (a list column kept with ``--keep-columns``).
* ``FILE.csv`` / ``FILE.jsonl``: a label file. The image is named by the first of the columns
  (fields) ``path``, ``source``, ``image``, ``url``, ``file_name`` it has; the label is
  ``label`` or ``class`` (or ``--column-label NAME``). An entry matches a row when it equals the
  row's ``source``, or its ``path``, or when the entry, resolved relative to the label file's
  folder, equals the row's (absolute) ``path``. One image labeled twice differently is an error;
  an empty label means "no label". (A file literally named ``parent`` is given as ``./parent``.)

Which rows are scored: failed rows (``status`` not ``ok``) and ok rows without a label are
counted, not scored; every ok row with a label is scored, its prediction being ``top`` (also for
multi-label models). A scored row without a ``top`` (an empty answer) counts in ``no_prediction``
and in its label's support, as a miss, and is not in the confusion matrix.

The JSON written by ``--eval`` (:meth:`Evaluation.to_dict`), keys always present, in this order:

``label_source``
    the ``--labels`` spec (``parent``, ``column:NAME`` or the label file as given).
``rows``, ``labeled``, ``unlabeled``, ``failed``, ``no_prediction``, ``correct``
    counts: ``rows = labeled + unlabeled + failed``; ``labeled`` rows are the scored ones;
    ``correct`` of them have ``top == label``.
``accuracy``
    ``correct / labeled`` (``null`` when nothing is labeled).
``top_k_accuracy``
    ``{"1": .., "3": .., "5": ..}``: the share of scored rows whose label is among the k best
    classes: ``top`` first, then the other classes of ``predictions`` by score (ties by name).
    ``"1"`` therefore equals ``accuracy``.
``macro_avg``, ``weighted_avg``
    ``{"precision", "recall", "f1"}``: the unweighted mean over every class of ``per_class``,
    and the mean weighted by support (``null`` when nothing is labeled).
``per_class``
    ``{class: {"precision", "recall", "f1", "support", "predicted"}}`` for every class that is a
    label or a predicted ``top`` of a scored row, sorted by name. ``support``: scored rows with
    that label; ``predicted``: scored rows with that top. A ratio with a zero denominator is 0
    (as scikit-learn's ``zero_division=0``), so a class only ever predicted has recall 0.
``confusion``
    ``{"labels": [...], "matrix": [[...]]}``: ``matrix[i][j]`` counts scored rows labeled
    ``labels[i]`` whose top is ``labels[j]``; ``labels`` are the classes of ``per_class``.
``unknown_labels``
    labels that appear in no ok row's ``predictions`` nor ``top``: classes the model seems not
    to have at all (often a spelling: ``Cat`` for ``cat``).
``never_predicted``
    labels that are the top of no scored row.
``never_labeled``
    tops of scored rows that are no row's label.
``unmatched_label_entries``
    label-file entries that matched no row (``null`` for ``parent`` and ``column:NAME``).
``label_error_threshold``, ``label_error_count``, ``label_errors``
    likely label errors: scored rows whose top differs from the label with ``confidence`` at or
    above the threshold; the count of all of them, and the most confident ones (at most
    ``max_label_errors``, 1000 by default) as ``{"source", "path", "label", "top",
    "confidence"}``, by confidence, highest first, ties in row order.

Numbers: every computed ratio (accuracies, precision, recall, F1, averages) is rounded to 6
decimal places (:data:`DIGITS`) in the JSON, and only there; values copied from the rows
(``confidence``) and the threshold are written exactly; counts are integers.

Python API::

    from batchclassify.evaluate import LabelSource, evaluate

    evaluation = evaluate(Path("r.jsonl"), LabelSource.parse("parent"))
    evaluation.accuracy, evaluation.to_dict()

* :meth:`LabelSource.parse` reads a ``--labels`` spec; :func:`labels_for` turns a source into a
  :data:`Labeler` (a result -> its label or ``None``; a label file is read at once, so its
  errors come before any row).
* :class:`Evaluator` scores results one at a time (``add``, then ``finish``), e.g. as a run
  writes them; :func:`evaluate` streams a JSONL results file through one.
* :func:`check_output`, :func:`write_evaluation` and :func:`summary_lines` are what the
  command does with an :class:`Evaluation`.

Every problem with the inputs raises :class:`~batchclassify.errors.ConfigError` (exit 2).
"""

from __future__ import annotations

import csv
import heapq
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from batchclassify.errors import ConfigError
from batchclassify.model import Result, read_results
from batchclassify.text import valid_unicode

__all__ = [
    "DIGITS",
    "LABEL_COLUMNS",
    "LABEL_KEY_COLUMNS",
    "MAX_LABEL_ERRORS",
    "TOP_K",
    "ClassMetrics",
    "Evaluation",
    "Evaluator",
    "FileLabels",
    "LabelError",
    "LabelSource",
    "Labeler",
    "check_output",
    "evaluate",
    "labels_for",
    "summary_lines",
    "write_evaluation",
]

#: the columns (fields) of a label file that name the image, tried in this order
LABEL_KEY_COLUMNS = ("path", "source", "image", "url", "file_name")
#: the columns (fields) of a label file that hold the label, tried in this order
LABEL_COLUMNS = ("label", "class")
#: the k of ``top_k_accuracy``
TOP_K = (1, 3, 5)
#: likely label errors kept (the most confident ones)
MAX_LABEL_ERRORS = 1000
#: decimal places of the ratios in :meth:`Evaluation.to_dict`
DIGITS = 6

#: a result -> its ground-truth label, or ``None`` when it has none
Labeler = Callable[[Result], "str | None"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# --- where labels come from ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelSource:
    """Where the ground truth comes from: ``parent`` folders, a kept list ``column``, or a
    label ``file`` (with an optional ``label_column``)."""

    kind: Literal["parent", "column", "file"]
    #: the column's name (``column``)
    column: str | None = None
    #: the label file (``file``)
    file: Path | None = None
    #: the label file's label column, when not ``label``/``class``
    label_column: str | None = None

    @classmethod
    def parse(cls, spec: str, *, label_column: str | None = None) -> LabelSource:
        """The source a ``--labels`` value names: ``parent``, ``column:NAME`` or a file."""
        if spec == "parent" or spec.startswith("column:"):
            if label_column is not None:
                raise ConfigError(
                    "--column-label names the label column of a label file; "
                    f"--labels {spec} has none"
                )
            if spec == "parent":
                return cls("parent")
            name = spec.removeprefix("column:").strip()
            if not name:
                raise ConfigError("--labels column:NAME needs a column name")
            return cls("column", column=name)
        if not spec.strip():
            raise ConfigError("--labels needs parent, column:NAME or a label file")
        return cls("file", file=Path(spec), label_column=label_column)

    def __str__(self) -> str:
        if self.kind == "column":
            return f"column:{self.column}"
        if self.kind == "file":
            return str(self.file)
        return "parent"


def labels_for(source: LabelSource) -> Labeler:
    """The labeler for ``source``; a label file is read now (raises :class:`ConfigError`)."""
    if source.kind == "parent":
        return parent_label
    if source.kind == "column":
        assert source.column is not None
        return column_label(source.column)
    assert source.file is not None
    return FileLabels.read(source.file, label_column=source.label_column)


def parent_label(result: Result) -> str | None:
    """The name of the folder holding the row's file (its ``path``, else its ``source``)."""
    where = result.path or result.source
    if _SCHEME.match(where):
        try:
            folder = PurePosixPath(unquote(urlsplit(where).path)).parent.name
        except ValueError:
            return None
    else:
        folder = os.path.basename(os.path.dirname(where))
    return folder or None


def column_label(name: str) -> Labeler:
    """The labeler reading ``columns[name]`` (a list column kept with ``--keep-columns``)."""

    def label(result: Result) -> str | None:
        columns = result.columns
        if not isinstance(columns, dict):
            return None
        value = columns.get(name)
        return None if isinstance(value, (dict, list)) else _label_text(value)

    return label


class FileLabels:
    """The labels of a CSV or JSONL label file, matched to rows (see the module docstring);
    callable as a :data:`Labeler`. It remembers which entries matched a row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._folder = os.path.abspath(path.parent)
        self._labels: list[str | None] = []
        self._lines: list[int] = []
        self._exact: dict[str, int] = {}
        self._resolved: dict[str, int] = {}
        self._matched: set[int] = set()

    @classmethod
    def read(cls, path: Path, *, label_column: str | None = None) -> FileLabels:
        suffix = path.suffix.lower()
        if suffix not in (".csv", ".jsonl", ".ndjson"):
            raise ConfigError(f"{path}: a label file is .csv or .jsonl (or parent, column:NAME)")
        labels = cls(path)
        try:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                if suffix == ".csv":
                    entries = _csv_entries(handle, path, label_column)
                else:
                    entries = _jsonl_entries(handle, path, label_column)
                for line, key, label in entries:
                    labels._add(line, key, label)
        except OSError as exc:
            raise ConfigError(f"cannot read the label file {str(path)!r}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: the label file is not UTF-8 text ({exc.reason})") from None
        return labels

    def _add(self, line: int, key: str, label: str | None) -> None:
        index = len(self._labels)
        self._labels.append(label)
        self._lines.append(line)
        names = [(self._exact, key)]
        if not _SCHEME.match(key):
            resolved = os.path.abspath(os.path.join(self._folder, os.path.expanduser(key)))
            names.append((self._resolved, resolved))
        for table, name in names:
            other = table.setdefault(name, index)
            if other != index and self._labels[other] != label:
                raise ConfigError(
                    f"{self.path}:{line}: {key!r} is labeled {label!r}, but "
                    f"{self._labels[other]!r} on line {self._lines[other]}"
                )

    def __len__(self) -> int:
        return len(self._labels)

    def __call__(self, result: Result) -> str | None:
        index = self._exact.get(result.source)
        if index is None and result.path is not None:
            index = self._exact.get(result.path)
            if index is None:
                index = self._resolved.get(result.path)
        if index is None:
            return None
        self._matched.add(index)
        return self._labels[index]

    @property
    def unmatched(self) -> int:
        """Entries that matched no row so far."""
        return len(self._labels) - len(self._matched)


def _label_text(value: Any) -> str | None:
    """A label as text: strings stripped, numbers and booleans as JSON writes them; an empty
    or missing value is no label."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return json.dumps(value)
    return None


def _pick(names: Iterable[str], wanted: Iterable[str]) -> str | None:
    lowered = {name.lower(): name for name in names}
    for candidate in wanted:
        if candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def _columns_problem(path: Path, names: Iterable[str], label_column: str | None) -> str | None:
    if _pick(names, LABEL_KEY_COLUMNS) is None:
        return f"no column naming the image (one of {', '.join(map(repr, LABEL_KEY_COLUMNS))})"
    if _pick(names, (label_column,) if label_column else LABEL_COLUMNS) is None:
        wanted = repr(label_column) if label_column else " or ".join(map(repr, LABEL_COLUMNS))
        return f"no label column {wanted}" + ("" if label_column else " (--column-label NAME)")
    return None


def _csv_entries(
    handle: Iterable[str], path: Path, label_column: str | None
) -> Iterator[tuple[int, str, str | None]]:
    reader = csv.reader(handle)
    try:
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{path}: the label file is empty")
        names = [name.strip() for name in header]
        problem = _columns_problem(path, names, label_column)
        if problem:
            raise ConfigError(f"{path}: {problem}; found: {', '.join(map(repr, names))}")
        key_index = names.index(_pick(names, LABEL_KEY_COLUMNS) or "")
        label_index = names.index(
            _pick(names, (label_column,) if label_column else LABEL_COLUMNS) or ""
        )
        for row in reader:
            key = row[key_index].strip() if key_index < len(row) else ""
            if key:
                label = row[label_index] if label_index < len(row) else None
                yield reader.line_num, key, _label_text(label)
    except csv.Error as exc:
        raise ConfigError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None


def _jsonl_entries(
    handle: Iterable[str], path: Path, label_column: str | None
) -> Iterator[tuple[int, str, str | None]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{path}:{number}: malformed JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object")
        problem = _columns_problem(path, record, label_column)
        if problem:
            raise ConfigError(f"{path}:{number}: {problem}")
        key = record[_pick(record, LABEL_KEY_COLUMNS) or ""]
        label = record[_pick(record, (label_column,) if label_column else LABEL_COLUMNS) or ""]
        if not isinstance(key, str) or isinstance(label, (dict, list)):
            raise ConfigError(f"{path}:{number}: the image must be a string and the label text")
        if key.strip():
            yield number, key.strip(), _label_text(label)


# --- the evaluation --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    #: scored rows with this label
    support: int
    #: scored rows with this top
    predicted: int


@dataclass(frozen=True, slots=True)
class LabelError:
    """A scored row whose confident top differs from its label."""

    source: str
    path: str | None
    label: str
    top: str
    confidence: float


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The metrics of an evaluation, unrounded (see the module docstring for each field;
    :meth:`to_dict` is the JSON)."""

    label_source: str
    rows: int
    labeled: int
    unlabeled: int
    failed: int
    no_prediction: int
    correct: int
    accuracy: float | None
    top_k_accuracy: dict[int, float | None]
    per_class: dict[str, ClassMetrics]
    macro_avg: dict[str, float] | None
    weighted_avg: dict[str, float] | None
    #: the confusion matrix's axis (the classes of ``per_class``) and its rows
    classes: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]
    unknown_labels: tuple[str, ...]
    never_predicted: tuple[str, ...]
    never_labeled: tuple[str, ...]
    unmatched_label_entries: int | None
    label_error_threshold: float
    label_error_count: int
    label_errors: tuple[LabelError, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready evaluation, keys in a stable order, ratios rounded to :data:`DIGITS`."""
        return {
            "label_source": valid_unicode(self.label_source),
            "rows": self.rows,
            "labeled": self.labeled,
            "unlabeled": self.unlabeled,
            "failed": self.failed,
            "no_prediction": self.no_prediction,
            "correct": self.correct,
            "accuracy": _round(self.accuracy),
            "top_k_accuracy": {str(k): _round(v) for k, v in self.top_k_accuracy.items()},
            "macro_avg": _round_all(self.macro_avg),
            "weighted_avg": _round_all(self.weighted_avg),
            "per_class": {
                valid_unicode(name): {
                    "precision": _round(metrics.precision),
                    "recall": _round(metrics.recall),
                    "f1": _round(metrics.f1),
                    "support": metrics.support,
                    "predicted": metrics.predicted,
                }
                for name, metrics in self.per_class.items()
            },
            "confusion": {
                "labels": [valid_unicode(name) for name in self.classes],
                "matrix": [list(row) for row in self.matrix],
            },
            "unknown_labels": [valid_unicode(name) for name in self.unknown_labels],
            "never_predicted": [valid_unicode(name) for name in self.never_predicted],
            "never_labeled": [valid_unicode(name) for name in self.never_labeled],
            "unmatched_label_entries": self.unmatched_label_entries,
            "label_error_threshold": self.label_error_threshold,
            "label_error_count": self.label_error_count,
            "label_errors": [
                {
                    "source": valid_unicode(error.source),
                    "path": None if error.path is None else valid_unicode(error.path),
                    "label": valid_unicode(error.label),
                    "top": valid_unicode(error.top),
                    "confidence": error.confidence,
                }
                for error in self.label_errors
            ],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


def _round_all(values: dict[str, float] | None) -> dict[str, float] | None:
    return None if values is None else {name: round(v, DIGITS) for name, v in values.items()}


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


@dataclass
class Evaluator:
    """Scores results one at a time: :meth:`add` each, then :meth:`finish`."""

    labeler: Labeler
    label_error_threshold: float = 0.8
    max_label_errors: int = MAX_LABEL_ERRORS
    label_source: str = ""
    _rows: int = 0
    _failed: int = 0
    _unlabeled: int = 0
    _labeled: int = 0
    _no_prediction: int = 0
    _correct: int = 0
    _top_k: Counter[int] = field(default_factory=Counter)
    _confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    _support: Counter[str] = field(default_factory=Counter)
    _predicted: Counter[str] = field(default_factory=Counter)
    #: every class in any ok row's predictions or top: what the model knows
    _known: set[str] = field(default_factory=set)
    #: a min-heap of (confidence, -row, error): the least confident kept error on top
    _errors: list[tuple[float, int, LabelError]] = field(default_factory=list)
    _error_count: int = 0

    def __post_init__(self) -> None:
        _check_threshold(self.label_error_threshold)
        if self.max_label_errors < 0:
            raise ConfigError("max_label_errors must not be negative")

    def add(self, result: Result) -> None:
        self._rows += 1
        if not result.ok:
            self._failed += 1
            return
        top = result.top or None
        self._known.update(result.predictions)
        if top is not None:
            self._known.add(top)
        label = self.labeler(result)
        if label is None:
            self._unlabeled += 1
            return
        self._labeled += 1
        self._support[label] += 1
        ranked = _ranked(top, result.predictions)
        for k in TOP_K:
            self._top_k[k] += label in ranked[:k]
        if top is None:
            self._no_prediction += 1
            return
        self._predicted[top] += 1
        self._confusion[label, top] += 1
        if top == label:
            self._correct += 1
            return
        confidence = result.confidence
        if confidence is not None and confidence >= self.label_error_threshold:
            self._error_count += 1
            error = LabelError(result.source, result.path, label, top, confidence)
            entry = (confidence, -self._rows, error)
            if len(self._errors) < self.max_label_errors:
                heapq.heappush(self._errors, entry)
            elif self._errors and entry[:2] > self._errors[0][:2]:
                heapq.heapreplace(self._errors, entry)

    def finish(self) -> Evaluation:
        labeled = self._labeled
        classes = tuple(sorted(set(self._support) | set(self._predicted)))
        per_class: dict[str, ClassMetrics] = {}
        for name in classes:
            hits = self._confusion[name, name]
            precision = _ratio(hits, self._predicted[name])
            recall = _ratio(hits, self._support[name])
            per_class[name] = ClassMetrics(
                precision=precision,
                recall=recall,
                f1=_ratio(2 * precision * recall, precision + recall),
                support=self._support[name],
                predicted=self._predicted[name],
            )
        macro = weighted = None
        if labeled:
            macro, weighted = {}, {}
            for metric in ("precision", "recall", "f1"):
                values = [(getattr(m, metric), m.support) for m in per_class.values()]
                macro[metric] = sum(value for value, _ in values) / len(values)
                weighted[metric] = sum(value * support for value, support in values) / labeled
        errors = sorted(self._errors, key=lambda entry: (-entry[0], -entry[1]))
        labeler = self.labeler
        return Evaluation(
            label_source=self.label_source,
            rows=self._rows,
            labeled=labeled,
            unlabeled=self._unlabeled,
            failed=self._failed,
            no_prediction=self._no_prediction,
            correct=self._correct,
            accuracy=self._correct / labeled if labeled else None,
            top_k_accuracy={k: self._top_k[k] / labeled if labeled else None for k in TOP_K},
            per_class=per_class,
            macro_avg=macro,
            weighted_avg=weighted,
            classes=classes,
            matrix=tuple(
                tuple(self._confusion[label, top] for top in classes) for label in classes
            ),
            unknown_labels=tuple(name for name in sorted(self._support) if name not in self._known),
            never_predicted=tuple(
                name for name in sorted(self._support) if not self._predicted[name]
            ),
            never_labeled=tuple(
                name for name in sorted(self._predicted) if not self._support[name]
            ),
            unmatched_label_entries=labeler.unmatched if isinstance(labeler, FileLabels) else None,
            label_error_threshold=self.label_error_threshold,
            label_error_count=self._error_count,
            label_errors=tuple(entry[2] for entry in errors),
        )


def _ranked(top: str | None, predictions: dict[str, float]) -> list[str]:
    """The classes best first: ``top``, then the others by score (ties by name)."""
    others = sorted(
        (name for name in predictions if name != top),
        key=lambda name: (-predictions[name], name),
    )
    return [top, *others] if top is not None else others


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(
            f"--label-error-threshold must be a probability between 0 and 1, got {threshold}"
        )


def evaluate(
    results: Path,
    labels: LabelSource,
    *,
    label_error_threshold: float = 0.8,
    max_label_errors: int = MAX_LABEL_ERRORS,
) -> Evaluation:
    """Score the JSONL ``results`` against ``labels``, streaming the rows."""
    _check_threshold(label_error_threshold)
    _check_results_name(results)
    evaluator = Evaluator(
        labels_for(labels),
        label_error_threshold=label_error_threshold,
        max_label_errors=max_label_errors,
        label_source=str(labels),
    )
    for result in read_results(results, convert=_result):
        evaluator.add(result)
    return evaluator.finish()


def _check_results_name(results: Path) -> None:
    if results.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ConfigError(
            f"{results}: eval reads JSONL results (the format that keeps every score)"
        )


def _result(record: dict[str, Any]) -> Result:
    """The row as a result, with the fields the evaluation reads checked."""
    result = Result.from_dict(record)
    if result.status not in ("ok", "error") or not isinstance(result.source, str):
        raise ValueError(f"status {result.status!r} is neither 'ok' nor 'error'")
    if result.top is not None and not isinstance(result.top, str):
        raise TypeError("'top' is not a string")
    if result.path is not None and not isinstance(result.path, str):
        raise TypeError("'path' is not a string")
    confidence = result.confidence
    if confidence is not None and (
        isinstance(confidence, bool) or not isinstance(confidence, (int, float))
    ):
        raise TypeError("'confidence' is not a number")
    for name, score in result.predictions.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise TypeError(f"the score of {name!r} in 'predictions' is not a number")
    return result


# --- output ----------------------------------------------------------------------------------


def check_output(output: Path, inputs: Iterable[Path], *, overwrite: bool = False) -> None:
    """Before any work: ``output`` can be written, is none of ``inputs``, and is new unless
    ``overwrite``."""
    if output.is_dir():
        raise ConfigError(f"--eval {output} is a folder, not a file")
    if not output.parent.is_dir():
        raise ConfigError(f"the folder of --eval {output} ({str(output.parent)!r}) does not exist")
    if output.exists():
        for given in inputs:
            try:
                same = os.path.samefile(output, given)
            except OSError:
                same = False
            if same:
                raise ConfigError(f"--eval {output} and {given} are the same file")
        if not overwrite:
            raise ConfigError(f"--eval {output} exists: give --overwrite to replace it")


def write_evaluation(evaluation: Evaluation, output: Path | None) -> None:
    """Write the JSON of ``evaluation`` to ``output`` (atomically), or to stdout for ``None``."""
    text = json.dumps(evaluation.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{output.name}.", suffix=".tmp", dir=output.parent
        )
    except OSError as exc:
        raise ConfigError(f"cannot write --eval {output}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, output)
    except OSError as exc:
        os.unlink(temporary)
        raise ConfigError(f"cannot write --eval {output}: {exc.strerror or exc}") from None


def summary_lines(evaluation: Evaluation, *, worst: int = 3, examples: int = 5) -> list[str]:
    """A few lines for a human: counts, accuracy, top-3, the worst classes by F1, the likely
    label errors and the classes that do not line up."""
    e = evaluation
    lines = [
        f"{e.rows} rows: {e.labeled} labeled and scored, {e.unlabeled} without a label, "
        f"{e.failed} failed"
    ]
    if not e.labeled:
        hint = {
            "parent": "no row's file is in a folder",
            "column": "run with --keep-columns to keep the column in the rows",
        }.get(e.label_source.split(":", 1)[0], "check that its paths name the rows' files")
        lines.append(f"warning: no row has a label from {e.label_source} ({hint})")
        return lines
    top3 = e.top_k_accuracy.get(3)
    lines.append(
        f"accuracy {e.accuracy:.1%} ({e.correct}/{e.labeled})"
        + ("" if top3 is None else f", top-3 {top3:.1%}")
    )
    labels = [(name, m) for name, m in e.per_class.items() if m.support]
    ranked = sorted(labels, key=lambda item: (item[1].f1, item[0]))[:worst]
    lines.append(
        "worst classes by F1: "
        + ", ".join(f"{name} {m.f1:.2f} (support {m.support})" for name, m in ranked)
    )
    for what, names in (
        ("labels the model does not seem to know", e.unknown_labels),
        ("labels never predicted", e.never_predicted),
        ("predicted classes no row is labeled", e.never_labeled),
    ):
        if names:
            lines.append(f"{what}: {', '.join(names)}")
    if e.unmatched_label_entries:
        lines.append(f"{e.unmatched_label_entries} label-file entries matched no row")
    lines.append(
        f"{e.label_error_count} likely label errors (confidence >= {e.label_error_threshold:g})"
        + (":" if e.label_error_count else "")
    )
    for error in e.label_errors[:examples]:
        lines.append(
            f"  {error.source}: labeled {error.label}, model says {error.top} "
            f"({error.confidence:.2f})"
        )
    return lines

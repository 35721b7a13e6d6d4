"""One self-contained HTML page that says how a run went, built from its results JSONL.

The page is meant to be mailed, attached to a ticket or opened from an archive years later, so it
loads nothing: CSS and SVG charts are inline, thumbnails are ``data:`` URIs, there is no
JavaScript, and a Content-Security-Policy forbids fetching anything else. Every string that came
from the results (sources, class names, error messages) is HTML-escaped.

The results file is read once, line by line, in constant memory: counts go into a
:class:`~batchclassify.summary.RunStats` (the same totals and latency percentiles the run printed)
plus a few counters, and only the ``thumbnails`` least-confident rows are kept, in a bounded heap.
A malformed line (torn last line of a killed run, hand-edited row, binary junk, an overlong line)
is counted and reported as "N unreadable lines", never fatal.

Numbers that tests and scripts can read back from the page (element text is the bare number)::

    id="total"  id="ok"  id="failed"  id="unreadable"  id="no-class"    integers
    id="failure-rate"                                                   e.g. "12.5%" ("–" if empty)
    id="latency-p50"  id="latency-p95"  id="latency-p99"                ms, ok rows ("–" if none)
    id="elapsed"  id="images-per-s"  id="requests-sent"                 only with a summary file
    <td class="count" data-class="NAME">N</td>                          ok rows whose top is NAME
    <td class="predicted" data-class="NAME">N</td>                      ok rows with NAME among
                                                                        predicted_classes (only
                                                                        for multi-label results)
    <td class="error-count" data-error-type="TYPE">N</td>               failed rows by error.type
    <td class="status-count" data-error-type="TYPE" data-http-status="S">N</td>
                                                                        … and http_status ("none")
    <rect class="bin" data-bin="0.9-1.0" data-count="N">                confidence histogram
    <figure class="thumb" data-source="…" data-confidence="…">          a least-confident row
"""

from __future__ import annotations

import base64
import heapq
import io
import json
import math
import os
import re
import stat
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageOps

from batchclassify.errors import ConfigError, redact
from batchclassify.model import Result
from batchclassify.summary import RunStats

__all__ = ["build_report", "write_report"]

#: bins of the confidence histogram, over [0, 1]
CONFIDENCE_BINS = 10
#: a longer line is skipped unread (and counted unreadable) so that memory stays bounded
MAX_LINE_BYTES = 4 * 1024 * 1024
#: classes drawn in the bar chart; the table below it lists them all
CHART_CLASSES = 30
#: distinct example messages shown per error type
EXAMPLES_PER_TYPE = 3
#: line numbers of unreadable lines quoted in the page
QUOTED_LINES = 5

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def build_report(
    results_path: Path,
    *,
    summary_path: Path | None = None,
    thumbnails: int = 24,
    thumb_size: int = 160,
) -> str:
    """Return the HTML report for ``results_path`` (and the run's ``--summary`` JSON, if given).

    Raises :class:`ConfigError` when a file cannot be opened or the summary is not JSON; problems
    inside the results file only show up in the page.
    """
    if thumbnails < 0 or thumb_size < 16:
        raise ConfigError("thumbnails must be >= 0 and thumb_size >= 16 pixels")
    summary = _read_summary(summary_path) if summary_path is not None else None
    tally = _Tally(keep=thumbnails)
    try:
        with open(results_path, "rb") as stream:
            for number, line in enumerate(_lines(stream), start=1):
                tally.add_line(number, line)
    except OSError as exc:
        raise ConfigError(
            f"cannot read results {str(results_path)!r}: {exc.strerror or exc}"
        ) from exc
    return _page(results_path, tally, summary, thumb_size)


def write_report(
    results_path: Path,
    output: Path,
    *,
    overwrite: bool = False,
    summary_path: Path | None = None,
    thumbnails: int = 24,
    thumb_size: int = 160,
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
        results_path, summary_path=summary_path, thumbnails=thumbnails, thumb_size=thumb_size
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


# --- reading ----------------------------------------------------------------------------------


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


def _parse(line: bytes) -> Result | None:
    """The result on ``line``, or ``None`` if it is not a well-formed result record."""
    try:
        record = json.loads(line)
        if not isinstance(record, dict) or not _well_formed(record):
            return None
        return Result.from_dict(record)
    # RecursionError: deeply nested JSON; the rest: a record of the wrong shape.
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


def _well_formed(record: dict[str, Any]) -> bool:
    """Whether the fields the report uses have the types :meth:`Result.to_dict` writes."""
    error = record.get("error")
    classes = record.get("predicted_classes")
    return (
        isinstance(record.get("source"), str)
        and record.get("status") in ("ok", "error")
        and isinstance(record.get("top"), (str, type(None)))
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
    examples: dict[str, list[str]] = field(default_factory=dict)
    unreadable: int = 0
    unreadable_at: list[int] = field(default_factory=list)
    last_line_torn: bool = False
    # A max-heap by confidence (negated), ties broken towards the earlier line: the root is the
    # row to drop when a less confident one arrives.
    _lowest: list[tuple[float, int, _Doubtful]] = field(default_factory=list)

    def add_line(self, number: int, line: bytes | None) -> None:
        if line is not None and not line.strip():
            return
        result = _parse(line) if line is not None else None
        if result is None:
            self.unreadable += 1
            if len(self.unreadable_at) < QUOTED_LINES:
                self.unreadable_at.append(number)
            self.last_line_torn = line is not None and not line.endswith(b"\n")
            return
        self.last_line_torn = False
        self.add(result, number)

    def add(self, result: Result, number: int) -> None:
        self.stats.add(result)
        if result.ok:
            self._add_ok(result, number)
        else:
            error_type = result.error.type if result.error else "error"
            status = result.error.http_status if result.error else None
            self.by_status[error_type, status] += 1
            examples = self.examples.setdefault(error_type, [])
            message = result.error.message if result.error else "(no error details)"
            if len(examples) < EXAMPLES_PER_TYPE and message not in examples:
                examples.append(message)

    def _add_ok(self, result: Result, number: int) -> None:
        if not result.top:
            self.no_class += 1
        self.predicted.update(set(result.predicted_classes))
        if result.predicted_classes and result.predicted_classes != (result.top,):
            self.multi_label = True
        if result.confidence is None:
            return
        confidence = float(result.confidence)
        self.bins[_bin(confidence)] += 1
        if self.keep:
            entry = (-confidence, -number, _Doubtful(result.source, result.top or "", confidence))
            if len(self._lowest) < self.keep:
                heapq.heappush(self._lowest, entry)
            elif entry[:2] > self._lowest[0][:2]:
                heapq.heapreplace(self._lowest, entry)

    def least_confident(self) -> list[_Doubtful]:
        return [entry[2] for entry in sorted(self._lowest, reverse=True)]


def _bin(confidence: float) -> int:
    """The histogram bin of ``confidence``; 1.0 (and anything out of range) goes to an end bin."""
    return min(CONFIDENCE_BINS - 1, max(0, int(confidence * CONFIDENCE_BINS)))


# --- thumbnails -------------------------------------------------------------------------------


def _thumbnail(source: str, base: Path, size: int) -> tuple[str | None, str]:
    """A ``data:`` URI of a small JPEG of ``source``, or ``None`` and why there is none.

    Relative paths are tried against the current folder, where the run most likely was started,
    then against the results file's folder. URLs are never fetched: the page must be buildable
    offline and must not leak that someone looked at it.
    """
    if _URL.match(source):
        return None, "URL, not fetched"
    path = _local_file(source, base)
    if path is None:
        return None, "file not found"
    try:
        return "data:image/jpeg;base64," + _encode_thumbnail(path, size), ""
    # Any file can sit at a source path, and Pillow reports a bad one in many ways (OSError,
    # ValueError, SyntaxError, struct.error, DecompressionBombError…). A preview is decoration:
    # whatever goes wrong becomes a placeholder, never a failed report.
    except Exception as exc:
        return None, f"cannot preview: {type(exc).__name__}"


def _local_file(source: str, base: Path) -> Path | None:
    for candidate in (Path(source), base / source):
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):  # ValueError: a NUL byte in the name
            continue
    return None


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

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;
margin:0;background:#f4f5f7}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}
section{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:16px 20px;margin:16px 0}
.muted{color:#5d6778}.note{background:#fff4d6;border:1px solid #f0d58a;border-radius:6px;
padding:8px 12px}
dl.figures{display:flex;flex-wrap:wrap;gap:12px;margin:0}
dl.figures div{min-width:140px;padding:8px 12px;border:1px solid #e4e7ec;border-radius:6px}
dt{font-size:13px;color:#5d6778}dd{margin:0;font-size:22px;font-weight:600}
table{border-collapse:collapse;margin-top:12px;width:100%}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2;vertical-align:top}
td.count,td.predicted,td.error-count,td.status-count,th.num{text-align:right;
font-variant-numeric:tabular-nums}
td.name,code,.source{overflow-wrap:anywhere}
svg{width:100%;height:auto;font:12px system-ui,sans-serif}
svg .bar{fill:#4c78a8}svg .none{fill:#b5bcc7}svg .bin{fill:#59a14f}
svg .axis{stroke:#8a93a3}svg text{fill:#1d2330}
.thumbs{display:flex;flex-wrap:wrap;gap:12px}
figure.thumb{margin:0;width:var(--size);font-size:12px}
figure.thumb img,.placeholder{display:block;width:var(--size);height:var(--size);
object-fit:contain;background:#eef0f3;border-radius:4px}
.placeholder{box-sizing:border-box;padding:8px;border:1px dashed #aab2bf;color:#5d6778;
overflow:hidden;overflow-wrap:anywhere}
figcaption{margin-top:4px}figcaption .source{color:#5d6778;display:block;max-height:4.4em;
overflow:hidden}
ul.examples{margin:0;padding-left:18px}
"""


def _page(results_path: Path, tally: _Tally, summary: dict[str, Any] | None, size: int) -> str:
    name = escape(results_path.name)
    sections = [
        _totals_section(tally),
        _classes_section(tally),
        _confidence_section(tally),
        _review_section(tally, results_path.resolve().parent, size),
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
        f'<p class="muted">Results file <code>{escape(str(results_path))}</code></p>\n'
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )


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


def _classes_section(tally: _Tally) -> str:
    classes = tally.stats.classes.most_common()
    if not classes and not tally.no_class:
        return (
            '<section id="classes-section">\n<h2>Class distribution</h2>\n'
            '<p class="muted">No ok rows.</p>\n<span hidden id="no-class">0</span>\n</section>'
        )
    shown = [(name, count, "bar") for name, count in classes[:CHART_CLASSES]]
    if tally.no_class:
        shown.append(("(no class)", tally.no_class, "none"))
    rest = classes[CHART_CLASSES:]
    rest_note = (
        f'<p class="muted">{len(rest)} more classes ({sum(c for _, c in rest)} rows) are in '
        "the table only.</p>"
        if rest
        else ""
    )
    head = '<tr><th>class</th><th class="num">rows with this top class</th>'
    if tally.multi_label:
        head += '<th class="num">rows with it among predicted_classes</th>'
    rows = []
    for name, count in classes:
        cells = f'<td class="name">{escape(name)}</td>'
        cells += f'<td class="count" data-class="{escape(name)}">{count}</td>'
        if tally.multi_label:
            cells += (
                f'<td class="predicted" data-class="{escape(name)}">{tally.predicted[name]}</td>'
            )
        rows.append(f"<tr>{cells}</tr>")
    if tally.multi_label:  # classes predicted but never the top one
        for name, count in tally.predicted.most_common():
            if name not in tally.stats.classes:
                rows.append(
                    f'<tr><td class="name">{escape(name)}</td>'
                    f'<td class="count" data-class="{escape(name)}">0</td>'
                    f'<td class="predicted" data-class="{escape(name)}">{count}</td></tr>'
                )
    rows.append(
        '<tr><td class="name muted">(no class: empty <code>top</code>)</td>'
        f'<td class="count"><span id="no-class">{tally.no_class}</span></td></tr>'
    )
    multi = (
        "<p>Multi-label results: the chart and the first column count each ok row once, by its "
        "best class (<code>top</code>); the last column counts a row once for every class in its "
        "<code>predicted_classes</code>.</p>"
        if tally.multi_label
        else ""
    )
    return (
        '<section id="classes-section">\n<h2>Class distribution</h2>\n'
        "<p>Ok rows by their best class (<code>top</code>), one per row.</p>\n"
        f"{multi}{_bar_chart(shown)}\n{rest_note}\n"
        f"<table>{head}</tr>\n" + "\n".join(rows) + "\n</table>\n</section>"
    )


def _bar_chart(bars: list[tuple[str, int, str]]) -> str:
    """Horizontal bars of ``(label, count, css class)``; long labels are shortened."""
    row, label_w, bar_w = 24, 230, 580
    height = row * len(bars) + 8
    top = max(count for _, count, _ in bars) or 1
    parts = []
    for i, (label, count, css) in enumerate(bars):
        y = 4 + i * row
        width = max(1.0, bar_w * count / top)
        short = label if len(label) <= 34 else label[:33] + "…"
        parts.append(
            f"<g><title>{escape(label)}: {count}</title>"
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{escape(short)}</text>'
            f'<rect class="{css}" x="{label_w}" y="{y + 3}" width="{width:.1f}" '
            f'height="{row - 6}"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 16}">{count}</text></g>'
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
        uri, why = _thumbnail(row.source, base, size)
        source = escape(row.source)
        picture = (
            f'<img src="{uri}" alt="{source}" width="{size}" height="{size}">'
            if uri
            else f'<div class="placeholder">{escape(why)}<br>'
            f'<span class="source">{source}</span></div>'
        )
        figures.append(
            f'<figure class="thumb" data-source="{source}" data-confidence="{row.confidence}">'
            f"{picture}<figcaption><b>{escape(row.top) or '(no class)'}</b> "
            f'{row.confidence:.3f}<span class="source">{source}</span></figcaption></figure>'
        )
    return (
        '<section id="review-section">\n<h2>Least confident</h2>\n'
        f"<p>The {len(doubtful)} ok rows with the lowest confidence, lowest first: worth a look "
        "by a person. URLs are not fetched.</p>\n"
        f'<div class="thumbs" style="--size:{size}px">' + "".join(figures) + "</div>\n</section>"
    )


def _errors_section(tally: _Tally) -> str:
    failed = tally.stats.failed_by_type
    if not failed:
        return '<section id="errors-section">\n<h2>Errors</h2>\n<p>No failed rows.</p>\n</section>'
    by_type = []
    for error_type, count in failed.most_common():
        examples = "".join(
            f"<li><code>{escape(_shorten(redact(message)))}</code></li>"
            for message in tally.examples.get(error_type, [])
        )
        by_type.append(
            f'<tr><td class="name">{escape(error_type)}</td>'
            f'<td class="error-count" data-error-type="{escape(error_type)}">{count}</td>'
            f'<td><ul class="examples">{examples}</ul></td></tr>'
        )
    by_status = []
    for (error_type, status), count in sorted(
        tally.by_status.items(), key=lambda item: (-item[1], item[0][0], item[0][1] or 0)
    ):
        shown = "none" if status is None else str(status)
        by_status.append(
            f'<tr><td class="name">{escape(error_type)}</td><td>{shown}</td>'
            f'<td class="status-count" data-error-type="{escape(error_type)}" '
            f'data-http-status="{shown}">{count}</td></tr>'
        )
    return (
        '<section id="errors-section">\n<h2>Errors</h2>\n'
        '<table><tr><th>error.type</th><th class="num">rows</th><th>examples</th></tr>\n'
        + "\n".join(by_type)
        + '\n</table>\n<table><tr><th>error.type</th><th>http_status</th><th class="num">rows'
        "</th></tr>\n" + "\n".join(by_status) + "\n</table>\n</section>"
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

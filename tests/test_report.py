"""Tests for batchclassify.report: real JSONL files and images in tmp_path, the page read back.

The page is parsed with the stdlib HTML parser and checked against what the JSONL says, through
the ids and data- attributes the module docstring documents. The last tests render it in a real
headless Chromium when one is installed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import math
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from html import escape, unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import StartEmulator
from helpers import make_image, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from images import RED, close_to, oriented_jpeg, photo, png_claiming, quadrants, save, solid
from PIL import Image, ImageChops

from batchclassify import report
from batchclassify.cli import main as cli_main
from batchclassify.errors import ConfigError
from batchclassify.evaluate import LabelSource
from batchclassify.model import ErrorInfo, Result
from batchclassify.report import build_report, write_report
from batchclassify.sinks import CSV_COLUMNS, open_sinks
from batchclassify.state import Fingerprint, StateStore
from batchclassify.summary import LatencyHistogram
from batchclassify.text import csv_cell, valid_unicode

HOSTILE = "<script>alert(1)</script>"
ATTRIBUTE_BREAKER = 'x" onmouseover="alert(1)'
THUMB = 64


# --- helpers --------------------------------------------------------------------------------


def ok(
    source: str,
    top: str,
    confidence: float | None,
    *,
    classes: Iterable[str] | None = None,
    latency: float | None = 100.0,
) -> dict[str, Any]:
    predicted = tuple(classes) if classes is not None else ((top,) if top else ())
    return Result(
        source,
        "ok",
        top=top,
        confidence=confidence,
        predicted_classes=predicted,
        predictions={top: confidence} if top and confidence is not None else {},
        image={"width": 320, "height": 240},
        attempts=1,
        latency_ms=latency,
    ).to_dict()


def failed(
    source: str, kind: str, message: str, status: int | None = None, latency: float | None = None
) -> dict[str, Any]:
    error = ErrorInfo(kind, message, status)
    return Result(source, "error", error=error, attempts=3, latency_ms=latency).to_dict()


def write_jsonl(path: Path, rows: Iterable[dict[str, Any] | str | bytes]) -> Path:
    """Records as JSON lines; a str or bytes row is written as it is (for broken lines)."""
    with path.open("wb") as stream:
        for row in rows:
            if isinstance(row, dict):
                stream.write(json.dumps(row).encode() + b"\n")
            else:
                stream.write(row.encode() if isinstance(row, str) else row)
    return path


class Page(HTMLParser):
    """The parts of the report the tests read: text of elements with an id, table cells with
    their attributes, and every tag with its attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.by_id: dict[str, str] = {}
        self.cells: list[tuple[dict[str, str], str]] = []
        self.tags: list[tuple[str, dict[str, str]]] = []
        self._open: list[tuple[str, dict[str, str], list[str]]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.tags.append((tag, attributes))
        if tag == "td" or "id" in attributes:
            self._open.append((tag, attributes, []))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            _, attributes, text = self._open.pop()
            content = "".join(text).strip()
            if "id" in attributes:
                self.by_id[attributes["id"]] = content
            if tag == "td":
                self.cells.append((attributes, content))

    def handle_data(self, data: str) -> None:
        for _, _, text in self._open:
            text.append(data)

    def number(self, element_id: str) -> int:
        return int(self.by_id[element_id])

    def counts(self, css_class: str, key: str) -> dict[str, int]:
        """``{attribute value: N}`` of ``<td class=css_class key=…>N</td>``."""
        return {
            attributes[key]: int(text)
            for attributes, text in self.cells
            if attributes.get("class") == css_class and key in attributes
        }

    def attributes(self, tag: str) -> list[dict[str, str]]:
        return [attributes for name, attributes in self.tags if name == tag]

    def class_counts(self, key: str = "data-count") -> dict[str, int]:
        """``{class: N}`` of the chart's bars and the list below it (``data-class``, ``key``);
        each class must be there once."""
        found = [
            (attributes["data-class"], int(attributes[key]))
            for _, attributes in self.tags
            if "data-class" in attributes and key in attributes
        ]
        assert len({name for name, _ in found}) == len(found), found
        return dict(found)


def thumbs(page: str) -> list[tuple[str, float, str]]:
    """``(source, confidence, inner html)`` of each review thumbnail, in page order."""
    found = re.findall(
        r'<figure class="thumb" data-source="([^"]*)" data-confidence="([^"]*)">(.*?)</figure>',
        page,
        flags=re.S,
    )
    return [(unescape(source), float(confidence), inner) for source, confidence, inner in found]


def decode_data_uri(uri: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :], validate=True)))
    assert image.format == "JPEG"
    image.load()
    return image


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A results file with every kind of row, and the rows it holds."""
    rows = [
        ok("a.jpg", "cat", 0.91, latency=120.0),
        ok("b.jpg", "cat", 0.55, latency=80.0),
        ok("c.jpg", "dog", 1.0, latency=300.0),
        ok("d.jpg", "", 0.2, latency=90.0),  # nothing passed the threshold
        ok("e.jpg", "bird", 0.05, latency=None),
        failed("f.jpg", "http", "HTTP 429: slow down", 429, latency=50.0),
        failed("g.jpg", "http", "HTTP 503: overloaded", 503),
        failed("h.jpg", "http", "HTTP 503: overloaded", 503),
        failed("i.jpg", "timeout", "no answer within 30 s"),
        failed("j.jpg", "not_found", "no such file"),
    ]
    return write_jsonl(tmp_path / "results.jsonl", rows), rows


# --- numbers ------------------------------------------------------------------------------------


def test_totals_and_class_counts_match_the_jsonl(mixed: tuple[Path, list[dict[str, Any]]]) -> None:
    path, rows = mixed
    page = Page(build_report(path))

    ok_rows = [row for row in rows if row["status"] == "ok"]
    assert page.number("total") == len(rows) == 10
    assert page.number("ok") == len(ok_rows) == 5
    assert page.number("failed") == 5
    assert page.by_id["failure-rate"] == "50.0%"
    assert page.number("unreadable") == 0
    expected = Counter(row["top"] for row in ok_rows if row["top"])
    assert page.class_counts() == expected == {"cat": 2, "dog": 1, "bird": 1}
    assert page.number("no-class") == 1
    assert page.class_counts("data-predicted") == {}  # single-label: no second count


def test_multi_label_rows_are_also_counted_per_predicted_class(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "results.jsonl",
        [
            ok("1.jpg", "cat", 0.9, classes=["cat", "dog"]),
            ok("2.jpg", "dog", 0.8, classes=["dog", "cat", "hat"]),
            ok("3.jpg", "dog", 0.3, classes=[]),  # best class under the threshold
            ok("4.jpg", "cat", 0.7),
        ],
    )
    text = build_report(path)
    page = Page(text)

    assert page.class_counts() == {"cat": 2, "dog": 2, "hat": 0}
    assert page.class_counts("data-predicted") == {"cat": 3, "dog": 2, "hat": 1}
    assert "Multi-label results" in text


def test_confidence_histogram_bins_match_the_jsonl(tmp_path: Path) -> None:
    confidences = [0.0, 0.05, 0.1, 0.35, 0.5, 0.5, 0.99, 1.0, 1.0]
    rows = [ok(f"{i}.jpg", "cat", c) for i, c in enumerate(confidences)]
    rows += [ok("none.jpg", "cat", None), failed("x.jpg", "http", "boom", 500)]
    page = Page(build_report(write_jsonl(tmp_path / "results.jsonl", rows)))

    bins = {
        rect["data-bin"]: int(rect["data-count"])
        for rect in page.attributes("rect")
        if rect.get("class") == "bin"
    }
    assert len(bins) == report.CONFIDENCE_BINS
    expected = Counter(min(9, int(c * 10)) for c in confidences)
    assert [bins[f"{i / 10:.1f}-{(i + 1) / 10:.1f}"] for i in range(10)] == [
        expected[i] for i in range(10)
    ]
    assert bins["0.9-1.0"] == 3  # 1.0 falls in the last bin


def test_latency_percentiles_are_those_of_latency_histogram(tmp_path: Path) -> None:
    latencies = [float(ms) for ms in range(10, 2010, 10)]
    rows = [ok(f"{i}.jpg", "cat", 0.5, latency=ms) for i, ms in enumerate(latencies)]
    rows += [ok("nolatency.jpg", "cat", 0.5, latency=None)]
    rows += [failed("slow.jpg", "timeout", "timed out", latency=99_999.0)]  # ok rows only
    page = Page(build_report(write_jsonl(tmp_path / "results.jsonl", rows)))

    histogram = LatencyHistogram()
    for ms in latencies:
        histogram.add(ms)
    for q in (50, 95, 99):
        assert float(page.by_id[f"latency-p{q}"]) == histogram.percentile(q)


def test_error_breakdown_by_type_and_status(mixed: tuple[Path, list[dict[str, Any]]]) -> None:
    path, _ = mixed
    text = build_report(path)
    page = Page(text)

    assert page.counts("error-count", "data-error-type") == {
        "http": 3,
        "timeout": 1,
        "not_found": 1,
    }
    by_status = {
        (attributes["data-error-type"], attributes["data-http-status"]): int(value)
        for attributes, value in page.cells
        if attributes.get("class") == "status-count"
    }
    # Only rows that got an HTTP answer: the others are in the table by type already.
    assert by_status == {("http", "429"): 1, ("http", "503"): 2}
    assert text.count("HTTP 503: overloaded") == 1  # examples are distinct
    assert "HTTP 429: slow down" in text


def test_examples_are_few_short_and_redacted(tmp_path: Path) -> None:
    rows = [failed(f"{i}.jpg", "connection", f"refused #{i}") for i in range(10)]
    rows.append(failed("k.jpg", "http", "GET /m/1?api_key=SECRET123 failed: " + "x" * 5000, 500))
    text = build_report(write_jsonl(tmp_path / "results.jsonl", rows))

    shown = re.findall(r"refused #\d", text)
    assert len(shown) == report.EXAMPLES_PER_TYPE
    assert "SECRET123" not in text
    assert "x" * 400 not in text


def test_empty_results_file(tmp_path: Path) -> None:
    page = Page(build_report(write_jsonl(tmp_path / "results.jsonl", [])))

    assert (page.number("total"), page.number("ok"), page.number("failed")) == (0, 0, 0)
    assert page.by_id["failure-rate"] == "–"
    assert page.by_id["latency-p50"] == "–"
    assert page.number("no-class") == 0


# --- malformed input ----------------------------------------------------------------------------


def test_malformed_and_torn_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    good = [ok("a.jpg", "cat", 0.9), ok("b.jpg", "dog", 0.4), failed("c.jpg", "http", "x", 500)]
    bad_lines: list[str | bytes] = [
        "this is not json\n",
        "[1, 2, 3]\n",
        '{"status": "ok"}\n',  # no source
        '{"source": "a.jpg", "status": "maybe"}\n',
        json.dumps({**ok("s.jpg", "cat", 0.5), "confidence": "high"}) + "\n",
        json.dumps({**ok("n.jpg", "cat", 0.5), "confidence": math.nan}) + "\n",  # NaN
        json.dumps({**failed("e.jpg", "http", "x"), "error": "boom"}) + "\n",
        json.dumps({**ok("p.jpg", "cat", 0.5), "predicted_classes": "cat"}) + "\n",
        "[" * 100_000 + "\n",  # nesting deep enough for a RecursionError
        b"\xff\xfe\x00binary junk\n",
    ]
    more = [ok(f"more{i}.jpg", "bird", 0.8) for i in range(10)]
    torn = json.dumps(ok("t.jpg", "cat", 0.1))[:30]  # a killed run's last line, no newline
    lines = [good[0], *bad_lines[:5], "\n", "   \n", good[1], *bad_lines[5:], good[2], *more, torn]
    text = build_report(write_jsonl(tmp_path / "results.jsonl", lines))
    page = Page(text)

    unreadable = len(bad_lines) + 1
    assert page.number("unreadable") == unreadable
    assert f"{unreadable} unreadable lines" in text
    assert "line 2, 3, 4, 5, 6, …" in text  # where to look; blank lines are not counted
    assert "The last line is incomplete" in text
    assert page.number("total") == 13
    assert page.number("ok") == 12
    assert page.class_counts() == {"cat": 1, "dog": 1, "bird": 10}


def test_overlong_lines_are_skipped_without_reading_them_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "MAX_LINE_BYTES", 1024)
    huge = json.dumps(ok("x" * 10_000 + ".jpg", "cat", 0.5)) + "\n"
    lines: list[dict[str, Any] | str] = [
        ok("a.jpg", "cat", 0.9),
        huge,
        ok("b.jpg", "dog", 0.9),
        huge.rstrip("\n"),  # and at the very end, without a newline
    ]
    page = Page(build_report(write_jsonl(tmp_path / "results.jsonl", lines)))

    assert page.number("unreadable") == 2  # as many as readable ones: still a results file
    assert page.class_counts() == {"cat": 1, "dog": 1}


def row_lines() -> st.SearchStrategy[bytes]:
    valid = st.builds(
        lambda top, confidence: json.dumps(ok("p.jpg", top, confidence)).encode(),
        st.text(max_size=10),
        st.floats(0, 1),
    )
    junk = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode))
    return st.one_of(valid, junk.map(lambda b: b.replace(b"\n", b"")))


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(row_lines(), max_size=12), newline_at_end=st.booleans())
def test_any_bytes_give_a_page_with_every_line_accounted_for_or_a_refusal(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], newline_at_end: bool
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "results.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end else b""))
    valid = sum(1 for line in lines if line.startswith(b'{"source": "p.jpg"'))
    unreadable = sum(1 for line in lines if line.strip()) - valid

    if unreadable and (valid == 0 or unreadable > valid):  # mostly not results: refused
        with pytest.raises(ConfigError, match="does not look like batchclassify results"):
            build_report(path, thumbnails=2)
        return
    page = Page(build_report(path, thumbnails=2))
    assert page.number("total") == valid
    assert page.number("unreadable") == unreadable


def test_a_large_file_is_read_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "results.jsonl"
    rows = 20_000
    with path.open("w") as stream:
        for i in range(rows):
            stream.write(json.dumps(ok(f"/nowhere/{i}.jpg", f"class{i % 7}", (i % 997) / 997)))
            stream.write("\n")
    size = path.stat().st_size

    tracemalloc.start()
    try:
        page = Page(build_report(path, thumbnails=5))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert page.number("total") == rows
    review = [figure for figure in page.attributes("figure") if "data-source" in figure]
    assert [float(figure["data-confidence"]) for figure in review] == [0.0] * 5
    assert peak < size / 4, f"peak {peak} bytes for a {size}-byte file"


# --- thumbnails ---------------------------------------------------------------------------------


def test_least_confident_rows_become_decodable_thumbnails(tmp_path: Path) -> None:
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    turned = oriented_jpeg(pictures / "turned.jpg", quadrants((400, 300)), 6)
    big = save(photo((2000, 1500)), pictures / "big.jpg", "JPEG", quality=90)
    alpha = save(solid((300, 200), (255, 0, 0, 0), "RGBA"), pictures / "alpha.png", "PNG")
    grey16 = save(Image.new("I;16", (120, 90), 40000), pictures / "grey16.png", "PNG")
    not_image = pictures / "notes.jpg"
    not_image.write_text("not an image")
    bomb = pictures / "bomb.png"
    bomb.write_bytes(png_claiming((10_000, 10_000)))  # over Image.MAX_IMAGE_PIXELS: a warning

    rows = [
        ok(str(big), "dog", 0.30),
        ok(str(turned), "cat", 0.10),
        ok("https://example.com/x.jpg", "cat", 0.20),
        ok(str(alpha), "cat", 0.40),
        ok(str(pictures / "gone.jpg"), "cat", 0.25),
        ok(str(grey16), "cat", 0.45),
        ok(str(not_image), "cat", 0.50),
        ok(str(bomb), "cat", 0.55),
        ok("confident.jpg", "cat", 0.99),  # not among the 8 least confident
        failed("failed.jpg", "http", "x", 500),
    ]
    path = write_jsonl(tmp_path / "results.jsonl", rows)
    text = build_report(path, thumbnails=8, thumb_size=THUMB)
    found = thumbs(text)

    expected = [0.10, 0.20, 0.25, 0.30, 0.40, 0.45, 0.50, 0.55]
    assert [confidence for _, confidence, _ in found] == expected
    by_source = {source: inner for source, _, inner in found}
    for path in (turned, big, alpha, grey16):
        src = re.search(r'<img src="([^"]+)"', by_source[str(path)])
        assert src, path
        image = decode_data_uri(src.group(1))
        assert max(image.size) <= THUMB
    upright = decode_data_uri(re.findall(r'<img src="([^"]+)"', by_source[str(turned)])[0])
    assert upright.size == (THUMB, 48)  # 400 x 300 once the EXIF rotation is applied
    assert close_to(upright.convert("RGB").getpixel((4, 4)), RED)  # top-left quadrant
    assert "URL, not fetched" in by_source["https://example.com/x.jpg"]
    assert "file not found" in by_source[str(pictures / "gone.jpg")]
    assert "cannot preview" in by_source[str(not_image)]
    assert "cannot preview" in by_source[str(bomb)]


def test_thumbnails_keep_file_order_on_ties_and_can_be_turned_off(tmp_path: Path) -> None:
    rows = [ok(f"{i}.jpg", "cat", 0.5) for i in range(6)]
    path = write_jsonl(tmp_path / "results.jsonl", rows)

    assert [source for source, _, _ in thumbs(build_report(path, thumbnails=3))] == [
        "0.jpg",
        "1.jpg",
        "2.jpg",
    ]
    assert thumbs(build_report(path, thumbnails=0)) == []


def test_relative_sources_resolve_against_the_results_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    (run / "pics").mkdir(parents=True)
    save(solid((50, 50)), run / "pics" / "a.png", "PNG")
    path = write_jsonl(run / "results.jsonl", [ok("pics/a.png", "cat", 0.5)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    [(_, _, inner)] = thumbs(build_report(path))
    assert '<img src="data:image/jpeg;base64,' in inner


# --- safety ---------------------------------------------------------------------------------------


def test_hostile_strings_are_escaped(tmp_path: Path) -> None:
    rows = [
        ok(HOSTILE, HOSTILE, 0.1, classes=[HOSTILE, ATTRIBUTE_BREAKER]),
        ok(ATTRIBUTE_BREAKER, ATTRIBUTE_BREAKER, 0.2),
        failed(HOSTILE, HOSTILE, HOSTILE, 500),
        failed("x.jpg", "http", ATTRIBUTE_BREAKER, 400),
    ]
    path = write_jsonl(tmp_path / "<img src=x onerror=alert(1)>.jsonl", rows)  # a file name too
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"total": 4, "elapsed_s": HOSTILE, "aborted": HOSTILE}))
    text = build_report(path, summary_path=summary)
    page = Page(text)

    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert not [tag for tag, _ in page.tags if tag == "script"]
    assert not [a for _, a in page.tags if "onmouseover" in a or "onerror" in a]
    # The attributes still carry the exact names, for anyone reading the page back.
    assert page.class_counts() == {HOSTILE: 1, ATTRIBUTE_BREAKER: 1}
    assert page.counts("error-count", "data-error-type") == {HOSTILE: 1, "http": 1}
    assert {source for source, _, _ in thumbs(text)} == {HOSTILE, ATTRIBUTE_BREAKER}


def test_the_page_loads_nothing_from_elsewhere(mixed: tuple[Path, list[dict[str, Any]]]) -> None:
    path, rows = mixed
    image = save(solid((40, 30)), path.parent / "real.jpg", "JPEG")
    more = [*rows, ok(str(image), "cat", 0.01), ok("http://example.com/a.jpg", "cat", 0.02)]
    text = build_report(write_jsonl(path, more))
    page = Page(text)

    for tag, attributes in page.tags:
        for name in ("src", "href", "action", "srcset", "poster", "data"):
            value = attributes.get(name, "")
            assert not re.match(r"\s*(https?:)?//", value, re.I), (tag, name, value)
        if tag == "img":
            assert attributes["src"].startswith("data:image/jpeg;base64,")
    assert [tag for tag, _ in page.tags if tag in ("link", "script", "iframe", "object")] == []
    assert "@import" not in text
    assert "url(" not in text
    assert len(page.attributes("img")) == 1
    assert "default-src 'none'" in text  # the CSP that would block anything we missed


# --- summary ------------------------------------------------------------------------------------


def summary_of(total: int, **extra: Any) -> dict[str, Any]:
    return {
        "total": total,
        "ok": 5,
        "failed": total - 5,
        "failed_by_type": {},
        "elapsed_s": 2.5,
        "images_per_s": 4.0,
        "requests_sent": 14,
        "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
        "top_classes": {},
        "interrupted": False,
        "aborted": None,
        **extra,
    }


def test_summary_gives_elapsed_and_throughput(
    mixed: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, rows = mixed
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(summary_of(len(rows))))
    page = Page(text := build_report(path, summary_path=summary))

    assert page.by_id["elapsed"] == "2.5"
    assert page.by_id["images-per-s"] == "4.0"
    assert page.number("requests-sent") == 14
    assert "summary-mismatch" not in page.by_id
    assert "Throughput: unknown" not in text

    summary.write_text(json.dumps(summary_of(99, interrupted=True)))
    text = build_report(path, summary_path=summary)
    assert "summary-mismatch" in Page(text).by_id
    assert "interrupted" in text


def test_without_summary_throughput_is_said_to_be_unknown(
    mixed: tuple[Path, list[dict[str, Any]]],
) -> None:
    text = build_report(mixed[0])
    assert "Throughput: unknown" in text
    assert "images-per-s" not in Page(text).by_id


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", b"\xff\xfe"])
def test_an_unusable_summary_is_a_config_error(
    mixed: tuple[Path, list[dict[str, Any]]], tmp_path: Path, content: str | bytes | None
) -> None:
    summary = tmp_path / "summary.json"
    if isinstance(content, str):
        summary.write_text(content)
    elif isinstance(content, bytes):
        summary.write_bytes(content)
    with pytest.raises(ConfigError, match="summary"):
        build_report(mixed[0], summary_path=summary)


# --- write_report -------------------------------------------------------------------------------


def test_write_report_creates_and_refuses_to_overwrite(
    mixed: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    output = tmp_path / "report.html"
    assert write_report(mixed[0], output) == output
    assert Page(output.read_text()).number("total") == 10

    output.write_text("my notes")
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        write_report(mixed[0], output)
    assert output.read_text() == "my notes"


def test_write_report_overwrites_when_asked_keeping_permissions(
    mixed: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    output = tmp_path / "report.html"
    output.write_text("old")
    output.chmod(0o640)

    write_report(mixed[0], output, overwrite=True)

    assert Page(output.read_text()).number("total") == 10
    assert stat.S_IMODE(output.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.jsonl"]


def test_write_report_never_replaces_the_results_file(
    mixed: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, _ = mixed
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="results file itself"):
        write_report(path, path, overwrite=True)
    assert path.read_bytes() == before


def test_write_report_input_and_output_problems_are_config_errors(
    mixed: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    output = tmp_path / "report.html"
    with pytest.raises(ConfigError, match="cannot read results"):
        write_report(tmp_path / "missing.jsonl", output)
    with pytest.raises(ConfigError, match="cannot read results"):
        write_report(tmp_path, output)  # a folder
    assert not output.exists()
    with pytest.raises(ConfigError, match="cannot write report"):
        write_report(mixed[0], tmp_path / "no" / "such" / "folder" / "report.html")
    with pytest.raises(ConfigError, match="thumb"):
        write_report(mixed[0], output, thumbnails=-1)


# --- CSV and Parquet results ---------------------------------------------------------------------

#: sources and class names that CSV neutralises (a leading ' before = + - @ TAB CR) or that are
#: hard to keep: quotes, commas, newlines, scripts of all kinds
TRICKY = [
    "=HYPERLINK(1).jpg",
    "+1.jpg",
    "-1.jpg",
    "@sum.jpg",
    "\tindented.jpg",
    "\rcarriage.jpg",
    "'quoted.jpg",
    'comma, "quote".jpg',
    "new\nline.jpg",
    "狗.jpg",
    "кошка.jpg",
    "قطة.jpg",
]


async def write_outputs(rows: Iterable[dict[str, Any]], *paths: Path) -> None:
    """``rows`` through the real sinks of ``run --out`` (the format by extension)."""
    sinks = await open_sinks([str(path) for path in paths])
    for row in rows:
        result = Result.from_dict(row)
        for sink in sinks:
            await sink.write(result)
    for sink in sinks:
        await sink.aclose()


def readback(page: Page) -> dict[str, Any]:
    """What a report says, minus the results file's own name and date."""
    ids = ("total", "ok", "failed", "unreadable", "no-class", "failure-rate", "latency-p50")
    return {
        "ids": {element_id: page.by_id[element_id] for element_id in ids},
        "classes": page.class_counts(),
        "predicted": page.class_counts("data-predicted"),
        "errors": page.counts("error-count", "data-error-type"),
        "statuses": sorted(
            (a["data-error-type"], a["data-http-status"], text)
            for a, text in page.cells
            if a.get("class") == "status-count"
        ),
        "bins": [a["data-count"] for a in page.attributes("rect") if a.get("class") == "bin"],
        "thumbs": [
            (a["data-source"], a["data-confidence"])
            for a in page.attributes("figure")
            if "data-source" in a
        ],
    }


@pytest.mark.parametrize("extension", [".csv", ".parquet"])
def test_csv_and_parquet_results_give_the_report_of_the_jsonl(
    tmp_path: Path, extension: str
) -> None:
    if extension == ".parquet":
        pytest.importorskip("pyarrow")
    rows = [
        *(ok(name, name, i / 20, latency=10.0 + i) for i, name in enumerate(TRICKY)),
        ok("multi.jpg", "cat", 0.7, classes=["cat", "=dog"]),
        ok("none.jpg", "", 0.1),
        failed("=x.jpg", "http", "-HTTP 503: overloaded", 503),
        failed("y.jpg", "timeout", "@no answer"),
    ]
    asyncio.run(write_outputs(rows, tmp_path / "r.jsonl", tmp_path / f"r{extension}"))

    expected = readback(Page(build_report(tmp_path / "r.jsonl")))
    assert readback(Page(build_report(tmp_path / f"r{extension}"))) == expected
    assert expected["ids"]["total"] == str(len(rows))
    assert set(TRICKY) <= set(expected["classes"]) and "=dog" in expected["predicted"]
    assert {source for source, _ in expected["thumbs"]} >= set(TRICKY[:10])


def test_csv_takes_off_only_the_quote_that_neutralised_a_formula(tmp_path: Path) -> None:
    csv_path = tmp_path / "r.csv"
    rows = [ok(name, "cat", 0.5) for name in TRICKY]
    asyncio.run(write_outputs(rows, csv_path))
    raw = csv_path.read_text()
    assert "'=HYPERLINK" in raw and "'-1.jpg" in raw  # neutralised on disk, as the sink writes

    shown = {source for source, _, _ in thumbs(build_report(csv_path, thumbnails=50))}
    assert shown == set(TRICKY)  # "'quoted.jpg" keeps its quote: it was not added


@given(st.text(max_size=12))
def test_undoing_the_formula_quote_inverts_csv_cell(text: str) -> None:
    # The one text it cannot give back: a quote the user wrote before a formula character.
    ambiguous = text.startswith("'") and text[1:].startswith(("=", "+", "-", "@", "\t", "\r"))
    if not ambiguous:
        assert report._unneutralised(csv_cell(text)) == text


def test_csv_rows_that_do_not_fit_are_counted_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "MAX_LINE_BYTES", 1024)
    path = tmp_path / "r.csv"
    good = [ok(f"{i}.jpg", "cat", 0.5) for i in range(8)]
    good.append(failed("multi.jpg", "http", "line one\nline two", 500))  # a quoted newline
    asyncio.run(write_outputs(good, path))
    header, *lines = path.read_text().splitlines(keepends=True)
    with path.open("wb") as stream:
        stream.write(header.encode())
        stream.write("".join(lines[:4]).encode())
        stream.write(b"a.jpg,ok,cat\n")  # too few cells
        stream.write(("b.jpg,ok,cat,high" + "," * 11 + "\n").encode())  # not a number
        stream.write(("n.jpg,ok,cat,nan" + "," * 11 + "\n").encode())
        stream.write(b"\xff\xfe binary\n")
        stream.write(b'"' + b"x" * 2000 + b'"\n')  # over MAX_LINE_BYTES
        stream.write("".join(lines[4:]).encode())
        stream.write(lines[0].encode()[:20])  # torn
    page = Page(text := build_report(path))

    assert page.number("total") == 9
    assert page.number("unreadable") == 6
    assert "The last line is incomplete" in text
    assert page.counts("error-count", "data-error-type") == {"http": 1}
    assert "line one\nline two" in text


def test_parquet_without_pyarrow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'batchclassify[parquet]'")):
        build_report(path)


def not_results(tmp_path: Path, kind: str) -> Path:
    """A file given to ``report`` that is not results of a run."""
    if kind == "unknown extension":
        return write_jsonl(tmp_path / "r.txt", [ok("a.jpg", "cat", 0.5)])
    if kind == "mostly junk":
        lines: list[dict[str, Any] | str] = [ok("a.jpg", "cat", 0.5), "junk\n", "more junk\n"]
        return write_jsonl(tmp_path / "r.jsonl", lines)
    if kind == "an image":
        return save(photo((200, 150)), tmp_path / "r.jsonl", "PNG")
    if kind == "torn single line":
        return write_jsonl(tmp_path / "r.jsonl", [json.dumps(ok("a.jpg", "cat", 0.5))[:20]])
    if kind == "an input list csv":
        (tmp_path / "r.csv").write_text("url,label\nhttps://example.com/a.jpg,cat\n")
    elif kind == "binary csv":
        (tmp_path / "r.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    elif kind == "csv of junk rows":
        (tmp_path / "r.csv").write_text("source,status\n" + "only one cell\n" * 5)
    elif kind == "text as parquet":
        pytest.importorskip("pyarrow")
        return write_jsonl(tmp_path / "r.parquet", [ok("a.jpg", "cat", 0.5)])
    elif kind == "other parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"url": ["a"], "label": ["cat"]}), tmp_path / "r.parquet")
        return tmp_path / "r.parquet"
    return tmp_path / "r.csv"


NOT_RESULTS = [
    ("unknown extension", "cannot tell the format"),
    ("mostly junk", "does not look like batchclassify results: 2 of its 3 rows"),
    ("an image", "does not look like batchclassify results"),
    ("torn single line", "does not look like batchclassify results"),
    ("an input list csv", "no source and status columns"),
    ("binary csv", "first line cannot be read"),
    ("csv of junk rows", "does not look like batchclassify results"),
    ("text as parquet", "not a Parquet file"),
    ("other parquet", "no source and status columns"),
]


@pytest.mark.parametrize(("kind", "message"), NOT_RESULTS, ids=[kind for kind, _ in NOT_RESULTS])
def test_a_file_that_is_not_results_is_refused(tmp_path: Path, kind: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_report(not_results(tmp_path, kind))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("r.jsonl", b""),
        ("r.jsonl", b"\n \n"),
        ("r.csv", b""),
        ("r.csv", (",".join(CSV_COLUMNS) + "\n").encode()),
    ],
)
def test_results_of_a_run_with_no_inputs_are_an_empty_report(
    tmp_path: Path, name: str, content: bytes
) -> None:
    (tmp_path / name).write_bytes(content)
    page = Page(build_report(tmp_path / name))
    assert (page.number("total"), page.number("unreadable")) == (0, 0)


def test_report_command_reads_csv_and_exits_2_on_what_is_not_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [ok("a.jpg", "cat", 0.9), ok("b.jpg", "dog", 0.4), failed("c.jpg", "http", "x", 500)]
    asyncio.run(write_outputs(rows, tmp_path / "r.csv"))

    assert cli_main(["report", str(tmp_path / "r.csv")]) == 0
    page = Page((tmp_path / "r.html").read_text())
    assert (page.number("total"), page.number("unreadable")) == (3, 0)
    assert page.class_counts() == {"cat": 1, "dog": 1}

    capsys.readouterr()
    (tmp_path / "junk").mkdir()
    junk = not_results(tmp_path / "junk", "mostly junk")
    assert cli_main(["report", str(junk)]) == 2
    assert "does not look like batchclassify results" in capsys.readouterr().err
    assert not junk.with_suffix(".html").exists()
    assert cli_main(["report", str(tmp_path / "r.html"), "-o", str(tmp_path / "x.html")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err


# --- the run's settings in the header ------------------------------------------------------------

ENDPOINT = "https://robo:hunter2hunter2@infer.example.com:9001/v1?api_key=SECRETKEY123"


def make_state(path: Path, **settings: str) -> StateStore:
    """A real state, as a run leaves it (open: the caller closes it)."""
    values = {"model": "flowers/3", "endpoint": ENDPOINT, "confidence": "0.5", "max_size": "640"}
    store = StateStore(path)
    store.check_fingerprint(Fingerprint(**{**values, **settings}))
    return store


def folder_listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_header_shows_the_run_settings_from_the_state_read_only(
    mixed: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, _ = mixed
    make_state(path.with_name("results.jsonl.state")).close()
    stamp = 1_700_000_000
    os.utime(path, (stamp, stamp))
    before = folder_listing(path.parent)
    page = Page(text := build_report(path))

    assert page.by_id["model"] == "flowers/3"
    assert page.by_id["endpoint"] == "https://infer.example.com:9001/v1?api_key=***"
    assert "hunter2" not in text and "SECRETKEY123" not in text and "robo" not in text
    assert page.by_id["confidence-threshold"] == "0.5"
    assert page.by_id["max-size"] == "640"
    expected = datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")
    assert page.by_id["results-date"] == expected
    assert datetime.fromisoformat(expected).timestamp() == stamp
    assert folder_listing(path.parent) == before  # nothing written, not even -wal/-shm files


def test_header_reads_a_state_in_use_and_the_state_option(
    mixed: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, _ = mixed
    elsewhere = tmp_path / "states" / "job.state"
    elsewhere.parent.mkdir()
    store = make_state(elsewhere, confidence="None", max_size="None")  # still open: a WAL
    try:
        assert elsewhere.with_name("job.state-wal").exists()
        page = Page(text := build_report(path, state_path=elsewhere))
    finally:
        store.close()

    assert page.by_id["confidence-threshold"] == "default"
    assert page.by_id["max-size"] == "none"
    assert "Run settings from the state" in text


def test_header_finds_the_state_of_a_sibling_output(tmp_path: Path) -> None:
    rows = [ok("a.jpg", "cat", 0.5)]
    asyncio.run(write_outputs(rows, tmp_path / "r.jsonl", tmp_path / "r.csv"))
    make_state(tmp_path / "r.jsonl.state", model="beside/1").close()

    assert Page(build_report(tmp_path / "r.csv")).by_id["model"] == "beside/1"


@pytest.mark.parametrize("state", ["missing", "damaged", "not a state"])
def test_without_a_readable_state_the_settings_are_left_out(
    mixed: tuple[Path, list[dict[str, Any]]], state: str
) -> None:
    path, _ = mixed
    state_path = path.with_name("results.jsonl.state")
    if state == "damaged":
        state_path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)
    elif state == "not a state":
        with contextlib.closing(sqlite3.connect(state_path)) as db:
            db.execute("CREATE TABLE other (x)")
    page = Page(text := build_report(path))

    for element_id in ("model", "endpoint", "confidence-threshold", "max-size"):
        assert element_id not in page.by_id
    assert "results-date" in page.by_id
    assert "Run settings unknown" in text and "--state PATH" in text


def test_header_settings_from_the_summary(
    mixed: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    path, rows = mixed
    summary = tmp_path / "summary.json"
    extra = {"model": HOSTILE, "endpoint": ENDPOINT, "max_size": 512, "confidence": True}
    summary.write_text(json.dumps(summary_of(len(rows), **extra)))
    page = Page(text := build_report(path, summary_path=summary))

    assert page.by_id["model"] == HOSTILE and "<script" not in text
    assert page.by_id["endpoint"] == "https://infer.example.com:9001/v1?api_key=***"
    assert page.by_id["max-size"] == "512"
    assert "confidence-threshold" not in page.by_id  # not a number: ignored

    make_state(path.with_name("results.jsonl.state")).close()  # the state wins
    assert Page(build_report(path, summary_path=summary)).by_id["model"] == "flowers/3"


# --- the least confident rows, errors ------------------------------------------------------------


def test_duplicates_are_left_out_of_the_review_but_counted(tmp_path: Path) -> None:
    rows = [ok(f"{i}.jpg", "cat", 0.5 + i / 100) for i in range(4)]
    rows += [{**ok(f"copy{i}.jpg", "cat", 0.1), "duplicate_of": f"{i}.jpg"} for i in range(3)]
    page = Page(text := build_report(write_jsonl(tmp_path / "results.jsonl", rows), thumbnails=3))

    assert [source for source, _, _ in thumbs(text)] == ["0.jpg", "1.jpg", "2.jpg"]
    assert page.number("total") == 7
    assert page.class_counts() == {"cat": 7}


def file_link(inner: str) -> bytes:
    """The file a thumbnail links to, as the bytes of its path."""
    match = re.search(r'<a href="(file://[^"]+)"', inner)
    assert match, inner
    href = unescape(match.group(1))
    assert re.fullmatch(r"file://[A-Za-z0-9%/._~-]+", href), href  # percent-encoded
    return urllib.parse.unquote_to_bytes(href.removeprefix("file://"))


def test_thumbnails_link_to_their_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    pictures = run / "pics"
    pictures.mkdir(parents=True)
    odd = save(solid((40, 30)), pictures / "a b#1?%20狗.png", "PNG")
    raw = save(solid((40, 30)), pictures / os.fsdecode(b"caf\xe9.png"), "PNG")  # not UTF-8
    moved = save(solid((40, 30)), tmp_path / "real.png", "PNG")
    rows = [
        ok(str(odd), "cat", 0.1),
        ok(str(raw), "cat", 0.2),  # the record carries source_bytes
        {**ok("was/here.png", "cat", 0.3), "path": str(moved)},  # the resolved path wins
        ok("pics/gone.png", "cat", 0.4),  # relative: against the results folder
        ok("https://example.com/x.png", "cat", 0.5),
    ]
    path = write_jsonl(run / "results.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    output = write_report(path, tmp_path / "report.html")  # a non-UTF-8 name can be written
    found = {source: inner for source, _, inner in thumbs(output.read_text())}

    assert len(found) == 5
    assert file_link(found[str(odd)]) == os.fsencode(odd)
    shown = valid_unicode(str(raw))
    assert shown.endswith("/caf\\xe9.png")
    assert file_link(found[shown]) == os.fsencode(pictures) + b"/caf\xe9.png"
    assert '<img src="data:' in found[shown]
    assert file_link(found["was/here.png"]) == os.fsencode(moved)
    assert '<img src="data:' in found["was/here.png"]
    assert file_link(found["pics/gone.png"]) == os.fsencode(run / "pics" / "gone.png")
    assert "<a " not in found["https://example.com/x.png"]


def test_error_examples_name_the_input_in_full(tmp_path: Path) -> None:
    deep = tmp_path / "very" / "deep" / "folder" / "x.jpg"
    rows = [
        failed(str(deep), "not_found", "x.jpg: no such file"),
        {**failed("rel/y.jpg", "empty", "y.jpg: the file is empty"), "path": "/abs/rel/y.jpg"},
        failed("https://u:pw12345678@example.com/z.jpg", "http", "HTTP 404", 404),
    ]
    text = build_report(write_jsonl(tmp_path / "results.jsonl", rows))
    examples = "".join(re.findall(r'<ul class="examples">(.*?)</ul>', text))

    assert escape(str(deep)) in examples
    assert "/abs/rel/y.jpg" in examples and "y.jpg: the file is empty" in examples
    assert "pw12345678" not in text


def test_the_class_chart_is_not_repeated_in_a_table(tmp_path: Path) -> None:
    rows = [ok(f"{i}.jpg", f"class{i % 40:02d}", 0.5) for i in range(400)]
    rows += [ok(f"extra{i}.jpg", "class00", 0.5) for i in range(5)]
    text = build_report(write_jsonl(tmp_path / "results.jsonl", rows))
    section = re.search(r'<section id="classes-section">(.*?)</section>', text, re.S)
    assert section
    page = Page(section.group(1))

    assert "<table" not in section.group(1)
    bars = [a for a in page.attributes("g") if a.get("class") == "class-bar"]
    listed = [a for a in page.attributes("li") if a.get("class") == "class-row"]
    assert len(bars) == report.CHART_CLASSES and len(listed) == 40 - report.CHART_CLASSES
    assert bars[0] == {"class": "class-bar", "data-class": "class00", "data-count": "15"}
    assert page.class_counts() == {f"class{i:02d}": 15 if i == 0 else 10 for i in range(40)}


def test_the_http_status_table_is_there_only_with_http_errors(tmp_path: Path) -> None:
    rows = [ok("a.jpg", "cat", 0.5), failed("b.jpg", "timeout", "slow"), failed("c", "input", "x")]
    text = build_report(write_jsonl(tmp_path / "results.jsonl", rows))
    assert "<th>http_status</th>" not in text and 'class="status-count"' not in text

    rows.append(failed("d.jpg", "http", "HTTP 500", 500))
    text = build_report(write_jsonl(tmp_path / "results.jsonl", rows))
    assert "<th>http_status</th>" in text
    assert Page(text).counts("status-count", "data-http-status") == {"500": 1}


# --- evaluation -------------------------------------------------------------------------------

NUMBER = re.compile(r"(?<![\w.\-/])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")


def evaluation_section(text: str) -> str:
    found = re.findall(r'<section id="evaluation-section">.*?</section>', text, flags=re.S)
    assert len(found) == 1
    return str(found[0])


def json_numbers(value: Any) -> set[str]:
    """Every number in ``value`` as JSON writes it."""
    if isinstance(value, dict):
        return set().union(*map(json_numbers, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(json_numbers, value)) if value else set()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {json.dumps(value)}
    return set()


class Texts(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.data: list[str] = []
        self.feed(text)
        self.close()

    def handle_data(self, data: str) -> None:
        self.data.append(data)


def as_json(value: Any) -> str:
    return "–" if value is None else json.dumps(value)


def check_section(text: str, got: dict[str, Any], shown_errors: int) -> None:
    """Every number of the page's evaluation section is the JSON's, in its place."""
    section = evaluation_section(text)
    page = Page(section)
    top_k = got["top_k_accuracy"]
    wanted = {
        "accuracy": got["accuracy"],
        **{f"top{k}-accuracy": top_k[k] for k in ("1", "3", "5")},
        **{f"macro-{m}": got["macro_avg"][m] for m in ("precision", "recall", "f1")},
        **{f"weighted-{m}": got["weighted_avg"][m] for m in ("precision", "recall", "f1")},
        "labeled": got["labeled"],
        "correct": got["correct"],
        "unlabeled": got["unlabeled"],
        "eval-failed": got["failed"],
        "label-error-count": got["label_error_count"],
        "label-error-threshold": got["label_error_threshold"],
    }
    assert {key: page.by_id[key] for key in wanted} == {k: as_json(v) for k, v in wanted.items()}
    metrics = {
        (a["data-class"], a["data-metric"]): value
        for a, value in page.cells
        if a.get("class") == "class-metric"
    }
    assert metrics == {
        (name, metric): json.dumps(value)
        for name, values in got["per_class"].items()
        for metric, value in values.items()
    }
    labels, matrix = got["confusion"]["labels"], got["confusion"]["matrix"]
    cells = [
        (a["data-label"], a["data-predicted"], a["data-count"])
        for a in page.attributes("rect")
        if a.get("class") == "confusion-cell"
    ]
    assert cells == [
        (label, predicted, str(matrix[i][j]))
        for i, label in enumerate(labels)
        for j, predicted in enumerate(labels)
    ]
    figures = [
        (a["data-source"], a["data-label"], a["data-top"], a["data-confidence"])
        for a in page.attributes("figure")
        if a.get("class") == "label-error"
    ]
    assert figures == [
        (e["source"], e["label"], e["top"], json.dumps(e["confidence"]))
        for e in got["label_errors"][:shown_errors]
    ]
    # No other number anywhere in its text: each one is a number of the JSON.
    words = "".join(Texts(section).data)
    for error in got["label_errors"]:
        words = words.replace(error["source"], " ")
    allowed = json_numbers(got) | {"–"}
    assert set(NUMBER.findall(words)) <= allowed


async def test_report_shows_the_evaluation_of_eval_exactly(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(classes=("cat", "dog", "bird", "fish"))
    for offset, name in enumerate(("cat", "dog", "bird")):
        for n in range(8):
            make_image(tmp_path / "data" / name / f"{n}.jpg", seed=100 * offset + n)
    for n in range(3):
        make_image(tmp_path / "data" / "zebra" / f"{n}.jpg", seed=900 + n)
    env = {"ROBOFLOW_API_KEY": "report-key-31415"}
    code, _, err = await run_cli(
        "run", "data", "--model", "demo/1", "--endpoint", url, "--out", "r.jsonl", "--out",
        "r.csv", env=env, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    threshold = ("--label-error-threshold", "0.5")
    code, _, err = await run_cli(
        "eval", "r.jsonl", "--labels", "parent", *threshold, "--eval", "e.json", cwd=tmp_path
    )
    assert code == 0, err
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["label_error_count"] >= 3 and 0 < got["correct"] < got["labeled"]
    shown = got["label_error_count"] - 1  # the first N, not all of them

    code, _, err = await run_cli(
        "report", "r.jsonl", "--labels", "parent", *threshold, "--label-errors", str(shown),
        "-o", "labels.html", cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    page = (tmp_path / "labels.html").read_text()
    check_section(page, got, shown)
    assert got["confusion"]["labels"] == ["bird", "cat", "dog", "fish", "zebra"]
    # the label errors' thumbnails are the images, linking to their files
    section = evaluation_section(page)
    first = got["label_errors"][0]
    assert escape(Path(first["path"]).as_uri()) in section
    assert section.count('<img src="data:image/jpeg;base64,') == shown
    assert 'id="evaluation-mismatch"' not in section

    # The eval JSON read instead gives the same section, also for the CSV of the same run.
    for results in ("r.jsonl", "r.csv"):
        code, _, err = await run_cli(
            "report", results, "--eval", "e.json", "--label-errors", str(shown), "-o",
            f"{results}.html", cwd=tmp_path,
        )  # fmt: skip
        assert code == 0, err
        assert evaluation_section((tmp_path / f"{results}.html").read_text()) == section

    # Labels need the JSONL (the CSV keeps no scores); a bad --eval file; both at once.
    for args, message in (
        (("r.csv", "--labels", "parent"), "--labels needs JSONL results"),
        (("r.jsonl", "--eval", "r.jsonl"), "is not JSON"),
        (("r.jsonl", "--eval", "data"), "cannot read --eval"),
        (("r.jsonl", "--labels", "parent", "--eval", "e.json"), "not allowed with"),
        (("r.jsonl", "--eval", "e.json", *threshold), "go with --labels"),
        (("r.jsonl", *threshold), "goes with --labels"),
    ):
        code, _, err = await run_cli("report", *args, "-o", "x.html", cwd=tmp_path)
        assert code == 2 and message in err, (args, err)
        assert not (tmp_path / "x.html").exists()
    (tmp_path / "bad.json").write_text(json.dumps({**got, "confusion": {"labels": ["a"]}}))
    with pytest.raises(ConfigError, match="'confusion' is not"):
        report.read_evaluation(tmp_path / "bad.json")


def test_evaluation_strings_are_escaped_and_many_classes_folded(tmp_path: Path) -> None:
    rows = []
    for i in range(45):
        label, top = f"{HOSTILE}{i}", f"{ATTRIBUTE_BREAKER}{i % 40}"
        row = ok(f"{HOSTILE}/{i}.jpg", top, 0.5 + i / 100)
        row["columns"] = {"truth": label}
        rows.append(row)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    evaluation = report.evaluation_from_labels(
        path, LabelSource.parse("column:truth"), label_error_threshold=0.6
    )
    text = build_report(path, evaluation=evaluation, thumbnails=0, label_errors=5)
    section = evaluation_section(text)
    assert HOSTILE not in text and 'x" onmouseover' not in text
    assert "<script" not in text
    page = Page(section)
    labels = evaluation["confusion"]["labels"]
    assert len(labels) == 85
    cells = [a for a in page.attributes("rect") if a.get("class") == "confusion-cell"]
    assert len(cells) == 30 * 30  # 29 classes and "other"
    assert sum(int(a["data-count"]) for a in cells) == 45
    assert {a["data-label"] for a in cells} - {""} <= set(labels)
    assert "folded" in page.by_id["confusion-folded"] and "56" in page.by_id["confusion-folded"]
    figures = [a for a in page.attributes("figure") if a.get("class") == "label-error"]
    assert [a["data-source"] for a in figures] == [
        e["source"] for e in evaluation["label_errors"][:5]
    ]


# --- a real browser ---------------------------------------------------------------------------

CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (apt-get install -y chromium) to render the page headless",
)


def chromium(page: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Render ``page`` in headless Chromium with logging on stderr, offline, time-bounded."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=2000",
        *arguments,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def console_messages(stderr: str) -> list[str]:
    """Lines where the page itself logged something: script errors, CSP violations, console.*"""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture
def rendered_report(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    rows: list[dict[str, Any]] = []
    for i in range(12):
        image = save(photo((320, 240), seed=i), images / f"{i}.jpg", "JPEG")
        rows.append(ok(str(image), ("cat", "dog", HOSTILE)[i % 3], i / 12, latency=50.0 + i))
    rows += [ok("https://example.com/u.jpg", "dog", 0.03), failed("z.jpg", "http", HOSTILE, 503)]
    path = write_jsonl(tmp_path / "results.jsonl", [*rows, "torn {"])
    # Ground truth: every image is labeled cat, so the dog and HOSTILE ones are label errors.
    truth = tmp_path / "truth.csv"
    truth.write_text("source,label\n" + "".join(f"{row['source']},cat\n" for row in rows[:12]))
    evaluation = report.evaluation_from_labels(  # eval refuses the torn line
        write_jsonl(tmp_path / "whole.jsonl", rows),
        LabelSource.parse(str(truth)),
        label_error_threshold=0.3,
    )
    return write_report(path, tmp_path / "report.html", thumbnails=8, evaluation=evaluation)


@needs_chromium
def test_chromium_renders_the_report_without_console_messages(
    rendered_report: Path, tmp_path: Path
) -> None:
    result = chromium(rendered_report, tmp_path / "profile", "--dump-dom")

    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    dom = Page(result.stdout)
    assert (dom.number("total"), dom.number("ok"), dom.number("failed")) == (14, 13, 1)
    assert dom.number("unreadable") == 1
    assert dom.class_counts() == {"cat": 4, "dog": 5, HOSTILE: 4}
    assert not [tag for tag, _ in dom.tags if tag == "script"]
    cells = {
        (a["data-label"], a["data-predicted"]): int(a["data-count"])
        for a in dom.attributes("rect")
        if a.get("class") == "confusion-cell"
    }
    assert cells[("cat", "cat")] == 4 and cells[("cat", HOSTILE)] == 4
    errors = [a for a in dom.attributes("figure") if a.get("class") == "label-error"]
    assert [(a["data-label"], float(a["data-confidence"])) for a in errors] == [
        ("cat", i / 12)
        for i in (11, 10, 8, 7, 5, 4)  # not the cats (i % 3 == 0)
    ]


@needs_chromium
def test_chromium_screenshot_shows_the_charts(rendered_report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    result = chromium(
        rendered_report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2000"
    )

    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        colours = {colour: n for n, colour in rgb.getcolors(rgb.width * rgb.height) or []}
    # The class bars (#4c78a8) and the confidence bins (#59a14f) are painted.
    assert colours.get((0x4C, 0x78, 0xA8), 0) > 1000
    assert colours.get((0x59, 0xA1, 0x4F), 0) > 1000


@needs_chromium
def test_console_messages_are_really_caught(tmp_path: Path) -> None:
    """The check above is only worth something if a broken page fails it."""
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><p id=total>1</p><script>undefinedFunction()</script>")
    result = chromium(broken, tmp_path / "profile", "--dump-dom")

    assert result.returncode == 0
    assert any("undefinedFunction" in line for line in console_messages(result.stderr))


NON_LATIN = ("狗.jpg", "кошка.jpg", "قطة.jpg")
#: the page's background (body) colour
BACKGROUND = (0xF4, 0xF5, 0xF7)


def has_font_for(language: str) -> bool:
    """Whether fontconfig knows a font covering ``language`` (``fc-list :lang=zh``)."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return False
    found = subprocess.run([fc_list, f":lang={language}"], capture_output=True, text=True)
    return bool(found.stdout.strip())


def screenshot(page: Path, profile: Path, width: int, height: int = 4000) -> Image.Image:
    shot = profile.with_suffix(".png")
    result = chromium(
        page,
        profile,
        f"--screenshot={shot}",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(shot) as image:
        rgb: Image.Image = image.convert("RGB")
    return rgb


def background_only(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    return image.crop(box).getcolors(1) == [((box[2] - box[0]) * (box[3] - box[1]), BACKGROUND)]


@needs_chromium
def test_chromium_page_fits_1280_px_and_shows_non_latin_names(tmp_path: Path) -> None:
    """At 1280 px nothing sticks out of the page's column, however long the names; and file
    names in Chinese, Russian and Arabic are drawn with real glyphs, not as empty boxes."""
    missing = [language for language in ("zh", "ru", "ar") if not has_font_for(language)]
    if missing:
        pytest.skip(f"no system font for {missing} (apt-get install fonts-noto-cjk fonts-dejavu)")
    results = tmp_path / "run" / "results.jsonl"
    results.parent.mkdir()
    make_state(results.with_name("results.jsonl.state"), endpoint="https://" + "h" * 300).close()
    output = tmp_path / "report.html"

    # An evaluation with many classes (folded in the heatmap), long names and label errors.
    labeled = []
    for i in range(60):
        name = ("class" * 40 if i % 7 == 0 else NON_LATIN[i % 3]) + str(i)
        row = ok(f"/gone/{'long' * 60}/{i}.jpg", name if i % 3 else "top" + str(i % 5), 0.95)
        row["columns"] = {"truth": name}
        labeled.append(row)
    evaluation = report.evaluation_from_labels(
        write_jsonl(tmp_path / "labeled.jsonl", labeled), LabelSource.parse("column:truth")
    )

    def render(names: Iterable[str], width: int = 1280, extra: str = "") -> Image.Image:
        """The report of these least-confident sources (missing files: a placeholder and a
        caption show each name), beside rows as long as can be; all else kept the same."""
        rows = [ok(name, name, i / 100) for i, name in enumerate(names)]
        rows += [
            ok("/very/" + "long" * 100 + ".jpg", "class" * 60, 0.9),
            failed("/f/" + "x" * 400, "http", "HTTP 503: " + "overloaded" * 80, 503),
        ]
        write_jsonl(results, rows)
        os.utime(results, (1_700_000_000, 1_700_000_000))  # the same header every time
        write_report(results, output, overwrite=True, thumbnails=8, evaluation=evaluation)
        if extra:
            output.write_text(output.read_text().replace("</main>", extra + "</main>"))
        return screenshot(output, tmp_path / f"profile{width}", width, 9000)

    page = render(NON_LATIN)
    for width, image in ((1280, page), (1600, render(NON_LATIN, 1600))):
        assert background_only(image, (0, image.height - 50, width, image.height))  # all shown
        assert background_only(image, (width - 50, 0, width, image.height)), width
    # The check sees a page that does overflow: a long word with no place to break.
    wide = render(NON_LATIN, extra="<p>" + "W" * 300 + "</p>")
    assert not background_only(wide, (1230, 0, 1280, wide.height))

    # Tofu is the same box whatever the missing character: a name drawn like one whose letters
    # are characters no font has (U+E000, private use) would be drawn as boxes.
    def as_tofu(name: str, box: str = "\ue000") -> str:
        return "".join(char if char.isascii() else box for char in name)

    control = [as_tofu(NON_LATIN[0], "\ue001"), *NON_LATIN[1:]]
    assert render(control).tobytes() == render([as_tofu(NON_LATIN[0]), *NON_LATIN[1:]]).tobytes()
    for i, name in enumerate(NON_LATIN):
        boxes = render([*NON_LATIN[:i], as_tofu(name), *NON_LATIN[i + 1 :]])
        assert boxes.size == page.size
        assert ImageChops.difference(page, boxes).getbbox(), f"{name} is drawn as empty boxes"

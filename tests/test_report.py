"""Tests for batchclassify.report: real JSONL files and images in tmp_path, the page read back.

The page is parsed with the stdlib HTML parser and checked against what the JSONL says, through
the ids and data- attributes the module docstring documents. The last tests render it in a real
headless Chromium when one is installed.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import stat
import subprocess
from collections import Counter
from collections.abc import Iterable
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from images import RED, close_to, oriented_jpeg, photo, png_claiming, quadrants, save, solid
from PIL import Image

from batchclassify import report
from batchclassify.errors import ConfigError
from batchclassify.model import ErrorInfo, Result
from batchclassify.report import build_report, write_report
from batchclassify.summary import LatencyHistogram

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
    assert page.counts("count", "data-class") == expected == {"cat": 2, "dog": 1, "bird": 1}
    assert page.number("no-class") == 1
    assert page.counts("predicted", "data-class") == {}  # single-label: no second column


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

    assert page.counts("count", "data-class") == {"cat": 2, "dog": 2, "hat": 0}
    assert page.counts("predicted", "data-class") == {"cat": 3, "dog": 2, "hat": 1}
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
    assert by_status == {
        ("http", "429"): 1,
        ("http", "503"): 2,
        ("timeout", "none"): 1,
        ("not_found", "none"): 1,
    }
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
    torn = json.dumps(ok("t.jpg", "cat", 0.1))[:30]  # a killed run's last line, no newline
    lines = [good[0], *bad_lines[:5], "\n", "   \n", good[1], *bad_lines[5:], good[2], torn]
    text = build_report(write_jsonl(tmp_path / "results.jsonl", lines))
    page = Page(text)

    unreadable = len(bad_lines) + 1
    assert page.number("unreadable") == unreadable
    assert f"{unreadable} unreadable lines" in text
    assert "line 2, 3, 4, 5, 6, …" in text  # where to look; blank lines are not counted
    assert "The last line is incomplete" in text
    assert page.number("total") == 3
    assert page.number("ok") == 2
    assert page.counts("count", "data-class") == {"cat": 1, "dog": 1}


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

    assert page.number("unreadable") == 2
    assert page.counts("count", "data-class") == {"cat": 1, "dog": 1}


def row_lines() -> st.SearchStrategy[bytes]:
    valid = st.builds(
        lambda top, confidence: json.dumps(ok("p.jpg", top, confidence)).encode(),
        st.text(max_size=10),
        st.floats(0, 1),
    )
    junk = st.one_of(st.binary(max_size=40), st.text(max_size=40).map(str.encode))
    return st.one_of(valid, junk.map(lambda b: b.replace(b"\n", b"")))


@settings(max_examples=40, deadline=None)
@given(lines=st.lists(row_lines(), max_size=12), newline_at_end=st.booleans())
def test_any_bytes_give_a_page_with_every_line_accounted_for(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], newline_at_end: bool
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "results.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if newline_at_end else b""))
    page = Page(build_report(path, thumbnails=2))

    valid = sum(1 for line in lines if line.startswith(b'{"source": "p.jpg"'))
    non_blank = sum(1 for line in lines if line.strip())
    assert page.number("total") == valid
    assert page.number("unreadable") == non_blank - valid


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
    assert page.counts("count", "data-class") == {HOSTILE: 1, ATTRIBUTE_BREAKER: 1}
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
    return write_report(path, tmp_path / "report.html", thumbnails=8)


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
    assert dom.counts("count", "data-class") == {"cat": 4, "dog": 5, HOSTILE: 4}
    assert not [tag for tag, _ in dom.tags if tag == "script"]


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

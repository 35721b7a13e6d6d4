"""Sources: real folders, symlinks and list files in tmp_path."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import image_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import batchclassify.sources as sources_module
from batchclassify.model import Item
from batchclassify.sources import (
    SourceOptions,
    count_items,
    iter_items,
    parse_extensions,
)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sources(items) -> list[str]:  # type: ignore[no-untyped-def]
    return [item.source for item in items]


def test_directory_is_recursive_sorted_and_case_insensitive(tmp_path: Path) -> None:
    touch(tmp_path / "b.JPG")
    touch(tmp_path / "a.png")
    touch(tmp_path / "sub" / "c.WebP")
    touch(tmp_path / "sub" / "deeper" / "d.tiff")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub" / "readme.md")
    got = sources(iter_items([str(tmp_path)]))
    assert got == [
        str(tmp_path / "a.png"),
        str(tmp_path / "b.JPG"),
        str(tmp_path / "sub" / "c.WebP"),
        str(tmp_path / "sub" / "deeper" / "d.tiff"),
    ]


def test_directory_skips_hidden_files_and_folders(tmp_path: Path) -> None:
    touch(tmp_path / ".hidden.jpg")
    touch(tmp_path / ".cache" / "x.jpg")
    touch(tmp_path / "seen.jpg")
    assert sources(iter_items([str(tmp_path)])) == [str(tmp_path / "seen.jpg")]
    with_hidden = SourceOptions(include_hidden=True)
    assert len(list(iter_items([str(tmp_path)], with_hidden))) == 3


def test_symlink_loops_and_duplicate_links_are_visited_once(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "one.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    os.symlink(tmp_path / "a", tmp_path / "again")
    got = sources(iter_items([str(tmp_path)]))
    assert got == [str(tmp_path / "a" / "one.jpg")]


def test_broken_symlink_with_image_extension_is_reported(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    items = list(iter_items([str(tmp_path)]))
    assert [item.path for item in items] == [tmp_path / "broken.jpg"]


def test_extensions_option(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.heic")
    options = SourceOptions(extensions=parse_extensions("HEIC, .jpg"))
    assert len(list(iter_items([str(tmp_path)], options))) == 2
    assert parse_extensions("jpg,,PNG, .webp ") == {".jpg", ".png", ".webp"}


def test_single_file_and_missing_path_are_items(tmp_path: Path) -> None:
    image = touch(tmp_path / "x.jpeg")
    items = list(iter_items([str(image), str(tmp_path / "missing.jpg")]))
    assert [item.path for item in items] == [image, tmp_path / "missing.jpg"]
    assert all(item.problem is None for item in items)


def test_urls_and_bad_urls(tmp_path: Path) -> None:
    items = list(
        iter_items(
            ["https://example.com/a.jpg", "http://host/b.png", "ftp://host/c.jpg", "https://"]
        )
    )
    assert [item.url for item in items[:2]] == ["https://example.com/a.jpg", "http://host/b.png"]
    assert "unsupported URL scheme" in (items[2].problem or "")
    assert "no host" in (items[3].problem or "")


def test_txt_list_resolves_relative_paths_against_its_folder(tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    listing = touch(
        lists / "inputs.txt",
        b"# a comment\n\nimg/a.jpg\n  /abs/b.jpg  \nhttps://example.com/c.jpg\n",
    )
    items = list(iter_items([str(listing)]))
    assert [item.path for item in items[:2]] == [lists / "img" / "a.jpg", Path("/abs/b.jpg")]
    assert items[2].url == "https://example.com/c.jpg"
    assert len(items) == 3


def test_csv_list_with_default_and_named_columns(tmp_path: Path) -> None:
    listing = touch(
        tmp_path / "data.csv",
        b'id,Image,label\n1,a.jpg,x\n2,"b, with comma.jpg",y\n3,,z\n\n4,https://e.com/d.jpg,w\n',
    )
    items = list(iter_items([str(listing)]))
    assert items[0].path == tmp_path / "a.jpg"
    assert items[1].path == tmp_path / "b, with comma.jpg"
    assert items[2].problem is not None and "empty" in items[2].problem
    assert items[2].source.endswith("data.csv:4")
    assert items[3].url == "https://e.com/d.jpg"
    named = list(iter_items([str(listing)], SourceOptions(column="label")))
    assert named[0].path == tmp_path / "x"


def test_csv_without_a_usable_column_is_one_error(tmp_path: Path) -> None:
    listing = touch(tmp_path / "data.csv", b"id,name\n1,a.jpg\n")
    items = list(iter_items([str(listing)]))
    assert len(items) == 1
    assert items[0].problem is not None and "--column" in items[0].problem


def test_jsonl_list_with_malformed_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps({"url": "https://e.com/a.jpg"}),
        "{not json",
        json.dumps({"path": "rel/b.png", "other": 1}),
        json.dumps([1, 2]),
        json.dumps("c.jpg"),
        json.dumps({"nothing": "here"}),
        "",
    ]
    listing = touch(tmp_path / "data.jsonl", "\n".join(lines).encode())
    items = list(iter_items([str(listing)]))
    assert items[0].url == "https://e.com/a.jpg"
    assert items[1].problem is not None and "malformed JSON" in items[1].problem
    assert items[1].source.endswith("data.jsonl:2")
    assert items[2].path == tmp_path / "rel" / "b.png"
    assert items[3].problem is not None
    assert items[4].path == tmp_path / "c.jpg"
    assert items[5].problem is not None
    assert len(items) == 6


def test_unreadable_list_files_become_error_items(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads anything")
    locked = touch(tmp_path / "locked.txt", b"a.jpg\n")
    locked.chmod(0)
    items = list(iter_items([str(locked)]))
    assert len(items) == 1
    assert items[0].problem is not None and "cannot read" in items[0].problem


def test_stdin_list() -> None:
    stdin = io.StringIO("https://e.com/a.jpg\n\n# skip\nlocal.jpg\n")
    items = list(iter_items(["-"], stdin=stdin))
    assert items[0].url == "https://e.com/a.jpg"
    assert items[1].path == Path.cwd() / "local.jpg"
    assert count_items(["-"]) is None


def test_count_matches_iteration(tmp_path: Path) -> None:
    for n in range(5):
        touch(tmp_path / f"d{n % 2}" / f"{n}.jpg")
    listing = touch(tmp_path / "l.txt", b"a.jpg\nb.jpg\n")
    specs = [str(tmp_path / "d0"), str(tmp_path / "d1"), str(listing)]
    assert count_items(specs) == len(list(iter_items(specs))) == 7


def test_sources_stream_lazily(tmp_path: Path) -> None:
    listing = tmp_path / "big.txt"
    listing.write_text("".join(f"https://e.com/{n}.jpg\n" for n in range(100_000)))
    iterator = iter_items([str(listing)])
    first = next(iterator)
    assert first.url == "https://e.com/0.jpg"



# --- the text contract: a broken entry is one error row, names keep their bytes -------------


def meets_contract(text: str) -> bool:
    """What downstream code relies on (see the module docstring of batchclassify.sources)."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return "\0" not in text


def assert_contract(items: list[Item]) -> None:
    for item in items:
        assert meets_contract(item.source), item
        assert item.path is None or meets_contract(str(item.path)), item
        assert (item.problem is None) == ((item.path is None) != (item.url is None)), item


def read(path: Path, options: SourceOptions | None = None) -> list[Item]:
    items = list(iter_items([str(path)], options))
    assert_contract(items)
    return items


def logical_lines(data: bytes) -> list[str]:
    """The lines the readers see: UTF-8 with surrogateescape, BOM dropped, universal newlines."""
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    return re.split(r"\r\n|\r|\n", text)


def test_nul_in_a_txt_line_is_one_error_row_and_the_list_goes_on(tmp_path: Path) -> None:
    listing = touch(tmp_path / "l.txt", b"a.jpg\nb\x00.jpg\nhttps://e.com/\x00\nc.jpg\n")
    items = read(listing)
    assert [item.path for item in items[::3]] == [tmp_path / "a.jpg", tmp_path / "c.jpg"]
    assert [item.source for item in items[1:3]] == [f"{listing}:2", f"{listing}:3"]
    assert all("contains a NUL byte" in (item.problem or "") for item in items[1:3])
    assert count_items([str(listing)]) == 4


def test_nul_in_a_csv_field_is_one_error_row_and_the_list_goes_on(tmp_path: Path) -> None:
    listing = touch(tmp_path / "l.csv", b"path,label\na.jpg,x\nb\x00.jpg,y\nc.jpg,z\n")
    items = read(listing)
    assert [item.path for item in (items[0], items[2])] == [tmp_path / "a.jpg", tmp_path / "c.jpg"]
    assert items[1].source == f"{listing}:3"
    # Python 3.11+ parses the NUL into the field; older csv modules reject the line.
    assert "NUL" in (items[1].problem or "")
    assert len(items) == 3


def test_jsonl_lone_surrogate_is_one_error_row_and_the_list_goes_on(tmp_path: Path) -> None:
    listing = touch(
        tmp_path / "l.jsonl",
        b'{"path": "a\\ud800.jpg"}\n"\\udfff"\n{"path": "b\\u0000.jpg"}\n{"path": "c.jpg"}\n',
    )
    items = read(listing)
    assert [item.source for item in items[:3]] == [f"{listing}:{n}" for n in (1, 2, 3)]
    assert "not valid Unicode" in (items[0].problem or "")
    assert "not valid Unicode" in (items[1].problem or "")
    assert "contains a NUL byte" in (items[2].problem or "")
    assert items[3].path == tmp_path / "c.jpg"


def test_jsonl_escape_of_an_undecodable_byte_names_that_byte(tmp_path: Path) -> None:
    # "\udce9" is how os.fsdecode spells the byte 0xE9 of a Latin-1 name: it is kept.
    listing = touch(tmp_path / "l.jsonl", b'{"path": "caf\\udce9.jpg"}\n')
    [item] = read(listing)
    assert item.path is not None
    assert os.fsencode(item.path) == os.fsencode(tmp_path) + b"/caf\xe9.jpg"


def test_jsonl_field_of_the_wrong_type_says_so(tmp_path: Path) -> None:
    lines = b'{"image": 5}\n{"url": null}\n{"path": ["a.jpg"]}\n{"path": "  "}\n""\n'
    items = read(touch(tmp_path / "l.jsonl", lines))
    problems = [item.problem or "" for item in items]
    assert "wrong type" in problems[0] and "'image' is int" in problems[0]
    assert "'url' is null" in problems[1]
    assert "'path' is list" in problems[2]
    assert "empty 'path' field" in problems[3]
    assert "empty string" in problems[4]


def test_jsonl_lines_that_json_cannot_take_are_one_row_each(tmp_path: Path) -> None:
    lines = [b"[" * 100_000, b'{"path": ' + b"9" * 5000 + b"}", b"\xff\xfe", b'"ok.jpg"']
    items = read(touch(tmp_path / "l.jsonl", b"\n".join(lines)))
    assert all("malformed JSON" in (item.problem or "") for item in items[:3])
    assert items[3].path == tmp_path / "ok.jpg"


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_invalid_utf8_is_one_line_not_the_whole_list(tmp_path: Path, suffix: str) -> None:
    entries = [b"caf\xe9.jpg", b"\xff\xfe\x81junk.jpg", b"fine.jpg"]
    if suffix == ".jsonl":
        entries = [b'{"path": "' + entry + b'"}' for entry in entries]
    header = b"path\n" if suffix == ".csv" else b""
    listing = touch(tmp_path / f"l{suffix}", header + b"\n".join(entries) + b"\n")
    items = read(listing)
    assert [os.fsencode(item.path or "") for item in items] == [
        os.fsencode(tmp_path) + b"/caf\xe9.jpg",
        os.fsencode(tmp_path) + b"/\xff\xfe\x81junk.jpg",
        os.fsencode(tmp_path) + b"/fine.jpg",
    ]


def test_utf8_bom_is_dropped_from_list_files(tmp_path: Path) -> None:
    assert read(touch(tmp_path / "l.txt", b"\xef\xbb\xbfa.jpg\n"))[0].path == tmp_path / "a.jpg"
    csv_items = read(touch(tmp_path / "l.csv", b"\xef\xbb\xbfpath\r\nb.jpg\r\n"))
    assert [item.path for item in csv_items] == [tmp_path / "b.jpg"]


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_url_that_is_not_utf8_is_an_error_row(tmp_path: Path, suffix: str) -> None:
    header = b"url\n" if suffix == ".csv" else b""
    listing = touch(tmp_path / f"l{suffix}", header + b"https://e.com/\xe9.jpg\nhttps://e.com/ok\n")
    items = read(listing)
    assert items[0].problem == "URL is not valid UTF-8"
    assert items[1].url == "https://e.com/ok"


def test_malformed_urls_are_error_rows(tmp_path: Path) -> None:
    items = list(iter_items(["http://[::1/a.jpg", "https://a\uff03b/c.jpg"]))
    assert_contract(items)
    assert all("malformed URL" in (item.problem or "") for item in items)


def test_csv_malformed_record_is_one_row_and_the_file_goes_on(tmp_path: Path) -> None:
    huge = b"x" * (csv.field_size_limit() + 10)
    listing = touch(tmp_path / "l.csv", b"path\na.jpg\n" + huge + b"\nb.jpg\n")
    items = read(listing)
    assert items[0].path == tmp_path / "a.jpg"
    assert items[1].source == f"{listing}:3"
    assert "malformed CSV" in (items[1].problem or "")
    assert items[2].path == tmp_path / "b.jpg"
    assert len(items) == 3


def test_csv_quote_left_open_at_the_end_is_one_error_row(tmp_path: Path) -> None:
    listing = touch(tmp_path / "l.csv", b'path\na.jpg\n"b.jpg\nc.jpg\n')
    items = read(listing)
    assert items[0].path == tmp_path / "a.jpg"
    assert items[1].source == f"{listing}:3"  # where the record (and its quote) starts
    assert "not closed" in (items[1].problem or "")
    assert len(items) == 2
    # A last line without a newline is not an open quote.
    closed = read(touch(tmp_path / "m.csv", b'path\n"a, b.jpg"'))
    assert [item.path for item in closed] == [tmp_path / "a, b.jpg"]


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_over_long_line_is_one_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    monkeypatch.setattr(sources_module, "MAX_LINE", 50)
    header = b"path\n" if suffix == ".csv" else b""
    entry = b'"ok.jpg"' if suffix == ".jsonl" else b"ok.jpg"
    body = b"x" * 400 + b"\n" + b" " * 400 + b"\n" + entry + b"\n"
    listing = touch(tmp_path / f"l{suffix}", header + body)
    items = read(listing)
    assert len(items) == 2
    assert "longer than 50" in (items[0].problem or "")
    assert items[0].source == f"{listing}:{2 if header else 1}"
    assert items[1].path == tmp_path / "ok.jpg"


def test_bad_names_given_directly_are_error_rows(tmp_path: Path) -> None:
    specs = ["a\x00.jpg", "b\ud800.jpg", "https://e.com/\x00", "n" * 5000 + ".jpg"]
    items = list(iter_items(specs))
    assert_contract(items)
    assert items[0].source == "a\\x00.jpg" and "NUL" in (items[0].problem or "")
    assert items[1].source == "b\\ud800.jpg" and "not valid Unicode" in (items[1].problem or "")
    assert "NUL" in (items[2].problem or "")
    # A name too long for the OS: the preparation step reports it, like a missing file.
    assert items[3].path == Path("n" * 5000 + ".jpg")
    assert count_items(specs) == 4


def test_stdin_is_read_as_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = io.BytesIO(b"\xef\xbb\xbf/data/caf\xe9.jpg\n/x\x00\n\xff\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw, encoding="utf-8"))
    items = list(iter_items(["-"]))
    assert_contract(items)
    assert os.fsencode(items[0].path or "") == b"/data/caf\xe9.jpg"
    assert items[1].source == "<stdin>:2" and "NUL" in (items[1].problem or "")
    assert os.fsencode(items[2].path or "") == os.fsencode(Path.cwd()) + b"/\xff"
    assert not raw.closed  # our decoding wrapper let go of the process's stdin


def test_stdin_text_stream_with_bad_characters() -> None:
    stdin = io.StringIO("a\ud800.jpg\nb\x00.jpg\nc\udce9.jpg\n")
    items = list(iter_items(["-"], stdin=stdin))
    assert_contract(items)
    assert [item.source for item in items[:2]] == ["<stdin>:1", "<stdin>:2"]
    assert items[2].path == Path.cwd() / "c\udce9.jpg"


def test_latin1_named_image_is_found_and_opens(tmp_path: Path) -> None:
    folder = os.fsencode(tmp_path / "photos")
    os.mkdir(folder)
    name = os.path.join(folder, b"caf\xe9.jpg")
    try:
        with open(name, "wb") as out:
            out.write(image_bytes())
    except OSError:  # pragma: no cover - a filesystem that wants UTF-8 names (macOS APFS)
        pytest.skip("this filesystem does not take non-UTF-8 file names")
    listing_name = os.path.join(os.fsencode(tmp_path), b"l\xe9.txt")
    with open(listing_name, "wb") as out:
        out.write(b"photos/caf\xe9.jpg\nbad\x00\n")
    listing = os.fsdecode(listing_name)

    walked = list(iter_items([os.fsdecode(folder)]))
    listed = list(iter_items([listing]))
    assert_contract(walked + listed)
    assert [item.path for item in walked] == [listed[0].path]
    for item in (walked[0], listed[0]):
        assert item.path is not None and os.fsencode(item.path) == name
        with Image.open(item.path) as image:
            assert image.size == (64, 48)
    # The error row of the list is located in a list whose own name is not UTF-8.
    assert listed[1].source == f"{listing}:2" and "NUL" in (listed[1].problem or "")
    assert count_items([os.fsdecode(folder), listing]) == 3


# --- properties: any bytes in any line --------------------------------------------------------

SPECIAL_LINES = [
    b"",
    b"\x00",
    b"a\x00b.jpg",
    b"\xff\xfe",
    b"\xef\xbb\xbf",
    b"caf\xe9.jpg",
    b"https://e.com/\xe9",
    b"https://e.com/a.jpg",
    b"http://[::1",
    b'"',
    b'"a,b"',
    b"\r",
    b"#",
    b"  # not a comment? yes, it is",
    b"~",
    b"x" * 3000,
    b'{"path": "a\\ud800"}',
    b'{"path": "a\\udce9"}',
    b'{"image": 5}',
    b"[" * 2000,
]
ANY_LINE = st.one_of(st.binary(max_size=40), st.sampled_from(SPECIAL_LINES))
ANY_LIST = st.tuples(st.booleans(), st.lists(ANY_LINE, max_size=12)).map(
    lambda bom_lines: (b"\xef\xbb\xbf" if bom_lines[0] else b"") + b"\n".join(bom_lines[1])
)


def read_fuzzed(name: str, data: bytes) -> tuple[Path, list[Item]]:
    with tempfile.TemporaryDirectory() as folder:
        listing = touch(Path(folder) / name, data)
        items = read(listing)
        assert count_items([str(listing)]) == len(items)
    return listing.parent, items


@settings(max_examples=150, deadline=None)
@given(ANY_LIST)
def test_txt_any_bytes_one_item_per_entry_line(data: bytes) -> None:
    base, items = read_fuzzed("list.txt", data)
    entries = [line.strip() for line in logical_lines(data)]
    entries = [entry for entry in entries if entry and not entry.startswith("#")]
    assert len(items) == len(entries)
    for entry, item in zip(entries, items, strict=True):
        if "\0" in entry:
            assert item.problem is not None and "NUL" in item.problem
        elif item.path is not None and not entry.startswith("~"):
            assert item.path == base / entry


@settings(max_examples=150, deadline=None)
@given(ANY_LIST)
def test_jsonl_any_bytes_one_item_per_non_blank_line(data: bytes) -> None:
    _, items = read_fuzzed("list.jsonl", data)
    assert len(items) == sum(1 for line in logical_lines(data) if line.strip())


# Any code point, surrogates included, and the awkward ones often (a list of characters: st.text
# would merge the alphabets into one and draw the awkward ones no more often than any other).
AWKWARD = st.sampled_from(["\x00", "\ud800", "\udfff", "\udc00", "\udce9", "\r", " ", "#"])
ANY_TEXT = st.lists(st.characters(codec=None) | AWKWARD, max_size=20).map("".join)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries({"path": ANY_TEXT})
        | st.dictionaries(st.sampled_from(["path", "url", "x"]), JSON_VALUE)
        | JSON_VALUE
    )
)
def test_jsonl_any_json_values_one_item_per_line(records: list[object]) -> None:
    # json.dumps escapes lone surrogates (\ud800), the case bytes rarely reach.
    data = b"\n".join(json.dumps(record).encode() for record in records)
    _, items = read_fuzzed("list.jsonl", data)
    assert len(items) == len(records)


@settings(max_examples=150, deadline=None)
@given(ANY_LIST)
def test_csv_any_bytes_never_raises(data: bytes) -> None:
    _, items = read_fuzzed("list.csv", b"path,label\n" + data)
    assert len(items) <= len(logical_lines(data))


PLAIN_CELL = st.binary(max_size=40).filter(lambda cell: not re.search(rb'[",\r\n]', cell))


@settings(max_examples=150, deadline=None)
@given(st.lists(PLAIN_CELL | st.sampled_from([b"\x00", b"caf\xe9.jpg", b"\xff"]), max_size=12))
def test_csv_any_unquoted_bytes_one_item_per_non_blank_row(cells: list[bytes]) -> None:
    _, items = read_fuzzed("list.csv", b"path\n" + b"\n".join(cells))
    values = [cell.decode("utf-8", "surrogateescape").strip() for cell in cells]
    assert len(items) == sum(1 for value in values if value)


@settings(max_examples=60, deadline=None)
@given(st.lists(ANY_TEXT))
def test_txt_text_stream_never_breaks_the_contract(lines: list[str]) -> None:
    text = "\n".join(line.replace("\r", " ") for line in lines)
    items = list(iter_items(["-"], stdin=io.StringIO(text)))
    assert_contract(items)
    expected = [line.strip() for line in text.split("\n")]
    assert len(items) == sum(1 for line in expected if line and not line.startswith("#"))

"""Sources: real folders, symlinks and list files in tmp_path."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_unreadable_and_binary_list_files_become_error_items(tmp_path: Path) -> None:
    binary = touch(tmp_path / "bad.txt", b"\xff\xfe\x00\x81garbage")
    items = list(iter_items([str(binary)]))
    assert len(items) == 1 and items[0].problem is not None
    if os.geteuid() != 0:  # root reads anything
        locked = touch(tmp_path / "locked.txt", b"a.jpg\n")
        locked.chmod(0)
        items = list(iter_items([str(locked)]))
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


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)))
def test_txt_parser_never_crashes_and_skips_blanks_and_comments(lines: list[str]) -> None:
    text = "\n".join(line.replace("\r", " ") for line in lines)
    items = list(iter_items(["-"], stdin=io.StringIO(text)))
    expected = [
        line.strip()
        for line in text.split("\n")
        if line.strip() and not line.strip().startswith("#")
    ]
    assert len(items) == len(expected)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300))
def test_list_parsers_survive_arbitrary_bytes(tmp_path_factory, suffix: str, data: bytes) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("fuzz") / f"list{suffix}"
    path.write_bytes(data)
    for item in iter_items([str(path)]):
        assert item.problem is not None or item.path is not None or item.url is not None

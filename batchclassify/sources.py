"""Where inputs come from: directories, single files, URLs, list files (txt, csv, jsonl), stdin.

Every source is a plain synchronous generator of :class:`~batchclassify.model.Item`, so it streams
(a million-line list is never held in memory) and is easy to test. The pipeline pulls from it in
a worker thread, in chunks, so filesystem latency never blocks the event loop.

A problem with one entry (a malformed list line, a bad URL, a list file that cannot be read)
becomes an ``Item`` with ``problem`` set: it is reported as a failed row, and the run goes on.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from batchclassify.model import Item

__all__ = [
    "DEFAULT_EXTENSIONS",
    "LIST_SUFFIXES",
    "SourceOptions",
    "count_items",
    "iter_items",
    "parse_extensions",
]

DEFAULT_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LIST_SUFFIXES = frozenset({".txt", ".csv", ".jsonl", ".ndjson"})
#: column / field names tried, in order, when ``--column`` is not given
DEFAULT_COLUMNS = ("url", "path", "image")
STDIN = "-"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceOptions:
    """How sources are read. ``extensions`` are lower-case and start with a dot."""

    extensions: frozenset[str] = DEFAULT_EXTENSIONS
    column: str | None = None
    include_hidden: bool = False


def parse_extensions(text: str) -> frozenset[str]:
    """``"jpg,PNG, .webp"`` -> ``{".jpg", ".png", ".webp"}``."""
    parts = (part.strip().lower() for part in text.split(","))
    return frozenset(part if part.startswith(".") else f".{part}" for part in parts if part)


def iter_items(
    specs: Iterable[str], options: SourceOptions | None = None, *, stdin: TextIO | None = None
) -> Iterator[Item]:
    """Yield one item per input named by ``specs``, in order, streaming."""
    options = options or SourceOptions()
    for spec in specs:
        yield from _iter_spec(spec, options, stdin)


def count_items(specs: Iterable[str], options: SourceOptions | None = None) -> int | None:
    """How many items :func:`iter_items` will yield, or ``None`` when it cannot be known
    up front (stdin is read once)."""
    specs = list(specs)
    if STDIN in specs:
        return None
    return sum(1 for _ in iter_items(specs, options))


def _iter_spec(spec: str, options: SourceOptions, stdin: TextIO | None) -> Iterator[Item]:
    if spec == STDIN:
        yield from _iter_text_lines(stdin or sys.stdin, Path.cwd(), "<stdin>")
        return
    if _SCHEME.match(spec):
        yield _url_item(spec, spec)
        return
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        yield from _walk_directory(path, options)
    elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
        yield from _iter_list_file(path, options)
    else:
        # A single image, or something that is not there: the preparation step reports which.
        yield Item(source=spec, path=path)


def _url_item(url: str, source: str) -> Item:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return Item(source=source, problem=f"unsupported URL scheme {parts.scheme!r}")
    if not parts.hostname:
        return Item(source=source, problem="URL has no host name")
    return Item(source=source, url=url)


def _entry_item(value: str, base: Path) -> Item:
    """An entry of a list: a URL, or a path relative to the list's folder."""
    if _SCHEME.match(value):
        return _url_item(value, value)
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = base / path
    return Item(source=str(path), path=path)


# --- directories -----------------------------------------------------------------------------


def _walk_directory(root: Path, options: SourceOptions) -> Iterator[Item]:
    """Depth-first, names sorted, so two runs over the same tree list it in the same order.

    Symlinked directories are followed once: each directory is identified by (device, inode),
    which makes symlink loops and two links to one folder harmless.
    """
    seen: set[tuple[int, int]] = set()
    stack: list[Path] = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
        except OSError as exc:
            yield Item(source=str(folder), problem=f"cannot read folder: {exc.strerror}")
            continue
        identity = (info.st_dev, info.st_ino)
        if identity in seen:
            continue
        seen.add(identity)
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            yield Item(source=str(folder), problem=f"cannot read folder: {exc.strerror}")
            continue
        subfolders: list[Path] = []
        for entry in entries:
            if entry.name.startswith(".") and not options.include_hidden:
                continue
            path = folder / entry.name
            if _is_dir(entry):
                subfolders.append(path)
            elif os.path.splitext(entry.name)[1].lower() in options.extensions:
                # Broken symlinks are kept on purpose: the user should hear about them.
                yield Item(source=str(path), path=path)
        stack.extend(reversed(subfolders))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


# --- list files ------------------------------------------------------------------------------


def _iter_list_file(path: Path, options: SourceOptions) -> Iterator[Item]:
    suffix = path.suffix.lower()
    try:
        # newline="" keeps csv's quoting of embedded newlines intact; harmless for the others.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if suffix == ".csv":
                yield from _iter_csv(handle, path, options)
            elif suffix in (".jsonl", ".ndjson"):
                yield from _iter_jsonl(handle, path, options)
            else:
                yield from _iter_text_lines(handle, path.parent, str(path))
    except OSError as exc:
        yield Item(source=str(path), problem=f"cannot read list file: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        yield Item(source=str(path), problem=f"list file is not UTF-8 text: {exc.reason}")


def _iter_text_lines(handle: TextIO, base: Path, name: str) -> Iterator[Item]:
    for line in handle:
        value = line.strip()
        if value and not value.startswith("#"):
            yield _entry_item(value, base)


def _iter_csv(handle: TextIO, path: Path, options: SourceOptions) -> Iterator[Item]:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None:
        return
    names = [name.strip() for name in header]
    column = _pick_column(names, options.column)
    if column is None:
        yield Item(source=str(path), problem=_missing_column_message(path, names, options))
        return
    index = names.index(column)
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or not any(cell.strip() for cell in row):
                continue
            value = row[index].strip() if index < len(row) else ""
            if not value:
                yield Item(source=where, problem=f"empty {column!r} field")
                continue
            yield _entry_item(value, path.parent)
    except csv.Error as exc:
        yield Item(source=f"{path}:{reader.line_num}", problem=f"malformed CSV: {exc}")


def _iter_jsonl(handle: TextIO, path: Path, options: SourceOptions) -> Iterator[Item]:
    for number, line in enumerate(handle, start=1):
        text = line.strip()
        if not text:
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Item(source=where, problem=f"malformed JSON: {exc.msg}")
            continue
        if isinstance(record, str):
            yield _entry_item(record, path.parent)
            continue
        if not isinstance(record, dict):
            yield Item(source=where, problem="expected a JSON object or string")
            continue
        column = _pick_column(list(record), options.column)
        value = record.get(column) if column else None
        if not isinstance(value, str) or not value.strip():
            yield Item(source=where, problem=_missing_column_message(path, list(record), options))
            continue
        yield _entry_item(value.strip(), path.parent)


def _pick_column(names: list[str], wanted: str | None) -> str | None:
    candidates = (wanted,) if wanted else DEFAULT_COLUMNS
    lowered = {name.lower(): name for name in names}
    for candidate in candidates:
        if candidate is not None and candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def _missing_column_message(path: Path, names: list[str], options: SourceOptions) -> str:
    wanted = repr(options.column) if options.column else " / ".join(map(repr, DEFAULT_COLUMNS))
    found = ", ".join(map(repr, names[:10])) or "none"
    return f"no {wanted} field (found: {found}); name the field with --column"

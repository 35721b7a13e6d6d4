"""Where inputs come from: directories, single files, URLs, list files (txt, csv, jsonl), stdin.

Every source is a plain synchronous generator of :class:`~batchclassify.model.Item`, so it streams
(a million-line list is never held in memory) and is easy to test. The pipeline pulls from it in
a worker thread, in chunks, so filesystem latency never blocks the event loop.

A problem with one entry (a malformed list line, a bad URL, a list file that cannot be read)
becomes an ``Item`` with ``problem`` set: it is reported as a failed row, and the run goes on.
One bad line of a list is one such row; reading goes on with the next line.

The text contract, which downstream code relies on: for every item yielded, ``item.source`` and
``str(item.path)`` (when set) contain no NUL and satisfy ``s.encode("utf-8", "surrogateescape")``.
That is, a lone surrogate only appears in the range U+DC80..U+DCFF, where it stands for an
undecodable byte of a POSIX file name, exactly as ``os.fsdecode`` and ``os.listdir`` give such
names, so the file can still be opened. To keep it:

- list files and stdin are read as bytes and decoded as UTF-8 with ``surrogateescape`` (a
  leading BOM is dropped), so a Latin-1 file name in a list still names its file;
  a text stream handed in as ``stdin=`` is taken as already decoded;
- a list entry (a line, the CSV field, the JSONL value) holding a NUL, or a lone surrogate that
  stands for no byte (a JSON ``"\\ud800"`` escape), is a problem item located as ``LIST:LINE``;
  so is a URL that is not valid UTF-8, a malformed CSV record, a malformed JSON line and a line
  longer than :data:`MAX_LINE` characters (skipped without being held in memory);
- an input named on the command line or through the API that breaks the contract is a problem
  item whose ``source`` shows the bad characters as escapes;
- directory walks keep the names ``os.scandir`` gives, which already follow the contract.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TextIO
from urllib.parse import urlsplit

from batchclassify import objects
from batchclassify.errors import ConfigError
from batchclassify.model import Item
from batchclassify.text import valid_unicode

__all__ = [
    "DEFAULT_EXTENSIONS",
    "LIST_SUFFIXES",
    "MAX_LINE",
    "SourceOptions",
    "check_sources",
    "count_items",
    "iter_items",
    "parse_extensions",
]

DEFAULT_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LIST_SUFFIXES = frozenset({".txt", ".csv", ".jsonl", ".ndjson"})
#: column / field names tried, in order, when ``--column`` is not given
DEFAULT_COLUMNS = ("url", "path", "image")
STDIN = "-"
#: longest list line read, in characters: far above any path (PATH_MAX is 4096 bytes), URL or
#: JSONL record, and small enough that a junk file without newlines is never held in memory
MAX_LINE = 1 << 20

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NEWLINES = ("\n", "\r")


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceOptions:
    """How sources are read. ``extensions`` are lower-case and start with a dot."""

    extensions: frozenset[str] = DEFAULT_EXTENSIONS
    column: str | None = None
    include_hidden: bool = False
    #: columns (CSV) or fields (JSONL) of list files to carry into each row, by name
    keep_columns: tuple[str, ...] = ()


def parse_extensions(text: str) -> frozenset[str]:
    """``"jpg,PNG, .webp"`` -> ``{".jpg", ".png", ".webp"}``."""
    parts = (part.strip().lower() for part in text.split(","))
    return frozenset(part if part.startswith(".") else f".{part}" for part in parts if part)


def iter_items(
    specs: Iterable[str], options: SourceOptions | None = None, *, stdin: TextIO | None = None
) -> Iterator[Item]:
    """Yield one item per input named by ``specs``, in order, streaming.

    ``stdin`` replaces the process's stdin for the spec ``-``; it is read as text, as it is.
    """
    options = options or SourceOptions()
    # Objects named one by one in lists are looked up (their ETag) in batches: objects.py.
    yield from objects.with_identities(_iter_specs(specs, options, stdin))


def _iter_specs(
    specs: Iterable[str], options: SourceOptions, stdin: TextIO | None
) -> Iterator[Item]:
    keep = options.keep_columns
    for spec in specs:
        for item in _iter_spec(spec, options, stdin):
            if keep and item.columns is None:
                # Every row gets the same keys, so the CSV has fixed columns and joins work.
                item = replace(item, columns=dict.fromkeys(keep))
            yield item


def check_sources(specs: Iterable[str]) -> None:
    """Refuse, before anything is sent, an input named directly that does not exist: a typo
    (``photoz/``) is a usage error, not one error row after a "successful" run. Entries of a
    list stay error rows; URLs and ``-`` are not checked here."""
    for spec in specs:
        if objects.is_object_url(spec):
            objects.check_source(spec)  # a missing bucket or object, no credentials
            continue
        if spec == STDIN or _SCHEME.match(spec) or _text_problem(spec) is not None:
            continue
        path = Path(os.path.expanduser(spec))
        try:
            if path.exists() or path.is_symlink():
                continue
        except OSError:
            continue  # a name too long and the like: the preparation step reports it
        hint = _similar_name(path)
        raise ConfigError(
            f"input {spec!r} does not exist" + (f" (did you mean {hint!r}?)" if hint else "")
        )


def _similar_name(path: Path) -> str | None:
    """A name beside ``path`` that looks like what was meant, as a typo's likely fix."""
    folder = path.parent
    try:
        names = [entry.name for entry in os.scandir(folder)][:10_000]
    except OSError:
        return None
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return str(folder / close[0]) if close else None


def count_items(specs: Iterable[str], options: SourceOptions | None = None) -> int | None:
    """How many items :func:`iter_items` will yield, or ``None`` when it cannot be known
    up front (stdin is read once)."""
    specs = list(specs)
    if STDIN in specs:
        return None
    return sum(1 for _ in iter_items(specs, options))


# --- the text contract -----------------------------------------------------------------------


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot be a source or a path under the module's contract, or ``None``."""
    if "\0" in text:
        # No OS call takes it (os.stat and open raise ValueError), and no file name holds one.
        return "contains a NUL byte"
    if text.isascii():  # the common case, without encoding every line
        return None
    try:
        # Lone surrogates U+DC80..U+DCFF are undecodable bytes of a file name: they encode back.
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate that stands for no byte)"
    return None


def _printable(text: str) -> str:
    """``text`` with what breaks the contract spelled as escapes, to name a rejected input."""
    return text.replace("\0", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


# --- specs -----------------------------------------------------------------------------------


def _iter_spec(spec: str, options: SourceOptions, stdin: TextIO | None) -> Iterator[Item]:
    if spec == STDIN:
        yield from _iter_stdin(stdin)
        return
    # Command-line names arrive surrogateescaped already; API callers can pass anything.
    problem = _text_problem(spec)
    if problem is not None:
        yield Item(source=_printable(spec), problem=f"input name {problem}")
        return
    if objects.is_object_url(spec):
        # Object storage (objects.py): a list file kept in a bucket, a prefix or one object.
        if objects.names_list_file(spec):
            yield from _iter_object_list(spec, options)
        else:
            yield from objects.iter_objects(
                spec, options.extensions, include_hidden=options.include_hidden
            )
        return
    if _SCHEME.match(spec):
        yield _url_item(spec)
        return
    path = Path(os.path.expanduser(spec))
    try:
        is_dir = path.is_dir()
        is_list = not is_dir and path.suffix.lower() in LIST_SUFFIXES and path.is_file()
    except OSError:
        # Path.is_dir swallows only "not there" errors; a name too long raises. The preparation
        # step reports such a path as unreadable, like any other single file.
        is_dir = is_list = False
    if is_dir:
        yield from _walk_directory(path, options)
    elif is_list:
        yield from _iter_list_file(path, options)
    else:
        # A single image, or something that is not there: the preparation step reports which.
        yield Item(source=spec, path=path)


def _url_item(url: str) -> Item:
    """An item for ``url``, which already meets the contract (it may hold surrogateescapes)."""
    try:
        # Surrogateescapes are fine in a file name, but a URL is sent as text: it must be UTF-8.
        url.encode("utf-8")
    except UnicodeEncodeError:
        return Item(source=url, problem="URL is not valid UTF-8")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:  # an unclosed IPv6 bracket, a host that NFKC-normalises to '/'
        return Item(source=url, problem=f"malformed URL: {exc}")
    if parts.scheme.lower() not in ("http", "https"):
        return Item(source=url, problem=f"unsupported URL scheme {parts.scheme!r}")
    if not hostname:
        return Item(source=url, problem="URL has no host name")
    return Item(source=url, url=url)


def _entry_item(
    value: str, where: str, base: Path | str, columns: dict[str, Any] | None = None
) -> Item:
    """An entry of a list (stripped, not blank): a URL, or a path relative to the list's folder.
    The item's ``source`` is the entry as written, so results join back to the list.

    ``where`` (``LIST:LINE``) is the source of the problem item when ``value`` breaks the contract.
    ``base`` is a ``str`` (an object URL prefix) for a list kept in object storage: its relative
    entries name objects beside it.
    """
    problem = _text_problem(value)
    if problem is not None:
        return Item(source=where, problem=f"list entry {problem}", columns=columns)
    if objects.is_object_url(value) or (
        isinstance(base, str) and not _SCHEME.match(value) and not os.path.isabs(value)
    ):
        return objects.entry_item(value, base if isinstance(base, str) else None, where, columns)
    if _SCHEME.match(value):
        return replace(_url_item(value), columns=columns)
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and isinstance(base, Path):
        path = base / path
    return Item(source=value, path=path, columns=columns)


# --- directories -----------------------------------------------------------------------------


def _walk_directory(root: Path, options: SourceOptions) -> Iterator[Item]:
    """Depth-first, names sorted, so two runs over the same tree list it in the same order.

    Symlinked directories are followed once: each directory is identified by (device, inode),
    which makes symlink loops and two links to one folder harmless.

    Names are used as ``os.scandir`` gives them: undecodable bytes are surrogateescaped, which is
    the module's contract, and joining, sorting and lower-casing them are plain ``str`` work.
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


# --- reading lines ---------------------------------------------------------------------------


def _decoded(binary: BinaryIO) -> io.TextIOWrapper:
    """Text over ``binary`` that never fails to decode: invalid UTF-8 bytes become the
    surrogateescapes of the contract (a line is one name, whatever its bytes), a leading BOM is
    dropped, and newline="" keeps line endings as they are (csv needs them for quoted fields)."""
    return io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _read_lines(handle: TextIO) -> Iterator[tuple[int, str, bool]]:
    """``(number, line, whole)`` for each line of ``handle``, its line ending included.

    A line longer than :data:`MAX_LINE` is read and dropped piece by piece: it comes as its first
    piece with ``whole`` false, or as an empty line if it is only whitespace.
    """
    number = 0
    while line := handle.readline(MAX_LINE + 1):
        number += 1
        if len(line) <= MAX_LINE or line.endswith(_NEWLINES):
            yield number, line, True
            continue
        blank = not line.strip()
        rest = line
        while rest and not rest.endswith(_NEWLINES):
            rest = handle.readline(MAX_LINE)
            blank = blank and not rest.strip()
        yield (number, "", True) if blank else (number, line, False)


def _too_long_message() -> str:
    return f"line longer than {MAX_LINE} characters"


# --- list files ------------------------------------------------------------------------------


def _iter_stdin(stdin: TextIO | None) -> Iterator[Item]:
    base = Path.cwd()
    handle: TextIO = stdin if stdin is not None else sys.stdin
    wrapper: io.TextIOWrapper | None = None
    # The process's stdin is read as bytes, like a list file; a stream handed in is text already.
    binary: BinaryIO | None = getattr(sys.stdin, "buffer", None)
    if stdin is None and binary is not None:
        handle = wrapper = _decoded(binary)
    try:
        yield from _iter_text_lines(handle, base, "<stdin>")
    except OSError as exc:
        yield Item(source="<stdin>", problem=f"cannot read stdin: {exc.strerror or exc}")
    finally:
        if wrapper is not None:
            wrapper.detach()  # so that dropping the wrapper does not close the process's stdin


def _iter_list_file(path: Path, options: SourceOptions) -> Iterator[Item]:
    try:
        with _decoded(path.open("rb")) as handle:
            yield from _iter_list(handle, path.suffix.lower(), str(path), path.parent, options)
    except OSError as exc:
        yield Item(source=str(path), problem=f"cannot read list file: {exc.strerror or exc}")


def _iter_object_list(url: str, options: SourceOptions) -> Iterator[Item]:
    """A list file kept in object storage; relative entries name objects beside it."""
    suffix = os.path.splitext(url)[1].lower()
    try:
        with _decoded(objects.open_object(url)) as handle:  # type: ignore[arg-type]
            yield from _iter_list(handle, suffix, url, objects.list_base(url), options)
    except OSError as exc:
        yield Item(source=url, problem=f"cannot read list file: {exc.strerror or exc}")


def _iter_list(
    handle: TextIO, suffix: str, name: str, base: Path | str, options: SourceOptions
) -> Iterator[Item]:
    if suffix == ".csv":
        yield from _iter_csv(handle, name, base, options)
    elif suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(handle, name, base, options)
    else:
        yield from _iter_text_lines(handle, base, name)


def _iter_text_lines(handle: TextIO, base: Path | str, name: str) -> Iterator[Item]:
    for number, line, whole in _read_lines(handle):
        value = line.strip()
        if value.startswith("#") or (whole and not value):  # a cut line is never blank
            continue
        where = f"{name}:{number}"
        if not whole:
            yield Item(source=where, problem=_too_long_message())
            continue
        yield _entry_item(value, where, base)


class _CsvLines:
    """The lines ``csv.reader`` parses, and what the reader cannot tell about them: how many
    over-long lines were replaced by an empty one (:func:`_read_lines`), and whether the end of
    the file was reached."""

    def __init__(self, handle: TextIO) -> None:
        self._lines = _read_lines(handle)
        self.cut = 0
        self.ended = False

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        try:
            _, line, whole = next(self._lines)
        except StopIteration:
            self.ended = True
            raise
        if whole:
            return line
        self.cut += 1
        return "\n"


def _csv_records(handle: TextIO, path: str) -> Iterator[tuple[str, list[str] | str]]:
    """``(LIST:LINE, row)`` for each CSV record, LINE being where the record starts; a record
    that cannot be read comes with the reason (a ``str``) instead of its row."""
    lines = _CsvLines(handle)
    reader = csv.reader(lines)
    while True:
        where = f"{path}:{reader.line_num + 1}"
        cut = lines.cut
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader starts afresh on the line after the one that failed (a NUL before
            # Python 3.11, a field over csv.field_size_limit()): one bad record, one error row.
            yield where, f"malformed CSV: {exc}"
            continue
        if lines.ended:
            # csv.reader only asks for a line past the last one while inside a quoted field.
            yield where, "malformed CSV: a quoted field is not closed before the end of the file"
            return
        if lines.cut != cut:
            yield where, f"malformed CSV: {_too_long_message()}"
            continue
        yield where, row


def _iter_csv(
    handle: TextIO, path: str, base: Path | str, options: SourceOptions
) -> Iterator[Item]:
    records = _csv_records(handle, path)
    first = next(records, None)
    if first is None:
        return
    where, header = first
    if isinstance(header, str):
        yield Item(source=where, problem=f"{header} (the header row)")
        return
    names = [name.strip() for name in header]
    column = _pick_column(names, options.column)
    if column is None:
        yield Item(source=path, problem=_missing_column_message(names, options))
        return
    index = names.index(column)
    for where, row in records:
        if isinstance(row, str):
            yield Item(source=where, problem=row)
            continue
        if not any(cell.strip() for cell in row):
            continue
        value = row[index].strip() if index < len(row) else ""
        kept = _kept(options.keep_columns, functools.partial(_cell, row, names))
        if not value:
            yield Item(source=where, problem=f"empty {column!r} field", columns=kept)
            continue
        yield _entry_item(value, where, base, kept)


def _iter_jsonl(
    handle: TextIO, path: str, base: Path | str, options: SourceOptions
) -> Iterator[Item]:
    for number, line, whole in _read_lines(handle):
        text = line.strip()
        if whole and not text:  # a cut line is never blank
            continue
        where = f"{path}:{number}"
        if not whole:
            yield Item(source=where, problem=_too_long_message())
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Item(source=where, problem=f"malformed JSON: {exc.msg}")
            continue
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, [[[[... nested deep
            yield Item(source=where, problem=f"malformed JSON: {exc}")
            continue
        yield _jsonl_item(record, where, base, options)


def _jsonl_item(record: object, where: str, base: Path | str, options: SourceOptions) -> Item:
    """The item for one parsed JSONL line: a bare string, or an object with the path/URL field."""
    fields = record if isinstance(record, dict) else {}
    kept = _kept(options.keep_columns, fields.get)
    if isinstance(record, str):
        value, what = record, "string"
    elif isinstance(record, dict):
        column = _pick_column(list(record), options.column)
        if column is None:
            problem = _missing_column_message(list(record), options)
            return Item(source=where, problem=problem, columns=kept)
        value = record[column]
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            return Item(
                source=where,
                problem=f"field {column!r} has the wrong type (found: {column!r} is {kind}); "
                "expected a path or URL string",
                columns=kept,
            )
        what = f"{column!r} field"
    else:
        return Item(source=where, problem="expected a JSON object or string")
    if not value.strip():
        return Item(source=where, problem=f"empty {what}", columns=kept)
    return _entry_item(value.strip(), where, base, kept)


def _kept(keep: tuple[str, ...], lookup: Callable[[str], Any]) -> dict[str, Any] | None:
    """The ``--keep-columns`` of one list entry (a missing one is ``None``), as values that
    any output can hold: text, whole numbers, finite floats, booleans; anything else (a nested
    object, NaN) as its JSON text."""
    return {name: _plain(lookup(name)) for name in keep} if keep else None


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str):
        return valid_unicode(value)
    return valid_unicode(json.dumps(value, ensure_ascii=False, default=str))


def _cell(row: list[str], names: list[str], wanted: str) -> str | None:
    for index, name in enumerate(names):
        if name == wanted:
            return row[index] if index < len(row) else None
    return None


def _pick_column(names: list[str], wanted: str | None) -> str | None:
    candidates = (wanted,) if wanted else DEFAULT_COLUMNS
    lowered = {name.lower(): name for name in names}
    for candidate in candidates:
        if candidate is not None and candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def _missing_column_message(names: list[str], options: SourceOptions) -> str:
    wanted = repr(options.column) if options.column else " / ".join(map(repr, DEFAULT_COLUMNS))
    found = ", ".join(map(repr, names[:10])) or "none"
    return f"no {wanted} field (found: {found}); name the field with --column"

"""Durable run state: what every input became, so a run can resume and a folder scan can skip.

One SQLite database (stdlib ``sqlite3``, WAL journal) per job, beside the first output by
default. It is the source of truth; output files are views of it that may lag behind::

    results(seq, key, final, content_hash, record)   one row per input key, in commit order
    meta(name, value)                                 what the state belongs to (model, endpoint)

``key`` identifies an input: a file's resolved path, size and mtime (so a changed file is new),
a URL itself, an object's URL, ETag and version id. ``final`` is 0 for rows worth another try
(timeouts, 429/5xx …) and 1 otherwise.
``record`` is the JSONL record; the CSV row and the dedup answer are rebuilt from it.

The write order that makes outputs exactly-once is described in ARCHITECTURE.md: results are
committed here first, then appended to the outputs; on resume each output is cut back to its last
whole row, and the rows it lacks are appended from here in ``seq`` order.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from batchclassify import objects
from batchclassify.errors import ConfigError, RunAborted
from batchclassify.model import Item, Result, record_json

__all__ = [
    "RETRYABLE_ERROR_TYPES",
    "Skipped",
    "StateLock",
    "StateStore",
    "default_state_path",
    "is_final",
    "item_key",
    "parse_shard",
    "remove_state",
    "select_items",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    final INTEGER NOT NULL,
    content_hash TEXT,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_content ON results (content_hash) WHERE content_hash IS NOT NULL;
"""
#: error types a resumed run tries again without being asked (``--retry-failed`` retries all)
RETRYABLE_ERROR_TYPES = frozenset({"timeout", "connection", "malformed_response", "internal"})
_RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def default_state_path(outputs: Iterable[str]) -> Path | None:
    """``results.jsonl`` -> ``results.jsonl.state``: beside the first file output."""
    for output in outputs:
        if objects.is_object_url(output):
            return objects.default_state_path(output)  # SQLite needs a local disk
        if output != "-":
            return Path(output).with_name(Path(output).name + ".state")
    return None


def is_final(result: Result) -> bool:
    """False for a failure that may well succeed on another try."""
    error = result.error
    if result.ok or error is None:
        return True
    if error.type in RETRYABLE_ERROR_TYPES:
        return False
    return not (error.http_status in _RETRYABLE_STATUSES or (error.http_status or 0) >= 500)


_INSERT = "INSERT OR IGNORE INTO results (key, final, content_hash, record) VALUES (?, ?, ?, ?)"


def _row(result: Result) -> tuple[str, int, str | None, str]:
    if result.key is None:
        raise ValueError(f"a result without an input key: {result.source!r}")
    content_hash = result.content_hash if result.ok else None
    return result.key, int(is_final(result)), content_hash, record_json(result)


def item_key(item: Item) -> str:
    """The stable identity of an input (see the module docstring)."""
    if item.obj is not None:
        # URL + ETag (+ version id): a rewritten object is a new input (objects.py).
        return _key_text(objects.object_key(item.obj))
    if item.url is not None:
        return f"url:{_key_text(item.url)}"
    if item.path is None:
        return f"entry:{_key_text(item.source)}"
    try:
        info = os.stat(item.path)
        real = os.path.realpath(item.path)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return f"missing:{_key_text(str(item.path))}"
    return f"file:{_key_text(real)}:{info.st_size}:{info.st_mtime_ns}"


def _key_text(text: str) -> str:
    """``text`` itself when it is valid UTF-8, else an unambiguous ``b64:`` form of its exact
    code points: a file name that is not UTF-8 (kept by surrogateescape) must still have one
    key of its own, and SQLite stores only valid text. Real paths and URLs never start with
    ``b64:``, so the two forms cannot collide."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "b64:" + base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")
    return text


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> ``(2, 8)``: this machine takes shard 2 of 8 (shards count from 0)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(
            f"--shard must look like K/N, shard K of N counted from 0 (e.g. 0/4), got {text!r}"
        ) from None
    if count < 1:
        raise ConfigError(f"--shard {text}: N, the number of shards, must be at least 1")
    if not 0 <= index < count:
        raise ConfigError(
            f"--shard {text}: K must be between 0 and {count - 1} (N-1): shards count from 0"
        )
    return index, count


def in_shard(
    source: str, shard: tuple[int, int] | None, part: tuple[int, int] | None = None
) -> bool:
    """The shard is picked from the input as listed, so every machine agrees on it whatever
    its file system looks like. ``part`` splits the shard further (``--processes``), from
    other bits of the same hash, so the parts of every shard are even."""
    try:
        raw = source.encode("utf-8", "surrogateescape")  # the bytes as listed
    except UnicodeEncodeError:
        raw = source.encode("utf-8", "surrogatepass")
    value = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")
    if shard is not None:
        index, count = shard
        if value % count != index:
            return False
        value //= count
    return part is None or value % part[1] == part[0]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What results depend on: resuming with another model or endpoint would mix answers."""

    model: str
    endpoint: str
    confidence: str
    max_size: str

    def items(self) -> dict[str, str]:
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "confidence": self.confidence,
            "max_size": self.max_size,
        }


class StateStore:
    """The run's SQLite state. Used from the event loop thread only, except through
    :meth:`reader`, which opens a separate connection for the producer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _create_private(path)
        self._db = _connect(path)
        with self._readable():
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _readable(self) -> Iterator[None]:
        """Reading or setting up the state: a damaged file is a clear error, not a traceback."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            raise _damaged(self.path, exc) from None

    def reader(self) -> StateReader:
        return StateReader(self.path)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        # Explicit BEGIN/COMMIT: the connection is in autocommit mode, so that reads never
        # hold a transaction open (which would stop WAL checkpoints).
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- meta ------------------------------------------------------------------------------

    def check_fingerprint(self, fingerprint: Fingerprint) -> None:
        """Adopt ``fingerprint`` in a new state; refuse a state made with other settings."""
        with self._readable():
            stored = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        wanted = fingerprint.items()
        if not stored:
            with self._readable(), self._transaction():
                self._db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
            return
        changed = [name for name, value in wanted.items() if stored.get(name) != value]
        if changed:
            was = ", ".join(f"{name}={stored.get(name)!r}" for name in changed)
            raise ConfigError(
                f"the state {str(self.path)!r} belongs to a run with {was}; results of other "
                "settings would be mixed. Use another --state (or --out), or --overwrite to "
                "start over"
            )

    # --- results ---------------------------------------------------------------------------

    def count(self) -> int:
        with self._readable():
            return int(self._db.execute("SELECT count(*) FROM results").fetchone()[0])

    def record(self, results: Iterable[Result]) -> list[Result]:
        """Commit ``results`` in one transaction; returns those that were new (an input seen
        twice in one run, e.g. listed twice, is stored and reported once). Raises
        :class:`RunAborted` when the state cannot be written (a full disk, say): classifying
        more would only pay for answers that cannot be kept."""
        try:
            return self._record(results)
        except sqlite3.Error as exc:
            raise RunAborted(
                f"cannot write the state {str(self.path)!r}: {exc}. The results it holds are "
                "safe: free some space, then run the same command with --resume"
            ) from None

    def _record(self, results: Iterable[Result]) -> list[Result]:
        batch = list(results)
        rows = [_row(result) for result in batch]
        with self._transaction():
            self._db.execute("SAVEPOINT batch")  # where a batch with a repeated key goes back to
            before = self._db.total_changes
            # One statement for the batch: every row is new unless an input came twice.
            self._db.executemany(_INSERT, rows)
            if self._db.total_changes - before == len(rows):
                return batch
            # Some were repeats: find which, row by row (rare: an input listed twice).
            self._db.execute("ROLLBACK TO batch")
            new: list[Result] = []
            for result, row in zip(batch, rows, strict=True):
                if self._db.execute(_INSERT, row).rowcount:
                    new.append(result)
        return new

    def forget_retryable(self, *, all_failures: bool) -> int:
        """Drop failed rows so a resumed run classifies them again; returns how many."""
        query = (
            "DELETE FROM results WHERE json_extract(record, '$.status') != 'ok'"
            if all_failures
            else "DELETE FROM results WHERE final = 0"
        )
        with self._readable(), self._transaction():
            return self._db.execute(query).rowcount

    def records(self, *, skip: int = 0) -> Iterator[Result]:
        """Every stored result in commit order, from the ``skip``-th on."""
        with self._readable():
            cursor = self._db.execute(
                "SELECT record FROM results ORDER BY seq LIMIT -1 OFFSET ?", (skip,)
            )
            for (record,) in cursor:
                yield Result.from_dict(json.loads(record))

    def content_hashes(self) -> Iterator[str]:
        """The hash of every stored ``ok`` result's bytes (for the dedup's filter)."""
        with self._readable():
            yield from _content_hashes(self._db)

    def lookup_content(self, content_hash: str) -> Result | None:
        """An ``ok`` result for these exact image bytes, if one was stored."""
        return _lookup_content(self._db, content_hash)


class StateReader:
    """A read-only view for the producer thread (WAL lets it read while the writer commits)."""

    def __init__(self, path: Path) -> None:
        self._db = _connect(path, check_same_thread=False)

    def is_done(self, key: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone() is not None
        )

    def status(self, key: str) -> str | None:
        """The stored status of an input (``ok``/``error``), ``None`` when it has no row."""
        row = self._db.execute(
            "SELECT json_extract(record, '$.status') FROM results WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else str(row[0])

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM results").fetchone()[0])

    def content_hashes(self) -> Iterator[str]:
        """As :meth:`StateStore.content_hashes` (a worker process's dedup reads the state)."""
        return _content_hashes(self._db)

    def lookup_content(self, content_hash: str) -> Result | None:
        return _lookup_content(self._db, content_hash)

    def retryable(self, *, all_failures: bool) -> int:
        """Rows a resumed run would try again (see :meth:`StateStore.forget_retryable`)."""
        query = (
            "SELECT count(*) FROM results WHERE json_extract(record, '$.status') != 'ok'"
            if all_failures
            else "SELECT count(*) FROM results WHERE final = 0"
        )
        return int(self._db.execute(query).fetchone()[0])

    def record_texts(self) -> Iterator[str]:
        """Every stored record as its JSON text, in commit order."""
        for (record,) in self._db.execute("SELECT record FROM results ORDER BY seq"):
            yield str(record)

    def close(self) -> None:
        self._db.close()


@dataclass
class Skipped:
    """Inputs :func:`select_items` left out on purpose: done by an earlier run, or another
    machine's shard."""

    done_earlier: int = 0
    other_shards: int = 0


def select_items(
    items: Iterable[Item],
    *,
    reader: StateReader | None,
    shard: tuple[int, int] | None,
    skipped: Skipped | None = None,
    part: tuple[int, int] | None = None,
) -> Iterator[Item]:
    """Give every item its key; drop those of other shards and those already done (counted in
    ``skipped``), and those of the shard's other ``part`` (another process's: not counted)."""
    skipped = skipped if skipped is not None else Skipped()
    for item in items:
        if shard is not None and not in_shard(item.source, shard):
            skipped.other_shards += 1
            continue
        if part is not None and not in_shard(item.source, shard, part):
            continue
        key = item_key(item)
        if reader is not None and reader.is_done(key):
            skipped.done_earlier += 1
            continue
        yield item.with_key(key)


def _content_hashes(db: sqlite3.Connection) -> Iterator[str]:
    for (content_hash,) in db.execute(
        "SELECT content_hash FROM results WHERE content_hash IS NOT NULL"
    ):
        yield str(content_hash)


def _lookup_content(db: sqlite3.Connection, content_hash: str) -> Result | None:
    row = db.execute(
        "SELECT record FROM results WHERE content_hash = ? LIMIT 1", (content_hash,)
    ).fetchone()
    return Result.from_dict(json.loads(row[0])) if row else None


def remove_state(path: Path) -> None:
    """Delete a state database and its WAL side files (``--overwrite``)."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


class StateLock:
    """An exclusive lock beside the state, so two runs or scans never share it.

    ``flock`` locks die with their process, so the lock of a crashed or killed run is free
    again at once: there is no stale lock to clean up.
    """

    def __init__(self, state_path: Path) -> None:
        self.path = Path(f"{state_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the lock file {str(self.path)!r}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"another batchclassify run (pid {holder}) is using {str(self.path)[:-5]!r}; "
                "it may still be running: wait for it, or use another --state"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _create_private(path: Path) -> None:
    """Create the state file readable by its owner only: it names the endpoint and every
    input. SQLite gives its -wal and -shm files the same mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the state file {str(path)!r}: {exc.strerror}") from None


def _connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a crash of the process loses nothing committed; a power cut may
        # lose the last transactions, which a resumed run then simply classifies again.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
    except sqlite3.DatabaseError as exc:
        raise _damaged(path, exc) from None
    return db


def _damaged(path: Path, exc: sqlite3.DatabaseError) -> ConfigError:
    return ConfigError(
        f"the state {str(path)!r} is damaged or not a state ({exc}), so no run can continue "
        "from it. Start over with --overwrite (every input is classified again), or keep the "
        "outputs and start a new run with another --state"
    )

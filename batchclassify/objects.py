"""Object storage (``s3://``, ``gs://``, ``az://`` …) through fsspec: listing, reading, identity,
presigned URLs and staged outputs. The rest of the package only asks :func:`is_object_url`
and calls in here; fsspec and its filesystem packages are optional extras, imported on first use.

Sources
    ``s3://bucket/prefix/`` (or ``s3://bucket``) names every object under the prefix whose name
    has an image extension (hidden names skipped, like folder walks), listed lazily: S3 through
    s3fs's own page iterator (``S3FileSystem._iterdir``: paginated ListObjectsV2, 1000 keys a
    page, each page retried by s3fs), pulled a page at a time, so a prefix of millions of keys is
    never held in memory. Other protocols go through ``fs.walk``, which holds one "directory"
    listing at a time: memory grows with the largest directory, not the whole prefix.
    ``s3://bucket/key.jpg`` is one object; ``s3://bucket/lists/urls.txt`` (``.txt``/``.csv``/
    ``.jsonl``) is a list file read from the bucket, whose entries may name objects too
    (absolute ``s3://`` URLs, or names relative to the list's own prefix).

Identity
    An object is ``ObjectRef(url, etag, version_id)``: its state key is the URL plus ETag (plus
    the version id in a versioned S3 bucket), so a rewritten object is a new input and ``scan``
    classifies only new or changed objects. Objects named one by one in a list are looked up
    (HEAD) in concurrent batches of :data:`LOOKUP_BATCH` to learn their ETag.

Reading
    An object's bytes are read on fsspec's own event loop (``_cat_file``), awaited from the
    pipeline's workers, so reads run concurrently without holding a thread each. Transient
    failures are retried by s3fs/botocore; what still fails becomes an error row of type
    ``connection``, which ``--resume`` retries.

Credentials and endpoint
    Never ours: each filesystem package's usual chain (for S3: ``AWS_ACCESS_KEY_ID``/
    ``AWS_PROFILE``/instance role, and botocore's ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` for
    S3-compatible stores), plus fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``, or
    ``~/.config/fsspec/*.json``).

Outputs
    ``--out s3://bucket/labels.jsonl`` is written to a local staging file (beside the state, so
    ``--resume`` repairs and continues it like any local output) and uploaded at checkpoints and
    on completion by :class:`UploadingSink`. Each upload is one PUT or one multipart upload that
    is completed only once every part is in (and aborted otherwise), so the object appears whole
    or not at all; only whole rows are uploaded. Parquet is uploaded on completion only (its file
    is valid only once closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar

from batchclassify.errors import ConfigError, InputError, RunAborted
from batchclassify.model import Item, ObjectRef, Result

__all__ = [
    "DEFAULT_UPLOAD_INTERVAL",
    "LOOKUP_BATCH",
    "StagedOutput",
    "UploadingSink",
    "check_source",
    "default_state_path",
    "entry_item",
    "is_object_url",
    "iter_objects",
    "list_base",
    "names_list_file",
    "object_key",
    "open_object",
    "presign",
    "read_object",
    "stage_outputs",
    "staging_notes",
    "uploading_sinks",
    "with_identities",
]

log = logging.getLogger("batchclassify")

_T = TypeVar("_T")
#: URL scheme -> the extra that brings its filesystem package. Other fsspec protocols (ftp,
#: sftp, hdfs …) are not taken as inputs: an ``ftp://`` URL stays an unsupported URL.
_SCHEMES = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"),
    "abfs": ("azure", "adlfs"),
    "abfss": ("azure", "adlfs"),
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: objects named one by one (list entries) looked up concurrently at a time
LOOKUP_BATCH = 64
#: keys pulled from a listing per hop to fsspec's event loop (one ListObjectsV2 page)
_PAGE = 1000
#: seconds between checkpoint uploads of an output, by default
DEFAULT_UPLOAD_INTERVAL = 300.0
#: seconds a presigned URL stays valid: far above a request's retries (--max-outage 600 s)
PRESIGN_EXPIRES = 3600
#: bytes copied per write when uploading an output
_UPLOAD_CHUNK = 1 << 22
_LIST_SUFFIXES = (".txt", ".csv", ".jsonl", ".ndjson")
_OUTPUT_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet")


def is_object_url(text: str) -> bool:
    """``s3://…``, ``gs://…``, ``az://…`` and the like: read through fsspec."""
    match = _SCHEME.match(text)
    return match is not None and match.group(1).lower() in _SCHEMES


def _protocol(url: str) -> str:
    match = _SCHEME.match(url)
    assert match is not None, url
    return match.group(1).lower()


def _is_s3(url: str) -> bool:
    return _protocol(url) in ("s3", "s3a")


def _split(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b.jpg`` -> ``("bucket", "a/b.jpg")``."""
    rest = url[len(_protocol(url)) + 3 :]
    bucket, _, key = rest.partition("/")
    return bucket, key


# --- filesystems -----------------------------------------------------------------------------


def _filesystem(url: str, *, version_aware: bool = False) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` (fsspec caches instances) and the path within it.
    A missing package is a :class:`ConfigError` that says which extra to install."""
    protocol = _protocol(url)
    extra, package = _SCHEMES[protocol]
    hint = f"reading or writing {protocol}:// needs {package}: pip install 'batchclassify[{extra}]'"
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ConfigError(hint) from None
    options: dict[str, Any] = {"version_aware": True} if version_aware and _is_s3(url) else {}
    try:
        fs, path = url_to_fs(url, **options)
    except ImportError:
        raise ConfigError(hint) from None
    return fs, path


def _run(fs: Any, coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` on fsspec's event loop thread, from a synchronous caller."""
    from fsspec.asyn import sync

    async def call() -> _T:
        return await coroutine

    return sync(fs.loop, call)  # type: ignore[no-any-return]


async def _await_on(fs: Any, coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Await ``coroutine`` on fsspec's event loop from ours: the filesystem's sessions belong
    to that loop, and no thread is held while it runs."""
    future = asyncio.run_coroutine_threadsafe(coroutine, fs.loop)
    return await asyncio.wrap_future(future)


def _problem(url: str, exc: BaseException) -> str:
    """What went wrong with ``url``, in words, for messages (no secrets: these come from the
    filesystem package, which never quotes credentials)."""
    name = type(exc).__name__
    bucket, _ = _split(url)
    if name == "NoCredentialsError":
        return (
            f"no credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, or run where an instance role applies"
        )
    text = str(exc) or name
    if isinstance(exc, FileNotFoundError):
        if "bucket" in text.lower():
            return f"the bucket {bucket!r} does not exist ({url})"
        return f"{url} does not exist"
    if isinstance(exc, PermissionError):
        return f"access to {url} was denied: {text}"
    return f"{url}: {name}: {text}"


# --- identity --------------------------------------------------------------------------------


def _ref(url: str, info: dict[str, Any]) -> ObjectRef:
    """The identity of the object ``info`` describes (from a listing or a HEAD)."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("md5")
    version = info.get("VersionId") or info.get("generation") or info.get("version_id")
    size = info.get("size", info.get("Size"))
    if etag is None:
        # A store without ETags: size and modification time stand in, like a local file's key.
        stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
        etag = f"~{size}:{stamp}"
    return ObjectRef(
        url=url,
        etag=str(etag).strip('"'),
        version_id=None if version in (None, "null") else str(version),
        size=None if size is None else int(size),
    )


def object_key(ref: ObjectRef) -> str:
    """The state key of an object: its URL, ETag and version id (when versioned)."""
    key = f"object:{ref.url}:{ref.etag}"
    return f"{key}:{ref.version_id}" if ref.version_id else key


# --- sources ---------------------------------------------------------------------------------


def names_list_file(url: str) -> bool:
    """Whether ``url`` names a list file (by its extension) rather than images."""
    return not url.endswith("/") and url.lower().endswith(_LIST_SUFFIXES)


def check_source(url: str) -> None:
    """Refuse, before anything is sent, an object source that cannot be read: a missing
    package, bucket or object, no credentials. A prefix with no objects is fine (an empty
    folder is too)."""
    fs, path = _filesystem(url)
    bucket, key = _split(url)
    try:
        if key and not key.endswith("/"):
            fs.info(path)
        elif _is_s3(url):
            _run(fs, _first(fs._iterdir(bucket, prefix=key, delimiter="", max_items=1)))
        elif not fs.exists(path):
            raise FileNotFoundError(path)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"input {_problem(url, exc)}") from None


async def _first(listing: AsyncIterator[_T]) -> list[_T]:
    async for entry in listing:
        return [entry]
    return []


def iter_objects(url: str, extensions: frozenset[str], *, include_hidden: bool) -> Iterator[Item]:
    """One item per image object under ``url`` (a prefix, a bucket or one object), streamed.
    A listing that breaks off (after the filesystem's own retries) raises: the run stops and
    ``--resume`` lists again, skipping what was done."""
    fs, path = _filesystem(url)
    bucket, key = _split(url)
    if key and not key.endswith("/"):
        try:
            info = fs.info(path)
        except FileNotFoundError:
            yield Item(source=url, problem=f"{url} does not exist")
            return
        if info.get("type") != "directory":
            yield _object_item(url, info)
            return
        key += "/"  # s3://bucket/photos names the "folder" photos/
    versioned = _is_s3(url) and _versioned(fs, bucket)
    entries = _list_s3(url, bucket, key, versioned) if _is_s3(url) else _walk(fs, path)
    protocol = _protocol(url)
    for info in entries:
        name = str(info["name"])
        relative = name[len(bucket) + 1 + len(key) :] if name.startswith(bucket) else name
        if name.endswith("/") or info.get("type") == "directory":
            continue  # a "folder" marker object
        if not include_hidden and any(part.startswith(".") for part in relative.split("/")):
            continue
        if os.path.splitext(name)[1].lower() not in extensions:
            continue
        yield _object_item(f"{protocol}://{name}", info)


def _object_item(url: str, info: dict[str, Any]) -> Item:
    return Item(source=url, obj=_ref(url, info))


def _versioned(fs: Any, bucket: str) -> bool:
    """Whether versioning is on (then version ids are part of identities). Without the
    permission to ask (s3:GetBucketVersioning), ETags alone identify objects."""
    try:
        return bool(fs.is_bucket_versioned(bucket))
    except Exception:
        log.debug("cannot tell whether %s is versioned", bucket, exc_info=True)
        return False


def _list_s3(url: str, bucket: str, prefix: str, versioned: bool) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix``, a page at a time from s3fs's paginated iterator."""
    fs, _ = _filesystem(url, version_aware=versioned)
    listing = fs._iterdir(bucket, prefix=prefix, delimiter="")
    try:
        while page := _run(fs, _take(listing, _PAGE)):
            yield from page
    except (ConfigError, InputError):
        raise
    except Exception as exc:
        raise OSError(f"listing {url} failed: {_problem(url, exc)}") from None
    finally:
        with contextlib.suppress(Exception):
            _run(fs, listing.aclose())


async def _take(listing: AsyncIterator[_T], count: int) -> list[_T]:
    taken: list[_T] = []
    async for entry in listing:
        taken.append(entry)
        if len(taken) >= count:
            break
    return taken


def _walk(fs: Any, path: str) -> Iterator[dict[str, Any]]:
    """Other protocols: fsspec's walk, one directory's listing in memory at a time."""
    for _, _, files in fs.walk(path, detail=True):
        yield from sorted(files.values(), key=lambda info: str(info["name"]))


def entry_item(value: str, base: str | None, where: str, columns: dict[str, Any] | None) -> Item:
    """A list entry naming an object: an object URL, or (``base`` set: the list is itself in
    object storage) a name relative to the list's prefix. Its ETag is looked up later, in
    batches (:func:`with_identities`)."""
    url = value if is_object_url(value) else f"{base}{value.lstrip('/')}"
    bucket, key = _split(url)
    if not bucket or not key or key.endswith("/"):
        return Item(
            source=value,
            problem="a list entry must name one object (a prefix is a source of its own)",
            columns=columns,
        )
    return Item(source=value, obj=ObjectRef(url=url), columns=columns)


def list_base(url: str) -> str:
    """The prefix that entries of the list file ``url`` are relative to."""
    return url.rsplit("/", 1)[0] + "/"


def open_object(url: str) -> IO[bytes]:
    """A binary file over one object, read in blocks (a list file)."""
    fs, path = _filesystem(url)
    try:
        handle: IO[bytes] = fs.open(path, "rb", block_size=1 << 22)
    except ConfigError:
        raise
    except Exception as exc:
        raise OSError(_problem(url, exc)) from None
    return handle


def with_identities(items: Iterable[Item]) -> Iterator[Item]:
    """``items`` in order, each object named one by one (no ETag yet) looked up: HEADs go out
    :data:`LOOKUP_BATCH` at a time, concurrently. A missing object becomes a problem item."""
    pending: list[Item] = []
    for item in items:
        if not pending and (item.obj is None or item.obj.etag is not None):
            yield item  # the common case: nothing to look up, nothing held back
            continue
        pending.append(item)
        if len(pending) >= LOOKUP_BATCH:
            yield from _looked_up(pending)
            pending = []
    yield from _looked_up(pending)


def _looked_up(batch: list[Item]) -> list[Item]:
    wanted = [item for item in batch if item.obj is not None and item.obj.etag is None]
    if not wanted:
        return batch
    found: dict[int, Item] = {}
    by_fs: dict[int, tuple[Any, list[tuple[Item, str]]]] = {}
    for item in wanted:
        assert item.obj is not None
        try:
            fs, path = _filesystem(item.obj.url)
        except ConfigError as exc:
            found[id(item)] = replace(item, obj=None, problem=str(exc))
            continue
        by_fs.setdefault(id(fs), (fs, []))[1].append((item, path))
    for fs, entries in by_fs.values():
        if getattr(fs, "async_impl", False):
            infos = _run(fs, _gather_infos(fs, [path for _, path in entries]))
        else:
            infos = [_info_or_error(fs, path) for _, path in entries]
        for (item, _), info in zip(entries, infos, strict=True):
            assert item.obj is not None
            url = item.obj.url
            if isinstance(info, BaseException):
                found[id(item)] = replace(item, obj=None, problem=_problem(url, info))
            elif info.get("type") == "directory":
                found[id(item)] = replace(
                    item, obj=None, problem=f"{url} is a prefix, not an object"
                )
            else:
                found[id(item)] = replace(item, obj=_ref(url, info))
    return [found.get(id(item), item) for item in batch]


async def _gather_infos(fs: Any, paths: Sequence[str]) -> list[dict[str, Any] | BaseException]:
    return list(await asyncio.gather(*(fs._info(path) for path in paths), return_exceptions=True))


def _info_or_error(fs: Any, path: str) -> dict[str, Any] | BaseException:
    try:
        return dict(fs.info(path))
    except Exception as exc:
        return exc


# --- reading ---------------------------------------------------------------------------------


async def read_object(ref: ObjectRef, *, max_bytes: int) -> bytes:
    """The bytes of this version of the object. An object that is gone, too large or not
    readable is an :class:`InputError`; a store that cannot be reached (after the filesystem's
    own retries) too, of kind ``connection``, which ``--resume`` retries."""
    url = ref.url
    if ref.size is not None and ref.size > max_bytes:
        raise InputError(f"{url}: the object is {ref.size} bytes, far too large", kind="too_large")
    fs, path = _filesystem(url, version_aware=ref.version_id is not None)
    try:
        if getattr(fs, "async_impl", False):
            extra: dict[str, Any] = {}
            if _is_s3(url):
                # One GET: by default s3fs first asks the size (a HEAD) to split big reads.
                extra = {"version_id": ref.version_id, "max_concurrency": 1}
            data = await _await_on(fs, fs._cat_file(path, **extra))
        else:
            data = await asyncio.to_thread(fs.cat_file, path)
    except FileNotFoundError:
        raise InputError(f"{url}: the object no longer exists", kind="not_found") from None
    except PermissionError as exc:
        raise InputError(_problem(url, exc), kind="unreadable") from None
    except ConfigError:
        raise
    except Exception as exc:
        if type(exc).__name__ == "NoCredentialsError":
            raise InputError(_problem(url, exc), kind="unreadable") from None
        raise InputError(f"cannot read {_problem(url, exc)}", kind="connection") from None
    return bytes(data)


async def presign(ref: ObjectRef) -> str:
    """A presigned https URL for this version of an S3 object (``--url-mode presign``): the
    service fetches it, nothing passes through here. The URL carries a signature: it is never
    written to rows or logs (:func:`batchclassify.errors.redact` removes signatures)."""
    if not _is_s3(ref.url):
        raise InputError(
            f"{ref.url}: --url-mode presign works for s3:// objects only", kind="config"
        )
    fs, path = _filesystem(ref.url)
    extra = {"VersionId": ref.version_id} if ref.version_id else {}
    try:
        url: str = await _await_on(fs, fs._url(path, expires=PRESIGN_EXPIRES, **extra))
    except Exception as exc:
        raise InputError(f"cannot presign {_problem(ref.url, exc)}", kind="unreadable") from None
    return url


# --- outputs ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StagedOutput:
    """An output in object storage (``url``) and the local file it is written to first."""

    url: str
    local: Path


def staging_name(url: str) -> str:
    """``s3://bucket/runs/labels.jsonl`` -> ``bucket-runs-labels.jsonl``: the local file an
    object output is written to (its format suffix kept)."""
    bucket, key = _split(url)
    return "-".join(part for part in (bucket, *key.split("/")) if part)


def default_state_path(url: str) -> Path:
    """The state of a run whose first output is an object: in the current directory, named
    after it (``bucket-runs-labels.jsonl.state``). SQLite needs a local disk."""
    return Path(staging_name(url) + ".state")


def stage_outputs(
    outputs: Sequence[str], state_path: Path | None, *, overwrite: bool, resume: bool
) -> tuple[list[str], list[StagedOutput]]:
    """Replace each object output by its local staging file (beside the state, else in the
    current directory). Refuses, before any request, an existing object without
    ``--overwrite`` (``--resume`` continues our own object) and a bucket that does not exist."""
    folder = state_path.parent if state_path is not None else Path()
    local: list[str] = []
    staged: list[StagedOutput] = []
    for spec in outputs:
        if not is_object_url(spec):
            local.append(spec)
            continue
        bucket, key = _split(spec)
        if not key or key.endswith("/") or not key.lower().endswith(_OUTPUT_SUFFIXES):
            raise ConfigError(
                f"cannot tell the format of output {spec!r}: name an object ending in .jsonl, "
                ".csv or .parquet"
            )
        fs, path = _filesystem(spec)
        try:
            exists = fs.exists(path)
            bucket_exists = exists or fs.exists(bucket)
        except Exception as exc:
            raise ConfigError(f"cannot check output {_problem(spec, exc)}") from None
        if not bucket_exists:
            raise ConfigError(f"output {spec!r}: the bucket {bucket!r} does not exist")
        # An earlier run's state: the runner's "pass --resume" explains it better.
        earlier_run = state_path is not None and state_path.exists()
        if exists and not (overwrite or resume or earlier_run):
            raise ConfigError(
                f"output {spec!r} already exists; pass --overwrite to replace it "
                "(or choose another --out)"
            )
        target = folder / staging_name(spec)
        local.append(str(target))
        staged.append(StagedOutput(spec, target))
    return local, staged


def staging_notes(outputs: Sequence[str], state_path: Path | None, interval: float) -> list[str]:
    """What the command line says about object outputs before a run."""
    folder = state_path.parent if state_path is not None else Path()
    notes = []
    for spec in outputs:
        if is_object_url(spec):
            local = folder / staging_name(spec)
            when = (
                "on completion"
                if spec.lower().endswith(".parquet")
                else (f"every {interval:g} s and on completion")
            )
            notes.append(f"note: {spec} is written to {local} and uploaded {when}")
    if notes and state_path is not None:
        notes.append(f"note: the state stays on this disk: {state_path} (keep it for --resume)")
    return notes


class UploadingSink:
    """A local output sink whose file is uploaded to ``staged.url`` every ``interval`` seconds
    (after a flush, so the file ends on a whole row) and on close. Uploads never overlap, and
    the final one goes last, so the object only ever grows."""

    def __init__(self, inner: Any, staged: StagedOutput, interval: float) -> None:
        self._inner = inner
        self._staged = staged
        self._interval = interval
        # Parquet is readable only once closed: no checkpoints.
        self._checkpoints = not staged.url.lower().endswith(".parquet")
        self._last = time.monotonic()
        self._upload: asyncio.Task[None] | None = None
        #: uploads completed (checkpoints and the final one)
        self.uploads = 0

    @property
    def path(self) -> str:
        return self._staged.url

    @property
    def rows_received(self) -> int:
        return int(self._inner.rows_received)

    @property
    def rows_written(self) -> int:
        return int(self._inner.rows_written)

    async def write(self, result: Result) -> None:
        await self._inner.write(result)

    async def flush(self) -> None:
        await self._inner.flush()
        due = time.monotonic() - self._last >= self._interval
        if self._checkpoints and due and (self._upload is None or self._upload.done()):
            self._last = time.monotonic()
            size = self._staged.local.stat().st_size  # the file ends on a whole row now
            self._upload = asyncio.create_task(self._checkpoint(size))

    async def _checkpoint(self, size: int) -> None:
        try:
            await asyncio.to_thread(upload_file, self._staged.local, self._staged.url, size)
            self.uploads += 1
        except Exception as exc:
            # The next checkpoint, or the final upload, tries again with more rows.
            log.warning("checkpoint upload of %s failed: %s", self._staged.url, exc)

    async def aclose(self) -> None:
        await self._inner.aclose()  # flushed, fsynced, closed (Parquet: renamed into place)
        if self._upload is not None:
            await self._upload  # never let an older checkpoint land after the final upload
        try:
            await asyncio.to_thread(upload_file, self._staged.local, self._staged.url, None)
        except Exception as exc:
            raise RunAborted(
                f"cannot upload {self._staged.url}: {exc}. The results are safe in "
                f"{str(self._staged.local)!r}: run the same command with --resume to upload them"
            ) from None
        self.uploads += 1


def uploading_sinks(
    sinks: Sequence[Any], staged: Sequence[StagedOutput], interval: float
) -> list[Any]:
    """``sinks`` with those writing a staging file wrapped in an :class:`UploadingSink`."""
    by_local = {str(entry.local): entry for entry in staged}
    wrapped = []
    for sink in sinks:
        entry = by_local.get(str(getattr(sink, "path", "")))
        wrapped.append(sink if entry is None else UploadingSink(sink, entry, interval))
    return wrapped


def upload_file(local: Path, url: str, size: int | None) -> None:
    """Upload the first ``size`` bytes of ``local`` (all with ``None``) as the object ``url``,
    whole or not at all: s3fs sends one PUT, or a multipart upload completed at close; on any
    failure the multipart upload is aborted, so no partial object appears."""
    fs, path = _filesystem(url)
    remaining = local.stat().st_size if size is None else size
    with local.open("rb") as source:
        target = fs.open(path, "wb")
        try:
            while remaining > 0:
                chunk = source.read(min(_UPLOAD_CHUNK, remaining))
                if not chunk:
                    break
                target.write(chunk)
                remaining -= len(chunk)
            target.close()
        except BaseException:
            with contextlib.suppress(Exception):
                target.discard()
            raise

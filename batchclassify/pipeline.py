"""The streaming pipeline: sources → bounded queue → workers → results, in constant memory.

::

    producer (thread, chunks) ──► asyncio.Queue(maxsize) ──► N workers ──► asyncio.Queue ──► caller
                                                              │ prepare (thread pool)
                                                              │ ClassifyClient (retry, throttle)

The queues are bounded, so however long the input, at most ``queue_size`` items wait on each side
of the workers. A failure of one item becomes an error row; only a fatal API error (bad key,
unknown model, …) or a systemic failure (``max_failures``, a long outage) stops the run.

Nothing escapes a worker unnoticed: an unexpected exception while processing an item (a bug, a
library raising something new) becomes an error row of type ``internal`` and the worker carries
on. Every item is accounted for: :attr:`Pipeline.taken` items left the sources, and each was
either yielded as a result or counted in :attr:`Pipeline.dropped` (not started because the run
stopped); the runner checks that sum at the end of every run.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, TypeVar

from batchclassify import objects
from batchclassify.batching import Batcher
from batchclassify.client import ClassifyClient, ClientOptions
from batchclassify.dedup import ContentDedup, StoredAnswers
from batchclassify.errors import (
    BatchClassifyError,
    ConfigError,
    FatalApiError,
    InputError,
    ItemRejectedError,
    RequestError,
    RunAborted,
)
from batchclassify.handoff import BatchedHandoff
from batchclassify.loop import EventLoop
from batchclassify.model import ErrorInfo, Item, Result
from batchclassify.prepare import (
    PreparedImage,
    PrepareOptions,
    default_workers,
    prepare_bytes,
    prepare_file,
)
from batchclassify.response import result_from_answer
from batchclassify.sources import SourceOptions, iter_items
from batchclassify.throttle import Throttle, ThrottleOptions

__all__ = [
    "REQUEST_ERROR_TYPES",
    "FailureLimit",
    "Pipeline",
    "PipelineOptions",
    "RunningPipeline",
    "UrlMode",
    "iter_results",
    "label_row",
]

log = logging.getLogger("batchclassify")

UrlMode = Literal["auto", "reference", "fetch", "presign"]
_T = TypeVar("_T")
#: largest image downloaded when no upload limit bounds it (``--max-size`` shrinks it after)
_DOWNLOAD_LIMIT = 512 * 1024 * 1024
#: items pulled from the (synchronous) sources per hop to the producer thread
_CHUNK = 256
_END = None
#: ``error.type`` values that come from a failed request (as opposed to a bad input)
REQUEST_ERROR_TYPES = frozenset(
    {"http", "timeout", "connection", "malformed_response", "response_too_large"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineOptions:
    """Everything that shapes a run except where its results go."""

    client: ClientOptions
    sources: SourceOptions = field(default_factory=SourceOptions)
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    throttle: ThrottleOptions = field(default_factory=ThrottleOptions)
    #: ``auto``: https URLs by reference (the service fetches them), http ones downloaded here;
    #: ``presign``: as ``auto``, and S3 objects by presigned URL instead of their bytes
    url_mode: UrlMode = "auto"
    #: bound of each queue; defaults to twice the concurrency
    queue_size: int | None = None
    #: stop the run once this many items have failed on request errors
    max_failures: int | None = None
    #: threads for image preparation (decode/resize/base64); defaults to the CPU count
    prepare_workers: int | None = None
    #: classify identical image bytes once, reusing the answer for the copies
    dedup: bool = True
    #: the ground truth of a result (``--labels``); each row then carries label and correct
    labeler: Callable[[Result], str | None] | None = None
    #: event loops in processes of their own (``--processes``): 1 runs in this process
    processes: int = 1
    #: images per request to a self-hosted server's batch route (``--batch-size``); 1: one
    #: image per request on the classic route
    batch_size: int = 1
    #: the event loop of ``--processes`` workers (see :mod:`batchclassify.loop`)
    event_loop: EventLoop = "auto"

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError("processes must be at least 1")
        if self.processes > self.client.concurrency:
            # A process with no request in flight would take its part of the inputs and
            # never classify it.
            raise ConfigError(
                f"--processes {self.processes} is more than --concurrency "
                f"{self.client.concurrency}: each process needs at least one request in flight"
            )
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        # How images are encoded follows how the client uploads them: one setting, not two.
        # The batch route takes JSON, so base64 text.
        base64_upload = self.client.upload == "base64" or self.batch_size > 1
        if self.prepare.base64_upload != base64_upload:
            prepare = dataclasses.replace(self.prepare, base64_upload=base64_upload)
            object.__setattr__(self, "prepare", prepare)

    @property
    def concurrency(self) -> int:
        return self.client.concurrency


class RunningPipeline(Protocol):
    """What the runner and the CLI need of a run: a :class:`Pipeline`, or N of them in worker
    processes (:class:`batchclassify.processes.ProcessPipeline`)."""

    taken: int
    dropped: int

    @property
    def requests_sent(self) -> int: ...

    @property
    def downloads_sent(self) -> int: ...

    @property
    def reused(self) -> int: ...

    @property
    def stopping(self) -> bool: ...

    def results(self) -> AsyncGenerator[Result, None]: ...

    def usage(self) -> dict[str, Any] | None: ...

    def stop(self) -> None: ...

    def abort(self) -> None: ...


class Pipeline:
    """One run over ``specs``. Iterate :meth:`results`; call :meth:`stop` to wind down
    gracefully (no new items; in-flight ones finish) and :meth:`abort` to stop at once."""

    def __init__(
        self,
        specs: Iterable[str],
        options: PipelineOptions,
        *,
        stdin: TextIO | None = None,
        items: Iterable[Item] | None = None,
        store: StoredAnswers | None = None,
    ) -> None:
        """``items`` replaces the sources named by ``specs`` (already selected items, say);
        ``store`` lets content dedup reuse answers from earlier runs."""
        self.options = options
        self._store = store
        self._dedup: ContentDedup | None = None
        self._items: Iterable[Item] = (
            items if items is not None else iter_items(specs, options.sources, stdin=stdin)
        )
        self._stopping = False
        self._fatal: BatchClassifyError | None = None
        self._failure_limit = FailureLimit(options.max_failures)
        self._workers: list[asyncio.Task[None]] = []
        self._producer: asyncio.Task[None] | None = None
        self._producing = False
        self.client: ClassifyClient | None = None
        self.throttle: Throttle | None = None
        self._batcher: Batcher | None = None
        self._prepare_file: BatchedHandoff[Path, _Payload] | None = None
        #: items taken from the sources, and those not reported because the run stopped
        self.taken = 0
        self.dropped = 0

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def reused(self) -> int:
        """Inputs answered from an identical copy instead of a request."""
        return self._dedup.reused if self._dedup else 0

    @property
    def requests_sent(self) -> int:
        return self.client.requests_sent if self.client else 0

    @property
    def downloads_sent(self) -> int:
        """Image downloads (``--fetch-urls``, or URLs the service could not fetch)."""
        return self.client.downloads_sent if self.client else 0

    def usage(self) -> dict[str, Any] | None:
        """Requests per server and hedges (:meth:`ClassifyClient.usage`), once started."""
        return self.client.usage() if self.client is not None else None

    def stop(self) -> None:
        """Stop taking new items; what is in flight finishes and is reported."""
        self._stopping = True
        if self._producer is not None and self._producing:
            # Also interrupts a producer waiting on a slow source (a pipe, a network folder).
            # Never one not started yet: cancelled before its first step, its clean-up (the
            # end markers that wake the workers) would never run; it sees _stopping instead.
            self._producer.cancel()

    def abort(self) -> None:
        """Stop now: in-flight requests are cancelled and their items are not reported."""
        self._stopping = True
        for task in self._workers:
            task.cancel()
        if self._batcher is not None:
            self._batcher.abort()  # a batch being retried would hold the run for minutes

    async def results(self) -> AsyncGenerator[Result, None]:
        """Yield one result per input as it completes (not in input order). Raises
        :class:`RunAborted` at the end when a fatal error or a systemic failure stopped it."""
        options = self.options
        # Never below the concurrency: a stop puts one end marker per worker into the queue.
        size = max(options.queue_size or max(2 * options.concurrency, 16), options.concurrency)
        todo: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=size)
        done: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=size)
        threads = options.prepare_workers or default_workers()
        executor = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="batchclassify-prepare"
        )
        prepare = options.prepare
        self._prepare_file = BatchedHandoff(
            lambda path: _file_payload(path, prepare), executor, threads
        )
        self.throttle = Throttle(options.throttle)
        self._dedup = ContentDedup(self._store) if options.dedup else None
        async with ClassifyClient(options.client, throttle=self.throttle) as client:
            self.client = client
            producer = asyncio.create_task(self._produce(todo), name="batchclassify-producer")
            self._producer = producer
            self._workers = [
                asyncio.create_task(self._work(todo, done, executor), name=f"worker-{n}")
                for n in range(options.concurrency)
            ]
            closer = asyncio.create_task(self._close_when_done(done))
            if options.batch_size > 1:
                self._batcher = Batcher(client, options.batch_size)
            try:
                while (result := await done.get()) is not _END:
                    yield result
            finally:
                for task in (producer, closer, *self._workers):
                    task.cancel()
                await asyncio.gather(producer, closer, *self._workers, return_exceptions=True)
                if self._batcher is not None:
                    await self._batcher.aclose()
                executor.shutdown(wait=False, cancel_futures=True)
                # Items queued but never started (an abort after the producer had finished),
                # and results finished but never taken (the consumer stopped early), are
                # dropped: a resumed run picks them up.
                self.dropped += sum(1 for left in _drain(todo, 0) if left is not _END)
                self.dropped += sum(1 for left in _drain(done, 0) if left is not _END)
        if self._fatal is not None:
            raise self._fatal

    async def _produce(self, todo: asyncio.Queue[Item | None]) -> None:
        self._producing = True
        iterator: Iterator[Item] = iter(self._items)
        ends = self.options.concurrency
        unsent = 0  # items of the current chunk not yet queued
        try:
            while not self._stopping and (
                chunk := await asyncio.to_thread(list, itertools.islice(iterator, _CHUNK))
            ):
                # Counted as taken at once: whatever happens next, each is reported or dropped.
                self.taken += len(chunk)
                unsent = len(chunk)
                for item in chunk:
                    if self._stopping:
                        return
                    await todo.put(item)
                    unsent -= 1
            for _ in range(ends):
                await todo.put(_END)
        except Exception as exc:
            # A source that breaks (not one bad entry: those are items) ends the run cleanly.
            if self._fatal is None:
                log.debug("reading the inputs failed", exc_info=True)
                self._fatal = RunAborted(
                    self._redact(f"reading the inputs failed: {type(exc).__name__}: {exc}")
                )
            self._stopping = True
        finally:
            self.dropped += unsent
            if self._stopping:
                # Unsent items are dropped (a resumed run picks them up); every worker wakes.
                self.dropped += sum(1 for left in _drain(todo, ends) if left is not _END)

    async def _close_when_done(self, done: asyncio.Queue[Result | None]) -> None:
        await asyncio.gather(*self._workers, return_exceptions=True)
        await done.put(_END)

    async def _work(
        self,
        todo: asyncio.Queue[Item | None],
        done: asyncio.Queue[Result | None],
        executor: ThreadPoolExecutor,
    ) -> None:
        while (item := await todo.get()) is not _END:
            try:
                result = await self._outcome(item, executor)
                if result is not None:
                    await done.put(result)
            except asyncio.CancelledError:
                self.dropped += 1  # abort(): in flight, not reported
                raise

    async def _outcome(self, item: Item, executor: ThreadPoolExecutor) -> Result | None:
        """The item's result, or ``None`` when the run is stopping (counted as dropped)."""
        if self._stopping:
            self.dropped += 1  # not reported, so a resumed run picks it up
            return None
        try:
            result = await self._classify_item(item, executor)
        except (FatalApiError, RunAborted) as exc:
            self.dropped += 1
            self._fail_run(exc)
            return None
        except Exception as exc:
            result = self._internal_error(item, exc)
        result = self._row(item, result)
        self._count_failure(result)
        return result

    def _internal_error(self, item: Item, exc: Exception) -> Result:
        """A bug or an unforeseen library error on one item: an error row, never a dead
        worker (which would silently take the rest of the input with it)."""
        log.info("internal error on %s", self._redact(item.source), exc_info=True)
        info = ErrorInfo("internal", f"{type(exc).__name__}: {exc}")
        return _error_result(item, info, attempts=0)

    def _redact(self, text: str) -> str:
        return self.client.redact(text) if self.client is not None else text

    def _fail_run(self, exc: BatchClassifyError) -> None:
        if self._fatal is None:
            self._fatal = exc if isinstance(exc, RunAborted) else _explain_fatal(exc)
        self.stop()

    def _count_failure(self, row: Result) -> None:
        reached = self._failure_limit.count(row)
        if reached is not None and self._fatal is None:
            self._fatal = reached
            self.stop()

    def _row(self, item: Item, result: Result) -> Result:
        """The result as reported: the item's own source, path, columns and key (a dedup copy
        starts from another item's result), the message redacted."""
        error = result.error
        if error is not None:
            # The one place error rows are made: whatever the message quotes (a server's page
            # echoing the request URL, say), no secret gets into an output.
            error = dataclasses.replace(error, message=self._redact(error.message))
        path = None if item.path is None else os.path.abspath(item.path)
        row = dataclasses.replace(
            result,
            source=item.source,
            key=item.key,
            error=error,
            path=path,
            columns=item.columns,
        )
        return label_row(row, self.options.labeler)

    async def _classify_item(self, item: Item, executor: ThreadPoolExecutor) -> Result:
        if item.problem is not None:
            return _error_result(item, ErrorInfo("input", item.problem), attempts=0)
        client = self.client
        assert client is not None
        loop = asyncio.get_running_loop()
        prepare = self.options.prepare
        try:
            if item.obj is not None:
                # An object in a bucket (objects.py): its bytes, read on fsspec's event loop
                # and sent inline; or, with --url-mode presign, a presigned URL by reference.
                if self.options.url_mode != "presign":
                    raw = await objects.read_object(item.obj, max_bytes=self._download_limit())
                    payload = await loop.run_in_executor(
                        executor, _bytes_payload, raw, item.source, prepare
                    )
                    return await self._classify_payload(item, payload)
                item = dataclasses.replace(item, url=await objects.presign(item.obj))
            if item.url is not None and (item.obj is not None or self._by_reference(item.url)):
                started = time.perf_counter()
                try:
                    response = await client.classify(image_url=item.url)
                except ItemRejectedError as exc:
                    if self.options.url_mode != "auto":
                        raise
                    # The service could not fetch it (private host, odd server): fetch it here.
                    payload = await self._fetch_payload(item.url, executor, spent=exc.attempts)
                    return await self._classify_payload(item, payload)
                latency = (time.perf_counter() - started) * 1000
                return result_from_answer(
                    item.source,
                    response.answer.thresholded(client.options.confidence),
                    attempts=response.attempts,
                    latency_ms=latency,
                )
            if item.url is not None:
                payload = await self._fetch_payload(item.url, executor)
            else:
                assert item.path is not None
                assert self._prepare_file is not None
                payload = await self._prepare_file(item.path)
            return await self._classify_payload(item, payload)
        except InputError as exc:
            return _error_result(item, ErrorInfo(exc.kind, str(exc)), attempts=0)
        except (FatalApiError, RunAborted):
            raise
        except RequestError as exc:
            info = ErrorInfo(exc.kind, str(exc), exc.http_status)
            return _error_result(item, info, attempts=exc.attempts)

    async def _classify_payload(self, item: Item, payload: _Payload) -> Result:
        """Send prepared bytes, unless identical bytes were (or are being) classified."""
        dedup = self._dedup
        if dedup is not None and (known := await dedup.find(payload.digest)) is not None:
            return known
        client = self.client
        assert client is not None
        result: Result | None = None
        try:
            started = time.perf_counter()
            if self._batcher is not None:
                response = await self._batcher.classify(payload.body)
            else:
                response = await client.classify(data=payload.body)
            latency = (time.perf_counter() - started) * 1000
            attempts = payload.attempts + response.attempts
            result = result_from_answer(
                item.source,
                response.answer.thresholded(client.options.confidence),
                attempts=attempts,
                latency_ms=latency,
                content_hash=payload.digest,
                image=payload.original,
                sent=payload.sent,
            )
            return result
        except RequestError as exc:
            exc.attempts += payload.attempts  # the row counts the downloads too
            raise
        finally:
            if dedup is not None:
                dedup.settle(payload.digest, result)

    def _by_reference(self, url: str) -> bool:
        mode = self.options.url_mode
        https = url.lower().startswith("https://")
        return mode == "reference" or (mode in ("auto", "presign") and https)

    def _download_limit(self) -> int:
        """The largest object read (as for URLs: the upload limit, unless --max-size may
        shrink a larger original)."""
        prepare = self.options.prepare
        limit = prepare.max_upload_bytes
        return _DOWNLOAD_LIMIT if limit is None or prepare.max_size is not None else limit

    async def _fetch_payload(
        self, url: str, executor: ThreadPoolExecutor, *, spent: int = 0
    ) -> _Payload:
        """Download and prepare an image; ``attempts`` of the payload counts the downloads and
        the ``spent`` requests before them (a by-reference try the service refused)."""
        client = self.client
        assert client is not None
        prepare = self.options.prepare
        # Fetch generously: with --max-size a large original is shrunk before upload.
        limit = prepare.max_upload_bytes
        if limit is None or prepare.max_size is not None:
            limit = _DOWNLOAD_LIMIT
        try:
            raw, downloads = await client.fetch(url, max_bytes=limit)
        except RequestError as exc:
            exc.attempts += spent
            raise
        loop = asyncio.get_running_loop()
        payload = await loop.run_in_executor(executor, _bytes_payload, raw, url, prepare)
        return dataclasses.replace(payload, attempts=spent + downloads)


class FailureLimit:
    """``--max-failures``: counts the rows that failed on requests (not bad inputs), and says
    when a run has had enough of them."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.failures = 0

    def count(self, row: Result) -> RunAborted | None:
        """The error that stops the run, when ``row`` is the failure that reaches the limit."""
        if row.error is None or row.error.type not in REQUEST_ERROR_TYPES:
            return None
        self.failures += 1
        if self.limit is None or self.failures != self.limit:
            return None
        return RunAborted(
            f"{self.failures} items failed on requests (--max-failures {self.limit}); "
            "the run stopped so that a systematic problem does not burn the whole input"
        )


def label_row(row: Result, labeler: Callable[[Result], str | None] | None) -> Result:
    """The row with its ground truth (``--labels``) and whether ``top`` matches it. The row
    is new and not yet shared, so it is completed in place rather than copied once more."""
    if labeler is None:
        return row
    label = labeler(row)
    correct = None if label is None or not row.ok else row.top == label
    for name, value in (("label", label), ("correct", correct), ("labeled", True)):
        object.__setattr__(row, name, value)
    # A row from a --processes worker comes serialised without its label: made again.
    object.__setattr__(row, "_json", None)
    return row


@dataclass(frozen=True, slots=True)
class _Payload:
    """A prepared upload: the body as sent (base64 text, or the bytes themselves for a
    multipart upload), the hash of the image bytes, the original's size and the size sent when
    it was shrunk, and the HTTP attempts it took to get the bytes (downloads)."""

    body: bytes
    digest: str
    original: dict[str, int]
    sent: dict[str, int] | None = None
    attempts: int = 0

    @classmethod
    def of(cls, image: PreparedImage, options: PrepareOptions) -> _Payload:
        data = image.data
        original = {"width": image.original_width, "height": image.original_height}
        sent = {"width": image.width, "height": image.height}
        return cls(
            base64.b64encode(data) if options.base64_upload else data,
            hashlib.sha256(data).hexdigest(),
            original,
            None if sent == original else sent,
        )


def _file_payload(path: Path, options: PrepareOptions) -> _Payload:
    return _Payload.of(prepare_file(path, options), options)


def _bytes_payload(data: bytes, name: str, options: PrepareOptions) -> _Payload:
    return _Payload.of(prepare_bytes(data, options, name=name), options)


def _error_result(item: Item, error: ErrorInfo, *, attempts: int) -> Result:
    return Result(source=item.source, status="error", error=error, attempts=attempts)


def _drain(queue: asyncio.Queue[_T | None], ends: int) -> list[_T | None]:
    """Empty a queue, then put ``ends`` end markers back so every worker still wakes up;
    returns what was taken out."""
    taken: list[_T | None] = []
    while True:
        try:
            taken.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            break
    for _ in range(ends):
        queue.put_nowait(_END)
    return taken


_FATAL_HINTS = {
    410: "the model is gone from the service: check --model and --endpoint",
    501: "the server has no runtime for this model: check --model and --endpoint (a plain web "
    "server answers 501 too)",
    507: "the model is too big for this server: use another server or the hosted API",
    401: "the API key is missing or invalid: check ROBOFLOW_API_KEY or --api-key",
    402: "the workspace is out of credits: top up, or wait for the billing period",
    403: "the API key was refused for this model (wrong key, another workspace's key, or no "
    "such model): check ROBOFLOW_API_KEY / --api-key and --model",
    404: "the model or version was not found: check --model PROJECT/VERSION and --endpoint",
    422: "the service rejected a request parameter: check --confidence and other options",
    423: "usage of this workspace is paused: check the Roboflow dashboard",
}


def _explain_fatal(exc: BatchClassifyError) -> RunAborted:
    status = getattr(exc, "http_status", None) or 0
    if 300 <= status < 400:
        hint = (
            "the endpoint answered with a redirect, which is never followed (it would send your "
            "images and key elsewhere): if the new address is right, pass it as --endpoint"
        )
    else:
        hint = _FATAL_HINTS.get(status, "the service refused the run")
    return RunAborted(f"{hint} (server said: {exc})")


async def iter_results(
    specs: Iterable[str], options: PipelineOptions, *, stdin: TextIO | None = None
) -> AsyncIterator[Result]:
    """Classify every input named by ``specs``; yield results as they complete::

    options = PipelineOptions(client=ClientOptions(model="flowers", version=3, api_key=key))
    async for result in iter_results(["photos/"], options):
        print(result.source, result.top, result.confidence)
    """
    async for result in Pipeline(specs, options, stdin=stdin).results():
        yield result

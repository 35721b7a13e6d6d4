"""``run()``: drive a :class:`~batchclassify.pipeline.Pipeline` into sinks, with durable state,
progress and a summary. The CLI is a thin layer over this; library users can call it directly::

    import asyncio
    from batchclassify import ClientOptions, PipelineOptions, run

    options = PipelineOptions(client=ClientOptions(model="flowers", version=3, api_key=KEY))
    stats = asyncio.run(run(["photos/"], options, outputs=["results.jsonl"]))
    print(stats.format())

With a state file (:class:`JobState`), every result is committed to SQLite *before* it is
appended to the outputs, so an output can only lag behind the state; ``resume=True`` cuts each
output back to its last whole row, appends what it lacks from the state, then skips every input
already done (see ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from batchclassify import objects
from batchclassify.errors import ConfigError, RunAborted, without_userinfo
from batchclassify.model import Item, Result
from batchclassify.paths import PlannedPath, check_paths, state_companions
from batchclassify.pipeline import Pipeline, PipelineOptions, RunningPipeline
from batchclassify.sinks import STDOUT, Sink, check_outputs, open_sinks, repair_output
from batchclassify.sources import check_sources, count_items, iter_items
from batchclassify.state import (
    Fingerprint,
    Skipped,
    StateLock,
    StateStore,
    remove_state,
    select_items,
)
from batchclassify.summary import RunStats

__all__ = ["JobState", "run"]

#: the CSV columns a run with ``--labels`` adds
LABEL_COLUMNS = ("label", "correct")

log = logging.getLogger("batchclassify")

#: commit to the state at least this often (seconds): about what a kill -9 makes us redo
COMMIT_INTERVAL = 0.05
#: flush the outputs at least this often (seconds)
FLUSH_INTERVAL = 0.5
#: rows replayed into an output between two flushes when catching it up
_REPLAY_BATCH = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class JobState:
    """Durable state: resume after a crash, incremental scans, dedup across runs, sharding.

    ``path=None`` keeps no state (``shard`` still applies)."""

    path: Path | None = None
    resume: bool = False
    retry_failed: bool = False
    shard: tuple[int, int] | None = None
    #: stands for the endpoint in the state's fingerprint (the built-in emulator's port
    #: changes from run to run, but its answers do not)
    endpoint_label: str | None = None


async def run(
    specs: Sequence[str],
    options: PipelineOptions,
    *,
    outputs: Sequence[str] = (),
    sinks: Sequence[Sink] = (),
    overwrite: bool = False,
    state: JobState | None = None,
    progress: bool = False,
    summary_path: str | Path | None = None,
    stdin: TextIO | None = None,
    on_start: Callable[[RunningPipeline], None] | None = None,
    other_paths: Sequence[PlannedPath] = (),
    upload_interval: float = objects.DEFAULT_UPLOAD_INTERVAL,
) -> RunStats:
    """Classify every input of ``specs`` and write each result once to every output.

    ``outputs`` are file names (``.jsonl``, ``.csv``, ``-`` for stdout) opened here; ``sinks``
    are extra, already-open sinks (flushed, not closed); ``other_paths`` are further paths the
    caller will write (checked with the rest before the first request). Returns the run's
    statistics; raises :class:`~batchclassify.errors.RunAborted` (after flushing everything;
    ``.stats`` holds the statistics) when a fatal error stopped the run, or when the closing
    check finds an input unaccounted for or an output short of a row. ``on_start`` receives the
    pipeline, so a signal handler can ``stop()`` it. An output in object storage
    (``s3://…``) is written to a local staging file, uploaded every ``upload_interval`` seconds
    and at the end (:mod:`batchclassify.objects`).
    """
    state = state or JobState()
    summary = Path(summary_path) if summary_path is not None else None
    if options.processes > 1:
        from batchclassify.processes import check_not_starting_worker

        check_not_starting_worker()  # a script without a main guard: a clear error
    check_sources(specs)
    # Object outputs become local staging files from here on; uploads wrap their sinks below.
    outputs, staged = objects.stage_outputs(
        outputs, state.path, overwrite=overwrite, resume=state.resume
    )
    _check_planned_paths(outputs, state, summary, other_paths, overwrite=overwrite)
    writer: _Writer | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            writer = await _start_and_drain(
                stack,
                specs,
                options,
                outputs,
                sinks,
                overwrite,
                state,
                progress,
                stdin,
                on_start,
                lambda opened: objects.uploading_sinks(opened, staged, upload_interval),
            )
    except RunAborted as exc:
        if writer is None:
            raise  # before the run (catching up an output on resume): nothing was sent
        # Closing an output failed (a full disk at the last flush): a summary all the same.
        writer.stats.aborted = writer.stats.aborted or str(exc)
    # Only now are the outputs closed (flushed, fsynced) and their counts final.
    writer.closing_check()
    stats = writer.stats
    if summary is not None:
        await asyncio.to_thread(_write_summary, summary, stats)
    if stats.aborted is not None:
        error = RunAborted(stats.aborted)
        error.stats = stats
        raise error
    return stats


async def _start_and_drain(
    stack: contextlib.AsyncExitStack,
    specs: Sequence[str],
    options: PipelineOptions,
    outputs: Sequence[str],
    sinks: Sequence[Sink],
    overwrite: bool,
    state: JobState,
    progress: bool,
    stdin: TextIO | None,
    on_start: Callable[[RunningPipeline], None] | None,
    wrap: Callable[[list[Sink]], list[Sink]] = list,
) -> _Writer:
    store = _open_state(state, options, outputs, overwrite=overwrite, stack=stack)
    resuming = store is not None and state.resume
    # The CSV's extra columns: kept list columns, then the ground truth when there is one.
    columns = (*options.sources.keep_columns, *(LABEL_COLUMNS if options.labeler else ()))
    check_outputs(outputs, overwrite=overwrite, append=resuming)
    if resuming:
        assert store is not None
        forgotten = store.forget_retryable(all_failures=state.retry_failed)
        opened = await _caught_up_sinks(store, outputs, rebuild=forgotten > 0, columns=columns)
    else:
        opened = await open_sinks(outputs, overwrite=overwrite, columns=columns)
    opened = wrap(opened)
    for sink in opened:
        stack.push_async_callback(sink.aclose)
    writer = _Writer([*sinks, *opened], store)
    pipeline: RunningPipeline
    if options.processes > 1:
        from batchclassify.processes import ProcessPipeline

        pipeline = ProcessPipeline(
            specs,
            options,
            state_path=None if store is None else store.path,
            resume=resuming,
            shard=state.shard,
            skipped=writer.skipped,
        )
    else:
        items: Iterator[Item] = iter_items(specs, options.sources, stdin=stdin)
        if store is not None or state.shard is not None:
            reader = store.reader() if resuming and store is not None else None
            if reader is not None:
                stack.callback(reader.close)
            items = select_items(items, reader=reader, shard=state.shard, skipped=writer.skipped)
        pipeline = Pipeline(specs, options, items=items, store=store)
    if on_start is not None:
        on_start(pipeline)
    bar = _progress_bar(progress)
    counter = (
        asyncio.create_task(_fill_total(bar, specs, options, state))
        if bar is not None and not resuming
        else None
    )
    try:
        await writer.drain(pipeline, bar)
    finally:
        if counter is not None:
            counter.cancel()
        if bar is not None:
            bar.close()
    return writer


class _Writer:
    """The one task that writes: commits results to the state, then hands them to the sinks.

    A periodic tick commits and flushes; at the end it is told to stop (never cancelled: a
    flush cut off half way would lose the rows it had taken). Any failure to commit or write
    stops the run at once with a message: classifying more would pay for answers that cannot
    be kept.
    """

    def __init__(self, sinks: Sequence[Sink], store: StateStore | None) -> None:
        self._sinks = list(sinks)
        self._store = store
        self._uncommitted: list[Result] = []
        # Commits hand rows to the sinks in state order; two interleaved would break that.
        self._committing = asyncio.Lock()
        self._closing = asyncio.Event()
        self._bar: tqdm[Any] | None = None
        self._pipeline: RunningPipeline | None = None
        self.stats = RunStats()
        #: results received from the pipeline; committed as new rows; already in the state
        #: (an input listed twice); left uncommitted because writing failed
        self.received = 0
        self.committed = 0
        self.repeated = 0
        self.unsaved = 0
        self._broken = False
        self._counts_before: list[tuple[int, int] | None] = []
        #: inputs left out on purpose before the pipeline (done earlier, other shards)
        self.skipped = Skipped()

    async def drain(self, pipeline: RunningPipeline, bar: tqdm[Any] | None) -> RunStats:
        self._bar = bar
        self._pipeline = pipeline
        self._counts_before = self.sink_counts()
        stats = self.stats
        ticker = asyncio.create_task(self._tick())
        try:
            # aclosing: an exception here must stop the workers now, not at garbage
            # collection of the generator.
            async with contextlib.aclosing(pipeline.results()) as results:
                async for result in results:
                    self.received += 1
                    if self._store is not None:
                        self._uncommitted.append(result)
                    elif not self._broken:
                        await self._emit(result)
                    else:
                        self.unsaved += 1
        except RunAborted as exc:  # the pipeline's own stop: fatal API error, outage, ...
            stats.aborted = stats.aborted or str(exc)
        except Exception as exc:
            self._fail(exc)
        finally:
            self._closing.set()
            await ticker
            await self._save(flush=True)
            stats.finished = time.monotonic()
            stats.requests_sent = pipeline.requests_sent
            stats.downloads_sent = pipeline.downloads_sent
            stats.reused = pipeline.reused
            stats.not_started = pipeline.dropped
            usage = pipeline.usage()
            if usage is not None:
                stats.record_usage(usage)
            stats.done_earlier = self.skipped.done_earlier
            stats.interrupted = pipeline.stopping and stats.aborted is None
            if bar is not None:
                bar.set_postfix(ok=stats.ok, failed=stats.failed, refresh=False)
        return stats

    async def _tick(self) -> None:
        last_flush = time.monotonic()
        while not self._closing.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), COMMIT_INTERVAL)
            flush = time.monotonic() - last_flush >= FLUSH_INTERVAL
            await self._save(flush=flush)
            if flush:
                last_flush = time.monotonic()

    async def _save(self, *, flush: bool) -> None:
        """Commit what came back, then flush the outputs if asked; failures stop the run."""
        try:
            if self._broken:
                # Nothing more is committed once writing failed: the state stays something
                # the outputs can catch up with on --resume.
                self.unsaved += len(self._uncommitted)
                self._uncommitted = []
            else:
                await self._commit()
            if flush:
                await self._flush()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        """Stop the run now: the state or an output cannot be written (or a bug)."""
        self._broken = True
        if isinstance(exc, RunAborted):
            message = str(exc)
        else:
            log.debug("writing results failed", exc_info=True)
            message = f"writing results failed: {type(exc).__name__}: {exc}"
        if self.stats.aborted is None:
            self.stats.aborted = message
        if self._pipeline is not None:
            self._pipeline.abort()

    async def _commit(self) -> None:
        async with self._committing:
            if not self._uncommitted or self._store is None:
                return
            batch, self._uncommitted = self._uncommitted, []
            try:
                new = self._store.record(batch)
            except BaseException:
                self.unsaved += len(batch)
                raise
            self.repeated += len(batch) - len(new)
            for result in new:
                await self._emit(result)

    async def _emit(self, result: Result) -> None:
        self.committed += 1
        stats = self.stats
        stats.add(result)
        for sink in self._sinks:
            await sink.write(result)
        bar = self._bar
        if bar is not None:
            bar.update(1)
            if stats.total % 16 == 1 or not result.ok:
                bar.set_postfix(ok=stats.ok, failed=stats.failed, refresh=False)

    async def _flush(self) -> None:
        await asyncio.gather(*(sink.flush() for sink in self._sinks))

    def sink_counts(self) -> list[tuple[int, int] | None]:
        """Rows each sink was given and has written (``None`` for sinks that do not count)."""
        counts: list[tuple[int, int] | None] = []
        for sink in self._sinks:
            received = getattr(sink, "rows_received", None)
            written = getattr(sink, "rows_written", None)
            counts.append(None if received is None or written is None else (received, written))
        return counts

    def closing_check(self) -> None:
        """The closing invariant, once the outputs are closed: every input taken is a
        committed row, a repeat, or deliberately not started; every output holds every
        committed row. What does not hold stops the run (``stats.aborted``)."""
        assert self._pipeline is not None, "drain() first"
        problems = self._problems(self._pipeline)
        if problems:
            message = "the closing check failed: " + "; ".join(problems)
            stats = self.stats
            stats.aborted = f"{stats.aborted}; {message}" if stats.aborted else message

    def _problems(self, pipeline: RunningPipeline) -> list[str]:
        problems: list[str] = []
        accounted = self.received + pipeline.dropped
        if pipeline.dropped and not pipeline.stopping and self.stats.aborted is None:
            # Inputs are left out only when something stopped the run; otherwise a part of
            # the job would silently go missing.
            problems.append(
                f"{pipeline.dropped} inputs were not started, yet nothing stopped the run"
            )
        if pipeline.taken != accounted:
            problems.append(
                f"{pipeline.taken} inputs were taken but {self.received} results came back and "
                f"{pipeline.dropped} were not started"
            )
        if self.received != self.committed + self.repeated + self.unsaved:
            problems.append(
                f"{self.received} results came back but {self.committed} were written, "
                f"{self.repeated} were repeats and {self.unsaved} could not be saved"
            )
        elif self.unsaved and self.stats.aborted is None:
            problems.append(f"{self.unsaved} results could not be saved")
        hint = " (the state has them all: --resume completes it)" if self._store else ""
        counts = zip(self._sinks, self._counts_before, self.sink_counts(), strict=True)
        for sink, before, after in counts:
            if before is None or after is None:
                continue
            name = str(getattr(sink, "path", "standard output"))
            given = after[0] - before[0]
            if given != self.committed:
                problems.append(f"output {name!r} was given {given} of {self.committed} rows")
            elif after[1] != after[0]:
                problems.append(f"output {name!r} holds {after[1]} of its {after[0]} rows{hint}")
        return problems


def _open_state(
    state: JobState,
    options: PipelineOptions,
    outputs: Sequence[str],
    *,
    overwrite: bool,
    stack: contextlib.AsyncExitStack,
) -> StateStore | None:
    path = state.path
    if path is None:
        return None
    if not path.parent.is_dir():
        raise ConfigError(f"the folder for the state file {str(path)!r} does not exist")
    lock = StateLock(path)
    lock.acquire()  # before looking at the state: another run may be writing it
    stack.callback(lock.release)
    if path.exists() and not state.resume:
        _refuse_earlier_state(path, overwrite=overwrite)
        remove_state(path)
    if state.resume and not path.exists():
        existing = [spec for spec in outputs if spec != STDOUT and Path(spec).exists()]
        if existing:
            raise ConfigError(
                f"cannot resume: there is no state at {str(path)!r} for the existing output "
                f"{existing[0]!r} (was it written without a state, or with another --state?)"
            )
    store = StateStore(path)
    stack.callback(store.close)
    client = options.client
    store.check_fingerprint(
        Fingerprint(
            model=f"{client.model}/{client.version}",
            endpoint=state.endpoint_label or without_userinfo(client.endpoint).rstrip("/"),
            confidence=str(client.confidence),
            max_size=str(options.prepare.max_size),
        )
    )
    return store


async def _caught_up_sinks(
    store: StateStore, outputs: Sequence[str], *, rebuild: bool, columns: Sequence[str]
) -> list[Sink]:
    """Open each output for appending after repairing it and writing what it lacks.

    An output holds the first N stored rows (it lags the state). When it holds more rows than
    the state (the state lost its last commits in a power cut), or rows were just forgotten for
    a retry, it is rewritten from the state instead."""
    total = store.count()
    sinks: list[Sink] = []
    for spec in outputs:
        if spec == STDOUT:
            sinks.extend(await open_sinks([spec], columns=columns))
            continue
        path = Path(spec)
        present = await asyncio.to_thread(_rows_present, path)
        start = 0 if rebuild or present > total else present
        [sink] = await open_sinks([spec], append=start > 0, overwrite=start == 0, columns=columns)
        sinks.append(sink)
        for number, result in enumerate(store.records(skip=start), start=1):
            await sink.write(result)
            if number % _REPLAY_BATCH == 0:
                await sink.flush()
        await sink.flush()
    return sinks


def _rows_present(path: Path) -> int:
    return repair_output(path) if path.exists() else 0


def _progress_bar(enabled: bool) -> tqdm[Any] | None:
    if not enabled:
        return None
    return tqdm(
        total=None,
        unit="img",
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.05,
        mininterval=0.25,
    )


async def _fill_total(
    bar: tqdm[Any],
    specs: Sequence[str],
    options: PipelineOptions,
    state: JobState,
) -> None:
    """Count the inputs in a thread while the run goes on; once known, the bar shows an ETA."""
    if state.shard is not None:
        return  # the count would be of every shard
    total = await asyncio.to_thread(count_items, specs, options.sources)
    if total is not None:
        bar.total = total
        bar.refresh()


def _check_planned_paths(
    outputs: Sequence[str],
    state: JobState,
    summary: Path | None,
    other_paths: Sequence[PlannedPath],
    *,
    overwrite: bool,
) -> None:
    """Every path this run writes, checked together before anything is sent."""
    if state.path is not None and state.path.exists() and not state.resume:
        # First: "there is an earlier run" explains an existing output better than "exists".
        _refuse_earlier_state(state.path, overwrite=overwrite)
    check_outputs(outputs, overwrite=overwrite, append=state.resume)
    planned = [PlannedPath(Path(spec), f"--out {spec}") for spec in outputs if spec != STDOUT]
    if state.path is not None:
        planned.extend(state_companions(state.path))
    if summary is not None:
        if summary.exists() and not overwrite:
            raise ConfigError(f"summary file {str(summary)!r} already exists; pass --overwrite")
        planned.append(PlannedPath(summary, f"--summary {summary}"))
    check_paths([*planned, *other_paths])


def _refuse_earlier_state(path: Path, *, overwrite: bool) -> None:
    if not overwrite:
        raise ConfigError(
            f"a state file from an earlier run exists at {str(path)!r}: pass --resume to "
            "continue that run, or --overwrite to start over"
        )


def _write_summary(path: Path, stats: RunStats) -> None:
    try:
        path.write_text(json.dumps(stats.to_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        message = f"cannot write the summary {str(path)!r}: {exc.strerror or exc}"
        stats.aborted = f"{stats.aborted}; {message}" if stats.aborted else message

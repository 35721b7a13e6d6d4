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
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from batchclassify.errors import ConfigError, RunAborted
from batchclassify.model import Item, Result
from batchclassify.pipeline import Pipeline, PipelineOptions
from batchclassify.sinks import STDOUT, Sink, check_outputs, open_sinks, repair_output
from batchclassify.sources import count_items, iter_items
from batchclassify.state import (
    Fingerprint,
    StateLock,
    StateStore,
    remove_state,
    select_items,
)
from batchclassify.summary import RunStats

__all__ = ["JobState", "run"]

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
    on_start: Callable[[Pipeline], None] | None = None,
) -> RunStats:
    """Classify every input of ``specs`` and write each result once to every output.

    ``outputs`` are file names (``.jsonl``, ``.csv``, ``-`` for stdout) opened here; ``sinks``
    are extra, already-open sinks (flushed, not closed). Returns the run's statistics; raises
    :class:`~batchclassify.errors.RunAborted` (after flushing everything; ``.stats`` holds the
    statistics) when a fatal error stopped the run. ``on_start`` receives the pipeline, so a
    signal handler can ``stop()`` it.
    """
    state = state or JobState()
    if summary_path is not None:
        _check_summary_path(Path(summary_path), overwrite=overwrite)
    async with contextlib.AsyncExitStack() as stack:
        store = _open_state(state, options, outputs, overwrite=overwrite, stack=stack)
        resuming = store is not None and state.resume
        check_outputs(outputs, overwrite=overwrite, append=resuming)
        if resuming:
            assert store is not None
            forgotten = store.forget_retryable(all_failures=state.retry_failed)
            opened = await _caught_up_sinks(store, outputs, rebuild=forgotten > 0)
        else:
            opened = await open_sinks(outputs, overwrite=overwrite)
        for sink in opened:
            stack.push_async_callback(sink.aclose)
        items: Iterator[Item] = iter_items(specs, options.sources, stdin=stdin)
        if store is not None or state.shard is not None:
            reader = store.reader() if resuming and store is not None else None
            if reader is not None:
                stack.callback(reader.close)
            items = select_items(items, reader=reader, shard=state.shard)
        pipeline = Pipeline(specs, options, items=items, store=store)
        if on_start is not None:
            on_start(pipeline)
        writer = _Writer([*sinks, *opened], store)
        bar = _progress_bar(progress)
        counter = (
            asyncio.create_task(_fill_total(bar, specs, options, state))
            if bar is not None and not resuming
            else None
        )
        try:
            stats = await writer.drain(pipeline, bar)
        finally:
            if counter is not None:
                counter.cancel()
            if bar is not None:
                bar.close()
    if summary_path is not None:
        await asyncio.to_thread(_write_summary, Path(summary_path), stats)
    if stats.aborted is not None:
        error = RunAborted(stats.aborted)
        error.stats = stats
        raise error
    return stats


class _Writer:
    """The one task that writes: commits results to the state, then hands them to the sinks."""

    def __init__(self, sinks: Sequence[Sink], store: StateStore | None) -> None:
        self._sinks = list(sinks)
        self._store = store
        self._uncommitted: list[Result] = []
        # Commits hand rows to the sinks in state order; two interleaved would break that.
        self._committing = asyncio.Lock()
        self._bar: tqdm[Any] | None = None
        self.stats = RunStats()

    async def drain(self, pipeline: Pipeline, bar: tqdm[Any] | None) -> RunStats:
        self._bar = bar
        stats = self.stats
        ticker = asyncio.create_task(self._tick(pipeline))
        try:
            # aclosing: an exception in a sink must stop the workers now, not at garbage
            # collection of the generator.
            async with contextlib.aclosing(pipeline.results()) as results:
                async for result in results:
                    if self._store is not None:
                        self._uncommitted.append(result)
                    else:
                        await self._emit(result)
        except RunAborted as exc:
            stats.aborted = str(exc)
        finally:
            ticker.cancel()
            try:
                await ticker
            except asyncio.CancelledError:
                pass
            except RunAborted as exc:
                stats.aborted = stats.aborted or str(exc)
            try:
                await self._commit()
                await self._flush()
            except RunAborted as exc:
                stats.aborted = stats.aborted or str(exc)
            stats.finished = time.monotonic()
            stats.requests_sent = pipeline.requests_sent
            stats.reused = pipeline.reused
            stats.interrupted = pipeline.stopping and stats.aborted is None
            if bar is not None:
                bar.set_postfix(ok=stats.ok, failed=stats.failed, refresh=False)
        return stats

    async def _tick(self, pipeline: Pipeline) -> None:
        last_flush = time.monotonic()
        try:
            while True:
                await asyncio.sleep(COMMIT_INTERVAL)
                await self._commit()
                if time.monotonic() - last_flush >= FLUSH_INTERVAL:
                    await self._flush()
                    last_flush = time.monotonic()
        except RunAborted:
            # An output that cannot be written: classifying more would only pile results up.
            pipeline.stop()
            raise

    async def _commit(self) -> None:
        async with self._committing:
            if not self._uncommitted or self._store is None:
                return
            batch, self._uncommitted = self._uncommitted, []
            for result in self._store.record(batch):
                await self._emit(result)

    async def _emit(self, result: Result) -> None:
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
        if not overwrite:
            raise ConfigError(
                f"a state file from an earlier run exists at {str(path)!r}: pass --resume to "
                "continue that run, or --overwrite to start over"
            )
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
            endpoint=state.endpoint_label or client.endpoint.rstrip("/"),
            confidence=str(client.confidence),
            max_size=str(options.prepare.max_size),
        )
    )
    return store


async def _caught_up_sinks(
    store: StateStore, outputs: Sequence[str], *, rebuild: bool
) -> list[Sink]:
    """Open each output for appending after repairing it and writing what it lacks.

    An output holds the first N stored rows (it lags the state). When it holds more rows than
    the state (the state lost its last commits in a power cut), or rows were just forgotten for
    a retry, it is rewritten from the state instead."""
    total = store.count()
    sinks: list[Sink] = []
    for spec in outputs:
        if spec == STDOUT:
            sinks.extend(await open_sinks([spec]))
            continue
        path = Path(spec)
        present = await asyncio.to_thread(_rows_present, path)
        start = 0 if rebuild or present > total else present
        [sink] = await open_sinks([spec], append=start > 0, overwrite=start == 0)
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


def _check_summary_path(path: Path, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ConfigError(f"summary file {str(path)!r} already exists; pass --overwrite")


def _write_summary(path: Path, stats: RunStats) -> None:
    path.write_text(json.dumps(stats.to_dict(), indent=2) + "\n", encoding="utf-8")

"""``run()``: drive a :class:`~batchclassify.pipeline.Pipeline` into sinks, with progress and a
summary. The CLI is a thin layer over this; library users can call it directly::

    import asyncio
    from batchclassify import ClientOptions, PipelineOptions, run

    options = PipelineOptions(client=ClientOptions(model="flowers", version=3, api_key=KEY))
    stats = asyncio.run(run(["photos/"], options, outputs=["results.jsonl"]))
    print(stats.format())
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from batchclassify.errors import ConfigError, RunAborted
from batchclassify.pipeline import Pipeline, PipelineOptions
from batchclassify.sinks import Sink, open_sinks
from batchclassify.sources import count_items
from batchclassify.summary import RunStats

__all__ = ["run"]

#: flush sinks at least this often (seconds) and at most this many results apart
FLUSH_INTERVAL = 0.5
FLUSH_EVERY = 256


async def run(
    specs: Sequence[str],
    options: PipelineOptions,
    *,
    outputs: Sequence[str] = (),
    sinks: Sequence[Sink] = (),
    overwrite: bool = False,
    progress: bool = False,
    summary_path: str | Path | None = None,
    stdin: TextIO | None = None,
    pipeline: Pipeline | None = None,
) -> RunStats:
    """Classify every input of ``specs`` and write each result to every output.

    ``outputs`` are file names (``.jsonl``, ``.csv``, ``-`` for stdout) opened here; ``sinks``
    are already-open sinks. Returns the run's statistics; raises
    :class:`~batchclassify.errors.RunAborted` (after flushing everything) when a fatal error
    stopped the run. Pass your own ``pipeline`` to be able to ``stop()`` it from elsewhere.
    """
    if summary_path is not None:
        _check_summary_path(Path(summary_path), overwrite=overwrite)
    pipeline = pipeline or Pipeline(specs, options, stdin=stdin)
    opened = await open_sinks(outputs, overwrite=overwrite)
    all_sinks = [*sinks, *opened]
    stats = RunStats()
    bar = _progress_bar(progress)
    counter = asyncio.create_task(_fill_total(bar, specs, options)) if bar else None
    error: BaseException | None = None
    try:
        last_flush = time.monotonic()
        pending = 0
        # aclosing: an exception in a sink must stop the workers now, not at garbage collection.
        async with contextlib.aclosing(pipeline.results()) as results:
            async for result in results:
                stats.add(result)
                for sink in all_sinks:
                    await sink.write(result)
                pending += 1
                if bar is not None:
                    bar.update(1)
                    if stats.total % 16 == 1 or not result.ok:
                        bar.set_postfix(ok=stats.ok, failed=stats.failed, refresh=False)
                now = time.monotonic()
                if pending >= FLUSH_EVERY or now - last_flush >= FLUSH_INTERVAL:
                    await asyncio.gather(*(sink.flush() for sink in all_sinks))
                    last_flush, pending = now, 0
    except RunAborted as exc:
        stats.aborted = str(exc)
        exc.stats = stats
        error = exc
    finally:
        stats.finished = time.monotonic()
        stats.requests_sent = pipeline.requests_sent
        stats.interrupted = pipeline.stopping and error is None
        if counter is not None:
            counter.cancel()
        if bar is not None:
            bar.set_postfix(ok=stats.ok, failed=stats.failed, refresh=False)
            bar.close()
        for sink in opened:
            await sink.aclose()
        for sink in sinks:
            await sink.flush()
        if summary_path is not None:
            await asyncio.to_thread(_write_summary, Path(summary_path), stats)
    if error is not None:
        raise error
    return stats


def _progress_bar(enabled: bool) -> tqdm | None:  # type: ignore[type-arg]
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


async def _fill_total(bar: tqdm, specs: Sequence[str], options: PipelineOptions) -> None:  # type: ignore[type-arg]
    """Count the inputs in a thread while the run goes on; once known, the bar shows an ETA."""
    total = await asyncio.to_thread(count_items, specs, options.sources)
    if total is not None:
        bar.total = total
        bar.refresh()


def _write_summary(path: Path, stats: RunStats) -> None:
    path.write_text(json.dumps(stats.to_dict(), indent=2) + "\n", encoding="utf-8")


def _check_summary_path(path: Path, *, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ConfigError(f"summary file {str(path)!r} already exists; pass --overwrite")

"""The skip pass of ``--resume`` over a finished run: 1M URLs, all done. Fast, flat, silent?

    python benchmarks/bench_resume_skip.py [--inputs 1000000] [--small 100000] [--repeat 3]
                                           [--quick]

Builds what a finished million-input run leaves behind, for a URL list of ``--inputs`` lines:
the state (``StateStore.record()`` in batches of 10,000, the way the runner commits: realistic
records, 1 in 200 a final HTTP 400 error) and a complete JSONL output holding the same records
in the same order (the rows the runner would have written). Then it times the resume: the Python
API's ``run(..., outputs=[jsonl], state=JobState(path, resume=True))``, the code path of
``batchclassify run LIST --out results.jsonl --resume``, in a fresh process, against an emulator
that must receive no request at all. The same is done for a ``--small`` list, to see whether
memory stays flat.

Printed per size (medians of ``--repeat`` alternating runs): wall time, CPU, peak RSS, and the
time of each phase of the resume (measured by wrapping the runner's own functions in the child:
opening the state, forgetting retryable rows, counting/repairing the output, replaying what it
lacks, the skip pass over the inputs). Target: under 60 s for 1M inputs, memory flat.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from benchutil import (
    MODEL,
    VERSION,
    Emulator,
    Meter,
    machine,
    pipeline_options,
    report,
    run_child,
    table,
)

import batchclassify.runner as runner_module
from batchclassify import ErrorInfo, Result
from batchclassify.emulator import DEFAULT_CLASSES
from batchclassify.runner import JobState, run
from batchclassify.state import Fingerprint, StateStore

BATCH = 10_000
URL = "https://127.0.0.1:1/datasets/street-scenes/2024-06/img_{:09d}.jpg"  # never fetched
_T = TypeVar("_T")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="URLs (default 1000000)")
    parser.add_argument("--small", type=int, default=100_000, help="smaller run (default 100000)")
    parser.add_argument("--repeat", type=int, default=3, help="resumes per size (default 3)")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.inputs, args.small, args.repeat = 200_000, 20_000, 1
    started = time.perf_counter()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp, Emulator() as emulator:
        jobs: dict[int, dict[str, str]] = {}
        for count in (args.small, args.inputs):
            folder = Path(tmp) / str(count)
            folder.mkdir()
            built = time.perf_counter()
            jobs[count] = finished_run(folder, count, emulator.url)
            files = [Path(jobs[count][name]) for name in ("list", "state", "out")]
            sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.0f} MB" for f in files)
            took = time.perf_counter() - built
            print(f"built a finished {count:,}-input run in {took:.1f} s: {sizes}")
        print()
        runs: dict[int, list[dict[str, Any]]] = {count: [] for count in jobs}
        for _ in range(args.repeat):
            for count, job in jobs.items():
                emulator.reset()
                figures = run_child(__file__, {**job, "url": emulator.url})
                requests = emulator.stats()["requests"]
                if requests or figures["results"] or figures["state_rows"] != count:
                    raise RuntimeError(f"resume did work: {requests} requests, {figures}")
                if count_lines(Path(job["out"])) != count:
                    raise RuntimeError("the output changed")
                runs[count].append(figures)
    print_results(runs)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


# --- the finished run --------------------------------------------------------------------------


def finished_run(folder: Path, count: int, endpoint: str) -> dict[str, str]:
    """The list, state and JSONL output a completed run over ``count`` URLs leaves behind."""
    listing, state, out = (
        folder / "urls.txt",
        folder / "results.jsonl.state",
        folder / "results.jsonl",
    )
    with listing.open("w", encoding="utf-8") as handle:
        for start in range(0, count, BATCH):
            handle.write(
                "".join(f"{URL.format(n)}\n" for n in range(start, min(start + BATCH, count)))
            )
    store = StateStore(state)
    # What run() stores for these options (ClientOptions(confidence=None), no --max-size).
    store.check_fingerprint(
        Fingerprint(
            model=f"{MODEL}/{VERSION}", endpoint=endpoint, confidence="None", max_size="None"
        )
    )
    with out.open("w", encoding="utf-8") as handle:
        for start in range(0, count, BATCH):
            batch = [record(n) for n in range(start, min(start + BATCH, count))]
            # The runner commits, then writes what record() returns, in that order.
            lines = (
                json.dumps(r.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
                for r in store.record(batch)
            )
            handle.write("".join(lines))
    store.close()
    return {"list": str(listing), "state": str(state), "out": str(out)}


def record(n: int) -> Result:
    """A plausible result for input ``n``: mostly classified, one in 200 refused (final)."""
    url = URL.format(n)
    if n % 200 == 199:
        error = ErrorInfo("http", "HTTP 400: Could not load input image. Cause: not an image", 400)
        return Result(source=url, status="error", error=error, attempts=1, key=f"url:{url}")
    top = DEFAULT_CLASSES[n % len(DEFAULT_CLASSES)]
    confidence = round(0.4 + (n % 997) / 1700, 4)
    second = DEFAULT_CLASSES[(n + 1) % len(DEFAULT_CLASSES)]
    predictions = {top: confidence, second: round(1 - confidence - 0.05, 4)}
    return Result(
        source=url,
        status="ok",
        top=top,
        confidence=confidence,
        predicted_classes=(top,),
        predictions=predictions,
        image={"width": 640, "height": 480},
        inference_id=str(uuid.UUID(int=n * 7919 + 1)),
        time=round(0.011 + (n % 13) / 1000, 4),
        attempts=1 + (n % 50 == 0),
        latency_ms=round(150 + (n % 311) * 1.7, 1),
        key=f"url:{url}",
    )


def count_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            lines += chunk.count(b"\n")
    return lines


# --- the measured resume (child process) -----------------------------------------------------


PHASES: dict[str, float] = {}


def timed(name: str, function: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - started

    return wrapper


def timed_async(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await function(*args, **kwargs)
        finally:
            PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - started

    return wrapper


def timed_iterator(name: str, function: Callable[..., Iterator[_T]]) -> Callable[..., Iterator[_T]]:
    """Time spent inside the generator (in whichever thread pulls it)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[_T]:
        inner = function(*args, **kwargs)
        while True:
            started = time.perf_counter()
            try:
                item = next(inner)
            except StopIteration:
                return
            finally:
                PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - started
            yield item

    return wrapper


def instrument() -> None:
    """Wrap the runner's phases; the names are looked up in ``runner`` at call time."""
    r = runner_module
    r._open_state = timed("open state, check fingerprint", r._open_state)
    StateStore.forget_retryable = timed(  # type: ignore[method-assign]
        "forget retryable rows", StateStore.forget_retryable
    )
    r._rows_present = timed("count/repair output rows", r._rows_present)
    r._caught_up_sinks = timed_async("catch up outputs (incl. count)", r._caught_up_sinks)
    r.select_items = timed_iterator(  # type: ignore[attr-defined]
        "skip pass (read list, look up keys)",
        r.select_items,  # type: ignore[attr-defined]
    )


def child(spec: dict[str, Any]) -> int:
    instrument()
    options = pipeline_options(spec["url"], dedup=True)
    state = JobState(path=Path(spec["state"]), resume=True)

    async def resume() -> int:
        stats = await run([spec["list"]], options, outputs=[spec["out"]], state=state)
        return stats.total

    meter = Meter()
    meter.start()
    results = asyncio.run(resume())
    meter.stop()
    store = StateStore(Path(spec["state"]))
    rows = store.count()
    store.close()
    report({**meter.figures(rows), "results": results, "state_rows": rows, "phases": PHASES})
    return 0


def print_results(runs: dict[int, list[dict[str, Any]]]) -> None:
    counts = sorted(runs)

    def median(count: int, key: str) -> float:
        return float(statistics.median(float(run[key]) for run in runs[count]))

    def phase(count: int, name: str) -> float:
        return float(statistics.median(run["phases"].get(name, 0.0) for run in runs[count]))

    rows = [
        [
            f"{count:,} inputs",
            f"{median(count, 'wall_s'):.1f}",
            f"{median(count, 'cpu_s'):.1f}",
            f"{median(count, 'peak_rss_mb'):.0f}",
            f"{median(count, 'peak_rss_mb') - median(count, 'baseline_rss_mb'):.0f}",
            f"{1e6 * median(count, 'wall_s') / count:.1f}",
            " ".join(f"{run['wall_s']:.1f}" for run in runs[count]),
        ]
        for count in counts
    ]
    header = ["resume", "wall s", "CPU s", "peak RSS MB", "growth MB", "µs/input", "runs (wall s)"]
    print(table(header, rows))
    names = list(runs[counts[-1]][0]["phases"])
    print("\nphases (median seconds):")
    phase_rows = [[name, *(f"{phase(count, name):.2f}" for count in counts)] for name in names]
    replay = [
        phase(c, "catch up outputs (incl. count)") - phase(c, "count/repair output rows")
        for c in counts
    ]
    phase_rows.append(["  of which replay query (records(skip=N))", *(f"{v:.2f}" for v in replay)])
    print(table(["phase", *(f"{count:,}" for count in counts)], phase_rows))
    big, small = counts[-1], counts[0]
    ratio = median(big, "peak_rss_mb") / median(small, "peak_rss_mb")
    wall = median(big, "wall_s")
    print(
        f"\n{big:,} inputs: {wall:.1f} s ({'meets' if wall < 60 else 'MISSES'} the < 60 s target); "
        f"peak RSS {big:,} / {small:,}: {ratio:.2f} ({'flat' if ratio < 1.1 else 'NOT flat'}); "
        "the emulator received 0 requests in every run"
    )


if __name__ == "__main__":
    sys.exit(main())

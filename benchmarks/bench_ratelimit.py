"""The adaptive rate controller against a rate-limited server: does it settle just under R?

    python benchmarks/bench_ratelimit.py [--limits 10,40,100] [--concurrency 8,32]
                                         [--seconds 8] [--latency-ms 20] [--repeat 3] [--quick]

For each server limit R, an emulator in its own process runs with ``--rate-limit R`` (a token
bucket holding R tokens, refilled at R/s; 429 beyond it, no ``Retry-After``, as the hosted
service promises none), plus one more with ``--rate-limit-retry-after 1``. The client
(``batchclassify.run``, adaptive throttle on, no ``--rate``, ``dedup=False``) classifies
``R * (seconds + 1)`` images: the first R go through on the full bucket, the rest take about
``--seconds`` at the limit. Each point is run ``--repeat`` times, configurations alternating;
``POST /_emulator/reset`` refills the bucket and zeroes the stats before each run.

Printed per point (medians): the overall rate (all images / wall time) and the sustained rate
(images after the first R, over the time after the R-th result), each divided by R; the share of
requests answered 429 (the emulator's ``by_status``); requests sent; and the throttle's cuts.
Target: sustained rate >= 85% of R with < 5% of requests answered 429. The small constant
latency (``--latency-ms``) keeps even C = 8 able to exceed R = 100 (8 / 20 ms = 400/s), so the
limit, not the concurrency, is what binds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchutil import (
    Emulator,
    Meter,
    machine,
    make_images,
    pipeline_options,
    report,
    run_child,
    table,
    write_list,
)

from batchclassify import Pipeline, run
from batchclassify.model import Result

#: the extra point: this limit and concurrency, with ``Retry-After: 1`` on every 429
RETRY_AFTER_POINT = (40, 32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limits", default="10,40,100", help="server limits R, requests/s")
    parser.add_argument("--concurrency", default="8,32", help="client concurrencies")
    parser.add_argument("--seconds", type=float, default=8.0, help="time at the limit per run")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="emulator latency")
    parser.add_argument("--repeat", type=int, default=3, help="runs per point (default 3)")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    limits = [float(part) for part in args.limits.split(",")]
    concurrencies = [int(part) for part in args.concurrency.split(",")]
    points: list[tuple[float, int, bool]] = [(r, c, False) for r in limits for c in concurrencies]
    points.append((*RETRY_AFTER_POINT, True))
    if args.quick:
        points, args.seconds, args.repeat = [(40, 8, False), (40, 32, False), (40, 32, True)], 4, 1
    started = time.perf_counter()
    print(machine())
    print(
        f"emulator latency {args.latency_ms:g} ms; token bucket of R tokens; "
        f"R * {args.seconds + 1:g} images per run; {args.repeat} alternating runs per point\n"
    )
    runs: dict[tuple[float, int, bool], list[dict[str, Any]]] = {point: [] for point in points}
    servers = {(r, retry) for r, _, retry in points}
    with tempfile.TemporaryDirectory(prefix="bench-ratelimit-") as tmp:
        images = make_images(Path(tmp) / "images", 50)
        emulators: dict[tuple[float, bool], Emulator] = {}
        try:
            for limit, retry in sorted(servers):
                options = ["--latency-ms", f"{args.latency_ms:g}", "--rate-limit", f"{limit:g}"]
                if retry:
                    options += ["--rate-limit-retry-after", "1"]
                emulators[limit, retry] = Emulator(*options).__enter__()
            for _ in range(args.repeat):
                for limit, concurrency, retry in points:
                    count = round(limit * (args.seconds + 1))
                    listing = write_list(Path(tmp) / f"{count}.txt", images, count)
                    emulator = emulators[limit, retry]
                    runs[limit, concurrency, retry].append(
                        measure(emulator, listing, count, concurrency, limit)
                    )
        finally:
            for emulator in emulators.values():
                emulator.__exit__(None, None, None)
    print_results(runs)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def measure(
    emulator: Emulator, listing: Path, count: int, concurrency: int, limit: float
) -> dict[str, Any]:
    emulator.reset()
    spec = {"list": str(listing), "url": emulator.url, "concurrency": concurrency}
    figures = run_child(__file__, spec)
    stats = emulator.stats()
    times: list[float] = figures.pop("done_at")
    burst = int(limit)
    figures["overall"] = count / figures["wall_s"] / limit
    figures["sustained"] = (count - burst) / (times[-1] - times[burst - 1]) / limit
    figures["served"] = stats["requests"]
    figures["share_429"] = stats["by_status"].get("429", 0) / stats["requests"]
    if figures["ok"] != count:
        print(f"warning: {count - figures['ok']} of {count} images failed", file=sys.stderr)
    return figures


class _Clock:
    """A null sink noting when each result arrived (seconds since the run started)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.done_at: list[float] = []

    async def write(self, result: Result) -> None:
        if result.ok:
            self.done_at.append(time.perf_counter() - self.started)

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def child(spec: dict[str, Any]) -> int:
    options = pipeline_options(spec["url"], spec["concurrency"])
    pipelines: list[Pipeline] = []
    clock = _Clock()
    meter = Meter()
    meter.start()
    stats = asyncio.run(run([spec["list"]], options, sinks=[clock], on_start=pipelines.append))
    meter.stop()
    throttle = pipelines[0].throttle
    assert throttle is not None
    report(
        {
            **meter.figures(stats.total),
            "ok": stats.ok,
            "requests": stats.requests_sent,
            "cuts": throttle.cuts,
            "final_rate": throttle.rate,
            "done_at": clock.done_at,
        }
    )
    return 0


def print_results(runs: dict[tuple[float, int, bool], list[dict[str, Any]]]) -> None:
    rows = []
    met = 0
    for (limit, concurrency, retry), samples in runs.items():

        def median(key: str, samples: list[dict[str, Any]] = samples) -> float:
            return float(statistics.median(float(s[key]) for s in samples))

        sustained, share = median("sustained"), median("share_429")
        ok = sustained >= 0.85 and share < 0.05
        met += ok
        rows.append(
            [
                f"R={limit:g} C={concurrency}" + (" Retry-After: 1" if retry else ""),
                f"{median('images'):.0f}",
                f"{median('overall'):.1%}",
                f"{sustained:.1%}",
                f"{share:.1%}",
                f"{median('requests'):.0f}",
                f"{median('cuts'):.0f}",
                f"{median('final_rate'):.1f}",
                f"{median('wall_s'):.1f}",
                "yes" if ok else "NO",
                " ".join(f"{s['sustained']:.0%}/{s['share_429']:.0%}" for s in samples),
            ]
        )
    header = [
        "point",
        "images",
        "overall/R",
        "sustained/R",
        "429s",
        "requests",
        "cuts",
        "end rate/s",
        "wall s",
        "target",
        "runs (sustained/429s)",
    ]
    print(table(header, rows))
    print(f"\n{met} of {len(runs)} points meet the target (sustained >= 85% of R, < 5% 429s)")


if __name__ == "__main__":
    sys.exit(main())

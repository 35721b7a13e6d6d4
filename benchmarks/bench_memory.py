"""Is the client's memory O(1) in the input size? A 200k-line list against a 20k-line one.

    python benchmarks/bench_memory.py [--images 200000] [--small 20000] [--concurrency 64]
                                      [--repeat 2] [--quick]

The inputs are local file paths: ``--images`` hard links (in folders of 1000) to 8 small
distinct JPEGs, listed one per line in a ``.txt`` file (the small list is its first ``--small``
lines), classified with ``dedup=False`` so every line is read, prepared and sent. Hard links keep
every path distinct (a leak keyed by path would show) for the price of a directory entry.
URLs by reference were the other option; they make the emulator fetch every image from a third
process, so three processes would share the two cores instead of two, for the same client work.

The emulator answers at once (no latency); the client runs ``batchclassify.run`` with no state
and no outputs (``NullSink``) in a fresh process per run, so ``ru_maxrss`` is that run's alone.
Printed per list size (median of ``--repeat`` runs, sizes alternating): peak RSS, its growth over
the RSS right before the run started, images/s and client CPU ms per image; the ratio of the
peak RSS of the big run to the small one (target about 1.0); and the big run's current RSS
sampled as it goes (flat means O(1)).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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
)

from batchclassify import run
from batchclassify.model import Result
from batchclassify.sinks import NullSink

DISTINCT = 8
PER_FOLDER = 1000
_PAGE_MB = resource.getpagesize() / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200_000, help="big list (default 200000)")
    parser.add_argument("--small", type=int, default=20_000, help="small list (default 20000)")
    parser.add_argument("--concurrency", type=int, default=64, help="client concurrency")
    parser.add_argument("--repeat", type=int, default=2, help="runs per size (default 2)")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.images, args.small, args.repeat = 20_000, 2_000, 1
    started = time.perf_counter()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, Emulator() as emulator:
        big, small = make_inputs(Path(tmp), args.images, args.small)
        print(
            f"{args.images} hard links to {DISTINCT} distinct 64×48 JPEGs, made in "
            f"{time.perf_counter() - started:.1f} s; client concurrency {args.concurrency}, "
            f"emulator without latency, {args.repeat} run(s) per size\n"
        )
        sizes = {args.small: small, args.images: big}
        runs: dict[int, list[dict[str, Any]]] = {count: [] for count in sizes}
        for _ in range(args.repeat):
            for count, listing in sizes.items():
                emulator.reset()
                spec = {
                    "list": str(listing),
                    "url": emulator.url,
                    "concurrency": args.concurrency,
                    "probe_every": max(count // 10, 1),
                }
                figures = run_child(__file__, spec)
                served = emulator.stats()["by_status"].get("200", 0)
                if figures["ok"] != count or served != count:
                    raise RuntimeError(f"{count} inputs: {figures['ok']} ok, {served} served")
                runs[count].append(figures)
    print_results(runs, args.small, args.images)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def make_inputs(folder: Path, count: int, small: int) -> tuple[Path, Path]:
    """``count`` hard links to a few tiny JPEGs and two lists of them: all, and the first
    ``small``."""
    originals = make_images(folder / "originals", DISTINCT, size=(64, 48))
    big_list, small_list = folder / "all.txt", folder / "small.txt"
    with big_list.open("w", encoding="utf-8") as big, small_list.open("w", encoding="utf-8") as few:
        for n in range(count):
            sub = folder / "links" / f"{n // PER_FOLDER:04d}"
            if n % PER_FOLDER == 0:
                sub.mkdir(parents=True)
            path = sub / f"{n:07d}.jpg"
            os.link(originals[n % DISTINCT], path)
            big.write(f"{path}\n")
            if n < small:
                few.write(f"{path}\n")
    return big_list, small_list


class RssProbe:
    """A null sink that notes the process's current RSS every ``every`` results."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.seen = 0
        self.samples: list[tuple[int, float]] = []

    async def write(self, result: Result) -> None:
        self.seen += 1
        if self.seen % self.every == 0:
            self.samples.append((self.seen, current_rss_mb()))

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def current_rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * _PAGE_MB


def child(spec: dict[str, Any]) -> int:
    options = pipeline_options(spec["url"], spec["concurrency"])
    probe = RssProbe(spec["probe_every"])
    meter = Meter()
    meter.start()
    stats = asyncio.run(run([spec["list"]], options, sinks=[NullSink(), probe]))
    meter.stop()
    report({**meter.figures(stats.total), "ok": stats.ok, "rss_samples": probe.samples})
    return 0


def print_results(runs: dict[int, list[dict[str, Any]]], small: int, big: int) -> None:
    def median(count: int, key: str) -> float:
        return statistics.median(float(run[key]) for run in runs[count])

    rows = []
    for count in (small, big):
        rows.append(
            [
                f"{count:,} lines",
                f"{median(count, 'peak_rss_mb'):.1f}",
                f"{median(count, 'peak_rss_mb') - median(count, 'baseline_rss_mb'):.1f}",
                f"{median(count, 'images_per_s'):.0f}",
                f"{median(count, 'cpu_ms_per_image'):.3f}",
                f"{median(count, 'wall_s'):.1f}",
                " ".join(f"{run['peak_rss_mb']:.1f}" for run in runs[count]),
            ]
        )
    header = [
        "input",
        "peak RSS MB",
        "growth MB",
        "images/s",
        "CPU ms/img",
        "wall s",
        "runs (peak MB)",
    ]
    print(table(header, rows))
    ratio = median(big, "peak_rss_mb") / median(small, "peak_rss_mb")
    verdict = "flat" if ratio < 1.1 else "GROWS"
    print(f"\npeak RSS {big:,} / {small:,} lines: {ratio:.3f} ({verdict}; target ≈ 1.0)")
    samples = runs[big][0]["rss_samples"]
    print(
        f"current RSS during one {big:,}-line run (results done: MB): "
        + ", ".join(f"{done // 1000}k: {mb:.1f}" for done, mb in samples)
    )


if __name__ == "__main__":
    sys.exit(main())

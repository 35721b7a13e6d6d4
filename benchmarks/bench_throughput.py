"""Throughput against concurrency: how close does batchclassify get to C / latency?

    python benchmarks/bench_throughput.py [--latency-ms 100] [--concurrency 1,8,32,128,256]
                                          [--repeat 3] [--quick]

Starts two emulators in their own processes: one with a constant ``--latency-ms`` (no tail) and
one with no latency at all, whose CPU per request gives the emulator's own ceiling (it serves
from one event loop, so at most ``1 / CPU seconds per request`` requests/s). Each point runs the
client in a fresh process (``batchclassify.run`` over a ``.txt`` list, ``dedup=False``, a null
sink) on ``max(min_images, 20 * C)`` lines cycling through a few hundred distinct 320×240 JPEGs,
and prints the median over ``--repeat`` runs (the configurations alternate) of images/s, the
ratio to the latency bound ``C / L`` and to the binding bound, the request latency the client
saw (p50/p99), client CPU ms per image, client and emulator cores used, and the client's peak
RSS. Three bounds apply at once: the latency bound ``C / L``, the emulator's ceiling and the
client's own ceiling (``1000 / client CPU ms per image`` on one core, since the event loop holds
the GIL); the smallest is named in the ``bound`` column. Both processes share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchutil import (
    Emulator,
    Meter,
    Samples,
    machine,
    make_images,
    pipeline_options,
    report,
    run_child,
    table,
    write_list,
)

from batchclassify import run
from batchclassify.sinks import NullSink

#: images per point: enough for ~20 rounds of C requests
ROUNDS = 20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-ms", type=float, default=100.0, help="emulator latency")
    parser.add_argument(
        "--concurrency", default="1,8,32,128,256", help="client concurrencies, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per point (default 3)")
    parser.add_argument("--min-images", type=int, default=40, help="images per point, at least")
    parser.add_argument("--distinct", type=int, default=300, help="distinct JPEGs (default 300)")
    parser.add_argument("--ceiling-images", type=int, default=3000, help="images, latency 0")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    concurrencies = [int(part) for part in args.concurrency.split(",")]
    if args.quick:
        concurrencies, args.repeat, args.min_images = [1, 32, 128], 1, 20
        args.distinct, args.ceiling_images = 100, 1000
    rounds = 10 if args.quick else ROUNDS
    latency = args.latency_ms / 1000
    started = time.perf_counter()
    print(machine())
    with (
        tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp,
        Emulator("--latency-ms", f"{args.latency_ms:g}") as slow,
        Emulator() as fast,
    ):
        images = make_images(Path(tmp) / "images", args.distinct)
        size = sum(p.stat().st_size for p in images) / len(images) / 1024
        print(
            f"{len(images)} distinct 320×240 JPEGs ({size:.0f} KB each), emulator latency "
            f"{args.latency_ms:g} ms constant, {args.repeat} alternating runs per point\n"
        )
        points: list[tuple[str, Emulator, int, int]] = [
            ("ceiling", fast, 64, args.ceiling_images),
            *((f"C={c}", slow, c, max(args.min_images, rounds * c)) for c in concurrencies),
        ]
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in points}
        for _ in range(args.repeat):
            for label, emulator, concurrency, count in points:
                listing = write_list(Path(tmp) / f"{count}.txt", images, count)
                runs[label].append(measure(emulator, listing, concurrency, count))
    print_ceiling(Samples(runs["ceiling"]))
    emulator_ceiling = 1000 / Samples(runs["ceiling"]).median("emulator_cpu_ms_per_request")
    print_grid(points[1:], runs, latency, emulator_ceiling)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def measure(emulator: Emulator, listing: Path, concurrency: int, count: int) -> dict[str, Any]:
    """One run of the client in its own process; adds what the emulator saw and spent."""
    emulator.reset()
    cpu_before = emulator.cpu_seconds()
    spec = {"list": str(listing), "url": emulator.url, "concurrency": concurrency}
    figures = run_child(__file__, spec)
    emulator_cpu = emulator.cpu_seconds() - cpu_before
    stats = emulator.stats()
    if figures["ok"] != count or stats["by_status"].get("200") != count:
        raise RuntimeError(f"expected {count} answers, got {figures} / {stats['by_status']}")
    figures["emulator_cpu_ms_per_request"] = 1000 * emulator_cpu / stats["requests"]
    figures["emulator_cores"] = emulator_cpu / figures["wall_s"]
    figures["client_cores"] = figures["cpu_s"] / figures["wall_s"]
    return figures


def child(spec: dict[str, Any]) -> int:
    """The measured client: batchclassify.run over a list, no dedup, results discarded."""
    options = pipeline_options(spec["url"], spec["concurrency"])
    meter = Meter()
    meter.start()
    stats = asyncio.run(run([spec["list"]], options, sinks=[NullSink()]))
    meter.stop()
    report(
        {
            **meter.figures(stats.total),
            "ok": stats.ok,
            "requests": stats.requests_sent,
            "latency_p50_ms": stats.latency.percentile(50) or 0.0,
            "latency_p99_ms": stats.latency.percentile(99) or 0.0,
        }
    )
    return 0


def print_ceiling(samples: Samples) -> None:
    cpu = samples.median("emulator_cpu_ms_per_request")
    client = samples.median("cpu_ms_per_image")
    print("emulator ceiling (latency 0, client concurrency 64):")
    print(
        f"  achieved {samples.median('images_per_s'):.0f} images/s with client "
        f"{samples.median('client_cores'):.2f} cores + emulator "
        f"{samples.median('emulator_cores'):.2f} cores busy on this machine"
    )
    print(
        f"  emulator {cpu:.3f} CPU ms/request => at most {1000 / cpu:.0f} requests/s on one core; "
        f"client {client:.3f} CPU ms/image => at most {1000 / client:.0f} images/s on one core\n"
    )


def print_grid(
    points: Sequence[tuple[str, Emulator, int, int]],
    runs: dict[str, list[dict[str, Any]]],
    latency: float,
    emulator_ceiling: float,
) -> None:
    rows = []
    crossover: str | None = None
    for label, _, concurrency, count in points:
        samples = Samples(runs[label])
        rate = samples.median("images_per_s")
        cpu_ms = samples.median("cpu_ms_per_image")
        bound = concurrency / latency
        client_ceiling = 1000 / cpu_ms
        limits = {"C/L": bound, "emulator": emulator_ceiling, "client CPU": client_ceiling}
        binding = min(limits, key=lambda name: limits[name])
        cores = samples.median("client_cores")
        if crossover is None and cpu_ms * bound / 1000 >= 0.8:
            crossover = label
        rows.append(
            [
                label,
                count,
                f"{rate:.1f}",
                f"{bound:.0f}",
                f"{rate / bound:.1%}",
                f"{rate / limits[binding]:.0%}",
                f"{samples.median('latency_p50_ms'):.0f}/{samples.median('latency_p99_ms'):.0f}",
                f"{cpu_ms:.3f}",
                f"{cores:.2f}",
                f"{samples.median('emulator_cores'):.2f}",
                f"{samples.median('peak_rss_mb'):.0f}",
                f"{binding} ({limits[binding]:.0f}/s)",
                " ".join(f"{v:.0f}" for v in samples.values("images_per_s")),
            ]
        )
    header = [
        "point",
        "images",
        "images/s",
        "C/L",
        "ratio",
        "of bound",
        "p50/p99 ms",
        "CPU ms/img",
        "client cores",
        "emu cores",
        "RSS MB",
        "bound",
        "runs (images/s)",
    ]
    print(table(header, rows))
    cpu_ms = min(Samples(runs[p[0]]).median("cpu_ms_per_image") for p in points)
    print(
        f"\ncrossover: client CPU per image × C/L reaches 0.8 core at {crossover or 'no point'}; "
        f"one core of client CPU at {cpu_ms:.3f} ms/image is {1000 / cpu_ms:.0f} images/s, "
        f"i.e. C ≈ {latency * 1000 / cpu_ms:.0f} at L = {latency * 1000:g} ms "
        f"(the emulator's ceiling of {emulator_ceiling:.0f}/s binds from C ≈ "
        f"{emulator_ceiling * latency:.0f})"
    )


if __name__ == "__main__":
    sys.exit(main())

"""Hedged requests against the hosted API's long latency tail: throughput gained, requests spent.

    python benchmarks/bench_hedge.py [--concurrency 64] [--images 1500] [--repeat 3]
                                     [--fixed 2.0] [--quick]

One emulator in its own process with the hosted service's latency shape (log-normal, p50
``180 ms``, p99 ``5.6 s``: ``--latency-ms 180 --latency-p99-ms 5600``), reseeded before every
run. Four clients, each in a fresh process, in rotating order, ``--repeat`` times:

- batchclassify with hedging off (the default);
- batchclassify with ``--hedge-after auto`` (p95 of recent latencies, at most 5 % hedged);
- batchclassify with a fixed ``--hedge-after`` (``--fixed`` seconds);
- the reference loop: plain aiohttp, C workers on a queue, base64 + POST + ``json.loads``, no
  retries and no hedging (what a minimal client gets from the same tail).

Printed per client (medians): images/s, the speed-up over hedging off (the issue's target:
≥ 1.25×), extra requests as a share of the images (target: ≤ 6 %), hedges sent and won, and
each run's images/s. Every run must end with one ok row per image.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from benchutil import (
    API_KEY,
    MODEL,
    VERSION,
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
from batchclassify.hedge import HedgeOptions
from batchclassify.sinks import NullSink

TAIL = ("--latency-ms", "180", "--latency-p99-ms", "5600")
#: the issue's targets
SPEEDUP_TARGET = 1.25
EXTRA_TARGET = 0.06


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--images", type=int, default=1500, help="images per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client (default 3)")
    parser.add_argument("--fixed", type=float, default=2.0, help="the fixed hedge delay, s")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.images, args.repeat = 400, 1
    started = time.perf_counter()
    print(machine())
    clients: list[tuple[str, dict[str, Any]]] = [
        ("hedging off", {"tool": "batchclassify", "hedge": None}),
        ("--hedge-after auto", {"tool": "batchclassify", "hedge": "auto"}),
        (f"--hedge-after {args.fixed:g}", {"tool": "batchclassify", "hedge": args.fixed}),
        ("reference loop", {"tool": "reference"}),
    ]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in clients}
    with tempfile.TemporaryDirectory(prefix="bench-hedge-") as tmp, Emulator(*TAIL) as emulator:
        images = make_images(Path(tmp) / "images", 200, size=(64, 48))
        listing = write_list(Path(tmp) / "list.txt", images, args.images)
        print(
            f"{args.images} images per run (cycling 200 distinct 64x48 JPEGs, dedup off), "
            f"C = {args.concurrency}, emulator latency log-normal p50 180 ms / p99 5.6 s, "
            f"{args.repeat} runs per client in rotating order\n"
        )
        for repeat in range(args.repeat):
            order = clients[repeat % len(clients) :] + clients[: repeat % len(clients)]
            for label, spec in order:
                emulator.reset()
                figures = run_child(
                    __file__,
                    {
                        **spec,
                        "url": emulator.url,
                        "list": str(listing),
                        "concurrency": args.concurrency,
                    },
                )
                served = emulator.stats()
                if figures["ok"] != args.images:
                    raise RuntimeError(f"{label}: {figures['ok']} of {args.images} ok")
                figures["requests"] = served["requests"]
                runs[label].append(figures)
    print_results(clients, runs, args.images)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def child(spec: dict[str, Any]) -> int:
    with open(spec["list"], encoding="utf-8") as handle:
        paths = [line.strip() for line in handle if line.strip()]
    meter = Meter()
    meter.start()
    if spec["tool"] == "reference":
        ok = asyncio.run(reference_loop(spec["url"], paths, spec["concurrency"]))
        meter.stop()
        report({**meter.figures(len(paths)), "ok": ok, "hedged": 0, "won": 0})
        return 0
    options = pipeline_options(spec["url"], spec["concurrency"])
    hedge = spec["hedge"]
    if hedge is not None:
        after = None if hedge == "auto" else float(hedge)
        client = dataclasses.replace(options.client, hedge=HedgeOptions(after=after))
        options = dataclasses.replace(options, client=client)
    stats = asyncio.run(run([spec["list"]], options, sinks=[NullSink()]))
    meter.stop()
    figures = meter.figures(stats.total)
    report({**figures, "ok": stats.ok, "hedged": stats.hedged, "won": stats.hedges_won})
    return 0


async def reference_loop(url: str, paths: list[str], concurrency: int) -> int:
    """The plain aiohttp loop: C workers on a queue; returns how many answered 200. A request
    that times out (30 s) goes back on the queue: nothing else is retried."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    target = f"{url}/{MODEL}/{VERSION}?api_key={API_KEY}&confidence=0.01"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    ok = 0
    timeout = aiohttp.ClientTimeout(total=30)  # as batchclassify's default
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal ok
            while not queue.empty():
                path = queue.get_nowait()
                with open(path, "rb") as handle:  # noqa: ASYNC230 (a few KB, local)
                    body = base64.b64encode(handle.read())
                try:
                    async with session.post(target, data=body, headers=headers) as response:
                        answer = json.loads(await response.read())
                        ok += response.status == 200 and "top" in answer
                except asyncio.TimeoutError:
                    queue.put_nowait(path)  # the tail's rare > 30 s draw: once more

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


def print_results(
    clients: Sequence[tuple[str, dict[str, Any]]],
    runs: dict[str, list[dict[str, Any]]],
    images: int,
) -> None:
    base = Samples(runs["hedging off"]).median("images_per_s")
    rows = []
    for label, _ in clients:
        samples = Samples(runs[label])
        rate = samples.median("images_per_s")
        extra = samples.median("requests") / images - 1
        rows.append(
            [
                label,
                f"{rate:.1f}",
                f"{rate / base:.2f}x",
                f"{extra:+.1%}",
                f"{samples.median('hedged'):.0f}/{samples.median('won'):.0f}",
                f"{samples.median('cpu_ms_per_image'):.3f}",
                " ".join(f"{v:.0f}" for v in samples.values("images_per_s")),
            ]
        )
    header = [
        "client",
        "images/s",
        "vs off",
        "extra requests",
        "hedged/won",
        "CPU ms/img",
        "runs (images/s)",
    ]
    print(table(header, rows))
    print(
        f"\ntargets (issue 14, goal 3): >= {SPEEDUP_TARGET:.2f}x hedging off, for <= "
        f"{EXTRA_TARGET:.0%} extra requests"
    )


if __name__ == "__main__":
    sys.exit(main())

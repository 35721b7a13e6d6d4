"""Batch mode (``--batch-size``) against one image per request, on a modelled GPU server.

    python benchmarks/bench_batch.py [--concurrency 64] [--images 640] [--sizes 8,16,32]
                                     [--slots 1] [--batch-latency-ms 40] [--per-image-ms 2]
                                     [--repeat 3] [--quick]

The emulator runs in its own process as a self-hosted GPU server (``--gpu-slots K
--batch-latency-ms A --per-image-ms B``): a request of n images holds one of K slots for
A + B·n ms, the others queue. That makes the server, not the client, the bound, as with a real
GPU: one image per request can reach at most ``K · 1000 / (A + B)`` images/s, a batch of N
``K · N · 1000 / (A + B·N)``. At the same concurrency C (images in flight), each run is one
fresh process (medians of ``--repeat``, the order rotating), every output checked for one ok
row per input:

- batchclassify, the real CLI with its defaults (state, dedup, JSONL): ``--batch-size 1`` (one
  image per request, the classic route), then ``--batch-size N`` for each N of ``--sizes``;
- the plain aiohttp reference loop (``reference.py``) the same two ways: one image per request
  with C workers, and C/N workers each sending N images to ``/infer/classification``.

Printed: images/s, the share of the GPU bound, client CPU ms per image, requests sent, the
GPU's busy share, and the ratio of each batch mode to batchclassify's one-image mode.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench_cpu import Run, _inputs, measure
from benchutil import Emulator, machine, table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=64, help="images in flight (C)")
    parser.add_argument("--images", type=int, default=640, help="images per run")
    parser.add_argument("--sizes", default="8,16,32", help="batch sizes N, comma-separated")
    parser.add_argument("--slots", type=int, default=1, help="GPU slots K")
    parser.add_argument("--batch-latency-ms", type=float, default=40.0, help="A")
    parser.add_argument("--per-image-ms", type=float, default=2.0, help="B")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    parser.add_argument("--quick", action="store_true", help="a ~40 s smoke run")
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.sizes.split(",")]
    if args.quick:
        args.images, args.repeat, sizes = 256, 1, [16]
    print(machine())
    # Every configuration: (name, client, extra arguments, images per request).
    configs: list[tuple[str, str, list[str], int]] = [
        ("batchclassify N=1", "batchclassify", ["--batch-size", "1"], 1),
        ("reference N=1", "reference", [], 1),
    ]
    for size in sizes:
        configs.append(
            (f"batchclassify N={size}", "batchclassify", ["--batch-size", str(size)], size)
        )
        configs.append((f"reference N={size}", "reference", ["--batch", str(size)], size))
    rounds = max(1, args.images // args.concurrency)
    gpu = ["--gpu-slots", str(args.slots), "--batch-latency-ms", f"{args.batch_latency_ms:g}"]
    gpu += ["--per-image-ms", f"{args.per_image_ms:g}"]
    runs: dict[str, list[Run]] = {name: [] for name, *_ in configs}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)
        listing = _inputs(root, [args.concurrency], rounds)[args.concurrency]
        with Emulator(*gpu) as emulator:
            for repeat in range(args.repeat):
                shift = repeat % len(configs)
                for name, client, extra, _ in configs[shift:] + configs[:shift]:
                    folder = root / f"run-{repeat}-{name.replace(' ', '-').replace('=', '')}"
                    run = measure(emulator, folder, client, listing, args.concurrency, extra)
                    run.client = name
                    runs[name].append(run)
                    status = "FAILED" if run.error else f"{run.images_per_s:7.1f} images/s"
                    print(f"  {name:<20} {status}", flush=True)
    print(
        f"\nGPU: K={args.slots}, A={args.batch_latency_ms:g} ms, B={args.per_image_ms:g} ms; "
        f"C={args.concurrency}; {rounds * args.concurrency} distinct 32-px JPEGs per run; "
        f"medians of {args.repeat}; {time.perf_counter() - started:.0f} s; {machine()}"
    )
    single = _median([r.images_per_s for r in runs["batchclassify N=1"]])
    rows = []
    for name, _, _, size in configs:
        done = [r for r in runs[name] if not r.error]
        if not done:
            rows.append([name, "failed", "", "", "", "", ""])
            continue
        rate = _median([r.images_per_s for r in done])
        bound = args.slots * size * 1000 / (args.batch_latency_ms + args.per_image_ms * size)
        rows.append(
            [
                name,
                f"{rate:.1f}",
                f"{bound:.1f}",
                f"{100 * rate / bound:.0f}%",
                f"{_median([1000 * r.cpu / r.images for r in done]):.2f}",
                f"{_median([r.requests for r in done]):.0f}",
                f"{rate / single:.2f}x" if single else "",
            ]
        )
    header = ["client", "images/s", "GPU bound", "of bound", "CPU ms/img", "requests", "vs N=1"]
    print(table(header, rows))
    failed = [run for group in runs.values() for run in group if run.error]
    for run in failed[:3]:
        print(f"\n{run.client} failed: {run.error}")
    return 1 if failed else 0


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


if __name__ == "__main__":
    sys.exit(main())

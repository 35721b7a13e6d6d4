"""The emulator's own cost: CPU milliseconds per request on many distinct images.

    python benchmarks/bench_emulator.py [--count 40000] [--size 32] [--concurrency 64] [--quick]

Starts the emulator in its own process (``benchutil.Emulator``, no latency, no faults), generates
``--count`` distinct small JPEGs (``--size`` pixels square, smooth colour blobs, ~1 KB each)
in memory, and sends each once, base64-encoded, from a plain aiohttp client at high concurrency.
The emulator's CPU time (user + system, from ``/proc``) is read around each phase:

* ``warm-up``: 500 other images, so imports, Pillow plugins and connection set-up are paid
  (not judged: it holds one-off costs, and /proc counts CPU in 10 ms ticks);
* ``cold``: every image for the first time (nothing cached anywhere in the emulator);
* ``again``: the same images a second time (what a cache keyed by content could save);
* ``one image``: a single image repeated (the HTTP floor of the emulator, whatever it caches).

Each row prints requests/s (bound by the client on a small machine: both share its cores), the
emulator's CPU ms per request and whether it meets the target of 0.1 ms per passthrough answer,
which is what lets a client benchmark measure the client rather than the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp
from benchutil import API_KEY, MODEL, VERSION, Emulator, machine, table
from PIL import Image

#: the goal: emulator CPU per passthrough answer, in milliseconds
TARGET_MS = 0.1
WARM_UP_IMAGES = 500


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=40_000, help="distinct images (40000)")
    parser.add_argument("--size", type=int, default=32, help="image width and height (32)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (64)")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run (5000 images)")
    args = parser.parse_args(argv)
    if args.quick:
        args.count = min(args.count, 5000)
    started = time.perf_counter()
    print(machine())
    bodies = make_bodies(args.count + WARM_UP_IMAGES, args.size)
    warm_up, images = bodies[:WARM_UP_IMAGES], bodies[WARM_UP_IMAGES:]
    mean_bytes = sum(len(b) for b in images) * 3 / 4 / len(images)
    print(
        f"{len(images)} distinct {args.size}x{args.size} JPEGs (~{mean_bytes:.0f} bytes each, "
        f"generated in {time.perf_counter() - started:.1f} s), concurrency {args.concurrency}\n"
    )
    rows = []
    with Emulator() as emulator:
        phases = [
            ("warm-up", warm_up),
            ("cold", images),
            ("again", images),
            ("one image", [images[0]] * max(1, len(images) // 4)),
        ]
        for label, phase in phases:
            figures = asyncio.run(measure(emulator, phase, args.concurrency))
            rows.append(
                [
                    label,
                    figures["requests"],
                    f"{figures['wall_s']:.1f}",
                    f"{figures['requests_per_s']:.0f}",
                    f"{figures['cpu_ms_per_request']:.3f}",
                    "-" if label == "warm-up" else verdict(figures["cpu_ms_per_request"]),
                ]
            )
    header = ["phase", "requests", "wall s", "requests/s", "emulator CPU ms/req", "<= target"]
    print(table(header, rows))
    print(f"\ntarget: <= {TARGET_MS} ms of emulator CPU per request, whatever the images")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def verdict(cpu_ms: float) -> str:
    return "yes" if cpu_ms <= TARGET_MS else "NO"


def make_bodies(count: int, size: int) -> list[bytes]:
    """``count`` distinct JPEGs, base64-encoded as the protocol sends them: a random 4x4 colour
    grid blown up to ``size`` pixels, so each looks like a blurry photo and compresses like one."""
    rng = random.Random(1)
    bodies = []
    for _ in range(count):
        grid = Image.frombytes("RGB", (4, 4), rng.randbytes(48))
        image = grid.resize((size, size), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        bodies.append(base64.b64encode(out.getvalue()))
    return bodies


async def measure(emulator: Emulator, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body once with ``concurrency`` requests in flight; return the figures."""
    emulator.reset()
    url = f"{emulator.url}/{MODEL}/{VERSION}?api_key={API_KEY}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    statuses: Counter[int] = Counter()
    pending = iter(range(len(bodies)))

    async def worker(session: aiohttp.ClientSession) -> None:
        for index in pending:
            async with session.post(url, data=bodies[index], headers=headers) as response:
                text = await response.read()
                statuses[response.status] += 1
                if index % 997 == 0 and response.status == 200:
                    assert "predictions" in json.loads(text)  # a real answer, not garbage

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        cpu_before = emulator.cpu_seconds()
        wall_before = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - wall_before
        cpu = emulator.cpu_seconds() - cpu_before
    if statuses != Counter({200: len(bodies)}):
        raise RuntimeError(f"expected {len(bodies)} answers 200, got {dict(statuses)}")
    return {
        "requests": len(bodies),
        "wall_s": wall,
        "requests_per_s": len(bodies) / wall,
        "cpu_ms_per_request": 1000 * cpu / len(bodies),
    }


if __name__ == "__main__":
    sys.exit(main())

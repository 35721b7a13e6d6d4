"""Can a hostile server make the client use memory? Peak RSS of runs whose answers never fit.

    python benchmarks/bench_hostile.py [--images 16] [--concurrency 8] [--size-mb 200]
                                       [--repeat 3] [--quick]

The hostile test server (``tests/hostile.py``) runs in this process on 127.0.0.1; every
measured client runs in a fresh process, so its peak RSS (``VmHWM``) is its own. Modes:

- ``normal``: valid ~300-byte answers (the baseline);
- ``huge``: every answer declares and streams ``--size-mb`` MB (default 200);
- ``endless``: chunked answers that never end;
- ``gzip-bomb``: ~1 MB on the wire, 1 GiB once inflated.

batchclassify runs with its defaults (``max_response_bytes`` 8 MB), no state, a null sink. The
reference is the plain aiohttp loop a first client would write (``await response.json()``,
aiohttp's own decompression), run on ``huge`` only with 2 images at concurrency 2: it holds
each body whole, so more would only measure the machine's memory. The bound for batchclassify:
the baseline plus at most ``concurrency x max_response_bytes`` (answers are refused unread when
they declare a larger size, and cut off at the limit otherwise). Figures: medians of
``--repeat`` runs, modes alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchutil import Meter, machine, make_images, pipeline_options, report, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hostile import running_hostile_server

from batchclassify import iter_results
from batchclassify.client import DEFAULT_MAX_RESPONSE_BYTES

MODES = ("normal", "huge", "endless", "gzip-bomb")
MB = 1024 * 1024


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16, help="images per run (default 16)")
    parser.add_argument("--concurrency", type=int, default=8, help="client concurrency")
    parser.add_argument("--size-mb", type=int, default=200, help="size of a huge answer")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (median)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        report(asyncio.run(_child(json.loads(args.child))))
        return 0
    if args.quick:
        args.images, args.repeat, args.size_mb = 8, 1, 50
    return asyncio.run(_parent(args))


async def _parent(args: argparse.Namespace) -> int:
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as folder:
        images = make_images(Path(folder) / "images", args.images, size=(64, 48))
        async with running_hostile_server(huge_size=args.size_mb * 1000 * 1000) as server:
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            reference: list[dict[str, Any]] = []
            for _ in range(args.repeat):
                for mode in MODES:
                    # "normal": a hostile path whose turn never comes (request k % 10**9).
                    hostile = mode != "normal"
                    every = 1 if hostile else 10**9
                    endpoint = server.url(mode if hostile else "huge", every=every)
                    spec = {
                        "client": "batchclassify",
                        "endpoint": endpoint,
                        "images": [str(p) for p in images],
                        "concurrency": args.concurrency,
                    }
                    runs[mode].append(await _run_child(spec))
                spec = {
                    "client": "reference",
                    "endpoint": server.url("huge", every=1),
                    "images": [str(p) for p in images[:2]],
                    "concurrency": 2,
                }
                reference.append(await _run_child(spec))
    bound = statistics.median(r["peak_rss_mb"] for r in runs["normal"]) + (
        args.concurrency * DEFAULT_MAX_RESPONSE_BYTES / MB
    )
    rows = []
    for mode in MODES:
        samples = runs[mode]
        rows.append(
            [
                f"batchclassify, {mode}",
                f"{statistics.median(r['peak_rss_mb'] for r in samples):.1f}",
                f"{statistics.median(r['wall_s'] for r in samples):.2f}",
                samples[-1]["rows"],
            ]
        )
    rows.append(
        [
            f"reference loop, huge ({len(images[:2])} images, C=2)",
            f"{statistics.median(r['peak_rss_mb'] for r in reference):.1f}",
            f"{statistics.median(r['wall_s'] for r in reference):.2f}",
            reference[-1]["rows"],
        ]
    )
    print(
        f"{args.images} images per run, concurrency {args.concurrency}, huge answers of "
        f"{args.size_mb} MB; medians of {args.repeat}"
    )
    print(table(["client, mode", "peak RSS MB", "wall s", "rows by outcome"], rows))
    print(
        f"expected for batchclassify: the baseline plus up to {args.concurrency} bodies of at "
        f"most {DEFAULT_MAX_RESPONSE_BYTES // MB} MB being read = {bound:.0f} MB (plus "
        "allocator slack); target under 150 MB"
    )
    return 0


async def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--child",
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 600)
    lines = out.decode().strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"child failed ({process.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def _child(spec: dict[str, Any]) -> dict[str, Any]:
    meter = Meter()
    meter.start()
    if spec["client"] == "reference":
        outcomes = await _reference(spec)
    else:
        options = pipeline_options(spec["endpoint"], spec["concurrency"])
        outcomes = Counter()
        async for result in iter_results(spec["images"], options):
            outcomes[result.error.type if result.error else "ok"] += 1
    meter.stop()
    figures = meter.figures(len(spec["images"]))
    figures["rows"] = " ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))
    return figures


async def _reference(spec: dict[str, Any]) -> Counter[str]:
    """The naive client: read the whole answer, let aiohttp inflate it."""
    import base64

    import aiohttp

    outcomes: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(path: str) -> None:
            body = base64.b64encode(await asyncio.to_thread(Path(path).read_bytes))
            url = f"{spec['endpoint']}/demo/1"
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.json(content_type=None)
                outcomes["ok"] += 1
            except Exception as exc:
                outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(one(path) for path in spec["images"]))
    return outcomes


if __name__ == "__main__":
    sys.exit(main())

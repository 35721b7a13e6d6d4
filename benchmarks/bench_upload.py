"""base64 or multipart? The client's cost and the bytes on the wire for each upload form.

    python benchmarks/bench_upload.py [--photos 24] [--small 600] [--concurrency 8]
                                      [--repeat 3] [--quick]

The emulator runs in its own process with a constant 50 ms latency (so neither form is bound by
the server); each measured client runs in a fresh process (``batchclassify.run``, no dedup, a
null sink) and reports its CPU per image and images/s. Two image sets: camera-sized photos
(3000x2000 JPEGs, sent as they are) and small 320x240 JPEGs (~15 KB). Upload MB is what the
request bodies hold: base64 text is 4/3 of the file, a multipart part the file itself (plus
~200 bytes of part headers, left out). Side by side with a
plain aiohttp loop doing the same base64 POSTs, the practical ceiling of a base64 client. The
theoretical saving of multipart is the 4/3 of base64 on the wire and the encode/hash work
(``base64.b64encode`` of 3 MB is a few ms); medians of ``--repeat`` runs, forms alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import sys
import tempfile
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
from batchclassify.sinks import NullSink


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=24, help="camera-sized photos per run")
    parser.add_argument("--small", type=int, default=600, help="small images per run")
    parser.add_argument("--concurrency", type=int, default=8, help="client concurrency")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import json

        return child(json.loads(args.child))
    if args.quick:
        args.photos, args.small, args.repeat = 6, 150, 1
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as folder, Emulator("--latency-ms", "50") as emulator:
        root = Path(folder)
        sets = {
            "photos 3000x2000": make_images(root / "photos", args.photos, size=(3000, 2000)),
            "small 320x240": make_images(root / "small", args.small, size=(320, 240)),
        }
        rows = []
        for name, images in sets.items():
            listing = write_list(root / f"{name.split()[0]}.txt", images, len(images))
            mean_kb = sum(p.stat().st_size for p in images) / len(images) / 1024
            samples: dict[str, list[dict[str, Any]]] = {}
            for _ in range(args.repeat):
                for form in ("base64", "multipart", "reference loop"):
                    emulator.reset()
                    spec = {
                        "url": emulator.url,
                        "list": str(listing),
                        "concurrency": args.concurrency,
                        "form": form,
                    }
                    figures = run_child(__file__, spec)
                    sizes = [p.stat().st_size for p in images]
                    sent = sizes if form == "multipart" else [4 * ((n + 2) // 3) for n in sizes]
                    figures["wire_mb"] = sum(sent) / 2**20
                    samples.setdefault(form, []).append(figures)
            for form, runs in samples.items():
                measured = Samples(runs)
                rows.append(
                    [
                        f"{name} ({mean_kb:.0f} KB), {form}",
                        f"{measured.median('images_per_s'):.1f}",
                        f"{measured.median('cpu_ms_per_image'):.2f}",
                        f"{measured.median('wire_mb'):.1f}",
                        f"{measured.median('peak_rss_mb'):.0f}",
                    ]
                )
    print(
        f"concurrency {args.concurrency}, emulator latency 50 ms, medians of {args.repeat}; "
        "upload MB = the request bodies"
    )
    print(table(["images, upload form", "images/s", "CPU ms/img", "upload MB", "RSS MB"], rows))
    print("bound: multipart sends 3/4 of base64's bytes and skips the encoding")
    return 0


def child(spec: dict[str, Any]) -> int:
    images = Path(spec["list"]).read_text().split()
    meter = Meter()
    meter.start()
    if spec["form"] == "reference loop":
        asyncio.run(_reference(spec["url"], images, spec["concurrency"]))
        total = len(images)
    else:
        options = pipeline_options(spec["url"], spec["concurrency"])
        client = dataclasses.replace(options.client, upload=spec["form"])
        options = dataclasses.replace(options, client=client)
        total = asyncio.run(run([spec["list"]], options, sinks=[NullSink()])).total
    meter.stop()
    report(meter.figures(total))
    return 0


async def _reference(url: str, images: list[str], concurrency: int) -> None:
    """The plain aiohttp loop: C workers, read, base64, POST, parse."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for image in images:
        queue.put_nowait(image)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    target = f"{url}/{MODEL}/{VERSION}?api_key={API_KEY}"
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while not queue.empty():
                path = queue.get_nowait()
                body = base64.b64encode(await asyncio.to_thread(Path(path).read_bytes))
                async with session.post(target, data=body, headers=headers) as response:
                    await response.json()

        await asyncio.gather(*(worker() for _ in range(concurrency)))


if __name__ == "__main__":
    sys.exit(main())

"""The reference client: the practical ceiling of a plain aiohttp classify loop.

    python benchmarks/reference.py --url URL --list files.txt --concurrency C --out out.jsonl

C workers take paths from an ``asyncio.Queue``; each reads the file, base64-encodes it, POSTs it
to ``{url}/{model}/{version}?api_key=...&confidence=0.01`` as
``application/x-www-form-urlencoded`` (the service's documented form), ``json.loads`` the answer
and writes one JSON line ``{"path", "status", "top"}``. Nothing else: no retries, no state, no
dedup, no rate control, no thread for the file read (local files of a few KB; a blocking read
is cheaper than a thread hop). It is what the benchmarks set batchclassify beside, as the
ceiling a client with all its guarantees can approach. ``main()`` prints one JSON line: images,
seconds (the loop), ``cpu_s`` (``time.process_time()`` of the whole process, startup included)
and ``peak_rss_mb`` (``VmHWM``, :func:`benchutil.peak_rss_mb`).

Importable: ``classify_all(url, paths, concurrency, out)`` is the loop itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO

import aiohttp
from benchutil import API_KEY, MODEL, VERSION, peak_rss_mb


async def classify_all(
    url: str,
    paths: Iterable[str],
    concurrency: int,
    out: IO[str],
    *,
    model: str = f"{MODEL}/{VERSION}",
    api_key: str = API_KEY,
) -> int:
    """Classify every path, one line each to ``out``; returns how many were sent."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    total = queue.qsize()
    target = f"{url.rstrip('/')}/{model}?api_key={api_key}&confidence=0.01"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    # aiohttp's default pool holds 100 connections, which would cap C above 100
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                path = queue.get_nowait()
                with open(path, "rb") as handle:  # noqa: ASYNC230 (a few KB, local)
                    body = base64.b64encode(handle.read())
                async with session.post(target, data=body, headers=headers) as response:
                    answer = json.loads(await response.read())
                    status = response.status
                row = {"path": path, "status": status, "top": answer.get("top")}
                out.write(json.dumps(row) + "\n")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


async def classify_batches(
    url: str,
    paths: Sequence[str],
    concurrency: int,
    out: IO[str],
    *,
    batch: int,
    model: str = f"{MODEL}/{VERSION}",
    api_key: str = API_KEY,
) -> int:
    """The same loop on a self-hosted server's batch route: ``concurrency`` images in flight
    as ``concurrency / batch`` requests of ``batch`` images to ``POST /infer/classification``."""
    queue: asyncio.Queue[Sequence[str]] = asyncio.Queue()
    for start in range(0, len(paths), batch):
        queue.put_nowait(paths[start : start + batch])
    target = f"{url.rstrip('/')}/infer/classification"
    workers = max(1, concurrency // batch)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=workers)) as session:

        async def worker() -> None:
            while not queue.empty():
                chunk = queue.get_nowait()
                images = []
                for path in chunk:
                    with open(path, "rb") as handle:  # noqa: ASYNC230 (a few KB, local)
                        value = base64.b64encode(handle.read()).decode("ascii")
                    images.append({"type": "base64", "value": value})
                body = {"model_id": model, "api_key": api_key, "confidence": 0.01, "image": images}
                async with session.post(target, json=body) as response:
                    answers = json.loads(await response.read())
                    status = response.status
                for path, answer in zip(chunk, answers, strict=True):
                    row = {"path": path, "status": status, "top": answer.get("top")}
                    out.write(json.dumps(row) + "\n")

        await asyncio.gather(*(worker() for _ in range(workers)))
    return len(paths)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the classify API")
    parser.add_argument("--list", required=True, help="a .txt file of image paths, one a line")
    parser.add_argument("--concurrency", type=int, default=8, help="workers (requests in flight)")
    parser.add_argument("--out", required=True, help="JSONL file for the rows")
    parser.add_argument("--model", default=f"{MODEL}/{VERSION}", help="PROJECT/VERSION")
    parser.add_argument("--api-key", default=API_KEY, help="sent as ?api_key=")
    parser.add_argument(
        "--batch", type=int, default=1, help="images per request on /infer/classification"
    )
    args = parser.parse_args(argv)
    with open(args.list, encoding="utf-8") as handle:
        paths = [line.strip() for line in handle if line.strip()]
    started = time.perf_counter()
    with open(args.out, "w", encoding="utf-8") as out:
        if args.batch > 1:
            loop = classify_batches(
                args.url,
                paths,
                args.concurrency,
                out,
                batch=args.batch,
                model=args.model,
                api_key=args.api_key,
            )
        else:
            loop = classify_all(
                args.url, paths, args.concurrency, out, model=args.model, api_key=args.api_key
            )
        total = asyncio.run(loop)
    seconds = time.perf_counter() - started
    figures = {
        "images": total,
        "seconds": seconds,
        "images_per_s": total / seconds if seconds else 0.0,
        "cpu_s": time.process_time(),
        "peak_rss_mb": peak_rss_mb(),
    }
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

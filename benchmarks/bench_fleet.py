"""A fleet of emulators against one: does ``--endpoint`` given 3 times give 3 servers' worth?

    python benchmarks/bench_fleet.py [--servers 3] [--images 1200] [--concurrency 24]
                                     [--capacity 100] [--repeat 3] [--quick]
                                     [--emulator-pythonpath PATH]

Each emulator runs in its own process and is the bottleneck alone: with the emulator's GPU
model (``--gpu-slots 1 --batch-latency-ms 1000/capacity --per-image-ms 0``: one request at a
time, the others queue) it serves ``--capacity`` images/s, whatever the client sends. Without
the GPU model (an emulator from before it), each emulator gets ``--rate-limit capacity``
instead, and answers 429 beyond it (the client's adaptive pacing and retries then decide how
close it gets). The table says which one was used. ``--emulator-pythonpath`` runs the emulators
from another checkout (its ``PYTHONPATH``), e.g. a branch with the GPU model not merged yet.

Clients, each in a fresh process, in rotating order, ``--repeat`` times:

- batchclassify on one server; batchclassify on the fleet (``endpoints=`` all of them);
- the reference loop (plain aiohttp, C workers, no retries) on one server, and on the fleet
  with requests dealt round-robin (only with the GPU model: with a rate limit it would just
  collect 429s);
- batchclassify on the fleet, with one server killed (SIGKILL) a third of the way through:
  the output (JSONL) must hold every input exactly once, all ok.

Printed (medians): images/s, the ratio fleet / one server (the issue's target: >= 2.7 with 3),
the requests each server answered, and for the kill run the rows, duplicates and missing inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
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
    report,
    run_child,
    table,
)

from batchclassify import ClientOptions, PipelineOptions, run
from batchclassify.retry import RetryPolicy

#: the issue's target for 3 servers
TARGET = 2.7


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", type=int, default=3, help="emulators in the fleet")
    parser.add_argument("--images", type=int, default=1200, help="images per run")
    parser.add_argument("--concurrency", type=int, default=24, help="requests in flight")
    parser.add_argument("--capacity", type=float, default=100.0, help="images/s per emulator")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client (default 3)")
    parser.add_argument("--emulator-pythonpath", help="PYTHONPATH for the emulator processes")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.images, args.repeat = 400, 1
    started = time.perf_counter()
    print(machine())
    gpu = emulator_has_gpu(args.emulator_pythonpath)
    if gpu:
        model = f"GPU model: --gpu-slots 1 --batch-latency-ms {1000 / args.capacity:g}"
        options = ["--gpu-slots", "1", "--batch-latency-ms", f"{1000 / args.capacity:g}"]
        options += ["--per-image-ms", "0"]
    else:
        model = f"no GPU model in this emulator: --rate-limit {args.capacity:g} (429 beyond)"
        options = ["--rate-limit", f"{args.capacity:g}"]
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        images = make_images(Path(tmp) / "images", args.images, size=(64, 48))
        listing = Path(tmp) / "list.txt"
        listing.write_text("".join(f"{path}\n" for path in images), encoding="utf-8")
        print(
            f"{args.images} distinct 64x48 JPEGs per run, C = {args.concurrency}, each emulator "
            f"{args.capacity:g} images/s ({model}), {args.repeat} runs per client\n"
        )
        clients = ["batchclassify, 1 server", f"batchclassify, {args.servers} servers"]
        if gpu:
            clients += ["reference loop, 1 server", f"reference loop, {args.servers} servers"]
        clients.append(f"batchclassify, {args.servers} servers, one killed")
        for repeat in range(args.repeat):
            order = clients[repeat % len(clients) :] + clients[: repeat % len(clients)]
            for label in order:
                count = args.servers if "servers" in label else 1
                out = Path(tmp) / "out.jsonl"
                with fleet(options, count, args.emulator_pythonpath) as emulators:
                    spec = {
                        "tool": "reference" if label.startswith("reference") else "batchclassify",
                        "urls": [emulator.url for emulator in emulators],
                        "list": str(listing),
                        "out": str(out),
                        "concurrency": args.concurrency,
                    }
                    killer = None
                    if label.endswith("killed"):
                        # A third of the way through, at the fleet's expected pace.
                        delay = args.images / (args.capacity * count) / 3
                        killer = threading.Timer(delay, kill, [emulators[1]])
                        killer.start()
                    figures = run_child(__file__, spec)
                    if killer is not None:
                        killer.cancel()
                    figures["served"] = [served(emulator) for emulator in emulators]
                figures.update(check_output(out, images))
                runs.setdefault(label, []).append(figures)
    print_results(clients, runs, args.servers)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def emulator_has_gpu(pythonpath: str | None) -> bool:
    with environment(pythonpath):
        completed = subprocess.run(
            [sys.executable, "-m", "batchclassify", "emulate", "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
    return "--gpu-slots" in completed.stdout


@contextlib.contextmanager
def environment(pythonpath: str | None) -> Iterator[None]:
    """``PYTHONPATH`` for the processes started inside (the emulators), restored after; they
    start in that folder too, as ``python -m`` looks in the current folder first."""
    if pythonpath is None:
        yield
        return
    before, folder = os.environ.get("PYTHONPATH"), os.getcwd()
    os.environ["PYTHONPATH"] = pythonpath
    os.chdir(pythonpath.split(os.pathsep)[0])
    try:
        yield
    finally:
        os.chdir(folder)
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@contextlib.contextmanager
def fleet(options: list[str], count: int, pythonpath: str | None) -> Iterator[list[Emulator]]:
    with contextlib.ExitStack() as stack:
        with environment(pythonpath):
            emulators = [stack.enter_context(Emulator(*options)) for _ in range(count)]
        yield emulators


def kill(emulator: Emulator) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(emulator.pid, signal.SIGKILL)


def served(emulator: Emulator) -> int:
    try:
        return int(emulator.stats()["by_status"].get("200", 0))
    except OSError:
        return -1  # killed


def check_output(out: Path, images: Sequence[Path]) -> dict[str, int]:
    """Rows in the output, duplicates, inputs missing, rows not ok."""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    sources = [row.get("source", row.get("path")) for row in rows]
    wanted = {str(path) for path in images}
    return {
        "rows": len(rows),
        "duplicates": len(sources) - len(set(sources)),
        "missing": len(wanted - set(sources)),
        "not_ok": sum(1 for row in rows if row.get("status") not in ("ok", 200)),
    }


def child(spec: dict[str, Any]) -> int:
    with open(spec["list"], encoding="utf-8") as handle:
        paths = [line.strip() for line in handle if line.strip()]
    meter = Meter()
    meter.start()
    if spec["tool"] == "reference":
        with open(spec["out"], "w", encoding="utf-8") as out:
            asyncio.run(reference_loop(spec["urls"], paths, spec["concurrency"], out))
        meter.stop()
        report({**meter.figures(len(paths)), "endpoints": {}})
        return 0
    client = ClientOptions(
        endpoints=tuple(spec["urls"]),
        model=MODEL,
        version=VERSION,
        api_key=API_KEY,
        concurrency=spec["concurrency"],
        retry=RetryPolicy(attempts=8, initial=0.05, max_wait=1.0),
    )
    options = PipelineOptions(client=client, dedup=False)
    stats = asyncio.run(run([spec["list"]], options, outputs=[spec["out"]], overwrite=True))
    meter.stop()
    report({**meter.figures(stats.total), "endpoints": stats.endpoints})
    return 0


async def reference_loop(urls: list[str], paths: list[str], concurrency: int, out: Any) -> None:
    """The plain aiohttp loop, requests dealt round-robin over the servers; one line a row."""
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for number, path in enumerate(paths):
        queue.put_nowait((number, path))
    targets = [f"{url}/{MODEL}/{VERSION}?api_key={API_KEY}&confidence=0.01" for url in urls]
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                number, path = queue.get_nowait()
                with open(path, "rb") as handle:  # noqa: ASYNC230 (a few KB, local)
                    body = base64.b64encode(handle.read())
                target = targets[number % len(targets)]
                async with session.post(target, data=body, headers=headers) as response:
                    answer = json.loads(await response.read())
                    status = response.status
                out.write(json.dumps({"path": path, "status": status, "top": answer.get("top")}))
                out.write("\n")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def print_results(clients: list[str], runs: dict[str, list[dict[str, Any]]], servers: int) -> None:
    rows = []
    one = Samples(runs["batchclassify, 1 server"]).median("images_per_s")
    for label in clients:
        samples = Samples(runs[label])
        rate = samples.median("images_per_s")
        last = runs[label][-1]
        rows.append(
            [
                label,
                f"{rate:.1f}",
                f"{rate / one:.2f}x",
                "/".join(str(n) for n in last["served"]),
                f"{last['rows']}/{last['duplicates']}/{last['missing']}/{last['not_ok']}",
                " ".join(f"{v:.0f}" for v in samples.values("images_per_s")),
            ]
        )
    header = [
        "client",
        "images/s",
        "vs 1 server",
        "200s per server (last run)",
        "rows/dup/missing/not ok",
        "runs (images/s)",
    ]
    print(table(header, rows))
    print(
        f"\ntarget (issue 14, goal 5): {servers} servers >= {TARGET:g}x one (batchclassify); the "
        "killed run must show 0 duplicates, 0 missing, 0 not ok (-1: the killed server)"
    )


if __name__ == "__main__":
    sys.exit(main())

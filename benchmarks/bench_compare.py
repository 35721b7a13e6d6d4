"""batchclassify against the official clients, ``roboflow`` and ``inference-sdk``, side by side.

    python benchmarks/bench_compare.py [--concurrency 8] [--images 80] [--tail-images 48]
                                       [--repeat 3] [--quick]

The same images, the same emulator, in the same run, under two latency profiles: (a) a
constant ``100 ms`` and (b) the hosted service's long tail (log-normal, p50 180 ms, p99 5.6 s).
Each tool runs in its own process, one after the other, after ``POST /_emulator/reset``, which
reseeds the emulator's latency: within one repeat every tool draws the very same latencies
(repeat ``k`` uses ``--seed k``), so the ratios are paired. The order of the tools rotates
between repeats. Tools and how they are used:

- batchclassify: ``batchclassify.run`` over a ``.txt`` list, ``concurrency=C`` (a null-ish sink
  that keeps the answers for checking);
- roboflow: ``ClassificationModel(api_key, id="ws/demo/1", local=URL + "/")`` and
  ``.predict(path).json()`` in a loop: sequential, its only mode (it re-encodes every image as
  JPEG q90 first);
- inference-sdk: ``InferenceHTTPClient(api_url=URL, api_key=...)``, ``select_api_v0()``,
  ``configure(InferenceConfiguration(max_concurrent_requests=C))`` and one
  ``infer([paths...], model_id="demo/1")``: it base64-loads every image first, then sends them
  in lock-step chunks of C (a fresh thread pool per chunk; each chunk waits for its slowest
  request). In v0 mode every request carries one image (``max_batch_size`` is not used).

Every answer of every tool is checked against :func:`batchclassify.emulator.predict` of the
bytes that tool sends, and the emulator's stats must show exactly one ``200`` per image on the
``/demo/1`` route (it is started with ``--models demo/1``, so any other path would be a 404).
Printed: images/s (median of the repeats, and each repeat), the share of the ideal for the tool's
mode (computed from the emulator's actual latency draws: a client with no overhead sending one
request at a time, C at a time as workers free up, or in lock-step chunks of C), client CPU ms
per image, client peak RSS, and the ratios batchclassify/roboflow and
batchclassify/inference-sdk (median of the per-repeat ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchutil import (
    API_KEY,
    MODEL,
    VERSION,
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
from PIL import Image

from batchclassify import run
from batchclassify.emulator import predict, sample_latency
from batchclassify.model import Result

TOOLS = ("batchclassify", "roboflow", "inference-sdk")
#: scenario -> emulator (median latency ms, p99 latency ms or None for constant)
SCENARIOS: dict[str, tuple[float, float | None]] = {
    "constant 100 ms": (100.0, None),
    "long tail p50 180 ms / p99 5.6 s": (180.0, 5600.0),
}
#: the bound each tool is held to: what a client without overhead achieves in that tool's mode
MODE = {"batchclassify": "C workers", "roboflow": "sequential", "inference-sdk": "lock-step"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=8, help="C for the concurrent tools")
    parser.add_argument("--images", type=int, default=80, help="images, constant latency")
    parser.add_argument("--tail-images", type=int, default=48, help="images, long-tail latency")
    parser.add_argument("--repeat", type=int, default=3, help="repeats (default 3)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.quick:
        args.images, args.tail_images, args.repeat = 30, 12, 1
    tools = [tool for tool in args.tools.split(",") if tool]
    started = time.perf_counter()
    print(machine())
    counts = dict(zip(SCENARIOS, (args.images, args.tail_images), strict=True))
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    ideals: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        images = make_images(Path(tmp) / "images", max(counts.values()))
        print(
            f"{len(images)} distinct 320×240 JPEGs; C = {args.concurrency} for batchclassify "
            f"and inference-sdk; {args.repeat} repeats, tools in rotating order\n"
        )
        for rep in range(args.repeat):
            order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
            for scenario, (median, p99) in SCENARIOS.items():
                count = counts[scenario]
                listing = write_list(Path(tmp) / f"{count}.txt", images[:count], count)
                ideals.setdefault(scenario, []).append(
                    ideal_rates(latency_draws(rep, median, p99, count), args.concurrency)
                )
                options = ["--latency-ms", f"{median:g}"]
                if p99 is not None:
                    options += ["--latency-p99-ms", f"{p99:g}"]
                with Emulator(*options, "--seed", str(rep)) as emulator:
                    for tool in order:
                        if tool in failures:
                            continue
                        try:
                            figures = measure(emulator, tool, listing, count, args.concurrency)
                        except RuntimeError as exc:
                            failures[tool] = str(exc)
                            print(f"{tool} FAILED, left out: {exc}", file=sys.stderr)
                            continue
                        runs.setdefault((scenario, tool), []).append(figures)
    for tool, why in failures.items():
        print(f"{tool}: FAILED: {why}")
    print_results(runs, ideals, counts, tools)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


def measure(
    emulator: Emulator, tool: str, listing: Path, count: int, concurrency: int
) -> dict[str, Any]:
    """One tool over the list, in its own process; its answers and the server's view checked."""
    emulator.reset()
    spec = {"tool": tool, "list": str(listing), "url": emulator.url, "concurrency": concurrency}
    figures = run_child(__file__, spec)
    stats = emulator.stats()
    if stats["requests"] != count or stats["by_status"].get("200") != count:
        raise RuntimeError(f"{tool}: expected {count} answers, the emulator saw {stats}")
    answers: dict[str, dict[str, float]] = figures.pop("answers")
    wrong = [path for path, got in answers.items() if got != expected(tool, Path(path))]
    if len(answers) != count or wrong:
        raise RuntimeError(f"{tool}: {len(answers)} answers, {len(wrong)} wrong, e.g. {wrong[:1]}")
    return figures


def latency_draws(seed: int, median: float, p99: float | None, count: int) -> list[float]:
    """The latencies (seconds) the emulator draws, in arrival order, for ``count`` requests
    after a reset with ``--seed seed`` (its latency stream is ``Random(f"{seed}:latency")``)."""
    rng = random.Random()
    rng.seed(f"{seed}:latency")
    return [sample_latency(rng, median, p99) for _ in range(count)]


def ideal_rates(draws: list[float], concurrency: int) -> dict[str, float]:
    """images/s of a client with no overhead at all, given the server's latency draws:
    one request at a time; C workers each taking the next image as soon as it is free; and
    lock-step chunks of C, each waiting for its slowest request."""
    free = [0.0] * concurrency  # when each worker is next free (a heap)
    for draw in draws:
        heapq.heappush(free, heapq.heappop(free) + draw)
    chunks = [draws[i : i + concurrency] for i in range(0, len(draws), concurrency)]
    count = len(draws)
    return {
        "sequential": count / sum(draws),
        "C workers": count / max(free),
        "lock-step": count / sum(max(chunk) for chunk in chunks),
    }


def expected(tool: str, path: Path) -> dict[str, float]:
    """What the emulator answers for the bytes ``tool`` uploads for ``path``."""
    data = path.read_bytes()
    if tool == "roboflow":  # it sends the image as RGB re-encoded at JPEG quality 90
        with Image.open(path) as image:
            out = io.BytesIO()
            image.convert("RGB").save(out, quality=90, format="JPEG")
        data = out.getvalue()
    return as_map(predict(data)["predictions"])


def as_map(predictions: list[dict[str, Any]]) -> dict[str, float]:
    return {p["class"]: p["confidence"] for p in predictions}


# --- the measured clients (each in its own process) --------------------------------------------


def child(spec: dict[str, Any]) -> int:
    paths = Path(spec["list"]).read_text(encoding="utf-8").split()
    # Import the tool before the clock starts: a one-off cost (numpy, OpenCV for inference-sdk).
    if spec["tool"] == "roboflow":
        import roboflow.models.classification  # type: ignore[import-untyped]  # noqa: F401
    elif spec["tool"] == "inference-sdk":
        import inference_sdk  # type: ignore[import-untyped]  # noqa: F401
    meter = Meter()
    meter.start()
    if spec["tool"] == "batchclassify":
        answers = with_batchclassify(spec)
    elif spec["tool"] == "roboflow":
        answers = with_roboflow(spec["url"], paths)
    else:
        answers = with_inference_sdk(spec["url"], paths, spec["concurrency"])
    meter.stop()
    figures = meter.figures(len(answers))
    report({**figures, "concurrency": spec["concurrency"], "answers": answers})
    return 0


class _Keep:
    """A sink that keeps each result's predictions (for checking; a few hundred entries)."""

    def __init__(self) -> None:
        self.answers: dict[str, dict[str, float]] = {}

    async def write(self, result: Result) -> None:
        if result.ok:
            self.answers[result.source] = result.predictions

    async def flush(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def with_batchclassify(spec: dict[str, Any]) -> dict[str, dict[str, float]]:
    options = pipeline_options(spec["url"], spec["concurrency"], dedup=True)
    sink = _Keep()
    asyncio.run(run([spec["list"]], options, sinks=[sink]))
    return sink.answers


def with_roboflow(url: str, paths: list[str]) -> dict[str, dict[str, float]]:
    from roboflow.models.classification import (
        ClassificationModel,
    )

    # id is "workspace/project/version"; local is the base URL *with* a trailing slash.
    model = ClassificationModel(api_key=API_KEY, id=f"ws/{MODEL}/{VERSION}", local=f"{url}/")
    answers = {}
    for path in paths:
        (answer,) = model.predict(path).json()["predictions"]
        answers[path] = as_map(answer["predictions"])
    return answers


def with_inference_sdk(url: str, paths: list[str], concurrency: int) -> dict[str, dict[str, float]]:
    from inference_sdk import (
        InferenceConfiguration,
        InferenceHTTPClient,
    )

    client = InferenceHTTPClient(api_url=url, api_key=API_KEY)
    client.select_api_v0()  # the hosted /{project}/{version} route; v1 is the newer server API
    client.configure(
        InferenceConfiguration(
            max_concurrent_requests=concurrency,
            max_batch_size=1,  # v0 sends one image per request whatever this says
            api_key_transport="legacy",  # ?api_key=, as the hosted API documents
        )
    )
    results = client.infer(paths, model_id=f"{MODEL}/{VERSION}")
    return {path: as_map(body["predictions"]) for path, body in zip(paths, results, strict=True)}


# --- output --------------------------------------------------------------------------------------


def runs_concurrency(runs: dict[tuple[str, str], list[dict[str, Any]]]) -> int:
    return int(next(r["concurrency"] for samples in runs.values() for r in samples))


def print_results(
    runs: dict[tuple[str, str], list[dict[str, Any]]],
    ideals: dict[str, list[dict[str, float]]],
    counts: dict[str, int],
    tools: list[str],
) -> None:
    for scenario, count in counts.items():
        bounds = {m: statistics.median(i[m] for i in ideals[scenario]) for m in MODE.values()}
        print(f"\n{scenario}, {count} images:")
        median, p99 = SCENARIOS[scenario]
        concurrency = runs_concurrency(runs)
        long_run = ideal_rates(latency_draws(-1, median, p99, 200_000), concurrency)
        print(
            "  ideal images/s for these latency draws (no client overhead; median of repeats): "
            + ", ".join(f"{mode} {rate:.1f}" for mode, rate in bounds.items())
        )
        print(
            "  ideal images/s in the long run (200k draws): "
            + ", ".join(f"{mode} {long_run[mode]:.1f}" for mode in MODE.values())
            + f"; so C workers / sequential {long_run['C workers'] / long_run['sequential']:.1f}×"
            + f", C workers / lock-step {long_run['C workers'] / long_run['lock-step']:.1f}×"
        )
        rows = []
        for tool in tools:
            samples = runs.get((scenario, tool))
            if not samples:
                rows.append([tool, "failed", "", "", "", "", "", ""])
                continue
            rates = [run["images_per_s"] for run in samples]
            paired = zip(rates, ideals[scenario], strict=True)
            of_ideal = [rate / ideal[MODE[tool]] for rate, ideal in paired]
            rows.append(
                [
                    tool,
                    f"{statistics.median(rates):.1f}",
                    MODE[tool],
                    f"{statistics.median(of_ideal):.0%}",
                    f"{statistics.median(r['wall_s'] for r in samples):.1f}",
                    f"{statistics.median(r['cpu_ms_per_image'] for r in samples):.2f}",
                    f"{statistics.median(r['peak_rss_mb'] for r in samples):.0f}",
                    " ".join(f"{rate:.1f}" for rate in rates),
                ]
            )
        header = [
            "tool",
            "images/s",
            "mode",
            "of ideal",
            "wall s",
            "CPU ms/img",
            "RSS MB",
            "runs (images/s)",
        ]
        print(table(header, rows))
        ours = runs.get((scenario, "batchclassify"), [])
        for other in tools[1:]:
            theirs = runs.get((scenario, other), [])
            if ours and len(theirs) == len(ours):
                pairs = zip(ours, theirs, strict=True)
                ratios = [a["images_per_s"] / b["images_per_s"] for a, b in pairs]
                print(
                    f"batchclassify / {other}: {statistics.median(ratios):.1f}× "
                    f"(per repeat: {' '.join(f'{r:.1f}' for r in ratios)})"
                )


if __name__ == "__main__":
    sys.exit(main())

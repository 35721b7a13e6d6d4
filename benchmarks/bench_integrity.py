"""Does every output hold every row, run after run? The end-of-run flush race, hunted.

    python benchmarks/bench_integrity.py [--runs 20] [--images 2000] [--concurrency 16] [--quick]

The emulator runs in its own process; each run is the real command (``batchclassify run``) in a
fresh process with the state on and two outputs (JSONL and CSV), like a user's job. After each
run: the exit code, the rows of each output against the state's, and every source exactly once.
The race this guards against lost the last batch of rows at the end of a run (913 of 20 291 once)
while the state had them all: one lost row in any run fails the benchmark (exit 1). Also
printed: the median images/s of a run, process start included.
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchutil import API_KEY, MODEL, VERSION, Emulator, machine, make_images


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs in a row (default 20)")
    parser.add_argument("--images", type=int, default=2000, help="images per run")
    parser.add_argument("--concurrency", type=int, default=16, help="client concurrency")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.images = 3, 500
    print(f"machine: {machine()}")
    failures = 0
    rates = []
    with tempfile.TemporaryDirectory() as folder, Emulator() as emulator:
        root = Path(folder)
        make_images(root / "images", args.images, size=(32, 24))
        for number in range(args.runs):
            out, table = root / f"r{number}.jsonl", root / f"r{number}.csv"
            command = [
                sys.executable, "-m", "batchclassify", "run", str(root / "images"),
                "--model", f"{MODEL}/{VERSION}", "--endpoint", emulator.url,
                "--api-key", API_KEY, "-c", str(args.concurrency),
                "--out", str(out), "--out", str(table), "--no-progress",
            ]  # fmt: skip
            started = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            rates.append(args.images / (time.perf_counter() - started))
            problems = _check(out, table, args.images, completed.returncode)
            failures += bool(problems)
            print(f"run {number + 1:2d}: {'ok' if not problems else '; '.join(problems)}")
            for path in (out, table, Path(f"{out}.state")):
                path.unlink()
    print(
        f"{args.runs} runs of {args.images} images, two outputs and the state: "
        f"{args.runs - failures} complete, {failures} with a lost or extra row; "
        f"median {statistics.median(rates):.0f} images/s per run (process start included)"
    )
    return 1 if failures else 0


def _check(out: Path, table: Path, images: int, code: int) -> list[str]:
    problems = [] if code == 0 else [f"exit code {code}"]
    with out.open(encoding="utf-8") as handle:
        jsonl = [json.loads(line)["source"] for line in handle]
    with table.open(encoding="utf-8", newline="") as handle:
        rows = [row["source"] for row in csv.DictReader(handle)]
    state = sqlite3.connect(f"{out}.state")
    stored = state.execute("SELECT count(*) FROM results").fetchone()[0]
    state.close()
    for name, sources in (("jsonl", jsonl), ("csv", rows)):
        if len(sources) != images or len(set(sources)) != images:
            problems.append(f"{name}: {len(sources)} rows ({len(set(sources))} distinct)")
    if stored != images:
        problems.append(f"state: {stored} rows")
    return problems


if __name__ == "__main__":
    sys.exit(main())

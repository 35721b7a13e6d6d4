"""Whole-process CPU and throughput of the batchclassify CLI, beside a minimal reference loop.

    python benchmarks/bench_cpu.py [--concurrency 64,256,512] [--latency-ms 100] [--rounds 40]
                                   [--repeat 3] [--variant 'NAME=ARGS' ...] [--quick]
    python benchmarks/bench_cpu.py --profile [C] [--profile-args 'ARGS'] [--profile-out FILE]
    python benchmarks/bench_cpu.py --startup

The table of issue 14, reproducible. The emulator runs in its own process with a constant
``--latency-ms`` (no tail). Per concurrency C, ``rounds x C`` tiny distinct JPEGs (32 px, about
1 KB; all different, so dedup never answers one without a request) are classified by, in turn:

- **batchclassify (defaults)**: the real command line in a fresh process,
  ``python -m batchclassify run LIST.txt --model demo/1 --endpoint URL --out out.jsonl
  --concurrency C``; everything else is the default: the SQLite state beside the output, dedup
  and the JSONL output on, the key from ``ROBOFLOW_API_KEY``; for a loopback endpoint that means
  multipart uploads and the key in both the header and the query;
- **reference**: ``reference.py`` (C aiohttp workers on a queue: read, base64, POST, json, a
  line) in a fresh process, same list, same C: the practical ceiling;
- each ``--variant NAME=ARGS``: batchclassify with ARGS added (``--variant 'p2=--processes 2'``,
  ``--variant 'b64=--upload base64'``). A variant the CLI refuses fails alone, stderr shown.

The clients alternate within each of ``--repeat`` repeats (the order rotates per repeat) and
the table shows medians; "x ref" is the median of per-repeat ratios to the reference's
images/s. Every run's output is checked: one row per input, every input once, all ok (a run
that lost rows measures nothing, and fails the benchmark).

How the whole process is measured:

- wall: from just before the fork to the reaped exit, so interpreter start and imports count;
- CPU: the delta of ``getrusage(RUSAGE_CHILDREN)`` (user + system) around the run. The kernel
  adds a child's CPU, all its threads and every descendant it waited for, when the child is
  reaped, so the delta is exactly this client's (no other child of ours is reaped meanwhile:
  the emulator is reaped only at the end). ``/proc/PID/stat`` would have to be read at the
  instant of exit, and loses what the child's own children used;
- peak RSS: ``VmHWM`` of the client's main process, written by an ``atexit`` hook of a
  three-line ``python -c`` launcher that then runs the module (``runpy``, as ``-m`` does) or
  the script. Not ``ru_maxrss``: after a vfork+exec it starts at the parent's high-water mark
  (see ``benchutil.peak_rss_mb``). With ``--processes N``, other processes are not included;
- "cores": the client's CPU seconds per wall second; "loop": the same for its main thread
  alone (``time.thread_time()`` in the launcher's hook), the event loop; "runq": the share of
  the wall time that thread was ready to run but waited for a core (``/proc/thread-self/
  schedstat``: other processes, the emulator, the client's own threads). loop + runq near 1.0
  is a CPU-bound client (on a busy machine, with less than a core); well under 1.0 with
  images/s under C/L, the client waits on something else;
- the emulator's CPU ms per request: its ``/proc`` CPU delta over the requests it counted.

``--profile [C]`` runs batchclassify (defaults, plus ``--profile-args``) once under cProfile
(``python -m cProfile -m batchclassify run ...``), prints the self time per package group
(aiohttp, tenacity, sqlite3, json, asyncio, batchclassify, idle in epoll, ...), batchclassify's
self time per module, and the top 25 functions by cumulative and by self time. cProfile only
sees the main thread: the producer thread and the prepare thread pool are not in it; it also
slows the run down (the images/s it prints are not the client's). ``--startup`` prints the
CLI's start time (median of 5 runs of ``--version`` and ``run --help``, against ``python -c
pass`` and ``import aiohttp``) and the slowest imports from ``python -X importtime``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pstats
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchutil import API_KEY, MODEL, VERSION, Emulator, machine, make_images, table, write_list

REFERENCE = str(Path(__file__).resolve().with_name("reference.py"))
#: images per point = rounds x C: each worker sends about this many requests
ROUNDS = 40
IMAGE_SIZE = (32, 32)
#: run ``sys.argv[2]`` (a module, or a .py script), then write its VmHWM (KiB), the main
#: thread's CPU seconds and its run-queue wait (ns) to ``sys.argv[1]`` (atexit runs in the main
#: thread)
_LAUNCHER = """\
import atexit, os, runpy, sys, time
def _peak(path=sys.argv[1]):
    try:
        with open("/proc/thread-self/schedstat") as s:
            waited = s.read().split()[1]
    except (OSError, IndexError):
        waited = "0"
    with open("/proc/self/status") as s, open(path, "w") as f:
        peak = next((l.split()[1] for l in s if l.startswith("VmHWM:")), "0")
        f.write(f"{peak} {time.thread_time()} {waited}")
atexit.register(_peak)
target, sys.argv = sys.argv[2], sys.argv[2:]
if target.endswith(".py"):
    sys.path.insert(0, os.path.dirname(target))
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


@dataclass
class Run:
    """One measured client process."""

    client: str
    images: int
    wall: float = 0.0
    cpu: float = 0.0
    #: CPU of the main thread alone (the event loop's, for both clients)
    loop_cpu: float = 0.0
    #: how long the main thread was ready to run but waited for a core
    loop_waited: float = 0.0
    rss_mb: float = 0.0
    requests: int = 0
    emulator_cpu: float = 0.0
    error: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall if self.wall else 0.0


@dataclass
class Point:
    """Every run at one concurrency, by client."""

    concurrency: int
    runs: dict[str, list[Run]] = field(default_factory=lambda: defaultdict(list))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="64,256,512", help="C values, comma-separated")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="emulator latency")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="images per point = R x C")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client and point")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also run batchclassify with these extra arguments (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument(
        "--profile", type=int, nargs="?", const=256, metavar="C", help="cProfile one run at C"
    )
    parser.add_argument("--profile-args", default="", help="extra batchclassify arguments")
    parser.add_argument("--profile-out", help="keep the cProfile data in this file")
    parser.add_argument("--startup", action="store_true", help="time the CLI's start")
    args = parser.parse_args(argv)
    print(machine())
    if args.startup:
        return startup()
    variants = {}
    for spec in args.variant:
        name, sep, extra = spec.partition("=")
        if not sep or not name:
            parser.error(f"--variant takes NAME=ARGS, not {spec!r}")
        variants[name] = shlex.split(extra)
    concurrencies = [int(part) for part in args.concurrency.split(",")]
    if args.quick:
        concurrencies, args.rounds, args.repeat = [64, 256], 8, 1
    if args.profile is not None:
        concurrencies = [args.profile]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        root = Path(tmp)
        lists = _inputs(root, concurrencies, args.rounds)
        with Emulator("--latency-ms", f"{args.latency_ms:g}") as emulator:
            if args.profile is not None:
                extra = shlex.split(args.profile_args)
                return profile(emulator, root, lists[args.profile], args.profile, extra, args)
            points = []
            for concurrency in concurrencies:
                point = Point(concurrency)
                clients = ["batchclassify", "reference", *variants]
                for repeat in range(args.repeat):
                    shift = repeat % len(clients)
                    for client in clients[shift:] + clients[:shift]:
                        run = measure(
                            emulator,
                            root / f"run-{concurrency}-{repeat}-{client}",
                            client,
                            lists[concurrency],
                            concurrency,
                            variants.get(client, []),
                        )
                        point.runs[client].append(run)
                        _progress(concurrency, run)
                points.append(point)
    print(
        f"\nemulator latency {args.latency_ms:g} ms constant, {IMAGE_SIZE[0]}-px distinct "
        f"JPEGs, {args.rounds} x C images per point, medians of {args.repeat}; "
        f"{time.perf_counter() - started:.0f} s in all; {machine()}"
    )
    print(_table(points, args.latency_ms / 1000))
    failed = [run for point in points for runs in point.runs.values() for run in runs if run.error]
    shown = set()
    for run in failed:
        if (run.client, run.error) not in shown:
            shown.add((run.client, run.error))
            print(f"\n{run.client} failed: {run.error}")
    return 1 if failed else 0


def _inputs(root: Path, concurrencies: Sequence[int], rounds: int) -> dict[int, Path]:
    """One list per C of ``rounds x C`` distinct images (a prefix of one image set)."""
    count = rounds * max(concurrencies)
    images = make_images(root / "images", count, size=IMAGE_SIZE)
    digests = {hashlib.sha256(path.read_bytes()).digest() for path in images}
    if len(digests) != len(images):
        raise SystemExit(f"only {len(digests)} of {len(images)} images are distinct")
    return {
        c: write_list(root / f"list-{c}.txt", [str(p) for p in images], rounds * c)
        for c in concurrencies
    }


def _environment() -> dict[str, str]:
    """Ours, with the key where the CLI looks first, and no BATCHCLASSIFY_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHCLASSIFY_")}
    env["ROBOFLOW_API_KEY"] = API_KEY
    return env


def _batchclassify(listing: Path, url: str, out: Path, concurrency: int) -> list[str]:
    return [
        "batchclassify",
        "run",
        str(listing),
        "--model",
        f"{MODEL}/{VERSION}",
        "--endpoint",
        url,
        "--out",
        str(out),
        "--concurrency",
        str(concurrency),
    ]


def measure(
    emulator: Emulator,
    folder: Path,
    client: str,
    listing: Path,
    concurrency: int,
    extra: Sequence[str],
) -> Run:
    """Run one client in a fresh process in ``folder`` and check its output."""
    folder.mkdir()
    out, peak = folder / "out.jsonl", folder / "vmhwm"
    if client == "reference":
        target = [REFERENCE, "--url", emulator.url, "--list", str(listing)]
        target += ["--concurrency", str(concurrency), "--out", str(out), *extra]
    else:
        target = [*_batchclassify(listing, emulator.url, out, concurrency), *extra]
    command = [sys.executable, "-c", _LAUNCHER, str(peak), *target]
    inputs = listing.read_text(encoding="utf-8").split()
    run = Run(client, len(inputs))
    emulator.reset()
    emulator_cpu = emulator.cpu_seconds()
    with (folder / "stdout").open("wb") as stdout, (folder / "stderr").open("wb") as stderr:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        completed = subprocess.run(
            command, stdout=stdout, stderr=stderr, cwd=folder, env=_environment(), timeout=900
        )
        run.wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run.emulator_cpu = emulator.cpu_seconds() - emulator_cpu
    run.requests = int(emulator.stats()["requests"])
    if peak.exists() and peak.read_text().strip():
        kib, loop_cpu, waited = peak.read_text().split()
        run.rss_mb, run.loop_cpu = int(kib) / 1024, float(loop_cpu)
        run.loop_waited = int(waited) / 1e9
    if completed.returncode != 0:
        tail = (folder / "stderr").read_text(errors="replace").strip().splitlines()[-8:]
        run.error = f"exit status {completed.returncode}:\n" + "\n".join(tail)
    else:
        run.error = _check_rows(out, inputs, client == "reference")
    return run


def _check_rows(out: Path, inputs: Sequence[str], reference: bool) -> str:
    """Why the output is not one ok row per input, or ``""``."""
    if not out.exists():
        return f"no output file {out}"
    field, ok = ("path", 200) if reference else ("source", "ok")
    seen: set[str] = set()
    bad = 0
    lines = 0
    with out.open(encoding="utf-8") as handle:
        for line in handle:
            lines += 1
            row = json.loads(line)
            seen.add(row[field])
            bad += row["status"] != ok
    expected = set(inputs)
    problems = []
    if lines != len(inputs):
        problems.append(f"{lines} rows for {len(inputs)} inputs")
    if seen != expected:
        problems.append(f"{len(expected - seen)} inputs missing, {len(seen - expected)} unknown")
    if bad:
        problems.append(f"{bad} rows not {ok}")
    return "; ".join(problems)


def _progress(concurrency: int, run: Run) -> None:
    if run.error:
        print(f"  C={concurrency:<4} {run.client:<14} FAILED", flush=True)
        return
    print(
        f"  C={concurrency:<4} {run.client:<14} {run.images_per_s:7.0f} images/s "
        f"{1000 * run.cpu / run.images:5.2f} CPU ms/img  {run.rss_mb:5.0f} MB",
        flush=True,
    )


def _table(points: Sequence[Point], latency: float) -> str:
    header = ["C, client", "images/s", "% of C/L", "CPU ms/img", "cores", "loop", "runq"]
    header += ["RSS MB"]
    header += ["emu ms/req", "req/img", "x ref"]
    rows = []
    for point in points:
        bound = point.concurrency / latency
        reference = point.runs["reference"]
        for client, runs in point.runs.items():
            good = [run for run in runs if not run.error]
            name = f"{point.concurrency}, {client}"
            if not good:
                rows.append([name, "failed", *[""] * (len(header) - 2)])
                continue
            ratios = [
                run.images_per_s / ref.images_per_s
                for run, ref in zip(runs, reference, strict=True)
                if not run.error and not ref.error and ref.images_per_s
            ]
            speed = _median([run.images_per_s for run in good])

            def med(values: list[float], digits: int) -> str:
                return f"{_median(values):.{digits}f}"

            rows.append(
                [
                    name + ("" if len(good) == len(runs) else f" ({len(good)}/{len(runs)} ok)"),
                    f"{speed:.0f}",
                    f"{100 * speed / bound:.0f}%",
                    med([1000 * run.cpu / run.images for run in good], 2),
                    med([run.cpu / run.wall for run in good], 2),
                    med([run.loop_cpu / run.wall for run in good], 2),
                    med([run.loop_waited / run.wall for run in good], 2),
                    med([run.rss_mb for run in good], 0),
                    med([1000 * run.emulator_cpu / max(run.requests, 1) for run in good], 3),
                    med([run.requests / run.images for run in good], 2),
                    f"{_median(ratios):.2f}" if ratios else "",
                ]
            )
    return table(header, rows)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


# --- --profile -------------------------------------------------------------------------------

#: (group, what to look for in a file path or a builtin's name), first match wins
_GROUPS = [
    ("idle (epoll wait)", ("select.epoll",)),
    ("batchclassify", ("/batchclassify/",)),
    ("aiohttp", ("aiohttp",)),
    ("yarl/multidict/propcache", ("yarl", "multidict", "propcache")),
    ("tenacity", ("tenacity",)),
    ("sqlite3", ("sqlite3",)),
    ("json", ("json",)),
    # Context.run is the event loop calling back a ready handle
    ("asyncio", ("asyncio", "_contextvars")),
    ("dataclasses", ("dataclasses",)),
    ("threads/queues", ("threading", "concurrent/futures", "queue")),
    ("ssl/socket/selectors", ("socket", "selectors", "ssl")),
    ("hashing/base64", ("hashlib", "binascii", "base64", "blake2", "sha")),
    ("PIL", ("PIL",)),
    ("imports", ("<frozen importlib", "importlib")),
]

_Key = tuple[str, int, str]


def _group(key: _Key) -> str:
    filename, _, name = key
    text = name if filename == "~" else filename
    for group, needles in _GROUPS:
        if any(needle in text for needle in needles):
            return group
    return "other"


def _where(key: _Key) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    for marker in ("site-packages/", "/batchclassify/", f"python{sys.version_info[0]}."):
        if marker in filename:
            short = filename.split(marker, 1)[1]
            if marker == "/batchclassify/":
                short = "batchclassify/" + short
            elif marker.startswith("python"):
                short = short.split("/", 1)[-1]
            break
    else:
        short = filename
    return f"{short}:{line}({name})"


def profile(
    emulator: Emulator,
    root: Path,
    listing: Path,
    concurrency: int,
    extra: Sequence[str],
    args: argparse.Namespace,
) -> int:
    folder = root / "profile"
    folder.mkdir()
    data = Path(args.profile_out).resolve() if args.profile_out else folder / "run.prof"
    out = folder / "out.jsonl"
    command = [sys.executable, "-m", "cProfile", "-o", str(data), "-m"]
    command += [*_batchclassify(listing, emulator.url, out, concurrency), *extra]
    inputs = listing.read_text(encoding="utf-8").split()
    started = time.perf_counter()
    completed = subprocess.run(
        command, capture_output=True, text=True, cwd=folder, env=_environment(), timeout=900
    )
    wall = time.perf_counter() - started
    problem = _check_rows(out, inputs, reference=False)
    if completed.returncode != 0 or problem:
        print(f"the profiled run failed ({completed.returncode}): {problem}")
        print(completed.stderr[-3000:])
        return 1
    print(
        f"\nbatchclassify run at C={concurrency} {' '.join(extra)} under cProfile: "
        f"{len(inputs)} images in {wall:.1f} s ({len(inputs) / wall:.0f} images/s, slowed by "
        "the profiler); main thread only: the producer thread and the prepare pool are not seen"
    )
    stats = pstats.Stats(str(data))
    entries: dict[_Key, tuple[int, int, float, float]] = {
        key: value[:4]
        for key, value in stats.stats.items()  # type: ignore[attr-defined]
    }
    total = sum(tt for _, _, tt, _ in entries.values())
    by_group: dict[str, float] = defaultdict(float)
    by_module: dict[str, float] = defaultdict(float)
    for key, (_, _, tt, _) in entries.items():
        group = _group(key)
        by_group[group] += tt
        if group == "batchclassify":
            by_module[_where(key).split(":")[0]] += tt
    idle = by_group.get("idle (epoll wait)", 0.0)
    busy = total - idle
    rows = [
        [group, f"{seconds:.2f}", f"{100 * seconds / total:.1f}%",
         "" if group.startswith("idle") else f"{100 * seconds / busy:.1f}%"]
        for group, seconds in sorted(by_group.items(), key=lambda item: -item[1])
    ]  # fmt: skip
    print(f"\nself time by group (total {total:.2f} s, of which busy {busy:.2f} s):")
    print(table(["group", "self s", "% of all", "% of busy"], rows))
    other = sorted((i for i in entries.items() if _group(i[0]) == "other"), key=lambda i: -i[1][2])
    print("\n'other', its largest: " + "; ".join(
        f"{_where(key)} {tt:.3f} s" for key, (_, _, tt, _) in other[:6]
    ))  # fmt: skip
    rows = [
        [module, f"{seconds:.3f}", f"{100 * seconds / busy:.1f}%"]
        for module, seconds in sorted(by_module.items(), key=lambda item: -item[1])
        if seconds >= 0.001
    ]
    print("\nbatchclassify's self time by module:")
    print(table(["module", "self s", "% of busy"], rows))
    for title, index in (("cumulative", 3), ("self (total) time", 2)):
        top = sorted(entries.items(), key=lambda item: -item[1][index])[:25]
        rows = [
            [_where(key)[-90:], f"{nc}", f"{tt:.3f}", f"{ct:.3f}", _group(key)]
            for key, (_, nc, tt, ct) in top
        ]
        print(f"\ntop 25 by {title} (calls of a coroutine count each time it resumes):")
        print(table(["function", "calls", "self s", "cum s", "group"], rows))
    if args.profile_out:
        print(f"\nprofile data: {data}")
    return 0


# --- --startup -------------------------------------------------------------------------------


def startup(repeat: int = 5) -> int:
    """The CLI's start time against a bare interpreter, and its slowest imports."""
    python = sys.executable
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "python -c 'import aiohttp'": [python, "-c", "import aiohttp"],
        "batchclassify --version": [python, "-m", "batchclassify", "--version"],
        "batchclassify run --help": [python, "-m", "batchclassify", "run", "--help"],
    }
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, stdout=subprocess.DEVNULL, check=True, env=_environment())
            times[name].append(time.perf_counter() - started)
    bare = _median(times["python -c pass"])
    rows = [
        [name, f"{1000 * _median(values):.0f}", f"{1000 * (_median(values) - bare):.0f}"]
        for name, values in times.items()
    ]
    print(f"\nwall time to exit, median of {repeat}:")
    print(table(["command", "ms", "ms over bare python"], rows))
    completed = subprocess.run(
        [python, "-X", "importtime", "-m", "batchclassify", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=_environment(),
    )
    imports = []
    for line in completed.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        head, cumulative, name = line.split("|")
        own = head.split(":", 1)[1]
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        imports.append((name.strip(), depth, int(own) / 1000, int(cumulative) / 1000))
    top_level = sorted((i for i in imports if i[1] <= 1), key=lambda i: -i[3])[:15]
    print(
        "\n`python -X importtime -m batchclassify run --help`: imports at the top two levels "
        "(what the package's __init__ and the CLI pull in) by cumulative time:"
    )
    print(table(["module", "cum ms"], [[n, f"{c:.1f}"] for n, _, _, c in top_level]))
    own_top = sorted(imports, key=lambda i: -i[2])[:15]
    print("\nslowest modules by their own import time:")
    print(table(["module", "self ms"], [[n, f"{s:.1f}"] for n, _, s, _ in own_top]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared plumbing for the benchmarks (not a benchmark itself).

- :class:`Emulator`: ``python -m batchclassify emulate --port 0 ...`` in its own process, so its
  CPU is never charged to the client; its URL, ``/_emulator/stats``, ``/_emulator/reset`` and the
  CPU seconds it has used (from ``/proc``).
- :func:`run_child`: run one measured client in a fresh process (the benchmark script itself,
  with ``--child SPEC``), so its peak RSS (see :func:`peak_rss_mb`) and CPU time belong to that
  client alone; the child reports with :func:`report` and measures with :class:`Meter`.
- :func:`make_images`, :func:`write_list`: small real JPEGs and ``.txt`` lists of their paths.

Pillow and batchclassify are imported where they are used, not here: the reference client
(``reference.py``) imports this module for :func:`peak_rss_mb`, and a whole-process measurement
of it must not include batchclassify's import time or memory.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchclassify import PipelineOptions

#: every benchmark talks to this model; the emulator is started with ``--models demo/1``
MODEL = "demo"
VERSION = 1
API_KEY = "bench-key"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Emulator:
    """The emulator in a child process; ``with Emulator("--latency-ms", "100") as emu:``."""

    def __init__(self, *options: str) -> None:
        self.options = [*options]
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Emulator:
        from batchclassify.emulator import LISTENING_PREFIX

        command = [sys.executable, "-m", "batchclassify", "emulate", "--port", "0"]
        command += ["--models", f"{MODEL}/{VERSION}", *self.options]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self._process = process
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith(LISTENING_PREFIX):
            self.__exit__(None, None, None)
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.url = line[len(LISTENING_PREFIX) :].strip()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self._process
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        self._process = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU the emulator process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_emulator/stats", timeout=10) as response:
            data: dict[str, Any] = json.load(response)
        return data

    def reset(self) -> None:
        """Zero the stats, refill the rate limiter's bucket and reseed latency and faults."""
        request = urllib.request.Request(f"{self.url}/_emulator/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass


# --- measured children ----------------------------------------------------------------------


class Meter:
    """Wall and CPU time of this process (all threads) between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self.baseline_rss_mb = peak_rss_mb()
        self._wall0 = 0.0
        self._cpu0 = 0.0

    def start(self) -> None:
        self.baseline_rss_mb = peak_rss_mb()
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._wall0
        self.cpu = time.process_time() - self._cpu0

    def figures(self, images: int) -> dict[str, float]:
        return {
            "images": images,
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "images_per_s": images / self.wall if self.wall else 0.0,
            "cpu_ms_per_image": 1000 * self.cpu / images if images else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": self.baseline_rss_mb,
        }


def peak_rss_mb() -> float:
    """The high-water mark of this process's resident memory, in MiB.

    ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: Linux starts a process's
    ``ru_maxrss`` after ``execve`` at the high-water mark of the memory map it replaced, which
    for a child started with vfork (as ``subprocess`` does) is the *parent's*: an 11 MB child of
    a 500 MB parent reports 511 MB. ``VmHWM`` belongs to the new memory map alone.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(figures: dict[str, Any]) -> None:
    """The child's one line of output: its figures as JSON."""
    print(json.dumps(figures), flush=True)


def run_child(script: str, spec: dict[str, Any], *, timeout: float = 900) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh interpreter and return the JSON it reported."""
    completed = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {spec} failed ({completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- inputs ----------------------------------------------------------------------------------


def make_images(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> list[Path]:
    """``count`` distinct JPEGs (gradient, shapes, noise) of ``size``, about 15 KB each."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    gradient = Image.linear_gradient("L").resize(size)
    paths = []
    for seed in range(count):
        image = Image.merge(
            "RGB",
            (gradient.rotate(seed * 37 % 360), gradient, Image.effect_noise(size, 20 + seed % 40)),
        )
        draw = ImageDraw.Draw(image)
        for k in range(4):
            x, y = (seed * 53 + k * 97) % width, (seed * 31 + k * 61) % height
            colour = ((seed * 40 + k * 70) % 256, (seed * 90) % 256, (k * 50 + seed) % 256)
            draw.ellipse((x, y, x + width // 4, y + height // 4), fill=colour)
        path = folder / f"img-{seed:05d}.jpg"
        image.save(path, "JPEG", quality=85)
        paths.append(path)
    return paths


def write_list(path: Path, entries: Sequence[Path | str], count: int) -> Path:
    """A ``.txt`` list of ``count`` lines, cycling through ``entries`` (so one image may appear
    many times: pass ``dedup=False`` to classify every line)."""
    with path.open("w", encoding="utf-8") as handle:
        for n in range(count):
            handle.write(f"{entries[n % len(entries)]}\n")
    return path


# --- figures ---------------------------------------------------------------------------------


@dataclass
class Samples:
    """Repeated measurements of one configuration; ``median`` of any reported figure."""

    runs: list[dict[str, Any]]

    def median(self, key: str) -> float:
        return float(statistics.median(float(run[key]) for run in self.runs))

    def values(self, key: str) -> list[float]:
        return [float(run[key]) for run in self.runs]


def machine() -> str:
    """One line saying where the figures were measured."""
    model = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    version = sys.version.split()[0]
    return f"{os.cpu_count()} CPUs ({model}), Python {version}, load average {_load()}"


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain fixed-width table: right-aligned numbers, left-aligned first column."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text_rows)]) for i, h in enumerate(header)]
    lines = []
    for row in [list(header), *text_rows]:
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def pipeline_options(url: str, concurrency: int = 8, *, dedup: bool = False) -> PipelineOptions:
    """batchclassify's options for a measured client against the emulator at ``url``. Dedup is
    off by default: benchmarks reuse a few images, which dedup would answer without a request."""
    from batchclassify import ClientOptions, PipelineOptions

    client = ClientOptions(
        endpoint=url, model=MODEL, version=VERSION, api_key=API_KEY, concurrency=concurrency
    )
    return PipelineOptions(client=client, dedup=dedup)

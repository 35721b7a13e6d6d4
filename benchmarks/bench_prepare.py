"""How much faster is ``prepare_file(max_size=640)`` than the naive decode-convert-resize-encode?

    python benchmarks/bench_prepare.py [--count 4] [--megapixels 12] [--max-size 640] [--repeat 3]

Generates a few photo-like JPEGs (gradients plus noise, about 2 bits per pixel at quality 90, like
a phone photo; one in two is a portrait stored sideways with EXIF orientation 6), caches them in
the temp directory, then prints per-image wall and CPU milliseconds (median over repeats) for the
naive path and for ours, checks our output (size, orientation, borders, PSNR against a full-size
reference), and compares thread and process pools running ``prepare_file`` on this machine.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from PIL import Image, ImageChops, ImageOps, ImageStat

from batchclassify.prepare import PrepareOptions, default_workers, prepare_file

ORIENTATION = 0x0112
RED = (230, 20, 20)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=4, help="distinct images (default 4)")
    parser.add_argument("--megapixels", type=float, default=12.0, help="image size (default 12)")
    parser.add_argument("--max-size", type=int, default=640, help="longer side (default 640)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (default 3)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="pool size")
    parser.add_argument("--trials", type=int, default=7, help="pool comparison runs (default 7)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "batchclassify-bench",
        help="where the generated images are kept",
    )
    args = parser.parse_args(argv)
    options = PrepareOptions(max_size=args.max_size)

    started = time.perf_counter()
    paths = make_photos(args.cache, args.count, args.megapixels)
    mb = statistics.mean(p.stat().st_size for p in paths) / 1e6
    with Image.open(paths[0]) as first:
        size = first.size
    print(
        f"{len(paths)} JPEGs of {size[0]}×{size[1]} ({mb:.1f} MB each on average) in {args.cache}"
    )
    print(f"target: longer side {args.max_size} px, JPEG quality {options.jpeg_quality}\n")

    naive_wall, naive_cpu = timed(partial(naive, max_size=args.max_size), paths, args.repeat)
    ours_wall, ours_cpu = timed(partial(prepare_file, options=options), paths, args.repeat)
    print(f"{'path':<34}{'wall ms/image':>14}{'CPU ms/image':>14}")
    print(f"{'naive (convert, resize, save q90)':<34}{naive_wall:>14.1f}{naive_cpu:>14.1f}")
    print(f"{'prepare_file (draft + Lanczos)':<34}{ours_wall:>14.1f}{ours_cpu:>14.1f}")
    speedup = naive_wall / ours_wall
    print(f"speedup: {speedup:.1f}× ({'meets' if speedup >= 4 else 'MISSES'} the 4× target)\n")

    ok = check_quality(paths, options)
    print()
    compare_pools(paths, options, args.workers, tasks=6 * len(paths), trials=args.trials)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


def make_photos(cache: Path, count: int, megapixels: float) -> list[Path]:
    """``count`` photo-like JPEGs, made once; odd ones are portraits stored with orientation 6."""
    cache.mkdir(parents=True, exist_ok=True)
    width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    height = round(width * 3 / 4)
    paths = []
    for seed in range(count):
        path = cache / f"photo-{width}x{height}-{seed}.jpg"
        if not path.exists():
            portrait = seed % 2 == 1
            shown = photo((height, width) if portrait else (width, height), seed)
            exif = Image.Exif()
            if portrait:  # as a phone does: pixels stored landscape, EXIF says turn right
                exif[ORIENTATION] = 6
                shown = shown.transpose(Image.Transpose.ROTATE_90)
            shown.save(path.with_suffix(".tmp"), "JPEG", quality=90, exif=exif)
            path.with_suffix(".tmp").replace(path)
        paths.append(path)
    return paths


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour gradients, fine noise, and a red square marking the top-left corner."""
    small = (max(1, size[0] // 8), max(1, size[1] // 8))
    red = Image.linear_gradient("L").resize(small).rotate(seed * 37 % 360)
    green = Image.radial_gradient("L").resize(small)
    blue = Image.effect_noise(small, 40 + seed).point(lambda v: v // 2 + 64)
    base = Image.merge("RGB", (red, green, blue)).resize(size, Image.Resampling.BICUBIC)
    noise = Image.merge("RGB", [Image.effect_noise(size, 25) for _ in range(3)])
    image = Image.blend(base, noise, 0.2)
    side = min(size) // 5
    image.paste(RED, (0, 0, side, side))
    return image


def naive(path: Path, max_size: int) -> bytes:
    """What most clients do: decode everything, convert, resize, re-encode."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    scale = max_size / max(rgb.size)
    rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)))
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=90)
    return out.getvalue()


def timed(
    function: Callable[[Path], object], paths: list[Path], repeat: int
) -> tuple[float, float]:
    """Median wall and CPU milliseconds per image over ``repeat`` passes (after a warm-up)."""
    function(paths[0])
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            function(path)
        walls.append((time.perf_counter() - wall) * 1000 / len(paths))
        cpus.append((time.process_time() - cpu) * 1000 / len(paths))
    return statistics.median(walls), statistics.median(cpus)


def check_quality(paths: list[Path], options: PrepareOptions) -> bool:
    """Compare our output with a careful full-size reference: size, orientation, edges, PSNR."""
    assert options.max_size is not None
    ok = True
    for path in paths:
        prepared = prepare_file(path, options)
        with Image.open(io.BytesIO(prepared.data)) as decoded:
            ours = decoded.convert("RGB")
        with Image.open(path) as original:
            upright = ImageOps.exif_transpose(original).convert("RGB")
        scale = options.max_size / max(upright.size)
        expected = (round(upright.width * scale), round(upright.height * scale))
        reference = upright.resize(expected, Image.Resampling.LANCZOS)
        with Image.open(io.BytesIO(naive(path, options.max_size))) as decoded:
            naive_out = decoded.convert("RGB")
        with Image.open(io.BytesIO(encode(reference, options.jpeg_quality))) as decoded:
            best = decoded.convert("RGB")  # the best a JPEG of this quality can do
        problems = []
        if ours.size != expected:
            problems.append(f"size {ours.size} != {expected}")
        else:
            corner = ImageStat.Stat(ours.crop((0, 0, 20, 20))).mean
            if not (corner[0] > 150 and corner[1] < 100 and corner[2] < 100):
                problems.append(f"top-left corner is {[round(c) for c in corner]}, not red")
            w, h = ours.size
            edges = [(0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h)]
            worst = max(mean_difference(ours, reference, box) for box in edges)
            if worst > 12:
                problems.append(f"an edge differs from the reference by {worst:.0f} levels")
            if psnr(ours, reference) < psnr(best, reference) - 1:
                problems.append(f"PSNR {psnr(ours, reference):.1f} dB")
        naive_psnr = (
            f"{psnr(naive_out, reference):.1f}" if naive_out.size == expected else "sideways"
        )
        verdict = "; ".join(problems) or (
            f"ok: {ours.width}×{ours.height}, upright, edges clean; PSNR vs full-size Lanczos "
            f"{psnr(ours, reference):.1f} dB (naive {naive_psnr}, "
            f"ideal q{options.jpeg_quality} {psnr(best, reference):.1f})"
        )
        ok = ok and not problems
        print(f"quality {path.name}: {verdict}")
    return ok


def encode(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def mean_difference(a: Image.Image, b: Image.Image, box: tuple[int, int, int, int]) -> float:
    return statistics.mean(ImageStat.Stat(ImageChops.difference(a.crop(box), b.crop(box))).mean)


def psnr(a: Image.Image, b: Image.Image) -> float:
    squares = ImageStat.Stat(ImageChops.difference(a, b)).sum2
    mse = sum(squares) / (3 * a.width * a.height)
    return 10 * math.log10(255**2 / mse) if mse else math.inf


def compare_pools(
    paths: list[Path], options: PrepareOptions, workers: int, tasks: int, trials: int
) -> None:
    """Throughput of prepare_file in one thread, a thread pool and a process pool.

    The three are measured in alternation, ``trials`` times each, on pools started once, so a
    busy neighbour slows all of them alike; the best run shows what the machine can do.
    """
    print(
        f"pools: {workers} workers, {default_workers()} CPUs available, "
        f"{trials} alternating runs of {tasks} images (images/s: best, median)"
    )
    upright = [p for p in paths if not is_rotated(p)] or paths
    scenarios = [
        (f"max_size={options.max_size}", partial(prepare_file, options=options), paths),
        ("pass-through", partial(prepare_file, options=PrepareOptions()), upright),
    ]
    with ThreadPoolExecutor(workers) as threads, ProcessPoolExecutor(workers) as processes:
        for label, job, inputs in scenarios:
            work = [inputs[i % len(inputs)] for i in range(tasks)]
            runners: dict[str, Callable[[], Iterable[object]]] = {
                "one thread": partial(serial, job, work),
                f"ThreadPoolExecutor({workers})": partial(threads.map, job, work),
                f"ProcessPoolExecutor({workers})": partial(processes.map, job, work),
            }
            list(threads.map(job, inputs[:workers]))  # start and warm up the workers
            list(processes.map(job, inputs[:workers]))
            rates: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(trials):
                for name, run in runners.items():
                    started = time.perf_counter()
                    list(run())
                    rates[name].append(tasks / (time.perf_counter() - started))
            base = max(rates["one thread"])
            print(f"  {label}:")
            for name, values in rates.items():
                print(
                    f"    {name:<24} {max(values):7.1f} {statistics.median(values):7.1f}"
                    f"   (best: {max(values) / base:.2f}× one thread)"
                )


def serial(job: Callable[[Path], object], work: list[Path]) -> list[object]:
    return [job(path) for path in work]


def is_rotated(path: Path) -> bool:
    with Image.open(path) as image:
        return bool(image.getexif().get(ORIENTATION, 1) != 1)


if __name__ == "__main__":
    sys.exit(main())

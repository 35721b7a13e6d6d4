"""The official ``roboflow`` client against the emulator: a compatibility check and a baseline.

    python benchmarks/roboflow_compat.py [--count 50] [--latency-ms 180] [--latency-p99-ms 5600]

Starts the emulator in a background thread, classifies ``--count`` generated images one by one
with ``roboflow``'s ``ClassificationModel(..., local=URL)`` (what most users do today: sequential,
no timeout), checks every answer against :func:`batchclassify.emulator.predict` and prints the
throughput, which is the number batchclassify has to beat under the same emulator settings.
Needs ``pip install roboflow``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from batchclassify.emulator import EmulatorConfig, emulator_in_thread, predict


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=50, help="images to classify (default 50)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="emulator median latency")
    parser.add_argument("--latency-p99-ms", type=float, default=None, help="emulator p99")
    parser.add_argument("--size", type=int, default=640, help="image width (default 640)")
    args = parser.parse_args(argv)
    try:
        from roboflow import __version__ as roboflow_version  # type: ignore[import-untyped]
        from roboflow.models.classification import (  # type: ignore[import-untyped]
            ClassificationModel,
        )
    except ImportError:
        print("this benchmark needs the official client: pip install roboflow", file=sys.stderr)
        return 2

    config = EmulatorConfig(latency_ms=args.latency_ms, latency_p99_ms=args.latency_p99_ms)
    with tempfile.TemporaryDirectory() as tmp, emulator_in_thread(config) as url:
        paths = [make_photo(Path(tmp) / f"{n:04d}.jpg", n, args.size) for n in range(args.count)]
        # The construction that works unchanged: id is "workspace/project/version" and local is
        # the emulator's base URL *with* a trailing slash (the client concatenates strings).
        model = ClassificationModel(api_key="any-key", id="ws/demo/1", local=f"{url}/")
        seconds: list[float] = []
        mismatches = 0
        for path in paths:
            started = time.perf_counter()
            (answer,) = model.predict(str(path)).json()["predictions"]
            seconds.append(time.perf_counter() - started)
            mismatches += answer["predictions"] != predict(as_sent(path))["predictions"]
    total = sum(seconds)
    p50 = statistics.median(seconds) * 1000
    print(
        f"roboflow {roboflow_version} client (sequential), {args.count} images: "
        f"{args.count / total:.1f} images/s, p50 {p50:.1f} ms, {mismatches} mismatched answers"
    )
    return 1 if mismatches else 0


def make_photo(path: Path, seed: int, width: int) -> Path:
    """A photo-sized JPEG with some structure, different for every seed."""
    height = width * 3 // 4
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for k in range(5):
        x, y = (seed * 53 + k * 97) % width, (seed * 31 + k * 61) % height
        colour = ((seed * 40 + k * 70) % 256, (seed * 90) % 256, (k * 50) % 256)
        draw.ellipse((x, y, x + width // 4, y + height // 4), fill=colour)
    image.save(path, "JPEG", quality=90)
    return path


def as_sent(path: Path) -> bytes:
    """What the roboflow client uploads: the image as RGB, re-encoded as JPEG quality 90."""
    with Image.open(path) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, quality=90, format="JPEG")
    return out.getvalue()


if __name__ == "__main__":
    sys.exit(main())

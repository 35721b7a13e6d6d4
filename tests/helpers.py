"""Small helpers shared by test modules: real image files and emulator introspection.

Import them as ``from helpers import make_image, emulator_stats`` (pytest puts ``tests/`` on
``sys.path``, because the directory has no ``__init__.py``).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image, ImageDraw

#: what the official client and the docs send with a base64 body
FORM_CONTENT_TYPE = {"Content-Type": "application/x-www-form-urlencoded"}

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".webp": "WEBP"}


def image_bytes(
    *,
    color: tuple[int, int, int] = (200, 40, 40),
    size: tuple[int, int] = (64, 48),
    fmt: str = "JPEG",
    seed: int | None = None,
) -> bytes:
    """Encode a small real image: a solid ``color``, plus random rectangles when ``seed`` is
    given (so images can differ in content, not only in colour)."""
    image = Image.new("RGB", size, color)
    if seed is not None:
        rng = random.Random(seed)
        draw = ImageDraw.Draw(image)
        width, height = size
        for _ in range(6):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            x1, y1 = x0 + rng.randrange(1, width), y0 + rng.randrange(1, height)
            fill = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            draw.rectangle((x0, y0, x1, y1), fill=fill)
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def make_image(
    path: Path,
    *,
    color: tuple[int, int, int] = (200, 40, 40),
    size: tuple[int, int] = (64, 48),
    fmt: str | None = None,
    seed: int | None = None,
) -> Path:
    """Write a small real image to ``path`` (format from the suffix unless ``fmt`` is given);
    parent folders are created. Returns ``path``."""
    fmt = fmt or _FORMATS.get(path.suffix.lower(), "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color=color, size=size, fmt=fmt, seed=seed))
    return path


def b64(data: bytes) -> str:
    """The request body the protocol wants: base64 text of the file's bytes."""
    return base64.b64encode(data).decode("ascii")


async def emulator_stats(url: str, *, images: bool = False) -> dict[str, Any]:
    """``GET /_emulator/stats`` of the emulator at ``url`` (with per-image counts if asked)."""
    query = "?images=1" if images else ""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/_emulator/stats{query}") as resp,
    ):
        resp.raise_for_status()
        data: dict[str, Any] = await resp.json()
        return data


async def reset_emulator(url: str) -> None:
    """``POST /_emulator/reset``: zero the counters (and reseed) between phases of a test."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/_emulator/reset") as resp,
    ):
        resp.raise_for_status()


async def start_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> asyncio.subprocess.Process:
    """Start ``python -m batchclassify ARGS`` with pipes; ``env`` adds to the environment."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchclassify",
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdin: bytes | None = None,
    timeout: float = 60,
) -> tuple[int, str, str]:
    """Run the command to its end (bounded by ``timeout``, then killed): exit code, stdout,
    stderr."""
    process = await start_cli(*args, env=env, cwd=cwd)
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        process.kill()  # a hung run must not outlive its test
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def expected_answer(
    data: bytes, *, threshold: float = 0.4, multi_label: bool = False
) -> dict[str, Any]:
    """What a row should hold for these image bytes against the emulator: the client asks for
    the whole distribution (``confidence=0.01``) and applies ``threshold`` itself, so ``top``
    is always the best class and ``predicted_classes`` those over the threshold."""
    from batchclassify.emulator import predict

    body = predict(data, multi_label=multi_label, confidence=0.01)
    if multi_label:
        scores = {name: entry["confidence"] for name, entry in body["predictions"].items()}
    else:
        scores = {entry["class"]: entry["confidence"] for entry in body["predictions"]}
    top = max(scores, key=scores.__getitem__) if scores else ""
    confidence = scores.get(top, 0.0)
    if multi_label:
        predicted = [name for name, score in scores.items() if score >= threshold]
    else:
        predicted = [top] if top and confidence >= threshold else []
    return {"top": top, "confidence": confidence, "predicted_classes": predicted, "scores": scores}

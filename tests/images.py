"""Generators of real (and really odd) image files for the tests; nothing binary is committed."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
ORIENTATION = 0x0112

# What to do to a correctly oriented picture so that a viewer applying EXIF orientation ``n``
# shows it correctly again: the inverse of ImageOps.exif_transpose's table.
_STORE_FOR_ORIENTATION: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def solid(size: tuple[int, int], colour: tuple[int, ...] = RED, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def quadrants(size: tuple[int, int]) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: shows any turn."""
    width, height = size
    image = Image.new("RGB", size, WHITE)
    image.paste(RED, (0, 0, width // 2, height // 2))
    image.paste(GREEN, (width // 2, 0, width, height // 2))
    image.paste(BLUE, (0, height // 2, width // 2, height))
    return image


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Gradients plus noise: compresses like a photograph, not like a flat test card."""
    small = (max(1, size[0] // 8), max(1, size[1] // 8))
    red = Image.linear_gradient("L").resize(small).rotate(seed * 37 % 360)
    green = Image.radial_gradient("L").resize(small)
    blue = Image.effect_noise(small, 40 + seed)
    base = Image.merge("RGB", (red, green, blue)).resize(size, Image.Resampling.BICUBIC)
    noise = Image.effect_noise(size, 12).convert("RGB")
    return Image.blend(base, noise, 0.15)


def save(image: Image.Image, path: Path, fmt: str, **params: object) -> Path:
    image.save(path, fmt, **params)
    return path


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def oriented_jpeg(path: Path, shown: Image.Image, orientation: int) -> Path:
    """A JPEG stored turned so that a viewer applying EXIF ``orientation`` shows ``shown``."""
    stored = shown.transpose(_STORE_FOR_ORIENTATION[orientation]) if orientation > 1 else shown
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return save(stored, path, "JPEG", quality=95, exif=exif)


def palette_with_transparency(size: tuple[int, int]) -> Image.Image:
    """A "P" image: left half transparent (index 0), right half red (index 1)."""
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.paste(1, (size[0] // 2, 0, size[0], size[1]))
    image.info["transparency"] = 0
    return image


def half_transparent(size: tuple[int, int], mode: str = "RGBA") -> Image.Image:
    """Left half fully transparent (black underneath), right half opaque red (or grey for LA)."""
    opaque: tuple[int, ...] = (255, 0, 0, 255) if mode == "RGBA" else (128, 255)
    image = Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    image.paste(opaque, (size[0] // 2, 0, size[0], size[1]))
    return image


def animated_gif(path: Path, size: tuple[int, int]) -> Path:
    """Two frames: red, then blue."""
    first, second = solid(size, RED), solid(size, BLUE)
    return save(first, path, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def grey16_png(path: Path, size: tuple[int, int], value: int) -> Path:
    """A 16-bit greyscale PNG (Pillow opens it as mode I;16)."""
    return save(Image.new("I;16", size, value), path, "PNG")


def raw_png(size: tuple[int, int], bit_depth: int, colour_type: int, pixel: bytes) -> bytes:
    """A PNG written by hand (for what Pillow cannot write, e.g. 16-bit RGB), one colour."""
    width, height = size
    rows = (b"\x00" + pixel * width) * height
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def png_claiming(size: tuple[int, int]) -> bytes:
    """A tiny, complete-looking PNG whose header claims ``size`` (a decompression bomb)."""
    width, height = size
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def close_to(actual: object, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    """Whether a pixel (as ``getpixel`` gives it) matches a colour within a per-channel tolerance
    (JPEG is lossy)."""
    assert isinstance(actual, tuple), actual
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))

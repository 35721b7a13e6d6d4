"""Turn one input file into the bytes we upload: checked, and re-encoded only when it must be.

Two paths, chosen per image:

* **passthrough** (the cheap one): a complete 8-bit RGB or greyscale JPEG, PNG, WebP or BMP with
  no transparency, no animation and no EXIF rotation, that fits ``max_size`` and the upload limit,
  is sent as the file's own bytes. Only the header is parsed (``Image.open``), never the pixels.
* **convert**: anything else Pillow can open (GIF, TIFF, CMYK, 16-bit, palette, alpha, rotated,
  too big, …) is decoded once and re-encoded as an RGB JPEG: first frame only, EXIF orientation
  applied, transparency flattened onto white, downscaled to ``max_size`` if set. For JPEG the
  decoder itself scales by 1/2, 1/4 or 1/8 (``Image.draft``: libjpeg's DCT scaling) before the
  final Lanczos resize: a 12 MP photo → 640 px takes 31 ms instead of 140 ms for the naive
  decode-convert-resize-encode, with the same PSNR (Lanczos costs 2.5 ms more than bicubic and
  gains 7 dB before the JPEG encode; ``benchmarks/bench_prepare.py``).

Every problem becomes an :class:`~batchclassify.errors.InputError` whose ``kind`` is one of

    not_found           no such file, or a broken symbolic link
    not_a_file          a directory, FIFO, device, …
    unreadable          permission denied or another OS error while reading
    empty               0 bytes
    not_an_image        Pillow does not recognise the format
    truncated           the file ends early (a JPEG without EOI, a PNG without IEND, …)
    corrupt             the pixel data cannot be decoded
    unsupported         a format Pillow recognises but cannot decode here
    too_large           over the upload limit (without ``max_size``), or an absurdly large file
    decompression_bomb  more pixels than ``max_pixels``

The upload limit is checked on the **base64** size, because the body we send is base64 text
(4/3 of the bytes) and the documented 20 MB limit is on what the service receives.

The functions are synchronous and pure; run them in a thread pool of :func:`default_workers`
threads. Threads rather than processes, measured on 2 cores (``benchmarks/bench_prepare.py``,
images/s, best of 7 alternating runs): 12 MP JPEG → 640 px, one thread 32.4, ThreadPoolExecutor(2)
62.6, ProcessPoolExecutor(2) 62.7, a tie within noise (medians 58.7 and 62.2); pass-through of
2.3 MB files, one thread 1167, threads 2513, processes 341. Pillow releases the GIL while
decoding and resizing (not while encoding into a BytesIO, but that is 0.7 ms of the 31), so
threads scale like processes on the CPU-bound path, and they avoid pickling megabytes of results
back, worker start-up, and forking a process that runs an event loop.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ConfigError, InputError

__all__ = ["PrepareOptions", "PreparedImage", "default_workers", "prepare_bytes", "prepare_file"]

#: formats the service decodes itself; these are sent untouched when nothing else forbids it
PASSTHROUGH_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP"})
#: files larger than this are refused before being read into memory
MAX_FILE_BYTES = 1024 * 1024 * 1024

_MB = 1024 * 1024
_ORIENTATION_TAG = 0x0112
# The same table as ImageOps.exif_transpose, applied to the already resized image (cheaper).
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareOptions:
    """How inputs are turned into uploads.

    ``max_size``: downscale so the longer side is at most this many pixels (``None``: never
    resize). ``max_upload_bytes``: limit on the base64 body. ``max_pixels``: decompression-bomb
    guard (``None``: Pillow's ``Image.MAX_IMAGE_PIXELS``; Pillow itself still refuses images over
    twice its own limit).
    """

    max_size: int | None = None
    jpeg_quality: int = 90
    max_upload_bytes: int = 20 * _MB
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_size is not None and self.max_size < 1:
            raise ConfigError(f"max_size must be a positive number of pixels, not {self.max_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be between 1 and 100, not {self.jpeg_quality}")
        if self.max_upload_bytes < 1:
            raise ConfigError(f"max_upload_bytes must be positive, not {self.max_upload_bytes}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be positive, not {self.max_pixels}")


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """The bytes to upload (not yet base64) and what they are."""

    data: bytes
    width: int
    height: int
    format: str
    original_bytes: int
    converted: bool


def default_workers() -> int:
    """How many threads should prepare images: one per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def prepare_file(path: Path, options: PrepareOptions) -> PreparedImage:
    """Read and prepare one local file; every problem is an :class:`InputError`."""
    return prepare_bytes(_read(path), options, name=path.name or str(path))


def prepare_bytes(data: bytes, options: PrepareOptions, *, name: str) -> PreparedImage:
    """Prepare an image already in memory (e.g. downloaded); ``name`` is used in messages."""
    if not data:
        raise InputError(f"{name}: the file is empty (0 bytes)", kind="empty")
    if len(data) > MAX_FILE_BYTES:
        raise _far_too_large(name, len(data))
    truncated = _truncated_format(data)
    if truncated:
        raise _truncated(name, truncated)
    # Pillow reports what it can work around as warnings: corrupt EXIF, odd palettes, and
    # DecompressionBombWarning for big images (over twice its limit it raises). We check sizes
    # ourselves and report problems as InputErrors; a warning printed from a worker thread would
    # only garble the progress bar. catch_warnings is process-global before Python 3.14, so with
    # several threads a warning may still slip through (or, under "warnings as errors", be
    # raised): such exceptions are caught below like any other.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise InputError(
                f"{name}: not an image (not a format Pillow can read)", kind="not_an_image"
            ) from None
        except Exception as exc:  # Pillow's parsers raise all sorts on broken headers
            raise _decode_error(name, "image", exc) from None
        with image:
            _check_pixels(image, options, name)
            if _can_pass_through(image, data, options, name):
                return PreparedImage(
                    data=data,
                    width=image.width,
                    height=image.height,
                    format="JPEG" if image.format == "MPO" else str(image.format),
                    original_bytes=len(data),
                    converted=False,
                )
            return _convert(image, options, name, len(data))


def _read(path: Path) -> bytes:
    name = path.name or str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            target = os.readlink(path)
            raise InputError(
                f"{name}: broken symbolic link (its target {target} does not exist)",
                kind="not_found",
            ) from None
        raise InputError(f"{name}: no such file", kind="not_found") from None
    except OSError as exc:
        raise _unreadable(name, exc) from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{name}: is a directory, not an image file", kind="not_a_file")
    if not stat.S_ISREG(info.st_mode):  # reading a FIFO could block forever
        raise InputError(f"{name}: not a regular file", kind="not_a_file")
    if info.st_size == 0:
        raise InputError(f"{name}: the file is empty (0 bytes)", kind="empty")
    if info.st_size > MAX_FILE_BYTES:
        raise _far_too_large(name, info.st_size)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _unreadable(name, exc) from None


def _unreadable(name: str, exc: OSError) -> InputError:
    if isinstance(exc, PermissionError):
        return InputError(f"{name}: permission denied", kind="unreadable")
    return InputError(f"{name}: cannot read the file ({exc.strerror})", kind="unreadable")


def _truncated_format(data: bytes) -> str | None:
    """The format's name if the file is a JPEG, PNG or WebP that visibly ends early.

    Byte checks only, microseconds even on a 5 MB photo: a JPEG must have an EOI marker after
    its first scan starts (no other FF D9 can occur there), a PNG a whole IEND chunk, a WebP as
    many bytes as its RIFF header declares. Trailing data after the end marker is fine.
    """
    if data.startswith(b"\xff\xd8\xff"):
        scan = _jpeg_scan_start(data)
        return "JPEG" if scan is None or data.rfind(b"\xff\xd9", scan) == -1 else None
    if data.startswith(_PNG_SIGNATURE):
        end = data.rfind(b"IEND", len(_PNG_SIGNATURE))
        return "PNG" if end == -1 or len(data) < end + 8 else None  # IEND and its CRC
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP" if len(data) < int.from_bytes(data[4:8], "little") + 8 else None
    return None


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first SOS marker, walking the header segments; ``None`` if it is missing."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:
            return i
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # segments without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _check_pixels(image: Image.Image, options: PrepareOptions, name: str) -> None:
    limit = options.max_pixels if options.max_pixels is not None else Image.MAX_IMAGE_PIXELS
    pixels = image.width * image.height
    if limit and pixels > limit:
        raise InputError(
            f"{name}: {image.width}×{image.height} pixels ({pixels / 1e6:.0f} MP) is over the "
            f"limit of {limit / 1e6:.0f} MP (decompression-bomb guard)",
            kind="decompression_bomb",
        )


def _can_pass_through(
    image: ImageFile.ImageFile, data: bytes, options: PrepareOptions, name: str
) -> bool:
    """Whether the file's own bytes can be sent; raises if they are complete but too large."""
    fmt = image.format
    if (
        fmt not in PASSTHROUGH_FORMATS
        or image.mode not in ("RGB", "L")
        or image.has_transparency_data
        or (fmt == "PNG" and data[24] != 8)  # IHDR bit depth: 16-bit PNGs open as "RGB" too
        or (fmt in ("PNG", "WEBP") and getattr(image, "is_animated", False))
        or (fmt == "BMP" and not _bmp_complete(image, data))
        or _orientation(image) != 1
        or (options.max_size is not None and max(image.size) > options.max_size)
    ):
        return False
    if _base64_size(len(data)) <= options.max_upload_bytes:
        return True
    if options.max_size is None:
        raise _too_large(name, len(data), options)
    return False  # small enough in pixels but not in bytes: re-encoding drops the excess


def _bmp_complete(image: ImageFile.ImageFile, data: bytes) -> bool:
    tile = image.tile[0] if image.tile else None
    if tile is None or tile.codec_name != "raw" or not isinstance(tile.args, tuple):
        return True  # RLE-compressed: the decoder will tell
    stride = tile.args[1]
    return not isinstance(stride, int) or len(data) >= tile.offset + stride * image.height


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 if missing or unreadable), without forcing a decode."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # PngImageFile.getexif() would decode the whole image to look for a late eXIf
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # corrupt EXIF: viewers ignore it, so do we
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _convert(
    image: ImageFile.ImageFile, options: PrepareOptions, name: str, original_bytes: int
) -> PreparedImage:
    """Decode the first frame, downscale, orient, flatten, and encode as an RGB JPEG."""
    # The target in *stored* orientation: the scale factor is the same after a 90° turn.
    target = _fit(image.size, options.max_size)
    try:
        if target != image.size:
            image.draft("RGB", target)  # JPEG only: decode at 1/2, 1/4 or 1/8, still >= target
        image.load()
        orientation = _orientation(image)
        frame = _normalise_mode(image)
        if frame.size != target:
            frame = frame.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        frame = _flatten(frame)
        if orientation in _TRANSPOSE:
            frame = frame.transpose(_TRANSPOSE[orientation])
        out = io.BytesIO()
        frame.save(out, "JPEG", quality=options.jpeg_quality)
    except InputError:
        raise
    except Exception as exc:  # a per-item failure must never take the run down
        raise _decode_error(name, str(image.format), exc) from None
    encoded = out.getvalue()
    if _base64_size(len(encoded)) > options.max_upload_bytes:
        raise _too_large(name, len(encoded), options, reencoded=True)
    return PreparedImage(
        data=encoded,
        width=frame.width,
        height=frame.height,
        format="JPEG",
        original_bytes=original_bytes,
        converted=True,
    )


def _fit(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    """``size`` scaled so the longer side is ``max_size`` (unchanged if it already fits)."""
    width, height = size
    if max_size is None or max(width, height) <= max_size:
        return size
    if width >= height:
        return max_size, max(1, round(height * max_size / width))
    return max(1, round(width * max_size / height)), max_size


def _normalise_mode(image: Image.Image) -> Image.Image:
    """The image as L, LA, RGB or RGBA: modes that resize and flatten correctly."""
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" not in image.info:
        return image
    if mode in ("LA", "RGBA"):
        return image
    if mode.startswith(("I", "F")):  # 16/32-bit integer or float greyscale: map into 0-255
        if mode.startswith("I;16"):
            scale, offset = 255 / 65535, 0.0
        else:
            low, high = image.getextrema()
            assert isinstance(low, (int, float)) and isinstance(high, (int, float))
            if mode == "I" and low >= 0 and high <= 255:
                scale, offset = 1.0, 0.0
            elif mode == "I" and low >= 0 and high <= 65535:
                scale, offset = 255 / 65535, 0.0
            else:  # an arbitrary range: stretch it
                scale = 255 / (high - low) if high > low else 0.0
                offset = -low * scale
        return image.convert("F").point(lambda v: v * scale + offset).convert("L")
    if image.has_transparency_data:
        return image.convert("RGBA")
    return image.convert("RGB")


def _flatten(image: Image.Image) -> Image.Image:
    """An RGB image, with any transparency composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode not in ("LA", "RGBA"):
        return image.convert("RGB")
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image.convert("RGB"), mask=image.getchannel("A"))
    return background


def _base64_size(n: int) -> int:
    return 4 * ((n + 2) // 3)


def _too_large(
    name: str, size: int, options: PrepareOptions, *, reencoded: bool = False
) -> InputError:
    what = "even re-encoded as JPEG it is" if reencoded else "the file is"
    hint = (
        "use --max-size (e.g. --max-size 1024) to downscale before upload"
        if options.max_size is None
        else "use a smaller --max-size"
    )
    return InputError(
        f"{name}: {what} {_human(size)} ({_human(_base64_size(size))} as base64), over the "
        f"{_human(options.max_upload_bytes)} upload limit; {hint}",
        kind="too_large",
    )


def _far_too_large(name: str, size: int) -> InputError:
    return InputError(
        f"{name}: the file is {_human(size)}, far too large for an image we could upload",
        kind="too_large",
    )


def _truncated(name: str, fmt: str) -> InputError:
    return InputError(
        f"{name}: truncated {fmt} file: it ends before the image data does "
        "(an interrupted download or copy?)",
        kind="truncated",
    )


def _human(size: int) -> str:
    if size >= _MB:
        return f"{size / _MB:.1f} MB"
    return f"{size / 1024:.1f} KB" if size >= 1024 else f"{size} bytes"


def _decode_error(name: str, fmt: str, exc: Exception) -> InputError:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        pixels = re.search(r"\((\d+) pixels\)", detail)
        too_many = f"{int(pixels[1]) / 1e6:.0f} MP is" if pixels else "too many pixels:"
        return InputError(
            f"{name}: {too_many} more than Pillow will decode (decompression-bomb guard)",
            kind="decompression_bomb",
        )
    if isinstance(exc, EOFError) or "truncated" in detail.lower():
        return _truncated(name, fmt)
    if isinstance(exc, MemoryError):
        return InputError(f"{name}: not enough memory to decode this {fmt} image", kind="too_large")
    if "not supported" in detail or ("decoder" in detail and "not available" in detail):
        return InputError(f"{name}: cannot decode {fmt} images here ({detail})", kind="unsupported")
    return InputError(f"{name}: corrupt {fmt} image ({detail})", kind="corrupt")

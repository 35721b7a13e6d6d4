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
    corrupt             the pixel data cannot be decoded, or the structure is absurd (thousands
                        of metadata segments, huge JPEG coding tables)
    unsupported         a format Pillow recognises but cannot decode here
    too_large           over the upload limit (without ``max_size``), an absurdly large file, or
                        more metadata than we let Pillow parse
    decompression_bomb  more pixels than ``max_pixels``

The upload limit is checked on the **base64** size, because the body we send is base64 text
(4/3 of the bytes) and the documented 20 MB limit is on what the service receives. Without
``max_size`` a file over it is still converted when it is not a pass-through candidate (an
uncompressed TIFF, an alpha PNG, a rotated JPEG, …): re-encoding can shrink it to any size, so the
file's size alone decides only above :data:`MAX_FILE_BYTES`, checked before anything is read.

**Metadata is bounded before Pillow parses it.** Pillow parses JPEG segments, PNG chunks and GIF
extensions in Python and keeps copies, and some of that is far from linear. Measured with Pillow
13 on one core, in ``Image.open`` alone: a 100 MB JPEG carrying 1,600 EXIF APP1 segments took 35 s
and 517 MB (each segment is appended to all the EXIF bytes before it: quadratic); 1,600 SOF
segments 13 s and 3 GB; a million empty APP segments (4 MB) 1.5 s; a 4 MB PNG of 4,000 small iCCP
chunks 8 s (each inflates to 1 MiB and ``MAX_TEXT_MEMORY`` counts only text, so the same goes for
keyword-less zTXt and non-UTF-8 iTXt); a 10 MB GIF comment in 1-byte sub-blocks 0.8 s and 450 MB;
a 100 MB WebP EXIF chunk 400 MB. So each file's structure is first walked with a few small reads
(:func:`_check_structure`; for a local file before it is read into memory) and the file is refused
unparsed when its metadata exceeds :data:`MAX_METADATA_BYTES`, a JPEG's EXIF exceeds
:data:`MAX_EXIF_BYTES`, or it has absurdly many pieces. Ordinary photos carry well under 1 MB of
metadata in a few dozen pieces.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ConfigError, InputError

__all__ = ["PrepareOptions", "PreparedImage", "default_workers", "prepare_bytes", "prepare_file"]

#: formats the service decodes itself; these are sent untouched when nothing else forbids it
PASSTHROUGH_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP"})
#: files larger than this are refused before being read into memory
MAX_FILE_BYTES = 1024 * 1024 * 1024
#: metadata a file may carry (JPEG APPn/COM segments, PNG chunks other than image data, GIF
#: extensions, WebP metadata chunks); more is refused before Pillow parses any of it. ICC profiles
#: and extended XMP (e.g. depth maps) reach a few MB; 16 MiB of it costs Pillow under 0.1 s
MAX_METADATA_BYTES = 16 * 1024 * 1024
#: JPEG EXIF data: the EXIF standard fits it in one 64 KB APP1 segment, and Pillow joins further
#: segments at quadratic cost (16 MiB of them: 0.85 s). Below 1 MiB what costs is parsing the
#: IFD: 0.2 s at most (65,535 tags)
MAX_EXIF_BYTES = 1024 * 1024

_MB = 1024 * 1024
# Pieces of metadata one file may have. Pillow handles each in Python even when it is empty (a
# million empty JPEG APP segments or PNG chunks: 1.5-1.9 s); ordinary files have a few dozen (an
# ICC profile takes at most 255 APP2 segments).
_MAX_METADATA_PIECES = 4096
# JPEG coding tables (DQT, DHT, SOF, DRI, …), stray markers and fill bytes before the first scan.
# Real files have a few KB in about a dozen pieces, but Pillow parses DQT and SOF in Python: 1,600
# oversized SOF segments took 13 s and 3 GB, 1,600 DQT segments 3.4 s.
_MAX_JPEG_TABLE_BYTES = 64 * 1024
_MAX_JPEG_TABLE_PIECES = 1024
# PNG chunks Pillow inflates (iCCP, zTXt, compressed iTXt): up to 1 MiB each (MAX_TEXT_CHUNK). Its
# MAX_TEXT_MEMORY allows 64 chunks' worth of text but misses iCCP, zTXt without a keyword and
# iTXt that is not UTF-8. A real PNG has one iCCP and a few compressed texts; 64: 0.14 s.
_MAX_PNG_INFLATED_CHUNKS = 64
# Image-data pieces (PNG IDAT/fdAT/fcTL, WebP frames): Pillow fetches each in Python while decoding
# (a million empty IDAT chunks: 0.9 s). libpng writes 8 KiB IDATs: 2**17 of them fill
# MAX_FILE_BYTES.
_MAX_IMAGE_DATA_PIECES = 1 << 17
# GIF extension sub-blocks (at most 255 bytes each: MAX_METADATA_BYTES is ~65,800 of them) and
# stray bytes before the first image. Pillow keeps every sub-block as a bytes object.
_MAX_GIF_BLOCKS = 1 << 16
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
# What Pillow accepts as a PNG chunk type; it stops reading chunks at anything else.
_PNG_CHUNK_TYPE = re.compile(rb"\w{4}")
# Markers Pillow's JPEG parser reads no length for (their MARKER entries have no handler), and TEM.
# Our walk must step over exactly what Pillow steps over: a walk that skipped a "length" Pillow
# does not read could be steered past segments that Pillow then parses.
_JPEG_NO_LENGTH = frozenset({0x01, 0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
_WEBP_IMAGE_CHUNKS = frozenset({b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF"})

#: ``read_at(offset, size)``: up to ``size`` bytes of the file from ``offset``
_ReadAt = Callable[[int, int], bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class PrepareOptions:
    """How inputs are turned into uploads.

    ``max_size``: downscale so the longer side is at most this many pixels (``None``: never
    resize). ``max_upload_bytes``: the endpoint's documented limit on the request body
    (``None``: none documented, the server's 413 decides), counted on the base64 text when
    ``base64_upload`` (4/3 of the bytes), else on the bytes. ``max_pixels``: decompression-bomb
    guard (``None``: Pillow's ``Image.MAX_IMAGE_PIXELS``; Pillow itself still refuses images over
    twice its own limit).
    """

    max_size: int | None = None
    jpeg_quality: int = 90
    max_upload_bytes: int | None = 20 * _MB
    base64_upload: bool = True
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.max_size is not None and self.max_size < 1:
            raise ConfigError(f"max_size must be a positive number of pixels, not {self.max_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be between 1 and 100, not {self.jpeg_quality}")
        if self.max_upload_bytes is not None and self.max_upload_bytes < 1:
            raise ConfigError(f"max_upload_bytes must be positive, not {self.max_upload_bytes}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be positive, not {self.max_pixels}")


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """The bytes to upload (not yet base64) and what they are: ``width``/``height`` of what
    is sent, ``original_width``/``original_height`` of the upright original."""

    data: bytes
    width: int
    height: int
    format: str
    original_bytes: int
    converted: bool
    original_width: int = 0
    original_height: int = 0


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
    # Also after prepare_file's check on the open file: these are the bytes Pillow will parse.
    jpeg_scan = _check_structure(lambda offset, size: data[offset : offset + size], len(data), name)
    truncated = _truncated_format(data, jpeg_scan)
    if truncated:
        raise _truncated(name, truncated)
    # Pillow reports what it can work around as warnings: corrupt EXIF, odd palettes, and
    # DecompressionBombWarning for big images (over twice its limit it raises). We check sizes
    # ourselves and report problems as InputErrors; a warning printed from a worker thread would
    # only garble the progress bar. catch_warnings is process-global before Python 3.14, so with
    # several threads a warning may still slip through (or, under "warnings as errors", be
    # raised): such exceptions are caught below like any other. The command line therefore
    # also ignores Pillow's warnings process-wide unless -v is given (cli.py).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise InputError(
                f"{name}: not an image (not a format Pillow can read)", kind="not_an_image"
            ) from None
        except Exception as exc:  # Pillow's parsers raise all sorts on broken headers
            raise _decode_error(name, None, exc) from None
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
                    original_width=image.width,
                    original_height=image.height,
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
        with open(path, "rb", opener=_open_nonblocking) as file:
            info = os.fstat(file.fileno())  # the file we opened, whatever the path is by now
            if not stat.S_ISREG(info.st_mode):
                raise InputError(f"{name}: not a regular file", kind="not_a_file")
            if info.st_size > MAX_FILE_BYTES:
                raise _far_too_large(name, info.st_size)
            # A few small reads refuse hostile metadata before the whole file is in memory.
            _check_structure(_file_reader(file), info.st_size, name)
            file.seek(0)
            data = _read_at_most(file, info.st_size, MAX_FILE_BYTES)
    except FileNotFoundError:  # removed since stat()
        raise InputError(f"{name}: no such file", kind="not_found") from None
    except OSError as exc:
        raise _unreadable(name, exc) from None
    if len(data) > MAX_FILE_BYTES:  # it grew while we read it
        raise _far_too_large(name, len(data))
    return data


def _open_nonblocking(path: str, flags: int) -> int:
    # Should the path have become a FIFO since stat(), opening it must not wait for a writer.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _read_at_most(file: BinaryIO, expected: int, limit: int) -> bytes:
    """The rest of ``file``, but at most ``limit + 1`` bytes even if it grows while we read."""
    parts = [file.read(min(expected, limit) + 1)]  # one buffer of the size fstat() gave
    total = len(parts[0])
    while expected < total <= limit:  # it grew: go on in modest steps, up to the limit
        block = file.read(min(_MB, limit + 1 - total))
        if not block:
            break
        parts.append(block)
        total += len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _file_reader(file: BinaryIO) -> _ReadAt:
    def read_at(offset: int, size: int) -> bytes:
        file.seek(offset)
        return file.read(size)

    return read_at


def _unreadable(name: str, exc: OSError) -> InputError:
    if isinstance(exc, PermissionError):
        return InputError(f"{name}: permission denied", kind="unreadable")
    return InputError(f"{name}: cannot read the file ({exc.strerror})", kind="unreadable")


def _truncated_format(data: bytes, jpeg_scan: int | None) -> str | None:
    """The format's name if the file is a JPEG, PNG or WebP that visibly ends early.

    Byte checks only, microseconds even on a 5 MB photo: a JPEG must have an EOI marker after
    its first scan starts (``jpeg_scan``, found by :func:`_check_structure`; no other FF D9 can
    occur there), a PNG a whole IEND chunk, a WebP as many bytes as its RIFF header declares.
    Trailing data after the end marker is fine.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG" if jpeg_scan is None or data.rfind(b"\xff\xd9", jpeg_scan) == -1 else None
    if data.startswith(_PNG_SIGNATURE):
        end = data.rfind(b"IEND", len(_PNG_SIGNATURE))
        return "PNG" if end == -1 or len(data) < end + 8 else None  # IEND and its CRC
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP" if len(data) < int.from_bytes(data[4:8], "little") + 8 else None
    return None


def _check_structure(read_at: _ReadAt, size: int, name: str) -> int | None:
    """Refuse a file whose structure Pillow would need seconds or hundreds of MB to parse.

    Walks what Pillow parses in Python (JPEG segments up to the first scan, PNG chunks up to IEND,
    GIF blocks up to the first image) and WebP chunks, with one small read per piece, and counts
    them against the limits above. Returns where a JPEG's first scan starts (``None`` if its
    header ends before one, or for other formats).
    """
    head = read_at(0, 12)
    if head.startswith(b"\xff\xd8\xff"):
        return _walk_jpeg(read_at, size, name)
    if head.startswith(_PNG_SIGNATURE):
        _walk_png(read_at, size, name)
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        _walk_gif(read_at, size, name)
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        _walk_webp(read_at, size, name)
    return None


class _Budget:
    """Pieces of one kind met by a structure walk, and the limits on them."""

    def __init__(
        self,
        name: str,
        content: str,
        unit: str,
        *,
        max_pieces: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.name = name  # the file's, for messages
        self.content = content  # e.g. "metadata"
        self.unit = unit  # e.g. "JPEG APPn/COM segments"
        self.max_pieces = max_pieces
        self.max_bytes = max_bytes
        self.pieces = 0
        self.bytes = 0

    def add(self, size: int) -> None:
        """Count one piece; over the piece limit the walk stops here (it costs per piece too)."""
        self.pieces += 1
        self.bytes += size
        if self.max_pieces is not None and self.pieces > self.max_pieces:
            self.check(partial=True)  # too many bytes already: the clearer reason
            raise InputError(
                f"{self.name}: more than {self.max_pieces} {self.unit}, which no ordinary image "
                "has (a broken or hostile file); not parsed",
                kind="corrupt",
            )

    def check(self, *, partial: bool = False) -> None:
        """Refuse the file if its pieces hold more bytes than allowed."""
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            amount = f"{'over ' if partial else ''}{_human(self.bytes)}"
            raise InputError(
                f"{self.name}: {amount} of {self.content} in {self.pieces} {self.unit}, over "
                f"the {_human(self.max_bytes)} limit; not parsed",
                kind="too_large",
            )


def _walk_jpeg(read_at: _ReadAt, size: int, name: str) -> int | None:
    """Offset of the first SOS marker, stepping through the header segments as Pillow does.

    ``None`` if the data ends first, or where a marker must be there is none (Pillow would
    crawl through such junk a byte at a time).
    """
    metadata = _Budget(
        name,
        "metadata",
        "JPEG APPn/COM segments",
        max_pieces=_MAX_METADATA_PIECES,
        max_bytes=MAX_METADATA_BYTES,
    )
    exif = _Budget(name, "EXIF data", "APP1 segments", max_bytes=MAX_EXIF_BYTES)
    tables = _Budget(
        name,
        "coding tables",
        "JPEG table segments, markers and fill bytes",
        max_pieces=_MAX_JPEG_TABLE_PIECES,
        max_bytes=_MAX_JPEG_TABLE_BYTES,
    )
    scan = None
    i = 2
    while i + 4 <= size:
        head = read_at(i, 10)  # marker, length, and enough payload to tell EXIF
        if len(head) < 4 or head[0] != 0xFF or head[1] == 0x00:
            break
        marker = head[1]
        if marker == 0xDA:
            scan = i
            break
        if marker == 0xFF:  # fill byte
            step = 1
        elif marker in _JPEG_NO_LENGTH:
            step = 2
        else:
            step = 2 + int.from_bytes(head[2:4], "big")
            if step < 4:  # a length below its own two bytes
                break
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:
            metadata.add(step)
            if marker == 0xE1 and head[4:10] == b"Exif\x00\x00":
                exif.add(step)
        else:
            tables.add(step)
        i += step
    metadata.check()
    exif.check()
    tables.check()
    return scan


def _walk_png(read_at: _ReadAt, size: int, name: str) -> None:
    """Count a PNG's chunks up to IEND: Pillow parses those before the image data when opening,
    and those after it when decoding."""
    metadata = _Budget(
        name,
        "metadata",
        "PNG chunks besides image data",
        max_pieces=_MAX_METADATA_PIECES,
        max_bytes=MAX_METADATA_BYTES,
    )
    inflated = _Budget(
        name,
        "compressed metadata",
        "compressed PNG chunks (iCCP, zTXt, iTXt)",
        max_pieces=_MAX_PNG_INFLATED_CHUNKS,
    )
    image_data = _Budget(
        name, "image data", "PNG image data chunks", max_pieces=_MAX_IMAGE_DATA_PIECES
    )
    i = len(_PNG_SIGNATURE)
    while i + 8 <= size:
        head = read_at(i, 8)  # length, type
        kind = head[4:8]
        if len(head) < 8 or not _PNG_CHUNK_TYPE.fullmatch(kind) or kind == b"IEND":
            break
        step = min(12 + int.from_bytes(head[:4], "big"), size - i)  # with type and CRC
        if kind in (b"IDAT", b"fdAT", b"fcTL"):
            image_data.add(step)
        else:
            metadata.add(step)
            # iTXt: keyword (1-79 bytes), NUL, compression flag; unreadable counts as compressed
            if kind in (b"iCCP", b"zTXt") or (
                kind == b"iTXt" and _itxt_compressed(read_at(i + 8, max(0, min(step - 12, 81))))
            ):
                inflated.add(step)
        i += step
    metadata.check()


def _itxt_compressed(start: bytes) -> bool:
    nul = start.find(b"\x00")
    return nul == -1 or start[nul + 1 : nul + 2] != b"\x00"


def _walk_gif(read_at: _ReadAt, size: int, name: str) -> None:
    """Count the extension sub-blocks before a GIF's first image, which ``Image.open`` reads."""
    blocks = _Budget(
        name,
        "metadata",
        "GIF extension sub-blocks and stray bytes",
        max_pieces=_MAX_GIF_BLOCKS,
        max_bytes=MAX_METADATA_BYTES,
    )
    flags = read_at(10, 1)
    i = 13 + (3 << ((flags[0] & 7) + 1) if flags and flags[0] & 0x80 else 0)  # global palette
    while i < size:
        tag = read_at(i, 1)
        if tag in (b",", b";", b""):  # the first image, or the end
            break
        if tag != b"!":  # a stray byte: Pillow steps over it
            blocks.add(1)
            i += 1
            continue
        i += 2  # introducer and label, then sub-blocks up to an empty one
        while i < size:
            length = read_at(i, 1)
            n = length[0] if length else 0
            blocks.add(1 + n)
            i += 1 + n
            if n == 0:
                break
    blocks.check()


def _walk_webp(read_at: _ReadAt, size: int, name: str) -> None:
    """Count a WebP's chunks. libwebp parses them in C, but Pillow copies the file and each
    metadata chunk (a 100 MB EXIF chunk: 400 MB)."""
    metadata = _Budget(
        name,
        "metadata",
        "WebP metadata chunks",
        max_pieces=_MAX_METADATA_PIECES,
        max_bytes=MAX_METADATA_BYTES,
    )
    frames = _Budget(name, "image data", "WebP image chunks", max_pieces=_MAX_IMAGE_DATA_PIECES)
    end = min(size, 8 + int.from_bytes(read_at(4, 4), "little"))  # the RIFF size
    i = 12
    while i + 8 <= end:
        head = read_at(i, 8)  # type, length
        if len(head) < 8:
            break
        length = int.from_bytes(head[4:8], "little")
        step = min(8 + length + (length & 1), end - i)  # padded to an even size
        (frames if head[:4] in _WEBP_IMAGE_CHUNKS else metadata).add(step)
        i += step
    metadata.check()


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
    if _fits(len(data), options):
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
    stored = image.size  # before draft() changes it
    target = _fit(stored, options.max_size)
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
        # comment=b"": Pillow would copy the source's comment (info["comment"], e.g. a GIF's)
        # into the JPEG, and refuse one over a JPEG segment's 64 KB. Converted uploads carry
        # no metadata.
        frame.save(out, "JPEG", quality=options.jpeg_quality, comment=b"")
    except InputError:
        raise
    except Exception as exc:  # a per-item failure must never take the run down
        raise _decode_error(name, image.format, exc) from None
    encoded = out.getvalue()
    if not _fits(len(encoded), options):
        raise _too_large(name, len(encoded), options, reencoded=True)
    turned = orientation in (5, 6, 7, 8)  # a quarter turn swaps the sides
    return PreparedImage(
        data=encoded,
        width=frame.width,
        height=frame.height,
        format="JPEG",
        original_bytes=original_bytes,
        converted=True,
        original_width=stored[1] if turned else stored[0],
        original_height=stored[0] if turned else stored[1],
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


def _fits(n: int, options: PrepareOptions) -> bool:
    """Whether ``n`` bytes of image fit the upload limit, in the form they are sent."""
    limit = options.max_upload_bytes
    sent = _base64_size(n) if options.base64_upload else n
    return limit is None or sent <= limit


def _too_large(
    name: str, size: int, options: PrepareOptions, *, reencoded: bool = False
) -> InputError:
    what = "even re-encoded as JPEG it is" if reencoded else "the file is"
    hint = (
        "use --max-size (e.g. --max-size 1024) to downscale before upload"
        if options.max_size is None
        else "use a smaller --max-size"
    )
    as_sent = f" ({_human(_base64_size(size))} as base64)" if options.base64_upload else ""
    limit = options.max_upload_bytes or 0
    return InputError(
        f"{name}: {what} {_human(size)}{as_sent}, over the endpoint's {_human(limit)} upload "
        f"limit; {hint}",
        kind="too_large",
    )


def _far_too_large(name: str, size: int) -> InputError:
    return InputError(
        f"{name}: the file is {_human(size)}, far too large for an image we could upload",
        kind="too_large",
    )


def _truncated(name: str, fmt: str | None) -> InputError:
    what = f"{fmt} file" if fmt else "file"
    return InputError(
        f"{name}: truncated {what}: it ends before the image data does "
        "(an interrupted download or copy?)",
        kind="truncated",
    )


def _human(size: int) -> str:
    if size >= _MB:
        return f"{size / _MB:.1f} MB"
    return f"{size / 1024:.1f} KB" if size >= 1024 else f"{size} bytes"


def _decode_error(name: str, fmt: str | None, exc: Exception) -> InputError:
    """``fmt``: the format's name, ``None`` when not even that is known (the header broke)."""
    detail = str(exc) or type(exc).__name__
    image = f"{fmt} image" if fmt else "image"
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
        return InputError(f"{name}: not enough memory to decode this {image}", kind="too_large")
    if "not supported" in detail or ("decoder" in detail and "not available" in detail):
        return InputError(f"{name}: cannot decode this {image} here ({detail})", kind="unsupported")
    return InputError(f"{name}: corrupt {image} ({detail})", kind="corrupt")

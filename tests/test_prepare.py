"""Tests for batchclassify.prepare: real files made with Pillow in tmp_path, decoded back."""

from __future__ import annotations

import io
import os
import re
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from images import (
    BLUE,
    GREEN,
    ORIENTATION,
    RED,
    WHITE,
    animated_gif,
    close_to,
    encode,
    grey16_png,
    half_transparent,
    oriented_jpeg,
    palette_with_transparency,
    photo,
    png_claiming,
    quadrants,
    raw_png,
    save,
    solid,
)
from PIL import Image, ImageOps

from batchclassify import prepare
from batchclassify.errors import ConfigError, InputError
from batchclassify.prepare import (
    PreparedImage,
    PrepareOptions,
    default_workers,
    prepare_bytes,
    prepare_file,
)

DEFAULT = PrepareOptions()


def header(path: Path) -> Image.Image:
    """The file as Pillow opens it (header only; the file is closed again)."""
    with Image.open(path) as image:
        return image


def decode(prepared: PreparedImage) -> Image.Image:
    """The uploaded bytes, decoded: checks they really are what ``prepared`` claims."""
    image = Image.open(io.BytesIO(prepared.data))
    assert image.format == prepared.format
    assert image.size == (prepared.width, prepared.height)
    image.load()
    return image


def assert_converted_jpeg(prepared: PreparedImage, size: tuple[int, int]) -> Image.Image:
    assert prepared.converted
    assert prepared.format == "JPEG"
    image = decode(prepared)
    assert image.mode == "RGB"
    assert image.size == size
    return image


def assert_quadrants(image: Image.Image) -> None:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    w, h = image.size
    spots = {(w // 4, h // 4): RED, (3 * w // 4, h // 4): GREEN}
    spots |= {(w // 4, 3 * h // 4): BLUE, (3 * w // 4, 3 * h // 4): WHITE}
    for xy, colour in spots.items():
        assert close_to(image.getpixel(xy), colour), (xy, image.getpixel(xy), colour)


def kind_of(path: Path, options: PrepareOptions = DEFAULT) -> str:
    with pytest.raises(InputError) as info:
        prepare_file(path, options)
    assert str(path.parent) not in str(info.value)  # a short message, not a dump
    return info.value.kind


# --- passthrough -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L"), ("WEBP", "RGB"), ("BMP", "RGB")],
)
def test_service_formats_pass_through_untouched(tmp_path: Path, fmt: str, mode: str) -> None:
    path = save(photo((120, 80)).convert(mode), tmp_path / f"a.{fmt.lower()}", fmt)
    prepared = prepare_file(path, DEFAULT)
    assert prepared.data == path.read_bytes()
    assert not prepared.converted
    assert (prepared.format, prepared.width, prepared.height) == (fmt, 120, 80)
    assert prepared.original_bytes == path.stat().st_size


def test_mpo_passes_through_as_jpeg(tmp_path: Path) -> None:
    path = save(
        photo((64, 48)),
        tmp_path / "a.jpg",
        "MPO",
        save_all=True,
        append_images=[photo((64, 48), 1)],
    )
    assert header(path).format == "MPO"
    prepared = prepare_file(path, DEFAULT)
    assert prepared.data == path.read_bytes()
    assert prepared.format == "JPEG"


def test_small_enough_passes_through_with_max_size(tmp_path: Path) -> None:
    path = save(photo((200, 100)), tmp_path / "a.jpg", "JPEG")
    prepared = prepare_file(path, PrepareOptions(max_size=200))
    assert prepared.data == path.read_bytes()
    assert not prepared.converted


def test_trailing_data_after_jpeg_end_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "motion.jpg"
    path.write_bytes(encode(photo((64, 48)), "JPEG") + b"ftypmp42" + os.urandom(2000))
    assert not prepare_file(path, DEFAULT).converted


@pytest.mark.parametrize(
    "exif",
    [b"Exif\x00\x00garbage", b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00"],
    ids=["garbage", "cut-short"],
)
def test_corrupt_exif_is_ignored_quietly(tmp_path: Path, exif: bytes) -> None:
    path = save(photo((40, 30)), tmp_path / "a.jpg", "JPEG", exif=exif)
    assert prepare_file(path, DEFAULT).data == path.read_bytes()  # no warning escapes either
    assert_converted_jpeg(prepare_file(path, PrepareOptions(max_size=20)), (20, 15))


def test_prepare_bytes_is_prepare_file_without_the_file() -> None:
    data = encode(photo((50, 40)), "PNG")
    prepared = prepare_bytes(data, DEFAULT, name="x.png")
    assert prepared.data == data
    with pytest.raises(InputError, match=r"^x\.png: ") as info:
        prepare_bytes(b"hello", DEFAULT, name="x.png")
    assert info.value.kind == "not_an_image"


# --- conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [3, 6, 8, 5])
@pytest.mark.parametrize("max_size", [None, 50])
def test_exif_orientation_is_applied(
    tmp_path: Path, orientation: int, max_size: int | None
) -> None:
    path = oriented_jpeg(tmp_path / "turned.jpg", quadrants((160, 100)), orientation)
    with Image.open(path) as stored:  # the generator is right
        assert ImageOps.exif_transpose(stored).size == (160, 100)
    prepared = prepare_file(path, PrepareOptions(max_size=max_size))
    image = assert_converted_jpeg(prepared, (160, 100) if max_size is None else (50, 31))
    assert_quadrants(image)
    assert ORIENTATION not in image.getexif()


def test_cmyk_jpeg_is_converted(tmp_path: Path) -> None:
    path = save(solid((40, 30), BLUE).convert("CMYK"), tmp_path / "cmyk.jpg", "JPEG")
    image = assert_converted_jpeg(prepare_file(path, DEFAULT), (40, 30))
    assert close_to(image.getpixel((20, 15)), BLUE)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = grey16_png(tmp_path / "deep.png", (30, 20), 32768)
    assert header(path).mode == "I;16"
    image = assert_converted_jpeg(prepare_file(path, DEFAULT), (30, 20))
    assert close_to(image.getpixel((15, 10)), (128, 128, 128), 3)


def test_16_bit_rgb_png_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    path.write_bytes(raw_png((30, 20), 16, 2, b"\xff\xff\x00\x00\x00\x00"))
    assert header(path).mode == "RGB"  # looks like 8-bit: only the header says otherwise
    image = assert_converted_jpeg(prepare_file(path, DEFAULT), (30, 20))
    assert close_to(image.getpixel((15, 10)), RED)


@pytest.mark.parametrize(
    ("make", "right"),
    [
        (palette_with_transparency, RED),
        (half_transparent, RED),
        (lambda size: half_transparent(size, "LA"), (128, 128, 128)),
    ],
    ids=["P-transparency", "RGBA", "LA"],
)
def test_transparency_is_flattened_onto_white(
    tmp_path: Path, make: Callable[[tuple[int, int]], Image.Image], right: tuple[int, ...]
) -> None:
    path = save(make((60, 40)), tmp_path / "alpha.png", "PNG")
    for options in (DEFAULT, PrepareOptions(max_size=30)):
        image = decode(prepare_file(path, options))
        w, h = image.size
        assert image.mode == "RGB"
        assert close_to(image.getpixel((w // 4, h // 2)), WHITE)
        assert close_to(image.getpixel((3 * w // 4, h // 2)), right)


def test_rgb_png_with_a_transparent_colour_is_flattened(tmp_path: Path) -> None:
    path = save(solid((20, 10), RED), tmp_path / "key.png", "PNG", transparency=RED)
    image = assert_converted_jpeg(prepare_file(path, DEFAULT), (20, 10))
    assert close_to(image.getpixel((10, 5)), WHITE)


def test_tiff_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored = quadrants((80, 50)).transpose(Image.Transpose.ROTATE_90)
    path = save(stored, tmp_path / "turned.tiff", "TIFF", exif=exif)
    assert_quadrants(assert_converted_jpeg(prepare_file(path, DEFAULT), (80, 50)))


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    path = animated_gif(tmp_path / "anim.gif", (40, 30))
    image = assert_converted_jpeg(prepare_file(path, DEFAULT), (40, 30))
    assert close_to(image.getpixel((20, 15)), RED)


def test_animated_webp_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [solid((40, 30), RED), solid((40, 30), BLUE)]
    path = save(frames[0], tmp_path / "anim.webp", "WEBP", save_all=True, append_images=frames[1:])
    image = assert_converted_jpeg(prepare_file(path, DEFAULT), (40, 30))
    assert close_to(image.getpixel((20, 15)), RED)


@pytest.mark.parametrize(
    ("fmt", "mode"), [("TIFF", "RGB"), ("PNG", "P"), ("GIF", "P"), ("PNG", "1")]
)
def test_other_formats_and_modes_become_rgb_jpeg(tmp_path: Path, fmt: str, mode: str) -> None:
    colour = WHITE if mode == "1" else RED
    path = save(solid((50, 20), colour).convert(mode), tmp_path / f"x.{fmt.lower()}", fmt)
    image = assert_converted_jpeg(prepare_file(path, DEFAULT), (50, 20))
    assert close_to(image.getpixel((25, 10)), colour)


def test_jpeg_quality_is_used(tmp_path: Path) -> None:
    path = save(photo((400, 300)), tmp_path / "a.tiff", "TIFF")
    low = prepare_file(path, PrepareOptions(jpeg_quality=30))
    high = prepare_file(path, PrepareOptions(jpeg_quality=95))
    assert len(low.data) < len(high.data)


# --- max_size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1200, 800), (600, 400)),
        ((800, 1200), (400, 600)),
        ((3000, 7), (600, 1)),
        ((601, 601), (600, 600)),
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_max_size_downscales_exactly(
    tmp_path: Path, size: tuple[int, int], expected: tuple[int, int], fmt: str
) -> None:
    path = save(solid(size, GREEN), tmp_path / f"big.{fmt.lower()}", fmt)
    image = assert_converted_jpeg(prepare_file(path, PrepareOptions(max_size=600)), expected)
    w, h = image.size
    for xy in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), (w // 2, h // 2)]:
        assert close_to(image.getpixel(xy), GREEN), (xy, image.getpixel(xy))  # no black border


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    path = save(quadrants((4000, 3000)), tmp_path / "big.jpg", "JPEG")
    image = assert_converted_jpeg(prepare_file(path, PrepareOptions(max_size=640)), (640, 480))
    assert_quadrants(image)


def test_too_many_bytes_but_few_pixels_is_reencoded_with_max_size(tmp_path: Path) -> None:
    path = save(photo((300, 200)), tmp_path / "a.png", "PNG")
    options = PrepareOptions(max_size=1000, max_upload_bytes=path.stat().st_size)
    assert_converted_jpeg(prepare_file(path, options), (300, 200))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    max_size=st.integers(1, 320),
    fmt=st.sampled_from(["JPEG", "PNG", "GIF"]),
)
def test_max_size_property(width: int, height: int, max_size: int, fmt: str) -> None:
    data = encode(solid((width, height), BLUE), fmt)
    prepared = prepare_bytes(data, PrepareOptions(max_size=max_size), name="p")
    image = decode(prepared)
    w, h = image.size
    assert max(w, h) == min(max_size, max(width, height))
    assert abs(w * height - h * width) <= max(width, height)  # aspect kept within a pixel
    if prepared.converted:
        assert image.mode == "RGB"
        for xy in [(0, 0), (w - 1, h - 1), (w // 2, h // 2)]:
            assert close_to(image.getpixel(xy), BLUE, 60)
    else:
        assert prepared.data == data


# --- failures --------------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    assert kind_of(path) == "empty"
    with pytest.raises(InputError, match="empty"):
        prepare_bytes(b"", DEFAULT, name="e")


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("not a picture\n")
    assert kind_of(path) == "not_an_image"


def test_missing_file(tmp_path: Path) -> None:
    assert kind_of(tmp_path / "nope.jpg") == "not_found"


def test_broken_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(InputError, match="broken symbolic link") as info:
        prepare_file(link, DEFAULT)
    assert info.value.kind == "not_found"


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    assert kind_of(tmp_path / "dir.jpg") == "not_a_file"


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    assert kind_of(tmp_path / "pipe.jpg") == "not_a_file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = save(photo((10, 10)), tmp_path / "secret.jpg", "JPEG")
    path.chmod(0)
    try:
        assert kind_of(path) == "unreadable"
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_files(tmp_path: Path, fmt: str, keep: float) -> None:
    data = encode(photo((200, 150)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    assert kind_of(path) == "truncated"


@pytest.mark.parametrize("cut", [1, 2, 12])
def test_missing_end_marker_is_truncated(tmp_path: Path, cut: int) -> None:
    for fmt in ("JPEG", "PNG"):
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(encode(photo((50, 40)), fmt)[:-cut])
        assert kind_of(path) == "truncated", fmt


@pytest.mark.parametrize("size", [(20_000, 20_000), (10_000, 10_000)], ids=["error", "warning"])
def test_decompression_bomb_header(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(size))
    assert kind_of(path) == "decompression_bomb"
    assert kind_of(path, PrepareOptions(max_size=640)) == "decompression_bomb"


def test_max_pixels_can_be_lowered(tmp_path: Path) -> None:
    path = save(photo((300, 200)), tmp_path / "a.jpg", "JPEG")
    assert kind_of(path, PrepareOptions(max_pixels=50_000)) == "decompression_bomb"
    assert prepare_file(path, PrepareOptions(max_pixels=60_000)).width == 300


def test_over_the_upload_limit(tmp_path: Path) -> None:
    path = save(photo((300, 200)), tmp_path / "a.jpg", "JPEG")
    size = path.stat().st_size
    with pytest.raises(InputError, match="--max-size") as info:
        prepare_file(path, PrepareOptions(max_upload_bytes=size))  # base64 is 4/3 of it
    assert info.value.kind == "too_large"
    assert not prepare_file(path, PrepareOptions(max_upload_bytes=size * 4 // 3 + 4)).converted
    shrunk = prepare_file(path, PrepareOptions(max_upload_bytes=size, max_size=150))
    assert_converted_jpeg(shrunk, (150, 100))


def test_absurdly_large_file_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(photo((30, 20)), tmp_path / "a.jpg", "JPEG")
    monkeypatch.setattr(prepare, "MAX_FILE_BYTES", 100)
    assert kind_of(path, PrepareOptions(max_size=10)) == "too_large"
    with pytest.raises(InputError, match="far too large"):
        prepare_bytes(path.read_bytes(), DEFAULT, name="a.jpg")


def test_converted_output_over_the_limit(tmp_path: Path) -> None:
    path = save(photo((300, 200)), tmp_path / "a.tiff", "TIFF")
    assert kind_of(path, PrepareOptions(max_upload_bytes=1000)) == "too_large"


def test_threads_share_the_warning_filters_safely(tmp_path: Path) -> None:
    """catch_warnings is process-global: concurrent bombs and good images still sort out."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming((10_000, 10_000)))  # only a warning for Pillow
    good = save(photo((64, 48)), tmp_path / "good.jpg", "JPEG")

    def kind(path: Path) -> str:
        try:
            return prepare_file(path, PrepareOptions(max_size=32)).format
        except InputError as exc:
            return exc.kind

    with ThreadPoolExecutor(4) as pool:
        kinds = list(pool.map(kind, [bomb, good] * 50))
    assert kinds == ["decompression_bomb", "JPEG"] * 50


def test_bad_options_are_config_errors() -> None:
    for bad in ({"max_size": 0}, {"jpeg_quality": 0}, {"max_upload_bytes": 0}, {"max_pixels": 0}):
        with pytest.raises(ConfigError):
            PrepareOptions(**bad)


def test_default_workers() -> None:
    assert 1 <= default_workers() <= (os.cpu_count() or 1)


_DOUBLED_WORD = re.compile(r"\b(\w+) \1\b", re.IGNORECASE)


def _broken_files(root: Path) -> list[tuple[Path, PrepareOptions]]:
    """One file (and the options to prepare it with) for each way an input can fail."""
    root.mkdir()
    made: list[tuple[Path, PrepareOptions]] = []

    def add(name: str, data: bytes, options: PrepareOptions = DEFAULT) -> None:
        (root / name).write_bytes(data)
        made.append((root / name, options))

    add("empty.jpg", b"")
    add("notes.jpg", b"not a picture\n")
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"):
        data = encode(photo((120, 90)), fmt)
        add(f"cut.{fmt.lower()}", data[: len(data) // 2])
    bmp = bytearray(encode(photo((20, 10)), "BMP"))
    struct.pack_into("<H", bmp, 28, 7)  # 7 bits per pixel: Image.open itself fails
    add("depth.bmp", bytes(bmp))
    gif = bytearray(encode(photo((60, 40)), "GIF"))
    gif[len(gif) // 2 : len(gif) // 2 + 64] = bytes(range(64))  # broken LZW data
    add("scrambled.gif", bytes(gif))
    tiff = bytearray(encode(photo((60, 40)), "TIFF", compression="tiff_adobe_deflate"))
    tiff[40:200] = bytes(160)  # broken deflate data: libtiff fails to decode
    add("scrambled.tiff", bytes(tiff))
    add("bomb.png", png_claiming((20_000, 20_000)))
    add("big.jpg", encode(photo((300, 200)), "JPEG"), PrepareOptions(max_upload_bytes=1000))
    add("tiny-limit.tiff", encode(photo((300, 200)), "TIFF"), PrepareOptions(max_upload_bytes=99))
    (root / "dir.jpg").mkdir()
    (root / "link.jpg").symlink_to(root / "gone.jpg")
    os.mkfifo(root / "pipe.jpg")
    made += [(root / name, DEFAULT) for name in ("dir.jpg", "link.jpg", "pipe.jpg", "nope.jpg")]
    return made


def test_no_message_repeats_a_word(tmp_path: Path) -> None:
    """User testing found "corrupt image image (...)": every message reads as a sentence."""
    kinds: dict[str, str] = {}
    for path, options in _broken_files(tmp_path / "broken"):
        with pytest.raises(InputError) as info:
            prepare_file(path, options)
        message = str(info.value)
        assert not _DOUBLED_WORD.search(message), message
        kinds[path.name] = info.value.kind
    assert kinds["depth.bmp"] == "corrupt"  # the header is broken: no format to name
    assert kinds["scrambled.gif"] == "corrupt" and kinds["scrambled.tiff"] == "corrupt"
    assert kinds["cut.png"] == "truncated" and kinds["bomb.png"] == "decompression_bomb"
    assert {"empty", "not_an_image", "not_found", "not_a_file", "too_large"} <= set(kinds.values())
    with pytest.raises(InputError, match=r"corrupt image \(") as info:
        prepare_bytes((tmp_path / "broken" / "depth.bmp").read_bytes(), DEFAULT, name="d.bmp")
    assert not _DOUBLED_WORD.search(str(info.value))


# --- hostile metadata: refused from a cheap walk of the structure, before Pillow parses it ----

_KB = 1024
_MB = 1024 * 1024
FULL_SEGMENT = 65533  # the largest JPEG segment payload
EXIF_START = b"Exif\x00\x00"


def segment(marker: int, payload: bytes = b"") -> bytes:
    """A JPEG marker segment: FF, marker, 2-byte big-endian length (counting itself), payload."""
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def jpeg_with(*segments: bytes) -> bytes:
    """A real small JPEG with ``segments`` inserted right after SOI (before its own JFIF)."""
    data = encode(photo((64, 48)), "JPEG")
    return data[:2] + b"".join(segments) + data[2:]


def sparse_jpeg(path: Path, count: int, marker: int = 0xE1, start: bytes = EXIF_START) -> Path:
    """:func:`jpeg_with` ``count`` full-size segments written straight to ``path``; their
    payloads after ``start`` are holes, so 100 MB of metadata takes little disk."""
    data = encode(photo((64, 48)), "JPEG")
    with path.open("wb") as out:
        out.write(data[:2])
        for _ in range(count):
            out.write(bytes([0xFF, marker]) + (FULL_SEGMENT + 2).to_bytes(2, "big") + start)
            out.seek(FULL_SEGMENT - len(start), os.SEEK_CUR)
        out.write(data[2:])
    return path


def chunk(kind: bytes, payload: bytes = b"") -> bytes:
    """A PNG chunk: length, type, payload, CRC."""
    crc = zlib.crc32(kind + payload).to_bytes(4, "big")
    return len(payload).to_bytes(4, "big") + kind + payload + crc


def png_with(*chunks: bytes, after_image: bool = False) -> bytes:
    """A real small PNG with ``chunks`` right after IHDR (or, ``after_image``, before IEND)."""
    data = encode(photo((64, 48)), "PNG")
    at = data.index(b"IEND") - 4 if after_image else 8 + 25  # signature, IHDR chunk
    return data[:at] + b"".join(chunks) + data[at:]


def gif_with(extension: bytes) -> bytes:
    """A real small GIF with ``extension`` before its image descriptor."""
    data = encode(solid((40, 30), RED).convert("P"), "GIF")
    flags = data[10]
    at = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0)  # after the global palette
    return data[:at] + extension + data[at:]


def gif_comment(*blocks: bytes) -> bytes:
    """A GIF comment extension made of the given sub-blocks (each at most 255 bytes)."""
    return b"!\xfe" + b"".join(bytes([len(block)]) + block for block in blocks) + b"\x00"


@pytest.fixture
def pillow_opens(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every file ``Image.open`` is asked to parse during the test."""
    calls: list[object] = []
    real_open = Image.open

    def spy(fp: object, *args: object, **kwargs: object) -> object:
        calls.append(fp)
        return real_open(fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    return calls


def refusal(path: Path, options: PrepareOptions = DEFAULT) -> InputError:
    """The error for ``path``, which must be the same when its bytes come from a download."""
    with pytest.raises(InputError) as from_file:
        prepare_file(path, options)
    with pytest.raises(InputError) as from_bytes:
        prepare_bytes(path.read_bytes(), options, name=path.name)
    assert (from_bytes.value.kind, str(from_bytes.value)) == (
        from_file.value.kind,
        str(from_file.value),
    )
    return from_file.value


@pytest.mark.parametrize("options", [DEFAULT, PrepareOptions(max_size=640)], ids=["keep", "shrink"])
def test_100_mb_of_exif_is_refused_before_reading_or_parsing(
    tmp_path: Path, options: PrepareOptions, pillow_opens: list[object]
) -> None:
    """The case found on main: 48 s and 560 MB inside Image.open before the size check."""
    path = sparse_jpeg(tmp_path / "big.jpg", 1600)
    assert path.stat().st_size > 100 * 1000 * 1000
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as info:
            prepare_file(path, options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.kind == "too_large"
    assert str(info.value) == (
        "big.jpg: 100.0 MB of metadata in 1601 JPEG APPn/COM segments, over the 16.0 MB limit; "
        "not parsed"
    )
    assert pillow_opens == []
    assert peak < 2 * _MB  # the header walk's few small reads, not the 100 MB file


@pytest.mark.parametrize("marker", [0xE1, 0xE2, 0xED, 0xFE], ids=["APP1", "APP2", "APP13", "COM"])
def test_more_jpeg_metadata_than_the_limit_is_refused(
    tmp_path: Path, marker: int, pillow_opens: list[object]
) -> None:
    count = prepare.MAX_METADATA_BYTES // FULL_SEGMENT + 1  # just over, in full-size segments
    path = sparse_jpeg(tmp_path / "meta.jpg", count, marker, start=b"")
    for options in (DEFAULT, PrepareOptions(max_size=640)):
        error = refusal(path, options)
        assert error.kind == "too_large"
        assert f"16.1 MB of metadata in {count + 1} JPEG APPn/COM segments" in str(error)
    assert pillow_opens == []


def test_exif_over_its_own_limit_is_refused(tmp_path: Path) -> None:
    """Pillow joins EXIF segments one by one (quadratic); the standard allows one of 64 KB."""
    count = prepare.MAX_EXIF_BYTES // FULL_SEGMENT + 1
    path = sparse_jpeg(tmp_path / "exif.jpg", count)
    error = refusal(path, PrepareOptions(max_size=640))
    assert error.kind == "too_large"
    assert f"of EXIF data in {count} APP1 segments, over the 1.0 MB limit" in str(error)


@pytest.mark.parametrize(
    "prefix",
    [b"", b"\xff\xd8", b"\xff\xf0", b"\xff\xff\xff"],
    ids=["plain", "after-SOI", "after-JPG0", "after-fill-bytes"],
)
def test_thousands_of_empty_jpeg_segments_are_refused(tmp_path: Path, prefix: bytes) -> None:
    """Tiny but 5000 of them (Pillow: ~1.5 µs each). Pillow reads no length after SOI or JPG0:
    neither may the walk, or it could be steered past the segments that follow."""
    path = tmp_path / "many.jpg"
    path.write_bytes(jpeg_with(prefix, *[segment(0xE5)] * 5000))
    assert path.stat().st_size < 25 * _KB
    error = refusal(path, PrepareOptions(max_size=640))
    assert error.kind == "corrupt"
    assert "more than 4096 JPEG APPn/COM segments" in str(error)


@pytest.mark.parametrize(
    "table",
    [
        segment(0xDB, (b"\x00" + bytes(range(1, 65))) * 1008),  # DQT: 1008 quantization tables
        segment(0xC0, b"\x08\x00\x30\x00\x40\x03" + b"\x01\x11\x00" * 21_000),  # SOF0
    ],
    ids=["DQT", "SOF"],
)
def test_oversized_jpeg_coding_tables_are_refused(tmp_path: Path, table: bytes) -> None:
    """Pillow parses DQT and SOF in Python; 1600 such segments took it 3-13 s (and 3 GB)."""
    path = tmp_path / "tables.jpg"
    path.write_bytes(jpeg_with(table, table))
    error = refusal(path, PrepareOptions(max_size=640))
    assert error.kind == "too_large"
    assert "of coding tables in" in str(error)
    assert "over the 64.0 KB limit" in str(error)


def test_ordinary_metadata_still_passes(tmp_path: Path, pillow_opens: list[object]) -> None:
    """EXIF with an orientation tag, a 1 MB ICC profile (17 APP2 segments), 60 KB of XMP."""
    exif = Image.Exif()
    exif[ORIENTATION] = 1
    exif[0x010F] = "Camera maker"
    exif[0x0132] = "2024:05:01 12:00:00"
    path = save(
        photo((120, 80)),
        tmp_path / "camera.jpg",
        "JPEG",
        exif=exif,
        icc_profile=os.urandom(_MB),
        xmp=b"<x:xmpmeta>" + b" " * (60 * _KB) + b"</x:xmpmeta>",
    )
    with Image.open(path) as stored:
        assert len([1 for kind, _ in stored.applist if kind == "APP2"]) == 17
    pillow_opens.clear()
    prepared = prepare_file(path, DEFAULT)
    assert prepared.data == path.read_bytes()
    assert not prepared.converted
    assert len(pillow_opens) == 1
    assert_converted_jpeg(prepare_file(path, PrepareOptions(max_size=60)), (60, 40))


def test_exif_just_under_its_limit_still_passes(tmp_path: Path) -> None:
    path = sparse_jpeg(tmp_path / "exif.jpg", prepare.MAX_EXIF_BYTES // FULL_SEGMENT - 1)
    assert_converted_jpeg(prepare_file(path, PrepareOptions(max_size=32)), (32, 24))


@pytest.mark.parametrize(
    ("chunks", "after_image"),
    [
        ([chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08" + bytes(17 * _MB))], False),
        ([chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08" + bytes(17 * _MB))], True),
        ([chunk(b"tEXt", b"Comment\x00" + b"a" * (17 * _MB))], False),
        ([chunk(b"prVt", bytes(60_000))] * 300, True),
    ],
    ids=["eXIf", "eXIf-after-image-data", "tEXt", "private-chunks-after-image-data"],
)
def test_more_png_metadata_than_the_limit_is_refused(
    tmp_path: Path, chunks: list[bytes], after_image: bool, pillow_opens: list[object]
) -> None:
    path = tmp_path / "meta.png"
    path.write_bytes(png_with(*chunks, after_image=after_image))
    for options in (DEFAULT, PrepareOptions(max_size=32)):
        error = refusal(path, options)
        assert error.kind == "too_large"
        assert "MB of metadata in" in str(error)
        assert "PNG chunks besides image data, over the 16.0 MB limit" in str(error)
    assert pillow_opens == []


def test_thousands_of_empty_png_chunks_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "many.png"
    path.write_bytes(png_with(*[chunk(b"prVt")] * 5000))
    error = refusal(path)
    assert error.kind == "corrupt"
    assert "more than 4096 PNG chunks besides image data" in str(error)


@pytest.mark.parametrize(
    "make",
    [
        lambda z: chunk(b"iCCP", b"profile\x00\x00" + z),
        lambda z: chunk(b"zTXt", b"\x00\x00" + z),  # no keyword: Pillow counts no text memory
        lambda z: chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + z),  # not UTF-8: not counted either
    ],
    ids=["iCCP", "zTXt-without-keyword", "iTXt-not-utf8"],
)
def test_many_small_chunks_that_inflate_are_refused(
    tmp_path: Path, make: Callable[[bytes], bytes]
) -> None:
    """Each inflates to 1 MiB (Pillow's MAX_TEXT_CHUNK) but escapes its MAX_TEXT_MEMORY: 4000 of
    them, 4 MB of file, took Pillow 8-14 s."""
    inflates = zlib.compress(b"\xff" * (_MB - 1), 9)
    path = tmp_path / "inflate.png"
    path.write_bytes(png_with(*[make(inflates)] * 100))
    assert path.stat().st_size < 200 * _KB
    error = refusal(path)
    assert error.kind == "corrupt"
    assert "more than 64 compressed PNG chunks" in str(error)


def test_pillows_own_png_text_limit_still_applies(tmp_path: Path) -> None:
    """One zTXt chunk inflating past MAX_TEXT_CHUNK: Pillow stops inflating and raises."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with(chunk(b"zTXt", b"k\x00\x00" + zlib.compress(bytes(8 * _MB), 9))))
    assert path.stat().st_size < 20 * _KB
    assert kind_of(path) == "corrupt"


def test_thousands_of_empty_idat_chunks_are_refused(tmp_path: Path) -> None:
    """Pillow fetches each IDAT chunk in Python while decoding (a million: 0.9 s)."""
    data = encode(photo((64, 48)), "PNG")
    first = data.index(b"IDAT") - 4
    path = tmp_path / "idat.png"
    path.write_bytes(data[:first] + chunk(b"IDAT") * 140_000 + data[first:])
    error = refusal(path, PrepareOptions(max_size=32))
    assert error.kind == "corrupt"
    assert "more than 131072 PNG image data chunks" in str(error)


def test_gif_comment_in_thousands_of_sub_blocks_is_refused(tmp_path: Path) -> None:
    """Pillow keeps each sub-block as a bytes object: 10 MB in 1-byte blocks took 450 MB."""
    path = tmp_path / "comment.gif"
    path.write_bytes(gif_with(gif_comment(*[b"a"] * 70_000)))
    error = refusal(path)
    assert error.kind == "corrupt"
    assert "more than 65536 GIF extension sub-blocks" in str(error)


def test_gif_with_a_long_comment_still_converts(tmp_path: Path) -> None:
    """Pillow copied a GIF's comment into the JPEG it wrote, and refused one over 64 KB."""
    path = tmp_path / "comment.gif"
    path.write_bytes(gif_with(gif_comment(*[b"a" * 255] * 400)))  # 100 KB
    image = assert_converted_jpeg(prepare_file(path, DEFAULT), (40, 30))
    assert "comment" not in image.info


def test_webp_with_more_metadata_than_the_limit_is_refused(
    tmp_path: Path, pillow_opens: list[object]
) -> None:
    """libwebp parses in C, but Pillow copies the file and each chunk: 100 MB of EXIF, 400 MB."""
    path = save(photo((40, 30)), tmp_path / "a.webp", "WEBP", exif=EXIF_START + bytes(17 * _MB))
    error = refusal(path, PrepareOptions(max_size=32))
    assert error.kind == "too_large"
    assert "MB of metadata in 1 WebP metadata chunks, over the 16.0 MB limit" in str(error)
    assert pillow_opens == []


def test_size_alone_does_not_refuse_what_re_encoding_can_shrink(tmp_path: Path) -> None:
    """Without max_size, a file over the upload limit that is not sent as it is gets converted."""
    path = save(solid((300, 200), BLUE), tmp_path / "raw.tiff", "TIFF")
    options = PrepareOptions(max_upload_bytes=path.stat().st_size // 10)
    assert_converted_jpeg(prepare_file(path, options), (300, 200))


def test_reading_stops_at_the_limit_even_if_the_file_grows() -> None:
    """fstat() said 10 bytes, but the file grew meanwhile: at most limit + 1 bytes are read."""
    assert prepare._read_at_most(io.BytesIO(b"x" * 10), 10, 50) == b"x" * 10
    assert prepare._read_at_most(io.BytesIO(b"x" * 30), 10, 50) == b"x" * 30
    assert prepare._read_at_most(io.BytesIO(b"x" * 10**6), 10, 50) == b"x" * 51
    assert prepare._read_at_most(io.BytesIO(b"x" * 5), 10, 50) == b"x" * 5  # it shrank

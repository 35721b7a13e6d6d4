"""Tests for batchclassify.prepare: real files made with Pillow in tmp_path, decoded back."""

from __future__ import annotations

import io
import os
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

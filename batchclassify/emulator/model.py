"""The emulator's "model": deterministic, plausible scores from image bytes, and the answer shapes.

Scores are a function of the image *file*: the sha256 of its bytes plus its size in pixels, which
is read from the header (complete JPEG and still PNG files are parsed here without decoding any
pixel; other formats, animated PNGs and files that look incomplete are decoded by Pillow, so that
broken images still fail). So an
answer costs a few microseconds whatever the image, is stable across processes and runs, and a
test can compute it with :func:`predict` and no HTTP at all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import operator
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image

from batchclassify.emulator.config import DEFAULT_CLASSES, DEFAULT_CONFIDENCE, MultiLabelCompare
from batchclassify.errors import InputError

__all__ = [
    "CONFIDENCE_FLOOR",
    "KEYWORD_CONFIDENCE",
    "ImageAnalysis",
    "analyze_image",
    "analyze_with_digest",
    "class_scores",
    "decode_base64_payload",
    "json_confidence",
    "parse_confidence",
    "predict",
    "shape_response",
]

#: the lowest threshold the server applies on its legacy route (lower values are raised to it)
CONFIDENCE_FLOOR = 0.01
#: what ``confidence=best`` and ``confidence=default`` mean for the emulator's model (it has no
#: evaluation to take F1-optimal thresholds from; the server gives 0.5 for single-label models)
KEYWORD_CONFIDENCE = 0.5
_CONFIDENCE_KEYWORDS = ("best", "default")

# JPEG draft mode decodes at 1/2..1/8 scale straight from the DCT: enough to prove that a file
# the header parsers below could not vouch for decodes at all, at a fraction of the cost.
_DRAFT_SIZE = (32, 32)
# How many bytes of the content digest become features (each roughly uniform in [-1, 1]).
_HASHED_FEATURES = 12
# Scales chosen so that over varied images the top softmax score ranges from ~0.3 (unsure) to
# ~0.95 (confident), and multi-label images get zero, one or several classes over 0.4.
_SOFTMAX_GAIN = 7.0
_SIGMOID_GAIN = 3.0
_SIGMOID_OFFSET = -1.0

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An IEND chunk: zero length, type, CRC. Its presence is what "the PNG is complete" means here.
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS = 0xDA


# ---------------------------------------------------------------------------------------------
# payloads


def decode_base64_payload(body: bytes) -> bytes:
    """Turn a request body into image bytes, the way a lenient server does.

    Tolerates surrounding whitespace, embedded newlines (MIME-style line wrapping) and a
    ``data:image/...;base64,`` prefix. Raises :class:`InputError` for an empty payload, a raw
    binary body (the file's bytes sent as they are) or invalid base64, which the server
    answers with 400.
    """
    data = body.strip()
    if data[:5].lower() == b"data:":
        comma = data.find(b",", 0, 256)
        if comma < 0:
            raise InputError("malformed data: URL (no comma before the base64 data)")
        data = data[comma + 1 :].strip()
    if not data:
        raise InputError("empty payload")
    if not data.isascii():
        raise InputError(
            "the body is raw binary, not base64 text: send the image base64-encoded, or as "
            "multipart/form-data with a part named 'file'"
        )
    try:
        # Non-validating decode skips characters outside the alphabet (newlines), like the
        # service; padding errors still raise.
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError) as exc:
        raise InputError(f"invalid base64 payload ({exc})") from exc
    if not raw:
        raise InputError("empty payload (no base64 data)")
    return raw


# ---------------------------------------------------------------------------------------------
# analysis


@dataclass(frozen=True, slots=True)
class ImageAnalysis:
    """What the emulator's model sees of one image: its size and a feature vector."""

    width: int
    height: int
    #: roughly in [-1, 1] each: the aspect ratio, the pixel count and bytes of the sha256 of the
    #: file; never depends on the process, PYTHONHASHSEED or the emulator's seed
    features: tuple[float, ...]


def analyze_image(image_bytes: bytes) -> ImageAnalysis:
    """Check that ``image_bytes`` are an image and compute the features the model scores.

    A complete JPEG or PNG costs a header parse (a few microseconds, no pixel decoded); other
    formats (animated PNGs included), and JPEG/PNG files that look truncated, are opened and
    decoded by Pillow (JPEG in draft mode). Any failure (not an image, truncated,
    decompression bomb, unknown mode) raises :class:`InputError`: the data is untrusted, so
    every exception is a bad input.
    """
    return analyze_with_digest(image_bytes, hashlib.sha256(image_bytes).digest())


def analyze_with_digest(image_bytes: bytes, digest: bytes) -> ImageAnalysis:
    """:func:`analyze_image` for a caller that already has the sha256 ``digest`` of the bytes."""
    if not image_bytes:
        raise InputError("empty payload")
    size = _header_size(image_bytes)
    if size is None:
        size = _decoded_size(image_bytes)
    width, height = size
    return ImageAnalysis(width=width, height=height, features=_features(digest, width, height))


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a complete JPEG or PNG from its header, else None (ask Pillow)."""
    try:
        if data.startswith(_JPEG_SOI):
            size = _jpeg_size(data)
        elif data.startswith(_PNG_SIGNATURE):
            size = _png_size(data)
        else:
            return None
    except IndexError:  # pragma: no cover - the parsers check bounds; belt and braces
        return None
    if size is None or size[0] < 1 or size[1] < 1:
        return None
    _check_pixels(*size)
    return size


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # Walk the marker segments to the first start-of-scan, remembering the frame size. The
    # entropy-coded data after it never holds FF D9 (a 0xFF there is followed by 00 or a
    # restart marker), so an end-of-image marker after the scan means the file is complete.
    end = len(data)
    pos = 2
    size: tuple[int, int] | None = None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if length < 8 or pos + 9 > end:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            size = (width, height)
        elif marker == _JPEG_SOS:
            if size is None or data.find(_JPEG_EOI, pos + 2 + length) < 0:
                return None
            return size
        pos += 2 + length
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 33 or data[12:16] != b"IHDR" or data.find(_PNG_END, 33) < 0:
        return None
    # An animation control chunk before the image data: an APNG, which Pillow checks frame
    # by frame (it is an animated format, like GIF).
    first_data = data.find(b"IDAT", 33)
    if first_data < 0 or data.find(b"acTL", 33, first_data) >= 0:
        return None
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    return width, height


def _decoded_size(data: bytes) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            _check_pixels(width, height)
            image.draft("RGB", _DRAFT_SIZE)
            image.load()
    except InputError:
        raise
    except Exception as exc:  # untrusted bytes: any decoder failure means "not an image"
        raise InputError(f"{type(exc).__name__}: {exc}") from exc
    return width, height


def _check_pixels(width: int, height: int) -> None:
    # Pillow only *warns* between its limit and twice it; refuse consistently instead of
    # decoding (or vouching for) a 100-megapixel image in a test server.
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise InputError(
            f"DecompressionBombError: image too large to decode ({width}x{height} = "
            f"{width * height} pixels, limit {limit})"
        )


def _features(digest: bytes, width: int, height: int) -> tuple[float, ...]:
    # Every feature is roughly centred on 0 over typical images, so no class wins by default.
    aspect = math.tanh(math.log(width / height))
    area = math.tanh(math.log(width * height / 65536.0) / 4.0)
    return (aspect, area, *(b / 127.5 - 1.0 for b in digest[:_HASHED_FEATURES]))


# ---------------------------------------------------------------------------------------------
# scores


@lru_cache(maxsize=4096)
def _class_weights(name: str) -> tuple[float, ...]:
    # One weight per feature, from a hash of the class name: stable everywhere, and a class
    # keeps its behaviour when other classes are added or reordered.
    digest = hashlib.sha256(f"batchclassify-emulator:{name}".encode()).digest()
    return tuple(b / 127.5 - 1.0 for b in digest)


def _logits(features: Sequence[float], classes: Sequence[str]) -> list[float]:
    norm = 1.0 / math.sqrt(len(features))
    # map() stops at the shorter sequence: a class has 32 weights, more than there are features
    return [sum(map(operator.mul, _class_weights(name), features)) * norm for name in classes]


def class_scores(
    analysis: ImageAnalysis, *, classes: Sequence[str], multi_label: bool
) -> list[float]:
    """Raw (unrounded) per-class confidences, in class order.

    Single-label: a softmax over all classes (they sum to 1). Multi-label: independent
    sigmoids, as a multi-label model's heads are.
    """
    logits = _logits(analysis.features, classes)
    if multi_label:
        return [1.0 / (1.0 + math.exp(-(_SIGMOID_GAIN * x + _SIGMOID_OFFSET))) for x in logits]
    scaled = [_SOFTMAX_GAIN * x for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


# ---------------------------------------------------------------------------------------------
# answers


def shape_response(
    scores: Sequence[float],
    *,
    classes: Sequence[str],
    multi_label: bool,
    confidence: float,
    width: int,
    height: int,
    elapsed: float,
    inference_id: str,
    multi_label_compare: MultiLabelCompare = "ge",
) -> dict[str, Any]:
    """Build the JSON body the service sends, key order included.

    Single-label: classes whose raw score is >= the threshold, sorted by score (ties in
    class_id order), confidences rounded to 4 places *after* the threshold test; ``top`` is the
    best of them, or ``""`` with confidence 0.0 when none passed. Multi-label: every class with
    its unrounded score, and ``predicted_classes`` those >= the threshold (``"ge"``, the
    server's newer default path) or > it (``"gt"``, its older path).
    """
    image = {"width": width, "height": height}
    if multi_label:
        passes = operator.ge if multi_label_compare == "ge" else operator.gt
        return {
            "time": elapsed,
            "image": image,
            "predictions": {
                name: {"confidence": score, "class_id": i}
                for i, (name, score) in enumerate(zip(classes, scores, strict=True))
            },
            "predicted_classes": [
                name
                for name, score in zip(classes, scores, strict=True)
                if passes(score, confidence)
            ],
            "inference_id": inference_id,
        }
    # sorted() is stable with reverse=True too: equal scores stay in class_id order.
    order = sorted(range(len(classes)), key=scores.__getitem__, reverse=True)
    predictions = [
        {"class": classes[i], "class_id": i, "confidence": round(scores[i], 4)}
        for i in order
        if scores[i] >= confidence
    ]
    top = predictions[0] if predictions else None
    return {
        "time": elapsed,
        "image": image,
        "predictions": predictions,
        "top": top["class"] if top else "",
        "confidence": top["confidence"] if top else 0.0,
        "inference_id": inference_id,
    }


def predict(
    image_bytes: bytes,
    *,
    classes: Sequence[str] = DEFAULT_CLASSES,
    multi_label: bool = False,
    confidence: float = DEFAULT_CONFIDENCE,
    multi_label_compare: MultiLabelCompare = "ge",
) -> dict[str, Any]:
    """The body the emulator answers for these image bytes (the decoded file, not base64).

    ``confidence`` is the threshold as the server applies it (already converted from percent
    and raised to the floor: see :func:`parse_confidence`). ``time`` and ``inference_id`` (see
    ``VOLATILE_KEYS``) differ per call; everything else equals the server's answer. Raises
    :class:`InputError` if the bytes are not an image.
    """
    started = time.perf_counter()
    analysis = analyze_image(image_bytes)
    scores = class_scores(analysis, classes=classes, multi_label=multi_label)
    return shape_response(
        scores,
        classes=classes,
        multi_label=multi_label,
        confidence=confidence,
        width=analysis.width,
        height=analysis.height,
        elapsed=time.perf_counter() - started,
        inference_id=str(uuid.uuid4()),
        multi_label_compare=multi_label_compare,
    )


def parse_confidence(raw: str | None) -> float:
    """The legacy route's ``confidence`` query parameter as the threshold the server applies.

    Absent: 0.4. ``best`` and ``default``: 0.5. A number: values >= 1 are percent (divided by
    100), values below 0.01 are raised to 0.01 (so 0, or a negative value, asks for the whole
    distribution). Raises ValueError for anything else, including an empty value and
    non-finite numbers (the server answers 422).
    """
    if raw is None:
        return DEFAULT_CONFIDENCE
    if raw in _CONFIDENCE_KEYWORDS:
        return KEYWORD_CONFIDENCE
    value = float(raw)  # ValueError for "", "abc"
    if not math.isfinite(value):
        raise ValueError(f"confidence must be a finite number, got {raw!r}")
    if value >= 1:
        value /= 100.0
    return max(value, CONFIDENCE_FLOOR)


def json_confidence(value: object) -> float:
    """The JSON route's ``confidence`` field: a number used as it is (no percent conversion,
    no floor), ``best``/``default`` (0.5), or null/absent (0.4). ValueError otherwise."""
    if value is None:
        return DEFAULT_CONFIDENCE
    if isinstance(value, str) and value in _CONFIDENCE_KEYWORDS:
        return KEYWORD_CONFIDENCE
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"confidence must be a number, 'best' or 'default', got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"confidence must be a finite number, got {value!r}")
    return float(value)

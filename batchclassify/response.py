"""The service's answers: parsed, checked against the documented shapes, and normalised.

A 200 body is untrusted: it may come from a proxy, a misconfigured server or a hostile one.
:func:`parse_answer` accepts exactly what ``shared/PROTOCOL.md`` documents and turns anything
else into a :class:`~batchclassify.errors.MalformedResponseError` saying what was wrong (the
client retries it: proxies garble bodies). So every :class:`Answer` holds finite confidences in
[0, 1], class names that are non-empty valid strings, and integer image sizes.

Both shapes become one: single-label (``predictions`` a list of ``{class, confidence}``, plus
``top``/``confidence``) and multi-label (``predictions`` a dict ``class -> {confidence}``, plus
``predicted_classes``). ``predictions`` is always a ``{class: confidence}`` map and
``top``/``confidence`` the best class for both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from batchclassify.errors import MalformedResponseError
from batchclassify.model import Result

__all__ = [
    "Answer",
    "over_threshold",
    "parse_answer",
    "parse_answers",
    "result_from_answer",
    "snippet",
]

#: the threshold the server applies when none is given
DEFAULT_THRESHOLD = 0.4
#: longest class name or inference id accepted (real ones are a few dozen characters)
MAX_NAME_LENGTH = 1024
#: largest image side accepted in ``image`` (pixels)
MAX_IMAGE_SIDE = 1 << 20
_TAG = re.compile(r"<[^>]{0,200}>")


@dataclass(frozen=True, slots=True)
class Answer:
    """A checked, normalised classify answer."""

    top: str
    confidence: float
    predicted_classes: tuple[str, ...]
    predictions: dict[str, float]
    image: dict[str, int] | None
    inference_id: str | None
    time: float | None
    multi_label: bool = False

    def thresholded(self, threshold: float | str | None) -> Answer:
        """The answer with ``predicted_classes`` recomputed from the scores: the classes scoring
        at least ``threshold`` (the best one only, for a single-label model); ``None`` means the
        server's default, 0.4. A keyword (``best``, ``default``) was applied by the server,
        whose answer is kept. ``top``/``confidence`` stay the best class whatever the threshold,
        and ``predictions`` every score the server sent."""
        if isinstance(threshold, str):
            return self
        predicted = over_threshold(
            self.predictions, self.top, self.confidence, self.multi_label, threshold
        )
        return dataclasses.replace(self, predicted_classes=predicted)


def over_threshold(
    predictions: dict[str, float],
    top: str,
    confidence: float,
    multi_label: bool,
    threshold: float | None,
) -> tuple[str, ...]:
    """The predicted classes at ``threshold`` (``None``: the server's default, 0.4): every
    class scoring at least it for a multi-label model, the best one if it does otherwise."""
    floor = DEFAULT_THRESHOLD if threshold is None else threshold
    if multi_label:
        return tuple(name for name, score in predictions.items() if score >= floor)
    return (top,) if top and confidence >= floor else ()


def parse_answer(body: bytes) -> Answer:
    """Parse and check a 200 body; raise :class:`MalformedResponseError` for anything that is
    not a documented answer (not UTF-8, not JSON, NaN, absurd nesting, wrong types, ...)."""
    return _answer(_json(body))


def parse_answers(body: bytes, count: int) -> list[Answer]:
    """Parse and check the answer to a batch of ``count`` images (``POST
    /infer/classification``): a JSON list of answers in the images' order."""
    data = _json(body)
    if not isinstance(data, list):
        _malformed(f"the answer to a batch is {_kind(data)}, not a JSON list")
    if len(data) != count:
        _malformed(f"the answer to a batch of {count} images holds {len(data)} answers")
    return [_answer(entry, f"answer {number}: ") for number, entry in enumerate(data)]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        _malformed(f"the body is not UTF-8 text: {snippet(body, 120)!r}")
    except RecursionError:
        _malformed("the body is JSON nested too deeply to be an answer")
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers with 4300+ digits
        _malformed(f"the body is not valid JSON ({exc}): {snippet(body, 120)!r}")


def _answer(data: Any, where: str = "") -> Answer:
    try:
        return _checked_answer(data)
    except MalformedResponseError as exc:
        if not where:
            raise
        raise MalformedResponseError(where + str(exc), http_status=exc.http_status) from None


def _checked_answer(data: Any) -> Answer:
    if not isinstance(data, dict):
        _malformed(f"the answer is {_kind(data)}, not a JSON object")
    raw = data.get("predictions")
    multi_label = isinstance(raw, dict)
    if isinstance(raw, list):
        predictions, top, confidence = _single_label(raw, data)
        predicted: tuple[str, ...] = (top,) if top else ()
    elif isinstance(raw, dict):
        predictions = {
            _class_name(name): _probability(
                entry.get("confidence") if isinstance(entry, dict) else entry,
                f"predictions[{name!r}].confidence",
            )
            for name, entry in raw.items()
        }
        predicted = tuple(_class_list(data.get("predicted_classes")))
        top = max(predictions, key=predictions.__getitem__) if predictions else ""
        confidence = predictions[top] if predictions else 0.0
    elif "predictions" not in data:
        _malformed("the answer has no 'predictions'")
    else:
        _malformed(f"'predictions' is {_kind(raw)}, not a list or an object")
    return Answer(
        top=top,
        confidence=confidence,
        predicted_classes=predicted,
        predictions=predictions,
        image=_image(data.get("image")),
        inference_id=_optional_text(data.get("inference_id"), "inference_id"),
        time=_seconds(data.get("time")),
        multi_label=multi_label,
    )


def result_from_answer(
    source: str,
    answer: Answer,
    *,
    attempts: int,
    latency_ms: float,
    content_hash: str | None = None,
    image: dict[str, int] | None = None,
    sent: dict[str, int] | None = None,
) -> Result:
    """The ``ok`` result for ``source``; ``image`` is the original's size when the client
    knows it (the answer's is what the server saw, which may be a shrunk copy: ``sent``)."""
    return Result(
        source=source,
        status="ok",
        top=answer.top,
        confidence=answer.confidence,
        predicted_classes=answer.predicted_classes,
        predictions=answer.predictions,
        image=image if image is not None else answer.image,
        inference_id=answer.inference_id,
        time=answer.time,
        attempts=attempts,
        latency_ms=round(latency_ms, 2),
        multi_label=answer.multi_label,
        sent=sent,
        content_hash=content_hash,
    )


def _single_label(raw: list[Any], data: dict[str, Any]) -> tuple[dict[str, float], str, float]:
    predictions: dict[str, float] = {}
    for number, entry in enumerate(raw):
        if not isinstance(entry, dict):
            _malformed(f"predictions[{number}] is {_kind(entry)}, not an object")
        name = _class_name(entry.get("class"))
        field = f"predictions[{number}].confidence"
        predictions[name] = _probability(entry.get("confidence"), field)
    top = data.get("top")
    top = "" if top in (None, "") else _class_name(top, field="top")
    confidence = _probability(data["confidence"], "confidence") if "confidence" in data else 0.0
    if not predictions:
        # Nothing over the server's threshold: its own top (if any) is all there is.
        return predictions, top, confidence if top else 0.0
    # The best class from the scores: what an older server called top, and what a current
    # one leaves empty when its threshold cut every class.
    best = max(predictions, key=predictions.__getitem__)
    return predictions, best, predictions[best]


def _class_name(value: Any, *, field: str = "class") -> str:
    if not isinstance(value, str):
        _malformed(f"a {field} is {_kind(value)}, not a string")
    if not value:
        _malformed(f"a {field} is an empty string")
    return _checked_text(value, field)


def _class_list(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        _malformed(f"'predicted_classes' is {_kind(value)}, not a list")
    return [_class_name(name, field="predicted class") for name in value]


def _checked_text(value: str, field: str) -> str:
    if len(value) > MAX_NAME_LENGTH:
        _malformed(f"a {field} is {len(value)} characters long")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _malformed(f"a {field} is not valid Unicode (a lone surrogate)")
    return value


def _probability(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _malformed(f"{field} is {_kind(value)}, not a number")
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        _malformed(f"{field} is {value!r}, outside [0, 1]")
    return number


def _image(value: Any) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        _malformed(f"'image' is {_kind(value)}, not an object")
    size: dict[str, int] = {}
    for side in ("width", "height"):
        number = value.get(side)
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, int):
            _malformed(f"image.{side} is {_kind(number)}, not an integer")
        if not 0 <= number <= MAX_IMAGE_SIDE:
            _malformed(f"image.{side} is {number}, not a plausible size")
        size[side] = number
    return size or None


def _optional_text(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _malformed(f"{field} is {_kind(value)}, not a string")
    return _checked_text(value, field)


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _malformed(f"time is {_kind(value)}, not a number")
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        _malformed(f"time is {value!r}, not a duration")
    return number


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _malformed(message: str) -> NoReturn:
    raise MalformedResponseError(f"malformed answer: {message}", http_status=200)


def _kind(value: Any) -> str:
    return {
        type(None): "null",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def snippet(body: bytes | str, limit: int = 300) -> str:
    """A short, single-line excerpt of a body that may be HTML or binary noise."""
    # Only the head is looked at: the body may be megabytes of anything.
    text = body[: limit * 16]
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(_TAG.sub(" ", text).split())[:limit]

"""The answer parser: any bytes in, a checked Answer or a MalformedResponseError out."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchclassify.errors import MalformedResponseError
from batchclassify.response import Answer, parse_answer

SINGLE = {
    "time": 0.1368,
    "image": {"width": 100, "height": 100},
    "predictions": [
        {"class": "10c", "class_id": 0, "confidence": 0.3431},
        {"class": "50c", "class_id": 6, "confidence": 0.3393},
    ],
    "top": "10c",
    "confidence": 0.3431,
    "inference_id": "6f1c",
}
MULTI = {
    "time": 0.1488,
    "image": {"width": 416, "height": 416},
    "predictions": {
        "cat": {"confidence": 0.8809, "class_id": 0},
        "dog": {"confidence": 0.8838, "class_id": 1},
    },
    "predicted_classes": ["cat", "dog"],
}


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_both_documented_shapes_parse() -> None:
    single = parse_answer(_encode(SINGLE))
    assert (single.top, single.confidence, single.predicted_classes) == ("10c", 0.3431, ("10c",))
    assert single.predictions == {"10c": 0.3431, "50c": 0.3393}
    assert single.image == {"width": 100, "height": 100} and single.inference_id == "6f1c"
    multi = parse_answer(_encode(MULTI))
    assert (multi.top, multi.confidence) == ("dog", 0.8838)
    assert multi.predicted_classes == ("cat", "dog") and multi.inference_id is None
    empty = parse_answer(_encode({"predictions": [], "top": "", "confidence": 0.0}))
    assert empty.top == "" and empty.predicted_classes == ()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"predictions": [{"class": "a", "confidence": NaN}]}', "not valid JSON"),
        (b'{"predictions": [{"class": "a", "confidence": Infinity}]}', "not valid JSON"),
        (b'{"predictions": [{"class": "a", "confidence": 1e999}]}', "outside [0, 1]"),
        (b'{"predictions": [{"class": "a", "confidence": 1.5}]}', "outside [0, 1]"),
        (b'{"predictions": [{"class": "a", "confidence": -0.1}]}', "outside [0, 1]"),
        (b'{"predictions": [{"class": "a", "confidence": true}]}', "not a number"),
        (b'{"predictions": null}', "'predictions' is null"),
        (b'{"predictions": "string"}', "'predictions' is a string"),
        (b'{"predictions": [1, 2, 3]}', "predictions[0] is a number"),
        (b'{"predictions": [], "top": ["l"]}', "top is a list"),
        (b'{"predictions": [{"class": 5, "confidence": 0.5}]}', "class is a number"),
        (b'{"predictions": [], "image": {"width": "abc"}}', "image.width is a string"),
        (b'{"predictions": [], "image": {"width": 1' + b"0" * 400 + b"}}", "plausible"),
        (b'{"predictions": [], "inference_id": {"a": 1}}', "inference_id is an object"),
        (b'{"predictions": [], "time": "soon"}', "time is a string"),
        (b'{"predictions": [{"class": "\\ud800x", "confidence": 0.5}]}', "lone surrogate"),
        (b'{"predictions": [{"class": "", "confidence": 0.5}]}', "empty string"),
        (b"<html>502 Bad Gateway</html>", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[]", "is a list, not a JSON object"),
        (b"{}", "no 'predictions'"),
    ],
)
def test_impossible_answers_are_malformed(body: bytes, says: str) -> None:
    with pytest.raises(MalformedResponseError) as caught:
        parse_answer(body)
    assert says in str(caught.value)
    assert caught.value.http_status == 200


def _holds(answer: Answer) -> None:
    for name, confidence in answer.predictions.items():
        assert isinstance(name, str) and name
        assert math.isfinite(confidence) and 0 <= confidence <= 1
    assert math.isfinite(answer.confidence) and 0 <= answer.confidence <= 1
    assert all(isinstance(name, str) for name in answer.predicted_classes)
    if answer.image is not None:
        assert all(type(side) is int for side in answer.image.values())
    json.dumps(answer.predictions, allow_nan=False).encode("utf-8")


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
_entry = st.fixed_dictionaries(
    {"class": _json | st.text(max_size=8), "confidence": _json | st.floats(0, 1)}
)
_answers = st.fixed_dictionaries(
    {"predictions": _json | st.lists(_entry, max_size=4) | st.dictionaries(st.text(), _json)},
    optional={"top": _json, "confidence": _json, "image": _json, "time": _json},
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, _answers))
def test_any_json_value_gives_an_answer_or_a_typed_error(value: Any) -> None:
    body = json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")
    try:
        answer = parse_answer(body)
    except MalformedResponseError:
        return
    _holds(answer)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_an_answer_or_a_typed_error(body: bytes) -> None:
    try:
        answer = parse_answer(body)
    except MalformedResponseError:
        return
    _holds(answer)

"""Normalise the service's two answer shapes (single-label list, multi-label dict) into a Result."""

from __future__ import annotations

from typing import Any

from batchclassify.model import Result

__all__ = ["result_from_response"]


def result_from_response(
    source: str, body: dict[str, Any], *, attempts: int, latency_ms: float
) -> Result:
    """Build the ``ok`` result for ``source`` from a 200 body.

    Single-label: ``predictions`` is a list of ``{class, confidence}``; ``predicted_classes`` is
    ``[top]`` (empty when ``top`` is ``""``, i.e. nothing passed the threshold). Multi-label:
    ``predictions`` maps class -> ``{confidence}`` and ``predicted_classes`` comes from the
    server; ``top``/``confidence`` are filled in with the best class so both shapes can be
    sorted and filtered alike.
    """
    raw = body.get("predictions")
    predictions: dict[str, float] = {}
    if isinstance(raw, list):
        for entry in raw:
            if isinstance(entry, dict) and "class" in entry:
                predictions[str(entry["class"])] = _number(entry.get("confidence"))
        top = body.get("top")
        if top is None and predictions:
            top = max(predictions, key=predictions.__getitem__)
        top = "" if top is None else str(top)
        confidence = _number(body.get("confidence", predictions.get(top, 0.0)))
        predicted: tuple[str, ...] = (top,) if top else ()
    elif isinstance(raw, dict):
        for name, entry in raw.items():
            value = entry.get("confidence") if isinstance(entry, dict) else entry
            predictions[str(name)] = _number(value)
        predicted = tuple(str(name) for name in body.get("predicted_classes") or ())
        if predictions:
            top = max(predictions, key=predictions.__getitem__)
            confidence = predictions[top]
        else:
            top, confidence = "", 0.0
    else:
        predicted, top, confidence = (), "", 0.0
    image = body.get("image")
    return Result(
        source=source,
        status="ok",
        top=top,
        confidence=confidence,
        predicted_classes=predicted,
        predictions=predictions,
        image=image if isinstance(image, dict) else None,
        inference_id=body.get("inference_id"),
        time=body.get("time"),
        attempts=attempts,
        latency_ms=round(latency_ms, 2),
    )


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0

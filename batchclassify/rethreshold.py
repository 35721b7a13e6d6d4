"""``batchclassify rethreshold``: apply another confidence threshold to finished results.

Every row keeps the whole distribution the server returned (it is asked for every class over
its 0.01 floor, see :mod:`batchclassify.response`), so a new threshold needs no request: only
``predicted_classes`` changes, ``top``/``confidence`` stay the best class. The results are read
from a JSONL output (the only format that holds every score) line by line, in constant memory,
and written to new outputs of any format; failed rows are copied as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from batchclassify.errors import ConfigError
from batchclassify.model import Result, read_results
from batchclassify.paths import PlannedPath, check_paths
from batchclassify.response import over_threshold
from batchclassify.sinks import open_sinks

__all__ = ["rethreshold", "rethresholded"]


def rethresholded(result: Result, threshold: float) -> Result:
    """``result`` with ``predicted_classes`` recomputed at ``threshold``."""
    if not result.ok:
        return result
    predicted = over_threshold(
        result.predictions,
        result.top or "",
        result.confidence or 0.0,
        result.multi_label,
        threshold,
    )
    return dataclasses.replace(result, predicted_classes=predicted)


async def rethreshold(
    source: Path, outputs: Sequence[str], threshold: float, *, overwrite: bool = False
) -> tuple[int, int]:
    """Write every row of the JSONL ``source`` to ``outputs`` at ``threshold``; returns the
    rows written and how many of the ok ones have a predicted class."""
    _check(source, outputs, threshold)
    sinks = await open_sinks(outputs, overwrite=overwrite)
    written = predicted = 0
    try:
        for result in read_results(source):
            result = rethresholded(result, threshold)
            written += 1
            predicted += bool(result.ok and result.predicted_classes)
            for sink in sinks:
                await sink.write(result)
            if written % 4096 == 0:
                for sink in sinks:
                    await sink.flush()
    finally:
        for sink in sinks:
            await sink.aclose()
    return written, predicted


def _check(source: Path, outputs: Sequence[str], threshold: float) -> None:
    if source.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ConfigError(
            f"{source}: rethreshold reads JSONL results (the format that keeps every score)"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--confidence must be a probability between 0 and 1, got {threshold}")
    planned = [PlannedPath(source, f"the results {source}")]
    planned += [PlannedPath(Path(spec), f"--out {spec}") for spec in outputs if spec != "-"]
    check_paths(planned)  # distinct (the input is never overwritten) and creatable

"""Running totals for a run and the summary printed at its end, in constant memory."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from batchclassify.model import Result

__all__ = ["LatencyHistogram", "RunStats"]


class LatencyHistogram:
    """Percentiles without keeping every sample: log-spaced buckets 2% wide, so a million
    latencies cost a few hundred counters and percentiles are good to about 1%."""

    _BASE = math.log(1.02)

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0

    def add(self, milliseconds: float) -> None:
        self._buckets[int(math.log(max(milliseconds, 0.01)) / self._BASE)] += 1
        self.count += 1

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s samples (the shards of a distributed run, one summary)."""
        self._buckets.update(other._buckets)
        self.count += other.count

    def percentile(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for bucket in sorted(self._buckets):
            seen += self._buckets[bucket]
            if seen >= rank:
                return round(math.exp((bucket + 0.5) * self._BASE), 1)
        return None  # pragma: no cover - rank <= count


@dataclass
class RunStats:
    """What happened so far; the summary is derived from it."""

    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    total: int = 0
    ok: int = 0
    failed_by_type: Counter[str] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    requests_sent: int = 0
    downloads_sent: int = 0
    #: ok rows with no class over the threshold
    no_class: int = 0
    #: inputs answered from an identical copy instead of a request (content dedup)
    reused: int = 0
    #: inputs taken but not classified because the run stopped (a resume does them)
    not_started: int = 0
    #: inputs skipped because an earlier run (``--resume``, ``scan``) already has their rows
    done_earlier: int = 0
    interrupted: bool = False
    aborted: str | None = None
    #: requests sent again because the first copy was slow (``--hedge-after``), and how many
    #: of those answered first
    hedged: int = 0
    hedges_won: int = 0
    #: per server of the endpoint(s): requests, failures, ejections
    endpoints: dict[str, dict[str, int]] = field(default_factory=dict)

    def record_usage(self, usage: dict[str, Any]) -> None:
        """The client's counts (:meth:`ClassifyClient.usage`)."""
        self.hedged = usage["hedged"]
        self.hedges_won = usage["hedges_won"]
        self.endpoints = usage["endpoints"]

    def add(self, result: Result) -> None:
        self.total += 1
        if result.ok:
            self.ok += 1
            if not result.predicted_classes:
                self.no_class += 1
            if result.top:
                self.classes[result.top] += 1
            # Only rows that waited on a request: a dedup copy (attempts 0) sent none.
            if result.latency_ms is not None and result.attempts > 0:
                self.latency.add(result.latency_ms)
        else:
            self.failed_by_type[result.error.type if result.error else "error"] += 1

    @property
    def failed(self) -> int:
        return self.total - self.ok

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def images_per_second(self) -> float:
        return self.total / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "failed_by_type": dict(self.failed_by_type.most_common()),
            "elapsed_s": round(self.elapsed, 3),
            "images_per_s": round(self.images_per_second, 2),
            "requests_sent": self.requests_sent,
            "downloads_sent": self.downloads_sent,
            "reused": self.reused,
            "hedged": self.hedged,
            "hedges_won": self.hedges_won,
            "endpoints": self.endpoints,
            "latency_ms": {f"p{q}": self.latency.percentile(q) for q in (50, 95, 99)},
            "top_classes": dict(self.classes.most_common(10)),
            "done_earlier": self.done_earlier,
            "not_started": self.not_started,
            "interrupted": self.interrupted,
            "aborted": self.aborted,
        }

    def format(self) -> str:
        """The human summary printed to stderr at the end of a run."""
        data = self.to_dict()
        elapsed = data["elapsed_s"]
        lines = []
        if self.done_earlier:
            inputs = self.done_earlier + self.total + self.not_started
            lines.append(
                f"{inputs} inputs: {self.done_earlier} done earlier, {self.total} now"
                + (f", {self.not_started} not started" if self.not_started else "")
            )
            if not self.total and not self.not_started:
                lines.append("  nothing left to do: every input already has its row")
                return "\n".join(lines)
        lines.append(
            f"{data['total']} images in {elapsed:.{2 if elapsed < 10 else 1}f} s "
            f"({data['images_per_s']:.1f} images/s): {data['ok']} ok, {data['failed']} failed"
        )
        if self.failed_by_type:
            parts = ", ".join(f"{name} {count}" for name, count in self.failed_by_type.items())
            lines.append(f"  failed by type: {parts}")
        latency = data["latency_ms"]
        if latency["p50"] is not None:
            lines.append(
                f"  latency p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms, "
                f"p99 {latency['p99']:.0f} ms; {self.requests_sent} requests sent"
                + (f", {self.downloads_sent} image downloads" if self.downloads_sent else "")
                + (f", {self.hedged} hedged, {self.hedges_won} won" if self.hedged else "")
            )
        if len(self.endpoints) > 1:
            shares = []
            for name, usage in self.endpoints.items():
                ejected = usage["ejections"]
                shares.append(
                    f"{name} {usage['requests']}" + (f" (left out {ejected}x)" if ejected else "")
                )
            lines.append(f"  requests per endpoint: {', '.join(shares)}")
        if self.reused:
            lines.append(f"  {self.reused} duplicates answered from an identical copy")
        if self.classes:
            parts = ", ".join(f"{name} {count}" for name, count in self.classes.most_common(5))
            lines.append(f"  top classes: {parts}")
        if self.no_class:
            lines.append(
                f"  {self.no_class} ok with no class over the confidence threshold (empty "
                "predicted_classes; their best class is still in top)"
            )
        if self.not_started:
            lines.append(f"  {self.not_started} inputs not started (the run stopped)")
        if self.interrupted:
            lines.append("  interrupted: the results above are complete for what was written")
        return "\n".join(lines)

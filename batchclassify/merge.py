"""Merge the parts of a distributed run (``--distributor ray``) into the requested outputs.

Each part is the JSONL output of one shard, complete and renamed into place by its task. The
merge reads the parts one after the other and writes every row to every output through the
ordinary sinks (JSONL, CSV, Parquet), so a merged output is exactly what one process would have
written, rows grouped by shard instead of in commit order.

Nothing is trusted blindly, since parts come from other machines: every row must belong to the
shard of its part (the ``--shard`` hashing, recomputed here), every part must hold as many rows
as its shard's state, and every output must have been given and have written every row. Shards
are disjoint by that hashing and a state holds each input key once, so together these checks
mean each input appears once. Outputs are written under temporary names, fsynced and renamed
into place only when every check passed: an output appears whole or not at all, and a merge
cut off half way is simply done again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from batchclassify.errors import RunAborted
from batchclassify.model import Result, read_results
from batchclassify.sinks import Sink, open_sinks
from batchclassify.state import in_shard

__all__ = ["Part", "merge_parts", "merging_name"]

#: rows read from a part (in a thread) and handed to the sinks at a time
_BATCH = 2048


@dataclass(frozen=True, slots=True)
class Part:
    """One finished shard: its JSONL part, which shard it is, and the rows its state holds."""

    path: Path
    shard: tuple[int, int]
    rows: int


def merging_name(output: Path) -> Path:
    """Where ``output`` is written until the merge is complete (same folder, so the rename is
    atomic; same suffix, which the sinks read the format from)."""
    return output.with_name(f".{output.name}.merging{output.suffix}")


async def merge_parts(
    parts: Sequence[Part], outputs: Sequence[str], *, columns: Sequence[str] = ()
) -> int:
    """Write every row of ``parts`` once to each of ``outputs``; return the number of rows.

    Raises :class:`RunAborted` (and leaves the outputs as they were) when a check fails."""
    finals = [Path(spec) for spec in outputs]
    temps = [merging_name(path) for path in finals]
    for temp in temps:
        temp.unlink(missing_ok=True)  # left by a merge that was cut off
    sinks = await open_sinks([str(temp) for temp in temps], overwrite=True, columns=columns)
    try:
        total = 0
        for part in parts:
            total += await _copy_part(part, sinks)
    except BaseException:
        await _close_quietly(sinks)
        _remove(temps)
        raise
    try:
        for sink in sinks:
            await sink.aclose()  # flushes and fsyncs
        _check_written(sinks, finals, total)
    except BaseException:
        _remove(temps)
        raise
    for temp, final in zip(temps, finals, strict=True):
        os.replace(temp, final)
    for folder in {final.resolve().parent for final in finals}:
        _fsync_folder(folder)
    return total


async def _copy_part(part: Part, sinks: Sequence[Sink]) -> int:
    rows = read_results(part.path)
    count = 0
    while batch := await asyncio.to_thread(_take, rows):
        for result in batch:
            if not in_shard(result.source, part.shard):
                index, shards = part.shard
                raise RunAborted(
                    f"the part {str(part.path)!r} holds a row of another shard than "
                    f"{index}/{shards} ({result.source!r}): was it made with another --shards?"
                )
            for sink in sinks:
                await sink.write(result)
        count += len(batch)
        for sink in sinks:
            await sink.flush()
    if count != part.rows:
        raise RunAborted(
            f"the part {str(part.path)!r} holds {count} rows but its state {part.rows}: run "
            "the same command with --resume to rebuild it"
        )
    return count


def _take(rows: Iterator[Result]) -> list[Result]:
    return list(islice(rows, _BATCH))


def _check_written(sinks: Sequence[Sink], finals: Sequence[Path], total: int) -> None:
    for sink, final in zip(sinks, finals, strict=True):
        given = getattr(sink, "rows_received", total)
        written = getattr(sink, "rows_written", total)
        if given != total or written != total:
            raise RunAborted(f"merging into {str(final)!r}: {written} of {total} rows were written")


async def _close_quietly(sinks: Sequence[Sink]) -> None:
    for sink in sinks:
        with contextlib.suppress(Exception):
            await sink.aclose()


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.with_name(path.name + ".partial").unlink(missing_ok=True)  # Parquet's own


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable: the new directory entry must reach the disk too."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some file systems cannot fsync a folder
            os.fsync(descriptor)
    finally:
        os.close(descriptor)

"""Content dedup: identical image bytes are classified once per job; copies reuse the answer.

Datasets are full of byte-identical copies, and each is a paid API call. The key is the SHA-256
of the bytes actually sent (after preparation), so two copies that become the same upload share
one request. Three places are asked, cheapest first: a copy being classified right now (wait for
it), a small in-memory table of recent answers, and the state store (this run's and earlier
runs' answers). A Bloom filter of every hash the store can hold answers for the state's question
for almost every new image ("certainly not there") without a query: a query per image was a
tenth of the client's CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from batchclassify.model import Result

__all__ = ["ContentDedup"]


class StoredAnswers(Protocol):
    """Where answers of earlier requests are kept (a state store, or a reader of one)."""

    def content_hashes(self) -> Iterator[str]: ...

    def lookup_content(self, content_hash: str) -> Result | None: ...


class ContentDedup:
    """Shared by the workers of one run; create it inside the running event loop."""

    def __init__(self, store: StoredAnswers | None = None, *, capacity: int = 4096) -> None:
        self._store = store
        self._capacity = capacity
        self._recent: OrderedDict[str, Result] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[Result | None]] = {}
        self._stored = HashFilter()
        if store is not None:
            for digest in store.content_hashes():
                self._stored.add(digest)
        self.reused = 0

    async def find(self, digest: str) -> Result | None:
        """The answer for these bytes if known (waiting for a copy in flight). When it returns
        ``None`` the caller must classify the bytes itself and then call :meth:`settle`."""
        while (pending := self._in_flight.get(digest)) is not None:
            answer = await asyncio.shield(pending)
            if answer is not None:
                return self._reuse(answer)
            # That attempt failed: loop, so that exactly one waiter claims the bytes next.
        known = self._recent.get(digest)
        if known is None and self._store is not None and digest in self._stored:
            known = self._store.lookup_content(digest)
        if known is not None:
            return self._reuse(known)
        self._in_flight[digest] = asyncio.get_running_loop().create_future()
        return None

    def settle(self, digest: str, result: Result | None) -> None:
        """Publish the outcome of a claim from :meth:`find` (``None`` or an error: not reusable)."""
        future = self._in_flight.pop(digest, None)
        usable = result if result is not None and result.ok else None
        if usable is not None:
            self._stored.add(digest)  # the writer stores it within moments
            self._recent[digest] = usable
            self._recent.move_to_end(digest)
            while len(self._recent) > self._capacity:
                self._recent.popitem(last=False)
        if future is not None and not future.done():
            future.set_result(usable)

    def _reuse(self, original: Result) -> Result:
        self.reused += 1
        return dataclasses.replace(
            original,
            duplicate_of=original.duplicate_of or original.source,
            attempts=0,
            latency_ms=0.0,
        )


#: hex digits of a digest that make the filter's probes (7 x 26 bits)
_HEX_DIGITS = 46


class HashFilter:
    """A Bloom filter of SHA-256 hex digests: ``in`` is never wrong when it says no, and wrong
    about one time in a thousand when it says yes, up to ~4 million digests (8 MiB, allocated
    lazily by the OS; beyond that, yes grows likelier and the store is simply asked more)."""

    _BITS = 1 << 26
    _PROBES = 7

    def __init__(self) -> None:
        self._bits = bytearray(self._BITS // 8)

    def _positions(self, digest: str) -> list[int]:
        # The digest is already uniformly random: 26-bit slices of it are independent probes.
        try:
            value = int(digest[:_HEX_DIGITS], 16)
        except ValueError:
            value = -1
        if value < 0 or len(digest) < _HEX_DIGITS:  # not a SHA-256 hex digest: make one of it
            raw = hashlib.sha256(digest.encode("utf-8", "surrogatepass")).hexdigest()
            value = int(raw[:_HEX_DIGITS], 16)
        mask = self._BITS - 1
        return [(value >> (26 * n)) & mask for n in range(self._PROBES)]

    def add(self, digest: str) -> None:
        bits = self._bits
        for position in self._positions(digest):
            bits[position >> 3] |= 1 << (position & 7)

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, str):
            return False
        bits = self._bits
        return all(bits[p >> 3] & (1 << (p & 7)) for p in self._positions(digest))

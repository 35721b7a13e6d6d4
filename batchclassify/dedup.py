"""Content dedup: identical image bytes are classified once per job; copies reuse the answer.

Datasets are full of byte-identical copies, and each is a paid API call. The key is the SHA-256
of the bytes actually sent (after preparation), so two copies that become the same upload share
one request. Three places are asked, cheapest first: a copy being classified right now (wait for
it), a small in-memory table of recent answers, and the state store (earlier runs).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict

from batchclassify.model import Result
from batchclassify.state import StateStore

__all__ = ["ContentDedup"]


class ContentDedup:
    """Shared by the workers of one run; create it inside the running event loop."""

    def __init__(self, store: StateStore | None = None, *, capacity: int = 4096) -> None:
        self._store = store
        self._capacity = capacity
        self._recent: OrderedDict[str, Result] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[Result | None]] = {}
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
        if known is None and self._store is not None:
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

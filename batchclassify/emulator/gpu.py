"""The emulator's GPU model: a self-hosted inference server's GPU as K slots, each running one
request's batch of n images for ``A + B·n`` ms, handed out strictly in arrival order.

:class:`FifoSlots` is the queue (a fair semaphore that can be closed); :class:`GpuModel` adds
the batch cost and the counters ``/_emulator/stats`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["FifoSlots", "GpuModel"]


class FifoSlots:
    """``slots`` holders at a time; the others wait and get a slot in arrival order.

    A released slot is handed to the oldest waiter directly rather than put back, so a newcomer
    can never take it first (which ``asyncio.Semaphore`` does not promise on every Python this
    project supports). :meth:`close` ends every wait, present and future, with False: that is
    what keeps an emulator's shutdown prompt. It also keeps the high-water marks of how many
    waited and how many held a slot at once.
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.slots = slots
        self._free = slots
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._closed = False
        self.max_waiting = 0
        self.max_running = 0

    @property
    def waiting(self) -> int:
        """How many wait for a slot now."""
        return len(self._waiters)

    @property
    def running(self) -> int:
        """How many hold a slot now."""
        return self.slots - self._free

    def reset_marks(self) -> None:
        """Start the high-water marks again from what is happening now."""
        self.max_waiting = self.waiting
        self.max_running = self.running

    async def acquire(self) -> bool:
        """Wait for a slot: True once it is held (give it back with :meth:`release`), False
        if the slots were closed (nothing is held then)."""
        if self._closed:
            return False
        if self._free and not self._waiters:
            self._free -= 1
            self.max_running = max(self.max_running, self.running)
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.max_waiting = max(self.max_waiting, len(self._waiters))
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                # Handed a slot in the same loop turn as the cancellation: pass it on.
                self.release()
            else:
                with contextlib.suppress(ValueError):  # close() took it out already
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a held slot back: to the oldest waiter if there is one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # the slot changes hands; _free stays as it is
                return
        if self._free >= self.slots:
            raise RuntimeError("FifoSlots.release() called more often than acquire()")
        self._free += 1

    def close(self) -> None:
        """End every wait with False; later :meth:`acquire` calls return False at once."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)


class GpuModel:
    """A GPU with ``slots`` concurrent runs; a batch of n images holds one for
    ``batch_latency_ms + per_image_ms · n``."""

    def __init__(self, slots: int, batch_latency_ms: float, per_image_ms: float) -> None:
        self.slots = FifoSlots(slots)
        self.batch_latency_ms = batch_latency_ms
        self.per_image_ms = per_image_ms
        self.busy_ms = 0.0
        self.batches = 0
        self.images = 0

    def batch_ms(self, images: int) -> float:
        """How long a batch of ``images`` holds its slot, in ms."""
        return self.batch_latency_ms + self.per_image_ms * images

    async def run(self, images: int, pause: Callable[[float], Awaitable[bool]]) -> None:
        """Queue for a slot, then hold it for :meth:`batch_ms`. ``pause(seconds)`` sleeps and
        returns True early on shutdown (as ``_State.pause`` does); a run cut short by shutdown
        counts the time it really held the slot, and no batch."""
        if not await self.slots.acquire():
            return
        cost_ms = self.batch_ms(images)
        started = time.perf_counter()
        try:
            interrupted = await pause(cost_ms / 1000.0)
        finally:
            self.slots.release()
        if interrupted:
            self.busy_ms += min(cost_ms, (time.perf_counter() - started) * 1000.0)
            return
        # The modelled cost, not the measured sleep: event-loop jitter is not GPU time.
        self.busy_ms += cost_ms
        self.batches += 1
        self.images += images

    def close(self) -> None:
        self.slots.close()

    def reset(self) -> None:
        """Zero the counters; batches running now are counted when they end."""
        self.busy_ms = 0.0
        self.batches = 0
        self.images = 0
        self.slots.reset_marks()

    def snapshot(self) -> dict[str, Any]:
        slots = self.slots
        return {
            "slots": slots.slots,
            "batch_latency_ms": self.batch_latency_ms,
            "per_image_ms": self.per_image_ms,
            "busy_ms": round(self.busy_ms, 3),
            "batches": self.batches,
            "images": self.images,
            "running": slots.running,
            "queued": slots.waiting,
            "max_running": slots.max_running,
            "max_queue": slots.max_waiting,
        }

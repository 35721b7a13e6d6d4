"""``--batch-size N``: several images per request to a self-hosted server's batch route.

A GPU server runs a batch of n images in about the time of a few single ones (a fixed cost per
request plus a small one per image), so batching multiplies what one server delivers. The
workers do not change: each prepares its image and asks :class:`Batcher` for the answer as it
would ask the client; the batcher gathers up to N waiting images (or what arrived within a few
milliseconds) into one request, and hands each worker its own answer. So every row, retry
count, dedup and error stays per image.

One bad image fails a whole batch with a 400 (PROTOCOL.md), so a rejected batch is split in
halves, each sent again, down to the one image to blame: that image gets the error row, the
others their answers, at the cost of about 2·log2(N) extra requests per bad image.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from batchclassify.client import ClassifyClient, Response
from batchclassify.errors import ItemRejectedError, RequestError

__all__ = ["DEFAULT_LINGER", "Batcher", "auto_batch_size"]

#: how long a batch that is not full waits for more images (seconds): short against a request
DEFAULT_LINGER = 0.005
#: ``--batch-size auto``: batches of a quarter of the concurrency (so ~4 are in flight while
#: the others fill), between these bounds
AUTO_MIN, AUTO_MAX = 2, 32


def auto_batch_size(concurrency: int) -> int:
    """``--batch-size auto`` for ``concurrency`` images in flight (in one process)."""
    return max(1, min(concurrency, max(AUTO_MIN, min(AUTO_MAX, concurrency // 4))))


@dataclass
class _Waiting:
    body: bytes
    future: asyncio.Future[Response]
    #: requests this image was part of so far (a split batch sends it again)
    attempts: int = field(default=0)


class Batcher:
    """Shared by the workers of one run; create it inside the running event loop."""

    def __init__(
        self, client: ClassifyClient, size: int, *, linger: float = DEFAULT_LINGER
    ) -> None:
        if size < 2:
            raise ValueError("a batch holds at least 2 images")
        self._client = client
        self._size = size
        self._linger = linger
        self._waiting: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        #: batches sent, and those split because one of their images was refused
        self.batches = 0
        self.splits = 0

    async def classify(self, body: bytes) -> Response:
        """The answer for one base64-encoded image, sent in a batch with others."""
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(body, future))
        if len(self._waiting) >= self._size:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting, []
        if batch:
            self._start(batch)

    def _start(self, batch: list[_Waiting]) -> None:
        task = asyncio.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Waiting]) -> None:
        live = [waiting for waiting in batch if not waiting.future.done()]
        if not live:
            return  # every worker of this batch was cancelled (the run was aborted)
        self.batches += 1
        try:
            answers, attempts = await self._client.classify_batch([w.body for w in live])
        except ItemRejectedError as exc:
            for waiting in live:
                waiting.attempts += exc.attempts
            if len(live) == 1:
                _settle(live[0], exc)
                return
            # One of them is to blame: find it by halves, the others get their answers.
            self.splits += 1
            middle = len(live) // 2
            await asyncio.gather(self._send(live[:middle]), self._send(live[middle:]))
            return
        except Exception as exc:  # every worker of the batch gets it (fatal ones stop the run)
            if isinstance(exc, RequestError):
                for waiting in live:
                    waiting.attempts += exc.attempts
            for waiting in live:
                _settle(waiting, exc)
            return
        except BaseException as exc:  # cancelled: the workers waiting must not hang
            for waiting in live:
                _settle(waiting, exc)
            raise
        for waiting, answer in zip(live, answers, strict=True):
            waiting.attempts += attempts
            if not waiting.future.done():
                waiting.future.set_result(Response(answer=answer, attempts=waiting.attempts))

    def abort(self) -> None:
        """Cancel every batch in flight (the run is stopping now): their workers, cancelled
        too, count their images as not started."""
        for task in self._sending:
            task.cancel()

    async def aclose(self) -> None:
        """Send what is still waiting and let the batches in flight finish."""
        self._flush()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def _settle(waiting: _Waiting, exc: BaseException) -> None:
    if waiting.future.done():
        return
    if isinstance(exc, RequestError):
        # Each worker raises its own copy: the attempts are its image's, not the batch's.
        copy = _copy_error(exc)
        copy.attempts = waiting.attempts
        exc = copy
    if isinstance(exc, asyncio.CancelledError):
        waiting.future.cancel()
        return
    waiting.future.set_exception(exc)


def _copy_error(exc: RequestError) -> RequestError:
    copy = type(exc).__new__(type(exc))
    copy.__dict__.update(exc.__dict__)
    copy.args = exc.args
    return copy

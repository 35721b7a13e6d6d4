"""``--processes N``: one run on N event loops, for the CPU of every core.

One event loop holds the GIL, so past a few hundred requests in flight a run is bound by one
core. Here N worker processes each run a :class:`~batchclassify.pipeline.Pipeline` over their
part of the inputs (split by the same hash as ``--shard``, so the parts are even and every
process agrees on them without talking), and send their rows, already serialised, to this
process. This process stays the one writer: it commits every row to the one state and hands it
to the one set of outputs, with one progress bar and one summary. So everything a single-process
run guarantees holds unchanged (exactly-once outputs, ``--resume``, ``scan``, the closing check),
because the parts that guarantee it are the same code, in the same process.

::

    worker 0: sources (part 0) → Pipeline ─┐  rows, in batches (pipes)
    worker 1: sources (part 1) → Pipeline ─┼──────────────────────────► this process: state, outputs
    ...                                    ┘  ◄── stop / abort

A worker whose parent dies (``kill -9``) sees its control pipe close and exits at once: what it
classified after the last commit is simply classified again by ``--resume``. A worker that dies
stops the run (exit 2, "--resume completes it"), as a crash of a single-process run would; one
that raises sends its (redacted) message first. Workers ignore SIGINT and SIGTERM from their
first instant (Ctrl-C reaches the whole process group, a service manager may signal them all):
the parent alone decides to stop or abort, and tells them. Workers are spawned, so a script
calling :func:`batchclassify.run` with ``processes > 1`` needs the usual
``if __name__ == "__main__":`` guard (without it the run fails with that advice).

Differences from one process, all documented: byte-identical copies found in different
processes in the same run may cost one request per process (the dedup table is per process;
answers of earlier runs are found by all); ``--rate`` and ``--concurrency`` are shared out
evenly; inputs from standard input need one process (stdin is read once).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from batchclassify import loop as event_loop
from batchclassify.errors import ConfigError, RunAborted, redact, url_secrets
from batchclassify.model import Result, record_json
from batchclassify.pipeline import FailureLimit, Pipeline, PipelineOptions, label_row
from batchclassify.sources import STDIN, iter_items
from batchclassify.state import Skipped, StateReader, select_items

__all__ = ["ProcessPipeline", "auto_processes", "check_not_starting_worker"]

log = logging.getLogger("batchclassify")

#: rows a worker sends at once, and how long a row waits for its batch at most (seconds)
_BATCH_ROWS = 128
_BATCH_DELAY = 0.02
#: batches received but not yet written: bounds this process's memory if writing is slow
_BATCHES_IN_FLIGHT = 32
#: how long the workers get to report after the run stopped before they are killed (seconds)
_REPORT_GRACE = 30.0
#: concurrency from which a second process pays for itself (measured: benchmarks/bench_cpu.py)
AUTO_CONCURRENCY_PER_PROCESS = 128


def auto_processes(concurrency: int, specs: Sequence[str]) -> int:
    """``--processes auto``: one process per core, but only as many as the concurrency keeps
    busy (below ~128 requests in flight one event loop is not the bound), and one for stdin."""
    if STDIN in specs:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, concurrency // AUTO_CONCURRENCY_PER_PROCESS))


@dataclass(frozen=True, slots=True)
class _WorkerSpec:
    """What a worker process needs to run its part (pickled to it)."""

    number: int
    specs: tuple[str, ...]
    options: PipelineOptions
    state_path: Path | None
    resume: bool
    shard: tuple[int, int] | None
    part: tuple[int, int]
    log_level: int


@dataclass
class _Report:
    """A worker's counts at its end (the same names as the pipeline's)."""

    taken: int = 0
    dropped: int = 0
    requests_sent: int = 0
    downloads_sent: int = 0
    reused: int = 0
    done_earlier: int = 0
    other_shards: int = 0
    fatal: str | None = None
    #: requests per server and hedges (:meth:`ClassifyClient.usage`)
    usage: dict[str, Any] | None = None


class ProcessPipeline:
    """The parent side: looks like a :class:`Pipeline` to the runner (``results()``, the
    counts, ``stop()``, ``abort()``)."""

    def __init__(
        self,
        specs: Sequence[str],
        options: PipelineOptions,
        *,
        state_path: Path | None,
        resume: bool,
        shard: tuple[int, int] | None,
        skipped: Skipped,
    ) -> None:
        if STDIN in specs:
            raise ConfigError(
                "standard input (-) is read once, by one process: use --processes 1 with it"
            )
        self.options = options
        self._specs = tuple(specs)
        self._state_path = state_path
        self._resume = resume
        self._shard = shard
        self._skipped = skipped
        self._controls: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._stopping = False
        self._fatal: RunAborted | None = None
        self._failure_limit = FailureLimit(options.max_failures)
        self.taken = 0
        self.dropped = 0
        self.requests_sent = 0
        self.downloads_sent = 0
        self.reused = 0
        self._usage: dict[str, Any] | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping

    def usage(self) -> dict[str, Any] | None:
        """The workers' requests per server and hedges, added up (once they reported)."""
        return self._usage

    def stop(self) -> None:
        """No new items in any worker; what is in flight finishes and is reported."""
        self._stopping = True
        self._tell("stop")

    def abort(self) -> None:
        """Every worker cancels its requests now (their items are not reported)."""
        self._stopping = True
        self._tell("abort")

    def _tell(self, what: str) -> None:
        for control in self._controls:
            with contextlib.suppress(OSError, ValueError):
                control.send(what)

    def _worker_specs(self) -> list[_WorkerSpec]:
        options = self.options
        count = options.processes
        client = options.client
        throttle = options.throttle
        specs = []
        for number in range(count):
            # Concurrency, queue and --rate are shared out; --max-failures and --labels stay
            # here, where every row passes.
            share = _share(client.concurrency, count, number)
            worker_options = dataclasses.replace(
                options,
                client=dataclasses.replace(client, concurrency=share),
                throttle=dataclasses.replace(
                    throttle, rate=None if throttle.rate is None else throttle.rate / count
                ),
                queue_size=None
                if options.queue_size is None
                else max(1, _share(options.queue_size, count, number)),
                max_failures=None,
                labeler=None,
                processes=1,
            )
            specs.append(
                _WorkerSpec(
                    number=number,
                    specs=self._specs,
                    options=worker_options,
                    state_path=self._state_path,
                    resume=self._resume,
                    shard=self._shard,
                    part=(number, count),
                    log_level=logging.getLogger().getEffectiveLevel(),
                )
            )
        return specs

    async def results(self) -> AsyncGenerator[Result, None]:
        """Every worker's rows as they come; raises :class:`RunAborted` at the end when a
        worker failed or the run was stopped by a fatal error."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        slots = threading.BoundedSemaphore(_BATCHES_IN_FLIGHT)
        closed = threading.Event()
        context = multiprocessing.get_context("spawn")
        pumps: list[threading.Thread] = []
        # Stopped before the start (Ctrl-C at once): no worker is worth a second of start-up.
        try:
            for spec in [] if self._stopping else self._worker_specs():
                rows_in, rows_out = context.Pipe(duplex=False)
                control_in, control_out = context.Pipe(duplex=False)
                process = context.Process(
                    target=_worker_main,
                    args=(spec, rows_out, control_in),
                    name=f"batchclassify-worker-{spec.number}",
                    daemon=True,
                )
                with _signals_blocked():
                    process.start()
                rows_out.close()  # the worker's ends: closed here, so EOF means the worker is gone
                control_in.close()
                self._processes.append(process)
                self._controls.append(control_out)
                pump = threading.Thread(
                    target=_pump,
                    args=(spec.number, rows_in, inbox, loop, slots, closed),
                    name=f"batchclassify-pump-{spec.number}",
                    daemon=True,
                )
                pump.start()
                pumps.append(pump)
        except BaseException:
            # One would not start (no file descriptors left, say): the others must not go on
            # classifying with nobody reading what they send.
            for started in self._processes:
                started.kill()
            self._join()
            raise
        if self._stopping:
            self._tell("stop")  # stopped while the workers were starting
        reports: dict[int, _Report] = {}
        delivered = [0] * len(self._processes)
        #: rows of the batch being handed out that the consumer has not taken yet
        undelivered = 0
        try:
            while len(reports) < len(self._processes):
                number, kind, payload = await inbox.get()
                slots.release()
                if kind == "rows":
                    undelivered = len(payload)
                    for row in payload:
                        delivered[number] += 1
                        undelivered -= 1
                        yield self._checked(row)
                elif kind == "done":
                    reports[number] = payload
                    log.debug(
                        "worker %d done: %d taken, %d rows sent, %d not started",
                        number,
                        payload.taken,
                        delivered[number],
                        payload.dropped,
                    )
                    self._worker_ended(payload)
                else:  # "failed" (with its message) or "lost": no report, the rows are all
                    reports[number] = _Report(taken=delivered[number])
                    self._worker_lost(number, payload, heard=delivered[number] > 0)
        finally:
            if len(reports) < len(self._processes):
                # The consumer stopped early (the writer failed): rows still coming are dropped,
                # with the rest of the batch it stopped in.
                self.abort()
                self.dropped += undelivered
                self.dropped += await self._collect(inbox, slots, reports, delivered)
            closed.set()
            for report in reports.values():
                self._add(report)
            await asyncio.to_thread(self._join)
        if self._fatal is not None:
            raise self._fatal

    def _checked(self, row: Result) -> Result:
        row = label_row(row, self.options.labeler)
        reached = self._failure_limit.count(row)
        if reached is not None and self._fatal is None:
            self._fatal = reached
            self.stop()
        return row

    def _worker_ended(self, report: _Report) -> None:
        if report.fatal is not None and self._fatal is None:
            self._fatal = RunAborted(report.fatal)
            self.stop()  # the others finish what they have in flight, as one process would

    def _worker_lost(self, number: int, failure: str | None, *, heard: bool) -> None:
        process = self._processes[number]
        process.join(timeout=5)
        if self._fatal is None:
            if failure is None:
                code = process.exitcode
                how = (
                    f"was killed by signal {-code}"
                    if code is not None and code < 0
                    else f"ended (exit code {code})"
                )
                failure = f"worker process {number} (pid {process.pid}) {how} before reporting"
                if not heard and _main_is_a_script():
                    failure += _MAIN_GUARD_HINT
            self._fatal = RunAborted(
                f"{failure}: every row it sent is saved; run the same command with --resume "
                "to complete the rest"
            )
        self.stop()

    async def _collect(
        self,
        inbox: asyncio.Queue[tuple[int, str, Any]],
        slots: threading.BoundedSemaphore,
        reports: dict[int, _Report],
        delivered: list[int],
    ) -> int:
        """Wait (bounded) for the workers' reports after an early stop; returns the rows
        that arrived meanwhile, which are not reported (a resumed run classifies them)."""
        dropped = 0
        deadline = time.monotonic() + _REPORT_GRACE
        while len(reports) < len(self._processes):
            remaining = deadline - time.monotonic()
            try:
                number, kind, payload = await asyncio.wait_for(inbox.get(), max(remaining, 0))
            except asyncio.TimeoutError:
                break
            slots.release()
            if kind == "rows":
                delivered[number] += len(payload)
                dropped += len(payload)
            elif kind == "done":
                reports[number] = payload
            else:  # failed or lost
                reports[number] = _Report(taken=delivered[number])
        for number, process in enumerate(self._processes):
            if number not in reports:
                process.kill()
                reports[number] = _Report(taken=delivered[number])
        return dropped

    def _add(self, report: _Report) -> None:
        self.taken += report.taken
        self.dropped += report.dropped
        self.requests_sent += report.requests_sent
        self.downloads_sent += report.downloads_sent
        self.reused += report.reused
        self._skipped.done_earlier += report.done_earlier
        self._skipped.other_shards += report.other_shards
        if report.usage is not None:
            self._usage = _add_usage(self._usage, report.usage)

    def _join(self) -> None:
        for control in self._controls:
            control.close()  # a worker still running sees its parent leave, and exits
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def _add_usage(total: dict[str, Any] | None, usage: dict[str, Any]) -> dict[str, Any]:
    """Two workers' :meth:`ClassifyClient.usage` as one: every count summed."""
    if total is None:
        return {**usage, "endpoints": {k: dict(v) for k, v in usage["endpoints"].items()}}
    for name in ("hedged", "hedges_won"):
        total[name] += usage[name]
    for label, counts in usage["endpoints"].items():
        mine = total["endpoints"].setdefault(label, dict.fromkeys(counts, 0))
        for name, count in counts.items():
            mine[name] = mine.get(name, 0) + count
    return total


#: what the parent decides on for its workers (Ctrl-C reaches every process of the terminal's
#: group; a service manager may send SIGTERM to every process of the job)
_PARENT_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Start a worker with Ctrl-C blocked: a spawned process takes a second or so to import
    its modules, and a Ctrl-C then would kill it with a KeyboardInterrupt before it could
    ignore the signal. The mask is inherited through fork and exec; the worker ignores the
    signals, then unblocks them. Here a signal that came meanwhile is delivered on exit."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # Started first, on its own: starting it unblocks these signals on its way out (it
    # protects itself the same way), which would unblock them for our start too.
    resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


#: why a worker may die before its first row without a message of ours
_MAIN_GUARD_HINT = (
    " (if it died while starting, see its error above: a script that calls "
    'batchclassify.run with processes > 1 must do so under if __name__ == "__main__":, '
    "because each worker process imports the script again)"
)


def _main_is_a_script() -> bool:
    """A worker imports the main module again when it is a file (not ``python -c``)."""
    import __main__

    return getattr(__main__, "__file__", None) is not None


def check_not_starting_worker() -> None:
    """Refuse a run started while a worker process imports the user's script (one without
    the ``if __name__ == "__main__":`` guard): that run would be a second copy of the job,
    fighting the first one over its state and outputs."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise ConfigError(
            "batchclassify.run was called while a --processes worker process was starting: "
            "a worker imports your script again, so call run() under "
            'if __name__ == "__main__": (see the multiprocessing documentation, "safe '
            'importing of main module")'
        )


def _share(total: int, parts: int, number: int) -> int:
    """Part ``number`` of ``total`` split as evenly as integers allow."""
    return total // parts + (1 if number < total % parts else 0)


def _pump(
    number: int,
    rows: Connection,
    inbox: asyncio.Queue[tuple[int, str, Any]],
    loop: asyncio.AbstractEventLoop,
    slots: threading.BoundedSemaphore,
    closed: threading.Event,
) -> None:
    """Move one worker's messages into the event loop (a thread: the pipe blocks), at most
    ``_BATCHES_IN_FLIGHT`` waiting, so a slow writer slows the workers instead of filling
    memory."""
    try:
        while True:
            try:
                kind, payload = rows.recv()
            except (EOFError, OSError):
                kind, payload = "lost", None
            except BaseException as exc:  # a message that does not unpickle, no memory, ...
                # The parent must hear of it, or it would wait for this worker forever.
                kind, payload = "failed", f"reading from the worker failed: {type(exc).__name__}"
            while not slots.acquire(timeout=0.5):
                if closed.is_set():
                    return
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, (number, kind, payload))
            except RuntimeError:  # the loop is closed
                return
            if kind != "rows":  # done, failed or lost: the worker has nothing more to say
                return
    finally:
        rows.close()


# --- the worker side -------------------------------------------------------------------------


def _worker_main(spec: _WorkerSpec, rows: Connection, control: Connection) -> None:
    """A worker process: run its part, send rows and a last report."""
    # Ctrl-C reaches every process of the terminal's group: the parent decides (stop, then
    # abort), and tells the workers. Started with these blocked (_signals_blocked): ignored
    # first, so one that came during the start is discarded, not delivered.
    for signum in _PARENT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_SIGNALS)
    client = spec.options.client
    # Every server's credentials, not only the first's: a fleet's are all in the options.
    secrets = (
        client.api_key or "",
        *(secret for route in client.routes for secret in url_secrets(route.endpoint)),
    )
    try:
        _configure_logging(secrets, spec.log_level)
        event_loop.run(_work(spec, rows, control, secrets), spec.options.event_loop)
    except BaseException as exc:  # anything: told, redacted, never a raw traceback
        # multiprocessing would print the traceback itself, unredacted: the message goes to
        # the parent instead (which counts every row sent so far as all this worker did), the
        # traceback through the redacting log handler.
        log.error("worker process %d failed", spec.number, exc_info=True)
        with contextlib.suppress(Exception):
            rows.send(("failed", _failure(spec.number, exc, secrets)))
        rows.close()
        os._exit(1)
    rows.close()


def _failure(number: int, exc: BaseException, secrets: Sequence[str]) -> str:
    return redact(f"worker process {number} failed: {type(exc).__name__}: {exc}", *secrets)


def _configure_logging(secrets: Sequence[str], level: int) -> None:
    from batchclassify import cli  # the parent's handler: same format, same redaction

    cli.set_secrets(secrets)
    cli.configure_logging_level(level)


async def _work(
    spec: _WorkerSpec, rows: Connection, control: Connection, secrets: Sequence[str]
) -> None:
    report = _Report()
    batch: list[Result] = []
    unsent = 0  # rows the pipeline gave that could not be batched (a failure): not reported

    def send() -> None:
        if batch:
            rows.send(("rows", batch[:]))
            batch.clear()

    async def send_regularly() -> None:
        while True:
            await asyncio.sleep(_BATCH_DELAY)
            send()

    skipped = Skipped()
    pipeline: Pipeline | None = None
    async with contextlib.AsyncExitStack() as stack:
        try:
            reader = None
            dedup_store = None
            if spec.state_path is not None:
                reader = stack.enter_context(contextlib.closing(StateReader(spec.state_path)))
                # Dedup reads the state too (the answers of earlier runs): its own connection.
                dedup_store = stack.enter_context(contextlib.closing(StateReader(spec.state_path)))
            items = select_items(
                iter_items(spec.specs, spec.options.sources),
                reader=reader if spec.resume else None,
                shard=spec.shard,
                skipped=skipped,
                part=spec.part,
            )
            pipeline = Pipeline(spec.specs, spec.options, items=items, store=dedup_store)
            _listen(control, pipeline, asyncio.get_running_loop())
            sender = asyncio.create_task(send_regularly())
            stack.push_async_callback(_cancelled, sender)
            async with contextlib.aclosing(pipeline.results()) as results:
                try:
                    async for result in results:
                        unsent += 1
                        record_json(result)  # serialised here, on this core: the parent reuses it
                        batch.append(result)
                        unsent -= 1
                        if len(batch) >= _BATCH_ROWS:
                            send()
                except BaseException:
                    # Before the generator closes: an abort counts what is still queued or in
                    # flight as not started (a plain close would leave the queue uncounted).
                    pipeline.abort()
                    raise
        except RunAborted as exc:
            report.fatal = str(exc)
        except Exception as exc:  # a bug: the parent stops the run with this message
            log.error("worker process %d failed", spec.number, exc_info=True)
            report.fatal = _failure(spec.number, exc, secrets)
    send()
    if pipeline is not None:
        report.taken = pipeline.taken
        report.dropped = pipeline.dropped + unsent
        report.requests_sent = pipeline.requests_sent
        report.downloads_sent = pipeline.downloads_sent
        report.reused = pipeline.reused
        report.usage = pipeline.usage()
    report.done_earlier = skipped.done_earlier
    report.other_shards = skipped.other_shards
    rows.send(("done", report))


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _listen(control: Connection, pipeline: Pipeline, loop: asyncio.AbstractEventLoop) -> None:
    """Obey the parent's stop and abort; exit at once when the parent is gone."""

    def listen() -> None:
        actions: dict[str, Callable[[], None]] = {"stop": pipeline.stop, "abort": pipeline.abort}
        try:
            while True:
                what = control.recv()
                with contextlib.suppress(RuntimeError):  # the loop has finished
                    loop.call_soon_threadsafe(actions[what])
        except (EOFError, OSError):
            # The parent is gone (killed): nothing can record what this process classifies
            # any more, so stop spending requests. A normal end closes the pipe after our
            # report, when this process is leaving anyway.
            os._exit(3)

    threading.Thread(target=listen, name="batchclassify-control", daemon=True).start()

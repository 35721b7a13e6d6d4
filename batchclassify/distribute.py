"""``run --distributor ray --shards N``: one job run as N shards on a Ray cluster.

::

    driver (this process)                          Ray task per shard (any node)
    check options and paths, before Ray            runner.run(shard=(K, N)): its own pipeline,
    submit the shards not finished yet  ───────►   its own state and JSONL part in --parts-dir;
    wait for every shard                ◄───────   the part renamed into place when complete
    merge the parts into every --out (merge.py), exactly once; one summary

Every shard is an ordinary ``--shard K/N`` run, so what holds for one run holds for each shard:
results are committed to the shard's state before they reach its part, and a resumed shard
repairs its part and skips what its state holds. A task whose worker or node dies is run again
by Ray (``max_retries``); the state is still in the parts folder, so the new attempt *resumes*
the shard, it does not start it over. ``--resume`` of the whole job keeps finished parts (unless
their states hold failures worth another try) and runs the rest.

The parts folder must be storage that every node and the driver see (a shared file system);
on one machine (a local Ray instance) any folder will do.

The API key reaches the tasks as a task argument wrapped in :class:`_Secret` (it travels in
Ray's object store, its ``repr`` is ``***``). It is *not* passed through
``runtime_env={"env_vars": ...}``: Ray's runtime-env agent logs the whole runtime env, env vars
included, at INFO level (``runtime_env_agent.log``, checked with Ray 2.60). Anyone who can run
code on the cluster can read the key either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchclassify import emulator
from batchclassify.config import RunSettings
from batchclassify.errors import ConfigError, RunAborted, without_userinfo
from batchclassify.paths import PlannedPath, check_paths
from batchclassify.state import StateReader
from batchclassify.summary import RunStats

__all__ = [
    "DistributeOptions",
    "ShardReport",
    "add_arguments",
    "options_from_args",
    "plan_job",
    "run_command",
    "run_shard",
]

log = logging.getLogger("batchclassify")

#: tries of a shard's task after the first, when its worker or node is lost
DEFAULT_MAX_RETRIES = 3
#: the parts folder's record of the job's shape (a resume with another --shards would mix)
MANIFEST = "job.json"
_PIP = "pip install 'batchclassify[ray]'"
#: how long the driver waits for a TCP answer from --ray-address before saying it is unreachable
_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DistributeOptions:
    """How a job is spread: shards (``None``: one per CPU of the cluster), the cluster, the
    folder for parts and states, and how often Ray runs a lost shard again."""

    shards: int | None = None
    address: str | None = None
    parts_dir: Path | None = None
    max_retries: int = DEFAULT_MAX_RETRIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` options of this module (none of them is a config-file setting)."""
    group = parser.add_argument_group(
        "distributed runs (Ray)",
        "spread one job over a Ray cluster: pip install 'batchclassify[ray]'",
    )
    group.add_argument(
        "--distributor",
        choices=("ray",),
        help="run the job as --shards tasks on a Ray cluster (a local one by default) and "
        "merge their parts into the --out files",
    )
    group.add_argument(
        "--shards",
        type=int,
        metavar="N",
        help="with --distributor: split the inputs into N shards, one Ray task each (default: "
        "one per CPU of the cluster)",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --distributor ray: the cluster to join (HOST:PORT, ray://HOST:PORT, auto); "
        "default: RAY_ADDRESS, or a local Ray instance",
    )
    group.add_argument(
        "--parts-dir",
        metavar="DIR",
        help="with --distributor: where the shards keep their states and parts; on a cluster "
        "it must be storage every node sees (default: beside the first --out, e.g. "
        "results.jsonl.parts)",
    )
    group.add_argument(
        "--max-retries",
        type=int,
        metavar="N",
        help=f"with --distributor: run a shard whose worker died again up to N times "
        f"(default {DEFAULT_MAX_RETRIES})",
    )


def options_from_args(args: argparse.Namespace) -> DistributeOptions | None:
    """``None`` for an ordinary run; refuses the distribution options without
    ``--distributor``."""
    given = {
        "--shards": getattr(args, "shards", None),
        "--ray-address": getattr(args, "ray_address", None),
        "--parts-dir": getattr(args, "parts_dir", None),
        "--max-retries": getattr(args, "max_retries", None),
    }
    if getattr(args, "distributor", None) is None:
        stray = [name for name, value in given.items() if value is not None]
        if stray:
            raise ConfigError(f"{stray[0]} needs --distributor ray")
        return None
    if args.shards is not None and args.shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {args.shards}")
    if args.max_retries is not None and args.max_retries < 0:
        raise ConfigError(f"--max-retries cannot be negative, got {args.max_retries}")
    return DistributeOptions(
        shards=args.shards,
        address=args.ray_address,
        parts_dir=Path(args.parts_dir) if args.parts_dir else None,
        max_retries=DEFAULT_MAX_RETRIES if args.max_retries is None else args.max_retries,
    )


# --- the plan: everything checked before Ray is even imported -------------------------------


@dataclass(frozen=True, slots=True)
class ShardFiles:
    """What one shard keeps in the parts folder. The shard count is in the names, so parts of
    a job split another way can never be taken for these."""

    state: Path
    working: Path
    part: Path

    @classmethod
    def of(cls, parts_dir: Path, index: int, count: int) -> ShardFiles:
        stem = f"shard-{index:05d}-of-{count:05d}"
        return cls(
            state=parts_dir / f"{stem}.state",
            # ".jsonl" last: the sinks read the format from the suffix
            working=parts_dir / f"{stem}.partial.jsonl",
            part=parts_dir / f"{stem}.jsonl",
        )


@dataclass(frozen=True, slots=True)
class JobPlan:
    """A checked distributed job (the key is kept apart from ``settings``)."""

    sources: tuple[str, ...]
    settings: RunSettings
    outputs: tuple[str, ...]
    parts_dir: Path
    options: DistributeOptions
    #: the shard count of the job being resumed (from its manifest)
    resumed_shards: int | None
    api_key: str | None = field(repr=False)
    #: the endpoint(s) as given, user:password included (the settings carry them without)
    endpoint: str | tuple[str, ...] = field(default="", repr=False)


def plan_job(sources: Sequence[str], settings: RunSettings, options: DistributeOptions) -> JobPlan:
    """Refuse what cannot be distributed, and check every path, before Ray is started."""
    from batchclassify.merge import merging_name
    from batchclassify.sinks import STDOUT, check_outputs

    if settings.shard is not None:
        raise ConfigError(
            "--shard K/N and --distributor ray both split the job: --shard takes one shard on "
            "this machine (for a Kubernetes Indexed Job or a Slurm array), --distributor ray "
            "--shards N runs all N on a Ray cluster. Give one of them"
        )
    if STDOUT in sources:
        raise ConfigError(
            "--distributor ray cannot read inputs from stdin (-): each shard reads the inputs "
            "itself; give a list file instead"
        )
    outputs = tuple(settings.out)
    if not outputs or STDOUT in outputs:
        raise ConfigError(
            "--distributor ray merges the shards' parts into files: give --out FILE (.jsonl, "
            ".csv, .parquet), not stdout"
        )
    if settings.state is not None:
        raise ConfigError(
            "--state and --no-state do not apply with --distributor: each shard keeps its own "
            "state in --parts-dir"
        )
    if settings.organize is not None:
        raise ConfigError("--organize cannot be combined with --distributor yet")
    if settings.eval is not None:
        raise ConfigError(
            "--eval cannot be combined with --distributor: run 'batchclassify eval' on the "
            "merged .jsonl afterwards"
        )
    settings.pipeline_options()  # model, key, label file: their mistakes come before Ray
    parts_dir = options.parts_dir or Path(outputs[0]).with_name(Path(outputs[0]).name + ".parts")
    check_outputs(outputs, overwrite=settings.overwrite, append=settings.resume)
    planned = [PlannedPath(Path(spec), f"--out {spec}") for spec in outputs]
    planned += [
        PlannedPath(merging_name(Path(spec)), f"the merge's copy of {spec}") for spec in outputs
    ]
    planned.append(PlannedPath(parts_dir, f"--parts-dir {parts_dir}", folder=True))
    if settings.summary is not None:
        summary = Path(settings.summary)
        if summary.exists() and not settings.overwrite:
            raise ConfigError(f"summary file {str(summary)!r} already exists; pass --overwrite")
        planned.append(PlannedPath(summary, f"--summary {summary}"))
    check_paths(planned)
    resumed = _check_parts_dir(parts_dir, options, settings, outputs)
    key = settings.api_key
    return JobPlan(
        sources=tuple(sources),
        # The key travels apart (see the module docstring); api_key_file was read already.
        settings=settings.updated(
            api_key=None, api_key_file=None, endpoint=_without_credentials(settings.endpoint)
        ),
        outputs=outputs,
        parts_dir=parts_dir,
        options=options,
        resumed_shards=resumed,
        api_key=key,
        endpoint=settings.endpoint,
    )


def _check_parts_dir(
    parts_dir: Path, options: DistributeOptions, settings: RunSettings, outputs: Sequence[str]
) -> int | None:
    manifest = parts_dir / MANIFEST
    if not settings.resume:
        if manifest.exists() and not settings.overwrite:
            raise ConfigError(
                f"the parts folder {str(parts_dir)!r} holds an earlier distributed run: pass "
                "--resume to continue it, or --overwrite to start over"
            )
        return None
    if not manifest.exists():
        existing = [spec for spec in outputs if Path(spec).exists()]
        raise ConfigError(
            f"cannot resume: there is no distributed run in {str(parts_dir)!r}"
            + (f" for the existing output {existing[0]!r}" if existing else "")
            + " (give the run's --parts-dir)"
        )
    try:
        shards = int(json.loads(manifest.read_text(encoding="utf-8"))["shards"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read {str(manifest)!r}: {exc}") from None
    if options.shards is not None and options.shards != shards:
        raise ConfigError(
            f"the run in {str(parts_dir)!r} was split into {shards} shards: resume it with "
            f"--shards {shards} (or leave --shards out)"
        )
    return shards


# --- the driver ---------------------------------------------------------------------------


def run_command(
    sources: Sequence[str],
    settings: RunSettings,
    options: DistributeOptions,
    *,
    say: Callable[[str], None],
) -> int:
    """The CLI's ``run --distributor ray``: plan, run every shard, merge, summarise. Returns the
    exit code (0, 1 with failed rows, 130 interrupted); raises :class:`ConfigError` and
    :class:`RunAborted` like an ordinary run."""
    plan = plan_job(sources, settings, options)
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "auto", "local"):
        # ray.init would retry an address nobody answers at for minutes: say so at once.
        assert address is not None
        check_reachable(address)
    ray = import_ray()
    started_here = connect(ray, address)
    try:
        return _drive(ray, plan, say)
    finally:
        if started_here:
            ray.shutdown()


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--distributor ray needs Ray: {_PIP}") from None
    return ray


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address`` (``None``: a new local instance), unless this process
    is connected already; returns whether this call connected (and so must disconnect)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
    return True


def check_reachable(address: str) -> None:
    """Refuse an address with no TCP listener (or not HOST:PORT) before Ray tries it."""
    parsed = urlsplit(address if "://" in address else f"ray-gcs://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or port is None:
        raise ConfigError(
            f"--ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT, or auto)"
        )
    try:
        with socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} ({reason}): is 'ray start --head' "
            "running there, and is the port open from here?"
        ) from None


def _drive(ray: Any, plan: JobPlan, say: Callable[[str], None]) -> int:
    from batchclassify.merge import Part, merge_parts
    from batchclassify.runner import LABEL_COLUMNS

    started = time.monotonic()
    shards = plan.resumed_shards or plan.options.shards or _cluster_cpus(ray)
    _prepare_parts_dir(plan, shards)
    reports, to_run = _finished_earlier(plan, shards)
    if reports:
        say(f"{len(reports)} of {shards} shards are complete from an earlier run")
    try:
        reports.update(_run_shards(ray, plan, shards, to_run, say))
        stats = merged_stats([reports[index] for index in range(shards)], started)
        stopped = [reports[index] for index in range(shards) if reports[index].aborted]
        if stopped:
            say(stats.format())
            _write_summary(plan, {**stats.to_dict(), "shards": shards})
            first = stopped[0]
            raise RunAborted(
                f"{len(stopped)} of {shards} shards did not finish (shard {first.index}: "
                f"{first.aborted}). Nothing was merged; the finished shards are kept: run the "
                "same command with --resume to continue"
            )
        parts = [
            Part(ShardFiles.of(plan.parts_dir, index, shards).part, (index, shards), report.rows)
            for index, report in sorted(reports.items())
        ]
        columns = (*plan.settings.keep_columns, *(LABEL_COLUMNS if plan.settings.labels else ()))
        rows = asyncio.run(merge_parts(parts, plan.outputs, columns=columns))
    except KeyboardInterrupt:
        say(
            "interrupted: finished shards are kept; run the same command with --resume to "
            "continue where it stopped"
        )
        return 130
    stats.finished = time.monotonic()
    say(stats.format())
    say(f"{shards} shards merged: {rows} rows in {', '.join(plan.outputs)}")
    _write_summary(plan, {**stats.to_dict(), "shards": shards, "rows": rows})
    return 0 if stats.failed == 0 else 1


def _finished_earlier(
    plan: JobPlan, shards: int
) -> tuple[dict[int, ShardReport], list[tuple[int, bool]]]:
    """Shards whose parts an earlier run completed (kept as they are), and the shards to run,
    each with whether its complete part is run again for failures worth another try."""
    reports: dict[int, ShardReport] = {}
    to_run: list[tuple[int, bool]] = []
    for index in range(shards):
        files = ShardFiles.of(plan.parts_dir, index, shards)
        if not (plan.settings.resume and files.part.exists()):
            to_run.append((index, False))
            continue
        rows, retryable = _state_counts(files.state, all_failures=plan.settings.retry_failed)
        if rows is not None and not retryable:
            reports[index] = ShardReport(index=index, rows=rows, reused=True)
        else:
            to_run.append((index, True))
    return reports, to_run


def _run_shards(
    ray: Any,
    plan: JobPlan,
    shards: int,
    to_run: Sequence[tuple[int, bool]],
    say: Callable[[str], None],
) -> dict[int, ShardReport]:
    """Submit a task per shard and wait for them all; Ctrl-C cancels those still running."""
    task = ray.remote(run_shard).options(
        num_cpus=1,
        max_retries=plan.options.max_retries,
        # A shard that stopped itself (a bad key, an outage past --max-outage) reports it and
        # returns: running it again would fail the same way. Ray retries lost workers only.
        retry_exceptions=False,
    )
    rate = _shard_rate(plan.settings.rate, shards, _cluster_cpus(ray))
    secret = _Secret(plan.api_key, plan.endpoint)
    pending: dict[Any, int] = {}
    for index, rerun in to_run:
        shard_plan = ShardPlan(
            index=index,
            count=shards,
            sources=plan.sources,
            settings=plan.settings,
            parts_dir=str(plan.parts_dir),
            rate=rate,
            rerun=rerun,
        )
        pending[task.remote(shard_plan, secret)] = index
    if pending:
        say(f"running {len(pending)} of {shards} shards on Ray")
    reports: dict[int, ShardReport] = {}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                reports[index] = report = _collect(ray, ref, index)
                say(f"shard {index}/{shards}: {report.describe()}")
    except KeyboardInterrupt:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    return reports


def _write_summary(plan: JobPlan, summary: dict[str, Any]) -> None:
    if plan.settings.summary is None:
        return
    path = Path(plan.settings.summary)
    try:
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise RunAborted(f"cannot write the summary {str(path)!r}: {exc.strerror}") from None


def _prepare_parts_dir(plan: JobPlan, shards: int) -> None:
    parts_dir = plan.parts_dir
    try:
        parts_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --parts-dir {str(parts_dir)!r}: {exc.strerror}") from None
    if not plan.settings.resume:
        # --overwrite (checked in plan_job): only this module's own files go.
        for path in [*parts_dir.glob("shard-*-of-*"), parts_dir / MANIFEST]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    manifest = parts_dir / MANIFEST
    if not manifest.exists():
        manifest.write_text(json.dumps({"shards": shards}) + "\n", encoding="utf-8")


def _cluster_cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _shard_rate(rate: float | None, shards: int, cpus: int) -> float | None:
    """``--rate`` is the job's ceiling: shared by the shards that can run at once."""
    if rate is None:
        return None
    return rate / max(1, min(shards, cpus))


def _state_counts(path: Path, *, all_failures: bool) -> tuple[int | None, int]:
    """Rows of a finished shard's state, and how many of them a resume would try again."""
    if not path.exists():
        return None, 0
    reader = StateReader(path)
    try:
        return reader.count(), reader.retryable(all_failures=all_failures)
    finally:
        reader.close()


def _without_credentials(endpoint: str | tuple[str, ...]) -> str | tuple[str, ...]:
    if isinstance(endpoint, str):
        return without_userinfo(endpoint)
    return tuple(without_userinfo(url) for url in endpoint)


def _collect(ray: Any, ref: Any, index: int) -> ShardReport:
    try:
        report = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return ShardReport(index=index, aborted=f"{type(cause).__name__}: {cause}")
    except ray.exceptions.RayError as exc:
        # A worker or node lost more often than --max-retries, a cancelled task ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return ShardReport(index=index, aborted=f"{type(exc).__name__}: {first_line}")
    assert isinstance(report, ShardReport)
    return report


def merged_stats(reports: Sequence[ShardReport], started: float) -> RunStats:
    """One summary for the job: the shards' counts added up, latency histograms merged, the
    time the driver's (shards' clocks are not comparable)."""
    total = RunStats(started=started)
    for report in reports:
        total.done_earlier += report.rows if report.reused else 0
        stats = report.stats
        if stats is None:
            continue
        total.total += stats.total
        total.ok += stats.ok
        total.failed_by_type.update(stats.failed_by_type)
        total.classes.update(stats.classes)
        total.latency.merge(stats.latency)
        total.requests_sent += stats.requests_sent
        total.downloads_sent += stats.downloads_sent
        total.no_class += stats.no_class
        total.reused += stats.reused
        total.not_started += stats.not_started
        total.done_earlier += stats.done_earlier
    total.finished = time.monotonic()
    return total


# --- the task -----------------------------------------------------------------------------


class _Secret:
    """The API key and the endpoint(s) with their credentials, on their way to a task: never
    shown by ``repr`` (Ray prints task arguments in some errors, and shows them in its
    dashboard)."""

    __slots__ = ("_endpoint", "_value")

    def __init__(self, value: str | None, endpoint: str | tuple[str, ...] = "") -> None:
        self._value = value
        self._endpoint = endpoint

    def __repr__(self) -> str:
        return "_Secret(***)"

    def reveal(self) -> str | None:
        return self._value

    def endpoint(self) -> str | tuple[str, ...]:
        return self._endpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardPlan:
    """What one task needs (no key: that comes as a :class:`_Secret`)."""

    index: int
    count: int
    sources: tuple[str, ...]
    settings: RunSettings
    parts_dir: str
    rate: float | None
    #: the part is complete but its state holds failures to try again (``--resume``)
    rerun: bool = False


@dataclass(slots=True, kw_only=True)
class ShardReport:
    """What became of one shard."""

    index: int
    #: rows in its state (and part) when it finished
    rows: int = 0
    stats: RunStats | None = None
    #: why it stopped short (a fatal API error, a task lost too often ...); None: complete
    aborted: str | None = None
    #: this attempt took up an earlier attempt's state (a lost worker, or --resume)
    resumed: bool = False
    #: not run: complete from an earlier run of the job
    reused: bool = False

    def describe(self) -> str:
        if self.aborted is not None:
            return f"stopped: {self.aborted}"
        stats = self.stats
        now = f"{stats.total} classified now, " if stats is not None else ""
        return f"complete, {self.rows} rows ({now}{'resumed' if self.resumed else 'new'})"


def run_shard(plan: ShardPlan, key: _Secret) -> ShardReport:
    """The Ray task: run shard ``plan.index`` of ``plan.count`` to the end and publish its part.

    A plain function (``ray.remote`` wraps it at submit time, so this module imports without
    Ray). Safe to run again after any crash: it resumes from the shard's state."""
    if key.endpoint():
        plan = dataclasses.replace(plan, settings=plan.settings.updated(endpoint=key.endpoint()))
    return asyncio.run(_run_shard(plan, key.reveal()))


async def _run_shard(plan: ShardPlan, key: str | None) -> ShardReport:
    files = ShardFiles.of(Path(plan.parts_dir), plan.index, plan.count)
    if files.part.exists():
        if not plan.rerun:
            # An earlier attempt finished but its answer was lost (the worker died after it):
            # nothing to do again.
            rows, _ = _state_counts(files.state, all_failures=False)
            return ShardReport(index=plan.index, rows=rows or 0, reused=True)
        os.replace(files.part, files.working)  # back to work: the resume appends to it
    resume = files.state.exists()
    settings = plan.settings.updated(
        api_key=key,
        out=(str(files.working),),
        state=str(files.state),
        shard=f"{plan.index}/{plan.count}",
        resume=resume,
        # A working part without a state holds nothing committed: it may go.
        overwrite=not resume,
        summary=None,
        progress=False,
        rate=plan.rate,
    )
    if settings.emulate:
        # The driver's emulator would be out of reach on another node: one per shard.
        async with emulator.running_emulator() as url:
            return await _run_pipeline(plan, settings.updated(endpoint=url), files)
    return await _run_pipeline(plan, settings, files)


async def _run_pipeline(plan: ShardPlan, settings: RunSettings, files: ShardFiles) -> ShardReport:
    from batchclassify.runner import run

    outputs = [str(files.working)]
    try:
        stats = await run(
            list(plan.sources),
            settings.pipeline_options(),
            outputs=outputs,
            overwrite=settings.overwrite,
            state=settings.job_state(outputs),
            progress=False,
        )
    except RunAborted as exc:
        return ShardReport(
            index=plan.index, stats=exc.stats, aborted=str(exc), resumed=settings.resume
        )
    except ConfigError as exc:
        return ShardReport(index=plan.index, aborted=str(exc), resumed=settings.resume)
    # The runner closed (and fsynced) the part: now it may take its final name.
    await asyncio.to_thread(_publish, files)
    rows, _ = _state_counts(files.state, all_failures=False)
    return ShardReport(index=plan.index, rows=rows or 0, stats=stats, resumed=settings.resume)


def _publish(files: ShardFiles) -> None:
    os.replace(files.working, files.part)
    descriptor = os.open(files.part.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)

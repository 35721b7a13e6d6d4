"""``batchclassify emulate``: the command-line options and the serving loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
from dataclasses import fields

from batchclassify import loop as event_loop
from batchclassify.emulator.config import (
    DEFAULT_GPU_BATCH_LATENCY_MS,
    DEFAULT_GPU_PER_IMAGE_MS,
    MULTI_LABEL_COMPARES,
    REFUSABLE_FORMATS,
    EmulatorConfig,
)
from batchclassify.errors import ConfigError

__all__ = [
    "CLI_DESCRIPTION",
    "CLI_EPILOG",
    "LISTENING_PREFIX",
    "add_cli_arguments",
    "config_from_args",
    "serve_from_args",
]

#: first words of the line ``serve_from_args`` prints; scripts read the URL after it
LISTENING_PREFIX = "batchclassify emulator listening on "

CLI_DESCRIPTION = """\
Serve a local Roboflow-compatible image classification API.

It accepts what the service accepts: POST /MODEL/VERSION?api_key=KEY with the image
base64-encoded as the body (any Content-Type but multipart) or as the part named 'file' of a
multipart/form-data body; POST or GET with ?image=HTTPS_URL; the key as ?api_key= or
'Authorization: Bearer KEY' (the query wins when both are sent); ?confidence= as the server
reads it (>= 1 is percent, below 0.01 is raised to 0.01, 'best' and 'default' are 0.5). It also
serves the self-hosted server's JSON route POST /infer/classification (one image or a list)
and the model registry that inference-sdk asks first (GET /model/registry, POST /model/add).
Answers have the service's JSON shapes, with predictions that are a deterministic function of
the image file; errors have its statuses and bodies (401 {"status": 401, "message":
"Unauthorized api_key"} for a missing or wrong key). It can also misbehave on purpose (latency
with a long tail, rate limits, 5xx, chosen statuses, resets, hangs, garbage bodies) so you can
dry-run a batch job, or test a client, against realistic trouble. With --gpu-slots it models
a self-hosted GPU server, where several images per /infer/classification request share one
forward pass. GET /_emulator/stats shows what it saw; POST /_emulator/reset zeroes that."""

CLI_EPILOG = """\
examples:
  batchclassify emulate --port 9001 --latency-ms 180 --latency-p99-ms 5600 --fail-rate 0.02

  base64 -w0 cat.jpg | curl -s -X POST --data-binary @- \\
      -H 'Content-Type: application/x-www-form-urlencoded' \\
      'http://127.0.0.1:9001/my-project/1?api_key=anything&confidence=0.4'

  curl -s -F file=@cat.jpg -H 'Authorization: Bearer anything' \\
      'http://127.0.0.1:9001/my-project/1'

  curl -s http://127.0.0.1:9001/infer/classification -H 'Content-Type: application/json' \\
      -d '{"model_id": "my-project/1", "api_key": "anything",
           "image": {"type": "base64", "value": "'"$(base64 -w0 cat.jpg)"'"}}'

  # payment and pause errors now and then, as the hosted service gives them
  batchclassify emulate --fail-status 402:0.01,423:0.01,507:0.01

  # a self-hosted server with one GPU: 40 ms per request + 2 ms per image, one at a time
  batchclassify emulate --gpu-slots 1 --batch-latency-ms 40 --per-image-ms 2

  curl -s http://127.0.0.1:9001/_emulator/stats"""


def _rate(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return names


def _status_rates(text: str) -> dict[int, float]:
    """``"402:0.01,423:0.01"`` -> ``{402: 0.01, 423: 0.01}``."""
    rates: dict[int, float] = {}
    for entry in _name_list(text):
        status_text, sep, rate_text = entry.partition(":")
        try:
            status = int(status_text)
        except ValueError:
            status = 0
        if not sep or not 400 <= status <= 599:
            raise argparse.ArgumentTypeError(
                f"expected STATUS:PROBABILITY with a 4xx/5xx status, got {entry!r}"
            )
        if status in rates:
            raise argparse.ArgumentTypeError(f"status {status} is given twice")
        rates[status] = _rate(rate_text)
    return rates


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``emulate`` options to ``parser`` (defaults mirror :class:`EmulatorConfig`)."""
    defaults = EmulatorConfig()
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    net.add_argument(
        "--port",
        type=_port,
        default=9001,
        help="port to listen on; 0 picks a free one (default: %(default)s, like a "
        "self-hosted inference server)",
    )
    net.add_argument(
        "--refuse-formats",
        type=_format_names,
        default=frozenset(),
        metavar="LIST",
        help="answer 400 for images in these formats (comma-separated: "
        f"{', '.join(REFUSABLE_FORMATS)}), like a server whose decoder lacks them",
    )
    net.add_argument(
        "--allow-http-urls",
        dest="allow_http_image_urls",
        action="store_true",
        help="also fetch ?image= URLs that are http:// or point to loopback and private hosts "
        "(the service refuses them with 400, and so does the emulator by default)",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--classes",
        type=_name_list,
        default=defaults.classes,
        metavar="A,B,C",
        help=f"class names, in class_id order (default: {','.join(defaults.classes)})",
    )
    model.add_argument(
        "--multi-label",
        action="store_true",
        help="answer like a multi-label model (a dict of every class + predicted_classes)",
    )
    model.add_argument(
        "--multi-label-compare",
        choices=MULTI_LABEL_COMPARES,
        default=defaults.multi_label_compare,
        help="a multi-label class is in predicted_classes when its score is >= the threshold "
        "('ge', the server's newer default path) or > it ('gt', its older path) "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--api-key",
        default=None,
        help="accept only this key, answer 401 to others (default: any non-empty key)",
    )
    model.add_argument(
        "--models",
        type=_name_list,
        default=None,
        metavar="M/1,M/2",
        help="accept only these PROJECT/VERSION ids, answer 404 to others (default: any)",
    )
    model.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=defaults.max_body_bytes,
        metavar="N",
        help="largest request body before 413 (default: %(default)s, ~20 MiB of image "
        "once base64-encoded)",
    )
    trouble = parser.add_argument_group("simulated trouble")
    trouble.add_argument(
        "--latency-ms",
        type=_non_negative,
        default=0.0,
        metavar="MS",
        help="median added latency per request (hosted service: ~180)",
    )
    trouble.add_argument(
        "--latency-p99-ms",
        type=_non_negative,
        default=None,
        metavar="MS",
        help="make latency log-normal with this p99 (hosted service: ~5600); "
        "without it latency is constant",
    )
    trouble.add_argument(
        "--rate-limit",
        type=_positive,
        default=None,
        metavar="PER_S",
        help="answer 429 above this many requests per second (token bucket)",
    )
    trouble.add_argument(
        "--rate-limit-burst",
        type=_non_negative,
        default=None,
        metavar="N",
        help="requests allowed back to back before the rate limit bites (default: max(1, rate))",
    )
    trouble.add_argument(
        "--rate-limit-retry-after",
        type=_non_negative,
        default=None,
        metavar="S",
        help="send 'Retry-After: S' (rounded up) with each 429 (default: no header, "
        "as the hosted service promises none)",
    )
    for flag, help_text in (
        ("--fail-rate", "fraction of requests answered 500/502/503/504 (503 with Retry-After)"),
        ("--reset-rate", "fraction of connections reset after the request was read"),
        ("--hang-rate", "fraction of requests never answered (until --hang-seconds)"),
        ("--garbage-rate", "fraction of 200 answers with a truncated JSON, HTML or empty body"),
    ):
        trouble.add_argument(flag, type=_rate, default=0.0, metavar="P", help=help_text)
    trouble.add_argument(
        "--fail-status",
        dest="fail_statuses",
        type=_status_rates,
        default={},
        metavar="CODE:P,...",
        help="answer these statuses with these probabilities, with the service's bodies "
        '({"status": N, "message": ...} for 401/402, {"message": ...} otherwise; 503 '
        "with Retry-After: 1), e.g. 402:0.01,423:0.01,507:0.01",
    )
    trouble.add_argument(
        "--hang-seconds",
        type=_non_negative,
        default=defaults.hang_seconds,
        metavar="S",
        help="how long a hung request is held open at most (default: %(default)s)",
    )
    trouble.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for every random choice, for reproducible runs (default: %(default)s)",
    )
    gpu = parser.add_argument_group(
        "simulated GPU (a self-hosted inference server)",
        "Off unless --gpu-slots is given. Then a request of n images (1 on the /MODEL/VERSION "
        "route, the length of the list on /infer/classification) holds one of the GPU's slots "
        "for --batch-latency-ms + n x --per-image-ms; requests that find every slot taken "
        "wait, first come first served. This comes after --latency-ms (network time, which "
        "holds no slot), and only answers with predictions use the GPU. /_emulator/stats "
        "reports it under 'gpu'.",
    )
    gpu.add_argument(
        "--gpu-slots",
        type=_positive_int,
        default=None,
        metavar="K",
        help="requests the GPU runs at once (1 = one model instance on one GPU)",
    )
    gpu.add_argument(
        "--batch-latency-ms",
        dest="gpu_batch_latency_ms",
        type=_non_negative,
        default=None,
        metavar="MS",
        help=f"time a request holds its slot whatever its size (default with --gpu-slots: "
        f"{DEFAULT_GPU_BATCH_LATENCY_MS:g})",
    )
    gpu.add_argument(
        "--per-image-ms",
        dest="gpu_per_image_ms",
        type=_non_negative,
        default=None,
        metavar="MS",
        help=f"time each image of a request adds to that (default with --gpu-slots: "
        f"{DEFAULT_GPU_PER_IMAGE_MS:g})",
    )
    # Lets config_from_args report cross-option errors in argparse's own format.
    parser.set_defaults(emulator_parser=parser)


def _format_names(text: str) -> frozenset[str]:
    names = frozenset(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = sorted(names - set(REFUSABLE_FORMATS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown format {unknown[0]!r} (one of {', '.join(REFUSABLE_FORMATS)})"
        )
    return names


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Build the config from parsed options.

    Errors that involve several options (p99 below the median, rates adding up to more than 1)
    exit like any argparse error when ``args`` came from a parser set up by
    :func:`add_cli_arguments`; otherwise :class:`ConfigError` is raised.
    """
    known = {f.name for f in fields(EmulatorConfig)}
    values = {name: getattr(args, name) for name in known if hasattr(args, name)}
    if values.get("models") is not None:
        values["models"] = frozenset(values["models"])
    if values.get("rate_limit") is None:
        for dependent in ("rate_limit_burst", "rate_limit_retry_after"):
            if values.get(dependent) is not None:
                _config_error(args, f"--{dependent.replace('_', '-')} needs --rate-limit")
    if values.get("gpu_slots") is None:
        for dependent, flag in (
            ("gpu_batch_latency_ms", "--batch-latency-ms"),
            ("gpu_per_image_ms", "--per-image-ms"),
        ):
            if values.get(dependent) is not None:
                _config_error(args, f"{flag} needs --gpu-slots (the GPU model is off without it)")
    try:
        return EmulatorConfig(**values)
    except ConfigError as exc:
        _config_error(args, str(exc))
        raise  # pragma: no cover - _config_error always raises


def _config_error(args: argparse.Namespace, message: str) -> None:
    parser = getattr(args, "emulator_parser", None)
    if isinstance(parser, argparse.ArgumentParser):
        parser.error(message)  # exits with status 2 and the usage line
    raise ConfigError(message)


def serve_from_args(args: argparse.Namespace) -> int:
    """Run the emulator until Ctrl-C or SIGTERM; return the process exit status."""
    config = config_from_args(args)
    try:
        return event_loop.run(_serve(config, args.host, args.port))
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed, or Windows
        return 0


async def _serve(config: EmulatorConfig, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        from batchclassify.emulator.server import running_emulator  # aiohttp.web: only now

        async with running_emulator(config, host=host, port=port) as url:
            print(f"{LISTENING_PREFIX}{url}", flush=True)
            await stop.wait()
    except OSError as exc:
        print(
            f"batchclassify emulate: error: cannot listen on {host}:{port}: {exc.strerror or exc}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0

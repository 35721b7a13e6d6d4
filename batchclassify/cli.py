"""The ``batchclassify`` command: argument parsing, exit codes, friendly errors. Nothing else."""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import ctypes
import difflib
import glob
import logging
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# Only what building the parser and reading the settings need: every command starts here, and
# each imports the rest itself (a run does not load the report, --help not even aiohttp).
from batchclassify import __version__, distribute, emulator
from batchclassify import loop as event_loop
from batchclassify.config import ResolvedSettings, RunSettings, format_settings, resolve_settings
from batchclassify.endpoints import CONFIDENCE_KEYWORDS
from batchclassify.errors import ConfigError, RunAborted, redact, url_secrets
from batchclassify.text import for_terminal

if TYPE_CHECKING:
    from batchclassify.pipeline import RunningPipeline

EXIT_OK = 0
EXIT_FAILED_ITEMS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

RUN_EPILOG = """\
examples:
  # dry run against the built-in emulator, no key needed
  batchclassify run samples/ --model demo/1 --emulate --out results.jsonl

  # a folder, a URL list and a CSV against the hosted API
  export ROBOFLOW_API_KEY=...
  batchclassify run photos/ urls.txt dataset.csv --model flowers-abc12/3 \\
      --out results.jsonl --out results.csv --max-size 640

  # a self-hosted Roboflow Inference server, paths from another program on stdin
  find /data -name '*.jpg' | batchclassify run - --model flowers-abc12/3 \\
      --endpoint http://localhost:9001 --out -

exit codes: 0 all ok, 1 finished with failed items, 2 usage/configuration/fatal API error
(bad key, unknown model), 130 interrupted (the same command with --resume continues).
"""


SCAN_EPILOG = """\
examples:
  # every 10 minutes from cron: only new or changed files cost an API call
  */10 * * * * batchclassify scan /data/incoming --model flowers-abc12/3 --out /data/labels.jsonl

  # or keep running, scanning every 10 minutes until stopped
  batchclassify scan /data/incoming --model flowers-abc12/3 --out labels.jsonl --interval 600
"""


VERIFY_EPILOG = """\
example:
  batchclassify run photos/ --model flowers-abc12/3 --out results.jsonl --out results.csv
  batchclassify verify photos/ --out results.jsonl --out results.csv
"""


#: where a (sub)parser that met arguments it does not know leaves itself in the namespace
_UNRECOGNIZED_BY = "_batchclassify_unrecognized_by"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the nearest option or command for a typo
    (``--concurency``: did you mean --concurrency?), as argparse itself does not before
    Python 3.14; and which reports unknown arguments with the usage of the (sub)command they
    were given to, not the top-level one."""

    def parse_args(self, *args: Any, **kwargs: Any) -> Any:
        namespace, extras = self.parse_known_args(*args, **kwargs)
        owner = vars(namespace).pop(_UNRECOGNIZED_BY, self)
        if extras:
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        # A subcommand's parser runs first and returns what it did not know; its namespace is
        # copied into its parent's, so the innermost parser that had leftovers is remembered.
        namespace, extras = super().parse_known_args(*args, **kwargs)
        if extras and not hasattr(namespace, _UNRECOGNIZED_BY):
            setattr(namespace, _UNRECOGNIZED_BY, self)
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        super().error(message + self._suggestion(message))

    def _suggestion(self, message: str) -> str:
        if "did you mean" in message or "maybe you meant" in message:
            return ""  # a Python that suggests by itself
        unknown = re.search(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [name for name in self._option_string_actions if name.startswith("--")]
            pairs = []
            for word in unknown[1].split():
                if word.startswith("--"):
                    typed = word.split("=", 1)[0]
                    match = _closest(typed, options)
                    if match:
                        pairs.append((typed, match))
            if len(pairs) == 1:
                return f"; did you mean {pairs[0][1]}?"
            if pairs:
                return "; did you mean " + ", ".join(f"{m} for {t}" for t, m in pairs) + "?"
            return ""
        choice = re.search(r"argument (.+?): invalid choice: ('[^']*'|\"[^\"]*\")", message)
        if choice:
            with contextlib.suppress(ValueError, SyntaxError):
                typed = str(ast.literal_eval(choice[2]))
                match = _closest(typed, self._choices_of(choice[1]))
                if match:
                    return f"; did you mean {match}?"
        return ""

    def _choices_of(self, name: str) -> list[str]:
        """The choices of the argument that argparse calls ``name`` in its messages (an
        option's strings, or a positional's metavar or dest, e.g. COMMAND)."""
        for action in self._actions:
            if action.choices is None:
                continue
            names = {"/".join(action.option_strings), action.metavar, action.dest}
            if name in names:
                return [str(choice) for choice in action.choices]
        return []


def _closest(typed: str, candidates: Sequence[str]) -> str | None:
    """The candidate a typo most likely meant, compared without the leading dashes."""
    bare = {candidate.lstrip("-"): candidate for candidate in candidates}
    matches = difflib.get_close_matches(typed.lstrip("-"), list(bare), n=1, cutoff=0.7)
    return bare[matches[0]] if matches else None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchclassify",
        description="Classify very many images through a Roboflow-compatible HTTP API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run_parser = commands.add_parser(
        "run",
        help="classify images from folders, files, URLs and lists; write JSONL/CSV results",
        description="Classify every image from the given sources and write one result per input.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(run_parser)
    distribute.add_arguments(run_parser)  # --distributor ray: distribute.py

    scan_parser = commands.add_parser(
        "scan",
        help="classify only new or changed files in folders (for cron / systemd timers)",
        description="Classify the files that are new or changed since the last scan and append "
        "their results. The state file remembers what was done; a lock keeps two scans of the "
        "same state from running at once.",
        epilog=SCAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(scan_parser)
    scan_parser.add_argument(
        "--interval",
        type=float,
        metavar="S",
        help="keep scanning every S seconds until interrupted (default: scan once)",
    )

    config_parser = commands.add_parser(
        "config",
        help="show the effective settings and where each one comes from",
        description="Show the settings a run would use, and where each comes from (default, "
        "config file, environment, command line). The API key is never shown.",
    )
    config_commands = config_parser.add_subparsers(
        dest="config_command", required=True, parser_class=_Parser
    )
    show = config_commands.add_parser(
        "show",
        help="print the effective settings (accepts every 'run' option)",
        description="Print the effective settings as TOML, with where each comes from; takes "
        "the same options as 'run'.",
    )
    add_run_arguments(show)

    verify_parser = commands.add_parser(
        "verify",
        help="check a finished run: every input has its row, every output holds the state",
        description="Check a run, with the same command line as the run itself ('run' replaced "
        "by 'verify'): every output must hold exactly the rows of the state, in order, each "
        "one whole and valid; and, when sources are given, every input must have a row. "
        "Sends no request. Exit 0 when all holds, 1 when something is missing (--resume "
        "completes it), 2 when the state cannot be read.",
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(verify_parser)

    report_parser = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a results file (.jsonl, .csv or .parquet)",
        description="Summarise a results file as one self-contained HTML page: the run's "
        "settings, totals, class distribution, confidence histogram, the least confident "
        "images, errors and latency; with --labels (JSONL results) or --eval, an evaluation "
        "against ground truth: accuracy, per-class metrics, confusion matrix and likely label "
        "errors. Exit 2 when the file is not results at all.",
        epilog="examples:\n  batchclassify report results.jsonl -o report.html --summary s.json"
        "\n  batchclassify report results.jsonl --labels parent"
        "\n  batchclassify report results.csv --eval e.json   (written by batchclassify eval)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report_parser.add_argument(
        "results",
        metavar="RESULTS",
        help="results written by run --out: .jsonl (or .ndjson), .csv, or .parquet (with pyarrow)",
    )
    report_parser.add_argument(
        "--out", "-o", metavar="FILE.html", help="where to write the page (default: RESULTS.html)"
    )
    report_parser.add_argument(
        "--summary", metavar="FILE.json", help="the run's --summary file, for elapsed time and rate"
    )
    report_parser.add_argument(
        "--state",
        metavar="PATH",
        help="the run's state file, for its model, endpoint and settings (opened read-only; "
        "default: RESULTS.state, if there is one)",
    )
    report_parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing report"
    )
    report_parser.add_argument(
        "--thumbnails",
        type=int,
        default=24,
        metavar="N",
        help="least confident images to show (default %(default)s; 0: none)",
    )
    report_parser.add_argument(
        "--thumb-size",
        type=int,
        default=160,
        metavar="PX",
        help="thumbnail size in pixels (default %(default)s)",
    )
    truth = report_parser.add_mutually_exclusive_group()
    truth.add_argument(
        "--labels",
        metavar="SOURCE",
        help="evaluate against ground truth, as batchclassify eval does (JSONL results only): "
        "'parent', 'column:NAME', or a label file FILE.csv / FILE.jsonl",
    )
    truth.add_argument(
        "--eval",
        metavar="E.json",
        help="show the evaluation that 'batchclassify eval --eval E.json' wrote",
    )
    report_parser.add_argument(
        "--column-label",
        metavar="NAME",
        help="with --labels FILE: its label column (default: label, else class)",
    )
    report_parser.add_argument(
        "--label-error-threshold",
        type=float,
        metavar="X",
        help="with --labels: a likely label error is a row whose top differs from its label "
        "with at least this confidence (default 0.8)",
    )
    report_parser.add_argument(
        "--label-errors",
        type=int,
        default=24,
        metavar="N",
        help="likely label errors to show as thumbnails (default %(default)s; 0: none)",
    )

    export_parser = commands.add_parser(
        "export",
        help="export results for labeling (Label Studio tasks) or as a Hugging Face imagefolder",
        description="Turn JSONL results into Label Studio import tasks with pre-annotations "
        "(FILE.json, plus its labeling config FILE.label_config.xml), or into a Hugging Face "
        "imagefolder dataset (DIR/<label>/<file> hard links or copies, DIR/metadata.jsonl). "
        "With --review-below, rows under that confidence (or without a predicted class) go to "
        "review: only they become Label Studio tasks; imagefolder marks them review=true. "
        "Failed rows are never exported; missing files are skipped; both are counted. Exit 2 "
        "when the results are not JSONL or an output exists (without --overwrite).",
        epilog="examples:\n"
        "  batchclassify export results.jsonl --to label-studio tasks.json --review-below 0.8 \\\n"
        "      --document-root /data/photos\n"
        "  batchclassify export results.jsonl --to imagefolder dataset/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export_parser.add_argument(
        "results", metavar="RESULTS.jsonl", help="results written by run --out"
    )
    export_parser.add_argument(
        "--to",
        nargs=2,
        required=True,
        metavar=("FORMAT", "DEST"),
        help="label-studio FILE.json, or imagefolder DIR",
    )
    export_parser.add_argument(
        "--review-below",
        type=float,
        metavar="X",
        help="send rows with confidence under X (0-1) to review; the rest are accepted "
        "(default: only rows without a predicted class go to review, and every row becomes a "
        "Label Studio task)",
    )
    export_parser.add_argument(
        "--from-name",
        metavar="NAME",
        help="label-studio: the name of the <Choices> tag (default choice)",
    )
    export_parser.add_argument(
        "--to-name",
        metavar="NAME",
        help="label-studio: the name of the <Image> tag (default image)",
    )
    export_parser.add_argument(
        "--export-url-prefix",
        metavar="PREFIX",
        help="label-studio: a local file's image URL is PREFIX + its percent-encoded path "
        "relative to --document-root (default /data/local-files/?d=, Label Studio's local files "
        "storage)",
    )
    export_parser.add_argument(
        "--document-root",
        metavar="DIR",
        help="label-studio: local paths are made relative to DIR, Label Studio's "
        "LOCAL_FILES_DOCUMENT_ROOT (default /); files outside it are skipped",
    )
    export_parser.add_argument(
        "--model-version",
        metavar="NAME",
        help="label-studio: the predictions' model_version (default batchclassify)",
    )
    export_parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing tasks/config files, or add to an existing non-empty DIR",
    )

    rethreshold_parser = commands.add_parser(
        "rethreshold",
        help="apply another --confidence to finished results, without a request",
        description="Rows keep every score the server returned, so another threshold needs no "
        "request: predicted_classes is recomputed, top/confidence stay the best class. Reads a "
        "JSONL output, writes new outputs (.jsonl, .csv, .parquet, - for stdout).",
        epilog="example:\n  batchclassify rethreshold results.jsonl --confidence 0.7 "
        "--out strict.jsonl --out strict.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rethreshold_parser.add_argument(
        "results", metavar="RESULTS.jsonl", help="results written by run --out"
    )
    rethreshold_parser.add_argument(
        "--confidence", type=float, required=True, metavar="X", help="the new threshold (0-1)"
    )
    rethreshold_parser.add_argument(
        "--out", "-o", action="append", required=True, metavar="FILE", help="where to write"
    )
    rethreshold_parser.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs"
    )

    eval_parser = commands.add_parser(
        "eval",
        help="score finished results against ground-truth labels (accuracy, confusion, ...)",
        description="Score JSONL results against labels, without a request: accuracy, top-1/3/5 "
        "accuracy, per-class precision/recall/F1, macro and weighted averages, the confusion "
        "matrix, labels the model never predicts, and likely label errors (a confident top "
        "that differs from the label). A summary goes to stderr; --eval writes the JSON. "
        "Failed and unlabeled rows are counted, not scored. Exit 2 when an input is unusable.",
        epilog="examples:\n  batchclassify eval results.jsonl --labels parent --eval eval.json\n"
        "  batchclassify eval results.jsonl --labels labels.csv --column-label species\n"
        "  batchclassify eval results.jsonl --labels column:label",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    eval_parser.add_argument(
        "results", metavar="RESULTS.jsonl", help="results written by run --out"
    )
    eval_parser.add_argument(
        "--labels",
        required=True,
        metavar="SOURCE",
        help="the ground truth: 'parent' (the folder holding each file), 'column:NAME' (a list "
        "column kept with --keep-columns), or a label file FILE.csv / FILE.jsonl with a "
        "path/source/image/url/file_name column and a label/class column",
    )
    eval_parser.add_argument(
        "--column-label",
        metavar="NAME",
        help="the label column of the label file (default: label, else class)",
    )
    eval_parser.add_argument(
        "--label-error-threshold",
        type=float,
        default=0.8,
        metavar="X",
        help="report a row as a likely label error when its top differs from its label with "
        "at least this confidence (default %(default)s)",
    )
    eval_parser.add_argument(
        "--eval", metavar="OUT.json", help="write the metrics as JSON (- for stdout)"
    )
    eval_parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --eval file"
    )

    emulate = commands.add_parser(
        "emulate",
        help="serve a local Roboflow-compatible classification API (for tests and dry runs)",
        description=emulator.CLI_DESCRIPTION,
        epilog=emulator.CLI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    emulator.add_cli_arguments(emulate)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options default to ``None`` so that only what the user typed overrides other settings."""
    defaults = RunSettings()
    parser.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="image folder (recursive), image file, http(s) URL, list file (.txt, .csv, .jsonl), "
        "object storage prefix, object or list (s3://BUCKET/PREFIX/, gs://, az://; pip install "
        "'batchclassify[s3]') or - for a list of paths/URLs on stdin (default: 'sources' of "
        "the --config file)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read settings from a TOML file (keys are these long option names with _ for -); "
        "command line and environment (ROBOFLOW_API_KEY, BATCHCLASSIFY_<NAME>) take precedence",
    )
    what = parser.add_argument_group("what to call")
    what.add_argument(
        "--model",
        help="PROJECT/VERSION, e.g. flowers-abc12/3 (a workspace/ prefix is accepted and dropped)",
    )
    what.add_argument(
        "--endpoint",
        action="append",
        metavar="URL",
        help=f"base URL of the API, or serverless, eu, legacy, local (default {defaults.endpoint}"
        ", or the EU host with ROBOFLOW_REGION=eu); a self-hosted inference server is e.g. "
        "http://localhost:9001 (= local). Repeat for a fleet of servers of the same model: "
        "requests go to the least busy one, a failing one is left out for a while and probed "
        "back, a retry goes to another one; the first one stands for the fleet in the state "
        "(--resume), so servers may be added after it",
    )
    what.add_argument(
        "--api-key",
        help="API key (default: $ROBOFLOW_API_KEY); never printed. Note: other users of this "
        "machine can read a command line (ps): prefer ROBOFLOW_API_KEY or --api-key-file",
    )
    what.add_argument(
        "--api-key-transport",
        choices=("header", "query", "both"),
        help="send the key as an Authorization: Bearer header, as ?api_key= in the URL, or "
        "both (default: header for hosted Roboflow hosts, so the key is never in a URL; both "
        "for other servers, which may predate the header)",
    )
    what.add_argument(
        "--upload",
        choices=("base64", "multipart"),
        help="send images as base64 text or as the raw file in a multipart part (25%% fewer "
        "bytes, no base64 work; default: base64 for hosted Roboflow hosts, multipart for "
        "self-hosted servers, where it is certain)",
    )
    what.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="read the API key from this file (- for the first line of stdin); it wins over "
        "ROBOFLOW_API_KEY",
    )
    what.add_argument(
        "--confidence",
        type=_confidence,
        metavar="X",
        help="threshold on the scores, a probability 0-1 (default 0.4, the server's): every "
        "row keeps the whole distribution the server returns (it is asked for all classes over "
        "0.01) and predicted_classes lists those over X; 'best' or 'default' use the server's "
        "own thresholds instead (then the server filters)",
    )
    what.add_argument(
        "--emulate",
        action="store_true",
        default=None,
        help="start the built-in emulator on a free loopback port and run against "
        "it (offline, no key needed); wins over an endpoint from the environment or a config "
        "file (a dry run of a real job), refused beside --endpoint",
    )

    io_group = parser.add_argument_group("inputs and outputs")
    io_group.add_argument(
        "--out",
        "-o",
        action="append",
        metavar="FILE",
        help="write results to FILE: .jsonl, .csv or .parquet (needs pyarrow) by extension, "
        "- for JSONL on stdout (once), or an object (s3://BUCKET/labels.jsonl, gs://, az://: "
        "staged locally, uploaded at checkpoints); repeat for several outputs",
    )
    io_group.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace existing output files instead of refusing",
    )
    io_group.add_argument("--summary", metavar="FILE.json", help="also write the summary as JSON")
    io_group.add_argument(
        "--ext",
        metavar="LIST",
        help=f"image extensions to pick up in folders (default {defaults.ext})",
    )
    io_group.add_argument(
        "--column",
        help="column/field holding the path or URL in .csv/.jsonl "
        "lists (default: the first of url, path, image)",
    )
    truth = parser.add_argument_group("evaluation against known labels")
    truth.add_argument(
        "--labels",
        metavar="SPEC",
        help="ground truth: 'parent' (the folder of each image, the folder-per-class layout), "
        "'column:NAME' (a list column kept with --keep-columns) or a CSV/JSONL label file; "
        "every row gains label and correct",
    )
    truth.add_argument(
        "--eval",
        metavar="FILE.json",
        help="with --labels: at the end, write accuracy, top-k, per-class metrics, the "
        "confusion matrix and likely label errors here (needs a .jsonl --out) and print a summary",
    )
    truth.add_argument(
        "--label-error-threshold",
        type=float,
        metavar="X",
        help="a row is a likely label error when its top differs from its label with at least "
        "this confidence (default 0.8)",
    )
    io_group.add_argument(
        "--keep-columns",
        type=_names,
        metavar="NAMES",
        help="carry these columns (CSV) or fields (JSONL) of list files into every result row, "
        "e.g. id,split, so results join back to your tables ('columns' in JSONL, extra CSV "
        "columns; empty for inputs that are not list entries)",
    )
    io_group.add_argument(
        "--url-mode",
        choices=("auto", "reference", "fetch", "presign"),
        help="how URLs are sent: reference = the service fetches them "
        "(image=), fetch = downloaded here and sent inline, auto = https by "
        "reference and everything else fetched (default auto); presign = as auto, and s3:// "
        "objects as presigned URLs the service fetches (by default objects are read here and "
        "sent inline)",
    )
    io_group.add_argument(
        "--upload-interval",
        type=float,
        metavar="S",
        help="outputs in object storage (--out s3://BUCKET/labels.jsonl) are written to a local "
        "file beside the state and uploaded every S seconds and at the end, whole each time "
        "(default 300)",
    )
    io_group.add_argument(
        "--fetch-urls",
        dest="url_mode",
        action="store_const",
        const="fetch",
        help="same as --url-mode fetch",
    )
    io_group.add_argument(
        "--max-size",
        type=int,
        metavar="PX",
        help="downscale so the longer side is at most PX before upload "
        "(e.g. the model's input size; default: send originals)",
    )
    io_group.add_argument(
        "--jpeg-quality",
        type=int,
        metavar="Q",
        help=f"JPEG quality for re-encoded images (default {defaults.jpeg_quality})",
    )

    job = parser.add_argument_group("resume, dedup, sharding")
    job.add_argument(
        "--state",
        metavar="PATH",
        help="SQLite file recording what each input became (default: beside the "
        "first --out file, e.g. results.jsonl.state)",
    )
    job.add_argument(
        "--no-state",
        dest="state",
        action="store_const",
        const="",
        help="keep no state (no --resume possible)",
    )
    job.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue an interrupted or crashed run: inputs already done cost no "
        "request, outputs are repaired and appended",
    )
    job.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="with --resume: also retry inputs that failed permanently (by default "
        "only timeouts, connection errors, 429 and 5xx are retried)",
    )
    job.add_argument(
        "--no-dedup",
        dest="dedup",
        action="store_false",
        default=None,
        help="classify byte-identical copies separately (default: once per content)",
    )
    job.add_argument(
        "--shard",
        metavar="K/N",
        help="take only shard K of N (K = 0..N-1) of the inputs, to split one job over "
        "N machines with no coordination",
    )

    labels = parser.add_argument_group("labeling output")
    labels.add_argument(
        "--organize",
        metavar="DIR",
        help="also place each local image into DIR/<class>/ (failures in "
        "DIR/_failed, low confidence in DIR/_uncertain); URL inputs are skipped",
    )
    labels.add_argument(
        "--organize-mode",
        choices=("link", "copy", "symlink"),
        help="hard link (copy across filesystems), copy, or absolute symlink (default link)",
    )
    labels.add_argument(
        "--min-confidence",
        type=float,
        metavar="X",
        help="with --organize: classes scored under X (0..1) count as uncertain",
    )

    speed = parser.add_argument_group("speed and resilience")
    speed.add_argument(
        "--concurrency",
        "-c",
        type=int,
        metavar="N",
        help=f"requests in flight at once (default {defaults.concurrency})",
    )
    speed.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="never send more than R requests per second (default: no fixed limit)",
    )
    speed.add_argument(
        "--no-adaptive",
        dest="adaptive",
        action="store_false",
        default=None,
        help="do not slow down automatically on 429/503 answers",
    )
    speed.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help=f"attempts per image, the first included (default {defaults.retries})",
    )
    speed.add_argument(
        "--max-wait",
        type=float,
        metavar="S",
        help=f"longest single backoff wait (default {defaults.max_wait:g} s; a "
        "server's Retry-After is always honoured)",
    )
    speed.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help=f"per-request timeout (default {defaults.timeout:g} s)",
    )
    speed.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help=f"connection timeout (default {defaults.connect_timeout:g} s)",
    )
    speed.add_argument(
        "--max-failures",
        type=int,
        metavar="N",
        help="abort after N images failed on request errors (default: never)",
    )
    speed.add_argument(
        "--hedge-after",
        type=_hedge_after,
        metavar="S|auto|off",
        help="send a classify request still pending after S seconds once more (to another "
        "server of a fleet when there is one); the first answer wins, the other is cancelled, "
        "one row either way. 'auto': after the p95 of recent latencies. At most 5%% of requests "
        "are hedged. Off by default (off turns off what a config file turned on): each copy is "
        "a request the service may bill",
    )
    speed.add_argument(
        "--max-outage",
        type=float,
        metavar="S",
        help="abort when no request has succeeded for this long, whatever the server answers "
        f"(default {defaults.max_outage:g} s)",
    )
    speed.add_argument(
        "--max-response-bytes",
        type=int,
        metavar="N",
        help=f"read at most N bytes of an answer, decompressed (default "
        f"{defaults.max_response_bytes}); a larger one fails its image (a classify answer is a "
        "few KB)",
    )
    speed.add_argument(
        "--queue-size",
        type=int,
        metavar="N",
        help="items buffered between stages (default 2 x concurrency)",
    )
    speed.add_argument(
        "--batch-size",
        type=_batch_size,
        metavar="N|auto",
        help="self-hosted servers only: send N images per request to the batch route "
        "(POST /infer/classification), which a GPU runs in about the time of a few; rows, "
        "retries and dedup stay per image, and a batch refused for one bad image is split "
        "to find it. auto: a quarter of --concurrency, 2 to 32 (default 1: one image per "
        "request)",
    )
    speed.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        help="auto (the default): uvloop when it is installed (pip install "
        "'batchclassify[fast]'), which takes a good part of the client's CPU per request off; "
        "asyncio: the standard loop",
    )
    speed.add_argument(
        "--processes",
        type=_processes,
        metavar="N|auto",
        help="worker processes, each with its own event loop, for more than one core: one "
        "run all the same (one state, one set of outputs, one progress bar). auto (the "
        "default): one per core, as many as the concurrency keeps busy (one per 128 requests "
        "in flight), 1 with stdin",
    )
    speed.add_argument(
        "--shutdown-grace",
        type=float,
        metavar="S",
        help=f"after Ctrl-C, how long in-flight requests may finish (default "
        f"{defaults.shutdown_grace:g} s)",
    )

    ux = parser.add_argument_group("display")
    ux.add_argument(
        "--verbose",
        "-v",
        action="count",
        default=0,
        help="log retries, rate changes and outages to stderr, and what the image library "
        "says about odd files (kept quiet otherwise: they are reported in their rows); "
        "-vv: debug",
    )
    ux.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar on stderr even when it is not a terminal",
    )
    ux.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bar (default: shown when stderr is a terminal)",
    )


def _confidence(text: str) -> float | str:
    """``0.5`` or a keyword; range and keywords are checked with the other settings."""
    lowered = text.strip().lower()
    if lowered in CONFIDENCE_KEYWORDS:
        return lowered
    try:
        return float(lowered)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a probability (0-1) or one of {', '.join(CONFIDENCE_KEYWORDS)}"
        ) from None


def _number_or_auto(what: str, kind: type[int] | type[float] = int, *, off: bool = False) -> Any:
    """An argparse type: a number (``4``, or ``2.5`` for a float ``kind``) or ``auto`` (and
    ``off`` when it may be turned off); ranges are checked with the other settings."""

    def parse(text: str) -> int | float | str:
        lowered = text.strip().lower()
        if lowered == "auto" or (off and lowered == "off"):
            return lowered
        try:
            return kind(lowered)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of {what} or auto"
            ) from None

    return parse


_processes = _number_or_auto("processes")
_batch_size = _number_or_auto("images")
_hedge_after = _number_or_auto("seconds", float, off=True)


def _names(text: str) -> tuple[str, ...]:
    """``"id, split"`` -> ``("id", "split")``."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ResolvedSettings:
    """Command-line values over environment over config file over defaults."""
    given: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name in RunSettings.names() and value is not None
    }
    for name in ("out", "sources", "endpoint"):
        if given.get(name):
            given[name] = tuple(given[name])
        else:
            given.pop(name, None)
    config = Path(args.config) if getattr(args, "config", None) else None
    return resolve_settings(given, environ, config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "emulate":
        return emulator.serve_from_args(args)
    if args.command == "report":
        return _report_command(args)
    if args.command == "export":
        return _export_command(args)
    if args.command == "rethreshold":
        return _rethreshold_command(args)
    if args.command == "eval":
        return _eval_command(args)
    try:
        resolved = settings_from_args(args, os.environ)
        settings = resolved.settings
        endpoint_secrets = [s for url in settings.endpoints for s in url_secrets(url)]
        _secrets[:] = [key for key in (settings.api_key, *endpoint_secrets) if key]
        _configure_logging(getattr(args, "verbose", 0))
        for warning in resolved.warnings:
            _say(warning)
        if args.command == "config":
            print(_printable(format_settings(resolved)))
            return EXIT_OK
        if not settings.sources:
            raise ConfigError(
                "no inputs: name folders, files, URLs or lists (or - for stdin), or set "
                "'sources' in the --config file"
            )
        if settings.api_key_file == "-" and "-" in settings.sources:
            raise ConfigError("stdin cannot hold both the key (--api-key-file -) and the inputs")
        if args.command == "verify":
            from batchclassify import verify

            return verify.verify_command(settings, say=_say)
        # run --distributor ray: the job runs as shards on a Ray cluster (distribute.py)
        distributed = distribute.options_from_args(args)
        if distributed is not None:
            return distribute.run_command(settings.sources, settings, distributed, say=_say)
        if args.command == "scan":
            settings = settings.updated(resume=True)
        sources = list(settings.sources)
        try:
            return event_loop.run(
                _run_command(sources, settings, scan=args.command == "scan"), settings.event_loop
            )
        except KeyboardInterrupt:
            # A Ctrl-C before the run's handlers were in place, or after they were removed
            # with the closing loop (the run had ended and said so): an interruption all the
            # same, not a traceback.
            return EXIT_INTERRUPTED
    except ConfigError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    except RunAborted as exc:
        _say(f"error: run stopped: {exc}")
        return EXIT_USAGE
    except Exception:
        # A bug, or an environment problem nobody anticipated: show what happened (the key
        # scrubbed from the traceback too), and fail like a fatal error.
        _say(traceback.format_exc())
        _say("error: internal error (a bug in batchclassify: please report the lines above)")
        return EXIT_USAGE


async def _run_command(sources: list[str], settings: RunSettings, *, scan: bool) -> int:
    if settings.emulate:
        async with emulator.running_emulator() as url:
            return await _run_job(sources, settings.updated(endpoint=url), scan=scan)
    return await _run_job(sources, settings, scan=scan)


async def _run_job(sources: list[str], settings: RunSettings, *, scan: bool) -> int:
    from batchclassify import objects
    from batchclassify.runner import run

    options = settings.pipeline_options(sources)
    outputs = list(settings.out)
    if not outputs:
        if scan:
            raise ConfigError("scan needs --out FILE (its results are appended there)")
        _say("note: no --out given: results go to stdout as JSONL")
        outputs = ["-"]
    state = settings.job_state(outputs)
    if scan and state.path is None:
        raise ConfigError("scan needs a state file: give --out FILE or --state PATH")
    for note in objects.staging_notes(outputs, state.path, settings.upload_interval):
        _say(note)
    interrupts = _Interrupts(settings.shutdown_grace)
    interrupts.install()
    sinks = settings.extra_sinks()
    evaluated = _evaluated_output(settings, outputs)
    while True:
        try:
            stats = await run(
                sources,
                options,
                outputs=outputs,
                sinks=sinks,
                overwrite=settings.overwrite and not state.resume,
                state=state,
                progress=sys.stderr.isatty() if settings.progress is None else settings.progress,
                summary_path=settings.summary,
                on_start=interrupts.attach,
                other_paths=settings.other_paths(),
                upload_interval=settings.upload_interval,
            )
        except RunAborted as exc:
            if exc.stats is not None:
                _say(exc.stats.format())
            raise
        _say(stats.format())
        if evaluated is not None:
            await asyncio.to_thread(_evaluate_run, settings, evaluated)
        if interrupts.received or not scan or settings.interval is None:
            break
        await interrupts.sleep(settings.interval)
        if interrupts.received:
            break
    if interrupts.received:
        _say(_how_to_continue(state.path is not None, scan=scan, resuming=settings.resume))
        return EXIT_INTERRUPTED
    return EXIT_OK if stats.failed == 0 else EXIT_FAILED_ITEMS


def _evaluated_output(settings: RunSettings, outputs: list[str]) -> Path | None:
    """The JSONL output an evaluation reads (``--eval``): it holds every row, also those of
    earlier runs of a resumed job."""
    if settings.eval is None:
        return None
    from batchclassify import evaluate

    for output in outputs:
        if output != "-" and Path(output).suffix.lower() in (".jsonl", ".ndjson"):
            evaluate.check_output(Path(settings.eval), [Path(output)], overwrite=settings.overwrite)
            return Path(output)
    raise ConfigError("--eval reads the results back: give a .jsonl --out as well")


def _evaluate_run(settings: RunSettings, results: Path) -> None:
    assert settings.labels is not None and settings.eval is not None
    from batchclassify import evaluate

    evaluation = evaluate.evaluate(
        results,
        evaluate.LabelSource.parse(settings.labels),
        label_error_threshold=settings.label_error_threshold,
    )
    evaluate.write_evaluation(evaluation, Path(settings.eval))
    for line in evaluate.summary_lines(evaluation):
        _say(line)
    _say(f"evaluation written to {settings.eval}")


def _how_to_continue(has_state: bool, *, scan: bool, resuming: bool) -> str:
    """The last line of a run stopped by Ctrl-C or SIGTERM: what to do next."""
    if not has_state:
        return (
            "interrupted: the inputs not reached were not classified, and without a state file "
            "(--no-state, or no --out FILE) a new run starts over"
        )
    if scan:
        return "interrupted: run the same scan again to continue (done files cost no request)"
    if resuming:
        return "interrupted: run the same command again to continue where it stopped"
    return "interrupted: run the same command with --resume to continue where it stopped"


def program() -> int:
    """The ``batchclassify`` program: :func:`main`, then the interpreter's exit. By then the
    outputs are closed and the summary printed, so a Ctrl-C that comes while the interpreter
    winds down (joining worker processes and threads) ends it with the interrupted status at
    once, instead of a KeyboardInterrupt traceback or death by signal. (:func:`main` itself
    leaves the process's signal handling as it found it, for callers in-process.)"""
    code = main()
    with contextlib.suppress(ValueError):  # not the main thread: nothing to do
        signal.signal(signal.SIGINT, lambda _signum, _frame: os._exit(EXIT_INTERRUPTED))
    return code


class _Interrupts:
    """First Ctrl-C/SIGTERM: stop feeding, let in-flight requests finish for ``grace`` seconds.
    Second: stop at once. Either way the outputs are flushed and the summary printed."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.received = 0
        self._pipeline: RunningPipeline | None = None
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Not available on Windows or outside the main thread: Ctrl-C then stops at once.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(signum, self._on_signal, signum)

    def attach(self, pipeline: RunningPipeline) -> None:
        self._pipeline = pipeline
        if self.received:
            pipeline.stop()

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=seconds)

    def _on_signal(self, signum: int) -> None:
        self.received += 1
        self._event.set()
        pipeline = self._pipeline
        if self.received == 1:
            _say(
                f"\n{signal.Signals(signum).name}: finishing in-flight requests (up to "
                f"{self.grace:g} s); press Ctrl-C again to stop now"
            )
            if pipeline is not None:
                pipeline.stop()
                self._loop.call_later(self.grace, pipeline.abort)
        elif pipeline is not None:
            pipeline.abort()


def _export_command(args: argparse.Namespace) -> int:
    from batchclassify.export import (
        LabelStudioOptions,
        export_imagefolder,
        export_label_studio,
    )

    target, destination = args.to
    studio_only = {
        "--from-name": args.from_name,
        "--to-name": args.to_name,
        "--export-url-prefix": args.export_url_prefix,
        "--document-root": args.document_root,
        "--model-version": args.model_version,
    }
    try:
        if target == "label-studio":
            given = {
                "from_name": args.from_name,
                "to_name": args.to_name,
                "url_prefix": args.export_url_prefix,
                "document_root": None if args.document_root is None else Path(args.document_root),
                "model_version": args.model_version,
            }
            options = LabelStudioOptions(**{k: v for k, v in given.items() if v is not None})
            counts = export_label_studio(
                Path(args.results),
                Path(destination),
                review_below=args.review_below,
                options=options,
                overwrite=args.overwrite,
            )
            what = f"{counts.written} Label Studio tasks to {destination}"
            if args.review_below is not None:
                what += " (the accepted rows are left out)"
        elif target == "imagefolder":
            given_options = [name for name, value in studio_only.items() if value is not None]
            if given_options:
                raise ConfigError(f"{', '.join(given_options)}: only for --to label-studio")
            counts = export_imagefolder(
                Path(args.results),
                Path(destination),
                review_below=args.review_below,
                overwrite=args.overwrite,
            )
            what = f"{counts.written} images to the imagefolder {destination}"
        else:
            raise ConfigError(
                f"--to {target!r}: export to label-studio FILE.json or imagefolder DIR"
            )
    except ConfigError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    except OSError as exc:
        _say(f"error: cannot write {destination}: {exc.strerror or exc}")
        return EXIT_USAGE
    _say(f"wrote {what}")
    _say(counts.describe())
    return EXIT_OK


def _rethreshold_command(args: argparse.Namespace) -> int:
    from batchclassify.rethreshold import rethreshold

    try:
        written, predicted = asyncio.run(
            rethreshold(Path(args.results), args.out, args.confidence, overwrite=args.overwrite)
        )
    except (ConfigError, RunAborted) as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    _say(f"{written} rows at confidence {args.confidence:g}: {predicted} with a predicted class")
    return EXIT_OK


def _eval_command(args: argparse.Namespace) -> int:
    from batchclassify.evaluate import (
        LabelSource,
        check_output,
        evaluate,
        summary_lines,
        write_evaluation,
    )

    results = Path(args.results)
    output = None if args.eval in (None, "-") else Path(args.eval)
    try:
        labels = LabelSource.parse(args.labels, label_column=args.column_label)
        if output is not None:
            inputs = [results] + ([labels.file] if labels.file is not None else [])
            check_output(output, inputs, overwrite=args.overwrite)
        evaluation = evaluate(results, labels, label_error_threshold=args.label_error_threshold)
        if args.eval is not None:
            write_evaluation(evaluation, output)
    except ConfigError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    for line in summary_lines(evaluation):
        _say(line)
    if output is not None:
        _say(f"wrote {output}")
    return EXIT_OK


def _report_command(args: argparse.Namespace) -> int:
    from batchclassify import report

    results = Path(args.results)
    output = Path(args.out) if args.out else results.with_suffix(".html")
    try:
        evaluation = None
        if args.labels is None and args.eval is None:
            for given, option in (
                (args.column_label, "--column-label"),
                (args.label_error_threshold, "--label-error-threshold"),
            ):
                if given is not None:
                    raise ConfigError(f"{option} goes with --labels")
        if args.eval is not None:
            if args.column_label is not None or args.label_error_threshold is not None:
                raise ConfigError(
                    "--column-label and --label-error-threshold go with --labels; the --eval "
                    "file has its own"
                )
            evaluation = report.read_evaluation(Path(args.eval))
        if args.labels is not None:
            from batchclassify.evaluate import LabelSource

            threshold = args.label_error_threshold
            evaluation = report.evaluation_from_labels(
                results,
                LabelSource.parse(args.labels, label_column=args.column_label),
                label_error_threshold=0.8 if threshold is None else threshold,
            )
        written = report.write_report(
            results,
            output,
            overwrite=args.overwrite,
            summary_path=Path(args.summary) if args.summary else None,
            state_path=Path(args.state) if args.state else None,
            thumbnails=args.thumbnails,
            thumb_size=args.thumb_size,
            evaluation=evaluation,
            label_errors=args.label_errors,
        )
    except ConfigError as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    _say(f"wrote {written}")
    return EXIT_OK


class _RedactingFilter(logging.Filter):
    """Last line of defence: whatever a library logs (tracebacks included), no secret and no
    control character reaches the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info = None
            record.exc_text = None
        record.msg = _printable(message)
        record.args = None
        return True


def set_secrets(secrets: Sequence[str]) -> None:
    """What :func:`_printable` and the logging filter remove (a worker process sets its own)."""
    _secrets[:] = [secret for secret in secrets if secret]


def configure_logging_level(level: int) -> None:
    """:func:`_configure_logging` from a logging level (a worker process takes its parent's)."""
    _configure_logging(0 if level >= logging.WARNING else 1 if level >= logging.INFO else 2)


def _configure_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RedactingFilter())
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    _route_image_library_messages(verbosity)


#: Pillow's loggers; libtiff's messages are logged under PIL.libtiff
_PIL_LOGGER = "PIL"


def _route_image_library_messages(verbosity: int) -> None:
    """What Pillow and the C libraries under it say about odd or broken files goes through our
    logging, and only with -v: each such file is already reported in its row (corrupt,
    truncated, ...), and lines on stderr from decoder threads would garble the progress bar.

    * Pillow's ``logging`` records (``PIL.*``): none without -v (Pillow logs an ERROR for some
      broken TIFFs), INFO and up with -v, its debug output with -vv.
    * Pillow's ``warnings`` (odd EXIF, truncated TIFF tags, decompression-bomb warnings):
      warnings become log records (``py.warnings``); without -v Pillow's are ignored. prepare
      ignores warnings too, but ``catch_warnings`` is process-global before Python 3.14, so
      with several decoder threads one can slip past it.
    * libtiff prints its errors ("ZIPDecode: Decoding error at scanline 0, ...") from C
      straight to stderr (Pillow silences only its warnings): see :func:`_route_libtiff`.
    """
    logging.getLogger(_PIL_LOGGER).setLevel(
        logging.CRITICAL + 1 if verbosity == 0 else logging.NOTSET
    )
    logging.captureWarnings(True)
    if verbosity == 0:
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    _route_libtiff()


# libtiff's handler type: void (*)(const char *module, const char *fmt, va_list ap). A va_list
# argument is passed as a pointer on the usual ABIs (x86-64, AArch64, and where it is char *),
# and vsnprintf takes it the same way.
_TIFF_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
_libtiff_handlers: list[Any] = []  # ctypes callbacks must outlive their registration


def _route_libtiff() -> None:
    """Give the libtiff inside Pillow error and warning handlers that log (under PIL.libtiff)
    instead of its default ones, which write to file descriptor 2 from C. Only libtiff's
    messages change way: nothing else written to stderr is touched. Best effort: where the
    library or vsnprintf cannot be found, libtiff keeps its own handlers."""
    if sys.platform == "win32" or _libtiff_handlers:
        return
    try:
        libc = ctypes.CDLL(None)
        vsnprintf = libc.vsnprintf
        vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        vsnprintf.restype = ctypes.c_int
        libraries = [ctypes.CDLL(path) for path in _loaded_libtiff_paths()]
    except (OSError, AttributeError):
        return
    logger = logging.getLogger(f"{_PIL_LOGGER}.libtiff")

    def handler_at(level: int) -> Any:
        def handle(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
            if not logger.isEnabledFor(level) or fmt is None:
                return  # formatting is skipped too: nothing would show
            buffer = ctypes.create_string_buffer(1024)
            vsnprintf(buffer, len(buffer), fmt, args)
            text = buffer.value.decode("utf-8", "replace")
            logger.log(level, "%s: %s", (module or b"libtiff").decode("utf-8", "replace"), text)

        callback = _TIFF_HANDLER(handle)
        _libtiff_handlers.append(callback)
        return callback

    errors, warnings_ = handler_at(logging.INFO), handler_at(logging.DEBUG)
    for library in libraries:
        with contextlib.suppress(AttributeError):
            library.TIFFSetErrorHandler.argtypes = [_TIFF_HANDLER]
            library.TIFFSetErrorHandler(errors)
            library.TIFFSetWarningHandler.argtypes = [_TIFF_HANDLER]
            library.TIFFSetWarningHandler(warnings_)


def _loaded_libtiff_paths() -> list[str]:
    """The libtiff this process has loaded for Pillow (its wheel bundles its own copy, and
    the symbols of a library loaded for an extension module are not global)."""
    from PIL import Image  # noqa: F401  (loads Pillow's C module, and libtiff with it)

    paths: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libtiff"):
                path = fields[5].strip()
                if path not in paths:
                    paths.append(path)
    if not paths:  # macOS wheels: PIL/.dylibs/
        import PIL

        paths = glob.glob(os.path.join(os.path.dirname(PIL.__file__), ".dylibs", "libtiff*"))
    return paths


#: this invocation's secrets (the key, the endpoint's credentials): never printed
_secrets: list[str] = []


def _printable(text: str) -> str:
    """Secrets removed, control characters escaped: safe for a terminal."""
    return for_terminal(redact(text, *_secrets))


def _say(message: str) -> None:
    print(_printable(message), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(program())

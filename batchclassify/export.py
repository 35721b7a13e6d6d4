"""``batchclassify export``: turn finished results into a labeling tool's import or a dataset.

Two targets, both read a JSONL results file line by line, in constant memory (only the set of
class names seen is kept):

**Label Studio** (:func:`export_label_studio`): ``FILE.json``, a JSON array of import tasks,
written incrementally, one task per line::

    {"data": {"image": URL},
     "predictions": [{"model_version": NAME, "score": CONFIDENCE,
                      "result": [{"from_name": "choice", "to_name": "image", "type": "choices",
                                  "value": {"choices": [CLASS, ...]}}]}]}

and beside it ``FILE.label_config.xml``, the labeling config the tasks fit::

    <View>
      <Image name="image" value="$image"/>
      <Choices name="choice" toName="image" choice="single">
        <Choice value="CLASS"/> ...
      </Choices>
    </View>

- ``choices`` is ``predicted_classes`` (``[top]`` for a single-label model, every class over the
  threshold for a multi-label one). A row with **no predicted class** still gets ``[top]`` as
  its pre-annotation, with ``top``'s own (low) score: the annotator starts from the best guess
  and Label Studio can sort tasks by that score. A row without any class at all (``top`` empty,
  the model returned nothing) gets a task with ``"predictions": []``.
- ``score`` is ``confidence``, the best class's score.
- The config lists every class seen in any ok row (``top``, ``predicted_classes`` and the keys
  of ``predictions``), sorted, XML-escaped; ``choice="multiple"`` when any row is multi-label.
- The image: a URL source as it is; a local file as ``url_prefix`` + its path relative to
  ``document_root``, percent-encoded (UTF-8, ``/`` kept). The defaults, ``/data/local-files/?d=``
  and ``/``, fit Label Studio's local files storage with
  ``LOCAL_FILES_SERVING_ENABLED=true LOCAL_FILES_DOCUMENT_ROOT=/``; a file outside
  ``document_root`` is skipped (counted).
- With ``review_below`` only the rows to review (see :func:`needs_review`) become tasks; the
  accepted ones are left out (counted). Without it, every ok row becomes a task.

**Hugging Face imagefolder** (:func:`export_imagefolder`): ``DIR/<label>/<file>`` plus
``DIR/metadata.jsonl``, which ``datasets.load_dataset("imagefolder", data_dir=DIR)`` loads with
a ``label`` column (a metadata file makes ``datasets`` take the labels from it, not from the
folder names). One line per image::

    {"file_name": "cat/a.jpg", "label": "cat", "confidence": 0.93, "review": false,
     "predicted_classes": ["cat"], "source": "/photos/a.jpg"}

- Every ok row with a local file is written, in the folder of its ``top`` class (also
  multi-label rows: an imagefolder has one label per image; ``predicted_classes`` keeps them
  all). ``review`` marks the rows :func:`needs_review` picks.
- Images are placed by :class:`~batchclassify.organize.Organizer`: a hard link where possible,
  else a copy; nothing is ever overwritten; a name taken by a different image gets a stable
  ``-<hash>`` suffix; folder names are :func:`~batchclassify.organize.folder_name` (unsafe
  characters percent-encoded; ``label`` keeps the class name exactly).
- ``DIR`` must not exist or be empty, unless ``overwrite``: then ``metadata.jsonl`` is replaced
  and images already in place are reused; files of an earlier export that are not in the new
  metadata stay on disk (``datasets`` only loads what the metadata lists).
- URL rows (no local file) and rows without any class are skipped (counted).

Everywhere: failed rows are never exported, a row whose file is missing is skipped, both
counted; a line that is not a result row stops the export with :class:`ConfigError` (the CLI's
exit 2) and nothing is written: the Label Studio files are written to temporary names and renamed
into place at the end, and the imagefolder export reads the results once before placing anything
(a second pass, still in constant memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from batchclassify.errors import ConfigError
from batchclassify.model import Result, read_results
from batchclassify.organize import OrganizeOptions, Organizer, local_path
from batchclassify.paths import PlannedPath, check_paths
from batchclassify.text import raw_name, valid_unicode

__all__ = [
    "DEFAULT_DOCUMENT_ROOT",
    "DEFAULT_URL_PREFIX",
    "ExportCounts",
    "LabelStudioOptions",
    "export_imagefolder",
    "export_label_studio",
    "image_reference",
    "label_config",
    "label_config_path",
    "label_studio_task",
    "needs_review",
]

#: Label Studio's local files storage: ``/data/local-files/?d=<path under the document root>``
DEFAULT_URL_PREFIX = "/data/local-files/?d="
DEFAULT_DOCUMENT_ROOT = Path("/")
METADATA = "metadata.jsonl"
#: characters XML 1.0 cannot hold at all, not even as character references
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelStudioOptions:
    """How tasks name the labeling config's tags, and where their images are served from."""

    from_name: str = "choice"
    to_name: str = "image"
    url_prefix: str = DEFAULT_URL_PREFIX
    document_root: Path = DEFAULT_DOCUMENT_ROOT
    model_version: str = "batchclassify"

    def __post_init__(self) -> None:
        for option, value in (("--from-name", self.from_name), ("--to-name", self.to_name)):
            if not value or _NOT_XML.search(value):
                raise ConfigError(f"{option} must be a non-empty name, got {value!r}")
        if self.from_name == self.to_name:
            raise ConfigError("--from-name and --to-name must differ (tag names are unique)")


@dataclass(slots=True)
class ExportCounts:
    """What an export did with the rows it read."""

    rows: int = 0
    #: tasks (Label Studio) or images (imagefolder) written
    written: int = 0
    #: rows sent to review / accepted as labeled (Label Studio leaves the accepted out when
    #: ``review_below`` is given)
    review: int = 0
    accepted: int = 0
    failed: int = 0
    #: local files that no longer exist (or are not regular files)
    missing: int = 0
    #: URL rows (imagefolder: nothing to place)
    urls: int = 0
    #: local files outside the document root (Label Studio)
    outside_root: int = 0
    #: ok rows without any class (imagefolder)
    no_class: int = 0
    #: the classes seen in ok rows, sorted
    classes: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        """One line for the user: where rows went."""
        parts = [f"{self.review} to review", f"{self.accepted} accepted"]
        for count, what in (
            (self.failed, "failed (not exported)"),
            (self.missing, "missing files (skipped)"),
            (self.urls, "URLs (skipped: no local file)"),
            (self.outside_root, "outside --document-root (skipped)"),
            (self.no_class, "without any class (skipped)"),
        ):
            if count:
                parts.append(f"{count} {what}")
        return f"{self.rows} rows: " + ", ".join(parts)


def needs_review(result: Result, review_below: float | None) -> bool:
    """Whether an ok ``result`` goes to review: it has no predicted class, its confidence is
    under ``review_below``, or it disagrees with its known label (a run with ``--labels``:
    a wrong label or a wrong model, either way a person should look)."""
    if not result.predicted_classes or not result.top:
        return True
    if result.correct is False:
        return True
    if review_below is None:
        return False
    return result.confidence is None or result.confidence < review_below


def image_reference(path: str | os.PathLike[str], *, url_prefix: str, document_root: Path) -> str:
    """``url_prefix`` + ``path`` relative to ``document_root``, percent-encoded (UTF-8 bytes,
    ``/`` kept). Raises :class:`ValueError` when ``path`` is not under ``document_root``."""
    absolute = Path(os.path.abspath(path))
    relative = absolute.relative_to(Path(os.path.abspath(document_root)))
    # fsencode: a name that is not valid UTF-8 is encoded as its exact bytes.
    return url_prefix + quote(os.fsencode(relative.as_posix()), safe="/")


def label_studio_task(
    result: Result, image: str, options: LabelStudioOptions | None = None
) -> dict[str, Any]:
    """The Label Studio import task of an ok ``result`` whose image is at ``image``."""
    options = options or LabelStudioOptions()
    choices = list(result.predicted_classes) or ([result.top] if result.top else [])
    predictions: list[dict[str, Any]] = []
    if choices:
        prediction: dict[str, Any] = {"model_version": options.model_version}
        if result.confidence is not None:
            prediction["score"] = result.confidence
        prediction["result"] = [
            {
                "from_name": options.from_name,
                "to_name": options.to_name,
                "type": "choices",
                "value": {"choices": [valid_unicode(name) for name in choices]},
            }
        ]
        predictions.append(prediction)
    return {"data": {"image": image}, "predictions": predictions}


def label_config(
    classes: Iterable[str],
    *,
    multiple: bool = False,
    from_name: str = "choice",
    to_name: str = "image",
) -> str:
    """The labeling config XML for tasks made by :func:`label_studio_task`: one ``<Choice>`` per
    class. Raises :class:`ConfigError` for a class name XML cannot hold (a control character)."""
    lines = [
        "<View>",
        f'  <Image name={_attr(to_name)} value="$image"/>',
        f"  <Choices name={_attr(from_name)} toName={_attr(to_name)} "
        f'choice="{"multiple" if multiple else "single"}" showInline="true">',
    ]
    for name in classes:
        text = valid_unicode(name)
        if _NOT_XML.search(text):
            raise ConfigError(
                f"the class {text!r} has a character no XML can hold: no labeling config can "
                "list it"
            )
        lines.append(f"    <Choice value={_attr(text)}/>")
    lines += ["  </Choices>", "</View>", ""]
    return "\n".join(lines)


#: attribute values are normalised by XML parsers (a newline read as a space): keep them exact
_ATTRIBUTE_ENTITIES = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}


def _attr(value: str) -> str:
    """``value`` as a double-quoted XML attribute (``&``, ``<``, ``>``, ``"`` escaped)."""
    return '"' + escape(value, _ATTRIBUTE_ENTITIES) + '"'


def label_config_path(output: Path) -> Path:
    """Where the labeling config of the tasks ``output`` goes: ``tasks.json`` ->
    ``tasks.label_config.xml``."""
    stem = output.name[: -len(".json")] if output.name.lower().endswith(".json") else output.name
    return output.with_name(stem + ".label_config.xml")


def export_label_studio(
    results: Path,
    output: Path,
    *,
    review_below: float | None = None,
    options: LabelStudioOptions | None = None,
    overwrite: bool = False,
) -> ExportCounts:
    """Write the Label Studio tasks of the JSONL ``results`` to ``output`` and their labeling
    config to :func:`label_config_path` of it; see the module docstring."""
    options = options or LabelStudioOptions()
    config_path = label_config_path(output)
    _check_source(results, review_below)
    check_paths(
        [
            PlannedPath(results, f"the results {results}"),
            PlannedPath(output, f"the tasks {output}"),
            PlannedPath(config_path, f"the labeling config {config_path}"),
        ]
    )
    if not overwrite:
        for path in (output, config_path):
            if os.path.lexists(path):
                raise ConfigError(f"{path} exists: use --overwrite to replace it")
    counts = ExportCounts()
    classes: set[str] = set()
    multiple = False
    with _replacing(output) as tasks, _replacing(config_path) as config:
        tasks.write("[")
        for result in read_results(results):
            counts.rows += 1
            if not result.ok:
                counts.failed += 1
                continue
            classes.update(_classes_of(result))
            multiple = multiple or result.multi_label
            review = needs_review(result, review_below)
            if review_below is not None and not review:
                counts.accepted += 1  # accepted as labeled: not a task
                continue
            image = _image_of(result, options, counts)
            if image is None:
                continue
            task = label_studio_task(result, image, options)
            tasks.write(("\n" if counts.written == 0 else ",\n") + _json(task))
            counts.written += 1
            if review:
                counts.review += 1
            else:
                counts.accepted += 1
        tasks.write("\n]\n" if counts.written else "]\n")
        counts.classes = sorted(classes)
        config.write(
            label_config(
                counts.classes,
                multiple=multiple,
                from_name=options.from_name,
                to_name=options.to_name,
            )
        )
    return counts


def export_imagefolder(
    results: Path,
    folder: Path,
    *,
    review_below: float | None = None,
    overwrite: bool = False,
) -> ExportCounts:
    """Place the images of the JSONL ``results`` into ``folder/<label>/`` and write
    ``folder/metadata.jsonl``; see the module docstring."""
    _check_source(results, review_below)
    planned = [
        PlannedPath(results, f"the results {results}"),
        PlannedPath(folder, f"the dataset folder {folder}", folder=True),
    ]
    metadata = folder / METADATA
    if folder.is_dir():
        planned.append(PlannedPath(metadata, f"the metadata {metadata}"))
        if not overwrite and any(folder.iterdir()):
            raise ConfigError(
                f"{folder} exists and is not empty: use --overwrite to add to it (images in "
                "place are reused, metadata.jsonl is replaced)"
            )
    check_paths(planned)
    # A first pass reads every row, so that results that are not JSONL place nothing at all.
    for _ in read_results(results):
        pass
    organizer = Organizer(OrganizeOptions(root=folder, mode="link"))
    metadata = organizer.root / METADATA
    # Claim the name first, so that a class called "metadata.jsonl" gets another folder.
    created = _claim(metadata)
    counts = ExportCounts()
    classes: set[str] = set()
    try:
        with _replacing(metadata) as out:
            for result in read_results(results):
                counts.rows += 1
                if not result.ok:
                    counts.failed += 1
                    continue
                classes.update(_classes_of(result))
                if not result.top:
                    counts.no_class += 1
                    continue
                file = _local_file(result)
                if file is None:
                    counts.urls += 1
                    continue
                placed = organizer.place(
                    dataclasses.replace(result, predicted_classes=(result.top,)), file
                )
                if not placed:
                    counts.missing += 1
                    continue
                review = needs_review(result, review_below)
                line = {
                    "file_name": placed[0].relative_to(organizer.root).as_posix(),
                    "label": valid_unicode(result.top),
                    "confidence": result.confidence,
                    "review": review,
                    "predicted_classes": [valid_unicode(name) for name in result.predicted_classes],
                    "source": valid_unicode(result.source),
                }
                out.write(_json(line) + "\n")
                counts.written += 1
                if review:
                    counts.review += 1
                else:
                    counts.accepted += 1
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                metadata.unlink()
        raise
    counts.classes = sorted(classes)
    return counts


def _check_source(results: Path, review_below: float | None) -> None:
    if results.suffix.lower() not in (".jsonl", ".ndjson"):
        raise ConfigError(
            f"{results}: export reads JSONL results (written by run --out FILE.jsonl)"
        )
    if review_below is not None and not 0.0 <= review_below <= 1.0:
        raise ConfigError(
            f"--review-below must be a probability between 0 and 1, got {review_below}"
        )


def _classes_of(result: Result) -> Iterator[str]:
    if result.top:
        yield result.top
    yield from result.predicted_classes
    yield from result.predictions


def _local_file(result: Result) -> Path | None:
    """The file behind an ok row, ``None`` for a URL. ``path`` is the absolute path the run
    classified; for a name that is not valid UTF-8 it was written readably, not exactly, so the
    exact source (from ``source_bytes``) is used then."""
    source = local_path(result.source)
    if source is None:
        return None
    if result.path and raw_name(result.source) is None:
        return Path(result.path)
    return Path(os.path.abspath(source))


def _image_of(result: Result, options: LabelStudioOptions, counts: ExportCounts) -> str | None:
    file = _local_file(result)
    if file is None:
        return valid_unicode(result.source)
    if not file.is_file():
        counts.missing += 1
        return None
    try:
        return image_reference(
            file, url_prefix=options.url_prefix, document_root=options.document_root
        )
    except ValueError:
        counts.outside_root += 1
        return None


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[IO[str]]:
    """A text file written to a temporary name beside ``path`` and renamed to ``path`` when
    the block completes; removed when it fails, so ``path`` never holds a partial output."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    while True:
        temp = path.with_name(f".batchclassify-{secrets.token_hex(8)}.tmp")
        try:
            descriptor = os.open(temp, flags, 0o666)  # the umask applies, as for any new file
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
        break
    try:
        with open(descriptor, "w", encoding="utf-8") as handle:
            yield handle
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _claim(path: Path) -> bool:
    """Create ``path`` empty unless it exists; whether it was created. A name taken by
    something that is not a regular file is refused."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    except FileExistsError:
        if path.is_symlink() or not path.is_file():
            raise ConfigError(f"{path} exists and is not a regular file") from None
        return False
    return True

"""``batchclassify export``: Label Studio tasks + labeling config, Hugging Face imagefolder.

Results come from real runs against the emulator; every task, every metadata line and every
placed file is checked. Two optional tests run the real consumers in venvs of their own (their
dependencies would pin ours down):

* ``LABEL_STUDIO_SDK_PYTHON``: a Python with ``label-studio-sdk``, whose ``LabelInterface``
  validates the labeling config and every prediction against it;
* ``DATASETS_PYTHON``: a Python with ``datasets`` and ``pillow``, which must load the folder with
  ``load_dataset("imagefolder", data_dir=DIR)``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from conftest import StartEmulator
from helpers import make_image, read_jsonl, run_cli

from batchclassify.errors import ConfigError
from batchclassify.export import (
    LabelStudioOptions,
    export_imagefolder,
    export_label_studio,
    image_reference,
    label_config,
)

KEY = "export-key-2718"
#: a class name XML must escape, one a folder name must encode, one with a space, one non-ASCII
ODD = 'a<b&"c'
CLASSES = ("cat", ODD, "golden retriever", "été")
#: the folder each class is placed in (batchclassify.organize.folder_name), written out by hand
FOLDERS = {"cat": "cat", ODD: "a%3Cb&%22c", "golden retriever": "golden retriever", "été": "été"}
WEIRD = "sub dir/rosé été.jpg"
#: the image paths relative to the input folder, percent-encoded by hand
ENCODED = {WEIRD: "sub%20dir/ros%C3%A9%20%C3%A9t%C3%A9.jpg"} | {
    f"{n}.jpg": f"{n}.jpg" for n in range(10)
}
THRESHOLD = 0.5
COUNTS = re.compile(r"(\d+) rows: (\d+) to review, (\d+) accepted")


async def classify(
    tmp_path: Path, start_emulator: StartEmulator, *, multi_label: bool = False
) -> tuple[Path, list[dict[str, Any]]]:
    """Run ``batchclassify run`` over ten images, one with a space and accents in its path,
    and a broken file (a failed row); return the results and their rows."""
    url = await start_emulator(classes=CLASSES, multi_label=multi_label)
    root = tmp_path / "in"
    for n in range(10):
        make_image(root / f"{n}.jpg", seed=n)
    make_image(root / WEIRD, seed=42)
    (root / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "results.jsonl"
    code, _, err = await run_cli(
        "run", str(root), "--model", "demo/1", "--endpoint", url, "--out", str(out),
        "--confidence", str(THRESHOLD), env={"ROBOFLOW_API_KEY": KEY},
    )  # fmt: skip
    assert code == 1, err  # the broken file
    rows = read_jsonl(out)
    assert len(rows) == 12 and [r["status"] for r in rows].count("error") == 1
    return out, rows


def relative(row: dict[str, Any], tmp_path: Path) -> str:
    return Path(row["path"]).relative_to(tmp_path / "in").as_posix()


def to_review(row: dict[str, Any], below: float | None) -> bool:
    return not row["predicted_classes"] or (below is not None and row["confidence"] < below)


def expected_task(row: dict[str, Any], image: str, version: str) -> dict[str, Any]:
    choices = row["predicted_classes"] or [row["top"]]
    prediction = {
        "model_version": version,
        "score": row["confidence"],
        "result": [
            {
                "from_name": "choice",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": choices},
            }
        ],
    }
    return {"data": {"image": image}, "predictions": [prediction]}


def classes_of(rows: list[dict[str, Any]]) -> set[str]:
    found: set[str] = set()
    for row in rows:
        if row["status"] == "ok":
            found |= {row["top"], *row["predicted_classes"], *row["predictions"]}
    return found


def parse_config(path: Path) -> tuple[str, list[str]]:
    """The Choices tag's ``choice`` attribute and its values; checks the rest of the shape."""
    view = ET.parse(path).getroot()
    assert view.tag == "View"
    image, choices = list(view)
    assert (image.tag, image.attrib) == ("Image", {"name": "image", "value": "$image"})
    assert choices.tag == "Choices"
    assert (choices.get("name"), choices.get("toName")) == ("choice", "image")
    assert all(child.tag == "Choice" and list(child.attrib) == ["value"] for child in choices)
    return str(choices.get("choice")), [str(child.get("value")) for child in choices]


@pytest.mark.parametrize("multi_label", [False, True])
async def test_label_studio_tasks_hold_every_row(
    tmp_path: Path, start_emulator: StartEmulator, multi_label: bool
) -> None:
    results, rows = await classify(tmp_path, start_emulator, multi_label=multi_label)
    tasks_path = tmp_path / "tasks.json"
    code, _, err = await run_cli(
        "export", str(results), "--to", "label-studio", str(tasks_path),
        "--document-root", str(tmp_path / "in"), "--model-version", "demo-1",
    )  # fmt: skip
    assert code == 0, err
    ok = [row for row in rows if row["status"] == "ok"]
    expected = [
        expected_task(row, "/data/local-files/?d=" + ENCODED[relative(row, tmp_path)], "demo-1")
        for row in ok
    ]
    tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    assert tasks == expected
    # Each image reference decodes back to its file.
    for task, row in zip(tasks, ok, strict=True):
        encoded = task["data"]["image"].removeprefix("/data/local-files/?d=")
        assert (tmp_path / "in" / unquote(encoded)).read_bytes() == Path(row["path"]).read_bytes()
    if multi_label:  # the shape is exercised: several classes, and none
        assert any(len(row["predicted_classes"]) > 1 for row in ok)
    assert any(not row["predicted_classes"] for row in ok)
    # The config sits beside the tasks and lists exactly the classes seen, escaped.
    config = tmp_path / "tasks.label_config.xml"
    choice, values = parse_config(config)
    assert choice == ("multiple" if multi_label else "single")
    assert values == sorted(classes_of(rows))
    assert ODD in values and "été" in values
    assert '<Choice value="a&lt;b&amp;&quot;c"/>' in config.read_text(encoding="utf-8")
    review = sum(to_review(row, None) for row in ok)
    match = COUNTS.search(err)
    assert match and match.groups() == (str(len(rows)), str(review), str(len(ok) - review))
    assert "1 failed (not exported)" in err


async def test_review_below_sends_only_the_doubtful_rows_to_label_studio(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    results, rows = await classify(tmp_path, start_emulator)
    ok = [row for row in rows if row["status"] == "ok"]
    below = sorted(row["confidence"] for row in ok)[len(ok) // 2]  # about half go to review
    doubtful = [row for row in ok if to_review(row, below)]
    assert 0 < len(doubtful) < len(ok)
    tasks_path = tmp_path / "review.json"
    prefix = "https://cdn.example.com/photos/"
    code, _, err = await run_cli(
        "export", str(results), "--to", "label-studio", str(tasks_path), "--review-below",
        str(below), "--document-root", str(tmp_path / "in"), "--export-url-prefix", prefix,
    )  # fmt: skip
    assert code == 0, err
    tasks = json.loads(tasks_path.read_text(encoding="utf-8"))
    assert tasks == [
        expected_task(row, prefix + ENCODED[relative(row, tmp_path)], "batchclassify")
        for row in doubtful
    ]
    match = COUNTS.search(err)
    assert match and match.groups() == ("12", str(len(doubtful)), str(len(ok) - len(doubtful)))
    assert f"wrote {len(doubtful)} Label Studio tasks" in err
    # The config still lists every class seen, also those of the accepted rows.
    assert parse_config(tmp_path / "review.label_config.xml")[1] == sorted(classes_of(rows))


async def test_imagefolder_places_every_image_and_describes_it(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    results, rows = await classify(tmp_path, start_emulator)
    ok = [row for row in rows if row["status"] == "ok"]
    below = sorted(row["confidence"] for row in ok)[len(ok) // 2]
    dataset = tmp_path / "dataset"
    code, _, err = await run_cli(
        "export", str(results), "--to", "imagefolder", str(dataset), "--review-below", str(below)
    )
    assert code == 0, err
    lines = read_jsonl(dataset / "metadata.jsonl")
    assert len(lines) == len(ok)
    for line, row in zip(lines, ok, strict=True):
        assert set(line) == {
            "file_name", "label", "confidence", "review", "predicted_classes", "source"
        }  # fmt: skip
        assert line["label"] == row["top"]
        assert line["confidence"] == row["confidence"]
        assert line["review"] is to_review(row, below)
        assert line["predicted_classes"] == row["predicted_classes"]
        assert line["source"] == row["source"]
        folder, name = line["file_name"].split("/")
        assert (folder, name) == (FOLDERS[row["top"]], Path(row["path"]).name)
        placed = dataset / line["file_name"]
        assert placed.read_bytes() == Path(row["path"]).read_bytes()
        assert placed.stat().st_ino == Path(row["path"]).stat().st_ino  # a hard link
    # Nothing else: no failed row, no temporary file.
    files = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(["metadata.jsonl", *(line["file_name"] for line in lines)])
    review = sum(line["review"] for line in lines)
    match = COUNTS.search(err)
    assert match and match.groups() == ("12", str(review), str(len(ok) - review))
    assert 0 < review < len(ok)

    # Again, with --overwrite: the images in place are reused, the metadata is the same.
    code, _, err = await run_cli(
        "export", str(results), "--to", "imagefolder", str(dataset), "--review-below",
        str(below), "--overwrite",
    )  # fmt: skip
    assert code == 0, err
    assert read_jsonl(dataset / "metadata.jsonl") == lines
    assert len([p for p in dataset.rglob("*") if p.is_file()]) == len(files)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def ok_row(path: Path | str, top: str, confidence: float, **more: Any) -> dict[str, Any]:
    source = str(path)
    local = not source.startswith("https://")
    return {
        "source": source,
        "path": source if local else None,
        "status": "ok",
        "top": top,
        "confidence": confidence,
        "predicted_classes": [top] if confidence >= 0.4 else [],
        "predictions": {top: confidence},
        **more,
    }


def test_imagefolder_never_overwrites_and_names_collisions_stably(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a" / "same.jpg", seed=1)
    b = make_image(tmp_path / "b" / "same.jpg", seed=2)
    gone = make_image(tmp_path / "gone.jpg", seed=3)
    results = write_rows(
        tmp_path / "r.jsonl",
        [
            ok_row(a, "cat", 0.9),
            ok_row(b, "cat", 0.3),
            ok_row(gone, "cat", 0.9),
            ok_row("https://example.com/x.jpg", "cat", 0.9),
            {"source": str(a), "path": str(a), "status": "error", "error": None},
            ok_row(a, "metadata.jsonl", 0.8),  # a class that wants the metadata's name
        ],
    )
    gone.unlink()
    dataset = tmp_path / "ds"
    counts = export_imagefolder(results, dataset, review_below=0.5)
    assert (counts.rows, counts.written, counts.review, counts.accepted) == (6, 3, 1, 2)
    assert (counts.failed, counts.missing, counts.urls) == (1, 1, 1)
    lines = read_jsonl(dataset / "metadata.jsonl")
    names = [line["file_name"] for line in lines]
    assert names[0] == "cat/same.jpg"
    assert re.fullmatch(r"cat/same-[0-9a-f]{8}\.jpg", names[1])
    assert names[2].startswith("metadata.jsonl-") and names[2].endswith("/same.jpg")
    for name, source in zip(names, (a, b, a), strict=True):
        assert (dataset / name).read_bytes() == source.read_bytes()
    assert [line["review"] for line in lines] == [False, True, False]
    # A second export into the same folder finds the same names: stable, nothing new.
    again = export_imagefolder(results, dataset, review_below=0.5, overwrite=True)
    assert again.written == 3 and read_jsonl(dataset / "metadata.jsonl") == lines


def test_label_studio_urls_missing_files_and_the_document_root(tmp_path: Path) -> None:
    inside = make_image(tmp_path / "root" / "my photos" / "çà ?#&%+.jpg", seed=1)
    outside = make_image(tmp_path / "elsewhere.jpg", seed=2)
    gone = make_image(tmp_path / "root" / "gone.jpg", seed=3)
    url = "https://example.com/images/a%20b.jpg?x=1"
    results = write_rows(
        tmp_path / "r.jsonl",
        [
            ok_row(inside, "cat", 0.9),
            ok_row(outside, "cat", 0.9),
            ok_row(gone, "cat", 0.9),
            ok_row(url, "dog", 0.2),
            ok_row(tmp_path / "root" / "empty.jpg", "", 0.0, predictions={}),
        ],
    )
    make_image(tmp_path / "root" / "empty.jpg", seed=4)
    gone.unlink()
    output = tmp_path / "t.json"
    options = LabelStudioOptions(document_root=tmp_path / "root", model_version="v")
    counts = export_label_studio(results, output, options=options)
    assert (counts.written, counts.missing, counts.outside_root) == (3, 1, 1)
    tasks = json.loads(output.read_text(encoding="utf-8"))
    assert [task["data"]["image"] for task in tasks] == [
        "/data/local-files/?d=my%20photos/%C3%A7%C3%A0%20%3F%23%26%25%2B.jpg",
        url,  # as it is
        "/data/local-files/?d=empty.jpg",
    ]
    # Under the threshold: [top] with its own low score; no class at all: no prediction.
    assert tasks[1]["predictions"][0]["score"] == 0.2
    assert tasks[1]["predictions"][0]["result"][0]["value"] == {"choices": ["dog"]}
    assert tasks[2]["predictions"] == []
    assert parse_config(tmp_path / "t.label_config.xml") == ("single", ["cat", "dog"])


def test_image_reference_encodes_paths_and_refuses_what_is_outside(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    path = root / "a b" / "naïve 日本.jpg"
    assert image_reference(path, url_prefix="/data/local-files/?d=", document_root=root) == (
        "/data/local-files/?d=a%20b/na%C3%AFve%20%E6%97%A5%E6%9C%AC.jpg"
    )
    absolute = image_reference(path, url_prefix="http://h/", document_root=Path("/"))
    assert absolute.startswith("http://h/") and absolute.isascii() and " " not in absolute
    assert unquote(absolute.removeprefix("http://h/")) == str(path).lstrip("/")
    with pytest.raises(ValueError):
        image_reference(tmp_path / "x.jpg", url_prefix="", document_root=root)


def test_label_config_escapes_what_xml_must() -> None:
    names = ["x", ODD, "it's", "]]>", "two\nlines\tand  spaces", "&amp;"]
    text = label_config(names, multiple=True, from_name='f"n', to_name="i<")
    view = ET.fromstring(text)
    assert view[0].attrib == {"name": "i<", "value": "$image"}
    assert view[1].get("name") == 'f"n' and view[1].get("toName") == "i<"
    assert view[1].get("choice") == "multiple"
    assert [c.get("value") for c in view[1]] == names
    with pytest.raises(ConfigError, match="no XML can hold"):
        label_config(["bell\x07"])


async def test_export_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    image = make_image(tmp_path / "a.jpg")
    results = write_rows(tmp_path / "r.jsonl", [ok_row(image, "cat", 0.9)])
    tasks = tmp_path / "t.json"

    # Not JSONL: by name, and by content (then nothing at all is written).
    csv = tmp_path / "r.csv"
    csv.write_text("source,top\na.jpg,cat\n")
    code, _, err = await run_cli("export", str(csv), "--to", "label-studio", str(tasks))
    assert code == 2 and "reads JSONL results" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(results.read_text() + "source,top\n")
    for target, dest in (("label-studio", tasks), ("imagefolder", tmp_path / "ds")):
        code, _, err = await run_cli("export", str(broken), "--to", target, str(dest))
        assert code == 2 and "broken.jsonl:2 is not a result row" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.jpg", "broken.jsonl", "r.csv", "r.jsonl"
    ]  # fmt: skip

    # An existing output, tasks or config, is kept unless --overwrite.
    code, _, err = await run_cli("export", str(results), "--to", "label-studio", str(tasks))
    assert code == 0, err
    for existing in (tasks, tmp_path / "t.label_config.xml"):
        tasks.unlink()  # only this one output exists
        existing.write_text("mine")
        code, _, err = await run_cli("export", str(results), "--to", "label-studio", str(tasks))
        assert code == 2 and "exists: use --overwrite" in err
        assert existing.read_text() == "mine"
        code, _, err = await run_cli(
            "export", str(results), "--to", "label-studio", str(tasks), "--overwrite"
        )
        assert code == 0 and existing.read_text() != "mine"
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "keep.txt").write_text("mine")
    code, _, err = await run_cli("export", str(results), "--to", "imagefolder", str(dataset))
    assert code == 2 and "not empty" in err
    assert [p.name for p in dataset.iterdir()] == ["keep.txt"]

    # The results themselves are never an output; unknown targets and misplaced options.
    code, _, err = await run_cli(
        "export", str(results), "--to", "label-studio", str(tmp_path / "r.json"), "--overwrite"
    )
    assert code == 0, err  # r.json is not r.jsonl
    same = tmp_path / "same.jsonl"
    same.write_text(results.read_text())
    code, _, err = await run_cli(
        "export", str(same), "--to", "label-studio", str(same), "--overwrite"
    )
    assert code == 2 and "are the same file" in err
    assert same.read_text() == results.read_text()
    code, _, err = await run_cli("export", str(results), "--to", "coco", str(tmp_path / "c"))
    assert code == 2 and "label-studio FILE.json or imagefolder DIR" in err
    code, _, err = await run_cli(
        "export", str(results), "--to", "imagefolder", str(tmp_path / "d2"), "--to-name", "x"
    )
    assert code == 2 and "--to-name: only for --to label-studio" in err
    code, _, err = await run_cli(
        "export", str(results), "--to", "label-studio", str(tasks), "--review-below", "80"
    )
    assert code == 2 and "between 0 and 1" in err


async def test_a_missing_file_is_counted_not_fatal(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    results, rows = await classify(tmp_path, start_emulator)
    (tmp_path / "in" / "3.jpg").unlink()
    ok = [row for row in rows if row["status"] == "ok" and not row["path"].endswith("/3.jpg")]
    code, _, err = await run_cli(
        "export", str(results), "--to", "label-studio", str(tmp_path / "t.json"),
        "--document-root", str(tmp_path / "in"),
    )  # fmt: skip
    assert code == 0 and "1 missing files (skipped)" in err, err
    assert len(json.loads((tmp_path / "t.json").read_text())) == len(ok)
    code, _, err = await run_cli(
        "export", str(results), "--to", "imagefolder", str(tmp_path / "ds")
    )
    assert code == 0 and "1 missing files (skipped)" in err, err
    assert len(read_jsonl(tmp_path / "ds" / "metadata.jsonl")) == len(ok)


# --- optional: the real consumers, in venvs of their own -------------------------------------

LABEL_STUDIO_CHECK = """
import json, sys
from label_studio_sdk.label_interface import LabelInterface

tasks_path, config_path = sys.argv[1:3]
interface = LabelInterface(open(config_path, encoding="utf-8").read())
interface.validate()  # the config itself: schema, unique names, toName
errors = []
for index, task in enumerate(json.load(open(tasks_path, encoding="utf-8"))):
    for tag in interface.objects:  # validate_task() itself calls validate_prediction() wrongly
        if tag.value_is_variable and task["data"].get(tag.value_name) is None:
            errors.append(f"task {index}: no data.{tag.value_name}")
    for prediction in task["predictions"]:
        for error in interface.validate_prediction(prediction, return_errors=True):
            errors.append(f"task {index}: {error}")
control = interface.get_control("choice")
print(json.dumps({"errors": errors, "labels": list(control.labels),
                  "multiple": control.is_multiple_choice}))
"""


def _optional_python(variable: str) -> str:
    python = os.environ.get(variable)
    if not python:
        pytest.skip(f"{variable} is not set")
    return python


async def run_python(
    python: str, code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> dict[str, Any]:
    """Run ``code`` in ``python``; it must succeed and print one JSON value, returned."""
    process = await asyncio.create_subprocess_exec(
        python, "-c", code, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, err.decode()
    answer: dict[str, Any] = json.loads(out)
    return answer


@pytest.mark.parametrize("multi_label", [False, True])
async def test_label_studio_sdk_accepts_the_tasks_and_config(
    tmp_path: Path, start_emulator: StartEmulator, multi_label: bool
) -> None:
    python = _optional_python("LABEL_STUDIO_SDK_PYTHON")
    results, rows = await classify(tmp_path, start_emulator, multi_label=multi_label)
    tasks = tmp_path / "tasks.json"
    code, _, err = await run_cli("export", str(results), "--to", "label-studio", str(tasks))
    assert code == 0, err
    config = tmp_path / "tasks.label_config.xml"

    answer = await run_python(python, LABEL_STUDIO_CHECK, str(tasks), str(config))
    assert answer == {
        "errors": [],
        "labels": sorted(classes_of(rows)),
        "multiple": multi_label,
    }
    # The validator can fail: a class the config does not list is caught.
    tampered = json.loads(tasks.read_text(encoding="utf-8"))
    tampered[0]["predictions"][0]["result"][0]["value"]["choices"] = ["zebra"]
    (tmp_path / "tampered.json").write_text(json.dumps(tampered), encoding="utf-8")
    tampered_answer = await run_python(
        python, LABEL_STUDIO_CHECK, str(tmp_path / "tampered.json"), str(config)
    )
    assert len(tampered_answer["errors"]) == 1


DATASETS_CHECK = """
import json, sys
import datasets

split = datasets.load_dataset("imagefolder", data_dir=sys.argv[1], split="train")
print(json.dumps({
    "features": sorted(split.features),
    "label": list(split["label"]),
    "review": list(split["review"]),
    "sizes": [list(image.size) for image in split["image"]],
}))
"""


async def test_datasets_loads_the_imagefolder(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    python = _optional_python("DATASETS_PYTHON")
    results, rows = await classify(tmp_path, start_emulator)
    dataset = tmp_path / "dataset"
    code, _, err = await run_cli(
        "export", str(results), "--to", "imagefolder", str(dataset), "--review-below", "0.6"
    )
    assert code == 0, err
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    loaded = await run_python(python, DATASETS_CHECK, str(dataset), env=env)
    ok = [row for row in rows if row["status"] == "ok"]
    assert loaded["features"] == sorted(
        ["image", "label", "confidence", "review", "predicted_classes", "source"]
    )
    assert loaded["label"] == [row["top"] for row in ok]
    assert loaded["review"] == [to_review(row, 0.6) for row in ok]
    assert loaded["sizes"] == [[row["image"]["width"], row["image"]["height"]] for row in ok]


def test_a_row_that_disagrees_with_its_label_goes_to_review() -> None:
    from batchclassify.export import needs_review
    from batchclassify.model import Result

    sure = Result(
        source="a.jpg", status="ok", top="cat", confidence=0.99, predicted_classes=("cat",)
    )
    assert not needs_review(sure, 0.5)
    wrong = Result(
        source="a.jpg",
        status="ok",
        top="cat",
        confidence=0.99,
        predicted_classes=("cat",),
        label="dog",
        correct=False,
        labeled=True,
    )
    assert needs_review(wrong, 0.5) and needs_review(wrong, None)

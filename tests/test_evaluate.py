"""``batchclassify eval``: metrics of finished results against ground-truth labels.

Every metric is checked against :func:`expected_eval`, a plain recount from the JSONL rows
written here without the module under test; the runs are real runs against the emulator.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import StartEmulator
from helpers import make_image, read_jsonl, run_cli

from batchclassify.evaluate import LabelSource, evaluate

KEY = "evaluate-key-2718"
ENV = {"ROBOFLOW_API_KEY": KEY}
CLASSES = ("cat", "dog", "bird", "fish")

Row = dict[str, Any]


def expected_eval(
    rows: list[Row],
    label_of: Callable[[Row], str | None],
    *,
    label_source: str,
    threshold: float = 0.8,
    unmatched: int | None = None,
    keep: int = 1000,
) -> dict[str, Any]:
    """The evaluation, recounted plainly from the rows."""
    failed = sum(1 for row in rows if row["status"] != "ok")
    scored = []  # (row number, row, label)
    unlabeled = 0
    for number, row in enumerate(rows):
        if row["status"] != "ok":
            continue
        label = label_of(row)
        if label is None:
            unlabeled += 1
        else:
            scored.append((number, row, label))
    labeled = len(scored)
    correct = sum(1 for _, row, label in scored if row["top"] == label)

    top_k = {}
    for k in (1, 3, 5):
        hits = 0
        for _, row, label in scored:
            order = [row["top"]] if row["top"] else []
            rest = [name for name in row["predictions"] if name != row["top"]]
            rest.sort(key=lambda name: (-row["predictions"][name], name))
            if label in (order + rest)[:k]:
                hits += 1
        top_k[str(k)] = round(hits / labeled, 6) if labeled else None

    labels = sorted({label for _, _, label in scored})
    tops = sorted({row["top"] for _, row, _ in scored if row["top"]})
    classes = sorted(set(labels) | set(tops))
    matrix = [[0] * len(classes) for _ in classes]
    for _, row, label in scored:
        if row["top"]:
            matrix[classes.index(label)][classes.index(row["top"])] += 1

    per_class = {}
    raw = {}
    for i, name in enumerate(classes):
        true_positive = matrix[i][i]
        support = sum(1 for _, _, label in scored if label == name)
        predicted = sum(1 for _, row, _ in scored if row["top"] == name)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        raw[name] = (precision, recall, f1, support)
        per_class[name] = {
            "precision": round(precision, 6),
            "recall": round(recall, 6),
            "f1": round(f1, 6),
            "support": support,
            "predicted": predicted,
        }
    macro = weighted = None
    if labeled:
        macro, weighted = {}, {}
        for index, metric in enumerate(("precision", "recall", "f1")):
            macro[metric] = round(sum(raw[n][index] for n in classes) / len(classes), 6)
            weighted[metric] = round(sum(raw[n][index] * raw[n][3] for n in classes) / labeled, 6)

    known = set()
    for row in rows:
        if row["status"] == "ok":
            known.update(row["predictions"])
            if row["top"]:
                known.add(row["top"])

    errors = [
        (number, row, label)
        for number, row, label in scored
        if row["top"] and row["top"] != label and row["confidence"] >= threshold
    ]
    errors.sort(key=lambda entry: (-entry[1]["confidence"], entry[0]))
    return {
        "label_source": label_source,
        "rows": len(rows),
        "labeled": labeled,
        "unlabeled": unlabeled,
        "failed": failed,
        "no_prediction": sum(1 for _, row, _ in scored if not row["top"]),
        "correct": correct,
        "accuracy": round(correct / labeled, 6) if labeled else None,
        "top_k_accuracy": top_k,
        "macro_avg": macro,
        "weighted_avg": weighted,
        "per_class": per_class,
        "confusion": {"labels": classes, "matrix": matrix},
        "unknown_labels": [name for name in labels if name not in known],
        "never_predicted": [name for name in labels if name not in tops],
        "never_labeled": [name for name in tops if name not in labels],
        "unmatched_label_entries": unmatched,
        "label_error_threshold": threshold,
        "label_error_count": len(errors),
        "label_errors": [
            {
                "source": row["source"],
                "path": row["path"],
                "label": label,
                "top": row["top"],
                "confidence": row["confidence"],
            }
            for _, row, label in errors[:keep]
        ],
    }


def parent_of(row: Row) -> str | None:
    return Path(row["path"]).parent.name


async def classified_dataset(tmp_path: Path, start_emulator: StartEmulator) -> list[Row]:
    """``data/{cat,dog,bird}/*.jpg`` (8 each), ``data/zebra/*.jpg`` (3, a class the model does
    not have) and a broken file, classified into ``tmp_path / "r.jsonl"``."""
    url = await start_emulator(classes=CLASSES)
    for offset, name in enumerate(("cat", "dog", "bird")):
        for n in range(8):
            make_image(tmp_path / "data" / name / f"{n}.jpg", seed=100 * offset + n)
    for n in range(3):
        make_image(tmp_path / "data" / "zebra" / f"{n}.jpg", seed=900 + n)
    (tmp_path / "data" / "cat" / "broken.jpg").write_bytes(b"not an image")
    code, _, err = await run_cli(
        "run", "data", "--model", "demo/1", "--endpoint", url, "--out", "r.jsonl",
        env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert code == 1, err  # the broken file
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert len(rows) == 28
    return rows


async def run_eval(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "e.json"
    out.unlink(missing_ok=True)
    code, stdout, err = await run_cli("eval", *args, "--eval", str(out), cwd=tmp_path)
    assert code == 0, err
    assert stdout == ""
    return json.loads(out.read_text()), err


async def test_parent_labels_every_metric(tmp_path: Path, start_emulator: StartEmulator) -> None:
    rows = await classified_dataset(tmp_path, start_emulator)
    got, err = await run_eval(tmp_path, "r.jsonl", "--labels", "parent")
    wanted = expected_eval(rows, parent_of, label_source="parent")
    assert got == wanted
    assert list(got) == list(wanted)  # the documented key order
    # the dataset is not trivial, so the comparison above could fail
    assert got["rows"] == 28 and got["failed"] == 1 and got["labeled"] == 27
    assert 0 < got["correct"] < got["labeled"]
    assert got["top_k_accuracy"]["1"] == got["accuracy"] < got["top_k_accuracy"]["3"]
    assert got["unknown_labels"] == ["zebra"]
    assert got["never_predicted"] == ["zebra"]
    assert got["never_labeled"] == ["fish"]
    assert got["confusion"]["labels"] == ["bird", "cat", "dog", "fish", "zebra"]
    assert got["per_class"]["fish"]["support"] == 0 and got["per_class"]["zebra"]["predicted"] == 0
    assert got["label_error_count"] >= 2
    confidences = [error["confidence"] for error in got["label_errors"]]
    assert confidences == sorted(confidences, reverse=True) and min(confidences) >= 0.8
    # the summary
    assert f"accuracy {got['correct'] / 27:.1%} ({got['correct']}/27)" in err
    assert f"top-3 {got['top_k_accuracy']['3']:.1%}" in err
    assert "worst classes by F1: " in err
    assert f"{got['label_error_count']} likely label errors" in err
    first = got["label_errors"][0]
    assert f"{first['source']}: labeled {first['label']}, model says {first['top']}" in err
    assert "labels the model does not seem to know: zebra" in err
    # the Python API gives the same
    api = evaluate(tmp_path / "r.jsonl", LabelSource.parse("parent"))
    assert api.to_dict() == got
    assert api.accuracy == got["correct"] / 27
    # another threshold
    got, _ = await run_eval(
        tmp_path, "r.jsonl", "--labels", "parent", "--label-error-threshold", "0.5"
    )
    assert got == expected_eval(rows, parent_of, label_source="parent", threshold=0.5)
    assert got["label_error_count"] > len(confidences)


async def test_label_files(tmp_path: Path, start_emulator: StartEmulator) -> None:
    rows = await classified_dataset(tmp_path, start_emulator)
    (tmp_path / "labels").mkdir()
    # A hand-made truth that differs from the folders: cat/0-3 say "dog"; some rows no label.
    truth = {f"data/cat/{n}.jpg": "dog" for n in range(4)}
    truth |= {f"data/dog/{n}.jpg": "dog" for n in range(6)}
    truth |= {f"data/bird/{n}.jpg": "bird" for n in range(8)}
    truth["data/zebra/0.jpg"] = "horse"
    names = sorted(truth)
    # three ways of naming an image: relative to the label file, as the row's source, absolute
    written = {}
    for index, source in enumerate(names):
        if index % 3 == 0:
            written[source] = "../" + source
        elif index % 3 == 1:
            written[source] = source  # the run was made from tmp_path: equals the row's source
        else:
            written[source] = str(tmp_path / source)
    with (tmp_path / "labels" / "truth.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "species", "note"])
        for source in names:
            writer.writerow([written[source], truth[source], "x"])
        writer.writerow(["../data/nope.jpg", "cat", "an image no row has"])
        writer.writerow(["data/cat/7.jpg", "", "an empty label: no label"])

    def label_of(row: Row) -> str | None:
        return truth.get(row["source"])

    got, err = await run_eval(
        tmp_path, "r.jsonl", "--labels", "labels/truth.csv", "--column-label", "species"
    )
    wanted = expected_eval(rows, label_of, label_source="labels/truth.csv", unmatched=1)
    assert got == wanted
    assert got["labeled"] == len(truth) == 19 and got["unlabeled"] == 27 - 19
    assert got["unknown_labels"] == ["horse"]
    assert "1 label-file entries matched no row" in err

    # The same truth as JSONL, named by file_name, the label in "class".
    with (tmp_path / "labels" / "truth.jsonl").open("w") as handle:
        for source in names:
            handle.write(json.dumps({"file_name": written[source], "class": truth[source]}) + "\n")
        handle.write("\n")
    got, _ = await run_eval(tmp_path, "r.jsonl", "--labels", "labels/truth.jsonl")
    assert got == expected_eval(rows, label_of, label_source="labels/truth.jsonl", unmatched=0)

    # Without --column-label, the CSV has no label column.
    code, _, err = await run_cli("eval", "r.jsonl", "--labels", "labels/truth.csv", cwd=tmp_path)
    assert code == 2
    assert "no label column 'label' or 'class'" in err and "'species'" in err


async def test_labels_from_a_kept_column(tmp_path: Path, start_emulator: StartEmulator) -> None:
    url = await start_emulator(classes=CLASSES)
    truth: dict[str, str] = {}
    with (tmp_path / "list.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for n in range(16):
            name = f"img/{n}.jpg"
            make_image(tmp_path / name, seed=500 + n)
            label = ("cat", "dog", "bird", "fish", "")[n % 5]
            writer.writerow([name, label])
            if label:
                truth[name] = label
    code, _, err = await run_cli(
        "run", "list.csv", "--model", "demo/1", "--endpoint", url, "--out", "r.jsonl",
        "--keep-columns", "label", env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    rows = read_jsonl(tmp_path / "r.jsonl")
    assert all("label" in row["columns"] for row in rows)

    def label_of(row: Row) -> str | None:
        return row["columns"]["label"] or None

    got, _ = await run_eval(tmp_path, "r.jsonl", "--labels", "column:label")
    assert got == expected_eval(rows, label_of, label_source="column:label")
    assert got["labeled"] == len(truth) == 13 and got["unlabeled"] == 3
    # a column the rows do not have: nothing labeled, said so, exit 0
    got, err = await run_eval(tmp_path, "r.jsonl", "--labels", "column:species")
    assert got["labeled"] == 0 and got["accuracy"] is None and got["macro_avg"] is None
    assert got["top_k_accuracy"] == {"1": None, "3": None, "5": None}
    assert "warning: no row has a label from column:species" in err


def synthetic_row(source: str, **fields: Any) -> Row:
    row: Row = {"source": source, "path": None, "status": "ok", "top": None, "confidence": None}
    row |= {"predicted_classes": [], "predictions": {}, "error": None}
    row |= fields
    return row


def write_rows(path: Path, rows: list[Row]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


async def test_edge_rows(tmp_path: Path) -> None:
    rows = [
        # no parent folder: no label
        synthetic_row("x.jpg", top="cat", confidence=0.9, predictions={"cat": 0.9}),
        synthetic_row("/x.jpg", path="/x.jpg", top="cat", confidence=0.9),
        # a URL's folder
        synthetic_row(
            "https://example.com/cat/a.jpg",
            top="dog",
            confidence=0.95,
            predictions={"dog": 0.95, "cat": 0.05},
        ),
        synthetic_row("https://example.com/b.jpg", top="dog", confidence=0.95),
        # the path wins over the source
        synthetic_row(
            "list.csv:3",
            path="/data/dog/c.jpg",
            top="dog",
            confidence=0.5,
            predictions={"dog": 0.5, "cat": 0.3},
        ),
        # tied scores are ranked by name (a, b, c, d, e); "d" is known but never the top
        synthetic_row(
            "/data/d/g.jpg",
            path="/data/d/g.jpg",
            top="a",
            confidence=0.3,
            predictions={"a": 0.3, "d": 0.2, "c": 0.2, "b": 0.2, "e": 0.1},
        ),
        # an empty answer: scored, a miss, not in the matrix
        synthetic_row("/data/bird/d.jpg", path="/data/bird/d.jpg"),
        # failed rows, labeled or not
        synthetic_row(
            "/data/cat/e.jpg",
            path="/data/cat/e.jpg",
            status="error",
            error={"type": "input", "message": "broken", "http_status": None},
        ),
        synthetic_row("f.jpg", status="error"),
    ]
    write_rows(tmp_path / "r.jsonl", rows)
    truth = {
        "https://example.com/cat/a.jpg": "cat",
        "list.csv:3": "dog",
        "/data/bird/d.jpg": "bird",
        "/data/d/g.jpg": "d",
    }
    got, _ = await run_eval(tmp_path, "r.jsonl", "--labels", "parent")
    assert got == expected_eval(rows, lambda row: truth.get(row["source"]), label_source="parent")
    assert (got["labeled"], got["unlabeled"], got["failed"], got["no_prediction"]) == (4, 3, 2, 1)
    assert got["correct"] == 1
    assert got["confusion"] == {
        "labels": ["a", "bird", "cat", "d", "dog"],
        "matrix": [
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1],
        ],
    }
    assert got["per_class"]["bird"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
        "predicted": 0,
    }
    assert got["never_predicted"] == ["bird", "cat", "d"]
    assert got["never_labeled"] == ["a"]
    assert got["unknown_labels"] == ["bird"]  # in no row's predictions
    assert got["top_k_accuracy"] == {"1": 0.25, "3": 0.5, "5": 0.75}
    assert [error["source"] for error in got["label_errors"]] == ["https://example.com/cat/a.jpg"]

    # --eval - writes the JSON to stdout
    code, stdout, err = await run_cli(
        "eval", "r.jsonl", "--labels", "parent", "--eval", "-", cwd=tmp_path
    )
    assert code == 0, err
    assert json.loads(stdout) == got


async def test_label_errors_are_ranked_and_bounded(tmp_path: Path) -> None:
    rows = []
    for n in range(2000):
        confidence = round(0.5 + (n * 37 % 500) / 1000, 3)  # many ties
        top, label = ("cat", "dog") if n % 4 else ("dog", "dog")
        rows.append(
            synthetic_row(
                f"/d/{label}/{n}.jpg", path=f"/d/{label}/{n}.jpg", top=top,
                confidence=confidence, predictions={top: confidence},
            )
        )  # fmt: skip
    write_rows(tmp_path / "r.jsonl", rows)
    got, err = await run_eval(
        tmp_path, "r.jsonl", "--labels", "parent", "--label-error-threshold", "0.6"
    )
    wanted = expected_eval(rows, parent_of, label_source="parent", threshold=0.6)
    assert wanted["label_error_count"] > 1000
    assert got == wanted  # the 1000 most confident, ties in row order
    assert len(got["label_errors"]) == 1000
    assert f"{wanted['label_error_count']} likely label errors (confidence >= 0.6)" in err
    # the Python API can keep fewer
    small = evaluate(
        tmp_path / "r.jsonl", LabelSource.parse("parent"),
        label_error_threshold=0.6, max_label_errors=7,
    ).to_dict()  # fmt: skip
    assert small["label_errors"] == wanted["label_errors"][:7]
    assert small["label_error_count"] == wanted["label_error_count"]


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, ["r.csv", "--labels", "parent"], "eval reads JSONL results"),
        (None, ["missing.jsonl", "--labels", "parent"], "cannot read 'missing.jsonl'"),
        ("source,status\n", ["r.jsonl", "--labels", "parent"], "r.jsonl:1 is not a result row"),
        ('{"source": "a"}\n', ["r.jsonl", "--labels", "parent"], "r.jsonl:1 is not a result row"),
        (
            '{"source": "a", "status": "ok", "predictions": {"cat": "high"}}\n',
            ["r.jsonl", "--labels", "parent"],
            "not a number",
        ),
        (None, ["r.jsonl", "--labels", "nope.csv"], "cannot read the label file 'nope.csv'"),
        (None, ["r.jsonl", "--labels", "labels.txt"], "a label file is .csv or .jsonl"),
        (None, ["r.jsonl", "--labels", "column:"], "needs a column name"),
        (None, ["r.jsonl", "--labels", "parent", "--column-label", "x"], "has none"),
        (None, ["r.jsonl", "--labels", "parent", "--label-error-threshold", "1.5"], "between"),
        (None, ["r.jsonl", "--labels", "parent", "--eval", "r.jsonl"], "are the same file"),
        (None, ["r.jsonl", "--labels", "parent", "--eval", "old.json"], "--overwrite"),
        (None, ["r.jsonl", "--labels", "parent", "--eval", "no/e.json"], "does not exist"),
        (None, ["r.jsonl", "--labels", "bad.csv"], "no column naming the image"),
        (None, ["r.jsonl", "--labels", "twice.csv"], "twice.csv:3: 'a.jpg' is labeled 'dog'"),
        (None, ["r.jsonl", "--labels", "broken.jsonl"], "broken.jsonl:2: malformed JSON"),
    ],
)
async def test_errors_exit_2(
    tmp_path: Path, content: str | None, args: list[str], message: str
) -> None:
    good = json.dumps(synthetic_row("/d/cat/a.jpg", path="/d/cat/a.jpg", top="cat"))
    (tmp_path / "r.jsonl").write_text(content if content is not None else good + "\n")
    (tmp_path / "r.csv").write_text("source\n")
    (tmp_path / "labels.txt").write_text("a.jpg cat\n")
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "bad.csv").write_text("name,label\na.jpg,cat\n")
    (tmp_path / "twice.csv").write_text("path,label\na.jpg,cat\na.jpg,dog\n")
    (tmp_path / "broken.jsonl").write_text('{"path": "a.jpg", "label": "cat"}\n{"path"\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, stdout, err = await run_cli("eval", *args, cwd=tmp_path)
    assert code == 2, err
    assert message in err and err.startswith("error: ")
    assert stdout == ""
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


async def test_overwrite_replaces_the_evaluation(tmp_path: Path) -> None:
    row = synthetic_row("/d/cat/a.jpg", path="/d/cat/a.jpg", top="cat", predictions={"cat": 1})
    write_rows(tmp_path / "r.jsonl", [row])
    (tmp_path / "e.json").write_text("{}")
    code, _, err = await run_cli(
        "eval", "r.jsonl", "--labels", "parent", "--eval", "e.json", "--overwrite", cwd=tmp_path
    )
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == 1.0
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []

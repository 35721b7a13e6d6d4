"""run --labels: every row carries its ground truth, and --eval scores the run at its end."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import StartEmulator
from helpers import make_image, read_csv, read_jsonl, run_cli

KEY = "labels-run-key-112358"


async def test_a_run_with_labels_marks_rows_and_writes_the_evaluation(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(classes=("cat", "dog", "bird", "fish"))
    for label in ("cat", "dog", "bird"):
        for n in range(5):
            make_image(tmp_path / "data" / label / f"{n}.jpg", seed=hash((label, n)) % 997)
    (tmp_path / "data" / "cat" / "broken.jpg").write_bytes(b"not an image")
    out, table, scores = tmp_path / "r.jsonl", tmp_path / "r.csv", tmp_path / "e.json"
    code, _, err = await run_cli(
        "run", str(tmp_path / "data"), "--model", "demo/1", "--endpoint", url,
        "--out", str(out), "--out", str(table), "--labels", "parent", "--eval", str(scores),
        env={"ROBOFLOW_API_KEY": KEY},
    )  # fmt: skip
    assert code == 1, err  # the broken file
    rows = read_jsonl(out)
    for row in rows:
        label = Path(row["path"]).parent.name
        assert row["label"] == label
        expected = None if row["status"] != "ok" else row["top"] == label
        assert row["correct"] is expected
    csv_rows = {row["source"]: row for row in read_csv(table)}
    assert all(csv_rows[row["source"]]["label"] == row["label"] for row in rows)
    assert "accuracy" in err and f"evaluation written to {scores}" in err
    # The evaluation the run wrote is the one the eval command computes from the same rows.
    again = tmp_path / "again.json"
    code, _, err = await run_cli("eval", str(out), "--labels", "parent", "--eval", str(again))
    assert code == 0, err
    assert json.loads(scores.read_text()) == json.loads(again.read_text())
    ok = [row for row in rows if row["status"] == "ok"]
    evaluation = json.loads(scores.read_text())
    assert evaluation["correct"] == sum(row["correct"] for row in ok)
    assert evaluation["labeled"] == len(ok) and evaluation["failed"] == 1


async def test_eval_needs_labels_and_a_jsonl_output(tmp_path: Path) -> None:
    make_image(tmp_path / "data" / "cat" / "a.jpg", seed=1)
    base = ["run", str(tmp_path / "data"), "--model", "demo/1", "--emulate"]
    code, _, err = await run_cli(*base, "--out", str(tmp_path / "r.jsonl"), "--eval", "e.json")
    assert code == 2 and "--eval needs --labels" in err
    code, _, err = await run_cli(
        *base, "--out", str(tmp_path / "r.csv"), "--labels", "parent", "--eval", "e.json"
    )
    assert code == 2 and "give a .jsonl --out" in err
    code, _, err = await run_cli(*base, "--out", "-", "--labels", str(tmp_path / "none.csv"))
    assert code == 2 and "none.csv" in err


async def test_the_label_error_threshold_of_a_run(tmp_path: Path) -> None:
    for n in range(6):
        make_image(tmp_path / "data" / "zebra" / f"{n}.jpg", seed=n)
    base = ["run", str(tmp_path / "data"), "--model", "demo/1", "--emulate", "--labels", "parent"]
    counts = []
    for threshold in ("0", "1"):
        scores = tmp_path / f"e{threshold}.json"
        out = tmp_path / f"r{threshold}.jsonl"
        code, _, err = await run_cli(
            *base, "--out", str(out), "--eval", str(scores), "--label-error-threshold", threshold
        )
        assert code == 0, err
        counts.append(json.loads(scores.read_text())["label_error_count"])
    # No emulator class is "zebra": every row is wrong, an error at 0, none at 1 (< 1.0 scores).
    assert counts == [6, 0]
    code, _, err = await run_cli(*base, "--out", "-", "--label-error-threshold", "1.5")
    assert code == 2 and "label-error-threshold" in err

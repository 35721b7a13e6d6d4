"""Re-thresholding finished results: no request, only predicted_classes changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import StartEmulator
from helpers import emulator_stats, make_image, read_csv, read_jsonl, run_cli

KEY = "rethreshold-key-1618"


@pytest.mark.parametrize("multi_label", [False, True])
async def test_a_new_threshold_needs_no_request(
    tmp_path: Path, start_emulator: StartEmulator, multi_label: bool
) -> None:
    url = await start_emulator(multi_label=multi_label)
    for n in range(12):
        make_image(tmp_path / "in" / f"{n}.jpg", seed=n)
    make_image(tmp_path / "in" / "broken.jpg", seed=99).write_bytes(b"not an image")
    out = tmp_path / "r.jsonl"
    env = {"ROBOFLOW_API_KEY": KEY}
    run = ["run", str(tmp_path / "in"), "--model", "demo/1", "--endpoint", url]
    code, _, err = await run_cli(*run, "--out", str(out), "--confidence", "0.2", env=env)
    assert code == 1, err  # the broken file
    sent = (await emulator_stats(url))["requests"]
    strict, table = tmp_path / "strict.jsonl", tmp_path / "strict.csv"
    code, _, err = await run_cli(
        "rethreshold", str(out), "--confidence", "0.6", "-o", str(strict), "-o", str(table)
    )
    assert code == 0, err
    assert (await emulator_stats(url))["requests"] == sent  # nothing was sent
    before, after = read_jsonl(out), read_jsonl(strict)
    assert [row["source"] for row in after] == [row["source"] for row in before]
    for old, new in zip(before, after, strict=True):
        if old["status"] != "ok":
            assert new == old
            continue
        assert (new["top"], new["confidence"]) == (old["top"], old["confidence"])
        assert new["predictions"] == old["predictions"]
        if multi_label:
            wanted = [name for name, score in old["predictions"].items() if score >= 0.6]
        else:
            wanted = [old["top"]] if old["confidence"] >= 0.6 else []
        assert new["predicted_classes"] == wanted
    assert any(
        old["predicted_classes"] != new["predicted_classes"]
        for old, new in zip(before, after, strict=True)
    )
    assert len(read_csv(table)) == len(after)
    assert f"{len(after)} rows at confidence 0.6" in err


async def test_rethreshold_refuses_to_write_over_its_input(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    results.write_text('{"source": "a.jpg", "status": "ok", "top": "cat", "confidence": 0.5}\n')
    before = results.read_text()
    code, _, err = await run_cli(
        "rethreshold", str(results), "--confidence", "0.6", "-o", str(results)
    )
    assert code == 2 and "are the same file" in err
    assert results.read_text() == before
    code, _, err = await run_cli("rethreshold", str(results), "--confidence", "1.5", "-o", "-")
    assert code == 2 and "between 0 and 1" in err
    code, _, err = await run_cli(
        "rethreshold", str(tmp_path / "r.csv"), "--confidence", "0.5", "-o", "-"
    )
    assert code == 2 and "reads JSONL results" in err

"""The event loop (``--event-loop``): uvloop when installed, asyncio's own on request."""

from __future__ import annotations

import asyncio
import sys
import warnings
from pathlib import Path

import pytest
from helpers import make_image, read_jsonl, run_cli

from batchclassify import loop
from batchclassify.errors import ConfigError


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_when_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert loop.run(loop_module()).startswith("uvloop")
    assert loop.run(loop_module(), "uvloop").startswith("uvloop")


def test_asyncio_on_request_and_when_uvloop_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loop.run(loop_module(), "asyncio").startswith("asyncio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed
    assert loop.run(loop_module()).startswith("asyncio")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine not run must not warn either
        with pytest.raises(ConfigError, match=r"pip install 'batchclassify\[fast\]'"):
            loop.run(loop_module(), "uvloop")


@pytest.mark.parametrize("choice", ["asyncio", "auto"])
async def test_a_run_on_either_loop(tmp_path: Path, emulator_url: str, choice: str) -> None:
    for n in range(6):
        make_image(tmp_path / "in" / f"{n}.png", seed=n, size=(16, 16))
    out = tmp_path / "r.jsonl"
    code, _, stderr = await run_cli(
        "run",
        str(tmp_path / "in"),
        "--model",
        "demo/1",
        "--endpoint",
        emulator_url,
        "--out",
        str(out),
        "--event-loop",
        choice,
        "--processes",
        "2",
        env={"ROBOFLOW_API_KEY": "loop-key-1234"},
    )
    assert code == 0, stderr
    assert len(read_jsonl(out)) == 6


async def test_an_unknown_loop_is_refused(tmp_path: Path) -> None:
    code, _, stderr = await run_cli(
        "run", str(tmp_path), "--model", "demo/1", "--event-loop", "trio"
    )
    assert code == 2 and "--event-loop" in stderr

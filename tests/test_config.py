"""Settings from TOML files, the environment and the command line; the shipped examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import StartEmulator
from helpers import emulator_stats, make_image, run_cli

from batchclassify.config import RunSettings, format_settings, load_config_file, resolve_settings
from batchclassify.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
KEY = "config-secret-key-555"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_precedence_command_line_over_environment_over_file_over_default(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        'model = "from-file/1"\nconcurrency = 3\nmax_size = 640\nout = "one.jsonl"\n',
    )
    environ = {"BATCHCLASSIFY_CONCURRENCY": "5", "BATCHCLASSIFY_MAX_SIZE": "800"}
    resolved = resolve_settings({"max_size": 1024}, environ, config)
    settings = resolved.settings
    assert settings.model == "from-file/1"
    assert settings.concurrency == 5
    assert settings.max_size == 1024
    assert settings.out == ("one.jsonl",)
    assert settings.retries == RunSettings().retries
    assert resolved.origins["model"] == f"config file {config}"
    assert resolved.origins["concurrency"] == "environment BATCHCLASSIFY_CONCURRENCY"
    assert resolved.origins["max_size"] == "command line"
    assert "retries" not in resolved.origins


def test_environment_values_are_parsed_by_type(tmp_path: Path) -> None:
    environ = {
        "ROBOFLOW_API_KEY": KEY,
        "BATCHCLASSIFY_ADAPTIVE": "off",
        "BATCHCLASSIFY_OUT": "a.jsonl, b.csv",
        "BATCHCLASSIFY_RATE": "12.5",
        "BATCHCLASSIFY_MODEL": "p/2",
    }
    settings = resolve_settings({}, environ).settings
    assert settings.api_key == KEY and settings.adaptive is False
    assert settings.out == ("a.jsonl", "b.csv") and settings.rate == 12.5
    with pytest.raises(ConfigError, match=r"BATCHCLASSIFY_CONCURRENCY.*int"):
        resolve_settings({}, {"BATCHCLASSIFY_CONCURRENCY": "many"})
    with pytest.raises(ConfigError, match="BATCHCLASSIFY_NOPE"):
        resolve_settings({}, {"BATCHCLASSIFY_NOPE": "1"})


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", 'model = "env-file/4"\n')
    settings = resolve_settings({}, {"BATCHCLASSIFY_CONFIG": str(config)}).settings
    assert settings.model == "env-file/4"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("concurency = 4\n", "unknown setting 'concurency'"),
        ('concurrency = "four"\n', "concurrency must be int"),
        ("concurrency = true\n", "concurrency must be int"),
        ("adaptive = 1\n", "adaptive must be bool"),
        ("out = [1, 2]\n", "out must be a string or a list of strings"),
        ("model = \n", "not valid TOML"),
        ("concurrency = 0\n", "--concurrency must be at least 1"),
    ],
)
def test_bad_config_files_name_the_key_and_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    config = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=message) as caught:
        resolve_settings({}, {}, config)
    if "must be at least" not in message:
        assert str(config) in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "absent.toml")


def test_key_in_a_world_readable_file_warns(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", f'api_key = "{KEY}"\n', mode=0o644)
    _, warnings = load_config_file(config)
    assert warnings and "chmod 600" in warnings[0] and KEY not in warnings[0]
    config.chmod(0o600)
    assert load_config_file(config)[1] == []


def test_show_hides_the_key(tmp_path: Path) -> None:
    resolved = resolve_settings({"model": "m/1"}, {"ROBOFLOW_API_KEY": KEY})
    text = format_settings(resolved)
    assert KEY not in text
    assert 'api_key = "***"  # environment ROBOFLOW_API_KEY (hidden)' in text
    assert 'model = "m/1"  # command line' in text


async def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    return await run_cli(*args, cwd=cwd, env={"ROBOFLOW_API_KEY": KEY})


async def test_config_show_command(tmp_path: Path) -> None:
    code, out, err = await cli(
        "config",
        "show",
        "--config",
        str(REPO / "configs" / "hosted.toml"),
        "-c",
        "2",
        cwd=tmp_path,
    )
    assert code == 0, err
    assert "concurrency = 2  # command line" in out
    assert 'model = "your-project/3"  # config file' in out
    assert KEY not in out and KEY not in err


EXAMPLES = sorted((REPO / "configs").glob("*.toml"))


def test_every_example_config_loads() -> None:
    assert {path.name for path in EXAMPLES} >= {
        "hosted.toml",
        "self-hosted.toml",
        "emulator.toml",
        "nightly-scan.toml",
        "bulk-labeling.toml",
    }
    for path in EXAMPLES:
        settings = resolve_settings({}, {}, path).settings
        assert settings.model and settings.out, path
        settings.pipeline_options() if settings.emulate else None


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
async def test_every_example_config_runs_against_the_emulator(
    tmp_path: Path, start_emulator: StartEmulator, example: Path
) -> None:
    url = await start_emulator()
    images = tmp_path / "images"
    for n in range(4):
        make_image(images / f"{n}.jpg", seed=n, size=(900, 700))
    command = "scan" if "scan" in example.stem else "run"
    settings = resolve_settings({}, {}, example).settings
    outputs = [str(tmp_path / Path(out).name) for out in settings.out]
    # --emulate starts its own emulator, and refuses an --endpoint beside it
    overrides = [str(images)] if settings.emulate else [str(images), "--endpoint", url]
    for output in outputs:
        overrides += ["--out", output]
    code, _, err = await cli(command, "--config", str(example), *overrides, cwd=tmp_path)
    assert code == 0, err
    records = [json.loads(line) for line in Path(outputs[0]).read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    if not settings.emulate:
        assert (await emulator_stats(url))["requests"] == 4
    if settings.max_size:
        # The row says the original's size, and what was sent after --max-size.
        assert all(r["image"] == {"width": 900, "height": 700} for r in records)
        assert all(max(r["sent"].values()) == settings.max_size for r in records)
    if settings.organize:
        placed = list((tmp_path / settings.organize).rglob("*.jpg"))
        assert len(placed) == 4
    assert KEY not in err


def test_api_key_file_wins_over_the_environment(tmp_path: Path) -> None:
    key_file = write(tmp_path / "key", f"  {KEY}\n")
    resolved = resolve_settings(
        {"api_key_file": str(key_file)}, {"ROBOFLOW_API_KEY": "env-key-00000000"}
    )
    assert resolved.settings.api_key == KEY
    assert resolved.origins["api_key"].startswith(f"file {key_file}")
    assert KEY not in format_settings(resolved)
    assert not resolved.warnings  # 0600: nothing to say


def test_api_key_file_from_stdin_and_its_mistakes(tmp_path: Path) -> None:
    import io

    resolved = resolve_settings({"api_key_file": "-"}, {}, stdin=io.StringIO(f"{KEY}\nrest\n"))
    assert resolved.settings.api_key == KEY
    with pytest.raises(ConfigError, match="not both"):
        resolve_settings({"api_key": KEY, "api_key_file": "-"}, {}, stdin=io.StringIO(KEY))
    with pytest.raises(ConfigError, match="cannot read --api-key-file"):
        resolve_settings({"api_key_file": str(tmp_path / "missing")}, {})
    for text in ("", "\n", "two words\n"):
        with pytest.raises(ConfigError, match="one API key on one line"):
            resolve_settings({"api_key_file": str(write(tmp_path / "k", text))}, {})
    readable = write(tmp_path / "open", KEY, mode=0o644)
    warned = resolve_settings({"api_key_file": str(readable)}, {})
    assert any("other users" in warning for warning in warned.warnings)


async def test_api_key_file_on_the_command_line(
    tmp_path: Path, start_emulator: StartEmulator
) -> None:
    url = await start_emulator(api_key=KEY)  # any other key gets 403
    make_image(tmp_path / "in" / "a.jpg", seed=1)
    write(tmp_path / "key", KEY + "\n")
    args = ["run", str(tmp_path / "in"), "--model", "demo/1", "--endpoint", url, "--out", "-"]
    code, out, err = await run_cli(*args, "--api-key-file", str(tmp_path / "key"))
    assert code == 0, err
    assert json.loads(out)["status"] == "ok" and KEY not in out + err
    code, out, err = await run_cli(*args, "--api-key-file", "-", stdin=f"{KEY}\n".encode())
    assert code == 0, err
    both = ["run", "-", *args[2:], "--api-key-file", "-"]  # sources come before options
    code, _, err = await run_cli(*both, stdin=f"{KEY}\n".encode())
    assert code == 2 and "stdin cannot hold both" in err
    assert (await emulator_stats(url))["requests"] == 2


@pytest.mark.parametrize(
    ("command_line", "environ", "config_text"),
    [
        ({"emulate": True, "endpoint": "http://localhost:9001"}, {}, None),
        ({}, {"BATCHCLASSIFY_EMULATE": "1", "BATCHCLASSIFY_ENDPOINT": "http://h:9001"}, None),
        ({}, {}, 'emulate = true\nendpoint = "https://classify.roboflow.com"\n'),
    ],
    ids=["command-line", "environment", "same-file"],
)
def test_emulate_and_endpoint_from_one_level_are_refused(
    tmp_path: Path,
    command_line: dict[str, object],
    environ: dict[str, str],
    config_text: str | None,
) -> None:
    """Given together at one level, one of them would be silently ignored: an error."""
    config = write(tmp_path / "c.toml", config_text) if config_text is not None else None
    with pytest.raises(
        ConfigError, match=r"--emulate .* and --endpoint .* cannot be used together"
    ):
        resolve_settings(command_line, environ, config)
    # Either alone is fine, and so is --emulate with emulate switched off elsewhere.
    assert resolve_settings({"emulate": True}, {}).settings.emulate
    assert resolve_settings({"emulate": False, "endpoint": "http://localhost:9001"}, {})


def test_emulate_and_endpoint_from_two_levels_follow_precedence(tmp_path: Path) -> None:
    hosted = write(tmp_path / "hosted.toml", 'endpoint = "https://classify.roboflow.com"\n')
    dry = resolve_settings({"emulate": True}, {}, hosted)  # a dry run of a real job
    assert dry.settings.emulate and dry.settings.endpoint == RunSettings().endpoint
    assert "not used: --emulate (on the command line) wins" in dry.origins["endpoint"]
    assert "not used:" in format_settings(dry)
    real = resolve_settings({"endpoint": "http://localhost:9001"}, {"BATCHCLASSIFY_EMULATE": "1"})
    assert not real.settings.emulate and real.settings.endpoint == "http://localhost:9001"
    assert "wins over --emulate from environment" in real.origins["emulate"]


async def test_emulate_with_endpoint_is_refused_by_run_and_by_config_show(tmp_path: Path) -> None:
    make_image(tmp_path / "in" / "a.jpg", seed=1)
    emulated = write(
        tmp_path / "emulated.toml",
        'model = "demo/1"\nemulate = true\nendpoint = "http://localhost:9001"\n',
    )
    for command in (["run", str(tmp_path / "in")], ["config", "show"]):
        code, out, err = await cli(
            *command, "--config", str(emulated), "--out", str(tmp_path / "r.jsonl"), cwd=tmp_path
        )
        assert code == 2, (command, err)
        assert "--emulate (from config file" in err and "--endpoint (from config file" in err
        assert "cannot be used together" in err and out == ""
    assert not (tmp_path / "r.jsonl").exists()
    # from two levels the higher wins, and config show says which was set aside
    code, out, err = await run_cli(
        "config",
        "show",
        "--model",
        "demo/1",
        "--emulate",
        cwd=tmp_path,
        env={"BATCHCLASSIFY_ENDPOINT": "http://localhost:9001"},
    )
    assert code == 0, err
    assert "not used: --emulate (on the command line) wins" in out

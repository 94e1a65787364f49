"""The `attnkit` command: the demo runs, its checks pass, bad options are rejected."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from attnkit import feature_maps
from attnkit.cli import app

runner = CliRunner()


def test_demo_passes_its_checks() -> None:
    result = runner.invoke(app, ["demo", "--lengths", "32,64"])
    assert result.exit_code == 0, result.output
    assert "(1.0, 4.0, 3.0)" in result.output
    assert "✗" not in result.output
    assert "checks agree with the theory" in result.output
    assert "speed-up" in result.output


def test_demo_without_timing() -> None:
    result = runner.invoke(app, ["demo", "--lengths", ""])
    assert result.exit_code == 0, result.output
    assert "speed-up" not in result.output


def test_demo_rejects_bad_lengths() -> None:
    result = runner.invoke(app, ["demo", "--lengths", "12,abc"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["demo", "--lengths", "0"])
    assert result.exit_code == 2


def test_maps_lists_every_registered_map() -> None:
    result = runner.invoke(app, ["maps", "--dim", "16"])
    assert result.exit_code == 0, result.output
    for name in feature_maps.available():
        assert name in result.output


def test_version_and_module_entry_point() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and "attnkit 0.1.0" in result.output
    proc = subprocess.run(
        [sys.executable, "-m", "attnkit.cli", "version"], capture_output=True, text=True, check=True
    )
    assert "attnkit" in proc.stdout


def test_train_command_forwards_to_the_trainer(tmp_path) -> None:
    result = runner.invoke(
        app, ["train", "--steps", "2", "--batch-size", "8", "--out", str(tmp_path), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "log.json").exists()
    result = runner.invoke(app, ["train", "--steps", "-1"])
    assert result.exit_code == 2


def test_cost_and_bench_commands_are_mounted() -> None:
    for command in ("cost", "bench"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output

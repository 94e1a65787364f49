"""attnkit.train: MQAR training on 1 and 2 processes, checkpoints and exact resume.

Tiny models and ~10 steps, so the whole file stays within seconds; the two-process run
uses gloo on localhost through :func:`attnkit.distributed.launch_local` (bounded in time).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from attnkit.distributed import launch_local
from attnkit.layers.transformer import TinyLM
from attnkit.train import CHECKPOINT, LOG, MODEL, TrainConfig, main

TINY = [
    "--vocab-size", "32", "--seq-len", "16", "--num-kv-pairs", "2",
    "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
    "--batch-size", "8", "--steps", "10", "--warmup-steps", "3", "--lr", "1e-2",
    "--eval-examples", "16", "--quiet",
]  # fmt: skip


def _losses(out: Path) -> list[float]:
    log = json.loads((out / LOG).read_text())
    return [rec["loss"] for rec in log["history"]]


def _log(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((out / LOG).read_text())
    return result


def train_worker(rank: int, world: int, argv: list[str], bad_argv: list[str]) -> list[int]:
    """Run main() on every rank of an existing gloo group; also a batch the ranks cannot split."""
    return [main(argv), main(bad_argv)]


def test_one_and_two_processes_give_the_same_curve(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*TINY, "--out", str(one)]) == 0
    codes = launch_local(
        train_worker,
        2,
        args=([*TINY, "--out", str(two)], [*TINY, "--batch-size", "7", "--out", str(two / "x")]),
        timeout=120.0,
        collective_timeout=60.0,
    )
    assert codes == [[0, 2], [0, 2]]  # batch 7 is not divisible by 2 processes: exit status 2
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 10
    assert a[-1] < a[0]  # it learns something even in 10 steps
    # Same global batches, gradient all-reduce instead of one sum: equal up to rounding.
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    log1, log2 = _log(one), _log(two)
    assert (log1["world_size"], log2["world_size"]) == (1, 2)
    assert log2["eval"]["accuracy"] == pytest.approx(log1["eval"]["accuracy"], abs=1 / 32)
    # Only rank 0 wrote, atomically: no temp files left, and the model loads back.
    assert sorted(p.name for p in two.iterdir()) == sorted([CHECKPOINT, LOG, MODEL])
    ckpt = torch.load(two / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 10 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    TinyLM.load(two / MODEL)


def test_resume_continues_the_curve_exactly(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*TINY, "--out", str(whole)]) == 0
    assert main([*TINY, "--out", str(split), "--stop-after", "4", "--checkpoint-every", "3"]) == 0
    ckpt = torch.load(split / CHECKPOINT, weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "step", "rng", "history", "config"}
    assert ckpt["step"] == 4 and len(ckpt["history"]) == 4
    assert not (split / MODEL).exists()  # not finished yet
    assert main([*TINY, "--out", str(split), "--resume"]) == 0
    assert _losses(split) == _losses(whole)  # bit for bit
    assert _log(split)["resumed_from"] == 4
    assert _log(split)["eval"] == _log(whole)["eval"]
    # Resuming a finished run does nothing more.
    assert main([*TINY, "--out", str(split), "--resume"]) == 0
    assert _losses(split) == _losses(whole)


def test_resume_rejects_a_changed_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*TINY, "--out", str(tmp_path), "--stop-after", "2"]) == 0
    assert main([*TINY, "--out", str(tmp_path), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "configuration changed" in err and "lr: checkpoint 0.01, now 0.5" in err


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    assert main([*TINY, "--out", str(tmp_path), "--resume", "--steps", "2"]) == 0
    assert len(_losses(tmp_path)) == 2 and _log(tmp_path)["resumed_from"] is None


def test_cosine_schedule() -> None:
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cfg.lr_at(110) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--d-model", "10", "--n-heads", "4"], "multiple of n_heads"),
        (["--seq-len", "7"], "seq_len must be even"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    """The README's command: torchrun (here --standalone, a free port) with 2 gloo processes."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "attnkit.train", *TINY, "--out", str(tmp_path), "--stop-after", "5",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    # On failure show the ranks' own error lines first (torchrun's summary is long).
    errors = [ln for ln in done.stderr.splitlines() if "rror" in ln or "terminate" in ln]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + done.stderr[-2000:]
    log = _log(tmp_path)
    assert log["world_size"] == 2 and len(log["history"]) == 5
    # The same first 5 steps as one process would take.
    one = tmp_path / "one"
    assert main([*TINY, "--out", str(one), "--stop-after", "5"]) == 0
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path)), torch.tensor(_losses(one)), rtol=1e-4, atol=1e-5
    )

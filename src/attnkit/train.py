r"""Train a TinyLM on multi-query associative recall (MQAR), on one process or many.

::

    python -m attnkit.train --steps 600 --out runs/mqar                       # one process
    torchrun --nproc_per_node=2 -m attnkit.train --steps 600 --out runs/mqar  # DDP, 2 ranks

The defaults (a 2-layer pre-norm TinyLM without MLP, short conv of width 3, 4 heads,
d_model 64; MQAR with V=128, L=32, 4 pairs; global batch 128, AdamW lr 3e-3) reach
100% held-out accuracy with softmax attention in 600 steps (about 20 s on one CPU core).

Single-process by default; under ``torchrun`` (which sets RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT) the model is wrapped in DistributedDataParallel over gloo
(CPU) or nccl (CUDA), and each rank trains on its slice of the *global* batch: batch t
is generated from (seed, t) alone, and rank r takes rows [r b, (r + 1) b) with
b = batch_size / world_size. The loss is normalised by the number of supervised
positions in the global batch, so the averaged DDP gradient equals the
single-process gradient and the same seed gives the same loss curve for any number
of processes (up to float rounding in the gradient all-reduce).

Optimiser: AdamW (weight decay on matrices, not on biases or LayerNorm gains), linear
warm-up then a cosine decay of the learning rate, gradient clipping.

Outputs in ``--out``, all written by rank 0 with a temporary file + ``os.replace`` so
that a crash never leaves a half-written file:

- ``checkpoint.pt``: model, optimiser, scheduler, step, every rank's RNG state and the
  loss history; ``--resume`` continues from it and reproduces the uninterrupted curve
  exactly (same world size) or to rounding (another world size);
- ``log.json``: the configuration, world size and per-step loss, accuracy and learning
  rate, and the final evaluation;
- ``model.pt``: the trained model, for ``attnkit.TinyLM.load``.

:func:`main` is the command-line entry point (``main(argv) -> exit code``);
:func:`train` runs a :class:`TrainConfig` with :class:`RunOptions` and returns the
log as a dict.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from attnkit._io import atomic_write
from attnkit.data import IGNORE_INDEX, MQARConfig
from attnkit.distributed import close_process_group, shard_bounds
from attnkit.layers.transformer import TinyLM

__all__ = ["CHECKPOINT", "LOG", "MODEL", "RunOptions", "TrainConfig", "main", "train"]

CHECKPOINT = "checkpoint.pt"
LOG = "log.json"
MODEL = "model.pt"
_FORMAT = "attnkit.train/1"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the loss curve (a resumed run must match it exactly)."""

    # task: MQAR (attnkit.data)
    vocab_size: int = 128  # V: keys from the lower half, values from the upper half
    seq_len: int = 32  # L: even, >= 4 * num_kv_pairs
    num_kv_pairs: int = 4  # key-value pairs per sequence, each queried once
    power_a: float = 0.01  # query gap law p(g) ~ (g + 1)^(a - 1)
    # model: a TinyLM (learned positions, tied head)
    backend: str = "softmax"  # attention backend: softmax, linear, argmax, kernel
    feature_map: str | None = None  # feature map for backend="linear" (None: elu)
    d_model: int = 64  # residual width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # heads (head width d_model / n_heads)
    mlp: bool = False  # MLP sublayers (Zoology's MQAR models have none)
    conv_kernel: int | None = 3  # short causal depthwise conv before attention (Based)
    norm: str = "pre"  # "pre": x + A(LN(x)); "post": LN(x + A(x)) (TinyLM's Block)
    # optimisation
    steps: int = 1000  # optimiser steps (the cosine schedule spans them)
    batch_size: int = 128  # global batch, split evenly over the ranks
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.1  # AdamW decay of weight matrices and embeddings
    warmup_steps: int = 50  # linear warm-up from lr / warmup_steps to lr
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    seed: int = 0  # model init and data; batch t is drawn from (seed, t)

    def __post_init__(self) -> None:
        for name, minimum in (
            ("d_model", 1),
            ("n_layers", 1),
            ("n_heads", 1),
            ("steps", 1),
            ("batch_size", 1),
            ("warmup_steps", 0),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        for name in ("lr", "weight_decay", "min_lr_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be <= 1, got {self.min_lr_ratio}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        self.task()  # validates the MQAR fields

    def task(self) -> MQARConfig:
        """The MQAR task this run trains on."""
        return MQARConfig(self.vocab_size, self.seq_len, self.num_kv_pairs, self.power_a)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): warm-up, then cosine."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


@dataclass(frozen=True)
class RunOptions:
    """How to run (none of it changes the loss curve)."""

    out: Path = Path("runs/mqar")  # directory for checkpoint.pt, log.json, model.pt
    resume: bool = False  # continue from out/checkpoint.pt when it exists
    stop_after: int | None = None  # stop (with a checkpoint) once this step is done
    checkpoint_every: int = 100  # steps between checkpoints (and at the end)
    eval_examples: int = 1024  # held-out sequences for the final accuracy (0: skip)
    progress: bool | None = None  # progress bar on rank 0 (None: when stderr is a TTY)
    quiet: bool = False  # no progress bar and no summary lines
    threads: int | None = None  # torch.set_num_threads (None: leave as is)
    device: str | None = None  # None: cuda:LOCAL_RANK if CUDA is available, else cpu
    dist_timeout: float = 600.0  # seconds a collective may wait before failing


# --------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _World:
    rank: int
    size: int
    device: torch.device
    owns_group: bool  # this module initialised the process group (and destroys it)

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _setup(opts: RunOptions) -> _World:
    """Join torchrun's process group (env://) or an existing one; else one process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if opts.device is not None:
        device = torch.device(opts.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if dist.is_available() and not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=opts.dist_timeout),
            )
            owns = True
    if dist.is_available() and dist.is_initialized():
        return _World(dist.get_rank(), dist.get_world_size(), device, owns)
    return _World(0, 1, device, False)


def _batch_generator(seed: int, index: int, stream: int) -> torch.Generator:
    # Batch `index` of stream 0 (training) or 1 (evaluation) depends on (seed, index) only.
    return torch.Generator().manual_seed(((seed * 2 + stream) << 32) + index)


# --------------------------------------------------------------------------------------
# Checkpoints and logs (rank 0, atomic)
# --------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _gather_rng(world: _World) -> list[dict[str, Tensor]]:
    mine = _rng_state(world.device)
    if not world.distributed:
        return [mine]
    every: list[Any] = [None] * world.size
    dist.all_gather_object(every, mine)
    return [{k: v.cpu() for k, v in s.items()} for s in every]


def _save_checkpoint(
    path: Path,
    cfg: TrainConfig,
    model: TinyLM,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    history: list[dict[str, float]],
    world: _World,
) -> None:
    rng = _gather_rng(world)  # a collective: every rank takes part
    if world.rank == 0:
        payload = {
            "format": _FORMAT,
            "config": asdict(cfg),
            "model_config": asdict(model.config),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "world_size": world.size,
            "rng": rng,
            "history": history,
        }
        atomic_write(path, lambda f: torch.save(payload, f))
    if world.distributed:
        dist.barrier()


def _load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an attnkit.train checkpoint (format {_FORMAT!r})")
    saved = ckpt["config"]
    diffs = [
        f"{f.name}: checkpoint {saved.get(f.name)!r}, now {getattr(cfg, f.name)!r}"
        for f in fields(cfg)
        if saved.get(f.name) != getattr(cfg, f.name)
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: the run's configuration changed ("
            + "; ".join(diffs)
            + "); use the same arguments or another --out directory"
        )
    return ckpt


def _write_log(path: Path, log: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(log, indent=1) + "\n"), mode="w")


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _build_model(cfg: TrainConfig) -> TinyLM:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    return TinyLM(
        vocab=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        backend=cfg.backend,
        feature_map=cfg.feature_map,
        max_len=cfg.seq_len,
        mlp=cfg.mlp,
        conv_kernel=cfg.conv_kernel,
        norm=cfg.norm,
        positions="learned",
        tie_embeddings=True,
    )


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices and embeddings only (nanoGPT's rule): biases and LayerNorm gains keep
    # their scale. The tied head shares the embedding's parameter (deduplicated here).
    params = dict(model.named_parameters())
    decay = [p for p in params.values() if p.dim() >= 2]
    keep = [p for p in params.values() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": keep, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def _local_rows(batch_size: int, world: _World) -> slice:
    if batch_size % world.size:
        raise ValueError(
            f"batch_size={batch_size} (the global batch) must be divisible by the number "
            f"of processes {world.size}"
        )
    per_rank = batch_size // world.size
    return slice(world.rank * per_rank, (world.rank + 1) * per_rank)


def _sum_over_ranks(values: list[float], world: _World) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(t)
    return [float(x) for x in t.tolist()]


@torch.no_grad()
def _evaluate(model: TinyLM, cfg: TrainConfig, n: int, world: _World) -> dict[str, float]:
    """Loss and accuracy on ``n`` held-out sequences (stream 1), sharded over the ranks."""
    was_training = model.training
    model.eval()
    batch = cfg.task().sample(n, _batch_generator(cfg.seed, 0, stream=1))
    lo, hi = shard_bounds(n, world.size, world.rank)
    loss, hits, count = 0.0, 0.0, 0.0
    for start in range(lo, hi, cfg.batch_size):
        chunk = slice(start, min(hi, start + cfg.batch_size))
        inputs = batch.inputs[chunk].to(world.device)
        labels = batch.labels[chunk].to(world.device)
        logits = model(inputs)  # [b, L, V]
        mask = labels != IGNORE_INDEX
        loss += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        hits += float((logits.argmax(-1)[mask] == labels[mask]).sum())
        count += float(mask.sum())
    model.train(was_training)
    loss, hits, count = _sum_over_ranks([loss, hits, count], world)
    return {"examples": n, "loss": loss / count, "accuracy": hits / count}


@contextlib.contextmanager
def _progress(show: bool, total: int, done: int) -> Iterator[Callable[[int, str], None]]:
    if not show:
        yield lambda step, status: None
        return
    bar = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with bar:
        task = bar.add_task("train", total=total, completed=done, status="")
        yield lambda step, status: bar.update(task, completed=step, status=status)


def train(cfg: TrainConfig, opts: RunOptions | None = None) -> dict[str, Any]:
    """Train (or resume) a TinyLM on MQAR as configured; returns the log (as in log.json).

    Runs on every rank of an initialised process group, or initialises one from
    torchrun's environment, or runs alone. Raises ValueError for a global batch that the
    ranks cannot split evenly or a checkpoint whose configuration differs.
    """
    opts = RunOptions() if opts is None else opts
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    world = _setup(opts)
    finished = False
    try:
        log = _train(cfg, opts, world)
        finished = True
        return log
    finally:
        if world.owns_group:
            close_process_group(finished)


def _train(cfg: TrainConfig, opts: RunOptions, world: _World) -> dict[str, Any]:
    rows = _local_rows(cfg.batch_size, world)
    lead = world.rank == 0
    say = Console(soft_wrap=True).print if lead and not opts.quiet else (lambda *a, **k: None)
    out = Path(opts.out)
    ckpt_path = out / CHECKPOINT

    model = _build_model(cfg).to(world.device)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cfg.lr_at(step) / cfg.lr)
    history: list[dict[str, float]] = []
    start = 0
    resumed_from: int | None = None
    if opts.resume and ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path, cfg)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = resumed_from = int(ckpt["step"])
        history = list(ckpt["history"])[:start]
        if ckpt["world_size"] == world.size:
            rng = ckpt["rng"][world.rank]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and world.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], world.device)
        say(f"resuming from {ckpt_path} at step {start}")
    elif opts.resume:
        say(f"no checkpoint at {ckpt_path}: starting from step 0")
    net: nn.Module = model
    if world.distributed:
        ids = [world.device.index] if world.device.type == "cuda" else None
        # No buffer sync per forward: the only buffers (e.g. favor projections) never change.
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers.)
        sync: dict[str, Any] = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        net = DistributedDataParallel(model, device_ids=ids, **sync)

    stop = cfg.steps if opts.stop_after is None else min(cfg.steps, opts.stop_after)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"TinyLM {cfg.backend}{'/' + cfg.feature_map if cfg.feature_map else ''} "
        f"({n_params:,} parameters) on MQAR V={cfg.vocab_size} L={cfg.seq_len} "
        f"pairs={cfg.num_kv_pairs}; {world.size} process(es) on {world.device}, global "
        f"batch {cfg.batch_size} ({rows.stop - rows.start} per process)"
    )
    task = cfg.task()
    log: dict[str, Any] = {
        "format": _FORMAT,
        "config": asdict(cfg),
        "world_size": world.size,
        "device": str(world.device),
        "torch": torch.__version__,
        "resumed_from": resumed_from,
        "history": history,
        "eval": None,
    }
    t0 = time.perf_counter()
    model.train()
    show = (
        lead
        and not opts.quiet
        and (opts.progress if opts.progress is not None else sys.stderr.isatty())
    )
    with _progress(show, cfg.steps, start) as update:
        for step in range(start, stop):
            batch = task.sample(cfg.batch_size, _batch_generator(cfg.seed, step, stream=0))
            n_supervised = int((batch.labels != IGNORE_INDEX).sum())  # global, no communication
            inputs = batch.inputs[rows].to(world.device)  # [b, L]
            labels = batch.labels[rows].to(world.device)  # [b, L]
            logits = net(inputs)  # [b, L, V]
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            # DDP averages gradients over ranks: scale so the average is d(global mean loss).
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss_sum * (world.size / n_supervised))
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            with torch.no_grad():
                mask = labels != IGNORE_INDEX
                hits = (logits.argmax(-1)[mask] == labels[mask]).sum()
            total_loss, total_hits = _sum_over_ranks([float(loss_sum.detach()), float(hits)], world)
            record = {
                "step": step + 1,
                "loss": total_loss / n_supervised,
                "accuracy": total_hits / n_supervised,
                "lr": lr,
            }
            history.append(record)
            update(step + 1, f"loss {record['loss']:.4f} acc {record['accuracy']:.3f}")
            if (step + 1) % opts.checkpoint_every == 0 or step + 1 == stop:
                _save_checkpoint(ckpt_path, cfg, model, opt, sched, step + 1, history, world)
                if lead:
                    _write_log(out / LOG, log)
    if start >= stop and lead:
        say(f"nothing to do: the checkpoint is at step {start} (stop at {stop})")
    log["seconds"] = time.perf_counter() - t0
    if stop == cfg.steps:
        if opts.eval_examples > 0:
            log["eval"] = _evaluate(model, cfg, opts.eval_examples, world)
        if lead:
            model.save(out / MODEL)
            _write_log(out / LOG, log)
        if world.distributed:
            dist.barrier()
    if history:
        last = history[-1]
        say(
            f"step {last['step']}: loss {last['loss']:.4f}, accuracy {last['accuracy']:.3f} "
            f"({log['seconds']:.1f} s this run)"
        )
    if log["eval"] is not None:
        ev = log["eval"]
        say(
            f"held-out ({ev['examples']} sequences): loss {ev['loss']:.4f}, "
            f"accuracy {ev['accuracy']:.3f}"
        )
    say(f"wrote {out / LOG}" + (f", {out / MODEL}" if stop == cfg.steps and lead else ""))
    return log


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _none_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a TinyLM on MQAR (multi-query associative recall); under "
        "torchrun --nproc_per_node=N it runs DistributedDataParallel over N processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    helps = {
        "vocab_size": "vocabulary V (keys: lower half, values: upper half)",
        "seq_len": "sequence length L (even, >= 4 * num-kv-pairs)",
        "num_kv_pairs": "key-value pairs per sequence",
        "power_a": "query gap law p(g) ~ (g+1)^(a-1)",
        "backend": "attention backend (softmax, linear, argmax, kernel)",
        "feature_map": "feature map for --backend linear (elu, taylor, polynomial, ...)",
        "d_model": "model width",
        "n_layers": "transformer blocks",
        "n_heads": "attention heads",
        "mlp": "MLP sublayers",
        "conv_kernel": "short causal conv kernel before attention (none: off)",
        "norm": "pre-norm x + A(LN(x)) or post-norm LN(x + A(x)) blocks",
        "steps": "optimiser steps (the cosine schedule spans them)",
        "batch_size": "global batch size, split over the processes",
        "lr": "peak learning rate",
        "weight_decay": "AdamW weight decay",
        "warmup_steps": "linear warm-up steps",
        "min_lr_ratio": "final learning rate / peak",
        "grad_clip": "max gradient norm (none: off)",
        "seed": "seed of the model init and of the data",
    }
    kinds: dict[str, Callable[[str], Any]] = {
        "feature_map": _none_or(str),
        "conv_kernel": _none_or(int),
        "grad_clip": _none_or(float),
    }
    group = p.add_argument_group("run configuration (a resumed run must repeat it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=helps[f.name]
            )
        else:
            kind = kinds.get(f.name, type(default))
            choices = ("pre", "post") if f.name == "norm" else None
            group.add_argument(
                flag, type=kind, default=default, choices=choices, help=helps[f.name]
            )
    run = p.add_argument_group("how to run")
    run.add_argument("--out", type=Path, default=RunOptions.out, help="output directory")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt if it exists (else start from step 0)",
    )
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop with a checkpoint once this step is done (the schedule still spans --steps)",
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=RunOptions.checkpoint_every,
        help="steps between checkpoints (one is always written at the end)",
    )
    run.add_argument(
        "--eval-examples",
        type=int,
        default=RunOptions.eval_examples,
        help="held-out sequences for the final accuracy (0: skip)",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on rank 0 (default: when stderr is a terminal)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    run.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    run.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK or cpu")
    run.add_argument(
        "--dist-timeout",
        type=float,
        default=RunOptions.dist_timeout,
        help="seconds a collective may wait",
    )
    return p


def main(argv: list[str] | None = None, *, prog: str = "python -m attnkit.train") -> int:
    """``python -m attnkit.train [options]``; returns the exit status (2: bad arguments).

    ``argv`` defaults to ``sys.argv[1:]``; ``prog`` is the command name shown in help and
    error messages (e.g. ``"attnkit train"`` when wired into the ``attnkit`` command).
    ``--help`` and argparse errors raise SystemExit as usual.
    """
    parser = _parser(prog)
    args = vars(parser.parse_args(argv))
    try:
        cfg = TrainConfig(**{f.name: args[f.name] for f in fields(TrainConfig)})
        opts = RunOptions(**{f.name: args[f.name] for f in fields(RunOptions) if f.name in args})
        if opts.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {opts.checkpoint_every}")
        if opts.stop_after is not None and opts.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {opts.stop_after}")
        if opts.eval_examples < 0:
            raise ValueError(f"--eval-examples must be >= 0, got {opts.eval_examples}")
        train(cfg, opts)
    except (ValueError, TypeError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

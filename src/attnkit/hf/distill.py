r"""Train a linearized model to behave like the softmax model it came from.

:func:`distill` is the one training entry point, in two stages (LoLCATs, Zhang et al.
2025, "LoLCATs: on low-rank linearizing of large language models"):

1. **Attention transfer.** Only the feature maps (and decay gates) train. Every
   converted layer runs its original softmax attention *and* its linear attention on the
   same q, k, v; the softmax output goes on to the next layer, so every layer sees the
   activations of the original model, and the loss compares the two:

   - ``loss="mse"`` (LoLCATs): mean squared error of the layer outputs (after o_proj),
     averaged over real tokens;
   - ``loss="xent"`` (Hedgehog, Zhang et al. 2024): cross-entropy of the linear
     attention's weights phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j') against the
     softmax weights, averaged over real query tokens and heads (O(L^2) memory).

   A layer's loss depends only on its own maps and its inputs come from the softmax
   model, so training all layers in one pass is the same as training them one at a
   time, at the cost of one forward pass of the original model per step.
2. **Fine-tune (optional).** A short next-token fine-tune of the converted model on
   the same token stream: every parameter (``finetune="full"``), or LoRA adapters on
   q/k/v/o plus the feature maps (``finetune="lora"``, through peft when it is
   installed; merged back into the weights at the end).

Data is the user's own token stream: a 1-D LongTensor [T] (windows of ``seq_len``
tokens are cut at random offsets) or rows [N, L] (random rows, cropped to ``seq_len``).
Batch t of stage s is drawn from (seed, s, t) alone, so a resumed run sees the same
batches. With ``out=DIR`` the run writes ``DIR/distill.pt`` (trainable weights,
optimizer, stage, step, loss history) every ``checkpoint_every`` steps through a
temporary file and a rename (:func:`attnkit._io.atomic_write`), and ``DIR/distill.json``
(the log); ``resume=True`` continues from the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
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

from attnkit._io import atomic_write
from attnkit._validation import check_int
from attnkit.hf.linearize import attention_mode, linearized_modules

__all__ = ["CHECKPOINT", "LOG", "DistillConfig", "distill", "lm_loss", "transfer_loss"]

CHECKPOINT = "distill.pt"
LOG = "distill.json"
_FORMAT = "attnkit.hf.distill/1"


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation run (a resumed run must match it)."""

    steps: int = 200  # stage 1 (attention transfer) optimiser steps
    lr: float = 1e-2  # stage 1 learning rate (AdamW; feature maps and decay gates only)
    loss: str = "mse"  # stage 1 loss: "mse" (LoLCATs, layer outputs) or "xent" (Hedgehog)
    finetune_steps: int = 0  # stage 2 next-token fine-tune steps (0: no stage 2)
    finetune_lr: float = 1e-4  # stage 2 learning rate
    finetune: str = "full"  # stage 2 trains "full" (every parameter) or "lora" (peft)
    lora_rank: int = 8  # LoRA rank r (alpha = 2 r) for finetune="lora"
    batch_size: int = 8  # sequences per step
    seq_len: int = 128  # tokens per sequence
    seed: int = 0  # batch t of stage s is drawn from (seed, s, t)
    checkpoint_every: int = 50  # steps between checkpoints (with out=...)

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 0)
        check_int("finetune_steps", self.finetune_steps, 0)
        check_int("batch_size", self.batch_size, 1)
        check_int("seq_len", self.seq_len, 1)
        check_int("seed", self.seed, 0)
        check_int("lora_rank", self.lora_rank, 1)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        if self.loss not in ("mse", "xent"):
            raise ValueError(f"loss must be 'mse' or 'xent', got {self.loss!r}")
        if self.finetune not in ("full", "lora"):
            raise ValueError(f"finetune must be 'full' or 'lora', got {self.finetune!r}")
        for name in ("lr", "finetune_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a float > 0, got {value!r}")


def _check_tokens(tokens: object, seq_len: int) -> Tensor:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a LongTensor [T] or [N, L], got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must hold integer token ids (int64), got {tokens.dtype}")
    if tokens.dim() == 1:
        if tokens.shape[0] < seq_len:
            raise ValueError(
                f"a token stream [T] needs T >= seq_len = {seq_len}, got T = {tokens.shape[0]}"
            )
    elif tokens.dim() == 2:
        if tokens.shape[0] < 1 or tokens.shape[1] < seq_len:
            raise ValueError(
                f"token rows [N, L] need N >= 1 and L >= seq_len = {seq_len}, got "
                f"{tuple(tokens.shape)}"
            )
    else:
        raise ValueError(f"tokens must be [T] or [N, L], got shape {tuple(tokens.shape)}")
    return tokens.long()


def _batch(tokens: Tensor, cfg: DistillConfig, stage: int, step: int) -> Tensor:
    """Batch ``step`` of ``stage``: [batch_size, seq_len], a function of (seed, stage, step)."""
    gen = torch.Generator().manual_seed((((cfg.seed * 4) + stage) << 32) + step)
    b, n = cfg.batch_size, cfg.seq_len
    offsets = torch.arange(n)
    if tokens.dim() == 1:
        starts = torch.randint(0, tokens.shape[0] - n + 1, (b,), generator=gen)
        return tokens[starts[:, None] + offsets]
    rows = torch.randint(0, tokens.shape[0], (b,), generator=gen)
    starts = torch.randint(0, tokens.shape[1] - n + 1, (b,), generator=gen)
    return tokens[rows[:, None], starts[:, None] + offsets]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _base(model: nn.Module) -> nn.Module:
    """The decoder without the LM head (the attention-transfer pass needs no logits)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def _transfer_step(model: nn.Module, batch: Tensor, loss: str) -> Tensor:
    with attention_mode(model, "transfer", loss) as mods:
        _base(model)(input_ids=batch, use_cache=False)
        losses = [m.transfer_loss for m in mods]
    if any(x is None for x in losses):
        raise RuntimeError("a linearized layer did not run in the transfer pass")
    return torch.stack([x for x in losses if x is not None]).mean()


@torch.no_grad()
def transfer_loss(model: nn.Module, input_ids: Tensor, loss: str = "mse") -> float:
    """Mean attention-transfer loss over the converted layers on ``input_ids`` [B, L]."""
    was = model.training
    model.eval()
    try:
        return float(_transfer_step(model, input_ids.to(_device(model)), loss))
    finally:
        model.train(was)


@torch.no_grad()
def lm_loss(model: nn.Module, input_ids: Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` on ``input_ids`` [B, L] (nats)."""
    was = model.training
    model.eval()
    try:
        ids = input_ids.to(_device(model))
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    finally:
        model.train(was)


@contextlib.contextmanager
def _progress(
    show: bool, total: int, done: int, label: str
) -> Iterator[Callable[[int, str], None]]:
    if not show or total == 0:
        yield lambda step, status: None
        return
    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with bar:
        task = bar.add_task(label, total=total, completed=done, status="")
        yield lambda step, status: bar.update(task, completed=step, status=status)


def _map_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Feature-map and decay-gate parameters, by name."""
    return {
        n: p
        for n, p in model.named_parameters()
        if ".feature_map_" in n or n.endswith(".decay_logit")
    }


def _load_checkpoint(path: Path, cfg: DistillConfig) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an attnkit distill checkpoint (format {_FORMAT!r})")
    saved = ckpt["config"]
    diffs = [
        f"{f.name}: checkpoint {saved.get(f.name)!r}, now {getattr(cfg, f.name)!r}"
        for f in fields(cfg)
        if saved.get(f.name) != getattr(cfg, f.name)
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: the configuration changed (" + "; ".join(diffs) + ")"
        )
    return ckpt


def _save(
    path: Path,
    cfg: DistillConfig,
    stage: int,
    step: int,
    params: dict[str, nn.Parameter],
    opt: torch.optim.Optimizer,
    log: dict[str, Any],
) -> None:
    payload = {
        "format": _FORMAT,
        "config": asdict(cfg),
        "stage": stage,
        "step": step,
        "params": {n: p.detach().cpu() for n, p in params.items()},
        "optimizer": opt.state_dict(),
        "log": log,
    }
    atomic_write(path, lambda f: torch.save(payload, f))
    atomic_write(path.parent / LOG, lambda f: f.write(json.dumps(log, indent=1) + "\n"), mode="w")


def _restore(params: dict[str, nn.Parameter], saved: dict[str, Tensor]) -> None:
    missing = sorted(params.keys() - saved.keys())
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))


def _wrap_lora(model: nn.Module, cfg: DistillConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError(
            "finetune='lora' needs peft (pip install peft); or use finetune='full'"
        ) from None
    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=2 * cfg.lora_rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    wrapped: nn.Module = get_peft_model(model, lcfg)
    for n, p in wrapped.named_parameters():
        if ".feature_map_" in n or n.endswith(".decay_logit"):
            p.requires_grad_(True)
    return wrapped


def distill(
    model: nn.Module,
    tokens: Tensor,
    config: DistillConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Attention transfer (stage 1), then an optional fine-tune (stage 2); returns the log.

    Args:
        model: a model converted by :func:`attnkit.hf.linearize` (trained in place).
        tokens: the user's token ids, a stream [T] or rows [N, L] (int64).
        config: steps, learning rates, loss, batch shape, seed (:class:`DistillConfig`).
        out: directory for ``distill.pt`` (checkpoint) and ``distill.json`` (log); None
            writes nothing.
        resume: continue from ``out/distill.pt`` when it exists (same config required).
        progress: show progress bars on stderr (None: when stderr is a terminal).

    The log holds ``transfer_loss`` (stage 1, per step), ``finetune_loss`` (stage 2, per
    step), ``trainable`` (parameter counts) and ``seconds``. Parameters that do not
    train in a stage have ``requires_grad`` False during it; every flag is restored at
    the end, and the model is left in eval mode.
    """
    cfg = DistillConfig() if config is None else config
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(cfg).__name__}")
    if not linearized_modules(model):
        raise ValueError("model has no linearized attention: call attnkit.hf.linearize first")
    data = _check_tokens(tokens, cfg.seq_len)
    show = progress if progress is not None else sys.stderr.isatty()
    dev = _device(model)
    ckpt_path = Path(out) / CHECKPOINT if out is not None else None
    ckpt: dict[str, Any] | None = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path, cfg)
    log: dict[str, Any] = (
        dict(ckpt["log"])
        if ckpt is not None
        else {"format": _FORMAT, "config": asdict(cfg), "transfer_loss": [], "finetune_loss": []}
    )
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    try:
        # ---- stage 1: attention transfer (feature maps and decay gates only) ----------
        maps = _map_params(model)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in maps.values():
            p.requires_grad_(True)
        log["trainable"] = {"transfer": sum(p.numel() for p in maps.values())}
        start = 0
        if ckpt is not None and ckpt["stage"] == 1:
            _restore(maps, ckpt["params"])
            start = int(ckpt["step"])
        elif ckpt is not None:  # a stage 2 checkpoint holds the maps among its parameters
            start = cfg.steps
        log["transfer_loss"] = log["transfer_loss"][:start]
        if maps and cfg.steps > start:
            opt = torch.optim.AdamW(maps.values(), lr=cfg.lr, weight_decay=0.0)
            if ckpt is not None and ckpt["stage"] == 1:
                opt.load_state_dict(ckpt["optimizer"])
            model.train()
            with _progress(show, cfg.steps, start, "attention transfer") as update:
                for step in range(start, cfg.steps):
                    batch = _batch(data, cfg, 1, step).to(dev)
                    loss = _transfer_step(model, batch, cfg.loss)
                    opt.zero_grad(set_to_none=True)
                    torch.autograd.backward(loss)
                    opt.step()
                    log["transfer_loss"].append(loss.item())
                    update(step + 1, f"loss {loss.item():.4g}")
                    if ckpt_path is not None and (
                        (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
                    ):
                        _save(ckpt_path, cfg, 1, step + 1, maps, opt, log)

        # ---- stage 2: next-token fine-tune --------------------------------------------
        if cfg.finetune_steps > 0:
            net = _wrap_lora(model, cfg) if cfg.finetune == "lora" else model
            if cfg.finetune == "full":
                for p in model.parameters():
                    p.requires_grad_(True)
            params = {n: p for n, p in net.named_parameters() if p.requires_grad}
            log["trainable"]["finetune"] = sum(p.numel() for p in params.values())
            start2 = int(ckpt["step"]) if ckpt is not None and ckpt["stage"] == 2 else 0
            log["finetune_loss"] = log["finetune_loss"][:start2]
            opt2 = torch.optim.AdamW(params.values(), lr=cfg.finetune_lr, weight_decay=0.0)
            if ckpt is not None and ckpt["stage"] == 2:
                _restore(params, ckpt["params"])
                opt2.load_state_dict(ckpt["optimizer"])
            net.train()
            with _progress(show, cfg.finetune_steps, start2, "fine-tune") as update:
                for step in range(start2, cfg.finetune_steps):
                    batch = _batch(data, cfg, 2, step).to(dev)
                    loss = net(input_ids=batch, labels=batch, use_cache=False).loss
                    opt2.zero_grad(set_to_none=True)
                    torch.autograd.backward(loss)
                    opt2.step()
                    log["finetune_loss"].append(loss.item())
                    update(step + 1, f"loss {loss.item():.4g}")
                    if ckpt_path is not None and (
                        (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.finetune_steps
                    ):
                        _save(ckpt_path, cfg, 2, step + 1, params, opt2, log)
            if net is not model:
                merged = net.merge_and_unload()  # type: ignore[operator]
                if merged is not model:
                    raise RuntimeError("peft's merge_and_unload returned a new model object")
    finally:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        model.eval()
    log["seconds"] = log.get("seconds", 0.0) + time.perf_counter() - t0
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(out) / LOG, lambda f: f.write(json.dumps(log, indent=1) + "\n"), mode="w")
    return log

"""``attnkit linearize``: convert a local Hugging Face causal LM and distill it on your tokens.

It lives outside :mod:`attnkit.hf` so that starting the ``attnkit`` command never imports
transformers; the command imports it when it runs.

::

    attnkit linearize ./my-llama ./my-llama-linear --tokens tokens.pt --steps 200
    python -c "import attnkit.hf; m = attnkit.hf.load_linearized('./my-llama-linear')"

``--tokens`` is a ``torch.save``-d int64 tensor ([T] stream or [N, L] rows), a ``.npy``
array, or a ``.txt`` file tokenized with the model directory's own tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["linearize_command", "load_tokens"]


def load_tokens(path: Path, model_dir: Path) -> Any:
    """Token ids from ``path`` (.pt / .npy / .txt, see the module docstring) as int64."""
    import torch

    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == ".npy":
        import numpy as np

        tokens = torch.from_numpy(np.load(path))
    elif suffix == ".txt":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ids = tok(path.read_text(encoding="utf-8"))["input_ids"]
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        raise typer.BadParameter(
            f"--tokens must be a .pt, .npy or .txt file, got {path.name!r}", param_hint="--tokens"
        )
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise typer.BadParameter(
            f"--tokens must hold integer token ids, got {got}", param_hint="--tokens"
        )
    return tokens.long()


def linearize_command(
    model_dir: Annotated[
        Path, typer.Argument(help="A local Hugging Face causal LM (save_pretrained directory).")
    ],
    out: Annotated[Path, typer.Argument(help="Where to write the converted model.")],
    feature_map: Annotated[
        str, typer.Option(help="hedgehog, t2r, or a fixed map (elu, taylor, favor, ...).")
    ] = "hedgehog",
    feature_dim: Annotated[
        int | None, typer.Option(min=1, help="Learnable maps' width F (default: head width).")
    ] = None,
    decay: Annotated[bool, typer.Option(help="Add a trainable decay gate per head.")] = False,
    tokens: Annotated[
        Path | None, typer.Option(help="Token ids to distill on (.pt, .npy or .txt).")
    ] = None,
    steps: Annotated[int, typer.Option(min=0, help="Attention-transfer steps.")] = 200,
    lr: Annotated[float, typer.Option(help="Attention-transfer learning rate.")] = 1e-2,
    loss: Annotated[str, typer.Option(help="mse (LoLCATs) or xent (Hedgehog).")] = "mse",
    finetune_steps: Annotated[int, typer.Option(min=0, help="Fine-tune steps (0: none).")] = 0,
    finetune: Annotated[str, typer.Option(help="full, or lora (needs peft).")] = "full",
    finetune_lr: Annotated[float, typer.Option(help="Fine-tune learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sequence.")] = 128,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the batches and maps.")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Continue from OUT/distill/distill.pt if it exists.")
    ] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch.set_num_threads.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Convert a softmax causal LM to linear attention, distill it, save it.

    Reload the result with attnkit.hf.load_linearized(OUT).
    """
    import torch

    try:
        from transformers import AutoModelForCausalLM

        from attnkit.hf import DistillConfig, distill, linearize, save_linearized
    except ImportError:
        typer.echo("attnkit linearize needs transformers: pip install 'attnkit[hf]'", err=True)
        raise typer.Exit(code=2) from None
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cfg = DistillConfig(
            steps=steps,
            lr=lr,
            loss=loss,
            finetune_steps=finetune_steps,
            finetune=finetune,
            finetune_lr=finetune_lr,
            batch_size=batch_size,
            seq_len=seq_len,
            seed=seed,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    data = load_tokens(tokens, model_dir) if tokens is not None else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    try:
        linearize(model, feature_map, feature_dim=feature_dim, decay=decay, seed=seed)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    if data is not None and (steps or finetune_steps):
        log = distill(model, data, cfg, out=out / "distill", resume=resume, progress=progress)
        t = log["transfer_loss"]
        if t:
            typer.echo(f"attention transfer: loss {t[0]:.4g} -> {t[-1]:.4g} ({len(t)} steps)")
        f = log["finetune_loss"]
        if f:
            typer.echo(f"fine-tune: loss {f[0]:.4g} -> {f[-1]:.4g} ({len(f)} steps)")
    elif data is None:
        typer.echo("no --tokens: converted without distillation (the maps are untrained)")
    save_linearized(model, out)
    typer.echo(f"wrote {out} (reload with attnkit.hf.load_linearized({str(out)!r}))")


def register(app: typer.Typer) -> None:
    """Add ``linearize`` to the ``attnkit`` command."""
    app.command("linearize")(linearize_command)

"""Attention maps of Hugging Face transformers models (eager attention, ``output_attentions``).

transformers is imported only when a function here needs it (``pip install
'attnkit[hf]'``); ``import attnkit.patterns`` works without it.

The fused attention kernels (sdpa, flash) never form the weight matrix, and with them
transformers 5.x returns *no* attentions for ``output_attentions=True`` (an empty
tuple and a log line), so :func:`capture_hf` switches the model to the ``"eager"``
implementation for the call and back afterwards. Loading reads local files only
(``local_files_only=True``): nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit._validation import check_rank, check_tensor
from attnkit.patterns.maps import AttentionMaps

__all__ = ["capture_hf", "is_hf_directory", "load_hf"]


def is_hf_directory(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory written by ``save_pretrained`` (has config.json)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_hf(path: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) from a ``save_pretrained`` directory, offline, eager attention.

    The model class is the first of the config's ``architectures`` (so a causal LM
    loads with its head and no "unexpected weights" report), else ``AutoModel``. The
    tokenizer is loaded when the directory holds one.
    """
    if not is_hf_directory(path):
        raise ValueError(
            f"{os.fspath(path)} is not a Hugging Face model directory (no config.json); "
            "save one with model.save_pretrained(path)"
        )
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a dev dependency
        raise ImportError(
            "reading a Hugging Face model needs transformers: pip install 'attnkit[hf]'"
        ) from err
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        cls = transformers.AutoModel
    model = cls.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    model.eval()
    tokenizer = None
    has_tokenizer = any(
        (Path(path) / f).is_file()
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
    )
    if has_tokenizer:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def capture_hf(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    token_text: Sequence[Sequence[str]] | None = None,
    delimiters: Tensor | None = None,
    source: str | None = None,
) -> AttentionMaps:
    """Attention maps of a transformers model on ``input_ids`` [B, L].

    Runs ``model(input_ids=..., attention_mask=..., output_attentions=True)`` in eval
    mode without gradients, with eager attention for the call. ``attention_mask``
    [B, L] (1 = token, 0 = padding) marks padded queries, which then count in no score.
    Returns [layers, B, H, L, L] maps. ValueError when the model returns no weights
    for some layer (e.g. a hybrid model whose linear-attention layers have none).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    ids = check_tensor("input_ids", input_ids)
    check_rank("input_ids", ids, "B L")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model ({type(model).__name__}) has no .config: not a transformers model")
    valid = None
    if attention_mask is not None:
        mask = check_tensor("attention_mask", attention_mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"attention_mask must have input_ids' shape {list(ids.shape)}, "
                f"got {list(mask.shape)}"
            )
        valid = mask.detach().cpu() != 0
    before = getattr(config, "_attn_implementation", None)
    was_training = model.training
    switch = before != "eager"
    if switch:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=attention_mask, output_attentions=True)
    finally:
        if switch and before is not None:
            model.set_attn_implementation(before)  # type: ignore[operator]
        model.train(was_training)
    attentions = getattr(out, "attentions", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    if not attentions or any(a is None for a in attentions):
        raise ValueError(
            f"{type(model).__name__} returned no attention weights for output_attentions=True "
            "(only eager attention layers have them)"
        )
    if n_layers is not None and len(attentions) != n_layers:
        raise ValueError(
            f"{type(model).__name__} returned weights for {len(attentions)} of its {n_layers} "
            "layers; a hybrid model's non-softmax layers have none"
        )
    weights = torch.stack([a.detach().float().cpu() for a in attentions])  # [N, B, H, L, L]
    return AttentionMaps(
        weights=weights,
        layers=tuple(f"layer {i}" for i in range(weights.shape[0])),
        tokens=ids.detach().cpu(),
        token_text=None if token_text is None else tuple(tuple(r) for r in token_text),
        delimiters=None if delimiters is None else delimiters.detach().cpu(),
        valid=valid,
        source=source or f"{type(model).__name__} ({getattr(config, 'model_type', '?')})",
    )

"""One call from a saved model to its attention maps: what ``attnkit patterns PATH`` runs.

``PATH`` is either a file written by :meth:`attnkit.TinyLM.save` or a directory written by
a transformers model's ``save_pretrained`` (read offline). The input is, in order of
preference, the given token ids, the given text (HF models with a tokenizer), or
``batch`` sequences of ``period`` random tokens repeated twice, the input on which
induction heads show (Olsson et al. 2022).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit._validation import check_int
from attnkit.patterns.capture import capture
from attnkit.patterns.hf import capture_hf, is_hf_directory, load_hf
from attnkit.patterns.inputs import repeated_tokens
from attnkit.patterns.maps import AttentionMaps

__all__ = ["analyze", "load_model"]


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer or None, kind) with kind ``"attnkit"`` or ``"hf"``; eval mode."""
    target = Path(path)
    if is_hf_directory(target):
        model, tokenizer = load_hf(target)
        return model, tokenizer, "hf"
    if target.is_file():
        from attnkit.layers import TinyLM

        lm = TinyLM.load(target)
        lm.eval()
        return lm, None, "attnkit"
    raise ValueError(
        f"{os.fspath(path)} is neither a TinyLM checkpoint (a file written by TinyLM.save) "
        "nor a Hugging Face model directory (with config.json, from save_pretrained)"
    )


def _vocab_and_length(model: nn.Module, kind: str) -> tuple[int, int | None]:
    cfg: Any = getattr(model, "config", None)
    if kind == "attnkit":
        return int(cfg.vocab), int(cfg.max_len)
    length = getattr(cfg, "max_position_embeddings", None)
    return int(cfg.vocab_size), None if length is None else int(length)


def analyze(
    path: str | os.PathLike[str],
    *,
    tokens: Sequence[int] | Tensor | None = None,
    text: str | None = None,
    period: int = 32,
    batch: int = 4,
    seed: int = 0,
    method: str = "auto",
) -> AttentionMaps:
    """Load the model at ``path`` and capture its attention maps on one input.

    ``tokens``: ids of one sequence (or [B, L]); ``text``: one string, tokenised by the
    model's own tokenizer (HF directories that have one); otherwise ``batch`` random
    sequences: the HF model's BOS token (if it has one), then ``period`` distinct random
    ids twice (``period`` shrinks to fit the model's vocabulary and length).
    ``method`` applies to attnkit models (:func:`~attnkit.patterns.record_attention`).
    With a tokenizer, its special tokens mark the delimiters (the delimiter score).
    """
    check_int("period", period, 1)
    check_int("batch", batch, 1)
    check_int("seed", seed, 0)
    if tokens is not None and text is not None:
        raise ValueError("pass tokens or text, not both")
    model, tokenizer, kind = load_model(path)
    vocab, max_len = _vocab_and_length(model, kind)
    token_text = None
    if tokens is not None:
        ids = torch.as_tensor(tokens, dtype=torch.long)
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(
                f"tokens must be one or more sequences of >= 2 ids, got {list(ids.shape)}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must be in [0, vocab={vocab}), got {ids.tolist()}")
    elif text is not None:
        if tokenizer is None:
            raise ValueError(
                f"text needs a tokenizer, and {os.fspath(path)} has none: pass token ids "
                "instead (--tokens)"
            )
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    else:
        prefix: list[int] = []
        bos = (
            getattr(getattr(model, "config", None), "bos_token_id", None) if kind == "hf" else None
        )
        if isinstance(bos, int) and 0 <= bos < vocab:
            prefix = [bos]
        room = (max_len - len(prefix)) // 2 if max_len is not None else period
        T = max(1, min(period, vocab - 1, room))
        # Random ids from 1 up: id 0 is often a special token.
        ids = repeated_tokens(
            batch,
            T,
            vocab,
            low=1 if vocab > T else 0,
            prefix=prefix,
            generator=torch.Generator().manual_seed(seed),
        )
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"the input has {ids.shape[1]} tokens, the model at most {max_len}")
    delimiters = None
    if tokenizer is not None:
        token_text = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids]
        # The tokenizer's special tokens ([CLS], [SEP], <s>, ...) are the delimiters.
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype)
        marks = torch.isin(ids, special)
        delimiters = marks if bool(marks.any()) else None
    name = Path(path).name
    if kind == "hf":
        return capture_hf(
            model,
            ids,
            token_text=token_text,
            delimiters=delimiters,
            source=f"{name}: {type(model).__name__}",
        )
    config: Any = getattr(model, "config", None)
    return capture(model, ids, method=method, source=f"{name}: TinyLM ({config.backend} attention)")

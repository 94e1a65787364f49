"""attnkit.hf: Hugging Face transformers integration (needs ``pip install attnkit[hf]``).

- :func:`linearize` turns a softmax causal LM (Llama, Mistral, Qwen2, Qwen3) into a
  linear-attention one that decodes from a constant-size recurrent state;
- :func:`distill` trains its feature maps to mimic the softmax attention (attention
  transfer), then optionally fine-tunes the whole model;
- :func:`save_linearized` / :func:`load_linearized` round-trip a converted model.

Core attnkit never imports this package (nor transformers).
"""

from __future__ import annotations

from attnkit.hf.distill import DistillConfig, distill, transfer_loss
from attnkit.hf.linearize import (
    ATTN_IMPLEMENTATION,
    SUPPORTED,
    LinearizedAttention,
    LinearStateLayer,
    attention_mode,
    is_linearized,
    linearize,
    linearized_modules,
    load_linearized,
    save_linearized,
    state_bytes,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SUPPORTED",
    "DistillConfig",
    "LinearStateLayer",
    "LinearizedAttention",
    "attention_mode",
    "distill",
    "is_linearized",
    "linearize",
    "linearized_modules",
    "load_linearized",
    "save_linearized",
    "state_bytes",
    "transfer_loss",
]

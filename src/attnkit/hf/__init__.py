"""attnkit inside Hugging Face transformers (``pip install attnkit[hf]``).

- :func:`register` makes attnkit ops transformers attention implementations
  (``attn_implementation="attnkit"`` and any attnkit backend under a name of yours);
- :func:`accelerate` routes the CPU paths of HF's linear-attention layers (Qwen3-Next,
  Qwen3.5 Gated DeltaNet, Kimi Linear KDA) through attnkit's delta-rule kernels and short
  convolution; :func:`restore` undoes it;
- :func:`linearize` turns a softmax causal LM (Llama, Mistral, Qwen2, Qwen3, GPT-2) into a
  linear-attention one that decodes from a constant-size recurrent state;
  :func:`distill` trains its feature maps to mimic the softmax attention (attention
  transfer), then optionally fine-tunes the whole model;
  :func:`save_linearized` / :func:`load_linearized` round-trip a converted model.

``SUPPORTED`` lists what :func:`accelerate` handles, ``LINEARIZE_SUPPORTED`` what
:func:`linearize` converts. Core attnkit never imports this package (nor transformers).
"""

from __future__ import annotations

from attnkit.hf.attention import DEFAULT_NAME, attention_function, register
from attnkit.hf.distill import DistillConfig, distill, transfer_loss
from attnkit.hf.linear_layers import SUPPORTED, accelerate, accelerated, is_accelerated, restore
from attnkit.hf.linearize import (
    ATTN_IMPLEMENTATION,
    LinearizedAttention,
    LinearStateLayer,
    attention_mode,
    cache_kwargs,
    is_linearized,
    linearize,
    linearized_modules,
    load_linearized,
    save_linearized,
    state_bytes,
)
from attnkit.hf.linearize import SUPPORTED as LINEARIZE_SUPPORTED

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DEFAULT_NAME",
    "LINEARIZE_SUPPORTED",
    "SUPPORTED",
    "DistillConfig",
    "LinearStateLayer",
    "LinearizedAttention",
    "accelerate",
    "accelerated",
    "attention_function",
    "attention_mode",
    "cache_kwargs",
    "distill",
    "is_accelerated",
    "is_linearized",
    "linearize",
    "linearized_modules",
    "load_linearized",
    "register",
    "restore",
    "save_linearized",
    "state_bytes",
    "transfer_loss",
]

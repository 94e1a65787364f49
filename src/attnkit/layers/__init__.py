"""nn.Modules built on attnkit.ops: multi-head attention, caches, blocks, a tiny LM."""

from attnkit.layers.attention import BACKENDS, MultiHeadAttention, backends
from attnkit.layers.cache import KVCache, LinearState
from attnkit.layers.transformer import Block, BlockCache, LMCache, ShortConv, TinyLM, TinyLMConfig

__all__ = [
    "BACKENDS",
    "Block",
    "BlockCache",
    "KVCache",
    "LMCache",
    "LinearState",
    "MultiHeadAttention",
    "ShortConv",
    "TinyLM",
    "TinyLMConfig",
    "backends",
]

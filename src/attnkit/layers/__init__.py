"""nn.Modules built on attnkit.ops: multi-head attention, caches, blocks, a tiny LM."""

from attnkit.layers.attention import BACKENDS, MultiHeadAttention, backends
from attnkit.layers.cache import DeltaState, KVCache, LinearState
from attnkit.layers.delta import MIXERS, GatedDeltaNet, mixers
from attnkit.layers.transformer import Block, BlockCache, LMCache, ShortConv, TinyLM, TinyLMConfig

__all__ = [
    "BACKENDS",
    "MIXERS",
    "Block",
    "BlockCache",
    "DeltaState",
    "GatedDeltaNet",
    "KVCache",
    "LMCache",
    "LinearState",
    "MultiHeadAttention",
    "ShortConv",
    "TinyLM",
    "TinyLMConfig",
    "backends",
    "mixers",
]

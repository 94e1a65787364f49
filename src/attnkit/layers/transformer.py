r"""A transformer block T(x) = f(A(x) + x) and a tiny language model with cached decoding.

:class:`Block` wraps :class:`~attnkit.layers.attention.MultiHeadAttention` (any backend,
MHA/GQA/MQA) with residual connections, LayerNorm and an MLP::

    post-norm (the doc's f = LayerNorm):  x = LN(x + A(x));   x = LN(x + MLP(x))
    pre-norm:                             x = x + A(LN(x));   x = x + MLP(LN(x))

with MLP(x) = W_2 GELU(W_1 x). An optional short causal depthwise convolution runs on
the attention input (the "short conv" of Zoology/Based, Arora et al. 2024), which gives
position-free backends such as linear attention a local, order-aware view.

:class:`TinyLM` stacks blocks between a token embedding (+ learned absolute positions)
and an output head tied to the embedding. ``generate`` prefills the prompt once through
per-layer caches, then decodes one token per step: a softmax layer reads its n cached
keys/values (O(n) per token), a linear-attention layer updates a constant-size state
(O(1) per token).

Shape legend::

    B batch, L new tokens (sequence length without a cache), d d_model, V vocab,
    K conv_kernel; tokens [B, L] (integer), hidden x [B, L, d], logits [B, L, V]
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._io import atomic_write
from attnkit._validation import check_choice, check_float, check_int, check_rank, check_tensor
from attnkit.layers.attention import BACKENDS, MultiHeadAttention
from attnkit.layers.cache import DeltaState, KVCache, LinearState
from attnkit.layers.delta import MIXER_OPTIONS, MIXERS, GatedDeltaNet

__all__ = [
    "NORMS",
    "POSITIONS",
    "Block",
    "BlockCache",
    "LMCache",
    "ShortConv",
    "TinyLM",
    "TinyLMConfig",
]

NORMS: tuple[str, ...] = ("post", "pre")
POSITIONS: tuple[str, ...] = ("learned", "none")
_CHECKPOINT_FORMAT = "attnkit.TinyLM/1"


def _check_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a float, got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


# --------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------


@dataclass
class BlockCache:
    """Decoding cache of one :class:`Block`.

    ``attn``: the attention layer's :class:`KVCache` (softmax / argmax / kernel),
    :class:`LinearState` (linear) or :class:`DeltaState` (gated_deltanet / deltanet,
    whose short convolution lives inside the layer). ``conv``: the last K - 1 inputs of
    the block's short convolution, [B, d, K - 1] (channels first, as Conv1d wants
    them), or None without one. Zeros at the start, which is the same as causal zero
    padding.
    """

    attn: KVCache | LinearState | DeltaState
    conv: Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held: the attention cache/state plus the convolution window."""
        conv = 0 if self.conv is None else self.conv.numel() * self.conv.element_size()
        return int(self.attn.nbytes) + conv

    def reset(self) -> None:
        """Forget every token (the convolution window goes back to zeros)."""
        self.attn.reset()
        if self.conv is not None:
            self.conv.zero_()


@dataclass
class LMCache:
    """Decoding cache of a :class:`TinyLM`: one :class:`BlockCache` per layer + the position.

    ``pos`` is the number of tokens already seen, i.e. the position of the next token;
    :meth:`TinyLM.forward` advances it. ``max_len`` is the longest sequence this cache
    may hold.
    """

    layers: list[BlockCache]
    batch: int
    max_len: int
    pos: int = 0

    @property
    def seq_len(self) -> int:
        """Tokens seen so far (the same as ``pos``)."""
        return self.pos

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' caches/states."""
        return sum(layer.nbytes for layer in self.layers)

    def reset(self) -> None:
        """Forget every token; the cache can be reused for a new sequence."""
        for layer in self.layers:
            layer.reset()
        self.pos = 0


# --------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------


class ShortConv(nn.Module):
    """Causal depthwise Conv1d over the sequence: y_t = b + sum_{i<K} w_i * x_{t-K+1+i}.

    One filter of width K per channel (groups = d), padded on the left only, so y_t
    sees x_{t-K+1..t} and never the future. With a state [B, d, K - 1] (the previous
    K - 1 inputs) the same output is produced one chunk at a time; a state in a wider
    dtype than x raises TypeError (never rounded down), a narrower one is upcast.

    Shapes: x [B, L, d], state [B, d, K - 1] -> y [B, L, d], new state [B, d, K - 1].
    """

    def __init__(self, d_model: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = check_int("conv_kernel", kernel_size, 1)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        xt = x.transpose(1, 2)  # [B, d, L]
        keep = self.kernel_size - 1
        if state is None:
            xt = F.pad(xt, (keep, 0))  # [B, d, K-1 + L], zeros on the left only
            new_state = None
        else:
            if torch.promote_types(state.dtype, xt.dtype) != xt.dtype:
                raise TypeError(
                    f"the conv state has dtype {state.dtype}, wider than the input's "
                    f"{xt.dtype}; it would be rounded down (build the cache with the "
                    "input's dtype)"
                )
            xt = torch.cat([state.to(xt.dtype), xt], dim=-1)  # [B, d, K-1 + L]
            new_state = xt[..., xt.shape[-1] - keep :].clone()  # [B, d, K-1]
        y = self.conv(xt).transpose(1, 2)  # [B, d, L] -> [B, L, d]
        return y, new_state


class Block(nn.Module):
    r"""Transformer block T(x) = f(A(x) + x) with causal attention of any backend.

    ``norm="post"`` (the original Transformer's form, f = LayerNorm)::

        x = LN(x + A(x));  x = LN(x + MLP(x))

    ``norm="pre"``: x = x + A(LN(x)); x = x + MLP(LN(x)) (no normalisation of the
    residual stream itself; :class:`TinyLM` adds a final LayerNorm).

    A(x) = MultiHeadAttention(ShortConv(x)) when ``conv_kernel`` is set, else the
    attention alone; it is causal. ``backend="gated_deltanet"`` or ``"deltanet"``
    makes A a :class:`~attnkit.layers.delta.GatedDeltaNet` instead (``n_heads`` value
    heads, ``n_kv_heads`` q/k heads each serving n_heads / n_kv_heads of them, as in
    Qwen3-Next); its short convolution (``conv_kernel``, on q, k, v) is its own and
    ``backend_options`` takes ``chunk_size``, ``output_gate``, ``norm_eps``.
    ``mlp=False`` drops the MLP sublayer (an attention-only block).
    MLP(x) = Linear(d_ff -> d)(GELU(Linear(d -> d_ff)(x))), d_ff = 4 d by default.
    ``dropout`` applies to the two sublayer outputs, the MLP's hidden layer and, for
    backends that support it (softmax), the attention weights.

    Shapes: x [B, L, d] -> [B, L, d]. With ``cache`` (from :meth:`new_cache`) the L
    tokens are appended to it and attend to everything cached before them.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        backend: str = "softmax",
        feature_map: Any = None,
        backend_options: Mapping[str, Any] | None = None,
        d_ff: int | None = None,
        mlp: bool = True,
        norm: str = "post",
        dropout: float = 0.0,
        conv_kernel: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model, 1)
        self.norm = check_choice("norm", norm, NORMS)
        dropout = _check_dropout(dropout)
        d_ff = 4 * d_model if d_ff is None else check_int("d_ff", d_ff, 1)
        self.conv: ShortConv | None = None
        self.attn: MultiHeadAttention | GatedDeltaNet
        if isinstance(backend, str) and backend in MIXERS:
            self.attn = _delta_mixer(
                backend, d_model, n_heads, n_kv_heads, feature_map, backend_options, conv_kernel
            )
        else:
            if isinstance(backend, str) and backend not in BACKENDS:
                known = ", ".join(map(repr, [*BACKENDS.names(), *MIXERS.names()]))
                raise ValueError(f"unknown backend {backend!r}; known: {known}")
            self.conv = None if conv_kernel is None else ShortConv(d_model, conv_kernel)
            self.attn = MultiHeadAttention(
                d_model,
                n_heads,
                n_kv_heads=n_kv_heads,
                backend=backend,
                feature_map=feature_map,
                # attention-weight dropout where the backend has it (softmax); the
                # sublayer-output dropout below applies to every backend
                dropout=dropout if BACKENDS.get(backend).dropout else 0.0,
                is_causal=True,
                backend_options=backend_options,
            )
        self.ln_attn = nn.LayerNorm(d_model)
        self.mlp: nn.Sequential | None = None
        self.ln_mlp: nn.LayerNorm | None = None
        if mlp:
            self.mlp = nn.Sequential(
                nn.Linear(d_model, d_ff),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(d_ff, d_model),
            )
            self.ln_mlp = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def new_cache(
        self,
        batch: int,
        *,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> BlockCache:
        """An empty cache for ``batch`` sequences (dtype/device default to the weights')."""
        check_int("batch", batch, 1)
        weight = self.ln_attn.weight
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else device
        attn = self.attn.new_cache(batch, max_len=max_len, dtype=dtype, device=device)
        conv = None
        if self.conv is not None:
            conv = torch.zeros(
                batch, self.d_model, self.conv.kernel_size - 1, dtype=dtype, device=device
            )
        return BlockCache(attn, conv)

    def _attend(self, x: Tensor, cache: BlockCache | None) -> Tensor:
        """A(x): optional short conv, then causal attention (appending to the cache)."""
        if self.conv is not None:
            x, state = self.conv(x, None if cache is None else cache.conv)
            if cache is not None:
                cache.conv = state
        out: Tensor = self.drop(self.attn(x, cache=None if cache is None else cache.attn))
        return out

    def forward(self, x: Tensor, cache: BlockCache | None = None) -> Tensor:
        x = check_tensor("x", x)
        check_rank("x", x, "B L d")
        check_float("x", x)
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be [B, L, d_model={self.d_model}], got shape {tuple(x.shape)}"
            )
        if cache is not None and not isinstance(cache, BlockCache):
            raise TypeError(
                f"cache must be a BlockCache from Block.new_cache(), got {type(cache).__name__}"
            )
        if self.norm == "pre":
            x = x + self._attend(self.ln_attn(x), cache)
            if self.mlp is not None and self.ln_mlp is not None:
                x = x + self.drop(self.mlp(self.ln_mlp(x)))
        else:
            x = self.ln_attn(x + self._attend(x, cache))
            if self.mlp is not None and self.ln_mlp is not None:
                x = self.ln_mlp(x + self.drop(self.mlp(x)))
        return x


def _delta_mixer(
    backend: str,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None,
    feature_map: Any,
    backend_options: Mapping[str, Any] | None,
    conv_kernel: int | None,
) -> GatedDeltaNet:
    """The GatedDeltaNet / DeltaNet a block uses for ``backend`` (options checked here)."""
    if feature_map is not None:
        raise ValueError(
            f"feature_map={feature_map!r} is only used by the 'linear' backend, got "
            f"backend={backend!r}"
        )
    given = dict(backend_options or {})
    unknown = sorted(set(given) - set(MIXER_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown backend_options {unknown} for backend {backend!r}; accepted: "
            f"{', '.join(map(repr, MIXER_OPTIONS))}"
        )
    mixer: GatedDeltaNet = MIXERS.get(backend)(
        d_model, n_heads, n_kv_heads, conv_kernel=conv_kernel, **given
    )
    return mixer


# --------------------------------------------------------------------------------------
# TinyLM
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyLMConfig:
    """Everything that determines a :class:`TinyLM`'s architecture (saved with its weights)."""

    vocab: int  # number of token ids; ids are 0 .. vocab - 1
    d_model: int  # width of the residual stream
    n_layers: int  # number of transformer blocks
    n_heads: int  # query heads per attention layer
    n_kv_heads: int | None = None  # key/value heads: None = n_heads (MHA), 1 = MQA, else GQA
    backend: str = (
        "softmax"  # "softmax", "argmax", "linear", "kernel", "gated_deltanet", "deltanet"
    )
    feature_map: str | None = None  # registered feature map name for "linear" (None: default)
    max_len: int = 512  # longest sequence (prompt + generated); rows of the position table
    backend_options: dict[str, Any] | None = None  # e.g. {"mode": "straight_through"}
    mlp: bool = True  # False: attention-only blocks
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    positions: str = "learned"  # "learned" absolute positions or "none" (NoPE)
    conv_kernel: int | None = None  # short causal depthwise conv before attention (None: off)
    norm: str = "post"  # "post": x = LN(x + A(x)); "pre": x = x + A(LN(x))
    d_ff: int | None = None  # MLP hidden width (None: 4 * d_model)
    dropout: float = 0.0  # dropout on embeddings, attention weights and sublayer outputs

    def __post_init__(self) -> None:
        for name, minimum in (("vocab", 1), ("d_model", 1), ("n_layers", 0), ("n_heads", 1)):
            check_int(name, getattr(self, name), minimum)
        check_int("max_len", self.max_len, 1)
        for name in ("n_kv_heads", "conv_kernel", "d_ff"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str, got {type(self.backend).__name__}")
        if self.feature_map is not None and not isinstance(self.feature_map, str):
            raise TypeError(
                "TinyLMConfig.feature_map must be a registered feature map name (a str) so "
                f"that the config can be saved, got {type(self.feature_map).__name__}"
            )
        if self.backend_options is not None:
            if not isinstance(self.backend_options, Mapping):
                raise TypeError(
                    f"backend_options must be a mapping, got {type(self.backend_options).__name__}"
                )
            # A private plain dict: saved as is, and later edits to the caller's mapping
            # cannot change a frozen config.
            object.__setattr__(self, "backend_options", dict(self.backend_options))
        for name in ("mlp", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        check_choice("positions", self.positions, POSITIONS)
        check_choice("norm", self.norm, NORMS)
        _check_dropout(self.dropout)


def _check_tokens(tokens: object, vocab: int) -> Tensor:
    tokens = check_tensor("tokens", tokens)
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must have an integer dtype (e.g. torch.long), got {tokens.dtype}")
    check_rank("tokens", tokens, "B L")
    if tokens.shape[1] == 0:
        raise ValueError(f"tokens must hold at least one token, got shape {tuple(tokens.shape)}")
    if tokens.numel() and not torch.compiler.is_compiling():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            bad = hi if hi >= vocab else lo
            raise ValueError(f"token ids must be in [0, vocab={vocab}), got id {bad}")
    return tokens


class TinyLM(nn.Module):
    r"""A small causal language model on :class:`Block` s, with cached ``generate``.

    token embedding (+ learned absolute position embedding) -> dropout -> n_layers
    :class:`Block` s (causal attention of any backend, MHA/GQA/MQA) -> LayerNorm ->
    output head (tied to the token embedding by default). All options live in a frozen
    :class:`TinyLMConfig` (``.config``); ``TinyLM.from_config(cfg)`` rebuilds the model.

    Shapes: tokens [B, L] (integer ids < vocab) -> logits [B, L, vocab]. With ``cache``
    (from :meth:`new_cache`) the L tokens continue the cached sequence: they take
    positions cache.pos .. cache.pos + L - 1 and attend to everything before them.
    The total length may never exceed ``max_len``.

    Weights are initialised N(0, 0.02) for linear and embedding layers (as GPT-2) with
    zero biases.
    """

    def __init__(
        self,
        vocab: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        backend: str = "softmax",
        feature_map: str | None = None,
        max_len: int = 512,
        *,
        backend_options: Mapping[str, Any] | None = None,
        mlp: bool = True,
        tie_embeddings: bool = True,
        positions: str = "learned",
        conv_kernel: int | None = None,
        norm: str = "post",
        d_ff: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cfg = TinyLMConfig(
            vocab=vocab,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            backend=backend,
            feature_map=feature_map,
            max_len=max_len,
            backend_options=None if backend_options is None else dict(backend_options),
            mlp=mlp,
            tie_embeddings=tie_embeddings,
            positions=positions,
            conv_kernel=conv_kernel,
            norm=norm,
            d_ff=d_ff,
            dropout=dropout,
        )
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.max_len, cfg.d_model) if cfg.positions == "learned" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(
                cfg.d_model,
                cfg.n_heads,
                cfg.n_kv_heads,
                backend=cfg.backend,
                feature_map=cfg.feature_map,
                backend_options=cfg.backend_options,
                d_ff=cfg.d_ff,
                mlp=cfg.mlp,
                norm=cfg.norm,
                dropout=cfg.dropout,
                conv_kernel=cfg.conv_kernel,
            )
            for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, config: TinyLMConfig) -> TinyLM:
        """Build a freshly initialised model from ``config``."""
        if not isinstance(config, TinyLMConfig):
            raise TypeError(f"config must be a TinyLMConfig, got {type(config).__name__}")
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)})

    # ---- forward and caches --------------------------------------------------------------

    def new_cache(
        self,
        batch: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LMCache:
        """An empty :class:`LMCache` for ``batch`` sequences of up to ``max_len`` tokens.

        ``max_len`` defaults to the model's; a softmax layer's KV cache may preallocate
        for it. dtype/device default to the weights'.
        """
        check_int("batch", batch, 1)
        limit = self.config.max_len
        max_len = limit if max_len is None else check_int("max_len", max_len, 1)
        if max_len > limit:
            raise ValueError(f"new_cache(max_len={max_len}) exceeds the model's max_len={limit}")
        layers = [
            blk.new_cache(batch, max_len=max_len, dtype=dtype, device=device)
            for blk in self.blocks
            if isinstance(blk, Block)
        ]
        return LMCache(layers=layers, batch=batch, max_len=max_len)

    def forward(self, tokens: Tensor, cache: LMCache | None = None) -> Tensor:
        logits: Tensor = self.head(self.ln_f(self._hidden(tokens, cache)))  # [B, L, V]
        return logits

    def _hidden(self, tokens: Tensor, cache: LMCache | None) -> Tensor:
        """The residual stream after the last block, [B, L, d] (advances ``cache``)."""
        cfg = self.config
        tokens = _check_tokens(tokens, cfg.vocab)
        B, L = tokens.shape
        start = 0
        if cache is not None:
            if not isinstance(cache, LMCache):
                raise TypeError(
                    f"cache must be an LMCache from TinyLM.new_cache(), got {type(cache).__name__}"
                )
            if cache.batch != B:
                raise ValueError(f"cache was made for batch {cache.batch}, tokens have B={B}")
            if len(cache.layers) != cfg.n_layers:
                raise ValueError(
                    f"cache has {len(cache.layers)} layers, the model has {cfg.n_layers}"
                )
            start = cache.pos
        end = start + L
        limit = cfg.max_len if cache is None else min(cfg.max_len, cache.max_len)
        if end > limit:
            raise ValueError(
                f"sequence length {end} (= {start} cached + {L} new tokens) exceeds max_len={limit}"
            )

        x: Tensor = self.tok_emb(tokens.long())  # [B, L, d]
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, end, device=tokens.device))  # + [L, d]
        x = self.drop(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache.layers[i])  # [B, L, d]
        if cache is not None:
            cache.pos = end
        return x

    def _next_logits(self, tokens: Tensor, cache: LMCache | None) -> Tensor:
        """float32 logits [B, V] of the last position, whatever the model's dtype.

        The final LayerNorm and the head run in float32 on that one position, so a
        bf16 model does not round its logits to 8 significant bits (0.5 apart near
        100) before the sampler compares them.
        """
        h = self._hidden(tokens, cache)[:, -1].float()  # [B, d]
        ln = self.ln_f
        w = None if ln.weight is None else ln.weight.float()
        b = None if ln.bias is None else ln.bias.float()
        h = F.layer_norm(h, ln.normalized_shape, w, b, ln.eps)
        logits: Tensor = F.linear(h, self.head.weight.float())  # [B, V]
        return logits

    # ---- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        r"""Continue ``prompt`` [B, L0] by ``max_new_tokens`` tokens -> [B, L0 + max_new_tokens].

        The prompt is prefilled once through per-layer caches; each new token then
        costs one single-token forward that reads the cache (softmax/argmax/kernel:
        O(n) for n tokens so far) or updates a constant-size state (linear: O(1)).
        ``use_cache=False`` re-runs the whole sequence each step instead (the
        O(n^2)-per-token baseline, for testing and benchmarks).

        ``temperature`` 0 is greedy (argmax); otherwise tokens are sampled from
        softmax(logits / temperature) restricted to the ``top_k`` most likely ids (all
        when None), drawing from ``generator``. The model is put in eval mode for the
        call (no dropout) and restored afterwards. The next-token logits are formed in
        float32 (final LayerNorm and head upcast for the last position), so a bf16 or
        fp16 model samples from the same logits an fp32 head would give its hidden
        state.
        """
        cfg = self.config
        prompt = _check_tokens(prompt, cfg.vocab)
        check_int("max_new_tokens", max_new_tokens, 0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if top_k is not None:
            check_int("top_k", top_k, 1)
        B, L0 = prompt.shape
        total = L0 + max_new_tokens
        if total > cfg.max_len:
            raise ValueError(
                f"cannot generate past max_len={cfg.max_len}: prompt length {L0} + "
                f"max_new_tokens {max_new_tokens} = {total}"
            )
        out = prompt.long()
        if max_new_tokens == 0:
            return out.clone()

        was_training = self.training
        self.eval()
        try:
            cache = self.new_cache(B, max_len=total) if use_cache else None
            logits = self._next_logits(out, cache)  # prefill: [B, V] float32
            for step in range(max_new_tokens):
                nxt = _sample(logits, temperature, top_k, generator)  # [B, 1]
                out = torch.cat([out, nxt], dim=1)
                if step + 1 == max_new_tokens:
                    break
                logits = (
                    self._next_logits(nxt, cache)
                    if cache is not None
                    else self._next_logits(out, None)
                )
        finally:
            self.train(was_training)
        return out

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write {"config", "state_dict"} to ``path`` atomically.

        The checkpoint goes to a temporary file in the same directory, is flushed to
        disk, and then ``os.replace``-d onto ``path``: a failure at any point leaves
        ``path`` as it was (absent, or the previous checkpoint), never half-written.
        The config must hold plain values only (ValueError otherwise, e.g. for a callable
        ``backend_options["sim"]``), since :meth:`load` reads with ``weights_only=True``.
        """
        target = os.path.abspath(os.fspath(path))
        config = asdict(self.config)
        _check_plain("config", config)
        payload = {
            "format": _CHECKPOINT_FORMAT,
            "config": config,
            "state_dict": self.state_dict(),
        }
        atomic_write(target, lambda f: torch.save(payload, f))

    @staticmethod
    def _read_checkpoint(
        path: str | os.PathLike[str], map_location: torch.device | str | None
    ) -> tuple[TinyLMConfig, dict[str, Tensor]]:
        ckpt = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
        if (
            not isinstance(ckpt, dict)
            or ckpt.get("format") != _CHECKPOINT_FORMAT
            or not isinstance(ckpt.get("config"), dict)
            or not isinstance(ckpt.get("state_dict"), dict)
        ):
            raise ValueError(
                f"{os.fspath(path)} is not a TinyLM checkpoint (expected a dict with format "
                f"{_CHECKPOINT_FORMAT!r}, 'config' and 'state_dict')"
            )
        known = {f.name for f in fields(TinyLMConfig)}
        unknown = sorted(set(ckpt["config"]) - known)
        if unknown:
            raise ValueError(f"{os.fspath(path)}: unknown config fields {unknown}")
        return TinyLMConfig(**ckpt["config"]), ckpt["state_dict"]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_config: TinyLMConfig | None = None,
        map_location: torch.device | str | None = "cpu",
    ) -> TinyLM:
        """Rebuild a model saved by :meth:`save` (``torch.load(weights_only=True)``).

        The model gets the checkpoint's floating dtype and lives on ``map_location``.

        With ``expected_config`` the saved architecture must match it (``dropout``
        aside), else ValueError lists every mismatching field.
        """
        cfg, state = cls._read_checkpoint(path, map_location)
        if expected_config is not None:
            _raise_mismatch(path, cfg, expected_config)
        model = cls.from_config(cfg)
        # Keep the saved precision: a float64 checkpoint loads as a float64 model.
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            model.to(dtypes.pop())
        model.load_state_dict(state)
        return model

    def load_state_from(
        self, path: str | os.PathLike[str], *, map_location: torch.device | str | None = "cpu"
    ) -> None:
        """Load the weights saved at ``path`` into this model (same architecture required).

        Raises ValueError naming every config field (``dropout`` aside) in which the
        checkpoint differs from this model, before touching any weight.
        """
        cfg, state = self._read_checkpoint(path, map_location)
        _raise_mismatch(path, cfg, self.config)
        self.load_state_dict(state)


def _check_plain(where: str, value: object) -> None:
    """Raise ValueError unless ``value`` is made of types torch.load(weights_only=True) reads."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(f"{where}[{i}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"cannot save {where}: key {key!r} is not a str")
            _check_plain(f"{where}[{key!r}]", item)
        return
    raise ValueError(
        f"cannot save {where} = {value!r} ({type(value).__name__}): a checkpoint config may "
        "hold only str, int, float, bool, None, lists and dicts (e.g. pass a registered "
        "similarity name, not a callable)"
    )


def _raise_mismatch(
    path: str | os.PathLike[str], saved: TinyLMConfig, wanted: TinyLMConfig
) -> None:
    diffs = [
        f"{f.name}: checkpoint {getattr(saved, f.name)!r}, model {getattr(wanted, f.name)!r}"
        for f in fields(saved)
        if f.name != "dropout" and getattr(saved, f.name) != getattr(wanted, f.name)
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {os.fspath(path)} does not match the model's configuration: "
            + "; ".join(diffs)
        )


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Next token ids [B, 1] from logits [B, V]: greedy at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator)

r"""Turn a softmax transformer from Hugging Face transformers into a linear-attention one.

:func:`linearize` swaps every attention module of a causal Llama-family model for a
:class:`LinearizedAttention` that reuses the module's own q/k/v/o projections (and
Qwen3's q/k norms, RoPE, grouped-query heads) and replaces
``softmax(q k^T / sqrt(D)) v`` by causal linear attention with a feature map per layer
and head (Katharopoulos et al. 2020)::

    o_i = phi_q(q_i) S_i / phi_q(q_i) . z_i,   S_i = sum_{j<=i} gamma^{i-j} phi_k(k_j)^T v_j,
                                               z_i = sum_{j<=i} gamma^{i-j} phi_k(k_j)

(gamma = 1 unless a decay gate is asked for). The maps start as Hedgehog's
softmax-of-[Wx, -Wx] (Zhang et al. 2024), T2R's relu(Wx + b) (Kasai et al. 2021) or a
fixed attnkit map, and :func:`attnkit.hf.distill` trains them to mimic the softmax
attention they replace (attention transfer, LoLCATs, Zhang et al. 2025).

Why a module swap, not an attention function: HF's attention modules call
``cache.update(k, v)`` *before* the attention function, so a linear attention plugged in
through ``AttentionInterface`` alone still grows a KV cache. A converted module instead
keeps its recurrent state (S [B, Hk, D', Ev], z [B, Hk, D'] in fp32) in a
:class:`LinearStateLayer` that it puts into the cache's slot for its layer (any ``Cache``
with a ``layers`` list: the ``DynamicCache`` that ``generate()`` or ``use_cache=True``
makes). Decoding memory is therefore constant in the context length; greedy decoding,
sampling and beam search (``reorder_cache``) work; cropping (assisted decoding) cannot,
a recurrent state cannot forget tokens.

Padding: the model is switched to the attention implementation :data:`ATTN_IMPLEMENTATION`
whose mask function hands each layer the 2D padding mask of its new tokens
([B, L] bool, True = real token). Padded keys get phi(k) = 0, so they never enter the
state; left-padded batches decode exactly like each sequence alone (given the same
``position_ids``, which ``generate()`` derives from the mask).

Supported architectures (``config.model_type``): :data:`SUPPORTED` (Llama, Mistral, Qwen2,
Qwen3 and GPT-2, whose fused ``c_attn`` and absolute positions need no RoPE). Every
attention layer is converted; a sliding window of the original (Mistral, Qwen2) is
honoured by the softmax teacher during distillation, while the converted layer attends
to its whole prefix through its state.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from attnkit.hf import maps as _maps
from attnkit.hf.recurrence import decayed_chunked, decayed_step
from attnkit.ops import linear_attention, linear_attention_step, sdpa

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SPEC_KEY",
    "SUPPORTED",
    "LinearStateLayer",
    "LinearizeSpec",
    "LinearizedAttention",
    "attention_mode",
    "cache_kwargs",
    "is_linearized",
    "linearize",
    "linearized_modules",
    "load_linearized",
    "save_linearized",
    "state_bytes",
]

#: ``config.model_type`` -> the attention class :func:`linearize` converts.
SUPPORTED: dict[str, str] = {
    "gpt2": "GPT2Attention",
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention",
    "qwen3": "Qwen3Attention",
}
#: The attention implementation a converted model runs under (its mask function gives
#: each layer the 2D padding mask of its new tokens).
ATTN_IMPLEMENTATION = "attnkit_linearized"
#: Key of the conversion spec in ``model.config`` (saved to config.json).
SPEC_KEY = "attnkit_linearize"
_FORMAT = "attnkit.hf.linearize/1"

Mode = Literal["linear", "softmax", "transfer"]
_MODES: tuple[str, ...] = ("linear", "softmax", "transfer")


@dataclass(frozen=True)
class LinearizeSpec:
    """What :func:`linearize` did, saved in ``config.attnkit_linearize`` to rebuild it."""

    feature_map: str = "hedgehog"  # per-head map: hedgehog, t2r, or a fixed attnkit map
    feature_dim: int | None = None  # F of the learnable maps (None: the head width)
    decay: bool = False  # a trainable decay gate gamma per key/value head
    eps: float = 1e-6  # denominator guard max(phi(q).z, eps)
    chunk_size: int = 64  # chunk length of the decayed parallel form
    seed: int = 0  # random parts of the maps

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearizeSpec:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not an attnkit linearize spec (format {_FORMAT!r}): {d!r}")
        return cls(**{k: v for k, v in d.items() if k != "format"})


# --------------------------------------------------------------------------------------
# The recurrent state, kept where the model's cache keeps a layer's keys and values
# --------------------------------------------------------------------------------------


class LinearStateLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """A cache layer holding a recurrent state instead of keys and values.

    ``state`` = (S [B, Hk, D', Ev], z [B, Hk, D']) in fp32 and ``tokens`` = positions
    seen (padding included, as a KV cache counts them, so ``get_seq_length`` and the
    positions HF derives from it stay right). Its size never depends on ``tokens``.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.state: tuple[Tensor, Tensor] | None = None
        self.tokens = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "a linearized attention layer keeps a recurrent state, not keys and values: "
            "cache.update(k, v) was called on it (by a module that was not converted?)"
        )

    def store(self, state: tuple[Tensor, Tensor], new_tokens: int) -> None:
        """Replace the state by ``state`` after ``new_tokens`` more positions."""
        self.state = state
        self.tokens += new_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # What a KV cache would report: the mask covers past + new positions.
        return self.tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None
        self.tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent linear-attention state cannot drop tokens (crop): assisted/speculative "
            "decoding is not supported by linearized models"
        )

    def _map(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.state is not None:
            self.state = (fn(self.state[0]), fn(self.state[1]))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        return None


def _state_layer(cache: Any, layer_idx: int) -> LinearStateLayer:
    """The :class:`LinearStateLayer` in ``cache``'s slot ``layer_idx`` (put there if needed)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, Cache) or not isinstance(layers, list):
        raise TypeError(
            "a linearized model needs a transformers Cache with a `layers` list (e.g. "
            f"DynamicCache) or None, got {type(cache).__name__}"
        )
    while len(layers) <= layer_idx:
        layers.append(LinearStateLayer())
    layer = layers[layer_idx]
    if not isinstance(layer, LinearStateLayer):
        if layer.get_seq_length() > 0:
            raise ValueError(
                f"cache layer {layer_idx} already holds {layer.get_seq_length()} tokens of keys "
                "and values (from the softmax model?); start a linearized model from an empty "
                "cache"
            )
        layer = LinearStateLayer()
        layers[layer_idx] = layer
    return layer


def state_bytes(cache: Any) -> int:
    """Bytes of storage a cache holds: recurrent states and any keys/values.

    Measured, not computed from shapes: the size of every distinct storage behind the
    cache's tensors (``untyped_storage().nbytes()``), so over-allocated or shared buffers
    count as what they really hold (for memory checks).
    """
    storages: dict[int, int] = {}
    for layer in getattr(cache, "layers", []):
        tensors: list[Any] = []
        if isinstance(layer, LinearStateLayer):
            tensors = list(layer.state) if layer.state is not None else []
        else:
            tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        for t in tensors:
            if isinstance(t, Tensor):
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)``: the keyword its forward takes a cache by.

    transformers renamed ``past_key_values`` to ``cache`` in 5.24; a cache passed under the
    other name would reach the attention layers through ``**kwargs`` while the model counts
    positions from an empty cache of its own (wrong RoPE positions, silently). Usage:
    ``model(ids, use_cache=True, **cache_kwargs(model, cache))``.
    """
    params = inspect.signature(type(model).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return {name: cache}
    raise TypeError(
        f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`; "
        f"its parameters are {list(params)}"
    )


# --------------------------------------------------------------------------------------
# Mask function and attention implementation registered with transformers
# --------------------------------------------------------------------------------------


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """The 2D padding mask of the new tokens, [B, q_length] bool (None: no padding).

    Causality is the converted layers' own business (a prefix sum); they only need to
    know which of their new keys are padding.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < q_length:
        raise ValueError(
            f"a linearized model takes a 2D attention_mask [B, past + L] covering the {q_length} "
            f"new tokens, got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, -q_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


def _not_converted(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    raise TypeError(
        f"{type(module).__name__} ran under attn_implementation={ATTN_IMPLEMENTATION!r}, which "
        "only linearized attention modules can use; convert the model with attnkit.hf.linearize"
    )


def _register() -> None:
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)
    AttentionInterface.register(ATTN_IMPLEMENTATION, _not_converted)


# --------------------------------------------------------------------------------------
# The converted attention module
# --------------------------------------------------------------------------------------


def _check_mask(mask: object, B: int, L: int) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or tuple(mask.shape) != (B, L):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"a linearized attention layer takes the 2D padding mask of its tokens [B, L] = "
            f"[{B}, {L}] (True = real token), got {got}; pass a 2D attention_mask to the model"
        )
    return mask.to(torch.bool)


class LinearizedAttention(nn.Module):
    r"""Causal linear attention in place of one softmax attention module of an HF model.

    Keeps the original module's ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (and
    ``q_norm``, ``k_norm``; GPT-2's ``c_attn``, ``c_proj``) under their names, so the
    state-dict keys of the model do not change; adds ``feature_map_q`` (one set of weights
    per query head), ``feature_map_k`` (per key/value head) and, with a decay gate,
    ``decay_logit`` [Hk] (gamma = sigmoid(decay_logit)).

    Modes (:func:`attention_mode`): ``"linear"`` (default; the converted model),
    ``"softmax"`` (the original softmax attention through the same projections: the
    teacher), ``"transfer"`` (returns the softmax output, so the next layers see the
    teacher's activations, and stores the attention-transfer loss of this layer's linear
    attention against it in ``transfer_loss``).

    Shapes: hidden_states [B, L, d_model] -> [B, L, d_model]; inside, q [B, H, L, D],
    k [B, Hk, L, D], v [B, Hk, L, Dv], phi_q(q) [B, H, L, D'], phi_k(k) [B, Hk, L, D'].
    """

    def __init__(self, module: nn.Module, spec: LinearizeSpec, layer_idx: int) -> None:
        super().__init__()
        original: Any = module  # an HF attention module (LlamaAttention, GPT2Attention, ...)
        config = original.config
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = int(original.head_dim)
        self.scaling = float(original.scaling)  # GPT-2's includes its 1 / (layer + 1) option
        self.q_norm: nn.Module | None = getattr(original, "q_norm", None)
        self.k_norm: nn.Module | None = getattr(original, "k_norm", None)
        self._rope: Callable[..., tuple[Tensor, Tensor]] | None = None
        if hasattr(original, "c_attn"):
            # GPT-2: one fused Conv1D for q, k, v, learned absolute positions (no RoPE).
            self.c_attn: nn.Module = original.c_attn
            self.c_proj: nn.Module = original.c_proj
            self.resid_dropout: nn.Module = original.resid_dropout
            self.num_heads = self.num_kv_heads = int(original.num_heads)
            self.sliding_window: int | None = None
        else:
            self.q_proj: nn.Module = original.q_proj
            self.k_proj: nn.Module = original.k_proj
            self.v_proj: nn.Module = original.v_proj
            self.o_proj: nn.Module = original.o_proj
            self.num_heads = int(config.num_attention_heads)
            self.num_kv_heads = int(config.num_key_value_heads)
            window = getattr(original, "sliding_window", None)
            if window is None and type(original).__name__ == "MistralAttention":
                window = getattr(config, "sliding_window", None)
            self.sliding_window = int(window) if window is not None else None
            # The original module's RoPE function (same module namespace as its class).
            self._rope = sys.modules[type(original).__module__].apply_rotary_pos_emb
        self.spec = spec
        seed = spec.seed + 1000 * layer_idx
        self.feature_map_q = _maps.build(
            spec.feature_map, self.num_heads, self.head_dim, feature_dim=spec.feature_dim, seed=seed
        )
        self.feature_map_k = _maps.build(
            spec.feature_map,
            self.num_kv_heads,
            self.head_dim,
            feature_dim=spec.feature_dim,
            seed=seed,
        )
        self.decay_logit: nn.Parameter | None = None
        if spec.decay:
            # RetNet's spread of gammas, 1 - 2^-5 .. 1 - 2^-12 across heads (Sun et al. 2023).
            exps = torch.linspace(5.0, 12.0, self.num_kv_heads)
            gamma = 1.0 - torch.pow(2.0, -exps)
            self.decay_logit = nn.Parameter(torch.log(gamma) - torch.log1p(-gamma))
        self.mode: Mode = "linear"
        self.transfer_loss_kind = "mse"
        self.transfer_loss: Tensor | None = None
        ref = (original.c_attn if hasattr(original, "c_attn") else original.q_proj).weight
        self.feature_map_q.to(device=ref.device, dtype=ref.dtype)
        self.feature_map_k.to(device=ref.device, dtype=ref.dtype)
        if self.decay_logit is not None:
            self.decay_logit.data = self.decay_logit.data.to(ref.device)

    # ---- pieces ---------------------------------------------------------------------

    def log_decay(self) -> Tensor | None:
        """log gamma per key/value head [Hk] (None without a decay gate)."""
        return None if self.decay_logit is None else F.logsigmoid(self.decay_logit.float())

    def project(
        self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, L, D], k [B, Hk, L, D], v [B, Hk, L, Dv] exactly as the original module."""
        B, L, _ = hidden_states.shape
        shape = (B, L, -1, self.head_dim)
        if self._rope is None:  # GPT-2
            width = self.num_heads * self.head_dim
            qf, kf, vf = self.c_attn(hidden_states).split(width, dim=2)
            return (
                qf.view(shape).transpose(1, 2),
                kf.view(shape).transpose(1, 2),
                vf.view(shape).transpose(1, 2),
            )
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if position_embeddings is None:  # Llama-family layers always pass (cos, sin)
            raise ValueError(
                "position_embeddings (cos, sin) is required: the model's decoder layers pass it"
            )
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        return q, k, v

    def features(self, q: Tensor, k: Tensor, pad: Tensor | None) -> tuple[Tensor, Tensor]:
        """phi_q(q) [B, H, L, D'] and phi_k(k) [B, Hk, L, D'], padded keys zeroed."""
        fq = self.feature_map_q(q)
        fk = self.feature_map_k(k)
        if pad is not None:
            fk = fk * pad[:, None, :, None].to(fk.dtype)
        return fq, fk

    def linear(
        self,
        fq: Tensor,
        fk: Tensor,
        v: Tensor,
        state: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Causal (decayed) linear attention from ``state``: o [B, H, L, Dv], new state."""
        eps = self.spec.eps
        lg = self.log_decay()
        L = fq.shape[2]
        if lg is not None:
            if L == 1:
                return decayed_step(fq, fk, v, lg, state, eps)
            return decayed_chunked(fq, fk, v, lg, state, eps, self.spec.chunk_size)
        if L == 1:
            o, st = linear_attention_step(
                fq, fk, v, state, feature_map="identity", eps=eps, enable_gqa=True
            )
            return o, (st.S, st.z)
        o, fin = linear_attention(
            fq,
            fk,
            v,
            feature_map="identity",
            is_causal=True,
            eps=eps,
            initial_state=state,
            output_final_state=True,
            enable_gqa=True,
        )
        assert fin is not None  # output_final_state=True
        return o, (fin.S, fin.z)

    def softmax(self, q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None) -> Tensor:
        """The original causal softmax attention (with its sliding window), o [B, H, L, Dv]."""
        L = q.shape[2]
        mask = self._softmax_mask(L, pad, q.device)
        if mask is None:
            return sdpa(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
        return sdpa(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)

    def _softmax_mask(self, L: int, pad: Tensor | None, device: torch.device) -> Tensor | None:
        if pad is None and (self.sliding_window is None or L <= self.sliding_window):
            return None
        i = torch.arange(L, device=device)
        allowed = i[None, :] <= i[:, None]  # [L, L] causal
        if self.sliding_window is not None:
            allowed = allowed & (i[:, None] - i[None, :] < self.sliding_window)
        mask = allowed[None, None]  # [1, 1, L, L]
        if pad is not None:
            # A padded query row would see nothing (NaN); let it see itself: its output
            # is never used (and never enters a loss).
            mask = (mask & pad[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
        return mask

    def linear_weights(self, fq: Tensor, fk: Tensor) -> Tensor:
        """The linear attention's implicit weights [B, H, L, L] (rows sum to 1; for losses)."""
        G = self.num_heads // self.num_kv_heads
        fkx = fk.repeat_interleave(G, dim=1).float()
        scores = torch.einsum("bhif,bhjf->bhij", fq.float(), fkx)
        L = fq.shape[2]
        i = torch.arange(L, device=fq.device)
        lag = (i[:, None] - i[None, :]).float()
        lg = self.log_decay()
        if lg is None:
            decay = (lag >= 0).float()[None, None]
        else:
            lgx = lg.repeat_interleave(G)
            decay = torch.where(lag >= 0, torch.exp(lgx[:, None, None] * lag.clamp_min(0)), 0.0)
            decay = decay[None]
        scores = scores * decay
        return scores / scores.sum(-1, keepdim=True).clamp_min(self.spec.eps)

    def _transfer_loss(
        self, q: Tensor, k: Tensor, v: Tensor, pad: Tensor | None, teacher: Tensor
    ) -> Tensor:
        fq, fk = self.features(q, k, pad)
        real = (
            pad.float()
            if pad is not None
            else torch.ones(q.shape[0], q.shape[2], device=q.device, dtype=torch.float32)
        )  # [B, L]
        if self.transfer_loss_kind == "xent":
            # Hedgehog: cross-entropy of the linear weights against the softmax weights.
            a_lin = self.linear_weights(fq, fk)  # [B, H, L, L]
            mask = self._softmax_mask(q.shape[2], pad, q.device)
            if mask is None:
                Lq = q.shape[2]
                mask = torch.ones(Lq, Lq, dtype=torch.bool, device=q.device).tril()[None, None]
            G = self.num_heads // self.num_kv_heads
            scores = torch.einsum(
                "bhid,bhjd->bhij", q.float(), k.repeat_interleave(G, dim=1).float()
            )
            a_sm = torch.softmax(scores.mul(self.scaling).masked_fill(~mask, -math.inf), dim=-1)
            # Reported minus the softmax rows' own entropy, i.e. KL(a_sm || a_lin): the same
            # gradient as the cross-entropy, and 0 for a perfect mimic.
            log_ratio = torch.log(a_sm.clamp_min(1e-30)) - torch.log(a_lin.clamp_min(1e-30))
            kl = (a_sm * log_ratio).sum(-1)  # [B, H, L]
            return (kl * real[:, None]).sum() / (real.sum() * self.num_heads)
        # LoLCATs: MSE of the layer outputs (after o_proj) against the softmax layer's.
        o, _ = self.linear(fq, fk, v, None)
        y = self._out(o).float()
        err = (y - teacher.float()).pow(2).mean(-1)  # [B, L]
        return (err * real).sum() / real.sum()

    def _out(self, o: Tensor) -> Tensor:
        B, _, L, _ = o.shape
        flat = o.transpose(1, 2).reshape(B, L, -1)
        if self._rope is None:  # GPT-2
            gpt2: Tensor = self.resid_dropout(self.c_proj(flat))
            return gpt2
        out: Tensor = self.o_proj(flat)
        return out

    # ---- forward ----------------------------------------------------------------------

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """[B, L, d_model] -> ([B, L, d_model], None); keeps its state in ``cache``."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        B, L, _ = hidden_states.shape
        pad = _check_mask(attention_mask, B, L)
        q, k, v = self.project(hidden_states, position_embeddings)
        if self.mode != "linear":
            if cache is not None:
                raise ValueError(
                    f"attention mode {self.mode!r} (the softmax teacher) runs without a cache; "
                    "pass use_cache=False"
                )
            o_sm = self._out(self.softmax(q, k, v, pad))
            if self.mode == "transfer":
                self.transfer_loss = self._transfer_loss(q, k, v, pad, o_sm.detach())
            return o_sm, None
        fq, fk = self.features(q, k, pad)
        if cache is None:
            o, _ = self.linear(fq, fk, v, None)
            return self._out(o), None
        layer = _state_layer(cache, self.layer_idx)
        o, state = self.linear(fq, fk, v, layer.state)
        layer.store(state, L)
        return self._out(o), None

    def extra_repr(self) -> str:
        return (
            f"layer_idx={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, feature_map={self.spec.feature_map!r}, "
            f"decay={self.spec.decay}"
        )


# --------------------------------------------------------------------------------------
# Conversion, modes, save and load
# --------------------------------------------------------------------------------------


def _check_supported(model: object) -> str:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            "linearize takes a transformers PreTrainedModel (a causal LM), got "
            f"{type(model).__name__}"
        )
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"cannot linearize model_type={model_type!r} ({type(model).__name__}); supported: "
            + ", ".join(f"{t} ({c})" for t, c in SUPPORTED.items())
        )
    return str(model_type)


def is_linearized(model: nn.Module) -> bool:
    """True when ``model`` holds :class:`LinearizedAttention` modules."""
    return any(isinstance(m, LinearizedAttention) for m in model.modules())


def linearized_modules(model: nn.Module) -> list[LinearizedAttention]:
    """The converted attention modules of ``model``, in layer order."""
    mods = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
    return sorted(mods, key=lambda m: m.layer_idx)


def linearize(
    model: PreTrainedModel,
    feature_map: str = "hedgehog",
    *,
    feature_dim: int | None = None,
    decay: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    seed: int = 0,
) -> PreTrainedModel:
    r"""Replace every softmax attention of ``model`` by causal linear attention, in place.

    Args:
        model: a causal LM of a supported architecture (:data:`SUPPORTED`: Llama, Mistral,
            Qwen2, Qwen3, GPT-2), e.g. ``LlamaForCausalLM``. Its weights are reused, not
            copied.
        feature_map: ``"hedgehog"`` (trainable, Zhang et al. 2024), ``"t2r"`` (trainable,
            Kasai et al. 2021), or a fixed map of :mod:`attnkit.feature_maps` (``"elu"``,
            ``"taylor"``, ``"favor"``, ...), one instance per layer; learnable maps carry
            weights per head (queries: per query head; keys: per key/value head).
        feature_dim: F of the learnable maps (default: the head width D; Hedgehog's
            features are 2F wide) or FAVOR+'s number of random features.
        decay: add a trainable decay gate gamma per key/value head (RetNet-style init).
        eps: the denominator guard, max(phi(q) . z, eps) (T2R's relu features can give 0).
        chunk_size: chunk length of the decayed parallel form.
        seed: seeds the random parts of the maps (layer l uses seed + 1000 l).

    Returns ``model`` (converted in place; ``model.config.attnkit_linearize`` records the
    spec, ``model.config._attn_implementation`` is :data:`ATTN_IMPLEMENTATION`). New
    parameters are put on the device and dtype of each layer's q_proj. Raises
    ValueError for an unsupported architecture (listing the supported ones) or a model
    that is already converted.

    Per layer and token, decoding then costs O(H D' Dv) time and holds
    Hk D' (Dv + 1) fp32 numbers, whatever the context length.
    """
    model_type = _check_supported(model)
    if is_linearized(model):
        raise ValueError("model is already linearized")
    spec = LinearizeSpec(feature_map, feature_dim, decay, float(eps), int(chunk_size), int(seed))
    if not (math.isfinite(spec.eps) and spec.eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    if spec.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if feature_map not in _maps.available():
        raise ValueError(
            f"unknown feature_map {feature_map!r}; known: {', '.join(_maps.available())}"
        )
    target = SUPPORTED[model_type]
    found: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__ == target:
                if getattr(child, "is_cross_attention", False):
                    raise ValueError(
                        f"{type(model).__name__} has cross-attention ({name}); only decoder-only "
                        "models can be linearized"
                    )
                found.append((parent, name, child))
    if not found:
        raise ValueError(f"no {target} module found in {type(model).__name__}")
    for parent, name, child in found:
        idx: Any = child.layer_idx
        setattr(parent, name, LinearizedAttention(child, spec, int(idx)))
    _register()
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    setattr(model.config, SPEC_KEY, spec.to_dict())
    return model


@contextlib.contextmanager
def attention_mode(
    model: nn.Module, mode: str, loss: str = "mse"
) -> Iterator[list[LinearizedAttention]]:
    """Run the converted layers as ``"linear"``, ``"softmax"`` (teacher) or ``"transfer"``.

    In ``"transfer"`` mode each layer stores its attention-transfer loss (``loss``:
    ``"mse"`` of the layer outputs, LoLCATs; ``"xent"`` of the attention weights,
    Hedgehog) in ``transfer_loss``. Yields the modules; restores the previous modes.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if loss not in ("mse", "xent"):
        raise ValueError(f"loss must be 'mse' or 'xent', got {loss!r}")
    mods = linearized_modules(model)
    if not mods:
        raise ValueError("model has no linearized attention: call attnkit.hf.linearize first")
    before = [(m.mode, m.transfer_loss_kind) for m in mods]
    try:
        for m in mods:
            m.mode = mode  # type: ignore[assignment]
            m.transfer_loss_kind = loss
            m.transfer_loss = None
        yield mods
    finally:
        for m, (md, kind) in zip(mods, before, strict=True):
            m.mode, m.transfer_loss_kind = md, kind
            m.transfer_loss = None


def save_linearized(model: PreTrainedModel, path: str | Path) -> Path:
    """``model.save_pretrained(path)``: config.json carries the spec, the weights the maps.

    Reload with :func:`load_linearized`.
    """
    if not is_linearized(model):
        raise ValueError("model is not linearized: call attnkit.hf.linearize first")
    out = Path(path)
    model.save_pretrained(out)
    return out


def _extra_keys(model: nn.Module) -> set[str]:
    base = {k for k in model.state_dict() if ".feature_map_" in k or k.endswith(".decay_logit")}
    return base


def load_linearized(path: str | Path, **from_pretrained_kwargs: Any) -> PreTrainedModel:
    """Load a model written by :func:`save_linearized` (or ``save_pretrained`` of one).

    Loads the base weights with ``AutoModelForCausalLM.from_pretrained(path, ...)``,
    converts it again from the spec in its config, then loads the feature maps (and
    decay gates) from the same checkpoint. ValueError if ``path`` holds no spec or lacks
    any converted weight.
    """
    from safetensors.torch import load_file
    from transformers.utils import logging as hf_logging

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    raw = getattr(config, SPEC_KEY, None)
    if raw is None:
        raise ValueError(f"{path} is not a linearized model: config.json has no {SPEC_KEY!r}")
    spec = LinearizeSpec.from_dict(raw)
    # The feature-map weights are not the base model's: silence its "unused weights" note.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    delattr(model.config, SPEC_KEY)
    linearize(model, **{k: v for k, v in asdict(spec).items()})
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = set(json.loads(index.read_text())["weight_map"].values())
        files = [path / n for n in sorted(names)]
    if not files:
        raise ValueError(f"{path} holds no *.safetensors weights")
    wanted = _extra_keys(model)
    found: dict[str, Tensor] = {}
    for f in files:
        tensors = load_file(str(f))
        found.update({k: t for k, t in tensors.items() if k in wanted})
    missing = sorted(wanted - found.keys())
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} converted weights, e.g. {missing[:3]}; was it saved "
            "after linearize?"
        )
    result = model.load_state_dict(found, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected weights {result.unexpected_keys[:3]}")
    return model

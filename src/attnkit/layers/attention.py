"""Multi-head attention as an ``nn.Module``: MHA / GQA / MQA, d_k != d_v, any backend.

One module covers the whole family (Vaswani et al. 2017; Shazeer 2019; Ainslie et al. 2023):

- heads: ``n_kv_heads=None`` is MHA (one key/value head per query head), ``1`` is
  MQA, any divisor g of ``n_heads`` is GQA with g key/value heads shared by groups
  of n_heads / g query heads. K and V are projected to ``n_kv_heads`` heads only;
  the ops receive them as they are (``enable_gqa``), never repeated.
- widths: ``d_k`` (query/key) and ``d_v`` (value) are per-head widths and may
  differ. The value projection maps d_model -> n_kv_heads·d_v and the output
  projection n_heads·d_v -> d_model, so the residual still adds up.
- backends: the attention function is chosen by name from :data:`BACKENDS`
  ("softmax", "argmax", "kernel", "linear"); each entry is a small adapter from the
  module's call to an op in :mod:`attnkit.ops`.
- decoding: ``forward(..., cache=...)`` appends the new keys/values (or folds them
  into the linear state) and lets the new queries attend to everything cached,
  with the causal mask aligned lower-right (:func:`attnkit.ops.softmax.sdpa`).

Shape legend (the module is batch-first; the ops use PyTorch's SDPA layout and the
conversion happens in ``forward`` only)::

    B batch, L query length, S key length (cached + new when decoding)
    H = n_heads query heads, Hk = n_kv_heads key/value heads, G = H // Hk
    x [B, L, d_model]            q [B, H, L, d_k]
    context [B, S, d_model]      k [B, Hk, S, d_k],  v [B, Hk, S, d_v]
    out [B, L, d_model]          attention output [B, H, L, d_v] -> [B, L, H·d_v]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from einops import rearrange
from torch import Tensor, nn

from attnkit import feature_maps
from attnkit._registry import Registry
from attnkit._validation import check_choice, check_float, check_int, check_rank, check_tensor
from attnkit.feature_maps import FeatureMap
from attnkit.layers.cache import KVCache, LinearState
from attnkit.ops.argmax import argmax_attention
from attnkit.ops.argmax import modes as argmax_modes
from attnkit.ops.kernel import get_similarity, kernel_attention
from attnkit.ops.linear import linear_attention, linear_attention_step
from attnkit.ops.softmax import CausalAlignment, sdpa

__all__ = [
    "BACKENDS",
    "AttentionCall",
    "Backend",
    "Cache",
    "MultiHeadAttention",
    "backends",
]

#: Any per-layer decoding cache; which one a backend uses is :attr:`Backend.cache_type`.
Cache = KVCache | LinearState

_C = TypeVar("_C", KVCache, LinearState)


@dataclass(frozen=True)
class AttentionCall:
    """Everything one forward asks of a backend besides q, k and v.

    ``attn_mask`` is already merged with the key padding mask: bool (True = attend)
    or float (added to the scores), broadcastable to [B, H, L, S].
    """

    attn_mask: Tensor | None
    is_causal: bool
    causal_alignment: CausalAlignment
    dropout_p: float
    options: Mapping[str, Any]  # the module's backend options, defaults filled in
    feature_map: FeatureMap | None


#: (q [B, H, L, d_k], k [B, Hk, S, d_k], v [B, Hk, S, d_v], call) -> [B, H, L, d_v]
AttendFn = Callable[[Tensor, Tensor, Tensor, AttentionCall], Tensor]
#: The same with a cache that the call extends by the L new keys/values.
DecodeFn = Callable[[Cache, Tensor, Tensor, Tensor, AttentionCall], Tensor]
#: (module, batch, max_len, dtype, device) -> an empty cache for that module.
CacheFactory = Callable[["MultiHeadAttention", int, "int | None", torch.dtype, torch.device], Cache]


def _no_prepare(options: dict[str, Any]) -> dict[str, Any]:
    return options


@dataclass(frozen=True)
class Backend:
    """How :class:`MultiHeadAttention` calls one attention op.

    ``options`` lists the accepted ``backend_options`` with their defaults;
    ``prepare`` validates/resolves them once at construction. ``masks``,
    ``dropout`` and ``feature_map`` say whether the backend takes attention masks,
    attention-weight dropout and a feature map; the module rejects the rest with a
    ValueError.
    """

    attend: AttendFn
    decode: DecodeFn
    cache_type: type[KVCache] | type[LinearState]
    new_cache: CacheFactory
    options: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[[dict[str, Any]], dict[str, Any]] = _no_prepare
    masks: bool = True
    dropout: bool = False
    feature_map: bool = False


#: name -> :class:`Backend`; ``MultiHeadAttention(backend=name)`` looks names up here.
BACKENDS: Registry[Backend] = Registry("attention backend")


def backends() -> list[str]:
    """Names accepted by ``MultiHeadAttention(backend=...)``."""
    return BACKENDS.names()


def _expect(cache: Cache, kind: type[_C]) -> _C:
    if not isinstance(cache, kind):
        raise TypeError(f"expected a {kind.__name__} cache, got {type(cache).__name__}")
    return cache


# --------------------------------------------------------------------------------------
# Caches shared by the quadratic backends
# --------------------------------------------------------------------------------------


def _new_kv_cache(
    module: MultiHeadAttention,
    batch: int,
    max_len: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Cache:
    return KVCache(
        batch,
        module.n_kv_heads,
        module.d_k,
        module.d_v,
        max_len=max_len,
        dtype=dtype,
        device=device,
    )


def _kv_decode(attend: AttendFn) -> DecodeFn:
    """Decoding for any backend that attends over explicit keys: extend a KVCache."""

    def decode(cache: Cache, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        kv = _expect(cache, KVCache)
        n_before = kv.seq_len
        k_all, v_all = kv.update(k, v)  # [B, Hk, n, d_k], [B, Hk, n, d_v]
        try:
            # The L new queries are the *last* L positions: lower-right causal alignment.
            return attend(q, k_all, v_all, replace(call, causal_alignment="lower_right"))
        except Exception:
            kv.crop(n_before)  # a failed call leaves the cache as it was
            raise

    return decode


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def _softmax_attend(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
    return sdpa(
        q,
        k,
        v,
        attn_mask=call.attn_mask,
        dropout_p=call.dropout_p,
        is_causal=call.is_causal,
        scale=call.options["scale"],
        enable_gqa=True,
        causal_alignment=call.causal_alignment,
    )


def _argmax_attend(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
    opts = call.options
    return argmax_attention(
        q,
        k,
        v,
        attn_mask=call.attn_mask,
        is_causal=call.is_causal,
        mode=opts["mode"],
        tau=opts["tau"],
        generator=opts["generator"],
        scale=opts["scale"],
        enable_gqa=True,
        causal_alignment=call.causal_alignment,
    )


def _prepare_argmax(options: dict[str, Any]) -> dict[str, Any]:
    check_choice("argmax mode", options["mode"], argmax_modes())
    return options


def _kernel_attend(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
    opts = call.options
    return kernel_attention(
        q,
        k,
        v,
        sim=opts["sim"],
        attn_mask=call.attn_mask,
        is_causal=call.is_causal,
        eps=opts["eps"],
        causal_alignment=call.causal_alignment,
        enable_gqa=True,
    )


def _prepare_kernel(options: dict[str, Any]) -> dict[str, Any]:
    # Build a named similarity once (this also validates the name and sim_kwargs).
    sim, sim_kwargs = options["sim"], options.pop("sim_kwargs")
    if isinstance(sim, str):
        options["sim"] = get_similarity(sim, **dict(sim_kwargs or {}))
    elif sim_kwargs:
        raise ValueError(
            "backend_options['sim_kwargs'] only configures a registered similarity name; "
            f"got a callable sim and sim_kwargs={dict(sim_kwargs)!r}"
        )
    return options


def _linear_attend(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
    opts, phi = call.options, _feature_map(call)
    out, _ = linear_attention(
        q,
        k,
        v,
        feature_map=phi,
        is_causal=call.is_causal,
        normalize=opts["normalize"],
        eps=opts["eps"],
        chunk_size=opts["chunk_size"],
        enable_gqa=True,
    )
    return out


def _linear_decode(cache: Cache, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
    """Fold the L new tokens into the recurrent state (S, z) and read it.

    Causal: one token goes through the recurrence ``linear_attention_step``, L > 1
    through the chunked causal form started from the cached state. Non-causal: every
    new query reads the state after all new keys (the cached ones and its own chunk).
    """
    state = _expect(cache, LinearState)
    opts, phi = call.options, _feature_map(call)
    L = q.shape[2]
    state.check_append(L)
    if call.is_causal and L == 1:
        out, new_state = linear_attention_step(
            q,
            k,
            v,
            state.state,
            feature_map=phi,
            normalize=opts["normalize"],
            eps=opts["eps"],
            enable_gqa=True,
        )
    else:
        out, final = linear_attention(
            q,
            k,
            v,
            feature_map=phi,
            is_causal=call.is_causal,
            normalize=opts["normalize"],
            eps=opts["eps"],
            chunk_size=opts["chunk_size"],
            initial_state=state.state,
            output_final_state=True,
            enable_gqa=True,
        )
        if final is None:  # pragma: no cover - output_final_state=True always returns it
            raise RuntimeError("linear_attention returned no final state")
        new_state = final
    state.advance(new_state, L)
    return out


def _feature_map(call: AttentionCall) -> FeatureMap:
    if call.feature_map is None:  # pragma: no cover - the module always sets it for linear
        raise RuntimeError("the linear backend needs a feature map")
    return call.feature_map


def _new_linear_state(
    module: MultiHeadAttention,
    batch: int,
    max_len: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Cache:
    return LinearState(batch, module.n_kv_heads, max_len=max_len, dtype=dtype, device=device)


BACKENDS.register("softmax")(
    Backend(
        attend=_softmax_attend,
        decode=_kv_decode(_softmax_attend),
        cache_type=KVCache,
        new_cache=_new_kv_cache,
        options={"scale": None},
        dropout=True,
    )
)
BACKENDS.register("argmax")(
    Backend(
        attend=_argmax_attend,
        decode=_kv_decode(_argmax_attend),
        cache_type=KVCache,
        new_cache=_new_kv_cache,
        options={"mode": "hard", "tau": 1.0, "scale": None, "generator": None},
        prepare=_prepare_argmax,
    )
)
BACKENDS.register("kernel")(
    Backend(
        attend=_kernel_attend,
        decode=_kv_decode(_kernel_attend),
        cache_type=KVCache,
        new_cache=_new_kv_cache,
        options={"sim": "softmax", "sim_kwargs": None, "eps": None},
        prepare=_prepare_kernel,
    )
)
BACKENDS.register("linear")(
    Backend(
        attend=_linear_attend,
        decode=_linear_decode,
        cache_type=LinearState,
        new_cache=_new_linear_state,
        options={"eps": None, "normalize": True, "chunk_size": None},
        masks=False,
        feature_map=True,
    )
)


# --------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------


def _check_mask_shape(name: str, mask: Tensor, legend: str, want: tuple[int, ...]) -> None:
    """Each axis of ``mask`` must equal ``want`` or be 1 (broadcast); name the bad axis."""
    for axis, have, size in zip(legend.split(), mask.shape, want, strict=True):
        if have not in (1, size):
            raise ValueError(
                f"{name} must have shape [{', '.join(legend.split())}] = {list(want)} "
                f"(size-1 axes broadcast), got {list(mask.shape)}: axis {axis} has size "
                f"{have}, expected {size}"
            )


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention with grouped key/value heads, any key/value widths, any backend.

    ::

        q = x W_q       [B, L, H·d_k]  -> [B, H, L, d_k]
        k = c W_k       [B, S, Hk·d_k] -> [B, Hk, S, d_k]     c = context, or x itself
        v = c W_v       [B, S, Hk·d_v] -> [B, Hk, S, d_v]
        o = attention(q, k, v)   [B, H, L, d_v] -> [B, L, H·d_v]   query head h uses
        out = o W_o     [B, L, d_model]                           kv head h // (H / Hk)

    Args:
        d_model: model width (of x, context and the output).
        n_heads: query heads H.
        n_kv_heads: key/value heads Hk: ``None`` = H (MHA), 1 (MQA), or any divisor
            of H (GQA); anything else raises ValueError.
        d_k: query/key width per head; default d_model // H (ValueError when H does
            not divide d_model).
        d_v: value width per head; default d_k. E.g. d_v = 2·d_model / H makes W_v
            map d_model -> 2·d_model and W_o 2·d_model -> d_model.
        backend: a name in :func:`backends`: ``"softmax"`` (:func:`~attnkit.ops.sdpa`),
            ``"argmax"`` (:func:`~attnkit.ops.argmax_attention`), ``"kernel"``
            (:func:`~attnkit.ops.kernel_attention`), ``"linear"``
            (:func:`~attnkit.ops.linear_attention`).
        feature_map: linear backend only: a registered name
            (:func:`attnkit.feature_maps.available`) or a FeatureMap instance (default
            ``"elu"``); a submodule, so e.g. Performer projections are saved and moved
            with the module. A name of a map drawn for one width (``"favor"``) is built
            here for d_k from the global RNG, so every layer gets its own projection;
            an instance must already accept width d_k (ValueError otherwise). Any other
            backend raises ValueError (for a kernel given by a feature map, use
            ``backend="kernel"`` with ``sim="linear"``).
        bias: biases in all four projections.
        dropout: attention-weight dropout probability, applied in training mode
            (softmax backend only; ValueError for the others).
        is_causal: query i attends keys j <= i (upper-left aligned when L != S, as
            in torch; lower-right when decoding with a cache).
        backend_options: keyword options of the backend's op, validated at
            construction (unknown keys raise ValueError listing the accepted ones):
            softmax ``scale``; argmax ``mode``, ``tau``, ``scale``, ``generator``;
            kernel ``sim``, ``sim_kwargs``, ``eps``; linear ``eps``, ``normalize``,
            ``chunk_size``. ``eps`` defaults to None: a denominator <= 0 raises (see
            :func:`~attnkit.ops.linear_attention`), so a non-positive feature map such
            as relu needs an explicit eps.

    Masks (``forward``): ``attn_mask`` follows SDPA: bool **True = attend**, or float
    added to the scores; shapes [L, S], [B, L, S] or [B, H, L, S] (size-1 axes
    broadcast). Note that ``torch.nn.MultiheadAttention`` uses the opposite bool
    convention (True = masked) and [B·H, L, S] for 3-D masks. ``key_padding_mask``
    [B, S] is bool with **True = padding** (ignored key), as in torch. A query that
    may attend no key gets 0 from the softmax, argmax and kernel backends alike
    (torch's MHA gives NaN).

    The linear backend accepts no ``attn_mask`` and no ``key_padding_mask``
    (ValueError): its sums over keys are formed before any query is seen, so a
    per-(query, key) mask has nowhere to go; use ``is_causal``, or
    ``backend="kernel", backend_options={"sim": "linear", ...}`` for the same
    similarity with masks at quadratic cost.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        d_k: int | None = None,
        d_v: int | None = None,
        backend: str = "softmax",
        feature_map: str | FeatureMap | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        is_causal: bool = False,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        d_model = check_int("d_model", d_model, 1)
        n_heads = check_int("n_heads", n_heads, 1)
        n_kv_heads = n_heads if n_kv_heads is None else check_int("n_kv_heads", n_kv_heads, 1)
        if n_heads % n_kv_heads != 0:
            raise ValueError(
                f"n_kv_heads must divide n_heads (None = MHA, 1 = MQA, a divisor = GQA): "
                f"got n_heads={n_heads}, n_kv_heads={n_kv_heads} "
                f"(n_heads % n_kv_heads = {n_heads % n_kv_heads})"
            )
        if d_k is None:
            if d_model % n_heads != 0:
                raise ValueError(
                    f"d_model={d_model} is not divisible by n_heads={n_heads}; pass the "
                    "per-head width d_k (and d_v) explicitly"
                )
            d_k = d_model // n_heads
        d_k = check_int("d_k", d_k, 1)
        d_v = d_k if d_v is None else check_int("d_v", d_v, 1)
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a float, got {type(dropout).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        spec = BACKENDS.get(backend)
        if dropout > 0 and not spec.dropout:
            supported = [n for n in BACKENDS if BACKENDS.get(n).dropout]
            raise ValueError(
                f"backend {backend!r} has no attention dropout (got dropout={dropout}); "
                f"backends with dropout: {', '.join(map(repr, supported))}"
            )
        if feature_map is not None and not spec.feature_map:
            raise ValueError(
                f"feature_map={feature_map!r} is only used by the 'linear' backend, got "
                f"backend={backend!r}; for a feature-map kernel at quadratic cost use "
                "backend='kernel' with backend_options={'sim': 'linear', "
                "'sim_kwargs': {'feature_map': ...}}"
            )
        given = dict(backend_options or {})
        unknown = sorted(set(given) - set(spec.options))
        if unknown:
            raise ValueError(
                f"unknown backend_options {unknown} for backend {backend!r}; accepted: "
                f"{', '.join(map(repr, spec.options)) or 'none'}"
            )

        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.d_k = d_k
        self.d_v = d_v
        self.backend = backend
        self.is_causal = is_causal
        self.dropout = float(dropout)
        self.backend_options: Mapping[str, Any] = MappingProxyType(given)
        self._spec = spec
        self._options: Mapping[str, Any] = MappingProxyType(spec.prepare({**spec.options, **given}))
        self.feature_map: FeatureMap | None = None
        if spec.feature_map:
            # Maps drawn for one width (Performer projections) are drawn here, from the
            # global RNG: every layer its own, in the state_dict before any forward.
            name = "elu" if feature_map is None else feature_map
            self.feature_map = feature_maps.resolve(name, d_k, seed=None)
            self.feature_map.check_width(d_k)

        self.q_proj = nn.Linear(d_model, n_heads * d_k, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * d_k, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * d_v, bias=bias)
        self.out_proj = nn.Linear(n_heads * d_v, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"d_k={self.d_k}, d_v={self.d_v}, backend={self.backend!r}, "
            f"is_causal={self.is_causal}"
        )

    # ------------------------------------------------------------------ caches
    def new_cache(
        self,
        batch: int,
        *,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Cache:
        """An empty decoding cache for this layer: a KVCache, or a LinearState for ``linear``.

        ``dtype``/``device`` default to the projections' parameters. The KVCache holds
        [B, n_kv_heads, n, d_k] keys and [B, n_kv_heads, n, d_v] values; the
        LinearState a constant-size (S [B, n_kv_heads, D', d_v], z [B, n_kv_heads, D']).
        Decoding past ``max_len`` raises ValueError.
        """
        weight = self.k_proj.weight
        return self._spec.new_cache(
            self,
            batch,
            max_len,
            weight.dtype if dtype is None else dtype,
            weight.device if device is None else torch.device(device),
        )

    def _check_cache(self, cache: object, batch: int, length: int) -> Cache:
        """Validate a cache before anything is computed or appended."""
        kind = self._spec.cache_type
        if not isinstance(cache, kind):
            raise TypeError(
                f"backend {self.backend!r} decodes with a {kind.__name__} (see new_cache()), "
                f"got cache of type {type(cache).__name__}"
            )
        cache.check_batch(batch, "x")
        if cache.n_kv_heads is not None and cache.n_kv_heads != self.n_kv_heads:
            raise ValueError(
                f"the cache has n_kv_heads={cache.n_kv_heads}, this layer n_kv_heads="
                f"{self.n_kv_heads}"
            )
        if isinstance(cache, KVCache) and (cache.d_k, cache.d_v) != (self.d_k, self.d_v):
            raise ValueError(
                f"the cache holds d_k={cache.d_k}, d_v={cache.d_v}; this layer has "
                f"d_k={self.d_k}, d_v={self.d_v}"
            )
        cache.check_append(length)
        return cache

    # ------------------------------------------------------------------ forward
    def _check_input(self, name: str, x: object) -> Tensor:
        x = check_tensor(name, x)
        check_rank(name, x, "B L d_model" if name == "x" else "B S d_model")
        check_float(name, x)
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"{name} must have last axis d_model={self.d_model}, got {x.shape[-1]} "
                f"(shape {list(x.shape)})"
            )
        return x

    def _merge_masks(
        self,
        attn_mask: object,
        key_padding_mask: object,
        B: int,
        L: int,
        S: int,
    ) -> Tensor | None:
        """One mask broadcastable to [B, H, L, S]: bool True = attend, or float added."""
        if (attn_mask is not None or key_padding_mask is not None) and not self._spec.masks:
            raise ValueError(
                f"backend {self.backend!r} supports no attn_mask or key_padding_mask (its "
                "key sums are formed before any query is seen); use is_causal, or "
                "backend='kernel' with backend_options={'sim': 'linear'} for masks"
            )
        mask: Tensor | None = None
        if attn_mask is not None:
            mask = check_tensor("attn_mask", attn_mask)
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(
                    "attn_mask must be bool (True = attend) or floating (added to the "
                    f"scores), got {mask.dtype}"
                )
            H = self.n_heads
            if mask.dim() == 2:
                _check_mask_shape("attn_mask", mask, "L S", (L, S))
            elif mask.dim() == 3:
                _check_mask_shape("attn_mask", mask, "B L S", (B, L, S))
                mask = mask.unsqueeze(1)  # [B, 1, L, S]: the same mask for every head
            elif mask.dim() == 4:
                _check_mask_shape("attn_mask", mask, "B H L S", (B, H, L, S))
            else:
                raise ValueError(
                    f"attn_mask must have shape [L, S], [B, L, S] or [B, H, L, S] with "
                    f"B={B}, H={H}, L={L}, S={S}, got {list(mask.shape)}"
                )
        if key_padding_mask is not None:
            pad = check_tensor("key_padding_mask", key_padding_mask)
            if pad.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be bool (True = padding), got {pad.dtype}")
            if tuple(pad.shape) != (B, S):
                raise ValueError(
                    f"key_padding_mask must have shape [B, S] = {[B, S]}, got {list(pad.shape)}"
                )
            keep = ~pad[:, None, None, :]  # [B, 1, 1, S], True = attend
            if mask is None:
                mask = keep
            elif mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = torch.where(keep, mask, float("-inf"))
        return mask

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:
        """Attend from ``x`` to ``context`` (or to ``x`` itself); returns [B, L, d_model].

        Args:
            x: queries [B, L, d_model].
            context: keys/values source [B, S, d_model] for cross-attention; ``None``
                is self-attention. Not combinable with ``cache``.
            attn_mask: [L, S], [B, L, S] or [B, H, L, S]; bool True = attend, or float
                added to the scores (the opposite bool convention to
                torch.nn.MultiheadAttention). S counts the cached keys when decoding.
            key_padding_mask: [B, S] bool, True = padding (ignored), as in torch.
            cache: from :meth:`new_cache`. The L new keys/values are appended (or
                folded into the linear state) and the L new queries attend to all
                cached tokens and, causally aligned lower-right when ``is_causal``, to
                each other. Prefill + decode steps equal one full causal forward.

        Raises ValueError for a wrong rank or width of x/context, a batch mismatch
        (context or cache), a bad mask shape, a cache past its ``max_len``, or masks
        with the linear backend; TypeError for a cache of the wrong kind.
        """
        x = self._check_input("x", x)
        B, L = x.shape[0], x.shape[1]
        src = x
        if context is not None:
            if cache is not None:
                raise ValueError(
                    "cache is for causal self-attention decoding; cross-attention "
                    "(context=...) with a cache is not supported: pass the full context "
                    "at every step instead"
                )
            src = self._check_input("context", context)
            if src.shape[0] != B:
                raise ValueError(
                    f"x and context must share the batch size: x has B={B}, context has "
                    f"B={src.shape[0]}"
                )
        S = src.shape[1]
        if cache is not None:
            cache = self._check_cache(cache, B, L)
            S += cache.seq_len
        mask = self._merge_masks(attn_mask, key_padding_mask, B, L, S)

        q: Tensor = rearrange(self.q_proj(x), "b l (h e) -> b h l e", h=self.n_heads)
        k: Tensor = rearrange(self.k_proj(src), "b s (hk e) -> b hk s e", hk=self.n_kv_heads)
        v: Tensor = rearrange(self.v_proj(src), "b s (hk ev) -> b hk s ev", hk=self.n_kv_heads)
        # q [B, H, L, d_k], k [B, Hk, S, d_k], v [B, Hk, S, d_v]: each split by its own width
        call = AttentionCall(
            attn_mask=mask,
            is_causal=self.is_causal,
            causal_alignment="upper_left",
            dropout_p=self.dropout if self.training else 0.0,
            options=self._options,
            feature_map=self.feature_map,
        )
        if cache is None:
            o = self._spec.attend(q, k, v, call)  # [B, H, L, d_v]
        else:
            o = self._spec.decode(cache, q, k, v, call)  # [B, H, L, d_v]
        out: Tensor = self.out_proj(rearrange(o, "b h l ev -> b l (h ev)"))  # [B, L, d_model]
        return out

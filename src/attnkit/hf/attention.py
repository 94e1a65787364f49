r"""attnkit's attention ops as Hugging Face transformers attention implementations.

HF models look their attention function up by name: ``attn_implementation="attnkit"``
(or ``model.set_attn_implementation("attnkit")``) makes every attention layer call
:func:`attnkit.sdpa` instead of torch's. :func:`register` adds such names to
transformers' ``AttentionInterface`` **together with a mask function** in its
``AttentionMaskInterface``: a name without a mask function gets ``attention_mask=None``
from the model, and causal and padding masking would be silently lost.

The mask function is transformers' own ``sdpa_mask``, so the masks mean what they mean
for ``"sdpa"``: bool [B, 1, Sq, Skv], True = attend, or None when plain causal attention
needs no mask (then ``is_causal`` does it). Left padding arrives as False columns (and
fully masked rows for the padding queries, whose output is 0 as with torch's SDPA).

The call HF makes (``transformers.integrations.sdpa_attention`` has the same)::

    fn(module, query [B, H, Sq, D], key [B, Hkv, Skv, D], value [B, Hkv, Skv, Dv],
       attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs)
    -> (out [B, Sq, H, Dv] contiguous, None)

Grouped-query attention: key and value arrive with their Hkv heads and go to the op as
they are (``enable_gqa``); attnkit never repeats them (HF's ``"sdpa"`` path on a CPU
copies them ``H / Hkv`` times whenever a mask is present with more than one query, e.g.
a padded prefill).

Any attnkit backend can be registered under a name of your choice for prefill and
training experiments: ``argmax`` (hard, straight-through, Gumbel, softmax with a
temperature), ``kernel`` (any similarity) and ``linear`` (a feature map). These are
drop-in replacements of the attention *function* only; the model's KV cache is still
there, which matters for the linear backend:

- HF's attention layer appends every new key/value to its cache
  (``past_key_values.update``) *before* it calls the attention function, so a linear
  backend registered this way still **grows a KV cache** O(n) per layer and, at each
  decoding step, refolds all n cached keys into phi(K)^T V: O(n) time per token, not
  the O(1) of a recurrent state. Constant-memory decoding needs the layer's own state
  (:class:`attnkit.TinyLM` with ``backend="linear"``, or a model whose layers are
  linear attention, sped up by :func:`attnkit.hf.accelerate`).
- Without a mask (training batches without padding, prefill) the linear backend runs
  the O(N) causal chunked path; a mask (padding, or new tokens after cached ones) has
  no place in phi(K)^T V, so those calls run the same similarity phi(q).phi(k) through
  the quadratic :func:`attnkit.kernel_attention` with the mask: exact, O(Sq Skv).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from attnkit import feature_maps
from attnkit.feature_maps import FeatureMap
from attnkit.layers.attention import BACKENDS, AttentionCall, Backend
from attnkit.ops.kernel import get_similarity, kernel_attention

__all__ = ["DEFAULT_NAME", "attention_function", "register"]

#: The stable name of softmax attention through :func:`attnkit.sdpa`.
DEFAULT_NAME = "attnkit"

# HF keyword arguments that change the math and that no attnkit op implements.
_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux")

AttentionFn = Callable[..., tuple[Tensor, None]]


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    bad = [c for c in "/:|" if c in name]
    if not name or bad or name.strip() != name:
        raise ValueError(
            "name must be a non-empty string without '/', ':', '|' or surrounding spaces "
            f"(transformers reads 'org/repo:fn' as a Hub kernel and 'paged|x' as paging), "
            f"got {name!r}"
        )
    return name


def _resolve_options(
    backend: str, feature_map: str | FeatureMap | None, options: Mapping[str, Any]
) -> tuple[Backend, dict[str, Any], FeatureMap | None]:
    """Validate ``options`` against the backend's (the same names as MultiHeadAttention)."""
    spec = BACKENDS.get(backend)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for attnkit backend {backend!r}; accepted: "
            f"{', '.join(map(repr, spec.options)) or 'none'}"
        )
    if feature_map is not None and not spec.feature_map:
        raise ValueError(
            f"feature_map={feature_map!r} is only used by the 'linear' backend, got "
            f"backend={backend!r}"
        )
    merged = {**spec.options, **options}
    resolved = spec.prepare(merged)
    phi = None
    if spec.feature_map:
        phi = feature_maps.resolve("elu" if feature_map is None else feature_map)
    return spec, resolved, phi


def _masked_linear(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, phi: FeatureMap, opts: Mapping[str, Any]
) -> Tensor:
    """Linear attention's similarity phi(q).phi(k) with a mask: the quadratic form."""
    sim = get_similarity("linear", feature_map=phi)
    return kernel_attention(
        q,
        k,
        v,
        sim=sim,
        attn_mask=mask,
        eps=opts["eps"],
        normalize=opts["normalize"],
        enable_gqa=True,
    )


def attention_function(
    backend: str = "softmax",
    *,
    feature_map: str | FeatureMap | None = None,
    **options: Any,
) -> AttentionFn:
    """An HF attention function (the ``AttentionInterface`` signature) running an attnkit op.

    ``backend`` and ``options`` are those of :class:`attnkit.MultiHeadAttention`
    (:func:`attnkit.layers.backends`): ``"softmax"`` (``scale``), ``"argmax"``
    (``mode``, ``tau``, ``scale``, ``generator``), ``"kernel"`` (``sim``,
    ``sim_kwargs``, ``eps``), ``"linear"`` (``feature_map``, ``eps``, ``normalize``,
    ``chunk_size``). ``scale=None`` takes the model's ``scaling``; ``eps=None`` (the
    default) adds no guard: a non-positive feature map or similarity raises on a
    non-positive denominator, as everywhere in attnkit (rows with no attendable key,
    the queries of left padding, give 0 as in torch's SDPA). Options are validated here, once.

    Shapes: query [B, H, Sq, D], key [B, Hkv, Skv, D], value [B, Hkv, Skv, Dv] ->
    ([B, Sq, H, Dv], None).
    """
    spec, opts, phi = _resolve_options(backend, feature_map, options)
    frozen: Mapping[str, Any] = MappingProxyType(opts)
    takes_scale = "scale" in spec.options
    label = backend

    def forward(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        for arg in _UNSUPPORTED_KWARGS:
            if kwargs.get(arg) is not None:
                raise ValueError(
                    f"the attnkit {label!r} attention does not support {arg!r}; use "
                    "attn_implementation='eager' for this model"
                )
        if dropout and not spec.dropout:
            raise ValueError(
                f"the attnkit {label!r} attention has no attention dropout, got "
                f"dropout={dropout} (set the model's attention_dropout to 0)"
            )
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        # As HF's sdpa: without a mask a causal layer with several queries uses the
        # (upper-left) causal flag; one query attends every key it is given.
        causal = bool(q_len > 1 and attention_mask is None and causal)
        if causal and kv_len > q_len:
            # A static cache hands over its unwritten slots at prefill; with upper-left
            # causality the queries never reach them, so drop them (as HF's sdpa does).
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        call_opts = frozen
        if takes_scale and frozen["scale"] is None:
            call_opts = {**frozen, "scale": scaling}
        if attention_mask is not None and not spec.masks:
            if phi is None:  # pragma: no cover - only the linear backend refuses masks
                raise RuntimeError(f"backend {label!r} takes no mask and has no feature map")
            out = _masked_linear(query, key, value, attention_mask, phi, frozen)
        else:
            call = AttentionCall(
                attn_mask=attention_mask,
                is_causal=causal,
                causal_alignment="upper_left",
                dropout_p=float(dropout),
                options=call_opts,
                feature_map=phi,
            )
            out = spec.attend(query, key, value, call)  # [B, H, Sq, Dv]
        return out.transpose(1, 2).contiguous(), None

    forward.__name__ = f"attnkit_{backend}_attention"
    forward.__qualname__ = forward.__name__
    return forward


def register(
    name: str = DEFAULT_NAME,
    backend: str = "softmax",
    *,
    feature_map: str | FeatureMap | None = None,
    **options: Any,
) -> str:
    """Register an attnkit op as a transformers attention implementation; returns ``name``.

    ``register()`` registers the stable name ``"attnkit"``: softmax attention through
    :func:`attnkit.sdpa`. ``register(name, backend, **options)`` registers any other
    attnkit backend under ``name`` (see :func:`attention_function` for the backends and
    options), e.g.::

        attnkit.hf.register("attnkit-st", "argmax", mode="straight_through", tau=0.5)
        attnkit.hf.register("attnkit-elu", "linear", feature_map="elu")
        model = LlamaForCausalLM._from_config(config, attn_implementation="attnkit-st")

    Each name is registered with transformers' ``sdpa_mask`` as its mask function (bool,
    True = attend; None for plain causal), without which the model would pass no mask at
    all. Registering a name again replaces it. See the module docstring for what the KV
    cache means for a linear backend registered this way.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    name = _check_name(name)
    fn = attention_function(backend, feature_map=feature_map, **options)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name

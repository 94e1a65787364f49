r"""Route the linear-attention layers of HF transformers models through attnkit's kernels.

Qwen3-Next, Qwen3.5 (dense and MoE) and Kimi Linear interleave softmax attention with
delta-rule layers (Gated DeltaNet; KDA for Kimi) preceded by a short causal
convolution. Without a GPU, transformers runs them through its pure-torch fallbacks
(``torch_chunk_gated_delta_rule``, ``torch_recurrent_gated_delta_rule``,
``causal_conv1d_fn``/``causal_conv1d_update``, ``chunk_kimi_delta_attention``, ...).
:func:`accelerate` makes each such layer compute the same thing with
:func:`attnkit.delta_rule_attention` (chunked prefill), :func:`attnkit.delta_rule_step`
(decoding from the state in HF's cache), :func:`attnkit.ops.conv.causal_conv1d` and
:func:`attnkit.ops.conv.causal_conv1d_update`.

How it hooks in, and why at this depth. In transformers 5.23-5.24 each of those
module-level functions is wrapped at *import* time by
``use_kernel_func_from_hub_with_fallback``: if ``fla`` (flash-linear-attention) or
``causal_conv1d`` is importable then, the wrapper binds their (Triton / CUDA) kernels
once, and the layer's ``forward`` calls them through the module globals
(``use_kernelized_func`` only attaches the functions to instances for the optional
``kernels`` package; the forward does not read those attributes). So with fla
installed on a machine without a GPU, the plain model crashes inside Triton
("0 active drivers"), and neither uninstalling nor hiding ``fla`` after the import
helps. Patching those globals would change every model of the process. Instead,
:func:`accelerate` gives each supported *layer instance* its own ``forward`` (an
instance attribute, which ``nn.Module.__call__`` finds first): the same computation
as the class's forward, with the same use of HF's cache (conv state updated in place,
recurrent state through ``cache.update_recurrent_state``), that never calls the
dispatched globals. :func:`restore` deletes the attribute; nothing else is changed
and the weights are untouched, so ``state_dict``/``save_pretrained`` are unaffected.

On devices not listed in ``device_types`` (default: CPU only) the layer's own forward
runs, so a GPU model keeps fla's kernels.

Layouts: HF holds q, k, v as [B, T, H, D] and gates as [B, T, H]; attnkit's ops take
the SDPA layout [B, H, T, D]. The conversion is a transposed *view* at one boundary
(:func:`_core`; a prefill also expands q and k to the value heads, one copy); the
short convolution reads the projection's [B, T, C] rows through a [B, C, T] view
without copying them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.ops.conv import ACTIVATIONS, causal_conv1d, causal_conv1d_update
from attnkit.ops.delta import delta_rule_attention, delta_rule_step
from attnkit.ops.gated_common import acc_dtype

__all__ = ["SUPPORTED", "accelerate", "accelerated", "is_accelerated", "restore"]

# The instance attribute that marks an accelerated layer (and what to put back).
_MARK = "_attnkit_accelerated"


# --------------------------------------------------------------------------------------
# Shared pieces of the three forwards (HF layout in, HF layout out)
# --------------------------------------------------------------------------------------


def _mask_padding(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Zero the padding tokens' inputs (HF's ``apply_mask_to_padding_states``).

    With left padding the pads then leave the conv window and the recurrent state at
    zero, so a padded row computes what the unpadded row does.
    """
    if attention_mask is None:
        return hidden
    return (hidden * attention_mask[:, :, None]).to(hidden.dtype)


def _states(module: Any, cache: Any) -> tuple[Tensor | None, Tensor | None]:
    if cache is None:
        return None, None
    idx = module.layer_idx
    return cache.get_conv_state(idx, state_idx=0), cache.get_recurrent_state(idx, state_idx=0)


def _short_conv(
    module: Any,
    mixed: Tensor,
    cache: Any,
    conv_state: Tensor | None,
    *,
    check_recording: bool,
) -> Tensor:
    """The causal depthwise conv + activation of mixed [B, T, C] -> [B, T, C] (a view).

    Decoding one token updates HF's conv state in place; anything else goes through
    ``cache.update_conv_state`` exactly as HF's forward does (so speculative decoding's
    ``record_past`` keeps working) and convolves what it returns.
    """
    T = mixed.shape[1]
    x = mixed.transpose(1, 2)  # [B, C, T] view of the projection's rows: no copy
    weight = module.conv1d.weight.squeeze(1)  # [C, K]
    bias = module.conv1d.bias
    act = module.activation
    idx = module.layer_idx
    recording = check_recording and cache is not None and cache.is_recording_past(idx)
    if conv_state is not None and T == 1 and not recording:
        y = causal_conv1d_update(x, conv_state, weight, bias, act)
    else:
        if cache is not None:
            # prefill: x itself (left-padded with zeros when T < K); later: [state, x]
            x = cache.update_conv_state(x, idx, conv_kernel_size=module.conv_kernel_size)
        y, _ = causal_conv1d(x, weight, bias, act)
        y = y[:, :, y.shape[2] - T :]
    return y.transpose(1, 2)  # [B, T, C]


def _core(
    module: Any,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    cache: Any,
    recurrent_state: Tensor | None,
) -> Tensor:
    """The delta rule in HF layout: q, k [B, T, Hk, D], v [B, T, Hv, M], g [B, T, Hv(, D)],
    beta [B, T, Hv] -> o [B, T, Hv, M] (a view); the final state goes to HF's cache.

    This is the one layout boundary: [B, T, H, D] <-> attnkit's [B, H, T, D] by
    transposed views. Each q/k head serves Hv / Hk consecutive value heads, as in
    Qwen3-Next; the ops take that layout as it is (``enable_gqa=True``), no expanded copy
    of q and k.
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gh, bh = g.transpose(1, 2), beta.transpose(1, 2)
    final: Tensor | None
    if recurrent_state is not None and q.shape[1] == 1:
        # HF's cache copies the new state into its own tensor anyway: update that in place
        # (no fresh state per token, no copy), unless autograd could need the old one.
        inplace = (
            cache is not None
            and recurrent_state.dtype == acc_dtype(q.dtype)
            and not recurrent_state.requires_grad
            and not torch.is_grad_enabled()
        )
        o, final = delta_rule_step(
            qh,
            kh,
            vh,
            bh,
            gh,
            state=recurrent_state,
            use_qk_l2norm=True,
            enable_gqa=True,
            inplace=inplace,
        )
        if inplace:
            return o.transpose(1, 2)  # the cache's tensor now holds the new state
    else:
        o, final = delta_rule_attention(
            qh,
            kh,
            vh,
            bh,
            gh,
            use_qk_l2norm=True,
            initial_state=recurrent_state,
            output_final_state=cache is not None,
            enable_gqa=True,
        )
    if cache is not None and final is not None:
        cache.update_recurrent_state(final, module.layer_idx)
    return o.transpose(1, 2)  # [B, T, Hv, M]


def _reject_packed(kwargs: dict[str, Any]) -> None:
    for key in ("cu_seq_lens_q", "cu_seqlens", "seq_idx"):
        if kwargs.get(key) is not None:
            raise ValueError(
                f"attnkit.hf.accelerate: packed sequences ({key}) are not supported; pass "
                "padded batches (attention_mask) or call attnkit.hf.restore(model)"
            )


# --------------------------------------------------------------------------------------
# The forwards
# --------------------------------------------------------------------------------------


def _gated_deltanet_forward(
    module: Any,
    hidden_states: Tensor,
    *,
    separate_projections: bool,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Qwen3-Next / Qwen3.5 ``GatedDeltaNet.forward`` on attnkit's kernels.

    ::

        q, k, v = silu(causal_conv1d([q, k, v] projections))       per head, L2-normalised
        beta = sigmoid(b),  g = -exp(A_log) softplus(a + dt_bias)   [B, T, Hv], g <= 0
        o = delta_rule(q, k, v, beta, g);  out = W_o RMSNorm(o) silu(z)
    """
    _reject_packed(kwargs)
    hidden = _mask_padding(hidden_states, attention_mask)
    B, T, _ = hidden.shape
    conv_state, recurrent_state = _states(module, cache)
    if separate_projections:  # Qwen3.5: one [q, k, v] projection, z, b and a apart
        mixed = module.in_proj_qkv(hidden)  # [B, T, 2 Hk Dk + Hv Dv]
        z = module.in_proj_z(hidden).reshape(B, T, -1, module.head_v_dim)
        b, a = module.in_proj_b(hidden), module.in_proj_a(hidden)  # [B, T, Hv]
    else:  # Qwen3-Next: q, k, v, z interleaved per key head
        q, k, v, z, b, a = module.fix_query_key_value_ordering(
            module.in_proj_qkvz(hidden), module.in_proj_ba(hidden)
        )
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], -1)
    mixed = _short_conv(module, mixed, cache, conv_state, check_recording=True)
    kd, vd, Dk, Dv = module.key_dim, module.value_dim, module.head_k_dim, module.head_v_dim
    # views: splitting the channel axis into (heads, width) copies nothing
    q = mixed[..., :kd].view(B, T, kd // Dk, Dk)  # [B, T, Hk, Dk]
    k = mixed[..., kd : 2 * kd].view(B, T, kd // Dk, Dk)
    v = mixed[..., 2 * kd : 2 * kd + vd].view(B, T, vd // Dv, Dv)  # [B, T, Hv, Dv]
    beta = b.sigmoid()
    # fp32 as in HF: in fp16 exp(A_log) could overflow
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    o = _core(module, q, k, v, g, beta, cache, recurrent_state)  # [B, T, Hv, Dv]
    o = module.norm(o.reshape(-1, Dv), z.reshape(-1, Dv)).reshape(B, T, -1)
    out: Tensor = module.out_proj(o)
    return out


def _qwen3_next_forward(module: Any, hidden_states: Tensor, **kw: Any) -> Tensor:
    return _gated_deltanet_forward(module, hidden_states, separate_projections=False, **kw)


def _qwen3_5_forward(module: Any, hidden_states: Tensor, **kw: Any) -> Tensor:
    return _gated_deltanet_forward(module, hidden_states, separate_projections=True, **kw)


def _kimi_forward(
    module: Any,
    hidden_states: Tensor,
    cache: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Kimi Linear ``KimiLinearDeltaAttention.forward`` (KDA) on attnkit's kernels.

    KDA is the gated delta rule with a per-key-channel decay g [B, T, H, D] (Kimi Team
    2025); q, k, v share one head count.
    """
    _reject_packed(kwargs)
    hidden = _mask_padding(hidden_states, attention_mask)
    B, T, _ = hidden.shape
    shape = (B, T, -1, module.head_dim)
    conv_state, recurrent_state = _states(module, cache)
    mixed = torch.cat(
        [module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)], dim=-1
    )  # [B, T, 3 H D]
    mixed = _short_conv(module, mixed, cache, conv_state, check_recording=False)
    d = module.qkv_dim
    q, k, v = (mixed[..., i * d : (i + 1) * d].view(shape) for i in range(3))
    g = module.forget_gate(hidden)  # [B, T, H, D], <= 0, fp32
    beta = torch.sigmoid(module.b_proj(hidden))
    o = _core(module, q, k, v, g, beta, cache, recurrent_state)
    gate = module.g_b_proj(module.g_a_proj(hidden)).view(shape)
    out: Tensor = module.o_proj(module.o_norm(o, gate).reshape(B, T, -1))
    return out


# --------------------------------------------------------------------------------------
# Which layers, and the public functions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """A supported layer class: its model, the attributes its forward reads, the forward."""

    model: str
    classes: tuple[str, ...]
    attributes: tuple[str, ...]
    forward: Callable[..., Tensor]


_GDN = ("conv1d", "activation", "layer_idx", "conv_kernel_size", "A_log", "dt_bias", "norm")
_GDN_SIZES = ("key_dim", "value_dim", "head_k_dim", "head_v_dim", "out_proj")

_FAMILIES: tuple[_Family, ...] = (
    _Family(
        "Qwen3-Next",
        ("Qwen3NextGatedDeltaNet",),
        (*_GDN, *_GDN_SIZES, "in_proj_qkvz", "in_proj_ba", "fix_query_key_value_ordering"),
        _qwen3_next_forward,
    ),
    _Family(
        "Qwen3.5 (dense and MoE)",
        ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet"),
        (*_GDN, *_GDN_SIZES, "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
        _qwen3_5_forward,
    ),
    _Family(
        "Kimi Linear (KDA)",
        ("KimiLinearDeltaAttention",),
        (
            "conv1d",
            "activation",
            "layer_idx",
            "conv_kernel_size",
            "head_dim",
            "qkv_dim",
            "q_proj",
            "k_proj",
            "v_proj",
            "forget_gate",
            "b_proj",
            "g_a_proj",
            "g_b_proj",
            "o_norm",
            "o_proj",
        ),
        _kimi_forward,
    ),
)
_BY_CLASS = {cls: fam for fam in _FAMILIES for cls in fam.classes}

#: Model families :func:`accelerate` supports -> the layer classes it routes through attnkit.
SUPPORTED: dict[str, tuple[str, ...]] = {fam.model: fam.classes for fam in _FAMILIES}


def _supported_text() -> str:
    return "; ".join(f"{m} ({', '.join(c)})" for m, c in SUPPORTED.items())


def _check_layer(name: str, module: Any, fam: _Family) -> None:
    missing = [a for a in fam.attributes if not hasattr(module, a)]
    if missing:
        raise ValueError(
            f"attnkit.hf.accelerate: layer {name!r} ({type(module).__name__}) lacks {missing}: "
            "this transformers version's layer differs from the one attnkit supports "
            "(transformers >=5.23,<5.25)"
        )
    if module.activation not in ACTIVATIONS:
        raise ValueError(
            f"attnkit.hf.accelerate: layer {name!r} uses the conv activation "
            f"{module.activation!r}; attnkit's short convolution supports {list(ACTIVATIONS)}"
        )


def _make_forward(
    module: nn.Module, fam: _Family, device_types: tuple[str, ...]
) -> Callable[..., Tensor]:
    from transformers.integrations.accelerate import force_accelerate_hooks

    # The conv weight is read directly, not through conv1d's forward: fire accelerate's
    # offloading hooks around the call, as HF's own forward does.
    fast = force_accelerate_hooks("conv1d")(fam.forward)
    own = type(module).forward  # the class's forward (HF's decorators included)

    def forward(self: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or hidden_states.device.type not in device_types:
            out: Tensor = own(self, hidden_states, *args, **kwargs)
            return out
        if "cache_params" in kwargs:  # the deprecated name of HF's cache argument
            kwargs["cache"] = kwargs.pop("cache_params")
        out = fast(self, hidden_states, **kwargs)
        return out

    return forward


def is_accelerated(model: nn.Module) -> bool:
    """Whether any layer of ``model`` currently runs through attnkit."""
    return any(_MARK in m.__dict__ for m in model.modules())


def accelerate(model: nn.Module, *, device_types: tuple[str, ...] = ("cpu",)) -> nn.Module:
    """Route ``model``'s linear-attention layers through attnkit; returns ``model`` itself.

    Supported: Qwen3-Next, Qwen3.5 (dense and MoE) Gated DeltaNet layers and Kimi Linear
    KDA layers (see :data:`SUPPORTED`): their chunked prefill, their recurrent decoding
    with HF's cache and their short causal convolution. The other layers (softmax
    attention, MLPs, experts) are left as they are. Training works too (the attnkit
    ops have backward passes).

    Args:
        model: any ``nn.Module`` containing supported layers (a ``...ForCausalLM``,
            its inner model, or a single layer).
        device_types: the device types on which attnkit runs the layer (default CPU
            only: on a GPU the layer's own forward keeps fla's Triton kernels).

    Calling it again is a no-op for layers already accelerated. Undo with
    :func:`restore` or use :func:`accelerated` as a context manager.

    Raises ValueError listing the supported models when ``model`` has no supported
    layer, or when a supported layer's attributes do not match this transformers version.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(device_types, str) or not all(isinstance(d, str) for d in device_types):
        raise TypeError(f"device_types must be a tuple of str, got {device_types!r}")
    layers = [
        (name, m, _BY_CLASS[type(m).__name__])
        for name, m in model.named_modules()
        if type(m).__name__ in _BY_CLASS
    ]
    if not layers:
        raise ValueError(
            f"attnkit.hf.accelerate: {type(model).__name__} has no layer attnkit can run; "
            f"supported: {_supported_text()}. (For softmax attention in any model use "
            "attn_implementation='attnkit' after attnkit.hf.register().)"
        )
    for name, module, fam in layers:
        _check_layer(name, module, fam)
    for _, module, fam in layers:
        if _MARK in module.__dict__:
            continue
        module.__dict__[_MARK] = module.__dict__.get("forward")  # usually None
        module.forward = MethodType(_make_forward(module, fam, tuple(device_types)), module)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: every layer gets its own forward back; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if _MARK not in module.__dict__:
            continue
        previous = module.__dict__.pop(_MARK)
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    return model


@contextlib.contextmanager
def accelerated(
    model: nn.Module, *, device_types: tuple[str, ...] = ("cpu",)
) -> Iterator[nn.Module]:
    """``with accelerated(model): ...`` runs the block with :func:`accelerate` applied.

    Layers that were already accelerated before the block stay accelerated after it.
    """
    before = {id(m) for m in model.modules() if _MARK in m.__dict__}
    accelerate(model, device_types=device_types)
    try:
        yield model
    finally:
        for module in model.modules():
            if _MARK in module.__dict__ and id(module) not in before:
                restore(module)

r"""Gated DeltaNet and DeltaNet token mixers with a constant-size decoding state.

:class:`GatedDeltaNet` is the linear-attention layer of Qwen3-Next and Qwen3.5 (Yang et
al. 2024, "Gated Delta Networks"; its projections and output gate as in Qwen3.5)::

    [q, k, v] = silu(ShortConv(x W_qkv))       q, k: Hk heads of d_k; v: Hv heads of d_v
    beta = sigmoid(x W_b)                       [B, L, Hv], the write strength in (0, 1)
    g    = -exp(A_log) softplus(x W_a + dt_bias)  [B, L, Hv], log decay <= 0 (gated only)
    S_t  = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T   (q, k L2-normalised)
    o_t  = S_t^T q_t / sqrt(d_k)
    out  = (RMSNorm(o) * silu(x W_z)) W_o       RMSNorm over d_v, one weight for all heads

``gate=False`` drops g (a_t = 1): DeltaNet (Schlag et al. 2021; Yang et al. 2024),
which writes v_t at address k_t after erasing what was there, with no forgetting.
Each q/k head serves Hv / Hk consecutive value (state) heads, as in Qwen3-Next.

The short causal depthwise convolution (Arora et al. 2024; kernel 4 in Qwen3-Next) runs
on the concatenated q, k, v channels before the activation; ``conv_kernel=None`` drops
it (q, k, v are then silu(x W)). Decay initialisation follows Mamba (Gu & Dao 2023):
A in [1, 16], dt in [1e-3, 1e-1] log-uniformly with dt_bias = softplus^{-1}(dt).

Decoding (``forward(x, cache=...)``) keeps a :class:`~attnkit.layers.cache.DeltaState`:
the conv's last K - 1 inputs and the state S [B, Hv, d_k, d_v] (fp32): constant memory,
O(Hv d_k d_v) work per token (:func:`attnkit.delta_rule_step`). Prefill and any
multi-token call run the chunked :func:`attnkit.delta_rule_attention` from the cached
state; prefill + decode equals one full forward.

Shape legend::

    B batch, L tokens of this call, d d_model, Hv = n_heads value (state) heads,
    Hk = n_key_heads q/k heads, C = 2 Hk d_k + Hv d_v conv channels, K conv_kernel
    x [B, L, d] -> out [B, L, d]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._registry import Registry
from attnkit._validation import check_float, check_int, check_rank, check_tensor
from attnkit.layers.cache import DeltaState
from attnkit.ops.conv import causal_conv1d, causal_conv1d_update
from attnkit.ops.delta import delta_rule_attention, delta_rule_step

__all__ = ["MIXERS", "GatedDeltaNet", "mixers"]


class GatedDeltaNet(nn.Module):
    r"""Gated DeltaNet (``gate=True``) or DeltaNet (``gate=False``) token mixer.

    Args:
        d_model: model width d (input and output).
        n_heads: value (state) heads Hv.
        n_key_heads: q/k heads Hk, a divisor of Hv (default Hv): each serves Hv / Hk
            consecutive value heads (Qwen3-Next: 16 key heads, 32 value heads).
        d_k: q/k width per head (default d_model // n_heads).
        d_v: value width per head (default d_k).
        gate: the data-dependent decay g (Gated DeltaNet); False is DeltaNet.
        conv_kernel: width K of the short causal conv on q, k, v (None: no conv).
        output_gate: multiply the normalised output by silu(x W_z) (Qwen3-Next); False
            keeps RMSNorm(o) alone.
        norm_eps: RMSNorm epsilon.
        chunk_size: chunk length of the chunked prefill (None: the op's default).
        bias: biases in the projections (Qwen3-Next has none).

    See the module docstring for the equations and the shape legend.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_key_heads: int | None = None,
        d_k: int | None = None,
        d_v: int | None = None,
        *,
        gate: bool = True,
        conv_kernel: int | None = 4,
        output_gate: bool = True,
        norm_eps: float = 1e-6,
        chunk_size: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        d_model = check_int("d_model", d_model, 1)
        Hv = check_int("n_heads", n_heads, 1)
        Hk = Hv if n_key_heads is None else check_int("n_key_heads", n_key_heads, 1)
        if Hv % Hk != 0:
            raise ValueError(
                f"n_key_heads must divide n_heads (each q/k head serves n_heads / n_key_heads "
                f"value heads): got n_heads={Hv}, n_key_heads={Hk}"
            )
        if d_k is None:
            if d_model % Hv != 0:
                raise ValueError(
                    f"d_model={d_model} is not divisible by n_heads={Hv}; pass d_k explicitly"
                )
            d_k = d_model // Hv
        d_k = check_int("d_k", d_k, 1)
        d_v = d_k if d_v is None else check_int("d_v", d_v, 1)
        for name, flag in (("gate", gate), ("output_gate", output_gate), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        if conv_kernel is not None:
            conv_kernel = check_int("conv_kernel", conv_kernel, 1)
        if chunk_size is not None:
            chunk_size = check_int("chunk_size", chunk_size, 1)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or norm_eps <= 0:
            raise ValueError(f"norm_eps must be a float > 0, got {norm_eps!r}")

        self.d_model, self.n_heads, self.n_key_heads = d_model, Hv, Hk
        self.d_k, self.d_v = d_k, d_v
        self.gate, self.output_gate = gate, output_gate
        self.conv_kernel, self.chunk_size = conv_kernel, chunk_size
        self.key_dim, self.value_dim = Hk * d_k, Hv * d_v
        self.conv_dim = 2 * self.key_dim + self.value_dim

        self.qkv_proj = nn.Linear(d_model, self.conv_dim, bias=bias)
        self.b_proj = nn.Linear(d_model, Hv, bias=bias)
        self.conv: nn.Conv1d | None = None
        if conv_kernel is not None:
            # depthwise, no bias (as Qwen3-Next); run by attnkit.ops.conv, not by Conv1d
            self.conv = nn.Conv1d(
                self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=False
            )
        self.a_proj: nn.Linear | None = None
        if gate:
            self.a_proj = nn.Linear(d_model, Hv, bias=bias)
            self.A_log = nn.Parameter(torch.empty(Hv).uniform_(1.0, 16.0).log())
            dt = torch.exp(torch.empty(Hv).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.z_proj = nn.Linear(d_model, self.value_dim, bias=bias) if output_gate else None
        self.norm = nn.RMSNorm(d_v, eps=float(norm_eps))
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_key_heads={self.n_key_heads}, "
            f"d_k={self.d_k}, d_v={self.d_v}, gate={self.gate}, conv_kernel={self.conv_kernel}"
        )

    def new_cache(
        self,
        batch: int,
        *,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> DeltaState:
        """An empty (zero) :class:`DeltaState`: conv [B, C, K - 1], state [B, Hv, d_k, d_v]."""
        weight = self.qkv_proj.weight
        return DeltaState(
            batch,
            self.n_heads,
            self.d_k,
            self.d_v,
            self.conv_dim,
            self.conv_kernel,
            max_len=max_len,
            dtype=weight.dtype if dtype is None else dtype,
            device=weight.device if device is None else device,
        )

    def decay(self, x: Tensor) -> Tensor | None:
        """g = -exp(A_log) softplus(x W_a + dt_bias) [B, L, Hv] in fp32 (None for DeltaNet)."""
        if self.a_proj is None:
            return None
        a = self.a_proj(x).float()
        g: Tensor = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        return g

    def _mix(self, mixed: Tensor, cache: DeltaState | None) -> tuple[Tensor, Tensor | None]:
        """silu(ShortConv(mixed)) for mixed [B, L, C]; returns it and the new conv window."""
        if self.conv is None:
            return F.silu(mixed), None
        x = mixed.transpose(1, 2)  # [B, C, L] view of the projection's rows
        weight = self.conv.weight.squeeze(1)  # [C, K]
        grad = torch.is_grad_enabled() and (mixed.requires_grad or weight.requires_grad)
        if cache is not None and cache.conv is not None and x.shape[2] == 1 and not grad:
            window = cache.conv.clone()
            y = causal_conv1d_update(x, window, weight, None, "silu")  # rolls window in place
            return y.transpose(1, 2), window
        state = None if cache is None else cache.conv
        y, final = causal_conv1d(x, weight, None, "silu", state, cache is not None)
        return y.transpose(1, 2), final

    def forward(self, x: Tensor, cache: DeltaState | None = None) -> Tensor:
        """x [B, L, d] -> [B, L, d]; with ``cache`` the L tokens continue the cached sequence."""
        x = check_tensor("x", x)
        check_rank("x", x, "B L d_model")
        check_float("x", x)
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have last axis d_model={self.d_model}, got shape {list(x.shape)}"
            )
        B, L = x.shape[0], x.shape[1]
        if cache is not None:
            if not isinstance(cache, DeltaState):
                raise TypeError(
                    f"{type(self).__name__} decodes with a DeltaState (see new_cache()), got "
                    f"cache of type {type(cache).__name__}"
                )
            cache.check_batch(B, "x")
            cache.check_append(L)
        mixed, conv_window = self._mix(self.qkv_proj(x), cache)  # [B, L, C]
        kd, vd, Dk, Dv = self.key_dim, self.value_dim, self.d_k, self.d_v
        # [B, L, H, D] views -> the ops' [B, H, L, D] (transposed views, no copies)
        q = mixed[..., :kd].view(B, L, -1, Dk).transpose(1, 2)
        k = mixed[..., kd : 2 * kd].view(B, L, -1, Dk).transpose(1, 2)
        v = mixed[..., 2 * kd : 2 * kd + vd].view(B, L, -1, Dv).transpose(1, 2)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [B, Hv, L]
        g = self.decay(x)
        gh = None if g is None else g.transpose(1, 2)
        if cache is not None and L == 1:
            o, S = delta_rule_step(
                q, k, v, beta, gh, state=cache.state, use_qk_l2norm=True, enable_gqa=True
            )
        else:
            o, final = delta_rule_attention(
                q,
                k,
                v,
                beta,
                gh,
                use_qk_l2norm=True,
                initial_state=None if cache is None else cache.state,
                output_final_state=cache is not None,
                chunk_size=self.chunk_size,
                enable_gqa=True,
            )
            S = final if final is not None else q.new_empty(0)
        if cache is not None:
            cache.advance(conv_window, S, L)
        o = self.norm(o.transpose(1, 2))  # [B, L, Hv, d_v]
        if self.z_proj is not None:
            o = o * F.silu(self.z_proj(x).view(B, L, -1, Dv))
        out: Tensor = self.out_proj(o.reshape(B, L, vd))
        return out


def _gated(d_model: int, n_heads: int, n_key_heads: int | None, **options: Any) -> GatedDeltaNet:
    return GatedDeltaNet(d_model, n_heads, n_key_heads, gate=True, **options)


def _plain(d_model: int, n_heads: int, n_key_heads: int | None, **options: Any) -> GatedDeltaNet:
    return GatedDeltaNet(d_model, n_heads, n_key_heads, gate=False, **options)


#: Token mixers that replace multi-head attention in a :class:`attnkit.layers.Block`
#: (``TinyLM(backend=name)``): name -> builder(d_model, n_heads, n_key_heads, **options).
MIXERS: Registry[Any] = Registry("token mixer")
MIXERS.register("gated_deltanet")(_gated)
MIXERS.register("deltanet")(_plain)

#: The options a mixer accepts through ``backend_options`` (``conv_kernel`` comes from
#: the block's own ``conv_kernel``).
MIXER_OPTIONS: Mapping[str, Any] = {"chunk_size": None, "output_gate": True, "norm_eps": 1e-6}


def mixers() -> list[str]:
    """Names of the delta-rule token mixers (``TinyLM(backend=...)`` accepts them too)."""
    return MIXERS.names()

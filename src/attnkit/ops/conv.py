r"""Causal depthwise short convolution: the "short conv" before linear-attention layers.

Gated DeltaNet / Qwen3-Next, Mamba, H3, Based and Zoology run a causal depthwise
convolution of width K (usually 4) over the sequence before the q, k, v of a linear
attention (Arora et al. 2024; Yang et al. 2024)::

    y[b, c, t] = act(bias[c] + sum_{i < K} weight[c, i] · x[b, c, t - K + 1 + i])

with x[b, c, t] for t < 0 read from a state (the K - 1 inputs before this call; zeros
at the start of a sequence). One filter per channel, never a look into the future.

:func:`causal_conv1d` is the prefill (any number of tokens, optional incoming state,
optional final state); :func:`causal_conv1d_update` is the decoding step that reads
and rewrites a conv state in place (the signature of the ``causal-conv1d`` package and
of HF transformers' fallback); :func:`causal_conv1d_reference` is the plain
``F.conv1d`` formula beside them, which the tests pin both against.

Why not ``F.conv1d``? With thousands of channels and K = 4 the op does 2 K FLOPs per
element: it is bound by memory traffic, and torch's depthwise ``conv1d`` on a CPU runs
far below that bound (it also wants channels-first input, while the projections that
feed it produce [B, L, C] rows, so every call starts with a transposing copy). This
path computes K shifted multiply-adds over **time-major** [B, L, C] views (contiguous
channel rows, whatever the caller's [B, C, L] strides are) in **cache-sized tiles of
rows**, with the activation applied to the tile while it is still in cache, so each
input element is read about once from memory and each output written once.
Measured with ``python benchmarks/hf_qwen3_next.py`` (B = 1, C = 4096, L = 4096,
K = 4, fp32, silu).

Shape legend (the layout of ``nn.Conv1d`` and of the ``causal-conv1d`` package)::

    B batch, C channels, L new tokens, K kernel width, W state width (>= K - 1)
    x [B, C, L]        any strides; a transposed [B, L, C] tensor is the fast case
    weight [C, K]      bias [C]
    initial_state / conv_state [B, C, W]: the last W inputs before x (the last
                       K - 1 are used; HF's cache keeps W = K)
    y [B, C, L]        same memory layout as x, x's dtype
    final_state [B, C, K - 1]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._validation import check_float, check_rank, check_tensor

__all__ = [
    "ACTIVATIONS",
    "CPU_TILE_BYTES",
    "causal_conv1d",
    "causal_conv1d_reference",
    "causal_conv1d_update",
]

#: Activations accepted by name ("swish" is silu's other name, as in HF and causal-conv1d).
ACTIVATIONS: tuple[str, ...] = ("silu", "swish")

#: Bytes of input rows per CPU tile. Within a tile the K shifted reads, the output writes
#: and the activation hit the last-level cache instead of memory. Measured on the 2-core
#: reference machine (B = 1, C = 4096, L = 4096, fp32, silu; two runs while other jobs
#: kept both cores busy): with 1 thread every budget from 1 to 16 MiB was within 1.2x
#: of the best and 1.3-1.5x faster than no tiling; with 2 threads budgets below 4 MiB
#: were 1.5-4x slower than 16 MiB (each small op's OpenMP barrier waits for the busy
#: core), 16 MiB matched no tiling. 16 MiB (1024 rows at C = 4096) is the robust pick.
CPU_TILE_BYTES = 16 << 20


def _check_activation(activation: object) -> bool:
    """True for silu, False for none; anything else raises naming the argument."""
    if activation is None:
        return False
    if activation in ACTIVATIONS:
        return True
    raise ValueError(f"activation must be None or one of {list(ACTIVATIONS)}, got {activation!r}")


def _check_args(
    x: object,
    weight: object,
    bias: object,
    state: object,
    state_name: str,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    x = check_tensor("x", x)
    check_rank("x", x, "B C L")
    check_float("x", x)
    weight = check_tensor("weight", weight)
    check_float("weight", weight)
    B, C, _ = x.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(
            f"weight must have shape [C, K] = [{C}, K] with K >= 1 (one filter per channel of "
            f"x [B, C, L]), got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device ({x.device}), got {weight.device}")
    K = weight.shape[1]
    b: Tensor | None = None
    if bias is not None:
        b = check_tensor("bias", bias)
        check_float("bias", b)
        if tuple(b.shape) != (C,):
            raise ValueError(f"bias must have shape [C] = [{C}], got {tuple(b.shape)}")
        if b.device != x.device:
            raise ValueError(f"bias must be on x's device ({x.device}), got {b.device}")
    s: Tensor | None = None
    if state is not None:
        s = check_tensor(state_name, state)
        check_float(state_name, s)
        if s.dim() != 3 or s.shape[0] != B or s.shape[1] != C or s.shape[2] < K - 1:
            raise ValueError(
                f"{state_name} must have shape [B, C, W] = [{B}, {C}, W] with W >= K - 1 = "
                f"{K - 1} (the last inputs before x), got {tuple(s.shape)}"
            )
        if s.device != x.device:
            raise ValueError(f"{state_name} must be on x's device ({x.device}), got {s.device}")
    return x, weight, b, s


def _acc_dtype(x: Tensor) -> torch.dtype:
    # fp16/bf16 inputs are summed in fp32 (as the causal-conv1d kernels do); fp64 stays fp64.
    return torch.promote_types(x.dtype, torch.float32)


def _history(state: Tensor | None, x: Tensor, K: int) -> Tensor:
    """The K - 1 inputs before x, time-major [B, K - 1, C] (zeros without a state)."""
    B, C, _ = x.shape
    if state is None:
        return x.new_zeros(B, K - 1, C)
    return state[:, :, state.shape[2] - (K - 1) :].transpose(1, 2)


def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Plain ``F.conv1d`` causal depthwise convolution: the reference of :func:`causal_conv1d`.

    Pads x on the left with the state (or zeros) and runs ``F.conv1d(groups=C)`` in the
    accumulation dtype (fp32 for half inputs). Same arguments, shapes and results as
    :func:`causal_conv1d` (see the module docstring's shape legend); the output is
    contiguous channels-first.
    """
    x, weight, bias, state = _check_args(x, weight, bias, initial_state, "initial_state")
    silu = _check_activation(activation)
    B, C, L = x.shape
    K = weight.shape[1]
    acc = _acc_dtype(x)
    hist = _history(state, x, K).transpose(1, 2).to(acc)  # [B, C, K-1]
    full = torch.cat([hist, x.to(acc)], dim=2)  # [B, C, K-1+L]
    if L == 0:  # F.conv1d refuses an input shorter than the kernel
        y = full.new_zeros(B, C, 0)
    else:
        b = None if bias is None else bias.to(acc)
        y = F.conv1d(full, weight.to(acc).unsqueeze(1), b, groups=C)
    if silu:
        y = F.silu(y)
    final = full[:, :, full.shape[2] - (K - 1) :].to(x.dtype) if output_final_state else None
    return y.to(x.dtype), final


def _tile_rows(x: Tensor, K: int) -> int:
    """Rows per tile: all of them off-CPU; about CPU_TILE_BYTES of input rows on a CPU."""
    L = x.shape[2]
    if x.device.type != "cpu":
        return max(L, 1)
    row_bytes = x.shape[0] * x.shape[1] * _acc_dtype(x).itemsize
    return max(K, 8, CPU_TILE_BYTES // max(row_bytes, 1))


def _conv_no_grad(
    x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, hist: Tensor
) -> Tensor:
    """The tiled in-place forward (no autograd): y [B, C, L] in x's layout and dtype."""
    B, C, L = x.shape
    K = weight.shape[1]
    acc = _acc_dtype(x)
    wt = weight.t().to(acc).contiguous()  # [K, C]: tap i of every channel is one row
    b = None if bias is None else bias.to(acc)
    y = torch.empty_like(x)  # keeps x's strides: channels-last in, channels-last out
    xt, yt = x.transpose(1, 2), y.transpose(1, 2)  # time-major views [B, L, C]
    same = acc == x.dtype
    T = _tile_rows(x, K)
    for t0 in range(0, L, T):
        t1 = min(L, t0 + T)
        # The tile's inputs with their K - 1 predecessors: [B, K-1 + n, C]; a view of x
        # except for the first tile(s), which read the history.
        if t0 >= K - 1:
            win = xt[:, t0 - (K - 1) : t1]
        else:
            win = torch.cat([hist[:, t0:], xt[:, :t1]], dim=1)
        if not same:
            win = win.to(acc)
        n = t1 - t0
        out = yt[:, t0:t1] if same else torch.empty(B, n, C, dtype=acc, device=x.device)
        last = win[:, K - 1 :]
        if b is None:
            torch.mul(last, wt[K - 1], out=out)
        else:
            torch.addcmul(b, last, wt[K - 1], out=out)
        for i in range(K - 1):
            out.addcmul_(win[:, i : i + n], wt[i])
        if silu:
            F.silu(out, inplace=True)
        if not same:
            yt[:, t0:t1].copy_(out)
    return y


def _conv_autograd(
    x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, hist: Tensor
) -> Tensor:
    """The same K shifted multiply-adds out of place, so autograd differentiates them."""
    L = x.shape[2]
    K = weight.shape[1]
    acc = _acc_dtype(x)
    win = torch.cat([hist.to(acc), x.transpose(1, 2).to(acc)], dim=1)  # [B, K-1+L, C]
    w = weight.to(acc)
    y = win[:, K - 1 :] * w[:, K - 1]
    for i in range(K - 1):
        y = y + win[:, i : i + L] * w[:, i]
    if bias is not None:
        y = y + bias.to(acc)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).transpose(1, 2)  # [B, C, L]


def _final_state(x: Tensor, hist: Tensor, K: int) -> Tensor:
    """The last K - 1 inputs of [history, x] as a contiguous [B, C, K - 1] in x's dtype."""
    L = x.shape[2]
    if L >= K - 1:
        return x[:, :, L - (K - 1) :].contiguous()
    return torch.cat([hist.transpose(1, 2)[:, :, L:].to(x.dtype), x], dim=2).contiguous()


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    r"""Causal depthwise convolution over the sequence; returns ``(y, final_state)``.

    ::

        y[b, c, t] = act(bias[c] + sum_{i < K} weight[c, i] · x[b, c, t - K + 1 + i])

    where x at t < 0 is the last K - 1 columns of ``initial_state`` (zeros when None):
    splitting a sequence anywhere and passing ``final_state`` on gives the same outputs
    as one call.

    Args:
        x: [B, C, L] input (any strides; fastest when it is a transposed [B, L, C]
            tensor, the layout a linear projection produces).
        weight: [C, K] filters (``nn.Conv1d(C, C, K, groups=C).weight.squeeze(1)``).
        bias: [C] or None.
        activation: None or ``"silu"`` / ``"swish"`` (applied after the bias).
        initial_state: [B, C, W] with W >= K - 1: the inputs before x (its last K - 1
            columns are used), or None for the start of a sequence.
        output_final_state: also return the last K - 1 inputs, [B, C, K - 1].

    Returns:
        y [B, C, L] in x's dtype and memory layout (channels-last in, channels-last
        out), and the final state or None. fp16/bf16 inputs are summed in fp32.

    Without autograd (inference) the work runs in place over cache-sized tiles of
    rows; when x, weight, bias or the state requires grad, the same shifted
    multiply-adds run out of place and autograd differentiates them. Both equal
    :func:`causal_conv1d_reference` (``F.conv1d``), which the tests check.
    """
    x, weight, bias, state = _check_args(x, weight, bias, initial_state, "initial_state")
    silu = _check_activation(activation)
    if not isinstance(output_final_state, bool):
        raise TypeError(
            f"output_final_state must be a bool, got {type(output_final_state).__name__}"
        )
    K = weight.shape[1]
    hist = _history(state, x, K)  # [B, K-1, C]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, state)
    )
    if needs_grad:
        y = _conv_autograd(x, weight, bias, silu, hist)
    else:
        y = _conv_no_grad(x, weight, bias, silu, hist)
    final = _final_state(x, hist, K) if output_final_state else None
    return y, final


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    r"""Decode L new tokens from a conv state, which is **rewritten in place**.

    ``conv_state`` [B, C, W] (W >= K - 1) holds the last W inputs; afterwards it holds
    the last W inputs including x's, so its storage (and address, which CUDA graphs
    and HF's static caches rely on) is kept. Returns y [B, C, L], equal to
    ``causal_conv1d(x, ..., initial_state=conv_state)``. The signature and in-place
    contract are those of ``causal_conv1d_update`` in the ``causal-conv1d`` package
    and in HF transformers' Qwen3-Next / Qwen3.5 fallback.

    Not differentiable with respect to ``conv_state`` (it is overwritten); use
    :func:`causal_conv1d` with ``initial_state`` for training.
    """
    x, weight, bias, state = _check_args(x, weight, bias, conv_state, "conv_state")
    silu = _check_activation(activation)
    if state is None:  # pragma: no cover - _check_args returns the tensor it was given
        raise TypeError("conv_state must be a torch.Tensor, got None")
    L = x.shape[2]
    K, W = weight.shape[1], state.shape[2]
    acc = _acc_dtype(x)
    # [B, C, W + L]: the stored inputs, then the new ones (small: W + L columns).
    full = torch.cat([state.to(acc), x.to(acc)], dim=2)
    win = full[:, :, W - (K - 1) :]  # [B, C, K-1 + L]
    w = weight.to(acc)
    if L == 1:
        # One token: y = <window, w> per channel, a single fused reduction.
        y: Tensor = torch.linalg.vecdot(win, w.unsqueeze(0)).unsqueeze(2)  # [B, C, 1]
    else:
        y = win[:, :, K - 1 :] * w[:, K - 1 :]
        for i in range(K - 1):
            y = y + win[:, :, i : i + L] * w[:, i : i + 1]
    if bias is not None:
        y = y + bias.to(acc).unsqueeze(1)
    if silu:
        y = F.silu(y)
    with torch.no_grad():
        state.copy_(full[:, :, L:])
    return y.to(x.dtype)

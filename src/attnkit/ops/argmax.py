"""Argmax ("hard") attention and its trainable relaxations.

Argmax attention returns, for each query, the value of the key with the largest
score ``scale · q·k``. Worked example (one head, E = Ev = 3)::

    keys    (1,2,0) (0,3,4) (5,0,0) (0,0,1)
    values  (2,0,1) (1,4,3) (0,-1,4) (1,0,-1)
    query   (1,1,2)  ->  scores (3, 11, 5, 2)  ->  output (1,4,3)

Its output is piecewise constant in q and k, so their gradient is zero almost
everywhere and only the selected value row receives gradient. The modes, chosen
by name from a registry:

- ``"hard"``: one-hot of the argmax; q and k get exactly-zero gradients.
- ``"straight_through"``: hard forward, gradient of softmax(scores / tau) backward
  (Bengio et al. 2013, "Estimating or propagating gradients through stochastic neurons").
- ``"gumbel"``: softmax((scores + g) / tau), g ~ Gumbel(0, 1) (Jang et al. 2017;
  Maddison et al. 2017).
- ``"gumbel_hard"``: one-hot of argmax(scores + g) forward, Gumbel-softmax backward.
- ``"softmax"``: softmax(scores / tau); tends to ``"hard"`` as tau -> 0.

Shape legend (PyTorch's SDPA layout)::

    q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev], out [B, H, L, Ev]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Generator, Tensor

from attnkit._contract import contract
from attnkit._registry import Registry
from attnkit.ops.softmax import (
    SCORES,
    VALUES,
    CausalAlignment,
    check_attention_inputs,
    combine_masks,
    group_heads,
    masked_softmax,
)

__all__ = ["ARGMAX_MODES", "CONTRACTIONS", "ArgmaxMode", "argmax_attention", "modes"]

#: The contractions of :func:`argmax_attention`: softmax's scores and values, unchanged.
CONTRACTIONS = (SCORES, VALUES)

# (scores [..., S] with -inf at masked keys, tau, generator) -> weights [..., S]
ArgmaxMode = Callable[[Tensor, float, Generator | None], Tensor]

_MODES: Registry[ArgmaxMode] = Registry("argmax mode")


class _HardSelect(torch.autograd.Function):
    """One-hot of the argmax along the last axis; its gradient is exactly zero.

    ``torch.argmax`` returns the *first* maximal index, so ties go to the lowest key.
    Returning zeros (not None) from backward keeps q and k in the graph, so their
    ``.grad`` is a zero tensor, which is the true gradient almost everywhere.
    """

    @staticmethod
    def forward(ctx: Any, scores: Tensor) -> Tensor:
        return _one_hot_argmax(scores)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.zeros_like(grad)


def _one_hot_argmax(scores: Tensor) -> Tensor:
    index = scores.argmax(dim=-1, keepdim=True)  # first maximal index on ties
    return torch.zeros_like(scores).scatter_(-1, index, 1.0)


def _gumbel_noise(scores: Tensor, generator: Generator | None) -> Tensor:
    """Gumbel(0, 1) noise shaped like ``scores``: -log(-log(U)), U ~ Uniform(0, 1)."""
    u = torch.rand(scores.shape, generator=generator, dtype=scores.dtype, device=scores.device)
    # rand is in [0, 1): lift 0 to the smallest normal number so the noise stays finite.
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


def _straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    # (soft - soft.detach()) is exactly 0 in the forward, so the output equals `hard`
    # bit for bit, while the backward sees d soft.
    return hard + (soft - soft.detach())


@_MODES.register("hard")
def _hard(scores: Tensor, tau: float, generator: Generator | None) -> Tensor:
    onehot: Tensor = _HardSelect.apply(scores)  # type: ignore[no-untyped-call]
    return onehot


@_MODES.register("straight_through")
def _straight_through_mode(scores: Tensor, tau: float, generator: Generator | None) -> Tensor:
    return _straight_through(_one_hot_argmax(scores.detach()), masked_softmax(scores / tau))


@_MODES.register("gumbel")
def _gumbel(scores: Tensor, tau: float, generator: Generator | None) -> Tensor:
    return masked_softmax((scores + _gumbel_noise(scores, generator)) / tau)


@_MODES.register("gumbel_hard")
def _gumbel_hard(scores: Tensor, tau: float, generator: Generator | None) -> Tensor:
    perturbed = scores + _gumbel_noise(scores, generator)
    return _straight_through(_one_hot_argmax(perturbed.detach()), masked_softmax(perturbed / tau))


@_MODES.register("softmax")
def _softmax(scores: Tensor, tau: float, generator: Generator | None) -> Tensor:
    return masked_softmax(scores / tau)


ARGMAX_MODES: tuple[str, ...] = tuple(_MODES.names())


def modes() -> tuple[str, ...]:
    """Names accepted by ``argmax_attention(mode=...)``."""
    return ARGMAX_MODES


def argmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    mode: str = "hard",
    tau: float = 1.0,
    generator: Generator | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    causal_alignment: CausalAlignment = "upper_left",
) -> Tensor:
    """Attention that picks one key per query (or a relaxation of that choice).

    scores = scale · q kᵀ (``scale = 1/sqrt(E)`` by default; it must be finite and
    > 0: a positive scale does not change the argmax but does set the softmax
    sharpness with ``tau``, a negative one would silently turn argmax into argmin), masked
    like :func:`attnkit.ops.softmax.sdpa`: bool ``attn_mask`` True = attend, a float
    one is added, ``is_causal`` may be combined with it, and ``causal_alignment``
    (``"upper_left"`` or ``"lower_right"``) means what it means there. Masked keys are
    never chosen; a query with no attendable key outputs 0. A float mask is part of
    the scores, so the modes that divide by ``tau`` divide it too.

    ``mode`` (see :data:`ARGMAX_MODES`):

    - ``"hard"``: the value of the highest-scoring key. Ties go to the lowest key
      index (``torch.argmax`` returns the first maximal index). q and k receive
      exactly-zero gradients; v receives ``onehotᵀ · grad_out``, i.e. only the
      selected rows.
    - ``"straight_through"``: hard forward, backward of softmax(scores / tau).
    - ``"gumbel"``: softmax((scores + g) / tau) with g ~ Gumbel(0, 1) drawn from
      ``generator`` (same seed, same output).
    - ``"gumbel_hard"``: one-hot of argmax(scores + g) forward (the output rows are
      exactly rows of v), Gumbel-softmax backward.
    - ``"softmax"``: softmax(scores / tau), which tends to ``"hard"`` as tau -> 0.

    ``tau`` must be > 0 (it is unused by ``"hard"`` but still checked). Half inputs
    compute scores and weights in float32; the output has q's dtype.

    Non-finite values: a query whose scores contain NaN (NaN in q, or in a key it may
    attend) outputs NaN in every mode, rather than the value of whichever key
    ``argmax`` happens to report for a NaN row. NaN in v reaches every row (the
    weights, one-hot or masked, multiply every value row, and 0 * NaN is NaN), as in
    torch's SDPA. Finite inputs give finite outputs.

    Shapes::

        B batch, H query heads, Hk key/value heads (H % Hk == 0 with enable_gqa),
        G = H // Hk, L query length, S key length, E key width, Ev value width
        q [B, H, L, E], k [B, Hk, S, E], v [B, Hk, S, Ev]
        attn_mask broadcastable to [B, H, L, S]
        returns [B, H, L, Ev]
    """
    dims, mask = check_attention_inputs(
        q, k, v, attn_mask, enable_gqa=enable_gqa, causal_alignment=causal_alignment
    )
    select = _MODES.get(mode)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if not tau > 0 or not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    if generator is not None and not isinstance(generator, Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"scale must be a finite number > 0, got {scale}: a negative scale turns the "
                "argmax into an argmin, and 0 makes every key tie"
            )

    B, H, Hk, L, S, E, G = dims.B, dims.H, dims.Hk, dims.L, dims.S, dims.E, dims.group_size
    acc = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 compute in fp32
    scale = 1.0 / math.sqrt(E) if scale is None else scale

    qg = q.to(acc).reshape(B, Hk, G, L, E)  # query head h = hk * G + g
    # The same two contractions as softmax.sdpa_reference (attnkit.cost counts them).
    scores = scale * contract(SCORES, qg, k.to(acc))  # [B, Hk, G, L, S]
    mask = combine_masks(mask, is_causal, L, S, causal_alignment, q.device)
    if mask is not None:
        mask = group_heads(mask, Hk, G)  # broadcastable to [B, Hk, G, L, S]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(acc)

    weights = select(scores, float(tau), generator)  # [B, Hk, G, L, S]
    # A query with no attendable key outputs 0 (argmax of an all -inf row would be key 0).
    attendable = (scores > float("-inf")).any(dim=-1, keepdim=True)
    weights = torch.where(attendable, weights, 0.0)
    # argmax reports some index for a row with NaN scores; make the row NaN instead.
    weights = torch.where(torch.isnan(scores).any(dim=-1, keepdim=True), float("nan"), weights)
    out = contract(VALUES, weights, v.to(acc))  # [B, Hk, G, L, Ev]
    return out.reshape(B, H, L, dims.Ev).to(q.dtype)

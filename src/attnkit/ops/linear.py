"""Linearized attention with explicit feature maps, equation (6).

When a similarity factors as sim(q, k) = phi(q) . phi(k) (Katharopoulos et al. 2020),
the sums over keys in equation (4) can be taken *before* the query is seen::

    V'_i = phi(Q_i) (sum_j phi(K_j)^T V_j) / phi(Q_i) (sum_j phi(K_j)^T)      (6)
         = phi(Q_i) S / phi(Q_i) . z,    S = sum_j phi(K_j)^T V_j [D', Ev],  z = sum_j phi(K_j) [D']

Three forms of the same sum, all returning ``(output, state)`` with the state
``(S, z)`` that lets a sequence be continued:

- non-causal: S, z over all keys once;
- causal, chunked: the sums become prefix sums; within a chunk of C tokens they are
  a small masked [C, C] matmul, across chunks a running state (the form that is fast
  on real hardware);
- causal, recurrent: :func:`linear_attention_step`, one token at a time, for decoding.

The plain O(L S) reference is :func:`attnkit.ops.kernel.kernel_attention` with
``sim="linear"``; the tests pin every form to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._contract import Contraction, contract
from attnkit._validation import QKVDims, check_choice, check_qkv, check_tensor
from attnkit.feature_maps import FeatureMap, resolve
from attnkit.ops import linear_chunked as _linear_chunked
from attnkit.ops._guards import check_feature_shape, finish, normalise
from attnkit.ops.linear_chunked import causal_linear_attention

__all__ = [
    "CHUNK_DENOMINATOR",
    "CHUNK_INTER",
    "CHUNK_INTRA",
    "CHUNK_SCORES",
    "CHUNK_STATES",
    "CONTRACTIONS",
    "DENOMINATOR",
    "IMPLEMENTATIONS",
    "MAX_AUTO_CHUNK",
    "MIN_AUTO_CHUNK",
    "NUMERATOR",
    "STATE",
    "STEP_DENOMINATOR",
    "STEP_NUMERATOR",
    "LinearAttentionState",
    "auto_chunk_size",
    "linear_attention",
    "linear_attention_step",
]

#: Bounds of the automatic chunk length (see :func:`auto_chunk_size`): below 32 the
#: batched matmuls are too small to run near peak, above 128 the wasted upper triangle
#: of the intra-chunk products dominates (measured: C = 256 is 1.5-2.0x slower).
MIN_AUTO_CHUNK, MAX_AUTO_CHUNK = 32, 128


def auto_chunk_size(L: int, d_feature: int, d_value: int) -> int:
    """The chunk length C that ``chunk_size=None`` picks for L tokens, D' features, M values.

    Per token the causal chunked form does 2 C (D' + M') FLOPs inside its chunk (two
    masked [C, C] products) and 4 D' M' across chunks (state update and read), with
    M' = M + 1 (the fast path carries the denominator as an extra value column).
    Smaller chunks do fewer FLOPs but in smaller, less efficient matmuls. The rule:
    the largest power of two C <= C* = 2 D' M' / (D' + M'), i.e. the longest chunk
    whose intra-chunk work does not exceed the inter-chunk work (so the quadratic
    part at most doubles the linear one), clamped to [32, 128] and capped at L.

    Measured with ``python benchmarks/chunk_size.py`` (the tiled fast path, 2-core
    CPU, fp32, B=1, H=8, M=64, medians of interleaved rounds; two runs): the pick is
    within 1.00-1.07x of the fastest chunk for elu (D' = 64, C = 64; forward N = 4096
    and 16384, forward + backward N = 16384, where C = 32 is fastest), Taylor at D = 16
    (D' = 153, C = 64; forward N = 4096, forward + backward N = 8192) and FAVOR+ with
    256 features (C = 64; forward N = 4096), while C = 128 is 1.11-1.24x and C = 256
    1.5-2.0x slower.
    """
    m = d_value + 1
    balance = 2.0 * d_feature * m / max(1, d_feature + m)
    c = 1 << math.floor(math.log2(max(balance, 1.0)))
    return max(1, min(L, max(MIN_AUTO_CHUNK, min(MAX_AUTO_CHUNK, c))))


# ---- the contractions of this module (read by attnkit.cost) ---------------------------------
# Letters: b = B, h = Hk (key/value heads), g = H/Hk query heads per key/value head,
# l = L, s = S, d = Dp (feature width D'), m = Ev, c = C (chunk length), n = L/C chunks.
_HEADS = {"b": "B", "h": "Hk"}
_GROUPS = {**_HEADS, "g": "H/Hk"}
_CHUNKS = {**_HEADS, "n": "L/C", "c": "C"}

#: Non-causal state sum_j phi(K_j)^T V_j: fk [B, Hk, S, D'] · v [B, Hk, S, Ev] -> [B, Hk, D', Ev]
STATE = Contraction(
    "state", "bhsd,bhsm->bhdm", ("fk", "v"), "kv", {**_HEADS, "s": "S", "d": "Dp", "m": "Ev"}
)
#: Numerator phi(Q_i) S: fq [B, Hk, G, L, D'] · S [B, Hk, D', Ev] -> [B, Hk, G, L, Ev]
NUMERATOR = Contraction(
    "numerator",
    "bhgld,bhdm->bhglm",
    ("fq", "S"),
    "num",
    {**_GROUPS, "l": "L", "d": "Dp", "m": "Ev"},
)
#: Denominator phi(Q_i) . z: fq [B, Hk, G, L, D'] · z [B, Hk, D'] -> [B, Hk, G, L]
DENOMINATOR = Contraction(
    "denominator", "bhgld,bhd->bhgl", ("fq", "z"), "den", {**_GROUPS, "l": "L", "d": "Dp"}
)
#: Causal, per chunk: phi(K_c)^T V_c -> [B, Hk, n, D', Ev]
CHUNK_STATES = Contraction(
    "chunk_states", "bhncd,bhncm->bhndm", ("fk", "v"), "kv", {**_CHUNKS, "d": "Dp", "m": "Ev"}
)
#: Causal, intra-chunk similarities phi(Q_c) phi(K_c)^T -> [B, Hk, G, n, C, C] (then masked)
CHUNK_SCORES = Contraction(
    "chunk_scores",
    "bhgncd,bhnsd->bhgncs",
    ("fq", "fk"),
    "A_raw",
    {**_CHUNKS, "g": "H/Hk", "s": "C", "d": "Dp"},
)
#: Causal, inter-chunk numerator phi(Q_c) S_prev[c] -> [B, Hk, G, n, C, Ev]
CHUNK_INTER = Contraction(
    "chunk_inter",
    "bhgncd,bhndm->bhgncm",
    ("fq", "S_prev"),
    "num_inter",
    {**_CHUNKS, "g": "H/Hk", "d": "Dp", "m": "Ev"},
)
#: Causal, intra-chunk numerator tril(A) V_c -> [B, Hk, G, n, C, Ev]
CHUNK_INTRA = Contraction(
    "chunk_intra",
    "bhgncs,bhnsm->bhgncm",
    ("A", "v"),
    "num_intra",
    {**_CHUNKS, "g": "H/Hk", "s": "C", "m": "Ev"},
)
#: Causal, inter-chunk denominator phi(Q_c) . z_prev[c] -> [B, Hk, G, n, C]
CHUNK_DENOMINATOR = Contraction(
    "chunk_denominator",
    "bhgncd,bhnd->bhgnc",
    ("fq", "z_prev"),
    "den_inter",
    {**_CHUNKS, "g": "H/Hk", "d": "Dp"},
)
#: Recurrent step: phi(q) S' -> [B, Hk, G, Ev] and phi(q) . z' -> [B, Hk, G]
STEP_NUMERATOR = Contraction(
    "step_numerator", "bhgd,bhdm->bhgm", ("fq", "S"), "num", {**_GROUPS, "d": "Dp", "m": "Ev"}
)
STEP_DENOMINATOR = Contraction(
    "step_denominator", "bhgd,bhd->bhg", ("fq", "z"), "den", {**_GROUPS, "d": "Dp"}
)
#: Every contraction of this module: non-causal, causal chunked, recurrent step.
CONTRACTIONS: tuple[Contraction, ...] = (
    STATE,
    NUMERATOR,
    DENOMINATOR,
    CHUNK_STATES,
    CHUNK_SCORES,
    CHUNK_INTER,
    CHUNK_INTRA,
    CHUNK_DENOMINATOR,
    STEP_NUMERATOR,
    STEP_DENOMINATOR,
)


class LinearAttentionState(NamedTuple):
    """Recurrent state of linear attention, in the accumulation dtype.

    ``S [B, Hk, D', Ev]`` = sum_j phi(K_j)^T V_j and ``z [B, Hk, D']`` = sum_j phi(K_j)
    over the keys seen so far. fp32 for fp16, bf16 and fp32 inputs; fp64 for fp64
    inputs (so float64 checks stay exact).
    """

    S: Tensor
    z: Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half inputs accumulate in fp32: S and z grow with the sequence length.
    return torch.promote_types(dtype, torch.float32)


def _check_eps(eps: object) -> float | None:
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be None or a finite float > 0, got {eps!r}")
    return float(eps)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _features(
    fn: Callable[[Tensor], Tensor], phi: FeatureMap, name: str, x: Tensor, acc: torch.dtype, Dp: int
) -> Tensor:
    """phi(x) computed in the accumulation dtype: [..., E] -> [..., D']; checks its shape."""
    f = fn(x.to(acc))
    check_feature_shape(phi, name, x, f, Dp)
    return f.to(acc)


def _check_state(
    name: str,
    state: object,
    dims: QKVDims,
    d_feat: int,
    phi: FeatureMap,
    device: torch.device,
    acc: torch.dtype,
) -> LinearAttentionState:
    """Validate a state (S, z) against [B, Hk, D', Ev] and [B, Hk, D']; cast up to ``acc``.

    A state in a narrower dtype (fp16, bf16) is upcast losslessly; one in a wider dtype
    than ``acc`` (fp64 with fp32 accumulation) raises TypeError instead of being
    silently rounded.
    """
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(
            f"{name} must be a LinearAttentionState or a tuple (S, z), got {type(state).__name__}"
            + (f" of length {len(state)}" if isinstance(state, tuple) else "")
        )
    S = check_tensor(f"{name}.S", state[0])
    z = check_tensor(f"{name}.z", state[1])
    where = f"D' = {type(phi).__name__}.out_dim(E={dims.E}) = {d_feat}"
    want_S = (dims.B, dims.Hk, d_feat, dims.Ev)
    want_z = (dims.B, dims.Hk, d_feat)
    if tuple(S.shape) != want_S:
        raise ValueError(
            f"{name}.S must have shape [B, Hk, D', Ev] = {list(want_S)} ({where}), "
            f"got {tuple(S.shape)}"
        )
    if tuple(z.shape) != want_z:
        raise ValueError(
            f"{name}.z must have shape [B, Hk, D'] = {list(want_z)} ({where}), got {tuple(z.shape)}"
        )
    for part, t in (("S", S), ("z", z)):
        if not t.is_floating_point():
            raise TypeError(f"{name}.{part} must have a floating dtype, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}.{part} must be on q's device {device}, got {t.device}")
        if torch.promote_types(t.dtype, acc) != acc:
            raise TypeError(
                f"{name}.{part} has dtype {t.dtype}, wider than the accumulation dtype {acc} "
                f"of these inputs; it would be rounded down. Cast the state explicitly "
                f"({name}.{part}.to({acc})) or pass inputs of dtype {t.dtype}"
            )
    return LinearAttentionState(S.to(acc), z.to(acc))


def _check_chunk_size(chunk_size: object, L: int, d_feature: int, d_value: int) -> int:
    if chunk_size is None:
        return auto_chunk_size(L, d_feature, d_value)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    return chunk_size


def _causal_chunked(
    fq: Tensor,
    fk: Tensor,
    v: Tensor,
    state: LinearAttentionState,
    chunk: int,
    normalize: bool,
    eps: float | None,
    phi: FeatureMap,
) -> tuple[Tensor, LinearAttentionState]:
    """Causal prefix sums of equation (6), chunk by chunk.

    fq [B, Hk, G, L, D'], fk [B, Hk, L, D'], v [B, Hk, L, Ev] (already in the
    accumulation dtype); returns o [B, Hk, G, L, Ev] (normalised by the checked
    denominators when ``normalize``; ``phi`` only names the map in an error) and the
    final state.
    """
    B, Hk, G, L, Dp = fq.shape
    Ev = v.shape[-1]
    C = chunk
    n = max(1, -(-L // C))  # number of chunks (one empty chunk when L == 0)
    pad = n * C - L
    if pad:
        # Zero rows *after* phi (phi(0) != 0 for elu+1): padded keys then add nothing.
        fq = F.pad(fq, (0, 0, 0, pad))
        fk = F.pad(fk, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    qc = fq.reshape(B, Hk, G, n, C, Dp)
    kc = fk.reshape(B, Hk, n, C, Dp)
    vc = v.reshape(B, Hk, n, C, Ev)

    # Per-chunk sums, then the exclusive prefix over chunks plus the initial state:
    # S_prev[c] = S0 + sum_{c' < c} phi(K_c')^T V_c'.
    kv = contract(CHUNK_STATES, kc, vc)  # [B, Hk, n, D', Ev]
    kz = kc.sum(dim=-2)  # [B, Hk, n, D']
    S_prev = torch.cat([state.S.unsqueeze(2), kv[:, :, :-1]], dim=2).cumsum(dim=2)
    z_prev = torch.cat([state.z.unsqueeze(2), kz[:, :, :-1]], dim=2).cumsum(dim=2)
    final = LinearAttentionState(S_prev[:, :, -1] + kv[:, :, -1], z_prev[:, :, -1] + kz[:, :, -1])

    # Intra-chunk: tril(phi(Qc) phi(Kc)^T) Vc, diagonal included (a token sees itself).
    tri = torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
    A = contract(CHUNK_SCORES, qc, kc).masked_fill(~tri, 0.0)
    num = contract(CHUNK_INTER, qc, S_prev)  # inter-chunk
    num = num + contract(CHUNK_INTRA, A, vc)  # intra-chunk
    o = num.reshape(B, Hk, G, n * C, Ev)[:, :, :, :L]
    if normalize:
        den = contract(CHUNK_DENOMINATOR, qc, z_prev) + A.sum(dim=-1)
        # Padded query rows have denominator 0: only the L real rows are checked.
        o = normalise(o, den.reshape(B, Hk, G, n * C)[..., :L], phi, eps)
    return o, final


#: Causal implementations of :func:`linear_attention` (see its ``implementation``).
IMPLEMENTATIONS = ("fast", "reference")


def _recomputable(phi: FeatureMap) -> bool:
    """True when phi has no trainable parameters, so its backward can be recomputed."""
    return not any(p.requires_grad for p in phi.parameters())


def _causal_fast(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi: FeatureMap,
    dims: QKVDims,
    initial_state: object,
    chunk: int,
    normalize: bool,
    eps: float | None,
    output_final_state: bool,
) -> tuple[Tensor, LinearAttentionState | None]:
    """Causal linear attention through the recomputing Function (validated inputs)."""
    acc = _acc_dtype(q.dtype)
    Dp = phi.out_dim(dims.E)
    if initial_state is None:
        S0 = torch.zeros(dims.B, dims.Hk, Dp, dims.Ev, dtype=acc, device=q.device)
        z0 = torch.zeros(dims.B, dims.Hk, Dp, dtype=acc, device=q.device)
    else:
        S0, z0 = _check_state("initial_state", initial_state, dims, Dp, phi, q.device, acc)
    o, S, z = causal_linear_attention(q, k, v, phi, S0, z0, chunk, normalize, eps)
    return o, (LinearAttentionState(S, z) if output_final_state else None)


def _noncausal_tile(q: Tensor, dims: QKVDims, Dp: int, acc: torch.dtype) -> int:
    """Tokens per tile of the non-causal path: the whole sequence but on a CPU past the budget.

    A wide map's phi(Q) and phi(K) and the temporaries that build them (Taylor: the
    D x D outer products) are fresh tensors of several times N D' floats; past the
    cache-sized budget of the causal path (:data:`attnkit.ops.linear_chunked.
    CPU_TILE_BYTES`) their page faults and cache misses made the time grow like N^1.5
    (Taylor-16, N = 4096 -> 16384). Tiles of the sequence keep them inside the budget;
    every registered map is row-wise, so phi of a tile is the tile of phi.
    """
    whole = max(dims.L, dims.S, 1)
    if q.device.type != "cpu":
        return whole
    per_token = 4 * dims.B * dims.H * (Dp + dims.Ev) * torch.finfo(acc).bits // 8
    return min(whole, max(64, _linear_chunked.CPU_TILE_BYTES // per_token // 64 * 64))


def _noncausal_tiled(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi: FeatureMap,
    dims: QKVDims,
    state: LinearAttentionState,
    tile: int,
    normalize: bool,
    eps: float | None,
    acc: torch.dtype,
    has_initial_state: bool,
) -> tuple[Tensor, LinearAttentionState]:
    """Non-causal linear attention over sequence tiles: the state from the key tiles,
    then the outputs of the query tiles (the same contractions, summed over tiles)."""
    B, H, Hk, G, L, Ev = dims.B, dims.H, dims.Hk, dims.group_size, dims.L, dims.Ev
    Dp = phi.out_dim(dims.E)
    S, z = state.S, state.z
    for s0 in range(
        0, max(dims.S, 1), tile
    ):  # S = 0 or L = 0: one empty tile, so k (q) stays in the graph
        fk = _features(phi, phi, "k", k[:, :, s0 : s0 + tile], acc, Dp)
        S = S + contract(STATE, fk, v[:, :, s0 : s0 + tile].to(acc))
        z = z + fk.sum(dim=-2)
    nums, dens = [], []
    query_map = phi.query_features if normalize else phi
    for l0 in range(0, max(L, 1), tile):
        fq = _features(query_map, phi, "q", q[:, :, l0 : l0 + tile], acc, Dp)
        fq5 = fq.reshape(B, Hk, G, -1, Dp)
        nums.append(contract(NUMERATOR, fq5, S))
        if normalize:
            dens.append(contract(DENOMINATOR, fq5, z))
    num = nums[0] if len(nums) == 1 else torch.cat(nums, dim=3)  # [B, Hk, G, L, Ev]
    # No key and no state: nothing to attend; the output is 0, as for SDPA.
    if normalize and (dims.S > 0 or has_initial_state):
        den = dens[0] if len(dens) == 1 else torch.cat(dens, dim=3)
        num = normalise(num, den, phi, eps)  # one check over all rows
    return num.reshape(B, H, L, Ev), LinearAttentionState(S, z)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: str | FeatureMap = "elu",
    is_causal: bool = False,
    normalize: bool = True,
    eps: float | None = None,
    chunk_size: int | None = None,
    initial_state: LinearAttentionState | tuple[Tensor, Tensor] | None = None,
    output_final_state: bool = False,
    *,
    enable_gqa: bool = False,
    implementation: str = "fast",
) -> tuple[Tensor, LinearAttentionState | None]:
    r"""Linearized attention with a feature map phi, equation (6); returns ``(o, state)``.

    ::

        non-causal  o_i = phi(Q_i) S / phi(Q_i) . z
                    S = S0 + sum_j phi(K_j)^T V_j,  z = z0 + sum_j phi(K_j)
        causal      the same with S_i, z_i summed over j <= i only (L == S required)

    (S0, z0) is ``initial_state`` (zeros when None). This equals
    ``kernel_attention(q, k, v, sim="linear", sim_kwargs={"feature_map": phi})``.

    Shape legend (PyTorch's SDPA layout)::

        q [B, H, L, E]      B batch, H query heads, L query length, E key width
        k [B, Hk, S, E]     Hk key/value heads (H == Hk unless enable_gqa; then
        v [B, Hk, S, Ev]    H % Hk == 0 and query head h uses key/value head
                            h // (H / Hk)); S key length, Ev value width
        phi: [..., E] -> [..., D']
        o [B, H, L, Ev]     q's dtype
        state.S [B, Hk, D', Ev], state.z [B, Hk, D']   accumulation dtype (fp32; fp64
                                                        for fp64 inputs)

    Args:
        feature_map: a registered name (:func:`attnkit.feature_maps.available`) or a
            :class:`~attnkit.feature_maps.FeatureMap` instance (use an instance to share
            e.g. random features with other calls). A name of a map with random
            parameters (``"favor"``) means the seed-0 draw for width E, the same on
            every call (and drawn on every call: pass an instance to avoid that).
        is_causal: query i sees keys j <= i. Needs L == S; decode with
            :func:`linear_attention_step` or by passing ``initial_state``.
        normalize: divide by phi(Q_i) . z (equation (6)); ``False`` returns the
            numerator phi(Q_i) S alone (z is still tracked in the state).
        eps: the denominator policy. ``None`` (default): every denominator must be
            finite and > 0, else ValueError saying how many rows fail. Maps that are not
            positive (identity, relu, odd-degree polynomials) can give <= 0; positive
            ones (elu, taylor, favor) only by floating-point underflow of extreme
            inputs. A float > 0 is a guard that *changes the math*: denominators below
            it are replaced by it (``clamp_min``, not ``+ eps``), so a row with no
            weight returns 0 and a row whose signed denominator is near 0 returns a
            damped value instead of raising; rows above eps are exact.
        chunk_size: chunk length C of the causal form; ``None`` picks
            :func:`auto_chunk_size` (64 for elu at D = M = 64 and for Taylor at
            D = 16). Any positive int is exact; it only
            trades the intra-chunk [C, C] matmuls against the number of chunk states.
        initial_state: ``(S0, z0)`` carried over from an earlier call, e.g. the keys of
            a previous segment; plain tuples are accepted and cast up to the
            accumulation dtype (a wider dtype raises TypeError, never rounds down).
        output_final_state: also return the state after this sequence (S0 + its sums),
            to continue it with ``initial_state`` or :func:`linear_attention_step`.
        enable_gqa: allow H != Hk (grouped-query attention), as in
            :func:`attnkit.sdpa`; without it H != Hk raises ValueError.
        implementation: causal only. ``"fast"`` (default) runs the custom autograd
            Function of :mod:`attnkit.ops.linear_chunked`, which recomputes phi and the
            chunk states in the backward pass (training memory O(N (D + M)) per head);
            ``"reference"`` runs the plain chunked einsums below with autograd through
            them, which the tests compare the fast path against. Feature maps with
            trainable parameters always take the reference path (the fast backward
            gives gradients to phi's inputs only).

    Queries go through ``phi.query_features`` when normalising (phi times a positive
    factor per row, which cancels: FAVOR+ uses it to keep queries in range) and
    through ``phi`` itself otherwise; keys always through ``phi``.

    A non-causal call with no keys (S = 0) and no ``initial_state`` leaves the queries
    nothing to attend: the output is 0, as for :func:`attnkit.sdpa`.

    Non-finite values: NaN or inf in q or k reach the denominators of the rows they
    touch (every row for a key, non-causal; the later rows, causal), which raises
    ValueError. NaN/inf in v_j is not checked: it reaches every row that attends to
    it and, causal, also the earlier rows of its chunk (the masked intra-chunk
    product forms 0 * v_j). A
    finite input never gives a non-finite output: overflow raises, and an fp16/bf16
    output that would not fit its dtype raises ValueError naming the dtype (only
    possible for signed maps or ``normalize=False``; a positive map's normalised
    output is a convex combination of the values).

    Cost, N = L = S tokens, D = E, M = Ev: time O(N D' M) (+ O(N C (D' + M)) for the
    causal chunks) versus O(N^2 (D + M)) for softmax; memory O(N D') because phi(Q),
    phi(K) are kept for the backward pass (a recomputing backward would need only
    O(N D + D' M)), plus (N / C) D' M for the causal chunk states. Features and all sums
    are computed in fp32 for fp16/bf16 inputs; the output is cast back to q's dtype.
    The denominator check is one reduction over the B H L denominators.
    """
    _check_bool("enable_gqa", enable_gqa)
    dims = check_qkv(q, k, v, allow_gqa=enable_gqa)
    phi = resolve(feature_map, dims.E)
    _check_bool("is_causal", is_causal)
    _check_bool("normalize", normalize)
    _check_bool("output_final_state", output_final_state)
    eps = _check_eps(eps)
    if is_causal and dims.L != dims.S:
        raise ValueError(
            f"causal linear attention needs as many queries as keys: q has L={dims.L}, "
            f"k has S={dims.S}; to decode, use linear_attention_step or pass the earlier "
            "tokens as initial_state"
        )
    phi.check_width(dims.E)
    Dp = phi.out_dim(dims.E)
    chunk = _check_chunk_size(chunk_size, dims.L, Dp, dims.Ev)
    check_choice("implementation", implementation, IMPLEMENTATIONS)
    if is_causal and implementation == "fast" and _recomputable(phi):
        return _causal_fast(
            q, k, v, phi, dims, initial_state, chunk, normalize, eps, output_final_state
        )

    B, H, Hk, G, L, Ev = dims.B, dims.H, dims.Hk, dims.group_size, dims.L, dims.Ev
    acc = _acc_dtype(q.dtype)
    if initial_state is None:
        state = LinearAttentionState(
            torch.zeros(B, Hk, Dp, Ev, dtype=acc, device=q.device),
            torch.zeros(B, Hk, Dp, dtype=acc, device=q.device),
        )
    else:
        state = _check_state("initial_state", initial_state, dims, Dp, phi, q.device, acc)
    if is_causal:
        fq = _features(phi.query_features if normalize else phi, phi, "q", q, acc, Dp)
        fk = _features(phi, phi, "k", k, acc, Dp)
        # GQA: the G query heads of one key/value head share its state: view, no copies.
        fq5 = fq.reshape(B, Hk, G, L, Dp)
        o5, final = _causal_chunked(fq5, fk, v.to(acc), state, chunk, normalize, eps, phi)
        o = o5.reshape(B, H, L, Ev)
    else:
        tile = _noncausal_tile(q, dims, Dp, acc)
        o, final = _noncausal_tiled(
            q, k, v, phi, dims, state, tile, normalize, eps, acc, initial_state is not None
        )
    return finish(o, q.dtype, phi, normalize), (final if output_final_state else None)


def linear_attention_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: LinearAttentionState | tuple[Tensor, Tensor] | None,
    feature_map: str | FeatureMap = "elu",
    normalize: bool = True,
    eps: float | None = None,
    *,
    enable_gqa: bool = False,
) -> tuple[Tensor, LinearAttentionState]:
    r"""One token of causal linear attention as a recurrence; returns ``(o, new_state)``.

    ::

        S' = S + phi(k)^T v,   z' = z + phi(k)
        o  = phi(q) S' / phi(q) . z'      (phi(q) S' when normalize=False)

    The token attends to itself (the state is updated before it is read), as in
    causal attention, so a loop of steps equals
    ``linear_attention(..., is_causal=True)`` token by token.

    Shape legend::

        q [B, H, 1, E], k [B, Hk, 1, E], v [B, Hk, 1, Ev]   (H == Hk, or H % Hk == 0
                                                              with enable_gqa)
        state.S [B, Hk, D', Ev], state.z [B, Hk, D']        None -> zeros
        o [B, H, 1, Ev] in q's dtype; new_state in the accumulation dtype (fp32, or
        fp64 for fp64 inputs)

    Cost per token: time O(H D' Ev), memory O(Hk D' Ev) for the state, independent of
    how many tokens came before (softmax decoding reads an O(n) cache instead).
    ``eps``, ``enable_gqa``, the state's dtype and non-finite values: as in
    :func:`linear_attention`.
    """
    _check_bool("enable_gqa", enable_gqa)
    dims = check_qkv(q, k, v, allow_gqa=enable_gqa)
    if dims.L != 1 or dims.S != 1:
        raise ValueError(
            "linear_attention_step takes one token: q must be [B, H, 1, E] and k, v "
            f"[B, Hk, 1, E/Ev], got q length L={dims.L} and k length S={dims.S}; use "
            "linear_attention for whole sequences"
        )
    phi = resolve(feature_map, dims.E)
    _check_bool("normalize", normalize)
    eps = _check_eps(eps)
    phi.check_width(dims.E)
    Dp = phi.out_dim(dims.E)
    B, H, Hk, G, Ev = dims.B, dims.H, dims.Hk, dims.group_size, dims.Ev
    acc = _acc_dtype(q.dtype)
    fq = _features(phi.query_features if normalize else phi, phi, "q", q, acc, Dp)
    fq = fq.reshape(B, Hk, G, Dp)  # [B, Hk, G, D']
    fk = _features(phi, phi, "k", k, acc, Dp)[:, :, 0]  # [B, Hk, D']
    vf = v.to(acc)[:, :, 0]  # [B, Hk, Ev]
    if state is None:
        S = torch.zeros(B, Hk, Dp, Ev, dtype=acc, device=q.device)
        z = torch.zeros(B, Hk, Dp, dtype=acc, device=q.device)
    else:
        S, z = _check_state("state", state, dims, Dp, phi, q.device, acc)
    S = S + fk.unsqueeze(-1) * vf.unsqueeze(-2)
    z = z + fk
    num = contract(STEP_NUMERATOR, fq, S)
    if normalize:
        num = normalise(num, contract(STEP_DENOMINATOR, fq, z), phi, eps, "linear_attention_step")
    o = finish(num.reshape(B, H, 1, Ev), q.dtype, phi, normalize, "linear_attention_step")
    return o, LinearAttentionState(S, z)

"""FLOP and byte counts that turn the benchmark's times into fractions of peak.

Causal linear attention is counted by the cost model (:mod:`attnkit.cost`, variant
``linear_fast``: the fast path's own declared products, pinned to FlopCounterMode's
count of the real code), in two ways:

- *useful* FLOPs (:func:`causal_linear_flops`): the products the algorithm needs:
  the numerator's Ev value columns, and of each intra-chunk [C, C] product only the
  causal triangle (diagonal included). Fractions of peak and targets use these;
- *computed* FLOPs (:func:`causal_linear_computed_flops`): what the fast path
  executes, which adds the masked upper halves and the ones column that carries the
  denominator (and, in training, the recomputed chunk states and scores). Shown
  beside the useful ones, never instead of them.

Conventions:

- a multiply-add is 2 FLOPs; a [m, k] x [k, n] matmul is 2 m n k; elementwise work
  (feature maps such as elu + 1, the division by the denominator) is not counted;
- one useful count per case is used for every competitor in it, so a row's fraction
  of peak is its speed in the same work units (rows are comparable, whatever each
  implementation actually executes);
- training (forward + backward) does 3x the forward's useful work (the backward of
  each product is two products of its size); recomputation is not useful work;
- bytes of a copy count the read and the write (2 x the tensor's bytes).
"""

from __future__ import annotations

import functools

import sympy

__all__ = [
    "TRAIN_FLOPS_FACTOR",
    "causal_linear_computed_flops",
    "causal_linear_flops",
    "causal_linear_train_flops",
    "copy_bytes",
    "decode_weight_bytes",
    "favor_feature_flops",
    "kv_cache_bytes",
    "matmul_flops",
    "sdpa_flops",
]

#: Useful forward + backward = 3 x forward (recomputation is not useful work).
TRAIN_FLOPS_FACTOR = 3


def matmul_flops(m: int, n: int, k: int) -> int:
    """[m, k] @ [k, n]: 2 m n k."""
    return 2 * m * n * k


def copy_bytes(numel: int, itemsize: int) -> int:
    """Bytes moved by ``dst.copy_(src)``: each element read once and written once."""
    return 2 * numel * itemsize


@functools.cache
def _linear_fast(phase: str, useful: bool) -> sympy.Expr:
    from attnkit import cost

    return cost.flops("linear_fast", phase, matmul_only=True, useful=useful)


def _linear_sizes(n: int, d_feat: int, m: int, chunk: int, heads: int) -> dict[str, int]:
    # The fast path pads the last chunk: it computes ceil(N / C) whole chunks.
    padded = -(-n // chunk) * chunk
    return {
        "B": 1, "H": heads, "Hk": heads, "L": padded, "S": padded, "E": d_feat,
        "Ev": m, "Dp": d_feat, "C": chunk,
    }  # fmt: skip


def causal_linear_flops(n: int, d_feat: int, m: int, chunk: int, heads: int = 1) -> int:
    """Useful FLOPs of causal linear attention, forward: 4 N D' M + N (C + 1) (D' + M).

    Per head: the chunk states phi(K)^T V and the inter-chunk phi(Q) S (2 N D' M each),
    and the causal triangle of the intra-chunk phi(Q) phi(K)^T and its product with V
    (N (C + 1) D' and N (C + 1) M): the cost model's useful count of ``linear_fast``
    (N a multiple of C). ``heads`` multiplies (pass B * H).
    """
    from attnkit import cost

    return cost.evaluate(_linear_fast("forward", True), _linear_sizes(n, d_feat, m, chunk, heads))


def causal_linear_computed_flops(
    n: int, d_feat: int, m: int, chunk: int, heads: int = 1, *, train: bool = False
) -> int:
    """FLOPs attnkit's fast causal path executes (FlopCounterMode's count of it).

    Forward: 4 N D' (M+1) + 2 N C (D' + M + 1) per head: values augmented to M + 1
    columns and whole [C, C] intra-chunk products. ``train``: forward + backward,
    with the chunk states and scores recomputed in the backward pass.
    """
    from attnkit import cost

    phase = "train" if train else "forward"
    return cost.evaluate(_linear_fast(phase, False), _linear_sizes(n, d_feat, m, chunk, heads))


def causal_linear_train_flops(n: int, d_feat: int, m: int, chunk: int, heads: int = 1) -> int:
    """Useful FLOPs of forward + backward: 3 x :func:`causal_linear_flops`."""
    return TRAIN_FLOPS_FACTOR * causal_linear_flops(n, d_feat, m, chunk, heads)


def sdpa_flops(n: int, e: int, ev: int, *, causal: bool, heads: int = 1) -> int:
    """Softmax attention forward over N queries and N keys, useful work only.

    Non-causal: scores 2 N^2 E plus weighted values 2 N^2 Ev = 2 N^2 (E + Ev).
    Causal: query i meets i + 1 keys, so N (N + 1) (E + Ev) (the masked half is not
    counted, as a causal kernel can skip it). The softmax itself is not counted.
    Also used for fla's quadratic Based reference (the same two products).
    """
    pairs = n * (n + 1) // 2 if causal else n * n
    return heads * 2 * pairs * (e + ev)


def favor_feature_flops(n: int, d: int, num_features: int, heads: int = 1) -> int:
    """FAVOR+ random-feature projections of queries and keys: 2 x (2 N D m)."""
    return heads * 2 * matmul_flops(n, num_features, d)


def kv_cache_bytes(b: int, n_kv_heads: int, n: int, d_k: int, d_v: int, itemsize: int) -> int:
    """Bytes of a KV cache holding n tokens: b Hk n (d_k + d_v) itemsize (= KVCache.nbytes)."""
    return b * n_kv_heads * n * (d_k + d_v) * itemsize


def decode_weight_bytes(
    d_model: int, n_heads: int, n_kv_heads: int, d_k: int, d_v: int, itemsize: int
) -> int:
    """Bytes of the q, k, v, o projection weights read once per decoding step (no biases).

    W_q [d, H d_k], W_k [d, Hk d_k], W_v [d, Hk d_v], W_o [H d_v, d].
    """
    return (
        d_model * (n_heads * d_k + n_kv_heads * d_k + n_kv_heads * d_v + n_heads * d_v) * itemsize
    )

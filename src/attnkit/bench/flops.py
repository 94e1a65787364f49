"""FLOP and byte counts that turn the benchmark's times into fractions of peak.

One small function per case, derived by hand from the algorithm each case times.
They stand in for the symbolic cost model (``attnkit.cost``, being written
separately); once it lands, each function here should become a thin call into it
(the counts below are what it must reproduce; ``tests/test_bench.py`` pins them).

Conventions:

- a multiply-add is 2 FLOPs; a [m, k] x [k, n] matmul is 2 m n k;
- counts are *algorithmic* FLOPs of the chunked algorithm, per head, times B H:
  the masked-out upper half of the intra-chunk [C, C] blocks is counted (it is
  executed), elementwise work (feature maps such as elu + 1, the division by the
  denominator) is not;
- one count per case is used for every competitor in it, so a row's fraction of
  peak is its speed in the same work units (rows are comparable, whatever each
  implementation actually executes);
- training (forward + backward) is 3x the forward count, the usual "model FLOPs"
  convention (backward ~ 2x forward); recomputation in the backward pass is not
  counted, so a recomputing kernel is not rewarded for redoing work;
- bytes of a copy count the read and the write (2 x the tensor's bytes).
"""

from __future__ import annotations

__all__ = [
    "TRAIN_FLOPS_FACTOR",
    "causal_linear_flops",
    "causal_linear_train_flops",
    "copy_bytes",
    "decode_weight_bytes",
    "favor_feature_flops",
    "kv_cache_bytes",
    "matmul_flops",
    "sdpa_flops",
]

#: Forward + backward = 3 x forward ("model FLOPs"; recomputation is not counted).
TRAIN_FLOPS_FACTOR = 3


def matmul_flops(m: int, n: int, k: int) -> int:
    """[m, k] @ [k, n]: 2 m n k."""
    return 2 * m * n * k


def copy_bytes(numel: int, itemsize: int) -> int:
    """Bytes moved by ``dst.copy_(src)``: each element read once and written once."""
    return 2 * numel * itemsize


def causal_linear_flops(n: int, d_feat: int, m: int, chunk: int, heads: int = 1) -> int:
    """Causal chunked linear attention forward, normalised: 4 N D' (M+1) + 2 N C (D' + M + 1).

    Per head and per chunk of C tokens, with the values augmented by a ones column
    (M' = M + 1, which yields the denominator in the same matmuls):
    chunk state phi(K)^T V' (2 C D' M'), inter-chunk phi(Q) S (2 C D' M'),
    intra-chunk phi(Q) phi(K)^T (2 C C D') and its product with V' (2 C C M').
    Summed over N / C chunks: 4 N D' M' + 2 N C (D' + M'). ``heads`` multiplies
    (pass B * H).
    """
    mp = m + 1
    return heads * (4 * n * d_feat * mp + 2 * n * chunk * (d_feat + mp))


def causal_linear_train_flops(n: int, d_feat: int, m: int, chunk: int, heads: int = 1) -> int:
    """Forward + backward of :func:`causal_linear_flops`: 3 x the forward count."""
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

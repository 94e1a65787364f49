r"""Synthetic data: multi-query associative recall (MQAR).

MQAR is the recall task of Zoology (Arora, Eyuboglu et al. 2023, "Zoology: Measuring
and improving recall in efficient language models"), generated here exactly as their
``multiquery_ar`` does, with torch and a seedable ``torch.Generator``. With N key-value
pairs, vocabulary V and sequence length L::

    position   0    1    2    3   ...  2N-2  2N-1 | 2N ...                      L-1
    input      k1   v1   k2   v2  ...  kN    vN   | 0 .. 0  k_i  0 .. 0  k_j  0 ..
    label     -100 -100 -100 -100 ... -100  -100  | -100 .. v_i -100 .. v_j -100 ..

- keys are drawn without replacement from the lower half of the vocabulary,
  1 .. V//2 - 1 (0 is the filler token), values without replacement from the upper
  half, V//2 .. V - 1;
- every key is queried exactly once after the context, at position 2N + 2 g (an even
  offset) with the gap g drawn without replacement from 0 .. (L - 2N)/2 - 1 with
  p(g) proportional to (g + 1)^(a - 1), a = ``power_a`` = 0.01 (short gaps are likelier,
  as repeated bigrams in text);
- every other position is 0 (``random_non_queries=True`` fills them with random tokens
  instead, Zoology's default);
- the label at a query position is the value paired with that key (the model must
  predict it right after seeing the key); every other label is -100, the
  ``ignore_index`` of ``torch.nn.functional.cross_entropy``. Accuracy is the mean over
  the supervised positions (:func:`mqar_accuracy`).

Shape legend::

    n examples, L seq_len, V vocab_size, N num_kv_pairs
    inputs [n, L] int64 in [0, V),  labels [n, L] int64 in [V//2, V) or -100
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from attnkit._validation import check_int

__all__ = [
    "IGNORE_INDEX",
    "MQARBatch",
    "MQARConfig",
    "mqar",
    "mqar_accuracy",
    "power_law_gap_probs",
]

#: Label of unsupervised positions (the default ``ignore_index`` of cross_entropy).
IGNORE_INDEX = -100


class MQARBatch(NamedTuple):
    """``inputs [n, L]`` token ids and ``labels [n, L]`` (-100 outside query positions)."""

    inputs: Tensor
    labels: Tensor


def _check_power(power_a: object) -> float:
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)):
        raise TypeError(f"power_a must be a real number, got {type(power_a).__name__}")
    if not (math.isfinite(power_a) and power_a > 0):
        raise ValueError(f"power_a must be finite and > 0, got {power_a}")
    return float(power_a)


def power_law_gap_probs(space: int, power_a: float = 0.01) -> Tensor:
    """p(g) proportional to (g + 1)^(a - 1) for g = 0 .. space - 1, float64 [space].

    ``power_a`` = 1 is uniform; a -> 0 approaches 1 / (g + 1), which favours short gaps.
    """
    check_int("space", space, 1)
    a = _check_power(power_a)
    p = torch.arange(1, space + 1, dtype=torch.float64) ** (a - 1.0)
    return p / p.sum()


@dataclass(frozen=True)
class MQARConfig:
    """An MQAR task: everything :func:`mqar` needs besides the number of examples."""

    vocab_size: int = 128  # V: keys from 1 .. V//2 - 1, values from V//2 .. V - 1
    seq_len: int = 32  # L: even, >= 4 * num_kv_pairs
    num_kv_pairs: int = 4  # N: key-value pairs in the context, each queried once
    power_a: float = 0.01  # query gaps: p(g) ~ (g + 1)^(power_a - 1)
    random_non_queries: bool = False  # fill non-query positions with random tokens (not 0)

    def __post_init__(self) -> None:
        V = check_int("vocab_size", self.vocab_size, 4)
        L = check_int("seq_len", self.seq_len, 4)
        N = check_int("num_kv_pairs", self.num_kv_pairs, 1)
        _check_power(self.power_a)
        if not isinstance(self.random_non_queries, bool):
            raise TypeError(
                f"random_non_queries must be a bool, got {type(self.random_non_queries).__name__}"
            )
        if L % 2:
            raise ValueError(f"seq_len must be even (queries sit at even offsets), got {L}")
        if 4 * N > L:
            raise ValueError(
                f"seq_len must be >= 4 * num_kv_pairs (2N context tokens + room for N "
                f"queries at even offsets): num_kv_pairs={N} needs seq_len >= {4 * N}, got {L}"
            )
        if N > V // 2 - 1 or N > V - V // 2:
            raise ValueError(
                f"num_kv_pairs={N} distinct keys from 1 .. {V // 2 - 1} and values from "
                f"{V // 2} .. {V - 1} need num_kv_pairs <= {min(V // 2 - 1, V - V // 2)} "
                f"for vocab_size={V}"
            )

    @property
    def supervised_per_example(self) -> int:
        """Labelled positions per sequence (one per key)."""
        return self.num_kv_pairs

    def sample(
        self,
        num_examples: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> MQARBatch:
        """``num_examples`` sequences of this task (see :func:`mqar`)."""
        check_int("num_examples", num_examples, 0)
        V, L, N = self.vocab_size, self.seq_len, self.num_kv_pairs
        gen_device = generator.device if generator is not None else torch.device("cpu")
        n = num_examples

        def subset(size: int, k: int) -> Tensor:
            # The first k of a uniform random permutation: k draws without replacement.
            return torch.rand(n, size, generator=generator, device=gen_device).argsort(dim=1)[:, :k]

        keys = subset(V // 2 - 1, N) + 1  # [n, N] in 1 .. V//2 - 1
        values = subset(V - V // 2, N) + V // 2  # [n, N] in V//2 .. V - 1
        space = (L - 2 * N) // 2
        p = power_law_gap_probs(space, self.power_a).to(gen_device)
        # Weighted sampling without replacement (same law as numpy's choice(p=, replace=False)).
        gaps = (
            torch.multinomial(p.expand(n, space), N, replacement=False, generator=generator)
            if n
            else torch.zeros(0, N, dtype=torch.long, device=gen_device)
        )  # [n, N]

        inputs = torch.zeros(n, L, dtype=torch.long, device=gen_device)
        labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long, device=gen_device)
        inputs[:, 0 : 2 * N : 2] = keys
        inputs[:, 1 : 2 * N : 2] = values
        where = 2 * N + 2 * gaps  # [n, N] query positions
        inputs.scatter_(1, where, keys)
        labels.scatter_(1, where, values)
        if self.random_non_queries:
            noise = torch.randint(V, (n, L), generator=generator, device=gen_device)
            inputs = torch.where(inputs == 0, noise, inputs)
        return MQARBatch(inputs.to(device), labels.to(device))


def mqar(
    num_examples: int,
    vocab_size: int = 128,
    seq_len: int = 32,
    num_kv_pairs: int = 4,
    *,
    power_a: float = 0.01,
    random_non_queries: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MQARBatch:
    """Generate ``num_examples`` MQAR sequences (see the module docstring for the layout).

    Shapes: inputs [num_examples, seq_len] int64, labels [num_examples, seq_len] int64
    (-100 except at the num_kv_pairs query positions of each row).

    All randomness comes from ``generator`` (the global RNG when None), so a seeded
    generator reproduces the batch exactly. Tensors are drawn on the generator's device
    and moved to ``device`` (default: that device).

    Raises ValueError for an odd ``seq_len``, ``seq_len < 4 * num_kv_pairs``, or more
    pairs than distinct keys (1 .. V//2 - 1) or values (V//2 .. V - 1) exist.
    """
    return MQARConfig(vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries).sample(
        num_examples, generator, device
    )


def mqar_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of supervised positions (labels != -100) where argmax(logits) == label.

    Shapes: logits [n, L, V], labels [n, L] -> 0-dim float tensor (nan when nothing is
    supervised).
    """
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("logits and labels must be torch.Tensors")
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"logits must be [n, L, V] and labels [n, L], got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    mask = labels != IGNORE_INDEX
    hits = (logits.argmax(dim=-1) == labels) & mask
    return hits.sum().double() / mask.sum().double()

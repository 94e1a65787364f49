"""Inputs that make head behaviours visible: random tokens repeated twice (Olsson et al. 2022).

On a sequence of T random tokens followed by the same T tokens again, the second copy
is predictable only by looking back at the first: an induction head attends from
position i of the second copy to position i - T + 1 (the token after the earlier
occurrence of the current token) and copies it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._validation import check_int

__all__ = ["repeated_tokens"]


def repeated_tokens(
    batch: int,
    period: int,
    vocab: int,
    *,
    low: int = 0,
    prefix: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[B, P + 2T] token ids: an optional fixed ``prefix`` (length P), then T random ids, twice.

    The T ids of a copy are distinct (drawn without replacement from [low, vocab)), so
    every token of the second copy has exactly one earlier occurrence, T positions
    back. Needs vocab - low >= T.
    """
    check_int("batch", batch, 1)
    check_int("period", period, 1)
    check_int("vocab", vocab, 1)
    check_int("low", low, 0)
    if vocab - low < period:
        raise ValueError(
            f"period={period} distinct tokens need vocab - low >= period, got vocab={vocab}, "
            f"low={low}"
        )
    first = torch.rand(batch, vocab - low, generator=generator).argsort(dim=-1)[:, :period] + low
    parts = [first, first]
    if prefix:
        if any(not 0 <= int(t) < vocab for t in prefix):
            raise ValueError(f"prefix ids must be in [0, vocab={vocab}), got {prefix}")
        parts.insert(0, torch.tensor(prefix, dtype=torch.long).expand(batch, len(prefix)))
    return torch.cat(parts, dim=1)

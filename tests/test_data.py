"""attnkit.data: the MQAR generator has exactly the properties Zoology's has."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnkit.data import (
    IGNORE_INDEX,
    MQARConfig,
    mqar,
    mqar_accuracy,
    power_law_gap_probs,
)

CASES = [
    pytest.param(dict(vocab_size=128, seq_len=32, num_kv_pairs=4), id="V128-L32-N4"),
    pytest.param(dict(vocab_size=128, seq_len=32, num_kv_pairs=8), id="V128-L32-N8"),
    pytest.param(dict(vocab_size=11, seq_len=18, num_kv_pairs=4), id="V11-L18-N4"),
    pytest.param(dict(vocab_size=64, seq_len=4, num_kv_pairs=1), id="V64-L4-N1"),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kw", CASES)
def test_layout_keys_values_queries_labels(kw: dict[str, int]) -> None:
    V, L, N = kw["vocab_size"], kw["seq_len"], kw["num_kv_pairs"]
    inputs, labels = mqar(300, **kw, generator=_gen())
    assert inputs.shape == labels.shape == (300, L)
    assert inputs.dtype == labels.dtype == torch.long
    keys, values = inputs[:, 0 : 2 * N : 2], inputs[:, 1 : 2 * N : 2]
    # Keys: lower half without 0, values: upper half; each without replacement.
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    assert all(len(set(row.tolist())) == N for row in keys)
    assert all(len(set(row.tolist())) == N for row in values)
    pair = [
        dict(zip(k.tolist(), v.tolist(), strict=True)) for k, v in zip(keys, values, strict=True)
    ]
    # Context is unsupervised; every key is queried exactly once, at an even offset after it.
    assert (labels[:, : 2 * N] == IGNORE_INDEX).all()
    for row in range(300):
        tail, lab = inputs[row, 2 * N :], labels[row, 2 * N :]
        where = tail.nonzero().flatten()
        assert sorted(tail[where].tolist()) == sorted(keys[row].tolist())
        assert (where % 2 == 0).all()
        # The label sits on the query token and is that key's value; -100 elsewhere.
        assert ((lab != IGNORE_INDEX).nonzero().flatten() == where).all()
        assert [pair[row][int(k)] for k in tail[where]] == lab[where].tolist()
    assert ((labels != IGNORE_INDEX).sum(dim=1) == N).all()


def test_seeded_generator_reproduces_and_seeds_differ() -> None:
    a = mqar(64, generator=_gen(3))
    b = mqar(64, generator=_gen(3))
    c = mqar(64, generator=_gen(4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    # The global RNG is used (and advanced) when no generator is given.
    torch.manual_seed(5)
    d = mqar(8)
    torch.manual_seed(5)
    assert torch.equal(d.inputs, mqar(8).inputs)


def test_gap_distribution_is_the_power_law() -> None:
    """First query gap ~ p(g) ~ (g+1)^(a-1); the second one follows sampling without replacement."""
    n, L, N, a = 20000, 20, 2, 0.01
    space = (L - 2 * N) // 2
    inputs, _ = mqar(n, vocab_size=64, seq_len=L, num_kv_pairs=N, power_a=a, generator=_gen(1))
    p = power_law_gap_probs(space, a)
    assert p[0] / p[1] == pytest.approx(2 ** (1 - a))
    key1, key2 = inputs[:, 0], inputs[:, 2]
    tail = inputs[:, 2 * N :]
    gap1 = (tail == key1[:, None]).int().argmax(dim=1) // 2
    gap2 = (tail == key2[:, None]).int().argmax(dim=1) // 2
    emp1 = torch.bincount(gap1, minlength=space).double() / n
    # P(second = g) = sum_{h != g} p(h) p(g) / (1 - p(h))
    ratio = p / (1 - p)
    want2 = p * (ratio.sum() - ratio)
    emp2 = torch.bincount(gap2, minlength=space).double() / n
    for emp, want in ((emp1, p), (emp2, want2)):
        sigma = (want * (1 - want) / n).sqrt()
        assert ((emp - want).abs() < 5 * sigma + 1e-4).all(), (emp, want)
    assert (gap1 != gap2).all()


def test_non_query_positions_are_zero_or_random() -> None:
    kw: dict[str, Any] = dict(vocab_size=128, seq_len=64, num_kv_pairs=4)
    zeros = mqar(50, **kw, generator=_gen(2))
    filled = mqar(50, **kw, random_non_queries=True, generator=_gen(2))
    supervised = zeros.labels != IGNORE_INDEX
    context = torch.zeros_like(supervised)
    context[:, :8] = True
    assert (zeros.inputs[~supervised & ~context] == 0).all()
    # Zoology's default: fillers become random tokens; queries and labels are unchanged.
    assert (filled.inputs[~supervised & ~context] != 0).float().mean() > 0.9
    assert torch.equal(filled.inputs[supervised | context], zeros.inputs[supervised | context])
    assert torch.equal(filled.labels, zeros.labels)


def test_config_sample_equals_function_and_moves_to_device() -> None:
    cfg = MQARConfig(vocab_size=32, seq_len=16, num_kv_pairs=2)
    a = cfg.sample(5, _gen(7), device="cpu")
    b = mqar(5, 32, 16, 2, generator=_gen(7))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert cfg.supervised_per_example == 2
    assert mqar(0, generator=_gen()).inputs.shape == (0, 32)


def test_accuracy_counts_supervised_positions_only() -> None:
    _, labels = mqar(4, vocab_size=16, seq_len=8, num_kv_pairs=2, generator=_gen())
    logits = torch.zeros(4, 8, 16)
    sup = labels != IGNORE_INDEX
    logits[sup] = torch.nn.functional.one_hot(labels[sup], 16).float()
    assert mqar_accuracy(logits, labels).item() == 1.0
    rows = sup.nonzero()[:2]  # break two of the 8 answers
    logits[rows[:, 0], rows[:, 1]] = 0.0
    logits[rows[:, 0], rows[:, 1], 0] = 1.0
    assert mqar_accuracy(logits, labels).item() == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="logits must be"):
        mqar_accuracy(logits[0], labels)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(seq_len=31), ValueError, "seq_len must be even"),
        (dict(seq_len=12, num_kv_pairs=4), ValueError, r"seq_len >= 16"),
        (dict(vocab_size=8, num_kv_pairs=4, seq_len=16), ValueError, "num_kv_pairs <= 3"),
        (dict(num_kv_pairs=0), ValueError, "num_kv_pairs must be >= 1"),
        (dict(power_a=0.0), ValueError, "power_a must be finite and > 0"),
        (dict(num_kv_pairs=2.0), TypeError, "num_kv_pairs must be an int"),
        (dict(random_non_queries=1), TypeError, "random_non_queries must be a bool"),
    ],
)
def test_bad_arguments_raise(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        mqar(2, **kw)

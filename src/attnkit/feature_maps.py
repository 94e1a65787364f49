"""Feature maps phi for kernelized ("linear") attention.

A feature map turns a key or query vector x in R^D into phi(x) in R^{D'} so that
the similarity sim(q, k) = phi(q) . phi(k) can be summed over keys *before* the
query is seen (Katharopoulos et al. 2020, eq. 6)::

    V'_i = phi(Q_i) (sum_j phi(K_j)^T V_j) / phi(Q_i) (sum_j phi(K_j)^T)

Every map is an ``nn.Module`` acting on the last axis ([..., D] -> [..., D'])
and knows its output width through ``out_dim(D)``. float16/bfloat16 inputs are mapped
in float32 and rounded once to the input dtype (a feature outside that dtype's range
raises ValueError); the attention ops call the maps on float32 copies anyway. Maps
are chosen by name from a registry::

    phi = attnkit.feature_maps.get("polynomial", degree=2, c=1.0)
    phi.out_dim(16)   # C(16 + 2, 2) = 153

``positive`` tells whether phi(q) . phi(k) > 0 for all inputs in exact arithmetic
(then the denominator of linear attention can only vanish by floating-point
underflow). Maps whose parameters depend on the input width (``needs_dim``, e.g. the
random projection of FAVOR+) are built with that width: by a layer, or by an op that
is given the map's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._numerics import check_output_range
from attnkit._registry import Registry

__all__ = [
    "EluPlusOne",
    "Favor",
    "FeatureMap",
    "Identity",
    "Polynomial",
    "PowerSeries",
    "ReLU",
    "Taylor",
    "available",
    "get",
    "register",
    "resolve",
]


class FeatureMap(nn.Module):
    """Base class of all feature maps: [..., D] -> [..., out_dim(D)]."""

    #: Registry name, set by :func:`register`.
    name: ClassVar[str] = ""
    #: True when phi(q) . phi(k) > 0 for every q, k in exact arithmetic (denominators
    #: of normalised attention cannot be <= 0; in floating point they can still
    #: underflow to 0 or overflow, which the ops check).
    positive: ClassVar[bool] = False
    #: True when the map draws parameters for one input width: it must be built with
    #: ``dim=D`` and accepts the keywords ``dim`` and ``seed`` (see :func:`resolve`).
    needs_dim: ClassVar[bool] = False

    def out_dim(self, d: int) -> int:
        """Width D' of phi(x) for inputs of width ``d``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def query_features(self, x: Tensor) -> Tensor:
        """phi(x) up to a positive factor per row, for the queries of *normalised* attention.

        phi(q) S / phi(q) . z does not change when phi(q) is multiplied by any positive
        number, so a map may rescale each query row to keep its features inside the
        floating-point range (FAVOR+ subtracts the row's largest logit before ``exp``).
        The state (S, z) is always built from the unscaled phi(k). Default: phi(x).
        """
        out: Tensor = self(x)
        return out

    def check_width(self, d: int) -> None:
        """Raise ValueError if inputs of width ``d`` cannot be mapped (default: any width)."""

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} input must be a torch.Tensor")
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} input must have a floating dtype, got {x.dtype}"
            )
        if x.dim() < 1:
            raise ValueError(f"{type(self).__name__} input must have a last axis [..., D]")


_REGISTRY: Registry[type[FeatureMap]] = Registry("feature map")


def register(name: str) -> Any:
    """Class decorator: register a :class:`FeatureMap` subclass under ``name``."""

    def add(cls: type[FeatureMap]) -> type[FeatureMap]:
        cls.name = name
        _REGISTRY.register(name)(cls)
        return cls

    return add


def get(name: str, **kwargs: Any) -> FeatureMap:
    """Build the feature map registered as ``name`` with keyword options ``kwargs``."""
    cls = _REGISTRY.get(name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"feature map {name!r}: {err}") from None


def available() -> list[str]:
    """Names of the registered feature maps."""
    return _REGISTRY.names()


def resolve(
    feature_map: str | FeatureMap, dim: int | None = None, *, seed: int | None = 0
) -> FeatureMap:
    """Accept a registered name or a :class:`FeatureMap` instance; return the instance.

    A name of a map that ``needs_dim`` (``"favor"``) is built for inputs of width
    ``dim`` with ``seed``: the ops pass the input width and ``seed=0``, so the same name
    means the same projection on every call and every rank; layers pass ``seed=None``
    (the global RNG), so every layer draws its own. Without ``dim`` such a map is built
    without parameters (enough for ``out_dim``; calling it raises). An instance is
    returned as is.
    """
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str):
        cls = _REGISTRY.get(feature_map)
        if cls.needs_dim and dim is not None:
            return get(feature_map, dim=dim, seed=seed)
        return get(feature_map)
    raise TypeError(
        "feature_map must be a registered name or a attnkit.feature_maps.FeatureMap, "
        f"got {type(feature_map).__name__}"
    )


@register("identity")
class Identity(FeatureMap):
    """phi(x) = x: plain (unnormalised-friendly) linear attention.

    Not positive: phi(q) . phi(k) = q.k takes either sign, so a normalised denominator
    can be <= 0 (linear attention then raises unless given ``eps``).
    """

    def out_dim(self, d: int) -> int:
        return d

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return x


@register("elu")
class EluPlusOne(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020). Strictly positive.

    In floating point elu(x) + 1 = (exp(x) - 1) + 1 rounds to exactly 0 for x below
    about -17 (float32; -37 in float64): a query and key whose coordinates are all
    that negative have similarity 0, which the ops report if a whole denominator
    vanishes. (exp(min(x, 0)) + max(x, 0) would keep such features > 0 down to -103,
    but costs 1.4x the feature pass here; inputs of linear attention are O(1).)
    """

    positive = True

    def out_dim(self, d: int) -> int:
        return d

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if x.dtype in (torch.float16, torch.bfloat16):
            # elu(x) rounded and then + 1 rounded again loses up to 2 units near x = -1.4
            return F.elu(x.float()).add_(1.0).to(x.dtype)
        return F.elu(x).add_(1.0)  # in place on the fresh elu output: one pass fewer


@register("relu")
class ReLU(FeatureMap):
    """phi(x) = max(x, 0). Non-negative, so a row's denominator *can* be zero.

    Not positive: a query with no positive coordinate in common with any key has
    denominator 0, which linear attention reports unless given ``eps``.
    """

    def out_dim(self, d: int) -> int:
        return d

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return torch.relu(x)


# --------------------------------------------------------------------------------------
# Exact maps of dot-product power series: sim(q, k) = sum_k a_k (q.k)^k, a_k >= 0
# --------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """Cached gather plan of a power-series map for one (D, device, dtype).

    ``steps[k - 2] = (parent, last)`` builds the degree-k monomials from the
    degree-(k-1) ones: ``mono_k = mono_{k-1}[..., parent] * x[..., last]``.
    ``coef`` [D'] multiplies the concatenated kept degree blocks, once.
    """

    steps: tuple[tuple[Tensor, Tensor], ...]
    coef: Tensor


def _children(last: Tensor, run: Tensor, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """Degree-k monomials (multisets i1 <= ... <= ik) from degree-(k-1) ones.

    ``last[j]`` is the largest variable index of parent monomial j and ``run[j]`` its
    multiplicity. Each parent gets one child per variable ``i >= last[j]``, so the
    children come out in lexicographic order of their sorted index tuples (for
    k = 2 this is exactly ``torch.triu_indices(d, d)``). Returns the children's
    ``(parent, last, run)``.
    """
    counts = d - last
    parent = torch.repeat_interleave(torch.arange(last.numel()), counts)
    start = torch.cumsum(counts, 0) - counts
    offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(start, counts)
    child_last = last[parent] + offset
    child_run = torch.where(offset == 0, run[parent] + 1, torch.ones_like(offset))
    return parent, child_last, child_run


class PowerSeries(FeatureMap):
    r"""Exact features of a dot-product power series, with symmetric storage.

    Identity (to floating-point rounding)::

        phi(q) . phi(k) = sum_{k=0..p} a_k (q.k)^k          (all a_k >= 0)

    Multinomial theorem: (q.k)^k = sum_{‖α‖₁=k} k!/α! prod_i (q_i k_i)^{α_i}, so one
    feature per monomial *multiset* α (i1 <= i2 <= ... <= ik) suffices::

        phi(x)_α = sqrt(a_{‖α‖₁} ‖α‖₁! / α!) prod_i x_i^{α_i}

    This stores C(D+k-1, k) features for degree k instead of the D^k of the tensor
    power x ⊗ ... ⊗ x, with the same inner product. Degrees with a_k = 0 are dropped:
    out_dim(D) = sum_{k: a_k > 0} C(D+k-1, k).

    Degree-k monomials are built from degree-(k-1) ones with one gather and one
    multiply per degree (for k = 2 the gather is ``torch.triu_indices``); the index
    and coefficient tensors are cached per (D, device, dtype) in a plain dict (not
    buffers: they are a pure function of D and never belong in a state_dict).
    Products are formed in float32 for float16/bfloat16 inputs (a degree-3 monomial
    of inputs around 40 already exceeds float16's 65504) and returned in the input
    dtype; a feature outside that dtype's range raises ValueError naming the dtype
    instead of becoming inf.

    Shapes: x [..., D] -> phi(x) [..., out_dim(D)].

    >>> from attnkit.feature_maps import PowerSeries
    >>> phi = PowerSeries([1.0, 2.0, 1.0])    # (q.k + 1)^2
    >>> phi.out_dim(3)
    10
    """

    def __init__(self, coefficients: Sequence[float]) -> None:
        super().__init__()
        coefs = tuple(coefficients)
        if not coefs:
            raise ValueError("PowerSeries needs at least one coefficient a_0")
        for k, a in enumerate(coefs):
            if isinstance(a, bool) or not isinstance(a, (int, float)):
                raise TypeError(
                    f"PowerSeries coefficient a_{k} must be a real number, got {type(a).__name__}"
                )
            if not math.isfinite(a) or a < 0:
                raise ValueError(
                    f"PowerSeries coefficient a_{k} must be finite and >= 0 (features are "
                    f"sqrt(a_k)-scaled), got {a}"
                )
        if coefs[-1] == 0:
            raise ValueError(
                f"PowerSeries top coefficient a_{len(coefs) - 1} must be > 0; drop trailing zeros"
            )
        self.coefficients: tuple[float, ...] = tuple(float(a) for a in coefs)
        self.degree: int = len(coefs) - 1
        self._plans: dict[tuple[int, torch.device, torch.dtype], _Plan] = {}

    def series(self, d: int) -> tuple[float, ...]:
        """Coefficients (a_0, ..., a_p) for inputs of width ``d``."""
        return self.coefficients

    def out_dim(self, d: int) -> int:
        # C(D+k-1, k) monomials of degree k (one, the constant, for k = 0).
        return sum(
            math.comb(d + k - 1, k) if k else 1 for k, a in enumerate(self.series(d)) if a > 0
        )

    def similarity(self, q: Tensor, k: Tensor) -> Tensor:
        """Reference kernel sum_k a_k (q.k)^k, computed directly: [..., D] x [..., D] -> [...]."""
        s = (q * k).sum(-1)
        out = torch.zeros_like(s)
        for a in reversed(self.series(q.shape[-1])):  # Horner
            out = out * s + a
        return out

    def extra_repr(self) -> str:
        return f"coefficients={self.coefficients}"

    def _plan(self, d: int, device: torch.device, dtype: torch.dtype) -> _Plan:
        key = (d, device, dtype)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        a = self.series(d)
        last = torch.arange(d)
        run = torch.ones(d, dtype=torch.long)
        mult = torch.ones(d, dtype=torch.float64)  # |α|! / α! for the current degree
        coefs = [torch.full((1,), a[0], dtype=torch.float64)] if a[0] > 0 else []
        if self.degree >= 1 and a[1] > 0:
            coefs.append(torch.full((d,), a[1], dtype=torch.float64))
        steps = []
        for k in range(2, self.degree + 1):
            if k == 2:
                # Hot path: x_i x_j for i <= j, row-major upper triangle.
                parent, last = torch.triu_indices(d, d)
                run = torch.where(parent == last, 2, 1)
            else:
                parent, last, run = _children(last, run, d)
            mult = mult[parent] * k / run
            steps.append((parent.to(device), last.to(device)))
            if a[k] > 0:
                coefs.append(a[k] * mult)
        coef = torch.cat(coefs).sqrt().to(device=device, dtype=dtype)
        plan = _Plan(tuple(steps), coef)
        self._plans[key] = plan
        return plan

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        half = x.dtype in (torch.float16, torch.bfloat16)
        if half:
            # Products of p inputs leave the half range long before float32's.
            out = self._features(x.float())
            check_output_range(out, x.dtype, f"{type(self).__name__} feature map", "a feature")
            return out.to(x.dtype)
        return self._features(x)

    def _features(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        a = self.series(d)
        plan = self._plan(d, x.device, x.dtype)
        blocks = [x.new_ones((*x.shape[:-1], 1))] if a[0] > 0 else []
        if self.degree >= 1 and a[1] > 0:
            blocks.append(x)
        mono = x
        for k, (parent, last) in enumerate(plan.steps, start=2):
            mono = mono.index_select(-1, parent) * x.index_select(-1, last)
            if a[k] > 0:
                blocks.append(mono)
        # cat always allocates, so scaling its result in place never touches x.
        return torch.cat(blocks, dim=-1).mul_(plan.coef)


@register("polynomial")
class Polynomial(PowerSeries):
    r"""Exact polynomial kernel map: phi(q) . phi(k) = (q.k + c)^p.

    Binomial expansion: (q.k + c)^p = sum_{k=0..p} C(p, k) c^{p-k} (q.k)^k, a
    :class:`PowerSeries` with a_k = C(p, k) c^{p-k}. The feature of monomial α is
    sqrt(C(p, ‖α‖₁) c^{p-‖α‖₁} ‖α‖₁!/α!) prod_i x_i^{α_i}, one per multiset, so

        out_dim(D) = C(D + p, p)        for c > 0
                   = C(D + p - 1, p)    for c = 0 (only the degree-p block is left)

    For p = 2, c = 1 (the quadratic kernel (q.k + 1)^2) this is, up to the order of the
    features, [1, sqrt(2) x_i, x_i^2, sqrt(2) x_i x_j (i < j)] of width
    1 + D + D(D+1)/2. Not ``positive``: (q.k + c)^p can be 0 (and < 0 for odd p), so
    linear attention needs a denominator guard.

    Shapes: x [..., D] -> phi(x) [..., out_dim(D)].

    >>> from attnkit.feature_maps import Polynomial
    >>> Polynomial(degree=2, c=1.0).out_dim(16)
    153
    """

    def __init__(self, degree: int = 2, c: float = 1.0) -> None:
        if isinstance(degree, bool) or not isinstance(degree, int):
            raise TypeError(f"polynomial degree must be an int, got {type(degree).__name__}")
        if degree < 1:
            raise ValueError(f"polynomial degree must be >= 1, got {degree}")
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            raise TypeError(f"polynomial c must be a real number, got {type(c).__name__}")
        if not math.isfinite(c):
            raise ValueError(f"polynomial c must be finite, got {c}")
        if c < 0:
            raise ValueError(
                f"polynomial c must be >= 0, got {c}: the feature coefficients "
                "sqrt(C(p, k) c^(p-k) k!/α!) would be imaginary"
            )
        self.c = float(c)
        super().__init__([math.comb(degree, k) * self.c ** (degree - k) for k in range(degree + 1)])

    def extra_repr(self) -> str:
        return f"degree={self.degree}, c={self.c}"


@register("taylor")
class Taylor(PowerSeries):
    r"""2nd-order Taylor map of softmax's exp(q.k / sqrt(D)), as in Based.

    Identity, with s = q.k / sqrt(D)::

        phi(q) . phi(k) = 1 + s + s^2 / 2

    i.e. a :class:`PowerSeries` with a = (1, 1/sqrt(D), 1/(2D)):
    phi(x) = [1, x_i / D^{1/4}, x_i^2 / sqrt(2D), x_i x_j / sqrt(D) (i < j)] (the
    off-diagonal products carry the sqrt(2) of the multinomial coefficient 2!/(1!1!)).
    Width 1 + D + D(D+1)/2: 153 for D = 16.

    ``positive``: 1 + s + s^2/2 = ((1 + s)^2 + 1) / 2 >= 1/2 > 0, so the linear
    attention denominator can never vanish.

    Relation to Based (Arora et al. 2024, "Simple linear attention language models
    balance the recall-throughput tradeoff"): Based uses the same kernel but stores
    the full outer product x ⊗ x / sqrt(2D), 1 + D + D^2 features (273 for D = 16);
    the symmetric storage here gives the identical inner product with ~half the
    quadratic features, so the state S [D', M] is ~half as large.

    Shapes: x [..., D] -> phi(x) [..., 1 + D + D(D+1)/2].
    """

    positive = True

    def __init__(self) -> None:
        super().__init__([1.0, 1.0, 0.5])

    def series(self, d: int) -> tuple[float, ...]:
        # Scale s = q.k / sqrt(d) into the coefficients: a_k = (1/k!) d^{-k/2}.
        return (1.0, 1.0 / math.sqrt(d), 0.5 / d) if d > 0 else (1.0, 0.0, 0.0)

    def extra_repr(self) -> str:
        return ""


# --------------------------------------------------------------------------------------
# Performer positive random features (FAVOR+)
# --------------------------------------------------------------------------------------


def _gaussian_projection(
    m: int, d: int, *, orthogonal: bool, generator: torch.Generator | None
) -> Tensor:
    """Draw W [m, d] whose rows are each marginally N(0, I_d) (float64, CPU).

    Orthogonal: blocks of d x d Haar-orthogonal matrices (QR of a Gaussian with the
    signs of diag(R) folded into Q) whose rows are rescaled by the norms of
    independent Gaussian d-vectors (chi_d), so every row is still N(0, I_d) while
    rows inside one block are exactly orthogonal (Choromanski et al. 2021, sec. 4).
    """
    f64 = torch.float64
    if not orthogonal:
        return torch.randn(m, d, dtype=f64, generator=generator)
    blocks = -(-m // d)
    q, r = torch.linalg.qr(torch.randn(blocks, d, d, dtype=f64, generator=generator))
    # Fold sign(diag R) into Q so that Q is Haar-distributed (QR alone is not).
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows: Tensor = q.transpose(-2, -1).reshape(blocks * d, d)[:m]  # orthonormal per block
    norms: Tensor = torch.linalg.vector_norm(
        torch.randn(m, d, dtype=f64, generator=generator), dim=1, keepdim=True
    )
    return rows * norms


@register("favor")
class Favor(FeatureMap):
    r"""Performer positive random features, FAVOR+ (Choromanski et al. 2021).

    With x' = s x (input scale s) and rows w_r of W [m, D] each N(0, I_D)::

        phi(x) = exp(W x' - ‖x'‖^2 / 2) / sqrt(m)                    [..., m]
        E_W[phi(q) . phi(k)] = exp(s^2 q.k)                           (unbiased)

    since E[exp(w.(q'+k'))] = exp(‖q'+k'‖^2 / 2). The default s = D^{-1/4} makes this
    softmax's kernel exp(q.k / sqrt(D)), as in Performer; ``input_scale`` overrides it.
    The relative error of one draw falls like 1/sqrt(m); orthogonal rows (default)
    lower it further.

    Two forms, one kernel:

    - ``forward`` (``phi(x)``) is the unbiased form above, for callers that need
      phi(q) . phi(k) itself (``kernel_attention(sim="linear")``, a state S, z built
      from keys, ``normalize=False``).
    - :meth:`query_features` is what normalised linear attention uses for queries:
      exp(W q' - max_r (W q')_r), i.e. phi(q) times a positive factor per query, which
      cancels in phi(q) S / phi(q) . z (the usual stabiliser; performer-pytorch
      subtracts the same row maximum). Without it a query's logits
      w_r.q' - ‖q'‖^2/2 all underflow once ‖q'‖^2/2 exceeds ~87 (float32): for
      inputs of std 2 at D = 64 with s = 1 that was 98% of the output rows, all zero.
      Keys keep the unbiased form: a per-key factor would not cancel, and one shared
      constant would have to be the same in every call that extends a state. Their
      logits are bounded above by max_r ‖w_r‖^2 / 2 (no overflow at D <= 128), and
      underflow only for ‖x'‖^2/2 beyond ~87 + ‖x'‖ max_r ‖w_r‖ (float32; at D = 64
      with the default scale, keys of std above ~6): the denominator then vanishes
      and the ops raise ValueError.

    The projection W is the buffer ``projection`` (in the state_dict, moved by
    ``.to()``), drawn at construction for width ``dim``. Maps built without ``dim``
    have no projection until one is loaded from a state_dict; calling them raises
    ValueError (layers and ops given the name ``"favor"`` build it with the width).
    ``seed`` seeds a private ``torch.Generator`` that also feeds later :meth:`redraw`
    calls (a seeded module's sequence of projections is reproducible); ``None``
    (default) draws from the global RNG, like any module's initial weights, so two
    layers built one after the other get different projections.

    Logits are computed in float32 at least (half inputs are upcast; the result is
    returned in the input dtype, a value outside its range raising ValueError).

    ``positive``: every feature is > 0, so phi(q) . phi(k) > 0 (up to underflow).

    Shapes: x [..., D] -> phi(x) [..., num_features].
    """

    positive = True
    needs_dim = True
    projection: Tensor | None

    def __init__(
        self,
        num_features: int = 256,
        dim: int | None = None,
        orthogonal: bool = True,
        input_scale: float | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise TypeError(f"favor num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"favor num_features must be >= 1, got {num_features}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"favor dim must be an int or None, got {type(dim).__name__}")
        if dim is not None and dim < 1:
            raise ValueError(f"favor dim must be >= 1, got {dim}")
        if input_scale is not None:
            if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)):
                raise TypeError(
                    "favor input_scale must be a real number or None, got "
                    f"{type(input_scale).__name__}"
                )
            if not (math.isfinite(input_scale) and input_scale > 0):
                raise ValueError(f"favor input_scale must be finite and > 0, got {input_scale}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"favor seed must be an int or None, got {type(seed).__name__}")
        self.num_features = num_features
        self.dim = dim
        self.orthogonal = bool(orthogonal)
        self.input_scale = None if input_scale is None else float(input_scale)
        self.seed = seed
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("projection", None)
        if dim is not None:
            self.projection = self._draw(dim, None).float()

    def out_dim(self, d: int) -> int:
        return self.num_features

    def scale(self, d: int) -> float:
        """The input scale s for inputs of width ``d``: ``input_scale``, or d^{-1/4}."""
        return d**-0.25 if self.input_scale is None else self.input_scale

    def extra_repr(self) -> str:
        scale = "D^-1/4" if self.input_scale is None else self.input_scale
        return (
            f"num_features={self.num_features}, dim={self.dim}, orthogonal={self.orthogonal}, "
            f"input_scale={scale}, seed={self.seed}"
        )

    def _draw(self, d: int, generator: torch.Generator | None) -> Tensor:
        gen = generator if generator is not None else self._generator
        return _gaussian_projection(self.num_features, d, orthogonal=self.orthogonal, generator=gen)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Replace W by a fresh draw (same shape, device and dtype).

        With ``generator`` the draw is reproducible from that generator's state;
        without it the module's own seeded stream (or the global RNG for
        ``seed=None``) is used.
        """
        if self.projection is None:
            raise ValueError(
                "favor.redraw(): this map has no projection (built without dim=); pass "
                "dim= at construction or load a state_dict"
            )
        old = self.projection
        self.projection = self._draw(old.shape[1], generator).to(old.device, old.dtype)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A map built without dim adopts the saved projection's shape.
        saved = state_dict.get(prefix + "projection")
        if self.projection is None and isinstance(saved, Tensor):
            self.projection = torch.empty_like(saved)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def check_width(self, d: int) -> None:
        w = self.projection
        if w is None:
            raise ValueError(
                f"favor map has no projection: build it with dim={d} (the input width), e.g. "
                f"feature_maps.get('favor', dim={d}); layers and ops given the name 'favor' "
                "do this themselves"
            )
        if w.shape[1] != d:
            raise ValueError(
                f"favor input width D={d} does not match the projection width "
                f"{w.shape[1]} (projection [{w.shape[0]}, {w.shape[1]}]); build a new map "
                "or pass inputs of the width it was drawn for"
            )

    def _logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(W x' [..., m], x') in float32 at least, on x's device."""
        self._check_input(x)
        d = x.shape[-1]
        if d < 1:
            raise ValueError(f"favor input must have width D >= 1, got shape {tuple(x.shape)}")
        self.check_width(d)
        w = _cast_projection(self.projection, x)
        xs = x.to(w.dtype) * self.scale(d)  # [..., D]
        return xs @ w.T, xs

    def forward(self, x: Tensor) -> Tensor:
        wx, xs = self._logits(x)
        # exp(wx - ‖x'‖^2/2) / sqrt(m), the 1/sqrt(m) folded into the row shift
        shift = 0.5 * (xs * xs).sum(-1, keepdim=True) + 0.5 * math.log(self.num_features)
        out = torch.exp(wx - shift)  # [..., m]
        if out.dtype != x.dtype:
            check_output_range(out, x.dtype, "favor feature map", "a feature")
        return out.to(x.dtype)

    def query_features(self, x: Tensor) -> Tensor:
        """exp(W x' - max_r (W x')_r): phi(x) times a positive factor per row, in (0, 1].

        The row's largest feature is exactly 1, so no query row underflows or
        overflows; the factor exp(‖x'‖^2/2 + max_r (W x')_r) sqrt(m) cancels in
        normalised attention. The shift is detached: the ratio does not depend on it.
        """
        wx, _ = self._logits(x)
        out = torch.exp(wx - wx.detach().amax(dim=-1, keepdim=True))
        return out.to(x.dtype)


def _cast_projection(w: Tensor | None, x: Tensor) -> Tensor:
    """The projection on x's device in x's dtype promoted to float32 at least."""
    if w is None:  # pragma: no cover - check_width raised already
        raise ValueError("favor map has no projection")
    dtype = torch.promote_types(torch.promote_types(x.dtype, w.dtype), torch.float32)
    return w.to(device=x.device, dtype=dtype)

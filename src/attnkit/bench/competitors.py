"""Optional competitors, imported lazily: a function, or the reason it is missing.

None of these packages is a dependency of attnkit; they are benchmark-only
extras (``pip install flash-linear-attention fla-core performer-pytorch``). A
missing package gives a :class:`Missing` whose ``reason`` becomes a "skipped" row,
never an exception.

Layouts at this boundary: fla's linear-attention references take [B, T, H, D]
(its native layout; the cases build inputs in it rather than transposing inside
the timed call); fla's Based reference, performer-pytorch and
pytorch-fast-transformers take [B, H, T, D], attnkit's own layout.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "FAST_TRANSFORMERS_BUILD_NOTE",
    "Missing",
    "fast_transformers_causal_product",
    "fla_naive_based",
    "fla_naive_chunk_linear_attn",
    "import_optional",
    "performer_fast_attention",
]

#: Why pytorch-fast-transformers is absent on a CPU-only machine (it is not built here).
FAST_TRANSFORMERS_BUILD_NOTE = (
    "pytorch-fast-transformers not installed: its setup.py always builds a CUDAExtension, "
    "so `pip install pytorch-fast-transformers` fails on a machine without the CUDA "
    'toolkit with "OSError: CUDA_HOME environment variable is not set"'
)


@dataclass(frozen=True)
class Missing:
    """A competitor that cannot run here, and why (shown as "skipped: <reason>")."""

    reason: str


def import_optional(module: str, package: str) -> ModuleType | Missing:
    """Import ``module`` (from pip package ``package``) or say why it cannot be.

    Import-time chatter (fla warns that Triton is unsupported on a CPU) is
    silenced; any import error other than "not installed" is reported with its
    message rather than raised.
    """
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ModuleNotFoundError as err:
        # Not installed: the missing module is the one asked for or a parent package.
        if err.name is not None and (module == err.name or module.startswith(err.name + ".")):
            return Missing(f"{package} not installed")
        return Missing(f"{package}: import of {module} failed: {err}")
    except ImportError as err:  # installed but broken (e.g. sys.modules[name] = None)
        return Missing(f"{package}: import of {module} failed: {err}")
    except Exception as err:  # a competitor's import must never crash the benchmark
        return Missing(f"{package}: import of {module} failed: {type(err).__name__}: {err}")


def _attr(module: ModuleType | Missing, name: str, package: str) -> Any:
    if isinstance(module, Missing):
        return module
    fn = getattr(module, name, None)
    if fn is None:
        return Missing(f"{package}: {module.__name__}.{name} not found (API changed?)")
    return fn


def fla_naive_chunk_linear_attn() -> Callable[..., Any] | Missing:
    """``fla.ops.linear_attn.naive.naive_chunk_linear_attn(q, k, v, scale, normalize)``.

    Plain-torch chunked causal linear attention (chunk 64), [B, T, H, D] layout,
    T a multiple of 64; returns the output only.
    """
    mod = import_optional("fla.ops.linear_attn.naive", "flash-linear-attention")
    fn: Callable[..., Any] | Missing = _attr(mod, "naive_chunk_linear_attn", "fla")
    return fn


def fla_naive_based() -> Callable[..., Any] | Missing:
    """``fla.ops.based.naive.naive_parallel_based(q, k, v, scale, use_norm)``.

    Quadratic (materialises the [T, T] scores) causal 1 + s + s^2 / 2 attention in
    [B, H, T, D] layout: the same kernel as attnkit's ``taylor`` feature map.
    """
    mod = import_optional("fla.ops.based.naive", "flash-linear-attention")
    fn: Callable[..., Any] | Missing = _attr(mod, "naive_parallel_based", "fla")
    return fn


def performer_fast_attention() -> type[Any] | Missing:
    """``performer_pytorch.FastAttention`` (FAVOR+), [B, H, T, D] layout."""
    mod = import_optional("performer_pytorch", "performer-pytorch")
    cls: type[Any] | Missing = _attr(mod, "FastAttention", "performer-pytorch")
    return cls


def fast_transformers_causal_product() -> Callable[..., Any] | Missing:
    """``fast_transformers.causal_product.causal_dot_product(q, k, v)`` (unnormalised).

    The EPFL causal-product kernel (CPU and CUDA extensions) of
    pytorch-fast-transformers, [B, H, T, D] layout.
    """
    mod = import_optional("fast_transformers.causal_product", "pytorch-fast-transformers")
    if isinstance(mod, Missing):
        if mod.reason.endswith("not installed"):
            return Missing(FAST_TRANSFORMERS_BUILD_NOTE)
        return mod
    fn: Callable[..., Any] | Missing = _attr(mod, "causal_dot_product", "pytorch-fast-transformers")
    return fn

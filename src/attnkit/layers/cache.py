"""Per-layer decoding caches: what one attention layer keeps between decoding calls.

- :class:`KVCache` (softmax / argmax / kernel backends): the keys [B, Hk, n, d_k] and
  values [B, Hk, n, d_v] of the n tokens seen so far, in preallocated buffers whose
  capacity doubles when full, so appending a token is a slice write, not a
  ``torch.cat`` of the whole history. Only the Hk key/value heads are stored: with
  n_heads = h, MQA (Hk = 1) stores 1/h and GQA with g groups (Hk = g) g/h of MHA
  (Shazeer 2019; Ainslie et al. 2023).
- :class:`LinearState` (linear backend): the recurrent state (S [B, Hk, D', d_v],
  z [B, Hk, D']) of causal linear attention, whose size does not depend on n.
- :class:`DeltaState` (Gated DeltaNet / DeltaNet layers): the short convolution's
  last K - 1 inputs [B, C, K - 1] and the delta-rule state [B, Hv, d_k, d_v]; also
  independent of n.

Shape legend::

    B batch, Hk key/value heads, n cached tokens, L tokens appended by one call,
    d_k key width per head, d_v value width per head, D' feature width of phi
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._validation import check_float, check_int, check_rank, check_tensor
from attnkit.ops.linear import LinearAttentionState

__all__ = ["DeltaState", "KVCache", "LinearState"]


def _check_max_len(max_len: object) -> int | None:
    return None if max_len is None else check_int("max_len", max_len, 1)


class KVCache:
    """Keys and values of one attention layer, appended token by token.

    ``update(k, v)`` writes the L new tokens into preallocated buffers and returns
    views of everything cached so far. When the buffers are full their capacity
    doubles (never beyond ``max_len``) and the cached prefix is copied once, so n
    appended tokens cost O(n) copies in total, not the O(n^2) of a per-token
    ``torch.cat``.

    dtype and device: the constructor's ``dtype``/``device`` are what the cache
    reports until the first update; the buffers are allocated at the first
    ``update`` with that update's dtype and device, which are then fixed (later
    updates in another dtype raise ``TypeError``, on another device ``ValueError``;
    nothing is cast silently). ``device="meta"`` gives a cache that tracks shapes
    and :attr:`nbytes` without allocating memory.

    Autograd: with grad mode on and k or v requiring grad, the buffers are cloned
    before each write (an O(n) copy per call, as ``torch.cat`` would do) so the
    views handed out by earlier calls are never modified in place and backward
    through several decoding calls is exact. Under ``torch.no_grad()`` /
    ``torch.inference_mode()`` (the normal decoding case) writes are in place.

    Shapes::

        update(k [B, Hk, L, d_k], v [B, Hk, L, d_v]) -> (k [B, Hk, n, d_k], v [B, Hk, n, d_v])
        buffers [B, Hk, capacity, d_k] and [B, Hk, capacity, d_v]

    >>> import torch
    >>> from attnkit.layers.cache import KVCache
    >>> cache = KVCache(batch=2, n_kv_heads=1, d_k=4, d_v=8)
    >>> k, v = cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 8))
    >>> tuple(k.shape), tuple(v.shape), cache.seq_len, cache.nbytes
    ((2, 1, 3, 4), (2, 1, 3, 8), 3, 288)
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        d_k: int,
        d_v: int,
        *,
        capacity: int = 16,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.batch = check_int("batch", batch, 1)
        self.n_kv_heads = check_int("n_kv_heads", n_kv_heads, 1)
        self.d_k = check_int("d_k", d_k, 1)
        self.d_v = check_int("d_v", d_v, 1)
        self.max_len = _check_max_len(max_len)
        capacity = check_int("capacity", capacity, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._dtype = dtype
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._capacity = capacity if self.max_len is None else min(capacity, self.max_len)
        self._len = 0
        self._k: Tensor | None = None  # [B, Hk, capacity, d_k], allocated by the first update
        self._v: Tensor | None = None  # [B, Hk, capacity, d_v]

    # ------------------------------------------------------------------ properties
    @property
    def seq_len(self) -> int:
        """Number n of cached tokens."""
        return self._len

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold before they must grow (planned size before the first update)."""
        return self._capacity

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the cached keys/values (the first update's, else the constructor's)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the cached keys/values (the first update's, else the constructor's)."""
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys and values (seq_len tokens, not the spare capacity).

        B · Hk · n · (d_k + d_v) · itemsize.
        """
        per_token = self.batch * self.n_kv_heads * (self.d_k + self.d_v)
        return self._len * per_token * self._dtype.itemsize

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the buffers including spare capacity (0 before the first update)."""
        if self._k is None or self._v is None:
            return 0
        return self._k.nbytes + self._v.nbytes

    def __repr__(self) -> str:
        return (
            f"KVCache(batch={self.batch}, n_kv_heads={self.n_kv_heads}, d_k={self.d_k}, "
            f"d_v={self.d_v}, seq_len={self._len}, capacity={self._capacity}, "
            f"max_len={self.max_len}, dtype={self._dtype}, device={self._device})"
        )

    # ------------------------------------------------------------------ checks
    def check_append(self, length: int) -> None:
        """Raise ValueError if ``length`` more tokens would exceed ``max_len``."""
        requested = self._len + length
        if self.max_len is not None and requested > self.max_len:
            raise ValueError(
                f"KVCache is full: appending {length} token(s) to {self._len} cached would "
                f"need length {requested}, but max_len={self.max_len}"
            )

    def check_batch(self, batch: int, name: str = "input") -> None:
        """Raise ValueError unless ``batch`` equals the cache's batch size."""
        if batch != self.batch:
            raise ValueError(
                f"batch size mismatch: the cache was built for batch={self.batch}, "
                f"{name} has batch={batch}"
            )

    def _check_kv(self, k: object, v: object) -> tuple[Tensor, Tensor]:
        k = check_tensor("k", k)
        v = check_tensor("v", v)
        check_rank("k", k, "B Hk L d_k")
        check_rank("v", v, "B Hk L d_v")
        check_float("k", k)
        check_float("v", v)
        self.check_batch(k.shape[0], "k")
        self.check_batch(v.shape[0], "v")
        want_k = (self.batch, self.n_kv_heads, k.shape[2], self.d_k)
        want_v = (self.batch, self.n_kv_heads, k.shape[2], self.d_v)
        if tuple(k.shape) != want_k:
            raise ValueError(
                f"k must have shape [B, Hk, L, d_k] = {list(want_k)}, got {list(k.shape)}"
            )
        if tuple(v.shape) != want_v:
            raise ValueError(
                f"v must have shape [B, Hk, L, d_v] = {list(want_v)} (L from k), "
                f"got {list(v.shape)}"
            )
        if k.dtype != v.dtype:
            raise TypeError(f"k and v must share one dtype, got k={k.dtype}, v={v.dtype}")
        if k.device != v.device:
            raise ValueError(f"k and v must be on one device, got k={k.device}, v={v.device}")
        if self._k is not None:
            if k.dtype != self._dtype:
                raise TypeError(
                    f"the cache holds {self._dtype} keys/values; got k, v of dtype {k.dtype} "
                    "(reset() does not change the dtype: build a new cache)"
                )
            if k.device != self._device:
                raise ValueError(
                    f"the cache lives on {self._device}; got k, v on {k.device} "
                    "(build a new cache on that device)"
                )
        return k, v

    # ------------------------------------------------------------------ updates
    def _grow(self, needed: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """Make the buffers hold ``needed`` tokens: double the capacity, copy the prefix once."""
        capacity = self._capacity
        while capacity < needed:
            capacity *= 2
        if self.max_len is not None:
            capacity = min(capacity, self.max_len)
        B, Hk, n = self.batch, self.n_kv_heads, self._len
        k_new = torch.empty(B, Hk, capacity, self.d_k, dtype=dtype, device=device)
        v_new = torch.empty(B, Hk, capacity, self.d_v, dtype=dtype, device=device)
        if self._k is not None and self._v is not None and n:
            k_new[:, :, :n] = self._k[:, :, :n]
            v_new[:, :, :n] = self._v[:, :, :n]
        self._k, self._v = k_new, v_new
        self._capacity, self._dtype, self._device = capacity, dtype, device
        return k_new, v_new

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k [B, Hk, L, d_k], v [B, Hk, L, d_v]; return views of all cached keys/values.

        Returns (k [B, Hk, n, d_k], v [B, Hk, n, d_v]) with n = seq_len after the
        append. The views alias the cache's buffers: they stay valid until the next
        ``update``/``crop``/``reset``; clone them to keep them longer.

        Raises ValueError for a batch, head-count, width or rank mismatch or when the
        append would exceed ``max_len``, TypeError for a dtype mismatch; the cache is
        unchanged when it raises.
        """
        k, v = self._check_kv(k, v)
        L = k.shape[2]
        self.check_append(L)
        n, end = self._len, self._len + L
        k_buf, v_buf = self._k, self._v
        if k_buf is None or v_buf is None or end > self._capacity:
            k_buf, v_buf = self._grow(end, k.dtype, k.device)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Earlier views may be saved for backward: write into fresh copies instead.
            k_buf, v_buf = k_buf.clone(), v_buf.clone()
            self._k, self._v = k_buf, v_buf
        k_buf[:, :, n:end] = k  # [B, Hk, L, d_k] into the free slots
        v_buf[:, :, n:end] = v
        self._len = end
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached tokens and forget the rest (capacity is kept)."""
        length = check_int("length", length, 0)
        if length > self._len:
            raise ValueError(f"cannot crop to length={length}: only {self._len} tokens are cached")
        self._len = length

    def reset(self) -> None:
        """Forget every cached token; the buffers (capacity, dtype, device) are reused."""
        self._len = 0


class LinearState:
    """Recurrent state of causal linear attention for one layer; constant size.

    Holds the :class:`~attnkit.ops.linear.LinearAttentionState` (S [B, Hk, D', d_v],
    z [B, Hk, D']) of the tokens seen so far, ``None`` before the first token, and
    counts them in :attr:`seq_len`. Its size depends on neither n nor ``max_len``:
    that is what makes linear attention an RNN at decoding time (Katharopoulos et
    al. 2020, sec. 3.4). ``max_len``, when given, is still enforced so every cache
    kind fails the same way when decoding runs past it.

    ``batch``/``n_kv_heads``, when given, are checked against every new state.
    ``dtype``, when given, is the dtype of the inputs that will be folded in; the ops
    keep S and z in its accumulation dtype ``promote(dtype, float32)`` (float32 for
    half and float32 inputs, float64 for float64), and :meth:`advance` raises TypeError
    for a state of any other dtype, so a float64 cache is never silently rounded to
    float32 (nor the reverse). ``device`` is informative only.
    """

    def __init__(
        self,
        batch: int | None = None,
        n_kv_heads: int | None = None,
        *,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.batch = None if batch is None else check_int("batch", batch, 1)
        self.n_kv_heads = None if n_kv_heads is None else check_int("n_kv_heads", n_kv_heads, 1)
        self.max_len = _check_max_len(max_len)
        floating = isinstance(dtype, torch.dtype) and dtype.is_floating_point
        if dtype is not None and not floating:
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._state: LinearAttentionState | None = None
        self._len = 0

    @property
    def state(self) -> LinearAttentionState | None:
        """(S [B, Hk, D', d_v], z [B, Hk, D']) after ``seq_len`` tokens; None before the first."""
        return self._state

    @property
    def seq_len(self) -> int:
        """Number of tokens folded into the state."""
        return self._len

    @property
    def nbytes(self) -> int:
        """Bytes of S and z (0 before the first token); independent of seq_len."""
        if self._state is None:
            return 0
        return self._state.S.nbytes + self._state.z.nbytes

    def __repr__(self) -> str:
        shape = None if self._state is None else list(self._state.S.shape)
        return (
            f"LinearState(batch={self.batch}, n_kv_heads={self.n_kv_heads}, "
            f"seq_len={self._len}, S={shape}, max_len={self.max_len})"
        )

    def check_append(self, length: int) -> None:
        """Raise ValueError if ``length`` more tokens would exceed ``max_len``."""
        requested = self._len + length
        if self.max_len is not None and requested > self.max_len:
            raise ValueError(
                f"LinearState is full: appending {length} token(s) to {self._len} seen would "
                f"need length {requested}, but max_len={self.max_len}"
            )

    def check_batch(self, batch: int, name: str = "input") -> None:
        """Raise ValueError unless ``batch`` equals the state's batch size (if it has one)."""
        if self.batch is not None and batch != self.batch:
            raise ValueError(
                f"batch size mismatch: the cache was built for batch={self.batch}, "
                f"{name} has batch={batch}"
            )

    def advance(self, state: LinearAttentionState | tuple[Tensor, Tensor], length: int) -> None:
        """Replace the state by ``state``, which has folded in ``length`` more tokens."""
        length = check_int("length", length, 0)
        S, z = state
        check_tensor("S", S)
        check_tensor("z", z)
        check_rank("S", S, "B Hk D' d_v")
        check_rank("z", z, "B Hk D'")
        self.check_batch(S.shape[0], "S")
        if self.n_kv_heads is not None and S.shape[1] != self.n_kv_heads:
            raise ValueError(
                f"S must have n_kv_heads={self.n_kv_heads} heads [B, Hk, D', d_v], "
                f"got shape {list(S.shape)}"
            )
        if tuple(z.shape) != tuple(S.shape[:3]):
            raise ValueError(
                f"z must have shape [B, Hk, D'] = {list(S.shape[:3])} to match S, "
                f"got {list(z.shape)}"
            )
        if self.dtype is not None:
            acc = torch.promote_types(self.dtype, torch.float32)
            for name, t in (("S", S), ("z", z)):
                if t.dtype != acc:
                    raise TypeError(
                        f"this LinearState holds the state of {self.dtype} inputs, kept in "
                        f"{acc}; got {name} of dtype {t.dtype} (decode with {self.dtype} "
                        "inputs, or build the cache with that dtype)"
                    )
        self.check_append(length)
        self._state = LinearAttentionState(S, z)
        self._len += length

    def reset(self) -> None:
        """Forget every token: the state goes back to None."""
        self._state = None
        self._len = 0


class DeltaState:
    """Decoding state of one delta-rule layer (:class:`attnkit.layers.GatedDeltaNet`).

    Two tensors whose size does not depend on the number n of tokens seen (that is the
    point: a delta-rule layer decodes like an RNN, Yang et al. 2024):

    - ``conv`` [B, C, K - 1]: the short convolution's last K - 1 inputs (zeros at the
      start, the same as causal zero padding), in the layer's dtype; None without a
      convolution;
    - ``state`` [B, Hv, d_k, d_v]: the delta-rule state S, fp32 (fp64 for fp64
      layers) whatever the layer's dtype.

    Both are allocated (zeros) at construction, so :attr:`nbytes` is the same before
    the first token and after a million. ``max_len``, when given, is enforced as by the
    other caches.
    """

    def __init__(
        self,
        batch: int,
        n_heads: int,
        d_k: int,
        d_v: int,
        conv_channels: int,
        conv_kernel: int | None,
        *,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.batch = check_int("batch", batch, 1)
        self.n_heads = check_int("n_heads", n_heads, 1)
        self.n_kv_heads: int | None = None  # not a key/value cache (read by generic checks)
        check_int("d_k", d_k, 1)
        check_int("d_v", d_v, 1)
        check_int("conv_channels", conv_channels, 1)
        self.max_len = _check_max_len(max_len)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        dev = torch.device("cpu") if device is None else torch.device(device)
        acc = torch.promote_types(dtype, torch.float32)
        self.conv: Tensor | None = None
        if conv_kernel is not None:
            K = check_int("conv_kernel", conv_kernel, 1)
            self.conv = torch.zeros(batch, conv_channels, K - 1, dtype=dtype, device=dev)
        self.state = torch.zeros(batch, n_heads, d_k, d_v, dtype=acc, device=dev)
        self._len = 0

    @property
    def seq_len(self) -> int:
        """Number of tokens folded into the state."""
        return self._len

    @property
    def nbytes(self) -> int:
        """Bytes of the conv window and the state: B (C (K - 1) itemsize + Hv d_k d_v 4)."""
        conv = 0 if self.conv is None else self.conv.nbytes
        return conv + self.state.nbytes

    def __repr__(self) -> str:
        conv = None if self.conv is None else list(self.conv.shape)
        return (
            f"DeltaState(batch={self.batch}, seq_len={self._len}, conv={conv}, "
            f"state={list(self.state.shape)}, max_len={self.max_len})"
        )

    def check_append(self, length: int) -> None:
        """Raise ValueError if ``length`` more tokens would exceed ``max_len``."""
        requested = self._len + length
        if self.max_len is not None and requested > self.max_len:
            raise ValueError(
                f"DeltaState is full: appending {length} token(s) to {self._len} seen would "
                f"need length {requested}, but max_len={self.max_len}"
            )

    def check_batch(self, batch: int, name: str = "input") -> None:
        """Raise ValueError unless ``batch`` equals the state's batch size."""
        if batch != self.batch:
            raise ValueError(
                f"batch size mismatch: the cache was built for batch={self.batch}, "
                f"{name} has batch={batch}"
            )

    def advance(self, conv: Tensor | None, state: Tensor, length: int) -> None:
        """Replace the conv window and the state by those after ``length`` more tokens."""
        length = check_int("length", length, 0)
        self.check_append(length)
        if tuple(state.shape) != tuple(self.state.shape):
            raise ValueError(
                f"state must have shape {list(self.state.shape)}, got {list(state.shape)}"
            )
        if (conv is None) != (self.conv is None) or (
            conv is not None and self.conv is not None and conv.shape != self.conv.shape
        ):
            want = None if self.conv is None else list(self.conv.shape)
            got = None if conv is None else list(conv.shape)
            raise ValueError(f"conv must have shape {want}, got {got}")
        self.conv = conv
        self.state = state
        self._len += length

    def reset(self) -> None:
        """Forget every token: zeros again (same shapes, dtype and device)."""
        if self.conv is not None:
            self.conv = torch.zeros_like(self.conv)
        self.state = torch.zeros_like(self.state)
        self._len = 0

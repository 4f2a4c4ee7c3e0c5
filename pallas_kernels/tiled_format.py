"""Unstructured tiled sparsity (Flash-LLM style, 50-95% sparse): two layouts.

``TiledSparse`` (per-tile column-ELL) is the decode layout: its Pallas kernel streams
only stored nonzeros and does work per nonzero. ``TiledBitmap`` (bitmap + packed values)
is expanded to dense tiles in registers and multiplied on tensor cores: work per dense
entry, fewer bytes. Measured trade-offs are in ``benchmarks/unstructured.md``.

TiledSparse layout
------------------
A weight W [..., K, N] (``y = x @ W``) is cut into tiles of ``tile_k`` rows by ``tile_n``
columns; tile (kt, nt) covers rows ``kt*tile_k ..`` and columns ``nt*tile_n ..``.
Inside a tile every column keeps its nonzeros as a list of *slots*; the tile stores
``cap`` slot rows, where ``cap`` is the largest nonzero count of any of its columns
(rounded up to ``slot_align``). Slot row j of a tile holds, for each of its tile_n
columns, the j-th nonzero of that column (ascending K) or padding:

* ``values`` [..., S, tile_n], weight dtype: the nonzero, or 0 for padding.
* ``rows``   [..., S, tile_n], uint8 (tile_k <= 256) or uint16: the K row of that
  nonzero inside its tile (0 for padding; padding is recognised by its value 0).
* ``offsets`` [..., N//tile_n, K//tile_k + 1] int32: tile (kt, nt) owns slot rows
  ``offsets[nt, kt] : offsets[nt, kt + 1]``. Tiles are stored column-tile major
  (all K tiles of column tile 0, then column tile 1, ...), so ``offsets[nt, -1] ==
  offsets[nt + 1, 0]`` and one column tile's slots over any K range are one
  contiguous stream.

``S`` (static) is the total slot count; with leading batch dims every matrix is padded
with zero slots to the largest S of the stack. Every nonzero is stored: nothing is dropped.

Bytes: ``nbytes = S*tile_n*(itemsize + rows.itemsize) + offsets`` (times the batch),
padding slots included. Per nonzero that is 3 bytes (bf16 value + uint8 row) times
the padding factor ``slots / nnz`` (1 / ``slot_fill``): on random 80%-sparse
4096 x 14336 with 256 x 32 tiles the factor is 1.27, i.e. 0.38 of the dense bf16
bytes (bitmap: 0.33; 2:4 at 50%: 0.56).

Why column-ELL for decode
-------------------------
Pallas Triton has no value-level gather or scatter and no shared-memory scatter, so
Flash-LLM's "scatter each nonzero into a shared-memory tile" cannot be written. What
it has is gathering *ref* loads (``x_ref[idx, :]``) and elementwise math. Column-ELL
needs work per *stored* nonzero only: a contiguous, vectorised load of a
[chunk, tile_n] block of values and rows, one gathering load of the activations
``x^T[k0 + row, :]`` (an L1 hit: a tile spans only tile_k rows of x) and one FMA per
token; the per-column sum is elementwise over slot rows, so no scatter is needed.
The price is per-tile padding to the longest column (counted in ``nbytes``) and, as
tokens grow, L1 traffic: each slot gathers ``t * 2`` bytes from a random row of a
``tile_k``-row window, so one warp-wide gather touches ~4 cache lines at t=1 but ~25
at t=16. Measured on an H100 at 80% sparsity (4096 x 14336): 2.1x faster than XLA
dense at 1 token, 1.5x at 4, break-even at 8, slower beyond.

The bitmap alternative needs a word test, a popcount (the value's index) and a
gathering value load per *dense* entry; on the H100 its expansion costs a flat
~55-62 us per 4096 x 14336 matrix whatever the token count (0.8-0.94x of dense at
80%), so it beats column-ELL from ~8 tokens on that shape but not dense.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.checks import (check_layout, dim, expect_multiple, expect_positive_ints,
                                   matrix_shape)

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MAX_TILE_K = 65536
DEFAULT_TILE_K = 256
DEFAULT_TILE_N = 32


def _default_tile_k(k: int) -> int:
    """The largest divisor of ``k`` that is <= 256 (one-byte row indices)."""
    return max(d for d in range(1, min(k, DEFAULT_TILE_K) + 1) if k % d == 0)


def _default_tile_n(n: int) -> int:
    """The largest power of two <= 32 that divides ``n``."""
    t = DEFAULT_TILE_N
    while n % t:
        t //= 2
    return t


def _rows_dtype(tile_k: int) -> np.dtype:
    return np.dtype(np.uint8) if tile_k <= 256 else np.dtype(np.uint16)


def _tiles(k: int, n: int, tile_k: int | None, tile_n: int | None,
           slot_align: int) -> tuple[int, int]:
    """The tile sizes for a [K, N] weight (defaults filled in), after checking they fit."""
    for name, value in (("tile_k", tile_k), ("tile_n", tile_n)):
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, np.integer))):
            raise ValueError(f"TiledSparse: {name} must be an int or None, got {value!r}")
    tile_k = _default_tile_k(k) if tile_k is None else int(tile_k)
    tile_n = _default_tile_n(n) if tile_n is None else int(tile_n)
    if not 1 <= tile_k <= MAX_TILE_K:
        raise ValueError(f"{tile_k=} must be in [1, {MAX_TILE_K}]")
    if k % tile_k:
        raise ValueError(f"K={k} must be a multiple of {tile_k=}")
    if tile_n < 1 or tile_n & (tile_n - 1):
        raise ValueError(f"{tile_n=} must be a power of two")
    if n % tile_n:
        raise ValueError(f"N={n} must be a multiple of {tile_n=}")
    if isinstance(slot_align, bool) or not isinstance(slot_align, int) or slot_align < 1:
        raise ValueError(f"{slot_align=} must be an int >= 1")
    return tile_k, tile_n


class _StoredValues:
    """What both layouts derive from their stored arrays (``_arrays``) and nonzero ``values``."""

    _arrays: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape [..., K, N]."""
        return self.batch_shape + (self.k, self.n)

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Stored bytes of every array, padding included."""
        return int(sum(getattr(self, name).nbytes for name in self._arrays))

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same weight stored dense in its dtype."""
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize

    @property
    def nnz(self) -> int:
        """Stored nonzeros (needs concrete values, not a tracer)."""
        return int(np.count_nonzero(np.asarray(self.values)))

    @property
    def density(self) -> float:
        """Fraction of the dense entries that are nonzero (needs concrete values)."""
        return self.nnz / math.prod(self.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TiledSparse(_StoredValues):
    """Unstructured sparse W [..., K, N] in per-tile column-ELL (see the module docstring).

    Attributes:
      values: [..., S, tile_n] weight dtype (f32, bf16, f16); 0 in padding slots.
      rows: [..., S, tile_n] uint8 (tile_k <= 256) else uint16, K row inside the tile.
      offsets: [..., K//tile_k + 1 ... ] int32, shape [..., N//tile_n, K//tile_k + 1]:
        tile (kt, nt) owns slot rows ``offsets[nt, kt] : offsets[nt, kt + 1]``.
      k, n: dense K and N. tile_k, tile_n: tile size. slot_align: each tile's slot
        count is a multiple of this.
    """

    values: jax.Array
    rows: jax.Array
    offsets: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    tile_k: int = dataclasses.field(metadata=dict(static=True))
    tile_n: int = dataclasses.field(metadata=dict(static=True))
    slot_align: int = dataclasses.field(default=1, metadata=dict(static=True))

    def __post_init__(self):  # static checks only: leaves may be tracers or placeholders
        expect_positive_ints("TiledSparse", tile_k=self.tile_k, tile_n=self.tile_n,
                             slot_align=self.slot_align)
        if self.tile_k > MAX_TILE_K:
            raise ValueError(f"TiledSparse: tile_k={self.tile_k} must be <= {MAX_TILE_K}")
        k = expect_multiple("TiledSparse", "k", self.k, self.tile_k)
        n = expect_multiple("TiledSparse", "n", self.n, self.tile_n)
        check_layout("TiledSparse", values=(self.values, (None, self.tile_n), "floating"),
                     rows=(self.rows, (dim(self.values, -2), self.tile_n),
                           _rows_dtype(self.tile_k)),
                     offsets=(self.offsets, (n // self.tile_n, k // self.tile_k + 1), jnp.int32))

    _arrays = ("values", "rows", "offsets")

    # ---------------------------------------------------------------- properties
    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[:-2])

    @property
    def num_slots(self) -> int:
        """S: slot rows per matrix (padding included)."""
        return int(self.values.shape[-2])

    @property
    def grid(self) -> tuple[int, int]:
        """(K // tile_k, N // tile_n): tiles along K and along N."""
        return self.k // self.tile_k, self.n // self.tile_n

    @property
    def slot_fill(self) -> float:
        """nnz / stored slots: 1.0 means no padding."""
        total = math.prod(self.batch_shape) * self.num_slots * self.tile_n
        return self.nnz / max(total, 1)

    # ---------------------------------------------------------------- conversion
    @classmethod
    def from_dense(cls, w: Any, *, tile_k: int | None = None, tile_n: int | None = None,
                   slot_align: int = 1) -> TiledSparse:
        """Compress a (pruned) dense weight W [..., K, N] into per-tile column-ELL.

        Args:
          w: concrete array [..., K, N], f32 / bf16 / f16, finite. Zeros are dropped,
            every nonzero is kept.
          tile_k: rows per tile, must divide K, <= 65536 (<= 256 gives uint8 rows).
            Default: the largest divisor of K that is <= 256.
          tile_n: columns per tile, a power of two dividing N. Default: the largest
            power of two <= 32 dividing N.
          slot_align: each tile's slot count is rounded up to a multiple of this.

        Returns:
          TiledSparse with ``to_dense() == w`` exactly.

        Raises:
          ValueError: traced input, rank < 2, unsupported dtype, NaN/Inf (naming the
            first offending entry and its tile), or tile sizes that do not divide.
        """
        if isinstance(w, jax.core.Tracer):
            raise ValueError("TiledSparse.from_dense needs a concrete array (its slot count "
                             "depends on the nonzero pattern); call it outside jit")
        dtype = jnp.dtype(getattr(w, "dtype", np.asarray(w).dtype))
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
        arr = np.asarray(w)
        if arr.ndim < 2:
            raise ValueError(f"w must be [..., K, N] (rank >= 2), got shape {arr.shape}")
        *batch, k, n = arr.shape
        if k == 0 or n == 0:
            raise ValueError(f"K and N must be positive, got shape {arr.shape}")
        tile_k, tile_n = _tiles(k, n, tile_k, tile_n, slot_align)
        bad = ~_finite_mask(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            r, c = idx[-2], idx[-1]
            raise ValueError(
                f"w has a non-finite value {arr[idx]} at index {idx} (batch {idx[:-2]}, "
                f"tile (kt={r // tile_k}, nt={c // tile_n})); NaN/Inf weights cannot be stored")

        flat = arr.reshape((-1, k, n))
        parts = [_compress_one(m, tile_k, tile_n, slot_align) for m in flat]
        s_max = max(1, max(p[0].shape[0] for p in parts))  # >= 1 slot: no zero-size arrays
        rdt = _rows_dtype(tile_k)
        values = np.zeros((len(parts), s_max, tile_n), arr.dtype)
        rows = np.zeros((len(parts), s_max, tile_n), rdt)
        offsets = np.stack([p[2] for p in parts])
        for i, (v, r, _) in enumerate(parts):
            values[i, :v.shape[0]] = v
            rows[i, :r.shape[0]] = r
        bshape = tuple(batch)
        return cls(
            values=jnp.asarray(values.reshape(bshape + values.shape[1:]), dtype),
            rows=jnp.asarray(rows.reshape(bshape + rows.shape[1:])),
            offsets=jnp.asarray(offsets.reshape(bshape + offsets.shape[1:]), jnp.int32),
            k=k, n=n, tile_k=tile_k, tile_n=tile_n, slot_align=slot_align)

    @classmethod
    def abstract(cls, shape: tuple[int, ...], dtype: Any, *, num_slots: int,
                 tile_k: int | None = None, tile_n: int | None = None,
                 slot_align: int = 1) -> TiledSparse:
        """The layout ``from_dense`` gives a W of ``shape`` [..., K, N] and ``dtype`` with
        ``num_slots`` slot rows (S depends on the data), its arrays ``jax.ShapeDtypeStruct``."""
        batch, k, n = matrix_shape("TiledSparse.abstract", shape)
        expect_positive_ints("TiledSparse.abstract", num_slots=num_slots)
        tile_k, tile_n = _tiles(k, n, tile_k, tile_n, slot_align)
        slots = (*batch, num_slots, tile_n)
        return cls(values=jax.ShapeDtypeStruct(slots, jnp.dtype(dtype)),
                   rows=jax.ShapeDtypeStruct(slots, _rows_dtype(tile_k)),
                   offsets=jax.ShapeDtypeStruct((*batch, n // tile_n, k // tile_k + 1), jnp.int32),
                   k=k, n=n, tile_k=tile_k, tile_n=tile_n, slot_align=slot_align)

    def to_dense(self) -> jax.Array:
        """The dense weight [..., K, N] in ``self.dtype`` (traceable)."""
        fn = _to_dense_one
        for _ in self.batch_shape:
            fn = jax.vmap(fn, in_axes=(0, 0, 0, None))
        return fn(self.values, self.rows, self.offsets, self._static())

    def _static(self) -> tuple[int, int, int, int]:
        return (self.k, self.n, self.tile_k, self.tile_n)


def _finite_mask(w: np.ndarray) -> np.ndarray:
    """Elementwise isfinite; 16-bit floats are tested on their exponent bits (fast)."""
    if w.dtype.itemsize == 2:
        bits = w.view(np.uint16)
        exp = np.uint16(0x7F80 if w.dtype == jnp.bfloat16 else 0x7C00)
        return (bits & exp) != exp
    return np.isfinite(w)


def _nonzero_mask(w: np.ndarray) -> np.ndarray:
    """w != 0 (-0.0 counts as zero); 16-bit floats are tested on their bits (fast)."""
    if w.dtype.itemsize == 2:
        return (w.view(np.uint16) & np.uint16(0x7FFF)) != 0
    return w != 0


def _compress_one(w: np.ndarray, tile_k: int, tile_n: int, slot_align: int):
    """One matrix [K, N] -> (values [S, tile_n], rows [S, tile_n], offsets [NT, KT+1])."""
    k, n = w.shape
    kt_count, nt_count = k // tile_k, n // tile_n
    nz = _nonzero_mask(w)
    # Nonzero count per (K tile, column), then per-tile capacity = longest column.
    col_counts = nz.reshape(kt_count, tile_k, n).sum(axis=1)                    # [KT, N]
    cap = col_counts.reshape(kt_count, nt_count, tile_n).max(axis=2)            # [KT, NT]
    cap = -(-cap // slot_align) * slot_align
    caps = cap.T.reshape(-1).astype(np.int64)                                   # nt-major
    starts = np.concatenate([[0], np.cumsum(caps)])
    total = int(starts[-1])
    offsets = np.empty((nt_count, kt_count + 1), np.int64)
    offsets[:, :kt_count] = starts[:-1].reshape(nt_count, kt_count)
    offsets[:, kt_count] = starts[kt_count::kt_count]
    if total >= 2**31:
        raise ValueError(f"{total} slot rows do not fit int32 offsets; use larger tiles")
    # Rank of each nonzero inside its (K tile, column): a running count down the tile.
    run = nz.astype(np.uint16 if tile_k < 2**16 else np.int32)
    np.cumsum(run.reshape(kt_count, tile_k, n), axis=1, out=run.reshape(kt_count, tile_k, n))
    flat = np.flatnonzero(nz)
    rank = run.reshape(-1)[flat].astype(np.int64) - 1
    rws, cols = np.divmod(flat, n)
    kt = rws // tile_k
    slot = offsets[cols // tile_n, kt] + rank
    values = np.zeros((total, tile_n), w.dtype)
    rows = np.zeros((total, tile_n), _rows_dtype(tile_k))
    values[slot, cols % tile_n] = w.reshape(-1)[flat]
    rows[slot, cols % tile_n] = rws % tile_k
    return values, rows, offsets.astype(np.int32)


def _to_dense_one(values: jax.Array, rows: jax.Array, offsets: jax.Array,
                  static: tuple[int, int, int, int]) -> jax.Array:
    """values/rows [S, tile_n], offsets [NT, KT+1] -> dense [K, N]."""
    k, n, tile_k, tile_n = static
    kt_count, nt_count = k // tile_k, n // tile_n
    s = values.shape[0]
    starts = offsets[:, :kt_count].reshape(-1)                                   # [NT*KT]
    slot = jnp.arange(s, dtype=jnp.int32)
    # The tile of each slot row: the last tile whose start is <= slot (empty tiles share
    # their start with the next tile and sort first, so they are never picked).
    tile = jnp.searchsorted(starts, slot, side="right").astype(jnp.int32) - 1   # [S]
    tile = jnp.clip(tile, 0, nt_count * kt_count - 1)
    nt, kt = tile // kt_count, tile % kt_count
    r = kt[:, None] * tile_k + rows.astype(jnp.int32)                            # [S, tile_n]
    c = nt[:, None] * tile_n + jnp.arange(tile_n, dtype=jnp.int32)[None, :]      # [S, tile_n]
    # Padding slots (value 0, row 0) are sent out of bounds and dropped, so every kept
    # write lands on a distinct entry: a plain set, no atomics.
    r = jnp.where(values != 0, r, k)
    dense = jnp.zeros((k, n), values.dtype)
    return dense.at[r.reshape(-1), c.reshape(-1)].set(values.reshape(-1), mode="drop",
                                                       unique_indices=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TiledBitmap(_StoredValues):
    """Unstructured sparse W [..., K, N] as a bitmap plus packed values (tensor-core path).

    Layout:
      words: [..., K, N//32] int32; bit b of ``words[r, j]`` is set iff W[r, 32*j + b] != 0.
      woff:  [..., K, N//32] int32; index in ``values`` of the first nonzero of that word.
      values: [..., V] weight dtype; the nonzeros ordered by column tile (``tile_n``
        columns), then row, then column, so one column tile streams contiguously; at least
        one trailing 0 (stacks are padded to the longest).

    A kernel expands a [block_k, tile_n] tile in registers: per entry one AND with its
    column bit, one popcount of the lower bits added to ``woff`` (the value's index), and
    one gathering load of the value, then multiplies on tensor cores. Bytes: 2 bits of
    metadata per dense entry plus the values (``nbytes``), with no padding; the expansion
    work is per dense entry, so it pays off from a few tokens up (see ``unstructured``).
    """

    words: jax.Array
    woff: jax.Array
    values: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    tile_n: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):  # static checks only: leaves may be tracers or placeholders
        expect_positive_ints("TiledBitmap", k=self.k, tile_n=self.tile_n)
        n = expect_multiple("TiledBitmap", "n", self.n, 32)
        if self.tile_n < 32 or self.tile_n & (self.tile_n - 1) or n % self.tile_n:
            raise ValueError(f"TiledBitmap: tile_n={self.tile_n} must be a power of two >= 32 "
                             f"dividing n={n}")
        check_layout("TiledBitmap", words=(self.words, (self.k, n // 32), jnp.int32),
                     woff=(self.woff, (self.k, n // 32), jnp.int32),
                     values=(self.values, (None,), "floating"))

    _arrays = ("words", "woff", "values")

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[:-1])

    @classmethod
    def from_dense(cls, w: Any, *, tile_n: int | None = None) -> TiledBitmap:
        """Compress a (pruned) dense W [..., K, N]; ``to_dense()`` returns it exactly.

        Args:
          w: concrete [..., K, N], f32 / bf16 / f16, finite; N a multiple of 32.
          tile_n: column tile of the value order, a power of two >= 32 dividing N.
            Default: the largest of 128, 64, 32 dividing N.

        Raises:
          ValueError: as ``TiledSparse.from_dense``, or N not a multiple of 32.
        """
        if isinstance(w, jax.core.Tracer):
            raise ValueError("TiledBitmap.from_dense needs a concrete array (its value count "
                             "depends on the nonzero pattern); call it outside jit")
        dtype = jnp.dtype(getattr(w, "dtype", np.asarray(w).dtype))
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of float32, bfloat16, float16, got {dtype}")
        arr = np.asarray(w)
        if arr.ndim < 2:
            raise ValueError(f"w must be [..., K, N] (rank >= 2), got shape {arr.shape}")
        *batch, k, n = arr.shape
        if k == 0 or n % 32 or n == 0:
            raise ValueError(f"K must be positive and N a multiple of 32, got shape {arr.shape}")
        if tile_n is None:
            tile_n = next(t for t in (128, 64, 32) if n % t == 0)
        if tile_n < 32 or tile_n & (tile_n - 1) or n % tile_n:
            raise ValueError(f"{tile_n=} must be a power of two >= 32 dividing N={n}")
        bad = ~_finite_mask(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"w has a non-finite value {arr[idx]} at index {idx} (batch "
                             f"{idx[:-2]}, word {idx[-1] // 32} of row {idx[-2]}); NaN/Inf "
                             "weights cannot be stored")
        flat = arr.reshape((-1, k, n))
        parts = [_bitmap_one(m, tile_n) for m in flat]
        v_max = max(p[2].shape[0] for p in parts) + 1
        values = np.zeros((len(parts), v_max), arr.dtype)
        for i, p in enumerate(parts):
            values[i, :p[2].shape[0]] = p[2]
        bshape = tuple(batch)
        words = np.stack([p[0] for p in parts]).reshape(bshape + (k, n // 32))
        woff = np.stack([p[1] for p in parts]).reshape(bshape + (k, n // 32))
        return cls(words=jnp.asarray(words), woff=jnp.asarray(woff),
                   values=jnp.asarray(values.reshape(bshape + (v_max,)), dtype),
                   k=k, n=n, tile_n=tile_n)

    def to_dense(self) -> jax.Array:
        """The dense weight [..., K, N] in ``self.dtype`` (traceable)."""
        fn = _bitmap_to_dense_one
        for _ in self.batch_shape:
            fn = jax.vmap(fn)
        return fn(self.words, self.woff, self.values)


def _bitmap_one(w: np.ndarray, tile_n: int):
    """One [K, N] -> (words [K, N/32] int32, woff [K, N/32] int32, values [nnz])."""
    k, n = w.shape
    nz = _nonzero_mask(w)
    words = np.packbits(nz, axis=1, bitorder="little").view("<u4").view(np.int32)
    counts = nz.reshape(k, n // 32, 32).sum(axis=2, dtype=np.int64)             # [K, N/32]
    nt, wpt = n // tile_n, tile_n // 32
    # Value order (column tile, row, column): exclusive prefix of word counts in that order.
    c_t = counts.reshape(k, nt, wpt).transpose(1, 0, 2).reshape(-1)
    starts = np.cumsum(c_t) - c_t
    if starts.size and starts[-1] + c_t[-1] >= 2**31:
        raise ValueError("too many nonzeros for int32 offsets")
    woff = starts.reshape(nt, k, wpt).transpose(1, 0, 2).reshape(k, n // 32).astype(np.int32)
    w_t = w.reshape(k, nt, tile_n).transpose(1, 0, 2)
    values = w_t[nz.reshape(k, nt, tile_n).transpose(1, 0, 2)]
    return np.ascontiguousarray(words), woff, values


def _bitmap_to_dense_one(words: jax.Array, woff: jax.Array, values: jax.Array) -> jax.Array:
    """words/woff [K, N/32], values [V] -> dense [K, N]."""
    k, nw = words.shape
    bit = jnp.arange(32, dtype=jnp.int32)[None, None, :]
    w3 = words[:, :, None]
    present = (w3 & jnp.left_shift(1, bit)) != 0                                 # [K, N/32, 32]
    idx = woff[:, :, None] + lax.population_count(w3 & (jnp.left_shift(1, bit) - 1))
    dense = jnp.where(present, values[jnp.where(present, idx, 0)], 0)
    return dense.reshape(k, nw * 32).astype(values.dtype)

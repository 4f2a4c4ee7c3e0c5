"""Structured-sparse weight formats: N:M along K (``NMSparse``) and Samoyeds (``SamoyedsSparse``).

Weights are stored for ``y = x @ W`` with W [K, N] (K: reduction dim, N: outputs); expert stacks
carry leading dims, e.g. [e, K, N]. Both formats are frozen-dataclass pytrees: the arrays are
leaves, the sizes static, so a format object passes through ``jit``, ``tree.map`` (slicing an
expert off a stack keeps it a valid format) and ``device_put`` like an array.

Common API: ``from_dense`` (one jitted program on W's device, ``nm_encode``; checks that W
already has the pattern and raises ``ValueError`` naming the first offending group; it never
prunes), ``abstract`` (the layout
``from_dense`` gives a dense shape and dtype, without data), ``to_dense()`` (jnp, traceable),
``shape`` (dense shape), ``dtype``, ``nbytes``, ``density``.

NMSparse, n:m along K (``n``:``m`` in (2,4), (1,4), (2,8), (4,8))::

    dense W [K, N]           values [K*n/m, N]                meta [K*n/m/per_word, N] int32
    rows g*m .. g*m+m-1  ->  rows g*n .. g*n+n-1 (slot s =    b bits per kept value: its position
    (group g, per column)    the s-th kept position, asc.)    p in 0..m-1 inside its group

Kept value r (compressed row r, any column) sits in meta word ``r // per_word``, bits
``[b*(r % per_word), b*(r % per_word) + b)``; b = 2 for m = 4, b = 4 for m = 8 (3 bits would do;
4 keeps per_word = 32 // b a power of two, so a tile of rows maps to whole words), per_word = 16
or 8. Bit 31 may be set: treat words as uint32 bit fields. Groups with fewer than n nonzeros are
padded with the (zero) entries at the lowest unused positions, so positions stay strictly
ascending. Needs K % m == 0 and (K*n/m) % per_word == 0 (2:4 and 2:8: K % 32; 1:4: K % 64;
4:8: K % 16).

Why this layout: a kernel tile of rows [r0, r0 + bk*n/m) x columns [c0, c0 + bn) is one
rectangular, contiguous-along-N load from ``values`` plus one from ``meta`` (bk*n/m/per_word whole
word rows), with no per-tile offsets; the words unpack with shifts and masks in registers.

SamoyedsSparse, vector-wise n_sel:m_sel:v column selection plus 2:4 along K (default 1:2:128,
25% density): in each slab of v rows of K, the N columns form groups of m_sel consecutive
columns and n_sel columns of each group are kept (which ones may change from slab to slab);
the kept [K, Nc = N*n_sel/m_sel] matrix Wc is then 2:4 along K and stored like
``NMSparse(n=2, m=4)``. ``sel`` [K/v, Nc] int8 holds the offset (0..m_sel-1, ascending within a
group) of the kept column: dense column = (c // n_sel) * m_sel + sel[slab, c]. Needs K % v == 0,
v % 32 == 0 (whole meta words per slab), N % m_sel == 0.

Why this layout: the kernel computes the dense-looking product x @ Wc (tiles as for 2:4) and
routes each slab's partial product to one of m_sel accumulator sets by ``sel`` (or, equivalently,
scatters it into the dense output columns); ``sel`` costs one byte per kept column per slab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import (check_layout, dim, expect_multiple, expect_positive_ints,
                                   matrix_shape)

NM_PATTERNS: tuple[tuple[int, int], ...] = ((2, 4), (1, 4), (2, 8), (4, 8))
SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def meta_bits(m: int) -> int:
    """Bits of metadata per kept value: 2 for m = 4, 4 for m = 8."""
    if m not in (4, 8):
        raise ValueError(f"m must be 4 or 8, got {m=}")
    return 2 if m == 4 else 4


def values_per_word(m: int) -> int:
    """Kept values whose positions share one int32 meta word: 32 // meta_bits(m)."""
    return 32 // meta_bits(m)


def nm_k_multiple(n: int, m: int) -> int:
    """Smallest K step for n:m: K % m == 0 and (K*n/m) % per_word == 0 (32 for 2:4)."""
    _check_nm(n, m)
    per_word = values_per_word(m)
    return m * per_word // math.gcd(n, per_word)


def _check_nm(n: int, m: int) -> None:
    if (n, m) not in NM_PATTERNS:
        raise ValueError(f"(n, m) must be one of {NM_PATTERNS}, got {(n, m)}")


def _size(x: Any) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


# --------------------------------------------------------------------------------- meta words


@functools.partial(jax.jit, static_argnums=(1, 2))
def unpack_meta(meta: jax.Array, n: int, m: int) -> jax.Array:
    """Positions of the kept values from packed meta words (jnp only; traceable).

    Args:
      meta: [..., R // per_word, N] int32 (uint32 bit fields), as in ``NMSparse.meta``.
      n, m: the pattern (for validation; the bit width depends on m).

    Returns:
      [..., R, N] int32, each kept value's position 0..m-1 inside its group of m dense rows;
      R = K*n//m.
    """
    _check_nm(n, m)
    bits, per_word = meta_bits(m), values_per_word(m)
    if meta.ndim < 2:
        raise ValueError(f"meta must be [..., words, N], got shape {meta.shape}")
    words = jax.lax.bitcast_convert_type(meta.astype(jnp.int32), jnp.uint32)
    lead = meta.shape[:-2]
    shifts = (bits * jnp.arange(per_word, dtype=jnp.uint32)).reshape(
        (1,) * len(lead) + (1, per_word, 1))
    pos = (words[..., :, None, :] >> shifts) & jnp.uint32((1 << bits) - 1)  # [..., W, pw, N]
    return pos.astype(jnp.int32).reshape(lead + (meta.shape[-2] * per_word, meta.shape[-1]))


@functools.partial(jax.jit, static_argnums=(1, 2))
def pack_meta(positions: jax.Array, n: int, m: int) -> jax.Array:
    """Inverse of :func:`unpack_meta` (jnp only): [..., R, N] positions -> [..., R // per_word, N] int32."""
    _check_nm(n, m)
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"pack_meta: positions must have an integer dtype (row positions in "
                        f"[0, {m})), got {positions.dtype}")
    bits, per_word = meta_bits(m), values_per_word(m)
    r, cols = positions.shape[-2:]
    if r % per_word:
        raise ValueError(f"kept rows {r=} must be a multiple of {per_word=} (values per meta word)")
    lead = positions.shape[:-2]
    pos = positions.astype(jnp.uint32).reshape(lead + (r // per_word, per_word, cols))
    shifts = (bits * jnp.arange(per_word, dtype=jnp.uint32)).reshape(
        (1,) * len(lead) + (1, per_word, 1))
    # Disjoint bit fields, so a sum is the bitwise or.
    words = jnp.sum(pos << shifts, axis=-2, dtype=jnp.uint32)
    return jax.lax.bitcast_convert_type(words, jnp.int32)


# --------------------------------------------------------------------------------- input checks


def _matrix_stack(w: Any, name: str = "w") -> tuple[jax.Array, list[int]]:
    """W [..., K, N] of a supported dtype as a device stack [B, K, N] and its leading dims;
    ValueError for a traced value, a bad shape or dtype (checked before any copy)."""
    if isinstance(w, jax.core.Tracer):
        raise ValueError(
            f"from_dense checks the pattern on concrete values; {name} is a traced value "
            "(call it outside jit)")
    if not hasattr(w, "dtype"):
        w = np.asarray(w)
    shape = tuple(w.shape)
    if len(shape) < 2 or 0 in shape[-2:]:
        raise ValueError(f"{name} must be [..., K, N] with at least 2 dims and K, N > 0, got shape "
                         f"{shape}")
    if jnp.dtype(w.dtype).name not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {w.dtype}")
    lead = list(shape[:-2])
    return jnp.asarray(w).reshape(-1, *shape[-2:]), lead


def _raise_non_finite(found: Any, arr: jax.Array, lead: list[int], name: str = "w") -> None:
    """ValueError naming the first non-finite entry of a stack (``nm_encode.Finding``)."""
    count, matrix, index = found
    if count:
        where = (*(np.unravel_index(matrix, lead) if lead else ()),
                 *np.unravel_index(index, arr.shape[-2:]))
        where = tuple(int(i) for i in where)
        value = arr[(matrix, *where[len(lead):])]
        raise ValueError(f"{name} must be finite; got {value} at index {where} ({count} "
                         "non-finite entries in that matrix)")


def _matrix_label(i: int, lead: list[int]) -> str:
    """Names flat matrix ``i`` of a stack with leading dims ``lead`` ("" for one matrix)."""
    index = ", ".join(str(int(j)) for j in np.unravel_index(i, lead))
    return f"matrix w[{index}], " if lead else ""


def _unflat(x: jax.Array, lead: list[int]) -> jax.Array:
    """[B, ...] -> [*lead, ...]."""
    return x.reshape(*lead, *x.shape[1:])


# --------------------------------------------------------------------------------- NMSparse


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class NMSparse:
    """W [..., K, N] with at most n nonzeros in every group of m consecutive rows of K.

    Attributes:
      values: [..., K*n//m, N] weight dtype; row g*n + s is slot s of group g.
      meta: [..., K*n//m // per_word, N] int32; packed positions (see module docstring).
      n, m: the pattern (static). k: dense K (static).
    """

    values: jax.Array
    meta: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):  # static checks only: leaves may be tracers or placeholders
        _check_nm(self.n, self.m)
        kept = expect_multiple("NMSparse", "k", self.k, nm_k_multiple(self.n, self.m)) // self.m
        kept, words = kept * self.n, kept * self.n // values_per_word(self.m)
        check_layout("NMSparse", values=(self.values, (kept, None), "floating"),
                     meta=(self.meta, (words, dim(self.values, -1)), jnp.int32))

    @classmethod
    def from_dense(cls, w: Any, *, n: int = 2, m: int = 4) -> NMSparse:
        """Compress W [..., K, N] that already is n:m along K: one jitted program on W's device
        (host arrays go to the default device); not traceable (it checks the values).

        Raises:
          ValueError: unsupported (n, m) or dtype, non-finite entries, K not a multiple of
            ``nm_k_multiple(n, m)``, or a group with more than n nonzeros (the first one is
            named: matrix index, dense rows, column, count).
        """
        from pallas_kernels.nm_encode import encode_nm

        _check_nm(n, m)
        arr, lead = _matrix_stack(w)
        k, cols = arr.shape[-2:]
        step = nm_k_multiple(n, m)
        if k % step:
            raise ValueError(
                f"K={k} must be a multiple of {step} for {n}:{m} (K % {m} == 0 and K*{n}/{m} "
                f"kept rows a multiple of {values_per_word(m)}, the values per meta word)")
        enc = encode_nm(arr, n=n, m=m)
        _raise_non_finite(enc.non_finite, arr, lead)
        over, found = enc.over, enc.over_found
        if over.count:
            g, c = divmod(over.index, cols)
            raise ValueError(
                f"w is not {n}:{m} along K: {_matrix_label(over.matrix, lead)}rows "
                f"{g * m}..{g * m + m - 1} (group {g}), column {c} has {found} nonzeros, "
                f"at most {n} allowed ({over.count} such groups in this matrix)")
        return cls(values=_unflat(enc.values, lead), meta=_unflat(enc.meta, lead), n=n, m=m, k=k)

    @classmethod
    def abstract(cls, shape: tuple[int, ...], dtype: Any, *, n: int = 2, m: int = 4) -> NMSparse:
        """The ``from_dense`` result for a W of ``shape`` [..., K, N] and ``dtype``, its arrays
        ``jax.ShapeDtypeStruct`` (no data): the layout a stored weight must have."""
        _check_nm(n, m)
        lead, k, cols = matrix_shape("NMSparse.abstract", shape)
        if k % nm_k_multiple(n, m):
            raise ValueError(f"K={k} must be a multiple of {nm_k_multiple(n, m)} for {n}:{m}")
        kept = k * n // m
        return cls(values=jax.ShapeDtypeStruct((*lead, kept, cols), jnp.dtype(dtype)),
                   meta=jax.ShapeDtypeStruct((*lead, kept // values_per_word(m), cols),
                                             jnp.int32),
                   n=n, m=m, k=k)

    def positions(self) -> jax.Array:
        """[..., K*n//m, N] int32: position 0..m-1 of each kept value inside its group."""
        return unpack_meta(self.meta, self.n, self.m)

    def to_dense(self) -> jax.Array:
        """[..., K, N] dense W in the values' dtype (jnp; traceable)."""
        return _nm_to_dense(self.values, self.meta, self.n, self.m)

    @property
    def shape(self) -> tuple[int, ...]:
        """Dense shape (..., K, N)."""
        return tuple(self.values.shape[:-2]) + (self.k, self.values.shape[-1])

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.values.dtype)

    @property
    def nbytes(self) -> int:
        """Stored bytes: values plus meta (= ``nbytes_for(shape, dtype, n, m)``)."""
        return _size(self.values) + _size(self.meta)

    @property
    def density(self) -> float:
        """Fraction of the dense entries stored, n/m (stored entries may themselves be zero)."""
        return self.n / self.m

    @staticmethod
    def nbytes_for(shape: tuple[int, ...], dtype: Any, n: int, m: int) -> int:
        """Bytes of an NMSparse of dense ``shape``: K*N*(n/m)*itemsize + K*N*(n/m)*bits/8."""
        _check_nm(n, m)
        *lead, k, cols = shape
        kept = math.prod(lead) * (k * n // m) * cols
        return kept * jnp.dtype(dtype).itemsize + kept // values_per_word(m) * 4


@functools.partial(jax.jit, static_argnums=(2, 3))
def _nm_to_dense(values: jax.Array, meta: jax.Array, n: int, m: int) -> jax.Array:
    lead, (r, cols) = values.shape[:-2], values.shape[-2:]
    g = r // n
    pos = unpack_meta(meta, n, m).reshape(lead + (g, n, cols))
    vals = values.reshape(lead + (g, n, cols))
    j = jnp.arange(m, dtype=jnp.int32).reshape((1,) * len(lead) + (1, m, 1))
    dense = jnp.zeros(lead + (g, m, cols), values.dtype)
    for s in range(n):  # kept positions are distinct: a select per slot, no arithmetic
        dense = jnp.where(pos[..., :, s:s + 1, :] == j, vals[..., :, s:s + 1, :], dense)
    return dense.reshape(lead + (g * m, cols))


# --------------------------------------------------------------------------------- Samoyeds


def _check_samoyeds(n_sel: int, m_sel: int, v: int) -> None:
    expect_positive_ints("SamoyedsSparse", n_sel=n_sel, m_sel=m_sel, v=v)
    if not n_sel <= m_sel <= 127:
        raise ValueError(f"need 1 <= n_sel <= m_sel <= 127 (sel is int8), got {n_sel=}, {m_sel=}")
    if v % 32:
        raise ValueError(f"v must be a multiple of 32 (whole 2:4 meta words per slab), got {v=}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SamoyedsSparse:
    """W [..., K, N]: per K slab of v rows, n_sel of every m_sel columns kept; 2:4 along K inside.

    Attributes:
      values: [..., K//2, Nc] weight dtype; 2:4 values of Wc (Nc = N*n_sel//m_sel).
      meta: [..., K//32, Nc] int32; 2:4 positions of Wc, packed as in ``NMSparse``.
      sel: [..., K//v, Nc] int8; offset of the kept column inside its group, per slab.
      n_sel, m_sel, v, k (dense K), n_out (dense N): static.
    """

    values: jax.Array
    meta: jax.Array
    sel: jax.Array
    n_sel: int = dataclasses.field(metadata=dict(static=True))
    m_sel: int = dataclasses.field(metadata=dict(static=True))
    v: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))
    n_out: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):  # static checks only: leaves may be tracers or placeholders
        _check_samoyeds(self.n_sel, self.m_sel, self.v)
        k = expect_multiple("SamoyedsSparse", "k", self.k, self.v)
        nc = expect_multiple("SamoyedsSparse", "n_out", self.n_out, self.m_sel) // self.m_sel
        nc *= self.n_sel
        check_layout("SamoyedsSparse", values=(self.values, (k // 2, nc), "floating"),
                     meta=(self.meta, (k // 32, nc), jnp.int32),
                     sel=(self.sel, (k // self.v, nc), (jnp.int8, jnp.int16)))

    @classmethod
    def from_dense(cls, w: Any, *, n_sel: int = 1, m_sel: int = 2, v: int = 128) -> SamoyedsSparse:
        """Compress W [..., K, N] that already has the pattern: one jitted program on W's device
        (host arrays go to the default device); not traceable (it checks the values).

        Where a group of a slab has fewer than n_sel nonzero columns, the lowest unused offsets
        are kept (their entries are zero).

        Raises:
          ValueError: bad n_sel/m_sel/v, dtype, non-finite entries, K % v or N % m_sel not 0, a
            slab's column group with more than n_sel nonzero columns, or a kept column that is
            not 2:4 along K (the first offender is named: matrix, slab, rows, columns, count).
        """
        from pallas_kernels.nm_encode import encode_samoyeds

        _check_samoyeds(n_sel, m_sel, v)
        arr, lead = _matrix_stack(w)
        k, n_out = arr.shape[-2:]
        if k % v:
            raise ValueError(f"K={k} must be a multiple of v={v}")
        if n_out % m_sel:
            raise ValueError(f"N={n_out} must be a multiple of m_sel={m_sel}")
        groups = n_out // m_sel
        enc = encode_samoyeds(arr, n_sel=n_sel, m_sel=m_sel, v=v)
        _raise_non_finite(enc.non_finite, arr, lead)
        over, columns, not_24, found = enc.over, enc.over_columns, enc.not_24, enc.not_24_found
        if over.count:
            s, g = divmod(over.index, groups)
            raise ValueError(
                f"w is not {n_sel}:{m_sel}:{v} column-selected: "
                f"{_matrix_label(over.matrix, lead)}slab {s} (rows {s * v}..{s * v + v - 1}), "
                f"column group {g} (columns {g * m_sel}..{g * m_sel + m_sel - 1}) has "
                f"{int(columns.sum())} nonzero columns (offsets {np.flatnonzero(columns).tolist()}), "
                f"at most {n_sel} allowed ({over.count} such groups in this matrix)")
        if not_24.count:
            nc = groups * n_sel
            g4, c = divmod(not_24.index, nc)
            s = g4 * 4 // v
            offset = int(enc.sel[not_24.matrix, s, c])
            raise ValueError(
                f"kept columns of w are not 2:4 along K: "
                f"{_matrix_label(not_24.matrix, lead)}slab {s}, rows {g4 * 4}..{g4 * 4 + 3}, "
                f"column {(c // n_sel) * m_sel + offset} (compressed column {c}) has {found} "
                f"nonzeros, at most 2 allowed ({not_24.count} such groups in this matrix)")
        return cls(values=_unflat(enc.values, lead), meta=_unflat(enc.meta, lead),
                   sel=_unflat(enc.sel, lead), n_sel=n_sel, m_sel=m_sel, v=v, k=k, n_out=n_out)

    @classmethod
    def abstract(cls, shape: tuple[int, ...], dtype: Any, *, n_sel: int = 1, m_sel: int = 2,
                 v: int = 128) -> SamoyedsSparse:
        """The ``from_dense`` result for a W of ``shape`` [..., K, N] and ``dtype``, its arrays
        ``jax.ShapeDtypeStruct`` (no data): the layout a stored weight must have."""
        _check_samoyeds(n_sel, m_sel, v)
        lead, k, n_out = matrix_shape("SamoyedsSparse.abstract", shape)
        if k % v or n_out % m_sel:
            raise ValueError(f"K={k} must be a multiple of v={v} and N={n_out} one of "
                             f"m_sel={m_sel}")
        nc = n_out // m_sel * n_sel
        return cls(values=jax.ShapeDtypeStruct((*lead, k // 2, nc), jnp.dtype(dtype)),
                   meta=jax.ShapeDtypeStruct((*lead, k // 32, nc), jnp.int32),
                   sel=jax.ShapeDtypeStruct((*lead, k // v, nc), jnp.int8),
                   n_sel=n_sel, m_sel=m_sel, v=v, k=k, n_out=n_out)

    @property
    def nm(self) -> NMSparse:
        """The compressed matrix Wc [..., K, Nc] as an ``NMSparse(n=2, m=4)`` (shares arrays)."""
        return NMSparse(values=self.values, meta=self.meta, n=2, m=4, k=self.k)

    def dense_columns(self) -> jax.Array:
        """[..., K//v, Nc] int32: dense column of each compressed column, per slab."""
        nc = self.sel.shape[-1]
        group = (jnp.arange(nc, dtype=jnp.int32) // self.n_sel) * self.m_sel
        return group.reshape((1,) * (self.sel.ndim - 1) + (nc,)) + self.sel.astype(jnp.int32)

    def to_dense(self) -> jax.Array:
        """[..., K, N] dense W in the values' dtype (jnp; traceable)."""
        return _samoyeds_to_dense(self)

    @property
    def shape(self) -> tuple[int, ...]:
        """Dense shape (..., K, N)."""
        return tuple(self.values.shape[:-2]) + (self.k, self.n_out)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.values.dtype)

    @property
    def nbytes(self) -> int:
        """Stored bytes: values + meta + sel (= ``nbytes_for(shape, dtype, n_sel, m_sel, v)``)."""
        return _size(self.values) + _size(self.meta) + _size(self.sel)

    @property
    def density(self) -> float:
        """Fraction of dense entries stored: n_sel/m_sel * 1/2 (0.25 for 1:2:v)."""
        return self.n_sel / self.m_sel / 2

    @staticmethod
    def nbytes_for(shape: tuple[int, ...], dtype: Any, n_sel: int = 1, m_sel: int = 2,
                   v: int = 128) -> int:
        """Bytes for dense ``shape``: Wc (K x Nc) as 2:4 plus K/v*Nc int8 selections."""
        *lead, k, n_out = shape
        nc = n_out // m_sel * n_sel
        return (NMSparse.nbytes_for((*lead, k, nc), dtype, 2, 4)
                + math.prod(lead) * (k // v) * nc)


@jax.jit
def _samoyeds_to_dense(w: SamoyedsSparse) -> jax.Array:
    lead = w.values.shape[:-2]
    slabs, groups = w.k // w.v, w.n_out // w.m_sel
    wc = _nm_to_dense(w.values, w.meta, 2, 4)  # [..., K, Nc]
    wc = wc.reshape(lead + (slabs, w.v, groups, w.n_sel))
    sel = w.sel.astype(jnp.int32).reshape(lead + (slabs, 1, groups, w.n_sel))
    o = jnp.arange(w.m_sel, dtype=jnp.int32).reshape((1,) * (len(lead) + 3) + (w.m_sel,))
    dense = jnp.zeros(lead + (slabs, w.v, groups, w.m_sel), wc.dtype)
    for i in range(w.n_sel):  # offsets within a group are distinct: selects only
        dense = jnp.where(sel[..., i:i + 1] == o, wc[..., i:i + 1], dense)
    return dense.reshape(lead + (w.k, w.n_out))

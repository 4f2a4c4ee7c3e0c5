"""``TransposedSparse``: 2:4 and Samoyeds weights laid out for the Hopper decode kernel.

``pallas_kernels.mgpu_matmul`` computes ``y^T = W^T @ x^T``: rows of W^T (output columns of W)
are the MMA's M side, 64 per warpgroup, and the few tokens are its N side. The compressed W^T
rows are expanded to dense in registers and fed to ``wgmma`` as the register A operand. This
module holds the layout that makes that expansion a handful of 2-D element-wise ops, converted
once when the weights are loaded (never per call).

Per K tile of ``tk`` dense rows (C = tk // 16 groups of 4 per chunk, 4 chunks)::

    dense k = kt*tk + 4*(c*C + r) + j            kt tile, c chunk 0..3, r 0..C-1, j 0..3
    values [..., K/tk, R, 8C]     column (s*4 + c)*C + r: slot s (0, 1) of group c*C + r, row n
    meta   [..., K/tk, R, C] int16  bits [4c, 4c+4) = p0 | p1 << 2 of group c*C + r

so each W^T row's compressed K tile is one contiguous 8C-element row (a wide TMA box), and a
chunk's slot values (columns sliced in registers) and its nibbles are [R, C] arrays of the same
shape and layout; dense
sub-column j of chunk c is ``where(p0 == j, v0, where(p1 == j, v1, 0))``. The kernel multiplies
the 4 sub-columns, concatenated along K, by x's columns in the matching order (``permute_x``).

Samoyeds (1:2 column selection, ``paired=True``): row r of W^T is the kept column r of Wc, which
feeds dense output column ``2r + sel``. ``sel`` is stored in the nibble order, for free: a group
of a slab with sel = 1 stores its two kept values in the other order (slot 0 holds the value at
the higher position, and the nibble is ``p1 | p0 << 2``); positions inside a group are distinct,
so ``sel = p0 > p1`` per group and the expansion is unchanged. The kernel keeps two
accumulators and routes each expanded element by that bit.

Bytes: values 2 per kept value, meta 4 bits per group (2 bits per kept value), the same as
``NMSparse``/``SamoyedsSparse`` (Samoyeds' per-slab ``sel`` byte is dropped: it lives in the
nibble order).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.checks import check_layout, expect_kind, expect_multiple
from pallas_kernels.formats import NMSparse, SamoyedsSparse, unpack_meta

TILE_KS: tuple[int, ...] = (128, 256, 512)  # C = 8, 16 or 32 groups per chunk


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class TransposedSparse:
    """Compressed W [..., K, N] for ``mgpu_matmul`` (see the module docstring for the layout).

    Attributes:
      values: [..., K//tk, R, tk//2] weight dtype (R = N, or N//2 when paired).
      meta: [..., K//tk, R, tk//16] int16.
      k, n_out: dense K and N; tk: dense K rows per tile; paired: Samoyeds 1:2 columns (static).
    """

    values: jax.Array
    meta: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    n_out: int = dataclasses.field(metadata=dict(static=True))
    tk: int = dataclasses.field(metadata=dict(static=True))
    paired: bool = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):  # static checks only: leaves may be tracers or placeholders
        if self.tk not in TILE_KS or not isinstance(self.paired, bool):
            raise ValueError(f"TransposedSparse: tk must be one of {TILE_KS} and paired a bool, "
                             f"got tk={self.tk!r}, paired={self.paired!r}")
        kt = expect_multiple("TransposedSparse", "k", self.k, self.tk) // self.tk
        rows = expect_multiple("TransposedSparse", "n_out", self.n_out, 2 if self.paired else 1)
        rows //= 2 if self.paired else 1
        check_layout("TransposedSparse", values=(self.values, (kt, rows, self.tk // 2), "floating"),
                     meta=(self.meta, (kt, rows, self.tk // 16), jnp.int16))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.values.shape[:-3], self.k, self.n_out)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def rows(self) -> int:
        """Rows of W^T the kernel tiles over (N, or N // 2 when paired)."""
        return self.values.shape[-2]

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize + self.meta.size * 2)

    @classmethod
    def from_nm(cls, w: NMSparse, *, tk: int | None = None) -> TransposedSparse:
        """Convert 2:4 ``NMSparse`` weights (jnp; traceable, run once at load).

        ``tk``: dense K rows per tile; None: 256 when it divides K, else 128.
        """
        expect_kind("TransposedSparse.from_nm: w", w, NMSparse,
                    "an NMSparse (formats.NMSparse.from_dense(w, n=2, m=4) converts a dense one)")
        if (w.n, w.m) != (2, 4):
            raise ValueError(f"TransposedSparse needs 2:4 weights, got {w.n}:{w.m}")
        tk = _check_tk(tk, w.k)
        pos = unpack_meta(w.meta, 2, 4)  # [..., K/2, N]
        return cls(values=_tile_values(w.values, tk), meta=_tile_meta(pos, None, tk),
                   k=w.k, n_out=w.values.shape[-1], tk=tk, paired=False)

    @classmethod
    def from_samoyeds(cls, w: SamoyedsSparse, *, tk: int | None = None) -> TransposedSparse:
        """Convert 1:2 Samoyeds weights (jnp; traceable, run once at load); ``tk`` as in
        ``from_nm``."""
        if (w.n_sel, w.m_sel) != (1, 2):
            raise ValueError(
                f"TransposedSparse needs Samoyeds 1:2 column selection, got {w.n_sel}:{w.m_sel}")
        tk = _check_tk(tk, w.k)
        pos = unpack_meta(w.meta, 2, 4)  # [..., K/2, Nc]
        # sel per group of 4 dense rows: slab = 4g // v
        sel = jnp.repeat(w.sel.astype(jnp.int32), w.v // 4, axis=-2)  # [..., K/4, Nc]
        # sel = 1: slots swapped, so positions descend (values and meta alike)
        *lead, k2, nc = w.values.shape
        v = w.values.reshape(*lead, k2 // 2, 2, nc)
        swap = (sel == 1)[..., None, :]
        v = jnp.where(swap, v[..., ::-1, :], v).reshape(w.values.shape)
        return cls(values=_tile_values(v, tk), meta=_tile_meta(pos, sel, tk),
                   k=w.k, n_out=w.n_out, tk=tk, paired=True)

    def to_dense(self) -> jax.Array:
        """Dense W [..., K, N] (jnp)."""
        return _to_dense(self)


def _check_tk(tk: int | None, k: int) -> int:
    if tk is None:
        tk = 256 if k % 256 == 0 else 128
    if tk not in TILE_KS:
        raise ValueError(f"tk must be one of {TILE_KS}, got {tk}")
    if k % tk:
        raise ValueError(f"K={k} must be a multiple of tk={tk}")
    return tk


def _tile_values(values: jax.Array, tk: int) -> jax.Array:
    """[..., K/2, R] (row 2g + s) -> [..., K/tk, R, 8C] (column (s*4 + c)*C + r)."""
    *lead, k2, rows = values.shape
    kt, c = 2 * k2 // tk, tk // 16
    nl = len(lead)
    v = values.reshape(*lead, kt, 4, c, 2, rows)  # [.., kt, c, r, s, R]
    v = jnp.transpose(v, (*range(nl), nl, nl + 4, nl + 3, nl + 1, nl + 2))  # [.., kt, R, s, c, r]
    return v.reshape(*lead, kt, rows, 8 * c)


def _tile_meta(pos: jax.Array, sel: jax.Array | None, tk: int) -> jax.Array:
    """Positions [..., K/2, R] (+ sel [..., K/4, R]) -> int16 nibble words [..., K/tk, R, C]."""
    *lead, k2, rows = pos.shape
    kt, c = 2 * k2 // tk, tk // 16
    nl = len(lead)
    p = pos.astype(jnp.int32).reshape(*lead, k2 // 2, 2, rows)
    p0, p1 = p[..., 0, :], p[..., 1, :]  # [..., K/4, R]
    if sel is not None:  # sel = 1: store the positions descending
        p0, p1 = jnp.where(sel == 1, p1, p0), jnp.where(sel == 1, p0, p1)
    nib = (p0 | (p1 << 2)).reshape(*lead, kt, 4, c, rows)  # [.., kt, chunk, r, R]
    shifts = (4 * jnp.arange(4, dtype=jnp.int32)).reshape((1,) * (nl + 1) + (4, 1, 1))
    words = jnp.sum(nib << shifts, axis=nl + 1)  # disjoint fields: sum = or; [.., kt, r, R]
    words = jnp.where(words >= 1 << 15, words - (1 << 16), words)  # as int16 bits
    return jnp.swapaxes(words, -1, -2).astype(jnp.int16)  # [.., kt, R, r]


def expand_chunk(i0, i1, v0, v1, zero, *, ascending: bool) -> list:
    """The 4 dense sub-columns j of a chunk: v0 where i0 == j, v1 where i1 == j, else 0.

    ``ascending`` (2:4 from ``from_nm``: i0 < i1, so i0 is never 3 and i1 never 0): 12
    compares/selects per element instead of 16, the kernel's hot loop. Samoyeds stores some
    groups descending (its ``sel`` bit), so it takes the general form.
    """
    if not ascending:
        return [jnp.where(i0 == j, v0, jnp.where(i1 == j, v1, zero)) for j in range(4)]
    return [jnp.where(i0 == 0, v0, zero),
            jnp.where(i0 == 1, v0, jnp.where(i1 == 1, v1, zero)),
            jnp.where(i0 == 2, v0, jnp.where(i1 == 2, v1, zero)),
            jnp.where(i1 == 3, v1, zero)]


def expand_tile(values: jax.Array, meta: jax.Array, *, paired: bool
                ) -> tuple[jax.Array, jax.Array | None]:
    """The kernel's in-register expansion of one K tile, in jnp (the same ops, for tests).

    values: [R, 8C], meta: [R, C] int16. Returns A [R, tk] with columns in the kernel's
    (chunk, j, r) order; paired: (A for sel 0, A for sel 1), else (A, None).
    """
    a0, a1 = [], []
    width = meta.shape[1]
    for c in range(4):
        f = (meta >> (4 * c)) & 15
        i0, i1 = f & 3, f >> 2
        v0 = values[:, c * width:(c + 1) * width]
        v1 = values[:, (4 + c) * width:(5 + c) * width]
        zero = jnp.zeros_like(v0)
        parts = jnp.concatenate(expand_chunk(i0, i1, v0, v1, zero, ascending=not paired), axis=1)
        if paired:
            hi = jnp.concatenate([i0 > i1] * 4, axis=1)
            a0.append(jnp.where(hi, jnp.zeros_like(parts), parts))
            a1.append(jnp.where(hi, parts, jnp.zeros_like(parts)))
        else:
            a0.append(parts)
    return jnp.concatenate(a0, axis=1), (jnp.concatenate(a1, axis=1) if paired else None)


def permute_x(x: jax.Array, tk: int) -> jax.Array:
    """x [t, K] -> [K/tk, 4, t, tk/4]: tile kt, chunk c, columns in the (j, r) order."""
    t, k = x.shape
    c = tk // 16
    xp = x.reshape(t, k // tk, 4, c, 4)  # [t, kt, chunk, r, j]
    return jnp.transpose(xp, (1, 2, 0, 4, 3)).reshape(k // tk, 4, t, tk // 4)


def _to_dense(w: TransposedSparse) -> jax.Array:
    lead = w.values.shape[:-3]
    kt = w.k // w.tk
    flat_v = w.values.reshape((-1,) + w.values.shape[-3:])
    flat_m = w.meta.reshape((-1,) + w.meta.shape[-3:])

    def one_tile(v, m):  # [R, 8C], [R, C] -> [tk, N] dense rows of this tile
        a0, a1 = expand_tile(v, m, paired=w.paired)
        c = w.tk // 16
        # columns (chunk, j, r) -> dense k offset 4*(chunk*C + r) + j
        order = lambda a: jnp.transpose(a.reshape(-1, 4, 4, c), (0, 1, 3, 2)).reshape(-1, w.tk)
        if not w.paired:
            return order(a0).T
        both = jnp.stack([order(a0), order(a1)], axis=1)  # [Nc, 2, tk]: column 2r + o
        return both.reshape(-1, w.tk).T

    tiles = jax.vmap(jax.vmap(one_tile))(flat_v, flat_m)  # [B, kt, tk, N]
    return tiles.reshape(lead + (kt * w.tk, w.n_out))


def transposed_nbytes(shape: tuple[int, ...], itemsize: int, *, paired: bool) -> int:
    """Bytes of a TransposedSparse of dense ``shape`` [..., K, N] (values + int16 meta)."""
    *lead, k, n = shape
    rows = n // 2 if paired else n
    return math.prod(lead) * (k // 2 * rows * itemsize + k // 16 * rows * 2)

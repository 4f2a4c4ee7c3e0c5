"""2:4 weights in the operand layout of Hopper's sparse ``wgmma.mma_async.sp`` (bf16/f16, m64nNk32).

Converted once when a model loads; the inverse is exact, so the kernel-native layout can be the
only copy kept.

Which operand is sparse
-----------------------
``wgmma.mma_async.sp`` computes D[M, N] += A[M, K] @ B[K, N] with A 2:4 sparse along K (rows
K-major, i.e. row-major A). Our weights are stored for ``y = x @ W`` with W [K_in, N_out] 2:4
along K_in, so the sparse operand is ``A = W^T`` [N_out, K_in] and the product is computed
transposed::

    y^T [N_out, t] = W^T [N_out, K] @ x^T [K, t]

M = N_out (64 rows per instruction), the instruction's N = tokens t (8..256), K = K_in (32 dense,
16 kept per instruction). B = x^T must be "column-major" K x t, which is x [t, K] row-major as it
already is (``imm-trans-b = 0``); the accumulator holds y^T and is written back transposed.

Values
------
NMSparse ``values`` [K/2, N] holds, for column n, kept row r = 2*g + s = slot s (ascending
position) of group g. The compressed A that PTX expects holds, for row m = n, the K/2 kept
elements of that row in the same order (two per 4-group, ascending position). So
``a_values = values^T`` [N, K/2]: a transposition, nothing else.

Metadata (PTX ISA, "Sparse wgmma.mma_async.sp with half-precision and .bf16 type")
-------------------------------------------------------------------------------------
Per row of A and per 4-group, two 2-bit indices (the positions of the two kept elements, the
lower one in the lower bits): a nibble ``p0 | p1 << 2``. The 8 groups of one k32 instruction
step form a 32-bit row word, group j in bits [4j, 4j+4). NMSparse packs 16 kept positions per
int32 along K, slot r % 16 at bits [2*(r % 16), +2) with r = 2*g + s, i.e. group g's nibble at
bits [4*(g % 8), +4): **the NMSparse meta word meta[j, n] is exactly the PTX row word of row n,
k-step j.**

The instruction takes one 32-bit metadata register per thread. With the sparsity selector 0
(``spsel = 0``), of every quad of lanes (4*gid .. 4*gid+3) lanes 4*gid and 4*gid+1 supply it;
the others are ignored. For the m64 tile, warp w (0..3) of the warpgroup, lane group gid
(0..7) and t = lane % 2 (0, 1):

* bits [0, 16):  row 16*w + gid,     K columns 16*t .. 16*t + 15 (groups 4t .. 4t+3)
* bits [16, 32): row 16*w + gid + 8, the same K columns

so the register is ``lo16(word(r0) >> 16t) | lo16(word(r0 + 8) >> 16t) << 16`` with
``r0 = 16*w + gid``. (The layout equals the warp-level ``mma.sp.m16n8k32`` metadata layout, one
m16 slab per warp. With selector 1 lanes 4*gid+2 / +3 carry the same content.)

Kernel-native metadata array
----------------------------
``a_meta`` [..., N/64, K/32, 64] int32 (uint32 bits): for m-tile i, k-step j, slot
``q = 16*w + 2*gid + t`` the register above. Thread ``tid`` (0..127) of the warpgroup reads slot
``q(tid) = 16*(tid // 32) + 2*((tid % 32) // 4) + tid % 2`` (the lanes that selector 0 ignores
read a valid neighbour). This is a permutation of the 16-bit halves of the NMSparse meta words:
same bytes (2 bits per kept value), no padding, exact inverse (``from_wgmma_sp``).

Requirements: n:m = 2:4, K % 32 == 0, N % 64 == 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import formats
from pallas_kernels.checks import are_arrays, check_layout, dim, expect_multiple

WGMMA_M = 64  # rows of A (= output columns N_out) per instruction
WGMMA_K = 32  # dense K per bf16/f16 sparse instruction (16 kept)
META_SLOTS = 64  # 32-bit metadata registers that carry data per (m-tile, k-step) with spsel = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class WgmmaSparseA:
    """A 2:4 weight W [..., K, N] as the sparse A operand (A = W^T) of ``wgmma.mma_async.sp``.

    Samoyeds weights (1:2 column selection per slab of ``v`` rows, 2:4 inside) keep their
    compressed matrix Wc [..., K, N/2] as A and the per-slab column choice in ``sel``: row r of A
    feeds dense output column ``2r + sel[slab, r]``.

    Attributes:
      values: [..., R, K//2] weight dtype; row r = the kept values of W[:, r] (of Wc[:, r] for
        Samoyeds) in NMSparse order (= ``NMSparse.values`` transposed).
      meta: [..., R//64, K//32, 64] int32 (uint32 bits); per m-tile and k-step the 64 metadata
        registers of the warpgroup (see module docstring, slot q = 16*warp + 2*(lane//4) + lane%2).
      sel: None (2:4), or [..., K//v, R] int16, Samoyeds' column offset (0, 1) per slab (16
        bits: a 64-row block of one slab is 128 bytes, the smallest copy the kernel can issue).
      k: dense K; v: Samoyeds slab rows (0 for 2:4) (static).
    """

    values: jax.Array
    meta: jax.Array
    sel: jax.Array | None = None
    k: int = dataclasses.field(metadata=dict(static=True))
    v: int = dataclasses.field(default=0, metadata=dict(static=True))

    def __post_init__(self):  # static checks only: leaves may be tracers or placeholders
        k = expect_multiple("WgmmaSparseA", "k", self.k, WGMMA_K)
        rows = dim(self.values, -2)
        fields = dict(values=(self.values, (None, k // 2), "floating"),
                      meta=(self.meta, ((rows or 0) // WGMMA_M, k // WGMMA_K, META_SLOTS),
                            jnp.int32))
        if are_arrays(self.sel):  # Samoyeds: one column choice per slab of v rows
            v = expect_multiple("WgmmaSparseA", "v", self.v, WGMMA_K)
            if k % v:
                raise ValueError(f"WgmmaSparseA: k={k} must be a multiple of v={v}")
            fields["sel"] = (self.sel, (k // v, rows), jnp.int16)
        if rows is not None and rows % WGMMA_M:
            raise ValueError(f"WgmmaSparseA: rows of A ({rows}) must be a multiple of {WGMMA_M}")
        check_layout("WgmmaSparseA", **fields)

    @property
    def paired(self) -> bool:
        """Samoyeds 1:2 columns: two dense output columns per row of A."""
        return self.sel is not None

    @property
    def rows(self) -> int:
        """Rows of A (N, or N // 2 when paired)."""
        return self.values.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        """Dense shape of W (..., K, N)."""
        return tuple(self.values.shape[:-2]) + (self.k, self.rows * (2 if self.paired else 1))

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.values.dtype)

    @property
    def nbytes(self) -> int:
        sel = 0 if self.sel is None else self.sel.size * self.sel.dtype.itemsize
        return int(self.values.size * self.values.dtype.itemsize + self.meta.size * 4 + sel)

    def to_dense(self) -> jax.Array:
        """Dense W [..., K, N] (jnp)."""
        nm = from_wgmma_sp(self)
        if not self.paired:
            return nm.to_dense()
        return formats.SamoyedsSparse(values=nm.values, meta=nm.meta, sel=self.sel, n_sel=1,
                                      m_sel=2, v=self.v, k=self.k,
                                      n_out=2 * self.rows).to_dense()


    def to_dense_t(self) -> jax.Array:
        """Dense W^T [..., N, K] (jnp; one XLA fusion reading the compressed rows in place:
        the operand a dense-compute fallback multiplies, ``x @ W = x . (W^T)^T``)."""
        *lead, r, kh = self.values.shape
        lead = tuple(lead)
        u = jnp.swapaxes(_nm_words(self), -1, -2)                         # [..., R, K/32]
        shifts = (2 * jnp.arange(16, dtype=jnp.uint32)).reshape((1,) * (len(lead) + 2) + (16,))
        pos = ((u[..., None] >> shifts) & 3).astype(jnp.int32).reshape(lead + (r, kh // 2, 2))
        vals = self.values.reshape(lead + (r, kh // 2, 2))
        j = jnp.arange(4, dtype=jnp.int32).reshape((1,) * (len(lead) + 2) + (4,))
        dense = jnp.zeros(lead + (r, kh // 2, 4), self.values.dtype)
        for slot in range(2):  # kept positions are distinct: a select per slot
            dense = jnp.where(pos[..., slot:slot + 1] == j, vals[..., slot:slot + 1], dense)
        dense = dense.reshape(lead + (r, self.k))
        if not self.paired:
            return dense
        sel = jnp.swapaxes(self.sel, -1, -2).astype(jnp.int32)            # [..., R, K/v]
        sel = sel.reshape(lead + (r, 1, self.k // self.v, 1))
        o = jnp.arange(2, dtype=jnp.int32).reshape((1,) * len(lead) + (1, 2, 1, 1))
        dense = dense.reshape(lead + (r, 1, self.k // self.v, self.v))
        dense = jnp.where(sel == o, dense, jnp.zeros((), dense.dtype))   # row r -> 2r + sel
        return dense.reshape(lead + (2 * r, self.k))


def meta_slot(tid: int | np.ndarray) -> int | np.ndarray:
    """Slot q of ``WgmmaSparseA.meta`` read by warpgroup thread ``tid`` (0..127), spsel = 0."""
    lane = tid % 32
    return 16 * (tid // 32) + 2 * (lane // 4) + lane % 2


def _check_nm(w: formats.NMSparse) -> None:
    if (w.n, w.m) != (2, 4):
        raise ValueError(f"wgmma.sp needs 2:4 sparsity, got {w.n}:{w.m}")
    n_out = w.values.shape[-1]
    if w.k % WGMMA_K or n_out % WGMMA_M:
        raise ValueError(
            f"need K % {WGMMA_K} == 0 and N % {WGMMA_M} == 0 for wgmma.sp, got shape {w.shape}")


def to_wgmma_sp(w: formats.NMSparse | formats.SamoyedsSparse) -> WgmmaSparseA:
    """2:4 ``NMSparse`` or 1:2 ``SamoyedsSparse`` W [..., K, N] -> the ``wgmma.mma_async.sp`` A
    operand of W^T (of Wc^T, plus ``sel``, for Samoyeds) (jnp, exact).

    Raises:
      ValueError: not 2:4 (or not 1:2 column selection), K % 32 != 0 or rows % 64 != 0.
    """
    if isinstance(w, formats.SamoyedsSparse):
        if (w.n_sel, w.m_sel) != (1, 2):
            raise ValueError(f"wgmma.sp needs Samoyeds 1:2 column selection, got "
                             f"{w.n_sel}:{w.m_sel}")
        a = to_wgmma_sp(w.nm)
        return dataclasses.replace(a, sel=w.sel.astype(jnp.int16), v=w.v)
    _check_nm(w)
    lead = tuple(w.meta.shape[:-2])
    kw, n_out = w.meta.shape[-2:]  # kw = K // 32 words along K
    values = jnp.swapaxes(w.values, -1, -2)  # [..., N, K//2]
    u = jax.lax.bitcast_convert_type(w.meta, jnp.uint32)  # [..., K//32, N]
    # row word of A row n, k-step j: u[j, n]; split N into (m-tile i, warp w, half h, gid)
    u = u.reshape(lead + (kw, n_out // 64, 4, 2, 8))  # [..., j, i, w, h, gid]
    halves = jnp.stack([u & 0xFFFF, u >> 16], axis=-1)  # [..., j, i, w, h, gid, t]
    reg = halves[..., 0, :, :] | (halves[..., 1, :, :] << 16)  # [..., j, i, w, gid, t]
    nd = len(lead)
    reg = jnp.moveaxis(reg, nd + 1, nd)  # [..., i, j, w, gid, t]
    reg = reg.reshape(lead + (n_out // 64, kw, META_SLOTS))
    return WgmmaSparseA(values=values,
                        meta=jax.lax.bitcast_convert_type(reg, jnp.int32), k=w.k)


def from_wgmma_sp(a: WgmmaSparseA) -> formats.NMSparse:
    """Exact inverse of ``to_wgmma_sp`` for 2:4 (jnp); for Samoyeds, its 2:4 matrix Wc."""
    return formats.NMSparse(values=jnp.swapaxes(a.values, -1, -2),
                            meta=jax.lax.bitcast_convert_type(_nm_words(a), jnp.int32), n=2,
                            m=4, k=a.k)


def _nm_words(a: WgmmaSparseA) -> jax.Array:
    """The NMSparse 2:4 meta words [..., K/32, R] uint32 of ``a`` (16 positions per word)."""
    lead = tuple(a.meta.shape[:-3])
    mt, kw, _ = a.meta.shape[-3:]
    nd = len(lead)
    reg = jax.lax.bitcast_convert_type(a.meta, jnp.uint32).reshape(lead + (mt, kw, 4, 8, 2))
    reg = jnp.moveaxis(reg, nd, nd + 1)  # [..., j, i, w, gid, t]
    halves = jnp.stack([reg & 0xFFFF, reg >> 16], axis=-3)  # [..., j, i, w, h, gid, t]
    u = halves[..., 0] | (halves[..., 1] << 16)  # [..., j, i, w, h, gid]
    return u.reshape(lead + (kw, mt * WGMMA_M))


def wgmma_sp_to_dense(a: WgmmaSparseA) -> jax.Array:
    """Dense W [..., K, N] straight from the PTX semantics of the A operand (the test oracle).

    Decodes each thread's metadata register the way the instruction does (rows r0 / r0 + 8,
    K columns 16*t .. 16*t + 15, a nibble per 4-group) without going through NMSparse.
    """
    lead = tuple(a.meta.shape[:-3])
    mt, kw, _ = a.meta.shape[-3:]
    n_out = mt * WGMMA_M
    reg = np.asarray(jax.lax.bitcast_convert_type(a.meta, jnp.uint32)).reshape(-1, mt, kw, 64)
    vals = np.asarray(a.values).reshape((-1, n_out, a.k // 2))
    dense = np.zeros((vals.shape[0], n_out, a.k), vals.dtype)  # W^T
    for b in range(vals.shape[0]):
        for i in range(mt):
            for j in range(kw):
                for tid in range(128):
                    lane = tid % 32
                    if lane % 4 > 1:  # spsel = 0: these lanes' registers are ignored
                        continue
                    word = int(reg[b, i, j, meta_slot(tid)])
                    t, r0 = lane % 2, 64 * i + 16 * (tid // 32) + lane // 4
                    for half, row in ((0, r0), (1, r0 + 8)):
                        bits = (word >> (16 * half)) & 0xFFFF
                        for gq in range(4):  # the 4 groups of columns 16t .. 16t+15
                            g = 8 * j + 4 * t + gq  # group index along K
                            nib = (bits >> (4 * gq)) & 0xF
                            for s in range(2):
                                pos = (nib >> (2 * s)) & 3
                                dense[b, row, 4 * g + pos] = vals[b, row, 2 * g + s]
    dense = np.swapaxes(dense, -1, -2).reshape(lead + (a.k, n_out))
    return jnp.asarray(dense)

"""Tiles and weight layouts of the fused MoE expert kernels (``moe_matmul``).

``MoeTiles`` / ``MoeFfnConfig`` (block sizes of the gate/up and down kernels), the default
row tile of the ``RoutingPlan`` (``default_block_t``) and tiles (``default_config``), and how
each expert-stack format (dense, ``NMSparse``, ``SamoyedsSparse``) is laid out for the kernels:
the refs a program reads and the in-kernel 2:4 tile expansion.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as backend_lib
from pallas_kernels import decompress
from pallas_kernels.formats import NMSparse, SamoyedsSparse

ExpertWeights = jax.Array | NMSparse | SamoyedsSparse

# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeTiles:
    """Tile sizes of one of the two expert kernels (row tiles come from ``plan.block_t``).

    block_n: dense output columns per program (f for gate/up, d for down); a power of two
      dividing N. Samoyeds weights cover them with ``block_n // m_sel`` compressed columns.
    block_k: reduction rows per step; a power of two dividing K. N:M weights need whole
      meta words per step (2:4: ``block_k % 32 == 0``), Samoyeds also ``v % block_k == 0``.
      On the GPU every dot dim (block_t, stored columns, block_k) must be >= 16.
    expand: how sparse tiles are loaded before the in-register expansion. ``"rows"`` (the
      measured default): per-slot strided row loads and a gathered meta word per group.
      ``"block"``: one contiguous [block_k*n/m, cols] values block and one [words, cols] meta
      block (loads Triton can pipeline), expanded with broadcasts, reshapes and a sum over
      the n slots; not yet measured on a GPU.
    """

    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    expand: Literal["rows", "block"] = "rows"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeFfnConfig:
    """Tiles of the gate/up kernel and of the down kernel."""

    gate_up: MoeTiles = MoeTiles()
    down: MoeTiles = MoeTiles()


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def default_block_t(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Row tile for ``RoutingPlan.build``: about the rows per expert, a power of two in [16, 64].

    16 is the smallest Triton dot; 64 keeps gate and up accumulators in registers.
    """
    rows = max(1, num_tokens * top_k // num_experts)
    block_t = 16
    while block_t < rows and block_t < 64:
        block_t *= 2
    return block_t


def default_config(num_rows: int, d: int, f: int, *, block_t: int = 16) -> MoeFfnConfig:
    """A heuristic config for ``num_rows = t * k`` routed rows, model sizes d, f, row tile.

    Few rows (decode) are weight-bandwidth bound: narrower N tiles give more programs to
    stream the weights. ``block_k <= 128`` fits Samoyeds' v = 128 slabs. Tile sweeps on
    H100/H200 (benchmarks/moe.md) found nothing more than ~10% better than these.
    """
    block_n = 64 if num_rows <= 256 else 128
    block_k = 128 if block_n <= 64 else 64  # pipeline stages of x and two W tiles in SMEM
    stages = 2 if block_t >= 64 else 3  # measured: large tiles prefer 2 stages
    return MoeFfnConfig(
        gate_up=MoeTiles(block_n=_largest_pow2_divisor(f, block_n),
                         block_k=_largest_pow2_divisor(d, block_k), num_stages=stages),
        down=MoeTiles(block_n=_largest_pow2_divisor(d, block_n),
                      block_k=_largest_pow2_divisor(f, block_k), num_stages=stages))


# ----------------------------------------------------------------------------- weight layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of one expert weight stack as the kernels see it.

    The arrays of a stack [e, K, N] are passed flattened over (e, K) so a kernel reads
    expert ``e``'s rows with one indexer (Pallas Triton allows one per ref): dense W as
    [e*K, N]; N:M ``values`` [e*K*n/m, N] and ``meta`` [e*K*n/m/per_word, N] (K*n/m is a
    multiple of per_word, so expert e starts on a word); Samoyeds adds ``sel`` [e*K/v, Nc].
    """

    kind: Literal["dense", "nm", "samoyeds"]
    k: int  # dense K of one expert
    n_out: int  # dense N of one expert
    n: int = 1  # N:M along K (nm; 2:4 inside samoyeds)
    m: int = 1
    m_sel: int = 1  # samoyeds column groups (1 kept per group); 1 otherwise
    v: int = 1  # samoyeds slab height

    @property
    def num_arrays(self) -> int:
        return {"dense": 1, "nm": 2, "samoyeds": 3}[self.kind]

    def cols(self, block_n: int) -> int:
        """Stored columns a program covers for ``block_n`` dense output columns."""
        return block_n // self.m_sel

    def accumulate(self, refs, e, k0, c0, lhs_ref, rows, accs, *, block_k, cols,
                   expand="rows"):
        """accs += lhs[rows, k0:k0+block_k] @ W_e[k0:k0+block_k, tile]; returns new accs.

        ``rows`` [bt, 1] int32 row indices of ``lhs_ref`` (gathered tokens or a contiguous
        range); ``c0`` the first stored column of the tile (a multiple of ``cols``).
        """
        if self.kind == "dense":
            (w_ref,) = refs
            x = lhs_ref[rows[:, 0], pl.ds(k0, block_k)]  # [bt, bk]
            w = w_ref[pl.ds(e * self.k + k0, block_k), pl.ds(c0, cols)]  # [bk, cols]
            return [accs[0] + jnp.dot(x, w, preferred_element_type=jnp.float32)]
        values_ref, meta_ref = refs[0], refs[1]
        col_idx = c0 + decompress.iota(cols, 1)  # [1, cols]
        x = lhs_ref[rows[:, 0], pl.ds(k0, block_k)]  # [bt, bk], contiguous columns
        row0 = (e * self.k + k0) * self.n // self.m  # first compressed row of the tile
        if expand == "block":
            w = _expand_nm_block(values_ref, meta_ref, row0, c0, block_k=block_k, n=self.n,
                                 m=self.m, cols=cols)  # [bk, cols]
        else:
            w = _expand_nm_tile(values_ref, meta_ref, row0, col_idx, block_k=block_k, n=self.n,
                                m=self.m)  # [bk, cols]
        partial = jnp.dot(x, w, preferred_element_type=jnp.float32)  # [bt, cols]
        if self.kind == "nm":
            return [accs[0] + partial]
        sel_ref = refs[2]
        slab = e * (self.k // self.v) + k0 // self.v
        sel_row = decompress.load_sel_row(sel_ref, slab, col_idx)  # [1, cols]
        return decompress.route_partial(accs, partial, sel_row)

    def store(self, out_ref, rows, n0, accs, scale=None) -> None:
        """Write the accumulator sets to dense columns n0.. of ``out_ref`` rows [bt, 1].

        Set o holds dense columns n0 + m_sel*c + o (Samoyeds); dense and N:M have one set.
        """
        for o, acc in enumerate(accs):
            if scale is not None:
                acc = acc * scale
            cols = acc.shape[1]
            if self.m_sel == 1:
                out_ref[rows[:, 0], pl.ds(n0, cols)] = acc.astype(out_ref.dtype)
            else:
                col_idx = n0 + o + self.m_sel * decompress.iota(cols, 1)  # [1, cols]
                out_ref[rows, col_idx] = acc.astype(out_ref.dtype)


def _expand_nm_tile(values_ref, meta_ref, row0, col_idx, *, block_k: int, n: int, m: int):
    """Dense [block_k, cols] tile of an N:M matrix, expanded in registers.

    ``row0`` is the tile's first compressed row (a multiple of the values per meta word);
    ``col_idx`` [1, cols] its stored columns. Slot s of group g is compressed row
    row0 + g*n + s (a strided row load, contiguous along columns); the meta word of each
    group is an index-vector row load. Dense row g*m + j takes the slot whose position is j:
    a select over a [g, m, cols] view, reshaped to [block_k, cols], so the product against
    x is one dot with contiguous (vectorized, pipelined) x columns.
    """
    bits = decompress.meta_bits(m)
    per_word = 32 // bits
    field = (1 << bits) - 1
    g = block_k // m
    cols = col_idx.shape[1]
    group = decompress.iota(g, 0)  # [g, 1]
    words = meta_ref[row0 // per_word + (group * n) // per_word, col_idx]  # [g, cols] int32
    shift = ((group * n) % per_word) * bits  # [g, 1]
    j = jax.lax.broadcasted_iota(jnp.int32, (g, m, cols), 1)
    w = None
    for s in range(n):
        v = values_ref[row0 + n * group + s, col_idx]  # [g, cols]
        # Arithmetic shift then mask: bit 31 of a word may be set, the field stays exact.
        pos = (words >> (shift + s * bits)) & field  # [g, cols]
        v3 = jnp.broadcast_to(v[:, None, :], (g, m, cols))
        w = jnp.where(pos[:, None, :] == j, v3, jnp.zeros_like(v3) if w is None else w)
    return w.reshape(block_k, cols)


def _expand_nm_block(values_ref, meta_ref, row0, c0, *, block_k: int, n: int, m: int,
                     cols: int):
    """Dense [block_k, cols] tile of an N:M matrix from contiguous block loads.

    Loads the tile's compressed values [r = block_k*n/m, cols] and meta words
    [r / per_word, cols] as plain ``pl.ds`` blocks; repeats each word over its per_word rows
    (broadcast + reshape), extracts each row's position, and places slot s of group g at
    dense row g*m + position with a [g, n, m, cols] select summed over the n slots (kept
    positions are distinct, so the sum adds one value to zeros).
    """
    bits = decompress.meta_bits(m)
    per_word = 32 // bits
    field = (1 << bits) - 1
    r = block_k * n // m
    g = block_k // m
    vals = values_ref[pl.ds(row0, r), pl.ds(c0, cols)]  # [r, cols]
    words = meta_ref[pl.ds(row0 // per_word, r // per_word), pl.ds(c0, cols)]  # [r/pw, cols]
    words = jnp.broadcast_to(words[:, None, :], (r // per_word, per_word, cols)).reshape(r, cols)
    shift = (jax.lax.broadcasted_iota(jnp.int32, (r, 1), 0) % per_word) * bits  # [r, 1]
    pos = (words >> shift) & field  # [r, cols]
    shape = (g, n, m, cols)
    v4 = jnp.broadcast_to(vals.reshape(g, n, 1, cols), shape)
    hit = jnp.broadcast_to(pos.reshape(g, n, 1, cols), shape) == jax.lax.broadcasted_iota(
        jnp.int32, shape, 2)
    w = jnp.where(hit, v4, jnp.zeros_like(v4))
    w = w.reshape(g, m, cols) if n == 1 else jnp.sum(w, axis=1).astype(vals.dtype)  # [g, m, cols]
    return w.reshape(block_k, cols)


def layout_of(name: str, w: ExpertWeights, num_experts: int) -> tuple[Layout, tuple]:
    """The layout of ``w`` and its arrays flattened over (e, K); ValueError on bad stacks."""
    if isinstance(w, SamoyedsSparse):
        shape = w.shape
        if len(shape) != 3 or shape[0] != num_experts:
            raise ValueError(f"{name} must be a stack [e={num_experts}, K, N], got shape {shape}")
        if w.n_sel != 1:
            raise ValueError(f"{name}: only n_sel=1 Samoyeds weights are supported, got {w.n_sel=}")
        e, k, n_out = shape
        layout = Layout("samoyeds", k, n_out, n=2, m=4, m_sel=w.m_sel, v=w.v)
        arrays = (w.values.reshape(e * w.values.shape[1], w.values.shape[2]),
                  w.meta.reshape(e * w.meta.shape[1], w.meta.shape[2]),
                  w.sel.reshape(e * w.sel.shape[1], w.sel.shape[2]))
        return layout, arrays
    if isinstance(w, NMSparse):
        shape = w.shape
        if len(shape) != 3 or shape[0] != num_experts:
            raise ValueError(f"{name} must be a stack [e={num_experts}, K, N], got shape {shape}")
        e, k, n_out = shape
        layout = Layout("nm", k, n_out, n=w.n, m=w.m)
        arrays = (w.values.reshape(e * w.values.shape[1], w.values.shape[2]),
                  w.meta.reshape(e * w.meta.shape[1], w.meta.shape[2]))
        return layout, arrays
    if not hasattr(w, "ndim"):
        raise TypeError(f"{name} must be an array, NMSparse or SamoyedsSparse, got "
                        f"{type(w).__name__}")
    if w.ndim != 3 or w.shape[0] != num_experts:
        raise ValueError(f"{name} must be a stack [e={num_experts}, K, N], got shape {w.shape}")
    e, k, n_out = w.shape
    return Layout("dense", k, n_out), (jnp.reshape(w, (e * k, n_out)),)


def check_tiles(name: str, layout: Layout, tiles: MoeTiles, block_t: int) -> None:
    """ValueError unless ``tiles`` fits this weight layout."""
    bn, bk = tiles.block_n, tiles.block_k
    for label, b in (("block_n", bn), ("block_k", bk)):
        if b < 1 or b & (b - 1):
            raise ValueError(f"{name}: {label}={b} must be a power of two")
    if layout.k % bk:
        raise ValueError(f"{name}: K={layout.k} must be a multiple of {bk=}".replace("bk", "block_k"))
    if layout.n_out % bn:
        raise ValueError(f"{name}: N={layout.n_out} must be a multiple of block_n={bn}")
    if layout.kind != "dense":
        decompress.check_block_k(bk, n=layout.n, m=layout.m)
    if layout.kind == "samoyeds":
        if layout.v % bk:
            raise ValueError(f"{name}: Samoyeds v={layout.v} must be a multiple of block_k={bk}")
        if bn % layout.m_sel:
            raise ValueError(f"{name}: block_n={bn} must be a multiple of m_sel={layout.m_sel}")
    if not backend_lib.interpret_mode():
        # Triton dots need every dimension >= 16.
        if min(block_t, layout.cols(bn), bk) < 16:
            raise ValueError(
                f"{name}: on the GPU every dot dim must be >= 16; got rows {block_t=}, "
                f"columns {layout.cols(bn)}, block_k={bk}")

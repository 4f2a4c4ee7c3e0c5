"""Fused MoE expert FFN: routed tokens times (dense, 2:4 or Samoyeds) expert weights.

One MoE layer's expert computation, for every token t and its top-k experts e:

    y[t] = sum_k p[t, k] * W2_e (silu(x[t] W1_e) * (x[t] W3_e))

with the activation side given by a :class:`RoutingPlan` (row tiles of assignments, one
expert per tile) and expert weights stacked [e, K, N] as dense arrays, ``NMSparse`` or
``SamoyedsSparse`` (the "sparse-sparse" case: sparse routing times sparse weights).

Two Pallas Triton kernels, each over the grid (row tiles of the plan, N tiles):

1. ``gate_up``: a program reads its tile's expert from ``block_expert``, returns at once for
   tiles ``>= num_blocks`` (experts with no tokens own no tile and cost nothing), gathers its
   tokens' rows of ``x`` by index from the unpermuted hidden states (a ref load with an index
   vector; padding rows read a clamped, valid row and are never stored), runs the gate and
   up products over K and writes ``h = silu(gate) * up`` [P, f] in plan row order.
2. ``down``: ``h @ W2_e`` times the routing weight of each row, written to the row's
   assignment id ``a = token * k + slot`` of an output [t*k + 1, d] (row t*k collects the
   padding rows and is dropped). ``moe_ffn`` then sums the k rows of each token in XLA.

Why a deterministic combine and not an atomic scatter-add into [t, d]: every output row has
exactly one writer, so the result is bit-reproducible run to run (float atomics add in
arrival order), needs no zero-filled accumulator, keeps bf16 outputs without a float32
atomic buffer, and runs in Pallas interpret mode (which has no masked atomics). The price is
a [t*k, d] buffer and one fused XLA reduction over k, small next to the weight traffic.

Sparse weights are expanded on chip (Load-as-Sparse, Compute-as-Dense): a program loads the
compressed tile (values rows, their meta words; Samoyeds also the slab's column selection),
expands it in registers to a dense [block_k, cols] tile and runs one dot against contiguous x
columns. A Samoyeds tile is the 2:4 expansion over its compressed columns; each K slab's
partial product is routed into one of ``m_sel`` accumulator sets by the slab's column
selection (``decompress.route_partial``), and the sets are stored interleaved (stride
``m_sel`` columns). Only compressed bytes cross HBM.

Reference with the same signature: :func:`moe_ffn_reference` (a readable per-expert loop, f32;
it also reads the Hopper layouts). The XLA baseline, ``jax.lax.ragged_dot`` over the plan's
rows, is the ``xla`` expert op (``expert_op.ragged_dot_experts``).

Build the plan with ``block_t = default_block_t(t, k, e)``; tiles default to
:func:`default_config`. Measured speed and its limits: benchmarks/moe.md (on H100 the dense
fused kernel streams decode weights at 2.5-2.9 TB/s; the sparse kernels are latency bound at
decode and expansion bound at large batch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import backend as backend_lib
from pallas_kernels import decompress
from pallas_kernels.checks import expect_kind
from pallas_kernels.expert_op import check_inputs
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.launch import launch
from pallas_kernels.routing_plan import RoutingPlan
from pallas_kernels.sparse_mma_layout import WgmmaSparseA
from pallas_kernels.transposed_format import TransposedSparse

ExpertWeights = jax.Array | NMSparse | SamoyedsSparse | TransposedSparse | WgmmaSparseA
_KERNEL_KINDS = (jax.Array, np.ndarray, NMSparse, SamoyedsSparse)

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
class _Layout:
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


def _layout_of(name: str, w: ExpertWeights, num_experts: int) -> tuple[_Layout, tuple]:
    """The layout of ``w`` and its arrays flattened over (e, K); ValueError on bad stacks."""
    if isinstance(w, SamoyedsSparse):
        shape = w.shape
        if len(shape) != 3 or shape[0] != num_experts:
            raise ValueError(f"{name} must be a stack [e={num_experts}, K, N], got shape {shape}")
        if w.n_sel != 1:
            raise ValueError(f"{name}: only n_sel=1 Samoyeds weights are supported, got {w.n_sel=}")
        e, k, n_out = shape
        layout = _Layout("samoyeds", k, n_out, n=2, m=4, m_sel=w.m_sel, v=w.v)
        arrays = (w.values.reshape(e * w.values.shape[1], w.values.shape[2]),
                  w.meta.reshape(e * w.meta.shape[1], w.meta.shape[2]),
                  w.sel.reshape(e * w.sel.shape[1], w.sel.shape[2]))
        return layout, arrays
    if isinstance(w, NMSparse):
        shape = w.shape
        if len(shape) != 3 or shape[0] != num_experts:
            raise ValueError(f"{name} must be a stack [e={num_experts}, K, N], got shape {shape}")
        e, k, n_out = shape
        layout = _Layout("nm", k, n_out, n=w.n, m=w.m)
        arrays = (w.values.reshape(e * w.values.shape[1], w.values.shape[2]),
                  w.meta.reshape(e * w.meta.shape[1], w.meta.shape[2]))
        return layout, arrays
    if not hasattr(w, "ndim"):
        raise TypeError(f"{name} must be an array, NMSparse or SamoyedsSparse, got "
                        f"{type(w).__name__}")
    if w.ndim != 3 or w.shape[0] != num_experts:
        raise ValueError(f"{name} must be a stack [e={num_experts}, K, N], got shape {w.shape}")
    e, k, n_out = w.shape
    return _Layout("dense", k, n_out), (jnp.reshape(w, (e * k, n_out)),)


def _check_tiles(name: str, layout: _Layout, tiles: MoeTiles, block_t: int) -> None:
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


# ----------------------------------------------------------------------------- kernel bodies


def _gate_up_kernel(sorted_ids_ref, block_expert_ref, num_blocks_ref, x_ref, *refs,
                    layout: _Layout, num_tokens: int, top_k: int, block_t: int,
                    block_k: int, block_n: int, expand: str):
    # sorted_ids_ref: [P] int32, block_expert_ref: [P // bt] int32, num_blocks_ref: [1] int32
    # x_ref: [t, d]; refs = w1 arrays, w3 arrays (flattened over (e, d)), h_ref [P, f]
    na = layout.num_arrays
    w1_refs, w3_refs, h_ref = refs[:na], refs[na:2 * na], refs[2 * na]
    i, j = pl.program_id(0), pl.program_id(1)
    cols = layout.cols(block_n)

    @pl.when(i < num_blocks_ref[0])
    def _():
        e = block_expert_ref[i]
        ids = sorted_ids_ref[pl.ds(i * block_t, block_t)]  # [bt]
        # Padding rows (id t*k) read the last token: finite values, never stored downstream.
        tokens = jnp.minimum(ids // top_k, num_tokens - 1)[:, None]  # [bt, 1]
        zero = jnp.zeros((block_t, cols), jnp.float32)

        def body(step, carry):
            gates, ups = carry
            k0 = step * block_k
            gates = layout.accumulate(w1_refs, e, k0, j * cols, x_ref, tokens, gates,
                                      block_k=block_k, cols=cols, expand=expand)
            ups = layout.accumulate(w3_refs, e, k0, j * cols, x_ref, tokens, ups,
                                    block_k=block_k, cols=cols, expand=expand)
            return gates, ups

        init = ([zero] * layout.m_sel, [zero] * layout.m_sel)
        gates, ups = jax.lax.fori_loop(0, layout.k // block_k, body, init)
        rows = i * block_t + decompress.iota(block_t, 0)  # [bt, 1]
        layout.store(h_ref, rows, j * block_n,
                     [jax.nn.silu(g) * u for g, u in zip(gates, ups, strict=True)])


def _down_kernel(sorted_ids_ref, block_expert_ref, num_blocks_ref, weights_ref, h_ref, *refs,
                 layout: _Layout, block_t: int, block_k: int, block_n: int, expand: str):
    # weights_ref: [P] f32, h_ref: [P, f]; refs = w2 arrays (flattened over (e, f)), out_ref
    # out_ref: [t*k + 1, d], row t*k takes the padding rows.
    na = layout.num_arrays
    w2_refs, out_ref = refs[:na], refs[na]
    i, j = pl.program_id(0), pl.program_id(1)
    cols = layout.cols(block_n)

    @pl.when(i < num_blocks_ref[0])
    def _():
        e = block_expert_ref[i]
        rows = i * block_t + decompress.iota(block_t, 0)  # [bt, 1]
        zero = jnp.zeros((block_t, cols), jnp.float32)

        def body(step, accs):
            return layout.accumulate(w2_refs, e, step * block_k, j * cols, h_ref, rows, accs,
                                     block_k=block_k, cols=cols, expand=expand)

        accs = jax.lax.fori_loop(0, layout.k // block_k, body, [zero] * layout.m_sel)
        tile = pl.ds(i * block_t, block_t)
        ids = sorted_ids_ref[tile][:, None]  # [bt, 1] assignment ids; padding rows hold t*k
        p = weights_ref[tile][:, None]  # [bt, 1] routing weights (0 on padding)
        layout.store(out_ref, ids, j * block_n, accs, scale=p)  # row scatter


# ----------------------------------------------------------------------------- wrappers


def _compiler_params(tiles: MoeTiles):
    return plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def gate_up(x: jax.Array, plan: RoutingPlan, w1: ExpertWeights, w3: ExpertWeights, *,
            tiles: MoeTiles | None = None, h_init: jax.Array | None = None) -> jax.Array:
    """``h = silu(x[tok] W1_e) * (x[tok] W3_e)`` per plan row -> [P, f] in x.dtype.

    Rows of unused tiles (>= num_blocks) are left as they were (uninitialized, or
    ``h_init`` [P, f] when given, which is aliased to the output; tests poison it).
    Padding rows inside used tiles hold finite values of no meaning.
    """
    t, d = x.shape
    l1, a1 = _layout_of("w1", w1, plan.num_experts)
    l3, a3 = _layout_of("w3", w3, plan.num_experts)
    if l1 != l3:
        raise ValueError(f"w1 and w3 must share one format and shape, got {l1} and {l3}")
    if l1.k != d:
        raise ValueError(f"w1 must be [e, d={d}, f], got K={l1.k}")
    f = l1.n_out
    tiles = tiles or default_config(t * plan.top_k, d, f, block_t=plan.block_t).gate_up
    _check_tiles("w1/w3", l1, tiles, plan.block_t)
    p_rows = plan.capacity
    out_shape = jax.ShapeDtypeStruct((p_rows, f), x.dtype)
    kernel = functools.partial(
        _gate_up_kernel, layout=l1, num_tokens=t, top_k=plan.top_k, block_t=plan.block_t,
        block_k=tiles.block_k, block_n=tiles.block_n, expand=tiles.expand)
    args = [plan.sorted_ids, plan.block_expert, plan.num_blocks.reshape(1), x, *a1, *a3]
    return launch(kernel, args, out_shape=out_shape, grid=(plan.num_tiles, f // tiles.block_n),
                  compiler_params=_compiler_params(tiles), name=f"moe_gate_up_{l1.kind}",
                  init=h_init)


def down(h: jax.Array, plan: RoutingPlan, w2: ExpertWeights, *, tiles: MoeTiles | None = None,
         out_init: jax.Array | None = None) -> jax.Array:
    """``p * (h W2_e)`` per plan row, written to its assignment row -> [t*k + 1, d] in h.dtype.

    Row ``a = token*k + slot`` holds assignment a's weighted expert output; the last row
    collects padding rows. Rows of assignments that have no plan row (expert ids out of
    range under jit) are not written: ``out_init`` (aliased, e.g. poison) shows through.
    """
    p_rows, f = h.shape
    l2, a2 = _layout_of("w2", w2, plan.num_experts)
    if l2.k != f:
        raise ValueError(f"w2 must be [e, f={f}, d], got K={l2.k}")
    if p_rows != plan.capacity:
        raise ValueError(f"h must have the plan's {plan.capacity} rows, got {p_rows}")
    d = l2.n_out
    tiles = tiles or default_config(plan.num_tokens * plan.top_k, d, f,
                                    block_t=plan.block_t).down
    _check_tiles("w2", l2, tiles, plan.block_t)
    out_shape = jax.ShapeDtypeStruct((plan.sentinel + 1, d), h.dtype)
    kernel = functools.partial(_down_kernel, layout=l2, block_t=plan.block_t,
                               block_k=tiles.block_k, block_n=tiles.block_n,
                               expand=tiles.expand)
    args = [plan.sorted_ids, plan.block_expert, plan.num_blocks.reshape(1), plan.weights, h, *a2]
    return launch(kernel, args, out_shape=out_shape, grid=(plan.num_tiles, d // tiles.block_n),
                  compiler_params=_compiler_params(tiles), name=f"moe_down_{l2.kind}",
                  init=out_init)


def combine(out_rows: jax.Array, plan: RoutingPlan) -> jax.Array:
    """Sum the k assignment rows of each token: [t*k + 1, d] -> [t, d] (f32 sum, out dtype).

    Assignments without a plan row (out-of-range expert ids under jit) contribute 0, never
    unwritten memory.
    """
    t, k = plan.num_tokens, plan.top_k
    d = out_rows.shape[-1]
    written = jnp.zeros((t * k + 1,), jnp.bool_).at[plan.sorted_ids].set(True)[:t * k]
    rows = jnp.where(written[:, None], out_rows[:t * k].astype(jnp.float32), 0.0)
    return rows.reshape(t, k, d).sum(axis=1).astype(out_rows.dtype)


def _dense(w: ExpertWeights) -> jax.Array:
    return w.to_dense() if hasattr(w, "to_dense") else w


# ----------------------------------------------------------------------------- public API


def moe_ffn(x: jax.Array, plan: RoutingPlan, w1: ExpertWeights, w3: ExpertWeights,
            w2: ExpertWeights, *, config: MoeFfnConfig | None = None) -> jax.Array:
    """One MoE layer's experts: ``y[t] = sum_k p[t,k] W2_e(silu(x W1_e) * (x W3_e))``, by the
    routed-token Pallas kernels (interpret mode on CPU). The model reaches it through the
    ``triton`` expert op (``expert_op_triton``).

    Args:
      x: [t, d] hidden states (f32, bf16 or f16), unpermuted.
      plan: routing plan of the t tokens (``RoutingPlan.build``); ``block_t`` is the row tile.
      w1, w3: gate and up stacks [e, d, f], both dense arrays, both ``NMSparse`` or both
        ``SamoyedsSparse`` (same format), in x's dtype.
      w2: down stack [e, f, d], any of the three formats, in x's dtype.
      config: kernel tiles; ``None`` picks :func:`default_config`.

    Returns:
      [t, d] in x.dtype.

    Raises:
      ValueError: shapes, formats, dtypes or tiles that do not fit.
    """
    check_inputs(x, plan, w1, w3, w2)
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        expect_kind(name, w, _KERNEL_KINDS, "an expert stack [e, K, N]: an array, NMSparse or "
                    "SamoyedsSparse (Hopper layouts run through the mosaic expert ops)")
        if w.dtype != x.dtype:
            raise ValueError(f"{name} dtype {w.dtype} must equal x dtype {x.dtype}")
    t, d = x.shape
    f = w1.shape[2]
    if config is None:
        config = default_config(t * plan.top_k, d, f, block_t=plan.block_t)
    h = gate_up(x, plan, w1, w3, tiles=config.gate_up)
    return combine(down(h, plan, w2, tiles=config.down), plan)


def moe_ffn_reference(x: jax.Array, plan: RoutingPlan, w1: ExpertWeights, w3: ExpertWeights,
                      w2: ExpertWeights, *, config: MoeFfnConfig | None = None) -> jax.Array:
    """Readable per-expert loop in float32 (every expert runs on every token, then masked).

    Same signature as :func:`moe_ffn`; ``config`` is ignored. Returns [t, d] in x.dtype.
    """
    del config
    check_inputs(x, plan, w1, w3, w2)
    t, _ = x.shape
    e = plan.num_experts
    # coef[t, e]: routing weight of token t for expert e (0 where not chosen); padding rows
    # carry token t and weight 0 and land in the dropped row t.
    row_expert = jnp.repeat(plan.block_expert, plan.block_t)  # [P]
    coef = jnp.zeros((t + 1, e + 1), jnp.float32).at[plan.token_ids(), row_expert].add(
        plan.weights)[:t, :e]
    xf = x.astype(jnp.float32)
    w1f, w3f, w2f = (_dense(w).astype(jnp.float32) for w in (w1, w3, w2))
    hp = jax.lax.Precision.HIGHEST

    def expert(i, y):  # y += coef[:, i] * W2_i(silu(x W1_i) * (x W3_i))
        h = jax.nn.silu(jnp.dot(xf, w1f[i], precision=hp)) * jnp.dot(xf, w3f[i], precision=hp)
        c = jax.lax.dynamic_slice_in_dim(coef, i, 1, axis=1)  # [t, 1]
        return y + c * jnp.dot(h, w2f[i], precision=hp)

    y = jax.lax.fori_loop(0, e, expert, jnp.zeros(x.shape, jnp.float32))
    return y.astype(x.dtype)

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

Build the plan with ``block_t = moe_tiles.default_block_t(t, k, e)``; tiles default to
``moe_tiles.default_config``. Measured speed and its limits: benchmarks/moe.md (on H100 the dense
fused kernel streams decode weights at 2.5-2.9 TB/s; the sparse kernels are latency bound at
decode and expansion bound at large batch).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import decompress
from pallas_kernels.checks import expect_kind
from pallas_kernels.expert_op import check_inputs
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.launch import launch
from pallas_kernels.moe_tiles import (Layout, MoeFfnConfig, MoeTiles, check_tiles, default_config,
                                      layout_of)
from pallas_kernels.routing_plan import RoutingPlan
from pallas_kernels.sparse_mma_layout import WgmmaSparseA
from pallas_kernels.transposed_format import TransposedSparse

ExpertWeights = jax.Array | NMSparse | SamoyedsSparse | TransposedSparse | WgmmaSparseA
_KERNEL_KINDS = (jax.Array, np.ndarray, NMSparse, SamoyedsSparse)

# ----------------------------------------------------------------------------- kernel bodies


def _gate_up_kernel(sorted_ids_ref, block_expert_ref, num_blocks_ref, x_ref, *refs,
                    layout: Layout, num_tokens: int, top_k: int, block_t: int,
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
                 layout: Layout, block_t: int, block_k: int, block_n: int, expand: str):
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
    l1, a1 = layout_of("w1", w1, plan.num_experts)
    l3, a3 = layout_of("w3", w3, plan.num_experts)
    if l1 != l3:
        raise ValueError(f"w1 and w3 must share one format and shape, got {l1} and {l3}")
    if l1.k != d:
        raise ValueError(f"w1 must be [e, d={d}, f], got K={l1.k}")
    f = l1.n_out
    tiles = tiles or default_config(t * plan.top_k, d, f, block_t=plan.block_t).gate_up
    check_tiles("w1/w3", l1, tiles, plan.block_t)
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
    l2, a2 = layout_of("w2", w2, plan.num_experts)
    if l2.k != f:
        raise ValueError(f"w2 must be [e, f={f}, d], got K={l2.k}")
    if p_rows != plan.capacity:
        raise ValueError(f"h must have the plan's {plan.capacity} rows, got {p_rows}")
    d = l2.n_out
    tiles = tiles or default_config(plan.num_tokens * plan.top_k, d, f,
                                    block_t=plan.block_t).down
    check_tiles("w2", l2, tiles, plan.block_t)
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
    written = plan.rows < plan.capacity
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

"""One MoE layer's experts on Hopper, from expert stacks in a Hopper kernel layout.

``y[t] = sum_k p[t,k] W2_e(silu(x W1_e) * (x W3_e))`` for few tokens (decode): expert-grouped
Mosaic GPU launches, each covering every expert of the layer; a program reads only its tile's
expert, so an expert with no tokens costs nothing but an early exit. For one token, gate and up
share one launch (the two stacks side by side), then down: two launches. For more tokens gate, up
and down are three: on an H100 (benchmarks/moe.md, "Gate and up in one launch") the joined launch
made a layer 4-24% faster at 1 token and up to 11% slower (Samoyeds) at 16 tokens, with the same
K split there; why is not profiled yet. At prefill (row tiles of ``PREFILL_BLOCK_T``, which
``block_t`` picks from about that many rows per expert) sparse-tensor-core stacks go through
the warp-specialized grouped kernel (``sparse_mma_prefill``, bf16 products). The stacks are
``WgmmaSparseA`` (sparse tensor cores: ``wgmma_sp_grouped_matmul``, bf16) or ``TransposedSparse``
(expanded in registers, dense wgmma: ``mgpu_grouped_matmul``, bf16 or f16).

Rows: the ``RoutingPlan``'s row tiles, cut to the most tiles that can be in use,
``min(P / block_t, ceil(t*k / block_t) + min(e, t*k))`` (tiles past ``num_blocks`` write zeros).
x's rows are gathered once into that [rows, d] order (t*k rows plus padding; at decode a few
hundred KB), the gate/up product is finished with SiLU in XLA, and the down product is combined
deterministically: each (token, slot) gathers its row and weight, a sum over k (no atomics, the
same result every run).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.checks import expect_kind
from pallas_kernels.mgpu_matmul import (MgpuMatmulConfig, mgpu_grouped_matmul,
                                        mgpu_grouped_matmul_reference)
from pallas_kernels.moe_tiles import default_block_t
from pallas_kernels.routing_plan import RoutingPlan
from pallas_kernels.sparse_mma_layout import WgmmaSparseA
from pallas_kernels.sparse_mma_matmul import (WgmmaSpConfig, wgmma_sp_grouped_matmul,
                                              wgmma_sp_grouped_matmul_reference)
from pallas_kernels.sparse_mma_prefill import (wgmma_sp_prefill_grouped_matmul,
                                               wgmma_sp_prefill_grouped_matmul_reference)
from pallas_kernels.transposed_format import TransposedSparse

HopperExperts = TransposedSparse | WgmmaSparseA
# Each layout's grouped product: (the Mosaic GPU kernel, its jnp reference).
_GROUPED = {TransposedSparse: (mgpu_grouped_matmul, mgpu_grouped_matmul_reference),
            WgmmaSparseA: (wgmma_sp_grouped_matmul, wgmma_sp_grouped_matmul_reference)}
# Prefill row tiles of WgmmaSparseA stacks: the warp-specialized grouped kernel, its reference.
_PREFILL = (wgmma_sp_prefill_grouped_matmul, wgmma_sp_prefill_grouped_matmul_reference)
PREFILL_BLOCK_T = 128


def block_t(num_tokens: int, top_k: int, num_experts: int, kind: type = WgmmaSparseA) -> int:
    """The plan's row tile: ``PREFILL_BLOCK_T`` for ``WgmmaSparseA`` stacks when the experts
    average at least that many rows (prefill), else ``moe_tiles.default_block_t``."""
    if kind is WgmmaSparseA and num_tokens * top_k >= PREFILL_BLOCK_T * num_experts:
        return PREFILL_BLOCK_T
    return default_block_t(num_tokens, top_k, num_experts)


def used_tiles(plan: RoutingPlan) -> int:
    """The most row tiles a plan of this size can use (static)."""
    t, k, e, bt = plan.num_tokens, plan.top_k, plan.num_experts, plan.block_t
    assignments = t * k
    return min(plan.sorted_ids.shape[0] // bt, -(-assignments // bt) + min(e, assignments))


def moe_ffn_mgpu(x: jax.Array, plan: RoutingPlan, w1: HopperExperts, w3: HopperExperts,
                 w2: HopperExperts, *, config: MgpuMatmulConfig | WgmmaSpConfig | None = None,
                 matmul: Callable | None = None, emulate: bool = False) -> jax.Array:
    """Experts of one MoE layer (see the module docstring). Returns [t, d] in x.dtype.

    x: [t, d]; plan: ``RoutingPlan`` with ``block_t`` a multiple of 8 (<= 128); w1, w3:
    [e, d, f]; w2: [e, f, d]; all three ``WgmmaSparseA`` or all three ``TransposedSparse``, in
    x's dtype. ``matmul``: the grouped product of every launch (default the layout's Mosaic GPU
    kernels, the prefill one for ``PREFILL_BLOCK_T`` tiles); ``emulate``: their jnp references
    instead (the same gather/combine anywhere).
    """
    kind = type(w1)
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        expect_kind(name, w, tuple(_GROUPED), "a TransposedSparse or WgmmaSparseA expert stack")
        if type(w) is not kind:
            raise ValueError(f"w1, w3 and w2 must be all TransposedSparse or all WgmmaSparseA "
                             f"stacks, got {name} {type(w).__name__} with w1 {kind.__name__}")
        if w.dtype != x.dtype:
            raise ValueError(f"{name} dtype {w.dtype} must equal x dtype {x.dtype}")
    prefill = matmul is None and kind is WgmmaSparseA and x.shape[0] > 1 and \
        plan.block_t == PREFILL_BLOCK_T
    if prefill:
        fn = _PREFILL[1 if emulate else 0]

        def matmul(a, tiles, live, w, *, block_t, config):  # bf16 products
            del config
            return fn(a, tiles, live, w, block_t=block_t)
    elif matmul is None:
        matmul = _GROUPED[kind][1 if emulate else 0]
    t, d = x.shape
    k, bt = plan.top_k, plan.block_t
    n = used_tiles(plan)
    rows = n * bt
    ids = plan.sorted_ids[:rows]  # assignment per row; t*k on padding rows
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])
    xg = x_pad[jnp.minimum(ids // k, t)]  # [rows, d]; padding rows read the zero row
    tiles = plan.block_expert[:n]
    live = jnp.minimum(plan.num_blocks, n)

    def grouped(a, w):
        return matmul(a, tiles, live, w, block_t=bt, config=config)

    if t == 1 and not prefill:  # gate and up in one launch, [rows, 2f] f32 (module docstring)
        gate_up = grouped(xg, (w1, w3))
        gate, up = jnp.split(gate_up, 2, axis=1)
    else:
        gate, up = grouped(xg, w1), grouped(xg, w3)
    h = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)  # [rows, f] f32
    out = grouped(h.astype(x.dtype), w2)  # [rows, d] f32 (bf16 at prefill)
    # row of each assignment; the ones no used tile holds add nothing (no padded copy of out)
    held = plan.rows < rows
    pos = jnp.minimum(plan.rows, rows - 1)
    part = out[pos].astype(jnp.float32) * plan.weights[pos][:, None]
    y = jnp.where(held[:, None], part, 0.0).reshape(t, k, -1).sum(axis=1)
    return y.astype(x.dtype)


def moe_ffn_mgpu_emulated(x, plan, w1, w3, w2, *, config=None) -> jax.Array:
    """``moe_ffn_mgpu`` with the grouped kernels replaced by their jnp references (any host)."""
    return moe_ffn_mgpu(x, plan, w1, w3, w2, config=config, emulate=True)

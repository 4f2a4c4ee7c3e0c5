"""``y = x @ W`` for many tokens on Hopper sparse tensor cores: a warp-specialized kernel.

Prefill is compute bound, so the sparse ``wgmma.mma_async.sp`` (half the MMA work of the
dense instruction) must stay busy. ``wgmma_sp_matmul``'s kernel runs one warpgroup per
program that both waits on the TMA ring and issues the MMAs; this one splits the roles
(FlashAttention-3 / CUTLASS "warp-specialized cooperative" structure):

* one producer warpgroup issues every TMA copy (``plgpu.emit_pipeline_warp_specialized``,
  a ``stages``-deep ring; it gives its registers to the consumers);
* ``consumers`` (1 or 2) consumer warpgroups each own 64 rows of W^T: a program computes
  y^T [64 * consumers, block_t] = W^T rows x the shared x tile [block_t, block_k], so the
  x tile crosses HBM and shared memory once for both;
* per K tile a consumer issues one m64 n``block_t`` k32 sparse wgmma per 32 dense K from
  shared-memory descriptors (``sparse_mma.tile_descriptors``; its A rows at a byte offset
  of 64 rows per warpgroup), commits and waits for them; the other consumer's MMAs keep
  the tensor cores busy meanwhile;
* programs run in grouped raster order (``group_m`` row tiles sweep the token tiles
  together), so a group's weights stay in L2 and x crosses HBM once per group;
* one K split (no partial sums): each consumer converts its f32 accumulator (y^T
  [64, block_t]) to the output dtype, stores it transposed into a swizzled shared-memory tile
  y [block_t, 64] and TMA-copies that into y [t, N]: no transpose pass.

2:4 weights only (``WgmmaSparseA`` without ``sel``). ``wgmma_sp_prefill_matmul_reference``
has the same signature (pure jnp). Lowers for CUDA on any host (``lowers_for_cuda``); runs
only on Hopper.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.sparse_mma import (accumulator_value, check_matrix, issue_wgmma_sp,
                                      meta_slot_index, smem_transforms, swizzle_for,
                                      tile_descriptors)
from pallas_kernels.sparse_mma_layout import WGMMA_K, WGMMA_M, WgmmaSparseA

SMEM_BYTES = 232_448  # dynamic shared memory one Hopper (sm_90) program may use


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpPrefillConfig:
    """Tiling of the warp-specialized prefill kernel.

    block_t: tokens per program (the instruction's N), a multiple of 8 in [8, 256].
    block_k: dense K per pipeline step, a multiple of 32 dividing K.
    stages: K tiles in the TMA ring (>= 2).
    consumers: consumer warpgroups per program (1 or 2), 64 W^T rows each.
    group_m: programs of consecutive W^T row tiles that run over the token tiles together
      (grouped raster order): the group's weights stay in L2 while it sweeps the tokens,
      and x is read from HBM once per group. None: every row tile in one group.
    """

    block_t: int = 256
    block_k: int = 64
    stages: int = 3
    consumers: int = 2
    group_m: int | None = 16


def smem_bytes(cfg: SpPrefillConfig, out_itemsize: int = 2) -> int:
    """Shared memory of one program: the ring (x tile, compressed A rows, metadata) times
    ``stages``, the output tiles and 1 KiB of barriers."""
    rows = WGMMA_M * cfg.consumers
    ring = (cfg.block_t * cfg.block_k * 2 + rows * cfg.block_k
            + cfg.consumers * cfg.block_k // WGMMA_K * WGMMA_M * 4)
    return cfg.stages * ring + rows * cfg.block_t * out_itemsize + 1024


def check_config(cfg: SpPrefillConfig, a: WgmmaSparseA, out_dtype: Any) -> None:
    """ValueError (expected vs given) when ``cfg`` does not fit ``a`` or shared memory."""
    if cfg.block_t % 8 or not 8 <= cfg.block_t <= 256:
        raise ValueError(f"block_t must be a multiple of 8 in [8, 256], got {cfg.block_t}")
    if cfg.block_k % WGMMA_K or a.k % cfg.block_k:
        raise ValueError(f"block_k={cfg.block_k} must be a multiple of {WGMMA_K} dividing "
                         f"K={a.k}")
    if cfg.consumers not in (1, 2):
        raise ValueError(f"consumers must be 1 or 2, got {cfg.consumers}")
    if a.rows % (WGMMA_M * cfg.consumers):
        raise ValueError(f"W^T rows ({a.rows}) must be a multiple of "
                         f"{WGMMA_M * cfg.consumers} ({cfg.consumers} consumers x {WGMMA_M})")
    if cfg.stages < 1:
        raise ValueError(f"stages must be >= 1, got {cfg.stages}")
    if cfg.group_m is not None and cfg.group_m < 1:
        raise ValueError(f"group_m must be None or >= 1, got {cfg.group_m}")
    need = smem_bytes(cfg, jnp.dtype(out_dtype).itemsize)
    if need > SMEM_BYTES:
        raise ValueError(f"{cfg} needs about {need} bytes of shared memory, more than the "
                         f"{SMEM_BYTES} a Hopper SM has: lower block_k, block_t or stages")


def _check(x: jax.Array, a: WgmmaSparseA) -> None:
    check_matrix(x, a)
    if a.paired:
        raise ValueError("the prefill kernel takes 2:4 weights; Samoyeds weights (sel) go "
                         "through wgmma_sp_matmul")


def wgmma_sp_prefill_matmul_reference(x: jax.Array, a: WgmmaSparseA, *,
                                      config: SpPrefillConfig | None = None,
                                      out_dtype: Any = None) -> jax.Array:
    """``x @ W`` in jnp, f32 accumulation. x: [t, K]; a: W [K, N] (2:4). Returns [t, N]."""
    del config
    _check(x, a)
    y = jnp.dot(x.astype(jnp.float32), a.to_dense().astype(jnp.float32),
                precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)


def wgmma_sp_prefill_matmul(x: jax.Array, a: WgmmaSparseA, *,
                            config: SpPrefillConfig | None = None,
                            out_dtype: Any = None) -> jax.Array:
    """``x @ W`` with the warp-specialized sparse-wgmma kernel (Hopper). Same signature as
    the reference.

    Args:
      x: [t, K] bfloat16.
      a: W [K, N] as a 2:4 ``WgmmaSparseA``, no leading dims.
      config: tiling (``SpPrefillConfig``; default 256 tokens x 64 K, 3 stages, 2 consumers).
      out_dtype: output dtype (default x.dtype); accumulation is float32.

    Returns:
      [t, N] in ``out_dtype``.

    Raises:
      ValueError: shapes, dtypes or a config that does not fit (expected vs given).
    """
    _check(x, a)
    cfg = config or SpPrefillConfig()
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    check_config(cfg, a, out_dtype)
    t = x.shape[0]
    if t == 0:
        return jnp.zeros((0, a.shape[-1]), out_dtype)
    t_pad = -(-t // cfg.block_t) * cfg.block_t
    x = jnp.pad(x, ((0, t_pad - t), (0, 0)))
    y = _call(x, a.values, a.meta, **_static(cfg), out_dtype=out_dtype)
    return y[:t]


def _static(cfg: SpPrefillConfig) -> dict:
    return dict(block_t=cfg.block_t, block_k=cfg.block_k, stages=cfg.stages,
                consumers=cfg.consumers, group_m=cfg.group_m)


def _mma_k_tile(ctx, acc, a_ref, x_ref, m_ref, *, block_t: int, block_k: int):
    """Mosaic GPU body: this warpgroup's sparse wgmmas of one K tile, added into ``acc``.

    acc: [64, block_t] f32 (WGMMA layout); a_ref: A rows of every consumer [64 c, block_k/2]
    bf16 tiled; x_ref: x tile [block_t, block_k] tiled; m_ref: [c, block_k/32, 64] int32.
    Waits for its wgmmas before the tile's ring slot is released: with two consumers the
    other warpgroup's MMAs keep the tensor cores busy meanwhile. (Leaving a group in flight
    across tiles, as ``wgmma_sp_matmul``'s ``inflight=1`` does, was slower here on an H100
    and gave wrong tiles at 168 registers per thread.)
    """
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, nvvm
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    index = ir.IndexType.get()
    i64 = ir.IntegerType.get_signless(64)
    tid = mgpu_utils.thread_idx()
    if not isinstance(tid.type, ir.IndexType):
        tid = arith.index_cast(index, tid)
    wg = arith.divui(tid, arith.constant(index, 128))
    # 64 rows of A = 8 row tiles of 8 * block_k bytes; descriptors count 16-byte units
    a_off = arith.muli(arith.index_cast(i64, wg), arith.constant(i64, 4 * block_k))
    slot = meta_slot_index()
    accum = mgpu.WGMMAAccumulator.from_registers(acc)
    regs = list(accum._value.registers.flat)
    nvvm.wgmma_fence_aligned()
    for j in range(block_k // WGMMA_K):
        a_desc, b_desc = tile_descriptors(a_ref, x_ref, j, block_t=block_t,
                                          block_k=block_k)
        meta = memref.load(m_ref, [wg, arith.constant(index, j), slot])
        regs = issue_wgmma_sp(regs, arith.addi(a_desc, a_off), b_desc, meta, block_t)
    nvvm.wgmma_commit_group_sync_aligned()
    nvvm.wgmma_wait_group_sync_aligned(0)
    return accumulator_value(accum, regs)


def raster(i, m_tiles: int, t_tiles: int, group_m: int | None):
    """(row tile, token tile) of program ``i`` in grouped raster order: groups of
    ``group_m`` row tiles, the row tile fastest inside a group, then the token tile."""
    g = min(group_m or m_tiles, m_tiles)
    per_group = g * t_tiles
    first = i // per_group * g
    size = jnp.minimum(m_tiles - first, g)   # the last group may be narrower
    r = i % per_group
    return first + r % size, r // size


@functools.partial(jax.jit, static_argnames=("block_t", "block_k", "stages", "consumers",
                                             "group_m", "out_dtype"))
def _call(x, values, meta, *, block_t: int, block_k: int, stages: int, consumers: int,
          group_m: int | None, out_dtype: Any):
    """x [t_pad, K], values [R, K/2], meta [R/64, K/32, 64] -> y [t_pad, R] out_dtype."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu

    t_pad, k = x.shape
    rows = values.shape[0]
    cta_rows = WGMMA_M * consumers
    out_size = jnp.dtype(out_dtype).itemsize
    m_tiles, t_tiles = rows // cta_rows, t_pad // block_t
    ksteps = block_k // WGMMA_K
    swa, swb = swizzle_for(block_k), swizzle_for(2 * block_k)
    acc_type = plgpu.ShapeDtypeStruct((WGMMA_M, block_t), jnp.float32, layout=plgpu.Layout.WGMMA)
    mma = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(transforms=smem_transforms(swa)),
                   plgpu.RefType(transforms=smem_transforms(swb)), plgpu.RefType()),
        return_type=acc_type,
    )(functools.partial(_mma_k_tile, block_t=block_t, block_k=block_k))

    def body(x_gmem, a_gmem, m_gmem, o_gmem, o_smem):
        mi, ti = raster(lax.axis_index("i"), m_tiles, t_tiles, group_m)
        wg = lax.axis_index("wg")

        def step(_, x_smem, a_smem, m_smem, acc):
            return mma(acc, a_smem, x_smem, m_smem)

        def context(run):
            acc = run(plgpu.layout_cast(jnp.zeros((WGMMA_M, block_t), jnp.float32),
                                        plgpu.Layout.WGMMA))
            # y^T tile [64, block_t] -> y tile [block_t, 64] through a transposed view of the
            # swizzled output buffer, then one TMA copy into y
            y = acc.astype(out_dtype)
            if jnp.dtype(out_dtype).itemsize == 4:  # pairs along the stored rows for 32 bits
                y = plgpu.layout_cast(y, plgpu.Layout.WGMMA_TRANSPOSED)
            o_smem.at[wg].T[...] = y
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[
                pl.ds(ti * block_t, block_t), pl.ds(mi * cta_rows + wg * WGMMA_M, WGMMA_M)])
            plgpu.wait_smem_to_gmem(0)

        plgpu.emit_pipeline_warp_specialized(
            step, grid=(k // block_k,), memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((block_t, block_k), lambda kk: (ti, kk),
                                transforms=smem_transforms(swb)),
                plgpu.BlockSpec((cta_rows, block_k // 2), lambda kk: (mi, kk),
                                transforms=smem_transforms(swa)),
                plgpu.BlockSpec((consumers, ksteps, WGMMA_M), lambda kk: (mi, kk, 0)),
            ],
            wg_axis="wg", num_compute_wgs=consumers, max_concurrent_steps=stages,
            compute_context=context,
        )(x_gmem, a_gmem, m_gmem)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((t_pad, rows), out_dtype),
        grid=(m_tiles * t_tiles,),
        grid_names=("i",),
        num_threads=consumers + 1,
        thread_name="wg",
        scratch_types=dict(o_smem=plgpu.SMEM(
            (consumers, block_t, WGMMA_M), out_dtype,
            # 64 columns a row at the widest swizzle (128 bytes for bf16): the transposed
            # register store is free of bank conflicts
            transforms=smem_transforms(swizzle_for(WGMMA_M * out_size), out_size))),
        compiler_params=plgpu.CompilerParams(lowering_semantics=mgpu.LoweringSemantics.Lane),
    )
    return kernel(x, values, meta)


def lowers_for_cuda(x: jax.Array, a: WgmmaSparseA, config: SpPrefillConfig | None = None
                    ) -> str:
    """Export ``wgmma_sp_prefill_matmul`` for CUDA on this host (the Mosaic GPU lowering, no
    GPU). Returns the exported module text; raises what the lowering raises."""
    fn = functools.partial(wgmma_sp_prefill_matmul, config=config)
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(x, a).mlir_module()

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

Samoyeds weights (``WgmmaSparseA`` with ``sel``: A row r feeds dense column 2r + sel per slab
of ``v`` K rows) keep two accumulators per consumer, one per dense column of the pair, and no
partial product: the wgmmas always add into the first, and after each slab a thread swaps its
two accumulators' registers for the rows whose column changes at the next slab (two selects
per register; ``flips``: sel of the slab xor sel of the next, the last slab's against 0), so
the wgmma accumulator always holds the column the next slab feeds and, at the end, column 2r.
The output tile packs the pair (2r, 2r + 1) into one 32-bit word per token, stored transposed
like a 4-byte tile: y [t, R] uint32 is y [t, 2R] bf16 without a pass over it.

``wgmma_sp_prefill_grouped_matmul`` is the MoE form: token tile i (rows grouped by expert)
multiplies expert ``tile_expert[i]``; tiles past ``num_tiles`` load nothing and store zeros.

``wgmma_sp_prefill_matmul_reference`` / ``wgmma_sp_prefill_grouped_matmul_reference`` have
the same signatures (pure jnp). Lowers for CUDA on any host (``lowers_for_cuda``); runs only
on Hopper.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.checks import expect_kind, expect_token_tiles
from pallas_kernels.routing_plan import grouped_tiles_product
from pallas_kernels.sparse_mma import (accumulator_value, check_common, check_matrix,
                                      issue_wgmma_sp, meta_slot_index, smem_transforms,
                                      swizzle_for, tile_descriptors)
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


def smem_bytes(cfg: SpPrefillConfig, out_itemsize: int = 2, v: int = 0) -> int:
    """Shared memory of one program (``v``: Samoyeds slab rows, 0 for 2:4): the ring (x tile,
    compressed A rows, metadata, Samoyeds flip rows) times ``stages``, the output tiles (a
    32-bit word per column pair for Samoyeds) and 1 KiB of barriers."""
    rows = WGMMA_M * cfg.consumers
    ring = (cfg.block_t * cfg.block_k * 2 + rows * cfg.block_k
            + cfg.consumers * cfg.block_k // WGMMA_K * WGMMA_M * 4)
    if v:
        ring += rows * 2 * max(1, cfg.block_k // v)
        out_itemsize = 2 * out_itemsize
    return cfg.stages * ring + rows * cfg.block_t * out_itemsize + 1024


def default_config(a: WgmmaSparseA, block_t: int = 128, out_dtype: Any = jnp.bfloat16
                   ) -> SpPrefillConfig:
    """A tiling for ``block_t``-token tiles of ``a``: two consumers where the W^T rows are a
    multiple of 128 (else one), the widest K tile of 128, 64, 32 that divides K (and divides
    or is a multiple of Samoyeds' v) whose 3-stage ring fits in shared memory, else 2 stages.
    """
    consumers = 2 if a.rows % (2 * WGMMA_M) == 0 else 1
    v = a.v if a.paired else 0
    itemsize = jnp.dtype(out_dtype).itemsize
    widths = [b for b in (128, 64, 32) if a.k % b == 0 and (not v or v % b == 0 or b % v == 0)]
    for stages in (3, 2):
        for block_k in widths:
            cfg = SpPrefillConfig(block_t=block_t, block_k=block_k, stages=stages,
                                  consumers=consumers)
            if smem_bytes(cfg, itemsize, v) <= SMEM_BYTES:
                return cfg
    return SpPrefillConfig(block_t=block_t, block_k=WGMMA_K, stages=2, consumers=consumers)


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
    if a.paired and a.v % cfg.block_k and cfg.block_k % a.v:
        raise ValueError(f"block_k={cfg.block_k} must divide or be a multiple of the Samoyeds "
                         f"slab v={a.v}")
    if a.paired and jnp.dtype(out_dtype).itemsize != 2:
        raise ValueError(f"Samoyeds weights need a 2-byte out_dtype (a column pair is one "
                         f"32-bit word), got {jnp.dtype(out_dtype).name}")
    need = smem_bytes(cfg, jnp.dtype(out_dtype).itemsize, a.v if a.paired else 0)
    if need > SMEM_BYTES:
        raise ValueError(f"{cfg} needs about {need} bytes of shared memory, more than the "
                         f"{SMEM_BYTES} a Hopper SM has: lower block_k, block_t or stages")


def wgmma_sp_prefill_matmul_reference(x: jax.Array, a: WgmmaSparseA, *,
                                      config: SpPrefillConfig | None = None,
                                      out_dtype: Any = None) -> jax.Array:
    """``x @ W`` in jnp, f32 accumulation. x: [t, K]; a: W [K, N]. Returns [t, N]."""
    del config
    check_matrix(x, a)
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
      a: W [K, N] as a ``WgmmaSparseA`` (2:4, or Samoyeds with ``sel``), no leading dims.
      config: tiling (``SpPrefillConfig``; default 256 tokens x 64 K, 3 stages, 2 consumers).
      out_dtype: output dtype (default x.dtype; 2 bytes for Samoyeds); accumulation is
        float32.

    Returns:
      [t, N] in ``out_dtype``.

    Raises:
      ValueError: shapes, dtypes or a config that does not fit (expected vs given).
    """
    check_matrix(x, a)
    cfg = config or SpPrefillConfig()
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    check_config(cfg, a, out_dtype)
    t = x.shape[0]
    if t == 0:
        return jnp.zeros((0, a.shape[-1]), out_dtype)
    t_pad = -(-t // cfg.block_t) * cfg.block_t
    x = jnp.pad(x, ((0, t_pad - t), (0, 0)))
    y = _call(x, a.values, a.meta, *_flips(a, cfg.block_k), **_static(cfg), out_dtype=out_dtype)
    return _unpack(y, a.paired, out_dtype)[:t]


def wgmma_sp_prefill_grouped_matmul_reference(x: jax.Array, tile_expert: jax.Array,
                                              num_tiles: jax.Array, a: WgmmaSparseA, *,
                                              block_t: int, config: SpPrefillConfig | None = None,
                                              out_dtype: Any = None) -> jax.Array:
    """Per token tile i: ``x[tile i] @ W[tile_expert[i]]``, zeros for tiles >= num_tiles (jnp,
    f32 accumulation). x: [n*block_t, K]; a: stack [e, K, N]. Returns [n*block_t, N]."""
    del config
    check_grouped(x, tile_expert, a, block_t)
    y = grouped_tiles_product(x, tile_expert, num_tiles, a.to_dense(), block_t)
    return y.astype(out_dtype or x.dtype)


def wgmma_sp_prefill_grouped_matmul(x: jax.Array, tile_expert: jax.Array, num_tiles: jax.Array,
                                    a: WgmmaSparseA, *, block_t: int,
                                    config: SpPrefillConfig | None = None,
                                    out_dtype: Any = None) -> jax.Array:
    """Expert-grouped ``wgmma_sp_prefill_matmul``: token tile i of x times expert
    ``tile_expert[i]``. Same signature as the reference.

    Args:
      x: [n*block_t, K] bf16, token rows grouped by expert (``RoutingPlan`` row tiles).
      tile_expert: [n] int32, expert of each tile (only tiles < num_tiles are read).
      num_tiles: [] int32, tiles in use.
      a: ``WgmmaSparseA`` expert stack, dense [e, K, N] (2:4 or Samoyeds).
      block_t: rows per tile (the config's ``block_t`` is replaced by it).
      config: the other fields of the tiling (default ``default_config``).
      out_dtype: output dtype (default x.dtype; 2 bytes for Samoyeds).

    Returns:
      [n*block_t, N] in ``out_dtype``.
    """
    check_grouped(x, tile_expert, a, block_t)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    one = jax.tree.map(lambda v: v[0], a)
    cfg = dataclasses.replace(config or default_config(one, block_t, out_dtype), block_t=block_t)
    check_config(cfg, one, out_dtype)
    e = a.values.shape[0]
    flips = [f.reshape(-1, a.rows) for f in _flips(a, cfg.block_k)]
    y = _call(x, a.values.reshape(-1, a.k // 2), a.meta.reshape(-1, *a.meta.shape[-2:]), *flips,
              tile_expert=tile_expert.astype(jnp.int32),
              num_tiles=jnp.reshape(num_tiles, (1,)).astype(jnp.int32), experts=e,
              **_static(cfg), out_dtype=out_dtype)
    return _unpack(y, a.paired, out_dtype)


def check_grouped(x: jax.Array, tile_expert: jax.Array, a: Any, block_t: int) -> None:
    """ValueError (expected vs given) unless ``a`` is a ``WgmmaSparseA`` expert stack and x
    [n*block_t, K] and ``tile_expert`` [n] fit it."""
    expect_kind("a", a, WgmmaSparseA, "a WgmmaSparseA expert stack [e, K, N]")
    if a.values.ndim != 3:
        raise ValueError(f"a must be a WgmmaSparseA expert stack [e, K, N], got dense shape "
                         f"{a.shape}")
    expect_token_tiles(x, tile_expert, a.k, block_t, 256)
    check_common(x, a)


def flips(sel: jax.Array, v: int, block_k: int) -> jax.Array:
    """Samoyeds ``sel`` [..., K/v, R] -> [..., K/c, R] int16 (c = min(block_k, v)): per chunk
    of c K rows, 1 where the row's two accumulators swap after it: at a slab's last chunk, sel
    of the slab xor sel of the next (of the last slab: sel itself, so the first accumulator
    ends as column 2r); 0 elsewhere."""
    nxt = jnp.concatenate([sel[..., 1:, :], jnp.zeros_like(sel[..., :1, :])], axis=-2)
    g = jnp.bitwise_xor(sel, nxt).astype(jnp.int16)
    per = max(1, v // block_k)  # chunks per slab
    if per == 1:
        return g
    pad = jnp.zeros(g.shape[:-1] + (per - 1, g.shape[-1]), g.dtype)
    return jnp.concatenate([pad, g[..., None, :]], axis=-2).reshape(
        g.shape[:-2] + (-1, g.shape[-1]))


def _flips(a: WgmmaSparseA, block_k: int) -> tuple:
    return (flips(a.sel, a.v, block_k),) if a.paired else ()


def _unpack(y: jax.Array, paired: bool, out_dtype: Any) -> jax.Array:
    """The kernel's output -> y [rows, N]: Samoyeds pairs (uint32 [rows, R], column 2r in the
    low half) as two 2-byte columns each."""
    if not paired:
        return y
    return lax.bitcast_convert_type(y, out_dtype).reshape(y.shape[0], 2 * y.shape[1])


def _static(cfg: SpPrefillConfig) -> dict:
    return dict(block_t=cfg.block_t, block_k=cfg.block_k, stages=cfg.stages,
                consumers=cfg.consumers, group_m=cfg.group_m)


def _mma_k_tile(ctx, accs, a_ref, x_ref, m_ref, *f_ref, block_t: int, block_k: int,
                chunk: int):
    """Mosaic GPU body: this warpgroup's sparse wgmmas of one K tile, added into ``accs``.

    accs: (acc,) for 2:4, (acc, other) for Samoyeds: [64, block_t] f32 (WGMMA layout); a_ref:
    A rows of every consumer [64 c, block_k/2] bf16 tiled; x_ref: x tile [block_t, block_k]
    tiled; m_ref: [c, block_k/32, 64] int32; f_ref (Samoyeds): flip rows [block_k/chunk, 64 c]
    int16. Per chunk of ``chunk`` K rows: its wgmmas, commit, wait; for Samoyeds each thread
    then swaps acc and other for its rows whose flip is set.
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
    ci = lambda val: arith.constant(index, val)
    tid = mgpu_utils.thread_idx()
    if not isinstance(tid.type, ir.IndexType):
        tid = arith.index_cast(index, tid)
    wg = arith.divui(tid, ci(128))
    # 64 rows of A = 8 row tiles of 8 * block_k bytes; descriptors count 16-byte units
    a_off = arith.muli(arith.index_cast(i64, wg), arith.constant(i64, 4 * block_k))
    slot = meta_slot_index()
    accum = mgpu.WGMMAAccumulator.from_registers(accs[0])
    regs = list(accum._value.registers.flat)
    other = (list(mgpu.WGMMAAccumulator.from_registers(accs[1])._value.registers.flat)
             if f_ref else [])
    if f_ref:
        # this thread's rows of the consumer's 64: 16*warp + lane//4 (+ 8 for registers 2, 3
        # mod 4), as columns of the flip rows
        lane_in_wg = arith.remui(tid, ci(128))
        row0 = arith.addi(arith.addi(arith.muli(wg, ci(WGMMA_M)),
                                     arith.muli(arith.divui(lane_in_wg, ci(32)), ci(16))),
                          arith.divui(arith.remui(lane_in_wg, ci(32)), ci(4)))
        rows = (row0, arith.addi(row0, ci(8)))
        zero16 = arith.constant(ir.IntegerType.get_signless(16), 0)
    steps = chunk // WGMMA_K
    for c in range(block_k // chunk):
        nvvm.wgmma_fence_aligned()
        for j in range(c * steps, (c + 1) * steps):
            a_desc, b_desc = tile_descriptors(a_ref, x_ref, j, block_t=block_t,
                                              block_k=block_k)
            meta = memref.load(m_ref, [wg, ci(j), slot])
            regs = issue_wgmma_sp(regs, arith.addi(a_desc, a_off), b_desc, meta, block_t)
        nvvm.wgmma_commit_group_sync_aligned()
        nvvm.wgmma_wait_group_sync_aligned(0)
        if f_ref:
            flip = [arith.cmpi(arith.CmpIPredicate.ne, memref.load(f_ref[0], [ci(c), r]), zero16)
                    for r in rows]
            for i, (d, o) in enumerate(zip(regs, other)):
                h = flip[(i // 2) % 2]
                regs[i], other[i] = arith.select(h, o, d), arith.select(h, d, o)
    out = (accumulator_value(accum, regs),)
    if f_ref:
        out += (accumulator_value(accum, other),)
    return out


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
                                             "group_m", "out_dtype", "experts"))
def _call(x, values, meta, *flip_rows, tile_expert=None, num_tiles=None, experts: int = 1,
          block_t: int, block_k: int, stages: int, consumers: int, group_m: int | None,
          out_dtype: Any):
    """x [t_pad, K], values [e*R, K/2], meta [e*R/64, K/32, 64] (flip_rows: Samoyeds
    [e*K/chunk, R] int16) -> y [t_pad, R] out_dtype (Samoyeds: uint32 column pairs).

    Grouped (``tile_expert`` [t_pad / block_t] int32, ``num_tiles`` [1] int32): token tile i
    multiplies expert ``tile_expert[i]``; tiles >= num_tiles load nothing and store zeros.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu

    grouped = tile_expert is not None
    paired = bool(flip_rows)
    t_pad, k = x.shape
    rows = values.shape[0] // experts
    cta_rows = WGMMA_M * consumers
    m_tiles, t_tiles = rows // cta_rows, t_pad // block_t
    kt = k // block_k
    ksteps = block_k // WGMMA_K
    chunks = flip_rows[0].shape[0] // (experts * kt) if paired else 1  # per K tile
    n_acc = 2 if paired else 1
    tile_dtype = jnp.dtype(jnp.uint32) if paired else jnp.dtype(out_dtype)
    swa, swb = swizzle_for(block_k), swizzle_for(2 * block_k)
    acc_type = plgpu.ShapeDtypeStruct((WGMMA_M, block_t), jnp.float32, layout=plgpu.Layout.WGMMA)
    mma = plgpu.inline_mgpu(
        arg_types=((plgpu.Layout.WGMMA,) * n_acc, plgpu.RefType(transforms=smem_transforms(swa)),
                   plgpu.RefType(transforms=smem_transforms(swb)), plgpu.RefType(),
                   *(plgpu.RefType(),) * paired),
        return_type=(acc_type,) * n_acc,
    )(functools.partial(_mma_k_tile, block_t=block_t, block_k=block_k,
                        chunk=block_k // chunks))

    def tile(accs):
        """The consumer's output tile [64, block_t] (y^T) in the stored dtype and layout."""
        if paired:  # column 2r in the low 16 bits, 2r + 1 in the high
            bits = [lax.bitcast_convert_type(acc.astype(out_dtype), jnp.uint16).astype(jnp.uint32)
                    for acc in accs]
            y = bits[0] | (bits[1] << jnp.uint32(16))
        else:
            y = accs[0].astype(out_dtype)
        if tile_dtype.itemsize == 4:  # pairs along the stored rows for 32 bits
            y = plgpu.layout_cast(y, plgpu.Layout.WGMMA_TRANSPOSED)
        return y

    def body(*refs, o_smem):
        if grouped:
            te_gmem, nt_gmem, *refs = refs
        x_gmem, a_gmem, m_gmem, *f_gmem, o_gmem = refs
        mi, ti = raster(lax.axis_index("i"), m_tiles, t_tiles, group_m)
        wg = lax.axis_index("wg")
        e = te_gmem[ti] if grouped else 0
        zeros = tuple(plgpu.layout_cast(jnp.zeros((WGMMA_M, block_t), jnp.float32),
                                        plgpu.Layout.WGMMA) for _ in range(n_acc))

        def store(accs):
            # y^T tile [64, block_t] -> y tile [block_t, 64] through a transposed view of the
            # swizzled output buffer, then one TMA copy into y
            o_smem.at[wg].T[...] = tile(accs)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[
                pl.ds(ti * block_t, block_t), pl.ds(mi * cta_rows + wg * WGMMA_M, WGMMA_M)])
            plgpu.wait_smem_to_gmem(0)

        def step(_, x_smem, a_smem, m_smem, *refs):
            *f_smem, accs = refs
            return mma(accs, a_smem, x_smem, m_smem, *f_smem)

        def pipeline():
            row_block = e * m_tiles + mi
            specs = [
                plgpu.BlockSpec((block_t, block_k), lambda kk: (ti, kk),
                                transforms=smem_transforms(swb)),
                plgpu.BlockSpec((cta_rows, block_k // 2), lambda kk: (row_block, kk),
                                transforms=smem_transforms(swa)),
                plgpu.BlockSpec((consumers, ksteps, WGMMA_M), lambda kk: (row_block, kk, 0)),
            ]
            if paired:
                specs.append(plgpu.BlockSpec((chunks, cta_rows), lambda kk: (e * kt + kk, mi)))
            plgpu.emit_pipeline_warp_specialized(
                step, grid=(kt,), memory_registers=40, in_specs=specs,
                wg_axis="wg", num_compute_wgs=consumers, max_concurrent_steps=stages,
                compute_context=lambda run: store(run(zeros)),
            )(x_gmem, a_gmem, m_gmem, *f_gmem)

        if not grouped:
            pipeline()
            return
        live = ti < nt_gmem[0]
        pl.when(live)(pipeline)
        # tiles past num_tiles: each consumer stores a zero tile
        pl.when(jnp.logical_and(jnp.logical_not(live), wg < consumers))(lambda: store(zeros))

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((t_pad, rows), tile_dtype),
        grid=(m_tiles * t_tiles,),
        grid_names=("i",),
        num_threads=consumers + 1,
        thread_name="wg",
        scratch_types=dict(o_smem=plgpu.SMEM(
            (consumers, block_t, WGMMA_M), tile_dtype,
            # 64 columns a row at the widest swizzle (128 bytes for bf16): the transposed
            # register store is free of bank conflicts
            transforms=smem_transforms(swizzle_for(WGMMA_M * tile_dtype.itemsize),
                                       tile_dtype.itemsize))),
        compiler_params=plgpu.CompilerParams(lowering_semantics=mgpu.LoweringSemantics.Lane),
    )
    operands = (x, values, meta, *flip_rows)
    if grouped:
        return kernel(tile_expert, num_tiles, *operands)
    return kernel(*operands)


def lowers_for_cuda(x: jax.Array, a: WgmmaSparseA, config: SpPrefillConfig | None = None, *,
                    tile_expert: jax.Array | None = None) -> str:
    """Export ``wgmma_sp_prefill_matmul`` (with ``tile_expert``: the grouped form, ``a`` a
    stack, all tiles live) for CUDA on this host (the Mosaic GPU lowering, no GPU). Returns
    the exported module text; raises what the lowering raises."""
    if tile_expert is None:
        fn = functools.partial(wgmma_sp_prefill_matmul, config=config)
        return jax.export.export(jax.jit(fn), platforms=["cuda"])(x, a).mlir_module()
    block_t = x.shape[0] // tile_expert.shape[0]
    fn = functools.partial(wgmma_sp_prefill_grouped_matmul, block_t=block_t, config=config)
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(
        x, tile_expert, jnp.int32(tile_expert.shape[0]), a).mlir_module()

"""``y = x @ W`` on Hopper sparse tensor cores: a pipelined ``wgmma.mma_async.sp`` kernel.

Load-as-Sparse, Compute-as-Sparse: the compressed 2:4 weights go from HBM to shared memory by
TMA and straight into the sparse tensor core, with no expansion in registers. Used for decode
(few tokens: memory bound, so the win is the bytes); from ``prefill_from`` tokens (many
tokens: compute bound, where the sparse instruction does half the MMA work of the dense one)
``wgmma_sp_matmul`` hands 2:4 and Samoyeds weights to the warp-specialized kernel of
``pallas_kernels.sparse_mma_prefill`` (``prefill_config``); weights that kernel does not take
go dense from ``dense_from`` tokens.

* ``y^T [N, t] = W^T [N, K] @ x^T [K, t]``; W as a ``WgmmaSparseA`` (A = W^T compressed
  [R, K/2] + per-thread metadata registers [R/64, K/32, 64]; converted once at load, see
  ``pallas_kernels.sparse_mma_layout``).
* One program per (64 W^T rows, K split, ``block_t`` tokens); ``plgpu.emit_pipeline`` streams K
  tiles of ``block_k`` through a ``stages``-deep TMA ring: the compressed A tile [64, block_k/2],
  its metadata [block_k/32, 64] and the x tile [block_t, block_k] (each at the widest swizzle its
  rows allow, up to 128 bytes).
* Per K tile, one sparse wgmma per 32 dense K (m64 n``block_t`` k32, f32 += bf16 x bf16) from
  SMEM descriptors (advanced by 32 / 64 bytes inside a swizzle atom), issued through
  ``plgpu.inline_mgpu`` + inline PTX; one ``wgmma.wait_group`` per K tile (0, or 1 with
  ``inflight=1``: the previous tile's group, its ring slot released one step late); the
  accumulators are the pipeline's carry (WGMMA layout).
* Samoyeds weights (``a.paired``): row r of A feeds dense column ``2r + sel[slab, r]``. Per slab
  of ``v`` K rows the sparse wgmmas write a fresh partial product (scale-d = 0 on the first), and
  each thread adds it to one of two accumulators by its rows' ``sel`` (two selects and two adds
  per register, per slab).
* The accumulators go to SMEM and out by TMA as y^T partial sums [splits, 2 or 1, R, t]; one XLA
  sum over splits and a transpose give y.

``wgmma_sp_grouped_matmul`` is the MoE form: one launch for every expert of a layer, a token
tile's program reads its expert's weights only, tiles past ``num_tiles`` load nothing. It also
takes several stacks of one shape (a layer's gate and up) and multiplies them in the same launch:
each program's 64 rows lie in one stack, whose pipeline it runs in a branch of its own.
``wgmma_sp_matmul_reference`` / ``wgmma_sp_grouped_matmul_reference`` have the same signatures
(pure jnp). The kernel lowers for CUDA on any host (``jax.export``); it runs only on Hopper.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.checks import expect_stacks
from pallas_kernels.mgpu_matmul import fewest_splits, sm_count, split_sum, when_all
from pallas_kernels.routing_plan import grouped_tiles_product
from pallas_kernels.sparse_mma import (accumulator_value, check_matrix, issue_wgmma_sp,
                                      meta_slot_index, smem_transforms, swizzle_for,
                                      tile_descriptors)
from pallas_kernels.sparse_mma_layout import WGMMA_K, WGMMA_M, WgmmaSparseA
from pallas_kernels.sparse_mma_prefill import (SMEM_BYTES, SpPrefillConfig, check_grouped,
                                               wgmma_sp_prefill_matmul)
from pallas_kernels.sparse_mma_prefill import default_config as prefill_default_config
from pallas_kernels.sparse_mma_prefill import smem_bytes as prefill_smem_bytes

@dataclasses.dataclass(frozen=True, kw_only=True)
class WgmmaSpConfig:
    """Tiling of one sparse-wgmma launch.

    block_t: tokens per program (the instruction's N): a multiple of 8 in [8, 256]; None: the
      token count rounded up to 8, at most 64 (decode); from 512 tokens on (prefill) 256 when
      the 256-token tiles give every SM a program and fit K tiles of >= 64 in shared memory
      (2:4), else 128.
    block_k: dense K per pipeline step, a multiple of 32 dividing K (for Samoyeds also dividing
      or divided by the slab ``v``); None: the widest of 256, 128, 64, 32 that does and whose
      ``stages``-deep ring fits in shared memory (``smem_bytes``).
    splits: K splits (a divisor of K // block_k); None: the fewest that put ``programs_per_sm``
      programs on every SM; 1 from 512 tokens on (prefill).
    stages: K tiles in flight per program (the TMA ring depth).
    programs_per_sm: what the default ``splits`` aims for; None: 4 for one 8-token tile, else 2
      (H100 sweep, Mixtral shapes: at 16-64 tokens fewer, longer K splits won by 3-40%; at 1
      token 4 per SM won by 2-3%).
    inflight: wgmma groups left running when a K tile ends (0 or 1; 1 releases a ring slot one
      tile late, so the tensor cores never drain between tiles; 2:4 only, needs stages >= 2).
    prefill_from: token count from which ``wgmma_sp_matmul`` sends weights to the
      warp-specialized kernel (``sparse_mma_prefill``, tiling from ``prefill_config``; the
      fields above then do not apply). None: never. H100: 2:4 1.14-1.90x XLA dense from 512
      tokens on the Mixtral and Qwen3 shapes; Samoyeds 1.12-1.53x at 2048-4096 tokens
      (benchmarks/mgpu_matmul.md).
    dense_from: token count from which ``wgmma_sp_matmul`` computes densely instead, for the
      weights the prefill kernel does not take (``prefill_config`` None): W^T
      expanded by one XLA fusion (``WgmmaSparseA.to_dense_t``), then XLA's GEMM. None: never.
      H100, five expert shapes: from 2048 tokens the one-warpgroup kernel is 0.40-0.79x XLA
      dense, the expanded weight 0.84-1.05x (benchmarks/mgpu_matmul.md, "Prefill on the
      Hopper layout").
    """

    block_t: int | None = None
    block_k: int | None = None
    splits: int | None = None
    stages: int = 3
    programs_per_sm: int | None = None
    inflight: int = 0
    prefill_from: int | None = 512
    dense_from: int | None = 2048


def wgmma_sp_matmul_reference(x: jax.Array, a: WgmmaSparseA, *,
                              config: WgmmaSpConfig | None = None, out_dtype: Any = None
                              ) -> jax.Array:
    """``x @ W`` in jnp, f32 accumulation. x: [t, K]; a: W [K, N]. Returns [t, N]."""
    del config
    check_matrix(x, a)
    y = jnp.dot(x.astype(jnp.float32), a.to_dense().astype(jnp.float32),
                precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)


def wgmma_sp_matmul(x: jax.Array, a: WgmmaSparseA, *, config: WgmmaSpConfig | None = None,
                    out_dtype: Any = None) -> jax.Array:
    """``x @ W`` with pipelined sparse wgmma (Hopper). Same signature as the reference.

    Args:
      x: [t, K] bfloat16.
      a: W [K, N] as ``WgmmaSparseA`` (2:4, or Samoyeds with ``sel``), no leading dims.
      config: tiling (``WgmmaSpConfig``); None picks it from t and the shape.
      out_dtype: output dtype (default x.dtype).

    Returns:
      [t, N] in ``out_dtype``, accumulated in float32.

    Raises:
      ValueError: shapes, dtypes or a config that does not fit (expected vs given).
    """
    check_matrix(x, a)
    t = x.shape[0]
    n_out = a.shape[-1]
    if t == 0:
        return jnp.zeros((0, n_out), out_dtype or x.dtype)
    pf = prefill_config(t, a, config, out_dtype or x.dtype)
    if pf is not None:  # 2:4 prefill: the warp-specialized kernel
        return wgmma_sp_prefill_matmul(x, a, config=pf, out_dtype=out_dtype)
    dense_from = (config or WgmmaSpConfig()).dense_from
    if dense_from is not None and t >= dense_from:  # prefill: dense compute wins (see config)
        return lax.dot_general(x, a.to_dense_t(), (((1,), (1,)), ((), ())),
                               preferred_element_type=out_dtype or x.dtype)
    cfg = resolve_config(config, t=t, a=a)
    t_pad = -(-t // cfg.block_t) * cfg.block_t
    x = jnp.pad(x, ((0, t_pad - t), (0, 0)))
    parts = _call(x, ((a.values, a.meta, a.sel),), v=a.v, **_static(cfg))
    return split_sum(parts, paired=a.paired)[:t].astype(out_dtype or x.dtype)


def wgmma_sp_grouped_matmul_reference(x: jax.Array, tile_expert: jax.Array,
                                      num_tiles: jax.Array, a: WgmmaSparseA | Sequence, *,
                                      block_t: int, config: WgmmaSpConfig | None = None
                                      ) -> jax.Array:
    """Per token tile i: ``x[tile i] @ W[tile_expert[i]]``, zeros for tiles >= num_tiles (jnp).

    x: [n*block_t, K]; tile_expert: [n] int32; num_tiles: [] int32; a: stack [e, K, N], or a
    sequence of such stacks (their products side by side). Returns [n*block_t, N or s*N] float32.
    """
    del config
    stacks = _check_grouped(x, tile_expert, a, block_t)
    return jnp.concatenate([grouped_tiles_product(x, tile_expert, num_tiles, w.to_dense(), block_t)
                            for w in stacks], axis=1)


def wgmma_sp_grouped_matmul(x: jax.Array, tile_expert: jax.Array, num_tiles: jax.Array,
                            a: WgmmaSparseA | Sequence, *, block_t: int,
                            config: WgmmaSpConfig | None = None) -> jax.Array:
    """Expert-grouped ``wgmma_sp_matmul``: token tile i of x times expert ``tile_expert[i]``.

    Args:
      x: [n*block_t, K] bf16, token rows grouped by expert (``RoutingPlan`` row tiles).
      tile_expert: [n] int32, expert of each tile (only tiles < num_tiles are read).
      num_tiles: [] int32, tiles in use.
      a: ``WgmmaSparseA`` expert stack, dense [e, K, N]; or a sequence of s such stacks of one
        shape and format (e.g. a MoE layer's gate and up), multiplied in the same launch.
      block_t: rows per tile: a multiple of 8 in [8, 256].
      config: ``block_k``, ``splits``, ``stages`` (``block_t`` comes from the argument).

    Returns:
      [n*block_t, N] float32; [n*block_t, s*N] for s stacks, stack j's product in columns
      [j*N, (j+1)*N).
    """
    stacks = _check_grouped(x, tile_expert, a, block_t)
    n = x.shape[0] // block_t
    first = stacks[0]
    e = first.values.shape[0]
    one = jax.tree.map(lambda v: v[0], first)
    cfg = dataclasses.replace(config or WgmmaSpConfig(), block_t=block_t)
    cfg = resolve_config(cfg, t=min(n, e) * block_t, a=one, stacks=len(stacks))
    parts = _call(x, tuple((w.values.reshape(-1, w.k // 2), w.meta.reshape(-1, *w.meta.shape[-2:]),
                            None if not w.paired else w.sel.reshape(-1, w.rows))
                           for w in stacks),
                  tile_expert=tile_expert.astype(jnp.int32),
                  num_tiles=jnp.reshape(num_tiles, (1,)).astype(jnp.int32), experts=e, v=first.v,
                  **_static(cfg))
    return split_sum(parts, paired=one.paired)


def prefill_config(t: int, a: WgmmaSparseA, config: WgmmaSpConfig | None = None,
                   out_dtype: Any = jnp.bfloat16) -> SpPrefillConfig | None:
    """The warp-specialized kernel's tiling for ``t`` tokens, or None where
    ``wgmma_sp_matmul`` does not use it (fewer than ``prefill_from`` tokens, W^T rows not a
    multiple of 128, Samoyeds weights with a 4-byte ``out_dtype``).

    2:4: 256-token tiles (K tiles of 64, 3 stages) when they give at least half the SMs a
    program, else 128-token tiles with K tiles of 128 (H100: Qwen3 w1 at 2048 tokens 1.49x
    XLA dense at 128 tokens, 0.90x at 256; Mixtral w2 at 1024 1.32x at 256, 1.17x at 128);
    2 stages where a 4-byte output tile leaves no room for 3. Samoyeds: 128-token tiles (two
    accumulators), ``sparse_mma_prefill.default_config``.
    """
    start = (config or WgmmaSpConfig()).prefill_from
    if start is None or t < start or a.rows % (2 * WGMMA_M):
        return None
    if a.paired:
        if jnp.dtype(out_dtype).itemsize != 2:
            return None
        return prefill_default_config(a, 128, out_dtype)
    tiles256 = a.rows // (2 * WGMMA_M) * -(-t // 256)
    if tiles256 >= sm_count() // 2:
        cfg = SpPrefillConfig()
    else:
        cfg = SpPrefillConfig(block_t=128, block_k=128 if a.k % 128 == 0 else 64)
    if prefill_smem_bytes(cfg, jnp.dtype(out_dtype).itemsize) > SMEM_BYTES:
        cfg = dataclasses.replace(cfg, stages=2)
    return cfg


def resolve_config(config: WgmmaSpConfig | None, *, t: int, a: WgmmaSparseA,
                   stacks: int = 1) -> WgmmaSpConfig:
    """Fill ``block_t``, ``block_k`` and ``splits`` and check the config against this problem
    (``stacks`` weights of ``a``'s shape in one launch)."""
    cfg = config or WgmmaSpConfig()
    k = a.k
    v = a.v if a.paired else 0
    widths = [b for b in (256, 128, 64, 32) if k % b == 0 and (not v or v % b == 0 or b % v == 0)]

    def widest_k(bt: int) -> int | None:  # the widest K tile whose ring fits in SMEM
        return next((b for b in widths if smem_bytes(bt, b, cfg.stages, v) <= SMEM_BYTES), None)

    prefill = t >= 512 and (cfg.block_t is None or cfg.block_t >= 128)  # not MoE decode tiles
    block_t = cfg.block_t
    if block_t is None and prefill:
        # 256 tokens per tile when that still gives every SM a program and K tiles of >= 64,
        # else 128 (H100: Qwen3 w1 at 1024 tokens 1.19x XLA dense at 128 x 128, 0.80x at 256)
        tiles256 = a.rows // WGMMA_M * -(-t // 256)
        block_t = next((bt for bt in (256, 128) if (widest_k(bt) or 0) >= 64
                        and (bt == 128 or tiles256 >= sm_count())), 64)
    elif block_t is None:
        block_t = min(64, -(-t // 8) * 8)
    if block_t % 8 or not 8 <= block_t <= 256:
        raise ValueError(f"block_t must be a multiple of 8 in [8, 256], got {block_t}")
    block_k = cfg.block_k
    if block_k is None:
        block_k = widest_k(block_t) or (widths[-1] if widths else WGMMA_K)
    if block_k % WGMMA_K or k % block_k:
        raise ValueError(f"block_k={block_k} must be a multiple of {WGMMA_K} dividing K={k}")
    if a.paired and a.v % block_k and block_k % a.v:
        raise ValueError(f"block_k={block_k} must divide or be a multiple of the Samoyeds "
                         f"slab v={a.v}")
    kt = k // block_k
    splits = cfg.splits
    if splits is None and prefill:  # split partial sums would cost more than idle SMs
        splits = 1
    elif splits is None:
        programs = stacks * a.rows // WGMMA_M * -(-t // block_t)
        per_sm = cfg.programs_per_sm or (4 if block_t <= 8 else 2)
        splits = fewest_splits(kt, programs, per_sm)
    if splits < 1 or kt % splits:
        raise ValueError(f"splits must divide K // block_k = {kt}, got {splits}")
    if cfg.stages < 1:
        raise ValueError(f"stages must be >= 1, got {cfg.stages}")
    if cfg.inflight not in (0, 1) or (cfg.inflight and (a.paired or cfg.stages < 2)):
        raise ValueError(f"inflight must be 0, or 1 with stages >= 2 for 2:4 weights; got "
                         f"inflight={cfg.inflight}, stages={cfg.stages}, paired={a.paired}")
    need = smem_bytes(block_t, block_k, cfg.stages, v)
    if need > SMEM_BYTES:
        raise ValueError(f"block_t={block_t}, block_k={block_k}, stages={cfg.stages} need about "
                         f"{need} bytes of shared memory, more than the {SMEM_BYTES} a Hopper "
                         "SM has: lower block_k, block_t or stages")
    return dataclasses.replace(cfg, block_t=block_t, block_k=block_k, splits=splits)


def smem_bytes(block_t: int, block_k: int, stages: int, v: int = 0) -> int:
    """Shared memory of one program (``v``: Samoyeds slab rows, 0 for 2:4): the TMA ring (x
    tile, compressed A tile, metadata, Samoyeds ``sel`` rows) times ``stages``, the f32 output
    tile(s) and 1 KiB for barriers. Within ~1 KB above what Mosaic GPU allocates."""
    ring = block_t * block_k * 2 + WGMMA_M * block_k + block_k // WGMMA_K * WGMMA_M * 4
    if v:
        ring += WGMMA_M * 2 * max(1, block_k // v)
    n_acc = 2 if v else 1
    return stages * ring + n_acc * WGMMA_M * block_t * 4 + 1024


def _static(cfg: WgmmaSpConfig) -> dict:
    return dict(block_t=cfg.block_t, block_k=cfg.block_k, splits=cfg.splits, stages=cfg.stages,
                inflight=cfg.inflight)


def _check_grouped(x: jax.Array, tile_expert: jax.Array, a: Any, block_t: int) -> tuple:
    """The stacks of ``a`` (one, or a sequence of alike ones) once x and the tiles fit them."""
    stacks = expect_stacks("a", a, WgmmaSparseA, "a WgmmaSparseA expert stack [e, K, N]")
    check_grouped(x, tile_expert, stacks[0], block_t)
    return stacks


def _mma_tile(ctx, accs, a_ref, x_ref, m_ref, *sel_ref, block_t: int, block_k: int, v: int,
              sel_rows: int, inflight: int):
    """Mosaic GPU body: the sparse wgmmas of one K tile, added into the carried accumulators.

    accs: 1 (2:4) or 2 (Samoyeds) FragmentedArrays [64, block_t] f32 (WGMMA layout); a_ref:
    A tile [64, block_k/2] bf16 tiled (8, swa/2); x_ref: x tile [block_t, block_k] tiled
    (8, swb/2); m_ref: [1, block_k/32, 64] int32 registers; sel_ref: [sel_rows, 64] int16.
    """
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, nvvm
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    index = ir.IndexType.get()
    ci = lambda val: arith.constant(index, val)
    slot = meta_slot_index()
    accums = [mgpu.WGMMAAccumulator.from_registers(acc) for acc in accs]
    regs = [list(acc._value.registers.flat) for acc in accums]
    field = regs[0][0].type
    descriptors = functools.partial(tile_descriptors, a_ref, x_ref, block_t=block_t,
                                    block_k=block_k)

    def meta(j):
        return memref.load(m_ref, [ci(0), ci(j), slot])

    ksteps = block_k // WGMMA_K
    nvvm.wgmma_fence_aligned()
    if not sel_ref:
        for j in range(ksteps):
            regs[0] = issue_wgmma_sp(regs[0], *descriptors(j), meta(j), block_t)
        nvvm.wgmma_commit_group_sync_aligned()
        # the ring slot of the tile ``inflight`` steps back is released after this
        nvvm.wgmma_wait_group_sync_aligned(inflight)
    else:
        (sel_ref,) = sel_ref
        slab_steps = min(ksteps, v // WGMMA_K)
        zero = arith.constant(field, ir.DenseElementsAttr.get_splat(
            ir.VectorType(field), ir.FloatAttr.get(ir.F32Type.get(), 0.0)))
        # this thread's accumulator rows: 16*warp + lane//4 (+ 8 for registers 2, 3 mod 4)
        tid = mgpu_utils.thread_idx()
        if not isinstance(tid.type, ir.IndexType):
            tid = arith.index_cast(index, tid)
        row0 = arith.addi(arith.muli(arith.divui(tid, ci(32)), ci(16)),
                          arith.divui(arith.remui(tid, ci(32)), ci(4)))
        rows = (row0, arith.addi(row0, ci(8)))
        for s in range(ksteps // slab_steps):
            part = [zero] * len(regs[0])
            for j in range(s * slab_steps, (s + 1) * slab_steps):
                part = issue_wgmma_sp(part, *descriptors(j), meta(j), block_t,
                                      accumulate=j > s * slab_steps)
            nvvm.wgmma_commit_group_sync_aligned()
            nvvm.wgmma_wait_group_sync_aligned(0)
            srow = ci(s if sel_rows > 1 else 0)
            hi = [arith.cmpi(arith.CmpIPredicate.ne, memref.load(sel_ref, [srow, r]),
                             arith.constant(ir.IntegerType.get_signless(16), 0)) for r in rows]
            for i, p in enumerate(part):
                h = hi[(i // 2) % 2]
                regs[0][i] = arith.addf(regs[0][i], arith.select(h, zero, p))
                regs[1][i] = arith.addf(regs[1][i], arith.select(h, p, zero))
    return tuple(accumulator_value(acc, r) for acc, r in zip(accums, regs))


def _store_accs(ctx, accs, o_ref):
    del ctx
    from jax._src.lib.mlir.dialects import nvvm
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    nvvm.wgmma_wait_group_sync_aligned(0)  # the last tile's wgmmas (inflight = 1)
    for o, acc in enumerate(accs):
        acc.store_untiled(mgpu_utils.memref_slice(o_ref, o), optimized=False)


@functools.partial(jax.jit, static_argnames=("block_t", "block_k", "splits", "stages",
                                             "inflight", "experts", "v"))
def _call(x, stacks, *, tile_expert=None, num_tiles=None, experts: int = 1, v: int,
          block_t: int, block_k: int, splits: int, stages: int, inflight: int):
    """x [t_pad, K]; stacks: one or more weights of one shape, each (values [e*R, K/2], meta
    [e*R/64, K/32, 64], sel [e*K/v, R] int16 or None) -> [S, P, len(stacks)*R, t_pad] f32
    partial sums (P = 2 with sel, else 1), the stacks' rows one after the other.

    A program's 64 rows lie in one stack: each stack has its own pipeline, in a branch taken by
    the programs of its rows.
    Grouped (``tile_expert`` [t_pad / block_t] int32, ``num_tiles`` [1] int32): token tile i
    multiplies expert ``tile_expert[i]``; tiles >= num_tiles load nothing and write zeros.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu

    grouped = tile_expert is not None
    paired = stacks[0][2] is not None
    t_pad, k = x.shape
    rows = stacks[0][0].shape[0] // experts
    m_tiles = rows // WGMMA_M  # per stack
    kt = k // block_k
    steps = kt // splits
    n_acc = 2 if paired else 1
    ksteps = block_k // WGMMA_K
    swa, swb = swizzle_for(block_k), swizzle_for(2 * block_k)
    # Samoyeds sel rows per K tile: one slab row per tile (tiles inside a slab reload it), or
    # block_k / v rows
    sel_rows = max(1, block_k // v) if paired else 0
    slabs = k // v if paired else 0
    per_stack = 3 if paired else 2

    acc_type = plgpu.ShapeDtypeStruct((WGMMA_M, block_t), jnp.float32, layout=plgpu.Layout.WGMMA)
    sel_types = (plgpu.RefType(),) if paired else ()
    mma = plgpu.inline_mgpu(
        arg_types=((plgpu.Layout.WGMMA,) * n_acc, plgpu.RefType(transforms=smem_transforms(swa)),
                   plgpu.RefType(transforms=smem_transforms(swb)), plgpu.RefType(), *sel_types),
        return_type=(acc_type,) * n_acc,
    )(functools.partial(_mma_tile, block_t=block_t, block_k=block_k, v=v, sel_rows=sel_rows,
                        inflight=inflight))
    store = plgpu.inline_mgpu(arg_types=((plgpu.Layout.WGMMA,) * n_acc, plgpu.RefType()))(
        _store_accs)

    def body(*refs, o_smem):
        if grouped:
            te_gmem, nt_gmem, *refs = refs
        x_gmem, *w_refs, o_gmem = refs
        mi, si, ti = lax.axis_index("m"), lax.axis_index("s"), lax.axis_index("t")
        acc0 = tuple(plgpu.layout_cast(jnp.zeros((WGMMA_M, block_t), jnp.float32),
                                       plgpu.Layout.WGMMA) for _ in range(n_acc))

        def pipeline(stack, e=0):
            a_gmem, m_gmem, *s_gmem = w_refs[stack * per_stack:(stack + 1) * per_stack]
            k0 = si * steps
            mloc = mi - stack * m_tiles  # the 64-row block inside this stack
            mrow = e * m_tiles + mloc

            def step(_, *refs):
                x_smem, a_smem, m_smem, *s_smem, carry = refs
                return mma(carry, a_smem, x_smem, m_smem, *s_smem)

            late = dict(delay_release=inflight) if inflight else {}
            specs = [
                plgpu.BlockSpec((block_t, block_k), lambda kk: (ti, k0 + kk),
                                transforms=smem_transforms(swb), **late),
                plgpu.BlockSpec((WGMMA_M, block_k // 2), lambda kk: (mrow, k0 + kk),
                                transforms=smem_transforms(swa), **late),
                plgpu.BlockSpec((1, ksteps, WGMMA_M), lambda kk: (mrow, k0 + kk, 0), **late),
            ]
            operands = [x_gmem, a_gmem, m_gmem]
            if paired:
                per_slab = max(1, v // block_k)  # K tiles per sel row block
                specs.append(plgpu.BlockSpec(
                    (sel_rows, WGMMA_M),
                    lambda kk: ((e * slabs) // sel_rows + (k0 + kk) // per_slab, mloc)))
                operands.append(s_gmem[0])
            return plgpu.emit_pipeline(step, grid=(steps,), max_concurrent_steps=stages,
                                       init_carry=acc0, in_specs=specs)(*operands)

        def finish(accs):
            store(accs, o_smem)
            plgpu.commit_smem()
            for o in range(n_acc):
                plgpu.copy_smem_to_gmem(o_smem.at[o], o_gmem.at[
                    si, o, pl.ds(mi * WGMMA_M, WGMMA_M), pl.ds(ti * block_t, block_t)])
            plgpu.wait_smem_to_gmem(0)

        live = ti < nt_gmem[0] if grouped else None
        for stack in range(len(stacks)):
            run = functools.partial(lambda st: finish(
                pipeline(st, te_gmem[ti]) if grouped else pipeline(st)), stack)
            when_all(run, live, mi // m_tiles == stack if len(stacks) > 1 else None)
        if grouped:  # tiles past num_tiles load nothing and store zeros
            pl.when(jnp.logical_not(live))(lambda: finish(acc0))

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((splits, n_acc, len(stacks) * rows, t_pad), jnp.float32),
        grid=(len(stacks) * m_tiles, splits, t_pad // block_t),
        grid_names=("m", "s", "t"),
        scratch_types=dict(o_smem=plgpu.SMEM((n_acc, WGMMA_M, block_t), jnp.float32)),
        compiler_params=plgpu.CompilerParams(lowering_semantics=mgpu.LoweringSemantics.Lane),
    )
    operands = (x,) + tuple(a for stack in stacks for a in stack if a is not None)
    if grouped:
        return kernel(tile_expert, num_tiles, *operands)
    return kernel(*operands)


def lowers_for_cuda(x: jax.Array, a: WgmmaSparseA, config: WgmmaSpConfig | None = None) -> str:
    """Export ``wgmma_sp_matmul`` for CUDA on this host (runs the Mosaic GPU lowering, no GPU).

    Returns the exported module text; raises what the lowering raises.
    """
    cfg = resolve_config(config, t=x.shape[0], a=a)
    fn = functools.partial(wgmma_sp_matmul, config=cfg)
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(x, a).mlir_module()

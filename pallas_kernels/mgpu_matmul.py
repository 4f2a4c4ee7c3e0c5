"""``y = x @ W`` for few tokens on Hopper: Pallas Mosaic GPU, TMA loads, expansion in registers, wgmma.

Load-as-Sparse, Compute-as-Dense for decode. W is a ``TransposedSparse`` (2:4 or Samoyeds 1:2 +
2:4, converted once at load; see ``pallas_kernels.transposed_format``). The kernel computes
``y^T = W^T @ x^T`` so that the weights are the MMA's M side (64 rows of W^T per program) and the
tokens its N side (``block_t``, a multiple of 8): one token costs an m64n8 MMA, not a 64-row
padded tile.

Per program (64 W^T rows, one K split, one token tile), ``plgpu.emit_pipeline`` streams K tiles
through a ``stages``-deep shared-memory ring with TMA: the compressed values [64, 8C] (one
contiguous 8C-element row per W^T row, 128-byte swizzle), the int16 nibble words [64, C] and x's
permuted tile [4, block_t, tk/4]. Per chunk of the tile, the 4 dense sub-columns are built with
shifts, masks and selects in registers, joined along K and fed to ``plgpu.wgmma`` as the register
A operand against the x chunk in SMEM (f32 accumulator); one ``wgmma_wait`` per K tile. Samoyeds
weights keep two accumulators and route each element by the order of its group's nibble
(``sel``). The f32 result goes SMEM -> GMEM by TMA; with ``splits > 1`` the programs write
partial sums that one XLA add combines (more programs in flight when W^T has few 64-row blocks).
``mgpu_grouped_matmul`` (the MoE form) also multiplies several stacks of one shape (a layer's gate
and up) in the same launch, a branch per stack.

Measured alternatives that were slower on an H100 (benchmarks/mgpu_matmul.md): [8, 64, C] value
tiles with 32-byte rows (-8%), one K=C wgmma per sub-column instead of the joined K=4C one, a
warp-specialized pipeline (a memory warpgroup feeding two compute warpgroups, -10%), a wait after
every chunk's wgmma, tk=512.

``mgpu_matmul_reference`` has the same signature (pure jnp). The kernel lowers for CUDA on any
host (``jax.export``); it runs only on a Hopper GPU (Mosaic GPU has no CPU interpret mode for
register-operand wgmma).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.checks import expect_kind, expect_stacks, expect_token_tiles
from pallas_kernels.routing_plan import grouped_tiles_product
from pallas_kernels.sparse_mma_prefill import SMEM_BYTES
from pallas_kernels.transposed_format import TransposedSparse, expand_chunk, permute_x

BLOCK_M = 64  # W^T rows per warpgroup: the wgmma M
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_H100_SMS = 132


@dataclasses.dataclass(frozen=True, kw_only=True)
class MgpuMatmulConfig:
    """Tiling of one ``mgpu_matmul`` launch.

    block_t: tokens per program (the wgmma N): a multiple of 8 in [8, 128]; None: the token
      count rounded up to 8, at most 64.
    splits: K splits (a divisor of K // tk); None: the fewest that put ``PROGRAMS_PER_SM``
      programs on every SM.
    stages: K tiles in flight per program (the TMA ring depth).
    """

    block_t: int | None = None
    splits: int | None = None
    stages: int = 3


# Programs per SM that the default K split aims for: several short programs per SM keep more
# TMA loads in flight (H100 sweep: 4-7 per SM beat 2-3 by 5-10% up to 16 tokens; at 64 tokens
# the accumulator is 4x larger and 3 per SM was best).
PROGRAMS_PER_SM = {16: 6, 128: 3}


def mgpu_matmul_reference(x: jax.Array, w: TransposedSparse, *,
                          config: MgpuMatmulConfig | None = None, out_dtype: Any = None
                          ) -> jax.Array:
    """``x @ W`` in jnp with f32 accumulation. x: [t, K]; w: dense [K, N]. Returns [t, N]."""
    del config
    _check(x, w)
    out_dt = jnp.dtype(out_dtype) if out_dtype is not None else x.dtype
    y = jnp.dot(x.astype(jnp.float32), w.to_dense().astype(jnp.float32),
                precision=lax.Precision.HIGHEST)
    return y.astype(out_dt)


def mgpu_matmul(x: jax.Array, w: TransposedSparse, *, config: MgpuMatmulConfig | None = None,
                out_dtype: Any = None) -> jax.Array:
    """``x @ W`` with the Mosaic GPU kernel (Hopper). Same signature as the reference.

    Args:
      x: [t, K] bfloat16 or float16 (same dtype as w).
      w: ``TransposedSparse``, dense shape [K, N], no leading dims.
      config: tiling (``MgpuMatmulConfig``); None picks ``block_t`` and ``splits``.
      out_dtype: output dtype (default x.dtype).

    Returns:
      [t, N] in ``out_dtype``, accumulated in float32.

    Raises:
      ValueError: shapes, dtypes or a config that does not fit (expected vs given).
    """
    _check(x, w)
    out_dt = jnp.dtype(out_dtype) if out_dtype is not None else x.dtype
    t = x.shape[0]
    if t == 0:
        return jnp.zeros((0, w.n_out), out_dt)
    cfg = resolve_config(config, t=t, w=w)
    t_pad = -(-t // cfg.block_t) * cfg.block_t
    x = jnp.pad(x, ((0, t_pad - t), (0, 0)))
    parts = _call(_tiled_x(x, w.tk), ((w.values, w.meta),), **_static(cfg, w))
    return split_sum(parts, paired=w.paired)[:t].astype(out_dt)


def mgpu_grouped_matmul_reference(x: jax.Array, tile_expert: jax.Array, num_tiles: jax.Array,
                                  w: TransposedSparse | Sequence, *, block_t: int,
                                  config: MgpuMatmulConfig | None = None) -> jax.Array:
    """Per token tile i: ``x[tile i] @ W[tile_expert[i]]``, zeros for tiles >= num_tiles (jnp).

    x: [n*block_t, K]; tile_expert: [n] int32; num_tiles: [] int32; w: stack [e, K, N], or a
    sequence of such stacks (their products side by side). Returns [n*block_t, N or s*N] float32.
    """
    del config
    stacks = _check_grouped(x, tile_expert, w, block_t)
    return jnp.concatenate([grouped_tiles_product(x, tile_expert, num_tiles, s.to_dense(), block_t)
                            for s in stacks], axis=1)


def mgpu_grouped_matmul(x: jax.Array, tile_expert: jax.Array, num_tiles: jax.Array,
                        w: TransposedSparse | Sequence, *, block_t: int,
                        config: MgpuMatmulConfig | None = None) -> jax.Array:
    """Expert-grouped ``mgpu_matmul``: token tile i of x times expert ``tile_expert[i]``.

    One launch for every expert of a MoE layer: programs (64 W^T rows, K split, token tile);
    a tile's program reads its expert's compressed weights only, tiles >= ``num_tiles`` read
    nothing and write zeros. Same signature as the reference.

    Args:
      x: [n*block_t, K] bf16/f16, token rows grouped by expert (``RoutingPlan`` row tiles).
      tile_expert: [n] int32, expert of each tile (only tiles < num_tiles are read).
      num_tiles: [] int32, tiles in use.
      w: ``TransposedSparse`` expert stack, dense [e, K, N]; or a sequence of s such stacks of
        one shape and format (e.g. a MoE layer's gate and up), multiplied in the same launch.
      block_t: rows per tile: a multiple of 8 in [8, 128].
      config: ``splits`` and ``stages`` (``block_t`` comes from the argument).

    Returns:
      [n*block_t, N] float32; [n*block_t, s*N] for s stacks, stack j's product in columns
      [j*N, (j+1)*N).
    """
    stacks = _check_grouped(x, tile_expert, w, block_t)
    n = x.shape[0] // block_t
    cfg = dataclasses.replace(config or MgpuMatmulConfig(), block_t=block_t)
    first = stacks[0]
    one = jax.tree.map(lambda a: a[0], first)
    # every live tile is one program column: size the K split for min(n, e) of them
    cfg = resolve_config(cfg, t=min(n, first.values.shape[0]) * block_t, w=one,
                         stacks=len(stacks))
    parts = _call(_tiled_x(x, first.tk),
                  tuple((s.values.reshape(-1, s.rows, s.tk // 2),
                         s.meta.reshape(-1, s.rows, s.tk // 16)) for s in stacks),
                  tile_expert.astype(jnp.int32), jnp.reshape(num_tiles, (1,)).astype(jnp.int32),
                  **_static(cfg, one))
    return split_sum(parts, paired=one.paired)


def _static(cfg: MgpuMatmulConfig, w: TransposedSparse) -> dict:
    return dict(paired=w.paired, block_t=cfg.block_t, splits=cfg.splits, stages=cfg.stages)


def _tiled_x(x: jax.Array, tk: int) -> jax.Array:
    """x [t_pad, K] -> [K/tk*4, t_pad, tk/4] (leading dims merged: a TMA box has at most 5
    dims after the SMEM tiling)."""
    t_pad, k = x.shape
    return permute_x(x, tk).reshape(k // tk * 4, t_pad, tk // 4)


def split_sum(parts: jax.Array, *, paired: bool) -> jax.Array:
    """Kernel output [S, P, R, t_pad] f32 -> y [t_pad, N] f32: the sum over K splits, and for
    Samoyeds (``paired``, P = 2) row r's two accumulators as dense columns 2r and 2r + 1."""
    yt = jnp.sum(parts, axis=0)  # [P, R, t_pad]
    if paired:
        yt = jnp.transpose(yt, (1, 0, 2)).reshape(2 * yt.shape[1], -1)
    else:
        yt = yt[0]
    return yt.T


def _check_grouped(x: jax.Array, tile_expert: jax.Array, w: Any, block_t: int) -> tuple:
    """The stacks of ``w`` (one, or a sequence of alike ones) once x and the tiles fit them."""
    stacks = expect_stacks("w", w, TransposedSparse, "a TransposedSparse expert stack [e, K, N]")
    w = stacks[0]
    if w.values.ndim != 4:
        raise ValueError(f"w must be a TransposedSparse expert stack [e, K, N], got dense "
                         f"shape {w.shape}")
    expect_token_tiles(x, tile_expert, w.k, block_t, 128)
    _check_dtype_rows(x, w)
    return stacks


def resolve_config(config: MgpuMatmulConfig | None, *, t: int, w: TransposedSparse,
                   stacks: int = 1) -> MgpuMatmulConfig:
    """Fill ``block_t`` and ``splits`` and check the config against this problem (``stacks``
    weights of ``w``'s shape in one launch)."""
    cfg = config or MgpuMatmulConfig()
    kt = w.k // w.tk
    block_t = cfg.block_t if cfg.block_t is not None else min(64, -(-t // 8) * 8)
    if block_t % 8 or not 8 <= block_t <= 128:
        raise ValueError(f"block_t must be a multiple of 8 in [8, 128], got {block_t}")
    programs = stacks * w.rows // BLOCK_M * -(-t // block_t)
    splits = cfg.splits
    if splits is None:
        per_sm = next(v for bt, v in sorted(PROGRAMS_PER_SM.items()) if block_t <= bt)
        splits = fewest_splits(kt, programs, per_sm)
    if splits < 1 or kt % splits:
        raise ValueError(f"splits must divide K // tk = {kt}, got {splits}")
    if cfg.stages < 1:
        raise ValueError(f"stages must be >= 1, got {cfg.stages}")
    need = smem_bytes(block_t, w, cfg.stages)
    if need > SMEM_BYTES:
        raise ValueError(f"block_t={block_t}, tk={w.tk}, stages={cfg.stages} need {need} bytes "
                         f"of shared memory, more than the {SMEM_BYTES} a Hopper SM has: lower "
                         "stages or block_t, or convert with a smaller tk")
    return dataclasses.replace(cfg, block_t=block_t, splits=splits)


def smem_bytes(block_t: int, w: TransposedSparse, stages: int) -> int:
    """Shared memory of one program, barriers aside: the ring (x tile [4, block_t, tk/4],
    values [64, 8C], meta [64, C] int16) times ``stages`` and the f32 output tile(s)."""
    size = jnp.dtype(w.dtype).itemsize
    c = w.tk // 16
    ring = block_t * w.tk * size + BLOCK_M * 8 * c * size + BLOCK_M * c * 2
    return stages * ring + (2 if w.paired else 1) * BLOCK_M * block_t * 4


def when_all(fn: Callable[[], Any], *conditions: Any) -> None:
    """In a Pallas kernel body: ``fn()`` under ``pl.when`` of the conditions that are not None
    (all of them together), or directly when every one is None."""
    import jax.experimental.pallas as pl

    conditions = [c for c in conditions if c is not None]
    if conditions:
        pl.when(functools.reduce(jnp.logical_and, conditions))(fn)
    else:
        fn()


def fewest_splits(kt: int, programs: int, per_sm: int) -> int:
    """The fewest K splits (divisors of ``kt`` K tiles) that give every SM ``per_sm`` of the
    ``programs * splits`` programs, or ``kt``."""
    return next(d for d in range(1, kt + 1)
                if kt % d == 0 and (programs * d >= per_sm * sm_count() or d == kt))


def sm_count() -> int:
    """Streaming multiprocessors of the default device (an H100's 132 where it does not say)."""
    return getattr(jax.devices()[0], "core_count", None) or _H100_SMS


def _check(x: jax.Array, w: TransposedSparse) -> None:
    expect_kind("w", w, TransposedSparse,
                "a TransposedSparse (TransposedSparse.from_nm / from_samoyeds convert)")
    if w.values.ndim != 3:
        raise ValueError(f"w must be one matrix (no leading dims), got dense shape {w.shape}")
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"x must be [t, K={w.k}], got {x.shape}")
    _check_dtype_rows(x, w)


def _check_dtype_rows(x: jax.Array, w: TransposedSparse) -> None:
    if jnp.dtype(x.dtype) not in _DTYPES or x.dtype != w.dtype:
        raise ValueError(f"x and w must both be bfloat16 or float16, got {x.dtype} and {w.dtype}")
    if w.rows % BLOCK_M:
        raise ValueError(f"W^T rows ({w.rows}) must be a multiple of {BLOCK_M}")


def _transforms(row_bytes: int, itemsize: int):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(row_bytes * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _expand_and_mma(accs, x_smem, v_smem, m_smem, *, paired: bool):
    """One K tile: expand 64 W^T rows chunk by chunk in registers, wgmma into ``accs``.

    x_smem [4, block_t, tk/4], v_smem [64, 8C] (column (s*4 + c)*C + r), m_smem [64, C].
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    words = m_smem[...]  # [64, C] int16
    c = words.shape[1]
    values = v_smem[...]  # [64, 8C]
    for ch in range(4):
        f = (words >> (4 * ch)) & 15
        i0, i1 = f & 3, f >> 2
        v0, v1 = values[:, ch * c:(ch + 1) * c], values[:, (4 + ch) * c:(5 + ch) * c]
        zero = jnp.zeros_like(v0)
        parts = expand_chunk(i0, i1, v0, v1, zero, ascending=not paired)
        b = x_smem.at[ch].T  # [tk/4, block_t]
        if paired:
            hi = i0 > i1
            plgpu.wgmma(accs[0], jnp.concatenate([jnp.where(hi, zero, q) for q in parts], 1), b)
            plgpu.wgmma(accs[1], jnp.concatenate([jnp.where(hi, q, zero) for q in parts], 1), b)
        else:
            plgpu.wgmma(accs[0], jnp.concatenate(parts, axis=1), b)
    plgpu.wgmma_wait(0)  # SMEM slots are released (and register operands die) after this


@functools.partial(jax.jit, static_argnames=("paired", "block_t", "splits", "stages"))
def _call(xp, stacks, tile_expert=None, num_tiles=None, *, paired: bool, block_t: int,
          splits: int, stages: int):
    """xp [kt*4, t_pad, tk/4]; stacks: one or more weights of one shape, each (values
    [kt, R, tk/2], meta [kt, R, C]) -> [S, P, len(stacks)*R, t_pad] f32, the stacks' rows one
    after the other. A program's 64 rows lie in one stack: each stack has its own pipeline, in a
    branch taken by the programs of its rows.

    Grouped (expert stacks, merged with the K tiles): values [e*kt, R, tk/2], meta
    [e*kt, R, C], ``tile_expert`` [t_pad // block_t] int32 (the expert of each token tile) and
    ``num_tiles`` [1] int32; token tiles >= num_tiles load nothing and write zeros.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    grouped = tile_expert is not None
    kt = xp.shape[0] // 4
    c = stacks[0][1].shape[-1]
    t_pad = xp.shape[1]
    rows = stacks[0][0].shape[-2]
    m_tiles = rows // BLOCK_M  # per stack
    steps = kt // splits
    n_acc = 2 if paired else 1
    size = xp.dtype.itemsize

    def body(*refs, o_smem):
        if grouped:
            te_gmem, nt_gmem, *refs = refs
        x_gmem, *w_refs, o_gmem = refs
        mi, si, ti = lax.axis_index("m"), lax.axis_index("s"), lax.axis_index("t")

        def run(*accs):
            def step(_, x_smem, v_smem, m_smem):
                _expand_and_mma(accs, x_smem, v_smem.at[0], m_smem.at[0], paired=paired)

            def pipeline(stack, e=0):
                v_gmem, m_gmem = w_refs[2 * stack:2 * stack + 2]
                k0 = si * steps
                w0 = e * kt + k0  # first weight K tile (expert stacks merged with K tiles)
                mloc = mi - stack * m_tiles  # the 64-row block inside this stack
                plgpu.emit_pipeline(
                    step, grid=(steps,), max_concurrent_steps=stages,
                    in_specs=[
                        plgpu.BlockSpec((4, block_t, 4 * c), lambda k: (k0 + k, ti, 0),
                                        transforms=_transforms(4 * c * size, size)),
                        plgpu.BlockSpec((1, BLOCK_M, 8 * c), lambda k: (w0 + k, mloc, 0),
                                        transforms=_transforms(8 * c * size, size)),
                        plgpu.BlockSpec((1, BLOCK_M, c), lambda k: (w0 + k, mloc, 0)),
                    ])(x_gmem, v_gmem, m_gmem)

            # the accumulators start at zero: skipped tiles store zeros
            live = ti < nt_gmem[0] if grouped else None
            for stack in range(len(stacks)):
                go = functools.partial(lambda st: pipeline(st, te_gmem[ti]) if grouped
                                       else pipeline(st), stack)
                when_all(go, live, mi // m_tiles == stack if len(stacks) > 1 else None)
            for o in range(n_acc):
                o_smem[o] = accs[o][...]
            plgpu.commit_smem()
            for o in range(n_acc):
                plgpu.copy_smem_to_gmem(o_smem.at[o], o_gmem.at[
                    si, o, pl.ds(mi * BLOCK_M, BLOCK_M), pl.ds(ti * block_t, block_t)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(run, *[plgpu.ACC((BLOCK_M, block_t), jnp.float32)] * n_acc)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((splits, n_acc, len(stacks) * rows, t_pad), jnp.float32),
        grid=(len(stacks) * m_tiles, splits, t_pad // block_t),
        grid_names=("m", "s", "t"),
        scratch_types=dict(o_smem=plgpu.SMEM((n_acc, BLOCK_M, block_t), jnp.float32)),
    )
    operands = (xp,) + tuple(a for stack in stacks for a in stack)
    if grouped:
        return kernel(tile_expert, num_tiles, *operands)
    return kernel(*operands)


def lowers_for_cuda(x: jax.Array, w: TransposedSparse,
                    config: MgpuMatmulConfig | None = None) -> str:
    """Export ``mgpu_matmul`` for CUDA on this host (runs the Mosaic GPU lowering, no GPU).

    Returns the exported module text; raises what the lowering raises.
    """
    cfg = resolve_config(config, t=x.shape[0], w=w)
    fn = functools.partial(mgpu_matmul, config=cfg)
    return jax.export.export(jax.jit(fn), platforms=["cuda"])(x, w).mlir_module()

"""``y = x @ W`` on Hopper sparse tensor cores: a pipelined ``wgmma.mma_async.sp`` kernel (prefill).

**Not yet run on a GPU** (it lowers for CUDA on a CPU host; ``tests/test_sparse_mma_matmul.py``
has the GPU check). It extends the single instruction of ``pallas_kernels.sparse_mma`` (which is
verified on an H100) to a whole product:

* ``y^T [N, t] = W^T [N, K] @ x^T [K, t]``; W in the ``WgmmaSparseA`` layout (A = W^T compressed
  [N, K/2] + per-thread metadata registers [N/64, K/32, 64]; converted once at load).
* One program per (64 W^T rows, ``block_t`` tokens); ``plgpu.emit_pipeline`` streams K tiles of
  ``block_k`` through a TMA ring: the compressed A tile [64, block_k/2] (32-byte swizzle), the
  metadata [block_k/32, 64] and the x tile [block_t, block_k] (64-byte swizzle).
* Per K tile, one sparse wgmma per 32 dense K (m64 n``block_t`` k32, f32 += bf16 x bf16) from
  SMEM descriptors, issued through ``plgpu.inline_mgpu`` + inline PTX; the f32 accumulator is the
  pipeline's carry (WGMMA layout), one ``wgmma.wait_group 0`` per K tile.
* The accumulator goes to SMEM and out by TMA as y^T; the wrapper transposes.

The sparse instruction does half the MMA work of the dense one on the same K, so at large t
(compute bound) the product can beat a dense matmul; the target is >= 1.3x XLA dense at 4096
tokens. ``wgmma_sp_matmul_reference`` has the same signature.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_mma import (A_SWIZZLE, B_SWIZZLE, accumulator_value, issue_wgmma_sp,
                                      meta_slot_index, sp_descriptors)
from pallas_kernels.sparse_mma_layout import WGMMA_K, WGMMA_M, WgmmaSparseA, from_wgmma_sp


def wgmma_sp_matmul_reference(x: jax.Array, a: WgmmaSparseA, *, block_t: int = 128,
                              block_k: int = 64, stages: int = 3) -> jax.Array:
    """``x @ W`` in jnp, f32 accumulation. x: [t, K] bf16; a: W [K, N]. Returns [t, N] f32."""
    del stages
    _validate(x, a, block_t, block_k)
    w = from_wgmma_sp(a).to_dense().astype(jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


def _validate(x: jax.Array, a: WgmmaSparseA, block_t: int, block_k: int) -> None:
    if not isinstance(a, WgmmaSparseA) or len(a.shape) != 2:
        raise ValueError(f"a must be one WgmmaSparseA matrix [K, N], got {type(a).__name__}")
    k, n = a.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [t, K={k}], got {x.shape}")
    if x.dtype != jnp.bfloat16 or a.dtype != jnp.bfloat16:
        raise ValueError(f"x and W must be bfloat16, got {x.dtype} and {a.dtype}")
    if block_t % 8 or not 8 <= block_t <= 256:
        raise ValueError(f"block_t must be a multiple of 8 in [8, 256], got {block_t}")
    if block_k % WGMMA_K or k % block_k:
        raise ValueError(f"block_k={block_k} must be a multiple of {WGMMA_K} dividing K={k}")
    if n % WGMMA_M:
        raise ValueError(f"N={n} must be a multiple of {WGMMA_M}")


def _mma_tile(ctx, acc, a_ref, x_ref, m_ref, *, ksteps: int, block_t: int):
    """Mosaic GPU body: ``ksteps`` sparse wgmmas of one K tile into the carried accumulator.

    acc: FragmentedArray [64, block_t] f32 (WGMMA layout); a_ref: A tile tiled
    (8, ksteps, 8, 16) bf16, swizzle 32; x_ref: x tile tiled (block_t/8, ksteps, 8, 32) bf16,
    swizzle 64; m_ref: [1, ksteps, 64] int32 metadata registers.
    """
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, nvvm
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    index = ir.IndexType.get()
    slot = meta_slot_index()
    accum = mgpu.WGMMAAccumulator.from_registers(acc)  # the 32-bit accumulator layout
    regs = list(accum._value.registers.flat)
    nvvm.wgmma_fence_aligned()
    for j in range(ksteps):  # one swizzle-tile column of A and of x per 32 dense K
        a_j = mgpu_utils.memref_slice(a_ref, (slice(None), slice(j, j + 1)))
        x_j = mgpu_utils.memref_slice(x_ref, (slice(None), slice(j, j + 1)))
        a_desc, b_desc = sp_descriptors(a_j, x_j, block_t)
        meta = memref.load(m_ref, [arith.constant(index, 0), arith.constant(index, j), slot])
        regs = issue_wgmma_sp(regs, a_desc, b_desc, meta, block_t)
    nvvm.wgmma_commit_group_sync_aligned()
    nvvm.wgmma_wait_group_sync_aligned(0)  # the ring slot is released after this tile
    return accumulator_value(accum, regs)


def _store_acc(ctx, acc, o_ref):
    del ctx
    acc.store_untiled(o_ref, optimized=False)


@functools.partial(jax.jit, static_argnames=("block_t", "block_k", "stages"))
def wgmma_sp_matmul(x: jax.Array, a: WgmmaSparseA, *, block_t: int = 128, block_k: int = 64,
                    stages: int = 3) -> jax.Array:
    """``x @ W`` with pipelined sparse wgmma (Hopper). Same signature as the reference.

    x: [t, K] bf16 (padded here to a multiple of ``block_t``); a: W [K, N] as
    ``WgmmaSparseA``. Returns [t, N] f32.

    Raises:
      ValueError: shapes, dtypes or tiles that do not fit (expected vs given).
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu

    _validate(x, a, block_t, block_k)
    t, k = x.shape
    n = a.shape[1]
    t_pad = -(-t // block_t) * block_t
    x = jnp.pad(x, ((0, t_pad - t), (0, 0)))
    ksteps = block_k // WGMMA_K

    def transforms(swizzle: int):
        return (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

    mma = plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(transforms=transforms(A_SWIZZLE)),
                   plgpu.RefType(transforms=transforms(B_SWIZZLE)), plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((WGMMA_M, block_t), jnp.float32,
                                           layout=plgpu.Layout.WGMMA),
    )(functools.partial(_mma_tile, ksteps=ksteps, block_t=block_t))
    store = plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))(_store_acc)

    def body(x_gmem, a_gmem, m_gmem, o_gmem, o_smem):
        mi, ti = jax.lax.axis_index("m"), jax.lax.axis_index("t")

        def step(_, x_smem, a_smem, m_smem, acc):
            return mma(acc, a_smem, x_smem, m_smem)

        acc0 = plgpu.layout_cast(jnp.zeros((WGMMA_M, block_t), jnp.float32),
                                 plgpu.Layout.WGMMA)
        acc = plgpu.emit_pipeline(
            step, grid=(k // block_k,), max_concurrent_steps=stages, init_carry=acc0,
            in_specs=[
                plgpu.BlockSpec((block_t, block_k), lambda kk: (ti, kk),
                                transforms=transforms(B_SWIZZLE)),
                plgpu.BlockSpec((WGMMA_M, block_k // 2), lambda kk: (mi, kk),
                                transforms=transforms(A_SWIZZLE)),
                plgpu.BlockSpec((1, ksteps, WGMMA_M), lambda kk: (mi, kk, 0)),
            ])(x_gmem, a_gmem, m_gmem)
        store(acc, o_smem)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * WGMMA_M, WGMMA_M),
                                                  pl.ds(ti * block_t, block_t)])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((n, t_pad), jnp.float32),
        grid=(n // WGMMA_M, t_pad // block_t),
        grid_names=("m", "t"),
        scratch_types=dict(o_smem=plgpu.SMEM((WGMMA_M, block_t), jnp.float32)),
        compiler_params=plgpu.CompilerParams(lowering_semantics=mgpu.LoweringSemantics.Lane),
    )
    return kernel(x, a.values, a.meta).T[:t]

"""One Hopper sparse tensor-core instruction (``wgmma.mma_async.sp``) from Pallas Mosaic GPU.

The groundwork kernel: a single m64nTk32 bf16 sparse wgmma computes one output tile
``y [t, 64] = x [t, 32] @ W [32, 64]`` with W 2:4 along K, given in the operand layout of
``pallas_kernels.sparse_mma_layout`` (A = W^T, see there). jax's Mosaic GPU ``wgmma`` builder has
no sparse variant, so the instruction is emitted as inline PTX (``llvm.inline_asm``) inside
``plgpu.inline_mgpu``, with shared-memory descriptors made by Mosaic GPU's own
``mma_utils.create_descriptor`` (the same route its dense ``wgmma_m64`` takes).

Data path: TMA copies x (B operand, swizzle 64), W^T compressed (A operand, [64, 16] bf16 = 32
bytes per row, swizzle 32) and the 64 metadata registers into SMEM; each warpgroup thread loads
its metadata register from SMEM; one sparse wgmma; the WGMMA-layout accumulator (y^T [64, t]) is
stored to SMEM and copied out; the wrapper transposes.

``wgmma_sp_tile_reference`` has the same signature (pure jnp, f32 accumulate).
See docs/sparse_mma.md for what was verified where.
"""

from __future__ import annotations

import dataclasses
import traceback

import jax
import jax.numpy as jnp

from pallas_kernels.checks import expect_kind
from pallas_kernels.sparse_mma_layout import WGMMA_K, WGMMA_M, WgmmaSparseA, from_wgmma_sp

A_SWIZZLE = 32  # 16 kept bf16 per A row = 32 bytes: one swizzle-32 atom row per instruction
B_SWIZZLE = 64  # 32 bf16 of x per row = 64 bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoweringStatus:
    """Result of lowering the kernel for CUDA on this host (``lowering_status``)."""

    ok: bool
    error: str = ""  # the exception text (last lines) if not ok
    module_text: str = ""  # the exported StableHLO (embeds the Mosaic GPU module) if ok


def wgmma_sp_ptx(n: int) -> str:
    """The inline-asm PTX of one ``wgmma.mma_async.sp`` m64n{n}k32 f32 += bf16 * bf16.

    Operand numbering follows Mosaic GPU's dense ``wgmma_m64``: $0..$(n/2-1) accumulator outputs,
    the same number of tied inputs, then A descriptor, B descriptor, the metadata register and the
    scale-d flag. Immediates: sparsity selector 0, imm-scale-a/b 1, imm-trans-a/b 0 (A and B both
    K-major).
    """
    if n % 8 or not 8 <= n <= 256:
        raise ValueError(f"n must be a multiple of 8 in [8, 256], got {n=}")
    acc = n // 2
    regs = "{" + ",".join(f"${i}" for i in range(acc)) + "}"
    a, b, meta, use_d = (f"${i}" for i in range(2 * acc, 2 * acc + 4))
    instr = (f"wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.bf16.bf16 "
             f"{regs}, {a}, {b}, {meta}, 0, p, 1, 1, 0, 0;")
    return f"{{ .reg .pred p; setp.ne.b32 p, {use_d}, 0; {instr} }}\n"


def wgmma_sp_constraints(n: int) -> str:
    """LLVM inline-asm constraints matching ``wgmma_sp_ptx(n)``."""
    acc = n // 2
    return ",".join(["=f"] * acc + [str(i) for i in range(acc)] + ["l", "l", "r", "n"])


def wgmma_sp_standalone_ptx(n: int) -> str:
    """A complete PTX module (sm_90a) running ``wgmma_sp_ptx(n)`` once, for checking with ``ptxas``.

    The inline-asm operands are substituted the way LLVM's NVPTX backend does: accumulators ->
    .f32 registers, descriptors -> .b64, metadata -> .b32, the scale-d flag -> the literal 1.
    """
    acc = n // 2
    body = wgmma_sp_ptx(n)
    subst = {2 * acc: "%rd1", 2 * acc + 1: "%rd2", 2 * acc + 2: "%r1", 2 * acc + 3: "1"}
    subst.update({i: f"%f{i}" for i in range(acc)})
    for i in sorted(subst, reverse=True):  # longest numbers first: $64 before $6
        body = body.replace(f"${i}", subst[i])
    zero = "\n".join(f"  mov.f32 %f{i}, 0f00000000;" for i in range(acc))
    store = "\n".join(f"  st.global.f32 [%rd3+{4 * i}], %f{i};" for i in range(acc))
    return f"""\
.version 8.2
.target sm_90a
.address_size 64

.visible .entry wgmma_sp_check(.param .u64 out, .param .u64 a_desc, .param .u64 b_desc,
                               .param .u32 meta)
{{
  .reg .f32 %f<{acc}>;
  .reg .b64 %rd<4>;
  .reg .b32 %r<2>;
  ld.param.u64 %rd1, [a_desc];
  ld.param.u64 %rd2, [b_desc];
  ld.param.u32 %r1, [meta];
  ld.param.u64 %rd3, [out];
{zero}
  wgmma.fence.sync.aligned;
  {body.strip()}
  wgmma.commit_group.sync.aligned;
  wgmma.wait_group.sync.aligned 0;
{store}
  ret;
}}
"""


def wgmma_sp_tile_reference(x: jax.Array, a: WgmmaSparseA) -> jax.Array:
    """``x @ W`` with f32 accumulation. x: [t, 32] bf16, a: W [32, 64] as WgmmaSparseA -> [t, 64] f32."""
    _validate(x, a)
    w = from_wgmma_sp(a).to_dense()  # [32, 64]
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))


def _validate(x: jax.Array, a: WgmmaSparseA) -> None:
    if a.shape != (WGMMA_K, WGMMA_M):
        raise ValueError(f"W must be [{WGMMA_K}, {WGMMA_M}] (one instruction tile), got {a.shape}")
    if x.ndim != 2 or x.shape[1] != WGMMA_K:
        raise ValueError(f"x must be [t, {WGMMA_K}], got {x.shape}")
    t = x.shape[0]
    if t % 8 or not 8 <= t <= 256:
        raise ValueError(f"t={t} must be a multiple of 8 in [8, 256] (the instruction's N)")
    if x.dtype != jnp.bfloat16 or a.dtype != jnp.bfloat16:
        raise ValueError(f"x and W must be bfloat16, got {x.dtype} and {a.dtype}")


def check_common(x: jax.Array, a: WgmmaSparseA) -> None:
    """ValueError unless x and W are bfloat16 and W^T's rows / K fit the instruction."""
    if x.dtype != jnp.bfloat16 or a.dtype != jnp.bfloat16:
        raise ValueError(f"x and W must be bfloat16, got {x.dtype} and {a.dtype}")
    if a.rows % WGMMA_M:
        raise ValueError(f"W^T rows ({a.rows}) must be a multiple of {WGMMA_M}")
    if a.k % WGMMA_K:
        raise ValueError(f"K={a.k} must be a multiple of {WGMMA_K}")


def check_matrix(x: jax.Array, a: WgmmaSparseA) -> None:
    """ValueError (expected vs given) unless x [t, K] multiplies one ``WgmmaSparseA`` W [K, N]."""
    expect_kind("a", a, WgmmaSparseA, "one WgmmaSparseA matrix [K, N] (sparse_mma_layout."
                "to_wgmma_sp converts)")
    if a.values.ndim != 2:
        raise ValueError(f"a must be one WgmmaSparseA matrix [K, N], got dense shape {a.shape}")
    if x.ndim != 2 or x.shape[1] != a.k:
        raise ValueError(f"x must be [t, K={a.k}], got {x.shape}")
    check_common(x, a)


def sp_descriptors(a_ref, b_ref, t: int, *, a_swizzle: int = A_SWIZZLE,
                   b_swizzle: int = B_SWIZZLE):
    """SMEM descriptors of one swizzle-atom column of the operands (Mosaic GPU IR values).

    a_ref: A = W^T compressed, tiled (8, 1, 8, a_swizzle/2) bf16 (K-major rows of W^T).
    b_ref: x tiled (t/8, 1, 8, b_swizzle/2) bf16, viewed as B = x^T, K-major.
    The descriptors address the atom's first k32 step; a later step inside a wider atom adds
    its byte offset (32 bytes of A, 64 of x per step) to the start address.
    """
    from jax.experimental.mosaic.gpu import mma_utils
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    (a_desc, _), _, a_fastest = mma_utils.create_descriptor(
        a_ref, swizzle=a_swizzle, group_size=(WGMMA_M, a_swizzle // 2), logical_k_major=False)
    b_view = mgpu_utils.memref_transpose(b_ref, (1, 0, 3, 2))  # (k tiles, n tiles, sw/2, 8)
    (b_desc, _), _, b_fastest = mma_utils.create_descriptor(
        b_view, swizzle=b_swizzle, group_size=(b_swizzle // 2, t), logical_k_major=True,
        mma_bytewidth_k=2 * WGMMA_K)
    if a_fastest != mma_utils.Dim.K or b_fastest != mma_utils.Dim.K:
        raise ValueError(f"expected K-major A and B, got {a_fastest=} {b_fastest=}")
    return a_desc, b_desc


def meta_slot_index():
    """This thread's metadata register slot in its warpgroup, 16*warp + 2*(lane // 4) +
    lane % 2 (an index; warp counts within the warpgroup)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i32 = ir.IntegerType.get_signless(32)
    tid = mgpu_utils.thread_idx()
    if isinstance(tid.type, ir.IndexType):
        tid = arith.index_cast(i32, tid)
    c = lambda v: arith.constant(i32, v)
    warp = arith.remui(arith.divui(tid, c(32)), c(4))
    lane = arith.remui(tid, c(32))
    slot = arith.addi(arith.addi(arith.muli(warp, c(16)), arith.muli(arith.divui(lane, c(4)), c(2))),
                      arith.remui(lane, c(2)))
    return arith.index_cast(ir.IndexType.get(), slot)


def swizzle_for(row_bytes: int) -> int:
    """The widest TMA swizzle (bytes) a tile row of ``row_bytes`` allows, up to 128."""
    return min(128, row_bytes)


def smem_transforms(swizzle: int, itemsize: int = 2):
    """Pallas Mosaic GPU transforms of a tile at ``swizzle`` (bytes) with elements of
    ``itemsize`` bytes (bf16 by default): (8, swizzle / itemsize) tiles."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def tile_descriptors(a_ref, x_ref, j: int, *, block_t: int, block_k: int):
    """SMEM descriptors of k32 step ``j`` of a K tile (Mosaic GPU IR values, i64).

    a_ref: compressed A rows [64 m, block_k/2] bf16 tiled at ``swizzle_for(block_k)``
    (the descriptor addresses the first 64 rows; add 4 * block_k per further 64 rows);
    x_ref: x tile [block_t, block_k] tiled at ``swizzle_for(2 * block_k)``.
    """
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    i64 = ir.IntegerType.get_signless(64)
    swa, swb = swizzle_for(block_k), swizzle_for(2 * block_k)
    per_a, per_b = swa // 32, swb // 64  # k32 steps per swizzle atom row of A / of x
    a_j = mgpu_utils.memref_slice(a_ref, (slice(0, WGMMA_M // 8),
                                          slice(j // per_a, j // per_a + 1)))
    x_j = mgpu_utils.memref_slice(x_ref, (slice(None), slice(j // per_b, j // per_b + 1)))
    a_desc, b_desc = sp_descriptors(a_j, x_j, block_t, a_swizzle=swa, b_swizzle=swb)
    # inside a swizzle atom: 16 kept bf16 (32 bytes) of A and 32 bf16 (64 bytes) of x per
    # step; the descriptor's start address counts 16-byte units
    a_desc = arith.addi(a_desc, arith.constant(i64, 2 * (j % per_a)))
    b_desc = arith.addi(b_desc, arith.constant(i64, 4 * (j % per_b)))
    return a_desc, b_desc


def issue_wgmma_sp(regs: list, a_desc, b_desc, meta, t: int, *, accumulate: bool = True
                   ) -> list:
    """One ``wgmma.mma_async.sp`` m64n{t}k32 into ``regs`` (the 32-bit accumulator layout's
    vector<1xf32> registers; with ``accumulate=False`` their values are ignored: D = A B);
    returns the new registers. No fence/commit/wait."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm

    i32 = ir.IntegerType.get_signless(32)
    field = regs[0].type  # vector<1xf32>
    use_d = llvm.ConstantOp(i32, ir.IntegerAttr.get(i32, int(accumulate))).result
    out = llvm.inline_asm(
        llvm.StructType.get_literal([field] * len(regs)),
        [*regs, a_desc, b_desc, meta, use_d],
        wgmma_sp_ptx(t), wgmma_sp_constraints(t),
        asm_dialect=0, has_side_effects=True)
    return [llvm.extractvalue(field, out, [i]) for i in range(len(regs))]


def accumulator_value(acc, regs: list):
    """The WGMMA-layout FragmentedArray of accumulator ``acc`` with registers ``regs``."""
    import numpy as np
    from jax.experimental.mosaic import gpu as mgpu

    return mgpu.WGMMAAccumulator(
        _value=mgpu.FragmentedArray(
            _registers=np.array(regs).reshape(acc._value.registers.shape),
            _layout=acc._value.layout, _is_signed=None),
        _original_layout=acc._original_layout, _sync=False).value


def _issue_wgmma_sp(ctx, a_ref, b_ref, meta_ref, o_ref):
    """Mosaic GPU body: one sparse wgmma from SMEM operands, accumulator stored to ``o_ref``.

    a_ref: A = W^T compressed, tiled (8, 1, 8, 16) bf16, swizzle 32. b_ref: x tiled
    (t/8, 1, 8, 32) bf16, swizzle 64. meta_ref: [64] int32. o_ref: [64, t] f32 (y^T).
    """
    del ctx
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import memref, nvvm
    from jax.experimental.mosaic import gpu as mgpu

    t = ir.MemRefType(o_ref.type).shape[1]
    a_desc, b_desc = sp_descriptors(a_ref, b_ref, t)
    meta = memref.load(meta_ref, [meta_slot_index()])
    acc = mgpu.WGMMAAccumulator.zero(WGMMA_M, t)  # fenced
    regs = issue_wgmma_sp(list(acc._value.registers.flat), a_desc, b_desc, meta, t)
    nvvm.wgmma_commit_group_sync_aligned()
    nvvm.wgmma_wait_group_sync_aligned(0)
    result = accumulator_value(acc, regs)
    result.store_untiled(o_ref, optimized=False)  # plain [64, t] f32 SMEM: conflicts are fine here


def wgmma_sp_tile(x: jax.Array, a: WgmmaSparseA) -> jax.Array:
    """``x @ W`` through one sparse wgmma (Hopper only). Same signature as the reference.

    x: [t, 32] bf16 (t a multiple of 8, <= 256); a: W [32, 64] bf16 as WgmmaSparseA.
    Returns [t, 64] f32.

    Raises:
      ValueError: bad shapes/dtypes (expected vs given).
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu

    _validate(x, a)
    t = x.shape[0]
    a_values = a.values  # [64, 16]
    meta = a.meta.reshape(-1)  # [64]

    def transforms(swizzle: int):
        return (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

    def body(x_gmem, a_gmem, m_gmem, o_gmem, x_smem, a_smem, m_smem, o_smem, bar):
        plgpu.copy_gmem_to_smem(x_gmem, x_smem, bar)
        plgpu.copy_gmem_to_smem(a_gmem, a_smem, bar)
        plgpu.copy_gmem_to_smem(m_gmem, m_smem, bar)
        plgpu.barrier_wait(bar)
        plgpu.inline_mgpu(
            arg_types=(plgpu.RefType(transforms=transforms(A_SWIZZLE)),
                       plgpu.RefType(transforms=transforms(B_SWIZZLE)),
                       plgpu.RefType(), plgpu.RefType()),
        )(_issue_wgmma_sp)(a_smem, x_smem, m_smem, o_smem)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem)
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((WGMMA_M, t), jnp.float32),
        scratch_types=[
            plgpu.SMEM((t, WGMMA_K), jnp.bfloat16, transforms=transforms(B_SWIZZLE)),
            plgpu.SMEM((WGMMA_M, WGMMA_K // 2), jnp.bfloat16, transforms=transforms(A_SWIZZLE)),
            plgpu.SMEM((WGMMA_M,), jnp.int32),
            plgpu.SMEM((WGMMA_M, t), jnp.float32),
            plgpu.Barrier(num_arrivals=3),
        ],
        # Lane semantics: inline_mgpu then receives tiled, swizzled SMEM memrefs, which
        # mma_utils.create_descriptor needs (under the default warpgroup semantics the refs
        # arrive untiled).
        compiler_params=plgpu.CompilerParams(lowering_semantics=mgpu.LoweringSemantics.Lane),
    )
    return kernel(x, a_values, meta).T  # y^T [64, t] -> [t, 64]


def lowering_status(x: jax.Array, a: WgmmaSparseA) -> LoweringStatus:
    """Export ``wgmma_sp_tile`` for CUDA on this host (runs the Mosaic GPU lowering, no GPU)."""
    try:
        exported = jax.export.export(jax.jit(wgmma_sp_tile), platforms=["cuda"])(x, a)
        return LoweringStatus(ok=True, module_text=exported.mlir_module())
    except Exception as e:  # the lowering's own error is the result here
        tail = "".join(traceback.format_exception_only(type(e), e)).strip()
        return LoweringStatus(ok=False, error=tail[-2000:])


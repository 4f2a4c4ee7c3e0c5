"""Pipelined sparse-wgmma matmul (2:4 and Samoyeds, plain and expert-grouped): references, config
resolution, bad input, the Mosaic GPU lowering for CUDA on this host and, on a GPU, the kernel
against the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_mma_matmul as sm
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.sparse_mma_layout import to_wgmma_sp
from samoyeds_jax import prune_weights


def _weights(rng, k, n, op="nm", lead=()):
    w = jnp.asarray(rng.standard_normal((*lead, k, n)), jnp.bfloat16)
    if op == "nm":
        dense = np.asarray(prune_weights.prune_nm(w))
        return dense, to_wgmma_sp(NMSparse.from_dense(dense))
    dense = np.asarray(prune_weights.prune_samoyeds(w))
    return dense, to_wgmma_sp(SamoyedsSparse.from_dense(dense))


@pytest.mark.parametrize("op", ["nm", "samoyeds"])
def test_reference_is_the_dense_product(rng, op):
    dense, a = _weights(rng, 256, 128, op)
    assert a.shape == (256, 128) and a.paired == (op == "samoyeds")
    x = jnp.asarray(rng.standard_normal((33, 256)), jnp.bfloat16)
    want = np.asarray(x, np.float32) @ dense.astype(np.float32)
    y = sm.wgmma_sp_matmul_reference(x, a, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
    assert sm.wgmma_sp_matmul_reference(x, a).dtype == jnp.bfloat16


def test_grouped_reference_is_the_per_tile_product(rng):
    dense, a = _weights(rng, 128, 128, "samoyeds", lead=(3,))
    x = jnp.asarray(rng.standard_normal((4 * 8, 128)), jnp.bfloat16)
    tile_expert = jnp.asarray([2, 0, 2, 1], jnp.int32)
    y = np.asarray(sm.wgmma_sp_grouped_matmul_reference(x, tile_expert, jnp.int32(3), a,
                                                        block_t=8))
    xf = np.asarray(x, np.float32).reshape(4, 8, 128)
    for i, e in enumerate([2, 0, 2]):
        np.testing.assert_allclose(y[8 * i:8 * i + 8], xf[i] @ dense[e].astype(np.float32),
                                   rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(y[24:], 0.0)  # tile 3 >= num_tiles


def test_grouped_reference_of_two_stacks_is_each_product_side_by_side(rng):
    d1, a1 = _weights(rng, 128, 128, "samoyeds", lead=(3,))
    d3, a3 = _weights(rng, 128, 128, "samoyeds", lead=(3,))
    x = jnp.asarray(rng.standard_normal((4 * 8, 128)), jnp.bfloat16)
    args = (x, jnp.asarray([2, 0, 1, 1], jnp.int32), jnp.int32(3))
    y = np.asarray(sm.wgmma_sp_grouped_matmul_reference(*args, [a1, a3], block_t=8))
    assert y.shape == (32, 256)
    np.testing.assert_array_equal(y[:, :128], sm.wgmma_sp_grouped_matmul_reference(
        *args, a1, block_t=8))
    np.testing.assert_array_equal(y[:, 128:], sm.wgmma_sp_grouped_matmul_reference(
        *args, a3, block_t=8))


def test_grouped_stacks_must_be_alike(rng):
    _, a = _weights(rng, 128, 128, "samoyeds", lead=(3,))
    _, wide = _weights(rng, 128, 256, "samoyeds", lead=(3,))
    _, nm = _weights(rng, 128, 128, "nm", lead=(3,))
    args = (jnp.zeros((8, 128), jnp.bfloat16), jnp.zeros((1,), jnp.int32), jnp.int32(1))
    for fn in (sm.wgmma_sp_grouped_matmul, sm.wgmma_sp_grouped_matmul_reference):
        with pytest.raises(ValueError, match=r"a\[1\] must be like a\[0\].*a\[1\] is "
                                             r"WgmmaSparseA of shape \(3, 128, 256\)"):
            fn(*args, (a, wide), block_t=8)
        with pytest.raises(ValueError, match=r"a\[1\] must be like a\[0\]"):
            fn(*args, (a, nm), block_t=8)  # Samoyeds and 2:4
        with pytest.raises(ValueError, match="empty tuple"):
            fn(*args, (), block_t=8)
        with pytest.raises(TypeError, match=r"a\[1\] must be a WgmmaSparseA expert stack"):
            fn(*args, (a, np.zeros((3, 128, 128))), block_t=8)


def test_resolve_config(rng):
    _, a = _weights(rng, 512, 256)
    decode = sm.resolve_config(None, t=3, a=a)
    assert (decode.block_t, decode.block_k) == (8, 256)
    assert 512 // 256 % decode.splits == 0
    assert sm.resolve_config(None, t=33, a=a).block_t == 40
    assert sm.resolve_config(None, t=4096, a=a).block_t == 128   # 4 x 16 tiles < 132 SMs
    cfg = sm.resolve_config(sm.WgmmaSpConfig(block_k=64, splits=4), t=8, a=a)
    assert (cfg.block_k, cfg.splits) == (64, 4)
    _, s = _weights(rng, 384, 128, "samoyeds")  # K = 3 slabs of 128: 256 does not fit
    assert sm.resolve_config(None, t=1, a=s).block_k == 128
    # prefill, one program per SM or more at 256 tokens per tile: 256, the widest K tile whose
    # 3-stage ring fits in SMEM, no K split
    _, wide = _weights(rng, 512, 64 * 33)
    prefill = sm.resolve_config(None, t=4 * 256, a=wide)    # 33 * 4 = 132 tiles
    assert (prefill.block_t, prefill.block_k, prefill.splits) == (256, 64, 1)
    assert sm.smem_bytes(256, 64, 3) <= sm.SMEM_BYTES < sm.smem_bytes(256, 128, 3)
    # fewer 256-token tiles than SMs: 128 tokens per tile
    assert sm.resolve_config(None, t=1024, a=a).block_t == 128
    # Samoyeds keeps two f32 accumulators: 256 tokens would leave K tiles of 32, so 128
    big = sm.resolve_config(None, t=1024, a=s)
    assert (big.block_t, big.block_k, big.splits) == (128, 128, 1)


@pytest.mark.parametrize("op", ["nm", "samoyeds"])
def test_to_dense_t_is_the_transposed_weight(rng, op):
    dense, a = _weights(rng, 256, 128, op, lead=(2,))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a.to_dense_t())(a), np.float32),
                                  np.swapaxes(dense, -1, -2).astype(np.float32))


@pytest.mark.parametrize("op", ["nm", "samoyeds"])
def test_dense_compute_from_dense_from_tokens(rng, op):
    """From ``dense_from`` tokens the product is XLA's GEMM on W^T (runs on any backend)."""
    dense, a = _weights(rng, 256, 128, op)
    x = jnp.asarray(rng.standard_normal((33, 256)), jnp.bfloat16)
    y = sm.wgmma_sp_matmul(x, a, config=sm.WgmmaSpConfig(dense_from=16))
    assert y.dtype == jnp.bfloat16 and y.shape == (33, 128)
    want = sm.wgmma_sp_matmul_reference(x, a, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)
    y32 = sm.wgmma_sp_matmul(x, a, config=sm.WgmmaSpConfig(dense_from=16), out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y32), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_bad_input(rng):
    _, a = _weights(rng, 256, 128)
    x = jnp.zeros((8, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x must be \[t, K=256\], got \(8, 128\)"):
        sm.wgmma_sp_matmul(jnp.zeros((8, 128), jnp.bfloat16), a)
    with pytest.raises(ValueError, match="must be bfloat16, got float16"):
        sm.wgmma_sp_matmul(x.astype(jnp.float16), a)
    with pytest.raises(ValueError, match="block_t must be a multiple of 8"):
        sm.wgmma_sp_matmul(x, a, config=sm.WgmmaSpConfig(block_t=12))
    with pytest.raises(ValueError, match="block_k=48 must be a multiple of 32"):
        sm.wgmma_sp_matmul(x, a, config=sm.WgmmaSpConfig(block_k=48))
    with pytest.raises(ValueError, match="splits must divide K // block_k = 4, got 3"):
        sm.wgmma_sp_matmul(x, a, config=sm.WgmmaSpConfig(block_k=64, splits=3))
    _, s = _weights(rng, 384, 128, "samoyeds")
    with pytest.raises(ValueError, match="slab v=128"):
        sm.wgmma_sp_matmul(jnp.zeros((8, 384), jnp.bfloat16), s,
                           config=sm.WgmmaSpConfig(block_k=96))
    with pytest.raises(ValueError, match="bytes of shared memory, more than the 232448"):
        sm.wgmma_sp_matmul(x, a, config=sm.WgmmaSpConfig(block_t=256, block_k=256))
    with pytest.raises(ValueError, match="inflight must be 0, or 1 with stages >= 2"):
        sm.wgmma_sp_matmul(x, a, config=sm.WgmmaSpConfig(inflight=1, stages=1))
    with pytest.raises(ValueError, match="expert stack"):
        sm.wgmma_sp_grouped_matmul(x, jnp.zeros((1,), jnp.int32), jnp.int32(1), a, block_t=8)
    assert sm.wgmma_sp_matmul(jnp.zeros((0, 256), jnp.bfloat16), a).shape == (0, 128)


@pytest.mark.parametrize("op,t,config", [
    ("nm", 1, sm.WgmmaSpConfig(block_k=256)),
    ("nm", 100, sm.WgmmaSpConfig(block_t=128, block_k=64, splits=1)),
    ("nm", 33, sm.WgmmaSpConfig(block_k=32, splits=2)),
    ("nm", 64, sm.WgmmaSpConfig(block_k=64, splits=1, inflight=1)),
    ("samoyeds", 16, sm.WgmmaSpConfig(block_k=128)),
    ("samoyeds", 3, sm.WgmmaSpConfig(block_k=256)),
])
def test_lowers_for_cuda(rng, op, t, config):
    """TMA ring, SMEM descriptors inside swizzle atoms, metadata loads, inline sparse wgmma,
    carried accumulators (Samoyeds: the per-slab routing): the lowering runs here."""
    _, a = _weights(rng, 256, 128, op)
    text = sm.lowers_for_cuda(jnp.zeros((t, 256), jnp.bfloat16), a, config)
    assert "wgmma.mma_async.sp.sync.aligned" in text


@pytest.mark.parametrize("op", ["nm", "samoyeds"])
@pytest.mark.parametrize("stacks", [1, 2])
def test_grouped_lowers_for_cuda(rng, op, stacks):
    """One stack, and two in one launch (a MoE layer's gate and up: a branch per stack)."""
    a = [_weights(rng, 256, 128, op, lead=(3,))[1] for _ in range(stacks)]
    fn = functools.partial(sm.wgmma_sp_grouped_matmul, block_t=16,
                           config=sm.WgmmaSpConfig(block_k=128))
    args = (jnp.zeros((4 * 16, 256), jnp.bfloat16), jnp.zeros((4,), jnp.int32), jnp.int32(3),
            a[0] if stacks == 1 else a)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "wgmma.mma_async.sp.sync.aligned" in exported.mlir_module()
    assert exported.out_avals[0].shape == (64, 128 * stacks)


def _close(y, ref):
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("op,t,config", [
    ("nm", 1, None), ("nm", 3, sm.WgmmaSpConfig(block_k=128, splits=2)),
    ("nm", 33, sm.WgmmaSpConfig(block_k=64)), ("nm", 200, sm.WgmmaSpConfig(block_t=64)),
    ("nm", 512, None), ("nm", 300, sm.WgmmaSpConfig(block_t=128, block_k=64, inflight=1)),
    ("nm", 16, sm.WgmmaSpConfig(block_k=128, inflight=1, splits=1)), ("samoyeds", 1, None), ("samoyeds", 16, sm.WgmmaSpConfig(block_k=128)),
    ("samoyeds", 33, sm.WgmmaSpConfig(block_k=256, splits=1)),
])
def test_kernel_matches_reference_on_gpu(rng, op, t, config):
    _, a = _weights(rng, 512, 256, op)
    x = jnp.asarray(rng.standard_normal((t, 512)), jnp.bfloat16)
    y = sm.wgmma_sp_matmul(x, a, config=config, out_dtype=jnp.float32)
    _close(y, sm.wgmma_sp_matmul_reference(x, a, out_dtype=jnp.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["nm", "samoyeds"])
def test_grouped_kernel_matches_reference_on_gpu(rng, op):
    _, a = _weights(rng, 512, 256 if op == "samoyeds" else 128, op, lead=(4,))
    x = jnp.asarray(rng.standard_normal((5 * 16, 512)), jnp.bfloat16)
    tile_expert = jnp.asarray([3, 3, 0, 2, 1], jnp.int32)  # expert 1's tile is past num_tiles
    args = (x, tile_expert, jnp.int32(4), a)
    y = sm.wgmma_sp_grouped_matmul(*args, block_t=16)
    _close(y, sm.wgmma_sp_grouped_matmul_reference(*args, block_t=16))
    np.testing.assert_array_equal(np.asarray(y[64:]), 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("op,t", [("nm", 8), ("samoyeds", 16), ("samoyeds", 64)])
def test_two_stacks_in_one_launch_match_the_reference_on_gpu(rng, op, t):
    """Gate and up of a MoE layer in one launch: each stack's product, and zeros past
    num_tiles, as the reference gives them."""
    a = [_weights(rng, 512, 256, op, lead=(4,))[1] for _ in range(2)]
    x = jnp.asarray(rng.standard_normal((5 * t, 512)), jnp.bfloat16)
    args = (x, jnp.asarray([3, 0, 0, 2, 1], jnp.int32), jnp.int32(4), a)
    y = sm.wgmma_sp_grouped_matmul(*args, block_t=t)
    _close(y, sm.wgmma_sp_grouped_matmul_reference(*args, block_t=t))
    np.testing.assert_array_equal(np.asarray(y[4 * t:]), 0.0)

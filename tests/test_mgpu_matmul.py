"""mgpu_matmul (Hopper decode kernel): the reference, config resolution, bad input, the Mosaic
GPU lowering for CUDA on this host and, on a GPU, the kernel against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mgpu_matmul as mg
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.transposed_format import TransposedSparse
from samoyeds_jax import prune_weights


def _native(rng, k, n, kind, tk=256, dtype=jnp.bfloat16):
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    if kind == "nm":
        dense = np.asarray(prune_weights.prune_nm(w))
        return dense, TransposedSparse.from_nm(NMSparse.from_dense(dense), tk=tk)
    dense = np.asarray(prune_weights.prune_samoyeds(w))
    return dense, TransposedSparse.from_samoyeds(SamoyedsSparse.from_dense(dense), tk=tk)


def _x(rng, t, k, dtype=jnp.bfloat16):
    return jnp.asarray(rng.standard_normal((t, k)), dtype)


@pytest.mark.parametrize("kind", ["nm", "samoyeds"])
def test_reference_is_the_dense_product(rng, kind):
    dense, w = _native(rng, 512, 128, kind)
    x = _x(rng, 3, 512)
    y = mg.mgpu_matmul_reference(x, w, out_dtype=jnp.float32)
    want = np.asarray(x, np.float32) @ dense.astype(np.float32)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
    assert mg.mgpu_matmul_reference(x, w).dtype == jnp.bfloat16


def test_config_resolution():
    w = jax.eval_shape(lambda: TransposedSparse(
        values=jnp.zeros((16, 14336, 128), jnp.bfloat16), meta=jnp.zeros((16, 14336, 16), jnp.int16),
        k=4096, n_out=14336, tk=256, paired=False))
    cfg = mg.resolve_config(None, t=1, w=w)
    assert cfg.block_t == 8 and 16 % cfg.splits == 0
    assert 14336 // 64 * cfg.splits >= mg.PROGRAMS_PER_SM[16] * mg.sm_count()
    assert mg.resolve_config(None, t=100, w=w).block_t == 64
    assert mg.resolve_config(mg.MgpuMatmulConfig(splits=4), t=1, w=w).splits == 4
    with pytest.raises(ValueError, match="block_t must be a multiple of 8"):
        mg.resolve_config(mg.MgpuMatmulConfig(block_t=12), t=1, w=w)
    with pytest.raises(ValueError, match="splits must divide K // tk = 16, got 3"):
        mg.resolve_config(mg.MgpuMatmulConfig(splits=3), t=1, w=w)
    with pytest.raises(ValueError, match="stages must be >= 1"):
        mg.resolve_config(mg.MgpuMatmulConfig(stages=0), t=1, w=w)
    wide = jax.eval_shape(lambda: TransposedSparse(
        values=jnp.zeros((8, 14336, 256), jnp.bfloat16), meta=jnp.zeros((8, 14336, 32), jnp.int16),
        k=4096, n_out=14336, tk=512, paired=False))
    # 3 x 77824-byte ring + a 10240-byte tile: the 243712 (+24 of barriers) Mosaic GPU refused
    assert mg.smem_bytes(40, wide, 3) == 243712
    with pytest.raises(ValueError, match="need 243712 bytes of shared memory, more than the "
                                         "232448"):
        mg.resolve_config(None, t=33, w=wide)
    assert mg.resolve_config(mg.MgpuMatmulConfig(stages=2), t=33, w=wide).stages == 2


def test_bad_input(rng):
    _, w = _native(rng, 512, 128, "nm")
    with pytest.raises(ValueError, match=r"x must be \[t, K=512\], got \(3, 256\)"):
        mg.mgpu_matmul_reference(_x(rng, 3, 256), w)
    with pytest.raises(ValueError, match="both be bfloat16 or float16, got float16 and bfloat16"):
        mg.mgpu_matmul(_x(rng, 3, 512, jnp.float16), w)
    with pytest.raises(TypeError, match="must be a TransposedSparse .*, got NMSparse"):
        mg.mgpu_matmul(_x(rng, 3, 512), NMSparse.from_dense(np.zeros((512, 128), np.float32)))
    stack = jax.tree.map(lambda a: jnp.stack([a, a]), w)
    with pytest.raises(ValueError, match="one matrix"):
        mg.mgpu_matmul(_x(rng, 3, 512), stack)
    _, odd = _native(rng, 256, 96, "nm")
    with pytest.raises(ValueError, match=r"W\^T rows \(96\) must be a multiple of 64"):
        mg.mgpu_matmul(_x(rng, 1, 256), odd)
    assert mg.mgpu_matmul(_x(rng, 0, 512), w).shape == (0, 128)


@pytest.mark.parametrize("kind,tk,t", [("nm", 256, 3), ("samoyeds", 256, 33), ("nm", 512, 1)])
def test_lowers_for_cuda(rng, kind, tk, t):
    """The Pallas -> Mosaic GPU lowering (TMA pipeline, register expansion, wgmma) runs here."""
    _, w = _native(rng, 1024, 128, kind, tk=tk)
    text = mg.lowers_for_cuda(_x(rng, t, 1024), w)
    assert "mosaic_gpu" in text and "nvvm.cp.async.bulk.tensor" in text


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nm", "samoyeds"])
@pytest.mark.parametrize("t", [1, 3, 33, 128])
def test_kernel_matches_reference_on_gpu(rng, kind, t):
    dense, w = _native(rng, 1024, 256, kind)
    x = _x(rng, t, 1024)
    y = np.asarray(jax.jit(mg.mgpu_matmul)(x, w), np.float32)
    ref = np.asarray(mg.mgpu_matmul_reference(x, w), np.float32)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [
    mg.MgpuMatmulConfig(block_t=16, splits=2, stages=2),
    mg.MgpuMatmulConfig(block_t=8, splits=4, stages=4),
    mg.MgpuMatmulConfig(block_t=64, splits=1, stages=1),
])
def test_kernel_f16_configs_on_gpu(rng, cfg):
    dense, w = _native(rng, 1024, 128, "nm", dtype=jnp.float16)
    x = _x(rng, 40, 1024, jnp.float16)
    y = np.asarray(mg.mgpu_matmul(x, w, config=cfg, out_dtype=jnp.float32))
    ref = np.asarray(mg.mgpu_matmul_reference(x, w, out_dtype=jnp.float32))
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nm", "samoyeds"])
def test_kernel_tk128_on_gpu(rng, kind):
    """K = 1408 (DeepSeek-V2-Lite / Qwen1.5-MoE expert width): 128-row K tiles."""
    dense, w = _native(rng, 1408, 128, kind, tk=None)
    assert w.tk == 128
    x = _x(rng, 5, 1408)
    y = np.asarray(jax.jit(mg.mgpu_matmul)(x, w), np.float32)
    ref = np.asarray(mg.mgpu_matmul_reference(x, w), np.float32)
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())

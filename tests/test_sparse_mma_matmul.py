"""Pipelined sparse-wgmma matmul (prefill): reference, bad input, the Mosaic GPU lowering for
CUDA on this host and, on a GPU, the kernel against the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_mma_matmul as sm
from pallas_kernels.formats import NMSparse
from pallas_kernels.sparse_mma_layout import to_wgmma_sp
from samoyeds_jax import pruning


def _weights(rng, k, n):
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    dense = np.asarray(pruning.prune_nm(w))
    return dense, to_wgmma_sp(NMSparse.from_dense(dense))


def test_reference_is_the_dense_product(rng):
    dense, a = _weights(rng, 256, 128)
    x = jnp.asarray(rng.standard_normal((33, 256)), jnp.bfloat16)
    want = np.asarray(x, np.float32) @ dense.astype(np.float32)
    np.testing.assert_allclose(np.asarray(sm.wgmma_sp_matmul_reference(x, a)), want,
                               rtol=1e-5, atol=1e-4)


def test_bad_input(rng):
    _, a = _weights(rng, 256, 128)
    x = jnp.zeros((8, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x must be \[t, K=256\], got \(8, 128\)"):
        sm.wgmma_sp_matmul(jnp.zeros((8, 128), jnp.bfloat16), a)
    with pytest.raises(ValueError, match="must be bfloat16, got float16"):
        sm.wgmma_sp_matmul(x.astype(jnp.float16), a)
    with pytest.raises(ValueError, match="block_t must be a multiple of 8"):
        sm.wgmma_sp_matmul(x, a, block_t=12)
    with pytest.raises(ValueError, match="block_k=48 must be a multiple of 32"):
        sm.wgmma_sp_matmul(x, a, block_k=48)


@pytest.mark.parametrize("block_t,block_k", [(128, 64), (64, 128), (256, 32)])
def test_lowers_for_cuda(rng, block_t, block_k):
    """TMA ring, per-K-step SMEM descriptors, metadata loads, inline sparse wgmma, carried
    accumulator: the Pallas -> Mosaic GPU lowering runs here."""
    _, a = _weights(rng, 256, 128)
    x = jnp.zeros((100, 256), jnp.bfloat16)
    fn = functools.partial(sm.wgmma_sp_matmul, block_t=block_t, block_k=block_k)
    text = jax.export.export(jax.jit(fn), platforms=["cuda"])(x, a).mlir_module()
    assert "wgmma.mma_async.sp.sync.aligned" in text


@pytest.mark.gpu
@pytest.mark.parametrize("t,block_t,block_k", [(128, 128, 64), (200, 64, 128), (256, 256, 32)])
def test_kernel_matches_reference_on_gpu(rng, t, block_t, block_k):
    dense, a = _weights(rng, 512, 256)
    x = jnp.asarray(rng.standard_normal((t, 512)), jnp.bfloat16)
    y = np.asarray(sm.wgmma_sp_matmul(x, a, block_t=block_t, block_k=block_k))
    ref = np.asarray(sm.wgmma_sp_matmul_reference(x, a))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())

"""wgmma.mma_async.sp operand layout: exact round trips, PTX-semantics oracle, bad input; the
Mosaic GPU sparse-wgmma kernel: CPU lowering (export for CUDA) and, on a GPU, correctness."""

from __future__ import annotations

import itertools
import shutil
import subprocess

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import sparse_mma
from pallas_kernels.formats import NMSparse
from pallas_kernels.sparse_mma_layout import (WgmmaSparseA, from_wgmma_sp, meta_slot, to_wgmma_sp,
                                              wgmma_sp_to_dense)

PATTERNS = list(itertools.combinations(range(4), 2))  # the 6 two-of-four position pairs


def _pruned(rng, shape, dtype, full: bool = False) -> np.ndarray:
    """Random [..., K, N] with 0..2 (or exactly 2 if ``full``) nonzeros per 4 rows of K."""
    *lead, k, n = shape
    w = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    count = np.full((*lead, k // 4, n), 2) if full else rng.integers(0, 3, (*lead, k // 4, n))
    rank = np.argsort(np.argsort(rng.random((*lead, k // 4, 4, n)), axis=-2), axis=-2)
    keep = (rank < count[..., None, :]).reshape(shape)
    return np.where(keep, w, 0.0).astype(dtype)


def _assert_same_nm(a: NMSparse, b: NMSparse) -> None:
    assert (a.n, a.m, a.k) == (b.n, b.m, b.k)
    assert a.values.dtype == b.values.dtype
    np.testing.assert_array_equal(np.asarray(a.meta), np.asarray(b.meta))
    np.testing.assert_array_equal(np.asarray(a.values).view(np.uint8),
                                  np.asarray(b.values).view(np.uint8))


def test_all_six_patterns_round_trip():
    # Every (m-tile row, k-step group) position of a 64x... tile sees every pattern.
    k, n = 64, 128
    pat = (np.arange(k // 4)[:, None] + np.arange(n)[None, :]) % 6  # [K/4, N]
    w = np.zeros((k // 4, 4, n), np.float32)
    for p, (i0, i1) in enumerate(PATTERNS):
        sel = pat == p
        w[:, i0, :] = np.where(sel, 1.0 + p, w[:, i0, :])
        w[:, i1, :] = np.where(sel, -2.0 - p, w[:, i1, :])
    w = w.reshape(k, n).astype(ml_dtypes.bfloat16)
    nm = NMSparse.from_dense(w)
    a = to_wgmma_sp(nm)
    chex.assert_shape(a.values, (n, k // 2))
    chex.assert_shape(a.meta, (n // 64, k // 32, 64))
    assert a.shape == (k, n) and a.dtype == jnp.bfloat16
    assert a.nbytes == nm.nbytes  # a permutation: same bytes, no padding
    _assert_same_nm(from_wgmma_sp(a), nm)
    np.testing.assert_array_equal(np.asarray(wgmma_sp_to_dense(a), np.float32),
                                  w.astype(np.float32))


@pytest.mark.parametrize("shape,dtype", [
    ((32, 64), ml_dtypes.bfloat16),
    ((96, 128), np.float16),
    ((2, 64, 64), ml_dtypes.bfloat16),
    ((2, 1, 32, 192), np.float32),
])
def test_random_round_trip_and_ptx_oracle(rng, shape, dtype):
    w = _pruned(rng, shape, dtype)  # includes groups with 0 or 1 nonzeros (zero padding)
    nm = NMSparse.from_dense(w)
    a = jax.jit(to_wgmma_sp)(nm)
    chex.assert_shape(a.meta, (*shape[:-2], shape[-1] // 64, shape[-2] // 32, 64))
    _assert_same_nm(jax.jit(from_wgmma_sp)(a), nm)
    # The PTX reading of the operand (per-thread registers) gives back the dense W.
    np.testing.assert_array_equal(np.asarray(wgmma_sp_to_dense(a), np.float32),
                                  w.astype(np.float32))


def test_every_nibble_is_a_valid_ptx_index_pair(rng):
    # PTX: 0b0000, 0b0101, 0b1010, 0b1111 are undefined behaviour; ours are p0 < p1 always.
    a = to_wgmma_sp(NMSparse.from_dense(_pruned(rng, (64, 64), np.float32)))
    u = np.asarray(a.meta).view(np.uint32)
    nib = (u[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    assert np.all((nib & 3) < (nib >> 2))


def test_meta_slot_covers_each_register_once():
    tids = np.arange(128)
    carrying = tids[(tids % 32) % 4 < 2]  # lanes 4g, 4g+1 carry metadata with spsel = 0
    slots = meta_slot(carrying)
    assert sorted(slots.tolist()) == list(range(64))
    # The ignored lanes read their neighbour's slot (in range, no out-of-bounds load).
    np.testing.assert_array_equal(meta_slot(tids + 2 * ((tids % 4) < 2)) < 64, True)


def test_single_register_content(rng):
    # Thread 37 = warp 1, lane 5: gid 1, t 1 -> rows 17 and 25, K columns 16..31 of step 0.
    w = _pruned(rng, (32, 64), np.float32, full=True)
    nm = NMSparse.from_dense(w)
    a = to_wgmma_sp(nm)
    word = lambda row: int(np.asarray(nm.meta).view(np.uint32)[0, row])
    expected = (word(17) >> 16) | ((word(25) >> 16) << 16)
    assert int(np.asarray(a.meta).view(np.uint32)[0, 0, meta_slot(37)]) == expected


def test_bad_input():
    w = np.zeros((32, 64), np.float32)
    with pytest.raises(ValueError, match="2:4"):
        to_wgmma_sp(NMSparse.from_dense(np.zeros((64, 64), np.float32), n=1, m=4))
    with pytest.raises(ValueError, match="N % 64"):
        to_wgmma_sp(NMSparse.from_dense(w[:, :33]))
    a = to_wgmma_sp(NMSparse.from_dense(w))
    with pytest.raises(ValueError, match=r"WgmmaSparseA: values must have shape \(64, 32\)"):
        from_wgmma_sp(WgmmaSparseA(values=a.values, meta=a.meta, k=64))


# ------------------------------------------------------------------------------- the kernel


def _tile_inputs(rng, t: int):
    w = _pruned(rng, (32, 64), ml_dtypes.bfloat16, full=True)
    x = rng.standard_normal((t, 32)).astype(ml_dtypes.bfloat16)
    return jnp.asarray(x), to_wgmma_sp(NMSparse.from_dense(w)), w


def test_reference_matches_dense(rng):
    x, a, w = _tile_inputs(rng, 8)
    y = sparse_mma.wgmma_sp_tile_reference(x, a)
    chex.assert_shape(y, (8, 64))
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x, np.float32) @ w.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_kernel_validates_shapes(rng):
    x, a, _ = _tile_inputs(rng, 8)
    with pytest.raises(ValueError, match="t=12"):
        sparse_mma.wgmma_sp_tile(jnp.zeros((12, 32), jnp.bfloat16), a)
    with pytest.raises(ValueError, match="bfloat16"):
        sparse_mma.wgmma_sp_tile(x.astype(jnp.float32), a)


def test_kernel_lowers_for_cuda_on_cpu(rng):
    """The Mosaic GPU lowering (export for CUDA) of the kernel with the inline sparse wgmma."""
    x, a, _ = _tile_inputs(rng, 64)
    status = sparse_mma.lowering_status(x, a)
    if not status.ok:
        pytest.xfail(f"Mosaic GPU lowering fails: {status.error}")
    assert "wgmma.mma_async.sp.sync.aligned.m64n64k32.f32.bf16.bf16" in status.module_text


def test_ptx_instruction_text():
    ptx = sparse_mma.wgmma_sp_ptx(64)
    assert ptx.count("wgmma.mma_async.sp.sync.aligned.m64n64k32.f32.bf16.bf16") == 1
    assert "$64, $65, $66, 0, p, 1, 1, 0, 0;" in ptx  # adesc, bdesc, meta, spsel, scale-d, ...


@pytest.mark.parametrize("n", [8, 64, 256])
def test_ptx_assembles_for_sm90a(tmp_path, n):
    """ptxas (if installed) accepts the instruction and operand forms the kernel emits."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("no ptxas on this machine")
    src = tmp_path / "wgmma_sp.ptx"
    src.write_text(sparse_mma.wgmma_sp_standalone_ptx(n))
    run = subprocess.run([ptxas, "-arch=sm_90a", str(src), "-o", str(tmp_path / "out.cubin")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("t", [8, 64, 256])
def test_kernel_matches_reference_on_gpu(rng, t):
    x, a, w = _tile_inputs(rng, t)
    y = np.asarray(sparse_mma.wgmma_sp_tile(x, a))
    ref = np.asarray(sparse_mma.wgmma_sp_tile_reference(x, a))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=1e-2)

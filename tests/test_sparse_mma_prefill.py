"""Warp-specialized sparse-wgmma prefill kernel (``sparse_mma_prefill``): reference, config
checks, raster order, the Mosaic GPU lowering for CUDA on this host, ``wgmma_sp_matmul``'s
dispatch to it and, on a GPU, the kernel against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_mma_matmul as sm
from pallas_kernels import sparse_mma_prefill as sp
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.sparse_mma_layout import to_wgmma_sp
from samoyeds_jax import prune_weights

P = sp.SpPrefillConfig


def _weights(rng, k, n, op="nm"):
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    if op == "nm":
        dense = np.asarray(prune_weights.prune_nm(w))
        return dense, to_wgmma_sp(NMSparse.from_dense(dense))
    v = int(op[8:] or 128)  # "samoyeds<v>"
    dense = np.asarray(prune_weights.prune_samoyeds(w, v=v))
    return dense, to_wgmma_sp(SamoyedsSparse.from_dense(dense, v=v))


def _x(rng, t, k):
    return jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)


@pytest.mark.parametrize("t", [1, 33])
def test_reference_is_the_dense_product(rng, t):
    dense, a = _weights(rng, 256, 128)
    x = _x(rng, t, 256)
    want = np.asarray(x, np.float32) @ dense.astype(np.float32)
    y = sp.wgmma_sp_prefill_matmul_reference(x, a, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
    assert sp.wgmma_sp_prefill_matmul_reference(x, a).dtype == jnp.bfloat16


def test_bad_input(rng):
    _, a = _weights(rng, 256, 256)
    x = jnp.zeros((8, 256), jnp.bfloat16)
    run = sp.wgmma_sp_prefill_matmul
    with pytest.raises(ValueError, match=r"x must be \[t, K=256\], got \(8, 128\)"):
        run(jnp.zeros((8, 128), jnp.bfloat16), a)
    with pytest.raises(ValueError, match="must be bfloat16, got float32"):
        run(x.astype(jnp.float32), a)
    with pytest.raises(ValueError, match="block_t must be a multiple of 8"):
        run(x, a, config=P(block_t=100))
    with pytest.raises(ValueError, match="block_k=48 must be a multiple of 32 dividing K=256"):
        run(x, a, config=P(block_k=48))
    with pytest.raises(ValueError, match="consumers must be 1 or 2, got 3"):
        run(x, a, config=P(consumers=3))
    with pytest.raises(ValueError, match="stages must be >= 1, got 0"):
        run(x, a, config=P(stages=0))
    with pytest.raises(ValueError, match="group_m must be None or >= 1, got 0"):
        run(x, a, config=P(group_m=0))
    with pytest.raises(ValueError, match="bytes of shared memory, more than the 232448"):
        run(x, a, config=P(block_k=128))   # 3 x 82 KB ring + 64 KB output
    with pytest.raises(ValueError, match="bytes of shared memory, more than the 232448"):
        run(x, a, out_dtype=jnp.float32)   # 3 x 41 KB ring + 128 KB f32 output
    _, narrow = _weights(rng, 256, 192)
    with pytest.raises(ValueError, match=r"W\^T rows \(192\) must be a multiple of 128"):
        run(x, narrow)
    _, sam = _weights(rng, 256, 256, "samoyeds")
    with pytest.raises(ValueError, match="Samoyeds weights need a 2-byte out_dtype"):
        run(x, sam, config=P(block_t=128, block_k=128), out_dtype=jnp.float32)
    _, sam96 = _weights(rng, 192, 256, "samoyeds96")
    with pytest.raises(ValueError, match="must divide or be a multiple of the Samoyeds slab v=96"):
        run(x[:, :192], sam96, config=P(block_t=128, block_k=64))
    assert run(jnp.zeros((0, 256), jnp.bfloat16), a).shape == (0, 256)


@pytest.mark.parametrize("v,block_k", [(128, 128), (128, 64), (128, 32), (64, 128), (32, 256)])
def test_flips_leave_each_column_its_slabs(rng, v, block_k):
    """The kernel's Samoyeds accumulation, replayed in numpy: per chunk of min(block_k, v) K
    rows add the chunk's partial product into the first accumulator, then swap the two where
    ``flips`` is set. The first must end as column 2r (the slabs with sel 0), the second as
    2r + 1."""
    slabs, rows = 5, 16
    sel = jnp.asarray(rng.integers(0, 2, (slabs, rows)), jnp.int16)
    f = np.asarray(sp.flips(sel, v, block_k))
    chunk = min(block_k, v)
    assert f.shape == (slabs * v // chunk, rows) and f.dtype == np.int16
    part = rng.standard_normal((f.shape[0], rows))   # each chunk's partial product
    acc, other = np.zeros(rows), np.zeros(rows)
    for c in range(f.shape[0]):
        acc = acc + part[c]
        acc, other = np.where(f[c] != 0, other, acc), np.where(f[c] != 0, acc, other)
    per_slab = part.reshape(slabs, v // chunk, rows).sum(axis=1)
    s = np.asarray(sel)
    np.testing.assert_allclose(acc, np.where(s == 0, per_slab, 0).sum(axis=0), atol=1e-12)
    np.testing.assert_allclose(other, np.where(s == 1, per_slab, 0).sum(axis=0), atol=1e-12)


def test_column_pairs_unpack_to_adjacent_columns(rng):
    """What the kernel stores for Samoyeds (column 2r in the low 16 bits of a uint32, 2r + 1 in
    the high, the same jnp ops) unpacks to y [t, 2R]."""
    lo, hi = (jnp.asarray(rng.standard_normal((3, 4)), jnp.float32) for _ in range(2))
    bits = [jax.lax.bitcast_convert_type(a.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
            for a in (lo, hi)]
    y = sp._unpack(bits[0] | (bits[1] << jnp.uint32(16)), True, jnp.bfloat16)
    assert y.shape == (3, 8) and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y[:, 0::2]), np.asarray(lo.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(y[:, 1::2]), np.asarray(hi.astype(jnp.bfloat16)))


def test_grouped_reference_is_each_tiles_expert(rng):
    e, k, n, bt = 3, 256, 128, 16
    stack = [_weights(rng, k, n, "samoyeds") for _ in range(e)]
    a = jax.tree.map(lambda *v: jnp.stack(v), *[w for _, w in stack])
    x = _x(rng, 4 * bt, k)
    te = jnp.asarray([2, 0, 2, 1], jnp.int32)
    y = sp.wgmma_sp_prefill_grouped_matmul_reference(x, te, jnp.int32(3), a,
                                                     block_t=bt, out_dtype=jnp.float32)
    for i in range(3):
        want = np.asarray(x[i * bt:(i + 1) * bt], np.float32) @ stack[int(te[i])][0]
        np.testing.assert_allclose(np.asarray(y[i * bt:(i + 1) * bt]), want, rtol=1e-5,
                                   atol=1e-3)
    assert not np.any(np.asarray(y[3 * bt:]))
    with pytest.raises(ValueError, match=r"tile_expert must be \[4\]"):
        sp.wgmma_sp_prefill_grouped_matmul(x, te[:3], jnp.int32(3), a, block_t=bt)
    with pytest.raises(ValueError, match="expert stack"):
        sp.wgmma_sp_prefill_grouped_matmul(x, te, jnp.int32(3), stack[0][1], block_t=bt)


def test_smem_of_the_default_tilings_fits():
    assert sp.smem_bytes(P()) <= sp.SMEM_BYTES
    assert sp.smem_bytes(P(block_t=128, block_k=128)) <= sp.SMEM_BYTES
    assert sp.smem_bytes(P(block_k=128)) > sp.SMEM_BYTES


@pytest.mark.parametrize("m_tiles,t_tiles,group_m", [(7, 3, 2), (112, 16, 16), (5, 4, None),
                                                     (3, 5, 8)])
def test_raster_visits_every_tile_once_group_by_group(m_tiles, t_tiles, group_m):
    order = [tuple(int(v) for v in sp.raster(jnp.int32(i), m_tiles, t_tiles, group_m))
             for i in range(m_tiles * t_tiles)]
    assert sorted(order) == [(m, t) for m in range(m_tiles) for t in range(t_tiles)]
    g = min(group_m or m_tiles, m_tiles)
    first = order[:g * t_tiles]   # the first group sweeps every token tile of its row tiles
    assert {m for m, _ in first} == set(range(g)) and {t for _, t in first} == set(range(t_tiles))


@pytest.mark.parametrize("config", [P(), P(consumers=1), P(block_t=128, block_k=128),
                                    P(group_m=None, stages=2), P(block_t=40, block_k=32)])
def test_lowers_for_cuda(rng, config):
    """Producer/consumer warpgroups, TMA ring, per-consumer A offset and metadata, inline
    sparse wgmma, output store: the Mosaic GPU lowering runs here."""
    _, a = _weights(rng, 512, 256)
    text = sp.lowers_for_cuda(jnp.zeros((300, 512), jnp.bfloat16), a, config)
    assert "wgmma.mma_async.sp.sync.aligned" in text


@pytest.mark.parametrize("op,config", [("samoyeds", P(block_t=128, block_k=128)),
                                       ("samoyeds", P(block_t=128, block_k=64, consumers=1)),
                                       ("samoyeds64", P(block_t=64, block_k=128)),
                                       ("nm", P(block_t=128, block_k=128))])
def test_grouped_and_samoyeds_lower_for_cuda(rng, op, config):
    """Samoyeds' two accumulators and flips, the packed column-pair store and the grouped
    form (expert per token tile, dead tiles storing zeros) lower for CUDA here."""
    _, a = _weights(rng, 512, 256, op)
    text = sp.lowers_for_cuda(jnp.zeros((300, 512), jnp.bfloat16), a, config)
    assert "wgmma.mma_async.sp.sync.aligned" in text
    stack = jax.tree.map(lambda *v: jnp.stack(v), a, a)
    text = sp.lowers_for_cuda(jnp.zeros((3 * config.block_t, 512), jnp.bfloat16), stack, config,
                              tile_expert=jnp.zeros((3,), jnp.int32))
    assert "wgmma.mma_async.sp.sync.aligned" in text


def test_prefill_config_rule(rng):
    _, a = _weights(rng, 512, 256)   # 2 row tiles of 128
    assert sm.prefill_config(511, a) is None
    assert sm.prefill_config(512, a, sm.WgmmaSpConfig(prefill_from=None)) is None
    assert sm.prefill_config(64, a, sm.WgmmaSpConfig(prefill_from=64)) is not None
    need = -(-(sm.sm_count() // 2) // 2)   # token tiles of 256 that give half the SMs work
    small = sm.prefill_config(256 * (need - 1), a)
    assert (small.block_t, small.block_k) == (128, 128)
    assert sm.prefill_config(256 * need, a) == P()
    wide = sm.prefill_config(256 * need, a, out_dtype=jnp.float32)   # f32 tile: 2 stages
    assert wide == P(stages=2) and sp.smem_bytes(wide, 4) <= sp.SMEM_BYTES < sp.smem_bytes(P(), 4)
    _, narrow = _weights(rng, 512, 192)
    assert sm.prefill_config(4096, narrow) is None


def test_wgmma_sp_matmul_dispatches_prefill(rng, monkeypatch):
    """From ``prefill_from`` tokens 2:4 and Samoyeds weights go to the warp-specialized kernel
    with ``prefill_config``'s tiling (Samoyeds: 128-token tiles); fewer tokens, Samoyeds with a
    4-byte output and W^T rows not a multiple of 128 do not."""
    calls = []

    def spy(x, a, *, config, out_dtype):
        calls.append((x.shape[0], a.paired, config))
        return jnp.zeros((x.shape[0], a.shape[-1]), out_dtype or x.dtype)

    monkeypatch.setattr(sm, "wgmma_sp_prefill_matmul", spy)
    _, a = _weights(rng, 256, 128)
    _, sam = _weights(rng, 256, 256, "samoyeds")        # 128 rows of A
    _, sam64 = _weights(rng, 256, 128, "samoyeds")      # 64 rows of A
    off_gpu = sm.WgmmaSpConfig(dense_from=16)   # the non-prefill paths compute densely here
    sm.wgmma_sp_matmul(_x(rng, 600, 256), a, config=off_gpu)
    sm.wgmma_sp_matmul(_x(rng, 600, 256), sam, config=off_gpu)
    assert [c[:2] for c in calls] == [(600, False), (600, True)]
    assert calls[0][2] == sm.prefill_config(600, a)
    assert calls[1][2] == sp.default_config(sam, 128) == P(block_t=128, block_k=128)
    for x, w, dt in ((_x(rng, 100, 256), a, None), (_x(rng, 600, 256), sam64, None),
                     (_x(rng, 600, 256), sam, jnp.float32)):
        y = sm.wgmma_sp_matmul(x, w, config=off_gpu, out_dtype=dt)
        assert y.shape == (x.shape[0], w.shape[-1])
    assert len(calls) == 2


def test_default_config_fits_the_weights(rng):
    """One consumer where the W^T rows are not a multiple of 128; K tiles that divide K and fit
    Samoyeds' slab; every default fits shared memory."""
    for k, n, op, want in [(512, 256, "nm", P(block_t=128, block_k=128)),
                           (512, 256, "samoyeds", P(block_t=128, block_k=128)),
                           (512, 128, "samoyeds", P(block_t=128, block_k=128, consumers=1)),
                           (192, 256, "samoyeds96", P(block_t=128, block_k=32)),
                           (384, 256, "samoyeds", P(block_t=128, block_k=128))]:
        _, a = _weights(rng, k, n, op)
        cfg = sp.default_config(a, 128)
        assert cfg == want, (k, n, op)
        sp.check_config(cfg, a, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("op,t,config,out_dtype", [
    ("nm", 1, P(), jnp.bfloat16), ("nm", 33, P(consumers=1), jnp.float32),
    ("nm", 300, P(block_t=128, block_k=128), jnp.float32),
    ("nm", 600, P(group_m=2), jnp.bfloat16),
    ("nm", 513, P(block_t=192, stages=4), jnp.bfloat16),
    ("nm", 256, P(block_k=32, stages=6), jnp.bfloat16), ("nm", 600, P(stages=2), jnp.float32),
    ("samoyeds", 1, P(block_t=128, block_k=128), jnp.bfloat16),
    ("samoyeds", 33, P(block_t=128, block_k=64, consumers=1), jnp.bfloat16),
    ("samoyeds64", 300, P(block_t=64, block_k=128, stages=2), jnp.bfloat16),
    ("samoyeds", 600, P(block_t=128, block_k=128, group_m=2), jnp.bfloat16),
    ("samoyeds", 257, P(block_t=128, block_k=32, stages=4), jnp.bfloat16),
])
def test_kernel_matches_reference_on_gpu(rng, op, t, config, out_dtype):
    # 5 row tiles of 128 W^T rows (of A rows for Samoyeds): group_m=2 leaves a narrow group
    _, a = _weights(rng, 512, 1280 if op.startswith("samoyeds") else 640, op)
    x = _x(rng, t, 512)
    y = sp.wgmma_sp_prefill_matmul(x, a, config=config, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == (t, a.shape[-1])
    ref = np.asarray(sp.wgmma_sp_prefill_matmul_reference(x, a, out_dtype=jnp.float32))
    y = np.asarray(y, np.float32)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("op,tile_expert,live", [
    ("samoyeds", [3, 0, 0, 2, 1, 3], 5),    # expert 3 in two places, a dead tile last
    ("samoyeds", [1, 1, 1, 1], 4),          # all tiles on one expert, others empty
    ("nm", [2, 0, 1, 0, 0], 3),
    ("samoyeds", [0, 0], 0),                # nothing live: zeros
])
def test_grouped_kernel_matches_reference_on_gpu(rng, op, tile_expert, live):
    bt = 128
    stack = [_weights(rng, 256, 256, op)[1] for _ in range(4)]
    a = jax.tree.map(lambda *v: jnp.stack(v), *stack)
    te = jnp.asarray(tile_expert, jnp.int32)
    x = _x(rng, len(tile_expert) * bt, 256)
    cfg = P(block_k=128)
    y = sp.wgmma_sp_prefill_grouped_matmul(x, te, jnp.int32(live), a, block_t=bt, config=cfg)
    ref = np.asarray(sp.wgmma_sp_prefill_grouped_matmul_reference(
        x, te, jnp.int32(live), a, block_t=bt, out_dtype=jnp.float32))
    y = np.asarray(y, np.float32)
    assert np.all(np.isfinite(y)) and not np.any(y[live * bt:])
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * max(np.abs(ref).max(), 1))

"""TiledSparse (per-tile column-ELL): exact round trips, layout invariants, bytes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.tiled_format import TiledBitmap, TiledSparse

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
_dense = jax.jit(TiledSparse.to_dense)  # one compile per shape (eager runs op by op)


def _pruned(rng, shape, sparsity, dtype):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return jnp.asarray(w, dtype)


def _check_layout(ts: TiledSparse, vals: np.ndarray, rows: np.ndarray, off: np.ndarray,
                  w: np.ndarray) -> None:
    """Every documented invariant of one matrix's layout (numpy arrays of that matrix)."""
    vals = vals.astype(np.float32)
    rows = rows.astype(np.int64)
    off = off.astype(np.int64)
    kt_count, nt_count = ts.grid
    assert off.shape == (nt_count, kt_count + 1)
    assert off[0, 0] == 0
    assert (np.diff(off, axis=1) >= 0).all()
    np.testing.assert_array_equal(off[:-1, -1], off[1:, 0])
    assert off[-1, -1] <= ts.num_slots
    assert (rows < ts.tile_k).all()
    nz = w != 0
    for nt in range(nt_count):
        for kt in range(kt_count):
            a, b = off[nt, kt], off[nt, kt + 1]
            tile = nz[kt * ts.tile_k:(kt + 1) * ts.tile_k, nt * ts.tile_n:(nt + 1) * ts.tile_n]
            counts = tile.sum(axis=0)
            cap = -(-counts.max() // ts.slot_align) * ts.slot_align if counts.size else 0
            assert b - a == cap
            for c in range(ts.tile_n):
                v, r = vals[a:b, c], rows[a:b, c]
                kept = v != 0
                # Nonzeros first, in ascending row order; padding is value 0 at row 0.
                assert kept.sum() == counts[c]
                assert kept[:counts[c]].all()
                assert (np.diff(r[:counts[c]]) > 0).all()
                assert (r[counts[c]:] == 0).all()
    # Slots past the last tile (batch padding) are empty.
    assert (vals[off[-1, -1]:] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_random(rng, dtype):
    for _ in range(3):
        batch = [(), (2,), (2, 3)][rng.integers(3)]
        tile_k = int(rng.choice([1, 3, 8, 32, 64]))
        tile_n = int(rng.choice([1, 2, 8, 16, 32]))
        k = tile_k * int(rng.integers(1, 5))
        n = tile_n * int(rng.integers(1, 4))
        sparsity = float(rng.choice([0.0, 0.5, 0.7, 0.9, 0.95, 1.0]))
        w = _pruned(rng, batch + (k, n), sparsity, dtype)
        ts = TiledSparse.from_dense(w, tile_k=tile_k, tile_n=tile_n,
                                    slot_align=int(rng.choice([1, 4])))
        assert ts.shape == w.shape and ts.dtype == w.dtype
        back = _dense(ts)
        assert back.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(back), np.asarray(w))
        flat_w = np.asarray(w).astype(np.float32).reshape((-1, k, n))
        vals, rows, off = (np.asarray(a).reshape((-1,) + a.shape[len(batch):])
                           for a in (ts.values, ts.rows, ts.offsets))
        for i in range(flat_w.shape[0]):
            _check_layout(ts, vals[i], rows[i], off[i], flat_w[i])


def test_defaults_and_bytes(rng):
    w = _pruned(rng, (768, 96), 0.8, jnp.bfloat16)
    ts = TiledSparse.from_dense(w)
    assert (ts.tile_k, ts.tile_n) == (256, 32)
    assert ts.rows.dtype == jnp.uint8 and ts.offsets.dtype == jnp.int32
    s = ts.num_slots
    assert ts.nbytes == s * 32 * (2 + 1) + 3 * 4 * 4
    assert ts.dense_nbytes == 768 * 96 * 2
    nnz = int(np.count_nonzero(np.asarray(w.astype(jnp.float32))))
    assert ts.nnz == nnz
    assert ts.density == pytest.approx(nnz / (768 * 96))
    assert ts.slot_fill == pytest.approx(nnz / (s * 32))
    # Odd K: the largest divisor <= 256; N = 8 * 11: tile_n = 8.
    ts = TiledSparse.from_dense(_pruned(rng, (1408, 88), 0.8, jnp.float16))
    assert (ts.tile_k, ts.tile_n) == (176, 8)


def test_wide_tiles_use_uint16_rows(rng):
    w = _pruned(rng, (1024, 16), 0.9, jnp.float32)
    ts = TiledSparse.from_dense(w, tile_k=512, tile_n=16)
    assert ts.rows.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(_dense(ts)), np.asarray(w))


def test_batch_padding_and_empty_matrices(rng):
    w = np.array(_pruned(rng, (3, 64, 16), 0.7, jnp.float32))
    w[1] = 0.0  # one all-zero matrix in the stack
    ts = TiledSparse.from_dense(w, tile_k=32, tile_n=8)
    np.testing.assert_array_equal(np.asarray(_dense(ts)), w)
    zero = TiledSparse.from_dense(np.zeros((32, 8), np.float32), tile_k=32, tile_n=8)
    assert zero.num_slots == 1 and zero.nnz == 0
    np.testing.assert_array_equal(np.asarray(_dense(zero)), np.zeros((32, 8)))


def test_negative_zero_is_dropped(rng):
    w = np.array(_pruned(rng, (16, 8), 0.5, jnp.float32))
    w[0, 0] = -0.0
    ts = TiledSparse.from_dense(w, tile_k=16, tile_n=8)
    assert ts.nnz == int(np.count_nonzero(w))
    np.testing.assert_array_equal(np.asarray(_dense(ts)), w)


def test_is_a_pytree(rng):
    ts = TiledSparse.from_dense(_pruned(rng, (64, 32), 0.8, jnp.bfloat16), tile_k=32,
                                tile_n=16)
    leaves, tree = jax.tree.flatten(ts)
    assert len(leaves) == 3
    again = jax.tree.unflatten(tree, leaves)
    assert again.tile_k == 32 and again.k == 64
    doubled = jax.jit(lambda t: jax.tree.map(lambda a: a, t))(ts)
    np.testing.assert_array_equal(np.asarray(_dense(doubled)), np.asarray(_dense(ts)))


@pytest.mark.parametrize("bad, where", [(np.nan, "(2, 5)"), (np.inf, "(2, 5)"),
                                        (-np.inf, "(2, 5)")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rejects_non_finite(rng, bad, where, dtype):
    w = np.array(_pruned(rng, (16, 8), 0.5, jnp.float32))
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite .* at index \(2, 5\).*kt=0, nt=1"):
        TiledSparse.from_dense(jnp.asarray(w, dtype), tile_k=8, tile_n=4)


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(tile_k=24), (64, 32), r"K=64 must be a multiple of tile_k=24"),
    (dict(tile_n=24), (64, 48), r"tile_n=24 must be a power of two"),
    (dict(tile_n=64), (64, 32), r"N=32 must be a multiple of tile_n=64"),
    (dict(tile_k=0), (64, 32), r"tile_k=0 must be in"),
    (dict(tile_k=2**17), (2**17, 1), r"must be in \[1, 65536\]"),
    (dict(slot_align=0), (64, 32), r"slot_align=0 must be an int >= 1"),
    ({}, (64,), r"rank >= 2"),
])
def test_rejects_bad_shapes(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        TiledSparse.from_dense(np.ones(shape, np.float32), **kwargs)


@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.int8])
def test_rejects_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match="dtype must be one of"):
        TiledSparse.from_dense(np.ones((8, 8), dtype))


def test_rejects_traced_input():
    with pytest.raises(ValueError, match="concrete array"):
        jax.jit(lambda w: TiledSparse.from_dense(w).values)(jnp.ones((8, 8)))


# ------------------------------------------------------------------------- TiledBitmap
_bitmap_dense = jax.jit(TiledBitmap.to_dense)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmap_round_trip_random(rng, dtype):
    for _ in range(3):
        batch = [(), (2,)][rng.integers(2)]
        tile_n = int(rng.choice([32, 64, 128]))
        k = int(rng.integers(1, 40))
        n = tile_n * int(rng.integers(1, 3))
        sparsity = float(rng.choice([0.0, 0.5, 0.8, 0.95, 1.0]))
        w = _pruned(rng, batch + (k, n), sparsity, dtype)
        bm = TiledBitmap.from_dense(w, tile_n=tile_n)
        assert bm.shape == w.shape and bm.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(_bitmap_dense(bm)), np.asarray(w))
        # Layout: bits, offsets and value order as documented.
        wf = np.asarray(w).astype(np.float32).reshape((-1, k, n))
        words = np.asarray(bm.words).reshape((-1, k, n // 32)).view(np.uint32)
        woff = np.asarray(bm.woff).reshape((-1, k, n // 32))
        vals = np.asarray(bm.values).astype(np.float32).reshape((wf.shape[0], -1))
        for i in range(wf.shape[0]):
            nz = wf[i] != 0
            bits = (words[i][:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
            np.testing.assert_array_equal(bits.reshape(k, n).astype(bool), nz)
            order = wf[i].reshape(k, n // tile_n, tile_n).transpose(1, 0, 2)
            kept = order[order != 0]
            np.testing.assert_array_equal(vals[i, :kept.size], kept)
            assert (vals[i, kept.size:] == 0).all()
            for r, j in [(0, 0), (k - 1, n // 32 - 1)]:
                first = woff[i, r, j]
                col0 = j * 32
                if nz[r, col0:col0 + 32].any():
                    c = col0 + int(np.argmax(nz[r, col0:col0 + 32]))
                    assert vals[i, first] == wf[i, r, c]


def test_bitmap_bytes_and_errors(rng):
    w = _pruned(rng, (64, 256), 0.8, jnp.bfloat16)
    bm = TiledBitmap.from_dense(w)
    assert bm.tile_n == 128
    nnz = int(np.count_nonzero(np.asarray(w).astype(np.float32)))
    assert bm.nnz == nnz and bm.density == pytest.approx(nnz / (64 * 256))
    assert bm.nbytes == 2 * 64 * 8 * 4 + (nnz + 1) * 2
    with pytest.raises(ValueError, match="N a multiple of 32"):
        TiledBitmap.from_dense(np.ones((8, 48), np.float32))
    with pytest.raises(ValueError, match="tile_n=48 must be a power of two"):
        TiledBitmap.from_dense(np.ones((8, 96), np.float32), tile_n=48)
    with pytest.raises(ValueError, match="dtype must be one of"):
        TiledBitmap.from_dense(np.ones((8, 32), np.int32))
    bad = np.array(np.asarray(w).astype(np.float32))
    bad[3, 70] = np.nan
    with pytest.raises(ValueError, match=r"non-finite .* \(3, 70\).*word 2 of row 3"):
        TiledBitmap.from_dense(bad)

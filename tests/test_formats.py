"""NMSparse and SamoyedsSparse: exact round trips, metadata packing, byte counts, bad input."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import nm_encode
from pallas_kernels.formats import (NM_PATTERNS, NMSparse, SamoyedsSparse, meta_bits, nm_k_multiple,
                                    pack_meta, unpack_meta, values_per_word)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ----------------------------------------------------------------------------------- builders


def _keep_random(rng: np.random.Generator, shape: tuple[int, ...], axis: int, n: int) -> np.ndarray:
    """Bool mask keeping a random 0..n entries of each group along ``axis`` (random places)."""
    count = rng.integers(0, n + 1, size=np.delete(np.asarray(shape), axis % len(shape)))
    rank = np.argsort(np.argsort(rng.random(shape), axis=axis), axis=axis)
    return rank < np.expand_dims(count, axis)


def _nm_pruned(rng, shape, n, m, dtype) -> np.ndarray:
    """Random [..., K, N] in ``dtype`` with 0..n nonzeros per group of m rows."""
    *lead, k, cols = shape
    w = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    keep = _keep_random(rng, (*lead, k // m, m, cols), -2, n).reshape(shape)
    return np.where(keep, w, np.zeros((), dtype))


def _samoyeds_pruned(rng, shape, n_sel, m_sel, v, dtype) -> np.ndarray:
    """Random [..., K, N] with 0..n_sel nonzero columns per (slab, group), 0..2 per 4 rows."""
    *lead, k, n_out = shape
    cols = _keep_random(rng, (*lead, k // v, 1, n_out // m_sel, m_sel), -1, n_sel)
    cols = np.broadcast_to(cols, (*lead, k // v, v, n_out // m_sel, m_sel)).reshape(shape)
    rows = _keep_random(rng, (*lead, k // 4, 4, n_out), -2, 2).reshape(shape)
    w = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    return np.where(cols & rows, w, np.zeros((), dtype))


def _as_f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


# ----------------------------------------------------------------------------------- NMSparse

_NM_CASES = [
    # (n, m), dtype, dense shape: K multiples of nm_k_multiple, awkward N, leading expert dims
    ((2, 4), "float32", (32, 1)),
    ((2, 4), "bfloat16", (64, 33)),
    ((2, 4), "float16", (3, 96, 8)),
    ((2, 4), "bfloat16", (2, 2, 32, 3)),
    ((1, 4), "float32", (2, 64, 5)),
    ((1, 4), "bfloat16", (128, 3)),
    ((1, 4), "float16", (64, 16)),
    ((2, 8), "float32", (32, 7)),
    ((2, 8), "bfloat16", (4, 64, 2)),
    ((2, 8), "float16", (96, 1)),
    ((4, 8), "float32", (16, 9)),
    ((4, 8), "bfloat16", (48, 4)),
    ((4, 8), "float16", (2, 32, 33)),
]


@pytest.mark.parametrize("nm,dtype,shape", _NM_CASES)
def test_nm_round_trip_is_exact(rng, nm, dtype, shape):
    n, m = nm
    w = _nm_pruned(rng, shape, n, m, DTYPES[dtype])
    s = NMSparse.from_dense(w, n=n, m=m)
    *lead, k, cols = shape
    kept = k * n // m
    chex.assert_shape(s.values, (*lead, kept, cols))
    chex.assert_shape(s.meta, (*lead, kept // values_per_word(m), cols))
    chex.assert_type(s.meta, jnp.int32)
    assert s.dtype == jnp.dtype(dtype) and s.values.dtype == jnp.dtype(dtype)
    assert (s.shape, s.k, s.n, s.m, s.density) == (shape, k, n, m, n / m)
    dense = s.to_dense()
    assert dense.dtype == jnp.dtype(dtype) and dense.shape == shape
    np.testing.assert_array_equal(_as_f32(dense), _as_f32(w))
    # Positions strictly ascending within each group; every nonzero sits at a kept position.
    pos = np.asarray(s.positions()).reshape(*lead, k // m, n, cols)
    assert np.all(np.diff(pos, axis=-2) > 0) and pos.min() >= 0 and pos.max() < m
    vals = _as_f32(s.values).reshape(*lead, k // m, n, cols)
    np.testing.assert_array_equal(
        np.take_along_axis(_as_f32(w).reshape(*lead, k // m, m, cols), pos, axis=-2), vals)
    # Bytes: values + packed meta, b bits per kept value.
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    n_kept = int(np.prod(lead, dtype=int)) * kept * cols
    expect = n_kept * itemsize + n_kept * meta_bits(m) // 8
    assert s.nbytes == expect == NMSparse.nbytes_for(shape, dtype, n, m)
    # jnp pack_meta agrees with the host packing.
    np.testing.assert_array_equal(np.asarray(pack_meta(s.positions(), n, m)), np.asarray(s.meta))


@pytest.mark.parametrize("n,m", NM_PATTERNS)
def test_every_pattern_packs_exactly(n, m):
    """Column c of W holds the c-th n-subset of {0..m-1} in every group; meta checked bit by bit."""
    patterns = list(itertools.combinations(range(m), n))  # 6 for 2:4, 4, 28, 70
    k = nm_k_multiple(n, m)
    groups, per_word, bits = k // m, values_per_word(m), meta_bits(m)
    w = np.zeros((k, len(patterns)), np.float32)
    for c, pat in enumerate(patterns):
        for g in range(groups):
            for s, p in enumerate(pat):
                w[g * m + p, c] = 1 + g * n + s + 100 * c  # distinct, nonzero
    sp = NMSparse.from_dense(w, n=n, m=m)
    words = np.asarray(sp.meta).view(np.uint32)
    chex.assert_shape(words, (groups * n // per_word, len(patterns)))
    for c, pat in enumerate(patterns):
        positions = [p for _ in range(groups) for p in pat]
        expect = [sum(positions[i * per_word + j] << (bits * j) for j in range(per_word))
                  for i in range(len(positions) // per_word)]
        np.testing.assert_array_equal(words[:, c], np.asarray(expect, np.uint64))
        np.testing.assert_array_equal(np.asarray(sp.values)[:, c],
                                      1 + np.arange(groups * n) + 100 * c)
    np.testing.assert_array_equal(np.asarray(sp.to_dense()), w)
    pos = np.asarray(unpack_meta(sp.meta, n, m))
    np.testing.assert_array_equal(pos, np.asarray([[p for _ in range(groups) for p in pat]
                                                   for pat in patterns]).T)
    if (n, m) == (2, 4):  # pattern (2, 3) in the last slot of a word sets bit 31
        assert np.asarray(sp.meta)[0, patterns.index((2, 3))] < 0


@pytest.mark.parametrize("n,m,column,positions", [
    (2, 4, [0, 0, 5, 0], [0, 2]),   # one nonzero at 2: pad with the lowest unused (0)
    (2, 4, [7, 0, 0, 0], [0, 1]),
    (2, 4, [0, 0, 0, 7], [0, 3]),
    (2, 4, [0, 0, 0, 0], [0, 1]),
    (4, 8, [0, 0, 0, 1, 0, 2, 0, 0], [0, 1, 3, 5]),
    (2, 8, [0, 0, 0, 0, 0, 0, 0, 3], [0, 7]),
    (1, 4, [0, 0, 0, 0], [0]),
])
def test_short_groups_pad_at_lowest_unused_positions(n, m, column, positions):
    k = nm_k_multiple(n, m)
    w = np.tile(np.asarray(column, np.float32), k // m)[:, None]
    sp = NMSparse.from_dense(w, n=n, m=m)
    np.testing.assert_array_equal(np.asarray(sp.positions())[:n, 0], positions)
    np.testing.assert_array_equal(np.asarray(sp.to_dense()), w)


def test_nm_stack_slices_and_jit(rng):
    w = _nm_pruned(rng, (3, 64, 16), 2, 4, ml_dtypes.bfloat16)
    stack = NMSparse.from_dense(w)
    one = jax.tree.map(lambda a: a[1], stack)
    assert isinstance(one, NMSparse) and one.shape == (64, 16)
    single = NMSparse.from_dense(w[1])
    chex.assert_trees_all_equal(one, single)
    dense = jax.jit(lambda s: s.to_dense())(stack)
    np.testing.assert_array_equal(_as_f32(dense), _as_f32(w))


def test_nm_2of4_bf16_costs_0_5625_of_dense():
    shape = (4096, 14336)
    ratio = NMSparse.nbytes_for(shape, jnp.bfloat16, 2, 4) / (4096 * 14336 * 2)
    assert ratio == 0.5625
    assert NMSparse.nbytes_for(shape, jnp.bfloat16, 1, 4) / (4096 * 14336 * 2) == 0.28125
    assert NMSparse.nbytes_for(shape, jnp.bfloat16, 2, 8) / (4096 * 14336 * 2) == 0.3125
    assert NMSparse.nbytes_for(shape, jnp.bfloat16, 4, 8) / (4096 * 14336 * 2) == 0.625


def _nm_bad_group() -> np.ndarray:
    w = np.zeros((2, 32, 8), np.float32)
    w[1, 8:11, 5] = 1.0  # 3 nonzeros in group 2 of matrix 1, column 5
    w[1, 20:23, 6] = 1.0  # a later offender, not named
    return w


@pytest.mark.parametrize("w,kwargs,match", [
    (_nm_bad_group(), {},
     r"not 2:4 along K: matrix w\[1\], rows 8..11 \(group 2\), column 5 has 3 nonzeros, at most 2"),
    (np.eye(64, 4, dtype=np.float32) + np.eye(64, 4, -1, dtype=np.float32), dict(n=1, m=4),
     r"not 1:4 along K: rows 0..3 \(group 0\), column 0 has 2 nonzeros"),
    (np.zeros((16, 4), np.float32), {}, "K=16 must be a multiple of 32 for 2:4"),
    (np.zeros((30, 4), np.float32), dict(n=4, m=8), "K=30 must be a multiple of 16 for 4:8"),
    (np.zeros((32, 4), np.float32), dict(n=1, m=4), "K=32 must be a multiple of 64 for 1:4"),
    (np.zeros((32, 4), np.float64), {}, r"dtype must be one of .* got float64"),
    (np.zeros((32, 4), np.int32), {}, r"dtype must be one of .* got int32"),
    (np.zeros((32,), np.float32), {}, "at least 2 dims"),
    (np.zeros((32, 4), np.float32), dict(n=3, m=4), r"\(n, m\) must be one of"),
    (np.zeros((32, 4), np.float32), dict(n=2, m=16), r"\(n, m\) must be one of"),
])
def test_nm_bad_input_raises(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NMSparse.from_dense(w, **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_non_finite_weights_raise(bad, dtype):
    w = np.zeros((2, 32, 4), np.float32)
    w[1, 3, 2] = bad
    w = w.astype(DTYPES[dtype])
    with pytest.raises(ValueError, match=r"must be finite; got .* at index \(1, 3, 2\)"):
        NMSparse.from_dense(w)
    with pytest.raises(ValueError, match=r"must be finite; got .* at index \(1, 3, 2\)"):
        SamoyedsSparse.from_dense(np.zeros((2, 32, 4), w.dtype) + w, v=32)


def test_from_dense_under_jit_raises():
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda w: NMSparse.from_dense(w).values)(jnp.zeros((32, 4)))
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda w: SamoyedsSparse.from_dense(w).values)(jnp.zeros((128, 4)))


def test_unpack_meta_rejects_bad_pattern():
    with pytest.raises(ValueError, match=r"\(n, m\) must be one of"):
        unpack_meta(jnp.zeros((1, 4), jnp.int32), 3, 8)


# ----------------------------------------------------------------------------------- Samoyeds

_SAMOYEDS_CASES = [
    # (n_sel, m_sel, v), dtype, dense shape
    ((1, 2, 128), "bfloat16", (256, 6)),
    ((1, 2, 128), "float32", (3, 128, 2)),
    ((1, 2, 128), "float16", (2, 2, 128, 10)),
    ((1, 2, 32), "bfloat16", (96, 34)),
    ((1, 4, 64), "float32", (128, 12)),
    ((2, 4, 32), "bfloat16", (2, 64, 8)),
    ((3, 3, 32), "float16", (32, 9)),
]


def test_bucket_pads_to_multiples_of_256():
    assert [nm_encode.bucket(s, u) for s, u in [(6, 2), (256, 128), (1408, 128), (14336, 128),
                                               (768, 32), (96, 3)]] == [256, 256, 1536, 14336,
                                                                        768, 768]


@pytest.mark.parametrize("cls", [NMSparse, SamoyedsSparse])
def test_empty_stack_encodes_to_empty_arrays(cls):
    s = cls.from_dense(jnp.zeros((0, 2, 128, 8), jnp.bfloat16))
    assert s.shape == (0, 2, 128, 8) and s.values.shape[:2] == (0, 2)
    chex.assert_shape(s.to_dense(), (0, 2, 128, 8))


def test_shapes_in_one_bucket_share_one_program(rng):
    """16-bit dtypes and K, N inside one bucket: one compiled encoder, each result exact."""
    before = nm_encode._samoyeds_program._cache_size()
    for shape, dtype in [((128, 6), jnp.bfloat16), ((256, 10), jnp.float16),
                         ((2, 256, 130), jnp.bfloat16)]:
        w = _samoyeds_pruned(rng, shape, 1, 2, 128, dtype)
        s = SamoyedsSparse.from_dense(w)
        np.testing.assert_array_equal(_as_f32(s.to_dense()), _as_f32(w))
    assert nm_encode._samoyeds_program._cache_size() - before <= 1


@pytest.mark.parametrize("pattern,dtype,shape", _SAMOYEDS_CASES)
def test_samoyeds_round_trip_is_exact(rng, pattern, dtype, shape):
    n_sel, m_sel, v = pattern
    w = _samoyeds_pruned(rng, shape, n_sel, m_sel, v, DTYPES[dtype])
    s = SamoyedsSparse.from_dense(w, n_sel=n_sel, m_sel=m_sel, v=v)
    *lead, k, n_out = shape
    nc = n_out * n_sel // m_sel
    chex.assert_shape(s.values, (*lead, k // 2, nc))
    chex.assert_shape(s.meta, (*lead, k // 32, nc))
    chex.assert_shape(s.sel, (*lead, k // v, nc))
    chex.assert_type([s.meta, s.sel], [jnp.int32, jnp.int8])
    assert (s.shape, s.dtype, s.k, s.n_out) == (shape, jnp.dtype(dtype), k, n_out)
    assert s.density == n_sel / m_sel / 2
    np.testing.assert_array_equal(_as_f32(s.to_dense()), _as_f32(w))
    # sel: ascending inside a group, in range; Wc = W at the dense columns, 2:4 as NMSparse.
    sel = np.asarray(s.sel).reshape(*lead, k // v, nc // n_sel, n_sel)
    assert np.all(np.diff(sel, axis=-1) > 0) and sel.min() >= 0 and sel.max() < m_sel
    cols = np.asarray(s.dense_columns())  # [..., K/v, Nc]
    np.testing.assert_array_equal(cols, (np.arange(nc) // n_sel * m_sel) + np.asarray(s.sel))
    wc = np.take_along_axis(_as_f32(w), np.repeat(cols, v, axis=-2), axis=-1)  # [..., K, Nc]
    np.testing.assert_array_equal(_as_f32(s.nm.to_dense()), wc)
    ref = NMSparse.from_dense(wc)
    np.testing.assert_array_equal(np.asarray(s.meta), np.asarray(ref.meta))
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    mats = int(np.prod(lead, dtype=int))
    expect = mats * (k // 2 * nc * itemsize + k // 32 * nc * 4 + k // v * nc)
    assert s.nbytes == expect == SamoyedsSparse.nbytes_for(shape, dtype, n_sel, m_sel, v)


def test_samoyeds_sel_takes_nonzero_columns_then_lowest_unused():
    k, v = 64, 32
    w = np.zeros((k, 8), np.float32)  # 1:2 -> groups (0,1) (2,3) (4,5) (6,7)
    w[0, 1] = 1.0        # slab 0, group 0: column 1
    w[40, 6] = 2.0       # slab 1, group 3: column 6
    w[33, 5] = 3.0       # slab 1, group 2: column 5
    s = SamoyedsSparse.from_dense(w, v=v)
    np.testing.assert_array_equal(np.asarray(s.sel), [[1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(np.asarray(s.to_dense()), w)
    w4 = np.zeros((32, 8), np.float32)  # 2:4 -> groups (0..3) (4..7)
    w4[0, 2] = 1.0       # group 0: only offset 2 -> (0, 2)
    w4[0, 4] = 1.0
    w4[1, 7] = 1.0       # group 1: offsets 0 and 3
    s4 = SamoyedsSparse.from_dense(w4, n_sel=2, m_sel=4, v=32)
    np.testing.assert_array_equal(np.asarray(s4.sel), [[0, 2, 0, 3]])
    np.testing.assert_array_equal(np.asarray(s4.to_dense()), w4)


def test_samoyeds_1_2_128_is_25_percent_dense():
    shape = (4096, 14336)
    s_bytes = SamoyedsSparse.nbytes_for(shape, jnp.bfloat16)
    values = 4096 // 2 * 7168 * 2
    assert s_bytes == values + 4096 // 32 * 7168 * 4 + 4096 // 128 * 7168
    assert SamoyedsSparse.nbytes_for((8, *shape), jnp.bfloat16) == 8 * s_bytes


def test_samoyeds_stack_slices_and_jit(rng):
    w = _samoyeds_pruned(rng, (2, 128, 4), 1, 2, 128, ml_dtypes.bfloat16)
    stack = SamoyedsSparse.from_dense(w)
    one = jax.tree.map(lambda a: a[1], stack)
    chex.assert_trees_all_equal(one, SamoyedsSparse.from_dense(w[1]))
    np.testing.assert_array_equal(_as_f32(jax.jit(lambda s: s.to_dense())(stack)), _as_f32(w))


def _samoyeds_two_columns() -> np.ndarray:
    w = np.zeros((2, 256, 8), np.float32)
    w[1, 130, 4] = 1.0
    w[1, 200, 5] = 1.0  # matrix 1, slab 1, group 2: columns 4 and 5 both used
    return w


def _samoyeds_not_24() -> np.ndarray:
    w = np.zeros((128, 4), np.float32)
    w[36:39, 3] = 1.0  # column 3 (kept, group 1) has 3 nonzeros in rows 36..39
    return w


@pytest.mark.parametrize("w,kwargs,match", [
    (_samoyeds_two_columns(), {},
     r"not 1:2:128 column-selected: matrix w\[1\], slab 1 \(rows 128..255\), column group 2 "
     r"\(columns 4..5\) has 2 nonzero columns \(offsets \[0, 1\]\), at most 1"),
    (_samoyeds_not_24(), {},
     r"not 2:4 along K: slab 0, rows 36..39, column 3 \(compressed column 1\) has 3 nonzeros"),
    (np.zeros((96, 4), np.float32), {}, "K=96 must be a multiple of v=128"),
    (np.zeros((128, 5), np.float32), {}, "N=5 must be a multiple of m_sel=2"),
    (np.zeros((128, 4), np.float32), dict(v=48), "v must be a multiple of 32"),
    (np.zeros((128, 4), np.float32), dict(n_sel=3, m_sel=2), "n_sel <= m_sel"),
    (np.zeros((128, 4), np.float32), dict(n_sel=0), "n_sel must be a positive int"),
    (np.zeros((128, 4), np.float64), {}, r"dtype must be one of .* got float64"),
    (np.zeros((128,), np.float32), {}, "at least 2 dims"),
])
def test_samoyeds_bad_input_raises(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamoyedsSparse.from_dense(w, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_negative_zero_counts_as_zero(dtype):
    w = np.tile(np.asarray([-0.0, 1.0, -0.0, 2.0], np.float32), 8)[:, None].astype(DTYPES[dtype])
    sp = NMSparse.from_dense(w)
    np.testing.assert_array_equal(np.asarray(sp.positions())[:2, 0], [1, 3])
    np.testing.assert_array_equal(_as_f32(sp.to_dense()), _as_f32(w))

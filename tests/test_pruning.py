"""Pruning: patterns checked with numpy group counts; scores, ties, bad input, prune_experts."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samoyeds_jax import prune_weights, pruning

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _np(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32))


def _nm_counts(p: np.ndarray, m: int) -> np.ndarray:
    """Nonzeros per (group of m rows along K, column): [..., K/m, N]."""
    *lead, k, n = p.shape
    return np.count_nonzero(p.reshape(*lead, k // m, m, n), axis=-2)


def _samoyeds_cols(p: np.ndarray, v: int, m_sel: int) -> np.ndarray:
    """Columns with any nonzero per (slab, column group): [..., K/V, N/m_sel]."""
    *lead, k, n = p.shape
    used = np.any(p.reshape(*lead, k // v, v, n) != 0, axis=-2)  # [..., K/V, N]
    return used.reshape(*lead, k // v, n // m_sel, m_sel).sum(-1)


def _random_weight(rng, shape, dtype=jnp.float32):
    # Nonzero, distinct magnitudes: every pattern count is then exact, not just an upper bound.
    w = rng.standard_normal(shape).astype(np.float32)
    w = np.where(np.abs(w) < 1e-3, 1e-3, w)
    return jnp.asarray(w, dtype)


# ---------------------------------------------------------------------------- N:M


@pytest.mark.parametrize("n,m,dtype", [(n, m, jnp.float32) for n, m in prune_weights.SUPPORTED_NM]
                         + [(2, 4, jnp.bfloat16), (2, 4, jnp.float16)])
def test_nm_pattern_and_values(rng, n, m, dtype):
    w = _random_weight(rng, (2, 8 * m, 24), dtype)
    p = prune_weights.prune_nm(w, n=n, m=m)
    assert p.dtype == w.dtype and p.shape == w.shape
    pn, wn = _np(p), _np(w)
    np.testing.assert_array_equal(_nm_counts(pn, m), n)
    kept = pn != 0
    np.testing.assert_array_equal(pn[kept], wn[kept])  # kept entries are untouched


def test_nm_keeps_the_highest_scores(rng):
    w = _random_weight(rng, (32, 16))
    p = _np(prune_weights.prune_nm(w, n=2, m=4))
    a = np.abs(_np(w)).reshape(8, 4, 16)
    kept = (p != 0).reshape(8, 4, 16)
    min_kept = np.where(kept, a, np.inf).min(axis=1)
    max_dropped = np.where(kept, -np.inf, a).max(axis=1)
    assert np.all(min_kept > max_dropped)


def test_nm_ties_keep_lower_rows_deterministically():
    w = jnp.ones((8, 3), jnp.float32)
    p = _np(prune_weights.prune_nm(w, n=2, m=4))
    expected = np.tile(np.array([1, 1, 0, 0], np.float32)[:, None], (2, 3))
    np.testing.assert_array_equal(p, expected)
    np.testing.assert_array_equal(_np(prune_weights.prune_nm(w, n=2, m=4)), p)


def test_nm_custom_score_overrides_magnitude():
    w = jnp.asarray([[4.0], [3.0], [2.0], [1.0]])
    score = jnp.asarray([[0.0], [0.0], [1.0], [2.0]])
    p = _np(prune_weights.prune_nm(w, n=2, m=4, score=score))
    np.testing.assert_array_equal(p[:, 0], [0, 0, 2, 1])


def test_nm_is_idempotent(rng):
    w = _random_weight(rng, (16, 8), jnp.bfloat16)
    p = prune_weights.prune_nm(w, n=1, m=4)
    chex.assert_trees_all_equal(prune_weights.prune_nm(p, n=1, m=4), p)


# ---------------------------------------------------------------------------- Samoyeds


def _samoyeds_numpy(score: np.ndarray, n_sel: int, m_sel: int, v: int) -> np.ndarray:
    """Independent reference (argsort-based) of the Samoyeds keep-mask for one matrix [K, N]."""
    k, n = score.shape
    g = score.reshape(k // 4, 4, n)
    order = np.argsort(-g, axis=1, kind="stable")[:, :2, :]
    inner = np.zeros_like(g, bool)
    np.put_along_axis(inner, order, True, axis=1)
    inner = inner.reshape(k, n)
    slab = np.where(inner, score, 0).reshape(k // v, v, n).sum(1)  # [S, N]
    grp = slab.reshape(k // v, n // m_sel, m_sel)
    top = np.argsort(-grp, axis=-1, kind="stable")[..., :n_sel]
    cols = np.zeros_like(grp, bool)
    np.put_along_axis(cols, top, True, axis=-1)
    cols = np.repeat(cols.reshape(k // v, n), v, axis=0)
    return inner & cols


@pytest.mark.parametrize("n_sel,m_sel,v,dtype", [
    (1, 2, 128, jnp.float32), (2, 4, 64, jnp.float32), (1, 4, 32, jnp.float32),
    (1, 2, 32, jnp.bfloat16), (1, 2, 32, jnp.float16)])
def test_samoyeds_pattern(rng, dtype, n_sel, m_sel, v):
    w = _random_weight(rng, (3, 2 * v, 4 * m_sel), dtype)
    p = prune_weights.prune_samoyeds(w, n_sel=n_sel, m_sel=m_sel, v=v)
    assert p.dtype == w.dtype and p.shape == w.shape
    pn = _np(p)
    np.testing.assert_array_equal(_samoyeds_cols(pn, v, m_sel), n_sel)
    # Inside a kept column: 2:4 along K, exactly (weights have no zeros); dropped columns empty.
    counts = _nm_counts(pn, 4)  # [e, K/4, N]
    assert set(np.unique(counts)) <= {0, 2}
    *_, k, n = pn.shape
    assert np.count_nonzero(pn) == 3 * k * n * n_sel // (2 * m_sel)
    kept = pn != 0
    np.testing.assert_array_equal(pn[kept], _np(w)[kept])


def test_samoyeds_default_density_is_a_quarter(rng):
    w = _random_weight(rng, (256, 64))
    p = _np(prune_weights.prune_samoyeds(w))
    assert np.count_nonzero(p) == 256 * 64 // 4


def test_samoyeds_matches_numpy_reference_with_wanda(rng):
    w = _random_weight(rng, (2, 64, 16))
    x = rng.standard_normal((5, 64)).astype(np.float32) * rng.uniform(0.1, 10, 64)[None, :]
    score = prune_weights.wanda_score(w, jnp.asarray(x))
    p = _np(prune_weights.prune_samoyeds(w, v=32, score=score))
    for e in range(2):
        ref = _samoyeds_numpy(_np(score)[e], 1, 2, 32)
        np.testing.assert_array_equal(p[e] != 0, ref)


def test_samoyeds_selects_the_heavier_column_per_slab():
    # Slab 0: column 1 is heavier; slab 1: column 0 is heavier.
    w = np.ones((8, 2), np.float32)
    w[:4, 1] = 5.0
    w[4:, 0] = 5.0
    p = _np(prune_weights.prune_samoyeds(jnp.asarray(w), v=4))
    np.testing.assert_array_equal(p[:4, 0], 0)
    np.testing.assert_array_equal(p[4:, 1], 0)
    np.testing.assert_array_equal(p[:4, 1], [5, 5, 0, 0])  # 2:4 tie: lower rows
    np.testing.assert_array_equal(p[4:, 0], [5, 5, 0, 0])


def test_samoyeds_ties_keep_lower_columns():
    p = _np(prune_weights.prune_samoyeds(jnp.ones((32, 4)), v=32))
    assert np.all(p[:, 1] == 0) and np.all(p[:, 3] == 0)
    np.testing.assert_array_equal(p[:, 0], np.tile([1, 1, 0, 0], 8))


# ---------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("sparsity,dtype", [(0.0, jnp.float32), (0.7, jnp.float32),
                                            (0.95, jnp.float32), (0.5, jnp.bfloat16),
                                            (0.5, jnp.float16)])
def test_unstructured_counts_and_order(rng, sparsity, dtype):
    w = _random_weight(rng, (2, 24, 20), dtype)
    p = _np(prune_weights.prune_unstructured(w, sparsity=sparsity))
    n_keep = 24 * 20 - round(sparsity * 24 * 20)
    a = np.abs(_np(w))
    for e in range(2):
        kept = p[e] != 0
        assert kept.sum() == n_keep  # per matrix, not per stack
        if 0 < n_keep < kept.size:
            assert a[e][kept].min() >= a[e][~kept].max()


def test_unstructured_ties_keep_lower_flat_positions():
    p = _np(prune_weights.prune_unstructured(jnp.ones((4, 4)), sparsity=0.75))
    np.testing.assert_array_equal(p.reshape(-1), [1] * 4 + [0] * 12)


def test_unstructured_matches_stable_argsort_with_many_ties(rng):
    # Few distinct (also negative) scores: the threshold value is shared by many entries.
    score = rng.integers(-2, 3, size=(3, 16, 12)).astype(np.float32)
    score[1] = 1.0  # one matrix of all-equal scores
    for sparsity, select in ((0.3, "sort"), (0.5, "sort"), (0.99, "sort"), (0.5, "radix")):
        n_keep = 16 * 12 - round(sparsity * 16 * 12)
        # Large matrices take the radix-select path: run it here on a small one.
        got = _np(prune_weights._unstructured_mask(jnp.asarray(score), n_keep=n_keep,
                                                   select=select))
        for e in range(3):
            order = np.argsort(-score[e].reshape(-1), kind="stable")[:n_keep]
            expected = np.zeros(16 * 12, np.float32)
            expected[order] = 1.0
            np.testing.assert_array_equal(got[e].reshape(-1), expected)


def test_unstructured_radix_select_matches_sort(rng):
    score = jnp.asarray(rng.standard_normal((2, 64, 48)), jnp.float32)
    score = score.at[0, :8].set(0.25).at[0, 8:10].set(-0.0)  # ties and signed zeros
    for n_keep in (17, 3072):
        chex.assert_trees_all_equal(
            prune_weights._unstructured_mask(score, n_keep=n_keep, select="radix"),
            prune_weights._unstructured_mask(score, n_keep=n_keep, select="sort"))


def test_unstructured_keeps_nothing_when_rounding_says_so():
    p = prune_weights.prune_unstructured(jnp.ones((1, 1)), sparsity=0.6)
    np.testing.assert_array_equal(_np(p), [[0.0]])


def test_unstructured_zero_sign_ties():
    score = jnp.asarray([[-0.0, 0.0], [0.0, 1.0]])
    p = _np(prune_weights.prune_unstructured(jnp.ones((2, 2)), sparsity=0.5, score=score))
    np.testing.assert_array_equal(p, [[1, 0], [0, 1]])


def test_prune_under_jit_matches_eager(rng):
    w = _random_weight(rng, (2, 64, 8), jnp.bfloat16)
    for fn in (lambda a: prune_weights.prune_nm(a, n=2, m=4),
               lambda a: prune_weights.prune_samoyeds(a, v=32),
               lambda a: prune_weights.prune_unstructured(a, sparsity=0.75)):
        chex.assert_trees_all_equal(jax.jit(fn)(w), fn(w))


# ---------------------------------------------------------------------------- leading dims


@pytest.mark.parametrize("fn", [
    lambda w: prune_weights.prune_nm(w, n=2, m=8),
    lambda w: prune_weights.prune_samoyeds(w, v=32),
    lambda w: prune_weights.prune_unstructured(w, sparsity=0.6),
])
def test_leading_dims_prune_each_matrix(rng, fn):
    w = _random_weight(rng, (2, 3, 64, 8))
    p = fn(w)
    for i in range(2):
        for j in range(3):
            chex.assert_trees_all_equal(p[i, j], fn(w[i, j]))


# ---------------------------------------------------------------------------- Wanda


def test_wanda_hand_checked():
    w = jnp.asarray([[4.0, -1.0], [3.0, 1.0], [2.0, -2.0], [1.0, 3.0]])  # [K=4, N=2]
    x = jnp.asarray([[0.1, 0.1, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])  # [t=2, K=4]
    score = prune_weights.wanda_score(w, x)
    np.testing.assert_allclose(_np(score), [[0.4, 0.1], [0.3, 0.1], [20.0, 20.0], [10.0, 30.0]],
                               rtol=1e-6)
    p_mag = _np(prune_weights.prune_nm(w, n=2, m=4))
    p_wanda = _np(prune_weights.prune_nm(w, n=2, m=4, score=score))
    np.testing.assert_array_equal(p_mag, [[4, 0], [3, 0], [0, -2], [0, 3]])
    np.testing.assert_array_equal(p_wanda, [[0, 0], [0, 0], [2, -2], [1, 3]])


def test_wanda_differs_from_magnitude_on_skewed_norms(rng):
    w = _random_weight(rng, (64, 32))
    x = rng.standard_normal((16, 64)).astype(np.float32) * np.geomspace(1e-2, 1e2, 64)[None, :]
    score = prune_weights.wanda_score(w, jnp.asarray(x))
    for prune in (lambda s: prune_weights.prune_nm(w, score=s),
                  lambda s: prune_weights.prune_samoyeds(w, v=32, score=s),
                  lambda s: prune_weights.prune_unstructured(w, sparsity=0.5, score=s)):
        assert np.any((_np(prune(None)) != 0) != (_np(prune(score)) != 0))
    # Wanda keeps the high-norm channels: the pruned |w| * ||x_channel|| mass (the output
    # error on x without its cross-channel terms, which 16 random rows make noisy) is lower
    # than magnitude pruning's. Exact: 2:4 by score keeps each group's two largest scores.
    def pruned_mass(p):
        return float(np.sum(np.where(_np(p) == 0, _np(score), 0.0) ** 2))
    assert (pruned_mass(prune_weights.prune_nm(w, score=score))
            < pruned_mass(prune_weights.prune_nm(w)))


def test_wanda_per_expert_activations(rng):
    w = _random_weight(rng, (2, 8, 4))
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    score = prune_weights.wanda_score(w, x)
    for e in range(2):
        chex.assert_trees_all_close(score[e], prune_weights.wanda_score(w[e], x[e]), rtol=1e-6)
    shared = prune_weights.wanda_score(w, x[0])
    chex.assert_trees_all_close(shared[1], prune_weights.wanda_score(w[1], x[0]), rtol=1e-6)


# ---------------------------------------------------------------------------- bad input


def _nan_at(shape, where, value=np.nan):
    w = np.ones(shape, np.float32)
    w[where] = value
    return jnp.asarray(w)


@pytest.mark.parametrize("call,match", [
    (lambda: prune_weights.prune_nm(jnp.ones((6, 4)), n=2, m=4), r"K=6 .* multiple of m=4"),
    (lambda: prune_weights.prune_nm(jnp.ones((8, 4)), n=3, m=4), r"\(n, m\)=\(3, 4\).*2:4"),
    (lambda: prune_weights.prune_nm(jnp.ones((8, 4)), n=2, m=16), r"not a supported N:M"),
    (lambda: prune_weights.prune_nm(jnp.ones((8,))), r"ndim >= 2.*\(8,\)"),
    (lambda: prune_weights.prune_nm(jnp.ones((8, 4), jnp.int32)), r"floating dtype.*int32"),
    (lambda: prune_weights.prune_nm(_nan_at((8, 4), (5, 2))), r"finite.*nan at index \(5, 2\)"),
    (lambda: prune_weights.prune_nm(_nan_at((2, 8, 4), (1, 0, 3), np.inf)),
     r"finite.*inf at index \(1, 0, 3\)"),
    (lambda: prune_weights.prune_nm(jnp.ones((8, 4)), score=jnp.ones((4, 8))),
     r"expected \(8, 4\), given score.shape=\(4, 8\)"),
    (lambda: prune_weights.prune_nm(jnp.ones((8, 4)), score=_nan_at((8, 4), (0, 0))),
     r"score must be finite"),
    (lambda: prune_weights.prune_nm(jnp.ones((8, 4)), n=2.0, m=4),
     r"n must be an int; given n=2.0"),
    (lambda: prune_weights.prune_samoyeds(jnp.ones((96, 4)), v=64), r"K=96 .* multiple of v=64"),
    (lambda: prune_weights.prune_samoyeds(jnp.ones((128, 3))), r"N=3 .* multiple of m_sel=2"),
    (lambda: prune_weights.prune_samoyeds(jnp.ones((128, 4)), v=30), r"v=30 must be a positive"),
    (lambda: prune_weights.prune_samoyeds(jnp.ones((128, 4)), n_sel=3, m_sel=2), r"n_sel=3"),
    (lambda: prune_weights.prune_samoyeds(_nan_at((128, 4), (100, 1), -np.inf)),
     r"-inf at index \(100, 1\)"),
    (lambda: prune_weights.prune_unstructured(jnp.ones((4, 4)), sparsity=1.0),
     r"sparsity=1.0.*\[0, 1\)"),
    (lambda: prune_weights.prune_unstructured(jnp.ones((4, 4)), sparsity=-0.1), r"sparsity=-0.1"),
    (lambda: prune_weights.prune_unstructured(jnp.ones((4, 4)), sparsity=float("nan")),
     r"sparsity=nan"),
    (lambda: prune_weights.wanda_score(jnp.ones((8, 4)), jnp.ones((3, 5))),
     r"must be \[t, 8\].*given x.shape=\(3, 5\)"),
    (lambda: prune_weights.wanda_score(jnp.ones((2, 8, 4)), jnp.ones((3, 3, 8))),
     r"\[t, 8\] or \[2, 't', 8\]"),
    (lambda: prune_weights.wanda_score(jnp.ones((8, 4)), _nan_at((3, 8), (2, 7))),
     r"x must be finite.*\(2, 7\)"),
    (lambda: pruning.PruneConfig(format="2:4"), r"format='2:4' must be one of"),
    (lambda: pruning.PruneConfig(format="nm", method="obs"), r"method='obs'"),
    (lambda: pruning.PruneConfig(format="nm", n=1, m=2), r"\(n, m\)=\(1, 2\)"),
    (lambda: pruning.PruneConfig(format="unstructured", sparsity=1.5), r"sparsity=1.5"),
    (lambda: pruning.PruneConfig(format="samoyeds", v=16), r"v must be a multiple of 32 .*got v=16; use output=.dense."),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------- round trips


def _round_trip_weight(rng, shape, dtype, zero_fraction):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < zero_fraction] = 0.0  # exact zeros: groups with fewer than n nonzeros
    return jnp.asarray(w, dtype)


def _random_lead(rng):
    return [(), (2,), (2, 3)][rng.integers(3)]


_F32, _BF16, _F16 = jnp.float32, jnp.bfloat16, jnp.float16


@pytest.mark.parametrize("config,dtype", [
    (pruning.PruneConfig(format="nm", n=2, m=4), _F32),
    (pruning.PruneConfig(format="nm", n=2, m=4), _BF16),
    (pruning.PruneConfig(format="nm", n=2, m=4), _F16),
    (pruning.PruneConfig(format="nm", n=1, m=4), _F32),
    (pruning.PruneConfig(format="nm", n=2, m=8), _BF16),
    (pruning.PruneConfig(format="nm", n=4, m=8), _F16),
    (pruning.PruneConfig(format="samoyeds", v=32), _F32),
    (pruning.PruneConfig(format="samoyeds", v=32), _BF16),
    (pruning.PruneConfig(format="samoyeds", v=64), _F16),
    (pruning.PruneConfig(format="samoyeds", n_sel=1, m_sel=4, v=64), _BF16),
    (pruning.PruneConfig(format="unstructured", sparsity=0.8), _F32),
    (pruning.PruneConfig(format="unstructured", sparsity=0.5, tile_k=32, tile_n=4), _BF16),
    (pruning.PruneConfig(format="unstructured", sparsity=0.9), _F16),
], ids=lambda c: (f"{c.format}-{c.n}:{c.m}-{c.n_sel}:{c.m_sel}:{c.v}-{c.sparsity}"
                  if isinstance(c, pruning.PruneConfig) else jnp.dtype(c).name))
def test_round_trip_exact(rng, dtype, config):
    m_sel = config.m_sel if config.format == "samoyeds" else 4
    k = 64 * int(rng.integers(1, 4))
    n = m_sel * int(rng.integers(1, 7))
    shape = _random_lead(rng) + (k, n)
    w = _round_trip_weight(rng, shape, dtype, zero_fraction=rng.choice([0.0, 0.6]))
    p = config.prune(w)
    c = pruning.convert(p, config)
    assert c.shape == p.shape and c.dtype == p.dtype
    chex.assert_trees_all_equal(c.to_dense(), p)


def test_convert_rejects_unpruned_weights(rng):
    w = _random_weight(rng, (64, 8))
    with pytest.raises(ValueError, match=r"not 2:4"):
        pruning.convert(w, pruning.PruneConfig(format="nm"))
    with pytest.raises(ValueError, match=r"column"):
        pruning.convert(w, pruning.PruneConfig(format="samoyeds", v=32))


# ---------------------------------------------------------------------------- prune_experts


def _model(rng, *, layers=2, e=2, d=64, f=96, dtype=jnp.float32):
    return {
        "embed": jnp.asarray(rng.standard_normal((16, d)), dtype),
        "layers": {i: {
            "attn": {"wq": _random_weight(rng, (d, d), dtype)},
            "router": _random_weight(rng, (d, e), dtype),
            "w1": _random_weight(rng, (e, d, f), dtype),
            "w3": _random_weight(rng, (e, d, f), dtype),
            "w2": _random_weight(rng, (e, f, d), dtype),
        } for i in range(layers)},
    }


REPORT_KEYS = {"path", "shape", "dtype", "format", "density", "weight_rel_error",
               "output_rel_error", "dense_bytes", "stored_bytes", "matrix_weight_rel_errors",
               "fallback_matrices"}


@pytest.mark.parametrize("fmt,density", [("nm", 0.5), ("samoyeds", 0.25), ("unstructured", 0.3),
                                         ("dense", 1.0)])
def test_prune_experts_report(rng, fmt, density):
    params = _model(rng)
    config = pruning.PruneConfig(format=fmt, v=32, sparsity=0.7, output="dense")
    out, report = pruning.prune_experts(params, config, progress=False)
    expected_paths = {f"layers/{i}/{n}" for i in range(2) for n in ("w1", "w2", "w3")}
    assert set(report.layers) == expected_paths
    d = report.as_dict()
    assert set(d) == {"config", "layers", "summary"}
    for path, r in d["layers"].items():
        assert set(r) == REPORT_KEYS
        assert 0.0 <= r["weight_rel_error"] <= 1.0
        assert r["output_rel_error"] is None
        assert r["density"] == pytest.approx(density, abs=1e-3)
        assert (r["weight_rel_error"] == 0.0) == (fmt == "dense")
        errs = r["matrix_weight_rel_errors"]
        assert len(errs) == 2 and all(0.0 <= x <= 1.0 for x in errs)
        assert min(errs) - 1e-6 <= r["weight_rel_error"] <= max(errs) + 1e-6
    assert set(d["summary"]) >= {"dense_bytes", "stored_bytes", "mean_weight_rel_error"}
    # Untouched leaves stay; pruned ones are what the single-matrix functions give.
    chex.assert_trees_all_equal(out["embed"], params["embed"])
    chex.assert_trees_all_equal(out["layers"][1]["attn"]["wq"], params["layers"][1]["attn"]["wq"])
    chex.assert_trees_all_equal(out["layers"][0]["w2"], config.prune(params["layers"][0]["w2"]))
    assert "layers/0/w1" in report.table()
    w1, p1 = _np(params["layers"][0]["w1"]), _np(out["layers"][0]["w1"])
    expected = [np.linalg.norm(w1[e] - p1[e]) / np.linalg.norm(w1[e]) for e in range(2)]
    np.testing.assert_allclose(report.layers["layers/0/w1"].matrix_weight_rel_errors, expected,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(report.layers["layers/0/w1"].weight_rel_error,
                               np.linalg.norm(w1 - p1) / np.linalg.norm(w1), rtol=1e-5, atol=1e-7)


def test_prune_experts_wanda_with_calibration(rng):
    params = _model(rng, layers=1)
    x = rng.standard_normal((7, 64)).astype(np.float32) * rng.uniform(0.05, 20, 64)[None, :]
    calibration = {"layers/0": jnp.asarray(x)}
    cfg_w = pruning.PruneConfig(format="nm", method="wanda", output="dense")
    cfg_m = pruning.PruneConfig(format="nm", method="magnitude", output="dense")
    out_w, rep_w = pruning.prune_experts(params, cfg_w, calibration, progress=False)
    _, rep_m = pruning.prune_experts(params, cfg_m, calibration, progress=False)
    for path in ("layers/0/w1", "layers/0/w3", "layers/0/w2"):
        for rep in (rep_w, rep_m):
            r = rep.layers[path]
            assert 0.0 <= r.weight_rel_error <= 1.0
            assert r.output_rel_error is not None and 0.0 <= r.output_rel_error <= 1.0
    # w1 sees x directly: Wanda gives the lower output error there.
    err_w = rep_w.layers["layers/0/w1"].output_rel_error
    assert err_w < rep_m.layers["layers/0/w1"].output_rel_error
    expected_w1 = prune_weights.prune_nm(params["layers"][0]["w1"],
                                   score=prune_weights.wanda_score(params["layers"][0]["w1"], x))
    chex.assert_trees_all_equal(out_w["layers"][0]["w1"], expected_w1)
    assert rep_w.mean_output_rel_error is not None
    # Output errors against numpy: w1 sees x, w2 sees silu(x p1) * (x p3) of the pruned w1, w3.
    w1, w3, w2 = (_np(params["layers"][0][n]) for n in ("w1", "w3", "w2"))
    p1, p2 = _np(out_w["layers"][0]["w1"]), _np(out_w["layers"][0]["w2"])
    p3 = _np(out_w["layers"][0]["w3"])
    y1, dy1 = np.einsum("td,edf->etf", x, w1), np.einsum("td,edf->etf", x, w1 - p1)
    np.testing.assert_allclose(rep_w.layers["layers/0/w1"].output_rel_error,
                               np.linalg.norm(dy1) / np.linalg.norm(y1), rtol=1e-4)
    g1 = np.einsum("td,edf->etf", x, p1)
    h = g1 / (1 + np.exp(-g1)) * np.einsum("td,edf->etf", x, p3)
    y2, dy2 = np.einsum("etf,efd->etd", h, w2), np.einsum("etf,efd->etd", h, w2 - p2)
    np.testing.assert_allclose(rep_w.layers["layers/0/w2"].output_rel_error,
                               np.linalg.norm(dy2) / np.linalg.norm(y2), rtol=1e-4)


def test_prune_experts_select_and_per_weight_calibration(rng):
    params = _model(rng, layers=1)
    xq = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    select = lambda p, a: pruning.is_expert_weight(p, a) or p.endswith("/wq")  # noqa: E731
    config = pruning.PruneConfig(format="unstructured", sparsity=0.5, method="magnitude",
                                 output="dense")
    out, report = pruning.prune_experts(params, config, {"layers/0/attn/wq": xq}, select=select,
                                        progress=True)
    assert "layers/0/attn/wq" in report.layers
    assert report.layers["layers/0/attn/wq"].output_rel_error is not None
    assert np.count_nonzero(_np(out["layers"][0]["attn"]["wq"])) == 64 * 64 // 2


@pytest.mark.parametrize("fmt", ["nm", "samoyeds", "unstructured"])
def test_prune_experts_compressed(rng, fmt):
    params = _model(rng, layers=1, dtype=jnp.bfloat16)
    dense_cfg = pruning.PruneConfig(format=fmt, v=32, output="dense")
    comp_cfg = pruning.PruneConfig(format=fmt, v=32, output="compressed")
    dense, _ = pruning.prune_experts(params, dense_cfg, progress=False)
    comp, report = pruning.prune_experts(params, comp_cfg, progress=False)
    for name in ("w1", "w2", "w3"):
        obj = comp["layers"][0][name]
        assert not isinstance(obj, jax.Array)
        if fmt != "unstructured":  # (TiledSparse round trips: test_round_trip_exact)
            chex.assert_trees_all_equal(obj.to_dense(), dense["layers"][0][name])
        r = report.layers[f"layers/0/{name}"]
        assert r.stored_bytes == obj.nbytes and r.dense_bytes == params["layers"][0][name].nbytes
    if fmt != "unstructured":  # TiledSparse pads slots: its bytes depend on the draw
        assert report.stored_bytes < report.dense_bytes


def test_prune_experts_checks_every_shape_before_pruning(rng):
    params = _model(rng, layers=2, f=80)  # f=80: w2 has K=80, not a multiple of 32
    with pytest.raises(ValueError, match=r"K=80, .* multiple of 32 .*got 80"):
        pruning.prune_experts(params, pruning.PruneConfig(format="nm"), progress=False)
    with pytest.raises(ValueError, match=r"K=80 .* multiple of v=32"):
        pruning.prune_experts(params, pruning.PruneConfig(format="samoyeds", v=32),
                              progress=False)
    with pytest.raises(ValueError, match=r"K=80 must be a multiple of tile_k=64"):
        pruning.prune_experts(params, pruning.PruneConfig(format="unstructured", tile_k=64),
                              progress=False)


def test_prune_experts_bad_calibration(rng):
    params = _model(rng, layers=1)
    wanda = pruning.PruneConfig(format="nm", method="wanda", output="dense")
    with pytest.raises(ValueError, match=r"method='wanda' needs calibration.*layers/0/w1"):
        pruning.prune_experts(params, wanda, progress=False)
    with pytest.raises(ValueError, match=r"calibration keys \['layers/9'\] match no weight"):
        pruning.prune_experts(params, wanda, {"layers/9": jnp.ones((3, 64))}, progress=False)
    with pytest.raises(ValueError, match=r"calibration for 'layers/0/w1'.*given shape=\(3, 32\)"):
        pruning.prune_experts(params, wanda, {"layers/0": jnp.ones((3, 32))}, progress=False)
    bad = _model(rng, layers=1)
    bad["layers"][0]["w3"] = bad["layers"][0]["w3"].at[1, 2, 3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"layers/0/w3 must be finite.*\(1, 2, 3\)"):
        pruning.prune_experts(bad, pruning.PruneConfig(format="nm", output="dense"),
                              progress=False)


def test_prune_experts_nnx_state(rng):
    from flax import nnx

    class Experts(nnx.Module):
        def __init__(self):
            self.w1 = nnx.Param(_random_weight(rng, (2, 32, 8)))

    state = nnx.state(Experts())
    out, report = pruning.prune_experts(state, pruning.PruneConfig(format="nm", output="dense"),
                                        progress=False)
    assert list(report.layers) == ["w1"]
    assert math.isclose(report.layers["w1"].density, 0.5)

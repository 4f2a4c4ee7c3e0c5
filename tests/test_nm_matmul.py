"""nm_matmul / samoyeds_matmul (Pallas Triton, interpret mode on CPU) against their references."""

from __future__ import annotations

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decompress, nm_matmul as nmm, tuning

# --------------------------------------------------------------------------- test weights


def _prune_nm(w: np.ndarray, n: int, m: int):
    """Magnitude N:M along K. Returns (pruned dense, values [K*n/m, N], positions [K/m, n, N])."""
    k, cols = w.shape
    wg = w.reshape(k // m, m, cols)
    order = np.argsort(-np.abs(wg), axis=1, kind="stable")[:, :n, :]
    pos = np.sort(order, axis=1)  # ascending kept positions
    vals = np.take_along_axis(wg, pos, axis=1)  # [G, n, N]
    dense = np.zeros_like(wg)
    np.put_along_axis(dense, pos, vals, axis=1)
    return dense.reshape(k, cols), vals.reshape(k // m * n, cols), pos


def _pack_meta(pos: np.ndarray, m: int) -> np.ndarray:
    g, n, cols = pos.shape
    bits = decompress.meta_bits(m)
    per_word = 32 // bits
    flat = pos.reshape(g * n, cols).astype(np.uint64)
    r = np.arange(g * n)
    meta = np.zeros(((g * n) // per_word, cols), np.uint64)
    np.add.at(meta, r // per_word, flat << (bits * (r % per_word))[:, None].astype(np.uint64))
    return meta.astype(np.uint32).view(np.int32)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["values", "meta", "dense"], meta_fields=["n", "m", "k"])
@dataclasses.dataclass(frozen=True)
class _NM:
    values: jax.Array
    meta: jax.Array
    n: int
    m: int
    k: int
    dense: jax.Array

    def to_dense(self):
        return self.dense


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["values", "meta", "sel", "dense"],
                   meta_fields=["n_sel", "m_sel", "v", "k", "n_out"])
@dataclasses.dataclass(frozen=True)
class _Samoyeds:
    values: jax.Array
    meta: jax.Array
    sel: jax.Array
    n_sel: int
    m_sel: int
    v: int
    k: int
    n_out: int
    dense: jax.Array

    def to_dense(self):
        return self.dense


def make_nm(rng, k, n_cols, *, n=2, m=4, dtype=jnp.bfloat16):
    w = rng.standard_normal((k, n_cols)).astype(np.float32)
    dense, vals, pos = _prune_nm(w, n, m)
    return _NM(jnp.asarray(vals, dtype), jnp.asarray(_pack_meta(pos, m)), n, m, k,
               jnp.asarray(dense, dtype))


def make_samoyeds(rng, k, n_out, *, n_sel=1, m_sel=2, v=128, dtype=jnp.bfloat16):
    w = rng.standard_normal((k, n_out)).astype(np.float32)
    groups = n_out // m_sel
    # Keep the n_sel columns of each group with the largest slab norm, ascending.
    norms = np.sqrt((w.reshape(k // v, v, groups, m_sel) ** 2).sum(1))  # [S, G, m_sel]
    sel = np.sort(np.argsort(-norms, axis=-1, kind="stable")[..., :n_sel], axis=-1)  # [S, G, n_sel]
    sel = sel.reshape(k // v, groups * n_sel)
    dense_col = (np.arange(groups * n_sel) // n_sel)[None, :] * m_sel + sel  # [S, Nc]
    wc = np.take_along_axis(w.reshape(k // v, v, n_out), dense_col[:, None, :], axis=2)
    wc_pruned, vals, pos = _prune_nm(wc.reshape(k, -1), 2, 4)
    dense = np.zeros((k // v, v, n_out), np.float32)
    np.put_along_axis(dense, dense_col[:, None, :].repeat(v, 1),
                      wc_pruned.reshape(k // v, v, -1), axis=2)
    return _Samoyeds(jnp.asarray(vals, dtype), jnp.asarray(_pack_meta(pos, 4)),
                     jnp.asarray(sel, jnp.int8), n_sel, m_sel, v, k, n_out,
                     jnp.asarray(dense.reshape(k, n_out), dtype))


def _check_close(y, y_ref_f32, dtype):
    y = np.asarray(jnp.asarray(y, jnp.float32))
    ref = np.asarray(y_ref_f32, np.float32)
    assert np.isfinite(y).all(), "kernel left unwritten (NaN) or non-finite outputs"
    err = np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-6)
    tol = 1e-2 if jnp.dtype(dtype) == jnp.bfloat16 else 2e-3
    assert err < tol, f"relative error {err:.2e} >= {tol}"


def _x(rng, t, k, dtype):
    return jnp.asarray(rng.standard_normal((t, k)), dtype)


# --------------------------------------------------------------------------- 2:4 and N:M

# (t, K, N, config overrides): smallest legal K=32 (ragged K tile), N=16; N not a
# multiple of the column tile; split-K; several K steps.
NM_CASES = [
    (1, 32, 16, {}),
    (3, 64, 48, dict(block_n=32)),
    (33, 256, 64, dict(block_k=64, split_k=2)),
    (128, 128, 32, dict(block_t=64, block_k=64)),
    (3, 96, 32, dict(block_k=64)),
]


@pytest.mark.parametrize("t,k,n_cols,over", NM_CASES)
def test_nm_matmul_2of4(rng, t, k, n_cols, over):
    w = make_nm(rng, k, n_cols)
    x = _x(rng, t, k, jnp.bfloat16)
    cfg = nmm.heuristic_config(t, k, n_cols).replace(**over)
    y = nmm.nm_matmul(x, w, config=cfg, _poison_output=True)
    chex.assert_shape(y, (t, n_cols))
    chex.assert_type(y, jnp.bfloat16)
    _check_close(y, nmm.nm_matmul_reference(x, w, out_dtype=jnp.float32), jnp.bfloat16)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 8), (4, 8)])
def test_nm_matmul_other_patterns(rng, n, m):
    k, n_cols, t = 256, 32, 3
    w = make_nm(rng, k, n_cols, n=n, m=m)
    x = _x(rng, t, k, jnp.bfloat16)
    y = nmm.nm_matmul(x, w, config=nmm.SparseMatmulConfig(block_k=128, block_n=32),
                      _poison_output=True)
    _check_close(y, nmm.nm_matmul_reference(x, w, out_dtype=jnp.float32), jnp.bfloat16)


def test_nm_matmul_f16_out_f32(rng):
    w = make_nm(rng, 128, 32, dtype=jnp.float16)
    x = _x(rng, 5, 128, jnp.float16)
    y = nmm.nm_matmul(x, w, out_dtype=jnp.float32, _poison_output=True)
    chex.assert_type(y, jnp.float32)
    _check_close(y, nmm.nm_matmul_reference(x, w, out_dtype=jnp.float32), jnp.float16)


def test_meta_bit31_and_dense_method(rng):
    # All-ones positions at the top field set bit 31: arithmetic shifts must not leak.
    w = make_nm(rng, 64, 16)
    assert (np.asarray(w.meta) < 0).any() or True
    chex.assert_trees_all_equal(nmm.expand_nm(w.values, w.meta, n=2, m=4), w.dense)
    x = _x(rng, 3, 64, jnp.bfloat16)
    y = nmm.nm_matmul(x, w, config=nmm.SparseMatmulConfig(method="dense"))
    _check_close(y, nmm.nm_matmul_reference(x, w, out_dtype=jnp.float32), jnp.bfloat16)


def test_xla_backend_is_reference(rng):
    w = make_nm(rng, 64, 16)
    x = _x(rng, 2, 64, jnp.bfloat16)
    chex.assert_trees_all_equal(nmm.nm_matmul(x, w, backend="xla"),
                                nmm.nm_matmul_reference(x, w))


# --------------------------------------------------------------------------- Samoyeds

SAM_CASES = [
    (1, 128, 32, dict(), {}),
    (33, 256, 64, dict(), dict(block_k=256, split_k=1)),
    (3, 256, 96, dict(), dict(block_k=128, split_k=2, block_n=32)),
    (128, 128, 64, dict(n_sel=2, m_sel=4, v=64), dict(block_t=64, block_k=128, block_n=32)),
]


@pytest.mark.parametrize("t,k,n_out,fmt,over", SAM_CASES)
def test_samoyeds_matmul(rng, t, k, n_out, fmt, over):
    w = make_samoyeds(rng, k, n_out, **fmt)
    x = _x(rng, t, k, jnp.bfloat16)
    cfg = nmm.heuristic_config(t, k, n_out // 2).replace(**over)
    y = nmm.samoyeds_matmul(x, w, config=cfg, _poison_output=True)
    chex.assert_shape(y, (t, n_out))
    _check_close(y, nmm.samoyeds_matmul_reference(x, w, out_dtype=jnp.float32), jnp.bfloat16)


def test_samoyeds_dense_expansion(rng):
    w = make_samoyeds(rng, 256, 64, n_sel=2, m_sel=4, v=64)
    dense = nmm.expand_samoyeds(w.values, w.meta, w.sel, n_sel=2, m_sel=4, v=64)
    chex.assert_trees_all_equal(dense, w.dense)


# --------------------------------------------------------------------------- errors


def test_errors(rng):
    w = make_nm(rng, 64, 16)
    x = _x(rng, 2, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="K=128 but w has K=64"):
        nmm.nm_matmul(_x(rng, 2, 128, jnp.bfloat16), w)
    with pytest.raises(ValueError, match="x.dtype must be"):
        nmm.nm_matmul(x.astype(jnp.float32), w)
    with pytest.raises(ValueError, match="must equal x dtype"):
        nmm.nm_matmul(x.astype(jnp.float16), w)
    with pytest.raises(ValueError, match=r"x must be \[t, K\]"):
        nmm.nm_matmul(x[None], w)
    with pytest.raises(ValueError, match="block_n=24 must be a power of two"):
        nmm.nm_matmul(x, w, config=nmm.SparseMatmulConfig(block_n=24))
    with pytest.raises(ValueError, match="method"):
        nmm.nm_matmul(x, w, config=nmm.SparseMatmulConfig(method="sparse"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        nmm.nm_matmul(x, w, backend="cuda")  # type: ignore[arg-type]
    bad = dataclasses.replace(w, meta=w.meta[:1])
    with pytest.raises(ValueError, match="meta must be int32"):
        nmm.nm_matmul(x, bad)
    with pytest.raises(ValueError, match="unsupported N:M"):
        nmm.nm_matmul(x, dataclasses.replace(w, n=3))
    with pytest.raises(ValueError, match="block_k=32 must hold whole meta words"):
        decompress.check_block_k(32, n=1, m=4)
    s = make_samoyeds(rng, 64, 32, v=32)
    with pytest.raises(ValueError, match="power of two >= 64"):
        nmm.samoyeds_matmul(x, s)


def test_empty_tokens(rng):
    w = make_nm(rng, 64, 16)
    y = nmm.nm_matmul(jnp.zeros((0, 64), jnp.bfloat16), w)
    chex.assert_shape(y, (0, 16))


# --------------------------------------------------------------------------- tuning


def test_tuning_lookup_nearest(tmp_path, monkeypatch):
    data = {"nm_matmul_2of4": {"64x16": {"1": {"block_n": 16}, "64": {"block_n": 32}},
                               "*": {"8": {"block_n": 64}}}}
    (tmp_path / "fake_gpu.json").write_text(json.dumps(data))
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    tuning.clear_cache()
    try:
        assert tuning.lookup("nm_matmul_2of4", "Fake GPU", k=64, n=16, tokens=4) == {"block_n": 16}
        assert tuning.lookup("nm_matmul_2of4", "Fake GPU", k=64, n=16, tokens=16) == {"block_n": 32}
        assert tuning.lookup("nm_matmul_2of4", "Fake GPU", k=32, n=16, tokens=1) == {"block_n": 64}
        assert tuning.lookup("samoyeds", "Fake GPU", k=64, n=16, tokens=1) is None
        assert tuning.lookup("nm_matmul_2of4", "Other GPU", k=64, n=16, tokens=1) is None
    finally:
        tuning.clear_cache()

"""nm_matmul / samoyeds_matmul (Pallas Triton, interpret mode on CPU) against their references."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.nm_matmul as nmm
from pallas_kernels import decompress, formats, tuning

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


def make_nm(rng, k, n_cols, *, n=2, m=4, dtype=jnp.bfloat16) -> formats.NMSparse:
    w = rng.standard_normal((k, n_cols)).astype(np.float32)
    dense, _, _ = _prune_nm(w, n, m)
    return formats.NMSparse.from_dense(np.asarray(jnp.asarray(dense, dtype)), n=n, m=m)


def make_samoyeds(rng, k, n_out, *, n_sel=1, m_sel=2, v=128, dtype=jnp.bfloat16):
    w = rng.standard_normal((k, n_out)).astype(np.float32)
    groups = n_out // m_sel
    # Keep the n_sel columns of each group with the largest slab norm, then 2:4 inside.
    norms = np.sqrt((w.reshape(k // v, v, groups, m_sel) ** 2).sum(1))  # [S, G, m_sel]
    drop = np.argsort(norms, axis=-1, kind="stable")[..., : m_sel - n_sel]  # [S, G, m-n]
    keep = np.ones_like(norms, bool)
    np.put_along_axis(keep, drop, False, axis=-1)
    w = w * np.repeat(keep.reshape(k // v, 1, n_out), v, axis=1).reshape(k, n_out)
    dense, _, _ = _prune_nm(w, 2, 4)
    return formats.SamoyedsSparse.from_dense(np.asarray(jnp.asarray(dense, dtype)),
                                             n_sel=n_sel, m_sel=m_sel, v=v)


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
    (128, 128, 32, dict(block_t=64, block_k=64, load="expand")),
    (3, 96, 32, dict(block_k=64, load="expand")),
    (3, 256, 32, dict(block_k=128, load="split")),
    (33, 96, 48, dict(block_k=64, block_n=32, order="wx")),
    (3, 256, 64, dict(block_k=128, split_k=2, load="split", order="wx")),
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


def test_meta_bit31_and_densify_method(rng):
    # Kept positions {2, 3} everywhere: the top field of every word is 3, so bit 31 is set
    # and an arithmetic shift would smear it into the fields below.
    dense = rng.standard_normal((64, 16)).astype(np.float32)
    dense[0::4] = 0
    dense[1::4] = 0
    w = formats.NMSparse.from_dense(np.asarray(jnp.asarray(dense, jnp.bfloat16)))
    assert (np.asarray(w.meta) < 0).all()
    chex.assert_trees_all_equal(nmm.expand_nm_pallas(w.values, w.meta, n=2, m=4), w.to_dense())
    x = _x(rng, 3, 64, jnp.bfloat16)
    y = nmm.nm_matmul(x, w, _poison_output=True)
    _check_close(y, nmm.nm_matmul_reference(x, w, out_dtype=jnp.float32), jnp.bfloat16)
    y = nmm.nm_matmul(x, w, config=nmm.SparseMatmulConfig(method="densify"))
    _check_close(y, nmm.nm_matmul_reference(x, w, out_dtype=jnp.float32), jnp.bfloat16)


# --------------------------------------------------------------------------- Samoyeds

SAM_CASES = [
    (1, 128, 32, dict(), {}),
    (33, 256, 64, dict(), dict(block_k=256, split_k=1, load="expand")),
    (3, 256, 96, dict(), dict(block_k=128, split_k=2, block_n=32, load="split")),
    (128, 128, 64, dict(n_sel=2, m_sel=4, v=64), dict(block_t=64, block_k=128, block_n=32)),
    (3, 256, 96, dict(), dict(block_k=256, block_n=32, load="split", order="wx")),
]


@pytest.mark.parametrize("t,k,n_out,fmt,over", SAM_CASES)
def test_samoyeds_matmul(rng, t, k, n_out, fmt, over):
    w = make_samoyeds(rng, k, n_out, **fmt)
    x = _x(rng, t, k, jnp.bfloat16)
    cfg = nmm.heuristic_config(t, k, n_out // 2).replace(**over)
    y = nmm.samoyeds_matmul(x, w, config=cfg, _poison_output=True)
    chex.assert_shape(y, (t, n_out))
    _check_close(y, nmm.samoyeds_matmul_reference(x, w, out_dtype=jnp.float32), jnp.bfloat16)


@pytest.mark.parametrize("n_sel,m_sel,v", [(1, 2, 128), (2, 4, 64)])
def test_samoyeds_densify_method(rng, n_sel, m_sel, v):
    w = make_samoyeds(rng, 256, 64, n_sel=n_sel, m_sel=m_sel, v=v)
    x = _x(rng, 33, 256, jnp.bfloat16)
    y = nmm.samoyeds_matmul(x, w, config=nmm.SparseMatmulConfig(method="densify"))
    _check_close(y, nmm.samoyeds_matmul_reference(x, w, out_dtype=jnp.float32), jnp.bfloat16)


@pytest.mark.parametrize("n,m,k", [(4, 8, 128)])  # 2:4 runs in the bit-31 test
def test_expand_nm_pallas(rng, n, m, k):
    w = make_nm(rng, k, 48, n=n, m=m)
    chex.assert_trees_all_equal(
        nmm.expand_nm_pallas(w.values, w.meta, n=n, m=m, block_n=32), w.to_dense())


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
    with pytest.raises(ValueError, match="needs order='xw'"):
        nmm.nm_matmul(x, w, config=nmm.SparseMatmulConfig(load="expand", order="wx"))
    with pytest.raises(ValueError, match="method must be 'pallas' or 'densify'"):
        nmm.nm_matmul(x, w, config=nmm.SparseMatmulConfig(method="dense"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"NMSparse: meta must have shape"):
        dataclasses.replace(w, meta=w.meta[:1])
    with pytest.raises(TypeError, match="w must be an NMSparse"):
        nmm.nm_matmul(x, w.to_dense())
    with pytest.raises(ValueError, match="K=64 but w has K=128"):
        nmm.nm_matmul(x, make_nm(rng, 128, 16))
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


def test_stored_configs_are_valid():
    files = sorted(tuning.CONFIG_DIR.glob("*.json"))
    assert files, f"no tuned configs under {tuning.CONFIG_DIR}"
    for path in files:
        data = json.loads(path.read_text())
        for op, shapes in data.items():
            if not op.startswith(("nm_matmul_", "samoyeds_matmul_")):
                continue  # other kernels' entries
            for shape, entries in shapes.items():
                for t, cfg in entries.items():
                    fields = {k: v for k, v in cfg.items() if not k.startswith("_")}
                    nmm._check_config(nmm.SparseMatmulConfig(**fields))
                    assert int(t) >= 1, (path.name, op, shape, t)

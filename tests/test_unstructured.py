"""unstructured_matmul (Pallas interpret mode on CPU) against its pure-jnp reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import unstructured as U
from pallas_kernels.tiled_format import TiledBitmap, TiledSparse

K, N, TILE_K, TILE_N = 96, 64, 32, 16  # 3 K tiles x 4 column tiles
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def _weight(rng, dtype, sparsity=0.8):
    """A pruned [K, N] weight with an all-zero column tile and an all-zero K tile."""
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0.0
    w[:, TILE_N:2 * TILE_N] = 0.0         # column tile 1: every tile empty (cap 0)
    w[TILE_K:2 * TILE_K, 2 * TILE_N:] = 0.0  # K tile 1 of column tiles 2, 3: empty
    w[:, 0] = rng.standard_normal(K)        # one dense column: cap = tile_k
    return TiledSparse.from_dense(jnp.asarray(w, dtype), tile_k=TILE_K, tile_n=TILE_N)


_reference = jax.jit(functools.partial(U.unstructured_matmul_reference, out_dtype=jnp.float32))


def _check(y, x, w, out_dtype=None):
    ref = _reference(x, w)
    y = np.asarray(y.astype(jnp.float32))
    assert np.isfinite(y).all(), "unwritten (poisoned) outputs"
    tol = TOL[jnp.dtype(x.dtype if out_dtype is None else out_dtype).type]
    scale = float(jnp.max(jnp.abs(ref))) + 1e-6
    np.testing.assert_allclose(y, np.asarray(ref), rtol=tol, atol=tol * scale)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype"))
def _kernel(x, w, *, config, out_dtype=None):
    """The gather kernel with a NaN-filled output buffer aliased in: every element must
    be overwritten."""
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    t = x.shape[0]
    block_t = min(config.block_t, U._next_pow2(t))
    if isinstance(w, TiledBitmap):
        block_t = max(16, block_t)
    t_pad = -(-t // block_t) * block_t
    splits = config.k_splits
    acc = out_dtype if splits == 1 else jnp.float32
    init = jnp.full((splits, t_pad, w.n), jnp.nan, acc)
    fn = U._expand_matmul if isinstance(w, TiledBitmap) else U._gather_matmul
    return fn(x, w, config, out_dtype, out_init=init)


@pytest.mark.parametrize("tokens, config", [
    (1, U.UnstructuredConfig(block_t=1, chunk=8, k_splits=3)),
    (3, U.UnstructuredConfig(block_t=4, chunk=4, k_splits=1)),
    (33, U.UnstructuredConfig(block_t=16, chunk=8, k_splits=3, evict_first=False)),
    (128, U.UnstructuredConfig(block_t=16, chunk=16, k_splits=1)),
])
def test_matches_reference_bf16(rng, tokens, config):
    w = _weight(rng, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((tokens, K)), jnp.bfloat16)
    y = _kernel(x, w, config=config)
    assert y.shape == (tokens, N) and y.dtype == jnp.bfloat16
    _check(y, x, w)


@pytest.mark.parametrize("dtype, out_dtype", [(jnp.float16, jnp.float32),
                                              (jnp.float32, None)])
def test_matches_reference_other_dtypes(rng, dtype, out_dtype):
    w = _weight(rng, dtype, sparsity=0.95)
    x = jnp.asarray(rng.standard_normal((5, K)), dtype)
    config = U.UnstructuredConfig(block_t=8, chunk=8, k_splits=1)
    y = _kernel(x, w, config=config, out_dtype=out_dtype)
    assert y.dtype == (dtype if out_dtype is None else out_dtype)
    _check(y, x, w, out_dtype)


def test_public_entry_leading_dims_default_config(rng):
    w = _weight(rng, jnp.bfloat16, sparsity=0.5)
    x = jnp.asarray(rng.standard_normal((2, 1, K)), jnp.bfloat16)
    y = jax.jit(U.unstructured_matmul)(x, w)  # default config: gather, k_splits chosen
    assert y.shape == (2, 1, N)
    _check(y.reshape(2, N), x.reshape(2, K), w)


@pytest.mark.parametrize("tokens, dtype, config", [
    (1, jnp.bfloat16, U.UnstructuredConfig(method="expand", block_t=16, block_k=32,
                                           k_splits=3)),
    (33, jnp.float16, U.UnstructuredConfig(method="expand", block_t=32, block_k=32,
                                           k_splits=1)),
])
def test_bitmap_expand_matches_reference(rng, tokens, dtype, config):
    dense = _weight(rng, dtype).to_dense()
    w = TiledBitmap.from_dense(dense, tile_n=32)
    x = jnp.asarray(rng.standard_normal((tokens, K)), dtype)
    y = _kernel(x, w, config=config)
    assert y.shape == (tokens, N) and y.dtype == dtype
    _check(y, x, w)


def test_densify_method_and_no_tokens(rng):
    w = _weight(rng, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((33, K)), jnp.bfloat16)
    dense = U.unstructured_matmul(x, w, config=U.UnstructuredConfig(method="densify"))
    _check(dense, x, w)
    assert U.unstructured_matmul(x[:0], w).shape == (0, N)


def test_default_config_by_tokens():
    assert U._heuristic_config(1).block_t == 1
    assert U._heuristic_config(3).block_t == 4
    assert U._heuristic_config(16).method == "gather"
    assert U._heuristic_config(4096).method == "densify"
    assert U._heuristic_config(1, "bitmap").block_t == 16
    assert U._heuristic_config(64, "bitmap").method == "expand"
    assert U._heuristic_config(4096, "bitmap").method == "densify"


def test_tuned_table_lookup(rng, monkeypatch):
    # The committed table parses into valid configs.
    for by_layout in U._tuned_table().values():
        for by_shape in by_layout.values():
            for by_tokens in by_shape.values():
                for cfg in by_tokens.values():
                    U.UnstructuredConfig(**cfg)
    w = _weight(rng, jnp.bfloat16)
    table = {"dev": {"ell": {f"{K}x{N}": {"1": {"chunk": 8, "block_t": 1},
                                          "16": {"chunk": 4, "block_t": 16}}}}}
    monkeypatch.setattr(U, "_tuned_table", lambda: table)
    monkeypatch.setattr(U.backend_lib, "device_kind", lambda: "dev")
    assert U.default_config(3, w).chunk == 8      # log-nearest: 1 (|log 3| < |log 3/16|)
    assert U.default_config(9, w).chunk == 4
    bm = TiledBitmap.from_dense(w.to_dense(), tile_n=32)
    assert U.default_config(3, bm) == U._heuristic_config(3, "bitmap")


def test_rejects_bad_input(rng):
    w = _weight(rng, jnp.bfloat16)
    x = jnp.ones((2, K), jnp.bfloat16)
    with pytest.raises(ValueError, match="share a dtype"):
        U.unstructured_matmul(x.astype(jnp.float32), w)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., K=96\], got shape \(2, 95\)"):
        U.unstructured_matmul(jnp.ones((2, 95), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="out_dtype must be a floating dtype, got int32"):
        U.unstructured_matmul(x, w, out_dtype=jnp.int32)
    with pytest.raises(ValueError, match="x dtype must be"):
        U.unstructured_matmul(jnp.ones((2, K), jnp.int32), w)
    with pytest.raises(ValueError, match="does not apply to TiledSparse"):
        U.unstructured_matmul(x, w, config=U.UnstructuredConfig(method="expand"))
    with pytest.raises(TypeError, match="must be a TiledSparse"):
        U.unstructured_matmul(x, jnp.ones((K, N), jnp.bfloat16))
    stack = TiledSparse.from_dense(np.ones((2, K, N), np.float32), tile_k=TILE_K)
    with pytest.raises(ValueError, match="one matrix"):
        U.unstructured_matmul(x.astype(jnp.float32), stack)
    with pytest.raises(ValueError, match="k_splits=2 must divide the 3 K tiles"):
        U.unstructured_matmul(x, w, config=U.UnstructuredConfig(k_splits=2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="sparse"), "method='sparse'"),
    (dict(block_k=8), "block_k=8 must be a power of two >= 16"),
    (dict(block_t=3), "block_t=3 must be a power of two"),
    (dict(chunk=0), "chunk=0 must be a power of two"),
    (dict(k_splits=0), "k_splits=0 must be >= 1"),
    (dict(num_warps=6), "num_warps=6 must be a power of two"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        U.UnstructuredConfig(**kwargs)

"""Random weights drawn in each format (``WeightFormat.random``): valid patterns, layout, density,
scale, determinism, uniform choices, and the dense draw being the fan-in truncated normal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import format_registry as fr
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.tiled_format import TiledSparse

# (format, dense shape [e, K, N], parameters, stored class, expected density)
CASES = [
    ("dense", (2, 64, 32), {}, None, 1.0),
    ("nm", (2, 64, 32), {}, NMSparse, 0.5),
    ("nm", (3, 64, 16), {"n": 1, "m": 4}, NMSparse, 0.25),
    ("nm", (2, 32, 24), {"n": 4, "m": 8}, NMSparse, 0.5),
    ("samoyeds", (2, 128, 64), {}, SamoyedsSparse, 0.25),
    ("samoyeds", (2, 64, 48), {"n_sel": 2, "m_sel": 3, "v": 32}, SamoyedsSparse, 1 / 3),
    ("unstructured", (2, 64, 64), {"sparsity": 0.75, "tile_k": 32, "tile_n": 16}, TiledSparse,
     0.25),
    ("unstructured", (2, 96, 64), {"sparsity": 0.5}, TiledSparse, 0.5),  # default tiles: 96 x 32
]
IDS = [f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[2].items())}" for c in CASES]


@pytest.mark.parametrize("name, shape, params, cls, density", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_random_weights_are_valid_stored_weights(name, shape, params, cls, density, dtype):
    fmt = fr.get_format(name)
    w = fmt.random(jax.random.key(0), shape, dtype, **params)
    if cls is None:
        assert isinstance(w, jax.Array)
    else:
        assert type(w) is cls and fr.format_of(w) is fmt
    assert w.shape == shape and w.dtype == dtype
    # The layout is the one the format stores (checkpoints check weights against it).
    layout = fmt.abstract(shape, dtype, like=w, **params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), w) == jax.tree.map(
        lambda a: (a.shape, a.dtype), layout)
    dense = np.asarray(fmt.to_dense(w).astype(jnp.float32))
    if cls is not None:
        # from_dense refuses a weight off the pattern; it gives back the same arrays, so the
        # pattern (meta, sel, rows, offsets) is the one from_dense would store.
        again = fmt.from_dense(fmt.to_dense(w), **params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     w, again)
        assert np.mean(dense != 0) == pytest.approx(density, abs=1e-6)  # no kept value is 0
    # Values keep the dense init's scale per output: sum over K of E[w^2] is 1.
    assert np.mean(dense.astype(np.float64) ** 2) * shape[-2] == pytest.approx(1.0, rel=0.15)
    assert np.abs(dense).max() <= 2.0 / np.sqrt(shape[-2] * density) / 0.879 * 1.01  # truncated


@pytest.mark.parametrize("name, shape, params, cls, density", CASES, ids=IDS)
def test_random_weights_are_deterministic_per_key_and_jit(name, shape, params, cls, density):
    fmt = fr.get_format(name)
    draw = lambda key: fmt.random(key, shape, jnp.float32, **params)
    first, again, other = (draw(jax.random.key(s)) for s in (7, 7, 8))
    jitted = jax.jit(draw)(jax.random.key(7))
    for same in (again, jitted):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     first, same)
    dense, dense_other = (np.asarray(fmt.to_dense(w)) for w in (first, other))
    assert not np.array_equal(dense, dense_other)
    if cls is not None:  # the pattern differs too, not only the values
        assert not np.array_equal(dense != 0, dense_other != 0)


@pytest.mark.parametrize("name, params, shape", [
    ("nm", {}, (1, 4096, 64)),
    ("nm", {"n": 1, "m": 4}, (1, 4096, 64)),
    ("samoyeds", {"v": 32}, (1, 4096, 64)),
    ("unstructured", {"sparsity": 0.75, "tile_k": 64}, (1, 4096, 64)),
])
def test_random_patterns_are_uniform(name, params, shape):
    """Every position of a group is kept equally often, and the choice does not repeat from
    group to group (neighbouring groups agree only as often as chance says)."""
    fmt = fr.get_format(name)
    kept = np.asarray(fmt.to_dense(fmt.random(jax.random.key(3), shape, jnp.float32,
                                               **params)))[0] != 0  # [K, N]
    group = {"nm": params.get("m", 4), "samoyeds": 4, "unstructured": params.get("tile_k")}[name]
    by_pos = kept.reshape(-1, group, shape[-1]).mean(axis=(0, 2))  # keep rate per position
    rate = kept.mean()
    np.testing.assert_allclose(by_pos, rate, atol=0.06)
    if name == "samoyeds":  # kept columns: one of each pair per slab, both offsets alike
        cols = kept.reshape(-1, 32, shape[-1] // 2, 2).any(axis=1)  # [slabs, pairs, 2]
        assert (cols.sum(-1) == 1).all()
        assert cols[..., 0].mean() == pytest.approx(0.5, abs=0.06)
    first, second = kept.reshape(-1, group, shape[-1])[:2]
    assert np.mean((first == second).all(axis=0)[first.any(axis=0)]) < 0.5


def test_random_output_scale_matches_the_dense_layer():
    """x @ W for unit-variance x: the sparse draws' output variance is the dense one's."""
    k, n = 256, 256
    x = jax.random.normal(jax.random.key(1), (512, k), jnp.float32)
    var = {}
    for name, params in (("dense", {}), ("nm", {}), ("samoyeds", {}),
                         ("unstructured", {"sparsity": 0.7})):
        fmt = fr.get_format(name)
        w = fmt.to_dense(fmt.random(jax.random.key(2), (k, n), jnp.float32, **params))
        var[name] = float(jnp.var(x @ w))
    assert var["dense"] == pytest.approx(1.0, rel=0.1)
    for name in ("nm", "samoyeds", "unstructured"):
        assert var[name] == pytest.approx(var["dense"], rel=0.15), var


def test_dense_random_is_the_fan_in_truncated_normal():
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                                out_axis=-1, batch_axis=(0,))
    key = jax.random.key(5)
    # The same draw, jitted like ``random``: eager and jitted programs may round the last bit
    # differently on a GPU (fused multiplies), never the draw itself.
    jinit = jax.jit(init, static_argnums=(1, 2))
    for dtype in (jnp.float32, jnp.bfloat16):
        np.testing.assert_array_equal(
            np.asarray(fr.get_format("dense").random(key, (3, 32, 16), dtype)),
            np.asarray(jinit(key, (3, 32, 16), dtype)))


@pytest.mark.parametrize("name, shape, params, match", [
    ("nm", (2, 48, 32), {}, "multiple of 32 .*got 48"),
    ("samoyeds", (64, 64), {}, "multiple of v=128, got 64"),
    ("unstructured", (64, 48), {"tile_n": 32}, "N=48 must be a multiple of tile_n=32"),
    ("nm", (64, 32), {"n": 3}, r"\(n, m\) must be one of"),
    ("dense", (64,), {}, r"shape must be \[..., K, N\], got \(64,\)"),
])
def test_random_refuses_what_the_format_cannot_store(name, shape, params, match):
    with pytest.raises(ValueError, match=match):
        fr.get_format(name).random(jax.random.key(0), shape, jnp.float32, **params)

"""TransposedSparse (the Hopper decode kernel's layout): exact round trips from 2:4 and
Samoyeds weights, the kernel's in-register expansion replayed in jnp, and bad input."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.transposed_format import (TransposedSparse, expand_tile, permute_x,
                                              transposed_nbytes)
from samoyeds_jax import prune_weights


def _weights(rng, shape, kind: str):
    w = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    if kind == "nm":
        dense = np.asarray(prune_weights.prune_nm(w))
        return dense, NMSparse.from_dense(dense)
    dense = np.asarray(prune_weights.prune_samoyeds(w))
    return dense, SamoyedsSparse.from_dense(dense)


def _convert(sparse, tk):
    if isinstance(sparse, NMSparse):
        return TransposedSparse.from_nm(sparse, tk=tk)
    return TransposedSparse.from_samoyeds(sparse, tk=tk)


@pytest.mark.parametrize("kind", ["nm", "samoyeds"])
@pytest.mark.parametrize("tk", [128, 256, 512])
def test_round_trip_is_exact(rng, kind, tk):
    dense, sparse = _weights(rng, (1024, 128), kind)
    w = _convert(sparse, tk)
    rows = 64 if kind == "samoyeds" else 128
    chex.assert_shape(w.values, (1024 // tk, rows, tk // 2))
    chex.assert_shape(w.meta, (1024 // tk, rows, tk // 16))
    assert w.meta.dtype == jnp.int16 and w.dtype == jnp.bfloat16
    assert w.shape == (1024, 128) and w.rows == rows and w.paired == (kind == "samoyeds")
    assert w.nbytes == transposed_nbytes((1024, 128), 2, paired=w.paired)
    np.testing.assert_array_equal(np.asarray(w.to_dense()).view(np.uint16), dense.view(np.uint16))


def test_stacks_and_every_position_pair(rng):
    # Experts stacked [e, K, N]; groups with 0, 1 and 2 nonzeros at every position pair.
    e, k, n = 3, 256, 64
    w = rng.uniform(0.5, 2.0, (e, k, n)) * rng.choice([-1.0, 1.0], (e, k, n))
    count = rng.integers(0, 3, (e, k // 4, n))
    rank = np.argsort(np.argsort(rng.random((e, k // 4, 4, n)), axis=-2), axis=-2)
    dense = np.where((rank < count[..., None, :]).reshape(w.shape), w, 0).astype(ml_dtypes.bfloat16)
    t = TransposedSparse.from_nm(NMSparse.from_dense(dense))
    chex.assert_shape(t.values, (e, 1, n, 128))
    assert t.shape == (e, k, n)
    np.testing.assert_array_equal(np.asarray(t.to_dense(), np.float32), dense.astype(np.float32))


@pytest.mark.parametrize("kind", ["nm", "samoyeds"])
@pytest.mark.parametrize("tk", [128, 256, 512])
def test_kernel_expansion_replayed_in_jnp(rng, kind, tk):
    """Per K tile: the expanded A (columns in chunk, j, r order) times the permuted x tile,
    summed over tiles (and routed to column 2r + sel when paired), is x @ W."""
    k, n, t = 1024, 128, 3
    dense, sparse = _weights(rng, (k, n), kind)
    w = _convert(sparse, tk)
    x = rng.standard_normal((t, k)).astype(np.float32)
    xp = permute_x(jnp.asarray(x), tk)
    chex.assert_shape(xp, (k // tk, 4, t, tk // 4))
    acc = [0.0, 0.0]
    for kt in range(k // tk):
        a0, a1 = expand_tile(w.values[kt], w.meta[kt], paired=w.paired)  # [R, tk]
        b = jnp.transpose(xp[kt], (0, 2, 1)).reshape(tk, t)  # chunk-major rows
        acc[0] = acc[0] + jnp.dot(a0.astype(jnp.float32), b)
        if w.paired:
            acc[1] = acc[1] + jnp.dot(a1.astype(jnp.float32), b)
    yt = jnp.stack(acc, axis=1).reshape(n, t) if w.paired else acc[0]
    want = x @ dense.astype(np.float32)
    np.testing.assert_allclose(np.asarray(yt.T), want, rtol=1e-5, atol=1e-4)


def test_bad_input(rng):
    _, nm = _weights(rng, (512, 64), "nm")
    with pytest.raises(ValueError, match="tk must be one of"):
        TransposedSparse.from_nm(nm, tk=64)
    with pytest.raises(ValueError, match="multiple of tk=512"):
        TransposedSparse.from_nm(_weights(rng, (768, 64), "nm")[1], tk=512)
    w14 = np.zeros((512, 64), np.float32)
    w14[::4] = 1.0
    with pytest.raises(ValueError, match="needs 2:4 weights, got 1:4"):
        TransposedSparse.from_nm(NMSparse.from_dense(w14, n=1, m=4))
    w = jnp.asarray(rng.standard_normal((512, 64)), jnp.bfloat16)
    sam = SamoyedsSparse.from_dense(np.asarray(prune_weights.prune_samoyeds(w, n_sel=1, m_sel=4)),
                                    n_sel=1, m_sel=4)
    with pytest.raises(ValueError, match="1:2 column selection, got 1:4"):
        TransposedSparse.from_samoyeds(sam)

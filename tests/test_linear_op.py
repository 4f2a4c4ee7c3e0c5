"""The linear op (``pallas_kernels.linear_op``): every implementation x every weight format x
awkward token counts against the ``xla`` reference, the registry's choices and refusals.

On CPU the Pallas implementations run in interpret mode (``triton``) or as their kernels' jnp
reference (``mosaic_*``), asked for by name; on a GPU the compiled kernels run.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend as backend_lib
from pallas_kernels import linear_op
from pallas_kernels.format_registry import get_format
from pallas_kernels.tiled_format import TiledBitmap

K, N = 128, 128
# name: (format, its parameters); "tiled_bitmap" is the TiledBitmap layout of the same weights.
WEIGHTS = {
    "dense": ("dense", {}),
    "nm_2of4": ("nm", {}),
    "samoyeds_v64": ("samoyeds", {"v": 64}),
    "samoyeds_v128": ("samoyeds", {"v": 128}),
    "tiled_sparse": ("unstructured", {"sparsity": 0.75}),
    "tiled_bitmap": ("unstructured", {"sparsity": 0.75}),
}
IMPLEMENTATIONS = ("xla", "triton", "mosaic_sparse_mma", "mosaic_expand")
RUNS = {"xla": tuple(WEIGHTS), "triton": tuple(w for w in WEIGHTS if w != "dense"),
        "mosaic_sparse_mma": ("nm_2of4", "samoyeds_v64", "samoyeds_v128"),
        "mosaic_expand": ("nm_2of4", "samoyeds_v64", "samoyeds_v128")}
X_SHAPES = {"1_token": (1, K), "3_tokens": (3, K), "33_tokens": (33, K),
            "leading_dims_2x3": (2, 3, K)}


def _weight(name, dtype, seed=0):
    fmt, params = WEIGHTS[name]
    w = get_format(fmt).random(jax.random.key(seed), (K, N), dtype, **params)
    return TiledBitmap.from_dense(w.to_dense()) if name == "tiled_bitmap" else w


def _available(name):
    """The implementation runs here: compiled on its platform, or by name in interpret mode."""
    op = linear_op.get_op(name)
    return op.supported_on(backend_lib.platform()) or backend_lib.interpret_mode()


@pytest.mark.parametrize("x_shape", X_SHAPES)
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_matches_xla_reference(rng, name, weight, x_shape):
    if weight not in RUNS[name]:
        pytest.skip(f"{name} does not run {weight} (refusal: test_refusals)")
    if not _available(name):
        pytest.skip(f"{name} needs another GPU")
    dtype = jnp.float32 if name == "xla" else jnp.bfloat16
    w = _weight(weight, dtype, seed=int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal(X_SHAPES[x_shape]), dtype)
    op = linear_op.get_op(name)
    got = np.asarray(jax.jit(op)(x, op.prepare(w)), np.float32)
    want = np.asarray(x, np.float32) @ np.asarray(w.to_dense() if hasattr(w, "to_dense")
                                                  else w, np.float32)
    if name != "xla":  # against the xla implementation too, same inputs
        xla = np.asarray(linear_op.get_op("xla")(x, w, out_dtype=jnp.float32))
        np.testing.assert_allclose(xla, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert got.shape == X_SHAPES[x_shape][:-1] + (N,) and np.all(np.isfinite(got))
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_gradient_of_x_is_the_references(rng, name):
    """Every implementation differentiates: x's gradient is the xla reference's (a kernel's
    backward pass is its reference's)."""
    if not _available(name):
        pytest.skip(f"{name} needs another GPU")
    dtype = jnp.float32 if name == "xla" else jnp.bfloat16
    w = _weight("nm_2of4", dtype, seed=int(rng.integers(1 << 30)))
    x = jnp.asarray(rng.standard_normal((3, K)), dtype)

    def grad(op, w):
        loss = lambda x: jnp.sum(op(x, w, out_dtype=jnp.float32) ** 2)
        return np.asarray(jax.jit(jax.grad(loss))(x), np.float32)

    op = linear_op.get_op(name)
    got, want = grad(op, op.prepare(w)), grad(linear_op.get_op("xla"), w)
    assert np.all(np.isfinite(got)) and np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * np.abs(want).max())


def test_out_dtype():
    w = _weight("nm_2of4", jnp.bfloat16)
    x = jnp.ones((3, K), jnp.bfloat16)
    for name in ("xla", "triton"):
        y = linear_op.get_op(name)(x, w, out_dtype=jnp.float32)
        assert y.dtype == jnp.float32, name
    assert linear_op.linear(x, w).dtype == jnp.bfloat16


def test_refusals():
    ws = {name: _weight(name, jnp.bfloat16) for name in WEIGHTS}
    for name in IMPLEMENTATIONS:
        op = linear_op.get_op(name)
        for weight, w in ws.items():
            assert op.prepares(w) == (weight in RUNS[name]), (name, weight)
            if weight not in RUNS[name]:
                with pytest.raises(ValueError, match=f"{name!r} (does not run|takes)"):
                    op.prepare(w)
    # triton given a dense array: XLA's GEMM is the dense path.
    with pytest.raises(ValueError, match=r"no linear implementation of \['triton'\] runs dense "
                       r"weight in bfloat16 .*triton: runs nm in bfloat16/float16 with N:M in"):
        linear_op.resolve("triton", ws["dense"])
    # bfloat16 only on the sparse tensor cores; Samoyeds with a V the Triton kernel cannot tile.
    assert not linear_op.get_op("mosaic_sparse_mma").prepares(_weight("nm_2of4", jnp.float32))
    v32 = get_format("samoyeds").random(jax.random.key(0), (K, N), jnp.bfloat16, v=32)
    assert not linear_op.get_op("triton").supports(v32)
    assert not linear_op.get_op("triton").supports(_weight("nm_2of4", jnp.float32))
    assert linear_op.get_op("triton").supports(_weight("tiled_sparse", jnp.float32))
    with pytest.raises(ValueError, match="linear implementation must be one of"):
        linear_op.get_op("cuda")
    with pytest.raises(ValueError, match="non-empty sequence"):
        linear_op.check_implementation([])


def test_mosaic_refused_off_hopper(monkeypatch):
    """On a GPU that is not a Hopper (simulated: no interpret mode, not Hopper), the Mosaic ops
    refuse, saying what they need."""
    w = _weight("nm_2of4", jnp.bfloat16)
    monkeypatch.setattr(backend_lib, "interpret_mode", lambda: False)
    monkeypatch.setattr(backend_lib, "is_hopper", lambda: False)
    with pytest.raises(ValueError, match=r"no linear implementation of \['mosaic_sparse_mma'\] "
                       r"runs nm weight in bfloat16 on platform 'gpu' \(mosaic_sparse_mma: does "
                       r"not run on 'gpu' \(needs a Hopper GPU\)\)"):
        linear_op.resolve("mosaic_sparse_mma", w, platform="gpu", prepared=False)
    assert linear_op.resolve(None, w, platform="gpu").name == "triton"


def test_checks_inputs():
    w = _weight("nm_2of4", jnp.bfloat16)
    op = linear_op.get_op("xla")
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., K=128\] for w of shape "
                       r"\(128, 128\), got shape \(3, 64\)"):
        op(jnp.ones((3, 64), jnp.bfloat16), w)
    with pytest.raises(ValueError, match="x must be floating, got int32"):
        op(jnp.ones((3, K), jnp.int32), w)
    with pytest.raises(ValueError, match="out_dtype must be floating, got int8"):
        op(jnp.ones((3, K), jnp.bfloat16), w, out_dtype=jnp.int8)
    with pytest.raises(TypeError, match="x must be an array"):
        op([1.0] * K, w)
    with pytest.raises(TypeError, match="w must be a weight"):
        op(jnp.ones((3, K), jnp.bfloat16), "w")
    with pytest.raises(ValueError, match=r"w must be one matrix \[K, N\], got shape \(2, 128"):
        op(jnp.ones((3, K), jnp.bfloat16), jnp.ones((2, K, N), jnp.bfloat16))
    with pytest.raises(ValueError, match="x must be"):  # triton: the same checks first
        linear_op.get_op("triton")(jnp.ones((3, 64), jnp.bfloat16), w)


def test_automatic_choice_and_description():
    dense, samoyeds, unstructured = (_weight(n, jnp.bfloat16)
                                     for n in ("dense", "samoyeds_v128", "tiled_sparse"))
    # Off a GPU: xla, saying what it expands.
    assert linear_op.resolve(None, dense, platform="cpu").name == "xla"
    op = linear_op.resolve(None, unstructured, platform="cpu")
    assert linear_op.describe(op, unstructured) == "xla (unstructured weight expanded to dense)"
    assert linear_op.describe(op, dense) == "xla"
    # On a GPU: the kernels for the formats they run, xla for dense.
    assert linear_op.resolve(None, samoyeds, platform="gpu").name in (
        "triton", "mosaic_sparse_mma")
    assert linear_op.resolve(None, unstructured, platform="gpu").name == "triton"
    assert linear_op.resolve(None, dense, platform="gpu").name == "xla"
    # A sequence: the first that runs the weight.
    assert linear_op.resolve(("triton", "xla"), dense).name == "xla"
    # Prepared weights run on the op that prepared them, whatever was asked.
    sp = linear_op.get_op("mosaic_sparse_mma").prepare(samoyeds)
    if _available("mosaic_sparse_mma"):
        assert linear_op.resolve("mosaic_sparse_mma", sp).name == "mosaic_sparse_mma"
    with pytest.raises(ValueError, match=r"no linear implementation of \['triton'\] runs "
                       "WgmmaSparseA weight"):
        linear_op.resolve("triton", sp)
    if backend_lib.interpret_mode():
        assert linear_op.describe(linear_op.get_op("triton"), samoyeds) == (
            "triton (Pallas interpret mode: no GPU)")
    x = jnp.ones((2, K), jnp.bfloat16)
    np.testing.assert_allclose(
        np.asarray(linear_op.linear(x, samoyeds, implementation="xla"), np.float32),
        np.asarray(linear_op.linear(x, samoyeds, implementation=("triton", "xla")), np.float32),
        rtol=2e-2, atol=2e-2 * float(jnp.abs(samoyeds.to_dense()).sum(0).max()))
    assert linear_op.implementation_names()[:1] == ("xla",)
    assert set(IMPLEMENTATIONS) <= set(linear_op.implementation_names())


def test_register_toy_implementation():
    @dataclasses.dataclass(frozen=True)
    class Doubled(linear_op.LinearOp):  # a toy: twice the reference
        name: ClassVar[str] = "test_doubled"

        def compute(self, x, w, out_dtype):
            return 2 * super().compute(x, w, out_dtype)

    linear_op.register(Doubled())
    try:
        w = _weight("dense", jnp.float32)
        x = jnp.ones((2, K), jnp.float32)
        y = linear_op.linear(x, w, implementation="test_doubled")
        np.testing.assert_allclose(np.asarray(y), 2 * np.asarray(x @ w), rtol=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            linear_op.register(Doubled())
    finally:
        del linear_op.IMPLEMENTATIONS["test_doubled"]

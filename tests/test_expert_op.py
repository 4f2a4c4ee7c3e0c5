"""The expert op (``pallas_kernels.expert_op``): every implementation x every weight format x
awkward routings against the ``xla`` reference, the registry's choices and refusals.

On CPU the Pallas implementations run in interpret mode (``triton``) or as their kernels' jnp
reference (``mosaic_*``), asked for by name; on a GPU the compiled kernels run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend as backend_lib
from pallas_kernels import expert_op
from pallas_kernels.format_registry import get_format
from pallas_kernels.routing_plan import RoutingPlan

D, F, E = 128, 256, 8
FORMATS = ("dense", "nm", "samoyeds", "unstructured")
IMPLEMENTATIONS = ("xla", "all_experts", "triton", "mosaic_sparse_mma", "mosaic_expand")
# Which stored formats each implementation runs (after ``prepare``), and in which dtypes.
RUNS = {"xla": FORMATS, "all_experts": FORMATS, "triton": ("dense", "nm", "samoyeds"),
        "mosaic_sparse_mma": ("nm", "samoyeds"), "mosaic_expand": ("nm", "samoyeds")}
ROUTINGS = {  # name: (tokens, top_k, expert ids or None for random distinct ones)
    "one_token": (1, 2, None),
    "three_tokens_top1": (3, 1, None),
    "33_tokens": (33, 2, None),
    "all_on_expert_5": (5, 1, np.full((5, 1), 5)),
    "experts_0_3_only": (4, 2, np.array([[0, 3], [3, 0], [0, 3], [3, 0]])),
}


def _weights(fmt, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    draw = get_format(fmt).random
    params = {"sparsity": 0.75} if fmt == "unstructured" else {}
    return (draw(keys[0], (E, D, F), dtype, **params), draw(keys[1], (E, D, F), dtype, **params),
            draw(keys[2], (E, F, D), dtype, **params))


def _routing(rng, t, k, idx):
    if idx is None:
        idx = np.stack([rng.choice(E, k, replace=False) for _ in range(t)])
    w = rng.random((t, k)).astype(np.float32)
    return jnp.asarray(idx, jnp.int32), jnp.asarray(w / w.sum(-1, keepdims=True))


def _available(name):
    """The implementation runs here: compiled on its platform, or by name in interpret mode."""
    op = expert_op.get_op(name)
    return op.supported_on(backend_lib.platform()) or backend_lib.interpret_mode()


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_matches_xla_reference(rng, name, fmt, routing):
    if fmt not in RUNS[name]:
        pytest.skip(f"{name} does not run {fmt} experts (refusal: test_refusals)")
    if not _available(name):
        pytest.skip(f"{name} needs another GPU")
    dtype = jnp.bfloat16 if name.startswith("mosaic") else jnp.float32
    ws = _weights(fmt, dtype, seed=int(rng.integers(1 << 30)))
    t, k, idx = ROUTINGS[routing]
    topk_idx, topk_w = _routing(rng, t, k, idx)
    x = jnp.asarray(rng.standard_normal((t, D)), dtype)
    op = expert_op.get_op(name)
    prepared = op.prepare(*ws)
    plan = expert_op.plan_for(op, topk_idx, topk_w, num_experts=E)
    got = np.asarray(jax.jit(op)(x, plan, *prepared), np.float32)
    xla = expert_op.get_op("xla")
    want = np.asarray(xla(x, expert_op.plan_for(xla, topk_idx, topk_w, num_experts=E), *ws),
                      np.float32)
    assert got.shape == (t, D) and np.all(np.isfinite(got))
    scale = np.abs(want).max()
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_gradients_are_the_references(rng, name):
    """Every implementation differentiates: the gradients of x and of the routing weights are
    the xla reference's (a kernel's backward pass is its reference's; only its forward output,
    the cotangent of this loss, differs), and so are those of dense expert weights."""
    if not _available(name):
        pytest.skip(f"{name} needs another GPU")
    fmt = "dense" if "dense" in RUNS[name] else "nm"
    dtype = jnp.bfloat16 if name.startswith("mosaic") else jnp.float32
    ws = _weights(fmt, dtype, seed=int(rng.integers(1 << 30)))
    topk_idx, topk_w = _routing(rng, 5, 2, None)
    x = jnp.asarray(rng.standard_normal((5, D)), dtype)
    xla, op = expert_op.get_op("xla"), expert_op.get_op(name)
    prepared = op.prepare(*ws)

    def grads(op, weights):
        def loss(x, p, w1):
            plan = expert_op.plan_for(op, topk_idx, p, num_experts=E)
            return jnp.sum(op(x, plan, w1, *weights[1:]).astype(jnp.float32) ** 2)
        argnums = (0, 1, 2) if fmt == "dense" else (0, 1)
        return jax.jit(jax.grad(loss, argnums=argnums))(x, topk_w, weights[0])

    got, want = grads(op, prepared), grads(xla, ws)
    tol = 5e-2 if dtype == jnp.bfloat16 else 1e-4
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g)) and np.abs(w).max() > 0
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def test_refusals():
    ws = {fmt: _weights(fmt, jnp.bfloat16, seed=0) for fmt in FORMATS}
    for name in IMPLEMENTATIONS:
        op = expert_op.get_op(name)
        for fmt in FORMATS:
            assert op.prepares(*ws[fmt]) == (fmt in RUNS[name]), (name, fmt)
            if fmt not in RUNS[name]:
                with pytest.raises(ValueError, match=f"{name!r} (does not run|takes)"):
                    op.prepare(*ws[fmt])
    f32 = _weights("samoyeds", jnp.float32, seed=0)
    assert not expert_op.get_op("mosaic_sparse_mma").prepares(*f32)  # bf16 only
    with pytest.raises(ValueError, match="expert implementation must be one of"):
        expert_op.get_op("cuda")
    with pytest.raises(ValueError, match="non-empty sequence"):
        expert_op.check_implementation([])


def test_automatic_choice_and_description():
    dense, samoyeds, unstructured = (_weights(f, jnp.bfloat16, 0)
                                     for f in ("dense", "samoyeds", "unstructured"))
    # Off a GPU: xla, saying what it expands.
    assert expert_op.resolve(None, *dense, platform="cpu").name == "xla"
    op = expert_op.resolve(None, *samoyeds, platform="cpu")
    assert expert_op.describe(op, *samoyeds) == "xla (samoyeds experts expanded to dense)"
    # On a GPU: the Pallas kernels for the formats they run, xla (visibly) for the others.
    assert expert_op.resolve(None, *samoyeds, platform="gpu").name in (
        "triton", "mosaic_sparse_mma")
    assert expert_op.resolve(None, *unstructured, platform="gpu").name == "xla"
    # A sequence: the first that runs the weights.
    assert expert_op.resolve(("triton", "xla"), *unstructured).name == "xla"
    # Prepared weights run on the op that prepared them, whatever was asked.
    sp = expert_op.get_op("mosaic_sparse_mma").prepare(*samoyeds)
    if _available("mosaic_sparse_mma"):
        assert expert_op.resolve("mosaic_sparse_mma", *sp).name == "mosaic_sparse_mma"
    with pytest.raises(ValueError, match="no expert implementation of \\['triton'\\] runs "
                       ".*triton: runs dense, nm, samoyeds"):
        expert_op.resolve("triton", *sp)
    with pytest.raises(ValueError, match="unstructured experts .*triton: runs dense, nm, samoyeds"):
        expert_op.resolve("triton", *unstructured)


def test_checks_inputs():
    ws = _weights("dense", jnp.float32, 0)
    idx, w = jnp.zeros((3, 1), jnp.int32), jnp.ones((3, 1), jnp.float32)
    plan = RoutingPlan.build(idx, w, num_experts=E, block_t=1)
    op = expert_op.get_op("xla")
    with pytest.raises(ValueError, match="x has 2 tokens but the plan was built for 3"):
        op(jnp.zeros((2, D)), plan, *ws)
    with pytest.raises(ValueError, match=r"w2 must be \[e=8, f=256, d=128\]"):
        op(jnp.zeros((3, D)), plan, ws[0], ws[1], ws[0])
    with pytest.raises(TypeError, match="w1 must be an expert stack"):
        op(jnp.zeros((3, D)), plan, "w1", ws[1], ws[2])


def test_a_new_implementation_is_one_registry_line():
    """An op that subclasses the base and registers is chosen by name and by ``resolve``."""
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Doubled(expert_op.ExpertOp):  # a toy: twice the reference
        name: ClassVar[str] = "test_doubled"

        def compute(self, x, plan, w1, w3, w2):
            return 2 * super().compute(x, plan, w1, w3, w2)

    expert_op.register(Doubled())
    try:
        ws = _weights("dense", jnp.float32, 0)
        op = expert_op.resolve("test_doubled", *ws)
        idx, w = jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1), jnp.float32)
        plan = expert_op.plan_for(op, idx, w, num_experts=E)
        x = jnp.ones((2, D), jnp.float32)
        ref = expert_op.get_op("xla")(x, plan, *ws)
        np.testing.assert_allclose(np.asarray(op(x, plan, *ws)), 2 * np.asarray(ref), rtol=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            expert_op.register(Doubled())
    finally:
        del expert_op.IMPLEMENTATIONS["test_doubled"]

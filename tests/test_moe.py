"""MoE layer: parity with a per-expert loop, gradients, router norms, shared experts, modes, jit."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax.config import MoEConfig, SparsityConfig
from samoyeds_jax.moe import MoE, expert_ffn, moe_linen
from samoyeds_jax.routing import Routing

D, F, E, K = 16, 32, 4, 2


def _config(**kw) -> MoEConfig:
    base = dict(d_model=D, d_ff=F, num_experts=E, top_k=K)
    base.update(kw)
    return MoEConfig(**base)


def _np(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _silu(a):
    return a / (1.0 + np.exp(-a))


def loop_reference(x, idx, weights, w1, w3, w2):
    """mistral-inference style: for each expert, run it on the tokens that chose it (float64)."""
    x, weights, w1, w3, w2 = (_np(a) for a in (x, weights, w1, w3, w2))
    idx = np.asarray(idx)
    y = np.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, nth = np.nonzero(idx == e)
        h = _silu(x[tok] @ w1[e]) * (x[tok] @ w3[e])
        y[tok] += weights[tok, nth, None] * (h @ w2[e])
    return y


def _shared_reference(x, shared):
    x = _np(x)
    h = _silu(x @ _np(shared.w1[...])) * (x @ _np(shared.w3[...]))
    y = h @ _np(shared.w2[...])
    if shared.gate_kernel is not None:
        y = y / (1.0 + np.exp(-(x @ _np(shared.gate_kernel[...]))))
    return y


@pytest.mark.parametrize("t", [1, 3, 33])
def test_matches_loop_reference_f32(rng, t):
    moe = MoE(_config(router_norm="topk_softmax"), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((t, D)), jnp.float32)
    y, nxt = moe(x)
    assert nxt is None
    logits = _np(x) @ _np(moe.gate.kernel[...])
    idx = np.argsort(-logits, axis=-1)[:, :K]
    top = np.take_along_axis(logits, idx, axis=-1)
    w = np.exp(top - top.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = loop_reference(x, idx, w, moe.w1[...], moe.w3[...], moe.w2[...])
    np.testing.assert_allclose(_np(y), ref, rtol=1e-4, atol=1e-5)


def test_matches_loop_reference_bf16(rng):
    """bf16 params and compute: error vs float64 at most ~2x a plain bf16 jnp loop (+ slack)."""
    moe = MoE(_config(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
              rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.standard_normal((33, D)), jnp.bfloat16)
    y, _ = moe(x)
    assert y.dtype == jnp.bfloat16
    routing = moe.route(x)  # same routing for both: bf16 near-ties must not flip the test
    ref = loop_reference(x, routing.topk_idx, routing.topk_weights,
                         moe.w1[...], moe.w3[...], moe.w2[...])
    # The same computation in plain bf16 jnp (every expert on every token, then masked).
    plain = _np(jax.jit(expert_ffn, static_argnames=("implementation", "dtype"))(
        x, routing, moe.expert_weights(), implementation="all_experts", dtype=jnp.bfloat16))
    scale = np.abs(ref).max()
    err = np.abs(_np(y) - ref).max() / scale
    plain_err = np.abs(plain - ref).max() / scale
    assert err <= 2 * plain_err + 2e-3, (err, plain_err)
    assert err < 2e-2


def test_empty_experts_and_all_on_one(rng):
    moe = MoE(_config(top_k=1), rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((5, D)), jnp.float32)
    for idx in (np.full((5, 1), 2), np.array([[0], [0], [3], [3], [3]])):
        routing = Routing(jnp.asarray(idx, jnp.int32), jnp.asarray(rng.random((5, 1)), jnp.float32))
        y = moe.apply_experts(x, routing)
        ref = loop_reference(x, idx, routing.topk_weights, moe.w1[...], moe.w3[...], moe.w2[...])
        np.testing.assert_allclose(_np(y), ref, rtol=1e-4, atol=1e-5)


def test_ragged_and_loop_implementations_agree(rng):
    moe = MoE(_config(), rngs=nnx.Rngs(1))
    x = jnp.asarray(rng.standard_normal((7, D)), jnp.float32)
    routing = moe.route(x)
    a, b = (expert_ffn(x, routing, moe.expert_weights(), implementation=name, dtype=jnp.float32)
            for name in ("xla", "all_experts"))
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-5)


def test_leading_dims_and_expert_override(rng):
    moe = MoE(_config(), rngs=nnx.Rngs(2))
    x = jnp.asarray(rng.standard_normal((2, 3, D)), jnp.float32)
    y, _ = moe(x)
    assert y.shape == (2, 3, D)
    assert moe(jnp.zeros((2, 0, D)))[0].shape == (2, 0, D)  # no tokens
    routing = moe.route(x)
    # Offload-style override: a stack of cache slots holding experts in another order.
    slot_of_expert = jnp.array([2, 0, 3, 1], jnp.int32)
    expert_of_slot = jnp.argsort(slot_of_expert)
    slots = tuple(w[...][expert_of_slot] for w in (moe.w1, moe.w3, moe.w2))
    y_slots = moe.apply_experts(x, routing.remap(slot_of_expert), experts=slots)
    np.testing.assert_allclose(_np(y_slots), _np(y), rtol=1e-6, atol=1e-6)
    # A stack one slot short of the highest slot the random routing uses (x is random: which
    # slots appear varies from run to run).
    top = int(routing.remap(slot_of_expert).topk_idx.max())
    with pytest.raises(ValueError, match=rf"topk_idx \(expert ids\) must lie in \[0, {top}\); got {top}"):
        moe.apply_experts(x, routing.remap(slot_of_expert), experts=tuple(w[:top] for w in slots))
    with pytest.raises(ValueError, match=r"w2 must be \[e=4, f=32, d_model=16\]"):
        moe.apply_experts(x, routing, experts=(slots[0], slots[1], slots[2][:, :8]))


def test_gradients_flow(rng):
    moe = MoE(_config(num_shared_experts=1, shared_gate="sigmoid"), rngs=nnx.Rngs(3))
    x = jnp.asarray(rng.standard_normal((9, D)), jnp.float32)

    def loss(m, x):
        y, _ = m(x)
        return jnp.sum(y * y)

    grads, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(moe, x)
    leaves = jax.tree.leaves_with_path(nnx.state(grads, nnx.Param))
    assert len(leaves) == 8  # gate, w1, w3, w2, shared w1/w3/w2/gate
    for path, g in leaves:
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.abs(g).max()) > 0, path
    assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.abs(gx).max()) > 0


def test_shared_experts(rng):
    for gate in ("none", "sigmoid"):
        cfg = _config(num_shared_experts=2, shared_d_ff=8, shared_gate=gate)
        moe = MoE(cfg, rngs=nnx.Rngs(4))
        assert moe.shared.w1[...].shape == (D, 16)
        x = jnp.asarray(rng.standard_normal((5, D)), jnp.float32)
        y, _ = moe(x)
        routing = moe.route(x)
        ref = loop_reference(x, routing.topk_idx, routing.topk_weights,
                             moe.w1[...], moe.w3[...], moe.w2[...]) + _shared_reference(x, moe.shared)
        np.testing.assert_allclose(_np(y), ref, rtol=1e-4, atol=1e-5)


def test_nnx_jit_traces_once(rng):
    moe = MoE(_config(pregate="speculative"), block_index=1, num_blocks=3, rngs=nnx.Rngs(5))

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def step(m, x, r):
        return m(x, routing=r)

    prev = Routing(jnp.zeros((4, K), jnp.int32), jnp.full((4, K), 0.5, jnp.float32))
    for _ in range(3):
        x = jnp.asarray(rng.standard_normal((4, D)), jnp.float32)
        y, nxt = step(moe, x, prev)
        assert y.shape == (4, D) and nxt.topk_idx.shape == (4, K)
    assert moe.recall_stats.get_value().pair_actual == 3 * 4 * K
    chex.clear_trace_counter()


def test_linen_wrapper(rng):
    cfg = _config(num_shared_experts=1)
    layer = moe_linen(cfg)
    x = jnp.asarray(rng.standard_normal((2, 5, D)), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    y, nxt = layer.apply(variables, x)
    assert y.shape == (2, 5, D) and nxt is None
    p = variables["params"]
    xt = x.reshape(-1, D)
    logits = _np(xt) @ _np(p["gate"]["kernel"])
    idx = np.argsort(-logits, axis=-1)[:, :K]
    top = np.take_along_axis(logits, idx, axis=-1)
    w = np.exp(top - top.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = loop_reference(xt, idx, w, p["w1"], p["w3"], p["w2"])
    sh = p["shared"]
    ref += (_silu(_np(xt) @ _np(sh["w1"])) * (_np(xt) @ _np(sh["w3"]))) @ _np(sh["w2"])
    np.testing.assert_allclose(_np(y).reshape(-1, D), ref, rtol=1e-4, atol=1e-5)


def _chain(moes, x, first=None):
    """Residual stack of MoE blocks threading next_routing; returns each block's output."""
    outs, routing = [], first
    for m in moes:
        y, routing = m(x, routing=routing)
        outs.append(y)
        x = x + y
    return outs


def test_pregated_equals_standard_when_pregate_is_next_gate(rng):
    """Pre-gate i = gate i+1 and block i's output zero: block i+1's input equals block i's, so the
    pre-gate's routing is exactly the standard routing and the outputs match."""
    seeds = [int(s) for s in rng.integers(1 << 30, size=3)]
    std = [MoE(_config(), block_index=i, num_blocks=3, rngs=nnx.Rngs(s)) for i, s in enumerate(seeds)]
    pre = [MoE(_config(pregate="pregated"), block_index=i, num_blocks=3, rngs=nnx.Rngs(s))
           for i, s in enumerate(seeds)]
    assert pre[2].pregate is None and pre[0].pregate is not None
    for i in range(2):
        pre[i].pregate.load_from(pre[i + 1].gate)
        zero = jnp.zeros_like(std[i].w2[...])
        std[i].w2[...] = zero
        pre[i].w2[...] = zero
    x = jnp.asarray(rng.standard_normal((6, D)), jnp.float32)
    for a, b in zip(_chain(std, x), _chain(pre, x)):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-6, atol=1e-6)
    assert pre[1].recall()["recall"] == 1.0 and pre[2].recall()["recall"] == 1.0

    # In general (non-zero outputs) block i+1 runs exactly on the pre-gate's routing.
    pre[0].w2[...] = jax.random.normal(jax.random.key(seeds[0]), pre[0].w2[...].shape)
    y0, r1 = pre[0](x)
    y1, _ = pre[1](x + y0, routing=r1)
    np.testing.assert_allclose(_np(y1), _np(pre[1].apply_experts(x + y0, r1)), rtol=1e-6, atol=1e-6)


def test_mode_contracts(rng):
    x = jnp.asarray(rng.standard_normal((3, D)), jnp.float32)
    r = Routing(jnp.zeros((3, K), jnp.int32), jnp.ones((3, K), jnp.float32))
    with pytest.raises(ValueError, match="needs the routing from block 0"):
        MoE(_config(pregate="pregated"), block_index=1, num_blocks=2, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="own gate; got a routing"):
        MoE(_config(), rngs=nnx.Rngs(0))(x, routing=r)
    with pytest.raises(ValueError, match="routing covers 3 tokens but the input has 4"):
        MoE(_config(pregate="speculative"), block_index=1, num_blocks=2, rngs=nnx.Rngs(0))(
            jnp.zeros((4, D)), routing=r)
    with pytest.raises(ValueError, match=r"d_model=16\], got shape \(3, 8\)"):
        MoE(_config(), rngs=nnx.Rngs(0))(jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="multiple of v=128"):
        MoE(_config(), rngs=nnx.Rngs(0)).to_format("samoyeds")
    # speculative: the received routing is ignored for compute.
    spec = MoE(_config(pregate="speculative"), block_index=1, num_blocks=2, rngs=nnx.Rngs(0))
    assert spec.pregate is None
    y, nxt = spec(x, routing=r)
    assert nxt is None
    np.testing.assert_allclose(_np(y), _np(spec(x)[0]), rtol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=5), "top_k=5 must be <= num_experts=4"),
    (dict(d_model=0), "d_model must be a positive int"),
    (dict(router_norm="softmax"), "router_norm must be one of"),
    (dict(implementation="cuda"), "expert implementation must be one of"),
    (dict(implementation=()), "implementation must be a name, a non-empty sequence"),
    (dict(pregate="always"), "pregate must be one of"),
    (dict(shared_gate="sigmoid"), "needs num_shared_experts > 0"),
    (dict(expert_format="nm", d_ff=48), "multiple of 32"),
    (dict(expert_format="samoyeds", d_model=64, d_ff=256), "multiple of v=128, got 64"),
    (dict(expert_format="csr"), "expert_format must be one of"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_bad_sparsity_configs():
    with pytest.raises(ValueError, match=r"\(n, m\) must be one of"):
        SparsityConfig(n=3, m=4)
    with pytest.raises(ValueError, match="multiple of 32"):
        SparsityConfig(v=100)
    with pytest.raises(ValueError, match="block_index < num_blocks"):
        MoE(_config(), block_index=2, num_blocks=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fmt, d, f", [("nm", 32, 32), ("samoyeds", 128, 128)])
def test_sparse_formats(rng, fmt, d, f):
    """Samoyeds: experts drawn in the format; N:M: dense experts converted with ``to_format``.
    The xla and pallas paths match the dense reference of the stored weights."""
    from pallas_kernels import formats

    cfg = MoEConfig(d_model=d, d_ff=f, num_experts=2, top_k=1,
                    expert_format="dense" if fmt == "nm" else fmt)
    moe = MoE(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    if fmt == "nm":
        report = moe.to_format("nm", sparsity=SparsityConfig(n=2, m=4))
        assert moe.config.expert_format == "nm" and report.layers["experts/w1"].density == 0.5
        cfg = moe.config
        with pytest.raises(ValueError, match="already stored as NMSparse"):
            moe.to_format("samoyeds")
    kind = {"nm": formats.NMSparse, "samoyeds": formats.SamoyedsSparse}[fmt]
    assert all(isinstance(w, kind) for w in (moe.w1.get_value(), moe.w2.get_value()))
    assert moe.sparsify() is None  # already sparse
    x = jnp.asarray(rng.standard_normal((3, d)), jnp.float32)
    routing = moe.route(x)
    dense = [w.to_dense() for w in (moe.w1.get_value(), moe.w3.get_value(), moe.w2.get_value())]
    expected = {"nm": 0.5, "samoyeds": 0.25}[fmt]
    assert float(jnp.mean(dense[0] != 0)) == pytest.approx(expected, abs=0.02)
    ref = loop_reference(x, routing.topk_idx, routing.topk_weights, *dense)
    # Samoyeds on xla is only ``to_dense`` (checked above); its kernel path is the one to wire.
    for implementation in ("xla", "triton") if fmt == "nm" else ("triton",):
        moe.config = cfg.replace(implementation=implementation)
        y, _ = nnx.jit(lambda m, x: m(x))(moe, x)
        np.testing.assert_allclose(_np(y), ref, rtol=1e-4, atol=1e-5, err_msg=implementation)


@pytest.mark.parametrize("fmt", ["nm", "samoyeds", "unstructured"])
def test_sparse_experts_are_drawn_in_the_format_without_pruning(monkeypatch, fmt):
    """No pruning and no host compression at init; the layer's outputs keep the dense layer's
    scale; abstract evaluation keeps the dense layout that checkpoints are loaded into."""
    from pallas_kernels import format_registry, prune_masks
    from samoyeds_jax import pruning

    def refuse(*args, **kwargs):
        raise AssertionError("pruning called at init")

    for module, name in ((pruning, "prune_experts"), (prune_masks, "nm_keep"),
                         (prune_masks, "samoyeds_keep"), (prune_masks, "samoyeds_keep_shared"),
                         (prune_masks, "unstructured_keep")):
        monkeypatch.setattr(module, name, refuse)
    kind = format_registry.get_format(fmt).classes[0]
    monkeypatch.setattr(kind, "from_dense", refuse)
    cfg = MoEConfig(d_model=128, d_ff=128, num_experts=2, top_k=1, expert_format=fmt)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    assert all(isinstance(w, kind) for w in (moe.w1.get_value(), moe.w3.get_value(),
                                             moe.w2.get_value()))
    x = jax.random.normal(jax.random.key(1), (256, 128), jnp.float32)
    dense = MoE(cfg.replace(expert_format="dense"), rngs=nnx.Rngs(0))
    ratio = float(jnp.std(moe(x)[0]) / jnp.std(dense(x)[0]))
    assert 0.5 < ratio < 2.0, ratio
    abstract = nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0)))
    assert abstract.w1.get_value().shape == (2, 128, 128)
    assert isinstance(abstract.w1.get_value(), jax.ShapeDtypeStruct)


def test_sparsifying_a_merged_copy_leaves_the_original_dense():
    """``nnx.merge(*nnx.split(moe))`` shares the layer's variables: ``to_format`` on the copy gives
    it new ones, and the original keeps its dense experts and its output."""
    moe = MoE(_config(d_model=32, d_ff=64), rngs=nnx.Rngs(6))  # 2:4 needs K % 32 == 0
    x = jnp.asarray(np.random.default_rng(6).standard_normal((5, 32)), jnp.float32)
    want, _ = moe(x)
    copy = nnx.merge(*nnx.split(moe))
    copy.to_format("nm")
    assert hasattr(copy.w1.get_value(), "to_dense")
    assert isinstance(moe.w1.get_value(), jax.Array)
    np.testing.assert_array_equal(np.asarray(moe(x)[0]), np.asarray(want))

"""Fused MoE expert kernels (interpret mode on CPU) against the per-expert loop reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend as backend_lib
from pallas_kernels import expert_op
from pallas_kernels import moe_matmul as mm
from pallas_kernels import moe_tiles as mt
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.routing_plan import RoutingPlan

F32, BF16 = jnp.float32, jnp.bfloat16
_moe_ffn = jax.jit(mm.moe_ffn, static_argnames=("config",))
_xla = expert_op.get_op("xla")  # the XLA baseline: ragged_dot over the plan


def _rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _routing(rng, t: int, k: int, experts: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """topk_idx [t, k]: k distinct experts per token drawn from ``experts``; weights [t, k]."""
    idx = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(t)])
    w = rng.random((t, k)).astype(np.float32) + 0.1
    return jnp.asarray(idx, jnp.int32), jnp.asarray(w / w.sum(-1, keepdims=True))


def _weights(rng, e: int, d: int, f: int, dtype):
    w1 = rng.standard_normal((e, d, f)) / np.sqrt(d)
    w3 = rng.standard_normal((e, d, f)) / np.sqrt(d)
    w2 = rng.standard_normal((e, f, d)) / np.sqrt(f)
    return tuple(jnp.asarray(w, dtype) for w in (w1, w3, w2))


def _prune_24(w: np.ndarray) -> np.ndarray:
    """Keep the 2 largest |w| of every 4 consecutive K rows ([..., K, N])."""
    *lead, k, n = w.shape
    g = w.reshape(*lead, k // 4, 4, n)
    order = np.argsort(-np.abs(g), axis=-2)
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order[..., :2, :], True, axis=-2)
    return np.where(keep, g, 0).reshape(w.shape)


def _prune_samoyeds(w: np.ndarray, rng) -> np.ndarray:
    """1:2 column selection per 128-row K slab (random), then 2:4 along K."""
    *lead, k, n = w.shape
    slabs = w.reshape(*lead, k // 128, 128, n // 2, 2)
    pick = rng.integers(0, 2, size=(*lead, k // 128, 1, n // 2, 1))
    kept = np.where(np.arange(2) == pick, slabs, 0).reshape(w.shape)
    return _prune_24(kept)


def _check(y, ref, y_plain, dtype):
    """f32: tight. Low precision: within 2x the error of the same-dtype XLA path, and ~1e-2."""
    assert np.isfinite(np.asarray(y, np.float32)).all()
    err = _rel_err(y, ref)
    if dtype == F32:
        assert err < 1e-4, err
    else:
        assert err <= max(2 * _rel_err(y_plain, ref), 1e-2), (err, _rel_err(y_plain, ref))


@pytest.mark.parametrize(
    "t,e,k,dtype",
    [(1, 8, 2, F32), (3, 128, 8, BF16), (33, 64, 6, BF16), (257, 8, 1, F32)],
)
def test_dense_matches_reference(rng, t, e, k, dtype):
    d, f = 64, 128
    x = jnp.asarray(rng.standard_normal((t, d)), dtype)
    w1, w3, w2 = _weights(rng, e, d, f, dtype)
    idx, p = _routing(rng, t, k, np.arange(e))
    plan = RoutingPlan.build(idx, p, num_experts=e, block_t=16)
    y = _moe_ffn(x, plan, w1, w3, w2)
    assert y.shape == (t, d) and y.dtype == dtype
    ref = mm.moe_ffn_reference(x, plan, w1, w3, w2)
    y_xla = _xla(x, plan, w1, w3, w2)
    _check(y_xla, ref, y_xla, dtype)
    _check(y, ref, y_xla, dtype)


def test_one_expert_takes_all_tokens_others_none(rng):
    """257 tokens on expert 5 (k=1): 17 row tiles of one expert, 7 experts own no tile.

    Same shapes as the (257, 8, 1, f32) case above, so the jitted kernels are reused."""
    t, e, d, f = 257, 8, 64, 128
    x = jnp.asarray(rng.standard_normal((t, d)), F32)
    w1, w3, w2 = _weights(rng, e, d, f, F32)
    idx = jnp.full((t, 1), 5, jnp.int32)
    plan = RoutingPlan.build(idx, jnp.ones((t, 1), F32), num_experts=e, block_t=16)
    assert int(plan.num_blocks) == 17
    y = _moe_ffn(x, plan, w1, w3, w2)
    h = jax.nn.silu(x @ w1[5]) * (x @ w3[5])
    np.testing.assert_allclose(np.asarray(y), np.asarray(h @ w2[5]), rtol=1e-4, atol=1e-4)


def test_outputs_fully_written_over_poison(rng):
    """NaN-filled outputs: every row of a used tile and every assignment row gets written."""
    t, e, k, d, f = 20, 8, 2, 64, 128
    x = jnp.asarray(rng.standard_normal((t, d)), F32)
    w1, w3, w2 = _weights(rng, e, d, f, F32)
    idx, p = _routing(rng, t, k, np.arange(0, e, 2))  # odd experts get nothing
    plan = RoutingPlan.build(idx, p, num_experts=e, block_t=16)
    h = mm.gate_up(x, plan, w1, w3, h_init=jnp.full((plan.capacity, f), jnp.nan, F32))
    used = int(plan.num_blocks) * plan.block_t
    assert np.isfinite(np.asarray(h[:used])).all()
    out = mm.down(h, plan, w2, out_init=jnp.full((t * k + 1, d), jnp.nan, F32))
    assert np.isfinite(np.asarray(out[:t * k])).all()
    y = mm.combine(out, plan)
    np.testing.assert_allclose(np.asarray(y), np.asarray(mm.moe_ffn_reference(x, plan, w1, w3, w2)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gate_up_fmt,down_fmt", [("nm", "samoyeds"), ("samoyeds", "nm")])
def test_sparse_weights_match_reference(rng, gate_up_fmt, down_fmt):
    """2:4 and Samoyeds (1:2:128 + 2:4) stacks, mixed between the two kernels, bf16, experts
    3, 4, 5, 7 empty; d, f multiples of 128 (Samoyeds' v)."""
    t, e, k, d, f = 33, 8, 2, 128, 256
    x = jnp.asarray(rng.standard_normal((t, d)), BF16)
    dense = [np.asarray(w, np.float32) for w in _weights(rng, e, d, f, F32)]

    def compress(w, fmt):
        if fmt == "nm":
            return NMSparse.from_dense(jnp.asarray(_prune_24(w), BF16), n=2, m=4)
        return SamoyedsSparse.from_dense(jnp.asarray(_prune_samoyeds(w, rng), BF16))

    ws = [compress(dense[0], gate_up_fmt), compress(dense[1], gate_up_fmt),
          compress(dense[2], down_fmt)]
    idx, p = _routing(rng, t, k, np.asarray([0, 1, 2, 6]))
    plan = RoutingPlan.build(idx, p, num_experts=e, block_t=16)
    # The first case loads sparse tiles by rows (default), the second as contiguous blocks.
    expand = "rows" if gate_up_fmt == "nm" else "block"
    tiles = mt.MoeTiles(block_n=64, block_k=64, expand=expand)
    y = _moe_ffn(x, plan, *ws, config=mt.MoeFfnConfig(gate_up=tiles, down=tiles))
    ref = mm.moe_ffn_reference(x, plan, *ws)
    y_xla = _xla(x, plan, *ws)
    _check(y, ref, y_xla, BF16)


def test_bad_inputs_raise(rng):
    t, e, k, d, f = 4, 4, 2, 64, 128
    x = jnp.asarray(rng.standard_normal((t, d)), F32)
    w1, w3, w2 = _weights(rng, e, d, f, F32)
    idx, p = _routing(rng, t, k, np.arange(e))
    plan = RoutingPlan.build(idx, p, num_experts=e, block_t=16)
    with pytest.raises(ValueError, match="tokens"):
        mm.moe_ffn(x[:3], plan, w1, w3, w2)
    with pytest.raises(ValueError, match="w3"):
        mm.moe_ffn(x, plan, w1, w3[:, :, :64], w2)
    with pytest.raises(ValueError, match="w2"):
        mm.moe_ffn(x, plan, w1, w3, w2[:3])
    with pytest.raises(ValueError, match="dtype"):
        mm.moe_ffn(x.astype(BF16), plan, w1, w3, w2)
    bad = mt.MoeFfnConfig(gate_up=mt.MoeTiles(block_n=256, block_k=64))
    with pytest.raises(ValueError, match="block_n"):
        mm.moe_ffn(x, plan, w1, w3, w2, config=bad)
    bad = mt.MoeFfnConfig(down=mt.MoeTiles(block_n=64, block_k=48))
    with pytest.raises(ValueError, match="power of two"):
        mm.moe_ffn(x, plan, w1, w3, w2, config=bad)
    s1 = NMSparse.from_dense(jnp.asarray(_prune_24(np.asarray(w1))), n=2, m=4)
    with pytest.raises(ValueError, match="same format|share one format"):
        mm.moe_ffn(x, plan, s1, w3, w2)


@pytest.mark.parametrize("fmt,expand", [("dense", "rows"), ("nm", "rows"), ("samoyeds", "rows"),
                                        ("samoyeds", "block")])
def test_kernels_lower_for_h100(rng, fmt, expand, monkeypatch):
    """The Triton lowering (jax -> Triton IR) runs on CPU for an abstract H100: catches ops
    that Pallas Triton cannot lower without a GPU."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    monkeypatch.setattr(backend_lib, "interpret_mode", lambda: False)
    t, e, k, d, f = 33, 8, 2, 256, 512
    x = jnp.zeros((t, d), BF16)
    dense = [np.asarray(w, np.float32) for w in _weights(rng, e, d, f, F32)]
    if fmt == "dense":
        ws = [jnp.asarray(w, BF16) for w in dense]
    elif fmt == "nm":
        ws = [NMSparse.from_dense(jnp.asarray(_prune_24(w), BF16), n=2, m=4) for w in dense]
    else:
        ws = [SamoyedsSparse.from_dense(jnp.asarray(_prune_samoyeds(w, rng), BF16))
              for w in dense]
    idx, p = _routing(rng, t, k, np.arange(e))

    tiles = mt.MoeTiles(block_n=64, block_k=128, expand=expand)

    def fn(x, idx, p, ws):
        plan = RoutingPlan.build(idx, p, num_experts=e, block_t=16)
        return mm.moe_ffn(x, plan, *ws, config=mt.MoeFfnConfig(gate_up=tiles, down=tiles))

    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(x, idx, p, ws).lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2


def test_default_tiles_fit_model_shapes():
    """default_block_t / default_config give legal tiles for every benchmarked shape and format."""
    shapes = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8),
              "deepseek": (2048, 1408, 64, 6), "qwen1.5": (2048, 1408, 60, 4)}
    assert mt.default_block_t(1, 2, 8) == 16
    assert mt.default_block_t(4096, 2, 8) == 64
    assert mt.default_block_t(256, 6, 64) == 32
    for d, f, e, k in shapes.values():
        for t in (1, 64, 4096):
            bt = mt.default_block_t(t, k, e)
            config = mt.default_config(t * k, d, f, block_t=bt)
            for kind in ("dense", "nm", "samoyeds"):
                up = mt.Layout(kind, d, f, n=2, m=4, m_sel=2 if kind == "samoyeds" else 1,
                                v=128)
                down = dataclasses.replace(up, k=f, n_out=d)
                mt.check_tiles("w1", up, config.gate_up, bt)
                mt.check_tiles("w2", down, config.down, bt)

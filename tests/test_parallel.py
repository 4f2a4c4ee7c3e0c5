"""Expert parallelism on fake CPU devices equals the single-device layer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax.config import MoEConfig
from samoyeds_jax.moe import MoE, ExpertWeights, expert_ffn
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.parallel import (ExpertParallel, expert_parallel_ffn, local_routing,
                                   make_expert_mesh, shard_experts, use_expert_parallel)
from samoyeds_jax.routing import Routing, route_logits

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")


def _experts(rng, e, d, f, dtype):
    mk = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), dtype)  # noqa: E731
    return ExpertWeights(mk(e, d, f), mk(e, d, f), mk(e, f, d))


def _routing(rng, t, e, k):
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    return route_logits(logits, top_k=k, norm="topk_softmax")


@pytest.mark.parametrize("tokens,t,devices", [("sharded", 36, 4), ("replicated", 3, 2)])
def test_matches_single_device_f32(rng, tokens, t, devices):
    e, d, f, k = 8, 16, 32, 2
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    routing, experts = _routing(rng, t, e, k), _experts(rng, e, d, f, jnp.float32)
    ep = ExpertParallel(mesh=make_expert_mesh(devices), tokens=tokens)
    want = expert_ffn(x, routing, experts, implementation="xla", dtype=jnp.float32)
    got = jax.jit(lambda x, r, w: expert_parallel_ffn(x, r, w, ep=ep))(
        x, routing, shard_experts(experts, ep))
    # Same math; only f32 rounding differs (the local matmuls see other row counts).
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_matches_single_device_bf16_top6_all_on_one_device(rng):
    e, d, f, k, t = 16, 16, 32, 6, 8
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
    routing = _routing(rng, t, e, k)
    # Every token picks experts 0..5, all held by device 0 of 2.
    routing = Routing(jnp.tile(jnp.arange(k, dtype=jnp.int32)[None, :], (t, 1)),
                      routing.topk_weights)
    experts = _experts(rng, e, d, f, jnp.bfloat16)
    ep = ExpertParallel(mesh=make_expert_mesh(2))
    want = expert_ffn(x, routing, experts, implementation="xla", dtype=jnp.bfloat16)
    got = expert_parallel_ffn(x, routing, shard_experts(experts, ep), ep=ep)
    chex.assert_trees_all_close(got.astype(jnp.float32), want.astype(jnp.float32),
                                rtol=2e-2, atol=2e-2)


def test_local_routing_keeps_only_local_experts():
    r = Routing(jnp.array([[0, 5], [3, 4]], jnp.int32), jnp.array([[0.6, 0.4], [0.7, 0.3]]))
    loc = local_routing(r, jnp.int32(4), 4)
    np.testing.assert_array_equal(np.asarray(loc.topk_idx), [[4, 1], [4, 0]])
    np.testing.assert_allclose(np.asarray(loc.topk_weights), [[0.0, 0.4], [0.0, 0.3]])


@pytest.mark.parametrize("pregate", ["standard", "pregated"])
def test_moe_module_expert_parallel(rng, pregate):
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, num_shared_experts=1,
                    pregate=pregate)
    ep = ExpertParallel(mesh=make_expert_mesh(4))
    moe = MoE(cfg, block_index=0, num_blocks=2, rngs=nnx.Rngs(0))
    ep_moe = MoE(cfg, block_index=0, num_blocks=2, rngs=nnx.Rngs(0))
    use_expert_parallel(ep_moe, ep)
    assert ep_moe.w1.get_value().sharding.spec == jax.sharding.PartitionSpec("expert")
    x = jnp.asarray(rng.standard_normal((2, 4, 16)), jnp.float32)
    y_ref, next_ref = moe(x)
    y, nxt = ep_moe(x)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if pregate == "pregated":
        np.testing.assert_array_equal(np.asarray(nxt.topk_idx), np.asarray(next_ref.topk_idx))
    else:
        assert nxt is None and next_ref is None


def test_expert_parallel_model_matches_single_device(rng):
    cfg = ModelConfig.tiny()
    ep = ExpertParallel(mesh=make_expert_mesh(2), tokens="replicated")
    ref = MoETransformer(cfg, rngs=nnx.Rngs(1))
    par = MoETransformer(cfg, rngs=nnx.Rngs(1))
    use_expert_parallel(par, ep)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
    forward = nnx.jit(lambda model, tokens: model(tokens)[0])
    want, got = forward(ref, tokens), forward(par, tokens)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise(rng):
    experts = _experts(rng, 6, 16, 32, jnp.float32)
    ep = ExpertParallel(mesh=make_expert_mesh(4))
    with pytest.raises(ValueError, match="multiple of the 'expert' axis size 4"):
        shard_experts(experts, ep)
    experts = _experts(rng, 8, 16, 32, jnp.float32)
    x = jnp.ones((3, 16), jnp.float32)
    with pytest.raises(ValueError, match="t=3 to be a multiple"):
        expert_parallel_ffn(x, _routing(rng, 3, 8, 2), experts, ep=ep)
    with pytest.raises(ValueError, match="not in the mesh axes"):
        ExpertParallel(mesh=make_expert_mesh(4), axis="data")
    with pytest.raises(ValueError, match="num_devices=99: need 1 to"):
        make_expert_mesh(99)


def test_generate_cli_with_expert_parallelism(capsys):
    from samoyeds_jax.generate_cli import main

    assert main(["--random-tiny", "--devices", "2", "--max-new-tokens", "3", "--no-eos",
                 "--prompt", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert "routed experts split over 2 devices (2 each)" in out
    assert "decode" in out and "tokens/s" in out
    with pytest.raises(ValueError, match="cannot be combined"):
        main(["--random-tiny", "--devices", "2", "--offload", "--max-new-tokens", "1"])
    from samoyeds_jax.cli import generate_main

    assert generate_main(["--random-tiny", "--devices", "99", "--max-new-tokens", "1"]) == 2
    assert ("samoyeds-generate: error: --devices 99: the model's 4 routed experts must split "
            "evenly") in capsys.readouterr().err


def test_triton_expert_parallel(rng):
    """The routed-token Pallas kernel inside shard_map: assignments to other devices' experts
    are out of range locally and left out of every row tile."""
    e, d, f, k, t = 4, 32, 64, 2, 6
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    routing, experts = _routing(rng, t, e, k), _experts(rng, e, d, f, jnp.float32)
    ep = ExpertParallel(mesh=make_expert_mesh(2), tokens="replicated")
    want = expert_ffn(x, routing, experts, implementation="xla", dtype=jnp.float32)
    got = expert_parallel_ffn(x, routing, shard_experts(experts, ep), ep=ep, implementation="triton")
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

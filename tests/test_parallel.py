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
from samoyeds_jax.parallel import (PLACEMENTS, ExpertParallel, expert_parallel_ffn, local_routing,
                                   make_expert_mesh, shard_experts, use_expert_parallel)
from samoyeds_jax.routing import Routing, route_logits

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")


def _experts(rng, e, d, f, dtype):
    mk = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), dtype)  # noqa: E731
    return ExpertWeights(mk(e, d, f), mk(e, d, f), mk(e, f, d))


def _routing(rng, t, e, k):
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    return route_logits(logits, top_k=k, norm="topk_softmax")


@pytest.mark.parametrize("tokens,t,devices,dispatch", [
    ("sharded", 36, 4, "all_gather"), ("replicated", 3, 2, "all_gather"),
    ("sharded", 36, 4, "all_to_all"), ("sharded", 4, 4, "all_to_all"),
    ("sharded", 6, 2, "all_to_all"), ("sharded", 3, 4, "all_gather"),
    ("sharded", 1, 4, "all_to_all"), ("sharded", 5, 2, "all_to_all")])
def test_matches_single_device_f32(rng, tokens, t, devices, dispatch):
    e, d, f, k = 8, 16, 32, 2
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    routing, experts = _routing(rng, t, e, k), _experts(rng, e, d, f, jnp.float32)
    ep = ExpertParallel(mesh=make_expert_mesh(devices), tokens=tokens, dispatch=dispatch)
    want = expert_ffn(x, routing, experts, implementation="xla", dtype=jnp.float32)
    got = jax.jit(lambda x, r, w: expert_parallel_ffn(x, r, w, ep=ep))(
        x, routing, shard_experts(experts, ep))
    # Same math; only f32 rounding differs (the local matmuls see other row counts).
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["all_gather", "all_to_all"])
def test_matches_single_device_bf16_top6_all_on_one_device(rng, dispatch):
    e, d, f, k, t = 16, 16, 32, 6, 8
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
    routing = _routing(rng, t, e, k)
    # Every token picks experts 0..5, all held by device 0 of 2.
    routing = Routing(jnp.tile(jnp.arange(k, dtype=jnp.int32)[None, :], (t, 1)),
                      routing.topk_weights)
    experts = _experts(rng, e, d, f, jnp.bfloat16)
    ep = ExpertParallel(mesh=make_expert_mesh(2), dispatch=dispatch)
    want = expert_ffn(x, routing, experts, implementation="xla", dtype=jnp.bfloat16)
    got = expert_parallel_ffn(x, routing, shard_experts(experts, ep), ep=ep)
    chex.assert_trees_all_close(got.astype(jnp.float32), want.astype(jnp.float32),
                                rtol=2e-2, atol=2e-2)


def test_local_routing_keeps_only_local_experts():
    r = Routing(jnp.array([[0, 5], [3, 4]], jnp.int32), jnp.array([[0.6, 0.4], [0.7, 0.3]]))
    loc = local_routing(r, jnp.int32(4), 4)
    np.testing.assert_array_equal(np.asarray(loc.topk_idx), [[4, 1], [4, 0]])
    np.testing.assert_allclose(np.asarray(loc.topk_weights), [[0.0, 0.4], [0.0, 0.3]])


@pytest.mark.parametrize("pregate,dispatch", [("standard", "all_gather"),
                                               ("pregated", "all_gather"),
                                               ("pregated", "all_to_all")])
def test_moe_module_expert_parallel(rng, pregate, dispatch):
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2, num_shared_experts=1,
                    pregate=pregate)
    ep = ExpertParallel(mesh=make_expert_mesh(4), dispatch=dispatch)
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


@pytest.mark.parametrize("placement", ["replicated", "all_to_all"])
def test_expert_parallel_model_matches_single_device(rng, placement):
    cfg = ModelConfig.tiny()
    ep = ExpertParallel(mesh=make_expert_mesh(2), **PLACEMENTS[placement])
    ref = MoETransformer(cfg, rngs=nnx.Rngs(1))
    par = MoETransformer(cfg, rngs=nnx.Rngs(1))
    use_expert_parallel(par, ep)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)), jnp.int32)
    forward = nnx.jit(lambda model, tokens: model(tokens)[0])
    want, got = forward(ref, tokens), forward(par, tokens)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nm", "samoyeds"])
@pytest.mark.parametrize("dispatch", ["all_gather", "all_to_all"])
def test_sparse_experts_under_expert_parallelism(rng, fmt, dispatch):
    """Samoyeds and 2:4 experts split over the devices: every leaf of the format leads with e."""
    cfg = MoEConfig(d_model=128, d_ff=256, num_experts=4, top_k=2, expert_format=fmt)
    moe = MoE(cfg, block_index=0, num_blocks=1, rngs=nnx.Rngs(2))
    experts = moe.expert_weights()
    x = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    routing = _routing(rng, 8, 4, 2)
    want = expert_ffn(x, routing, experts, implementation="xla", dtype=jnp.float32)
    ep = ExpertParallel(mesh=make_expert_mesh(2), dispatch=dispatch)
    got = jax.jit(lambda x, r, w: expert_parallel_ffn(x, r, w, ep=ep, implementation="xla"))(
        x, routing, shard_experts(experts, ep))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["all_gather", "all_to_all"])
def test_out_of_range_expert_ids_reach_no_expert(rng, dispatch):
    """Under jit an id outside [0, e) is the caller's contract (checked in
    pallas_kernels.checks.checked); both dispatches leave such an assignment out."""
    e, d, f, t = 8, 16, 32, 4
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    experts = _experts(rng, e, d, f, jnp.float32)
    good = Routing(jnp.array([[0, 5], [7, 2], [3, 3], [6, 1]], jnp.int32),
                   jnp.full((t, 2), 0.5, jnp.float32))
    bad = Routing(good.topk_idx.at[:, 1].set(jnp.array([8, -1, 99, -7])), good.topk_weights)
    alone = Routing(good.topk_idx[:, :1], good.topk_weights[:, :1])
    ep = ExpertParallel(mesh=make_expert_mesh(2), dispatch=dispatch)
    got = jax.jit(lambda x, r, w: expert_parallel_ffn(x, r, w, ep=ep))(
        x, bad, shard_experts(experts, ep))
    want = expert_ffn(x, alone, experts, implementation="xla", dtype=jnp.float32)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_ragged_all_to_all_reference_is_the_documented_example():
    """jax.lax.ragged_all_to_all's docstring example (axis of size 2), through the reference
    the CPU runs."""
    from jax.sharding import PartitionSpec as P

    from samoyeds_jax.dispatch import ragged_all_to_all_reference

    mesh = make_expert_mesh(2)
    per = lambda *rows: jnp.asarray(rows, jnp.int32)  # noqa: E731  [device, ...]
    args = (per([1, 2, 2], [3, 4, 0]), per([0, 0, 0, 0], [0, 0, 0, 0]), per([0, 1], [0, 1]),
            per([1, 2], [1, 1]), per([0, 0], [1, 2]), per([1, 1], [2, 1]))

    def body(*a):
        return ragged_all_to_all_reference(*(v[0] for v in a), axis="expert")[None]

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("expert"),) * 6,
                                out_specs=P("expert")))(*args)
    np.testing.assert_array_equal(np.asarray(out), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_bad_inputs_raise(rng):
    experts = _experts(rng, 6, 16, 32, jnp.float32)
    ep = ExpertParallel(mesh=make_expert_mesh(4))
    with pytest.raises(ValueError, match="multiple of the 'expert' axis size 4"):
        shard_experts(experts, ep)
    with pytest.raises(ValueError, match="not in the mesh axes"):
        ExpertParallel(mesh=make_expert_mesh(4), axis="data")
    with pytest.raises(ValueError, match="dispatch must be 'all_gather' or 'all_to_all', got 'a2a'"):
        ExpertParallel(mesh=make_expert_mesh(4), dispatch="a2a")
    with pytest.raises(ValueError, match="needs tokens='sharded', got tokens='replicated'"):
        ExpertParallel(mesh=make_expert_mesh(4), dispatch="all_to_all", tokens="replicated")
    with pytest.raises(ValueError, match="num_devices=99: need 1 to"):
        make_expert_mesh(99)


def test_generate_cli_with_expert_parallelism(capsys):
    from samoyeds_jax.generate_cli import main

    assert main(["--random-tiny", "--devices", "2", "--max-new-tokens", "3", "--no-eos",
                 "--prompt", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert "routed experts split over 2 devices (2 each), tokens replicated" in out
    assert "decode" in out and "tokens/s" in out
    tokens = out.split("output")[1].splitlines()[0]
    for dispatch in ("all_gather", "all_to_all"):
        assert main(["--random-tiny", "--devices", "2", "--dispatch", dispatch,
                     "--max-new-tokens", "3", "--no-eos", "--prompt", "1,2,3"]) == 0
        out = capsys.readouterr().out
        assert f"tokens {dispatch}" in out
        assert out.split("output")[1].splitlines()[0] == tokens  # the same greedy tokens
    with pytest.raises(ValueError, match="--dispatch has no effect here: it places the tokens "
                                         "for --devices > 1, which is not given"):
        main(["--random-tiny", "--dispatch", "all_to_all", "--max-new-tokens", "1"])
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

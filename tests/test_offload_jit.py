"""Experts fetched from pinned host inside one jitted decode step (``offload_engines.in_jit``).

Every policy must give the outputs of ``gpu_only`` with the same block functions (bit for
bit on CPU, within ``assert_matches_gpu_only``'s bound on a GPU), compile once per token count, and lower (for CUDA) to one
``annotate_device_placement`` per fetched slot and leaf.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offload_engines import in_jit as oj
from offload_engines.decoder import OffloadDecoder, moe_stack
from offload_engines.simple_block import SimpleMoEBlock
from samoyeds_jax.expert_store import ExpertStore
from samoyeds_jax.offload import OffloadConfig

L, E, D, F = 3, 4, 16, 32

# Shared block instances (one per top_k) so decoders reuse the same block functions.
_BLOCKS = {k: SimpleMoEBlock(num_experts=E, top_k=k, dtype=jnp.float32) for k in (1, 2)}


def _experts(rng, *, gated=True):
    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)
    out = []
    for _ in range(L):
        tree = {"w1": w(E, D, F), "w2": w(E, F, D)}
        if gated:
            tree["w3"] = w(E, D, F)
        out.append(tree)
    return out


def _model(rng, *, top_k):
    """Blocks whose pre-gate equals the next block's router (Pre-gated MoE's initialization)."""
    block = _BLOCKS[top_k]
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), L)
    params = [block.init_params(k, d_model=D, attn_width=24) for k in keys]
    params = [dict(p, pregate=params[l + 1]["router"]) if l + 1 < L else p
              for l, p in enumerate(params)]
    return block, params, oj.pinned_host_stacks(_experts(rng))


def _run(fns, params, stacks, h0, *, steps=2, **config):
    dec = oj.InJitDecoder(fns, params, stacks, config=oj.InJitConfig(**config))
    h, outs = h0, []
    for _ in range(steps):
        h = dec.step(h)
        outs.append(np.asarray(h))
    return np.stack(outs), dec


def assert_matches_gpu_only(got, ref, err_msg=""):
    """Bit for bit on CPU. On a GPU each policy is its own XLA program, and the compiler may
    pick another kernel for the same float32 product: measured differences up to 7.6e-5
    relative, 3.8e-6 absolute (H100); the bound tested is 4x that."""
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(got, ref, err_msg=err_msg)
    else:
        np.testing.assert_allclose(got, ref, rtol=3e-4, atol=1.5e-5, err_msg=err_msg)


def _inputs(rng, t):
    return jnp.asarray(rng.standard_normal((t, D)).astype(np.float32))


# ----------------------------------------------------------------------------- stacks


def test_stacks_are_pinned_host_and_checked(rng):
    layers = _experts(rng)
    stacks = oj.pinned_host_stacks(layers)
    for s, ref in zip(stacks, layers):
        for name, leaf in s.items():
            assert leaf.sharding.memory_kind == "pinned_host"
            np.testing.assert_array_equal(np.asarray(leaf), ref[name])
    with pytest.raises(ValueError, match="leading expert axis"):
        oj.pinned_host_stacks([{"w1": np.zeros((E, D, F)), "w2": np.zeros((E - 1, F, D))}])
    with pytest.raises(ValueError, match="as layer 0"):
        oj.pinned_host_stacks([layers[0], {"w1": layers[1]["w1"]}])
    with pytest.raises(ValueError, match="as layer 0"):
        oj.pinned_host_stacks([layers[0], dict(layers[1], w2=layers[1]["w2"][:, :, :3])])
    with pytest.raises(ValueError, match="at least one layer"):
        oj.pinned_host_stacks([])
    block, params, _ = _model(rng, top_k=1)
    with pytest.raises(ValueError, match="pinned_host"):
        oj.InJitDecoder(block.fns(), params, oj.device_stacks(stacks))
    with pytest.raises(ValueError, match="expert stacks"):
        oj.InJitDecoder(block.fns(), params[:2], stacks)


def test_config_errors():
    with pytest.raises(ValueError, match="policy must be one of"):
        oj.InJitConfig(policy="prefetch_all")
    with pytest.raises(ValueError, match="routing_source='pregate'"):
        oj.InJitConfig(policy="pregated", routing_source="router")
    with pytest.raises(ValueError, match="routing_source must be"):
        oj.InJitConfig(policy="on_demand", routing_source="oracle")


def test_stacks_from_store_match(rng):
    layers = _experts(rng, gated=False)
    store = ExpertStore.from_stacked(layers)
    stacks = oj.stacks_from_store(store)
    for s, ref in zip(stacks, layers):
        assert s["w1"].sharding.memory_kind == "pinned_host"
        chex.assert_trees_all_equal(jax.device_get(s), ref)


# ----------------------------------------------------------------------------- fetch


def test_fetch_experts_in_jit_with_duplicates(rng):
    """Traced ids, duplicates copied twice, result in device memory, one trace for new ids."""
    stack = oj.pinned_host_stacks(_experts(rng))[0]
    host = {k: np.asarray(v) for k, v in stack.items()}

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fetch(stack, ids):
        return oj.fetch_experts(stack, ids)

    for ids in ([3, 1, 3], [0, 0, 2], [2, 3, 1]):
        got = fetch(stack, jnp.asarray(ids, jnp.int32))
        for name, leaf in got.items():
            assert leaf.sharding.memory_kind == "device"
            np.testing.assert_array_equal(np.asarray(leaf), host[name][ids])
    with pytest.raises(ValueError, match=r"ids must be \[n\]"):
        oj.fetch_experts(stack, jnp.zeros((2, 2), jnp.int32))


def test_fetch_sparse_format_experts(rng):
    """NMSparse 2:4 stacks (leaves lead with e) are fetched leaf by leaf, static fields kept."""
    from pallas_kernels.formats import NMSparse
    w = rng.standard_normal((E, 32, 8)).astype(np.float32)
    w.reshape(E, 8, 4, 8)[:, :, 2:, :] = 0.0          # 2 of every 4 along K: 2:4
    stack = oj.pinned_host_stacks([{"w1": NMSparse.from_dense(w)}])[0]
    assert stack["w1"].values.sharding.memory_kind == "pinned_host"
    got = jax.jit(oj.fetch_experts)(stack, jnp.asarray([2, 0], jnp.int32))
    assert isinstance(got["w1"], NMSparse) and got["w1"].values.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(got["w1"].to_dense()), w[[2, 0]])


def test_fetch_block_whole_stack_when_every_expert_is_taken(rng):
    """t*k >= e: one copy of the whole stack, slot = expert id; else the planned slots."""
    stack = oj.pinned_host_stacks(_experts(rng))[0]
    host = {k: np.asarray(v) for k, v in stack.items()}
    topk = jnp.asarray([[1, 1], [1, 3]], jnp.int32)              # t*k = 4 = e, 2 distinct
    got, slots = jax.jit(oj.fetch_block)(stack, topk)
    np.testing.assert_array_equal(np.asarray(slots), np.asarray(topk))
    for name, leaf in got.items():
        assert leaf.sharding.memory_kind == "device"
        np.testing.assert_array_equal(np.asarray(leaf), host[name])
    got, slots = jax.jit(oj.fetch_block)(stack, jnp.asarray([[3, 1]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(slots), [[1, 0]])   # slots hold experts 1, 3
    np.testing.assert_array_equal(np.asarray(got["w1"]), host["w1"][[1, 3]])
    text = jax.export.export(jax.jit(oj.fetch_block), platforms=["cuda"])(
        stack, topk).mlir_module()
    assert oj.host_transfer_ops(text)["annotate_device_placement"] == len(host)  # one per leaf
    assert "dynamic_slice" not in text
    assert text.count("stablehlo.optimization_barrier") == 1   # the copy waits for routing


def test_fetch_plan_distinct_sorted_padded():
    """Distinct experts ascending, padded with e-1; every choice points at its expert's slot."""
    topk = jnp.asarray([[2, 0], [2, 1], [0, 2]], jnp.int32)      # 3 distinct of e = 4
    ids, slots = oj.fetch_plan(topk, E)
    np.testing.assert_array_equal(np.asarray(ids), [0, 1, 2, 3])  # 3 = padding (e - 1)
    np.testing.assert_array_equal(np.asarray(ids)[np.asarray(slots)], np.asarray(topk))
    ids, slots = oj.fetch_plan(jnp.asarray([[3]], jnp.int32), E)
    assert ids.shape == (1,) and int(ids[0]) == 3 and int(slots[0, 0]) == 0
    ids, slots = oj.fetch_plan(jnp.asarray([[1], [1], [1]], jnp.int32), E)  # all on one
    np.testing.assert_array_equal(np.asarray(ids), [1, 3, 3])
    np.testing.assert_array_equal(np.asarray(slots), [[0], [0], [0]])
    assert oj.slots_per_block(1, 2, 8) == 2 and oj.slots_per_block(8192, 1, 8) == 8


# ----------------------------------------------------------------------------- policies


CASES = [("on_demand", "pregate"), ("pregated", "pregate"), ("on_demand", "router")]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("t", [1, 3])
def test_policies_match_gpu_only(rng, top_k, t):
    """t in {1, 3}, top-1 and top-2, 2 steps, one trace each: equal to gpu_only."""
    block, params, stacks = _model(rng, top_k=top_k)
    h0 = _inputs(rng, t)
    ref = {}
    for src in ("pregate", "router"):
        ref[src], dec = _run(block.fns(), params, stacks, h0, policy="gpu_only",
                             routing_source=src)
        assert np.isfinite(ref[src]).all() and dec.traces == 1
    for policy, src in CASES:
        got, dec = _run(block.fns(), params, stacks, h0, policy=policy, routing_source=src)
        assert_matches_gpu_only(got, ref[src], err_msg=f"{policy=} {src=}")
        assert dec.traces == 1, f"{policy=} retraced: {dec.traces}"
        assert dec.bytes_per_step(t, top_k) == L * min(t * top_k, E) * 3 * D * F * 4


def _barriers(dec, h0) -> int:
    return dec.lower(h0).as_text().count("optimization_barrier")


def test_tied_prefetch_matches_gpu_only(rng):
    """tie_prefetch only adds an optimization_barrier: the outputs stay those of gpu_only."""
    block, params, stacks = _model(rng, top_k=2)
    h0 = _inputs(rng, 1)   # 2 slots of 4: per-slot fetches, whose ids need no barrier
    ref, gpu_only = _run(block.fns(), params, stacks, h0, policy="gpu_only")
    got, dec = _run(block.fns(), params, stacks, h0, policy="pregated", tie_prefetch=True)
    assert_matches_gpu_only(got, ref)
    # L - 1 ties, and block 0's on-demand fetch held before its experts (beyond the barriers
    # the block's own expert compute has under gpu_only too)
    assert _barriers(dec, h0) - _barriers(gpu_only, h0) == (L - 1) + 1


def test_on_demand_holds_each_block_until_its_experts_arrive(rng):
    """on_demand: one optimization_barrier per block between its fetch and its experts."""
    block, params, stacks = _model(rng, top_k=2)
    h0 = _inputs(rng, 1)
    dec, gpu_only = (oj.InJitDecoder(block.fns(), params, stacks, config=oj.InJitConfig(
        policy=p, routing_source="router")) for p in ("on_demand", "gpu_only"))
    assert _barriers(dec, h0) - _barriers(gpu_only, h0) == L


def test_pregated_matches_host_driven_decoder(rng):
    """Same model through decoder.OffloadDecoder (host-driven, per-block programs): bit for
    bit on CPU, within the bound of two XLA programs on a GPU."""
    block, params, stacks = _model(rng, top_k=2)
    layers = [jax.device_get(s) for s in stacks]
    h0 = _inputs(rng, 3)
    got, _ = _run(block.fns(), params, stacks, h0, steps=1, policy="pregated")
    dec = OffloadDecoder(block.fns(), params, ExpertStore.from_stacked(layers), top_k=2,
                         config=OffloadConfig(policy="pregated"), max_tokens=3)
    ref = np.asarray(dec.step(h0))
    assert_matches_gpu_only(got[0], ref)


def test_decode_step_traces_once_under_chex(rng):
    block, params, stacks = _model(rng, top_k=2)
    cfg = oj.InJitConfig(policy="pregated")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, experts, h):
        return oj.decode_step(block.fns(), cfg, params, experts, h)

    h = _inputs(rng, 1)
    for _ in range(3):
        h = step(params, stacks, h)
    assert np.isfinite(np.asarray(h)).all()


def test_sparse_experts_pregated_match_gpu_only(rng):
    """Mixed dense / NMSparse leaves in one expert pytree, fetched and used exactly."""
    from pallas_kernels.formats import NMSparse
    block, params, _ = _model(rng, top_k=2)
    layers = []
    for tree in _experts(rng):   # w2 [e, F=32, D] in 2:4 (K = 32); w1/w3 (K = 16) stay dense
        w2 = tree["w2"]
        w2.reshape(E, F // 4, 4, D)[:, :, :2, :] = 0.0
        layers.append(dict(tree, w2=NMSparse.from_dense(w2)))
    stacks = oj.pinned_host_stacks(layers)
    h0 = _inputs(rng, 3)
    ref, _ = _run(block.fns(), params, stacks, h0, policy="gpu_only")
    got, _ = _run(block.fns(), params, stacks, h0, policy="pregated")
    assert_matches_gpu_only(got, ref)


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("policy,moves", [("gpu_only", 0), ("on_demand", L), ("pregated", L)])
def test_cuda_lowering_moves_each_slot_to_device(rng, policy, moves):
    """Lowered for CUDA: one device placement per fetched (slot, leaf), a slice of a
    pinned_host parameter before it; gpu_only moves nothing."""
    block, params, stacks = _model(rng, top_k=1)
    dec = oj.InJitDecoder(block.fns(), params, stacks, config=oj.InJitConfig(policy=policy))
    exported = jax.export.export(dec._step, platforms=["cuda"])(
        dec.layer_params, dec.experts, _inputs(rng, 1))
    text = exported.mlir_module()
    ops = oj.host_transfer_ops(text)
    assert ops["annotate_device_placement"] == moves * 3        # t*k = 1 slot, 3 leaves
    assert text.count('mhlo.memory_kind = "pinned_host"') == (0 if policy == "gpu_only"
                                                              else L * 3)


# ----------------------------------------------------------------------------- MoE layers


def test_moe_layers_pregated_match_module_chain(rng):
    """samoyeds_jax.moe.MoE stacks through decoder.moe_stack: in-jit pregated == the module
    chain (to f32 rounding: the layer's ragged_dot orders rows by slot)."""
    from flax import nnx

    from samoyeds_jax.config import MoEConfig
    from samoyeds_jax.moe import MoE
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2, pregate="pregated")
    seed = int(rng.integers(2**31))
    moes = [MoE(cfg, block_index=i, num_blocks=2, track_recall=False, rngs=nnx.Rngs(seed + i))
            for i in range(2)]
    fns, params, store = moe_stack(moes)
    stacks = oj.stacks_from_store(store)
    h0 = _inputs(rng, 3)
    h, routing = h0, None
    for m in moes:
        y, routing = m(h, routing=routing)
        h = h + y
    for policy in ("gpu_only", "on_demand", "pregated"):
        got, _ = _run(fns, params, stacks, h0, steps=1, policy=policy)
        chex.assert_trees_all_close(got[0], np.asarray(h), rtol=2e-5, atol=2e-5,
                                    custom_message=policy)

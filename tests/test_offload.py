"""Host-offloaded experts: pinned-host store, slot cache, eviction, fetch policies.

Every policy must give exactly (bit for bit) the outputs of ``gpu_only`` with the same
block functions; evicted slots are poisoned (NaN) so a read of one would show.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offload_engines.decoder import BlockFns, OffloadDecoder, moe_stack, overlap_fraction
from offload_engines.simple_block import SimpleMoEBlock, expert_mlp
from samoyeds_jax.expert_cache import ExpertCache
from samoyeds_jax.expert_store import ExpertStore, device_sharding, pinned_host_sharding
from samoyeds_jax.offload import BlockScheduler, OffloadConfig
from samoyeds_jax.routing import Routing

L, E, D, F = 2, 3, 16, 32


def _experts(rng, *, layers=L, experts=E, gated=True):
    def w(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)
    out = []
    for _ in range(layers):
        tree = {"w1": w(experts, D, F), "w2": w(experts, F, D)}
        if gated:
            tree["w3"] = w(experts, D, F)
        out.append(tree)
    return out


# Shared block instances: decoders with the same block functions share compilations.
_BLOCKS = {k: SimpleMoEBlock(num_experts=E, top_k=k, dtype=jnp.float32) for k in (1, 2)}


def _model(rng, *, top_k, layers=L, experts=E, gated=True):
    block = _BLOCKS[top_k]
    keys = jax.random.split(jax.random.key(int(rng.integers(2**31))), layers)
    params = [block.init_params(k, d_model=D, attn_width=24) for k in keys]
    store = ExpertStore.from_stacked(_experts(rng, layers=layers, experts=experts, gated=gated))
    return block, params, store


def _decode(block, params, store, *, top_k, steps, h0, **config):
    fns = block if isinstance(block, BlockFns) else block.fns()
    config.setdefault("poison_evicted", True)
    dec = OffloadDecoder(fns, params, store, top_k=top_k,
                         config=OffloadConfig(**config),
                         max_tokens=h0.shape[0])
    h, outs = h0, []
    for _ in range(steps):
        h = dec.step(h)
        outs.append(np.asarray(h))
    return np.stack(outs), dec


def _inputs(rng, steps_tokens):
    return jnp.asarray(rng.standard_normal((steps_tokens, D)).astype(np.float32))


# ----------------------------------------------------------------------------- store


def test_store_is_pinned_host_and_round_trips(rng):
    layers = _experts(rng)
    store = ExpertStore.from_stacked(layers)
    assert (store.num_layers, store.num_experts) == (L, E)
    assert store.expert_nbytes == 4 * (2 * D * F + F * D)
    assert store.nbytes == store.expert_nbytes * L * E
    for l in range(L):
        for e in range(E):
            tree = store.expert(l, e)
            for name, leaf in tree.items():
                assert leaf.sharding.memory_kind == "pinned_host"
                np.testing.assert_array_equal(np.asarray(leaf), layers[l][name][e])
        stacked = store.stacked(l)
        assert stacked["w1"].sharding.memory_kind == "device"
        np.testing.assert_array_equal(np.asarray(stacked["w2"]), layers[l]["w2"])


def test_store_rejects_bad_inputs(rng):
    layers = _experts(rng)
    with pytest.raises(ValueError, match="leading expert axis"):
        ExpertStore.from_stacked([{"w1": layers[0]["w1"], "w2": layers[0]["w2"][:2]}])
    with pytest.raises(ValueError, match="pinned_host"):
        ExpertStore([[{"w": jnp.zeros((2, 2))}]])              # device memory, not pinned host
    host = pinned_host_sharding()
    a = jax.device_put(jnp.zeros((2, 2)), host)
    b = jax.device_put(jnp.zeros((2, 3)), host)
    with pytest.raises(ValueError, match="expected"):
        ExpertStore([[{"w": a}, {"w": b}]])                   # experts of different shapes
    with pytest.raises(ValueError, match="experts"):
        ExpertStore([[{"w": a}, {"w": a}], [{"w": a}]])       # layers of different sizes


def test_store_from_fn_builds_one_expert_at_a_time():
    store = ExpertStore.from_fn(
        lambda l, e: {"w": jnp.full((4, 4), 10 * l + e, jnp.bfloat16)}, num_layers=2, num_experts=3)
    assert store.expert(1, 2)["w"].sharding.memory_kind == "pinned_host"
    assert float(np.asarray(store.expert(1, 2)["w"], np.float32)[0, 0]) == 12.0


def _nm24_stack(rng, e, k_in, n_out):
    """[e, k_in, n_out] float32 that is 2:4 along K (two random survivors per group of 4)."""
    w = rng.standard_normal((e, k_in // 4, 4, n_out)).astype(np.float32) * 0.3
    rank = np.argsort(rng.random(w.shape), axis=2).argsort(axis=2)
    return np.where(rank < 2, w, 0.0).reshape(e, k_in, n_out)


def test_nm_sparse_experts_are_offloaded(rng):
    """2:4 experts (pallas_kernels.formats.NMSparse, leading e) go through store and cache."""
    from pallas_kernels.formats import NMSparse
    top_k, d, f = 1, 32, 64
    layers = [{"w1": NMSparse.from_dense(_nm24_stack(rng, E, d, f)),
               "w2": NMSparse.from_dense(_nm24_stack(rng, E, f, d))} for _ in range(L)]
    store = ExpertStore.from_stacked(layers)
    leaf = store.expert(0, 1)["w1"]
    assert isinstance(leaf, NMSparse) and leaf.values.sharding.memory_kind == "pinned_host"
    assert leaf.values.shape == (d // 2, f) and leaf.k == d
    on_device = jax.device_put(leaf, device_sharding())   # no compute on host memory
    np.testing.assert_array_equal(np.asarray(on_device.to_dense()),
                                  np.asarray(layers[0]["w1"].to_dense()[1]))
    block = _BLOCKS[top_k]
    params = [block.init_params(k, d_model=d) for k in jax.random.split(jax.random.key(1), L)]
    h0 = jnp.asarray(rng.standard_normal((2, d)).astype(np.float32))
    ref, _ = _decode(block, params, store, top_k=top_k, steps=1, h0=h0, policy="gpu_only")
    got, dec = _decode(block, params, store, top_k=top_k, steps=1, h0=h0, policy="pregated",
                       slots=2)
    np.testing.assert_array_equal(got, ref)
    assert np.isfinite(ref).all()
    assert dec.cache.buffers["w1"].values.shape == (2, d // 2, f)
    assert dec.cache.buffers["w1"].meta.dtype == jnp.int32


# ----------------------------------------------------------------------------- cache


def test_cache_size_errors(rng):
    store = ExpertStore.from_stacked(_experts(rng))
    with pytest.raises(ValueError, match="slots must be a positive int, got 0"):
        ExpertCache(store, slots=0, top_k=1)
    with pytest.raises(ValueError, match="slots >= top_k"):
        ExpertCache(store, slots=1, top_k=2)
    with pytest.raises(ValueError, match="eviction"):
        ExpertCache(store, slots=2, top_k=1, eviction="fifo")
    cache = ExpertCache(store, slots=2, top_k=2)
    with pytest.raises(ValueError, match="3 experts resident at once"):
        cache.fetch(0, [0, 1, 2], demand=True)


def _fill(cache, layer, experts):
    cache.fetch(layer, experts, demand=True)
    cache.commit(layer)
    cache.use(layer, experts)
    table = cache.table(layer)
    device_table = np.asarray(cache.device_table[layer])
    np.testing.assert_array_equal(device_table[table >= 0], table[table >= 0])
    return table


def test_lru_evicts_least_recently_used(rng):
    store = ExpertStore.from_stacked(_experts(rng))
    cache = ExpertCache(store, slots=2, top_k=1, eviction="lru")
    _fill(cache, 0, [0])
    _fill(cache, 0, [1])
    cache.use(0, [0])          # expert 1 is now the least recently used
    _fill(cache, 0, [2])
    assert cache.resident(0, 0) and cache.resident(0, 2) and not cache.resident(0, 1)
    assert cache.stats.evictions == 1


def test_lfu_evicts_least_frequently_used(rng):
    store = ExpertStore.from_stacked(_experts(rng))
    cache = ExpertCache(store, slots=2, top_k=1, eviction="lfu")
    _fill(cache, 0, [0])
    cache.use(0, [0])
    cache.use(0, [0])          # expert 0: 3 uses
    _fill(cache, 0, [1])       # expert 1: 1 use, and the most recent
    _fill(cache, 0, [2])
    assert cache.resident(0, 0) and cache.resident(0, 2) and not cache.resident(0, 1)


def test_evicted_expert_is_poisoned_and_never_served(rng):
    layers = _experts(rng)
    store = ExpertStore.from_stacked(layers)
    cache = ExpertCache(store, slots=1, top_k=1, poison_evicted=True)
    table = _fill(cache, 0, [0])
    slot = int(table[0])
    np.testing.assert_array_equal(np.asarray(cache.buffers["w1"][slot]), layers[0]["w1"][0])
    cache.fetch(1, [2], demand=True)   # evicts (0, 0); (1, 2) not yet written
    assert np.isnan(np.asarray(cache.buffers["w1"][slot])).all()
    with pytest.raises(KeyError, match="not resident"):
        cache.use(0, [0])
    with pytest.raises(RuntimeError, match="not committed"):
        cache.use(1, [2])
    cache.commit(1)
    cache.use(1, [2])
    assert cache.table(1)[2] == slot and cache.table(0).tolist() == [-1, -1, -1]
    assert int(cache.device_table[1, 2]) == slot
    np.testing.assert_array_equal(np.asarray(cache.buffers["w2"][slot]), layers[1]["w2"][2])


# ----------------------------------------------------------------------------- policies


POLICIES = [("on_demand", "pregate"), ("prefetch_all", "pregate"), ("pregated", "pregate"),
            ("on_demand", "router"), ("speculative", "router")]


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_every_policy_and_cache_size_matches_gpu_only(rng, eviction):
    """top_k=1, one token: cache sizes 1..E (prefetch_all needs E), 3 steps, bit-exact."""
    top_k = 1
    block, params, store = _model(rng, top_k=top_k)
    h0 = _inputs(rng, 1)
    ref = {src: _decode(block, params, store, top_k=top_k, steps=3, h0=h0, policy="gpu_only",
                        routing_source=src)[0] for src in ("pregate", "router")}
    for src in ref:
        assert np.isfinite(ref[src]).all()
    for policy, src in POLICIES:
        for slots in range(1, E + 1):
            if policy == "prefetch_all" and slots < E:
                continue
            got, dec = _decode(block, params, store, top_k=top_k, steps=3, h0=h0, policy=policy,
                               routing_source=src, slots=slots, eviction=eviction)
            np.testing.assert_array_equal(got, ref[src], err_msg=f"{policy=} {slots=} {src=}")
            assert dec.cache.slots == slots


def test_policies_with_top2_and_awkward_token_counts(rng):
    """top_k=2 with 1 and 3 tokens (3 tokens may need every expert of a block at once)."""
    top_k = 2
    block, params, store = _model(rng, top_k=top_k)
    for t, sizes in ((1, (2, 3)), (3, (3,))):
        h0 = _inputs(rng, t)
        ref = {src: _decode(block, params, store, top_k=top_k, steps=2, h0=h0, policy="gpu_only",
                            routing_source=src)[0] for src in ("pregate", "router")}
        for policy, src in POLICIES:
            for slots in sizes:
                if policy == "prefetch_all" and slots < E:
                    continue
                got, _ = _decode(block, params, store, top_k=top_k, steps=2, h0=h0, policy=policy,
                                 routing_source=src, slots=slots)
                np.testing.assert_array_equal(got, ref[src], err_msg=f"{policy=} {t=} {slots=}")


def test_gpu_only_matches_dense_reference(rng):
    """The driver computes the model: compare with a plain loop over the stacked experts."""
    top_k = 2
    block, params, store = _model(rng, top_k=top_k, gated=False)
    h0 = _inputs(rng, 3)
    got, _ = _decode(block, params, store, top_k=top_k, steps=1, h0=h0, policy="gpu_only")
    h, routing = h0, None
    for l in range(L):
        h, x, own, pregate = block.front(params[l], h)
        use = own if routing is None else routing
        stacked = store.stacked(l)
        combine = use.combine_weights(E)                                  # [t, e]
        outs = jnp.stack([expert_mlp({k: v[e] for k, v in stacked.items()}, x,
                                     dtype=jnp.float32) for e in range(E)])  # [e, t, d]
        h, routing = h + jnp.einsum("etd,te->td", outs, combine), pregate
    chex.assert_trees_all_close(got[0], np.asarray(h), rtol=1e-5, atol=1e-5)


def test_accounting(rng):
    top_k = 1
    block, params, store = _model(rng, top_k=top_k)
    h0 = _inputs(rng, 1)
    nb = store.expert_nbytes
    # on_demand with room for everything: first step fetches one expert per block, then all hits
    dec = OffloadDecoder(block.fns(), params, store, top_k=top_k,
                         config=OffloadConfig(policy="on_demand", slots=L * E))
    dec.step(h0)
    assert dec.last_stats.bytes_fetched == L * nb and dec.last_stats.host_syncs == L
    assert dec.last_stats.bytes_per_token == L * nb
    dec.step(h0)
    assert dec.last_stats.bytes_fetched == 0 and dec.cache.stats.hit_rate == 0.5
    # prefetch_all moves whole blocks, without reading routing on the host
    dec = OffloadDecoder(block.fns(), params, store, top_k=top_k,
                         config=OffloadConfig(policy="prefetch_all", slots=E))
    dec.step(h0)
    assert dec.last_stats.host_syncs == 0
    assert dec.last_stats.bytes_fetched == (L + 1) * E * nb   # incl. block 0 of the next step
    # pregated: block 0 on demand, later blocks prefetched exactly
    dec = OffloadDecoder(block.fns(), params, store, top_k=top_k,
                         config=OffloadConfig(policy="pregated", slots=2))
    dec.step(h0)
    s = dec.cache.stats
    assert (s.misses, s.prefetched, s.prefetch_used) == (1, L - 1, L - 1)
    assert s.prefetch_accuracy == 1.0 and dec.last_stats.host_syncs == L - 1
    gpu = OffloadDecoder(block.fns(), params, store, top_k=top_k,
                         config=OffloadConfig(policy="gpu_only",
                                              read_routing_each_layer=True))
    gpu.step(h0)
    assert gpu.cache.nbytes == L * E * nb and gpu.last_stats.host_syncs == L - 1
    assert gpu.last_stats.bytes_fetched == 0
    assert overlap_fraction(10.0, 10.0, 4.0) == 1.0
    assert overlap_fraction(14.0, 10.0, 4.0) == 0.0
    assert overlap_fraction(12.0, 10.0, 4.0) == 0.5


def test_config_errors(rng):
    block, params, store = _model(rng, top_k=1)
    with pytest.raises(ValueError, match="routing_source='pregate'"):
        OffloadConfig(policy="pregated", routing_source="router")
    with pytest.raises(ValueError, match="routing_source='router'"):
        OffloadConfig(policy="speculative")
    with pytest.raises(ValueError, match="policy must be one of"):
        OffloadConfig(policy="lazy")
    with pytest.raises(ValueError, match="slots >= 6"):
        OffloadDecoder(block.fns(), params, store, top_k=1,
                       config=OffloadConfig(policy="gpu_only", slots=5))
    with pytest.raises(ValueError, match="slots >= 3"):
        OffloadDecoder(block.fns(), params, store, top_k=1,
                       config=OffloadConfig(policy="prefetch_all", slots=2))
    with pytest.raises(ValueError, match="slots must be a positive int, got 0"):
        OffloadDecoder(block.fns(), params, store, top_k=1,
                       config=OffloadConfig(policy="on_demand", slots=0))
    with pytest.raises(ValueError, match="layer params"):
        OffloadDecoder(block.fns(), params[:1], store, top_k=1)
    sched = BlockScheduler(ExpertCache(store, slots=2, top_k=1),
                           OffloadConfig(policy="on_demand"))
    r = Routing(jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.float32))
    with pytest.raises(ValueError, match="pre-gate routing of block 0"):
        sched.prepare(1, r, r)


# ----------------------------------------------------------------------------- MoE layers


@pytest.mark.parametrize("mode,source,policies", [
    ("pregated", "pregate", ("on_demand", "pregated", "prefetch_all")),
    ("speculative", "router", ("on_demand", "speculative")),
])
def test_moe_stack_offloaded_matches_module_chain(rng, mode, source, policies):
    """A stack of samoyeds_jax.moe.MoE layers: offloaded decode == chaining the modules.

    The layer's ragged_dot path orders rows by cache slot, and on CPU a row's rounding can
    depend on its position in the matmul, so policies agree to f32 rounding here (bit-exact
    agreement is tested with SimpleMoEBlock, whose arithmetic ignores the slot layout).
    No poisoning: XLA's CPU ragged_dot multiplies every group, empty ones included, so a
    NaN-filled free slot would reach the output through 0 * NaN.
    """
    from flax import nnx

    from samoyeds_jax.config import MoEConfig
    from samoyeds_jax.moe import MoE
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=4, top_k=2, pregate=mode)
    seed = int(rng.integers(2**31))
    moes = [MoE(cfg, block_index=i, num_blocks=2, track_recall=False, rngs=nnx.Rngs(seed + i))
            for i in range(2)]
    fns, params, store = moe_stack(moes)
    assert store.expert(1, 3)["w2"].sharding.memory_kind == "pinned_host"
    h0 = _inputs(rng, 3)
    h, routing = h0, None
    for m in moes:
        y, routing = m(h, routing=routing)
        h = h + y
    ref, _ = _decode(fns, params, store, top_k=2, steps=1, h0=h0, policy="gpu_only",
                     routing_source=source)
    chex.assert_trees_all_close(ref[0], np.asarray(h), rtol=1e-6, atol=1e-6)
    for policy in policies:
        got, _ = _decode(fns, params, store, top_k=2, steps=1, h0=h0, policy=policy,
                         routing_source=source, slots=4, poison_evicted=False)
        chex.assert_trees_all_close(got, ref, rtol=2e-5, atol=2e-5, custom_message=policy)

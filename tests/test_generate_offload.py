"""Generation with host-offloaded experts equals generation with every expert on the device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax import generate_offload
from samoyeds_jax.expert_cache import ExpertCache
from samoyeds_jax.converted_io import load_converted, save_converted
from samoyeds_jax import families
from samoyeds_jax.expert_store import host_experts, on_host
from samoyeds_jax.generate import Generator
from samoyeds_jax.generate_offload import OffloadGenerator
from samoyeds_jax.hf_export import save_hf_checkpoint
from samoyeds_jax.hf_import import load_hf_checkpoint
from samoyeds_jax.model import ModelConfig, MoETransformer, default_mlp
from samoyeds_jax.offload import OffloadConfig

PROMPTS = [[5, 9, 13], [7, 1, 3, 200, 11]]
NEW = 5


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[MoETransformer, np.ndarray]]:
    """pregate mode -> (model, tokens generated with every expert resident)."""
    out = {}
    for mode in ("pregated", "speculative"):
        model = MoETransformer(ModelConfig.tiny(pregate=mode), rngs=nnx.Rngs(5))
        out[mode] = (model, Generator(model).generate(PROMPTS, max_new_tokens=NEW).tokens)
    return out


@pytest.mark.parametrize("mode,policy,slots", [
    ("pregated", "pregated", None),
    ("pregated", "on_demand", 4),
    ("pregated", "prefetch_all", None),
    ("pregated", "gpu_only", None),
    ("speculative", "speculative", 5),
])
def test_offloaded_generation_matches_resident_experts(models, mode, policy, slots):
    model, ref = models[mode]
    source = "pregate" if mode == "pregated" else "router"
    gen = OffloadGenerator(model, offload=OffloadConfig(policy=policy, slots=slots,
                                                        routing_source=source))
    res = gen.generate(PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(res.tokens, ref)
    st = res.cache_stats
    assert res.cache_nbytes == gen.cache.slots * gen.store.expert_nbytes
    if policy == "gpu_only":  # preloaded, never fetched during generation
        assert gen.cache.slots == 8 and st["bytes_fetched"] == 0 and res.host_syncs == 0
        return
    assert st["hits"] + st["misses"] > 0 and 0.0 <= st["hit_rate"] <= 1.0
    if slots is not None and slots < 8:  # 2 layers x 4 experts: evicted and refetched
        assert st["evictions"] > 0 and st["misses"] > 0
    if policy != "on_demand":  # the next block's experts were prefetched and read
        assert st["prefetched"] > 0 and st["prefetch_used"] > 0
    if policy in ("on_demand", "pregated", "speculative"):  # expert ids read once per block
        assert res.host_syncs > 0
    if policy == "prefetch_all":  # only the cold block 0 is fetched on demand; no host reads
        assert st["misses"] == 4 and res.host_syncs == 0


def test_prefetch_is_issued_before_the_expert_compute(models, monkeypatch):
    """With room for two blocks, block 1's prefetch precedes block 0's expert compute."""
    events = []
    back, fetch = generate_offload._back, ExpertCache.fetch

    def spy_back(shared, h, x, routing, table, layer, *args, **kw):
        events.append(("back", int(layer)))
        return back(shared, h, x, routing, table, layer, *args, **kw)

    def spy_fetch(self, layer, experts, *, demand, **kw):
        events.append(("fetch", layer, demand))
        return fetch(self, layer, experts, demand=demand, **kw)

    monkeypatch.setattr(generate_offload, "_back", spy_back)
    monkeypatch.setattr(ExpertCache, "fetch", spy_fetch)
    gen = OffloadGenerator(models["pregated"][0], offload=OffloadConfig(policy="pregated"))
    gen.generate(PROMPTS, max_new_tokens=2, warmup=False)
    first_back = events.index(("back", 0))
    assert ("fetch", 1, False) in events[:first_back]
    assert gen.cache.slots == 8  # default: two blocks' experts (4 each for the 10-token prefill)


def test_offload_rejects_mismatched_routing_source():
    model = nnx.eval_shape(lambda: MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="pregate='pregated'"):
        OffloadGenerator(model, offload=OffloadConfig(policy="on_demand", routing_source="pregate"))


def test_a_model_built_with_host_experts_offloads_them_once(models):
    """``host_experts``: the experts never stay on the device; the generator moves them into its
    store (the model's copies are deleted) and generates what the resident model generates."""
    model, ref = models["pregated"]
    host_model = MoETransformer(ModelConfig.tiny(pregate="pregated"), rngs=nnx.Rngs(5),
                                mlp_factory=host_experts(default_mlp))
    stacks = [getattr(b.mlp, n).get_value() for b in host_model.layers for n in ("w1", "w3", "w2")]
    assert all(on_host(a) for a in stacks)
    np.testing.assert_array_equal(np.asarray(stacks[0]),
                                  np.asarray(model.layers[0].mlp.w1.get_value()))
    gen = OffloadGenerator(host_model, offload=OffloadConfig(policy="pregated"))
    assert all(a.is_deleted() for a in stacks)  # moved, not copied
    res = gen.generate(PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(res.tokens, ref)
    for l in range(2):
        ref_layer = model.layers[l].mlp
        for e in range(4):
            stored = gen.store.expert(l, e)
            assert all(on_host(a) for a in jax.tree.leaves(stored))
            np.testing.assert_array_equal(np.asarray(stored["w2"]),
                                          np.asarray(ref_layer.w2.get_value()[e]))


@pytest.mark.parametrize("stored", ["hf", "converted"])
def test_loading_with_experts_in_host_memory(models, tmp_path, stored):
    """``experts_memory="pinned_host"``: the loaders leave the routed experts (only them) in host
    memory, and offloaded generation gives the resident model's tokens."""
    model, ref = models["pregated"]
    if stored == "hf":
        save_hf_checkpoint(model, str(tmp_path))
        load = lambda memory: load_hf_checkpoint(str(tmp_path), pregate="pregated",
                                                 experts_memory=memory)[0]
    else:
        save_converted(model, str(tmp_path))
        load = lambda memory: load_converted(str(tmp_path), experts_memory=memory)[0]
    with pytest.raises(ValueError, match="experts_memory must be one of"):
        load("host")
    loaded = load("pinned_host")
    for path, value in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
        leaves = jax.tree.leaves(value.get_value())
        assert all(on_host(a) == families.routed(path) for a in leaves), path
    res = OffloadGenerator(loaded, offload=OffloadConfig(policy="pregated")).generate(
        PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(res.tokens, ref)

"""Generation with host-offloaded experts equals generation with every expert on the device."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from samoyeds_jax.generate import Generator
from samoyeds_jax.generate_offload import OffloadGenerator
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.offload import OffloadConfig

PROMPTS = [[5, 9, 13], [7, 1, 3, 200, 11]]
NEW = 5


@pytest.fixture(scope="module")
def pregated_model() -> MoETransformer:
    return MoETransformer(ModelConfig.tiny(pregate="pregated"), rngs=nnx.Rngs(5))


@pytest.mark.parametrize("policy,slots", [("pregated", None), ("on_demand", 4)])
def test_offloaded_generation_matches_resident_experts(pregated_model, policy, slots):
    ref = Generator(pregated_model).generate(PROMPTS, max_new_tokens=NEW)
    gen = OffloadGenerator(pregated_model, offload=OffloadConfig(policy=policy, slots=slots))
    res = gen.generate(PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    st = res.cache_stats
    assert st["hits"] + st["misses"] > 0 and 0.0 <= st["hit_rate"] <= 1.0
    assert res.cache_nbytes == gen.cache.slots * gen.store.expert_nbytes
    if slots == 4:  # 4 slots for 2 layers x 4 experts: experts are evicted and refetched
        assert st["evictions"] > 0 and st["misses"] > 0
    if policy == "pregated":  # block 1's experts were prefetched from block 0's pre-gate
        assert st["prefetched"] > 0 and st["prefetch_used"] > 0


def test_offload_rejects_mismatched_routing_source():
    model = nnx.eval_shape(lambda: MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="pregate='pregated'"):
        OffloadGenerator(model, offload=OffloadConfig(policy="on_demand", routing_source="pregate"))

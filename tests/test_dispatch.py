"""The all-to-all dispatch on one device: on a GPU this runs XLA's own ragged-all-to-all (the
multi-device cases, on fake CPU devices through the reference, are in test_parallel.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samoyeds_jax.moe import ExpertWeights, expert_ffn
from samoyeds_jax.parallel import (ExpertParallel, expert_parallel_ffn, make_expert_mesh,
                                   shard_experts)
from samoyeds_jax.routing import route_logits


@pytest.mark.parametrize("t,k", [(1, 2), (3, 2), (33, 6)])
def test_all_to_all_on_one_device_is_the_single_device_layer(rng, t, k):
    e, d, f = 8, 16, 32
    mk = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[-2]), jnp.float32)  # noqa: E731
    experts = ExpertWeights(mk(e, d, f), mk(e, d, f), mk(e, f, d))
    x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
    routing = route_logits(jnp.asarray(rng.standard_normal((t, e)), jnp.float32), top_k=k,
                           norm="topk_softmax")
    ep = ExpertParallel(mesh=make_expert_mesh(1), dispatch="all_to_all")
    got = jax.jit(lambda x, r, w: expert_parallel_ffn(x, r, w, ep=ep, implementation="xla"))(
        x, routing, shard_experts(experts, ep))
    want = expert_ffn(x, routing, experts, implementation="xla", dtype=jnp.float32)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

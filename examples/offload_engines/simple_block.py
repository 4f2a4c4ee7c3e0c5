"""A self-contained pre-gated MoE decoder block for the offload engines: ``SimpleMoEBlock``
(random parameters, ``BlockFns`` halves) and its pieces ``expert_mlp`` and ``topk_routing``.
Benchmarks and tests drive ``decoder.OffloadDecoder`` and ``in_jit.InJitDecoder`` with it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.format_registry import as_dense
from samoyeds_jax.expert_store import device_sharding
from samoyeds_jax.routing import Routing

from .decoder import BlockFns


def expert_mlp(w: dict[str, Any], x: jax.Array, *, dtype: Any) -> jax.Array:
    """One expert on x [t, d] -> [t, d] float32.

    ``w``: ``{"w1": [d, f], "w3": [d, f], "w2": [f, d]}`` (SwiGLU, Mixtral) or
    ``{"w1", "w2"}`` (ReLU MLP, Switch Transformer); leaves dense or sparse-format pytrees.
    """
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    x = x.astype(dtype)
    g = dot(x, as_dense(w["w1"], dtype))
    h = jax.nn.silu(g) * dot(x, as_dense(w["w3"], dtype)) if "w3" in w else jax.nn.relu(g)
    return dot(h.astype(dtype), as_dense(w["w2"], dtype))


def topk_routing(logits: jax.Array, top_k: int) -> Routing:
    """logits [t, e] -> ``Routing`` (softmax over the top-k logits, float32)."""
    vals, idx = jax.lax.top_k(logits.astype(jnp.float32), top_k)
    return Routing(idx.astype(jnp.int32), jax.nn.softmax(vals, axis=-1), None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimpleMoEBlock:
    """A minimal pre-gated MoE decoder block as ``BlockFns`` (no attention over a KV cache).

    front: ``a = (h @ attn_in)[:, :d] @ attn_out`` (the projections of an attention layer,
    standing in for its cost), ``h = h + a``, ``x = rms(h)``, own routing from
    ``x @ router``, next block's routing from ``x @ pregate`` (params [d, e]).
    back: ``h + sum_k p[t, k] * expert_{idx[t, k]}(x[t])`` with ``expert_mlp``. The experts of
    the block are visited in ascending expert id, each on all t tokens masked by its combine
    weight, so the arithmetic does not depend on which cache slot holds which expert, nor
    on how many slots there are (bit-identical to ``gpu_only``, on the GPU too).
    Work: (distinct experts of the block) x t tokens.
    """

    num_experts: int
    top_k: int
    dtype: Any = jnp.bfloat16

    def init_params(self, key: jax.Array, *, d_model: int, attn_width: int | None = None,
                    device: jax.Device | None = None) -> dict[str, jax.Array]:
        """Random block params on ``device``: attn_in [d, attn_width], attn_out [d, d],
        router and pregate [d, e] (float32)."""
        d, e = d_model, self.num_experts
        width = attn_width or d
        if width < d:
            raise ValueError(f"attn_width={width} must be >= d_model={d}")
        k1, k2, k3, k4 = jax.random.split(key, 4)
        scale = d ** -0.5
        params = {
            "attn_in": (jax.random.normal(k1, (d, width)) * scale).astype(self.dtype),
            "attn_out": (jax.random.normal(k2, (d, d)) * scale * 0.1).astype(self.dtype),
            "router": jax.random.normal(k3, (d, e)) * scale,
            "pregate": jax.random.normal(k4, (d, e)) * scale,
        }
        return jax.device_put(params, device_sharding(device))

    def fns(self) -> BlockFns:
        return BlockFns(front=self.front, back=self.back)

    def front(self, params, h: jax.Array):
        d = h.shape[-1]
        dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
        a = dot(h.astype(self.dtype), params["attn_in"])[:, :d]  # [t, d]
        h = h + dot(a.astype(self.dtype), params["attn_out"]).astype(h.dtype)
        xf = h.astype(jnp.float32)
        x = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6))
        own = topk_routing(dot(x, params["router"]), self.top_k)
        pregate = topk_routing(dot(x, params["pregate"]), self.top_k)
        return h, x.astype(self.dtype), own, pregate

    def back(self, params, h, x, routing: Routing, slot_idx, buffers):
        del params
        t, k = routing.topk_idx.shape
        e = self.num_experts
        used = jnp.unique(routing.topk_idx, size=min(t * k, e), fill_value=e)  # ascending ids
        y = jnp.zeros(h.shape, jnp.float32)
        for u in range(used.shape[0]):
            hit = routing.topk_idx == used[u]                                    # [t, k]
            slot = jnp.max(jnp.where(hit, slot_idx, -1))
            w = jax.tree_util.tree_map(lambda b: b[jnp.maximum(slot, 0)], buffers)
            # The copy out of the slot buffer is kept apart from the matmuls: fused in, its
            # shape (the slot count) could steer the GPU compiler to another GEMM kernel.
            w = jax.lax.optimization_barrier(w)
            comb = jnp.sum(jnp.where(hit, routing.topk_weights, 0.0), axis=1)    # [t]
            out = expert_mlp(w, x, dtype=self.dtype)                             # [t, d]
            # select, not multiply: an unused (possibly poisoned) slot never leaks NaN
            y = y + jnp.where(used[u] < e, comb[:, None] * out, 0.0)
        return h + y.astype(h.dtype)

"""The host-driven offload decoder over pure block functions, and ``MoE`` stacks for it.

``OffloadDecoder`` runs a stack of MoE blocks given as ``BlockFns``
(``simple_block.SimpleMoEBlock``, or ``moe_stack`` for ``samoyeds_jax.moe.MoE`` layers) block
by block, with the library's fetch logic (``samoyeds_jax.offload.BlockScheduler``) between
each block's router and its expert compute; the experts live in an ``ExpertStore`` and reach
the device through an ``ExpertCache`` (``samoyeds_jax.offload.make_cache``). It is the
benchmark bed of the fetch policies (``examples/bench_offload.py``): the same scheduler drives
the real model in ``samoyeds_jax.generate_offload.OffloadGenerator``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax.expert_store import ExpertStore, PyTree, device_sharding
from samoyeds_jax.offload import BlockScheduler, OffloadConfig, StepStats, make_cache
from samoyeds_jax.routing import Routing


@dataclasses.dataclass(frozen=True)
class BlockFns:
    """The two halves of an MoE block, pure functions of (layer params, activations).

    ``front(params, h) -> (h, x, own, pregate)``: everything before the experts (attention,
    residual, norm) giving the residual stream h and the expert input x [t, d], the block's
    own routing ``own`` and its pre-gate's routing ``pregate`` of the next block (``Routing``;
    None for the last block).
    ``back(params, h, x, routing, slot_idx, buffers) -> h``: expert FFN plus residual, with
    ``slot_idx`` [t, k] int32 the slots of ``routing.topk_idx`` and ``buffers`` the cache's
    slot-stacked weights [slots, ...]. To be exact across policies, ``back`` must not let the
    slot numbering change the arithmetic (e.g. order work by expert id, not slot id).
    """

    front: Callable[..., tuple[jax.Array, jax.Array, Routing, Routing | None]]
    back: Callable[..., jax.Array]


def overlap_fraction(step_s: float, compute_s: float, transfer_s: float) -> float:
    """Share of the shorter of compute and transfer hidden under the other, in [0, 1].

    1 when ``step_s == max(compute_s, transfer_s)``, 0 when ``step_s >= compute_s + transfer_s``.
    """
    shorter = min(compute_s, transfer_s)
    if shorter <= 0:
        return 1.0
    return float(np.clip((compute_s + transfer_s - step_s) / shorter, 0.0, 1.0))


@functools.cache
def _jit(fn: Callable) -> Callable:
    """One jitted wrapper per function, so decoders sharing block functions share compilations."""
    return jax.jit(fn)


@functools.partial(jax.jit, static_argnums=0)
def _back_with_table(back, params, h, x, routing: Routing, table, layer, buffers):
    slot_idx = table[layer][routing.topk_idx]   # [t, k] expert id -> cache slot
    return back(params, h, x, routing, slot_idx, buffers)


class OffloadDecoder:
    """Runs a stack of MoE blocks block by block, fetching experts per ``OffloadConfig``.

    ``layer_params[l]``: the device-resident (non-expert) parameters of block l.
    ``store``: the expert weights of every block in pinned host memory.
    ``max_tokens``: the largest t one step sees (sizes the default slot count).
    """

    def __init__(self, fns: BlockFns, layer_params: Sequence[PyTree], store: ExpertStore, *,
                 top_k: int, config: OffloadConfig = OffloadConfig(), max_tokens: int = 1):
        if len(layer_params) != store.num_layers:
            raise ValueError(f"{len(layer_params)} layer params for a store of "
                             f"{store.num_layers} layers")
        self.fns = fns
        self.layer_params = list(layer_params)
        self.store = store
        self.config = config
        self.top_k = top_k
        self.cache = make_cache(store, config, top_k=top_k, max_tokens=max_tokens)
        self._front = _jit(fns.front)
        self._back = functools.partial(_back_with_table, fns.back)
        self.last_stats = StepStats()

    def step(self, h: jax.Array, *, block: bool = False) -> jax.Array:
        """Run every block once on ``h`` [t, d]; returns the final activations [t, d].

        ``block``: wait for the result before returning (makes ``last_stats.wall_s`` the
        device time of the step).
        """
        cache = self.cache
        sched = BlockScheduler(cache, self.config)
        stats = sched.stats
        stats.tokens = int(np.prod(h.shape[:-1]))
        t_start = time.perf_counter()
        for l in range(self.store.num_layers):
            params = self.layer_params[l]
            h, x, own, pregate = self._front(params, h)
            routing = sched.prepare(l, own, pregate)
            h = self._back(params, h, x, routing, cache.device_table, cache.layer_index(l),
                           cache.buffers)
            sched.finish(l)
        if block:
            h.block_until_ready()
        stats.wall_s = time.perf_counter() - t_start
        self.last_stats = stats
        return h


# ---------------------------------------------------------------------------------------
# Stacks of samoyeds_jax.moe.MoE layers
# ---------------------------------------------------------------------------------------

_EXPERT_PARAMS = ("w1", "w3", "w2")


@functools.partial(jax.tree_util.register_dataclass, data_fields=("rest",),
                   meta_fields=("graphdef", "placeholder"))
@dataclasses.dataclass(frozen=True)
class MoELayerParams:
    """An ``MoE`` module without its routed-expert weights: graph (static) + remaining state."""

    graphdef: Any
    placeholder: Any     # expert params as 0-size arrays (static, hashable treedef + dtypes)
    rest: Any

    def module(self):
        from flax import nnx
        ph = jax.tree_util.tree_unflatten(
            self.placeholder[0], [jnp.zeros((0,), dt) for dt in self.placeholder[1]])
        return nnx.merge(self.graphdef, ph, self.rest)


def _moe_front(p: MoELayerParams, h: jax.Array):
    moe = p.module()
    return h, h, moe.route(h), moe.predict_next(h)


def _moe_back(p: MoELayerParams, h, x, routing: Routing, slot_idx, buffers):
    from samoyeds_jax.moe import ExpertWeights
    moe = p.module()
    slots = Routing(slot_idx.astype(jnp.int32), routing.topk_weights, None)
    y = moe.apply_experts(x, slots, experts=ExpertWeights(*(buffers[n] for n in _EXPERT_PARAMS)))
    return h + y.astype(h.dtype)


MOE_BLOCK_FNS = BlockFns(front=_moe_front, back=_moe_back)


def moe_stack(moes: Sequence[Any], *, device: jax.Device | None = None
              ) -> tuple[BlockFns, list[MoELayerParams], ExpertStore]:
    """Offload the routed experts of a stack of ``samoyeds_jax.moe.MoE`` layers.

    Block l computes ``h + moe_l.apply_experts(h, routing)`` (residual MoE layers, no
    attention): with ``routing_source="pregate"`` and ``MoEConfig.pregate="pregated"`` this
    is ``moe_l(h, routing=prev)`` chained over the stack. The modules' expert weights
    ``w1/w3/w2`` (dense or sparse-format pytrees with leading e) move to an ``ExpertStore``;
    every other parameter (gates, pre-gates, shared experts) stays on the device.
    Returns ``(block_fns, layer_params, store)`` for ``OffloadDecoder``.
    """
    from flax import nnx

    def is_expert(path, _value):
        return len(path) == 1 and path[0] in _EXPERT_PARAMS

    params, stacks = [], []
    for moe in moes:
        graphdef, experts, rest = nnx.split(moe, is_expert, ...)
        leaves, treedef = jax.tree_util.tree_flatten(experts)
        params.append(MoELayerParams(graphdef, (treedef, tuple(a.dtype for a in leaves)),
                                     jax.device_put(rest, device_sharding(device))))
        w = moe.expert_weights()
        stacks.append({"w1": w.w1, "w3": w.w3, "w2": w.w2})
    return MOE_BLOCK_FNS, params, ExpertStore.from_stacked(stacks, device=device)

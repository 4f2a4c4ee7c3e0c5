"""Host-offloaded experts: the offload config, slot sizing and the per-block fetch scheduler.

Expert weights of every layer live in pinned host memory (``samoyeds_jax.expert_store``);
the GPU holds a pool of expert slots shared by all layers (``samoyeds_jax.expert_cache``).
An MoE layer computes with the slot-stacked weights and its routing indices remapped to
slots (``table[topk_idx]``). ``samoyeds_jax.generate_offload.OffloadGenerator`` drives the
model block by block with ``BlockScheduler``; ``examples/offload_engines`` has benchmark
engines built on the same scheduler.

Data path of one decode step, block by block (the driver's loop, whose per-block fetch
logic is ``BlockScheduler``)::

    front_l(h)  -> h, x, own routing, pre-gate routing of block l+1  (jitted, device)
    [read ids]  -> expert ids on the host, when the policy needs them (one device_get)
    [fetch]     -> block l's missing experts                          (device_put, async)
    [prefetch]  -> block l+1's experts, per policy                    (device_put, async)
    [commit]    -> fetched experts written into their slots           (jitted, device)
    back_l(...) -> h, expert FFN over the cache slots                 (jitted, device)

Transfers are ``jax.device_put`` calls of pinned-host arrays: they return at once and
run on the host->device copy streams. Measured on an H100 (jax 0.11.2): such a copy
starts only after the computations already queued on the compute stream, so the
prefetch of block l+1 is issued after block l's routing is read and *before* block l's
expert compute is queued; the copy then runs under that compute. This needs room for
both blocks' experts (the slot pool as a double buffer); with fewer slots the prefetch
is issued after the compute (still correct, not overlapped). Fetched experts are written
into their slots by ``ExpertCache.commit``, in stream order.

Fetch policies (``FetchPolicy``):

* ``gpu_only``: every expert resident (slots >= layers * experts), no transfers.
* ``on_demand``: after block l routes, read its expert ids on the host and fetch the
    missing experts; the copy sits on the critical path.
* ``prefetch_all``: while block l computes, fetch all experts of block l+1 (the last
    block prefetches block 0 of the next step). No host read of routing.
* ``pregated``: the model's block l+1 uses the experts picked by block l's pre-gate;
    while block l computes, fetch exactly those. Requires
    ``routing_source="pregate"``. The slot pool is the double buffer: block l+1's
    experts never evict block l's before block l's compute is queued, and the copy
    overlaps it.
* ``speculative``: each block routes itself (``routing_source="router"``); the
    pre-gate of block l only predicts block l+1's experts, which are prefetched;
    experts it missed are fetched on demand when block l+1 routes.

Host syncs: ``on_demand``, ``pregated`` and ``speculative`` read expert ids on the host
once per block (``jax.device_get`` of [t, k] int32 arrays, right after the block's
router/pre-gate). The device idles for that round trip (the next work is queued after
it). ``StepStats.sync_s`` reports the wall time spent blocked in reads.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax
import numpy as np

from pallas_kernels.checks import expect_positive_ints
from samoyeds_jax.expert_cache import EVICTIONS, Eviction, ExpertCache
from samoyeds_jax.expert_store import ExpertStore
from samoyeds_jax.fetch_policy import POLICIES, get_policy
from samoyeds_jax.routing import Routing

FetchPolicy = Literal["gpu_only", "on_demand", "prefetch_all", "pregated", "speculative"]
FETCH_POLICIES: tuple[str, ...] = tuple(POLICIES)
RoutingSource = Literal["pregate", "router"]
ROUTING_SOURCES: tuple[str, ...] = ("pregate", "router")


def check_routing_source(policy: str, routing_source: str) -> None:
    """Which routing a fetch policy can work with: ValueError naming the mismatch."""
    if routing_source not in ROUTING_SOURCES:
        raise ValueError(f"routing_source must be one of {ROUTING_SOURCES}, "
                         f"got {routing_source!r}")
    p = get_policy(policy)
    if p.routing_source not in (None, routing_source):
        raise ValueError(f"policy={policy!r} {p.why}, so it needs routing_source="
                         f"{p.routing_source!r}, got {routing_source!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """How experts are cached and fetched.

    slots: expert slots in the device pool shared by all layers (a positive int; anything else
        raises ValueError here). None: layers * experts for
        ``gpu_only``; otherwise a double buffer, twice the experts one block may need
        (2 * experts for ``prefetch_all``, else 2 * min(experts, top_k * max_tokens)),
        capped at layers * experts.
    routing_source: ``"pregate"``: block l >= 1 uses the experts picked by block l-1's
        pre-gate (Pre-gated MoE); ``"router"``: each block uses its own router.
    read_routing_each_layer: also read the pre-gate's ids on the host in policies that do
        not need them (measures the cost of the per-block host sync).
    """

    policy: FetchPolicy = "pregated"
    slots: int | None = None
    eviction: Eviction = "lru"
    routing_source: RoutingSource = "pregate"
    read_routing_each_layer: bool = False
    poison_evicted: bool = False

    def __post_init__(self):
        get_policy(self.policy)
        if self.slots is not None:  # None: the default size (resolve_slots)
            expect_positive_ints("OffloadConfig", slots=self.slots)
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        check_routing_source(self.policy, self.routing_source)
        for name in ("read_routing_each_layer", "poison_evicted"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"OffloadConfig: {name} must be a bool, got "
                                f"{getattr(self, name)!r}")


@dataclasses.dataclass
class StepStats:
    """What one decode step did (host side), as ``BlockScheduler.stats`` counts it."""

    tokens: int = 0
    bytes_fetched: int = 0
    host_syncs: int = 0
    sync_s: float = 0.0       # wall time blocked reading expert ids on the host
    wall_s: float = 0.0       # wall time of the step (until outputs are ready if timed)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_fetched / self.tokens if self.tokens else 0.0


def resolve_slots(config: OffloadConfig, *, num_layers: int, num_experts: int, top_k: int,
                  max_tokens: int) -> int:
    """Slot count of the pool for ``config`` (its ``slots``, or the default rule), validated.

    Default: every expert for ``gpu_only``; otherwise room for two blocks' experts (the
    prefetch of block l+1 is issued before block l's compute only when both fit), i.e.
    ``2 * experts`` for ``prefetch_all`` and ``2 * min(experts, top_k * max_tokens)`` for
    the others, capped at ``layers * experts``. ``max_tokens``: the largest t one forward routes.
    """
    policy = get_policy(config.policy)
    slots = config.slots
    if slots is None:
        slots = policy.default_slots(num_layers, num_experts,
                                     min(num_experts, top_k * max_tokens))
    policy.check_slots(slots, num_layers, num_experts)
    return slots


def make_cache(store: ExpertStore, config: OffloadConfig, *, top_k: int,
               max_tokens: int = 1) -> ExpertCache:
    """An ``ExpertCache`` over ``store`` sized by ``resolve_slots``; ``gpu_only`` preloads it."""
    slots = resolve_slots(config, num_layers=store.num_layers, num_experts=store.num_experts,
                          top_k=top_k, max_tokens=max_tokens)
    cache = ExpertCache(store, slots=slots, top_k=top_k, eviction=config.eviction,
                        poison_evicted=config.poison_evicted)
    if get_policy(config.policy).preload:
        cache.preload_all()
    return cache


class BlockScheduler:
    """Per-step fetch logic of a ``FetchPolicy``, for any block-by-block driver.

    For each block l, after its router/pre-gate ran and before its expert compute is
    queued, ``prepare(l, own, pregate)`` returns the routing block l computes with and makes
    its experts resident; then the driver queues the expert compute with
    ``cache.device_table``, ``cache.layer_index(l)`` and ``cache.buffers``, and calls
    ``finish(l)``::

        sched = BlockScheduler(cache, config)
        for l in range(layers):
            h, x, own, pregate = front(l, h)
            routing = sched.prepare(l, own, pregate)
            h = back(l, h, x, routing, cache.device_table, cache.layer_index(l), cache.buffers)
            sched.finish(l)

    ``prepare`` reads expert ids on the host when the policy needs them (one
    ``jax.device_get`` per block), fetches block l's missing experts, and issues the
    prefetch of block l+1 *before* block l's compute is queued when the pool holds both
    (a device_put starts only after the compute already queued, so this is what lets the
    copy run under block l's compute); ``finish`` issues it otherwise. One scheduler per
    step: it carries the pre-gate's routing from block to block. It never calls the block
    functions, so a driver keeps its own per-block state (e.g. a KV cache) in its loop.
    """

    def __init__(self, cache: ExpertCache, config: OffloadConfig):
        self.cache = cache
        self.config = config
        self.stats = StepStats()
        self._bytes0 = cache.stats.bytes_fetched
        self._carried: Routing | None = None      # pre-gate routing of the current block
        self._known: list[int] | None = None      # host copy of its expert ids
        self._late: tuple[int, list[int]] | None = None

    def _read(self, arrays: list[jax.Array]) -> list[np.ndarray]:
        """Copy small device arrays to the host (one wait for all of them)."""
        t0 = time.perf_counter()
        out = jax.device_get(arrays)
        self.stats.sync_s += time.perf_counter() - t0
        self.stats.host_syncs += 1
        return out

    def _demand(self, layer: int, experts: list[int]) -> None:
        cache = self.cache
        cache.count_hits(layer, experts)
        missing = [e for e in experts if not cache.resident(layer, e)]
        if missing:
            cache.fetch(layer, missing, demand=True, protect={(layer, e) for e in experts})

    def prepare(self, l: int, own: Routing, pregate: Routing | None) -> Routing:
        """Make block l's experts resident (and maybe prefetch block l+1's); return its routing.

        ``own``: block l's router output; ``pregate``: its pre-gate's routing of block l+1
        (None for the last block).
        """
        cfg, cache = self.config, self.cache
        policy = get_policy(cfg.policy)
        L, E = cache.store.num_layers, cache.store.num_experts
        use_pregate = cfg.routing_source == "pregate" and l > 0
        if use_pregate and self._carried is None:
            raise ValueError(f"block {l} needs the pre-gate routing of block {l - 1}: call "
                             "prepare for every block in order, one scheduler per step")
        routing = self._carried if use_pregate else own
        has_next = l + 1 < L and pregate is not None

        # host reads: this block's experts and/or the pre-gate's (one sync)
        read_own = policy.reads_own(use_pregate)
        read_next = has_next and (policy.reads_next() or cfg.read_routing_each_layer)
        want = []
        if read_own:
            want.append(routing.topk_idx)
        if read_next:
            want.append(pregate.topk_idx)
        read = self._read(want) if want else []
        own_ids = read[0] if read_own else None
        next_ids = read[-1] if read_next and policy.reads_next() else None

        # block l's experts: resident already, or fetched now (on the critical path)
        experts = policy.needed(own_ids, self._known, use_pregate, E)
        if not policy.preload:
            self._demand(l, experts)   # all hits when the prefetch covered them

        # block l+1's experts (block 0 of the next step for prefetch_all)
        ahead = policy.prefetch(l, L, E, next_ids)
        self._late = None
        if ahead is not None:
            nxt, nxt_experts = ahead
            self._known = nxt_experts
            current = {(l, e) for e in experts}
            if len(current | {(nxt, e) for e in nxt_experts}) <= cache.slots:
                cache.fetch(nxt, nxt_experts, demand=False, protect=current)
            else:
                self._late = (nxt, nxt_experts)

        cache.commit(l)
        cache.use(l, experts)
        self._carried = pregate
        self.stats.bytes_fetched = cache.stats.bytes_fetched - self._bytes0
        return routing

    def finish(self, l: int) -> None:
        """After block l's expert compute is queued: the prefetch that did not fit before."""
        if self._late is not None:
            self.cache.fetch(*self._late, demand=False)
            self._late = None
        self.stats.bytes_fetched = self.cache.stats.bytes_fetched - self._bytes0

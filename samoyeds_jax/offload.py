"""Host-offloaded expert weights: a pinned-host store, a device slot cache, fetch policies.

Expert weights of every layer live in ``pinned_host`` memory (page-locked, so the
host->device copy runs at PCIe speed; pageable numpy copies run ~30-50x slower).
The GPU holds a global pool of ``slots`` expert slots shared by all layers, stacked
per weight leaf as ``[slots, ...]``; a host-side map ``(layer, expert) -> slot`` says
which expert each slot holds. An MoE layer computes with the slot-stacked weights
and its routing indices remapped to slots (``table[topk_idx]``).

Data path of one decode step, block by block (``OffloadDecoder.step``, whose per-block
fetch logic is ``BlockScheduler``)::

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
is issued after the compute (still correct, not overlapped). A fetched expert lands
in a fresh device buffer and is written into its slot by a small donated
``dynamic_update_slice`` queued just before the block that reads it; a slot freed by
eviction is only overwritten after every computation already queued on it (stream
order).

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

Eviction (``Eviction``): ``lru`` (least recently used first) or ``lfu`` (fewest uses
so far, counted over the cache's life including past residencies; ties broken by
least recently used). Entries needed by the block being prepared are never evicted;
fetched but not yet written entries go last (evicting one drops its transfer).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax.routing import Routing

PyTree = Any
FetchPolicy = Literal["gpu_only", "on_demand", "prefetch_all", "pregated", "speculative"]
FETCH_POLICIES: tuple[str, ...] = (
    "gpu_only", "on_demand", "prefetch_all", "pregated", "speculative")
Eviction = Literal["lru", "lfu"]
EVICTIONS: tuple[str, ...] = ("lru", "lfu")
RoutingSource = Literal["pregate", "router"]
ROUTING_SOURCES: tuple[str, ...] = ("pregate", "router")


def check_routing_source(policy: str, routing_source: str) -> None:
    """Which routing a fetch policy can work with: ValueError naming the mismatch."""
    if routing_source not in ROUTING_SOURCES:
        raise ValueError(f"routing_source must be one of {ROUTING_SOURCES}, "
                         f"got {routing_source!r}")
    if policy == "pregated" and routing_source != "pregate":
        raise ValueError("policy='pregated' fetches the pre-gate's experts, so it needs "
                         f"routing_source='pregate', got {routing_source!r}")
    if policy == "speculative" and routing_source != "router":
        raise ValueError("policy='speculative' treats the pre-gate as a prediction of each "
                         f"block's own router, so it needs routing_source='router', got "
                         f"{routing_source!r}")


# ---------------------------------------------------------------------------------------
# Memory kinds
# ---------------------------------------------------------------------------------------

def _device(device: jax.Device | None) -> jax.Device:
    return jax.devices()[0] if device is None else device


def pinned_host_sharding(device: jax.Device | None = None) -> jax.sharding.SingleDeviceSharding:
    """Sharding placing an array in ``device``'s page-locked host memory."""
    dev = _device(device)
    kinds = [m.kind for m in dev.addressable_memories()]
    if "pinned_host" not in kinds:
        raise ValueError(f"device {dev} has no 'pinned_host' memory; its memories are {kinds}")
    return jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")


def device_sharding(device: jax.Device | None = None) -> jax.sharding.SingleDeviceSharding:
    """Sharding placing an array in ``device``'s own memory (HBM on a GPU)."""
    return jax.sharding.SingleDeviceSharding(_device(device), memory_kind="device")


def tree_nbytes(tree: PyTree) -> int:
    """Total bytes of the array leaves of ``tree``."""
    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree)))


def device_memory_stats(device: jax.Device | None = None) -> dict[str, int] | None:
    """``device.memory_stats()`` (bytes_in_use, peak_bytes_in_use, ...) or None where absent (CPU)."""
    try:
        stats = _device(device).memory_stats()
    except Exception:  # backends without allocator stats raise or return None
        return None
    return dict(stats) if stats else None


# ---------------------------------------------------------------------------------------
# Expert store (pinned host)
# ---------------------------------------------------------------------------------------

class ExpertStore:
    """Every layer's expert weights in pinned host memory, one pytree per (layer, expert).

    Each expert is stored as its own pinned-host arrays (no leading e) so fetching it is a
    pure copy with no computation on host memory. All experts share one pytree structure,
    leaf shapes and dtypes (dense ``{"w1": [d, f], ...}`` dicts, or sparse-format pytrees
    from ``pallas_kernels.formats`` with the leading e removed).
    """

    def __init__(self, experts: Sequence[Sequence[PyTree]], *, device: jax.Device | None = None):
        """``experts[l][e]``: pytree of arrays already in pinned host memory."""
        if not experts or not experts[0]:
            raise ValueError(f"need at least one layer and one expert, got {len(experts)} layers")
        self.device = _device(device)
        self.num_layers = len(experts)
        self.num_experts = len(experts[0])
        self.treedef = jax.tree_util.tree_structure(experts[0][0])
        leaves0 = jax.tree_util.tree_leaves(experts[0][0])
        self.leaf_specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves0)
        for l, layer in enumerate(experts):
            if len(layer) != self.num_experts:
                raise ValueError(
                    f"layer {l} has {len(layer)} experts, expected {self.num_experts} (as layer 0)")
            for e, tree in enumerate(layer):
                if jax.tree_util.tree_structure(tree) != self.treedef:
                    raise ValueError(f"expert ({l}, {e}) has structure "
                                     f"{jax.tree_util.tree_structure(tree)}, expected {self.treedef}")
                for a, spec in zip(jax.tree_util.tree_leaves(tree), self.leaf_specs):
                    if (a.shape, a.dtype) != (spec.shape, spec.dtype):
                        raise ValueError(f"expert ({l}, {e}) leaf {a.shape} {a.dtype}, expected "
                                         f"{spec.shape} {spec.dtype}")
                    kind = getattr(getattr(a, "sharding", None), "memory_kind", None)
                    if kind != "pinned_host":
                        raise ValueError(f"expert ({l}, {e}) leaf is in memory kind {kind!r}, "
                                         "expected 'pinned_host' (use ExpertStore.from_stacked)")
        self._experts = tuple(tuple(layer) for layer in experts)
        self.expert_nbytes = tree_nbytes(self._experts[0][0])

    @classmethod
    def from_stacked(cls, layers: Sequence[PyTree], *,
                     device: jax.Device | None = None) -> ExpertStore:
        """Store ``layers[l]``: a pytree whose leaves have a leading expert axis [e, ...].

        Leaves may be numpy or jax arrays; each expert slice is copied into pinned host memory.
        """
        host = pinned_host_sharding(device)
        experts = []
        for l, tree in enumerate(layers):
            leaves = jax.tree_util.tree_leaves(tree)
            if not leaves:
                raise ValueError(f"layer {l} has no array leaves")
            e = leaves[0].shape[0]
            if any(a.ndim < 1 or a.shape[0] != e for a in leaves):
                raise ValueError(f"layer {l}: every leaf needs the same leading expert axis, got "
                                 f"{[a.shape for a in leaves]}")
            experts.append([
                jax.device_put(jax.tree_util.tree_map(lambda a, i=i: a[i], tree), host)
                for i in range(e)])
        return cls(experts, device=device)

    @classmethod
    def from_fn(cls, make_expert: Callable[[int, int], PyTree], *, num_layers: int,
                num_experts: int, device: jax.Device | None = None) -> ExpertStore:
        """Store ``make_expert(l, e)`` for every (layer, expert), one expert at a time.

        For models larger than device memory: each expert may be built on the device and is
        moved to pinned host memory before the next one is made.
        """
        host = pinned_host_sharding(device)
        experts = []
        for l in range(num_layers):
            row = []
            for e in range(num_experts):
                tree = jax.device_put(make_expert(l, e), host)
                jax.block_until_ready(tree)  # keep at most one expert in flight on the device
                row.append(tree)
            experts.append(row)
        return cls(experts, device=device)

    def expert(self, layer: int, expert: int) -> PyTree:
        """Pinned-host pytree of one expert (no leading e)."""
        return self._experts[layer][expert]

    def stacked(self, layer: int) -> PyTree:
        """All experts of ``layer`` stacked [e, ...] on the device (for references and tests)."""
        dev = device_sharding(self.device)
        moved = [jax.device_put(t, dev) for t in self._experts[layer]]
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *moved)

    @property
    def nbytes(self) -> int:
        return self.expert_nbytes * self.num_layers * self.num_experts


# ---------------------------------------------------------------------------------------
# Device slot cache
# ---------------------------------------------------------------------------------------

@functools.partial(jax.jit, donate_argnums=(0, 1))
def _write_slots(buffers: PyTree, table: jax.Array, experts: tuple[PyTree, ...],
                 slots: tuple[jax.Array, ...], layers: tuple[jax.Array, ...],
                 indices: tuple[jax.Array, ...]) -> tuple[PyTree, jax.Array]:
    """buffers[slots[i]] = experts[i] and table[layers[i], indices[i]] = slots[i], in place.

    One call per block (a dispatch costs ~80 us of host time on an H100 host, which would
    otherwise sit between a block's routing read and its expert compute).
    """
    for expert, slot, layer, index in zip(experts, slots, layers, indices):
        buffers = jax.tree_util.tree_map(
            lambda b, w, slot=slot: jax.lax.dynamic_update_index_in_dim(
                b, w.astype(b.dtype), slot, 0),
            buffers, expert)
        table = table.at[layer, index].set(slot)
    return buffers, table


def _poison_value(dtype: np.dtype) -> Any:
    return jnp.nan if jnp.issubdtype(dtype, jnp.inexact) else -1


@functools.partial(jax.jit, donate_argnums=0)
def _poison_slot(buffers: PyTree, slot: jax.Array) -> PyTree:
    """buffers[slot] = NaN (floats) / -1 (ints), in place: makes any read of a freed slot visible."""
    return jax.tree_util.tree_map(
        lambda b: jax.lax.dynamic_update_index_in_dim(
            b, jnp.full(b.shape[1:], _poison_value(b.dtype), b.dtype), slot, 0),
        buffers)


@dataclasses.dataclass
class CacheStats:
    """Counters since the cache was made or ``reset_stats`` was called."""

    hits: int = 0                # needed (layer, expert) found resident or already fetched
    misses: int = 0              # needed and fetched on demand
    prefetched: int = 0          # fetched ahead of need
    prefetch_used: int = 0       # prefetched entries later needed while resident
    evictions: int = 0
    bytes_fetched: int = 0       # host -> device bytes (demand + prefetch)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(dataclasses.asdict(self), hit_rate=self.hit_rate,
                    prefetch_accuracy=self.prefetch_accuracy)


class ExpertCache:
    """A device pool of ``slots`` expert slots shared by all layers, with LRU/LFU eviction.

    ``buffers``: the store's expert pytree with every leaf stacked [slots, ...] on the
    device. ``slot_of[(layer, expert)]`` is the slot holding that expert. Fetched experts
    wait as fresh device buffers until ``commit`` writes them into their slots.
    ``device_table``: [layers, experts] int32 on the device, the slot of each committed
    expert (entries of evicted experts go stale; only resident experts are ever looked up).
    Index arguments of the device-side updates are device-resident constants, so no small
    host->device copy queues behind a large expert transfer.
    """

    def __init__(self, store: ExpertStore, *, slots: int, top_k: int,
                 eviction: Eviction = "lru", poison_evicted: bool = False):
        """``poison_evicted`` fills an evicted slot with NaN/-1 before it is refilled (tests)."""
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k=}")
        if slots < 1:
            raise ValueError(f"cache needs at least one slot, got {slots=}")
        if slots < top_k:
            raise ValueError(f"cache of {slots=} slots cannot hold the {top_k=} experts one token "
                             "needs; use slots >= top_k")
        self.store = store
        self.slots = slots
        self.top_k = top_k
        self.eviction = eviction
        self.poison_evicted = poison_evicted
        self.device = store.device
        dev = device_sharding(self.device)
        self.buffers = jax.tree_util.tree_unflatten(store.treedef, [
            jnp.zeros((slots, *spec.shape), spec.dtype, device=dev) for spec in store.leaf_specs])
        self.device_table = jnp.full((store.num_layers, store.num_experts), -1, jnp.int32,
                                     device=dev)
        n = max(slots, store.num_layers, store.num_experts)
        self._ints = [jax.device_put(np.int32(i), dev) for i in range(n)]
        self.slot_of: dict[tuple[int, int], int] = {}
        self.owner: list[tuple[int, int] | None] = [None] * slots
        self._pending: dict[int, PyTree] = {}          # slot -> fetched device pytree
        self._prefetched_unused: set[tuple[int, int]] = set()
        self._last_use: dict[tuple[int, int], int] = {}
        self._uses: dict[tuple[int, int], int] = {}
        self._clock = 0
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        """Device bytes of the slot buffers."""
        return self.slots * self.store.expert_nbytes

    def reset_stats(self) -> None:
        self.stats = CacheStats()

    def resident(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self.slot_of

    def _victim(self, protect: set[tuple[int, int]]) -> int:
        free = [s for s, o in enumerate(self.owner) if o is None]
        if free:
            return free[0]
        candidates = [s for s, o in enumerate(self.owner) if o not in protect]
        if not candidates:
            raise RuntimeError(
                f"all {self.slots} cache slots hold experts the block being prepared needs; "
                f"need more slots (have {self.slots})")
        # A fetched but unwritten entry goes last: dropping it wastes its transfer.
        if self.eviction == "lru":
            rank = lambda s: (s in self._pending, self._last_use.get(self.owner[s], -1))
        else:
            rank = lambda s: (s in self._pending, self._uses.get(self.owner[s], 0),
                              self._last_use.get(self.owner[s], -1))
        return min(candidates, key=rank)

    def fetch(self, layer: int, experts: Sequence[int], *, demand: bool,
              protect: set[tuple[int, int]] = frozenset()) -> None:
        """Start copying the non-resident ``experts`` of ``layer`` to the device (asynchronous).

        ``demand``: True when the block needs them now (counted as misses), False for a
        prefetch. Entries in ``protect`` and all of ``experts`` are never chosen as victims.
        ValueError for a layer or expert id outside the store.
        """
        experts = self._check_ids(layer, experts)
        keep = set(protect) | {(layer, int(e)) for e in experts}
        if len(keep) > self.slots:
            raise ValueError(f"block {layer} needs {len(keep)} experts resident at once "
                             f"({sorted(keep)}) but the cache has {self.slots} slots")
        new: list[tuple[int, tuple[int, int]]] = []
        for e in experts:
            key = (layer, int(e))
            if key in self.slot_of:
                continue
            slot = self._victim(keep)
            old = self.owner[slot]
            if old is not None:
                del self.slot_of[old]
                self._pending.pop(slot, None)   # a prefetch nobody will read
                self._prefetched_unused.discard(old)
                self.stats.evictions += 1
                if self.poison_evicted:
                    self.buffers = _poison_slot(self.buffers, self._ints[slot])
            self.owner[slot] = key
            self.slot_of[key] = slot
            new.append((slot, key))
            self.stats.bytes_fetched += self.store.expert_nbytes
            if demand:
                self.stats.misses += 1
            else:
                self.stats.prefetched += 1
                self._prefetched_unused.add(key)
        if new:  # one device_put call for the whole batch: less host time per expert
            moved = jax.device_put([self.store.expert(*key) for _, key in new],
                                   device_sharding(self.device))
            for (slot, _), tree in zip(new, moved):
                self._pending[slot] = tree

    def _check_ids(self, layer: int, experts: Sequence[int]) -> list[int]:
        """``experts`` as ints, after checking them and ``layer`` against the store's sizes."""
        store = self.store
        if (isinstance(layer, bool) or not isinstance(layer, (int, np.integer))
                or not 0 <= layer < store.num_layers):
            raise ValueError(f"layer must be an int in [0, {store.num_layers}), got {layer!r}")
        ids = np.asarray(list(experts))
        if ids.size and (ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)
                         or ids.min() < 0 or ids.max() >= store.num_experts):
            raise ValueError(f"experts of layer {layer} must be ints in [0, {store.num_experts}), "
                             f"got {ids.tolist()}")
        return [int(e) for e in ids]

    def commit(self, layer: int | None = None) -> None:
        """Write fetched experts (of ``layer``, or all) into their slots (queued on the device)."""
        slots = [s for s in sorted(self._pending)
                 if layer is None or self.owner[s][0] == layer]
        if not slots:
            return
        ints = self._ints
        keys = [self.owner[s] for s in slots]
        self.buffers, self.device_table = _write_slots(
            self.buffers, self.device_table, tuple(self._pending.pop(s) for s in slots),
            tuple(ints[s] for s in slots), tuple(ints[l] for l, _ in keys),
            tuple(ints[e] for _, e in keys))

    def use(self, layer: int, experts: Sequence[int]) -> None:
        """Mark ``experts`` of ``layer`` as read by the next computation.

        Every expert must be resident and written (``fetch`` + ``commit``): a read of a
        non-resident expert raises instead of returning stale weights.
        """
        for e in self._check_ids(layer, experts):
            key = (layer, int(e))
            slot = self.slot_of.get(key)
            if slot is None:
                raise KeyError(f"expert {key} is not resident in the cache")
            if slot in self._pending:
                raise RuntimeError(f"expert {key} was fetched but not committed to slot {slot}")
            self._clock += 1
            self._last_use[key] = self._clock
            self._uses[key] = self._uses.get(key, 0) + 1
            if key in self._prefetched_unused:
                self._prefetched_unused.discard(key)
                self.stats.prefetch_used += 1

    def count_hits(self, layer: int, experts: Sequence[int]) -> None:
        """Count the resident ``experts`` of ``layer`` as hits (call before a demand fetch)."""
        self.stats.hits += sum((layer, int(e)) in self.slot_of for e in experts)

    def layer_index(self, layer: int) -> jax.Array:
        """``layer`` as a device-resident int32 scalar."""
        return self._ints[layer]

    def table(self, layer: int) -> np.ndarray:
        """[e] int32: slot of each expert of ``layer``, -1 where not resident."""
        out = np.full((self.store.num_experts,), -1, np.int32)
        for (l, e), s in self.slot_of.items():
            if l == layer:
                out[e] = s
        return out

    def preload_all(self) -> None:
        """Make every (layer, expert) resident (needs slots >= layers * experts)."""
        need = self.store.num_layers * self.store.num_experts
        if self.slots < need:
            raise ValueError(f"preloading every expert needs slots >= {need}, got {self.slots}")
        for l in range(self.store.num_layers):
            self.fetch(l, range(self.store.num_experts), demand=False)
            self.commit(l)
        self._prefetched_unused.clear()
        self.reset_stats()


# ---------------------------------------------------------------------------------------
# Block functions and the decode driver
# ---------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """How experts are cached and fetched.

    slots: expert slots in the device pool shared by all layers. None: layers * experts for
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
        if self.policy not in FETCH_POLICIES:
            raise ValueError(f"policy must be one of {FETCH_POLICIES}, got {self.policy!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        check_routing_source(self.policy, self.routing_source)


@dataclasses.dataclass
class StepStats:
    """What one ``OffloadDecoder.step`` did (host side)."""

    tokens: int = 0
    bytes_fetched: int = 0
    host_syncs: int = 0
    sync_s: float = 0.0       # wall time blocked reading expert ids on the host
    wall_s: float = 0.0       # wall time of the step (until outputs are ready if timed)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_fetched / self.tokens if self.tokens else 0.0


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


def _unique(ids: np.ndarray) -> list[int]:
    return [int(e) for e in np.unique(ids)]


def resolve_slots(config: OffloadConfig, *, num_layers: int, num_experts: int, top_k: int,
                  max_tokens: int) -> int:
    """Slot count of the pool for ``config`` (its ``slots``, or the default rule), validated.

    Default: every expert for ``gpu_only``; otherwise room for two blocks' experts (the
    prefetch of block l+1 is issued before block l's compute only when both fit), i.e.
    ``2 * experts`` for ``prefetch_all`` and ``2 * min(experts, top_k * max_tokens)`` for
    the others, capped at ``layers * experts``. ``max_tokens``: the largest t one forward routes.
    """
    L, E = num_layers, num_experts
    slots = config.slots
    if slots is None:
        if config.policy == "gpu_only":
            slots = L * E
        else:
            per_block = E if config.policy == "prefetch_all" else min(E, top_k * max_tokens)
            slots = min(L * E, 2 * per_block)
    if config.policy == "gpu_only" and slots < L * E:
        raise ValueError(f"policy='gpu_only' keeps all {L}*{E} experts resident: needs "
                         f"slots >= {L * E}, got {slots=}")
    if config.policy == "prefetch_all" and slots < E:
        raise ValueError(f"policy='prefetch_all' fetches all {E} experts of the next block: "
                         f"needs slots >= {E}, got {slots=}")
    return slots


def make_cache(store: ExpertStore, config: OffloadConfig, *, top_k: int,
               max_tokens: int = 1) -> ExpertCache:
    """An ``ExpertCache`` over ``store`` sized by ``resolve_slots``; ``gpu_only`` preloads it."""
    slots = resolve_slots(config, num_layers=store.num_layers, num_experts=store.num_experts,
                          top_k=top_k, max_tokens=max_tokens)
    cache = ExpertCache(store, slots=slots, top_k=top_k, eviction=config.eviction,
                        poison_evicted=config.poison_evicted)
    if config.policy == "gpu_only":
        cache.preload_all()
    return cache


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
        L, E = cache.store.num_layers, cache.store.num_experts
        use_pregate = cfg.routing_source == "pregate" and l > 0
        if use_pregate and self._carried is None:
            raise ValueError(f"block {l} needs the pre-gate routing of block {l - 1}: call "
                             "prepare for every block in order, one scheduler per step")
        routing = self._carried if use_pregate else own
        has_next = l + 1 < L and pregate is not None

        # host reads: this block's experts and/or the pre-gate's (one sync)
        want = []
        if cfg.policy in ("on_demand", "speculative") or (
                cfg.policy == "pregated" and not use_pregate):
            want.append(routing.topk_idx)
        if has_next and (cfg.policy in ("pregated", "speculative")
                         or cfg.read_routing_each_layer):
            want.append(pregate.topk_idx)
        read = self._read(want) if want else []

        # block l's experts: resident already, or fetched now (on the critical path)
        all_experts = list(range(E))
        if cfg.policy in ("gpu_only", "prefetch_all"):
            experts = all_experts
        elif cfg.policy == "pregated" and use_pregate:
            experts = self._known      # read at block l-1, fetched during its compute
        else:
            experts = _unique(read[0])
        if cfg.policy != "gpu_only":
            self._demand(l, experts)   # all hits when the prefetch covered them

        # block l+1's experts (block 0 of the next step for prefetch_all)
        nxt, nxt_experts = None, None
        if cfg.policy == "prefetch_all":
            nxt, nxt_experts = (l + 1) % L, all_experts
        elif cfg.policy in ("pregated", "speculative") and has_next:
            nxt, nxt_experts = l + 1, _unique(read[-1])
            self._known = nxt_experts
        self._late = None
        if nxt is not None:
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


# ---------------------------------------------------------------------------------------
# A self-contained MoE block (benchmarks, tests, examples)
# ---------------------------------------------------------------------------------------

def as_dense(w: Any, dtype: Any) -> jax.Array:
    """Dense [..., K, N] ``dtype`` array from an array or a sparse-format pytree (``to_dense``)."""
    if hasattr(w, "to_dense"):
        w = w.to_dense()
    return jnp.asarray(w).astype(dtype)


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

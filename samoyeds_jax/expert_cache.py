"""The device slot cache of offloaded experts: ``ExpertCache`` (a pool of expert slots shared by
all layers, LRU/LFU eviction) and its counters, ``CacheStats``.

The GPU holds a global pool of ``slots`` expert slots shared by all layers, stacked per weight
leaf as ``[slots, ...]``; a host-side map ``(layer, expert) -> slot`` says which expert each
slot holds. An MoE layer computes with the slot-stacked weights and its routing indices
remapped to slots (``table[topk_idx]``). A fetched expert lands in a fresh device buffer and
is written into its slot by a small donated ``dynamic_update_slice`` queued just before the
block that reads it; a slot freed by eviction is only overwritten after every computation
already queued on it (stream order).

Eviction (``Eviction``): ``lru`` (least recently used first) or ``lfu`` (fewest uses
so far, counted over the cache's life including past residencies; ties broken by
least recently used). Entries needed by the block being prepared are never evicted;
fetched but not yet written entries go last (evicting one drops its transfer).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import expect_index, expect_kind, expect_positive_ints
from samoyeds_jax.expert_store import ExpertStore, PyTree, device_sharding

Eviction = Literal["lru", "lfu"]
EVICTIONS: tuple[str, ...] = ("lru", "lfu")


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
        expect_kind("store", store, ExpertStore, "an ExpertStore (e.g. ExpertStore.from_stacked)")
        expect_positive_ints("ExpertCache", slots=slots, top_k=top_k)
        if top_k > store.num_experts:
            raise ValueError(f"ExpertCache: top_k must be <= the store's {store.num_experts} "
                             f"experts, got {top_k=}")
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
        if (layer, expert) in self.slot_of:
            return True
        self._check_layer(layer)
        expect_index("expert", expert, self.store.num_experts)
        return False

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
        store = self._check_layer(layer).store
        if not hasattr(experts, "__iter__"):
            raise TypeError(f"experts of layer {layer} must be a sequence of expert ids, got "
                            f"{type(experts).__name__}")
        ids = np.asarray(list(experts))
        if ids.size and (ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)
                         or ids.min() < 0 or ids.max() >= store.num_experts):
            raise ValueError(f"experts of layer {layer} must be ints in [0, {store.num_experts}), "
                             f"got {ids.tolist()}")
        return [int(e) for e in ids]

    def _check_layer(self, layer: int) -> ExpertCache:
        """``self``, after checking ``layer`` is an int in ``[0, store.num_layers)``."""
        expect_index("layer", layer, self.store.num_layers)
        return self

    def commit(self, layer: int | None = None) -> None:
        """Write fetched experts (of ``layer``, or all) into their slots (queued on the device)."""
        if layer is not None:
            self._check_layer(layer)
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
        self._check_layer(layer)
        self.stats.hits += sum((layer, int(e)) in self.slot_of for e in experts)

    def layer_index(self, layer: int) -> jax.Array:
        """``layer`` as a device-resident int32 scalar."""
        return self._check_layer(layer)._ints[layer]

    def table(self, layer: int) -> np.ndarray:
        """[e] int32: slot of each expert of ``layer``, -1 where not resident."""
        self._check_layer(layer)
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

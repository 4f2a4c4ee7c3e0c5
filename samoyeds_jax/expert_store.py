"""Expert weights in pinned host memory: ``ExpertStore`` (one pytree per (layer, expert)),
``host_experts`` (a model built with its experts in host memory) and the memory-kind helpers
(``pinned_host_sharding``, ``device_sharding``, ``on_host``, ``tree_nbytes``,
``device_memory_stats``).

Pinned (page-locked) host memory lets the host->device copy of an expert run at PCIe speed;
pageable numpy copies run ~30-50x slower. ``samoyeds_jax.expert_cache`` holds the device slot
pool these experts are fetched into; ``samoyeds_jax.offload`` the fetch policies and decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import expect_index

PyTree = Any


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


def on_host(a: Any) -> bool:
    """Whether ``a`` is a jax array in host memory (pinned or not)."""
    kind = getattr(getattr(a, "sharding", None), "memory_kind", None)
    return kind in ("pinned_host", "unpinned_host")


EXPERTS_MEMORY = ("device", "pinned_host")


def place_experts(tree: PyTree, memory: str) -> PyTree:
    """A routed-expert stack in ``memory`` (``EXPERTS_MEMORY``): unchanged for "device"; for
    "pinned_host" moved there (waiting for the copy, so the device copy can be freed before
    the next one is made)."""
    if check_experts_memory(memory) == "device":
        return tree
    return jax.block_until_ready(jax.device_put(tree, pinned_host_sharding()))


def check_experts_memory(memory: str) -> str:
    """``memory`` if it names an ``EXPERTS_MEMORY`` this device has, else ValueError."""
    if memory not in EXPERTS_MEMORY:
        raise ValueError(f"experts_memory must be one of {EXPERTS_MEMORY}, got {memory!r}")
    if memory == "pinned_host":
        pinned_host_sharding()  # ValueError naming the device's memories when it has none
    return memory


def host_experts(factory: Callable[..., Any]) -> Callable[..., Any]:
    """An ``MoETransformer`` ``mlp_factory`` (``factory``, e.g. ``model.default_mlp``) whose MoE
    layers keep their routed experts in pinned host memory: each block's expert stacks are
    made on the device and moved out before the next block is made, so a model whose experts
    do not fit the device can be built for ``OffloadGenerator`` (which moves them into its
    ``ExpertStore``). The model itself then runs only through ``OffloadGenerator``."""

    def make(config: Any, *, block_index: int, rngs: Any) -> Any:
        mlp = factory(config, block_index=block_index, rngs=rngs)
        for name in ("w1", "w3", "w2"):
            param = getattr(mlp, name)
            param.set_value(place_experts(param.get_value(), "pinned_host"))
        return mlp

    return make


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
    def from_stacked(cls, layers: Sequence[PyTree], *, device: jax.Device | None = None,
                     move_host: bool = False) -> ExpertStore:
        """Store ``layers[l]``: a pytree whose leaves have a leading expert axis [e, ...].

        Leaves may be numpy or jax arrays; each expert slice is copied into pinned host memory
        (stacks already in host memory are sliced on the host, never through the device).
        ``move_host``: delete each host-resident jax stack once its layer is stored, so host
        memory holds the experts once (a model built with ``host_experts`` gives them up).
        """
        if not isinstance(layers, (list, tuple)):
            raise TypeError("layers must be a list of per-layer pytrees (e.g. dicts of [e, ...] "
                            f"arrays), got {type(layers).__name__}")
        host = pinned_host_sharding(device)
        experts = []
        for l, tree in enumerate(layers):
            leaves = jax.tree_util.tree_leaves(tree)
            if not leaves:
                raise ValueError(f"layer {l} has no array leaves")
            if not all(hasattr(a, "shape") and hasattr(a, "ndim") for a in leaves):
                raise TypeError(f"layers[{l}] must be a pytree (e.g. a dict) of [e, ...] arrays, "
                                f"got {type(tree).__name__} with leaves of type "
                                f"{sorted({type(a).__name__ for a in leaves})}")
            e = leaves[0].shape[0]
            if any(a.ndim < 1 or a.shape[0] != e for a in leaves):
                raise ValueError(f"layer {l}: every leaf needs the same leading expert axis, got "
                                 f"{[a.shape for a in leaves]}")
            sliced = jax.tree_util.tree_map(lambda a: np.asarray(a) if on_host(a) else a, tree)
            experts.append([
                jax.device_put(jax.tree_util.tree_map(lambda a, i=i: a[i], sliced), host)
                for i in range(e)])
            jax.block_until_ready(experts[-1])
            del sliced
            if move_host:
                for a in leaves:
                    if isinstance(a, jax.Array) and on_host(a):
                        a.delete()
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
        expect_index("layer", layer, self.num_layers)
        expect_index("expert", expert, self.num_experts)
        return self._experts[layer][expert]

    def stacked(self, layer: int) -> PyTree:
        """All experts of ``layer`` stacked [e, ...] on the device (for references and tests)."""
        expect_index("layer", layer, self.num_layers)
        dev = device_sharding(self.device)
        moved = [jax.device_put(t, dev) for t in self._experts[layer]]
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *moved)

    @property
    def nbytes(self) -> int:
        return self.expert_nbytes * self.num_layers * self.num_experts

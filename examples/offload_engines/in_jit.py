"""Host-offloaded experts fetched inside one jitted decode step (no host read of expert ids).

``decoder.OffloadDecoder`` (``samoyeds_jax.offload.BlockScheduler``) drives fetches from
the host: it reads each block's expert ids with a ``device_get`` and issues ``device_put``
calls, and that read empties the device queue once per block. Here the whole decode step
over all MoE blocks is one jitted program and the expert ids never leave the device:

* every layer's experts are stacked ``[e, ...]`` per weight leaf (dense arrays or
  sparse-format pytrees whose leaves lead with e) in ``pinned_host`` memory
  (``pinned_host_stacks`` / ``stacks_from_store``);
* ``fetch_experts(host_stack, ids)`` copies the experts ``ids`` ([n] int32, traced) to the
  device: per slot a dynamic slice of the pinned-host stack followed by
  ``jax.device_put(..., jax.memory.Space.Device)``, then the n slices are stacked
  ``[n, ...]`` on the device. Lowered for CUDA this is a ``dynamic_slice`` of a
  ``pinned_host`` parameter followed by ``annotate_device_placement`` (placement
  ``device``), the pattern XLA's host offloader turns into a host->device copy that its
  scheduler can make asynchronous. A traced gather (``host_stack[ids]``) with device-side
  ids is refused by jax ("memory_space of all inputs passed to `gather` must be the same").
* ``decode_step`` runs every block with ``BlockFns`` (``simple_block.SimpleMoEBlock.fns()``
  or ``decoder.MOE_BLOCK_FNS`` for ``samoyeds_jax.moe.MoE`` stacks): for ``pregated``,
  the copy of block l+1's pre-gated experts is issued right after block l's
  router/pre-gate and before block l's expert compute; it depends only on the pre-gate
  ids, so XLA may run it under block l's matmuls.

Shapes are fixed: a block fetches n = min(t*k, e) slots (``fetch_block``): its distinct
experts in ascending id, padded with copies of expert e - 1 when fewer are distinct, so
the program never depends on how many distinct experts were picked. At decode (t = 1) the
k choices of a token are distinct and nothing is padded; at large t a block moves at most
all e experts (the padding moves bytes nobody reads; the host-driven path does not).
``fetch_experts`` itself copies duplicate ids once each. When n = e, ``fetch_block`` copies
the whole stack instead (one DMA per leaf, which XLA overlaps with compute; the per-slot
dynamic slices run as kernels on the SMs and do not overlap).

Policies (``InJitPolicy``):

* ``gpu_only``: every layer's experts already on the device ``[e, ...]``; no transfer.
* ``on_demand``: block l fetches the t*k experts it routed to after its router ran,
    on the critical path of its expert compute: an ``optimization_barrier`` holds the
    block's expert input until every fetched leaf has arrived (as Pre-gated MoE's
    MoE-OnDemand baseline, which copies the selected experts, then runs them; without it
    XLA would start a block's first matmul while that block's later weights still copy).
* ``pregated``: block l >= 1 computes with the experts block l-1's pre-gate picked,
    fetched while block l-1 computes; block 0 fetches on demand (the step's first block
    has no pre-gate before it). Requires ``routing_source="pregate"``.

Every policy runs the same ``back`` on the same expert values (only the slot layout
differs), so with a ``back`` whose arithmetic ignores slot numbering
(``SimpleMoEBlock``) the outputs equal ``gpu_only`` bit for bit on CPU. On a GPU each policy
is a separate XLA program and the compiler may choose another kernel for the same float32
product: outputs then agree with ``gpu_only`` to about 1e-4 relative (measured 7.6e-5 on an
H100; tests bound it at 3e-4). The host-driven ``decoder.OffloadDecoder`` runs the same
per-block programs for every policy and stays bit-exact on the GPU too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax.expert_store import (ExpertStore, device_sharding, pinned_host_sharding,
                                       tree_nbytes)
from samoyeds_jax.offload import RoutingSource, check_routing_source
from samoyeds_jax.routing import Routing

from .decoder import BlockFns

PyTree = Any
InJitPolicy = Literal["gpu_only", "on_demand", "pregated"]
IN_JIT_POLICIES: tuple[str, ...] = ("gpu_only", "on_demand", "pregated")


# ---------------------------------------------------------------------------------------
# Pinned-host expert stacks
# ---------------------------------------------------------------------------------------

def _num_experts(tree: PyTree, where: str) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{where} has no array leaves")
    e = leaves[0].shape[0] if leaves[0].ndim else 0
    if e < 1 or any(a.ndim < 1 or a.shape[0] != e for a in leaves):
        raise ValueError(f"{where}: every leaf needs the same leading expert axis e >= 1, got "
                         f"{[tuple(a.shape) for a in leaves]}")
    return e


def pinned_host_stacks(layers: Sequence[PyTree], *,
                       device: jax.Device | None = None) -> list[PyTree]:
    """``layers[l]``: pytree whose leaves lead with the expert axis [e, ...] -> same in pinned host.

    Every layer must have the same structure, leaf shapes and dtypes (one compiled step
    serves all blocks). Leaves may be numpy or jax arrays.
    """
    if not layers:
        raise ValueError("need at least one layer of experts, got 0")
    host = pinned_host_sharding(device)
    treedef = jax.tree_util.tree_structure(layers[0])
    specs = [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(layers[0])]
    out = []
    for l, tree in enumerate(layers):
        _num_experts(tree, f"layer {l}")
        if jax.tree_util.tree_structure(tree) != treedef:
            raise ValueError(f"layer {l} has structure {jax.tree_util.tree_structure(tree)}, "
                             f"expected {treedef} (as layer 0)")
        got = [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(tree)]
        if got != specs:
            raise ValueError(f"layer {l} leaves {got}, expected {specs} (as layer 0)")
        out.append(jax.device_put(tree, host))
    return out


def stacks_from_store(store: ExpertStore) -> list[PyTree]:
    """The experts of an ``expert_store.ExpertStore`` restacked [e, ...] per layer in pinned host.

    Goes through host numpy arrays once per layer (setup cost, not per step); the store
    can be dropped afterwards.
    """
    layers = []
    for l in range(store.num_layers):
        experts = [jax.device_get(store.expert(l, e)) for e in range(store.num_experts)]
        layers.append(jax.tree_util.tree_map(lambda *a: np.stack(a), *experts))
    return pinned_host_stacks(layers, device=store.device)


def device_stacks(host_stacks: Sequence[PyTree], *,
                  device: jax.Device | None = None) -> list[PyTree]:
    """Copies of the stacks in device memory (``gpu_only``: every expert resident)."""
    return [jax.device_put(s, device_sharding(device)) for s in host_stacks]


def fetch_experts(host_stack: PyTree, ids: jax.Array) -> PyTree:
    """Experts ``ids`` of one layer, copied from pinned host to device inside a jitted program.

    ``host_stack``: pytree of pinned-host leaves [e, ...]; ``ids``: [n] int32 expert ids
    (traced, on the device; in [0, e): a dynamic slice clamps out-of-range ids, so callers
    pass router/pre-gate output only). Returns the same pytree with leaves [n, ...] in
    device memory; slot i holds expert ``ids[i]`` (duplicates are copied once each).
    """
    ids = jnp.asarray(ids, jnp.int32)
    if ids.ndim != 1:
        raise ValueError(f"ids must be [n] int32, got shape {ids.shape}")

    def one(i: int) -> PyTree:
        # dynamic slice on the host array, then a move to device: XLA's host-offload pattern
        return jax.tree_util.tree_map(
            lambda a: jax.device_put(jax.lax.dynamic_index_in_dim(a, ids[i], keepdims=False),
                                     jax.memory.Space.Device),
            host_stack)

    slots = [one(i) for i in range(ids.shape[0])]
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *slots)


# ---------------------------------------------------------------------------------------
# One jitted decode step
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class InJitConfig:
    """How ``decode_step`` places and fetches experts.

    policy: ``gpu_only`` / ``on_demand`` / ``pregated`` (module docstring).
    routing_source: ``"pregate"``: block l >= 1 uses the experts picked by block l-1's
        pre-gate (Pre-gated MoE); ``"router"``: each block uses its own router.
    tie_prefetch: ``pregated`` only: pass block l's output and block l+1's fetched experts
        through one ``optimization_barrier``, so neither is used before both exist (a hint
        for XLA's scheduler to finish the copy after block l's matmuls, not before them).
    """

    policy: InJitPolicy = "pregated"
    routing_source: RoutingSource = "pregate"
    tie_prefetch: bool = False

    def __post_init__(self):
        if self.policy not in IN_JIT_POLICIES:
            raise ValueError(f"policy must be one of {IN_JIT_POLICIES}, got {self.policy!r}")
        check_routing_source(self.policy, self.routing_source)


def slots_per_block(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Expert slots one block fetches: min(t*k, e) (fixed by the shapes, padding included)."""
    return min(num_tokens * top_k, num_experts)


def fetch_plan(topk_idx: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Which experts to fetch for ``topk_idx`` [t, k] and where each choice finds its expert.

    Returns ``ids`` [n] int32, n = ``slots_per_block(t, k, e)``: the distinct experts in
    ascending order, padded with e - 1 when fewer are distinct (a padding slot is copied
    but never read), and ``slot_idx`` [t, k] int32, the slot of each (token, choice).
    """
    t, k = topk_idx.shape
    n = slots_per_block(t, k, num_experts)
    uniq = jnp.unique(topk_idx.reshape(-1), size=n, fill_value=num_experts)   # sorted, e last
    slot_idx = jnp.searchsorted(uniq, topk_idx).astype(jnp.int32)             # [t, k]
    return jnp.minimum(uniq, num_experts - 1).astype(jnp.int32), slot_idx


def _stack_experts(stack: PyTree) -> int:
    return jax.tree_util.tree_leaves(stack)[0].shape[0]


def fetch_block(host_stack: PyTree, topk_idx: jax.Array) -> tuple[PyTree, jax.Array]:
    """The experts a block's routing ``topk_idx`` [t, k] needs, on the device, and the slot
    of each (token, choice) [t, k].

    When the block takes as many slots as it has experts (t*k >= e), the whole stack moves
    with one copy per leaf and slot i is expert i. XLA makes such a copy a DMA
    (``copy-start``/``copy-done`` on a copy stream) that runs under independent compute,
    where the per-slot dynamic slices of ``fetch_experts`` run as kernels that read host
    memory over PCIe on the SMs. The whole-stack copy needs no ids, so an
    ``optimization_barrier`` with ``topk_idx`` keeps it after the routing that asked for it
    (as a fetch of the routed experts would be): ``on_demand`` stays on the critical path,
    ``pregated`` starts when the pre-gate has run. Otherwise: ``fetch_plan`` +
    ``fetch_experts``.
    """
    t, k = topk_idx.shape
    e = _stack_experts(host_stack)
    if slots_per_block(t, k, e) == e:
        host_stack, topk_idx = jax.lax.optimization_barrier((host_stack, topk_idx))
        return jax.device_put(host_stack, jax.memory.Space.Device), topk_idx.astype(jnp.int32)
    ids, slot_idx = fetch_plan(topk_idx, e)
    return fetch_experts(host_stack, ids), slot_idx


def decode_step(fns: BlockFns, config: InJitConfig, layer_params: Sequence[PyTree],
                experts: Sequence[PyTree], h: jax.Array) -> jax.Array:
    """Every block once on ``h`` [t, d] -> [t, d]; meant to be traced inside one ``jax.jit``.

    ``layer_params[l]``: device-resident non-expert params of block l (``fns.front/back``).
    ``experts[l]``: block l's expert stack [e, ...]: pinned host for ``on_demand`` /
    ``pregated``, device memory for ``gpu_only``. ``fns.back`` receives the fetched slot
    stack [n, ...] and the slot of each choice [t, k] (``fetch_block``; ``gpu_only``: the
    full stack and the expert ids).
    """
    num_layers = len(layer_params)
    if len(experts) != num_layers:
        raise ValueError(f"{len(experts)} expert stacks for {num_layers} blocks")
    policy = config.policy
    carried: Routing | None = None     # block l-1's pre-gate routing of block l
    prefetched: tuple[PyTree, jax.Array] | None = None   # block l's slots, fetched in l-1
    for l in range(num_layers):
        h, x, own, pregate = fns.front(layer_params[l], h)
        if config.routing_source == "pregate" and l > 0:
            if carried is None:
                raise ValueError(f"block {l} needs the pre-gate routing of block {l - 1}, "
                                 "whose front returned None")
            routing = carried
        else:
            routing = own
        if policy == "gpu_only":
            buffers, slot_idx = experts[l], routing.topk_idx
        elif policy == "pregated" and l > 0:
            buffers, slot_idx = prefetched     # fetched during block l-1 for this routing
        else:  # on_demand, and block 0 of pregated: on the critical path
            buffers, slot_idx = fetch_block(experts[l], routing.topk_idx)
            # the block's experts run once all of them have arrived
            buffers, x = jax.lax.optimization_barrier((buffers, x))
        if policy == "pregated" and l + 1 < num_layers:
            if pregate is None:
                raise ValueError(f"policy='pregated': block {l} has no pre-gate for block {l + 1}")
            # issued before block l's expert compute; depends only on the pre-gate ids
            prefetched = fetch_block(experts[l + 1], pregate.topk_idx)
        h = fns.back(layer_params[l], h, x, routing, slot_idx, buffers)
        if config.tie_prefetch and policy == "pregated" and l + 1 < num_layers:
            h, prefetched = jax.lax.optimization_barrier((h, prefetched))
        carried = pregate
    return h


class InJitDecoder:
    """``decode_step`` compiled once per input shape; experts in pinned host (or device).

    ``host_stacks[l]``: block l's experts [e, ...] in pinned host memory
    (``pinned_host_stacks``). ``gpu_only`` copies them to the device once.
    ``traces``: how many times the step was traced (one per distinct t).
    """

    def __init__(self, fns: BlockFns, layer_params: Sequence[PyTree],
                 host_stacks: Sequence[PyTree], *, config: InJitConfig = InJitConfig(),
                 device: jax.Device | None = None):
        if len(layer_params) != len(host_stacks):
            raise ValueError(f"{len(layer_params)} layer params for {len(host_stacks)} "
                             "expert stacks")
        for l, s in enumerate(host_stacks):
            for a in jax.tree_util.tree_leaves(s):
                kind = getattr(getattr(a, "sharding", None), "memory_kind", None)
                if kind != "pinned_host":
                    raise ValueError(f"expert stack {l} has a leaf in memory kind {kind!r}, "
                                     "expected 'pinned_host' (use pinned_host_stacks)")
        self.fns = fns
        self.config = config
        self.layer_params = list(layer_params)
        self.host_stacks = list(host_stacks)
        self.experts = (device_stacks(host_stacks, device=device)
                        if config.policy == "gpu_only" else self.host_stacks)
        self.traces = 0
        self._step = jax.jit(self._traced)

    def _traced(self, layer_params, experts, h):
        self.traces += 1   # Python side effect: runs once per trace, not per call
        return decode_step(self.fns, self.config, layer_params, experts, h)

    def step(self, h: jax.Array) -> jax.Array:
        """Run every block once on ``h`` [t, d]; returns [t, d] (asynchronous)."""
        return self._step(self.layer_params, self.experts, h)

    def lower(self, h: jax.Array) -> jax.stages.Lowered:
        """The lowered step for ``h`` (``.as_text()``, ``.compile().as_text()`` to inspect)."""
        return self._step.lower(self.layer_params, self.experts, h)

    def bytes_per_step(self, num_tokens: int, top_k: int) -> int:
        """Host->device bytes one step moves (``slots_per_block`` experts per block, padding
        included; 0 for ``gpu_only``)."""
        if self.config.policy == "gpu_only":
            return 0
        e = _num_experts(self.host_stacks[0], "layer 0")
        per_expert = tree_nbytes(self.host_stacks[0]) // e
        return len(self.host_stacks) * slots_per_block(num_tokens, top_k, e) * per_expert


def host_transfer_ops(hlo_text: str) -> dict[str, int]:
    """Occurrences of each host-offload op name in HLO or StableHLO text.

    ``annotate_device_placement`` (StableHLO) / ``MoveToDevice`` (HLO before offloading) mark
    moves; ``copy-start``/``copy-done`` and ``dynamic-slice-start``/``-done`` are the async
    transfers a GPU compile may make of them.
    """
    names = ("annotate_device_placement", "MoveToDevice", "MoveToHost", "copy-start",
             "copy-done", "dynamic-slice-start", "dynamic-slice-done")
    return {n: hlo_text.count(n) for n in names}

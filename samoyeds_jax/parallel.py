"""Expert parallelism on JAX's own SPMD engine: experts sharded over a mesh axis.

    ep = ExpertParallel(mesh=make_expert_mesh(2))
    use_expert_parallel(model, ep)       # every MoE block of ``model`` now runs split over 2 GPUs

The routed experts ``w1/w3 [e, d, f]``, ``w2 [e, f, d]`` (dense arrays or sparse format
pytrees, whose every leaf leads with e) are split along e over the mesh axis ``axis``:
device p holds experts ``[p * e/P, (p + 1) * e/P)``. Inside ``jax.shard_map``:

1. dispatch: the tokens (and their routing) are all-gathered over ``axis``;
2. each device runs only its own experts: assignments to experts held elsewhere are routed
   to index ``e_local`` ("no local expert"), which sorts them last and leaves them out of
   every group, so they cost no expert FLOPs;
3. combine: the partial outputs are summed over ``axis`` with a reduce-scatter back to the
   token shards (``tokens="sharded"``: data parallelism for attention composes with it), or
   an all-reduce (``tokens="replicated"``: e.g. single-sequence decode).

That is ``dispatch="all_gather"``, the default: it works with every backend of XLA and
never drops a token. ``dispatch="all_to_all"`` (tokens sharded) sends each assignment's token
row to the device of its expert alone and the result back, by ``ragged_all_to_all``
(``samoyeds_jax.dispatch``): ``t * k`` rows each way per device instead of ``(P - 1) * t``,
also without dropping a token. Pre-gating composes unchanged: a block's ``next_routing`` is a
normal ``Routing`` and travels with the tokens of the next block. With ``pregate="pregated"``
the all-to-all's metadata for block i+1 (the sort by destination, the all-gather of chunk
sizes, the all-to-all of expert ids) depends on block i's pre-gate alone, not on block i+1's
attention output, so XLA is free to run it during that attention (one jitted program).

Outputs equal the single-device layer up to f32 rounding: the local grouped matmuls see other
row counts, and the partial outputs are summed over devices in f32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.checks import expect_kind
from samoyeds_jax.config import ExpertImplementation
from samoyeds_jax.dispatch import all_to_all_experts
from samoyeds_jax.moe import ExpertWeights, MoE, expert_ffn
from samoyeds_jax.routing import Routing

TokenLayout = Literal["sharded", "replicated"]
Dispatch = Literal["all_gather", "all_to_all"]
PLACEMENTS: dict[str, dict[str, str]] = {
    "replicated": dict(tokens="replicated"),  # every device routes every token; all-reduce
    "all_gather": dict(tokens="sharded", dispatch="all_gather"),
    "all_to_all": dict(tokens="sharded", dispatch="all_to_all"),
}
"""The token placements and dispatches by the names the command lines use:
``ExpertParallel(mesh=..., **PLACEMENTS[name])``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertParallel:
    """Where the experts live.

    Attributes:
      mesh: a ``jax.sharding.Mesh`` containing ``axis``.
      axis: the mesh axis the experts are split over (its size must divide e).
      tokens: how activations arrive: ``"sharded"`` over ``axis`` along the token dim
        (data-parallel attention), or ``"replicated"`` on every device.
      dispatch: how sharded tokens reach their experts: ``"all_gather"`` (every device sees
        every token; partial outputs reduce-scattered) or ``"all_to_all"`` (each assignment's
        row to its expert's device and back, ``samoyeds_jax.dispatch``; tokens sharded only).
    """

    mesh: jax.sharding.Mesh
    axis: str = "expert"
    tokens: TokenLayout = "sharded"
    dispatch: Dispatch = "all_gather"

    def __post_init__(self) -> None:
        expect_kind("ExpertParallel: mesh", self.mesh, jax.sharding.Mesh,
                    "a jax.sharding.Mesh (make_expert_mesh builds one)")
        if self.axis not in self.mesh.axis_names:
            raise ValueError(f"axis {self.axis!r} is not in the mesh axes {self.mesh.axis_names}")
        if self.tokens not in ("sharded", "replicated"):
            raise ValueError(f"tokens must be 'sharded' or 'replicated', got {self.tokens!r}")
        if self.dispatch not in ("all_gather", "all_to_all"):
            raise ValueError(f"dispatch must be 'all_gather' or 'all_to_all', got "
                             f"{self.dispatch!r}")
        if self.dispatch == "all_to_all" and self.tokens != "sharded":
            raise ValueError("dispatch='all_to_all' sends each device's own tokens to the "
                             "experts; it needs tokens='sharded', got tokens='replicated'")

    def ffn(self, x, routing, experts, *, implementation: ExpertImplementation = None,
            dtype: Any = None):
        """``expert_parallel_ffn`` on this placement (what ``MoE.routed_experts`` calls)."""
        return expert_parallel_ffn(x, routing, experts, ep=self, implementation=implementation,
                                   dtype=dtype)

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    def expert_sharding(self) -> NamedSharding:
        """Sharding of every expert leaf: leading e split over ``axis``."""
        return NamedSharding(self.mesh, P(self.axis))

    def token_sharding(self) -> NamedSharding:
        """Sharding of activations [t, ...]: split over ``axis`` or replicated."""
        return NamedSharding(self.mesh, P(self.axis) if self.tokens == "sharded" else P())


def make_expert_mesh(num_devices: int | None = None, axis: str = "expert") -> jax.sharding.Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default: all)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 0 < n <= len(devices):
        raise ValueError(f"num_devices={num_devices}: need 1 to {len(devices)} (the "
                         f"{jax.default_backend()} devices present)")
    return jax.sharding.Mesh(devices[:n], (axis,))


def _check_divisible(e: int, ep: ExpertParallel) -> None:
    if e % ep.size:
        raise ValueError(f"num_experts={e} must be a multiple of the '{ep.axis}' axis size {ep.size}")


def shard_experts(experts: ExpertWeights, ep: ExpertParallel) -> ExpertWeights:
    """Place every expert leaf with its leading e split over ``ep.axis``."""
    _check_divisible(experts.num_experts, ep)
    return jax.device_put(experts, ep.expert_sharding())


def local_routing(routing: Routing, first: jax.Array, num_local: int) -> Routing:
    """Routing restricted to experts ``[first, first + num_local)``, renumbered from 0.

    Assignments to other experts get index ``num_local`` (no local group) and weight 0.
    """
    local = routing.topk_idx - first
    here = (local >= 0) & (local < num_local)
    return Routing(jnp.where(here, local, num_local).astype(jnp.int32),
                   jnp.where(here, routing.topk_weights, 0.0).astype(routing.topk_weights.dtype))


def expert_parallel_ffn(x: jax.Array, routing: Routing, experts: ExpertWeights, *,
                        ep: ExpertParallel, implementation: ExpertImplementation = None,
                        dtype: Any = None) -> jax.Array:
    """Routed experts with e split over ``ep.axis``. x [t, d] -> [t, d] ``dtype``.

    ``experts`` should already be placed by ``shard_experts`` (otherwise they are resharded
    on every call). With ``tokens="sharded"``, t is padded up to a multiple of the axis size
    with rows routed to no expert (a batch-1 decode step splits too), cut off again after.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [t, d], got shape {x.shape}")
    routing.check_num_tokens(x.shape[0])
    e = experts.num_experts
    _check_divisible(e, ep)
    t = x.shape[0]
    idx, w = routing.topk_idx, routing.topk_weights
    pad = -t % ep.size if ep.tokens == "sharded" else 0
    if pad:  # rows for no expert (id e): every dispatch leaves them out
        x = jnp.pad(x, ((0, pad), (0, 0)))
        idx = jnp.pad(idx, ((0, pad), (0, 0)), constant_values=e)
        w = jnp.pad(w, ((0, pad), (0, 0)))
    dtype = dtype or x.dtype
    num_local = e // ep.size
    tok = P(ep.axis) if ep.tokens == "sharded" else P()
    axis = ep.axis

    def body(x, idx, w, local_experts):
        if ep.dispatch == "all_to_all":
            return all_to_all_experts(x, idx, w, local_experts, axis=axis, num_devices=ep.size,
                                      implementation=implementation, dtype=dtype)
        if ep.tokens == "sharded":
            x, idx, w = (jax.lax.all_gather(a, axis, tiled=True) for a in (x, idx, w))
        first = jax.lax.axis_index(axis) * num_local
        mine = local_routing(Routing(idx, w), first, num_local)
        y = expert_ffn(x, mine, local_experts, implementation=implementation, dtype=dtype).astype(jnp.float32)
        if ep.tokens == "sharded":
            y = jax.lax.psum_scatter(y, axis, scatter_dimension=0, tiled=True)
        else:
            y = jax.lax.psum(y, axis)
        return y.astype(dtype)

    expert_spec = jax.tree.map(lambda _: P(axis), experts)
    fn = jax.shard_map(body, mesh=ep.mesh, in_specs=(tok, tok, tok, expert_spec), out_specs=tok,
                       check_vma=False)
    return fn(x, idx, w, experts)[:t]


def use_expert_parallel(module: nnx.Module, ep: ExpertParallel | None, *,
                        place: bool = True) -> None:
    """Make every ``MoE`` inside ``module`` run its routed experts split over ``ep.axis``.

    ``place=True`` also moves the expert weights to their shards (``shard_experts``); pass
    False for an abstract module (``nnx.eval_shape``) whose weights are created sharded later.
    ``ep=None`` turns expert parallelism off again (weights stay where they are).
    """
    for _, m in nnx.iter_modules(module):
        if not isinstance(m, MoE):
            continue
        m.expert_parallel = ep
        if ep is not None and place:
            placed = shard_experts(m.expert_weights(), ep)
            m.w1.set_value(placed.w1)
            m.w3.set_value(placed.w3)
            m.w2.set_value(placed.w2)

"""Ragged all-to-all dispatch of routed tokens to the devices that hold their experts.

The ``"all_to_all"`` dispatch of ``ExpertParallel`` (``samoyeds_jax.parallel``), for tokens
sharded over the expert axis. Inside ``jax.shard_map``, device p holds tokens ``x [t, d]``,
their routing ``idx, w [t, k]`` and experts ``[p * e_l, (p + 1) * e_l)``:

1. every assignment (token, slot) goes to device ``idx // e_l``: the assignments are sorted by
   destination (stable), and the token rows in that order are the send buffer ``[t * k, d]``,
   one chunk per destination;
2. the ``[P, P]`` matrix of chunk sizes is all-gathered, so every device knows where each
   chunk sits in its sender's buffer and in its receiver's (exclusive cumulative sums);
3. ``ragged_all_to_all`` moves the rows, and each row's expert id local to its receiver, to the
   devices of their experts. The receive buffer holds ``P * t * k`` rows, the most that can
   arrive (every assignment of every device to one device): no token is ever dropped;
4. each device runs its experts on the rows received (one expert per row, weight 1; rows past
   those received, and ids outside the device's experts, go to no expert);
5. ``ragged_all_to_all`` sends each result row back to its sender, into its send order;
6. the sender puts the rows back in assignment order, weights them and sums the k slots.

Each device sends and receives its ``t * k`` assignments' rows (about ``t * k * (P - 1) / P``
cross the link each way), where the all-gather dispatch moves ``(P - 1) * t`` token rows in
and as many partial outputs back. Which is faster depends on k, P and the link
(``examples/bench_parallel.py --dispatch``).

XLA:CPU has no ``ragged-all-to-all``; there ``ragged_all_to_all`` runs
``ragged_all_to_all_reference``, the same semantics from an all-gather (what the CPU tests
check the dispatch with).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from samoyeds_jax.config import ExpertImplementation
from samoyeds_jax.moe import ExpertWeights, expert_ffn
from samoyeds_jax.routing import Routing


def ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                      send_sizes: jax.Array, output_offsets: jax.Array, recv_sizes: jax.Array,
                      *, axis: str) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` over ``axis`` (one chunk per device); on a CPU, where XLA
    has no such op, ``ragged_all_to_all_reference``."""
    if jax.default_backend() == "cpu":
        return ragged_all_to_all_reference(operand, output, input_offsets, send_sizes,
                                           output_offsets, recv_sizes, axis=axis)
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis)


def ragged_all_to_all_reference(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                                send_sizes: jax.Array, output_offsets: jax.Array,
                                recv_sizes: jax.Array, *, axis: str) -> jax.Array:
    """``jax.lax.ragged_all_to_all``'s semantics (one chunk per device) from ``all_gather``:
    device q's ``output`` rows ``[output_offsets_p[q], + send_sizes_p[q])`` become sender p's
    ``operand`` rows ``[input_offsets_p[q], + send_sizes_p[q])``, for every p; other rows keep
    ``output``'s values. ``recv_sizes`` is implied (``send_sizes_p[q]``) and not read."""
    del recv_sizes
    me = jax.lax.axis_index(axis)
    operands = jax.lax.all_gather(operand, axis)  # [P, N, ...]
    starts, sizes, dests = (jax.lax.all_gather(a, axis)[:, me]
                            for a in (input_offsets, send_sizes, output_offsets))  # [P]
    rows = jnp.arange(output.shape[0])
    last = operand.shape[0] - 1
    for p in range(operands.shape[0]):
        here = (rows >= dests[p]) & (rows < dests[p] + sizes[p])
        source = jnp.clip(starts[p] + rows - dests[p], 0, last)
        here = here.reshape(here.shape + (1,) * (output.ndim - 1))
        output = jnp.where(here, operands[p][source], output)
    return output


def _exclusive_cumsum(a: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(a, axis=axis) - a


def all_to_all_experts(x: jax.Array, idx: jax.Array, w: jax.Array, experts: ExpertWeights, *,
                       axis: str, num_devices: int, implementation: ExpertImplementation,
                       dtype: Any) -> jax.Array:
    """Steps 1-6 of the module doc on one device (inside ``shard_map`` over ``axis``): local
    tokens ``x [t, d]``, routing ``idx, w [t, k]`` in global expert ids, local ``experts``
    (``e / num_devices`` of them) -> ``[t, d]`` ``dtype``."""
    t, k = idx.shape
    n, num_local = t * k, experts.num_experts
    me = jax.lax.axis_index(axis)
    flat = idx.reshape(n).astype(jnp.int32)
    dest = jnp.clip(flat // num_local, 0, num_devices - 1)
    order = jnp.argsort(dest, stable=True)  # send order: by destination, then assignment
    sizes = jnp.bincount(dest, length=num_devices).astype(jnp.int32)  # my chunk sizes [P]
    every = jax.lax.all_gather(sizes, axis)  # [sender, receiver] chunk sizes
    in_sender = _exclusive_cumsum(every, 1)  # where chunk p -> q starts in p's send buffer
    in_receiver = _exclusive_cumsum(every, 0)  # where chunk p -> q starts in q's receive buffer
    capacity = num_devices * n
    go = dict(input_offsets=in_sender[me], send_sizes=sizes, output_offsets=in_receiver[me],
              recv_sizes=every[:, me], axis=axis)
    rows = ragged_all_to_all(x[order // k], jnp.zeros((capacity, x.shape[1]), x.dtype), **go)
    local = ragged_all_to_all((flat - dest * num_local)[order],
                              jnp.full((capacity,), num_local, jnp.int32), **go)
    received = jnp.arange(capacity) < every[:, me].sum()
    mine = received & (local >= 0) & (local < num_local)
    routing = Routing(jnp.where(mine, local, num_local)[:, None],
                      mine.astype(jnp.float32)[:, None])
    y = expert_ffn(rows, routing, experts, implementation=implementation, dtype=dtype)
    back = ragged_all_to_all(y, jnp.zeros((n, y.shape[1]), y.dtype),
                             input_offsets=in_receiver[:, me], send_sizes=every[:, me],
                             output_offsets=in_sender[:, me], recv_sizes=sizes, axis=axis)
    out = jnp.zeros_like(back).at[order].set(back).astype(jnp.float32)  # assignment order
    out = (out.reshape(t, k, -1) * w.astype(jnp.float32)[..., None]).sum(axis=1)
    return out.astype(dtype)

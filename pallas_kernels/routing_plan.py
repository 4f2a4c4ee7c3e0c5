"""RoutingPlan: the activation side of the sparse-sparse MoE kernel.

A router picks ``k`` experts per token (``topk_idx [t, k]``). The kernel wants, per expert, the
rows routed to it, in row tiles of ``block_t`` that each belong to a single expert. The plan
holds no activations, only indices: kernels gather ``x`` rows by token id inside the kernel,
so no permuted copy of the activations is ever materialised.

Layout (``P`` rows, ``P // block_t`` row tiles)::

    assignment a = token * k + slot          (t*k assignments, flat id)

    sorted_ids  [P]      a of each row; expert 0's rows first, then expert 1, ... (stable by
                         token within an expert); each expert's run padded up to a multiple of
                         block_t with the sentinel t*k.
    weights     [P]      routing weight of each row (f32), 0 on padding rows.
    block_expert[P//bt]  expert of each row tile; tiles after the last used one hold e.
    num_blocks  []       row tiles in use (tiles >= num_blocks are all padding; skip them).
    group_sizes [e]      assignments per expert (unpadded).
    rows        [t*k]    row of each assignment (the inverse of sorted_ids), P if left out.

Capacity rule: ``P = round_up(t*k + e*(block_t - 1), block_t)``. Each expert wastes at most
``block_t - 1`` padding rows, so P covers the worst case and no assignment is ever dropped;
the shape depends only on (t, k, e, block_t), so the plan builds under ``jit`` without
recompiling per routing decision.

Building: on a GPU, a routing of at most ``SMALL_ASSIGNMENTS`` assignments (decode) is planned
by comparing every pair of assignments and every row with every assignment, which XLA fuses into
a few kernels; a larger one (prefill), and any on a CPU, by a stable sort and scatters. Both give
the same plan.

Out-of-range expert ids: :meth:`RoutingPlan.build` raises ``ValueError`` when ``topk_idx`` is
concrete. Under ``jit`` the values cannot be inspected; ids outside ``[0, e)`` are then the
caller's contract, checked only inside ``pallas_kernels.checks.checked``. Such assignments are
left out of every expert's rows (never clamped onto a wrong expert) and are counted by
:meth:`RoutingPlan.num_invalid`, so ``plan.num_invalid() == 0`` is a cheap traced check a
caller can assert on.

A plan's fields are checked against each other on construction (shapes against the capacity
rule, dtypes, static sizes); with traced arrays only these static properties are checked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import (are_arrays, check_finite, check_ids, expect_dtype,
                                   expect_ints, expect_positive_ints, expect_shape)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingPlan:
    """Per-expert row tiles of routed (token, slot) assignments; see the module docstring.

    Attributes:
      sorted_ids: [P] int32, assignment id a = token*k + slot per row, sentinel t*k on padding.
      block_expert: [P // block_t] int32, expert of each row tile, e after the last used tile.
      num_blocks: [] int32, number of row tiles in use.
      group_sizes: [e] int32, assignments routed to each expert.
      weights: [P] float32, routing weight per row, 0 on padding rows.
      rows: [t*k] int32, row of each assignment (``sorted_ids[rows[a]] == a``), P for an
        assignment left out (out-of-range expert id).
      num_tokens, top_k, num_experts, block_t: static ints (t, k, e, rows per tile).
    """

    sorted_ids: jax.Array
    block_expert: jax.Array
    num_blocks: jax.Array
    group_sizes: jax.Array
    weights: jax.Array
    rows: jax.Array
    num_tokens: int = dataclasses.field(metadata=dict(static=True))
    top_k: int = dataclasses.field(metadata=dict(static=True))
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    block_t: int = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        _check_sizes("RoutingPlan", self.num_tokens, self.top_k, self.num_experts, self.block_t)
        if self.block_t & (self.block_t - 1):
            raise ValueError(f"RoutingPlan: block_t must be a power of two, got {self.block_t}")
        fields = (("sorted_ids", (self.capacity,), jnp.int32),
                  ("weights", (self.capacity,), jnp.float32),
                  ("block_expert", (self.num_tiles,), jnp.int32),
                  ("num_blocks", (), jnp.int32),
                  ("group_sizes", (self.num_experts,), jnp.int32),
                  ("rows", (self.num_tokens * self.top_k,), jnp.int32))
        if not are_arrays(*(getattr(self, name) for name, _, _ in fields)):
            return  # placeholder leaves (tree utilities)
        for name, shape, dtype in fields:
            owner = (f"RoutingPlan (t={self.num_tokens}, k={self.top_k}, e={self.num_experts}, "
                     f"block_t={self.block_t}: capacity {self.capacity} rows)")
            expect_shape(owner, name, getattr(self, name), shape)
            expect_dtype("RoutingPlan", name, getattr(self, name), dtype)

    # ----------------------------------------------------------------------------- static sizes

    @staticmethod
    def capacity_for(num_tokens: int, top_k: int, num_experts: int, block_t: int) -> int:
        """P = round_up(t*k + e*(block_t-1), block_t): rows of a plan, worst case included
        (ValueError unless t >= 0 and k, e, block_t >= 1 are ints)."""
        _check_sizes("RoutingPlan.capacity_for", num_tokens, top_k, num_experts, block_t)
        return _round_up(num_tokens * top_k + num_experts * (block_t - 1), block_t)

    @property
    def capacity(self) -> int:
        """P, the static number of rows (a multiple of ``block_t``)."""
        return self.capacity_for(self.num_tokens, self.top_k, self.num_experts, self.block_t)

    @property
    def num_tiles(self) -> int:
        """P // block_t, the static number of row tiles (used or not)."""
        return self.capacity // self.block_t

    @property
    def sentinel(self) -> int:
        """t*k, the assignment id held by padding rows."""
        return self.num_tokens * self.top_k

    # ----------------------------------------------------------------------------- row views

    def token_ids(self) -> jax.Array:
        """[P] int32: token of each row (a // k), ``t`` on padding rows (one past the last token)."""
        valid = self.sorted_ids < self.sentinel
        return jnp.where(valid, self.sorted_ids // self.top_k, self.num_tokens).astype(jnp.int32)

    def slot_ids(self) -> jax.Array:
        """[P] int32: top-k slot of each row (a % k), ``k`` on padding rows."""
        valid = self.sorted_ids < self.sentinel
        return jnp.where(valid, self.sorted_ids % self.top_k, self.top_k).astype(jnp.int32)

    def row_valid(self) -> jax.Array:
        """[P] bool: True on rows holding an assignment."""
        return self.sorted_ids < self.sentinel

    def expert_offsets(self) -> jax.Array:
        """[e + 1] int32: first row of each expert's padded run (exclusive cumsum), then the end."""
        padded = _round_up_array(self.group_sizes, self.block_t)
        return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(padded).astype(jnp.int32)])

    def num_invalid(self) -> jax.Array:
        """[] int32: assignments left out because their expert id was outside [0, e) (see module doc)."""
        return (self.num_tokens * self.top_k - jnp.sum(self.group_sizes)).astype(jnp.int32)

    # ----------------------------------------------------------------------------- build

    @classmethod
    def build(cls, topk_idx: jax.Array, topk_weights: jax.Array, *, num_experts: int,
              block_t: int) -> RoutingPlan:
        """Plan from router outputs; traceable under ``jit`` (shapes depend only on t, k, e, block_t).

        Args:
          topk_idx: [t, k] integer expert ids in [0, num_experts) (converted to int32).
          topk_weights: [t, k] floating routing weights (stored as float32).
          num_experts: e >= 1.
          block_t: rows per tile, a power of two.

        Returns:
          The plan; ``P = capacity_for(t, k, e, block_t)`` rows.

        Raises:
          ValueError: bad shapes, dtypes, ``num_experts`` or ``block_t``; and, when the inputs are
            concrete, expert ids out of range or non-finite weights.
        """
        expect_positive_ints("RoutingPlan.build", num_experts=num_experts, block_t=block_t)
        num_experts, block_t = int(num_experts), int(block_t)
        if block_t & (block_t - 1):
            raise ValueError(f"block_t must be a power of two, got {block_t=}")
        for name, a in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if not hasattr(a, "dtype"):
                raise TypeError(f"{name} must be an array (jnp.asarray), got {type(a).__name__}")
        idx_shape, w_shape = np.shape(topk_idx), np.shape(topk_weights)
        if len(idx_shape) != 2:
            raise ValueError(f"topk_idx must be [t, k], got shape {idx_shape}")
        if w_shape != idx_shape:
            raise ValueError(
                f"topk_weights must have the shape of topk_idx {idx_shape}, got {w_shape}")
        t, k = idx_shape
        if k < 1:
            raise ValueError(f"top-k must be >= 1, got topk_idx shape {idx_shape}")
        idx_dtype, w_dtype = jnp.result_type(topk_idx), jnp.result_type(topk_weights)
        if not jnp.issubdtype(idx_dtype, jnp.integer):
            raise ValueError(f"topk_idx must have an integer dtype (int32), got {idx_dtype}")
        if not jnp.issubdtype(w_dtype, jnp.floating):
            raise ValueError(f"topk_weights must have a floating dtype, got {w_dtype}")
        if t * k:
            check_ids(topk_idx, num_experts, "topk_idx", ("token", "slot"))
            check_finite(topk_weights, "topk_weights", ("token", "slot"))
        return _build(jnp.asarray(topk_idx).astype(jnp.int32),
                      jnp.asarray(topk_weights).astype(jnp.float32),
                      num_experts=num_experts, block_t=block_t,
                      by_comparison=(t * k <= SMALL_ASSIGNMENTS
                                     and jax.default_backend() == "gpu"))


def _check_sizes(owner: str, num_tokens: int, top_k: int, num_experts: int,
                 block_t: int) -> None:
    expect_ints(owner, 0, num_tokens=num_tokens)
    expect_positive_ints(owner, top_k=top_k, num_experts=num_experts, block_t=block_t)


def _round_up_array(x: jax.Array, multiple: int) -> jax.Array:
    return (x + (multiple - 1)) // multiple * multiple


# Routings of at most this many assignments are planned on a GPU by comparisons (no sort, no
# scatter): a few fused kernels where the sort-and-scatter build launches about ten (H100:
# 1.8-3.4x faster per plan). On a CPU the sort is the faster of the two.
SMALL_ASSIGNMENTS = 512


@functools.partial(jax.jit, static_argnames=("num_experts", "block_t", "by_comparison"))
def _build(topk_idx: jax.Array, topk_weights: jax.Array, *, num_experts: int, block_t: int,
           by_comparison: bool) -> RoutingPlan:
    """The plan; ``by_comparison``: ranks and rows by comparing every pair (small routings),
    else by a stable sort and scatters. Both give the same plan."""
    t, k = topk_idx.shape
    e, n = num_experts, t * k
    cap = RoutingPlan.capacity_for(t, k, e, block_t)

    expert = topk_idx.reshape(n)  # [t*k]
    valid = (expert >= 0) & (expert < e)
    # Invalid ids sort after every expert (key e) and get no row.
    key = jnp.where(valid, expert, e)
    weights_flat = topk_weights.reshape(n)
    if by_comparison:
        # Stable rank among same-expert assignments and expert sizes, by comparisons.
        a = jnp.arange(n, dtype=jnp.int32)
        same = key[:, None] == key[None, :]  # [n, n]
        within = jnp.sum(same & (a[None, :] < a[:, None]), axis=1, dtype=jnp.int32)
        group_sizes = jnp.sum(key[None, :] == jnp.arange(e, dtype=jnp.int32)[:, None], axis=1,
                              dtype=jnp.int32)  # [e]
    else:
        order = jnp.argsort(key, stable=True).astype(jnp.int32)  # assignment ids by expert
        group_sizes = jnp.zeros((e + 1,), jnp.int32).at[key].add(1)[:e]
    padded = _round_up_array(group_sizes, block_t)  # [e]
    padded_end = jnp.cumsum(padded).astype(jnp.int32)  # [e]
    padded_start = padded_end - padded  # [e]

    if by_comparison:
        start = padded_start[jnp.minimum(key, e - 1)]  # [t*k] its expert's first row
        rows = jnp.where(valid, start + within, cap).astype(jnp.int32)  # [t*k]
        hit = rows[None, :] == jnp.arange(cap, dtype=jnp.int32)[:, None]  # [P, t*k]
        sorted_ids = jnp.min(jnp.where(hit, a[None, :], n), axis=1, initial=n).astype(jnp.int32)
        weights = jnp.sum(jnp.where(hit, weights_flat[None, :], 0.0), axis=1)
    else:
        # Row of the i-th sorted assignment: its expert's padded start + its rank within it.
        sorted_key = key[order]
        start = (jnp.cumsum(group_sizes) - group_sizes).astype(jnp.int32)  # unpadded starts
        safe_sorted = jnp.minimum(sorted_key, e - 1)
        rank = jnp.arange(n, dtype=jnp.int32) - start[safe_sorted]
        dest = jnp.where(sorted_key < e, padded_start[safe_sorted] + rank, cap)  # cap: dropped
        sorted_ids = jnp.full((cap,), n, jnp.int32).at[dest].set(order, mode="drop")
        weights = jnp.zeros((cap,), jnp.float32).at[dest].set(weights_flat[order], mode="drop")
        rows = jnp.zeros((n,), jnp.int32).at[order].set(dest.astype(jnp.int32))

    # Expert of tile j = number of experts whose padded run ends at or before the tile's first
    # row (empty experts end where they start, so they are skipped); e past the last used tile.
    tile_start = jnp.arange(cap // block_t, dtype=jnp.int32) * block_t
    block_expert = jnp.sum(padded_end[None, :] <= tile_start[:, None], axis=1, dtype=jnp.int32)
    num_blocks = (padded_end[e - 1] // block_t).astype(jnp.int32)

    return RoutingPlan(sorted_ids=sorted_ids, block_expert=block_expert, num_blocks=num_blocks,
                       group_sizes=group_sizes, weights=weights, rows=rows, num_tokens=t,
                       top_k=k, num_experts=e, block_t=block_t)


def grouped_tiles_product(x: jax.Array, tile_expert: jax.Array, num_tiles: jax.Array,
                          dense: jax.Array, block_t: int) -> jax.Array:
    """Per row tile i: ``x[tile i] @ dense[tile_expert[i]]``, zeros for tiles >= num_tiles.

    The jnp reference of the expert-grouped kernels. x: [n*block_t, K]; tile_expert: [n]
    int32; num_tiles: [] int32; dense: [e, K, N]. Returns [n*block_t, N] float32.
    """
    n = x.shape[0] // block_t
    xt = x.astype(jnp.float32).reshape(n, block_t, -1)
    e = jnp.clip(tile_expert, 0, dense.shape[0] - 1)
    y = jnp.einsum("ntk,nkc->ntc", xt, dense.astype(jnp.float32)[e],
                   precision=jax.lax.Precision.HIGHEST)
    live = (jnp.arange(n) < num_tiles)[:, None, None]
    return jnp.where(live, y, 0.0).reshape(n * block_t, -1)

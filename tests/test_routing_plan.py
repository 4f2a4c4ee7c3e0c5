"""RoutingPlan: every assignment exactly once, padding rows inert, tiles on the right expert."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import routing_plan
from pallas_kernels.routing_plan import RoutingPlan


def _expected_sorted_ids(idx: np.ndarray, e: int, block_t: int) -> np.ndarray:
    """Plain-loop construction of ``sorted_ids`` straight from the contract."""
    t, k = idx.shape
    rows: list[int] = []
    for ex in range(e):
        run = [a for a in range(t * k) if idx.reshape(-1)[a] == ex]  # ascending a: stable by token
        run += [t * k] * (-len(run) % block_t)
        rows += run
    cap = RoutingPlan.capacity_for(t, k, e, block_t)
    return np.asarray(rows + [t * k] * (cap - len(rows)), np.int32)


def _check_plan(plan: RoutingPlan, idx: np.ndarray, w: np.ndarray) -> None:
    t, k = idx.shape
    e, bt = plan.num_experts, plan.block_t
    n = t * k
    cap = _round_up(n + e * (bt - 1), bt)
    assert (plan.num_tokens, plan.top_k, plan.capacity, plan.num_tiles) == (t, k, cap, cap // bt)
    chex.assert_shape(plan.sorted_ids, (cap,))
    chex.assert_shape(plan.weights, (cap,))
    chex.assert_shape(plan.block_expert, (cap // bt,))
    chex.assert_shape(plan.group_sizes, (e,))
    chex.assert_shape(plan.num_blocks, ())
    chex.assert_type([plan.sorted_ids, plan.block_expert, plan.num_blocks, plan.group_sizes],
                     jnp.int32)
    chex.assert_type(plan.weights, jnp.float32)

    ids = np.asarray(plan.sorted_ids)
    weights = np.asarray(plan.weights)
    np.testing.assert_array_equal(ids, _expected_sorted_ids(idx, e, bt))

    # Every assignment exactly once; padding rows hold the sentinel and weight 0.
    real = ids < n
    assert np.all(ids[~real] == n)
    np.testing.assert_array_equal(np.sort(ids[real]), np.arange(n))
    np.testing.assert_array_equal(weights[real], w.reshape(-1)[ids[real]])
    np.testing.assert_array_equal(weights[~real], 0.0)
    # rows: the inverse of sorted_ids
    rows = np.asarray(plan.rows)
    chex.assert_type(plan.rows, jnp.int32)
    np.testing.assert_array_equal(ids[rows], np.arange(n))

    sizes = np.bincount(idx.reshape(-1), minlength=e)
    np.testing.assert_array_equal(np.asarray(plan.group_sizes), sizes)
    num_blocks = int(np.sum(-(-sizes // bt)))
    assert int(plan.num_blocks) == num_blocks
    expected_block_expert = np.full(cap // bt, e, np.int32)
    expected_block_expert[:num_blocks] = np.repeat(np.arange(e), -(-sizes // bt))
    np.testing.assert_array_equal(np.asarray(plan.block_expert), expected_block_expert)
    # Each row's assignment really routes to its tile's expert.
    tile_of_row = np.repeat(np.asarray(plan.block_expert), bt)
    np.testing.assert_array_equal(idx.reshape(-1)[ids[real]], tile_of_row[real])
    assert np.all(ids[num_blocks * bt:] == n)

    tok = np.asarray(plan.token_ids())
    np.testing.assert_array_equal(tok, np.where(real, ids // k, t))
    np.testing.assert_array_equal(np.asarray(plan.slot_ids()), np.where(real, ids % k, k))
    np.testing.assert_array_equal(np.asarray(plan.row_valid()), real)
    offsets = np.asarray(plan.expert_offsets())
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(-(-sizes // bt) * bt)]))
    assert int(plan.num_invalid()) == 0


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _draw(rng: np.random.Generator, t: int, k: int, e: int, mode: str) -> np.ndarray:
    if mode == "one_expert":
        return np.full((t, k), rng.integers(e), np.int32)
    if mode == "some_empty":  # draw from a random half of the experts
        pool = rng.permutation(e)[: max(1, e // 2)]
        return rng.choice(pool, size=(t, k)).astype(np.int32)
    # distinct experts per token where possible, like a real top-k
    if k <= e:
        return np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    return rng.integers(0, e, size=(t, k), dtype=np.int32)


# Orthogonal array L9(3^4): every pair of values of (t, k, e, block_t) appears together once,
# so 9 plans (9 compilations) cover the pairwise grid of t in {1,3,33}, k in {1,2,8},
# e in {1,8,64}, block_t in {8,16,64}; two corner cases are added.
_LEVELS = dict(t=[1, 3, 33], k=[1, 2, 8], e=[1, 8, 64], block_t=[8, 16, 64])
_L9 = ["0000", "0111", "0222", "1012", "1120", "1201", "2021", "2102", "2210"]
_GRID = [tuple(_LEVELS[f][int(c)] for f, c in zip(_LEVELS, row)) for row in _L9]
_GRID += [(33, 8, 64, 64), (33, 8, 1, 16)]
# past SMALL_ASSIGNMENTS (planned by sort and scatters on a GPU too)
_GRID += [(65, 8, 64, 16)]


@pytest.mark.parametrize("t,k,e,block_t", _GRID)
def test_build_matches_contract(rng, t, k, e, block_t):
    for mode in ["random", "one_expert", "some_empty"]:
        idx = _draw(rng, t, k, e, mode)
        w = rng.random((t, k)).astype(np.float32)
        plan = RoutingPlan.build(jnp.asarray(idx), jnp.asarray(w), num_experts=e, block_t=block_t)
        _check_plan(plan, idx, w)


@pytest.mark.parametrize("block_t", [1, 8, 16, 64])
def test_build_under_jit_matches_eager(rng, block_t):
    t, k, e = 33, 2, 8
    build = jax.jit(lambda i, w: RoutingPlan.build(i, w, num_experts=e, block_t=block_t))
    for mode in ["random", "one_expert", "some_empty"]:
        idx = _draw(rng, t, k, e, mode)
        w = rng.random((t, k)).astype(np.float32)
        plan = build(jnp.asarray(idx), jnp.asarray(w).astype(jnp.bfloat16))
        _check_plan(plan, idx, np.asarray(jnp.asarray(w).astype(jnp.bfloat16), np.float32))
    chex.assert_equal(build._cache_size(), 1)  # one trace for every routing decision


@pytest.mark.parametrize("t,k,e,block_t", [(1, 8, 128, 16), (3, 2, 8, 8), (33, 8, 64, 64),
                                             (5, 4, 1, 16)])
def test_comparison_and_sort_builds_give_the_same_plan(rng, t, k, e, block_t):
    """Small routings are planned by comparisons on a GPU, everything else by a sort: the same
    plan, out-of-range ids (left out under jit) included."""
    assert t * k <= routing_plan.SMALL_ASSIGNMENTS
    for mode in ["random", "one_expert", "some_empty", "invalid"]:
        idx = (rng.integers(-2, e + 2, size=(t, k)).astype(np.int32) if mode == "invalid"
               else _draw(rng, t, k, e, mode))
        w = jnp.asarray(rng.random((t, k)).astype(np.float32))
        plans = [routing_plan._build(jnp.asarray(idx), w, num_experts=e, block_t=block_t,
                                     by_comparison=c) for c in (True, False)]
        for a, b in zip(jax.tree.leaves(plans[0]), jax.tree.leaves(plans[1])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if mode == "invalid":
            assert int(plans[0].num_invalid()) == int(np.sum((idx < 0) | (idx >= e)))


def test_plan_is_a_pytree_with_static_sizes(rng):
    idx = _draw(rng, 3, 2, 8, "random")
    plan = RoutingPlan.build(jnp.asarray(idx), jnp.ones((3, 2)), num_experts=8, block_t=8)
    leaves, treedef = jax.tree.flatten(plan)
    assert len(leaves) == 6
    again = jax.tree.unflatten(treedef, leaves)
    assert (again.num_tokens, again.top_k, again.num_experts, again.block_t) == (3, 2, 8, 8)
    out = jax.jit(lambda p: p.token_ids())(plan)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plan.token_ids()))


def test_zero_tokens_gives_an_all_padding_plan():
    plan = RoutingPlan.build(jnp.zeros((0, 2), jnp.int32), jnp.zeros((0, 2)), num_experts=4,
                             block_t=8)
    assert plan.capacity == 32
    assert int(plan.num_blocks) == 0
    np.testing.assert_array_equal(np.asarray(plan.sorted_ids), 0)  # sentinel t*k = 0
    np.testing.assert_array_equal(np.asarray(plan.block_expert), 4)
    np.testing.assert_array_equal(np.asarray(plan.weights), 0.0)


def test_out_of_range_ids_under_jit_are_left_out_and_counted():
    idx = jnp.asarray([[0, 5], [9, 1], [-1, 1]], jnp.int32)  # e = 4: 5, 9, -1 invalid
    w = jnp.ones((3, 2), jnp.float32)
    plan = jax.jit(lambda i, w: RoutingPlan.build(i, w, num_experts=4, block_t=8))(idx, w)
    assert int(plan.num_invalid()) == 3
    ids = np.asarray(plan.sorted_ids)
    np.testing.assert_array_equal(np.sort(ids[ids < 6]), [0, 3, 5])
    np.testing.assert_array_equal(np.asarray(plan.group_sizes), [1, 2, 0, 0])
    np.testing.assert_array_equal(np.asarray(plan.block_expert)[:2], [0, 1])
    assert int(plan.num_blocks) == 2


@pytest.mark.parametrize("idx,w,kwargs,match", [
    (np.array([[0, 4]]), np.ones((1, 2)), {}, r"\[0, 4\); got 4 at token 0, slot 1"),
    (np.array([[0], [-1]]), np.ones((2, 1)), {}, r"got -1 at token 1, slot 0"),
    (np.array([0, 1]), np.ones((2,)), {}, r"topk_idx must be \[t, k\]"),
    (np.array([[0, 1]]), np.ones((2, 1)), {}, "topk_weights must have the shape"),
    (np.array([[0, 1]]).astype(np.float32), np.ones((1, 2)), {}, "integer dtype"),
    (np.array([[0, 1]]), np.ones((1, 2), np.int32), {}, "floating dtype"),
    (np.array([[0, 1]]), np.array([[1.0, np.nan]]), {}, "finite; got nan at token 0, slot 1"),
    (np.zeros((2, 0), np.int32), np.zeros((2, 0)), {}, "top-k must be >= 1"),
    (np.array([[0, 1]]), np.ones((1, 2)), dict(block_t=12), "power of two, got block_t=12"),
    (np.array([[0, 1]]), np.ones((1, 2)), dict(block_t=0), "block_t must be a positive int"),
    (np.array([[0, 1]]), np.ones((1, 2)), dict(num_experts=0), "num_experts must be a positive"),
    (np.array([[0, 1]]), np.ones((1, 2)), dict(num_experts=4.0), "num_experts must be a positive"),
])
def test_bad_input_raises(idx, w, kwargs, match):
    kwargs = dict(dict(num_experts=4, block_t=8), **kwargs)
    with pytest.raises(ValueError, match=match):
        RoutingPlan.build(jnp.asarray(idx), jnp.asarray(w), **kwargs)


def test_shape_errors_raise_under_jit_too():
    build = jax.jit(lambda i, w: RoutingPlan.build(i, w, num_experts=4, block_t=8))
    with pytest.raises(ValueError, match="topk_weights must have the shape"):
        build(jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="integer dtype"):
        build(jnp.zeros((3, 2), jnp.float32), jnp.ones((3, 2)))

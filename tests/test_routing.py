"""Routing pytree helpers: router normalizations, recall metrics, auxiliary router losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samoyeds_jax.routing import (RecallCounts, Routing, load_balancing_loss, normalize_topk,
                                  recall_counts, route_logits, router_z_loss, topk_recall)


def _np(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def test_router_norms(rng):
    logits = jnp.asarray(rng.standard_normal((6, 8)), jnp.float32)
    w_a, i_a = normalize_topk(logits, 3, "softmax_topk")
    w_b, i_b = normalize_topk(logits, 3, "topk_softmax")
    np.testing.assert_array_equal(np.asarray(i_a), np.asarray(i_b))
    probs = _np(jax.nn.softmax(logits, axis=-1))
    expect = np.take_along_axis(probs, np.asarray(i_a), axis=-1)
    np.testing.assert_allclose(_np(w_a), expect, rtol=1e-6)  # un-renormalized probabilities
    assert np.all(_np(w_a).sum(-1) < 1.0)
    np.testing.assert_allclose(_np(w_b), expect / expect.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(_np(w_b).sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.diff(_np(w_a), axis=-1) <= 0)  # best first
    with pytest.raises(ValueError, match="norm must be one of"):
        normalize_topk(logits, 3, "softmax")


def test_recall_counts_by_hand():
    pred = Routing(jnp.array([[0, 1], [2, 3]], jnp.int32), jnp.full((2, 2), 0.5, jnp.float32))
    actual = Routing(jnp.array([[0, 2], [2, 3]], jnp.int32),
                     jnp.array([[0.75, 0.25], [0.5, 0.5]], jnp.float32))
    r = topk_recall(pred, actual, num_experts=5)
    assert r["recall"] == 0.75 and r["precision"] == 0.75
    assert r["set_recall"] == 1.0 and r["set_precision"] == 0.75  # {0,1,2,3} vs {0,2,3}
    assert r["weight_recall"] == pytest.approx(0.75 / 2.0 + 0.5)  # (0.75 + 1.0) / 2
    # A wider prediction (k=3 for prefetching) raises recall and lowers precision.
    wide = Routing(jnp.array([[0, 1, 2], [2, 3, 4]], jnp.int32), jnp.ones((2, 3), jnp.float32))
    w = topk_recall(wide, actual, num_experts=5)
    assert w["recall"] == 1.0 and w["precision"] == pytest.approx(4 / 6)
    total = recall_counts(pred, actual, 5) + recall_counts(wide, actual, 5)
    assert total.ratios()["recall"] == pytest.approx(7 / 8)
    assert np.isnan(RecallCounts.zeros().ratios()["recall"])
    with pytest.raises(ValueError, match="predicted routing has 2 tokens, actual has 1"):
        recall_counts(pred, Routing(actual.topk_idx[:1], actual.topk_weights[:1]), 5)


def test_auxiliary_router_losses():
    balanced = route_logits(jnp.zeros((4, 4), jnp.float32), top_k=1, norm="softmax_topk")
    balanced = Routing(jnp.array([[0], [1], [2], [3]], jnp.int32), balanced.topk_weights,
                       balanced.logits)
    assert float(load_balancing_loss(balanced, 4)) == pytest.approx(1.0)
    assert float(router_z_loss(balanced)) == pytest.approx(np.log(4.0) ** 2, rel=1e-6)
    skewed = route_logits(jnp.tile(jnp.array([[5.0, 0.0, 0.0, 0.0]]), (4, 1)), top_k=1,
                          norm="softmax_topk")
    assert float(load_balancing_loss(skewed, 4)) > 3.5  # all on expert 0 with p ~ 0.98
    with pytest.raises(ValueError, match="needs routing.logits"):
        load_balancing_loss(Routing(skewed.topk_idx, skewed.topk_weights), 4)

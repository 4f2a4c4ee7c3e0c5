"""Routing decisions as pytrees, router normalizations, and pre-gate recall metrics.

A ``Routing`` is what one MoE block needs to run its experts: for each of t tokens the k
chosen experts and their weights. It is carried from block to block by the pre-gating API
(``y, next_routing = moe(x, routing=prev)``) and compared against a block's own gate with
``recall_counts`` / ``RecallCounts.ratios``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import are_arrays, check_finite, check_ids, expect_positive_ints
from samoyeds_jax.config import RouterNorm, check_literal


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Top-k routing of t tokens.

    Attributes:
      topk_idx: [t, k] int32, chosen expert (or cache slot, after ``remap``) per token, best first.
      topk_weights: [t, k] float32, combine weight of each choice.
      logits: [t, e] float32 router logits, or None (e.g. after ``remap``).
    """

    topk_idx: jax.Array
    topk_weights: jax.Array
    logits: jax.Array | None = None

    def __post_init__(self):
        # Static checks only, on array leaves (tree utilities rebuild with placeholders); the
        # leading dims may be stacked or sliced together, so shapes are compared, not ranks.
        idx, w = self.topk_idx, self.topk_weights
        if not are_arrays(idx, w):
            return
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise ValueError(
                f"Routing: topk_idx must hold integer expert ids, got dtype {idx.dtype}")
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"Routing: topk_weights must be floating, got dtype {w.dtype}")
        if tuple(w.shape) != tuple(idx.shape):
            raise ValueError(f"Routing: topk_weights {tuple(w.shape)} must have the shape of "
                             f"topk_idx [t, k] {tuple(idx.shape)}")
        lg = self.logits
        if are_arrays(lg) and (lg.ndim != idx.ndim or lg.shape[:-1] != idx.shape[:-1]):
            raise ValueError(f"Routing: logits {tuple(lg.shape)} must be [t, e] for the "
                             f"{tuple(idx.shape)} topk_idx")

    def check(self, num_experts: int) -> Routing:
        """This routing, after checking its values: ids in ``[0, num_experts)`` (experts or cache
        slots) and finite weights. ValueError when concrete; traced, only under
        ``pallas_kernels.checks.checked`` (otherwise no extra operation)."""
        check_ids(self.topk_idx, num_experts, "routing.topk_idx (expert ids)", ("token", "slot"))
        check_finite(self.topk_weights, "routing.topk_weights", ("token", "slot"))
        return self

    @property
    def num_tokens(self) -> int:
        return self.topk_idx.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_idx.shape[1]

    def expert_mask(self, num_experts: int) -> jax.Array:
        """[t, e] bool: token t is routed to expert e."""
        return topk_mask(self.topk_idx, num_experts)

    def active_experts(self, num_experts: int) -> jax.Array:
        """[e] bool: experts used by at least one token (what an offload cache must hold)."""
        return jnp.any(self.expert_mask(num_experts), axis=0)

    def expert_counts(self, num_experts: int) -> jax.Array:
        """[e] int32: assignments per expert."""
        return jnp.sum(self.expert_mask(num_experts), axis=0, dtype=jnp.int32)

    def combine_weights(self, num_experts: int) -> jax.Array:
        """[t, e] float32: routing weight of each (token, expert), 0 where not routed."""
        onehot = jax.nn.one_hot(self.topk_idx, num_experts, dtype=jnp.float32)  # [t, k, e]
        return jnp.einsum("tke,tk->te", onehot, self.topk_weights.astype(jnp.float32))

    def remap(self, table: jax.Array) -> Routing:
        """Indices mapped through ``table`` ([e] int32, e.g. expert -> cache slot); drops logits."""
        return Routing(table[self.topk_idx].astype(jnp.int32), self.topk_weights, None)

    def check_num_tokens(self, t: int) -> Routing:
        """This routing, after checking that it covers ``t`` tokens (ValueError otherwise)."""
        if self.topk_idx.shape[0] != t:
            raise ValueError(
                f"routing covers {self.topk_idx.shape[0]} tokens but the input has {t} tokens")
        return self


def topk_mask(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """[t, k] indices -> [t, e] bool membership mask."""
    return jnp.any(topk_idx[..., None] == jnp.arange(num_experts)[None, None, :], axis=-2)


def check_top_k(top_k: int, num_experts: int) -> None:
    """ValueError unless ``top_k`` is an int in ``[1, num_experts]`` (bools excluded)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or \
            not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")


def normalize_topk(logits: jax.Array, top_k: int, norm: RouterNorm
                   ) -> tuple[jax.Array, jax.Array]:
    """Router logits [t, e] -> (weights [t, k] float32, indices [t, k] int32), best first.

    ``"softmax_topk"``: ``softmax(logits)`` over all e, top k kept as they are (sum <= 1).
    ``"topk_softmax"``: top k logits, softmax over those k (sum == 1); equal to
    softmax-then-top-k followed by renormalization (Mixtral, Qwen3 ``norm_topk_prob``).
    """
    check_literal("norm", norm, RouterNorm)
    check_top_k(top_k, logits.shape[-1])
    logits = logits.astype(jnp.float32)
    if norm == "softmax_topk":
        probs = jax.nn.softmax(logits, axis=-1)
        weights, idx = jax.lax.top_k(probs, top_k)
    else:
        top_logits, idx = jax.lax.top_k(logits, top_k)
        weights = jax.nn.softmax(top_logits, axis=-1)
    return weights, idx.astype(jnp.int32)


def route_logits(logits: jax.Array, *, top_k: int, norm: RouterNorm) -> Routing:
    """Router logits [t, e] -> ``Routing`` (keeps the logits for distillation and metrics).

    Logits must be finite: checked when concrete; under ``jit`` only inside
    ``pallas_kernels.checks.checked`` (a NaN logit gives NaN weights)."""
    if not are_arrays(logits) or logits.ndim != 2:
        raise ValueError(f"route_logits: logits must be a [t, e] array, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"route_logits: logits must have a floating dtype, got {logits.dtype}")
    check_finite(logits, "route_logits: logits", ("token", "expert"))
    weights, idx = normalize_topk(logits, top_k, norm)
    return Routing(idx, weights, logits.astype(jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecallCounts:
    """Running counts comparing a predicted routing with the actual one (all float32 scalars).

    Token level: a (token, expert) pair is a hit when the expert is in both the predicted and
    the actual top-k of that token. Set level: the union of experts over the batch (what an
    offload cache fetches). ``weight_hit`` sums the actual routing weight of hit pairs.
    Add counts with ``+`` to average over many batches; ``ratios()`` gives the metrics.
    """

    pair_hit: jax.Array
    pair_actual: jax.Array
    pair_pred: jax.Array
    set_hit: jax.Array
    set_actual: jax.Array
    set_pred: jax.Array
    weight_hit: jax.Array
    weight_actual: jax.Array

    @classmethod
    def zeros(cls) -> RecallCounts:
        z = jnp.zeros((), jnp.float32)
        return cls(*([z] * len(dataclasses.fields(cls))))

    def __add__(self, other: RecallCounts) -> RecallCounts:
        return jax.tree.map(jnp.add, self, other)

    def ratios(self) -> dict[str, float]:
        """Metrics as Python floats (nan where nothing was counted yet).

        ``recall``: hit pairs / actual pairs; ``precision``: hit pairs / predicted pairs;
        ``set_recall`` / ``set_precision``: the same on the per-batch unions of experts;
        ``weight_recall``: share of the actual routing weight that was predicted.
        """
        def div(a, b):
            a, b = float(a), float(b)
            return a / b if b > 0 else float("nan")
        return dict(
            recall=div(self.pair_hit, self.pair_actual),
            precision=div(self.pair_hit, self.pair_pred),
            set_recall=div(self.set_hit, self.set_actual),
            set_precision=div(self.set_hit, self.set_pred),
            weight_recall=div(self.weight_hit, self.weight_actual),
        )


@functools.partial(jax.jit, static_argnames="num_experts")
def recall_counts(predicted: Routing, actual: Routing, num_experts: int) -> RecallCounts:
    """Compare ``predicted`` with ``actual`` routing of the same t tokens (k may differ)."""
    expect_positive_ints("recall_counts", num_experts=num_experts)
    if predicted.num_tokens != actual.num_tokens:
        raise ValueError(
            f"predicted routing has {predicted.num_tokens} tokens, actual has {actual.num_tokens}")
    pred = predicted.expert_mask(num_experts)  # [t, e]
    act = actual.expert_mask(num_experts)  # [t, e]
    hit = pred & act
    pred_set, act_set = jnp.any(pred, axis=0), jnp.any(act, axis=0)  # [e]
    act_w = actual.combine_weights(num_experts)  # [t, e]
    f32 = lambda a: jnp.sum(a, dtype=jnp.float32)  # noqa: E731
    return RecallCounts(
        pair_hit=f32(hit), pair_actual=f32(act), pair_pred=f32(pred),
        set_hit=f32(pred_set & act_set), set_actual=f32(act_set), set_pred=f32(pred_set),
        weight_hit=f32(jnp.where(hit, act_w, 0.0)), weight_actual=f32(act_w))


def topk_recall(predicted: Routing, actual: Routing, num_experts: int) -> dict[str, float]:
    """``recall_counts(...).ratios()``: recall/precision of one prediction, as floats."""
    return recall_counts(predicted, actual, num_experts).ratios()


def load_balancing_loss(routing: Routing, num_experts: int) -> jax.Array:
    """Switch-Transformer / Mixtral auxiliary loss ``e * sum_e f_e * P_e`` (float32 scalar).

    ``f_e``: share of the t*k assignments that went to expert e; ``P_e``: mean router
    probability of e (softmax of ``routing.logits``, which must be present). Equals 1 for a
    perfectly balanced router; gradients flow through ``P_e`` only.
    """
    if routing.logits is None:
        raise ValueError("load_balancing_loss needs routing.logits (a Routing from a Router)")
    probs = jax.nn.softmax(routing.logits.astype(jnp.float32), axis=-1)  # [t, e]
    counts = routing.expert_counts(num_experts).astype(jnp.float32)  # [e]
    share = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return num_experts * jnp.sum(share * jnp.mean(probs, axis=0))


def router_z_loss(routing: Routing) -> jax.Array:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` (float32 scalar); keeps logits small."""
    if routing.logits is None:
        raise ValueError("router_z_loss needs routing.logits (a Routing from a Router)")
    z = jax.nn.logsumexp(routing.logits.astype(jnp.float32), axis=-1)
    return jnp.mean(z * z)

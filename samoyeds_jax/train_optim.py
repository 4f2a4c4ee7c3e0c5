"""The optimizer of ``samoyeds_jax.train`` (AdamW, warmup + cosine decay, gradient clipping) and
the fixed sparsity masks that keep pruned expert weights at zero while training."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:
    from samoyeds_jax.train import TrainConfig


def _decay_mask(params: nnx.State) -> Any:
    """AdamW weight decay on matrices only (not norms, biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay and global-norm clipping."""
    decay_steps = max(train.steps - train.warmup_steps, 1)
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, train.learning_rate, max(train.warmup_steps, 1)),
        optax.cosine_decay_schedule(train.learning_rate, decay_steps, alpha=train.min_lr_ratio),
    ], [train.warmup_steps])
    chain = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
    chain.append(optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=train.weight_decay,
                             mask=_decay_mask(params)))
    return optax.chain(*chain)


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def sparsity_masks(params: nnx.State) -> Any:
    """Keep-masks of the matrices pruning applies to: the routed-expert stacks (``w1/w3/w2``
    of every MoE layer), the shared experts' ``w1/w3/w2`` and the attention projections'
    kernels. True where the weight is nonzero (a dense matrix has no exact zeros, so it trains
    freely). Other parameters (norms, biases, gates, embeddings) get a scalar True."""
    def mask(path, p):
        names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
        if names and names[-1] == "value":  # nnx.State leaves end in .value
            names = names[:-1]
        ffn = (len(names) >= 2 and names[-2] in ("mlp", "shared")
               and names[-1] in ("w1", "w3", "w2"))
        projection = (len(names) >= 2 and names[-2] in _PROJECTIONS and names[-1] == "kernel")
        return (p != 0) if ffn or projection else jnp.ones((), bool)
    return jax.tree_util.tree_map_with_path(mask, params)


def _apply_masks(tree: Any, masks: Any) -> Any:
    return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), tree, masks)

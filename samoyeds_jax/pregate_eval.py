"""Pre-gate recall: how well each block's pre-gate predicts the next block's top-k experts.

``pregate_recall`` runs the windows of ``samoyeds_jax.evaluate`` with
``return_router_logits=True`` and compares the top-k experts that block i's pre-gate predicts
with those block i+1's own gate picks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from samoyeds_jax.eval_windows import _make_windows
from samoyeds_jax.evaluate import EvalConfig, _expect_model
from samoyeds_jax.moe import MoE
from samoyeds_jax.routing import topk_mask

__all__ = [
    "PairRecall",
    "PregateRecall",
    "has_pregates",
    "pregate_recall",
]


def has_pregates(model: nnx.Module) -> bool:
    """Whether any MoE block of ``model`` has a pre-gate (``MoEConfig.pregate != "standard"``)."""
    return any(isinstance(m, MoE) and m.pregate is not None for _, m in nnx.iter_modules(model))


def _window_router_counts(graphdef, state, inputs, valid, *, top_k: int, num_experts: int):
    """Per block with a pre-gate: (exact matches [], hits [e], actual [e]) int32 counts over the
    valid positions of inputs [b, L]; None for blocks without one."""
    model = nnx.merge(graphdef, state)
    _, _, router = model(inputs, return_router_logits=True)
    real = valid.reshape(-1)  # [b*L]
    out = []
    for i, pre in enumerate(router.pregate):
        if pre is None or i + 1 >= len(router.gate):
            out.append(None)
            continue
        pred = topk_mask(jax.lax.top_k(pre, top_k)[1], num_experts)  # [b*L, e]
        act = topk_mask(jax.lax.top_k(router.gate[i + 1], top_k)[1], num_experts)  # [b*L, e]
        act = act & real[:, None]
        exact = jnp.all(pred == act, axis=-1) & real
        out.append((jnp.sum(exact, dtype=jnp.int32),
                    jnp.sum(pred & act, axis=0, dtype=jnp.int32),
                    jnp.sum(act, axis=0, dtype=jnp.int32)))
    return tuple(out)


_window_router_counts_jit = jax.jit(_window_router_counts, static_argnums=0,
                                    static_argnames=("top_k", "num_experts"))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PairRecall:
    """How well block ``block``'s pre-gate predicted block ``block + 1``'s top-k experts.

    Attributes:
      block: i, the predicting block.
      tokens: positions compared.
      top_k: k of both sets.
      exact: tokens whose predicted top-k set equals the actual one.
      expert_hits: [e] int64, tokens that selected expert j and had it predicted.
      expert_actual: [e] int64, tokens that selected expert j (block i+1's own gate).
    """

    block: int
    tokens: int
    top_k: int
    exact: int
    expert_hits: np.ndarray
    expert_actual: np.ndarray

    @property
    def exact_match(self) -> float:
        """Share of tokens whose whole top-k set was predicted."""
        return self.exact / self.tokens if self.tokens else math.nan

    @property
    def pair_recall(self) -> float:
        """Hit (token, expert) pairs / actual pairs (= precision: both sets have k experts)."""
        actual = int(self.expert_actual.sum())
        return int(self.expert_hits.sum()) / actual if actual else math.nan

    @property
    def expert_recall(self) -> np.ndarray:
        """[e] float64 hits / times selected per expert of block i+1 (nan: never selected)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.expert_actual > 0,
                            self.expert_hits / np.maximum(self.expert_actual, 1), np.nan)

    def as_dict(self) -> dict[str, Any]:
        return {"block": self.block, "next_block": self.block + 1, "tokens": self.tokens,
                "top_k": self.top_k, "exact_match": self.exact_match,
                "pair_recall": self.pair_recall,
                "expert_recall": [None if math.isnan(x) else float(x) for x in self.expert_recall],
                "expert_hits": self.expert_hits.tolist(),
                "expert_actual": self.expert_actual.tolist()}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PregateRecall:
    """Pre-gate recall of every block pair (i -> i+1) that has a pre-gate, and overall."""

    pairs: tuple[PairRecall, ...]

    @property
    def tokens(self) -> int:
        """Compared (token, block pair) cases."""
        return sum(p.tokens for p in self.pairs)

    @property
    def exact_match(self) -> float:
        """Exact top-k set matches over all pairs / compared cases."""
        return sum(p.exact for p in self.pairs) / self.tokens if self.tokens else math.nan

    @property
    def pair_recall(self) -> float:
        """Hit (token, expert) pairs / actual pairs, over all block pairs."""
        actual = sum(int(p.expert_actual.sum()) for p in self.pairs)
        hits = sum(int(p.expert_hits.sum()) for p in self.pairs)
        return hits / actual if actual else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {"exact_match": self.exact_match, "pair_recall": self.pair_recall,
                "tokens": self.tokens, "pairs": [p.as_dict() for p in self.pairs]}


def pregate_recall(model: nnx.Module, tokens: Any, *, config: EvalConfig = EvalConfig()
                   ) -> PregateRecall:
    """Compare each pre-gate's top-k prediction with the next block's own gate, token by token.

    The model runs the windows of ``tokens`` (as ``evaluate_streams`` cuts them: every
    position that is an input of a window counts once; padding never does) with
    ``return_router_logits=True``. For block i with a pre-gate, the predicted set is the top-k
    of its pre-gate logits and the actual set the top-k of block i+1's own gate logits on
    block i+1's input. In ``"pregated"`` mode block i+1 computes with the predicted set,
    which changes the hidden states after it; the comparison is always with what block i+1's
    own gate would pick on its input.

    Args:
      model: a ``MoETransformer`` with pre-gates (``pregate`` "pregated" or "speculative").
      tokens: ids [n] int, or a mapping name -> ids [n] (several documents).
      config: windows and batching, as for scoring.
    Returns:
      ``PregateRecall`` with one ``PairRecall`` per block pair.
    Raises:
      ValueError: the model has no pre-gates, or bad token input (as ``evaluate_streams``).
    """
    _expect_model(model)
    if not has_pregates(model):
        raise ValueError("pregate_recall needs a model with pre-gates (MoEConfig.pregate "
                         f"'pregated' or 'speculative'); this one has pregate="
                         f"{model.config.moe.pregate!r} and no pre-gate modules")
    if isinstance(tokens, Mapping):
        streams = {name: (ids, np.zeros(np.shape(ids), np.int64)) for name, ids in tokens.items()}
    else:
        streams = {"tokens": (tokens, np.zeros(np.shape(tokens), np.int64))}
    windows = _make_windows(streams, config, int(model.config.vocab_size))
    moe = model.config.moe
    graphdef, state = nnx.split(model)
    pending = [_window_router_counts_jit(graphdef, state, jnp.asarray(inputs), jnp.asarray(valid),
                                         top_k=moe.top_k, num_experts=moe.num_experts)
               for _, inputs, _, valid in windows.batches(config.batch_size)]
    totals: list[list[np.ndarray] | None] | None = None
    for out in jax.device_get(pending):
        if totals is None:
            totals = [None if c is None else [np.zeros(np.shape(x), np.int64) for x in c]
                      for c in out]
        for acc, c in zip(totals, out):
            if c is not None:
                for x, y in zip(acc, c):
                    x += np.asarray(y, np.int64)
    compared = int(windows.valid.sum())
    pairs = tuple(PairRecall(block=i, tokens=compared, top_k=moe.top_k, exact=int(c[0]),
                             expert_hits=c[1], expert_actual=c[2])
                  for i, c in enumerate(totals) if c is not None)
    if not pairs:
        raise ValueError("pregate_recall: the forward returned no pre-gate logits for any block "
                         "pair (is the only pre-gate on the last block?)")
    return PregateRecall(pairs=pairs)

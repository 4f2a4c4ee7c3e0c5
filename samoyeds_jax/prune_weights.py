"""Weight-level pruning into the sparsity patterns of ``pallas_kernels``' formats.

Weights are stored for ``y = x @ W``: ``W`` is ``[..., K, N]`` (K input channels, N output
channels) with any leading dims, e.g. an expert stack ``[e, K, N]``. The ``prune_*`` functions
return the pruned *dense* weight (same shape and dtype, pruned entries set to zero); the
``*_mask`` functions return the boolean keep-mask. ``samoyeds_jax.pruning`` turns a pruned
weight into its compressed format (``convert``) and prunes every expert weight of a model
(``prune_experts``).

Scores (higher is kept), always computed in float32:

- magnitude: ``|W[k, n]|``;
- Wanda (Sun et al. 2023, arXiv 2306.11695): ``|W[k, n]| * ||X[:, k]||_2``, the L2 norm of input
  channel k over calibration activations ``X [t, K]`` (the norm is per row k of W).

Patterns:

- N:M along K (``prune_nm``): in every group of m consecutive rows of K, each column keeps its
  n highest-score entries. Supported (n, m): (2, 4), (1, 4), (2, 8), (4, 8).
- Samoyeds (``prune_samoyeds``), vector-wise N_sel:M_sel:V plus 2:4: first 2:4 along K per
  column; then, for every slab of V rows of K, the N output columns form groups of m_sel
  consecutive columns, each scored by the sum of its kept (post-2:4) scores in the slab, and the
  n_sel best columns of each group are kept. Default 1:2:128 keeps 25% of the entries.
  ``samoyeds_mask_shared`` makes one column choice for an expert's w1 and w3 (summed scores).
- Unstructured (``prune_unstructured``): the top ``round((1 - sparsity) * K * N)`` entries of
  every matrix.

Ties are broken deterministically: among equal scores the lower index wins (the lower row in
an N:M group, the lower column in a Samoyeds column group, the lower row-major position in
unstructured pruning). NaN/Inf weights, scores or activations raise ``ValueError`` (checked
whenever the arrays are concrete, i.e. outside ``jax.jit``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import format_registry
from pallas_kernels.formats import NM_PATTERNS
from pallas_kernels.prune_masks import (check_nm as _check_nm,
                                        check_samoyeds as _check_samoyeds,
                                        check_sparsity as _check_sparsity,
                                        count_kept as _n_keep, nm_keep as _nm_mask,
                                        samoyeds_keep as _samoyeds_mask,
                                        samoyeds_keep_shared as _samoyeds_mask_shared,
                                        select_for as _select_for,
                                        unstructured_keep as _unstructured_mask)

__all__ = [
    "SUPPORTED_NM",
    "channel_norms",
    "magnitude_score",
    "nm_mask",
    "prune_nm",
    "prune_samoyeds",
    "prune_unstructured",
    "samoyeds_mask",
    "samoyeds_mask_shared",
    "unstructured_mask",
    "wanda_score",
]

# The N:M patterns NMSparse stores; 2:4 is the one sparse tensor cores run.
SUPPORTED_NM: tuple[tuple[int, int], ...] = NM_PATTERNS


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


@jax.jit
def _first_nonfinite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    bad = jnp.logical_not(jnp.isfinite(x)).reshape(-1)
    return jnp.any(bad), jnp.argmax(bad)


def _check_finite(x: jax.Array, name: str) -> None:
    """Raise ValueError naming the first non-finite entry of ``x``; no-op on tracers."""
    if x.size == 0:
        return
    any_bad, flat = _first_nonfinite(x)
    try:
        bad = bool(any_bad)
    except jax.errors.ConcretizationTypeError:  # traced under jit: values unknown here
        return
    if bad:
        where = tuple(int(i) for i in np.unravel_index(int(flat), x.shape))
        value = x[where]
        raise ValueError(f"{name} must be finite (no NaN/Inf); found {value} at index {where} "
                         f"of {name}.shape={tuple(x.shape)}")


def _check_weight(w: Any, name: str = "w") -> jax.Array:
    """A weight is a floating array [..., K, N] with finite values."""
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"{name} must be a matrix [..., K, N] (ndim >= 2); given "
                         f"{name}.shape={tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype (float32/bfloat16/float16); given "
                         f"{name}.dtype={w.dtype}")
    _check_finite(w, name)
    return w


def _check_score(score: Any, w: jax.Array) -> jax.Array:
    """A score has w's shape, a real dtype and finite values."""
    score = jnp.asarray(score)
    if score.shape != w.shape:
        raise ValueError(f"score must have the weight's shape; expected {tuple(w.shape)}, "
                         f"given score.shape={tuple(score.shape)}")
    if not (jnp.issubdtype(score.dtype, jnp.floating) or jnp.issubdtype(score.dtype, jnp.integer)):
        raise ValueError(f"score must be real-valued; given score.dtype={score.dtype}")
    _check_finite(score, "score")
    return score


# ----------------------------------------------------------------------------------------------
# Scores.
# ----------------------------------------------------------------------------------------------


def magnitude_score(w: jax.Array) -> jax.Array:
    """``|w|`` as float32, same shape as ``w`` [..., K, N]."""
    return jnp.abs(_check_weight(w)).astype(jnp.float32)


def channel_norms(x: jax.Array) -> jax.Array:
    """L2 norm of every input channel over tokens: x [..., t, K] -> float32 [..., K].

    Zero rows (padding of per-expert token lists) do not change the norms.
    """
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"calibration activations must be [..., t, K] (ndim >= 2); given "
                         f"shape={tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"calibration activations must be floating; given dtype={x.dtype}")
    _check_finite(x, "x")
    return _channel_norms(x)


@jax.jit
def _channel_norms(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x, axis=-2))


def wanda_score(w: jax.Array, x: jax.Array) -> jax.Array:
    """Wanda score ``|W[..., k, n]| * ||x[..., :, k]||_2`` as float32 [..., K, N].

    Args:
      w: weight [..., K, N].
      x: calibration activations (the inputs of ``x @ w``): [t, K] shared by every leading
        index of ``w``, or [*w.shape[:-2], t, K] per leading index (e.g. each expert's routed
        tokens, zero-padded to a common t).
    """
    w = _check_weight(w)
    x = jnp.asarray(x)
    k = w.shape[-2]
    lead = w.shape[:-2]
    if x.ndim < 2 or x.shape[-1] != k or (x.ndim > 2 and x.shape[:-2] != lead):
        expected = f"[t, {k}]" + (f" or {list(lead) + ['t', k]}" if lead else "")
        raise ValueError(f"calibration activations for w.shape={tuple(w.shape)} must be "
                         f"{expected}; given x.shape={tuple(x.shape)}")
    _check_finite(x, "x")
    return _wanda(w, x)


@jax.jit
def _wanda(w: jax.Array, x: jax.Array) -> jax.Array:
    """|w| * channel norms of x: w [..., K, N], x [t, K] or [..., t, K] -> float32 [..., K, N]."""
    norms = _channel_norms(x)  # [K] or [..., K]
    if norms.ndim < w.ndim - 1:
        norms = jnp.broadcast_to(norms, w.shape[:-1])
    return jnp.abs(w).astype(jnp.float32) * norms[..., :, None]


# ----------------------------------------------------------------------------------------------
# Masks. The jitted cores take validated float32 scores; the public functions validate.
# ----------------------------------------------------------------------------------------------


def nm_mask(score: jax.Array, *, n: int = 2, m: int = 4) -> jax.Array:
    """Boolean keep-mask [..., K, N]: the n highest scores of every m consecutive rows of K."""
    score = jnp.asarray(score)
    if score.ndim < 2:
        raise ValueError(f"score must be [..., K, N]; given shape={tuple(score.shape)}")
    _check_nm(n, m, score.shape[-2])
    return _nm_mask(_check_score(score, score).astype(jnp.float32), n=n, m=m)


def samoyeds_mask(score: jax.Array, *, n_sel: int = 1, m_sel: int = 2, v: int = 128) -> jax.Array:
    """Boolean keep-mask [..., K, N] of the Samoyeds pattern (see the module docstring)."""
    score = jnp.asarray(score)
    if score.ndim < 2:
        raise ValueError(f"score must be [..., K, N]; given shape={tuple(score.shape)}")
    _check_samoyeds(n_sel, m_sel, v, score.shape[-2], score.shape[-1])
    return _samoyeds_mask(_check_score(score, score).astype(jnp.float32), n_sel=n_sel,
                          m_sel=m_sel, v=v)


def samoyeds_mask_shared(score1: jax.Array, score3: jax.Array, *, n_sel: int = 1, m_sel: int = 2,
                         v: int = 128) -> tuple[jax.Array, jax.Array]:
    """Samoyeds keep-masks of an expert's w1 and w3 [..., K, N] with one column choice.

    Each matrix is 2:4 along K by its own score; per slab, the columns are ranked by the sum of
    both matrices' kept scores, so w1 and w3 keep the same columns (their outputs multiply in
    SwiGLU: a column kept in only one of them is half wasted). Returns (mask1, mask3).
    """
    score1, score3 = jnp.asarray(score1), jnp.asarray(score3)
    if score1.ndim < 2 or score1.shape != score3.shape:
        raise ValueError(f"score1 and score3 must be [..., K, N] of one shape; given "
                         f"{tuple(score1.shape)} and {tuple(score3.shape)}")
    _check_samoyeds(n_sel, m_sel, v, score1.shape[-2], score1.shape[-1])
    score1 = _check_score(score1, score1).astype(jnp.float32)
    score3 = _check_score(score3, score3).astype(jnp.float32)
    return _samoyeds_mask_shared(score1, score3, n_sel=n_sel, m_sel=m_sel, v=v)


def unstructured_mask(score: jax.Array, *, sparsity: float) -> jax.Array:
    """Boolean keep-mask [..., K, N] of the top ``round((1-sparsity)*K*N)`` scores per matrix."""
    score = jnp.asarray(score)
    if score.ndim < 2:
        raise ValueError(f"score must be [..., K, N]; given shape={tuple(score.shape)}")
    _check_sparsity(sparsity)
    n_keep = _n_keep(sparsity, score.shape[-2] * score.shape[-1])
    return _unstructured_mask(_check_score(score, score).astype(jnp.float32), n_keep=n_keep,
                              select=_select_for(score.shape[-2] * score.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Pruning: weight in, pruned dense weight out.
# ----------------------------------------------------------------------------------------------


# A pattern is a hashable tuple ``(format name, *args)`` (``WeightFormat.pattern``):
# ("nm", n, m), ("samoyeds", n_sel, m_sel, v), ("unstructured", n_keep) or ("dense",).
Pattern = tuple


def _masks(scores: tuple[jax.Array, ...], pattern: Pattern) -> list[jax.Array]:
    """Keep-masks of ``pattern`` from scores (one shared choice where the format has one)."""
    name, *args = pattern
    scores = tuple(s.astype(jnp.float32) for s in scores)
    return format_registry.get_format(name, "pattern[0]").keep_masks(scores, *args)


def _mask(score: jax.Array, pattern: Pattern) -> jax.Array:
    return _masks((score,), pattern)[0]


@functools.partial(jax.jit, static_argnames=("pattern",))
def _prune(w: jax.Array, score: jax.Array | None, *, pattern: Pattern) -> jax.Array:
    """One compiled program per (shape, dtype, pattern): score (|w| if None) -> mask -> where."""
    if score is None:
        score = jnp.abs(w).astype(jnp.float32)
    return jnp.where(_mask(score, pattern), w, jnp.zeros((), w.dtype))


def prune_nm(w: jax.Array, *, n: int = 2, m: int = 4, score: jax.Array | None = None) -> jax.Array:
    """N:M pruning along K: w [..., K, N] -> pruned w (same shape and dtype).

    Args:
      w: weight [..., K, N], float32/bfloat16/float16; K % m == 0.
      n, m: keep n of every m consecutive rows of K, per column; (n, m) in ``SUPPORTED_NM``.
      score: [..., K, N], higher is kept; default ``|w|`` (magnitude). Pass ``wanda_score``.
    """
    w = _check_weight(w)
    _check_nm(n, m, w.shape[-2])
    score = None if score is None else _check_score(score, w)
    return _prune(w, score, pattern=("nm", n, m))


def prune_samoyeds(w: jax.Array, *, n_sel: int = 1, m_sel: int = 2, v: int = 128,
                   score: jax.Array | None = None) -> jax.Array:
    """Samoyeds pruning (vector-wise n_sel:m_sel:v column selection, then 2:4 along K).

    Args:
      w: weight [..., K, N], float32/bfloat16/float16; K % v == 0, N % m_sel == 0.
      n_sel, m_sel, v: per slab of v rows of K, keep n_sel of every m_sel consecutive output
        columns (the ones with the highest sum of post-2:4 scores in the slab).
      score: [..., K, N], higher is kept; default ``|w|``.

    Returns:
      The pruned w (same shape and dtype); density n_sel/m_sel * 1/2 (25% for 1:2:v).
    """
    w = _check_weight(w)
    _check_samoyeds(n_sel, m_sel, v, w.shape[-2], w.shape[-1])
    score = None if score is None else _check_score(score, w)
    return _prune(w, score, pattern=("samoyeds", n_sel, m_sel, v))


def prune_unstructured(w: jax.Array, *, sparsity: float,
                       score: jax.Array | None = None) -> jax.Array:
    """Unstructured pruning: keep the top ``round((1 - sparsity) * K * N)`` entries per matrix.

    Args:
      w: weight [..., K, N], float32/bfloat16/float16.
      sparsity: fraction of entries to zero, in [0, 1).
      score: [..., K, N], higher is kept; default ``|w|``.
    """
    w = _check_weight(w)
    _check_sparsity(sparsity)
    score = None if score is None else _check_score(score, w)
    n_keep = _n_keep(sparsity, w.shape[-2] * w.shape[-1])
    return _prune(w, score, pattern=("unstructured", n_keep))

"""Pruning of (expert) weights into the sparsity patterns of ``pallas_kernels``' formats.

Weights are stored for ``y = x @ W``: ``W`` is ``[..., K, N]`` (K input channels, N output
channels) with any leading dims, e.g. an expert stack ``[e, K, N]``. The ``prune_*`` functions
return the pruned *dense* weight (same shape and dtype, pruned entries set to zero); the
``*_mask`` functions return the boolean keep-mask; ``convert`` turns a pruned weight into its
compressed format, and ``prune_experts`` does all of it for every expert weight of a model.

Scores (higher is kept), always computed in float32:

- magnitude: ``|W[k, n]|``;
- Wanda (Sun et al. 2023, arXiv 2306.11695): ``|W[k, n]| * ||X[:, k]||_2``, the L2 norm of input
  channel k over calibration activations ``X [t, K]`` (the norm is per row k of W).

``PruneConfig(method="sparsegpt")`` instead chooses the mask and updates the kept weights by
second-order (OBS) reconstruction of ``X W`` (``samoyeds_jax.sparsegpt``), to the same patterns.

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

import collections
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pallas_kernels import format_registry
from pallas_kernels.formats import NM_PATTERNS
from pallas_kernels.prune_masks import (check_ints as _check_ints, check_nm as _check_nm,
                                        check_samoyeds as _check_samoyeds,
                                        check_sparsity as _check_sparsity,
                                        count_kept as _n_keep, nm_keep as _nm_mask,
                                        samoyeds_keep as _samoyeds_mask,
                                        samoyeds_keep_shared as _samoyeds_mask_shared,
                                        select_for as _select_for,
                                        unstructured_keep as _unstructured_mask)

__all__ = [
    "SUPPORTED_NM",
    "LayerReport",
    "PruneConfig",
    "PruneReport",
    "channel_norms",
    "convert",
    "is_expert_weight",
    "magnitude_score",
    "nm_mask",
    "prune_experts",
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

# For typing; the formats are those of ``format_registry.FORMATS`` (a test keeps the two equal).
Format = Literal["dense", "nm", "samoyeds", "unstructured"]
Method = Literal["magnitude", "wanda", "sparsegpt"]
Output = Literal["compressed", "dense"]

# Expert stacks above this many elements in total show a progress bar (when stderr is a tty).
_LARGE_MODEL_ELEMENTS = 1 << 26


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


# ----------------------------------------------------------------------------------------------
# Model-level pruning.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """What to prune to and how to score.

    Attributes:
      format: "dense" (leave weights as they are; a baseline), "nm", "samoyeds" or
        "unstructured".
      method: "magnitude" (|W|), "wanda" (|W| * input-channel norm; needs calibration) or
        "sparsegpt" (second-order mask choice with weight reconstruction,
        ``samoyeds_jax.sparsegpt``; needs calibration).
      n, m: the N:M pattern of format "nm".
      n_sel, m_sel, v: the vector-wise selection of format "samoyeds" (2:4 inside is fixed).
      sparsity: fraction zeroed by format "unstructured", in [0, 1).
      output: "compressed" returns format objects (NMSparse / SamoyedsSparse / TiledSparse),
        "dense" the pruned dense arrays.
      tile_k, tile_n: TiledSparse tile size of format "unstructured" (None: its defaults).
      shared_w1_w3: format "samoyeds" only: each expert's w1 and w3 (same input, outputs
        multiplied in SwiGLU) keep the same columns per slab, chosen by their summed scores
        (``samoyeds_mask_shared``; for sparsegpt, summed OBS savings). None (default): True
        for "samoyeds", where it measured better for every method (benchmarks/quality.md),
        else False. Other formats have no column choice to share, so True raises ValueError.
      damp, block_size: method "sparsegpt"'s dampening (fraction of mean(diag H)) and rows per
        lazy-update block (a multiple of m for "nm"; Samoyeds uses v).
    """

    format: Format
    method: Method = "magnitude"
    n: int = 2
    m: int = 4
    n_sel: int = 1
    m_sel: int = 2
    v: int = 128
    sparsity: float = 0.5
    output: Output = "compressed"
    tile_k: int | None = None
    tile_n: int | None = None
    shared_w1_w3: bool | None = None
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        if self.format not in format_registry.FORMATS:
            raise ValueError(f"format={self.format!r} must be one of "
                             f"{', '.join(map(repr, format_registry.format_names()))}")
        if self.method not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"method={self.method!r} must be 'magnitude', 'wanda' or "
                             "'sparsegpt'")
        if self.shared_w1_w3 is None:
            object.__setattr__(self, "shared_w1_w3", self._shares_columns())
        if not isinstance(self.shared_w1_w3, bool):
            raise ValueError(f"shared_w1_w3 must be a bool; given {self.shared_w1_w3!r}")
        if self.shared_w1_w3 and not self._shares_columns():
            raise ValueError(f"shared_w1_w3=True applies to format='samoyeds' only (the one "
                             f"format with a column choice to share); given format="
                             f"{self.format!r}")
        self.sparsegpt_config()  # validates damp and block_size
        if self.method == "sparsegpt" and self.format == "nm" and self.block_size % self.m:
            raise ValueError(f"block_size={self.block_size} must be a multiple of m={self.m} "
                             "(N:M groups may not straddle blocks)")
        if self.output not in ("compressed", "dense"):
            raise ValueError(f"output={self.output!r} must be 'compressed' or 'dense'")
        _check_nm(self.n, self.m)
        _check_samoyeds(self.n_sel, self.m_sel, self.v)
        _check_sparsity(self.sparsity)
        for name in ("tile_k", "tile_n"):
            if getattr(self, name) is not None:
                _check_ints(**{name: getattr(self, name)})
        if self.output == "compressed":
            try:
                self.weight_format.check_params(**self.format_params())
            except ValueError as err:
                raise ValueError(f"format={self.format!r} cannot store these parameters: {err}; "
                                 "use output='dense' to keep the pruned weights dense") from None

    @property
    def weight_format(self) -> format_registry.WeightFormat:
        """The registry entry of ``format``."""
        return format_registry.get_format(self.format)

    def format_params(self) -> dict[str, Any]:
        """The parameters of ``format`` set by this config (e.g. n and m for "nm")."""
        return self.weight_format.params_of(self)

    def pattern(self, k: int, n_out: int) -> Pattern:
        """The hashable pattern of one [K, N] matrix (validates K and N against it, and
        against the compressed format's layout when ``output == "compressed"``)."""
        fmt, params = self.weight_format, self.format_params()
        pattern = fmt.pattern(k, n_out, **params)
        if self.output == "compressed":
            try:
                fmt.check_shape(k, n_out, **params)
            except ValueError as err:
                raise ValueError(f"[K={k}, N={n_out}] cannot be stored as {self.format!r}: {err}; "
                                 "use output='dense'") from None
        return pattern

    def _shares_columns(self) -> bool:
        """Whether two matrices pruned together (w1 and w3) share one choice in ``format``."""
        return self.weight_format.pattern_shares_choice

    def sparsegpt_config(self):
        """The ``sparsegpt.SparseGPTConfig`` of this config's damp and block_size."""
        from samoyeds_jax import sparsegpt  # it builds on this module's masks

        return sparsegpt.SparseGPTConfig(block_size=self.block_size, damp=self.damp)

    def prune(self, w: jax.Array, score: jax.Array | None = None) -> jax.Array:
        """Prune one weight [..., K, N] to this config's pattern (dense out, same dtype).

        Scores by ``score`` (default magnitude) whatever ``method`` says; "sparsegpt" needs a
        Hessian: ``sparsegpt.sparsegpt_prune(w, h, self.pattern(K, N),
        config=self.sparsegpt_config())`` prunes one matrix that way.
        """
        w = _check_weight(w)
        score = None if score is None else _check_score(score, w)
        return _prune(w, score, pattern=self.pattern(*w.shape[-2:]))


def convert(w: jax.Array, config: PruneConfig) -> Any:
    """Pruned dense weight [..., K, N] -> the compressed format of ``config.format``.

    The format's ``from_dense`` (``format_registry``): "nm" -> ``formats.NMSparse``,
    "samoyeds" -> ``formats.SamoyedsSparse``, "unstructured" -> ``tiled_format.TiledSparse``;
    "dense" returns ``w`` as an array. Exact: ``convert(w, c).to_dense() == w``. Raises
    ValueError (from the format) if ``w`` does not satisfy the pattern.
    """
    return config.weight_format.from_dense(w, **config.format_params())


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerReport:
    """Result of pruning one weight (a matrix or an expert stack).

    Attributes:
      path: the weight's path in the pytree, "/"-joined (e.g. "layers/0/w1").
      shape, dtype: of the dense weight.
      density: fraction of nonzero entries after pruning.
      weight_rel_error: ||W - W_pruned||_F / ||W||_F over the whole stack, in [0, 1].
      output_rel_error: ||X W - X W_pruned||_F / ||X W||_F on the calibration activations, or
        None without calibration for this weight.
      dense_bytes: bytes of the dense weight; stored_bytes: bytes of what is returned.
      matrix_weight_rel_errors: weight_rel_error of every matrix of the stack (row-major over
        the leading dims, e.g. one per expert).
      fallback_matrices: the matrices of the stack (same indexing) pruned by magnitude instead
        of ``method`` ("wanda"/"sparsegpt") because their calibration activations are all zero
        (an expert no calibration token was routed to) or, for "sparsegpt", their dampened
        Hessian could not be factorized.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    density: float
    weight_rel_error: float
    output_rel_error: float | None
    dense_bytes: int
    stored_bytes: int
    matrix_weight_rel_errors: tuple[float, ...]
    fallback_matrices: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneReport:
    """Per-weight results of ``prune_experts`` plus totals."""

    config: PruneConfig
    layers: dict[str, LayerReport]

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.layers.values())

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.layers.values())

    @property
    def max_weight_rel_error(self) -> float:
        return max((r.weight_rel_error for r in self.layers.values()), default=0.0)

    @property
    def mean_weight_rel_error(self) -> float:
        errs = [r.weight_rel_error for r in self.layers.values()]
        return float(np.mean(errs)) if errs else 0.0

    @property
    def mean_output_rel_error(self) -> float | None:
        errs = [r.output_rel_error for r in self.layers.values() if r.output_rel_error is not None]
        return float(np.mean(errs)) if errs else None

    @property
    def fallback_matrices(self) -> dict[str, tuple[int, ...]]:
        """{path: matrices pruned by magnitude instead of the method} for weights with any."""
        return {p: r.fallback_matrices for p, r in self.layers.items() if r.fallback_matrices}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"config", "layers": {path: {...}}, "summary": {...}}."""
        return {
            "config": dataclasses.asdict(self.config),
            "layers": {p: dataclasses.asdict(r) for p, r in self.layers.items()},
            "summary": {
                "num_weights": len(self.layers),
                "dense_bytes": self.dense_bytes,
                "stored_bytes": self.stored_bytes,
                "mean_weight_rel_error": self.mean_weight_rel_error,
                "max_weight_rel_error": self.max_weight_rel_error,
                "mean_output_rel_error": self.mean_output_rel_error,
                "num_fallback_matrices": sum(map(len, self.fallback_matrices.values())),
            },
        }

    def table(self) -> str:
        """A fixed-width text table, one line per weight, then totals."""
        lines = [f"{'weight':<28} {'shape':<20} {'density':>7} {'w_err':>7} {'y_err':>7} "
                 f"{'MiB':>9} {'of dense':>8}"]
        for r in self.layers.values():
            y = "-" if r.output_rel_error is None else f"{r.output_rel_error:.4f}"
            lines.append(f"{r.path:<28} {str(list(r.shape)):<20} {r.density:>7.4f} "
                         f"{r.weight_rel_error:>7.4f} {y:>7} {r.stored_bytes / 2**20:>9.2f} "
                         f"{r.stored_bytes / max(r.dense_bytes, 1):>8.4f}")
        lines.append(f"{'total':<28} {'':<20} {'':>7} {self.mean_weight_rel_error:>7.4f} "
                     f"{'':>7} {self.stored_bytes / 2**20:>9.2f} "
                     f"{self.stored_bytes / max(self.dense_bytes, 1):>8.4f}")
        for path, idx in self.fallback_matrices.items():
            lines.append(f"{path}: matrices {list(idx)} pruned by magnitude instead of "
                         f"{self.config.method} (all-zero calibration: no tokens routed there"
                         + (", or H not factorizable)" if self.config.method == "sparsegpt"
                            else ")"))
        return "\n".join(lines)


_EXPERT_NAMES = frozenset({"w1", "w2", "w3"})


def is_expert_weight(path: str, leaf: Any) -> bool:
    """Default selection: a leaf named w1/w2/w3 (Mixtral gate/down/up) with ndim >= 3."""
    return path.rsplit("/", 1)[-1] in _EXPERT_NAMES and getattr(leaf, "ndim", 0) >= 3


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if len(parts) > 1 and parts[-1] == "value":  # nnx.State leaves: .../w1/value
        parts.pop()
    return "/".join(parts)


def _activation(path: str, leaves: Mapping[str, jax.Array],
                calibration: Mapping[str, Any] | None) -> jax.Array | None:
    """The calibration input of weight ``path``, or None.

    ``calibration[path]`` wins; otherwise ``calibration[parent]`` is the input of an expert FFN
    ({w1, w3, w2} under one parent): w1/w3 see it directly, and w2 sees
    ``silu(x @ w1) * (x @ w3)`` with w1/w3 as found in ``leaves`` (``prune_experts`` passes the
    ones it has already pruned).
    """
    if not calibration:
        return None
    if path in calibration:
        return jnp.asarray(calibration[path])
    parent, _, name = path.rpartition("/")
    if parent not in calibration or name not in _EXPERT_NAMES:
        return None
    x = jnp.asarray(calibration[parent])
    if name in ("w1", "w3"):
        return x
    w1, w3 = leaves.get(f"{parent}/w1"), leaves.get(f"{parent}/w3")
    if w1 is None or w3 is None:
        return None
    _check_finite(x, f"calibration[{parent!r}]")
    return _ffn_hidden(x, w1, w3)


@jax.jit
def _ffn_hidden(x: jax.Array, w1: jax.Array, w3: jax.Array) -> jax.Array:
    """silu(x @ w1) * (x @ w3) in float32: x [t, d] or [e, t, d], w1/w3 [e, d, f] -> [e, t, f]."""
    x = x.astype(jnp.float32)
    if x.ndim == 2:
        x = jnp.broadcast_to(x[None], (w1.shape[0],) + x.shape)
    hi = jax.lax.Precision.HIGHEST
    g = jnp.einsum("etd,edf->etf", x, w1.astype(jnp.float32), precision=hi)
    u = jnp.einsum("etd,edf->etf", x, w3.astype(jnp.float32), precision=hi)
    return jax.nn.silu(g) * u


@functools.partial(jax.jit, static_argnames=("pattern", "method", "sparsegpt_config"))
def _prune_matrices(ws: tuple[jax.Array, ...], x: jax.Array | None, *, pattern: Pattern,
                    method: Method, sparsegpt_config: Any = None):
    """Prune one matrix [K, N], or an expert's (w1, w3) sharing the Samoyeds column choice, in
    one program (x [t, K] or None).

    Returns (pruned tuple in the weights' dtype, float32 [len(ws), 4] = (||w - p||^2, ||w||^2,
    ||x(w - p)||^2, ||x w||^2) per matrix (zeros for the x terms without x), nonzero counts
    [len(ws)], bool: pruned by magnitude instead of ``method``).
    """
    fallback = jnp.zeros((), jnp.bool_)
    if method == "sparsegpt":
        from samoyeds_jax import sparsegpt  # it builds on this module's masks

        ps, info = sparsegpt._sparsegpt(ws, sparsegpt._hessian(x), None, pattern=pattern,
                                        config=sparsegpt_config)
        fallback = info["fallback"]
    else:
        scores = [jnp.abs(w).astype(jnp.float32) for w in ws]
        if method == "wanda":  # all-zero activations would make every Wanda score 0
            fallback = jnp.logical_not(jnp.any(x != 0))
            scores = [jnp.where(fallback, s, _wanda(w, x)) for s, w in zip(scores, ws)]
        masks = _masks(tuple(scores), pattern)
        ps = tuple(jnp.where(m, w, jnp.zeros((), w.dtype)) for m, w in zip(masks, ws))
    sums = []
    hi = jax.lax.Precision.HIGHEST
    for w, p in zip(ws, ps):
        w32 = w.astype(jnp.float32)
        diff = w32 - p.astype(jnp.float32)
        row = [jnp.sum(diff * diff), jnp.sum(w32 * w32)]
        if x is None:
            row += [jnp.zeros((), jnp.float32)] * 2
        else:
            x32 = x.astype(jnp.float32)
            dy = jnp.matmul(x32, diff, precision=hi)
            y = jnp.matmul(x32, w32, precision=hi)
            row += [jnp.sum(dy * dy), jnp.sum(y * y)]
        sums.append(jnp.stack(row))
    nnz = jnp.stack([jnp.count_nonzero(p) for p in ps])
    return ps, jnp.stack(sums), nnz, fallback


def _ratio(num: float, den: float) -> float:
    return 0.0 if den == 0.0 else math.sqrt(num / den)


def _prune_group(paths: tuple[str, ...], ws: tuple[Any, ...], x: jax.Array | None,
                 config: PruneConfig) -> list[tuple[Any, jax.Array, LayerReport]]:
    """Prune one weight [..., K, N], or an expert FFN's (w1, w3) with one Samoyeds column
    choice, matrix by matrix (bounded temporary memory).

    Returns (stored, pruned dense, report) per weight.
    """
    ws = tuple(_check_weight(w, p) for p, w in zip(paths, ws))
    *lead, k, n_out = ws[0].shape
    if any(w.shape != ws[0].shape for w in ws):
        raise ValueError(f"shared_w1_w3: {paths[0]!r} and {paths[1]!r} must have one shape; "
                         f"given {tuple(ws[0].shape)} and {tuple(ws[1].shape)}")
    if x is not None:
        x = jnp.asarray(x)
        if x.ndim < 2 or x.shape[-1] != k or (x.ndim > 2 and tuple(x.shape[:-2]) != tuple(lead)):
            raise ValueError(f"calibration for {paths[0]!r} (w.shape={tuple(ws[0].shape)}) must "
                             f"be [t, {k}] or {lead + ['t', k]}; given shape={tuple(x.shape)}")
        _check_finite(x, f"calibration for {paths[0]!r}")
    if config.method != "magnitude" and x is None:
        raise ValueError(f"method={config.method!r} needs calibration activations for "
                         f"{paths[0]!r}; pass calibration={{{paths[0]!r}: x [t, {k}]}} or its "
                         "FFN's input under the parent path")
    pattern = config.pattern(k, n_out)
    sgpt = config.sparsegpt_config() if config.method == "sparsegpt" else None
    batch = math.prod(lead)
    flat = [w.reshape(batch, k, n_out) for w in ws]
    x_flat = None if x is None or x.ndim == 2 else x.reshape(batch, *x.shape[-2:])
    pieces = [[] for _ in ws]
    per_matrix = [[] for _ in ws]
    kept, sums, fallback = np.zeros(len(ws), np.int64), np.zeros((len(ws), 4)), []
    for i in range(batch):  # matrix by matrix: temporaries stay the size of one matrix
        x_i = x if x_flat is None else x_flat[i]
        ps, sq, nnz, fb = _prune_matrices(tuple(f[i] for f in flat), x_i, pattern=pattern,
                                          method=config.method, sparsegpt_config=sgpt)
        sq = np.asarray(sq, np.float64)
        sums += sq
        kept += np.asarray(nnz, np.int64)
        if bool(fb):
            fallback.append(i)
        for j, p in enumerate(ps):
            per_matrix[j].append(_ratio(sq[j, 0], sq[j, 1]))
            pieces[j].append(p)
    results = []
    for j, (path, w) in enumerate(zip(paths, ws)):
        pruned = jnp.stack(pieces[j]).reshape(w.shape)
        stored = pruned if config.output == "dense" else convert(pruned, config)
        stored_bytes = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(stored))
        report = LayerReport(
            path=path, shape=tuple(w.shape), dtype=str(w.dtype), format=config.format,
            density=int(kept[j]) / w.size, weight_rel_error=_ratio(sums[j, 0], sums[j, 1]),
            output_rel_error=None if x is None else _ratio(sums[j, 2], sums[j, 3]),
            dense_bytes=int(w.nbytes), stored_bytes=stored_bytes,
            matrix_weight_rel_errors=tuple(per_matrix[j]), fallback_matrices=tuple(fallback))
        results.append((stored, pruned, report))
    return results


def _schedule(paths: list[str], chosen: list[int], shared: bool) -> list[tuple[int, ...]]:
    """The order of work over the chosen leaves (indices into ``paths``).

    An expert FFN's w2 comes right after its w1 and w3 (its calibration input is computed from
    them once pruned); with ``shared``, w1 and w3 of one parent are one step (w1 first).
    """
    index = {paths[i]: i for i in chosen}

    def sibling(i: int, name: str) -> int | None:
        return index.get(f"{paths[i].rpartition('/')[0]}/{name}")

    def key(i: int) -> tuple[int, int]:
        if paths[i].rpartition("/")[2] != "w2":
            return (i, 0)
        return (max([i] + [j for j in (sibling(i, "w1"), sibling(i, "w3")) if j is not None]), 1)

    steps, done = [], set()
    for i in sorted(chosen, key=key):
        if i in done:
            continue
        name = paths[i].rpartition("/")[2]
        other = sibling(i, {"w1": "w3", "w3": "w1"}[name]) if name in ("w1", "w3") else None
        step = (i,) if not shared or other is None else tuple(sorted(
            (i, other), key=lambda j: paths[j].rpartition("/")[2]))
        steps.append(step)
        done.update(step)
    return steps


def _same_input(a: jax.Array | None, b: jax.Array | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(jnp.array_equal(a, b)))


def prune_experts(
    params: Any,
    config: PruneConfig,
    calibration: Mapping[str, Any] | None = None,
    *,
    select: Callable[[str, Any], bool] = is_expert_weight,
    progress: bool | None = None,
) -> tuple[Any, PruneReport]:
    """Prune and convert every selected weight of a model.

    Args:
      params: a pytree of arrays (nested dicts such as
        ``{"layers": {0: {"w1": [e, d, f], "w3": [e, d, f], "w2": [e, f, d]}}}``, or an
        ``nnx.State``). Weights are [..., K, N] for ``y = x @ W``.
      config: the target format and method.
      calibration: activations keyed by path ("/"-joined keys). ``calibration["layers/0/w1"]``
        is the input of that weight: [t, K], or [e, t, K] per expert (zero-padded token lists).
        ``calibration["layers/0"]`` is the input [t, d] / [e, t, d] of that layer's expert FFN:
        w1/w3 use it, and w2 uses ``silu(x @ w1) * (x @ w3)`` computed with w1 and w3 as
        pruned in this call when they are selected too (for every method: w2 is fitted to the
        inputs it sees in the pruned model, as SparseGPT prunes layers sequentially), else the
        dense ones. Needed for method="wanda" and "sparsegpt" (which builds each expert's
        Hessian ``X^T X`` from it); when given, the report also has output errors. A matrix
        whose calibration is all zero (no token routed to that expert) is pruned by
        magnitude, and its report lists it (``LayerReport.fallback_matrices``).
      select: ``select(path, leaf) -> bool`` picks the weights to prune; default
        ``is_expert_weight`` (w1/w2/w3 stacks). To include attention/dense projections:
        ``select=lambda p, a: is_expert_weight(p, a) or p.endswith(("wq", "wo"))``.
      progress: show a tqdm bar; None shows it when stderr is a tty and the selected weights
        hold more than 2**26 elements.

    With ``config.shared_w1_w3`` (Samoyeds), the w1 and w3 under one parent are pruned together
    with one column choice; they must have one shape and one calibration input.

    Returns:
      (converted, report): ``params`` with every selected leaf replaced by its compressed
      format (or pruned dense array, ``config.output == "dense"``), and a ``PruneReport``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_path_str(p) for p, _ in flat]
    leaves = dict(zip(paths, (leaf for _, leaf in flat)))
    if len(leaves) != len(paths):
        raise ValueError("params has two leaves with the same '/'-joined path")
    chosen = [i for i, p in enumerate(paths) if select(p, leaves[p])]
    if calibration:
        unknown = sorted(set(calibration) - set(paths) - {p.rpartition("/")[0] for p in paths})
        if unknown:
            raise ValueError(f"calibration keys {unknown} match no weight path or parent path "
                             f"of params (e.g. {paths[:3]})")
    for i in chosen:  # shapes first: fail before any work, not after hours of it
        shape = np.shape(leaves[paths[i]])
        if len(shape) < 2:
            raise ValueError(f"selected weight {paths[i]!r} must be [..., K, N]; given "
                             f"shape={shape}")
        config.pattern(*shape[-2:])
    if progress is None:
        total = sum(int(np.prod(np.shape(leaves[paths[i]]))) for i in chosen)
        progress = sys.stderr.isatty() and total > _LARGE_MODEL_ELEMENTS
    chosen_paths = {paths[i] for i in chosen}
    out = [leaf for _, leaf in flat]
    layers: dict[str, LayerReport] = {}
    # Pruned w1/w3 (dense) kept until their FFN's w2 has used them: at most one FFN at a time.
    pruned_inputs: dict[str, jax.Array] = {}
    current = collections.ChainMap(pruned_inputs, leaves)
    bar = tqdm(total=len(chosen), desc=f"pruning ({config.format}, {config.method})",
               unit="weight", disable=not progress)
    for step in _schedule(paths, chosen, config.shared_w1_w3):
        names = tuple(paths[i] for i in step)
        bar.set_postfix_str(", ".join(names), refresh=False)
        x = _activation(names[0], current, calibration)
        if len(names) == 2 and not _same_input(x, _activation(names[1], current, calibration)):
            raise ValueError(f"shared_w1_w3: {names[0]!r} and {names[1]!r} share one column "
                             "choice, so they must read the same calibration input; "
                             "calibration gives them different ones")
        results = _prune_group(names, tuple(leaves[p] for p in names), x, config)
        for i, path, (stored, pruned, report) in zip(step, names, results):
            out[i], layers[path] = stored, report
            parent, _, name = path.rpartition("/")
            if name in ("w1", "w3") and f"{parent}/w2" in chosen_paths:
                pruned_inputs[path] = pruned
            elif name == "w2":
                pruned_inputs.pop(f"{parent}/w1", None)
                pruned_inputs.pop(f"{parent}/w3", None)
        bar.update(len(step))
    bar.close()
    layers = {paths[i]: layers[paths[i]] for i in chosen}  # report in the params' order
    return jax.tree_util.tree_unflatten(treedef, out), PruneReport(config=config, layers=layers)

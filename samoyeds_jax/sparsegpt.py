"""Second-order (SparseGPT / OBS) pruning with weight reconstruction, for every sparse format.

Weights are ``W [K, N]`` for ``y = x @ W`` (K input channels). Pruning minimises the layer's
output error on calibration inputs ``X [t, K]``, ``||X W - X P||_F^2 = sum_n (w_n - p_n)^T H
(w_n - p_n)`` with ``H = X^T X`` (``hessian``) and ``w_n`` column n of W: every output column is
an independent least-squares problem sharing H. Following SparseGPT (Frantar & Alistarh 2023,
arXiv 2301.00774), the rows of W (input channels) are visited in order; a pruned entry's error is
compensated by the optimal brain surgeon (OBS) update of the rows not yet visited, and the
keep-mask is chosen adaptively from the already updated weights:

- ``U``, upper triangular with ``(H + damp * mean(diag H) * I)^-1 = U^T U``. Its trailing block
  ``U[i:, i:]`` is the same factor of the inverse Hessian of the rows ``>= i`` alone, so one
  factorization serves every step. Pruning entry (i, n) costs ``(w_in / U_ii)^2`` and moves the
  later rows by ``-U[i, j] * w_in / U_ii``.
- Lazy batch updates: rows are processed in blocks of ``block_size``; inside a block the
  updates stay in the block, and the rows after it receive them in one matmul per block
  (``W -= U[block, :]^T @ E``). The result is the same as row-by-row updates.
- Mask choice (saliency ``w^2 / U_ii^2`` of the current, updated weights):

  * ``("nm", n, m)``: every m rows, the n most salient of each column's m entries;
  * ``("unstructured", n_keep)``: per block, the most salient entries of the block (the block's
    share of ``n_keep``, so every block has about the same density);
  * ``("samoyeds", n_sel, m_sel, v)``: blocks are the v-row slabs. For every column of a slab
    both alternatives run in full: 2:4 along K chosen every 4 rows (OBS cost ``c24``), and the
    whole column pruned (cost ``call = ||U_SS^-T w||^2``, the exact OBS cost of removing the
    slab's v entries). Of every m_sel consecutive columns, the n_sel with the largest saving
    ``call - c24`` are kept (2:4); the others are pruned, and each alternative's errors are
    propagated to the later slabs. For a w1/w3 pair (``sparsegpt_prune_pair``) the savings of
    both matrices are summed, so both keep the same columns. (The sum of ``w^2 / U_ii^2`` over
    the entries 2:4 would keep approximates the saving; on synthetic correlated data the exact
    costs gave the same or up to 1% lower output error, for one triangular solve per slab.)
    With ``column_sweeps`` > 0 the greedy choice is then revised slab by slab, each slab's
    columns re-chosen with the other slabs' fixed and priced by full passes
    (``sparsegpt_refit._samoyeds_sweeps``; about K/v passes per sweep, off by default).

- Refit (``refit_iters``, on by default): the sequential reconstruction is not the optimum of
  the mask it chose: a kept row never moves after it is visited, so it cannot absorb the
  errors of the rows pruned after it. Once the mask is fixed, the kept weights of every column
  are refit to the least-squares optimum ``H'_SS p_S = (H' w)_S`` on its kept rows S by
  conjugate gradients (``sparsegpt_refit._refit``; never worse than the sequential result).
  The mask and the pattern stay the same. On the reference model (benchmarks/quality.md
  "One-shot": 128 calibration windows, 96 validation windows, dense 2.0693 bits/byte; CPU) this
  took Samoyeds with the shared w1/w3 choice from 2.6266 (+0.557) to 2.3424 (+0.273) and, with
  one column sweep, 2.3141 (+0.245; two sweeps the same); Samoyeds with separate w1/w3 choices
  from +0.667 to +0.324, unstructured 75% from +0.126 to +0.060 and 2:4 from +0.018 to +0.005.
  The objective on the experts' calibration tokens fell 1.1x-12x (most for block 0's w1/w3,
  least for w2 and later blocks). It pays most at high sparsity, with activations near a low-rank
  subspace (the kept channels can rebuild the pruned ones): on isotropic AR(1) test data the
  objective fell only 5% and the held-out error did not improve.

Dead inputs (``H_kk == 0``: channel k is zero on every calibration token) get ``H_kk = 1`` and
their rows of W are zeroed, as SparseGPT does (the data cannot tell their effect). A matrix whose
H is all zero (an expert no calibration token was routed to) or whose dampened H cannot be
factorized is pruned by magnitude instead, and ``info["fallback"]`` says so.

Hessians add up: ``hessian(concat(x_a, x_b)) == hessian(x_a) + hessian(x_b)``, so calibration can
be streamed in batches (zero rows, e.g. the padding of per-expert token lists, add nothing). The
scale of H does not matter (the dampening is relative to mean(diag H)): a mean over tokens works
as well as the sum.

Calibration size matters more than for Wanda: with fewer tokens t than input channels K, H is
rank-deficient and the reconstruction fits the calibration tokens rather than the distribution
(on synthetic correlated data with t = K/2 the held-out output error came out above Wanda's,
with t = 2K below it). Give each matrix well over K tokens (an expert's w2 has K = d_ff), or
raise ``damp``.

All math is float32; the pruned weights come back in the weight's dtype with pruned entries
exactly zero, so ``pruning.convert`` stores them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.prune_masks import check_ints as _check_ints
from samoyeds_jax import prune_weights
from samoyeds_jax.sparsegpt_obs import _HI, MaskChoice, _inverse_factor, _obs_pass, choice_of
from samoyeds_jax.sparsegpt_refit import _refit, _samoyeds_sweeps

__all__ = [
    "SparseGPTConfig",
    "hessian",
    "obs_reconstruct",
    "sparsegpt_prune",
    "sparsegpt_prune_pair",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTConfig:
    """Settings of the OBS pruning pass.

    Attributes:
      block_size: rows of W (input channels) per lazy-update block; for "nm" a multiple of m.
        Samoyeds uses its slab height v instead (the column choice is made per slab).
        Unstructured masks are chosen per block, so this also sets their granularity.
      damp: added to H's diagonal as a fraction of mean(diag H) (0.01 as in SparseGPT); > 0,
        so a rank-deficient H (fewer tokens than channels) still has an inverse.
      refit_iters: conjugate-gradient iterations of the final refit of the kept weights to the
        least-squares optimum on the chosen mask (``sparsegpt_refit._refit``); 0 keeps
        SparseGPT's sequential reconstruction. CG on a column with s kept entries is exact after
        s iterations in exact arithmetic; converged columns stop early.
      column_sweeps: format "samoyeds" only: coordinate-descent sweeps that re-choose every
        slab's columns with the other slabs' choices fixed
        (``sparsegpt_refit._samoyeds_sweeps``). Each sweep costs about K/v full passes, so 0 by
        default.
    """

    block_size: int = 128
    damp: float = 0.01
    refit_iters: int = 100
    column_sweeps: int = 0

    def __post_init__(self):
        _check_ints(block_size=self.block_size, refit_iters=self.refit_iters,
                    column_sweeps=self.column_sweeps)
        if self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size} must be positive")
        if self.refit_iters < 0 or self.column_sweeps < 0:
            raise ValueError(f"refit_iters={self.refit_iters} and column_sweeps="
                             f"{self.column_sweeps} must be >= 0")
        if (isinstance(self.damp, bool) or not isinstance(self.damp, (int, float, np.floating))
                or not (0.0 < self.damp < float("inf"))):
            raise ValueError(f"damp={self.damp!r} must be a finite number > 0 (a fraction of "
                             "mean(diag H))")


# ----------------------------------------------------------------------------------------------
# Hessian.
# ----------------------------------------------------------------------------------------------


def hessian(x: jax.Array) -> jax.Array:
    """``H = x^T x`` in float32: x [t, K] -> [K, K], or per expert x [e, t, K] -> [e, K, K].

    Zero rows of x (padding) add nothing. To accumulate over calibration batches, sum the
    results: ``h = hessian(x_0) + hessian(x_1) + ...`` (any positive rescaling, e.g. dividing by
    the token count, leaves the pruning unchanged).
    """
    x = jnp.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"calibration activations must be [t, K] or [e, t, K]; given "
                         f"x.shape={tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"calibration activations must be floating; given x.dtype={x.dtype}")
    prune_weights._check_finite(x, "x")
    return _hessian(x)


@jax.jit
def _hessian(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.einsum("...tk,...tj->...kj", x, x, precision=_HI)


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------


def _check_h(h: Any, k: int) -> jax.Array:
    h = jnp.asarray(h)
    if h.shape != (k, k):
        raise ValueError(f"h must be the [K, K] Hessian of the weight's K={k} input channels; "
                         f"given h.shape={tuple(h.shape)}")
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(f"h must be floating; given h.dtype={h.dtype}")
    prune_weights._check_finite(h, "h")
    return h


def _check_matrix(w: Any, name: str) -> jax.Array:
    w = prune_weights._check_weight(w, name)
    if w.ndim != 2:
        raise ValueError(f"{name} must be one matrix [K, N] (loop over experts for a stack); "
                         f"given {name}.shape={tuple(w.shape)}")
    return w


def _check_pattern(pattern: Any, k: int, n_out: int, config: SparseGPTConfig) -> tuple:
    """Validate a ``PruneConfig.pattern()`` tuple against W's shape and the block size."""
    if not isinstance(pattern, tuple) or not pattern:
        raise ValueError(f"pattern must be a tuple such as ('nm', 2, 4), ('samoyeds', 1, 2, 128), "
                         f"('unstructured', n_keep) or ('dense',); given {pattern!r}")
    choice = choice_of(pattern)
    if choice is None:
        raise ValueError(f"unknown pattern {pattern!r}; expected ('nm', n, m), "
                         "('samoyeds', n_sel, m_sel, v), ('unstructured', n_keep) or ('dense',)")
    choice.check(k, n_out, config.block_size)
    return pattern


# ----------------------------------------------------------------------------------------------
# Jitted cores and the public API.
# ----------------------------------------------------------------------------------------------


def _magnitude(ws: tuple[jax.Array, ...], pattern: tuple) -> tuple[jax.Array, ...]:
    """The magnitude pruning of ``prune_weights`` (shared column choice for a Samoyeds pair)."""
    masks = prune_weights._masks(tuple(jnp.abs(w) for w in ws), pattern)
    return tuple(jnp.where(m, w, jnp.zeros((), w.dtype)) for m, w in zip(masks, ws))


@functools.partial(jax.jit, static_argnames=("pattern", "config"))
def _sparsegpt(ws: tuple[jax.Array, ...], h: jax.Array, keep: jax.Array | None, *,
               pattern: tuple, config: SparseGPTConfig):
    """Prune one matrix, or a w1/w3 pair sharing h, in one program (see ``sparsegpt_prune``)."""
    choice = MaskChoice() if keep is not None else choice_of(pattern)
    f = _inverse_factor(h.astype(jnp.float32), config.damp)
    fallback = f["zero"] | jnp.logical_not(f["ok"])

    def obs(ws):
        live = [jnp.where(f["dead"][:, None], 0.0, w.astype(jnp.float32)) for w in ws]
        pair = choice.shares_choice and len(ws) == 2
        mats = [jnp.concatenate(live, axis=1)] if pair else live
        outs = []
        for w in mats:
            p, loss, cols = _obs_pass(w, f["u"], choice=choice, block_size=config.block_size,
                                      pair=pair, keep=keep)
            if choice.chooses_columns and config.column_sweeps:
                cols = _samoyeds_sweeps(w, f["u"], cols, choice=choice, pair=pair,
                                        sweeps=config.column_sweeps)
                p, loss, _ = _obs_pass(w, f["u"], choice=choice, block_size=0, pair=pair,
                                       cols=cols)
            if config.refit_iters:
                p, loss = _refit(w, f["h"], p, config.refit_iters)
            outs.append((p, loss))
        if pair:
            n = ws[0].shape[1]
            (p, loss), = outs
            outs = [(p[:, :n], loss[:n]), (p[:, n:], loss[n:])]
        return (tuple(p.astype(w.dtype) for (p, _), w in zip(outs, ws)),
                jnp.stack([jnp.sum(loss) for _, loss in outs]))

    def magnitude(ws):
        if keep is not None:
            ps = (jnp.where(keep, ws[0], jnp.zeros((), ws[0].dtype)),)
        else:
            ps = _magnitude(ws, pattern)
        return ps, jnp.zeros((len(ws),), jnp.float32)

    if not choice.prunes:
        ps, loss = tuple(ws), jnp.zeros((len(ws),), jnp.float32)
    else:
        ps, loss = jax.lax.cond(fallback, magnitude, obs, tuple(ws))
    info = dict(loss=loss, fallback=fallback, zero_hessian=f["zero"],
                dead_inputs=jnp.sum(f["dead"], dtype=jnp.int32))
    return ps, info


def sparsegpt_prune(w: jax.Array, h: jax.Array, pattern: tuple, *,
                    config: SparseGPTConfig = SparseGPTConfig()
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Prune one weight to ``pattern`` by SparseGPT (OBS with weight reconstruction).

    Args:
      w: [K, N] float32/bfloat16/float16, for ``y = x @ w``.
      h: [K, K] Hessian of w's inputs (``hessian(x)``, x [t, K]); any float dtype.
      pattern: what ``PruneConfig.pattern(K, N)`` returns: ("nm", n, m),
        ("samoyeds", n_sel, m_sel, v), ("unstructured", n_keep) or ("dense",) (w unchanged).
      config: block size and dampening.

    Returns:
      (pruned [K, N] in w's dtype satisfying the pattern exactly, info) with info a dict of
      scalars: "loss" float32, the OBS objective ``sum_n (w_n - p_n)^T H' (w_n - p_n)``
      (H' dampened; w with dead rows zeroed; 0 on fallback); "fallback" bool (pruned by
      magnitude: H all zero or not factorizable); "zero_hessian" bool; "dead_inputs" int32.
    """
    w = _check_matrix(w, "w")
    k, n_out = w.shape
    h = _check_h(h, k)
    pattern = _check_pattern(pattern, k, n_out, config)
    (p,), info = _sparsegpt((w,), h, None, pattern=pattern, config=config)
    return p, dict(info, loss=info["loss"][0])


def sparsegpt_prune_pair(w1: jax.Array, w3: jax.Array, h: jax.Array, pattern: tuple, *,
                         config: SparseGPTConfig = SparseGPTConfig()
                         ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Prune an expert's gate and up projections (w1, w3 [K, N]: same input x, same H) together.

    For a Samoyeds pattern both keep the same columns in every slab, chosen by the summed OBS
    savings of the two (their outputs multiply in SwiGLU, so a column kept in one but not the
    other is half wasted). Other patterns prune each matrix on its own, sharing the one
    factorization of H. Returns (pruned w1, pruned w3, info) with info as ``sparsegpt_prune``
    but "loss" float32 [2] (w1, w3).
    """
    w1 = _check_matrix(w1, "w1")
    w3 = _check_matrix(w3, "w3")
    if w1.shape != w3.shape:
        raise ValueError(f"w1 and w3 must have the same shape; given w1.shape={tuple(w1.shape)}, "
                         f"w3.shape={tuple(w3.shape)}")
    k, n_out = w1.shape
    h = _check_h(h, k)
    pattern = _check_pattern(pattern, k, n_out, config)
    (p1, p3), info = _sparsegpt((w1, w3), h, None, pattern=pattern, config=config)
    return p1, p3, info


def obs_reconstruct(w: jax.Array, h: jax.Array, keep: jax.Array, *,
                    config: SparseGPTConfig = SparseGPTConfig()
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Apply a given keep-mask with SparseGPT's weight reconstruction (no mask choice).

    The entries where ``keep`` [K, N] is False become exactly zero, and each one's error is
    compensated by the OBS update of the later rows of its column, then (``refit_iters`` > 0)
    the kept entries are refit to the least-squares optimum on the mask (e.g. a magnitude or
    Wanda mask made better at reproducing ``x @ w``). Returns (pruned [K, N] in w's dtype, info) as
    ``sparsegpt_prune``.
    """
    w = _check_matrix(w, "w")
    k, n_out = w.shape
    h = _check_h(h, k)
    keep = jnp.asarray(keep)
    if keep.shape != w.shape or keep.dtype != jnp.bool_:
        raise ValueError(f"keep must be a bool mask of w's shape {tuple(w.shape)}; given "
                         f"keep.shape={tuple(keep.shape)}, dtype={keep.dtype}")
    (p,), info = _sparsegpt((w,), h, keep, pattern=("mask",), config=config)
    return p, dict(info, loss=info["loss"][0])

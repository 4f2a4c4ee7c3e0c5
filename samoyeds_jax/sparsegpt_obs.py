"""SparseGPT's OBS pass (``samoyeds_jax.sparsegpt``): the inverse-Hessian factor, the pattern
kinds' mask choices (one ``MaskChoice`` per pattern kind, parsed from the pattern tuple by
``choice_of``) and the block-by-block pass with lazy updates."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.prune_masks import check_ints as _check_ints, top_n_along
from samoyeds_jax import prune_weights

_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Factorization.
# ----------------------------------------------------------------------------------------------


def _inverse_factor(h: jax.Array, damp: float) -> dict[str, jax.Array]:
    """U [K, K] upper triangular with (H')^-1 = U^T U, H' = H dampened, dead inputs set to 1
    (returned too, as "h").

    With P the reversal permutation, P H' P = L L^T (Cholesky) gives H' = V V^T with
    V = P L P upper, so (H')^-1 = V^-T V^-1 and U = V^-1 = P L^-1 P: one Cholesky and one
    triangular inverse, no explicit inverse of H.
    """
    k = h.shape[0]
    diag = jnp.diagonal(h)
    dead = diag == 0
    zero = jnp.all(h == 0)
    lam = damp * jnp.mean(diag)  # dead inputs count as 0: the same for any scale of H
    eye = jnp.eye(k, dtype=jnp.float32)
    live = jnp.logical_not(dead)
    h = jnp.where(live[:, None] & live[None, :], h, 0.0)  # a dead input's row is zero anyway
    h = h + eye * jnp.where(dead, 1.0, lam)[:, None]
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    u = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]
    ok = jnp.all(jnp.isfinite(u))
    return dict(u=jnp.where(ok, u, eye), dead=dead, zero=zero, ok=ok, h=h)


# ----------------------------------------------------------------------------------------------
# Mask choices: one per pattern kind.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskChoice:
    """How the OBS pass chooses the mask of one pattern kind; this base applies a given
    keep-mask (``obs_reconstruct``). Subclasses' fields are the pattern tuple's arguments."""

    prunes: ClassVar[bool] = True
    """False for "dense" (the weight is returned unchanged)."""
    shares_choice: ClassVar[bool] = False
    """A w1/w3 pair is pruned as one [K, 2N] matrix making one choice for both."""
    chooses_columns: ClassVar[bool] = False
    """The pass returns a column choice per slab, which ``column_sweeps`` can revise."""

    def check(self, k: int, n_out: int, block_size: int) -> None:
        """ValueError unless the pattern fits a [K, N] weight and the block size."""

    def block_rows(self, block_size: int, k: int) -> int:
        """Rows per block of the pass."""
        return min(block_size, k)

    def block_keep(self, k: int, bs: int, nb: int) -> jax.Array:
        """[nb] int32: the entries each block keeps (unstructured only)."""
        return jnp.zeros((nb,), jnp.int32)

    def block(self, wb: jax.Array, ub: jax.Array, *, r0: jax.Array, k: int, n_keep: jax.Array,
              keep: jax.Array | None, cols: jax.Array | None, pair: bool
              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """OBS over the block at row r0: (q, e, loss) as ``_block_pass``, and the kept columns
        [N] (zeros but for Samoyeds)."""
        bs = wb.shape[0]
        return _block_pass(wb, ub, period=1, n_keep_rows=1,
                           keep=jax.lax.dynamic_slice_in_dim(keep, r0, bs, 0)) + (_no_cols(wb),)


def _no_cols(wb: jax.Array) -> jax.Array:
    return jnp.zeros((wb.shape[1],), jnp.bool_)


@dataclasses.dataclass(frozen=True)
class DenseChoice(MaskChoice):
    """("dense",): nothing pruned."""

    prunes: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class NMChoice(MaskChoice):
    """("nm", n, m): every m rows, the n most salient of each column's m entries."""

    n: Any
    m: Any

    def check(self, k: int, n_out: int, block_size: int) -> None:
        prune_weights._check_nm(self.n, self.m, k)
        if block_size % self.m:
            raise ValueError(f"block_size={block_size} must be a multiple of m={self.m} "
                             "(N:M groups may not straddle blocks)")

    def block(self, wb, ub, *, r0, k, n_keep, keep, cols, pair):
        return _block_pass(wb, ub, period=self.m, n_keep_rows=self.n,
                           keep=None) + (_no_cols(wb),)


@dataclasses.dataclass(frozen=True)
class SamoyedsChoice(MaskChoice):
    """("samoyeds", n_sel, m_sel, v): per v-row slab, n_sel of every m_sel columns kept (2:4
    inside), chosen by OBS cost (``_samoyeds_slab``)."""

    n_sel: Any
    m_sel: Any
    v: Any
    shares_choice: ClassVar[bool] = True
    chooses_columns: ClassVar[bool] = True

    def check(self, k: int, n_out: int, block_size: int) -> None:
        prune_weights._check_samoyeds(self.n_sel, self.m_sel, self.v, k, n_out)

    def block_rows(self, block_size: int, k: int) -> int:
        return self.v

    def block(self, wb, ub, *, r0, k, n_keep, keep, cols, pair):
        return _samoyeds_slab(wb, ub, n_sel=self.n_sel, m_sel=self.m_sel, pair=pair, cols=cols)


@dataclasses.dataclass(frozen=True)
class UnstructuredChoice(MaskChoice):
    """("unstructured", n_keep): per block, the block's share of n_keep most salient entries."""

    n_keep: Any

    def check(self, k: int, n_out: int, block_size: int) -> None:
        _check_ints(n_keep=self.n_keep)
        if not 0 <= self.n_keep <= k * n_out:
            raise ValueError(f"n_keep={self.n_keep} must be in [0, K*N={k * n_out}]")

    def block_keep(self, k: int, bs: int, nb: int) -> jax.Array:
        # The block's share of n_keep, by real rows: cumulative rounding sums to n_keep exactly.
        rows = np.minimum(bs, k - bs * np.arange(nb))
        cum = (self.n_keep * np.cumsum(rows) + k // 2) // k
        return jnp.asarray(np.diff(cum, prepend=0), jnp.int32)

    def block(self, wb, ub, *, r0, k, n_keep, keep, cols, pair):
        bs = wb.shape[0]
        valid = r0 + jnp.arange(bs) < k
        return _block_pass(wb, ub, period=1, n_keep_rows=1,
                           keep=_unstructured_keep(wb, ub, valid, n_keep)) + (_no_cols(wb),)


CHOICES: dict[str, type[MaskChoice]] = {"dense": DenseChoice, "nm": NMChoice,
                                        "samoyeds": SamoyedsChoice,
                                        "unstructured": UnstructuredChoice}


def choice_of(pattern: tuple) -> MaskChoice | None:
    """The ``MaskChoice`` of a pattern tuple ``(kind, *args)``; None for an unknown kind or the
    wrong number of arguments."""
    kind, *args = pattern
    cls = CHOICES.get(kind) if isinstance(kind, str) else None
    if cls is None or len(args) != len(dataclasses.fields(cls)):
        return None
    return cls(*args)


# ----------------------------------------------------------------------------------------------
# The OBS pass: a block of rows, then all blocks.
# ----------------------------------------------------------------------------------------------


def _group_rows(bs: int, period: int) -> int:
    """Rows per unrolled step inside a block: a multiple of the mask period dividing bs.

    Larger steps mean fewer passes over the block (one rank-g update per step); 16 rows keep
    the unrolled code small."""
    for g in (16, 8, 4, 2, 1):
        if bs % g == 0 and g % period == 0:
            return g
    raise AssertionError(f"no step for block {bs} and period {period}")  # period divides bs


def _block_pass(wb: jax.Array, ub: jax.Array, *, period: int, n_keep_rows: int,
                keep: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OBS over the rows of one block, in order.

    Args:
      wb: [bs, N] float32, the block's rows, already updated by every earlier block.
      ub: [bs, bs] the block's diagonal block of U.
      period, n_keep_rows: with ``keep`` None, every ``period`` rows each column keeps its
        ``n_keep_rows`` most salient entries (N:M, the 2:4 inside Samoyeds).
      keep: [bs, N] bool, a fixed keep-mask for the block (unstructured, given masks).

    Returns:
      (q [bs, N] the block's final rows, pruned entries exactly 0; e [bs, N] the scaled errors
      ``(w - q) / U_ii`` that the later rows must absorb; loss [N] sum of e^2 per column).
    """
    bs, n = wb.shape
    g = _group_rows(bs, 1 if keep is not None else period)

    def step(i, carry):
        wb, qb, eb = carry
        r0 = i * g
        wg = jax.lax.dynamic_slice_in_dim(wb, r0, g, 0)  # [g, N] current rows
        ug = jax.lax.dynamic_slice(ub, (r0, r0), (g, g))  # [g, g]
        dg = jnp.diagonal(ug)
        if keep is not None:
            kg = jax.lax.dynamic_slice_in_dim(keep, r0, g, 0)  # [g, N]
        rows_q, rows_e = [], []
        for r in range(g):  # unrolled: g is small and static
            if keep is None and r % period == 0:  # choose the next period's mask from W now
                sal = jnp.square(wg[r:r + period] / dg[r:r + period, None])
                kg_p = top_n_along(sal, n_keep_rows, axis=0)  # [period, N]
            k_r = kg[r] if keep is not None else kg_p[r % period]
            q = jnp.where(k_r, wg[r], 0.0)
            e = (wg[r] - q) / dg[r]
            if r + 1 < g:
                wg = wg.at[r + 1:].add(-ug[r, r + 1:, None] * e[None, :])
            rows_q.append(q)
            rows_e.append(e)
        qg, eg = jnp.stack(rows_q), jnp.stack(rows_e)  # [g, N]
        urows = jax.lax.dynamic_slice_in_dim(ub, r0, g, 0)  # [g, bs]; zero left of r0
        wb = wb - jnp.einsum("gb,gn->bn", urows, eg, precision=_HI)
        qb = jax.lax.dynamic_update_slice_in_dim(qb, qg, r0, 0)
        eb = jax.lax.dynamic_update_slice_in_dim(eb, eg, r0, 0)
        return wb, qb, eb

    zeros = jnp.zeros((bs, n), jnp.float32)
    _, qb, eb = jax.lax.fori_loop(0, bs // g, step, (wb, zeros, zeros))
    return qb, eb, jnp.sum(eb * eb, axis=0)


def _samoyeds_slab(wb: jax.Array, ub: jax.Array, *, n_sel: int, m_sel: int,
                   pair: bool, cols: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One v-row slab of the Samoyeds pattern: column choice by OBS cost, 2:4 inside.

    ``pair``: wb is [v, 2N] = [w1 | w3] slab; both halves keep the same columns (summed
    savings). ``cols`` [N] (or [2N]) bool: a fixed column choice instead. Returns (q, e, loss)
    as ``_block_pass`` and the kept columns.
    """
    q24, e24, loss24 = _block_pass(wb, ub, period=4, n_keep_rows=2, keep=None)
    # Pruning all v entries of a column: errors e with U_SS^T e = w (forward substitution).
    e_all = jax.scipy.linalg.solve_triangular(ub, wb, trans=1, lower=False)
    loss_all = jnp.sum(e_all * e_all, axis=0)
    if cols is None:
        saving = loss_all - loss24  # [N] (or [2N])
        n_total = saving.shape[0]
        if pair:
            saving = saving[:n_total // 2] + saving[n_total // 2:]
        cols = top_n_along(saving.reshape(-1, m_sel), n_sel, axis=-1).reshape(-1)
        if pair:
            cols = jnp.concatenate([cols, cols])
    q = jnp.where(cols[None, :], q24, 0.0)
    e = jnp.where(cols[None, :], e24, e_all)
    return q, e, jnp.where(cols, loss24, loss_all), cols


def _unstructured_keep(wb: jax.Array, ub: jax.Array, valid: jax.Array,
                       n_keep: jax.Array) -> jax.Array:
    """[bs, N] mask of the block's n_keep most salient entries (ties: lower flat position)."""
    sal = jnp.square(wb / jnp.diagonal(ub)[:, None])
    sal = jnp.where(valid[:, None], sal, -jnp.inf).reshape(-1)  # padding rows never kept
    order = jnp.argsort(-sal, stable=True)
    rank = jnp.zeros(order.shape, jnp.int32).at[order].set(
        jnp.arange(order.shape[0], dtype=jnp.int32))
    return (rank < n_keep).reshape(wb.shape)


def _obs_pass(w: jax.Array, u: jax.Array, *, choice: MaskChoice, block_size: int,
              pair: bool = False, keep: jax.Array | None = None, cols: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The whole OBS pass over w [K, N] float32 (dead rows already zero) with factor u [K, K].

    ``choice``: the pattern's ``MaskChoice``; ``keep`` [K, N]: the fixed mask of a plain
    ``MaskChoice``. ``cols`` [K/v, N] bool: Samoyeds only, a fixed column choice per slab (the
    2:4 inside is still chosen). Returns (pruned [K, N] float32, loss [N] per column, the kept
    columns [K/v, N] of a Samoyeds pattern (zeros for other patterns)).
    """
    k, n = w.shape
    bs = choice.block_rows(block_size, k)
    kp = -(-k // bs) * bs
    if kp != k:  # pad to whole blocks: zero rows, decoupled in H (U gets identity rows)
        w = jnp.pad(w, ((0, kp - k), (0, 0)))
        u = jnp.pad(u, ((0, kp - k), (0, kp - k))) + jnp.diag(
            (jnp.arange(kp) >= k).astype(jnp.float32))
        if keep is not None:
            keep = jnp.pad(keep, ((0, kp - k), (0, 0)))
    nb = kp // bs
    block_keep = choice.block_keep(k, bs, nb)

    cols_xs = jnp.zeros((nb, n), jnp.bool_) if cols is None else cols

    def block(carry, xs):
        w, loss = carry
        b, n_keep_b, cols_b = xs
        r0 = b * bs
        wb = jax.lax.dynamic_slice_in_dim(w, r0, bs, 0)  # [bs, N]
        ub = jax.lax.dynamic_slice(u, (r0, r0), (bs, bs))  # [bs, bs]
        q, e, l, cols_out = choice.block(wb, ub, r0=r0, k=k, n_keep=n_keep_b, keep=keep,
                                         cols=None if cols is None else cols_b, pair=pair)
        # Lazy update of every later row (U is upper: earlier rows get exactly 0), then the
        # block's own rows are set to their final values.
        urows = jax.lax.dynamic_slice_in_dim(u, r0, bs, 0)  # [bs, kp]
        w = w - jnp.einsum("bk,bn->kn", urows, e, precision=_HI)
        w = jax.lax.dynamic_update_slice_in_dim(w, q, r0, 0)
        return (w, loss + l), cols_out

    (w, loss), cols_all = jax.lax.scan(
        block, (w, jnp.zeros((n,), jnp.float32)),
        (jnp.arange(nb, dtype=jnp.int32), block_keep, cols_xs))
    return w[:k], loss, cols_all


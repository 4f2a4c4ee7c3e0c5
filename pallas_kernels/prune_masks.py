"""Keep-masks of the pruning patterns, and the checks of their parameters (jnp only).

Scores are [..., K, N] (``y = x @ W``; higher is kept). A mask keeps, per matrix:

- N:M (``nm_keep``): the n highest scores of every group of m consecutive rows of K, per column;
- Samoyeds (``samoyeds_keep``): 2:4 along K, then per slab of v rows the n_sel best of every
  m_sel consecutive columns (by the sum of their kept scores); ``samoyeds_keep_shared`` makes
  one column choice for two matrices (an expert's w1 and w3);
- unstructured (``unstructured_keep``): the top ``n_keep`` scores.

Ties go to the lower index. ``samoyeds_jax.pruning`` builds the pruning API on these; the
format registry (``pallas_kernels.format_registry``) names the mask of each format.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.formats import NM_PATTERNS


def check_ints(**values: Any) -> None:
    for name, val in values.items():
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise ValueError(f"{name} must be an int; given {name}={val!r}")


def check_nm(n: int, m: int, k: int | None = None) -> None:
    check_ints(n=n, m=m)
    if (n, m) not in NM_PATTERNS:
        raise ValueError(f"(n, m)=({n}, {m}) is not a supported N:M pattern; expected one of "
                         f"{', '.join(f'{a}:{b}' for a, b in NM_PATTERNS)}")
    if k is not None and k % m:
        raise ValueError(f"K={k} (w.shape[-2]) must be a multiple of m={m}")


def check_samoyeds(n_sel: int, m_sel: int, v: int, k: int | None = None,
                    n_out: int | None = None) -> None:
    check_ints(n_sel=n_sel, m_sel=m_sel, v=v)
    if not 1 <= m_sel <= 127:  # the format stores each kept column's group offset as int8
        raise ValueError(f"m_sel={m_sel} must be in [1, 127]")
    if not 1 <= n_sel <= m_sel:
        raise ValueError(f"n_sel={n_sel} must be in [1, m_sel={m_sel}]")
    if v <= 0 or v % 4:
        raise ValueError(f"v={v} must be a positive multiple of 4 (2:4 groups inside a slab)")
    if k is not None and k % v:
        raise ValueError(f"K={k} (w.shape[-2]) must be a multiple of v={v}")
    if n_out is not None and n_out % m_sel:
        raise ValueError(f"N={n_out} (w.shape[-1]) must be a multiple of m_sel={m_sel}")


def check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not (isinstance(sparsity, (int, float, np.floating))
                                          and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1)")


def count_kept(sparsity: float, size: int) -> int:
    """Entries an unstructured mask keeps of ``size`` at ``sparsity``."""
    return size - int(round(sparsity * size))


def top_n_along(s: jax.Array, n: int, axis: int) -> jax.Array:
    """Keep-mask of the n highest entries of every line of ``s`` along ``axis``.

    rank(i) = #{j: s_j > s_i} + #{j < i: s_j == s_i} is a permutation of 0..m-1 per line, so
    exactly n entries are kept and ties go to the lower index. O(m) passes, no sort.
    """
    axis = axis % s.ndim
    m = s.shape[axis]
    idx_shape = [1] * s.ndim
    idx_shape[axis] = m
    idx = jnp.arange(m, dtype=jnp.int32).reshape(idx_shape)
    rank = jnp.zeros(s.shape, jnp.int32)
    for j in range(m):
        s_j = jax.lax.index_in_dim(s, j, axis, keepdims=True)
        rank += ((s_j > s) | ((s_j == s) & (j < idx))).astype(jnp.int32)
    return rank < n


@functools.partial(jax.jit, static_argnames=("n", "m"))
def nm_keep(score: jax.Array, *, n: int, m: int) -> jax.Array:
    *lead, k, n_out = score.shape
    groups = score.reshape(*lead, k // m, m, n_out)  # [..., K/m, m, N]
    return top_n_along(groups, n, axis=-2).reshape(score.shape)


def _samoyeds_inner(score: jax.Array, v: int) -> tuple[jax.Array, jax.Array]:
    """(2:4 mask along K [..., K, N], per-slab sum of the kept scores [..., K/V, N])."""
    *lead, k, n_out = score.shape
    inner = nm_keep(score, n=2, m=4)  # [..., K, N] 2:4 along K per column
    kept = jnp.where(inner, score, 0.0)
    return inner, kept.reshape(*lead, k // v, v, n_out).sum(axis=-2)


def _samoyeds_columns(slab: jax.Array, *, n_sel: int, m_sel: int, v: int) -> jax.Array:
    """Per slab, the n_sel best of every m_sel columns: slab [..., K/V, N] -> mask [..., K, N]."""
    *lead, slabs, n_out = slab.shape
    groups = slab.reshape(*lead, slabs, n_out // m_sel, m_sel)  # [..., K/V, N/m_sel, m_sel]
    cols = top_n_along(groups, n_sel, axis=-1).reshape(*lead, slabs, 1, n_out)
    return jnp.broadcast_to(cols, (*lead, slabs, v, n_out)).reshape(*lead, slabs * v, n_out)


@functools.partial(jax.jit, static_argnames=("n_sel", "m_sel", "v"))
def samoyeds_keep(score: jax.Array, *, n_sel: int, m_sel: int, v: int) -> jax.Array:
    inner, slab = _samoyeds_inner(score, v)
    return inner & _samoyeds_columns(slab, n_sel=n_sel, m_sel=m_sel, v=v)


@functools.partial(jax.jit, static_argnames=("n_sel", "m_sel", "v"))
def samoyeds_keep_shared(score1: jax.Array, score3: jax.Array, *, n_sel: int, m_sel: int,
                          v: int) -> tuple[jax.Array, jax.Array]:
    inner1, slab1 = _samoyeds_inner(score1, v)
    inner3, slab3 = _samoyeds_inner(score3, v)
    cols = _samoyeds_columns(slab1 + slab3, n_sel=n_sel, m_sel=m_sel, v=v)
    return inner1 & cols, inner3 & cols


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (a < b iff key(a) < key(b)); -0.0 counts as 0.0."""
    x = jnp.where(x == 0, jnp.zeros((), x.dtype), x)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where(bits & sign, ~bits, bits | sign)


def _select_digit(digits: jax.Array, need: jax.Array, bins: int) -> tuple[jax.Array, jax.Array]:
    """Per row, the largest digit d with #{digits >= d} >= need, and #{digits > d}.

    digits: [B, S] int32 in [0, bins] (bins itself: excluded entries); need: [B, 1] int32 >= 1.
    """
    b = digits.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None] * (bins + 1)
    hist = jnp.bincount((digits + rows).reshape(-1), length=b * (bins + 1))
    hist = hist.reshape(b, bins + 1)[:, :bins].astype(jnp.int32)  # [B, bins]
    at_least = jnp.cumsum(hist[:, ::-1], axis=-1)[:, ::-1]  # [B, bins]: #{digits >= d}
    digit = jnp.sum(at_least >= need, axis=-1, dtype=jnp.int32, keepdims=True) - 1  # [B, 1]
    above = jnp.take_along_axis(at_least, jnp.minimum(digit + 1, bins - 1), axis=-1)
    above = jnp.where(digit + 1 >= bins, 0, above)
    return digit, above


# Matrices above this many entries find their threshold by radix select instead of a sort
# (a full sort of a 4096 x 14336 matrix takes over a minute on CPU; the select, a few seconds).
_RADIX_SELECT_MIN_SIZE = 1 << 20


@functools.partial(jax.jit, static_argnames=("n_keep", "select"))
def unstructured_keep(score: jax.Array, *, n_keep: int,
                       select: Literal["sort", "radix"] = "sort") -> jax.Array:
    *lead, k, n_out = score.shape
    if n_keep == 0:
        return jnp.zeros(score.shape, jnp.bool_)
    key = _order_key(score.astype(jnp.float32).reshape(-1, k * n_out))  # [B, S] uint32
    need = jnp.full((key.shape[0], 1), n_keep, jnp.int32)
    if select == "sort":
        thr = jnp.sort(key, axis=-1)[:, key.shape[-1] - n_keep, None]  # [B, 1]
    else:  # the n_keep-th largest key, in two 16-bit digits (two histogram passes)
        hi = (key >> 16).astype(jnp.int32)
        hi_thr, above_hi = _select_digit(hi, need, 1 << 16)
        lo = jnp.where(hi == hi_thr, (key & 0xFFFF).astype(jnp.int32), 1 << 16)
        lo_thr, _ = _select_digit(lo, need - above_hi, 1 << 16)
        thr = (hi_thr.astype(jnp.uint32) << 16) | lo_thr.astype(jnp.uint32)  # [B, 1]
    # Everything above the threshold is kept; of the entries equal to it, the first ones in
    # row-major order until n_keep.
    greater = key > thr
    equal = key == thr
    need_eq = need - jnp.sum(greater, axis=-1, dtype=jnp.int32, keepdims=True)  # [B, 1]
    first_equal = equal & (jnp.cumsum(equal, axis=-1, dtype=jnp.int32) <= need_eq)
    return (greater | first_equal).reshape(score.shape)


def select_for(size: int) -> Literal["sort", "radix"]:
    return "radix" if size >= _RADIX_SELECT_MIN_SIZE else "sort"

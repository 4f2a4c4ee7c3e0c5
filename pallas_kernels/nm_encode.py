"""Encoding of already-pruned weights into ``formats``' layouts, as one jitted program on the
weights' device (``formats.NMSparse.from_dense`` / ``SamoyedsSparse.from_dense``).

Weights arrive as a stack [B, K, N] (leading dims flattened). Each program returns the format's
arrays and ``Findings``: the first non-finite entry and the first group that breaks the pattern,
each with its count. ``formats`` turns them into ``ValueError`` messages, after one small copy
to the host. Zero tests compare with 0, so -0.0 counts as zero.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.formats import pack_meta


class Finding(NamedTuple):
    """How many flagged entries the first flagged matrix has (0: none anywhere), that matrix's
    flat index in the stack, and the first flagged entry's flat index in it."""

    count: jax.Array
    matrix: jax.Array
    index: jax.Array


def first_flagged(flags: jax.Array) -> Finding:
    """``Finding`` of a bool stack [B, ...] (row-major order: the first a loop would meet)."""
    per_matrix = flags.reshape(flags.shape[0], -1)
    matrix = jnp.argmax(per_matrix.any(axis=1))
    row = per_matrix[matrix]
    return Finding(row.sum(dtype=jnp.int32), matrix.astype(jnp.int32),
                   jnp.argmax(row).astype(jnp.int32))


def ascending_choice(nonzero: jax.Array, n: int, axis: int) -> jax.Array:
    """Positions of n entries per group along ``axis``, ascending: every nonzero, then the lowest
    unused (zero) positions. Groups with more than n nonzeros give unspecified positions (the
    caller reports them). Returns int32, ``axis`` of size n."""
    zero = ~nonzero
    need = n - nonzero.sum(axis=axis, keepdims=True, dtype=jnp.int32)
    zeros_before = jnp.cumsum(zero, axis=axis, dtype=jnp.int32) - zero
    take = nonzero | (zeros_before < need)
    slot = jnp.cumsum(take, axis=axis, dtype=jnp.int32) - take
    where = jax.lax.broadcasted_iota(jnp.int32, nonzero.shape, axis % nonzero.ndim)
    return jnp.concatenate(
        [jnp.max(jnp.where(take & (slot == s), where, 0), axis=axis, keepdims=True)
         for s in range(n)], axis=axis)


class NMEncoded(NamedTuple):
    values: jax.Array  # [B, K*n/m, N]
    meta: jax.Array  # [B, K*n/m/per_word, N] int32
    non_finite: Finding
    over: Finding  # groups with more than n nonzeros (index into the [K/m, N] group grid)
    over_found: jax.Array  # nonzeros of the first such group


def _nm(w: jax.Array, n: int, m: int) -> NMEncoded:
    b, k, cols = w.shape
    groups = w.reshape(b, k // m, m, cols)
    nonzero = groups != 0
    pos = ascending_choice(nonzero, n, axis=2)  # [B, K/m, n, N]
    values = jnp.take_along_axis(groups, pos, axis=2).reshape(b, k * n // m, cols)
    meta = pack_meta(pos.reshape(b, k * n // m, cols), n, m)
    count = nonzero.sum(axis=2, dtype=jnp.int32)  # [B, K/m, N]
    over = first_flagged(count > n)
    found = count.reshape(b, -1)[over.matrix, over.index]
    return NMEncoded(values, meta, first_flagged(~jnp.isfinite(w)), over, found)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def encode_nm(w: jax.Array, *, n: int, m: int) -> NMEncoded:
    """N:M along K of a pruned stack w [B, K, N] (K a multiple of the pattern's word rows)."""
    return _nm(w, n, m)


class SamoyedsEncoded(NamedTuple):
    values: jax.Array  # [B, K/2, Nc]
    meta: jax.Array  # [B, K/32, Nc] int32
    sel: jax.Array  # [B, K/v, Nc] int8
    non_finite: Finding
    over: Finding  # column groups of a slab with more than n_sel nonzero columns ([K/v, N/m_sel])
    over_columns: jax.Array  # [m_sel] bool: the nonzero columns of the first such group
    not_24: Finding  # 2:4 groups of the kept columns with more than 2 nonzeros ([K/4, Nc])
    not_24_found: jax.Array


@functools.partial(jax.jit, static_argnames=("n_sel", "m_sel", "v"))
def encode_samoyeds(w: jax.Array, *, n_sel: int, m_sel: int, v: int) -> SamoyedsEncoded:
    """Samoyeds n_sel:m_sel:v column choice + 2:4 along K of a pruned stack w [B, K, N]."""
    b, k, n_out = w.shape
    slabs, groups = k // v, n_out // m_sel
    nc = groups * n_sel
    w5 = w.reshape(b, slabs, v, groups, m_sel)
    col_nz = (w5 != 0).any(axis=2)  # [B, slabs, groups, m_sel]
    chosen = ascending_choice(col_nz, n_sel, axis=3)  # [B, slabs, groups, n_sel]
    wc = jnp.take_along_axis(
        w5, jnp.broadcast_to(chosen[:, :, None], (b, slabs, v, groups, n_sel)), axis=4)
    nm = _nm(wc.reshape(b, k, nc), 2, 4)
    over = first_flagged(col_nz.sum(axis=3, dtype=jnp.int32) > n_sel)
    columns = col_nz.reshape(b, -1, m_sel)[over.matrix, over.index]
    return SamoyedsEncoded(nm.values, nm.meta, chosen.reshape(b, slabs, nc).astype(jnp.int8),
                           first_flagged(~jnp.isfinite(w)), over, columns, nm.over, nm.over_found)

"""Encoding of already-pruned weights into ``formats``' layouts, as one jitted program on the
weights' device (``formats.NMSparse.from_dense`` / ``SamoyedsSparse.from_dense``).

Weights arrive as a stack [B, K, N] (leading dims flattened). Each matrix is encoded by one
jitted program (temporaries the size of one matrix), on K and N zero-padded to a bucket size
(``bucket``), so that one compiled program serves many shapes. Zero padding changes nothing:
zero rows and columns fit every pattern, and they lie after the real ones in every output, which
are sliced back to the real sizes.

Each encoder returns the format's arrays and ``Finding``s (host integers, after one small copy
for the whole stack): the first non-finite entry and the first group that breaks the pattern,
each with its count, indexed in the unpadded shapes. ``formats`` turns them into ``ValueError``
messages. Zero tests compare with 0, so -0.0 counts as zero.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.formats import nm_k_multiple, pack_meta, values_per_word

# Dims are padded to a multiple of lcm(unit, _BUCKET): one program for every small (test)
# shape, little padding for real ones (768, 1408 -> 1536, 2048, 4096, 14336).
_BUCKET = 256


def bucket(size: int, unit: int = 1) -> int:
    """The padded size of a dim of ``size`` (a multiple of ``unit``): the next multiple of
    lcm(unit, 256)."""
    step = math.lcm(unit, _BUCKET)
    return -(-size // step) * step


# Per float dtype: its bits' unsigned type, the magnitude bits (all but the sign: -0.0 is zero)
# and the exponent bits (all set: Inf or NaN). On bit views, float16 and bfloat16 share programs.
_BITS = {"float32": (jnp.uint32, 0x7FFFFFFF, 0x7F800000),
         "bfloat16": (jnp.uint16, 0x7FFF, 0x7F80),
         "float16": (jnp.uint16, 0x7FFF, 0x7C00)}


def _bit_view(w: jax.Array, k_unit: int, n_unit: int) -> tuple[jax.Array, jax.Array]:
    """The stack [B, K, N] as unsigned bits with K and N zero-padded to their buckets, and its
    dtype's (magnitude, exponent) masks."""
    uint, magnitude, exponent = _BITS[jnp.dtype(w.dtype).name]
    _, k, n = w.shape
    pad_k, pad_n = bucket(k, k_unit) - k, bucket(n, n_unit) - n
    bits = jax.lax.bitcast_convert_type(w, uint)
    if pad_k or pad_n:
        bits = jnp.pad(bits, [(0, 0), (0, pad_k), (0, pad_n)])
    return bits, jnp.array([magnitude, exponent], uint)


def _matrices(stack: jax.Array) -> list[jax.Array]:
    """The matrices of a stack; of an empty one, one zero matrix (its outputs are sliced off)."""
    if not stack.shape[0]:
        return [jnp.zeros(stack.shape[1:], stack.dtype)]
    return [stack[i] for i in range(stack.shape[0])]


class Finding(NamedTuple):
    """How many flagged entries the first flagged matrix has (0: none anywhere), that matrix's
    flat index in the stack, and the first flagged entry's flat index in it."""

    count: int
    matrix: int
    index: int


def _flagged(flags: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Count and first flat index (row-major) of one matrix's bool flags."""
    flat = flags.reshape(-1)
    return flat.sum(dtype=jnp.int32), jnp.argmax(flat).astype(jnp.int32)


def _first(flagged: list[tuple[Any, Any]], padded_cols: int, cols: int) -> Finding:
    """The ``Finding`` of per-matrix (count, first index into a grid of ``padded_cols``
    columns), the index re-expressed in the grid of ``cols`` real columns."""
    for matrix, (count, index) in enumerate(flagged):
        if count:
            row, col = divmod(int(index), padded_cols)
            return Finding(int(count), matrix, row * cols + col)
    return Finding(0, 0, 0)


def ascending_choice(nonzero: jax.Array, n: int, axis: int) -> jax.Array:
    """Positions of n entries per group along ``axis``, ascending: every nonzero, then the lowest
    unused (zero) positions. Groups with more than n nonzeros give unspecified positions (the
    caller reports them). Returns int32, ``axis`` of size n."""
    nonzero = jnp.moveaxis(nonzero, axis, -1)
    iota = jax.lax.broadcasted_iota(jnp.int32, nonzero.shape, nonzero.ndim - 1)
    take = nonzero
    for _ in range(n):  # add the lowest unused position while fewer than n are taken
        short = take.sum(axis=-1, keepdims=True, dtype=jnp.int32) < n
        take = take | (short & (iota == jnp.argmax(~take, axis=-1, keepdims=True)))
    slots = []
    for _ in range(n):  # the taken positions, lowest first
        slots.append(jnp.argmax(take, axis=-1, keepdims=True).astype(jnp.int32))
        take = take & (iota != slots[-1])
    return jnp.moveaxis(jnp.concatenate(slots, axis=-1), -1, axis)


@functools.cache
def _position_table(n: int, m: int) -> np.ndarray:
    """[2**m, n] int32: the positions ``ascending_choice`` keeps for every nonzero pattern of an
    m-group, indexed by the pattern's bits (bit j: position j nonzero)."""
    table = np.zeros((2 ** m, n), np.int32)
    for code in range(2 ** m):
        nonzero = [j for j in range(m) if code >> j & 1]
        zeros = [j for j in range(m) if not code >> j & 1]
        kept = sorted(nonzero + zeros[:max(n - len(nonzero), 0)])[:n]
        table[code, :len(kept)] = kept
    return table


def _nm_matrix(bits: jax.Array, masks: jax.Array, n: int, m: int):
    """One matrix's bit view [K, N] (``masks``: the magnitude and exponent bits of its float
    dtype): values (bits), meta, (count, index) of its non-finite entries and of its groups with
    more than n nonzeros (in the [K/m, N] group grid), and the first such group's count."""
    k, cols = bits.shape
    groups = bits.reshape(k // m, m, cols)
    nonzero = (groups & masks[0]) != 0
    code = jnp.sum(nonzero.astype(jnp.int32) << jnp.arange(m, dtype=jnp.int32)[None, :, None],
                   axis=1)
    pos = jnp.moveaxis(jnp.asarray(_position_table(n, m))[code], -1, 1)  # [K/m, n, N]
    values = jnp.take_along_axis(groups, pos, axis=1).reshape(k * n // m, cols)
    meta = pack_meta(pos.reshape(k * n // m, cols), n, m)
    count = nonzero.sum(axis=1, dtype=jnp.int32)  # [K/m, N]
    over = _flagged(count > n)
    return (values, meta, _flagged((bits & masks[1]) == masks[1]), over,
            count.reshape(-1)[over[1]])


class NMEncoded(NamedTuple):
    values: jax.Array  # [B, K*n/m, N]
    meta: jax.Array  # [B, K*n/m/per_word, N] int32
    non_finite: Finding  # in the [K, N] grid
    over: Finding  # groups with more than n nonzeros, in the [K/m, N] group grid
    over_found: int  # nonzeros of the first such group


_nm_program = jax.jit(_nm_matrix, static_argnames=("n", "m"))


def encode_nm(w: jax.Array, *, n: int, m: int) -> NMEncoded:
    """N:M along K of a pruned stack w [B, K, N] (K a multiple of the pattern's word rows)."""
    b, k, cols = w.shape
    padded, masks = _bit_view(w, nm_k_multiple(n, m), 1)
    out = [_nm_program(x, masks, n=n, m=m) for x in _matrices(padded)]
    values, meta = (jnp.stack([o[j] for o in out]) for j in (0, 1))
    bad, over, found = jax.device_get([[o[j] for o in out] for j in (2, 3, 4)])
    over = _first(over, padded.shape[2], cols)
    kept = k * n // m
    values = jax.lax.bitcast_convert_type(values[:b, :kept, :cols], w.dtype)
    return NMEncoded(values, meta[:b, :kept // values_per_word(m), :cols],
                     _first(bad, padded.shape[2], cols), over, int(found[over.matrix]))


def _samoyeds_matrix(w: jax.Array, masks: jax.Array, n_sel: int, m_sel: int, v: int):
    """One matrix's bit view [K, N] (``masks`` as for ``_nm_matrix``): values (bits), meta, sel,
    and (count, index) of its non-finite entries, of its column groups with more than n_sel
    nonzero columns ([K/v, N/m_sel] grid, with the first one's nonzero columns) and of its kept
    columns' 2:4 groups with more than 2 nonzeros ([K/4, Nc] grid, with the first one's
    count)."""
    k, n_out = w.shape
    slabs, groups = k // v, n_out // m_sel
    nc = groups * n_sel
    w4 = w.reshape(slabs, v, groups, m_sel)
    col_nz = ((w4 & masks[0]) != 0).any(axis=1)  # [slabs, groups, m_sel]
    chosen = ascending_choice(col_nz, n_sel, axis=2)  # [slabs, groups, n_sel]
    wc = jnp.take_along_axis(
        w4, jnp.broadcast_to(chosen[:, None], (slabs, v, groups, n_sel)), axis=3)
    values, meta, _, not_24, found = _nm_matrix(wc.reshape(k, nc), masks, 2, 4)
    over = _flagged(col_nz.sum(axis=2, dtype=jnp.int32) > n_sel)
    columns = col_nz.reshape(-1, m_sel)[over[1]]
    return (values, meta, chosen.reshape(slabs, nc).astype(jnp.int8),
            _flagged((w & masks[1]) == masks[1]), over, columns, not_24, found)


class SamoyedsEncoded(NamedTuple):
    values: jax.Array  # [B, K/2, Nc]
    meta: jax.Array  # [B, K/32, Nc] int32
    sel: jax.Array  # [B, K/v, Nc] int8
    non_finite: Finding  # in the [K, N] grid
    over: Finding  # column groups of a slab with more than n_sel nonzero columns ([K/v, N/m_sel])
    over_columns: np.ndarray  # [m_sel] bool: the nonzero columns of the first such group
    not_24: Finding  # 2:4 groups of the kept columns with more than 2 nonzeros ([K/4, Nc])
    not_24_found: int


_samoyeds_program = jax.jit(_samoyeds_matrix, static_argnames=("n_sel", "m_sel", "v"))


def encode_samoyeds(w: jax.Array, *, n_sel: int, m_sel: int, v: int) -> SamoyedsEncoded:
    """Samoyeds n_sel:m_sel:v column choice + 2:4 along K of a pruned stack w [B, K, N]."""
    b, k, n_out = w.shape
    padded, masks = _bit_view(w, v, m_sel)
    out = [_samoyeds_program(x, masks, n_sel=n_sel, m_sel=m_sel, v=v)
           for x in _matrices(padded)]
    values, meta, sel = (jnp.stack([o[j] for o in out]) for j in (0, 1, 2))
    bad, over, columns, not_24, found = jax.device_get(
        [[o[j] for o in out] for j in (3, 4, 5, 6, 7)])
    groups, padded_groups = n_out // m_sel, padded.shape[2] // m_sel
    over = _first(over, padded_groups, groups)
    not_24 = _first(not_24, padded_groups * n_sel, groups * n_sel)
    nc = groups * n_sel
    values = jax.lax.bitcast_convert_type(values[:b, :k // 2, :nc], w.dtype)
    return SamoyedsEncoded(values, meta[:b, :k // 32, :nc], sel[:b, :k // v, :nc],
                           _first(bad, padded.shape[2], n_out), over, columns[over.matrix],
                           not_24, int(found[not_24.matrix]))

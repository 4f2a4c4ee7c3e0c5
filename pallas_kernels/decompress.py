"""On-chip expansion of N:M compressed weight tiles inside Pallas Triton kernel bodies.

Load-as-Sparse, Compute-as-Dense: a kernel loads a compressed tile (``values`` rows and
their ``meta`` words, layout of ``formats.NMSparse``), expands it in registers and feeds
dense tensor-core dots. The expansion avoids every op that Pallas Triton cannot lower
(value slicing, gathers, interleaving): for N:M along K,

    x[:, k0:k0+bk] @ W[k0:k0+bk, :] == sum_j x[:, k0+j : k0+bk : m] @ W_j

where ``W_j`` [bk/m, bn] holds, for every group g of m dense rows, the kept value whose
position in the group is j (or 0). ``W_j`` is a ``jnp.where`` over the n value slots of
the group, which are plain strided row loads of ``values``; the meta word of each group
is fetched with an index-vector load (one word holds ``per_word`` positions). The x
operand of dot j is a strided column load ``x[:, k0+j::m]``.

A kernel body (rows may be gathered token ids, e.g. from a routing plan)::

    rows = token_ids_tile[:, None]                      # [bt, 1] int32
    cols = c0 + iota(block_n, 1)                        # [1, bn]
    def step(i, acc):
        k0 = i * block_k
        xs = load_x_positions(x_ref, rows, k_start=k0, block_k=block_k, m=4)
        ws = load_nm_position_weights(values_ref, meta_ref, cols, k_start=k0,
                                      block_k=block_k, n=2, m=4, split=True)
        return nm_tile_dot(xs, ws, acc)                 # [bt, bn] float32

or, with one dot per step, ``load_x_tile`` + ``load_nm_dense_tile``. Samoyeds adds
``load_sel_row`` + ``route_partial`` per V slab.

All helpers take refs and static sizes and return arrays; they run in interpret mode
on CPU too. Power-of-two block sizes only (a Triton rule); a dot needs every dim >= 16
on the GPU, so ``block_k // m >= 16`` there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plt

# (n, m) pairs of the NMSparse format, and its meta bit width per kept value.
SUPPORTED_NM: tuple[tuple[int, int], ...] = ((2, 4), (1, 4), (2, 8), (4, 8))


def meta_bits(m: int) -> int:
    """Bits per kept value in a meta word: 2 for m=4, 4 for m=8."""
    if m == 4:
        return 2
    if m == 8:
        return 4
    raise ValueError(f"m must be 4 or 8, got {m=}")


def meta_per_word(m: int) -> int:
    """Kept values per int32 meta word."""
    return 32 // meta_bits(m)


def check_block_k(block_k: int, *, n: int, m: int) -> None:
    """Raise ValueError unless a K tile of ``block_k`` dense rows starts on a meta word."""
    per_word = meta_per_word(m)
    if block_k <= 0 or block_k & (block_k - 1):
        raise ValueError(f"{block_k=} must be a power of two")
    if block_k % m or (block_k * n // m) % per_word:
        raise ValueError(
            f"{block_k=} must hold whole meta words: block_k * n / m = {block_k * n // m} "
            f"must be a multiple of {per_word} for {n}:{m}")


def iota(n: int, axis: int) -> jax.Array:
    """int32 index vector shaped [n, 1] (axis 0) or [1, n] (axis 1)."""
    shape = (n, 1) if axis == 0 else (1, n)
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _load(ref, rows, cols, mask):
    # Index arrays on both dims (no strided slices): the one form that both the Triton
    # lowering and interpret mode accept for strided and gathered tiles alike.
    if mask is None:
        return ref[rows, cols]
    return plt.load(ref.at[rows, cols], mask=mask, other=0)


def load_x_tile(x_ref, rows: jax.Array, *, k_start: jax.Array | int, block_k: int,
                mask: jax.Array | None = None) -> jax.Array:
    """The contiguous x tile [bt, block_k] at rows ``rows`` [bt, 1] (for ``load_nm_dense_tile``)."""
    return _load(x_ref, rows, k_start + iota(block_k, 1), mask)


def load_x_positions(
    x_ref,
    rows: jax.Array,
    *,
    k_start: jax.Array | int,
    block_k: int,
    m: int,
    mask: jax.Array | None = None,
    split: bool = False,
    transpose: bool = False,
) -> list[jax.Array]:
    """The m strided column tiles of x (or of x^T) for one K tile.

    Args:
      x_ref: activations ref [T, K].
      rows: int32 row indices [bt, 1] (a contiguous range or gathered token ids).
      k_start: first dense K index of the tile (a multiple of ``block_k``).
      block_k: dense rows per K tile.
      m: group size of the N:M pattern.
      mask: optional bool mask broadcastable to [bt, block_k // m] (rows/columns in
        bounds); masked elements read as 0.
      split: load one contiguous [bt, block_k] tile and split it in registers (reshape
        + ``jnp.split``) instead of m strided loads; then ``mask`` must be [bt, 1] or None.
        Ignored with ``transpose``.
      transpose: return x^T tiles [block_k // m, bt]; then ``rows`` is [1, bt] and
        ``mask`` broadcastable to [block_k // m, bt].

    Returns:
      m arrays [bt, block_k // m] (or [block_k // m, bt] with ``transpose``); entry j holds
      x[rows, k_start + j :: m].
    """
    g = block_k // m
    if transpose:
        base = k_start + m * iota(g, 0)  # [g, 1]
        return [_load(x_ref, rows, base + j, mask) for j in range(m)]
    if split:
        tile = _load(x_ref, rows, k_start + iota(block_k, 1), mask)  # [bt, bk]
        parts = jnp.split(tile.reshape(tile.shape[0], g, m), m, axis=2)
        return [part.reshape(tile.shape[0], g) for part in parts]
    base = k_start + m * iota(g, 1)  # [1, g]
    return [_load(x_ref, rows, base + j, mask) for j in range(m)]


def _load_slots_positions(
    values_ref,
    meta_ref,
    cols: jax.Array,
    *,
    k_start: jax.Array | int,
    block_k: int,
    n: int,
    m: int,
    group_mask: jax.Array | None = None,
    col_mask: jax.Array | None = None,
    split: bool = False,
    transpose: bool = False,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """The n value slots of a tile and their positions (int32 in 0..m-1), each [g, bn]
    ([bn, g] with ``transpose``). Arguments as in ``load_nm_position_weights``."""
    bits = meta_bits(m)
    per_word = 32 // bits
    g = block_k // m
    mask = None
    if group_mask is not None and col_mask is not None:
        mask = group_mask & col_mask
    elif group_mask is not None:
        mask = group_mask
    elif col_mask is not None:
        mask = col_mask
    row_start = k_start * n // m  # first compressed row; a multiple of per_word
    gaxis = 1 if transpose else 0
    group = iota(g, gaxis)  # [g, 1] ([1, g] transposed)
    # Slot s of group g is compressed row row_start + g*n + s: a stride-n row load.
    slots = [_load(values_ref, row_start + n * group + s, cols, mask)
             for s in range(n)]  # n x [g, bn]
    # All n slots of a group share one meta word (per_word is a multiple of n): the
    # word of each group is gathered (each word serves per_word / n groups).
    if split:
        n_words = g * n // per_word
        words = _load(meta_ref, row_start // per_word + iota(n_words, gaxis), cols, col_mask)
        if transpose:  # [bn, n_words] -> [bn, g]
            bn = words.shape[0]
            words = jnp.broadcast_to(words.reshape(bn, n_words, 1), (bn, n_words, per_word // n))
            words = words.reshape(bn, g)
        else:  # [n_words, bn] -> [g, bn]
            bn = words.shape[-1]
            words = jnp.broadcast_to(words.reshape(n_words, 1, bn), (n_words, per_word // n, bn))
            words = words.reshape(g, bn)
    else:
        word_idx = row_start // per_word + (group * n) // per_word  # [g, 1] / [1, g]
        words = _load(meta_ref, word_idx, cols, mask)  # [g, bn] / [bn, g] int32
    base_shift = ((group * n) % per_word) * bits  # [g, 1] / [1, g]
    field = (1 << bits) - 1
    # Arithmetic shift then mask: bit 31 of a word may be set, the field stays exact.
    positions = [(words >> (base_shift + s * bits)) & field for s in range(n)]  # n x [g, bn]
    return slots, positions


def load_nm_position_weights(
    values_ref,
    meta_ref,
    cols: jax.Array,
    *,
    k_start: jax.Array | int,
    block_k: int,
    n: int,
    m: int,
    group_mask: jax.Array | None = None,
    col_mask: jax.Array | None = None,
    split: bool = False,
    transpose: bool = False,
) -> list[jax.Array]:
    """Expand one compressed K tile of an N:M weight into its m position tiles.

    Args:
      values_ref: compressed values ref [K*n/m, N'] (``NMSparse.values`` of one matrix).
      meta_ref: meta ref [K*n/m / per_word, N'] int32.
      cols: int32 column indices [1, bn] of the tile (contiguous or strided).
      k_start: first dense K row of the tile; a multiple of ``block_k``.
      block_k: dense rows per tile; see ``check_block_k``.
      n, m: the N:M pattern.
      group_mask: optional bool [block_k // m, 1]: groups inside K (a ragged last tile).
      col_mask: optional bool [1, bn]: columns inside N'.
      split: load the tile's meta words once ([words, bn]) and repeat each word to its
        groups in registers (broadcast + reshape) instead of a gathering load per group;
        then ``group_mask`` must be None.
      transpose: return W_j^T tiles [bn, block_k // m] (weights as the left dot operand,
        ``sum_j W_j^T @ x_j^T``); then ``cols`` is [bn, 1], ``group_mask`` [1, g] and
        ``col_mask`` [bn, 1].

    Returns:
      m arrays [block_k // m, bn] (or [bn, block_k // m]) in the values dtype: entry j is
      W_j with ``x[:, k_start:k_start+block_k] @ W_tile == sum_j x_j @ W_j``.
    """
    slots, positions = _load_slots_positions(
        values_ref, meta_ref, cols, k_start=k_start, block_k=block_k, n=n, m=m,
        group_mask=group_mask, col_mask=col_mask, split=split, transpose=transpose)
    zero = jnp.zeros_like(slots[0])
    tiles = []
    for j in range(m):
        w_j = zero
        # Positions are strictly ascending, so slot s lies in s .. m-n+s: position j can
        # only come from slots j-(m-n) .. j (2:4: 6 selects instead of 8).
        for s in range(max(0, j - (m - n)), min(n - 1, j) + 1):
            w_j = jnp.where(positions[s] == j, slots[s], w_j)
        tiles.append(w_j)
    return tiles


def load_nm_dense_tile(
    values_ref,
    meta_ref,
    cols: jax.Array,
    *,
    k_start: jax.Array | int,
    block_k: int,
    n: int,
    m: int,
    group_mask: jax.Array | None = None,
    col_mask: jax.Array | None = None,
    split: bool = False,
) -> jax.Array:
    """Expand one compressed K tile into the dense [block_k, bn] tile (one dot against a
    contiguous x tile): selects over a [g, m, bn] view, then a reshape. Arguments as in
    ``load_nm_position_weights`` (no transpose)."""
    slots, positions = _load_slots_positions(
        values_ref, meta_ref, cols, k_start=k_start, block_k=block_k, n=n, m=m,
        group_mask=group_mask, col_mask=col_mask, split=split, transpose=False)
    g, bn = slots[0].shape
    j = jax.lax.broadcasted_iota(jnp.int32, (g, m, bn), 1)
    w = jnp.zeros((g, m, bn), slots[0].dtype)
    for v, pos in zip(slots, positions):
        w = jnp.where(pos.reshape(g, 1, bn) == j, jnp.broadcast_to(v.reshape(g, 1, bn), (g, m, bn)), w)
    return w.reshape(block_k, bn)


def nm_tile_dot(
    lhs_tiles: list[jax.Array], rhs_tiles: list[jax.Array], acc: jax.Array | None = None
) -> jax.Array:
    """``sum_j lhs_tiles[j] @ rhs_tiles[j]`` with f32 accumulation (x_j @ W_j -> [bt, bn],
    or W_j^T @ x_j^T -> [bn, bt])."""
    for a, b in zip(lhs_tiles, rhs_tiles, strict=True):
        d = jnp.dot(a, b, preferred_element_type=jnp.float32)
        acc = d if acc is None else acc + d
    assert acc is not None
    return acc


def load_sel_row(sel_ref, slab: jax.Array | int, cols: jax.Array,
                 col_mask: jax.Array | None = None) -> jax.Array:
    """The Samoyeds selection of one V slab for columns ``cols`` ([1, bn] or [bn, 1]) -> int32
    of the same shape."""
    row = jnp.full((1, 1), slab, jnp.int32)
    return _load(sel_ref, row, cols, col_mask).astype(jnp.int32)


def route_partial(
    accs: list[jax.Array], partial: jax.Array, sel_row: jax.Array
) -> list[jax.Array]:
    """Add a slab's partial product [bt, bn] to accumulator set ``sel_row`` [1, bn]
    (transposed: [bn, bt] and [bn, 1]).

    ``accs[o]`` collects the columns whose kept dense column has offset o inside its
    group in this slab (Samoyeds' per-slab row selection); the sets are later stored
    interleaved with a stride-m_sel column store.
    """
    zero = jnp.zeros_like(partial)
    return [acc + jnp.where(sel_row == o, partial, zero) for o, acc in enumerate(accs)]

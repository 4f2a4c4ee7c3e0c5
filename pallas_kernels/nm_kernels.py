"""The Pallas Triton kernel bodies of ``pallas_kernels.nm_matmul``: the N:M and Samoyeds tile
products (grid and method in that module's doc) and the dense expansion of N:M arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import decompress


def _nm_matmul_kernel(
    x_ref,  # [t, K]
    values_ref,  # [K*n/m, N]
    meta_ref,  # [K*n/m/per_word, N] int32
    o_ref,  # [split_k * t, N]: out dtype (split_k == 1) or float32 partials
    *,
    t: int,
    k: int,
    n_cols: int,
    n: int,
    m: int,
    block_t: int,
    block_n: int,
    block_k: int,
    steps: int,
    load: str,
    wlhs: bool,
):
    pid_t, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = pid_t * block_t
    c0 = pid_n * block_n
    split = load == "split"
    g = block_k // m
    # wlhs: weights are the left dot operand, the tile is computed transposed [bn, bt].
    tax, cax = (1, 0) if wlhs else (0, 1)
    rows = t0 + decompress.iota(block_t, tax)  # [bt, 1] ([1, bt] if wlhs)
    cols = c0 + decompress.iota(block_n, cax)  # [1, bn] ([bn, 1] if wlhs)
    row_mask = rows < t if t % block_t else None
    col_mask = cols < n_cols if n_cols % block_n else None
    ragged_k = k % block_k != 0

    def body(step, acc):
        k0 = (pid_s * steps + step) * block_k
        group_mask, x_mask = None, row_mask
        if load == "expand":
            if ragged_k:
                group_mask = k0 // m + decompress.iota(g, 0) < k // m  # [g, 1]
                in_k = k0 + decompress.iota(block_k, 1) < k  # [1, bk]
                x_mask = in_k if row_mask is None else row_mask & in_k
            x = decompress.load_x_tile(x_ref, rows, k_start=k0, block_k=block_k,
                                       mask=x_mask)  # [bt, bk]
            w = decompress.load_nm_dense_tile(
                values_ref, meta_ref, cols, k_start=k0, block_k=block_k, n=n, m=m,
                group_mask=group_mask, col_mask=col_mask, split=not ragged_k)  # [bk, bn]
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)
        if ragged_k:
            group_mask = k0 // m + decompress.iota(g, tax) < k // m  # [g, 1] / [1, g]
            in_k = k0 // m + decompress.iota(g, cax) < k // m  # [1, g] / [g, 1]
            x_mask = in_k if row_mask is None else row_mask & in_k
        x_tiles = decompress.load_x_positions(
            x_ref, rows, k_start=k0, block_k=block_k, m=m, mask=x_mask,
            split=split and not ragged_k, transpose=wlhs)  # m x [bt, g] / [g, bt]
        w_tiles = decompress.load_nm_position_weights(
            values_ref, meta_ref, cols, k_start=k0, block_k=block_k, n=n, m=m,
            group_mask=group_mask, col_mask=col_mask, split=split and not ragged_k,
            transpose=wlhs)  # m x [g, bn] / [bn, g]
        if wlhs:
            return decompress.nm_tile_dot(w_tiles, x_tiles, acc)
        return decompress.nm_tile_dot(x_tiles, w_tiles, acc)

    shape = (block_n, block_t) if wlhs else (block_t, block_n)
    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))
    _store(o_ref, acc, rows + pid_s * t, cols, row_mask, col_mask)


def _store(o_ref, acc, rows, cols, row_mask, col_mask):
    # o_ref is [split_k * t, N]: split s owns rows s*t .. s*t + t - 1. rows/cols are index
    # arrays shaped like acc's axes ([bt,1]/[1,bn], or transposed [1,bt]/[bn,1]).
    mask = row_mask
    if col_mask is not None:
        mask = col_mask if mask is None else mask & col_mask
    val = acc.astype(o_ref.dtype)
    if mask is None:
        o_ref[rows, cols] = val
    else:
        plt.store(o_ref.at[rows, cols], val, mask=mask)


def _samoyeds_matmul_kernel(
    x_ref,  # [t, K]
    values_ref,  # [K/2, Nc]
    meta_ref,  # [K/32, Nc] int32
    sel_ref,  # [K/V, Nc] int8
    o_ref,  # [split_k * t, N]: out dtype (split_k == 1) or float32 partials
    *,
    t: int,
    n_groups: int,
    n_sel: int,
    m_sel: int,
    v: int,
    block_t: int,
    block_g: int,
    block_k: int,
    steps: int,
    load: str,
    wlhs: bool,
):
    pid_t, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = pid_t * block_t
    g0 = pid_n * block_g  # first column group of the tile
    split = load == "split"
    tax, cax = (1, 0) if wlhs else (0, 1)
    rows = t0 + decompress.iota(block_t, tax)  # [bt, 1] / [1, bt]
    sub = min(block_k, v)  # rows of one slab inside a K step
    groups = g0 + decompress.iota(block_g, cax)  # [1, bg] / [bg, 1]
    row_mask = rows < t if t % block_t else None
    col_mask = groups < n_groups if n_groups % block_g else None
    # Compressed columns g*n_sel + i of the tile's groups, one strided load per slot i.
    slot_cols = [groups * n_sel + i for i in range(n_sel)]

    def body(step, accs):
        k0 = (pid_s * steps + step) * block_k
        accs = list(accs)
        for u in range(block_k // sub):
            ks = k0 + u * sub
            if load == "expand":
                x = decompress.load_x_tile(x_ref, rows, k_start=ks, block_k=sub,
                                           mask=row_mask)  # [bt, sub]
                for cols in slot_cols:
                    w = decompress.load_nm_dense_tile(
                        values_ref, meta_ref, cols, k_start=ks, block_k=sub, n=2, m=4,
                        col_mask=col_mask, split=True)  # [sub, bg]
                    partial = jnp.dot(x, w, preferred_element_type=jnp.float32)  # [bt, bg]
                    sel = decompress.load_sel_row(sel_ref, ks // v, cols, col_mask)
                    accs = decompress.route_partial(accs, partial, sel)
                continue
            x_tiles = decompress.load_x_positions(
                x_ref, rows, k_start=ks, block_k=sub, m=4, mask=row_mask,
                split=split, transpose=wlhs)  # 4 x [bt, sub/4] / [sub/4, bt]
            for cols in slot_cols:
                w_tiles = decompress.load_nm_position_weights(
                    values_ref, meta_ref, cols, k_start=ks, block_k=sub, n=2, m=4,
                    col_mask=col_mask, split=split, transpose=wlhs)  # 4 x [sub/4, bg]
                if wlhs:
                    partial = decompress.nm_tile_dot(w_tiles, x_tiles)  # [bg, bt]
                else:
                    partial = decompress.nm_tile_dot(x_tiles, w_tiles)  # [bt, bg]
                sel = decompress.load_sel_row(sel_ref, ks // v, cols, col_mask)  # [1,bg]/[bg,1]
                accs = decompress.route_partial(accs, partial, sel)
        return tuple(accs)

    shape = (block_g, block_t) if wlhs else (block_t, block_g)
    zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in range(m_sel))
    accs = jax.lax.fori_loop(0, steps, body, zeros)
    # Set o holds dense columns g*m_sel + o: a stride-m_sel store per set.
    for o, acc in enumerate(accs):
        _store(o_ref, acc, rows + pid_s * t, groups * m_sel + o, row_mask, col_mask)


def _expand_nm_kernel(values_ref, meta_ref, o_ref, *, n: int, m: int, block_k: int,
                      block_n: int, n_cols: int):
    # values_ref [K*n/m, N], meta_ref [.., N] -> o_ref [K, N]: one [block_k, block_n] tile.
    k0 = pl.program_id(0) * block_k
    cols = pl.program_id(1) * block_n + decompress.iota(block_n, 1)  # [1, bn]
    col_mask = cols < n_cols if n_cols % block_n else None
    tiles = decompress.load_nm_position_weights(
        values_ref, meta_ref, cols, k_start=k0, block_k=block_k, n=n, m=m,
        col_mask=col_mask, split=True)  # m x [g, bn]
    rows = k0 + m * decompress.iota(block_k // m, 0)  # [g, 1]
    for j, w_j in enumerate(tiles):
        _store(o_ref, w_j, rows + j, cols, None, col_mask)

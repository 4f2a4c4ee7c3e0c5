"""Unstructured sparse matmul ``y = x @ W`` (Load-as-Sparse, Compute-as-Dense).

Two Pallas Triton kernels, one per layout of ``tiled_format``:

* "gather" (``TiledSparse``, column-ELL): each program owns one column tile (tile_n
  outputs), a range of K tiles and a block of tokens. Per step it loads a contiguous
  [chunk, tile_n] block of slot values and one-byte rows (the next block is loaded
  before this one's math, hiding HBM latency), gathers the activations the rows point
  at from x^T (``x_ref[k_row, tokens]``), and accumulates ``x * w`` elementwise in f32
  registers; the slot axis is summed once at the end. Work per stored nonzero only.
* "expand" (``TiledBitmap``): per [block_k, tile_n] tile it ANDs each entry's bit,
  popcounts the lower bits of its word for the value index, gathers the values
  (masked), and multiplies the expanded tile on tensor cores (``jnp.dot``, f32 acc).
* "densify" (either layout): ``W.to_dense()`` with XLA, then one ``jnp.dot``.

H100 at 80% sparsity, 4096 x 14336 bf16, against XLA dense on the same pruned weight
(``benchmarks/unstructured.md``): gather is 2.1x faster at 1 token, 1.9x at 2, 1.5x at
4, 0.9x at 8 and 0.6x at 16: it is bound by HBM at 1 token (64% of the copy rate) and
by L1 gather traffic beyond (each slot reads ``2 t`` bytes of a random x row). Expand
runs a flat ~60 us up to 16 tokens (0.8-0.9x), bound by its per-entry expansion.
``default_config`` picks per device kind, layout, shape and token count from the tuned
table, else a heuristic; past 128 tokens it densifies.

Partial sums over K ranges (``k_splits > 1``, to give the GPU enough programs) go to
an f32 [k_splits, t, N] buffer summed by XLA afterwards: deterministic, no atomics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as backend_lib
from pallas_kernels.checks import expect_kind
from pallas_kernels.launch import launch
from pallas_kernels.tiled_format import SUPPORTED_DTYPES, TiledBitmap, TiledSparse

Method = Literal["gather", "expand", "densify"]
TUNED_CONFIGS = pathlib.Path(__file__).parent / "tuning" / "configs" / "unstructured.json"
# Programs to aim for when choosing k_splits: a few per SM of an H100 (132 SMs).
_TARGET_PROGRAMS = 512
# Above this many tokens the Pallas kernels cost more than expanding W with XLA and one
# tensor-core dot (H100 sweep; tuned configs override it per shape).
_DENSIFY_ABOVE_TOKENS = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnstructuredConfig:
    """How ``unstructured_matmul`` runs.

    Attributes:
      method: "gather" (Pallas kernel for ``TiledSparse``), "expand" (Pallas kernel for
        ``TiledBitmap``) or "densify" (expand W with XLA, one dense dot; either format).
      block_t: tokens per program, a power of two (clipped to the padded token count;
        at least 16 for "expand", whose tensor-core dot needs 16 rows).
      chunk: slot rows per loop step of "gather", a power of two.
      block_k: K rows per step of "expand", a power of two >= 16 dividing K.
      k_splits: programs along K per column tile; must divide K // tile_k. None: enough
        splits for ~512 programs.
      evict_first: load W with the evict-first cache policy, keeping L1/L2 for the
        gathered x (W is read once). (Pallas Triton in jax 0.11 cannot emit ``.cg``.)
      num_warps, num_stages: Triton launch parameters.
    """

    method: Method = "gather"
    block_t: int = 16
    chunk: int = 16
    block_k: int = 32
    k_splits: int | None = None
    evict_first: bool = True
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.method not in ("gather", "expand", "densify"):
            raise ValueError(f"method={self.method!r} must be 'gather', 'expand' or 'densify'")
        if self.block_k < 16 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k={self.block_k} must be a power of two >= 16")
        for name in ("block_t", "chunk"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two")
        if self.k_splits is not None and self.k_splits < 1:
            raise ValueError(f"k_splits={self.k_splits} must be >= 1")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps={self.num_warps} must be a power of two")


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _heuristic_config(tokens: int, layout: str = "ell") -> UnstructuredConfig:
    """Defaults fitted to the H100 sweep (benchmarks/unstructured.md) for shapes without
    a tuned entry."""
    if layout == "bitmap":
        if tokens > _DENSIFY_ABOVE_TOKENS:
            return UnstructuredConfig(method="densify")
        block_t = min(max(_next_pow2(tokens), 16), 64)
        return UnstructuredConfig(method="expand", block_t=block_t, block_k=64, num_warps=4,
                                  num_stages=2)
    if tokens > _DENSIFY_ABOVE_TOKENS:
        return UnstructuredConfig(method="densify")
    block_t = min(_next_pow2(tokens), 16)
    # The f32 accumulator is chunk * tile_n * block_t values per program; past ~128 per
    # thread it spills (measured: 25-40x slower), so the chunk shrinks as block_t grows.
    chunk = 32 if block_t <= 2 else 16
    return UnstructuredConfig(block_t=block_t, chunk=chunk,
                              num_warps=4 if block_t <= 8 else 2)


def _layout(w: TiledSparse | TiledBitmap) -> str:
    return _KERNELS[type(w)].layout


@functools.cache
def _tuned_table() -> dict:
    if not TUNED_CONFIGS.exists():
        return {}
    return json.loads(TUNED_CONFIGS.read_text())


def default_config(tokens: int, w: TiledSparse | TiledBitmap) -> UnstructuredConfig:
    """The tuned config for this device kind, layout and [K, N] (else any shape of the
    layout; nearest token count wins), or a heuristic when the table has none.

    Table (``tuning/configs/unstructured.json``):
    ``{device_kind: {"ell" | "bitmap": {"KxN" | "*": {tokens: config fields}}}}``.
    """
    layout = _layout(w)
    by_shape = _tuned_table().get(backend_lib.device_kind(), {}).get(layout, {})
    table = by_shape.get(f"{w.k}x{w.n}") or by_shape.get("*")
    if table:
        key = min(table, key=lambda s: (abs(math.log2(int(s)) - math.log2(max(tokens, 1))),
                                         int(s)))
        return UnstructuredConfig(**table[key])
    return _heuristic_config(tokens, layout)


# ---------------------------------------------------------------------------- kernel
def _gather_kernel(x_ref, val_ref, row_ref, off_ref, *rest, tile_k: int,
                   k_per_split: int, chunk: int, block_t: int, evict_first: bool):
    # x_ref: [K, Tp] (x transposed, tokens padded); val_ref, row_ref: [S, tile_n];
    # off_ref: [NT, KT + 1] int32; o_ref: [k_splits, Tp, N]. An aliased poison buffer
    # may sit before o_ref (tests); it is never read.
    from jax.experimental.pallas import triton as plt

    o_ref = rest[-1]
    tile_n = val_ref.shape[1]
    nt, split, tb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kt0 = split * k_per_split
    # Slot rows of K tile kt0 + j are bounds[j] : bounds[j + 1], one contiguous stream.
    bounds = [off_ref[nt, kt0 + j] for j in range(k_per_split + 1)]
    start, end = bounds[0], bounds[-1]
    steps = (end - start + chunk - 1) // chunk
    tokens = pl.ds(tb * block_t, block_t)

    def load(i):
        first = start + i * chunk
        slot = first + lax.broadcasted_iota(jnp.int32, (chunk, tile_n), 0)      # [chunk, tn]
        live = slot < end
        blk = pl.ds(first, chunk)
        policy = "evict_first" if evict_first else None
        vals = plt.load(val_ref.at[blk, :], mask=live, other=0,
                        eviction_policy=policy)                                 # [chunk, tn]
        rows = plt.load(row_ref.at[blk, :], mask=live, other=0,
                        eviction_policy=policy)                                 # [chunk, tn]
        kt = jnp.full((chunk, tile_n), kt0, jnp.int32)
        for b in bounds[1:-1]:  # which K tile of this split each slot row belongs to
            kt = kt + (slot >= b).astype(jnp.int32)
        return vals, kt * tile_k + rows.astype(jnp.int32)

    def body(i, carry):
        acc, (vals, krow) = carry
        nxt = load(i + 1)  # issued before this step's math: hides the HBM latency
        xg = x_ref[krow, tokens]                                                # [chunk, tn, bt]
        acc = acc + xg.astype(jnp.float32) * vals.astype(jnp.float32)[:, :, None]
        return acc, nxt

    acc = jnp.zeros((chunk, tile_n, block_t), jnp.float32)
    acc, _ = lax.fori_loop(0, steps, body, (acc, load(0)))
    y = jnp.sum(acc, axis=0)                                                    # [tn, bt]
    o_ref[split, tokens, pl.ds(nt * tile_n, tile_n)] = y.T.astype(o_ref.dtype)


def _gather_matmul(x: jax.Array, w: TiledSparse, config: UnstructuredConfig,
                   out_dtype: jnp.dtype, out_init: jax.Array | None = None) -> jax.Array:
    """x [t, K] -> [t, N] through the Pallas column-ELL gather kernel."""
    t, k = x.shape
    kt_count, nt_count = w.grid
    block_t = min(config.block_t, _next_pow2(t))
    t_pad = -(-t // block_t) * block_t
    t_blocks = t_pad // block_t
    k_splits = _pick_splits(config.k_splits, kt_count, nt_count * t_blocks, "K tiles",
                            f"K={k}, tile_k={w.tile_k}")
    x_t = jnp.pad(x, ((0, t_pad - t), (0, 0))).T                                 # [K, Tp]
    kernel = functools.partial(_gather_kernel, tile_k=w.tile_k,
                               k_per_split=kt_count // k_splits, chunk=config.chunk,
                               block_t=block_t, evict_first=config.evict_first)
    return _launch(kernel, "unstructured_gather_matmul",
                   [x_t, w.values, w.rows, w.offsets], (nt_count, k_splits, t_blocks),
                   (k_splits, t_pad, w.n), t, config, out_dtype, out_init)


def _expand_kernel(x_ref, words_ref, woff_ref, val_ref, *rest, block_k: int, tile_n: int,
                   k_per_split: int, block_t: int):
    # x_ref: [Tp, K]; words_ref, woff_ref: [K, N/32] int32; val_ref: [V];
    # o_ref: [k_splits, Tp, N]. An aliased poison buffer may sit before o_ref (tests).
    from jax.experimental.pallas import triton as plt

    o_ref = rest[-1]
    nt, split, tb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    wpt = tile_n // 32
    bit = lax.broadcasted_iota(jnp.int32, (1, 1, 32), 2)
    col_bit = jnp.left_shift(jnp.int32(1), bit)                                  # [1, 1, 32]
    tokens = pl.ds(tb * block_t, block_t)

    def body(i, acc):
        k0 = (split * k_per_split + i) * block_k
        blk = (pl.ds(k0, block_k), pl.ds(nt * wpt, wpt))
        words = words_ref[blk][:, :, None]                                      # [bk, wpt, 1]
        woff = woff_ref[blk][:, :, None]                                        # [bk, wpt, 1]
        present = (words & col_bit) != 0                                        # [bk, wpt, 32]
        idx = woff + lax.population_count(words & (col_bit - 1))                # value index
        vals = plt.load(val_ref.at[idx], mask=present, other=0)                 # [bk, wpt, 32]
        w_tile = vals.reshape(block_k, tile_n)                                  # [bk, tn]
        x_tile = x_ref[tokens, pl.ds(k0, block_k)]                              # [bt, bk]
        return acc + jnp.dot(x_tile, w_tile, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k_per_split, body, jnp.zeros((block_t, tile_n), jnp.float32))
    o_ref[split, tokens, pl.ds(nt * tile_n, tile_n)] = acc.astype(o_ref.dtype)


def _expand_matmul(x: jax.Array, w: TiledBitmap, config: UnstructuredConfig,
                   out_dtype: jnp.dtype, out_init: jax.Array | None = None) -> jax.Array:
    """x [t, K] -> [t, N] through the Pallas bitmap-expand kernel."""
    t, k = x.shape
    block_k = config.block_k
    if k % block_k:
        raise ValueError(f"K={k} must be a multiple of {block_k=} (or use method='densify')")
    block_t = max(16, min(config.block_t, _next_pow2(t)))
    t_pad = -(-t // block_t) * block_t
    t_blocks = t_pad // block_t
    nt_count, kb_count = w.n // w.tile_n, k // block_k
    k_splits = _pick_splits(config.k_splits, kb_count, nt_count * t_blocks, "K blocks",
                            f"K={k}, block_k={block_k}")
    x_p = jnp.pad(x, ((0, t_pad - t), (0, 0)))                                  # [Tp, K]
    kernel = functools.partial(_expand_kernel, block_k=block_k, tile_n=w.tile_n,
                               k_per_split=kb_count // k_splits, block_t=block_t)
    return _launch(kernel, "unstructured_expand_matmul", [x_p, w.words, w.woff, w.values],
                   (nt_count, k_splits, t_blocks), (k_splits, t_pad, w.n), t, config,
                   out_dtype, out_init)


class _Kernel(NamedTuple):
    layout: str      # the tuned table's key
    method: str      # the config method that runs the kernel
    matmul: Callable  # (x [t, K], w, config, out_dtype) -> [t, N]


_KERNELS = {TiledSparse: _Kernel("ell", "gather", _gather_matmul),
            TiledBitmap: _Kernel("bitmap", "expand", _expand_matmul)}


def _pick_splits(k_splits: int | None, count: int, programs: int, what: str,
                 where: str) -> int:
    """k_splits as given (must divide ``count``) or the fewest giving ~512 programs."""
    if k_splits is None:
        return next(d for d in range(1, count + 1)
                    if count % d == 0 and (programs * d >= _TARGET_PROGRAMS or d == count))
    if count % k_splits:
        raise ValueError(f"{k_splits=} must divide the {count} {what} ({where})")
    return k_splits


def _launch(kernel, name: str, args: list, grid: tuple[int, int, int],
            out_shape: tuple[int, int, int], t: int, config: UnstructuredConfig,
            out_dtype: jnp.dtype, out_init: jax.Array | None) -> jax.Array:
    """pallas_call with a [k_splits, Tp, N] output (f32 partials when k_splits > 1),
    then the sum over splits and the token slice."""
    from jax.experimental.pallas import triton as plt

    k_splits = out_shape[0]
    acc_dtype = out_dtype if k_splits == 1 else jnp.float32
    out_struct = jax.ShapeDtypeStruct(out_shape, acc_dtype)
    out = launch(kernel, args, out_shape=out_struct, grid=grid,
                 compiler_params=plt.CompilerParams(num_warps=config.num_warps,
                                                    num_stages=config.num_stages),
                 name=name, init=out_init)
    y = out[0] if k_splits == 1 else jnp.sum(out, axis=0)
    return y[:t].astype(out_dtype)


def _validate(x: jax.Array, w: TiledSparse | TiledBitmap) -> None:
    expect_kind("unstructured_matmul: w", w, (TiledSparse, TiledBitmap),
                "a TiledSparse or TiledBitmap (their from_dense converts a pruned dense weight)")
    if w.batch_shape:
        raise ValueError(f"w must be one matrix [K, N], got a stack of shape {w.shape}; "
                         "map over the leading dims with jax.vmap")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must share a dtype, got x {x.dtype} and w {w.dtype}")
    if x.ndim < 1 or x.shape[-1] != w.k:
        raise ValueError(f"x must be [..., K={w.k}], got shape {x.shape}")


def _out_dtype(x: jax.Array, out_dtype) -> jnp.dtype:
    out = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"out_dtype must be a floating dtype, got {out}")
    return out


def unstructured_matmul(x: jax.Array, w: TiledSparse | TiledBitmap, *,
                        config: UnstructuredConfig | None = None,
                        out_dtype: jnp.dtype | None = None) -> jax.Array:
    """``y = x @ W`` with W unstructured-sparse (``TiledSparse`` or ``TiledBitmap``).

    Args:
      x: [..., K] activations, same dtype as W (f32, bf16, f16).
      w: TiledSparse or TiledBitmap of dense shape [K, N] (no leading batch dims).
      config: kernel config; None picks ``default_config(tokens)``.
      out_dtype: output dtype; default x.dtype. Accumulation is f32 either way.

    Returns:
      [..., N] in ``out_dtype``.
    """
    _validate(x, w)
    out_dtype = _out_dtype(x, out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    t = x2.shape[0]
    if t == 0:
        return jnp.zeros(lead + (w.n,), out_dtype)
    config = default_config(t, w) if config is None else config
    kernel = _KERNELS[type(w)]
    if config.method == "densify":
        # straight to out_dtype (f32 accumulation in the GEMM; see nm_matmul._dense_product)
        y = jnp.dot(x2, w.to_dense(), preferred_element_type=out_dtype)
    elif config.method != kernel.method:
        raise ValueError(f"method={config.method!r} does not apply to {type(w).__name__}; "
                         f"use {kernel.method!r} or 'densify'")
    else:
        y = kernel.matmul(x2, w, config, out_dtype)
    return y.reshape(lead + (w.n,))


def unstructured_matmul_reference(x: jax.Array, w: TiledSparse | TiledBitmap, *,
                                  config: UnstructuredConfig | None = None,
                                  out_dtype: jnp.dtype | None = None) -> jax.Array:
    """Pure-jnp ``x @ W``: densify W, f32 accumulate. Same signature as the kernel."""
    del config
    _validate(x, w)
    out_dtype = _out_dtype(x, out_dtype)
    y = jnp.dot(x.astype(jnp.float32), w.to_dense().astype(jnp.float32),
                precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype)

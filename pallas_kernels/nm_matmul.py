"""``y = x @ W`` with W in an N:M (``NMSparse``) or Samoyeds (``SamoyedsSparse``) layout.

Load-as-Sparse, Compute-as-Dense: the Pallas Triton kernels read only compressed values
and meta (2:4 bf16 moves 0.5625 of the dense bytes, Samoyeds 1:2:128 + 2:4 about 0.28),
expand each tile in registers (``pallas_kernels.decompress``) and multiply on tensor cores
with f32 accumulation. Skinny matmuls (decode) are bound by memory, so fewer bytes is
the whole speed-up there. For many tokens the product is bound by arithmetic; then a
config picks ``method="densify"``: expand the weight with one memory-bound kernel (Pallas
``expand_nm_pallas`` for N:M, XLA's fusion of ``SamoyedsSparse.to_dense`` for Samoyeds: the
faster of each on an H100) and call XLA's ``jnp.dot`` (measured faster than the fused kernel from ~256
tokens on an H100; see benchmarks/sparse_matmul.md).

Grid: (token tiles, column tiles, K splits). Each program loops over its share of K;
with ``split_k > 1`` the programs write f32 partial sums [split_k, t, N] that one XLA
reduction adds (more programs in flight for the decode shapes with few column tiles).

Public: ``nm_matmul``, ``samoyeds_matmul`` (and their ``*_reference``), ``SparseMatmulConfig``.
The kernel bodies are in ``pallas_kernels.nm_kernels``, the argument checks in
``pallas_kernels.nm_matmul_checks``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import backend as backend_lib
from pallas_kernels import decompress
from pallas_kernels import tuning
from pallas_kernels.checks import expect_positive_ints
from pallas_kernels.launch import launch
from pallas_kernels.nm_kernels import _expand_nm_kernel, _nm_matmul_kernel, _samoyeds_matmul_kernel
from pallas_kernels.nm_matmul_checks import _check_nm, _check_samoyeds, _check_x, _out_dtype

Method = Literal["pallas", "densify"]
# How a kernel fetches the strided x columns and the per-group meta words of a tile:
# "gather" = index-vector loads (strided x columns, one meta word load per group);
# "split" = contiguous loads, then reshape/split/broadcast in registers; "expand" = the
# weight tile expanded to dense [block_k, block_n] in registers (selects over a
# [g, m, bn] view + reshape) and one dot against a contiguous x tile (order "xw" only).
TileLoad = Literal["gather", "split", "expand"]
# Operand order of the tile product: "xw" computes x_tile @ W_tile [bt, bn]; "wx" computes
# W_tile^T @ x_tile^T [bn, bt] (weights on the left: M = block_n even for one token, so the
# expanded weights can feed the MMA from registers).
Order = Literal["xw", "wx"]
# Triton's dot needs every dim >= 16.
_MIN_DOT = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseMatmulConfig:
    """Tiling of one sparse matmul launch.

    Attributes:
      method: "pallas" runs the kernel; "densify" expands W and calls ``jnp.dot``
        (wins only when the product is bound by arithmetic, i.e. many tokens).
      block_t: token rows per program (power of two >= 16).
      block_n: output columns per program; for Samoyeds, compressed columns (power of two
        >= 16; times n_sel for Samoyeds).
      block_k: dense K rows per loop step (power of two; block_k / m >= 16 on the GPU).
      split_k: programs sharing one output tile along K (partials added by XLA).
      num_warps, num_stages: Triton launch and software-pipelining depth.
      load: "gather", "split" or "expand" (see ``TileLoad``); same result, different
        instructions.
      order: "xw" or "wx" (see ``Order``).
    """

    method: Method = "pallas"
    block_t: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    load: TileLoad = "gather"
    order: Order = "xw"

    def __post_init__(self) -> None:
        expect_positive_ints("SparseMatmulConfig", block_t=self.block_t, block_n=self.block_n,
                             block_k=self.block_k, split_k=self.split_k,
                             num_warps=self.num_warps, num_stages=self.num_stages)
        for name, literal in (("method", Method), ("load", TileLoad), ("order", Order)):
            allowed = get_args(literal)
            if getattr(self, name) not in allowed:
                raise ValueError(f"SparseMatmulConfig: {name} must be "
                                 + " or ".join(map(repr, allowed))
                                 + f", got {getattr(self, name)!r}")

    def replace(self, **kw: Any) -> SparseMatmulConfig:
        return dataclasses.replace(self, **kw)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


# --------------------------------------------------------------------------- configs


def heuristic_config(t: int, k: int, n_cols: int) -> SparseMatmulConfig:
    """A reasonable tiling when no tuned config exists (n_cols = columns the grid tiles).

    From two H100 sweeps (benchmarks/sparse_matmul.md): few tokens want lean tiles
    (block_k 256, 3 stages, contiguous loads) and enough programs for about two waves
    (split K); beyond ~128 tokens the in-kernel expansion costs more than it saves, and
    one Pallas expansion plus XLA's dense matmul is faster.
    """
    if t <= 128:
        block_n, block_k = 64, 256
        programs = -(-n_cols // block_n)
        split_k = 1
        while programs * split_k < 264 and k // (block_k * split_k * 2) >= 4:
            split_k *= 2
        return SparseMatmulConfig(block_t=max(16, _next_pow2(t)), block_n=block_n,
                                  block_k=block_k, split_k=split_k, num_warps=4, num_stages=3,
                                  load="split")
    return SparseMatmulConfig(method="densify")


def pick_config(op: str, t: int, k: int, n_out: int, n_cols: int) -> SparseMatmulConfig:
    """Tuned config for this device (nearest token count wins), else the heuristic."""
    tuned = tuning.lookup(op, backend_lib.device_kind(), k=k, n=n_out, tokens=t)
    if tuned is not None:
        return SparseMatmulConfig(**tuned)
    return heuristic_config(t, k, n_cols)


def _fit(cfg: SparseMatmulConfig, *, t: int, k: int, n_cols: int, min_block_k: int,
         k_multiple: bool) -> SparseMatmulConfig:
    """Shrink a config's blocks to the problem (a tuned config may be for another shape)."""
    block_t = max(_MIN_DOT, min(cfg.block_t, _next_pow2(t)))
    block_n = max(_MIN_DOT, min(cfg.block_n, _next_pow2(n_cols)))
    block_k = max(min_block_k, min(cfg.block_k, _next_pow2(k)))
    if k_multiple:
        while block_k > min_block_k and k % block_k:
            block_k //= 2
    steps_total = -(-k // block_k)
    split_k = max(1, min(cfg.split_k, steps_total))
    while steps_total % split_k:
        split_k -= 1
    return cfg.replace(block_t=block_t, block_n=block_n, block_k=block_k, split_k=split_k)


def _check_config(cfg: SparseMatmulConfig) -> None:
    if cfg.method not in ("pallas", "densify"):
        raise ValueError(f"config.method must be 'pallas' or 'densify', got {cfg.method!r}")
    for name in ("block_t", "block_n", "block_k"):
        val = getattr(cfg, name)
        if not _pow2(val) or val < _MIN_DOT:
            raise ValueError(f"config.{name}={val} must be a power of two >= {_MIN_DOT}")
    if cfg.order not in ("xw", "wx"):
        raise ValueError(f"config.order must be 'xw' or 'wx', got {cfg.order!r}")
    if cfg.load not in ("gather", "split", "expand"):
        raise ValueError(f"config.load must be 'gather', 'split' or 'expand', got {cfg.load!r}")
    if cfg.load == "expand" and cfg.order != "xw":
        raise ValueError("config.load='expand' needs order='xw'")
    if cfg.split_k < 1 or cfg.num_warps < 1 or cfg.num_stages < 1:
        raise ValueError(f"split_k, num_warps, num_stages must be >= 1, got {cfg}")


# --------------------------------------------------------------------------- dense expansion


def expand_nm_pallas(values: jax.Array, meta: jax.Array, *, n: int, m: int,
                     block_k: int = 256, block_n: int = 128) -> jax.Array:
    """Dense [K, N] from NMSparse arrays with one memory-bound Pallas kernel (the "densify"
    method: reads the compressed bytes once, writes the dense bytes once)."""
    kc, n_cols = values.shape
    k = kc * m // n
    while block_k > m and k % block_k:
        block_k //= 2
    decompress.check_block_k(block_k, n=n, m=m)
    block_n = min(block_n, _next_pow2(n_cols))
    kernel = functools.partial(_expand_nm_kernel, n=n, m=m, block_k=block_k, block_n=block_n,
                               n_cols=n_cols)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((k, n_cols), values.dtype),
        grid=(k // block_k, pl.cdiv(n_cols, block_n)),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        interpret=backend_lib.interpret_mode(),
        name=f"expand_nm_{n}of{m}",
    )(values, meta)


def _dense_product(x, w_dense, out_dtype):
    # Straight to out_dtype: XLA's GPU GEMM accumulates bf16/f16 in f32 and rounds once in its
    # epilogue. An f32 product plus a convert costs an extra pass over [t, N] f32 (H100, Mixtral
    # w1 at 4096 tokens: 846 -> ~700 us).
    return jnp.dot(x, w_dense, preferred_element_type=out_dtype)


# --------------------------------------------------------------------------- wrappers


def _launch(kernel, args, *, t, n_out, cfg, grid, out_dtype, name, poison):
    split = cfg.split_k
    shape = (split * t, n_out)
    dtype = out_dtype if split == 1 else jnp.float32
    out = launch(kernel, args, out_shape=jax.ShapeDtypeStruct(shape, dtype), grid=grid,
                 compiler_params=plt.CompilerParams(num_warps=cfg.num_warps,
                                                    num_stages=cfg.num_stages),
                 name=name, init=jnp.full(shape, jnp.nan, dtype) if poison else None)
    if split > 1:
        out = out.reshape(split, t, n_out).sum(axis=0).astype(out_dtype)
    return out


def nm_matmul(
    x: jax.Array,
    w: Any,
    *,
    config: SparseMatmulConfig | None = None,
    out_dtype: Any = None,
    _poison_output: bool = False,
) -> jax.Array:
    """``x @ W`` for an ``NMSparse`` weight.

    Args:
      x: [t, K] bfloat16 or float16.
      w: ``formats.NMSparse`` with dense shape [K, N], same dtype as x, no leading dims.
      config: tiling; None picks a tuned config for this device and token count, else a
        heuristic (``pick_config``).
      out_dtype: output dtype (default x.dtype).

    Returns:
      [t, N] in ``out_dtype``, accumulated in float32.
    """
    n, m, k, n_cols = _check_nm(w)
    _check_x(x, w, k, "nm_matmul")
    out_dt = _out_dtype(x, out_dtype)
    t = x.shape[0]
    if t == 0:
        return jnp.zeros((0, n_cols), out_dt)
    op = f"nm_matmul_{n}of{m}"
    cfg = config if config is not None else pick_config(op, t, k, n_cols, n_cols)
    _check_config(cfg)
    if cfg.method == "densify":
        return _dense_product(x, expand_nm_pallas(w.values, w.meta, n=n, m=m), out_dt)
    per_word = decompress.meta_per_word(m)
    min_block_k = max(_MIN_DOT * m, per_word * m // n)
    cfg = _fit(cfg, t=t, k=k, n_cols=n_cols, min_block_k=min_block_k, k_multiple=True)
    decompress.check_block_k(cfg.block_k, n=n, m=m)
    steps = -(-k // cfg.block_k) // cfg.split_k
    grid = (pl.cdiv(t, cfg.block_t), pl.cdiv(n_cols, cfg.block_n), cfg.split_k)
    kernel = functools.partial(
        _nm_matmul_kernel, t=t, k=k, n_cols=n_cols, n=n, m=m, block_t=cfg.block_t,
        block_n=cfg.block_n, block_k=cfg.block_k, steps=steps, load=cfg.load,
        wlhs=cfg.order == "wx")
    return _launch(kernel, (x, w.values, w.meta), t=t, n_out=n_cols, cfg=cfg, grid=grid,
                   out_dtype=out_dt, name=f"nm_matmul_{n}of{m}", poison=_poison_output)


def samoyeds_matmul(
    x: jax.Array,
    w: Any,
    *,
    config: SparseMatmulConfig | None = None,
    out_dtype: Any = None,
    _poison_output: bool = False,
) -> jax.Array:
    """``x @ W`` for a ``SamoyedsSparse`` weight (N:M:V column selection + 2:4 along K).

    Each program owns ``block_n`` compressed columns (``block_n / n_sel`` column groups).
    Per V slab it multiplies x by the slab's expanded 2:4 tile, adds the partial product
    to the accumulator set named by the slab's ``sel`` row, and finally stores set o to
    dense columns ``g * m_sel + o`` (strided stores): no dense W is ever built.

    Args:
      x: [t, K] bfloat16 or float16.
      w: ``formats.SamoyedsSparse`` with dense shape [K, N], same dtype as x; the kernel
        needs V a power of two >= 64.
      config, out_dtype: as in ``nm_matmul``.

    Returns:
      [t, N] in ``out_dtype``.
    """
    n_sel, m_sel, v, k, n_out, nc = _check_samoyeds(w)
    _check_x(x, w, k, "samoyeds_matmul")
    out_dt = _out_dtype(x, out_dtype)
    t = x.shape[0]
    if t == 0:
        return jnp.zeros((0, n_out), out_dt)
    op = f"samoyeds_matmul_{n_sel}of{m_sel}v{v}"
    cfg = config if config is not None else pick_config(op, t, k, n_out, nc)
    _check_config(cfg)
    if cfg.method == "densify":  # XLA's one-fusion expansion: 1.6-1.7x faster than a Pallas one
        return _dense_product(x, w.to_dense(), out_dt)
    if not _pow2(v) or v < 4 * _MIN_DOT:
        raise ValueError(f"the Pallas kernel needs v a power of two >= {4 * _MIN_DOT}, got {v=}; "
                         "use samoyeds_matmul_reference or the linear op's xla implementation")
    n_groups = nc // n_sel
    block_g = max(_MIN_DOT, cfg.block_n // n_sel)
    cfg = _fit(cfg.replace(block_n=block_g), t=t, k=k, n_cols=n_groups,
               min_block_k=4 * _MIN_DOT, k_multiple=True)
    if k % cfg.block_k or (cfg.block_k % v and v % cfg.block_k):
        raise ValueError(f"{k=} must be a multiple of block_k={cfg.block_k}, and block_k and "
                         f"{v=} must divide one another")
    block_g = cfg.block_n
    steps = k // cfg.block_k // cfg.split_k
    grid = (pl.cdiv(t, cfg.block_t), pl.cdiv(n_groups, block_g), cfg.split_k)
    kernel = functools.partial(
        _samoyeds_matmul_kernel, t=t, n_groups=n_groups, n_sel=n_sel, m_sel=m_sel, v=v,
        block_t=cfg.block_t, block_g=block_g, block_k=cfg.block_k, steps=steps,
        load=cfg.load, wlhs=cfg.order == "wx")
    return _launch(kernel, (x, w.values, w.meta, w.sel), t=t, n_out=n_out, cfg=cfg, grid=grid,
                   out_dtype=out_dt, name=f"samoyeds_matmul_{n_sel}of{m_sel}",
                   poison=_poison_output)


# --------------------------------------------------------------------------- references


def nm_matmul_reference(
    x: jax.Array,
    w: Any,
    *,
    config: SparseMatmulConfig | None = None,
    out_dtype: Any = None,
) -> jax.Array:
    """Pure-jnp ``x @ w.to_dense()`` in float32 -> [t, N] in ``out_dtype`` (default x.dtype).

    The kernel's checks, except that x may have any floating dtype; ``config`` is accepted for
    signature parity and ignored.
    """
    del config
    _check_x(x, w, _check_nm(w)[2], "nm_matmul_reference", kernel=False)
    return _reference_product(x, w, out_dtype)


def samoyeds_matmul_reference(
    x: jax.Array,
    w: Any,
    *,
    config: SparseMatmulConfig | None = None,
    out_dtype: Any = None,
) -> jax.Array:
    """Pure-jnp ``x @ w.to_dense()`` in float32 -> [t, N] in ``out_dtype`` (default x.dtype).

    The kernel's checks, except that x may have any floating dtype; ``config`` is accepted for
    signature parity and ignored.
    """
    del config
    _check_x(x, w, _check_samoyeds(w)[3], "samoyeds_matmul_reference", kernel=False)
    return _reference_product(x, w, out_dtype)


def _reference_product(x: jax.Array, w: Any, out_dtype: Any) -> jax.Array:
    """``x @ w.to_dense()`` in float32 at full precision, in ``out_dtype`` (default x.dtype)."""
    dt = _out_dtype(x, out_dtype)
    y = jnp.dot(x.astype(jnp.float32), w.to_dense().astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST)
    return y.astype(dt)


__all__ = [
    "SparseMatmulConfig",
    "expand_nm_pallas",
    "heuristic_config",
    "nm_matmul",
    "nm_matmul_reference",
    "pick_config",
    "samoyeds_matmul",
    "samoyeds_matmul_reference",
]

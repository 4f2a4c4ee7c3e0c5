"""Argument checks of ``pallas_kernels.nm_matmul``: x against the weight, the output dtype,
and the ``NMSparse`` / ``SamoyedsSparse`` weight kinds."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import decompress
from pallas_kernels.checks import expect_floating, expect_kind
from pallas_kernels.formats import NMSparse, SamoyedsSparse

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check_x(x: jax.Array, w: Any, k: int, name: str, *, kernel: bool = True) -> None:
    """x [t, K] against one matrix w; the kernel takes bfloat16/float16 x of w's dtype, its
    reference (``kernel=False``) any floating x."""
    expect_kind(f"{name}: x", x, (jax.Array, np.ndarray), "an array [t, K]")
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [t, K], got shape {x.shape}")
    if w.values.ndim != 2:
        raise ValueError(
            f"{name}: w must be one matrix (values [K', N']), got values of shape "
            f"{w.values.shape}; expert stacks go through pallas_kernels.moe_matmul")
    if not kernel:
        expect_floating(name, "x", x)
    elif jnp.dtype(x.dtype) not in _DTYPES:
        raise ValueError(f"{name}: x.dtype must be bfloat16 or float16, got {x.dtype}")
    elif jnp.dtype(w.values.dtype) != jnp.dtype(x.dtype):
        raise ValueError(
            f"{name}: w dtype {w.values.dtype} must equal x dtype {x.dtype}")
    if x.shape[1] != k:
        raise ValueError(f"{name}: x has K={x.shape[1]} but w has K={k}")


def _out_dtype(x: jax.Array, out_dtype: Any) -> jnp.dtype:
    if out_dtype is None:
        return jnp.dtype(x.dtype)
    dt = jnp.dtype(out_dtype)
    if dt not in _DTYPES + (jnp.dtype(jnp.float32),):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {dt}")
    return dt


def _check_nm(w: Any) -> tuple[int, int, int, int]:
    # The array shapes are checked when an NMSparse is built.
    expect_kind("nm_matmul: w", w, NMSparse,
                "an NMSparse (formats.NMSparse.from_dense converts a pruned dense weight)")
    n, m, k = int(w.n), int(w.m), int(w.k)
    if (n, m) not in decompress.SUPPORTED_NM:
        raise ValueError(f"unsupported N:M pattern {n}:{m}; expected one of {decompress.SUPPORTED_NM}")
    return n, m, k, w.values.shape[-1]


def _check_samoyeds(w: Any) -> tuple[int, int, int, int, int, int]:
    # The array shapes are checked when a SamoyedsSparse is built.
    expect_kind("samoyeds_matmul: w", w, SamoyedsSparse,
                "a SamoyedsSparse (formats.SamoyedsSparse.from_dense converts a pruned dense "
                "weight)")
    n_sel, m_sel, v, k, n_out = int(w.n_sel), int(w.m_sel), int(w.v), int(w.k), int(w.n_out)
    return n_sel, m_sel, v, k, n_out, n_out * n_sel // m_sel

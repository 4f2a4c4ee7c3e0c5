"""A tiny matmul-plus-bias kernel in each Pallas GPU backend, with its reference.

Used by ``samoyeds-gpu-check`` to prove that a machine can compile and run both
backends before any real kernel is blamed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend as backend_lib


def smoke_reference(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x @ w + b`` with f32 accumulation. x: [t, d], w: [d, f], b: [f] -> [t, f]."""
    y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)) + b.astype(jnp.float32)[None, :]
    return y.astype(x.dtype)


def _smoke_kernel(x_ref, w_ref, b_ref, o_ref):
    # x_ref: [t, d], w_ref: [d, f], b_ref: [1, f], o_ref: [t, f]
    acc = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = (acc + b_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def smoke_triton(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """The smoke matmul through Pallas Triton (interpret mode on CPU)."""
    from jax.experimental.pallas import triton as plt

    t, d = x.shape
    f = w.shape[1]
    if any(s % 16 or s & (s - 1) for s in (t, d, f)):
        raise ValueError(f"shapes must be powers of two >= 16, got {x.shape=} {w.shape=}")
    return pl.pallas_call(
        _smoke_kernel,
        out_shape=jax.ShapeDtypeStruct((t, f), x.dtype),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=backend_lib.interpret_mode(),
        name="smoke_triton",
    )(x, w, b.reshape(1, f))


def smoke_mosaic_gpu(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """The smoke op through Pallas Mosaic GPU (``plgpu.kernel``; a real GPU only).

    Mosaic GPU runs the bias add: TMA copies of the XLA product and the bias into
    shared memory, a warpgroup add, a TMA store back. The tensor-core path is
    exercised by the real kernels.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if backend_lib.interpret_mode():
        raise ValueError("smoke_mosaic_gpu needs a GPU")
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)  # [t, f]
    bias = jnp.broadcast_to(b.astype(jnp.float32)[None, :], y.shape)  # [t, f]

    def body(y_gmem, b_gmem, o_gmem, y_smem, b_smem, o_smem, y_bar, b_bar):
        plgpu.copy_gmem_to_smem(y_gmem, y_smem, y_bar)
        plgpu.copy_gmem_to_smem(b_gmem, b_smem, b_bar)
        plgpu.barrier_wait(y_bar)
        plgpu.barrier_wait(b_bar)
        o_smem[...] = y_smem[...] + b_smem[...]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem)
        plgpu.wait_smem_to_gmem(0)

    add = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(y.shape, jnp.float32),
        scratch_types=[plgpu.SMEM(y.shape, jnp.float32)] * 3
        + [plgpu.Barrier(num_arrivals=1)] * 2,
    )
    return add(y, bias).astype(x.dtype)

"""``Linear``: ``y = x @ kernel (+ bias)`` with the kernel dense or stored in a sparse format.

The attention projections and the shared-expert MLP use it. The kernel is ``[in, out]`` (the
transpose of a Hugging Face ``weight``), a dense array or a weight of a registered format
(``pallas_kernels.format_registry``: 2:4 ``NMSparse``, ``SamoyedsSparse``, unstructured
``TiledSparse`` / ``TiledBitmap``), and ``pallas_kernels.linear_op`` computes the product: the
single-matmul kernels of the format, or XLA's dense GEMM (sparse weights expanded first, which
``Linear.implementation()`` says).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import linear_op
from pallas_kernels.format_registry import format_of
from samoyeds_jax.config import LinearConfig, LinearImplementation


def init_kernel(config: LinearConfig, key: jax.Array, shape: tuple[int, int], param_dtype: Any,
                kernel_init: Any) -> Any:
    """A kernel of dense ``shape`` [K, N]: drawn in ``config.format`` when it is sparse (the
    format's ``random``), else by ``kernel_init``; under abstract evaluation (``nnx.eval_shape``)
    always dense, the layout that real weights are loaded into before conversion."""
    if config.is_sparse and not isinstance(key, jax.core.Tracer):
        return config.random(key, shape, param_dtype)
    return kernel_init(key, shape, param_dtype)


def apply_kernel(x: jax.Array, w: Any, *, dtype: Any, implementation: LinearImplementation,
                 out_dtype: Any = None) -> jax.Array:
    """``x @ w`` by ``linear_op``, x and w in ``dtype`` (w's values cast when stored in another;
    a prepared kernel layout is in its compute dtype already), output ``out_dtype`` (default
    ``dtype``), float32 accumulation."""
    if w.dtype != dtype:
        w = format_of(w).astype(w, dtype)
    return linear_op.linear(x.astype(dtype), w, implementation=implementation,
                            out_dtype=out_dtype or dtype)


def replace_value(module: nnx.Module, name: str, value: Any) -> None:
    """Give ``module.name`` a new variable holding ``value`` (same type and metadata). The old
    variable is left as it was: a graph merged from this one's state (``nnx.merge``) shares
    it, and a layout change made here must not reach that graph."""
    var = getattr(module, name)
    if value is not var.get_value():
        setattr(module, name, var.replace(value))


def prepare_kernel(module: nnx.Module, name: str, implementation: LinearImplementation) -> str:
    """Put the kernel ``module.name`` in the layout of the linear implementation
    ``implementation`` resolves to for it (once, ``replace_value``); returns that
    implementation's name."""
    w = getattr(module, name).get_value()
    op = linear_op.resolve(implementation, w, prepared=False)
    replace_value(module, name, op.prepare(w))
    return op.name


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)``; params ``kernel [in, out]`` (dense or sparse) and ``bias
    [out]`` when ``use_bias``.

    Args:
      in_features, out_features: the kernel's dense shape.
      config: the storage format and implementation (``LinearConfig``); a sparse format draws
        the kernel in that format (``WeightFormat.random``), except under abstract evaluation
        (``nnx.eval_shape``), where the kernel keeps the dense layout that real weights are
        loaded into before conversion.
      use_bias: add a bias (zeros at init).
      kernel_init: the dense kernel's initializer.
      dtype: compute dtype (None: promote input and kernel); param_dtype: storage dtype.
    """

    def __init__(self, in_features: int, out_features: int, *,
                 config: LinearConfig = LinearConfig(), use_bias: bool = False,
                 kernel_init: Any = nnx.initializers.lecun_normal(), dtype: Any = None,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.kernel = nnx.Param(init_kernel(config, rngs.params(), (in_features, out_features),
                                            param_dtype, kernel_init))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def implementation(self) -> str:
        """The linear implementation that runs the stored kernel on this device, with what it
        does to it (``linear_op.describe``)."""
        w = self.kernel.get_value()
        return linear_op.describe(linear_op.resolve(self.config.implementation, w), w)

    def prepare(self, implementation: LinearImplementation = None) -> str:
        """Choose the implementation (default ``config.implementation``) and put the kernel in
        its layout once, in place; ``config.implementation`` becomes the chosen name. Returns
        ``implementation()``."""
        if implementation is None:
            implementation = self.config.implementation
        chosen = prepare_kernel(self, "kernel", implementation)
        self.config = self.config.replace(implementation=chosen)
        return self.implementation()

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] in the compute dtype (float32 accumulation)."""
        w = self.kernel.get_value()
        dtype = self.dtype or jnp.result_type(x.dtype, w.dtype)
        y = apply_kernel(x, w, dtype=dtype, implementation=self.config.implementation)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype).reshape((1,) * (y.ndim - 1) + (-1,))
        return y

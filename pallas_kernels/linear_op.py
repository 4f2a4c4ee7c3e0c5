"""The linear op: ``y = x @ W`` for one weight matrix, and the registry of its implementations.

x is [..., K] floating; W is [K, N], a dense array or a weight of a registered format
(``format_registry``); the product accumulates in float32 and comes out in ``out_dtype``
(default x.dtype).

``LinearOp``, this base, is the XLA implementation and the reference of every other: W cast to
x's dtype (sparse formats expanded to dense first, which ``describe`` says) and one ``jnp.dot``.
An implementation subclasses it and says where it runs (``supported_on``), which stored
weights it runs (``supports``) and what one-time layout conversion it wants (``prepare``, at
load):

=====================  ===============================================  ======================
name                   computes                                         runs
=====================  ===============================================  ======================
``xla``                ``jnp.dot``, sparse expanded (this module)       everywhere; every format
``triton``             Pallas Triton kernels (``linear_op_triton``)     GPU; 2:4, Samoyeds,
                                                                        unstructured
``mosaic_sparse_mma``  sparse tensor cores (``linear_op_mosaic``)       Hopper; 2:4, Samoyeds bf16
``mosaic_expand``      expanded in registers, dense wgmma               Hopper; 2:4, Samoyeds
=====================  ===============================================  ======================

``resolve(implementation, w)`` picks the op: ``implementation`` is a name, a sequence of names
(the first that applies), or None (the fastest that applies on this device:
``DEFAULT_ORDER``). ``linear(x, w)`` resolves and calls in one step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import op_registry
from pallas_kernels.checks import expect_kind
from pallas_kernels.format_registry import as_dense, format_name
from pallas_kernels.op_registry import Op, OpRegistry


@dataclasses.dataclass(frozen=True)
class LinearOp(Op):
    """The XLA implementation (see the module doc) and the interface of every other
    (``op_registry.Op``: ``supported_on``, ``supports``, ``prepares``, ``accepts``,
    ``expands`` of one weight)."""

    def prepare(self, w: Any) -> Any:
        """The weight in the layout it runs (once, at load). Here: unchanged."""
        if not self.prepares(w):
            raise ValueError(f"linear implementation {self.name!r} does not run "
                             f"{describe_weight(w)} in {jnp.dtype(w.dtype).name} "
                             f"({self.accepts()})")
        return w

    def __call__(self, x: jax.Array, w: Any, *, out_dtype: Any = None) -> jax.Array:
        """x [..., K] -> [..., N] in ``out_dtype`` (default x.dtype): ``check_inputs``, then
        ``compute`` on x's leading dims flattened into tokens."""
        out_dtype = check_inputs(x, w, out_dtype)
        lead = x.shape[:-1]
        compute = self.with_gradient(
            functools.partial(self.compute, out_dtype=out_dtype),
            functools.partial(LinearOp.compute, self, out_dtype=out_dtype))
        y = compute(x.reshape(-1, x.shape[-1]), w)
        return y.reshape(lead + y.shape[-1:])

    def compute(self, x: jax.Array, w: Any, out_dtype: jnp.dtype) -> jax.Array:
        """The computation on checked inputs, x [t, K] -> [t, N] (W cast to x.dtype, f32
        accumulation)."""
        rows = x.shape[0]
        if rows == 1 and jax.default_backend() == "gpu":
            # One token: XLA's GPU backend emits the vector-matrix product as a reduction
            # fusion at 21-42% of the copy rate; two rows take its GEMM path (H100, one
            # block's attention projections, benchmarks/decode_linears_h100.json: Mixtral
            # 73 -> 50 us, Qwen3-30B-A3B 66 -> 41 us). The zero row is cut off again.
            x = jnp.pad(x, ((0, 1), (0, 0)))
        # Straight to out_dtype: XLA's GEMMs accumulate bf16/f16 in f32 and round once.
        return jnp.dot(x, as_dense(w, x.dtype), preferred_element_type=out_dtype)[:rows]


def check_inputs(x: Any, w: Any, out_dtype: Any = None) -> jnp.dtype:
    """The output dtype (``out_dtype``, default x.dtype), after checking that x is a floating
    [..., K] array and w a weight [K, N] (an array, a format or a kernel layout); TypeError /
    ValueError name the argument, what was expected and what was given."""
    expect_kind("x", x, (jax.Array, np.ndarray), "an array [..., K]")
    if not (isinstance(w, (jax.Array, np.ndarray)) or hasattr(w, "to_dense")):
        raise TypeError(f"w must be a weight [K, N] (an array or a sparse weight), got "
                        f"{type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"w must be one matrix [K, N], got shape {tuple(w.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating, got {x.dtype}")
    k = w.shape[0]
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., K={k}] for w of shape {tuple(w.shape)}, got shape "
                         f"{tuple(x.shape)}")
    out = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"out_dtype must be floating, got {out}")
    return out


def describe_weight(w: Any) -> str:
    """The weight in words: ``"nm weight"``, ``"dense weight"``, ``"WgmmaSparseA weight"``."""
    return f"{format_name(w) or type(w).__name__} weight"


# ----------------------------------------------------------------------------- registry

# The automatic choice on a GPU, fastest first. Weights already in an op's layout (``prepare``)
# run on that op whatever the order; ``mosaic_expand`` is chosen by name only. Off a GPU the
# automatic choice is ``xla``.
DEFAULT_ORDER = ("mosaic_sparse_mma", "triton", "xla")
REGISTRY = OpRegistry("linear implementation", DEFAULT_ORDER,
                      ("linear_op_triton", "linear_op_mosaic"), describe_weight)
IMPLEMENTATIONS: dict[str, LinearOp] = REGISTRY.ops
Implementation = op_registry.Implementation

# The registry's lookups (``op_registry.OpRegistry`` documents them): ``register(op)`` (its name
# in ``DEFAULT_ORDER`` makes it an automatic choice), ``get_op(name)``,
# ``check_implementation(implementation)``, ``candidates(implementation, platform)``,
# ``implementation_names()``.
register = REGISTRY.register
get_op = REGISTRY.get_op
check_implementation = REGISTRY.check_implementation
candidates = REGISTRY.candidates
implementation_names = REGISTRY.implementation_names


def resolve(implementation: Implementation, w: Any, *, platform: str | None = None,
            prepared: bool = True) -> LinearOp:
    """The op that computes ``w``: the first of the ops ``implementation`` allows on
    ``platform`` that ``supports`` it as stored (``prepared=False``: that ``prepares`` it). A
    name asked for explicitly also runs off its platform where the kernels have an interpret
    mode (tests on CPU).

    Raises ValueError when none applies, naming what was asked, what the weight is and why
    each implementation refused.
    """
    return REGISTRY.resolve(implementation, w, platform=platform, prepared=prepared)


def describe(op: LinearOp, w: Any) -> str:
    """``op.name``, and what it does with ``w`` when it expands it or runs without a GPU."""
    return REGISTRY.describe(op, w)


def linear(x: jax.Array, w: Any, *, implementation: Implementation = None,
           out_dtype: Any = None) -> jax.Array:
    """``x @ W`` by the op ``resolve(implementation, w)`` picks (W as stored)."""
    return resolve(implementation, w)(x, w, out_dtype=out_dtype)


register(LinearOp())

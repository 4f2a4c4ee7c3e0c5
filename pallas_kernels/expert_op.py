"""The expert op: one MoE layer's routed SwiGLU experts, and the registry of its implementations.

``y[t] = sum_k p[t,k] W2_e(silu(x W1_e) * (x W3_e))`` for x [t, d], a ``RoutingPlan`` of the t
tokens, and expert stacks w1/w3 [e, d, f], w2 [e, f, d] (dense arrays or weights of a registered
format, ``format_registry``).

``ExpertOp``, this base, is the XLA implementation and the reference of every other: the plan's
rows gathered in expert order and three ``jax.lax.ragged_dot`` (sparse weights expanded to
dense first, which ``describe`` says). An implementation subclasses it and says where it runs
(``supported_on``), which stored weights it runs (``supports``), what one-time layout conversion
it wants (``prepare``, at load) and the plan's row tile (``block_t``):

==================  ==================================================  ==========================
name                computes                                            runs
==================  ==================================================  ==========================
``xla``             ragged_dot, sparse expanded (this module)           everywhere; every format
``all_experts``     every expert on every token, einsums (this module)  everywhere; every format
``triton``          routed-token Pallas kernels (``moe_matmul``)        GPU; dense, 2:4, Samoyeds
``mosaic_sparse_mma`` sparse tensor cores (``expert_op_mosaic``)        Hopper; 2:4, Samoyeds bf16
``mosaic_expand``   expanded in registers, dense wgmma                  Hopper; 2:4, Samoyeds
==================  ==================================================  ==========================

``resolve(implementation, w1, w3, w2)`` picks the op: ``implementation`` is a name, a sequence
of names (the first that applies), or None (the fastest that applies on this device:
``DEFAULT_ORDER``). Callers then build the plan with the row tile the op wants (``plan_for``)
and call ``op(x, plan, w1, w3, w2)`` (``samoyeds_jax.moe.expert_ffn`` does, for a ``Routing``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import expect_kind
from pallas_kernels import op_registry
from pallas_kernels.format_registry import as_dense, format_name as _format_name
from pallas_kernels.op_registry import Op, OpRegistry
from pallas_kernels.routing_plan import RoutingPlan


@dataclasses.dataclass(frozen=True)
class ExpertOp(Op):
    """The XLA implementation (see the module doc) and the interface of every other
    (``op_registry.Op``: ``supported_on``, ``supports``, ``prepares``, ``accepts``,
    ``expands`` of the three stacks)."""

    def prepare(self, w1: Any, w3: Any, w2: Any) -> tuple[Any, Any, Any]:
        """The weights in the layout it runs (once, at load). Here: unchanged."""
        if not self.supports(w1, w3, w2):
            raise ValueError(f"expert implementation {self.name!r} does not run "
                             f"{describe_weights(w1, w3, w2)}")
        return w1, w3, w2

    def block_t(self, num_tokens: int, top_k: int, num_experts: int) -> int:
        """Rows per plan tile it wants (1: no padding)."""
        del num_tokens, top_k, num_experts
        return 1

    def __call__(self, x: jax.Array, plan: RoutingPlan, w1: Any, w3: Any, w2: Any) -> jax.Array:
        """x [t, d] -> [t, d] in x.dtype: ``check_inputs``, then ``compute`` (differentiable:
        a kernel's gradient is the reference's, ``op_registry.with_reference_gradient``)."""
        check_inputs(x, plan, w1, w3, w2)
        return self.with_gradient(self.compute, ragged_dot_experts)(x, plan, w1, w3, w2)

    def compute(self, x: jax.Array, plan: RoutingPlan, w1: Any, w3: Any, w2: Any) -> jax.Array:
        """The computation on checked inputs (weights cast to x.dtype, f32 accumulation)."""
        return ragged_dot_experts(x, plan, w1, w3, w2)


def check_inputs(x: Any, plan: Any, w1: Any, w3: Any, w2: Any) -> None:
    """TypeError / ValueError unless x is a floating [t, d] array of the plan's t tokens and
    w1, w3 [e, d, f], w2 [e, f, d] are weights (arrays, formats or kernel layouts) of the plan's
    e experts; the message names the argument, what was expected and what was given."""
    expect_kind("plan", plan, RoutingPlan, "a RoutingPlan (RoutingPlan.build)")
    expect_kind("x", x, (jax.Array, np.ndarray), "an array [t, d]")
    if x.ndim != 2:
        raise ValueError(f"x must be [t, d], got shape {x.shape}")
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the plan was built for "
                         f"{plan.num_tokens}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating, got {x.dtype}")
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        if not (isinstance(w, (jax.Array, np.ndarray)) or hasattr(w, "to_dense")):
            raise TypeError(f"{name} must be an expert stack [e, K, N] (an array or a sparse "
                            f"weight), got {type(w).__name__}")
    d, e = x.shape[1], plan.num_experts
    s1, s3, s2 = (tuple(w.shape) for w in (w1, w3, w2))
    if len(s1) != 3 or s1[0] != e or s1[1] != d:
        raise ValueError(f"w1 must be [e={e}, d={d}, f], got {s1}")
    f = s1[2]
    if s3 != s1:
        raise ValueError(f"w3 must be [e={e}, d={d}, f={f}] like w1, got {s3}")
    if s2 != (e, f, d):
        raise ValueError(f"w2 must be [e={e}, f={f}, d={d}], got {s2}")


def describe_weights(w1: Any, w3: Any, w2: Any) -> str:
    """The expert stacks in words: ``"nm experts"``, or each one's kind when they differ."""
    names = [_format_name(w) or type(w).__name__ for w in (w1, w3, w2)]
    return (f"{names[0]} experts" if len(set(names)) == 1
            else f"experts of mixed kinds (w1 {names[0]}, w3 {names[1]}, w2 {names[2]})")


def ragged_dot_experts(x: jax.Array, plan: RoutingPlan, w1: Any, w3: Any, w2: Any) -> jax.Array:
    """The XLA computation: the plan's valid rows in expert order, three ``ragged_dot``."""
    t, d = x.shape
    n = plan.sentinel  # t*k assignments
    if plan.block_t == 1:  # no padding: the plan's rows are the assignments in expert order
        ids, p = plan.sorted_ids[:n], plan.weights[:n]
    else:  # drop the padding rows, keeping the order
        valid = plan.row_valid()
        dest = jnp.where(valid, jnp.cumsum(valid) - 1, n)
        ids = jnp.full((n,), n, jnp.int32).at[dest].set(plan.sorted_ids, mode="drop")
        p = jnp.zeros((n,), jnp.float32).at[dest].set(plan.weights, mode="drop")
    xs = x[jnp.minimum(ids // plan.top_k, t - 1)]  # [t*k, d]
    sizes = plan.group_sizes
    w1d, w3d, w2d = (as_dense(w, x.dtype) for w in (w1, w3, w2))
    g = jax.lax.ragged_dot(xs, w1d, sizes, preferred_element_type=jnp.float32)
    u = jax.lax.ragged_dot(xs, w3d, sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jax.lax.ragged_dot(h, w2d, sizes, preferred_element_type=jnp.float32)
    y = y * p[:, None].astype(jnp.float32)
    # Each assignment's row back to its (token, slot) position; a sum over k (no scatter-add).
    out = jnp.zeros((n, d), jnp.float32).at[ids].set(y, mode="drop", unique_indices=True)
    return out.reshape(t, plan.top_k, d).sum(axis=1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class AllExperts(ExpertOp):
    """Every expert on every token, weighted by its combine weight (zero off the top-k): e/k
    times the work of ``xla``, but plain einsums, which train faster than ``ragged_dot`` on a
    CPU for small models. Same result and gradients as ``xla``."""

    name: ClassVar[str] = "all_experts"

    def compute(self, x, plan, w1, w3, w2):
        t = x.shape[0]
        e = plan.num_experts
        w1d, w3d, w2d = (as_dense(w, x.dtype) for w in (w1, w3, w2))
        row_expert = jnp.repeat(plan.block_expert, plan.block_t)  # [P]
        # combine[t, e]: padding rows carry token t (dropped) and expert e (dropped).
        combine = jnp.zeros((t + 1, e + 1), jnp.float32).at[
            plan.token_ids(), row_expert].add(plan.weights)[:t, :e]
        gate = jnp.einsum("td,edf->etf", x, w1d, preferred_element_type=jnp.float32)
        up = jnp.einsum("td,edf->etf", x, w3d, preferred_element_type=jnp.float32)
        h = (jax.nn.silu(gate) * up).astype(x.dtype)  # [e, t, f]
        out = jnp.einsum("etf,efd->etd", h, w2d, preferred_element_type=jnp.float32)
        return jnp.einsum("etd,te->td", out, combine).astype(x.dtype)


# ----------------------------------------------------------------------------- registry

# The automatic choice on a GPU, fastest first (benchmarks/moe.md). Weights already in an op's
# layout (``prepare``) run on that op whatever the order. ``mosaic_expand``
# and ``all_experts`` are chosen by name only. Off a GPU the automatic choice is ``xla``.
DEFAULT_ORDER = ("mosaic_sparse_mma", "triton", "xla")
REGISTRY = OpRegistry("expert implementation", DEFAULT_ORDER,
                      ("expert_op_triton", "expert_op_mosaic"), describe_weights)
IMPLEMENTATIONS: dict[str, ExpertOp] = REGISTRY.ops
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


def resolve(implementation: Implementation, w1: Any, w3: Any, w2: Any, *,
            platform: str | None = None, prepared: bool = True) -> ExpertOp:
    """The op that computes these weights: the first of ``candidates`` that ``supports`` them
    as stored (``prepared=False``: that ``prepares`` them). A name asked for explicitly also
    runs off its platform where the kernels have an interpret mode (tests on CPU).

    Raises ValueError when none applies, naming what was asked and what the weights are.
    """
    return REGISTRY.resolve(implementation, w1, w3, w2, platform=platform, prepared=prepared)


def describe(op: ExpertOp, w1: Any, w3: Any, w2: Any) -> str:
    """``op.name``, and what it does with these weights when it expands them or runs without a
    GPU."""
    return REGISTRY.describe(op, w1, w3, w2)


def plan_for(op: ExpertOp, topk_idx: jax.Array, topk_weights: jax.Array, *,
             num_experts: int) -> RoutingPlan:
    """The ``RoutingPlan`` of a routing with the row tile ``op`` wants."""
    t, k = topk_idx.shape
    return RoutingPlan.build(topk_idx, topk_weights, num_experts=num_experts,
                             block_t=op.block_t(t, k, num_experts))


register(ExpertOp())
register(AllExperts())

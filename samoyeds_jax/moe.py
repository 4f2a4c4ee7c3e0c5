"""Drop-in Flax NNX Mixture-of-Experts layer with a pre-gating router.

``MoE`` replaces a dense FFN (or an existing MoE) in a transformer block::

    moe = MoE(MoEConfig(d_model=64, d_ff=128, num_experts=8, top_k=2), rngs=nnx.Rngs(0))
    y, next_routing = moe(x)                        # x [..., d] -> y [..., d]

Each routed expert is a SwiGLU MLP ``W2_e (silu(x W1_e) * (x W3_e))`` with weights stacked
``w1/w3 [e, d, f]`` and ``w2 [e, f, d]`` (Mixtral names). The layer output for token t is
``y[t] = sum_k p[t, k] * expert_{idx[t, k]}(x[t]) + shared(x[t])``.

Pre-gating (``MoEConfig.pregate``): block i's pre-gate, applied to block i's input, routes
block i+1. ``__call__`` returns that routing as ``next_routing``; pass it to block i+1:

* ``"standard"``: own gate; no pre-gate; ``next_routing`` is None; ``routing`` must be None.
* ``"pregated"``: the received ``routing`` is used; only block 0 (``block_index=0``) may be
  called without one (it routes with its own gate). The last block has no pre-gate.
* ``"speculative"``: own gate decides; the received ``routing`` is only compared with it
  (``recall()``); the pre-gate predicts the next block's experts for prefetching.

Every block keeps its own gate (the pretrained router) so recall of the received routing
can be measured in every mode; ``track_recall=False`` skips that bookkeeping.

The experts are computed by one op, ``pallas_kernels.expert_op``, whose implementation
``MoEConfig.implementation`` names (or the fastest that applies); ``MoE.prepare()`` puts the
weights in the layout of the chosen one once, and ``MoE.implementation()`` says which runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import expert_op, linear_op
from pallas_kernels.checks import are_arrays, expect_kind, expect_positive_ints
from pallas_kernels.format_registry import get_format
from samoyeds_jax.config import (ExpertImplementation, LinearConfig, MoEConfig, RouterNorm,
                                 SharedGate, SparsityConfig, check_literal)
from samoyeds_jax.linear import apply_kernel, init_kernel, prepare_kernel, replace_value
from samoyeds_jax.routing import (RecallCounts, Routing, check_top_k, recall_counts,
                                  route_logits)

Dtype = Any

# y = x @ W with W [in, out]: scale by fan-in (routed experts: ``WeightFormat.random``).
_linear_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


# ----------------------------------------------------------------------------- expert weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """Stacked routed-expert weights: dense arrays or sparse format pytrees with leading e.

    Attributes:
      w1: gate projection [e, d, f].  w3: up projection [e, d, f].  w2: down projection [e, f, d].
    The leading dim may be a number of cache slots instead of e (routing then holds slots).
    """

    w1: Any
    w3: Any
    w2: Any

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def check(self, d_model: int) -> None:
        """ValueError unless w1/w3 are [e, d_model, f] and w2 is [e, f, d_model] (TypeError for
        something that is not a weight)."""
        for name in ("w1", "w3", "w2"):
            w = getattr(self, name)
            if not (are_arrays(w) or hasattr(w, "to_dense")):
                raise TypeError(f"experts.{name} must be an array or a sparse weight format, "
                                f"got {type(w).__name__}")
        s1, s3, s2 = (tuple(w.shape) for w in (self.w1, self.w3, self.w2))
        if len(s1) != 3 or s1[1] != d_model or s3 != s1:
            raise ValueError(f"w1 and w3 must both be [e, d_model={d_model}, f], got {s1} and {s3}")
        if s2 != (s1[0], s1[2], d_model):
            raise ValueError(f"w2 must be [e={s1[0]}, f={s1[2]}, d_model={d_model}], got {s2}")


# ----------------------------------------------------------------------------- expert math


def expert_ffn(x: jax.Array, routing: Routing, experts: ExpertWeights, *,
               implementation: ExpertImplementation = None, dtype: Dtype) -> jax.Array:
    """The routed SwiGLU experts on a routing: x [t, d] -> [t, d] ``dtype``.

    The op ``pallas_kernels.expert_op.resolve`` picks for ``implementation`` and the stored
    weights runs on the ``RoutingPlan`` of ``routing`` with the row tile it wants.
    """
    op = expert_op.resolve(implementation, experts.w1, experts.w3, experts.w2)
    if x.shape[0] == 0:  # no tokens: nothing to route (kernels need at least one row)
        return jnp.zeros(x.shape, dtype)
    plan = expert_op.plan_for(op, routing.topk_idx, routing.topk_weights,
                              num_experts=experts.num_experts)
    return op(x.astype(dtype), plan, experts.w1, experts.w3, experts.w2).astype(dtype)


# ----------------------------------------------------------------------------- modules


class Router(nnx.Module):
    """Linear gate d -> e followed by top-k: ``Routing`` of each token.

    Param ``kernel [d, e]`` (y = x @ W). Logits are accumulated in float32.
    """

    def __init__(self, d_model: int, num_experts: int, *, top_k: int,
                 norm: RouterNorm = "topk_softmax", dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_top_k(top_k, num_experts)
        expect_positive_ints("Router", d_model=d_model, num_experts=num_experts)
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm = norm
        self.dtype = dtype
        self.kernel = nnx.Param(_linear_init(rngs.params(), (d_model, num_experts), param_dtype))

    def logits(self, x: jax.Array) -> jax.Array:
        """x [t, d] -> logits [t, e] float32."""
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        # linear_op's dense product (its one-token GPU path included), float32 accumulation.
        return linear_op.linear(x.astype(dtype), kernel.astype(dtype), implementation="xla",
                                out_dtype=jnp.float32)

    def __call__(self, x: jax.Array, *, top_k: int | None = None) -> Routing:
        """x [t, d] -> ``Routing`` with ``topk_idx [t, k]``, ``topk_weights [t, k]``, ``logits [t, e]``.

        ``top_k`` overrides k (e.g. a wider prefetch set from a pre-gate): an int in
        ``[1, num_experts]``; None keeps the router's k.
        """
        k = self.top_k if top_k is None else top_k
        return route_logits(self.logits(x), top_k=k, norm=self.norm)


class PreGatedRouter(Router):
    """Block i's pre-gate: a ``Router`` over block i+1's experts, applied to block i's input.

    Same parameters as ``Router``. ``load_from(next_gate)`` copies the next block's gate, the
    starting point for the speculative mode and for pre-gate training.
    """

    def load_from(self, gate: Router) -> None:
        """Copy ``gate``'s kernel (shape [d, e] must match) into this pre-gate."""
        src, dst = gate.kernel[...], self.kernel[...]
        if src.shape != dst.shape:
            raise ValueError(f"gate kernel shape {src.shape} != pre-gate kernel shape {dst.shape}")
        self.kernel[...] = src.astype(dst.dtype)


class SharedExperts(nnx.Module):
    """Always-on SwiGLU experts fused into one MLP of width s, with an optional sigmoid gate.

    Params ``w1/w3 [d, s]``, ``w2 [s, d]`` (dense, or in the sparse format of ``linear``,
    computed by ``pallas_kernels.linear_op``) and, for ``gate="sigmoid"`` (Qwen2-MoE),
    ``gate_kernel [d, 1]`` (dense): ``y = sigmoid(x @ gate_kernel) * mlp(x)``.
    """

    def __init__(self, d_model: int, width: int, *, gate: str = "none",
                 linear: LinearConfig = LinearConfig(), dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        expect_positive_ints("SharedExperts", d_model=d_model, width=width)
        check_literal("gate", gate, SharedGate)
        self.dtype = dtype
        self.linear = linear
        self.w1 = nnx.Param(init_kernel(linear, rngs.params(), (d_model, width), param_dtype,
                                        _linear_init))
        self.w3 = nnx.Param(init_kernel(linear, rngs.params(), (d_model, width), param_dtype,
                                        _linear_init))
        self.w2 = nnx.Param(init_kernel(linear, rngs.params(), (width, d_model), param_dtype,
                                        _linear_init))
        self.gate_kernel = (nnx.Param(_linear_init(rngs.params(), (d_model, 1), param_dtype))
                            if gate == "sigmoid" else None)

    def prepare(self, implementation: Any = None) -> None:
        """``Linear.prepare`` for w1/w3/w2: the linear implementation (default
        ``linear.implementation``) chosen and the weights put in its layout once, in place."""
        if implementation is None:
            implementation = self.linear.implementation
        chosen = [prepare_kernel(self, name, implementation) for name in ("w1", "w3", "w2")]
        self.linear = self.linear.replace(implementation=chosen[0])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [t, d] -> [t, d] in the compute dtype."""
        dtype = self.dtype or jnp.result_type(x.dtype, self.w1.get_value().dtype)
        x = x.astype(dtype)
        impl = self.linear.implementation

        def dot(a, w, out=jnp.float32):
            return apply_kernel(a, w, dtype=dtype, implementation=impl, out_dtype=out)

        h = jax.nn.silu(dot(x, self.w1.get_value())) * dot(x, self.w3.get_value())
        y = dot(h.astype(dtype), self.w2.get_value())  # [t, d] f32
        if self.gate_kernel is not None:
            g = jnp.dot(x, self.gate_kernel[...].astype(dtype), preferred_element_type=jnp.float32)
            y = y * jax.nn.sigmoid(g)  # [t, 1]
        return y.astype(dtype)


class RecallStats(nnx.Variable):
    """Running ``RecallCounts`` of the routing a block received vs its own gate."""


class MoE(nnx.Module):
    """Mixture-of-Experts FFN block with a router and an optional pre-gate.

    Args:
      config: ``MoEConfig``.
      block_index: position of this block among the model's MoE blocks (0-based).
      num_blocks: number of MoE blocks in the model. The last one has no pre-gate; in
        ``"pregated"`` mode only block 0 routes with its own gate.
      linear: how the shared experts' matrices are stored (``LinearConfig``; dense default).
      dtype: compute dtype (None: promote input and params). param_dtype: storage dtype.
        For inference keep them equal (e.g. both bfloat16): otherwise the expert stacks are
        cast on every call, an extra pass over all weights.
      track_recall: accumulate ``RecallStats`` whenever a routing is received.
      rngs: keyword-only ``nnx.Rngs`` for initialization.

    Params: ``gate.kernel [d, e]``, ``pregate.kernel [d, e]`` (if any), ``w1/w3 [e, d, f]``,
    ``w2 [e, f, d]`` (dense arrays, or sparse format pytrees drawn in a sparse ``expert_format``
    by ``WeightFormat.random``), ``shared.*`` (if ``num_shared_experts > 0``).
    """

    def __init__(self, config: MoEConfig, *, block_index: int = 0, num_blocks: int = 1,
                 linear: LinearConfig = LinearConfig(), dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, track_recall: bool = True, rngs: nnx.Rngs):
        expect_kind("config", config, MoEConfig, "a MoEConfig")
        if not 0 <= block_index < num_blocks:
            raise ValueError(f"need 0 <= block_index < num_blocks, got {block_index=}, {num_blocks=}")
        self.config = config
        self.block_index = block_index
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.track_recall = track_recall
        self.capture_inputs = False  # set by pregate.collect_moe_inputs
        c = config
        router = functools.partial(Router, c.d_model, c.num_experts, top_k=c.top_k,
                                   norm=c.router_norm, dtype=dtype, param_dtype=param_dtype)
        self.gate = router(rngs=rngs)
        has_pregate = c.pregate != "standard" and block_index < num_blocks - 1
        self.pregate = (PreGatedRouter(c.d_model, c.num_experts, top_k=c.top_k, norm=c.router_norm,
                                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                        if has_pregate else None)
        e, d, f = c.num_experts, c.d_model, c.d_ff
        keys = [rngs.params() for _ in range(3)]
        # Under abstract evaluation (nnx.eval_shape) the experts keep the dense layout that
        # real weights are loaded into (then ``sparsify()``); else they are drawn in the format.
        fmt = "dense" if isinstance(keys[0], jax.core.Tracer) else c.expert_format
        draw = functools.partial(get_format(fmt).random, dtype=param_dtype,
                                 **c.sparsity.format_params(fmt))
        self.w1 = nnx.Param(draw(keys[0], (e, d, f)))
        self.w3 = nnx.Param(draw(keys[1], (e, d, f)))
        self.w2 = nnx.Param(draw(keys[2], (e, f, d)))
        self.shared = (SharedExperts(d, c.shared_width, gate=c.shared_gate, linear=linear,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                       if c.num_shared_experts else None)
        self.recall_stats = RecallStats(RecallCounts.zeros())
        # Set by ``samoyeds_jax.parallel.use_expert_parallel``: routed experts split over devices.
        self.expert_parallel = None

    # -- weights

    def expert_weights(self) -> ExpertWeights:
        """The stacked routed-expert weights as stored (dense or sparse format pytrees)."""
        return ExpertWeights(self.w1.get_value(), self.w3.get_value(), self.w2.get_value())

    def sparsify(self, *, method: str = "magnitude", calibration: jax.Array | None = None):
        """Prune the routed experts and store them in ``config.expert_format``, in place.

        Uses ``samoyeds_jax.pruning.prune_experts`` with ``config.sparsity``'s pattern.
        ``method``: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"`` (the last two need
        ``calibration``: this block's inputs [t, d], or per-expert routed inputs [e, t, d]).
        Returns the ``prune_report.PruneReport`` (None when the format is dense or the weights
        are already stored sparse). A whole model is pruned best with
        ``samoyeds_jax.compress.calibrate_and_prune`` (routing-aware, block by block).
        """
        fmt = self.config.expert_format
        if get_format(fmt).classes == () or hasattr(self.w1.get_value(), "to_dense"):
            return None
        from samoyeds_jax import pruning

        prune_config = pruning.PruneConfig(format=fmt, method=method,
                                           **self.config.sparsity.format_params(fmt))
        w = self.expert_weights()
        params = {"experts": {"w1": w.w1, "w3": w.w3, "w2": w.w2}}
        calib = None if calibration is None else {"experts": calibration}
        converted, report = pruning.prune_experts(params, prune_config, calib, progress=False)
        for name in ("w1", "w3", "w2"):
            replace_value(self, name, converted["experts"][name])  # as in prepare
        return report

    def implementation(self) -> str:
        """The expert implementation that runs the stored weights on this device, with what it
        does to them when it expands a sparse format to dense (``expert_op.describe``)."""
        w = self.expert_weights()
        op = expert_op.resolve(self.config.implementation, w.w1, w.w3, w.w2)
        return expert_op.describe(op, w.w1, w.w3, w.w2)

    def prepare(self, implementation: ExpertImplementation = None) -> str:
        """Choose the expert implementation (``implementation``, default
        ``config.implementation``: a name, a sequence, or None for the fastest that applies) and
        put the experts in its layout once, in place (e.g. the Hopper sparse-tensor-core layout
        for ``mosaic_sparse_mma``). ``config.implementation`` becomes the chosen name. Returns
        ``implementation()``."""
        if implementation is None:
            implementation = self.config.implementation
        w = self.expert_weights()
        op = expert_op.resolve(implementation, w.w1, w.w3, w.w2, prepared=False)
        for name, value in zip(("w1", "w3", "w2"), op.prepare(w.w1, w.w3, w.w2)):
            replace_value(self, name, value)  # a merged copy's variables stay as they were
        self.config = self.config.replace(implementation=op.name)
        return self.implementation()

    def to_format(self, expert_format: str, *, sparsity: SparsityConfig | None = None,
                  method: str = "magnitude", calibration: jax.Array | None = None):
        """Convert dense experts to ``expert_format`` (updates ``config``), in place.

        ``sparsity`` defaults to the current ``config.sparsity``; the new config is validated
        (e.g. d_ff must suit the format). Returns the ``prune_report.PruneReport`` (None for
        dense).
        """
        if hasattr(self.w1.get_value(), "to_dense"):
            raise ValueError(
                f"experts are already stored as {type(self.w1.get_value()).__name__}; "
                "to_format converts dense experts only")
        self.config = self.config.replace(expert_format=expert_format,
                                          sparsity=sparsity or self.config.sparsity)
        return self.sparsify(method=method, calibration=calibration)

    # -- routing

    def route(self, x: jax.Array) -> Routing:
        """Own gate's routing of x [..., d] (tokens flattened: ``Routing`` of [t, k])."""
        return self.gate(x.reshape(-1, x.shape[-1]))

    def predict_next(self, x: jax.Array, *, top_k: int | None = None) -> Routing | None:
        """The pre-gate's routing of the next block from this block's input (None if none).

        ``top_k`` > k predicts a wider set, e.g. for prefetching more experts than are used.
        """
        if self.pregate is None:
            return None
        return self.pregate(x.reshape(-1, x.shape[-1]), top_k=top_k)

    def select_routing(self, x: jax.Array, routing: Routing | None = None) -> Routing:
        """The routing this block computes with, given the received ``routing`` (see module doc).

        Also accumulates ``recall_stats`` when a routing is received and ``track_recall``.
        """
        mode = self.config.pregate
        self._check_input(x)
        t = x.size // x.shape[-1]
        if routing is not None:
            expect_kind("routing", routing, Routing, "a Routing")
            routing.check_num_tokens(t).check(self.config.num_experts)
        if mode == "standard":
            if routing is not None:
                raise ValueError(
                    "pregate='standard' routes with the block's own gate; got a routing. Use "
                    "apply_experts(x, routing) to run the experts on a given routing")
            return self.route(x)
        if routing is None:
            if mode == "pregated" and self.block_index > 0:
                raise ValueError(
                    f"pregate='pregated': block {self.block_index} needs the routing from block "
                    f"{self.block_index - 1}'s pre-gate; got routing=None (only block 0 routes itself)")
            return self.route(x)
        if mode == "speculative" or self.track_recall:
            own = self.route(x)
            if self.track_recall:
                counts = recall_counts(routing, own, self.config.num_experts)
                self.recall_stats.set_value(self.recall_stats.get_value() + counts)
            if mode == "speculative":
                return own
        return routing

    def recall(self) -> dict[str, float]:
        """Recall/precision of the routings this block received (from the previous block's
        pre-gate) against its own gate, accumulated since the last ``reset_recall``."""
        return self.recall_stats.get_value().ratios()

    def reset_recall(self) -> None:
        self.recall_stats.set_value(RecallCounts.zeros())

    # -- compute

    def _check_input(self, x: jax.Array) -> None:
        if not are_arrays(x):
            raise TypeError(f"input x must be an array [..., d_model], got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"input x must be floating, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"input must be [..., d_model={self.config.d_model}], got shape {x.shape}")

    def routed_experts(self, x: jax.Array, routing: Routing, experts: ExpertWeights,
                       *, dtype: Dtype) -> jax.Array:
        """The routed experts alone: x [t, d] -> [t, d] ``dtype``, on this device or split over a
        mesh axis when ``expert_parallel`` is set (``samoyeds_jax.parallel``)."""
        if self.expert_parallel is not None:
            return self.expert_parallel.ffn(x, routing, experts,
                                            implementation=self.config.implementation, dtype=dtype)
        return expert_ffn(x, routing, experts, implementation=self.config.implementation,
                          dtype=dtype)

    def apply_experts(self, x: jax.Array, routing: Routing,
                      experts: ExpertWeights | tuple | None = None) -> jax.Array:
        """Routed experts (+ shared experts) on a given routing: x [..., d] -> [..., d].

        ``experts`` overrides the stored routed-expert weights (``ExpertWeights`` or a tuple
        ``(w1, w3, w2)``), e.g. cache-slot stacks with ``routing`` remapped to slots.
        ``routing``'s ids must index ``experts`` and its weights be finite: checked eagerly when
        concrete; under ``jit`` only inside ``pallas_kernels.checks.checked``, else an
        out-of-range id contributes nothing.
        """
        if experts is None:
            experts = self.expert_weights()
        else:
            if isinstance(experts, tuple) and len(experts) == 3:
                experts = ExpertWeights(*experts)
            expect_kind("experts", experts, ExpertWeights, "ExpertWeights or a tuple (w1, w3, w2)")
            experts.check(self.config.d_model)
        self._check_input(x)
        expect_kind("routing", routing, Routing, "a Routing")
        routing.check_num_tokens(x.size // x.shape[-1]).check(experts.num_experts)
        return self._apply(x, routing, experts)

    def _apply(self, x: jax.Array, routing: Routing, experts: ExpertWeights) -> jax.Array:
        lead, d = x.shape[:-1], x.shape[-1]
        xt = x.reshape(-1, d)  # [t, d]
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        y = self.routed_experts(xt, routing, experts, dtype=dtype)
        if self.shared is not None:
            y = y + self.shared(xt).astype(dtype)
        return y.reshape(*lead, d)

    def __call__(self, x: jax.Array, *, routing: Routing | None = None,
                 return_gate_logits: bool = False):
        """x [..., d] -> (y [..., d], next_routing for block i+1 or None).

        ``routing``: the previous block's ``next_routing`` (see the module doc for each mode).
        ``return_gate_logits``: also return this block's own gate logits [t, e] float32 (for
        the load-balancing loss and pre-gate metrics), whatever routing the block used:
        ``(y, next_routing, gate_logits)``.
        """
        if self.capture_inputs:  # hidden states for pre-gate training
            self.sow(nnx.Intermediate, "inputs", x.reshape(-1, x.shape[-1]))
        used = self.select_routing(x, routing)  # checks the input and a received routing
        y = self._apply(x, used, self.expert_weights())
        next_routing = self.predict_next(x)
        if not return_gate_logits:
            return y, next_routing
        own = used if routing is None or self.config.pregate != "pregated" else self.route(x)
        return y, next_routing, own.logits


def moe_linen(config: MoEConfig, **kwargs):
    """A Flax Linen module wrapping ``MoE`` (via ``flax.nnx.bridge.to_linen``).

    ``kwargs`` go to ``MoE`` (``block_index``, ``dtype``, ...). Use as any Linen module::

        layer = moe_linen(config)
        variables = layer.init(jax.random.key(0), x)
        y, next_routing = layer.apply(variables, x)

    Parameters live in the ``"params"`` collection. Recall of a received routing is kept
    in the ``"RecallStats"`` collection: ``layer.apply(..., routing=r, mutable=["RecallStats"])``
    returns it (without ``mutable`` the update is dropped).
    """
    return nnx.bridge.to_linen(MoE, config, **kwargs)

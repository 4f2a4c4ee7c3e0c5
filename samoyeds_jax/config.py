"""Small frozen configs for the MoE layer: one dataclass per concern, validated on construction.

``MoEConfig`` holds the shape of one MoE block (d, f, e, k), how router scores become
routing weights, the optional shared experts, how expert weights are stored
(``SparsityConfig``), which implementation computes the experts, and the pre-gating mode.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import expect_ints, expect_kind, expect_number, expect_positive_ints
from pallas_kernels import linear_op
from pallas_kernels.expert_op import check_implementation
from pallas_kernels.format_registry import format_names, get_format

FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
"""The floating dtypes a model's parameters and activations may have, by their names in a
``config.json`` (``torch_dtype``) or a ``dtype=`` argument."""

RouterNorm = Literal["softmax_topk", "topk_softmax"]
"""How router logits [t, e] become top-k weights [t, k].

* ``"softmax_topk"``: softmax over all e experts, keep the k largest probabilities, no
  renormalization (weights sum to <= 1). Qwen2-MoE / Qwen1.5-MoE (``norm_topk_prob=False``),
  DeepSeek-MoE, Switch Transformer.
* ``"topk_softmax"``: take the k largest logits, softmax over those k (weights sum to 1).
  Identical to softmax-then-top-k-then-renormalize: Mixtral / mistral-inference, OLMoE-style
  renormalized routers, Qwen3-MoE (``norm_topk_prob=True``).
"""

ExpertFormat = Literal["dense", "nm", "samoyeds", "unstructured"]
"""How the expert weight stacks are stored: dense arrays, N:M along K (``NMSparse``),
vector-wise N:M:V + 2:4 (``SamoyedsSparse``), or tiled unstructured sparsity. For typing only:
``MoEConfig`` accepts any name of ``pallas_kernels.format_registry.FORMATS`` (a test keeps this
alias equal to the built-in ones)."""

ExpertImplementation = str | tuple[str, ...] | None
"""Which implementation computes the routed experts (``pallas_kernels.expert_op``): a name
(``"xla"``, ``"all_experts"``, ``"triton"``, ``"mosaic_sparse_mma"``, ``"mosaic_expand"``), a
sequence of names (the first that runs the weights), or None: the fastest that applies on this
device (``expert_op.DEFAULT_ORDER`` on a GPU, ``"xla"`` elsewhere). A runtime choice: it is not
stored with a model. ``MoE.implementation()`` says which one runs."""

PregateMode = Literal["standard", "pregated", "speculative"]
"""* ``"standard"``: each block's own gate routes; no pre-gate.
* ``"pregated"``: block i's pre-gate (applied to block i's input) routes block i+1; the
  first MoE block also has its own gate; the last has no pre-gate (Pre-gated MoE, ISCA'24).
* ``"speculative"``: each block's own gate routes; block i's pre-gate only predicts block
  i+1's experts (for prefetching), so any pretrained model works unchanged."""

SharedGate = Literal["none", "sigmoid"]
"""Shared-expert output scaling: ``"none"`` (DeepSeek-MoE) or ``sigmoid(x @ w_gate)`` per token
(Qwen2-MoE's ``shared_expert_gate``)."""

_NM_SUPPORTED = ((2, 4), (1, 4), (2, 8), (4, 8))


def check_literal(name: str, value: object, literal: object) -> None:
    """ValueError unless ``value`` is one of the values of the ``Literal`` type ``literal``."""
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityConfig:
    """Parameters of the sparse expert formats (ignored for ``expert_format="dense"``).

    Attributes:
      n, m: N:M along the reduction dim for the ``"nm"`` format (keep n of every m rows).
      n_sel, m_sel, v: vector-wise selection for ``"samoyeds"``: in every v-row K slab keep
        n_sel of every m_sel output columns, then 2:4 along K inside the kept columns.
      density: fraction of weights kept for ``"unstructured"``.
    """

    n: int = 2
    m: int = 4
    n_sel: int = 1
    m_sel: int = 2
    v: int = 128
    density: float = 0.3

    def __post_init__(self) -> None:
        expect_positive_ints("SparsityConfig", n=self.n, m=self.m)
        if (self.n, self.m) not in _NM_SUPPORTED:
            raise ValueError(f"(n, m) must be one of {_NM_SUPPORTED}, got {(self.n, self.m)}")
        expect_positive_ints("SparsityConfig", n_sel=self.n_sel, m_sel=self.m_sel, v=self.v)
        expect_number("SparsityConfig", "density", self.density)
        if not 0 < self.n_sel < self.m_sel:
            raise ValueError(f"need 0 < n_sel < m_sel, got {self.n_sel=}, {self.m_sel=}")
        if self.v <= 0 or self.v % 32:
            raise ValueError(f"v must be a positive multiple of 32, got {self.v=}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density=}")

    @property
    def sparsity(self) -> float:
        """Fraction of weights zeroed for ``"unstructured"``: 1 - density."""
        return 1.0 - self.density

    def format_params(self, fmt: ExpertFormat) -> dict:
        """The parameters of format ``fmt`` (``format_registry``) this config sets."""
        return get_format(fmt).params_of(self)

    def check_weight(self, fmt: ExpertFormat, k: int, n: int, what: str) -> None:
        """Raise ValueError if a [k, n] weight (y = x @ W) cannot be stored in ``fmt``."""
        try:
            get_format(fmt).check_shape(k, n, **self.format_params(fmt))
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None


LinearImplementation = str | tuple[str, ...] | None
"""Which implementation computes a non-expert linear (``pallas_kernels.linear_op``): a name
(``"xla"``, ``"triton"``, ``"mosaic_sparse_mma"``, ``"mosaic_expand"``), a sequence of names, or
None: the fastest that applies on this device. A runtime choice: it is not stored with a model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearConfig:
    """How the non-expert linears are stored: the attention projections (q, k, v, o) and the
    shared-expert MLP (w1, w3, w2). Flash-LLM prunes every weight; at decode such a matmul is
    bound by the bytes of its weight, which a sparse format cuts.

    Attributes:
      format: a format name of ``pallas_kernels.format_registry`` ("dense", "nm",
        "samoyeds", "unstructured"); ``sparsity`` holds its parameters.
      implementation: see ``LinearImplementation``.
    """

    format: str = "dense"
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)
    implementation: LinearImplementation = None

    def __post_init__(self) -> None:
        if self.format not in format_names():
            raise ValueError(f"linear format must be one of {format_names()}, got "
                             f"{self.format!r}")
        expect_kind("sparsity", self.sparsity, SparsityConfig, "a SparsityConfig")
        if isinstance(self.implementation, list):
            object.__setattr__(self, "implementation", tuple(self.implementation))
        linear_op.check_implementation(self.implementation)

    @property
    def is_sparse(self) -> bool:
        """Whether the format stores the weights compressed (any format but dense)."""
        return bool(get_format(self.format).classes)

    def check_weight(self, k: int, n: int, what: str) -> None:
        """Raise ValueError if a [k, n] weight cannot be stored in ``format``."""
        self.sparsity.check_weight(self.format, k, n, what)

    def random(self, key, shape, dtype):
        """A random weight of dense ``shape`` [K, N] stored in ``format``
        (``WeightFormat.random``)."""
        return get_format(self.format).random(key, shape, dtype,
                                              **self.sparsity.format_params(self.format))

    def replace(self, **changes) -> LinearConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Shape and behaviour of one MoE block.

    Attributes:
      d_model: d, width of the token vectors.
      d_ff: f, hidden width of each routed expert (SwiGLU: w1/w3 [e, d, f], w2 [e, f, d]).
      num_experts: e, routed experts.
      top_k: k, experts per token.
      router_norm: see ``RouterNorm``.
      num_shared_experts: always-on experts (0 = none); they are fused into one SwiGLU MLP of
        width ``num_shared_experts * shared_d_ff`` (equal to summing the experts).
      shared_d_ff: hidden width of each shared expert (default ``d_ff``).
      shared_gate: see ``SharedGate``.
      expert_format: see ``ExpertFormat``; ``sparsity`` holds its parameters.
      implementation: see ``ExpertImplementation``.
      pregate: see ``PregateMode``.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    router_norm: RouterNorm = "topk_softmax"
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_gate: SharedGate = "none"
    expert_format: ExpertFormat = "dense"
    sparsity: SparsityConfig = dataclasses.field(default_factory=SparsityConfig)
    implementation: ExpertImplementation = None
    pregate: PregateMode = "standard"

    def __post_init__(self) -> None:
        expect_positive_ints("MoEConfig", d_model=self.d_model, d_ff=self.d_ff,
                             num_experts=self.num_experts, top_k=self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} must be <= num_experts={self.num_experts}")
        check_literal("router_norm", self.router_norm, RouterNorm)
        check_literal("shared_gate", self.shared_gate, SharedGate)
        if self.expert_format not in format_names():
            raise ValueError(f"expert_format must be one of {format_names()}, got "
                             f"{self.expert_format!r}")
        if isinstance(self.implementation, list):
            object.__setattr__(self, "implementation", tuple(self.implementation))
        check_implementation(self.implementation)
        check_literal("pregate", self.pregate, PregateMode)
        expect_ints("MoEConfig", 0, num_shared_experts=self.num_shared_experts)
        if self.shared_d_ff is not None:
            expect_positive_ints("MoEConfig", shared_d_ff=self.shared_d_ff)
        if self.num_shared_experts == 0 and self.shared_gate != "none":
            raise ValueError(
                f"shared_gate={self.shared_gate!r} needs num_shared_experts > 0, got 0")
        if self.num_shared_experts == 0 and self.shared_d_ff is not None:
            raise ValueError(f"MoEConfig: shared_d_ff={self.shared_d_ff!r} has no effect without "
                             "shared experts (num_shared_experts=0); leave it None")
        expect_kind("sparsity", self.sparsity, SparsityConfig, "a SparsityConfig")
        d, f = self.d_model, self.d_ff
        self.sparsity.check_weight(self.expert_format, d, f, "w1/w3 [e, d_model, d_ff]")
        self.sparsity.check_weight(self.expert_format, f, d, "w2 [e, d_ff, d_model]")

    @property
    def shared_width(self) -> int:
        """Hidden width of the fused shared-expert MLP (0 when there are none)."""
        return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

    def replace(self, **changes) -> MoEConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def check_token_ids(owner: str, vocab_size: int, **ids: object) -> None:
    """ValueError unless every value is None or a token id in [0, vocab_size)."""
    for name, value in ids.items():
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, np.integer)) or not 0 <= value < vocab_size):
            raise ValueError(f"{owner}: {name} must be None or a token id in "
                             f"[0, vocab_size={vocab_size}), got {value!r}")

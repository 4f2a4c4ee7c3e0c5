"""``ModelConfig``: everything that shapes a ``MoETransformer``, from a preset (``tiny``) or a
Hugging Face ``config.json`` of a family of ``samoyeds_jax.families`` (``from_hf``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from pallas_kernels.checks import (expect_float_dtype, expect_kind, expect_number,
                                   expect_positive_ints)
from samoyeds_jax import families
from samoyeds_jax.config import (FLOAT_DTYPES, ExpertFormat, ExpertImplementation, LinearConfig,
                                 MoEConfig, PregateMode, check_token_ids)
from samoyeds_jax.layers import AttentionConfig

SUPPORTED_ARCHITECTURES = families.SUPPORTED_ARCHITECTURES



@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that shapes the transformer; ``attention`` and ``moe`` go to each block.

    Attributes:
      architecture: Hugging Face ``model_type`` this config came from ("tiny" for the preset).
      vocab_size: v.
      num_layers: l.
      attention: per-block attention config (d, heads, kv heads, head_dim, rope theta, q/k norm).
      moe: per-block MoE config (d, f, e, k, router norm, shared expert, format, implementation, pre-gate).
      linear: how the attention projections and shared experts are stored (``LinearConfig``:
        dense by default, or a sparse format for every one of them).
      norm_eps: RMSNorm epsilon.
      tie_word_embeddings: the output projection reuses ``embed_tokens``.
      max_position_embeddings: longest sequence the model was trained for (informational).
      bos_token_id, eos_token_id: special token ids (None when unknown).
      dtype: activation / KV cache dtype; param_dtype: parameter dtype.
    """

    architecture: str
    vocab_size: int
    num_layers: int
    attention: AttentionConfig
    moe: MoEConfig
    linear: LinearConfig = dataclasses.field(default_factory=LinearConfig)
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        expect_positive_ints("ModelConfig", vocab_size=self.vocab_size, num_layers=self.num_layers,
                             max_position_embeddings=self.max_position_embeddings)
        expect_number("ModelConfig", "norm_eps", self.norm_eps, above=0)
        check_token_ids("ModelConfig", self.vocab_size, bos_token_id=self.bos_token_id,
                        eos_token_id=self.eos_token_id)
        families.check_model_fields(self.architecture, self.tie_word_embeddings)
        expect_float_dtype("ModelConfig", dtype=self.dtype, param_dtype=self.param_dtype)
        expect_kind("attention", self.attention, AttentionConfig, "an AttentionConfig")
        expect_kind("moe", self.moe, MoEConfig, "a MoEConfig")
        if self.attention.d_model != self.moe.d_model:
            raise ValueError(
                f"attention d_model={self.attention.d_model} != moe d_model={self.moe.d_model}")
        expect_kind("linear", self.linear, LinearConfig, "a LinearConfig")
        a, d = self.attention, self.attention.d_model
        for what, k, n in (("q_proj", d, a.num_heads * a.head_dim),
                           ("k_proj/v_proj", d, a.num_kv_heads * a.head_dim),
                           ("o_proj", a.num_heads * a.head_dim, d)):
            self.linear.check_weight(k, n, f"attention {what} [{k}, {n}]")
        if self.moe.shared_width:
            s = self.moe.shared_width
            self.linear.check_weight(d, s, f"shared experts w1/w3 [{d}, {s}]")
            self.linear.check_weight(s, d, f"shared experts w2 [{s}, {d}]")

    @property
    def d_model(self) -> int:
        return self.attention.d_model

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes`` applied; ``moe=dict(...)``, ``attention=dict(...)`` and
        ``linear=dict(...)`` update only those fields of the sub-configs."""
        for name in ("moe", "attention", "linear"):
            if isinstance(changes.get(name), Mapping):
                changes[name] = dataclasses.replace(getattr(self, name), **changes[name])
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, *, expert_format: ExpertFormat = "dense",
             implementation: ExpertImplementation = None,
             pregate: PregateMode = "standard", dtype: Any = jnp.float32,
             param_dtype: Any = jnp.float32) -> ModelConfig:
        """A small Mixtral-like model (d=128, 2 layers, 4 experts top-2, f=256, GQA 4/2 heads, v=512).

        Sizes are multiples of 128 so every sparse expert format applies.
        """
        d = 128
        return cls(
            architecture="tiny", vocab_size=512, num_layers=2,
            attention=AttentionConfig(d_model=d, num_heads=4, num_kv_heads=2, head_dim=32,
                                      rope_theta=10_000.0, norm_eps=1e-6),
            moe=MoEConfig(d_model=d, d_ff=256, num_experts=4, top_k=2,
                          router_norm="topk_softmax", expert_format=expert_format,
                          implementation=implementation, pregate=pregate),
            norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
            dtype=dtype, param_dtype=param_dtype)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, expert_format: ExpertFormat = "dense",
                implementation: ExpertImplementation = None,
                pregate: PregateMode = "standard",
                dtype: Any = None, param_dtype: Any = None) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict of a family of ``samoyeds_jax.families``
        (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

        ``dtype``/``param_dtype`` default to the config's ``torch_dtype`` (float32 if absent).
        Raises ValueError naming the field for unsupported architectures or options.
        """
        expect_kind("ModelConfig.from_hf: hf", hf, Mapping, "the config.json contents as a dict "
                    "(samoyeds_jax.hf_import.read_hf_config(directory) reads it)")
        family = families.family(hf.get("model_type"))  # ValueError naming the supported ones
        # The family's fields: q/k norm, q/k/v bias, window, expert width and count, routing,
        # shared expert.
        pieces = family.config_from_hf(hf)

        def need(key: str):
            return families.need(hf, key)

        d = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = hf.get("num_key_value_heads") or heads
        expect_positive_ints("config.json", hidden_size=d, num_attention_heads=heads)
        if not hf.get("head_dim") and d % heads:
            raise ValueError(f"config.json: num_attention_heads={heads} must divide "
                             f"hidden_size={d} (no head_dim given)")
        head_dim = hf.get("head_dim") or d // heads
        eps = hf.get("rms_norm_eps", 1e-6)
        expect_number("config.json", "rms_norm_eps", eps, above=0)
        # Older configs: rope_theta + rope_scaling; newer ones: rope_parameters holding both.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {rope!r} is not supported (only plain RoPE)")
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
        if hf.get("clip_qkv") is not None:
            raise ValueError(f"clip_qkv={hf['clip_qkv']!r} is not supported (only None)")
        if dtype is None or param_dtype is None:
            # transformers < 5 writes "torch_dtype", later versions "dtype".
            name = str(hf.get("torch_dtype", hf.get("dtype", "float32")))
            torch_dtype = FLOAT_DTYPES.get(name, jnp.float32)
            dtype = dtype or torch_dtype
            param_dtype = param_dtype or torch_dtype
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            architecture=family.model_type, vocab_size=need("vocab_size"),
            num_layers=need("num_hidden_layers"),
            attention=AttentionConfig(
                d_model=d, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                rope_theta=theta, norm_eps=eps, **pieces["attention"]),
            moe=MoEConfig(d_model=d, top_k=need("num_experts_per_tok"),
                          expert_format=expert_format, implementation=implementation,
                          pregate=pregate,
                          **pieces["moe"]),
            norm_eps=eps, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
            dtype=dtype, param_dtype=param_dtype)

"""Decoder-only MoE transformer (Flax NNX) for the Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE families.

Data path: ``tokens -> embed_tokens -> [input_layernorm -> self_attn -> post_attention_layernorm
-> mlp (MoE)] x l -> norm -> lm_head -> logits``, residual connections around attention and MoE.
Each MoE block returns the routing it pre-computed for the next block (pre-gating), which the
model hands to that block.

Parameter names (Hugging Face ``model.`` prefix dropped; Hugging Face linear ``weight`` [out, in]
is stored transposed as ``kernel`` [in, out] for ``y = x @ W``):

================================================  =============================================
Hugging Face                                      here
================================================  =============================================
``model.embed_tokens.weight`` [v, d]              ``embed_tokens.embedding`` [v, d]
``model.layers.{i}.input_layernorm.weight``       ``layers.{i}.input_layernorm.scale``
``model.layers.{i}.self_attn.q_proj.weight``      ``layers.{i}.self_attn.q_proj.kernel`` (+ ``.bias``)
``...self_attn.{k,v}_proj.weight``                ``...self_attn.{k,v}_proj.kernel`` (+ ``.bias``)
``...self_attn.o_proj.weight``                    ``...self_attn.o_proj.kernel``
``...self_attn.{q,k}_norm.weight`` (Qwen3, OLMoE) ``...self_attn.{q,k}_norm.scale``
``model.layers.{i}.post_attention_layernorm``     ``layers.{i}.post_attention_layernorm.scale``
``...block_sparse_moe`` (Mixtral) / ``...mlp``    ``layers.{i}.mlp`` (the MoE layer's own names)
``model.norm.weight``                             ``norm.scale``
``lm_head.weight`` [v, d]                         ``lm_head.kernel`` [d, v] (absent when tied)
================================================  =============================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.checks import (are_arrays, check_ids, expect_float_dtype, expect_ints,
                                   expect_kind, expect_number, expect_positive_ints, is_concrete)
from samoyeds_jax import families
from samoyeds_jax.config import (ExpertFormat, ExpertImplementation, LinearConfig, MoEConfig,
                                 PregateMode, check_literal, check_token_ids)
from samoyeds_jax.layers import Attention, AttentionConfig, RMSNorm, attention_mask
from samoyeds_jax.moe import MoE

LogitsFor = Literal["all", "last"]

SUPPORTED_ARCHITECTURES = families.SUPPORTED_ARCHITECTURES

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


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
            torch_dtype = _DTYPES.get(name, jnp.float32)
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterLogits:
    """Every block's router logits from one forward (``return_router_logits=True``).

    Attributes:
      gate: per block, its own gate's logits on its input, ``[b*t, e]`` float32 (whatever
        routing the block computed with: in ``"pregated"`` mode blocks > 0 use the previous
        block's pre-gate).
      pregate: per block, its pre-gate's logits predicting the next block's experts,
        ``[b*t, e]`` float32; None for blocks without a pre-gate (the last one, and all in
        ``"standard"`` mode).
    """

    gate: tuple[jax.Array, ...]
    pregate: tuple[jax.Array | None, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Slot-addressed key/value cache of every layer (see ``samoyeds_jax.layers``).

    Attributes:
      keys, values: one ``[b, s, kv_h, hd]`` array per layer.
      valid: ``[b, s]`` bool, slots holding real tokens.
      lengths: ``[b]`` int32, real tokens per row so far (the next token's rotary position).
      index: ``[]`` int32, next slot to write (the same for every row).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    lengths: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, slots: int) -> KVCache:
        """An empty cache of ``slots`` slots for ``batch`` rows in ``config.dtype``."""
        expect_ints("KVCache.init", 0, batch=batch, slots=slots)
        a = config.attention
        shape = (batch, slots, a.num_kv_heads, a.head_dim)
        zeros = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
        return cls(keys=zeros, values=tuple(jnp.zeros(shape, config.dtype) for _ in zeros),
                   valid=jnp.zeros((batch, slots), bool), lengths=jnp.zeros((batch,), jnp.int32),
                   index=jnp.zeros((), jnp.int32))

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def advance(self, keys, values, valid: jax.Array, mask: jax.Array) -> KVCache:
        """The cache after a forward of ``mask.shape[1]`` tokens wrote ``keys``/``values``."""
        return KVCache(keys=tuple(keys), values=tuple(values), valid=valid,
                       lengths=self.lengths + jnp.sum(mask, axis=1, dtype=jnp.int32),
                       index=self.index + mask.shape[1])


class Step(NamedTuple):
    """What every block of one forward shares: rotary ``positions [b, t]``, ``attn_mask
    [b, t, s]``, the cache's ``valid [b, s]`` after the write and the tokens' ``mask [b, t]``."""

    positions: jax.Array
    attn_mask: jax.Array
    valid: jax.Array
    mask: jax.Array


def step_positions(cache: KVCache, mask: jax.Array, *, sliding_window: int | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotary positions and attention mask of ``t`` new tokens written at ``cache.index``.

    Args:
      mask: ``[b, t]`` bool, False for (left) padding.
    Returns:
      ``(positions [b, t] int32, valid [b, s] bool after the write, attn_mask [b, t, s] bool)``;
      a token's position is the number of real tokens before it in its row.
    """
    mask = mask.astype(bool)
    positions = cache.lengths[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
    positions = jnp.maximum(positions, 0)  # [b, t]
    zero = jnp.zeros((), jnp.int32)
    valid = jax.lax.dynamic_update_slice(cache.valid, mask, (zero, cache.index))
    attn_mask = attention_mask(valid, cache.index, mask.shape[1], sliding_window=sliding_window)
    return positions, valid, attn_mask


def default_mlp(config: ModelConfig, *, block_index: int, rngs: nnx.Rngs) -> nnx.Module:
    """The MoE layer of block ``block_index``, built from ``config.moe``."""
    return MoE(config.moe, block_index=block_index, num_blocks=config.num_layers,
               linear=config.linear, dtype=config.dtype, param_dtype=config.param_dtype,
               rngs=rngs)


MlpFactory = Callable[..., nnx.Module]
"""``factory(config: ModelConfig, *, block_index, rngs) -> module`` with
``module(x [n, d], *, routing) -> (y, next_routing)``; the default is ``default_mlp``."""


def attention_half(input_layernorm: RMSNorm, self_attn: Attention,
                   post_attention_layernorm: RMSNorm, x: jax.Array, *, positions, mask,
                   cache_k, cache_v, index):
    """A block up to its MoE layer: ``h = x + attn(norm(x))`` and the MoE layer's input
    ``norm(h)`` as a flat token list. The one place this is written: ``DecoderBlock``, the
    offloaded generator (which keeps the experts apart) and calibration call it.

    Returns ``(h [b, t, d], x_moe [b*t, d], cache_k, cache_v)``.
    """
    b, t, d = x.shape
    a, cache_k, cache_v = self_attn(input_layernorm(x), positions=positions, mask=mask,
                                    cache_k=cache_k, cache_v=cache_v, index=index)
    h = x + a
    return h, post_attention_layernorm(h).reshape(b * t, d), cache_k, cache_v


def expert_half(h: jax.Array, moe_out: jax.Array) -> jax.Array:
    """The block output ``h + moe(x_moe)`` from the MoE layer's output ``[b*t, d]``."""
    return h + moe_out.reshape(h.shape).astype(h.dtype)


class DecoderBlock(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); y = h + moe(norm(h))`` (``attention_half``, the
    MoE layer, ``expert_half``)."""

    def __init__(self, config: ModelConfig, *, block_index: int = 0,
                 mlp_factory: MlpFactory = default_mlp, rngs: nnx.Rngs):
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.input_layernorm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
        self.self_attn = Attention(config.attention, linear=config.linear, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
        self.mlp = mlp_factory(config, block_index=block_index, rngs=rngs)

    def attention_half(self, x, *, positions, mask, cache_k, cache_v, index):
        """``attention_half`` of this block: ``(h, x_moe [b*t, d], cache_k, cache_v)``."""
        return attention_half(self.input_layernorm, self.self_attn,
                              self.post_attention_layernorm, x, positions=positions, mask=mask,
                              cache_k=cache_k, cache_v=cache_v, index=index)

    def __call__(self, x, *, positions, mask, cache_k, cache_v, index, routing=None,
                 return_gate_logits: bool = False):
        """x ``[b, t, d]`` -> ``(y [b, t, d], cache_k, cache_v, next_routing)``, plus the MoE
        layer's own gate logits ``[b*t, e]`` last with ``return_gate_logits``."""
        h, x_moe, cache_k, cache_v = self.attention_half(
            x, positions=positions, mask=mask, cache_k=cache_k, cache_v=cache_v, index=index)
        if return_gate_logits:
            m, next_routing, gate_logits = self.mlp(x_moe, routing=routing,
                                                    return_gate_logits=True)
        else:
            (m, next_routing), gate_logits = self.mlp(x_moe, routing=routing), None
        y = expert_half(h, m)
        if return_gate_logits:
            return y, cache_k, cache_v, next_routing, gate_logits
        return y, cache_k, cache_v, next_routing


class MoETransformer(nnx.Module):
    """Decoder-only MoE language model.

    ``model(tokens [b, t], mask=..., cache=...) -> (logits, cache)``. Without a cache, a fresh one of
    exactly t slots is used (a plain forward); for generation, pass ``KVCache.init(config, b, s)``
    and feed the prompt, then one token at a time.
    """

    def __init__(self, config: ModelConfig, *, mlp_factory: MlpFactory = default_mlp, rngs: nnx.Rngs):
        expect_kind("MoETransformer: config", config, ModelConfig,
                    "a ModelConfig (e.g. ModelConfig.tiny())")
        expect_kind("MoETransformer: rngs", rngs, nnx.Rngs, "an nnx.Rngs (e.g. nnx.Rngs(0))")
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype,
                                      param_dtype=config.param_dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([
            DecoderBlock(config, block_index=i, mlp_factory=mlp_factory, rngs=rngs)
            for i in range(config.num_layers)])
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=config.dtype,
                            param_dtype=config.param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.d_model, config.vocab_size, use_bias=False,
                                      dtype=config.dtype, param_dtype=config.param_dtype,
                                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None,
                 cache: KVCache | None = None, logits_for: LogitsFor = "all",
                 return_router_logits: bool = False):
        """Run ``t`` new tokens per row through the model.

        Args:
          tokens: ``[b, t]`` int token ids in ``[0, vocab_size)``: checked when concrete; under
            ``jit`` only inside ``pallas_kernels.checks.checked`` (an id past the vocabulary
            embeds as NaN, a negative one wraps around).
          mask: ``[b, t]`` bool, False for (left) padding, a True in every row; default all True.
          cache: the KV cache to extend; its slots ``index .. index + t - 1`` are written (they
            must exist: checked when ``cache.index`` is concrete).
          logits_for: "all" -> logits ``[b, t, v]``; "last" -> only the last position ``[b, v]``.
          return_router_logits: also return every block's ``RouterLogits`` (training losses,
            pre-gate metrics).
        Returns:
          ``(logits float32, updated cache)``, or ``(logits, cache, RouterLogits)``.
        """
        x, step, cache = self.embed(tokens, mask, cache)
        routing = None
        keys, values, gates, pregates = [], [], [], []
        for i, block in enumerate(self.layers):
            out = block(x, positions=step.positions, mask=step.attn_mask, cache_k=cache.keys[i],
                        cache_v=cache.values[i], index=cache.index, routing=routing,
                        return_gate_logits=return_router_logits)
            x, k, v, routing = out[:4]
            keys.append(k)
            values.append(v)
            if return_router_logits:
                gates.append(out[4])
                pregates.append(None if routing is None else routing.logits)
        logits, cache = self.head(x, logits_for), cache.advance(keys, values, step.valid,
                                                                step.mask)
        if return_router_logits:
            return logits, cache, RouterLogits(gate=tuple(gates), pregate=tuple(pregates))
        return logits, cache

    def embed(self, tokens: jax.Array, mask: jax.Array | None, cache: KVCache | None
              ) -> tuple[jax.Array, Step, KVCache]:
        """The blocks' input: ``(x [b, t, d], Step, cache)`` after checking ``tokens``, ``mask``
        and ``cache`` (a fresh one of t slots when None) as ``__call__`` documents."""
        expect_kind("tokens", tokens, (jax.Array, np.ndarray), "a [b, t] integer array")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [b, t] token ids, got shape {tokens.shape}")
        check_ids(tokens, self.config.vocab_size, "tokens")
        b, t = tokens.shape
        if mask is None:
            mask = jnp.ones((b, t), bool)
        elif not are_arrays(mask) or tuple(mask.shape) != (b, t) or mask.dtype != bool:
            got = getattr(mask, "shape", type(mask).__name__), getattr(mask, "dtype", "")
            raise ValueError(f"mask must be a bool [b, t] = {(b, t)} like tokens, got {got}")
        if cache is None:
            cache = self.init_cache(b, t)
        expect_kind("cache", cache, KVCache, "a KVCache (model.init_cache) or None")
        if cache.valid.shape[0] != b:
            raise ValueError(f"cache batch {cache.valid.shape[0]} != tokens batch {b}")
        if t > cache.slots:
            raise ValueError(f"{t} tokens do not fit a cache of {cache.slots} slots")
        free = cache.slots - int(cache.index) if is_concrete(cache.index) else t
        if t > free:
            raise ValueError(f"{t} new tokens do not fit the cache: {free} of its {cache.slots} "
                             f"slots are free (cache.index={cache.slots - free})")
        real = np.asarray(mask, bool).any(axis=1) if t and is_concrete(mask) else ()
        if not np.all(real):
            raise ValueError(f"mask row {int(np.argmin(real))} has no True entry: every row "
                             "needs at least one real token (False marks padding)")
        positions, valid, attn_mask = step_positions(
            cache, mask, sliding_window=self.config.attention.sliding_window)
        return self.embed_tokens(tokens), Step(positions, attn_mask, valid, mask), cache

    def init_cache(self, batch: int, slots: int) -> KVCache:
        """An empty KV cache for this model (``KVCache.init``)."""
        return KVCache.init(self.config, batch, slots)

    def head(self, x: jax.Array, logits_for: LogitsFor = "all") -> jax.Array:
        """The last block's output ``[b, t, d]`` -> float32 logits of every position, or of
        the last one (``logits_for="last"``)."""
        check_literal("logits_for", logits_for, LogitsFor)
        return self.logits(x[:, -1] if logits_for == "last" else x)

    def prepare(self, implementation: ExpertImplementation = None) -> str:
        """``MoE.prepare`` for every block: the expert implementation chosen and the weights put
        in its layout once, in place; ``config.moe.implementation`` becomes the chosen name.
        Returns the first block's ``MoE.implementation()``."""
        described = [block.mlp.prepare(implementation) for block in self.layers]
        self.config = self.config.replace(
            moe=dict(implementation=self.layers[0].mlp.config.implementation))
        self.prepare_linears()
        return described[0]

    def prepare_linears(self, implementation: Any = None) -> str:
        """``Attention.fuse_qkv`` (dense q/k/v become one product) and ``Linear.prepare`` for
        every attention projection and the shared experts (``implementation``, default
        ``config.linear.implementation``: None picks the fastest that applies);
        ``config.linear.implementation`` becomes the chosen name. Returns the first block's
        ``o_proj.implementation()``."""
        if implementation is None:
            implementation = self.config.linear.implementation
        for block in self.layers:
            block.self_attn.fuse_qkv()
            for proj in block.self_attn.projections().values():
                proj.prepare(implementation)
            if block.mlp.shared is not None:
                block.mlp.shared.prepare(implementation)
        first = self.layers[0].self_attn.o_proj
        self.config = self.config.replace(linear=dict(implementation=first.config.implementation))
        return first.implementation()

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and output projection: ``[..., d]`` -> float32 logits ``[..., v]``."""
        x = self.norm(x)
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

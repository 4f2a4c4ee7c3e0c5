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
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.checks import are_arrays, check_ids, expect_kind, is_concrete
from samoyeds_jax.config import ExpertImplementation, check_literal
from samoyeds_jax.kv_cache import KVCache, Step, step_positions
from samoyeds_jax.layers import Attention, RMSNorm
from samoyeds_jax.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from samoyeds_jax.moe import MoE

__all__ = ["SUPPORTED_ARCHITECTURES", "DecoderBlock", "KVCache", "LogitsFor", "ModelConfig",
           "MoETransformer", "RouterLogits", "Step", "default_mlp", "step_positions"]

LogitsFor = Literal["all", "last"]


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

"""Generation with the routed experts in pinned host memory and a device slot cache.

``OffloadGenerator`` runs the same model as ``Generator`` block by block from the host, so that
expert transfers can be issued between the blocks' computations (``samoyeds_jax.offload``):

    embed -> for each block l:
        front_l: model.attention_half -> own routing + pre-gate routing               (jitted)
        prepare: block l's experts resident; block l+1's transfers started when the
                 pool holds both blocks                                    (device_put, async)
        back_l:  routed experts on the slot-stacked cache weights (+ shared),
                 model.expert_half                                                    (jitted)
        finish:  block l+1's transfers that did not fit before               (device_put, async)
    -> norm -> lm_head -> sample

The fetch logic of every policy is ``offload.BlockScheduler``:
a host->device copy starts only after the computations queued before it, so block l+1's
prefetch is issued before block l's expert compute is queued and runs under it.
The non-expert parameters stay on the device; the expert weights (dense or any sparse format)
live in an ``ExpertStore`` and reach the device through an ``ExpertCache`` of ``slots`` slots
(default: ``offload.resolve_slots``, sized by the first generation's prefill).
Fetch policies are those of ``OffloadConfig``; ``routing_source="pregate"`` needs a model built
with ``pregate="pregated"`` (block l >= 1 computes with the experts block l-1's pre-gate picked),
``"router"`` a model whose blocks route themselves ("standard" or "speculative").

Results equal ``Generator``'s for the same model (the slot numbering does not change the
arithmetic). Timings exclude compilation: a warm-up generation of the same shapes runs first, then
the expert cache is rebuilt empty so hit rates start cold.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.checks import expect_kind, expect_positive_ints
from samoyeds_jax.expert_cache import ExpertCache
from samoyeds_jax.expert_store import ExpertStore
from samoyeds_jax.generate import (GenerationResult, SamplingConfig, check_special_ids,
                                   eos_array, output_lengths, pad_prompts, sample)
from samoyeds_jax.model import (KVCache, MoETransformer, attention_half, expert_half,
                                step_positions)
from samoyeds_jax.moe import ExpertWeights, expert_ffn
from samoyeds_jax.offload import BlockScheduler, OffloadConfig, make_cache, resolve_slots
from samoyeds_jax.routing import Routing


@functools.partial(jax.jit, donate_argnames=("cache_k", "cache_v"))
def _front(parts, h, positions, mask, cache_k, cache_v, index):
    """Block up to the experts.

    Returns ``(h [b, t, d], x [b*t, d], own Routing, pre-gate Routing or None, cache_k, cache_v)``.
    """
    in_norm, attn, post_norm, gate, pregate = parts
    h, x, cache_k, cache_v = attention_half(in_norm, attn, post_norm, h, positions=positions,
                                            mask=mask, cache_k=cache_k, cache_v=cache_v,
                                            index=index)
    return h, x, gate(x), (pregate(x) if pregate is not None else None), cache_k, cache_v


@functools.partial(jax.jit, static_argnames=("implementation", "dtype"))
def _back(shared, h, x, routing: Routing, table, layer, buffers, *, implementation, dtype):
    """Routed experts over the cache slots (+ shared experts) and the residual: ``h [b, t, d]``."""
    slots = Routing(table[layer][routing.topk_idx], routing.topk_weights)  # expert id -> slot
    experts = ExpertWeights(buffers["w1"], buffers["w3"], buffers["w2"])
    y = expert_ffn(x, slots, experts, implementation=implementation, dtype=dtype)
    if shared is not None:
        y = y + shared(x).astype(dtype)
    return expert_half(h, y)


@jax.jit
def _embed(embed, tokens):
    return embed(tokens)


_step_positions = jax.jit(step_positions, static_argnames="sliding_window")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadGenerationResult(GenerationResult):
    """``GenerationResult`` plus the expert cache's counters (hits, misses, bytes, hit_rate, ...)
    over the timed generation, the device bytes of the slot pool, and the host reads of
    expert ids (count, and wall seconds blocked in them) over the timed generation."""

    cache_stats: dict[str, float]
    cache_nbytes: int
    store_nbytes: int
    host_syncs: int = 0
    sync_seconds: float = 0.0


class OffloadGenerator:
    """Greedy/sampled generation with host-offloaded experts (see the module doc).

    Args:
      model: the transformer; its expert arrays are copied to pinned host memory (drop the model
        afterwards to free their device copies). Experts the model keeps in host memory
        (built with ``expert_store.host_experts``, for models whose experts do not fit the
        device) are moved instead: the model's expert arrays are deleted, so host memory holds
        them once.
      offload: an ``OffloadConfig`` (fetch policy, slots, eviction, routing source; a policy
        name alone raises TypeError: pass ``OffloadConfig(policy=...)``). Without
        ``offload.slots`` the slot count is ``offload.resolve_slots`` for the first
        generation's prefill (batch x prompt width tokens), kept for later generations.
    """

    def __init__(self, model: MoETransformer, *, offload: OffloadConfig = OffloadConfig(),
                 sampling: SamplingConfig = SamplingConfig(),
                 eos_id: int | Sequence[int] | None = None,
                 pad_id: int = 0, bucket: int = 16):
        expect_kind("model", model, MoETransformer, "a MoETransformer")
        expect_kind("offload", offload, OffloadConfig,
                    "an OffloadConfig (e.g. OffloadConfig(policy='pregated'))")
        expect_kind("sampling", sampling, SamplingConfig, "a SamplingConfig")
        cfg = model.config
        mode = cfg.moe.pregate
        if offload.routing_source == "pregate" and mode != "pregated":
            raise ValueError("routing_source='pregate' computes block l+1 with block l's pre-gate "
                             f"choice: needs a model with pregate='pregated', got {mode!r}")
        if offload.routing_source == "router" and mode == "pregated":
            raise ValueError("a pregate='pregated' model computes with its pre-gate routings: "
                             "use routing_source='pregate'")
        if offload.policy in ("pregated", "speculative") and mode == "standard":
            raise ValueError(f"policy={offload.policy!r} needs pre-gates: build the model with "
                             "pregate='pregated' or 'speculative'")
        check_special_ids(eos_id, pad_id, cfg.vocab_size)
        self.config = cfg
        self.offload = offload
        self.sampling = sampling
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.bucket = bucket
        self.embed = model.embed_tokens
        self.parts = []
        self.shared = []
        layers = []
        for block in model.layers:
            moe = block.mlp
            self.parts.append((block.input_layernorm, block.self_attn,
                               block.post_attention_layernorm, moe.gate, moe.pregate))
            self.shared.append(moe.shared)
            w = moe.expert_weights()
            layers.append({"w1": w.w1, "w3": w.w3, "w2": w.w2})
        self.dtype = jnp.dtype(cfg.dtype)
        self.store = ExpertStore.from_stacked(layers, move_host=True)
        self._head_fn = _make_head(model)
        self.cache: ExpertCache | None = None
        self._slots: int | None = offload.slots
        self._host_syncs = 0
        self._sync_s = 0.0

    # ------------------------------------------------------------------ expert cache

    def _new_cache(self, max_tokens: int) -> ExpertCache:
        if self._slots is None:
            self._slots = resolve_slots(
                self.offload, num_layers=self.store.num_layers,
                num_experts=self.store.num_experts, top_k=self.config.moe.top_k,
                max_tokens=max_tokens)
        config = dataclasses.replace(self.offload, slots=self._slots)
        self._host_syncs, self._sync_s = 0, 0.0
        return make_cache(self.store, config, top_k=self.config.moe.top_k)

    # ------------------------------------------------------------------ one forward

    def _forward(self, tokens: jax.Array, mask: jax.Array, kv: KVCache) -> tuple[jax.Array, KVCache]:
        """All blocks on ``tokens [b, t]``; returns the last position's hidden state and the cache."""
        cache = self.cache
        sched = BlockScheduler(cache, self.offload)
        positions, valid, attn_mask = _step_positions(
            kv, mask, sliding_window=self.config.attention.sliding_window)
        h = _embed(self.embed, tokens)
        keys, values = list(kv.keys), list(kv.values)
        for l in range(self.store.num_layers):
            h, x, own, pregate, keys[l], values[l] = _front(
                self.parts[l], h, positions, attn_mask, keys[l], values[l], kv.index)
            routing = sched.prepare(l, own, pregate)
            h = _back(self.shared[l], h, x, routing, cache.device_table, cache.layer_index(l),
                      cache.buffers, implementation=self.config.moe.implementation, dtype=self.dtype)
            sched.finish(l)
        self._host_syncs += sched.stats.host_syncs
        self._sync_s += sched.stats.sync_s
        return h[:, -1], kv.advance(keys, values, valid, mask)

    # ------------------------------------------------------------------ generation

    def _run(self, tokens, mask, max_new_tokens, key, stream, *, stop_after=None):
        """Prefill + decode; ``stop_after`` ends early (warm-up) with the same shapes."""
        b, width = tokens.shape
        kv = KVCache.init(self.config, b, width + max_new_tokens)
        key, k0 = jax.random.split(key)
        t0 = time.perf_counter()
        h, kv = self._forward(tokens, mask, kv)
        token = np.asarray(self._head_fn(h, k0, sampling=self.sampling))  # waits for the device
        t_prefill = time.perf_counter() - t0

        out = np.full((b, max_new_tokens), self.pad_id, np.int32)
        out[:, 0] = token
        if stream is not None:
            stream(0, token.copy())
        eos = eos_array(self.eos_id)
        done = np.isin(token, eos)
        steps = 1
        ones = jnp.ones((b, 1), bool)
        t0 = time.perf_counter()
        limit = max_new_tokens if stop_after is None else min(stop_after, max_new_tokens)
        while steps < limit and not done.all():
            key, sub = jax.random.split(key)
            h, kv = self._forward(jnp.asarray(token[:, None]), ones, kv)
            nxt = np.asarray(self._head_fn(h, sub, sampling=self.sampling))
            token = np.where(done, self.pad_id, nxt)
            out[:, steps] = token
            if stream is not None:
                stream(steps, token.copy())
            done |= np.isin(token, eos)
            steps += 1
        return out, steps, t_prefill, time.perf_counter() - t0

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 key: jax.Array | None = None, warmup: bool = True,
                 stream: Callable[[int, np.ndarray], None] | None = None
                 ) -> OffloadGenerationResult:
        """Generate for token-id prompts (see ``Generator.generate``).

        ``warmup``: first run the same shapes once (compiles every block function), then start
        the timed run with an empty expert cache. Without it, compile time is inside the timings.
        """
        expect_positive_ints("generate", max_new_tokens=max_new_tokens)
        key = jax.random.key(0) if key is None else key
        tokens, mask = pad_prompts(prompts, pad_id=self.pad_id, bucket=self.bucket,
                                   vocab_size=self.config.vocab_size)
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
        max_tokens = int(tokens.size)
        compile_s = 0.0
        if warmup:
            t0 = time.perf_counter()
            self.cache = self._new_cache(max_tokens)
            self._run(tokens, mask, max_new_tokens, key, None, stop_after=2)
            compile_s = time.perf_counter() - t0
        self.cache = self._new_cache(max_tokens)
        out, steps, t_prefill, t_decode = self._run(tokens, mask, max_new_tokens, key, stream)
        lengths = output_lengths(out, steps, self.eos_id)
        return OffloadGenerationResult(
            tokens=out, lengths=lengths, prompt_tokens=int(np.sum(np.asarray(mask))),
            prefill_seconds=t_prefill, decode_seconds=t_decode, decode_steps=steps - 1,
            compile_seconds=compile_s, cache_stats=self.cache.stats.as_dict(),
            cache_nbytes=self.cache.nbytes, store_nbytes=self.store.nbytes,
            host_syncs=self._host_syncs, sync_seconds=self._sync_s)


def _make_head(model: MoETransformer):
    """``head(h_last [b, d], key, *, sampling) -> [b] int32``: final norm, output layer, sampling.

    Only the norm and output projection go into the jitted function (not the expert arrays).
    """
    parts = (model.norm, model.embed_tokens if model.config.tie_word_embeddings else model.lm_head)
    tied = model.config.tie_word_embeddings

    @functools.partial(jax.jit, static_argnames="sampling")
    def head(parts, h, key, *, sampling):
        norm, out = parts
        x = norm(h)
        logits = out.attend(x) if tied else out(x)
        return sample(logits.astype(jnp.float32), key, sampling)

    return lambda h, key, *, sampling: head(parts, h, key, sampling=sampling)

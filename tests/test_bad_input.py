"""Malformed input gets a clear error (type, and a message naming the argument and value).

One parametrized case per bad input over the public entry points of the layers: configs,
``MoE``, ``MoETransformer``, generation, the expert store and cache, evaluation/training
configs, corpus helpers. Then the traced checks: silent under ``jit`` by default (no extra
operation in the jaxpr), raised inside ``checked``. Weight formats, kernel entry points,
pruning, ``RoutingPlan`` and ``Routing`` are in ``test_bad_input_formats.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.checks import checked, checking
from pallas_kernels.routing_plan import RoutingPlan
from samoyeds_jax import bpe_tokenizer, corpus, evaluate, train, train_data
from samoyeds_jax.config import MoEConfig, SparsityConfig
from samoyeds_jax.expert_cache import ExpertCache
from samoyeds_jax.expert_store import ExpertStore
from samoyeds_jax.generate import Generator, SamplingConfig, generate, pad_prompts
from samoyeds_jax.generate_offload import OffloadGenerator
from samoyeds_jax.layers import AttentionConfig
from samoyeds_jax.model import KVCache, ModelConfig, MoETransformer
from samoyeds_jax.moe import MoE
from samoyeds_jax.offload import OffloadConfig
from samoyeds_jax.pregate import PregateTrainConfig
from samoyeds_jax.routing import Routing

V = 50  # vocabulary of the tiny model
D, F, E, K = 16, 32, 4, 2  # the tiny MoE layer
f32 = jnp.float32
VE, TE = ValueError, TypeError
bad_idx = ((0, 1), (2, 4), (1, 0))


# ----------------------------------------------------------------------------- tiny objects


def moe_config(**kw) -> MoEConfig:
    return MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, **kw)


# Cached, and built with concrete parameters even when first asked for inside a jit trace
# (a module built there would hold tracers that leak into later calls).
@functools.cache
def moe(pregate: str = "standard", block_index: int = 0) -> MoE:
    with jax.ensure_compile_time_eval():
        return MoE(moe_config(pregate=pregate), block_index=block_index, num_blocks=2,
                   track_recall=False, rngs=nnx.Rngs(0))


def routing(idx=((0, 1), (2, 3), (1, 0)), w=None) -> Routing:
    idx = jnp.asarray(idx, jnp.int32)
    return Routing(idx, jnp.full(idx.shape, 0.5, f32) if w is None else jnp.asarray(w, f32))


def x(t: int = 3, d: int = D, dtype=f32) -> jax.Array:
    return jnp.ones((t, d), dtype)


def model_config(**moe_kw) -> ModelConfig:
    return ModelConfig(
        architecture="tiny", vocab_size=V, num_layers=1,
        attention=AttentionConfig(d_model=D, num_heads=2, num_kv_heads=1, head_dim=8),
        moe=moe_config(**moe_kw), eos_token_id=2)


@functools.cache
def model(pregate: str = "standard") -> MoETransformer:
    with jax.ensure_compile_time_eval():
        return MoETransformer(model_config(pregate=pregate), rngs=nnx.Rngs(0))


@functools.cache
def store() -> ExpertStore:
    return ExpertStore.from_stacked([{"w1": np.zeros((E, 8, 16), np.float32)}])


def cache() -> ExpertCache:
    return ExpertCache(store(), slots=2, top_k=1)


HF = dict(model_type="mixtral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, vocab_size=V,
          num_hidden_layers=1)


@functools.cache
def tokenizer():
    return bpe_tokenizer.train_tokenizer(["to be or not to be, that is the question"] * 4,
                                  vocab_size=300, min_frequency=1)


# ----------------------------------------------------------------------------- the cases


def case(name, fn, exc, match):
    """``fn()`` must raise ``exc`` with ``match`` (a literal fragment) in its message."""
    return pytest.param(fn, exc, match, id=name)


CONFIG_CASES = [
    case("moe_d_model_zero", lambda: moe_config().replace(d_model=0), VE,
         "MoEConfig: d_model must be a positive int, got 0"),
    case("moe_d_ff_float", lambda: moe_config().replace(d_ff=32.0), VE,
         "MoEConfig: d_ff must be a positive int, got 32.0"),
    case("moe_experts_bool", lambda: moe_config().replace(num_experts=True, top_k=1), VE,
         "MoEConfig: num_experts must be a positive int, got True"),
    case("moe_top_k_past_experts", lambda: moe_config().replace(top_k=5), VE,
         "top_k=5 must be <= num_experts=4"),
    case("moe_router_norm", lambda: moe_config().replace(router_norm="softmax"), VE,
         "router_norm must be one of ('softmax_topk', 'topk_softmax'), got 'softmax'"),
    case("moe_expert_format", lambda: moe_config().replace(expert_format="2:4"), VE,
         "expert_format must be one of"),
    case("moe_implementation", lambda: moe_config().replace(implementation="cuda"), VE,
         "expert implementation must be one of ['all_experts', 'mosaic_expand', "
         "'mosaic_sparse_mma', 'triton', 'xla'], got 'cuda'"),
    case("moe_shared_negative", lambda: moe_config().replace(num_shared_experts=-1), VE,
         "num_shared_experts must be an int >= 0, got -1"),
    case("moe_shared_d_ff", lambda: moe_config().replace(num_shared_experts=1, shared_d_ff=0), VE,
         "MoEConfig: shared_d_ff must be a positive int, got 0"),
    case("moe_shared_gate", lambda: moe_config().replace(shared_gate="sigmoid"), VE,
         "shared_gate='sigmoid' needs num_shared_experts > 0"),
    case("moe_nm_d_model", lambda: moe_config().replace(expert_format="nm"), VE,
         "w1/w3 [e, d_model, d_ff]: 2:4 sparsity needs the reduction dim to be a multiple of 32"),
    case("moe_sparsity_kind", lambda: moe_config().replace(sparsity={"n": 2}), TE,
         "sparsity must be a SparsityConfig, got dict"),
    case("sparsity_nm", lambda: SparsityConfig(n=3, m=4), VE, "(n, m) must be one of"),
    case("sparsity_density", lambda: SparsityConfig(density=0.0), VE,
         "density must be in (0, 1], got self.density=0.0"),
    case("sparsity_v", lambda: SparsityConfig(v=48), VE, "v must be a positive multiple of 32"),
    case("sparsity_sel", lambda: SparsityConfig(n_sel=2, m_sel=2), VE, "need 0 < n_sel < m_sel"),
    case("attention_kv_heads", lambda: AttentionConfig(d_model=32, num_heads=3, num_kv_heads=2,
                                                       head_dim=8), VE,
         "num_heads=3 must be a multiple of num_kv_heads=2"),
    case("attention_heads_zero", lambda: AttentionConfig(d_model=32, num_heads=0, num_kv_heads=1,
                                                         head_dim=8), VE,
         "AttentionConfig: num_heads must be a positive int, got 0"),
    case("attention_head_dim_odd", lambda: AttentionConfig(d_model=32, num_heads=2, num_kv_heads=1,
                                                           head_dim=7), VE,
         "head_dim=7 must be even (rotary embedding)"),
    case("attention_window", lambda: AttentionConfig(d_model=32, num_heads=2, num_kv_heads=1,
                                                     head_dim=8, sliding_window=0), VE,
         "AttentionConfig: sliding_window must be a positive int, got 0"),
    case("attention_qk_norm", lambda: AttentionConfig(d_model=32, num_heads=2, num_kv_heads=1,
                                                      head_dim=8, qk_norm="rms"), VE,
         "qk_norm must be 'none', 'per_head' or 'full', got 'rms'"),
    case("attention_theta", lambda: AttentionConfig(d_model=32, num_heads=2, num_kv_heads=1,
                                                    head_dim=8, rope_theta=0.0), VE,
         "rope_theta and norm_eps must be > 0"),
    case("model_vocab", lambda: model_config().replace(vocab_size=0), VE,
         "ModelConfig: vocab_size must be a positive int, got 0"),
    case("model_layers_float", lambda: model_config().replace(num_layers=1.0), VE,
         "ModelConfig: num_layers must be a positive int, got 1.0"),
    case("model_attention_kind", lambda: dataclasses.replace(model_config(), attention=None), TE,
         "attention must be an AttentionConfig, got NoneType"),
    case("model_moe_kind", lambda: dataclasses.replace(model_config(), moe=dict(d_model=D)), TE,
         "moe must be a MoEConfig, got dict"),
    case("model_d_model", lambda: model_config().replace(moe=dict(d_model=32)), VE,
         "attention d_model=16 != moe d_model=32"),
    case("hf_heads_divide", lambda: ModelConfig.from_hf(dict(HF, num_attention_heads=5)), VE,
         "config.json: num_attention_heads=5 must divide hidden_size=64 (no head_dim given)"),
    case("hf_heads_zero", lambda: ModelConfig.from_hf(dict(HF, num_attention_heads=0)), VE,
         "config.json: num_attention_heads must be a positive int, got 0"),
    case("hf_kv_heads", lambda: ModelConfig.from_hf(dict(HF, num_key_value_heads=3)), VE,
         "num_heads=4 must be a multiple of num_kv_heads=3"),
    case("hf_top_k", lambda: ModelConfig.from_hf(dict(HF, num_experts_per_tok=8)), VE,
         "top_k=8 must be <= num_experts=4"),
    case("hf_architecture", lambda: ModelConfig.from_hf(dict(HF, model_type="llama")), VE,
         "unsupported architecture model_type='llama'"),
    case("hf_missing", lambda: ModelConfig.from_hf({k: v for k, v in HF.items()
                                                    if k != "vocab_size"}), VE,
         "config.json of model_type='mixtral' is missing 'vocab_size'"),
]

MOE_CASES = [
    case("moe_config_kind", lambda: MoE(dict(d_model=D), rngs=nnx.Rngs(0)), TE,
         "config must be a MoEConfig, got dict"),
    case("moe_block_index", lambda: MoE(moe_config(), block_index=2, num_blocks=2,
                                        rngs=nnx.Rngs(0)), VE,
         "need 0 <= block_index < num_blocks, got block_index=2, num_blocks=2"),
    case("moe_x_width", lambda: moe()(x(3, 8)), VE,
         "input must be [..., d_model=16], got shape (3, 8)"),
    case("moe_x_int", lambda: moe()(jnp.ones((3, D), jnp.int32)), VE,
         "input x must be floating, got dtype int32"),
    case("moe_x_list", lambda: moe()([[0.0] * D]), TE,
         "input x must be an array [..., d_model], got list"),
    case("apply_routing_kind", lambda: moe().apply_experts(x(), {"topk_idx": 0}), TE,
         "routing must be a Routing, got dict"),
    case("apply_routing_range", lambda: moe().apply_experts(x(), routing(bad_idx)), VE,
         "routing.topk_idx (expert ids) must lie in [0, 4); got 4 at token 1, slot 1"),
    case("apply_routing_nan", lambda: moe().apply_experts(x(), routing(w=[[np.nan, 1]] * 3)), VE,
         "routing.topk_weights must be finite; got nan at token 0, slot 0"),
    case("apply_routing_tokens", lambda: moe().apply_experts(x(5), routing()), VE,
         "routing covers 3 tokens but the input has 5 tokens"),
    case("apply_experts_pair", lambda: moe().apply_experts(x(), routing(), experts=(1, 2)), TE,
         "experts must be ExpertWeights or a tuple (w1, w3, w2), got tuple"),
    case("apply_experts_list", lambda: moe().apply_experts(
        x(), routing(), experts=([[0.0]], jnp.zeros((E, D, F)), jnp.zeros((E, F, D)))), TE,
         "experts.w1 must be an array or a sparse weight format, got list"),
    case("apply_experts_shape", lambda: moe().apply_experts(
        x(), routing(), experts=(jnp.zeros((E, D, F)),) * 2 + (jnp.zeros((E, D, F)),)), VE,
         "w2 must be [e=4, f=32, d_model=16], got (4, 16, 32)"),
    case("apply_experts_slots", lambda: moe().apply_experts(
        x(), routing(), experts=(jnp.zeros((2, D, F)),) * 2 + (jnp.zeros((2, F, D)),)), VE,
         "routing.topk_idx (expert ids) must lie in [0, 2); got 2 at token 1, slot 0"),
    case("standard_given_routing", lambda: moe()(x(), routing=routing()), VE,
         "pregate='standard' routes with the block's own gate; got a routing"),
    case("pregated_no_routing", lambda: moe("pregated", 1)(x()), VE,
         "block 1 needs the routing from block 0's pre-gate; got routing=None"),
    case("pregated_routing_range", lambda: moe("pregated", 1)(x(), routing=routing(bad_idx)), VE,
         "routing.topk_idx (expert ids) must lie in [0, 4); got 4 at token 1, slot 1"),
    case("pregated_routing_kind", lambda: moe("pregated", 1)(x(), routing=(bad_idx,)), TE,
         "routing must be a Routing, got tuple"),
]

tokens = lambda *rows: jnp.asarray(rows, jnp.int32)  # noqa: E731

MODEL_CASES = [
    case("tokens_past_vocab", lambda: model()(tokens([1, 2, V])), VE,
         "tokens must lie in [0, 50); got 50 at index (0, 2) (1 out-of-range entries)"),
    case("tokens_negative", lambda: model()(tokens([1, -3], [4, 5])), VE,
         "tokens must lie in [0, 50); got -3 at index (0, 1)"),
    case("tokens_float", lambda: model()(jnp.ones((1, 3))), VE,
         "tokens must be integer ids in [0, 50), got dtype float32"),
    case("tokens_1d", lambda: model()(jnp.ones((3,), jnp.int32)), VE,
         "tokens must be [b, t] token ids, got shape (3,)"),
    case("tokens_list", lambda: model()([[1, 2, 3]]), TE,
         "tokens must be a [b, t] integer array, got list"),
    case("tokens_mask_shape", lambda: model()(tokens([1, 2, 3]), mask=jnp.ones((1, 2), bool)), VE,
         "mask must be a bool [b, t] = (1, 3) like tokens, got ((1, 2), dtype('bool'))"),
    case("tokens_cache_batch", lambda: model()(tokens([1, 2], [3, 4]),
                                               cache=KVCache.init(model().config, 1, 4)), VE,
         "cache batch 1 != tokens batch 2"),
]


def gen(**kw) -> Generator:
    return Generator(model(), **kw)


GENERATE_CASES = [
    case("generate_past_vocab", lambda: gen().generate([[1, 2, V + 7]], max_new_tokens=2), VE,
         "prompts[0] token ids must lie in [0, 50); got 57 at index (2,)"),
    case("generate_negative", lambda: gen().generate([[1, 2], [3, -1]], max_new_tokens=2), VE,
         "prompts[1] token ids must lie in [0, 50); got -1 at index (1,)"),
    case("generate_float_ids", lambda: gen().generate([[1.5, 2]], max_new_tokens=2), VE,
         "prompts[0] must be a flat sequence of integer token ids, got shape (2,) and dtype "
         "float64"),
    case("generate_nested", lambda: gen().generate([[[1, 2]]], max_new_tokens=2), VE,
         "prompts[0] must be a flat sequence of integer token ids, got shape (1, 2)"),
    case("generate_text", lambda: gen().generate("hello", max_new_tokens=2), TE,
         "prompts must be a sequence of token-id sequences, got text"),
    case("generate_flat", lambda: gen().generate([1, 2, 3], max_new_tokens=2), TE,
         "prompts[0] must be a sequence of token ids, got int"),
    case("generate_text_rows", lambda: gen().generate(["hello"], max_new_tokens=2), TE,
         "prompts[0] must be a sequence of token ids, got str"),
    case("generate_no_prompts", lambda: gen().generate([], max_new_tokens=2), VE,
         "need at least one prompt, got none"),
    case("generate_empty_prompt", lambda: gen().generate([[1], []], max_new_tokens=2), VE,
         "every prompt needs at least one token, got lengths [1, 0]"),
    case("generate_max_new_zero", lambda: gen().generate([[1]], max_new_tokens=0), VE,
         "generate: max_new_tokens must be a positive int, got 0"),
    case("generate_max_new_float", lambda: gen().generate([[1]], max_new_tokens=2.5), VE,
         "generate: max_new_tokens must be a positive int, got 2.5"),
    case("generate_pad_id", lambda: gen(pad_id=-1).generate([[1]], max_new_tokens=2), VE,
         "pad_id must lie in [0, 50); got -1"),
    case("generator_eos_past_vocab", lambda: gen(eos_id=V), VE,
         "eos_id must lie in [0, 50); got 50"),
    case("generator_eos_negative", lambda: gen(eos_id=[2, -3]), VE,
         "eos_id must lie in [0, 50); got -3 at index (1,)"),
    case("generator_eos_float", lambda: gen(eos_id=2.0), VE,
         "eos_id must be an integer token id or a flat sequence of them, got 2.0"),
    case("generator_eos_bool", lambda: gen(eos_id=True), VE,
         "eos_id must be an integer token id or a flat sequence of them, got True"),
    case("offload_generator_eos", lambda: OffloadGenerator(
        model(), offload=OffloadConfig(policy="on_demand", routing_source="router"),
        eos_id=V + 1), VE, "eos_id must lie in [0, 50); got 51"),
    case("generate_bucket", lambda: gen(bucket=0).generate([[1]], max_new_tokens=2), VE,
         "Generator: bucket must be a positive int, got 0"),
    case("generate_function", lambda: generate(model(), [[V]], max_new_tokens=1), VE,
         "prompts[0] token ids must lie in [0, 50); got 50"),
    case("pad_prompts_vocab", lambda: pad_prompts([[3, 9]], vocab_size=5), VE,
         "prompts[0] token ids must lie in [0, 5); got 9 at index (1,)"),
    case("sampling_temperature", lambda: SamplingConfig(temperature=-1.0), VE,
         "temperature must be >= 0, got -1.0"),
    case("sampling_top_p", lambda: SamplingConfig(top_p=0.0), VE,
         "top_p must be in (0, 1], got 0.0"),
    case("sampling_top_k", lambda: SamplingConfig(top_k=-2), VE, "top_k must be >= 0, got -2"),
    case("offload_generate_past_vocab", lambda: OffloadGenerator(
        model(), offload=OffloadConfig(policy="on_demand", routing_source="router")).generate(
            [[1, V]], max_new_tokens=2), VE, "prompts[0] token ids must lie in [0, 50); got 50"),
    case("offload_generate_max_new", lambda: OffloadGenerator(
        model(), offload=OffloadConfig(policy="on_demand", routing_source="router")).generate(
            [[1]], max_new_tokens=0), VE, "max_new_tokens must be a positive int, got 0"),
    case("offload_generator_policy", lambda: OffloadGenerator(
        model(), offload=OffloadConfig(policy="pregated")), VE,
         "routing_source='pregate' computes block l+1 with block l's pre-gate choice"),
]

OFFLOAD_CASES = [
    case("fetch_layer", lambda: cache().fetch(1, [0], demand=True), VE,
         "layer must be an int in [0, 1), got 1"),
    case("fetch_layer_negative", lambda: cache().fetch(-1, [0], demand=True), VE,
         "layer must be an int in [0, 1), got -1"),
    case("fetch_expert", lambda: cache().fetch(0, [E], demand=True), VE,
         "experts of layer 0 must be ints in [0, 4), got [4]"),
    case("fetch_expert_negative", lambda: cache().fetch(0, [1, -1], demand=False), VE,
         "experts of layer 0 must be ints in [0, 4), got [1, -1]"),
    case("fetch_expert_float", lambda: cache().fetch(0, [1.5], demand=True), VE,
         "experts of layer 0 must be ints in [0, 4), got [1.5]"),
    case("use_expert", lambda: cache().use(0, [9]), VE,
         "experts of layer 0 must be ints in [0, 4), got [9]"),
    case("use_not_resident", lambda: cache().use(0, [1]), KeyError,
         "expert (0, 1) is not resident in the cache"),
    case("cache_slots", lambda: ExpertCache(store(), slots=1, top_k=2), VE,
         "cache of slots=1 slots cannot hold the top_k=2 experts one token needs"),
    case("cache_eviction", lambda: ExpertCache(store(), slots=2, top_k=1, eviction="fifo"), VE,
         "eviction must be one of"),
    case("store_empty", lambda: ExpertStore([]), VE, "need at least one layer and one expert"),
    case("store_leading_axis", lambda: ExpertStore.from_stacked(
        [{"w1": np.zeros((4, 2), np.float32), "w2": np.zeros((3, 2), np.float32)}]), VE,
         "layer 0: every leaf needs the same leading expert axis"),
    case("offload_policy", lambda: OffloadConfig(policy="lazy"), VE, "policy must be one of"),
]

EVAL_TRAIN_CASES = [
    case("eval_seq_len", lambda: evaluate.EvalConfig(seq_len=0), VE,
         "seq_len must be a positive int, got 0"),
    case("eval_batch", lambda: evaluate.EvalConfig(batch_size=1.5), VE,
         "batch_size must be a positive int, got 1.5"),
    case("eval_max_windows", lambda: evaluate.EvalConfig(max_windows=0), VE,
         "max_windows must be None or a positive int, got 0"),
    case("eval_tokens_past_vocab", lambda: evaluate.evaluate_tokens(
        model(), np.array([1, 2, V]), np.ones(3, np.int64)), VE,
         "token ids must be in [0, 50) for the model's vocab_size=50, got ids in [1, 50]"),
    case("eval_tokens_float", lambda: evaluate.evaluate_tokens(
        model(), np.array([1.0, 2.0]), np.ones(2, np.int64)), VE,
         "token ids must be integers, got dtype float64"),
    case("eval_tokens_one", lambda: evaluate.evaluate_tokens(
        model(), np.array([1]), np.ones(1, np.int64)), VE, "need at least 2 tokens"),
    case("train_steps", lambda: train.TrainConfig(steps=0), VE, "steps must be a positive int"),
    case("train_accum", lambda: train.TrainConfig(steps=1, batch_size=6, grad_accum=4), VE,
         "batch_size=6 must be a multiple of grad_accum=4"),
    case("train_dtype", lambda: train.TrainConfig(steps=1, dtype="float64"), VE,
         "dtype must be one of ['bfloat16', 'float32'], got 'float64'"),
    case("train_distill", lambda: train.TrainConfig(steps=1, distill_weight=2.0), VE,
         "distill_weight must be in [0, 1], got 2.0"),
    case("train_lr", lambda: train.TrainConfig(steps=1, learning_rate=0.0), VE,
         "learning_rate must be a finite number > 0, got 0.0"),
    case("train_check_tokens",
         lambda: train_data.check_tokens(np.array([0, V]), V, "train stream"), VE,
         "train stream holds token ids in [0, 50]; the model's vocabulary is [0, 50)"),
    case("pregate_config_loss", lambda: PregateTrainConfig(loss="mse"), VE,
         "loss must be 'kl' or 'topk', got 'mse'"),
    case("pregate_config_eval_fraction", lambda: PregateTrainConfig(eval_fraction=0.7), VE,
         "eval_fraction must be in (0, 0.5), got 0.7"),
]

CORPUS_CASES = [
    case("tokenizer_empty_texts",
         lambda: bpe_tokenizer.train_tokenizer(["", ""], vocab_size=300), VE,
         "tokenizer training needs some text; got 2 documents, all empty"),
    case("tokenizer_no_texts", lambda: bpe_tokenizer.train_tokenizer([], vocab_size=300), VE,
         "tokenizer training needs some text; got 0 documents"),
    case("tokenizer_vocab", lambda: bpe_tokenizer.train_tokenizer(["abc"], vocab_size=100), VE,
         "vocab_size=100 is too small for byte-level BPE"),
    case("tokenizer_not_str", lambda: bpe_tokenizer.train_tokenizer(["abc", 3], vocab_size=300), VE,
         "texts[1] should be a str, got int"),
    case("encode_eos",
         lambda: bpe_tokenizer.encode_documents(tokenizer(), ["abc"], eos_id=10_000), VE,
         "eos_id=10000 is outside the tokenizer's vocabulary"),
    case("text_streams_empty", lambda: evaluate.text_streams(tokenizer(), {"empty": ""},
                                                             vocab_size=300), VE,
         "text 'empty' (0 bytes) gives 0 token(s); at least 2 are needed"),
    case("text_streams_vocab", lambda: evaluate.text_streams(tokenizer(), {"a": "to be"},
                                                             vocab_size=10), VE,
         "the tokenizer's vocabulary has"),
    case("split_texts_string", lambda: corpus.split_texts({"a": "x", "b": "y"}, "a"), VE,
         "validation should be a sequence of text names, got the string 'a'"),
    case("split_texts_missing", lambda: corpus.split_texts({"a": "x"}, ["b"]), VE,
         "validation texts ['b'] are not in the corpus"),
    case("split_texts_empty_train", lambda: corpus.split_texts({"a": "x"}, ["a"]), VE,
         "leaves 0 train and 1 validation texts"),
]

CASES = (CONFIG_CASES + MOE_CASES + MODEL_CASES + GENERATE_CASES + OFFLOAD_CASES
         + EVAL_TRAIN_CASES + CORPUS_CASES)


@pytest.mark.parametrize("fn,exc,match", CASES)
def test_bad_input_raises(fn, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        fn()


# ----------------------------------------------------------------------------- traced checks


def _primitives(jaxpr) -> set[str]:
    """Names of every primitive in ``jaxpr`` and its sub-jaxprs."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    names |= _primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    names |= _primitives(sub)
    return names


def _apply_experts(idx, w):
    return moe().apply_experts(x(), Routing(idx, w))


def _pregated(idx, w):
    return moe("pregated", 1)(x(), routing=Routing(idx, w))[0]


def _forward(tok):
    return model()(tok)[0]


def _plan(idx, w):
    return RoutingPlan.build(idx, w, num_experts=E, block_t=8).sorted_ids


good_idx = jnp.array([[0, 1], [2, 3], [1, 0]], jnp.int32)
half = jnp.full((3, 2), 0.5, f32)
nan_w = half.at[2, 1].set(jnp.nan)
TRACED = [  # (function, bad arguments, message start, the traced message's offending values)
    pytest.param(_apply_experts, (jnp.asarray(bad_idx), half),
                 "routing.topk_idx (expert ids) must lie in [0, 4); got ", "values in [0, 4]",
                 id="apply_experts_range"),
    pytest.param(_apply_experts, (good_idx.at[0, 0].set(-2), half),
                 "routing.topk_idx (expert ids) must lie in [0, 4); got ", "values in [-2, 3]",
                 id="apply_experts_negative"),
    pytest.param(_apply_experts, (good_idx, nan_w),
                 "routing.topk_weights must be finite; got ", "1 non-finite entries",
                 id="apply_experts_nan"),
    pytest.param(_pregated, (jnp.asarray(bad_idx), half),
                 "routing.topk_idx (expert ids) must lie in [0, 4); got ", "values in [0, 4]",
                 id="pregated_range"),
    pytest.param(_forward, (tokens([1, 2, V + 1]),),
                 "tokens must lie in [0, 50); got ", "values in [1, 51]", id="model_tokens_vocab"),
    pytest.param(_forward, (tokens([-1, 2, 3]),),
                 "tokens must lie in [0, 50); got ", "values in [-1, 3]",
                 id="model_tokens_negative"),
    pytest.param(_plan, (jnp.asarray(bad_idx), half),
                 "topk_idx must lie in [0, 4); got ", "values in [0, 4]", id="plan_range"),
    pytest.param(_plan, (good_idx, nan_w), "topk_weights must be finite; got ",
                 "1 non-finite entries", id="plan_nan"),
]


@pytest.mark.parametrize("fn,args,start,traced", TRACED)
def test_traced_values_checked_only_inside_checked(fn, args, start, traced):
    jitted = jax.jit(fn)
    jitted(*args)  # unchecked under jit: runs (the production path has no check)
    with pytest.raises(ValueError, match=re.escape(start + traced)):
        checked(jitted)(*args)  # traced again with the checks (jit's cache key changes)
    with pytest.raises(ValueError, match=re.escape(start)):
        checked(fn)(*args)  # not jitted: concrete values, checked eagerly


@pytest.mark.parametrize("fn,args", [(p.values[0], p.values[1]) for p in TRACED[::2]])
def test_checked_passes_good_input_and_production_jaxpr_has_no_check(fn, args):
    good = tuple(jnp.where(jnp.isfinite(a), jnp.clip(a, 0, 3), 0.5).astype(a.dtype) for a in args)
    np.testing.assert_array_equal(np.asarray(checked(jax.jit(fn))(*good)),
                                  np.asarray(jax.jit(fn)(*good)))
    production = _primitives(jax.make_jaxpr(fn)(*good).jaxpr)
    with checking():
        with_checks = _primitives(jax.make_jaxpr(fn)(*good).jaxpr)
    assert "check" not in production
    assert "check" in with_checks

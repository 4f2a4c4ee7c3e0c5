"""Malformed input to the configs, model, layers, routing, generation, expert parallelism and
kernel references gets a clear error: a ValueError or TypeError whose message names the field
or argument and the value given (malformed-input campaign, cases #12-#379). Valid input that
sits next to a refused one (zero tokens, an empty cache, the default top-k) still runs.
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

from pallas_kernels import NMSparse, RoutingPlan, SamoyedsSparse
from pallas_kernels.checks import checked
from pallas_kernels.nm_matmul import nm_matmul_reference, samoyeds_matmul_reference
from pallas_kernels.formats import pack_meta
from pallas_kernels.nm_matmul import SparseMatmulConfig
from pallas_kernels.tiled_format import TiledSparse
from pallas_kernels.transposed_format import TransposedSparse
from samoyeds_jax.config import MoEConfig, SparsityConfig
from samoyeds_jax.generate import Generator, SamplingConfig, generate, sample
from samoyeds_jax.layers import AttentionConfig, RMSNorm, apply_rope
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.moe import Router, SharedExperts
from samoyeds_jax.parallel import ExpertParallel
from samoyeds_jax.routing import route_logits

V, D = 50, 16  # vocabulary and width of the tiny model
VE, TE = ValueError, TypeError
HF = dict(model_type="mixtral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, vocab_size=V,
          num_hidden_layers=1)


def config(**changes) -> ModelConfig:
    c = ModelConfig(architecture="tiny", vocab_size=V, num_layers=1,
                    attention=AttentionConfig(d_model=D, num_heads=2, num_kv_heads=1, head_dim=8),
                    moe=MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=2), eos_token_id=2)
    return c.replace(**changes) if changes else c


@functools.cache
def model() -> MoETransformer:
    """The tiny model with zero parameters (only the input checks matter here): built
    abstractly, which is much faster than drawing every weight eagerly."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoETransformer(config(),
                                                                      rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state))


def gate():
    return model().layers[0].mlp.gate  # d=16 -> 4 experts, top-2


def tokens(b: int = 1, t: int = 4) -> jax.Array:
    return jnp.ones((b, t), jnp.int32)


@functools.partial(jax.jit, static_argnames="logits_for")
def forward(state, tokens, mask, cache, logits_for="all"):
    """The tiny model's forward under ``jit`` (traced values: no concrete checks)."""
    return nnx.merge(nnx.graphdef(model()), state)(tokens, mask=mask, cache=cache,
                                                   logits_for=logits_for)


def overflow():
    """6 more tokens into an 8-slot cache that already holds 6 (as after a 6-token forward)."""
    cache = dataclasses.replace(model().init_cache(1, 8), index=jnp.asarray(6, jnp.int32))
    model()(tokens(1, 6), cache=cache)


def case(name, fn, exc, match):
    """``fn()`` must raise ``exc`` with ``match`` (a literal fragment) in its message."""
    return pytest.param(fn, exc, match, id=name)


def _raises(fn, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        fn()


CONFIG_CASES = [
    case("norm_eps_negative", lambda: config(norm_eps=-1.0), VE,
         "ModelConfig: norm_eps must be a finite number > 0, got -1.0"),
    case("eos_past_vocab", lambda: config(eos_token_id=100000), VE,
         "ModelConfig: eos_token_id must be None or a token id in [0, vocab_size=50), got 100000"),
    case("bos_negative", lambda: config(bos_token_id=-1), VE,
         "ModelConfig: bos_token_id must be None or a token id in [0, vocab_size=50), got -1"),
    case("eos_float", lambda: config(eos_token_id=2.0), VE,
         "eos_token_id must be None or a token id in [0, vocab_size=50), got 2.0"),
    case("max_positions_negative", lambda: config(max_position_embeddings=-5), VE,
         "ModelConfig: max_position_embeddings must be a positive int, got -5"),
    case("dtype_unknown", lambda: config(dtype="float33"), VE,
         "ModelConfig: dtype must be a floating dtype (float32, bfloat16 or float16), got "
         "'float33'"),
    case("param_dtype_int", lambda: config(param_dtype=jnp.int32), VE,
         "ModelConfig: param_dtype must be a floating dtype"),
    case("from_hf_path", lambda: ModelConfig.from_hf("/path/to/config.json"), TE,
         "ModelConfig.from_hf: hf must be the config.json contents as a dict "
         "(samoyeds_jax.hf_import.read_hf_config(directory) reads it), got str"),
    case("from_hf_eps_string", lambda: ModelConfig.from_hf(dict(HF, rms_norm_eps="1e-6")), VE,
         "config.json: rms_norm_eps must be a finite number > 0, got '1e-6'"),
    case("sparsity_m_sel_string", lambda: SparsityConfig(n_sel=2, m_sel="4"), VE,
         "SparsityConfig: m_sel must be a positive int, got '4'"),
    case("sparsity_density_string", lambda: SparsityConfig(density="0.5"), VE,
         "SparsityConfig: density must be a finite number, got '0.5'"),
    case("attention_eps_string", lambda: AttentionConfig(d_model=D, num_heads=2, num_kv_heads=1,
                                                         head_dim=8, norm_eps="1e-6"), VE,
         "AttentionConfig: norm_eps must be a finite number, got '1e-6'"),
]

MODEL_CASES = [
    case("model_config_dict", lambda: MoETransformer({"vocab_size": 64}, rngs=nnx.Rngs(0)), TE,
         "MoETransformer: config must be a ModelConfig (e.g. ModelConfig.tiny()), got dict"),
    case("mask_empty_row", lambda: model()(tokens(2), mask=jnp.array([[1, 1, 1, 1], [0] * 4],
                                                                     bool)), VE,
         "mask row 1 has no True entry"),
    case("logits_for_unknown", lambda: forward(nnx.state(model()), tokens(), None, None,
                                               logits_for="final"), VE,
         "logits_for must be one of ('all', 'last'), got 'final'"),
    case("cache_overflow", overflow, VE,
         "6 new tokens do not fit the cache: 2 of its 8 slots are free (cache.index=6)"),
    case("init_cache_negative", lambda: model().init_cache(1, -4), VE,
         "KVCache.init: slots must be an int >= 0, got -4"),
    case("init_cache_float_batch", lambda: model().init_cache(1.0, 4), VE,
         "KVCache.init: batch must be an int >= 0, got 1.0"),
]

LAYER_CASES = [
    case("gate_top_k_zero", lambda: gate()(jnp.ones((4, D)), top_k=0), VE,
         "top_k must be an int in [1, num_experts=4], got 0"),
    case("gate_top_k_past_experts", lambda: gate()(jnp.ones((4, D)), top_k=5), VE,
         "top_k must be an int in [1, num_experts=4], got 5"),
    case("route_logits_nan", lambda: route_logits(jnp.full((2, 4), jnp.nan), top_k=2,
                                                  norm="topk_softmax"), VE,
         "route_logits: logits must be finite; got nan at token 0, expert 0"),
    case("rope_positions_1d", lambda: apply_rope(jnp.ones((1, 4, 2, 8)), jnp.arange(4),
                                                 theta=1e4), VE,
         "apply_rope: x must be [b, t, h, hd] and positions [b, t] = (1, 4), got x (1, 4, 2, 8) "
         "and positions (4,)"),
    case("rope_theta_negative", lambda: apply_rope(jnp.ones((1, 4, 2, 8)),
                                                   jnp.zeros((1, 4), jnp.int32), theta=-1.0), VE,
         "rotary embedding: theta must be a finite number > 0, got -1.0"),
    case("shared_width_zero", lambda: SharedExperts(8, 0, rngs=nnx.Rngs(0)), VE,
         "SharedExperts: width must be a positive int, got 0"),
    case("shared_gate_unknown", lambda: SharedExperts(8, 16, gate="relu", rngs=nnx.Rngs(0)), VE,
         "gate must be one of ('none', 'sigmoid'), got 'relu'"),
    case("expert_parallel_no_mesh", lambda: ExpertParallel(mesh=None), TE,
         "ExpertParallel: mesh must be a jax.sharding.Mesh (make_expert_mesh builds one), got "
         "NoneType"),
]

GENERATE_CASES = [
    case("generator_sampling_dict", lambda: Generator(model(), sampling={"temperature": 1.0}),
         TE, "Generator: sampling must be a SamplingConfig, got dict"),
    case("generate_sampling_none", lambda: generate(model(), [[1]], max_new_tokens=1,
                                                    sampling=None), TE,
         "Generator: sampling must be a SamplingConfig, got NoneType"),
    case("stream_not_callable", lambda: Generator(model()).generate([[1, 2]], max_new_tokens=2,
                                                                    stream="yes"), TE,
         "generate: stream must be None or a callable stream(position, tokens), got str"),
    case("temperature_nan", lambda: SamplingConfig(temperature=float("nan")), VE,
         "SamplingConfig: temperature must be a finite number, got nan"),
    case("temperature_string", lambda: SamplingConfig(temperature="hot"), VE,
         "SamplingConfig: temperature must be a finite number, got 'hot'"),
    case("top_k_float", lambda: SamplingConfig(temperature=1.0, top_k=2.5), VE,
         "SamplingConfig: top_k must be an int (0 = off), got 2.5"),
    case("top_p_string", lambda: SamplingConfig(top_p="0.9"), VE,
         "SamplingConfig: top_p must be a finite number, got '0.9'"),
    case("sample_logits_1d", lambda: sample(jnp.ones((8,)), jax.random.key(0),
                                            SamplingConfig(temperature=1.0, top_k=2)), VE,
         "sample: logits must be [b, vocab], got shape (8,)"),
    case("sample_config_none", lambda: sample(jnp.ones((1, 8)), jax.random.key(0), None), TE,
         "sample: config must be a SamplingConfig, got NoneType"),
]

KERNEL_CASES = [
    case("nm_abstract_1d", lambda: NMSparse.abstract((16,), "float32"), VE,
         "NMSparse.abstract: shape must be [..., K, N] (at least 2 dims), got (16,)"),
    case("samoyeds_abstract_1d", lambda: SamoyedsSparse.abstract((128,), "float32"), VE,
         "SamoyedsSparse.abstract: shape must be [..., K, N] (at least 2 dims), got (128,)"),
    case("tiled_abstract_1d", lambda: TiledSparse.abstract((64,), "float32", num_slots=1), VE,
         "TiledSparse.abstract: shape must be [..., K, N] (at least 2 dims), got (64,)"),
    case("samoyeds_reference_int_x", lambda: samoyeds_matmul_reference(
        jnp.ones((4, 128), jnp.int32), SamoyedsSparse.from_dense(np.zeros((128, 8), "float32"))),
        VE, "samoyeds_matmul_reference: x must have a floating dtype, got int32"),
    case("nm_reference_int_x", lambda: nm_matmul_reference(
        jnp.ones((4, 32), jnp.int32), NMSparse.from_dense(np.zeros((32, 8), "float32"))),
        VE, "nm_matmul_reference: x must have a floating dtype, got int32"),
    case("nm_reference_wrong_k", lambda: nm_matmul_reference(
        jnp.ones((4, 64)), NMSparse.from_dense(np.zeros((32, 8), "float32"))),
        VE, "nm_matmul_reference: x has K=64 but w has K=32"),
    case("capacity_negative_tokens", lambda: RoutingPlan.capacity_for(-1, 2, 4, 8), VE,
         "RoutingPlan.capacity_for: num_tokens must be an int >= 0, got -1"),
    case("capacity_zero_block", lambda: RoutingPlan.capacity_for(4, 2, 4, 0), VE,
         "RoutingPlan.capacity_for: block_t must be a positive int, got 0"),
]


@pytest.mark.parametrize("fn,exc,match", CONFIG_CASES + MODEL_CASES + LAYER_CASES
                         + GENERATE_CASES + KERNEL_CASES)
def test_bad_input_raises(fn, exc, match):
    _raises(fn, exc, match)


def test_valid_neighbours_still_run():
    """Inputs next to the refused ones keep working."""
    assert RoutingPlan.capacity_for(0, 2, 4, 8) == 32  # no tokens
    x, _, cache = model().embed(tokens(1, 0), None, None)  # an empty forward: a 0-slot cache
    assert x.shape == (1, 0, D) and cache.slots == 0
    cache = model().init_cache(2, 6)  # 2 tokens fill the last free slots; left padding in row 0
    cache = dataclasses.replace(cache, index=jnp.asarray(4, jnp.int32))
    x, step, _ = model().embed(tokens(2, 2), jnp.array([[0, 1], [1, 1]], bool), cache)
    assert x.shape == (2, 2, D) and step.positions.tolist() == [[0, 0], [0, 1]]
    assert gate()(jnp.ones((4, D)), top_k=None).topk_idx.shape == (4, 2)
    assert gate()(jnp.ones((4, D)), top_k=4).topk_idx.shape == (4, 4)
    w = NMSparse.from_dense(np.zeros((32, 8), "float32"))
    assert nm_matmul_reference(jnp.ones((2, 32)), w).dtype == jnp.float32  # any floating x
    assert config(dtype="bfloat16", bos_token_id=None, eos_token_id=V - 1).eos_token_id == V - 1
    assert SamplingConfig(temperature=1, top_k=np.int64(3), top_p=np.float32(0.5)).top_k == 3


def test_traced_checks_are_left_out_of_jit_and_run_inside_checked():
    """The cache, mask and router-logit value checks need concrete values: a jitted forward
    traces past them; router logits are checked inside ``checked``."""
    mask = jnp.array([[0, 0, 1, 1], [1] * 4], bool)
    logits, cache = forward(nnx.state(model()), tokens(2, 4), mask, model().init_cache(2, 4),
                            logits_for="last")
    assert logits.shape == (2, V) and int(cache.index) == 4
    route = functools.partial(route_logits, top_k=2, norm="topk_softmax")
    with pytest.raises(ValueError, match=re.escape("route_logits: logits must be finite")):
        checked(jax.jit(route))(jnp.full((2, 4), jnp.nan))
    assert route(jnp.zeros((2, 4))).topk_idx.shape == (2, 2)


def _hf(**changes) -> dict:
    return {**HF, **changes}


CAMPAIGN2_CASES = [
    case("hf_hidden_act", lambda: ModelConfig.from_hf(_hf(hidden_act="gelu")), VE,
         "hidden_act must be one of ('silu', 'swish') (the experts compute SiLU only), got 'gelu'"),
    case("hf_rope_theta", lambda: ModelConfig.from_hf(_hf(rope_theta="big")), VE,
         "config.json: rope_theta must be a finite number > 0, got 'big'"),
    case("hf_rope_theta_params", lambda: ModelConfig.from_hf(
        _hf(rope_parameters={"rope_type": "default", "rope_theta": "big"})), VE,
         "config.json: rope_theta must be a finite number > 0, got 'big'"),
    case("hf_tie", lambda: ModelConfig.from_hf(_hf(tie_word_embeddings=1)), VE,
         "config.json: tie_word_embeddings must be a JSON boolean (true/false), got 1"),
    case("hf_attention_bias_str", lambda: ModelConfig.from_hf(_hf(attention_bias="false")), VE,
         "config.json: attention_bias must be a JSON boolean (true/false), got 'false'"),
    case("tie_str", lambda: config(tie_word_embeddings="yes"), VE,
         "ModelConfig: tie_word_embeddings must be a bool, got 'yes'"),
    case("architecture", lambda: config(architecture=3), VE,
         "ModelConfig: architecture must be a non-empty str (a model_type), got 3"),
    case("rngs_none", lambda: MoETransformer(config(), rngs=None), TE,
         "MoETransformer: rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got NoneType"),
    case("rngs_int", lambda: MoETransformer(config(), rngs=0), TE,
         "MoETransformer: rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got int"),
    case("cache_str", lambda: model()(tokens(), cache="kv"), TE,
         "cache must be a KVCache (model.init_cache) or None, got str"),
    case("generator_none", lambda: Generator(None), TE,
         "Generator: model must be a MoETransformer (or ScannedTransformer), got NoneType"),
    case("generator_str", lambda: Generator("model"), TE,
         "Generator: model must be a MoETransformer (or ScannedTransformer), got str"),
    case("bucket_neg", lambda: Generator(model(), bucket=-8), VE,
         "Generator: bucket must be a positive int, got -8"),
    case("bucket_str", lambda: Generator(model(), bucket="16"), VE,
         "Generator: bucket must be a positive int, got '16'"),
    case("max_positions", lambda: Generator(model()).generate([[1, 2, 3]], max_new_tokens=4094),
         VE, "generate: the longest prompt (3 tokens) + max_new_tokens=4094 exceeds the model's "
         "max_position_embeddings=4096"),
    case("smc_block_t", lambda: SparseMatmulConfig(block_t=-16), VE,
         "SparseMatmulConfig: block_t must be a positive int, got -16"),
    case("smc_block_n", lambda: SparseMatmulConfig(block_n="64"), VE,
         "SparseMatmulConfig: block_n must be a positive int, got '64'"),
    case("smc_load", lambda: SparseMatmulConfig(load="scatter"), VE,
         "SparseMatmulConfig: load must be 'gather' or 'split' or 'expand', got 'scatter'"),
    case("sparsity_n_float", lambda: SparsityConfig(n=2.0), VE,
         "SparsityConfig: n must be a positive int, got 2.0"),
    case("tiled_tile_n_float", lambda: TiledSparse.from_dense(np.ones((8, 8), "float32"),
                                                              tile_n=8.0), VE,
         "TiledSparse: tile_n must be an int or None, got 8.0"),
    case("tiled_num_slots", lambda: TiledSparse.abstract((8, 8), jnp.float32, num_slots=-1), VE,
         "TiledSparse.abstract: num_slots must be a positive int, got -1"),
    case("pack_meta_float", lambda: pack_meta(jnp.zeros((16, 8), jnp.float32), 2, 4), TE,
         "pack_meta: positions must have an integer dtype (row positions in [0, 4)), got float32"),
    case("from_nm_dense", lambda: TransposedSparse.from_nm(jnp.ones((32, 8))), TE,
         "TransposedSparse.from_nm: w must be an NMSparse"),
    case("shared_d_ff_alone", lambda: MoEConfig(d_model=D, d_ff=32, num_experts=4, top_k=2,
                                                shared_d_ff=64), VE,
         "MoEConfig: shared_d_ff=64 has no effect without shared experts"),
    case("route_logits_1d", lambda: route_logits(jnp.zeros(4), top_k=2, norm="topk_softmax"), VE,
         "route_logits: logits must be a [t, e] array, got (4,)"),
    case("route_logits_int", lambda: route_logits(jnp.ones((2, 4), jnp.int32), top_k=2,
                                                  norm="topk_softmax"), VE,
         "route_logits: logits must have a floating dtype, got int32"),
    case("rope_int", lambda: apply_rope(jnp.ones((1, 4, 2, 8), jnp.int32),
                                        jnp.zeros((1, 4), jnp.int32), theta=1e4), VE,
         "apply_rope: x must have a floating dtype, got int32"),
    case("rmsnorm_zero", lambda: RMSNorm(0), VE,
         "RMSNorm: num_features must be a positive int, got 0"),
    case("rmsnorm_eps", lambda: RMSNorm(8, eps=-1.0), VE,
         "RMSNorm: eps must be a finite number > 0, got -1.0"),
    case("router_d_model", lambda: Router(0, 4, top_k=2, rngs=nnx.Rngs(0)), VE,
         "Router: d_model must be a positive int, got 0"),
    case("sample_int", lambda: sample(jnp.ones((1, 8), jnp.int32), jax.random.key(0),
                                      SamplingConfig()), VE,
         "sample: logits must have a floating dtype, got int32"),
]


CAMPAIGN2_CASES += [
    case("nm_from_dense_empty_k", lambda: NMSparse.from_dense(np.zeros((0, 8), np.float32)), VE,
         "w must be [..., K, N] with at least 2 dims and K, N > 0, got shape (0, 8)"),
    case("abstract_string_shape", lambda: NMSparse.abstract("16x8", jnp.float32), TE,
         "NMSparse.abstract: shape must be a tuple of ints [..., K, N], got '16x8'"),
    case("tiled_slot_align_str", lambda: TiledSparse.from_dense(jnp.ones((8, 8)), slot_align="4"),
         VE, "slot_align='4' must be an int >= 1"),
    case("plan_python_lists", lambda: RoutingPlan.build([[0, 1]], [[0.5, 0.5]], num_experts=4,
                                                        block_t=8), TE,
         "topk_idx must be an array (jnp.asarray), got list"),
    case("generator_pad_none", lambda: Generator(model(), pad_id=None), TE,
         "pad_id must be an int token id, got None"),
    case("generate_prompts_none", lambda: Generator(model()).generate(None, max_new_tokens=2), TE,
         "prompts must be a sequence of token-id sequences, got NoneType"),
    case("mask_float", lambda: model()(tokens(), mask=jnp.ones((1, 4))), VE,
         "mask must be a bool [b, t] = (1, 4) like tokens"),
]


@pytest.mark.parametrize("fn,exc,match", CAMPAIGN2_CASES)
def test_campaign2_bad_input_raises(fn, exc, match):
    _raises(fn, exc, match)


def test_campaign2_valid_neighbours():
    """SiLU's other name and a bool tie are read; a top_k above the vocabulary is clamped."""
    hf = _hf(hidden_act="swish", tie_word_embeddings=True)
    assert ModelConfig.from_hf(hf).tie_word_embeddings
    sampling = SamplingConfig(temperature=1.0, top_k=10)
    assert sample(jnp.array([[0.0, 1.0]]), jax.random.key(0), sampling).shape == (1,)

"""MoETransformer: configs from Hugging Face dicts, KV-cache consistency, padding invariance."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax.model import KVCache, ModelConfig, MoETransformer

MIXTRAL_8X7B = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
QWEN15_MOE = {
    "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 24,
    "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False, "vocab_size": 151936,
    "rope_theta": 1e6, "use_sliding_window": False, "sliding_window": 32768,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "eos_token_id": 151643,
    "tie_word_embeddings": False,
}
QWEN3_30B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768, "head_dim": 128,
    "num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 48,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 151936,
    "rope_theta": 1e6, "attention_bias": False, "rope_scaling": None, "eos_token_id": 151645,
    "tie_word_embeddings": False,
}
OLMOE = {
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "vocab_size": 50304,
    "rope_theta": 10000.0, "clip_qkv": None, "eos_token_id": 50279, "tie_word_embeddings": False,
}


def _shrink(hf: dict) -> dict:
    """The same family at the tiny preset's sizes (every option kept), so compiled ops are shared."""
    small = dict(hf, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, vocab_size=512, torch_dtype="float32", num_experts_per_tok=2,
                 eos_token_id=2)  # inside the smaller vocabulary
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in small:
            small[key] = 256
    if "head_dim" in small:
        small["head_dim"] = 32
    for key in ("num_local_experts", "num_experts"):
        if key in small:
            small[key] = 4
    return small


def test_from_hf_maps_every_family():
    mix = ModelConfig.from_hf(MIXTRAL_8X7B)
    assert (mix.attention.num_kv_heads, mix.attention.head_dim, mix.moe.d_ff) == (8, 128, 14336)
    assert mix.moe.router_norm == "topk_softmax" and mix.attention.qk_norm == "none"
    assert mix.dtype == jnp.bfloat16 and mix.eos_token_id == 2

    qw = ModelConfig.from_hf(QWEN15_MOE)
    assert qw.moe.router_norm == "softmax_topk" and qw.attention.qkv_bias
    assert (qw.moe.num_shared_experts, qw.moe.shared_d_ff, qw.moe.shared_gate) == (1, 5632, "sigmoid")
    assert qw.attention.sliding_window is None  # use_sliding_window=False

    q3 = ModelConfig.from_hf(QWEN3_30B)
    assert q3.attention.head_dim == 128 and q3.attention.qk_norm == "per_head"
    assert q3.moe.router_norm == "topk_softmax" and not q3.attention.qkv_bias

    ol = ModelConfig.from_hf(OLMOE)
    assert ol.attention.qk_norm == "full" and ol.moe.router_norm == "softmax_topk"


def test_from_hf_reads_newer_transformers_names():
    """transformers >= 5: dtype (not torch_dtype), rope_parameters, Qwen3 num_local_experts."""
    hf = {k: v for k, v in QWEN3_30B.items() if k not in ("num_experts", "rope_theta")}
    hf.update(num_local_experts=128, dtype="bfloat16",
              rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    cfg = ModelConfig.from_hf(hf)
    assert cfg.moe.num_experts == 128 and cfg.param_dtype == jnp.bfloat16
    assert cfg.attention.rope_theta == 5e5


@pytest.mark.parametrize("bad,match", [
    (dict(MIXTRAL_8X7B, model_type="llama"), "unsupported architecture"),
    ({k: v for k, v in MIXTRAL_8X7B.items() if k != "num_local_experts"}, "num_local_experts"),
    (dict(QWEN3_30B, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (dict(QWEN3_30B, rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope scaling"),
    (dict(QWEN15_MOE, mlp_only_layers=[0]), "dense"),
    (dict(OLMOE, clip_qkv=8.0), "clip_qkv"),
])
def test_from_hf_rejects_unsupported(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(bad)


@pytest.mark.parametrize("hf,published", [
    (MIXTRAL_8X7B, 46.7e9), (QWEN15_MOE, 14.3e9), (QWEN3_30B, 30.5e9), (OLMOE, 6.9e9)])
def test_full_size_parameter_counts_by_shape(hf, published):
    """Full-size configs build abstractly (no memory) with the published parameter counts."""
    model = nnx.eval_shape(lambda: MoETransformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0)))
    total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert abs(total - published) / published < 0.005, total
    if hf is MIXTRAL_8X7B:
        assert total == 46_702_792_704


FAMILIES = {"tiny": None, "qwen2_moe": QWEN15_MOE, "qwen3_moe": QWEN3_30B, "olmoe": OLMOE}
_MODELS: dict[str, MoETransformer] = {}


def _model(family: str) -> MoETransformer:
    """One model per family for the whole module (initialization compiles; do it once)."""
    if family not in _MODELS:
        hf = FAMILIES[family]
        cfg = ModelConfig.tiny() if hf is None else ModelConfig.from_hf(_shrink(hf))
        _MODELS[family] = MoETransformer(cfg, rngs=nnx.Rngs(len(_MODELS)))
    return _MODELS[family]


@jax.jit
def _forward(model: MoETransformer, tokens, mask, cache):
    return model(tokens, mask=mask, cache=cache)


def _run(model, tokens, mask, cache):
    """Jitted forward (a pytree-registered NNX module is a valid jit argument)."""
    return _forward(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool), cache)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_prefill_then_decode_equals_full_forward(rng, family):
    model = _model(family)
    v = model.config.vocab_size
    tokens = rng.integers(0, v, (2, 6)).astype(np.int32)
    ones = np.ones((2, 6), bool)
    full, _ = _run(model, tokens, ones, KVCache.init(model.config, 2, 8))  # [2, 6, v]

    # Prefill the first 5 tokens left-padded to width 6 (junk ids in the pad slot), then
    # decode token 5 from the cache.
    pre_tokens = np.concatenate([rng.integers(0, v, (2, 1)), tokens[:, :5]], axis=1)
    pre_mask = np.concatenate([np.zeros((2, 1), bool), np.ones((2, 5), bool)], axis=1)
    pre, cache = _run(model, pre_tokens, pre_mask, KVCache.init(model.config, 2, 8))
    step, cache = _run(model, tokens[:, 5:], np.ones((2, 1), bool), cache)
    chex.assert_trees_all_close(pre[:, 1:], full[:, :5], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(step[:, 0], full[:, 5], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == 7
    np.testing.assert_array_equal(np.asarray(cache.lengths), [6, 6])
    assert np.isfinite(np.asarray(pre)).all()


def test_left_padding_does_not_change_logits(rng):
    model = _model("tiny")
    v = model.config.vocab_size
    tokens = rng.integers(0, v, (2, 6)).astype(np.int32)
    ones = np.ones((2, 6), bool)
    full, _ = _run(model, tokens, ones, KVCache.init(model.config, 2, 8))
    # Row 0: its first 3 tokens behind 3 pads; row 1: all 6 tokens. Causal attention means
    # row 0's logits must equal the first 3 positions of its unpadded forward.
    padded = tokens.copy()
    padded[0, 3:] = tokens[0, :3]
    padded[0, :3] = rng.integers(0, v, 3)
    mask = ones.copy()
    mask[0, :3] = False
    got, cache = _run(model, padded, mask, KVCache.init(model.config, 2, 8))
    chex.assert_trees_all_close(got[0, 3:], full[0, :3], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(got[1], full[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [3, 6])


def test_tied_embeddings_have_no_lm_head():
    cfg = ModelConfig.tiny().replace(tie_word_embeddings=True)
    model = nnx.eval_shape(lambda: MoETransformer(cfg, rngs=nnx.Rngs(0)))
    assert not hasattr(model, "lm_head")
    logits, _ = nnx.eval_shape(lambda m, t: m(t), model, jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, 512) and logits.dtype == jnp.float32


def test_pregated_model_threads_routing():
    cfg = ModelConfig.tiny().replace(moe=dict(pregate="pregated"))
    model = nnx.eval_shape(lambda: MoETransformer(cfg, rngs=nnx.Rngs(0)))
    assert model.layers[0].mlp.pregate is not None and model.layers[-1].mlp.pregate is None
    # Block 1 raises unless it receives block 0's routing, so tracing the forward proves the
    # routing is handed from block to block.
    logits, _ = nnx.eval_shape(lambda m, t: m(t), model, jnp.zeros((2, 5), jnp.int32))
    assert logits.shape == (2, 5, 512)


def test_cache_overflow_and_batch_mismatch_raise():
    cfg = ModelConfig.tiny()
    model = nnx.eval_shape(lambda: MoETransformer(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="do not fit"):
        model(jnp.zeros((1, 5), jnp.int32), cache=KVCache.init(cfg, 1, 4))
    with pytest.raises(ValueError, match="batch"):
        model(jnp.zeros((1, 2), jnp.int32), cache=KVCache.init(cfg, 2, 4))

"""RMSNorm, rotary embedding and grouped-query attention against direct numpy formulas."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax.layers import (Attention, AttentionConfig, RMSNorm, apply_rope, attention_mask,
                                 rope_frequencies)


def test_rmsnorm_matches_formula(rng):
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    norm = RMSNorm(16, eps=1e-5)
    norm.scale[...] = jnp.asarray(rng.standard_normal(16), jnp.float32)
    want = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * np.asarray(norm.scale[...])
    chex.assert_trees_all_close(norm(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def test_rmsnorm_bf16_output_dtype(rng):
    x = jnp.asarray(rng.standard_normal((2, 8)), jnp.bfloat16)
    assert RMSNorm(8)(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("theta", [10_000.0, 1_000_000.0])
def test_rope_matches_direct_formula(rng, theta):
    b, t, h, hd = 2, 5, 3, 8
    x = rng.standard_normal((b, t, h, hd)).astype(np.float32)
    pos = rng.integers(0, 1000, (b, t)).astype(np.int32)
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=theta))
    want = np.empty_like(x)
    half = hd // 2
    for i in range(half):
        ang = pos.astype(np.float64) * theta ** (-2.0 * i / hd)  # [b, t]
        c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
        a, bb = x[..., i], x[..., i + half]
        want[..., i] = a * c - bb * s
        want[..., i + half] = bb * c + a * s
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_distance(rng):
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        qm = apply_rope(q, jnp.full((1, 1), m, jnp.int32), theta=10_000.0)
        kn = apply_rope(k, jnp.full((1, 1), n, jnp.int32), theta=10_000.0)
        return float(jnp.sum(qm * kn))

    np.testing.assert_allclose(score(7, 3), score(104, 100), rtol=1e-4)


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        rope_frequencies(7, 10_000.0)


def test_attention_mask_causal_valid_and_window():
    valid = jnp.asarray([[False, True, True, True, True]])
    m = np.asarray(attention_mask(valid, jnp.asarray(1, jnp.int32), 4))
    want = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(m[0, :, 1:], want)
    assert not m[0, :, 0].any()
    w = np.asarray(attention_mask(valid, jnp.asarray(1, jnp.int32), 4, sliding_window=2))
    np.testing.assert_array_equal(w[0, :, 1:], np.tril(np.ones((4, 4), bool)) & ~np.tril(
        np.ones((4, 4), bool), -2))


def _naive_attention(attn: Attention, x: np.ndarray) -> np.ndarray:
    """Causal GQA attention on one unpadded batch, written out with repeated kv heads."""
    c = attn.config
    b, t, _ = x.shape
    kern = lambda lin: np.asarray(lin.kernel[...])  # noqa: E731
    bias = lambda lin: np.asarray(lin.bias[...]) if lin.bias is not None else 0.0  # noqa: E731
    q = (x @ kern(attn.q_proj) + bias(attn.q_proj)).reshape(b, t, c.num_heads, c.head_dim)
    k = (x @ kern(attn.k_proj) + bias(attn.k_proj)).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = (x @ kern(attn.v_proj) + bias(attn.v_proj)).reshape(b, t, c.num_kv_heads, c.head_dim)
    pos = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
    q = np.asarray(apply_rope(jnp.asarray(q), pos, theta=c.rope_theta))
    k = np.asarray(apply_rope(jnp.asarray(k), pos, theta=c.rope_theta))
    g = c.num_heads // c.num_kv_heads
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c.head_dim)
    s = np.where(np.tril(np.ones((t, t), bool))[None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, -1)
    return o @ kern(attn.o_proj)


@pytest.mark.parametrize("qk_norm,bias", [("none", False), ("none", True)])
def test_attention_matches_naive_gqa(rng, qk_norm, bias):
    c = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=bias,
                        qk_norm=qk_norm, rope_theta=500.0)
    attn = Attention(c, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    if bias:
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.bias[...] = jnp.asarray(rng.standard_normal(lin.bias.shape) * 0.1, jnp.float32)
    b, t = 2, 7
    x = rng.standard_normal((b, t, 32)).astype(np.float32)
    y, ck, cv = _attend(attn, x)
    np.testing.assert_allclose(np.asarray(y), _naive_attention(attn, x), rtol=1e-4, atol=1e-5)
    assert ck.shape == cv.shape == (b, t, 2, 8)


@pytest.mark.parametrize("qk_norm", ["per_head", "full"])
def test_qk_norm_parameter_shapes(qk_norm):
    c = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=qk_norm)
    attn = Attention(c, rngs=nnx.Rngs(0))
    want = {"per_head": (8, 8), "full": (32, 16)}[qk_norm]
    assert (attn.q_norm.scale.shape[0], attn.k_norm.scale.shape[0]) == want


def test_attention_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionConfig(d_model=32, num_heads=4, num_kv_heads=3, head_dim=8)


def _attend(attn, x):
    b, t, _ = x.shape
    c = attn.config
    cache = jnp.zeros((b, t, c.num_kv_heads, c.head_dim), jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    return attn(jnp.asarray(x), positions=pos, mask=attention_mask(jnp.ones((b, t), bool), zero, t),
                cache_k=cache, cache_v=cache, index=zero)


@pytest.mark.parametrize("qk_norm,bias", [("none", True), ("per_head", False), ("full", False)])
@pytest.mark.parametrize("t", [1, 3])
def test_fuse_qkv_joins_the_projections_and_keeps_the_output(rng, qk_norm, bias, t):
    c = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=bias,
                        qk_norm=qk_norm)
    attn = Attention(c, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    if bias:
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.bias[...] = jnp.asarray(rng.standard_normal(lin.bias.shape), jnp.float32)
    kernels = [np.asarray(p.kernel[...]) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    x = rng.standard_normal((2, t, 32)).astype(np.float32)
    before = _attend(attn, x)
    assert attn.fuse_qkv() and attn.fused and attn.fuse_qkv()  # a second call keeps it
    assert set(attn.projections()) == {"qkv_proj", "o_proj"}
    assert attn.q_proj is None and attn.k_proj is None and attn.v_proj is None
    np.testing.assert_array_equal(np.asarray(attn.qkv_proj.kernel[...]),
                                  np.concatenate(kernels, axis=1))
    assert (attn.qkv_proj.bias is not None) == bias
    chex.assert_trees_all_close(_attend(attn, x), before, rtol=1e-5, atol=1e-5)


def test_fuse_qkv_of_a_merged_copy_leaves_the_original_intact():
    """A copy merged from the original's state shares its variables: fusing the copy must not
    write into them (the original keeps its q/k/v and its output)."""
    c = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
    original = Attention(c, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float32)
    before = _attend(original, x)
    copy = nnx.merge(*nnx.split(original))
    assert copy.fuse_qkv()
    assert not original.fused and original.q_proj.kernel.shape == (32, 32)
    chex.assert_trees_all_close(_attend(original, x), before, rtol=0, atol=0)
    chex.assert_trees_all_close(_attend(copy, x), before, rtol=1e-5, atol=1e-5)


def test_fuse_qkv_leaves_sparse_kernels_apart():
    from samoyeds_jax.config import LinearConfig
    c = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8)
    attn = Attention(c, linear=LinearConfig(format="nm"), rngs=nnx.Rngs(0))
    assert not attn.fuse_qkv() and not attn.fused
    assert set(attn.projections()) == {"q_proj", "k_proj", "v_proj", "o_proj"}

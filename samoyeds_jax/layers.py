"""Transformer building blocks: RMSNorm, rotary position embedding, grouped-query attention.

Attention works on a fixed-size, slot-addressed KV cache so that prefill and every decode step
run through one code path with static shapes:

- the cache has ``s`` slots per sequence; a forward of ``t`` tokens writes slots
  ``index .. index + t - 1`` (the same slots for every row of the batch);
- ``valid [b, s]`` says which slots hold real tokens (left padding leaves invalid slots);
- a query in slot ``i`` sees key slot ``j`` when ``valid[b, j]`` and ``j <= i`` (and, with a
  sliding window ``w``, ``i - j < w``). Slots of one sequence are contiguous, so slot order is
  token order;
- rotary positions are per row: the number of real tokens before the token, so a left-padded
  sequence gets exactly the positions (and logits) it would get alone.

Parameter names follow the Hugging Face checkpoints (``q_proj`` ... ``o_proj``, ``q_norm``,
``k_norm``); linear kernels are stored ``[in, out]`` for ``y = x @ W`` (the transpose of the
Hugging Face ``weight``), dense or in the sparse format of a ``LinearConfig``
(``samoyeds_jax.linear``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.checks import expect_number, expect_positive_ints
from samoyeds_jax.config import LinearConfig
from samoyeds_jax.linear import Linear, replace_value

QKNorm = Literal["none", "per_head", "full"]


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis, computed in float32 (as Hugging Face does).

    ``y = scale * (x / sqrt(mean(x**2) + eps))``; input ``[..., d]`` of any float dtype, output the
    module's ``dtype`` (the input dtype when ``dtype`` is None). Parameter: ``scale [d]``.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6, dtype: jnp.dtype | None = None,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # the scale starts at one; kept for the usual module signature
        expect_positive_ints("RMSNorm", num_features=num_features)
        expect_number("RMSNorm", "eps", eps, above=0)
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        normed = (xf * jax.lax.rsqrt(var + self.eps)).astype(out_dtype)
        scale = self.scale[...].astype(out_dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return scale * normed


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, i in [0, head_dim/2): float32 ``[head_dim//2]``."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim=}")
    expect_number("rotary embedding", "theta", theta, above=0)
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
    """Rotary position embedding in the Hugging Face "rotate half" layout.

    Args:
      x: ``[b, t, h, hd]``.
      positions: ``[b, t]`` integer token positions.
      theta: the base (``rope_theta``).
    Returns:
      ``[b, t, h, hd]`` in x's dtype: ``x * cos + rotate_half(x) * sin`` with the angle
      ``position * inv_freq`` repeated over both halves; computed in float32.
    """
    if x.ndim != 4 or tuple(jnp.shape(positions)) != x.shape[:2]:
        raise ValueError(f"apply_rope: x must be [b, t, h, hd] and positions [b, t] = "
                         f"{x.shape[:2]}, got x {x.shape} and positions {jnp.shape(positions)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"apply_rope: x must have a floating dtype, got {x.dtype}")
    hd = x.shape[-1]
    inv_freq = rope_frequencies(hd, theta)  # [hd/2]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [b, t, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, hd]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def attention_mask(valid: jax.Array, index: jax.Array, num_queries: int, *,
                   sliding_window: int | None = None) -> jax.Array:
    """Which key slots each query may see.

    Args:
      valid: ``[b, s]`` bool, slots holding real tokens (after this forward's write).
      index: ``[]`` int32, slot of the first query.
      num_queries: t, queries occupy slots ``index .. index + t - 1``.
      sliding_window: if set, a query sees only the last ``sliding_window`` slots up to itself.
    Returns:
      ``[b, t, s]`` bool.
    """
    s = valid.shape[1]
    q_slot = index + jnp.arange(num_queries, dtype=jnp.int32)  # [t]
    k_slot = jnp.arange(s, dtype=jnp.int32)  # [s]
    allowed = k_slot[None, :] <= q_slot[:, None]  # [t, s]
    if sliding_window is not None:
        allowed = allowed & (q_slot[:, None] - k_slot[None, :] < sliding_window)
    return allowed[None, :, :] & valid[:, None, :]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Shape and options of one attention block.

    ``qk_norm``: "per_head" normalises each head's q and k over head_dim (Qwen3), "full" normalises
    the whole q and k projections before the head split (OLMoE), "none" skips it.
    """

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    qkv_bias: bool = False
    qk_norm: QKNorm = "none"
    norm_eps: float = 1e-6
    sliding_window: int | None = None

    def __post_init__(self):
        expect_positive_ints("AttentionConfig", d_model=self.d_model, num_heads=self.num_heads,
                             num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotary embedding)")
        expect_number("AttentionConfig", "rope_theta", self.rope_theta)
        expect_number("AttentionConfig", "norm_eps", self.norm_eps)
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ValueError(f"rope_theta and norm_eps must be > 0, got {self.rope_theta=}, "
                             f"{self.norm_eps=}")
        if self.sliding_window is not None:
            expect_positive_ints("AttentionConfig", sliding_window=self.sliding_window)
        if self.qk_norm not in ("none", "per_head", "full"):
            raise ValueError(f"qk_norm must be 'none', 'per_head' or 'full', got {self.qk_norm!r}")


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embedding over a slot-addressed KV cache.

    Parameters (Hugging Face name -> here): ``q_proj.weight`` [h*hd, d] -> ``q_proj.kernel`` [d, h*hd]
    (and ``.bias`` when ``qkv_bias``), same for ``k_proj``/``v_proj`` with kv heads, ``o_proj.weight``
    [d, h*hd] -> ``o_proj.kernel`` [h*hd, d]; ``q_norm.weight``/``k_norm.weight`` ->
    ``q_norm.scale``/``k_norm.scale``.
    """

    def __init__(self, config: AttentionConfig, *, linear: LinearConfig = LinearConfig(),
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)

        def linear_(k_in, n_out, bias):
            return Linear(k_in, n_out, config=linear, use_bias=bias, dtype=dtype,
                          param_dtype=param_dtype, kernel_init=init, rngs=rngs)

        self.q_proj = linear_(c.d_model, c.num_heads * c.head_dim, c.qkv_bias)
        self.k_proj = linear_(c.d_model, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = linear_(c.d_model, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = linear_(c.num_heads * c.head_dim, c.d_model, False)
        self.qkv_proj: Linear | None = nnx.data(None)  # q, k, v joined by fuse_qkv
        if c.qk_norm == "per_head":
            self.q_norm = RMSNorm(c.head_dim, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(c.head_dim, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype)
        elif c.qk_norm == "full":
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, eps=c.norm_eps, dtype=dtype,
                                  param_dtype=param_dtype)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, eps=c.norm_eps, dtype=dtype,
                                  param_dtype=param_dtype)

    def projections(self) -> dict[str, Linear]:
        """The projections by name: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; after
        ``fuse_qkv``, ``qkv_proj`` and ``o_proj``."""
        names = ("qkv_proj", "o_proj") if self.fused else ("q_proj", "k_proj", "v_proj", "o_proj")
        return {name: getattr(self, name) for name in names}

    @property
    def fused(self) -> bool:
        """Whether ``fuse_qkv`` joined q, k and v into ``qkv_proj``."""
        return self.qkv_proj is not None

    def fuse_qkv(self) -> bool:
        """Join the q, k and v projections into one ``qkv_proj`` (kernel ``[d, (h + 2 kv) hd]``,
        the three side by side; biases likewise), once, in place, when their kernels are dense
        arrays of one dtype; sparse kernels stay apart. The three products become one: at
        decode XLA reads the joined weight at up to 2.2x the speed of three separate products
        (benchmarks/generate.md). A layout for inference, like a prepared kernel: the model is
        saved or exported before it. Returns whether the projections are fused now."""
        if self.fused:
            return True
        parts = [self.q_proj, self.k_proj, self.v_proj]
        kernels = [p.kernel.get_value() for p in parts]
        if not all(isinstance(k, jax.Array) for k in kernels) or len(
                {k.dtype for k in kernels}) != 1 or len({p.config for p in parts}) != 1:
            return False
        # New variables, never a write into q_proj's (``replace_value``): a graph merged from
        # this one's state (nnx.merge) shares them and keeps its unfused q/k/v.
        fused = self.q_proj
        replace_value(fused, "kernel", jnp.concatenate(kernels, axis=1))
        if fused.bias is not None:
            replace_value(fused, "bias", jnp.concatenate([p.bias.get_value() for p in parts]))
        self.qkv_proj, self.q_proj, self.k_proj, self.v_proj = fused, None, None, None
        return True

    def __call__(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
                 cache_k: jax.Array, cache_v: jax.Array, index: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attend ``t`` new tokens to themselves and the cache: ``o_proj(context(...))``.

        Args: as ``context``. Returns ``(y [b, t, d], cache_k, cache_v)``.
        """
        ctx, cache_k, cache_v = self.context(x, positions=positions, mask=mask, cache_k=cache_k,
                                             cache_v=cache_v, index=index)
        return self.o_proj(ctx), cache_k, cache_v

    def context(self, x: jax.Array, *, positions: jax.Array, mask: jax.Array,
                cache_k: jax.Array, cache_v: jax.Array, index: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The heads' outputs before ``o_proj`` (its input, e.g. for calibration).

        Args:
          x: ``[b, t, d]``.
          positions: ``[b, t]`` int32 rotary positions.
          mask: ``[b, t, s]`` bool from ``attention_mask``.
          cache_k, cache_v: ``[b, s, kv_h, hd]``; this forward's keys/values go to slots
            ``index .. index + t - 1``.
          index: ``[]`` int32 first slot written.
        Returns:
          ``(context [b, t, h * hd], cache_k, cache_v)`` with the updated caches.
        """
        c = self.config
        b, t, _ = x.shape
        if self.fused:
            nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            q, k, v = jnp.split(self.qkv_proj(x), [nq, nq + nkv], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, theta=c.rope_theta)
        k = apply_rope(k, positions, theta=c.rope_theta)

        zero = jnp.zeros((), jnp.int32)
        at = (zero, index, zero, zero)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), at)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), at)

        groups = c.num_heads // c.num_kv_heads
        qg = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
        scores = jnp.einsum("btkgh,bskh->bkgts", qg, cache_k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * (c.head_dim ** -0.5)
        # A finite floor (not -inf): a query with no visible key (a padding slot) gets a uniform
        # average instead of NaN; such rows are never read back as real outputs.
        floor = jnp.finfo(jnp.float32).min
        scores = jnp.where(mask[:, None, None, :, :], scores, floor)  # [b, kv_h, g, t, s]
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, cache_v.astype(self.dtype),
                         preferred_element_type=jnp.float32).astype(self.dtype)
        return out.reshape(b, t, c.num_heads * c.head_dim), cache_k, cache_v

"""The key/value cache of every layer, and where one forward's new tokens go in it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.checks import expect_ints
from samoyeds_jax.layers import attention_mask

if TYPE_CHECKING:
    from samoyeds_jax.model_config import ModelConfig


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

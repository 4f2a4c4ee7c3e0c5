"""The model's blocks under ``lax.scan``: one compiled block body however deep the model.

``scan_blocks(model)`` returns a ``ScannedTransformer``: the model's first and last blocks as
they are (under pre-gating block 0 routes itself; the last block has no pre-gate) and the
blocks between them stacked into one ``DecoderBlock`` whose parameters lead with a block axis
``[L - 2, ...]``, run by ``jax.lax.scan``. Its KV cache (``init_cache``) keeps the middle
blocks' keys and values stacked the same way. It is called like the model
(``scanned(tokens, mask=..., cache=..., logits_for=...)``, the model's own embedding, block
forward and head) and ``Generator`` runs it like the model, with the same tokens; the compiled
program holds three copies of the block body instead of L (compile times:
benchmarks/compile_time.md).

Speed: not measured on a GPU yet. Inside the scan each block's weights are a dynamic slice of
the stacked arrays; XLA's own matmuls read the slice in place, but a Pallas kernel (a custom
call) may get a copy of it, one more pass over the weights per block and step: measure decode
against the unrolled model (``examples/bench_generate.py --scan``) before relying on it.

Stacking copies the middle blocks' parameters (drop the model afterwards, or build it
abstract). The middle blocks must be alike (``alike``: the same graph but for the MoE
layer's index, the same parameter structure, shapes and dtypes). Inference only: no router
logits, and MoE recall counters are not updated inside the scan.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from samoyeds_jax.model import DecoderBlock, KVCache, LogitsFor, MoETransformer


def _stack(*leaves):
    """One leaf of the stacked state: arrays stacked on a new leading axis; abstract leaves
    (``jax.ShapeDtypeStruct``, an abstract model) get the stacked shape."""
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype)
    return jnp.stack(leaves)


def _signature(state: nnx.State):
    return jax.tree.structure(state), [(tuple(a.shape), str(a.dtype))
                                       for a in jax.tree.leaves(state)]


def alike(a: DecoderBlock, b: DecoderBlock) -> bool:
    """Whether two blocks differ at most in their index: the same graph (every setting and
    static attribute but the MoE layer's ``block_index``) and the same parameter structure,
    shapes and dtypes (formats and layouts). One block's graph then runs the other's state
    (``nnx.merge``), so a program compiled for one serves both."""
    if _signature(nnx.state(a)) != _signature(nnx.state(b)):
        return False
    index = getattr(b.mlp, "block_index", None)
    if index is None:
        return nnx.graphdef(a) == nnx.graphdef(b)
    b.mlp.block_index = getattr(a.mlp, "block_index", None)
    try:  # compared with b's index set to a's, then restored
        return nnx.graphdef(a) == nnx.graphdef(b)
    finally:
        b.mlp.block_index = index


class ScannedTransformer(nnx.Module):
    """``MoETransformer``'s forward with the middle blocks under one ``lax.scan`` (see the
    module doc). Build it with ``scan_blocks``."""

    # The model's own embedding (with its input checks), output head and logits.
    embed = MoETransformer.embed
    head = MoETransformer.head
    logits = MoETransformer.logits

    def __init__(self, model: MoETransformer):
        blocks = list(model.layers)
        if len(blocks) < 3:
            raise ValueError(f"scan_blocks needs a model of at least 3 blocks (the first and the "
                             f"last stay apart); this one has {len(blocks)}")
        self.config = model.config
        self.embed_tokens = model.embed_tokens
        self.norm = model.norm
        if not model.config.tie_word_embeddings:
            self.lm_head = model.lm_head
        self.first, self.last = blocks[0], blocks[-1]
        graphdef, state = nnx.split(blocks[1])
        states = [state]
        for i, block in enumerate(blocks[2:-1], start=2):
            if not alike(block, blocks[1]):
                raise ValueError(f"block {i} differs from block 1 in its settings or in its "
                                 "parameters' structure, shapes or dtypes: the middle blocks "
                                 "must be alike to be scanned")
            states.append(nnx.state(block))
        # Block 1's graph for all of them: the blocks differ only in their index, which matters
        # to block 0 alone (it routes itself under pre-gating).
        self.middle = nnx.merge(graphdef, jax.tree.map(_stack, *states))
        self.num_middle = len(states)

    def init_cache(self, batch: int, slots: int) -> KVCache:
        """An empty KV cache: ``keys``/``values`` = (first block, middle blocks stacked
        ``[L - 2, b, s, h, d]``, last block)."""
        ends = KVCache.init(self.config.replace(num_layers=2), batch, slots)  # first, last
        def middle():  # keys and values apart: the generator donates each
            return jnp.zeros((self.num_middle,) + ends.keys[0].shape, ends.keys[0].dtype)

        return dataclasses.replace(ends, keys=(ends.keys[0], middle(), ends.keys[1]),
                                   values=(ends.values[0], middle(), ends.values[1]))

    def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None,
                 cache: KVCache | None = None, logits_for: LogitsFor = "all"):
        """``MoETransformer.__call__`` without router logits: ``(logits float32, cache)``."""
        x, step, cache = self.embed(tokens, mask, cache)
        if len(cache.keys) != 3 or cache.keys[1].ndim != 5:
            raise ValueError("the cache must come from ScannedTransformer.init_cache (middle "
                             "blocks stacked), not KVCache.init")
        kw = dict(positions=step.positions, mask=step.attn_mask, index=cache.index)
        x, k0, v0, routing = self.first(x, cache_k=cache.keys[0], cache_v=cache.values[0],
                                        routing=None, **kw)
        graphdef, params = nnx.split(self.middle)

        def body(carry, layer):
            x, routing = carry
            state, cache_k, cache_v = layer
            block = nnx.merge(graphdef, state)
            x, cache_k, cache_v, routing = block(x, cache_k=cache_k, cache_v=cache_v,
                                                 routing=routing, **kw)
            return (x, routing), (cache_k, cache_v)

        (x, routing), (km, vm) = jax.lax.scan(body, (x, routing),
                                              (params, cache.keys[1], cache.values[1]))
        x, kl, vl, _ = self.last(x, cache_k=cache.keys[2], cache_v=cache.values[2],
                                 routing=routing, **kw)
        return self.head(x, logits_for), cache.advance((k0, km, kl), (v0, vm, vl), step.valid,
                                                       step.mask)


def scan_blocks(model: MoETransformer) -> ScannedTransformer:
    """The model with its middle blocks stacked under ``lax.scan`` (see the module doc)."""
    return ScannedTransformer(model)

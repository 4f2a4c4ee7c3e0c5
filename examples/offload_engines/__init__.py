"""Offload engines for benchmarks and tests: MoE block stacks with experts in pinned host memory.

The library's offloaded path is ``samoyeds_jax.generate_offload.OffloadGenerator``: the real
``MoETransformer`` blocks, with the per-block fetch logic of ``samoyeds_jax.offload.BlockScheduler``
and the policies of ``samoyeds_jax.fetch_policy``. The engines here run stand-in stacks instead,
to measure and test the fetch policies in isolation:

* ``decoder``: ``OffloadDecoder``, the host-driven engine over pure block functions
  (``BlockFns``), with the same ``BlockScheduler``, ``ExpertStore`` and ``ExpertCache`` as the
  generator; ``moe_stack`` builds such a stack from ``samoyeds_jax.moe.MoE`` layers;
  ``overlap_fraction`` is the benchmarks' measure of transfer hidden under compute.
* ``simple_block``: ``SimpleMoEBlock``, a self-contained pre-gated block with random
  parameters whose expert arithmetic ignores the slot layout (outputs of every policy equal
  ``gpu_only`` bit for bit).
* ``in_jit``: ``InJitDecoder``, the whole decode step as one jitted program that fetches
  experts from pinned-host stacks with the expert ids kept on the device (no host read per
  block). It takes ``BlockFns``, so it cannot drive ``MoETransformer``.

What they found (``benchmarks/offload.md``, one H100, jax 0.11.2): a host-driven
``device_put`` starts only after the compute already queued, so the pregated prefetch of block
l+1 is issued before block l's expert compute and overlaps it (Mixtral-8x7B-shaped,
pregated step 1.00-1.04x max(compute, transfer)); the price is one host read of expert ids
per block. In one jitted program the per-expert copies (decode, t*k < e) are asynchronous
but XLA does not overlap them with compute: they run as kernels on the compute stream.
Whole-stack copies (t*k >= e) are DMAs that XLA does overlap (pregated 1.04-1.05x
max(compute, transfer) at 8192-16384 tokens).
"""

from .decoder import (MOE_BLOCK_FNS, BlockFns, MoELayerParams, OffloadDecoder, moe_stack,
                      overlap_fraction)
from .in_jit import InJitConfig, InJitDecoder
from .simple_block import SimpleMoEBlock, expert_mlp, topk_routing

__all__ = [
    "BlockFns", "OffloadDecoder", "MoELayerParams", "MOE_BLOCK_FNS", "moe_stack",
    "overlap_fraction", "SimpleMoEBlock", "expert_mlp", "topk_routing",
    "InJitConfig", "InJitDecoder",
]

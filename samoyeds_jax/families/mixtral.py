"""Mixtral (``MixtralForCausalLM``): a ``block_sparse_moe`` module with ``w1``/``w3``/``w2``
experts, always top-k-then-softmax routing, an optional sliding window.

``ModelConfig.tiny`` (architecture ``"tiny"``) has this layout and is exported as Mixtral.
"""

from __future__ import annotations

from typing import Any

from samoyeds_jax.families.base import Family


class Mixtral(Family):
    model_type = "mixtral"
    name = "Mixtral"
    causal_lm = "MixtralForCausalLM"
    aliases = ("tiny",)
    num_experts_key = "num_local_experts"
    has_norm_topk_prob = False
    # transformers >= 5 names the MoE module ``mlp`` in memory (and in what it saves).
    moe_names = ("block_sparse_moe", "mlp")
    expert_names = ("w1", "w3", "w2")

    def config_to_hf(self, config) -> dict[str, Any]:
        return super().config_to_hf(config) | dict(
            sliding_window=config.attention.sliding_window, router_jitter_noise=0.0)

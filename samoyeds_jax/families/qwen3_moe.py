"""Qwen3-MoE (``Qwen3MoeForCausalLM``): the Qwen MoE layout with per-head q/k norms and its
own head_dim; no q/k/v bias, no shared expert."""

from __future__ import annotations

from typing import Any

from samoyeds_jax.families.qwen2_moe import QwenMoe


class Qwen3Moe(QwenMoe):
    model_type = "qwen3_moe"
    name = "Qwen3-MoE"
    causal_lm = "Qwen3MoeForCausalLM"
    qk_norm = "per_head"

    def config_to_hf(self, config) -> dict[str, Any]:
        return super().config_to_hf(config) | dict(attention_bias=False)

"""OLMoE (``OlmoeForCausalLM``): q/k norms over the whole projection, head_dim derived from
the hidden size, no sliding window, no attention bias, no q/k/v clipping."""

from __future__ import annotations

from typing import Any

from samoyeds_jax.families.base import Family


class Olmoe(Family):
    model_type = "olmoe"
    name = "OLMoE"
    causal_lm = "OlmoeForCausalLM"
    qk_norm = "full"
    derives_head_dim = True
    has_sliding_window = False

    def config_to_hf(self, config) -> dict[str, Any]:
        return super().config_to_hf(config) | dict(attention_bias=False, clip_qkv=None)

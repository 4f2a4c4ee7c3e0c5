"""Qwen2-MoE / Qwen1.5-MoE (``Qwen2MoeForCausalLM``) and what Qwen3-MoE shares with it.

Both: every layer a MoE layer (``decoder_sparse_step=1``, no ``mlp_only_layers``), expert
width ``moe_intermediate_size``, a sliding window only when ``use_sliding_window`` says so.
Qwen2-MoE adds q/k/v biases, head_dim derived from the hidden size, and one optional shared
expert with a sigmoid gate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from samoyeds_jax.families.base import Family


class QwenMoe(Family):
    """The layout Qwen2-MoE and Qwen3-MoE share (not registered itself)."""

    d_ff_key = "moe_intermediate_size"

    def config_from_hf(self, hf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise ValueError(
                "dense (non-MoE) layers are not supported: need decoder_sparse_step=1 and empty "
                f"mlp_only_layers, got {hf.get('decoder_sparse_step')=}, "
                f"{hf.get('mlp_only_layers')=}")
        pieces = super().config_from_hf(hf)
        pieces["attention"]["sliding_window"] = (hf.get("sliding_window")
                                                 if hf.get("use_sliding_window") else None)
        return pieces

    def config_to_hf(self, config) -> dict[str, Any]:
        # The window (if any) applies to the layers from max_window_layers on, so 0 puts it
        # on all of them.
        window = config.attention.sliding_window
        return super().config_to_hf(config) | dict(
            intermediate_size=config.moe.d_ff, decoder_sparse_step=1, mlp_only_layers=[],
            use_sliding_window=window is not None, sliding_window=window,
            max_window_layers=0 if window is not None else config.num_layers)


class Qwen2Moe(QwenMoe):
    model_type = "qwen2_moe"
    name = "Qwen2-MoE"
    causal_lm = "Qwen2MoeForCausalLM"
    has_qkv_bias = True
    derives_head_dim = True
    has_shared_expert = True

    def config_from_hf(self, hf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        pieces = super().config_from_hf(hf)
        pieces["attention"]["qkv_bias"] = bool(hf.get("qkv_bias", True))
        if hf.get("shared_expert_intermediate_size", 0):
            pieces["moe"].update(num_shared_experts=1,
                                 shared_d_ff=hf["shared_expert_intermediate_size"],
                                 shared_gate="sigmoid")
        return pieces

    def config_to_hf(self, config) -> dict[str, Any]:
        return super().config_to_hf(config) | dict(
            qkv_bias=config.attention.qkv_bias,
            shared_expert_intermediate_size=config.moe.shared_width)

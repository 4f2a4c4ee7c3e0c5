"""``Family``: what one Hugging Face model family says in its ``config.json`` and tensor names.

The defaults are the conventions most MoE families of transformers share (an ``mlp`` MoE
module with ``gate_proj``/``up_proj``/``down_proj`` experts, ``num_experts`` and
``norm_topk_prob`` in the config); a family's module overrides only what differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pallas_kernels.checks import expect_number

if TYPE_CHECKING:
    from samoyeds_jax.model_config import ModelConfig

Path = tuple[str | int, ...]

# Our names of the routed experts' gate, up and down projection stacks (``MoE.w1/w3/w2``).
ROUTED = ("w1", "w3", "w2")


def need(hf: Mapping[str, Any], key: str) -> Any:
    """``hf[key]``; ValueError naming the key and the family when the config lacks it."""
    if key not in hf:
        raise ValueError(f"config.json of model_type={hf.get('model_type')!r} is missing {key!r}")
    return hf[key]


def routed(path: Path) -> bool:
    """Whether parameter ``path`` is a routed expert stack ``layers.{i}.mlp.w1/w3/w2``
    ``[e, ...]``, one Hugging Face tensor per expert."""
    return len(path) == 4 and path[0] == "layers" and path[2] == "mlp" and path[3] in ROUTED


def transposed(path: Path) -> bool:
    """Whether parameter ``path`` is a linear kernel ``[in, out]``, stored by Hugging Face as a
    torch weight ``[out, in]``."""
    return path[-1] in ("kernel", "gate_kernel") + ROUTED


class Family:
    """One Hugging Face model family: config mapping both ways and tensor names.

    Attributes (class attributes; a subclass overrides what differs):
      model_type: the ``config.json`` ``model_type`` (the registry key).
      name: display name in messages.
      causal_lm: transformers' ``...ForCausalLM`` class, written in ``architectures``.
      aliases: other ``ModelConfig.architecture`` values exported as this family.
      d_ff_key, num_experts_key: config keys of the expert width and count.
      has_norm_topk_prob: the config says whether top-k weights are renormalized
        (``norm_topk_prob``); without it, routing is always ``topk_softmax``.
      qk_norm: the q/k norm of the family's attention.
      has_qkv_bias: the config can give q/k/v projections a bias (without an o_proj bias).
      derives_head_dim: the family's attention uses ``hidden_size / num_attention_heads``.
      has_sliding_window: the family's attention can use a sliding window.
      has_shared_expert: the family's MoE can have one shared expert with a sigmoid gate.
      attention: the attention module's name (projections ``q_proj`` .. ``o_proj``, norms
        ``q_norm``/``k_norm`` under it).
      moe_names: the MoE module's name as written, then other names accepted on import.
      router, pregate: the gate and pre-gate linear names under the MoE module.
      expert_names: the routed experts' (gate, up, down) names under ``experts.{j}``.
      shared_expert, shared_expert_names, shared_expert_gate: the shared expert's module, its
        (gate, up, down) names, and its gate's name under the MoE module.
    """

    model_type: str = ""
    name: str = ""
    causal_lm: str = ""
    aliases: tuple[str, ...] = ()

    d_ff_key: str = "intermediate_size"
    num_experts_key: str = "num_experts"
    has_norm_topk_prob: bool = True
    qk_norm: str = "none"
    has_qkv_bias: bool = False
    derives_head_dim: bool = False
    has_sliding_window: bool = True
    has_shared_expert: bool = False

    attention: str = "self_attn"
    moe_names: tuple[str, ...] = ("mlp",)
    router: str = "gate"
    pregate: str = "pregate"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: str = "shared_expert"
    shared_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert_gate: str = "shared_expert_gate"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_type={self.model_type!r})"

    # ------------------------------------------------------------------------- config.json

    def config_from_hf(self, hf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The family's part of ``ModelConfig.from_hf``: ``{"attention": ..., "moe": ...}``,
        keyword arguments of ``AttentionConfig`` and ``MoEConfig`` (the fields every family
        reads alike come from ``from_hf`` itself)."""
        check_common_hf(hf)
        d_ff, key = need(hf, self.d_ff_key), self.num_experts_key
        # transformers >= 5 writes some families' expert count as num_local_experts.
        experts = hf[key] if key in hf else need(hf, "num_local_experts")
        if self.has_norm_topk_prob:
            router_norm = "topk_softmax" if hf.get("norm_topk_prob", False) else "softmax_topk"
        else:
            router_norm = "topk_softmax"
        return {
            "attention": dict(qk_norm=self.qk_norm, qkv_bias=bool(hf.get("attention_bias", False)),
                              sliding_window=hf.get("sliding_window")),
            "moe": dict(d_ff=d_ff, num_experts=experts, router_norm=router_norm),
        }

    def config_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        """The ``config.json`` dict of ``config`` (no dtype: the exporter adds it). Check
        ``inexpressible`` first: what the family cannot say is left out here."""
        a, m = config.attention, config.moe
        theta = float(a.rope_theta)
        hf: dict[str, Any] = {
            "architectures": [self.causal_lm],
            "model_type": self.model_type,
            "vocab_size": config.vocab_size,
            "hidden_size": a.d_model,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": a.num_heads,
            "num_key_value_heads": a.num_kv_heads,
            "head_dim": a.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_position_embeddings,
            "rms_norm_eps": config.norm_eps,
            # transformers < 5 reads rope_theta, later versions rope_parameters.
            "rope_theta": theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "tie_word_embeddings": config.tie_word_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "num_experts_per_tok": m.top_k,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "output_router_logits": False,
            "use_cache": True,
            self.d_ff_key: m.d_ff,
            self.num_experts_key: m.num_experts,
        }
        if self.has_norm_topk_prob:
            hf["norm_topk_prob"] = m.router_norm == "topk_softmax"
        return hf

    def inexpressible(self, config: ModelConfig) -> list[str]:
        """Every way ``config`` differs from what a ``config.json`` of the family can say."""
        a, m = config.attention, config.moe
        problems = []
        if a.norm_eps != config.norm_eps:
            problems.append(f"attention.norm_eps={a.norm_eps} != norm_eps={config.norm_eps} "
                            "(one rms_norm_eps serves both)")
        if a.qk_norm != self.qk_norm:
            problems.append(f"attention.qk_norm={a.qk_norm!r} (the family has {self.qk_norm!r})")
        if a.qkv_bias and not self.has_qkv_bias:
            # An attention_bias of transformers adds an o_proj bias too, which this model lacks.
            problems.append(f"attention.qkv_bias=True ({self.name} has no q/k/v biases alone)")
        if self.derives_head_dim and a.num_heads * a.head_dim != a.d_model:
            problems.append(f"head_dim={a.head_dim} != d_model / num_heads = "
                            f"{a.d_model}/{a.num_heads} (the family derives head_dim)")
        if not self.has_sliding_window and a.sliding_window is not None:
            problems.append(f"attention.sliding_window={a.sliding_window} ({self.name} has none)")
        if not self.has_norm_topk_prob and m.router_norm != "topk_softmax":
            problems.append(f"moe.router_norm={m.router_norm!r} ({self.name} routes "
                            "'topk_softmax')")
        if self.has_shared_expert:
            if m.num_shared_experts > 1 or (m.num_shared_experts and m.shared_gate != "sigmoid"):
                problems.append(f"moe.num_shared_experts={m.num_shared_experts}, "
                                f"shared_gate={m.shared_gate!r} ({self.name} has at most one "
                                "shared expert, with a sigmoid gate)")
        elif m.num_shared_experts:
            problems.append(f"moe.num_shared_experts={m.num_shared_experts} (the family has none)")
        return problems

    # ------------------------------------------------------------------------- tensor names

    def tensor_name(self, path: Path, *, expert: int | None = None, moe: str | None = None
                    ) -> str | None:
        """The Hugging Face tensor name of parameter ``path`` (a ``MoETransformer`` module
        path), None when the family has none.

        Routed experts (``layers.{i}.mlp.w1/w3/w2``, stacked ``[e, ...]``) are one tensor per
        expert: name expert ``expert`` (None gives None). ``moe`` replaces the MoE module's
        written name (``moe_names[0]``) by another of ``moe_names`` found in a checkpoint.
        Linear kernels (``transposed(path)``) are torch weights ``[out, in]`` there.
        """
        match path:
            case ("embed_tokens", "embedding"):
                return "model.embed_tokens.weight"
            case ("norm", "scale"):
                return "model.norm.weight"
            case ("lm_head", "kernel"):
                return "lm_head.weight"
            case ("layers", int() as i, *rest):
                return self._layer_tensor_name(i, tuple(rest), expert, moe or self.moe_names[0])
        return None

    def _layer_tensor_name(self, i: int, rest: Path, expert: int | None, moe: str
                           ) -> str | None:
        layer = f"model.layers.{i}"
        attn, moe = f"{layer}.{self.attention}", f"{layer}.{moe}"
        match rest:
            case ("input_layernorm" | "post_attention_layernorm" as norm, "scale"):
                return f"{layer}.{norm}.weight"
            case ("self_attn", "q_proj" | "k_proj" | "v_proj" | "o_proj" as proj, "kernel"):
                return f"{attn}.{proj}.weight"
            case ("self_attn", "q_proj" | "k_proj" | "v_proj" as proj, "bias"):
                return f"{attn}.{proj}.bias"
            case ("self_attn", "q_norm" | "k_norm" as norm, "scale"):
                return f"{attn}.{norm}.weight"
            case ("mlp", "gate", "kernel"):
                return f"{moe}.{self.router}.weight"
            case ("mlp", "pregate", "kernel"):
                return f"{moe}.{self.pregate}.weight"
            case ("mlp", "w1" | "w3" | "w2" as w) if expert is not None:
                return f"{moe}.experts.{expert}.{self.expert_names[ROUTED.index(w)]}.weight"
            case ("mlp", "shared", "w1" | "w3" | "w2" as w):
                name = self.shared_expert_names[ROUTED.index(w)]
                return f"{moe}.{self.shared_expert}.{name}.weight"
            case ("mlp", "shared", "gate_kernel"):
                return f"{moe}.{self.shared_expert_gate}.weight"
        return None

    def fused_expert_names(self, i: int, moe: str | None = None) -> tuple[str, str]:
        """Block i's routed experts in the fused layout transformers >= 5 keeps in memory (and
        some exports save): ``gate_up_proj`` [e, 2f, d] and ``down_proj`` [e, d, f]; read only."""
        prefix = f"model.layers.{i}.{moe or self.moe_names[0]}.experts"
        return f"{prefix}.gate_up_proj", f"{prefix}.down_proj"


SILU_NAMES = ("silu", "swish")
"""The ``hidden_act`` values (Hugging Face names) of SiLU, the only activation the experts use."""


def check_common_hf(hf: Mapping[str, Any]) -> None:
    """ValueError for ``config.json`` fields every family reads alike but this model cannot
    honour: an activation other than SiLU, a non-numeric ``rope_theta``, a ``FLAGS`` field
    that is not a boolean."""
    act = hf.get("hidden_act", "silu")
    if act not in SILU_NAMES:
        raise ValueError(f"config.json: hidden_act must be one of {SILU_NAMES} (the experts "
                         f"compute SiLU only), got {act!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    for where in (hf, rope if isinstance(rope, Mapping) else {}):
        if "rope_theta" in where:
            expect_number("config.json", "rope_theta", where["rope_theta"], above=0)
    check_flags(hf)


FLAGS = ("tie_word_embeddings", "attention_bias", "qkv_bias", "norm_topk_prob",
         "use_sliding_window")
"""The boolean ``config.json`` fields the families read."""


def check_flags(hf: Mapping[str, Any], where: str = "config.json") -> None:
    """ValueError naming ``where`` for a ``FLAGS`` field that is present and not a boolean
    (``bool("false")`` is True: a string would flip the option silently)."""
    for key in FLAGS:
        value = hf.get(key)
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{where}: {key} must be a JSON boolean (true/false), got {value!r}")

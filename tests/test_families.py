"""Model families: the registry is the one source of config mapping and tensor names (every
family round-trips a config and a model through export and import), and a family defined
here, registered for one test, works with both."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from samoyeds_jax import families, model as model_module
from samoyeds_jax.hf_import import load_hf_checkpoint
from samoyeds_jax.families import FAMILIES, Family
from samoyeds_jax.hf_export import config_to_hf, save_hf_checkpoint
from samoyeds_jax.model import ModelConfig, MoETransformer

TOKENS = jnp.array([[1, 17, 42, 99, 7, 64, 3, 120], [5, 33, 2, 8, 400, 11, 0, 77]], jnp.int32)


def _config(family: Family, **moe) -> ModelConfig:
    """The tiny preset as a config of ``family``, using every option the family can express
    (routing renormalization choice, q/k/v bias, sliding window, shared expert)."""
    attention = dict(qk_norm=family.qk_norm, qkv_bias=family.has_qkv_bias,
                     sliding_window=64 if family.has_sliding_window else None)
    moe = dict(moe, router_norm="softmax_topk" if family.has_norm_topk_prob else "topk_softmax")
    if family.has_shared_expert:
        moe.update(num_shared_experts=1, shared_d_ff=128, shared_gate="sigmoid")
    return ModelConfig.tiny().replace(architecture=family.model_type, attention=attention,
                                      moe=moe)


def _params(model) -> dict[tuple, np.ndarray]:
    return {path: np.asarray(var.get_value()) for path, var in nnx.iter_graph(model)
            if isinstance(var, nnx.Param)}


def _export_import_round_trip(family: Family, tmp_path, rng) -> set[str]:
    """Export a tiny model of ``family`` with pre-gates, check every tensor name is the
    family's name of a parameter, import it again and compare bit for bit; the file's names."""
    config = _config(family, pregate="pregated")
    model = MoETransformer(config, rngs=nnx.Rngs(int(rng.integers(2**31))))
    out = str(tmp_path / family.model_type)
    save_hf_checkpoint(model, out)
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        written = set(f.keys())
    params = _params(model)
    expected = set()
    for path, value in params.items():
        experts = range(value.shape[0]) if families.routed(path) else [None]
        expected.update(family.tensor_name(path, expert=j) for j in experts)
    assert None not in expected
    assert written == expected

    loaded, back = load_hf_checkpoint(out, pregate="pregated")
    assert back == config
    got = _params(loaded)
    assert sorted(got) == sorted(params)
    for path, value in params.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)[0]), np.asarray(model(TOKENS)[0]))
    return written


# ----------------------------------------------------------------------------- registry


def test_registry_is_the_single_source():
    assert families.SUPPORTED_ARCHITECTURES == tuple(FAMILIES) == (
        "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
    assert model_module.SUPPORTED_ARCHITECTURES == families.SUPPORTED_ARCHITECTURES
    for model_type, family in FAMILIES.items():
        assert isinstance(family, Family) and family.model_type == model_type
        assert families.family(model_type) is family
        assert families.family_of(model_type) is family
        assert family.causal_lm.endswith("ForCausalLM") and family.name
    assert families.family_of("tiny") is FAMILIES["mixtral"]
    with pytest.raises(ValueError, match=r"model_type='llama'.*'mixtral', 'qwen2_moe'"):
        families.family("llama")
    with pytest.raises(ValueError, match=r"'llama'.*or 'tiny'"):
        families.family_of("llama")


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_round_trips_a_config(model_type):
    family = FAMILIES[model_type]
    config = _config(family)
    assert family.inexpressible(config) == []
    hf = config_to_hf(config)
    assert (hf["model_type"], hf["architectures"]) == (model_type, [family.causal_lm])
    assert json.loads(json.dumps(hf)) == hf
    assert ModelConfig.from_hf(hf) == config
    pieces = family.config_from_hf(hf)
    assert pieces["attention"]["qk_norm"] == family.qk_norm
    assert pieces["moe"]["num_experts"] == config.moe.num_experts


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_names_every_parameter_on_export_and_import(model_type, tmp_path, rng):
    family = FAMILIES[model_type]
    written = _export_import_round_trip(family, tmp_path, rng)
    moe = family.moe_names[0]
    assert f"model.layers.1.{moe}.experts.3.{family.expert_names[2]}.weight" in written
    assert f"model.layers.0.{moe}.{family.pregate}.weight" in written


def test_mixtral_is_read_under_its_other_moe_name(tmp_path, rng):
    """transformers >= 5 saves Mixtral's block_sparse_moe as mlp: Mixtral.moe_names[1]."""
    family = FAMILIES["mixtral"]
    config = _config(family)
    model = MoETransformer(config, rngs=nnx.Rngs(int(rng.integers(2**31))))
    out = str(tmp_path / "ckpt")
    save_hf_checkpoint(model, out)
    path = os.path.join(out, "model.safetensors")
    save_file({k.replace(".block_sparse_moe.", ".mlp."): v for k, v in load_file(path).items()},
              path)
    loaded, _ = load_hf_checkpoint(out)
    got = _params(loaded)
    for key, value in _params(model).items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))


# ----------------------------------------------------------------------------- a new family


class ToyMoe(Family):
    """A family with names of its own everywhere the mapping allows."""

    model_type = "toy_moe"
    name = "ToyMoE"
    causal_lm = "ToyMoeForCausalLM"
    num_experts_key = "n_routed_experts"
    qk_norm = "per_head"
    has_sliding_window = False
    attention = "attn"
    moe_names = ("sparse_moe",)
    router = "router"
    pregate = "next_router"
    expert_names = ("wg", "wu", "wd")
    has_shared_expert = True
    shared_expert = "common_expert"
    shared_expert_names = ("cg", "cu", "cd")
    shared_expert_gate = "common_expert_gate"

    def config_from_hf(self, hf):
        pieces = super().config_from_hf(hf)
        if hf.get("common_expert_size"):
            pieces["moe"].update(num_shared_experts=1, shared_d_ff=hf["common_expert_size"],
                                 shared_gate="sigmoid")
        return pieces

    def config_to_hf(self, config):
        return super().config_to_hf(config) | {"common_expert_size": config.moe.shared_width}


@pytest.fixture
def toy(monkeypatch) -> Family:
    family = ToyMoe()
    monkeypatch.setitem(FAMILIES, family.model_type, family)
    return family


def test_a_registered_family_works_with_import_and_export(toy, tmp_path, rng):
    config = _config(toy)
    hf = config_to_hf(config)
    assert (hf["model_type"], hf["architectures"]) == ("toy_moe", ["ToyMoeForCausalLM"])
    assert (hf["n_routed_experts"], hf["common_expert_size"]) == (4, 128)
    assert "num_experts" not in hf and "sliding_window" not in hf
    assert ModelConfig.from_hf(hf) == config
    with pytest.raises(ValueError, match=r"a toy_moe config.json.*ToyMoE has none"):
        config_to_hf(config.replace(attention=dict(sliding_window=8)))

    written = _export_import_round_trip(toy, tmp_path, rng)
    for name in ("model.layers.0.attn.q_norm.weight", "model.layers.0.sparse_moe.router.weight",
                 "model.layers.0.sparse_moe.next_router.weight",
                 "model.layers.1.sparse_moe.experts.3.wd.weight",
                 "model.layers.1.sparse_moe.common_expert.cu.weight",
                 "model.layers.1.sparse_moe.common_expert_gate.weight"):
        assert name in written
    assert not any(".mlp." in n or ".self_attn." in n for n in written)


def test_an_unregistered_family_is_refused():
    hf = config_to_hf(_config(FAMILIES["mixtral"]))
    with pytest.raises(ValueError, match="unsupported architecture model_type='toy_moe'"):
        ModelConfig.from_hf(dict(hf, model_type="toy_moe"))
    with pytest.raises(ValueError, match="'toy_moe' has no Hugging Face layout"):
        config_to_hf(_config(ToyMoe()))

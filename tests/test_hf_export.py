"""Hugging Face export: config.json round trips, bit-exact weight round trips through
``load_hf_checkpoint`` (tied, pre-gates, bfloat16, sparse experts), atomic replacement."""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from samoyeds_jax import atomic, hf_export
from samoyeds_jax.checkpoints import load_tokenizer
from samoyeds_jax.hf_import import load_hf_checkpoint
from samoyeds_jax.hf_export import config_to_hf, save_hf_checkpoint
from samoyeds_jax.layers import AttentionConfig
from samoyeds_jax.model import ModelConfig, MoETransformer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
TOKENS = jnp.array([[1, 17, 42, 99, 7, 64, 3, 120], [5, 33, 2, 8, 400, 11, 0, 77]], jnp.int32)


def _model(rng, **config) -> MoETransformer:
    tie = config.pop("tie_word_embeddings", False)
    cfg = ModelConfig.tiny(**config).replace(tie_word_embeddings=tie)
    return MoETransformer(cfg, rngs=nnx.Rngs(int(rng.integers(2**31))))


def _params(model) -> dict[str, np.ndarray]:
    """Every parameter by module path; sparse stacks densified."""
    out = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            value = var.get_value()
            out[".".join(map(str, path))] = np.asarray(
                value.to_dense() if hasattr(value, "to_dense") else value)
    return out


def _assert_same_params(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _snapshot(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out[name] = f.read()
    return out


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_every_family(family):
    with open(os.path.join(FIXTURES, family, "config.json")) as f:
        config = ModelConfig.from_hf(json.load(f))
    hf = config_to_hf(config)
    assert hf["model_type"] == family
    assert json.loads(json.dumps(hf)) == hf  # JSON-ready
    assert ModelConfig.from_hf(hf) == config
    bf16 = config_to_hf(config, dtype="bfloat16")
    assert bf16["torch_dtype"] == bf16["dtype"] == "bfloat16"
    assert ModelConfig.from_hf(bf16) == config.replace(dtype=jnp.bfloat16,
                                                       param_dtype=jnp.bfloat16)


def test_tiny_config_is_written_as_mixtral():
    config = ModelConfig.tiny(pregate="speculative", expert_format="nm")
    hf = config_to_hf(config)
    assert hf["architectures"] == ["MixtralForCausalLM"] and hf["model_type"] == "mixtral"
    assert (hf["torch_dtype"], hf["rope_theta"], hf["rms_norm_eps"]) == ("float32", 1e4, 1e-6)
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["tie_word_embeddings"]) == (1, 2, False)
    assert (hf["max_position_embeddings"], hf["sliding_window"]) == (2048, None)
    assert (hf["num_local_experts"], hf["intermediate_size"], hf["head_dim"]) == (4, 256, 32)
    back = ModelConfig.from_hf(hf, expert_format="nm", pregate="speculative")
    assert back == config.replace(architecture="mixtral")
    windowed = config.replace(attention=dict(sliding_window=64), tie_word_embeddings=True)
    assert ModelConfig.from_hf(config_to_hf(windowed), expert_format="nm",
                               pregate="speculative") == windowed.replace(architecture="mixtral")


def test_qwen_sliding_window_round_trips():
    with open(os.path.join(FIXTURES, "qwen3_moe", "config.json")) as f:
        config = ModelConfig.from_hf(json.load(f)).replace(attention=dict(sliding_window=16))
    hf = config_to_hf(config)
    assert hf["use_sliding_window"] and hf["max_window_layers"] == 0
    assert ModelConfig.from_hf(hf) == config


def test_inexpressible_configs_are_refused():
    tiny = ModelConfig.tiny()
    with pytest.raises(ValueError, match="qk_norm='per_head'"):
        config_to_hf(tiny.replace(attention=dict(qk_norm="per_head")))
    with pytest.raises(ValueError, match="qkv_bias=True.*router_norm='softmax_topk'"):
        config_to_hf(tiny.replace(moe=dict(router_norm="softmax_topk"),
                                  attention=dict(qkv_bias=True)))
    with pytest.raises(ValueError, match="num_shared_experts=1"):
        config_to_hf(tiny.replace(moe=dict(num_shared_experts=1)))
    with pytest.raises(ValueError, match="norm_eps"):
        config_to_hf(tiny.replace(norm_eps=1e-5))
    with pytest.raises(ValueError, match="'deepseek_v2'"):
        config_to_hf(tiny.replace(architecture="deepseek_v2"))
    olmoe = tiny.replace(architecture="olmoe", attention=AttentionConfig(
        d_model=128, num_heads=4, num_kv_heads=2, head_dim=64, qk_norm="full"))
    with pytest.raises(ValueError, match="head_dim=64"):
        config_to_hf(olmoe)
    with pytest.raises(ValueError, match="dtype must be one of"):
        config_to_hf(tiny, dtype="int8")


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact(tmp_path, rng, tied):
    model = _model(rng, tie_word_embeddings=tied)
    out = str(tmp_path / "ckpt")
    save_hf_checkpoint(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json",
                                       "model.safetensors"]
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
    assert ("lm_head.weight" in names) != tied
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert not any("pregate" in n for n in names)
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        assert struct.unpack("<Q", f.read(8))[0] % 8 == 0  # data 8-byte aligned
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2}

    loaded, config = load_hf_checkpoint(out)
    assert config == model.config.replace(architecture="mixtral")
    _assert_same_params(_params(loaded), _params(model))
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)[0]), np.asarray(model(TOKENS)[0]))


def test_pregates_survive_the_round_trip(tmp_path, rng):
    model = _model(rng, pregate="pregated")
    trained = rng.normal(0.0, 0.05, (128, 4)).astype(np.float32)  # not the next block's gate
    model.layers[0].mlp.pregate.kernel.set_value(jnp.asarray(trained))
    out = str(tmp_path / "ckpt")
    save_hf_checkpoint(model, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    np.testing.assert_array_equal(tensors["model.layers.0.block_sparse_moe.pregate.weight"],
                                  trained.T)

    loaded, _ = load_hf_checkpoint(out, pregate="pregated")
    _assert_same_params(_params(loaded), _params(model))
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)[0]), np.asarray(model(TOKENS)[0]))
    speculative, _ = load_hf_checkpoint(out, pregate="speculative")
    np.testing.assert_array_equal(np.asarray(speculative.layers[0].mlp.pregate.kernel[...]),
                                  trained)
    standard, _ = load_hf_checkpoint(out)  # no pre-gates: the tensor is skipped, not refused
    assert standard.layers[0].mlp.pregate is None
    np.testing.assert_array_equal(np.asarray(standard.layers[1].mlp.gate.kernel[...]),
                                  np.asarray(model.layers[1].mlp.gate.kernel[...]))


def test_pregate_of_the_last_block_is_refused(tmp_path, rng):
    out = str(tmp_path / "ckpt")
    save_hf_checkpoint(_model(rng, pregate="pregated"), out)
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.block_sparse_moe.pregate.weight"] = np.zeros((4, 128), np.float32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match="layers.1.block_sparse_moe.pregate.weight"):
        load_hf_checkpoint(out, pregate="pregated")


def test_bfloat16_export(tmp_path, rng):
    model = _model(rng, tie_word_embeddings=True)
    out = str(tmp_path / "bf16")
    save_hf_checkpoint(model, out, dtype="bfloat16")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {jnp.dtype(jnp.bfloat16)}
    loaded, config = load_hf_checkpoint(out)
    assert config.param_dtype == jnp.bfloat16
    want = {k: np.asarray(jnp.asarray(v, jnp.bfloat16)) for k, v in _params(model).items()}
    _assert_same_params(_params(loaded), want)

    again = str(tmp_path / "bf16_again")  # a bfloat16 model exports bfloat16 by default
    save_hf_checkpoint(loaded, again)
    assert _snapshot(again) == _snapshot(out)


def test_sparse_experts_are_written_densified(tmp_path, rng):
    model = _model(rng, expert_format="nm")
    out = str(tmp_path / "nm")
    save_hf_checkpoint(model, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    w1 = np.asarray(model.layers[0].mlp.w1.get_value().to_dense())  # [e, d, f]
    expert = tensors["model.layers.0.block_sparse_moe.experts.2.w1.weight"]  # [f, d]
    np.testing.assert_array_equal(expert, w1[2].T)
    assert np.mean(expert == 0) == 0.5  # 2:4 along d: the pruned half kept as zeros

    dense, _ = load_hf_checkpoint(out)
    _assert_same_params(_params(dense), _params(model))
    nm, _ = load_hf_checkpoint(out, expert_format="nm")  # re-pruning keeps the same entries
    _assert_same_params(_params(nm), _params(model))
    np.testing.assert_allclose(np.asarray(dense(TOKENS)[0]), np.asarray(model(TOKENS)[0]),
                               rtol=1e-5, atol=1e-5)


def test_parameters_off_the_config_are_refused(tmp_path, rng):
    model = _model(rng)
    model.layers[0].mlp.gate.kernel.set_value(jnp.zeros((128, 5)))
    with pytest.raises(ValueError, match=r"layers.0.mlp.gate.kernel \(128, 5\)"):
        save_hf_checkpoint(model, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")


# ----------------------------------------------------------------------------- other files


def test_generation_config_tokenizer_and_extra_files(tmp_path, rng):
    model = _model(rng)
    out = str(tmp_path / "ckpt")
    save_hf_checkpoint(model, out, tokenizer=os.path.join(FIXTURES, "mixtral"),
                       generation_config={"pad_token_id": 0, "temperature": 0.7},
                       extra_files={"README.md": "tiny model\n", "notes.bin": b"\x00\x01"})
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                "temperature": 0.7}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["pad_token_id"] == 0
    with open(os.path.join(FIXTURES, "mixtral", "tokenizer.json"), "rb") as f:
        assert _snapshot(out)["tokenizer.json"] == f.read()
    assert _snapshot(out)["README.md"] == b"tiny model\n"
    assert _snapshot(out)["notes.bin"] == b"\x00\x01"
    pytest.importorskip("tokenizers")
    assert load_tokenizer(out) is not None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(extra_files={"../escape": "x"}), ValueError, "plain file name"),
    (dict(extra_files={"config.json": "{}"}), ValueError, "plain file name"),
    (dict(extra_files={"a.txt": 3}), ValueError, "bytes or str"),
    (dict(generation_config={"eos_token_id": object()}), ValueError, "JSON-serializable"),
    (dict(tokenizer="/no/such/tokenizer.json"), FileNotFoundError, "tokenizer"),
    (dict(dtype="float64"), ValueError, "dtype must be one of"),
])
def test_bad_arguments_write_nothing(tmp_path, rng, kwargs, error, match):
    with pytest.raises(error, match=match):
        save_hf_checkpoint(_model(rng), str(tmp_path / "ckpt"), **kwargs)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- atomicity


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path, rng):
    model = _model(rng)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="does not look like a checkpoint"):
        save_hf_checkpoint(model, str(other))
    assert _snapshot(str(other)) == {"notes.txt": b"keep me"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        save_hf_checkpoint(model, str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    save_hf_checkpoint(model, str(tmp_path / "empty"))  # an empty directory is fine
    save_hf_checkpoint(model, str(tmp_path / "a" / "b"))  # so is a missing one (and parents)
    assert _snapshot(str(tmp_path / "empty")) == _snapshot(str(tmp_path / "a" / "b"))


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    if not atomic.exchange(str(tmp_path / "a"), str(tmp_path / "b")):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this platform / file system")
    assert os.listdir(tmp_path / "a") == [] and os.listdir(tmp_path / "b") == ["x"]


class _Crash(Exception):
    pass


def _crash_on_call(monkeypatch, owner, name: str, n: int) -> None:
    """Make ``owner.name`` raise _Crash on its n-th call (0-based), behave normally otherwise."""
    original, calls = getattr(owner, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] - 1 == n:
            raise _Crash(f"{name} call {n}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


def _count_calls(monkeypatch, owner, name: str, fn) -> int:
    original, calls = getattr(owner, name), [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(owner, name, counting)
        fn()
    return calls[0]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename_aside"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, rng, monkeypatch,
                                                                   exchange):
    old_model, new_model = _model(rng), _model(rng)
    target = str(tmp_path / "ckpt")
    save_hf_checkpoint(old_model, target)
    old = _snapshot(target)
    save_hf_checkpoint(new_model, str(tmp_path / "reference"))
    new = _snapshot(str(tmp_path / "reference"))
    shutil.rmtree(tmp_path / "reference")
    if not exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)

    def save():
        save_hf_checkpoint(new_model, target)
        save_hf_checkpoint(old_model, target)  # back to the old one for the next crash

    crash_points = [(hf_export, "_dense", 3)]  # in the middle of the weights
    for owner, name in ((os, "fsync"), (os, "rename"), (atomic, "exchange")):
        crash_points += [(owner, name, n) for n in range(_count_calls(monkeypatch, owner, name,
                                                                      save) // 2)]
    assert len(crash_points) >= 7  # weights, 3 files + staging dir + parent fsync'd, swap
    outcomes = set()
    for owner, name, n in crash_points:
        with monkeypatch.context() as m:
            _crash_on_call(m, owner, name, n)
            with pytest.raises(_Crash):
                save_hf_checkpoint(new_model, target)
        got = _snapshot(target)
        assert got in (old, new), f"crash at {name} call {n} left a mix: {sorted(got)}"
        outcomes.add("old" if got == old else "new")
        assert os.listdir(tmp_path) == ["ckpt"], f"crash at {name} call {n} left temporaries"
        if got == new:
            save_hf_checkpoint(old_model, target)
    assert outcomes == {"old", "new"}  # crashes before the swap keep the old one
    loaded, _ = load_hf_checkpoint(target)
    _assert_same_params(_params(loaded), _params(old_model))


def test_failure_to_delete_the_old_copy_only_warns(tmp_path, rng, monkeypatch):
    target = str(tmp_path / "ckpt")
    save_hf_checkpoint(_model(rng), target)
    new_model = _model(rng)

    def failing(path, ignore_errors=False, **kwargs):  # nothing can be deleted
        if not ignore_errors:
            raise PermissionError(f"cannot delete {path}")

    monkeypatch.setattr(shutil, "rmtree", failing)
    with pytest.warns(UserWarning, match="could not delete the previous copy"):
        save_hf_checkpoint(new_model, target)
    monkeypatch.undo()
    loaded, _ = load_hf_checkpoint(target)
    _assert_same_params(_params(loaded), _params(new_model))
    leftovers = [n for n in os.listdir(tmp_path) if n != "ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.")

"""Checkpoint import, converted-model round trips, tokenizer and golden parity with transformers.

The fixtures in tests/fixtures/<family>/ are tiny random Hugging Face checkpoints written by
examples/make_golden.py, with the logits and greedy generations transformers produced for them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import shutil
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from pallas_kernels import formats
from samoyeds_jax import compress, converted_io, hf_import, prune_weights, pruning
from samoyeds_jax.checkpoints import load_model, load_or_convert, load_tokenizer
from samoyeds_jax.converted_io import load_converted, save_converted
from samoyeds_jax.hf_import import load_hf_checkpoint
from samoyeds_jax.evaluate import EvalConfig, evaluate_streams
from samoyeds_jax.generate_cli import main

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
LOGITS_RTOL = 1e-4


def _fixture(family: str) -> str:
    return os.path.join(FIXTURES, family)


def _golden(family: str) -> tuple[dict, dict[str, np.ndarray]]:
    with open(os.path.join(_fixture(family), "golden.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(_fixture(family), "golden.npz")) as z:
        return meta, {k: z[k] for k in z.files}


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(graphdef, state, tokens, mask):
    logits, _ = nnx.merge(graphdef, state)(tokens, mask=mask)
    return logits


def _forward(model, prompts) -> list[np.ndarray]:
    """Logits [len(p), v] of each prompt, from one jitted left-padded batch forward."""
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for r, p in enumerate(prompts):
        tokens[r, width - len(p):], mask[r, width - len(p):] = p, True
    graphdef, state = nnx.split(model)
    logits = np.asarray(_forward_jit(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask)))
    return [logits[r, width - len(p):] for r, p in enumerate(prompts)]


def _params(model) -> dict[str, np.ndarray]:
    """Every parameter leaf (sparse format fields included) by dotted path."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


@pytest.fixture(scope="module")
def loaded():
    """Dense float32 imports of every fixture, loaded once."""
    return {family: load_hf_checkpoint(_fixture(family)) for family in FAMILIES}


def _copy_fixture(family: str, tmp_path) -> str:
    dst = str(tmp_path / family)
    shutil.copytree(_fixture(family), dst)
    return dst


# ----------------------------------------------------------------------------- golden parity


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_logits_and_greedy_tokens(loaded, family):
    """Recorded logits match, and greedy decoding follows the recorded path.

    One left-padded batch holds each prompt followed by its recorded greedy continuation (teacher
    forcing): the logits of the prompt positions must match the recorded ones, and the argmax
    at every position from the prompt's last token on must be the next recorded greedy token,
    which by induction makes greedy decoding produce exactly the recorded tokens.
    """
    model, config = loaded[family]
    meta, golden = _golden(family)
    assert config.architecture == family
    sequences = [p + g[:-1] for p, g in zip(meta["prompts"], meta["greedy"])]
    for i, (prompt, greedy, logits) in enumerate(zip(meta["prompts"], meta["greedy"],
                                                     _forward(model, sequences))):
        err = _rel_err(logits[: len(prompt)], golden[f"logits_{i}"])
        assert err < LOGITS_RTOL, f"{family} prompt {i}: logits relative error {err:.2e}"
        assert np.argmax(logits[len(prompt) - 1:], axis=-1).tolist() == greedy


def test_fixture_layouts_cover_sharding_and_config_variants():
    assert os.path.isfile(os.path.join(_fixture("qwen2_moe"), "model.safetensors.index.json"))
    with open(os.path.join(_fixture("qwen3_moe"), "config.json")) as f:
        qwen3 = json.load(f)
    assert qwen3["head_dim"] * qwen3["num_attention_heads"] != qwen3["hidden_size"]
    with open(os.path.join(_fixture("mixtral"), "config.json")) as f:
        window = json.load(f)["sliding_window"]
    assert window < max(len(p) for p in _golden("mixtral")[0]["prompts"])


@pytest.mark.parametrize("family", FAMILIES)
def test_live_parity_with_transformers(loaded, family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        _fixture(family), dtype=torch.float32, attn_implementation="eager").eval()
    model, _ = loaded[family]
    meta, golden = _golden(family)
    for i, prompt in enumerate(meta["prompts"]):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].numpy()
        assert _rel_err(want, golden[f"logits_{i}"]) < LOGITS_RTOL, "stale golden.npz"
        assert _rel_err(_forward(model, [prompt])[0], want) < LOGITS_RTOL


# ----------------------------------------------------------------------------- mapping details


def test_mapping_transposes_and_stacks(loaded):
    model, config = loaded["qwen2_moe"]
    d = _fixture("qwen2_moe")
    t = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            t.update(load_file(os.path.join(d, name)))
    layer = model.layers[0]
    np.testing.assert_array_equal(np.asarray(layer.self_attn.q_proj.kernel[...]),
                                  t["model.layers.0.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(layer.self_attn.q_proj.bias[...]),
                                  t["model.layers.0.self_attn.q_proj.bias"])
    for j in range(config.moe.num_experts):
        np.testing.assert_array_equal(np.asarray(layer.mlp.w2[...][j]),
                                      t[f"model.layers.0.mlp.experts.{j}.down_proj.weight"].T)
    assert layer.mlp.shared.gate_kernel[...].shape == (config.d_model, 1)


def test_pregate_starts_as_next_gate():
    model, _ = load_hf_checkpoint(_fixture("mixtral"), pregate="speculative")
    np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.pregate.kernel[...]),
                                  np.asarray(model.layers[1].mlp.gate.kernel[...]))
    assert model.layers[1].mlp.pregate is None


def test_bfloat16_checkpoint(tmp_path):
    """bf16 tensors on disk; the config's dtype picks the model dtype when none is given."""
    import ml_dtypes
    d = _copy_fixture("mixtral", tmp_path)
    path = os.path.join(d, "model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}, path)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["dtype"] = "bfloat16"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    model, config = load_hf_checkpoint(d)
    assert model.layers[0].mlp.w1[...].dtype == jnp.bfloat16
    assert config.dtype == jnp.bfloat16
    meta, golden = _golden("mixtral")
    assert _rel_err(_forward(model, meta["prompts"][:1])[0], golden["logits_0"]) < 5e-2


def test_fused_expert_layout(tmp_path, loaded):
    """transformers >= 5 keeps experts fused in memory: gate_up_proj [e, 2f, d], down_proj [e, d, f]."""
    src = _fixture("qwen3_moe")
    dst = tmp_path / "fused"
    dst.mkdir()
    shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
    t = load_file(os.path.join(src, "model.safetensors"))
    fused = {k: v for k, v in t.items() if ".experts." not in k}
    for i in range(2):
        p = f"model.layers.{i}.mlp.experts"
        gate = np.stack([t[f"{p}.{j}.gate_proj.weight"] for j in range(4)])  # [e, f, d]
        up = np.stack([t[f"{p}.{j}.up_proj.weight"] for j in range(4)])
        fused[f"{p}.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        fused[f"{p}.down_proj"] = np.stack([t[f"{p}.{j}.down_proj.weight"] for j in range(4)])
    save_file(fused, str(dst / "model.safetensors"))
    model, _ = load_hf_checkpoint(str(dst))
    want = _params(loaded["qwen3_moe"][0])
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


# ----------------------------------------------------------------------------- expert formats


def test_nm_import_prunes_experts(loaded, capsys):
    model, config = load_hf_checkpoint(_fixture("mixtral"), expert_format="nm", progress=True)
    assert config.moe.expert_format == "nm"
    assert "importing mixtral (nm experts)" in capsys.readouterr().err
    dense = loaded["mixtral"][0]
    for i in range(config.num_layers):
        for name in ("w1", "w3", "w2"):
            w = getattr(model.layers[i].mlp, name).get_value()
            assert isinstance(w, formats.NMSparse)
            want = prune_weights.prune_nm(getattr(dense.layers[i].mlp, name)[...], n=2, m=4)
            np.testing.assert_array_equal(np.asarray(w.to_dense()), np.asarray(want))
    # Attention and router weights are untouched.
    np.testing.assert_array_equal(np.asarray(model.layers[0].mlp.gate.kernel[...]),
                                  np.asarray(dense.layers[0].mlp.gate.kernel[...]))


@pytest.mark.parametrize("family,prune,linears", [
    ("mixtral", pruning.PruneConfig(format="nm", method="sparsegpt"), None),
    ("qwen2_moe", pruning.PruneConfig(format="samoyeds", v=64, method="wanda"),
     pruning.PruneConfig(format="nm", method="sparsegpt")),  # shared experts too
    ("qwen3_moe", pruning.PruneConfig(format="unstructured", sparsity=0.5, method="sparsegpt"),
     None),
])
def test_prune_checkpoint_streams_what_the_whole_model_walk_prunes(family, prune, linears):
    """Block by block from the checkpoint, calibrated on windows: the same experts as the
    dense model loaded whole, pruned by ``calibrate_and_prune`` and compressed; the dense and
    one-shot scores of the same pass are those of ``evaluate_streams`` on the two models."""
    vocab = load_hf_checkpoint(_fixture(family))[1].vocab_size
    rng = np.random.default_rng(3)
    windows = rng.integers(0, vocab, (3, 16))
    streams = {f"doc{j}": (rng.integers(0, vocab, n), rng.integers(1, 4, n))
               for j, n in enumerate((40, 9, 23))}  # windows of 16, a short stream, a tail
    eval_config = EvalConfig(seq_len=16, batch_size=4)
    out = compress.prune_checkpoint(_fixture(family), windows, prune, linears=linears,
                                    eval_streams=streams, eval_config=eval_config)
    assert out.config.moe.expert_format == prune.format
    whole, _ = load_hf_checkpoint(_fixture(family))
    dense_score = evaluate_streams(whole, streams, config=eval_config)
    dense_linears = None if linears is None else dataclasses.replace(linears, output="dense")
    report = compress.calibrate_and_prune(whole, windows, dataclasses.replace(
        prune, output="dense"), linears=dense_linears, progress=False)
    assert out.report.expert_tokens == report.expert_tokens
    if linears is not None:
        assert out.config.linear.format == linears.format
        assert len(out.report.linear_blocks) == out.config.num_layers
        for i in range(out.config.num_layers):
            for holder, module in (("self_attn", "o_proj"), ("self_attn", "q_proj")):
                got = getattr(getattr(out.model.layers[i], holder), module).kernel.get_value()
                want = getattr(getattr(whole.layers[i], holder), module).kernel.get_value()
                assert type(got).__name__ == "NMSparse"
                np.testing.assert_allclose(np.asarray(got.to_dense()), np.asarray(want),
                                           rtol=1e-5, atol=1e-6)
            got = out.model.layers[i].mlp.shared.w2.get_value()
            np.testing.assert_allclose(np.asarray(got.to_dense()),
                                       np.asarray(whole.layers[i].mlp.shared.w2.get_value()),
                                       rtol=1e-5, atol=1e-6)
    magnitude, _ = load_hf_checkpoint(_fixture(family), prune=dataclasses.replace(
        prune, method="magnitude"))
    differs = 0
    for i in range(out.config.num_layers):
        for name in ("w1", "w3", "w2"):
            got = np.asarray(getattr(out.model.layers[i].mlp, name).get_value().to_dense())
            want = np.asarray(getattr(whole.layers[i].mlp, name).get_value())
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got != 0, want != 0)  # the same mask
            base = np.asarray(getattr(magnitude.layers[i].mlp, name).get_value().to_dense())
            differs += int(((got != 0) != (base != 0)).any())
    assert differs > 0  # the calibration chose: not the magnitude masks
    if linears is None:  # the attention projections as imported
        np.testing.assert_array_equal(
            np.asarray(out.model.layers[0].self_attn.q_proj.kernel[...]),
            np.asarray(whole.layers[0].self_attn.q_proj.kernel[...]))
    pruned_score = evaluate_streams(out.model, streams, config=eval_config)
    for name, want in (("dense", dense_score), ("one-shot", pruned_score)):
        got = out.results[name]
        assert got.digest == want.digest and got.windows == want.windows
        assert (got.window_tokens < 16).any() and got.windows % 4  # short windows, a part batch
        np.testing.assert_allclose(got.window_nats, want.window_nats, rtol=1e-4)
    assert out.results["one-shot"].nats != pytest.approx(out.results["dense"].nats, rel=1e-4)


def test_calibrated_pruning_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="'wanda' needs calibration.*prune_checkpoint"):
        load_hf_checkpoint(_fixture("mixtral"), prune=pruning.PruneConfig(format="nm",
                                                                          method="wanda"))
    with pytest.raises(ValueError, match="prunes nothing"):
        load_hf_checkpoint(_fixture("mixtral"), pruner=object())
    with pytest.raises(ValueError, match=r"token ids span \[0, 99999\]"):
        compress.prune_checkpoint(_fixture("mixtral"), np.array([[0, 99999]]),
                                  pruning.PruneConfig(format="nm"))
    with pytest.raises(ValueError, match="hold 0 bytes"):
        compress.prune_checkpoint(_fixture("mixtral"), np.zeros((1, 4), np.int32),
                                  pruning.PruneConfig(format="nm"),
                                  eval_streams={"empty": (np.arange(4), np.zeros(4, int))})


def test_samoyeds_needs_matching_slab_size():
    # d = f = 64 is not a multiple of the default v = 128: refused before reading tensors.
    with pytest.raises(ValueError, match="multiple of v=128"):
        load_hf_checkpoint(_fixture("mixtral"), expert_format="samoyeds")
    with pytest.raises(ValueError, match="disagrees"):
        load_hf_checkpoint(_fixture("mixtral"), expert_format="nm",
                           prune=pruning.PruneConfig(format="samoyeds", v=64))


@pytest.mark.parametrize("family,prune", [
    ("mixtral", None),
    ("qwen2_moe", pruning.PruneConfig(format="samoyeds", v=64)),
    ("olmoe", pruning.PruneConfig(format="unstructured", sparsity=0.5)),
])
def test_converted_round_trip(tmp_path, family, prune):
    model, config = load_hf_checkpoint(_fixture(family), prune=prune)
    out = str(tmp_path / "converted")
    save_converted(model, out, source=_fixture(family))
    again, config2 = load_converted(out)
    assert config2 == config
    before, after = _params(model), _params(again)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype, k
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    if prune is not None:
        w = again.layers[0].mlp.w1.get_value()
        assert type(w) is type(model.layers[0].mlp.w1.get_value())
        assert config2.moe.sparsity == config.moe.sparsity


def test_load_or_convert_converts_once(tmp_path, monkeypatch):
    out = str(tmp_path / "nm")
    model, _ = load_or_convert(_fixture("mixtral"), out, expert_format="nm")
    assert converted_io.is_converted(out)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))

    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(hf_import, "load_hf_checkpoint", fail)
    again, config = load_or_convert(_fixture("mixtral"), out, expert_format="nm")
    assert isinstance(again.layers[1].mlp.w2.get_value(), formats.NMSparse)
    with pytest.raises(ValueError, match="other settings"):
        load_or_convert(_fixture("mixtral"), out, expert_format="dense")
    # load_model dispatches on the directory kind and checks the stored format.
    assert load_model(out).config.moe.expert_format == "nm"
    with pytest.raises(ValueError, match="stores 'nm' experts"):
        load_model(out, expert_format="dense")


# ----------------------------------------------------------------------------- bad input


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(str(tmp_path))


def test_missing_shard_is_named(tmp_path):
    d = _copy_fixture("qwen2_moe", tmp_path)
    os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_hf_checkpoint(d)


def test_no_weights_at_all(tmp_path):
    d = _copy_fixture("mixtral", tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_hf_checkpoint(d)


def test_truncated_shard_is_named(tmp_path):
    d = _copy_fixture("mixtral", tmp_path)
    path = os.path.join(d, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load_hf_checkpoint(d)


def test_reader_stack_reads_what_get_reads(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(jnp.bfloat16),
               "b": rng.standard_normal((3, 5)).astype(np.float32),
               "c": rng.standard_normal((3, 5)).astype(jnp.bfloat16),
               "fp8": rng.standard_normal(4).astype(jnp.float8_e4m3fn),
               "ids": np.arange(7, dtype=np.int64), "empty": np.zeros((0, 2), np.float16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with hf_import.ShardReader(str(tmp_path)) as reader:
        for key, value in tensors.items():
            got = reader.get(key, value.shape)
            assert got.dtype == value.dtype
            np.testing.assert_array_equal(got.view(np.uint8), value.view(np.uint8))
        same = reader.stack(["a", "c", "a"], (3, 5))
        assert same.dtype == jnp.bfloat16
        np.testing.assert_array_equal(same.astype(np.float32), np.stack(
            [tensors[k] for k in "aca"]).astype(np.float32))
        mixed = reader.stack(["a", "b"], (3, 5))  # their common dtype
        assert mixed.dtype == np.float32
        np.testing.assert_array_equal(mixed, np.stack([tensors["a"].astype(np.float32),
                                                       tensors["b"]]))
        with pytest.raises(ValueError, match=r"'ids'.*expected shape \(3, 5\), found \(7,\)"):
            reader.stack(["a", "ids"], (3, 5))


def test_import_reads_the_next_block_while_this_one_converts(monkeypatch):
    read_started = collections.defaultdict(threading.Event)
    real_read, real_convert = hf_import._read_layer, hf_import._convert_experts

    def read(reader, family, config, i, shapes):
        read_started[i].set()
        return real_read(reader, family, config, i, shapes=shapes)

    def convert(experts, i, prune):  # block i converts only once block i+1 is being read
        if i + 1 < layers:
            assert read_started[i + 1].wait(timeout=60), f"block {i + 1} was not read ahead"
        return real_convert(experts, i, prune)

    layers = load_hf_checkpoint(_fixture("mixtral"))[1].num_layers
    assert layers >= 2
    monkeypatch.setattr(hf_import, "_read_layer", read)
    monkeypatch.setattr(hf_import, "_convert_experts", convert)
    model, _ = load_hf_checkpoint(_fixture("mixtral"), expert_format="nm")
    assert sorted(read_started) == list(range(layers))
    assert isinstance(model.layers[-1].mlp.w2.get_value(), formats.NMSparse)


def test_reader_names_a_nan_in_a_stack(tmp_path):
    tensors = {f"w{j}": np.ones((4, 4), np.float32) for j in range(6)}
    tensors["w4"][1, 2] = np.nan
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with hf_import.ShardReader(str(tmp_path)) as reader:
        with pytest.raises(ValueError, match=r"'w4'.*1 NaN/Inf.*index \(1, 2\)"):
            reader.stack(list(tensors), (4, 4))
        assert reader.stack(list(tensors), (4, 4), finite=False).shape == (6, 4, 4)


def test_missing_tensor_is_named(tmp_path):
    d = _copy_fixture("mixtral", tmp_path)
    path = os.path.join(d, "model.safetensors")
    t = load_file(path)
    del t["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(t, path)
    with pytest.raises(ValueError, match=r"experts\.3\.w2\.weight.*\(64, 64\).*missing"):
        load_hf_checkpoint(d)


def test_unexpected_tensor_is_refused(tmp_path):
    d = _copy_fixture("mixtral", tmp_path)
    path = os.path.join(d, "model.safetensors")
    t = load_file(path)
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(t, path)
    with pytest.raises(ValueError, match=r"q_proj\.bias"):
        load_hf_checkpoint(d)


def test_misshaped_tensor_names_expected_and_found(tmp_path):
    d = _copy_fixture("qwen3_moe", tmp_path)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["moe_intermediate_size"] = 32
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"
                                         r".*expected shape \(32, 64\).*found \(64, 64\)"):
        load_hf_checkpoint(d)


def test_unsupported_architecture(tmp_path):
    d = _copy_fixture("mixtral", tmp_path)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "llama"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="unsupported architecture model_type='llama'"):
        load_hf_checkpoint(d)


# ----------------------------------------------------------------------------- tokenizer + CLI


def test_tokenizer_or_ids(monkeypatch):
    assert load_tokenizer(_fixture("qwen3_moe")) is None  # no tokenizer.json: ids
    if _has_tokenizers():
        tok = load_tokenizer(_fixture("mixtral"))
        assert tok.encode("w17 w42 w99").ids == [17, 42, 99]
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.warns(UserWarning, match="'tokenizers' package is not installed"):
        assert load_tokenizer(_fixture("mixtral")) is None


def _has_tokenizers() -> bool:
    import importlib.util
    return importlib.util.find_spec("tokenizers") is not None


def test_cli_generates_the_recorded_tokens_and_keeps_the_conversion(tmp_path, capsys):
    """The CLI's jit-compiled generation (prefill + KV-cache decode loop) reproduces
    transformers' generate() on a checkpoint, converting it once into --converted."""
    meta, _ = _golden("qwen3_moe")
    out = str(tmp_path / "conv")
    prompt = " ".join(map(str, meta["prompts"][0]))
    assert main(["--checkpoint", _fixture("qwen3_moe"), "--converted", out, "--prompt", prompt,
                 "--max-new-tokens", str(meta["max_new_tokens"]), "--no-eos"]) == 0
    printed = capsys.readouterr().out
    assert "qwen3_moe from" in printed and "format=dense" in printed
    assert f"output   {meta['greedy'][0]}" in printed
    assert converted_io.is_converted(out)

"""Malformed input to the I/O-side entry points gets a clear error (type, and a message naming
the argument, field, file or tensor and the value given): Hugging Face import, tokenizers,
evaluation, training, offloading, pruning configs and file writing. One parametrized test per
group; the layers' entry points are in ``test_bad_input.py``."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from samoyeds_jax import atomic, checkpoints, compress, evaluate, pruning, train
from samoyeds_jax.bpe_tokenizer import encode_documents, token_bytes, train_tokenizer
from samoyeds_jax.config import MoEConfig
from samoyeds_jax.converted_io import save_converted
from samoyeds_jax.evaluate import EvalConfig, EvalResult
from samoyeds_jax.expert_cache import ExpertCache
from samoyeds_jax.expert_store import ExpertStore
from samoyeds_jax.generate_offload import OffloadGenerator
from samoyeds_jax.pregate_eval import pregate_recall
from samoyeds_jax.hf_export import config_to_hf, save_hf_checkpoint
from samoyeds_jax.hf_import import load_hf_checkpoint
from samoyeds_jax.layers import AttentionConfig
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.offload import OffloadConfig, resolve_slots
from samoyeds_jax.pregate import PregateTrainConfig

V = 64  # vocabulary of the tiny model
VE, TE, FNF = ValueError, TypeError, FileNotFoundError


def _config() -> ModelConfig:
    return ModelConfig(
        architecture="tiny", vocab_size=V, num_layers=2,
        attention=AttentionConfig(d_model=16, num_heads=2, num_kv_heads=1, head_dim=8),
        moe=MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2), eos_token_id=2)


def _model() -> MoETransformer:
    return MoETransformer(_config(), rngs=nnx.Rngs(0))


@functools.cache
def _shared_model() -> MoETransformer:  # read only
    return _model()


def _raises(kind, words, fn):
    with pytest.raises(kind, match=re.escape(words)):
        fn()


def _ids(n=40):
    return (np.arange(n) * 7 % V).astype(np.int32)


# ----------------------------------------------------------------------------- HF import


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf") / "good")
    save_hf_checkpoint(_shared_model(), d)
    return d


def _copy(hf_dir, tmp_path) -> str:
    d = str(tmp_path / "ckpt")
    shutil.copytree(hf_dir, d)
    return d


def _edit_config(d, **fields):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        hf = json.load(f)
    with open(path, "w") as f:
        json.dump({**hf, **fields}, f)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _retype(d, pick, dtype):
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    key = sorted(k for k in tensors if pick in k)[0]
    tensors[key] = tensors[key].astype(dtype)
    save_file(tensors, path)
    return key


def _config_list(d):
    _write(os.path.join(d, "config.json"), "[1, 2, 3]")
    return "config.json: expected a JSON object, found list"


def _weight_map_list(d):
    _write(os.path.join(d, "model.safetensors.index.json"), '{"weight_map": ["model.safetensors"]}')
    return ("model.safetensors.index.json: expected 'weight_map' to be an object mapping tensor "
            "names to shard file names, found list")


def _torch_dtype(d):
    _edit_config(d, torch_dtype="float8_e4m3")
    return "config.json: torch_dtype must be one of ['bfloat16', 'float16', 'float32'], found " \
           "'float8_e4m3'"


def _int_embedding(d):
    key = _retype(d, "embed_tokens", np.int32)
    return f"tensor {key!r} in {os.path.join(d, 'model.safetensors')}: expected a floating " \
           "dtype, found int32"


def _bool_norm(d):
    key = _retype(d, "input_layernorm", bool)
    return f"tensor {key!r} in {os.path.join(d, 'model.safetensors')}: expected a floating " \
           "dtype, found bool"


def _tie_string(d):
    _edit_config(d, tie_word_embeddings="false")
    return "config.json: tie_word_embeddings must be a JSON boolean (true/false), got 'false'"


@pytest.mark.parametrize("edit", [_config_list, _weight_map_list, _torch_dtype, _int_embedding,
                                  _bool_norm, _tie_string], ids=lambda f: f.__name__)
def test_bad_hf_checkpoint(hf_dir, tmp_path, edit):
    d = _copy(hf_dir, tmp_path)
    _raises(VE, edit(d), lambda: load_hf_checkpoint(d, progress=False))


@pytest.mark.parametrize("kwargs, kind, words", [
    (dict(dtype=jnp.int32), VE, "load_hf_checkpoint: dtype must be a floating dtype (float32, "
                                "bfloat16 or float16), got int32"),
    (dict(dtype=123), VE, "dtype must be a floating dtype (float32, bfloat16 or float16), got 123"),
    (dict(prune={"format": "nm"}), TE, "prune must be a PruneConfig (e.g. PruneConfig("
                                       "format='nm')) or None, got dict"),
], ids=["int_dtype", "number_dtype", "prune_dict"])
def test_bad_hf_arguments(hf_dir, kwargs, kind, words):
    _raises(kind, words, lambda: load_hf_checkpoint(hf_dir, progress=False, **kwargs))


def test_bad_hf_files(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    os.mkdir(os.path.join(d, "model.safetensors"))
    _raises(VE, f"cannot read safetensors shard {d}/model.safetensors",
            lambda: load_hf_checkpoint(d, progress=False))
    d = _copy(hf_dir, tmp_path / "b")
    with open(os.path.join(d, "config.json"), "wb") as f:
        f.write(b"\xff\xfe{}")
    _raises(VE, f"{d}/config.json is not valid UTF-8 JSON",
            lambda: load_hf_checkpoint(d, progress=False))
    _raises(TE, "config must be a ModelConfig, got str", lambda: config_to_hf("not a config"))
    _raises(TE, "config must be a ModelConfig, got dict", lambda: config_to_hf({}))


@pytest.mark.parametrize("text, words", [
    ("", "is empty"),
    ('{"a": 1}', "is not a valid tokenizer.json"),
], ids=["empty", "not_a_tokenizer"])
@pytest.mark.parametrize("name", ["tokenizer.json", "f"])
def test_bad_tokenizer_to_save(tmp_path, text, words, name):
    path = str(tmp_path / name)
    _write(path, text)
    out = tmp_path / "out"
    _raises(VE, words, lambda: save_hf_checkpoint(_shared_model(), str(out), tokenizer=path))
    assert not out.exists()  # refused before writing anything


def test_config_dtype_is_ignored_when_dtype_given(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path)
    _edit_config(d, torch_dtype="float8_e4m3")
    _, config = load_hf_checkpoint(d, dtype="float32", progress=False)
    assert jnp.dtype(config.param_dtype) == jnp.float32


# ----------------------------------------------------------------------------- tokenizer


@functools.cache
def _tokenizer():
    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)


def _tokenizer_dir(tmp_path, text=None):
    d = tmp_path / "tok"
    d.mkdir()
    _write(str(d / "tokenizer.json"), _tokenizer().to_str() if text is None else text)
    return str(d)


@pytest.mark.parametrize("text, words", [
    ('{"version": "1.0", "trunc', "tokenizer.json is not a valid tokenizer.json (tokenizers "
                                  "could not parse it: EOF while parsing"),
    ('{"a": 1}', "tokenizer.json is not a valid tokenizer.json"),
], ids=["truncated", "not_a_tokenizer"])
def test_bad_tokenizer_file(tmp_path, text, words):
    d = _tokenizer_dir(tmp_path, text)
    _raises(VE, words, lambda: checkpoints.load_tokenizer(d))


def test_tokenizer_json_directory(tmp_path):
    (tmp_path / "tokenizer.json").mkdir()
    _raises(IsADirectoryError, f"{tmp_path}/tokenizer.json is a directory",
            lambda: checkpoints.load_tokenizer(str(tmp_path)))


def test_load_tokenizer_paths(tmp_path):
    _raises(FNF, "tokenizer directory '/nonexistent/dir' does not exist",
            lambda: checkpoints.load_tokenizer("/nonexistent/dir"))
    assert checkpoints.load_tokenizer(str(tmp_path)) is None  # documented: no tokenizer.json
    d = _tokenizer_dir(tmp_path)
    tok = checkpoints.load_tokenizer(os.path.join(d, "tokenizer.json"))  # the file itself
    assert tok.encode("the fox").ids == _tokenizer().encode("the fox").ids


@pytest.mark.parametrize("fn, words", [
    (lambda: train_tokenizer("the quick brown fox", vocab_size=300),
     "texts must be a sequence of str (one per document), got str"),
    (lambda: encode_documents(_tokenizer(), "hello world"),
     "texts must be a sequence of str (one per document), got str"),
    (lambda: token_bytes(_tokenizer(), 123), "text must be a str, got int"),
    (lambda: encode_documents(None, ["a"]), "tokenizer must be a tokenizers.Tokenizer"),
    (lambda: token_bytes(None, "a"), "tokenizer must be a tokenizers.Tokenizer (e.g. from "
                                     "train_tokenizer or load_tokenizer), got NoneType"),
], ids=["train_str", "encode_str", "token_bytes_int", "encode_none", "token_bytes_none"])
def test_bad_tokenizer_input(fn, words):
    _raises(TE, words, fn)


# ----------------------------------------------------------------------------- evaluation


def _stream():
    return _ids(20), np.ones(20, np.int64)


@pytest.mark.parametrize("fn, kind, words", [
    (lambda: EvalConfig(batch_size=True), VE, "EvalConfig: batch_size must be a positive int, "
                                              "got True"),
    (lambda: evaluate.evaluate_streams(_shared_model(), {"a": (_ids(20), np.zeros(20, np.int64))}),
     VE, "stream 'a': its predicted tokens hold 0 bytes"),
    (lambda: evaluate.evaluate_streams(_shared_model(), [("a", _stream())]), TE,
     "streams must be a mapping name -> (ids, nbytes), got list"),
    (lambda: evaluate.evaluate_streams(_shared_model(), {"a": _ids(20)}), TE,
     "stream 'a' must be a pair (ids [n], nbytes [n]), got ndarray"),
    (lambda: evaluate.evaluate_streams(_shared_model(), {"a": _stream()},
                                       config={"seq_len": 8}), TE,
     "config must be an EvalConfig (e.g. EvalConfig(seq_len=256)), got dict"),
    (lambda: EvalResult.from_dict({"bits_per_byte": 2.0}), VE,
     "EvalResult.from_dict: missing keys ['seq_len', 'digest', 'window_nats', 'window_tokens', "
     "'window_bytes'] (given keys ['bits_per_byte']); it expects the output of "
     "EvalResult.as_dict()"),
    (lambda: evaluate.evaluate_texts(_shared_model(), _tokenizer(), "some text"), TE,
     "texts must be a mapping name -> text"),
    (lambda: evaluate.evaluate_texts(_shared_model(), "/path/tokenizer.json", {"a": "text"}), TE,
     "tokenizer must be a tokenizers.Tokenizer, got str ('/path/tokenizer.json' looks like a "
     "path); load one with samoyeds_jax.load_tokenizer"),
    (lambda: evaluate.evaluate_tokens(None, *_stream()), TE,
     "model must be a MoETransformer, got NoneType"),
    (lambda: evaluate.paired_difference(
        evaluate.evaluate_tokens(_shared_model(), *_stream(), config=EvalConfig(seq_len=8)),
        None), TE, "b must be an EvalResult, got NoneType"),
    (lambda: pregate_recall(None, _ids(20)), TE, "model must be a MoETransformer, got NoneType"),
], ids=["batch_bool", "zero_bytes", "streams_list", "stream_not_pair", "config_dict",
        "from_dict_summary", "texts_str", "tokenizer_path", "tokens_none", "paired_none",
        "pregate_recall_none"])
def test_bad_evaluation_input(fn, kind, words):
    _raises(kind, words, fn)


# ----------------------------------------------------------------------------- training


def _small(**kw):
    return train.TrainConfig(**{**dict(steps=2, batch_size=2, seq_len=8, warmup_steps=1,
                                       eval_windows=2), **kw})


@pytest.mark.parametrize("fn, words", [
    (lambda: train.TrainConfig(steps=True), "TrainConfig: steps must be a positive int, got True"),
    (lambda: train.TrainConfig(steps=10, learning_rate="3e-3"),
     "TrainConfig: learning_rate must be a finite number > 0, got '3e-3'"),
    (lambda: train.TrainConfig(steps=10, weight_decay=float("nan")),
     "TrainConfig: weight_decay must be a finite number, got nan"),
    (lambda: PregateTrainConfig(learning_rate=float("nan"), temperature=float("nan")),
     "PregateTrainConfig: learning_rate must be a finite number > 0, got nan"),
    (lambda: PregateTrainConfig(temperature=float("nan")),
     "PregateTrainConfig: temperature must be a finite number > 0, got nan"),
    (lambda: PregateTrainConfig(steps=2.5, batch_size=1.5),
     "PregateTrainConfig: steps must be an int >= 0, got 2.5"),
    (lambda: PregateTrainConfig(batch_size=1.5),
     "PregateTrainConfig: batch_size must be a positive int, got 1.5"),
    (lambda: train.TrainConfig(steps=10, min_lr_ratio=2.0),
     "TrainConfig: min_lr_ratio must be in [0, 1], got 2.0"),
], ids=["steps_bool", "lr_str", "decay_nan", "pregate_lr_nan", "pregate_temperature_nan",
        "pregate_steps_float", "pregate_batch_float", "min_lr_ratio"])
def test_bad_train_config(fn, words):
    _raises(VE, words, fn)


@pytest.mark.parametrize("kwargs, kind, words", [
    (dict(resume=True), VE, "resume=True needs out_dir"),
    (dict(teacher="t"), TE, "teacher must be a MoETransformer (or None), got str"),
    (dict(out_dir="FILE"), VE, "exists and is not a directory"),
], ids=["resume_without_out_dir", "teacher_str", "out_dir_file"])
def test_bad_train_arguments(tmp_path, kwargs, kind, words):
    if kwargs.get("out_dir") == "FILE":
        kwargs["out_dir"] = str(tmp_path / "f")
        _write(kwargs["out_dir"], "x")
    _raises(kind, words, lambda: train.train(_model(), _ids(), _small(), progress=False,
                                             **kwargs))


def test_train_updates_the_model_in_place():
    model = _model()
    before = model.embed_tokens.embedding.get_value()
    snapshot = jnp.copy(before)  # not np.asarray: a host view of ``before`` blocks donation
    result = train.train(model, _ids(), _small(), progress=False)
    assert result.model is model
    assert before.is_deleted()  # donated to the first step: one copy of the weights, not two
    after = np.asarray(model.embed_tokens.embedding.get_value())
    assert not np.allclose(after, np.asarray(snapshot))
    logits, _ = model(jnp.asarray(_ids(8))[None])  # still usable
    assert logits.shape == (1, 8, V) and np.isfinite(np.asarray(logits)).all()


def test_replace_file_under_a_file(tmp_path):
    parent = tmp_path / "f"
    _write(str(parent), "x")
    _raises(NotADirectoryError, f"cannot write {parent}/child: {parent} is a file, not a "
                                "directory",
            lambda: atomic.replace_file(str(parent / "child"), b"x"))


# ----------------------------------------------------------------------------- offload


@functools.cache
def _store():
    return ExpertStore.from_stacked([{"w1": jnp.ones((4, 8, 8)), "w2": jnp.ones((4, 8, 8))}
                                     for _ in range(2)])


@functools.cache
def _cache():
    return ExpertCache(_store(), slots=4, top_k=2)


@pytest.mark.parametrize("fn, kind, words", [
    (lambda: OffloadConfig(policy="on_demand", slots=-3), VE,
     "OffloadConfig: slots must be a positive int, got -3"),
    (lambda: resolve_slots(OffloadConfig(policy="on_demand", slots=True), num_layers=2,
                           num_experts=4, top_k=2, max_tokens=1), VE,
     "OffloadConfig: slots must be a positive int, got True"),
    (lambda: OffloadGenerator(_shared_model(), offload="pregated"), TE,
     "offload must be an OffloadConfig (e.g. OffloadConfig(policy='pregated')), got str"),
    (lambda: ExpertCache(_store(), slots=2.5, top_k=2), VE,
     "ExpertCache: slots must be a positive int, got 2.5"),
    (lambda: ExpertCache(_store(), slots="4", top_k=2), VE,
     "ExpertCache: slots must be a positive int, got '4'"),
    (lambda: _cache().count_hits(99, [0]), VE, "layer must be an int in [0, 2), got 99"),
    (lambda: _cache().table(99), VE, "layer must be an int in [0, 2), got 99"),
    (lambda: _cache().layer_index(99), VE, "layer must be an int in [0, 2), got 99"),
    (lambda: ExpertStore.from_stacked([1.0, 2.0]), TE,
     "layers[0] must be a pytree (e.g. a dict) of [e, ...] arrays, got float"),
    (lambda: ExpertStore.from_stacked({"w1": jnp.ones((4, 8, 8))}), TE,
     "layers must be a list of per-layer pytrees (e.g. dicts of [e, ...] arrays), got dict"),
    (lambda: _store().expert(5, 0), VE, "layer must be an int in [0, 2), got 5"),
    (lambda: _store().expert(0, 9), VE, "expert must be an int in [0, 4), got 9"),
    (lambda: _store().expert(-1, 0), VE, "layer must be an int in [0, 2), got -1"),
    (lambda: _store().stacked(7), VE, "layer must be an int in [0, 2), got 7"),
    (lambda: ExpertCache(None, slots=4, top_k=2), TE,
     "store must be an ExpertStore (e.g. ExpertStore.from_stacked), got NoneType"),
    (lambda: ExpertCache(_store(), slots=4, top_k=9), VE,
     "ExpertCache: top_k must be <= the store's 4 experts, got top_k=9"),
    (lambda: _cache().resident(0, 99), VE, "expert must be an int in [0, 4), got 99"),
    (lambda: _cache().resident(9, 0), VE, "layer must be an int in [0, 2), got 9"),
    (lambda: _cache().commit(layer=7), VE, "layer must be an int in [0, 2), got 7"),
    (lambda: OffloadGenerator(None), TE, "model must be a MoETransformer, got NoneType"),
    (lambda: OffloadConfig(read_routing_each_layer="yes"), TE,
     "OffloadConfig: read_routing_each_layer must be a bool, got 'yes'"),
    (lambda: _cache().fetch(0, 1, demand=True), TE,
     "experts of layer 0 must be a sequence of expert ids, got int"),
], ids=["config_slots", "resolve_slots", "generator_str", "cache_float_slots",
        "cache_str_slots", "count_hits", "table", "layer_index", "store_list_of_floats",
        "store_dict", "store_layer", "store_expert", "store_negative", "store_stacked",
        "cache_none", "cache_top_k", "resident_expert", "resident_layer", "commit_layer",
        "generator_none", "config_bool", "fetch_int"])
def test_bad_offload_input(fn, kind, words):
    _raises(kind, words, fn)


# ----------------------------------------------------------------------------- pruning, saving

_NOT_CONFIG = "must be a PruneConfig (e.g. PruneConfig(format='nm'))"


@pytest.mark.parametrize("fn, kind, words", [
    (lambda: pruning.prune_experts({"w1": np.ones((2, 8, 8), np.float32)}, {"format": "nm"}),
     TE, f"config {_NOT_CONFIG}, got dict"),
    (lambda: pruning.convert(np.ones((8, 8), np.float32), "nm"), TE,
     f"config {_NOT_CONFIG}, got str"),
    (lambda: compress.calibrate_and_prune(_shared_model(), np.zeros((1, 4), np.int32),
                                          {"format": "nm"}), TE,
     f"config {_NOT_CONFIG} or None, got dict"),
    (lambda: compress.to_compressed(_shared_model(), None, linears={"format": "nm"}), TE,
     f"linears {_NOT_CONFIG} or None, got dict"),
    (lambda: checkpoints.load_or_convert("/nonexistent", "/nonexistent2", prune="nm"), TE,
     f"prune {_NOT_CONFIG} or None, got str"),
    (lambda: save_converted("not a model", "/nonexistent"), TE,
     "model must be a MoETransformer, got str"),
], ids=["prune_experts", "convert", "calibrate_and_prune", "to_compressed", "load_or_convert",
        "save_converted"])
def test_bad_pruning_and_saving_input(fn, kind, words):
    _raises(kind, words, fn)


def test_paths_that_are_not_paths_are_named(tmp_path):
    from samoyeds_jax import bpe_tokenizer, checkpoints, corpus

    with pytest.raises(TypeError, match="directory must be a path .* got NoneType"):
        checkpoints.load_model(None)
    with pytest.raises(TypeError, match="converted must be a path .* got NoneType"):
        checkpoints.load_or_convert(str(tmp_path), None)
    with pytest.raises(TypeError, match="root must be the corpus directory .* got NoneType"):
        corpus.read_texts(None)
    with pytest.raises(ValueError, match="train_tokenizer: vocab_size must be an int >= 0, got '300'"):
        bpe_tokenizer.train_tokenizer(["abc"], vocab_size="300")



@pytest.mark.parametrize("save", [save_converted, save_hf_checkpoint],
                         ids=["save_converted", "save_hf_checkpoint"])
def test_a_prepared_model_with_joined_qkv_is_not_saved(tmp_path, save):
    model = _model()
    model.prepare()
    assert model.layers[0].self_attn.fused
    target = tmp_path / "out"
    _raises(ValueError, f"{save.__name__}: the model's q/k/v projections are joined for "
            "inference (MoETransformer.prepare fused them); pass the model before prepare()",
            lambda: save(model, str(target)))
    assert not target.exists()

"""Evaluation: windowed NLL against direct forwards, bits/byte, paired differences, pre-gate
recall against a brute-force recomputation, bad inputs, and ``samoyeds-eval`` end to end."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from samoyeds_jax import bpe_tokenizer, corpus, evaluate, pregate, pregate_eval
from samoyeds_jax.evaluate import EvalConfig, EvalResult
from samoyeds_jax.model import ModelConfig, MoETransformer


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """Windowed and direct forwards batch the same tokens differently; at full precision they
    agree to float32 rounding on every platform (GPUs default to TF32 matmuls)."""
    with jax.default_matmul_precision("highest"):
        yield

V = 512  # ModelConfig.tiny's vocabulary


def _tiny(seed: int, *, pregate_mode: str = "standard", layers: int = 2) -> MoETransformer:
    config = ModelConfig.tiny(pregate=pregate_mode).replace(num_layers=layers)
    return MoETransformer(config, rngs=nnx.Rngs(seed))


def _stream(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Token 0 is the padding id; real streams use it too, so draw it as well.
    return rng.integers(0, V, n).astype(np.int32), rng.integers(1, 6, n).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


def _direct_nats(model, window: np.ndarray) -> float:
    """Summed NLL of window[1:] given the preceding tokens, from one forward of exactly that
    window (no padding, no batching), log-softmax in float64."""
    graphdef, state = nnx.split(model)
    logits = np.asarray(_logits(graphdef, state, jnp.asarray(window[None, :-1]))[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))  # [t, v]
    return float(-logp[np.arange(len(window) - 1), window[1:]].sum())


# Most scoring tests share windows of 8 and batches of 4: one executable for all of them.
CONFIG = EvalConfig(seq_len=8, batch_size=4)


# ----------------------------------------------------------------------------- scoring


def test_one_window_matches_direct_forward(rng):
    model = _tiny(int(rng.integers(1 << 30)))
    ids, nbytes = _stream(rng, 9)
    res = evaluate.evaluate_tokens(model, ids, nbytes, config=EvalConfig(seq_len=32, batch_size=4))
    assert (res.windows, res.seq_len, res.tokens) == (1, 8, 8)  # a short stream: one window
    assert res.bytes == int(nbytes[1:].sum())  # the first token is context only
    np.testing.assert_allclose(res.window_nats[0], _direct_nats(model, ids), rtol=2e-5)
    np.testing.assert_allclose(res.bits_per_byte, res.nats / math.log(2) / res.bytes, rtol=1e-12)
    np.testing.assert_allclose(res.perplexity, math.exp(res.nats / 8), rtol=1e-12)


def test_windows_and_tail_match_direct_forwards_with_one_compile(rng, monkeypatch):
    model = _tiny(int(rng.integers(1 << 30)))
    n = 8 * 5 + 1 + 3  # 5 full windows and a tail predicting 3 tokens
    ids, nbytes = _stream(rng, n)
    fresh = jax.jit(chex.assert_max_traces(evaluate._window_nll, n=1), static_argnums=0)
    monkeypatch.setattr(evaluate, "_window_nll_jit", fresh)
    res = evaluate.evaluate_tokens(model, ids, nbytes, config=CONFIG)  # 2 batches, one compile
    assert fresh._cache_size() == 1
    monkeypatch.undo()
    assert res.windows == 6
    np.testing.assert_array_equal(res.window_tokens, [8, 8, 8, 8, 8, 3])
    starts = np.arange(6) * 8
    want = [_direct_nats(model, ids[s:min(s + 9, n)]) for s in starts]
    np.testing.assert_allclose(res.window_nats, want, rtol=2e-5)
    np.testing.assert_array_equal(
        res.window_bytes, [nbytes[s + 1:min(s + 9, n)].sum() for s in starts])
    assert res.tokens == n - 1 and res.bytes == int(nbytes[1:].sum())
    np.testing.assert_allclose(res.bits_per_token, sum(want) / math.log(2) / (n - 1), rtol=2e-5)

    limited = evaluate.evaluate_tokens(
        model, ids, nbytes, config=dataclasses.replace(CONFIG, max_windows=2))
    assert limited.windows == 2
    np.testing.assert_allclose(limited.window_nats, res.window_nats[:2], rtol=1e-6)


def test_documents_are_windowed_separately(rng):
    model = _tiny(int(rng.integers(1 << 30)))
    a, b = _stream(rng, 17), _stream(rng, 4)
    res = evaluate.evaluate_streams(model, {"a": a, "b": b}, config=CONFIG)
    np.testing.assert_array_equal(res.window_tokens, [8, 8, 3])
    want = [_direct_nats(model, a[0][0:9]), _direct_nats(model, a[0][8:17]),
            _direct_nats(model, b[0])]
    np.testing.assert_allclose(res.window_nats, want, rtol=2e-5)


def test_uniform_model_gives_log2_v_bits_and_hand_made_bits_per_byte(rng):
    model = _tiny(int(rng.integers(1 << 30)))
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])  # logits all 0
    ids, nbytes = _stream(rng, 37)
    res = evaluate.evaluate_tokens(model, ids, nbytes, config=CONFIG)
    np.testing.assert_allclose(res.bits_per_token, math.log2(V), rtol=1e-6)
    np.testing.assert_allclose(res.perplexity, V, rtol=1e-5)

    ids = rng.integers(0, V, 9).astype(np.int32)
    res = evaluate.evaluate_tokens(model, ids, np.array([3, 1, 2, 5, 4, 1, 1, 2, 3]),
                                   config=CONFIG)
    # 8 predicted tokens x log2(512) = 9 bits over 1 + 2 + 5 + 4 + 1 + 1 + 2 + 3 = 19 bytes.
    assert (res.tokens, res.bytes) == (8, 19)
    np.testing.assert_allclose(res.bits_per_byte, 8 * 9 / 19, rtol=1e-6)
    d = res.as_dict()
    assert json.loads(json.dumps(d)) == d
    back = EvalResult.from_dict(d)
    assert back.bits_per_byte == res.bits_per_byte and back.digest == res.digest


def test_paired_difference(rng):
    model = _tiny(int(rng.integers(1 << 30)))
    ids, nbytes = _stream(rng, 50)
    a = evaluate.evaluate_tokens(model, ids, nbytes, config=CONFIG)
    same = evaluate.paired_difference(a, evaluate.evaluate_tokens(model, ids, nbytes,
                                                                  config=CONFIG))
    assert same["difference"] == 0.0 and same["standard_error"] == 0.0
    assert same["windows"] == 7 and same["bytes"] == a.bytes

    kernel = model.lm_head.kernel[...]
    model.lm_head.kernel[...] = kernel + 0.05 * jax.random.normal(jax.random.key(1), kernel.shape)
    b = evaluate.evaluate_tokens(model, ids, nbytes, config=CONFIG)
    diff = evaluate.paired_difference(a, b)
    assert diff["difference"] != 0.0 and 0.0 < diff["standard_error"] < math.inf
    np.testing.assert_allclose(diff["difference"], a.bits_per_byte - b.bits_per_byte, atol=1e-12)

    fewer = evaluate.evaluate_tokens(model, ids, nbytes,
                                     config=dataclasses.replace(CONFIG, max_windows=6))
    shuffled = evaluate.evaluate_tokens(model, ids[::-1].copy(), nbytes[::-1].copy(),
                                        config=CONFIG)
    for other in (fewer, shuffled):
        with pytest.raises(ValueError, match="same windows"):
            evaluate.paired_difference(a, other)


def _result(nats, nbytes) -> EvalResult:
    nbytes = np.asarray(nbytes, np.int64)
    return EvalResult(seq_len=8, window_nats=np.asarray(nats, np.float64),
                      window_tokens=np.full(nbytes.shape, 8, np.int64), window_bytes=nbytes,
                      digest="same")


def test_paired_standard_error_is_calibrated(rng):
    # A difference proportional to each window's bytes has no spread: SE 0 (ratio estimator).
    nbytes = rng.integers(20, 60, 9)
    base = rng.uniform(10, 30, 9)
    prop = evaluate.paired_difference(_result(base + 0.3 * nbytes * math.log(2), nbytes),
                                      _result(base, nbytes))
    np.testing.assert_allclose(prop["difference"], 0.3, rtol=1e-12)
    assert prop["standard_error"] < 1e-12
    # Across replications of random windows, the SE matches the spread of the estimate.
    estimates, errors = [], []
    for _ in range(300):
        nbytes = rng.integers(200, 1000, 60)
        d_bits = 0.02 * nbytes + rng.normal(0, 1, 60) * np.sqrt(nbytes)
        out = evaluate.paired_difference(_result(d_bits * math.log(2), nbytes),
                                         _result(np.zeros(60), nbytes))
        estimates.append(out["difference"])
        errors.append(out["standard_error"])
    ratio = np.mean(errors) / np.std(estimates)
    assert 0.8 < ratio < 1.2, ratio
    one = evaluate.paired_difference(_result([1.0], [5]), _result([0.5], [5]))
    assert math.isnan(one["standard_error"])


# ----------------------------------------------------------------------------- pre-gate recall


def _silence_blocks(model) -> None:
    """Zero every attention output and expert down projection: the blocks leave the hidden
    state unchanged, so every MoE block sees the same input."""
    for block in model.layers:
        k = block.self_attn.o_proj.kernel
        k[...] = jnp.zeros_like(k[...])
        block.mlp.w2[...] = jnp.zeros_like(block.mlp.w2[...])


@pytest.mark.parametrize("mode", ["pregated", "speculative"])
def test_pregate_recall_is_one_for_next_gate_copies_on_an_unchanged_state(rng, mode):
    model = _tiny(int(rng.integers(1 << 30)), pregate_mode=mode, layers=3)
    _silence_blocks(model)
    pregate.init_pregates_from_next_gates(pregate.moe_blocks(model))
    ids = rng.integers(0, V, 30)
    rec = pregate_eval.pregate_recall(model, ids, config=CONFIG)  # windows of 8, 8, 8 and 5
    assert [p.block for p in rec.pairs] == [0, 1]
    assert rec.exact_match == 1.0 and rec.pair_recall == 1.0 and rec.tokens == 2 * 29
    for p in rec.pairs:
        assert p.tokens == 29 and int(p.expert_actual.sum()) == 29 * 2
        seen = p.expert_actual > 0
        np.testing.assert_array_equal(p.expert_recall[seen], 1.0)
        assert np.isnan(p.expert_recall[~seen]).all()


def _topk_sets(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[t, e] logits -> ([t, e] bool top-k membership, [t] margin between k-th and k+1-th)."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    member = np.zeros(logits.shape, bool)
    np.put_along_axis(member, order[:, :k], True, axis=-1)
    srt = np.take_along_axis(logits, order, axis=-1)
    return member, srt[:, k - 1] - srt[:, k]


def test_pregate_recall_matches_brute_force(rng):
    model = _tiny(int(rng.integers(1 << 30)), pregate_mode="pregated", layers=3)  # random pre-gates
    n = 8 * 2 + 1  # two windows of 8 inputs (padding is covered by the test above)
    ids = rng.integers(0, V, n).astype(np.int32)
    rec = pregate_eval.pregate_recall(model, ids, config=CONFIG)

    batches = [jnp.asarray(ids[:-1].reshape(2, 8))]
    inputs = pregate.collect_moe_inputs(model, lambda m, b: m(b), batches)  # [n - 1, d] per block
    moes = pregate.moe_blocks(model)
    k = model.config.moe.top_k
    for p in rec.pairs:
        i = p.block
        pred, m1 = _topk_sets(np.asarray(moes[i].pregate.logits(jnp.asarray(inputs[i]))), k)
        act, m2 = _topk_sets(np.asarray(moes[i + 1].gate.logits(jnp.asarray(inputs[i + 1]))), k)
        # Tokens whose top-k is decided by a near-tie may flip between two float32 paths.
        ambiguous = int(np.sum((m1 < 1e-4) | (m2 < 1e-4)))
        assert p.tokens == n - 1
        assert abs(p.exact - int(np.all(pred == act, axis=-1).sum())) <= ambiguous
        np.testing.assert_allclose(p.expert_hits, (pred & act).sum(0), atol=ambiguous)
        np.testing.assert_allclose(p.expert_actual, act.sum(0), atol=ambiguous)
    assert 0.0 <= rec.exact_match <= rec.pair_recall <= 1.0


def test_pregate_recall_needs_pregates(rng):
    model = _tiny(int(rng.integers(1 << 30)))
    with pytest.raises(ValueError, match="pre-gates"):
        pregate_eval.pregate_recall(model, rng.integers(0, V, 10))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(rng):
    model = _tiny(int(rng.integers(1 << 30)))
    for n, word in ((0, "0 tokens"), (1, "1 token")):
        with pytest.raises(ValueError, match=word):
            evaluate.evaluate_tokens(model, np.zeros(n, np.int32), np.ones(n, np.int32))
    ids, nbytes = _stream(rng, 12)
    ids[5] = 600
    with pytest.raises(ValueError, match=r"\[0, 512\).*600"):
        evaluate.evaluate_tokens(model, ids, nbytes)
    with pytest.raises(ValueError, match="must both be"):
        evaluate.evaluate_tokens(model, ids[:5] % V, nbytes)
    for bad in (dict(seq_len=0), dict(batch_size=0), dict(max_windows=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EvalConfig(**bad)

    class BigTokenizer:
        def get_vocab_size(self, with_added_tokens=True):
            return 1000

    with pytest.raises(ValueError, match=r"1000 tokens.*vocab_size is 512"):
        evaluate.evaluate_texts(model, BigTokenizer(), {"t": "some text"})


def test_non_finite_loss_names_the_window(rng):
    model = _tiny(int(rng.integers(1 << 30)))
    emb = model.embed_tokens.embedding
    emb[...] = emb[...].at[7].set(jnp.nan)
    ids, nbytes = _stream(rng, 33)
    ids[ids == 7] = 8
    ids[20] = 7  # an input of window 2 only (windows of 8: inputs 16..23)
    with pytest.raises(ValueError, match="window 2 .*predicting tokens 17..24"):
        evaluate.evaluate_tokens(model, ids, nbytes, config=CONFIG)


# ----------------------------------------------------------------------------- command line


WORDS = ["the", "cat", "sat", "on", "mat", "café", "naïve", "猫", "über", "dog", "ran", "42"]


def _synthetic_text(rng, words: int) -> str:
    return " ".join(rng.choice(WORDS, words)) + "\n"


def _write_mixtral(directory: str, rng, *, vocab: int = 512, d: int = 64, f: int = 64,
                   layers: int = 2, experts: int = 4) -> None:
    """A random tiny Mixtral checkpoint in the Hugging Face layout (torch [out, in] weights)."""
    heads, kv, hd = 4, 2, d // 4
    os.makedirs(directory, exist_ok=True)
    config = {"model_type": "mixtral", "vocab_size": vocab, "hidden_size": d,
              "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "num_local_experts": experts, "num_experts_per_tok": 2,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
              "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
              "eos_token_id": 2}
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(config, fh)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    t = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32),
         "lm_head.weight": w(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = np.ones(d, np.float32)
        t[f"{p}.post_attention_layernorm.weight"] = np.ones(d, np.float32)
        t[f"{p}.self_attn.q_proj.weight"] = w(heads * hd, d)
        t[f"{p}.self_attn.k_proj.weight"] = w(kv * hd, d)
        t[f"{p}.self_attn.v_proj.weight"] = w(kv * hd, d)
        t[f"{p}.self_attn.o_proj.weight"] = w(d, heads * hd)
        t[f"{p}.block_sparse_moe.gate.weight"] = w(experts, d)
        for j in range(experts):
            e = f"{p}.block_sparse_moe.experts.{j}"
            t[f"{e}.w1.weight"], t[f"{e}.w3.weight"], t[f"{e}.w2.weight"] = (
                w(f, d), w(f, d), w(d, f))
    save_file(t, os.path.join(directory, "model.safetensors"))


@pytest.fixture
def checkpoint(tmp_path, rng):
    """(checkpoint dir, [text files]) with a tokenizer trained on synthetic text."""
    ckpt = str(tmp_path / "ckpt")
    _write_mixtral(ckpt, rng)
    tokenizer = bpe_tokenizer.train_tokenizer([_synthetic_text(rng, 200) for _ in range(20)],
                                       vocab_size=300, min_frequency=1)
    tokenizer.save(os.path.join(ckpt, "tokenizer.json"))
    files = []
    for name, words in (("a.txt", 120), ("b.txt", 40)):
        path = tmp_path / name
        path.write_text(_synthetic_text(rng, words), encoding="utf-8")
        files.append(str(path))
    return ckpt, files


def test_cli_end_to_end_and_converted_pregate_modes(checkpoint, tmp_path, capsys, rng):
    from samoyeds_jax import checkpoints, converted_io, hf_import
    from samoyeds_jax.eval_cli import main

    ckpt, files = checkpoint
    out = str(tmp_path / "eval.json")
    assert main(["--checkpoint", ckpt, "--text", *files, "--seq-len", "16", "--batch-size", "2",
                 "--pregate", "speculative", "--json", out]) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "block 0 -> 1" in printed
    with open(out) as fh:
        report = json.load(fh)
    tokenizer = checkpoints.load_tokenizer(ckpt)
    texts = {}
    for name in files:
        with open(name, encoding="utf-8") as fh:
            texts[name] = fh.read()
    streams = [bpe_tokenizer.token_bytes(tokenizer, text) for text in texts.values()]
    res = report["result"]
    assert res["tokens"] == sum(len(ids) - 1 for ids, _ in streams)
    assert res["bytes"] == sum(int(np.sum(nb[1:])) for _, nb in streams)
    assert res["windows"] == sum(math.ceil((len(ids) - 1) / 16) for ids, _ in streams)
    assert 0 < res["bits_per_byte"] < math.inf and report["pregate"] == "speculative"
    pairs = report["pregate_recall"]["pairs"]
    assert len(pairs) == 1 and pairs[0]["tokens"] == res["tokens"]
    assert 0.0 <= pairs[0]["exact_match"] <= pairs[0]["pair_recall"] <= 1.0

    # The same numbers from the library on the same checkpoint.
    model, _ = hf_import.load_hf_checkpoint(ckpt, pregate="speculative")
    direct = evaluate.evaluate_texts(model, tokenizer, texts,
                                     config=EvalConfig(seq_len=16, batch_size=2))
    np.testing.assert_allclose(res["bits_per_byte"], direct.bits_per_byte, rtol=1e-6)
    assert res["digest"] == direct.digest

    # --corpus: the validation split (texts/<name>_gut.txt, corpus.VALIDATION_PLAYS).
    root = tmp_path / "corpus"
    (root / "texts").mkdir(parents=True)
    for name in (*corpus.VALIDATION_PLAYS, "sonnets"):
        (root / "texts" / f"{name}_gut.txt").write_text(texts[files[0]], encoding="utf-8")
    out = str(tmp_path / "corpus.json")
    assert main(["--checkpoint", ckpt, "--corpus", str(root), "--seq-len", "16",
                 "--batch-size", "2", "--pregate", "speculative", "--json", out]) == 0
    with open(out) as fh:
        report = json.load(fh)
    assert sorted(report["texts"]) == sorted(corpus.VALIDATION_PLAYS)
    assert report["result"]["tokens"] == 4 * (len(streams[0][0]) - 1)

    # Pre-gate tensors in a Hugging Face checkpoint are loaded and measured by default.
    stored = str(tmp_path / "stored")
    shutil.copytree(ckpt, stored)
    tensors = load_file(os.path.join(stored, "model.safetensors"))
    tensors["model.layers.0.block_sparse_moe.pregate.weight"] = rng.standard_normal(
        (4, 64)).astype(np.float32)
    save_file(tensors, os.path.join(stored, "model.safetensors"))
    out = str(tmp_path / "stored.json")
    assert main(["--checkpoint", stored, "--text", *files, "--seq-len", "16",
                 "--batch-size", "2", "--json", out]) == 0
    with open(out) as fh:
        report = json.load(fh)
    assert report["pregate"] == "speculative" and report["pregate_recall"] is not None

    # A converted model keeps its pre-gates; --pregate switches the mode or drops them.
    conv = str(tmp_path / "conv")
    converted_io.save_converted(model, conv, source=ckpt)
    runs = {}
    for mode in ("pregated", "standard"):
        out = str(tmp_path / f"{mode}.json")
        assert main(["--checkpoint", conv, "--text", *files, "--seq-len", "16",
                     "--batch-size", "2", "--pregate", mode, "--json", out]) == 0
        with open(out) as fh:
            runs[mode] = json.load(fh)
    assert runs["pregated"]["pregate"] == "pregated"
    assert runs["pregated"]["pregate_recall"]["pairs"][0]["tokens"] == res["tokens"]
    assert runs["standard"]["pregate_recall"] is None
    # Speculative routing is the model's own: the same scores as without pre-gates. Pregated
    # routing of block 1 comes from block 0's input: a different model.
    spec, std, pre = (EvalResult.from_dict(r) for r in (
        res, runs["standard"]["result"], runs["pregated"]["result"]))
    np.testing.assert_allclose(spec.window_nats, std.window_nats, rtol=1e-6)
    assert abs(evaluate.paired_difference(pre, std)["difference"]) > 0.0
    with pytest.raises(ValueError, match="stores 'dense' experts"):
        main(["--checkpoint", conv, "--text", files[0], "--format", "nm"])


def test_set_pregate_creates_copies_of_the_next_gate(rng):
    from samoyeds_jax.eval_cli import _set_pregate

    model = _tiny(int(rng.integers(1 << 30)), layers=3)
    assert not pregate_eval.has_pregates(model)
    _set_pregate(model, "pregated")
    moes = pregate.moe_blocks(model)
    assert model.config.moe.pregate == "pregated" and moes[2].pregate is None
    for i in (0, 1):
        assert moes[i].config.pregate == "pregated"
        np.testing.assert_array_equal(moes[i].pregate.kernel[...], moes[i + 1].gate.kernel[...])
    _set_pregate(model, "standard")
    assert not pregate_eval.has_pregates(model) and moes[0].config.pregate == "standard"


def test_cli_errors_before_loading(checkpoint, tmp_path, monkeypatch):
    from samoyeds_jax import checkpoints, converted_io, hf_import
    from samoyeds_jax.eval_cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the cheap checks failed")

    for module, name in ((hf_import, "load_hf_checkpoint"), (checkpoints, "load_model"),
                         (converted_io, "load_converted")):
        monkeypatch.setattr(module, name, no_loading)
    ckpt, files = checkpoint
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        main(["--checkpoint", ckpt, "--text", missing])
    with pytest.raises(FileNotFoundError, match="no_dir"):
        main(["--checkpoint", ckpt, "--text", files[0], "--json",
              str(tmp_path / "no_dir" / "x.json")])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*0 token"):
        main(["--checkpoint", ckpt, "--text", str(empty)])
    with open(os.path.join(ckpt, "config.json")) as fh:
        config = json.load(fh)
    size = checkpoints.load_tokenizer(ckpt).get_vocab_size()
    assert size > 128
    config["vocab_size"] = 128  # smaller than the tokenizer's vocabulary
    with open(os.path.join(ckpt, "config.json"), "w") as fh:
        json.dump(config, fh)
    with pytest.raises(ValueError, match=rf"{size} tokens.*vocab_size is 128"):
        main(["--checkpoint", ckpt, "--text", files[0]])
    os.remove(os.path.join(ckpt, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        main(["--checkpoint", ckpt, "--text", files[0]])
    os.remove(os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        main(["--checkpoint", ckpt, "--text", files[0]])
    with pytest.raises(SystemExit):  # argparse: --text or --corpus is required
        main(["--checkpoint", ckpt])

"""Routing-aware, layer-by-layer pruning of a whole model; recovery; conversion; the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax import bpe_tokenizer, compress, corpus, pruning
from samoyeds_jax.cli import compress_main
from samoyeds_jax.hf_export import save_hf_checkpoint
from samoyeds_jax.model import ModelConfig, MoETransformer


def _windows(n=6, t=17, seed=None):
    return np.random.default_rng(seed).integers(0, 512, (n, t)).astype(np.int32)


def test_window_walk_keeps_one_mask_per_batch_shape():
    """The positions and causal mask of equal-shaped batches are one array (a [b, t, t] mask
    per batch would grow with the windows), the last, partial batch gets its own."""
    model = MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    walk = compress.WindowWalk(model.embed_tokens, model.config, _windows(n=7), batch_size=2)
    masks = [m for _, m in walk.pos_masks]
    assert len(masks) == 4 and masks[0] is masks[1] is masks[2] and masks[3] is not masks[0]
    assert masks[0].shape == (2, 17, 17) and masks[3].shape == (1, 17, 17)
    np.testing.assert_array_equal(np.asarray(masks[3][0]), np.tril(np.ones((17, 17), bool)))


def test_routed_inputs_are_exactly_each_experts_tokens():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    idx = np.array([[0, 1], [1, 2], [0, 2], [1, 0], [2, 1], [1, 2]])
    out, counts = compress.routed_inputs(x, idx, 4)
    assert counts == [3, 5, 4, 0]
    assert out.shape == (4, 8, 2)  # the largest count, 5, rounded up to a power of two
    np.testing.assert_array_equal(out[0, :3], x[[0, 2, 3]])
    np.testing.assert_array_equal(out[1, :5], x[[0, 1, 3, 4, 5]])
    assert not out[0, 3:].any() and not out[1, 5:].any() and not out[3].any()  # zero padding


@pytest.mark.parametrize("n,e,k", [(1, 4, 2), (3, 3, 3), (33, 8, 2), (64, 16, 4)])
def test_routed_inputs_match_a_loop_over_experts(n, e, k):
    """Awkward sizes: one row, every row on every expert (cap 4 > n 3), empty experts."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    out, counts = compress.routed_inputs(jnp.asarray(x, jnp.bfloat16), idx, e)
    rows = [np.nonzero((idx == j).any(axis=1))[0] for j in range(e)]
    assert counts == [len(r) for r in rows]
    want = np.zeros((e, 1 << (max(counts) - 1).bit_length(), 5), np.float32)
    for j, r in enumerate(rows):
        want[j, :len(r)] = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)[r]
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), want)


def test_layer_l_is_calibrated_on_the_pruned_blocks_before_it(monkeypatch):
    model = MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    windows = _windows()
    seen = {}
    real = pruning.prune_experts

    def spy(params, config, calibration, **kw):
        seen.update({k: np.asarray(v) for k, v in calibration.items()})
        return real(params, config, calibration, **kw)

    monkeypatch.setattr(pruning, "prune_experts", spy)
    cfg = pruning.PruneConfig(format="nm", method="wanda", output="dense")
    report = compress.calibrate_and_prune(model, windows, cfg, progress=False)
    assert [sum(t) for t in report.expert_tokens] == [windows.size * 2] * 2

    # Independently: block 1's MoE input is the output of the pruned block 0 (own-gate routing).
    from samoyeds_jax.model import KVCache, step_positions
    b, t = windows.shape
    pos, _, mask = step_positions(KVCache.init(model.config, b, t), jnp.ones((b, t), bool))
    x = model.embed_tokens(jnp.asarray(windows))
    h0, xm0 = compress._moe_input(model.layers[0], x, pos, mask)
    x1 = compress._moe_output(model.layers[0], h0, xm0)
    _, xm1 = compress._moe_input(model.layers[1], x1, pos, mask)
    idx = np.asarray(model.layers[1].mlp.route(xm1).topk_idx)
    expected, _ = compress.routed_inputs(np.asarray(xm1), idx, 4)
    np.testing.assert_allclose(seen["layers/1"], expected, rtol=2e-5, atol=2e-5)
    # ... and not that of the dense model
    dense = MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    h0d, xm0d = compress._moe_input(dense.layers[0], x, pos, mask)
    _, xm1d = compress._moe_input(dense.layers[1], compress._moe_output(dense.layers[0], h0d, xm0d),
                                  pos, mask)
    assert not np.allclose(np.asarray(xm1d), np.asarray(xm1), atol=1e-4)


@pytest.mark.parametrize("fmt, kw", [("nm", {}), ("samoyeds", {}),
                                     ("unstructured", {"sparsity": 0.75})])
def test_prune_then_convert_is_exact(fmt, kw):
    model = MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(1))
    windows = _windows()
    cfg = pruning.PruneConfig(format=fmt, method="magnitude", output="dense", **kw)
    compress.calibrate_and_prune(model, windows, cfg, progress=False)
    before, _ = model(jnp.asarray(windows))
    compress.to_compressed(model, cfg)
    assert model.config.moe.expert_format == fmt
    assert all(b.mlp.config.expert_format == fmt for b in model.layers)
    assert hasattr(model.layers[0].mlp.w1.get_value(), "to_dense")
    after, _ = model(jnp.asarray(windows))
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already stored"):
        compress.to_compressed(model, cfg)


def test_bad_inputs():
    model = MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    cfg = pruning.PruneConfig(format="nm", output="dense")
    with pytest.raises(ValueError, match="output='dense'"):
        compress.calibrate_and_prune(model, _windows(), pruning.PruneConfig(format="nm"))
    with pytest.raises(ValueError, match="vocabulary"):
        compress.calibrate_and_prune(model, _windows() + 600, cfg)
    with pytest.raises(ValueError, match=r"\[n, t\]"):
        compress.calibrate_and_prune(model, np.zeros((0, 5), np.int32), cfg)
    with pytest.raises(ValueError, match="integer"):
        compress.calibrate_and_prune(model, np.zeros((2, 5)), cfg)


def _tiny_checkpoint_and_corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["thou", "art", "my", "lord", "good", "night", "sweet", "prince", "and", "the"]
    root = tmp_path / "corpus"
    (root / "texts").mkdir(parents=True)
    for name in ("hamlet", "macbeth", "tempest", "twelfth_night", "lear", "othello"):
        text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(80))
        (root / "texts" / f"{name}_gut.txt").write_text(text)
    train, _ = corpus.split_texts(corpus.read_texts(str(root)))
    tok = bpe_tokenizer.train_tokenizer(train.values(), vocab_size=300)
    model = MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(0))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    ckpt = tmp_path / "dense"
    save_hf_checkpoint(model, str(ckpt), tokenizer=str(tok_path))
    return str(ckpt), str(root)


def test_cli_end_to_end(tmp_path, capsys):
    ckpt, root = _tiny_checkpoint_and_corpus(tmp_path)
    out = str(tmp_path / "samoyeds")
    args = ["--checkpoint", ckpt, "--corpus", root, "--out", out, "--format", "samoyeds",
            "--method", "sparsegpt", "--linears", "2:4", "--calib-windows", "4",
            "--recover-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-windows", "4"]
    assert compress_main(args) == 0
    text = capsys.readouterr().out
    for word in ("dense", "one-shot", "recovered", "saved samoyeds model"):
        assert word in text
    meta = json.load(open(os.path.join(out, "samoyeds_config.json")))
    results = meta["conversion"]["results"]
    assert set(results) == {"dense", "one-shot", "recovered"}
    assert all(np.isfinite(r["bits_per_byte"]) for k, r in results.items() if k != "dense")
    from samoyeds_jax.converted_io import load_converted
    loaded, config = load_converted(out)
    assert config.moe.expert_format == "samoyeds"
    assert config.linear.format == "nm" and meta["conversion"]["prune_linears"]["n"] == 2
    assert type(loaded.layers[1].self_attn.o_proj.kernel.get_value()).__name__ == "NMSparse"
    assert config.moe.pregate == "speculative" and loaded.layers[0].mlp.pregate is not None
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    # a second run refuses to overwrite
    assert compress_main(args) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_stream_scores_what_the_whole_model_scores(tmp_path, capsys):
    """``--stream``: the same dense and one-shot bits/byte (same windows) and the same experts
    and attention projections as pruning the model loaded whole, in float32 like the
    checkpoint."""
    ckpt, root = _tiny_checkpoint_and_corpus(tmp_path)
    common = ["--checkpoint", ckpt, "--corpus", root, "--format", "2:4", "--method", "wanda",
              "--linears", "2:4", "--calib-windows", "4", "--seq-len", "32", "--eval-windows", "5"]
    assert compress_main(common + ["--out", str(tmp_path / "whole"), "--recover-steps", "0"]) == 0
    assert compress_main(common + ["--out", str(tmp_path / "streamed"), "--stream"]) == 0
    assert "saved 2:4 model" in capsys.readouterr().out
    metas = [json.load(open(os.path.join(tmp_path, d, "samoyeds_config.json")))["conversion"]
             for d in ("whole", "streamed")]
    assert metas[1]["stream"] and not metas[0]["stream"]
    for key in ("dense", "one-shot"):
        want, got = metas[0]["results"][key], metas[1]["results"][key]
        want = want if key == "dense" else want["bits_per_byte"]
        got = got if key == "dense" else got["bits_per_byte"]
        assert got == pytest.approx(want, rel=1e-5), key
    assert metas[1]["results"]["one-shot"]["vs_dense"] > 0
    from samoyeds_jax.converted_io import load_converted
    (whole, _), (streamed, config) = (load_converted(str(tmp_path / d))
                                      for d in ("whole", "streamed"))
    assert config.moe.expert_format == "nm" and config.moe.pregate == "speculative"
    assert config.linear.format == "nm"
    for a, b in zip(whole.layers, streamed.layers):
        for get in (lambda blk: blk.mlp.w2, lambda blk: blk.self_attn.o_proj.kernel):
            np.testing.assert_allclose(np.asarray(get(b).get_value().to_dense()),
                                       np.asarray(get(a).get_value().to_dense()), atol=1e-6)
    assert compress_main(common + ["--out", str(tmp_path / "x"), "--stream", "--recover-steps",
                                   "3"]) == 2
    assert "--recover-steps has no effect here: --stream" in capsys.readouterr().err


def test_cli_checks_before_loading(tmp_path, capsys):
    ckpt, root = _tiny_checkpoint_and_corpus(tmp_path)
    os.remove(os.path.join(ckpt, "tokenizer.json"))
    assert compress_main(["--checkpoint", ckpt, "--corpus", root,
                          "--out", str(tmp_path / "o")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert compress_main(["--checkpoint", str(tmp_path / "nope"), "--corpus", root,
                          "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--linear-sparsity", "0.6"], "--linear-sparsity is for --linears unstructured"),
    (["--linears", "2:4", "--linear-sparsity", "0.6"],
     "--linear-sparsity is for --linears unstructured"),
])
def test_cli_refuses_linear_options_without_effect(tmp_path, capsys, extra, match):
    ckpt, root = _tiny_checkpoint_and_corpus(tmp_path)
    assert compress_main(["--checkpoint", ckpt, "--corpus", root,
                          "--out", str(tmp_path / "o")] + extra) == 2
    assert match in capsys.readouterr().err


def test_calibration_computes_the_experts_with_the_reference(monkeypatch):
    """The calibration forwards run the ``xla`` implementation, whatever the model's, and the
    model's implementation is back afterwards."""
    from samoyeds_jax import moe as moe_lib

    model = MoETransformer(ModelConfig.tiny(implementation=("triton", "xla")), rngs=nnx.Rngs(0))
    seen = []
    real = moe_lib.expert_ffn

    def spy(*args, implementation=None, **kw):
        seen.append(implementation)
        return real(*args, implementation=implementation, **kw)

    monkeypatch.setattr(moe_lib, "expert_ffn", spy)
    jax.clear_caches()  # the jitted block forwards trace again, through the spy
    cfg = pruning.PruneConfig(format="nm", method="wanda", output="dense")
    compress.calibrate_and_prune(model, _windows(), cfg, progress=False)
    assert seen and set(seen) == {"xla"}
    assert model.config.moe.implementation == ("triton", "xla")
    assert all(b.mlp.config.implementation == ("triton", "xla") for b in model.layers)


@pytest.mark.parametrize("pregate,compiles", [("standard", 1), ("pregated", 2)])
def test_alike_blocks_share_their_compiled_calibration_forwards(monkeypatch, pregate, compiles):
    """Blocks alike to block 0 run through its graph: a 5-block model compiles each block
    forward of the walk once, not 5 times (pre-gated: twice, the last block has no pre-gate),
    and prunes as before."""
    cfg = ModelConfig.tiny(pregate=pregate).replace(num_layers=5)
    windows = _windows()
    prune = pruning.PruneConfig(format="nm", method="wanda", output="dense")
    jax.clear_caches()
    model = MoETransformer(cfg, rngs=nnx.Rngs(2))
    report = compress.calibrate_and_prune(model, windows, prune, progress=False)
    for fn in (compress._moe_input, compress._moe_output, compress._topk):
        assert fn.jitted_fn._cache_size() == compiles
    # The same walk, every block through its own graph, prunes identically.
    reference = MoETransformer(cfg, rngs=nnx.Rngs(2))
    monkeypatch.setattr(compress, "_views", lambda m: (lambda i: m.layers[i]))
    jax.clear_caches()
    expected = compress.calibrate_and_prune(reference, windows, prune, progress=False)
    assert compress._moe_input.jitted_fn._cache_size() == 5  # one per block without sharing
    assert report.expert_tokens == expected.expert_tokens
    for got, want in zip(model.layers, reference.layers):
        np.testing.assert_array_equal(np.asarray(got.mlp.w1.get_value()),
                                      np.asarray(want.mlp.w1.get_value()))

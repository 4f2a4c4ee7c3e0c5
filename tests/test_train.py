"""Training: losses, expert-compute paths, accumulation, masks, checkpoints, resume, NaN stop."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax import train as T
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.train_data import sample_windows
from samoyeds_jax.train_losses import _losses, distill_kl, router_losses
from samoyeds_jax.train_optim import sparsity_masks
from samoyeds_jax.trainer import Trainer


def _config(**moe):
    return ModelConfig.tiny().replace(moe=moe) if moe else ModelConfig.tiny()


def _tokens(n=4000, seed=None):
    rng = np.random.default_rng(seed)
    # A learnable stream: a random walk over a small alphabet.
    return (np.cumsum(rng.integers(1, 4, n)) % 97).astype(np.int32)


def _small(**kw):
    base = dict(steps=3, batch_size=4, seq_len=16, warmup_steps=1, eval_windows=4)
    return T.TrainConfig(**{**base, **kw})


@jax.default_matmul_precision("highest")  # the same math; GPUs default to TF32 matmuls
def test_expert_compute_paths_give_same_loss_and_gradients():
    seed = np.random.SeedSequence().entropy % 2**31
    windows = jnp.asarray(_tokens(4 * 17, seed).reshape(4, 17))
    tc = _small()
    grads = {}
    for implementation in ("xla", "all_experts"):
        model = MoETransformer(_config(implementation=implementation), rngs=nnx.Rngs(seed))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(p):
            return _losses(nnx.merge(graphdef, p, rest), windows, tc, None)[0]

        grads[implementation] = jax.value_and_grad(loss_fn)(params)
    (l1, g1), (l2, g2) = grads["xla"], grads["all_experts"]
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    chex.assert_trees_all_close(g1, g2, rtol=2e-4, atol=1e-6)


def test_auto_expert_compute_by_platform():
    assert T.expert_implementation("auto", "cpu") == "all_experts"
    assert T.expert_implementation("auto", "gpu") == "xla"
    assert T.expert_implementation("xla", "cpu") == "xla"


def test_loss_decreases_and_implementation_restored():
    model = MoETransformer(_config(implementation=("triton", "xla")), rngs=nnx.Rngs(0))
    tokens = _tokens()
    result = T.train(model, tokens, _small(steps=30, learning_rate=1e-2), val_tokens=tokens[:600],
                     progress=False)
    hist = result.history
    assert hist[-1]["ce"] < hist[0]["ce"] - 0.5
    assert "val_ce" in hist[-1] and np.isfinite(hist[-1]["val_ce"])
    assert result.model.config.moe.implementation == ("triton", "xla")
    assert all(b.mlp.config.implementation == ("triton", "xla") for b in result.model.layers)


@jax.default_matmul_precision("highest")
def test_grad_accumulation_matches_one_batch():
    tokens = _tokens()
    windows = sample_windows(tokens, batch=4, length=17, seed=1, step=0)
    out = []
    for accum in (1, 2):  # the experts computed as train() computes them
        model = MoETransformer(_config(implementation=T.expert_implementation("auto")),
                               rngs=nnx.Rngs(3))
        trainer = Trainer(model, _small(grad_accum=accum))
        losses = trainer.step(windows)
        out.append((losses, nnx.state(trainer.model, nnx.Param)))
    np.testing.assert_allclose(out[0][0]["ce"], out[1][0]["ce"], rtol=1e-5)
    chex.assert_trees_all_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)


def test_masks_keep_pruned_weights_exactly_zero():
    model = MoETransformer(_config(), rngs=nnx.Rngs(0))
    for block in model.layers:  # prune half of every expert weight at random
        for name in ("w1", "w3", "w2"):
            w = getattr(block.mlp, name).get_value()
            keep = jax.random.bernoulli(jax.random.key(1), 0.5, w.shape)
            getattr(block.mlp, name).set_value(jnp.where(keep, w, 0.0))
    masks = sparsity_masks(nnx.state(model, nnx.Param))
    before = [np.asarray(b.mlp.w1.get_value()) != 0 for b in model.layers]
    emb0 = np.asarray(model.embed_tokens.embedding.get_value())
    result = T.train(model, _tokens(), _small(steps=3, learning_rate=1e-2), masks=masks,
                     progress=False)
    for block, nz in zip(result.model.layers, before):
        w = np.asarray(block.mlp.w1.get_value())
        assert np.all(w[~nz] == 0.0)
        assert np.count_nonzero(w) == np.count_nonzero(nz)
    # the unmasked parameters did train
    assert not np.allclose(np.asarray(result.model.embed_tokens.embedding.get_value()), emb0)


def test_distillation_from_itself_is_zero_kl():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    assert float(distill_kl(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    other = logits + jax.random.normal(jax.random.key(1), logits.shape)
    assert float(distill_kl(other, logits, 1.0)) > 0.01


def test_pregate_loss_trains_pregates():
    cfg = _config(pregate="speculative")
    model = MoETransformer(cfg, rngs=nnx.Rngs(0))
    before = np.asarray(model.layers[0].mlp.pregate.kernel.get_value())
    result = T.train(model, _tokens(), _small(steps=3, pregate_coef=1.0), progress=False)
    assert result.history[-1]["pregate_kl"] > 0
    after = np.asarray(result.model.layers[0].mlp.pregate.kernel.get_value())
    assert not np.allclose(before, after)


@pytest.mark.parametrize("term,moves,stays", [
    ("pregate_kl", ("layers", 0, "mlp", "pregate"), ("layers", 1, "mlp", "gate")),
    ("gate_agreement", ("layers", 1, "mlp", "gate"), ("layers", 0, "mlp", "pregate")),
])
def test_pregate_terms_differentiate_one_side(term, moves, stays):
    """pregate_kl fits the pre-gate to the next gate; gate_agreement the next gate to the
    pre-gate: each differentiates its own side only."""
    model = MoETransformer(_config(pregate="speculative"), rngs=nnx.Rngs(0))
    windows = jnp.asarray(_tokens()[:2 * 17].reshape(2, 17))

    def loss(m):
        _, _, rl = m(windows[:, :-1], return_router_logits=True)
        return router_losses(m, rl)[term]

    grads = nnx.grad(loss)(model)

    def kernel_grad(path):
        node = grads
        for key in path:
            node = node[key]
        return np.asarray(node["kernel"].get_value())

    assert float(loss(model)) > 0
    assert np.abs(kernel_grad(moves)).max() > 0
    np.testing.assert_array_equal(kernel_grad(stays), 0.0)


def test_gate_agreement_coef_enters_the_loss():
    model = MoETransformer(_config(pregate="speculative"), rngs=nnx.Rngs(0))
    result = T.train(model, _tokens(), _small(steps=2, gate_agreement_coef=1.0), progress=False)
    assert result.history[-1]["gate_agreement"] > 0
    with pytest.raises(ValueError, match="gate_agreement_coef must be >= 0"):
        _small(steps=2, gate_agreement_coef=-1.0)


@jax.default_matmul_precision("highest")
def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    tokens = _tokens()
    tc = _small(steps=4, checkpoint_every=2)
    full = T.train(MoETransformer(_config(), rngs=nnx.Rngs(5)), tokens, tc, progress=False)

    class Stop(Exception):
        pass

    def stop_at_2(step, _):
        if step == 2:
            raise Stop

    out = str(tmp_path / "run")
    with pytest.raises(Stop):
        T.train(MoETransformer(_config(), rngs=nnx.Rngs(5)), tokens, tc, out_dir=out,
                progress=False, on_step=stop_at_2)
    state = json.loads(open(os.path.join(out, T.LAST, T.TRAINER_STATE)).read())
    assert state["step"] == 2
    resumed = T.train(MoETransformer(_config(), rngs=nnx.Rngs(99)), tokens, tc, out_dir=out,
                      resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    # Bit-exact on CPU. A GPU sums the embedding gradient's scatter-add in a nondeterministic
    # order (a few entries differ by ~5e-6 after 4 steps); a lost optimizer state or a shifted
    # data order would differ by the learning rate (~1e-3).
    atol = 1e-6 if jax.default_backend() == "cpu" else 2e-5
    chex.assert_trees_all_close(nnx.state(resumed.model, nnx.Param),
                                nnx.state(full.model, nnx.Param), rtol=1e-5, atol=atol)
    with pytest.raises(ValueError, match="another TrainConfig"):
        T.train(MoETransformer(_config(), rngs=nnx.Rngs(5)), tokens,
                _small(steps=5, checkpoint_every=2), out_dir=out, resume=True, progress=False)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    tokens = _tokens()
    out = str(tmp_path / "run")
    tc = _small(steps=4, checkpoint_every=1)
    real_step = Trainer.step

    def poisoned(self, windows):
        losses = real_step(self, windows)
        if len(poisoned.calls) == 2:
            losses["ce"] = float("nan")
        poisoned.calls.append(1)
        return losses

    poisoned.calls = []
    monkeypatch.setattr(Trainer, "step", poisoned)
    model = MoETransformer(_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="non-finite loss at step 3"):
        T.train(model, tokens, tc, out_dir=out, progress=False)
    state = json.loads(open(os.path.join(out, T.LAST, T.TRAINER_STATE)).read())
    assert state["step"] == 2
    assert model.config.moe.implementation is None and model.layers[0].mlp.track_recall


@pytest.mark.parametrize("bad, match", [
    (np.array([1.5, 2.0]), "1-D integer"),
    (np.array([[1, 2]]), "1-D integer"),
    (np.array([1, 2, 600]), "vocabulary"),
    (np.array([-1, 2, 3]), "vocabulary"),
])
def test_bad_tokens(bad, match):
    with pytest.raises(ValueError, match=match):
        T.train(MoETransformer(_config(), rngs=nnx.Rngs(0)), bad, _small(), progress=False)


def test_too_short_stream_and_bad_configs():
    with pytest.raises(ValueError, match="needs 17"):
        T.train(MoETransformer(_config(), rngs=nnx.Rngs(0)), np.arange(10), _small(),
                progress=False)
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        T.TrainConfig(steps=1, batch_size=3, grad_accum=2)
    with pytest.raises(ValueError, match="steps"):
        T.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="teacher"):
        Trainer(MoETransformer(_config(), rngs=nnx.Rngs(0)), _small(distill_weight=0.5))
    with pytest.raises(ValueError, match="dense experts"):
        T.train(MoETransformer(ModelConfig.tiny(expert_format="nm"), rngs=nnx.Rngs(0)),
                _tokens(), _small(), progress=False)


def test_bfloat16_compute_keeps_float32_parameters():
    model = T.new_model(_config(), _small(dtype="bfloat16"))
    assert model.config.dtype == jnp.bfloat16 and model.config.param_dtype == jnp.float32
    result = T.train(model, _tokens(), _small(steps=2, dtype="bfloat16"), progress=False)
    assert all(np.isfinite(h["ce"]) for h in result.history)
    leaves = jax.tree.leaves(nnx.state(result.model, nnx.Param))
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float32)}

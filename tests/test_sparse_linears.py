"""Sparse non-expert linears: ``Linear``, ``LinearConfig`` on the model (attention projections and
shared experts), pruning them with the experts, conversion, converted save/load."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import linear_op
from pallas_kernels.format_registry import format_of
from samoyeds_jax import compress, pruning
from samoyeds_jax.config import LinearConfig, SparsityConfig
from samoyeds_jax.converted_io import load_converted, save_converted
from samoyeds_jax.linear import Linear
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.train_optim import sparsity_masks

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _config(fmt="dense", shared=0, **sparsity):
    cfg = ModelConfig.tiny().replace(moe=dict(num_shared_experts=shared))
    return cfg.replace(linear=dict(format=fmt, sparsity=SparsityConfig(**sparsity)))


def _windows(n=4, t=17, seed=0):
    return np.random.default_rng(seed).integers(0, 512, (n, t)).astype(np.int32)


def _logits(model, windows):
    return model(jnp.asarray(windows))[0]


@pytest.mark.parametrize("fmt,kw,cls", [
    ("nm", {}, "NMSparse"),
    ("samoyeds", {"v": 64}, "SamoyedsSparse"),
    ("unstructured", {"density": 0.25}, "TiledSparse"),
])
@pytest.mark.parametrize("tokens", [1, 3, 33])
def test_linear_in_a_sparse_format_is_x_times_its_dense_kernel(fmt, kw, cls, tokens):
    lin = Linear(128, 256, config=LinearConfig(format=fmt, sparsity=SparsityConfig(**kw)),
                 use_bias=True, rngs=nnx.Rngs(tokens))
    w = lin.kernel.get_value()
    assert type(w).__name__ == cls
    lin.bias.set_value(jax.random.normal(jax.random.key(1), (256,)))
    x = jax.random.normal(jax.random.key(tokens), (2, tokens, 128))
    want = (jnp.einsum("btk,kn->btn", x, w.to_dense(), precision="highest")
            + lin.bias.get_value()[None, None])
    chex.assert_trees_all_close(lin(x), want, rtol=1e-5, atol=1e-5)
    # Unprepared, it runs on the automatic choice for the stored weight: xla off a GPU.
    chosen = linear_op.resolve(None, w).name
    assert chosen == "xla" or jax.default_backend() == "gpu"
    assert lin.implementation().startswith(chosen)


def test_dense_linear_matches_nnx_linear():
    ours = Linear(64, 32, use_bias=True, rngs=nnx.Rngs(0))
    ref = nnx.Linear(64, 32, use_bias=True, rngs=nnx.Rngs(0))
    ref.kernel.set_value(ours.kernel.get_value())
    ref.bias.set_value(jnp.arange(32.0))
    ours.bias.set_value(jnp.arange(32.0))
    x = jax.random.normal(jax.random.key(2), (5, 64))
    chex.assert_trees_all_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_model_builds_its_linears_in_the_format():
    model = MoETransformer(_config("nm", shared=1), rngs=nnx.Rngs(0))
    for block in model.layers:
        for p in _PROJ:
            assert format_of(getattr(block.self_attn, p).kernel.get_value()).name == "nm"
        for n in ("w1", "w3", "w2"):
            assert format_of(getattr(block.mlp.shared, n).get_value()).name == "nm"
        assert isinstance(block.mlp.w1.get_value(), jax.Array)  # experts stay dense
    logits = _logits(model, _windows())
    assert logits.shape == (4, 17, 512) and bool(jnp.isfinite(logits).all())


def test_a_weight_the_format_cannot_store_is_named():
    with pytest.raises(ValueError, match=r"attention q_proj \[128, 128\].*v"):
        _config("samoyeds", v=96)
    with pytest.raises(ValueError, match="linear format must be one of"):
        LinearConfig(format="blocky")


def test_prune_linears_with_experts_then_convert_is_exact(tmp_path):
    method = "wanda"  # calibrated; SparseGPT is compared below
    model = MoETransformer(_config(shared=1), rngs=nnx.Rngs(0))
    windows = _windows()
    experts = pruning.PruneConfig(format="nm", method=method, output="dense")
    linears = pruning.PruneConfig(format="unstructured", sparsity=0.5, method=method,
                                  output="dense")
    report = compress.calibrate_and_prune(model, windows, experts, linears=linears,
                                          progress=False)
    assert len(report.linear_blocks) == 2
    names = set(report.linear_blocks[1].layers)
    assert names == {f"layers/1/self_attn/{p}" for p in _PROJ} | {
        f"layers/1/mlp/shared/{n}" for n in ("w1", "w3", "w2")}
    assert report.as_dict()["linears"]["format"] == "unstructured"
    for block in model.layers:
        for p in _PROJ:
            w = np.asarray(getattr(block.self_attn, p).kernel.get_value())
            assert (w == 0).mean() == pytest.approx(0.5, abs=0.02)
    masks = sparsity_masks(nnx.state(model, nnx.Param))
    assert not bool(masks["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value().all())
    before = _logits(model, windows)
    compress.to_compressed(model, experts, linears=linears)
    assert model.config.linear.format == "unstructured"
    assert format_of(model.layers[0].self_attn.o_proj.kernel.get_value()).name == "unstructured"
    chex.assert_trees_all_close(_logits(model, windows), before, rtol=1e-4, atol=1e-4)
    save_converted(model, str(tmp_path / "m"))
    loaded, config = load_converted(str(tmp_path / "m"))
    assert config.linear.format == "unstructured" and config.linear.implementation is None
    chex.assert_trees_all_close(_logits(loaded, windows), before, rtol=1e-4, atol=1e-4)


def test_sparsegpt_keeps_attention_closer_than_magnitude():
    windows = _windows(n=8)
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = MoETransformer(_config(), rngs=nnx.Rngs(3))
        cfg = pruning.PruneConfig(format="nm", method=method, output="dense")
        experts = pruning.PruneConfig(format="nm", output="dense")
        report = compress.calibrate_and_prune(model, windows, experts, linears=cfg,
                                              progress=False)
        errors[method] = report.linear_blocks[0].layers["layers/0/self_attn/q_proj"]
    assert (errors["sparsegpt"].output_rel_error
            < 0.8 * errors["magnitude"].output_rel_error)


def test_calibrate_and_prune_refuses_sparse_linears():
    model = MoETransformer(_config("nm"), rngs=nnx.Rngs(0))
    cfg = pruning.PruneConfig(format="nm", output="dense")
    with pytest.raises(ValueError, match="linears are already 'nm'"):
        compress.calibrate_and_prune(model, _windows(), cfg, linears=cfg, progress=False)
    with pytest.raises(ValueError, match="linears=PruneConfig\\(output='dense'"):
        compress.calibrate_and_prune(MoETransformer(_config(), rngs=nnx.Rngs(0)), _windows(),
                                     cfg, linears=pruning.PruneConfig(format="nm"),
                                     progress=False)


def test_converted_model_stores_the_linear_format_not_the_implementation(tmp_path):
    model = MoETransformer(_config("nm"), rngs=nnx.Rngs(0))
    model.config = model.config.replace(linear=dict(implementation="xla"))
    save_converted(model, str(tmp_path / "m"))
    meta = json.loads((tmp_path / "m" / "samoyeds_config.json").read_text())
    assert meta["config"]["linear"]["format"] == "nm"
    assert "implementation" not in meta["config"]["linear"]
    loaded, _ = load_converted(str(tmp_path / "m"))
    w = loaded.layers[1].self_attn.v_proj.kernel.get_value()
    chex.assert_trees_all_equal(w, model.layers[1].self_attn.v_proj.kernel.get_value())


def test_prepare_picks_the_linear_implementation_and_keeps_the_output():
    cfg = _config("nm", shared=1).replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = MoETransformer(cfg, rngs=nnx.Rngs(0))
    windows = _windows(n=2)
    before = _logits(model, windows)
    q = model.layers[0].self_attn.q_proj
    # The automatic choice for the weight once prepared (a kernel that needs its own layout,
    # such as mosaic_sparse_mma on a GPU, qualifies): what prepare() picks.
    chosen = linear_op.resolve(None, q.kernel.get_value(), prepared=False).name
    assert chosen == "xla" or jax.default_backend() == "gpu"
    model.prepare()
    assert model.config.linear.implementation == chosen
    assert model.layers[1].mlp.shared.linear.implementation == chosen
    tol = 0 if chosen == "xla" else 5e-2  # the same computation, or a kernel in bf16
    chex.assert_trees_all_close(_logits(model, windows), before, rtol=tol, atol=tol)
    from samoyeds_jax.cli import describe_experts
    assert f"linears=nm ({q.implementation()})" in describe_experts(model)
    assert chosen != "xla" or "xla (nm weight expanded to dense)" in q.implementation()


def test_triton_linear_matches_xla_in_interpret_mode():
    lin = Linear(128, 64, config=LinearConfig(format="nm"), param_dtype=jnp.bfloat16,
                 dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 128), jnp.bfloat16)
    want = lin(x)
    described = lin.prepare("triton")
    assert lin.config.implementation == "triton" and described.startswith("triton")
    assert ("interpret mode" in described) == (jax.default_backend() != "gpu")
    chex.assert_trees_all_close(lin(x).astype(jnp.float32), want.astype(jnp.float32),
                                rtol=2e-2, atol=2e-2)

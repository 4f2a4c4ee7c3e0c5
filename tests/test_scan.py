"""The middle blocks under ``lax.scan`` (``samoyeds_jax.scan``) compute what the model computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax.generate import Generator
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.param_layout import abstract_model
from samoyeds_jax.scan import scan_blocks

PROMPTS = [[5, 9, 13], [7, 1, 3, 200, 11]]


def _model(layers=5, **kw):
    return MoETransformer(ModelConfig.tiny(**kw).replace(num_layers=layers), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pregate", ["standard", "pregated", "speculative"])
@pytest.mark.parametrize("fmt", ["dense", "nm"])
def test_scanned_logits_and_tokens_are_the_models(rng, pregate, fmt):
    model = _model(pregate=pregate, expert_format=fmt)
    scanned = scan_blocks(model)
    assert scanned.num_middle == 3
    w = scanned.middle.mlp.w1.get_value()
    assert jax.tree.leaves(w)[0].shape[0] == 3  # parameters stacked over the middle blocks
    tokens = jnp.asarray(rng.integers(0, 512, (2, 9)))
    mask = jnp.asarray(np.arange(9)[None] >= np.array([[0], [4]]))  # row 1 left-padded
    want, _ = model(tokens, mask=mask)
    got, cache = scanned(tokens, mask=mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert cache.keys[1].shape[0] == 3 and int(cache.index) == 9
    ref = Generator(model).generate(PROMPTS, max_new_tokens=6).tokens
    np.testing.assert_array_equal(Generator(scanned).generate(PROMPTS, max_new_tokens=6).tokens,
                                  ref)


def test_abstract_model_scans_for_compilation():
    """An abstract model (``jax.ShapeDtypeStruct`` leaves) stacks without memory."""
    scanned = scan_blocks(abstract_model(ModelConfig.tiny().replace(num_layers=6)))
    leaf = jax.tree.leaves(nnx.state(scanned.middle, nnx.Param))[0]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape[0] == 4


def test_refusals():
    with pytest.raises(ValueError, match="at least 3 blocks"):
        scan_blocks(_model(layers=2))
    model = _model()
    model.layers[2].mlp.config = model.layers[2].mlp.config.replace(implementation="all_experts")
    with pytest.raises(ValueError, match="block 2 differs from block 1"):
        scan_blocks(model)
    scanned = scan_blocks(_model())
    from samoyeds_jax.model import KVCache
    with pytest.raises(ValueError, match="ScannedTransformer.init_cache"):
        scanned(jnp.zeros((1, 4), jnp.int32), cache=KVCache.init(scanned.config, 1, 4))

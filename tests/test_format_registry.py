"""The format registry: built-in entries, lookups, and a toy format registered for one test."""

from __future__ import annotations

import dataclasses
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import format_registry as fr
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.tiled_format import TiledBitmap, TiledSparse
from samoyeds_jax import eval_cli, generate_cli, pruning
from samoyeds_jax.config import ExpertFormat, MoEConfig, SparsityConfig
from samoyeds_jax.moe import MoE


def test_typing_aliases_match_the_registry():
    assert fr.format_names() == ("dense", "nm", "samoyeds", "unstructured")
    assert get_args(ExpertFormat) == fr.format_names()
    assert get_args(pruning.Format) == fr.format_names()


def test_clis_offer_the_registered_formats():
    for parser in (eval_cli.build_parser(), generate_cli.build_parser()):
        (action,) = [a for a in parser._actions if "--format" in a.option_strings]
        assert tuple(action.choices) == fr.format_names()


def test_format_of_and_round_trips():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 64, 32)).astype(np.float32)
    assert fr.format_of(jnp.asarray(w)) is fr.FORMATS["dense"]
    for name, cls in (("nm", NMSparse), ("samoyeds", SamoyedsSparse),
                      ("unstructured", TiledSparse)):
        fmt = fr.get_format(name)
        params = {"v": 32} if name == "samoyeds" else {}
        pruned = pruning.PruneConfig(format=name, output="dense", **params).prune(w)
        stored = fmt.from_dense(pruned, **params)
        assert type(stored) is cls and fr.format_of(stored) is fmt
        np.testing.assert_array_equal(np.asarray(fmt.to_dense(stored)), np.asarray(pruned))
        assert fmt.astype(stored, jnp.bfloat16).dtype == jnp.bfloat16
        layout = fmt.abstract(w.shape, w.dtype, like=stored, **params)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), layout) == jax.tree.map(
            lambda a: (a.shape, a.dtype), stored)
    assert fr.format_of(TiledBitmap.from_dense(w)) is fr.FORMATS["unstructured"]
    with pytest.raises(TypeError, match="expected an array or a weight of a registered format"):
        fr.format_of({"w": w})


@pytest.mark.parametrize("name, k, n, params, match", [
    ("nm", 48, 64, {}, "2:4 sparsity needs the reduction dim to be a multiple of 32 .*got 48"),
    ("nm", 64, 64, {"n": 3}, r"\(n, m\) must be one of"),
    ("samoyeds", 64, 64, {}, "multiple of v=128, got 64"),
    ("samoyeds", 128, 63, {}, "output dim to be a multiple of m_sel=2, got 63"),
    ("unstructured", 64, 48, {"tile_n": 32}, "N=48 must be a multiple of tile_n=32"),
    ("dense", 64, 64, {"n": 2}, r"format 'dense' takes parameters \[\]; given unknown \['n'\]"),
])
def test_check_shape_says_what_was_expected(name, k, n, params, match):
    with pytest.raises(ValueError, match=match):
        fr.get_format(name).check_shape(k, n, **params)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"format must be one of \('dense', 'nm', .*got 'csr'"):
        fr.get_format("csr")
    with pytest.raises(ValueError, match=r"expert_format must be one of \('dense', .*'csr'"):
        MoEConfig(d_model=64, d_ff=64, num_experts=2, top_k=1, expert_format="csr")


def test_patterns_and_shared_choice():
    assert fr.get_format("nm").pattern(64, 32, n=2, m=4) == ("nm", 2, 4)
    assert fr.get_format("unstructured").pattern(10, 10, sparsity=0.25) == ("unstructured", 75)
    assert fr.get_format("samoyeds").pattern_shares_choice
    assert not fr.get_format("nm").pattern_shares_choice
    s1, s3 = (jnp.asarray(np.random.default_rng(i).random((32, 8)), jnp.float32) for i in (1, 2))
    m1, m3 = fr.get_format("samoyeds").keep_masks((s1, s3), 1, 2, 32)
    cols = lambda m: np.asarray(m).any(axis=0)  # one 32-row slab: the kept columns
    np.testing.assert_array_equal(cols(m1), cols(m3))
    assert cols(m1).sum() == 4


# ------------------------------------------------------------------ a toy format, registered


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Halved:
    """W stored as W / scale (values); a format with one parameter and no pruning."""

    values: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    def to_dense(self):
        return self.values * self.scale


class HalvedFormat(fr.WeightFormat):
    name = "halved"
    classes = (Halved,)
    params = {"scale": 2.0}

    def check_params(self, **params):
        p = super().check_params(**params)
        if not p["scale"] > 0:
            raise ValueError(f"scale must be > 0, got {p['scale']!r}")
        return p

    def check_shape(self, k, n, /, **params):
        self.check_params(**params)
        if k % 2:
            raise ValueError(f"halved format needs an even reduction dim, got {k}")

    def from_dense(self, w, **params):
        p = self.check_params(**params)
        return Halved(values=jnp.asarray(w) / p["scale"], scale=p["scale"])

    def abstract(self, shape, dtype, *, like=None, **params):
        p = self.check_params(**params)
        return Halved(values=jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)),
                      scale=p["scale"])


@pytest.fixture
def halved(monkeypatch):
    monkeypatch.setitem(fr.FORMATS, "halved", HalvedFormat())
    yield fr.FORMATS["halved"]
    monkeypatch.undo()
    assert "halved" not in fr.format_names()


def test_a_registered_format_works_everywhere(halved):
    assert fr.format_names()[-1] == "halved"
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    stored = halved.from_dense(w, scale=4.0)
    assert fr.format_of(stored) is halved
    np.testing.assert_array_equal(np.asarray(stored.values), w / 4)
    np.testing.assert_array_equal(np.asarray(halved.to_dense(stored)), w)
    assert halved.astype(stored, jnp.float16).values.dtype == jnp.float16
    with pytest.raises(ValueError, match="scale must be > 0, got -1"):
        halved.from_dense(w, scale=-1)

    # Configs accept it and check the shapes through it.
    cfg = MoEConfig(d_model=64, d_ff=128, num_experts=2, top_k=1, expert_format="halved")
    assert cfg.sparsity.format_params("halved") == {"scale": 2.0}
    with pytest.raises(ValueError, match=r"w2 \[e, d_ff, d_model\]: halved format needs an even "
                                         "reduction dim, got 65"):
        MoEConfig(d_model=64, d_ff=65, num_experts=2, top_k=1, expert_format="halved",
                  sparsity=SparsityConfig())
    # No random draw in it: a layer is built dense and converted.
    with pytest.raises(NotImplementedError, match="format 'halved' has no random init.*to_format"):
        MoE(cfg, rngs=nnx.Rngs(0))

    # Pruning: the pattern comes from the registry, and the default keeps every entry.
    config = pruning.PruneConfig(format="halved")
    assert config.pattern(4, 6) == ("halved",)
    assert not config.shared_w1_w3
    out = pruning.convert(jnp.asarray(w), config)
    assert isinstance(out, Halved) and out.scale == 2.0
    params = {"layers": {0: {"w1": jnp.asarray(w.reshape(1, 4, 6))}}}
    converted, report = pruning.prune_experts(params, config, progress=False)
    stored = converted["layers"][0]["w1"]
    assert isinstance(stored, Halved)
    np.testing.assert_array_equal(np.asarray(stored.to_dense()), w.reshape(1, 4, 6))
    assert report.layers["layers/0/w1"].density == 23 / 24  # the one zero of arange
    with pytest.raises(ValueError, match=r"\[K=3, N=6\] cannot be stored as 'halved': halved "
                                         "format needs an even reduction dim, got 3"):
        config.pattern(3, 6)

"""MoE experts from Hopper-layout stacks (TransposedSparse and WgmmaSparseA, the Hopper decode
paths): the gather, grouped products and deterministic combine against the per-expert
reference, at awkward routings.
On CPU the grouped Mosaic GPU product is replaced by its jnp reference; on a GPU (``gpu``
marker) the kernel runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import expert_op
from pallas_kernels import mgpu_matmul as mg
from pallas_kernels import mgpu_moe
from pallas_kernels import sparse_mma_matmul as sm
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.moe_matmul import moe_ffn, moe_ffn_reference
from pallas_kernels.routing_plan import RoutingPlan
from pallas_kernels.sparse_mma_layout import WgmmaSparseA, to_wgmma_sp
from pallas_kernels.transposed_format import TransposedSparse
from samoyeds_jax import prune_weights

D, F = 256, 512


KINDS = ["nm", "samoyeds", "nm_sp", "samoyeds_sp"]  # *_sp: WgmmaSparseA, else TransposedSparse


def _stack(rng, e, k_in, n_out, kind):
    w = jnp.asarray(rng.standard_normal((e, k_in, n_out)) * k_in ** -0.5, jnp.bfloat16)
    if kind.startswith("nm"):
        sparse = NMSparse.from_dense(np.asarray(prune_weights.prune_nm(w)))
    else:
        sparse = SamoyedsSparse.from_dense(np.asarray(prune_weights.prune_samoyeds(w)))
    if kind.endswith("_sp"):
        return to_wgmma_sp(sparse)
    if kind == "nm":
        return TransposedSparse.from_nm(sparse)
    return TransposedSparse.from_samoyeds(sparse)


def _layer(rng, e, kind):
    return (_stack(rng, e, D, F, kind), _stack(rng, e, D, F, kind), _stack(rng, e, F, D, kind))


def _plan(idx, e, bt=8):
    idx = jnp.asarray(idx, jnp.int32)
    wts = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).standard_normal(idx.shape)), -1)
    return RoutingPlan.build(idx, wts, num_experts=e, block_t=bt)


def _op(ws):
    """The mosaic expert op of the stacks' layout."""
    return expert_op.get_op("mosaic_sparse_mma" if isinstance(ws[0], WgmmaSparseA)
                            else "mosaic_expand")


def _check(x, plan, ws):
    got = np.asarray(_op(ws)(x, plan, *ws), np.float32)
    want = np.asarray(moe_ffn_reference(x, plan, *ws), np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t,k,e", [(1, 2, 8), (3, 1, 8), (33, 2, 8), (3, 8, 64)])
def test_matches_reference(rng, kind, t, k, e):
    ws = _layer(rng, e, kind)
    x = jnp.asarray(rng.standard_normal((t, D)), jnp.bfloat16)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
    _check(x, _plan(idx, e), ws)


@pytest.mark.parametrize("kind", ["nm", "samoyeds_sp"])
def test_one_expert_takes_every_token_others_empty(rng, kind):
    e, t = 8, 17
    ws = _layer(rng, e, kind)
    x = jnp.asarray(rng.standard_normal((t, D)), jnp.bfloat16)
    idx = np.stack([[5, (5 + 1 + i % 2)] for i in range(t)])  # expert 5 always, 6/7 alternate
    _check(x, _plan(idx, e), ws)


@pytest.mark.parametrize("kind", ["nm_sp", "samoyeds_sp"])
@pytest.mark.parametrize("t,k,e", [(300, 2, 4), (129, 1, 1)])
def test_prefill_tiles_match_reference(rng, kind, t, k, e):
    """At about 128 rows per expert the op's plan takes 128-row tiles, and the layer runs the
    warp-specialized grouped kernel (its reference on CPU), with an expert left empty."""
    ws = _layer(rng, e, kind)
    bt = _op(ws).block_t(t, k, e)
    assert bt == mgpu_moe.PREFILL_BLOCK_T
    x = jnp.asarray(rng.standard_normal((t, D)), jnp.bfloat16)
    idx = np.stack([rng.choice(max(e - 1, 1), k, replace=False) for _ in range(t)])
    _check(x, _plan(idx, e, bt), ws)


def test_prefill_block_t_rule():
    assert mgpu_moe.block_t(2048, 8, 128) == 128        # Qwen3-30B-A3B prefill: 128 rows each
    assert mgpu_moe.block_t(2047, 8, 128) == 64         # fewer: the decode tiles
    assert mgpu_moe.block_t(1, 2, 8) == 16
    assert mgpu_moe.block_t(4096, 2, 8, TransposedSparse) == 64   # expand layout: never


def test_used_tiles_bound_covers_the_plan(rng):
    for t, k, e, bt in [(1, 8, 128, 8), (64, 2, 8, 16), (5, 6, 64, 8)]:
        idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
        plan = _plan(idx, e, bt)
        assert int(plan.num_blocks) <= mgpu_moe.used_tiles(plan) <= plan.sorted_ids.shape[0] // bt


def test_bad_input(rng):
    ws = _layer(rng, 8, "nm")
    x = jnp.asarray(rng.standard_normal((3, D)), jnp.bfloat16)
    plan = _plan(np.zeros((3, 2), np.int32) + [0, 1], 8)
    with pytest.raises(TypeError, match="Hopper layouts run through the mosaic expert ops"):
        moe_ffn(x, plan, *ws)
    with pytest.raises(ValueError, match="w1 dtype bfloat16 must equal x dtype float16"):
        mgpu_moe.moe_ffn_mgpu(x.astype(jnp.float16), plan, *ws)
    with pytest.raises(ValueError, match=r"x must be \[n\*8, K=256\], got \(12, 256\)"):
        mg.mgpu_grouped_matmul(jnp.zeros((12, D), jnp.bfloat16), jnp.zeros((1,), jnp.int32),
                               jnp.int32(1), ws[0], block_t=8)
    with pytest.raises(ValueError, match="expert stack"):
        mg.mgpu_grouped_matmul(jnp.zeros((8, D), jnp.bfloat16), jnp.zeros((1,), jnp.int32),
                               jnp.int32(1), jax.tree.map(lambda a: a[0], ws[0]), block_t=8)
    sp = _layer(rng, 8, "nm_sp")
    with pytest.raises(ValueError, match="all TransposedSparse or all WgmmaSparseA"):
        mgpu_moe.moe_ffn_mgpu(x, plan, ws[0], ws[1], sp[2])


@pytest.mark.parametrize("stacks", [1, 2])
def test_grouped_lowers_for_cuda(rng, stacks):
    """One stack, and gate and up in one launch (a branch per stack)."""
    ws = _layer(rng, 8, "samoyeds")
    x = jnp.zeros((24, D), jnp.bfloat16)
    fn = lambda x, te, nt, w: mg.mgpu_grouped_matmul(x, te, nt, w, block_t=8)
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(
        x, jnp.zeros((3,), jnp.int32), jnp.int32(2), ws[0] if stacks == 1 else ws[:2])
    assert "nvvm.cp.async.bulk.tensor" in exported.mlir_module()
    assert exported.out_avals[0].shape == (24, stacks * ws[0].shape[-1])


def test_grouped_reference_of_two_stacks_is_each_product_side_by_side(rng):
    ws = _layer(rng, 8, "samoyeds")
    x = jnp.asarray(rng.standard_normal((24, D)), jnp.bfloat16)
    args = (x, jnp.asarray([4, 0, 7], jnp.int32), jnp.int32(2))
    y = np.asarray(mg.mgpu_grouped_matmul_reference(*args, ws[:2], block_t=8))
    f = ws[0].shape[-1]
    for j in range(2):
        np.testing.assert_array_equal(y[:, j * f:(j + 1) * f], mg.mgpu_grouped_matmul_reference(
            *args, ws[j], block_t=8))
    with pytest.raises(ValueError, match=r"w\[1\] must be like w\[0\]"):
        mg.mgpu_grouped_matmul(*args, (ws[0], ws[2]), block_t=8)  # w2 is [e, f, d]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t,k,e", [(1, 2, 8), (33, 2, 8), (4, 8, 64)])
def test_kernel_matches_reference_on_gpu(rng, kind, t, k, e):
    ws = _layer(rng, e, kind)
    x = jnp.asarray(rng.standard_normal((t, D)), jnp.bfloat16)
    idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
    _check(x, _plan(idx, e), ws)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_two_stacks_in_one_launch_match_the_reference_on_gpu(rng, kind):
    ws = _layer(rng, 8, kind)
    grouped = (mg.mgpu_grouped_matmul if isinstance(ws[0], TransposedSparse)
               else sm.wgmma_sp_grouped_matmul)
    reference = (mg.mgpu_grouped_matmul_reference if isinstance(ws[0], TransposedSparse)
                 else sm.wgmma_sp_grouped_matmul_reference)
    x = jnp.asarray(rng.standard_normal((32, D)), jnp.bfloat16)
    args = (x, jnp.asarray([5, 0, 0, 3], jnp.int32), jnp.int32(3), ws[:2])
    y = np.asarray(grouped(*args, block_t=8))
    ref = np.asarray(reference(*args, block_t=8))
    np.testing.assert_allclose(y, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    np.testing.assert_array_equal(y[24:], 0.0)  # the tile past num_tiles


@pytest.mark.parametrize("kind,kernel,layout", [
    ("nm", "mosaic_sparse_mma", WgmmaSparseA), ("samoyeds", "mosaic_expand", TransposedSparse),
    ("samoyeds", "mosaic_sparse_mma", WgmmaSparseA)])
def test_moe_layer_hopper_layout_matches_xla(rng, kind, kernel, layout):
    """Experts prepared by a mosaic expert op run the same layer math as xla."""
    from pallas_kernels import expert_op
    from pallas_kernels.formats import NMSparse as NM, SamoyedsSparse as SS
    from samoyeds_jax import moe
    from samoyeds_jax.routing import Routing

    e, t, k = 8, 5, 2
    prune = prune_weights.prune_nm if kind == "nm" else prune_weights.prune_samoyeds
    fmt = NM if kind == "nm" else SS

    def stack(shape):
        w = jnp.asarray(rng.standard_normal(shape) * shape[1] ** -0.5, jnp.bfloat16)
        return fmt.from_dense(np.asarray(prune(w)))

    experts = moe.ExpertWeights(w1=stack((e, D, F)), w3=stack((e, D, F)), w2=stack((e, F, D)))
    op = expert_op.get_op(kernel)
    hop = moe.ExpertWeights(*op.prepare(experts.w1, experts.w3, experts.w2))
    assert isinstance(hop.w2, layout) and hop.w2.shape == (e, F, D)
    x = jnp.asarray(rng.standard_normal((t, D)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]), jnp.int32)
    routing = Routing(topk_idx=idx, topk_weights=jnp.full((t, k), 0.5, jnp.float32))
    got = moe.expert_ffn(x, routing, hop, implementation=kernel, dtype=jnp.bfloat16)
    want = moe.expert_ffn(x, routing, experts, implementation="xla", dtype=jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=3e-2, atol=3e-2 * float(jnp.abs(want).max()))
    with pytest.raises(ValueError, match=f"{kernel!r} takes 2:4 or Samoyeds experts"):
        op.prepare(experts.w1, experts.w3, experts.w2.to_dense())
    half = jax.tree.map(lambda a: a.astype(jnp.float16) if a.dtype == jnp.bfloat16 else a,
                        experts)
    sparse_mma = expert_op.get_op("mosaic_sparse_mma")
    with pytest.raises(ValueError, match=r"takes 2:4 or Samoyeds experts in \['bfloat16'\]"):
        sparse_mma.prepare(half.w1, half.w3, half.w2)
    assert isinstance(expert_op.get_op("mosaic_expand").prepare(half.w1, half.w3, half.w2)[0],
                      TransposedSparse)  # f16: expand


SMALL_MIXTRAL = {"model_type": "mixtral", "hidden_size": 256, "intermediate_size": 512,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
                 "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 97,
                 "rms_norm_eps": 1e-5, "rope_theta": 1e4, "torch_dtype": "bfloat16"}


def test_model_with_hopper_layout_matches_xla():
    """A whole (small) Mixtral-style model: experts moved to the Hopper layout in place give the
    logits of the xla implementation on the same weights."""
    from flax import nnx

    from samoyeds_jax.model import ModelConfig, MoETransformer

    ref = MoETransformer(ModelConfig.from_hf(SMALL_MIXTRAL, expert_format="nm",
                                             implementation="xla"), rngs=nnx.Rngs(0))
    hop = nnx.clone(ref)
    for block in hop.layers:
        assert block.mlp.prepare("mosaic_sparse_mma").startswith("mosaic_sparse_mma")
    assert isinstance(hop.layers[0].mlp.w2.get_value(), WgmmaSparseA)
    assert not isinstance(ref.layers[0].mlp.w2.get_value(), WgmmaSparseA)
    tokens = jnp.asarray(np.arange(2 * 7).reshape(2, 7) % 97, jnp.int32)
    want, _ = ref(tokens)
    got, _ = hop(tokens)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=5e-2, atol=5e-2 * float(jnp.abs(want).max()))


def test_preparing_a_merged_copy_leaves_the_original_intact():
    """``nnx.merge(*nnx.split(model))`` shares the model's variables: ``prepare`` on the copy
    (Hopper layouts, q/k/v joined) gives it new variables and leaves the original's values,
    structure and logits as they were."""
    from flax import nnx

    from samoyeds_jax.model import ModelConfig, MoETransformer

    ref = MoETransformer(ModelConfig.from_hf(SMALL_MIXTRAL, expert_format="nm"),
                         rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.arange(2 * 5).reshape(2, 5) % 97, jnp.int32)
    want, _ = ref(tokens)
    copy = nnx.merge(*nnx.split(ref))
    copy.prepare("mosaic_sparse_mma")
    assert isinstance(copy.layers[0].mlp.w1.get_value(), WgmmaSparseA)
    assert copy.layers[0].self_attn.fused
    assert not isinstance(ref.layers[0].mlp.w1.get_value(), WgmmaSparseA)
    assert not ref.layers[0].self_attn.fused
    got, _ = ref(tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

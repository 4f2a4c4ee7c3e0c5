"""Malformed weights, kernel inputs, routing plans and routings get a clear error.

One parametrized case per bad input (exception type and a message fragment naming the
argument and value) over the formats' ``from_dense`` and constructors, the matmul entry
points, ``RoutingPlan``, ``Routing``, pruning and SparseGPT; then the same pytrees still
rebuild from placeholder leaves (tree utilities, ``jit``, ``eval_shape``, ``grad``, ``vmap``).
The layers, model, generation and configs are in ``test_bad_input.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import expert_op
from pallas_kernels import moe_matmul as mm
from pallas_kernels import nm_matmul as nmm
from pallas_kernels import unstructured as um
from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.routing_plan import RoutingPlan
from pallas_kernels.sparse_mma_layout import WgmmaSparseA, to_wgmma_sp
from pallas_kernels.tiled_format import TiledBitmap, TiledSparse
from pallas_kernels.transposed_format import TransposedSparse
from samoyeds_jax import prune_weights, pruning, sparsegpt
from samoyeds_jax.routing import Routing

D, F, E = 16, 32, 4
f32, bf16 = jnp.float32, jnp.bfloat16
VE, TE = ValueError, TypeError


def zeros(shape, dtype=np.float32):
    return np.zeros(shape, dtype)


def ones(shape, dtype=np.float32):
    return np.ones(shape, dtype)


def eye(n, dtype=np.float32):
    return np.eye(n, dtype=dtype)



@functools.cache
def nm(dtype=np.float32) -> NMSparse:
    return NMSparse.from_dense(zeros((32, 16), dtype))


@functools.cache
def nm_stack() -> NMSparse:
    return NMSparse.from_dense(zeros((E, 32, 16), np.float32))


@functools.cache
def sam() -> SamoyedsSparse:
    return SamoyedsSparse.from_dense(zeros((128, 16), np.float32))


@functools.cache
def tiled() -> TiledSparse:
    return TiledSparse.from_dense(eye(32, dtype=np.float32), tile_k=16)


@functools.cache
def bitmap() -> TiledBitmap:
    return TiledBitmap.from_dense(eye(32, dtype=np.float32))


@functools.cache
def transposed() -> TransposedSparse:
    return TransposedSparse.from_nm(NMSparse.from_dense(zeros((128, 64), np.float32)))


@functools.cache
def wgmma() -> WgmmaSparseA:
    return to_wgmma_sp(NMSparse.from_dense(zeros((32, 64), np.float32)))


@functools.cache
def plan() -> RoutingPlan:
    idx = jnp.array([[0, 1], [2, 3], [1, 0]], jnp.int32)
    return RoutingPlan.build(idx, jnp.full((3, 2), 0.5, f32), num_experts=E, block_t=8)


def routing(idx=((0, 1), (2, 3), (1, 0)), w=None) -> Routing:
    idx = jnp.asarray(idx, jnp.int32)
    return Routing(idx, jnp.full(idx.shape, 0.5, f32) if w is None else jnp.asarray(w, f32))


def x(t: int = 3, d: int = D, dtype=f32) -> jax.Array:
    return jnp.ones((t, d), dtype)


def case(name, fn, exc, match):
    """``fn()`` must raise ``exc`` with ``match`` (a literal fragment) in its message."""
    return pytest.param(fn, exc, match, id=name)


nan32 = np.full((32, 16), np.nan, np.float32)

FORMAT_CASES = [
    case("nm_from_dense_k", lambda: NMSparse.from_dense(zeros((30, 8))), VE,
         "K=30 must be a multiple of 32"),
    case("nm_from_dense_pattern", lambda: NMSparse.from_dense(zeros((32, 8)), n=3, m=4), VE,
         "(n, m) must be one of"),
    case("nm_from_dense_1d", lambda: NMSparse.from_dense(zeros(32, np.float32)), VE,
         "w must be [..., K, N] with at least 2 dims and K, N > 0, got shape (32,)"),
    case("nm_from_dense_int", lambda: NMSparse.from_dense(zeros((32, 8), np.int32)), VE,
         "w dtype must be one of"),
    case("nm_from_dense_nan", lambda: NMSparse.from_dense(nan32), VE, "w must be finite; got nan"),
    case("nm_from_dense_dense", lambda: NMSparse.from_dense(ones((32, 8), np.float32)), VE,
         "w is not 2:4 along K: rows 0..3 (group 0), column 0 has 4 nonzeros"),
    case("nm_from_dense_traced",
         lambda: jax.jit(lambda w: NMSparse.from_dense(w).values)(jnp.zeros((32, 8))), VE,
         "w is a traced value"),
    case("nm_values_rows", lambda: NMSparse(values=jnp.zeros((8, 16)), meta=nm().meta, n=2, m=4,
                                            k=32), VE,
         "NMSparse: values must have shape (16, 16), got (8, 16)"),
    case("nm_meta_dtype", lambda: dataclasses.replace(nm(), meta=nm().meta.astype(f32)), VE,
         "NMSparse: meta must be int32, got float32"),
    case("nm_meta_cols", lambda: dataclasses.replace(nm(), meta=nm().meta[:, :8]), VE,
         "NMSparse: meta must have shape (1, 16), got (1, 8)"),
    case("nm_k_multiple", lambda: dataclasses.replace(nm(), k=48), VE,
         "NMSparse: k=48 must be a multiple of 32"),
    case("nm_k_zero", lambda: dataclasses.replace(nm(), k=0), VE,
         "NMSparse: k must be a positive int, got 0"),
    case("nm_values_int", lambda: dataclasses.replace(nm(), values=nm().values.astype(jnp.int32)),
         VE, "NMSparse: values must have a floating dtype, got int32"),
    case("nm_stack_lead", lambda: dataclasses.replace(nm_stack(), meta=nm_stack().meta[:3]), VE,
         "NMSparse: meta must have shape (4, 1, 16), got (3, 1, 16)"),
    case("nm_pattern_field", lambda: dataclasses.replace(nm(), n=3), VE, "(n, m) must be one of"),
    case("sam_from_dense_k", lambda: SamoyedsSparse.from_dense(zeros((64, 16))), VE,
         "K=64 must be a multiple of v=128"),
    case("sam_from_dense_n", lambda: SamoyedsSparse.from_dense(zeros((128, 15))), VE,
         "N=15 must be a multiple of m_sel=2"),
    case("sam_from_dense_columns", lambda: SamoyedsSparse.from_dense(ones((128, 16))), VE,
         "w is not 1:2:128 column-selected: slab 0 (rows 0..127), column group 0"),
    case("sam_from_dense_v", lambda: SamoyedsSparse.from_dense(zeros((96, 16)), v=48), VE,
         "v must be a multiple of 32 (whole 2:4 meta words per slab), got v=48"),
    case("sam_from_dense_n_sel", lambda: SamoyedsSparse.from_dense(zeros((128, 16)), n_sel=3),
         VE, "need 1 <= n_sel <= m_sel <= 127"),
    case("sam_from_dense_v_float", lambda: SamoyedsSparse.from_dense(zeros((128, 16)), v=1.5),
         VE, "v must be a positive int, got 1.5"),
    case("sam_sel_shape", lambda: dataclasses.replace(sam(), sel=sam().sel[:, :4]), VE,
         "SamoyedsSparse: sel must have shape (1, 8), got (1, 4)"),
    case("sam_sel_dtype", lambda: dataclasses.replace(sam(), sel=sam().sel.astype(f32)), VE,
         "SamoyedsSparse: sel must be int8 or int16, got float32"),
    case("sam_n_out", lambda: dataclasses.replace(sam(), n_out=15), VE,
         "SamoyedsSparse: n_out=15 must be a multiple of 2"),
    case("sam_values_rows", lambda: dataclasses.replace(sam(), values=sam().values[:32]), VE,
         "SamoyedsSparse: values must have shape (64, 8), got (32, 8)"),
    case("sam_k", lambda: dataclasses.replace(sam(), k=64), VE,
         "SamoyedsSparse: k=64 must be a multiple of 128"),
    case("tiled_from_dense_tile_k", lambda: TiledSparse.from_dense(eye(32), tile_k=5), VE,
         "K=32 must be a multiple of tile_k=5"),
    case("tiled_from_dense_tile_n", lambda: TiledSparse.from_dense(eye(24), tile_n=3), VE,
         "tile_n=3 must be a power of two"),
    case("tiled_from_dense_nan", lambda: TiledSparse.from_dense(nan32), VE,
         "w has a non-finite value nan at index (0, 0)"),
    case("tiled_from_dense_1d", lambda: TiledSparse.from_dense(ones(8, np.float32)), VE,
         "w must be [..., K, N] (rank >= 2), got shape (8,)"),
    case("tiled_from_dense_int", lambda: TiledSparse.from_dense(eye(8, dtype=np.int32)), VE,
         "dtype must be one of float32, bfloat16, float16, got int32"),
    case("tiled_rows_dtype",
         lambda: dataclasses.replace(tiled(), rows=tiled().rows.astype(jnp.int32)), VE,
         "TiledSparse: rows must be uint8, got int32"),
    case("tiled_offsets_shape",
         lambda: dataclasses.replace(tiled(), offsets=tiled().offsets[:, :2]), VE,
         "TiledSparse: offsets must have shape (1, 3), got (1, 2)"),
    case("tiled_k", lambda: dataclasses.replace(tiled(), k=40), VE,
         "TiledSparse: k=40 must be a multiple of 16"),
    case("tiled_tile_k_max", lambda: dataclasses.replace(tiled(), tile_k=70000, k=70000), VE,
         "TiledSparse: tile_k=70000 must be <= 65536"),
    case("tiled_values_cols", lambda: dataclasses.replace(tiled(), values=tiled().values[:, :16]),
         VE, "TiledSparse: values must have shape"),
    case("bitmap_from_dense_n", lambda: TiledBitmap.from_dense(eye(20, dtype=np.float32)), VE,
         "N a multiple of 32, got shape (20, 20)"),
    case("bitmap_from_dense_tile_n", lambda: TiledBitmap.from_dense(eye(96), tile_n=48), VE,
         "tile_n=48 must be a power of two >= 32 dividing N=96"),
    case("bitmap_words_dtype",
         lambda: dataclasses.replace(bitmap(), words=bitmap().words.astype(jnp.uint32)), VE,
         "TiledBitmap: words must be int32, got uint32"),
    case("bitmap_n", lambda: dataclasses.replace(bitmap(), n=40), VE,
         "TiledBitmap: n=40 must be a multiple of 32"),
    case("bitmap_woff_shape", lambda: dataclasses.replace(bitmap(), woff=bitmap().woff[:16]), VE,
         "TiledBitmap: woff must have shape (32, 1), got (16, 1)"),
    case("transposed_from_nm_pattern",
         lambda: TransposedSparse.from_nm(NMSparse.from_dense(zeros((128, 8)), n=1, m=4)), VE,
         "TransposedSparse needs 2:4 weights, got 1:4"),
    case("transposed_from_nm_tk", lambda: TransposedSparse.from_nm(nm(), tk=64), VE,
         "tk must be one of (128, 256, 512), got 64"),
    case("transposed_meta_dtype",
         lambda: dataclasses.replace(transposed(), meta=transposed().meta.astype(jnp.int32)), VE,
         "TransposedSparse: meta must be int16, got int32"),
    case("transposed_values_shape",
         lambda: dataclasses.replace(transposed(), values=transposed().values[:, :32]), VE,
         "TransposedSparse: values must have shape (1, 64, 64), got (1, 32, 64)"),
    case("transposed_tk", lambda: dataclasses.replace(transposed(), tk=100), VE,
         "TransposedSparse: tk must be one of (128, 256, 512)"),
    case("transposed_paired_odd", lambda: dataclasses.replace(transposed(), paired=True, n_out=63),
         VE, "TransposedSparse: n_out=63 must be a multiple of 2"),
    case("wgmma_values_shape", lambda: WgmmaSparseA(values=wgmma().values, meta=wgmma().meta, k=64),
         VE, "WgmmaSparseA: values must have shape (64, 32), got (64, 16)"),
    case("wgmma_k", lambda: dataclasses.replace(wgmma(), k=48), VE,
         "WgmmaSparseA: k=48 must be a multiple of 32"),
    case("wgmma_rows", lambda: dataclasses.replace(wgmma(), values=wgmma().values[:32]), VE,
         "WgmmaSparseA: rows of A (32) must be a multiple of 64"),
]

xb = lambda t=3, k=32: jnp.ones((t, k), bf16)  # noqa: E731

MATMUL_CASES = [
    case("nm_matmul_dense", lambda: nmm.nm_matmul(xb(), jnp.zeros((32, 16), bf16)), TE,
         "nm_matmul: w must be an NMSparse"),
    case("nm_matmul_samoyeds", lambda: nmm.nm_matmul(xb(k=128), sam()), TE,
         "nm_matmul: w must be an NMSparse (formats.NMSparse.from_dense converts a pruned dense "
         "weight), got SamoyedsSparse"),
    case("nm_matmul_reference_dense",
         lambda: nmm.nm_matmul_reference(xb(), zeros((32, 16), np.float32)), TE,
         "got ndarray of shape (32, 16) and dtype float32"),
    case("samoyeds_matmul_dense", lambda: nmm.samoyeds_matmul(xb(k=128), jnp.zeros((128, 16))), TE,
         "samoyeds_matmul: w must be a SamoyedsSparse"),
    case("samoyeds_matmul_nm", lambda: nmm.samoyeds_matmul(xb(), nm(np.float16)), TE,
         "samoyeds_matmul: w must be a SamoyedsSparse"),
    case("samoyeds_matmul_reference_dense",
         lambda: nmm.samoyeds_matmul_reference(xb(k=128), jnp.zeros((128, 16))), TE,
         "samoyeds_matmul: w must be a SamoyedsSparse"),
    case("nm_matmul_k", lambda: nmm.nm_matmul(xb(k=64), nm(jnp.bfloat16)), VE,
         "nm_matmul: x has K=64 but w has K=32"),
    case("nm_matmul_x_f32", lambda: nmm.nm_matmul(jnp.ones((3, 32), f32), nm()), VE,
         "nm_matmul: x.dtype must be bfloat16 or float16, got float32"),
    case("nm_matmul_x_3d", lambda: nmm.nm_matmul(jnp.ones((1, 3, 32), bf16), nm(jnp.bfloat16)),
         VE, "nm_matmul: x must be [t, K], got shape (1, 3, 32)"),
    case("nm_matmul_dtype_mismatch", lambda: nmm.nm_matmul(xb(), nm(np.float16)), VE,
         "nm_matmul: w dtype float16 must equal x dtype bfloat16"),
    case("nm_matmul_stack", lambda: nmm.nm_matmul(xb(), nm_stack()), VE,
         "nm_matmul: w must be one matrix"),
    case("unstructured_dense", lambda: um.unstructured_matmul(x(3, 32), jnp.eye(32)), TE,
         "unstructured_matmul: w must be a TiledSparse or TiledBitmap"),
    case("unstructured_nm", lambda: um.unstructured_matmul(x(3, 32), nm()), TE,
         "got NMSparse"),
    case("unstructured_k", lambda: um.unstructured_matmul(x(3, 31), tiled()), VE,
         "x must be [..., K=32], got shape (3, 31)"),
    case("unstructured_x_int", lambda: um.unstructured_matmul(jnp.ones((3, 32), jnp.int32),
                                                              tiled()), VE,
         "x dtype must be float32, bfloat16 or float16, got int32"),
    case("unstructured_stack",
         lambda: um.unstructured_matmul(x(3, 32),
                                        TiledSparse.from_dense(ones((2, 32, 32), np.float32))),
         VE, "w must be one matrix [K, N], got a stack of shape (2, 32, 32)"),
    case("moe_ffn_plan_kind", lambda: mm.moe_ffn(x(), "plan", *(jnp.zeros((E, D, F)),) * 2,
                                                 jnp.zeros((E, F, D))), TE,
         "plan must be a RoutingPlan (RoutingPlan.build), got str"),
    case("moe_ffn_w1_2d", lambda: mm.moe_ffn(x(), plan(), jnp.zeros((D, F)), jnp.zeros((D, F)),
                                             jnp.zeros((E, F, D))), VE,
         "w1 must be [e=4, d=16, f], got (16, 32)"),
    case("moe_ffn_w1_list", lambda: mm.moe_ffn(x(), plan(), [[0.0]], jnp.zeros((E, D, F)),
                                               jnp.zeros((E, F, D))), TE,
         "w1 must be an expert stack [e, K, N] (an array or a sparse weight), got list"),
    case("moe_ffn_w2_tiled", lambda: mm.moe_ffn(x(3, 32), plan(), *(jnp.zeros((E, 32, 32)),) * 2,
                                                TiledSparse.from_dense(zeros((E, 32, 32)))),
         TE, "w2 must be an expert stack [e, K, N]"),
    case("moe_ffn_tokens", lambda: mm.moe_ffn(x(2), plan(), *(jnp.zeros((E, D, F)),) * 2,
                                              jnp.zeros((E, F, D))), VE,
         "x has 2 tokens but the plan was built for 3"),
    case("moe_ffn_w2_shape", lambda: mm.moe_ffn(x(), plan(), *(jnp.zeros((E, D, F)),) * 2,
                                                jnp.zeros((E, F, F))), VE,
         "w2 must be [e=4, f=32, d=16], got (4, 32, 32)"),
    case("moe_ffn_x_int", lambda: mm.moe_ffn(jnp.ones((3, D), jnp.int32), plan(),
                                             *(jnp.zeros((E, D, F)),) * 2, jnp.zeros((E, F, D))),
         VE, "x must be floating, got int32"),
    case("moe_ffn_reference_x_list",
         lambda: mm.moe_ffn_reference([[1.0] * D] * 3, plan(), *(jnp.zeros((E, D, F)),) * 2,
                                      jnp.zeros((E, F, D))), TE, "x must be an array [t, d]"),
    case("xla_expert_op_mixed",
         lambda: expert_op.get_op("xla")(x(3, 32), plan(), nm_stack(), jnp.zeros((E, 16, 16)),
                                         jnp.zeros((E, 16, 32))), VE,
         "w3 must be [e=4, d=32, f=16] like w1, got (4, 16, 16)"),
]

bad_idx = ((0, 1), (2, 4), (1, 0))


def replace_plan(**kw):
    return dataclasses.replace(plan(), **kw)


PLAN_CASES = [
    case("plan_id_past_experts", lambda: RoutingPlan.build(
        jnp.asarray(bad_idx), jnp.ones((3, 2)), num_experts=E, block_t=8), VE,
         "topk_idx must lie in [0, 4); got 4 at token 1, slot 1 (1 out-of-range entries)"),
    case("plan_id_negative", lambda: RoutingPlan.build(
        jnp.asarray([[0, -1]]), jnp.ones((1, 2)), num_experts=E, block_t=8), VE,
         "topk_idx must lie in [0, 4); got -1 at token 0, slot 1"),
    case("plan_weights_nan", lambda: RoutingPlan.build(
        jnp.asarray([[0, 1]]), jnp.asarray([[1.0, np.nan]]), num_experts=E, block_t=8), VE,
         "topk_weights must be finite; got nan at token 0, slot 1"),
    case("plan_block_t", lambda: RoutingPlan.build(
        jnp.asarray([[0, 1]]), jnp.ones((1, 2)), num_experts=E, block_t=12), VE,
         "block_t must be a power of two, got block_t=12"),
    case("plan_num_experts", lambda: RoutingPlan.build(
        jnp.asarray([[0, 1]]), jnp.ones((1, 2)), num_experts=0, block_t=8), VE,
         "num_experts must be a positive int, got 0"),
    case("plan_idx_float", lambda: RoutingPlan.build(
        jnp.asarray([[0.0, 1.0]]), jnp.ones((1, 2)), num_experts=E, block_t=8), VE,
         "topk_idx must have an integer dtype (int32), got float32"),
    case("plan_cut_below_capacity", lambda: replace_plan(sorted_ids=plan().sorted_ids[:-8]), VE,
         "RoutingPlan (t=3, k=2, e=4, block_t=8: capacity 40 rows): sorted_ids must have shape "
         "(40,), got (32,)"),
    case("plan_weights_dtype", lambda: replace_plan(weights=plan().weights.astype(bf16)), VE,
         "RoutingPlan: weights must be float32, got bfloat16"),
    case("plan_group_sizes", lambda: replace_plan(group_sizes=jnp.zeros((E + 1,), jnp.int32)), VE,
         "group_sizes must have shape (4,), got (5,)"),
    case("plan_block_expert", lambda: replace_plan(block_expert=plan().block_expert[:2]), VE,
         "block_expert must have shape (5,), got (2,)"),
    case("plan_num_blocks", lambda: replace_plan(num_blocks=plan().num_blocks.reshape(1)), VE,
         "num_blocks must have shape (), got (1,)"),
    case("plan_static_block_t", lambda: replace_plan(block_t=12), VE,
         "RoutingPlan: block_t must be a power of two, got 12"),
    case("plan_static_top_k", lambda: replace_plan(top_k=0), VE,
         "RoutingPlan: top_k must be a positive int, got 0"),
    case("plan_static_tokens", lambda: replace_plan(num_tokens=-1), VE,
         "RoutingPlan: num_tokens must be an int >= 0, got -1"),
    case("plan_sorted_ids_dtype",
         lambda: replace_plan(sorted_ids=plan().sorted_ids.astype(jnp.int16)), VE,
         "RoutingPlan: sorted_ids must be int32"),
]

ROUTING_CASES = [
    case("routing_idx_float", lambda: Routing(jnp.zeros((3, 2)), jnp.ones((3, 2))), VE,
         "Routing: topk_idx must hold integer expert ids, got dtype float32"),
    case("routing_weights_int", lambda: Routing(jnp.zeros((3, 2), jnp.int32),
                                                jnp.ones((3, 2), jnp.int32)), VE,
         "Routing: topk_weights must be floating, got dtype int32"),
    case("routing_weights_shape", lambda: Routing(jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 1))),
         VE, "Routing: topk_weights (3, 1) must have the shape of topk_idx [t, k] (3, 2)"),
    case("routing_logits_tokens", lambda: Routing(jnp.zeros((3, 2), jnp.int32), jnp.ones((3, 2)),
                                                  jnp.zeros((2, E))), VE,
         "Routing: logits (2, 4) must be [t, e] for the (3, 2) topk_idx"),
    case("routing_check_range", lambda: routing(bad_idx).check(E), VE,
         "routing.topk_idx (expert ids) must lie in [0, 4); got 4 at token 1, slot 1"),
    case("routing_check_nan", lambda: routing(w=[[1, np.nan]] * 3).check(E), VE,
         "routing.topk_weights must be finite; got nan at token 0, slot 1 (3 non-finite entries)"),
    case("routing_check_inf", lambda: routing(w=[[1, 1], [1, 1], [np.inf, 1]]).check(E), VE,
         "routing.topk_weights must be finite; got inf at token 2, slot 0"),
    case("routing_tokens", lambda: routing().check_num_tokens(4), VE,
         "routing covers 3 tokens but the input has 4 tokens"),
]

w8 = np.ones((8, 8), np.float32)
eye8 = np.eye(8, dtype=np.float32)

PRUNE_CASES = [
    case("prune_config_format", lambda: pruning.PruneConfig(format="csr"), VE,
         "format='csr' must be one of 'dense', 'nm', 'samoyeds'"),
    case("prune_config_method", lambda: pruning.PruneConfig(format="nm", method="random"), VE,
         "method='random' must be 'magnitude', 'wanda' or"),
    case("prune_config_shared", lambda: pruning.PruneConfig(format="nm", shared_w1_w3=True), VE,
         "shared_w1_w3=True applies to format='samoyeds' only"),
    case("prune_nm_pattern", lambda: prune_weights.prune_nm(w8, n=3, m=4), VE,
         "(n, m)=(3, 4) is not a supported N:M pattern"),
    case("prune_nm_k", lambda: prune_weights.prune_nm(np.ones((6, 8), np.float32)), VE,
         "K=6 (w.shape[-2]) must be a multiple of m=4"),
    case("prune_nm_nan",
         lambda: prune_weights.prune_nm(np.where(eye8 > 0, np.float32(np.nan), eye8)), VE,
         "w must be finite (no NaN/Inf); found nan"),
    case("prune_nm_1d", lambda: prune_weights.prune_nm(np.ones(8, np.float32)), VE,
         "w must be a matrix [..., K, N] (ndim >= 2)"),
    case("prune_samoyeds_v", lambda: prune_weights.prune_samoyeds(w8, v=6), VE,
         "v=6 must be a positive multiple of 4"),
    case("prune_unstructured_sparsity",
         lambda: prune_weights.prune_unstructured(w8, sparsity=1.0), VE,
         "sparsity=1.0 must be a number in [0, 1)"),
    case("prune_experts_wanda_calibration", lambda: pruning.prune_experts(
        {"experts": {"w1": np.ones((E, 32, 8), np.float32)}},
        pruning.PruneConfig(format="nm", method="wanda"), progress=False), VE,
         "method='wanda' needs calibration activations"),
    case("prune_score_shape",
         lambda: prune_weights.prune_nm(w8, score=np.ones((4, 8), np.float32)), VE,
         "score must have the weight's shape; expected (8, 8)"),
    case("sparsegpt_block", lambda: sparsegpt.SparseGPTConfig(block_size=0), VE,
         "block_size=0 must be positive"),
    case("sparsegpt_damp", lambda: sparsegpt.SparseGPTConfig(damp=-0.1), VE,
         "damp=-0.1 must be a finite number > 0"),
    case("sparsegpt_hessian_1d", lambda: sparsegpt.hessian(np.ones(8, np.float32)), VE,
         "calibration activations must be [t, K] or [e, t, K]"),
    case("sparsegpt_pattern", lambda: sparsegpt.sparsegpt_prune(w8, eye8, ("csr",)), VE,
         "unknown pattern ('csr',)"),
    case("sparsegpt_h_shape", lambda: sparsegpt.sparsegpt_prune(w8, eye8[:4, :4], ("nm", 2, 4)), VE,
         "h must be the [K, K] Hessian of the weight's K=8 input channels"),
]

CASES = FORMAT_CASES + MATMUL_CASES + PLAN_CASES + ROUTING_CASES + PRUNE_CASES


@pytest.mark.parametrize("fn,exc,match", CASES)
def test_bad_input_raises(fn, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        fn()


# ----------------------------------------------------------------------------- pytrees still work


PYTREES = {"nm": nm, "nm_stack": nm_stack, "samoyeds": sam, "tiled": tiled, "bitmap": bitmap,
           "transposed": transposed, "wgmma": wgmma, "plan": plan, "routing": routing}


@pytest.mark.parametrize("name", sorted(PYTREES))
def test_pytrees_rebuild_from_placeholders(name):
    obj = PYTREES[name]()
    treedef = jax.tree.structure(obj)
    n = treedef.num_leaves
    jax.tree_util.tree_unflatten(treedef, [object()] * n)
    jax.tree_util.tree_unflatten(treedef, [None] * n)
    jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), obj)
    jax.tree.map(lambda a: (a.shape, str(a.dtype)), obj)
    jax.eval_shape(lambda o: o, obj)
    again = jax.jit(lambda o: o)(obj)
    assert jax.tree.structure(again) == treedef
    jax.grad(lambda o: sum(jnp.sum(a.astype(f32)) for a in jax.tree.leaves(o)
                           if jnp.issubdtype(a.dtype, jnp.floating)), allow_int=True)(obj)


def test_stacked_formats_slice_and_vmap():
    stack = nm_stack()
    one = jax.tree.map(lambda a: a[1], stack)
    assert one.shape == (32, 16)
    dense = jax.vmap(lambda w: w.to_dense())(stack)
    assert dense.shape == (E, 32, 16)

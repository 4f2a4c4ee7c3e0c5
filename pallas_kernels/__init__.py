"""Pallas GPU kernels for sparse MoE inference: sparse formats in, arrays out.

Pure array functions; no Flax, and never an import of ``samoyeds_jax``.
"""

from pallas_kernels.backend import interpret_mode
from pallas_kernels.checks import checked, checking
from pallas_kernels.formats import (NM_PATTERNS, NMSparse, SamoyedsSparse, nm_k_multiple,
                                    pack_meta, unpack_meta)
# Likewise ``mgpu_matmul`` the function: ``from pallas_kernels.mgpu_matmul import mgpu_matmul``.
from pallas_kernels.mgpu_matmul import (MgpuMatmulConfig, mgpu_grouped_matmul,
                                        mgpu_grouped_matmul_reference, mgpu_matmul_reference)
from pallas_kernels.expert_op import ExpertOp, plan_for, resolve
from pallas_kernels.linear_op import LinearOp, linear
from pallas_kernels.mgpu_moe import moe_ffn_mgpu
from pallas_kernels.moe_matmul import moe_ffn, moe_ffn_reference
# ``nm_matmul`` the function stays in its module: a package attribute of the same name would
# shadow the submodule ``pallas_kernels.nm_matmul``.
from pallas_kernels.nm_matmul import (SparseMatmulConfig, samoyeds_matmul,
                                      samoyeds_matmul_reference)
from pallas_kernels.routing_plan import RoutingPlan
from pallas_kernels.tiled_format import TiledBitmap, TiledSparse
from pallas_kernels.transposed_format import TransposedSparse
from pallas_kernels.unstructured import (UnstructuredConfig, unstructured_matmul,
                                         unstructured_matmul_reference)

__all__ = [
    "interpret_mode",
    "checked", "checking",
    "NM_PATTERNS", "NMSparse", "SamoyedsSparse", "nm_k_multiple", "pack_meta", "unpack_meta",
    "TiledBitmap", "TiledSparse", "TransposedSparse",
    "RoutingPlan",
    "SparseMatmulConfig", "samoyeds_matmul", "samoyeds_matmul_reference",
    "UnstructuredConfig", "unstructured_matmul", "unstructured_matmul_reference",
    "ExpertOp", "plan_for", "resolve",
    "LinearOp", "linear",
    "moe_ffn", "moe_ffn_reference",
    "MgpuMatmulConfig", "mgpu_matmul_reference", "mgpu_grouped_matmul",
    "mgpu_grouped_matmul_reference", "moe_ffn_mgpu",
]

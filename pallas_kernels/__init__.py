"""Pallas GPU kernels for sparse MoE inference: sparse formats in, arrays out.

Pure array functions; no Flax, and never an import of ``samoyeds_jax``.
"""

from pallas_kernels.backend import Backend, interpret_mode, resolve_backend
from pallas_kernels.formats import (NM_PATTERNS, NMSparse, SamoyedsSparse, nm_k_multiple,
                                    pack_meta, unpack_meta)
from pallas_kernels.routing_plan import RoutingPlan

__all__ = [
    "Backend", "interpret_mode", "resolve_backend",
    "NM_PATTERNS", "NMSparse", "SamoyedsSparse", "nm_k_multiple", "pack_meta", "unpack_meta",
    "RoutingPlan",
]

"""Pallas GPU kernels for sparse MoE inference: sparse formats in, arrays out.

Pure array functions; no Flax, and never an import of ``samoyeds_jax``.
"""

from pallas_kernels.backend import Backend, interpret_mode, resolve_backend

__all__ = ["Backend", "interpret_mode", "resolve_backend"]

"""The platform this process computes on, and whether Pallas kernels run in interpret mode.

Which implementation computes an op is chosen by the op registries (``expert_op``,
``linear_op``); off a GPU the Pallas kernels run in interpret mode, so their bodies are tested
on a CPU.
"""

from __future__ import annotations

import functools

import jax


def platform() -> str:
    """The default JAX backend's platform: ``"cpu"``, ``"gpu"`` (CUDA) or ``"tpu"``."""
    return jax.default_backend()


def interpret_mode() -> bool:
    """Pallas kernels run in interpret mode when no GPU is present."""
    return platform() != "gpu"


@functools.cache
def device_kind() -> str:
    """The first device's kind, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu"``."""
    return jax.devices()[0].device_kind


@functools.cache
def is_hopper() -> bool:
    """True on compute capability 9.x (H100, H200)."""
    if platform() != "gpu":
        return False
    cc = getattr(jax.devices()[0], "compute_capability", "")
    return str(cc).startswith("9")

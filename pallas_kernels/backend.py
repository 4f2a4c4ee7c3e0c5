"""Which Pallas backend runs a kernel, and whether it runs in interpret mode.

Kernels take ``backend: Backend | None``. ``None`` picks by device:

* GPU (Ampere, Hopper): ``"triton"`` unless a kernel states that its Mosaic GPU
    variant is faster for the shape (Hopper only).
* CPU: ``"triton"`` in Pallas interpret mode, so the kernel body itself is tested.

``"xla"`` always means the pure-jnp reference path (no Pallas).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax

Backend = Literal["xla", "triton", "mosaic_gpu"]
BACKENDS: tuple[str, ...] = ("xla", "triton", "mosaic_gpu")


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


def resolve_backend(backend: str | None) -> Backend:
    """Validate ``backend`` or pick the default for this device."""
    if backend is None:
        return "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "mosaic_gpu" and interpret_mode():
        raise ValueError(
            "backend='mosaic_gpu' needs a Hopper GPU; this process has platform "
            f"{platform()!r}. Use backend='triton' (interpret mode on CPU) or 'xla'.")
    return backend  # type: ignore[return-value]

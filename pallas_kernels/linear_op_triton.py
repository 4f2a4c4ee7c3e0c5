"""The ``triton`` linear op: the Pallas Triton kernels for one sparse weight (GPU; on a CPU
they run in interpret mode when asked for by name).

The kernel is chosen by the weight's format: ``nm_matmul`` (2:4 and the other N:M patterns the
kernel expands), ``samoyeds_matmul`` (V a power of two >= 64) and ``unstructured_matmul``
(``TiledSparse`` gather, ``TiledBitmap`` expand). Each picks its tuned tiling per device and
token count, and expands to dense for XLA's GEMM where that is faster (many tokens). The N:M
kernels take bfloat16 or float16 weights, the unstructured ones float32 too. Dense
weights are not its work: XLA's GEMM is the dense path (``xla``). The weight is cast to x's
dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax.numpy as jnp

from pallas_kernels import decompress
from pallas_kernels.format_registry import format_name, format_of
from pallas_kernels.linear_op import LinearOp, register
from pallas_kernels.nm_matmul import nm_matmul, samoyeds_matmul
from pallas_kernels.tiled_format import SUPPORTED_DTYPES
from pallas_kernels.unstructured import unstructured_matmul


class _Kernel(NamedTuple):
    matmul: Callable[..., Any]      # (x [t, K], w, *, out_dtype) -> [t, N]
    fits: Callable[[Any], bool]     # whether the kernel takes this weight's parameters
    takes: str                      # what it takes, in words


_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # what the N:M kernels multiply


def _nm_fits(w: Any) -> bool:
    return w.dtype in _HALF and (int(w.n), int(w.m)) in decompress.SUPPORTED_NM


def _samoyeds_fits(w: Any) -> bool:
    v = int(w.v)
    return w.dtype in _HALF and v >= 64 and v & (v - 1) == 0


KERNELS: dict[str, _Kernel] = {
    "nm": _Kernel(nm_matmul, _nm_fits,
                  f"nm in bfloat16/float16 with N:M in {list(decompress.SUPPORTED_NM)}"),
    "samoyeds": _Kernel(samoyeds_matmul, _samoyeds_fits,
                        "samoyeds in bfloat16/float16 with V a power of two >= 64"),
    "unstructured": _Kernel(unstructured_matmul, lambda w: w.dtype in SUPPORTED_DTYPES,
                            "unstructured"),
}


@dataclasses.dataclass(frozen=True)
class TritonLinear(LinearOp):
    name: ClassVar[str] = "triton"
    platforms: ClassVar[tuple[str, ...] | None] = ("gpu",)
    formats: ClassVar[tuple[str, ...] | None] = tuple(KERNELS)
    off_gpu: ClassVar[str] = "Pallas interpret mode: no GPU"
    differentiable: ClassVar[bool] = False

    def supports(self, w):
        kernel = KERNELS.get(format_name(w))
        return kernel is not None and kernel.fits(w)

    def accepts(self):
        return f"runs {', '.join(k.takes for k in KERNELS.values())}"

    def compute(self, x, w, out_dtype):
        if w.dtype != x.dtype:
            w = format_of(w).astype(w, x.dtype)
        return KERNELS[format_name(w)].matmul(x, w, out_dtype=out_dtype)


register(TritonLinear())

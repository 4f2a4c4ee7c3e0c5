"""The Mosaic GPU linear ops (Hopper): a 2:4 or Samoyeds weight in a Hopper kernel layout
(``hopper_layouts``), made once at load by ``prepare``.

- ``mosaic_sparse_mma``: ``WgmmaSparseA``, the compressed tiles straight into the sparse tensor
  cores (``sparse_mma_matmul.wgmma_sp_matmul``); bfloat16 2:4 or Samoyeds 1:2 column
  selection.
- ``mosaic_expand``: ``TransposedSparse``, expanded in registers for a dense ``wgmma``
  (``mgpu_matmul.mgpu_matmul``); bfloat16 or float16 (chosen by name only).

Off a Hopper GPU, when asked for by name, the kernels' jnp references run on the same layout,
so tests check the layout on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from pallas_kernels import backend as backend_lib
from pallas_kernels import hopper_layouts
from pallas_kernels.linear_op import LinearOp, describe_weight, register
from pallas_kernels.mgpu_matmul import mgpu_matmul, mgpu_matmul_reference
from pallas_kernels.sparse_mma_matmul import wgmma_sp_matmul, wgmma_sp_matmul_reference


@dataclasses.dataclass(frozen=True)
class _MosaicLinear(LinearOp):
    formats: ClassVar[tuple[str, ...] | None] = hopper_layouts.SOURCE_FORMATS  # once in layout
    layout: ClassVar[hopper_layouts.HopperLayout]
    kernel: ClassVar[Callable[..., Any]]
    reference: ClassVar[Callable[..., Any]]
    requires: ClassVar[str] = "a Hopper GPU"
    off_gpu: ClassVar[str] = "no GPU: the Mosaic GPU kernel's jnp reference runs"
    differentiable: ClassVar[bool] = False

    def supported_on(self, platform):
        return platform == "gpu" and backend_lib.is_hopper()

    def supports(self, w):
        return self.layout.holds(w)

    def prepares(self, w):
        return self.supports(w) or self.layout.takes(w)

    def prepare(self, w):
        if not self.prepares(w):
            raise ValueError(f"linear implementation {self.name!r} {self.accepts()}; got "
                             f"{describe_weight(w)} in {w.dtype}")
        return self.layout.convert(w)

    def accepts(self):
        return self.layout.accepts("weights")

    def expands(self, w):
        return False

    def compute(self, x, w, out_dtype):
        matmul = type(self).reference if backend_lib.interpret_mode() else type(self).kernel
        return matmul(x, w, out_dtype=out_dtype)


@dataclasses.dataclass(frozen=True)
class MosaicSparseMMA(_MosaicLinear):
    name: ClassVar[str] = "mosaic_sparse_mma"
    layout: ClassVar[hopper_layouts.HopperLayout] = hopper_layouts.WGMMA_SP
    kernel: ClassVar[Callable[..., Any]] = wgmma_sp_matmul
    reference: ClassVar[Callable[..., Any]] = wgmma_sp_matmul_reference


@dataclasses.dataclass(frozen=True)
class MosaicExpand(_MosaicLinear):
    name: ClassVar[str] = "mosaic_expand"
    layout: ClassVar[hopper_layouts.HopperLayout] = hopper_layouts.EXPAND
    kernel: ClassVar[Callable[..., Any]] = mgpu_matmul
    reference: ClassVar[Callable[..., Any]] = mgpu_matmul_reference


register(MosaicSparseMMA())
register(MosaicExpand())

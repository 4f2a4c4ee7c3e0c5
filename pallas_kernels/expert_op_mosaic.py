"""The Mosaic GPU expert ops (Hopper): 2:4 and Samoyeds experts in a Hopper kernel layout, made
once at load by ``prepare``, computed by ``mgpu_moe.moe_ffn_mgpu`` (expert-grouped launches: two
for one token, gate with up and down; else three). ``mosaic_sparse_mma`` plans 128-row tiles
from about 128 rows per expert (``mgpu_moe.block_t``) and runs them on the warp-specialized
grouped kernel: at 2048-4096 tokens 1.43-2.26x our fused dense kernel with Samoyeds weights
(H100, benchmarks/moe.md); ``mosaic_expand`` is for decode only.

- ``mosaic_sparse_mma``: ``WgmmaSparseA``, the compressed tiles straight into the sparse tensor
  cores (``wgmma.mma_async.sp``); bfloat16 2:4 or Samoyeds 1:2 column selection.
- ``mosaic_expand``: ``TransposedSparse``, expanded in registers for a dense ``wgmma``; bfloat16
  or float16 (chosen by name only).

Off a Hopper GPU, when asked for by name, the same gather and combine run around the grouped
kernel's jnp reference (``moe_ffn_mgpu_emulated``), so tests check the layout on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from pallas_kernels import backend as backend_lib
from pallas_kernels import hopper_layouts
from pallas_kernels import mgpu_moe
from pallas_kernels.expert_op import ExpertOp, register
from pallas_kernels.format_registry import format_name


@dataclasses.dataclass(frozen=True)
class _MosaicExperts(ExpertOp):
    formats: ClassVar[tuple[str, ...] | None] = hopper_layouts.SOURCE_FORMATS  # once in layout
    layout: ClassVar[hopper_layouts.HopperLayout]
    requires: ClassVar[str] = "a Hopper GPU"
    off_gpu: ClassVar[str] = "no GPU: the Mosaic GPU kernels' jnp reference runs"
    differentiable: ClassVar[bool] = False

    def supported_on(self, platform):
        return platform == "gpu" and backend_lib.is_hopper()

    def supports(self, w1, w3, w2):
        return all(self.layout.holds(w) for w in (w1, w3, w2))

    def prepares(self, w1, w3, w2):
        return self.supports(w1, w3, w2) or all(self.layout.takes(w) for w in (w1, w3, w2))

    def prepare(self, w1, w3, w2):
        if self.supports(w1, w3, w2):
            return w1, w3, w2
        if not self.prepares(w1, w3, w2):
            dtypes = sorted({str(w.dtype) for w in (w1, w3, w2)})
            raise ValueError(
                f"expert implementation {self.name!r} {self.accepts()}; got "
                f"{[format_name(w) or type(w).__name__ for w in (w1, w3, w2)]} in {dtypes}")
        return tuple(self.layout.convert(w) for w in (w1, w3, w2))

    def accepts(self):
        return self.layout.accepts("experts")

    def block_t(self, num_tokens, top_k, num_experts):
        return mgpu_moe.block_t(num_tokens, top_k, num_experts, self.layout.cls)

    def compute(self, x, plan, w1, w3, w2):
        if backend_lib.interpret_mode():
            return mgpu_moe.moe_ffn_mgpu_emulated(x, plan, w1, w3, w2)
        return mgpu_moe.moe_ffn_mgpu(x, plan, w1, w3, w2)


@dataclasses.dataclass(frozen=True)
class MosaicSparseMMA(_MosaicExperts):
    name: ClassVar[str] = "mosaic_sparse_mma"
    layout: ClassVar[hopper_layouts.HopperLayout] = hopper_layouts.WGMMA_SP


@dataclasses.dataclass(frozen=True)
class MosaicExpand(_MosaicExperts):
    name: ClassVar[str] = "mosaic_expand"
    layout: ClassVar[hopper_layouts.HopperLayout] = hopper_layouts.EXPAND


register(MosaicSparseMMA())
register(MosaicExpand())

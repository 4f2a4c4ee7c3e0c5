"""The Mosaic GPU expert ops (Hopper): 2:4 and Samoyeds experts in a Hopper kernel layout, made
once at load by ``prepare``, computed by ``mgpu_moe.moe_ffn_mgpu`` (three expert-grouped
launches). Built for decode (few tokens per expert); prefill through them is slower than dense
(benchmarks/moe.md).

- ``mosaic_sparse_mma``: ``WgmmaSparseA``, the compressed tiles straight into the sparse tensor
  cores (``wgmma.mma_async.sp``); bfloat16 2:4 or Samoyeds 1:2 column selection.
- ``mosaic_expand``: ``TransposedSparse``, expanded in registers for a dense ``wgmma``; bfloat16
  or float16 (chosen by name only).

Off a Hopper GPU, when asked for by name, the same gather and combine run around the grouped
kernel's jnp reference (``moe_ffn_mgpu_emulated``), so tests check the layout on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backend_lib
from pallas_kernels import mgpu_moe
from pallas_kernels.expert_op import ExpertOp, _format_name, register
from pallas_kernels.sparse_mma_layout import WgmmaSparseA, to_wgmma_sp
from pallas_kernels.transposed_format import TransposedSparse


@dataclasses.dataclass(frozen=True)
class _MosaicExperts(ExpertOp):
    formats: ClassVar[tuple[str, ...] | None] = ("nm", "samoyeds")  # once in its layout
    layout: ClassVar[type] = object
    dtypes: ClassVar[tuple[Any, ...]] = (jnp.bfloat16,)
    off_gpu: ClassVar[str] = "no GPU: the Mosaic GPU kernels' jnp reference runs"

    def supported_on(self, platform):
        return platform == "gpu" and backend_lib.is_hopper()

    def supports(self, w1, w3, w2):
        return all(isinstance(w, self.layout) for w in (w1, w3, w2))

    def prepares(self, w1, w3, w2):
        if self.supports(w1, w3, w2):
            return True
        ws = (w1, w3, w2)
        return (all(_format_name(w) in ("nm", "samoyeds") for w in ws)
                and all(jnp.dtype(w.dtype) in self.dtypes for w in ws)
                and all(self._fits(w) for w in ws))

    def prepare(self, w1, w3, w2):
        if self.supports(w1, w3, w2):
            return w1, w3, w2
        if not self.prepares(w1, w3, w2):
            dtypes = sorted({str(jnp.dtype(w.dtype)) for w in (w1, w3, w2)})
            raise ValueError(
                f"expert implementation {self.name!r} {self.accepts()}; got "
                f"{[_format_name(w) or type(w).__name__ for w in (w1, w3, w2)]} in {dtypes}")
        return tuple(self._convert(w) for w in (w1, w3, w2))

    def accepts(self):
        return (f"takes 2:4 or Samoyeds experts in {[jnp.dtype(d).name for d in self.dtypes]} "
                "that its layout can hold")

    def _fits(self, w) -> bool:
        """Whether the layout holds ``w`` (its checks run on shapes alone)."""
        try:
            jax.eval_shape(self._convert, w)
        except ValueError:
            return False
        return True

    def block_t(self, num_tokens, top_k, num_experts):
        from pallas_kernels.moe_tiles import default_block_t
        return default_block_t(num_tokens, top_k, num_experts)

    def compute(self, x, plan, w1, w3, w2):
        if backend_lib.interpret_mode():
            return mgpu_moe.moe_ffn_mgpu_emulated(x, plan, w1, w3, w2)
        return mgpu_moe.moe_ffn_mgpu(x, plan, w1, w3, w2)


@dataclasses.dataclass(frozen=True)
class MosaicSparseMMA(_MosaicExperts):
    name: ClassVar[str] = "mosaic_sparse_mma"
    layout: ClassVar[type] = WgmmaSparseA

    def _convert(self, w):
        return to_wgmma_sp(w)


@dataclasses.dataclass(frozen=True)
class MosaicExpand(_MosaicExperts):
    name: ClassVar[str] = "mosaic_expand"
    layout: ClassVar[type] = TransposedSparse
    dtypes: ClassVar[tuple[Any, ...]] = (jnp.bfloat16, jnp.float16)

    def _convert(self, w):
        if _format_name(w) == "nm":
            return TransposedSparse.from_nm(w)
        return TransposedSparse.from_samoyeds(w)


register(MosaicSparseMMA())
register(MosaicExpand())

"""The ``triton`` expert op: the routed-token Pallas kernels of ``moe_matmul`` (GPU; on a CPU
they run in interpret mode when asked for by name).

Dense, 2:4 and Samoyeds stacks run in their stored format: each kernel program gathers its row
tile's tokens by index and reads only its expert's compressed tiles (``moe_matmul.moe_ffn``).
The weights are cast to x's dtype; the plan's row tile is ``moe_matmul.default_block_t``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from pallas_kernels.expert_op import ExpertOp, register
from pallas_kernels.format_registry import format_of
from pallas_kernels.moe_matmul import moe_ffn
from pallas_kernels.moe_tiles import default_block_t


@dataclasses.dataclass(frozen=True)
class TritonExperts(ExpertOp):
    name: ClassVar[str] = "triton"
    platforms: ClassVar[tuple[str, ...] | None] = ("gpu",)
    formats: ClassVar[tuple[str, ...] | None] = ("dense", "nm", "samoyeds")
    off_gpu: ClassVar[str] = "Pallas interpret mode: no GPU"
    differentiable: ClassVar[bool] = False

    def block_t(self, num_tokens, top_k, num_experts):
        return default_block_t(num_tokens, top_k, num_experts)

    def compute(self, x, plan, w1, w3, w2):
        w1, w3, w2 = (w if w.dtype == x.dtype else format_of(w).astype(w, x.dtype)
                      for w in (w1, w3, w2))
        return moe_ffn(x, plan, w1, w3, w2)


register(TritonExperts())

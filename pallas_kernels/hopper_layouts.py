"""The Hopper kernel layouts of 2:4 and Samoyeds weights, made once at load.

- ``WGMMA_SP``: ``WgmmaSparseA``, the compressed tiles as the A operand of the sparse tensor
  cores (``wgmma.mma_async.sp``); bfloat16, 2:4 or Samoyeds 1:2 column selection.
- ``EXPAND``: ``TransposedSparse``, W^T compressed, expanded in registers for a dense
  ``wgmma``; bfloat16 or float16.

Shared by the Mosaic GPU expert ops (``expert_op_mosaic``) and linear ops
(``linear_op_mosaic``): which stored weights a layout takes (``takes``, checked on shapes
alone), the conversion (``convert``) and, in words, what it takes (``accepts``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.format_registry import format_name
from pallas_kernels.sparse_mma_layout import WgmmaSparseA, to_wgmma_sp
from pallas_kernels.transposed_format import TransposedSparse

# Stored formats a Hopper layout is made from.
SOURCE_FORMATS = ("nm", "samoyeds")


@dataclasses.dataclass(frozen=True)
class HopperLayout:
    """One kernel layout: its class, the conversion from a stored weight, its dtypes."""

    cls: type
    to_layout: Callable[[Any], Any]
    dtypes: tuple[Any, ...]

    def holds(self, w: Any) -> bool:
        """Whether ``w`` is already in this layout."""
        return isinstance(w, self.cls)

    def takes(self, w: Any) -> bool:
        """Whether ``convert`` brings the stored weight ``w`` into this layout: 2:4 or Samoyeds
        in one of ``dtypes``, of a shape the layout holds (its checks run on shapes alone)."""
        if format_name(w) not in SOURCE_FORMATS or jnp.dtype(w.dtype) not in self.dtypes:
            return False
        try:
            jax.eval_shape(self.to_layout, w)
        except ValueError:
            return False
        return True

    def convert(self, w: Any) -> Any:
        """``w`` in this layout (unchanged when it already is)."""
        return w if self.holds(w) else self.to_layout(w)

    def accepts(self, what: str) -> str:
        """What it takes, in words (``what``: "experts", "weights")."""
        return (f"takes 2:4 or Samoyeds {what} in {[jnp.dtype(d).name for d in self.dtypes]} "
                "that its layout can hold")


_TO_TRANSPOSED = {"nm": TransposedSparse.from_nm, "samoyeds": TransposedSparse.from_samoyeds}


def to_transposed(w: Any) -> TransposedSparse:
    """A 2:4 ``NMSparse`` or ``SamoyedsSparse`` weight as ``TransposedSparse``."""
    return _TO_TRANSPOSED[format_name(w)](w)


WGMMA_SP = HopperLayout(WgmmaSparseA, to_wgmma_sp, (jnp.bfloat16,))
EXPAND = HopperLayout(TransposedSparse, to_transposed, (jnp.bfloat16, jnp.float16))

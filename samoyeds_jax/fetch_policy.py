"""Expert fetch policies of the offloaded decoders: one small strategy object each.

A policy answers, for block l of L with E experts each, what the ``offload.BlockScheduler``
must do around that block's expert compute:

* ``reads_own(use_pregate)``: whether block l's own expert ids must be read on the host (to
  fetch them);
* ``reads_next()``: whether the pre-gate's ids of block l+1 are read (to prefetch them);
* ``needed(own_ids, known, use_pregate, E)``: the experts block l computes with, made resident
  before its compute (``known``: block l's ids as read at block l-1);
* ``prefetch(l, L, E, next_ids)``: ``(block, experts)`` to fetch while block l computes, or None;
* ``default_slots`` / ``check_slots``: the device pool it needs;
* ``routing_source``: the routing it needs, if only one works with it; ``preload``: whether
  every expert is resident from the start.

``POLICIES`` maps the names ``OffloadConfig.policy`` takes to the objects; ``get_policy(name)``
looks one up with a clear error.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np


def unique_ids(ids: np.ndarray) -> list[int]:
    """The distinct expert ids of a host array, ascending."""
    return [int(e) for e in np.unique(ids)]


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """``on_demand``, and the interface of every policy: block l's routed experts are read
    and fetched after its router ran, on the critical path; nothing is prefetched."""

    name: ClassVar[str] = "on_demand"
    routing_source: ClassVar[str | None] = None
    preload: ClassVar[bool] = False
    why: ClassVar[str] = ""  # why it needs its routing source (for the refusal)

    def reads_own(self, use_pregate: bool) -> bool:
        return True

    def reads_next(self) -> bool:
        return False

    def needed(self, own_ids: np.ndarray | None, known: list[int] | None, use_pregate: bool,
               num_experts: int) -> list[int]:
        return unique_ids(own_ids)

    def prefetch(self, l: int, num_layers: int, num_experts: int,
                 next_ids: np.ndarray | None) -> tuple[int, list[int]] | None:
        return None

    def default_slots(self, num_layers: int, num_experts: int, per_block: int) -> int:
        """A double buffer: room for two blocks' experts (the prefetch of block l+1 is issued
        before block l's compute only when both fit), capped at every expert."""
        return min(num_layers * num_experts, 2 * per_block)

    def check_slots(self, slots: int, num_layers: int, num_experts: int) -> None:
        """ValueError when ``slots`` cannot hold what the policy keeps resident."""


@dataclasses.dataclass(frozen=True)
class GpuOnly(FetchPolicy):
    """Every expert resident from the start; no transfer."""

    name: ClassVar[str] = "gpu_only"
    preload: ClassVar[bool] = True

    def reads_own(self, use_pregate):
        return False

    def needed(self, own_ids, known, use_pregate, num_experts):
        return list(range(num_experts))

    def default_slots(self, num_layers, num_experts, per_block):
        return num_layers * num_experts

    def check_slots(self, slots, num_layers, num_experts):
        if slots < num_layers * num_experts:
            raise ValueError(f"policy='gpu_only' keeps all {num_layers}*{num_experts} experts "
                             f"resident: needs slots >= {num_layers * num_experts}, got "
                             f"{slots=}")


@dataclasses.dataclass(frozen=True)
class PrefetchAll(FetchPolicy):
    """All E experts of block l+1 (block 0 of the next step after the last) fetched while
    block l computes."""

    name: ClassVar[str] = "prefetch_all"

    def reads_own(self, use_pregate):
        return False

    def needed(self, own_ids, known, use_pregate, num_experts):
        return list(range(num_experts))

    def prefetch(self, l, num_layers, num_experts, next_ids):
        return (l + 1) % num_layers, list(range(num_experts))

    def default_slots(self, num_layers, num_experts, per_block):
        return min(num_layers * num_experts, 2 * num_experts)

    def check_slots(self, slots, num_layers, num_experts):
        if slots < num_experts:
            raise ValueError(f"policy='prefetch_all' fetches all {num_experts} experts of the "
                             f"next block: needs slots >= {num_experts}, got {slots=}")


@dataclasses.dataclass(frozen=True)
class Pregated(FetchPolicy):
    """Pre-gated MoE: block l >= 1 computes with the experts block l-1's pre-gate picked,
    which were fetched while block l-1 computed; block 0's are fetched on demand."""

    name: ClassVar[str] = "pregated"
    routing_source: ClassVar[str | None] = "pregate"
    why: ClassVar[str] = "fetches the pre-gate's experts"

    def reads_own(self, use_pregate):
        return not use_pregate

    def reads_next(self):
        return True

    def needed(self, own_ids, known, use_pregate, num_experts):
        return known if use_pregate else unique_ids(own_ids)

    def prefetch(self, l, num_layers, num_experts, next_ids):
        return None if next_ids is None else (l + 1, unique_ids(next_ids))


@dataclasses.dataclass(frozen=True)
class Speculative(FetchPolicy):
    """Each block computes with its own router; the pre-gate's prediction of block l+1 is
    prefetched while block l computes, and what it missed is fetched on demand."""

    name: ClassVar[str] = "speculative"
    routing_source: ClassVar[str | None] = "router"
    why: ClassVar[str] = "treats the pre-gate as a prediction of each block's own router"

    def reads_next(self):
        return True

    def prefetch(self, l, num_layers, num_experts, next_ids):
        return None if next_ids is None else (l + 1, unique_ids(next_ids))


POLICIES: dict[str, FetchPolicy] = {p.name: p for p in (
    GpuOnly(), FetchPolicy(), PrefetchAll(), Pregated(), Speculative())}


def get_policy(name: str) -> FetchPolicy:
    """The policy named ``name``; ValueError naming the known ones otherwise."""
    if not isinstance(name, str) or name not in POLICIES:
        raise ValueError(f"policy must be one of {tuple(POLICIES)}, got {name!r}")
    return POLICIES[name]

"""Reports of ``samoyeds_jax.pruning.prune_experts``: ``LayerReport`` per pruned weight and
``PruneReport`` with totals, a JSON-ready dict and a text table."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from samoyeds_jax.pruning import PruneConfig

__all__ = ["LayerReport", "PruneReport"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerReport:
    """Result of pruning one weight (a matrix or an expert stack).

    Attributes:
      path: the weight's path in the pytree, "/"-joined (e.g. "layers/0/w1").
      shape, dtype: of the dense weight.
      density: fraction of nonzero entries after pruning.
      weight_rel_error: ||W - W_pruned||_F / ||W||_F over the whole stack, in [0, 1].
      output_rel_error: ||X W - X W_pruned||_F / ||X W||_F on the calibration activations, or
        None without calibration for this weight.
      dense_bytes: bytes of the dense weight; stored_bytes: bytes of what is returned.
      matrix_weight_rel_errors: weight_rel_error of every matrix of the stack (row-major over
        the leading dims, e.g. one per expert).
      fallback_matrices: the matrices of the stack (same indexing) pruned by magnitude instead
        of ``method`` ("wanda"/"sparsegpt") because their calibration activations are all zero
        (an expert no calibration token was routed to) or, for "sparsegpt", their dampened
        Hessian could not be factorized.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    format: str
    density: float
    weight_rel_error: float
    output_rel_error: float | None
    dense_bytes: int
    stored_bytes: int
    matrix_weight_rel_errors: tuple[float, ...]
    fallback_matrices: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneReport:
    """Per-weight results of ``prune_experts`` plus totals."""

    config: PruneConfig
    layers: dict[str, LayerReport]

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.layers.values())

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.layers.values())

    @property
    def max_weight_rel_error(self) -> float:
        return max((r.weight_rel_error for r in self.layers.values()), default=0.0)

    @property
    def mean_weight_rel_error(self) -> float:
        errs = [r.weight_rel_error for r in self.layers.values()]
        return float(np.mean(errs)) if errs else 0.0

    @property
    def mean_output_rel_error(self) -> float | None:
        errs = [r.output_rel_error for r in self.layers.values() if r.output_rel_error is not None]
        return float(np.mean(errs)) if errs else None

    @property
    def fallback_matrices(self) -> dict[str, tuple[int, ...]]:
        """{path: matrices pruned by magnitude instead of the method} for weights with any."""
        return {p: r.fallback_matrices for p, r in self.layers.items() if r.fallback_matrices}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: {"config", "layers": {path: {...}}, "summary": {...}}."""
        return {
            "config": dataclasses.asdict(self.config),
            "layers": {p: dataclasses.asdict(r) for p, r in self.layers.items()},
            "summary": {
                "num_weights": len(self.layers),
                "dense_bytes": self.dense_bytes,
                "stored_bytes": self.stored_bytes,
                "mean_weight_rel_error": self.mean_weight_rel_error,
                "max_weight_rel_error": self.max_weight_rel_error,
                "mean_output_rel_error": self.mean_output_rel_error,
                "num_fallback_matrices": sum(map(len, self.fallback_matrices.values())),
            },
        }

    def table(self) -> str:
        """A fixed-width text table, one line per weight, then totals."""
        lines = [f"{'weight':<28} {'shape':<20} {'density':>7} {'w_err':>7} {'y_err':>7} "
                 f"{'MiB':>9} {'of dense':>8}"]
        for r in self.layers.values():
            y = "-" if r.output_rel_error is None else f"{r.output_rel_error:.4f}"
            lines.append(f"{r.path:<28} {str(list(r.shape)):<20} {r.density:>7.4f} "
                         f"{r.weight_rel_error:>7.4f} {y:>7} {r.stored_bytes / 2**20:>9.2f} "
                         f"{r.stored_bytes / max(r.dense_bytes, 1):>8.4f}")
        lines.append(f"{'total':<28} {'':<20} {'':>7} {self.mean_weight_rel_error:>7.4f} "
                     f"{'':>7} {self.stored_bytes / 2**20:>9.2f} "
                     f"{self.stored_bytes / max(self.dense_bytes, 1):>8.4f}")
        for path, idx in self.fallback_matrices.items():
            lines.append(f"{path}: matrices {list(idx)} pruned by magnitude instead of "
                         f"{self.config.method} (all-zero calibration: no tokens routed there"
                         + (", or H not factorizable)" if self.config.method == "sparsegpt"
                            else ")"))
        return "\n".join(lines)

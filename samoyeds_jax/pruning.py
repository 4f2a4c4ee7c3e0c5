"""Model-level pruning: ``PruneConfig``, ``convert`` and ``prune_experts``.

``convert`` turns a pruned weight [..., K, N] (``samoyeds_jax.prune_weights``, which also
documents the scores and patterns) into its compressed format, and ``prune_experts`` prunes
and converts every expert weight of a model, with a ``prune_report.PruneReport``.

``PruneConfig(method="sparsegpt")`` chooses the mask, instead of by score, and updates the kept
weights by second-order (OBS) reconstruction of ``X W`` (``samoyeds_jax.sparsegpt``), to the
same patterns.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pallas_kernels import format_registry
from pallas_kernels.checks import expect_kind
from pallas_kernels.prune_masks import check_ints as _check_ints
from samoyeds_jax import sparsegpt
from samoyeds_jax.prune_report import LayerReport, PruneReport
from samoyeds_jax.prune_weights import (Pattern, _check_finite, _check_nm, _check_samoyeds,
                                        _check_score, _check_sparsity, _check_weight, _masks,
                                        _prune, _wanda)

__all__ = [
    "PruneConfig",
    "convert",
    "is_expert_weight",
    "prune_experts",
]

# For typing; the formats are those of ``format_registry.FORMATS`` (a test keeps the two equal).
Format = Literal["dense", "nm", "samoyeds", "unstructured"]
Method = Literal["magnitude", "wanda", "sparsegpt"]
Output = Literal["compressed", "dense"]

# Expert stacks above this many elements in total show a progress bar (when stderr is a tty).
_LARGE_MODEL_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------------------------
# Model-level pruning.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """What to prune to and how to score.

    Attributes:
      format: "dense" (leave weights as they are; a baseline), "nm", "samoyeds" or
        "unstructured".
      method: "magnitude" (|W|), "wanda" (|W| * input-channel norm; needs calibration) or
        "sparsegpt" (second-order mask choice with weight reconstruction,
        ``samoyeds_jax.sparsegpt``; needs calibration).
      n, m: the N:M pattern of format "nm".
      n_sel, m_sel, v: the vector-wise selection of format "samoyeds" (2:4 inside is fixed).
      sparsity: fraction zeroed by format "unstructured", in [0, 1).
      output: "compressed" returns format objects (NMSparse / SamoyedsSparse / TiledSparse),
        "dense" the pruned dense arrays.
      tile_k, tile_n: TiledSparse tile size of format "unstructured" (None: its defaults).
      shared_w1_w3: format "samoyeds" only: each expert's w1 and w3 (same input, outputs
        multiplied in SwiGLU) keep the same columns per slab, chosen by their summed scores
        (``samoyeds_mask_shared``; for sparsegpt, summed OBS savings). None (default): True
        for "samoyeds", where it measured better for every method (benchmarks/quality.md),
        else False. Other formats have no column choice to share, so True raises ValueError.
      damp, block_size: method "sparsegpt"'s dampening (fraction of mean(diag H)) and rows per
        lazy-update block (a multiple of m for "nm"; Samoyeds uses v).
      refit_iters, column_sweeps: method "sparsegpt"'s least-squares refit of the kept weights
        on the chosen mask and Samoyeds column re-choice sweeps (``sparsegpt.SparseGPTConfig``).
    """

    format: Format
    method: Method = "magnitude"
    n: int = 2
    m: int = 4
    n_sel: int = 1
    m_sel: int = 2
    v: int = 128
    sparsity: float = 0.5
    output: Output = "compressed"
    tile_k: int | None = None
    tile_n: int | None = None
    shared_w1_w3: bool | None = None
    damp: float = 0.01
    block_size: int = 128
    refit_iters: int = 100
    column_sweeps: int = 0

    def __post_init__(self):
        if self.format not in format_registry.FORMATS:
            raise ValueError(f"format={self.format!r} must be one of "
                             f"{', '.join(map(repr, format_registry.format_names()))}")
        if self.method not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"method={self.method!r} must be 'magnitude', 'wanda' or "
                             "'sparsegpt'")
        if self.shared_w1_w3 is None:
            object.__setattr__(self, "shared_w1_w3", self._shares_columns())
        if not isinstance(self.shared_w1_w3, bool):
            raise ValueError(f"shared_w1_w3 must be a bool; given {self.shared_w1_w3!r}")
        if self.shared_w1_w3 and not self._shares_columns():
            raise ValueError(f"shared_w1_w3=True applies to format='samoyeds' only (the one "
                             f"format with a column choice to share); given format="
                             f"{self.format!r}")
        self.sparsegpt_config()  # validates damp, block_size, refit_iters, column_sweeps
        if self.method == "sparsegpt" and self.format == "nm" and self.block_size % self.m:
            raise ValueError(f"block_size={self.block_size} must be a multiple of m={self.m} "
                             "(N:M groups may not straddle blocks)")
        if self.output not in ("compressed", "dense"):
            raise ValueError(f"output={self.output!r} must be 'compressed' or 'dense'")
        _check_nm(self.n, self.m)
        _check_samoyeds(self.n_sel, self.m_sel, self.v)
        _check_sparsity(self.sparsity)
        for name in ("tile_k", "tile_n"):
            if getattr(self, name) is not None:
                _check_ints(**{name: getattr(self, name)})
        if self.output == "compressed":
            try:
                self.weight_format.check_params(**self.format_params())
            except ValueError as err:
                raise ValueError(f"format={self.format!r} cannot store these parameters: {err}; "
                                 "use output='dense' to keep the pruned weights dense") from None

    @property
    def weight_format(self) -> format_registry.WeightFormat:
        """The registry entry of ``format``."""
        return format_registry.get_format(self.format)

    def format_params(self) -> dict[str, Any]:
        """The parameters of ``format`` set by this config (e.g. n and m for "nm")."""
        return self.weight_format.params_of(self)

    def pattern(self, k: int, n_out: int) -> Pattern:
        """The hashable pattern of one [K, N] matrix (validates K and N against it, and
        against the compressed format's layout when ``output == "compressed"``)."""
        fmt, params = self.weight_format, self.format_params()
        pattern = fmt.pattern(k, n_out, **params)
        if self.output == "compressed":
            try:
                fmt.check_shape(k, n_out, **params)
            except ValueError as err:
                raise ValueError(f"[K={k}, N={n_out}] cannot be stored as {self.format!r}: {err}; "
                                 "use output='dense'") from None
        return pattern

    def _shares_columns(self) -> bool:
        """Whether two matrices pruned together (w1 and w3) share one choice in ``format``."""
        return self.weight_format.pattern_shares_choice

    def sparsegpt_config(self):
        """The ``sparsegpt.SparseGPTConfig`` of this config's damp, block_size, refit_iters and
        column_sweeps."""
        return sparsegpt.SparseGPTConfig(block_size=self.block_size, damp=self.damp,
                                         refit_iters=self.refit_iters,
                                         column_sweeps=self.column_sweeps)

    def prune(self, w: jax.Array, score: jax.Array | None = None) -> jax.Array:
        """Prune one weight [..., K, N] to this config's pattern (dense out, same dtype).

        Scores by ``score`` (default magnitude) whatever ``method`` says; "sparsegpt" needs a
        Hessian: ``sparsegpt.sparsegpt_prune(w, h, self.pattern(K, N),
        config=self.sparsegpt_config())`` prunes one matrix that way.
        """
        w = _check_weight(w)
        score = None if score is None else _check_score(score, w)
        return _prune(w, score, pattern=self.pattern(*w.shape[-2:]))


def expect_config(name: str, config: Any, *, optional: bool = False) -> None:
    """TypeError unless ``config`` is a ``PruneConfig`` (or None, with ``optional``)."""
    expect_kind(name, config, (PruneConfig, type(None)) if optional else PruneConfig,
                "a PruneConfig (e.g. PruneConfig(format='nm'))" + (" or None" if optional else ""))


def convert(w: jax.Array, config: PruneConfig) -> Any:
    """Pruned dense weight [..., K, N] -> the compressed format of ``config.format``.

    The format's ``from_dense`` (``format_registry``): "nm" -> ``formats.NMSparse``,
    "samoyeds" -> ``formats.SamoyedsSparse``, "unstructured" -> ``tiled_format.TiledSparse``;
    "dense" returns ``w`` as an array. Exact: ``convert(w, c).to_dense() == w``. Raises
    ValueError (from the format) if ``w`` does not satisfy the pattern.
    """
    expect_config("config", config)
    return config.weight_format.from_dense(w, **config.format_params())

_EXPERT_NAMES = frozenset({"w1", "w2", "w3"})


def is_expert_weight(path: str, leaf: Any) -> bool:
    """Default selection: a leaf named w1/w2/w3 (Mixtral gate/down/up) with ndim >= 3."""
    return path.rsplit("/", 1)[-1] in _EXPERT_NAMES and getattr(leaf, "ndim", 0) >= 3


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if len(parts) > 1 and parts[-1] == "value":  # nnx.State leaves: .../w1/value
        parts.pop()
    return "/".join(parts)


def _activation(path: str, leaves: Mapping[str, jax.Array],
                calibration: Mapping[str, Any] | None) -> jax.Array | None:
    """The calibration input of weight ``path``, or None.

    ``calibration[path]`` wins; otherwise ``calibration[parent]`` is the input of an expert FFN
    ({w1, w3, w2} under one parent): w1/w3 see it directly, and w2 sees
    ``silu(x @ w1) * (x @ w3)`` with w1/w3 as found in ``leaves`` (``prune_experts`` passes the
    ones it has already pruned).
    """
    if not calibration:
        return None
    if path in calibration:
        return jnp.asarray(calibration[path])
    parent, _, name = path.rpartition("/")
    if parent not in calibration or name not in _EXPERT_NAMES:
        return None
    x = jnp.asarray(calibration[parent])
    if name in ("w1", "w3"):
        return x
    w1, w3 = leaves.get(f"{parent}/w1"), leaves.get(f"{parent}/w3")
    if w1 is None or w3 is None:
        return None
    _check_finite(x, f"calibration[{parent!r}]")
    return _ffn_hidden(x, w1, w3)


@jax.jit
def _ffn_hidden(x: jax.Array, w1: jax.Array, w3: jax.Array) -> jax.Array:
    """silu(x @ w1) * (x @ w3) in float32: x [t, d] or [e, t, d], w1/w3 [e, d, f] -> [e, t, f]
    (w1/w3 [d, f], one FFN: x [t, d] -> [t, f])."""
    if w1.ndim == 2:  # one FFN (shared experts): [d, f]
        return _ffn_hidden(x, w1[None], w3[None])[0]
    x = x.astype(jnp.float32)
    if x.ndim == 2:
        x = jnp.broadcast_to(x[None], (w1.shape[0],) + x.shape)
    hi = jax.lax.Precision.HIGHEST
    g = jnp.einsum("etd,edf->etf", x, w1.astype(jnp.float32), precision=hi)
    u = jnp.einsum("etd,edf->etf", x, w3.astype(jnp.float32), precision=hi)
    return jax.nn.silu(g) * u


@functools.partial(jax.jit, static_argnames=("pattern", "method", "sparsegpt_config"))
def _prune_matrices(ws: tuple[jax.Array, ...], x: jax.Array | None, *, pattern: Pattern,
                    method: Method, sparsegpt_config: Any = None):
    """Prune one matrix [K, N], or an expert's (w1, w3) sharing the Samoyeds column choice, in
    one program (x [t, K] or None).

    Returns (pruned tuple in the weights' dtype, float32 [len(ws), 4] = (||w - p||^2, ||w||^2,
    ||x(w - p)||^2, ||x w||^2) per matrix (zeros for the x terms without x), nonzero counts
    [len(ws)], bool: pruned by magnitude instead of ``method``).
    """
    fallback = jnp.zeros((), jnp.bool_)
    if method == "sparsegpt":
        ps, info = sparsegpt._sparsegpt(ws, sparsegpt._hessian(x), None, pattern=pattern,
                                        config=sparsegpt_config)
        fallback = info["fallback"]
    else:
        scores = [jnp.abs(w).astype(jnp.float32) for w in ws]
        if method == "wanda":  # all-zero activations would make every Wanda score 0
            fallback = jnp.logical_not(jnp.any(x != 0))
            scores = [jnp.where(fallback, s, _wanda(w, x)) for s, w in zip(scores, ws)]
        masks = _masks(tuple(scores), pattern)
        ps = tuple(jnp.where(m, w, jnp.zeros((), w.dtype)) for m, w in zip(masks, ws))
    sums = []
    hi = jax.lax.Precision.HIGHEST
    for w, p in zip(ws, ps):
        w32 = w.astype(jnp.float32)
        diff = w32 - p.astype(jnp.float32)
        row = [jnp.sum(diff * diff), jnp.sum(w32 * w32)]
        if x is None:
            row += [jnp.zeros((), jnp.float32)] * 2
        else:
            x32 = x.astype(jnp.float32)
            dy = jnp.matmul(x32, diff, precision=hi)
            y = jnp.matmul(x32, w32, precision=hi)
            row += [jnp.sum(dy * dy), jnp.sum(y * y)]
        sums.append(jnp.stack(row))
    nnz = jnp.stack([jnp.count_nonzero(p) for p in ps])
    return ps, jnp.stack(sums), nnz, fallback


def _ratio(num: float, den: float) -> float:
    return 0.0 if den == 0.0 else math.sqrt(num / den)


def _prune_group(paths: tuple[str, ...], ws: tuple[Any, ...], x: jax.Array | None,
                 config: PruneConfig) -> list[tuple[Any, jax.Array, LayerReport]]:
    """Prune one weight [..., K, N], or an expert FFN's (w1, w3) with one Samoyeds column
    choice, matrix by matrix (bounded temporary memory).

    Returns (stored, pruned dense, report) per weight.
    """
    ws = tuple(_check_weight(w, p) for p, w in zip(paths, ws))
    *lead, k, n_out = ws[0].shape
    if any(w.shape != ws[0].shape for w in ws):
        raise ValueError(f"shared_w1_w3: {paths[0]!r} and {paths[1]!r} must have one shape; "
                         f"given {tuple(ws[0].shape)} and {tuple(ws[1].shape)}")
    if x is not None:
        x = jnp.asarray(x)
        if x.ndim < 2 or x.shape[-1] != k or (x.ndim > 2 and tuple(x.shape[:-2]) != tuple(lead)):
            raise ValueError(f"calibration for {paths[0]!r} (w.shape={tuple(ws[0].shape)}) must "
                             f"be [t, {k}] or {lead + ['t', k]}; given shape={tuple(x.shape)}")
        _check_finite(x, f"calibration for {paths[0]!r}")
    if config.method != "magnitude" and x is None:
        raise ValueError(f"method={config.method!r} needs calibration activations for "
                         f"{paths[0]!r}; pass calibration={{{paths[0]!r}: x [t, {k}]}} or its "
                         "FFN's input under the parent path")
    pattern = config.pattern(k, n_out)
    sgpt = config.sparsegpt_config() if config.method == "sparsegpt" else None
    batch = math.prod(lead)
    flat = [w.reshape(batch, k, n_out) for w in ws]
    x_flat = None if x is None or x.ndim == 2 else x.reshape(batch, *x.shape[-2:])
    pieces = [[] for _ in ws]
    per_matrix = [[] for _ in ws]
    kept, sums, fallback = np.zeros(len(ws), np.int64), np.zeros((len(ws), 4)), []
    for i in range(batch):  # matrix by matrix: temporaries stay the size of one matrix
        x_i = x if x_flat is None else x_flat[i]
        ps, sq, nnz, fb = _prune_matrices(tuple(f[i] for f in flat), x_i, pattern=pattern,
                                          method=config.method, sparsegpt_config=sgpt)
        sq = np.asarray(sq, np.float64)
        sums += sq
        kept += np.asarray(nnz, np.int64)
        if bool(fb):
            fallback.append(i)
        for j, p in enumerate(ps):
            per_matrix[j].append(_ratio(sq[j, 0], sq[j, 1]))
            pieces[j].append(p)
    results = []
    for j, (path, w) in enumerate(zip(paths, ws)):
        pruned = jnp.stack(pieces[j]).reshape(w.shape)
        stored = pruned if config.output == "dense" else convert(pruned, config)
        stored_bytes = sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(stored))
        report = LayerReport(
            path=path, shape=tuple(w.shape), dtype=str(w.dtype), format=config.format,
            density=int(kept[j]) / w.size, weight_rel_error=_ratio(sums[j, 0], sums[j, 1]),
            output_rel_error=None if x is None else _ratio(sums[j, 2], sums[j, 3]),
            dense_bytes=int(w.nbytes), stored_bytes=stored_bytes,
            matrix_weight_rel_errors=tuple(per_matrix[j]), fallback_matrices=tuple(fallback))
        results.append((stored, pruned, report))
    return results


def _schedule(paths: list[str], chosen: list[int], shared: bool) -> list[tuple[int, ...]]:
    """The order of work over the chosen leaves (indices into ``paths``).

    An expert FFN's w2 comes right after its w1 and w3 (its calibration input is computed from
    them once pruned); with ``shared``, w1 and w3 of one parent are one step (w1 first).
    """
    index = {paths[i]: i for i in chosen}

    def sibling(i: int, name: str) -> int | None:
        return index.get(f"{paths[i].rpartition('/')[0]}/{name}")

    def key(i: int) -> tuple[int, int]:
        if paths[i].rpartition("/")[2] != "w2":
            return (i, 0)
        return (max([i] + [j for j in (sibling(i, "w1"), sibling(i, "w3")) if j is not None]), 1)

    steps, done = [], set()
    for i in sorted(chosen, key=key):
        if i in done:
            continue
        name = paths[i].rpartition("/")[2]
        other = sibling(i, {"w1": "w3", "w3": "w1"}[name]) if name in ("w1", "w3") else None
        step = (i,) if not shared or other is None else tuple(sorted(
            (i, other), key=lambda j: paths[j].rpartition("/")[2]))
        steps.append(step)
        done.update(step)
    return steps


def _same_input(a: jax.Array | None, b: jax.Array | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(jnp.array_equal(a, b)))


def prune_experts(
    params: Any,
    config: PruneConfig,
    calibration: Mapping[str, Any] | None = None,
    *,
    select: Callable[[str, Any], bool] = is_expert_weight,
    progress: bool | None = None,
) -> tuple[Any, PruneReport]:
    """Prune and convert every selected weight of a model.

    Args:
      params: a pytree of arrays (nested dicts such as
        ``{"layers": {0: {"w1": [e, d, f], "w3": [e, d, f], "w2": [e, f, d]}}}``, or an
        ``nnx.State``). Weights are [..., K, N] for ``y = x @ W``.
      config: the target format and method.
      calibration: activations keyed by path ("/"-joined keys). ``calibration["layers/0/w1"]``
        is the input of that weight: [t, K], or [e, t, K] per expert (zero-padded token lists).
        ``calibration["layers/0"]`` is the input [t, d] / [e, t, d] of that layer's expert FFN:
        w1/w3 use it, and w2 uses ``silu(x @ w1) * (x @ w3)`` computed with w1 and w3 as
        pruned in this call when they are selected too (for every method: w2 is fitted to the
        inputs it sees in the pruned model, as SparseGPT prunes layers sequentially), else the
        dense ones. Needed for method="wanda" and "sparsegpt" (which builds each expert's
        Hessian ``X^T X`` from it); when given, the report also has output errors. A matrix
        whose calibration is all zero (no token routed to that expert) is pruned by
        magnitude, and its report lists it (``LayerReport.fallback_matrices``).
      select: ``select(path, leaf) -> bool`` picks the weights to prune; default
        ``is_expert_weight`` (w1/w2/w3 stacks). To include attention/dense projections:
        ``select=lambda p, a: is_expert_weight(p, a) or p.endswith(("wq", "wo"))``.
      progress: show a tqdm bar; None shows it when stderr is a tty and the selected weights
        hold more than 2**26 elements.

    With ``config.shared_w1_w3`` (Samoyeds), the w1 and w3 under one parent are pruned together
    with one column choice; they must have one shape and one calibration input.

    Returns:
      (converted, report): ``params`` with every selected leaf replaced by its compressed
      format (or pruned dense array, ``config.output == "dense"``), and a ``PruneReport``.
    """
    expect_config("config", config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [_path_str(p) for p, _ in flat]
    leaves = dict(zip(paths, (leaf for _, leaf in flat)))
    if len(leaves) != len(paths):
        raise ValueError("params has two leaves with the same '/'-joined path")
    chosen = [i for i, p in enumerate(paths) if select(p, leaves[p])]
    if calibration:
        unknown = sorted(set(calibration) - set(paths) - {p.rpartition("/")[0] for p in paths})
        if unknown:
            raise ValueError(f"calibration keys {unknown} match no weight path or parent path "
                             f"of params (e.g. {paths[:3]})")
    for i in chosen:  # shapes first: fail before any work, not after hours of it
        shape = np.shape(leaves[paths[i]])
        if len(shape) < 2:
            raise ValueError(f"selected weight {paths[i]!r} must be [..., K, N]; given "
                             f"shape={shape}")
        config.pattern(*shape[-2:])
    if progress is None:
        total = sum(int(np.prod(np.shape(leaves[paths[i]]))) for i in chosen)
        progress = sys.stderr.isatty() and total > _LARGE_MODEL_ELEMENTS
    chosen_paths = {paths[i] for i in chosen}
    out = [leaf for _, leaf in flat]
    layers: dict[str, LayerReport] = {}
    # Pruned w1/w3 (dense) kept until their FFN's w2 has used them: at most one FFN at a time.
    pruned_inputs: dict[str, jax.Array] = {}
    current = collections.ChainMap(pruned_inputs, leaves)
    bar = tqdm(total=len(chosen), desc=f"pruning ({config.format}, {config.method})",
               unit="weight", disable=not progress)
    for step in _schedule(paths, chosen, config.shared_w1_w3):
        names = tuple(paths[i] for i in step)
        bar.set_postfix_str(", ".join(names), refresh=False)
        x = _activation(names[0], current, calibration)
        if len(names) == 2 and not _same_input(x, _activation(names[1], current, calibration)):
            raise ValueError(f"shared_w1_w3: {names[0]!r} and {names[1]!r} share one column "
                             "choice, so they must read the same calibration input; "
                             "calibration gives them different ones")
        results = _prune_group(names, tuple(leaves[p] for p in names), x, config)
        for i, path, (stored, pruned, report) in zip(step, names, results):
            out[i], layers[path] = stored, report
            parent, _, name = path.rpartition("/")
            if name in ("w1", "w3") and f"{parent}/w2" in chosen_paths:
                pruned_inputs[path] = pruned
            elif name == "w2":
                pruned_inputs.pop(f"{parent}/w1", None)
                pruned_inputs.pop(f"{parent}/w3", None)
        bar.update(len(step))
    bar.close()
    layers = {paths[i]: layers[paths[i]] for i in chosen}  # report in the params' order
    return jax.tree_util.tree_unflatten(treedef, out), PruneReport(config=config, layers=layers)

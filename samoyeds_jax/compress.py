"""Pruning a whole model with routing-aware, layer-by-layer calibration, then recovery.

``calibrate_and_prune(model, windows, prune_config)`` walks the blocks in order. For block l it
runs the calibration windows through the already-pruned blocks < l, takes the MoE layer's input
``x [n, d]`` and its own gate's routing, gives each expert exactly the tokens routed to it
(``[e, cap, d]``, zero-padded: padding adds nothing to norms or Hessians), prunes that block's
experts with ``pruning.prune_experts`` (magnitude, Wanda or SparseGPT; w2 sees the hidden state
of the already-pruned w1/w3), and moves on with the pruned block's output. The experts stay dense
arrays with exact zeros, so ``recover`` can fine-tune them with the mask fixed
(``train_optim.sparsity_masks``) and ``to_compressed`` stores them in the format afterwards without
pruning again.

The whole pipeline (``samoyeds-compress``)::

    model = load_model(dense_dir, dtype="float32")
    report = calibrate_and_prune(model, calib_windows, PruneConfig(format="samoyeds",
                                 method="sparsegpt", output="dense"))
    recover(model, teacher, train_tokens, TrainConfig(steps=..., distill_weight=1.0))
    to_compressed(model, prune_config)          # NMSparse / SamoyedsSparse / TiledSparse
    save_converted(model, out_dir)

A checkpoint too large for the device in dense form is pruned the same way block by block as
it streams in (``prune_checkpoint``, ``samoyeds-compress --stream``): one block's dense
weights on the device, the dense and one-shot models scored in the same pass; no recovery.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from samoyeds_jax import evaluate, prune_report, pruning
from samoyeds_jax.config import SparsityConfig
from samoyeds_jax.layers import attention_mask
from samoyeds_jax.linear import replace_value
from samoyeds_jax.model import DecoderBlock, ModelConfig, MoETransformer, expert_half
from samoyeds_jax.scan import alike


@dataclasses.dataclass(frozen=True)
class CompressReport:
    """Per block: the ``PruneReport`` and the calibration tokens each expert received."""

    config: pruning.PruneConfig | None
    blocks: tuple[prune_report.PruneReport, ...]
    expert_tokens: tuple[tuple[int, ...], ...]
    linears: pruning.PruneConfig | None = None
    linear_blocks: tuple[prune_report.PruneReport, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = {"config": None if self.config is None else dataclasses.asdict(self.config),
               "expert_tokens": [list(t) for t in self.expert_tokens],
               "blocks": [b.as_dict() for b in self.blocks]}
        if self.linears is not None:
            out["linears"] = dataclasses.asdict(self.linears)
            out["linear_blocks"] = [b.as_dict() for b in self.linear_blocks]
        return out

    def empty_experts(self) -> list[tuple[int, int]]:
        """(block, expert) pairs that received no calibration token."""
        return [(l, e) for l, toks in enumerate(self.expert_tokens)
                for e, n in enumerate(toks) if n == 0]


def _fresh_cache(block: DecoderBlock, x):
    """An empty KV cache of t slots for x [b, t, d] (full windows from position 0)."""
    b, t, _ = x.shape
    c = block.self_attn.config
    return jnp.zeros((b, t, c.num_kv_heads, c.head_dim), x.dtype)


@nnx.jit
def _moe_input(block: DecoderBlock, x, positions, attn_mask):
    """(h after attention [b, t, d], the MoE layer's input [b*t, d])."""
    empty = _fresh_cache(block, x)
    h, x_moe, _, _ = block.attention_half(x, positions=positions, mask=attn_mask, cache_k=empty,
                                          cache_v=empty, index=jnp.zeros((), jnp.int32))
    return h, x_moe


@nnx.jit
def _attention_input(block: DecoderBlock, x):
    """The q/k/v input [b*t, d] of one block."""
    return block.input_layernorm(x).reshape(-1, x.shape[-1])


@nnx.jit
def _attention_context(block: DecoderBlock, x, positions, attn_mask):
    """The o_proj input [b*t, h*hd] of one block."""
    empty = _fresh_cache(block, x)
    ctx, _, _ = block.self_attn.context(block.input_layernorm(x), positions=positions,
                                        mask=attn_mask, cache_k=empty, cache_v=empty,
                                        index=jnp.zeros((), jnp.int32))
    return ctx.reshape(-1, ctx.shape[-1])


def _prune_params(holders: dict[str, Any], config: pruning.PruneConfig,
                  calibration: dict[str, Any]) -> prune_report.PruneReport:
    """Prune the ``nnx.Param`` of each ``holders[path]`` (a [K, N] matrix) in place."""
    params = {path: holder.get_value() for path, holder in holders.items()}
    pruned, report = pruning.prune_experts(params, config, calibration,
                                           select=lambda path, leaf: path in holders,
                                           progress=False)
    for path, holder in holders.items():
        holder.set_value(pruned[path])
    return report


def _prune_linears(block: DecoderBlock, view: Callable[[], DecoderBlock], i: int,
                   config: pruning.PruneConfig, xs, pos_masks) -> prune_report.PruneReport:
    """Prune block i's attention projections in place, in order: q/k/v on their input, then
    o_proj on the heads' outputs of the pruned q/k/v (as SparseGPT prunes sequentially).
    ``view()``: the block as the jitted functions see it (``_views``)."""
    projections = block.self_attn.projections()
    o_proj = projections.pop("o_proj")
    xn = jnp.concatenate([_attention_input(view(), x) for x in xs])
    qkv = {f"layers/{i}/self_attn/{n}": lin.kernel for n, lin in projections.items()}
    reports = [_prune_params(qkv, config, {path: xn for path in qkv})]
    seen = view()  # after the q/k/v pruning
    ctx = jnp.concatenate([_attention_context(seen, x, p, m) for x, (p, m) in
                           zip(xs, pos_masks)])
    o = f"layers/{i}/self_attn/o_proj"
    reports.append(_prune_params({o: o_proj.kernel}, config, {o: ctx}))
    return prune_report.PruneReport(config=config, layers={**reports[0].layers,
                                                           **reports[1].layers})


def _prune_shared(block: DecoderBlock, i: int, config: pruning.PruneConfig, x_all
                  ) -> prune_report.PruneReport:
    """Prune block i's shared experts in place on every token (w2 on the pruned w1/w3's
    hidden state)."""
    shared = block.mlp.shared
    holders = {f"layers/{i}/mlp/shared/{n}": getattr(shared, n) for n in ("w1", "w3", "w2")}
    return _prune_params(holders, config, {f"layers/{i}/mlp/shared": x_all})


@nnx.jit
def _moe_output(block: DecoderBlock, h, x_moe):
    """The block output ``h + moe(x_moe)`` routed by the block's own gate."""
    mlp = block.mlp
    return expert_half(h, mlp.apply_experts(x_moe, mlp.route(x_moe)))


@nnx.jit
def _topk(block: DecoderBlock, x_moe):
    return block.mlp.route(x_moe).topk_idx


def check_windows(config: ModelConfig, windows: Any) -> np.ndarray:
    """``windows`` as int32 ``[n, t]`` calibration token windows of ``config``'s vocabulary
    (ValueError saying what was expected and given)."""
    arr = np.asarray(windows)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
        raise ValueError(f"calibration windows must be a non-empty [n, t] token array with t >= 2,"
                         f" got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"calibration windows must hold integer token ids, got {arr.dtype}")
    v = config.vocab_size
    if arr.min() < 0 or arr.max() >= v:
        raise ValueError(f"calibration token ids span [{arr.min()}, {arr.max()}]; the model's "
                         f"vocabulary is [0, {v})")
    return arr.astype(np.int32)


def routed_inputs(x_moe: jax.Array, topk_idx: jax.Array, num_experts: int
                  ) -> tuple[jax.Array, list[int]]:
    """Each expert's routed rows of ``x_moe`` [n, d], in row order, as float32 ``[e, cap, d]``
    on the device, and the counts (host ints); ``cap`` is the largest count rounded up to a
    power of two, so that the blocks of a model share a few shapes and the pruning programs
    compile once, not once per block (the padding rows are zero: they change no norm, Hessian
    or error sum)."""
    member = _members(jnp.asarray(topk_idx), num_experts)
    counts = [int(c) for c in np.asarray(member.sum(axis=1))]
    cap = 1 << (max(max(counts), 1) - 1).bit_length()
    return _gather_routed(jnp.asarray(x_moe), member, cap), counts


@functools.partial(jax.jit, static_argnums=1)
def _members(topk_idx: jax.Array, num_experts: int) -> jax.Array:
    """[e, n] bool: row r is routed to expert j."""
    return (topk_idx[None] == jnp.arange(num_experts)[:, None, None]).any(axis=-1)


@functools.partial(jax.jit, static_argnums=2)
def _gather_routed(x: jax.Array, member: jax.Array, cap: int) -> jax.Array:
    n = x.shape[0]
    rows = jnp.argsort(~member, axis=1, stable=True)[:, :min(cap, n)]  # members first, in order
    keep = jnp.take_along_axis(member, rows, axis=1)
    out = jnp.where(keep[..., None], x.astype(jnp.float32)[rows], 0.0)
    return jnp.pad(out, ((0, 0), (0, cap - out.shape[1]), (0, 0)))


def calibrate_and_prune(model: MoETransformer, windows: Any, config: pruning.PruneConfig | None, *,
                        linears: pruning.PruneConfig | None = None, batch_size: int = 8,
                        progress: bool | None = None) -> CompressReport:
    """Prune every block's routed experts in place, calibrated layer by layer on ``windows``.

    Args:
      model: a dense-expert model (float32 recommended: calibration statistics are float32).
      windows: ``[n, t]`` int token windows (the calibration set).
      config: the pattern and method; ``output`` must be ``"dense"`` (experts stay dense arrays
        with exact zeros; ``to_compressed`` converts them). None: the experts stay as they are
        (``linears`` alone).
      linears: also prune the attention projections and shared experts to this pattern and
        method (``output="dense"`` too), in the same walk: in each block q/k/v on their input,
        o_proj on the pruned heads' outputs, then the experts on the pruned attention's output,
        the shared experts on every token. None: they stay as they are.
      batch_size: windows per forward.
    Returns:
      ``CompressReport`` (per-block pruning reports, routed tokens per expert).
    """
    for what, c in (("config", config), ("linears", linears)):
        pruning.expect_config(what, c, optional=True)
        if c is not None and c.output != "dense":
            raise ValueError(f"calibrate_and_prune keeps the weights dense with zeros; pass "
                             f"{what}=PruneConfig(output='dense', ...) and convert with "
                             "to_compressed()")
    if linears is not None and model.config.linear.is_sparse:
        raise ValueError(f"the model's linears are already {model.config.linear.format!r}; "
                         "calibrate_and_prune prunes dense ones")
    if config is None and linears is None:
        raise ValueError("nothing to prune: config and linears are both None")
    if config is not None and model.config.moe.expert_format != "dense":
        raise ValueError(f"the model's experts are already {model.config.moe.expert_format!r}; "
                         "calibrate_and_prune prunes dense experts")
    windows = check_windows(model.config, windows)
    from samoyeds_jax.train import set_expert_implementation

    # The calibration forwards run the reference expert implementation: statistics need no
    # kernel, and Pallas kernels would compile again for every block and token count.
    previous = set_expert_implementation(model, "xla")
    try:
        return _walk(model, windows, config, linears, batch_size, progress)
    finally:
        set_expert_implementation(model, previous)


def _views(model: MoETransformer) -> Callable[[int], DecoderBlock]:
    """``view(i)``: block i as the jitted calibration functions see it. A block alike to
    block 0 (``scan.alike``: they differ only in their index, which none of these functions
    reads: each block is routed by its own gate) comes through block 0's graph, so those
    functions compile once for all such blocks instead of once per block (a pre-gated model's
    last block, which has no pre-gate, compiles on its own). The view shares block i's arrays
    as they are when it is made: make it after any pruning."""
    blocks = list(model.layers)
    graphdef = nnx.graphdef(blocks[0])
    shared = {i for i in range(1, len(blocks)) if alike(blocks[i], blocks[0])}

    def view(i: int) -> DecoderBlock:
        return nnx.merge(graphdef, nnx.state(blocks[i])) if i in shared else blocks[i]

    return view


class WindowWalk:
    """Token windows' hidden states, walked through the blocks in order: calibration windows
    prune each block on the outputs of the already-pruned blocks before it (``prune_block``);
    evaluation windows only move past each block (``advance``) and are scored after the last
    (``nats``). Holds one block's activations at a time, so a walk that gets each block only
    when it comes (``prune_checkpoint``'s) keeps one block's weights on the device."""

    def __init__(self, embed_tokens: nnx.Embed, config: ModelConfig, windows: np.ndarray,
                 batch_size: int):
        self.num_experts, self.batch_size = config.moe.num_experts, batch_size
        self.xs, self.pos_masks = [], []
        shared: dict[tuple[int, int], tuple[jax.Array, jax.Array]] = {}  # one per batch shape
        for start in range(0, len(windows), batch_size):
            tokens = jnp.asarray(windows[start:start + batch_size])
            b, t = tokens.shape  # full windows from an empty cache: positions 0..t-1, causal
            if (b, t) not in shared:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
                shared[b, t] = (positions, attention_mask(
                    jnp.ones((b, t), bool), jnp.zeros((), jnp.int32), t,
                    sliding_window=config.attention.sliding_window))
            self.xs.append(embed_tokens(tokens))
            self.pos_masks.append(shared[b, t])
        self.expert_tokens: list[tuple[int, ...]] = []

    def prune_block(self, block: DecoderBlock, view: Callable[[], DecoderBlock], i: int,
                    config: pruning.PruneConfig | None, linears: pruning.PruneConfig | None
                    ) -> tuple[prune_report.PruneReport | None, prune_report.PruneReport | None]:
        """Prune block i in place (``linears``: attention projections, then shared experts;
        ``config``: routed experts, appending their token counts to ``expert_tokens``) and
        move the hidden states past it. ``view()``: the block as the jitted functions see it
        (``_views``). Returns (experts' report, linears' report), None where not pruned."""
        xs, pos_masks = self.xs, self.pos_masks
        linear_report = None
        if linears is not None:
            linear_report = _prune_linears(block, view, i, linears, xs, pos_masks)
        seen = view()
        hs, x_moes = zip(*[_moe_input(seen, x, p, m) for x, (p, m) in zip(xs, pos_masks)])
        x_all = jnp.concatenate(x_moes)  # [n*t, d]
        if linears is not None and block.mlp.shared is not None:
            shared = _prune_shared(block, i, linears, x_all)
            linear_report = prune_report.PruneReport(
                config=linears, layers={**linear_report.layers, **shared.layers})
        report = None
        if config is not None:
            report = _prune_experts(block, i, config, x_all, self.num_experts,
                                    self.expert_tokens, view())
        seen = view()  # after the pruning
        self.xs = [_moe_output(seen, h, xm) for h, xm in zip(hs, x_moes)]
        return report, linear_report

    def advance(self, view: Callable[[], DecoderBlock]) -> None:
        """Move the hidden states past a block (``view()``), pruning nothing."""
        seen = view()
        self.xs = [_moe_output(seen, *_moe_input(seen, x, p, m))
                   for x, (p, m) in zip(self.xs, self.pos_masks)]

    def nats(self, norm: nnx.Module, head: nnx.Module, tied: bool, targets: np.ndarray,
             valid: np.ndarray) -> list[tuple[int, jax.Array]]:
        """After the last block: ``(first window, summed NLL of each window)`` per batch
        (``evaluate.scored`` takes them), the logits from the final ``norm`` and ``head`` (the
        output projection, or the embedding when ``tied``)."""
        starts = range(0, len(targets), self.batch_size)
        return [(lo, _head_nats(norm, head, tied, x, jnp.asarray(targets[lo:lo + len(x)]),
                                jnp.asarray(valid[lo:lo + len(x)])))
                for lo, x in zip(starts, self.xs)]


@functools.partial(nnx.jit, static_argnums=2)
def _head_nats(norm, head, tied: bool, x, targets, valid):
    h = norm(x)
    logits = (head.attend(h) if tied else head(h)).astype(jnp.float32)
    return evaluate.window_nats(logits, targets, valid)


def _walk(model: MoETransformer, windows: np.ndarray, config, linears, batch_size: int,
          progress: bool | None) -> CompressReport:
    """``calibrate_and_prune`` on checked arguments."""
    walk = WindowWalk(model.embed_tokens, model.config, windows, batch_size)
    reports, linear_reports = [], []
    named = config or linears
    bar = tqdm(list(enumerate(model.layers)), desc=f"pruning ({named.format}, {named.method})",
               unit="block", disable=None if progress is None else not progress)
    views = _views(model)
    for i, block in bar:
        report, linear_report = walk.prune_block(block, functools.partial(views, i), i, config,
                                                 linears)
        if report is not None:
            reports.append(report)
        if linear_report is not None:
            linear_reports.append(linear_report)
    return CompressReport(config=config, blocks=tuple(reports),
                          expert_tokens=tuple(walk.expert_tokens), linears=linears,
                          linear_blocks=tuple(linear_reports))


def _prune_experts(block: DecoderBlock, i: int, config: pruning.PruneConfig, x_all, e: int,
                   token_counts: list, seen: DecoderBlock) -> prune_report.PruneReport:
    """Prune block i's routed experts in place, each on the tokens its own gate routes to it
    (appends the counts to ``token_counts``; ``seen``: the block as the jitted functions see
    it)."""
    x_e, counts = routed_inputs(x_all, _topk(seen, x_all), e)
    mlp = block.mlp
    holders = {f"layers/{i}/{name}": getattr(mlp, name) for name in ("w1", "w3", "w2")}
    token_counts.append(tuple(counts))
    return _prune_params(holders, config, {f"layers/{i}": x_e})


class CheckpointPruning:
    """Calibrated pruning while ``hf_import.load_hf_checkpoint(..., pruner=)`` streams a
    checkpoint in, one block on the device at a time (``prune_checkpoint`` makes one).

    A dense twin of the model (nothing allocated; the reference expert implementation, each
    block routed by its own gate) gets block i's imported parameters; its experts are pruned
    in place on the calibration windows' hidden states there (``WindowWalk.prune_block``),
    stored in the format, and the twin lets go of the block again. With evaluation windows,
    their hidden states walk the dense block before the pruning and the pruned block after
    it, so the dense and the one-shot model are scored in the same pass."""

    def __init__(self, windows: np.ndarray, config: pruning.PruneConfig, *,
                 linears: pruning.PruneConfig | None = None, eval_windows: Any = None,
                 eval_batch_size: int = 8, batch_size: int = 8):
        self.windows, self.config, self.linears = windows, config, linears
        self.linear_reports: list[prune_report.PruneReport] = []
        self.eval_windows, self.eval_batch_size = eval_windows, eval_batch_size
        self.batch_size = batch_size
        self.reports: list[prune_report.PruneReport] = []
        self.results: dict[str, Any] = {}

    def configure(self, model_config: ModelConfig) -> ModelConfig:
        """The imported model's config: with ``linears``, its linears in their format."""
        if self.linears is None:
            return model_config
        return model_config.replace(linear=dict(format=self.linears.format,
                                                sparsity=sparsity_config(self.linears)))

    def start(self, model_config: ModelConfig, embedding: jax.Array) -> None:
        """Before block 0: the twin of ``model_config`` and the windows' embeddings."""
        from samoyeds_jax.param_layout import _abstract_model, _fill_non_params, _variables

        self.model_config = model_config.replace(
            moe=dict(expert_format="dense", implementation="xla", pregate="standard"),
            linear=dict(format="dense", implementation=None))
        self.twin = _abstract_model(self.model_config)
        self.variables = _variables(self.twin)
        _fill_non_params(self.variables)
        self.views = _views(self.twin)
        with self._filled({("embed_tokens", "embedding"): embedding}):
            embed = self.twin.embed_tokens
            self.calibration = WindowWalk(embed, self.model_config, self.windows,
                                           self.batch_size)
            self.walks = {}
            if self.eval_windows is not None:
                self.walks["dense"] = WindowWalk(embed, self.model_config,
                                                  self.eval_windows.inputs, self.eval_batch_size)
                self.walks["one-shot"] = copy.copy(self.walks["dense"])

    def __call__(self, i: int, params: Mapping[tuple, Any], experts: dict[str, jax.Array]
                 ) -> dict[tuple, Any]:
        """Block i's pruned weights stored in their formats, by parameter path: the experts
        (``("layers", i, "mlp", "w1")``...) and with ``linears`` the attention projections and
        shared experts. ``params``: the block's other parameters as imported (on the device),
        ``experts``: its dense w1/w3/w2."""
        values = {path: (experts[path[3]] if len(path) == 4 and path[2] == "mlp"
                         and path[3] in experts else params[path])
                  for path, var in self.variables.items()
                  if path[:2] == ("layers", i) and isinstance(var, nnx.Param)}
        with self._filled(values):  # the dense block leaves the device with this call
            view = functools.partial(self.views, i)
            if "dense" in self.walks:
                self.walks["dense"].advance(view)
            block = self.twin.layers[i]
            linears = None if self.linears is None else dataclasses.replace(self.linears,
                                                                             output="dense")
            report, linear_report = self.calibration.prune_block(
                block, view, i, dataclasses.replace(self.config, output="dense"), linears)
            self.reports.append(report)
            if "one-shot" in self.walks:
                self.walks["one-shot"].advance(view)
            out = {("layers", i, "mlp", name): pruning.convert(
                getattr(block.mlp, name).get_value(), self.config) for name in ("w1", "w3", "w2")}
            if linears is not None:
                self.linear_reports.append(linear_report)
                stored = dataclasses.replace(self.linears, output="compressed")
                holders = {("layers", i, "self_attn", name, "kernel"): lin.kernel
                           for name, lin in block.self_attn.projections().items()}
                if block.mlp.shared is not None:
                    holders.update({("layers", i, "mlp", "shared", name):
                                    getattr(block.mlp.shared, name) for name in ("w1", "w3", "w2")})
                out.update({path: pruning.convert(holder.get_value(), stored)
                            for path, holder in holders.items()})
            return out

    def finish(self, params: Mapping[tuple, Any]) -> None:
        """After the last block: the evaluation walks scored (``results``)."""
        if not self.walks:
            return
        tied = self.model_config.tie_word_embeddings
        head = ("embed_tokens", "embedding") if tied else ("lm_head", "kernel")
        with self._filled({("norm", "scale"): params[("norm", "scale")], head: params[head]}):
            w = self.eval_windows
            module = self.twin.embed_tokens if tied else self.twin.lm_head
            for name, walk in self.walks.items():
                self.results[name] = evaluate.scored(w, walk.nats(
                    self.twin.norm, module, tied, w.targets, w.valid))

    @contextlib.contextmanager
    def _filled(self, values: Mapping[tuple, Any]):
        """The twin's parameters ``values`` set, and back to their abstract values after."""
        abstract = {path: self.variables[path].get_value() for path in values}
        try:
            for path, value in values.items():
                self.variables[path].set_value(value)
            yield
        finally:
            for path, value in abstract.items():
                self.variables[path].set_value(value)


@dataclasses.dataclass(frozen=True)
class PrunedCheckpoint:
    """``prune_checkpoint``'s result: the model with its experts in the format, its config,
    the per-block pruning report, and with evaluation streams ``results["dense"]`` and
    ``results["one-shot"]`` (``evaluate.EvalResult``, the same windows)."""

    model: MoETransformer
    config: ModelConfig
    report: CompressReport
    results: dict[str, Any]


def prune_checkpoint(directory: str, windows: Any, config: pruning.PruneConfig, *,
                     linears: pruning.PruneConfig | None = None,
                     eval_streams: Mapping[str, Any] | None = None,
                     eval_config: Any = None, dtype: Any = None, pregate: str = "standard",
                     implementation: Any = None, experts_memory: str = "device",
                     batch_size: int = 8, progress: bool | None = None) -> PrunedCheckpoint:
    """Import a Hugging Face checkpoint with its experts pruned by ``config`` (magnitude,
    Wanda or SparseGPT; ``output="compressed"``) on calibration ``windows``, block by block as
    the blocks stream in: the whole dense model is never on the device, so a model too large
    for it in dense form is pruned with calibration on one GPU.

    Each block is pruned on the hidden states ``windows`` reach after the blocks before it,
    already pruned, each expert on the tokens its gate routes to it (as
    ``calibrate_and_prune``); with ``linears`` the attention projections and shared experts
    too, in the same walk (stored in ``linears.format``). With ``eval_streams`` (as
    ``evaluate.evaluate_streams`` takes
    them, cut by ``eval_config``), the dense and the pruned model are scored on the same
    windows in the same pass (``results``: compare them with ``evaluate.paired_difference``).
    ``dtype``, ``pregate``, ``implementation``, ``experts_memory``: as ``load_hf_checkpoint``;
    the calibration and evaluation forwards run in ``dtype`` with the reference expert
    implementation (statistics in float32), ``batch_size`` windows each.
    """
    from samoyeds_jax import hf_import

    pruning.expect_config("config", config)
    pruning.expect_config("linears", linears, optional=True)
    model_config = ModelConfig.from_hf(hf_import.read_hf_config(directory))
    windows = check_windows(model_config, windows)
    eval_config = eval_config or evaluate.EvalConfig()
    eval_windows = None if eval_streams is None else evaluate.checked_windows(
        eval_streams, eval_config, model_config.vocab_size)
    pruner = CheckpointPruning(windows, config, linears=linears, eval_windows=eval_windows,
                               eval_batch_size=eval_config.batch_size, batch_size=batch_size)
    model, model_config = hf_import.load_hf_checkpoint(
        directory, dtype=dtype, prune=config, implementation=implementation, pregate=pregate,
        progress=progress, experts_memory=experts_memory, pruner=pruner)
    report = CompressReport(config=config, blocks=tuple(pruner.reports),
                            expert_tokens=tuple(pruner.calibration.expert_tokens),
                            linears=linears, linear_blocks=tuple(pruner.linear_reports))
    return PrunedCheckpoint(model=model, config=model_config, report=report,
                            results=dict(pruner.results))


def sparsity_config(config: pruning.PruneConfig) -> SparsityConfig:
    """The ``MoEConfig.sparsity`` of a pruning config's pattern."""
    return SparsityConfig(n=config.n, m=config.m, n_sel=config.n_sel, m_sel=config.m_sel,
                          v=config.v, density=1.0 - config.sparsity)


def to_compressed(model: MoETransformer, config: pruning.PruneConfig | None, *,
                  linears: pruning.PruneConfig | None = None) -> None:
    """Store the pruned dense experts in ``config.format`` (None: experts left as they are)
    and, with ``linears``, the pruned attention projections and shared experts in
    ``linears.format``, in place (exact: no re-pruning; the format checks that each weight
    satisfies the pattern)."""
    pruning.expect_config("config", config, optional=True)
    pruning.expect_config("linears", linears, optional=True)
    if linears is not None:
        _linears_to_compressed(model, linears)
    if config is None:
        return
    stored = dataclasses.replace(config, output="compressed")
    sparsity = sparsity_config(config)
    for block in model.layers:
        mlp = block.mlp
        for name in ("w1", "w3", "w2"):
            w = getattr(mlp, name).get_value()
            if hasattr(w, "to_dense"):
                raise ValueError(f"experts are already stored as {type(w).__name__}")
            replace_value(mlp, name, pruning.convert(w, stored))
        mlp.config = mlp.config.replace(expert_format=config.format, sparsity=sparsity)
    model.config = model.config.replace(moe=dict(expert_format=config.format, sparsity=sparsity))


def _linears_to_compressed(model: MoETransformer, config: pruning.PruneConfig) -> None:
    stored = dataclasses.replace(config, output="compressed")
    linear = model.config.linear.replace(format=config.format, sparsity=sparsity_config(config))
    for block in model.layers:
        projections = list(block.self_attn.projections().values())
        holders = [(lin, "kernel") for lin in projections]
        if block.mlp.shared is not None:
            holders += [(block.mlp.shared, n) for n in ("w1", "w3", "w2")]
        for module, name in holders:
            w = getattr(module, name).get_value()
            if hasattr(w, "to_dense"):
                raise ValueError(f"linears are already stored as {type(w).__name__}")
            replace_value(module, name, pruning.convert(w, stored))
        for lin in projections:
            lin.config = linear
        if block.mlp.shared is not None:
            block.mlp.shared.linear = linear
    model.config = model.config.replace(linear=linear)


def recover(model: MoETransformer, tokens: np.ndarray, train_config, *,
            teacher: MoETransformer | None = None, val_tokens: np.ndarray | None = None,
            progress: bool | None = None):
    """Fine-tune a pruned model with its sparsity fixed (pruned weights stay exactly zero),
    distilling from ``teacher`` when ``train_config.distill_weight > 0``, in place; returns the
    ``train.TrainResult`` (its ``model`` is ``model``, recovered)."""
    from samoyeds_jax import train as train_lib
    from samoyeds_jax.train_optim import sparsity_masks

    params = nnx.state(model, nnx.Param)
    masks = sparsity_masks(params)
    return train_lib.train(model, tokens, train_config, val_tokens=val_tokens, teacher=teacher,
                           masks=masks, progress=progress)


def copy_model(model: MoETransformer) -> MoETransformer:
    """An independent copy (parameters copied, not shared)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))

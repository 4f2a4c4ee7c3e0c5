"""Pre-gate training: fit block i's pre-gate to block i+1's gate by distillation.

Pre-gated MoE (ISCA'24) lets block i's pre-gate, applied to block i's input ``x_i``, choose
block i+1's experts, so those experts can be fetched while block i computes. A pretrained
model has no pre-gates; here each one is fit to the next block's own gate:

    minimize  KL( softmax(x_{i+1} @ G_{i+1}) || softmax(x_i @ P_i) )      (loss="kl")

over hidden states collected from the unchanged model: mode ``"speculative"``, where each
block's own gate decides and the pre-gates exist (train, then switch to ``"pregated"``). ``loss="topk"`` instead puts the target mass uniformly
on the next gate's top-k experts (what prefetching needs to get right). ``P_i`` starts from
``G_{i+1}`` (``init="next_gate"``, the speculative mode's starting point) or at random.

Typical use::

    moes = moe_blocks(model)                                   # sorted by block_index
    init_pregates_from_next_gates(moes)
    inputs = collect_moe_inputs(model, lambda m, b: m(b), batches)  # [n, d] per block
    report = train_pregates(moes, inputs, PregateTrainConfig(steps=300))
    print(report.table())                                      # top-k recall before/after
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pallas_kernels.checks import expect_ints, expect_number, expect_positive_ints
from samoyeds_jax.moe import MoE
from samoyeds_jax.routing import recall_counts, route_logits

DistillLoss = Literal["kl", "topk"]
PregateInit = Literal["keep", "next_gate", "random"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PregateTrainConfig:
    """How pre-gates are fit.

    Attributes:
      steps: optimizer steps per pre-gate.
      batch_size: tokens per step (sampled with replacement from the training split).
      learning_rate, weight_decay: AdamW.
      loss: ``"kl"`` (match the next gate's full distribution) or ``"topk"`` (cross-entropy
        toward a uniform target on the next gate's top-k experts).
      temperature: softens both distributions for ``"kl"``.
      init: ``"keep"`` (current pre-gate params), ``"next_gate"`` (copy of block i+1's gate),
        ``"random"`` (re-drawn, fan-in scaled).
      eval_fraction: last share of the tokens held out for the before/after recall.
      keep_best: keep the trained pre-gate only if its top-k recall on a validation split
        (the ``eval_fraction`` share just before the held-out tokens, not trained on) is at
        least the starting one; otherwise restore the starting pre-gate.
      seed: sampling and ``"random"`` init.
    """

    steps: int = 300
    batch_size: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    loss: DistillLoss = "kl"
    temperature: float = 1.0
    init: PregateInit = "keep"
    eval_fraction: float = 0.2
    keep_best: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        expect_ints("PregateTrainConfig", 0, steps=self.steps)
        expect_positive_ints("PregateTrainConfig", batch_size=self.batch_size)
        for name in ("learning_rate", "temperature"):
            expect_number("PregateTrainConfig", name, getattr(self, name), above=0)
        expect_number("PregateTrainConfig", "weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"PregateTrainConfig: weight_decay must be >= 0, got "
                             f"{self.weight_decay!r}")
        if self.loss not in ("kl", "topk"):
            raise ValueError(f"loss must be 'kl' or 'topk', got {self.loss!r}")
        if self.init not in ("keep", "next_gate", "random"):
            raise ValueError(f"init must be 'keep', 'next_gate' or 'random', got {self.init!r}")
        expect_number("PregateTrainConfig", "eval_fraction", self.eval_fraction)
        if not 0.0 < self.eval_fraction < 0.5:
            raise ValueError(f"eval_fraction must be in (0, 0.5), got {self.eval_fraction}")


# ----------------------------------------------------------------------------- model plumbing


def moe_blocks(model: nnx.Module) -> list[MoE]:
    """Every ``MoE`` inside ``model`` (or ``model`` itself), sorted by ``block_index``."""
    found = [m for _, m in nnx.iter_modules(model) if isinstance(m, MoE)]
    if not found:
        raise ValueError(f"no MoE module found in {type(model).__name__}")
    found.sort(key=lambda m: m.block_index)
    idx = [m.block_index for m in found]
    if idx != list(range(len(found))):
        raise ValueError(f"MoE block indices must be 0..{len(found) - 1}, got {idx}")
    return found


def init_pregates_from_next_gates(moes: Sequence[MoE]) -> None:
    """Copy block i+1's gate into block i's pre-gate for every block that has one."""
    for i, m in enumerate(moes[:-1]):
        if m.pregate is not None:
            m.pregate.load_from(moes[i + 1].gate)


def collect_moe_inputs(model: nnx.Module, forward: Callable[[nnx.Module, Any], Any],
                       batches: Iterable[Any]) -> list[np.ndarray]:
    """Run ``forward(model, batch)`` over ``batches`` and return each MoE block's inputs.

    Returns one host array [n, d] per block (all batches' tokens, flattened, in the model's
    activation dtype: n * d * itemsize bytes per block, so collect a few thousand tokens of a
    large model rather than a whole corpus), in block
    order. The model should route with its own gates (mode "standard" or "speculative"),
    so the inputs are those of the model the pre-gates must imitate. Pre-gates in a
    "pregated" model would change those inputs: collect in "speculative" mode. ``forward`` is wrapped
    in ``nnx.capture`` and ``nnx.jit`` here (one compile per batch shape).
    """
    moes = moe_blocks(model)
    module_paths = {tuple(p): m.block_index for p, m in nnx.iter_modules(model)
                    if isinstance(m, MoE)}
    per_block: list[list[np.ndarray]] = [[] for _ in moes]
    capture = nnx.jit(nnx.capture(forward, nnx.Intermediate))
    for m in moes:
        m.capture_inputs = True
    try:
        for batch in batches:
            _, captured = capture(model, batch)
            seen = set()
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(captured)[0]:
                keys = tuple(_key_name(k) for k in key_path)
                if "inputs" not in keys:
                    continue
                pos = len(keys) - 1 - keys[::-1].index("inputs")
                block = module_paths.get(keys[:pos])
                if block is not None:
                    per_block[block].append(np.asarray(leaf))
                    seen.add(block)
            missing = sorted(set(range(len(moes))) - seen)
            if missing:
                raise ValueError(f"MoE blocks {missing} recorded no input: does forward call them?")
    finally:
        for m in moes:
            m.capture_inputs = False
    return [np.concatenate(xs, axis=0) for xs in per_block]


def _key_name(key) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


# ----------------------------------------------------------------------------- training


def _distill_loss(pred_logits, target_logits, *, loss: DistillLoss, top_k: int,
                  temperature: float) -> jax.Array:
    """Mean over tokens; logits [n, e] float32."""
    logp = jax.nn.log_softmax(pred_logits / temperature, axis=-1)
    if loss == "kl":
        target = jax.nn.softmax(target_logits / temperature, axis=-1)
        per = jnp.sum(target * (jnp.log(jnp.maximum(target, 1e-30)) - logp), axis=-1)
    else:
        _, idx = jax.lax.top_k(target_logits, top_k)
        target = jnp.sum(jax.nn.one_hot(idx, target_logits.shape[-1]), axis=-2) / top_k
        per = -jnp.sum(target * logp, axis=-1)
    return jnp.mean(per) * (temperature * temperature if loss == "kl" else 1.0)


@functools.partial(jax.jit, static_argnames=("steps", "batch_size", "learning_rate",
                                             "weight_decay", "loss", "top_k", "temperature"))
def fit_linear_gate(kernel: jax.Array, x: jax.Array, target_logits: jax.Array, key: jax.Array,
                    *, steps: int, batch_size: int, learning_rate: float, weight_decay: float,
                    loss: DistillLoss, top_k: int, temperature: float
                    ) -> tuple[jax.Array, jax.Array]:
    """Fit a gate kernel [d, e] so that ``x @ kernel`` imitates ``target_logits``.

    x [n, d] (inputs of the pre-gate's block), target_logits [n, e] float32 (the next
    block's gate on the same tokens). Returns (kernel [d, e] in kernel's dtype, losses [steps]).
    """
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    w = kernel.astype(jnp.float32)
    x = x.astype(jnp.float32)
    n = x.shape[0]

    def objective(w, xb, tb):
        pred = jnp.dot(xb, w, precision=jax.lax.Precision.HIGHEST)
        return _distill_loss(pred, tb, loss=loss, top_k=top_k, temperature=temperature)

    def step(carry, key):
        w, state = carry
        rows = jax.random.randint(key, (batch_size,), 0, n)
        value, grad = jax.value_and_grad(objective)(w, x[rows], target_logits[rows])
        updates, state = opt.update(grad, state, w)
        return (optax.apply_updates(w, updates), state), value

    (w, _), losses = jax.lax.scan(step, (w, opt.init(w)), jax.random.split(key, steps))
    return w.astype(kernel.dtype), losses


@dataclasses.dataclass(frozen=True)
class BlockPregateReport:
    """Held-out pre-gate quality of one block i (predicting block i+1), before and after."""

    block: int
    before: dict[str, float]
    after: dict[str, float]
    final_loss: float
    kept: bool = True


@dataclasses.dataclass(frozen=True)
class PregateReport:
    blocks: list[BlockPregateReport]

    def as_dict(self) -> dict[str, Any]:
        return {"blocks": [dataclasses.asdict(b) for b in self.blocks]}

    def table(self) -> str:
        """One line per block: top-k recall / precision / weight recall, before -> after."""
        lines = [f"{'block':>5} {'recall':>17} {'set_recall':>17} {'weight_recall':>17} "
                 f"{'loss':>8} {'kept':>5}"]
        for b in self.blocks:
            cell = lambda key: f"{b.before[key]:.3f} -> {b.after[key]:.3f}"  # noqa: E731
            lines.append(f"{b.block:>5} {cell('recall'):>17} {cell('set_recall'):>17} "
                         f"{cell('weight_recall'):>17} {b.final_loss:>8.4f} {str(b.kept):>5}")
        return "\n".join(lines)


def pregate_recall(moes: Sequence[MoE], inputs: Sequence[np.ndarray | jax.Array]
                   ) -> list[dict[str, float]]:
    """Recall/precision of each pre-gate (block i) against block i+1's own gate.

    ``inputs[i]`` is block i's input [n, d] on the same n tokens for every block. One dict per
    block with a pre-gate (``routing.RecallCounts.ratios`` keys plus ``"block"``).
    """
    _check_inputs(moes, inputs)
    out = []
    for i, m in enumerate(moes[:-1]):
        if m.pregate is None:
            continue
        nxt = moes[i + 1]
        pred = m.pregate(jnp.asarray(inputs[i]))
        actual = nxt.gate(jnp.asarray(inputs[i + 1]))
        out.append(dict(block=i, **recall_counts(pred, actual, nxt.config.num_experts).ratios()))
    return out


def _check_inputs(moes: Sequence[MoE], inputs: Sequence[Any]) -> None:
    if len(inputs) != len(moes):
        raise ValueError(f"need one input array per MoE block: {len(moes)} blocks, {len(inputs)} inputs")
    n = {np.shape(x)[0] for x in inputs}
    if len(n) != 1:
        raise ValueError(f"every block's inputs must cover the same tokens, got counts {sorted(n)}")
    for i, (m, x) in enumerate(zip(moes, inputs)):
        if np.ndim(x) != 2 or np.shape(x)[1] != m.config.d_model:
            raise ValueError(f"inputs[{i}] must be [n, d_model={m.config.d_model}], got {np.shape(x)}")


def train_pregates(moes: Sequence[MoE], inputs: Sequence[np.ndarray | jax.Array],
                   config: PregateTrainConfig = PregateTrainConfig()) -> PregateReport:
    """Fit every pre-gate (block i) to block i+1's gate; updates the modules in place.

    ``inputs[i]``: block i's inputs [n, d] (``collect_moe_inputs``). Tokens are split in
    order into train | validation | held-out test (the last two ``eval_fraction`` each); the
    report gives held-out recall before and after training for each block.
    """
    _check_inputs(moes, inputs)
    n = np.shape(inputs[0])[0]
    n_eval = max(1, int(round(n * config.eval_fraction)))
    n_train = n - 2 * n_eval  # [train | validation | held-out test]
    if n_train < 1:
        raise ValueError(f"need at least 3 tokens to train, validate and evaluate, got {n}")
    test = slice(n - n_eval, n)
    val = slice(n_train, n - n_eval)
    key = jax.random.key(config.seed)
    reports = []
    for i, m in enumerate(moes[:-1]):
        if m.pregate is None:
            continue
        nxt = moes[i + 1]
        x_i, x_next = jnp.asarray(inputs[i]), jnp.asarray(inputs[i + 1])
        key, k_init, k_fit = jax.random.split(key, 3)
        if config.init == "next_gate":
            m.pregate.load_from(nxt.gate)
        elif config.init == "random":
            old = m.pregate.kernel[...]
            m.pregate.kernel[...] = jax.nn.initializers.lecun_normal()(k_init, old.shape, old.dtype)
        target = nxt.gate.logits(x_next)  # [n, e] float32

        def recall_on(rows: slice) -> dict[str, float]:
            pred = m.pregate(x_i[rows])
            actual = route_logits(target[rows], top_k=nxt.config.top_k,
                                  norm=nxt.config.router_norm)
            return recall_counts(pred, actual, nxt.config.num_experts).ratios()

        start = m.pregate.kernel[...]
        before, val_before = recall_on(test), recall_on(val)
        kernel, losses = fit_linear_gate(
            start, x_i[:n_train], target[:n_train], k_fit,
            steps=config.steps, batch_size=config.batch_size,
            learning_rate=config.learning_rate, weight_decay=config.weight_decay,
            loss=config.loss, top_k=nxt.config.top_k, temperature=config.temperature)
        m.pregate.kernel[...] = kernel
        kept = not config.keep_best or recall_on(val)["recall"] >= val_before["recall"]
        if not kept:
            m.pregate.kernel[...] = start
        final = float(losses[-1]) if config.steps else float("nan")
        reports.append(BlockPregateReport(block=i, before=before, after=recall_on(test),
                                          final_loss=final, kept=kept))
    return PregateReport(reports)

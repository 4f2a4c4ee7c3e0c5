"""Training and sparse recovery of ``MoETransformer`` models (optax, one jit-compiled step).

The loss of one step on token windows ``[b, t + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``):

    loss = (1 - w) * CE(student) + w * T^2 * KL(teacher_T || student_T)     (w = distill_weight)
         + aux_loss_coef * mean_l LB_l + z_loss_coef * mean_l Z_l
         + pregate_coef * mean_l KL(softmax(gate_{l+1}) || softmax(pregate_l))
         + gate_agreement_coef * mean_l KL(softmax(pregate_l) || softmax(gate_{l+1}))

CE is the next-token cross-entropy, LB the Switch / Mixtral load-balancing loss of each block's
own gate (``routing.load_balancing_loss``), Z the router z-loss, the teacher a frozen model with
the same vocabulary (knowledge distillation for recovery after pruning), and the last term fits
each pre-gate to the next block's gate jointly with the rest (the target is not differentiated).
The last term pulls the other way: each block's own gate toward what the previous block's
pre-gate predicts (the pre-gate not differentiated), so a model learns a routing that can be
foreseen one block early (higher pre-gate recall; its cost shows in the validation loss).

* Parameters are kept in float32 (``param_dtype``); ``dtype="bfloat16"`` computes in bfloat16.
* Gradient accumulation: a step's ``batch_size`` windows run as ``grad_accum`` micro-batches
  (``lax.scan``), one optimizer update.
* ``masks`` fix a sparsity pattern: pruned entries get no gradient and stay exactly zero, so a
  recovered model converts to a compressed format without pruning again.
* Checkpoints are Hugging Face directories (``samoyeds_jax.hf_export.save_hf_checkpoint``: f32
  ``model.safetensors`` + ``config.json``) plus ``train_state.safetensors`` (optimizer state) and
  ``trainer_state.json`` (step, history), written atomically: a crash leaves the previous
  checkpoint or the new one. ``resume=True`` continues from ``out_dir/last``; a NaN/Inf loss stops
  with an error naming the step, before anything is written.
* Expert compute: ``expert_compute="auto"`` runs every expert on every token (``"all_experts"``,
  plain einsums) on a CPU, where ``ragged_dot`` is several times slower, and XLA's grouped matmul
  (``"xla"``) elsewhere; both give the same loss and gradients.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from pallas_kernels.checks import expect_ints, expect_kind, expect_number, expect_positive_ints
from samoyeds_jax.model import ModelConfig, MoETransformer
from samoyeds_jax.train_data import check_tokens, eval_windows, sample_windows
from samoyeds_jax.trainer import Trainer

ExpertCompute = Literal["auto", "xla", "all_experts"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LAST = "last"
TRAIN_STATE = "train_state.safetensors"
TRAINER_STATE = "trainer_state.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training (or recovery) run.

    Attributes:
      steps: optimizer steps in total (a resumed run continues up to it).
      batch_size: windows per step; seq_len: predicted tokens per window.
      grad_accum: micro-batches per step (``batch_size`` must divide evenly).
      learning_rate: peak AdamW rate after ``warmup_steps`` linear warmup, then cosine decay to
        ``min_lr_ratio`` times it. weight_decay: AdamW (not applied to norms and biases).
      grad_clip: global gradient-norm clip (0 = off).
      aux_loss_coef, z_loss_coef: load-balancing and router z-loss weights.
      distill_weight, distill_temperature: weight of the KL to a teacher (needs ``teacher``).
      pregate_coef: weight of the pre-gate distillation term (models with pre-gates).
      gate_agreement_coef: weight of the term fitting each gate to the previous pre-gate.
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      expert_compute: see the module doc.
      eval_every: steps between validation losses (0 = only at the end); eval_windows: how many.
      checkpoint_every: steps between checkpoints in ``out_dir/last`` (0 = only at the end).
      seed: data order and initialization.
    """

    steps: int
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    pregate_coef: float = 0.0
    gate_agreement_coef: float = 0.0
    dtype: str = "float32"
    expert_compute: ExpertCompute = "auto"
    eval_every: int = 0
    eval_windows: int = 64
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self):
        fields = dataclasses.asdict(self)
        expect_positive_ints("TrainConfig", **{name: fields[name] for name in (
            "steps", "batch_size", "seq_len", "grad_accum", "eval_windows")})
        expect_ints("TrainConfig", 0, **{name: fields[name] for name in (
            "warmup_steps", "eval_every", "checkpoint_every")})
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of "
                             f"grad_accum={self.grad_accum}")
        for name in ("learning_rate", "distill_temperature"):
            expect_number("TrainConfig", name, fields[name], above=0)
        for name in ("weight_decay", "grad_clip", "aux_loss_coef", "z_loss_coef", "pregate_coef",
                     "gate_agreement_coef", "min_lr_ratio", "distill_weight"):
            expect_number("TrainConfig", name, fields[name])
            if fields[name] < 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {fields[name]!r}")
        for name in ("distill_weight", "min_lr_ratio"):
            if not 0.0 <= fields[name] <= 1.0:
                raise ValueError(f"TrainConfig: {name} must be in [0, 1], got {fields[name]!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.expert_compute not in ("auto", "xla", "all_experts"):
            raise ValueError("expert_compute must be 'auto', 'xla' or 'all_experts', got "
                             f"{self.expert_compute!r}")


def expert_implementation(expert_compute: ExpertCompute, platform: str | None = None) -> str:
    """The ``MoEConfig.implementation`` that trains fastest (and has gradients):
    ``"all_experts"`` on a CPU, else ``"xla"``."""
    if expert_compute != "auto":
        return expert_compute
    platform = platform or jax.default_backend()
    return "all_experts" if platform == "cpu" else "xla"


def set_expert_implementation(model: MoETransformer, implementation: Any) -> Any:
    """Switch every MoE layer of ``model`` to ``implementation`` in place; returns the previous
    one."""
    previous = model.config.moe.implementation
    for block in model.layers:
        block.mlp.config = block.mlp.config.replace(implementation=implementation)
    model.config = model.config.replace(moe=dict(implementation=implementation))
    return previous


def _set_track_recall(model: MoETransformer, flags: list[bool]) -> None:
    for block, flag in zip(model.layers, flags):
        block.mlp.track_recall = flag


def training_config(config: ModelConfig, train: TrainConfig) -> ModelConfig:
    """``config`` as trained: float32 parameters, ``train.dtype`` compute, dense experts, the
    expert implementation of ``train.expert_compute``."""
    if config.moe.expert_format != "dense":
        raise ValueError("training runs on dense experts (sparse ones as dense arrays with a "
                         f"mask); got expert_format={config.moe.expert_format!r}")
    return config.replace(dtype=_DTYPES[train.dtype], param_dtype=jnp.float32,
                          moe=dict(implementation=expert_implementation(train.expert_compute)))


# ----------------------------------------------------------------------------- training runs


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the trained model (the one passed in, trained in place) and its
    history (one entry per logged step)."""

    model: MoETransformer
    history: list[dict[str, float]]
    step: int


def save_checkpoint(trainer: Trainer, directory: str, *, step: int,
                    history: list[dict[str, float]], tokenizer: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> None:
    """A Hugging Face directory (f32 weights) + optimizer and trainer state, written atomically."""
    from safetensors.numpy import save as save_bytes

    from samoyeds_jax.hf_export import save_hf_checkpoint

    state = {"step": step, "train_config": dataclasses.asdict(trainer.train),
             "history": history, **(extra or {})}
    save_hf_checkpoint(trainer.model, directory, dtype="float32", tokenizer=tokenizer,
                       extra_files={TRAIN_STATE: save_bytes(trainer.state_dict()),
                                    TRAINER_STATE: json.dumps(state, indent=1)})


def load_trainer_state(trainer: Trainer, directory: str) -> dict[str, Any]:
    """Load the optimizer state of a checkpoint into ``trainer``; returns trainer_state.json."""
    from safetensors.numpy import load_file

    path = os.path.join(directory, TRAINER_STATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a training checkpoint: no {TRAINER_STATE}")
    try:
        with open(path) as f:
            state = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    trainer.load_state_dict(load_file(os.path.join(directory, TRAIN_STATE)),
                            os.path.join(directory, TRAIN_STATE))
    return state


def _is_finite(losses: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in losses.values())


def train(model: MoETransformer, tokens: np.ndarray, train_config: TrainConfig, *,
          val_tokens: np.ndarray | None = None, out_dir: str | None = None,
          resume: bool = False, teacher: MoETransformer | None = None, masks: Any = None,
          tokenizer: str | None = None, progress: bool | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model`` (built with ``training_config``) on the token stream ``tokens`` [n].

    ``model`` is trained in place (the Flax NNX convention): its parameters are updated to the
    trained ones after every step, and ``TrainResult.model`` is ``model`` itself. Each step
    donates the previous parameters to the update, so the run holds one copy of them; do not
    keep arrays read from ``model`` before the call (they are deleted). If the run stops with an
    error, ``model`` holds the parameters of the last step run.

    Args:
      val_tokens: validation stream; its mean cross-entropy is logged every ``eval_every``
        steps and at the end (``val_ce``, nats/token).
      out_dir: checkpoints go to ``out_dir/last`` (every ``checkpoint_every`` steps and at the
        end); None: nothing written. Must be a directory (or not exist yet).
      resume: continue from ``out_dir/last`` when it exists (same ``TrainConfig`` required;
        needs ``out_dir``).
      teacher, masks: distillation teacher and fixed sparsity masks (``sparsity_masks``).
      tokenizer: path of a ``tokenizer.json`` copied into every checkpoint.
      on_step: called with ``(step, losses)`` after every step.
    Returns:
      ``TrainResult`` with the trained model (``model``) and the history.
    Raises:
      TypeError: ``model``/``teacher`` not a ``MoETransformer``, ``train_config`` not a
        ``TrainConfig``.
      ValueError: bad tokens, a non-finite loss (names the step; no checkpoint is written after
        it, so ``out_dir/last`` keeps the last good one), a resumed run with another config,
        ``resume`` without ``out_dir``, an ``out_dir`` that is not a directory.
    """
    expect_kind("model", model, MoETransformer, "a MoETransformer")
    expect_kind("train_config", train_config, TrainConfig, "a TrainConfig")
    if teacher is not None:
        expect_kind("teacher", teacher, MoETransformer, "a MoETransformer (or None)")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (the run continues from out_dir/last); got "
                         "out_dir=None")
    if out_dir is not None and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} exists and is not a directory (checkpoints go to "
                         f"out_dir/{LAST})")
    cfg = model.config
    tokens = check_tokens(tokens, cfg.vocab_size, "training tokens")
    if val_tokens is not None:
        val_tokens = check_tokens(val_tokens, cfg.vocab_size, "validation tokens")
    if cfg.moe.expert_format != "dense":
        raise ValueError(f"training needs dense experts (a pruned model as dense arrays with "
                         f"zeros and masks); got expert_format={cfg.moe.expert_format!r}")
    # The training step uses the fastest expert compute; the model gets its own back after.
    fast = expert_implementation(train_config.expert_compute)
    implementation = set_expert_implementation(model, fast)
    teacher_implementation = None if teacher is None else set_expert_implementation(teacher, fast)
    tracking = [block.mlp.track_recall for block in model.layers]
    _set_track_recall(model, [False] * len(tracking))  # no recall counters inside the step
    teacher_tracking = None if teacher is None else [b.mlp.track_recall for b in teacher.layers]
    if teacher is not None:
        _set_track_recall(teacher, [False] * len(teacher_tracking))
    try:
        trainer = Trainer(model, train_config, teacher=teacher, masks=masks)
        history: list[dict[str, float]] = []
        start = 0
        last = None if out_dir is None else os.path.join(out_dir, LAST)
        if resume and last is not None and os.path.isfile(os.path.join(last, TRAINER_STATE)):
            from samoyeds_jax.hf_import import load_hf_checkpoint

            loaded, _ = load_hf_checkpoint(last, dtype="float32",
                                           pregate=cfg.moe.pregate)
            _, loaded_params, _ = nnx.split(loaded, nnx.Param, ...)
            trainer.params = jax.tree.map(lambda a, b: jnp.asarray(b, a.dtype), trainer.params,
                                          loaded_params)
            state = load_trainer_state(trainer, last)
            if state["train_config"] != dataclasses.asdict(train_config):
                raise ValueError(f"{last} was written by another TrainConfig; resume with the same "
                                 f"one or another out_dir (stored: {state['train_config']})")
            start, history = int(state["step"]), list(state["history"])
        nnx.update(model, trainer.params)  # the model holds the trainer's arrays: one copy
        val = None if val_tokens is None else eval_windows(
            val_tokens, count=train_config.eval_windows, length=train_config.seq_len + 1)

        def checkpoint(step):
            if last is not None:
                save_checkpoint(trainer, last, step=step, history=history, tokenizer=tokenizer)

        bar = tqdm(range(start, train_config.steps), initial=start, total=train_config.steps,
                   desc="training", unit="step", disable=None if progress is None else not progress)
        for step in bar:
            windows = sample_windows(tokens, batch=train_config.batch_size,
                                     length=train_config.seq_len + 1, seed=train_config.seed, step=step)
            losses = trainer.step(windows)
            nnx.update(model, trainer.params)  # the step donated (deleted) the previous ones
            if not _is_finite(losses):
                bar.close()
                raise ValueError(f"non-finite loss at step {step + 1}: {losses}; the last good "
                                 f"checkpoint ({last or 'none written'}) is kept")
            done = step + 1
            entry = {"step": done, **losses}
            at_end = done == train_config.steps
            if val is not None and (at_end or (train_config.eval_every
                                               and done % train_config.eval_every == 0)):
                entry["val_ce"] = trainer.evaluate(val)
            history.append(entry)
            bar.set_postfix(loss=f"{losses['ce']:.3f}",
                            **({"val": f"{entry['val_ce']:.3f}"} if "val_ce" in entry else {}))
            if at_end or (train_config.checkpoint_every and done % train_config.checkpoint_every == 0):
                checkpoint(done)
            if on_step is not None:
                on_step(done, entry)
    finally:  # the caller's models get their own expert compute and counters back
        set_expert_implementation(model, implementation)
        _set_track_recall(model, tracking)
        if teacher is not None:
            set_expert_implementation(teacher, teacher_implementation)
            _set_track_recall(teacher, teacher_tracking)
    return TrainResult(model=model, history=history, step=train_config.steps)


def new_model(config: ModelConfig, train_config: TrainConfig) -> MoETransformer:
    """A freshly initialized model for ``train`` (``training_config`` applied)."""
    return MoETransformer(training_config(config, train_config), rngs=nnx.Rngs(train_config.seed))

"""``Trainer``: the split model state, the optimizer state and the jit-compiled step (gradient
accumulation, masks, distillation teacher) that ``samoyeds_jax.train.train`` drives."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from samoyeds_jax.model import MoETransformer
from samoyeds_jax.train_losses import _losses, cross_entropy
from samoyeds_jax.train_optim import _apply_masks, make_optimizer

if TYPE_CHECKING:
    from samoyeds_jax.train import TrainConfig


def _teacher_logits(teacher_graphdef, teacher_state, windows):
    logits, _ = nnx.merge(teacher_graphdef, teacher_state)(windows[:, :-1])
    return jax.lax.stop_gradient(logits)


# Module-level and keyed on static (hashable) graph definitions and config, so every Trainer of
# the same model shape and TrainConfig in a process shares one compiled step.
@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "train"),
                   donate_argnums=(0, 1))
def _update(params, opt_state, rest, windows, teacher_state, masks, *, graphdef,
            teacher_graphdef, train: TrainConfig):
    micro = windows.reshape(train.grad_accum, -1, windows.shape[-1])

    def micro_grads(carry, w):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, rest)
            t_logits = (None if teacher_state is None
                        else _teacher_logits(teacher_graphdef, teacher_state, w))
            return _losses(model, w, train, t_logits)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        acc_g, acc_l = carry
        acc_g = jax.tree.map(jnp.add, acc_g, grads)
        acc_l = jax.tree.map(jnp.add, acc_l, {"loss": loss, **parts})
        return (acc_g, acc_l), None

    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_l = {k: jnp.zeros((), jnp.float32) for k in
               ("loss", "ce", "load_balance", "z_loss", "pregate_kl", "gate_agreement", "distill")}
    (grads, losses), _ = jax.lax.scan(micro_grads, (zeros_g, zeros_l), micro)
    scale = 1.0 / train.grad_accum
    grads = jax.tree.map(lambda g: g * scale, grads)
    losses = jax.tree.map(lambda l: l * scale, losses)
    if masks is not None:
        grads = _apply_masks(grads, masks)
    losses["grad_norm"] = optax.tree.norm(grads)
    optimizer = make_optimizer(train, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if masks is not None:
        params = _apply_masks(params, masks)
    return params, opt_state, losses


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_loss(params, rest, windows, *, graphdef):
    logits, _ = nnx.merge(graphdef, params, rest)(windows[:, :-1])
    return cross_entropy(logits, windows[:, 1:])


class Trainer:
    """Owns the split model state, the optimizer and the compiled step.

    ``Trainer(model, train, teacher=None, masks=None)``; ``step(windows)`` runs one update and
    returns the float losses; ``evaluate(windows)`` the mean validation cross-entropy.
    """

    def __init__(self, model: MoETransformer, train: TrainConfig, *,
                 teacher: MoETransformer | None = None, masks: Any = None):
        if train.distill_weight > 0 and teacher is None:
            raise ValueError("distill_weight > 0 needs a teacher model")
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"teacher vocab_size={teacher.config.vocab_size} != student "
                             f"vocab_size={model.config.vocab_size}")
        if train.distill_weight == 0:
            teacher = None  # no distillation term: skip the teacher's forward
        self.train = train
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.masks = masks
        if masks is not None:
            self.params = _apply_masks(self.params, masks)
        # The step rebuilds the same optimizer from ``train`` (a static jit argument).
        self.opt_state = make_optimizer(train, self.params).init(self.params)
        self.teacher_graphdef, self.teacher_state = (None, None) if teacher is None else (
            nnx.split(teacher))

    @property
    def model(self) -> MoETransformer:
        return nnx.merge(self.graphdef, self.params, self.rest)

    def step(self, windows: np.ndarray) -> dict[str, float]:
        """One optimizer step on ``windows`` [batch_size, seq_len + 1]; float losses."""
        self.params, self.opt_state, losses = _update(
            self.params, self.opt_state, self.rest, jnp.asarray(windows), self.teacher_state,
            self.masks, graphdef=self.graphdef, teacher_graphdef=self.teacher_graphdef,
            train=self.train)
        return {k: float(v) for k, v in losses.items()}

    def evaluate(self, windows: np.ndarray, *, batch: int = 16) -> float:
        """Mean cross-entropy (nats/token) over ``windows`` [n, seq_len + 1]."""
        losses = [float(_eval_loss(self.params, self.rest, jnp.asarray(windows[i:i + batch]),
                                   graphdef=self.graphdef))
                  for i in range(0, len(windows), batch)]
        sizes = [len(windows[i:i + batch]) for i in range(0, len(windows), batch)]
        return float(np.average(losses, weights=sizes))

    # -- checkpoints

    def state_dict(self) -> dict[str, np.ndarray]:
        """Optimizer state as flat named host arrays (safetensors-ready)."""
        leaves = jax.tree_util.tree_flatten_with_path(self.opt_state)[0]
        return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}

    def load_state_dict(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(self.opt_state)
        out = []
        for path, ref in leaves:
            key = jax.tree_util.keystr(path)
            if key not in arrays:
                raise ValueError(f"{source}: optimizer state {key!r} is missing")
            value = arrays[key]
            if tuple(value.shape) != tuple(np.shape(ref)):
                raise ValueError(f"{source}: optimizer state {key!r} has shape {value.shape}, "
                                 f"expected {np.shape(ref)}")
            out.append(jnp.asarray(value, dtype=jnp.asarray(ref).dtype))
        self.opt_state = jax.tree_util.tree_unflatten(treedef, out)

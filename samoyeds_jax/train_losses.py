"""The training losses of ``samoyeds_jax.train`` (its module doc gives the formula): next-token
cross-entropy, distillation KL, the router terms, and their weighted sum for one step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from samoyeds_jax.model import MoETransformer
from samoyeds_jax.routing import load_balancing_loss, route_logits, router_z_loss

if TYPE_CHECKING:
    from samoyeds_jax.train import TrainConfig


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats: logits [b, t, v] float32, targets [b, t] int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def distill_kl(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """Mean over positions of ``T^2 KL(softmax(teacher/T) || softmax(student/T))`` (nats)."""
    t = jax.nn.log_softmax(teacher.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return temperature ** 2 * jnp.mean(kl)


def router_losses(model: MoETransformer, router_logits) -> dict[str, jax.Array]:
    """Load-balancing, z-loss, pre-gate KL and gate agreement averaged over blocks (float32
    scalars)."""
    moe = model.config.moe
    lb, z = [], []
    for logits in router_logits.gate:
        routing = route_logits(logits, top_k=moe.top_k, norm=moe.router_norm)
        lb.append(load_balancing_loss(routing, moe.num_experts))
        z.append(router_z_loss(routing))
    pre, agree = [], []
    for i, p in enumerate(router_logits.pregate):
        if p is not None and i + 1 < len(router_logits.gate):
            gate = router_logits.gate[i + 1]
            pre.append(distill_kl(p, jax.lax.stop_gradient(gate), 1.0))
            agree.append(distill_kl(gate, jax.lax.stop_gradient(p), 1.0))
    zero = jnp.zeros((), jnp.float32)
    return {"load_balance": jnp.mean(jnp.stack(lb)), "z_loss": jnp.mean(jnp.stack(z)),
            "pregate_kl": jnp.mean(jnp.stack(pre)) if pre else zero,
            "gate_agreement": jnp.mean(jnp.stack(agree)) if agree else zero}


def _losses(model: MoETransformer, windows: jax.Array, train: TrainConfig,
            teacher_logits: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits, _, rl = model(inputs, return_router_logits=True)
    parts = {"ce": cross_entropy(logits, targets), **router_losses(model, rl),
             "distill": jnp.zeros((), jnp.float32)}
    loss = parts["ce"]
    if teacher_logits is not None:
        parts["distill"] = distill_kl(logits, teacher_logits, train.distill_temperature)
        loss = (1 - train.distill_weight) * loss + train.distill_weight * parts["distill"]
    loss = (loss + train.aux_loss_coef * parts["load_balance"] + train.z_loss_coef * parts["z_loss"]
            + train.pregate_coef * parts["pregate_kl"]
            + train.gate_agreement_coef * parts["gate_agreement"])
    return loss, parts

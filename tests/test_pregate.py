"""Pre-gate recall metrics and pre-gate training by distillation of the next block's gate."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax import pregate as pg
from samoyeds_jax.config import MoEConfig
from samoyeds_jax.moe import MoE
from samoyeds_jax.routing import topk_recall

D, E, K = 16, 8, 2


class ToyStack(nnx.Module):
    """MoE blocks in a residual stack with a dense mixing layer between them."""

    def __init__(self, config: MoEConfig, num_blocks: int, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([MoE(config, block_index=i, num_blocks=num_blocks, rngs=rngs)
                                for i in range(num_blocks)])
        self.mix = nnx.List([nnx.Linear(config.d_model, config.d_model, rngs=rngs)
                             for _ in range(num_blocks)])

    def __call__(self, x):
        routing = None
        for moe, mix in zip(self.blocks, self.mix):
            y, routing = moe(x, routing=routing)
            x = x + y + jnp.tanh(mix(x))
        return x


def test_training_raises_recall(rng):
    """Random pre-gates predict ~k/e of the next block's experts; distillation fixes that."""
    cfg = MoEConfig(d_model=D, d_ff=16, num_experts=E, top_k=K, pregate="speculative")
    model = ToyStack(cfg, 3, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    batches = [jnp.asarray(rng.standard_normal((256, D)), jnp.float32) for _ in range(2)]
    inputs = pg.collect_moe_inputs(model, lambda m, b: m(b), batches)
    assert [a.shape for a in inputs] == [(512, D)] * 3
    assert all(not m.capture_inputs for m in model.blocks)
    moes = pg.moe_blocks(model)
    assert moes[2].pregate is None
    # During collection block 1 measured block 0's pre-gate on the same tokens.
    online = model.blocks[1].recall()["recall"]
    offline = pg.pregate_recall(moes, inputs)
    assert [r["block"] for r in offline] == [0, 1]
    assert online == pytest.approx(offline[0]["recall"], abs=1e-6)

    config = pg.PregateTrainConfig(steps=150, learning_rate=3e-2, init="random", seed=1)
    report = pg.train_pregates(moes, inputs, config)
    assert [b.block for b in report.blocks] == [0, 1]
    for b in report.blocks:
        assert b.before["recall"] < 0.5, b
        assert b.after["recall"] > b.before["recall"] + 0.2, b
        assert np.isfinite(b.final_loss)
    assert "->" in report.table() and len(report.as_dict()["blocks"]) == 2
    after = pg.pregate_recall(moes, inputs)  # all tokens, trained pre-gates
    assert all(a["recall"] > 0.55 for a in after), after
    # A wider prediction (prefetch 4 experts for top-2 routing) covers more of the actual.
    x0 = jnp.asarray(inputs[0])
    actual = moes[1].gate(jnp.asarray(inputs[1]))
    wide = topk_recall(moes[0].predict_next(x0, top_k=4), actual, E)
    assert wide["recall"] >= after[0]["recall"] and wide["precision"] < wide["recall"]


def test_topk_loss_and_next_gate_init(rng):
    cfg = MoEConfig(d_model=D, d_ff=16, num_experts=E, top_k=K, pregate="pregated")
    moes = [MoE(cfg, block_index=i, num_blocks=2, rngs=nnx.Rngs(i)) for i in range(2)]
    x = jnp.asarray(rng.standard_normal((200, D)), jnp.float32)
    # Same inputs for both blocks: the next gate itself is a perfect pre-gate.
    pg.init_pregates_from_next_gates(moes)
    np.testing.assert_array_equal(np.asarray(moes[0].pregate.kernel[...]),
                                  np.asarray(moes[1].gate.kernel[...]))
    assert pg.pregate_recall(moes, [x, x])[0]["recall"] == 1.0
    report = pg.train_pregates(moes, [x, x], pg.PregateTrainConfig(
        steps=100, batch_size=64, learning_rate=3e-2, loss="topk", init="random"))
    block = report.blocks[0]
    assert block.kept and block.after["recall"] > block.before["recall"] + 0.3, block
    # A diverging fit (absurd learning rate) is caught on the validation split and undone.
    pg.init_pregates_from_next_gates(moes)
    bad = pg.train_pregates(moes, [x, x], pg.PregateTrainConfig(steps=3, learning_rate=50.0))
    assert not bad.blocks[0].kept and bad.blocks[0].after == bad.blocks[0].before
    assert pg.pregate_recall(moes, [x, x])[0]["recall"] == 1.0


def test_bad_pregate_inputs(rng):
    cfg = MoEConfig(d_model=D, d_ff=16, num_experts=E, top_k=K, pregate="speculative")
    moes = [MoE(cfg, block_index=i, num_blocks=2, rngs=nnx.Rngs(i)) for i in range(2)]
    x = jnp.zeros((10, D), jnp.float32)
    with pytest.raises(ValueError, match="one input array per MoE block: 2 blocks, 1 inputs"):
        pg.train_pregates(moes, [x])
    with pytest.raises(ValueError, match="same tokens"):
        pg.pregate_recall(moes, [x, x[:5]])
    with pytest.raises(ValueError, match=r"inputs\[1\] must be \[n, d_model=16\]"):
        pg.pregate_recall(moes, [x, jnp.zeros((10, 8))])
    with pytest.raises(ValueError, match="loss must be 'kl' or 'topk'"):
        pg.PregateTrainConfig(loss="mse")
    with pytest.raises(ValueError, match="eval_fraction"):
        pg.PregateTrainConfig(eval_fraction=0.5)
    with pytest.raises(ValueError, match="no MoE module"):
        pg.moe_blocks(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))

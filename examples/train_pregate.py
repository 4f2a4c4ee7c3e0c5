"""Train pre-gates for an MoE transformer by distilling each next block's gate.

    python examples/train_pregate.py                          # tiny random-weight model, 4 blocks
    python examples/train_pregate.py --loss topk --steps 500 --out /tmp/pregate.json
    python examples/train_pregate.py --checkpoint /path/to/hf_model --text corpus.txt --save /tmp/pregated

Steps: build the model in ``"speculative"`` mode (each block's own gate routes, so the hidden
states are the original model's), start every pre-gate from the next block's gate, collect
the MoE inputs over the data, fit each pre-gate with optax, and report held-out top-k recall
before and after. Finally the trained pre-gates run the model in ``"pregated"`` mode (the
pre-gate's choice is used) and the next-token agreement with the original model is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from samoyeds_jax import pregate as pg
from samoyeds_jax.model import ModelConfig, MoETransformer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="Hugging Face model directory (default: tiny random model)")
    p.add_argument("--layers", type=int, default=4, help="blocks of the tiny model")
    p.add_argument("--text", default=None, help="UTF-8 text file; tokenized with the checkpoint's "
                   "tokenizer.json when present, else bytes modulo the vocabulary")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss", choices=("kl", "topk"), default="kl")
    p.add_argument("--init", choices=("next_gate", "random"), default="next_gate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="save the model with its trained pre-gates (mode 'pregated') here")
    return p


def _model(args) -> MoETransformer:
    if args.checkpoint is None:
        cfg = ModelConfig.tiny(pregate="speculative").replace(num_layers=args.layers)
        return MoETransformer(cfg, rngs=nnx.Rngs(args.seed))
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r}: expected a model directory")
    from samoyeds_jax import checkpoints
    loaded = checkpoints.load_model(args.checkpoint)
    return _with_pregate_mode(loaded, "speculative")


def _with_pregate_mode(model: MoETransformer, mode: str) -> MoETransformer:
    """The same model in another pre-gating mode: all parameters shared, pre-gates added
    (copied from ``model`` when it has them, else freshly initialized)."""
    new = MoETransformer(model.config.replace(moe=dict(pregate=mode)), rngs=nnx.Rngs(0))
    nnx.update(new, nnx.state(model, nnx.Param))
    return new


def _token_batches(args, vocab: int) -> list[jax.Array]:
    n = args.batches * args.batch_size * args.seq_len
    if args.text is None:
        ids = np.random.default_rng(args.seed).integers(0, vocab, size=n)
    else:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        tok_path = os.path.join(args.checkpoint or "", "tokenizer.json")
        if args.checkpoint and os.path.isfile(tok_path):
            from tokenizers import Tokenizer
            ids = np.asarray(Tokenizer.from_file(tok_path).encode(text).ids)
        else:
            ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) % vocab
        if ids.size < n:
            ids = np.resize(ids, n)  # repeat a short text
    ids = ids[:n].reshape(args.batches, args.batch_size, args.seq_len)
    return [jnp.asarray(b, jnp.int32) for b in ids]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    model = _model(args)
    cfg = model.config
    print(f"model: {cfg.num_layers} MoE blocks, e={cfg.moe.num_experts}, k={cfg.moe.top_k}, "
          f"d={cfg.moe.d_model}")
    batches = _token_batches(args, cfg.vocab_size)
    moes = pg.moe_blocks(model)
    pg.init_pregates_from_next_gates(moes)

    inputs = pg.collect_moe_inputs(model, lambda m, tokens: m(tokens)[0], batches)
    print(f"collected {inputs[0].shape[0]} tokens x {len(inputs)} blocks "
          f"({time.perf_counter() - t0:.1f}s)")

    train_cfg = pg.PregateTrainConfig(steps=args.steps, learning_rate=args.lr, loss=args.loss,
                                      init=args.init, seed=args.seed)
    report = pg.train_pregates(moes, inputs, train_cfg)
    print("held-out pre-gate quality (block i predicts block i+1), before -> after:")
    print(report.table())

    # The trained pre-gates now drive the model ("pregated"): compare next-token choices.
    pregated = _with_pregate_mode(model, "pregated")
    logits = nnx.jit(lambda m, tokens: m(tokens)[0])
    held = batches[-1]
    agree = float(jnp.mean(jnp.argmax(logits(model, held), -1) == jnp.argmax(logits(pregated, held), -1)))
    note = " (random weights: near-uniform logits make this noisy)" if args.checkpoint is None else ""
    print(f"next-token agreement, pregated vs original model: {agree:.3f}{note} "
          f"({time.perf_counter() - t0:.1f}s total)")

    if args.save:
        from samoyeds_jax import converted_io
        converted_io.save_converted(pregated, args.save)
        print(f"saved the pregated model to {args.save}")
    if args.out:
        result = dict(report.as_dict(), next_token_agreement=agree, config=vars(args))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

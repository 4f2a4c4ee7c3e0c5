"""``samoyeds-train``: train a Mixtral-architecture MoE on the reference corpus.

    samoyeds-train --corpus data/shakespeare --out runs/reference

(the defaults are the recipe of the shipped reference model: preset "reference", 2000 steps of
32 windows x 256 tokens, AdamW 3e-3, pre-gates fit jointly in speculative mode)

reads the corpus (``python -m samoyeds_jax.corpus fetch data/shakespeare`` fetches it), trains
a byte-level BPE tokenizer on the training plays (or takes ``--tokenizer``), trains the model
(``samoyeds_jax.train``), and writes:

- ``OUT/last/``: the resumable checkpoint (f32 weights, optimizer state; ``--resume``);
- ``OUT/model/``: the final model in the Hugging Face layout (``--save-dtype``), with
  ``tokenizer.json``, ``generation_config.json`` and ``training.json`` (command, configs, the
  loss history), and ``loss_curve.png`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Any

import numpy as np

from samoyeds_jax.atomic import replace_file
from samoyeds_jax.cli import HelpFormatter, given_options, refuse_unless
from samoyeds_jax.config import MoEConfig
from samoyeds_jax.layers import AttentionConfig
from samoyeds_jax.model import ModelConfig

PRESETS = {
    # ~7.6M parameters, 6.3M of them in experts; 15 MB in bfloat16: the model shipped with the
    # library. Dimensions are multiples of 128 so every expert format applies.
    "reference": dict(d_model=256, num_layers=4, num_experts=8, top_k=2, d_ff=256, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True),
    # ~58M parameters (50M in experts), trained on a GPU.
    "large": dict(d_model=512, num_layers=8, num_experts=8, top_k=2, d_ff=512, num_heads=8,
                  num_kv_heads=4, tie_word_embeddings=False),
}


def preset_config(name: str, *, vocab_size: int, pregate: str = "standard") -> ModelConfig:
    """The Mixtral-architecture ``ModelConfig`` of a preset (head_dim 64, RoPE 10000)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[name]
    d = p["d_model"]
    return ModelConfig(
        architecture="mixtral", vocab_size=vocab_size, num_layers=p["num_layers"],
        attention=AttentionConfig(d_model=d, num_heads=p["num_heads"],
                                  num_kv_heads=p["num_kv_heads"], head_dim=d // p["num_heads"],
                                  rope_theta=10_000.0, norm_eps=1e-5),
        moe=MoEConfig(d_model=d, d_ff=p["d_ff"], num_experts=p["num_experts"], top_k=p["top_k"],
                      router_norm="topk_softmax", pregate=pregate),
        norm_eps=1e-5, tie_word_embeddings=p["tie_word_embeddings"],
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)


def build_parser() -> argparse.ArgumentParser:
    from samoyeds_jax.train import TrainConfig

    d = TrainConfig(steps=1)
    p = argparse.ArgumentParser(
        prog="samoyeds-train", formatter_class=HelpFormatter,
        description="Train a Mixtral-architecture MoE language model on the reference corpus. "
                    "Options that would have no effect in the combination given are refused.")
    p.add_argument("--corpus", required=True, metavar="DIR",
                   help="corpus directory (samoyeds-corpus fetch DIR fetches it)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", metavar="FILE", default=None,
                   help="tokenizer.json to use; default: train a byte-level BPE on the train split")
    p.add_argument("--vocab-size", type=int, default=2048,
                   help="BPE vocabulary when training one (not with --tokenizer)")
    p.add_argument("--preset", default="reference", choices=sorted(PRESETS),
                   help="model size: " + "; ".join(
                       f"{k}: {v['num_layers']} layers, d={v['d_model']}, {v['num_experts']} "
                       f"experts top-{v['top_k']}" for k, v in sorted(PRESETS.items())))
    p.add_argument("--pregate", default="speculative", choices=("standard", "speculative", "pregated"),
                   help="pre-gating mode trained in (speculative: own gates decide, pre-gates "
                        "are fit jointly by --pregate-coef)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=32, help="windows per optimizer step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens predicted per window")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per step (must divide --batch-size)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="peak AdamW learning rate")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay")
    p.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef,
                   help="weight of the load-balancing loss")
    p.add_argument("--pregate-coef", type=float, default=0.1,
                   help="weight of the pre-gate loss (not with --pregate standard)")
    p.add_argument("--gate-agreement-coef", type=float, default=0.0,
                   help="weight of the loss fitting each gate to the previous block's pre-gate "
                        "(raises pre-gate recall; not with --pregate standard)")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16"),
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--expert-compute", default=d.expert_compute,
                   choices=("auto", "xla", "all_experts"),
                   help="expert compute in the training step (auto: the fastest here)")
    p.add_argument("--eval-every", type=int, default=250,
                   help="steps between validation losses (0: only at the end)")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="steps between OUT/last checkpoints (0: only at the end)")
    p.add_argument("--save-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="dtype of the final model's weights")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in OUT/last (same settings)")
    p.add_argument("--seed", type=int, default=0, help="initialization and data order")
    return p


def load_tokens(corpus: str, tokenizer_path: str | None, vocab_size: int, out: str
                ) -> tuple[Any, str, np.ndarray, np.ndarray]:
    """(tokenizer, its path, train ids, validation ids) of the corpus split."""
    from samoyeds_jax import bpe_tokenizer
    from samoyeds_jax import corpus as corpus_lib

    texts = corpus_lib.read_texts(corpus)
    train_texts, val_texts = corpus_lib.split_texts(texts)
    if tokenizer_path is None:
        tokenizer = bpe_tokenizer.train_tokenizer(train_texts.values(), vocab_size=vocab_size)
        tokenizer_path = os.path.join(out, "tokenizer.json")
        replace_file(tokenizer_path, tokenizer.to_str(pretty=True))
    else:
        from tokenizers import Tokenizer

        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(f"--tokenizer {tokenizer_path}: no such file")
        tokenizer = Tokenizer.from_file(tokenizer_path)
    train_ids = bpe_tokenizer.encode_documents(tokenizer, train_texts.values())
    val_ids = bpe_tokenizer.encode_documents(tokenizer, val_texts.values())
    return tokenizer, tokenizer_path, train_ids, val_ids


def plot_history(history: list[dict[str, float]], path: str, title: str) -> bool:
    """Training and validation cross-entropy against steps into ``path`` (False without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(steps, [h["ce"] for h in history], lw=0.8, label="train (batch)")
    val = [(h["step"], h["val_ce"]) for h in history if "val_ce" in h]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _check(args, given: set[str]) -> None:
    """Every check that needs no corpus reading and no model: option combinations, the files
    and directories named. Raises ValueError / FileNotFoundError."""
    from samoyeds_jax import train as train_lib

    refuse_unless(args.tokenizer is None, given, {"vocab_size": "--vocab-size"},
                  f"--tokenizer {args.tokenizer} brings its own vocabulary")
    refuse_unless(args.pregate != "standard", given,
                  {"pregate_coef": "--pregate-coef",
                   "gate_agreement_coef": "--gate-agreement-coef"},
                  "--pregate standard trains no pre-gates")
    if not os.path.isdir(args.corpus):
        raise FileNotFoundError(f"--corpus {args.corpus}: no such directory (fetch it with "
                                f"samoyeds-corpus fetch {args.corpus})")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: expected a tokenizer.json file, "
                                "found no such file")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: expected a directory, found a file")
    state = os.path.join(args.out, train_lib.LAST, train_lib.TRAINER_STATE)
    if args.resume and not os.path.isfile(state):
        raise FileNotFoundError(f"--resume: expected a checkpoint to continue from, found no "
                                f"{state}; drop --resume to start a new run")
    if not args.resume and os.path.isfile(state):
        raise ValueError(f"--out {args.out} holds a checkpoint ({state}); pass --resume to "
                         "continue it, or pick another --out (a new run would overwrite it)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(args, given_options(parser, args, argv))
    import jax
    from flax import nnx

    from samoyeds_jax import train as train_lib
    from samoyeds_jax.hf_export import save_hf_checkpoint

    cfg = train_lib.TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
        grad_accum=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, aux_loss_coef=args.aux_loss_coef,
        pregate_coef=args.pregate_coef if args.pregate != "standard" else 0.0,
        gate_agreement_coef=args.gate_agreement_coef,
        dtype=args.dtype, expert_compute=args.expert_compute, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    tokenizer, tok_path, train_ids, val_ids = load_tokens(args.corpus, args.tokenizer,
                                                          args.vocab_size, args.out)
    vocab = tokenizer.get_vocab_size()
    config = preset_config(args.preset, vocab_size=vocab, pregate=args.pregate)
    model = train_lib.new_model(config, cfg)
    n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{args.preset}: {n_params / 1e6:.2f}M parameters, vocab {vocab}, "
          f"train {len(train_ids):,} tokens, validation {len(val_ids):,} tokens, "
          f"experts computed by {model.layers[0].mlp.implementation()!r}", file=sys.stderr)
    start = time.perf_counter()
    result = train_lib.train(model, train_ids, cfg, val_tokens=val_ids, out_dir=args.out,
                             resume=args.resume, tokenizer=tok_path)
    seconds = time.perf_counter() - start
    final = os.path.join(args.out, "model")
    record = {
        "command": "samoyeds-train " + shlex.join(argv),
        "preset": args.preset, "parameters": n_params, "train_config": dataclasses.asdict(cfg),
        "train_tokens": int(len(train_ids)), "validation_tokens": int(len(val_ids)),
        "seconds": seconds, "history": result.history,
    }
    extra = {"training.json": json.dumps(record, indent=1)}
    curve = os.path.join(args.out, "loss_curve.png")
    if plot_history(result.history, curve, f"{args.preset} MoE ({n_params / 1e6:.1f}M params)"):
        with open(curve, "rb") as f:
            extra["loss_curve.png"] = f.read()
    save_hf_checkpoint(result.model, final, dtype=args.save_dtype, tokenizer=tok_path,
                       extra_files=extra)
    last = result.history[-1]
    print(f"done in {seconds:.0f} s: train ce {last['ce']:.4f}, validation ce "
          f"{last.get('val_ce', float('nan')):.4f} nats/token; model in {final}")
    return 0


if __name__ == "__main__":  # python -m: the console entry (one error line, exit 2)
    from samoyeds_jax.cli import train_main

    sys.exit(train_main())

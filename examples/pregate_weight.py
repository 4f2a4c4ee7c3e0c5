"""Pre-gate recall against the weight of the pre-gate loss in joint fine-tuning.

    python examples/pregate_weight.py --model samoyeds_jax/assets/shakespeare-moe \
        --corpus data/shakespeare --weights 1 5 25 100 --out benchmarks/pregate_weight.json

For each weight and each gate-agreement weight ``a``: the model is fine-tuned in speculative
mode (its own gates decide, so the pre-gates do not change what it computes) with distillation
from the unchanged model plus ``weight * KL(next gate || pre-gate)``, whose gradient also reaches
the hidden states the pre-gates read, plus ``a * KL(pre-gate || next gate)``, which moves each
gate toward what the pre-gate predicts (``TrainConfig.gate_agreement_coef``). Reported:
validation bits/byte (paired against the unchanged model) in speculative mode and, with the same
weights, in pregated mode (the pre-gates route), and the exact top-k / pair recall of the
pre-gates.

    python examples/pregate_weight.py --model samoyeds_jax/assets/shakespeare-moe \
        --corpus data/shakespeare --weights 5 --agreement 0 1 5 \
        --out benchmarks/pregate_agreement.json
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 5.0, 25.0, 100.0])
    p.add_argument("--agreement", type=float, nargs="+", default=[0.0],
                   help="gate-agreement weights (TrainConfig.gate_agreement_coef)")
    p.add_argument("--control", action="store_true",
                   help="also fine-tune the dense model the same way without pre-gate terms "
                        "(the dense control) and compare every run with it")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-windows", type=int, default=96)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from samoyeds_jax import bpe_tokenizer, corpus
    from samoyeds_jax.atomic import write_json
    from samoyeds_jax.checkpoints import load_tokenizer
    from samoyeds_jax.evaluate import (EvalConfig, evaluate_streams, paired_difference,
                                       text_streams)
    from samoyeds_jax.hf_import import load_hf_checkpoint

    tokenizer = load_tokenizer(args.model)
    train_texts, val_texts = corpus.split_texts(corpus.read_texts(args.corpus))
    dense, config = load_hf_checkpoint(args.model, dtype="float32")
    streams = text_streams(tokenizer, val_texts, vocab_size=config.vocab_size)
    tokens = {name: ids for name, (ids, _) in streams.items()}
    train_ids = bpe_tokenizer.encode_documents(tokenizer, train_texts.values())
    ecfg = EvalConfig(seq_len=256, batch_size=16, max_windows=args.max_windows)
    base = evaluate_streams(dense, streams, config=ecfg)
    results = {"dense_bits_per_byte": base.bits_per_byte, "steps": args.steps,
               "batch": args.batch, "lr": args.lr, "runs": []}
    control = None
    if args.control:
        control = _control(args, dense, train_ids, streams, ecfg, base)
        results["dense_control"] = {"bits_per_byte": control.bits_per_byte,
                                    "vs_dense": paired_difference(control, base)}
        print(f"dense control: {control.bits_per_byte:.4f} bits/byte", flush=True)
        write_json(args.out, results)
    for weight in args.weights:
        for agreement in args.agreement:
            run = _run(args, weight, agreement, dense, train_ids, streams, tokens, ecfg, base,
                       control)
            results["runs"].append(run)
            write_json(args.out, results)
    return 0


def _train_config(args, **terms):
    from samoyeds_jax import train as train_lib

    return train_lib.TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=256,
                                 learning_rate=args.lr, warmup_steps=max(args.steps // 10, 1),
                                 distill_weight=1.0, seed=1, **terms)


def _control(args, dense, train_ids, streams, ecfg, base):
    """The dense model fine-tuned by the same recipe without pre-gate terms, evaluated."""
    from samoyeds_jax import compress
    from samoyeds_jax.evaluate import evaluate_streams

    tuned = compress.recover(compress.copy_model(dense), train_ids, _train_config(args),
                             teacher=dense, progress=False).model
    return evaluate_streams(tuned, streams, config=ecfg)


def _run(args, weight, agreement, dense, train_ids, streams, tokens, ecfg, base, control):
    from flax import nnx

    from samoyeds_jax import compress
    from samoyeds_jax.evaluate import evaluate_streams, paired_difference
    from samoyeds_jax.hf_import import load_hf_checkpoint
    from samoyeds_jax.pregate_eval import pregate_recall

    model, _ = load_hf_checkpoint(args.model, dtype="float32", pregate="speculative")
    cfg = _train_config(args, pregate_coef=weight, gate_agreement_coef=agreement)
    start = time.perf_counter()
    tuned = compress.recover(model, train_ids, cfg, teacher=dense, progress=False).model
    r = evaluate_streams(tuned, streams, config=ecfg)
    rec = pregate_recall(tuned, tokens, config=ecfg)
    pregated, _ = load_hf_checkpoint(args.model, dtype="float32", pregate="pregated")
    nnx.update(pregated, nnx.state(tuned, nnx.Param))
    rp = evaluate_streams(pregated, streams, config=ecfg)
    run = {"weight": weight, "gate_agreement": agreement, "bits_per_byte": r.bits_per_byte,
           "vs_dense": paired_difference(r, base), "pregated_bits_per_byte": rp.bits_per_byte,
           "pregated_vs_speculative": paired_difference(rp, r),
           "vs_control": None if control is None else paired_difference(r, control),
           "pregated_vs_control": None if control is None else paired_difference(rp, control),
           "exact_match": rec.exact_match, "pair_recall": rec.pair_recall,
           "seconds": time.perf_counter() - start}
    print(f"weight {weight:g}, agreement {agreement:g}: {r.bits_per_byte:.4f} bits/byte "
          f"(pregated {rp.bits_per_byte:.4f}), exact top-k {rec.exact_match:.3f}, pair recall "
          f"{rec.pair_recall:.3f}", flush=True)
    return run


if __name__ == "__main__":
    sys.exit(main())

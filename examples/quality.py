"""Quality of pruned and pre-gated models: validation bits/byte against the dense model.

    python examples/quality.py --model samoyeds_jax/assets/shakespeare-moe --corpus data/shakespeare \
        --out benchmarks/quality.json

For each expert format x pruning method: routing-aware layer-by-layer calibration and one-shot
pruning (``compress.calibrate_and_prune``), evaluation, recovery with the mask fixed
(``compress.recover``: distillation from the dense model), evaluation again. A dense control gets
the same recovery training. ``--linears 2:4`` prunes the attention projections (and shared
experts) too, in the same walk; ``--formats dense --linears 2:4`` prunes them alone. Then the
pre-gates: recall and bits/byte in the standard,
speculative and pregated modes, with pre-gates copied from the next block's gate (training-free)
and as trained, and after fine-tuning the model in pregated mode. Every difference comes with its
paired standard error over validation windows. Runs on CPU (slowly; ``--quick``) or a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

FORMATS = {
    "dense": None,  # experts left dense (with --linears: the linears alone pruned)
    "2:4": dict(format="nm", n=2, m=4),
    "samoyeds": dict(format="samoyeds", shared_w1_w3=False),
    "samoyeds_shared": dict(format="samoyeds", shared_w1_w3=True),
    "unstructured50": dict(format="unstructured", sparsity=0.5),
    "unstructured75": dict(format="unstructured", sparsity=0.75),
}
METHODS = ("magnitude", "wanda", "sparsegpt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="dense Hugging Face model directory")
    p.add_argument("--corpus", required=True, help="corpus directory (samoyeds_jax.corpus)")
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--formats", default=",".join(f for f in FORMATS if FORMATS[f]),
                   help=f"expert patterns, of {sorted(FORMATS)} ('' for none: the pre-gate "
                        "section alone)")
    p.add_argument("--linears", default=None, choices=sorted(f for f in FORMATS if FORMATS[f]),
                   help="also prune the attention projections and shared experts to this "
                        "pattern, same method (default: they stay dense)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--recover-steps", type=int, default=400)
    p.add_argument("--recover-lr", type=float, default=3e-4)
    p.add_argument("--recover-batch", type=int, default=32)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--pregate-steps", type=int, default=400,
                   help="fine-tuning steps in pregated mode (0: no fine-tuning, -1: no pre-gate "
                        "section)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--no-recover", action="store_true", help="one-shot only")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from samoyeds_jax import bpe_tokenizer, compress, corpus, pruning
    from samoyeds_jax.atomic import write_json
    from samoyeds_jax import train as train_lib
    from samoyeds_jax import train_data
    from samoyeds_jax.checkpoints import load_tokenizer
    from samoyeds_jax.hf_import import load_hf_checkpoint
    from samoyeds_jax.evaluate import EvalConfig, evaluate_streams, paired_difference
    from samoyeds_jax.evaluate import text_streams

    if args.quick:
        args.seq_len, args.max_windows, args.calib_windows = 64, 8, 8
        args.recover_steps, args.recover_batch, args.pregate_steps = 2, 4, 2
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer.json")
    train_texts, val_texts = corpus.split_texts(corpus.read_texts(args.corpus))
    dense, config = load_hf_checkpoint(args.model, dtype="float32")
    streams = text_streams(tokenizer, val_texts, vocab_size=config.vocab_size)
    train_ids = bpe_tokenizer.encode_documents(tokenizer, train_texts.values())
    ecfg = EvalConfig(seq_len=args.seq_len, batch_size=args.eval_batch,
                      max_windows=args.max_windows)
    rcfg = train_lib.TrainConfig(
        steps=args.recover_steps, batch_size=args.recover_batch, seq_len=args.seq_len,
        learning_rate=args.recover_lr, warmup_steps=max(args.recover_steps // 10, 1),
        distill_weight=args.distill_weight, seed=1)
    calib = train_data.sample_windows(train_ids, batch=args.calib_windows,
                                     length=args.seq_len + 1, seed=123, step=0)
    results = {"model": args.model, "argv": sys.argv[1:] if argv is None else argv,
               "eval": dataclasses.asdict(ecfg), "recover": dataclasses.asdict(rcfg),
               "calibration_tokens": int(calib.size), "runs": []}

    def write(obj):  # after every run: a cut-off sweep keeps what it measured
        write_json(args.out, obj)

    def evaluate(model):
        return evaluate_streams(model, streams, config=ecfg)

    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    base = evaluate(dense)
    results["dense"] = {"bits_per_byte": base.bits_per_byte, "tokens": base.tokens,
                        "bytes": base.bytes, "windows": base.windows}
    log(f"dense: {base.bits_per_byte:.4f} bits/byte ({base.windows} windows)")

    def diff(r, ref):
        d = paired_difference(r, ref)
        return {"difference": d["difference"], "standard_error": d["standard_error"]}

    control = None
    if not args.no_recover:
        ctrl = compress.recover(compress.copy_model(dense), train_ids, rcfg, teacher=dense,
                                progress=False).model
        control = evaluate(ctrl)
        results["dense_control"] = {"bits_per_byte": control.bits_per_byte,
                                    "vs_dense": diff(control, base)}
        log(f"dense control: {control.bits_per_byte:.4f}")

    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown --formats {unknown}; expected some of {sorted(FORMATS)}")
    for fname in formats:
        for method in args.methods.split(","):
            cfg = (None if FORMATS[fname] is None else
                   pruning.PruneConfig(method=method, output="dense", **FORMATS[fname]))
            lin = (None if args.linears is None else
                   pruning.PruneConfig(method=method, output="dense", **FORMATS[args.linears]))
            start = time.perf_counter()
            model = compress.copy_model(dense)
            report = compress.calibrate_and_prune(model, calib, cfg, linears=lin,
                                                  progress=False)
            prune_s = time.perf_counter() - start
            one = evaluate(model)
            blocks = report.blocks + report.linear_blocks
            run = {"format": fname, "linears": args.linears, "method": method,
                   "prune_seconds": prune_s, "empty_experts": report.empty_experts(),
                   "mean_output_rel_error": float(np.mean(
                       [b.mean_output_rel_error for b in blocks])),
                   "one_shot": {"bits_per_byte": one.bits_per_byte, "vs_dense": diff(one, base)}}
            line = (f"{fname:>16}{' + linears ' + args.linears if lin else ''} {method:>9}: "
                    f"one-shot {one.bits_per_byte:.4f}")
            if not args.no_recover:
                rec_model = compress.recover(model, train_ids, rcfg, teacher=dense,
                                             progress=False).model
                rec = evaluate(rec_model)
                run["recovered"] = {"bits_per_byte": rec.bits_per_byte,
                                    "vs_dense": diff(rec, base),
                                    "vs_control": diff(rec, control)}
                line += f", recovered {rec.bits_per_byte:.4f} (control {control.bits_per_byte:.4f})"
                if method == args.methods.split(",")[-1]:
                    # The recovered model stores in its format without pruning again, and the
                    # stored model computes the same.
                    compress.to_compressed(rec_model, cfg, linears=lin)
                    stored = evaluate(rec_model)
                    run["stored_bits_per_byte"] = stored.bits_per_byte
            results["runs"].append(run)
            log(line)
            write(results)

    if args.pregate_steps >= 0:
        results["pregate"] = pregate_section(args, dense, streams, train_ids, evaluate, diff,
                                             base, rcfg, log)
    results["seconds"] = time.perf_counter() - t0
    write(results)
    log(f"wrote {args.out} in {results['seconds']:.0f} s")
    return 0


def pregate_section(args, dense, streams, train_ids, evaluate, diff, base, rcfg, log):
    """Recall and bits/byte of each pre-gate mode: next-gate copies, trained, fine-tuned."""
    from samoyeds_jax import compress
    from samoyeds_jax.hf_import import load_hf_checkpoint
    from samoyeds_jax.evaluate import EvalConfig
    from samoyeds_jax.pregate import moe_blocks
    from samoyeds_jax.pregate_eval import pregate_recall

    ecfg = EvalConfig(seq_len=args.seq_len, batch_size=args.eval_batch,
                      max_windows=args.max_windows)
    tokens = {name: ids for name, (ids, _) in streams.items()}
    out = {}

    def variants(mode):
        trained, _ = load_hf_checkpoint(args.model, dtype="float32", pregate=mode)
        copied, _ = load_hf_checkpoint(args.model, dtype="float32", pregate=mode)
        moes = moe_blocks(copied)
        for a, b in zip(moes[:-1], moes[1:]):
            a.pregate.load_from(b.gate)
        return {"next_gate_copy": copied, "trained": trained}

    for mode in ("speculative", "pregated"):
        for name, model in variants(mode).items():
            r = evaluate(model)
            rec = pregate_recall(model, tokens, config=ecfg)
            out[f"{mode}/{name}"] = {"bits_per_byte": r.bits_per_byte, "vs_standard": diff(r, base),
                                     "exact_match": rec.exact_match,
                                     "pair_recall": rec.pair_recall, "recall": rec.as_dict()}
            log(f"{mode:>11} {name:>14}: {r.bits_per_byte:.4f} bits/byte, exact top-k "
                f"{rec.exact_match:.3f}, pair recall {rec.pair_recall:.3f}")
    if args.pregate_steps > 0:
        model, _ = load_hf_checkpoint(args.model, dtype="float32", pregate="pregated")
        cfg = dataclasses.replace(rcfg, steps=args.pregate_steps, pregate_coef=1.0)
        tuned = compress.recover(model, train_ids, cfg, teacher=dense, progress=False).model
        r = evaluate(tuned)
        rec = pregate_recall(tuned, tokens, config=ecfg)
        out["pregated/fine_tuned"] = {"bits_per_byte": r.bits_per_byte,
                                      "vs_standard": diff(r, base), "steps": args.pregate_steps,
                                      "exact_match": rec.exact_match,
                                      "pair_recall": rec.pair_recall, "recall": rec.as_dict()}
        log(f"   pregated     fine-tuned: {r.bits_per_byte:.4f} bits/byte, exact top-k "
            f"{rec.exact_match:.3f}, pair recall {rec.pair_recall:.3f}")
    return out


if __name__ == "__main__":
    sys.exit(main())

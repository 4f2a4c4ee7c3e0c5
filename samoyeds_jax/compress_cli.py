"""``samoyeds-compress``: calibrate -> prune -> recover -> evaluate -> save converted, in one command.

    samoyeds-compress --checkpoint samoyeds_jax/assets/shakespeare-moe --corpus data/shakespeare \
        --format samoyeds --method sparsegpt --recover-steps 400 --out runs/samoyeds

1. loads the dense checkpoint (float32) and its ``tokenizer.json``;
2. prunes every block's experts with routing-aware, layer-by-layer calibration on windows of
   the corpus' training split (``compress.calibrate_and_prune``), and with ``--linears`` the
   attention projections and shared experts too;
3. fine-tunes with the sparsity fixed, distilling from the dense model (``compress.recover``);
4. evaluates validation bits/byte of the dense, one-shot and recovered models, with paired
   standard errors (``evaluate``);
5. stores the pruned weights in their compressed format and saves the converted model to ``--out``
   (``converted_io.save_converted``; load it with ``samoyeds-generate --checkpoint OUT``); its
   metadata holds the settings, the pruning report and the results.

With ``--stream`` (models too large for the device in float32), steps 1, 2 and 4 run block by
block as the checkpoint streams in, in its own dtype, one block's dense weights on the device
(``compress.prune_checkpoint``): the dense and the one-shot model are scored in the same pass.
There is no step 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from samoyeds_jax.cli import HelpFormatter, given_options, refuse_unless

# Command-line names of pruning presets: a format of ``pallas_kernels.format_registry`` and
# its parameters.
FORMATS = {
    "2:4": dict(format="nm", n=2, m=4),
    "samoyeds": dict(format="samoyeds"),
    "unstructured": dict(format="unstructured"),
}


def build_parser() -> argparse.ArgumentParser:
    from samoyeds_jax.train import TrainConfig

    d = TrainConfig(steps=1)
    p = argparse.ArgumentParser(
        prog="samoyeds-compress", formatter_class=HelpFormatter,
        description="Prune a dense MoE checkpoint with calibration, recover it by distillation, "
                    "evaluate it and save it converted. Options that would have no effect in "
                    "the combination given are refused.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="dense Hugging Face checkpoint with tokenizer.json")
    p.add_argument("--corpus", required=True, metavar="DIR",
                   help="corpus directory (samoyeds-corpus fetch DIR): calibration and recovery "
                        "use its training split, evaluation its validation split")
    p.add_argument("--out", required=True, metavar="DIR", help="converted model directory")
    p.add_argument("--format", default="samoyeds", choices=sorted(FORMATS),
                   help="sparsity pattern of the experts (2:4, Samoyeds 1:2:128 + 2:4, or "
                        "unstructured)")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction zeroed (--format unstructured only)")
    p.add_argument("--method", default="sparsegpt", choices=("magnitude", "wanda", "sparsegpt"),
                   help="pruning criterion")
    p.add_argument("--separate-w1-w3", action="store_true",
                   help="--format samoyeds only: choose w1's and w3's columns separately "
                        "(default: one shared choice, which measured better)")
    p.add_argument("--linears", default=None, choices=sorted(FORMATS),
                   help="also prune the attention projections and shared experts to this "
                        "pattern, same method (default: they stay dense)")
    p.add_argument("--linear-sparsity", type=float, default=0.5,
                   help="fraction of the linears zeroed (--linears unstructured only)")
    p.add_argument("--calib-windows", type=int, default=64,
                   help="training-split windows the pruning is calibrated on")
    p.add_argument("--recover-steps", type=int, default=400,
                   help="fine-tuning steps with the sparsity fixed (0: one-shot only)")
    p.add_argument("--recover-lr", type=float, default=3e-4, help="recovery learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="recovery windows per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="tokens per window (calibration, recovery and evaluation)")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="recovery: weight of the KL to the dense model (the rest: next-token "
                        "loss)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="validation windows evaluated (default: all)")
    p.add_argument("--seed", type=int, default=0, help="calibration and recovery data order")
    p.add_argument("--stream", action="store_true",
                   help="prune block by block as the checkpoint streams in, in its own dtype "
                        "(compress.prune_checkpoint): one block's dense weights on the device, "
                        "for models too large for it in float32; the dense and one-shot models "
                        "are scored in the same pass; one-shot only (no recovery)")
    return p


def _weight_format(preset: str):
    from pallas_kernels.format_registry import get_format

    return get_format(FORMATS[preset]["format"])


def _presets_where(test) -> str:
    return " or ".join(f"--format {p}" for p in FORMATS if test(_weight_format(p)))


def _check_options(args, given: set[str]) -> None:
    """Refuse options that have no effect with the others given, and bad numbers."""
    refuse_unless(not args.stream, given, {"recover_steps": "--recover-steps"},
                  "--stream prunes one-shot (no recovery)")
    if args.stream:
        args.recover_steps = 0
    fmt = _weight_format(args.format)
    refuse_unless("sparsity" in fmt.params, given, {"sparsity": "--sparsity"},
                  f"--format {args.format} fixes its own density; --sparsity is for "
                  f"{_presets_where(lambda f: 'sparsity' in f.params)}")
    refuse_unless(fmt.pattern_shares_choice, given, {"separate_w1_w3": "--separate-w1-w3"},
                  f"--format {args.format} has no column choice (only "
                  f"{_presets_where(lambda f: f.pattern_shares_choice)} does)")
    refuse_unless(args.linears is not None and "sparsity" in _weight_format(args.linears).params,
                  given,
                  {"linear_sparsity": "--linear-sparsity"},
                  "--linear-sparsity is for --linears unstructured")
    refuse_unless(args.recover_steps > 0, given,
                  {"recover_lr": "--recover-lr", "batch_size": "--batch-size",
                   "distill_weight": "--distill-weight"},
                  "--recover-steps 0 skips recovery, the only step that uses them")
    for flag, value in (("--calib-windows", args.calib_windows), ("--seq-len", args.seq_len),
                        ("--eval-windows", args.eval_windows)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.recover_steps < 0:
        raise ValueError(f"--recover-steps must be >= 0, got {args.recover_steps}")


def _prune_config(pruning, args, preset: str, sparsity: float):
    """The ``PruneConfig`` of a preset (``FORMATS``), with ``sparsity`` where it takes one."""
    takes = "sparsity" in _weight_format(preset).params
    return pruning.PruneConfig(method=args.method, output="dense",
                               shared_w1_w3=None if not args.separate_w1_w3 else False,
                               **dict(FORMATS[preset], **({"sparsity": sparsity} if takes else {})))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_options(args, given_options(parser, args, argv))
    from samoyeds_jax import bpe_tokenizer, compress, corpus, pruning
    from samoyeds_jax import train as train_lib
    from samoyeds_jax import train_data
    from samoyeds_jax.checkpoints import load_tokenizer
    from samoyeds_jax.converted_io import is_converted, save_converted
    from samoyeds_jax.hf_import import ShardReader, load_hf_checkpoint, read_hf_config
    from samoyeds_jax.evaluate import (EvalConfig, evaluate_streams, paired_difference,
                                       text_streams)

    # Everything cheap first: files, settings, tokenizer, text.
    if is_converted(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint} is a converted model; expected the "
                         "dense Hugging Face checkpoint (config.json + *.safetensors) to prune")
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no config.json there")
    hf_config = read_hf_config(args.checkpoint)
    with ShardReader(args.checkpoint):  # the shards exist; only their headers are read
        pass
    tokenizer = load_tokenizer(args.checkpoint)
    if tokenizer is None:
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no tokenizer.json (needed to "
                                "read the corpus)")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not empty; pick a new directory")
    prune_config = _prune_config(pruning, args, args.format, args.sparsity)
    linear_config = (None if args.linears is None else
                     _prune_config(pruning, args, args.linears, args.linear_sparsity))
    recover_config = None
    if args.recover_steps > 0:
        recover_config = train_lib.TrainConfig(
            steps=args.recover_steps, batch_size=args.batch_size, seq_len=args.seq_len,
            learning_rate=args.recover_lr, warmup_steps=max(args.recover_steps // 10, 1),
            distill_weight=args.distill_weight, seed=args.seed)
    train_texts, val_texts = corpus.split_texts(corpus.read_texts(args.corpus))
    streams = text_streams(tokenizer, val_texts, vocab_size=int(hf_config.get("vocab_size", 0)))
    train_ids = bpe_tokenizer.encode_documents(tokenizer, train_texts.values())
    ecfg = EvalConfig(seq_len=args.seq_len, max_windows=args.eval_windows)

    start = time.perf_counter()
    calib = train_data.sample_windows(train_ids, batch=args.calib_windows,
                                     length=args.seq_len + 1, seed=args.seed + 1, step=0)
    # Speculative mode computes exactly as standard and keeps the checkpoint's pre-gates (or
    # copies of the next gates), so the converted model can run pregated offloading.
    if args.stream:
        pruned = compress.prune_checkpoint(
            args.checkpoint, calib, dataclasses.replace(prune_config, output="compressed"),
            linears=linear_config, eval_streams=streams, eval_config=ecfg, pregate="speculative")
        model, report = pruned.model, pruned.report
        base, one_shot = pruned.results["dense"], pruned.results["one-shot"]
    else:
        dense, _ = load_hf_checkpoint(args.checkpoint, dtype="float32", pregate="speculative")
        base = evaluate_streams(dense, streams, config=ecfg)
        model = compress.copy_model(dense)
        report = compress.calibrate_and_prune(model, calib, prune_config, linears=linear_config)
    print(f"dense          {base.bits_per_byte:.4f} bits/byte", flush=True)
    if report.empty_experts():
        print(f"experts without calibration tokens (pruned by magnitude): "
              f"{report.empty_experts()}", flush=True)
    results = {"dense": base.bits_per_byte}

    def record(name, result):
        diff = paired_difference(result, base)
        results[name] = {"bits_per_byte": result.bits_per_byte, "vs_dense": diff["difference"],
                         "standard_error": diff["standard_error"]}
        print(f"{name:<14} {result.bits_per_byte:.4f} bits/byte ({diff['difference']:+.4f} "
              f"+- {diff['standard_error']:.4f} vs dense)", flush=True)

    record("one-shot", one_shot if args.stream else evaluate_streams(model, streams, config=ecfg))
    if recover_config is not None:
        model = compress.recover(model, train_ids, recover_config, teacher=dense).model
        record("recovered", evaluate_streams(model, streams, config=ecfg))
    if not args.stream:  # the streamed model is stored in its format already
        compress.to_compressed(model, prune_config, linears=linear_config)
    settings = {"prune": dataclasses.asdict(prune_config),
                "prune_linears": (None if linear_config is None
                                  else dataclasses.asdict(linear_config)),
                "recover": None if recover_config is None else dataclasses.asdict(recover_config),
                "calibration_windows": int(len(calib)), "stream": args.stream,
                "results": results,
                "report": report.as_dict(), "seconds": time.perf_counter() - start}
    save_converted(model, args.out, source=args.checkpoint, conversion=settings)
    print(f"saved {args.format} model to {args.out} ({settings['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":  # python -m: the console entry (one error line, exit 2)
    from samoyeds_jax.cli import compress_main

    sys.exit(compress_main())

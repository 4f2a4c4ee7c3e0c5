"""``samoyeds-eval``: bits per byte, perplexity and pre-gate recall of a model on text.

Scores the text files given with ``--text`` (or the validation split of ``--corpus DIR``, as
``samoyeds_jax.corpus.read_texts`` / ``split_texts`` make it) with a Hugging Face checkpoint or
a converted model directory, windowed as ``samoyeds_jax.evaluate`` describes. Sparse
``--format``s are pruned by magnitude at load, as in ``samoyeds-generate``. When the model has
pre-gates (``--pregate pregated|speculative``, or a converted model stored with them), the
top-k recall of each pre-gate against the next block's gate is reported too.

Everything cheap is checked before the model is loaded: the checkpoint's files, the tokenizer
and its vocabulary size against the model's, the text files and their tokenization, and the
directory of ``--json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import numpy as np

from pallas_kernels.expert_op import implementation_names
from pallas_kernels.format_registry import format_names
from samoyeds_jax.atomic import write_json
from samoyeds_jax.cli import HelpFormatter, describe_experts

_PREGATES = ("standard", "pregated", "speculative")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samoyeds-eval",
        description="Bits per byte, perplexity and pre-gate recall of an MoE model on text.",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", metavar="DIR", required=True,
                   help="Hugging Face model directory (config.json + *.safetensors + "
                        "tokenizer.json) or a converted model directory (samoyeds_config.json)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", nargs="+",
                        help="UTF-8 text files; each is its own document (windows never cross "
                             "files)")
    source.add_argument("--corpus", metavar="DIR",
                        help="corpus directory as samoyeds_jax.corpus fetches it (DIR/texts/"
                        "<name>_gut.txt): its validation split is evaluated")
    p.add_argument("--format", dest="expert_format", default=None, choices=format_names(),
                   help="storage format of the expert weights, pruned by magnitude when sparse "
                        "(default: dense for a Hugging Face checkpoint, as stored for a "
                        "converted one)")
    p.add_argument("--pregate", default=None, choices=_PREGATES,
                   help="pre-gating mode; pre-gates the checkpoint lacks start as copies of "
                        "the next block's gate (default: as stored for a converted model; for "
                        "a Hugging Face checkpoint speculative when it holds pre-gate tensors, "
                        "else standard)")
    p.add_argument("--implementation", default="auto", choices=("auto",) + implementation_names(),
                   help="expert implementation (pallas_kernels.expert_op; 'auto': the fastest "
                        "that applies, xla without a GPU; triton runs the Pallas kernels in "
                        "interpret mode without a GPU)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute/parameter dtype (default: the checkpoint's)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens predicted per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per jitted forward")
    p.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first this many windows (default: all)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the results (with per-window values) to PATH as JSON")
    return p


# ----------------------------------------------------------------------------- cheap checks


def _checkpoint_info(path: str) -> dict[str, Any]:
    """What the checkpoint directory holds, without reading weights: kind, vocab size, stored
    expert format, dtype and pre-gate mode (converted models)."""
    from samoyeds_jax import converted_io, hf_import

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path!r}: no such directory (expected config.json "
                                "+ *.safetensors, or a converted model)")
    if converted_io.is_converted(path):
        cfg = converted_io.read_converted_meta(path).get("config")
        if not isinstance(cfg, dict):
            raise ValueError(f"{os.path.join(path, converted_io.CONVERTED_CONFIG)}: expected a "
                             "'config' object")
        return {"converted": True, "vocab_size": int(cfg["vocab_size"]),
                "format": cfg["moe"]["expert_format"], "pregate": cfg["moe"]["pregate"],
                "dtype": cfg["param_dtype"], "architecture": cfg["architecture"]}
    hf = hf_import.read_hf_config(path)
    if "vocab_size" not in hf:
        raise ValueError(f"{os.path.join(path, 'config.json')} is missing 'vocab_size'")
    # Opening the shards reads only their headers: missing or unreadable shards fail here.
    with hf_import.ShardReader(path) as reader:
        stored_pregates = any(k.endswith(".pregate.weight") for k in reader.keys())
    # Pre-gates saved with the checkpoint (samoyeds_jax.hf_export) are measured by default;
    # speculative routing leaves the scores those of the model without them.
    return {"converted": False, "vocab_size": int(hf["vocab_size"]), "format": "dense",
            "pregate": "speculative" if stored_pregates else "standard", "dtype": None,
            "architecture": hf.get("model_type")}


def _tokenizer(path: str):
    from samoyeds_jax import checkpoints

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: evaluating text needs the model's tokenizer")
    tokenizer = checkpoints.load_tokenizer(path)
    if tokenizer is None:  # load_tokenizer warned: the package is missing
        raise ValueError(f"{file} needs the 'tokenizers' package (pip install tokenizers)")
    return tokenizer


def _read_texts(args) -> tuple[dict[str, str], str]:
    """(name -> text, description of the source)."""
    if args.text is not None:
        texts = {}
        for name in args.text:
            if name in texts:
                raise ValueError(f"--text lists {name!r} twice")
            if not os.path.isfile(name):
                raise FileNotFoundError(f"--text {name!r}: no such file")
            with open(name, "rb") as f:
                raw = f.read()
            try:
                texts[name] = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"--text {name!r} is not UTF-8 text ({err})") from None
        return texts, f"{len(texts)} file{'s' if len(texts) > 1 else ''}"
    from samoyeds_jax import corpus

    if not os.path.isdir(args.corpus):
        raise FileNotFoundError(f"--corpus {args.corpus!r}: no such directory")
    _, validation = corpus.split_texts(corpus.read_texts(args.corpus))
    return validation, f"validation split of {args.corpus} ({len(validation)} documents)"


def _check_settings(args, info: dict[str, Any]) -> None:
    if info["converted"]:
        if args.expert_format is not None and args.expert_format != info["format"]:
            raise ValueError(f"{args.checkpoint} stores {info['format']!r} experts; requested "
                             f"--format {args.expert_format!r} (convert the original checkpoint "
                             "again for another format)")
        if args.dtype is not None and args.dtype != info["dtype"]:
            raise ValueError(f"{args.checkpoint} stores {info['dtype']} weights; requested "
                             f"--dtype {args.dtype}")
    if args.json is not None:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"--json {args.json!r}: directory {parent!r} does not exist")


# ----------------------------------------------------------------------------- model


def _set_pregate(model, mode: str) -> None:
    """Switch a loaded model's pre-gating mode in place. Existing pre-gates are kept (pregated
    <-> speculative); new ones start as copies of the next block's gate; "standard" drops them."""
    from flax import nnx

    from samoyeds_jax.moe import MoE, PreGatedRouter

    if model.config.moe.pregate == mode:
        return
    moes = sorted((m for _, m in nnx.iter_modules(model) if isinstance(m, MoE)),
                  key=lambda m: m.block_index)
    for i, m in enumerate(moes):
        wanted = mode != "standard" and i < len(moes) - 1
        if wanted and m.pregate is None:
            c = m.config
            pregate = PreGatedRouter(c.d_model, c.num_experts, top_k=c.top_k, norm=c.router_norm,
                                     dtype=m.dtype, param_dtype=m.param_dtype, rngs=nnx.Rngs(0))
            pregate.load_from(moes[i + 1].gate)
            m.pregate = nnx.data(pregate)  # the attribute held None (static) before
        elif not wanted:
            m.pregate = None
        m.config = m.config.replace(pregate=mode)
    model.config = model.config.replace(moe=dict(pregate=mode))


def _load(args, info: dict[str, Any]):
    from samoyeds_jax import checkpoints, hf_import

    if info["converted"]:
        model = checkpoints.load_model(args.checkpoint, expert_format=args.expert_format,
                                       dtype=args.dtype)
        if args.pregate is not None:
            _set_pregate(model, args.pregate)
    else:
        model, _ = hf_import.load_hf_checkpoint(
            args.checkpoint, dtype=args.dtype, expert_format=args.expert_format,
            pregate=args.pregate or info["pregate"])
    model.prepare(None if args.implementation == "auto" else args.implementation)
    return model


# ----------------------------------------------------------------------------- output


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _recall_lines(recall) -> list[str]:
    lines = []
    for p in recall.pairs:
        er = p.expert_recall
        seen = np.flatnonzero(~np.isnan(er))
        worst = (f"; worst expert {int(seen[np.argmin(er[seen])])}: {np.nanmin(er):.3f}"
                 if seen.size else "")
        lines.append(f"block {p.block} -> {p.block + 1}: exact top-{p.top_k} {p.exact_match:.3f}, "
                     f"pair recall {p.pair_recall:.3f}{worst}")
    n = len(recall.pairs)
    lines.append(f"overall: exact {recall.exact_match:.3f}, pair recall {recall.pair_recall:.3f} "
                 f"({n} block pair{'s' if n > 1 else ''} x {recall.pairs[0].tokens:,} tokens)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, check inputs, load the model, evaluate, print a table (and write
    ``--json``). Returns 0; bad input raises ValueError / FileNotFoundError naming the file."""
    args = build_parser().parse_args(argv)
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size),
                        ("--max-windows", args.max_windows)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    from samoyeds_jax import evaluate, pregate_eval

    config = evaluate.EvalConfig(seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_windows=args.max_windows)
    info = _checkpoint_info(args.checkpoint)
    _check_settings(args, info)
    tokenizer = _tokenizer(args.checkpoint)
    texts, source = _read_texts(args)
    streams = evaluate.text_streams(tokenizer, texts, vocab_size=info["vocab_size"])

    t0 = time.perf_counter()
    model = _load(args, info)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate.evaluate_streams(model, streams, config=config)
    t_eval = time.perf_counter() - t0
    recall = None
    if pregate_eval.has_pregates(model):
        tokens = {name: ids for name, (ids, _) in streams.items()}
        recall = pregate_eval.pregate_recall(model, tokens, config=config)

    cfg = model.config
    m = cfg.moe
    text_bytes = sum(len(t.encode()) for t in texts.values())
    text_tokens = sum(len(ids) for ids, _ in streams.values())
    dtype = np.dtype(cfg.dtype).name
    print("samoyeds-eval")
    print(f"  model       {cfg.architecture} from {args.checkpoint}: {cfg.num_layers} layers, "
          f"{m.num_experts} experts top-{m.top_k}, vocab {cfg.vocab_size}, {dtype}")
    print(f"  experts     {describe_experts(model)}")
    print(f"  text        {source}: {text_bytes:,} bytes -> {text_tokens:,} tokens")
    print(f"  windows     {result.windows} x {result.seq_len} tokens (batch {config.batch_size}"
          f"{'' if config.max_windows is None else f', at most {config.max_windows}'}): "
          f"{result.tokens:,} tokens / {result.bytes:,} bytes predicted")
    print(f"  bits/byte   {result.bits_per_byte:.4f}")
    print(f"  bits/token  {result.bits_per_token:.4f}")
    print(f"  perplexity  {result.perplexity:.3f}")
    if recall is not None:
        for i, line in enumerate(_recall_lines(recall)):
            print(f"  {'pre-gate' if i == 0 else '':10}  {line}")
    print(f"  time        load {t_load:.1f} s, evaluation {t_eval:.1f} s (incl. compilation)")

    if args.json is not None:
        write_json(args.json, _finite({
            "checkpoint": args.checkpoint, "architecture": cfg.architecture,
            "format": m.expert_format, "pregate": m.pregate,
            "implementation": model.layers[0].mlp.implementation(),
            "dtype": dtype, "source": source,
            "texts": {name: len(t.encode()) for name, t in texts.items()},
            "config": {"seq_len": config.seq_len, "batch_size": config.batch_size,
                       "max_windows": config.max_windows},
            "result": result.as_dict(),
            "pregate_recall": None if recall is None else recall.as_dict(),
            "seconds": {"load": t_load, "evaluate": t_eval},
        }), allow_nan=False)
        print(f"  json        {args.json}")
    return 0


if __name__ == "__main__":  # python -m: the console entry (one error line, exit 2)
    from samoyeds_jax.cli import eval_main

    sys.exit(eval_main())

"""End-to-end generation speed of a Mixtral-8x7B-shaped model: dense vs 2:4 vs Samoyeds experts.

For each expert format and implementation it builds the model (random weights of the Mixtral-8x7B
shapes, ``--layers`` decoder blocks; sparse formats are magnitude-pruned from the same dense
initialization) and measures with ``samoyeds_jax.generate.Generator``:

* decode tokens/s at each batch size: the whole decode loop is one jitted ``lax.while_loop``
  (``--new-tokens`` tokens, EOS ignored), timed from dispatch to ``block_until_ready``,
  compilation excluded (ahead-of-time compiled); median of ``--repeats`` runs;
* prefill tokens/s: ``--prefill-batch`` prompts of ``--prefill-len`` tokens;
* correctness in the same run: for every format, the logits of one forward with each expert
  implementation against ``xla`` (same weights), and whether their greedy tokens agree;
* peak device memory after each format.

Decode is weight-bandwidth bound at small batch: expert bytes per token fall to ~56% (2:4) and
~28% (Samoyeds 1:2:128 + 2:4) of dense, attention and embedding bytes stay.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 examples/bench_generate.py --out benchmarks/generate.json
    PYTHONPATH=. python3 examples/bench_generate.py --tiny --out /tmp/generate.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from samoyeds_jax.generate import Generator, SamplingConfig
from samoyeds_jax.model import ModelConfig, MoETransformer

MIXTRAL_8X7B = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rms_norm_eps": 1e-5,
    "rope_theta": 1e6, "torch_dtype": "bfloat16", "eos_token_id": 2,
}

# format/implementation pairs timed by default (``pallas_kernels.expert_op``); the dense XLA
# grouped matmul is the baseline. ``mosaic_sparse_mma`` / ``mosaic_expand`` put the experts in a
# Hopper layout (Mosaic GPU kernels; Hopper GPUs only).
DEFAULT_VARIANTS = "dense/xla,dense/triton,nm/triton,samoyeds/triton"


def _config(args, fmt: str) -> ModelConfig:
    if args.tiny:
        return ModelConfig.tiny(expert_format=fmt)
    hf = dict(MIXTRAL_8X7B, num_hidden_layers=args.layers)
    return ModelConfig.from_hf(hf, expert_format=fmt)


def _with_implementation(model: MoETransformer, implementation: str) -> MoETransformer:
    """The same weights computed by another expert implementation: a new graph sharing the
    arrays, each MoE layer prepared for ``implementation`` (a layout change copies)."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    out.prepare(implementation)
    return out


def _expert_bytes(model: MoETransformer) -> int:
    total = 0
    for block in model.layers:
        for w in (block.mlp.w1, block.mlp.w3, block.mlp.w2):
            total += sum(a.nbytes for a in jax.tree.leaves(w.get_value()))
    return total


def _peak_mib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def _write(path: str, report: dict) -> None:
    """Write the report so far (a run cut by its time limit still leaves its results)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=4,
                   help="decoder blocks (Mixtral-8x7B has 32; decode tokens/s scale ~1/layers)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated format/implementation pairs (formats: dense, nm, "
                        "samoyeds, unstructured; implementations: pallas_kernels.expert_op)")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU smoke test)")
    args = p.parse_args()
    if args.tiny:
        args.batches, args.prompt_len, args.new_tokens = "1,2", 8, 4
        args.prefill_batch, args.prefill_len, args.repeats = 2, 16, 1
    batches = [int(b) for b in args.batches.split(",")]
    variants = [tuple(v.split("/")) for v in args.variants.split(",")]
    formats = list(dict.fromkeys(f for f, _ in variants))
    results, checks = [], []
    report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                  jax=jax.__version__, model="tiny" if args.tiny else "mixtral-8x7b-shaped",
                  layers=_config(args, "dense").num_layers, args=vars(args),
                  timing="AOT-compiled; decode = one jitted while_loop per run, dispatch to "
                         "block_until_ready; median of repeats; compile excluded",
                  results=results, checks=checks)

    for fmt in formats:
        t0 = time.perf_counter()
        base = MoETransformer(_config(args, fmt), rngs=nnx.Rngs(0))
        jax.block_until_ready(nnx.state(base))
        build_s = time.perf_counter() - t0
        vocab = base.config.vocab_size
        probe = jnp.asarray(np.random.default_rng(7).integers(3, vocab, (2, 16)), jnp.int32)
        logits_by_impl, greedy_by_impl = {}, {}
        impls = [b for f, b in variants if f == fmt]
        for impl in ["xla"] + [b for b in impls if b != "xla"]:
            try:
                model = _with_implementation(base, impl)
                logits, _ = jax.jit(lambda m, t: m(t))(model, probe)
                logits_by_impl[impl] = np.asarray(logits, np.float32)
            except Exception as err:  # cannot run this format: record, go on
                checks.append(dict(format=fmt, implementation=impl, error=repr(err)[:500]))
                print(f"{fmt}/{impl}: forward failed: {err!r}"[:300], flush=True)
                continue
            if impl not in impls:
                continue  # the XLA forward only as the reference of the check
            gen = Generator(model, sampling=SamplingConfig(), eos_id=None, bucket=16)
            for b in batches:
                # The same prompts for every format and implementation (greedy tokens are compared).
                prng = np.random.default_rng(b)
                prompts = [prng.integers(3, vocab, args.prompt_len).tolist() for _ in range(b)]
                runs = [gen.generate(prompts, max_new_tokens=args.new_tokens)
                        for _ in range(args.repeats + 1)]  # the first run also compiles
                timed = runs[1:] if len(runs) > 1 else runs
                rates = [r.decode_tokens_per_second for r in timed]
                if b == batches[0]:
                    greedy_by_impl[impl] = runs[-1].tokens
                results.append(dict(
                    kind="decode", format=fmt, implementation=impl, batch=b,
                    prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                    decode_tok_s=statistics.median(rates), decode_tok_s_runs=rates,
                    step_ms=1e3 / statistics.median(rates) * b,
                    compile_s=runs[0].compile_seconds))
                _write(args.out, report)
                print(f"{fmt:9s} {impl:6s} batch {b:3d}: decode {statistics.median(rates):10.1f} tok/s "
                      f"({results[-1]['step_ms']:.2f} ms/step), compile {runs[0].compile_seconds:.1f} s",
                      flush=True)
            prng = np.random.default_rng(1000)
            prompts = [prng.integers(3, vocab, args.prefill_len).tolist()
                       for _ in range(args.prefill_batch)]
            runs = [gen.generate(prompts, max_new_tokens=1) for _ in range(args.repeats + 1)]
            rates = [r.prefill_tokens_per_second for r in runs[1:] or runs]
            results.append(dict(kind="prefill", format=fmt, implementation=impl,
                                batch=args.prefill_batch, prompt_len=args.prefill_len,
                                prefill_tok_s=statistics.median(rates), prefill_tok_s_runs=rates))
            print(f"{fmt:9s} {impl:6s} prefill {args.prefill_batch}x{args.prefill_len}: "
                  f"{statistics.median(rates):10.1f} tok/s", flush=True)
            del gen, model
            gc.collect()
        if "xla" in logits_by_impl:
            ref = logits_by_impl["xla"]
            for impl, lg in logits_by_impl.items():
                if impl == "xla":
                    continue
                rel = float(np.linalg.norm(lg - ref) / max(np.linalg.norm(ref), 1e-30))
                same = (bool(np.array_equal(greedy_by_impl.get(impl), greedy_by_impl.get("xla")))
                        if impl in greedy_by_impl and "xla" in greedy_by_impl else None)
                checks.append(dict(format=fmt, implementation=impl, logits_rel_err_vs_xla=rel,
                                   greedy_tokens_equal_xla=same))
                print(f"{fmt:9s} {impl}: logits rel err vs xla {rel:.2e}, greedy equal {same}",
                      flush=True)
        report.setdefault("expert_mib", {})[fmt] = _expert_bytes(base) / 2**20
        report.setdefault("peak_mib_after", {})[fmt] = _peak_mib()
        report.setdefault("build_s", {})[fmt] = build_s
        del base
        gc.collect()

    speedups = {}
    for r in results:
        if r["kind"] != "decode" or r["format"] == "dense":
            continue
        for base_impl in ("xla", "triton"):
            dense = [d for d in results if d["kind"] == "decode" and d["format"] == "dense"
                     and d["implementation"] == base_impl and d["batch"] == r["batch"]]
            if dense:
                speedups[f"{r['format']}/{r['implementation']} vs dense/{base_impl} batch {r['batch']}"] = (
                    r["decode_tok_s"] / dense[0]["decode_tok_s"])
    report["decode_speedup"] = speedups
    for k, v in speedups.items():
        print(f"speedup {k}: {v:.2f}x")
    _write(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

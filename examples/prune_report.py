"""Prune the experts of a random Mixtral-shaped model to every format and print the error/bytes table.

    PYTHONPATH=. python examples/prune_report.py                       # 1/8-scale Mixtral, 2 layers
    PYTHONPATH=. python examples/prune_report.py --d 4096 --f 14336 --layers 1 --out report.json

Weights are random normal; calibration activations are random with log-normal channel scales
(LLM hidden states have a few large-norm channels), which is where Wanda differs from magnitude.
Prints one table per (format, method) and a summary; ``--out`` writes all reports as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax import pruning

CONFIGS = {
    "nm": dict(format="nm", n=2, m=4),
    "samoyeds": dict(format="samoyeds", n_sel=1, m_sel=2, v=128),
    "unstructured": dict(format="unstructured", sparsity=0.8),
}


def random_model(*, layers: int, e: int, d: int, f: int, dtype, seed: int) -> dict:
    """{"layers": {i: {"w1": [e, d, f], "w3": [e, d, f], "w2": [e, f, d]}}}, N(0, 1/fan_in)."""
    key = jax.random.key(seed)
    model = {"layers": {}}
    for i in range(layers):
        key, k1, k2, k3 = jax.random.split(key, 4)
        model["layers"][i] = {
            "w1": (jax.random.normal(k1, (e, d, f)) / np.sqrt(d)).astype(dtype),
            "w3": (jax.random.normal(k3, (e, d, f)) / np.sqrt(d)).astype(dtype),
            "w2": (jax.random.normal(k2, (e, f, d)) / np.sqrt(f)).astype(dtype),
        }
    return model


def calibration(*, layers: int, t: int, d: int, seed: int) -> dict[str, jax.Array]:
    """The FFN input of every layer: [t, d] with log-normal per-channel scales."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(layers):
        scale = np.exp(rng.normal(0.0, 1.0, d)).astype(np.float32)
        out[f"layers/{i}"] = jnp.asarray(rng.standard_normal((t, d)).astype(np.float32)
                                         * scale[None, :])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d", type=int, default=512, help="d_model (Mixtral-8x7B: 4096)")
    ap.add_argument("--f", type=int, default=1792, help="d_ff (Mixtral-8x7B: 14336)")
    ap.add_argument("--tokens", type=int, default=256, help="calibration tokens per layer")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--formats", default="nm,samoyeds,unstructured")
    ap.add_argument("--methods", default="magnitude,wanda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write every report as JSON here")
    args = ap.parse_args()

    model = random_model(layers=args.layers, e=args.experts, d=args.d, f=args.f,
                         dtype=jnp.dtype(args.dtype), seed=args.seed)
    calib = calibration(layers=args.layers, t=args.tokens, d=args.d, seed=args.seed + 1)
    results = {}
    summary = []
    for fmt in args.formats.split(","):
        for method in args.methods.split(","):
            config = pruning.PruneConfig(method=method, **CONFIGS[fmt])
            start = time.perf_counter()
            _, report = pruning.prune_experts(model, config, calib)
            seconds = time.perf_counter() - start
            print(f"\n== {fmt} / {method} ({seconds:.1f} s)\n{report.table()}")
            results[f"{fmt}/{method}"] = dict(report.as_dict(), seconds=seconds)
            summary.append((f"{fmt}/{method}", report.mean_weight_rel_error,
                            report.mean_output_rel_error, report.stored_bytes / report.dense_bytes))
    print(f"\n{'format/method':<24} {'weight err':>10} {'output err':>10} {'bytes/dense':>11}")
    for name, w_err, y_err, ratio in summary:
        print(f"{name:<24} {w_err:>10.4f} {y_err:>10.4f} {ratio:>11.4f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(args=vars(args), results=results), fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

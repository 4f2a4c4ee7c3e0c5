"""Seconds to prune one Mixtral-8x7B-sized MoE layer: magnitude vs Wanda vs SparseGPT.

    PYTHONPATH=. python examples/bench_pruning.py --out benchmarks/pruning.json
    PYTHONPATH=. python examples/bench_pruning.py --small --out /tmp/pruning.json   # CPU smoke

One layer: 8 experts, w1/w3 [4096, 14336], w2 [14336, 4096], bfloat16, random N(0, 1/fan_in)
weights; calibration is each expert's routed tokens, about 2048 per expert (counts drawn
around it), zero-padded to one length [e, t, d] in bfloat16, with log-normal channel scales
and neighbouring channels correlated. ``--small`` divides every size by 16 (CPU smoke run).

For every format (2:4, Samoyeds 1:2:128, unstructured 50%) and method, ``prune_experts``
prunes the layer (dense output: the compression into the format, ``from_dense``, is not
timed here), w1 and w3 first, then w2 on the hidden state of
the pruned w1/w3, expert by expert. Each case runs twice: the first run compiles, the second
is timed (``block_until_ready`` on every pruned weight). Also timed: ``sparsegpt_prune`` of
one w1 and one w2 matrix alone, Hessian given (the per-matrix cost without the report).

Prints a table; ``--out`` writes every number as JSON.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from samoyeds_jax import pruning
from samoyeds_jax.atomic import write_json
from samoyeds_jax import sparsegpt as sg

FORMATS = {
    "nm2:4": dict(format="nm", n=2, m=4),
    "samoyeds1:2:128": dict(format="samoyeds", n_sel=1, m_sel=2, v=128),
    "unstructured50": dict(format="unstructured", sparsity=0.5),
}
METHODS = ("magnitude", "wanda", "sparsegpt")


def random_layer(*, e: int, d: int, f: int, seed: int) -> dict[str, jax.Array]:
    """{"w1": [e, d, f], "w3": [e, d, f], "w2": [e, f, d]} bfloat16, N(0, 1/fan_in)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "w1": (jax.random.normal(k1, (e, d, f)) / np.sqrt(d)).astype(jnp.bfloat16),
        "w3": (jax.random.normal(k3, (e, d, f)) / np.sqrt(d)).astype(jnp.bfloat16),
        "w2": (jax.random.normal(k2, (e, f, d)) / np.sqrt(f)).astype(jnp.bfloat16),
    }


def routed_calibration(*, e: int, d: int, tokens: int, seed: int) -> tuple[jax.Array, list[int]]:
    """Per-expert routed tokens [e, t, d] bfloat16, zero-padded; counts around ``tokens``."""
    rng = np.random.default_rng(seed)
    counts = [int(c) for c in rng.integers(tokens * 3 // 4, tokens * 5 // 4 + 1, e)]
    t = max(counts)
    key = jax.random.key(seed)
    scale = jnp.exp(jax.random.normal(jax.random.fold_in(key, 0), (d,)))
    z = jax.random.normal(jax.random.fold_in(key, 1), (e, t, d))
    x = (z + jnp.roll(z, 1, axis=-1) + jnp.roll(z, 2, axis=-1)) * scale  # correlated channels
    valid = jnp.arange(t)[None, :, None] < jnp.asarray(counts)[:, None, None]
    return jnp.where(valid, x, 0.0).astype(jnp.bfloat16), counts


def time_prune(layer: dict, calib: jax.Array, config: pruning.PruneConfig) -> dict:
    """Compile run, then the timed run of prune_experts on one layer."""
    params = {"layer": layer}
    calibration = {"layer": calib}
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        out, report = pruning.prune_experts(params, config, calibration, progress=False)
        jax.block_until_ready(out)
        runs.append(time.perf_counter() - start)
        del out
    return dict(seconds=runs[1], seconds_first_run=runs[0],
                mean_output_rel_error=report.mean_output_rel_error,
                output_rel_error={p: r.output_rel_error for p, r in report.layers.items()},
                fallback_matrices=sum(len(v) for v in report.fallback_matrices.values()))


def time_matrix(w: jax.Array, h: jax.Array, pattern: tuple, repeats: int) -> float:
    """Median seconds of sparsegpt_prune on one matrix (compiled first)."""
    jax.block_until_ready(sg.sparsegpt_prune(w, h, pattern))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(sg.sparsegpt_prune(w, h, pattern))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="every size / 16 (CPU smoke run)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3, help="per-matrix timing repeats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    div = 16 if args.small else 1
    d, f, tokens = 4096 // div, 14336 // div, 2048 // div
    layer = random_layer(e=args.experts, d=d, f=f, seed=args.seed)
    calib, counts = routed_calibration(e=args.experts, d=d, tokens=tokens, seed=args.seed + 1)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
          f"layer: {args.experts} experts, d={d}, f={f}; routed tokens per expert {counts}")

    rows, per_matrix = [], []

    def write():  # after every row: a cut-off run keeps what it measured
        if not args.out:
            return
        write_json(args.out, dict(args=vars(args), device=device.device_kind,
                                  backend=jax.default_backend(), jax=jax.__version__,
                                  shapes=dict(experts=args.experts, d=d, f=f),
                                  tokens_per_expert=counts, layer=rows, per_matrix=per_matrix))

    for fmt in args.formats.split(","):
        for method in args.methods.split(","):
            config = pruning.PruneConfig(method=method, output="dense", **FORMATS[fmt])
            row = dict(format=fmt, method=method, **time_prune(layer, calib, config))
            rows.append(row)
            print(f"{fmt:<16} {method:<10} {row['seconds']:8.2f} s/layer  (first run "
                  f"{row['seconds_first_run']:.1f} s)  mean output error "
                  f"{row['mean_output_rel_error']:.4f}", flush=True)
            write()

    if "sparsegpt" in args.methods.split(","):
        h1 = sg.hessian(calib[0])
        x0 = calib[0].astype(jnp.float32)  # expert 0's tokens: w2 reads silu(x w1) * (x w3)
        hidden = (jax.nn.silu(x0 @ layer["w1"][0].astype(jnp.float32))
                  * (x0 @ layer["w3"][0].astype(jnp.float32)))
        h2 = sg.hessian(hidden)
        for fmt in args.formats.split(","):
            config = pruning.PruneConfig(method="sparsegpt", output="dense", **FORMATS[fmt])
            for name, w, h in (("w1", layer["w1"][0], h1), ("w2", layer["w2"][0], h2)):
                seconds = time_matrix(w, h, config.pattern(*w.shape), args.repeats)
                per_matrix.append(dict(format=fmt, weight=name, shape=list(w.shape),
                                       seconds=seconds))
                print(f"sparsegpt_prune {fmt:<16} {name} {list(w.shape)}: {seconds:.3f} s",
                      flush=True)
                write()

    print(f"\n{'format':<16} " + " ".join(f"{m:>10}" for m in args.methods.split(",")))
    for fmt in args.formats.split(","):
        cells = {r["method"]: r["seconds"] for r in rows if r["format"] == fmt}
        print(f"{fmt:<16} " + " ".join(f"{cells[m]:>9.2f}s" for m in args.methods.split(",")))
    write()
    if args.out:
        print(f"wrote {args.out}")

if __name__ == "__main__":
    main()

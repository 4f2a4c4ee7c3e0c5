"""The routing plan at decode: the comparison build against the sort-and-scatter build.

Every MoE layer builds a ``RoutingPlan`` from its router's top-k each step. At batch 1 a
Qwen3-30B-A3B step has 48 of them, each a handful of tiny kernels, so the plan's launches
weigh more than its arithmetic. For each model's (k, experts) and batch this times, inside one
jitted loop, ``--layers`` plans built one after another (each from the last one's output, so
none can be hoisted or run in parallel), both ways:

* ``sort``: a stable argsort, a scatter-add of the expert sizes, scatters of ids, weights and
  rows (the build for large routings);
* ``comparison``: ranks, sizes and rows by comparing every pair (the build at or below
  ``routing_plan.SMALL_ASSIGNMENTS`` assignments).

Reported: microseconds per plan, and the kernels one plan compiles to (instructions of the
optimized HLO that launch: fusions, sorts, scatters, custom calls). The two plans are checked
equal first.

    PYTHONPATH=. python3 examples/bench_routing_plan.py --out benchmarks/routing_plan_h100.json
    PYTHONPATH=. python3 examples/bench_routing_plan.py --tiny --out /tmp/plan.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import routing_plan
from pallas_kernels.moe_tiles import default_block_t
from samoyeds_jax.atomic import write_json

# name: (top_k, experts)
ROUTINGS = {"mixtral-8x7b": (2, 8), "qwen3-30b-a3b": (8, 128), "deepseek-v2-lite": (6, 64),
            "qwen1.5-moe": (4, 60)}
_LAUNCHES = re.compile(r"^\s*\S+ = \S+ (fusion|sort|scatter|custom-call|gather|reduce|"
                       r"dynamic-update-slice|copy)\(", re.M)


def _plan(idx, w, *, e, block_t, by_comparison):
    return routing_plan._build(idx, w, num_experts=e, block_t=block_t,
                               by_comparison=by_comparison)


def kernels(t: int, k: int, e: int, block_t: int, by_comparison: bool) -> int:
    """Launching instructions in the optimized HLO of one plan's build."""
    idx = jnp.zeros((t, k), jnp.int32)
    w = jnp.zeros((t, k), jnp.float32)
    fn = jax.jit(lambda i, w: _plan(i, w, e=e, block_t=block_t, by_comparison=by_comparison))
    text = fn.lower(idx, w).compile().as_text()
    entry = text[text.index("ENTRY"):]
    return len(_LAUNCHES.findall(entry))


def time_plans(t: int, k: int, e: int, block_t: int, by_comparison: bool, layers: int,
               repeats: int) -> float:
    """Microseconds per plan: ``layers`` dependent builds in one jitted loop, the median of
    ``repeats`` runs after a warm-up."""
    rng = np.random.default_rng(0)
    idx0 = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32))
    w0 = jnp.asarray(rng.random((t, k)).astype(np.float32))

    def body(_, carry):
        idx, w = carry
        plan = _plan(idx, w, e=e, block_t=block_t, by_comparison=by_comparison)
        # the next routing depends on this plan (a rotation of the experts by its first row)
        shift = plan.sorted_ids[0] % 2 + plan.rows[0] % 2 + 1
        return (idx + shift) % e, w * 0.5 + plan.weights[0]

    run = jax.jit(lambda idx, w: jax.lax.fori_loop(0, layers, body, (idx, w)))
    jax.block_until_ready(run(idx0, w0))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(idx0, w0))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / layers * 1e6


def check_equal(t: int, k: int, e: int, block_t: int) -> None:
    rng = np.random.default_rng(1)
    idx = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32))
    w = jnp.asarray(rng.random((t, k)).astype(np.float32))
    a, b = (_plan(idx, w, e=e, block_t=block_t, by_comparison=c) for c in (True, False))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,64", help="tokens per step")
    ap.add_argument("--layers", type=int, default=480, help="dependent plans per jitted loop")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: two routings, 1 and 8 tokens")
    ap.add_argument("--out", required=True, help="JSON results path")
    args = ap.parse_args(argv)
    routings = dict(ROUTINGS)
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        routings = {k: routings[k] for k in ("mixtral-8x7b", "qwen3-30b-a3b")}
        batches, args.layers, args.repeats = [1, 8], 16, 2
    rows = []
    for name, (k, e) in routings.items():
        for t in batches:
            if t * k > routing_plan.SMALL_ASSIGNMENTS:
                continue
            block_t = default_block_t(t, k, e)
            check_equal(t, k, e, block_t)
            row = dict(model=name, tokens=t, top_k=k, experts=e, block_t=block_t)
            for how, flag in (("sort", False), ("comparison", True)):
                row[f"{how}_us"] = time_plans(t, k, e, block_t, flag, args.layers, args.repeats)
                row[f"{how}_kernels"] = kernels(t, k, e, block_t, flag)
            row["speedup"] = row["sort_us"] / row["comparison_us"]
            rows.append(row)
            print(f"{name:18s} t={t:3d} k={k} e={e:3d} bt={block_t:2d}: sort {row['sort_us']:7.2f} us "
                  f"({row['sort_kernels']} kernels), comparison {row['comparison_us']:7.2f} us "
                  f"({row['comparison_kernels']} kernels), {row['speedup']:.2f}x", flush=True)
    result = dict(device=str(jax.devices()[0].device_kind), layers=args.layers,
                  repeats=args.repeats, rows=rows)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

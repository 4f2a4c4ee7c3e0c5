"""Where one MoE layer call's time goes: a ``jax.profiler`` trace of ``bench_moe``'s timed loop
(10 rounds over 2 layers), summarized per call: the device span, the time some kernel runs, and
the kernels by total time (``examples/trace_summary.py``). The gap between span and busy time
is launch latency between the many small kernels of a call.

    PYTHONPATH=. python3 examples/trace_moe.py --out benchmarks/moe_trace_summary.json \\
        --cases qwen3-30b-a3b:1 mixtral-8x7b:1 mixtral-8x7b:64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_moe as bm  # noqa: E402
import trace_summary  # noqa: E402
from pallas_kernels import mgpu_moe  # noqa: E402
from pallas_kernels import moe_matmul as mm  # noqa: E402
from pallas_kernels import moe_tiles as mt  # noqa: E402
from pallas_kernels.routing_plan import RoutingPlan  # noqa: E402

ROUNDS, LAYERS = 10, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="*", default=["qwen3-30b-a3b:1", "mixtral-8x7b:1",
                                                   "mixtral-8x7b:64"], help="model:tokens")
    args = ap.parse_args()
    result = {}
    for case in args.cases:
        model, t = case.split(":")[0], int(case.split(":")[1])
        d, f, e, k, _ = bm.MODELS[model]
        key = jax.random.key(0)
        dense = bm.make_layers("dense", key, LAYERS, e, d, f)
        sparse = [tuple(jax.jit(bm.HOPPER["samoyeds_sp"])(w) for w in layer)
                  for layer in bm.make_layers("samoyeds", key, LAYERS, e, d, f)]
        x = jax.random.normal(key, (t, d), jnp.float32).astype(jnp.bfloat16)
        topk_w, topk_idx = jax.lax.top_k(jax.random.uniform(jax.random.key(2), (t, e)), k)
        bt = mt.default_block_t(t, k, e)
        plan = RoutingPlan.build(topk_idx, jax.nn.softmax(topk_w, -1), num_experts=e, block_t=bt)
        for name, fn, layers, config in (
                ("fused", mm.moe_ffn, dense, mt.default_config(t * k, d, f, block_t=bt)),
                ("samoyeds_sp", mgpu_moe.moe_ffn_mgpu, sparse, None)):
            run = bm.make_loop(fn, config)
            jax.block_until_ready(run(x, plan, layers, 2))  # compile + warm
            with tempfile.TemporaryDirectory() as tmp:
                with jax.profiler.trace(tmp, create_perfetto_trace=True):
                    jax.block_until_ready(run(x, plan, layers, ROUNDS))
                s = trace_summary.summarize(tmp, top=15)
            calls = ROUNDS * LAYERS
            s["per_call_span_us"] = s["span_us"] / calls
            s["per_call_kernel_busy_us"] = s["kernel_busy_us"] / calls
            result[f"{model}_t{t}_{name}"] = s
            print(f"{model} t={t} {name}: span {s['per_call_span_us']:.1f} us/call, kernels "
                  f"busy {s['per_call_kernel_busy_us']:.1f} us/call", flush=True)
            for kname, count, dur in s["top"]:
                print(f"   {dur / calls:8.2f} us/call {count / calls:5.1f}x  {kname}")
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

"""Decode step time of experts fetched from pinned host inside one jitted step
(``offload_engines.in_jit``).

For each token count, in one process, all as single jitted programs:

* compute-only: ``decode_step`` with one device-resident expert stack reused by every
  block (nothing moves);
* transfer-only: a program that only fetches what a step fetches (``slots_per_block``
  experts per block from the pinned-host stacks);
* ``gpu_only`` (when every expert fits in 80% of device memory), ``on_demand``,
  ``pregated``: median wall time of ``InJitDecoder.step`` until its output is ready,
  peak device memory, and the overlap ``(compute + transfer - step) / min(compute, transfer)``;
  the compiled HLO of on_demand/pregated is written next to the JSON, with counts of its
  host-transfer ops (``in_jit.host_transfer_ops``).

Cases: ``switch`` (12 MoE blocks, d 768, f 3072, 8 experts, top-1, ReLU experts, bf16) and
``mixtral`` (32 blocks, d 4096, f 14336, 8 experts, top-2, SwiGLU, bf16: 90 GB of experts,
pinned host above the default 64 GB cap is requested below).

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 examples/bench_offload_jit.py --out benchmarks \\
        --case switch --tokens 1,8192 --trace
    PYTHONPATH=. python3 examples/bench_offload_jit.py --smoke --out /tmp/offload_jit   # CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

# pinned host memory beyond the default cap (the dense Mixtral-shaped experts are 90 GB)
os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "100")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from samoyeds_jax.expert_store import (device_memory_stats, pinned_host_sharding,  # noqa: E402
                                       tree_nbytes)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offload_engines import SimpleMoEBlock, overlap_fraction  # noqa: E402
from offload_engines import in_jit as oj  # noqa: E402

SHAPES = {  # layers, d, f, experts, top_k, attn_width, gated
    "switch": (12, 768, 3072, 8, 1, 2304, False),
    "mixtral": (32, 4096, 14336, 8, 2, 6144, True),
    "smoke": (3, 64, 128, 4, 2, 192, True),
}


def _median_time(fn, inputs, steps: int) -> tuple[float, list[float]]:
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(inputs[i % len(inputs)]))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def _peak(device) -> int | None:
    stats = device_memory_stats(device) or {}
    return stats.get("peak_bytes_in_use")


def build(case: str, device):
    layers, d, f, e, k, width, gated = SHAPES[case]
    block = SimpleMoEBlock(num_experts=e, top_k=k, dtype=jnp.bfloat16)
    keys = jax.random.split(jax.random.key(7), layers)
    params = [block.init_params(kk, d_model=d, attn_width=width, device=device) for kk in keys]
    for l in range(layers - 1):   # pre-gate of block l starts as block l+1's router
        params[l]["pregate"] = params[l + 1]["router"]
    host = pinned_host_sharding(device)
    stacks = []
    for l in range(layers):   # one layer at a time on the device, then to pinned host
        ks = jax.random.split(jax.random.key(100 + l), 3)
        tree = {"w1": jax.random.normal(ks[0], (e, d, f), jnp.bfloat16) * d ** -0.5,
                "w2": jax.random.normal(ks[1], (e, f, d), jnp.bfloat16) * f ** -0.5}
        if gated:
            tree["w3"] = jax.random.normal(ks[2], (e, d, f), jnp.bfloat16) * d ** -0.5
        stacks.append(jax.block_until_ready(jax.device_put(tree, host)))
        del tree
    return block, params, stacks, (layers, d, e, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--case", default="switch", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1,8192")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trace", action="store_true", help="jax.profiler trace of pregated")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    ap.add_argument("--tie-prefetch", action="store_true",
                    help="InJitConfig.tie_prefetch for pregated (optimization_barrier)")
    args = ap.parse_args()
    case = "smoke" if args.smoke else args.case
    tokens = [1, 3] if args.smoke else [int(t) for t in args.tokens.split(",")]
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0]
    block, params, stacks, (L, d, E, k) = build(case, device)
    store_bytes = sum(tree_nbytes(s) for s in stacks)
    limit = (device_memory_stats(device) or {}).get("bytes_limit")
    fits = limit is None or store_bytes < 0.8 * limit
    print(f"[{case}] {L} blocks, experts {store_bytes / 1e9:.2f} GB pinned host, "
          f"device {device.device_kind}", flush=True)
    fns = block.fns()
    resident0 = oj.device_stacks(stacks[:1], device=device)[0]
    result = {"case": case, "device": str(device.device_kind), "store_bytes": store_bytes,
              "rows": []}
    for t in tokens:
        rng = np.random.default_rng(t)
        hs = [jax.device_put(jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16), device)
              for _ in range(4)]
        row: dict = {"tokens": t, "slots_per_block": oj.slots_per_block(t, k, E)}
        cfg = oj.InJitConfig(policy="gpu_only")
        # weights are arguments, never closed over (closed-over arrays would be constants)
        compute = jax.jit(functools.partial(oj.decode_step, fns, cfg))
        row["compute_only_s"], _ = _median_time(
            lambda h: compute(params, [resident0] * L, h), hs, args.steps)
        # what a step moves: n distinct experts per block, fetched as the policies fetch them
        topk = jax.device_put(jnp.arange(t * k, dtype=jnp.int32).reshape(t, k) % E, device)
        xfer = jax.jit(lambda stacks, topk: [oj.fetch_block(s, topk)[0] for s in stacks])
        row["transfer_only_s"], _ = _median_time(lambda i: xfer(stacks, i), [topk], args.steps)
        row["runs"] = []
        for policy in ["on_demand", "pregated"] + (["gpu_only"] if fits else []):
            # on_demand routes each block by its own router, so its fetch waits for that
            # block's router (with block l-1's pre-gate ids it would be a prefetch in all
            # but name: the one program's dataflow lets the copy start a block early)
            dec = oj.InJitDecoder(fns, params, stacks, config=oj.InJitConfig(
                policy=policy, tie_prefetch=args.tie_prefetch and policy == "pregated",
                routing_source="router" if policy == "on_demand" else "pregate"),
                                  device=device)
            step_s, all_s = _median_time(dec.step, hs, args.steps)
            r = {"policy": policy, "routing_source": dec.config.routing_source, "step_s": step_s,
                 "step_s_all": all_s,
                 "tie_prefetch": dec.config.tie_prefetch,
                 "bytes_per_step": dec.bytes_per_step(t, k), "traces": dec.traces,
                 "peak_bytes_in_use_so_far": _peak(device)}
            r["overlap_fraction"] = overlap_fraction(step_s, row["compute_only_s"],
                                                     row["transfer_only_s"])
            r["vs_max_compute_transfer"] = step_s / max(row["compute_only_s"],
                                                        row["transfer_only_s"])
            if policy != "gpu_only":   # the GPU-compiled program: are the copies async?
                hlo = dec.lower(hs[0]).compile().as_text()
                with open(os.path.join(args.out, f"hlo_{case}_t{t}_{policy}.txt"), "w") as fp:
                    fp.write(hlo)
                r["hlo_ops"] = oj.host_transfer_ops(hlo)
            if args.trace and policy == "pregated":
                path = os.path.join(args.out, f"trace_{case}_t{t}_{policy}")
                with jax.profiler.trace(path, create_perfetto_trace=True):
                    for i in range(2):
                        dec.step(hs[i]).block_until_ready()
                r["trace_dir"] = path
            row["runs"].append(r)
            print(f"[{case} t={t}] {policy:10s} step {step_s * 1e3:9.2f} ms  compute-only "
                  f"{row['compute_only_s'] * 1e3:8.2f}  transfer-only "
                  f"{row['transfer_only_s'] * 1e3:8.2f}  x max(c, x) "
                  f"{r['vs_max_compute_transfer']:.2f}  overlap {r['overlap_fraction']:.2f}",
                  flush=True)
            del dec
        by = {r["policy"]: r["step_s"] for r in row["runs"]}
        row["pregated_speedup_vs_on_demand"] = by["on_demand"] / by["pregated"]
        result["rows"].append(row)
        with open(os.path.join(args.out, f"offload_jit_{case}.json"), "w") as fp:
            json.dump(result, fp, indent=1)


if __name__ == "__main__":
    main()

"""Benchmark one MoE layer's experts: dense ragged_dot vs fused Pallas (dense, 2:4, Samoyeds).

For each model shape (../shared/model_shapes.json values, copied below) and token count:

  (a) ``rd``        dense experts, the ``xla`` expert op (``expert_op.ragged_dot_experts``: sorted copy + 3 x jax.lax.ragged_dot)
  (b) ``fused``     dense experts, ``moe_ffn`` (our fused gather kernels: the honest dense baseline)
  (c) ``nm24``      2:4 experts (``NMSparse``), ``moe_ffn``
  (d) ``samoyeds``  1:2:128 + 2:4 experts (``SamoyedsSparse``), ``moe_ffn``

Each variant runs inside one jitted ``fori_loop`` whose body calls the layer on several layers'
weights in turn (rotating past the 50 MB L2), with a cheap RMS renormalisation between layers
so values stay away from 0 and inf. Reported: median over repeats of (call time / calls),
routing plan built once outside the loop (the same input for every variant). Random uniform
top-k routing. Correctness: at one token count per model every Pallas variant is compared with
the ``xla`` expert op on the same (densified) weights.

Also: the largest decode batch that fits in GPU memory at sequence lengths 1024 and 4096 with
dense vs Samoyeds experts, COMPUTED from parameter/KV-cache bytes and the device's total
memory (nvidia-smi) less 1 GiB of CUDA context and 2 GiB for activations, not by allocating.

    PYTHONPATH=. python3 examples/bench_moe.py --out benchmarks/moe.json
    PYTHONPATH=. python3 examples/bench_moe.py --models tiny --tokens 1 33 --out /tmp/moe.json  # CPU smoke
    PYTHONPATH=. python3 examples/bench_moe.py --expand block --out moe_block.json  # block loads

Prints a table last; writes every row as JSON (rewritten after each model).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as backend_lib
from pallas_kernels import expert_op, mgpu_moe
from pallas_kernels import moe_matmul as mm
from pallas_kernels import moe_tiles as mt
from pallas_kernels.formats import NMSparse, SamoyedsSparse, pack_meta
from pallas_kernels.routing_plan import RoutingPlan
from pallas_kernels.sparse_mma_layout import to_wgmma_sp
from pallas_kernels.sparse_mma_matmul import wgmma_sp_grouped_matmul
from pallas_kernels.transposed_format import TransposedSparse

# name: (d_model, d_ff, experts, top_k, moe layers); from the models' config.json files.
MODELS = {
    "mixtral-8x7b": (4096, 14336, 8, 2, 32),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 48),
    "deepseek-v2-lite": (2048, 1408, 64, 6, 26),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4, 24),
    "tiny": (256, 256, 8, 2, 2),  # CPU smoke test of the script
}
# Whole-model facts for the max-batch estimate: total parameters, KV-cache bytes per token
# (bf16; layers * 2 * kv_heads * head_dim * 2, or MLA's (kv_lora_rank + rope_dim) * 2 per layer).
MODEL_FACTS = {
    "mixtral-8x7b": dict(total_params=46.7e9, kv_bytes_per_token=32 * 2 * 8 * 128 * 2),
    "qwen3-30b-a3b": dict(total_params=30.5e9, kv_bytes_per_token=48 * 2 * 4 * 128 * 2),
    "deepseek-v2-lite": dict(total_params=15.7e9, kv_bytes_per_token=27 * (512 + 64) * 2),
    "qwen1.5-moe-a2.7b": dict(total_params=14.3e9, kv_bytes_per_token=24 * 2 * 16 * 128 * 2),
}
TOKENS = (1, 16, 64, 256, 1024, 4096)
VARIANTS = ("rd", "fused", "nm24", "samoyeds", "nm24_h", "samoyeds_h", "nm24_sp", "samoyeds_sp",
            "nm24_sp3", "samoyeds_sp3")
# *_h / *_sp: the same 2:4 / Samoyeds weights in a Hopper layout, run by the expert-grouped
# Mosaic GPU kernels (``mgpu_moe``): *_h TransposedSparse (expanded in registers, dense wgmma),
# *_sp WgmmaSparseA (sparse tensor cores); the others run the Pallas Triton kernels.
# *_sp3: the *_sp weights with gate and up in two launches instead of one (three a layer).
HOPPER = {"nm24_h": TransposedSparse.from_nm, "samoyeds_h": TransposedSparse.from_samoyeds,
          "nm24_sp": to_wgmma_sp, "samoyeds_sp": to_wgmma_sp}
ROTATE_BYTES = 200e6  # dense weight bytes touched per loop iteration, at least (> 4x L2)


def gpu_memory() -> dict[str, float]:
    """Device memory in bytes from nvidia-smi (before JAX allocates), or {} off GPU."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total,memory.used,memory.free",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
        total, used, free = (float(v) * 2**20 for v in out.splitlines()[0].split(","))
        return dict(total=total, used=used, free=free)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return {}


# ----------------------------------------------------------------------------- weights


def random_dense(key, e, k, n, dtype=jnp.bfloat16):
    return (jax.random.normal(key, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)


_PAIRS = np.asarray([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], np.int32)


def random_24_parts(key, e, k, n, dtype=jnp.bfloat16):
    """values [e, K/2, N] and meta [e, K/32, N] of a random valid 2:4 matrix stack."""
    kv, kp = jax.random.split(key)
    values = (jax.random.normal(kv, (e, k // 2, n), jnp.float32) / np.sqrt(k / 2)).astype(dtype)
    pair = jax.random.randint(kp, (e, k // 4, n), 0, 6)
    pos = jnp.asarray(_PAIRS)[pair]  # [e, K/4, N, 2]
    pos = jnp.moveaxis(pos, -1, -2).reshape(e, k // 2, n)  # slot s of group g at row 2g+s
    return values, pack_meta(pos, 2, 4)


def random_nm(key, e, k, n, dtype=jnp.bfloat16) -> NMSparse:
    values, meta = random_24_parts(key, e, k, n, dtype)
    return NMSparse(values=values, meta=meta, n=2, m=4, k=k)


def random_samoyeds(key, e, k, n, dtype=jnp.bfloat16) -> SamoyedsSparse:
    k1, k2 = jax.random.split(key)
    values, meta = random_24_parts(k1, e, k, n // 2, dtype)
    sel = jax.random.randint(k2, (e, k // 128, n // 2), 0, 2).astype(jnp.int8)
    return SamoyedsSparse(values=values, meta=meta, sel=sel, n_sel=1, m_sel=2, v=128, k=k,
                          n_out=n)


def make_layers(kind: str, key, n_layers: int, e: int, d: int, f: int) -> list[tuple]:
    make = {"dense": random_dense, "nm24": random_nm, "samoyeds": random_samoyeds}[kind]
    layers = []
    for key_l in jax.random.split(key, n_layers):
        k1, k3, k2 = jax.random.split(key_l, 3)
        layers.append((make(k1, e, d, f), make(k3, e, d, f), make(k2, e, f, d)))
    return layers


def nbytes(w) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w))


# ----------------------------------------------------------------------------- timing


def one_launch_per_stack(x, tile_expert, num_tiles, a, **kw) -> jax.Array:
    """``wgmma_sp_grouped_matmul`` with one launch per stack (gate and up apart): the same-run
    baseline of the joined gate/up launch."""
    stacks = a if isinstance(a, (tuple, list)) else (a,)
    return jnp.concatenate([wgmma_sp_grouped_matmul(x, tile_expert, num_tiles, s, **kw)
                            for s in stacks], axis=1)


def make_loop(fn: Callable, config) -> Callable:
    """jit(x, plan, layers, n): n rounds of the layer over every layer's weights."""

    def run(x, plan, layers, n):
        def body(_, x):
            for w1, w3, w2 in layers:
                y = fn(x, plan, w1, w3, w2, config=config).astype(jnp.float32)
                x = (y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6)).astype(
                    x.dtype)
            return x

        return jax.lax.fori_loop(0, n, body, x)

    return jax.jit(run)


def time_loop(run, x, plan, layers, *, target_s: float, repeats: int) -> dict[str, Any]:
    n_layers = len(layers)
    t0 = time.perf_counter()
    jax.block_until_ready(run(x, plan, layers, 1))  # compile + first run
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(run(x, plan, layers, 2))
    per_iter = (time.perf_counter() - t0) / 2
    n = int(min(2000, max(3, target_s / max(per_iter, 1e-6))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x, plan, layers, n))
        samples.append((time.perf_counter() - t0) / (n * n_layers))
    return dict(us=statistics.median(samples) * 1e6, us_min=min(samples) * 1e6,
                spread=(max(samples) - min(samples)) / statistics.median(samples),
                iters=n, compile_s=compile_s)


def densify(w) -> jax.Array:
    return w.to_dense() if hasattr(w, "to_dense") else w


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def with_expand(config: mt.MoeFfnConfig, expand: str) -> mt.MoeFfnConfig:
    """``config`` with ``MoeTiles.expand`` set in both kernels (dense weights ignore it)."""
    return mt.MoeFfnConfig(gate_up=dataclasses.replace(config.gate_up, expand=expand),
                           down=dataclasses.replace(config.down, expand=expand))


def sweep_configs(t: int) -> dict[str, tuple[int | None, mt.MoeFfnConfig]]:
    """Alternative (block_t or None = default, tiles) tried with --sweep-*.

    Names: bt row tile, g gate/up (block_n, block_k, warps w, stages s), d down likewise.
    """
    T = mt.MoeTiles
    if t <= 64:
        specs = {"g128k128_d32k128": (None, (128, 128, 4, 3), (32, 128, 4, 3)),
                 "g32k128_d32k128": (None, (32, 128, 4, 3), (32, 128, 4, 3)),
                 "g64k64s4_d64k64s4": (None, (64, 64, 4, 4), (64, 64, 4, 4))}
    else:
        specs = {"bt128_g64k64w8s2_d64k64w8s2": (128, (64, 64, 8, 2), (64, 64, 8, 2)),
                 "bt128_g128k64w8s2_d128k64w8s2": (128, (128, 64, 8, 2), (128, 64, 8, 2)),
                 "bt64_g64k64w4s3_d128k64w4s3": (64, (64, 64, 4, 3), (128, 64, 4, 3)),
                 "bt64_g128k64w8s3_d128k64w8s3": (64, (128, 64, 8, 3), (128, 64, 8, 3))}
    return {name: (bt, mt.MoeFfnConfig(
        gate_up=T(block_n=g[0], block_k=g[1], num_warps=g[2], num_stages=g[3]),
        down=T(block_n=dn[0], block_k=dn[1], num_warps=dn[2], num_stages=dn[3])))
        for name, (bt, g, dn) in specs.items()}


# ----------------------------------------------------------------------------- max batch


def max_batch(model: str, free_bytes: float) -> dict[str, Any]:
    d, f, e, _, layers = MODELS[model]
    facts = MODEL_FACTS[model]
    expert_params = layers * e * 3 * d * f
    dense_bytes = facts["total_params"] * 2
    sam_ratio = SamoyedsSparse.nbytes_for((1, d, f), jnp.bfloat16) / (d * f * 2)
    sam_bytes = dense_bytes - expert_params * 2 * (1 - sam_ratio)
    reserve = 2 * 2**30  # activations, workspace, allocator slack
    out: dict[str, Any] = dict(model=model, free_gib=free_bytes / 2**30,
                               dense_weights_gib=dense_bytes / 2**30,
                               samoyeds_weights_gib=sam_bytes / 2**30,
                               kv_bytes_per_token=facts["kv_bytes_per_token"])
    for seq in (1024, 4096):
        per_seq = facts["kv_bytes_per_token"] * seq
        bd = max(0, int((free_bytes - reserve - dense_bytes) // per_seq))
        bs = max(0, int((free_bytes - reserve - sam_bytes) // per_seq))
        out[f"seq{seq}"] = dict(dense=bd, samoyeds=bs,
                                ratio=(bs / bd) if bd else None)
    return out


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="*", default=[m for m in MODELS if m != "tiny"])
    ap.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--check-tokens", type=int, default=64)
    ap.add_argument("--target-s", type=float, default=0.03)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new cases after")
    ap.add_argument("--configs", default="", help="JSON {variant: {t: MoeFfnConfig kwargs}}")
    ap.add_argument("--expand", choices=["rows", "block"], default="rows",
                    help="MoeTiles.expand of every sparse config (default tiles and sweeps)")
    ap.add_argument("--sweep-models", nargs="*", default=[])
    ap.add_argument("--sweep-tokens", nargs="*", type=int, default=[])
    args = ap.parse_args()
    start = time.perf_counter()
    mem = gpu_memory()
    results: dict[str, Any] = dict(
        device=backend_lib.device_kind(), jax=jax.__version__, memory=mem, rows=[], checks=[],
        max_batch=[], method=("median of repeats of one jitted fori_loop over the layer on "
                              "several layers' weights; per-call microseconds"))
    overrides = json.loads(args.configs) if args.configs else {}

    def save():
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)

    key = jax.random.PRNGKey(0)
    for model in args.models:
        d, f, e, k, _ = MODELS[model]
        layer_bytes = 3 * e * d * f * 2
        touched = 3 * min(e, k) * d * f * 2  # dense bytes one token touches per layer
        n_layers = int(min(4, max(2, -(-ROTATE_BYTES // touched))))
        if model == "tiny":
            n_layers = 2
        print(f"== {model}: d={d} f={f} e={e} k={k}, {n_layers} layers x "
              f"{layer_bytes / 1e9:.2f} GB dense", flush=True)
        key, kd, kn, ks, kx = jax.random.split(key, 5)
        weights = {"rd": make_layers("dense", kd, n_layers, e, d, f)}
        weights["fused"] = weights["rd"]
        if "nm24" in args.variants:
            weights["nm24"] = make_layers("nm24", kn, n_layers, e, d, f)
        if any(v.startswith("samoyeds") for v in args.variants):
            weights["samoyeds"] = make_layers("samoyeds", ks, n_layers, e, d, f)
        if any(v.startswith("nm24_") for v in args.variants) and "nm24" not in weights:
            weights["nm24"] = make_layers("nm24", kn, n_layers, e, d, f)
        for v, conv in HOPPER.items():
            if v in args.variants:  # converted once, at load
                try:
                    weights[v] = [tuple(jax.jit(conv)(w) for w in layer)
                                  for layer in weights[v.rsplit("_", 1)[0]]]
                except ValueError as exc:  # shapes the layout cannot hold: recorded, skipped
                    results.setdefault("skipped", []).append(dict(model=model, variant=v,
                                                                  error=str(exc)))
                    print(f"   {v} skipped: {exc}", flush=True)
        for v in ("nm24_sp3", "samoyeds_sp3"):
            if v in args.variants and v[:-1] in weights:
                weights[v] = weights[v[:-1]]
        fns = {v: mm.moe_ffn for v in VARIANTS}
        fns.update({v: mgpu_moe.moe_ffn_mgpu for v in HOPPER})
        fns.update({v: functools.partial(mgpu_moe.moe_ffn_mgpu, matmul=one_launch_per_stack)
                    for v in ("nm24_sp3", "samoyeds_sp3")})
        fns["rd"] = lambda x, plan, w1, w3, w2, config: expert_op.ragged_dot_experts(
            x, plan, w1, w3, w2)
        for t in args.tokens:
            if time.perf_counter() - start > args.budget_s:
                print(f"   budget reached, skipping {model} t={t}", flush=True)
                continue
            kx, k1, k2, k3 = jax.random.split(kx, 4)
            x = jax.random.normal(k1, (t, d), jnp.float32).astype(jnp.bfloat16)
            scores = jax.random.uniform(k2, (t, e))
            topk_w, topk_idx = jax.lax.top_k(scores, k)  # k distinct uniform experts per token
            topk_w = jax.nn.softmax(topk_w, axis=-1)
            bt = mt.default_block_t(t, k, e)

            def build(block_t, topk_idx=topk_idx, topk_w=topk_w):
                return jax.jit(RoutingPlan.build, static_argnames=("num_experts", "block_t"))(
                    topk_idx, topk_w, num_experts=e, block_t=block_t)

            plan = build(bt)
            # the sparse-tensor-core layers' own row tile (128 at prefill: the warp-specialized
            # grouped kernel)
            bt_sp = mgpu_moe.block_t(t, k, e)
            plan_sp = plan if bt_sp == bt else build(bt_sp)
            row = dict(model=model, tokens=t, block_t=bt, layers=n_layers, block_t_sp=bt_sp)
            outs = {}
            for v in args.variants:
                if v == "rd" or v in HOPPER or v.endswith("_sp3"):
                    config = None
                else:
                    kw = overrides.get(v, {}).get(str(t))
                    config = (mt.MoeFfnConfig(gate_up=mt.MoeTiles(**kw["gate_up"]),
                                              down=mt.MoeTiles(**kw["down"]))
                              if kw else mt.default_config(t * k, d, f, block_t=bt))
                    config = with_expand(config, args.expand)
                if v not in weights:
                    continue
                plan_v = plan_sp if v in ("nm24_sp", "samoyeds_sp") else plan
                try:
                    run = make_loop(fns[v], config)
                    row[v] = time_loop(run, x, plan_v, weights[v], target_s=args.target_s,
                                       repeats=args.repeats)
                    if config is not None:
                        row[v]["config"] = repr(config)
                    if t == args.check_tokens:
                        outs[v] = jax.jit(fns[v])(x, plan_v, *weights[v][0])
                except Exception as exc:  # noqa: BLE001 - a failing variant must not stop the run
                    row[v] = dict(error=f"{type(exc).__name__}: {str(exc)[:400]}")
                    print(f"   {v} t={t} FAILED {row[v]['error']}", flush=True)
            if model in args.sweep_models and t in args.sweep_tokens:
                for v in [v for v in args.variants if v in ("fused", "nm24", "samoyeds")]:
                    for name, (sweep_bt, config) in sweep_configs(t).items():
                        if time.perf_counter() - start > args.budget_s:
                            break
                        config = with_expand(config, args.expand)
                        try:
                            run = make_loop(fns[v], config)
                            plan_v = plan if sweep_bt in (None, bt) else build(sweep_bt)
                            row[f"{v}@{name}"] = time_loop(run, x, plan_v, weights[v],
                                                           target_s=args.target_s, repeats=3)
                        except Exception as exc:  # noqa: BLE001
                            row[f"{v}@{name}"] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
                        r = row[f"{v}@{name}"]
                        print(f"   sweep {v}@{name}: " + (f"{r['us']:.1f}us" if "us" in r
                                                          else r["error"][:120]), flush=True)
            for v in VARIANTS[1:]:  # ratios against (a) and (b)
                if v in row and "us" in row[v] and "rd" in row and "us" in row["rd"]:
                    row[v]["x_vs_rd"] = row["rd"]["us"] / row[v]["us"]
                    if "fused" in row and "us" in row["fused"]:
                        row[v]["x_vs_fused"] = row["fused"]["us"] / row[v]["us"]
            results["rows"].append(row)
            save()
            print("   t=%5d bt=%3d  " % (t, bt) + "  ".join(
                f"{v}={row[v]['us']:9.1f}us" if "us" in row.get(v, {}) else f"{v}=--"
                for v in args.variants), flush=True)
            if outs:
                for v, y in outs.items():
                    if v == "rd":
                        continue
                    dense_w = [densify(w) for w in weights[v][0]]
                    ref = expert_op.ragged_dot_experts(x, plan, *dense_w)
                    y32 = np.asarray(y, np.float32)
                    check = dict(model=model, tokens=t, variant=v, rel_err=rel_err(y, ref),
                                 finite=bool(np.isfinite(y32).all()))
                    results["checks"].append(check)
                    print(f"   check {v}: rel_err={check['rel_err']:.2e} "
                          f"finite={check['finite']}", flush=True)
        del weights
        save()

    # JAX preallocates most of the device at its first use, so "used" is not a baseline:
    # usable = total - 1 GiB (CUDA context); max_batch keeps another 2 GiB for activations.
    free = mem.get("total", 0) - 2**30
    if free > 0:
        for model in args.models:
            if model in MODEL_FACTS:
                results["max_batch"].append(max_batch(model, free))
    results["elapsed_s"] = time.perf_counter() - start
    save()

    print("\nmodel               tokens   rd_us  fused_us   nm24_us   sam_us  nm24_h  sam_h"
          " nm24_sp sam_sp  sam_sp/rd sam_sp/fused  sp3/sp")
    for row in results["rows"]:
        def us(v):
            return row.get(v, {}).get("us", float("nan"))
        print(f"{row['model']:18s} {row['tokens']:6d} {us('rd'):8.1f} {us('fused'):9.1f} "
              f"{us('nm24'):9.1f} {us('samoyeds'):8.1f} {us('nm24_h'):7.1f} "
              f"{us('samoyeds_h'):6.1f} {us('nm24_sp'):7.1f} {us('samoyeds_sp'):6.1f} "
              f"{us('rd') / us('samoyeds_sp'):10.2f} {us('fused') / us('samoyeds_sp'):12.2f} "
              f"{us('samoyeds_sp3') / us('samoyeds_sp'):7.2f}")
    for mb in results["max_batch"]:
        print(f"max batch {mb['model']:18s} " + "  ".join(
            f"seq{s}: dense={mb[f'seq{s}']['dense']} samoyeds={mb[f'seq{s}']['samoyeds']}"
            for s in (1024, 4096)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

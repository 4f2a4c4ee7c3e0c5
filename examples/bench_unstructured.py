"""Benchmark ``unstructured_matmul`` on both unstructured layouts against XLA dense.

For each weight shape, sparsity and token count: XLA ``jnp.dot`` on the same pruned
dense bf16 weight (the baseline, same run); ``TiledSparse`` (column-ELL) through the
Pallas gather kernel; ``TiledBitmap`` through the Pallas expand + tensor-core kernel;
and the "densify" method (expand with XLA, then ``jnp.dot``) for large token counts.
At the sweep sparsity (80%) several kernel configs are tried per token count and the
fastest is kept (``--tuned-out`` writes them as the tuned-config table); the other
sparsities reuse the best config of the nearest swept token count.

Every op is timed inside one jitted ``fori_loop`` whose body calls it on several weight
copies (rotating past the 50 MB L2); medians of repeats. The measured device copy rate
(read + write of a 1 GiB array) turns stored bytes into "% of HBM copy rate". Every
timed output is checked against an f32 product of the pruned weight.

    PYTHONPATH=. python3 examples/bench_unstructured.py --out benchmarks/unstructured.json \\
        --tuned-out pallas_kernels/tuning/configs/unstructured.json
    PYTHONPATH=. python3 examples/bench_unstructured.py --shapes tiny --sparsities 0.8 \\
        --tokens 1,16 --out /tmp/u.json  # CPU smoke test (interpret mode)

Prints a table last; writes every row as JSON (rewritten after each row).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import backend as backend_lib
from pallas_kernels import unstructured as U
from pallas_kernels.tiled_format import TiledBitmap, TiledSparse

SHAPES = {  # name: (K, N) for y[t, N] = x[t, K] @ W[K, N]
    "mixtral_w1": (4096, 14336),
    "mixtral_w2": (14336, 4096),
    "qwen3_w1": (2048, 768),
    "tiny": (512, 256),  # a CPU smoke test of the script itself
}
SPARSITIES = (0.5, 0.7, 0.8, 0.9)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
ROTATE_BYTES = 160e6  # weight bytes cycled through per loop iteration (> 3x L2)


# --------------------------------------------------------------------------- weights
def make_weight(key, k: int, n: int, sparsity: float) -> tuple[jax.Array, TiledSparse]:
    """Random bf16 [K, N] with a uniformly random ``sparsity`` fraction zeroed."""
    kw, km = jax.random.split(key)
    w = jax.random.normal(kw, (k, n), jnp.bfloat16)
    w = jnp.where(jax.random.uniform(km, (k, n)) < sparsity, jnp.zeros_like(w), w)
    return w, TiledSparse.from_dense(np.asarray(w))


def copies(tree, r: int) -> list:
    """r distinct device buffers with the same contents (defeats L2 reuse across calls)."""
    return [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(r)]


def nbytes(tree) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- timing
def time_loop(op: Callable, x: jax.Array, ws: list, *, target_s: float = 0.02,
              repeats: int = 5) -> tuple[float, jax.Array, float]:
    """Median seconds per ``op(x, w)`` inside one jitted fori_loop over the list ``ws``,
    one output, and the seconds spent compiling.

    The barrier on (x, i) keeps XLA from hoisting the loop-invariant calls.
    """
    op = jax.jit(op)
    out = jax.eval_shape(op, x, ws[0])

    @jax.jit
    def run(x, ws, iters):
        def body(i, carry):
            xc, ys = carry
            xc, _ = lax.optimization_barrier((xc, i))
            return xc, tuple(op(xc, w) for w in ws)
        ys0 = tuple(jnp.zeros(out.shape, out.dtype) for _ in ws)
        return lax.fori_loop(0, iters, body, (x, ys0))[1]

    t0 = time.perf_counter()
    jax.block_until_ready(run(x, ws, 1))  # compile + warm
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(run(x, ws, 3))
    per_iter = max((time.perf_counter() - t0) / 3, 1e-6)
    iters = int(min(max(target_s / per_iter, 3), 5000))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ys = jax.block_until_ready(run(x, ws, iters))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (iters * len(ws)), ys[0], compile_s


def copy_rate() -> float:
    """Device copy rate in bytes/s: read + write of a 1 GiB float32 array."""
    a = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    s, _, _ = time_loop(lambda x, w: x * w, a, [jnp.float32(1.0001)], target_s=0.1)
    return 2 * a.nbytes / s


def rel_err(y, ref) -> float:
    y = jnp.asarray(y, jnp.float32)
    if not bool(jnp.isfinite(y).all()):
        return float("nan")
    return float(jnp.linalg.norm(y - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-6))


# --------------------------------------------------------------------------- configs
C = U.UnstructuredConfig
ELL_SWEEP_TOKENS = (1, 2, 4, 8, 16, 32)
BITMAP_SWEEP_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


def ell_variants(t: int) -> dict[str, U.UnstructuredConfig]:
    """Gather-kernel configs tried at 80% sparsity."""
    bt = min(U._next_pow2(t), 16)
    out = {}
    for chunk in (16, 32, 64):
        for warps in (2, 4):
            if chunk * 32 * bt > 32768:  # accumulator too large for registers
                continue
            out[f"c{chunk}w{warps}"] = C(method="gather", block_t=bt, chunk=chunk,
                                        num_warps=warps)
    return out


def bitmap_variants(t: int) -> dict[str, U.UnstructuredConfig]:
    """Expand-kernel configs tried at 80% sparsity."""
    bt = min(max(U._next_pow2(t), 16), 128)
    out = {}
    for bk, warps, stages in ((32, 4, 2), (64, 4, 2), (32, 8, 3), (64, 8, 3)):
        out[f"k{bk}w{warps}s{stages}"] = C(method="expand", block_t=bt, block_k=bk,
                                           num_warps=warps, num_stages=stages)
    if t >= 64:
        out["k32w8s2_bt64"] = C(method="expand", block_t=64, block_k=32, num_warps=8,
                                num_stages=2)
    return out


def nearest(table: dict, t: int):
    if not table:
        return None
    return table[min(table, key=lambda s: (abs(math.log2(s) - math.log2(t)), s))]


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for every measured row")
    p.add_argument("--tuned-out", default=None, help="JSON file for the tuned-config table")
    p.add_argument("--shapes", default="mixtral_w1,mixtral_w2,qwen3_w1")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--sweep-sparsity", type=float, default=0.8)
    p.add_argument("--gather-max-tokens", type=int, default=32)
    p.add_argument("--densify-min-tokens", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new row after this")
    p.add_argument("--max-copies", type=int, default=64)
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    rows: list[dict] = []
    meta = {"device": backend_lib.device_kind(), "jax": jax.__version__,
            "command": "PYTHONPATH=. python3 examples/bench_unstructured.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    # best[(shape, layout)][tokens] = (us, variant, config) from the sweep sparsity
    best: dict[tuple[str, str], dict[int, tuple]] = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    def save():
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        if args.tuned_out:
            table = {}
            for (shape, layout), by_t in best.items():
                k, n = SHAPES[shape]
                table.setdefault(layout, {})[f"{k}x{n}"] = {
                    str(t): v[2] for t, v in sorted(by_t.items())}
            with open(args.tuned_out, "w") as f:
                json.dump({meta["device"]: table}, f, indent=1)

    on_gpu = backend_lib.platform() == "gpu"
    meta["copy_rate_GBps"] = copy_rate() / 1e9 if on_gpu else None
    log(f"device {meta['device']}, copy rate {meta['copy_rate_GBps']} GB/s")
    save()
    key = jax.random.key(0)
    tokens = [int(s) for s in args.tokens.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    sparsities.sort(key=lambda s: (s != args.sweep_sparsity, -s))  # the sweep first
    for sparsity in sparsities:
        sweeping = sparsity == args.sweep_sparsity
        for name in args.shapes.split(","):
            if time.perf_counter() - t_start > args.budget_s:
                log("budget spent; stopping")
                break
            k, n = SHAPES[name]
            key, sub = jax.random.split(key)
            t0 = time.perf_counter()
            w_dense, w_ell = make_weight(sub, k, n, sparsity)
            w_bm = TiledBitmap.from_dense(np.asarray(w_dense))
            log(f"{name} {sparsity:.0%}: built in {time.perf_counter() - t0:.1f}s; dense "
                f"{w_dense.nbytes / 1e6:.1f} MB, ell {w_ell.nbytes / 1e6:.1f} MB (slot fill "
                f"{w_ell.slot_fill:.3f}), bitmap {w_bm.nbytes / 1e6:.1f} MB")

            def n_copies(b):
                return int(min(args.max_copies, max(2, math.ceil(ROTATE_BYTES / b))))
            dense_ws = copies(w_dense, n_copies(w_dense.nbytes))
            layouts = {"ell": (w_ell, copies(w_ell, n_copies(w_ell.nbytes))),
                       "bitmap": (w_bm, copies(w_bm, n_copies(w_bm.nbytes)))}
            for t in tokens:
                if time.perf_counter() - t_start > args.budget_s:
                    break
                key, sub = jax.random.split(key)
                x = jax.random.normal(sub, (t, k), jnp.bfloat16)
                ref = jnp.dot(x.astype(jnp.float32), w_dense.astype(jnp.float32),
                              precision=lax.Precision.HIGHEST)
                base = dict(shape=name, K=k, N=n, sparsity=sparsity, tokens=t,
                            dense_bytes=int(w_dense.nbytes))
                s_dense, y, c_s = time_loop(lambda x, w: jnp.dot(x, w), x, dense_ws)
                rows.append(dict(base, layout="dense", method="xla_dense", variant="xla",
                                 us=s_dense * 1e6, speedup=1.0, err=rel_err(y, ref),
                                 copies=len(dense_ws), compile_s=c_s))
                log(f"  t={t:5d} dense {s_dense * 1e6:8.1f} us")
                cands: list[tuple[str, str, U.UnstructuredConfig]] = []
                for layout, sweep_tokens, variants in (
                        ("ell", ELL_SWEEP_TOKENS, ell_variants),
                        ("bitmap", BITMAP_SWEEP_TOKENS, bitmap_variants)):
                    if layout == "ell" and t > args.gather_max_tokens:
                        pass
                    elif sweeping and t in sweep_tokens:
                        cands += [(layout, v, c) for v, c in variants(t).items()]
                    else:
                        got = nearest(best.get((name, layout), {}), t)
                        cfg = C(**got[2]) if got else U._heuristic_config(t, layout)
                        if layout == "bitmap" or cfg.method != "densify":
                            bt = (min(max(U._next_pow2(t), 16), 128) if layout == "bitmap"
                                  else min(U._next_pow2(t), 16))
                            cands.append((layout, "tuned", dataclasses.replace(cfg,
                                                                               block_t=bt)))
                    if t >= args.densify_min_tokens:
                        cands.append((layout, "densify", C(method="densify")))
                for layout, vname, cfg in cands:
                    w_sp, ws = layouts[layout]
                    op = functools.partial(_sparse_op, config=cfg)
                    row = dict(base, layout=layout, method=cfg.method, variant=vname,
                               config=dataclasses.asdict(cfg), sparse_bytes=int(w_sp.nbytes),
                               copies=len(ws))
                    try:
                        s, y, c_s = time_loop(op, x, ws)
                        err = rel_err(y, ref)
                        row.update(us=s * 1e6, speedup=s_dense / s, err=err, compile_s=c_s)
                        if meta["copy_rate_GBps"]:
                            row["bw_pct_of_copy"] = (100 * w_sp.nbytes / s
                                                     / (meta["copy_rate_GBps"] * 1e9))
                        log(f"  t={t:5d} {layout:6s} {vname:14s} {s * 1e6:8.1f} us "
                            f"x{s_dense / s:5.2f} err {err:.1e} (compile {c_s:.1f}s)")
                        if sweeping and err < 2e-2 and cfg.method != "densify":
                            cur = best.setdefault((name, layout), {}).get(t)
                            if cur is None or s < cur[0]:
                                best[(name, layout)][t] = (s, vname, dataclasses.asdict(cfg))
                        if sweeping and err < 2e-2 and cfg.method == "densify":
                            cur = best.setdefault((name, layout), {}).get(t)
                            if cur is None or s < cur[0]:
                                best[(name, layout)][t] = (s, vname, dataclasses.asdict(cfg))
                    except Exception as e:  # keep timing the rest; the error is a result
                        row["error"] = repr(e)[:2000]
                        log(f"  t={t:5d} {layout:6s} {vname:14s} FAILED {repr(e)[:300]}")
                    rows.append(row)
                    save()
            del dense_ws, layouts
    save()
    print_table(rows)
    return 0


def _sparse_op(x, w, *, config):
    return U.unstructured_matmul(x, w, config=config)


def print_table(rows: list[dict]) -> None:
    """Best time per (shape, sparsity, tokens, layout) against dense."""
    best: dict[tuple, dict] = {}
    dense: dict[tuple, float] = {}
    for r in rows:
        key = (r["shape"], r["sparsity"], r["tokens"])
        if r["method"] == "xla_dense":
            dense[key] = r["us"]
        elif "us" in r and r["err"] < 2e-2:
            k2 = key + (r["layout"],)
            if k2 not in best or r["us"] < best[k2]["us"]:
                best[k2] = r
    print(f"\n{'shape':11s} {'sp':>4s} {'t':>5s} {'dense':>7s} | {'ell us':>7s} {'x':>5s} "
          f"{'%copy':>5s} {'how':9s} | {'bmp us':>7s} {'x':>5s} {'%copy':>5s} {'how':12s}")
    for key in sorted(dense):
        d = dense[key]
        cells = []
        for layout in ("ell", "bitmap"):
            r = best.get(key + (layout,))
            if r is None:
                cells.append(f"{'-':>7s} {'-':>5s} {'-':>5s} {'-':9s}")
            else:
                cells.append(f"{r['us']:7.1f} {d / r['us']:5.2f} "
                             f"{r.get('bw_pct_of_copy', float('nan')):5.1f} "
                             f"{r['variant'][:12]:12s}"[:31])
        print(f"{key[0]:11s} {key[1]:4.0%} {key[2]:5d} {d:7.1f} | {cells[0]} | {cells[1]}")


if __name__ == "__main__":
    sys.exit(main())

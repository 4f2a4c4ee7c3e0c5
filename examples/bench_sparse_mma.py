"""Benchmark the sparse-tensor-core matmul ``wgmma_sp_matmul`` (prefill token counts) on Hopper.

2:4 weights of the Mixtral and Qwen3 expert shapes, tokens 512 to 8192, against XLA dense
``jnp.dot`` on the same pruned weight and against our Triton path (``nm_matmul`` with its tuned
config: the dense-compute fallback at these token counts), all measured in the same run with the
method of ``bench_sparse_matmul.py`` (one jitted ``fori_loop`` over weight copies rotating past
L2, median of 5 repeats). Correctness is checked first (t = 512, every tiling) against an f32
product. Reports us, x dense, and dense-equivalent TFLOP/s (2*t*K*N / time).

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 examples/bench_sparse_mma.py --out benchmarks/sparse_mma.json

Prints a table last; writes every row as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_sparse_matmul as bsm  # noqa: E402
import pallas_kernels.nm_matmul as nmm  # noqa: E402
from pallas_kernels import backend as backend_lib  # noqa: E402
from pallas_kernels import sparse_mma_matmul as sm  # noqa: E402
from pallas_kernels.sparse_mma_layout import to_wgmma_sp  # noqa: E402

TOKENS = (512, 1024, 2048, 4096, 8192)
TILINGS = {  # name: (block_t, block_k, stages, inflight)
    "t256k64s4": (256, 64, 4, 0),
    "t256k64s4i1": (256, 64, 4, 1),
    "t128k128s4": (128, 128, 4, 0),
    "t128k128s4i1": (128, 128, 4, 1),
    "t256k128s2i1": (256, 128, 2, 1),
    "t128k64s6i1": (128, 64, 6, 1),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="mixtral_w1,mixtral_w2,qwen3_w1,qwen3_w2")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--tilings", default=",".join(TILINGS))
    p.add_argument("--budget-s", type=float, default=1e9)
    args = p.parse_args(argv)
    start = time.time()
    rows: list[dict] = []
    result = dict(device=backend_lib.device_kind(), jax=jax.__version__, argv=sys.argv[1:],
                  rows=rows, checks=[])

    def save():
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))

    tilings = {n: sm.WgmmaSpConfig(block_t=bt, block_k=bk, stages=st, splits=1, inflight=inf)
               for n in args.tilings.split(",") for bt, bk, st, inf in [TILINGS[n]]}
    key = jax.random.key(0)
    for name in args.shapes.split(","):
        k, n_out = bsm.SHAPES[name]
        key, kw = jax.random.split(key)
        nm_w, _ = bsm.make_weights(kw, k, n_out, jnp.bfloat16)
        a = jax.jit(to_wgmma_sp)(nm_w)
        dense = nm_w.to_dense()
        x0 = jax.random.normal(jax.random.key(1), (512, k), jnp.float32).astype(jnp.bfloat16)
        ref0 = jnp.dot(x0.astype(jnp.float32), dense.astype(jnp.float32), precision="highest")
        ok = {}
        for tname, cfg in tilings.items():
            try:
                y = sm.wgmma_sp_matmul(x0, a, config=cfg, out_dtype=jnp.float32)
                err = bsm.rel_err(y, ref0)
            except Exception as e:  # noqa: BLE001 - a failing tiling is recorded, the run goes on
                err = float("nan")
                print(f"check {name} {tname}: FAILED {repr(e)[:600]}", flush=True)
            ok[tname] = err < 1e-2
            result["checks"].append(dict(shape=name, tiling=tname, err=err))
            print(f"check {name} {tname}: rel err {err:.2e}", flush=True)
        save()
        r_dense = int(min(64, max(2, math.ceil(bsm.ROTATE_BYTES / (k * n_out * 2)))))
        dense_ws = bsm.copies(dense, r_dense)
        a_ws = bsm.copies(a, max(2, r_dense))
        nm_ws = bsm.copies(nm_w, max(2, r_dense))
        for t in [int(v) for v in args.tokens.split(",")]:
            if time.time() - start > args.budget_s:
                print("budget reached; stopping", flush=True)
                break
            x = jax.random.normal(jax.random.fold_in(kw, t), (t, k), jnp.float32).astype(jnp.bfloat16)
            flops = 2 * t * k * n_out
            s_dense, _ = bsm.time_loop(lambda x, w: jnp.dot(x, w), x, dense_ws)
            rows.append(dict(shape=name, t=t, variant="xla_dense", us=s_dense * 1e6, ratio=1.0,
                             tflops=flops / s_dense / 1e12))
            cands = {"triton_auto": (nmm.nm_matmul, nm_ws)}
            for tname, cfg in tilings.items():
                if ok[tname]:
                    cands[f"wgmma_sp_{tname}"] = (functools.partial(
                        sm.wgmma_sp_matmul, config=cfg), a_ws)
            for vname, (fn, ws) in cands.items():
                try:
                    s, _ = bsm.time_loop(fn, x, ws)
                    rows.append(dict(shape=name, t=t, variant=vname, us=s * 1e6,
                                     ratio=s_dense / s, tflops=flops / s / 1e12))
                    print(f"{name:11s} t={t:5d} {vname:22s} {s * 1e6:9.1f}us x{s_dense / s:5.2f} "
                          f"{flops / s / 1e12:6.1f} TFLOP/s", flush=True)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(shape=name, t=t, variant=vname, error=repr(e)[:600]))
                    print(f"{name} t={t} {vname}: FAILED {repr(e)[:300]}", flush=True)
            save()
        del dense_ws, a_ws, nm_ws
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

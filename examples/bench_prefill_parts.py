"""Prefill (many tokens) on compressed weights, part by part: XLA dense GEMM, each expansion
alone, expansion + GEMM (the dense-compute fallbacks), and the sparse-wgmma kernel, at the
same token counts in one run. Shows where a fallback loses time against XLA dense.

    PYTHONPATH=. python3 examples/bench_prefill_parts.py --out benchmarks/x.json \\
        --shapes mixtral_w1,mixtral_w2 --tokens 1024,4096

``f32out`` rows multiply to an f32 product and convert (the fallback before it wrote its
GEMM's output dtype directly); the others write bf16 from the GEMM (f32 accumulation inside).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_sparse_matmul as bsm  # noqa: E402
import pallas_kernels.nm_matmul as nmm  # noqa: E402
from pallas_kernels import sparse_mma_matmul as sm  # noqa: E402
from pallas_kernels.sparse_mma_layout import to_wgmma_sp  # noqa: E402


def dot(x, w):
    return jnp.dot(x, w, preferred_element_type=x.dtype)


def dot_f32out(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def dot_t(x, wt):  # x [t, K] . W^T [N, K]
    return jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ())), preferred_element_type=x.dtype)


def variants(nm, sam, a, asam, dense, r_dense: int, r_sparse: int) -> dict:
    """name: (op(x, w), weight copies)."""
    c = bsm.copies
    NM, SAM, A, AS = c(nm, r_sparse), c(sam, r_sparse), c(a, r_sparse), c(asam, r_sparse)
    sparse_cfg = sm.WgmmaSpConfig(dense_from=None, prefill_from=None)  # one warpgroup
    return {
        "dense": (dot, c(dense, r_dense)),
        "dense_f32out": (dot_f32out, c(dense, r_dense)),
        "dense_wt": (dot_t, c(dense.T, r_dense)),
        "expand_nm_pallas": (lambda x, w: nmm.expand_nm_pallas(w.values, w.meta, n=2, m=4), NM),
        "expand_nm_xla": (lambda x, w: w.to_dense(), NM),
        "expand_samoyeds_xla": (lambda x, w: w.to_dense(), SAM),
        "expand_wgmma_sp_t": (lambda x, w: w.to_dense_t(), A),
        "expand_wgmma_sp_samoyeds_t": (lambda x, w: w.to_dense_t(), AS),
        "nm_pallas_f32out": (lambda x, w: dot_f32out(
            x, nmm.expand_nm_pallas(w.values, w.meta, n=2, m=4)), NM),
        "nm_pallas": (lambda x, w: dot(x, nmm.expand_nm_pallas(w.values, w.meta, n=2, m=4)), NM),
        "samoyeds_xla": (lambda x, w: dot(x, w.to_dense()), SAM),
        "wgmma_sp_t": (lambda x, w: dot_t(x, w.to_dense_t()), A),
        "wgmma_sp_samoyeds_t": (lambda x, w: dot_t(x, w.to_dense_t()), AS),
        "wgmma_sp_kernel": (lambda x, w: sm.wgmma_sp_matmul(x, w, config=sparse_cfg), A),
        "wgmma_sp_default": (sm.wgmma_sp_matmul, A),   # 2:4: the warp-specialized kernel
        "wgmma_sp_samoyeds_kernel": (lambda x, w: sm.wgmma_sp_matmul(x, w, config=sparse_cfg),
                                     AS),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="mixtral_w1,mixtral_w2,qwen3_w1")
    ap.add_argument("--tokens", default="1024,4096")
    args = ap.parse_args()
    rows: list[dict] = []
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows)
    for name in args.shapes.split(","):
        k, n_out = bsm.SHAPES[name]
        nm, sam = bsm.make_weights(jax.random.key(1), k, n_out, jnp.bfloat16)
        dense = nm.to_dense()
        a, asam = jax.jit(to_wgmma_sp)(nm), jax.jit(to_wgmma_sp)(sam)
        ops = variants(nm, sam, a, asam, dense, max(2, math.ceil(200e6 / (dense.size * 2))),
                       max(2, math.ceil(200e6 / nm.nbytes)))
        for t in [int(v) for v in args.tokens.split(",")]:
            x = jax.random.normal(jax.random.key(t), (t, k), jnp.float32).astype(jnp.bfloat16)
            ref = jnp.dot(x.astype(jnp.float32), dense.astype(jnp.float32))
            base = None
            for vname, (op, ws) in ops.items():
                row = dict(shape=name, t=t, variant=vname)
                try:
                    s, y = bsm.time_loop(op, x, ws, target_s=0.05)
                    row["us"] = s * 1e6
                    if not vname.startswith("expand") and "samoyeds" not in vname:
                        row["err"] = bsm.rel_err(y, ref)
                except Exception as exc:  # noqa: BLE001 - a failing variant must not stop the run
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                base = row.get("us") if vname == "dense" else base
                if base and "us" in row:
                    row["x_dense"] = base / row["us"]
                rows.append(row)
                print(row, flush=True)
                with open(args.out, "w") as fh:
                    json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()

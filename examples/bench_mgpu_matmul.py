"""Benchmark the Hopper decode kernel ``mgpu_matmul`` (2:4 and Samoyeds) against XLA dense.

Same method as ``bench_sparse_matmul.py`` (whose weights, timing loop and copy-rate probe it
imports): each op runs inside one jitted ``fori_loop`` over weight copies rotating past the
50 MB L2, medians of 5 repeats, the XLA dense ``jnp.dot`` on the same pruned weight measured in
the same run. Also in the same run: the Pallas Triton kernels (``nm_matmul``,
``samoyeds_matmul``, tuned configs) for comparison. Every timed output is checked against an
f32 product of the dense weight; correctness is checked first at awkward token counts.

    PYTHONPATH=. python3 examples/bench_mgpu_matmul.py --out benchmarks/mgpu_matmul.json

Prints a table last; writes every row as JSON (and ``--markdown`` a table).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from pallas_kernels import mgpu_matmul as mg  # noqa: E402
from pallas_kernels import sparse_mma_matmul as sm  # noqa: E402
from pallas_kernels import sparse_mma_prefill as spp  # noqa: E402
from pallas_kernels.sparse_mma_layout import to_wgmma_sp  # noqa: E402
from pallas_kernels.transposed_format import TransposedSparse  # noqa: E402

TOKENS = (1, 8, 16, 32, 64, 128, 256)
M = mg.MgpuMatmulConfig
# Variants timed with --sweep (the default config is always timed).
SWEEP = {
    "s2": dict(stages=2),
    "s4": dict(stages=4),
    "tk512": dict(tk=512),
    "split2x": dict(split_mult=2),
    "split_half": dict(split_div=2),
}
SMALL_SWEEP = ("split2x",)  # for the shapes not in --sweep-shapes
# Sparse-tensor-core kernel (``wgmma_sp_matmul``) configs timed with --wgmma-sp; "sp_default"
# is what it picks itself (2:4: the warp-specialized kernel from ``prefill_from`` tokens;
# Samoyeds: dense compute from ``dense_from``), "sp_sparse" the one-warpgroup sparse kernel at
# every token count.
W = sm.WgmmaSpConfig
WGMMA_SP = {
    "sp_default": W(),
    "sp_sparse": W(dense_from=None, prefill_from=None),
    "sp_k128": W(block_k=128),
    "sp_s4": W(stages=4),
    "sp_p8": W(programs_per_sm=8),
    "sp_p4": W(programs_per_sm=4),
    "sp_p2": W(programs_per_sm=2),
    "sp_i1": W(inflight=1),
    "sp_s4i1": W(stages=4, inflight=1),
    "sp_k128i1": W(block_k=128, inflight=1),
    "sp_k512": W(block_k=512, stages=2),
}
# Warp-specialized prefill kernel (``wgmma_sp_prefill_matmul``) configs timed with
# --sp-prefill, for each op whose weights they fit (Samoyeds: 128-token tiles at most, K
# tiles dividing or multiples of v); the first also timed without the wrapper's pad and
# slice ("_kernel", 2:4).
P = spp.SpPrefillConfig
SP_PREFILL = {
    "pf_default": P(),
    "pf_g8": P(group_m=8),
    "pf_g32": P(group_m=32),
    "pf_gall": P(group_m=None),
    "pf_t128k128": P(block_t=128, block_k=128),
    "pf_t128k128g8": P(block_t=128, block_k=128, group_m=8),
    "pf_k32s6": P(block_k=32, stages=6),
    "pf_t192s4": P(block_t=192, stages=4),
    "pf_c1": P(consumers=1),
    "pf_t128k64": P(block_t=128, block_k=64),
    "pf_t128k128s2": P(block_t=128, block_k=128, stages=2),
    "pf_t64k128": P(block_t=64, block_k=128),
    "pf_t64k256s2": P(block_t=64, block_k=256, stages=2),
}


def fits(cfg: spp.SpPrefillConfig, a) -> bool:
    """Whether the prefill kernel takes ``a`` with tiling ``cfg`` (bf16 out)."""
    try:
        spp.check_config(cfg, a, jnp.bfloat16)
    except ValueError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="mixtral_w1,mixtral_w2,qwen3_w1,qwen3_w2,dsv2lite_w1")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--ops", default="nm,samoyeds")
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP variants")
    p.add_argument("--sweep-shapes", default="mixtral_w1,mixtral_w2")
    p.add_argument("--triton", action="store_true", help="also time the Triton kernels")
    p.add_argument("--wgmma-sp", default="",
                   help="comma-separated WGMMA_SP configs of the sparse-wgmma kernel to time")
    p.add_argument("--sp-prefill", default="",
                   help="comma-separated SP_PREFILL configs of the warp-specialized prefill "
                        "kernel to time")
    p.add_argument("--no-mgpu", action="store_true", help="skip the mgpu_matmul variants")
    p.add_argument("--budget-s", type=float, default=1e9)
    p.add_argument("--markdown")
    p.add_argument("--render", nargs="*", help="only print the table of these results JSONs")
    args = p.parse_args(argv)
    if args.render:
        rows = [r for path in args.render for r in json.loads(pathlib.Path(path).read_text())["rows"]]
        print(render(dict(rows=rows)))
        return 0
    start = time.time()
    log_lines: list[str] = []

    def log(msg: str) -> None:
        line = f"[{time.time() - start:6.1f}s] {msg}"
        log_lines.append(line)
        print(line, flush=True)

    dtype = jnp.bfloat16
    device = backend_lib.device_kind()
    rate = bsm.copy_rate()
    log(f"device {device}, jax {jax.__version__}, copy rate {rate / 1e12:.3f} TB/s")
    rows: list[dict] = []
    checks: list[dict] = []
    result = dict(device=device, jax=jax.__version__, copy_rate_Bps=rate, argv=sys.argv[1:],
                  rows=rows, checks=checks, log=log_lines)

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))

    ops = args.ops.split(",")
    to_native = {"nm": jax.jit(TransposedSparse.from_nm, static_argnames="tk"),
                 "samoyeds": jax.jit(TransposedSparse.from_samoyeds, static_argnames="tk")}
    key = jax.random.key(0)
    for name in args.shapes.split(","):
        k, n_out = bsm.SHAPES[name]
        key, kw, kx = jax.random.split(key, 3)
        nm_w, sam_w = bsm.make_weights(kw, k, n_out, dtype)
        sparse = {"nm": nm_w, "samoyeds": sam_w}
        natives = {(op, tk): to_native[op](sparse[op], tk=tk) for op in ops for tk in (256, 512)
                   if k % tk == 0}
        dense = {op: sparse[op].to_dense() for op in ops}
        sp_names = [v for v in args.wgmma_sp.split(",") if v]
        pf_names = [v for v in args.sp_prefill.split(",") if v]
        sp_a = ({op: jax.jit(to_wgmma_sp)(sparse[op]) for op in ops}
                if sp_names or pf_names else {})
        def check(op, fn, w, label, **fields):
            """``fn(x, w)`` against an f32 product at awkward token counts (logged, recorded)."""
            for t in (1, 3, 16, 33):
                x = jax.random.normal(jax.random.key(t), (t, k), jnp.float32).astype(dtype)
                ref = jnp.dot(x.astype(jnp.float32), dense[op].astype(jnp.float32),
                              precision="highest")
                try:
                    err = bsm.rel_err(jax.jit(fn)(x, w), ref)
                except Exception as e:  # noqa: BLE001
                    err = float("nan")
                    log(f"check {name} {op} {label} t={t}: FAILED {repr(e)[:600]}")
                checks.append(dict(shape=name, op=op, t=t, err=err, **fields))
                log(f"check {name} {op} {label} t={t}: rel err {err:.2e} "
                    f"{'OK' if err < 1e-2 else 'BAD'}")

        # correctness first: awkward token counts, every op, default config
        for op, a in sp_a.items():
            if sp_names:
                check(op, sm.wgmma_sp_matmul, a, "wgmma_sp", kernel="wgmma_sp")
        for op, a in sp_a.items():
            for vname in pf_names:
                if fits(SP_PREFILL[vname], a):
                    check(op, lambda x, a, c=SP_PREFILL[vname]: spp.wgmma_sp_prefill_matmul(
                        x, a, config=c), a, vname, kernel=vname)
        for (op, tk), w in natives.items():
            check(op, mg.mgpu_matmul, w, f"tk={tk}", tk=tk)
        save()
        dense_bytes = k * n_out * 2
        r_dense = int(min(64, max(2, math.ceil(bsm.ROTATE_BYTES / dense_bytes))))
        r = int(min(64, max(bsm.MIN_COPIES, math.ceil(bsm.ROTATE_BYTES / (0.28 * dense_bytes)))))
        dense_ws = bsm.copies(dense["nm"], r_dense)
        native_ws = {key_: bsm.copies(w, r) for key_, w in natives.items()
                     if key_[1] == 256 or args.sweep}  # tk 512 is timed only in sweeps
        triton_ws = {op: bsm.copies(sparse[op], r) for op in ops} if args.triton else {}
        sp_ws = {op: bsm.copies(a, r) for op, a in sp_a.items()}
        for t in [int(v) for v in args.tokens.split(",")]:
            if time.time() - start > args.budget_s:
                log("budget reached; stopping")
                break
            x = jax.random.normal(jax.random.fold_in(kx, t), (t, k), jnp.float32).astype(dtype)
            xf = x.astype(jnp.float32)
            io_bytes = (t * k + t * n_out) * 2
            s_dense, y = bsm.time_loop(lambda x, w: jnp.dot(x, w), x, dense_ws)
            refs = {op: jnp.dot(xf, dense[op].astype(jnp.float32), precision="highest")
                    for op in ops}
            rows.append(dict(shape=name, k=k, n=n_out, t=t, op="dense", variant="xla_dense",
                             us=s_dense * 1e6, ratio=1.0, bytes=dense_bytes + io_bytes,
                             pct_copy=100 * (dense_bytes + io_bytes) / s_dense / rate,
                             err=bsm.rel_err(y, refs["nm"])))
            log(f"{name:12s} dense     t={t:4d} {s_dense * 1e6:8.1f}us "
                f"{rows[-1]['pct_copy']:5.1f}%")
            def timed(row, fn, x_in, ws, label, ref=None):
                """Time ``fn`` on ``ws``, fill ``row`` (us, ratio, % copy, err) and log it."""
                try:
                    s, y = bsm.time_loop(fn, x_in, ws)
                    row.update(us=s * 1e6, ratio=s_dense / s, pct_copy=100 * row["bytes"] / s / rate,
                               err=bsm.rel_err(y, ref) if ref is not None else float("nan"))
                    log(f"{name:12s} {row['op']:9s} t={t:4d} {label:13s} {s * 1e6:8.1f}us "
                        f"x{s_dense / s:5.2f} {row['pct_copy']:5.1f}% err {row['err']:.1e}")
                except Exception as e:  # noqa: BLE001 - a failing variant must not stop the run
                    row.update(error=repr(e)[:800])
                    log(f"{name} {row['op']} t={t} {label}: FAILED {repr(e)[:600]}")
                rows.append(row)

            for op in ops:
                for vname in sp_names:
                    a0 = sp_a[op]
                    try:
                        cfg = sm.resolve_config(WGMMA_SP[vname], t=t, a=a0)
                    except ValueError:  # e.g. inflight=1 for Samoyeds: not a variant of it
                        continue
                    row = dict(shape=name, k=k, n=n_out, t=t, op=op, variant=f"wgmma_{vname}",
                               config=dataclasses.asdict(cfg), bytes=a0.nbytes + io_bytes)
                    timed(row, lambda x, a, cfg=cfg: sm.wgmma_sp_matmul(x, a, config=cfg), x,
                          sp_ws[op], f"wgmma_{vname}", refs[op])
                for vname in pf_names:
                    cfg = SP_PREFILL[vname]
                    a0 = sp_a[op]
                    if not fits(cfg, a0):
                        continue
                    row = dict(shape=name, k=k, n=n_out, t=t, op=op, variant=vname,
                               config=dataclasses.asdict(cfg), bytes=a0.nbytes + io_bytes)
                    timed(row, lambda x, a, cfg=cfg: spp.wgmma_sp_prefill_matmul(
                        x, a, config=cfg), x, sp_ws[op], vname, refs[op])
                    if vname != pf_names[0] or op != "nm":
                        continue
                    t_pad = -(-t // cfg.block_t) * cfg.block_t
                    xp = jnp.pad(x, ((0, t_pad - t), (0, 0)))

                    def pf_kernel(xp, a, cfg=cfg):  # no pad / slice
                        return spp._call(xp, a.values, a.meta, **spp._static(cfg),
                                         out_dtype=jnp.bfloat16)

                    timed(dict(shape=name, k=k, n=n_out, t=t, op=op, variant=vname + "_kernel",
                               bytes=a0.nbytes + io_bytes), pf_kernel, xp, sp_ws[op],
                          vname + "_kernel")
                if args.no_mgpu:
                    continue
                variants = {"default": (256, M())}
                names = SWEEP if name in args.sweep_shapes.split(",") else SMALL_SWEEP
                for vname in (names if args.sweep else ()):
                    kw_ = dict(SWEEP[vname])
                    tk = kw_.pop("tk", 256)
                    mult = kw_.pop("split_mult", 1)
                    div = kw_.pop("split_div", 1)
                    if (op, tk) not in natives:
                        continue
                    cfg = M(**kw_)
                    if mult > 1 or div > 1:
                        base = mg.resolve_config(cfg, t=t, w=natives[(op, tk)])
                        splits = base.splits * mult // div
                        if splits < 1 or base.splits % div or (k // tk) % splits:
                            continue
                        cfg = dataclasses.replace(cfg, splits=splits)
                    variants[vname] = (tk, cfg)
                for vname, (tk, cfg) in variants.items():
                    w0 = natives[(op, tk)]
                    row = dict(shape=name, k=k, n=n_out, t=t, op=op, variant=f"mgpu_{vname}",
                               tk=tk, config=dataclasses.asdict(mg.resolve_config(cfg, t=t, w=w0)),
                               bytes=w0.nbytes + io_bytes)
                    timed(row, lambda x, w, cfg=cfg: mg.mgpu_matmul(x, w, config=cfg), x,
                          native_ws[(op, tk)], f"mgpu_{vname}", refs[op])
                # the Mosaic GPU call alone, on a pre-permuted x (no pad/permute/sum glue)
                w0 = natives[(op, 256)]
                cfg = mg.resolve_config(M(), t=t, w=w0)
                t_pad = -(-t // cfg.block_t) * cfg.block_t
                xp = mg._tiled_x(jnp.pad(x, ((0, t_pad - t), (0, 0))), 256)

                def kernel_only(xp, w, cfg=cfg):
                    return mg._call(xp, ((w.values, w.meta),), **mg._static(cfg, w))

                timed(dict(shape=name, k=k, n=n_out, t=t, op=op, variant="mgpu_kernel_only",
                           bytes=w0.nbytes + io_bytes),
                      kernel_only, xp, native_ws[(op, 256)], "kernel_only")
                if args.triton:
                    fn = nmm.nm_matmul if op == "nm" else nmm.samoyeds_matmul
                    timed(dict(shape=name, k=k, n=n_out, t=t, op=op, variant="triton_auto",
                               bytes=bsm._nbytes(sparse[op]) + io_bytes),
                          fn, x, triton_ws[op], "triton_auto", refs[op])
            save()
        del dense_ws, native_ws, triton_ws, sp_ws
    save()
    table = render(result)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(table)
    print(table)
    return 0


def render(result: dict) -> str:
    """Per (shape, t, op): XLA dense, Triton, the mgpu default (and its kernel alone), the
    sparse-wgmma default (Markdown)."""
    by: dict = {}
    for r in result["rows"]:
        if "us" in r:
            by.setdefault((r["shape"], r["t"]), []).append(r)
    lines = ["| shape | t | XLA dense us | op | Triton us (x dense) | mgpu us (x dense) | "
             "mgpu kernel alone us (x dense) | sparse wgmma us (x dense) | % copy rate | "
             "rel err |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (shape, t), rs in by.items():
        dense = next((r for r in rs if r["op"] == "dense"), None)
        if dense is None:
            continue
        for op in ("nm", "samoyeds"):
            get = {r["variant"]: r for r in rs if r["op"] == op}
            best = get.get("wgmma_sp_default") or get.get("mgpu_default")
            if best is None:
                continue
            cell = lambda r: f"{r['us']:.1f} ({r['ratio']:.2f})" if r else "-"
            lines.append(f"| {shape} | {t} | {dense['us']:.1f} | {op} | "
                         f"{cell(get.get('triton_auto'))} | {cell(get.get('mgpu_default'))} | "
                         f"{cell(get.get('mgpu_kernel_only'))} | "
                         f"{cell(get.get('wgmma_sp_default'))} | {best['pct_copy']:.0f} | "
                         f"{best['err']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

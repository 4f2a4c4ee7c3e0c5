"""Decode-time attention projections: how XLA's batch-1 matrix-vector products compare with the
copy rate, and what a fused or padded form gains.

A batch-1 decode step of a sparse-expert model reads the attention weights as often as the
experts it routes to; a trace of the full model (benchmarks/generate.md) shows XLA computing some
of these [1, K] x [K, N] products as reductions at a quarter to a third of the copy rate. For each
model's shapes and each token count this times one block's four projections (q, k, v from x,
o from q), inside one jitted loop over weight copies that do not fit L2 together, as:

* ``separate``: four ``jnp.dot`` (what the model does);
* ``qkv_fused``: q|k|v concatenated into one [d, (h + 2 kv) hd] weight, one ``jnp.dot``, then o;
* ``padded``: x padded with zero rows to ``--pad-to`` tokens, four ``jnp.dot``, the rows cut back;
* ``qkv_fused_padded``: both;
* ``qkv_fused_broadcast``: the fused weight with a one-token x repeated to ``--pad-to`` rows by a
  broadcast (which XLA may fuse into the product; the pad is a kernel of its own);
* ``linear_op``: the library's path, ``pallas_kernels.linear_op.linear`` for each projection;
* ``gemv_<bn>x<bk>s<split>``: each projection by a split-K Pallas Triton kernel (x padded to 16
  rows, grid of column blocks x K splits, f32 partials summed by XLA), the best of four tilings
  measured on an H100 (64x256s8, 128x128s8, 64x128s16, 32x512s4).

Reported: microseconds per block, the bytes read over that time, and the fraction of the copy
rate (a jitted loop of ``x + 1`` over 1 GiB). Same weights and inputs for every variant; the
outputs are checked against ``separate``.

    PYTHONPATH=. python3 examples/bench_decode_linears.py --out benchmarks/decode_linears_h100.json
    XLA_FLAGS=... PYTHONPATH=. python3 examples/bench_decode_linears.py --out /tmp/flags.json
    PYTHONPATH=. python3 examples/bench_decode_linears.py --tiny --out /tmp/d.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plt  # noqa: E402

from bench_generate import copy_rate  # noqa: E402
from pallas_kernels import backend as backend_lib  # noqa: E402
from pallas_kernels import linear_op  # noqa: E402
from bench_sparse_matmul import time_loop  # noqa: E402
from model_shapes import MODELS  # noqa: E402
from samoyeds_jax.atomic import write_json  # noqa: E402


def shapes(model: str) -> tuple[int, int, int]:
    """(d_model, q width h*hd, kv width kv*hd) of ``model``'s attention."""
    c = MODELS[model]
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["hidden_size"], c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd


def weights(key, d: int, nq: int, nkv: int, dtype) -> dict[str, jax.Array]:
    kq, kk, kv, ko = jax.random.split(key, 4)
    w = {"q": jax.random.normal(kq, (d, nq), dtype) * d ** -0.5,
         "k": jax.random.normal(kk, (d, nkv), dtype) * d ** -0.5,
         "v": jax.random.normal(kv, (d, nkv), dtype) * d ** -0.5,
         "o": jax.random.normal(ko, (nq, d), dtype) * nq ** -0.5}
    w["qkv"] = jnp.concatenate([w["q"], w["k"], w["v"]], axis=1)
    return w


def _out(o, k, v):
    # One output of fixed shape that depends on every projection (a few elements of k and v).
    return o.at[:, :1].add(k[:, :1] + v[:, :1])


def separate(x, w):
    q, k, v = jnp.dot(x, w["q"]), jnp.dot(x, w["k"]), jnp.dot(x, w["v"])
    return _out(jnp.dot(q, w["o"]), k, v)


def qkv_fused(x, w):
    nq, nkv = w["q"].shape[1], w["k"].shape[1]
    qkv = jnp.dot(x, w["qkv"])
    q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
    return _out(jnp.dot(q, w["o"]), k, v)


def padded(fn, pad_to: int):
    """``fn`` on x padded with zero rows to ``pad_to`` tokens, the rows cut back."""
    def run(x, w):
        t = x.shape[0]
        return fn(jnp.pad(x, ((0, max(pad_to - t, 0)), (0, 0))), w)[:t]
    return run


def broadcast(fn, rows: int):
    """``fn`` on x's rows repeated to ``rows`` (a broadcast XLA may fuse into the product's
    operand load, where a pad is a kernel of its own), the first rows kept."""
    def run(x, w):
        t = x.shape[0]
        return fn(jnp.broadcast_to(x, (max(rows, t),) + x.shape[1:]) if t == 1 else x, w)[:t]
    return run


GEMV_TILES = ((128, 128, 8),)
_ROWS = 16  # the smallest dot Triton takes


def _gemv_kernel(x_ref, w_ref, o_ref, *, block_n, block_k, steps):
    pid_n, pid_s = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pid_n * block_n, block_n)

    def body(i, acc):
        k = pl.ds((pid_s * steps + i) * block_k, block_k)
        return acc + jnp.dot(x_ref[pl.ds(0, _ROWS), k], w_ref[k, cols],
                             preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((_ROWS, block_n), jnp.float32))
    o_ref[pl.ds(pid_s * _ROWS, _ROWS), cols] = acc


def gemv(x, w, *, block_n, block_k, split):
    """x [t <= 16, K] @ w [K, N] by a split-K Pallas kernel (K % (block_k * split) == 0)."""
    t, k = x.shape
    n = w.shape[1]
    block_n = min(block_n, n)
    split = max(1, min(split, k // block_k))
    if k % (block_k * split) or n % block_n or t > _ROWS:
        raise ValueError(f"gemv tiles {block_n}x{block_k}s{split} do not fit x {x.shape} w {w.shape}")
    xp = jnp.pad(x, ((0, _ROWS - t), (0, 0)))
    kernel = functools.partial(_gemv_kernel, block_n=block_n, block_k=block_k,
                               steps=k // (block_k * split))
    part = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((split * _ROWS, n), jnp.float32),
        grid=(n // block_n, split), compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
        interpret=backend_lib.interpret_mode(), name="gemv_split_k")(xp, w)
    return part.reshape(split, _ROWS, n).sum(0)[:t].astype(x.dtype)


def gemv_variant(block_n, block_k, split):
    def run(x, w):
        f = functools.partial(gemv, block_n=block_n, block_k=block_k, split=split)
        q, k, v = f(x, w["q"]), f(x, w["k"]), f(x, w["v"])
        return _out(f(q, w["o"]), k, v)
    return run


def library(x, w):
    q, k, v = (linear_op.linear(x, w[n]) for n in ("q", "k", "v"))
    return _out(linear_op.linear(q, w["o"]), k, v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    p.add_argument("--tokens", default="1,2,8")
    p.add_argument("--pad-to", type=int, default=2)
    p.add_argument("--l2-bytes", type=int, default=256 << 20,
                   help="weight copies rotated per loop: at least this many bytes together")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    args = p.parse_args()
    dtype = jnp.bfloat16
    rate = copy_rate(1 << 24 if args.tiny else 1 << 30)
    print(f"copy rate {rate / 1e9:.0f} GB/s", flush=True)
    report = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                  xla_flags=os.environ.get("XLA_FLAGS", ""), args=vars(args),
                  copy_rate_bytes_per_s=rate, results=[])
    variants = {"separate": separate, "qkv_fused": qkv_fused,
                "padded": padded(separate, args.pad_to),
                "qkv_fused_padded": padded(qkv_fused, args.pad_to),
                "qkv_fused_broadcast": broadcast(qkv_fused, args.pad_to), "linear_op": library}
    for bn, bk, split in GEMV_TILES:
        variants[f"gemv_{bn}x{bk}s{split}"] = gemv_variant(bn, bk, split)
    for model in args.models.split(","):
        d, nq, nkv = (256, 256, 64) if args.tiny else shapes(model)
        one = weights(jax.random.key(0), d, nq, nkv, dtype)
        nbytes = sum(int(one[n].nbytes) for n in ("q", "k", "v", "o"))
        copies = max(2, -(-args.l2_bytes // nbytes))
        ws = [one] + [jax.tree.map(lambda a: a + 0, one) for _ in range(copies - 1)]
        for t in (int(s) for s in args.tokens.split(",")):
            x = jax.random.normal(jax.random.key(t), (t, d), dtype)
            ref = None
            for name, fn in variants.items():
                if name.endswith(("padded", "broadcast")) and t >= args.pad_to:
                    continue
                try:
                    s, y = time_loop(fn, x, ws, target_s=0.02 if args.tiny else 0.2)
                except Exception as err:  # a tiling that does not fit or compile: say, go on
                    print(f"{model:14s} t={t:3d} {name:10s} failed: {str(err)[:300]}", flush=True)
                    report["results"].append(dict(model=model, tokens=t, variant=name,
                                                  error=str(err)[:2000]))
                    continue
                y = np.asarray(y, np.float32)
                ref = y if ref is None else ref
                err = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
                bw = (nbytes + 2 * t * (d + nq + 2 * nkv) * 2) / s
                report["results"].append(dict(model=model, tokens=t, variant=name, us=s * 1e6,
                                              bytes=nbytes, bytes_per_s=bw,
                                              copy_rate_fraction=bw / rate, rel_err=err))
                print(f"{model:14s} t={t:3d} {name:10s} {s * 1e6:8.1f} us/block "
                      f"{bw / 1e12:5.2f} TB/s ({100 * bw / rate:3.0f}% of copy) err {err:.1e}",
                      flush=True)
                write_json(args.out, report)


if __name__ == "__main__":
    main()

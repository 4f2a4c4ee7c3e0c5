"""Run one Hopper decode matmul a few times, for a profiler (Nsight Compute) to attach to.

``--kernel expand`` is ``mgpu_matmul`` (TransposedSparse, expansion in registers + dense wgmma),
``--kernel sparse_mma`` is ``wgmma_sp_matmul`` (WgmmaSparseA, sparse tensor cores). Weights are
built on the host (numpy), so the only GPU kernels are the call's own (x pad and permutation,
the Mosaic GPU kernel, the split-K sum). Find the kernel's name, then profile it:

    ncu --print-summary per-kernel python3 examples/profile_mgpu_matmul.py --shape mixtral_w1 --op nm
    ncu -k regex:<name> --launch-skip 2 --launch-count 1 --set full \\
        python3 examples/profile_mgpu_matmul.py --shape mixtral_w1 --op nm
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pallas_kernels.formats import NMSparse, SamoyedsSparse
from pallas_kernels.mgpu_matmul import mgpu_matmul
from pallas_kernels.sparse_mma_layout import to_wgmma_sp
from pallas_kernels.sparse_mma_matmul import wgmma_sp_matmul
from pallas_kernels.transposed_format import TransposedSparse

SHAPES = {"mixtral_w1": (4096, 14336), "mixtral_w2": (14336, 4096), "qwen3_w1": (2048, 768),
          "qwen3_w2": (768, 2048), "dsv2lite_w1": (2048, 1408)}


def host_weights(k: int, n: int, op: str, seed: int = 0):
    """A 2:4 (or Samoyeds 1:2:128 + 2:4) weight made and compressed on the host."""
    rng = np.random.default_rng(seed)
    if op == "samoyeds":
        n_kept = n // 2
        w = np.zeros((k, n), np.float32)
        sel = rng.integers(0, 2, (k // 128, n_kept))  # kept column per pair, per 128-row slab
        cols = (2 * np.arange(n_kept))[None, :] + sel  # [slabs, Nc]
        dense_kept = rng.standard_normal((k, n_kept)).astype(np.float32)
        dense_kept.reshape(k // 4, 4, n_kept)[:, 2:, :] = 0  # 2:4 along K
        for s in range(k // 128):
            w[s * 128:(s + 1) * 128][:, cols[s]] = dense_kept[s * 128:(s + 1) * 128]
        return SamoyedsSparse.from_dense(w.astype(ml_dtypes.bfloat16))
    w = rng.standard_normal((k, n)).astype(np.float32)
    w.reshape(k // 4, 4, n)[:, 2:, :] = 0
    return NMSparse.from_dense(w.astype(ml_dtypes.bfloat16))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mixtral_w1", choices=sorted(SHAPES))
    p.add_argument("--op", default="nm", choices=("nm", "samoyeds"))
    p.add_argument("--kernel", default="expand", choices=("expand", "sparse_mma"))
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--calls", type=int, default=4)
    args = p.parse_args()
    k, n = SHAPES[args.shape]
    sparse = host_weights(k, n, args.op)
    if args.kernel == "sparse_mma":
        conv, matmul = to_wgmma_sp, wgmma_sp_matmul
    else:
        conv = TransposedSparse.from_nm if args.op == "nm" else TransposedSparse.from_samoyeds
        matmul = mgpu_matmul
    with jax.default_device(jax.devices("cpu")[0]):  # convert on the host: no GPU kernels
        w = conv(sparse)
    w = jax.device_put(w, jax.devices()[0])
    x = jax.device_put(np.ones((args.tokens, k), ml_dtypes.bfloat16), jax.devices()[0])
    f = jax.jit(matmul)
    for _ in range(args.calls):
        y = jax.block_until_ready(f(x, w))
    print(f"{args.kernel} {args.shape} {args.op} t={args.tokens}: y {y.shape} {y.dtype}, "
          f"finite {bool(jnp.isfinite(y.astype(jnp.float32)).all())}")


if __name__ == "__main__":
    main()

"""Bytes of one expert matrix in each structured-sparse format, against dense.

    PYTHONPATH=. python examples/format_bytes.py                  # Mixtral-8x7B W [4096, 14336] bf16
    PYTHONPATH=. python examples/format_bytes.py --k 6144 --n 16384 --check

Prints a Markdown table. ``--check`` also builds every format from a random matrix of that
pattern and asserts that the object's ``nbytes`` equals the formula used for the table.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from pallas_kernels.formats import NMSparse, SamoyedsSparse

NM_ROWS = ((2, 4), (1, 4), (2, 8), (4, 8))


def rows(k: int, n: int, dtype: str, n_sel: int, m_sel: int, v: int) -> list[tuple[str, int, int]]:
    """(format, stored bytes, bytes of which are metadata) per format."""
    item = jnp.dtype(dtype).itemsize
    out = [("dense", k * n * item, 0)]
    for nn, mm in NM_ROWS:
        total = NMSparse.nbytes_for((k, n), dtype, nn, mm)
        out.append((f"{nn}:{mm} (NMSparse)", total, total - k * nn // mm * n * item))
    total = SamoyedsSparse.nbytes_for((k, n), dtype, n_sel, m_sel, v)
    nc = n // m_sel * n_sel
    out.append((f"Samoyeds {n_sel}:{m_sel}:{v} + 2:4", total, total - k // 2 * nc * item))
    return out


def check(k: int, n: int, dtype: str, n_sel: int, m_sel: int, v: int) -> None:
    """Build each format from a random conforming matrix; its nbytes must match the formula."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n), dtype=np.float32)
    for nn, mm in NM_ROWS:
        keep = np.zeros((k // mm, mm, n), bool)
        keep[:, :nn, :] = True
        dense = jnp.asarray(np.where(keep.reshape(k, n), w, 0.0), dtype)
        got = NMSparse.from_dense(dense, n=nn, m=mm).nbytes
        assert got == NMSparse.nbytes_for((k, n), dtype, nn, mm), (nn, mm, got)
    cols = np.zeros((k // v, v, n // m_sel, m_sel), bool)
    cols[..., :n_sel] = True
    rows_24 = np.zeros((k // 4, 4, n), bool)
    rows_24[:, 1::2, :] = True
    dense = np.where(cols.reshape(k, n) & rows_24.reshape(k, n), w, 0.0)
    got = SamoyedsSparse.from_dense(jnp.asarray(dense, dtype), n_sel=n_sel, m_sel=m_sel, v=v).nbytes
    assert got == SamoyedsSparse.nbytes_for((k, n), dtype, n_sel, m_sel, v), got
    print(f"checked: built formats' nbytes match the table for [{k}, {n}] {dtype}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=4096, help="K (input dim) of W [K, N]")
    p.add_argument("--n", type=int, default=14336, help="N (output dim) of W [K, N]")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--n-sel", type=int, default=1)
    p.add_argument("--m-sel", type=int, default=2)
    p.add_argument("--v", type=int, default=128)
    p.add_argument("--matrices", type=int, default=32 * 8 * 3,
                   help="matrices in the model for the last column (Mixtral-8x7B: 32 layers x 8 "
                        "experts x 3)")
    p.add_argument("--check", action="store_true", help="also build each format and compare")
    a = p.parse_args()
    table = rows(a.k, a.n, a.dtype, a.n_sel, a.m_sel, a.v)
    dense = table[0][1]
    print(f"W [{a.k}, {a.n}] {a.dtype}\n")
    print(f"| format | bytes | MiB | vs dense | metadata bytes | {a.matrices} matrices (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, total, meta in table:
        print(f"| {name} | {total:,} | {total / 2**20:.2f} | {total / dense:.4f} | {meta:,} | "
              f"{total * a.matrices / 2**30:.2f} |")
    if a.check:
        check(a.k, a.n, a.dtype, a.n_sel, a.m_sel, a.v)


if __name__ == "__main__":
    main()

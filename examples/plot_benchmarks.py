"""Render ``benchmarks/sparse_matmul.json`` as PNG plots (matplotlib).

* ``sparse_matmul_speedup.png``: speed-up over XLA dense vs token count, one panel per
  shape; the best measured kernel variant of 2:4 and of Samoyeds, torch's 2:4 where run.
* ``sparse_matmul_roofline.png``: achieved FLOP/s vs arithmetic intensity (useful FLOPs
  of the dense product over the bytes each op moves), with the measured copy-rate roof
  and an 800 TFLOP/s dense bf16 roof.

    python3 examples/plot_benchmarks.py --results benchmarks/sparse_matmul.json --out-dir benchmarks
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

PEAK_FLOPS = 800e12  # dense bf16 MMA, measured on H100 (GPU notes)


def _best(rows: list[dict]) -> dict[tuple, dict]:
    best: dict[tuple, dict] = {}
    for r in rows:
        if "us" not in r or not r.get("err", 1) < 2e-2:
            continue
        key = (r["shape"], r["op"], r["t"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default="benchmarks/sparse_matmul.json")
    p.add_argument("--out-dir", default="benchmarks")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(pathlib.Path(args.results).read_text())
    best = _best(result["rows"])
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    cols = min(3, len(shapes))
    rows_n = -(-len(shapes) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        dense = {t: r["us"] for (s, op, t), r in best.items() if s == shape and op == "dense"}
        for op, label, style in (("nm", "2:4 (nm_matmul)", "o-"),
                                 ("samoyeds", "Samoyeds 1:2:128+2:4", "s-")):
            pts = sorted((t, dense[t] / r["us"]) for (s, o, t), r in best.items()
                         if s == shape and o == op and t in dense)
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        tp = sorted((r["t"], r["torch_dense_us"] / r["torch_2of4_us"])
                    for r in result.get("torch", [])
                    if r["shape"] == shape and r.get("torch_2of4_us") and r.get("torch_dense_us"))
        if tp:
            ax.plot(*zip(*tp), "x--", label="torch 2:4 (cuSPARSELt) vs torch dense")
        k, n = next((r["k"], r["n"]) for r in result["rows"] if r["shape"] == shape)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(1 / 0.5625, color="gray", lw=0.8, ls=":", label="2:4 byte limit (1.78x)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape}  K={k} N={n}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("speed-up over XLA dense")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Sparse matmul on {result['device']} (bf16; best tiling per point)")
    fig.tight_layout()
    fig.savefig(out / "sparse_matmul_speedup.png", dpi=110)

    fig, ax = plt.subplots(figsize=(7, 5))
    rate = result["copy_rate_Bps"]
    ai = [10 ** (i / 20) for i in range(-20, 81)]
    ax.plot(ai, [min(PEAK_FLOPS, a * rate) for a in ai], "k-", lw=1,
            label=f"roof: {rate / 1e12:.2f} TB/s copy, {PEAK_FLOPS / 1e12:.0f} TFLOP/s")
    for op, marker, label in (("dense", "o", "XLA dense"), ("nm", "^", "2:4"),
                              ("samoyeds", "s", "Samoyeds")):
        pts = [(2 * r["t"] * r["k"] * r["n"] / r["bytes"], 2 * r["t"] * r["k"] * r["n"] / (r["us"] * 1e-6))
               for (s, o, t), r in best.items() if o == op]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=label, alpha=0.75)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (dense-equivalent FLOPs / bytes moved)")
    ax.set_ylabel("dense-equivalent FLOP/s")
    ax.set_title(f"Roofline, {result['device']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sparse_matmul_roofline.png", dpi=110)
    print(f"wrote {out / 'sparse_matmul_speedup.png'} and {out / 'sparse_matmul_roofline.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

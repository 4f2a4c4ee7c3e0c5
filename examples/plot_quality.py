"""Render ``examples/quality.py`` results as one PNG: bits/byte lost per format and method.

Left panel: one-shot, above the dense model (log scale). Right panel: recovered, above the dense
control given the same training, with the paired standard error and each format's target.
Rows of several JSON files are merged (a later file's row replaces an earlier one's for the same
format and method).

    python3 examples/plot_quality.py --out benchmarks/quality_large_h100.png \
        benchmarks/quality_large_24_h100.json benchmarks/quality_large_samoyeds_h100.json \
        benchmarks/quality_large_recovered_24_u50_h100.json \
        benchmarks/quality_large_recovered_sparsegpt_u_h100.json \
        benchmarks/quality_large_recovered_sam_u75_h100.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

SAMOYEDS = "Samoyeds\n1:2:128 + 2:4"
FORMATS = {"2:4": "2:4", "samoyeds_shared": SAMOYEDS, "samoyeds": SAMOYEDS,
           "unstructured50": "unstructured\n50%", "unstructured75": "unstructured\n75%"}
METHODS = ("magnitude", "wanda", "sparsegpt")
# Recovered targets (bits/byte above the dense control).
TARGETS = {"2:4": 0.01, "samoyeds_shared": 0.05, "samoyeds": 0.05, "unstructured75": 0.03}


def load_rows(paths: list[str]) -> dict[tuple[str, str], dict]:
    """(format, method) -> the run's row, from ``examples/quality.py`` JSON files.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not such a
    result (naming the file)."""
    rows: dict[tuple[str, str], dict] = {}
    for path in paths:
        p = pathlib.Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no quality result at {path}")
        try:
            runs = json.loads(p.read_text())["runs"]
            for run in runs:
                rows[(run["format"], run["method"])] = run
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not an examples/quality.py result (expected a JSON "
                             f"object with 'runs' of format/method rows): {exc!r}") from exc
    if not rows:
        raise ValueError(f"no runs in {', '.join(paths)}")
    return rows


def plot(rows: dict[tuple[str, str], dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = [f for f in FORMATS if any(k[0] == f for k in rows)]
    methods = [m for m in METHODS if any(k[1] == m for k in rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, one, rec, err = [], [], [], []
        for i, fmt in enumerate(formats):
            run = rows.get((fmt, method))
            if run is None:
                continue
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            one.append(run["one_shot"]["vs_dense"]["difference"])
            recovered = (run.get("recovered") or {}).get("vs_control")
            rec.append(recovered["difference"] if recovered else float("nan"))
            err.append(recovered["standard_error"] if recovered else 0.0)
        ax1.bar(xs, one, width, label=method)
        ax2.bar(xs, rec, width, yerr=err, capsize=2, label=method)
    for i, fmt in enumerate(formats):
        if fmt in TARGETS:
            ax2.hlines(TARGETS[fmt], i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(formats)), [FORMATS[f] for f in formats], fontsize=8)
        ax.grid(alpha=0.3, axis="y", which="both")
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("bits/byte above dense")
    ax1.set_title("one-shot")
    ax2.set_ylabel("bits/byte above the dense control")
    ax2.set_title("recovered (mask fixed; dashed: target)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="examples/quality.py JSON files")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    plot(load_rows(args.results), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

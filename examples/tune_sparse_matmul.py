"""Write tuned ``nm_matmul`` / ``samoyeds_matmul`` configs from a GPU sweep.

Either run the sweep here (needs the GPU) or read the JSON that
``examples/bench_sparse_matmul.py --sweep`` wrote; for every (op, shape, token count) the
fastest variant whose output matched the f32 reference is kept, and the file
``pallas_kernels/tuning/configs/<device>.json`` is (re)written. Each shape also gets a
``"*"`` entry (the config that wins for the largest swept shape) for shapes never swept.

    PYTHONPATH=. python3 examples/tune_sparse_matmul.py --run --sweep-out sweep.json
    PYTHONPATH=. python3 examples/tune_sparse_matmul.py --from benchmarks/sparse_matmul.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

OP_KEYS = {"nm": "nm_matmul_2of4", "samoyeds": "samoyeds_matmul_1of2v128"}
MAX_ERR = 2e-2


def best_configs(result: dict) -> dict:
    """{op key: {"KxN": {tokens: config + {"_us": time}}}} from a sweep's rows."""
    best: dict[tuple, dict] = {}
    for r in result["rows"]:
        if r.get("op") not in OP_KEYS or "us" not in r or "config" not in r:
            continue
        if not r.get("err", 1.0) < MAX_ERR:
            continue
        key = (OP_KEYS[r["op"]], f"{r['k']}x{r['n']}", str(r["t"]))
        if key not in best or r["us"] < best[key]["_us"]:
            best[key] = dict(r["config"], _us=round(r["us"], 2))
    out: dict[str, dict] = {}
    for (op, shape, t), cfg in sorted(best.items()):
        out.setdefault(op, {}).setdefault(shape, {})[t] = cfg
    for op, shapes in out.items():
        # Fallback for unswept shapes: the largest swept shape's winners.
        largest = max(shapes, key=lambda s: int(s.split("x")[0]) * int(s.split("x")[1]))
        shapes["*"] = dict(shapes[largest])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="src", help="sweep JSON written by bench_sparse_matmul.py")
    src.add_argument("--run", action="store_true", help="run the sweep now (GPU)")
    p.add_argument("--sweep-out", default="sparse_matmul_sweep.json")
    p.add_argument("--out", help="config file (default: the device's file in the package)")
    args, rest = p.parse_known_args(argv)
    if args.run:
        from examples import bench_sparse_matmul
        bench_sparse_matmul.main(["--sweep", "--out", args.sweep_out, *rest])
        args.src = args.sweep_out
    result = json.loads(pathlib.Path(args.src).read_text())
    from pallas_kernels import tuning
    out = pathlib.Path(args.out) if args.out else tuning.config_path(result["device"])
    configs = best_configs(result)
    configs["_about"] = (f"written by examples/tune_sparse_matmul.py from {pathlib.Path(args.src).name} "
                         f"on {result['device']}; _us = measured time of the winner")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")
    n = sum(len(v) for op, s in configs.items() if op != "_about" for v in s.values())
    print(f"wrote {n} entries to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

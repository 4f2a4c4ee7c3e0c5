"""Summarize a ``jax.profiler`` trace (the ``perfetto_trace.json.gz`` written with
``create_perfetto_trace=True``): GPU time per kernel name, the union of kernel time, of
host->device copy time, and how much of the copy time runs under kernels.

    python3 examples/trace_summary.py path/to/perfetto_trace.json.gz   (or the trace directory)
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import sys


def load(path: str) -> tuple[list[dict], str]:
    """Trace events of the first perfetto trace under ``path`` (a file or a directory)."""
    files = [path] if path.endswith(".gz") else glob.glob(f"{path}/**/*.json.gz", recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.json.gz trace under {path!r}")
    with gzip.open(files[0]) as fh:
        data = json.load(fh)
    return (data["traceEvents"] if isinstance(data, dict) else data), files[0]


def union(intervals: list[list[float]]) -> list[list[float]]:
    """Sorted, disjoint [start, end] intervals covering the same time as ``intervals``."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def intersect(x: list[list[float]], y: list[list[float]]) -> list[list[float]]:
    """The time two unions (``union`` outputs) share, as intervals."""
    i = j = 0
    out = []
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append([a, b])
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def length(intervals: list[list[float]]) -> float:
    return sum(b - a for a, b in intervals)


def summarize(path: str, top: int = 25) -> dict:
    """GPU events of the trace: span, kernel-busy and copy-busy time (us, unions over all
    streams), copy time under kernels, the streams, and the ``top`` names by total time."""
    events, file = load(path)
    meta = [e for e in events if e.get("ph") == "M"]
    process = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta
              if e.get("name") == "thread_name"}
    gpu = [e for e in events if e.get("ph") == "X" and "dur" in e
           and "GPU" in process.get(e["pid"], "")]

    def is_copy(e):
        return "memcpy" in e["name"].lower() or "MemcpyH2D" in thread.get((e["pid"], e["tid"]), "")

    copies = [e for e in gpu if is_copy(e)]
    kernels = [e for e in gpu if not is_copy(e) and "memset" not in e["name"].lower()]
    by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in gpu:
        by_name[e["name"][:70]][0] += 1
        by_name[e["name"][:70]][1] += e["dur"]
    ku = union([[e["ts"], e["ts"] + e["dur"]] for e in kernels])
    cu = union([[e["ts"], e["ts"] + e["dur"]] for e in copies])
    span = max(e["ts"] + e["dur"] for e in gpu) - min(e["ts"] for e in gpu) if gpu else 0.0
    return dict(file=file, span_us=span, kernel_busy_us=length(ku), copy_busy_us=length(cu),
                copy_under_kernel_us=length(intersect(ku, cu)),
                streams=sorted({thread.get((e["pid"], e["tid"]), str(e["tid"])) for e in gpu}),
                top=sorted(([n, c, d] for n, (c, d) in by_name.items()), key=lambda r: -r[2])[:top])


def main() -> None:
    summary = summarize(sys.argv[1])
    print(json.dumps({k: v for k, v in summary.items() if k != "top"}, indent=1))
    for name, count, dur in summary["top"]:
        print(f"{dur:10.1f} us {count:6d}  {name}")


if __name__ == "__main__":
    main()

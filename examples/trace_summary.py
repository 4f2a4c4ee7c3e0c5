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
import os
import re
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


def summarize(path: str, top: int | None = 25) -> dict:
    """GPU events of the trace: span, kernel-busy and copy-busy time (us, unions over all
    streams), copy time under kernels, kernel launches, the streams, and the ``top`` names by
    total time (None: every name)."""
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
                copy_under_kernel_us=length(intersect(ku, cu)), kernel_launches=len(kernels),
                streams=sorted({thread.get((e["pid"], e["tid"]), str(e["tid"])) for e in gpu}),
                top=sorted(([n, c, d] for n, (c, d) in by_name.items()), key=lambda r: -r[2])[:top])


_DEF = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r'stack_frame_id=(\d+)')
_TABLE_ROW = re.compile(r'^(\d+) (.*)$')
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_PROJECT = ("samoyeds_jax", "pallas_kernels", "examples")


def _tables(text: str) -> dict[str, dict[int, str]]:
    """The stack-frame tables at the end of an HLO module's text: table -> id -> row."""
    out: dict[str, dict[int, str]] = {t: {} for t in _TABLES}
    table = None
    for line in text.splitlines():
        if line.strip() in _TABLES:
            table = line.strip()
        elif table and (m := _TABLE_ROW.match(line.strip())):
            out[table][int(m.group(1))] = m.group(2)
    return out


def _where(frame: int, tables: dict[str, dict[int, str]]) -> str:
    """``file:line function`` of the innermost frame of this project's code on the stack
    ``frame`` starts (else of the innermost frame)."""
    def field(row: str, key: str) -> int:
        m = re.search(rf"{key}=(\d+)", row)
        return int(m.group(1)) if m else 0

    first, seen = None, set()
    while frame and frame not in seen and frame in tables["StackFrames"]:
        seen.add(frame)
        row = tables["StackFrames"][frame]
        loc = tables["FileLocations"].get(field(row, "file_location_id"), "")
        path = tables["FileNames"].get(field(loc, "file_name_id"), '""').strip('"')
        func = tables["FunctionNames"].get(field(loc, "function_name_id"), '""').strip('"')
        here = f"{os.path.basename(path)}:{field(loc, 'line')} {func}"
        first = first or here
        if any(f"/{p}/" in path for p in _PROJECT):
            return here
        frame = field(row, "parent_frame_id")
    return first or ""


def sources(hlo_texts: list[str]) -> dict[str, str]:
    """Where each instruction of optimized HLO modules (``compiled.as_text()``) comes from:
    kernel name as the trace shows it (``.`` -> ``_``) -> ``op_name (file:line function)``
    from the instruction's metadata (a fusion's is its root's). A name that several modules
    use for different instructions (XLA numbers each module's fusions alike) lists each source,
    joined by `` | ``: the trace does not say which module a kernel ran from."""
    out: dict[str, list[str]] = {}
    for text in hlo_texts:
        tables = _tables(text)
        for line in text.splitlines():
            m = _DEF.match(line)
            name = m and _OP_NAME.search(m.group(2))
            if not name:
                continue
            frame = _FRAME_ID.search(m.group(2))
            where = _where(int(frame.group(1)), tables) if frame else ""
            source = name.group(1) + (f" ({where})" if where else "")
            found = out.setdefault(m.group(1).replace(".", "_"), [])
            if source not in found:
                found.append(source)
    return {kernel: " | ".join(found) for kernel, found in out.items()}


def main() -> None:
    summary = summarize(sys.argv[1])
    print(json.dumps({k: v for k, v in summary.items() if k != "top"}, indent=1))
    for name, count, dur in summary["top"]:
        print(f"{dur:10.1f} us {count:6d}  {name}")


if __name__ == "__main__":
    main()

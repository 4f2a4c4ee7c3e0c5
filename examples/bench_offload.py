"""Decode step time, peak GPU memory and transfer accounting of host-offloaded experts.

Runs ``offload_engines.OffloadDecoder`` over ``SimpleMoEBlock`` stacks with random
weights, for every fetch policy, and measures in the same process:

* compute-only: the same jitted blocks with all experts of every block already resident
  (one block's experts reused by every block, so nothing moves);
* transfer-only: the host->device copies alone (``jax.device_put`` of as many pinned-host
  experts as a pregated step moves), and one large pinned-host copy (the copy rate);
* each policy: median wall time of ``step`` (until its output is ready), bytes moved per
  token, hit rate, host syncs, peak device memory (``device.memory_stats()``), and the
  overlap fraction ``(compute + transfer - step) / min(compute, transfer)``.

Cases (each in its own process so pinned host memory and peak counters start clean):

* ``switch-dense`` / ``switch-nm24``: Switch-Transformer-like, 12 MoE blocks, d 768, f 3072,
  8 experts, top-1, ReLU experts; token counts from decode (1) up to where expert compute
  and transfer are comparable.
* ``mixtral-nm24`` / ``mixtral-dense``: Mixtral-8x7B-shaped, 32 blocks, d 4096, f 14336,
  8 experts, top-2, SwiGLU experts; dense bf16 experts are 90 GB (do not fit an 80 GB GPU).

2:4 experts use the N:M byte layout (values [K/2, N] + 2-bit positions packed in int32
[K/32, N]); blocks expand them to dense before the matmul (the offload path moves 0.5625 of
the dense bytes).

    PYTHONPATH=. python3 examples/bench_offload.py --out /tmp/offload          # all cases
    PYTHONPATH=. python3 examples/bench_offload.py --smoke --out /tmp/offload  # tiny, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import gzip
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_summary import intersect, length, union  # noqa: E402

CASES = ("switch-dense", "switch-nm24", "mixtral-nm24", "mixtral-dense")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    layers: int
    d_model: int
    d_ff: int
    experts: int
    top_k: int
    attn_width: int
    gated: bool
    fmt: str                       # "dense" | "nm24"
    tokens: tuple[int, ...]
    steps: int                     # timed steps per policy
    extra_slots: tuple[int, ...]   # larger caches tried with on_demand/pregated
    traces: tuple[tuple[int, str], ...]   # (tokens, policy) runs recorded with jax.profiler


def make_case(name: str, smoke: bool) -> Case:
    fmt = name.split("-")[1]
    if name.startswith("switch"):
        if smoke:
            return Case(name, 3, 64, 128, 4, 1, 192, False, fmt, (1, 8), 2, (),
                        ((8, "on_demand"), (8, "pregated")))
        tokens = (1, 8192, 16384) if fmt == "dense" else (1, 8192)
        traces = (((1, "pregated"), (8192, "on_demand"), (8192, "pregated"))
                  if fmt == "dense" else ())
        return Case(name, 12, 768, 3072, 8, 1, 2304, False, fmt, tokens, 10, (), traces)
    if smoke:
        return Case(name, 3, 64, 128, 4, 2, 128, True, fmt, (1,), 2, (6,),
                    ((1, "on_demand"), (1, "pregated")))
    traces = ((1, "on_demand"), (1, "pregated")) if fmt == "nm24" else ()
    return Case(name, 32, 4096, 14336, 8, 2, 6144, True, fmt, (1,), 3, (32,), traces)


# --------------------------------------------------------------------------- weights

def _nm24_class():
    """The N:M 2:4 format pytree: pallas_kernels.formats.NMSparse if present, else a local one
    with the same byte layout."""
    import jax
    import jax.numpy as jnp
    try:
        importlib.import_module("pallas_kernels.formats")
        have_formats = True
    except Exception:
        have_formats = False

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class NM24:
        values: jax.Array   # [K/2, N]
        meta: jax.Array     # [K/32, N] int32, 2-bit position of each kept value

        def to_dense(self):
            half, n = self.values.shape[-2:]
            r = jnp.arange(half)
            words = jnp.repeat(self.meta, 16, axis=-2)                    # [K/2, N]
            shift = (2 * (r % 16)).astype(jnp.uint32)[:, None]
            pos = (jax.lax.bitcast_convert_type(words, jnp.uint32) >> shift) & 3
            v = self.values.reshape(half // 2, 2, n)
            p = pos.reshape(half // 2, 2, n).astype(jnp.int32)
            rows = [jnp.sum(jnp.where(p == j, v, jnp.zeros_like(v)), axis=1) for j in range(4)]
            return jnp.stack(rows, axis=1).reshape(2 * half, n)

    return NM24, have_formats


def make_expert_fn(case: Case, dtype):
    """(layer, expert) -> random expert pytree built on the device."""
    import jax
    import jax.numpy as jnp
    NM24, _ = _nm24_class()
    d, f = case.d_model, case.d_ff
    shapes = {"w1": (d, f), "w2": (f, d)}
    if case.gated:
        shapes["w3"] = (d, f)
    pairs = jnp.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], jnp.uint32)

    @jax.jit
    def dense(key, scale_in):
        return {name: (jax.random.normal(k, shape, jnp.float32) * scale_in[name]).astype(dtype)
                for k, (name, shape) in zip(jax.random.split(key, len(shapes)), shapes.items())}

    def one_nm(key, k_in, n_out):
        k1, k2 = jax.random.split(key)
        values = (jax.random.normal(k1, (k_in // 2, n_out), jnp.float32)
                  * (2.0 / k_in) ** 0.5).astype(dtype)
        choice = jax.random.randint(k2, (k_in // 4, n_out), 0, 6)
        pos = pairs[choice].transpose(0, 2, 1).reshape(k_in // 2, n_out)     # [K/2, N]
        shifts = (2 * jnp.arange(16, dtype=jnp.uint32))[None, :, None]
        words = jnp.sum(pos.reshape(k_in // 32, 16, n_out) << shifts, axis=1, dtype=jnp.uint32)
        return NM24(values, jax.lax.bitcast_convert_type(words, jnp.int32))

    @jax.jit
    def nm(key):
        keys = jax.random.split(key, len(shapes))
        return {name: one_nm(k, *shape) for k, (name, shape) in zip(keys, shapes.items())}

    scale = {name: shape[0] ** -0.5 for name, shape in shapes.items()}

    def make(l, e):
        key = jax.random.fold_in(jax.random.key(1234), l * 1000 + e)
        return dense(key, scale) if case.fmt == "dense" else nm(key)

    return make


# --------------------------------------------------------------------------- measurement

def _median(xs):
    return float(np.median(np.asarray(xs))) if xs else float("nan")


def _mem(device) -> dict[str, int]:
    from samoyeds_jax.expert_store import device_memory_stats
    s = device_memory_stats(device) or {}
    return {k: int(s[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in s}


def copy_rate(store, device, *, total_bytes: int) -> dict[str, float]:
    """Pinned-host -> device copy rates: one large array, and whole experts back to back."""
    import jax
    import jax.numpy as jnp
    from samoyeds_jax.expert_store import device_sharding, pinned_host_sharding
    dev, host = device_sharding(device), pinned_host_sharding(device)
    n = max(1, total_bytes // 2)
    big = jax.device_put(jnp.ones((n,), jnp.bfloat16), host)
    big.block_until_ready()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.device_put(big, dev).block_until_ready()
        times.append(time.perf_counter() - t0)
    big_rate = big.nbytes / _median(times)
    del big
    # experts: as many as fit in total_bytes, issued at once (the copy engine's queue full)
    count = max(1, min(total_bytes // store.expert_nbytes, store.num_layers * store.num_experts))
    keys = [(i // store.num_experts % store.num_layers, i % store.num_experts) for i in range(count)]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        moved = [jax.device_put(store.expert(l, e), dev) for l, e in keys]
        jax.block_until_ready(moved)
        times.append(time.perf_counter() - t0)
        del moved
    expert_rate = count * store.expert_nbytes / _median(times)
    return {"big_copy_GBps": big_rate / 1e9, "big_copy_bytes": n * 2,
            "expert_copy_GBps": expert_rate / 1e9, "expert_copy_count": count}


def compute_only(block, params, store, hs, *, top_k, routing_source, sync: bool, steps: int):
    """Step time with one block's experts resident and reused by every block (no transfers).

    ``sync``: read the pre-gate's expert ids on the host after each block (the cost of the
    per-block host sync of the pregated policy).
    """
    import numpy as np_
    from offload_engines import decoder as engine
    from samoyeds_jax.expert_cache import ExpertCache
    cache = ExpertCache(store, slots=store.num_experts, top_k=top_k)
    cache.fetch(0, range(store.num_experts), demand=True)
    cache.commit(0)
    table, layer0 = cache.device_table, cache.layer_index(0)
    front = engine._jit(block.front)

    def step(h):
        carried = None
        for l in range(store.num_layers):
            h, x, own, pregate = front(params[l], h)
            routing = carried if (routing_source == "pregate" and l > 0) else own
            if sync and l + 1 < store.num_layers:   # where the pregated policy reads its ids
                np_.asarray(pregate.topk_idx)
            h = engine._back_with_table(block.back, params[l], h, x, routing, table, layer0,
                                        cache.buffers)
            carried = pregate
        return h

    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step(hs[i % len(hs)]).block_until_ready()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return _median(times)


def run_policy(block, params, store, hs, *, top_k, policy, routing_source, slots, eviction,
               steps, device, trace_dir: str | None = None):
    from offload_engines import OffloadDecoder
    from samoyeds_jax.offload import OffloadConfig
    cfg = OffloadConfig(policy=policy, routing_source=routing_source, slots=slots,
                        eviction=eviction)
    mem0 = _mem(device)
    dec = OffloadDecoder(block.fns(), params, store, top_k=top_k, config=cfg,
                         max_tokens=hs[0].shape[0])
    warm = 2
    walls, syncs, sync_s, nbytes = [], [], [], []
    for i in range(warm + steps):
        if i == warm:
            dec.cache.reset_stats()
        dec.step(hs[i % len(hs)], block=True)
        if i >= warm:
            s = dec.last_stats
            walls.append(s.wall_s)
            syncs.append(s.host_syncs)
            sync_s.append(s.sync_s)
            nbytes.append(s.bytes_fetched)
    trace = None
    if trace_dir is not None:
        try:
            trace = trace_steps(dec, hs, trace_dir, steps=2)
        except Exception as err:  # the timings above stand without a trace
            trace = {"error": f"{type(err).__name__}: {err}"}
    mem1 = _mem(device)
    tokens = int(hs[0].shape[0])
    out = {
        "policy": policy, "routing_source": routing_source, "eviction": eviction,
        "slots": dec.cache.slots, "cache_bytes": dec.cache.nbytes,
        "step_s": _median(walls), "step_s_all": walls,
        "bytes_per_step": _median(nbytes), "bytes_per_token": _median(nbytes) / tokens,
        "host_syncs_per_step": _median(syncs), "sync_wait_s_per_step": _median(sync_s),
        "cache": dec.cache.stats.as_dict(),
        "bytes_in_use_before": mem0.get("bytes_in_use"),
        "bytes_in_use_after": mem1.get("bytes_in_use"),
        "peak_bytes_in_use_so_far": mem1.get("peak_bytes_in_use"),
    }
    if trace is not None:
        out["trace"] = trace
    del dec
    gc.collect()
    return out


# --------------------------------------------------------------------------- traces

def trace_steps(dec, hs, out_path: str, *, steps: int) -> dict[str, Any]:
    """Profile ``steps`` decode steps; keep the device events in ``out_path`` (.json.gz) and
    return how much host->device copy time overlaps kernel time."""
    import jax
    tmp = tempfile.mkdtemp()
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0      # keep the file small: device and runtime events
    options.host_tracer_level = 1
    with jax.profiler.trace(tmp, profiler_options=options):
        for i in range(steps):
            dec.step(hs[i % len(hs)], block=True)
    files = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "*.trace.json.gz"))
    if not files:
        return {"error": "no trace.json.gz written"}
    with gzip.open(files[0], "rb") as fp:
        trace = json.load(fp)
    shutil.rmtree(tmp, ignore_errors=True)
    return analyze_trace(trace, out_path)


def analyze_trace(trace: dict, out_path: str) -> dict[str, Any]:
    events = trace.get("traceEvents", [])
    pnames = {e["pid"]: e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "process_name"}
    tnames = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu_pids = {p for p, n in pnames.items()
                if any(w in n.lower() for w in ("gpu", "cuda", "/device:"))
                and not any(w in n.lower() for w in ("cpu", "host"))}
    dev_events = [e for e in events if e.get("pid") in gpu_pids]
    copies, kernels, names = [], [], {}
    for e in dev_events:
        if e.get("ph") != "X":
            continue
        tname = tnames.get((e["pid"], e.get("tid")), "")
        iv = [float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))]
        key = f'{tname} | {e.get("name", "")[:60]}'
        names[key] = names.get(key, 0) + 1
        if "memcpyh2d" in tname.lower():
            copies.append(iv)
        elif "compute" in tname.lower() and not e.get("name", "").startswith("Memset"):
            kernels.append(iv)
    cu, ku = union(copies), union(kernels)
    both = length(intersect(cu, ku))
    span = (max(b for _, b in cu + ku) - min(a for a, _ in cu + ku)) if cu or ku else 0.0
    keep = events[:400_000]   # device streams and host runtime annotations (no Python tracer)
    slim = {"traceEvents": keep, "displayTimeUnit": "ns"}
    with gzip.open(out_path, "wt") as fp:
        json.dump(slim, fp)
    top = sorted(names.items(), key=lambda kv: -kv[1])[:25]
    return {
        "file": os.path.basename(out_path), "device_processes": [pnames[p] for p in gpu_pids],
        "all_processes": sorted(set(pnames.values())),
        "device_threads": sorted({n for (p, _), n in tnames.items() if p in gpu_pids}),
        "h2d_copy_us": length(cu), "kernel_us": length(ku), "overlap_us": both,
        "span_us": span,
        "copy_time_hidden_under_kernels": both / length(cu) if cu else 0.0,
        "kernel_time_with_copy_running": both / length(ku) if ku else 0.0,
        "copy_count": len(copies), "kernel_count": len(kernels), "top_event_names": top,
    }


# --------------------------------------------------------------------------- one case

def _dump(out_dir: str, case: Case, result: dict) -> None:
    """Write the results so far (a case cut by its time limit still leaves them)."""
    path = os.path.join(out_dir, f"case_{case.name}.json")
    with open(path + ".tmp", "w") as fp:
        json.dump(result, fp, indent=1, default=str)
    os.replace(path + ".tmp", path)


def run_case(case: Case, out_dir: str, *, smoke: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from offload_engines import SimpleMoEBlock, overlap_fraction
    from samoyeds_jax.expert_store import ExpertStore, tree_nbytes
    device = jax.devices()[0]
    dtype = jnp.bfloat16
    t0 = time.perf_counter()
    make = make_expert_fn(case, dtype)

    def make_logged(l, e):
        if e == 0 and l % 8 == 0:
            print(f"[{case.name}] building block {l} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return make(l, e)

    store = ExpertStore.from_fn(make_logged, num_layers=case.layers,
                                num_experts=case.experts, device=device)
    build_s = time.perf_counter() - t0
    NM24, have_formats = _nm24_class()
    print(f"[{case.name}] store {store.nbytes / 1e9:.2f} GB pinned host in {build_s:.1f} s, "
          f"expert {store.expert_nbytes / 1e6:.1f} MB", flush=True)
    block = SimpleMoEBlock(num_experts=case.experts, top_k=case.top_k, dtype=dtype)
    keys = jax.random.split(jax.random.key(7), case.layers)
    params = [block.init_params(k, d_model=case.d_model, attn_width=case.attn_width,
                                device=device) for k in keys]
    # pre-gate of block l starts as block l+1's router (as Pre-gated MoE initializes it)
    for l in range(case.layers - 1):
        params[l]["pregate"] = params[l + 1]["router"]
    dense_params_bytes = sum(tree_nbytes(p) for p in params)
    result = {"case": dataclasses.asdict(case), "device": str(device.device_kind),
              "store_bytes": store.nbytes, "expert_bytes": store.expert_nbytes,
              "store_build_s": build_s, "resident_params_bytes": dense_params_bytes,
              "format_impl": "pallas_kernels.formats" if have_formats else "local NM24 layout",
              "memory_at_start": _mem(device), "runs": []}
    fits_gpu = (store.nbytes + dense_params_bytes) < 0.8 * (_mem(device).get("bytes_limit")
                                                            or float("inf"))
    # Policies first, in increasing device-memory order, so that the process-wide
    # peak_bytes_in_use read after each one is that policy's peak (it never decreases).
    plan = [("on_demand", "pregate", None, "lru"), ("pregated", "pregate", None, "lru"),
            ("speculative", "router", None, "lru"), ("prefetch_all", "pregate", None, "lru")]
    plan += [(p, "pregate", s, ev) for s in case.extra_slots
             for p, ev in (("on_demand", "lfu"), ("pregated", "lru"), ("pregated", "lfu"))]
    if fits_gpu:
        plan += [("gpu_only", "pregate", None, "lru")]
    for t in case.tokens:
        rng = np.random.default_rng(t)
        hs = [jax.device_put(jnp.asarray(rng.standard_normal((t, case.d_model)), dtype), device)
              for _ in range(4)]
        steps = case.steps
        row = {"tokens": t}
        runs = []
        for policy, src, slots, ev in plan:
            trace_path = None
            if (t, policy) in case.traces and slots is None:
                trace_path = os.path.join(out_dir, f"trace_{case.name}_t{t}_{policy}.json.gz")
            try:
                r = run_policy(block, params, store, hs, top_k=case.top_k, policy=policy,
                               routing_source=src, slots=slots, eviction=ev, steps=steps,
                               device=device, trace_dir=trace_path)
            except Exception as err:  # keep the other measurements
                r = {"policy": policy, "slots": slots, "error": f"{type(err).__name__}: {err}"}
                print(f"[{case.name} t={t}] {policy} failed: {r['error']}", flush=True)
                runs.append(r)
                continue
            runs.append(r)
            _dump(out_dir, case, dict(result, partial_row=dict(row, runs=runs)))
            print(f"[{case.name} t={t}] {policy:12s} slots={r['slots']:4d} {ev} "
                  f"step {r['step_s'] * 1e3:9.2f} ms  moved {r['bytes_per_step'] / 1e9:7.3f} GB "
                  f"hit {r['cache']['hit_rate']:.2f} syncs {r['host_syncs_per_step']:.0f} "
                  f"peak {(r['peak_bytes_in_use_so_far'] or 0) / 1e9:.2f} GB", flush=True)
        for src in ("pregate", "router"):
            row[f"compute_only_s_{src}"] = compute_only(
                block, params, store, hs, top_k=case.top_k, routing_source=src, sync=False,
                steps=steps)
        row["compute_only_sync_s"] = compute_only(
            block, params, store, hs, top_k=case.top_k, routing_source="pregate", sync=True,
            steps=steps)
        row["host_sync_cost_per_block_s"] = (
            (row["compute_only_sync_s"] - row["compute_only_s_pregate"]) / (case.layers - 1))
        print(f"[{case.name} t={t}] compute-only {row['compute_only_s_pregate'] * 1e3:.2f} ms, "
              f"with a host sync per block {row['compute_only_sync_s'] * 1e3:.2f} ms", flush=True)
        if "copy_rate" not in result:
            rates = copy_rate(store, device, total_bytes=min(2 * 2**30, store.nbytes))
            result["copy_rate"] = rates
            print(f"[{case.name}] copy: big {rates['big_copy_GBps']:.1f} GB/s, experts "
                  f"{rates['expert_copy_GBps']:.1f} GB/s", flush=True)
        expert_rate = result["copy_rate"]["expert_copy_GBps"] * 1e9
        for r in runs:
            if "error" in r:
                continue
            comp = row[f"compute_only_s_{r['routing_source']}"]
            xfer = r["bytes_per_step"] / expert_rate
            r["compute_only_s"] = comp
            r["transfer_only_s"] = xfer
            r["overlap_fraction"] = overlap_fraction(r["step_s"], comp, xfer)
            r["vs_max_compute_transfer"] = r["step_s"] / max(comp, xfer)
            r["achieved_copy_GBps"] = r["bytes_per_step"] / r["step_s"] / 1e9
        by = {(r["policy"], r.get("slots")): r for r in runs if "error" not in r}
        od, pg = by.get(("on_demand", runs[0].get("slots"))), by.get(("pregated", runs[1].get("slots")))
        if od and pg:
            row["pregated_speedup_vs_on_demand"] = od["step_s"] / pg["step_s"]
        row["runs"] = runs
        result["runs"].append(row)
        _dump(out_dir, case, result)
        del hs
        gc.collect()
    result["memory_at_end"] = _mem(device)
    return result


# --------------------------------------------------------------------------- driver

def summarize(results: list[dict]) -> str:
    lines = [f"{'case':14s} {'t':>6s} {'policy':12s} {'slots':>5s} {'step ms':>9s} "
             f"{'comp ms':>8s} {'xfer ms':>8s} {'ovl':>5s} {'GB/tok':>7s} {'hit':>5s} "
             f"{'peak GB':>8s}"]
    for res in results:
        if "error" in res:
            lines.append(f"{res.get('name', '?'):14s} ERROR {res['error'][:100]}")
            continue
        for row in res["runs"]:
            for r in row["runs"]:
                if "error" in r:
                    lines.append(f"{res['case']['name']:14s} {row['tokens']:6d} {r['policy']:12s} "
                                 f"ERROR {r['error'][:80]}")
                    continue
                lines.append(
                    f"{res['case']['name']:14s} {row['tokens']:6d} {r['policy']:12s} "
                    f"{r['slots']:5d} {r['step_s'] * 1e3:9.2f} {r['compute_only_s'] * 1e3:8.2f} "
                    f"{r['transfer_only_s'] * 1e3:8.2f} {r['overlap_fraction']:5.2f} "
                    f"{r['bytes_per_token'] / 1e9:7.3f} {r['cache']['hit_rate']:5.2f} "
                    f"{(r['peak_bytes_in_use_so_far'] or 0) / 1e9:8.2f}")
            if "pregated_speedup_vs_on_demand" in row:
                lines.append(f"{'':14s} {row['tokens']:6d} pregated vs on_demand: "
                             f"{row['pregated_speedup_vs_on_demand']:.2f}x; host sync per block "
                             f"{row['host_sync_cost_per_block_s'] * 1e6:.0f} us")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--case", default=None, help="run one case in this process")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall time for all cases")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.case:
        case = make_case(args.case, args.smoke)
        _dump(args.out, case, run_case(case, args.out, smoke=args.smoke))
        return
    t_end = time.time() + args.budget_s
    share = {"switch-dense": 0.2, "switch-nm24": 0.12, "mixtral-nm24": 0.28, "mixtral-dense": 0.4}
    results = []
    cases = [c for c in args.cases.split(",") if c]
    for i, name in enumerate(cases):
        left = t_end - time.time()
        rest = sum(share.get(c, 0.25) for c in cases[i:])
        limit = max(30.0, left * share.get(name, 0.25) / rest)
        cmd = [sys.executable, __file__, "--case", name, "--out", args.out]
        if args.smoke:
            cmd.append("--smoke")
        # 0.92 of the GPU for XLA; pinned host memory beyond the default 64 GB cap for the
        # dense Mixtral-shaped store (90 GB)
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92",
                   XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB="100")
        print(f"=== {name} (limit {limit:.0f} s, {args.budget_s - left:.0f} s elapsed)", flush=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        path = os.path.join(args.out, f"case_{name}.json")
        if os.path.exists(path):
            with open(path) as fp:
                res = json.load(fp)
            if rc != 0:
                res["exit"] = rc
            if "partial_row" in res and rc != 0:   # cut mid-way: keep the finished policies
                row = res.pop("partial_row")
                row.setdefault("tokens", 0)
                for r in row["runs"]:
                    r.setdefault("compute_only_s", float("nan"))
                    r.setdefault("transfer_only_s", float("nan"))
                    r.setdefault("overlap_fraction", float("nan"))
                res["runs"].append(row)
            res.pop("partial_row", None)
            results.append(res)
            os.remove(path)
        else:
            results.append({"name": name, "error": f"no result (exit {rc})"})
    with open(os.path.join(args.out, "offload.json"), "w") as fp:
        json.dump({"results": results}, fp, indent=1, default=str)
    print(summarize(results), flush=True)


if __name__ == "__main__":
    main()

"""Conversion at scale: a synthetic Hugging Face checkpoint on disk, converted to a sparse
expert format by the streaming importer, saved, loaded, and generating.

Two steps, each its own process so that its peak host memory is its own:

* ``--step write``: a model of the ``--model`` shapes (``--layers`` blocks, random weights) is
  built with its routed experts in host memory (``expert_store.host_experts``: one block's
  experts on the device at a time) and written with ``save_hf_checkpoint`` (bf16, one
  safetensors file) to ``WORKDIR/hf``.
* ``--step convert``: ``load_hf_checkpoint(WORKDIR/hf, expert_format=FORMAT,
  prune=PruneConfig(method=METHOD))`` reads it block by block and prunes each block's
  experts on the device (seconds per block = total / blocks, reading included; "wanda" and
  "sparsegpt" are calibrated on ``--calib-windows`` random token windows of ``--calib-len``,
  walked through the pruned blocks, ``compress.prune_checkpoint``; ``--refit-iters`` sets SparseGPT's
  refit of the kept weights, 0: one pass); then
  ``save_converted`` to ``WORKDIR/converted``, ``load_converted`` back, ``prepare`` (the
  fastest expert implementation here, in its layout), and a greedy generation of
  ``--new-tokens`` tokens (compile and decode timed apart). ``--warm`` converts a second time
  in the same process, its programs compiled: the per-layer cost of a deep model, whose first
  layer alone pays the compiles; ``--profile`` adds that run's cProfile top 30.

Each step records its seconds (the entry ``convert``, or ``convert_wanda`` / ``convert_sparsegpt``), its peak host memory (``ru_maxrss``, which counts the
checkpoint's memory-mapped file pages too, and the anonymous memory alone, sampled) and peak
device memory (``memory_stats``) into ``--out`` (JSON, both steps in one file). Sizes:
OLMoE-1B-7B is 13.8 GB in bf16; Mixtral-8x7B is 3 GB per block.

    python3 examples/bench_convert.py --step write --model olmoe-1b-7b --workdir /tmp/conv --out conv.json
    python3 examples/bench_convert.py --step convert --format samoyeds --workdir /tmp/conv --out conv.json
    python3 examples/bench_convert.py --step write --tiny --workdir /tmp/conv --out /tmp/c.json  # CPU
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from samoyeds_jax import pruning  # noqa: E402
from samoyeds_jax.compress import prune_checkpoint  # noqa: E402
from samoyeds_jax.converted_io import load_converted, save_converted  # noqa: E402
from samoyeds_jax.expert_store import host_experts  # noqa: E402
from samoyeds_jax.generate import Generator  # noqa: E402
from samoyeds_jax.hf_export import save_hf_checkpoint  # noqa: E402
from samoyeds_jax.hf_import import load_hf_checkpoint  # noqa: E402
from samoyeds_jax.model import ModelConfig, MoETransformer, default_mlp  # noqa: E402


class AnonPeak:
    """The peak of this process's anonymous resident memory (``RssAnon`` in /proc/self/status,
    sampled every 20 ms by a thread): what the program itself holds, without the checkpoint's
    file pages that safetensors maps and ``ru_maxrss`` counts. None where /proc is missing."""

    def __init__(self):
        self.peak_kib = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _read() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def _run(self):
        while True:
            now = self._read()
            if now is not None:
                self.peak_kib = max(self.peak_kib or 0, now)
            if self._stop.wait(0.02):
                return

    def mib(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return None if self.peak_kib is None else self.peak_kib / 1024


def _peaks(anon: AnonPeak) -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    device = stats.get("peak_bytes_in_use")
    return {"peak_host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_host_anon_mib": anon.mib(),
            "peak_device_mib": None if device is None else device / 2**20}


def _dir_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
               for f in files) / 2**20


def write(args) -> dict:
    anon = AnonPeak()
    if args.tiny:
        config = ModelConfig.tiny(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    else:
        hf = dict(MODELS[args.model])
        hf["num_hidden_layers"] = args.layers or hf["num_hidden_layers"]
        config = ModelConfig.from_hf(hf)
    t0 = time.perf_counter()
    model = MoETransformer(config, rngs=nnx.Rngs(0), mlp_factory=host_experts(default_mlp))
    jax.block_until_ready(nnx.state(model))
    build_s = time.perf_counter() - t0
    out = os.path.join(args.workdir, "hf")
    t0 = time.perf_counter()
    save_hf_checkpoint(model, out, dtype="bfloat16")
    return dict(model="tiny" if args.tiny else args.model, layers=config.num_layers,
                build_s=build_s, write_s=time.perf_counter() - t0, checkpoint_mib=_dir_mib(out),
                **_peaks(anon))


def _profile_top(profile: cProfile.Profile, rows: int = 30) -> list[dict]:
    """The functions with the most cumulative seconds: name, calls, cumulative and own seconds.
    cProfile (Python 3.12) also records the memory sampler's thread, so its rows
    (``AnonPeak``, its ``threading`` waits and lock acquires) are left out."""
    sampler = ("threading.py", "bench_convert.py")
    stats = {k: v for k, v in pstats.Stats(profile).stats.items()
             if os.path.basename(k[0]) not in sampler and "acquire" not in k[2]}
    top = sorted(stats.items(), key=lambda kv: -kv[1][3])[:rows]
    return [dict(function=f"{os.path.basename(file)}:{line} {name}", calls=calls,
                 cumulative_s=cum, own_s=own)
            for (file, line, name), (_, calls, own, cum, _) in top]


def convert(args) -> dict:
    anon = AnonPeak()
    src, dst = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "converted")
    windows = None
    if args.method != "magnitude":
        with open(os.path.join(src, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        windows = np.random.default_rng(0).integers(0, vocab, (args.calib_windows, args.calib_len))

    def load():
        t0 = time.perf_counter()
        prune = pruning.PruneConfig(format=args.format, method=args.method,
                                    refit_iters=args.refit_iters, output="compressed")
        if windows is None:
            model, config = load_hf_checkpoint(src, expert_format=args.format, prune=prune)
        else:
            out = prune_checkpoint(src, windows, prune)
            model, config = out.model, out.config
        jax.block_until_ready(nnx.state(model))
        return model, config, time.perf_counter() - t0

    model, config, convert_s = load()
    warm = {}
    if args.warm:  # again, its programs compiled: the per-layer cost of a deep model
        del model
        profile = cProfile.Profile() if args.profile else None
        if profile:
            profile.enable()
        model, config, warm_s = load()
        if profile:
            profile.disable()
            warm["warm_profile"] = _profile_top(profile)
        warm.update(convert_warm_s=warm_s, convert_warm_s_per_layer=warm_s / config.num_layers)
    t0 = time.perf_counter()
    save_converted(model, dst, source=src)
    save_s = time.perf_counter() - t0
    del model
    t0 = time.perf_counter()
    model, _ = load_converted(dst)
    jax.block_until_ready(nnx.state(model))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    implementation = model.prepare()  # the fastest implementation here, in its layout
    prepare_s = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, 16).tolist()
    gen = Generator(model, eos_id=None)
    first = gen.generate([prompt], max_new_tokens=args.new_tokens)
    again = gen.generate([prompt], max_new_tokens=args.new_tokens)
    assert np.array_equal(first.tokens, again.tokens)
    return dict(format=args.format, method=args.method, refit_iters=args.refit_iters,
                calibration_tokens=0 if windows is None else int(windows.size),
                layers=config.num_layers, convert_s=convert_s,
                convert_s_per_layer=convert_s / config.num_layers, **warm, save_converted_s=save_s,
                converted_mib=_dir_mib(dst), load_converted_s=load_s, prepare_s=prepare_s,
                implementation=implementation, generate_compile_s=first.compile_seconds,
                decode_tok_s=again.decode_tokens_per_second, **_peaks(anon))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", choices=["write", "convert"], required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="JSON; each step adds its entry")
    p.add_argument("--model", choices=sorted(MODELS), default="olmoe-1b-7b")
    p.add_argument("--layers", type=int, default=0, help="0: the model's own depth")
    p.add_argument("--format", default="samoyeds", help="expert format of the conversion")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default="magnitude",
                   help="pruning method; wanda and sparsegpt are calibrated")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--refit-iters", type=int, default=pruning.PruneConfig.refit_iters,
                   help="SparseGPT's refit of the kept weights (0: one pass)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--warm", action="store_true",
                   help="convert a second time, its programs compiled (convert_warm_s)")
    p.add_argument("--profile", action="store_true",
                   help="with --warm: cProfile the second conversion (warm_profile: top 30)")
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    args = p.parse_args()
    if args.profile and not args.warm:
        p.error("--profile profiles the second conversion: it needs --warm")
    os.makedirs(args.workdir, exist_ok=True)
    entry = write(args) if args.step == "write" else convert(args)
    entry.update(device=str(jax.devices()[0].device_kind))
    report = json.load(open(args.out)) if os.path.exists(args.out) else {}
    key = args.step if args.step == "write" or args.method == "magnitude" else \
        f"{args.step}_{args.method}"
    report[key] = entry
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()

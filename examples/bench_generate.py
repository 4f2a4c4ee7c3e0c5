"""End-to-end generation speed of a full-size MoE model: dense vs 2:4 vs Samoyeds experts.

For each expert format and implementation it builds the model (random weights of the
``--model`` shapes, Mixtral-8x7B or Qwen3-30B-A3B, ``--layers`` decoder blocks, default all of
them; sparse experts drawn directly in their format) and measures with
``samoyeds_jax.generate.Generator``:

* decode tokens/s at each batch size: the whole decode loop is one jitted ``lax.while_loop``
  (``--new-tokens`` tokens, EOS ignored), timed from dispatch to ``block_until_ready``,
  compilation excluded (ahead-of-time compiled); median of ``--repeats`` runs;
* prefill tokens/s: ``--prefill-batch`` prompts of ``--prefill-len`` tokens;
* correctness in the same run: for every format, the logits of one forward with each expert
  implementation against ``xla`` (same weights), and whether their greedy tokens agree;
* peak device memory after each format, build and compile seconds; a format that does not fit
  the device is recorded as such (dense Mixtral-8x7B needs a 141 GB H200);
* decode as a fraction of its bytes-per-step roofline: the bytes one decode step must read
  (every non-expert weight but the embedding table, the experts a uniform routing of the batch
  touches in expectation, the whole KV cache) over the copy rate measured at the start of the
  run (a jitted ``x + 1`` over 1 GiB), against the measured step time;
* with ``--long-context``: batch-1 decode with a KV cache of that many slots allocated and
  filled (the memory a long context needs, and the step time of attending over it);
* with ``--trace``: one more prefill under ``jax.profiler``, its kernel time summed by the
  source line of the HLO instructions (where the prefill's time goes); and batch-1
  generations of ``--new-tokens`` and of 2 tokens under
  ``jax.profiler``, their difference per decode step (``trace_summary``; the prefill cancels):
  time some kernel runs (against the measured step: the rest is launch gaps), kernel launches,
  and the kernels by total time, each with the source line of the HLO instruction it runs
  (``trace_summary.sources``).

Decode is weight-bandwidth bound at small batch: expert bytes per token fall to ~56% (2:4) and
~28% (Samoyeds 1:2:128 + 2:4) of dense, attention and embedding bytes stay.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 examples/bench_generate.py --out benchmarks/generate.json \
        --layers 2
    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 examples/bench_generate.py --model qwen3-30b-a3b \
        --batches 1,8,32 --prefill-batch 1 --prefill-len 2048 --no-check \
        --variants dense/triton,samoyeds/mosaic_sparse_mma --out benchmarks/generate_qwen3.json
    PYTHONPATH=. python3 examples/bench_generate.py --tiny --out /tmp/generate.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import trace_summary
from model_shapes import MODELS
from samoyeds_jax.atomic import write_json
from samoyeds_jax.expert_store import host_experts
from samoyeds_jax.generate import Generator, SamplingConfig, decode_loop, eos_array
from samoyeds_jax.generate_offload import OffloadGenerator
from samoyeds_jax.model import ModelConfig, MoETransformer, default_mlp
from samoyeds_jax.offload import OffloadConfig
from samoyeds_jax.scan import scan_blocks


# format/implementation pairs timed by default (``pallas_kernels.expert_op``); the dense XLA
# grouped matmul is the baseline. ``mosaic_sparse_mma`` / ``mosaic_expand`` put the experts in a
# Hopper layout (Mosaic GPU kernels; Hopper GPUs only).
DEFAULT_VARIANTS = "dense/xla,dense/triton,nm/triton,samoyeds/triton"


def _config(args, fmt: str) -> ModelConfig:
    if args.tiny:
        return ModelConfig.tiny(expert_format=fmt).replace(num_layers=args.layers or 2)
    hf = MODELS[args.model]
    hf = dict(hf, num_hidden_layers=args.layers or hf["num_hidden_layers"])
    return ModelConfig.from_hf(hf, expert_format=fmt)


def _with_implementation(model: MoETransformer, implementation: str) -> MoETransformer:
    """The same weights computed by another expert implementation: a new graph sharing the
    arrays, each MoE layer prepared for ``implementation`` (a layout change copies)."""
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)
    out.prepare(implementation)
    return out


def _expert_bytes(model: MoETransformer) -> int:
    total = 0
    for block in model.layers:
        for w in (block.mlp.w1, block.mlp.w3, block.mlp.w2):
            total += sum(a.nbytes for a in jax.tree.leaves(w.get_value()))
    return total


def _param_bytes(model: MoETransformer) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def bytes_per_decode_step(model: MoETransformer, batch: int, slots: int) -> float:
    """Bytes one decode step of ``batch`` rows reads from device memory, at least: every
    non-expert weight but the embedding table (only ``batch`` rows of it are read), the experts
    a uniform top-k routing of ``batch`` tokens touches in expectation in every block, and a
    KV cache of ``slots`` slots."""
    cfg = model.config
    e, k = cfg.moe.num_experts, cfg.moe.top_k
    experts = _expert_bytes(model)
    embed = 0 if cfg.tie_word_embeddings else model.embed_tokens.embedding.get_value().nbytes
    touched = 1.0 - (1.0 - k / e) ** batch  # the expected fraction of a block's experts
    a = cfg.attention
    kv = (batch * slots * cfg.num_layers * 2 * a.num_kv_heads * a.head_dim
          * jnp.dtype(cfg.dtype).itemsize)
    return _param_bytes(model) - experts - embed + experts * touched + kv


def copy_rate(nbytes: int = 1 << 30, iters: int = 20, repeats: int = 5) -> float:
    """Device memory bytes/s: ``iters`` passes of ``x + 1`` over ``nbytes`` (each reads and
    writes ``nbytes``) inside one jitted loop, so dispatch and clock ramp-up do not count; the
    best of ``repeats`` runs after a warm-up (one host-timed ``x + 1`` measured 1.5-2.5 TB/s on
    one H100 from run to run)."""
    x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: jax.lax.fori_loop(0, iters, lambda _, y: y + 1, x))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return 2 * nbytes * iters / best


def _fits(args, fmt: str) -> tuple[bool, str]:
    """Whether the model of ``fmt`` fits the device's memory, from its parameter bytes
    extrapolated from 1- and 2-block builds (XLA's allocator retries each allocation of a
    model that does not fit for seconds: a full-depth build would spend minutes failing)."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None:  # a device that does not report it (CPU): just try
        return True, ""
    config = _config(args, fmt)
    sizes = []
    for depth in (1, 2):
        small = MoETransformer(config.replace(num_layers=depth), rngs=nnx.Rngs(0))
        sizes.append(_param_bytes(small))
        del small
    gc.collect()
    need = sizes[0] + (config.num_layers - 1) * (sizes[1] - sizes[0])
    free = limit - stats.get("bytes_in_use", 0)
    why = (f"{config.num_layers} blocks of {fmt} need {need / 2**30:.1f} GiB of parameters; "
           f"{free / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB free")
    return need < 0.97 * free, why


def _trace(gen: Generator, prompts, new_tokens: int) -> dict:
    """Decode steps under ``jax.profiler``: two generations traced, of ``new_tokens`` and of 2
    tokens (the same prefill and one step), each compiled and run once before; their
    difference over the extra steps is one decode step alone: the time some kernel runs, the
    kernel launches, and the kernels by total time, each with its source line."""
    def traced(n):
        gen.generate(prompts, max_new_tokens=n)  # compiled outside the trace
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                steps = gen.generate(prompts, max_new_tokens=n).decode_steps
            return trace_summary.summarize(tmp, top=None), steps

    (full, steps_full), (one, steps_one) = traced(new_tokens), traced(2)
    steps = steps_full - steps_one
    if steps < 1:
        raise ValueError(f"--trace needs --new-tokens >= 3, got {new_tokens}")
    per_name: dict[str, list[float]] = {}
    for sign, s in ((1, full), (-1, one)):
        for name, count, dur in s["top"]:
            row = per_name.setdefault(name, [0.0, 0.0])
            row[0] += sign * count / steps
            row[1] += sign * dur / steps
    where = trace_summary.sources([exe.as_text() for exe in gen.executables()])
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:20]
    out = dict(steps=steps,
               per_step_kernel_busy_us=(full["kernel_busy_us"] - one["kernel_busy_us"]) / steps,
               per_step_launches=(full["kernel_launches"] - one["kernel_launches"]) / steps,
               top=[[name, count, dur, where.get(name, "")] for name, (count, dur) in top])
    print(f"  trace: {out['per_step_kernel_busy_us']:.0f} us/step some kernel running, "
          f"{out['per_step_launches']:.0f} kernel launches/step", flush=True)
    for name, count, dur, source in out["top"]:
        print(f"    {dur:8.1f} us/step {count:6.1f}x  {name}  {source[:120]}", flush=True)
    return out


def _trace_prefill(gen: Generator, prompts) -> dict:
    """One prefill (a 1-token generation of ``prompts``, compiled and run before) under
    ``jax.profiler``: its span, the time some kernel runs, the launches, the kernels by total
    time with their source lines, and kernel time summed by source line (which part of the
    model the prefill's time goes to)."""
    gen.generate(prompts, max_new_tokens=1)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            gen.generate(prompts, max_new_tokens=1)
        s = trace_summary.summarize(tmp, top=None)
    where = trace_summary.sources([exe.as_text() for exe in gen.executables()])
    by_source: dict[str, float] = collections.defaultdict(float)
    for name, _, dur in s["top"]:
        by_source[where.get(name, "") or name] += dur
    out = dict(span_us=s["span_us"], kernel_busy_us=s["kernel_busy_us"],
               kernel_launches=s["kernel_launches"],
               top=[[name, count, dur, where.get(name, "")] for name, count, dur in s["top"][:20]],
               by_source=sorted(([src, dur] for src, dur in by_source.items()),
                                key=lambda r: -r[1])[:20])
    print(f"  prefill trace: {out['span_us']:.0f} us span, {out['kernel_busy_us']:.0f} us some "
          f"kernel running, {out['kernel_launches']} kernel launches", flush=True)
    for src, dur in out["by_source"]:
        print(f"    {dur:9.1f} us  {src[:140]}", flush=True)
    return out


def long_context_decode(gen: Generator, slots: int, steps: int, repeats: int
                        ) -> tuple[list[float], float]:
    """Batch-1 decode with a KV cache of ``slots`` slots allocated, all but the last ``steps``
    already holding tokens (zeros: the time does not depend on their values), so every step
    attends over ~``slots`` positions. Returns (decode tokens/s of each timed run, compile
    seconds); the cache is donated to the jitted loop, as in generation."""
    filled = slots - steps

    @jax.jit
    def full_cache():
        cache = gen.init_cache(1, slots)
        return dataclasses.replace(cache, valid=cache.valid.at[:, :filled].set(True),
                                   lengths=jnp.full((1,), filled, jnp.int32),
                                   index=jnp.asarray(filled, jnp.int32))

    loop = jax.jit(decode_loop, static_argnums=0, donate_argnames="cache",
                   static_argnames=("sampling", "max_new_tokens"))
    first, key = jnp.full((1,), 3, jnp.int32), jax.random.key(0)
    eos, pad = jnp.asarray(eos_array(None)), jnp.asarray(0, jnp.int32)
    t0 = time.perf_counter()
    exe = loop.lower(gen.graphdef, gen.state, first, full_cache(), key, eos, pad,
                     sampling=gen.sampling, max_new_tokens=steps).compile()
    compile_s = time.perf_counter() - t0
    rates = []
    for _ in range(repeats + 1):  # the first run warms up
        cache = jax.block_until_ready(full_cache())
        t0 = time.perf_counter()
        jax.block_until_ready(exe(gen.state, first, cache, key, eos, pad)[0])
        rates.append((steps - 1) / (time.perf_counter() - t0))  # steps - 1 decode steps
    return rates[1:], compile_s


def _peak_mib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def _out_of_memory(err: jax.errors.JaxRuntimeError) -> str:
    """The first line of a device out-of-memory error (memory collected again); any other
    runtime error is raised on."""
    if "RESOURCE_EXHAUSTED" not in str(err):
        raise err
    gc.collect()
    return str(err).splitlines()[0][:300]


def _does_not_fit(args, report: dict, fmt: str, why: str) -> None:
    """Record and say that the ``fmt`` model does not fit the device."""
    report.setdefault("does_not_fit", {})[fmt] = why
    print(f"{fmt}: does not fit the device: {why}", flush=True)
    write_json(args.out, report)


def _offloaded(args, variant: str, batches: list[int], report: dict) -> None:
    """``format/implementation@policy``: the experts in pinned host memory from the start
    (``host_experts``: never all on the device), generation by ``OffloadGenerator`` with the
    fetch ``policy`` (a pre-gated model: block l+1's experts are fetched while block l runs)."""
    fmt, rest = variant.split("/")
    impl, policy = rest.split("@")
    config = _config(args, fmt).replace(moe=dict(pregate="pregated", implementation=impl))
    t0 = time.perf_counter()
    model = MoETransformer(config, rngs=nnx.Rngs(0), mlp_factory=host_experts(default_mlp))
    jax.block_until_ready(nnx.state(model))
    gen = OffloadGenerator(model, offload=OffloadConfig(policy=policy), eos_id=None, bucket=16)
    del model  # its experts now live in the generator's store
    build_s = time.perf_counter() - t0
    vocab = config.vocab_size
    for b in batches:
        prng = np.random.default_rng(b)
        prompts = [prng.integers(3, vocab, args.prompt_len).tolist() for _ in range(b)]
        runs = [gen.generate(prompts, max_new_tokens=args.new_tokens)
                for _ in range(args.repeats)]  # each compiles or warms up first, untimed
        rates = [r.decode_tokens_per_second for r in runs]
        report["results"].append(dict(
            kind="decode", format=fmt, implementation=f"{impl}@{policy}", batch=b,
            prompt_len=args.prompt_len, new_tokens=args.new_tokens,
            decode_tok_s=statistics.median(rates), decode_tok_s_runs=rates,
            step_ms=1e3 * b / statistics.median(rates), compile_s=runs[0].compile_seconds,
            cache=runs[-1].cache_stats, cache_mib=runs[-1].cache_nbytes / 2**20,
            host_syncs=runs[-1].host_syncs))
        print(f"{fmt:9s} {impl}@{policy} batch {b:3d}: decode {statistics.median(rates):10.1f} "
              f"tok/s, hit rate {runs[-1].cache_stats['hit_rate']:.2f}", flush=True)
        write_json(args.out, report)
    prng = np.random.default_rng(1000)
    prompts = [prng.integers(3, vocab, args.prefill_len).tolist()
               for _ in range(args.prefill_batch)]
    runs = [gen.generate(prompts, max_new_tokens=1) for _ in range(args.repeats)]
    rates = [r.prefill_tokens_per_second for r in runs]
    report["results"].append(dict(kind="prefill", format=fmt, implementation=f"{impl}@{policy}",
                                  batch=args.prefill_batch, prompt_len=args.prefill_len,
                                  prefill_tok_s=statistics.median(rates),
                                  prefill_tok_s_runs=rates))
    print(f"{fmt:9s} {impl}@{policy} prefill {args.prefill_batch}x{args.prefill_len}: "
          f"{statistics.median(rates):10.1f} tok/s", flush=True)
    report.setdefault("offload", {})[variant] = dict(
        build_s=build_s, store_mib=gen.store.nbytes / 2**20, peak_mib_after=_peak_mib())
    del gen
    gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", choices=sorted(MODELS), default="mixtral-8x7b",
                   help="the shapes (random weights)")
    p.add_argument("--layers", type=int, default=0,
                   help="decoder blocks; 0: the model's own depth (Mixtral-8x7B 32, "
                        "Qwen3-30B-A3B 48)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated format/implementation pairs (formats: dense, nm, "
                        "samoyeds, unstructured; implementations: pallas_kernels.expert_op); "
                        "format/implementation@policy: experts offloaded to pinned host memory, "
                        "OffloadGenerator with that fetch policy (e.g. dense/triton@pregated)")
    p.add_argument("--scan", action="store_true",
                   help="the resident variants with their middle blocks under lax.scan "
                        "(samoyeds_jax.scan.scan_blocks)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the logits check against the xla implementation (at full depth "
                        "it compiles a second program)")
    p.add_argument("--long-context", default="",
                   help="comma-separated KV cache sizes: batch-1 decode with that many slots "
                        "allocated and filled (e.g. 32768,131072), after the other runs")
    p.add_argument("--trace", action="store_true",
                   help="profile one more prefill and batch-1 generation of each variant: "
                        "kernel time by source line of the prefill; kernel-busy time and launch "
                        "gaps per decode step, the top kernels")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU smoke test)")
    args = p.parse_args()
    if args.tiny:
        args.batches, args.prompt_len, args.new_tokens = "1,2", 8, 4
        args.prefill_batch, args.prefill_len, args.repeats = 2, 16, 1
    batches = [int(b) for b in args.batches.split(",")]
    offloaded = [v for v in args.variants.split(",") if "@" in v]
    variants = [tuple(v.split("/")) for v in args.variants.split(",") if "@" not in v]
    formats = list(dict.fromkeys(f for f, _ in variants))
    results, checks = [], []
    rate = copy_rate(1 << 24 if args.tiny else 1 << 30)
    print(f"copy rate {rate / 1e9:.0f} GB/s", flush=True)
    report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
                  jax=jax.__version__, model="tiny" if args.tiny else f"{args.model}-shaped",
                  layers=_config(args, "dense").num_layers, args=vars(args),
                  copy_rate_bytes_per_s=rate,
                  timing="AOT-compiled; decode = one jitted while_loop per run, dispatch to "
                         "block_until_ready; median of repeats; compile excluded",
                  results=results, checks=checks)

    for fmt in formats:
        fits, why = _fits(args, fmt)
        if not fits:
            _does_not_fit(args, report, fmt, why)
            continue
        t0 = time.perf_counter()
        try:
            base = MoETransformer(_config(args, fmt), rngs=nnx.Rngs(0))
            jax.block_until_ready(nnx.state(base))
        except jax.errors.JaxRuntimeError as err:  # does not fit this device: say so, go on
            base = None
            _does_not_fit(args, report, fmt, _out_of_memory(err))
            continue
        build_s = time.perf_counter() - t0
        vocab = base.config.vocab_size
        probe = jnp.asarray(np.random.default_rng(7).integers(3, vocab, (2, 16)), jnp.int32)
        logits_by_impl, greedy_by_impl = {}, {}
        impls = [b for f, b in variants if f == fmt]
        checked = [] if args.no_check else ["xla"]
        for impl in checked + [b for b in impls if b not in checked]:
            try:
                model = _with_implementation(base, impl)
                logits, _ = jax.jit(lambda m, t: m(t))(model, probe)
                logits_by_impl[impl] = np.asarray(logits, np.float32)
            except Exception as err:  # cannot run this format: record, go on
                checks.append(dict(format=fmt, implementation=impl, error=repr(err)[:500]))
                print(f"{fmt}/{impl}: forward failed: {err!r}"[:300], flush=True)
                continue
            if impl not in impls:
                continue  # the XLA forward only as the reference of the check
            gen = Generator(scan_blocks(model) if args.scan else model,
                            sampling=SamplingConfig(), eos_id=None, bucket=16)
            # Prefill first: one compile, so a time limit cuts a decode batch rather than it.
            prng = np.random.default_rng(1000)
            prompts = [prng.integers(3, vocab, args.prefill_len).tolist()
                       for _ in range(args.prefill_batch)]
            runs = [gen.generate(prompts, max_new_tokens=1) for _ in range(args.repeats + 1)]
            rates = [r.prefill_tokens_per_second for r in runs[1:] or runs]
            results.append(dict(kind="prefill", format=fmt, implementation=impl,
                                batch=args.prefill_batch, prompt_len=args.prefill_len,
                                prefill_tok_s=statistics.median(rates), prefill_tok_s_runs=rates,
                                compile_s=runs[0].compile_seconds))
            if args.trace:
                results[-1]["trace"] = _trace_prefill(gen, prompts)
            write_json(args.out, report)
            print(f"{fmt:9s} {impl:6s} prefill {args.prefill_batch}x{args.prefill_len}: "
                  f"{statistics.median(rates):10.1f} tok/s", flush=True)
            for b in batches:
                # The same prompts for every format and implementation (greedy tokens are compared).
                prng = np.random.default_rng(b)
                prompts = [prng.integers(3, vocab, args.prompt_len).tolist() for _ in range(b)]
                runs = [gen.generate(prompts, max_new_tokens=args.new_tokens)
                        for _ in range(args.repeats + 1)]  # the first run also compiles
                timed = runs[1:] if len(runs) > 1 else runs
                rates = [r.decode_tokens_per_second for r in timed]
                if b == batches[0]:
                    greedy_by_impl[impl] = runs[-1].tokens
                step_s = b / statistics.median(rates)
                need = bytes_per_decode_step(model, b, args.prompt_len + args.new_tokens)
                results.append(dict(
                    kind="decode", format=fmt, implementation=impl, batch=b,
                    prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                    decode_tok_s=statistics.median(rates), decode_tok_s_runs=rates,
                    step_ms=1e3 * step_s, compile_s=runs[0].compile_seconds,
                    bytes_per_step=need, roofline_fraction=need / rate / step_s))
                if args.trace and b == 1:
                    results[-1]["trace"] = _trace(gen, prompts, args.new_tokens)
                write_json(args.out, report)
                print(f"{fmt:9s} {impl:6s} batch {b:3d}: decode {statistics.median(rates):10.1f} tok/s "
                      f"({1e3 * step_s:.2f} ms/step, {100 * need / rate / step_s:.0f}% of the "
                      f"bytes roofline), compile {runs[0].compile_seconds:.1f} s", flush=True)
            for slots in (int(n) for n in args.long_context.split(",") if n):
                steps = 17  # 16 decode steps after the first token
                try:
                    rates, compile_s = long_context_decode(gen, slots, steps, args.repeats)
                except jax.errors.JaxRuntimeError as err:  # out of memory: record it, go on
                    why = _out_of_memory(err)
                    results.append(dict(kind="decode_long_context", format=fmt,
                                        implementation=impl, batch=1, kv_slots=slots,
                                        does_not_fit=why, peak_mib_so_far=_peak_mib()))
                    write_json(args.out, report)
                    print(f"{fmt:9s} {impl:6s} batch 1 with {slots} KV slots: does not fit "
                          f"the device: {why}", flush=True)
                    continue
                step_s = 1 / statistics.median(rates)
                need = bytes_per_decode_step(model, 1, slots)
                peak = _peak_mib()
                results.append(dict(
                    kind="decode_long_context", format=fmt, implementation=impl, batch=1,
                    kv_slots=slots, decode_tok_s=statistics.median(rates), decode_tok_s_runs=rates,
                    step_ms=1e3 * step_s, compile_s=compile_s, bytes_per_step=need,
                    roofline_fraction=need / rate / step_s, peak_mib_so_far=peak))
                write_json(args.out, report)
                print(f"{fmt:9s} {impl:6s} batch 1 with {slots} KV slots: decode "
                      f"{statistics.median(rates):8.1f} tok/s ({1e3 * step_s:.2f} ms/step, "
                      f"{100 * need / rate / step_s:.0f}% of the bytes roofline)"
                      + ("" if peak is None else f", device peak so far {peak:.0f} MiB"),
                      flush=True)
            del gen, model
            gc.collect()
        if "xla" in logits_by_impl:
            ref = logits_by_impl["xla"]
            for impl, lg in logits_by_impl.items():
                if impl == "xla":
                    continue
                rel = float(np.linalg.norm(lg - ref) / max(np.linalg.norm(ref), 1e-30))
                same = (bool(np.array_equal(greedy_by_impl.get(impl), greedy_by_impl.get("xla")))
                        if impl in greedy_by_impl and "xla" in greedy_by_impl else None)
                checks.append(dict(format=fmt, implementation=impl, logits_rel_err_vs_xla=rel,
                                   greedy_tokens_equal_xla=same))
                print(f"{fmt:9s} {impl}: logits rel err vs xla {rel:.2e}, greedy equal {same}",
                      flush=True)
        report.setdefault("expert_mib", {})[fmt] = _expert_bytes(base) / 2**20
        report.setdefault("param_mib", {})[fmt] = _param_bytes(base) / 2**20
        report.setdefault("peak_mib_after", {})[fmt] = _peak_mib()
        report.setdefault("build_s", {})[fmt] = build_s
        del base
        gc.collect()

    for variant in offloaded:
        _offloaded(args, variant, batches, report)
        write_json(args.out, report)

    speedups = {}
    for r in results:
        if r["kind"] != "decode" or r["format"] == "dense":
            continue
        for base_impl in ("xla", "triton"):
            dense = [d for d in results if d["kind"] == "decode" and d["format"] == "dense"
                     and d["implementation"] == base_impl and d["batch"] == r["batch"]]
            if dense:
                speedups[f"{r['format']}/{r['implementation']} vs dense/{base_impl} batch {r['batch']}"] = (
                    r["decode_tok_s"] / dense[0]["decode_tok_s"])
    report["decode_speedup"] = speedups
    for k, v in speedups.items():
        print(f"speedup {k}: {v:.2f}x")
    write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

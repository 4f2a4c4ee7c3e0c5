"""Expert-parallel scaling: decode and prefill throughput of a Mixtral-8x7B-shaped model on 1..N GPUs.

Random bf16 weights of the model's real shapes (d=4096, f=14336, 8 experts top-2, 32 heads /
8 kv heads, vocab 32000; ``--layers`` of them), built directly on the devices: routed experts
split over the ``expert`` mesh axis, everything else replicated. Each measurement is one jitted
program: ``--steps`` greedy decode steps in a ``lax.fori_loop`` (batch ``b``), or one prefill of
``t`` tokens; medians over ``--repeats``. Compile time is excluded.

    PYTHONPATH=. python examples/bench_parallel.py --devices 1 2 --out benchmarks/parallel.json
    PYTHONPATH=. python examples/bench_parallel.py --devices 1 2 4 --dispatch all_gather all_to_all \
        --decode-batch 1 16 64 --out benchmarks/parallel_dispatch.json
    PYTHONPATH=. python examples/bench_parallel.py --tiny --devices 1 2   # CPU smoke run (fake devices)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--tiny" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax
import jax.numpy as jnp
from flax import nnx

from model_shapes import MIXTRAL_8X7B
from samoyeds_jax.atomic import write_json
from samoyeds_jax.model import KVCache, ModelConfig, MoETransformer
from samoyeds_jax.parallel import PLACEMENTS, ExpertParallel, make_expert_mesh, use_expert_parallel



def build(config: ModelConfig, ep: ExpertParallel, seed: int = 0):
    """The model with random weights created in place: experts split over the axis."""
    abstract = nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0)))
    use_expert_parallel(abstract, ep, place=False)  # weights are created sharded below
    for block in abstract.layers:  # no pre-gate recall bookkeeping inside the timed loops
        block.mlp.track_recall = False
    graphdef, state = nnx.split(abstract)
    expert_names = {"w1", "w3", "w2"}

    def sharding_for(path) -> jax.sharding.NamedSharding:
        names = {str(getattr(p, "key", p)) for p in path}
        if "mlp" in names and names & expert_names and "shared" not in names:
            return ep.expert_sharding()
        return jax.sharding.NamedSharding(ep.mesh, jax.sharding.PartitionSpec())

    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    key = jax.random.key(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        shape, dtype = leaf.shape, leaf.dtype
        scale = 1.0 / max(1.0, shape[-2] if len(shape) >= 2 else 1.0) ** 0.5
        make = jax.jit(lambda k, shape=shape, dtype=dtype, scale=scale:
                       (jax.random.normal(k, shape, jnp.float32) * scale).astype(dtype)
                       if jnp.issubdtype(dtype, jnp.floating) else jnp.zeros(shape, dtype),
                       out_shardings=sharding_for(path))
        out.append(make(jax.random.fold_in(key, i)))
    return graphdef, jax.tree_util.tree_unflatten(treedef, out)


def timed(fn, *args, repeats: int):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(config: ModelConfig, devices: int, dispatch: str, args) -> list[dict]:
    ep = ExpertParallel(mesh=make_expert_mesh(devices), **PLACEMENTS[dispatch])
    graphdef, state = build(config, ep)
    rows = []

    for b in args.decode_batch:
        @jax.jit
        def decode(state, tok, cache):
            model = nnx.merge(graphdef, state)

            def body(_, carry):
                tok, cache = carry
                logits, cache = model(tok, cache=cache, logits_for="last")
                return jnp.argmax(logits, -1).astype(jnp.int32)[:, None], cache

            return jax.lax.fori_loop(0, args.steps, body, (tok, cache))

        tok = jnp.ones((b, 1), jnp.int32)
        cache = KVCache.init(config, b, args.steps + 1)
        sec = timed(decode, state, tok, cache, repeats=args.repeats)
        rows.append({"devices": devices, "dispatch": dispatch, "phase": "decode", "batch": b,
                     "tokens": b * args.steps,
                     "seconds": sec, "tokens_per_s": b * args.steps / sec,
                     "ms_per_step": 1e3 * sec / args.steps})
        print(rows[-1], flush=True)

    for t in args.prefill_tokens:
        @jax.jit
        def prefill(state, tokens):
            model = nnx.merge(graphdef, state)
            logits, _ = model(tokens, logits_for="last")
            return logits

        tokens = jnp.ones((1, t), jnp.int32)
        sec = timed(prefill, state, tokens, repeats=args.repeats)
        rows.append({"devices": devices, "dispatch": dispatch, "phase": "prefill", "batch": 1,
                     "tokens": t,
                     "seconds": sec, "tokens_per_s": t / sec})
        print(rows[-1], flush=True)
    del state
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[2048])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dispatch", nargs="+", default=["replicated"], choices=sorted(PLACEMENTS),
                   help="token placement and dispatch of the routed experts: replicated "
                        "(all-reduce), all_gather (tokens sharded, all-gather + reduce-scatter), "
                        "all_to_all (tokens sharded, ragged all-to-all); each runs on every "
                        "device count, 1 included")
    p.add_argument("--pregate", default="standard", choices=("standard", "pregated"),
                   help="pregated: block i's pre-gate routes block i+1, so block i+1's dispatch "
                        "metadata (sort, chunk sizes, expert ids) depends on nothing of block "
                        "i+1 and can overlap its attention")
    p.add_argument("--format", default="dense", choices=("dense", "nm", "samoyeds"),
                   help="expert storage (random values in the format's arrays: for speed only)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    hf = dict(MIXTRAL_8X7B, num_hidden_layers=args.layers)
    if args.tiny:
        hf.update(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
        args.prefill_tokens = [min(t, 32) for t in args.prefill_tokens]
    config = ModelConfig.from_hf(hf, pregate=args.pregate, expert_format=args.format)
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"{args.layers} layers of d={config.d_model}, f={config.moe.d_ff}, "
          f"e={config.moe.num_experts}, k={config.moe.top_k}", flush=True)
    rows = []

    def save():
        if args.out:
            write_json(args.out, {"device_kind": jax.devices()[0].device_kind,
                                  "jax": jax.__version__, "layers": args.layers,
                                  "pregate": args.pregate, "format": args.format,
                                  "hf_config": hf, "rows": rows})

    for n in args.devices:
        if n > jax.device_count():
            print(f"skip {n} devices: only {jax.device_count()} present")
            continue
        for dispatch in args.dispatch:
            rows += run(config, n, dispatch, args)
            save()

    key = lambda r: (r["dispatch"], r["phase"], r["batch"], r["tokens"])  # noqa: E731
    base = {key(r): r["tokens_per_s"] for r in rows if r["devices"] == 1}
    print(f"\n{'dispatch':10} {'phase':8} {'batch':>5} {'tokens':>6} {'GPUs':>4} {'tok/s':>10} "
          f"{'vs 1 GPU':>8}")
    for r in rows:
        one = base.get(key(r))
        r["speedup_vs_1"] = r["tokens_per_s"] / one if one else None
        sp = f"{r['speedup_vs_1']:.2f}x" if one else "-"
        print(f"{r['dispatch']:10} {r['phase']:8} {r['batch']:>5} {r['tokens']:>6} "
              f"{r['devices']:>4} {r['tokens_per_s']:>10.1f} {sp:>8}")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

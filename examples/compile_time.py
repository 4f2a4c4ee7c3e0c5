"""Compile time of the generation executables against model depth, without building a model.

    python examples/compile_time.py --layers 2 8 32 --formats dense samoyeds \
        --out benchmarks/compile_time_cpu.json

For each expert format and depth, a Mixtral-8x7B-shaped model (d 4096, 8 experts of 14336,
32 heads / 8 KV heads) exists only as ``jax.ShapeDtypeStruct`` leaves
(``param_layout.abstract_model``: each parameter in its format's layout), so 32 blocks need no
memory. The decode step (``generate.decode_step``, batch ``--batch``, a cache of ``--slots``
slots) and the prefill (``generate.prefill``, 1 x ``--prefill`` tokens) are lowered
(``jax.jit(...).lower``: tracing and StableHLO) and compiled for the default device, each timed,
twice: with the blocks unrolled in the program (one copy per block, so the times grow with
depth) and with the middle blocks under ``lax.scan`` (``samoyeds_jax.scan.scan_blocks``: three
copies of the block body whatever the depth).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MIXTRAL_8X7B  # noqa: E402


def _time(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(fmt: str, layers: int, scan: bool, args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from samoyeds_jax.generate import SamplingConfig, decode_step, prefill
    from samoyeds_jax.model import ModelConfig
    from samoyeds_jax.param_layout import abstract_model
    from samoyeds_jax.scan import scan_blocks

    config = ModelConfig.from_hf(dict(MIXTRAL_8X7B, num_hidden_layers=layers), expert_format=fmt)
    model = abstract_model(config)
    if scan:
        model = scan_blocks(model)
    graphdef, state = nnx.split(model)
    spec = jax.ShapeDtypeStruct
    key = jax.eval_shape(lambda: jax.random.key(0))
    sampling = SamplingConfig()
    out = {"format": fmt, "layers": layers, "blocks": "scanned" if scan else "unrolled"}
    cache = jax.eval_shape(lambda: model.init_cache(args.batch, args.slots))
    step = jax.jit(decode_step, static_argnums=0, static_argnames="sampling")
    lowered, out["decode_lower_s"] = _time(lambda: step.lower(
        graphdef, state, spec((args.batch,), jnp.int32), cache, key, sampling=sampling))
    _, out["decode_compile_s"] = _time(lowered.compile)
    cache1 = jax.eval_shape(lambda: model.init_cache(1, args.prefill))
    fill = jax.jit(prefill, static_argnums=0, static_argnames="sampling")
    lowered, out["prefill_lower_s"] = _time(lambda: fill.lower(
        graphdef, state, spec((1, args.prefill), jnp.int32), spec((1, args.prefill), jnp.bool_),
        cache1, key, sampling=sampling))
    _, out["prefill_compile_s"] = _time(lowered.compile)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--formats", nargs="+", default=["dense", "samoyeds"])
    p.add_argument("--batch", type=int, default=1, help="decode rows")
    p.add_argument("--slots", type=int, default=4096, help="KV cache slots of the decode step")
    p.add_argument("--prefill", type=int, default=2048, help="prefill tokens")
    p.add_argument("--blocks", nargs="+", default=["unrolled", "scanned"],
                   choices=["unrolled", "scanned"],
                   help="the blocks one after the other in the program, or the middle ones "
                        "under lax.scan (samoyeds_jax.scan)")
    p.add_argument("--out", required=True, help="JSON file (rewritten after every row)")
    args = p.parse_args(argv)

    import jax

    from samoyeds_jax.atomic import write_json

    results = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
               "jax": jax.__version__, "model": "mixtral-8x7b-shaped", "batch": args.batch,
               "slots": args.slots, "prefill_tokens": args.prefill, "rows": []}
    for fmt in args.formats:
        for layers, blocks in ((n, b) for n in args.layers for b in args.blocks):
            if blocks == "scanned" and layers < 3:
                continue  # the first and the last block stay apart: nothing to scan
            row = measure(fmt, layers, blocks == "scanned", args)
            results["rows"].append(row)
            print(f"{fmt:>9} {layers:>3} blocks {blocks:>8}: decode lower "
                  f"{row['decode_lower_s']:.1f} s + "
                  f"compile {row['decode_compile_s']:.1f} s; prefill lower "
                  f"{row['prefill_lower_s']:.1f} s + compile {row['prefill_compile_s']:.1f} s",
                  flush=True)
            write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

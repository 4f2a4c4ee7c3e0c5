"""``samoyeds-generate``: jit-compiled generation with an MoE model.

Without ``--checkpoint`` it runs the reference model shipped with the library
(``samoyeds_jax/assets/shakespeare-moe``: a Mixtral-architecture MoE trained on Shakespeare's
plays, with its ``tokenizer.json``), so text in, text out works with nothing downloaded;
``--random-tiny`` builds a smaller random-weight model in-process instead (smoke runs).
With ``--checkpoint DIR`` (a Hugging Face model directory) the weights are imported
by ``samoyeds_jax.checkpoints`` (it may also be a directory written by ``--converted`` or
``checkpoints.save_converted``); a ``tokenizer.json`` there lets ``--prompt`` be text.
``--converted DIR`` keeps the model with its experts already in ``--format`` in DIR, so pruning
and conversion run once.

Reported speeds: executables are compiled ahead of time and compile time is printed separately;
prefill and decode wall times stop at ``block_until_ready``, so they are device time plus
dispatch, never compilation.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as backend_lib

DEFAULT_TINY_PROMPT = "1 17 42 99 7 256 3 64"
DEFAULT_TEXT_PROMPT = "The capital of France is"
DEFAULT_REFERENCE_PROMPT = "HAMLET.\nTo be, or not to be"
REFERENCE_MODEL = os.path.join(os.path.dirname(__file__), "assets", "shakespeare-moe")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samoyeds-generate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generate with an MoE model (jit-compiled prefill + decode). Without "
                    "--checkpoint, the reference model shipped with the library (trained on "
                    "Shakespeare) is used.")
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="Hugging Face model directory (config.json + *.safetensors); "
                        "default: the shipped reference model")
    p.add_argument("--random-tiny", action="store_true",
                   help="instead of a checkpoint, build a tiny random-weight model in-process "
                        "(token-id prompts; for smoke runs)")
    p.add_argument("--converted", metavar="DIR", default=None,
                   help="keep the converted model (experts in --format) in DIR: load it from "
                        "there when present, else import --checkpoint, convert, and save it there")
    p.add_argument("--format", dest="expert_format", default=None,
                   choices=("dense", "nm", "samoyeds", "unstructured"),
                   help="storage format of the expert weights (pruned by magnitude when sparse); "
                        "default: dense, or as stored for a converted model")
    p.add_argument("--backend", default="auto", choices=("auto", "xla", "pallas", "hopper"),
                   help="expert compute: XLA grouped matmul, the Pallas routed-token kernel, or "
                        "'hopper': 2:4 / Samoyeds experts moved to the Hopper layout and run "
                        "on the sparse tensor cores by the Mosaic GPU kernels (needs --format "
                        "nm or samoyeds). 'auto' (default): xla off a GPU; on a GPU pallas, "
                        "or hopper for bfloat16 2:4 / Samoyeds experts on a Hopper GPU (one "
                        "device, no --offload)")
    p.add_argument("--offload", action="store_true",
                   help="keep the routed experts in pinned host memory and cache them in device "
                        "slots, fetched per --offload-policy")
    p.add_argument("--offload-policy", default=None,
                   choices=("gpu_only", "on_demand", "prefetch_all", "pregated", "speculative"),
                   help="expert fetch policy (default: pregated for a pre-gated model, "
                        "speculative for a speculative one, else on_demand)")
    p.add_argument("--slots", type=int, default=None,
                   help="device expert slots shared by all layers (default: two blocks' worth)")
    p.add_argument("--pregate", default="standard", choices=("standard", "pregated", "speculative"),
                   help="pre-gating mode of the reference or random tiny model (block i picks "
                        "block i+1's experts; the reference model ships trained pre-gates); a "
                        "converted checkpoint keeps its own")
    p.add_argument("--devices", type=int, default=1,
                   help="split the routed experts over this many devices (expert parallelism)")
    p.add_argument("--prompt", default=None,
                   help="text when the checkpoint has tokenizer.json, else token ids "
                        "separated by spaces or commas (default: "
                        f"{DEFAULT_REFERENCE_PROMPT!r} for the reference model, "
                        f"{DEFAULT_TINY_PROMPT!r} for --random-tiny)")
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt generated together")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling and random weights")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute/parameter dtype (default: float32 for the reference and tiny "
                        "models, the checkpoint's torch_dtype otherwise)")
    p.add_argument("--eos-id", type=int, nargs="+", default=None,
                   help="stop token id(s) (default: the model config's eos_token_id)")
    p.add_argument("--no-eos", action="store_true", help="ignore EOS; always make max-new-tokens")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    return p


def _load_model(args) -> tuple[Any, str, Any]:
    """(model, description, tokenizer or None)."""
    from flax import nnx

    from samoyeds_jax.model import ModelConfig, MoETransformer

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
    if args.random_tiny:
        if args.checkpoint is not None or args.converted is not None:
            raise ValueError("--random-tiny builds its own model; drop --checkpoint/--converted")
        cfg = ModelConfig.tiny(expert_format=args.expert_format or "dense", backend=args.backend,
                               pregate=args.pregate,
                               dtype=dtype or jnp.float32, param_dtype=dtype or jnp.float32)
        model = MoETransformer(cfg, rngs=nnx.Rngs(args.seed))
        desc = "tiny Mixtral-like model, random weights built in-process (nothing downloaded)"
        return model, desc, None
    if args.checkpoint is None:
        if args.converted is not None:
            raise ValueError("--converted needs --checkpoint (the checkpoint to convert)")
        from samoyeds_jax import checkpoints

        model, _ = checkpoints.load_hf_checkpoint(
            REFERENCE_MODEL, dtype=args.dtype or "float32",
            expert_format=args.expert_format or "dense", backend=args.backend,
            pregate=args.pregate)
        desc = ("reference MoE trained on Shakespeare (shipped with the library; sparse formats "
                "pruned by magnitude at load: samoyeds-compress prunes with calibration and "
                "recovery)")
        return model, desc, checkpoints.load_tokenizer(REFERENCE_MODEL)

    path = args.checkpoint
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path!r}: expected a directory with config.json "
                                "and *.safetensors, found no such directory")
    from samoyeds_jax import checkpoints

    if args.converted is not None:
        model, _ = checkpoints.load_or_convert(path, args.converted,
                                               expert_format=args.expert_format,
                                               dtype=args.dtype, backend=args.backend)
    else:
        model = checkpoints.load_model(path, expert_format=args.expert_format,
                                       backend=args.backend, dtype=dtype)
    # A missing 'tokenizers' package is reported as a warning; prompts are then token ids.
    tokenizer = checkpoints.load_tokenizer(path)
    return model, f"{model.config.architecture} from {path}", tokenizer


def _prompt_ids(args, tokenizer, bos: int | None) -> list[int]:
    text = args.prompt
    if tokenizer is not None:
        default = DEFAULT_REFERENCE_PROMPT if args.checkpoint is None else DEFAULT_TEXT_PROMPT
        ids = tokenizer.encode(text if text is not None else default).ids
        if not ids:
            raise ValueError(f"--prompt {text!r} encodes to no tokens")
        return ids
    if text is None:
        text = DEFAULT_TINY_PROMPT if args.random_tiny else str(bos if bos is not None else 0)
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"--prompt {text!r}: without a tokenizer.json the prompt must be token ids separated "
            "by spaces or commas") from None
    if not ids:
        raise ValueError(f"--prompt {text!r} holds no token ids")
    return ids


def _offload_generator(args, model, sampling, eos):
    from samoyeds_jax.generate_offload import OffloadGenerator
    from samoyeds_jax.offload import OffloadConfig

    mode = model.config.moe.pregate
    policy = args.offload_policy or {"pregated": "pregated", "speculative": "speculative"}.get(
        mode, "on_demand")
    source = "pregate" if mode == "pregated" else "router"
    config = OffloadConfig(policy=policy, slots=args.slots, routing_source=source)
    return OffloadGenerator(model, offload=config, sampling=sampling, eos_id=eos, pad_id=0)


def _fmt_rate(tokens: float, seconds: float) -> str:
    rate = tokens / max(seconds, 1e-12)
    return f"{tokens:.0f} tokens in {seconds * 1e3:.2f} ms = {rate:,.1f} tokens/s"


def auto_hopper(*, on_hopper: bool, expert_format: str, dtype: Any, offload: bool,
                devices: int) -> bool:
    """``--backend auto``: put the experts in the Hopper layout (sparse tensor cores)? Yes on a
    Hopper GPU for bfloat16 2:4 / Samoyeds experts on one device without offloading (the
    fastest decode path measured, benchmarks/generate.md); else the Pallas kernels stay."""
    return (on_hopper and expert_format in ("nm", "samoyeds")
            and jnp.dtype(dtype) == jnp.bfloat16 and not offload and devices == 1)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, build or load the model, generate, print text/ids and speeds. Returns 0."""
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.max_new_tokens < 1:
        raise ValueError(f"--batch and --max-new-tokens must be >= 1, got {args.batch=}, "
                         f"{args.max_new_tokens=}")
    from samoyeds_jax.generate import Generator, SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    auto = args.backend == "auto"
    if auto:
        args.backend = "pallas" if backend_lib.platform() == "gpu" else "xla"
    hopper = args.backend == "hopper"
    if hopper:
        args.backend = "pallas"  # the model's backend; the layout changes below
        if args.dtype == "float32":
            raise ValueError("--backend hopper runs bfloat16 (tensor-core) kernels; drop "
                             "--dtype float32 or pass --dtype bfloat16")
        args.dtype = "bfloat16"
    model, desc, tokenizer = _load_model(args)
    hopper = hopper or (auto and auto_hopper(
        on_hopper=backend_lib.is_hopper(), expert_format=model.config.moe.expert_format,
        dtype=model.config.dtype, offload=args.offload, devices=args.devices))
    if hopper:
        if model.config.moe.expert_format not in ("nm", "samoyeds"):
            raise ValueError("--backend hopper needs 2:4 or Samoyeds experts (--format nm or "
                             f"samoyeds), got format {model.config.moe.expert_format!r}")
        if args.offload or args.devices > 1:
            raise ValueError("--backend hopper cannot be combined with --offload or --devices")
        for block in model.layers:
            block.mlp.use_hopper_layout()
        desc += "; experts in the Hopper decode layout (Mosaic GPU kernels)"
    cfg = model.config
    vocab = cfg.vocab_size
    ids = _prompt_ids(args, tokenizer, cfg.bos_token_id)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"--prompt token ids must be in [0, {vocab}), got {bad}")
    eos = None if args.no_eos else (args.eos_id if args.eos_id is not None else cfg.eos_token_id)

    a, m = cfg.attention, cfg.moe
    device = jax.devices()[0]
    print("samoyeds-generate")
    print(f"  model    {desc}")
    print(f"           {cfg.num_layers} layers, d={a.d_model}, {a.num_heads} heads / "
          f"{a.num_kv_heads} kv heads, {m.num_experts} experts top-{m.top_k}, f={m.d_ff}, "
          f"vocab {vocab}, "
          f"{jnp.dtype(cfg.dtype).name}")
    print(f"  experts  format={m.expert_format}, backend={m.backend}, pregate={m.pregate}")
    print(f"  device   {device.platform} ({device.device_kind})")
    print(f"  sampling {'greedy' if sampling.temperature == 0 else sampling}, seed {args.seed}, "
          f"eos {eos}")
    print(f"  prompt   {len(ids)} tokens x batch {args.batch}: {ids}")

    if args.devices > 1:
        if args.offload:
            raise ValueError("--devices > 1 (expert parallelism) and --offload cannot be combined")
        from samoyeds_jax.parallel import ExpertParallel, make_expert_mesh, use_expert_parallel

        use_expert_parallel(model, ExpertParallel(mesh=make_expert_mesh(args.devices),
                                                  tokens="replicated"))
        print(f"  parallel routed experts split over {args.devices} devices "
              f"({m.num_experts // args.devices} each)")
    if args.offload:
        gen = _offload_generator(args, model, sampling, eos)
        del model  # the experts now live in host memory; drop their device copies
        oc = gen.offload
        print(f"  offload  policy={oc.policy}, routing from {oc.routing_source}, "
              f"eviction={oc.eviction}, experts {gen.store.nbytes / 2**20:,.1f} MiB in pinned host "
              "memory")
    else:
        gen = Generator(model, sampling=sampling, eos_id=eos, pad_id=0)
    stream = None
    if args.stream:
        def stream(pos: int, tokens: np.ndarray) -> None:
            print(f"  token {pos}: {tokens.tolist()}", flush=True)
    res = gen.generate([ids] * args.batch, max_new_tokens=args.max_new_tokens,
                       key=jax.random.key(args.seed), stream=stream)

    for r in range(args.batch if args.batch <= 4 else 1):
        out = res.tokens[r, :res.lengths[r]].tolist()
        label = "output" if args.batch == 1 else f"output {r}"
        print(f"  {label:8} {out}")
        if tokenizer is not None:
            print(f"  {'text':8} {tokenizer.decode(ids + out)!r}")
    print(f"  prefill  {_fmt_rate(res.prompt_tokens, res.prefill_seconds)} "
          f"(batch {args.batch}, incl. sampling the first token)")
    print(f"  decode   {_fmt_rate(res.decode_steps * args.batch, res.decode_seconds)} "
          f"({res.decode_steps} steps x batch {args.batch}"
          f"{'; streamed: a host loop of jitted steps' if args.stream else ''})")
    if args.offload:
        print(f"  compile  {res.compile_seconds:.2f} s for a warm-up run of the same shapes "
              "(compile + 2 tokens), excluded from the rates above; each token waits for the "
              "device (sampled ids are read on the host); the expert cache starts empty")
    else:
        print(f"  compile  {res.compile_seconds:.2f} s, excluded from the rates above; timings "
              "stop at block_until_ready")
    stats = device.memory_stats() if device.platform == "gpu" else None
    if stats and "peak_bytes_in_use" in stats:
        peak = stats["peak_bytes_in_use"] / 2**20
        print(f"  memory   peak {peak:,.1f} MiB on {device.device_kind}")
    else:
        print(f"  memory   peak GPU memory: n/a on {device.platform}")
    if args.offload:
        st = res.cache_stats
        print(f"  cache    hit rate {st['hit_rate']:.1%} ({st['hits']} hits, {st['misses']} misses), "
              f"{st['bytes_fetched'] / 2**20:,.1f} MiB fetched, {gen.cache.slots} slots = "
              f"{res.cache_nbytes / 2**20:,.1f} MiB on the device; prefetch accuracy "
              f"{st['prefetch_accuracy']:.1%}")
    else:
        print("  cache    hit rate: n/a (every expert resident on the device; --offload to cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``samoyeds-generate``: jit-compiled generation with an MoE model.

Without ``--checkpoint`` it runs the reference model shipped with the library
(``samoyeds_jax/assets/shakespeare-moe``: a Mixtral-architecture MoE trained on Shakespeare's
plays, with its ``tokenizer.json``), so text in, text out works with nothing downloaded;
``--random-tiny`` builds a smaller random-weight model in-process instead (smoke runs).
With ``--checkpoint DIR`` (a Hugging Face model directory) the weights are imported
by ``samoyeds_jax.hf_import`` (it may also be a directory written by ``--converted`` or
``converted_io.save_converted``); a ``tokenizer.json`` there lets ``--prompt`` be text.
``--converted DIR`` keeps the model with its experts already in ``--format`` in DIR, so pruning
and conversion run once.

Everything cheap is checked before any weight is read: option values and combinations (an
option that would have no effect with the others given is refused), the files named, the
tokenizer and the prompt.

Reported speeds: executables are compiled ahead of time and compile time is printed separately;
prefill and decode wall times stop at ``block_until_ready``, so they are device time plus
dispatch, never compilation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import backend as backend_lib
from pallas_kernels.format_registry import format_names
from pallas_kernels.expert_op import implementation_names
from samoyeds_jax.cli import HelpFormatter, describe_experts, given_options, refuse_unless
from samoyeds_jax.parallel import PLACEMENTS

DEFAULT_TINY_PROMPT = "1 17 42 99 7 256 3 64"
DEFAULT_TEXT_PROMPT = "The capital of France is"
DEFAULT_REFERENCE_PROMPT = "HAMLET.\nTo be, or not to be"
REFERENCE_MODEL = os.path.join(os.path.dirname(__file__), "assets", "shakespeare-moe")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samoyeds-generate",
        formatter_class=HelpFormatter,
        description="Generate with an MoE model (jit-compiled prefill + decode). Without "
                    "--checkpoint, the reference model shipped with the library (trained on "
                    "Shakespeare) is used. Options that would have no effect in the combination "
                    "given are refused.")
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="Hugging Face model directory (config.json + *.safetensors) or a "
                        "converted model directory; default: the shipped reference model")
    p.add_argument("--random-tiny", action="store_true",
                   help="instead of a checkpoint, build a tiny random-weight model in-process "
                        "(token-id prompts; for smoke runs)")
    p.add_argument("--converted", metavar="DIR", default=None,
                   help="with --checkpoint: keep the converted model (experts in --format) in "
                        "DIR: load it from there when present, else import --checkpoint, "
                        "convert, and save it there")
    p.add_argument("--format", dest="expert_format", default=None,
                   choices=format_names(),
                   help="storage format of the expert weights (pruned by magnitude when sparse); "
                        "default: dense, or as stored for a converted model")
    p.add_argument("--implementation", default="auto", choices=("auto",) + implementation_names(),
                   help="expert implementation (pallas_kernels.expert_op): xla (grouped matmul; "
                        "sparse formats expanded), all_experts, triton (the routed-token Pallas "
                        "kernels; interpret mode without a GPU), mosaic_sparse_mma / "
                        "mosaic_expand (2:4 or Samoyeds experts moved to a Hopper layout, run by "
                        "the Mosaic GPU kernels; without a GPU their jnp reference runs). "
                        "'auto': the fastest that applies (xla without a GPU; on a Hopper GPU "
                        "mosaic_sparse_mma for bfloat16 2:4 / Samoyeds experts on one device "
                        "without --offload, else triton, else xla)")
    p.add_argument("--offload", action="store_true",
                   help="keep the routed experts in host memory (pinned on a GPU) and cache "
                        "them in device slots, fetched per --offload-policy")
    p.add_argument("--offload-policy", default=None,
                   choices=("gpu_only", "on_demand", "prefetch_all", "pregated", "speculative"),
                   help="with --offload: expert fetch policy (default: pregated for a pre-gated "
                        "model, speculative for a speculative one, else on_demand)")
    p.add_argument("--slots", type=int, default=None,
                   help="with --offload: device expert slots shared by all layers (default: "
                        "two blocks' worth)")
    p.add_argument("--pregate", default="standard", choices=("standard", "pregated", "speculative"),
                   help="pre-gating mode (block i picks block i+1's experts; the reference model "
                        "ships trained pre-gates): pregated computes with the pre-gates' choice; "
                        "speculative computes as standard and only tells --offload what to "
                        "prefetch. A converted model keeps the mode it is stored with")
    p.add_argument("--devices", type=int, default=1,
                   help="split the routed experts over this many devices (expert parallelism; "
                        "on a CPU, fake devices come from XLA_FLAGS="
                        "--xla_force_host_platform_device_count=N)")
    p.add_argument("--dispatch", default="replicated", choices=sorted(PLACEMENTS),
                   help="with --devices: how the tokens reach their experts: replicated (every "
                        "device routes every token, outputs all-reduced), all_gather (tokens "
                        "split, gathered, outputs reduce-scattered), all_to_all (tokens split, "
                        "each assignment's row to its expert's device and back)")
    p.add_argument("--prompt", default=None,
                   help="text when the model has a tokenizer.json, else token ids "
                        "separated by spaces or commas (default: "
                        f"{DEFAULT_REFERENCE_PROMPT!r} for the reference model, "
                        f"{DEFAULT_TINY_PROMPT!r} for --random-tiny, {DEFAULT_TEXT_PROMPT!r} "
                        "for a checkpoint with a tokenizer, else its BOS token)")
    p.add_argument("--batch", type=int, default=1, help="copies of the prompt generated together")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per row")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k likeliest tokens "
                   "(0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass (1 = off)")
    p.add_argument("--seed", type=int, default=0,
                   help="PRNG seed for sampling (--temperature > 0) and --random-tiny weights")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute/parameter dtype (default: float32 for the reference and tiny "
                        "models, the checkpoint's torch_dtype otherwise)")
    p.add_argument("--eos-id", type=int, nargs="+", default=None,
                   help="stop token id(s) (default: the model config's eos_token_id)")
    p.add_argument("--no-eos", action="store_true", help="ignore EOS; always make max-new-tokens")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    return p


@dataclasses.dataclass
class _Plan:
    """What the cheap checks found, before any weight is read."""

    expert_format: str           # the experts' format once loaded
    tokenizer: Any               # tokenizers.Tokenizer or None
    ids: list[int]               # the prompt's token ids
    offload: Any = None          # OffloadConfig with --offload


def _model_source(args, given: set[str]) -> tuple[Any, str, str, str | None, bool]:
    """(config, expert format, pre-gate mode, directory, read_shards) of the model ``args``
    name, from its config files only. ``directory``: where the tokenizer (and, when
    ``read_shards``, the safetensors shards to import) are; None for --random-tiny."""
    from samoyeds_jax import converted_io, hf_import
    from samoyeds_jax.model import ModelConfig

    fmt = args.expert_format or "dense"
    if args.random_tiny:
        return ModelConfig.tiny(pregate=args.pregate), fmt, args.pregate, None, False
    if args.checkpoint is None:
        hf = hf_import.read_hf_config(REFERENCE_MODEL)
        return (ModelConfig.from_hf(hf, pregate=args.pregate), fmt, args.pregate,
                REFERENCE_MODEL, False)
    path = args.checkpoint
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path!r}: expected a directory with config.json "
                                "and *.safetensors, found no such directory")
    stored = None  # a converted model: (directory, its config)
    if converted_io.is_converted(path):
        if args.converted is not None:
            raise ValueError(f"--converted {args.converted!r}: --checkpoint {path!r} is already "
                             "a converted model; drop --converted")
        stored = path, converted_io.config_from_dict(
            converted_io.read_converted_meta(path)["config"])
    elif args.converted is not None and converted_io.is_converted(args.converted):
        stored = args.converted, converted_io.config_from_dict(
            converted_io.read_converted_meta(args.converted)["config"])
    elif (args.converted is not None and os.path.exists(args.converted)
          and (not os.path.isdir(args.converted) or os.listdir(args.converted))):
        raise ValueError(f"--converted {args.converted!r} exists but holds no converted model "
                         f"({converted_io.CONVERTED_CONFIG}); expected a new or empty directory")
    if stored is not None:
        where, config = stored
        m = config.moe
        if args.expert_format is not None and args.expert_format != m.expert_format:
            raise ValueError(f"{where} stores {m.expert_format!r} experts; requested --format "
                             f"{args.expert_format!r} (convert the original checkpoint again "
                             "for another format)")
        dtype = jnp.dtype(config.param_dtype).name
        if args.dtype is not None and args.dtype != dtype:
            raise ValueError(f"{where} stores {dtype} weights; requested --dtype {args.dtype}")
        if "pregate" in given and args.pregate != m.pregate:
            raise ValueError(f"{where} stores a pregate={m.pregate!r} model; requested --pregate "
                             f"{args.pregate!r} (a converted model keeps its pre-gating mode)")
        return config, m.expert_format, m.pregate, path, False
    config = ModelConfig.from_hf(hf_import.read_hf_config(path), pregate=args.pregate)
    if args.converted is not None and args.pregate != "standard":
        raise ValueError(f"--pregate {args.pregate}: a model converted into --converted is "
                         "stored with pregate='standard'; drop --pregate or --converted")
    return config, fmt, args.pregate, path, True


def _check(args, given: set[str]) -> _Plan:
    """Every check that reads no weights: option values and combinations, the files named,
    the tokenizer and the prompt. Raises ValueError / FileNotFoundError."""
    for flag, value in (("--batch", args.batch), ("--max-new-tokens", args.max_new_tokens),
                        ("--devices", args.devices), ("--slots", args.slots)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.random_tiny and (args.checkpoint is not None or args.converted is not None):
        raise ValueError("--random-tiny builds its own model; drop --checkpoint/--converted")
    if args.converted is not None and args.checkpoint is None:
        raise ValueError("--converted needs --checkpoint (the checkpoint to convert)")
    refuse_unless(args.offload, given, {"offload_policy": "--offload-policy", "slots": "--slots"},
                  "it sets up --offload, which is not given")
    refuse_unless(not args.no_eos, given, {"eos_id": "--eos-id"}, "--no-eos ignores EOS")
    refuse_unless(args.devices > 1, given, {"dispatch": "--dispatch"},
                  "it places the tokens for --devices > 1, which is not given")
    greedy = args.temperature == 0
    refuse_unless(not greedy, given, {"top_k": "--top-k", "top_p": "--top-p"},
                  "--temperature 0 (the default) picks the likeliest token; give --temperature "
                  "> 0 to sample")
    refuse_unless(not greedy or args.random_tiny, given, {"seed": "--seed"},
                  "nothing is random: greedy decoding (--temperature 0) of a model that is not "
                  "--random-tiny")
    mosaic = args.implementation.startswith("mosaic")
    if mosaic and (args.offload or args.devices > 1):
        raise ValueError(f"--implementation {args.implementation} cannot be combined with "
                         "--offload or --devices")
    if args.devices > 1:
        if args.offload:
            raise ValueError("--devices > 1 (expert parallelism) and --offload cannot be combined")

    config, fmt, pregate, directory, read_shards = _model_source(args, given)
    if mosaic and fmt not in ("nm", "samoyeds"):
        raise ValueError(f"--implementation {args.implementation} needs 2:4 or Samoyeds experts "
                         f"(--format nm or samoyeds), got format {fmt!r}")
    e = config.moe.num_experts
    if e % args.devices:
        raise ValueError(f"--devices {args.devices}: the model's {e} routed experts must split "
                         f"evenly, so --devices must divide {e}")
    present = jax.devices()
    if args.devices > len(present):
        hint = (f"; on a CPU, fake devices come from the environment: XLA_FLAGS="
                f"--xla_force_host_platform_device_count={args.devices} samoyeds-generate "
                f"--devices {args.devices} ..."
                if backend_lib.platform() == "cpu" else "")
        raise ValueError(f"num_devices={args.devices} (--devices): expected at most "
                         f"{len(present)}, the {backend_lib.platform()} devices present{hint}")
    offload = None
    if args.offload:
        offload = _offload_config(args, pregate, given)
        if args.slots is not None:
            from samoyeds_jax.offload import resolve_slots

            try:
                resolve_slots(offload, num_layers=config.num_layers, num_experts=e,
                              top_k=config.moe.top_k, max_tokens=1)
            except ValueError as err:
                raise ValueError(f"--slots {args.slots}: {err}") from None
    else:
        refuse_unless(pregate != "speculative", given, {"pregate": "--pregate speculative"},
                      "a speculative model computes exactly as a standard one; its pre-gates "
                      "only tell --offload (policy speculative) which experts to prefetch")
    tokenizer = None
    if directory is not None:
        from samoyeds_jax import checkpoints, hf_import

        if read_shards:  # the shards exist and their headers read (no tensor data)
            with hf_import.ShardReader(directory):
                pass
        # A missing 'tokenizers' package is reported as a warning; prompts are then token ids.
        tokenizer = checkpoints.load_tokenizer(directory)
    ids = _prompt_ids(args, tokenizer, config.bos_token_id)
    bad = [i for i in ids if not 0 <= i < config.vocab_size]
    if bad:
        raise ValueError(f"--prompt token ids must be in [0, {config.vocab_size}), got {bad}")
    return _Plan(expert_format=fmt, tokenizer=tokenizer, ids=ids, offload=offload)


def _load_model(args, plan: _Plan) -> tuple[Any, str]:
    """(model, description): the weights read, imported or converted."""
    from flax import nnx

    from samoyeds_jax.expert_store import host_experts
    from samoyeds_jax.model import ModelConfig, MoETransformer, default_mlp

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, None: None}[args.dtype]
    # With --offload the routed experts go to host memory block by block as they are read, so
    # a model whose experts do not fit the device loads.
    memory = "pinned_host" if args.offload else "device"
    if args.random_tiny:
        cfg = ModelConfig.tiny(expert_format=plan.expert_format,
                               pregate=args.pregate,
                               dtype=dtype or jnp.float32, param_dtype=dtype or jnp.float32)
        model = MoETransformer(cfg, rngs=nnx.Rngs(args.seed),
                               mlp_factory=host_experts(default_mlp) if args.offload
                               else default_mlp)
        desc = "tiny Mixtral-like model, random weights built in-process (nothing downloaded)"
        return model, desc
    from samoyeds_jax import checkpoints, converted_io, hf_import

    if args.checkpoint is None:
        model, _ = hf_import.load_hf_checkpoint(
            REFERENCE_MODEL, dtype=args.dtype or "float32", expert_format=plan.expert_format,
            pregate=args.pregate, experts_memory=memory)
        desc = ("reference MoE trained on Shakespeare (shipped with the library; sparse formats "
                "pruned by magnitude at load: samoyeds-compress prunes with calibration and "
                "recovery)")
        return model, desc
    path = args.checkpoint
    if args.converted is not None:
        model, _ = checkpoints.load_or_convert(path, args.converted,
                                               expert_format=args.expert_format,
                                               dtype=args.dtype, experts_memory=memory)
    elif converted_io.is_converted(path):
        model = checkpoints.load_model(path, expert_format=args.expert_format,
                                       dtype=dtype, experts_memory=memory)
    else:
        model, _ = hf_import.load_hf_checkpoint(path, dtype=dtype,
                                                expert_format=args.expert_format,
                                                pregate=args.pregate, experts_memory=memory)
    return model, f"{model.config.architecture} from {path}"


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


def _offload_config(args, mode: str, given: set[str]):
    """The ``OffloadConfig`` of --offload for a model of pre-gating ``mode``."""
    from samoyeds_jax.offload import OffloadConfig

    policy = args.offload_policy or {"pregated": "pregated", "speculative": "speculative"}.get(
        mode, "on_demand")
    if policy in ("pregated", "speculative") and mode != policy:
        raise ValueError(f"--offload-policy {policy} needs a pregate={policy!r} model, got "
                         f"pregate={mode!r} (--pregate {policy} for the reference or "
                         "--random-tiny model or a Hugging Face checkpoint)")
    if "pregate" in given and mode == "speculative" and policy != "speculative":
        raise ValueError(f"--pregate speculative has no effect here: --offload-policy {policy} "
                         "never reads the pre-gates' predictions (only policy speculative does)")
    source = "pregate" if mode == "pregated" else "router"
    return OffloadConfig(policy=policy, slots=args.slots, routing_source=source)


def _fmt_rate(tokens: float, seconds: float) -> str:
    rate = tokens / max(seconds, 1e-12)
    return f"{tokens:.0f} tokens in {seconds * 1e3:.2f} ms = {rate:,.1f} tokens/s"


def implementation_for(args) -> Any:
    """``MoEConfig.implementation`` of ``--implementation``: a name, or for ``auto`` None (the
    fastest that applies), without the Hopper layouts when experts are offloaded or split over
    devices (those engines take stacks in a stored format)."""
    if args.implementation != "auto":
        return args.implementation
    return None if not args.offload and args.devices == 1 else ("triton", "xla")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, check everything cheap, build or load the model, generate, print
    text/ids and speeds. Returns 0; bad options or inputs raise ValueError / FileNotFoundError
    before any weight is read."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_options(parser, args, argv)
    from samoyeds_jax.generate import Generator, SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.implementation == "mosaic_sparse_mma":
        if args.dtype == "float32":
            raise ValueError("--implementation mosaic_sparse_mma runs bfloat16 (tensor-core) "
                             "kernels; drop --dtype float32 or pass --dtype bfloat16")
        args.dtype = "bfloat16"
    plan = _check(args, given)
    model, desc = _load_model(args, plan)
    tokenizer, ids = plan.tokenizer, plan.ids
    model.prepare(implementation_for(args))
    cfg = model.config
    vocab = cfg.vocab_size
    eos = None if args.no_eos else (args.eos_id if args.eos_id is not None else cfg.eos_token_id)

    a, m = cfg.attention, cfg.moe
    device = jax.devices()[0]
    print("samoyeds-generate")
    print(f"  model    {desc}")
    print(f"           {cfg.num_layers} layers, d={a.d_model}, {a.num_heads} heads / "
          f"{a.num_kv_heads} kv heads, {m.num_experts} experts top-{m.top_k}, f={m.d_ff}, "
          f"vocab {vocab}, "
          f"{jnp.dtype(cfg.dtype).name}")
    print(f"  experts  {describe_experts(model)}")
    print(f"  device   {device.platform} ({device.device_kind})")
    print(f"  sampling {'greedy' if sampling.temperature == 0 else sampling}, seed {args.seed}, "
          f"eos {eos}")
    print(f"  prompt   {len(ids)} tokens x batch {args.batch}: {ids}")

    if args.devices > 1:
        from samoyeds_jax.parallel import ExpertParallel, make_expert_mesh, use_expert_parallel

        use_expert_parallel(model, ExpertParallel(mesh=make_expert_mesh(args.devices),
                                                  **PLACEMENTS[args.dispatch]))
        print(f"  parallel routed experts split over {args.devices} devices "
              f"({m.num_experts // args.devices} each), tokens {args.dispatch}")
    if args.offload:
        from samoyeds_jax.generate_offload import OffloadGenerator

        gen = OffloadGenerator(model, offload=plan.offload, sampling=sampling, eos_id=eos,
                               pad_id=0)
        del model  # the generator holds what it needs; the experts are in its store
        oc = gen.offload
        where = ("pinned host memory" if device.platform == "gpu" else
                 f"host memory (memory kind 'pinned_host'; on {device.platform} an ordinary "
                 "buffer, nothing page-locked)")
        print(f"  offload  policy={oc.policy}, routing from {oc.routing_source}, "
              f"eviction={oc.eviction}, experts {gen.store.nbytes / 2**20:,.1f} MiB in {where}")
    else:
        gen = Generator(model, sampling=sampling, eos_id=eos, pad_id=0)
    def print_tokens(pos: int, tokens: np.ndarray) -> None:
        print(f"  token {pos}: {tokens.tolist()}", flush=True)

    res = gen.generate([ids] * args.batch, max_new_tokens=args.max_new_tokens,
                       key=jax.random.key(args.seed),
                       stream=print_tokens if args.stream else None)

    for r in range(args.batch):
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


if __name__ == "__main__":  # python -m: the console entry (one error line, exit 2)
    from samoyeds_jax.cli import generate_main

    sys.exit(generate_main())

"""The peer of ``bench_generate.py``: Hugging Face ``transformers`` (PyTorch) on the same shapes.

Builds ``MixtralForCausalLM`` or ``Qwen3MoeForCausalLM`` from a config of the shapes
``bench_generate.py`` uses (random weights, bf16, on the GPU; ``--layers`` blocks), and times
``model.generate`` (greedy, EOS off, every row runs ``--new-tokens`` tokens) with a static KV
cache (``cache_implementation="static"``; transformers compiles the decoding forward with
``torch.compile`` for a static cache unless ``--no-compile``):

* decode tokens/s at each batch: ``b`` over the median seconds per decode step of a generate of
  ``1 + n`` new tokens, each step timed by a streamer as its token reaches the host (the prefill
  and the first token excluded; one generate length per batch, so one compiled decode step);
* prefill tokens/s: ``--prefill-batch`` x ``--prefill-len`` prompt tokens over the median time
  to the first new token of those prompts;
* peak GPU memory (``torch.cuda.max_memory_allocated``).

Every shape is run twice before timing (compilation and autotuning excluded). Needs torch with
CUDA and transformers (the GPU machine has them; this project does not depend on them).

    python3 examples/bench_hf_peer.py --model mixtral-8x7b --out benchmarks/hf_peer_mixtral.json
    python3 examples/bench_hf_peer.py --device cpu --layers 1 --batches 1 --new-tokens 2 \
        --prefill-len 16 --repeats 1 --no-compile --out /tmp/peer.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS  # noqa: E402  (bench_generate's shapes)

ARCH = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}


def build(args):
    import torch
    import transformers

    hf = dict(MODELS[args.model])
    hf["num_hidden_layers"] = args.layers or hf["num_hidden_layers"]
    config_cls, model_cls = (getattr(transformers, n) for n in ARCH[hf.pop("model_type")])
    hf.pop("torch_dtype", None)
    config = config_cls(**hf)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an f32 build would not fit
    with torch.device(args.device):
        model = model_cls(config).eval()
    if args.experts:
        if not hasattr(model, "set_experts_implementation"):
            raise SystemExit(f"--experts {args.experts!r}: transformers {transformers.__version__} "
                             "has no experts backends (set_experts_implementation)")
        model.set_experts_implementation(args.experts)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model, config


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class _Stamps:
    """A ``generate`` streamer that records when each token reaches the host: ``generate`` hands
    it the prompt, then every new token, each copied to the host (so the step has finished)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def timed_generate(model, ids, new_tokens, repeats, compile_):
    """Median seconds of ``generate`` up to the first new token (prefill), and median seconds per
    decode step after it (from the streamer's time stamps), over ``repeats`` runs after two
    warm-up runs. One generate length per batch: the static cache, hence the compiled decode
    step, has one shape."""
    import torch

    device = ids.device.type
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              cache_implementation="static", disable_compile=not compile_)
    first, step = [], []
    with torch.inference_mode():
        for i in range(repeats + 2):  # two warm-up runs: compilation, autotuning
            stamps = _Stamps()
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(ids, streamer=stamps, **kw)
            _sync(device)
            if i >= 2:
                new = stamps.times[1:]  # the first put is the prompt
                first.append(new[0] - t0)
                if len(new) > 1:
                    step.append((new[-1] - new[0]) / (len(new) - 1))
    if out.shape[1] != ids.shape[1] + new_tokens or len(stamps.times) != 1 + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens and "
                           f"streamed {len(stamps.times) - 1}; {new_tokens} were asked for")
    return statistics.median(first), (statistics.median(step) if step else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", choices=sorted(MODELS), default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=0, help="0: the model's own depth")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="eager PyTorch (no torch.compile)")
    p.add_argument("--experts", default="",
                   help="transformers experts backend (eager, grouped_mm, batched_mm); default: "
                        "transformers' own choice, recorded in the JSON")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: a smoke test of this script (use --layers 1 and small sizes)")
    args = p.parse_args()

    import torch
    import transformers

    t0 = time.perf_counter()
    model, config = build(args)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    results = []
    cuda = args.device == "cuda"
    report = dict(peer="transformers",
                  device=torch.cuda.get_device_name() if cuda else "cpu",
                  torch=torch.__version__, transformers=transformers.__version__,
                  model=f"{args.model}-shaped", layers=config.num_hidden_layers, args=vars(args),
                  how=(f"model_cls(config) built in bfloat16 on {args.device}, random weights; model.generate "
                       "greedy, cache_implementation='static', "
                       + ("disable_compile=True (eager)" if args.no_compile else
                          "transformers' automatic torch.compile of the static-cache forward")),
                  experts=getattr(model.config, "_experts_implementation", None),
                  build_s=build_s, results=results)

    def write():
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    for b in (int(x) for x in args.batches.split(",")):
        ids = torch.randint(3, vocab, (b, args.prompt_len), generator=gen).to(args.device)
        _, step_s = timed_generate(model, ids, 1 + args.new_tokens, args.repeats,
                                   not args.no_compile)
        rate = b / step_s
        results.append(dict(kind="decode", batch=b, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, decode_tok_s=rate, step_ms=1e3 * step_s))
        print(f"transformers batch {b:3d}: decode {rate:10.1f} tok/s "
              f"({results[-1]['step_ms']:.2f} ms/step)", flush=True)
        write()
    ids = torch.randint(3, vocab, (args.prefill_batch, args.prefill_len), generator=gen).to(args.device)
    t1, _ = timed_generate(model, ids, 1, args.repeats, not args.no_compile)
    rate = args.prefill_batch * args.prefill_len / t1
    results.append(dict(kind="prefill", batch=args.prefill_batch, prompt_len=args.prefill_len,
                        prefill_tok_s=rate))
    print(f"transformers prefill {args.prefill_batch}x{args.prefill_len}: {rate:10.1f} tok/s",
          flush=True)
    report["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

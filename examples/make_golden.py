"""Build tiny random Hugging Face MoE checkpoints and record their logits and greedy generations.

The fixtures under ``tests/fixtures/<family>/`` pin the checkpoint import of
``samoyeds_jax.hf_import`` to the reference implementation in ``transformers``:

- ``config.json`` + ``*.safetensors`` (+ ``model.safetensors.index.json`` for the sharded one):
  ``save_pretrained`` of a tiny random model (2 layers, d=64, 4 experts top-2, v=128, float32);
- ``golden.npz``: ``logits_<i>`` ``[t_i, v]`` float32 of a plain forward of each prompt;
- ``golden.json``: the prompts, the greedy continuations (``generate`` without sampling, EOS
  off), the smallest top-1/top-2 logit gap along each greedy path (how far greedy decoding is
  from a tie), and the versions used.

Every parameter is redrawn (norm scales around 1, biases non-zero) so that each one matters to
the logits. The Mixtral fixture also gets a tiny word-level ``tokenizer.json``; the Qwen2-MoE one
is saved in several shards with an index.

Needs ``torch`` (CPU) and ``transformers``, which the test environment does not have; run it
from a separate environment::

    python examples/make_golden.py --out tests/fixtures
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers

PROMPTS = [[1, 17, 42, 99, 7, 64, 3, 120, 5, 33], [1, 100, 23]]
MAX_NEW_TOKENS = 8
SEED = 0
WEIGHT_STD = 0.08

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# family -> (config class, model class, family-specific config fields, save_pretrained kwargs)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=64, num_local_experts=4, rms_norm_eps=1e-5,
                     # A window shorter than the prompts, so the sliding-window mask matters.
                     rope_theta=1e6, sliding_window=6), {}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=4,
                       norm_topk_prob=False, qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1e4,
                       use_sliding_window=False), dict(max_shard_size="300KB")),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  # head_dim differs from hidden_size // num_attention_heads on purpose.
                  dict(moe_intermediate_size=64, num_experts=4, head_dim=32, norm_topk_prob=True,
                       rms_norm_eps=1e-6, rope_theta=1e6, attention_bias=False), {}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=64, num_experts=4, norm_topk_prob=False, clip_qkv=None,
                   rms_norm_eps=1e-5, rope_theta=1e4), {}),
}


def build(family: str) -> torch.nn.Module:
    """A tiny random float32 model of ``family`` with every parameter redrawn."""
    config_cls, model_cls, fields, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON, **fields)
    torch.manual_seed(SEED)
    model = getattr(transformers, model_cls)._from_config(config, attn_implementation="eager")
    model = model.to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn_like(p) * WEIGHT_STD
            # Norm scales near one; everything else (biases too) random around zero.
            p.copy_(1.0 + noise if "norm" in name else noise)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def greedy_by_hand(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], float]:
    """Greedy continuation by repeated full forwards, and the smallest top-1/top-2 gap."""
    ids = list(prompt)
    gap = float("inf")
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            gap = min(gap, float(top2[0] - top2[1]))
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):], gap


def tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer: ids 0-2 are <pad> <s> </s>, then the words w3 ... w{v-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def make(family: str, out_dir: str) -> dict:
    model = build(family)
    path = os.path.join(out_dir, family)
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # no stale shards from an earlier layout
        if name.endswith((".safetensors", ".json", ".npz")):
            os.remove(os.path.join(path, name))
    model.save_pretrained(path, safe_serialization=True, **FAMILIES[family][3])
    if family == "mixtral":
        tiny_tokenizer(model.config.vocab_size).save(os.path.join(path, "tokenizer.json"))

    logits, generations, gaps = {}, [], []
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            logits[f"logits_{i}"] = model(torch.tensor([prompt])).logits[0].float().numpy()
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, attention_mask=torch.ones(1, len(prompt),
                                                                            dtype=torch.long))
            tokens = out[0, len(prompt):].tolist()
            by_hand, gap = greedy_by_hand(model, prompt)
            if tokens != by_hand:
                raise RuntimeError(f"{family}: generate() {tokens} != greedy by hand {by_hand}")
            generations.append(tokens)
            gaps.append(gap)
    np.savez(os.path.join(path, "golden.npz"), **logits)
    golden = dict(family=family, prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS,
                  greedy=generations, min_top2_gap=gaps, seed=SEED, weight_std=WEIGHT_STD,
                  transformers=transformers.__version__, torch=torch.__version__)
    with open(os.path.join(path, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    print(f"{family:10} {size / 1e3:7.1f} kB  greedy {generations}  min top-2 gap "
          f"{min(gaps):.3g}")
    return golden


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tests/fixtures", help="fixtures directory")
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for family in args.families:
        make(family, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

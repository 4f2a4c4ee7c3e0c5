"""How well can any pre-gate predict the next block's experts? A capacity study.

Block i's pre-gate sees only block i's MoE input x_i; block i+1's gate sees x_{i+1}, which adds
block i's experts and block i+1's attention over the context. This script collects both from a
model's forward over training and validation text and fits, per block pair, predictors of the
next gate's top-k set from x_i of growing capacity, reporting exact top-k set match and pair
recall on held-out validation tokens (and on the training tokens, to show overfitting):

* ``shipped``: the model's own pre-gate (linear, trained jointly with the model);
* ``own_gate`` / ``next_gate``: block i's gate, and block i+1's gate applied to x_i (free);
* ``linear``: a linear pre-gate refit offline to convergence (top-k cross-entropy, AdamW);
* ``mlp<h>``: a one-hidden-layer GELU MLP of width h, same loss (weight decay 0.01).

It also reports what a prefetcher fetching more than k experts would cover: the share of the
next gate's top-k experts inside the shipped pre-gate's top-(k+1) and top-(k+2).

    python examples/pregate_capacity.py --model samoyeds_jax/assets/shakespeare-moe \
        --corpus data/shakespeare --out benchmarks/pregate_capacity_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory with pre-gates")
    p.add_argument("--corpus", required=True, help="corpus directory (samoyeds_jax.corpus)")
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--train-windows", type=int, default=512, help="windows of 256 tokens")
    p.add_argument("--val-windows", type=int, default=128)
    p.add_argument("--linear-steps", type=int, default=3000)
    p.add_argument("--mlp-steps", type=int, default=4000)
    p.add_argument("--widths", default="1024,4096", help="MLP hidden widths")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from samoyeds_jax import bpe_tokenizer, corpus, train_data
    from samoyeds_jax.atomic import write_json
    from samoyeds_jax.checkpoints import load_tokenizer
    from samoyeds_jax.hf_import import load_hf_checkpoint
    from samoyeds_jax.pregate import collect_moe_inputs, moe_blocks

    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model} has no tokenizer.json")
    train_texts, val_texts = corpus.split_texts(corpus.read_texts(args.corpus))
    model, _ = load_hf_checkpoint(args.model, dtype="float32", pregate="speculative")
    moes = moe_blocks(model)
    e, k = moes[0].config.num_experts, moes[0].config.top_k

    def inputs(texts, n, seed):
        ids = bpe_tokenizer.encode_documents(tokenizer, texts.values())
        windows = train_data.sample_windows(ids, batch=n, length=256, seed=seed, step=0)
        return collect_moe_inputs(model, lambda m, b: m(b),
                                  [windows[i:i + 16] for i in range(0, n, 16)])

    t0 = time.perf_counter()
    x_train = inputs(train_texts, args.train_windows, 5)
    x_val = inputs(val_texts, args.val_windows, 6)
    print(f"collected {x_train[0].shape[0]} training and {x_val[0].shape[0]} validation tokens "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    def top(logits, width):
        return np.sort(np.asarray(jax.lax.top_k(logits, width)[1]), axis=-1)

    def scores(pred, target):
        p, t = top(pred, k), top(target, k)
        hits = (p[:, :, None] == t[:, None, :]).any(-1).sum(-1)
        return {"exact_match": float(np.mean(hits == k)), "pair_recall": float(np.mean(hits) / k)}

    def coverage(pred, target, width):
        p, t = top(pred, width), top(target, k)
        return float(np.mean((t[:, :, None] == p[:, None, :]).any(-1)))

    def fit(params, apply, x, target, steps, lr, weight_decay):
        opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay)

        def loss(p, xb, tb):
            goal = jnp.sum(jax.nn.one_hot(jax.lax.top_k(tb, k)[1], e), -2) / k
            return -jnp.mean(jnp.sum(goal * jax.nn.log_softmax(apply(p, xb)), -1))

        @jax.jit
        def run(p, key):
            def step(carry, kk):
                p, s = carry
                rows = jax.random.randint(kk, (512,), 0, x.shape[0])
                g = jax.grad(loss)(p, x[rows], target[rows])
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), None
            return jax.lax.scan(step, (p, opt.init(p)), jax.random.split(key, steps))[0][0]
        return run(params, jax.random.key(0))

    linear = lambda p, x: x @ p["w"]  # noqa: E731
    mlp = lambda p, x: jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]  # noqa: E731
    results = {"model": args.model, "argv": sys.argv[1:] if argv is None else argv,
               "train_tokens": int(x_train[0].shape[0]), "val_tokens": int(x_val[0].shape[0]),
               "top_k": k, "num_experts": e, "blocks": []}
    for i, (m, nxt) in enumerate(zip(moes[:-1], moes[1:])):
        xt, xv = jnp.asarray(x_train[i]), jnp.asarray(x_val[i])
        tt = nxt.gate.logits(jnp.asarray(x_train[i + 1]))
        tv = nxt.gate.logits(jnp.asarray(x_val[i + 1]))
        shipped = m.pregate.logits(xv)
        row = {"block": i, "shipped": scores(shipped, tv),
               "own_gate": scores(m.gate.logits(xv), tv),
               "next_gate": scores(nxt.gate.logits(xv), tv),
               "shipped_coverage": {f"top{w}": coverage(shipped, tv, w)
                                    for w in range(k, min(k + 3, e + 1))}}
        w = fit({"w": jnp.asarray(m.pregate.kernel[...], jnp.float32)}, linear, xt, tt,
                args.linear_steps, 3e-3, 0.0)
        row["linear"] = scores(linear(w, xv), tv)
        row["linear_train"] = scores(linear(w, xt[:len(xv)]), tt[:len(xv)])
        d = xt.shape[1]
        for h in (int(s) for s in args.widths.split(",")):
            k1, k2 = jax.random.split(jax.random.key(i))
            p0 = {"w1": jax.random.normal(k1, (d, h)) / np.sqrt(d), "b1": jnp.zeros(h),
                  "w2": jax.random.normal(k2, (h, e)) * 0.01, "b2": jnp.zeros(e)}
            p = fit(p0, mlp, xt, tt, args.mlp_steps, 1e-3, 0.01)
            row[f"mlp{h}"] = scores(mlp(p, xv), tv)
            row[f"mlp{h}_train"] = scores(mlp(p, xt[:len(xv)]), tt[:len(xv)])
        results["blocks"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling, jit-compiled generation (no per-token retrace), EOS, streaming, and the CLI."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from samoyeds_jax.generate import Generator, SamplingConfig, decode_step, pad_prompts, sample
from samoyeds_jax.generate_cli import main
from samoyeds_jax.model import KVCache, ModelConfig, MoETransformer

PROMPTS = [[5, 9, 13], [7, 1, 3, 200, 11]]
NEW = 6


@pytest.fixture(scope="module")
def model() -> MoETransformer:
    return MoETransformer(ModelConfig.tiny(), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def greedy(model) -> Generator:
    """One greedy generator for the module, so its executables compile once."""
    return Generator(model, sampling=SamplingConfig(), eos_id=None)


# ----------------------------------------------------------------------------- sampling


def test_greedy_and_top_k_1_pick_the_argmax(rng):
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    want = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), SamplingConfig()), want)
    topk1 = SamplingConfig(temperature=1.5, top_k=1)
    for seed in range(3):
        np.testing.assert_array_equal(sample(logits, jax.random.key(seed), topk1), want)


def test_top_k_restricts_support(rng):
    logits = jnp.asarray(rng.standard_normal((1, 20)), jnp.float32)
    allowed = set(np.argsort(-np.asarray(logits[0]))[:3].tolist())
    keys = jax.random.split(jax.random.key(1), 200)
    draws = jax.vmap(lambda k: sample(logits, k, SamplingConfig(temperature=1.0, top_k=3)))(keys)
    assert set(np.asarray(draws).ravel().tolist()) <= allowed


def test_top_p_hand_case():
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (mass before token 2 is 0.8 >= 0.7),
    # renormalized to 0.625 / 0.375.
    logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]], jnp.float32))
    keys = jax.random.split(jax.random.key(2), 4000)
    draws = np.asarray(jax.vmap(
        lambda k: sample(logits, k, SamplingConfig(temperature=1.0, top_p=0.7)))(keys)).ravel()
    assert set(draws.tolist()) == {1, 3}
    np.testing.assert_allclose(np.mean(draws == 1), 0.625, atol=0.03)
    # A top_p below the largest probability keeps only the top token.
    tiny_p = jax.vmap(lambda k: sample(logits, k, SamplingConfig(temperature=1.0, top_p=0.1)))(keys[:50])
    assert set(np.asarray(tiny_p).ravel().tolist()) == {1}


def test_sampling_is_reproducible_from_the_key(rng):
    logits = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    cfg = SamplingConfig(temperature=0.8, top_k=10, top_p=0.9)
    a = sample(logits, jax.random.key(7), cfg)
    b = sample(logits, jax.random.key(7), cfg)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p")])
def test_sampling_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_pad_prompts_left_pads_to_bucket():
    tokens, mask = pad_prompts([[4, 5], [1, 2, 3]], pad_id=0, bucket=4)
    np.testing.assert_array_equal(tokens, [[0, 0, 4, 5], [0, 1, 2, 3]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1], []])


# ----------------------------------------------------------------------------- generation


def test_greedy_generation_is_deterministic_and_does_not_recompile(greedy):
    first = greedy.generate(PROMPTS, max_new_tokens=NEW)
    second = greedy.generate(PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    assert second.compile_seconds == 0.0  # same shapes: cached executables
    assert first.tokens.shape == (2, NEW) and (first.lengths == NEW).all()
    assert first.decode_steps == NEW - 1 and first.prompt_tokens == 8


def test_prefill_and_decode_loop_update_the_cache_in_place(model, greedy):
    """Both programs take the cache donated and return it aliased: one copy of the cache in
    device memory, not two (a 128k-token cache is 16 GiB on Mixtral-8x7B shapes)."""
    greedy.generate(PROMPTS, max_new_tokens=NEW)
    exes = greedy.executables()
    assert len(exes) >= 2  # prefill and the decode loop
    slots = 16 + NEW  # the prompts' bucket plus the new tokens
    cache = jax.eval_shape(lambda: model.init_cache(len(PROMPTS), slots))
    need = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    for exe in exes:
        assert exe.memory_analysis().alias_size_in_bytes >= need


def test_generation_matches_teacher_forced_forward(model, greedy):
    """Greedy tokens equal the argmax of one plain (uncached, unpadded) forward over them."""
    res = greedy.generate(PROMPTS, max_new_tokens=NEW)
    p = PROMPTS[1]
    seq = jnp.asarray([p + res.tokens[1, :NEW - 1].tolist()], jnp.int32)
    logits, _ = jax.jit(lambda m, s: m(s))(model, seq)  # [1, len(p) + NEW - 1, v]
    want = np.argmax(np.asarray(logits[0, len(p) - 1:]), axis=-1)
    np.testing.assert_array_equal(res.tokens[1], want)


def test_eos_stops_and_pads(greedy):
    ref = greedy.generate(PROMPTS, max_new_tokens=NEW)
    eos = int(ref.tokens[0, 2])
    greedy.eos_id = eos
    try:
        res = greedy.generate(PROMPTS, max_new_tokens=NEW)
    finally:
        greedy.eos_id = None
    assert res.compile_seconds == 0.0  # the EOS id is traced, not baked in
    first_hit = int(np.flatnonzero(ref.tokens[0] == eos)[0])
    assert res.lengths[0] == first_hit + 1
    np.testing.assert_array_equal(res.tokens[0, :first_hit + 1], ref.tokens[0, :first_hit + 1])
    assert (res.tokens[0, first_hit + 1:] == 0).all()  # pad_id after EOS
    hits1 = np.flatnonzero(ref.tokens[1] == eos)
    assert res.lengths[1] == (hits1[0] + 1 if hits1.size else NEW)


def test_any_of_several_eos_ids_stops(greedy):
    ref = greedy.generate(PROMPTS, max_new_tokens=NEW)
    stops = (int(ref.tokens[1, 1]), int(ref.tokens[0, 3]))
    greedy.eos_id = stops
    try:
        res = greedy.generate(PROMPTS, max_new_tokens=NEW)
    finally:
        greedy.eos_id = None
    for r in range(2):
        first = int(np.flatnonzero(np.isin(ref.tokens[r], stops))[0])
        assert res.lengths[r] == first + 1
        np.testing.assert_array_equal(res.tokens[r, :first + 1], ref.tokens[r, :first + 1])


def test_streaming_matches_the_jitted_loop(greedy):
    seen = []
    res = greedy.generate(PROMPTS, max_new_tokens=NEW,
                          stream=lambda pos, toks: seen.append((pos, toks)))
    ref = greedy.generate(PROMPTS, max_new_tokens=NEW)
    np.testing.assert_array_equal(res.tokens, ref.tokens)
    assert [p for p, _ in seen] == list(range(NEW))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), ref.tokens)


def test_decode_step_traces_once(model):
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(decode_step, n=1), static_argnums=0,
                   static_argnames="sampling")
    graphdef, state = nnx.split(model)
    cache = KVCache.init(model.config, 2, NEW)
    token = jnp.asarray([1, 2], jnp.int32)
    key = jax.random.key(0)
    for _ in range(NEW):  # every call moves the cache index; a retrace on any token would raise
        key, sub = jax.random.split(key)
        token, cache = step(graphdef, state, token, cache, sub, sampling=SamplingConfig())
    assert int(cache.index) == NEW
    np.testing.assert_array_equal(np.asarray(cache.lengths), [NEW, NEW])


# ----------------------------------------------------------------------------- CLI


def test_cli_runs_end_to_end_on_the_tiny_model(capsys):
    assert main(["--random-tiny", "--max-new-tokens", "3", "--no-eos", "--prompt", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "prefill" in out and "decode" in out
    assert "compile" in out and "block_until_ready" in out
    assert "output   [" in out


def test_cli_rejects_text_prompt_without_tokenizer():
    with pytest.raises(ValueError, match="token ids"):
        main(["--random-tiny", "--prompt", "hello world", "--max-new-tokens", "1"])


def test_cli_auto_implementation(capsys):
    """--implementation auto (the default): xla off a GPU; on one the fastest that applies (dense
    float32 experts: triton); the choice is printed. Offloaded experts never get a Hopper
    layout."""
    from pallas_kernels import backend as backend_lib
    from samoyeds_jax.generate_cli import build_parser, implementation_for
    assert main(["--random-tiny", "--max-new-tokens", "1", "--no-eos", "--prompt", "1,2"]) == 0
    expected = "triton" if backend_lib.platform() == "gpu" else "xla"
    assert f"implementation={expected}," in capsys.readouterr().out
    p = build_parser()
    assert implementation_for(p.parse_args(["--random-tiny"])) is None
    assert implementation_for(p.parse_args(["--random-tiny", "--offload"])) == ("triton", "xla")
    assert implementation_for(p.parse_args(["--random-tiny", "--devices", "2"])) == ("triton", "xla")
    assert implementation_for(p.parse_args(["--implementation", "xla"])) == "xla"


def test_cli_hopper_layout_runs(capsys):
    """--implementation mosaic_sparse_mma: Samoyeds experts moved to the Hopper layout (on CPU the
    Mosaic GPU product runs as its jnp reference); a dense model is refused with a clear error."""
    assert main(["--random-tiny", "--format", "samoyeds", "--implementation", "mosaic_sparse_mma",
                 "--max-new-tokens", "2", "--no-eos", "--prompt", "1,2,3"]) == 0
    out = capsys.readouterr().out
    assert "implementation=mosaic_sparse_mma" in out
    if jax.default_backend() != "gpu":
        assert "no GPU: the Mosaic GPU kernels' jnp reference runs" in out
    with pytest.raises(ValueError, match="mosaic_sparse_mma needs 2:4 or Samoyeds experts"):
        main(["--random-tiny", "--implementation", "mosaic_sparse_mma", "--max-new-tokens", "1"])


def test_cli_reference_model_text_in_text_out(capsys):
    """The default model is the shipped trained one: a text prompt comes back decoded; its
    Samoyeds conversion runs too."""
    assert main(["--max-new-tokens", "8", "--prompt", "KING.\nWhat news?"]) == 0
    out = capsys.readouterr().out
    assert "reference MoE trained on Shakespeare" in out
    text_line = next(line for line in out.splitlines() if line.strip().startswith("text"))
    assert "KING.\\nWhat news?" in text_line and len(text_line) > len("  text     'KING.\\nWhat news?'")
    assert main(["--format", "samoyeds", "--max-new-tokens", "2"]) == 0
    assert "format=samoyeds" in capsys.readouterr().out

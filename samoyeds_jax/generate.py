"""Jit-compiled generation: batched prefill, then decode under ``jax.jit``.

- Prompts of different lengths are left-padded to a common length (rounded up to a bucket so
  nearby lengths share one compiled prefill) with an attention mask; each row gets the rotary
  positions and logits it would get alone.
- ``prefill`` and ``decode_step`` are pure functions of ``(graphdef, state, ...)``, jitted once
  per shape; ``decode_step`` traces once and is reused for every token.
- Without a streaming callback the whole decode loop runs inside one jitted ``lax.while_loop``
  that stops when every row has produced EOS or after ``max_new_tokens``; with a callback, a host
  loop calls the jitted ``decode_step`` and hands each new token to the callback.
- Sampling: greedy (temperature 0), or temperature with optional top-k and top-p, from an explicit
  PRNG key.
- Executables are compiled ahead of time (``jit(...).lower(...).compile()``), so the reported
  prefill/decode seconds exclude compilation (reported separately) and end at ``block_until_ready``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.checks import check_ids, expect_kind, expect_number, expect_positive_ints
from samoyeds_jax.model import KVCache, MoETransformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is picked from the logits.

    Attributes:
      temperature: 0 means greedy (argmax); otherwise logits are divided by it and sampled.
      top_k: keep only the k most likely tokens (0 = off).
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        expect_number("SamplingConfig", "temperature", self.temperature)
        expect_number("SamplingConfig", "top_p", self.top_p)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise ValueError(f"SamplingConfig: top_k must be an int (0 = off), got {self.top_k!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """Pick one token per row.

    Args:
      logits: ``[b, v]`` float.
      key: PRNG key (unused when greedy).
      config: static sampling settings.
    Returns:
      ``[b]`` int32 token ids.
    """
    expect_kind("sample: config", config, SamplingConfig, "a SamplingConfig")
    expect_kind("sample: logits", logits, (jax.Array, np.ndarray), "an array [b, vocab]")
    if logits.ndim != 2:
        raise ValueError(f"sample: logits must be [b, vocab], got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"sample: logits must have a floating dtype, got {logits.dtype}")
    logits = logits.astype(jnp.float32)
    if config.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    neg = jnp.finfo(jnp.float32).min
    if config.top_k > 0:
        k = min(config.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][:, k - 1:k]  # [b, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if config.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [b, v] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a token while the mass of strictly more likely tokens is below top_p; the top
        # token is always kept.
        keep = mass_before < config.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def eos_array(eos_id: int | Sequence[int] | None, vocab_size: int | None = None) -> np.ndarray:
    """Stop token ids as int32 ``[n]`` (n >= 1; ``[-1]``, which matches no token, when None).

    Raises ValueError for ids that are not integers (or bools), or (given ``vocab_size``) lie
    outside ``[0, vocab_size)``: such a stop token could never be emitted."""
    if eos_id is None:
        return np.asarray([-1], np.int32)
    ids = np.asarray(eos_id)
    if ids.ndim > 1 or ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"eos_id must be an integer token id or a flat sequence of them, got "
                         f"{eos_id!r}")
    ids = ids.reshape(-1)
    if vocab_size is not None and ids.size:
        check_ids(ids, vocab_size, "eos_id")
    return ids.astype(np.int32) if ids.size else np.asarray([-1], np.int32)


def check_special_ids(eos_id: int | Sequence[int] | None, pad_id: int, vocab_size: int) -> None:
    """ValueError unless the stop ids (``eos_array``) and ``pad_id`` are token ids in
    ``[0, vocab_size)``; the generators call it when built, before any work."""
    eos_array(eos_id, vocab_size)
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
        raise TypeError(f"pad_id must be an int token id, got {pad_id!r}")
    check_ids(np.asarray(pad_id), vocab_size, "pad_id")


def is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """``[b]`` bool: the token is one of ``eos_ids [n]``."""
    return jnp.any(tokens[:, None] == eos_ids[None, :], axis=1)


def output_lengths(tokens: np.ndarray, steps: int, eos_id: int | Sequence[int] | None
                   ) -> np.ndarray:
    """``[b]`` new tokens per row: up to and including the first stop token, else ``steps``."""
    eos = eos_array(eos_id)
    lengths = np.full((tokens.shape[0],), steps, np.int32)
    for r in range(tokens.shape[0]):
        hits = np.flatnonzero(np.isin(tokens[r, :steps], eos))
        if hits.size:
            lengths[r] = hits[0] + 1
    return lengths


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, bucket: int = 16,
                vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to one length, rounded up to a multiple of ``bucket``.

    Returns:
      ``(tokens [b, T] int32, mask [b, T] bool)``, padding on the left, mask False there.

    Raises:
      TypeError: ``prompts`` is not a sequence of token-id sequences (text, say).
      ValueError: no prompt, an empty prompt, non-integer ids, or (given ``vocab_size``) a
        token id or ``pad_id`` outside ``[0, vocab_size)``.
    """
    expect_positive_ints("pad_prompts", bucket=bucket)
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a sequence of token-id sequences, got text; encode it "
                        "with the tokenizer first")
    if not hasattr(prompts, "__len__"):
        raise TypeError(f"prompts must be a sequence of token-id sequences, got "
                        f"{type(prompts).__name__}")
    if vocab_size is not None:
        check_ids(np.asarray(pad_id), vocab_size, "pad_id")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
            raise TypeError(f"prompts[{i}] must be a sequence of token ids, got "
                            f"{type(p).__name__}")
        arr = np.asarray(p)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"prompts[{i}] must be a flat sequence of integer token ids, got "
                             f"shape {arr.shape} and dtype {arr.dtype}")
        if vocab_size is not None and arr.size:
            check_ids(arr, vocab_size, f"prompts[{i}] token ids")
        rows.append(arr)
    if not rows:
        raise ValueError("need at least one prompt, got none")
    lengths = [len(p) for p in rows]
    if min(lengths) == 0:
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths}")
    width = -(-max(lengths) // bucket) * bucket
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, p in enumerate(rows):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    return tokens, mask


def prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array,
            cache: KVCache, key: jax.Array, *, sampling: SamplingConfig
            ) -> tuple[jax.Array, KVCache]:
    """Feed the prompts ``tokens [b, T]`` and sample the first new token ``[b]``."""
    model = nnx.merge(graphdef, state, copy=True)
    logits, cache = model(tokens, mask=mask, cache=cache, logits_for="last")
    return sample(logits, key, sampling), cache


def decode_step(graphdef: nnx.GraphDef, state: nnx.State, token: jax.Array, cache: KVCache,
                key: jax.Array, *, sampling: SamplingConfig) -> tuple[jax.Array, KVCache]:
    """Feed one token per row ``[b]`` and sample the next ``[b]``."""
    model = nnx.merge(graphdef, state, copy=True)
    logits, cache = model(token[:, None], cache=cache, logits_for="last")
    return sample(logits, key, sampling), cache


def decode_loop(graphdef: nnx.GraphDef, state: nnx.State, first: jax.Array, cache: KVCache,
                key: jax.Array, eos_ids: jax.Array, pad_id: jax.Array, *,
                sampling: SamplingConfig, max_new_tokens: int
                ) -> tuple[jax.Array, jax.Array, KVCache]:
    """Generate up to ``max_new_tokens`` tokens per row inside one ``lax.while_loop``.

    Args:
      first: ``[b]`` the token sampled by prefill (output position 0).
      eos_ids: ``[n]`` int32 stop tokens (-1 entries never match); pad_id: ``[]`` int32. Both are
        traced, so changing them does not recompile.
    Returns:
      ``(tokens [b, max_new_tokens] int32, steps [] int32, cache)``: positions after a row's EOS
      hold ``pad_id``; ``steps`` counts the positions written (decode steps run = steps - 1).
      The cache is returned so that a caller donating it gets it updated in place (one copy of
      the cache in device memory instead of two).
    """
    b = first.shape[0]
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = is_eos(first, eos_ids)

    def cond(carry):
        i, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, key, out = carry
        key, sub = jax.random.split(key)
        nxt, cache = decode_step(graphdef, state, token, cache, sub, sampling=sampling)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.zeros((), jnp.int32), i))
        done = done | is_eos(nxt, eos_ids)
        return i + 1, nxt, cache, done, key, out

    steps, _, cache, _, _, out = jax.lax.while_loop(
        cond, body, (jnp.ones((), jnp.int32), first, cache, done, key, out))
    return out, steps, cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """Output of ``Generator.generate``.

    Attributes:
      tokens: ``[b, max_new_tokens]`` int32, new tokens; after a row's EOS (kept) comes ``pad_id``.
      lengths: ``[b]`` new tokens per row, EOS included.
      prompt_tokens: real (unpadded) prompt tokens in the batch.
      prefill_seconds, decode_seconds: wall time of the compiled prefill / decode, compile excluded.
      decode_steps: decode steps run (each produces one token per row).
      compile_seconds: time spent compiling for this call (0 when cached).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    compile_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-12)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by decode steps (batch rows x steps) per second."""
        return self.tokens.shape[0] * self.decode_steps / max(self.decode_seconds, 1e-12)


class Generator:
    """Compiles and runs prefill + decode for one model and one sampling config.

    Compiled executables are cached per (batch, prompt width, max_new_tokens), so repeated calls
    with the same shapes never recompile.
    """

    def __init__(self, model: MoETransformer, *, sampling: SamplingConfig = SamplingConfig(),
                 eos_id: int | Sequence[int] | None = None, pad_id: int = 0, bucket: int = 16):
        if not isinstance(model, nnx.Module) or not hasattr(model, "init_cache"):
            raise TypeError(f"Generator: model must be a MoETransformer (or ScannedTransformer), "
                            f"got {type(model).__name__}")
        expect_kind("Generator: sampling", sampling, SamplingConfig, "a SamplingConfig")
        expect_positive_ints("Generator", bucket=bucket)
        self.graphdef, self.state = nnx.split(model)
        self.config = model.config
        self.init_cache = model.init_cache  # a ScannedTransformer stacks its middle blocks' cache
        self.sampling = sampling
        check_special_ids(eos_id, pad_id, model.config.vocab_size)
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.bucket = bucket
        self._prefill = jax.jit(prefill, static_argnums=0, static_argnames="sampling",
                                donate_argnames="cache")
        self._step = jax.jit(decode_step, static_argnums=0, static_argnames="sampling",
                             donate_argnames="cache")
        self._loop = jax.jit(decode_loop, static_argnums=0,
                             static_argnames=("sampling", "max_new_tokens"),
                             donate_argnames="cache")
        self._compiled: dict[tuple, Any] = {}

    def _compile(self, name: str, fn, *args, **kwargs):
        """AOT-compile ``fn`` for these argument shapes once; returns (executable, seconds spent)."""
        shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype)), args[2:])
        key = (name, str(jax.tree.structure(args[2:])), tuple(jax.tree.leaves(shapes)),
               tuple(sorted(kwargs.items())))
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        exe = fn.lower(*args, **kwargs).compile()
        self._compiled[key] = exe
        return exe, time.perf_counter() - t0

    def executables(self) -> list[Any]:
        """The programs compiled so far (prefill, decode loop or step, per shape), e.g. for
        their optimized HLO (``as_text()``)."""
        return list(self._compiled.values())

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 key: jax.Array | None = None,
                 stream: Callable[[int, np.ndarray], None] | None = None) -> GenerationResult:
        """Generate for a batch of token-id prompts.

        Args:
          prompts: b lists of token ids in ``[0, vocab_size)`` (lengths may differ; checked as
            in ``pad_prompts``).
          max_new_tokens: new tokens per row, at most.
          key: PRNG key for sampling (default ``jax.random.key(0)``).
          stream: optional ``stream(position, tokens [b])`` called on the host for every new
            position as it is produced (rows that already ended get ``pad_id``).
        Returns:
          a ``GenerationResult``.
        """
        expect_positive_ints("generate", max_new_tokens=max_new_tokens)
        if stream is not None and not callable(stream):
            raise TypeError(f"generate: stream must be None or a callable stream(position, "
                            f"tokens), got {type(stream).__name__}")
        key = jax.random.key(0) if key is None else key
        tokens, mask = pad_prompts(prompts, pad_id=self.pad_id, bucket=self.bucket,
                                   vocab_size=self.config.vocab_size)
        b, width = tokens.shape
        longest, limit = int(mask.sum(axis=1).max()), self.config.max_position_embeddings
        if longest + max_new_tokens > limit:
            raise ValueError(f"generate: the longest prompt ({longest} tokens) + max_new_tokens="
                             f"{max_new_tokens} exceeds the model's max_position_embeddings="
                             f"{limit}")
        cache = self.init_cache(b, width + max_new_tokens)
        key, k0 = jax.random.split(key)
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

        pre, c_pre = self._compile("prefill", self._prefill, self.graphdef, self.state, tokens,
                                   mask, cache, k0, sampling=self.sampling)
        if stream is None:
            first_shape = jax.ShapeDtypeStruct((b,), jnp.int32)
            scalar = jax.ShapeDtypeStruct((), jnp.int32)
            eos_shape = jax.ShapeDtypeStruct(eos_array(self.eos_id).shape, jnp.int32)
            loop, c_dec = self._compile(
                "loop", self._loop, self.graphdef, self.state, first_shape, cache, key, eos_shape,
                scalar, sampling=self.sampling, max_new_tokens=max_new_tokens)
        else:
            step, c_dec = self._compile("step", self._step, self.graphdef, self.state,
                                        jax.ShapeDtypeStruct((b,), jnp.int32), cache, key,
                                        sampling=self.sampling)

        t0 = time.perf_counter()
        first, cache = pre(self.state, tokens, mask, cache, k0)
        first.block_until_ready()
        t_prefill = time.perf_counter() - t0

        t0 = time.perf_counter()
        if stream is None:
            eos = jnp.asarray(eos_array(self.eos_id))
            out, steps, _ = loop(self.state, first, cache, key, eos,
                                 jnp.asarray(self.pad_id, jnp.int32))
            out = np.asarray(jax.block_until_ready(out))
            steps = int(steps)
        else:
            out = np.full((b, max_new_tokens), self.pad_id, np.int32)
            token = np.asarray(first)
            out[:, 0] = token
            stream(0, token.copy())
            eos = eos_array(self.eos_id)
            done = np.isin(token, eos)
            steps = 1
            while steps < max_new_tokens and not done.all():
                key, sub = jax.random.split(key)
                nxt, cache = step(self.state, jnp.asarray(token), cache, sub)
                token = np.where(done, self.pad_id, np.asarray(nxt))
                out[:, steps] = token
                stream(steps, token.copy())
                done |= np.isin(token, eos)
                steps += 1
        t_decode = time.perf_counter() - t0

        lengths = output_lengths(out, steps, self.eos_id)
        return GenerationResult(tokens=out, lengths=lengths, prompt_tokens=int(np.sum(mask)),
                                prefill_seconds=t_prefill, decode_seconds=t_decode,
                                decode_steps=steps - 1, compile_seconds=c_pre + c_dec)


def generate(model: MoETransformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), key: jax.Array | None = None,
             eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
             stream: Callable[[int, np.ndarray], None] | None = None) -> GenerationResult:
    """One-shot ``Generator(model, ...).generate(prompts, ...)``."""
    return Generator(model, sampling=sampling, eos_id=eos_id, pad_id=pad_id).generate(
        prompts, max_new_tokens=max_new_tokens, key=key, stream=stream)
